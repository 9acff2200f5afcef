//! The activity reporter: cuts an [`ActivityBatch`] from the route table's per-notebook
//! counters ([`crate::activity`]) every `proxy.activity_interval_ms` and posts it to the control
//! plane; a batch that does not get through is merged into the next one, so nothing is lost for
//! more than one interval after the control plane comes back.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use marina_config::wire::{AccessMode, ActivityBatch, MemberActivity, INTERNAL_PREFIX};
use marina_config::Id;

use crate::activity::now_ms;
use crate::metrics::Metrics;
use crate::route::RouteTable;

use super::client::ControlClient;

/// Activity a failed batch carried, by (notebook, session, member), with the member's mode.
type Unsent = HashMap<(Id, Id, Id), (AccessMode, i64)>;

/// Cuts a batch from the route table, merging in what could not be sent before.
fn cut_batch(routes: &RouteTable, unsent: &mut Unsent, edge_id: &str) -> ActivityBatch {
    let table = routes.load();
    let mut activity = Vec::new();
    for entry in table.by_id.values() {
        let (notebook_id, session_id) = (entry.route.notebook_id, entry.route.session_id);
        for m in entry.activity.members().iter() {
            let cut = m.cut();
            let last = match (
                cut.last_active_ms,
                unsent.remove(&(notebook_id, session_id, m.member)),
            ) {
                (Some(a), Some((_, b))) => Some(a.max(b)),
                (a, b) => a.or(b.map(|(_, t)| t)),
            };
            if last.is_some() || cut.open_streams > 0 {
                activity.push(MemberActivity {
                    notebook_id,
                    session_id,
                    member_id: m.member,
                    mode: m.mode,
                    last_active_ms: last,
                    open_sockets: cut.open_streams,
                    open_since_ms: cut.open_since_ms,
                });
            }
        }
    }
    // Activity of notebooks no longer routed is dropped: they were stopped.
    unsent.clear();
    ActivityBatch {
        edge_id: edge_id.to_owned(),
        sent_at_ms: now_ms(),
        activity,
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
    let mut unsent = Unsent::new();
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
                for a in batch.activity {
                    if let Some(t) = a.last_active_ms {
                        unsent.insert((a.notebook_id, a.session_id, a.member_id), (a.mode, t));
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
    fn batches_carry_activity_per_member_once_and_keep_unsent() {
        let m: &'static Metrics = Box::leak(Box::new(Metrics::new()));
        let t = RouteTable::new(m, crate::route::tests::path_addressing());
        t.apply(RoutesSnapshot {
            version: 1,
            routes: vec![route("AAAAAAAAAA"), route("BBBBBBBBBB")],
            ..Default::default()
        })
        .unwrap();
        let a = t.get(Id::parse("AAAAAAAAAA").unwrap()).unwrap();
        let (owner, viewer) = (a.route.owner_id, Id::parse("VIEWER0000").unwrap());
        a.activity.touch(owner, AccessMode::Edit);
        a.activity.touch(viewer, AccessMode::View);
        let mut unsent = Unsent::new();
        let b = cut_batch(&t, &mut unsent, "e");
        assert_eq!(b.activity.len(), 2, "one entry per member: {b:?}");
        let of =
            |b: &ActivityBatch, who: Id| b.activity.iter().find(|x| x.member_id == who).cloned();
        let o = of(&b, owner).unwrap();
        assert_eq!((o.mode, o.open_sockets), (AccessMode::Edit, 0));
        assert!(o.last_active_ms.is_some());
        assert_eq!(of(&b, viewer).unwrap().mode, AccessMode::View);
        // Nothing new: the next batch is empty.
        assert!(cut_batch(&t, &mut unsent, "e").activity.is_empty());
        // A failed batch is merged into the next.
        unsent.insert(
            (a.route.notebook_id, a.route.session_id, viewer),
            (AccessMode::View, 1234),
        );
        let b = cut_batch(&t, &mut unsent, "e");
        assert_eq!(b.activity.len(), 1);
        assert_eq!(b.activity[0].last_active_ms, Some(1234));
        assert_eq!(b.activity[0].member_id, viewer);
        // Open streams are reported without activity, and activity survives a feed change that
        // keeps the same session.
        let g = a
            .activity
            .member(viewer, AccessMode::View)
            .open_stream(&m.websockets_open);
        t.apply(RoutesSnapshot {
            version: 2,
            routes: vec![route("AAAAAAAAAA")],
            ..Default::default()
        })
        .unwrap();
        let b = cut_batch(&t, &mut unsent, "e");
        assert_eq!(b.activity.len(), 1);
        let v = &b.activity[0];
        assert_eq!(
            (v.member_id, v.open_sockets, v.last_active_ms),
            (viewer, 1, None)
        );
        assert!(v.open_since_ms.is_some());
        drop(g);
        assert!(cut_batch(&t, &mut unsent, "e").activity.is_empty());
    }
}
