//! Operational endpoints: health, readiness, metrics, the OpenAPI document, the host page.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse};
use axum::Json as AxumJson;
use prometheus::Encoder;
use serde_json::json;
use utoipa::OpenApi;

use crate::state::AppState;

/// Liveness: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "operations", responses((status = 200)))]
pub async fn healthz() -> &'static str {
    "ok"
}

/// Readiness: the database answers.
#[utoipa::path(get, path = "/readyz", tag = "operations", responses((status = 200), (status = 503)))]
pub async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    if state.db.ping().await {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "database unreachable")
    }
}

/// Prometheus metrics, text format.
#[utoipa::path(get, path = "/metrics", tag = "operations", responses((status = 200, content_type = "text/plain")))]
pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let mut buf = Vec::new();
    let encoder = prometheus::TextEncoder::new();
    if let Err(e) = encoder.encode(&state.metrics.registry.gather(), &mut buf) {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding metrics: {e}"),
        )
            .into_response();
    }
    (
        [(header::CONTENT_TYPE, encoder.format_type().to_owned())],
        buf,
    )
        .into_response()
}

/// This API's OpenAPI document.
#[utoipa::path(get, path = "/openapi.json", tag = "operations", responses((status = 200)))]
pub async fn openapi() -> impl IntoResponse {
    AxumJson(crate::api::ApiDoc::openapi())
}

/// The example host page (when `control.host_page` is on).
pub async fn host_page() -> Html<&'static str> {
    Html(include_str!("../../host/index.html"))
}

/// What the host page needs to know: where the edge is, and how notebooks are isolated
/// (`bubblewrap`, `kubernetes`, or `none`: then the page warns that notebooks run
/// unsandboxed).
#[utoipa::path(get, path = "/host-config.json", tag = "operations", responses((status = 200)))]
pub async fn host_config(State(state): State<AppState>) -> impl IntoResponse {
    AxumJson(json!({
        "edgeOrigin": state.settings.proxy.public_url.trim_end_matches('/'),
        "notebookIsolation": state.runtime.isolation(),
    }))
}
