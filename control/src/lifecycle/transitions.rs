//! The transitions a request asks for. Each is one conditional update in the store
//! ([`crate::store::notebooks`]): of two concurrent calls exactly one wins, and the loser
//! learns the state it found ([`LifecycleError::InvalidState`]). Start and stop then hand over
//! to the [`super::driver`].

use std::time::Duration;

use marina_config::workload::SailConfig;
use marina_config::Id;

use super::driver::{spawn_start, spawn_stop};
use super::Lifecycle;
use super::LifecycleError;
use crate::model::{Notebook, Status};
use crate::store::notebooks as store;

fn invalid_state(action: &'static str, status: Status, allowed: &'static str) -> LifecycleError {
    LifecycleError::InvalidState {
        action,
        status,
        allowed,
    }
}

async fn current_status(lc: &Lifecycle, id: Id) -> Result<Option<Status>, LifecycleError> {
    Ok(store::status(&lc.db, id).await?)
}

pub(super) async fn sail_config(
    lc: &Lifecycle,
    config_id: Id,
) -> Result<SailConfig, LifecycleError> {
    let config = crate::store::configs::config_json(&lc.db, config_id).await?;
    let body: crate::model::WorkloadConfigBody =
        serde_json::from_str(&config).map_err(|e| LifecycleError::Config {
            id: config_id,
            message: e.to_string(),
        })?;
    Ok(body.sail)
}

/// `stopped`/`failed` → `starting` with a new session id, then drives the start in the
/// background. Returns the notebook as the transition left it (the driver may have moved on
/// by the time the caller looks again).
pub(super) async fn start(
    lc: &Lifecycle,
    nb: &Notebook,
    by: Id,
) -> Result<Notebook, LifecycleError> {
    let sail = sail_config(lc, nb.workload_config_id).await?;
    let session = Id::random();
    let started = store::begin_start(&lc.db, nb.id, session, by, lc.detached_timeout()).await?;
    let Some(started) = started else {
        let status = current_status(lc, nb.id)
            .await?
            .ok_or(LifecycleError::NotFound)?;
        return Err(invalid_state("start", status, "stopped or failed"));
    };
    spawn_start(lc, nb.id, session, sail);
    Ok(started)
}

/// `starting`/`running`/`idle`/`detached` → `stopping`, then tears down in the background.
/// `by` is the member who asked (none for the monitor); `message` becomes `statusMessage`.
pub(super) async fn stop(
    lc: &Lifecycle,
    nb: &Notebook,
    by: Option<Id>,
    message: Option<String>,
) -> Result<Notebook, LifecycleError> {
    let stopping = store::begin_stop(&lc.db, nb.id, by, message, lc.detached_timeout()).await?;
    let Some(stopping) = stopping else {
        let status = current_status(lc, nb.id)
            .await?
            .ok_or(LifecycleError::NotFound)?;
        return Err(invalid_state(
            "stop",
            status,
            "starting, running, idle or detached",
        ));
    };
    lc.routes_changed.notify_waiters();
    spawn_stop(lc, nb.id);
    Ok(stopping)
}

/// Deletes a notebook, stopping whatever runs for it first. The rows go in one transaction;
/// the runtime's leftovers, if its stop failed, are swept by the periodic reconcile.
pub(super) async fn delete(lc: &Lifecycle, nb: &Notebook) -> Result<(), LifecycleError> {
    if nb.status != Status::Stopped {
        store::begin_delete(&lc.db, nb.id).await?;
        lc.routes_changed.notify_waiters();
        lc.driver.abort_start(nb.id);
        let ops = lc.driver.ops(nb.id);
        let _serial = ops.lock.lock().await;
        let timeout = Duration::from_secs(lc.settings.control.start_timeout_seconds.max(1));
        match tokio::time::timeout(timeout, lc.runtime.stop(nb.id)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(notebook = %nb.id, error = %e, "stopping a deleted notebook")
            }
            Err(_) => tracing::warn!(notebook = %nb.id, "stopping a deleted notebook timed out"),
        }
    }
    store::delete(&lc.db, nb.id).await?;
    lc.routes_changed.notify_waiters();
    lc.driver.forget(nb.id);
    Ok(())
}

/// A ping: activity and presence; idle/detached go straight back to running. False when the
/// notebook is not up any more.
pub(super) async fn record_ping(lc: &Lifecycle, id: Id) -> Result<bool, LifecycleError> {
    Ok(store::record_ping(&lc.db, id).await?)
}

/// Records an edge's activity batch: its open connections replace its previous report, and
/// activity moves `lastActiveAt` forward (never back) and wakes idle/detached notebooks.
pub(super) async fn record_activity(
    lc: &Lifecycle,
    batch: &marina_config::wire::ActivityBatch,
) -> Result<(), LifecycleError> {
    crate::store::edges::record_activity(&lc.db, batch).await?;
    lc.metrics
        .activity_batches
        .with_label_values(&[batch.edge_id.as_str()])
        .inc();
    Ok(())
}

#[cfg(test)]
mod tests {
    //! The state machine's edges as the store decides them, on a scratch SQLite database: who
    //! wins a transition, and what a lost one becomes at the API.

    use marina_config::Id;
    use marina_runtime::Endpoint;

    use super::super::LifecycleError;
    use crate::error::ApiError;
    use crate::lifecycle::testing::{new_notebook, store_fixture};
    use crate::model::Status;
    use crate::store::notebooks as store;
    use crate::store::Db;

    /// A database with one organization, its admin, a workload config and a stopped notebook.
    async fn fixture(dir: &tempfile::TempDir) -> (Db, Id, Id) {
        let (db, org, admin, cfg) = store_fixture(dir, 3).await;
        let nb = new_notebook(&db, org, admin, cfg, 0).await;
        (db, nb, admin)
    }

    fn endpoint() -> Endpoint {
        Endpoint {
            upstream: "http://127.0.0.1:1".into(),
            token: "t".into(),
        }
    }

    #[tokio::test]
    async fn of_two_starts_one_wins() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (db, nb, me) = fixture(&dir).await;
        let (a, b) = tokio::join!(
            store::begin_start(&db, nb, Id::random(), me, 60),
            store::begin_start(&db, nb, Id::random(), me, 60),
        );
        let won = [a.expect("a").is_some(), b.expect("b").is_some()];
        assert_eq!(won.iter().filter(|w| **w).count(), 1, "{won:?}");
        assert_eq!(
            store::status(&db, nb).await.expect("status"),
            Some(Status::Starting)
        );
    }

    #[tokio::test]
    async fn a_stop_overtaking_a_start_wins() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (db, nb, me) = fixture(&dir).await;
        let session = Id::random();
        let started = store::begin_start(&db, nb, session, me, 60)
            .await
            .expect("start")
            .expect("won");
        assert_eq!(
            (started.status, started.session_id),
            (Status::Starting, Some(session))
        );
        // Stopped while starting: the late start attempt no longer lands.
        let stopping = store::begin_stop(&db, nb, Some(me), None, 60)
            .await
            .expect("stop")
            .expect("won");
        assert_eq!(stopping.status, Status::Stopping);
        assert!(!store::mark_running(&db, nb, session, &endpoint())
            .await
            .expect("mark running"));
        assert!(store::mark_stopped(&db, nb).await.expect("stopped"));
        // Stopping a stopped notebook loses; so does a second mark_stopped.
        assert!(store::begin_stop(&db, nb, None, None, 60)
            .await
            .expect("stop")
            .is_none());
        assert!(!store::mark_stopped(&db, nb).await.expect("stopped"));
    }

    #[tokio::test]
    async fn driver_transitions_are_bound_to_their_session() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (db, nb, me) = fixture(&dir).await;
        let session = Id::random();
        store::begin_start(&db, nb, session, me, 60)
            .await
            .expect("start")
            .expect("won");
        // Starting again while starting loses.
        assert!(store::begin_start(&db, nb, Id::random(), me, 60)
            .await
            .expect("start")
            .is_none());
        assert!(!store::mark_running(&db, nb, Id::random(), &endpoint())
            .await
            .expect("other session"));
        assert!(store::mark_running(&db, nb, session, &endpoint())
            .await
            .expect("own session"));
        // running → detached → failed (health), each conditional on where it was.
        assert!(
            !store::set_presence(&db, nb, session, Status::Idle, Status::Detached, Some(1))
                .await
                .expect("presence from the wrong state")
        );
        assert!(
            store::set_presence(&db, nb, session, Status::Running, Status::Detached, Some(1))
                .await
                .expect("presence")
        );
        assert!(
            !store::mark_failed(&db, nb, Id::random(), Status::Running, "x")
                .await
                .expect("other session")
        );
        assert!(
            store::mark_failed(&db, nb, session, Status::Running, "gone")
                .await
                .expect("failed")
        );
        assert_eq!(
            store::status(&db, nb).await.expect("status"),
            Some(Status::Failed)
        );
        // A failed notebook may start again.
        assert!(store::begin_start(&db, nb, Id::random(), me, 60)
            .await
            .expect("restart")
            .is_some());
    }

    #[test]
    fn lost_transitions_are_409_and_gone_is_404() {
        let e: ApiError = LifecycleError::InvalidState {
            action: "stop",
            status: Status::Stopped,
            allowed: "starting, running, idle or detached",
        }
        .into();
        assert_eq!(
            (e.status().as_u16(), e.code()),
            (409, "invalid_notebook_state")
        );
        assert_eq!(
            e.to_string(),
            "cannot stop a notebook that is stopped; it must be starting, running, idle or detached"
        );
        let e: ApiError = LifecycleError::NotFound.into();
        assert_eq!((e.status().as_u16(), e.code()), (404, "notebook_not_found"));
        let e: ApiError = LifecycleError::Config {
            id: Id::random(),
            message: "bad".into(),
        }
        .into();
        assert_eq!(e.status().as_u16(), 500);
    }
}
