//! The activity reporter: cuts an [`ActivityBatch`] from the route table's per-notebook
//! counters ([`crate::activity`]) every `proxy.activity_interval_ms` and posts it to the control
//! plane; a batch that does not get through is merged into the next one, so nothing is lost for
//! more than one interval after the control plane comes back.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use marina_config::wire::{ActivityBatch, NotebookActivity, INTERNAL_PREFIX};
use marina_config::Id;

use crate::activity::now_ms;
use crate::metrics::Metrics;
use crate::route::RouteTable;

use super::client::ControlClient;

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
            org_id: None,
            teams: vec![],
        }
    }

    #[test]
    fn batches_carry_activity_once_and_keep_unsent() {
        let m: &'static Metrics = Box::leak(Box::new(Metrics::new()));
        let t = RouteTable::new(m, crate::route::tests::path_addressing());
        t.apply(RoutesSnapshot {
            version: 1,
            routes: vec![route("AAAAAAAAAA"), route("BBBBBBBBBB")],
            ..Default::default()
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
            ..Default::default()
        })
        .unwrap();
        let b = cut_batch(&t, &mut unsent, "e");
        assert_eq!(b.notebooks[0].open_websockets, 1);
        assert_eq!(b.notebooks[0].last_active_ms, None);
        drop(g);
        assert!(cut_batch(&t, &mut unsent, "e").notebooks.is_empty());
    }
}
