//! Phase 4, `forward` (HTTP): streams the request to the notebook's Marimo server and its
//! response back. WebSockets are relayed by [`crate::ws`].
//!
//! Runs only for requests `authorize` let through. It rewrites headers so that no browser
//! credential reaches the kernel (Marimo copies every request header and cookie into
//! `mo.app_meta().request`) and no Marimo credential reaches the browser, then streams bodies
//! without collecting them. Errors: the upstream refused the connection or did not answer in
//! time (502 "notebook not responding").
//!
//! Upstream connections: each HTTP/1.1 browser connection has its own ([`Affinity`]), driven
//! in the browser connection's own task by [`h1`], so the hot path shares no pool (and no pool
//! lock) across connections and hands nothing to another task. HTTP/2 browser connections use
//! hyper's pool, keyed by scheme and `host:port`: a Marimo server's address is its own while it
//! runs and every request carries that notebook's own Marimo token, so a pooled connection never
//! serves another notebook's credentials; after a restart on the same address the old
//! connections fail and are replaced.
//!
//! The header rules are written once, as predicates in [`headers`] ([`request_header_forwarded`],
//! [`response_header_forwarded`]), and applied both by the HTTP/1.1 encoder in [`h1`] (which
//! writes the upstream request straight from the browser's headers, WebSocket handshakes too)
//! and by the `HeaderMap` rewrites used for HTTP/2. Inside `forward` the files form a line as
//! well: `mod.rs` → [`body`] → [`h1`] → [`headers`], `chunked`.

pub mod body;
mod chunked;
mod h1;
mod headers;

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, Uri, Version};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

pub(crate) use h1::Conn;
pub use h1::{Affinity, UpstreamBody};
pub use headers::{
    for_each_kept_cookie, is_identity_header, request_header_forwarded, response_header_forwarded,
    ConnectionTokens, ForwardInfo, RequestId, NOTEBOOK_ID_HEADER, OWN_FILE_KEY,
};

use body::EdgeBody;

use crate::activity::StreamGuard;
use crate::error::{EdgeError, ErrorKind};
use crate::metrics::Metrics;
use crate::route::RouteEntry;

/// Rewrites request headers for the upstream (used for HTTP/2 requests and WebSocket
/// handshakes; HTTP/1.1 requests are encoded by [`h1`] with the same rules).
pub fn rewrite_request_headers(
    headers: &mut HeaderMap,
    cookie_names: &[&str],
    route: &RouteEntry,
    info: ForwardInfo<'_>,
) {
    let tokens = ConnectionTokens::of(headers.get_all(header::CONNECTION).iter());
    let dropped: Vec<HeaderName> = headers
        .keys()
        .filter(|n| !request_header_forwarded(n) || tokens.names(n))
        .cloned()
        .collect();
    for n in dropped {
        headers.remove(n);
    }
    strip_cookies(headers, cookie_names);
    headers.insert(header::AUTHORIZATION, route.upstream_auth.clone());
    headers.insert(NOTEBOOK_ID_HEADER, OWN_FILE_KEY);
    headers.insert("x-forwarded-for", info.forwarded_for.clone());
    headers.insert("x-forwarded-proto", HeaderValue::from_static(info.proto));
    if let Some(h) = info.host {
        headers.insert("x-forwarded-host", h.clone());
        headers.insert(header::HOST, h.clone());
    }
    if let Ok(v) = HeaderValue::try_from(info.request_id.to_string()) {
        headers.insert("x-request-id", v);
    }
}

/// Removes the edge's cookies from `Cookie`, keeping the others (joined into one header, as
/// HTTP/1.1 requires).
pub fn strip_cookies(headers: &mut HeaderMap, names: &[&str]) {
    if !headers.contains_key(header::COOKIE) {
        return;
    }
    let mut kept = String::new();
    for_each_kept_cookie(headers, names, |pair| {
        if !kept.is_empty() {
            kept.push_str("; ");
        }
        kept.push_str(pair);
    });
    headers.remove(header::COOKIE);
    if !kept.is_empty() {
        if let Ok(v) = HeaderValue::try_from(kept) {
            headers.insert(header::COOKIE, v);
        }
    }
}

/// Rewrites response headers for the browser (HTTP/2 path; [`h1`] applies the same rules while
/// parsing): see [`response_header_forwarded`]. The framing policy and `nosniff` are added to
/// every response in one place, [`crate::respond::Security::harden`].
pub fn rewrite_response_headers(headers: &mut HeaderMap) {
    let tokens = ConnectionTokens::of(headers.get_all(header::CONNECTION).iter());
    let old = std::mem::take(headers);
    let mut current: Option<HeaderName> = None;
    for (name, value) in old {
        if let Some(n) = name {
            current = Some(n);
        }
        let Some(name) = &current else { continue };
        if response_header_forwarded(name, value.as_bytes()) && !tokens.names(name) {
            headers.append(name.clone(), value);
        }
    }
}

/// The HTTP forwarder.
pub struct Forwarder {
    /// The shared pool, for HTTP/2 browser connections (many concurrent requests each).
    client: Client<HttpConnector, Incoming>,
    connect_timeout: Duration,
    response_timeout: Duration,
    metrics: &'static Metrics,
}

// === impl Forwarder ===

impl Forwarder {
    pub fn new(
        connect_timeout: Duration,
        response_timeout: Duration,
        metrics: &'static Metrics,
    ) -> Forwarder {
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(connect_timeout));
        http.set_nodelay(true);
        http.enforce_http(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(1024)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(http);
        Forwarder {
            client,
            connect_timeout,
            response_timeout,
            metrics,
        }
    }

    /// Rewrites the request for the upstream, sends it and streams the answer back.
    ///
    /// `affinity` is the browser connection's own upstream connection slot (HTTP/1.1 browser
    /// connections); without it (HTTP/2) the shared pool is used.
    #[allow(clippy::too_many_arguments)]
    pub async fn forward(
        &self,
        route: &RouteEntry,
        mut parts: http::request::Parts,
        body: Incoming,
        guard: Option<StreamGuard>,
        affinity: Option<&Arc<Affinity>>,
        cookie_names: &[&str; 2],
        info: ForwardInfo<'_>,
    ) -> Result<Response<EdgeBody>, EdgeError> {
        let started = Instant::now();
        if let Some(home) = affinity {
            let (head, body) = h1::send(
                home,
                route,
                &parts,
                body,
                cookie_names,
                &info,
                self.connect_timeout,
                self.response_timeout,
            )
            .await?;
            self.metrics
                .upstream_latency
                .observe(started.elapsed().as_secs_f64());
            let (status, headers) = head.into_parts();
            let body = match h1::into_body(body) {
                h1::BodyKind::Whole(b) => {
                    self.metrics.bytes_to_client.inc_by(b.len() as u64);
                    if b.is_empty() {
                        EdgeBody::empty()
                    } else {
                        EdgeBody::full(b)
                    }
                }
                h1::BodyKind::Streaming(inner) => EdgeBody::Http1 {
                    inner,
                    _guard: if is_event_stream(&headers) {
                        guard
                    } else {
                        None
                    },
                    metrics: self.metrics,
                },
            };
            let mut resp = Response::new(body);
            *resp.status_mut() = status;
            *resp.headers_mut() = headers;
            return Ok(resp);
        }
        let pq = parts
            .uri
            .path_and_query()
            .cloned()
            .ok_or_else(|| EdgeError::new(ErrorKind::BadRequest, "no path"))?;
        rewrite_request_headers(&mut parts.headers, cookie_names, route, info);
        parts.version = Version::HTTP_11;
        parts.uri = Uri::builder()
            .scheme("http")
            .authority(route.upstream.clone())
            .path_and_query(pq)
            .build()
            .map_err(|e| EdgeError::new(ErrorKind::BadRequest, "upstream uri").with_cause(e))?;
        let req = Request::from_parts(parts, body);
        let resp = match tokio::time::timeout(self.response_timeout, self.client.request(req)).await
        {
            Err(_) => return Err(EdgeError::new(ErrorKind::UpstreamTimeout, "response head")),
            Ok(Err(e)) if e.is_connect() => {
                return Err(EdgeError::new(ErrorKind::UpstreamConnect, "connect").with_cause(e))
            }
            Ok(Err(e)) => {
                return Err(EdgeError::new(ErrorKind::UpstreamProtocol, "request").with_cause(e))
            }
            Ok(Ok(r)) => r,
        };
        self.metrics
            .upstream_latency
            .observe(started.elapsed().as_secs_f64());
        let (mut parts, body) = resp.into_parts();
        rewrite_response_headers(&mut parts.headers);
        let body = EdgeBody::Upstream {
            _guard: if is_event_stream(&parts.headers) {
                guard
            } else {
                None
            },
            inner: body,
            metrics: self.metrics,
        };
        Ok(Response::from_parts(parts, body))
    }
}

/// Only an event stream that actually started counts as an open stream.
fn is_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::{tests::path_addressing, RouteTable};
    use marina_config::wire::{Route, RoutesSnapshot};
    use marina_config::Id;

    /// A route entry for notebook `A1B2C3D4E5` with Marimo token `marimo-secret`.
    pub(super) fn entry() -> std::sync::Arc<RouteEntry> {
        let m: &'static Metrics = Box::leak(Box::new(Metrics::new()));
        let t = RouteTable::new(m, path_addressing());
        let id = Id::parse("A1B2C3D4E5").unwrap();
        t.apply(RoutesSnapshot {
            version: 1,
            routes: vec![Route {
                notebook_id: id,
                session_id: id,
                upstream: "127.0.0.1:2718".into(),
                upstream_token: "marimo-secret".into(),
                owner_id: id,
                viewers: vec![],
                org_id: None,
                teams: vec![],
            }],
            ..Default::default()
        })
        .unwrap();
        t.get(id).unwrap()
    }

    #[test]
    fn request_headers_lose_credentials_and_identity_claims() {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer browser"),
        );
        h.append(
            header::COOKIE,
            HeaderValue::from_static("marina=sealed; theme=dark"),
        );
        h.append(
            header::COOKIE,
            HeaderValue::from_static("other=1; __Host-marina=x"),
        );
        h.insert("x-forwarded-user", HeaderValue::from_static("admin"));
        h.insert("x-forwarded-for", HeaderValue::from_static("1.2.3.4"));
        h.insert("x-remote-user", HeaderValue::from_static("admin"));
        h.insert("forwarded", HeaderValue::from_static("for=1.2.3.4"));
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret-hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("marimo-server-token", HeaderValue::from_static("skew"));
        h.insert(
            "x-notebook-id",
            HeaderValue::from_static("%2Fother%2Fnotebook.py"),
        );
        let host = HeaderValue::from_static("127.0.0.1:8000");
        rewrite_request_headers(
            &mut h,
            &["marina", "__Host-marina"],
            &entry(),
            ForwardInfo {
                forwarded_for: &HeaderValue::from_static("10.0.0.9"),
                proto: "https",
                host: Some(&host),
                request_id: RequestId { prefix: 1, n: 2 },
            },
        );
        assert_eq!(h[header::AUTHORIZATION], "Bearer marimo-secret");
        assert_eq!(h.get_all(header::COOKIE).iter().count(), 1);
        assert_eq!(h[header::COOKIE], "theme=dark; other=1");
        assert_eq!(h["x-forwarded-for"], "10.0.0.9");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "127.0.0.1:8000");
        assert!(h.get("x-forwarded-user").is_none());
        assert!(h.get("x-remote-user").is_none());
        assert!(h.get("forwarded").is_none());
        assert!(h.get("x-secret-hop").is_none());
        assert!(h.get(header::CONNECTION).is_none());
        assert_eq!(
            h["marimo-server-token"], "skew",
            "Marimo's skew token passes"
        );
        assert_eq!(
            h.get_all("x-notebook-id").iter().collect::<Vec<_>>(),
            vec!["notebook.py"],
            "the browser's file key is replaced by the notebook's own"
        );
    }

    #[test]
    fn request_header_rules() {
        for dropped in [
            "authorization",
            "x-notebook-id",
            "x-forwarded-user",
            "connection",
        ] {
            let n = HeaderName::from_static(dropped);
            assert!(!request_header_forwarded(&n), "{dropped}");
        }
        for kept in [
            "marimo-session-id",
            "marimo-server-token",
            "range",
            "origin",
        ] {
            let n = HeaderName::from_static(kept);
            assert!(request_header_forwarded(&n), "{kept}");
        }
    }

    #[test]
    fn request_id_written_like_its_display() {
        for (prefix, n) in [
            (0, 0),
            (1, 2),
            (0xdead_beef, u64::MAX),
            (7, 0x10),
            (0xabc, 255),
        ] {
            let id = RequestId { prefix, n };
            let mut out = Vec::new();
            id.write_to(&mut out);
            assert_eq!(String::from_utf8(out).unwrap(), id.to_string());
        }
    }

    #[test]
    fn only_edge_cookie_removed_header_dropped_when_empty() {
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, HeaderValue::from_static("marina=x"));
        strip_cookies(&mut h, &["marina"]);
        assert!(h.get(header::COOKIE).is_none());
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, HeaderValue::from_static("a=1; b=2"));
        strip_cookies(&mut h, &["marina"]);
        assert_eq!(h[header::COOKIE], "a=1; b=2");
    }

    #[test]
    fn response_headers_lose_marimo_cookie_and_cors() {
        let mut h = HeaderMap::new();
        h.append(
            header::SET_COOKIE,
            HeaderValue::from_static("session_2718=abc; HttpOnly"),
        );
        h.append(header::SET_COOKIE, HeaderValue::from_static("pref=1"));
        h.insert("access-control-allow-origin", HeaderValue::from_static("*"));
        h.insert(
            "access-control-allow-credentials",
            HeaderValue::from_static("true"),
        );
        h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        let csp = HeaderValue::from_static("frame-ancestors https://host.example");
        rewrite_response_headers(&mut h);
        // As the browser gets it: the pipeline adds the security headers to every response.
        crate::respond::Security::new(csp.clone()).harden(&mut h);
        let cookies: Vec<_> = h.get_all(header::SET_COOKIE).iter().collect();
        assert_eq!(cookies, vec!["pref=1"]);
        assert!(h.keys().all(|k| !k.as_str().starts_with("access-control-")));
        assert_eq!(h[header::CONTENT_SECURITY_POLICY], csp);
        assert_eq!(h[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
        assert!(h.get(header::X_FRAME_OPTIONS).is_none());
        assert!(h.get(header::TRANSFER_ENCODING).is_none());
    }
}
