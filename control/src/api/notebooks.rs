//! `/workloads/notebooks…` and `/workloads/teams/{team}/notebooks`: the seed's thirteen
//! endpoints.
//!
//! Tenancy is enforced in SQL: every read goes through [`visible_clause`], so a notebook the
//! caller may not see is indistinguishable from one that does not exist (404). Writes then
//! check [`may_manage`] (owner or org admin; 403 otherwise).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json as AxumJson;
use marina_config::wire::AccessMode;
use marina_config::Id;
use sqlx::any::AnyArguments;
use sqlx::query::Query;
use sqlx::{Any, Row};

use crate::auth::Principal;
use crate::db::{bump_routes, get_id, now_ms, placeholders};
use crate::error::ApiError;
use crate::extract::{path_id, Cursor, Json, ListParams};
use crate::lifecycle;
use crate::model::*;
use crate::state::AppState;

/// A bind value of a dynamically built query.
#[derive(Clone, Debug)]
pub enum Arg {
    S(String),
    I(i64),
}

pub fn bind_all<'q>(
    mut q: Query<'q, Any, AnyArguments<'q>>,
    args: &'q [Arg],
) -> Query<'q, Any, AnyArguments<'q>> {
    for a in args {
        q = match a {
            Arg::S(s) => q.bind(s.as_str()),
            Arg::I(i) => q.bind(*i),
        };
    }
    q
}

/// The `WHERE` condition (over alias `n`) selecting what `p` may see; pushes its binds.
pub fn visible_clause(p: &Principal, args: &mut Vec<Arg>) -> String {
    args.push(Arg::S(p.org_id.to_string()));
    let org = args.len();
    if p.is_admin() {
        return format!("n.org_id = ${org}");
    }
    args.push(Arg::S(p.member_id.to_string()));
    let me = args.len();
    format!(
        "n.org_id = ${org} AND (n.member_id = ${me} OR n.id IN (SELECT nt.notebook_id FROM notebook_teams nt JOIN team_members tm ON tm.team_id = nt.team_id WHERE tm.member_id = ${me}))"
    )
}

/// Owner and org admins may change a notebook.
pub fn may_manage(p: &Principal, nb: &Notebook) -> Result<(), ApiError> {
    if p.is_admin() || nb.member_id == p.member_id {
        Ok(())
    } else {
        Err(ApiError::Forbidden(
            "only the notebook's owner or an organization admin may do this",
        ))
    }
}

/// The notebook if `p` may see it, else 404.
pub async fn fetch_visible(state: &AppState, p: &Principal, id: Id) -> Result<Notebook, ApiError> {
    let mut args = vec![Arg::S(id.to_string())];
    let vis = visible_clause(p, &mut args);
    let sql = format!("SELECT {NOTEBOOK_COLUMNS} FROM notebooks n WHERE n.id = $1 AND {vis}");
    let row = bind_all(sqlx::query(&sql), &args)
        .fetch_optional(&state.db.pool)
        .await?
        .ok_or_else(ApiError::notebook_not_found)?;
    Ok(Notebook::from_row(&row, state.detached_timeout())?)
}

/// Re-reads a notebook by id (after a write).
pub async fn fetch_by_id(state: &AppState, id: Id) -> Result<Notebook, ApiError> {
    let sql = format!("SELECT {NOTEBOOK_COLUMNS} FROM notebooks n WHERE n.id = $1");
    let row = sqlx::query(&sql)
        .bind(id.to_string())
        .fetch_optional(&state.db.pool)
        .await?
        .ok_or_else(ApiError::notebook_not_found)?;
    Ok(Notebook::from_row(&row, state.detached_timeout())?)
}

/// Items and `included` for a set of notebooks (each object once).
pub async fn build_included(
    state: &AppState,
    notebooks: Vec<Notebook>,
) -> Result<(Vec<NotebookItem>, Included), ApiError> {
    let mut items: Vec<NotebookItem> = notebooks
        .iter()
        .map(|n| NotebookItem {
            notebook_id: n.id,
            team_ids: Vec::new(),
            workload_config_id: n.workload_config_id,
        })
        .collect();
    if notebooks.is_empty() {
        return Ok((items, Included::default()));
    }
    let ids: Vec<String> = notebooks.iter().map(|n| n.id.to_string()).collect();
    let sql = format!(
        "SELECT notebook_id, team_id FROM notebook_teams WHERE notebook_id IN ({}) ORDER BY created_at, team_id",
        placeholders(1, ids.len())
    );
    let mut q = sqlx::query(&sql);
    for id in &ids {
        q = q.bind(id.as_str());
    }
    let mut team_ids: Vec<Id> = Vec::new();
    for row in q.fetch_all(&state.db.pool).await? {
        let nb = get_id(&row, "notebook_id")?;
        let team = get_id(&row, "team_id")?;
        if let Some(item) = items.iter_mut().find(|i| i.notebook_id == nb) {
            item.team_ids.push(team);
        }
        if !team_ids.contains(&team) {
            team_ids.push(team);
        }
    }
    let teams = teams_with_counts(state, &team_ids).await?;

    let mut config_ids: Vec<String> = Vec::new();
    for n in &notebooks {
        let s = n.workload_config_id.to_string();
        if !config_ids.contains(&s) {
            config_ids.push(s);
        }
    }
    let sql = format!(
        "SELECT * FROM workload_configs WHERE id IN ({}) ORDER BY created_at DESC, id",
        placeholders(1, config_ids.len())
    );
    let mut q = sqlx::query(&sql);
    for id in &config_ids {
        q = q.bind(id.as_str());
    }
    let workload_configs = q
        .fetch_all(&state.db.pool)
        .await?
        .iter()
        .map(WorkloadConfig::from_row)
        .collect::<Result<Vec<_>, _>>()?;
    Ok((
        items,
        Included {
            notebooks,
            teams,
            workload_configs,
        },
    ))
}

/// Teams by id with their member counts.
pub async fn teams_with_counts(
    state: &AppState,
    ids: &[Id],
) -> Result<Vec<TeamWithCount>, ApiError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let sql = format!(
        "SELECT t.*, (SELECT COUNT(*) FROM team_members tm WHERE tm.team_id = t.id) AS member_count
         FROM teams t WHERE t.id IN ({}) ORDER BY t.created_at DESC, t.id",
        placeholders(1, ids.len())
    );
    let mut q = sqlx::query(&sql);
    let strs: Vec<String> = ids.iter().map(Id::to_string).collect();
    for id in &strs {
        q = q.bind(id.as_str());
    }
    q.fetch_all(&state.db.pool)
        .await?
        .iter()
        .map(|row| {
            Ok(TeamWithCount {
                team: Team::from_row(row)?,
                member_count: row.try_get("member_count")?,
            })
        })
        .collect()
}

/// Which notebooks a list shows.
enum ListScope {
    Visible,
    Team(Id),
}

async fn list(
    state: &AppState,
    p: &Principal,
    scope: ListScope,
    params: ListParams,
) -> Result<NotebookList, ApiError> {
    let mut args = Vec::new();
    let mut cond = visible_clause(p, &mut args);
    if let ListScope::Team(team) = scope {
        args.push(Arg::S(team.to_string()));
        cond = format!(
            "{cond} AND n.id IN (SELECT notebook_id FROM notebook_teams WHERE team_id = ${})",
            args.len()
        );
    }
    let total: i64 = bind_all(
        sqlx::query(&format!(
            "SELECT COUNT(*) AS n FROM notebooks n WHERE {cond}"
        )),
        &args,
    )
    .fetch_one(&state.db.pool)
    .await?
    .try_get("n")?;

    let mut notebooks = Vec::new();
    let mut next_page_token = None;
    if params.limit > 0 {
        let mut page_cond = cond.clone();
        if let Some(c) = &params.after {
            args.push(Arg::I(c.created_at));
            let t = args.len();
            args.push(Arg::S(c.id.to_string()));
            let i = args.len();
            page_cond = format!(
                "{page_cond} AND (n.created_at < ${t} OR (n.created_at = ${t} AND n.id > ${i}))"
            );
        }
        let sql = format!(
            "SELECT {NOTEBOOK_COLUMNS} FROM notebooks n WHERE {page_cond}
             ORDER BY n.created_at DESC, n.id ASC LIMIT {}",
            params.limit + 1
        );
        let rows = bind_all(sqlx::query(&sql), &args)
            .fetch_all(&state.db.pool)
            .await?;
        for row in rows.iter().take(params.limit as usize) {
            notebooks.push(Notebook::from_row(row, state.detached_timeout())?);
        }
        if rows.len() as i64 > params.limit {
            next_page_token = notebooks.last().map(|n| {
                Cursor {
                    created_at: n.created_at_ms,
                    id: n.id,
                }
                .encode()
            });
        }
    }
    let (items, included) = build_included(state, notebooks).await?;
    Ok(NotebookList {
        total,
        items,
        included,
        next_page_token,
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
        let exists: Option<String> =
            sqlx::query_scalar("SELECT id FROM teams WHERE id = $1 AND org_id = $2")
                .bind(t.to_string())
                .bind(p.org_id.to_string())
                .fetch_optional(&state.db.pool)
                .await?;
        if exists.is_none() {
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
    let found: Option<String> =
        sqlx::query_scalar("SELECT id FROM workload_configs WHERE id = $1 AND org_id = $2")
            .bind(id.to_string())
            .bind(p.org_id.to_string())
            .fetch_optional(&state.db.pool)
            .await?;
    found
        .map(|_| ())
        .ok_or_else(|| ApiError::invalid("workloadConfigId", "no such workload config"))
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
    Ok(AxumJson(
        list(&state, &p, ListScope::Visible, params).await?,
    ))
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
    let id = Id::random();
    let now = now_ms();
    let me = p.member_id.to_string();
    let mut tx = state.db.pool.begin().await?;
    sqlx::query(
        "INSERT INTO notebooks (id, org_id, member_id, workload_config_id, name, description, status,
            idle_timeout_seconds, created_at, created_by, updated_at, updated_by)
         VALUES ($1, $2, $3, $4, $5, $6, 'stopped', $7, $8, $3, $8, $3)",
    )
    .bind(id.to_string())
    .bind(p.org_id.to_string())
    .bind(me.as_str())
    .bind(body.workload_config_id.to_string())
    .bind(name)
    .bind(description)
    .bind(idle)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    for t in &teams {
        sqlx::query(
            "INSERT INTO notebook_teams (notebook_id, team_id, created_at, created_by, updated_at, updated_by)
             VALUES ($1, $2, $3, $4, $3, $4)",
        )
        .bind(id.to_string())
        .bind(t.to_string())
        .bind(now)
        .bind(me.as_str())
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    let nb = fetch_by_id(&state, id).await?;
    let (mut items, included) = build_included(&state, vec![nb]).await?;
    let item = items
        .pop()
        .ok_or_else(|| ApiError::Internal("created notebook vanished".into()))?;
    Ok((
        StatusCode::CREATED,
        AxumJson(NotebookOne { item, included }),
    ))
}

/// Describe a notebook.
#[utoipa::path(get, path = "/workloads/notebooks/{notebook}", tag = "notebooks",
    params(("notebook" = String, Path, description = "A notebook ID")),
    responses((status = 200, body = NotebookOne), (status = 400), (status = 401), (status = 404)),
    security(("apiKey" = [])))]
pub async fn notebooks_get(
    State(state): State<AppState>,
    p: Principal,
    Path(notebook): Path<String>,
) -> Result<AxumJson<NotebookOne>, ApiError> {
    let id = path_id("notebook", &notebook)?;
    let nb = fetch_visible(&state, &p, id).await?;
    let (mut items, included) = build_included(&state, vec![nb]).await?;
    let item = items.pop().ok_or_else(ApiError::notebook_not_found)?;
    Ok(AxumJson(NotebookOne { item, included }))
}

/// Update name, description, idle timeout; the workload config only when stopped.
#[utoipa::path(patch, path = "/workloads/notebooks/{notebook}", tag = "notebooks",
    params(("notebook" = String, Path, description = "A notebook ID")),
    request_body = UpdateNotebookBody,
    responses((status = 200, body = Notebook), (status = 400), (status = 401), (status = 403), (status = 404), (status = 409)),
    security(("apiKey" = [])))]
pub async fn notebooks_update(
    State(state): State<AppState>,
    p: Principal,
    Path(notebook): Path<String>,
    Json(body): Json<UpdateNotebookBody>,
) -> Result<AxumJson<Notebook>, ApiError> {
    let id = path_id("notebook", &notebook)?;
    let nb = fetch_visible(&state, &p, id).await?;
    may_manage(&p, &nb)?;
    let mut sets = Vec::new();
    let mut args = Vec::new();
    if let Some(name) = &body.name {
        args.push(Arg::S(check_name("name", name)?));
        sets.push(format!("name = ${}", args.len()));
    }
    let mut clear_description = false;
    match check_description(body.description.clone().flatten())? {
        Some(d) => {
            args.push(Arg::S(d));
            sets.push(format!("description = ${}", args.len()));
        }
        None => clear_description = matches!(body.description, Some(None)),
    }
    if clear_description {
        sets.push("description = NULL".into());
    }
    if let Some(v) = body.idle_timeout_seconds {
        args.push(Arg::I(check_idle_timeout(v)?));
        sets.push(format!("idle_timeout_seconds = ${}", args.len()));
    }
    let mut only_when_stopped = false;
    if let Some(cfg) = body.workload_config_id {
        if cfg != nb.workload_config_id {
            check_config(&state, &p, cfg).await?;
            args.push(Arg::S(cfg.to_string()));
            sets.push(format!("workload_config_id = ${}", args.len()));
            only_when_stopped = true;
        }
    }
    args.push(Arg::I(now_ms()));
    sets.push(format!("updated_at = ${}", args.len()));
    args.push(Arg::S(p.member_id.to_string()));
    sets.push(format!("updated_by = ${}", args.len()));
    args.push(Arg::S(id.to_string()));
    let mut sql = format!(
        "UPDATE notebooks SET {} WHERE id = ${}",
        sets.join(", "),
        args.len()
    );
    if only_when_stopped {
        // Conditional on the state in the same statement: a concurrent start cannot slip in
        // between a check and the write.
        sql.push_str(" AND status = 'stopped'");
    }
    let res = bind_all(sqlx::query(&sql), &args)
        .execute(&state.db.pool)
        .await?;
    if res.rows_affected() == 0 {
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
    p: Principal,
    Path(notebook): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id = path_id("notebook", &notebook)?;
    let nb = fetch_visible(&state, &p, id).await?;
    may_manage(&p, &nb)?;
    lifecycle::delete(&state, &nb).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Start: `stopped`/`failed` → `starting`, with a new session id.
#[utoipa::path(post, path = "/workloads/notebooks/{notebook}/start", tag = "notebooks",
    params(("notebook" = String, Path, description = "A notebook ID")),
    responses((status = 200, body = Notebook), (status = 400), (status = 401), (status = 403), (status = 404), (status = 409)),
    security(("apiKey" = [])))]
pub async fn notebooks_start(
    State(state): State<AppState>,
    p: Principal,
    Path(notebook): Path<String>,
) -> Result<AxumJson<Notebook>, ApiError> {
    let id = path_id("notebook", &notebook)?;
    let nb = fetch_visible(&state, &p, id).await?;
    may_manage(&p, &nb)?;
    Ok(AxumJson(lifecycle::start(&state, &nb, p.member_id).await?))
}

/// Stop: `starting`/`running`/`idle`/`detached` → `stopping`.
#[utoipa::path(post, path = "/workloads/notebooks/{notebook}/stop", tag = "notebooks",
    params(("notebook" = String, Path, description = "A notebook ID")),
    responses((status = 200, body = Notebook), (status = 400), (status = 401), (status = 403), (status = 404), (status = 409)),
    security(("apiKey" = [])))]
pub async fn notebooks_stop(
    State(state): State<AppState>,
    p: Principal,
    Path(notebook): Path<String>,
) -> Result<AxumJson<Notebook>, ApiError> {
    let id = path_id("notebook", &notebook)?;
    let nb = fetch_visible(&state, &p, id).await?;
    may_manage(&p, &nb)?;
    Ok(AxumJson(
        lifecycle::stop(&state, &nb, Some(p.member_id), None).await?,
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
    p: Principal,
    Path(notebook): Path<String>,
) -> Result<AxumJson<OpenUrl>, ApiError> {
    let id = path_id("notebook", &notebook)?;
    let nb = fetch_visible(&state, &p, id).await?;
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
    p: Principal,
    Path(notebook): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id = path_id("notebook", &notebook)?;
    let nb = fetch_visible(&state, &p, id).await?;
    if !nb.status.is_up() {
        return Err(not_running(&nb));
    }
    if !lifecycle::record_ping(&state, id).await? {
        // It stopped between the read and the write.
        let nb = fetch_by_id(&state, id).await?;
        return Err(not_running(&nb));
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Teams with access to a notebook.
#[utoipa::path(get, path = "/workloads/notebooks/{notebook}/teams", tag = "notebooks",
    params(("notebook" = String, Path, description = "A notebook ID"), ("limit" = Option<i32>, Query, minimum = 0, maximum = 100)),
    responses((status = 200, body = NotebookTeamList), (status = 400), (status = 401), (status = 404)),
    security(("apiKey" = [])))]
pub async fn notebook_teams_list(
    State(state): State<AppState>,
    p: Principal,
    Path(notebook): Path<String>,
    params: ListParams,
) -> Result<AxumJson<NotebookTeamList>, ApiError> {
    let id = path_id("notebook", &notebook)?;
    fetch_visible(&state, &p, id).await?;
    Ok(AxumJson(NotebookTeamList {
        items: team_links(&state, id, params.limit).await?,
    }))
}

async fn team_links(state: &AppState, id: Id, limit: i64) -> Result<Vec<NotebookTeam>, ApiError> {
    let rows = sqlx::query(&format!(
        "SELECT * FROM notebook_teams WHERE notebook_id = $1 ORDER BY created_at, team_id LIMIT {limit}"
    ))
    .bind(id.to_string())
    .fetch_all(&state.db.pool)
    .await?;
    Ok(rows
        .iter()
        .map(NotebookTeam::from_row)
        .collect::<Result<_, _>>()?)
}

/// Share a notebook with teams (already shared is fine).
#[utoipa::path(post, path = "/workloads/notebooks/{notebook}/teams", tag = "notebooks",
    params(("notebook" = String, Path, description = "A notebook ID")),
    request_body = TeamIdsBody,
    responses((status = 200, body = NotebookTeamList), (status = 400), (status = 401), (status = 403), (status = 404)),
    security(("apiKey" = [])))]
pub async fn notebook_teams_add(
    State(state): State<AppState>,
    p: Principal,
    Path(notebook): Path<String>,
    Json(body): Json<TeamIdsBody>,
) -> Result<AxumJson<NotebookTeamList>, ApiError> {
    let id = path_id("notebook", &notebook)?;
    let nb = fetch_visible(&state, &p, id).await?;
    may_manage(&p, &nb)?;
    let teams = check_teams(&state, &p, &body.team_ids).await?;
    let now = now_ms();
    let mut tx = state.db.pool.begin().await?;
    // New viewers for the edge.
    bump_routes(&mut tx).await?;
    for t in &teams {
        sqlx::query(
            "INSERT INTO notebook_teams (notebook_id, team_id, created_at, created_by, updated_at, updated_by)
             VALUES ($1, $2, $3, $4, $3, $4) ON CONFLICT (notebook_id, team_id) DO NOTHING",
        )
        .bind(id.to_string())
        .bind(t.to_string())
        .bind(now)
        .bind(p.member_id.to_string())
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
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
    p: Principal,
    Path((notebook, team)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let id = path_id("notebook", &notebook)?;
    let team = path_id("team", &team)?;
    let nb = fetch_visible(&state, &p, id).await?;
    may_manage(&p, &nb)?;
    super::unlink(
        &state,
        "DELETE FROM notebook_teams WHERE notebook_id = $1 AND team_id = $2",
        id,
        team,
        ApiError::team_not_found(),
    )
    .await
}

/// Notebooks shared with a team (caller in the team, or an admin).
#[utoipa::path(get, path = "/workloads/teams/{team}/notebooks", tag = "notebooks",
    params(("team" = String, Path, description = "A team ID"), ("limit" = Option<i32>, Query, minimum = 0, maximum = 100), ("pageToken" = Option<String>, Query)),
    responses((status = 200, body = NotebookList), (status = 400), (status = 401), (status = 403), (status = 404)),
    security(("apiKey" = [])))]
pub async fn team_notebooks_list(
    State(state): State<AppState>,
    p: Principal,
    Path(team): Path<String>,
    params: ListParams,
) -> Result<AxumJson<NotebookList>, ApiError> {
    let team = path_id("team", &team)?;
    let exists: Option<String> =
        sqlx::query_scalar("SELECT id FROM teams WHERE id = $1 AND org_id = $2")
            .bind(team.to_string())
            .bind(p.org_id.to_string())
            .fetch_optional(&state.db.pool)
            .await?;
    if exists.is_none() {
        return Err(ApiError::team_not_found());
    }
    if !p.is_admin() && !p.in_team(team) {
        return Err(ApiError::Forbidden(
            "only the team's members and admins may list its notebooks",
        ));
    }
    Ok(AxumJson(
        list(&state, &p, ListScope::Team(team), params).await?,
    ))
}
