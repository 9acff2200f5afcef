//! The fake control plane (`marina_testkit::control::FakeControl`) against the real one: each
//! request the edge sends (the routes feed, with and without `after`/`waitSeconds`, an activity
//! batch, token redemption), and the refusals the fake also gives (no or a wrong credential,
//! an unknown path), sent to both over HTTP; the answers must agree in status, content type and
//! JSON shape (the same keys, with values of the same JSON types), so the fake the edge's tests
//! rely on cannot drift from the real internal router.
//!
//! The real control plane runs on SQLite in a temporary directory, over a runtime that only
//! hands out an address (nothing here connects to a notebook).

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use marina_config::wire::{
    AccessMode, ActivityBatch, MemberActivity, RedeemRequest, RoutesSnapshot,
};
use marina_config::{Id, Settings};
use marina_control::ControlPlane;
use marina_runtime::{Endpoint, Expected, Health, Runtime, RuntimeError, StartSpec};
use marina_testkit::control::{FakeControl, INTERNAL_TOKEN};
use serde_json::{json, Value};

/// A runtime whose notebooks "start" at once on an address nothing listens on.
struct AddressOnly;

#[async_trait]
impl Runtime for AddressOnly {
    fn name(&self) -> &'static str {
        "test"
    }
    fn isolation(&self) -> &'static str {
        "none"
    }
    async fn prepare(&self) -> Result<(), RuntimeError> {
        Ok(())
    }
    async fn start(&self, _spec: &StartSpec) -> Result<Endpoint, RuntimeError> {
        Ok(Endpoint {
            upstream: "127.0.0.1:9".into(),
            token: "marimo-token".into(),
        })
    }
    async fn stop(&self, _id: Id) -> Result<(), RuntimeError> {
        Ok(())
    }
    async fn health(&self, _id: Id) -> Result<Health, RuntimeError> {
        Ok(Health::Healthy)
    }
    async fn reconcile(&self, expected: &[Expected]) -> Result<Vec<Id>, RuntimeError> {
        Ok(expected.iter().map(|e| e.notebook_id).collect())
    }
}

/// The real control plane, served on a loopback port.
struct Real {
    url: String,
    admin_key: String,
    _cp: ControlPlane,
    _dir: tempfile::TempDir,
}

async fn real() -> Real {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Settings {
        data_dir: dir.path().to_owned(),
        ..Settings::default()
    };
    s.database.url = format!("sqlite:{}", dir.path().join("control.db").display());
    s.control.rate_limit_per_second = 0;
    s.internal.token = INTERNAL_TOKEN.into();
    let cp = ControlPlane::open(&s, Arc::new(AddressOnly))
        .await
        .expect("open control plane");
    let boot = cp.bootstrap().expect("an empty database bootstraps");
    let admin_key = std::fs::read_to_string(&boot.admin_key_file)
        .unwrap()
        .trim()
        .to_owned();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let router = cp.router();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    Real {
        url,
        admin_key,
        _cp: cp,
        _dir: dir,
    }
}

/// An answer, as far as the contract goes.
#[derive(Debug)]
struct Answer {
    status: u16,
    content_type: Option<String>,
    body: Option<Value>,
    took: Duration,
}

async fn send(
    http: &reqwest::Client,
    base: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> Answer {
    let mut req = http.request(method.parse().unwrap(), format!("{base}{path}"));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        // As the edge sends a body: JSON bytes with `content-type: application/json`.
        req = req
            .header("content-type", "application/json")
            .body(serde_json::to_vec(b).unwrap());
    }
    let started = Instant::now();
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    let content_type = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned());
    let bytes = resp.bytes().await.unwrap();
    let body = (!bytes.is_empty()).then(|| {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| panic!("{path}: not JSON: {}", String::from_utf8_lossy(&bytes)))
    });
    Answer {
        status,
        content_type,
        body,
        took: started.elapsed(),
    }
}

/// A value's JSON shape: objects keep their keys (each with its value's shape), arrays the
/// shape of their first element, scalars become their type's name.
fn shape(v: &Value) -> Value {
    match v {
        Value::Null => json!("null"),
        Value::Bool(_) => json!("boolean"),
        Value::Number(_) => json!("number"),
        Value::String(_) => json!("string"),
        Value::Array(items) => Value::Array(items.first().map(shape).into_iter().collect()),
        Value::Object(map) => {
            Value::Object(map.iter().map(|(k, v)| (k.clone(), shape(v))).collect())
        }
    }
}

/// Sends one request to both and checks that the answers agree; returns (real, fake).
#[allow(clippy::too_many_arguments)]
async fn both(
    http: &reqwest::Client,
    real: &Real,
    fake: &FakeControl,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
    want: u16,
) -> (Answer, Answer) {
    let r = send(http, &real.url, method, path, token, body).await;
    let f = send(http, &fake.url, method, path, token, body).await;
    let what = format!("{method} {path}");
    assert_eq!(r.status, want, "{what}: the real one: {r:?}");
    assert_eq!(
        f.status, r.status,
        "{what}: status (fake {f:?}, real {r:?})"
    );
    assert_eq!(
        f.content_type, r.content_type,
        "{what}: content type (fake {f:?}, real {r:?})"
    );
    assert_eq!(
        f.body.as_ref().map(shape),
        r.body.as_ref().map(shape),
        "{what}: JSON shape (fake {f:?}, real {r:?})"
    );
    if let (Some(fb), Some(rb)) = (&f.body, &r.body) {
        assert_eq!(
            fb["error"]["code"], rb["error"]["code"],
            "{what}: error code"
        );
    }
    (r, f)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fake_control_plane_answers_as_the_real_one_does() {
    let real = real().await;
    let fake = FakeControl::start().await;
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let t = Some(INTERNAL_TOKEN);

    // A notebook up, so the real routes snapshot has a route; the fake serves the same table.
    let admin = Some(real.admin_key.as_str());
    let cfg = send(
        &http,
        &real.url,
        "POST",
        "/workloads/configs",
        admin,
        Some(&json!({"name": "Local", "config": {"sail": {}}})),
    )
    .await;
    assert_eq!(cfg.status, 201, "{cfg:?}");
    let cfg_id = cfg.body.unwrap()["id"].as_str().unwrap().to_owned();
    let nb = send(
        &http,
        &real.url,
        "POST",
        "/workloads/notebooks",
        admin,
        Some(&json!({"workloadConfigId": cfg_id, "name": "Contract"})),
    )
    .await;
    assert_eq!(nb.status, 201, "{nb:?}");
    let nb_id = nb.body.unwrap()["item"]["notebookId"]
        .as_str()
        .unwrap()
        .to_owned();
    let start = format!("/workloads/notebooks/{nb_id}/start");
    let started = send(&http, &real.url, "POST", &start, admin, None).await;
    assert_eq!(started.status, 200, "{started:?}");
    let deadline = Instant::now() + Duration::from_secs(20);
    let snap: RoutesSnapshot = loop {
        let a = send(&http, &real.url, "GET", "/internal/v1/routes", t, None).await;
        let snap: RoutesSnapshot = serde_json::from_value(a.body.unwrap()).unwrap();
        if !snap.routes.is_empty() {
            break snap;
        }
        assert!(Instant::now() < deadline, "the notebook never got a route");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    *fake.routes.lock().unwrap() = snap.clone();
    let route = snap.routes[0].clone();
    let v = snap.version;

    // The routes feed: the first request (no `after`), a held one, one that is behind.
    let (r, f) = both(
        &http,
        &real,
        &fake,
        "GET",
        "/internal/v1/routes",
        t,
        None,
        200,
    )
    .await;
    assert_eq!(r.body, f.body, "the same table, the same answer");
    let held = format!("/internal/v1/routes?after={v}&waitSeconds=1");
    let (r, f) = both(&http, &real, &fake, "GET", &held, t, None, 200).await;
    for (who, a) in [("real", &r), ("fake", &f)] {
        assert!(a.took >= Duration::from_millis(900), "{who} held: {a:?}");
    }
    // A version the feed cannot resume from: both answer a snapshot at once. (Behind by a few
    // versions, the real one answers the changes since, which the fake, keeping no change
    // log, never does; the real feed's changes are tested in control/tests/feed.rs.)
    let behind = format!("/internal/v1/routes?after={}&waitSeconds=25", v + 1000);
    let (r, f) = both(&http, &real, &fake, "GET", &behind, t, None, 200).await;
    for (who, a) in [("real", &r), ("fake", &f)] {
        assert!(
            a.took < Duration::from_secs(5),
            "{who} answered at once: {a:?}"
        );
    }

    // An activity batch, as the edge's reporter sends one.
    let batch = ActivityBatch {
        edge_id: "edge-contract".into(),
        sent_at_ms: 1,
        activity: vec![MemberActivity {
            notebook_id: route.notebook_id,
            session_id: route.session_id,
            member_id: route.owner_id,
            mode: AccessMode::Edit,
            last_active_ms: Some(1),
            open_sockets: 1,
            open_since_ms: Some(1),
        }],
    };
    let batch = serde_json::to_value(&batch).unwrap();
    both(
        &http,
        &real,
        &fake,
        "POST",
        "/internal/v1/activity",
        t,
        Some(&batch),
        204,
    )
    .await;
    assert_eq!(*fake.activity.lock().unwrap(), vec![batch]);

    // Redemption: once, then a replay.
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 300;
    let redeem = serde_json::to_value(RedeemRequest {
        jti: "jti-contract".into(),
        exp,
    })
    .unwrap();
    let path = "/internal/v1/redeem";
    both(&http, &real, &fake, "POST", path, t, Some(&redeem), 200).await;
    both(&http, &real, &fake, "POST", path, t, Some(&redeem), 409).await;

    // What the fake refuses, it refuses as the real one does.
    let routes = "/internal/v1/routes";
    both(&http, &real, &fake, "GET", routes, None, None, 401).await;
    both(&http, &real, &fake, "GET", routes, admin, None, 401).await;
    both(&http, &real, &fake, "POST", path, None, Some(&redeem), 401).await;
    both(
        &http,
        &real,
        &fake,
        "GET",
        "/internal/v1/nothing",
        t,
        None,
        404,
    )
    .await;
}
