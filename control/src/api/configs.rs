//! `/workloads/configs…`: workload configs (what a notebook's Sail and Marimo servers are
//! provisioned from). Everyone in the organization may read them; only admins write.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json as AxumJson;
use marina_config::Id;
use sqlx::any::AnyRow;
use sqlx::Row;

use crate::api::notebooks::{bind_all, Arg};
use crate::auth::Principal;
use crate::db::now_ms;
use crate::error::ApiError;
use crate::extract::{path_id, Cursor, Json, ListParams};
use crate::model::*;
use crate::state::AppState;

/// One keyset page of `table` rows matching `cond` (columns unqualified), newest first.
/// Returns the total, the page's rows and whether more follow.
pub async fn page_rows(
    state: &AppState,
    table: &str,
    cond: &str,
    mut args: Vec<Arg>,
    params: &ListParams,
) -> Result<(i64, Vec<AnyRow>, bool), ApiError> {
    let total: i64 = bind_all(
        sqlx::query(&format!("SELECT COUNT(*) AS n FROM {table} WHERE {cond}")),
        &args,
    )
    .fetch_one(&state.db.pool)
    .await?
    .try_get("n")?;
    if params.limit == 0 {
        return Ok((total, Vec::new(), false));
    }
    let mut page_cond = cond.to_owned();
    if let Some(c) = &params.after {
        args.push(Arg::I(c.created_at));
        let t = args.len();
        args.push(Arg::S(c.id.to_string()));
        let i = args.len();
        page_cond =
            format!("{page_cond} AND (created_at < ${t} OR (created_at = ${t} AND id > ${i}))");
    }
    let sql = format!(
        "SELECT * FROM {table} WHERE {page_cond} ORDER BY created_at DESC, id ASC LIMIT {}",
        params.limit + 1
    );
    let mut rows = bind_all(sqlx::query(&sql), &args)
        .fetch_all(&state.db.pool)
        .await?;
    let more = rows.len() as i64 > params.limit;
    rows.truncate(params.limit as usize);
    Ok((total, rows, more))
}

/// The `nextPageToken` after `last` when more follow.
pub fn next_token(more: bool, last: Option<(i64, Id)>) -> Option<String> {
    if !more {
        return None;
    }
    last.map(|(created_at, id)| Cursor { created_at, id }.encode())
}

async fn fetch_config(state: &AppState, p: &Principal, id: Id) -> Result<WorkloadConfig, ApiError> {
    let row = sqlx::query("SELECT * FROM workload_configs WHERE id = $1 AND org_id = $2")
        .bind(id.to_string())
        .bind(p.org_id.to_string())
        .fetch_optional(&state.db.pool)
        .await?
        .ok_or_else(ApiError::config_not_found)?;
    Ok(WorkloadConfig::from_row(&row)?)
}

fn check_sail(config: &WorkloadConfigBody) -> Result<(), ApiError> {
    config
        .sail
        .validate()
        .map_err(|e| ApiError::invalid(e.field, e.message))
}

fn check_workload_type(t: &str) -> Result<(), ApiError> {
    if t.is_empty()
        || t.len() > 64
        || !t
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(ApiError::invalid(
            "workloadType",
            "must be 1 to 64 letters, digits, - or _",
        ));
    }
    Ok(())
}

fn check_config_name(name: &str) -> Result<String, ApiError> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > 200 || name.chars().any(char::is_control) {
        return Err(ApiError::invalid(
            "name",
            "must be 1 to 200 printable characters",
        ));
    }
    Ok(name.to_owned())
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<String, ApiError> {
    serde_json::to_string(v).map_err(|e| ApiError::Internal(format!("encoding: {e}")))
}

/// List the organization's workload configs.
#[utoipa::path(get, path = "/workloads/configs", tag = "workload configs",
    params(("limit" = Option<i32>, Query, minimum = 0, maximum = 100), ("pageToken" = Option<String>, Query)),
    responses((status = 200, body = Page<WorkloadConfig>), (status = 400), (status = 401)),
    security(("apiKey" = [])))]
pub async fn configs_list(
    State(state): State<AppState>,
    p: Principal,
    params: ListParams,
) -> Result<AxumJson<Page<WorkloadConfig>>, ApiError> {
    let (total, rows, more) = page_rows(
        &state,
        "workload_configs",
        "org_id = $1",
        vec![Arg::S(p.org_id.to_string())],
        &params,
    )
    .await?;
    let items = rows
        .iter()
        .map(WorkloadConfig::from_row)
        .collect::<Result<Vec<_>, _>>()?;
    let next_page_token = next_token(more, items.last().map(|c| (c.created_at_ms, c.id)));
    Ok(AxumJson(Page {
        total,
        items,
        next_page_token,
    }))
}

/// Create a workload config (admins).
#[utoipa::path(post, path = "/workloads/configs", tag = "workload configs",
    request_body = CreateWorkloadConfigBody,
    responses((status = 201, body = WorkloadConfig), (status = 400), (status = 401), (status = 403)),
    security(("apiKey" = [])))]
pub async fn configs_create(
    State(state): State<AppState>,
    p: Principal,
    Json(body): Json<CreateWorkloadConfigBody>,
) -> Result<impl IntoResponse, ApiError> {
    p.require_admin()?;
    let name = check_config_name(&body.name)?;
    let workload_type = body.workload_type.unwrap_or_else(|| "notebook".into());
    check_workload_type(&workload_type)?;
    check_sail(&body.config)?;
    let id = Id::random();
    let now = now_ms();
    sqlx::query(
        "INSERT INTO workload_configs (id, org_id, name, workload_type, cluster_id, config, endpoint_limits,
            created_at, created_by, updated_at, updated_by)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $8, $9)",
    )
    .bind(id.to_string())
    .bind(p.org_id.to_string())
    .bind(name)
    .bind(workload_type)
    .bind(body.cluster_id.map(|c| c.to_string()))
    .bind(to_json(&body.config)?)
    .bind(to_json(&body.endpoint_limits.unwrap_or_default())?)
    .bind(now)
    .bind(p.member_id.to_string())
    .execute(&state.db.pool)
    .await?;
    Ok((
        StatusCode::CREATED,
        AxumJson(fetch_config(&state, &p, id).await?),
    ))
}

/// Describe a workload config.
#[utoipa::path(get, path = "/workloads/configs/{config}", tag = "workload configs",
    params(("config" = String, Path, description = "A workload config ID")),
    responses((status = 200, body = WorkloadConfig), (status = 400), (status = 401), (status = 404)),
    security(("apiKey" = [])))]
pub async fn configs_get(
    State(state): State<AppState>,
    p: Principal,
    Path(config): Path<String>,
) -> Result<AxumJson<WorkloadConfig>, ApiError> {
    let id = path_id("config", &config)?;
    Ok(AxumJson(fetch_config(&state, &p, id).await?))
}

/// Update a workload config (admins). Running notebooks keep what they were started with;
/// the next start uses the new config.
#[utoipa::path(patch, path = "/workloads/configs/{config}", tag = "workload configs",
    params(("config" = String, Path, description = "A workload config ID")),
    request_body = UpdateWorkloadConfigBody,
    responses((status = 200, body = WorkloadConfig), (status = 400), (status = 401), (status = 403), (status = 404)),
    security(("apiKey" = [])))]
pub async fn configs_update(
    State(state): State<AppState>,
    p: Principal,
    Path(config): Path<String>,
    Json(body): Json<UpdateWorkloadConfigBody>,
) -> Result<AxumJson<WorkloadConfig>, ApiError> {
    let id = path_id("config", &config)?;
    let current = fetch_config(&state, &p, id).await?;
    p.require_admin()?;
    let name = match &body.name {
        Some(n) => check_config_name(n)?,
        None => current.name,
    };
    let workload_type = body.workload_type.unwrap_or(current.workload_type);
    check_workload_type(&workload_type)?;
    let cluster_id = body.cluster_id.unwrap_or(current.cluster_id);
    let config = body.config.unwrap_or(current.config);
    check_sail(&config)?;
    let limits = body.endpoint_limits.unwrap_or(current.endpoint_limits);
    sqlx::query(
        "UPDATE workload_configs SET name = $1, workload_type = $2, cluster_id = $3, config = $4,
            endpoint_limits = $5, updated_at = $6, updated_by = $7
         WHERE id = $8 AND org_id = $9",
    )
    .bind(name)
    .bind(workload_type)
    .bind(cluster_id.map(|c| c.to_string()))
    .bind(to_json(&config)?)
    .bind(to_json(&limits)?)
    .bind(now_ms())
    .bind(p.member_id.to_string())
    .bind(id.to_string())
    .bind(p.org_id.to_string())
    .execute(&state.db.pool)
    .await?;
    Ok(AxumJson(fetch_config(&state, &p, id).await?))
}

/// Delete a workload config (admins); 409 while notebooks use it.
#[utoipa::path(delete, path = "/workloads/configs/{config}", tag = "workload configs",
    params(("config" = String, Path, description = "A workload config ID")),
    responses((status = 204), (status = 400), (status = 401), (status = 403), (status = 404), (status = 409)),
    security(("apiKey" = [])))]
pub async fn configs_delete(
    State(state): State<AppState>,
    p: Principal,
    Path(config): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id = path_id("config", &config)?;
    fetch_config(&state, &p, id).await?;
    p.require_admin()?;
    // One statement: a notebook created concurrently either lands before (and blocks the
    // delete) or fails its foreign key after.
    let res = sqlx::query(
        "DELETE FROM workload_configs WHERE id = $1 AND org_id = $2
           AND NOT EXISTS (SELECT 1 FROM notebooks WHERE workload_config_id = $1)",
    )
    .bind(id.to_string())
    .bind(p.org_id.to_string())
    .execute(&state.db.pool)
    .await?;
    if res.rows_affected() == 0 {
        return Err(ApiError::conflict(
            "workload_config_in_use",
            "notebooks use this workload config; delete them or move them to another config first",
        ));
    }
    Ok(StatusCode::NO_CONTENT)
}
