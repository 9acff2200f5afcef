//! The two error types of the crate.
//!
//! - [`ApiError`]: everything a request can fail with. One `IntoResponse` impl turns it into the
//!   contract's single error shape, `{"error": {"code", "message"[, "field"]}}`, with its status.
//!   Internal details (SQL errors, runtime messages) never reach the client: they ride on the
//!   response as an extension and the observe middleware logs them.
//! - [`ControlError`]: what `ControlPlane::open`/`serve` and the admin functions fail with.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// Why a request failed. The variant fixes the status; `code` is the stable machine-readable
/// name clients switch on.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: malformed or invalid input. `field` names it (`name`, `config.sail.maxRetries`,
    /// `teamIds[1]`, the path parameter `notebook`, the query parameter `limit`).
    #[error("invalid `{field}`: {message}")]
    Invalid { field: String, message: String },
    /// 400: the body is not JSON at all (syntax error): no single field to name.
    #[error("malformed JSON body: {0}")]
    MalformedJson(String),
    /// 401: no credentials, or credentials that match nothing (unknown or deleted key).
    #[error("missing or invalid credentials")]
    Unauthenticated,
    /// 403: the caller may see the object but not do this to it.
    #[error("{0}")]
    Forbidden(&'static str),
    /// 404: absent, or not visible to the caller (the two are indistinguishable on purpose).
    #[error("{what} not found")]
    NotFound {
        code: &'static str,
        what: &'static str,
    },
    /// 405: the path exists, the method does not.
    #[error("method not allowed on this path")]
    MethodNotAllowed,
    /// 409: the object is in a state that does not allow this (lifecycle, in use, replay).
    #[error("{message}")]
    Conflict { code: &'static str, message: String },
    /// 413: the body is larger than `control.max_body_bytes`.
    #[error("request body larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    /// 415: a body was sent without `Content-Type: application/json`.
    #[error("expected Content-Type: application/json")]
    UnsupportedMediaType,
    /// 429: the API key made more than `control.rate_limit_per_second` requests this second.
    #[error("rate limit exceeded, retry in a second")]
    RateLimited,
    /// 500: a bug or a backend failure. The detail is logged, never returned.
    #[error("internal error")]
    Internal(String),
}

/// The internal detail of a 500, attached to the response for the observe middleware to log.
#[derive(Clone, Debug)]
pub struct InternalDetail(pub String);

impl ApiError {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> ApiError {
        ApiError::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }

    pub fn conflict(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::Conflict {
            code,
            message: message.into(),
        }
    }

    pub fn notebook_not_found() -> ApiError {
        ApiError::NotFound {
            code: "notebook_not_found",
            what: "notebook",
        }
    }

    pub fn team_not_found() -> ApiError {
        ApiError::NotFound {
            code: "team_not_found",
            what: "team",
        }
    }

    pub fn member_not_found() -> ApiError {
        ApiError::NotFound {
            code: "member_not_found",
            what: "member",
        }
    }

    pub fn config_not_found() -> ApiError {
        ApiError::NotFound {
            code: "workload_config_not_found",
            what: "workload config",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Invalid { .. } | ApiError::MalformedJson(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthenticated => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound { .. } => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict { .. } => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            ApiError::Invalid { .. } => "invalid_request",
            ApiError::MalformedJson(_) => "malformed_json",
            ApiError::Unauthenticated => "unauthenticated",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound { code, .. } => code,
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::Conflict { code, .. } => code,
            ApiError::PayloadTooLarge { .. } => "payload_too_large",
            ApiError::UnsupportedMediaType => "unsupported_media_type",
            ApiError::RateLimited => "rate_limited",
            ApiError::Internal(_) => "internal",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({"code": self.code(), "message": self.to_string()});
        if let ApiError::Invalid { field, .. } = &self {
            body["field"] = json!(field);
        }
        let mut resp = (self.status(), axum::Json(json!({ "error": body }))).into_response();
        match self {
            ApiError::Internal(detail) => {
                resp.extensions_mut().insert(InternalDetail(detail));
            }
            ApiError::Unauthenticated => {
                resp.headers_mut().insert(
                    axum::http::header::WWW_AUTHENTICATE,
                    axum::http::HeaderValue::from_static("Bearer"),
                );
            }
            ApiError::RateLimited => {
                resp.headers_mut().insert(
                    axum::http::header::RETRY_AFTER,
                    axum::http::HeaderValue::from_static("1"),
                );
            }
            _ => {}
        }
        resp
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        ApiError::Internal(format!("database: {e}"))
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ApiError::Internal(e.to_string())
    }
}

/// A stored row that does not decode (a corrupt or foreign database).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Sql(#[from] sqlx::Error),
    #[error("stored {column} is invalid: {value:?}")]
    Corrupt { column: &'static str, value: String },
    #[error("migration {version} failed: {source}")]
    Migration {
        version: i64,
        #[source]
        source: sqlx::Error,
    },
}

/// What opening or serving the control plane fails with.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("database {url_kind}: {source}")]
    Connect {
        url_kind: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error("{what} {path}: {source}")]
    File {
        what: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("URL signing key {path}: {message}")]
    SigningKey {
        path: std::path::PathBuf,
        message: String,
    },
    #[error("no such member {0}")]
    NoSuchMember(marina_config::Id),
    #[error("the database has no admin member")]
    NoAdmin,
    #[error("serving: {0}")]
    Serve(#[source] std::io::Error),
}

impl From<sqlx::Error> for ControlError {
    fn from(e: sqlx::Error) -> Self {
        ControlError::Store(StoreError::Sql(e))
    }
}
