//! The notebook lifecycle: the state machine's transitions, the background driver that calls
//! the runtime, the monitor, and reconciliation after a restart.
//!
//! ```text
//!            start                 runtime.start ok
//!  stopped ─────────▶ starting ─────────────────────▶ running ◀──activity──┐
//!  failed  ─────────▶    │  └── maxRetries failed ──▶ failed     │   │      │
//!                        │ stop                                  ▼   ▼      │
//!                        ▼                          idle ◀── (monitor) ──▶ detached
//!                     stopping ──runtime.stop──▶ stopped   (idle/detached timeouts: stop)
//! ```
//!
//! Invariants:
//! - Every user-visible transition is one conditional `UPDATE … WHERE id = $1 AND status IN
//!   (…)`; of two concurrent lifecycle calls exactly one changes the row, the other gets 409.
//! - The driver's own transitions (`starting → running/failed`, `stopping → stopped`) are
//!   conditional on the session id and the state the driver left, so a stop that overtook a
//!   start wins, and a late start attempt tears down what it made.
//! - Runtime calls for one notebook are serialised in this process by a per-notebook async
//!   mutex; a stop aborts an in-flight start attempt rather than waiting out its timeout.
//! - Anything that changes what the edge routes bumps the routes version in the same
//!   transaction.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use marina_config::workload::SailConfig;
use marina_config::Id;
use marina_runtime::{Endpoint, Health, StartSpec};
use tokio::task::AbortHandle;

use crate::error::{ApiError, StoreError};
use crate::model::{Notebook, Status};
use crate::state::AppState;
use crate::store::notebooks as store;
use crate::store::now_ms;

/// A ping counts as "a browser is connected" for this long: the seed asks the host to ping
/// about every 60 s while the iframe is shown.
pub const PING_PRESENCE_MS: i64 = 90_000;

/// Per-notebook serialisation of runtime calls in this process.
#[derive(Default)]
pub struct Driver {
    /// Short critical sections (map lookups); never held across `.await`.
    ops: Mutex<HashMap<Id, Arc<NotebookOps>>>,
}

#[derive(Default)]
struct NotebookOps {
    /// Held by whichever start or stop task is talking to the runtime for this notebook.
    lock: tokio::sync::Mutex<()>,
    /// The in-flight start task, so a stop can abort it. Std mutex: only swapped, never awaited.
    start_task: Mutex<Option<AbortHandle>>,
}

impl Driver {
    fn ops(&self, id: Id) -> Arc<NotebookOps> {
        let mut map = self.ops.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(id).or_default().clone()
    }

    /// Is this process talking to the runtime about `id` right now?
    fn busy(&self, id: Id) -> bool {
        self.ops(id).lock.try_lock().is_err()
    }

    fn forget(&self, id: Id) {
        let mut map = self.ops.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(&id);
    }

    fn abort_start(&self, id: Id) {
        let ops = self.ops(id);
        let handle = ops
            .start_task
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(h) = handle {
            h.abort();
        }
    }
}

fn invalid_state(action: &str, status: Status, allowed: &str) -> ApiError {
    ApiError::conflict(
        "invalid_notebook_state",
        format!(
            "cannot {action} a notebook that is {}; it must be {allowed}",
            status.as_str()
        ),
    )
}

async fn current_status(state: &AppState, id: Id) -> Result<Option<Status>, ApiError> {
    Ok(store::status(&state.db, id).await?)
}

async fn sail_config(state: &AppState, config_id: Id) -> Result<SailConfig, ApiError> {
    let config = crate::store::configs::config_json(&state.db, config_id).await?;
    let body: crate::model::WorkloadConfigBody = serde_json::from_str(&config)
        .map_err(|e| ApiError::Internal(format!("stored workload config {config_id}: {e}")))?;
    Ok(body.sail)
}

/// `stopped`/`failed` → `starting` with a new session id, then drives the start in the
/// background. Returns the notebook as the transition left it (the driver may have moved on
/// by the time the caller looks again).
pub async fn start(state: &AppState, nb: &Notebook, by: Id) -> Result<Notebook, ApiError> {
    let sail = sail_config(state, nb.workload_config_id).await?;
    let session = Id::random();
    let started =
        store::begin_start(&state.db, nb.id, session, by, state.detached_timeout()).await?;
    let Some(started) = started else {
        let status = current_status(state, nb.id)
            .await?
            .ok_or_else(ApiError::notebook_not_found)?;
        return Err(invalid_state("start", status, "stopped or failed"));
    };
    spawn_start(state, nb.id, session, sail);
    Ok(started)
}

fn spawn_start(state: &AppState, id: Id, session: Id, sail: SailConfig) {
    let ops = state.driver.ops(id);
    let task_state = state.clone();
    let task_ops = ops.clone();
    let handle = tokio::spawn(async move {
        let _serial = task_ops.lock.lock().await;
        drive_start(&task_state, id, session, sail).await;
    });
    *ops.start_task.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle.abort_handle());
}

/// Is the notebook still in `status` for `session`? (Another call may have moved it.)
async fn still(state: &AppState, id: Id, session: Id, status: Status) -> bool {
    matches!(store::is_in(&state.db, id, session, status).await, Ok(true))
}

async fn drive_start(state: &AppState, id: Id, session: Id, sail: SailConfig) {
    let attempts = sail.max_retries.max(1);
    let timeout = Duration::from_secs(state.settings.control.start_timeout_seconds.max(1));
    let mut last_error = String::new();
    for attempt in 1..=attempts {
        if !still(state, id, session, Status::Starting).await {
            return;
        }
        let spec = StartSpec {
            notebook_id: id,
            session_id: session,
            sail: sail.clone(),
            base_url: state.settings.addressing().marimo_base_url(id),
            attempt,
        };
        match tokio::time::timeout(timeout, state.runtime.start(&spec)).await {
            Ok(Ok(endpoint)) => {
                match mark_running(state, id, session, &endpoint).await {
                    Ok(true) => {
                        state.metrics.event("start_ok");
                        tracing::info!(notebook = %id, attempt, "notebook running");
                    }
                    Ok(false) => {
                        // Stopped or deleted while starting: undo what this attempt made.
                        let _ = state.runtime.stop(id).await;
                    }
                    Err(e) => {
                        tracing::error!(notebook = %id, error = %e, "recording a started notebook");
                        let _ = state.runtime.stop(id).await;
                        let _ = mark_failed(
                            state,
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
        state.metrics.event("start_retry");
        tracing::warn!(notebook = %id, attempt, attempts, error = %last_error, "start attempt failed");
        // Tear down the failed attempt before the next one (runtimes are idempotent).
        if let Err(e) = state.runtime.stop(id).await {
            tracing::warn!(notebook = %id, error = %e, "cleaning up a failed start attempt");
        }
    }
    state.metrics.event("start_failed");
    let message = format!("start failed after {attempts} attempt(s): {last_error}");
    if let Err(e) = mark_failed(state, id, session, Status::Starting, &message).await {
        tracing::error!(notebook = %id, error = %e, "recording a failed start");
    }
}

async fn mark_running(
    state: &AppState,
    id: Id,
    session: Id,
    ep: &Endpoint,
) -> Result<bool, StoreError> {
    let won = store::mark_running(&state.db, id, session, ep).await?;
    if won {
        state.routes_changed.notify_waiters();
    }
    Ok(won)
}

/// `from` → `failed` with `message`, if the notebook is still there in that session.
async fn mark_failed(
    state: &AppState,
    id: Id,
    session: Id,
    from: Status,
    message: &str,
) -> Result<bool, StoreError> {
    let won = store::mark_failed(&state.db, id, session, from, &truncate(message, 2000)).await?;
    if won {
        state.routes_changed.notify_waiters();
    }
    Ok(won)
}

fn truncate(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

/// `starting`/`running`/`idle`/`detached` → `stopping`, then tears down in the background.
/// `by` is the member who asked (none for the monitor); `message` becomes `statusMessage`.
pub async fn stop(
    state: &AppState,
    nb: &Notebook,
    by: Option<Id>,
    message: Option<String>,
) -> Result<Notebook, ApiError> {
    let stopping =
        store::begin_stop(&state.db, nb.id, by, message, state.detached_timeout()).await?;
    let Some(stopping) = stopping else {
        let status = current_status(state, nb.id)
            .await?
            .ok_or_else(ApiError::notebook_not_found)?;
        return Err(invalid_state(
            "stop",
            status,
            "starting, running, idle or detached",
        ));
    };
    state.routes_changed.notify_waiters();
    spawn_stop(state, nb.id);
    Ok(stopping)
}

fn spawn_stop(state: &AppState, id: Id) {
    state.driver.abort_start(id);
    let ops = state.driver.ops(id);
    let state = state.clone();
    tokio::spawn(async move {
        let _serial = ops.lock.lock().await;
        drive_stop(&state, id).await;
    });
}

async fn drive_stop(state: &AppState, id: Id) {
    let mut last_error = String::new();
    for attempt in 0..3u32 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(500 << attempt)).await;
        }
        match state.runtime.stop(id).await {
            Ok(()) => {
                let res = store::mark_stopped(&state.db, id).await;
                if let Err(e) = res {
                    tracing::error!(notebook = %id, error = %e, "recording a stopped notebook");
                }
                state.metrics.event("stop_ok");
                return;
            }
            Err(e) => last_error = e.to_string(),
        }
        tracing::warn!(notebook = %id, attempt, error = %last_error, "stop attempt failed");
    }
    state.metrics.event("stop_failed");
    let message = truncate(&format!("stop failed: {last_error}"), 2000);
    let res = store::mark_stop_failed(&state.db, id, &message).await;
    if let Err(e) = res {
        tracing::error!(notebook = %id, error = %e, "recording a failed stop");
    }
}

/// Deletes a notebook, stopping whatever runs for it first. The rows go in one transaction;
/// the runtime's leftovers, if its stop failed, are swept by the periodic reconcile.
pub async fn delete(state: &AppState, nb: &Notebook) -> Result<(), ApiError> {
    if nb.status != Status::Stopped {
        store::begin_delete(&state.db, nb.id).await?;
        state.routes_changed.notify_waiters();
        state.driver.abort_start(nb.id);
        let ops = state.driver.ops(nb.id);
        let _serial = ops.lock.lock().await;
        let timeout = Duration::from_secs(state.settings.control.start_timeout_seconds.max(1));
        match tokio::time::timeout(timeout, state.runtime.stop(nb.id)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(notebook = %nb.id, error = %e, "stopping a deleted notebook")
            }
            Err(_) => tracing::warn!(notebook = %nb.id, "stopping a deleted notebook timed out"),
        }
    }
    store::delete(&state.db, nb.id).await?;
    state.routes_changed.notify_waiters();
    state.driver.forget(nb.id);
    Ok(())
}

/// A ping: activity and presence; idle/detached go straight back to running. False when the
/// notebook is not up any more.
pub async fn record_ping(state: &AppState, id: Id) -> Result<bool, ApiError> {
    Ok(store::record_ping(&state.db, id).await?)
}

/// Records an edge's activity batch: its open connections replace its previous report, and
/// activity moves `lastActiveAt` forward (never back) and wakes idle/detached notebooks.
pub async fn record_activity(
    state: &AppState,
    batch: &marina_config::wire::ActivityBatch,
) -> Result<(), ApiError> {
    crate::store::edges::record_activity(&state.db, batch).await?;
    state
        .metrics
        .activity_batches
        .with_label_values(&[batch.edge_id.as_str()])
        .inc();
    Ok(())
}

// === Monitor ===

/// Name of the lease that makes one control replica the monitor.
const MONITOR_LEASE: &str = "monitor";

/// Runs the monitor until `shutdown` fires.
pub async fn run_monitor(state: AppState, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let interval_ms = state.settings.control.monitor_interval_ms.max(50);
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
        match state
            .db
            .try_lease(MONITOR_LEASE, &state.instance_id, lease_ms)
            .await
        {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "monitor lease");
                continue;
            }
        }
        if let Err(e) = monitor_tick(&state).await {
            tracing::warn!(error = %e, "monitor tick");
        }
        if tick % health_every == health_every - 1 {
            if let Err(e) = health_tick(&state).await {
                tracing::warn!(error = %e, "health checks");
            }
            if let Err(e) = redrive_stuck(&state).await {
                tracing::warn!(error = %e, "re-driving stuck transitions");
            }
        }
        if tick % housekeeping_every == housekeeping_every - 1 {
            if let Err(e) = housekeeping(&state).await {
                tracing::warn!(error = %e, "housekeeping");
            }
        }
        tick += 1;
    }
}

/// One pass: compute running/idle/detached, stop what timed out, refresh the gauges.
pub async fn monitor_tick(state: &AppState) -> Result<(), ApiError> {
    let now = now_ms();
    let settings = &state.settings;
    // An edge that stopped reporting (crashed, scaled down) no longer counts after a few of
    // its intervals.
    let edge_expiry = (settings.proxy.activity_interval_ms as i64 * 5)
        .max(settings.control.monitor_interval_ms as i64 * 3);
    let rows = store::up_for_monitor(&state.db, now - edge_expiry).await?;
    let idle_after = settings.control.idle_after_seconds as i64 * 1000;
    let detached_timeout = settings.control.detached_timeout_seconds as i64 * 1000;
    for row in rows {
        let store::UpNotebook {
            id,
            status,
            session,
            idle_timeout_ms: idle_timeout,
            last_active_at: last_active,
            last_ping_at: last_ping,
            running_since,
            detached_since,
            websockets,
        } = row;

        // No activity yet: the idle clock starts when the notebook came up.
        let active_ref = last_active.max(running_since).unwrap_or(now);
        if idle_timeout > 0 && now - active_ref >= idle_timeout {
            stop_by_monitor(
                state,
                id,
                "idle_stop",
                format!(
                    "stopped after {} s without activity (idleTimeoutSeconds)",
                    idle_timeout / 1000
                ),
            )
            .await;
            continue;
        }
        let connected = websockets > 0 || last_ping.is_some_and(|p| now - p < PING_PRESENCE_MS);
        let desired = if !connected {
            Status::Detached
        } else if now - active_ref >= idle_after {
            Status::Idle
        } else {
            Status::Running
        };
        if desired == Status::Detached {
            let since = if status == Status::Detached {
                detached_since.unwrap_or(now)
            } else {
                now
            };
            if now - since >= detached_timeout {
                stop_by_monitor(
                    state,
                    id,
                    "detached_stop",
                    format!(
                        "stopped after {} s with no browser connected",
                        detached_timeout / 1000
                    ),
                )
                .await;
                continue;
            }
        }
        if desired != status {
            let since = (desired == Status::Detached).then_some(now);
            store::set_presence(&state.db, id, session, status, desired, since).await?;
        }
    }
    refresh_gauges(state).await?;
    Ok(())
}

async fn stop_by_monitor(state: &AppState, id: Id, event: &str, message: String) {
    let nb = match store::fetch(&state.db, id, state.detached_timeout()).await {
        Ok(Some(nb)) => nb,
        Ok(None) | Err(_) => return,
    };
    match stop(state, &nb, None, Some(message)).await {
        Ok(_) => {
            state.metrics.event(event);
            tracing::info!(notebook = %id, reason = event, "monitor stopped a notebook");
        }
        // It moved on its own (stopped by a user meanwhile): nothing to do.
        Err(ApiError::Conflict { .. }) | Err(ApiError::NotFound { .. }) => {}
        Err(e) => tracing::warn!(notebook = %id, error = %e, "monitor stop"),
    }
}

async fn refresh_gauges(state: &AppState) -> Result<(), ApiError> {
    let counts = store::count_by_status(&state.db).await?;
    for s in Status::ALL {
        state
            .metrics
            .notebooks
            .with_label_values(&[s.as_str()])
            .set(counts.get(s.as_str()).copied().unwrap_or(0));
    }
    state
        .metrics
        .routes_version
        .set(state.db.route_version().await? as i64);
    Ok(())
}

/// Finds starts and stops whose driver is gone (its control replica died mid-way) and drives
/// them again. A start is overdue after all its attempts could have timed out, plus a margin;
/// a stop after two minutes. Transitions this process is still driving are left alone.
pub async fn redrive_stuck(state: &AppState) -> Result<(), ApiError> {
    let now = now_ms();
    let rows = store::in_transition(&state.db).await?;
    let attempt_ms = state.settings.control.start_timeout_seconds.max(1) as i64 * 1000;
    for row in rows {
        let id = row.id;
        let since = row.since;
        if state.driver.busy(id) {
            continue;
        }
        if row.status == Status::Stopping {
            if now - since > 120_000 {
                tracing::warn!(notebook = %id, "re-driving a stop whose driver is gone");
                state.metrics.event("redriven");
                spawn_stop(state, id);
            }
            continue;
        }
        let Some(session) = row.session else {
            continue;
        };
        let sail = sail_config(state, row.workload_config_id).await?;
        let overdue = attempt_ms * (sail.max_retries.max(1) as i64 + 1) + 30_000;
        if now - since > overdue {
            tracing::warn!(notebook = %id, "re-driving a start whose driver is gone");
            state.metrics.event("redriven");
            spawn_start(state, id, session, sail);
        }
    }
    Ok(())
}

/// Asks the runtime about every up notebook; dead ones become `failed` with the reason.
pub async fn health_tick(state: &AppState) -> Result<(), ApiError> {
    for (id, session) in store::up_sessions(&state.db).await? {
        let reason = match state.runtime.health(id).await {
            Ok(Health::Healthy) | Ok(Health::Pending) => continue,
            Ok(Health::Failed(why)) => why,
            Ok(Health::Missing) => "the notebook's servers are gone".to_owned(),
            Err(e) => {
                tracing::warn!(notebook = %id, error = %e, "health check");
                continue;
            }
        };
        if mark_failed(state, id, session, Status::Running, &reason).await? {
            state.metrics.event("health_failed");
            tracing::warn!(notebook = %id, reason = %reason, "notebook failed its health check");
            // Clean up whatever is left, serialised with other runtime calls.
            let ops = state.driver.ops(id);
            let state = state.clone();
            tokio::spawn(async move {
                let _serial = ops.lock.lock().await;
                let _ = state.runtime.stop(id).await;
            });
        }
    }
    Ok(())
}

/// Forgets expired one-time tokens and edges gone for an hour; sweeps runtime orphans.
async fn housekeeping(state: &AppState) -> Result<(), ApiError> {
    crate::store::edges::forget_expired(&state.db).await?;
    // Anything the runtime runs that the store does not expect (a deleted notebook whose stop
    // failed, a crash mid-start) is torn down. Starting notebooks are expected (no endpoint
    // yet) so an attempt in flight is left alone.
    let expected = store::expected(&state.db, true).await?;
    if let Err(e) = state.runtime.reconcile(&expected).await {
        tracing::warn!(error = %e, "periodic reconcile");
    }
    Ok(())
}

/// After a (re)start of the control plane: adopt what still runs, settle the rest.
/// - up notebooks the runtime still has stay up; the others become `stopped`;
/// - `starting` ones are driven again (a new attempt in the same session);
/// - `stopping` ones are stopped again (idempotent) and become `stopped`.
pub async fn reconcile_at_start(state: &AppState) -> Result<(), ApiError> {
    let up = store::expected(&state.db, false).await?;
    let adopted = state
        .runtime
        .reconcile(&up)
        .await
        .map_err(|e| ApiError::Internal(format!("runtime reconcile: {e}")))?;
    for e in &up {
        if adopted.contains(&e.notebook_id) {
            continue;
        }
        store::mark_gone_after_restart(&state.db, e.notebook_id, e.session_id).await?;
        tracing::info!(notebook = %e.notebook_id, "not running after restart: stopped");
    }
    for row in store::in_transition(&state.db).await? {
        let id = row.id;
        if row.status == Status::Stopping {
            tracing::info!(notebook = %id, "resuming an interrupted stop");
            spawn_stop(state, id);
            continue;
        }
        let Some(session) = row.session else {
            continue;
        };
        let sail = sail_config(state, row.workload_config_id).await?;
        tracing::info!(notebook = %id, "resuming an interrupted start");
        spawn_start(state, id, session, sail);
    }
    state.routes_changed.notify_waiters();
    Ok(())
}
