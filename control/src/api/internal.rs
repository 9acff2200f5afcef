//! `/internal/v1/*`: what the edge calls. Authenticated by the internal token ([`Edge`]),
//! never by a member's API key. The shapes are `marina_config::wire`'s.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::Json as AxumJson;
use marina_config::wire::{ActivityBatch, RedeemRequest, Route, RoutesSnapshot};
use marina_config::Id;
use serde::Deserialize;
use sqlx::Row;

use crate::auth::Edge;
use crate::db::{get_id, now_ms};
use crate::error::ApiError;
use crate::extract::Json;
use crate::lifecycle;
use crate::model::UP_STATES;
use crate::state::AppState;

/// Longest a routes long poll is held.
pub const MAX_WAIT_SECONDS: u64 = 30;
/// While holding a long poll, the version is re-read this often, to see changes made by other
/// control replicas (this replica's own changes wake the poll at once).
const REPOLL: Duration = Duration::from_millis(500);

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RoutesQuery {
    #[serde(default)]
    after: Option<u64>,
    #[serde(default)]
    wait_seconds: Option<u64>,
}

/// The routes snapshot, at once if its version differs from `after`, else when it changes or
/// after `waitSeconds` (at most 30), whichever comes first.
#[utoipa::path(get, path = "/internal/v1/routes", tag = "internal",
    params(("after" = Option<u64>, Query), ("waitSeconds" = Option<u64>, Query, maximum = 30)),
    responses((status = 200, description = "RoutesSnapshot (marina_config::wire)"), (status = 401)),
    security(("internalToken" = [])))]
pub async fn routes_get(
    State(state): State<AppState>,
    _edge: Edge,
    query: Result<Query<RoutesQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<AxumJson<RoutesSnapshot>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::invalid("query", e.body_text()))?;
    let wait = Duration::from_secs(q.wait_seconds.unwrap_or(0).min(MAX_WAIT_SECONDS));
    let deadline = tokio::time::Instant::now() + wait;
    if let Some(after) = q.after {
        loop {
            // Register for the wake-up before reading, so a bump between the read and the
            // wait is not missed.
            let notified = state.routes_changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if state.db.route_version().await? != after {
                break;
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                break;
            }
            let nap = (deadline - now).min(REPOLL);
            let _ = tokio::time::timeout(nap, notified).await;
        }
    }
    Ok(AxumJson(snapshot(&state).await?))
}

/// Builds the routing table: every up notebook, its upstream, owner and viewers.
pub async fn snapshot(state: &AppState) -> Result<RoutesSnapshot, ApiError> {
    // Read the version first: if something changes while the table is built, the table may
    // be newer than its version, never older, and the edge's next poll picks the change up.
    let version = state.db.route_version().await?;
    let rows = sqlx::query(&format!(
        "SELECT id, org_id, member_id, session_id, upstream, upstream_token
         FROM notebooks WHERE status IN {UP_STATES} AND upstream IS NOT NULL AND session_id IS NOT NULL
         ORDER BY id"
    ))
    .fetch_all(&state.db.pool)
    .await?;
    let team_viewers = sqlx::query(&format!(
        "SELECT nt.notebook_id, tm.member_id FROM notebook_teams nt
         JOIN team_members tm ON tm.team_id = nt.team_id
         JOIN notebooks n ON n.id = nt.notebook_id
         WHERE n.status IN {UP_STATES}"
    ))
    .fetch_all(&state.db.pool)
    .await?;
    let admins = sqlx::query("SELECT id, org_id FROM members WHERE role = 'admin'")
        .fetch_all(&state.db.pool)
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

/// An edge's activity report.
#[utoipa::path(post, path = "/internal/v1/activity", tag = "internal",
    request_body(content = Object, description = "ActivityBatch (marina_config::wire)"),
    responses((status = 204), (status = 400), (status = 401)),
    security(("internalToken" = [])))]
pub async fn activity_post(
    State(state): State<AppState>,
    _edge: Edge,
    Json(batch): Json<ActivityBatch>,
) -> Result<StatusCode, ApiError> {
    if batch.edge_id.is_empty() || batch.edge_id.len() > 200 {
        return Err(ApiError::invalid("edgeId", "must be 1 to 200 characters"));
    }
    if batch.notebooks.len() > 100_000 {
        return Err(ApiError::invalid("notebooks", "at most 100000 entries"));
    }
    lifecycle::record_activity(&state, &batch).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Marks a URL token as used: 200 the first time, 409 `token_replayed` after.
#[utoipa::path(post, path = "/internal/v1/redeem", tag = "internal",
    request_body(content = Object, description = "RedeemRequest (marina_config::wire)"),
    responses((status = 200), (status = 400), (status = 401), (status = 409)),
    security(("internalToken" = [])))]
pub async fn redeem_post(
    State(state): State<AppState>,
    _edge: Edge,
    Json(req): Json<RedeemRequest>,
) -> Result<StatusCode, ApiError> {
    if req.jti.is_empty() || req.jti.len() > 200 {
        return Err(ApiError::invalid("jti", "must be 1 to 200 characters"));
    }
    let exp = i64::try_from(req.exp).map_err(|_| ApiError::invalid("exp", "out of range"))?;
    if exp < now_ms() / 1000 - 3600 {
        // Long expired: the edge should have refused it; don't grow the table with it.
        return Err(ApiError::conflict("token_expired", "the token has expired"));
    }
    // The primary key makes this single-use across every edge replica and restart.
    let res = sqlx::query(
        "INSERT INTO redeemed_tokens (jti, exp) VALUES ($1, $2) ON CONFLICT (jti) DO NOTHING",
    )
    .bind(req.jti.as_str())
    .bind(exp)
    .execute(&state.db.pool)
    .await?;
    if res.rows_affected() == 0 {
        return Err(ApiError::conflict(
            "token_replayed",
            "this link was already used",
        ));
    }
    Ok(StatusCode::OK)
}
