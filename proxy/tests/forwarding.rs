//! Forwarding through the edge against fast fake upstreams: header hygiene, the viewer policy
//! end to end, event streams, HTTP/2, and the WebSocket relay (big messages, upstream and client
//! failures, revocation, shutdown, 1,000 concurrent sockets).

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use marina_config::wire::AccessMode;
use marina_testkit::ws_upstream::WsUpstream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

const NB: &str = "NOTEBOOK01";
const OWNER: &str = "OWNER00001";
const VIEWER: &str = "VIEWER0001";

#[tokio::test]
async fn http_forwarding_swaps_credentials_and_hardens_responses() {
    let keys = Keys::generate();
    let up = FakeUpstream::start().await;
    let r = route(NB, "SESSION001", up.addr, id(OWNER), &[id(VIEWER)]);
    let edge = TestEdge::start(&keys, std::slice::from_ref(&r), EdgeOptions::default()).await;
    let cookie = login(&edge, &keys, &r, id(OWNER), AccessMode::Edit).await;

    let resp = client()
        .post(edge.url("/notebooks/NOTEBOOK01/api/kernel/run?x=1"))
        .header("cookie", format!("{cookie}; other=1"))
        .header("authorization", "Bearer browser-credential")
        .header("x-forwarded-user", "admin")
        .header("x-forwarded-for", "6.6.6.6")
        .header("marimo-session-id", "s_abc123")
        .header("marimo-server-token", "skew")
        .body("hello")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let h = resp.headers().clone();
    assert_eq!(
        h["content-security-policy"],
        "frame-ancestors https://host.example"
    );
    assert_eq!(h["x-content-type-options"], "nosniff");
    assert!(
        h.get("set-cookie").is_none(),
        "Marimo's credential cookie dropped"
    );
    assert!(h.get("access-control-allow-origin").is_none());
    assert_eq!(
        resp.text().await.unwrap(),
        "upstream ok 5",
        "body streamed through"
    );

    let seen = up.seen.lock().unwrap().last().cloned().unwrap();
    assert_eq!(
        seen.uri, "/notebooks/NOTEBOOK01/api/kernel/run?x=1",
        "path mode keeps the prefix"
    );
    assert_eq!(
        seen.headers["authorization"],
        "Bearer marimo-upstream-secret"
    );
    assert_eq!(seen.headers["cookie"], "other=1");
    assert!(seen.headers.get("x-forwarded-user").is_none());
    assert_eq!(seen.headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen.headers["x-forwarded-proto"], "http");
    assert_eq!(seen.headers["x-forwarded-host"], edge.addr.to_string());
    assert!(seen.headers.get("x-request-id").is_some());
    assert_eq!(seen.headers["marimo-server-token"], "skew");
    let sid = seen.headers["marimo-session-id"].to_str().unwrap();
    assert!(
        sid.starts_with("s_") && sid.len() == 8 && sid != "s_abc123",
        "{sid}"
    );

    // `/notebooks/<ID>` → the slash form, by the edge.
    let resp = client()
        .get(edge.url("/notebooks/NOTEBOOK01?a=b"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 308);
    assert_eq!(resp.headers()["location"], "/notebooks/NOTEBOOK01/?a=b");

    // Unknown notebook: the clear page, not a hang.
    let resp = client()
        .get(edge.url("/notebooks/UNKNOWN001/"))
        .header("accept", "text/html")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    assert!(resp.text().await.unwrap().contains("not running"));

    // HTTP/2 from the browser side.
    let mut sender = h2_client(edge.addr).await;
    let req = http::Request::get(edge.url("/notebooks/NOTEBOOK01/api/version"))
        .header("cookie", cookie.clone())
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().get("connection").is_none());

    // `/auth/token` is refused even for the owner, and never reaches Marimo.
    let before = up.paths().len();
    let resp = client()
        .get(edge.url("/notebooks/NOTEBOOK01/auth/token"))
        .header("cookie", cookie.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    let v: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "credential_endpoint");
    assert_eq!(up.paths().len(), before);
    edge.stop().await;
}

#[tokio::test]
async fn viewer_policy_end_to_end_and_upstream_never_sees_denials() {
    let keys = Keys::generate();
    let up = FakeUpstream::start().await;
    let r = route(NB, "SESSION001", up.addr, id(OWNER), &[id(VIEWER)]);
    let edge = TestEdge::start(&keys, std::slice::from_ref(&r), EdgeOptions::default()).await;
    let viewer = login(&edge, &keys, &r, id(VIEWER), AccessMode::View).await;
    for (m, p) in [
        ("POST", "/api/kernel/run"),
        ("POST", "/api/kernel/save"),
        ("POST", "/api/kernel/execute"),
        ("POST", "/api/kernel/takeover"),
        ("GET", "/api/sessions"),
        ("GET", "/terminal/ws"),
        ("POST", "/api%2Fkernel%2Frun"),
        ("GET", "/assets/..%2F..%2Fapi%2Fsessions"),
    ] {
        let resp = client()
            .request(
                m.parse().unwrap(),
                edge.url(&format!("/notebooks/NOTEBOOK01{p}")),
            )
            .header("cookie", viewer.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 403, "{m} {p}");
        let v: serde_json::Value = resp.json().await.unwrap();
        assert!(v["error"]["code"].is_string());
    }
    assert!(
        up.paths().is_empty(),
        "denied requests reached the upstream: {:?}",
        up.paths()
    );
    assert!(edge
        .metrics
        .render()
        .contains("marina_edge_denials_total{reason=\"read_only\"}"));

    // Allowed: the page (first sent to its kiosk view, so Marimo's UI starts read-only), and
    // the viewer's event stream gets kiosk forced; SSE is not buffered.
    let resp = client()
        .get(edge.url("/notebooks/NOTEBOOK01/"))
        .header("cookie", viewer.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 302);
    assert_eq!(
        resp.headers()["location"],
        "/notebooks/NOTEBOOK01/?kiosk=true"
    );
    let resp = client()
        .get(edge.url("/notebooks/NOTEBOOK01/?kiosk=true"))
        .header("cookie", viewer.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let started = Instant::now();
    let mut resp = client()
        .get(edge.url("/notebooks/NOTEBOOK01/sse?session_id=s_aaaaaa&kiosk=false&access_token=x"))
        .header("cookie", viewer.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let first = resp.chunk().await.unwrap().unwrap();
    assert_eq!(&first[..], b"data: 0\n\n");
    assert!(
        started.elapsed() < Duration::from_millis(280),
        "first event arrived before the second was sent"
    );
    assert_eq!(edge.metrics.streams_open.get(), 1);
    let second = resp.chunk().await.unwrap().unwrap();
    assert_eq!(&second[..], b"data: 1\n\n");
    assert!(resp.chunk().await.unwrap().is_none());
    drop(resp);
    let uri = up.paths().last().cloned().unwrap();
    assert!(
        uri.contains("kiosk=true")
            && !uri.contains("kiosk=false")
            && !uri.contains("access_token")
            && !uri.contains("s_aaaaaa"),
        "{uri}"
    );
    edge.stop().await;
}

/// Shutdown drains: an idle keep-alive connection is closed at once, a response in flight is
/// finished (the edge keeps running for it), nothing new is accepted, and the edge is done as
/// soon as its last connection is, long before the grace period.
#[tokio::test]
async fn shutdown_finishes_requests_in_flight_then_stops() {
    let keys = Keys::generate();
    let up = raw_upstream().await;
    let r = route(NB, "SESSION001", up.addr, id(OWNER), &[]);
    let mut edge = TestEdge::start(
        &keys,
        std::slice::from_ref(&r),
        EdgeOptions {
            shutdown_grace_seconds: 60,
            // Idle keep-alive connections would otherwise end by this timeout on their own.
            header_read_ms: 60_000,
            ..EdgeOptions::default()
        },
    )
    .await;
    let owner = login(&edge, &keys, &r, id(OWNER), AccessMode::Edit).await;
    let get = |path: &str| {
        format!(
            "GET /notebooks/{NB}{path} HTTP/1.1\r\nHost: {}\r\nCookie: {owner}\r\n\r\n",
            edge.addr
        )
    };
    // An idle keep-alive connection: one answered request, then nothing.
    let mut idle = TcpStream::connect(edge.addr).await.unwrap();
    idle.write_all(get("/api/version").as_bytes())
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = idle.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    // An event stream in flight: its first event is here; the upstream holds the rest.
    let mut streaming = TcpStream::connect(edge.addr).await.unwrap();
    streaming.write_all(get("/sse").as_bytes()).await.unwrap();
    let mut got = Vec::new();
    while !String::from_utf8_lossy(&got).contains("data: 0") {
        let n = streaming.read(&mut buf).await.unwrap();
        assert!(n > 0, "stream ended early");
        got.extend_from_slice(&buf[..n]);
    }

    edge.begin_stop();
    // The idle connection is closed by the edge.
    let n = tokio::time::timeout(Duration::from_secs(10), idle.read(&mut buf))
        .await
        .expect("idle connection closed on shutdown")
        .unwrap_or(0);
    assert_eq!(n, 0, "{:?}", String::from_utf8_lossy(&buf[..n]));
    // Nothing new is accepted; the edge waits for the stream still in flight.
    assert!(TcpStream::connect(edge.addr).await.is_err());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!edge.is_stopped(), "stopped with a response in flight");
    up.release.notify_one();
    loop {
        let n = streaming.read(&mut buf).await.unwrap_or(0);
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.contains("data: 1") && text.ends_with("0\r\n\r\n"),
        "{text}"
    );
    assert!(edge.stopped_within(Duration::from_secs(20)).await);
}

// --- WebSocket -----------------------------------------------------------------------------

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

async fn ws_connect(
    edge: &TestEdge,
    cookie: &str,
    origin: &str,
    query: &str,
) -> Result<Ws, tokio_tungstenite::tungstenite::Error> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = format!("ws://{}/notebooks/NOTEBOOK01/ws?{query}", edge.addr)
        .into_client_request()
        .unwrap();
    req.headers_mut().insert("cookie", cookie.parse().unwrap());
    req.headers_mut().insert("origin", origin.parse().unwrap());
    let cfg = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0);
    tokio_tungstenite::connect_async_with_config(req, Some(cfg), true)
        .await
        .map(|(ws, _)| ws)
}

async fn next_close(ws: &mut Ws, within: Duration) -> Option<(CloseCode, Duration)> {
    let started = Instant::now();
    let deadline = tokio::time::sleep(within);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = &mut deadline => return None,
            m = ws.next() => match m {
                Some(Ok(Message::Close(Some(f)))) => return Some((f.code, started.elapsed())),
                Some(Ok(_)) => continue,
                _ => return None,
            }
        }
    }
}

struct WsWorld {
    keys: Keys,
    up: WsUpstream,
    edge: TestEdge,
    route: marina_config::wire::Route,
}

async fn ws_world(opts: EdgeOptions) -> WsWorld {
    let keys = Keys::generate();
    let up = WsUpstream::start().await;
    let route = route(NB, "SESSION001", up.addr, id(OWNER), &[id(VIEWER)]);
    let edge = TestEdge::start(&keys, std::slice::from_ref(&route), opts).await;
    WsWorld {
        keys,
        up,
        edge,
        route,
    }
}

#[tokio::test]
async fn websocket_relays_big_messages_and_checks_origin() {
    let w = ws_world(EdgeOptions::default()).await;
    let owner = login(&w.edge, &w.keys, &w.route, id(OWNER), AccessMode::Edit).await;
    // Another origin: refused before anything reaches the upstream.
    let err = ws_connect(
        &w.edge,
        &owner,
        "https://evil.example",
        "session_id=s_aaaaaa",
    )
    .await;
    assert!(err.is_err());
    assert!(w.up.uris.lock().unwrap().is_empty());

    let mut ws = ws_connect(
        &w.edge,
        &owner,
        &w.edge.origin(),
        "session_id=s_aaaaaa&access_token=t",
    )
    .await
    .unwrap();
    let seen = w.up.uris.lock().unwrap()[0].clone();
    assert!(
        !seen.contains("access_token") && !seen.contains("s_aaaaaa"),
        "{seen}"
    );
    assert!(seen
        .to_ascii_lowercase()
        .contains("authorization: bearer marimo-upstream-secret"));
    assert!(
        !seen.contains(owner.split('=').nth(1).unwrap()),
        "edge cookie stripped"
    );
    let eight_mb = 8 * 1024 * 1024;
    ws.send(Message::text(format!("big:{eight_mb}")))
        .await
        .unwrap();
    match ws.next().await.unwrap().unwrap() {
        Message::Text(t) => assert_eq!(t.len(), eight_mb),
        other => panic!("{other:?}"),
    }
    ws.send(Message::text("echo:hi")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("hi"));
    assert_eq!(w.edge.metrics.websockets_open.get(), 1);
    // Browser messages are activity.
    let entry_active = w.edge.metrics.render();
    assert!(entry_active.contains("marina_edge_bytes_relayed_total{direction=\"to_client\"}"));
    ws.close(None).await.unwrap();
    while ws.next().await.is_some() {}
    wait(|| w.edge.metrics.websockets_open.get() == 0).await;
    assert_eq!(
        *w.up.closes_seen.lock().unwrap(),
        1,
        "the browser's close reached the upstream"
    );
    w.edge.stop().await;
}

#[tokio::test]
async fn websocket_over_http2_extended_connect() {
    use tokio_tungstenite::tungstenite::protocol::Role;
    let w = ws_world(EdgeOptions::default()).await;
    let owner = login(&w.edge, &w.keys, &w.route, id(OWNER), AccessMode::Edit).await;
    let viewer = login(&w.edge, &w.keys, &w.route, id(VIEWER), AccessMode::View).await;
    let mut sender = h2_client(w.edge.addr).await;
    // One ordinary request first (the edge answers it itself: no such notebook), so that the
    // edge's SETTINGS, with ENABLE_CONNECT_PROTOCOL, have arrived.
    let req = http::Request::get(w.edge.url("/notebooks/UNKNOWN001/"))
        .body(http_body_util::Empty::new())
        .unwrap();
    assert_eq!(sender.send_request(req).await.unwrap().status(), 404);

    // Another origin, or a viewer asking for a mutating socket: refused, nothing upstream.
    let ws = w.edge.url("/notebooks/NOTEBOOK01/ws?session_id=s_aaaaaa");
    let (status, _) = h2_websocket(&mut sender, &ws, &owner, "https://evil.example").await;
    assert_eq!(status, 403);
    let term = w.edge.url("/notebooks/NOTEBOOK01/terminal/ws");
    let (status, _) = h2_websocket(&mut sender, &term, &viewer, &w.edge.origin()).await;
    assert_eq!(status, 403);
    assert!(w.up.uris.lock().unwrap().is_empty());

    // The owner's socket, on the same connection as the page.
    let (status, stream) = h2_websocket(&mut sender, &ws, &owner, &w.edge.origin()).await;
    assert_eq!(status, 200);
    let mut sock = tokio_tungstenite::WebSocketStream::from_raw_socket(
        hyper_util::rt::TokioIo::new(stream.unwrap()),
        Role::Client,
        None,
    )
    .await;
    let seen = w.up.uris.lock().unwrap()[0].clone();
    assert!(seen.starts_with("/notebooks/NOTEBOOK01/ws?"), "{seen}");
    assert!(!seen.contains("s_aaaaaa"), "session id bound: {seen}");
    let lower = seen.to_ascii_lowercase();
    assert!(lower.contains("authorization: bearer marimo-upstream-secret"));
    assert!(lower.contains("sec-websocket-key: "), "the edge's own key");
    // HTTP/1.1 needs a Host: HTTP/2's `:authority` becomes it (Marimo answers 400 without).
    assert!(
        lower.contains(&format!("\r\nhost: {}\r\n", w.edge.addr)),
        "{seen}"
    );
    assert!(
        !seen.contains(owner.split('=').nth(1).unwrap()),
        "edge cookie stripped"
    );
    sock.send(Message::text("echo:over h2")).await.unwrap();
    assert_eq!(
        sock.next().await.unwrap().unwrap(),
        Message::text("over h2")
    );
    let one_mb = 1024 * 1024;
    sock.send(Message::text(format!("big:{one_mb}")))
        .await
        .unwrap();
    match sock.next().await.unwrap().unwrap() {
        Message::Text(t) => assert_eq!(t.len(), one_mb),
        other => panic!("{other:?}"),
    }
    assert_eq!(w.edge.metrics.websockets_open.get(), 1);
    sock.close(None).await.unwrap();
    while sock.next().await.is_some() {}
    wait(|| w.edge.metrics.websockets_open.get() == 0).await;
    assert_eq!(*w.up.closes_seen.lock().unwrap(), 1);
    w.edge.stop().await;
}

#[tokio::test]
async fn websocket_message_limit_closes_with_1009() {
    let w = ws_world(EdgeOptions {
        max_ws_message_bytes: 1024 * 1024,
        ..EdgeOptions::default()
    })
    .await;
    let owner = login(&w.edge, &w.keys, &w.route, id(OWNER), AccessMode::Edit).await;
    let mut ws = ws_connect(&w.edge, &owner, &w.edge.origin(), "session_id=s_aaaaaa")
        .await
        .unwrap();
    ws.send(Message::text("big:1000")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap().len(), 1000);
    ws.send(Message::text("big:2000000")).await.unwrap();
    let (code, _) = next_close(&mut ws, Duration::from_secs(5))
        .await
        .expect("close frame");
    assert_eq!(code, CloseCode::Size);
    w.edge.stop().await;
}

#[tokio::test]
async fn upstream_dying_mid_stream_gives_the_browser_a_close_frame() {
    let w = ws_world(EdgeOptions::default()).await;
    let owner = login(&w.edge, &w.keys, &w.route, id(OWNER), AccessMode::Edit).await;
    let mut ws = ws_connect(&w.edge, &owner, &w.edge.origin(), "session_id=s_aaaaaa")
        .await
        .unwrap();
    ws.send(Message::text("big:100000")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap().len(), 100000);
    ws.send(Message::text("die")).await.unwrap();
    let (code, _) = next_close(&mut ws, Duration::from_secs(5))
        .await
        .expect("close frame");
    assert_eq!(code, CloseCode::Error, "1011");
    // Like a browser, answer the close (tungstenite flushes its reply on the next poll).
    while let Some(Ok(_)) = ws.next().await {}
    wait(|| w.edge.metrics.websockets_open.get() == 0).await;
    w.edge.stop().await;
}

#[tokio::test]
async fn client_vanishing_mid_stream_frees_the_relay() {
    let w = ws_world(EdgeOptions::default()).await;
    let owner = login(&w.edge, &w.keys, &w.route, id(OWNER), AccessMode::Edit).await;
    let mut ws = ws_connect(&w.edge, &owner, &w.edge.origin(), "session_id=s_aaaaaa")
        .await
        .unwrap();
    // Ask for a big message and drop the socket while it streams.
    ws.send(Message::text(format!("big:{}", 8 * 1024 * 1024)))
        .await
        .unwrap();
    drop(ws);
    wait(|| w.edge.metrics.websockets_open.get() == 0).await;
    // The edge still works.
    let mut ws = ws_connect(&w.edge, &owner, &w.edge.origin(), "session_id=s_aaaaaa")
        .await
        .unwrap();
    ws.send(Message::text("echo:again")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("again"));
    w.edge.stop().await;
}

#[tokio::test]
async fn revocation_closes_sockets_within_5_seconds_and_shutdown_says_1001() {
    let w = ws_world(EdgeOptions::default()).await;
    let owner = login(&w.edge, &w.keys, &w.route, id(OWNER), AccessMode::Edit).await;
    let viewer = login(&w.edge, &w.keys, &w.route, id(VIEWER), AccessMode::View).await;
    let mut vws = ws_connect(&w.edge, &viewer, &w.edge.origin(), "session_id=s_bbbbbb")
        .await
        .unwrap();
    let mut ows = ws_connect(&w.edge, &owner, &w.edge.origin(), "session_id=s_aaaaaa")
        .await
        .unwrap();
    // The viewer's socket went to Marimo in kiosk mode.
    let uris = w.up.uris.lock().unwrap().clone();
    assert!(
        uris[0].lines().next().unwrap().contains("kiosk=true"),
        "{}",
        uris[0]
    );
    let mut revoked = w.route.clone();
    revoked.viewers.clear();
    w.edge.set_routes(2, &[revoked]).await;
    let (code, took) = next_close(&mut vws, Duration::from_secs(5))
        .await
        .expect("viewer closed");
    assert_eq!(code, CloseCode::Policy);
    assert!(took < Duration::from_secs(5));
    // The owner's socket is untouched.
    ows.send(Message::text("echo:still here")).await.unwrap();
    assert_eq!(
        ows.next().await.unwrap().unwrap(),
        Message::text("still here")
    );
    // Shutdown: 1001 to the browser.
    let stopping = tokio::spawn(w.edge.stop());
    let (code, _) = next_close(&mut ows, Duration::from_secs(5))
        .await
        .expect("closed on shutdown");
    assert_eq!(code, CloseCode::Away);
    stopping.await.unwrap();
}

#[tokio::test]
async fn a_thousand_concurrent_sockets() {
    let w = ws_world(EdgeOptions::default()).await;
    let owner = login(&w.edge, &w.keys, &w.route, id(OWNER), AccessMode::Edit).await;
    let n = 1000;
    let mut socks = Vec::with_capacity(n);
    for i in 0..n {
        let ws = ws_connect(
            &w.edge,
            &owner,
            &w.edge.origin(),
            &format!("session_id=s_{i:06}"),
        )
        .await
        .unwrap_or_else(|e| panic!("socket {i}: {e}"));
        socks.push(ws);
    }
    assert_eq!(w.edge.metrics.websockets_open.get(), n as i64);
    // Every socket still relays.
    let results =
        futures_util::future::join_all(socks.iter_mut().enumerate().map(|(i, ws)| async move {
            ws.send(Message::text(format!("echo:{i}"))).await.unwrap();
            ws.next().await.unwrap().unwrap() == Message::text(i.to_string())
        }))
        .await;
    assert!(results.iter().all(|ok| *ok));
    drop(socks);
    wait(|| w.edge.metrics.websockets_open.get() == 0).await;
    w.edge.stop().await;
}

async fn wait(f: impl Fn() -> bool) {
    for _ in 0..100 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("condition not reached in 5 s");
}

#[tokio::test]
async fn subdomain_mode_routes_by_host() {
    let keys = Keys::generate();
    let up = FakeUpstream::start().await;
    let r = route(NB, "SESSION001", up.addr, id(OWNER), &[]);
    let other = route("OTHERNOTE1", "SESSION002", up.addr, id(OWNER), &[]);
    let edge = TestEdge::start(
        &keys,
        &[r.clone(), other.clone()],
        EdgeOptions {
            subdomain: true,
            ..EdgeOptions::default()
        },
    )
    .await;
    let port = edge.addr.port();
    let host = format!("notebook01.nb.test:{port}");
    let token = keys.sign(&claims(&r, id(OWNER), AccessMode::Edit));
    let resp = client()
        .get(edge.url(&format!("/_auth?token={token}")))
        .header("host", host.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 303);
    assert_eq!(resp.headers()["location"], "/");
    let sc = resp.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(sc.contains("Path=/;"), "{sc}");
    let cookie = cookie_pair(&resp);
    let resp = client()
        .get(edge.url("/api/version"))
        .header("host", host.clone())
        .header("cookie", cookie.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        up.paths().last().unwrap(),
        "/api/version",
        "served at Marimo's root"
    );
    // The same cookie presented on another notebook's origin is refused.
    let resp = client()
        .get(edge.url("/"))
        .header("host", format!("othernote1.nb.test:{port}"))
        .header("cookie", cookie.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    // A token for this notebook presented at another notebook's origin is refused.
    let t2 = keys.sign(&claims(&r, id(OWNER), AccessMode::Edit));
    let resp = client()
        .get(edge.url(&format!("/_auth?token={t2}")))
        .header("host", format!("othernote1.nb.test:{port}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    // The bare domain and foreign hosts name no notebook.
    for h in [format!("nb.test:{port}"), "evil.example".to_string()] {
        let resp = client()
            .get(edge.url("/"))
            .header("host", h)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 404);
    }
    edge.stop().await;
}

// --- TLS ----------------------------------------------------------------------------------

/// Accepts any server certificate: this test checks which certificate is served, not trust.
#[derive(Debug)]
struct AnyCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Connects with TLS (ALPN h2, http/1.1); returns the negotiated protocol, the served
/// certificate, and the stream.
async fn tls_connect(
    addr: SocketAddr,
) -> (
    Option<Vec<u8>>,
    Vec<u8>,
    tokio_rustls::client::TlsStream<TcpStream>,
) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .unwrap();
    let (_, conn) = tls.get_ref();
    let alpn = conn.alpn_protocol().map(|p| p.to_vec());
    let cert = conn.peer_certificates().unwrap()[0].as_ref().to_vec();
    (alpn, cert, tls)
}

fn pem_der(path: &std::path::Path) -> Vec<u8> {
    let pem = std::fs::read(path).unwrap();
    let cert = rustls_pemfile::certs(&mut &pem[..])
        .next()
        .unwrap()
        .unwrap();
    cert.as_ref().to_vec()
}

#[tokio::test]
async fn tls_with_h2_and_certificate_reload() {
    let dir = tempfile::tempdir().unwrap();
    self_signed_cert(dir.path(), "first");
    let keys = Keys::generate();
    let up = FakeUpstream::start().await;
    let r = route(NB, "SESSION001", up.addr, id(OWNER), &[]);
    let edge = TestEdge::start(
        &keys,
        std::slice::from_ref(&r),
        EdgeOptions {
            tls: Some((dir.path().join("cert.pem"), dir.path().join("key.pem"))),
            ..EdgeOptions::default()
        },
    )
    .await;
    let (alpn, cert, tls) = tls_connect(edge.addr).await;
    assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));
    assert_eq!(cert, pem_der(&dir.path().join("cert.pem")));
    // A handshake over HTTP/2 + TLS gets a Secure cookie.
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let token = keys.sign(&claims(&r, id(OWNER), AccessMode::Edit));
    let req = http::Request::get(format!(
        "https://{}/notebooks/{NB}/_auth?token={token}",
        edge.addr
    ))
    .body(http_body_util::Empty::<bytes::Bytes>::new())
    .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 303);
    let sc = resp.headers()["set-cookie"].to_str().unwrap();
    assert!(sc.contains("; Secure"), "{sc}");

    // Renew the certificate on disk: new connections get it, without a restart.
    self_signed_cert(dir.path(), "second");
    let renewed = pem_der(&dir.path().join("cert.pem"));
    assert_ne!(renewed, cert);
    let mut served = Vec::new();
    for _ in 0..40 {
        served = tls_connect(edge.addr).await.1;
        if served == renewed {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(served, renewed, "certificate reloaded");
    edge.stop().await;
}

#[tokio::test]
async fn silent_and_slow_clients_are_disconnected() {
    let keys = Keys::generate();
    let up = FakeUpstream::start().await;
    let r = route(NB, "SESSION001", up.addr, id(OWNER), &[]);
    let edge = TestEdge::start(&keys, std::slice::from_ref(&r), EdgeOptions::default()).await;
    // header_read_ms = 1500 in the test edge.
    for partial in [
        &b""[..],
        b"GET /notebooks/NOTEBOOK01/ HTTP/1.1\r\nHost: x\r\n",
    ] {
        let started = Instant::now();
        let mut s = TcpStream::connect(edge.addr).await.unwrap();
        s.write_all(partial).await.unwrap();
        let mut buf = [0u8; 1024];
        let closed = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => continue, // a 408 may come first
                }
            }
        })
        .await;
        assert!(
            closed.is_ok(),
            "connection held open ({} bytes sent)",
            partial.len()
        );
        assert!(
            started.elapsed() >= Duration::from_millis(1400),
            "closed too early"
        );
    }
    edge.stop().await;
}

#[tokio::test]
async fn silent_browsers_are_pinged_then_closed() {
    let w = ws_world(EdgeOptions {
        ws_ping_idle: (1, 3),
        ..EdgeOptions::default()
    })
    .await;
    let owner = login(&w.edge, &w.keys, &w.route, id(OWNER), AccessMode::Edit).await;
    // A live browser answers pings (tungstenite does when polled): the socket stays open past
    // the idle limit.
    let mut ws = ws_connect(&w.edge, &owner, &w.edge.origin(), "session_id=s_aaaaaa")
        .await
        .unwrap();
    let mut pings = 0;
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        match tokio::time::timeout_at(until.into(), ws.next()).await {
            Ok(Some(Ok(Message::Ping(_)))) => pings += 1,
            Ok(Some(Ok(Message::Close(f)))) => panic!("closed a live socket: {f:?}"),
            Ok(Some(Ok(_))) => {}
            Ok(other) => panic!("{other:?}"),
            Err(_) => break,
        }
    }
    assert!(pings >= 2, "pinged {pings} times");
    ws.send(Message::text("echo:alive")).await.unwrap();
    assert!(matches!(
        ws.next().await,
        Some(Ok(Message::Ping(_)) | Ok(Message::Text(_)))
    ));

    // A browser that went silent (no pongs) is closed with 1001.
    let mut raw = TcpStream::connect(w.edge.addr).await.unwrap();
    let req = format!(
        "GET /notebooks/{NB}/ws?session_id=s_bbbbbb HTTP/1.1\r\nHost: {}\r\nOrigin: {}\r\nCookie: {owner}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        w.edge.addr,
        w.edge.origin()
    );
    raw.write_all(req.as_bytes()).await.unwrap();
    let started = Instant::now();
    let mut got = Vec::new();
    let read_all = tokio::time::timeout(Duration::from_secs(8), raw.read_to_end(&mut got)).await;
    assert!(read_all.is_ok(), "silent socket not closed");
    assert!(started.elapsed() >= Duration::from_secs(2));
    let body = &got[got.windows(4).position(|x| x == b"\r\n\r\n").unwrap() + 4..];
    let close_at = body
        .windows(2)
        .position(|x| x[0] == 0x88)
        .expect("a close frame after the pings");
    assert_eq!(&body[close_at + 2..close_at + 4], &1001u16.to_be_bytes());
    assert!(body[0] == 0x89, "pinged first");
    w.edge.stop().await;
}

#[tokio::test]
async fn unreachable_or_silent_upstream_gives_a_clear_502() {
    let keys = Keys::generate();
    // Nothing listens here.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    // This one accepts and never answers.
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let a = route(NB, "SESSION001", dead, id(OWNER), &[]);
    let b = route("SILENT0001", "SESSION001", silent_addr, id(OWNER), &[]);
    let opts = EdgeOptions {
        upstream_response_ms: 800,
        ..EdgeOptions::default()
    };
    let edge = TestEdge::start(&keys, &[a.clone(), b.clone()], opts).await;
    for (r, reason) in [(&a, "upstream_connect"), (&b, "upstream_timeout")] {
        let cookie = login(&edge, &keys, r, id(OWNER), AccessMode::Edit).await;
        let started = Instant::now();
        let resp = client()
            .get(edge.url(&format!("/notebooks/{}/", r.notebook_id)))
            .header("cookie", cookie)
            .header("accept", "text/html")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 502, "{reason}");
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "{reason}: no hang"
        );
        assert!(resp.text().await.unwrap().contains("not responding"));
        assert!(
            edge.metrics
                .render()
                .contains(&format!("reason=\"{reason}\"")),
            "{reason}"
        );
    }
    edge.stop().await;
}

#[tokio::test]
async fn each_browser_connection_keeps_its_own_upstream_connection() {
    let keys = Keys::generate();
    let up = FakeUpstream::start().await;
    let r = route(NB, "SESSION001", up.addr, id(OWNER), &[]);
    let edge = TestEdge::start(&keys, std::slice::from_ref(&r), EdgeOptions::default()).await;
    let cookie = login(&edge, &keys, &r, id(OWNER), AccessMode::Edit).await;
    let conns = || up.connections.load(std::sync::atomic::Ordering::SeqCst);
    // One keep-alive browser connection: one upstream connection for all its requests.
    let browser = reqwest::Client::builder()
        .pool_max_idle_per_host(1)
        .build()
        .unwrap();
    let get = |path: &'static str| {
        let req = browser
            .get(edge.url(&format!("/notebooks/{NB}{path}")))
            .header("cookie", cookie.clone());
        async move { req.send().await.unwrap() }
    };
    for _ in 0..5 {
        let r = get("/api/version").await;
        assert_eq!(r.status(), 200);
        r.text().await.unwrap();
    }
    assert_eq!(
        conns(),
        1,
        "requests of one browser connection share one upstream connection"
    );
    // The upstream closes it: the next request opens a new one instead of failing.
    let r = get("/close").await;
    assert_eq!(r.status(), 200);
    r.text().await.unwrap();
    let r = get("/api/version").await;
    assert_eq!(r.status(), 200);
    assert_eq!(conns(), 2);
    // Another browser connection gets its own.
    let r = client()
        .get(edge.url(&format!("/notebooks/{NB}/api/version")))
        .header("cookie", cookie.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(conns(), 3);
    edge.stop().await;
}

/// A raw HTTP/1.1 upstream that answers with hand-written framings, to check the edge's own
/// HTTP/1.1 client: what it saw (method, path, decoded body) is recorded.
/// (method, path, request body) of each request.
type RawSeen = Arc<Mutex<Vec<(String, String, Vec<u8>)>>>;

struct RawUpstream {
    addr: SocketAddr,
    seen: RawSeen,
    /// `…/sse` sends its second event only once this is notified.
    release: Arc<tokio::sync::Notify>,
    connections: Arc<std::sync::atomic::AtomicUsize>,
}

async fn raw_upstream() -> RawUpstream {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen: RawSeen = Arc::default();
    let connections: Arc<std::sync::atomic::AtomicUsize> = Arc::default();
    let release: Arc<tokio::sync::Notify> = Arc::default();
    let (s2, c2, r2) = (seen.clone(), connections.clone(), release.clone());
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            c2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let seen = s2.clone();
            let release = r2.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    // Read one request head.
                    let (method, path, len, chunked, head_len) = loop {
                        let mut hs = [httparse::EMPTY_HEADER; 64];
                        let mut r = httparse::Request::new(&mut hs);
                        if let Ok(httparse::Status::Complete(n)) = r.parse(&buf) {
                            let h = |name: &str| {
                                r.headers
                                    .iter()
                                    .find(|h| h.name.eq_ignore_ascii_case(name))
                                    .map(|h| String::from_utf8_lossy(h.value).to_string())
                            };
                            let len: usize =
                                h("content-length").map(|v| v.parse().unwrap()).unwrap_or(0);
                            let chunked = h("transfer-encoding").is_some();
                            break (
                                r.method.unwrap().to_owned(),
                                r.path.unwrap().to_owned(),
                                len,
                                chunked,
                                n,
                            );
                        }
                        let mut chunk = [0u8; 4096];
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    buf.drain(..head_len);
                    // Its body: by length, or chunked up to the last chunk (decoded naively).
                    let body = loop {
                        if chunked {
                            if let Some(end) = buf.windows(5).position(|w| w == b"0\r\n\r\n") {
                                let raw: Vec<u8> = buf.drain(..end + 5).collect();
                                let mut out = Vec::new();
                                let mut rest = &raw[..];
                                loop {
                                    let nl = rest.windows(2).position(|w| w == b"\r\n").unwrap();
                                    let size = usize::from_str_radix(
                                        std::str::from_utf8(&rest[..nl]).unwrap(),
                                        16,
                                    )
                                    .unwrap();
                                    if size == 0 {
                                        break;
                                    }
                                    out.extend_from_slice(&rest[nl + 2..nl + 2 + size]);
                                    rest = &rest[nl + 4 + size..];
                                }
                                break out;
                            }
                        } else if buf.len() >= len {
                            break buf.drain(..len).collect();
                        }
                        let mut chunk = [0u8; 4096];
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    seen.lock()
                        .unwrap()
                        .push((method.clone(), path.clone(), body.clone()));
                    let last = path.rsplit('/').next().unwrap_or("").to_owned();

                    match last.as_str() {
                        "chunked" => {
                            let _ = s.write_all(b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n").await;
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            let _ = s
                                .write_all(b"6;ext=1\r\n world\r\n0\r\nx-trailer: 1\r\n\r\n")
                                .await;
                        }
                        "sse" => {
                            let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n9\r\ndata: 0\n\n\r\n").await;
                            release.notified().await;
                            let _ = s.write_all(b"9\r\ndata: 1\n\n\r\n0\r\n\r\n").await;
                        }
                        "until-close" => {
                            let _ = s
                                .write_all(b"HTTP/1.1 200 OK\r\n\r\nbody until close")
                                .await;
                            return;
                        }
                        "big" => {
                            let n = 3 * 1024 * 1024 + 7;
                            let mut resp =
                                format!("HTTP/1.1 200 OK\r\ncontent-length: {n}\r\n\r\n")
                                    .into_bytes();
                            resp.extend((0..n).map(|i| (i % 251) as u8));
                            let _ = s.write_all(&resp).await;
                        }
                        "overlong" => {
                            // Says 5, sends 10: the extra bytes must not become the next answer.
                            let _ = s
                                .write_all(
                                    b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfirstSTALE",
                                )
                                .await;
                        }
                        "bad" => {
                            let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nx").await;
                        }
                        _ => {
                            let body = format!("{method} {} bytes", body.len());
                            let resp = format!(
                                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nx-seen: 1\r\n\r\n{}",
                                if method == "HEAD" { 99 } else { body.len() },
                                if method == "HEAD" { "" } else { body.as_str() }
                            );
                            let _ = s.write_all(&resp.into_bytes()).await;
                        }
                    }
                }
            });
        }
    });
    RawUpstream {
        addr,
        seen,
        release,
        connections,
    }
}

#[tokio::test]
async fn upstream_framings_stream_through_the_edge() {
    let keys = Keys::generate();
    let up = raw_upstream().await;
    let r = route(NB, "SESSION001", up.addr, id(OWNER), &[]);
    let edge = TestEdge::start(&keys, std::slice::from_ref(&r), EdgeOptions::default()).await;
    let cookie = login(&edge, &keys, &r, id(OWNER), AccessMode::Edit).await;
    let conns = || up.connections.load(std::sync::atomic::Ordering::SeqCst);
    let browser = reqwest::Client::builder()
        .pool_max_idle_per_host(1)
        .build()
        .unwrap();
    let url = |p: &str| edge.url(&format!("/notebooks/{NB}/{p}"));
    let get = |p: &str| {
        let req = browser.get(url(p)).header("cookie", &cookie);
        async move { req.send().await.unwrap() }
    };

    // Chunked, with an interim 103 and a trailer, arriving in two pieces.
    let resp = get("chunked").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "hello world");
    // Request bodies: by length and chunked (a streamed body has no length).
    let resp = browser
        .post(url("echo"))
        .header("cookie", &cookie)
        .body("0123456789")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.text().await.unwrap(), "POST 10 bytes");
    let parts: Vec<Result<bytes::Bytes, std::io::Error>> =
        vec![Ok("abc".into()), Ok("".into()), Ok("defgh".into())];
    let resp = browser
        .put(url("echo"))
        .header("cookie", &cookie)
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            parts,
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.text().await.unwrap(), "PUT 8 bytes");
    // HEAD: the length of the GET, no body.
    let resp = browser
        .head(url("echo"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-length"], "99");
    assert_eq!(resp.bytes().await.unwrap().len(), 0);
    // Several MiB by length, intact.
    let big = get("big").await;
    let big = big.bytes().await.unwrap();
    assert_eq!(big.len(), 3 * 1024 * 1024 + 7);
    assert!(big.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8));
    assert_eq!(conns(), 1, "all of it on one upstream connection");
    {
        let seen = up.seen.lock().unwrap();
        let bodies: Vec<_> = seen
            .iter()
            .map(|(m, _, b)| (m.as_str(), b.clone()))
            .collect();
        assert!(bodies.contains(&("POST", b"0123456789".to_vec())));
        assert!(bodies.contains(&("PUT", b"abcdefgh".to_vec())));
    }

    // An event stream: the first event reaches the browser while the upstream holds back the
    // second (an edge that buffered would never deliver it).
    let mut sse = get("sse").await;
    let first = tokio::time::timeout(Duration::from_secs(10), sse.chunk())
        .await
        .expect("the first event arrives before the stream ends")
        .unwrap()
        .unwrap();
    assert_eq!(&first[..], b"data: 0\n\n");
    up.release.notify_one();
    let second = sse.chunk().await.unwrap().unwrap();
    assert_eq!(&second[..], b"data: 1\n\n");
    assert!(sse.chunk().await.unwrap().is_none());

    // A body that ends with the connection: delivered, and that connection is not reused.
    let before = conns();
    let resp = get("until-close").await;
    assert_eq!(resp.text().await.unwrap(), "body until close");
    let resp = get("echo").await;
    assert_eq!(resp.text().await.unwrap(), "GET 0 bytes");
    assert_eq!(conns(), before + 1);

    // More bytes than announced: the browser gets the announced ones, and the rest never
    // becomes the answer to the next request (the connection is dropped).
    let resp = get("overlong").await;
    assert_eq!(resp.text().await.unwrap(), "first");
    let resp = get("echo").await;
    assert_eq!(resp.text().await.unwrap(), "GET 0 bytes");
    assert_eq!(conns(), before + 2);

    // Conflicting lengths: a clear 502, not a guess.
    let resp = get("bad").await;
    assert_eq!(resp.status(), 502);
    edge.stop().await;
}

/// Marimo opens whatever file `X-Notebook-Id` names: the browser's never goes upstream, on any
/// of the three ways a request leaves the edge (HTTP/1.1 encoder, HTTP/2 pool, WebSocket
/// handshake); the edge's own, naming the notebook's file, always does. `file=` is dropped on
/// the way too.
#[tokio::test]
async fn the_browsers_notebook_id_and_file_never_reach_the_upstream() {
    let keys = Keys::generate();
    let up = FakeUpstream::start().await;
    let r = route(NB, "SESSION001", up.addr, id(OWNER), &[id(VIEWER)]);
    let edge = TestEdge::start(&keys, std::slice::from_ref(&r), EdgeOptions::default()).await;
    let owner = login(&edge, &keys, &r, id(OWNER), AccessMode::Edit).await;
    let forged = "%2Fother%2Fnotebook.py";
    let path = format!("/notebooks/{NB}/public/x.png?file={forged}&v=1");
    let resp = client()
        .get(edge.url(&path))
        .header("cookie", &owner)
        .header("x-notebook-id", forged)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut h2 = h2_client(edge.addr).await;
    let req = http::Request::get(edge.url(&path))
        .header("cookie", &owner)
        .header("x-notebook-id", forged)
        .body(http_body_util::Empty::new())
        .unwrap();
    assert_eq!(h2.send_request(req).await.unwrap().status(), 200);
    let seen = up.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    for s in &seen {
        let ids: Vec<_> = s.headers.get_all("x-notebook-id").iter().collect();
        assert_eq!(ids, ["notebook.py"], "{}", s.uri);
        assert!(s.uri.ends_with("/public/x.png?v=1"), "{}", s.uri);
    }
    edge.stop().await;

    let w = ws_world(EdgeOptions::default()).await;
    let owner = login(&w.edge, &w.keys, &w.route, id(OWNER), AccessMode::Edit).await;
    let mut s = TcpStream::connect(w.edge.addr).await.unwrap();
    s.write_all(format!(
        "GET /notebooks/{NB}/ws?session_id=s_aaaaaa&file={forged} HTTP/1.1\r\nHost: {}\r\nOrigin: {}\r\nCookie: {owner}\r\nX-Notebook-Id: {forged}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        w.edge.addr,
        w.edge.origin()
    ).as_bytes()).await.unwrap();
    let mut head = [0u8; 12];
    s.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 101");
    let seen = w.up.uris.lock().unwrap()[0].to_ascii_lowercase();
    assert!(!seen.contains("other"), "{seen}");
    assert_eq!(
        seen.matches("x-notebook-id: notebook.py\r\n").count(),
        1,
        "{seen}"
    );
    w.edge.stop().await;
}
