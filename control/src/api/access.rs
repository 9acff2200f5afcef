//! What a request may touch: extractors that turn the `{notebook}` path parameter into a
//! notebook the caller may see ([`VisibleNotebook`]) or may manage ([`ManagedNotebook`]).
//!
//! They replace the opening every notebook handler had (authenticate, parse the path id,
//! fetch through the visibility clause, check the right to manage) with one place, in the
//! same order and with the same errors: 401/429 from [`Principal`], 400 naming the path
//! parameter, 404 `notebook_not_found` for a notebook that is absent *or* not visible (also
//! across organizations), then 403 when the caller may see but not manage it. Every id in
//! the path (`{notebook}`, `{team}`) is checked before the lookup, as the handlers did.

use axum::extract::{FromRequestParts, RawPathParams};
use axum::http::request::Parts;
use marina_config::Id;

use crate::auth::Principal;
use crate::error::ApiError;
use crate::extract::path_id;
use crate::model::Notebook;
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

/// The `{notebook}` id of the path, after checking every id parameter of it.
async fn notebook_path_id(parts: &mut Parts, state: &AppState) -> Result<Id, ApiError> {
    let params = RawPathParams::from_request_parts(parts, state)
        .await
        .map_err(|e| ApiError::Internal(format!("path parameters: {e}")))?;
    let mut notebook = None;
    for (name, value) in &params {
        match name {
            "notebook" => notebook = Some(path_id("notebook", value)?),
            "team" => {
                path_id("team", value)?;
            }
            _ => {}
        }
    }
    notebook.ok_or_else(|| ApiError::Internal("route has no {notebook} parameter".into()))
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
