//! The edge's bookkeeping: `edges` (when each replica last reported), `edge_connections`
//! (its open WebSockets per notebook), `redeemed_tokens` (single-use URL tokens across
//! replicas and restarts), and the routes snapshot the edges long-poll.

use std::collections::{HashMap, HashSet};

use marina_config::wire::{ActivityBatch, Route, RoutesSnapshot};
use marina_config::Id;
use sqlx::Row;

use super::notebooks::UP_STATES;
use super::{get_id, now_ms, Db};
use crate::error::StoreError;

/// Records an edge's activity batch: its open connections replace its previous report, and
/// activity moves `lastActiveAt` forward (never back) and wakes idle/detached notebooks.
pub async fn record_activity(db: &Db, batch: &ActivityBatch) -> Result<(), StoreError> {
    let now = now_ms();
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
    for nb in &batch.notebooks {
        if nb.open_websockets > 0 {
            sqlx::query(
                "INSERT INTO edge_connections (edge_id, notebook_id, open_websockets) VALUES ($1, $2, $3)
                 ON CONFLICT (edge_id, notebook_id) DO UPDATE SET open_websockets = $3",
            )
            .bind(batch.edge_id.as_str())
            .bind(nb.notebook_id.to_string())
            .bind(nb.open_websockets as i64)
            .execute(&mut *tx)
            .await?;
        }
        if let Some(ms) = nb.last_active_ms {
            // An edge's clock ahead of ours must not push activity into the future.
            let ms = ms.min(now);
            let wake = if nb.open_websockets > 0 {
                ", status = 'running', detached_since = NULL"
            } else {
                ""
            };
            sqlx::query(&format!(
                "UPDATE notebooks SET last_active_at = $1{wake}
                 WHERE id = $2 AND session_id = $3 AND status IN {UP_STATES}
                   AND (last_active_at IS NULL OR last_active_at < $1)"
            ))
            .bind(ms)
            .bind(nb.notebook_id.to_string())
            .bind(nb.session_id.to_string())
            .execute(&mut *tx)
            .await?;
        }
    }
    tx.commit().await?;
    Ok(())
}

/// Builds the routing table: every up notebook, its upstream, owner and viewers.
pub async fn routes(db: &Db) -> Result<RoutesSnapshot, StoreError> {
    // Read the version first: if something changes while the table is built, the table may
    // be newer than its version, never older, and the edge's next poll picks the change up.
    let version = db.route_version().await?;
    let rows = sqlx::query(&format!(
        "SELECT id, org_id, member_id, session_id, upstream, upstream_token
         FROM notebooks WHERE status IN {UP_STATES} AND upstream IS NOT NULL AND session_id IS NOT NULL
         ORDER BY id"
    ))
    .fetch_all(&db.pool)
    .await?;
    let team_viewers = sqlx::query(&format!(
        "SELECT nt.notebook_id, tm.member_id FROM notebook_teams nt
         JOIN team_members tm ON tm.team_id = nt.team_id
         JOIN notebooks n ON n.id = nt.notebook_id
         WHERE n.status IN {UP_STATES}"
    ))
    .fetch_all(&db.pool)
    .await?;
    let admins = sqlx::query("SELECT id, org_id FROM members WHERE role = 'admin'")
        .fetch_all(&db.pool)
        .await?;
    let mut admins_by_org: HashMap<Id, Vec<Id>> = HashMap::new();
    for row in &admins {
        admins_by_org
            .entry(get_id(row, "org_id")?)
            .or_default()
            .push(get_id(row, "id")?);
    }
    let mut viewers_by_nb: HashMap<Id, HashSet<Id>> = HashMap::new();
    for row in &team_viewers {
        viewers_by_nb
            .entry(get_id(row, "notebook_id")?)
            .or_default()
            .insert(get_id(row, "member_id")?);
    }
    let mut routes = Vec::with_capacity(rows.len());
    for row in &rows {
        let id = get_id(row, "id")?;
        let owner = get_id(row, "member_id")?;
        let org = get_id(row, "org_id")?;
        let mut viewers: Vec<Id> = viewers_by_nb
            .remove(&id)
            .unwrap_or_default()
            .into_iter()
            .collect();
        if let Some(a) = admins_by_org.get(&org) {
            viewers.extend(a.iter().copied());
        }
        viewers.retain(|v| *v != owner);
        viewers.sort();
        viewers.dedup();
        routes.push(Route {
            notebook_id: id,
            session_id: get_id(row, "session_id")?,
            upstream: row.try_get("upstream")?,
            upstream_token: row
                .try_get::<Option<String>, _>("upstream_token")?
                .unwrap_or_default(),
            owner_id: owner,
            viewers,
        });
    }
    Ok(RoutesSnapshot { version, routes })
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
