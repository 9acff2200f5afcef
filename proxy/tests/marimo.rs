//! The edge in front of a real `marimo edit` server (the pinned venv, `NOTEBOOK_VENV`, default
//! `<workspace>/.venv`): the owner edits and runs, viewers get a live read-only kiosk mirror,
//! every route the research marks "deny" is refused for viewers, a viewer presenting the owner's
//! browser session id gets nowhere, and no browser credential reaches the kernel.

mod common;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use marina_config::wire::{AccessMode, Route};
use tokio_tungstenite::tungstenite::Message;

const NB: &str = "NOTEBOOK01";
const OWNER: &str = "OWNER00001";
const VIEWER: &str = "VIEWER0001";
const MARIMO_TOKEN: &str = "marimo-upstream-secret";

const NOTEBOOK: &str = r#"import marimo

app = marimo.App()


@app.cell
def _():
    x = 40 + 2
    return (x,)


if __name__ == "__main__":
    app.run()
"#;

struct Marimo {
    child: tokio::process::Child,
    port: u16,
    file: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Marimo {
    fn drop(&mut self) {
        // SIGTERM lets Marimo stop its kernel processes (SIGKILL would orphan them).
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status();
        }
    }
}

fn venv() -> PathBuf {
    std::env::var_os("NOTEBOOK_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv"))
}

async fn start_marimo() -> Marimo {
    let marimo = venv().join("bin/marimo");
    assert!(
        marimo.exists(),
        "{} missing: run scripts/setup-python.sh (or set NOTEBOOK_VENV)",
        marimo.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("nb.py");
    std::fs::write(&file, NOTEBOOK).unwrap();
    let pw = dir.path().join("token");
    std::fs::write(&pw, MARIMO_TOKEN).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = tokio::process::Command::new(marimo)
        .args(["edit", "--headless", "--host", "127.0.0.1", "--port"])
        .arg(port.to_string())
        .args(["--skip-update-check", "--token-password-file"])
        .arg(&pw)
        .args(["--base-url", &format!("/notebooks/{NB}")])
        .arg(&file)
        .current_dir(dir.path())
        .env("HOME", dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let health = format!("http://127.0.0.1:{port}/notebooks/{NB}/health");
    for _ in 0..200 {
        if let Ok(r) = client().get(&health).send().await {
            if r.status() == 200 {
                return Marimo {
                    child,
                    port,
                    file,
                    _dir: dir,
                };
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("marimo did not become healthy");
}

struct World {
    keys: Keys,
    marimo: Marimo,
    edge: TestEdge,
    route: Route,
}

async fn world() -> World {
    let keys = Keys::generate();
    let marimo = start_marimo().await;
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
            .body(r#"{"cellIds":["x"],"codes":["open('/tmp/marina-pwned','w')"],"filename":"nb.py","code":"import os"}"#)
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
