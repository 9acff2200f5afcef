//! The local runtime: each notebook is two child processes of Marina on this machine.
//!
//! ```text
//! sail spark server --ip 127.0.0.1 --port <free>           (always loopback)
//! marimo -q edit --headless --host <bind_host> --port <free> --skip-update-check \
//!        --token-password-file DATA_DIR/notebooks/<ID>/marimo-token [--base-url <base>] notebook.py
//!   env: SPARK_REMOTE=sc://127.0.0.1:<sail port>, the workload config's extraEnv,
//!        PYTHONPATH=<the notebook's library overlay> when it has libraries
//! ```
//!
//! - Both run from the shared virtualenv ([`env`]), each as the leader of its own process group
//!   ([`process`]), so stopping a notebook also reaches Marimo's kernel processes.
//! - `-q` keeps Marimo from printing its start-up banner, which contains the access token.
//! - Marina's own `MARINA_*` settings variables (which may hold secrets) are removed from the
//!   children's environment: notebook code can read its process environment.
//! - Libraries (`config.sail.libraries`) are installed per notebook with `pip install --target
//!   DATA_DIR/notebooks/<ID>/site`, constrained by the pinned requirements so they cannot
//!   replace marimo, pysail, pyspark-client or pandas with incompatible versions, and put on
//!   the kernel's `PYTHONPATH`. They are reinstalled only when the list changes.
//! - `executionMode`: `local` runs Sail in its default single-process mode; `local-cluster`
//!   sets `SAIL_MODE=local-cluster` with `maxNodes` workers; `kubernetes-cluster` needs the
//!   Kubernetes runtime and fails the start with a message saying so.
//!
//! **Crash recovery.** The children are in their own process groups, so they outlive a crashed
//! (or `kill -9`ed) Marina. Each start writes `run.json` ([`files`]); at the next start the
//! control plane calls [`Runtime::reconcile`] with what its store expects, which adopts the
//! expected, healthy notebooks, kills every recorded process group the store does not expect
//! (or expects in another session), and cleans up after expected ones whose processes died.
//! An expected notebook that is alive but not answering is left alone and not adopted. `marina serve`
//! also reconciles with an empty list on shutdown, which stops all local notebooks.

pub mod env;
pub mod files;
pub mod process;

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use marina_config::workload::{Library, SailConfig};
use marina_config::{Id, Settings};
use tokio::process::Command;
use tokio::sync::watch;

use crate::{Endpoint, Expected, Health, Runtime, RuntimeError, StartSpec};
use env::PythonEnv;
use files::{host_port, NotebookDir, RunRecord, ServerRecord};
use process::ProcId;

/// Sail always listens on loopback, whatever `runtime.local.bind_host` says: only the
/// notebook's own kernel connects to it, and its Spark Connect port has no authentication and
/// gives clients the server's filesystem.
const SAIL_HOST: &str = "127.0.0.1";
/// How long stopped servers get between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(3);
/// A server log larger than this at start is rotated to `<name>.log.1`.
const MAX_LOG_BYTES: u64 = 10 * 1024 * 1024;
/// Lines of a server's log quoted in a failure message.
const TAIL_LINES: usize = 20;
/// Installing a notebook's libraries.
const LIBRARY_INSTALL_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// Runs notebooks as local child processes. See the module documentation.
pub struct LocalRuntime {
    env: PythonEnv,
    notebooks_dir: PathBuf,
    host: String,
    start_timeout: Duration,
    http: reqwest::Client,
    /// Notebooks started or adopted by this process. A std mutex: it guards only map
    /// operations and is never held across an `.await`.
    running: Mutex<HashMap<Id, Running>>,
    /// Notebooks whose `start` is in progress; reconciliation leaves them alone, since a
    /// starting notebook is neither healthy yet nor an orphan.
    starting: Mutex<HashSet<Id>>,
}

/// A notebook this process knows to be running.
struct Running {
    record: RunRecord,
    /// Exit descriptions of our own children; `None` for processes adopted after a restart
    /// (not our children, so their liveness is read from `/proc`).
    sail_exit: Option<watch::Receiver<Option<String>>>,
    marimo_exit: Option<watch::Receiver<Option<String>>>,
}

// === impl LocalRuntime ===

impl LocalRuntime {
    /// Reads `runtime.local.*` and `data_dir`. Nothing is created until [`Runtime::prepare`]
    /// or [`Runtime::start`].
    pub fn new(settings: &Settings) -> Result<LocalRuntime, RuntimeError> {
        let local = &settings.runtime.local;
        if local.python.trim().is_empty() {
            return Err(RuntimeError::Environment(
                "runtime.local.python must name a Python interpreter".into(),
            ));
        }
        if local.bind_host.parse::<std::net::IpAddr>().is_err() {
            return Err(RuntimeError::Environment(format!(
                "runtime.local.bind_host must be an IP address, not {:?}",
                local.bind_host
            )));
        }
        // Children run from their notebook directory, so every path handed to them is absolute.
        let absolute = |p: PathBuf| {
            std::path::absolute(&p).map_err(|e| {
                RuntimeError::Environment(format!("cannot resolve {}: {e}", p.display()))
            })
        };
        let data_dir = absolute(settings.data_dir.clone())?;
        let venv = match &local.venv_dir {
            Some(p) if !p.as_os_str().is_empty() => absolute(p.clone())?,
            _ => data_dir.join("venv"),
        };
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(2))
            .build()
            .map_err(|e| RuntimeError::Backend(format!("HTTP client: {e}")))?;
        Ok(LocalRuntime {
            env: PythonEnv::new(local.python.clone(), venv),
            notebooks_dir: data_dir.join("notebooks"),
            host: local.bind_host.clone(),
            start_timeout: Duration::from_secs(settings.control.start_timeout_seconds.max(1)),
            http,
            running: Mutex::new(HashMap::new()),
            starting: Mutex::new(HashSet::new()),
        })
    }

    /// The virtualenv notebooks run from.
    pub fn venv_dir(&self) -> &Path {
        self.env.dir()
    }

    /// `DATA_DIR/notebooks/<ID>`: the notebook file, logs and run record of one notebook.
    pub fn notebook_dir(&self, id: Id) -> PathBuf {
        self.dir(id).root
    }

    fn dir(&self, id: Id) -> NotebookDir {
        NotebookDir::new(&self.notebooks_dir, id)
    }

    fn lock_running(&self) -> std::sync::MutexGuard<'_, HashMap<Id, Running>> {
        // A panic while holding this lock leaves a consistent map (each operation is one
        // insert or remove), so a poisoned lock is still usable.
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_starting(&self) -> std::sync::MutexGuard<'_, HashSet<Id>> {
        self.starting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The record of a notebook: from memory, else from its `run.json`.
    fn record(&self, id: Id) -> Option<RunRecord> {
        if let Some(r) = self.lock_running().get(&id) {
            return Some(r.record.clone());
        }
        RunRecord::read(&self.dir(id).run_file()).ok()
    }

    /// Environment of both servers: `extraEnv`, then what Marina must control.
    fn server_env(
        &self,
        sail: &SailConfig,
        sail_port: u16,
        site: Option<&Path>,
    ) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = sail
            .extra_env
            .iter()
            .map(|(k, v)| (k.clone(), v.value.clone()))
            .collect();
        env.push((
            "SPARK_REMOTE".into(),
            format!("sc://{}", host_port(SAIL_HOST, sail_port)),
        ));
        env.push(("MARIMO_SKIP_UPDATE_CHECK".into(), "1".into()));
        if let Some(site) = site {
            env.push(("PYTHONPATH".into(), site.display().to_string()));
        }
        if sail.execution_mode == "local-cluster" {
            env.push(("SAIL_MODE".into(), "local-cluster".into()));
            let n = sail.compute.worker.max_nodes.to_string();
            env.push(("SAIL_CLUSTER__WORKER_INITIAL_COUNT".into(), n.clone()));
            env.push(("SAIL_CLUSTER__WORKER_MAX_COUNT".into(), n));
        }
        env
    }

    /// Spawns one server (`sail` or `marimo`) in the notebook directory as the leader of a new
    /// process group, output appended to `logs/<what>.log`, and a task that reaps it and
    /// publishes how it exited.
    fn spawn_server(
        &self,
        what: &str,
        program: PathBuf,
        args: Vec<OsString>,
        env: &[(String, String)],
        dir: &NotebookDir,
        session: Id,
    ) -> Result<(ProcId, watch::Receiver<Option<String>>), RuntimeError> {
        use std::io::Write;
        let log = &dir.logs().join(format!("{what}.log"));
        let cwd = &dir.root;
        let backend = |e: std::io::Error| RuntimeError::Backend(format!("{}: {e}", log.display()));
        // Logs are appended across starts (a failure's context survives a restart); one
        // generation is kept so a long-lived notebook cannot fill the disk.
        if std::fs::metadata(log).is_ok_and(|m| m.len() > MAX_LOG_BYTES) {
            std::fs::rename(log, log.with_extension("log.1")).map_err(backend)?;
        }
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(backend)?;
        writeln!(file, "--- marina: starting {what} (session {session}) ---").map_err(backend)?;
        let stderr = file.try_clone().map_err(backend)?;
        let mut cmd = Command::new(&program);
        cmd.args(&args)
            .current_dir(cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::from(file))
            .stderr(Stdio::from(stderr))
            .process_group(0);
        // Marina's settings may carry secrets (internal token, database URL); notebook code
        // must not find them in its environment.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("MARINA_") {
                cmd.env_remove(k);
            }
        }
        cmd.envs(env.iter().map(|(k, v)| (k, v)));
        let mut child = cmd.spawn().map_err(|e| {
            RuntimeError::StartFailed(format!("cannot run {}: {e}", program.display()))
        })?;
        let pid = child
            .id()
            .ok_or_else(|| RuntimeError::StartFailed(format!("{what} exited at once")))?;
        let id = ProcId::of(pid);
        let (tx, rx) = watch::channel(None);
        tokio::spawn(async move {
            let how = match child.wait().await {
                Ok(status) => status.to_string(),
                Err(e) => format!("unknown status ({e})"),
            };
            let _ = tx.send(Some(how));
        });
        Ok((id, rx))
    }

    /// Installs the workload's libraries into the notebook's overlay directory (see the module
    /// docs). Returns the directory to put on `PYTHONPATH`, if any.
    async fn install_libraries(
        &self,
        dir: &NotebookDir,
        libraries: &[Library],
    ) -> Result<Option<PathBuf>, RuntimeError> {
        if libraries.is_empty() {
            return Ok(None);
        }
        // All entries are checked before anything is installed.
        for (i, lib) in libraries.iter().enumerate() {
            let kinds = lib.pypi.is_some() as u8
                + lib.whl.is_some() as u8
                + lib.requirements.is_some() as u8;
            if kinds != 1 {
                return Err(RuntimeError::StartFailed(format!(
                    "libraries[{i}]: must have exactly one of pypi, requirements, whl"
                )));
            }
            // Each value becomes a pip argument: one starting with `-` would be read as an
            // option. (The control plane validates this too; the runtime does not rely on it.)
            let values = [
                lib.pypi.as_ref().map(|p| p.package.as_str()),
                lib.whl.as_deref(),
                lib.requirements
                    .as_ref()
                    .filter(|r| r.source != "inline")
                    .map(|r| r.uri.as_str()),
            ];
            if values
                .iter()
                .flatten()
                .any(|v| v.trim().is_empty() || v.starts_with('-'))
            {
                return Err(RuntimeError::StartFailed(format!(
                    "libraries[{i}]: a package, wheel or requirements file must be named, \
                     and must not start with -"
                )));
            }
        }
        let site = dir.site();
        let stamp_path = site.join(".marina-libraries");
        let stamp = serde_json::to_string(libraries)
            .map_err(|e| RuntimeError::Backend(format!("libraries: {e}")))?;
        if std::fs::read_to_string(&stamp_path).ok().as_deref() == Some(stamp.as_str()) {
            return Ok(Some(site));
        }
        let io = |e: std::io::Error| RuntimeError::Backend(format!("{}: {e}", site.display()));
        if site.exists() {
            std::fs::remove_dir_all(&site).map_err(io)?;
        }
        std::fs::create_dir_all(&site).map_err(io)?;
        let constraints = dir.root.join("constraints.txt");
        std::fs::write(&constraints, env::REQUIREMENTS).map_err(io)?;
        tracing::info!(notebook = %dir.root.display(), count = libraries.len(), "installing notebook libraries");
        for (i, lib) in libraries.iter().enumerate() {
            let mut cmd = Command::new(self.env.bin("pip"));
            cmd.args([
                "install",
                "--disable-pip-version-check",
                "--progress-bar",
                "off",
                "--no-input",
                "--target",
            ])
            .arg(&site)
            .arg("-c")
            .arg(&constraints);
            if let Some(p) = &lib.pypi {
                if let Some(repo) = p.repo.as_deref().filter(|r| !r.is_empty()) {
                    cmd.args(["--index-url", repo]);
                }
                cmd.arg(&p.package);
            } else if let Some(r) = &lib.requirements {
                let path = if r.source == "inline" {
                    let f = dir.root.join(format!("requirements-{i}.txt"));
                    std::fs::write(&f, &r.uri).map_err(io)?;
                    f.display().to_string()
                } else {
                    r.uri.clone()
                };
                cmd.args(["-r", &path]);
            } else if let Some(w) = &lib.whl {
                cmd.arg(w);
            }
            env::run_logged(&mut cmd, "pip install (library)", LIBRARY_INSTALL_TIMEOUT)
                .await
                .map_err(|e| match e {
                    RuntimeError::Environment(m) => {
                        RuntimeError::StartFailed(format!("installing libraries[{i}]: {m}"))
                    }
                    other => other,
                })?;
        }
        std::fs::write(&stamp_path, stamp).map_err(io)?;
        Ok(Some(site))
    }

    async fn start_inner(&self, spec: &StartSpec) -> Result<Endpoint, RuntimeError> {
        let id = spec.notebook_id;
        if spec.sail.execution_mode == "kubernetes-cluster" {
            return Err(RuntimeError::StartFailed(
                "executionMode kubernetes-cluster needs the Kubernetes runtime \
                 (runtime.kind = \"kubernetes\"); the local runtime runs local and local-cluster"
                    .into(),
            ));
        }
        if let Some(base) = &spec.base_url {
            if !base.starts_with('/') || base.ends_with('/') || base.contains(char::is_whitespace) {
                return Err(RuntimeError::StartFailed(format!(
                    "base URL {base:?} must start with / and not end with /"
                )));
            }
        }
        self.env.ensure().await?;
        // Leftovers of an earlier attempt (or of a crashed Marina) go first.
        self.stop(id).await?;

        let dir = self.dir(id);
        dir.create()
            .map_err(|e| RuntimeError::Backend(format!("{}: {e}", dir.root.display())))?;
        let site = self.install_libraries(&dir, &spec.sail.libraries).await?;

        let token = random_token();
        marina_config::secrets::write_private(&dir.token_file(), token.as_bytes())
            .map_err(|e| RuntimeError::Backend(format!("writing the token file: {e}")))?;
        let (sail_port, marimo_port) = process::free_port_pair(SAIL_HOST, &self.host)
            .map_err(|e| RuntimeError::Backend(format!("finding free ports: {e}")))?;
        let env = self.server_env(&spec.sail, sail_port, site.as_deref());

        let (sail_proc, sail_exit) = self.spawn_server(
            "sail",
            self.env.bin("sail"),
            vec![
                "spark".into(),
                "server".into(),
                "--ip".into(),
                SAIL_HOST.into(),
                "--port".into(),
                sail_port.to_string().into(),
            ],
            &env,
            &dir,
            spec.session_id,
        )?;
        let mut record = RunRecord {
            notebook_id: id,
            session_id: spec.session_id,
            host: self.host.clone(),
            base_url: spec.base_url.clone(),
            sail: ServerRecord {
                proc: sail_proc,
                port: sail_port,
            },
            marimo: None,
            token: token.clone(),
        };
        // Recorded before the next spawn, so a crash in between still leaves a trace to clean.
        let write_record = |r: &RunRecord| {
            r.write(&dir.run_file())
                .map_err(|e| RuntimeError::Backend(format!("writing run.json: {e}")))
        };
        write_record(&record)?;
        self.lock_running().insert(
            id,
            Running {
                record: record.clone(),
                sail_exit: Some(sail_exit.clone()),
                marimo_exit: None,
            },
        );

        let mut args: Vec<OsString> = vec![
            "-q".into(),
            "edit".into(),
            "--headless".into(),
            "--host".into(),
            self.host.clone().into(),
            "--port".into(),
            marimo_port.to_string().into(),
            "--skip-update-check".into(),
            "--token-password-file".into(),
            dir.token_file().into(),
        ];
        if let Some(base) = &spec.base_url {
            args.push("--base-url".into());
            args.push(base.into());
        }
        args.push(dir.notebook().into());
        let (marimo_proc, marimo_exit) = self.spawn_server(
            "marimo",
            self.env.bin("marimo"),
            args,
            &env,
            &dir,
            spec.session_id,
        )?;
        record.marimo = Some(ServerRecord {
            proc: marimo_proc,
            port: marimo_port,
        });
        write_record(&record)?;
        self.lock_running().insert(
            id,
            Running {
                record: record.clone(),
                sail_exit: Some(sail_exit.clone()),
                marimo_exit: Some(marimo_exit.clone()),
            },
        );

        self.wait_ready(&record, &dir, &sail_exit, &marimo_exit)
            .await?;
        Ok(Endpoint {
            upstream: host_port(&self.host, marimo_port),
            token,
        })
    }

    /// Polls until Sail accepts TCP and Marimo's `/health` answers 200; a server that exits
    /// first fails the attempt with the tail of its log.
    async fn wait_ready(
        &self,
        record: &RunRecord,
        dir: &NotebookDir,
        sail_exit: &watch::Receiver<Option<String>>,
        marimo_exit: &watch::Receiver<Option<String>>,
    ) -> Result<(), RuntimeError> {
        let sail_addr = host_port(SAIL_HOST, record.sail.port);
        let health_url = record.health_url().unwrap_or_default();
        let deadline = Instant::now() + self.start_timeout;
        let (mut sail_ok, mut marimo_ok) = (false, false);
        loop {
            for (name, exit, log) in [
                ("Sail", sail_exit, dir.sail_log()),
                ("Marimo", marimo_exit, dir.marimo_log()),
            ] {
                if let Some(how) = exit.borrow().clone() {
                    return Err(RuntimeError::StartFailed(format!(
                        "the {name} server exited ({how}) before it was ready; last lines of its log:\n{}",
                        process::log_tail(&log, TAIL_LINES, &record.token)
                    )));
                }
            }
            sail_ok = sail_ok || process::accepts_tcp(&sail_addr).await;
            marimo_ok = marimo_ok || self.marimo_healthy(&health_url).await;
            if sail_ok && marimo_ok {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(RuntimeError::StartFailed(format!(
                    "not ready after {} s (Sail listening: {sail_ok}, Marimo healthy: {marimo_ok})",
                    self.start_timeout.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn marimo_healthy(&self, url: &str) -> bool {
        matches!(self.http.get(url).send().await, Ok(r) if r.status() == reqwest::StatusCode::OK)
    }

    /// Whether a recorded notebook's processes are alive; `Err` says which one is not and why.
    async fn check_alive(&self, id: Id, record: &RunRecord) -> Result<(), String> {
        let dir = self.dir(id);
        // Receivers are cloned out so the lock is not held while waiting on them.
        let (sail_exit, marimo_exit) = match self.lock_running().get(&id) {
            Some(r) => (r.sail_exit.clone(), r.marimo_exit.clone()),
            None => (None, None),
        };
        let servers = [
            ("Sail", Some(&record.sail), sail_exit, dir.sail_log()),
            (
                "Marimo",
                record.marimo.as_ref(),
                marimo_exit,
                dir.marimo_log(),
            ),
        ];
        for (name, server, exit, log) in servers {
            let Some(server) = server else {
                return Err(format!("the {name} server was never started"));
            };
            let how = match exit {
                Some(mut exit) => {
                    if exit.borrow().is_none() && !server.proc.is_alive() {
                        // Our child died but its reaper task has not published the status
                        // yet; it is about to, and the status is worth the short wait.
                        let _ =
                            tokio::time::timeout(Duration::from_millis(500), exit.changed()).await;
                        let how = exit.borrow().clone();
                        Some(how.unwrap_or_else(|| "exit status unknown".to_owned()))
                    } else {
                        exit.borrow().clone()
                    }
                }
                // Adopted after a restart: not our child, so only /proc can tell.
                None if !server.proc.is_alive() => Some("exit status unknown".to_owned()),
                None => None,
            };
            if let Some(how) = how {
                return Err(format!(
                    "the {name} server exited ({how}); last lines of its log:\n{}",
                    process::log_tail(&log, TAIL_LINES, &record.token)
                ));
            }
        }
        Ok(())
    }

    /// Both alive and answering.
    async fn probe(&self, id: Id, record: &RunRecord) -> Health {
        if let Err(why) = self.check_alive(id, record).await {
            return Health::Failed(why);
        }
        let sail = process::accepts_tcp(&host_port(SAIL_HOST, record.sail.port)).await;
        let marimo = self
            .marimo_healthy(&record.health_url().unwrap_or_default())
            .await;
        if sail && marimo {
            Health::Healthy
        } else {
            Health::Pending
        }
    }

    /// Kills a recorded notebook's process groups and removes its run files.
    async fn teardown(&self, id: Id, record: Option<RunRecord>) {
        let dir = self.dir(id);
        if let Some(record) = record {
            process::terminate_groups(&record.groups(), STOP_GRACE).await;
        }
        for f in [dir.run_file(), dir.token_file()] {
            if let Err(e) = std::fs::remove_file(&f) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(file = %f.display(), "cannot remove: {e}");
                }
            }
        }
    }
}

fn random_token() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Removes `id` from the in-flight set when a start ends, however it ends.
struct StartingGuard<'a>(&'a LocalRuntime, Id);

impl Drop for StartingGuard<'_> {
    fn drop(&mut self) {
        self.0.lock_starting().remove(&self.1);
    }
}

#[async_trait]
impl Runtime for LocalRuntime {
    fn name(&self) -> &'static str {
        "local"
    }

    async fn prepare(&self) -> Result<(), RuntimeError> {
        self.env.ensure().await
    }

    async fn start(&self, spec: &StartSpec) -> Result<Endpoint, RuntimeError> {
        self.lock_starting().insert(spec.notebook_id);
        let _guard = StartingGuard(self, spec.notebook_id);
        let started = Instant::now();
        match self.start_inner(spec).await {
            Ok(endpoint) => {
                tracing::info!(
                    notebook = %spec.notebook_id,
                    session = %spec.session_id,
                    upstream = %endpoint.upstream,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "notebook started"
                );
                Ok(endpoint)
            }
            Err(e) => {
                // Leave nothing half-started behind, whatever the caller does next.
                if !matches!(e, RuntimeError::Environment(_)) {
                    let record = self
                        .lock_running()
                        .remove(&spec.notebook_id)
                        .map(|r| r.record);
                    let record = record
                        .or_else(|| RunRecord::read(&self.dir(spec.notebook_id).run_file()).ok());
                    self.teardown(spec.notebook_id, record).await;
                }
                tracing::warn!(notebook = %spec.notebook_id, attempt = spec.attempt, "start failed: {e}");
                Err(e)
            }
        }
    }

    async fn stop(&self, notebook_id: Id) -> Result<(), RuntimeError> {
        let record = self.lock_running().remove(&notebook_id).map(|r| r.record);
        let record = record.or_else(|| RunRecord::read(&self.dir(notebook_id).run_file()).ok());
        if record.is_some() {
            tracing::info!(notebook = %notebook_id, "stopping notebook");
        }
        self.teardown(notebook_id, record).await;
        Ok(())
    }

    async fn health(&self, notebook_id: Id) -> Result<Health, RuntimeError> {
        match self.record(notebook_id) {
            None => Ok(Health::Missing),
            Some(record) => Ok(self.probe(notebook_id, &record).await),
        }
    }

    async fn reconcile(&self, expected: &[Expected]) -> Result<Vec<Id>, RuntimeError> {
        let entries = match std::fs::read_dir(&self.notebooks_dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => {
                return Err(RuntimeError::Backend(format!(
                    "{}: {e}",
                    self.notebooks_dir.display()
                )))
            }
        };
        let mut adopted = Vec::new();
        for entry in entries.flatten() {
            let Some(id) = entry.file_name().to_str().and_then(|n| Id::parse(n).ok()) else {
                continue;
            };
            if self.lock_starting().contains(&id) {
                continue;
            }
            let run_file = self.dir(id).run_file();
            let record = match RunRecord::read(&run_file) {
                Ok(r) => r,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    tracing::warn!(file = %run_file.display(), "unreadable run record, removing it: {e}");
                    self.teardown(id, None).await;
                    continue;
                }
            };
            let wanted = expected
                .iter()
                .any(|x| x.notebook_id == id && x.session_id == record.session_id);
            if !wanted {
                tracing::info!(notebook = %id, session = %record.session_id, "stopping a notebook the store does not expect");
                self.lock_running().remove(&id);
                self.teardown(id, Some(record)).await;
                continue;
            }
            match self.probe(id, &record).await {
                Health::Healthy => {
                    let mut running = self.lock_running();
                    // Our own children keep their exit watchers; others are adopted.
                    running.entry(id).or_insert_with(|| Running {
                        record,
                        sail_exit: None,
                        marimo_exit: None,
                    });
                    adopted.push(id);
                }
                // Alive but not answering right now (a busy machine, a slow probe): neither
                // adopted nor killed. Killing on one failed probe would take down working
                // notebooks; if the store gives it up, the next reconcile stops it.
                Health::Pending => {
                    tracing::warn!(notebook = %id, "expected notebook is alive but not answering; not adopted");
                }
                other => {
                    tracing::warn!(notebook = %id, health = ?other, "expected notebook is gone; cleaning up");
                    self.lock_running().remove(&id);
                    self.teardown(id, Some(record)).await;
                }
            }
        }
        Ok(adopted)
    }
}
