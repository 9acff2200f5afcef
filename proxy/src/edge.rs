//! The edge: start-up ([`Edge::new`]), the accept loop and graceful shutdown ([`Edge::serve`]),
//! and the request pipeline that runs the named phases in order:
//!
//! `route` → `authenticate` → `authorize` → `forward` → `activity` (always), with every error
//! turned into a response by [`crate::error::respond`]. See `docs/request-lifecycle.md`.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{header, HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use marina_config::settings::ReplayStore as ReplayChoice;
use marina_config::Settings;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::activity;
use crate::authenticate::cookie::CookieKeys;
use crate::authenticate::replay::{MemoryReplay, ReplayStore};
use crate::authenticate::token::TokenVerifier;
use crate::authenticate::{Authenticator, Identity};
use crate::authorize::{Decision, Policy, Transport};
use crate::body::EdgeBody;
use crate::control::ControlClient;
use crate::error::{respond, EdgeError, ErrorKind, ProxyError};
use crate::forward::{rewrite_request_headers, Affinity, ForwardInfo, Forwarder, RequestId};
use crate::metrics::Metrics;
use crate::route::{locate, RouteEntry, RouteTable, Target};
use crate::ws::{self, RelayCtx, WsConfig};

/// Everything a request needs, shared by all connections (immutable or internally lock-free).
struct Shared {
    addressing: marina_config::Addressing,
    routes: Arc<RouteTable>,
    auth: Authenticator,
    policy: Policy,
    forwarder: Forwarder,
    ws: WsConfig,
    metrics: &'static Metrics,
    /// Flipped on shutdown; every open WebSocket holds a receiver, so `closed()` on the sender
    /// tells when the last one is gone.
    ws_shutdown: watch::Sender<bool>,
    /// `https` behind TLS or when the public URL says so (TLS terminated in front).
    proto: &'static str,
    request_ids: AtomicU64,
    request_id_prefix: u32,
    /// Names of the edge's cookie that are stripped before forwarding (with and without the
    /// `__Host-` prefix, whatever the current configuration: an old cookie must not leak either).
    cookie_names: [String; 2],
}

/// What one browser connection carries from request to request.
struct Downstream {
    /// Its `X-Forwarded-For` value, formatted once per connection rather than per request.
    forwarded_for: HeaderValue,
    /// Its own upstream connection (see `forward::Affinity`).
    upstream: Arc<Affinity>,
}

/// Per-request context shared by the phases (Pingora's `CTX`).
struct RequestCtx {
    /// Answer errors as JSON (API calls) rather than HTML pages.
    wants_json: bool,
    in_handshake: bool,
    route: Option<Arc<RouteEntry>>,
    identity: Option<Identity>,
    decision: Option<Decision>,
}

enum Source {
    File(std::path::PathBuf),
    Control,
}

/// The edge proxy.
pub struct Edge {
    shared: Arc<Shared>,
    source: Source,
    control: Option<ControlClient>,
    tls: Option<(
        TlsAcceptor,
        Arc<crate::tls::CertResolver>,
        marina_config::settings::TlsSettings,
    )>,
    header_read: Duration,
    grace: Duration,
    activity_interval: Duration,
    edge_id: String,
}

// === impl Edge ===

impl Edge {
    /// Loads keys (public keys, cookie keys), the replay journal and the routes source.
    pub async fn new(settings: &Settings) -> Result<Edge, ProxyError> {
        let p = &settings.proxy;
        if p.control_url.is_empty() && p.routes_file.is_none() {
            return Err(ProxyError::Config(
                "set proxy.control_url (the control plane's routes feed) or proxy.routes_file"
                    .into(),
            ));
        }
        let metrics: &'static Metrics = Box::leak(Box::new(Metrics::new()));
        let addressing = settings.addressing();
        let verifier = TokenVerifier::from_settings(settings)?;
        let keys = if p.cookie.keys.is_empty() {
            let path = settings.data_dir.join("cookie-key");
            let hex = marina_config::secrets::load_or_create_hex(&path, 32).map_err(|source| {
                ProxyError::File {
                    what: "cookie key",
                    path: path.clone(),
                    source,
                }
            })?;
            CookieKeys::from_hex(&[hex]).ok_or_else(|| ProxyError::Key {
                what: "cookie key (64 hex characters)",
                path: path.display().to_string(),
                message: "not 32 hex-encoded bytes".into(),
            })?
        } else {
            CookieKeys::from_hex(&p.cookie.keys).ok_or_else(|| {
                ProxyError::Config("proxy.cookie.keys: each key must be 64 hex characters".into())
            })?
        };
        let control = if p.control_url.is_empty() {
            None
        } else {
            Some(ControlClient::new(
                &p.control_url,
                p.control_ca_file.as_deref(),
                &ControlClient::internal_token(settings)?,
            )?)
        };
        let replay = match p.replay_store {
            ReplayChoice::Memory => ReplayStore::Memory(MemoryReplay::open(
                settings.data_dir.join("edge-replay.log"),
                now_s(),
            )?),
            ReplayChoice::Control => {
                ReplayStore::Control(Box::new(control.clone().ok_or_else(|| {
                    ProxyError::Config(
                        "proxy.replay_store = control needs proxy.control_url".into(),
                    )
                })?))
            }
        };
        let routes = Arc::new(RouteTable::new(metrics, addressing.clone()));
        let source = match &p.routes_file {
            Some(path) => {
                let snap = crate::feed::load_file(path)?;
                routes.apply(snap).map_err(ProxyError::Routes)?;
                Source::File(path.clone())
            }
            None => Source::Control,
        };
        let tls = match &p.tls {
            Some(t) => {
                let (acc, res) = crate::tls::acceptor(t)?;
                Some((acc, res, t.clone()))
            }
            None => None,
        };
        let csp = HeaderValue::try_from(format!(
            "frame-ancestors {}",
            settings.frame_ancestors().join(" ")
        ))
        .map_err(|_| {
            ProxyError::Config("proxy.frame_ancestors: not a valid header value".into())
        })?;
        let t = &p.timeouts;
        let forwarder = Forwarder::new(
            Duration::from_millis(t.upstream_connect_ms),
            Duration::from_millis(t.upstream_response_ms),
            csp,
            metrics,
        );
        let auth = Authenticator::new(settings, verifier, keys, replay);
        let base = p.cookie.name.clone();
        let cookie_names = [base.clone(), format!("__Host-{base}")];
        let edge_id = if p.edge_id.is_empty() {
            // The hostname (a pod name under Kubernetes) and port: unique per replica.
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_else(|_| "edge".into());
            format!("{host}:{}", p.listen.port())
        } else {
            p.edge_id.clone()
        };
        let shared = Shared {
            addressing,
            routes,
            auth,
            policy: Policy {
                interactive_viewers: p.interactive_viewers,
            },
            forwarder,
            ws: WsConfig {
                max_message: p.max_ws_message_bytes as u64,
                ping_every: Duration::from_secs(t.websocket_ping_seconds.max(1)),
                idle_after: Duration::from_secs(t.websocket_idle_seconds.max(2)),
                connect_timeout: Duration::from_millis(t.upstream_connect_ms),
                response_timeout: Duration::from_millis(t.upstream_response_ms),
            },
            metrics,
            ws_shutdown: watch::channel(false).0,
            proto: if tls.is_some() || settings.proxy_is_https() {
                "https"
            } else {
                "http"
            },
            request_ids: AtomicU64::new(0),
            request_id_prefix: rand::random(),
            cookie_names,
        };
        Ok(Edge {
            shared: Arc::new(shared),
            source,
            control,
            tls,
            header_read: Duration::from_millis(t.header_read_ms),
            grace: Duration::from_secs(t.shutdown_grace_seconds),
            activity_interval: Duration::from_millis(p.activity_interval_ms),
            edge_id,
        })
    }

    /// The metrics of this edge (tests read counters from here).
    pub fn metrics(&self) -> &'static Metrics {
        self.shared.metrics
    }

    /// Serves the edge on `listener` and the admin endpoints on `admin` until `shutdown`
    /// resolves, then drains.
    pub async fn serve(
        self,
        listener: TcpListener,
        admin: TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), ProxyError> {
        let shared = self.shared.clone();
        let metrics = shared.metrics;
        let mut background = Vec::new();
        match &self.source {
            Source::File(path) => background.push(tokio::spawn(crate::feed::follow_file(
                path.clone(),
                shared.routes.clone(),
                metrics,
            ))),
            Source::Control => {
                if let Some(c) = &self.control {
                    background.push(tokio::spawn(crate::feed::follow_control(
                        c.clone(),
                        shared.routes.clone(),
                        metrics,
                    )));
                }
            }
        }
        if let Some(c) = &self.control {
            background.push(tokio::spawn(activity::report_loop(
                shared.routes.clone(),
                c.clone(),
                self.edge_id.clone(),
                self.activity_interval,
                metrics,
            )));
        }
        let acceptor = match self.tls {
            Some((acc, resolver, settings)) => {
                background.push(tokio::spawn(crate::tls::follow(settings, resolver)));
                Some(acc)
            }
            None => None,
        };
        let (admin_stop, admin_rx) = watch::channel(false);
        let admin_task = tokio::spawn(crate::admin::serve(
            admin,
            metrics,
            shared.routes.clone(),
            admin_rx,
        ));

        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(self.header_read)
            .keep_alive(true);
        builder
            .http2()
            .timer(TokioTimer::new())
            .keep_alive_interval(Some(Duration::from_secs(30)))
            // WebSockets over HTTP/2 (RFC 8441): browsers then open them on the page's
            // connection instead of a new HTTP/1.1 one.
            .enable_connect_protocol();
        let graceful = GracefulShutdown::new();
        tokio::pin!(shutdown);
        loop {
            let (stream, peer) = tokio::select! {
                _ = &mut shutdown => break,
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = stream.set_nodelay(true);
            let shared = shared.clone();
            let downstream = Arc::new(Downstream {
                forwarded_for: HeaderValue::try_from(peer.ip().to_string())
                    .unwrap_or(HeaderValue::from_static("unknown")),
                upstream: Arc::new(Affinity::default()),
            });
            let service = service_fn(move |req| handle(shared.clone(), downstream.clone(), req));
            let builder = builder.clone();
            let watcher = graceful.watcher();
            match &acceptor {
                None => {
                    let first_byte_timeout = self.header_read;
                    tokio::spawn(async move {
                        // HTTP version detection waits for the first bytes with no timeout of
                        // its own: a client that connects and stays silent would hold the
                        // connection forever. Wait for readability (without consuming) first.
                        let mut one = [0u8; 1];
                        match tokio::time::timeout(first_byte_timeout, stream.peek(&mut one)).await
                        {
                            Ok(Ok(n)) if n > 0 => {}
                            _ => return,
                        }
                        let conn = builder
                            .serve_connection_with_upgrades(TokioIo::new(stream), service)
                            .into_owned();
                        let _ = watcher.watch(conn).await;
                    });
                }
                Some(acc) => {
                    let acc = acc.clone();
                    let handshake_timeout = self.header_read;
                    tokio::spawn(async move {
                        let tls = match tokio::time::timeout(handshake_timeout, acc.accept(stream))
                            .await
                        {
                            Ok(Ok(s)) => s,
                            _ => return,
                        };
                        // ALPN already chose the protocol: skip version detection (and its
                        // missing timeout); HTTP/1.1 then gets the header read timeout at once.
                        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2".as_slice());
                        let builder = if h2 {
                            builder.http2_only()
                        } else {
                            builder.http1_only()
                        };
                        let conn = builder
                            .serve_connection_with_upgrades(TokioIo::new(tls), service)
                            .into_owned();
                        let _ = watcher.watch(conn).await;
                    });
                }
            }
        }
        drop(listener);
        tracing::info!("edge draining");
        let _ = shared.ws_shutdown.send(true);
        let drained = tokio::time::timeout(self.grace, async {
            graceful.shutdown().await;
            shared.ws_shutdown.closed().await;
        })
        .await;
        if drained.is_err() {
            tracing::warn!("shutdown grace period over; dropping remaining connections");
        }
        let _ = admin_stop.send(true);
        let _ = admin_task.await;
        for t in background {
            t.abort();
        }
        Ok(())
    }
}

fn now_s() -> u64 {
    (activity::now_ms() / 1000) as u64
}

/// Runs the phases for one request and answers. Never fails: errors become responses here.
async fn handle(
    shared: Arc<Shared>,
    downstream: Arc<Downstream>,
    req: Request<Incoming>,
) -> Result<Response<EdgeBody>, Infallible> {
    let wants_json = !req
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/html"));
    let mut ctx = RequestCtx {
        wants_json,
        in_handshake: false,
        route: None,
        identity: None,
        decision: None,
    };
    let resp = match pipeline(&shared, &mut ctx, &downstream, req).await {
        Ok(r) => r,
        Err(e) => {
            let m = shared.metrics;
            m.error(e.kind, ctx.in_handshake);
            if e.kind == ErrorKind::Internal {
                tracing::warn!(reason = e.kind.reason(), error = %e, "request failed");
            } else {
                tracing::debug!(reason = e.kind.reason(), error = %e, "request refused");
            }
            let mut resp = respond(&e, ctx.wants_json);
            // Error pages are framed by the host application too: only the allowed origins
            // may embed them, like every other response of a notebook's origin.
            resp.headers_mut().insert(
                header::CONTENT_SECURITY_POLICY,
                shared.forwarder.csp.clone(),
            );
            resp
        }
    };
    record_activity(&ctx);
    shared.metrics.response(resp.status().as_u16());
    Ok(resp)
}

/// Phase 5, `activity`: runs for every request, failed or not. A request counts when it was
/// authorized and is not one of the UI's timers, even if the upstream then failed (the person
/// was there).
fn record_activity(ctx: &RequestCtx) {
    if let (Some(route), Some(_), Some(d)) = (&ctx.route, &ctx.identity, &ctx.decision) {
        if d.activity {
            route.activity.touch();
        }
    }
}

async fn pipeline(
    shared: &Shared,
    ctx: &mut RequestCtx,
    downstream: &Downstream,
    req: Request<Incoming>,
) -> Result<Response<EdgeBody>, EdgeError> {
    // Phase 1: route.
    let host = req.uri().authority().map(|a| a.as_str()).or_else(|| {
        req.headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
    });
    let loc = locate(&shared.addressing, host, req.uri().path())?;
    let route = shared.routes.get(loc.notebook);
    match loc.target {
        Target::AddSlash => {
            let mut to = format!("{}/", req.uri().path());
            if let Some(q) = req.uri().query() {
                to.push('?');
                to.push_str(q);
            }
            return redirect(StatusCode::PERMANENT_REDIRECT, &to);
        }
        Target::Handshake => {
            ctx.in_handshake = true;
            ctx.wants_json = false;
            // Phase 2 (handshake variant): redeem the URL token, answer with the cookie.
            let hs = shared
                .auth
                .handshake(
                    &loc,
                    req.uri().path(),
                    req.uri().query(),
                    route.as_deref(),
                    now_s(),
                )
                .await?;
            shared.metrics.handshake_ok.inc();
            ctx.route = route;
            ctx.identity = Some(hs.identity);
            let mut r = redirect(StatusCode::SEE_OTHER, &hs.location)?;
            let h = r.headers_mut();
            h.insert(header::SET_COOKIE, hs.set_cookie);
            h.insert(
                header::REFERRER_POLICY,
                HeaderValue::from_static("no-referrer"),
            );
            h.insert(
                header::CONTENT_SECURITY_POLICY,
                shared.forwarder.csp.clone(),
            );
            return Ok(r);
        }
        Target::Notebook => {}
    }
    let route = route.ok_or_else(|| EdgeError::new(ErrorKind::NotRunning, "route"))?;
    ctx.route = Some(route.clone());

    // Phase 2: authenticate (cookie).
    let identity = shared.auth.session(req.headers(), &loc, &route, now_s())?;
    ctx.identity = Some(identity);

    // Phase 3: authorize.
    let handshake = ws::handshake_kind(&req);
    let upgrade = handshake.is_some();
    let (mut parts, body) = req.into_parts();
    if handshake == Some(ws::Handshake::ExtendedConnect) {
        // RFC 8441 §4: HTTP/2's form of the `GET` upgrade. From here on it is that `GET`, so
        // authorize judges both forms by the same rules.
        parts.method = http::Method::GET;
    }
    let decision = shared.policy.authorize(
        &shared.auth.keys,
        &identity,
        &mut parts,
        loc.base_len,
        upgrade,
        &route.origin,
    )?;
    ctx.decision = Some(decision);
    if decision.kiosk_redirect {
        let location = match parts.uri.query() {
            Some(q) if !q.is_empty() => format!("{}?{q}&kiosk=true", parts.uri.path()),
            _ => format!("{}?kiosk=true", parts.uri.path()),
        };
        return redirect(StatusCode::FOUND, &location);
    }

    // Phase 4: forward.
    let request_id = RequestId {
        prefix: shared.request_id_prefix,
        n: shared.request_ids.fetch_add(1, Ordering::Relaxed),
    };
    let host = match parts.headers.get(header::HOST) {
        Some(h) => Some(h.clone()),
        None => parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::try_from(a.as_str()).ok()),
    };
    let names = [
        shared.cookie_names[0].as_str(),
        shared.cookie_names[1].as_str(),
    ];
    if decision.transport == Transport::WebSocket {
        rewrite_request_headers(
            &mut parts.headers,
            &names,
            &route,
            ForwardInfo {
                forwarded_for: &downstream.forwarded_for,
                proto: shared.proto,
                host: host.as_ref(),
                request_id,
            },
        );
        let on_upgrade = parts
            .extensions
            .remove::<hyper::upgrade::OnUpgrade>()
            .ok_or_else(|| EdgeError::new(ErrorKind::BadRequest, "not upgradable"))?;
        let pq = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        let relay = RelayCtx {
            identity,
            activity: route.activity.clone(),
            guard: route.activity.open_stream(&shared.metrics.websockets_open),
            routes: shared.routes.clone(),
            shutdown: shared.ws_shutdown.subscribe(),
            metrics: shared.metrics,
            config: shared.ws,
        };
        let kind = handshake.unwrap_or(ws::Handshake::Upgrade);
        let mut resp = ws::upgrade(&route, pq, &parts.headers, kind, on_upgrade, relay).await?;
        resp.headers_mut().insert(
            header::CONTENT_SECURITY_POLICY,
            shared.forwarder.csp.clone(),
        );
        return Ok(resp);
    }
    let guard = (decision.transport == Transport::EventStream)
        .then(|| route.activity.open_stream(&shared.metrics.streams_open));
    // HTTP/1 browser connections carry one request at a time: they get their own upstream
    // connection. HTTP/2 ones multiplex and use the shared pool.
    let affinity = (parts.version <= http::Version::HTTP_11).then_some(&downstream.upstream);
    let info = ForwardInfo {
        forwarded_for: &downstream.forwarded_for,
        proto: shared.proto,
        host: host.as_ref(),
        request_id,
    };
    shared
        .forwarder
        .forward(&route, parts, body, guard, affinity, &names, info)
        .await
}

fn redirect(status: StatusCode, location: &str) -> Result<Response<EdgeBody>, EdgeError> {
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
