//! `/iam/…`: members, teams, team membership and API keys of the caller's organization.
//!
//! Admins manage everything in their organization; any member may read `/iam/me`, manage his
//! own API keys, and read the teams he belongs to. Objects of other organizations are 404.
//! Changes that alter who may see which notebook (team membership, role, member or team
//! deletion) bump the routes version, so edges drop revoked sessions within seconds.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json as AxumJson;
use marina_config::Id;
use sqlx::Row;

use crate::api::configs::{next_token, page_rows};
use crate::api::notebooks::{teams_with_counts, Arg};
use crate::auth::{hash_secret, new_secret, secret_prefix, Principal};
use crate::db::{bump_routes, get_id, now_ms, rfc3339, Db};
use crate::error::{ApiError, StoreError};
use crate::extract::{path_id, Json, ListParams};
use crate::model::*;
use crate::state::AppState;

fn check_label(field: &str, v: &str) -> Result<String, ApiError> {
    let v = v.trim();
    if v.is_empty() || v.chars().count() > 200 || v.chars().any(char::is_control) {
        return Err(ApiError::invalid(
            field,
            "must be 1 to 200 printable characters",
        ));
    }
    Ok(v.to_owned())
}

fn check_email(email: Option<String>) -> Result<Option<String>, ApiError> {
    match email {
        Some(e) => {
            let e = e.trim().to_owned();
            let ok = e.len() <= 254
                && e.split_once('@').is_some_and(|(a, b)| {
                    !a.is_empty() && !b.is_empty() && !e.contains(char::is_whitespace)
                });
            if !ok {
                return Err(ApiError::invalid("email", "must be an email address"));
            }
            Ok(Some(e))
        }
        None => Ok(None),
    }
}

async fn fetch_member(state: &AppState, p: &Principal, id: Id) -> Result<Member, ApiError> {
    let row = sqlx::query("SELECT * FROM members WHERE id = $1 AND org_id = $2")
        .bind(id.to_string())
        .bind(p.org_id.to_string())
        .fetch_optional(&state.db.pool)
        .await?
        .ok_or_else(ApiError::member_not_found)?;
    Ok(Member::from_row(&row)?)
}

async fn fetch_team(state: &AppState, p: &Principal, id: Id) -> Result<Team, ApiError> {
    let row = sqlx::query("SELECT * FROM teams WHERE id = $1 AND org_id = $2")
        .bind(id.to_string())
        .bind(p.org_id.to_string())
        .fetch_optional(&state.db.pool)
        .await?
        .ok_or_else(ApiError::team_not_found)?;
    Ok(Team::from_row(&row)?)
}

/// Self or an admin.
fn self_or_admin(p: &Principal, member: Id) -> Result<(), ApiError> {
    if p.is_admin() || p.member_id == member {
        Ok(())
    } else {
        Err(ApiError::Forbidden("only admins may manage other members"))
    }
}

/// The caller.
#[utoipa::path(get, path = "/iam/me", tag = "iam",
    responses((status = 200, body = Me), (status = 401)), security(("apiKey" = [])))]
pub async fn me_get(State(state): State<AppState>, p: Principal) -> Result<AxumJson<Me>, ApiError> {
    let member = fetch_member(&state, &p, p.member_id).await?;
    Ok(AxumJson(Me {
        member,
        team_ids: p.team_ids.clone(),
    }))
}

/// List members (admins).
#[utoipa::path(get, path = "/iam/members", tag = "iam",
    params(("limit" = Option<i32>, Query, minimum = 0, maximum = 100), ("pageToken" = Option<String>, Query)),
    responses((status = 200, body = Page<Member>), (status = 400), (status = 401), (status = 403)),
    security(("apiKey" = [])))]
pub async fn members_list(
    State(state): State<AppState>,
    p: Principal,
    params: ListParams,
) -> Result<AxumJson<Page<Member>>, ApiError> {
    p.require_admin()?;
    let (total, rows, more) = page_rows(
        &state,
        "members",
        "org_id = $1",
        vec![Arg::S(p.org_id.to_string())],
        &params,
    )
    .await?;
    let items = rows
        .iter()
        .map(Member::from_row)
        .collect::<Result<Vec<_>, _>>()?;
    let next_page_token = next_token(more, items.last().map(|m| (m.created_at_ms, m.id)));
    Ok(AxumJson(Page {
        total,
        items,
        next_page_token,
    }))
}

/// Add a member (admins).
#[utoipa::path(post, path = "/iam/members", tag = "iam", request_body = CreateMemberBody,
    responses((status = 201, body = Member), (status = 400), (status = 401), (status = 403)),
    security(("apiKey" = [])))]
pub async fn members_create(
    State(state): State<AppState>,
    p: Principal,
    Json(body): Json<CreateMemberBody>,
) -> Result<impl IntoResponse, ApiError> {
    p.require_admin()?;
    let name = check_label("name", &body.name)?;
    let email = check_email(body.email)?;
    let role = body.role.unwrap_or(Role::Member);
    let id = Id::random();
    let now = now_ms();
    let mut tx = state.db.pool.begin().await?;
    // A new admin is a new viewer of every running notebook of the organization.
    bump_routes(&mut tx).await?;
    sqlx::query(
        "INSERT INTO members (id, org_id, name, email, role, created_at, created_by, updated_at, updated_by)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $6, $7)",
    )
    .bind(id.to_string())
    .bind(p.org_id.to_string())
    .bind(name)
    .bind(email)
    .bind(role.as_str())
    .bind(now)
    .bind(p.member_id.to_string())
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    state.routes_changed.notify_waiters();
    Ok((
        StatusCode::CREATED,
        AxumJson(fetch_member(&state, &p, id).await?),
    ))
}

/// Describe a member (admins, or the member himself).
#[utoipa::path(get, path = "/iam/members/{member}", tag = "iam",
    params(("member" = String, Path, description = "A member ID")),
    responses((status = 200, body = Member), (status = 400), (status = 401), (status = 403), (status = 404)),
    security(("apiKey" = [])))]
pub async fn members_get(
    State(state): State<AppState>,
    p: Principal,
    Path(member): Path<String>,
) -> Result<AxumJson<Member>, ApiError> {
    let id = path_id("member", &member)?;
    let m = fetch_member(&state, &p, id).await?;
    self_or_admin(&p, id)?;
    Ok(AxumJson(m))
}

/// Count of admins of an organization, inside a transaction.
async fn admin_count(conn: &mut sqlx::AnyConnection, org: Id) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT COUNT(*) FROM members WHERE org_id = $1 AND role = 'admin'")
        .bind(org.to_string())
        .fetch_one(conn)
        .await
}

fn last_admin() -> ApiError {
    ApiError::conflict("last_admin", "an organization must keep at least one admin")
}

/// Change a member's name, email or role (admins).
#[utoipa::path(patch, path = "/iam/members/{member}", tag = "iam",
    params(("member" = String, Path, description = "A member ID")), request_body = UpdateMemberBody,
    responses((status = 200, body = Member), (status = 400), (status = 401), (status = 403), (status = 404), (status = 409)),
    security(("apiKey" = [])))]
pub async fn members_update(
    State(state): State<AppState>,
    p: Principal,
    Path(member): Path<String>,
    Json(body): Json<UpdateMemberBody>,
) -> Result<AxumJson<Member>, ApiError> {
    let id = path_id("member", &member)?;
    let current = fetch_member(&state, &p, id).await?;
    p.require_admin()?;
    let name = match &body.name {
        Some(n) => check_label("name", n)?,
        None => current.name,
    };
    let email = match body.email {
        Some(e) => check_email(e)?,
        None => current.email,
    };
    let role = body.role.unwrap_or(current.role);
    let mut tx = state.db.pool.begin().await?;
    bump_routes(&mut tx).await?;
    sqlx::query(
        "UPDATE members SET name = $1, email = $2, role = $3, updated_at = $4, updated_by = $5
         WHERE id = $6 AND org_id = $7",
    )
    .bind(name)
    .bind(email)
    .bind(role.as_str())
    .bind(now_ms())
    .bind(p.member_id.to_string())
    .bind(id.to_string())
    .bind(p.org_id.to_string())
    .execute(&mut *tx)
    .await?;
    // Checked after the write, in the same transaction. The routes-version bump that opened
    // the transaction holds that row's lock until commit, so role changes and member
    // deletions run one after the other (also under PostgreSQL's read committed), and two
    // admins demoting each other at once cannot both pass the check.
    if admin_count(&mut tx, p.org_id).await? == 0 {
        tx.rollback().await?;
        return Err(last_admin());
    }
    tx.commit().await?;
    state.routes_changed.notify_waiters();
    Ok(AxumJson(fetch_member(&state, &p, id).await?))
}

/// Remove a member (admins): his API keys and team memberships go too. 409 while he owns
/// notebooks, or if he is the last admin.
#[utoipa::path(delete, path = "/iam/members/{member}", tag = "iam",
    params(("member" = String, Path, description = "A member ID")),
    responses((status = 204), (status = 400), (status = 401), (status = 403), (status = 404), (status = 409)),
    security(("apiKey" = [])))]
pub async fn members_delete(
    State(state): State<AppState>,
    p: Principal,
    Path(member): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id = path_id("member", &member)?;
    fetch_member(&state, &p, id).await?;
    p.require_admin()?;
    let mut tx = state.db.pool.begin().await?;
    bump_routes(&mut tx).await?;
    let owned: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM notebooks WHERE member_id = $1")
        .bind(id.to_string())
        .fetch_one(&mut *tx)
        .await?;
    if owned > 0 {
        tx.rollback().await?;
        return Err(ApiError::conflict(
            "member_owns_notebooks",
            format!("the member owns {owned} notebook(s); delete them first"),
        ));
    }
    sqlx::query("DELETE FROM members WHERE id = $1 AND org_id = $2")
        .bind(id.to_string())
        .bind(p.org_id.to_string())
        .execute(&mut *tx)
        .await?;
    if admin_count(&mut tx, p.org_id).await? == 0 {
        tx.rollback().await?;
        return Err(last_admin());
    }
    tx.commit().await?;
    state.routes_changed.notify_waiters();
    Ok(StatusCode::NO_CONTENT)
}

/// List teams (admins) with member counts.
#[utoipa::path(get, path = "/iam/teams", tag = "iam",
    params(("limit" = Option<i32>, Query, minimum = 0, maximum = 100), ("pageToken" = Option<String>, Query)),
    responses((status = 200, body = Page<TeamWithCount>), (status = 400), (status = 401), (status = 403)),
    security(("apiKey" = [])))]
pub async fn teams_list(
    State(state): State<AppState>,
    p: Principal,
    params: ListParams,
) -> Result<AxumJson<Page<TeamWithCount>>, ApiError> {
    p.require_admin()?;
    let (total, rows, more) = page_rows(
        &state,
        "teams",
        "org_id = $1",
        vec![Arg::S(p.org_id.to_string())],
        &params,
    )
    .await?;
    let ids = rows
        .iter()
        .map(|r| get_id(r, "id"))
        .collect::<Result<Vec<_>, _>>()?;
    let mut items = teams_with_counts(&state, &ids).await?;
    // teams_with_counts orders like the page (created_at desc, id), but be explicit.
    items.sort_by_key(|t| ids.iter().position(|i| *i == t.team.id));
    let next_page_token = next_token(
        more,
        items.last().map(|t| (t.team.created_at_ms, t.team.id)),
    );
    Ok(AxumJson(Page {
        total,
        items,
        next_page_token,
    }))
}

/// Create a team (admins).
#[utoipa::path(post, path = "/iam/teams", tag = "iam", request_body = TeamBody,
    responses((status = 201, body = Team), (status = 400), (status = 401), (status = 403)),
    security(("apiKey" = [])))]
pub async fn teams_create(
    State(state): State<AppState>,
    p: Principal,
    Json(body): Json<TeamBody>,
) -> Result<impl IntoResponse, ApiError> {
    p.require_admin()?;
    let name = check_label("name", &body.name)?;
    let id = Id::random();
    let now = now_ms();
    sqlx::query(
        "INSERT INTO teams (id, org_id, name, created_at, created_by, updated_at, updated_by)
         VALUES ($1, $2, $3, $4, $5, $4, $5)",
    )
    .bind(id.to_string())
    .bind(p.org_id.to_string())
    .bind(name)
    .bind(now)
    .bind(p.member_id.to_string())
    .execute(&state.db.pool)
    .await?;
    Ok((
        StatusCode::CREATED,
        AxumJson(fetch_team(&state, &p, id).await?),
    ))
}

/// Describe a team (admins and its members).
#[utoipa::path(get, path = "/iam/teams/{team}", tag = "iam",
    params(("team" = String, Path, description = "A team ID")),
    responses((status = 200, body = TeamWithCount), (status = 400), (status = 401), (status = 403), (status = 404)),
    security(("apiKey" = [])))]
pub async fn teams_get(
    State(state): State<AppState>,
    p: Principal,
    Path(team): Path<String>,
) -> Result<AxumJson<TeamWithCount>, ApiError> {
    let id = path_id("team", &team)?;
    fetch_team(&state, &p, id).await?;
    if !p.is_admin() && !p.in_team(id) {
        return Err(ApiError::Forbidden(
            "only admins and the team's members may see it",
        ));
    }
    let mut t = teams_with_counts(&state, &[id]).await?;
    t.pop().map(AxumJson).ok_or_else(ApiError::team_not_found)
}

/// Rename a team (admins).
#[utoipa::path(patch, path = "/iam/teams/{team}", tag = "iam",
    params(("team" = String, Path, description = "A team ID")), request_body = TeamBody,
    responses((status = 200, body = Team), (status = 400), (status = 401), (status = 403), (status = 404)),
    security(("apiKey" = [])))]
pub async fn teams_update(
    State(state): State<AppState>,
    p: Principal,
    Path(team): Path<String>,
    Json(body): Json<TeamBody>,
) -> Result<AxumJson<Team>, ApiError> {
    let id = path_id("team", &team)?;
    fetch_team(&state, &p, id).await?;
    p.require_admin()?;
    let name = check_label("name", &body.name)?;
    sqlx::query("UPDATE teams SET name = $1, updated_at = $2, updated_by = $3 WHERE id = $4 AND org_id = $5")
        .bind(name)
        .bind(now_ms())
        .bind(p.member_id.to_string())
        .bind(id.to_string())
        .bind(p.org_id.to_string())
        .execute(&state.db.pool)
        .await?;
    Ok(AxumJson(fetch_team(&state, &p, id).await?))
}

/// Delete a team (admins): notebooks shared with it are unshared, its members lose that
/// access.
#[utoipa::path(delete, path = "/iam/teams/{team}", tag = "iam",
    params(("team" = String, Path, description = "A team ID")),
    responses((status = 204), (status = 400), (status = 401), (status = 403), (status = 404)),
    security(("apiKey" = [])))]
pub async fn teams_delete(
    State(state): State<AppState>,
    p: Principal,
    Path(team): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id = path_id("team", &team)?;
    fetch_team(&state, &p, id).await?;
    p.require_admin()?;
    let mut tx = state.db.pool.begin().await?;
    bump_routes(&mut tx).await?;
    for sql in [
        "DELETE FROM notebook_teams WHERE team_id = $1",
        "DELETE FROM team_members WHERE team_id = $1",
        "DELETE FROM teams WHERE id = $1",
    ] {
        sqlx::query(sql)
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    state.routes_changed.notify_waiters();
    Ok(StatusCode::NO_CONTENT)
}

async fn team_members(state: &AppState, team: Id) -> Result<Vec<TeamMember>, ApiError> {
    let rows =
        sqlx::query("SELECT * FROM team_members WHERE team_id = $1 ORDER BY created_at, member_id")
            .bind(team.to_string())
            .fetch_all(&state.db.pool)
            .await?;
    rows.iter()
        .map(|r| {
            Ok(TeamMember {
                team_id: get_id(r, "team_id")?,
                member_id: get_id(r, "member_id")?,
                created_at: rfc3339(r.try_get("created_at")?),
                created_by: crate::db::get_opt_id(r, "created_by")?,
            })
        })
        .collect()
}

/// A team's members (admins and its members).
#[utoipa::path(get, path = "/iam/teams/{team}/members", tag = "iam",
    params(("team" = String, Path, description = "A team ID")),
    responses((status = 200, body = Items<TeamMember>), (status = 400), (status = 401), (status = 403), (status = 404)),
    security(("apiKey" = [])))]
pub async fn team_members_list(
    State(state): State<AppState>,
    p: Principal,
    Path(team): Path<String>,
) -> Result<AxumJson<Items<TeamMember>>, ApiError> {
    let id = path_id("team", &team)?;
    fetch_team(&state, &p, id).await?;
    if !p.is_admin() && !p.in_team(id) {
        return Err(ApiError::Forbidden(
            "only admins and the team's members may see it",
        ));
    }
    Ok(AxumJson(Items {
        items: team_members(&state, id).await?,
    }))
}

/// Add members to a team (admins); already there is fine.
#[utoipa::path(post, path = "/iam/teams/{team}/members", tag = "iam",
    params(("team" = String, Path, description = "A team ID")), request_body = MemberIdsBody,
    responses((status = 200, body = Items<TeamMember>), (status = 400), (status = 401), (status = 403), (status = 404)),
    security(("apiKey" = [])))]
pub async fn team_members_add(
    State(state): State<AppState>,
    p: Principal,
    Path(team): Path<String>,
    Json(body): Json<MemberIdsBody>,
) -> Result<AxumJson<Items<TeamMember>>, ApiError> {
    let id = path_id("team", &team)?;
    fetch_team(&state, &p, id).await?;
    p.require_admin()?;
    if body.member_ids.len() > 1000 {
        return Err(ApiError::invalid("memberIds", "at most 1000 members"));
    }
    for (i, m) in body.member_ids.iter().enumerate() {
        let found: Option<String> =
            sqlx::query_scalar("SELECT id FROM members WHERE id = $1 AND org_id = $2")
                .bind(m.to_string())
                .bind(p.org_id.to_string())
                .fetch_optional(&state.db.pool)
                .await?;
        if found.is_none() {
            return Err(ApiError::invalid(
                format!("memberIds[{i}]"),
                "no such member",
            ));
        }
    }
    let now = now_ms();
    let mut tx = state.db.pool.begin().await?;
    bump_routes(&mut tx).await?;
    for m in &body.member_ids {
        sqlx::query(
            "INSERT INTO team_members (team_id, member_id, created_at, created_by) VALUES ($1, $2, $3, $4)
             ON CONFLICT (team_id, member_id) DO NOTHING",
        )
        .bind(id.to_string())
        .bind(m.to_string())
        .bind(now)
        .bind(p.member_id.to_string())
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    state.routes_changed.notify_waiters();
    Ok(AxumJson(Items {
        items: team_members(&state, id).await?,
    }))
}

/// Remove a member from a team (admins); he loses what the team gave him access to.
#[utoipa::path(delete, path = "/iam/teams/{team}/members/{member}", tag = "iam",
    params(("team" = String, Path, description = "A team ID"), ("member" = String, Path, description = "A member ID")),
    responses((status = 204), (status = 400), (status = 401), (status = 403), (status = 404)),
    security(("apiKey" = [])))]
pub async fn team_members_remove(
    State(state): State<AppState>,
    p: Principal,
    Path((team, member)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let id = path_id("team", &team)?;
    let member = path_id("member", &member)?;
    fetch_team(&state, &p, id).await?;
    p.require_admin()?;
    super::unlink(
        &state,
        "DELETE FROM team_members WHERE team_id = $1 AND member_id = $2",
        id,
        member,
        ApiError::member_not_found(),
    )
    .await
}

/// A member's API keys (the member himself or an admin).
#[utoipa::path(get, path = "/iam/members/{member}/api-keys", tag = "iam",
    params(("member" = String, Path, description = "A member ID")),
    responses((status = 200, body = Items<ApiKey>), (status = 400), (status = 401), (status = 403), (status = 404)),
    security(("apiKey" = [])))]
pub async fn api_keys_list(
    State(state): State<AppState>,
    p: Principal,
    Path(member): Path<String>,
) -> Result<AxumJson<Items<ApiKey>>, ApiError> {
    let id = path_id("member", &member)?;
    fetch_member(&state, &p, id).await?;
    self_or_admin(&p, id)?;
    let rows =
        sqlx::query("SELECT * FROM api_keys WHERE member_id = $1 ORDER BY created_at DESC, id")
            .bind(id.to_string())
            .fetch_all(&state.db.pool)
            .await?;
    Ok(AxumJson(Items {
        items: rows
            .iter()
            .map(ApiKey::from_row)
            .collect::<Result<_, _>>()?,
    }))
}

/// Create an API key; the response carries its secret, this once.
#[utoipa::path(post, path = "/iam/members/{member}/api-keys", tag = "iam",
    params(("member" = String, Path, description = "A member ID")), request_body = CreateApiKeyBody,
    responses((status = 201, body = CreatedApiKey), (status = 400), (status = 401), (status = 403), (status = 404)),
    security(("apiKey" = [])))]
pub async fn api_keys_create(
    State(state): State<AppState>,
    p: Principal,
    Path(member): Path<String>,
    Json(body): Json<CreateApiKeyBody>,
) -> Result<impl IntoResponse, ApiError> {
    let id = path_id("member", &member)?;
    fetch_member(&state, &p, id).await?;
    self_or_admin(&p, id)?;
    let name = check_label("name", &body.name)?;
    let (api_key, secret) = insert_api_key(&state.db, id, &name, Some(p.member_id)).await?;
    Ok((
        StatusCode::CREATED,
        AxumJson(CreatedApiKey { api_key, secret }),
    ))
}

/// Revoke an API key (the member himself or an admin). Effective at once: every request
/// looks its key up.
#[utoipa::path(delete, path = "/iam/members/{member}/api-keys/{key}", tag = "iam",
    params(("member" = String, Path, description = "A member ID"), ("key" = String, Path, description = "An API key ID")),
    responses((status = 204), (status = 400), (status = 401), (status = 403), (status = 404)),
    security(("apiKey" = [])))]
pub async fn api_keys_delete(
    State(state): State<AppState>,
    p: Principal,
    Path((member, key)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let id = path_id("member", &member)?;
    let key = path_id("key", &key)?;
    fetch_member(&state, &p, id).await?;
    self_or_admin(&p, id)?;
    let res = sqlx::query("DELETE FROM api_keys WHERE id = $1 AND member_id = $2")
        .bind(key.to_string())
        .bind(id.to_string())
        .execute(&state.db.pool)
        .await?;
    if res.rows_affected() == 0 {
        return Err(ApiError::NotFound {
            code: "api_key_not_found",
            what: "API key",
        });
    }
    Ok(StatusCode::NO_CONTENT)
}

// === Store functions used outside requests (bootstrap, admin CLI) ===

/// Stores a new key for `member`; returns its metadata and the secret.
pub async fn insert_api_key(
    db: &Db,
    member: Id,
    name: &str,
    created_by: Option<Id>,
) -> Result<(ApiKey, String), StoreError> {
    let secret = new_secret();
    let id = Id::random();
    sqlx::query(
        "INSERT INTO api_keys (id, member_id, name, hash, prefix, created_at, created_by)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(id.to_string())
    .bind(member.to_string())
    .bind(name)
    .bind(hash_secret(&secret))
    .bind(secret_prefix(&secret))
    .bind(now_ms())
    .bind(created_by.map(|c| c.to_string()))
    .execute(&db.pool)
    .await?;
    let row = sqlx::query("SELECT * FROM api_keys WHERE id = $1")
        .bind(id.to_string())
        .fetch_one(&db.pool)
        .await?;
    Ok((ApiKey::from_row(&row)?, secret))
}

/// A new organization with one admin member and an API key for him.
pub struct NewOrganization {
    pub organization_id: Id,
    pub admin_member_id: Id,
    pub admin_key: String,
}

/// Creates an organization, its first admin and his key. When `once` is given, does so only
/// if that marker was never set (the empty-database bootstrap: two replicas starting at once
/// create one organization, not two); returns `None` then.
pub async fn create_organization(
    db: &Db,
    name: &str,
    admin_name: &str,
    once: Option<&str>,
) -> Result<Option<NewOrganization>, StoreError> {
    let org = Id::random();
    let admin = Id::random();
    let now = now_ms();
    let mut tx = db.pool.begin().await?;
    if let Some(marker) = once {
        let res = sqlx::query(
            "INSERT INTO meta (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
        )
        .bind(marker)
        .bind(org.to_string())
        .execute(&mut *tx)
        .await?;
        if res.rows_affected() == 0 {
            tx.rollback().await?;
            return Ok(None);
        }
    }
    sqlx::query("INSERT INTO organizations (id, name, created_at) VALUES ($1, $2, $3)")
        .bind(org.to_string())
        .bind(name)
        .bind(now)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "INSERT INTO members (id, org_id, name, email, role, created_at, created_by, updated_at, updated_by)
         VALUES ($1, $2, $3, NULL, 'admin', $4, NULL, $4, NULL)",
    )
    .bind(admin.to_string())
    .bind(org.to_string())
    .bind(admin_name)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    let secret = new_secret();
    sqlx::query(
        "INSERT INTO api_keys (id, member_id, name, hash, prefix, created_at, created_by)
         VALUES ($1, $2, 'bootstrap', $3, $4, $5, NULL)",
    )
    .bind(Id::random().to_string())
    .bind(admin.to_string())
    .bind(hash_secret(&secret))
    .bind(secret_prefix(&secret))
    .bind(now)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Some(NewOrganization {
        organization_id: org,
        admin_member_id: admin,
        admin_key: secret,
    }))
}
