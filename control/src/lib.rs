//! Marina's control plane: the REST API that creates, shares, starts, stops and opens
//! notebooks, the lifecycle that drives a [`marina_runtime::Runtime`], and the internal API the
//! edge reads its routes from and reports activity to.
//!
//! Layout:
//! - [`api`]: the router and its handlers (`notebooks`, `configs`, `iam`, `internal`, `ops`),
//!   and the generated OpenAPI document.
//! - [`auth`]: API keys (hashed), the member principal extractor, the edge's internal token.
//! - [`limit`]: per-key rate limiting.
//! - [`store`]: the sqlx `Any` pool on SQLite or PostgreSQL, the embedded migrations, and
//!   every query, by table (the only place with SQL).
//! - [`error`]: `ApiError` (the one error shape of the API) and `ControlError`.
//! - [`extract`]: the JSON body, list parameter and path id extractors.
//! - [`lifecycle`]: the state machine, the runtime driver, the monitor, reconciliation.
//! - [`model`]: the API's JSON shapes, field for field as the seed document shows them.
//! - [`state`]: the shared state of the handlers (it holds the lifecycle service).
//! - [`metrics`]: the Prometheus metrics.
//! - [`tokens`]: the Ed25519 URL-token signer and its key files.
//!
//! Architecture invariants: this crate never depends on `marina-proxy` (they share only
//! `marina_config::wire`); every tenancy check is in SQL (a caller never loads another
//! organization's rows); secrets (API keys, the internal token, Marimo tokens, URL tokens) are
//! never logged.
#![forbid(unsafe_code)]

pub mod api;
pub mod auth;
pub mod error;
pub mod extract;
pub mod lifecycle;
pub mod limit;
pub mod metrics;
pub mod model;
pub mod state;
pub mod store;
pub mod tokens;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use marina_config::{Id, Settings};
use marina_runtime::Runtime;

pub use error::{ApiError, ControlError};
pub use state::AppState;

use crate::metrics::Metrics;
use crate::state::Inner;
use crate::store::Db;

/// What the start that found an empty database created.
#[derive(Clone, Debug)]
pub struct Bootstrap {
    /// The file (mode 0600) holding the first admin's API key.
    pub admin_key_file: PathBuf,
    pub organization_id: Id,
    pub admin_member_id: Id,
}

/// The control plane, opened and ready to serve.
pub struct ControlPlane {
    state: AppState,
    bootstrap: Option<Bootstrap>,
}

/// Marker row of the empty-database bootstrap.
const BOOTSTRAP_MARKER: &str = "bootstrap";

impl ControlPlane {
    /// Connects to the DB, migrates, loads/generates keys and the internal token, bootstraps an
    /// empty DB.
    pub async fn open(
        settings: &Settings,
        runtime: Arc<dyn Runtime>,
    ) -> Result<ControlPlane, ControlError> {
        let db = Db::connect(&settings.database_url(), settings.database.max_connections).await?;
        let signer = tokens::Signer::load(settings)?;
        let internal_token = if settings.internal.token.is_empty() {
            let path = settings.data_dir.join("internal-token");
            marina_config::secrets::load_or_create_hex(&path, 32).map_err(|source| {
                ControlError::File {
                    what: "internal token",
                    path,
                    source,
                }
            })?
        } else {
            settings.internal.token.clone()
        };

        let bootstrap = Self::bootstrap_if_empty(&db, settings).await?;
        let metrics = Arc::new(Metrics::new());
        let routes_changed = Arc::new(tokio::sync::Notify::new());
        if db.kind == store::DbKind::Postgres {
            // Other replicas' route changes wake this one's long polls (see store::routes).
            tokio::spawn(store::routes::listen(
                settings.database_url(),
                routes_changed.clone(),
            ));
        }
        let lifecycle = lifecycle::Lifecycle::new(
            db.clone(),
            runtime.clone(),
            settings.clone(),
            metrics.clone(),
            routes_changed.clone(),
        );
        let state = AppState(Arc::new(Inner {
            db,
            settings: settings.clone(),
            runtime,
            signer,
            internal_token,
            limiter: limit::RateLimiter::new(settings.control.rate_limit_per_second),
            metrics,
            routes_changed,
            shutting_down: Default::default(),
            lifecycle,
        }));
        Ok(ControlPlane { state, bootstrap })
    }

    async fn bootstrap_if_empty(
        db: &Db,
        settings: &Settings,
    ) -> Result<Option<Bootstrap>, ControlError> {
        if store::orgs::count(db).await? > 0 {
            return Ok(None);
        }
        let Some(new) = create_organization(db, "default", "admin", Some(BOOTSTRAP_MARKER)).await?
        else {
            return Ok(None);
        };
        let path = settings.data_dir.join("admin-api-key");
        marina_config::secrets::write_private(&path, format!("{}\n", new.admin_key).as_bytes())
            .map_err(|source| ControlError::File {
                what: "admin API key",
                path: path.clone(),
                source,
            })?;
        Ok(Some(Bootstrap {
            admin_key_file: path,
            organization_id: new.organization_id,
            admin_member_id: new.admin_member_id,
        }))
    }

    /// Set on the start that created the first admin: where the key file is.
    pub fn bootstrap(&self) -> Option<&Bootstrap> {
        self.bootstrap.as_ref()
    }

    /// The shared state (for tests and embedding).
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// The full router (public API, internal API, metrics, openapi, optional host page).
    pub fn router(&self) -> axum::Router {
        api::router(self.state.clone())
    }

    /// Reconciles with the runtime, then runs the lifecycle monitor in the background; stops
    /// it when the returned guard is dropped. [`ControlPlane::serve`] does this itself; use
    /// this when serving the router some other way.
    pub async fn start_background(&self) -> BackgroundGuard {
        let (tx, rx) = tokio::sync::watch::channel(false);
        let state = self.state.clone();
        // Reconcile only as the monitor's leaseholder: with several control replicas, one of
        // them settles the store, not all at once.
        let lease_ms = (state.settings.control.monitor_interval_ms as i64 * 5).max(2000);
        match state
            .db
            .try_lease("monitor", &state.lifecycle.instance_id, lease_ms)
            .await
        {
            Ok(true) => {
                if let Err(e) = state.lifecycle.reconcile_at_start().await {
                    tracing::error!(error = %e, "reconciling with the runtime at start-up");
                }
            }
            Ok(false) => tracing::info!("another control replica runs the monitor"),
            Err(e) => tracing::warn!(error = %e, "monitor lease"),
        }
        let task = tokio::spawn(state.lifecycle.clone().run_monitor(rx));
        BackgroundGuard {
            stop: Some(tx),
            task: Some(task),
            lifecycle: state.lifecycle.clone(),
        }
    }

    /// Serves on `listener` and runs the lifecycle driver/monitor until `shutdown` resolves.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ControlError> {
        let mut background = self.start_background().await;
        let router = self.router();
        let state = self.state.clone();
        let shutdown = async move {
            shutdown.await;
            state.begin_shutdown();
        };
        let result = axum::serve(listener, router)
            .with_graceful_shutdown(shutdown)
            .await
            .map_err(ControlError::Serve);
        background.stop().await;
        result
    }

    /// Admin CLI: a new API key for `member` (or the first admin when None); returns the secret.
    pub async fn create_api_key(
        &self,
        member: Option<Id>,
        name: &str,
    ) -> Result<String, ControlError> {
        let db = &self.state.db;
        let member = match member {
            Some(m) => {
                if !store::members::exists_anywhere(db, m).await? {
                    return Err(ControlError::NoSuchMember(m));
                }
                m
            }
            None => {
                let first = store::members::first_admin(db)
                    .await?
                    .ok_or(ControlError::NoAdmin)?;
                Id::parse(&first).map_err(|_| ControlError::NoAdmin)?
            }
        };
        let (_, secret) = auth::issue_key(db, member, name, None).await?;
        Ok(secret)
    }

    /// Creates another organization with its first admin; returns (organization, admin, the
    /// admin's API key secret). For the admin CLI and multi-tenant tests.
    pub async fn create_organization(
        &self,
        name: &str,
        admin_name: &str,
    ) -> Result<(Id, Id, String), ControlError> {
        let new = create_organization(&self.state.db, name, admin_name, None)
            .await?
            .ok_or(ControlError::NoAdmin)?;
        Ok((new.organization_id, new.admin_member_id, new.admin_key))
    }
}

/// A new organization with one admin member and an API key for him.
struct NewOrganization {
    organization_id: Id,
    admin_member_id: Id,
    admin_key: String,
}

/// Creates an organization, its first admin and his key; with `once`, only if that marker
/// was never set (see [`store::orgs::create`]).
async fn create_organization(
    db: &Db,
    name: &str,
    admin_name: &str,
    once: Option<&str>,
) -> Result<Option<NewOrganization>, ControlError> {
    let secret = auth::new_secret();
    let hash = auth::hash_secret(&secret);
    let prefix = auth::secret_prefix(&secret);
    let stored = store::keys::StoredSecret {
        hash: &hash,
        prefix: &prefix,
    };
    Ok(store::orgs::create(db, name, admin_name, stored, once)
        .await?
        .map(|o| NewOrganization {
            organization_id: o.organization_id,
            admin_member_id: o.admin_member_id,
            admin_key: secret,
        }))
}

/// Stops the background monitor when dropped or when [`BackgroundGuard::stop`] is awaited.
pub struct BackgroundGuard {
    stop: Option<tokio::sync::watch::Sender<bool>>,
    task: Option<tokio::task::JoinHandle<()>>,
    lifecycle: lifecycle::Lifecycle,
}

/// How long a graceful shutdown waits for this process's start and stop tasks.
const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

impl BackgroundGuard {
    /// Signals the monitor and waits for it to finish its current tick, then lets the
    /// in-flight starts and stops finish (within [`DRAIN_TIMEOUT`]) and gives the monitor
    /// lease up, so a successor takes over (and reconciles) at once.
    pub async fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(true);
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
            let left = self.lifecycle.drain(DRAIN_TIMEOUT).await;
            if left > 0 {
                tracing::warn!(
                    left,
                    "shutting down with lifecycle tasks unfinished; the next monitor drives them again"
                );
            }
            let lc = &self.lifecycle;
            if let Err(e) = lc.db.release_lease("monitor", &lc.instance_id).await {
                tracing::warn!(error = %e, "releasing the monitor lease");
            }
        }
    }
}

impl Drop for BackgroundGuard {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(true);
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}
