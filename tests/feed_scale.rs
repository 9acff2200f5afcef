//! Revocation at scale, end to end: `marina serve` (SQLite, the local runtime, a real Marimo
//! and Sail) with 10,000 further running notebooks in its routes table. A viewer who has the
//! notebook open through the edge is removed from the team that gave him access; within 5 s his
//! cookie stops working and his WebSocket is closed. The positive control: before the removal
//! the same cookie and socket work, and the owner's keep working after it.
//!
//! The 10,000 notebooks are rows written straight into the store (their upstream is a closed
//! port: nothing routes to them here); then the routes version is moved past the change log so
//! the edge takes one snapshot of all of them, and from there only changes, as in production.

mod support;

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};
use support::{redeem, EdgeSession, Marina};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const EXTRA_ROUTES: usize = 10_000;

/// The notebook page (a viewer's is the kiosk page: the edge redirects a viewer there).
async fn get_status(m: &Marina, s: &EdgeSession, query: &str) -> u16 {
    m.http
        .get(format!("{}{query}", s.base))
        .header("cookie", &s.cookie)
        .send()
        .await
        .expect("GET through the edge")
        .status()
        .as_u16()
}

async fn metric(m: &Marina, name: &str) -> f64 {
    let text = m
        .http
        .get(format!("{}/metrics", m.edge_admin))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(-1.0)
}

async fn open_session(m: &Marina, key: &str, nb: &str) -> EdgeSession {
    let open = m
        .ok(
            key,
            "POST",
            &format!("/workloads/notebooks/{nb}/open"),
            None,
            200,
        )
        .await;
    let url = open["url"].as_str().expect("open url");
    redeem(&m.http, url).await.expect("handshake").0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_removed_from_the_team_is_cut_off_within_5s_among_10000_routes() {
    // The monitor would fail the 10,000 stand-in rows (no processes behind them): keep it
    // from ticking again after start-up for the length of the test.
    let m = Marina::start(&[("MARINA_CONTROL__MONITOR_INTERVAL_MS", "3600000")]).await;
    let admin = m.admin_key.clone();
    let nb = m.create_notebook("scale").await;
    m.ok(
        &admin,
        "POST",
        &format!("/workloads/notebooks/{nb}/start"),
        None,
        200,
    )
    .await;
    m.wait_status(&nb, "running", Duration::from_secs(180))
        .await;

    // A viewer through a team.
    let member = m
        .ok(
            &admin,
            "POST",
            "/iam/members",
            Some(json!({"name": "Vera"})),
            201,
        )
        .await;
    let vera = member["id"].as_str().unwrap().to_owned();
    let team = m
        .ok(
            &admin,
            "POST",
            "/iam/teams",
            Some(json!({"name": "analysts"})),
            201,
        )
        .await;
    let team = team["id"].as_str().unwrap().to_owned();
    m.ok(
        &admin,
        "POST",
        &format!("/iam/teams/{team}/members"),
        Some(json!({"memberIds": [vera]})),
        200,
    )
    .await;
    m.ok(
        &admin,
        "POST",
        &format!("/workloads/notebooks/{nb}/teams"),
        Some(json!({"teamIds": [team]})),
        200,
    )
    .await;
    let key: Value = m
        .ok(
            &admin,
            "POST",
            &format!("/iam/members/{vera}/api-keys"),
            Some(json!({"name": "v"})),
            201,
        )
        .await;
    let vera_key = key["secret"].as_str().unwrap().to_owned();

    // 10,000 more running notebooks, straight into the store, then a version the edge cannot
    // resume from, so its next answer is one snapshot of all of them.
    let db = sqlx::SqlitePool::connect(&format!(
        "sqlite://{}",
        m.dir.path().join("marina.db").display()
    ))
    .await
    .expect("the store");
    let (org, cfg): (String, String) =
        sqlx::query_as("SELECT org_id, workload_config_id FROM notebooks WHERE id = $1")
            .bind(&nb)
            .fetch_one(&db)
            .await
            .unwrap();
    let owner: String = sqlx::query_scalar("SELECT member_id FROM notebooks WHERE id = $1")
        .bind(&nb)
        .fetch_one(&db)
        .await
        .unwrap();
    let mut tx = db.begin().await.unwrap();
    for i in 0..EXTRA_ROUTES {
        let id = format!("S{i:09}");
        sqlx::query(
            "INSERT INTO notebooks (id, org_id, member_id, workload_config_id, name, status,
                idle_timeout_seconds, session_id, upstream, upstream_token, running_since,
                created_at, updated_at)
             VALUES ($1, $2, $3, $4, 'stand-in', 'running', 0, $1, '127.0.0.1:9', 'x', 1, 1, 1)",
        )
        .bind(&id)
        .bind(&org)
        .bind(&owner)
        .bind(&cfg)
        .execute(&mut *tx)
        .await
        .unwrap();
    }
    sqlx::query(
        "UPDATE route_version SET version = version + 1, pruned_through = version + 1 WHERE id = 1",
    )
    .execute(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();
    let snapshots_before = metric(&m, "marina_edge_route_feed_snapshots_total").await;
    // Any routes change wakes the edge's long poll; the version gap makes it a snapshot.
    m.ok(
        &admin,
        "POST",
        "/iam/teams",
        Some(json!({"name": "wake"})),
        201,
    )
    .await;
    let other = m
        .ok(
            &admin,
            "POST",
            "/iam/members",
            Some(json!({"name": "w"})),
            201,
        )
        .await;
    assert!(other["id"].is_string());
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(&m, "marina_edge_routes").await < (EXTRA_ROUTES + 1) as f64 {
        assert!(
            Instant::now() < deadline,
            "the edge never loaded the 10,001 routes"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(metric(&m, "marina_edge_route_feed_snapshots_total").await > snapshots_before);

    // Positive control: the viewer's cookie and socket work, and so do the owner's.
    let viewer = open_session(&m, &vera_key, &nb).await;
    let owner_s = open_session(&m, &admin, &nb).await;
    assert_eq!(get_status(&m, &viewer, "?kiosk=true").await, 200);
    let socket = |s: &EdgeSession, q: &str| {
        let url = format!("{}ws?{q}", s.base.replacen("http", "ws", 1));
        let mut req = url.into_client_request().unwrap();
        req.headers_mut()
            .insert("cookie", s.cookie.parse().unwrap());
        req.headers_mut()
            .insert("origin", s.origin.parse().unwrap());
        req
    };
    // The owner's kernel session first: a viewer's socket mirrors it.
    let (_owner_ws, _) = tokio_tungstenite::connect_async(socket(&owner_s, "session_id=s_owner1"))
        .await
        .expect("owner socket");
    let (mut ws, _) =
        tokio_tungstenite::connect_async(socket(&viewer, "session_id=s_vera01&kiosk=true"))
            .await
            .expect("viewer socket");

    // The removal, then the clock.
    let changes_before = metric(&m, "marina_edge_route_feed_changes_total").await;
    let removed = Instant::now();
    let (s, _) = m
        .call(
            &admin,
            "DELETE",
            &format!("/iam/teams/{team}/members/{vera}"),
            None,
        )
        .await;
    assert_eq!(s, 204);
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the viewer's socket was not closed within 5 s"
    );
    while get_status(&m, &viewer, "?kiosk=true").await != 403 {
        assert!(
            removed.elapsed() < Duration::from_secs(5),
            "the viewer's cookie still works after 5 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "revoked among {} routes in {:?}",
        EXTRA_ROUTES + 1,
        removed.elapsed()
    );
    assert_eq!(
        get_status(&m, &owner_s, "").await,
        200,
        "the owner is not affected"
    );
    let applied = metric(&m, "marina_edge_route_feed_changes_total").await - changes_before;
    assert!(
        (1.0..10.0).contains(&applied),
        "the removal came as a change or two, not a snapshot: {applied}"
    );
    assert_eq!(
        metric(&m, "marina_edge_routes").await,
        (EXTRA_ROUTES + 1) as f64
    );
}
