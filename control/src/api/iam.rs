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

use crate::api::access::{OrgMember, OrgTeam};
use crate::auth::Principal;
use crate::error::ApiError;
use crate::extract::{path_id, Json, ListParams};
use crate::model::*;
use crate::state::AppState;
use crate::store::members::{MemberFields, Outcome};
use crate::store::{keys, members, teams};

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
    members::fetch(&state.db, p.org_id, id)
        .await?
        .ok_or_else(ApiError::member_not_found)
}

async fn fetch_team(state: &AppState, p: &Principal, id: Id) -> Result<Team, ApiError> {
    teams::fetch(&state.db, p.org_id, id)
        .await?
        .ok_or_else(ApiError::team_not_found)
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
    Ok(AxumJson(
        members::page(&state.db, p.org_id, (&params).into()).await?,
    ))
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
    // A new admin is a new viewer of every running notebook of the organization.
    let id = members::insert(
        &state.db,
        p.org_id,
        MemberFields { name, email, role },
        p.member_id,
    )
    .await?;
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
pub async fn members_get(access: OrgMember) -> Result<AxumJson<Member>, ApiError> {
    self_or_admin(&access.principal, access.member.id)?;
    Ok(AxumJson(access.member))
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
    access: OrgMember,
    Json(body): Json<UpdateMemberBody>,
) -> Result<AxumJson<Member>, ApiError> {
    let id = access.member.id;
    let current = access.member;
    let p = access.principal;
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
    let fields = MemberFields { name, email, role };
    if members::update(&state.db, p.org_id, id, fields, p.member_id).await? == Outcome::LastAdmin {
        return Err(last_admin());
    }
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
    access: OrgMember,
) -> Result<StatusCode, ApiError> {
    let id = access.member.id;
    let p = access.principal;
    p.require_admin()?;
    match members::delete(&state.db, p.org_id, id).await? {
        Outcome::Done => {}
        Outcome::LastAdmin => return Err(last_admin()),
        Outcome::OwnsNotebooks(owned) => {
            return Err(ApiError::conflict(
                "member_owns_notebooks",
                format!("the member owns {owned} notebook(s); delete them first"),
            ))
        }
    }
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
    Ok(AxumJson(
        teams::page(&state.db, p.org_id, (&params).into()).await?,
    ))
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
    let id = teams::insert(&state.db, p.org_id, &name, p.member_id).await?;
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
    access: OrgTeam,
) -> Result<AxumJson<TeamWithCount>, ApiError> {
    let id = access.team.id;
    let p = access.principal;
    if !p.is_admin() && !p.in_team(id) {
        return Err(ApiError::Forbidden(
            "only admins and the team's members may see it",
        ));
    }
    let mut t = teams::with_counts(&state.db, &[id]).await?;
    t.pop().map(AxumJson).ok_or_else(ApiError::team_not_found)
}

/// Rename a team (admins).
#[utoipa::path(patch, path = "/iam/teams/{team}", tag = "iam",
    params(("team" = String, Path, description = "A team ID")), request_body = TeamBody,
    responses((status = 200, body = Team), (status = 400), (status = 401), (status = 403), (status = 404)),
    security(("apiKey" = [])))]
pub async fn teams_update(
    State(state): State<AppState>,
    access: OrgTeam,
    Json(body): Json<TeamBody>,
) -> Result<AxumJson<Team>, ApiError> {
    let id = access.team.id;
    let p = access.principal;
    p.require_admin()?;
    let name = check_label("name", &body.name)?;
    teams::rename(&state.db, p.org_id, id, &name, p.member_id).await?;
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
    access: OrgTeam,
) -> Result<StatusCode, ApiError> {
    let id = access.team.id;
    let p = access.principal;
    p.require_admin()?;
    teams::delete(&state.db, id).await?;
    state.routes_changed.notify_waiters();
    Ok(StatusCode::NO_CONTENT)
}

async fn team_members(state: &AppState, team: Id) -> Result<Vec<TeamMember>, ApiError> {
    Ok(teams::members(&state.db, team).await?)
}

/// A team's members (admins and its members).
#[utoipa::path(get, path = "/iam/teams/{team}/members", tag = "iam",
    params(("team" = String, Path, description = "A team ID")),
    responses((status = 200, body = Items<TeamMember>), (status = 400), (status = 401), (status = 403), (status = 404)),
    security(("apiKey" = [])))]
pub async fn team_members_list(
    State(state): State<AppState>,
    access: OrgTeam,
) -> Result<AxumJson<Items<TeamMember>>, ApiError> {
    let id = access.team.id;
    let p = access.principal;
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
    access: OrgTeam,
    Json(body): Json<MemberIdsBody>,
) -> Result<AxumJson<Items<TeamMember>>, ApiError> {
    let id = access.team.id;
    let p = access.principal;
    p.require_admin()?;
    if body.member_ids.len() > 1000 {
        return Err(ApiError::invalid("memberIds", "at most 1000 members"));
    }
    for (i, m) in body.member_ids.iter().enumerate() {
        if !members::exists(&state.db, p.org_id, *m).await? {
            return Err(ApiError::invalid(
                format!("memberIds[{i}]"),
                "no such member",
            ));
        }
    }
    teams::add_members(&state.db, id, &body.member_ids, p.member_id).await?;
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
    access: OrgTeam,
    Path(ids): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let id = access.team.id;
    let p = access.principal;
    // Checked already (with the team id, before the lookup).
    let member = path_id("member", &ids.1)?;
    p.require_admin()?;
    if !teams::remove_member(&state.db, id, member).await? {
        return Err(ApiError::member_not_found());
    }
    state.routes_changed.notify_waiters();
    Ok(StatusCode::NO_CONTENT)
}

/// A member's API keys (the member himself or an admin).
#[utoipa::path(get, path = "/iam/members/{member}/api-keys", tag = "iam",
    params(("member" = String, Path, description = "A member ID")),
    responses((status = 200, body = Items<ApiKey>), (status = 400), (status = 401), (status = 403), (status = 404)),
    security(("apiKey" = [])))]
pub async fn api_keys_list(
    State(state): State<AppState>,
    access: OrgMember,
) -> Result<AxumJson<Items<ApiKey>>, ApiError> {
    let id = access.member.id;
    let p = access.principal;
    self_or_admin(&p, id)?;
    Ok(AxumJson(Items {
        items: keys::list(&state.db, id).await?,
    }))
}

/// Create an API key; the response carries its secret, this once.
#[utoipa::path(post, path = "/iam/members/{member}/api-keys", tag = "iam",
    params(("member" = String, Path, description = "A member ID")), request_body = CreateApiKeyBody,
    responses((status = 201, body = CreatedApiKey), (status = 400), (status = 401), (status = 403), (status = 404)),
    security(("apiKey" = [])))]
pub async fn api_keys_create(
    State(state): State<AppState>,
    access: OrgMember,
    Json(body): Json<CreateApiKeyBody>,
) -> Result<impl IntoResponse, ApiError> {
    let id = access.member.id;
    let p = access.principal;
    self_or_admin(&p, id)?;
    let name = check_label("name", &body.name)?;
    let (api_key, secret) = crate::auth::issue_key(&state.db, id, &name, Some(p.member_id)).await?;
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
    access: OrgMember,
    Path(ids): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let id = access.member.id;
    let p = access.principal;
    // Checked already (with the member id, before the lookup).
    let key = path_id("key", &ids.1)?;
    self_or_admin(&p, id)?;
    if !keys::delete(&state.db, key, id).await? {
        return Err(ApiError::NotFound {
            code: "api_key_not_found",
            what: "API key",
        });
    }
    Ok(StatusCode::NO_CONTENT)
}
