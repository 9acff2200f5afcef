//! `/workloads/configs…`: workload configs (what a notebook's Sail and Marimo servers are
//! provisioned from). Everyone in the organization may read them; only admins write.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json as AxumJson;
use marina_config::Id;

use crate::api::access::OrgConfig;
use crate::auth::Principal;
use crate::error::ApiError;
use crate::extract::{Json, ListParams};
use crate::model::*;
use crate::state::AppState;
use crate::store::configs::{self as store, ConfigFields};

async fn fetch_config(state: &AppState, p: &Principal, id: Id) -> Result<WorkloadConfig, ApiError> {
    store::fetch(&state.db, p.org_id, id)
        .await?
        .ok_or_else(ApiError::config_not_found)
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
    Ok(AxumJson(
        store::page(&state.db, p.org_id, (&params).into()).await?,
    ))
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
    let id = store::insert(
        &state.db,
        p.org_id,
        ConfigFields {
            name,
            workload_type,
            cluster_id: body.cluster_id,
            config_json: to_json(&body.config)?,
            endpoint_limits_json: to_json(&body.endpoint_limits.unwrap_or_default())?,
        },
        p.member_id,
    )
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
pub async fn configs_get(access: OrgConfig) -> Result<AxumJson<WorkloadConfig>, ApiError> {
    Ok(AxumJson(access.config))
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
    access: OrgConfig,
    Json(body): Json<UpdateWorkloadConfigBody>,
) -> Result<AxumJson<WorkloadConfig>, ApiError> {
    let id = access.config.id;
    let current = access.config;
    let p = access.principal;
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
    store::update(
        &state.db,
        p.org_id,
        id,
        ConfigFields {
            name,
            workload_type,
            cluster_id,
            config_json: to_json(&config)?,
            endpoint_limits_json: to_json(&limits)?,
        },
        p.member_id,
    )
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
    access: OrgConfig,
) -> Result<StatusCode, ApiError> {
    let id = access.config.id;
    let p = access.principal;
    p.require_admin()?;
    // One statement, so a notebook created concurrently cannot slip in (see the store).
    if !store::delete_unused(&state.db, p.org_id, id).await? {
        return Err(ApiError::conflict(
            "workload_config_in_use",
            "notebooks use this workload config; delete them or move them to another config first",
        ));
    }
    Ok(StatusCode::NO_CONTENT)
}
