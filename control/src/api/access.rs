//! What a request may touch: extractors that turn the `{notebook}` path parameter into a
//! notebook the caller may see ([`VisibleNotebook`]) or may manage ([`ManagedNotebook`]),
//! and `{member}`, `{team}`, `{config}` into an object of the caller's organization
//! ([`OrgMember`], [`OrgTeam`], [`OrgConfig`]; 404 otherwise, the role checks that follow
//! stay in the handlers, which differ in them).
//!
//! They replace the opening every notebook handler had (authenticate, parse the path id,
//! fetch through the visibility clause, check the right to manage) with one place, in the
//! same order and with the same errors: 401/429 from [`Principal`], 400 naming the path
//! parameter, 404 `notebook_not_found` for a notebook that is absent *or* not visible (also
//! across organizations), then 403 when the caller may see but not manage it. Every id in
//! the path (`{notebook}`, `{team}`, `{member}`, `{key}`, `{config}`) is checked before the
//! lookup, in path order, as the handlers did.

use axum::extract::{FromRequestParts, RawPathParams};
use axum::http::request::Parts;
use marina_config::Id;

use crate::auth::Principal;
use crate::error::ApiError;
use crate::extract::path_id;
use crate::model::{Member, Notebook, Team, WorkloadConfig};
use crate::state::AppState;
use crate::store;

/// A notebook the caller may see, and the caller.
pub struct VisibleNotebook {
    pub principal: Principal,
    pub notebook: Notebook,
}

/// A notebook the caller may change (its owner or an org admin), and the caller.
pub struct ManagedNotebook {
    pub principal: Principal,
    pub notebook: Notebook,
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

/// The id parameters of the path, each checked (400 naming the first bad one).
struct PathIds(Vec<(&'static str, Id)>);

impl PathIds {
    async fn from_parts(parts: &mut Parts, state: &AppState) -> Result<PathIds, ApiError> {
        let params = RawPathParams::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::Internal(format!("path parameters: {e}")))?;
        let mut ids = Vec::new();
        for (name, value) in &params {
            let field = match name {
                "notebook" => "notebook",
                "team" => "team",
                "member" => "member",
                "key" => "key",
                "config" => "config",
                _ => continue,
            };
            ids.push((field, path_id(field, value)?));
        }
        Ok(PathIds(ids))
    }

    /// The id named `name` (a route without it is a bug: 500).
    fn get(&self, name: &'static str) -> Result<Id, ApiError> {
        self.0
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, id)| *id)
            .ok_or_else(|| ApiError::Internal(format!("route has no {{{name}}} parameter")))
    }
}

async fn notebook_path_id(parts: &mut Parts, state: &AppState) -> Result<Id, ApiError> {
    PathIds::from_parts(parts, state).await?.get("notebook")
}

impl FromRequestParts<AppState> for VisibleNotebook {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let principal = Principal::from_request_parts(parts, state).await?;
        let id = notebook_path_id(parts, state).await?;
        let notebook = store::notebooks::fetch_visible(
            &state.db,
            &principal.viewer(),
            id,
            state.detached_timeout(),
        )
        .await?
        .ok_or_else(ApiError::notebook_not_found)?;
        Ok(VisibleNotebook {
            principal,
            notebook,
        })
    }
}

impl FromRequestParts<AppState> for ManagedNotebook {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let VisibleNotebook {
            principal,
            notebook,
        } = VisibleNotebook::from_request_parts(parts, state).await?;
        may_manage(&principal, &notebook)?;
        Ok(ManagedNotebook {
            principal,
            notebook,
        })
    }
}

/// A member of the caller's organization (`{member}`), and the caller.
pub struct OrgMember {
    pub principal: Principal,
    pub member: Member,
}

/// A team of the caller's organization (`{team}`), and the caller.
pub struct OrgTeam {
    pub principal: Principal,
    pub team: Team,
}

/// A workload config of the caller's organization (`{config}`), and the caller.
pub struct OrgConfig {
    pub principal: Principal,
    pub config: WorkloadConfig,
}

impl FromRequestParts<AppState> for OrgMember {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let principal = Principal::from_request_parts(parts, state).await?;
        let id = PathIds::from_parts(parts, state).await?.get("member")?;
        let member = store::members::fetch(&state.db, principal.org_id, id)
            .await?
            .ok_or_else(ApiError::member_not_found)?;
        Ok(OrgMember { principal, member })
    }
}

impl FromRequestParts<AppState> for OrgTeam {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let principal = Principal::from_request_parts(parts, state).await?;
        let id = PathIds::from_parts(parts, state).await?.get("team")?;
        let team = store::teams::fetch(&state.db, principal.org_id, id)
            .await?
            .ok_or_else(ApiError::team_not_found)?;
        Ok(OrgTeam { principal, team })
    }
}

impl FromRequestParts<AppState> for OrgConfig {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let principal = Principal::from_request_parts(parts, state).await?;
        let id = PathIds::from_parts(parts, state).await?.get("config")?;
        let config = store::configs::fetch(&state.db, principal.org_id, id)
            .await?
            .ok_or_else(ApiError::config_not_found)?;
        Ok(OrgConfig { principal, config })
    }
}
