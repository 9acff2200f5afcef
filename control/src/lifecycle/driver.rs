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
    let in_flight = lc.driver.in_flight.enter();
    let handle = tokio::spawn(async move {
        let _in_flight = in_flight;
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
    let in_flight = lc.driver.in_flight.enter();
    let lc = lc.clone();
    tokio::spawn(async move {
        let _in_flight = in_flight;
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

#[cfg(test)]
mod tests {
    //! The driver's own functions against a fake runtime and a scratch SQLite store: what a
    //! start or a stop leaves in the store, and what the runtime was asked.

    use std::sync::atomic::Ordering;

    use super::*;
    use crate::lifecycle::testing::{Fixture, START_FAILURE};

    fn sail(max_retries: u32) -> SailConfig {
        serde_json::from_value(serde_json::json!({ "maxRetries": max_retries })).expect("sail")
    }

    #[tokio::test]
    async fn a_successful_start_is_running_with_its_endpoint() {
        let f = Fixture::new(3, |_| {}).await;
        let nb = f.notebook(0).await;
        let session = f.begin_start(nb).await;
        drive_start(&f.lc, nb, session, sail(3)).await;
        let got = f.get(nb).await;
        assert_eq!(
            (got.status, got.session_id, got.status_message),
            (Status::Running, Some(session), None)
        );
        // The store routes to exactly what the runtime answered, after one attempt.
        let ep = f.rt.endpoint(nb).expect("the runtime runs it");
        assert_eq!(f.routed(nb).await, Some(ep));
        assert_eq!(f.rt.attempts_of(nb), [1]);
        assert_eq!(f.rt.stops_of(nb), 0);
    }

    #[tokio::test]
    async fn failed_attempts_are_retried_and_each_torn_down() {
        let f = Fixture::new(3, |_| {}).await;
        let nb = f.notebook(0).await;
        let session = f.begin_start(nb).await;
        f.rt.fail_starts.store(2, Ordering::SeqCst);
        drive_start(&f.lc, nb, session, sail(3)).await;
        assert_eq!(f.get(nb).await.status, Status::Running);
        assert_eq!(f.rt.attempts_of(nb), [1, 2, 3]);
        assert_eq!(f.rt.stops_of(nb), 2, "one stop after each failed attempt");
    }

    #[tokio::test]
    async fn a_start_failing_max_retries_times_is_failed_with_the_reason() {
        let f = Fixture::new(2, |_| {}).await;
        let nb = f.notebook(0).await;
        let session = f.begin_start(nb).await;
        f.rt.fail_starts.store(5, Ordering::SeqCst);
        drive_start(&f.lc, nb, session, sail(2)).await;
        let got = f.get(nb).await;
        assert_eq!(got.status, Status::Failed);
        let msg = got.status_message.expect("a reason");
        assert!(
            msg.starts_with("start failed after 2 attempt(s): ")
                && msg.contains(START_FAILURE)
                && msg.contains("(attempt 2)"),
            "{msg}"
        );
        assert_eq!(f.rt.attempts_of(nb), [1, 2], "no attempt past max_retries");
        assert_eq!(f.rt.stops_of(nb), 2);
        assert_eq!(f.routed(nb).await, None);
        // 0 retries still makes one attempt.
        let nb0 = f.notebook(0).await;
        let session = f.begin_start(nb0).await;
        drive_start(&f.lc, nb0, session, sail(0)).await;
        assert_eq!(f.rt.attempts_of(nb0), [1]);
        assert_eq!(f.get(nb0).await.status, Status::Failed);
    }

    #[tokio::test]
    async fn a_hanging_attempt_is_cut_at_the_start_timeout() {
        let f = Fixture::new(1, |s| s.control.start_timeout_seconds = 1).await;
        let nb = f.notebook(0).await;
        let session = f.begin_start(nb).await;
        f.rt.hold_starts.store(true, Ordering::SeqCst);
        drive_start(&f.lc, nb, session, sail(1)).await;
        let got = f.get(nb).await;
        assert_eq!(got.status, Status::Failed);
        let msg = got.status_message.expect("a reason");
        assert!(msg.contains("timed out after 1 s"), "{msg}");
        assert_eq!(f.rt.stops_of(nb), 1, "the hung attempt is torn down");
    }

    #[tokio::test]
    async fn a_stop_during_a_start_wins_and_the_late_attempt_is_torn_down() {
        let f = Fixture::new(3, |_| {}).await;
        let nb = f.notebook(0).await;
        let session = f.begin_start(nb).await;
        f.rt.hold_starts.store(true, Ordering::SeqCst);
        let lc = f.lc.clone();
        let start = tokio::spawn(async move { drive_start(&lc, nb, session, sail(3)).await });
        f.rt.entered.notified().await;
        // Stopped meanwhile (say by another replica, so nothing aborted this attempt).
        store::begin_stop(&f.lc.db, nb, Some(f.admin), None, 60)
            .await
            .expect("begin stop")
            .expect("won the stop");
        f.rt.release.notify_one();
        start.await.expect("the start task");
        // The attempt succeeded in the runtime but lost in the store: undone, not running.
        assert_eq!(f.get(nb).await.status, Status::Stopping);
        assert_eq!(f.routed(nb).await, None);
        assert!(!f.rt.is_running(nb));
        assert_eq!(f.rt.stops_of(nb), 1);
        assert_eq!(f.rt.attempts_of(nb), [1], "no retry after losing");
        drive_stop(&f.lc, nb).await;
        assert_eq!(f.get(nb).await.status, Status::Stopped);
    }

    #[tokio::test]
    async fn a_start_for_another_session_calls_nothing() {
        let f = Fixture::new(3, |_| {}).await;
        let nb = f.notebook(0).await;
        let session = f.begin_start(nb).await;
        drive_start(&f.lc, nb, Id::random(), sail(3)).await;
        assert!(f.rt.attempts_of(nb).is_empty());
        let got = f.get(nb).await;
        assert_eq!(
            (got.status, got.session_id),
            (Status::Starting, Some(session))
        );
    }

    #[tokio::test]
    async fn lifecycle_stop_aborts_an_in_flight_start() {
        let f = Fixture::new(3, |_| {}).await;
        let nb = f.notebook(0).await;
        f.rt.hold_starts.store(true, Ordering::SeqCst);
        let starting = f.lc.start(&f.get(nb).await, f.admin).await.expect("start");
        assert_eq!(starting.status, Status::Starting);
        f.rt.entered.notified().await;
        let stopping =
            f.lc.stop(&f.get(nb).await, Some(f.admin), None)
                .await
                .expect("stop");
        assert_eq!(stopping.status, Status::Stopping);
        // The stop does not wait for the held attempt: the start task was aborted.
        f.wait_for(nb, Status::Stopped).await;
        assert_eq!(f.rt.attempts_of(nb), [1]);
        assert!(!f.rt.is_running(nb));
    }

    #[tokio::test]
    async fn stop_failures_are_retried_then_failed_with_the_reason() {
        let f = Fixture::new(3, |_| {}).await;
        let nb = f.notebook(0).await;
        // Running, then `stopping` in the store; the stop driven with `failures` failing calls.
        async fn stop_failing(f: &Fixture, nb: Id, failures: u32) {
            let session = f.begin_start(nb).await;
            drive_start(&f.lc, nb, session, sail(3)).await;
            store::begin_stop(&f.lc.db, nb, None, None, 60)
                .await
                .expect("begin stop")
                .expect("won the stop");
            f.rt.fail_stops.store(failures, Ordering::SeqCst);
            drive_stop(&f.lc, nb).await;
        }
        // One failure: retried, then stopped.
        stop_failing(&f, nb, 1).await;
        assert_eq!(f.get(nb).await.status, Status::Stopped);
        assert_eq!(f.rt.stops_of(nb), 2);
        // Three failures: failed, with the runtime's reason.
        stop_failing(&f, nb, 3).await;
        let got = f.get(nb).await;
        assert_eq!(got.status, Status::Failed);
        let msg = got.status_message.expect("a reason");
        assert!(
            msg.starts_with("stop failed: ") && msg.contains("the backend is down"),
            "{msg}"
        );
        assert_eq!(f.rt.stops_of(nb), 5);
    }

    #[tokio::test]
    async fn drain_waits_for_the_tasks_in_flight_and_a_stop_is_recorded_before_it_returns() {
        let f = Fixture::new(1, |_| {}).await;
        let nb = f.notebook(0).await;
        // A start held inside the runtime is in flight: drain gives up and says so.
        f.rt.hold_starts.store(true, Ordering::SeqCst);
        let session = f.begin_start(nb).await;
        let entered = f.rt.entered.notified();
        spawn_start(&f.lc, nb, session, sail(1));
        entered.await;
        assert_eq!(f.lc.drain(Duration::from_millis(100)).await, 1);
        // Once it answers, nothing is left.
        f.rt.hold_starts.store(false, Ordering::SeqCst);
        f.rt.release.notify_one();
        assert_eq!(f.lc.drain(Duration::from_secs(10)).await, 0);
        assert_eq!(f.get(nb).await.status, Status::Running);
        // A stop spawned just before a shutdown: when drain returns, the store says stopped.
        store::begin_stop(&f.lc.db, nb, None, None, 60)
            .await
            .expect("begin stop")
            .expect("won the stop");
        spawn_stop(&f.lc, nb);
        assert_eq!(f.lc.drain(Duration::from_secs(10)).await, 0);
        assert_eq!(f.get(nb).await.status, Status::Stopped);
        assert!(!f.rt.is_running(nb));
    }
}
