//! The edge's bookkeeping: `edges` (when each replica last reported), `edge_connections`
//! (its open WebSockets per notebook), `redeemed_tokens` (single-use URL tokens across
//! replicas and restarts). The routes feed is [`super::routes`].

use marina_config::wire::ActivityBatch;

use super::notebooks::UP_STATES;
use super::{now_ms, Db, DbKind};
use crate::error::StoreError;

/// Records an edge's activity batch: its open connections replace its previous report, and
/// activity moves `lastActiveAt` forward (never back, never past our clock) and wakes
/// idle/detached notebooks that have sockets open.
///
/// Four statements whatever the batch's size (10,000 notebooks included): the entries travel
/// as one JSON parameter, unpacked by the database itself (`json_each` on SQLite,
/// `json_to_recordset` on PostgreSQL), so there is no statement per notebook and no limit on
/// bind parameters to chunk around.
pub async fn record_activity(db: &Db, batch: &ActivityBatch) -> Result<(), StoreError> {
    let now = now_ms();
    // Compact keys: n notebook, s session, m last active (ms, or null), o open sockets.
    let entries: Vec<serde_json::Value> = batch
        .notebooks
        .iter()
        .map(|nb| {
            serde_json::json!({
                "n": nb.notebook_id.as_str(),
                "s": nb.session_id.as_str(),
                "m": nb.last_active_ms,
                "o": nb.open_websockets,
            })
        })
        .collect();
    let entries = serde_json::Value::Array(entries).to_string();
    // The batch as rows (id, sid, ms, open), in each database's own JSON functions.
    let rows = match db.kind {
        DbKind::Sqlite => {
            "SELECT json_extract(value, '$.n') AS id, json_extract(value, '$.s') AS sid,
                    json_extract(value, '$.m') AS ms, json_extract(value, '$.o') AS open
             FROM json_each($2)"
        }
        DbKind::Postgres => {
            "SELECT n AS id, s AS sid, m AS ms, o AS open
             FROM json_to_recordset(CAST($2 AS json)) AS x(n text, s text, m bigint, o bigint)"
        }
    };
    let mut tx = db.pool.begin().await?;
    sqlx::query(
        "INSERT INTO edges (edge_id, last_seen_at) VALUES ($1, $2)
         ON CONFLICT (edge_id) DO UPDATE SET last_seen_at = $2",
    )
    .bind(batch.edge_id.as_str())
    .bind(now)
    .execute(&mut *tx)
    .await?;
    sqlx::query("DELETE FROM edge_connections WHERE edge_id = $1")
        .bind(batch.edge_id.as_str())
        .execute(&mut *tx)
        .await?;
    // Summed per notebook: a batch naming a notebook twice must not upsert one row twice.
    sqlx::query(&format!(
        "INSERT INTO edge_connections (edge_id, notebook_id, open_websockets)
         SELECT $1, b.id, CAST(SUM(b.open) AS BIGINT) FROM ({rows}) AS b
         WHERE b.open > 0 GROUP BY b.id"
    ))
    .bind(batch.edge_id.as_str())
    .bind(entries.as_str())
    .execute(&mut *tx)
    .await?;
    // The latest activity per notebook and session, capped at our clock (an edge's clock ahead
    // of ours must not push activity into the future).
    let cap = match db.kind {
        DbKind::Sqlite => "MIN(MAX(b.ms), $1)",
        DbKind::Postgres => "LEAST(MAX(b.ms), $1)",
    };
    sqlx::query(&format!(
        "UPDATE notebooks SET last_active_at = j.ms,
            status = CASE WHEN j.open > 0 THEN 'running' ELSE notebooks.status END,
            detached_since = CASE WHEN j.open > 0 THEN NULL ELSE notebooks.detached_since END
         FROM (SELECT b.id AS id, b.sid AS sid, {cap} AS ms, CAST(SUM(b.open) AS BIGINT) AS open
               FROM ({rows}) AS b WHERE b.ms IS NOT NULL GROUP BY b.id, b.sid) AS j
         WHERE notebooks.id = j.id AND notebooks.session_id = j.sid
           AND notebooks.status IN {UP_STATES}
           AND (notebooks.last_active_at IS NULL OR notebooks.last_active_at < j.ms)"
    ))
    .bind(now)
    .bind(entries.as_str())
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Marks a URL token (`jti`, expiring at `exp` seconds) as used; false when it already was.
/// The primary key makes this single-use across every edge replica and restart.
pub async fn redeem(db: &Db, jti: &str, exp: i64) -> Result<bool, StoreError> {
    let res = sqlx::query(
        "INSERT INTO redeemed_tokens (jti, exp) VALUES ($1, $2) ON CONFLICT (jti) DO NOTHING",
    )
    .bind(jti)
    .bind(exp)
    .execute(&db.pool)
    .await?;
    Ok(res.rows_affected() > 0)
}

/// Forgets tokens expired five minutes ago and edges gone for an hour.
pub async fn forget_expired(db: &Db) -> Result<(), StoreError> {
    let now = now_ms();
    sqlx::query("DELETE FROM redeemed_tokens WHERE exp < $1")
        .bind(now / 1000 - 300)
        .execute(&db.pool)
        .await?;
    let mut tx = db.pool.begin().await?;
    sqlx::query(
        "DELETE FROM edge_connections WHERE edge_id IN (SELECT edge_id FROM edges WHERE last_seen_at < $1)",
    )
    .bind(now - 3_600_000)
    .execute(&mut *tx)
    .await?;
    sqlx::query("DELETE FROM edges WHERE last_seen_at < $1")
        .bind(now - 3_600_000)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}
