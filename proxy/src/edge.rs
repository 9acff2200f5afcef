//! The edge: building it ([`Edge::new`]: keys, replay journal, routes source, TLS) and serving
//! it ([`Edge::serve`]: the background tasks, the accept loop with TLS and the first-byte
//! timeout, graceful shutdown and draining). Each request is handed to
//! [`crate::pipeline::handle`], which runs the named phases.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use marina_config::settings::ReplayStore as ReplayChoice;
use marina_config::Settings;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::admin;
use crate::authenticate::cookie::{self, CookieKeys};
use crate::authenticate::replay::{MemoryReplay, ReplayStore};
use crate::authenticate::token::TokenVerifier;
use crate::authenticate::Authenticator;
use crate::authorize::{Policy, SessionBinding};
use crate::error::ProxyError;
use crate::forward::Forwarder;
use crate::metrics::Metrics;
use crate::pipeline::{handle, now_s, Downstream, Shared};
use crate::respond::Security;
use crate::route::RouteTable;
use crate::tls;
use crate::uplink::client::ControlClient;
use crate::uplink::{feed, report};
use crate::ws::WsConfig;

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
        Arc<tls::CertResolver>,
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
        let secrets = if p.cookie.keys.is_empty() {
            let path = settings.data_dir.join("cookie-key");
            let hex = marina_config::secrets::load_or_create_hex(&path, 32).map_err(|source| {
                ProxyError::File {
                    what: "cookie key",
                    path: path.clone(),
                    source,
                }
            })?;
            cookie::parse_secrets(&[hex]).ok_or_else(|| ProxyError::Key {
                what: "cookie key (64 hex characters)",
                path: path.display().to_string(),
                message: "not 32 hex-encoded bytes".into(),
            })?
        } else {
            cookie::parse_secrets(&p.cookie.keys).ok_or_else(|| {
                ProxyError::Config("proxy.cookie.keys: each key must be 64 hex characters".into())
            })?
        };
        // Both from the same secrets, as `cookie` derives them: the sealing keys for
        // `authenticate`, the session-binding key for `authorize`.
        let keys = CookieKeys::new(&secrets).expect("parse_secrets yields at least one secret");
        let binding = SessionBinding::new(cookie::session_binding_key(&secrets[0]));
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
                let snap = feed::load_file(path)?;
                routes.apply(snap).map_err(ProxyError::Routes)?;
                Source::File(path.clone())
            }
            None => Source::Control,
        };
        let tls = match &p.tls {
            Some(t) => {
                let (acc, res) = tls::acceptor(t)?;
                Some((acc, res, t.clone()))
            }
            None => None,
        };
        let security = Security::from_settings(settings)?;
        let t = &p.timeouts;
        let forwarder = Forwarder::new(
            Duration::from_millis(t.upstream_connect_ms),
            Duration::from_millis(t.upstream_response_ms),
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
            binding,
            policy: Policy {
                interactive_viewers: p.interactive_viewers,
            },
            forwarder,
            security,
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
            Source::File(path) => background.push(tokio::spawn(feed::follow_file(
                path.clone(),
                shared.routes.clone(),
                metrics,
            ))),
            Source::Control => {
                if let Some(c) = &self.control {
                    background.push(tokio::spawn(feed::follow_control(
                        c.clone(),
                        shared.routes.clone(),
                        metrics,
                    )));
                }
            }
        }
        if let Some(c) = &self.control {
            background.push(tokio::spawn(report::report_loop(
                shared.routes.clone(),
                c.clone(),
                self.edge_id.clone(),
                self.activity_interval,
                metrics,
            )));
        }
        let acceptor = match self.tls {
            Some((acc, resolver, settings)) => {
                background.push(tokio::spawn(tls::follow(settings, resolver)));
                Some(acc)
            }
            None => None,
        };
        let (admin_stop, admin_rx) = watch::channel(false);
        let admin_task = tokio::spawn(admin::serve(
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
            spawn_connection(
                stream,
                peer,
                &shared,
                &builder,
                graceful.watcher(),
                acceptor.as_ref(),
                self.header_read,
            );
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

/// Serves one accepted connection in a task of its own, each request through
/// [`handle`]: in clear once its first byte arrived (within `header_read`), or over TLS once the
/// handshake is done (within `header_read`), ALPN choosing HTTP/2 or HTTP/1.1.
fn spawn_connection(
    stream: TcpStream,
    peer: SocketAddr,
    shared: &Arc<Shared>,
    builder: &auto::Builder<TokioExecutor>,
    watcher: Watcher,
    acceptor: Option<&TlsAcceptor>,
    header_read: Duration,
) {
    let _ = stream.set_nodelay(true);
    let shared = shared.clone();
    let downstream = Arc::new(Downstream::new(peer));
    let service = service_fn(move |req| handle(shared.clone(), downstream.clone(), req));
    let builder = builder.clone();
    match acceptor {
        None => {
            tokio::spawn(async move {
                // HTTP version detection waits for the first bytes with no timeout of its own: a
                // client that connects and stays silent would hold the connection forever. Wait
                // for readability (without consuming) first.
                let mut one = [0u8; 1];
                match tokio::time::timeout(header_read, stream.peek(&mut one)).await {
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
            tokio::spawn(async move {
                let tls = match tokio::time::timeout(header_read, acc.accept(stream)).await {
                    Ok(Ok(s)) => s,
                    _ => return,
                };
                // ALPN already chose the protocol: skip version detection (and its missing
                // timeout); HTTP/1.1 then gets the header read timeout at once.
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
