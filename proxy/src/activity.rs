//! Phase 5, `activity`: what the browser did, for the control plane's lifecycle decisions.
//!
//! The hot path only bumps per-notebook atomics that live in the route entry (no lock, no
//! allocation, no I/O). A reporter task cuts an [`ActivityBatch`] every
//! `proxy.activity_interval_ms` and posts it to the control plane; a batch that does not get
//! through is merged into the next one, so nothing is lost for more than one interval after the
//! control plane comes back.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use marina_config::wire::{ActivityBatch, NotebookActivity, INTERNAL_PREFIX};
use marina_config::Id;
use prometheus::IntGauge;

use crate::control::ControlClient;
use crate::metrics::Metrics;
use crate::route::RouteTable;

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
    fn cut(&self) -> (Option<i64>, u32) {
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

/// Cuts a batch from the route table, merging in what could not be sent before.
fn cut_batch(
    routes: &RouteTable,
    unsent: &mut HashMap<(Id, Id), i64>,
    edge_id: &str,
) -> ActivityBatch {
    let table = routes.load();
    let mut notebooks = Vec::new();
    for entry in table.by_id.values() {
        let (last, open) = entry.activity.cut();
        let key = (entry.route.notebook_id, entry.route.session_id);
        let last = match (last, unsent.remove(&key)) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        if last.is_some() || open > 0 {
            notebooks.push(NotebookActivity {
                notebook_id: key.0,
                session_id: key.1,
                last_active_ms: last,
                open_websockets: open,
            });
        }
    }
    // Activity of notebooks no longer routed is dropped: they were stopped.
    unsent.clear();
    ActivityBatch {
        edge_id: edge_id.to_owned(),
        sent_at_ms: now_ms(),
        notebooks,
    }
}

/// The reporter task: runs until the edge shuts down.
pub async fn report_loop(
    routes: Arc<RouteTable>,
    control: ControlClient,
    edge_id: String,
    interval: Duration,
    metrics: &'static Metrics,
) {
    let mut unsent: HashMap<(Id, Id), i64> = HashMap::new();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let path = format!("{INTERNAL_PREFIX}/activity");
    loop {
        tick.tick().await;
        let batch = cut_batch(&routes, &mut unsent, &edge_id);
        let body = match serde_json::to_vec(&batch) {
            Ok(b) => b,
            Err(_) => continue,
        };
        match control.post_json(&path, body).await {
            Ok((status, _)) if status.is_success() => {}
            outcome => {
                metrics.activity_reports_failed.inc();
                match outcome {
                    Ok((status, _)) => {
                        tracing::warn!(%status, "control plane refused an activity batch")
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "activity report failed; kept for the next try")
                    }
                }
                for n in batch.notebooks {
                    if let Some(t) = n.last_active_ms {
                        unsent.insert((n.notebook_id, n.session_id), t);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use marina_config::wire::{Route, RoutesSnapshot};

    fn route(id: &str) -> Route {
        let id = Id::parse(id).unwrap();
        Route {
            notebook_id: id,
            session_id: id,
            upstream: "127.0.0.1:1".into(),
            upstream_token: "t".into(),
            owner_id: id,
            viewers: vec![],
        }
    }

    #[test]
    fn batches_carry_activity_once_and_keep_unsent() {
        let m: &'static Metrics = Box::leak(Box::new(Metrics::new()));
        let t = RouteTable::new(m, crate::route::tests::path_addressing());
        t.apply(RoutesSnapshot {
            version: 1,
            routes: vec![route("AAAAAAAAAA"), route("BBBBBBBBBB")],
        })
        .unwrap();
        let a = t.get(Id::parse("AAAAAAAAAA").unwrap()).unwrap();
        a.activity.touch();
        let mut unsent = HashMap::new();
        let b = cut_batch(&t, &mut unsent, "e");
        assert_eq!(b.notebooks.len(), 1);
        assert!(b.notebooks[0].last_active_ms.is_some());
        // Nothing new: the next batch is empty.
        assert!(cut_batch(&t, &mut unsent, "e").notebooks.is_empty());
        // A failed batch is merged into the next.
        unsent.insert((a.route.notebook_id, a.route.session_id), 1234);
        let b = cut_batch(&t, &mut unsent, "e");
        assert_eq!(b.notebooks[0].last_active_ms, Some(1234));
        // Open streams are reported without activity, and activity survives a snapshot that
        // keeps the same session.
        let g = a.activity.open_stream(&m.websockets_open);
        t.apply(RoutesSnapshot {
            version: 2,
            routes: vec![route("AAAAAAAAAA")],
        })
        .unwrap();
        let b = cut_batch(&t, &mut unsent, "e");
        assert_eq!(b.notebooks[0].open_websockets, 1);
        assert_eq!(b.notebooks[0].last_active_ms, None);
        drop(g);
        assert!(cut_batch(&t, &mut unsent, "e").notebooks.is_empty());
    }
}
