//! `/workloads/notebooks…` and `/workloads/teams/{team}/notebooks`: the seed's thirteen
//! endpoints.
//!
//! Tenancy is enforced in SQL: every read goes through the store's visibility clause
//! ([`crate::store::notebooks`]), so a notebook the caller may not see is indistinguishable
//! from one that does not exist (404). Writes then need the owner or an org admin (403
//! otherwise). Both checks are the extractors of [`super::access`], which every
//! `/workloads/notebooks/{notebook}…` handler takes.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json as AxumJson;
use marina_config::wire::AccessMode;
use marina_config::Id;

use crate::api::access::{ManagedNotebook, OrgTeam, VisibleNotebook};
use crate::auth::Principal;
use crate::error::ApiError;
use crate::extract::{path_id, Json, ListParams};
use crate::model::*;
use crate::state::AppState;
use crate::store::notebooks::{self as store, Changes, NewNotebook};

/// Re-reads a notebook by id (after a write).
async fn fetch_by_id(state: &AppState, id: Id) -> Result<Notebook, ApiError> {
    store::fetch(&state.db, id, state.detached_timeout())
        .await?
        .ok_or_else(ApiError::notebook_not_found)
}

/// One notebook with its `included` objects.
async fn one(state: &AppState, nb: Notebook) -> Result<NotebookOne, ApiError> {
    let (mut items, included) = store::included(&state.db, vec![nb]).await?;
    let item = items.pop().ok_or_else(ApiError::notebook_not_found)?;
    Ok(NotebookOne { item, included })
}

async fn list(
    state: &AppState,
    p: &Principal,
    team: Option<Id>,
    params: ListParams,
) -> Result<NotebookList, ApiError> {
    let page = store::list(
        &state.db,
        &p.viewer(),
        team,
        (&params).into(),
        state.detached_timeout(),
    )
    .await?;
    let (items, included) = store::included(&state.db, page.notebooks).await?;
    Ok(NotebookList {
        total: page.total,
        items,
        included,
        next_page_token: page.next_page_token,
    })
}

/// Validates `teamIds` of a body: distinct teams of the caller's organization, and (for a
/// non-admin) teams the caller belongs to.
async fn check_teams(
    state: &AppState,
    p: &Principal,
    team_ids: &[Id],
) -> Result<Vec<Id>, ApiError> {
    if team_ids.len() > 100 {
        return Err(ApiError::invalid("teamIds", "at most 100 teams"));
    }
    let mut out: Vec<Id> = Vec::new();
    for (i, t) in team_ids.iter().enumerate() {
        if out.contains(t) {
            continue;
        }
        if !crate::store::teams::exists(&state.db, p.org_id, *t).await? {
            return Err(ApiError::invalid(format!("teamIds[{i}]"), "no such team"));
        }
        if !p.is_admin() && !p.in_team(*t) {
            return Err(ApiError::Forbidden(
                "members may share notebooks only with teams they belong to",
            ));
        }
        out.push(*t);
    }
    Ok(out)
}

fn check_name(field: &str, name: &str) -> Result<String, ApiError> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > 200 {
        return Err(ApiError::invalid(field, "must be 1 to 200 characters"));
    }
    if name.chars().any(char::is_control) {
        return Err(ApiError::invalid(
            field,
            "must not contain control characters",
        ));
    }
    Ok(name.to_owned())
}

fn check_description(d: Option<String>) -> Result<Option<String>, ApiError> {
    match d {
        Some(d) if d.chars().count() > 2000 => {
            Err(ApiError::invalid("description", "at most 2000 characters"))
        }
        other => Ok(other),
    }
}

/// Longest idle timeout (30 days).
const MAX_IDLE_TIMEOUT: i64 = 30 * 24 * 3600;

fn check_idle_timeout(v: i64) -> Result<i64, ApiError> {
    if !(0..=MAX_IDLE_TIMEOUT).contains(&v) {
        return Err(ApiError::invalid(
            "idleTimeoutSeconds",
            "must be from 0 (never) to 2592000 (30 days)",
        ));
    }
    Ok(v)
}

async fn check_config(state: &AppState, p: &Principal, id: Id) -> Result<(), ApiError> {
    if crate::store::configs::exists(&state.db, p.org_id, id).await? {
        Ok(())
    } else {
        Err(ApiError::invalid(
            "workloadConfigId",
            "no such workload config",
        ))
    }
}

// === Handlers ===

/// List notebooks the caller can see.
#[utoipa::path(get, path = "/workloads/notebooks", tag = "notebooks",
    params(("limit" = Option<i32>, Query, minimum = 0, maximum = 100), ("pageToken" = Option<String>, Query)),
    responses((status = 200, body = NotebookList), (status = 400), (status = 401), (status = 429)),
    security(("apiKey" = [])))]
pub async fn notebooks_list(
    State(state): State<AppState>,
    p: Principal,
    params: ListParams,
) -> Result<AxumJson<NotebookList>, ApiError> {
    Ok(AxumJson(list(&state, &p, None, params).await?))
}

/// Create a notebook (status `stopped`).
#[utoipa::path(post, path = "/workloads/notebooks", tag = "notebooks",
    request_body = CreateNotebookBody,
    responses((status = 201, body = NotebookOne), (status = 400), (status = 401), (status = 403), (status = 413), (status = 415)),
    security(("apiKey" = [])))]
pub async fn notebooks_create(
    State(state): State<AppState>,
    p: Principal,
    Json(body): Json<CreateNotebookBody>,
) -> Result<impl IntoResponse, ApiError> {
    let name = check_name("name", &body.name)?;
    let description = check_description(body.description)?;
    let idle = check_idle_timeout(body.idle_timeout_seconds.unwrap_or(3600))?;
    check_config(&state, &p, body.workload_config_id).await?;
    let teams = check_teams(&state, &p, &body.team_ids).await?;
    let id = store::insert(
        &state.db,
        NewNotebook {
            org_id: p.org_id,
            owner: p.member_id,
            workload_config_id: body.workload_config_id,
            name,
            description,
            idle_timeout_seconds: idle,
            team_ids: teams,
        },
    )
    .await?;
    let nb = fetch_by_id(&state, id).await?;
    Ok((StatusCode::CREATED, AxumJson(one(&state, nb).await?)))
}

/// Describe a notebook.
#[utoipa::path(get, path = "/workloads/notebooks/{notebook}", tag = "notebooks",
    params(("notebook" = String, Path, description = "A notebook ID")),
    responses((status = 200, body = NotebookOne), (status = 400), (status = 401), (status = 404)),
    security(("apiKey" = [])))]
pub async fn notebooks_get(
    State(state): State<AppState>,
    access: VisibleNotebook,
) -> Result<AxumJson<NotebookOne>, ApiError> {
    Ok(AxumJson(one(&state, access.notebook).await?))
}

/// Update name, description, idle timeout; the workload config only when stopped.
#[utoipa::path(patch, path = "/workloads/notebooks/{notebook}", tag = "notebooks",
    params(("notebook" = String, Path, description = "A notebook ID")),
    request_body = UpdateNotebookBody,
    responses((status = 200, body = Notebook), (status = 400), (status = 401), (status = 403), (status = 404), (status = 409)),
    security(("apiKey" = [])))]
pub async fn notebooks_update(
    State(state): State<AppState>,
    access: ManagedNotebook,
    Json(body): Json<UpdateNotebookBody>,
) -> Result<AxumJson<Notebook>, ApiError> {
    let ManagedNotebook {
        principal: p,
        notebook: nb,
    } = access;
    let id = nb.id;
    let mut changes = Changes {
        name: body
            .name
            .as_deref()
            .map(|n| check_name("name", n))
            .transpose()?,
        description: body.description.map(check_description).transpose()?,
        idle_timeout_seconds: body
            .idle_timeout_seconds
            .map(check_idle_timeout)
            .transpose()?,
        workload_config_id: None,
    };
    if let Some(cfg) = body.workload_config_id {
        if cfg != nb.workload_config_id {
            check_config(&state, &p, cfg).await?;
            changes.workload_config_id = Some(cfg);
        }
    }
    if !store::update(&state.db, id, changes, p.member_id).await? {
        return Err(ApiError::conflict(
            "notebook_not_stopped",
            "the workload config can only be changed while the notebook is stopped",
        ));
    }
    Ok(AxumJson(fetch_by_id(&state, id).await?))
}

/// Delete a notebook (stopping it first).
#[utoipa::path(delete, path = "/workloads/notebooks/{notebook}", tag = "notebooks",
    params(("notebook" = String, Path, description = "A notebook ID")),
    responses((status = 204), (status = 400), (status = 401), (status = 403), (status = 404)),
    security(("apiKey" = [])))]
pub async fn notebooks_delete(
    State(state): State<AppState>,
    access: ManagedNotebook,
) -> Result<StatusCode, ApiError> {
    state.lifecycle.delete(&access.notebook).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Start: `stopped`/`failed` → `starting`, with a new session id.
#[utoipa::path(post, path = "/workloads/notebooks/{notebook}/start", tag = "notebooks",
    params(("notebook" = String, Path, description = "A notebook ID")),
    responses((status = 200, body = Notebook), (status = 400), (status = 401), (status = 403), (status = 404), (status = 409)),
    security(("apiKey" = [])))]
pub async fn notebooks_start(
    State(state): State<AppState>,
    access: ManagedNotebook,
) -> Result<AxumJson<Notebook>, ApiError> {
    let by = access.principal.member_id;
    Ok(AxumJson(state.lifecycle.start(&access.notebook, by).await?))
}

/// Stop: `starting`/`running`/`idle`/`detached` → `stopping`.
#[utoipa::path(post, path = "/workloads/notebooks/{notebook}/stop", tag = "notebooks",
    params(("notebook" = String, Path, description = "A notebook ID")),
    responses((status = 200, body = Notebook), (status = 400), (status = 401), (status = 403), (status = 404), (status = 409)),
    security(("apiKey" = [])))]
pub async fn notebooks_stop(
    State(state): State<AppState>,
    access: ManagedNotebook,
) -> Result<AxumJson<Notebook>, ApiError> {
    let by = access.principal.member_id;
    Ok(AxumJson(
        state
            .lifecycle
            .stop(&access.notebook, Some(by), None)
            .await?,
    ))
}

fn not_running(nb: &Notebook) -> ApiError {
    ApiError::conflict(
        "notebook_not_running",
        format!(
            "the notebook is {}; it must be running, idle or detached",
            nb.status.as_str()
        ),
    )
}

/// Mint the edge's one-time URL.
#[utoipa::path(post, path = "/workloads/notebooks/{notebook}/open", tag = "notebooks",
    params(("notebook" = String, Path, description = "A notebook ID")),
    responses((status = 200, body = OpenUrl), (status = 400), (status = 401), (status = 404), (status = 409)),
    security(("apiKey" = [])))]
pub async fn notebooks_open(
    State(state): State<AppState>,
    access: VisibleNotebook,
) -> Result<AxumJson<OpenUrl>, ApiError> {
    let VisibleNotebook {
        principal: p,
        notebook: nb,
    } = access;
    let id = nb.id;
    let session = match (nb.status.is_up(), nb.session_id) {
        (true, Some(s)) => s,
        _ => return Err(not_running(&nb)),
    };
    // The owner edits; everyone else who can see it (team members, admins) gets the
    // read-only mirror.
    let mode = if nb.member_id == p.member_id {
        AccessMode::Edit
    } else {
        AccessMode::View
    };
    let token = state
        .signer
        .mint(p.member_id, id, session, mode)
        .map_err(|e| ApiError::Internal(format!("signing URL token: {e}")))?;
    Ok(AxumJson(OpenUrl {
        url: state.settings.addressing().handshake_url(id, &token),
    }))
}

/// Record the caller's presence and activity.
#[utoipa::path(post, path = "/workloads/notebooks/{notebook}/ping", tag = "notebooks",
    params(("notebook" = String, Path, description = "A notebook ID")),
    responses((status = 204), (status = 400), (status = 401), (status = 404), (status = 409)),
    security(("apiKey" = [])))]
pub async fn notebooks_ping(
    State(state): State<AppState>,
    access: VisibleNotebook,
) -> Result<StatusCode, ApiError> {
    let nb = access.notebook;
    let id = nb.id;
    if !nb.status.is_up() {
        return Err(not_running(&nb));
    }
    if !state.lifecycle.record_ping(id).await? {
        // It stopped between the read and the write.
        let nb = fetch_by_id(&state, id).await?;
        return Err(not_running(&nb));
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Who has the notebook open now: one entry per member with a socket open to its current run
/// through an edge replica that reported within the last few seconds, summed over replicas.
/// Empty when it is not running.
#[utoipa::path(get, path = "/workloads/notebooks/{notebook}/presence", tag = "notebooks",
    params(("notebook" = String, Path, description = "A notebook ID")),
    responses((status = 200, body = PresenceList), (status = 400), (status = 401), (status = 404)),
    security(("apiKey" = [])))]
pub async fn notebooks_presence(
    State(state): State<AppState>,
    access: VisibleNotebook,
) -> Result<AxumJson<PresenceList>, ApiError> {
    let since = crate::store::now_ms() - crate::lifecycle::edge_expiry_ms(&state.settings);
    let rows = crate::store::edges::presence(&state.db, access.notebook.id, since).await?;
    let items = rows
        .into_iter()
        .map(|p| PresenceEntry {
            member_id: p.member_id,
            mode: match p.mode {
                AccessMode::Edit => PresenceMode::Edit,
                AccessMode::View => PresenceMode::View,
            },
            since: p.since.map(crate::store::rfc3339),
            last_active_at: p.last_active_at.map(crate::store::rfc3339),
            open_sockets: p.open_sockets,
        })
        .collect();
    Ok(AxumJson(PresenceList { items }))
}

/// Teams with access to a notebook.
#[utoipa::path(get, path = "/workloads/notebooks/{notebook}/teams", tag = "notebooks",
    params(("notebook" = String, Path, description = "A notebook ID"), ("limit" = Option<i32>, Query, minimum = 0, maximum = 100)),
    responses((status = 200, body = NotebookTeamList), (status = 400), (status = 401), (status = 404)),
    security(("apiKey" = [])))]
pub async fn notebook_teams_list(
    State(state): State<AppState>,
    access: VisibleNotebook,
    params: ListParams,
) -> Result<AxumJson<NotebookTeamList>, ApiError> {
    let id = access.notebook.id;
    Ok(AxumJson(NotebookTeamList {
        items: team_links(&state, id, params.limit).await?,
    }))
}

async fn team_links(state: &AppState, id: Id, limit: i64) -> Result<Vec<NotebookTeam>, ApiError> {
    Ok(store::team_links(&state.db, id, limit).await?)
}

/// Share a notebook with teams (already shared is fine).
#[utoipa::path(post, path = "/workloads/notebooks/{notebook}/teams", tag = "notebooks",
    params(("notebook" = String, Path, description = "A notebook ID")),
    request_body = TeamIdsBody,
    responses((status = 200, body = NotebookTeamList), (status = 400), (status = 401), (status = 403), (status = 404)),
    security(("apiKey" = [])))]
pub async fn notebook_teams_add(
    State(state): State<AppState>,
    access: ManagedNotebook,
    Json(body): Json<TeamIdsBody>,
) -> Result<AxumJson<NotebookTeamList>, ApiError> {
    let ManagedNotebook {
        principal: p,
        notebook: nb,
    } = access;
    let id = nb.id;
    let teams = check_teams(&state, &p, &body.team_ids).await?;
    // New viewers for the edge.
    store::share(&state.db, id, &teams, p.member_id).await?;
    state.routes_changed.notify_waiters();
    Ok(AxumJson(NotebookTeamList {
        items: team_links(&state, id, 1000).await?,
    }))
}

/// Unshare a notebook from a team; its members lose access (and their edge sessions).
#[utoipa::path(delete, path = "/workloads/notebooks/{notebook}/teams/{team}", tag = "notebooks",
    params(("notebook" = String, Path, description = "A notebook ID"), ("team" = String, Path, description = "A team ID")),
    responses((status = 204), (status = 400), (status = 401), (status = 403), (status = 404)),
    security(("apiKey" = [])))]
pub async fn notebook_teams_remove(
    State(state): State<AppState>,
    access: ManagedNotebook,
    Path(ids): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let id = access.notebook.id;
    // Checked already (with the notebook id, before the lookup).
    let team = path_id("team", &ids.1)?;
    if !store::unshare(&state.db, id, team).await? {
        return Err(ApiError::team_not_found());
    }
    state.routes_changed.notify_waiters();
    Ok(StatusCode::NO_CONTENT)
}

/// Notebooks shared with a team (caller in the team, or an admin).
#[utoipa::path(get, path = "/workloads/teams/{team}/notebooks", tag = "notebooks",
    params(("team" = String, Path, description = "A team ID"), ("limit" = Option<i32>, Query, minimum = 0, maximum = 100), ("pageToken" = Option<String>, Query)),
    responses((status = 200, body = NotebookList), (status = 400), (status = 401), (status = 403), (status = 404)),
    security(("apiKey" = [])))]
pub async fn team_notebooks_list(
    State(state): State<AppState>,
    access: OrgTeam,
    params: ListParams,
) -> Result<AxumJson<NotebookList>, ApiError> {
    let (p, team) = (access.principal, access.team.id);
    if !p.is_admin() && !p.in_team(team) {
        return Err(ApiError::Forbidden(
            "only the team's members and admins may list its notebooks",
        ));
    }
    Ok(AxumJson(list(&state, &p, Some(team), params).await?))
}
