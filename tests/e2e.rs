//! End to end, through the composed binary: a real `marina serve` (control plane, edge, local
//! runtime), real Marimo and Sail processes, a real SQLite file. What a host application and two
//! browsers would do, over HTTP and WebSocket.

mod support;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use support::*;
use tokio_tungstenite::tungstenite::{client::IntoClientRequest, Message};

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Marimo's skew-protection token, embedded in the notebook page.
fn server_token(html: &str) -> String {
    let marker = "marimo-server-token data-token=\"";
    let start = html.find(marker).expect("server token in page") + marker.len();
    html[start..].split('"').next().unwrap().to_owned()
}

async fn connect_ws(s: &EdgeSession, path_and_query: &str) -> Result<Ws, String> {
    let url = format!("{}{}", s.base.replacen("http", "ws", 1), path_and_query);
    let mut req = url.into_client_request().unwrap();
    req.headers_mut()
        .insert("cookie", s.cookie.parse().unwrap());
    req.headers_mut()
        .insert("origin", s.origin.parse().unwrap());
    match tokio_tungstenite::connect_async(req).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            Err(format!("HTTP {}", resp.status()))
        }
        Err(e) => Err(e.to_string()),
    }
}

/// Reads text frames until one contains `needle`; returns all text seen.
async fn read_until(ws: &mut Ws, needle: &str, within: Duration) -> Result<String, String> {
    let mut seen = String::new();
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let next = tokio::time::timeout_at(deadline, ws.next()).await;
        match next {
            Err(_) => {
                return Err(format!(
                    "no {needle:?} within {within:?}; saw: {}",
                    tail(&seen, 20)
                ))
            }
            Ok(None) => {
                return Err(format!(
                    "socket ended before {needle:?}; saw: {}",
                    tail(&seen, 20)
                ))
            }
            Ok(Some(Err(e))) => return Err(format!("socket error {e}; saw: {}", tail(&seen, 20))),
            Ok(Some(Ok(Message::Text(t)))) => {
                seen.push_str(&t);
                seen.push('\n');
                if t.contains(needle) {
                    return Ok(seen);
                }
            }
            Ok(Some(Ok(Message::Close(c)))) => {
                return Err(format!("closed {c:?} before {needle:?}"))
            }
            Ok(Some(Ok(_))) => {}
        }
    }
}

async fn post_marimo(
    http: &reqwest::Client,
    s: &EdgeSession,
    path: &str,
    session_id: &str,
    token: &str,
    body: Value,
) -> u16 {
    http.post(format!("{}{}", s.base, path))
        .header("cookie", &s.cookie)
        .header("Marimo-Session-Id", session_id)
        .header("Marimo-Server-Token", token)
        .json(&body)
        .send()
        .await
        .expect("POST through the edge")
        .status()
        .as_u16()
}

/// Sets up a second member who sees the notebook through a shared team; returns their API key.
async fn viewer_with_access(m: &Marina, notebook: &str) -> String {
    let admin = &m.admin_key;
    let member = m
        .ok(
            admin,
            "POST",
            "/iam/members",
            Some(json!({"name": "Vera Viewer"})),
            201,
        )
        .await;
    let member_id = member["id"].as_str().unwrap().to_owned();
    let team = m
        .ok(
            admin,
            "POST",
            "/iam/teams",
            Some(json!({"name": "analysts"})),
            201,
        )
        .await;
    let team_id = team["id"].as_str().unwrap().to_owned();
    m.ok(
        admin,
        "POST",
        &format!("/iam/teams/{team_id}/members"),
        Some(json!({"memberIds": [member_id]})),
        200,
    )
    .await;
    m.ok(
        admin,
        "POST",
        &format!("/workloads/notebooks/{notebook}/teams"),
        Some(json!({"teamIds": [team_id]})),
        200,
    )
    .await;
    let key = m
        .ok(
            admin,
            "POST",
            &format!("/iam/members/{member_id}/api-keys"),
            Some(json!({"name": "vera"})),
            201,
        )
        .await;
    key["secret"].as_str().expect("api key secret").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notebook_runs_spark_through_the_edge_and_viewers_only_mirror_it() {
    let m = Marina::start(&[("MARINA_CONTROL__MONITOR_INTERVAL_MS", "200")]).await;
    let nb = m.create_notebook("Daily Sales Analysis").await;
    let viewer_key = viewer_with_access(&m, &nb).await;

    // Start: stopped → starting → running, with real Sail and Marimo processes.
    let started = m
        .ok(
            &m.admin_key,
            "POST",
            &format!("/workloads/notebooks/{nb}/start"),
            None,
            200,
        )
        .await;
    assert_eq!(started["status"], "starting");
    m.wait_status(&nb, "running|detached", Duration::from_secs(180))
        .await;

    // The owner's one-time URL: 303 with a host-only, HttpOnly, SameSite=Strict cookie, and a
    // Location without the token.
    let open = m
        .ok(
            &m.admin_key,
            "POST",
            &format!("/workloads/notebooks/{nb}/open"),
            None,
            200,
        )
        .await;
    let url = open["url"].as_str().unwrap().to_owned();
    assert!(
        url.starts_with(&format!("{}/notebooks/{nb}/_auth?token=", m.edge)),
        "{url}"
    );
    let (owner, headers) = redeem(&m.http, &url).await.expect("owner handshake");
    let set_cookie = headers["set-cookie"].to_str().unwrap();
    assert!(set_cookie.contains("HttpOnly"), "{set_cookie}");
    assert!(set_cookie.contains("SameSite=Strict"), "{set_cookie}");
    assert!(
        !set_cookie.to_ascii_lowercase().contains("domain="),
        "host-only: {set_cookie}"
    );
    assert!(
        !headers["location"].to_str().unwrap().contains("token"),
        "token left in Location"
    );
    assert_eq!(headers["cache-control"], "no-store");
    assert_eq!(headers["referrer-policy"], "no-referrer");

    // The same URL a second time is refused, with the "already used" page.
    let (status, page) = redeem(&m.http, &url).await.err().expect("replay must fail");
    assert!((400..500).contains(&status), "replay got {status}");
    assert!(page.to_lowercase().contains("already"), "{page}");

    // The notebook page loads through the edge, framed only by the host page's origin.
    let page = m
        .http
        .get(&owner.base)
        .header("cookie", &owner.cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    let csp = page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(csp.contains(&format!("frame-ancestors {}", m.api)), "{csp}");
    let token = server_token(&page.text().await.unwrap());

    // The owner's kernel session, over the edge's WebSocket relay.
    let mut owner_ws = connect_ws(&owner, "ws?session_id=s_owner1")
        .await
        .expect("owner ws");
    read_until(&mut owner_ws, "kernel-ready", Duration::from_secs(60))
        .await
        .unwrap();

    // Run a cell that queries the notebook's own Sail server through Spark Connect.
    let code = "from pyspark.sql import SparkSession as _S\nprint('answer', _S.builder.getOrCreate().sql('select 41 + 1 as a').collect()[0].a)";
    let run = json!({"cellIds": ["e2ecell01"], "codes": [code]});
    assert_eq!(
        post_marimo(&m.http, &owner, "api/kernel/run", "s_owner1", &token, run).await,
        200
    );
    read_until(&mut owner_ws, "answer 42", Duration::from_secs(90))
        .await
        .expect("spark result on the owner's socket");

    // The owner's code runs sandboxed: Marina's admin key, two levels above the notebook's
    // directory on the host (it is there: positive control), does not exist for it, while its
    // own notebook does, at the neutral path /notebook.
    // Marina's own process environment and its control API (real, on the host's loopback)
    // are out of reach too; the same API answers the test process (positive control).
    assert!(m.dir.path().join("admin-api-key").is_file());
    let api_port = m
        .api
        .rsplit(':')
        .next()
        .unwrap()
        .trim_end_matches('/')
        .to_owned();
    assert_eq!(
        m.http
            .get(format!("{}/healthz", m.api))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let code = format!(
        "import os, urllib.request\ndef _r(p):\n    try:\n        return open(p).read()[:6]\n    except Exception as e:\n        return type(e).__name__\ndef _u(u):\n    try:\n        return urllib.request.urlopen(u, timeout=5).status\n    except Exception as e:\n        return type(e).__name__\nprint('probe', _r('../../admin-api-key'), _r('../../../admin-api-key'), _r('/proc/{pid}/environ'), _u('http://127.0.0.1:{api_port}/healthz'), _r('notebook.py'), os.path.abspath('notebook.py'))",
        pid = m.pid()
    );
    let run = json!({"cellIds": ["e2eprobe1"], "codes": [code]});
    assert_eq!(
        post_marimo(&m.http, &owner, "api/kernel/run", "s_owner1", &token, run).await,
        200
    );
    read_until(
        &mut owner_ws,
        "probe FileNotFoundError FileNotFoundError FileNotFoundError URLError import /notebook/notebook.py",
        Duration::from_secs(60),
    )
    .await
    .expect("the sandboxed cell's view of the files");

    // A team member gets a view URL: the page and a kiosk mirror of the owner's session.
    let open = m
        .ok(
            &viewer_key,
            "POST",
            &format!("/workloads/notebooks/{nb}/open"),
            None,
            200,
        )
        .await;
    let (viewer, _) = redeem(&m.http, open["url"].as_str().unwrap())
        .await
        .expect("viewer handshake");
    // The page first sends a viewer to its kiosk view, where Marimo's UI starts read-only.
    let page = m
        .http
        .get(&viewer.base)
        .header("cookie", &viewer.cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 302);
    assert_eq!(
        page.headers()["location"],
        format!("/notebooks/{nb}/?kiosk=true")
    );
    let page = m
        .http
        .get(format!("{}?kiosk=true", viewer.base))
        .header("cookie", &viewer.cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    let mut viewer_ws = connect_ws(&viewer, "ws?session_id=s_viewr1")
        .await
        .expect("viewer ws");
    let seen = read_until(&mut viewer_ws, "kernel-ready", Duration::from_secs(30))
        .await
        .unwrap();
    assert!(
        seen.contains("\"kiosk\": true") || seen.contains("\"kiosk\":true"),
        "viewer not in kiosk: {seen}"
    );

    // What the viewer may not do, even presenting the owner's browser session id.
    let run = json!({"cellIds": ["e2ecell02"], "codes": ["print('viewer was here')"]});
    for sid in ["s_viewr1", "s_owner1"] {
        assert_eq!(
            post_marimo(&m.http, &viewer, "api/kernel/run", sid, &token, run.clone()).await,
            403
        );
    }
    let save = json!({"cellIds": [], "codes": [], "names": [], "configs": [], "filename": "x.py"});
    assert_eq!(
        post_marimo(
            &m.http,
            &viewer,
            "api/kernel/save",
            "s_viewr1",
            &token,
            save
        )
        .await,
        403
    );
    assert_eq!(
        post_marimo(
            &m.http,
            &viewer,
            "api/kernel/takeover",
            "s_viewr1",
            &token,
            json!({})
        )
        .await,
        403
    );
    assert!(
        connect_ws(&viewer, "terminal/ws").await.is_err(),
        "viewer reached the terminal"
    );

    // The owner's next output reaches the viewer's mirror live.
    let run = json!({"cellIds": ["e2ecell03"], "codes": ["print('answer', 6 * 7 + 1)"]});
    assert_eq!(
        post_marimo(&m.http, &owner, "api/kernel/run", "s_owner1", &token, run).await,
        200
    );
    read_until(&mut viewer_ws, "answer 43", Duration::from_secs(60))
        .await
        .expect("viewer mirrors the owner");
    let _ = owner_ws.send(Message::Close(None)).await;
    let _ = viewer_ws.send(Message::Close(None)).await;

    // Stop: both process trees go away, and the edge stops routing the old cookie.
    let stopped = m
        .ok(
            &m.admin_key,
            "POST",
            &format!("/workloads/notebooks/{nb}/stop"),
            None,
            200,
        )
        .await;
    assert_eq!(stopped["status"], "stopping");
    m.wait_status(&nb, "stopped", Duration::from_secs(60)).await;
    let nb_dir = m.dir.path().join("notebooks").join(&nb);
    let left = processes_mentioning(&nb_dir.to_string_lossy());
    assert!(left.is_empty(), "processes left after stop: {left:?}");
    tokio::time::sleep(Duration::from_secs(3)).await; // the edge's routes feed catches up
    let after = m
        .http
        .get(&owner.base)
        .header("cookie", &owner.cookie)
        .send()
        .await
        .unwrap();
    assert!(
        matches!(after.status().as_u16(), 404 | 409),
        "after stop: {}",
        after.status()
    );
}

/// A busy kernel is activity: a real Marimo cell that sleeps well past a 3 s idle timeout and a
/// 3 s detached timeout (its browser gone as soon as the cell started) keeps the notebook up;
/// once the cell finishes, the timers start again and the notebook is stopped. The signal is
/// Marimo's own kernel status (`GET /api/kernel/status`), asked by the local runtime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_cell_keeps_its_notebook_up_and_it_stops_after_the_run() {
    let m = Marina::start(&[
        ("MARINA_CONTROL__MONITOR_INTERVAL_MS", "200"),
        ("MARINA_PROXY__ACTIVITY_INTERVAL_MS", "300"),
        ("MARINA_CONTROL__IDLE_AFTER_SECONDS", "1"),
        ("MARINA_CONTROL__DETACHED_TIMEOUT_SECONDS", "3"),
    ])
    .await;
    let nb = m.create_notebook("busy").await;
    let admin = m.admin_key.clone();
    m.ok(
        &admin,
        "PATCH",
        &format!("/workloads/notebooks/{nb}"),
        Some(json!({"idleTimeoutSeconds": 3})),
        200,
    )
    .await;
    m.ok(
        &admin,
        "POST",
        &format!("/workloads/notebooks/{nb}/start"),
        None,
        200,
    )
    .await;
    m.wait_status(&nb, "running|detached", Duration::from_secs(180))
        .await;
    let open = m
        .ok(
            &admin,
            "POST",
            &format!("/workloads/notebooks/{nb}/open"),
            None,
            200,
        )
        .await;
    let (owner, _) = redeem(&m.http, open["url"].as_str().unwrap())
        .await
        .expect("handshake");
    let page = m
        .http
        .get(&owner.base)
        .header("cookie", &owner.cookie)
        .send()
        .await
        .unwrap();
    let token = server_token(&page.text().await.unwrap());
    let mut ws = connect_ws(&owner, "ws?session_id=s_busy01")
        .await
        .expect("owner ws");
    read_until(&mut ws, "kernel-ready", Duration::from_secs(60))
        .await
        .unwrap();

    // A cell that runs for 15 s: the owner starts it and closes the tab once it runs.
    const RUN_S: u64 = 15;
    let code = format!("import time as _t\n_t.sleep({RUN_S})\nprint('slept')");
    let run = json!({"cellIds": ["busycell1"], "codes": [code]});
    assert_eq!(
        post_marimo(&m.http, &owner, "api/kernel/run", "s_busy01", &token, run).await,
        200
    );
    let started = std::time::Instant::now();
    read_until(&mut ws, "\"running\"", Duration::from_secs(30))
        .await
        .expect("the cell runs");
    ws.send(Message::Close(None)).await.unwrap();
    drop(ws);

    // Without the kernel's word it would be stopped within ~3 s (detached and idle alike).
    // It stays up while the cell runs.
    m.wait_status(&nb, "detached", Duration::from_secs(10))
        .await;
    while started.elapsed() < Duration::from_secs(RUN_S - 2) {
        let v = m
            .ok(
                &admin,
                "GET",
                &format!("/workloads/notebooks/{nb}"),
                None,
                200,
            )
            .await;
        let status = v["included"]["notebooks"][0]["status"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(
            matches!(status.as_str(), "running" | "idle" | "detached"),
            "stopped while its cell ran ({:?} in): {v}",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // The run ends; the detached timer starts again and the notebook is stopped.
    let v = m.wait_status(&nb, "stopped", Duration::from_secs(30)).await;
    assert!(
        started.elapsed() >= Duration::from_secs(RUN_S),
        "stopped before its cell finished: {:?}",
        started.elapsed()
    );
    let message = v["statusMessage"].as_str().unwrap_or_default();
    assert!(
        message.contains("no browser") || message.contains("without activity"),
        "{v}"
    );
    assert!(
        m.logs().contains("kernel busy: kept up"),
        "the control plane says why it kept it"
    );
}
