//! The routes feed as a snapshot plus changes, against a real store (SQLite and PostgreSQL):
//! resuming after a reconnect, a gap that forces a snapshot, two control-plane replicas on one
//! database, changes applied in order, and a change's size independent of how many notebooks
//! run. A model edge (`common::follower`) applies every answer and must end up knowing exactly
//! what a fresh snapshot says.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use common::follower::{Follower, State};
use common::{Harness, Store};
use serde_json::json;

/// An edge that was away while many kinds of change happened asks from the version it had and
/// gets only those changes, which bring it to the same state as a fresh snapshot.
async fn resume_after_a_reconnect(store: Store) {
    let h = Harness::new(store).await;
    let cfg = h.config(&h.admin, 3).await;
    let (alice, alice_key) = h.member(&h.admin, "member").await;
    let (bob, _) = h.member(&h.admin, "member").await;
    let team = h.team(&h.admin, &[&alice]).await;
    let nb1 = h.notebook(&alice_key, &cfg, &[&team]).await;
    let nb2 = h.notebook(&alice_key, &cfg, &[]).await;
    h.run(&alice_key, &nb1).await;
    let mut edge = Follower::default();
    edge.check(&h).await;
    assert_eq!(edge.snapshots, 1);
    let away_at = edge.version;

    // While the edge is away: a start, a share, a member joining, a promotion, a stop.
    h.run(&alice_key, &nb2).await;
    h.post(
        &format!("/workloads/notebooks/{nb2}/teams"),
        &alice_key,
        json!({"teamIds": [team]}),
    )
    .await;
    h.post(
        &format!("/iam/teams/{team}/members"),
        &h.admin,
        json!({"memberIds": [bob]}),
    )
    .await;
    h.patch(
        &format!("/iam/members/{bob}"),
        &h.admin,
        json!({"role": "admin"}),
    )
    .await;
    h.post_empty(&format!("/workloads/notebooks/{nb1}/stop"), &alice_key)
        .await;

    let back = h.routes(Some(away_at), 0).await;
    assert_eq!(back["kind"], "changes", "resumed, not a snapshot: {back}");
    assert_eq!(back["from"].as_u64(), Some(away_at));
    edge.apply(&back);
    edge.check(&h).await;
    assert_eq!(edge.snapshots, 1, "no second snapshot");
    assert!(edge.state.routes.contains_key(&nb2) && !edge.state.routes.contains_key(&nb1));
    assert_eq!(
        edge.state.viewers(&nb2).len(),
        2,
        "bob: team member and admin"
    );
}
both!(resume_after_a_reconnect);

/// A version the feed cannot resume from (its changes pruned, or from another database) gets a
/// fresh snapshot, which replaces what the edge had.
async fn a_gap_forces_a_snapshot(store: Store) {
    let h = Harness::new(store).await;
    let cfg = h.config(&h.admin, 3).await;
    let (_, key) = h.member(&h.admin, "member").await;
    let nb = h.notebook(&key, &cfg, &[]).await;
    let mut edge = Follower::default();
    edge.check(&h).await;
    let old = edge.version;
    h.run(&key, &nb).await;
    // The positive control: with the log intact, the same request resumes.
    assert_eq!(h.routes(Some(old), 0).await["kind"], "changes");
    marina_control::store::routes::prune_all(&h.cp.state().db)
        .await
        .expect("prune");
    let answer = h.routes(Some(old), 0).await;
    assert_eq!(answer["kind"], "snapshot", "{answer}");
    edge.apply(&answer);
    edge.check(&h).await;
    assert_eq!(edge.snapshots, 2);
    assert!(edge.state.routes.contains_key(&nb));
    // From the snapshot's version on, changes again.
    h.post_empty(&format!("/workloads/notebooks/{nb}/stop"), &key)
        .await;
    assert_eq!(h.routes(Some(edge.version), 0).await["kind"], "changes");
    // A version from the future (the edge followed another database) gets a snapshot too.
    let future = h.routes(Some(edge.version + 1_000_000), 0).await;
    assert_eq!(future["kind"], "snapshot");
}
both!(a_gap_forces_a_snapshot);

/// Changes to one key, many times over, and to many keys: applied in order the edge ends where
/// the store is, and a change list carries each key once.
async fn changes_applied_in_order(store: Store) {
    let h = Harness::new(store).await;
    let cfg = h.config(&h.admin, 3).await;
    let (alice, key) = h.member(&h.admin, "member").await;
    let (bob, _) = h.member(&h.admin, "member").await;
    let team = h.team(&h.admin, &[&alice]).await;
    let nb = h.notebook(&key, &cfg, &[&team]).await;
    let mut edge = Follower::default();
    edge.check(&h).await;
    let from = edge.version;
    for round in 0..3 {
        h.run(&key, &nb).await;
        h.post(
            &format!("/iam/teams/{team}/members"),
            &h.admin,
            json!({"memberIds": [bob]}),
        )
        .await;
        h.delete(&format!("/iam/teams/{team}/members/{bob}"), &h.admin)
            .await;
        if round < 2 {
            h.post_empty(&format!("/workloads/notebooks/{nb}/stop"), &key)
                .await;
            h.wait_status(&key, &nb, "stopped", 10).await;
        }
    }
    let answer = h.routes(Some(from), 0).await;
    let changes = answer["changes"].as_array().unwrap();
    assert_eq!(changes.len(), 2, "each key once, as it is now: {answer}");
    assert_eq!(changes.iter().filter(|c| c["op"] == "up").count(), 1);
    assert_eq!(changes[1]["op"], "teamMember");
    assert_eq!(changes[1]["present"], false, "the last state wins");
    edge.apply(&answer);
    edge.check(&h).await;
    assert!(edge.state.routes.contains_key(&nb));
    // Deleting the team is one change, and takes its memberships with it.
    h.post(
        &format!("/iam/teams/{team}/members"),
        &h.admin,
        json!({"memberIds": [bob]}),
    )
    .await;
    edge.check(&h).await;
    let at = edge.version;
    assert_eq!(
        h.delete(&format!("/iam/teams/{team}"), &h.admin).await.0,
        StatusCode::NO_CONTENT
    );
    let gone = h.routes(Some(at), 0).await;
    assert_eq!(gone["changes"][0]["op"], "teamGone", "{gone}");
    assert_eq!(
        gone["changes"][1]["op"], "up",
        "its notebook's route without it: {gone}"
    );
    edge.apply(&gone);
    edge.check(&h).await;
    assert!(edge.state.teams.is_empty());
    assert!(
        !edge.state.viewers(&nb).contains(&bob),
        "bob saw it through the team only"
    );
}
both!(changes_applied_in_order);

/// The bytes a change costs do not grow with the number of running notebooks: one unshare is
/// one route, with 1 or 25 notebooks running.
async fn a_change_is_the_same_size_at_any_scale(store: Store) {
    let h = Harness::new(store).await;
    let cfg = h.config(&h.admin, 3).await;
    let (alice, key) = h.member(&h.admin, "member").await;
    let team = h.team(&h.admin, &[&alice]).await;
    let mut sizes = Vec::new();
    for running in [1usize, 25] {
        let mut nbs = Vec::new();
        for _ in 0..running {
            let nb = h.notebook(&key, &cfg, &[&team]).await;
            h.run(&key, &nb).await;
            nbs.push(nb);
        }
        let version = h.routes(None, 0).await["version"].as_u64().unwrap();
        h.delete(
            &format!("/workloads/notebooks/{}/teams/{team}", nbs[0]),
            &key,
        )
        .await;
        let answer = h.routes(Some(version), 0).await;
        assert_eq!(answer["changes"].as_array().unwrap().len(), 1, "{answer}");
        sizes.push(answer.to_string().len());
        for nb in &nbs {
            h.post_empty(&format!("/workloads/notebooks/{nb}/stop"), &key)
                .await;
        }
    }
    // The same change; only digits of the version may differ.
    assert!(sizes[0].abs_diff(sizes[1]) <= 4, "{sizes:?}");
}
both!(a_change_is_the_same_size_at_any_scale);

/// Two control planes on one database serve one feed: an edge long-polling replica B learns of
/// a change made through replica A promptly (PostgreSQL: `LISTEN/NOTIFY`; both: the re-read),
/// and what it learns is the same as A's own snapshot.
async fn two_replicas_serve_the_same_feed(store: Store) {
    let a = Arc::new(Harness::new(store).await);
    let b_cp = marina_control::ControlPlane::open(&a.settings, a.runtime.clone())
        .await
        .expect("a second replica");
    assert!(b_cp.bootstrap().is_none());
    let b = Arc::new(common::Harness::over(&a, b_cp));
    let cfg = a.config(&a.admin, 3).await;
    let (_, key) = a.member(&a.admin, "member").await;
    let nb = a.notebook(&key, &cfg, &[]).await;
    let mut edge = Follower::default();
    edge.check(&b).await;
    let version = edge.version;
    let waiter = {
        let b = b.clone();
        tokio::spawn(async move { b.routes(Some(version), 20).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiter.is_finished(), "nothing changed yet");
    let t = Instant::now();
    a.run(&key, &nb).await;
    let answer = waiter.await.unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "woken by the other replica's change, not the 20 s timeout"
    );
    assert_eq!(answer["kind"], "changes");
    edge.apply(&answer);
    edge.check(&b).await;
    assert_eq!(
        edge.state,
        State::of_snapshot(&a.routes(None, 0).await),
        "both replicas agree"
    );
    assert!(edge.state.routes.contains_key(&nb));
}
both!(two_replicas_serve_the_same_feed);
