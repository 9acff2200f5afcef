//! The fake control plane the edge's tests talk to: the three internal endpoints the edge
//! calls, answered from memory, over HTTP or HTTPS.
//!
//! - `GET /internal/v1/routes[?after=V&waitSeconds=S]`: the snapshot in [`FakeControl::routes`]
//!   as a `RoutesFeed` snapshot; held while its version equals `after`, for `waitSeconds` but at
//!   most 2 s (the real one holds up to 30 s), then an empty change list. The fake keeps no
//!   change log, so it never answers changes: the real feed's changes are tested against the
//!   real control plane.
//! - `POST /internal/v1/activity`: 204, the batch kept in [`FakeControl::activity`].
//! - `POST /internal/v1/redeem`: 200 the first time a `jti` is seen, 409 after.
//!
//! As the real router does: an unknown path is a 404, a request without the internal token
//! ([`INTERNAL_TOKEN`]) a 401, and errors are `{"error":{"code","message"}}` JSON.
//! `tests/control_contract.rs` checks each answer against the real control plane's.

use std::collections::HashSet;
use std::convert::Infallible;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use marina_config::wire::{RouteChanges, RoutesFeed, RoutesSnapshot};
use serde_json::json;
use tokio::net::TcpListener;

/// The internal token the fake accepts (`internal.token` of the edge under test).
pub const INTERNAL_TOKEN: &str = "internal-test-token";

/// Longest the fake holds a routes long poll.
const MAX_HOLD: Duration = Duration::from_secs(2);

/// A minimal control plane for the edge: the routes feed, replay checks
/// (`POST /internal/v1/redeem`: 200 first, 409 after) and activity batches (kept).
pub struct FakeControl {
    /// `http://127.0.0.1:<port>` or `https://…`.
    pub url: String,
    /// Every activity batch received, as JSON.
    pub activity: Arc<Mutex<Vec<serde_json::Value>>>,
    /// What `GET /internal/v1/routes` serves.
    pub routes: Arc<Mutex<RoutesSnapshot>>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeControl {
    pub async fn start() -> FakeControl {
        Self::serve(None).await
    }

    /// The same over TLS, with this certificate chain and key (PEM files).
    pub async fn start_tls(cert: &Path, key: &Path) -> FakeControl {
        let certs = rustls_pemfile::certs(&mut std::fs::read(cert).unwrap().as_slice())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = rustls_pemfile::private_key(&mut std::fs::read(key).unwrap().as_slice())
            .unwrap()
            .unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        Self::serve(Some(tokio_rustls::TlsAcceptor::from(Arc::new(config)))).await
    }

    async fn serve(tls: Option<tokio_rustls::TlsAcceptor>) -> FakeControl {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let used: Arc<Mutex<HashSet<String>>> = Arc::default();
        let activity: Arc<Mutex<Vec<serde_json::Value>>> = Arc::default();
        let routes: Arc<Mutex<RoutesSnapshot>> = Arc::default();
        let (act2, routes2) = (activity.clone(), routes.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = l.accept().await else {
                    return;
                };
                let (used, activity, routes) = (used.clone(), act2.clone(), routes2.clone());
                let tls = tls.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (used, activity, routes) =
                            (used.clone(), activity.clone(), routes.clone());
                        async move {
                            Ok::<_, Infallible>(
                                control_answer(req, &used, &activity, &routes).await,
                            )
                        }
                    });
                    let builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    match tls {
                        None => {
                            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                        }
                        Some(acceptor) => {
                            // A client that does not trust the certificate gives up here.
                            if let Ok(s) = acceptor.accept(stream).await {
                                let _ = builder.serve_connection(TokioIo::new(s), svc).await;
                            }
                        }
                    }
                });
            }
        });
        FakeControl {
            url: format!("{scheme}://{addr}"),
            activity,
            routes,
            task,
        }
    }

    /// Stops answering: the listener goes away.
    pub fn kill(&self) {
        self.task.abort();
    }
}

/// The value of `key` in a query string.
fn query_value<T: std::str::FromStr>(query: &str, key: &str) -> Option<T> {
    query
        .split('&')
        .find_map(|p| p.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
}

async fn control_answer(
    req: Request<Incoming>,
    used: &Mutex<HashSet<String>>,
    activity: &Mutex<Vec<serde_json::Value>>,
    routes: &Mutex<RoutesSnapshot>,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    if !matches!(
        path.as_str(),
        "/internal/v1/routes" | "/internal/v1/redeem" | "/internal/v1/activity"
    ) {
        return error(404, "route_not_found", "no such route");
    }
    let authed = req.headers().get("authorization").map(|v| v.as_bytes())
        == Some(format!("Bearer {INTERNAL_TOKEN}").as_bytes());
    if !authed {
        return error(401, "unauthenticated", "missing or invalid credentials");
    }
    let query = req.uri().query().unwrap_or("").to_string();
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let status = if path == "/internal/v1/routes" {
        // Long poll: hold while the version equals `after`, for `waitSeconds` (at most 2 s).
        let after: Option<u64> = query_value(&query, "after");
        let wait = Duration::from_secs(query_value(&query, "waitSeconds").unwrap_or(0));
        let deadline = tokio::time::Instant::now() + wait.min(MAX_HOLD);
        while after == Some(routes.lock().unwrap().version)
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // The fake keeps no change log: anything new is a whole snapshot (which the real feed
        // also answers when it cannot resume), nothing new an empty change list.
        let snap = routes.lock().unwrap().clone();
        let feed = if after == Some(snap.version) {
            RoutesFeed::Changes(RouteChanges {
                from: snap.version,
                version: snap.version,
                changes: vec![],
            })
        } else {
            RoutesFeed::Snapshot(snap)
        };
        let snap = serde_json::to_vec(&feed).unwrap();
        return Response::builder()
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(snap)))
            .unwrap();
    } else if path == "/internal/v1/redeem" {
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let jti = v["jti"].as_str().unwrap().to_string();
        if !used.lock().unwrap().insert(jti) {
            return error(409, "token_replayed", "this link was already used");
        }
        200
    } else {
        activity
            .lock()
            .unwrap()
            .push(serde_json::from_slice(&body).unwrap());
        204
    };
    Response::builder()
        .status(status)
        .body(Full::new(Bytes::new()))
        .unwrap()
}

/// An error answer as the control plane gives one.
fn error(status: u16, code: &str, message: &str) -> Response<Full<Bytes>> {
    let body = json!({"error": {"code": code, "message": message}});
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}
