//! The HTTP surface: one router for the public API, the internal API, and the operational
//! endpoints, with the observe middleware (metrics, error logging) around all of it.
//!
//! - [`access`]: extractors for a notebook the caller may see or manage.
//! - [`notebooks`]: the seed's thirteen `/workloads/…` endpoints.
//! - [`configs`]: the workload config endpoints.
//! - [`iam`]: `/iam/…` (members, teams, membership, API keys, me).
//! - [`internal`]: `/internal/v1/…` for the edge.
//! - [`ops`]: `/healthz`, `/readyz`, `/metrics`, `/openapi.json`, the host page.

pub mod access;
pub mod configs;
pub mod iam;
pub mod internal;
pub mod notebooks;
pub mod ops;

use std::time::Instant;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{delete, get, post};
use axum::Router;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::error::{ApiError, InternalDetail};
use crate::extract::BodyLimit;
use crate::lifecycle::LifecycleError;
use crate::model::*;
use crate::state::AppState;

/// The lifecycle's errors at the API boundary: a lost transition is a 409
/// `invalid_notebook_state` with the lifecycle's message, a vanished notebook the usual 404.
impl From<LifecycleError> for ApiError {
    fn from(e: LifecycleError) -> ApiError {
        match e {
            LifecycleError::InvalidState { .. } => {
                ApiError::conflict("invalid_notebook_state", e.to_string())
            }
            LifecycleError::NotFound => ApiError::notebook_not_found(),
            LifecycleError::Store(e) => e.into(),
            LifecycleError::Config { .. } | LifecycleError::Runtime { .. } => {
                ApiError::Internal(e.to_string())
            }
        }
    }
}

/// Largest activity batch an edge may send, bytes (about 250,000 (notebook, member) entries).
pub const INTERNAL_BODY_LIMIT: usize = 64 * 1024 * 1024;

/// Builds the router over `state`.
pub fn router(state: AppState) -> Router {
    use configs::*;
    use iam::*;
    use internal::*;
    use notebooks::*;
    let mut r = Router::new()
        .route(
            "/workloads/notebooks",
            get(notebooks_list).post(notebooks_create),
        )
        .route(
            "/workloads/notebooks/{notebook}",
            get(notebooks_get)
                .patch(notebooks_update)
                .delete(notebooks_delete),
        )
        .route(
            "/workloads/notebooks/{notebook}/start",
            post(notebooks_start),
        )
        .route("/workloads/notebooks/{notebook}/stop", post(notebooks_stop))
        .route("/workloads/notebooks/{notebook}/open", post(notebooks_open))
        .route("/workloads/notebooks/{notebook}/ping", post(notebooks_ping))
        .route(
            "/workloads/notebooks/{notebook}/presence",
            get(notebooks_presence),
        )
        .route(
            "/workloads/notebooks/{notebook}/teams",
            get(notebook_teams_list).post(notebook_teams_add),
        )
        .route(
            "/workloads/notebooks/{notebook}/teams/{team}",
            delete(notebook_teams_remove),
        )
        .route(
            "/workloads/teams/{team}/notebooks",
            get(team_notebooks_list),
        )
        .route("/workloads/configs", get(configs_list).post(configs_create))
        .route(
            "/workloads/configs/{config}",
            get(configs_get)
                .patch(configs_update)
                .delete(configs_delete),
        )
        .route("/iam/me", get(me_get))
        .route("/iam/members", get(members_list).post(members_create))
        .route(
            "/iam/members/{member}",
            get(members_get)
                .patch(members_update)
                .delete(members_delete),
        )
        .route(
            "/iam/members/{member}/api-keys",
            get(api_keys_list).post(api_keys_create),
        )
        .route(
            "/iam/members/{member}/api-keys/{key}",
            delete(api_keys_delete),
        )
        .route("/iam/teams", get(teams_list).post(teams_create))
        .route(
            "/iam/teams/{team}",
            get(teams_get).patch(teams_update).delete(teams_delete),
        )
        .route(
            "/iam/teams/{team}/members",
            get(team_members_list).post(team_members_add),
        )
        .route(
            "/iam/teams/{team}/members/{member}",
            delete(team_members_remove),
        )
        .route("/internal/v1/routes", get(routes_get))
        // An edge reports every notebook it has connections to in one batch: far more than a
        // member's request body may be.
        .route(
            "/internal/v1/activity",
            post(activity_post).layer(DefaultBodyLimit::max(INTERNAL_BODY_LIMIT)),
        )
        .route("/internal/v1/redeem", post(redeem_post))
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .route("/openapi.json", get(ops::openapi))
        .route("/host-config.json", get(ops::host_config));
    if state.settings.control.host_page {
        r = r.route("/", get(ops::host_page));
    }
    let limit = state.settings.control.max_body_bytes;
    r.fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::NotFound {
        code: "route_not_found",
        what: "route",
    }
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// Counts and times every request by matched route, and logs 5xx details (which never reach
/// the client). Nothing is logged at info per request.
async fn observe(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let method = req.method().as_str().to_owned();
    req.extensions_mut()
        .insert(BodyLimit(state.settings.control.max_body_bytes));
    let resp = next.run(req).await;
    let status = resp.status();
    state
        .metrics
        .requests
        .with_label_values(&[route.as_str(), method.as_str(), status.as_str()])
        .inc();
    state
        .metrics
        .request_seconds
        .with_label_values(&[route.as_str()])
        .observe(started.elapsed().as_secs_f64());
    if let Some(InternalDetail(detail)) = resp.extensions().get::<InternalDetail>() {
        tracing::error!(%route, %method, error = %detail, "request failed");
    } else {
        tracing::debug!(%route, %method, status = status.as_u16(), "request");
    }
    resp
}

/// The OpenAPI document, generated from the handlers' annotations.
#[derive(OpenApi)]
#[openapi(
    info(title = "Marina control API", description = "Hosted Marimo notebooks backed by Sail."),
    paths(
        notebooks::notebooks_list, notebooks::notebooks_create, notebooks::notebooks_get,
        notebooks::notebooks_update, notebooks::notebooks_delete, notebooks::notebooks_start,
        notebooks::notebooks_stop, notebooks::notebooks_open, notebooks::notebooks_ping,
        notebooks::notebooks_presence,
        notebooks::notebook_teams_list, notebooks::notebook_teams_add,
        notebooks::notebook_teams_remove, notebooks::team_notebooks_list,
        configs::configs_list, configs::configs_create, configs::configs_get,
        configs::configs_update, configs::configs_delete,
        iam::me_get, iam::members_list, iam::members_create, iam::members_get,
        iam::members_update, iam::members_delete, iam::teams_list, iam::teams_create,
        iam::teams_get, iam::teams_update, iam::teams_delete, iam::team_members_list,
        iam::team_members_add, iam::team_members_remove, iam::api_keys_list,
        iam::api_keys_create, iam::api_keys_delete,
        internal::routes_get, internal::activity_post, internal::redeem_post,
        ops::healthz, ops::readyz, ops::metrics, ops::openapi, ops::host_config,
    ),
    components(schemas(
        Notebook, NotebookItem, Team, TeamWithCount, WorkloadConfig, WorkloadConfigBody,
        EndpointLimits, Included, NotebookList, NotebookOne, NotebookTeam, NotebookTeamList,
        OpenUrl, PresenceList, PresenceEntry, PresenceMode, Member, ApiKey, TeamMember, Me, CreatedApiKey, Status, Role,
        CreateNotebookBody, UpdateNotebookBody, TeamIdsBody, CreateWorkloadConfigBody,
        UpdateWorkloadConfigBody, CreateMemberBody, UpdateMemberBody, TeamBody, MemberIdsBody,
        CreateApiKeyBody,
    )),
    modifiers(&SecuritySchemes)
)]
pub struct ApiDoc;

struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "apiKey",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        components.add_security_scheme(
            "internalToken",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}
