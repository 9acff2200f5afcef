//! The monitor: each tick computes running/idle/detached from the edges' reports and pings,
//! stops notebooks past their idle or detached timeout and refreshes the gauges; less often it
//! checks health, re-drives transitions whose driver died, and does housekeeping. Only the
//! holder of the `monitor` lease acts, so several control replicas do not all stop the same
//! notebook.

use std::collections::HashMap;
use std::time::Duration;

use marina_config::Id;
use marina_runtime::{Busy, Health};

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
    let rows = store::up_for_monitor(&lc.db, now - super::edge_expiry_ms(settings)).await?;
    // A notebook no longer up (stopped by its owner, gone) forgets its busy run.
    busy_runs(lc).retain(|id, _| rows.iter().any(|r| r.id == *id));
    let idle_after = settings.control.idle_after_seconds as i64 * 1000;
    let detached_timeout = settings.control.detached_timeout_seconds as i64 * 1000;
    for row in rows {
        if recheck_busy_run(lc, &row, now).await? {
            // Its timers just moved: judged on the next tick, from fresh rows.
            continue;
        }
        match judge(&row, now, idle_after, detached_timeout) {
            Verdict::Stay => {}
            Verdict::Move(desired) => {
                let since = (desired == Status::Detached).then_some(now);
                store::set_presence(&lc.db, row.id, row.session, row.status, desired, since)
                    .await?;
            }
            Verdict::StopIdle | Verdict::StopDetached
                if held_by_busy_kernel(lc, &row, now).await? => {}
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

/// A kernel found running cells when its notebook was about to be stopped (see
/// [`held_by_busy_kernel`]).
#[derive(Clone, Copy, Debug)]
pub(super) struct BusyRun {
    /// The notebook run it was found busy in.
    session: Id,
    /// When it was first found busy (the start of the hold, for `control.busy_max_seconds`).
    since: i64,
    /// When the runtime was last asked.
    checked: i64,
}

/// How often a held notebook's kernel is asked again, to see its run end: every five monitor
/// intervals, at most 5 s (and at least 0.5 s). The idle and detached timers restart at most
/// this long after the last cell finishes.
fn busy_recheck_ms(lc: &Lifecycle) -> i64 {
    (lc.settings.control.monitor_interval_ms as i64 * 5).clamp(500, 5_000)
}

fn busy_runs(lc: &Lifecycle) -> std::sync::MutexGuard<'_, HashMap<Id, BusyRun>> {
    lc.busy_runs.lock().unwrap_or_else(|e| e.into_inner())
}

/// Asks the runtime, within [`BUSY_QUERY_TIMEOUT`]. Only a kernel that says it is running
/// counts: an error or no answer is `Unknown`.
async fn ask_kernel(lc: &Lifecycle, id: Id) -> Busy {
    match tokio::time::timeout(BUSY_QUERY_TIMEOUT, lc.runtime.kernel_busy(id)).await {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => {
            tracing::warn!(notebook = %id, error = %e, "kernel status");
            Busy::Unknown
        }
        Err(_) => {
            tracing::warn!(notebook = %id, "kernel status: no answer in time");
            Busy::Unknown
        }
    }
}

/// A notebook held up by its busy kernel is asked again every [`busy_recheck_ms`]: still
/// running, its timers move to now (within the maximum); finished, they move to now once more,
/// so the idle and detached timeouts count from the end of the run, and the hold is over.
/// True when the timers were moved.
async fn recheck_busy_run(
    lc: &Lifecycle,
    row: &store::UpNotebook,
    now: i64,
) -> Result<bool, LifecycleError> {
    let run = match busy_runs(lc).get(&row.id).copied() {
        Some(r) if r.session == row.session && now - r.checked >= busy_recheck_ms(lc) => r,
        _ => return Ok(false),
    };
    let busy = ask_kernel(lc, row.id).await;
    let max_ms = lc.settings.control.busy_max_seconds as i64 * 1000;
    if busy == Busy::Running && now - run.since < max_ms {
        busy_runs(lc).insert(
            row.id,
            BusyRun {
                checked: now,
                ..run
            },
        );
    } else {
        busy_runs(lc).remove(&row.id);
        if busy == Busy::Running {
            // Past the maximum: the timers run out from the last move, as without a kernel.
            return Ok(false);
        }
        tracing::info!(notebook = %row.id, kernel = ?busy, "kernel no longer busy; timers restart");
    }
    Ok(store::kernel_busy_at(&lc.db, row.id, row.session, now).await?)
}

/// A notebook `judge` would stop for idleness or detachment: asks the runtime whether its
/// kernel is running cells, and if so (and within `control.busy_max_seconds` of when it was
/// first found busy) keeps it up, counting the run as activity. True when it is kept.
async fn held_by_busy_kernel(
    lc: &Lifecycle,
    row: &store::UpNotebook,
    now: i64,
) -> Result<bool, LifecycleError> {
    let max_ms = lc.settings.control.busy_max_seconds as i64 * 1000;
    if max_ms == 0 {
        return Ok(false);
    }
    // Only a kernel that says it is running holds the notebook. Idle, and also unknown or an
    // error: a runtime that cannot tell (kube without reach, Marimo wedged) must not keep
    // notebooks up forever, so it is stopped as it would be without this check.
    let busy = ask_kernel(lc, row.id).await;
    if busy != Busy::Running {
        busy_runs(lc).remove(&row.id);
        return Ok(false);
    }
    let since = {
        let mut runs = busy_runs(lc);
        let run = runs.entry(row.id).or_insert(BusyRun {
            session: row.session,
            since: now,
            checked: now,
        });
        if run.session != row.session {
            *run = BusyRun {
                session: row.session,
                since: now,
                checked: now,
            };
        }
        run.checked = now;
        run.since
    };
    if now - since >= max_ms {
        busy_runs(lc).remove(&row.id);
        lc.metrics.event("busy_max_reached");
        tracing::info!(
            notebook = %row.id,
            busy_seconds = (now - since) / 1000,
            "kernel busy past control.busy_max_seconds; stopping it as idle or detached"
        );
        return Ok(false);
    }
    if since == now {
        tracing::info!(notebook = %row.id, "kernel busy: kept up past its idle or detached timeout");
    }
    lc.metrics.event("busy_kept");
    store::kernel_busy_at(&lc.db, row.id, row.session, now).await?;
    Ok(true)
}

/// How long the monitor waits for a runtime's kernel status.
const BUSY_QUERY_TIMEOUT: Duration = Duration::from_secs(3);

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

    fn stopping(status: Status) -> bool {
        matches!(status, Status::Stopping | Status::Stopped)
    }

    #[tokio::test]
    async fn a_busy_kernel_keeps_an_idle_expired_notebook_up_until_the_run_ends() {
        let f = Fixture::new(3, |_| {}).await;
        let nb = running(&f, 1).await;
        assert!(record_ping(&f, nb).await);
        connect_without_activity(&f, nb).await;
        monitor_tick(&f.lc).await.expect("tick");
        // Not about to stop: the runtime is not asked.
        assert_eq!(f.rt.busy_queries_of(nb), 0);
        f.rt.set_busy(nb, Some(Busy::Running));
        tokio::time::sleep(Duration::from_millis(1100)).await;
        connect_without_activity(&f, nb).await;
        monitor_tick(&f.lc).await.expect("tick");
        assert_eq!(f.rt.busy_queries_of(nb), 1);
        assert_eq!(f.get(nb).await.status, Status::Running);
        assert!(f.rt.is_running(nb));
        // The run ends: the idle timeout counts from the last time it was found busy, so the
        // next tick keeps it and only a full timeout later is it stopped.
        f.rt.set_busy(nb, Some(Busy::Idle));
        monitor_tick(&f.lc).await.expect("tick");
        assert_eq!(f.get(nb).await.status, Status::Running);
        tokio::time::sleep(Duration::from_millis(1100)).await;
        connect_without_activity(&f, nb).await;
        monitor_tick(&f.lc).await.expect("tick");
        let got = f.wait_for(nb, Status::Stopped).await;
        assert_eq!(
            got.status_message.as_deref(),
            Some("stopped after 1 s without activity (idleTimeoutSeconds)")
        );
    }

    #[tokio::test]
    async fn a_busy_kernel_keeps_a_detached_notebook_up_and_the_timer_restarts_after() {
        let f = Fixture::new(3, |s| s.control.detached_timeout_seconds = 1).await;
        let nb = running(&f, 0).await;
        f.rt.set_busy(nb, Some(Busy::Running));
        monitor_tick(&f.lc).await.expect("tick");
        assert_eq!(f.get(nb).await.status, Status::Detached);
        tokio::time::sleep(Duration::from_millis(1100)).await;
        monitor_tick(&f.lc).await.expect("tick");
        assert_eq!(f.get(nb).await.status, Status::Detached);
        assert_eq!(f.rt.busy_queries_of(nb), 1);
        // Not busy any more: the detached timer starts from the end of the run.
        f.rt.set_busy(nb, Some(Busy::Idle));
        tokio::time::sleep(Duration::from_millis(500)).await;
        monitor_tick(&f.lc).await.expect("tick");
        assert_eq!(f.get(nb).await.status, Status::Detached);
        tokio::time::sleep(Duration::from_millis(700)).await;
        monitor_tick(&f.lc).await.expect("tick");
        let got = f.wait_for(nb, Status::Stopped).await;
        assert_eq!(
            got.status_message.as_deref(),
            Some("stopped after 1 s with no browser connected")
        );
    }

    #[tokio::test]
    async fn a_held_notebook_is_asked_again_and_its_timers_restart_when_the_run_ends() {
        // Monitor every 100 ms: a held kernel is asked again every 500 ms.
        let f = Fixture::new(3, |s| {
            s.control.detached_timeout_seconds = 1;
            s.control.monitor_interval_ms = 100;
        })
        .await;
        let nb = running(&f, 0).await;
        monitor_tick(&f.lc).await.expect("tick");
        assert_eq!(f.get(nb).await.status, Status::Detached);
        f.rt.set_busy(nb, Some(Busy::Running));
        tokio::time::sleep(Duration::from_millis(1100)).await;
        monitor_tick(&f.lc).await.expect("tick");
        assert_eq!(f.rt.busy_queries_of(nb), 1, "about to stop: asked");
        // Still running half a second later: asked again, kept.
        tokio::time::sleep(Duration::from_millis(600)).await;
        monitor_tick(&f.lc).await.expect("tick");
        assert_eq!(f.rt.busy_queries_of(nb), 2);
        // The run ends: seen on the next recheck, and the detached timer starts from there.
        f.rt.set_busy(nb, Some(Busy::Idle));
        tokio::time::sleep(Duration::from_millis(600)).await;
        monitor_tick(&f.lc).await.expect("tick");
        assert_eq!(f.rt.busy_queries_of(nb), 3);
        let ended = now_ms();
        // The hold is over: not asked again until the timer runs out a full timeout later.
        tokio::time::sleep(Duration::from_millis(600)).await;
        monitor_tick(&f.lc).await.expect("tick");
        assert_eq!(f.get(nb).await.status, Status::Detached);
        assert_eq!(f.rt.busy_queries_of(nb), 3);
        tokio::time::sleep(Duration::from_millis(500)).await;
        monitor_tick(&f.lc).await.expect("tick");
        assert!(stopping(f.get(nb).await.status));
        assert!(
            now_ms() - ended >= 1000,
            "a full timeout after the run's end"
        );
    }

    #[tokio::test]
    async fn a_kernel_that_is_idle_unknown_or_unreachable_does_not_hold_a_notebook() {
        // A runtime that cannot tell must not keep notebooks forever: only a kernel that
        // reports running cells holds one, anything else is stopped as without the check.
        let f = Fixture::new(3, |s| s.control.detached_timeout_seconds = 1).await;
        let idle = running(&f, 0).await;
        let unknown = running(&f, 0).await;
        let error = running(&f, 0).await;
        f.rt.set_busy(idle, Some(Busy::Idle));
        f.rt.set_busy(error, None);
        monitor_tick(&f.lc).await.expect("tick");
        tokio::time::sleep(Duration::from_millis(1100)).await;
        monitor_tick(&f.lc).await.expect("tick");
        for nb in [idle, unknown, error] {
            assert!(stopping(f.get(nb).await.status), "{nb}");
            assert_eq!(f.rt.busy_queries_of(nb), 1, "{nb}");
        }
    }

    #[tokio::test]
    async fn a_busy_kernel_holds_a_notebook_no_longer_than_the_maximum() {
        let f = Fixture::new(3, |s| {
            s.control.detached_timeout_seconds = 1;
            s.control.busy_max_seconds = 2;
        })
        .await;
        let nb = running(&f, 0).await;
        f.rt.set_busy(nb, Some(Busy::Running));
        monitor_tick(&f.lc).await.expect("tick");
        tokio::time::sleep(Duration::from_millis(1100)).await;
        // First found busy now; kept for the next 2 s.
        monitor_tick(&f.lc).await.expect("tick");
        assert_eq!(f.get(nb).await.status, Status::Detached);
        tokio::time::sleep(Duration::from_millis(1100)).await;
        monitor_tick(&f.lc).await.expect("tick");
        assert_eq!(f.get(nb).await.status, Status::Detached);
        tokio::time::sleep(Duration::from_millis(1000)).await;
        monitor_tick(&f.lc).await.expect("tick");
        assert!(stopping(f.get(nb).await.status));
        // 0: a busy kernel never holds a notebook, and the runtime is not even asked.
        let f = Fixture::new(3, |s| {
            s.control.detached_timeout_seconds = 1;
            s.control.busy_max_seconds = 0;
        })
        .await;
        let nb = running(&f, 0).await;
        f.rt.set_busy(nb, Some(Busy::Running));
        monitor_tick(&f.lc).await.expect("tick");
        tokio::time::sleep(Duration::from_millis(1100)).await;
        monitor_tick(&f.lc).await.expect("tick");
        assert!(stopping(f.get(nb).await.status));
        assert_eq!(f.rt.busy_queries_of(nb), 0);
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
            activity: vec![marina_config::wire::MemberActivity {
                notebook_id: id,
                session_id: session,
                member_id: Id::random(),
                mode: marina_config::wire::AccessMode::View,
                last_active_ms: None,
                open_sockets: 1,
                open_since_ms: Some(now_ms()),
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
