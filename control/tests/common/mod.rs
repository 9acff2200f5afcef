//! Test harness: a control plane over a real SQLite file or a fresh PostgreSQL database, a
//! small runtime that really binds TCP ports (or fails on demand), and request helpers that
//! call the router in-process.
#![allow(dead_code)]

pub mod follower;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use marina_config::{Id, Settings};
use marina_control::ControlPlane;
use marina_runtime::{Endpoint, Expected, Health, Runtime, RuntimeError, StartSpec};
use serde_json::{json, Value};
use tower::ServiceExt;

/// Which store a test runs against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Store {
    Sqlite,
    Postgres,
}

/// Runs an async test body once per store: `both!(name);` expects `async fn name(Store)`.
#[macro_export]
macro_rules! both {
    ($name:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$name($crate::common::Store::Sqlite).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$name($crate::common::Store::Postgres).await
            }
        }
    };
}

// === TestRuntime ===

/// A runtime whose "notebook servers" are real TCP listeners on loopback answering HTTP 200.
#[derive(Default)]
pub struct TestRuntime {
    /// The next N start attempts fail.
    pub fail_starts: AtomicU32,
    /// Each start attempt takes this long (ms) before answering.
    pub start_delay_ms: AtomicU64,
    pub start_calls: AtomicU32,
    pub stop_calls: AtomicU32,
    running: Mutex<HashMap<Id, Server>>,
    /// Notebooks whose server "crashed": health reports Failed.
    crashed: Mutex<HashMap<Id, String>>,
}

struct Server {
    addr: String,
    token: String,
    task: tokio::task::JoinHandle<()>,
}

impl TestRuntime {
    pub fn is_running(&self, id: Id) -> bool {
        self.running.lock().unwrap().contains_key(&id)
    }

    pub fn addr(&self, id: Id) -> Option<String> {
        self.running
            .lock()
            .unwrap()
            .get(&id)
            .map(|s| s.addr.clone())
    }

    /// Simulates a crash: the listener goes away and health reports `Failed(reason)`.
    pub fn crash(&self, id: Id, reason: &str) {
        if let Some(s) = self.running.lock().unwrap().remove(&id) {
            s.task.abort();
        }
        self.crashed.lock().unwrap().insert(id, reason.to_owned());
    }

    /// Forgets a notebook without "crashing" it (as if the machine had been rebooted).
    pub fn vanish(&self, id: Id) {
        if let Some(s) = self.running.lock().unwrap().remove(&id) {
            s.task.abort();
        }
    }
}

#[async_trait]
impl Runtime for TestRuntime {
    fn name(&self) -> &'static str {
        "test"
    }

    fn isolation(&self) -> &'static str {
        "none"
    }

    async fn prepare(&self) -> Result<(), RuntimeError> {
        Ok(())
    }

    async fn start(&self, spec: &StartSpec) -> Result<Endpoint, RuntimeError> {
        self.start_calls.fetch_add(1, Ordering::SeqCst);
        let delay = self.start_delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        let fail = self
            .fail_starts
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if fail {
            return Err(RuntimeError::StartFailed(format!(
                "attempt {} of {}: sail exited with status 1",
                spec.attempt, spec.notebook_id
            )));
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| RuntimeError::Backend(e.to_string()))?;
        let addr = listener
            .local_addr()
            .map_err(|e| RuntimeError::Backend(e.to_string()))?
            .to_string();
        let task = tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            while let Ok((mut sock, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let _ = sock.read(&mut buf).await;
                    let _ = sock
                        .write_all(
                            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                        )
                        .await;
                });
            }
        });
        let token = Id::random().to_string();
        let mut running = self.running.lock().unwrap();
        if let Some(old) = running.insert(
            spec.notebook_id,
            Server {
                addr: addr.clone(),
                token: token.clone(),
                task,
            },
        ) {
            old.task.abort();
        }
        self.crashed.lock().unwrap().remove(&spec.notebook_id);
        Ok(Endpoint {
            upstream: addr,
            token,
        })
    }

    async fn stop(&self, id: Id) -> Result<(), RuntimeError> {
        self.stop_calls.fetch_add(1, Ordering::SeqCst);
        if let Some(s) = self.running.lock().unwrap().remove(&id) {
            s.task.abort();
        }
        Ok(())
    }

    async fn health(&self, id: Id) -> Result<Health, RuntimeError> {
        if let Some(reason) = self.crashed.lock().unwrap().get(&id) {
            return Ok(Health::Failed(reason.clone()));
        }
        let addr = self.addr(id);
        match addr {
            // Really connect: the port must answer.
            Some(addr) => match tokio::net::TcpStream::connect(&addr).await {
                Ok(_) => Ok(Health::Healthy),
                Err(e) => Ok(Health::Failed(format!("connect {addr}: {e}"))),
            },
            None => Ok(Health::Missing),
        }
    }

    async fn reconcile(&self, expected: &[Expected]) -> Result<Vec<Id>, RuntimeError> {
        let mut running = self.running.lock().unwrap();
        let keep: Vec<Id> = expected.iter().map(|e| e.notebook_id).collect();
        running.retain(|id, s| {
            let k = keep.contains(id);
            if !k {
                s.task.abort();
            }
            k
        });
        Ok(expected
            .iter()
            .filter(|e| {
                running.get(&e.notebook_id).is_some_and(|s| {
                    e.endpoint
                        .as_ref()
                        .is_none_or(|ep| ep.upstream == s.addr && ep.token == s.token)
                })
            })
            .map(|e| e.notebook_id)
            .collect())
    }
}

// === PostgreSQL ===

/// A database created for one test and dropped after it.
#[derive(Debug)]
pub struct PgDatabase {
    pub url: String,
    admin_url: String,
    name: String,
}

impl PgDatabase {
    pub async fn create() -> PgDatabase {
        let admin_url = std::env::var("TEST_POSTGRES_URL").unwrap_or_else(|_| {
            panic!(
                "TEST_POSTGRES_URL is not set: the PostgreSQL variants of the control-plane tests \
                 need a server. Run scripts/test.sh (it starts one), or set TEST_POSTGRES_URL=postgres://…"
            )
        });
        sqlx::any::install_default_drivers();
        let name = format!("marina_test_{}", Id::random().to_lowercase());
        let mut conn = <sqlx::AnyConnection as sqlx::Connection>::connect(&admin_url)
            .await
            .unwrap_or_else(|e| panic!("connecting to TEST_POSTGRES_URL: {e}"));
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .expect("create test database");
        let (base, _) = admin_url
            .rsplit_once('/')
            .expect("TEST_POSTGRES_URL has a database path");
        PgDatabase {
            url: format!("{base}/{name}"),
            admin_url,
            name,
        }
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        // Drop runs outside async context guarantees: use a private runtime on a thread.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                if let Ok(mut conn) =
                    <sqlx::AnyConnection as sqlx::Connection>::connect(&admin_url).await
                {
                    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .execute(&mut conn)
                        .await;
                }
            })
        })
        .join();
    }
}

// === Harness ===

pub struct Harness {
    pub cp: ControlPlane,
    pub router: axum::Router,
    pub runtime: Arc<TestRuntime>,
    pub settings: Settings,
    /// The bootstrap admin's key.
    pub admin: String,
    pub background: Option<marina_control::BackgroundGuard>,
    pub dir: tempfile::TempDir,
    pub pg: Option<PgDatabase>,
}

pub fn fast_settings(dir: &std::path::Path) -> Settings {
    let mut s = Settings {
        data_dir: dir.to_owned(),
        ..Settings::default()
    };
    s.control.rate_limit_per_second = 0;
    s.control.start_timeout_seconds = 10;
    s.control.monitor_interval_ms = 100;
    s.proxy.activity_interval_ms = 200;
    s
}

impl Harness {
    pub async fn new(store: Store) -> Harness {
        Self::with(store, |_| {}).await
    }

    /// A harness with settings changed by `tweak` (before opening).
    pub async fn with(store: Store, tweak: impl FnOnce(&mut Settings)) -> Harness {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut settings = fast_settings(dir.path());
        let pg = match store {
            Store::Sqlite => {
                settings.database.url =
                    format!("sqlite:{}", dir.path().join("control.db").display());
                None
            }
            Store::Postgres => {
                let db = PgDatabase::create().await;
                settings.database.url = db.url.clone();
                Some(db)
            }
        };
        tweak(&mut settings);
        let runtime = Arc::new(TestRuntime::default());
        let cp = ControlPlane::open(&settings, runtime.clone())
            .await
            .expect("open control plane");
        let boot = cp.bootstrap().expect("empty database bootstraps").clone();
        let admin = std::fs::read_to_string(&boot.admin_key_file)
            .expect("admin key file")
            .trim()
            .to_owned();
        let router = cp.router();
        Harness {
            cp,
            router,
            runtime,
            settings,
            admin,
            background: None,
            dir,
            pg,
        }
    }

    /// A second control-plane replica `cp` over `first`'s database, data directory and runtime
    /// (its own router; the first keeps the temporary directory and database alive).
    pub fn over(first: &Harness, cp: ControlPlane) -> Harness {
        Harness {
            router: cp.router(),
            cp,
            runtime: first.runtime.clone(),
            settings: first.settings.clone(),
            admin: first.admin.clone(),
            background: None,
            dir: tempfile::tempdir().expect("tempdir"),
            pg: None,
        }
    }

    /// Starts the monitor (and the start-up reconcile).
    pub async fn start_monitor(&mut self) {
        self.background = Some(self.cp.start_background().await);
    }

    /// Simulates a control-plane restart: a new `ControlPlane` over the same database and
    /// runtime, then its start-up reconcile and monitor.
    pub async fn restart(&mut self) {
        if let Some(mut bg) = self.background.take() {
            bg.stop().await;
        }
        let cp = ControlPlane::open(&self.settings, self.runtime.clone())
            .await
            .expect("reopen control plane");
        assert!(
            cp.bootstrap().is_none(),
            "a second start must not bootstrap again"
        );
        self.router = cp.router();
        self.cp = cp;
        self.start_monitor().await;
    }

    pub async fn raw(&self, req: Request<Body>) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
        let resp = self.router.clone().oneshot(req).await.expect("infallible");
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes()
            .to_vec();
        (status, headers, body)
    }

    /// A JSON request with an optional bearer key; returns the status and the JSON body
    /// (`Null` when empty).
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        key: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut b = Request::builder().method(method).uri(path);
        if let Some(k) = key {
            b = b.header("authorization", format!("Bearer {k}"));
        }
        let req = match body {
            Some(v) => b
                .header("content-type", "application/json")
                .body(Body::from(v.to_string()))
                .unwrap(),
            None => b.body(Body::empty()).unwrap(),
        };
        let (status, _, bytes) = self.raw(req).await;
        let v = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        (status, v)
    }

    pub async fn get(&self, path: &str, key: &str) -> (StatusCode, Value) {
        self.call(Method::GET, path, Some(key), None).await
    }
    pub async fn post(&self, path: &str, key: &str, body: Value) -> (StatusCode, Value) {
        self.call(Method::POST, path, Some(key), Some(body)).await
    }
    pub async fn post_empty(&self, path: &str, key: &str) -> (StatusCode, Value) {
        self.call(Method::POST, path, Some(key), None).await
    }
    pub async fn patch(&self, path: &str, key: &str, body: Value) -> (StatusCode, Value) {
        self.call(Method::PATCH, path, Some(key), Some(body)).await
    }
    pub async fn delete(&self, path: &str, key: &str) -> (StatusCode, Value) {
        self.call(Method::DELETE, path, Some(key), None).await
    }

    pub fn internal_token(&self) -> String {
        std::fs::read_to_string(self.settings.data_dir.join("internal-token"))
            .expect("internal token file")
            .trim()
            .to_owned()
    }

    /// Creates a workload config as `key` (an admin); returns its id.
    pub async fn config(&self, key: &str, max_retries: u32) -> String {
        let (s, v) = self
            .post(
                "/workloads/configs",
                key,
                json!({"name": "Production Cluster", "config": {"sail": {"executionMode": "local", "maxRetries": max_retries}}}),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        v["id"].as_str().unwrap().to_owned()
    }

    /// Creates a notebook as `key`; returns its id.
    pub async fn notebook(&self, key: &str, config: &str, teams: &[&str]) -> String {
        let (s, v) = self
            .post(
                "/workloads/notebooks",
                key,
                json!({"workloadConfigId": config, "name": "Daily Sales Analysis", "teamIds": teams}),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        v["item"]["notebookId"].as_str().unwrap().to_owned()
    }

    /// Creates a member (as admin `key`) with role and an API key; returns (member id, key).
    pub async fn member(&self, key: &str, role: &str) -> (String, String) {
        let (s, v) = self
            .post(
                "/iam/members",
                key,
                json!({"name": "Ada", "email": "ada@example.com", "role": role}),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        let id = v["id"].as_str().unwrap().to_owned();
        let (s, k) = self
            .post(
                &format!("/iam/members/{id}/api-keys"),
                key,
                json!({"name": "laptop"}),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{k}");
        (id, k["secret"].as_str().unwrap().to_owned())
    }

    /// Creates a team with `members`; returns its id.
    pub async fn team(&self, key: &str, members: &[&str]) -> String {
        let (s, v) = self
            .post("/iam/teams", key, json!({"name": "Analytics"}))
            .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        let id = v["id"].as_str().unwrap().to_owned();
        if !members.is_empty() {
            let (s, v) = self
                .post(
                    &format!("/iam/teams/{id}/members"),
                    key,
                    json!({"memberIds": members}),
                )
                .await;
            assert_eq!(s, StatusCode::OK, "{v}");
        }
        id
    }

    pub async fn status(&self, key: &str, nb: &str) -> String {
        let (s, v) = self.get(&format!("/workloads/notebooks/{nb}"), key).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        v["included"]["notebooks"][0]["status"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    pub async fn notebook_json(&self, key: &str, nb: &str) -> Value {
        let (s, v) = self.get(&format!("/workloads/notebooks/{nb}"), key).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        v["included"]["notebooks"][0].clone()
    }

    /// Polls until the notebook's status is `want` (or panics after `secs`).
    pub async fn wait_status(&self, key: &str, nb: &str, want: &str, secs: u64) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let v = self.notebook_json(key, nb).await;
            if v["status"] == want {
                return v;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("notebook {nb} never became {want}; last: {v}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Polls until the notebook is up: running, idle or detached (the monitor may move a
    /// fresh notebook nobody is connected to to detached at once).
    pub async fn wait_up(&self, key: &str, nb: &str, secs: u64) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let v = self.notebook_json(key, nb).await;
            if ["running", "idle", "detached"].contains(&v["status"].as_str().unwrap_or("")) {
                return v;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("notebook {nb} never came up; last: {v}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Starts a notebook and waits until it is up.
    pub async fn run(&self, key: &str, nb: &str) {
        let (s, v) = self
            .post_empty(&format!("/workloads/notebooks/{nb}/start"), key)
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        self.wait_up(key, nb, 10).await;
    }

    /// Reports one edge's activity.
    /// Posts an activity batch as edge `edge`. Entries without `memberId` are one viewer's
    /// (`M000000000`), for tests about notebooks rather than people.
    pub async fn activity(&self, edge: &str, mut entries: Value) -> StatusCode {
        for e in entries.as_array_mut().into_iter().flatten() {
            if e.get("memberId").is_none() {
                e["memberId"] = json!("M000000000");
                e["mode"] = json!("view");
            }
        }
        let token = self.internal_token();
        let (s, v) = self
            .call(
                Method::POST,
                "/internal/v1/activity",
                Some(&token),
                Some(json!({"edgeId": edge, "sentAtMs": now_ms(), "activity": entries})),
            )
            .await;
        assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
        s
    }

    pub async fn routes(&self, after: Option<u64>, wait: u64) -> Value {
        let token = self.internal_token();
        let path = match after {
            Some(a) => format!("/internal/v1/routes?after={a}&waitSeconds={wait}"),
            None => "/internal/v1/routes".to_owned(),
        };
        let (s, v) = self.call(Method::GET, &path, Some(&token), None).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        v
    }

    /// Runs raw SQL against the store (to stage crash scenarios).
    pub async fn sql(&self, sql: &str) {
        sqlx::query(sql)
            .execute(&self.cp.state().db.pool)
            .await
            .expect("staging SQL");
    }
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// The error code of an error body.
pub fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("<no code>")
}

/// The field an error body names.
pub fn field(v: &Value) -> &str {
    v["error"]["field"].as_str().unwrap_or("<no field>")
}
