//! Phase 5, `activity`: what the browser did, for the control plane's lifecycle decisions.
//!
//! Only the in-memory counters: the hot path bumps per-notebook atomics that live in the route
//! entry (no lock, no allocation, no I/O). Reporting them to the control plane is the uplink's
//! job ([`crate::uplink::report`]).

use std::sync::atomic::{AtomicI64, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus::IntGauge;

/// Unix milliseconds now.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// One notebook run's activity on this replica. Shared (in an `Arc`) by the route entry, the
/// open streams and the reporter; carried over to the new route entry when a snapshot keeps
/// the same notebook session.
#[derive(Debug, Default)]
pub struct Activity {
    /// Unix ms of the latest activity not yet reported; 0 = none.
    last_active_ms: AtomicI64,
    /// WebSockets and event streams open through this replica now.
    open_streams: AtomicU32,
}

// === impl Activity ===

impl Activity {
    /// Records activity now. Skips the store when the stored value is already fresh (within
    /// 50 ms), so a busy notebook does not bounce one cache line between cores per request.
    pub fn touch(&self) {
        let now = now_ms();
        if now - self.last_active_ms.load(Ordering::Relaxed) >= 50 {
            self.last_active_ms.store(now, Ordering::Relaxed);
        }
    }

    /// Counts an open WebSocket or event stream until the guard is dropped.
    pub fn open_stream(self: &Arc<Self>, gauge: &'static IntGauge) -> StreamGuard {
        self.open_streams.fetch_add(1, Ordering::Relaxed);
        gauge.inc();
        StreamGuard {
            activity: self.clone(),
            gauge,
        }
    }

    /// Takes the unreported activity (`None` if none) and the open-stream count.
    pub fn cut(&self) -> (Option<i64>, u32) {
        let last = self.last_active_ms.swap(0, Ordering::Relaxed);
        (
            (last != 0).then_some(last),
            self.open_streams.load(Ordering::Relaxed),
        )
    }

    pub fn open_streams(&self) -> u32 {
        self.open_streams.load(Ordering::Relaxed)
    }

    pub fn last_active_ms(&self) -> i64 {
        self.last_active_ms.load(Ordering::Relaxed)
    }
}

/// Keeps a stream counted while alive.
#[derive(Debug)]
pub struct StreamGuard {
    activity: Arc<Activity>,
    gauge: &'static IntGauge,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.activity.open_streams.fetch_sub(1, Ordering::Relaxed);
        self.gauge.dec();
    }
}
