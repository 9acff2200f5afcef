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
//! Errors are [`LifecycleError`]; the API turns them into its 409/404/500 at the boundary.
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
mod transitions;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use marina_config::Id;
use tokio::task::AbortHandle;

use crate::error::{ApiError, StoreError};
use crate::model::Status;

pub use monitor::{health_tick, monitor_tick, redrive_stuck, run_monitor};
pub use reconcile::reconcile_at_start;
pub use transitions::{delete, record_activity, record_ping, start, stop};

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

impl From<LifecycleError> for ApiError {
    fn from(e: LifecycleError) -> ApiError {
        match e {
            LifecycleError::InvalidState { .. } => {
                ApiError::conflict("invalid_notebook_state", e.to_string())
            }
            LifecycleError::NotFound => ApiError::notebook_not_found(),
            LifecycleError::Store(e) => e.into(),
            LifecycleError::Config { .. } | LifecycleError::Runtime { .. } => {
                ApiError::Internal(e.to_string())
            }
        }
    }
}

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
