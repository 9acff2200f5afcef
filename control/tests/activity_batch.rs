//! An activity batch covering 10,000 notebooks, applied in a fixed number of statements
//! (`store::edges::record_activity`), on SQLite and PostgreSQL: every row moves forward, open
//! sockets wake idle notebooks, nothing moves back or into the future, and a notebook named
//! twice in one batch is summed, not refused.

mod common;

use axum::http::StatusCode;
use common::{now_ms, Harness, Store};
use serde_json::{json, Value};

const N: usize = 10_000;

async fn count(h: &Harness, sql: &str) -> i64 {
    sqlx::query_scalar(sql)
        .fetch_one(&h.cp.state().db.pool)
        .await
        .expect("count")
}

async fn a_batch_of_10000_notebooks(store: Store) {
    let h = Harness::new(store).await;
    let cfg = h.config(&h.admin, 3).await;
    let (_, key) = h.member(&h.admin, "member").await;
    let nb = h.notebook(&key, &cfg, &[]).await;
    let (org, member, wc): (String, String, String) =
        sqlx::query_as("SELECT org_id, member_id, workload_config_id FROM notebooks WHERE id = $1")
            .bind(&nb)
            .fetch_one(&h.cp.state().db.pool)
            .await
            .unwrap();
    let ids: Vec<String> = (0..N).map(|i| format!("A{i:09}")).collect();
    for chunk in ids.chunks(500) {
        let values: Vec<String> = chunk
            .iter()
            .map(|id| {
                format!(
                    "('{id}', '{org}', '{member}', '{wc}', 'n', 'idle', 0, '{id}', '127.0.0.1:9', 1, 1, 1)"
                )
            })
            .collect();
        h.sql(&format!(
            "INSERT INTO notebooks (id, org_id, member_id, workload_config_id, name, status,
                idle_timeout_seconds, session_id, upstream, running_since, created_at, updated_at)
             VALUES {}",
            values.join(", ")
        ))
        .await;
    }
    let at = now_ms() - 1_000;
    let batch: Vec<Value> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            json!({"notebookId": id, "sessionId": id, "lastActiveMs": at,
                   "openSockets": u32::from(i % 2 == 0)})
        })
        .collect();
    assert_eq!(
        h.activity("edge-a", json!(batch)).await,
        StatusCode::NO_CONTENT
    );
    let moved = format!("SELECT COUNT(*) FROM notebooks WHERE last_active_at = {at}");
    assert_eq!(
        count(&h, &moved).await,
        N as i64,
        "every notebook moved forward"
    );
    assert_eq!(
        count(
            &h,
            "SELECT COUNT(*) FROM notebooks WHERE status = 'running'"
        )
        .await,
        (N / 2) as i64,
        "open sockets wake idle notebooks; activity alone does not"
    );
    assert_eq!(
        count(
            &h,
            "SELECT COUNT(*) FROM edge_connections WHERE edge_id = 'edge-a' AND open_sockets > 0"
        )
        .await,
        (N / 2) as i64,
        "one row per (notebook, member), with the sockets it reported"
    );
    // Older activity never moves a notebook back; a wrong session moves nothing.
    let older: Vec<Value> = ids
        .iter()
        .map(|id| json!({"notebookId": id, "sessionId": id, "lastActiveMs": at - 500_000, "openSockets": 0}))
        .chain([json!({"notebookId": ids[0], "sessionId": "ZZZZZZZZZZ", "lastActiveMs": at + 10, "openSockets": 0})])
        .collect();
    h.activity("edge-a", json!(older)).await;
    assert_eq!(
        count(&h, &moved).await,
        N as i64,
        "never back, other sessions ignored"
    );
    assert_eq!(
        count(
            &h,
            "SELECT COUNT(*) FROM edge_connections WHERE edge_id = 'edge-a' AND open_sockets > 0"
        )
        .await,
        0,
        "the edge's latest batch replaces its connections"
    );
    // An edge's clock ahead of ours is capped at ours; a notebook named twice is summed.
    let future = now_ms() + 3_600_000;
    let twice = json!([
        {"notebookId": ids[1], "sessionId": ids[1], "lastActiveMs": future, "openSockets": 2},
        {"notebookId": ids[1], "sessionId": ids[1], "lastActiveMs": at, "openSockets": 3},
    ]);
    h.activity("edge-b", twice).await;
    let last: i64 = count(
        &h,
        &format!(
            "SELECT last_active_at FROM notebooks WHERE id = '{}'",
            ids[1]
        ),
    )
    .await;
    assert!(
        last <= now_ms() && last > at,
        "capped at the control plane's clock: {last}"
    );
    assert_eq!(
        count(
            &h,
            "SELECT open_sockets FROM edge_connections WHERE edge_id = 'edge-b'"
        )
        .await,
        5
    );
}
both!(a_batch_of_10000_notebooks);
