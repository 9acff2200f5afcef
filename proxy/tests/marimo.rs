//! The edge in front of a real `marimo edit` server (the pinned venv, `NOTEBOOK_VENV`, default
//! `<workspace>/.venv`): the owner edits and runs, viewers get a live read-only kiosk mirror,
//! every route the research marks "deny" is refused for viewers, a viewer presenting the owner's
//! browser session id gets nowhere, and no browser credential reaches the kernel. And the tricks
//! of issue 10, each first shown to work against Marimo directly and then neutralised by the
//! edge: another notebook's files by `X-Notebook-Id` or `file=`, an encoded `session_id` key, a
//! shared-memory segment by `/@file/`, and a state change from a sibling notebook's origin.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use marina_config::wire::{AccessMode, Route};
use marina_testkit::marimo;
use tokio_tungstenite::tungstenite::Message;

const NB: &str = "NOTEBOOK01";
const OWNER: &str = "OWNER00001";
const VIEWER: &str = "VIEWER0001";
const MARIMO_TOKEN: &str = "marimo-upstream-secret";

const NOTEBOOK: &str = r#"import marimo

app = marimo.App(app_title="OWN-TITLE-A")


@app.cell
def _():
    x = 40 + 2
    return (x,)


if __name__ == "__main__":
    app.run()
"#;

/// Another notebook on the same host, in a directory of its own, with a title, a CSS file and
/// a `public/` file: what the tricks of issue 10 try to reach.
const OTHER_NOTEBOOK: &str = r#"import marimo

app = marimo.App(app_title="OTHER-TITLE-B", css_file="custom.css")


@app.cell
def _():
    y = "OTHER-CODE-B"
    return (y,)


if __name__ == "__main__":
    app.run()
"#;

/// The two notebooks of these tests, and a real Marimo (`marina_testkit::marimo::Server`)
/// serving the first.
struct Marimo {
    _server: marimo::Server,
    port: u16,
    /// `--base-url` (path mode) or `""` (subdomain mode: Marimo at its root).
    base: String,
    /// The notebook, `<dir>/notebook.py` (the name both runtimes use; see `OWN_FILE_KEY`).
    file: PathBuf,
    /// The other notebook, `<other dir>/notebook.py`.
    other_file: PathBuf,
    _dir: tempfile::TempDir,
    _other: tempfile::TempDir,
}

async fn start_marimo(base: &str) -> Marimo {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("notebook.py");
    std::fs::write(&file, NOTEBOOK).unwrap();
    std::fs::create_dir(dir.path().join("public")).unwrap();
    std::fs::write(dir.path().join("public/mine.txt"), "OWN-PUBLIC-A").unwrap();
    let other = tempfile::tempdir().unwrap();
    let other_file = other.path().join("notebook.py");
    std::fs::write(&other_file, OTHER_NOTEBOOK).unwrap();
    std::fs::write(
        other.path().join("custom.css"),
        "/* OTHER-CSS-B */ body { color: red; }",
    )
    .unwrap();
    std::fs::create_dir(other.path().join("public")).unwrap();
    std::fs::write(other.path().join("public/secret.txt"), "OTHER-SECRET-B").unwrap();
    // As the runtimes start it: in the notebook's directory, on `notebook.py`.
    let server = marimo::Server::start(dir.path(), &file, MARIMO_TOKEN, base).await;
    Marimo {
        port: server.port,
        base: server.base_url.clone(),
        _server: server,
        file,
        other_file,
        _dir: dir,
        _other: other,
    }
}

impl Marimo {
    /// A request straight to Marimo with its token, bypassing the edge: shows that a trick
    /// works there, so that the edge's answer to it means something.
    fn direct(&self, method: http::Method, path: &str) -> reqwest::RequestBuilder {
        client()
            .request(
                method,
                format!("http://127.0.0.1:{}{}{path}", self.port, self.base),
            )
            .header("authorization", format!("Bearer {MARIMO_TOKEN}"))
    }
}

struct World {
    keys: Keys,
    marimo: Marimo,
    edge: TestEdge,
    route: Route,
}

async fn world() -> World {
    let keys = Keys::generate();
    let marimo = start_marimo(&format!("/notebooks/{NB}")).await;
    let mut route = route(
        NB,
        "SESSION001",
        format!("127.0.0.1:{}", marimo.port).parse().unwrap(),
        id(OWNER),
        &[id(VIEWER)],
    );
    route.upstream_token = MARIMO_TOKEN.into();
    let edge = TestEdge::start(&keys, std::slice::from_ref(&route), EdgeOptions::default()).await;
    World {
        keys,
        marimo,
        edge,
        route,
    }
}

/// Loads the page through the edge and returns Marimo's skew token from it. (`?kiosk=true`:
/// where a viewer's plain page request is redirected.)
async fn page_token(w: &World, cookie: &str) -> String {
    let r = client()
        .get(w.edge.url(&format!("/notebooks/{NB}/?kiosk=true")))
        .header("cookie", cookie)
        .header("accept", "text/html")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let html = r.text().await.unwrap();
    let at = html.find("data-token=\"").expect("skew token in the page") + 12;
    html[at..at + html[at..].find('"').unwrap()].to_string()
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn open_ws(w: &World, cookie: &str, sid: &str) -> Ws {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = format!("ws://{}/notebooks/{NB}/ws?session_id={sid}", w.edge.addr)
        .into_client_request()
        .unwrap();
    req.headers_mut().insert("cookie", cookie.parse().unwrap());
    req.headers_mut()
        .insert("origin", w.edge.origin().parse().unwrap());
    tokio_tungstenite::connect_async(req).await.unwrap().0
}

/// The same socket opened the HTTP/2 way (RFC 8441 extended CONNECT, over h2c here), as a
/// browser does on a page served over HTTP/2: the page first, then the socket on its connection.
async fn open_ws_h2(
    w: &World,
    cookie: &str,
    sid: &str,
) -> tokio_tungstenite::WebSocketStream<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>> {
    let mut sender = h2_client(w.edge.addr).await;
    let page = http::Request::get(w.edge.url(&format!("/notebooks/{NB}/?kiosk=true")))
        .header("cookie", cookie)
        .body(http_body_util::Empty::new())
        .unwrap();
    assert_eq!(sender.send_request(page).await.unwrap().status(), 200);
    let url = w.edge.url(&format!("/notebooks/{NB}/ws?session_id={sid}"));
    let (status, stream) = h2_websocket(&mut sender, &url, cookie, &w.edge.origin()).await;
    assert_eq!(status, 200, "extended CONNECT");
    tokio_tungstenite::WebSocketStream::from_raw_socket(
        hyper_util::rt::TokioIo::new(stream.unwrap()),
        tokio_tungstenite::tungstenite::protocol::Role::Client,
        None,
    )
    .await
}

/// Marimo's `kernel-ready` message says the session is a read-only kiosk.
fn assert_kiosk(ready: &str) {
    assert!(
        ready.contains("\"kiosk\":true") || ready.contains("\"kiosk\": true"),
        "{ready}"
    );
}

/// Reads text frames until one contains `needle`; returns it. Panics after 20 s.
async fn until<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>, needle: &str) -> String
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let m = tokio::time::timeout_at(deadline, ws.next())
            .await
            .unwrap_or_else(|_| panic!("no message containing {needle:?} within 20 s"));
        match m {
            Some(Ok(Message::Text(t))) if t.contains(needle) => return t.to_string(),
            Some(Ok(Message::Ping(p))) => {
                let _ = ws.send(Message::Pong(p)).await;
            }
            Some(Ok(_)) => {}
            other => panic!("socket ended waiting for {needle:?}: {other:?}"),
        }
    }
}

async fn run_cell(
    w: &World,
    cookie: &str,
    skew: &str,
    sid: &str,
    cell: &str,
    code: &str,
) -> reqwest::Response {
    client()
        .post(w.edge.url(&format!("/notebooks/{NB}/api/kernel/run")))
        .header("cookie", cookie)
        .header("marimo-session-id", sid)
        .header("marimo-server-token", skew)
        .header("content-type", "application/json")
        .body(serde_json::json!({"cellIds": [cell], "codes": [code]}).to_string())
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn owner_edits_viewer_mirrors_and_no_credential_reaches_the_kernel() {
    let w = world().await;
    let owner_token = w.keys.sign(&claims(&w.route, id(OWNER), AccessMode::Edit));
    let resp = handshake(&w.edge, id(NB), &owner_token).await;
    assert_eq!(resp.status(), 303);
    let owner = cookie_pair(&resp);
    let skew = page_token(&w, &owner).await;

    // The owner's socket and a run through the edge.
    let mut ows = open_ws(&w, &owner, "s_owner1").await;
    until(&mut ows, "kernel-ready").await;
    let r = run_cell(
        &w,
        &owner,
        &skew,
        "s_owner1",
        "cellA",
        "print('OUT', 6 * 7)",
    )
    .await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    until(&mut ows, "OUT 42").await;

    // A viewer: kiosk mirror of the owner's live session.
    let viewer_token = w.keys.sign(&claims(&w.route, id(VIEWER), AccessMode::View));
    let viewer = cookie_pair(&handshake(&w.edge, id(NB), &viewer_token).await);
    page_token(&w, &viewer).await;
    let mut vws = open_ws(&w, &viewer, "s_view01").await;
    assert_kiosk(&until(&mut vws, "kernel-ready").await);
    let run = |code: &'static str| run_cell(&w, &owner, &skew, "s_owner1", "cellB", code);
    assert_eq!(run("print('LIVE', 7 * 6)").await.status(), 200);
    until(&mut vws, "LIVE 42").await;
    until(&mut ows, "LIVE 42").await;
    // A second viewer tab whose page came over HTTP/2 opens its socket on that connection: the
    // same forced kiosk, the same live mirror.
    let mut h2ws = open_ws_h2(&w, &viewer, "s_view02").await;
    assert_kiosk(&until(&mut h2ws, "kernel-ready").await);
    assert_eq!(run("print('OVER H2', 6 * 7)").await.status(), 200);
    until(&mut h2ws, "OVER H2 42").await;
    until(&mut vws, "OVER H2 42").await;

    // The viewer presents the owner's browser session id: it gets its own bound id, so the
    // owner keeps editing (Marimo would otherwise hand the viewer the owner's consumer slot).
    let mut hijack = open_ws(&w, &viewer, "s_owner1").await;
    until(&mut hijack, "kernel-ready").await;
    let r = client()
        .post(w.edge.url(&format!("/notebooks/{NB}/api/kernel/run")))
        .header("cookie", viewer.clone())
        .header("marimo-session-id", "s_owner1")
        .header("marimo-server-token", skew.clone())
        .body(serde_json::json!({"cellIds": ["cellX"], "codes": ["print('PWNED')"]}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        403,
        "viewer cannot run even with the owner's session id"
    );
    let r = run_cell(
        &w,
        &owner,
        &skew,
        "s_owner1",
        "cellC",
        "print('STILL', 'OWNER')",
    )
    .await;
    assert_eq!(
        r.status(),
        200,
        "the owner still edits: {}",
        r.text().await.unwrap()
    );
    until(&mut ows, "STILL OWNER").await;

    // What the kernel sees of the request that ran the cell: no edge cookie, URL token, or
    // browser Authorization; the unrelated cookie passes (so the check can see cookies at all).
    let cookie_value = owner.split_once('=').unwrap().1.to_string();
    let code = "import marimo as mo\n_r = mo.app_meta().request\nprint('REQ-' + 'SEEN', dict(_r.headers), dict(_r.cookies))";
    let r = client()
        .post(w.edge.url(&format!("/notebooks/{NB}/api/kernel/run")))
        .header("cookie", format!("{owner}; theme=dark"))
        .header("authorization", "Bearer browser-credential")
        .header("x-forwarded-user", "mallory")
        .header("marimo-session-id", "s_owner1")
        .header("marimo-server-token", skew.clone())
        .body(serde_json::json!({"cellIds": ["cellD"], "codes": [code]}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen = until(&mut ows, "REQ-SEEN").await;
    assert!(
        seen.contains("theme"),
        "cookies are visible to the kernel: {seen}"
    );
    for secret in [
        cookie_value.as_str(),
        owner_token.as_str(),
        viewer_token.as_str(),
        "browser-credential",
        "mallory",
    ] {
        assert!(!seen.contains(secret), "kernel saw {secret:?}: {seen}");
    }

    // Marimo's server drops idle keep-alive connections after 5 s: a browser connection that
    // was quiet longer still works (the edge reconnects upstream instead of failing).
    let browser = reqwest::Client::new();
    for wait in [0, 6] {
        tokio::time::sleep(Duration::from_secs(wait)).await;
        let r = browser
            .get(w.edge.url(&format!("/notebooks/{NB}/api/version")))
            .header("cookie", owner.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "after {wait} s idle");
        r.text().await.unwrap();
    }

    // Marimo's token endpoint is refused for the owner too.
    let r = client()
        .get(w.edge.url(&format!("/notebooks/{NB}/auth/token")))
        .header("cookie", owner.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    drop(w.marimo);
    w.edge.stop().await;
}

/// Every route research §2.2 marks "deny", from the list the unit tests share, plus Marimo's
/// credential endpoints (refused for everyone).
fn denied() -> Vec<(&'static str, &'static str)> {
    let mut v: Vec<(&str, &str)> = include_str!("data/viewer-denied-routes.txt")
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.split_once(' ').expect("METHOD PATH"))
        .collect();
    v.extend([
        ("GET", "/auth/login"),
        ("POST", "/auth/login"),
        ("GET", "/auth/token"),
    ]);
    v
}

#[tokio::test]
async fn every_deny_route_is_refused_for_viewers_against_real_marimo() {
    let w = world().await;
    let owner = login(&w.edge, &w.keys, &w.route, id(OWNER), AccessMode::Edit).await;
    let viewer = login(&w.edge, &w.keys, &w.route, id(VIEWER), AccessMode::View).await;
    let skew = page_token(&w, &owner).await;
    let mut ows = open_ws(&w, &owner, "s_owner1").await;
    until(&mut ows, "kernel-ready").await;
    let before = std::fs::read_to_string(&w.marimo.file).unwrap();
    let denied = denied();
    for &(m, p) in &denied {
        let r = client()
            .request(m.parse().unwrap(), w.edge.url(&format!("/notebooks/{NB}{p}")))
            .header("cookie", viewer.clone())
            .header("marimo-session-id", "s_view01")
            .header("marimo-server-token", skew.clone())
            .header("content-type", "application/json")
            .body(r#"{"cellIds":["x"],"codes":["open('/tmp/marina-pwned','w')"],"filename":"notebook.py","code":"import os"}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403, "{m} {p}");
        let v: serde_json::Value = r
            .json()
            .await
            .unwrap_or_else(|_| panic!("{m} {p}: edge JSON"));
        let code = v["error"]["code"].as_str().unwrap();
        assert!(
            code == "read_only" || code == "credential_endpoint",
            "{m} {p}: {code}"
        );
    }
    // The mutating WebSockets are refused at the upgrade.
    for p in ["/terminal/ws", "/ws_sync"] {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut req = format!("ws://{}/notebooks/{NB}{p}?session_id=s_view01", w.edge.addr)
            .into_client_request()
            .unwrap();
        req.headers_mut().insert("cookie", viewer.parse().unwrap());
        req.headers_mut()
            .insert("origin", w.edge.origin().parse().unwrap());
        match tokio_tungstenite::connect_async(req).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
                assert_eq!(r.status(), 403, "{p}")
            }
            other => panic!("{p}: {:?}", other.map(|_| ())),
        }
    }
    assert_eq!(
        std::fs::read_to_string(&w.marimo.file).unwrap(),
        before,
        "file unchanged"
    );
    // The same requests do reach Marimo for the owner (so the refusals above are the edge's):
    // a save by the owner changes the file.
    let r = client()
        .post(w.edge.url(&format!("/notebooks/{NB}/api/kernel/save")))
        .header("cookie", owner.clone())
        .header("marimo-session-id", "s_owner1")
        .header("marimo-server-token", skew.clone())
        .header("content-type", "application/json")
        .body(
            serde_json::json!({
                "cellIds": ["Hbol"], "codes": ["y = 1"], "names": ["_"], "configs": [{}],
                "filename": w.marimo.file.to_string_lossy(), "persist": true
            })
            .to_string(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "owner save: {}", r.text().await.unwrap());
    assert_ne!(
        std::fs::read_to_string(&w.marimo.file).unwrap(),
        before,
        "owner's save reached Marimo"
    );
    // Denials are counted.
    assert!(
        w.edge
            .metrics
            .denials(marina_proxy::ErrorKind::DeniedReadOnly)
            >= denied
                .iter()
                .filter(|(_, p)| !p.starts_with("/auth"))
                .count() as u64
    );
    drop(w.marimo);
    w.edge.stop().await;
}

// === Issue 10: the edge's answers to tricks that work against Marimo itself ===

/// `encodeURIComponent`, as Marimo's service worker sends a file key.
fn uri_component(s: &std::path::Path) -> String {
    percent_encoding::utf8_percent_encode(&s.to_string_lossy(), percent_encoding::NON_ALPHANUMERIC)
        .to_string()
}

/// The status of a WebSocket handshake through the edge (101 when it opened).
async fn ws_status(w: &World, cookie: &str, query: &str) -> u16 {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = format!("ws://{}/notebooks/{NB}/ws?{query}", w.edge.addr)
        .into_client_request()
        .unwrap();
    req.headers_mut().insert("cookie", cookie.parse().unwrap());
    req.headers_mut()
        .insert("origin", w.edge.origin().parse().unwrap());
    match tokio_tungstenite::connect_async(req).await {
        Ok(_) => 101,
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => r.status().as_u16(),
        Err(e) => panic!("{query}: {e}"),
    }
}

/// The edge's JSON error code of a refused request.
async fn edge_code(r: reqwest::Response) -> String {
    let v: serde_json::Value = r.json().await.expect("edge JSON error");
    v["error"]["code"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn another_notebooks_files_are_out_of_reach_by_header_or_query() {
    let w = world().await;
    let owner = login(&w.edge, &w.keys, &w.route, id(OWNER), AccessMode::Edit).await;
    let viewer = login(&w.edge, &w.keys, &w.route, id(VIEWER), AccessMode::View).await;
    let own_key = uri_component(&w.marimo.file);
    let other_key = uri_component(&w.marimo.other_file);

    // The tricks work against Marimo itself: it serves the `public/` folder of whatever file
    // `X-Notebook-Id` names, and renders whatever file `file=` names (title, CSS inlined).
    let r = w
        .marimo
        .direct(http::Method::GET, "/public/secret.txt")
        .header("x-notebook-id", &other_key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "OTHER-SECRET-B");
    let r = w
        .marimo
        .direct(http::Method::GET, &format!("/?kiosk=true&file={other_key}"))
        .send()
        .await
        .unwrap();
    let page = r.text().await.unwrap();
    assert!(page.contains("OTHER-TITLE-B") && page.contains("OTHER-CSS-B"));

    let url = |p: &str| w.edge.url(&format!("/notebooks/{NB}{p}"));
    for cookie in [&owner, &viewer] {
        // Positive controls: the notebook's own `public/` file, with the header Marimo's
        // service worker sends and without it (the edge names the notebook's file either way).
        for header in [None, Some(own_key.as_str())] {
            let mut req = client()
                .get(url("/public/mine.txt"))
                .header("cookie", cookie);
            if let Some(h) = header {
                req = req.header("x-notebook-id", h);
            }
            let r = req.send().await.unwrap();
            assert_eq!(r.status(), 200, "{header:?}");
            assert_eq!(r.text().await.unwrap(), "OWN-PUBLIC-A");
        }
        // The other notebook's file: Marimo looks for it in this notebook's `public/`.
        for key in [other_key.as_str(), "%2Fetc%2Fnotebook.py"] {
            let r = client()
                .get(url("/public/secret.txt"))
                .header("cookie", cookie)
                .header("x-notebook-id", key)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 404, "{key}");
            assert!(!r.text().await.unwrap().contains("OTHER-SECRET-B"));
        }
        // The same over HTTP/2 (another header path through the edge).
        let mut h2 = h2_client(w.edge.addr).await;
        for (path, want) in [("/public/secret.txt", 404), ("/public/mine.txt", 200)] {
            let req = http::Request::get(url(path))
                .header("cookie", cookie.as_str())
                .header("x-notebook-id", other_key.as_str())
                .body(http_body_util::Empty::new())
                .unwrap();
            let r = h2.send_request(req).await.unwrap();
            assert_eq!(r.status(), want, "HTTP/2 {path}");
        }
        // `file=` is dropped: the page is this notebook's.
        let r = client()
            .get(url(&format!("/?kiosk=true&file={other_key}")))
            .header("cookie", cookie)
            .header("accept", "text/html")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let page = r.text().await.unwrap();
        assert!(page.contains("OWN-TITLE-A"), "this notebook's page");
        assert!(!page.contains("OTHER-TITLE-B") && !page.contains("OTHER-CSS-B"));
        // Nor can it be spelt so that the edge would not see it.
        let r = client()
            .get(url(&format!("/?kiosk=true&%66ile={other_key}")))
            .header("cookie", cookie)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
        assert_eq!(edge_code(r).await, "bad_query");
    }
    // The owner's socket asking for the other file attaches to this notebook.
    let mut ws = open_ws_query(&w, &owner, &format!("session_id=s_owner1&file={other_key}")).await;
    let ready = until(&mut ws, "kernel-ready").await;
    assert!(
        ready.contains("40 + 2") && !ready.contains("OTHER-CODE-B"),
        "{ready}"
    );
    drop(w.marimo);
    w.edge.stop().await;
}

async fn open_ws_query(w: &World, cookie: &str, query: &str) -> Ws {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = format!("ws://{}/notebooks/{NB}/ws?{query}", w.edge.addr)
        .into_client_request()
        .unwrap();
    req.headers_mut().insert("cookie", cookie.parse().unwrap());
    req.headers_mut()
        .insert("origin", w.edge.origin().parse().unwrap());
    tokio_tungstenite::connect_async(req).await.unwrap().0
}

/// A shared-memory segment made outside Marimo (as another program on the host would),
/// removed on drop.
struct Segment(PathBuf);

impl Segment {
    fn new(content: &[u8]) -> Segment {
        let name = format!("marina-test-{:016x}", rand::random::<u64>());
        let path = PathBuf::from("/dev/shm").join(name);
        std::fs::write(&path, content).unwrap();
        Segment(path)
    }

    fn name(&self) -> String {
        self.0.file_name().unwrap().to_string_lossy().into_owned()
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[tokio::test]
async fn encoded_session_ids_and_foreign_segments_are_refused() {
    let w = world().await;
    // The trick works against Marimo itself: Starlette decodes `%73ession_id` and takes the
    // last value, so Marimo registers the session under the raw `s_evil00`.
    {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut req = format!(
            "ws://127.0.0.1:{}/notebooks/{NB}/ws?session_id=s_plain0&%73ession_id=s_evil00",
            w.marimo.port
        )
        .into_client_request()
        .unwrap();
        req.headers_mut().insert(
            "authorization",
            format!("Bearer {MARIMO_TOKEN}").parse().unwrap(),
        );
        let mut direct = tokio_tungstenite::connect_async(req).await.unwrap().0;
        until(&mut direct, "kernel-ready").await;
        let sessions = w
            .marimo
            .direct(http::Method::GET, "/api/sessions")
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(
            sessions.contains("s_evil00") && !sessions.contains("s_plain0"),
            "{sessions}"
        );
        let _ = direct.close(None).await;
    }
    let owner = login(&w.edge, &w.keys, &w.route, id(OWNER), AccessMode::Edit).await;
    let viewer = login(&w.edge, &w.keys, &w.route, id(VIEWER), AccessMode::View).await;
    let skew = page_token(&w, &owner).await;
    // Through the edge: refused at the handshake, for everyone, on both transports.
    for cookie in [&owner, &viewer] {
        for q in [
            "session_id=s_view01&%73ession_id=s_evil00",
            "%73ession_id=s_evil00",
            "session_id=s_view01&session_id=s_view02",
            "session_id=s_view01&kiosk=true&kiosk=false",
        ] {
            assert_eq!(ws_status(&w, cookie, q).await, 400, "{q}");
            let r = client()
                .get(w.edge.url(&format!("/notebooks/{NB}/sse?{q}")))
                .header("cookie", cookie.as_str())
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 400, "sse {q}");
        }
    }
    assert!(w.edge.metrics.denials(marina_proxy::ErrorKind::DeniedQuery) >= 16);
    // Positive controls: the owner's plain socket edits (it resumes the session the direct
    // socket left), the viewer's plain socket mirrors.
    let mut ows = open_ws(&w, &owner, "s_owner1").await;
    until(&mut ows, "kernel-ready").await;
    let mut vws = open_ws(&w, &viewer, "s_view01").await;
    assert_kiosk(&until(&mut vws, "kernel-ready").await);

    // A virtual file, as `mo.image`/`mo.download` make them: the viewer loads it.
    let code = "from marimo._output.data.data import any_data\n_f = any_data(b'VFILE-PAYLOAD-42', ext='txt')\nprint('VFILE-' + 'URL', _f.url)";
    let r = run_cell(&w, &owner, &skew, "s_owner1", "cellV", code).await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let line = until(&mut ows, "VFILE-URL").await;
    let at = line.find("./@file/").expect("a virtual file URL") + "./@file/".len();
    let name: String = line[at..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || "-._+".contains(*c))
        .collect();
    for cookie in [&owner, &viewer] {
        let r = client()
            .get(w.edge.url(&format!("/notebooks/{NB}/@file/{name}")))
            .header("cookie", cookie.as_str())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{name}");
        assert_eq!(r.text().await.unwrap(), "VFILE-PAYLOAD-42");
    }
    // A segment that is not Marimo's: Marimo serves it to anyone who names it ...
    let seg = Segment::new(b"SHM-SECRET-0001");
    let foreign = format!("15-{}", seg.name());
    let r = w
        .marimo
        .direct(http::Method::GET, &format!("/@file/{foreign}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap(), "SHM-SECRET-0001");
    // ... the edge only lets Marimo's own virtual-file names through.
    for cookie in [&owner, &viewer] {
        let r = client()
            .get(w.edge.url(&format!("/notebooks/{NB}/@file/{foreign}")))
            .header("cookie", cookie.as_str())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403);
        assert_eq!(edge_code(r).await, "bad_path");
    }
    // Export reads any virtual file its body names: not for viewers at all.
    let export = |cookie: &str, sid: &str, files: Vec<String>| {
        client()
            .post(w.edge.url(&format!("/notebooks/{NB}/api/export/html")))
            .header("cookie", cookie)
            .header("marimo-session-id", sid)
            .header("marimo-server-token", skew.clone())
            .header("content-type", "application/json")
            .body(
                serde_json::json!({"download": false, "files": files, "includeCode": true})
                    .to_string(),
            )
            .send()
    };
    let r = export(&viewer, "s_view01", vec![format!("/@file/{foreign}")])
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(edge_code(r).await, "read_only");
    // The owner's export works, with the notebook's own virtual file inlined.
    let r = export(&owner, "s_owner1", vec![format!("/@file/{name}")])
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let html = r.text().await.unwrap();
    assert!(html.contains("OWN-TITLE-A"));
    drop(seg);
    drop(w.marimo);
    w.edge.stop().await;
}

/// Reads text frames until one contains `needle`; returns all of them.
async fn frames_until(ws: &mut Ws, needle: &str) -> Vec<String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    loop {
        let m = tokio::time::timeout_at(deadline, ws.next())
            .await
            .unwrap_or_else(|_| panic!("no message containing {needle:?} within 20 s"));
        match m {
            Some(Ok(Message::Text(t))) => {
                let done = t.contains(needle);
                seen.push(t.to_string());
                if done {
                    return seen;
                }
            }
            Some(Ok(Message::Ping(p))) => {
                let _ = ws.send(Message::Pong(p)).await;
            }
            Some(Ok(_)) => {}
            other => panic!("socket ended waiting for {needle:?}: {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_sibling_notebooks_page_cannot_act_with_the_owners_cookie() {
    // Subdomain mode: each notebook its own origin, all of them one site, so `SameSite=Strict`
    // sends notebook01's cookie along with a request a page of notebook02 makes.
    let keys = Keys::generate();
    let marimo = start_marimo("").await;
    let mut r = route(
        NB,
        "SESSION001",
        format!("127.0.0.1:{}", marimo.port).parse().unwrap(),
        id(OWNER),
        &[],
    );
    r.upstream_token = MARIMO_TOKEN.into();
    let edge = TestEdge::start(
        &keys,
        std::slice::from_ref(&r),
        EdgeOptions {
            subdomain: true,
            ..EdgeOptions::default()
        },
    )
    .await;
    let port = edge.addr.port();
    let host = format!("{}.nb.test:{port}", NB.to_lowercase());
    let own = format!("http://{host}");
    let sibling = format!("http://notebook02.nb.test:{port}");
    let token = keys.sign(&claims(&r, id(OWNER), AccessMode::Edit));
    let resp = client()
        .get(edge.url(&format!("/_auth?token={token}")))
        .header("host", &host)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 303);
    let cookie = cookie_pair(&resp);
    let html = client()
        .get(edge.url("/"))
        .header("host", &host)
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let at = html.find("data-token=\"").expect("skew token in the page") + 12;
    let skew = html[at..at + html[at..].find('"').unwrap()].to_string();
    let socket = |origin: &str| {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut req = format!("ws://{}/ws?session_id=s_owner1", edge.addr)
            .into_client_request()
            .unwrap();
        let h = req.headers_mut();
        h.insert("host", host.parse().unwrap());
        h.insert("cookie", cookie.parse().unwrap());
        h.insert("origin", origin.parse().unwrap());
        tokio_tungstenite::connect_async(req)
    };
    // A socket from the sibling's page: refused, as before.
    match socket(&sibling).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 403),
        other => panic!("sibling socket: {:?}", other.map(|_| ())),
    }
    let mut ws = socket(&own).await.unwrap().0;
    until(&mut ws, "kernel-ready").await;

    let run = |cell: &str, marker: &str, headers: &[(&str, &str)]| {
        let mut req = client()
            .post(edge.url("/api/kernel/run"))
            .header("host", &host)
            .header("cookie", &cookie)
            .header("marimo-session-id", "s_owner1")
            .header("marimo-server-token", &skew)
            .header("content-type", "application/json")
            .body(
                // The printed marker is not in the code as sent, so only a run shows it.
                serde_json::json!({"cellIds": [cell], "codes": [format!("print('RAN-' + '{marker}')")]})
                    .to_string(),
            );
        for (n, v) in headers {
            req = req.header(*n, *v);
        }
        req.send()
    };
    // The owner's own page runs code (its browser sends `Origin` and `Sec-Fetch-Site`).
    let r = run(
        "c1",
        "OWN",
        &[("origin", &own), ("sec-fetch-site", "same-origin")],
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    until(&mut ws, "RAN-OWN").await;
    // A non-browser client with the cookie (neither header) works too.
    let r = run("c2", "CLIENT", &[]).await.unwrap();
    assert_eq!(r.status(), 200);
    until(&mut ws, "RAN-CLIENT").await;
    // The same request from the sibling notebook's page, another site, an opaque origin, or
    // marked same-site by the browser: refused before Marimo sees it.
    for (i, headers) in [
        vec![("origin", sibling.as_str())],
        vec![
            ("origin", sibling.as_str()),
            ("sec-fetch-site", "same-site"),
        ],
        vec![("sec-fetch-site", "same-site")],
        vec![("sec-fetch-site", "cross-site")],
        vec![("origin", "https://evil.example")],
        vec![("origin", "null")],
    ]
    .into_iter()
    .enumerate()
    {
        let r = run(&format!("x{i}"), "FORGED", &headers).await.unwrap();
        assert_eq!(r.status(), 403, "{headers:?}");
        assert_eq!(edge_code(r).await, "bad_origin");
    }
    assert!(edge.metrics.denials(marina_proxy::ErrorKind::DeniedOrigin) >= 7);
    // None of them ran: the next own-origin run is the first output after `RAN-CLIENT`.
    let r = run("c3", "LAST", &[("origin", &own)]).await.unwrap();
    assert_eq!(r.status(), 200);
    let frames = frames_until(&mut ws, "RAN-LAST").await;
    assert!(
        frames.iter().all(|f| !f.contains("RAN-FORGED")),
        "{frames:?}"
    );
    drop(marimo);
    edge.stop().await;
}
