//! Activity per member and presence (`GET /workloads/notebooks/{notebook}/presence`), on SQLite
//! and PostgreSQL: two edges reporting the same member are summed into one entry; an edge that
//! stops reporting takes its sockets with it (and, with nobody else there, the notebook goes
//! detached); a member's last activity is kept across quiet batches; idle and detached follow
//! the members together; and presence is for those who may see the notebook only.

mod common;

use std::time::Duration;

use axum::http::StatusCode;
use common::{code, now_ms, Harness, Store};
use serde_json::{json, Value};

fn quick(s: &mut marina_config::Settings) {
    s.control.idle_after_seconds = 1;
    s.control.detached_timeout_seconds = 3600;
}

async fn presence(h: &Harness, key: &str, nb: &str) -> Vec<Value> {
    let (s, v) = h
        .get(&format!("/workloads/notebooks/{nb}/presence"), key)
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    v["items"].as_array().cloned().expect("items")
}

fn of<'a>(items: &'a [Value], member: &str) -> Option<&'a Value> {
    items.iter().find(|i| i["memberId"] == member)
}

fn sock(
    nb: &str,
    session: &str,
    member: &str,
    mode: &str,
    open: u32,
    active: Option<i64>,
) -> Value {
    json!({"notebookId": nb, "sessionId": session, "memberId": member, "mode": mode,
           "lastActiveMs": active, "openSockets": open,
           "openSinceMs": if open > 0 { Some(now_ms() - 60_000) } else { None }})
}

async fn two_edges_one_member_and_an_edge_that_stops_reporting(store: Store) {
    let mut h = Harness::with(store, quick).await;
    h.start_monitor().await;
    let cfg = h.config(&h.admin, 3).await;
    let me = h.get("/iam/me", &h.admin).await.1["member"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (vera, vera_key) = h.member(&h.admin, "member").await;
    let team = h.team(&h.admin, &[&vera]).await;
    let nb = h.notebook(&h.admin, &cfg, &[&team]).await;
    h.run(&h.admin, &nb).await;
    let session = h.notebook_json(&h.admin, &nb).await["sessionId"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(presence(&h, &vera_key, &nb).await.is_empty());

    // The owner through edge A; Vera through A and B (two tabs, two replicas).
    let t0 = now_ms() - 5_000;
    let a = json!([
        sock(&nb, &session, &me, "edit", 1, Some(t0)),
        sock(&nb, &session, &vera, "view", 1, Some(t0 + 1)),
    ]);
    let b = json!([sock(&nb, &session, &vera, "view", 2, Some(t0 + 2))]);
    h.activity("edge-a", a).await;
    h.activity("edge-b", b.clone()).await;
    let items = presence(&h, &vera_key, &nb).await;
    assert_eq!(items.len(), 2, "{items:?}");
    let o = of(&items, &me).unwrap();
    assert_eq!(
        (o["mode"].as_str(), o["openSockets"].as_i64()),
        (Some("edit"), Some(1))
    );
    let v = of(&items, &vera).unwrap();
    assert_eq!(
        (v["mode"].as_str(), v["openSockets"].as_i64()),
        (Some("view"), Some(3))
    );
    assert!(
        v["since"].is_string() && v["lastActiveAt"].is_string(),
        "{v}"
    );
    let vera_active = v["lastActiveAt"].clone();

    // A quiet batch (sockets open, no new activity) keeps the last activity.
    h.activity(
        "edge-b",
        json!([sock(&nb, &session, &vera, "view", 2, None)]),
    )
    .await;
    let items = presence(&h, &vera_key, &nb).await;
    assert_eq!(of(&items, &vera).unwrap()["lastActiveAt"], vera_active);

    // Edge A stops reporting; edge B goes on. After a few intervals A's sockets no longer
    // count: the owner leaves the list, Vera keeps B's two, and the notebook is not detached.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        h.activity(
            "edge-b",
            json!([sock(&nb, &session, &vera, "view", 2, None)]),
        )
        .await;
        let items = presence(&h, &vera_key, &nb).await;
        if of(&items, &me).is_none() {
            assert_eq!(of(&items, &vera).unwrap()["openSockets"], 2, "{items:?}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "edge A never expired"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for _ in 0..5 {
        h.activity(
            "edge-b",
            json!([sock(&nb, &session, &vera, "view", 2, None)]),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = h.status(&h.admin, &nb).await;
    assert!(
        status == "running" || status == "idle",
        "Vera is still there: {status}"
    );
    // Vera closes her tabs: edge B's next batch no longer names her. Nobody is present and,
    // with no socket anywhere, the notebook is detached.
    h.activity("edge-b", json!([])).await;
    assert!(presence(&h, &vera_key, &nb).await.is_empty());
    h.wait_status(&h.admin, &nb, "detached", 5).await;

    // Reports for another session (a previous run) are not presence.
    h.activity(
        "edge-b",
        json!([sock(&nb, "ZZZZZZZZZZ", &vera, "view", 1, None)]),
    )
    .await;
    assert!(presence(&h, &vera_key, &nb).await.is_empty());
}
both!(two_edges_one_member_and_an_edge_that_stops_reporting);

async fn idle_follows_the_latest_member(store: Store) {
    let mut h = Harness::with(store, quick).await;
    h.start_monitor().await;
    let cfg = h.config(&h.admin, 3).await;
    let me = h.get("/iam/me", &h.admin).await.1["member"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (vera, _) = h.member(&h.admin, "member").await;
    let team = h.team(&h.admin, &[&vera]).await;
    let nb = h.notebook(&h.admin, &cfg, &[&team]).await;
    h.run(&h.admin, &nb).await;
    let session = h.notebook_json(&h.admin, &nb).await["sessionId"]
        .as_str()
        .unwrap()
        .to_owned();
    // Both connected; the owner goes quiet, Vera keeps working on edge B: never idle.
    for _ in 0..20 {
        h.activity("edge-a", json!([sock(&nb, &session, &me, "edit", 1, None)]))
            .await;
        h.activity(
            "edge-b",
            json!([sock(&nb, &session, &vera, "view", 1, Some(now_ms()))]),
        )
        .await;
        assert_eq!(h.status(&h.admin, &nb).await, "running");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Vera goes quiet too: idle after idle_after (1 s), both still connected.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        h.activity("edge-a", json!([sock(&nb, &session, &me, "edit", 1, None)]))
            .await;
        h.activity(
            "edge-b",
            json!([sock(&nb, &session, &vera, "view", 1, None)]),
        )
        .await;
        if h.status(&h.admin, &nb).await == "idle" {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never idle");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
both!(idle_follows_the_latest_member);

async fn presence_is_for_those_who_may_see_the_notebook(store: Store) {
    let h = Harness::new(store).await;
    let cfg = h.config(&h.admin, 3).await;
    let (vera, vera_key) = h.member(&h.admin, "member").await;
    let (_, outsider_key) = h.member(&h.admin, "member").await;
    let (_, _, other_admin) = h.cp.create_organization("other", "root").await.unwrap();
    let team = h.team(&h.admin, &[&vera]).await;
    let nb = h.notebook(&h.admin, &cfg, &[&team]).await;
    let path = format!("/workloads/notebooks/{nb}/presence");
    // Positive controls: the owner (an admin here) and a team member.
    assert_eq!(h.get(&path, &h.admin).await.0, StatusCode::OK);
    assert_eq!(h.get(&path, &vera_key).await.0, StatusCode::OK);
    // A member of the organization outside the team, another organization's admin: 404, the
    // notebook's existence not confirmed.
    for key in [&outsider_key, &other_admin] {
        let (s, v) = h.get(&path, key).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
        assert_eq!(code(&v), "notebook_not_found");
    }
    // No key, a wrong key: 401.
    let (s, v) = h.call(axum::http::Method::GET, &path, None, None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{v}");
    let (s, _) = h.get(&path, "mk_not_a_key").await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    // A malformed id names the field.
    let (s, v) = h.get("/workloads/notebooks/nope/presence", &h.admin).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
}
both!(presence_is_for_those_who_may_see_the_notebook);

async fn an_activity_batch_names_what_is_wrong(store: Store) {
    let h = Harness::new(store).await;
    let token = h.internal_token();
    // The per-notebook shape of earlier edges is refused with a message, not half-applied.
    let old = json!({"edgeId": "e", "sentAtMs": 1, "notebooks": []});
    let (s, v) = h
        .call(
            axum::http::Method::POST,
            "/internal/v1/activity",
            Some(&token),
            Some(old),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let bad_mode = json!({"edgeId": "e", "sentAtMs": 1, "activity": [{
        "notebookId": "AAAAAAAAAA", "sessionId": "AAAAAAAAAA", "memberId": "AAAAAAAAAA",
        "mode": "admin", "lastActiveMs": null, "openSockets": 1}]});
    let (s, v) = h
        .call(
            axum::http::Method::POST,
            "/internal/v1/activity",
            Some(&token),
            Some(bad_mode),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(v.to_string().contains("mode"), "{v}");
}
both!(an_activity_batch_names_what_is_wrong);
