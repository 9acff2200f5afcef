//! Reconciliation after a restart of the control plane: the store's view is settled against
//! what the runtime still runs, and interrupted transitions are driven again.

use super::driver::{spawn_start, spawn_stop};
use super::transitions::sail_config;
use super::Lifecycle;
use super::LifecycleError;
use crate::model::Status;
use crate::store::notebooks as store;

/// After a (re)start of the control plane: adopt what still runs, settle the rest.
/// - up notebooks the runtime still has stay up; the others become `stopped`;
/// - `starting` ones are driven again (a new attempt in the same session);
/// - `stopping` ones are stopped again (idempotent) and become `stopped`.
pub(super) async fn reconcile_at_start(lc: &Lifecycle) -> Result<(), LifecycleError> {
    let up = store::expected(&lc.db, false).await?;
    let adopted = lc
        .runtime
        .reconcile(&up)
        .await
        .map_err(|e| LifecycleError::Runtime {
            action: "reconcile",
            message: e.to_string(),
        })?;
    for e in &up {
        if adopted.contains(&e.notebook_id) {
            continue;
        }
        store::mark_gone_after_restart(&lc.db, e.notebook_id, e.session_id).await?;
        tracing::info!(notebook = %e.notebook_id, "not running after restart: stopped");
    }
    for row in store::in_transition(&lc.db).await? {
        let id = row.id;
        if row.status == Status::Stopping {
            tracing::info!(notebook = %id, "resuming an interrupted stop");
            spawn_stop(lc, id);
            continue;
        }
        let Some(session) = row.session else {
            continue;
        };
        let sail = sail_config(lc, row.workload_config_id).await?;
        tracing::info!(notebook = %id, "resuming an interrupted start");
        spawn_start(lc, id, session, sail);
    }
    lc.routes_changed.notify_waiters();
    Ok(())
}
