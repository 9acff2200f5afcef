//! Listing benchmark: `GET /workloads/notebooks?limit=100` when the caller can see 10,000
//! notebooks, through the real router and a real store (a SQLite file; also PostgreSQL when
//! `TEST_POSTGRES_URL` is set). Prints latency percentiles; not a pass/fail test.
//!
//!   cargo bench -p marina-control --bench list          (release)
//!   cargo test  -p marina-control --bench list          (debug build, quicker to compile)
//!
//! Two callers: an admin (sees everything: the organization index alone), and a member who
//! owns half of the notebooks and sees the other half through a team (the visibility
//! subquery). Pages: the first one, and one deep in the list via `pageToken`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use marina_config::{Id, Settings};
use marina_control::ControlPlane;
use marina_runtime::{Endpoint, Expected, Health, Runtime, RuntimeError, StartSpec};
use tower::ServiceExt;

const NOTEBOOKS: usize = 10_000;
const ROUNDS: usize = 200;

/// The benchmark never starts notebooks.
struct NoRuntime;

#[async_trait]
impl Runtime for NoRuntime {
    fn name(&self) -> &'static str {
        "none"
    }

    fn isolation(&self) -> &'static str {
        "none"
    }
    async fn prepare(&self) -> Result<(), RuntimeError> {
        Ok(())
    }
    async fn start(&self, _: &StartSpec) -> Result<Endpoint, RuntimeError> {
        Err(RuntimeError::StartFailed("benchmark runtime".into()))
    }
    async fn stop(&self, _: Id) -> Result<(), RuntimeError> {
        Ok(())
    }
    async fn health(&self, _: Id) -> Result<Health, RuntimeError> {
        Ok(Health::Missing)
    }
    async fn reconcile(&self, _: &[Expected]) -> Result<Vec<Id>, RuntimeError> {
        Ok(Vec::new())
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let sqlite = format!("sqlite:{}", dir.path().join("bench.db").display());
        run("sqlite", &sqlite, dir.path()).await;
        if let Ok(admin_url) = std::env::var("TEST_POSTGRES_URL") {
            sqlx::any::install_default_drivers();
            let name = format!("marina_bench_{}", Id::random().to_lowercase());
            let mut conn = <sqlx::AnyConnection as sqlx::Connection>::connect(&admin_url)
                .await
                .expect("connect TEST_POSTGRES_URL");
            sqlx::query(&format!("CREATE DATABASE {name}"))
                .execute(&mut conn)
                .await
                .expect("create bench database");
            let (base, _) = admin_url.rsplit_once('/').expect("database path");
            let pg_dir = tempfile::tempdir().expect("tempdir");
            run("postgres", &format!("{base}/{name}"), pg_dir.path()).await;
            let _ = sqlx::query(&format!("DROP DATABASE {name} WITH (FORCE)"))
                .execute(&mut conn)
                .await;
        } else {
            println!("(set TEST_POSTGRES_URL to benchmark PostgreSQL too)");
        }
    });
}

async fn run(store: &str, url: &str, data_dir: &std::path::Path) {
    let mut settings = Settings {
        data_dir: data_dir.to_owned(),
        ..Settings::default()
    };
    settings.database.url = url.to_owned();
    settings.control.rate_limit_per_second = 0;
    let cp = ControlPlane::open(&settings, Arc::new(NoRuntime))
        .await
        .expect("open");
    let admin = std::fs::read_to_string(&cp.bootstrap().expect("fresh").admin_key_file)
        .expect("admin key")
        .trim()
        .to_owned();
    let router = cp.router();
    let call = |method: &str, path: String, key: String, body: Option<String>| {
        let router = router.clone();
        let method = method.to_owned();
        async move {
            let mut b = Request::builder()
                .method(method.as_str())
                .uri(path)
                .header("authorization", format!("Bearer {key}"));
            let body = match body {
                Some(s) => {
                    b = b.header("content-type", "application/json");
                    Body::from(s)
                }
                None => Body::empty(),
            };
            let resp = router.oneshot(b.body(body).unwrap()).await.unwrap();
            let status = resp.status();
            let bytes = resp.into_body().collect().await.unwrap().to_bytes();
            (
                status,
                serde_json::from_slice::<serde_json::Value>(&bytes).unwrap_or_default(),
            )
        }
    };
    // Setup through the API: a config, a member, a team.
    let (_, cfg) = call(
        "POST",
        "/workloads/configs".into(),
        admin.clone(),
        Some(r#"{"name":"bench","config":{"sail":{}}}"#.into()),
    )
    .await;
    let cfg = cfg["id"].as_str().unwrap().to_owned();
    let (_, m) = call(
        "POST",
        "/iam/members".into(),
        admin.clone(),
        Some(r#"{"name":"m"}"#.into()),
    )
    .await;
    let member = m["id"].as_str().unwrap().to_owned();
    let (_, k) = call(
        "POST",
        format!("/iam/members/{member}/api-keys"),
        admin.clone(),
        Some(r#"{"name":"bench"}"#.into()),
    )
    .await;
    let member_key = k["secret"].as_str().unwrap().to_owned();
    let (_, t) = call(
        "POST",
        "/iam/teams".into(),
        admin.clone(),
        Some(r#"{"name":"t"}"#.into()),
    )
    .await;
    let team = t["id"].as_str().unwrap().to_owned();
    call(
        "POST",
        format!("/iam/teams/{team}/members"),
        admin.clone(),
        Some(format!(r#"{{"memberIds":["{member}"]}}"#)),
    )
    .await;
    let me = call("GET", "/iam/me".into(), admin.clone(), None).await.1["member"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let org = call("GET", "/iam/me".into(), admin.clone(), None).await.1["member"]
        ["organizationId"]
        .as_str()
        .unwrap()
        .to_owned();

    // Bulk load in one transaction: half owned by the member, half by the admin and shared
    // with the member's team.
    let pool = &cp.state().db.pool;
    let t0 = Instant::now();
    let mut tx = pool.begin().await.unwrap();
    let base = 1_700_000_000_000_i64;
    for i in 0..NOTEBOOKS {
        let id = Id::random().to_string();
        let owner = if i % 2 == 0 { &member } else { &me };
        let created = base + (i as i64 / 3) * 1000; // ties on purpose
        sqlx::query(
            "INSERT INTO notebooks (id, org_id, member_id, workload_config_id, name, status, idle_timeout_seconds, created_at, created_by, updated_at, updated_by)
             VALUES ($1, $2, $3, $4, $5, 'stopped', 3600, $6, $3, $6, $3)",
        )
        .bind(&id)
        .bind(&org)
        .bind(owner)
        .bind(&cfg)
        .bind(format!("notebook {i}"))
        .bind(created)
        .execute(&mut *tx)
        .await
        .unwrap();
        if i % 2 == 1 {
            sqlx::query(
                "INSERT INTO notebook_teams (notebook_id, team_id, created_at, created_by, updated_at, updated_by) VALUES ($1, $2, $3, $4, $3, $4)",
            )
            .bind(&id)
            .bind(&team)
            .bind(created)
            .bind(&me)
            .execute(&mut *tx)
            .await
            .unwrap();
        }
    }
    tx.commit().await.unwrap();
    if store == "postgres" {
        sqlx::query("ANALYZE").execute(pool).await.unwrap();
    }
    println!(
        "{store}: loaded {NOTEBOOKS} notebooks in {:?}",
        t0.elapsed()
    );

    for (who, key) in [("admin", &admin), ("member", &member_key)] {
        // A deep page token: the 50th page.
        let mut token = String::new();
        for _ in 0..49 {
            let (s, v) = call(
                "GET",
                format!("/workloads/notebooks?limit=100&pageToken={token}"),
                key.clone(),
                None,
            )
            .await;
            assert_eq!(s, StatusCode::OK);
            token = v["nextPageToken"].as_str().unwrap().to_owned();
        }
        for (page, path) in [
            ("first page", "/workloads/notebooks?limit=100".to_owned()),
            (
                "page 50",
                format!("/workloads/notebooks?limit=100&pageToken={token}"),
            ),
        ] {
            let mut times = Vec::with_capacity(ROUNDS);
            for _ in 0..ROUNDS {
                let t = Instant::now();
                let (s, v) = call("GET", path.clone(), key.clone(), None).await;
                times.push(t.elapsed());
                assert_eq!(s, StatusCode::OK);
                assert_eq!(v["total"].as_u64(), Some(NOTEBOOKS as u64));
                assert_eq!(v["items"].as_array().map(Vec::len), Some(100));
            }
            report(store, who, page, &mut times);
        }
    }
}

fn report(store: &str, who: &str, page: &str, times: &mut [Duration]) {
    times.sort();
    let pct = |p: f64| times[((times.len() as f64 * p) as usize).min(times.len() - 1)];
    let mean = times.iter().sum::<Duration>() / times.len() as u32;
    println!(
        "{store:8} {who:6} {page:10}: 100 of {NOTEBOOKS}  p50 {:>8.2?}  p90 {:>8.2?}  p99 {:>8.2?}  mean {:>8.2?}  ({} requests)",
        pct(0.50),
        pct(0.90),
        pct(0.99),
        mean,
        times.len()
    );
}
