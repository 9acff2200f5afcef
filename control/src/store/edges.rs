//! The edge's bookkeeping: `edges` (when each replica last reported), `edge_connections`
//! (its open WebSockets per notebook), `redeemed_tokens` (single-use URL tokens across
//! replicas and restarts). The routes feed is [`super::routes`].

use marina_config::wire::ActivityBatch;

use super::notebooks::UP_STATES;
use super::{now_ms, Db};
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
