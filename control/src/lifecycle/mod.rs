//! The notebook lifecycle: the state machine's transitions, the background driver that calls
//! the runtime, the monitor, and reconciliation after a restart.
//!
//! - [`transitions`]: what a request asks for (start, stop, delete, ping, activity), each
//!   one named conditional update in the store; losing it is [`LifecycleError::InvalidState`].
//! - [`driver`]: the background tasks that call the runtime and record what came of it.
//! - [`monitor`]: running/idle/detached, timeouts, health, stuck transitions, housekeeping;
//!   one control replica at a time (a lease).
//! - [`reconcile`]: settling the store with the runtime after a restart.
//!
//! Errors are [`LifecycleError`]; the API turns them into its 409/404/500 at the boundary
//! (`crate::api`), so nothing here knows HTTP.
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

mod driver;
mod monitor;
mod reconcile;
#[cfg(test)]
mod testing;
mod transitions;

use std::collections::HashMap;
use std::ops::Deref;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use marina_config::wire::ActivityBatch;
use marina_config::{Id, Settings};
use marina_runtime::Runtime;
use tokio::sync::Notify;
use tokio::task::AbortHandle;

use crate::error::StoreError;
use crate::metrics::Metrics;
use crate::model::{Notebook, Status};
use crate::store::Db;

/// The lifecycle service: what the transitions, the driver's tasks and the monitor need, and
/// nothing of the HTTP side. Cheap to clone (one `Arc`); background tasks hold a clone.
#[derive(Clone)]
pub struct Lifecycle(Arc<Parts>);

/// What the service is made of.
pub struct Parts {
    pub db: Db,
    pub runtime: Arc<dyn Runtime>,
    pub settings: Settings,
    pub metrics: Arc<Metrics>,
    /// Woken when a transition bumps the routes version (shared with the routes long poll).
    pub routes_changed: Arc<Notify>,
    driver: Driver,
    /// Notebooks held up by a busy kernel (`monitor::held_by_busy_kernel`). In memory,
    /// touched only by the monitor tick: a new monitor leaseholder starts the busy maximum
    /// afresh, which lengthens a hold by at most one maximum per failover.
    busy_runs: Mutex<HashMap<Id, monitor::BusyRun>>,
    /// Identifies this process in the monitor lease.
    pub instance_id: String,
}

impl Deref for Lifecycle {
    type Target = Parts;
    fn deref(&self) -> &Parts {
        &self.0
    }
}

/// How long an edge's latest report counts, milliseconds: an edge that stopped reporting
/// (crashed, scaled down) no longer counts after a few of its intervals, for the monitor's
/// open sockets and for presence alike.
pub fn edge_expiry_ms(settings: &Settings) -> i64 {
    (settings.proxy.activity_interval_ms as i64 * 5)
        .max(settings.control.monitor_interval_ms as i64 * 3)
}

impl Lifecycle {
    pub fn new(
        db: Db,
        runtime: Arc<dyn Runtime>,
        settings: Settings,
        metrics: Arc<Metrics>,
        routes_changed: Arc<Notify>,
    ) -> Lifecycle {
        Lifecycle(Arc::new(Parts {
            db,
            runtime,
            settings,
            metrics,
            routes_changed,
            driver: Driver::default(),
            busy_runs: Default::default(),
            instance_id: format!("{}-{}", std::process::id(), Id::random()),
        }))
    }

    /// Seconds a detached notebook lives, as rendered in every notebook.
    fn detached_timeout(&self) -> i64 {
        self.settings.control.detached_timeout_seconds as i64
    }

    /// `stopped`/`failed` → `starting` with a new session id, then drives the start in the
    /// background. Returns the notebook as the transition left it.
    pub async fn start(&self, nb: &Notebook, by: Id) -> Result<Notebook, LifecycleError> {
        transitions::start(self, nb, by).await
    }

    /// `starting`/`running`/`idle`/`detached` → `stopping`, then tears down in the background.
    /// `by` is the member who asked (none for the monitor); `message` becomes `statusMessage`.
    pub async fn stop(
        &self,
        nb: &Notebook,
        by: Option<Id>,
        message: Option<String>,
    ) -> Result<Notebook, LifecycleError> {
        transitions::stop(self, nb, by, message).await
    }

    /// Deletes a notebook, stopping whatever runs for it first.
    pub async fn delete(&self, nb: &Notebook) -> Result<(), LifecycleError> {
        transitions::delete(self, nb).await
    }

    /// A ping; false when the notebook is not up any more.
    pub async fn record_ping(&self, id: Id) -> Result<bool, LifecycleError> {
        transitions::record_ping(self, id).await
    }

    /// An edge's activity batch.
    pub async fn record_activity(&self, batch: &ActivityBatch) -> Result<(), LifecycleError> {
        transitions::record_activity(self, batch).await
    }

    /// Waits, at most `within`, for the start and stop tasks of this process to finish; returns
    /// how many are still running. For a graceful shutdown: a start cut short is driven again
    /// by the next leaseholder, but a stop should end here, where its runtime calls run.
    pub async fn drain(&self, within: Duration) -> usize {
        let in_flight = &self.driver.in_flight;
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let idle = in_flight.idle.notified();
            if in_flight.count() == 0 {
                return 0;
            }
            if tokio::time::timeout_at(deadline, idle).await.is_err() {
                return in_flight.count();
            }
        }
    }

    /// Runs the monitor until `shutdown` fires.
    pub async fn run_monitor(self, shutdown: tokio::sync::watch::Receiver<bool>) {
        monitor::run_monitor(self, shutdown).await
    }

    /// One monitor pass (running/idle/detached, timeouts, gauges).
    pub async fn monitor_tick(&self) -> Result<(), LifecycleError> {
        monitor::monitor_tick(self).await
    }

    /// Health checks of every up notebook.
    pub async fn health_tick(&self) -> Result<(), LifecycleError> {
        monitor::health_tick(self).await
    }

    /// Drives again the transitions whose driver is gone.
    pub async fn redrive_stuck(&self) -> Result<(), LifecycleError> {
        monitor::redrive_stuck(self).await
    }

    /// After a (re)start: adopt what still runs, settle the rest.
    pub async fn reconcile_at_start(&self) -> Result<(), LifecycleError> {
        reconcile::reconcile_at_start(self).await
    }
}

/// Why a lifecycle call failed.
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    /// The notebook is not in a state this transition starts from (or another call won).
    #[error("cannot {action} a notebook that is {}; it must be {allowed}", status.as_str())]
    InvalidState {
        action: &'static str,
        status: Status,
        allowed: &'static str,
    },
    /// The notebook is gone.
    #[error("notebook not found")]
    NotFound,
    /// A stored workload config that does not decode.
    #[error("stored workload config {id}: {message}")]
    Config { id: Id, message: String },
    /// The runtime failed a call the lifecycle cannot go on without.
    #[error("runtime {action}: {message}")]
    Runtime {
        action: &'static str,
        message: String,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A ping counts as "a browser is connected" for this long: the seed asks the host to ping
/// about every 60 s while the iframe is shown.
pub const PING_PRESENCE_MS: i64 = 90_000;

/// Per-notebook serialisation of runtime calls in this process.
#[derive(Default)]
struct Driver {
    /// Short critical sections (map lookups); never held across `.await`.
    ops: Mutex<HashMap<Id, Arc<NotebookOps>>>,
    /// Start and stop tasks not finished yet, so a graceful shutdown can let them finish:
    /// a control plane restarted while it stops a notebook must not leave it `stopping`
    /// with its servers still up (the load test's control restart found that).
    in_flight: Arc<InFlight>,
}

/// A count of running driver tasks and a way to wait for it to reach zero.
#[derive(Default)]
struct InFlight {
    count: std::sync::atomic::AtomicUsize,
    idle: Notify,
}

/// Held by a driver task for its whole life; dropped also when the task is aborted.
struct InFlightGuard(Arc<InFlight>);

impl InFlight {
    fn enter(self: &Arc<Self>) -> InFlightGuard {
        self.count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        InFlightGuard(self.clone())
    }

    fn count(&self) -> usize {
        self.count.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        if self
            .0
            .count
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst)
            == 1
        {
            self.0.idle.notify_waiters();
        }
    }
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
