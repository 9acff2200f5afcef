//! The edge's errors: [`EdgeError`] for the request path, [`ProxyError`] for start-up. The
//! bottom of the crate: it imports no other module of it.
//!
//! Modelled on Pingora's errors: an [`EdgeError`] has a *kind* (what went wrong, which fixes the
//! status code, the page and the metrics label), a *source* (whose fault: the client, the notebook
//! server, or the edge itself), a short static *context* (where), and optionally the *cause*.
//! Runtime detail goes in the context or the cause, never in the kind, so the set of metric
//! labels stays fixed. Turning an error into what the browser sees is [`crate::respond`]'s job.

use std::fmt;

use http::StatusCode;

/// Whose fault an error is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The browser sent something wrong or is not allowed to do it.
    Client,
    /// The notebook's Marimo server failed or is unreachable.
    Notebook,
    /// The edge itself (or the control plane it consults) failed.
    Internal,
}

/// Every way a request can fail. Each kind has a fixed status, page and metrics label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// No notebook at this address (wrong host or path shape).
    NotFound,
    /// The address names a notebook the edge has no route for: stopped, unknown, or not yet
    /// known (routes not loaded).
    NotRunning,
    /// The handshake has no `token` parameter.
    LinkMissing,
    /// Signature, algorithm, key id, audience, issuer or shape of the URL token is wrong.
    LinkInvalid,
    /// The URL token's `exp` has passed.
    LinkExpired,
    /// The URL token's `nbf` is in the future.
    LinkNotYetValid,
    /// The URL token names another notebook than the address it was presented at.
    LinkOtherNotebook,
    /// The URL token was minted for an earlier run of the notebook.
    LinkStaleSession,
    /// The URL token was already redeemed.
    LinkReplayed,
    /// The shared replay store (the control plane) could not be asked; fail closed.
    ReplayStoreUnavailable,
    /// No session cookie for this notebook.
    NoSession,
    /// The session cookie does not open (tampered, or sealed with an unknown key).
    SessionInvalid,
    /// The session cookie has expired.
    SessionExpired,
    /// The session cookie belongs to another notebook.
    SessionOtherNotebook,
    /// The notebook was restarted since the cookie was issued.
    SessionStale,
    /// The member is neither the owner nor a viewer of the notebook (any more).
    NoAccess,
    /// A viewer tried something outside the read-only allow-list.
    DeniedReadOnly,
    /// Marimo's own credential endpoints (`/auth/*`), refused for everyone.
    DeniedCredentialEndpoint,
    /// A path with dot segments, doubled or encoded slashes, or bad encoding.
    DeniedPath,
    /// A Marimo session id that does not have Marimo's shape.
    DeniedSessionId,
    /// A state-changing request or a session transport from another origin than the
    /// notebook's own (cross-site request forgery, WebSocket hijacking; sibling notebooks too).
    DeniedOrigin,
    /// A query Marimo would read differently from the edge: an encoded or malformed key where
    /// the edge binds or drops one (`%73ession_id`), or a repeated `session_id`/`kiosk`.
    DeniedQuery,
    /// A malformed request (bad URI, bad header value).
    BadRequest,
    /// The notebook server refused the connection or could not be reached in time.
    UpstreamConnect,
    /// The notebook server did not answer with a response head in time.
    UpstreamTimeout,
    /// The notebook server answered something the edge cannot relay.
    UpstreamProtocol,
    /// A bug or a resource failure in the edge.
    Internal,
}

/// A request-path error: kind, source, context and optional cause.
#[derive(Debug)]
pub struct EdgeError {
    pub kind: ErrorKind,
    pub source: Source,
    /// Where it happened, for logs (static: no request data, so never a token).
    pub context: &'static str,
    pub cause: Option<Box<dyn std::error::Error + Send + Sync>>,
}

// === impl EdgeError ===

impl EdgeError {
    pub fn new(kind: ErrorKind, context: &'static str) -> EdgeError {
        EdgeError {
            kind,
            source: kind.default_source(),
            context,
            cause: None,
        }
    }

    /// Attaches the underlying error. Only wrap a cause when it adds information for the logs.
    pub fn with_cause(
        mut self,
        cause: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        self.cause = Some(cause.into());
        self
    }
}

impl fmt::Display for EdgeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({:?}, {})",
            self.kind.reason(),
            self.source,
            self.context
        )?;
        if let Some(c) = &self.cause {
            write!(f, ": {c}")?;
        }
        Ok(())
    }
}

impl std::error::Error for EdgeError {}

// === impl ErrorKind ===

impl ErrorKind {
    fn default_source(self) -> Source {
        use ErrorKind::*;
        match self {
            UpstreamConnect | UpstreamTimeout | UpstreamProtocol => Source::Notebook,
            ReplayStoreUnavailable | Internal => Source::Internal,
            _ => Source::Client,
        }
    }

    /// The label used in metrics and logs. A fixed set: never request data.
    pub fn reason(self) -> &'static str {
        use ErrorKind::*;
        match self {
            NotFound => "not_found",
            NotRunning => "not_running",
            LinkMissing => "link_missing",
            LinkInvalid => "link_invalid",
            LinkExpired => "link_expired",
            LinkNotYetValid => "link_not_yet_valid",
            LinkOtherNotebook => "link_other_notebook",
            LinkStaleSession => "link_stale_session",
            LinkReplayed => "link_replayed",
            ReplayStoreUnavailable => "replay_store_unavailable",
            NoSession => "no_session",
            SessionInvalid => "session_invalid",
            SessionExpired => "session_expired",
            SessionOtherNotebook => "session_other_notebook",
            SessionStale => "session_stale",
            NoAccess => "no_access",
            DeniedReadOnly => "read_only",
            DeniedCredentialEndpoint => "credential_endpoint",
            DeniedPath => "bad_path",
            DeniedSessionId => "bad_session_id",
            DeniedOrigin => "bad_origin",
            DeniedQuery => "bad_query",
            BadRequest => "bad_request",
            UpstreamConnect => "upstream_connect",
            UpstreamTimeout => "upstream_timeout",
            UpstreamProtocol => "upstream_protocol",
            Internal => "internal",
        }
    }

    pub fn status(self) -> StatusCode {
        use ErrorKind::*;
        match self {
            NotFound | NotRunning => StatusCode::NOT_FOUND,
            LinkMissing | LinkInvalid | LinkExpired | LinkNotYetValid | LinkStaleSession
            | NoSession | SessionInvalid | SessionExpired | SessionStale => {
                StatusCode::UNAUTHORIZED
            }
            LinkOtherNotebook
            | SessionOtherNotebook
            | NoAccess
            | DeniedReadOnly
            | DeniedCredentialEndpoint
            | DeniedPath
            | DeniedSessionId
            | DeniedOrigin => StatusCode::FORBIDDEN,
            LinkReplayed => StatusCode::CONFLICT,
            BadRequest | DeniedQuery => StatusCode::BAD_REQUEST,
            ReplayStoreUnavailable | UpstreamConnect | UpstreamTimeout | UpstreamProtocol => {
                StatusCode::BAD_GATEWAY
            }
            Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Is this an authorization denial (counted in the denials metric)?
    pub fn is_denial(self) -> bool {
        use ErrorKind::*;
        matches!(
            self,
            DeniedReadOnly
                | DeniedCredentialEndpoint
                | DeniedPath
                | DeniedSessionId
                | DeniedOrigin
                | DeniedQuery
        )
    }
}

/// Errors of [`crate::Edge::new`] and [`crate::Edge::serve`]: configuration, keys, files,
/// sockets. Request-path failures are [`EdgeError`]s and never end the server.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("edge configuration: {0}")]
    Config(String),
    #[error("reading {what} from {path}: {source}")]
    File {
        what: &'static str,
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("invalid {what} in {path}: {message}")]
    Key {
        what: &'static str,
        path: String,
        message: String,
    },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("routes: {0}")]
    Routes(String),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_by_kind() {
        assert_eq!(ErrorKind::LinkReplayed.status(), 409);
        assert_eq!(ErrorKind::NotRunning.status(), 404);
        assert_eq!(ErrorKind::NoAccess.status(), 403);
        assert_eq!(ErrorKind::UpstreamConnect.status(), 502);
        assert_eq!(ErrorKind::SessionExpired.status(), 401);
        assert!(ErrorKind::DeniedReadOnly.is_denial());
        assert_eq!(ErrorKind::DeniedQuery.status(), 400);
        assert!(ErrorKind::DeniedQuery.is_denial());
        assert_eq!(ErrorKind::DeniedOrigin.status(), 403);
        assert!(!ErrorKind::NoSession.is_denial());
    }
}
