//! The deployment under test, on loopback: a throwaway PostgreSQL, `marina control` (with the
//! local runtime, so it owns the notebooks' sandboxes) and N `marina proxy` replicas sharing
//! one cookie key, the control plane's public key and one internal token, as a platform team
//! would run them behind a load balancer. Every part can be killed and started again: the
//! faults are made of these calls.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// A free loopback port (bound, then released; the race is acceptable for a test rig).
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn random_hex(bytes: usize) -> String {
    use rand::RngCore;
    let mut b = vec![0u8; bytes];
    rand::thread_rng().fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// PostgreSQL from Debian's packages, in a directory of its own.
pub struct Postgres {
    bin: PathBuf,
    dir: PathBuf,
    pub port: u16,
    as_postgres: bool,
}

impl Postgres {
    pub fn url(&self) -> String {
        format!("postgres://marina:marina@127.0.0.1:{}/marina", self.port)
    }

    fn cmd(&self, tool: &str) -> Command {
        let exe = self.bin.join(tool);
        if self.as_postgres {
            // PostgreSQL refuses to run as root.
            let mut c = Command::new("runuser");
            c.arg("-u").arg("postgres").arg("--").arg(exe);
            c
        } else {
            Command::new(exe)
        }
    }

    pub fn start(dir: &Path) -> Result<Postgres> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .context("PostgreSQL is not installed (apt-get install postgresql)")?
            .flatten()
            .map(|e| e.path().join("bin"))
            .filter(|p| p.join("initdb").exists())
            .max()
            .context("no initdb under /usr/lib/postgresql/*/bin")?;
        let as_postgres = nix::unistd::geteuid().is_root();
        std::fs::create_dir_all(dir)?;
        if as_postgres {
            run(Command::new("chown").arg("postgres").arg(dir))?;
        }
        let pg = Postgres {
            bin,
            dir: dir.to_owned(),
            port: free_port()?,
            as_postgres,
        };
        let data = dir.join("data");
        run(pg.cmd("initdb").arg("-D").arg(&data).args([
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
        ]))?;
        pg.pg_ctl("start")?;
        run(pg.cmd("psql").args([
            "-h",
            "127.0.0.1",
            "-p",
            &pg.port.to_string(),
            "-U",
            "postgres",
            "-q",
            "-c",
            "CREATE ROLE marina LOGIN SUPERUSER PASSWORD 'marina'",
            "-c",
            "CREATE DATABASE marina OWNER marina",
        ]))?;
        Ok(pg)
    }

    fn pg_ctl(&self, action: &str) -> Result<()> {
        let opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c max_connections=200 -c fsync=off",
            self.port,
            self.dir.display()
        );
        let mut c = self.cmd("pg_ctl");
        c.arg("-D").arg(self.dir.join("data"));
        c.arg("-l").arg(self.dir.join("server.log"));
        c.args(["-w", "-t", "60", "-m", "fast", "-o", &opts, action]);
        run(&mut c)
    }

    /// The fault: a fast restart (open connections are cut, as in a failover).
    pub fn restart(&self) -> Result<()> {
        self.pg_ctl("restart")
    }

    pub fn stop(&self) {
        let _ = self.pg_ctl("stop");
    }
}

fn run(c: &mut Command) -> Result<()> {
    let out = c
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("{c:?}"))?;
    if !out.status.success() {
        bail!(
            "{c:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// One `marina` process.
pub struct Part {
    pub name: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    log: PathBuf,
    child: Option<Child>,
    bin: PathBuf,
}

impl Part {
    fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(&self.bin)
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("MARINA_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| format!("starting {}", self.name))?;
        self.child = Some(child);
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// SIGKILL: a crash.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, as an orchestrator does, then SIGKILL after `within`.
    pub fn terminate(&mut self, within: Duration) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = c.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        let v: Vec<&str> = s.lines().collect();
        v[v.len().saturating_sub(lines)..].join("\n")
    }
}

pub struct Edge {
    pub part: Part,
    pub url: String,
    pub admin_url: String,
}

/// How the deployment is set up.
pub struct Plan {
    pub marina: PathBuf,
    pub venv: PathBuf,
    pub dir: PathBuf,
    pub edges: usize,
    pub idle_after_s: u64,
    pub detached_timeout_s: u64,
}

pub struct Deployment {
    pub pg: Postgres,
    pub control: Part,
    pub api: String,
    pub edges: Vec<Edge>,
    pub data_dir: PathBuf,
    pub admin_key: String,
    pub internal_token: String,
    pub public_url: String,
    http: reqwest::Client,
}

impl Deployment {
    pub async fn start(plan: &Plan) -> Result<Deployment> {
        let pg = Postgres::start(&plan.dir.join("pg"))?;
        let data_dir = plan.dir.join("control");
        std::fs::create_dir_all(&data_dir)?;
        let internal_token = random_hex(32);
        let cookie_key = random_hex(32);
        let edge_ports: Vec<(u16, u16)> = (0..plan.edges)
            .map(|_| Ok((free_port()?, free_port()?)))
            .collect::<Result<_>>()?;
        // One public address for all replicas, as behind a load balancer: the one-time URLs
        // and the origin checks name it; clients pick a replica themselves.
        let public_url = format!("http://127.0.0.1:{}", edge_ports[0].0);
        let control_port = free_port()?;
        let api = format!("http://127.0.0.1:{control_port}");
        let env = |pairs: &[(&str, String)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect()
        };
        let mut control = Part {
            name: "control".into(),
            args: vec![
                "control".into(),
                "--data-dir".into(),
                data_dir.display().to_string(),
                "--listen".into(),
                format!("127.0.0.1:{control_port}"),
            ],
            env: env(&[
                ("MARINA_DATABASE__URL", pg.url()),
                ("MARINA_INTERNAL__TOKEN", internal_token.clone()),
                ("MARINA_PROXY__PUBLIC_URL", public_url.clone()),
                ("MARINA_CONTROL__PUBLIC_URL", api.clone()),
                ("MARINA_CONTROL__RATE_LIMIT_PER_SECOND", "0".into()),
                ("MARINA_CONTROL__MONITOR_INTERVAL_MS", "500".into()),
                (
                    "MARINA_CONTROL__IDLE_AFTER_SECONDS",
                    plan.idle_after_s.to_string(),
                ),
                (
                    "MARINA_CONTROL__DETACHED_TIMEOUT_SECONDS",
                    plan.detached_timeout_s.to_string(),
                ),
                ("MARINA_CONTROL__START_TIMEOUT_SECONDS", "180".into()),
                (
                    "MARINA_RUNTIME__LOCAL__VENV_DIR",
                    plan.venv.display().to_string(),
                ),
            ]),
            log: plan.dir.join("control.log"),
            child: None,
            bin: plan.marina.clone(),
        };
        control.spawn()?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()?;
        let key_file = data_dir.join("admin-api-key");
        let pub_key = data_dir.join("keys").join("url-signing.pub.pem");
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if !control.alive() {
                bail!("the control plane exited:\n{}", control.log_tail(30));
            }
            let ready = http
                .get(format!("{api}/readyz"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ready && key_file.exists() && pub_key.exists() {
                break;
            }
            if Instant::now() > deadline {
                bail!("the control plane is not ready:\n{}", control.log_tail(30));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let admin_key = std::fs::read_to_string(&key_file)?.trim().to_owned();
        let mut edges = Vec::new();
        for (i, (port, admin)) in edge_ports.into_iter().enumerate() {
            let edge_dir = plan.dir.join(format!("edge-{i}"));
            std::fs::create_dir_all(&edge_dir)?;
            let mut part = Part {
                name: format!("edge-{i}"),
                args: vec![
                    "proxy".into(),
                    "--data-dir".into(),
                    edge_dir.display().to_string(),
                    "--listen".into(),
                    format!("127.0.0.1:{port}"),
                    "--admin-listen".into(),
                    format!("127.0.0.1:{admin}"),
                ],
                env: env(&[
                    ("MARINA_INTERNAL__TOKEN", internal_token.clone()),
                    ("MARINA_PROXY__PUBLIC_URL", public_url.clone()),
                    ("MARINA_PROXY__CONTROL_URL", api.clone()),
                    ("MARINA_PROXY__EDGE_ID", format!("edge-{i}")),
                    ("MARINA_PROXY__REPLAY_STORE", "control".into()),
                    ("MARINA_PROXY__ACTIVITY_INTERVAL_MS", "1000".into()),
                    ("MARINA_PROXY__FRAME_ANCESTORS", format!("[\"{api}\"]")),
                    ("MARINA_PROXY__COOKIE__KEYS", format!("[\"{cookie_key}\"]")),
                    (
                        "MARINA_TOKENS__PUBLIC_KEYS",
                        format!("[{{kid=\"k1\", file=\"{}\"}}]", pub_key.display()),
                    ),
                ]),
                log: plan.dir.join(format!("edge-{i}.log")),
                child: None,
                bin: plan.marina.clone(),
            };
            part.spawn()?;
            edges.push(Edge {
                part,
                url: format!("http://127.0.0.1:{port}"),
                admin_url: format!("http://127.0.0.1:{admin}"),
            });
        }
        let d = Deployment {
            pg,
            control,
            api,
            edges,
            data_dir,
            admin_key,
            internal_token,
            public_url,
            http,
        };
        for i in 0..d.edges.len() {
            d.wait_edge(i, Duration::from_secs(60)).await?;
        }
        Ok(d)
    }

    /// Waits until edge `i` answers its admin health endpoint.
    pub async fn wait_edge(&self, i: usize, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let ok = self
                .http
                .get(format!("{}/readyz", self.edges[i].admin_url))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ok {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("edge {i} not ready:\n{}", self.edges[i].part.log_tail(30));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn control_ready(&self) -> bool {
        self.http
            .get(format!("{}/readyz", self.api))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
    }

    pub fn restart_edge(&mut self, i: usize) -> Result<()> {
        self.edges[i].part.spawn()
    }

    /// SIGTERM, wait for the exit (without blocking the load's threads), start again.
    pub async fn restart_control(&mut self) -> Result<()> {
        if let Some(mut c) = self.control.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline && matches!(c.try_wait(), Ok(None)) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        self.control.spawn()
    }

    /// The notebook's Marimo process group (the sandbox's outer process), from `run.json`.
    pub fn marimo_group(&self, notebook_id: &str) -> Result<i32> {
        let path = self
            .data_dir
            .join("notebooks")
            .join(notebook_id)
            .join("run.json");
        let v: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(&path).with_context(|| path.display().to_string())?,
        )?;
        v["marimo"]["pid"]
            .as_i64()
            .map(|p| p as i32)
            .context("no marimo pid in run.json")
    }

    /// Resident memory of edge `i`, KiB.
    pub fn edge_rss_kib(&mut self, i: usize) -> Option<u64> {
        let pid = self.edges[i].part.pid()?;
        rss_kib(pid)
    }

    /// Stops everything (the notebooks must have been stopped through the API before).
    pub fn shut_down(&mut self) {
        for e in &mut self.edges {
            e.part.terminate(Duration::from_secs(15));
        }
        self.control.terminate(Duration::from_secs(30));
        self.pg.stop();
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        for e in &mut self.edges {
            e.part.kill();
        }
        self.control.kill();
        self.pg.stop();
    }
}

pub fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Processes whose command line or working directory is under `dir` (what a finished run
/// must not leave behind), and every descendant of `root` still alive.
pub fn leftovers(dir: &Path, pids: &[(i32, u64)]) -> Vec<String> {
    let mut found = Vec::new();
    let needle = dir.display().to_string();
    let me = std::process::id() as i32;
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            if pid == me {
                continue;
            }
            let cmd = std::fs::read(e.path().join("cmdline"))
                .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
                .unwrap_or_default();
            if cmd.contains(&needle) && !cmd.contains("postgres") {
                found.push(format!("{pid}: {cmd}"));
            }
        }
    }
    for (pid, start) in pids {
        // A zombie holds nothing but its pid: it waits for a parent to reap it, and a parent
        // that died (the control plane restarted) hands that to PID 1, which in some
        // containers never reaps.
        if start_ticks(*pid) == Some(*start) && !is_zombie(*pid) {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
                .unwrap_or_default();
            let line = format!("{pid}: {cmd}");
            if !found.contains(&line) {
                found.push(line);
            }
        }
    }
    found
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.get(s.rfind(')')? + 2..)?.chars().next())
        .is_some_and(|c| c == 'Z' || c == 'X')
}

/// Start time of a process (field 22 of `/proc/<pid>/stat`), to tell it from a reused pid.
pub fn start_ticks(pid: i32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &s[s.rfind(')')? + 2..];
    after.split_whitespace().nth(19)?.parse().ok()
}

/// Every descendant of `root` now, with start times: the notebook servers the control plane
/// started (they are in process groups and sessions of their own, but still its children).
pub fn descendants(root: u32) -> Vec<(i32, u64)> {
    let mut parent = std::collections::HashMap::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            if let Ok(s) = std::fs::read_to_string(e.path().join("stat")) {
                if let Some(close) = s.rfind(')') {
                    if let Some(ppid) = s[close + 2..]
                        .split_whitespace()
                        .nth(1)
                        .and_then(|p| p.parse::<i32>().ok())
                    {
                        parent.insert(pid, ppid);
                    }
                }
            }
        }
    }
    let mut out = Vec::new();
    for &pid in parent.keys() {
        let mut p = pid;
        let mut hops = 0;
        while let Some(&pp) = parent.get(&p) {
            if pp == root as i32 {
                if let Some(t) = start_ticks(pid) {
                    out.push((pid, t));
                }
                break;
            }
            p = pp;
            hops += 1;
            if hops > 64 || pp <= 1 {
                break;
            }
        }
    }
    out
}
