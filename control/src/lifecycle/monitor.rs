//! The monitor: each tick computes running/idle/detached from the edges' reports and pings,
//! stops notebooks past their idle or detached timeout and refreshes the gauges; less often it
//! checks health, re-drives transitions whose driver died, and does housekeeping. Only the
//! holder of the `monitor` lease acts, so several control replicas do not all stop the same
//! notebook.

use std::time::Duration;

use marina_config::Id;
use marina_runtime::Health;

use super::driver::{mark_failed, spawn_start, spawn_stop};
use super::transitions::{sail_config, stop};
use super::Lifecycle;
use super::{LifecycleError, PING_PRESENCE_MS};
use crate::model::Status;
use crate::store::notebooks as store;
use crate::store::now_ms;

/// Name of the lease that makes one control replica the monitor.
const MONITOR_LEASE: &str = "monitor";

/// Runs the monitor until `shutdown` fires.
pub(super) async fn run_monitor(lc: Lifecycle, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let interval_ms = lc.settings.control.monitor_interval_ms.max(50);
    let lease_ms = (interval_ms as i64 * 5).max(2000);
    let mut ticker = tokio::time::interval(Duration::from_millis(interval_ms));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Health checks and housekeeping run less often than the state computation: they call
    // out to the runtime (the Kubernetes API) or sweep tables.
    let health_every = 5u64;
    let housekeeping_every = (60_000 / interval_ms).max(1);
    let mut tick: u64 = 0;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.changed() => return,
        }
        match lc
            .db
            .try_lease(MONITOR_LEASE, &lc.instance_id, lease_ms)
            .await
        {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "monitor lease");
                continue;
            }
        }
        if let Err(e) = monitor_tick(&lc).await {
            tracing::warn!(error = %e, "monitor tick");
        }
        if tick % health_every == health_every - 1 {
            if let Err(e) = health_tick(&lc).await {
                tracing::warn!(error = %e, "health checks");
            }
            if let Err(e) = redrive_stuck(&lc).await {
                tracing::warn!(error = %e, "re-driving stuck transitions");
            }
        }
        if tick % housekeeping_every == housekeeping_every - 1 {
            if let Err(e) = housekeeping(&lc).await {
                tracing::warn!(error = %e, "housekeeping");
            }
        }
        tick += 1;
    }
}

/// One pass: compute running/idle/detached, stop what timed out, refresh the gauges.
pub(super) async fn monitor_tick(lc: &Lifecycle) -> Result<(), LifecycleError> {
    let now = now_ms();
    let settings = &lc.settings;
    // An edge that stopped reporting (crashed, scaled down) no longer counts after a few of
    // its intervals.
    let edge_expiry = (settings.proxy.activity_interval_ms as i64 * 5)
        .max(settings.control.monitor_interval_ms as i64 * 3);
    let rows = store::up_for_monitor(&lc.db, now - edge_expiry).await?;
    let idle_after = settings.control.idle_after_seconds as i64 * 1000;
    let detached_timeout = settings.control.detached_timeout_seconds as i64 * 1000;
    for row in rows {
        match judge(&row, now, idle_after, detached_timeout) {
            Verdict::Stay => {}
            Verdict::Move(desired) => {
                let since = (desired == Status::Detached).then_some(now);
                store::set_presence(&lc.db, row.id, row.session, row.status, desired, since)
                    .await?;
            }
            Verdict::StopIdle => {
                let message = format!(
                    "stopped after {} s without activity (idleTimeoutSeconds)",
                    row.idle_timeout_ms / 1000
                );
                stop_by_monitor(lc, row.id, "idle_stop", message).await;
            }
            Verdict::StopDetached => {
                let message = format!(
                    "stopped after {} s with no browser connected",
                    detached_timeout / 1000
                );
                stop_by_monitor(lc, row.id, "detached_stop", message).await;
            }
        }
    }
    refresh_gauges(lc).await?;
    Ok(())
}

/// What the monitor does with an up notebook.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    Stay,
    /// Running, idle or detached, whichever it is not now.
    Move(Status),
    /// Past its `idleTimeoutSeconds` without activity.
    StopIdle,
    /// Detached for `detached_timeout` (ms).
    StopDetached,
}

/// Decides an up notebook's fate at `now` (all times in ms): connected (a WebSocket, or a ping
/// in the last [`PING_PRESENCE_MS`]) and active within `idle_after` is running, connected but
/// quiet is idle, unconnected is detached; the idle timeout counts from the last activity (or
/// from when it came up), the detached timeout from when it was first seen detached.
fn judge(n: &store::UpNotebook, now: i64, idle_after: i64, detached_timeout: i64) -> Verdict {
    // No activity yet: the idle clock starts when the notebook came up.
    let active_ref = n.last_active_at.max(n.running_since).unwrap_or(now);
    if n.idle_timeout_ms > 0 && now - active_ref >= n.idle_timeout_ms {
        return Verdict::StopIdle;
    }
    let connected = n.websockets > 0 || n.last_ping_at.is_some_and(|p| now - p < PING_PRESENCE_MS);
    let desired = if !connected {
        Status::Detached
    } else if now - active_ref >= idle_after {
        Status::Idle
    } else {
        Status::Running
    };
    if desired == Status::Detached {
        let since = if n.status == Status::Detached {
            n.detached_since.unwrap_or(now)
        } else {
            now
        };
        if now - since >= detached_timeout {
            return Verdict::StopDetached;
        }
    }
    if desired != n.status {
        Verdict::Move(desired)
    } else {
        Verdict::Stay
    }
}

async fn stop_by_monitor(lc: &Lifecycle, id: Id, event: &str, message: String) {
    let nb = match store::fetch(&lc.db, id, lc.detached_timeout()).await {
        Ok(Some(nb)) => nb,
        Ok(None) | Err(_) => return,
    };
    match stop(lc, &nb, None, Some(message)).await {
        Ok(_) => {
            lc.metrics.event(event);
            tracing::info!(notebook = %id, reason = event, "monitor stopped a notebook");
        }
        // It moved on its own (stopped by a user meanwhile): nothing to do.
        Err(LifecycleError::InvalidState { .. }) | Err(LifecycleError::NotFound) => {}
        Err(e) => tracing::warn!(notebook = %id, error = %e, "monitor stop"),
    }
}

async fn refresh_gauges(lc: &Lifecycle) -> Result<(), LifecycleError> {
    let counts = store::count_by_status(&lc.db).await?;
    for s in Status::ALL {
        lc.metrics
            .notebooks
            .with_label_values(&[s.as_str()])
            .set(counts.get(s.as_str()).copied().unwrap_or(0));
    }
    lc.metrics
        .routes_version
        .set(lc.db.route_version().await? as i64);
    Ok(())
}

/// Finds starts and stops whose driver is gone (its control replica died mid-way) and drives
/// them again. A start is overdue after all its attempts could have timed out, plus a margin;
/// a stop after two minutes. Transitions this process is still driving are left alone.
pub(super) async fn redrive_stuck(lc: &Lifecycle) -> Result<(), LifecycleError> {
    let now = now_ms();
    let rows = store::in_transition(&lc.db).await?;
    let attempt_ms = lc.settings.control.start_timeout_seconds.max(1) as i64 * 1000;
    for row in rows {
        let id = row.id;
        let since = row.since;
        if lc.driver.busy(id) {
            continue;
        }
        if row.status == Status::Stopping {
            if now - since > 120_000 {
                tracing::warn!(notebook = %id, "re-driving a stop whose driver is gone");
                lc.metrics.event("redriven");
                spawn_stop(lc, id);
            }
            continue;
        }
        let Some(session) = row.session else {
            continue;
        };
        let sail = sail_config(lc, row.workload_config_id).await?;
        let overdue = attempt_ms * (sail.max_retries.max(1) as i64 + 1) + 30_000;
        if now - since > overdue {
            tracing::warn!(notebook = %id, "re-driving a start whose driver is gone");
            lc.metrics.event("redriven");
            spawn_start(lc, id, session, sail);
        }
    }
    Ok(())
}

/// Asks the runtime about every up notebook; dead ones become `failed` with the reason.
pub(super) async fn health_tick(lc: &Lifecycle) -> Result<(), LifecycleError> {
    for (id, session) in store::up_sessions(&lc.db).await? {
        let reason = match lc.runtime.health(id).await {
            Ok(Health::Healthy) | Ok(Health::Pending) => continue,
            Ok(Health::Failed(why)) => why,
            Ok(Health::Missing) => "the notebook's servers are gone".to_owned(),
            Err(e) => {
                tracing::warn!(notebook = %id, error = %e, "health check");
                continue;
            }
        };
        if mark_failed(lc, id, session, Status::Running, &reason).await? {
            lc.metrics.event("health_failed");
            tracing::warn!(notebook = %id, reason = %reason, "notebook failed its health check");
            // Clean up whatever is left, serialised with other runtime calls.
            let ops = lc.driver.ops(id);
            let lc = lc.clone();
            tokio::spawn(async move {
                let _serial = ops.lock.lock().await;
                let _ = lc.runtime.stop(id).await;
            });
        }
    }
    Ok(())
}

/// Forgets expired one-time tokens and edges gone for an hour; sweeps runtime orphans.
async fn housekeeping(lc: &Lifecycle) -> Result<(), LifecycleError> {
    crate::store::edges::forget_expired(&lc.db).await?;
    // Anything the runtime runs that the store does not expect (a deleted notebook whose stop
    // failed, a crash mid-start) is torn down. Starting notebooks are expected (no endpoint
    // yet) so an attempt in flight is left alone.
    let expected = store::expected(&lc.db, true).await?;
    if let Err(e) = lc.runtime.reconcile(&expected).await {
        tracing::warn!(error = %e, "periodic reconcile");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDLE_AFTER: i64 = 60_000;
    const DETACHED: i64 = 300_000;
    const NOW: i64 = 10_000_000;

    fn up(status: Status) -> store::UpNotebook {
        store::UpNotebook {
            id: Id::random(),
            status,
            session: Id::random(),
            idle_timeout_ms: 3_600_000,
            last_active_at: Some(NOW - 1_000),
            last_ping_at: None,
            running_since: Some(NOW - 1_000_000),
            detached_since: None,
            websockets: 1,
        }
    }

    fn judged(n: &store::UpNotebook) -> Verdict {
        judge(n, NOW, IDLE_AFTER, DETACHED)
    }

    #[test]
    fn connected_and_active_is_running() {
        assert_eq!(judged(&up(Status::Running)), Verdict::Stay);
        assert_eq!(judged(&up(Status::Idle)), Verdict::Move(Status::Running));
        assert_eq!(
            judged(&up(Status::Detached)),
            Verdict::Move(Status::Running)
        );
        // A recent ping counts as connected without a WebSocket.
        let mut n = up(Status::Detached);
        n.websockets = 0;
        n.last_ping_at = Some(NOW - PING_PRESENCE_MS + 1);
        assert_eq!(judged(&n), Verdict::Move(Status::Running));
    }

    #[test]
    fn connected_but_quiet_is_idle() {
        let mut n = up(Status::Running);
        n.last_active_at = Some(NOW - IDLE_AFTER);
        assert_eq!(judged(&n), Verdict::Move(Status::Idle));
        n.status = Status::Idle;
        assert_eq!(judged(&n), Verdict::Stay);
    }

    #[test]
    fn unconnected_is_detached_then_stopped() {
        let mut n = up(Status::Running);
        n.websockets = 0;
        n.last_ping_at = Some(NOW - PING_PRESENCE_MS);
        assert_eq!(judged(&n), Verdict::Move(Status::Detached));
        n.status = Status::Detached;
        n.detached_since = Some(NOW - DETACHED + 1);
        assert_eq!(judged(&n), Verdict::Stay);
        n.detached_since = Some(NOW - DETACHED);
        assert_eq!(judged(&n), Verdict::StopDetached);
    }

    #[test]
    fn idle_timeout_counts_from_activity_or_start() {
        let mut n = up(Status::Running);
        n.idle_timeout_ms = 120_000;
        n.last_active_at = Some(NOW - 120_000);
        assert_eq!(judged(&n), Verdict::StopIdle);
        // Never active: from when it came up.
        n.last_active_at = None;
        n.running_since = Some(NOW - 119_999);
        assert_eq!(judged(&n), Verdict::Move(Status::Idle));
        // 0 is never.
        n.idle_timeout_ms = 0;
        n.running_since = Some(0);
        assert_eq!(judged(&n), Verdict::Move(Status::Idle));
    }

    // The passes themselves, on a fake runtime and a scratch SQLite store.

    use std::time::Duration;

    use crate::lifecycle::testing::Fixture;

    /// A running notebook (driven through the real start) with `idle_timeout_seconds`.
    async fn running(f: &Fixture, idle_timeout_seconds: i64) -> Id {
        let nb = f.notebook(idle_timeout_seconds).await;
        f.lc.start(&f.get(nb).await, f.admin).await.expect("start");
        f.wait_for(nb, Status::Running).await;
        nb
    }

    #[tokio::test]
    async fn a_detached_notebook_is_stopped_after_the_detached_timeout() {
        let f = Fixture::new(3, |s| s.control.detached_timeout_seconds = 1).await;
        let nb = running(&f, 0).await;
        // Nobody connected: detached first, not stopped yet.
        monitor_tick(&f.lc).await.expect("tick");
        assert_eq!(f.get(nb).await.status, Status::Detached);
        monitor_tick(&f.lc).await.expect("tick");
        assert_eq!(f.get(nb).await.status, Status::Detached);
        tokio::time::sleep(Duration::from_millis(1100)).await;
        monitor_tick(&f.lc).await.expect("tick");
        let got = f.get(nb).await;
        assert!(
            matches!(got.status, Status::Stopping | Status::Stopped),
            "{got:?}"
        );
        assert_eq!(
            got.status_message.as_deref(),
            Some("stopped after 1 s with no browser connected")
        );
        f.wait_for(nb, Status::Stopped).await;
        assert!(!f.rt.is_running(nb));
        assert_eq!(f.rt.stops_of(nb), 1);
        assert_eq!(f.routed(nb).await, None);
    }

    #[tokio::test]
    async fn a_connected_notebook_is_stopped_after_its_idle_timeout() {
        let f = Fixture::new(3, |_| {}).await;
        let nb = running(&f, 1).await;
        let busy = running(&f, 0).await;
        // A ping: connected and active, so it stays running…
        assert!(record_ping(&f, nb).await);
        assert!(record_ping(&f, busy).await);
        monitor_tick(&f.lc).await.expect("tick");
        assert_eq!(f.get(nb).await.status, Status::Running);
        // …until its idleTimeoutSeconds pass without activity, connected or not.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        connect_without_activity(&f, nb).await;
        monitor_tick(&f.lc).await.expect("tick");
        let got = f.wait_for(nb, Status::Stopped).await;
        assert_eq!(
            got.status_message.as_deref(),
            Some("stopped after 1 s without activity (idleTimeoutSeconds)")
        );
        assert!(!f.rt.is_running(nb));
        // idleTimeoutSeconds 0: never stopped for idleness.
        assert_eq!(f.get(busy).await.status, Status::Running);
        assert!(f.rt.is_running(busy));
    }

    async fn record_ping(f: &Fixture, id: Id) -> bool {
        f.lc.record_ping(id).await.expect("ping")
    }

    /// An edge reports an open WebSocket but no activity: connected, not active.
    async fn connect_without_activity(f: &Fixture, id: Id) {
        let session = f.get(id).await.session_id.expect("session");
        let batch = marina_config::wire::ActivityBatch {
            edge_id: "edge-a".into(),
            sent_at_ms: now_ms(),
            notebooks: vec![marina_config::wire::NotebookActivity {
                notebook_id: id,
                session_id: session,
                last_active_ms: None,
                open_websockets: 1,
            }],
        };
        f.lc.record_activity(&batch).await.expect("activity");
    }

    #[tokio::test]
    async fn a_notebook_whose_servers_are_gone_fails_its_health_check() {
        let f = Fixture::new(3, |_| {}).await;
        let gone = running(&f, 0).await;
        let alive = running(&f, 0).await;
        f.rt.vanish(gone);
        health_tick(&f.lc).await.expect("health");
        let got = f.get(gone).await;
        assert_eq!(got.status, Status::Failed);
        assert_eq!(
            got.status_message.as_deref(),
            Some("the notebook's servers are gone")
        );
        assert_eq!(f.routed(gone).await, None);
        assert_eq!(f.get(alive).await.status, Status::Running);
    }

    #[tokio::test]
    async fn a_released_monitor_lease_is_taken_at_once_by_another_replica() {
        let f = Fixture::new(1, |_| {}).await;
        let db = &f.lc.db;
        assert!(db
            .try_lease(MONITOR_LEASE, "a", 60_000)
            .await
            .expect("lease"));
        assert!(!db
            .try_lease(MONITOR_LEASE, "b", 60_000)
            .await
            .expect("lease"));
        // Only its holder can give it up.
        db.release_lease(MONITOR_LEASE, "b").await.expect("release");
        assert!(!db
            .try_lease(MONITOR_LEASE, "b", 60_000)
            .await
            .expect("lease"));
        db.release_lease(MONITOR_LEASE, "a").await.expect("release");
        assert!(db
            .try_lease(MONITOR_LEASE, "b", 60_000)
            .await
            .expect("lease"));
    }
}
