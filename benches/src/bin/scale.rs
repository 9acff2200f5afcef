//! The scale benchmark (issue #13, `scripts/bench-scale.sh`): a control plane on PostgreSQL with
//! many running notebooks, members and teams, and two real edges (`marina proxy`) following its
//! routes feed. Measures route propagation, feed bytes per change at two sizes, the activity
//! batch, the notebook list and memory; writes `scale.json` and `report.md`.
//!
//! What is not real: every notebook's upstream is one stand-in HTTP server answering 200
//! ([`StandInRuntime`], benchmark-only, in the `control-child` subcommand: the control plane
//! runs in a child process of this binary so its resident memory is its own). The control
//! plane, PostgreSQL, the feed and the edges are the real ones.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use futures_util::stream::{self, StreamExt};
use marina_bench::loadtest::api::Api;
use marina_bench::loadtest::deploy::{free_port, rss_kib, Postgres};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Runs the benchmark.
    Run(RunArgs),
    /// The control plane with the stand-in runtime (started by `run`; settings from MARINA_*).
    ControlChild,
}

#[derive(clap::Args, Clone)]
struct RunArgs {
    #[arg(long, default_value = "target/release/marina")]
    marina: PathBuf,
    #[arg(long, default_value = "target/bench-scale")]
    out: PathBuf,
    #[arg(long, default_value_t = 10_000)]
    notebooks: usize,
    #[arg(long, default_value_t = 100_000)]
    members: usize,
    #[arg(long, default_value_t = 2_000)]
    teams: usize,
    /// 1,000 notebooks, 10,000 members, 200 teams, fewer samples.
    #[arg(long)]
    quick: bool,
    /// Measured changes per kind (start, stop, unshare).
    #[arg(long)]
    samples: Option<usize>,
    /// Concurrent API requests while seeding.
    #[arg(long, default_value_t = 48)]
    concurrency: usize,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio");
    let r = match cli.cmd {
        Cmd::ControlChild => rt.block_on(control_child()),
        Cmd::Run(a) => rt.block_on(run(a)),
    };
    match r {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("scale: FAILED: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The control plane's child process and its stand-in runtime.

/// BENCHMARK-ONLY runtime: provisions nothing. Every start returns the same [`Endpoint`], the
/// one stand-in HTTP server of the scale benchmark (which answers 200 to anything) and a fixed
/// token; stop, health and reconcile trivially succeed. It exists so that one machine can hold
/// 10,000 "running" notebooks; it is never a default and the `marina` binary cannot select it.
///
/// [`Endpoint`]: marina_runtime::Endpoint
struct StandInRuntime {
    upstream: String,
}

#[async_trait::async_trait]
impl marina_runtime::Runtime for StandInRuntime {
    fn name(&self) -> &'static str {
        "bench-stand-in"
    }
    fn isolation(&self) -> &'static str {
        "none"
    }
    async fn prepare(&self) -> Result<(), marina_runtime::RuntimeError> {
        Ok(())
    }
    async fn start(
        &self,
        _spec: &marina_runtime::StartSpec,
    ) -> Result<marina_runtime::Endpoint, marina_runtime::RuntimeError> {
        Ok(marina_runtime::Endpoint {
            upstream: self.upstream.clone(),
            token: "bench-stand-in-token".into(),
        })
    }
    async fn stop(&self, _id: marina_config::Id) -> Result<(), marina_runtime::RuntimeError> {
        Ok(())
    }
    async fn health(
        &self,
        _id: marina_config::Id,
    ) -> Result<marina_runtime::Health, marina_runtime::RuntimeError> {
        Ok(marina_runtime::Health::Healthy)
    }
    async fn reconcile(
        &self,
        expected: &[marina_runtime::Expected],
    ) -> Result<Vec<marina_config::Id>, marina_runtime::RuntimeError> {
        Ok(expected.iter().map(|e| e.notebook_id).collect())
    }
}

async fn control_child() -> Result<()> {
    let upstream = std::env::var("SCALE_STANDIN_UPSTREAM").context("SCALE_STANDIN_UPSTREAM")?;
    let settings = marina_config::settings::Settings::load(None, figment::Figment::new())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    std::fs::create_dir_all(&settings.data_dir)?;
    let runtime: Arc<dyn marina_runtime::Runtime> = Arc::new(StandInRuntime { upstream });
    let listener = tokio::net::TcpListener::bind(settings.control.listen).await?;
    let control = marina_control::ControlPlane::open(&settings, runtime).await?;
    eprintln!(
        "scale control-child: listening on {}",
        settings.control.listen
    );
    let shutdown = async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).unwrap();
        term.recv().await;
    };
    control.serve(listener, shutdown).await?;
    Ok(())
}

/// The stand-in for every notebook's Marimo: HTTP/1.1 keep-alive, 200 "ok" to anything.
async fn stand_in_upstream() -> Result<String> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?.to_string();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut buf = Vec::with_capacity(4096);
                let mut tmp = [0u8; 8192];
                loop {
                    // One request head (and a Content-Length body, skipped).
                    let end = loop {
                        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break p + 4;
                        }
                        match s.read(&mut tmp).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&tmp[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    while buf.len() < end + len {
                        match s.read(&mut tmp).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&tmp[..n]),
                        }
                    }
                    buf.drain(..end + len);
                    let resp = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok";
                    if s.write_all(resp).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    Ok(addr)
}

// ---------------------------------------------------------------------------------------------
// Processes.

struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(
        name: &str,
        bin: &PathBuf,
        args: &[String],
        env: &[(String, String)],
        dir: &std::path::Path,
    ) -> Result<Proc> {
        let log = dir.join(format!("{name}.log"));
        let f = std::fs::File::create(&log)?;
        let child = Command::new(bin)
            .args(args)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("MARINA_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::from(f.try_clone()?))
            .stderr(Stdio::from(f))
            .spawn()
            .with_context(|| format!("starting {name} ({})", bin.display()))?;
        Ok(Proc {
            name: name.into(),
            child,
            log,
        })
    }
    fn rss_kib(&self) -> Result<u64> {
        rss_kib(self.child.id()).with_context(|| format!("no VmRSS for {}", self.name))
    }
    fn check_alive(&mut self) -> Result<()> {
        if let Ok(Some(st)) = self.child.try_wait() {
            let s = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = s.lines().rev().take(30).collect();
            bail!(
                "{} exited ({st}):\n{}",
                self.name,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        Ok(())
    }
    fn terminate(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct EdgeP {
    proc: Proc,
    url: String,
    admin: String,
}

fn random_hex(n: usize) -> String {
    use rand::RngCore;
    let mut b = vec![0u8; n];
    rand::thread_rng().fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn env(pairs: &[(&str, String)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Statistics.

#[derive(Default, Clone)]
struct Samples(Vec<f64>);

impl Samples {
    fn q(&self, q: f64) -> f64 {
        let mut v = self.0.clone();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        if v.is_empty() {
            return f64::NAN;
        }
        let i = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
        v[i]
    }
    fn summary(&self) -> Value {
        json!({"n": self.0.len(), "p50": round(self.q(0.5)), "p99": round(self.q(0.99)),
               "max": round(self.q(1.0))})
    }
}

fn round(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

// ---------------------------------------------------------------------------------------------
// The run.

struct World {
    api: Api,
    admin: String,
    internal_token: String,
    control_url: String,
    edges: Vec<(String, String)>,
    http: reqwest::Client,
    notebooks: Vec<String>,
    teams: Vec<String>,
    members: Vec<String>,
    per_team: usize,
    team_of: Vec<Vec<usize>>,
}

fn find_str(v: &Value, key: &str) -> Option<String> {
    match v {
        Value::Object(m) => {
            if let Some(Value::String(s)) = m.get(key) {
                return Some(s.clone());
            }
            m.values().find_map(|x| find_str(x, key))
        }
        Value::Array(a) => a.iter().find_map(|x| find_str(x, key)),
        _ => None,
    }
}

async fn run(mut a: RunArgs) -> Result<()> {
    if a.quick {
        a.notebooks = 1_000;
        a.members = 10_000;
        a.teams = 200;
    }
    let samples = a.samples.unwrap_or(if a.quick { 20 } else { 100 });
    if a.teams < 3 || a.members < a.teams * 2 || a.notebooks < 100 {
        bail!("need at least 3 teams, 2 members per team and 100 notebooks");
    }
    let t_all = Instant::now();
    std::fs::create_dir_all(&a.out)?;
    let dir = tempfile::Builder::new().prefix("marina-scale-").tempdir()?;
    let marina = std::fs::canonicalize(&a.marina)
        .with_context(|| format!("{} (build it: cargo build --release)", a.marina.display()))?;
    let me = std::env::current_exe()?;

    // PostgreSQL, the stand-in upstream, the control plane, two edges.
    eprintln!("scale: PostgreSQL…");
    let pg = Postgres::start(&dir.path().join("pg"))?;
    let upstream = stand_in_upstream().await?;
    let internal_token = random_hex(32);
    let cookie_key = random_hex(32);
    let edge_ports: Vec<(u16, u16)> = (0..2)
        .map(|_| Ok((free_port()?, free_port()?)))
        .collect::<Result<_>>()?;
    let public_url = format!("http://127.0.0.1:{}", edge_ports[0].0);
    let control_port = free_port()?;
    let control_url = format!("http://127.0.0.1:{control_port}");
    let data_dir = dir.path().join("control");
    std::fs::create_dir_all(&data_dir)?;
    let mut control = Proc::spawn(
        "control",
        &me,
        &["control-child".into()],
        &env(&[
            ("SCALE_STANDIN_UPSTREAM", upstream.clone()),
            ("MARINA_DATA_DIR", data_dir.display().to_string()),
            (
                "MARINA_CONTROL__LISTEN",
                format!("127.0.0.1:{control_port}"),
            ),
            ("MARINA_DATABASE__URL", pg.url()),
            ("MARINA_DATABASE__MAX_CONNECTIONS", "32".into()),
            ("MARINA_INTERNAL__TOKEN", internal_token.clone()),
            ("MARINA_PROXY__PUBLIC_URL", public_url.clone()),
            ("MARINA_CONTROL__PUBLIC_URL", control_url.clone()),
            ("MARINA_CONTROL__RATE_LIMIT_PER_SECOND", "0".into()),
            ("MARINA_CONTROL__DETACHED_TIMEOUT_SECONDS", "86400".into()),
            ("MARINA_CONTROL__IDLE_AFTER_SECONDS", "86400".into()),
        ]),
        dir.path(),
    )?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .redirect(reqwest::redirect::Policy::none())
        .pool_max_idle_per_host(256)
        .build()?;
    let key_file = data_dir.join("admin-api-key");
    let pub_key = data_dir.join("keys").join("url-signing.pub.pem");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        control.check_alive()?;
        let ready = http
            .get(format!("{control_url}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if ready && key_file.exists() && pub_key.exists() {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "the control plane is not ready within 120 s (log: {})",
                control.log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let admin = std::fs::read_to_string(&key_file)?.trim().to_owned();
    let mut edges = Vec::new();
    for (i, (port, adm)) in edge_ports.iter().enumerate() {
        let edir = dir.path().join(format!("edge-{i}"));
        std::fs::create_dir_all(&edir)?;
        let proc = Proc::spawn(
            &format!("edge-{i}"),
            &marina,
            &[
                "proxy".into(),
                "--data-dir".into(),
                edir.display().to_string(),
                "--listen".into(),
                format!("127.0.0.1:{port}"),
                "--admin-listen".into(),
                format!("127.0.0.1:{adm}"),
            ],
            &env(&[
                ("MARINA_INTERNAL__TOKEN", internal_token.clone()),
                ("MARINA_PROXY__PUBLIC_URL", public_url.clone()),
                ("MARINA_PROXY__CONTROL_URL", control_url.clone()),
                ("MARINA_PROXY__EDGE_ID", format!("edge-{i}")),
                ("MARINA_PROXY__REPLAY_STORE", "control".into()),
                (
                    "MARINA_PROXY__FRAME_ANCESTORS",
                    format!("[\"{control_url}\"]"),
                ),
                ("MARINA_PROXY__COOKIE__KEYS", format!("[\"{cookie_key}\"]")),
                (
                    "MARINA_TOKENS__PUBLIC_KEYS",
                    format!("[{{kid=\"k1\", file=\"{}\"}}]", pub_key.display()),
                ),
            ]),
            dir.path(),
        )?;
        edges.push(EdgeP {
            proc,
            url: format!("http://127.0.0.1:{port}"),
            admin: format!("http://127.0.0.1:{adm}"),
        });
    }
    for e in &mut edges {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            e.proc.check_alive()?;
            if http
                .get(format!("{}/readyz", e.admin))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "{} not ready within 60 s (log: {})",
                    e.proc.name,
                    e.proc.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    let api = Api::new(&control_url);
    let mut w = World {
        api,
        admin,
        internal_token: internal_token.clone(),
        control_url: control_url.clone(),
        edges: edges
            .iter()
            .map(|e| (e.url.clone(), e.admin.clone()))
            .collect(),
        http: http.clone(),
        notebooks: vec![],
        teams: vec![],
        members: vec![],
        per_team: a.members / a.teams,
        team_of: vec![],
    };

    // Seeding, through the API.
    let t_seed = Instant::now();
    seed(&mut w, &a).await?;
    let seed_s = t_seed.elapsed().as_secs_f64();
    let edge_rss0: Vec<u64> = edges
        .iter()
        .map(|e| e.proc.rss_kib())
        .collect::<Result<_>>()?;

    // The feed followers (the standalone client) and the edges' counters.
    let follower = Follower::start(&control_url, &internal_token).await?;

    // Start the first tenth; measure feed bytes there; start the rest; measure again.
    let small = (a.notebooks / 10).max(50);
    let t_start = Instant::now();
    start_range(&w, 0, small, a.concurrency).await?;
    wait_routes(&w, small, &mut edges).await?;
    let feed_small = feed_cost(&w, &follower, &edges, small, 100.min(a.notebooks / 10)).await?;
    eprintln!("scale: feed at {small} running: {feed_small}");
    start_range(&w, small, a.notebooks, a.concurrency).await?;
    wait_routes(&w, a.notebooks, &mut edges).await?;
    let start_s = t_start.elapsed().as_secs_f64();
    let feed_big = feed_cost(
        &w,
        &follower,
        &edges,
        a.notebooks,
        100.min(a.notebooks / 10),
    )
    .await?;
    eprintln!("scale: feed at {} running: {feed_big}", a.notebooks);
    let edge_rss1: Vec<u64> = edges
        .iter()
        .map(|e| e.proc.rss_kib())
        .collect::<Result<_>>()?;
    let control_rss = control.rss_kib()?;

    // Propagation under a background of 10 changes/s.
    let w = Arc::new(w);
    let stop_bg = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let bg_count = Arc::new(AtomicU64::new(0));
    let bg_err = Arc::new(AtomicU64::new(0));
    let bg = tokio::spawn(background(
        w.clone(),
        stop_bg.clone(),
        bg_count.clone(),
        bg_err.clone(),
    ));
    let t_bg = Instant::now();
    let (starts, stops, unshares) = propagation(&w, samples).await?;
    stop_bg.store(true, Ordering::SeqCst);
    let _ = bg.await;
    let bg_rate = bg_count.load(Ordering::SeqCst) as f64 / t_bg.elapsed().as_secs_f64();
    if bg_err.load(Ordering::SeqCst) > bg_count.load(Ordering::SeqCst) / 10 {
        bail!(
            "background changes failed: {} of {}",
            bg_err.load(Ordering::SeqCst),
            bg_count.load(Ordering::SeqCst)
        );
    }
    for e in &mut edges {
        e.proc.check_alive()?;
    }
    control.check_alive()?;

    // Activity and the list.
    let (activity, activity_shape) = activity(&w, if a.quick { 20 } else { 50 }).await?;
    let (list_first, list_walk, list_seen) = list(&w, if a.quick { 50 } else { 200 }).await?;
    let control_rss_end = control.rss_kib()?;

    let mut all = Samples::default();
    for s in [&starts, &stops, &unshares] {
        all.0.extend(&s.0);
    }
    let prop_p99 = all.q(0.99);
    let act_p99 = activity.q(0.99);
    let list_p99 = list_first.q(0.99);
    let per_route: Vec<f64> = edge_rss0
        .iter()
        .zip(&edge_rss1)
        .map(|(a0, a1)| round((*a1 as f64 - *a0 as f64) * 1024.0 / w.notebooks.len() as f64))
        .collect();
    let nproc = std::thread::available_parallelism().map_or(1, |n| n.get());
    let date = String::from_utf8_lossy(
        &Command::new("date")
            .arg("-u")
            .arg("+%Y-%m-%dT%H:%M:%SZ")
            .output()?
            .stdout,
    )
    .trim()
    .to_owned();
    let fb_small = feed_small["bytesPerApiChange"].as_f64().unwrap_or(f64::NAN);
    let fb_big = feed_big["bytesPerApiChange"].as_f64().unwrap_or(f64::NAN);
    let ratio = fb_big / fb_small;
    let out = json!({
        "benchmark": "scale (issue #13)",
        "machine": {"nproc": nproc, "date": date, "memTotalKiB": meminfo_total()},
        "size": {"runningNotebooks": w.notebooks.len(), "members": w.members.len(), "teams": w.teams.len() - 1,
                  "membersPerTeam": w.per_team, "listMemberSeesNotebooks": list_seen, "edges": 2},
        "seeding": {"how": "all through the REST API (members, teams, memberships, notebooks owned by the org admin, shares, starts)",
                    "seedSeconds": round(seed_s), "startAllSeconds": round(start_s)},
        "notReal": "every notebook's upstream is one stand-in HTTP server answering 200 (StandInRuntime, benchmark-only, in the scale binary's control-child); the control plane, PostgreSQL, the feed and both edges (marina proxy) are real",
        "route_propagation_ms": {"start": starts.summary(), "stop": stops.summary(), "unshare": unshares.summary(), "all": all.summary(),
                                  "backgroundChangesPerSecond": round(bg_rate),
                                  "measuredUntil": "both edges answer accordingly: start → not 404 without a cookie; stop → 404; unshare → 403 with the viewer's cookie; polled every 10 ms"},
        "route_propagation_p99_ms": round(prop_p99),
        "feed_bytes_per_change": {"small": feed_small, "large": feed_big, "largeOverSmall": round(ratio)},
        "activity_apply_ms": activity.summary(),
        "activity_apply_ms_p99": round(act_p99),
        "activity_batch_entries": w.notebooks.len(),
        "activity_batch_shape": activity_shape,
        "list_notebooks_ms": {"firstPage": list_first.summary(), "fullWalk": list_walk.summary()},
        "list_notebooks_p99_ms": round(list_p99),
        "memory": {"control_rss_kib": control_rss, "control_rss_kib_after_all": control_rss_end,
                    "edge_rss_kib_at_0_routes": edge_rss0, "edge_rss_kib_at_all_routes": edge_rss1,
                    "edge_bytes_per_route": per_route},
        "goals": {
            "route_propagation_p99_ms<=1000": prop_p99 <= 1000.0,
            "feed_bytes_per_change independent of running (large/small <= 1.5)": ratio <= 1.5,
            "activity_apply_ms_p99<=250": act_p99 <= 250.0,
            "list_notebooks_p99_ms<=50": list_p99 <= 50.0,
        },
        "totalSeconds": round(t_all.elapsed().as_secs_f64()),
    });
    let text = serde_json::to_string_pretty(&out)?;
    std::fs::write(a.out.join("scale.json"), &text)?;
    std::fs::write(a.out.join("report.md"), report_md(&out))?;
    println!("{text}");

    // Tear down.
    for e in &mut edges {
        e.proc.terminate();
    }
    control.terminate();
    pg.stop();
    Ok(())
}

fn meminfo_total() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| s.lines().next()?.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

fn report_md(v: &Value) -> String {
    let p = &v["route_propagation_ms"];
    format!(
        "# Scale benchmark\n\n{} running notebooks, {} members in {} teams, 2 edges; {} CPUs, {}.\n\n\
         | figure | value | goal | met |\n|---|---|---|---|\n\
         | route propagation p99 (start/stop/unshare, both edges) | {} ms (start {} / stop {} / unshare {}) | ≤ 1000 ms | {} |\n\
         | feed bytes per change at {} / {} running | {} / {} | independent of running | {} |\n\
         | activity batch ({} entries) p99 | {} ms | ≤ 250 ms | {} |\n\
         | list notebooks (member sees {}) first page p99 | {} ms (full walk p99 {} ms) | ≤ 50 ms | {} |\n\
         | control RSS | {} KiB | | |\n| edge RSS at 0 / all routes | {} / {} KiB | | |\n| edge bytes per route | {} | | |\n\n\
         Background: {} changes/s. Seeding: {}. Not real: {}\n",
        v["size"]["runningNotebooks"], v["size"]["members"], v["size"]["teams"], v["machine"]["nproc"], v["machine"]["date"],
        v["route_propagation_p99_ms"], p["start"]["p99"], p["stop"]["p99"], p["unshare"]["p99"], v["goals"]["route_propagation_p99_ms<=1000"],
        v["feed_bytes_per_change"]["small"]["running"], v["feed_bytes_per_change"]["large"]["running"],
        v["feed_bytes_per_change"]["small"]["bytesPerApiChange"], v["feed_bytes_per_change"]["large"]["bytesPerApiChange"],
        v["goals"]["feed_bytes_per_change independent of running (large/small <= 1.5)"],
        v["activity_batch_entries"], v["activity_apply_ms_p99"], v["goals"]["activity_apply_ms_p99<=250"],
        v["size"]["listMemberSeesNotebooks"], v["list_notebooks_p99_ms"], v["list_notebooks_ms"]["fullWalk"]["p99"], v["goals"]["list_notebooks_p99_ms<=50"],
        v["memory"]["control_rss_kib"], v["memory"]["edge_rss_kib_at_0_routes"], v["memory"]["edge_rss_kib_at_all_routes"], v["memory"]["edge_bytes_per_route"],
        p["backgroundChangesPerSecond"], v["seeding"]["how"], v["notReal"],
    )
}

async fn concurrently<T, F, Fut>(n: usize, conc: usize, f: F) -> Result<Vec<T>>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let v: Vec<Result<T>> = stream::iter(0..n).map(f).buffered(conc).collect().await;
    v.into_iter().collect()
}

/// Members, teams (each member in one), notebooks (by the admin), shares.
/// Notebooks 0..min(1000, N) are all shared with team 0, whose members then see 1,000.
async fn seed(w: &mut World, a: &RunArgs) -> Result<()> {
    let c = a.concurrency;
    let t = Instant::now();
    let api = &w.api;
    let admin = &w.admin;
    w.members = concurrently(a.members, c, |i| async move {
        let m = api
            .call(
                admin,
                "POST",
                "/iam/members",
                Some(json!({"name": format!("Member {i}"), "role": "member"})),
            )
            .await?
            .ok(201, "create member")?;
        m["id"].as_str().map(str::to_owned).context("member id")
    })
    .await?;
    eprintln!(
        "scale: {} members in {:.1} s",
        a.members,
        t.elapsed().as_secs_f64()
    );
    let per = w.per_team;
    let members = &w.members;
    w.teams = concurrently(a.teams, c, |i| async move {
        let t = api
            .call(
                admin,
                "POST",
                "/iam/teams",
                Some(json!({"name": format!("Team {i}")})),
            )
            .await?
            .ok(201, "create team")?;
        let id = t["id"].as_str().context("team id")?.to_owned();
        let ids = &members[i * per..(i + 1) * per];
        api.call(
            admin,
            "POST",
            &format!("/iam/teams/{id}/members"),
            Some(json!({"memberIds": ids})),
        )
        .await?
        .ok(200, "add team members")?;
        Ok(id)
    })
    .await?;
    eprintln!(
        "scale: {} teams of {per} in {:.1} s",
        a.teams,
        t.elapsed().as_secs_f64()
    );
    let cfg = api
        .call(
            admin,
            "POST",
            "/workloads/configs",
            Some(json!({"name": "Scale", "config": {"sail": {"maxRetries": 1}}})),
        )
        .await?
        .ok(201, "create workload config")?;
    let cfg = cfg["id"].as_str().context("config id")?.to_owned();
    let nt = a.teams;
    let wide = 1000.min(a.notebooks);
    let team_of: Vec<Vec<usize>> = (0..a.notebooks)
        .map(|i| {
            let first = 1 + i % (nt - 1);
            if i < wide {
                vec![0, first]
            } else if i % 2 == 0 {
                let second = 1 + (i / 2 + 7) % (nt - 1);
                if second != first {
                    vec![first, second]
                } else {
                    vec![first]
                }
            } else {
                vec![first]
            }
        })
        .collect();
    let teams = &w.teams;
    let team_of_r = &team_of;
    let cfg = &cfg;
    w.notebooks = concurrently(a.notebooks, c, |i| async move {
        let nb = api
            .call(admin, "POST", "/workloads/notebooks",
                  Some(json!({"workloadConfigId": cfg, "name": format!("Scale {i}"), "idleTimeoutSeconds": 0})))
            .await?
            .ok(201, "create notebook")?;
        let id = nb["item"]["notebookId"].as_str().context("notebook id")?.to_owned();
        let ids: Vec<&String> = team_of_r[i].iter().map(|t| &teams[*t]).collect();
        api.call(admin, "POST", &format!("/workloads/notebooks/{id}/teams"), Some(json!({"teamIds": ids})))
            .await?
            .ok(200, "share notebook")?;
        Ok(id)
    })
    .await?;
    w.team_of = team_of;
    // The background's share/unshare team (no members), after the others.
    let bg = api
        .call(
            admin,
            "POST",
            "/iam/teams",
            Some(json!({"name": "Background"})),
        )
        .await?
        .ok(201, "create team")?;
    w.teams
        .push(bg["id"].as_str().context("team id")?.to_owned());
    eprintln!(
        "scale: {} notebooks created and shared in {:.1} s",
        a.notebooks,
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

async fn start_one(w: &World, id: &str) -> Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = w
            .api
            .call(
                &w.admin,
                "POST",
                &format!("/workloads/notebooks/{id}/start"),
                None,
            )
            .await?;
        if r.status == 200 || r.status == 202 || r.status == 201 {
            return Ok(r.body);
        }
        // Still stopping from the previous stop: wait for `stopped`.
        if r.status == 409 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        bail!("start {id}: {} {}", r.status, r.body);
    }
}

async fn stop_one(w: &World, id: &str) -> Result<()> {
    let r = w
        .api
        .call(
            &w.admin,
            "POST",
            &format!("/workloads/notebooks/{id}/stop"),
            None,
        )
        .await?;
    if !(200..300).contains(&r.status) {
        bail!("stop {id}: {} {}", r.status, r.body);
    }
    Ok(())
}

async fn start_range(w: &World, from: usize, to: usize, conc: usize) -> Result<()> {
    let t = Instant::now();
    let ids = &w.notebooks;
    let got = concurrently(to - from, conc, |k| async move {
        let b = start_one(w, &ids[from + k]).await?;
        Ok(find_str(&b, "sessionId").unwrap_or_default())
    })
    .await?;
    // World is shared immutably here; the sessions are re-read for the activity batch.
    let _ = got;
    eprintln!(
        "scale: started {from}..{to} in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Waits until both edges route the last notebook started and a sample of the others.
async fn wait_routes(w: &World, upto: usize, edges: &mut [EdgeP]) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(300);
    let probe: Vec<usize> = (0..upto)
        .step_by((upto / 50).max(1))
        .chain([upto - 1])
        .collect();
    for &i in &probe {
        for (url, _) in &w.edges {
            loop {
                if edge_status(&w.http, url, &w.notebooks[i], None).await? != 404 {
                    break;
                }
                for e in edges.iter_mut() {
                    e.proc.check_alive()?;
                }
                if Instant::now() > deadline {
                    bail!("notebook {i} not routed by {url} within 300 s");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    Ok(())
}

async fn edge_status(
    http: &reqwest::Client,
    edge: &str,
    id: &str,
    cookie: Option<&str>,
) -> Result<u16> {
    let mut r = http.get(format!("{edge}/notebooks/{id}/"));
    if let Some(c) = cookie {
        r = r.header("cookie", c);
    }
    let resp = r
        .send()
        .await
        .with_context(|| format!("edge {edge} unreachable"))?;
    Ok(resp.status().as_u16())
}

/// Polls both edges every 10 ms until `done(status)` holds on each; the time from `t0`.
async fn until_both(
    w: &World,
    id: &str,
    cookies: Option<&[String]>,
    t0: Instant,
    done: impl Fn(u16) -> bool,
) -> Result<f64> {
    let mut ok = [false; 2];
    let deadline = t0 + Duration::from_secs(30);
    let mut last = [0u16; 2];
    loop {
        for e in 0..2 {
            if !ok[e] {
                let c = cookies.map(|c| c[e].as_str());
                let s = edge_status(&w.http, &w.edges[e].0, id, c).await?;
                last[e] = s;
                ok[e] = done(s);
            }
        }
        if ok[0] && ok[1] {
            return Ok(t0.elapsed().as_secs_f64() * 1000.0);
        }
        if Instant::now() > deadline {
            bail!("notebook {id}: the edges did not follow within 30 s (last statuses {last:?})");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A viewer's session cookie on each edge (one one-time URL per edge).
async fn viewer_cookies(w: &World, key: &str, id: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for (edge, _) in &w.edges {
        let o = w.api.open(key, id).await?.ok(200, "open as viewer")?;
        let url = o["url"].as_str().context("open: url")?;
        let path = &url[url.find("/_auth").context("open: no /_auth in url")?..];
        let resp = w.http.get(format!("{edge}{path}")).send().await?;
        let cookie = resp
            .headers()
            .get_all("set-cookie")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or("").to_owned())
            .collect::<Vec<_>>()
            .join("; ");
        if cookie.is_empty() {
            bail!(
                "redeeming the one-time URL on {edge}: {} without Set-Cookie",
                resp.status()
            );
        }
        out.push(cookie);
    }
    Ok(out)
}

/// The measured changes: stops then starts of notebooks in the upper half, unshares of the
/// viewer's team from notebooks in the lower-middle range.
async fn propagation(w: &World, n: usize) -> Result<(Samples, Samples, Samples)> {
    let total = w.notebooks.len();
    let (mut starts, mut stops, mut unshares) =
        (Samples::default(), Samples::default(), Samples::default());
    for k in 0..n {
        let i = total / 2 + k;
        let id = &w.notebooks[i];
        let t0 = Instant::now();
        stop_one(w, id).await?;
        stops
            .0
            .push(until_both(w, id, None, t0, |s| s == 404).await?);
        // Wait for `stopped`, then start and measure from the call's return.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let r = w
                .api
                .call(
                    &w.admin,
                    "POST",
                    &format!("/workloads/notebooks/{id}/start"),
                    None,
                )
                .await?;
            if (200..300).contains(&r.status) {
                break;
            }
            if r.status != 409 || Instant::now() > deadline {
                bail!("start {id}: {} {}", r.status, r.body);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let t0 = Instant::now();
        starts
            .0
            .push(until_both(w, id, None, t0, |s| s != 404).await?);
    }
    for k in 0..n {
        // Notebook i's first team is 1 + i % (T-1); its member 1 sees it only through that team.
        let i = total / 4 + k;
        let id = &w.notebooks[i];
        let team = *w.team_of[i].last().context("notebook without team")?;
        let member = &w.members[team * w.per_team + 1];
        let key = w
            .api
            .call(
                &w.admin,
                "POST",
                &format!("/iam/members/{member}/api-keys"),
                Some(json!({"name": "scale"})),
            )
            .await?
            .ok(201, "create key")?;
        let key = key["secret"].as_str().context("key secret")?.to_owned();
        let cookies = viewer_cookies(w, &key, id).await?;
        for (e, c) in cookies.iter().enumerate() {
            let s = edge_status(&w.http, &w.edges[e].0, id, Some(c)).await?;
            if s != 200 {
                bail!("viewer with a cookie on edge {e} got {s} before the unshare, not 200");
            }
        }
        let tid = &w.teams[team];
        let t0 = Instant::now();
        w.api
            .call(
                &w.admin,
                "DELETE",
                &format!("/workloads/notebooks/{id}/teams/{tid}"),
                None,
            )
            .await?
            .ok(204, "unshare")
            .or_else(|e| {
                if e.to_string().contains(": 200 ") {
                    Ok(Value::Null)
                } else {
                    Err(e)
                }
            })?;
        unshares
            .0
            .push(until_both(w, id, Some(&cookies), t0, |s| s == 403).await?);
        w.api
            .call(
                &w.admin,
                "POST",
                &format!("/workloads/notebooks/{id}/teams"),
                Some(json!({"teamIds": [tid]})),
            )
            .await?
            .ok(200, "share again")?;
    }
    Ok((starts, stops, unshares))
}

/// 10 changes/s: stop and start notebooks of the last quarter, share and unshare them with
/// the background team (no members; alternating), each call in its own task.
async fn background(
    w: Arc<World>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    count: Arc<AtomicU64>,
    errs: Arc<AtomicU64>,
) {
    let total = w.notebooks.len();
    let pool: Vec<usize> = (total * 3 / 4..total).collect();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut k = 0usize;
    let running: Arc<std::sync::Mutex<Vec<bool>>> =
        Arc::new(std::sync::Mutex::new(vec![true; pool.len()]));
    let shared: Arc<std::sync::Mutex<Vec<bool>>> =
        Arc::new(std::sync::Mutex::new(vec![false; pool.len()]));
    while !stop.load(Ordering::SeqCst) {
        tick.tick().await;
        let j = (k / 2) % pool.len();
        let w2 = w.clone();
        let (c, e) = (count.clone(), errs.clone());
        let id = w.notebooks[pool[j]].clone();
        let is_share = k % 2 == 1;
        let (running, shared) = (running.clone(), shared.clone());
        k += 1;
        tokio::spawn(async move {
            let r: Result<()> = async {
                if is_share {
                    let was = {
                        let mut s = shared.lock().unwrap();
                        let was = s[j];
                        s[j] = !was;
                        was
                    };
                    let t0 = w2.teams.last().expect("background team");
                    if was {
                        let a = w2
                            .api
                            .call(
                                &w2.admin,
                                "DELETE",
                                &format!("/workloads/notebooks/{id}/teams/{t0}"),
                                None,
                            )
                            .await?;
                        if !(200..300).contains(&a.status) {
                            bail!("bg unshare {}", a.status)
                        }
                    } else {
                        let a = w2
                            .api
                            .call(
                                &w2.admin,
                                "POST",
                                &format!("/workloads/notebooks/{id}/teams"),
                                Some(json!({"teamIds": [t0]})),
                            )
                            .await?;
                        if !(200..300).contains(&a.status) {
                            bail!("bg share {}", a.status)
                        }
                    }
                } else {
                    let was = {
                        let mut s = running.lock().unwrap();
                        let was = s[j];
                        s[j] = !was;
                        was
                    };
                    if was {
                        stop_one(&w2, &id).await?;
                    } else {
                        start_one(&w2, &id).await?;
                    }
                }
                Ok(())
            }
            .await;
            c.fetch_add(1, Ordering::SeqCst);
            if let Err(err) = r {
                eprintln!("scale: background change failed: {err:#}");
                e.fetch_add(1, Ordering::SeqCst);
            }
        });
    }
}

// ---------------------------------------------------------------------------------------------
// The feed, as an edge follows it: a standalone long-poll client counting bytes and changes.

struct Follower {
    bytes: Arc<AtomicU64>,
    changes: Arc<AtomicU64>,
    version: Arc<AtomicU64>,
    snapshots: Arc<AtomicU64>,
}

impl Follower {
    async fn start(control: &str, token: &str) -> Result<Follower> {
        let f = Follower {
            bytes: Arc::new(AtomicU64::new(0)),
            changes: Arc::new(AtomicU64::new(0)),
            version: Arc::new(AtomicU64::new(0)),
            snapshots: Arc::new(AtomicU64::new(0)),
        };
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(40))
            .build()?;
        let (b, c, v, s) = (
            f.bytes.clone(),
            f.changes.clone(),
            f.version.clone(),
            f.snapshots.clone(),
        );
        let (control, token) = (control.to_owned(), token.to_owned());
        // The first answer (a snapshot) must arrive: a feed that does not answer fails the run.
        let first = http
            .get(format!("{control}/internal/v1/routes"))
            .bearer_auth(&token)
            .send()
            .await?
            .error_for_status()
            .context("GET /internal/v1/routes")?
            .bytes()
            .await?;
        let fv: Value = serde_json::from_slice(&first).context("routes feed: not JSON")?;
        v.store(
            fv["version"].as_u64().context("routes feed: no version")?,
            Ordering::SeqCst,
        );
        tokio::spawn(async move {
            loop {
                let after = v.load(Ordering::SeqCst);
                let r = http
                    .get(format!(
                        "{control}/internal/v1/routes?after={after}&waitSeconds=25"
                    ))
                    .bearer_auth(&token)
                    .send()
                    .await;
                let Ok(r) = r else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                let Ok(body) = r.bytes().await else { continue };
                let Ok(val) = serde_json::from_slice::<Value>(&body) else {
                    continue;
                };
                if let Some(ver) = val["version"].as_u64() {
                    b.fetch_add(body.len() as u64, Ordering::SeqCst);
                    if val["kind"] == "changes" {
                        c.fetch_add(
                            val["changes"].as_array().map_or(0, |a| a.len()) as u64,
                            Ordering::SeqCst,
                        );
                    } else if ver != after {
                        s.fetch_add(1, Ordering::SeqCst);
                    }
                    v.store(ver, Ordering::SeqCst);
                }
            }
        });
        Ok(f)
    }
}

/// Counters of the edges' `/metrics` whose names end with `suffix`, summed over the edges.
async fn edge_counter(w: &World, suffix: &str) -> Option<f64> {
    let mut sum = 0.0;
    for (_, admin) in &w.edges {
        let text = w
            .http
            .get(format!("{admin}/metrics"))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        let v = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .find(|l| {
                l.split_whitespace()
                    .next()
                    .is_some_and(|n| n.ends_with(suffix))
            })?
            .split_whitespace()
            .last()?
            .parse::<f64>()
            .ok()?;
        sum += v;
    }
    Some(sum)
}

/// `k` stop/start pairs of already running notebooks (2k API changes), quiet otherwise; the
/// feed bytes they cost per API change and per feed entry, from the standalone follower and
/// (when the edges expose them) from the edges' counters.
async fn feed_cost(
    w: &World,
    f: &Follower,
    edges: &[EdgeP],
    running: usize,
    k: usize,
) -> Result<Value> {
    let _ = edges;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (b0, c0, s0) = (
        f.bytes.load(Ordering::SeqCst),
        f.changes.load(Ordering::SeqCst),
        f.snapshots.load(Ordering::SeqCst),
    );
    let eb0 = edge_counter(w, "route_feed_bytes_total").await;
    let ec0 = edge_counter(w, "route_feed_changes_total").await;
    for j in 0..k {
        let id = &w.notebooks[running - 1 - j];
        let t0 = Instant::now();
        stop_one(w, id).await?;
        until_both(w, id, None, t0, |s| s == 404).await?;
        start_one(w, id).await?;
        until_both(w, id, None, Instant::now(), |s| s != 404).await?;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (b1, c1, s1) = (
        f.bytes.load(Ordering::SeqCst),
        f.changes.load(Ordering::SeqCst),
        f.snapshots.load(Ordering::SeqCst),
    );
    if s1 != s0 {
        bail!("the feed answered {} snapshot(s) while measuring changes: bytes per change would be a snapshot's", s1 - s0);
    }
    let api_changes = 2 * k as u64;
    let feed_entries = c1 - c0;
    if feed_entries == 0 || b1 == b0 {
        bail!("the standalone feed client saw no changes ({} bytes): the feed shape is not the expected one", b1 - b0);
    }
    let edge = match (
        eb0,
        ec0,
        edge_counter(w, "route_feed_bytes_total").await,
        edge_counter(w, "route_feed_changes_total").await,
    ) {
        (Some(b0), Some(c0), Some(b1), Some(c1)) if c1 > c0 => json!({
            "bytesPerApiChange": round((b1 - b0) / 2.0 / api_changes as f64),
            "bytesPerFeedChange": round((b1 - b0) / (c1 - c0)),
            "source": "the edges' marina_edge_route_feed_{bytes,changes}_total, averaged over both edges"}),
        _ => Value::String("the edges expose no route_feed_{bytes,changes}_total counters".into()),
    };
    Ok(json!({
        "running": running,
        "apiChanges": api_changes,
        "feedChanges": feed_entries,
        "bytes": b1 - b0,
        "bytesPerApiChange": round((b1 - b0) as f64 / api_changes as f64),
        "bytesPerFeedChange": round((b1 - b0) as f64 / feed_entries as f64),
        "source": "a standalone client long-polling /internal/v1/routes?after=V (body bytes, entries in changes)",
        "edges": edge,
    }))
}

// ---------------------------------------------------------------------------------------------
// Activity and the list.

/// Session ids of every notebook (as the admin lists them), in `w.notebooks` order.
async fn sessions(w: &World) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let q = match &token {
            Some(t) => format!("/workloads/notebooks?limit=100&pageToken={t}"),
            None => "/workloads/notebooks?limit=100".into(),
        };
        let v = w
            .api
            .call(&w.admin, "GET", &q, None)
            .await?
            .ok(200, "list notebooks")?;
        let items = v["items"]
            .as_array()
            .or_else(|| v["included"]["notebooks"].as_array())
            .context("list: no items")?;
        for it in items {
            let id = find_str(it, "notebookId")
                .or_else(|| find_str(it, "id"))
                .context("list item id")?;
            let sid = find_str(it, "sessionId").context("list item: no sessionId")?;
            out.push((id, sid));
        }
        match v["nextPageToken"].as_str() {
            Some(t) => token = Some(t.to_owned()),
            None => break,
        }
    }
    Ok(out)
}

async fn activity(w: &World, rounds: usize) -> Result<(Samples, &'static str)> {
    let ss = sessions(w).await?;
    let known: std::collections::HashSet<&String> = w.notebooks.iter().collect();
    let ss: Vec<_> = ss
        .into_iter()
        .filter(|(id, _)| known.contains(id))
        .collect();
    if ss.len() < w.notebooks.len() {
        bail!(
            "activity: only {} of {} notebooks listed with a session",
            ss.len(),
            w.notebooks.len()
        );
    }
    let member = &w.members[0];
    let mut samples = Samples::default();
    let mut shape = "new (activity[], memberId, mode, openSockets, openSinceMs)";
    for r in 0..rounds {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis() as i64;
        let new = json!({"edgeId": "bench", "sentAtMs": now, "activity": ss.iter().map(|(id, sid)| json!({
            "notebookId": id, "sessionId": sid, "memberId": member, "mode": "edit",
            "lastActiveMs": now - 10, "openSockets": 1, "openSinceMs": now - 60_000})).collect::<Vec<_>>()});
        let body = if shape.starts_with("old") {
            json!({"edgeId": "bench", "sentAtMs": now, "notebooks": ss.iter().map(|(id, sid)| json!({
                "notebookId": id, "sessionId": sid, "lastActiveMs": now - 10, "openWebsockets": 1})).collect::<Vec<_>>()})
        } else {
            new
        };
        let bytes = serde_json::to_vec(&body)?;
        let t0 = Instant::now();
        let resp = w
            .http
            .post(format!("{}/internal/v1/activity", w.control_url))
            .bearer_auth(&w.internal_token)
            .header("content-type", "application/json")
            .body(bytes)
            .send()
            .await?;
        let st = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        let ms = t0.elapsed().as_secs_f64() * 1000.0;
        if !(200..300).contains(&st) {
            if r == 0 && st == 400 && shape.starts_with("new") {
                eprintln!("scale: the new activity shape was refused ({text}); using the old one (notebooks[], openWebsockets)");
                shape = "old (notebooks[], openWebsockets): the new shape was refused";
                continue;
            }
            bail!("activity batch: {st} {text}");
        }
        samples.0.push(ms);
    }
    if samples.0.is_empty() {
        bail!("no activity batch was accepted");
    }
    Ok((samples, shape))
}

/// As member 0 (team 0, shared with the first 1,000 notebooks): the first page, and the walk.
async fn list(w: &World, rounds: usize) -> Result<(Samples, Samples, usize)> {
    let member = &w.members[0];
    let key = w
        .api
        .call(
            &w.admin,
            "POST",
            &format!("/iam/members/{member}/api-keys"),
            Some(json!({"name": "scale-list"})),
        )
        .await?
        .ok(201, "create key")?;
    let key = key["secret"].as_str().context("key secret")?.to_owned();
    let (mut first, mut walk) = (Samples::default(), Samples::default());
    let mut seen = 0;
    for r in 0..rounds {
        let t0 = Instant::now();
        let mut token: Option<String> = None;
        let mut n = 0;
        loop {
            let q = match &token {
                Some(t) => format!("/workloads/notebooks?limit=100&pageToken={t}"),
                None => "/workloads/notebooks?limit=100".into(),
            };
            let v = w
                .api
                .call(&key, "GET", &q, None)
                .await?
                .ok(200, "list notebooks")?;
            if token.is_none() {
                first.0.push(t0.elapsed().as_secs_f64() * 1000.0);
            }
            n += v["items"]
                .as_array()
                .or_else(|| v["included"]["notebooks"].as_array())
                .map_or(0, |a| a.len());
            match v["nextPageToken"].as_str() {
                Some(t) if r % 4 == 0 => token = Some(t.to_owned()),
                _ => break,
            }
        }
        if r % 4 == 0 {
            walk.0.push(t0.elapsed().as_secs_f64() * 1000.0);
            seen = n;
        }
    }
    let want = 1000.min(w.notebooks.len());
    if seen < want {
        bail!("the list member sees {seen} notebooks, not {want}");
    }
    Ok((first, walk, seen))
}
