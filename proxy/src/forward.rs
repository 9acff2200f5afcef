//! Phase 4, `forward` (HTTP): streams the request to the notebook's Marimo server and its
//! response back. WebSockets are relayed by [`crate::ws`].
//!
//! Runs only for requests `authorize` let through. It rewrites headers so that no browser
//! credential reaches the kernel (Marimo copies every request header and cookie into
//! `mo.app_meta().request`) and no Marimo credential reaches the browser, then streams bodies
//! without collecting them. Errors: the upstream refused the connection or did not answer in
//! time (502 "notebook not responding").
//!
//! Upstream connections: each HTTP/1.1 browser connection has its own ([`Affinity`]), so the hot
//! path shares no pool (and no pool lock) across connections. HTTP/2 browser connections use
//! hyper's pool, keyed by scheme and `host:port`: a Marimo server's address is its own while it
//! runs and every request carries that notebook's own Marimo token, so a pooled connection never
//! serves another notebook's credentials; after a restart on the same address the old
//! connections fail and are replaced.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, Uri, Version};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use crate::activity::StreamGuard;
use crate::body::EdgeBody;
use crate::error::{EdgeError, ErrorKind};
use crate::metrics::Metrics;
use crate::route::RouteEntry;

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1), plus the
/// pre-standard ones proxies still meet.
const HOP_BY_HOP: &[HeaderName] = &[
    header::CONNECTION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
];

/// Is this a header by which a client could claim an identity or a network position that
/// the notebook (or code in it) might believe? Only the edge sets such headers.
pub fn is_identity_header(name: &str) -> bool {
    name == "forwarded"
        || name.starts_with("x-forwarded-")
        || name.starts_with("x-remote-")
        || name.starts_with("x-auth-request-")
        || name.starts_with("x-marina-")
        || matches!(
            name,
            "x-real-ip"
                | "remote-user"
                | "x-user"
                | "x-email"
                | "x-client-ip"
                | "true-client-ip"
                | "x-request-id"
        )
}

/// Per-request facts the header rewrite needs.
pub struct ForwardInfo<'a> {
    pub peer: IpAddr,
    pub proto: &'static str,
    pub host: Option<&'a HeaderValue>,
    pub request_id: HeaderValue,
}

/// Rewrites request headers for the upstream (used for HTTP and WebSocket handshakes).
pub fn rewrite_request_headers(
    headers: &mut HeaderMap,
    cookie_names: &[&str],
    route: &RouteEntry,
    info: ForwardInfo<'_>,
) {
    remove_hop_by_hop(headers);
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
    // The browser's credentials are for the edge, not the notebook.
    headers.remove(header::AUTHORIZATION);
    strip_cookies(headers, cookie_names);
    let identity: Vec<HeaderName> = headers
        .keys()
        .filter(|n| is_identity_header(n.as_str()))
        .cloned()
        .collect();
    for n in identity {
        headers.remove(n);
    }
    headers.insert(header::AUTHORIZATION, route.upstream_auth.clone());
    if let Ok(v) = HeaderValue::try_from(info.peer.to_string()) {
        headers.insert("x-forwarded-for", v);
    }
    headers.insert("x-forwarded-proto", HeaderValue::from_static(info.proto));
    if let Some(h) = info.host {
        headers.insert("x-forwarded-host", h.clone());
        headers.insert(header::HOST, h.clone());
    }
    headers.insert("x-request-id", info.request_id);
}

fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // Headers named in `Connection` are hop-by-hop too.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::try_from(t.trim()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    for n in HOP_BY_HOP {
        headers.remove(n);
    }
}

/// Removes the edge's cookies from `Cookie`, keeping the others (joined into one header, as
/// HTTP/1.1 requires).
pub fn strip_cookies(headers: &mut HeaderMap, names: &[&str]) {
    if !headers.contains_key(header::COOKIE) {
        return;
    }
    let mut kept = String::new();
    let mut changed = false;
    let mut count = 0;
    for v in headers.get_all(header::COOKIE) {
        count += 1;
        let Ok(v) = v.to_str() else {
            changed = true;
            continue;
        };
        for pair in v.split(';') {
            let name = pair.split('=').next().unwrap_or("").trim();
            if pair.trim().is_empty() {
                continue;
            }
            if names.contains(&name) {
                changed = true;
                continue;
            }
            if !kept.is_empty() {
                kept.push_str("; ");
            }
            kept.push_str(pair.trim());
        }
    }
    if !changed && count == 1 {
        return;
    }
    headers.remove(header::COOKIE);
    if !kept.is_empty() {
        if let Ok(v) = HeaderValue::try_from(kept) {
            headers.insert(header::COOKIE, v);
        }
    }
}

/// Rewrites response headers for the browser: no Marimo credential cookie, no upstream CORS,
/// framing only by the host application, no MIME sniffing.
pub fn rewrite_response_headers(headers: &mut HeaderMap, csp: &HeaderValue) {
    remove_hop_by_hop(headers);
    headers.remove("keep-alive");
    if headers.contains_key(header::SET_COOKIE) {
        let kept: Vec<HeaderValue> = headers
            .get_all(header::SET_COOKIE)
            .iter()
            .filter(|v| !v.as_bytes().starts_with(b"session_"))
            .cloned()
            .collect();
        headers.remove(header::SET_COOKIE);
        for v in kept {
            headers.append(header::SET_COOKIE, v);
        }
    }
    let cors: Vec<HeaderName> = headers
        .keys()
        .filter(|n| n.as_str().starts_with("access-control-"))
        .cloned()
        .collect();
    for n in cors {
        headers.remove(n);
    }
    headers.remove(header::X_FRAME_OPTIONS);
    headers.append(header::CONTENT_SECURITY_POLICY, csp.clone());
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
}

/// The HTTP forwarder: a pooled keep-alive client to every upstream.
pub struct Forwarder {
    /// The shared pool, for HTTP/2 browser connections (many concurrent requests each).
    client: Client<HttpConnector, Incoming>,
    connect_timeout: Duration,
    response_timeout: Duration,
    pub csp: HeaderValue,
    metrics: &'static Metrics,
}

// === impl Forwarder ===

impl Forwarder {
    pub fn new(
        connect_timeout: Duration,
        response_timeout: Duration,
        csp: HeaderValue,
        metrics: &'static Metrics,
    ) -> Forwarder {
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(connect_timeout));
        http.set_nodelay(true);
        http.enforce_http(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(64)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(http);
        Forwarder {
            client,
            connect_timeout,
            response_timeout,
            csp,
            metrics,
        }
    }

    /// Sends the (already rewritten) request upstream and streams the answer back.
    ///
    /// `affinity` is the browser connection's own upstream connection slot (HTTP/1.1 browser
    /// connections); without it (HTTP/2) the shared pool is used.
    pub async fn forward(
        &self,
        route: &RouteEntry,
        mut parts: http::request::Parts,
        body: Incoming,
        guard: Option<StreamGuard>,
        affinity: Option<&Affinity>,
    ) -> Result<Response<EdgeBody>, EdgeError> {
        let pq = parts
            .uri
            .path_and_query()
            .cloned()
            .ok_or_else(|| EdgeError::new(ErrorKind::BadRequest, "no path"))?;
        parts.version = Version::HTTP_11;
        let started = Instant::now();
        let resp = match affinity {
            Some(a) => {
                // An HTTP/1 client connection takes the origin form.
                parts.uri = Uri::from(pq);
                self.send_affine(a, route, Request::from_parts(parts, body))
                    .await?
            }
            None => {
                parts.uri = Uri::builder()
                    .scheme("http")
                    .authority(route.upstream.clone())
                    .path_and_query(pq)
                    .build()
                    .map_err(|e| {
                        EdgeError::new(ErrorKind::BadRequest, "upstream uri").with_cause(e)
                    })?;
                let req = Request::from_parts(parts, body);
                match tokio::time::timeout(self.response_timeout, self.client.request(req)).await {
                    Err(_) => {
                        return Err(EdgeError::new(ErrorKind::UpstreamTimeout, "response head"))
                    }
                    Ok(Err(e)) if e.is_connect() => {
                        return Err(
                            EdgeError::new(ErrorKind::UpstreamConnect, "connect").with_cause(e)
                        )
                    }
                    Ok(Err(e)) => {
                        return Err(
                            EdgeError::new(ErrorKind::UpstreamProtocol, "request").with_cause(e)
                        )
                    }
                    Ok(Ok(r)) => r,
                }
            }
        };
        self.metrics
            .upstream_latency
            .observe(started.elapsed().as_secs_f64());
        let (mut parts, body) = resp.into_parts();
        rewrite_response_headers(&mut parts.headers, &self.csp);
        // Only an event stream that actually started counts as an open stream.
        let is_stream = parts
            .headers
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
        let body = EdgeBody::Upstream {
            inner: body,
            _guard: if is_stream { guard } else { None },
            metrics: self.metrics,
        };
        Ok(Response::from_parts(parts, body))
    }
}

/// The upstream connection of ONE browser connection (HTTP/1.1), so the hot path needs no
/// connection pool shared across connections (and no pool lock).
///
/// An HTTP/1.1 browser connection sends its next request only after the previous response was
/// written completely, so the upstream connection is always free again by then: one slot is
/// enough. The slot is keyed by notebook, session (run) and address, so a connection is never
/// reused for another notebook or for a restarted one that got the same port. The mutex is
/// per browser connection and uncontended (requests on it are sequential); it is never held
/// across an `.await`.
#[derive(Default)]
pub struct Affinity {
    slot: std::sync::Mutex<Option<(AffinityKey, http1::SendRequest<Incoming>)>>,
}

#[derive(Clone, PartialEq, Eq)]
struct AffinityKey {
    notebook: marina_config::Id,
    session: marina_config::Id,
    upstream: http::uri::Authority,
}

impl AffinityKey {
    fn of(route: &RouteEntry) -> AffinityKey {
        AffinityKey {
            notebook: route.route.notebook_id,
            session: route.route.session_id,
            upstream: route.upstream.clone(),
        }
    }
}

impl Affinity {
    fn take(&self, key: &AffinityKey) -> Option<http1::SendRequest<Incoming>> {
        let mut slot = self.slot.lock().ok()?;
        match slot.take() {
            Some((k, s)) if k == *key && !s.is_closed() => Some(s),
            _ => None,
        }
    }

    fn put(&self, key: AffinityKey, sender: http1::SendRequest<Incoming>) {
        if let Ok(mut slot) = self.slot.lock() {
            *slot = Some((key, sender));
        }
    }
}

impl Forwarder {
    async fn send_affine(
        &self,
        affinity: &Affinity,
        route: &RouteEntry,
        req: Request<Incoming>,
    ) -> Result<Response<Incoming>, EdgeError> {
        let key = AffinityKey::of(route);
        let mut sender = match affinity.take(&key) {
            Some(s) => s,
            None => self.connect(route).await?,
        };
        // Ready at once unless the upstream closed the idle connection meanwhile.
        if sender.ready().await.is_err() {
            sender = self.connect(route).await?;
            sender.ready().await.map_err(|e| {
                EdgeError::new(ErrorKind::UpstreamConnect, "upstream connection").with_cause(e)
            })?;
        }
        let response = sender.try_send_request(req);
        affinity.put(key.clone(), sender);
        let mut err = match tokio::time::timeout(self.response_timeout, response).await {
            Err(_) => return Err(EdgeError::new(ErrorKind::UpstreamTimeout, "response head")),
            Ok(Ok(r)) => return Ok(r),
            Ok(Err(e)) => e,
        };
        // The upstream closed the idle connection just as the request went out (Marimo's
        // server drops keep-alive connections after a few seconds). The request was not written,
        // so it can be sent again, once, on a fresh connection.
        let Some(req) = err.take_message() else {
            return Err(
                EdgeError::new(ErrorKind::UpstreamProtocol, "request").with_cause(err.into_error())
            );
        };
        let mut fresh = self.connect(route).await?;
        fresh.ready().await.map_err(|e| {
            EdgeError::new(ErrorKind::UpstreamConnect, "upstream connection").with_cause(e)
        })?;
        let response = fresh.send_request(req);
        affinity.put(key, fresh);
        match tokio::time::timeout(self.response_timeout, response).await {
            Err(_) => Err(EdgeError::new(ErrorKind::UpstreamTimeout, "response head")),
            Ok(Err(e)) => Err(EdgeError::new(ErrorKind::UpstreamProtocol, "request").with_cause(e)),
            Ok(Ok(r)) => Ok(r),
        }
    }

    async fn connect(&self, route: &RouteEntry) -> Result<http1::SendRequest<Incoming>, EdgeError> {
        let stream = match tokio::time::timeout(
            self.connect_timeout,
            TcpStream::connect(route.upstream.as_str()),
        )
        .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                return Err(EdgeError::new(ErrorKind::UpstreamConnect, "connect").with_cause(e))
            }
            Err(_) => {
                return Err(EdgeError::new(
                    ErrorKind::UpstreamConnect,
                    "connect timeout",
                ))
            }
        };
        let _ = stream.set_nodelay(true);
        let (sender, conn) = http1::handshake(TokioIo::new(stream)).await.map_err(|e| {
            EdgeError::new(ErrorKind::UpstreamConnect, "upstream handshake").with_cause(e)
        })?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream connection ended");
            }
        });
        Ok(sender)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::{tests::path_addressing, RouteTable};
    use marina_config::wire::{Route, RoutesSnapshot};
    use marina_config::Id;

    fn entry() -> std::sync::Arc<RouteEntry> {
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
            }],
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
        let host = HeaderValue::from_static("127.0.0.1:8000");
        rewrite_request_headers(
            &mut h,
            &["marina", "__Host-marina"],
            &entry(),
            ForwardInfo {
                peer: "10.0.0.9".parse().unwrap(),
                proto: "https",
                host: Some(&host),
                request_id: HeaderValue::from_static("rid"),
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
        rewrite_response_headers(&mut h, &csp);
        let cookies: Vec<_> = h.get_all(header::SET_COOKIE).iter().collect();
        assert_eq!(cookies, vec!["pref=1"]);
        assert!(h.keys().all(|k| !k.as_str().starts_with("access-control-")));
        assert_eq!(h[header::CONTENT_SECURITY_POLICY], csp);
        assert_eq!(h[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
        assert!(h.get(header::X_FRAME_OPTIONS).is_none());
        assert!(h.get(header::TRANSFER_ENCODING).is_none());
    }
}
