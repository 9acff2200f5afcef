//! The local runtime: each notebook is two servers on this machine, each in a sandbox.
//!
//! ```text
//! [sandbox] sail spark server --ip 127.0.0.1 --port 50051
//!           host 127.0.0.1:<free S> ──pasta──▶ 127.0.0.1:50051 inside
//! [sandbox] marimo -q edit --headless --host 127.0.0.1 --port 2718 --skip-update-check \
//!                  --token-password-file /run/marina/marimo-token [--base-url <base>] \
//!                  /notebook/notebook.py
//!           host <bind_host>:<free M> ──pasta──▶ 127.0.0.1:2718 inside
//!           inside 127.0.0.1:50051 ──pasta──▶ host 127.0.0.1:S (its own Sail, nothing else)
//!   env: SPARK_REMOTE=sc://127.0.0.1:50051, the workload config's extraEnv,
//!        PYTHONPATH=<libraries>:/notebook/.packages, PIP_TARGET=/notebook/.packages
//! ```
//!
//! - What a sandbox isolates and how is [`sandbox`]'s to say; `runtime.local.sandbox = "none"`
//!   runs the same two servers unsandboxed, as Marina's own user, for single-user use only
//!   (then Sail listens on the host's loopback and Marimo on `bind_host` directly).
//! - Both run from the shared virtualenv ([`env`]), each as the leader of its own process group
//!   ([`process`]), so stopping a notebook also reaches Marimo's kernel processes; a
//!   sandbox's PID namespace makes sure nothing inside outlives it.
//! - `-q` keeps Marimo from printing its start-up banner, which contains the access token.
//! - The children's environment is built, not inherited ([`sandbox::base_env`]): Marina's
//!   settings variables may hold secrets, and notebook code can read its process environment.
//! - Libraries (`config.sail.libraries`) are installed per notebook with `pip install --target
//!   DATA_DIR/notebooks/<ID>/site` (in a sandbox of their own, since installing runs the
//!   packages' build code), constrained by the pinned requirements so they cannot
//!   replace marimo, pysail, pyspark-client or pandas with incompatible versions, and put on
//!   the kernel's `PYTHONPATH`. They are reinstalled only when the list changes.
//! - `pip install` from a cell installs into `/notebook/.packages` (`PIP_TARGET`), constrained
//!   the same way (`PIP_CONSTRAINT`): the shared environment is read-only.
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
pub mod sandbox;

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use marina_config::settings::SandboxKind;
use marina_config::workload::{Library, SailConfig};
use marina_config::{Id, Settings};
use tokio::process::Command;
use tokio::sync::watch;

use crate::{Endpoint, Expected, Health, Runtime, RuntimeError, StartSpec};
use env::PythonEnv;
use files::{host_port, NotebookDir, RunRecord, ServerRecord};
use process::ProcId;
use sandbox::{Ports, Sandbox};

/// Sail's host port is always on loopback, whatever `runtime.local.bind_host` says: only the
/// notebook's own kernel connects to it, and its Spark Connect port has no authentication and
/// gives clients the server's filesystem (in a sandbox, only the sandbox's).
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
    data_dir: PathBuf,
    notebooks_dir: PathBuf,
    isolation: SandboxKind,
    internet: bool,
    sandbox_user: (u32, u32),
    /// Made once, by the first [`Runtime::prepare`] or start: `Err` says why this machine
    /// cannot sandbox notebooks.
    sandbox: tokio::sync::OnceCell<Result<Sandbox, String>>,
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
            data_dir,
            isolation: local.sandbox,
            internet: local.notebook_internet,
            sandbox_user: settings.sandbox_user().unwrap_or((65534, 65534)),
            sandbox: tokio::sync::OnceCell::new(),
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

    /// The sandbox notebooks run in, or `None` when `runtime.local.sandbox = "none"`. Made
    /// (and checked) once; a machine that cannot make one refuses to start notebooks.
    async fn sandbox(&self) -> Result<Option<&Sandbox>, RuntimeError> {
        if self.isolation == SandboxKind::None {
            return Ok(None);
        }
        let made = self
            .sandbox
            .get_or_init(|| async {
                Sandbox::detect(self.env.dir(), self.internet, self.sandbox_user)
                    .await
                    .map_err(|e| e.0)
            })
            .await;
        match made {
            Ok(s) => Ok(Some(s)),
            Err(why) => Err(RuntimeError::Environment(format!(
                "notebooks cannot be sandboxed on this machine: {why}. Install bubblewrap and \
                 passt (Debian: apt-get install bubblewrap passt), or set \
                 runtime.local.sandbox = \"none\" to run notebooks unsandboxed, for single-user \
                 use only: notebook code can then read Marina's keys and database"
            ))),
        }
    }

    /// How notebooks are isolated, for logs and the host page.
    pub fn isolation(&self) -> &'static str {
        match self.isolation {
            SandboxKind::Bubblewrap => "bubblewrap",
            SandboxKind::None => "none",
        }
    }

    /// Environment of both servers: `extraEnv`, then what Marina must control. `paths` says
    /// where the notebook's directories are as the servers see them.
    fn server_env(&self, sail: &SailConfig, paths: &ServerPaths) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = sail
            .extra_env
            .iter()
            .map(|(k, v)| (k.clone(), v.value.clone()))
            .collect();
        env.push((
            "PATH".into(),
            format!(
                "{}:/usr/local/bin:/usr/bin:/bin",
                self.env.dir().join("bin").display()
            ),
        ));
        env.push(("SPARK_REMOTE".into(), format!("sc://{}", paths.sail)));
        env.push(("MARIMO_SKIP_UPDATE_CHECK".into(), "1".into()));
        let packages = paths.work.join(".packages").display().to_string();
        let python_path = match &paths.libraries {
            Some(site) => format!("{}:{packages}", site.display()),
            None => packages.clone(),
        };
        env.push(("PYTHONPATH".into(), python_path));
        env.push(("PIP_TARGET".into(), packages));
        env.push((
            "PIP_CONSTRAINT".into(),
            paths.constraints.display().to_string(),
        ));
        if sail.execution_mode == "local-cluster" {
            env.push(("SAIL_MODE".into(), "local-cluster".into()));
            let n = sail.compute.worker.max_nodes.to_string();
            env.push(("SAIL_CLUSTER__WORKER_INITIAL_COUNT".into(), n.clone()));
            env.push(("SAIL_CLUSTER__WORKER_MAX_COUNT".into(), n));
        }
        env
    }

    /// Opens (and rotates) `logs/<what>.log` for a server's output.
    fn open_log(
        &self,
        what: &str,
        dir: &NotebookDir,
        session: Id,
    ) -> Result<std::fs::File, RuntimeError> {
        use std::io::Write;
        let log = &dir.logs().join(format!("{what}.log"));
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
        Ok(file)
    }

    /// Spawns one server (`sail` or `marimo`) as the leader of a new process group, output
    /// appended to `logs/<what>.log`, and a task that reaps it and publishes how it exited.
    /// In a sandbox, `launch`'s paths are the sandbox's, and its network helper is started
    /// beside it.
    async fn spawn_server(
        &self,
        what: &str,
        launch: Launch<'_>,
        dir: &NotebookDir,
        session: Id,
    ) -> Result<(ServerRecord, watch::Receiver<Option<String>>), RuntimeError> {
        let file = self.open_log(what, dir, session)?;
        let backend = |e: std::io::Error| RuntimeError::Backend(format!("{what} log: {e}"));
        let stderr = file.try_clone().map_err(backend)?;
        let net_log = file.try_clone().map_err(backend)?;
        let work = dir.work();
        let mut cmd = match launch.sandbox {
            Some((sandbox, ref mounts, ref ports)) => sandbox
                .command(&sandbox::Spec {
                    notebook: &work,
                    mounts: mounts.clone(),
                    private_dir: &dir.root,
                    env: launch.env,
                    program: launch.program.clone(),
                    args: launch.args.clone(),
                    ports: ports.clone(),
                })
                .map_err(|e| RuntimeError::Backend(format!("preparing the {what} sandbox: {e}")))?,
            None => {
                let mut cmd = Command::new(&launch.program);
                cmd.args(&launch.args)
                    .current_dir(&work)
                    .process_group(0)
                    .env_clear()
                    .envs(sandbox::base_env(launch.env));
                cmd
            }
        };
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(file))
            .stderr(Stdio::from(stderr));
        let mut child = cmd.spawn().map_err(|e| {
            RuntimeError::StartFailed(format!("cannot run {}: {e}", launch.program.display()))
        })?;
        let pid = child
            .id()
            .ok_or_else(|| RuntimeError::StartFailed(format!("{what} exited at once")))?;
        let proc = ProcId::of(pid);
        let net = match &launch.sandbox {
            Some((sandbox, _, ports)) => {
                match self.spawn_network(sandbox, pid, ports, net_log).await {
                    Ok(net) => net,
                    Err(e) => {
                        // The whole group: the sandbox's first process is in it.
                        let _ = nix::sys::signal::killpg(
                            nix::unistd::Pid::from_raw(pid as i32),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                        let _ = child.start_kill();
                        let log = dir.logs().join(format!("{what}.log"));
                        return Err(RuntimeError::StartFailed(format!(
                            "{e}; last lines of the {what} log:\n{}",
                            process::log_tail(&log, TAIL_LINES, "")
                        )));
                    }
                }
            }
            None => None,
        };
        let (tx, rx) = watch::channel(None);
        tokio::spawn(async move {
            let how = match child.wait().await {
                Ok(status) => status.to_string(),
                Err(e) => format!("unknown status ({e})"),
            };
            let _ = tx.send(Some(how));
        });
        Ok((
            ServerRecord {
                proc,
                port: launch.host_port,
                net,
            },
            rx,
        ))
    }

    /// Starts a root-built sandbox's `pasta`, in a process group of its own (it cannot join
    /// the sandbox's: `setsid` put that in another session), reaped by a task of its own.
    /// `None` when pasta is the sandbox's outer process already (an unprivileged Marina).
    async fn spawn_network(
        &self,
        sandbox: &Sandbox,
        pid: u32,
        ports: &Ports,
        log: std::fs::File,
    ) -> Result<Option<ProcId>, RuntimeError> {
        let backend = |e: std::io::Error| RuntimeError::Backend(format!("sandbox network: {e}"));
        let Some(mut net) = sandbox.network(pid, ports).await.map_err(|e| {
            // Most often the server could not even be executed: its log says why.
            RuntimeError::StartFailed(format!("sandbox network: {e}"))
        })?
        else {
            return Ok(None);
        };
        let err = log.try_clone().map_err(backend)?;
        net.stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(err))
            .process_group(0);
        let mut child = net
            .spawn()
            .map_err(|e| RuntimeError::StartFailed(format!("cannot run pasta: {e}")))?;
        let net_pid = child
            .id()
            .ok_or_else(|| RuntimeError::StartFailed("pasta exited at once".into()))?;
        tokio::spawn(async move {
            let _ = child.wait().await;
        });
        Ok(Some(ProcId::of(net_pid)))
    }

    /// Installs the workload's libraries into the notebook's overlay directory (see the module
    /// docs), in a sandbox when notebooks have one. Returns whether there are libraries.
    async fn install_libraries(
        &self,
        dir: &NotebookDir,
        libraries: &[Library],
        sandbox: Option<&Sandbox>,
    ) -> Result<bool, RuntimeError> {
        if libraries.is_empty() {
            return Ok(false);
        }
        // All entries are checked before anything is installed.
        let data_dir =
            std::fs::canonicalize(&self.data_dir).unwrap_or_else(|_| self.data_dir.clone());
        let mut local_files: Vec<PathBuf> = Vec::new();
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
            // A local wheel or requirements file is made visible to the install (read-only,
            // at its own path), unless it lies in Marina's data directory: pip quotes the
            // lines of a file it cannot parse, which would print Marina's keys.
            let file = lib.whl.as_deref().or(lib
                .requirements
                .as_ref()
                .filter(|r| r.source != "inline")
                .map(|r| r.uri.as_str()));
            if let Some(f) = file.map(Path::new).filter(|f| f.is_absolute()) {
                let real = std::fs::canonicalize(f).unwrap_or_else(|_| f.to_owned());
                if real.starts_with(&data_dir) {
                    return Err(RuntimeError::StartFailed(format!(
                        "libraries[{i}]: {} is inside Marina's data directory; put wheels and \
                         requirements files elsewhere",
                        f.display()
                    )));
                }
                if real.exists() {
                    local_files.push(real);
                }
            }
        }
        let site = dir.site();
        let stamp_path = site.join(".marina-libraries");
        let stamp = serde_json::to_string(libraries)
            .map_err(|e| RuntimeError::Backend(format!("libraries: {e}")))?;
        if std::fs::read_to_string(&stamp_path).ok().as_deref() == Some(stamp.as_str()) {
            return Ok(true);
        }
        let io = |e: std::io::Error| RuntimeError::Backend(format!("{}: {e}", site.display()));
        if site.exists() {
            std::fs::remove_dir_all(&site).map_err(io)?;
        }
        std::fs::create_dir_all(&site).map_err(io)?;
        if let Some(s) = sandbox {
            s.hand_over(&site).map_err(io)?;
        }
        // Paths as pip sees them: the sandbox's, or the host's.
        let (site_arg, constraints_arg, run_dir) = match sandbox {
            Some(_) => (
                PathBuf::from(sandbox::LIBRARIES_DIR),
                Path::new(sandbox::RUN_DIR).join("constraints.txt"),
                PathBuf::from(sandbox::RUN_DIR),
            ),
            None => (site.clone(), dir.constraints(), dir.root.clone()),
        };
        tracing::info!(notebook = %dir.root.display(), count = libraries.len(), "installing notebook libraries");
        for (i, lib) in libraries.iter().enumerate() {
            let mut mounts = vec![
                (site.clone(), PathBuf::from(sandbox::LIBRARIES_DIR), true),
                (
                    dir.constraints(),
                    Path::new(sandbox::RUN_DIR).join("constraints.txt"),
                    false,
                ),
            ];
            mounts.extend(local_files.iter().map(|f| (f.clone(), f.clone(), false)));
            let mut args: Vec<OsString> = [
                "install",
                "--disable-pip-version-check",
                "--progress-bar",
                "off",
                "--no-input",
                "--target",
            ]
            .map(OsString::from)
            .to_vec();
            args.push(site_arg.clone().into());
            args.push("-c".into());
            args.push(constraints_arg.clone().into());
            if let Some(p) = &lib.pypi {
                if let Some(repo) = p.repo.as_deref().filter(|r| !r.is_empty()) {
                    args.push("--index-url".into());
                    args.push(repo.into());
                }
                args.push((&p.package).into());
            } else if let Some(r) = &lib.requirements {
                let path = if r.source == "inline" {
                    let name = format!("requirements-{i}.txt");
                    let f = dir.root.join(&name);
                    std::fs::write(&f, &r.uri).map_err(io)?;
                    mounts.push((f, run_dir.join(&name), false));
                    run_dir.join(&name).display().to_string()
                } else {
                    r.uri.clone()
                };
                args.push("-r".into());
                args.push(path.into());
            } else if let Some(w) = &lib.whl {
                args.push(w.into());
            }
            let env = sandbox::base_env(&[]);
            let mut cmd = match sandbox {
                Some(s) => s
                    .command(&sandbox::Spec {
                        notebook: &dir.work(),
                        mounts,
                        private_dir: &dir.root,
                        env: &env,
                        program: self.env.bin("pip"),
                        args,
                        ports: Ports::default(),
                    })
                    .map_err(io)?,
                None => {
                    let mut cmd = Command::new(self.env.bin("pip"));
                    cmd.args(&args).env_clear().envs(env);
                    cmd
                }
            };
            let no_ports = Ports::default();
            let network = sandbox.map(|s| (s, &no_ports));
            env::run_logged(
                &mut cmd,
                "pip install (library)",
                LIBRARY_INSTALL_TIMEOUT,
                network,
            )
            .await
            .map_err(|e| match e {
                RuntimeError::Environment(m) => {
                    RuntimeError::StartFailed(format!("installing libraries[{i}]: {m}"))
                }
                other => other,
            })?;
        }
        std::fs::write(&stamp_path, stamp).map_err(io)?;
        Ok(true)
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
        let sandbox = self.sandbox().await?;
        // Leftovers of an earlier attempt (or of a crashed Marina) go first.
        self.stop(id).await?;

        let dir = self.dir(id);
        let io = |e: std::io::Error| RuntimeError::Backend(format!("{}: {e}", dir.root.display()));
        dir.create().map_err(io)?;
        std::fs::create_dir_all(dir.work().join(".packages")).map_err(io)?;
        std::fs::write(dir.constraints(), env::REQUIREMENTS).map_err(io)?;
        if let Some(s) = sandbox {
            s.hand_over(&dir.work()).map_err(io)?;
        }
        let has_libraries = self
            .install_libraries(&dir, &spec.sail.libraries, sandbox)
            .await?;

        let token = random_token();
        marina_config::secrets::write_private(&dir.token_file(), token.as_bytes())
            .map_err(|e| RuntimeError::Backend(format!("writing the token file: {e}")))?;
        let (sail_port, marimo_port) = process::free_port_pair(SAIL_HOST, &self.host)
            .map_err(|e| RuntimeError::Backend(format!("finding free ports: {e}")))?;

        // Where things are, as the servers see them.
        let run_dir = Path::new(sandbox::RUN_DIR);
        let paths = match sandbox {
            Some(s) => {
                s.hand_over_file(&dir.token_file()).map_err(io)?;
                ServerPaths {
                    work: PathBuf::from(sandbox::NOTEBOOK_DIR),
                    libraries: has_libraries.then(|| PathBuf::from(sandbox::LIBRARIES_DIR)),
                    constraints: run_dir.join("constraints.txt"),
                    token: run_dir.join("marimo-token"),
                    sail: host_port("127.0.0.1", sandbox::SAIL_PORT),
                    sail_listen: sandbox::SAIL_PORT,
                    marimo_listen: ("127.0.0.1".to_owned(), sandbox::MARIMO_PORT),
                }
            }
            None => ServerPaths {
                work: dir.work(),
                libraries: has_libraries.then(|| dir.site()),
                constraints: dir.constraints(),
                token: dir.token_file(),
                sail: host_port(SAIL_HOST, sail_port),
                sail_listen: sail_port,
                marimo_listen: (self.host.clone(), marimo_port),
            },
        };
        let env = self.server_env(&spec.sail, &paths);
        // Read-only mounts both sandboxes get.
        let mut mounts = vec![
            (dir.token_file(), paths.token.clone(), false),
            (dir.constraints(), paths.constraints.clone(), false),
        ];
        if has_libraries {
            mounts.push((dir.site(), PathBuf::from(sandbox::LIBRARIES_DIR), false));
        }

        let sail_args: Vec<OsString> = vec![
            "spark".into(),
            "server".into(),
            "--ip".into(),
            "127.0.0.1".into(),
            "--port".into(),
            paths.sail_listen.to_string().into(),
        ];
        let (sail, sail_exit) = self
            .spawn_server(
                "sail",
                Launch {
                    program: self.env.bin("sail"),
                    args: sail_args,
                    env: &env,
                    host_port: sail_port,
                    sandbox: sandbox.map(|s| {
                        let ports = Ports {
                            inbound: Some((SAIL_HOST.to_owned(), sail_port, sandbox::SAIL_PORT)),
                            outbound: None,
                        };
                        (s, mounts.clone(), ports)
                    }),
                },
                &dir,
                spec.session_id,
            )
            .await?;
        let mut record = RunRecord {
            notebook_id: id,
            session_id: spec.session_id,
            host: self.host.clone(),
            base_url: spec.base_url.clone(),
            sail,
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

        let (listen_host, listen_port) = &paths.marimo_listen;
        let mut args: Vec<OsString> = vec![
            "-q".into(),
            "edit".into(),
            "--headless".into(),
            "--host".into(),
            listen_host.into(),
            "--port".into(),
            listen_port.to_string().into(),
            "--skip-update-check".into(),
            "--token-password-file".into(),
            paths.token.clone().into(),
        ];
        if let Some(base) = &spec.base_url {
            args.push("--base-url".into());
            args.push(base.into());
        }
        args.push(paths.work.join("notebook.py").into());
        let (marimo, marimo_exit) = self
            .spawn_server(
                "marimo",
                Launch {
                    program: self.env.bin("marimo"),
                    args,
                    env: &env,
                    host_port: marimo_port,
                    sandbox: sandbox.map(|s| {
                        let ports = Ports {
                            inbound: Some((self.host.clone(), marimo_port, sandbox::MARIMO_PORT)),
                            // The kernel's Spark session reaches its own Sail, and nothing else.
                            outbound: Some((sandbox::SAIL_PORT, sail_port)),
                        };
                        (s, mounts.clone(), ports)
                    }),
                },
                &dir,
                spec.session_id,
            )
            .await?;
        record.marimo = Some(marimo);
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

    /// Polls until Sail answers HTTP/2 (gRPC) and Marimo's `/health` answers 200; a server
    /// that exits first fails the attempt with the tail of its log. (A sandbox's port on the
    /// host is pasta's, which accepts before anything listens inside: only an answer counts.)
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
            sail_ok = sail_ok || process::speaks_http2(&sail_addr).await;
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
            if server.net.as_ref().is_some_and(|n| !n.is_alive()) {
                return Err(format!(
                    "the network helper (pasta) of the {name} sandbox exited; last lines of \
                     its log:\n{}",
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
        let sail = process::speaks_http2(&host_port(SAIL_HOST, record.sail.port)).await;
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

/// One server to spawn.
struct Launch<'a> {
    program: PathBuf,
    args: Vec<OsString>,
    env: &'a [(String, String)],
    /// The port it answers on, on the host.
    host_port: u16,
    /// The sandbox, its extra mounts and the ports its network helper connects.
    sandbox: Option<(&'a Sandbox, Vec<sandbox::Mount>, Ports)>,
}

/// The notebook's places as its servers see them: inside a sandbox, or on the host.
struct ServerPaths {
    work: PathBuf,
    libraries: Option<PathBuf>,
    constraints: PathBuf,
    token: PathBuf,
    /// `host:port` of Sail, for `SPARK_REMOTE`.
    sail: String,
    sail_listen: u16,
    marimo_listen: (String, u16),
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
        self.env.ensure().await?;
        match self.sandbox().await? {
            Some(s) => match s.run_as() {
                Some((uid, gid)) => tracing::info!(
                    "notebooks run sandboxed (bubblewrap + pasta), as uid {uid} gid {gid}"
                ),
                None => tracing::info!("notebooks run sandboxed (bubblewrap + pasta)"),
            },
            None => tracing::warn!(
                "runtime.local.sandbox = \"none\": notebooks run UNSANDBOXED, as Marina's own \
                 user; their code can read Marina's keys and database (single-user use only)"
            ),
        }
        Ok(())
    }

    fn isolation(&self) -> &'static str {
        LocalRuntime::isolation(self)
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

    async fn kernel_busy(&self, notebook_id: Id) -> Result<crate::Busy, RuntimeError> {
        let Some(record) = self.record(notebook_id) else {
            return Ok(crate::Busy::Unknown);
        };
        let Some(m) = record.marimo.as_ref() else {
            return Ok(crate::Busy::Unknown);
        };
        let base = format!(
            "http://{}{}",
            host_port(&record.host, m.port),
            record.base_url.as_deref().unwrap_or("")
        );
        crate::kernel::kernel_busy_at(&self.http, &base, &record.token).await
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
