//! The notebook Python environment: one virtualenv with the pinned `marimo`, `pysail` and
//! `pyspark-client`, shared by every local notebook, plus per-notebook library overlays.
//!
//! The requirements are compiled into the binary (`python-requirements.txt`), and a stamp file
//! in the virtualenv holds the requirements it was built from. The stamp is the same
//! convention as `scripts/setup-python.sh`, so an environment made by either is reused by the
//! other, and a later call is a single file comparison.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use crate::RuntimeError;

/// The pinned notebook packages (marimo, pysail, pyspark-client, pandas<3).
pub const REQUIREMENTS: &str = include_str!("../../python-requirements.txt");

/// Name of the stamp file inside the virtualenv; its content is the requirements it holds.
pub const STAMP_FILE: &str = ".marina-requirements";

/// Checking the interpreter or creating an empty virtualenv takes seconds; more means a hang.
const QUICK_STEP_TIMEOUT: Duration = Duration::from_secs(180);
/// Downloading and installing about 800 MB, on a slow link.
const INSTALL_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// One virtualenv and how to (re)create it.
#[derive(Debug)]
pub struct PythonEnv {
    python: String,
    dir: PathBuf,
    /// Held while checking or installing, so concurrent callers share one install: the first
    /// installs, the others wait on the lock and then find the stamp in place. A tokio mutex
    /// because it is held across the (long) install.
    lock: tokio::sync::Mutex<()>,
}

impl PythonEnv {
    pub fn new(python: String, dir: PathBuf) -> PythonEnv {
        PythonEnv {
            python,
            dir,
            lock: tokio::sync::Mutex::new(()),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A program installed in the environment (`marimo`, `sail`, `pip`).
    pub fn bin(&self, name: &str) -> PathBuf {
        self.dir.join("bin").join(name)
    }

    /// True when the stamp says the environment holds exactly our requirements.
    pub fn is_ready(&self) -> bool {
        std::fs::read_to_string(self.dir.join(STAMP_FILE))
            .map(|s| s == REQUIREMENTS)
            .unwrap_or(false)
            && self.bin("marimo").exists()
            && self.bin("sail").exists()
    }

    /// Creates the environment unless it is already there. Errors are
    /// [`RuntimeError::Environment`] and say what to fix.
    pub async fn ensure(&self) -> Result<(), RuntimeError> {
        if self.is_ready() {
            return Ok(());
        }
        let _guard = self.lock.lock().await;
        // Someone may have finished installing while we waited for the lock.
        if self.is_ready() {
            return Ok(());
        }
        tracing::info!(
            venv = %self.dir.display(),
            "creating the notebook environment (about 800 MB, first run only)"
        );
        self.check_python().await?;
        run_logged(
            Command::new(&self.python)
                .arg("-m")
                .arg("venv")
                .arg(&self.dir),
            "python -m venv",
            QUICK_STEP_TIMEOUT,
            None,
        )
        .await?;
        let req = self.dir.join("marina-requirements.txt");
        std::fs::write(&req, REQUIREMENTS)
            .map_err(|e| env_err(format!("writing {}: {e}", req.display())))?;
        run_logged(
            Command::new(self.bin("pip"))
                .args([
                    "install",
                    "--disable-pip-version-check",
                    "--progress-bar",
                    "off",
                    "-r",
                ])
                .arg(&req),
            "pip install",
            INSTALL_TIMEOUT,
            None,
        )
        .await?;
        // The stamp is written last: an interrupted install is redone next time.
        std::fs::write(self.dir.join(STAMP_FILE), REQUIREMENTS)
            .map_err(|e| env_err(format!("writing the stamp file: {e}")))?;
        tracing::info!(venv = %self.dir.display(), "notebook environment ready");
        Ok(())
    }

    async fn check_python(&self) -> Result<(), RuntimeError> {
        let out = tokio::time::timeout(
            QUICK_STEP_TIMEOUT,
            Command::new(&self.python)
                .args(["-c", "import sys, venv; print(sys.version_info >= (3, 10))"])
                .stdin(Stdio::null())
                .kill_on_drop(true)
                .output(),
        )
        .await
        .map_err(|_| env_err(format!("`{}` did not answer", self.python)))?
        .map_err(|e| {
            env_err(format!(
                "cannot run `{}` ({e}); install Python 3.10+ or set runtime.local.python",
                self.python
            ))
        })?;
        if !out.status.success() {
            return Err(env_err(format!(
                "`{}` cannot create virtualenvs (the venv module is missing?): {}",
                self.python,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        if String::from_utf8_lossy(&out.stdout).trim() != "True" {
            return Err(env_err(format!(
                "`{}` is older than Python 3.10, which marimo and pysail need",
                self.python
            )));
        }
        Ok(())
    }
}

fn env_err(msg: String) -> RuntimeError {
    RuntimeError::Environment(msg)
}

/// Runs a command to completion, forwarding each output line through `tracing` at info (pip's
/// progress is its line output), killing it after `timeout`. The last lines are kept for the
/// error, since pip explains failures at the end.
pub async fn run_logged(
    cmd: &mut Command,
    what: &str,
    timeout: Duration,
    network: Option<(&super::sandbox::Sandbox, &super::sandbox::Ports)>,
) -> Result<(), RuntimeError> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .map_err(|e| env_err(format!("cannot run {what}: {e}")))?;
    // A sandboxed command gets its network once its namespaces exist; the helper exits by
    // itself when they go, and is killed with this function's scope in any case.
    let pid = child.id();
    let net = match (network, pid) {
        (Some((sandbox, ports)), Some(pid)) => sandbox
            .network(pid, ports)
            .await
            .map_err(|e| env_err(format!("{what}: sandbox network: {e}")))?,
        _ => None,
    };
    let _net = match net {
        Some(mut net) => {
            net.stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true);
            Some(
                net.spawn()
                    .map_err(|e| env_err(format!("{what}: cannot run pasta: {e}")))?,
            )
        }
        None => None,
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    for pipe in [
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
    ]
    .into_iter()
    .flatten()
    {
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(pipe).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
    }
    drop(tx);
    let mut tail: std::collections::VecDeque<String> = Default::default();
    let work = async {
        while let Some(line) = rx.recv().await {
            tracing::info!(target: "marina_runtime::python", "{what}: {line}");
            if tail.len() == 20 {
                tail.pop_front();
            }
            tail.push_back(line);
        }
        child.wait().await
    };
    let status = match tokio::time::timeout(timeout, work).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(env_err(format!("{what}: {e}"))),
        // `child` is dropped on return, and `kill_on_drop` kills it; a sandboxed command leads
        // a process group (setsid) that holds the sandbox, which goes with it.
        Err(_) => {
            if let Some(pid) = pid {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            return Err(env_err(format!(
                "{what} did not finish within {} s",
                timeout.as_secs()
            )));
        }
    };
    if status.success() {
        Ok(())
    } else {
        Err(env_err(format!(
            "{what} failed ({status}):\n{}",
            Vec::from(tail).join("\n")
        )))
    }
}
