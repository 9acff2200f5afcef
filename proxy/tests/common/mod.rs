//! Test helpers: keys and URL tokens, an edge on ephemeral ports with a static routes file, a
//! recording fake upstream, and log capture. Shared with other crates' tests, in
//! `marina-testkit`: the fake control plane, the fake WebSocket upstreams, real Marimo.
#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use marina_config::settings::{PublicKeySetting, ReplayStore};
use marina_config::wire::{AccessMode, Route, RoutesSnapshot, UrlClaims};
use marina_config::{Id, Settings};
use marina_proxy::Edge;
use tokio::net::TcpListener;

pub const ISS: &str = "marina-control";
pub const AUD: &str = "marina-edge";

pub fn id(s: &str) -> Id {
    Id::parse(s).unwrap()
}

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// An Ed25519 key pair generated for the test, as PEM.
pub struct Keys {
    pub private_pem: String,
    pub public_pem: String,
    pub public_raw: Vec<u8>,
}

fn pem(label: &str, der: &[u8]) -> String {
    let b = STANDARD.encode(der);
    let mut s = format!("-----BEGIN {label}-----\n");
    for c in b.as_bytes().chunks(64) {
        s.push_str(std::str::from_utf8(c).unwrap());
        s.push('\n');
    }
    s.push_str(&format!("-----END {label}-----\n"));
    s
}

impl Keys {
    pub fn generate() -> Keys {
        let seed: [u8; 32] = rand::random();
        let kp = ring::signature::Ed25519KeyPair::from_seed_unchecked(&seed).unwrap();
        use ring::signature::KeyPair;
        let public_raw = kp.public_key().as_ref().to_vec();
        let mut pkcs8 = hex("302e020100300506032b657004220420");
        pkcs8.extend_from_slice(&seed);
        let mut spki = hex("302a300506032b6570032100");
        spki.extend_from_slice(&public_raw);
        Keys {
            private_pem: pem("PRIVATE KEY", &pkcs8),
            public_pem: pem("PUBLIC KEY", &spki),
            public_raw,
        }
    }

    pub fn sign(&self, claims: &UrlClaims) -> String {
        let mut h = Header::new(Algorithm::EdDSA);
        h.kid = Some("k1".into());
        let key = EncodingKey::from_ed_pem(self.private_pem.as_bytes()).unwrap();
        jsonwebtoken::encode(&h, claims, &key).unwrap()
    }
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// Claims for `member` on `route` with the given mode, valid now.
pub fn claims(route: &Route, member: Id, mode: AccessMode) -> UrlClaims {
    let t = now();
    UrlClaims {
        iss: ISS.into(),
        aud: AUD.into(),
        sub: member,
        nb: route.notebook_id,
        sid: route.session_id,
        mode,
        jti: format!("jti-{}", rand::random::<u64>()),
        iat: t,
        nbf: t,
        exp: t + 300,
    }
}

/// Options of a test edge.
pub struct EdgeOptions {
    pub replay: ReplayStore,
    pub control_url: String,
    /// `proxy.control_ca_file`.
    pub control_ca_file: Option<PathBuf>,
    pub data_dir: Option<PathBuf>,
    pub interactive_viewers: bool,
    pub cookie_key: String,
    pub max_ws_message_bytes: usize,
    /// Follow the control plane's routes feed instead of a routes file.
    pub control_routes: bool,
    /// Subdomain mode under `nb.test:<port>` (requests carry the notebook's `Host`).
    pub subdomain: bool,
    /// TLS certificate and key files.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// `proxy.timeouts.websocket_ping_seconds` / `websocket_idle_seconds`.
    pub ws_ping_idle: (u64, u64),
    /// `proxy.timeouts.shutdown_grace_seconds`.
    pub shutdown_grace_seconds: u64,
    /// `proxy.timeouts.header_read_ms` (also how long an idle keep-alive connection stays).
    pub header_read_ms: u64,
    /// `proxy.timeouts.upstream_response_ms`.
    pub upstream_response_ms: u64,
}

impl Default for EdgeOptions {
    fn default() -> Self {
        EdgeOptions {
            replay: ReplayStore::Memory,
            control_url: String::new(),
            control_ca_file: None,
            data_dir: None,
            interactive_viewers: false,
            cookie_key: "11".repeat(32),
            max_ws_message_bytes: 16 * 1024 * 1024,
            control_routes: false,
            subdomain: false,
            tls: None,
            ws_ping_idle: (30, 90),
            shutdown_grace_seconds: 3,
            header_read_ms: 1500,
            upstream_response_ms: 60_000,
        }
    }
}

/// A running edge on ephemeral ports (path mode), with a static routes file.
pub struct TestEdge {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub routes_file: PathBuf,
    pub dir: Arc<tempfile::TempDir>,
    pub data_dir: PathBuf,
    pub metrics: &'static marina_proxy::metrics::Metrics,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestEdge {
    pub async fn start(keys: &Keys, routes: &[Route], opts: EdgeOptions) -> TestEdge {
        let dir = Arc::new(tempfile::tempdir().unwrap());
        Self::start_in(dir, keys, routes, opts).await
    }

    pub async fn start_in(
        dir: Arc<tempfile::TempDir>,
        keys: &Keys,
        routes: &[Route],
        opts: EdgeOptions,
    ) -> TestEdge {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let admin_addr = admin.local_addr().unwrap();
        let pub_file = dir.path().join("url-signing.pub.pem");
        std::fs::write(&pub_file, &keys.public_pem).unwrap();
        let routes_file = dir.path().join("routes.json");
        if !routes_file.exists() {
            write_routes(&routes_file, 1, routes);
        }
        let data_dir = opts
            .data_dir
            .clone()
            .unwrap_or_else(|| dir.path().join("data"));
        let mut s = Settings {
            data_dir: data_dir.clone(),
            ..Settings::default()
        };
        s.proxy.listen = addr;
        s.proxy.admin_listen = admin_addr;
        s.proxy.public_url = format!("http://{addr}");
        if let Some((cert, key)) = &opts.tls {
            s.proxy.public_url = format!("https://{addr}");
            s.proxy.tls = Some(marina_config::settings::TlsSettings {
                cert_file: cert.clone(),
                key_file: key.clone(),
            });
        }
        if opts.subdomain {
            s.proxy.addressing = marina_config::addressing::AddressingMode::Subdomain;
            s.proxy.public_url = format!("http://nb.test:{}", addr.port());
        }
        s.proxy.frame_ancestors = vec!["https://host.example".into()];
        s.proxy.routes_file = (!opts.control_routes).then(|| routes_file.clone());
        s.proxy.control_url = opts.control_url.clone();
        s.proxy.control_ca_file = opts.control_ca_file.clone();
        s.proxy.replay_store = opts.replay;
        s.proxy.interactive_viewers = opts.interactive_viewers;
        s.proxy.cookie.keys = vec![opts.cookie_key.clone()];
        s.proxy.max_ws_message_bytes = opts.max_ws_message_bytes;
        s.proxy.activity_interval_ms = 200;
        s.proxy.timeouts.shutdown_grace_seconds = opts.shutdown_grace_seconds;
        s.proxy.timeouts.header_read_ms = opts.header_read_ms;
        s.proxy.timeouts.upstream_response_ms = opts.upstream_response_ms;
        s.proxy.timeouts.websocket_ping_seconds = opts.ws_ping_idle.0;
        s.proxy.timeouts.websocket_idle_seconds = opts.ws_ping_idle.1;
        s.internal.token = marina_testkit::control::INTERNAL_TOKEN.into();
        s.tokens.public_keys = vec![PublicKeySetting {
            kid: "k1".into(),
            file: pub_file,
        }];
        s.validate().unwrap();
        let edge = Edge::new(&s).await.unwrap();
        let metrics = edge.metrics();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            edge.serve(listener, admin, async {
                let _ = rx.await;
            })
            .await
            .unwrap();
        });
        TestEdge {
            addr,
            admin: admin_addr,
            routes_file,
            data_dir,
            dir,
            metrics,
            stop: Some(tx),
            task: Some(task),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn origin(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Starts the edge's shutdown without waiting for it.
    pub fn begin_stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }

    /// Whether the edge's `serve` has returned.
    pub fn is_stopped(&self) -> bool {
        self.task.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Whether the edge's `serve` returned within `d` (after `begin_stop`).
    pub async fn stopped_within(mut self, d: Duration) -> bool {
        match self.task.take() {
            Some(t) => tokio::time::timeout(d, t).await.is_ok(),
            None => true,
        }
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
    }

    /// Replaces the routes file (the edge reloads it within a second).
    pub async fn set_routes(&self, version: u64, routes: &[Route]) {
        // Make sure the modification time changes even on coarse-grained file systems.
        tokio::time::sleep(Duration::from_millis(20)).await;
        write_routes(&self.routes_file, version, routes);
    }
}

pub fn write_routes(path: &Path, version: u64, routes: &[Route]) {
    let snap = RoutesSnapshot {
        version,
        routes: routes.to_vec(),
        ..Default::default()
    };
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(&snap).unwrap()).unwrap();
    std::fs::rename(tmp, path).unwrap();
}

pub fn route(nb: &str, session: &str, upstream: SocketAddr, owner: Id, viewers: &[Id]) -> Route {
    Route {
        notebook_id: id(nb),
        session_id: id(session),
        upstream: upstream.to_string(),
        upstream_token: "marimo-upstream-secret".into(),
        owner_id: owner,
        viewers: viewers.to_vec(),
        org_id: None,
        teams: vec![],
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// Performs the handshake; returns the `name=value` cookie pair and the response.
pub async fn handshake(edge: &TestEdge, nb: Id, token: &str) -> reqwest::Response {
    client()
        .get(edge.url(&format!("/notebooks/{nb}/_auth?token={token}")))
        .header("accept", "text/html")
        .send()
        .await
        .unwrap()
}

pub fn cookie_pair(resp: &reqwest::Response) -> String {
    let sc = resp
        .headers()
        .get("set-cookie")
        .expect("set-cookie")
        .to_str()
        .unwrap();
    sc.split(';').next().unwrap().to_string()
}

/// Logs in `member` and returns the cookie pair.
pub async fn login(
    edge: &TestEdge,
    keys: &Keys,
    r: &Route,
    member: Id,
    mode: AccessMode,
) -> String {
    let t = keys.sign(&claims(r, member, mode));
    let resp = handshake(edge, r.notebook_id, &t).await;
    assert_eq!(resp.status(), 303, "handshake");
    cookie_pair(&resp)
}

/// What the fake upstream saw.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub uri: String,
    pub headers: HeaderMap,
}

/// A recording fake Marimo for fast tests: answers 200 with a Marimo-like `Set-Cookie` and
/// CORS header; `/sse` streams two events 300 ms apart.
pub struct FakeUpstream {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    /// TCP connections accepted so far.
    pub connections: Arc<std::sync::atomic::AtomicUsize>,
}

impl FakeUpstream {
    pub async fn start() -> FakeUpstream {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let s2 = seen.clone();
        let connections: Arc<std::sync::atomic::AtomicUsize> = Arc::default();
        let c2 = connections.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = l.accept().await else {
                    return;
                };
                c2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let seen = s2.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let seen = seen.clone();
                        async move {
                            seen.lock().unwrap().push(Seen {
                                method: req.method().to_string(),
                                uri: req.uri().to_string(),
                                headers: req.headers().clone(),
                            });
                            Ok::<_, Infallible>(fake_answer(req).await)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        FakeUpstream {
            addr,
            seen,
            connections,
        }
    }

    pub fn paths(&self) -> Vec<String> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .map(|s| s.uri.clone())
            .collect()
    }
}

type FakeBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

async fn fake_answer(req: Request<Incoming>) -> Response<FakeBody> {
    if req.uri().path().ends_with("/sse") {
        let stream = futures_util::stream::unfold(0u8, |n| async move {
            if n >= 2 {
                return None;
            }
            if n > 0 {
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            let frame = hyper::body::Frame::data(Bytes::from(format!("data: {n}\n\n")));
            Some((Ok::<_, Infallible>(frame), n + 1))
        });
        return Response::builder()
            .header("content-type", "text/event-stream")
            .body(BodyExt::boxed(http_body_util::StreamBody::new(stream)))
            .unwrap();
    }
    // `/close`: answer, then close the connection (as a server timing out keep-alive would).
    let close = req.uri().path().ends_with("/close");
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let mut resp = Response::builder();
    if close {
        resp = resp.header("connection", "close");
    }
    resp.header("set-cookie", "session_2718=marimo-credential; HttpOnly")
        .header("access-control-allow-origin", "*")
        .header("content-type", "text/plain")
        .body(BodyExt::boxed(Full::new(Bytes::from(format!(
            "upstream ok {}",
            body.len()
        )))))
        .unwrap()
}

/// Captures every log line of the test binary (all levels), to check no token is logged.
pub fn logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf: Arc<Mutex<Vec<u8>>> = Arc::default();
        let b2 = buf.clone();
        let _ = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(move || LogWriter(b2.clone()))
            .try_init();
        buf
    })
    .clone()
}

struct LogWriter(Arc<Mutex<Vec<u8>>>);
impl std::io::Write for LogWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Runs the openssl command line; panics with its output if it fails.
fn openssl(args: &[&str], dir: &Path) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A self-signed certificate for 127.0.0.1 (`cert.pem`, `key.pem` in `dir`), each file written
/// by rename, key first (as a certificate manager would).
pub fn self_signed_cert(dir: &Path, cn: &str) {
    openssl(
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "key.pem.new",
            "-out",
            "cert.pem.new",
            "-subj",
            &format!("/CN={cn}"),
            "-days",
            "1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        dir,
    );
    std::fs::rename(dir.join("key.pem.new"), dir.join("key.pem")).unwrap();
    std::fs::rename(dir.join("cert.pem.new"), dir.join("cert.pem")).unwrap();
}

/// A private certificate authority and a server certificate for 127.0.0.1 it signed, in `dir`:
/// `ca.pem`, and `server.pem` with its key `server.key`.
pub fn private_ca(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-subj",
        "/CN=marina-test-ca",
        "-days",
        "1",
    ]);
    openssl(&ca, dir);
    let mut csr = vec!["req"];
    csr.extend(ec);
    csr.extend([
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    openssl(&csr, dir);
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "1",
            "-extfile",
            "server.ext",
        ],
        dir,
    );
    (
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server.key"),
    )
}

/// An HTTP/2 sender to `addr` over cleartext (h2c, prior knowledge), its connection driven by a
/// task of its own.
pub async fn h2_client(
    addr: SocketAddr,
) -> hyper::client::conn::http2::SendRequest<http_body_util::Empty<Bytes>> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    sender
}

/// A WebSocket the HTTP/2 way (RFC 8441 extended CONNECT) on `sender`'s connection: the answer's
/// status, and the stream when it opened. The connection must have seen the edge's SETTINGS
/// (any earlier answer on it will do).
pub async fn h2_websocket(
    sender: &mut hyper::client::conn::http2::SendRequest<http_body_util::Empty<Bytes>>,
    url: &str,
    cookie: &str,
    origin: &str,
) -> (http::StatusCode, Option<hyper::upgrade::Upgraded>) {
    let mut req = Request::builder()
        .method(http::Method::CONNECT)
        .uri(url)
        .header("cookie", cookie)
        .header("origin", origin)
        .header("sec-websocket-version", "13")
        .body(http_body_util::Empty::new())
        .unwrap();
    req.extensions_mut()
        .insert(hyper::ext::Protocol::from_static("websocket"));
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status();
    if !status.is_success() {
        return (status, None);
    }
    (status, Some(hyper::upgrade::on(resp).await.unwrap()))
}
