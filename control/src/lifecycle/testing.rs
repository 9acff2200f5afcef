//! What the lifecycle's unit tests share: a scratch SQLite store with one organization, its
//! admin and a workload config, a small in-memory [`Runtime`] that records what it was asked
//! and fails or holds on demand, and the service over both.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use marina_config::{Id, Settings};
use marina_runtime::{Busy, Endpoint, Expected, Health, Runtime, RuntimeError, StartSpec};
use tokio::sync::Notify;

use super::Lifecycle;
use crate::metrics::Metrics;
use crate::model::{Notebook, Status};
use crate::store::configs::ConfigFields;
use crate::store::keys::StoredSecret;
use crate::store::notebooks::{self as store, NewNotebook};
use crate::store::{self as db, Db};

/// Why the fake's failing start attempts fail (it ends up in `statusMessage`).
pub(super) const START_FAILURE: &str = "sail exited with status 1";

/// A runtime that provisions nothing: it hands out endpoints and remembers what it "runs".
#[derive(Default)]
pub(super) struct FakeRuntime {
    /// The next N start attempts fail with [`START_FAILURE`].
    pub fail_starts: AtomicU32,
    /// The next N stops fail.
    pub fail_stops: AtomicU32,
    /// While set, a start attempt waits for [`FakeRuntime::release`] before answering.
    pub hold_starts: AtomicBool,
    /// Notified each time a start attempt has begun.
    pub entered: Notify,
    /// Lets one held start attempt answer.
    pub release: Notify,
    /// While set, reconcile fails (the backend is down).
    pub fail_reconcile: AtomicBool,
    /// Every start attempt: (notebook, session, attempt number).
    pub attempts: Mutex<Vec<(Id, Id, u32)>>,
    /// Every stop call, successful or not.
    pub stops: Mutex<Vec<Id>>,
    /// The ids of each reconcile call's `expected`.
    pub reconciled: Mutex<Vec<Vec<Id>>>,
    running: Mutex<HashMap<Id, Endpoint>>,
    /// What `kernel_busy` answers per notebook (`Unknown` when not set); `None`: an error.
    busy: Mutex<HashMap<Id, Option<Busy>>>,
    /// Every `kernel_busy` call.
    pub busy_queries: Mutex<Vec<Id>>,
}

impl FakeRuntime {
    pub fn is_running(&self, id: Id) -> bool {
        self.running.lock().unwrap().contains_key(&id)
    }

    pub fn endpoint(&self, id: Id) -> Option<Endpoint> {
        self.running.lock().unwrap().get(&id).cloned()
    }

    /// Pretends `id` runs at `ep` (as if started before a restart).
    pub fn adopt(&self, id: Id, ep: Endpoint) {
        self.running.lock().unwrap().insert(id, ep);
    }

    /// Forgets `id` without a stop (its servers vanished).
    pub fn vanish(&self, id: Id) {
        self.running.lock().unwrap().remove(&id);
    }

    /// What `kernel_busy` answers for `id` from now on; `None`: a backend error.
    pub fn set_busy(&self, id: Id, answer: Option<Busy>) {
        self.busy.lock().unwrap().insert(id, answer);
    }

    pub fn busy_queries_of(&self, id: Id) -> usize {
        self.busy_queries
            .lock()
            .unwrap()
            .iter()
            .filter(|n| **n == id)
            .count()
    }

    pub fn attempts_of(&self, id: Id) -> Vec<u32> {
        let attempts = self.attempts.lock().unwrap();
        attempts
            .iter()
            .filter(|(n, _, _)| *n == id)
            .map(|(_, _, a)| *a)
            .collect()
    }

    pub fn stops_of(&self, id: Id) -> usize {
        self.stops
            .lock()
            .unwrap()
            .iter()
            .filter(|n| **n == id)
            .count()
    }
}

fn take_one(n: &AtomicU32) -> bool {
    n.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

#[async_trait]
impl Runtime for FakeRuntime {
    fn name(&self) -> &'static str {
        "fake"
    }

    fn isolation(&self) -> &'static str {
        "none"
    }

    async fn prepare(&self) -> Result<(), RuntimeError> {
        Ok(())
    }

    async fn start(&self, spec: &StartSpec) -> Result<Endpoint, RuntimeError> {
        self.attempts
            .lock()
            .unwrap()
            .push((spec.notebook_id, spec.session_id, spec.attempt));
        self.entered.notify_one();
        if self.hold_starts.load(Ordering::SeqCst) {
            self.release.notified().await;
        }
        if take_one(&self.fail_starts) {
            return Err(RuntimeError::StartFailed(format!(
                "{START_FAILURE} (attempt {})",
                spec.attempt
            )));
        }
        let ep = Endpoint {
            upstream: format!("127.0.0.1:{}", 20_000 + spec.attempt),
            token: format!("token-{}", spec.session_id),
        };
        self.adopt(spec.notebook_id, ep.clone());
        Ok(ep)
    }

    async fn stop(&self, id: Id) -> Result<(), RuntimeError> {
        self.stops.lock().unwrap().push(id);
        if take_one(&self.fail_stops) {
            return Err(RuntimeError::Backend("the backend is down".into()));
        }
        self.vanish(id);
        Ok(())
    }

    async fn health(&self, id: Id) -> Result<Health, RuntimeError> {
        Ok(if self.is_running(id) {
            Health::Healthy
        } else {
            Health::Missing
        })
    }

    async fn kernel_busy(&self, id: Id) -> Result<Busy, RuntimeError> {
        self.busy_queries.lock().unwrap().push(id);
        match self.busy.lock().unwrap().get(&id).copied() {
            None => Ok(Busy::Unknown),
            Some(Some(b)) => Ok(b),
            Some(None) => Err(RuntimeError::Backend("the backend is down".into())),
        }
    }

    async fn reconcile(&self, expected: &[Expected]) -> Result<Vec<Id>, RuntimeError> {
        if self.fail_reconcile.load(Ordering::SeqCst) {
            return Err(RuntimeError::Backend("the backend is down".into()));
        }
        let ids: Vec<Id> = expected.iter().map(|e| e.notebook_id).collect();
        self.reconciled.lock().unwrap().push(ids.clone());
        let mut running = self.running.lock().unwrap();
        running.retain(|id, _| ids.contains(id));
        Ok(ids
            .into_iter()
            .filter(|id| running.contains_key(id))
            .collect())
    }
}

/// A database with one organization, its admin and a workload config of `max_retries`
/// start attempts: (db, organization, admin, config).
pub(super) async fn store_fixture(dir: &tempfile::TempDir, max_retries: u32) -> (Db, Id, Id, Id) {
    let url = format!("sqlite:{}", dir.path().join("t.db").display());
    let db = Db::connect(&url, 4).await.expect("connect");
    let secret = StoredSecret {
        hash: "h",
        prefix: "mk_",
    };
    let org = db::orgs::create(&db, "o", "admin", secret, None)
        .await
        .expect("org")
        .expect("created");
    let fields = ConfigFields {
        name: "c".into(),
        workload_type: "notebook".into(),
        cluster_id: None,
        config_json: format!(r#"{{"sail":{{"maxRetries":{max_retries}}}}}"#),
        endpoint_limits_json: "{}".into(),
    };
    let cfg = db::configs::insert(&db, org.organization_id, fields, org.admin_member_id)
        .await
        .expect("config");
    (db, org.organization_id, org.admin_member_id, cfg)
}

/// A new stopped notebook of `owner`.
pub(super) async fn new_notebook(
    db: &Db,
    org: Id,
    owner: Id,
    cfg: Id,
    idle_timeout_seconds: i64,
) -> Id {
    store::insert(
        db,
        NewNotebook {
            org_id: org,
            owner,
            workload_config_id: cfg,
            name: "n".into(),
            description: None,
            idle_timeout_seconds,
            team_ids: Vec::new(),
        },
    )
    .await
    .expect("notebook")
}

/// The service over a scratch store and a [`FakeRuntime`].
pub(super) struct Fixture {
    pub lc: Lifecycle,
    pub rt: Arc<FakeRuntime>,
    pub org: Id,
    pub admin: Id,
    pub cfg: Id,
    _dir: tempfile::TempDir,
}

impl Fixture {
    /// `max_retries` start attempts; `tweak` adjusts the settings.
    pub async fn new(max_retries: u32, tweak: impl FnOnce(&mut Settings)) -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let (db, org, admin, cfg) = store_fixture(&dir, max_retries).await;
        let mut settings = Settings {
            data_dir: dir.path().to_owned(),
            ..Settings::default()
        };
        settings.control.start_timeout_seconds = 5;
        tweak(&mut settings);
        let rt = Arc::new(FakeRuntime::default());
        let lc = Lifecycle::new(
            db,
            rt.clone(),
            settings,
            Arc::new(Metrics::new()),
            Arc::new(Notify::new()),
        );
        Fixture {
            lc,
            rt,
            org,
            admin,
            cfg,
            _dir: dir,
        }
    }

    /// A new stopped notebook.
    pub async fn notebook(&self, idle_timeout_seconds: i64) -> Id {
        new_notebook(
            &self.lc.db,
            self.org,
            self.admin,
            self.cfg,
            idle_timeout_seconds,
        )
        .await
    }

    /// The notebook as the store has it now.
    pub async fn get(&self, id: Id) -> Notebook {
        store::fetch(&self.lc.db, id, 60)
            .await
            .expect("fetch")
            .expect("the notebook exists")
    }

    /// `stopped` → `starting` in a new session, in the store only (no driver); the session.
    pub async fn begin_start(&self, id: Id) -> Id {
        let session = Id::random();
        store::begin_start(&self.lc.db, id, session, self.admin, 60)
            .await
            .expect("begin start")
            .expect("won the start");
        session
    }

    /// The endpoint the store routes `id` to, if it is up.
    pub async fn routed(&self, id: Id) -> Option<Endpoint> {
        store::expected(&self.lc.db, false)
            .await
            .expect("expected")
            .into_iter()
            .find(|e| e.notebook_id == id)
            .and_then(|e| e.endpoint)
    }

    /// Waits (5 s at most) for `id` to be `status`; the notebook then.
    pub async fn wait_for(&self, id: Id, status: Status) -> Notebook {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let nb = self.get(id).await;
            if nb.status == status {
                return nb;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "still {:?}, never {status:?}: {nb:?}",
                nb.status
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
