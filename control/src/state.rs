//! Shared state of every handler and background task.
//!
//! Holds the runtime as a trait object (`Arc<dyn Runtime>`): the local and Kubernetes runtimes
//! and the tests' runtime are chosen at run time, and a virtual call per lifecycle action costs
//! nothing next to provisioning a notebook, so generics would buy only compile time.

use std::ops::Deref;
use std::sync::Arc;

use marina_config::Settings;
use marina_runtime::Runtime;
use tokio::sync::Notify;

use crate::lifecycle::Lifecycle;
use crate::limit::RateLimiter;
use crate::metrics::Metrics;
use crate::store::Db;
use crate::tokens::Signer;

/// Cheap to clone: one `Arc`.
#[derive(Clone)]
pub struct AppState(pub Arc<Inner>);

pub struct Inner {
    pub db: Db,
    pub settings: Settings,
    pub runtime: Arc<dyn Runtime>,
    pub signer: Signer,
    /// The edge's bearer token for `/internal/v1/*`.
    pub internal_token: String,
    pub limiter: RateLimiter,
    pub metrics: Arc<Metrics>,
    /// Woken whenever this process bumps the routes version, so long polls answer at once.
    /// (Changes made by another control replica are seen by the long poll's periodic re-read.)
    /// Shared with the lifecycle, whose transitions change routes too.
    pub routes_changed: Arc<Notify>,
    /// The notebook lifecycle service (transitions, driver, monitor, reconciliation).
    pub lifecycle: Lifecycle,
    /// Set when a graceful shutdown begins: long polls answer at once instead of holding the
    /// shutdown (it waits for open requests) for up to their 30 s.
    pub shutting_down: std::sync::atomic::AtomicBool,
}

impl Inner {
    /// Begins the shutdown for the long polls: they answer now with what they have.
    pub fn begin_shutdown(&self) {
        self.shutting_down
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.routes_changed.notify_waiters();
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl AppState {
    /// Seconds a detached notebook lives, as rendered in every notebook.
    pub fn detached_timeout(&self) -> i64 {
        self.settings.control.detached_timeout_seconds as i64
    }
}
