//! The edge's bookkeeping: `edges` (when each replica last reported), `edge_connections`
//! (its open WebSockets per notebook), `redeemed_tokens` (single-use URL tokens across
//! replicas and restarts). The routes feed is [`super::routes`].

use marina_config::wire::{AccessMode, ActivityBatch};
use marina_config::Id;
use sqlx::Row;

use super::notebooks::UP_STATES;
use super::{get_id, now_ms, Db, DbKind};
use crate::error::StoreError;

/// Records an edge's activity batch: its open sockets per notebook run and member replace its
/// previous report, each member's latest activity moves forward (never back, never past our
/// clock), and so does each notebook's `lastActiveAt`, which also wakes idle/detached
/// notebooks that have sockets open.
///
/// Four statements whatever the batch's size (10,000 notebooks × their members included): the
/// entries travel as one JSON parameter, unpacked by the database itself (`json_each` on
/// SQLite, `json_to_recordset` on PostgreSQL), so there is no statement per entry and no limit
/// on bind parameters to chunk around.
pub async fn record_activity(db: &Db, batch: &ActivityBatch) -> Result<(), StoreError> {
    let now = now_ms();
    // Compact keys: n notebook, s session, u member, d mode, m last active (ms, or null),
    // o open sockets, f open since (ms, or null).
    let entries: Vec<serde_json::Value> = batch
        .activity
        .iter()
        .map(|a| {
            serde_json::json!({
                "n": a.notebook_id.as_str(),
                "s": a.session_id.as_str(),
                "u": a.member_id.as_str(),
                "d": match a.mode {
                    AccessMode::Edit => "edit",
                    AccessMode::View => "view",
                },
                "m": a.last_active_ms,
                "o": a.open_sockets,
                "f": a.open_since_ms.filter(|_| a.open_sockets > 0),
            })
        })
        .collect();
    let entries = serde_json::Value::Array(entries).to_string();
    // The batch as rows (n, s, u, d, m, o, f), in each database's own JSON functions.
    let rows = match db.kind {
        DbKind::Sqlite => {
            "SELECT json_extract(value, '$.n') AS n, json_extract(value, '$.s') AS s,
                    json_extract(value, '$.u') AS u, json_extract(value, '$.d') AS d,
                    json_extract(value, '$.m') AS m, json_extract(value, '$.o') AS o,
                    json_extract(value, '$.f') AS f
             FROM json_each($2)"
        }
        DbKind::Postgres => {
            "SELECT n, s, u, d, m, o, f FROM json_to_recordset(CAST($2 AS json))
                 AS x(n text, s text, u text, d text, m bigint, o bigint, f bigint)"
        }
    };
    // An edge's clock ahead of ours must not push times into the future. (Not LEAST/MIN of two:
    // PostgreSQL's LEAST skips NULLs, SQLite's MIN returns them.)
    let capped = |e: &str, now: &str| format!("CASE WHEN {e} > {now} THEN {now} ELSE {e} END");
    let mut tx = db.pool.begin().await?;
    sqlx::query(
        "INSERT INTO edges (edge_id, last_seen_at) VALUES ($1, $2)
         ON CONFLICT (edge_id) DO UPDATE SET last_seen_at = $2",
    )
    .bind(batch.edge_id.as_str())
    .bind(now)
    .execute(&mut *tx)
    .await?;
    // One row per (notebook, member), grouped so a batch naming one twice does not upsert a
    // row twice. A member's last activity is kept across batches without any (the socket is
    // open, the person reads) and restarts with a new session.
    sqlx::query(&format!(
        "INSERT INTO edge_connections (edge_id, notebook_id, member_id, session_id, mode,
             open_sockets, open_since, last_active_at, seen_at)
         SELECT $1, b.n, b.u, MAX(b.s), MIN(b.d), CAST(SUM(b.o) AS BIGINT), {since},
             {last}, $3
         FROM ({rows}) AS b WHERE true GROUP BY b.n, b.u
         ON CONFLICT (edge_id, notebook_id, member_id) DO UPDATE SET
             mode = excluded.mode, open_sockets = excluded.open_sockets,
             open_since = excluded.open_since, seen_at = excluded.seen_at,
             last_active_at = CASE
                 WHEN edge_connections.session_id <> excluded.session_id
                   OR edge_connections.last_active_at IS NULL THEN excluded.last_active_at
                 WHEN excluded.last_active_at IS NULL
                   OR excluded.last_active_at < edge_connections.last_active_at
                   THEN edge_connections.last_active_at
                 ELSE excluded.last_active_at END,
             session_id = excluded.session_id",
        since = capped("MIN(b.f)", "$3"),
        last = capped("MAX(b.m)", "$3"),
    ))
    .bind(batch.edge_id.as_str())
    .bind(entries.as_str())
    .bind(now)
    .execute(&mut *tx)
    .await?;
    // What this edge no longer reports has no socket open through it.
    sqlx::query("DELETE FROM edge_connections WHERE edge_id = $1 AND seen_at < $2")
        .bind(batch.edge_id.as_str())
        .bind(now)
        .execute(&mut *tx)
        .await?;
    // The latest activity per notebook run, over its members.
    sqlx::query(&format!(
        "UPDATE notebooks SET last_active_at = j.ms,
            status = CASE WHEN j.open > 0 THEN 'running' ELSE notebooks.status END,
            detached_since = CASE WHEN j.open > 0 THEN NULL ELSE notebooks.detached_since END
         FROM (SELECT b.n AS id, b.s AS sid, {last} AS ms, CAST(SUM(b.o) AS BIGINT) AS open
               FROM ({rows}) AS b WHERE b.m IS NOT NULL GROUP BY b.n, b.s) AS j
         WHERE notebooks.id = j.id AND notebooks.session_id = j.sid
           AND notebooks.status IN {UP_STATES}
           AND (notebooks.last_active_at IS NULL OR notebooks.last_active_at < j.ms)",
        last = capped("MAX(b.m)", "$1"),
    ))
    .bind(now)
    .bind(entries.as_str())
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

/// One member who has a notebook open now, summed over the edges seen since the cut-off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presence {
    pub member_id: Id,
    /// `edit` if any of their sockets is the owner's, else `view`.
    pub mode: AccessMode,
    /// Unix ms since when they have had it open (the earliest over the edges).
    pub since: Option<i64>,
    /// Unix ms of their latest activity in this run, if any.
    pub last_active_at: Option<i64>,
    pub open_sockets: i64,
}

/// Who has the current run of notebook `id` open, through edges seen at `edges_seen_since` or
/// later; the earliest arrivals first.
pub async fn presence(db: &Db, id: Id, edges_seen_since: i64) -> Result<Vec<Presence>, StoreError> {
    let rows = sqlx::query(&format!(
        "SELECT c.member_id, MIN(c.mode) AS mode, MIN(c.open_since) AS since,
                MAX(c.last_active_at) AS last_active, CAST(SUM(c.open_sockets) AS BIGINT) AS open
         FROM edge_connections c
         JOIN edges e ON e.edge_id = c.edge_id
         JOIN notebooks n ON n.id = c.notebook_id AND n.session_id = c.session_id
         WHERE c.notebook_id = $1 AND e.last_seen_at >= $2 AND c.open_sockets > 0
           AND n.status IN {UP_STATES}
         GROUP BY c.member_id
         ORDER BY MIN(c.open_since), c.member_id"
    ))
    .bind(id.to_string())
    .bind(edges_seen_since)
    .fetch_all(&db.pool)
    .await?;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let mode: String = row.try_get("mode")?;
        out.push(Presence {
            member_id: get_id(&row, "member_id")?,
            mode: if mode == "edit" {
                AccessMode::Edit
            } else {
                AccessMode::View
            },
            since: row.try_get("since")?,
            last_active_at: row.try_get("last_active")?,
            open_sockets: row.try_get("open")?,
        });
    }
    Ok(out)
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
