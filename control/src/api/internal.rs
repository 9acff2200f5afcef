//! `/internal/v1/*`: what the edge calls. Authenticated by the internal token ([`Edge`]),
//! never by a member's API key. The shapes are `marina_config::wire`'s.

use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::Json as AxumJson;
use marina_config::wire::{ActivityBatch, RedeemRequest, RouteChanges, RoutesFeed, RoutesSnapshot};
use serde::Deserialize;

use crate::auth::Edge;
use crate::error::ApiError;
use crate::extract::Json;
use crate::state::AppState;
use crate::store::now_ms;
use crate::store::routes::{self, Feed};

/// Longest a routes long poll is held.
pub const MAX_WAIT_SECONDS: u64 = 30;
/// While holding a long poll, the version is re-read this often, in case a change was not
/// announced: this replica's own changes wake the poll at once, and on PostgreSQL so do other
/// replicas' (`LISTEN`, see `ControlPlane::open`); on SQLite there is one replica.
const REPOLL: Duration = Duration::from_millis(500);

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RoutesQuery {
    #[serde(default)]
    after: Option<u64>,
    #[serde(default)]
    wait_seconds: Option<u64>,
}

/// The routes feed. Without `after`: the snapshot. With `after=V`: what changed since `V`, at
/// once if anything did, else when something does or after `waitSeconds` (at most 30), whichever
/// comes first (then an empty change list); a fresh snapshot when `V` cannot be resumed from.
#[utoipa::path(get, path = "/internal/v1/routes", tag = "internal",
    params(("after" = Option<u64>, Query), ("waitSeconds" = Option<u64>, Query, maximum = 30)),
    responses((status = 200, description = "RoutesFeed (marina_config::wire::routes): a snapshot or the changes since `after`"), (status = 401)),
    security(("internalToken" = [])))]
pub async fn routes_get(
    State(state): State<AppState>,
    _edge: Edge,
    query: Result<Query<RoutesQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<AxumJson<RoutesFeed>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::invalid("query", e.body_text()))?;
    let Some(after) = q.after else {
        return Ok(AxumJson(RoutesFeed::Snapshot(snapshot(&state).await?)));
    };
    let wait = Duration::from_secs(q.wait_seconds.unwrap_or(0).min(MAX_WAIT_SECONDS));
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        // Register for the wake-up before reading, so a change between the read and the
        // wait is not missed.
        let notified = state.routes_changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        match routes::feed_after(&state.db, after).await? {
            Feed::Changes(c) => return Ok(AxumJson(RoutesFeed::Changes(c))),
            Feed::Snapshot(s) => return Ok(AxumJson(RoutesFeed::Snapshot(s))),
            Feed::Unchanged => {}
        }
        let now = tokio::time::Instant::now();
        // A shutdown that begins ends the wait: the shutdown waits for open requests.
        if now >= deadline || state.is_shutting_down() {
            return Ok(AxumJson(RoutesFeed::Changes(RouteChanges {
                from: after,
                version: after,
                changes: Vec::new(),
            })));
        }
        let nap = (deadline - now).min(REPOLL);
        let _ = tokio::time::timeout(nap, notified).await;
    }
}

/// The whole routing table: every up notebook, every team's members, every organization's
/// admins.
pub async fn snapshot(state: &AppState) -> Result<RoutesSnapshot, ApiError> {
    Ok(routes::snapshot(&state.db).await?)
}

/// The most (notebook, member) entries one activity batch may carry: 10,000 notebooks with 25
/// people each (about 50 MB of JSON, under `INTERNAL_BODY_LIMIT`).
const MAX_ACTIVITY_ENTRIES: usize = 250_000;

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
    if batch.activity.len() > MAX_ACTIVITY_ENTRIES {
        return Err(ApiError::invalid("activity", "at most 250000 entries"));
    }
    state.lifecycle.record_activity(&batch).await?;
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
    // Single use across every edge replica and restart (the store's primary key).
    let first = crate::store::edges::redeem(&state.db, req.jti.as_str(), exp).await?;
    if !first {
        return Err(ApiError::conflict(
            "token_replayed",
            "this link was already used",
        ));
    }
    Ok(StatusCode::OK)
}
