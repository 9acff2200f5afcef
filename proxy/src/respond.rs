//! What the browser gets back from the edge itself: error pages, redirects, the handshake's
//! answer, and the security headers every response of a notebook's origin carries.
//!
//! [`error`] is the only place that turns an [`EdgeError`] into a response: it never echoes the
//! cause, the token or anything the client sent. [`Security::harden`] is the only place that adds
//! the security headers (`Content-Security-Policy: frame-ancestors …`, `nosniff`); the pipeline
//! applies it once to every response it gives, forwarded or made here.

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Response, StatusCode};
use marina_config::Settings;

use crate::error::{EdgeError, ErrorKind, ProxyError};
use crate::forward::body::EdgeBody;

/// The security headers of every response of a notebook's origin, fixed at start.
pub struct Security {
    /// `frame-ancestors <proxy.frame_ancestors>`: only the host application may embed notebooks
    /// (and error pages, which are framed by it too).
    csp: HeaderValue,
}

// === impl Security ===

impl Security {
    /// `csp`: the whole `Content-Security-Policy` value.
    pub fn new(csp: HeaderValue) -> Security {
        Security { csp }
    }

    /// From `proxy.frame_ancestors`.
    pub fn from_settings(settings: &Settings) -> Result<Security, ProxyError> {
        let csp = HeaderValue::try_from(format!(
            "frame-ancestors {}",
            settings.frame_ancestors().join(" ")
        ))
        .map_err(|_| {
            ProxyError::Config("proxy.frame_ancestors: not a valid header value".into())
        })?;
        Ok(Security::new(csp))
    }

    /// Adds the security headers to a response's headers. The ONE place that does so. An
    /// upstream's own policy is kept beside the edge's (both apply); the edge's framing policy
    /// replaces `X-Frame-Options`, which `forward` drops.
    pub fn harden(&self, headers: &mut HeaderMap) {
        headers.append(header::CONTENT_SECURITY_POLICY, self.csp.clone());
        headers.insert(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        );
    }
}

/// A redirect the edge answers itself (never cached).
pub fn redirect(status: StatusCode, location: &str) -> Result<Response<EdgeBody>, EdgeError> {
    let mut r = Response::new(EdgeBody::empty());
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::LOCATION,
        HeaderValue::try_from(location)
            .map_err(|_| EdgeError::new(ErrorKind::BadRequest, "redirect location"))?,
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(r)
}

/// The handshake's answer: `303` to `location` with the session cookie, and no referrer, so
/// the URL token leaves the address bar and history at once.
pub fn handshake(location: &str, set_cookie: HeaderValue) -> Result<Response<EdgeBody>, EdgeError> {
    let mut r = redirect(StatusCode::SEE_OTHER, location)?;
    let h = r.headers_mut();
    h.insert(header::SET_COOKIE, set_cookie);
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    Ok(r)
}

/// Title and one-sentence explanation shown to people.
fn page(kind: ErrorKind) -> (&'static str, &'static str) {
    use ErrorKind::*;
    match kind {
        NotFound => ("Not found", "There is no notebook at this address."),
        NotRunning => (
            "Notebook not running",
            "This notebook is not running right now. Start it from the application and open it again.",
        ),
        LinkMissing | LinkInvalid => (
            "Invalid link",
            "This notebook link is not valid. Open the notebook again from the application.",
        ),
        LinkExpired => (
            "Link expired",
            "This notebook link has expired. Open the notebook again from the application.",
        ),
        LinkNotYetValid => (
            "Link not yet valid",
            "This notebook link is not valid yet. Check the clock of the server, or try again in a moment.",
        ),
        LinkOtherNotebook => ("No access", "This link was issued for another notebook."),
        LinkStaleSession => (
            "Link expired",
            "The notebook was restarted since this link was issued. Open it again from the application.",
        ),
        LinkReplayed => (
            "Link already used",
            "Each notebook link works once. Open the notebook again from the application.",
        ),
        ReplayStoreUnavailable => (
            "Try again",
            "The link could not be checked right now. Try again in a moment.",
        ),
        NoSession | SessionInvalid => (
            "Not signed in",
            "Open this notebook from the application to get access.",
        ),
        SessionExpired => (
            "Session expired",
            "Your access to this notebook has expired. Open it again from the application.",
        ),
        SessionStale => (
            "Notebook restarted",
            "The notebook was restarted. Open it again from the application.",
        ),
        SessionOtherNotebook | NoAccess => (
            "No access",
            "You do not have access to this notebook.",
        ),
        DeniedReadOnly => ("Read only", "You can view this notebook but not change it."),
        DeniedCredentialEndpoint | DeniedPath | DeniedSessionId | DeniedOrigin => {
            ("Forbidden", "This request is not allowed.")
        }
        BadRequest | DeniedQuery => ("Bad request", "The request could not be understood."),
        UpstreamConnect | UpstreamTimeout | UpstreamProtocol => (
            "Notebook not responding",
            "The notebook server is not responding. It may be starting or stopping; try again in a moment.",
        ),
        Internal => ("Error", "Something went wrong on our side."),
    }
}

/// Turns an error into the response the browser gets. The ONE place that does so.
/// ([`Security::harden`] adds the headers every response gets.)
///
/// `wants_json`: API calls get `{"error":{"code","message"}}`; page loads a small HTML page.
/// Neither ever contains the cause, request data or a token. Every error response is
/// `no-store` (a failed handshake must not be cached with its URL).
pub fn error(err: &EdgeError, wants_json: bool) -> Response<EdgeBody> {
    let kind = err.kind;
    let (title, message) = page(kind);
    let (content_type, body) = if wants_json {
        let v = serde_json::json!({"error": {"code": kind.reason(), "message": message}});
        ("application/json", Bytes::from(v.to_string()))
    } else {
        let page = format!(
            "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title>\
             <meta name=\"viewport\" content=\"width=device-width\">\
             <style>body{{font-family:system-ui,sans-serif;max-width:32rem;margin:4rem auto;padding:0 1rem;color:#222}}</style>\
             </head><body><h1>{title}</h1><p>{message}</p></body></html>\n"
        );
        ("text/html; charset=utf-8", Bytes::from(page))
    };
    let mut resp = Response::new(EdgeBody::full(body));
    *resp.status_mut() = kind.status();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn body_text(r: Response<EdgeBody>) -> String {
        let b = r.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(b.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn json_and_html_never_echo_the_cause() {
        let e = EdgeError::new(ErrorKind::LinkInvalid, "test")
            .with_cause("secret-token-value in cause".to_string());
        let r = error(&e, true);
        assert_eq!(r.status(), 401);
        assert_eq!(r.headers()[header::CACHE_CONTROL], "no-store");
        let t = body_text(r).await;
        let v: serde_json::Value = serde_json::from_str(&t).unwrap();
        assert_eq!(v["error"]["code"], "link_invalid");
        assert!(!t.contains("secret-token-value"));
        let r = error(&e, false);
        assert!(r.headers()[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/html"));
        let t = body_text(r).await;
        assert!(t.contains("Invalid link") && !t.contains("secret-token-value"));
    }
}
