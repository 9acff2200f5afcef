//! The background driver: the tasks that call the runtime for a start or a stop, with
//! retries and timeouts, and record the outcome as conditional updates on the session and
//! state they left, so a stop that overtook a start wins and a late start attempt tears down
//! what it made. Runtime calls for one notebook are serialised by its lock in the service's `Driver`.

use std::time::Duration;

use marina_config::workload::SailConfig;
use marina_config::Id;
use marina_runtime::{Endpoint, StartSpec};

use super::Lifecycle;
use crate::error::StoreError;
use crate::model::Status;
use crate::store::notebooks as store;

pub(super) fn spawn_start(lc: &Lifecycle, id: Id, session: Id, sail: SailConfig) {
    let ops = lc.driver.ops(id);
    let task_lc = lc.clone();
    let task_ops = ops.clone();
    let handle = tokio::spawn(async move {
        let _serial = task_ops.lock.lock().await;
        drive_start(&task_lc, id, session, sail).await;
    });
    *ops.start_task.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle.abort_handle());
}

/// Is the notebook still in `status` for `session`? (Another call may have moved it.)
async fn still(lc: &Lifecycle, id: Id, session: Id, status: Status) -> bool {
    matches!(store::is_in(&lc.db, id, session, status).await, Ok(true))
}

async fn drive_start(lc: &Lifecycle, id: Id, session: Id, sail: SailConfig) {
    let attempts = sail.max_retries.max(1);
    let timeout = Duration::from_secs(lc.settings.control.start_timeout_seconds.max(1));
    let mut last_error = String::new();
    for attempt in 1..=attempts {
        if !still(lc, id, session, Status::Starting).await {
            return;
        }
        let spec = StartSpec {
            notebook_id: id,
            session_id: session,
            sail: sail.clone(),
            base_url: lc.settings.addressing().marimo_base_url(id),
            attempt,
        };
        match tokio::time::timeout(timeout, lc.runtime.start(&spec)).await {
            Ok(Ok(endpoint)) => {
                match mark_running(lc, id, session, &endpoint).await {
                    Ok(true) => {
                        lc.metrics.event("start_ok");
                        tracing::info!(notebook = %id, attempt, "notebook running");
                    }
                    Ok(false) => {
                        // Stopped or deleted while starting: undo what this attempt made.
                        let _ = lc.runtime.stop(id).await;
                    }
                    Err(e) => {
                        tracing::error!(notebook = %id, error = %e, "recording a started notebook");
                        let _ = lc.runtime.stop(id).await;
                        let _ = mark_failed(
                            lc,
                            id,
                            session,
                            Status::Starting,
                            &format!("internal error: {e}"),
                        )
                        .await;
                    }
                }
                return;
            }
            Ok(Err(e)) => last_error = e.to_string(),
            Err(_) => last_error = format!("start attempt timed out after {} s", timeout.as_secs()),
        }
        lc.metrics.event("start_retry");
        tracing::warn!(notebook = %id, attempt, attempts, error = %last_error, "start attempt failed");
        // Tear down the failed attempt before the next one (runtimes are idempotent).
        if let Err(e) = lc.runtime.stop(id).await {
            tracing::warn!(notebook = %id, error = %e, "cleaning up a failed start attempt");
        }
    }
    lc.metrics.event("start_failed");
    let message = format!("start failed after {attempts} attempt(s): {last_error}");
    if let Err(e) = mark_failed(lc, id, session, Status::Starting, &message).await {
        tracing::error!(notebook = %id, error = %e, "recording a failed start");
    }
}

async fn mark_running(
    lc: &Lifecycle,
    id: Id,
    session: Id,
    ep: &Endpoint,
) -> Result<bool, StoreError> {
    let won = store::mark_running(&lc.db, id, session, ep).await?;
    if won {
        lc.routes_changed.notify_waiters();
    }
    Ok(won)
}

/// `from` → `failed` with `message`, if the notebook is still there in that session.
pub(super) async fn mark_failed(
    lc: &Lifecycle,
    id: Id,
    session: Id,
    from: Status,
    message: &str,
) -> Result<bool, StoreError> {
    let won = store::mark_failed(&lc.db, id, session, from, &truncate(message, 2000)).await?;
    if won {
        lc.routes_changed.notify_waiters();
    }
    Ok(won)
}

pub(super) fn truncate(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

pub(super) fn spawn_stop(lc: &Lifecycle, id: Id) {
    lc.driver.abort_start(id);
    let ops = lc.driver.ops(id);
    let lc = lc.clone();
    tokio::spawn(async move {
        let _serial = ops.lock.lock().await;
        drive_stop(&lc, id).await;
    });
}

async fn drive_stop(lc: &Lifecycle, id: Id) {
    let mut last_error = String::new();
    for attempt in 0..3u32 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(500 << attempt)).await;
        }
        match lc.runtime.stop(id).await {
            Ok(()) => {
                let res = store::mark_stopped(&lc.db, id).await;
                if let Err(e) = res {
                    tracing::error!(notebook = %id, error = %e, "recording a stopped notebook");
                }
                lc.metrics.event("stop_ok");
                return;
            }
            Err(e) => last_error = e.to_string(),
        }
        tracing::warn!(notebook = %id, attempt, error = %last_error, "stop attempt failed");
    }
    lc.metrics.event("stop_failed");
    let message = truncate(&format!("stop failed: {last_error}"), 2000);
    let res = store::mark_stop_failed(&lc.db, id, &message).await;
    if let Err(e) = res {
        tracing::error!(notebook = %id, error = %e, "recording a failed stop");
    }
}
