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
use marina_runtime::{Endpoint, Expected, Health, StartSpec};
use sqlx::Row;
use tokio::task::AbortHandle;

use crate::db::{bump_routes, get_id, get_opt_id, now_ms};
use crate::error::{ApiError, StoreError};
use crate::model::{Notebook, Status, NOTEBOOK_RETURNING, UP_STATES};
use crate::state::AppState;

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
    let s: Option<String> = sqlx::query_scalar("SELECT status FROM notebooks WHERE id = $1")
        .bind(id.to_string())
        .fetch_optional(&state.db.pool)
        .await?;
    Ok(s.and_then(|s| Status::parse(&s)))
}

async fn sail_config(state: &AppState, config_id: Id) -> Result<SailConfig, ApiError> {
    let config: String = sqlx::query_scalar("SELECT config FROM workload_configs WHERE id = $1")
        .bind(config_id.to_string())
        .fetch_one(&state.db.pool)
        .await?;
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
    let now = now_ms();
    let row = sqlx::query(&format!(
        "UPDATE notebooks SET status = 'starting', session_id = $1, status_message = NULL,
            upstream = NULL, upstream_token = NULL, running_since = NULL, detached_since = NULL,
            last_ping_at = NULL, updated_at = $2, updated_by = $3, transition_at = $2
         WHERE id = $4 AND status IN ('stopped', 'failed')
         RETURNING {NOTEBOOK_RETURNING}"
    ))
    .bind(session.to_string())
    .bind(now)
    .bind(by.to_string())
    .bind(nb.id.to_string())
    .fetch_optional(&state.db.pool)
    .await?;
    let Some(row) = row else {
        let status = current_status(state, nb.id)
            .await?
            .ok_or_else(ApiError::notebook_not_found)?;
        return Err(invalid_state("start", status, "stopped or failed"));
    };
    let started = Notebook::from_row(&row, state.detached_timeout())?;
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
    let row: Result<Option<(String, Option<String>)>, _> =
        sqlx::query_as("SELECT status, session_id FROM notebooks WHERE id = $1")
            .bind(id.to_string())
            .fetch_optional(&state.db.pool)
            .await;
    matches!(row, Ok(Some((s, Some(sid)))) if s == status.as_str() && sid == session.as_str())
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
    let mut tx = state.db.pool.begin().await?;
    bump_routes(&mut tx).await?;
    let res = sqlx::query(
        "UPDATE notebooks SET status = 'running', upstream = $1, upstream_token = $2,
            running_since = $3, detached_since = NULL, status_message = NULL
         WHERE id = $4 AND session_id = $5 AND status = 'starting'",
    )
    .bind(ep.upstream.as_str())
    .bind(ep.token.as_str())
    .bind(now_ms())
    .bind(id.to_string())
    .bind(session.to_string())
    .execute(&mut *tx)
    .await?;
    if res.rows_affected() == 0 {
        tx.rollback().await?;
        return Ok(false);
    }
    tx.commit().await?;
    state.routes_changed.notify_waiters();
    Ok(true)
}

/// `from` → `failed` with `message`, if the notebook is still there in that session.
async fn mark_failed(
    state: &AppState,
    id: Id,
    session: Id,
    from: Status,
    message: &str,
) -> Result<bool, StoreError> {
    let from_sql = if from.is_up() {
        UP_STATES.to_owned()
    } else {
        format!("('{}')", from.as_str())
    };
    let mut tx = state.db.pool.begin().await?;
    bump_routes(&mut tx).await?;
    let res = sqlx::query(&format!(
        "UPDATE notebooks SET status = 'failed', status_message = $1, upstream = NULL,
            upstream_token = NULL, running_since = NULL, detached_since = NULL
         WHERE id = $2 AND session_id = $3 AND status IN {from_sql}"
    ))
    .bind(truncate(message, 2000))
    .bind(id.to_string())
    .bind(session.to_string())
    .execute(&mut *tx)
    .await?;
    if res.rows_affected() == 0 {
        tx.rollback().await?;
        return Ok(false);
    }
    tx.commit().await?;
    state.routes_changed.notify_waiters();
    Ok(true)
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
    let mut tx = state.db.pool.begin().await?;
    bump_routes(&mut tx).await?;
    let (who_sql, who) = match by {
        Some(m) => (", updated_at = $3, updated_by = $4", Some(m.to_string())),
        None => ("", None),
    };
    let sql = format!(
        "UPDATE notebooks SET status = 'stopping', status_message = $1, transition_at = $3{who_sql}
         WHERE id = $2 AND status IN ('starting', 'running', 'idle', 'detached')
         RETURNING {NOTEBOOK_RETURNING}"
    );
    let mut q = sqlx::query(&sql)
        .bind(message)
        .bind(nb.id.to_string())
        .bind(now_ms());
    if let Some(who) = who {
        q = q.bind(who);
    }
    let Some(row) = q.fetch_optional(&mut *tx).await? else {
        tx.rollback().await?;
        let status = current_status(state, nb.id)
            .await?
            .ok_or_else(ApiError::notebook_not_found)?;
        return Err(invalid_state(
            "stop",
            status,
            "starting, running, idle or detached",
        ));
    };
    let stopping = Notebook::from_row(&row, state.detached_timeout())?;
    tx.commit().await?;
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
                let res = sqlx::query(
                    "UPDATE notebooks SET status = 'stopped', upstream = NULL, upstream_token = NULL,
                        running_since = NULL, detached_since = NULL
                     WHERE id = $1 AND status = 'stopping'",
                )
                .bind(id.to_string())
                .execute(&state.db.pool)
                .await;
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
    let res = sqlx::query(
        "UPDATE notebooks SET status = 'failed', status_message = $1 WHERE id = $2 AND status = 'stopping'",
    )
    .bind(truncate(&format!("stop failed: {last_error}"), 2000))
    .bind(id.to_string())
    .execute(&state.db.pool)
    .await;
    if let Err(e) = res {
        tracing::error!(notebook = %id, error = %e, "recording a failed stop");
    }
}

/// Deletes a notebook, stopping whatever runs for it first. The rows go in one transaction;
/// the runtime's leftovers, if its stop failed, are swept by the periodic reconcile.
pub async fn delete(state: &AppState, nb: &Notebook) -> Result<(), ApiError> {
    if nb.status != Status::Stopped {
        let mut tx = state.db.pool.begin().await?;
        bump_routes(&mut tx).await?;
        sqlx::query(
            "UPDATE notebooks SET status = 'stopping'
             WHERE id = $1 AND status IN ('starting', 'running', 'idle', 'detached')",
        )
        .bind(nb.id.to_string())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
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
    let mut tx = state.db.pool.begin().await?;
    bump_routes(&mut tx).await?;
    sqlx::query("DELETE FROM edge_connections WHERE notebook_id = $1")
        .bind(nb.id.to_string())
        .execute(&mut *tx)
        .await?;
    sqlx::query("DELETE FROM notebook_teams WHERE notebook_id = $1")
        .bind(nb.id.to_string())
        .execute(&mut *tx)
        .await?;
    sqlx::query("DELETE FROM notebooks WHERE id = $1")
        .bind(nb.id.to_string())
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    state.routes_changed.notify_waiters();
    state.driver.forget(nb.id);
    Ok(())
}

/// A ping: activity and presence; idle/detached go straight back to running. False when the
/// notebook is not up any more.
pub async fn record_ping(state: &AppState, id: Id) -> Result<bool, ApiError> {
    let now = now_ms();
    let res = sqlx::query(&format!(
        "UPDATE notebooks SET last_active_at = $1, last_ping_at = $1, status = 'running',
            detached_since = NULL
         WHERE id = $2 AND status IN {UP_STATES}"
    ))
    .bind(now)
    .bind(id.to_string())
    .execute(&state.db.pool)
    .await?;
    Ok(res.rows_affected() == 1)
}

/// Records an edge's activity batch: its open connections replace its previous report, and
/// activity moves `lastActiveAt` forward (never back) and wakes idle/detached notebooks.
pub async fn record_activity(
    state: &AppState,
    batch: &marina_config::wire::ActivityBatch,
) -> Result<(), ApiError> {
    let now = now_ms();
    let mut tx = state.db.pool.begin().await?;
    sqlx::query(
        "INSERT INTO edges (edge_id, last_seen_at) VALUES ($1, $2)
         ON CONFLICT (edge_id) DO UPDATE SET last_seen_at = $2",
    )
    .bind(batch.edge_id.as_str())
    .bind(now)
    .execute(&mut *tx)
    .await?;
    sqlx::query("DELETE FROM edge_connections WHERE edge_id = $1")
        .bind(batch.edge_id.as_str())
        .execute(&mut *tx)
        .await?;
    for nb in &batch.notebooks {
        if nb.open_websockets > 0 {
            sqlx::query(
                "INSERT INTO edge_connections (edge_id, notebook_id, open_websockets) VALUES ($1, $2, $3)
                 ON CONFLICT (edge_id, notebook_id) DO UPDATE SET open_websockets = $3",
            )
            .bind(batch.edge_id.as_str())
            .bind(nb.notebook_id.to_string())
            .bind(nb.open_websockets as i64)
            .execute(&mut *tx)
            .await?;
        }
        if let Some(ms) = nb.last_active_ms {
            // An edge's clock ahead of ours must not push activity into the future.
            let ms = ms.min(now);
            let wake = if nb.open_websockets > 0 {
                ", status = 'running', detached_since = NULL"
            } else {
                ""
            };
            sqlx::query(&format!(
                "UPDATE notebooks SET last_active_at = $1{wake}
                 WHERE id = $2 AND session_id = $3 AND status IN {UP_STATES}
                   AND (last_active_at IS NULL OR last_active_at < $1)"
            ))
            .bind(ms)
            .bind(nb.notebook_id.to_string())
            .bind(nb.session_id.to_string())
            .execute(&mut *tx)
            .await?;
        }
    }
    tx.commit().await?;
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
    let rows = sqlx::query(&format!(
        "SELECT n.id, n.status, n.session_id, n.idle_timeout_seconds, n.last_active_at,
            n.last_ping_at, n.running_since, n.detached_since,
            (SELECT CAST(COALESCE(SUM(c.open_websockets), 0) AS BIGINT)
               FROM edge_connections c JOIN edges e ON e.edge_id = c.edge_id
              WHERE c.notebook_id = n.id AND e.last_seen_at >= $1) AS websockets
         FROM notebooks n WHERE n.status IN {UP_STATES}"
    ))
    .bind(now - edge_expiry)
    .fetch_all(&state.db.pool)
    .await?;
    let idle_after = settings.control.idle_after_seconds as i64 * 1000;
    let detached_timeout = settings.control.detached_timeout_seconds as i64 * 1000;
    for row in rows {
        let id = get_id(&row, "id")?;
        let status: String = row.try_get("status")?;
        let Some(status) = Status::parse(&status) else {
            continue;
        };
        let Some(session) = get_opt_id(&row, "session_id")? else {
            continue;
        };
        let idle_timeout: i64 = row.try_get::<i64, _>("idle_timeout_seconds")? * 1000;
        let last_active: Option<i64> = row.try_get("last_active_at")?;
        let last_ping: Option<i64> = row.try_get("last_ping_at")?;
        let running_since: Option<i64> = row.try_get("running_since")?;
        let detached_since: Option<i64> = row.try_get("detached_since")?;
        let websockets: i64 = row.try_get("websockets")?;

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
            sqlx::query(
                "UPDATE notebooks SET status = $1, detached_since = $4
                 WHERE id = $2 AND session_id = $3 AND status = $5",
            )
            .bind(desired.as_str())
            .bind(id.to_string())
            .bind(session.to_string())
            .bind(since)
            .bind(status.as_str())
            .execute(&state.db.pool)
            .await?;
        }
    }
    refresh_gauges(state).await?;
    Ok(())
}

async fn stop_by_monitor(state: &AppState, id: Id, event: &str, message: String) {
    let nb = match crate::api::notebooks::fetch_by_id(state, id).await {
        Ok(nb) => nb,
        Err(_) => return,
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
    let rows = sqlx::query("SELECT status, COUNT(*) AS n FROM notebooks GROUP BY status")
        .fetch_all(&state.db.pool)
        .await?;
    let mut counts: HashMap<String, i64> = HashMap::new();
    for row in rows {
        counts.insert(row.try_get("status")?, row.try_get("n")?);
    }
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
    let rows = sqlx::query(
        "SELECT n.id, n.status, n.session_id, n.workload_config_id, n.transition_at
         FROM notebooks n WHERE n.status IN ('starting', 'stopping')",
    )
    .fetch_all(&state.db.pool)
    .await?;
    let attempt_ms = state.settings.control.start_timeout_seconds.max(1) as i64 * 1000;
    for row in rows {
        let id = get_id(&row, "id")?;
        let status: String = row.try_get("status")?;
        let since: i64 = row.try_get::<Option<i64>, _>("transition_at")?.unwrap_or(0);
        if state.driver.busy(id) {
            continue;
        }
        if status == "stopping" {
            if now - since > 120_000 {
                tracing::warn!(notebook = %id, "re-driving a stop whose driver is gone");
                state.metrics.event("redriven");
                spawn_stop(state, id);
            }
            continue;
        }
        let Some(session) = get_opt_id(&row, "session_id")? else {
            continue;
        };
        let sail = sail_config(state, get_id(&row, "workload_config_id")?).await?;
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
    let rows = sqlx::query(&format!(
        "SELECT id, session_id FROM notebooks WHERE status IN {UP_STATES}"
    ))
    .fetch_all(&state.db.pool)
    .await?;
    for row in rows {
        let id = get_id(&row, "id")?;
        let Some(session) = get_opt_id(&row, "session_id")? else {
            continue;
        };
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
    let now = now_ms();
    sqlx::query("DELETE FROM redeemed_tokens WHERE exp < $1")
        .bind(now / 1000 - 300)
        .execute(&state.db.pool)
        .await?;
    let mut tx = state.db.pool.begin().await?;
    sqlx::query(
        "DELETE FROM edge_connections WHERE edge_id IN (SELECT edge_id FROM edges WHERE last_seen_at < $1)",
    )
    .bind(now - 3_600_000)
    .execute(&mut *tx)
    .await?;
    sqlx::query("DELETE FROM edges WHERE last_seen_at < $1")
        .bind(now - 3_600_000)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    // Anything the runtime runs that the store does not expect (a deleted notebook whose stop
    // failed, a crash mid-start) is torn down. Starting notebooks are expected (no endpoint
    // yet) so an attempt in flight is left alone.
    let expected = expected(state, "('running', 'idle', 'detached', 'starting')").await?;
    if let Err(e) = state.runtime.reconcile(&expected).await {
        tracing::warn!(error = %e, "periodic reconcile");
    }
    Ok(())
}

async fn expected(state: &AppState, states: &str) -> Result<Vec<Expected>, ApiError> {
    let rows = sqlx::query(&format!(
        "SELECT id, session_id, upstream, upstream_token FROM notebooks WHERE status IN {states}"
    ))
    .fetch_all(&state.db.pool)
    .await?;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let Some(session_id) = get_opt_id(&row, "session_id")? else {
            continue;
        };
        let upstream: Option<String> = row.try_get("upstream")?;
        let token: Option<String> = row.try_get("upstream_token")?;
        out.push(Expected {
            notebook_id: get_id(&row, "id")?,
            session_id,
            endpoint: match (upstream, token) {
                (Some(upstream), Some(token)) => Some(Endpoint { upstream, token }),
                _ => None,
            },
        });
    }
    Ok(out)
}

/// After a (re)start of the control plane: adopt what still runs, settle the rest.
/// - up notebooks the runtime still has stay up; the others become `stopped`;
/// - `starting` ones are driven again (a new attempt in the same session);
/// - `stopping` ones are stopped again (idempotent) and become `stopped`.
pub async fn reconcile_at_start(state: &AppState) -> Result<(), ApiError> {
    let up = expected(state, UP_STATES).await?;
    let adopted = state
        .runtime
        .reconcile(&up)
        .await
        .map_err(|e| ApiError::Internal(format!("runtime reconcile: {e}")))?;
    for e in &up {
        if adopted.contains(&e.notebook_id) {
            continue;
        }
        let mut tx = state.db.pool.begin().await?;
        bump_routes(&mut tx).await?;
        sqlx::query(&format!(
            "UPDATE notebooks SET status = 'stopped', upstream = NULL, upstream_token = NULL,
                running_since = NULL, detached_since = NULL,
                status_message = 'its servers were gone after a control-plane restart'
             WHERE id = $1 AND session_id = $2 AND status IN {UP_STATES}"
        ))
        .bind(e.notebook_id.to_string())
        .bind(e.session_id.to_string())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        tracing::info!(notebook = %e.notebook_id, "not running after restart: stopped");
    }
    let rows = sqlx::query(
        "SELECT id, status, session_id, workload_config_id FROM notebooks WHERE status IN ('starting', 'stopping')",
    )
    .fetch_all(&state.db.pool)
    .await?;
    for row in rows {
        let id = get_id(&row, "id")?;
        let status: String = row.try_get("status")?;
        if status == "stopping" {
            tracing::info!(notebook = %id, "resuming an interrupted stop");
            spawn_stop(state, id);
            continue;
        }
        let Some(session) = get_opt_id(&row, "session_id")? else {
            continue;
        };
        let sail = sail_config(state, get_id(&row, "workload_config_id")?).await?;
        tracing::info!(notebook = %id, "resuming an interrupted start");
        spawn_start(state, id, session, sail);
    }
    state.routes_changed.notify_waiters();
    Ok(())
}
