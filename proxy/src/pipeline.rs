//! The request pipeline: the named phases in order, sharing one [`RequestCtx`]:
//!
//! `route` → `authenticate` → `authorize` → `forward` (HTTP or WebSocket) → `activity`
//! (always), with every error turned into a response by [`respond::error`] and every response
//! given the security headers by [`Security::harden`], once, in [`handle`]. See
//! `docs/request-lifecycle.md`. Building the edge and accepting connections is `edge`'s job.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use http::request::Parts;
use http::{header, HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use tokio::sync::watch;

use crate::activity;
use crate::authenticate::{Authenticator, Identity};
use crate::authorize::{self, Decision, Policy, SessionBinding, Transport};
use crate::error::{EdgeError, ErrorKind};
use crate::forward::body::EdgeBody;
use crate::forward::{Affinity, ForwardInfo, Forwarder, RequestId};
use crate::metrics::Metrics;
use crate::respond::{self, Security};
use crate::route::{self, locate, Located, RouteEntry, RouteTable, Target};
use crate::ws::{self, RelayCtx, WsConfig};

/// Everything a request needs, shared by all connections (immutable or internally lock-free).
pub(crate) struct Shared {
    pub addressing: marina_config::Addressing,
    pub routes: Arc<RouteTable>,
    pub auth: Authenticator,
    /// Binds Marimo session ids to members (`authorize`'s key).
    pub binding: SessionBinding,
    pub policy: Policy,
    pub forwarder: Forwarder,
    /// The security headers every response gets.
    pub security: Security,
    pub ws: WsConfig,
    pub metrics: &'static Metrics,
    /// Flipped on shutdown; every open WebSocket holds a receiver, so `closed()` on the sender
    /// tells when the last one is gone.
    pub ws_shutdown: watch::Sender<bool>,
    /// `https` behind TLS or when the public URL says so (TLS terminated in front).
    pub proto: &'static str,
    pub request_ids: AtomicU64,
    pub request_id_prefix: u32,
    /// Names of the edge's cookie that are stripped before forwarding (with and without the
    /// `__Host-` prefix, whatever the current configuration: an old cookie must not leak either).
    pub cookie_names: [String; 2],
}

/// What one browser connection carries from request to request.
pub(crate) struct Downstream {
    /// Its `X-Forwarded-For` value, formatted once per connection rather than per request.
    forwarded_for: HeaderValue,
    /// Its own upstream connection (see `forward::Affinity`).
    upstream: Arc<Affinity>,
}

impl Downstream {
    pub fn new(peer: SocketAddr) -> Downstream {
        Downstream {
            forwarded_for: HeaderValue::try_from(peer.ip().to_string())
                .unwrap_or(HeaderValue::from_static("unknown")),
            upstream: Arc::new(Affinity::default()),
        }
    }
}

/// Per-request context shared by the phases (Pingora's `CTX`): the request's facts, computed
/// once, and what each phase found.
struct RequestCtx {
    /// Answer errors as JSON (API calls) rather than HTML pages.
    wants_json: bool,
    /// The request's host: the URI's authority (HTTP/2's `:authority`, or an absolute-form
    /// request target), else the `Host` header (RFC 9112 §3.2.2, RFC 9113 §8.3.1). The one
    /// precedence: `route` finds the notebook by it, and the notebook gets it as `Host` and
    /// `X-Forwarded-Host`.
    host: Option<HeaderValue>,
    in_handshake: bool,
    route: Option<Arc<RouteEntry>>,
    identity: Option<Identity>,
    decision: Option<Decision>,
}

impl RequestCtx {
    fn new(req: &Request<Incoming>) -> RequestCtx {
        let headers = req.headers();
        let wants_json = !headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|a| a.contains("text/html"));
        let host = match req.uri().authority() {
            Some(a) => HeaderValue::try_from(a.as_str()).ok(),
            None => headers.get(header::HOST).cloned(),
        };
        RequestCtx {
            wants_json,
            host,
            in_handshake: false,
            route: None,
            identity: None,
            decision: None,
        }
    }
}

pub(crate) fn now_s() -> u64 {
    (activity::now_ms() / 1000) as u64
}

/// Runs the phases for one request and answers. Never fails: errors become responses here.
pub(crate) async fn handle(
    shared: Arc<Shared>,
    downstream: Arc<Downstream>,
    req: Request<Incoming>,
) -> Result<Response<EdgeBody>, Infallible> {
    let mut ctx = RequestCtx::new(&req);
    let mut resp = match pipeline(&shared, &mut ctx, &downstream, req).await {
        Ok(r) => r,
        Err(e) => {
            shared.metrics.error(e.kind, ctx.in_handshake);
            if e.kind == ErrorKind::Internal {
                tracing::warn!(reason = e.kind.reason(), error = %e, "request failed");
            } else {
                tracing::debug!(reason = e.kind.reason(), error = %e, "request refused");
            }
            respond::error(&e, ctx.wants_json)
        }
    };
    // Every response of a notebook's origin, error pages included (the host application frames
    // them too): only the allowed origins may embed it.
    shared.security.harden(resp.headers_mut());
    record_activity(&ctx);
    shared.metrics.response(resp.status().as_u16());
    Ok(resp)
}

async fn pipeline(
    shared: &Shared,
    ctx: &mut RequestCtx,
    downstream: &Downstream,
    req: Request<Incoming>,
) -> Result<Response<EdgeBody>, EdgeError> {
    let loc = route_phase(shared, ctx, &req)?;
    match loc.target {
        Target::AddSlash => {
            return respond::redirect(
                StatusCode::PERMANENT_REDIRECT,
                &route::add_slash_location(req.uri()),
            )
        }
        Target::Handshake => return handshake_phase(shared, ctx, &loc, &req).await,
        Target::Notebook => {}
    }
    let route = ctx
        .route
        .clone()
        .ok_or_else(|| EdgeError::new(ErrorKind::NotRunning, "route"))?;
    let identity = authenticate_phase(shared, ctx, &loc, &route, &req)?;
    let handshake = ws::handshake_kind(&req);
    let (mut parts, body) = req.into_parts();
    let decision = authorize_phase(shared, ctx, &loc, &route, &identity, &mut parts, handshake)?;
    if decision.kiosk_redirect {
        return respond::redirect(StatusCode::FOUND, &authorize::kiosk_location(&parts.uri));
    }
    let info = ForwardInfo {
        forwarded_for: &downstream.forwarded_for,
        proto: shared.proto,
        host: ctx.host.as_ref(),
        request_id: RequestId {
            prefix: shared.request_id_prefix,
            n: shared.request_ids.fetch_add(1, Ordering::Relaxed),
        },
    };
    let names = [
        shared.cookie_names[0].as_str(),
        shared.cookie_names[1].as_str(),
    ];
    if decision.transport == Transport::WebSocket {
        let kind = handshake.unwrap_or(ws::Handshake::Upgrade);
        return websocket_phase(shared, &route, identity, parts, kind, &names, info).await;
    }
    // Phase 4, `forward` (HTTP).
    let guard = (decision.transport == Transport::EventStream).then(|| {
        route
            .activity
            .member(identity.member, identity.mode)
            .open_stream(&shared.metrics.streams_open)
    });
    // HTTP/1 browser connections carry one request at a time: they get their own upstream
    // connection. HTTP/2 ones multiplex and use the shared pool.
    let affinity = (parts.version <= http::Version::HTTP_11).then_some(&downstream.upstream);
    shared
        .forwarder
        .forward(&route, parts, body, guard, affinity, &names, info)
        .await
}

/// Phase 1, `route`: the notebook and its route entry (`None`: not running), from the host and
/// path.
fn route_phase(
    shared: &Shared,
    ctx: &mut RequestCtx,
    req: &Request<Incoming>,
) -> Result<Located, EdgeError> {
    let host = ctx.host.as_ref().and_then(|h| h.to_str().ok());
    let loc = locate(&shared.addressing, host, req.uri().path())?;
    ctx.route = shared.routes.get(loc.notebook);
    Ok(loc)
}

/// Phase 2, handshake variant: redeem the URL token, answer with the cookie.
async fn handshake_phase(
    shared: &Shared,
    ctx: &mut RequestCtx,
    loc: &Located,
    req: &Request<Incoming>,
) -> Result<Response<EdgeBody>, EdgeError> {
    ctx.in_handshake = true;
    ctx.wants_json = false;
    let hs = shared
        .auth
        .handshake(
            loc,
            req.uri().path(),
            req.uri().query(),
            ctx.route.as_deref(),
            now_s(),
        )
        .await?;
    shared.metrics.handshake_ok.inc();
    ctx.identity = Some(hs.identity);
    respond::handshake(&hs.location, hs.set_cookie)
}

/// Phase 2, `authenticate` (cookie).
fn authenticate_phase(
    shared: &Shared,
    ctx: &mut RequestCtx,
    loc: &Located,
    route: &RouteEntry,
    req: &Request<Incoming>,
) -> Result<Identity, EdgeError> {
    let identity = shared.auth.session(req.headers(), loc, route, now_s())?;
    ctx.identity = Some(identity);
    Ok(identity)
}

/// Phase 3, `authorize`: judges and rewrites the request in place.
fn authorize_phase(
    shared: &Shared,
    ctx: &mut RequestCtx,
    loc: &Located,
    route: &RouteEntry,
    identity: &Identity,
    parts: &mut Parts,
    handshake: Option<ws::Handshake>,
) -> Result<Decision, EdgeError> {
    if handshake == Some(ws::Handshake::ExtendedConnect) {
        // RFC 8441 §4: HTTP/2's form of the `GET` upgrade. From here on it is that `GET`, so
        // authorize judges both forms by the same rules.
        parts.method = http::Method::GET;
    }
    let decision = shared.policy.authorize(
        &shared.binding,
        identity,
        parts,
        loc.base_len,
        handshake.is_some(),
        &route.origin,
    )?;
    ctx.decision = Some(decision);
    Ok(decision)
}

/// Phase 4, `forward` (WebSocket): the upstream handshake, then the relay in its own task.
async fn websocket_phase(
    shared: &Shared,
    route: &Arc<RouteEntry>,
    identity: Identity,
    mut parts: Parts,
    kind: ws::Handshake,
    names: &[&str; 2],
    info: ForwardInfo<'_>,
) -> Result<Response<EdgeBody>, EdgeError> {
    let on_upgrade = parts
        .extensions
        .remove::<hyper::upgrade::OnUpgrade>()
        .ok_or_else(|| EdgeError::new(ErrorKind::BadRequest, "not upgradable"))?;
    let activity = route.activity.member(identity.member, identity.mode);
    let relay = RelayCtx {
        identity,
        guard: activity.open_stream(&shared.metrics.websockets_open),
        activity,
        routes: shared.routes.clone(),
        shutdown: shared.ws_shutdown.subscribe(),
        metrics: shared.metrics,
        config: shared.ws,
    };
    ws::upgrade(route, &parts, names, &info, kind, on_upgrade, relay).await
}

/// Phase 5, `activity`: runs for every request, failed or not. A request counts when it was
/// authorized and is not one of the UI's timers, even if the upstream then failed (the person
/// was there).
fn record_activity(ctx: &RequestCtx) {
    if let (Some(route), Some(who), Some(d)) = (&ctx.route, &ctx.identity, &ctx.decision) {
        if d.activity {
            route.activity.touch(who.member, who.mode);
        }
    }
}
