//! Runtimes: how a notebook's Sail (Spark Connect) server and Marimo server come to exist.
//!
//! The control plane owns the lifecycle state machine (`stopped → starting → running → …`) and
//! the retries; a [`Runtime`] only does one provisioning attempt at a time, tears down, checks
//! health and reconciles.
//!
//! Layout:
//! - [`local`]: [`local::LocalRuntime`], each notebook as two child processes (Sail, Marimo)
//!   from one shared virtualenv; the embedded default of `marina serve`.
//!   - `local::env`: creating the pinned Python environment, with progress.
//!   - `local::process`: process groups, their identity across restarts, teardown.
//!   - `local::files`: the per-notebook directory (notebook file, logs, `run.json`).
//! - [`kube`]: [`kube::KubeRuntime`], each notebook as a Sail pod and a Marimo pod with their
//!   Services in one namespace.
//!   - `kube::objects`: the pod, Service and Secret manifests built from the workload config.
//!   - `kube::status`: reading pod status into ready / waiting / failed-with-a-reason.
#![forbid(unsafe_code)]

mod kernel;
pub mod kube;
pub mod local;

use async_trait::async_trait;
use marina_config::workload::SailConfig;
use marina_config::Id;

/// What to provision.
#[derive(Clone, Debug)]
pub struct StartSpec {
    pub notebook_id: Id,
    /// New on every start; lets a runtime tell one incarnation from the next.
    pub session_id: Id,
    pub sail: SailConfig,
    /// Marimo's `--base-url` (path mode), e.g. `/notebooks/A1B2C3D4E5`.
    pub base_url: Option<String>,
    /// 1 for the first attempt of this start.
    pub attempt: u32,
}

/// Where a started notebook's Marimo server answers, and the credential it wants.
/// `Debug` masks the token, so logging an endpoint never logs the credential.
#[derive(Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `host:port` of the Marimo server.
    pub upstream: String,
    /// Marimo's token; sent upstream as `Authorization: Bearer` by the edge only.
    pub token: String,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("upstream", &self.upstream)
            .field("token", &"***")
            .finish()
    }
}

/// A notebook the store believes is provisioned.
#[derive(Clone, Debug)]
pub struct Expected {
    pub notebook_id: Id,
    pub session_id: Id,
    pub endpoint: Option<Endpoint>,
}

/// Health of a provisioned notebook.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Health {
    /// Both servers answer their health checks.
    Healthy,
    /// Still coming up (pods pending, process not listening yet).
    Pending,
    /// It is gone or broken for good; the message says why (exit status, log tail, reason).
    Failed(String),
    /// Nothing is provisioned for this notebook.
    Missing,
}

/// Whether a notebook's kernel is executing, as its Marimo server reports it
/// (`GET /api/kernel/status` of each of its sessions; see docs/runtimes.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Busy {
    /// At least one cell of some session is queued or running.
    Running,
    /// Marimo answered and nothing is queued or running.
    Idle,
    /// The runtime cannot tell (not implemented, not reachable).
    Unknown,
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The Python environment (local) could not be prepared.
    #[error("environment: {0}")]
    Environment(String),
    /// This attempt failed; the message is for the notebook's `statusMessage`.
    #[error("{0}")]
    StartFailed(String),
    /// The backing system (process table, Kubernetes API) failed.
    #[error("runtime backend: {0}")]
    Backend(String),
}

/// One way of running notebooks. Implementations must be idempotent: `start` after a crashed
/// attempt, `stop` of something already gone, and `reconcile` at any time are all safe.
#[async_trait]
pub trait Runtime: Send + Sync + 'static {
    /// A short name for logs and metrics (`local`, `kubernetes`).
    fn name(&self) -> &'static str;

    /// How notebook code is isolated from Marina and from other notebooks: `bubblewrap`
    /// (the local sandbox), `kubernetes` (pods), or `none` (the local runtime's explicit
    /// single-user opt-out). Shown on the host page and in logs.
    fn isolation(&self) -> &'static str;

    /// Prepares what every notebook needs (the local Python environment). May take minutes on
    /// first use and reports progress through `tracing`; later calls return at once.
    async fn prepare(&self) -> Result<(), RuntimeError>;

    /// One provisioning attempt: provision both servers and return once both answer their
    /// health checks. The caller bounds it with the start timeout and calls [`Runtime::stop`]
    /// after a failure or timeout, before retrying.
    async fn start(&self, spec: &StartSpec) -> Result<Endpoint, RuntimeError>;

    /// Tears down everything of this notebook (process trees, pods, services, Sail workers).
    /// Returns once it is gone. Stopping what does not exist is not an error.
    async fn stop(&self, notebook_id: Id) -> Result<(), RuntimeError>;

    /// Health of a provisioned notebook, checked periodically while it is running.
    async fn health(&self, notebook_id: Id) -> Result<Health, RuntimeError>;

    /// Makes what runs match `expected`: tears down anything this runtime manages that is not
    /// expected (orphans after a crash, leftovers of deleted notebooks) and returns the ids of
    /// the expected notebooks that are alive and adopted. Called at start-up and periodically.
    async fn reconcile(&self, expected: &[Expected]) -> Result<Vec<Id>, RuntimeError>;

    /// Whether the notebook's kernel is running cells now. Asked only for a notebook the
    /// control plane is about to stop for idleness, so it may make a network call; it should
    /// answer within a couple of seconds. A runtime that cannot tell answers `Unknown`.
    async fn kernel_busy(&self, _notebook_id: Id) -> Result<Busy, RuntimeError> {
        Ok(Busy::Unknown)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_debug_hides_the_token() {
        let e = Endpoint {
            upstream: "127.0.0.1:1".into(),
            token: "s3cret".into(),
        };
        let shown = format!("{e:?}");
        assert!(
            shown.contains("127.0.0.1:1") && !shown.contains("s3cret"),
            "{shown}"
        );
    }
}
