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

#[cfg(test)]
mod tests {
    //! Reconciliation against a fake runtime on a scratch SQLite store, as a control plane
    //! that restarted mid-way would find things.

    use marina_runtime::Endpoint;

    use super::*;
    use crate::lifecycle::testing::Fixture;

    #[tokio::test]
    async fn adopts_what_runs_settles_what_is_gone_and_resumes_transitions() {
        let f = Fixture::new(3, |_| {}).await;
        let alive = running(&f).await;
        let gone = running(&f).await;
        let stopping = running(&f).await;
        let starting = f.notebook(0).await;
        let orphan = f.notebook(0).await;
        let alive_session = f.get(alive).await.session_id;
        let alive_endpoint = f.routed(alive).await;
        assert!(alive_endpoint.is_some());
        // As a crash would leave them: one notebook's servers vanished, one start and one
        // stop without their driver, and the runtime still running a stopped notebook.
        f.rt.vanish(gone);
        let starting_session = f.begin_start(starting).await;
        store::begin_stop(&f.lc.db, stopping, None, None, 60)
            .await
            .expect("begin stop")
            .expect("won the stop");
        f.rt.adopt(
            orphan,
            Endpoint {
                upstream: "127.0.0.1:1".into(),
                token: "t".into(),
            },
        );

        reconcile_at_start(&f.lc).await.expect("reconcile");

        // The runtime was told to keep exactly the up notebooks, so it dropped the orphan.
        let mut asked = f.rt.reconciled.lock().unwrap().clone();
        assert_eq!(asked.len(), 1);
        let mut want = vec![alive, gone];
        want.sort();
        asked[0].sort();
        assert_eq!(asked[0], want);
        assert!(!f.rt.is_running(orphan));
        assert_eq!(f.get(orphan).await.status, Status::Stopped);
        // Adopted as it was.
        let got = f.get(alive).await;
        assert_eq!(
            (got.status, got.session_id),
            (Status::Running, alive_session)
        );
        assert_eq!(f.routed(alive).await, alive_endpoint);
        // Gone: stopped, saying why, unrouted.
        let got = f.get(gone).await;
        assert_eq!(got.status, Status::Stopped);
        assert!(
            got.status_message
                .as_deref()
                .is_some_and(|m| m.contains("control-plane restart")),
            "{got:?}"
        );
        assert_eq!(f.routed(gone).await, None);
        // The interrupted start is driven to the end in its own session.
        let got = f.wait_for(starting, Status::Running).await;
        assert_eq!(got.session_id, Some(starting_session));
        assert_eq!(f.rt.attempts_of(starting), [1]);
        // The interrupted stop is stopped again.
        f.wait_for(stopping, Status::Stopped).await;
        assert!(!f.rt.is_running(stopping));
    }

    async fn running(f: &Fixture) -> marina_config::Id {
        let nb = f.notebook(0).await;
        f.lc.start(&f.get(nb).await, f.admin).await.expect("start");
        f.wait_for(nb, Status::Running).await;
        nb
    }

    #[tokio::test]
    async fn a_runtime_that_cannot_reconcile_changes_nothing() {
        let f = Fixture::new(3, |_| {}).await;
        let nb = running(&f).await;
        f.rt.fail_reconcile
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let err = reconcile_at_start(&f.lc)
            .await
            .expect_err("reconcile fails");
        assert!(
            matches!(
                err,
                LifecycleError::Runtime {
                    action: "reconcile",
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(f.get(nb).await.status, Status::Running);
        assert!(f.routed(nb).await.is_some());
    }
}
