//! End to end: what the edge reports drives the lifecycle; one-time URLs hold across edge
//! replicas; a crash of Marina leaves nothing unknown running. Real `marina serve` and
//! `marina proxy` processes, real Marimo and Sail.

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use futures_util::SinkExt;
use support::*;
use tokio_tungstenite::tungstenite::{client::IntoClientRequest, Message};

async fn open_url(m: &Marina, nb: &str) -> String {
    open_url_as(m, &m.admin_key, nb).await
}

async fn open_url_as(m: &Marina, key: &str, nb: &str) -> String {
    let v = m
        .ok(
            key,
            "POST",
            &format!("/workloads/notebooks/{nb}/open"),
            None,
            200,
        )
        .await;
    v["url"].as_str().unwrap().to_owned()
}

async fn start_notebook(m: &Marina) -> String {
    let nb = m.create_notebook("lifecycle").await;
    m.ok(
        &m.admin_key,
        "POST",
        &format!("/workloads/notebooks/{nb}/start"),
        None,
        200,
    )
    .await;
    m.wait_status(&nb, "running|detached", Duration::from_secs(180))
        .await;
    nb
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_presence_drives_running_detached_and_the_detached_timeout() {
    let m = Marina::start(&[
        ("MARINA_CONTROL__MONITOR_INTERVAL_MS", "200"),
        ("MARINA_PROXY__ACTIVITY_INTERVAL_MS", "300"),
        ("MARINA_CONTROL__DETACHED_TIMEOUT_SECONDS", "6"),
    ])
    .await;
    let nb = start_notebook(&m).await;
    let (s, _) = redeem(&m.http, &open_url(&m, &nb).await)
        .await
        .expect("handshake");

    // A browser loads the notebook and connects through the edge: running, lastActiveAt set.
    let page = m
        .http
        .get(&s.base)
        .header("cookie", &s.cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    let url = format!("{}ws?session_id=s_life01", s.base.replacen("http", "ws", 1));
    let mut req = url.into_client_request().unwrap();
    req.headers_mut()
        .insert("cookie", s.cookie.parse().unwrap());
    req.headers_mut()
        .insert("origin", s.origin.parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .expect("ws through the edge");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let nbv = m.wait_status(&nb, "running", Duration::from_secs(10)).await;
        if nbv["lastActiveAt"].is_string() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no lastActiveAt: {nbv}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The browser goes away: detached within a few seconds, then stopped by the detached
    // timeout (6 s here), with its processes gone.
    ws.send(Message::Close(None)).await.unwrap();
    drop(ws);
    m.wait_status(&nb, "detached", Duration::from_secs(10))
        .await;
    let nbv = m.wait_status(&nb, "stopped", Duration::from_secs(20)).await;
    assert!(
        nbv["statusMessage"]
            .as_str()
            .unwrap_or_default()
            .contains("no browser"),
        "{nbv}"
    );
    let left = processes_mentioning(&m.dir.path().join("notebooks").join(&nb).to_string_lossy());
    assert!(left.is_empty(), "{left:?}");
}

/// A second edge replica, sharing the keys of the data directory and the control plane's
/// replay store.
struct SecondEdge {
    child: std::process::Child,
    url: String,
}

impl SecondEdge {
    async fn start(m: &Marina) -> SecondEdge {
        let (port, admin) = (free_port(), free_port());
        let url = format!("http://127.0.0.1:{port}");
        let mut child = Command::new(env!("CARGO_BIN_EXE_marina"))
            .args(["proxy", "--data-dir"])
            .arg(m.dir.path())
            .env("MARINA_PROXY__LISTEN", format!("127.0.0.1:{port}"))
            .env("MARINA_PROXY__ADMIN_LISTEN", format!("127.0.0.1:{admin}"))
            .env("MARINA_PROXY__PUBLIC_URL", &url)
            .env("MARINA_PROXY__CONTROL_URL", &m.api)
            .env("MARINA_PROXY__REPLAY_STORE", "control")
            .env("MARINA_PROXY__FRAME_ANCESTORS", format!("[\"{}\"]", m.api))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(m.dir.path().join("edge2.err")).unwrap(),
            ))
            .spawn()
            .expect("spawn marina proxy");
        let http = reqwest::Client::new();
        for _ in 0..100 {
            let ready = http
                .get(format!("http://127.0.0.1:{admin}/readyz"))
                .send()
                .await;
            if ready.map(|r| r.status().is_success()).unwrap_or(false) {
                return SecondEdge { child, url };
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "second edge not ready: {}",
            std::fs::read_to_string(m.dir.path().join("edge2.err")).unwrap_or_default()
        );
    }
}

impl Drop for SecondEdge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_time_url_is_single_use_across_edge_replicas() {
    let m = Marina::start(&[("MARINA_PROXY__REPLAY_STORE", "control")]).await;
    let nb = start_notebook(&m).await;
    let edge2 = SecondEdge::start(&m).await;

    // Redeemed on the second replica first…
    let url = open_url(&m, &nb).await;
    let on_edge2 = url.replacen(&m.edge, &edge2.url, 1);
    let (s2, _) = redeem(&m.http, &on_edge2)
        .await
        .expect("first use, on replica 2");
    // …the same token is refused by the first replica.
    let (status, page) = redeem(&m.http, &url)
        .await
        .err()
        .expect("replay on replica 1");
    assert!(matches!(status, 401 | 409), "{status}: {page}");
    assert!(page.to_lowercase().contains("already"), "{page}");

    // The cookie one replica sealed opens on the other: no sticky sessions needed.
    let page = m
        .http
        .get(format!("{}/notebooks/{nb}/", m.edge))
        .header("cookie", &s2.cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_crash_running_notebooks_are_adopted_and_orphans_removed() {
    let m = Marina::start(&[]).await;
    let nb = start_notebook(&m).await;
    let before = m
        .ok(
            &m.admin_key,
            "GET",
            &format!("/workloads/notebooks/{nb}"),
            None,
            200,
        )
        .await;
    let session = before["included"]["notebooks"][0]["sessionId"].clone();
    let key = m.admin_key.clone();

    // Marina dies without a chance to clean up; its notebook's processes live on.
    let dir = m.crash();
    let nb_dir = dir.path().join("notebooks").join(&nb);
    assert!(
        !processes_mentioning(&nb_dir.to_string_lossy()).is_empty(),
        "notebook died with Marina"
    );

    // The next start adopts it: same session, still reachable through the (new) edge.
    let m = Marina::start_in(dir, &[]).await;
    assert_eq!(m.admin_key, key, "the admin key survives restarts");
    let after = m
        .wait_status(&nb, "running|detached", Duration::from_secs(30))
        .await;
    assert_eq!(
        after["sessionId"], session,
        "adopted, not restarted: {after}"
    );
    let (s, _) = redeem(&m.http, &open_url(&m, &nb).await)
        .await
        .expect("handshake after restart");
    let page = m
        .http
        .get(&s.base)
        .header("cookie", &s.cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);

    // A graceful stop of Marina takes its local notebooks down with it.
    let nb_dir = m.dir.path().join("notebooks").join(&nb);
    let mut m = m;
    m.terminate();
    let left = processes_mentioning(&nb_dir.to_string_lossy());
    assert!(left.is_empty(), "{left:?}");
}

/// A WebSocket through the edge of session `s`, as a browser opens one.
async fn socket(
    s: &EdgeSession,
    query: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    let url = format!("{}ws?{query}", s.base.replacen("http", "ws", 1));
    let mut req = url.into_client_request().unwrap();
    req.headers_mut()
        .insert("cookie", s.cookie.parse().unwrap());
    req.headers_mut()
        .insert("origin", s.origin.parse().unwrap());
    tokio_tungstenite::connect_async(req)
        .await
        .expect("ws through the edge")
        .0
}

/// Polls presence (as `key`) until `want` holds of its items.
async fn presence_until(
    m: &Marina,
    key: &str,
    nb: &str,
    what: &str,
    want: impl Fn(&[serde_json::Value]) -> bool,
) -> Vec<serde_json::Value> {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let v = m
            .ok(
                key,
                "GET",
                &format!("/workloads/notebooks/{nb}/presence"),
                None,
                200,
            )
            .await;
        let items = v["items"].as_array().cloned().unwrap_or_default();
        if want(&items) {
            return items;
        }
        assert!(std::time::Instant::now() < deadline, "{what}: {v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn entry<'a>(items: &'a [serde_json::Value], member: &str) -> Option<&'a serde_json::Value> {
    items.iter().find(|i| i["memberId"] == member)
}

/// Presence through real sockets on two edge replicas: the owner (through edge 1) and a viewer
/// (through both) are listed once each with their mode and their sockets summed over the
/// edges; a closed socket is taken off; an edge that stops reporting (killed) takes its
/// sockets with it, without detaching a notebook someone still has open elsewhere; the last
/// socket closed leaves the list empty and the notebook detached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_lists_who_has_the_notebook_open_over_two_edges() {
    let m = Marina::start(&[
        ("MARINA_CONTROL__MONITOR_INTERVAL_MS", "200"),
        ("MARINA_PROXY__ACTIVITY_INTERVAL_MS", "300"),
        ("MARINA_PROXY__REPLAY_STORE", "control"),
    ])
    .await;
    let admin = m.admin_key.clone();
    let nb = start_notebook(&m).await;
    let me = m.ok(&admin, "GET", "/iam/me", None, 200).await;
    let owner = me["member"]["id"]
        .as_str()
        .expect("my member id")
        .to_owned();
    let vera = m
        .ok(
            &admin,
            "POST",
            "/iam/members",
            Some(serde_json::json!({"name": "Vera"})),
            201,
        )
        .await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let team = m
        .ok(
            &admin,
            "POST",
            "/iam/teams",
            Some(serde_json::json!({"name": "a"})),
            201,
        )
        .await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let body = serde_json::json!({"memberIds": [vera]});
    m.ok(
        &admin,
        "POST",
        &format!("/iam/teams/{team}/members"),
        Some(body),
        200,
    )
    .await;
    let body = serde_json::json!({"teamIds": [team]});
    m.ok(
        &admin,
        "POST",
        &format!("/workloads/notebooks/{nb}/teams"),
        Some(body),
        200,
    )
    .await;
    let vera_key = m
        .ok(
            &admin,
            "POST",
            &format!("/iam/members/{vera}/api-keys"),
            Some(serde_json::json!({"name": "v"})),
            201,
        )
        .await["secret"]
        .as_str()
        .unwrap()
        .to_owned();
    // Nobody yet.
    let items = presence_until(&m, &vera_key, &nb, "empty", |i| i.is_empty()).await;
    assert!(items.is_empty());

    let edge2 = SecondEdge::start(&m).await;
    let (owner_s, _) = redeem(&m.http, &open_url(&m, &nb).await)
        .await
        .expect("owner handshake");
    let mut owner_ws = socket(&owner_s, "session_id=s_pres01").await;
    let on_edge2 = open_url_as(&m, &vera_key, &nb)
        .await
        .replacen(&m.edge, &edge2.url, 1);
    let (vera_s2, _) = redeem(&m.http, &on_edge2).await.expect("vera on edge 2");
    let (vera_s1, _) = redeem(&m.http, &open_url_as(&m, &vera_key, &nb).await)
        .await
        .expect("vera on edge 1");
    let vera_ws2 = socket(&vera_s2, "session_id=s_pres02&kiosk=true").await;
    let mut vera_ws1 = socket(&vera_s1, "session_id=s_pres03&kiosk=true").await;

    let items = presence_until(&m, &vera_key, &nb, "owner and Vera", |i| {
        entry(i, &owner).is_some_and(|e| e["openSockets"] == 1)
            && entry(i, &vera).is_some_and(|e| e["openSockets"] == 2)
    })
    .await;
    assert_eq!(items.len(), 2, "one entry per member: {items:?}");
    assert_eq!(entry(&items, &owner).unwrap()["mode"], "edit");
    let v = entry(&items, &vera).unwrap();
    assert_eq!(v["mode"], "view");
    assert!(v["since"].is_string(), "{v}");

    // Vera closes her tab on edge 1: one socket left, through edge 2.
    vera_ws1.send(Message::Close(None)).await.unwrap();
    drop(vera_ws1);
    presence_until(&m, &admin, &nb, "Vera on edge 2 only", |i| {
        entry(i, &vera).is_some_and(|e| e["openSockets"] == 1)
    })
    .await;
    // Edge 2 dies (its socket with it, as far as anyone can tell): Vera leaves the list within
    // a few of its intervals; the owner stays, and so does the notebook.
    drop(vera_ws2);
    drop(edge2);
    let items = presence_until(&m, &admin, &nb, "Vera gone with edge 2", |i| {
        entry(i, &vera).is_none()
    })
    .await;
    assert!(entry(&items, &owner).is_some(), "{items:?}");
    let nbv = m.wait_status(&nb, "running", Duration::from_secs(5)).await;
    assert_eq!(nbv["status"], "running");
    // The last socket closes: nobody is present, and the notebook is detached.
    owner_ws.send(Message::Close(None)).await.unwrap();
    drop(owner_ws);
    presence_until(&m, &admin, &nb, "empty again", |i| i.is_empty()).await;
    m.wait_status(&nb, "detached", Duration::from_secs(10))
        .await;
}
