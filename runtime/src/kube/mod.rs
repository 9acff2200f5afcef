//! The Kubernetes runtime: each notebook is a Sail pod and a Marimo pod, each with a Service,
//! in `runtime.kubernetes.namespace` (see [`objects`] for the manifests and
//! `docs/runtimes.md` for the workload-config mapping and RBAC).
//!
//! - Objects are created with server-side apply (field manager `marina`), so repeating a call
//!   is harmless. Pods are immutable, so a start first removes any pod of the notebook left
//!   by an earlier incarnation, and every start creates fresh pods.
//! - Order: the NetworkPolicy closing the Sail pods to all but the notebook's own pods, the
//!   Sail pod, its Service (owned by the pod), Marimo pod, its token Secret and
//!   Service (owned by the Marimo pod). The kubelet keeps the Marimo pod in `ContainerCreating`
//!   until the Secret it mounts exists, so creating the Secret after the pod is safe, and lets
//!   the pod own it.
//! - `start` polls both pods until they are `Ready`; a reason that will not resolve (image pull
//!   errors, crash loops, lasting unschedulability) fails the attempt with that reason.
//! - `stop` deletes every pod labelled with the notebook (Sail's worker pods included),
//!   the Services, the Secret and the NetworkPolicy, and waits until the pods are gone.
//! - `reconcile` is a sweep: objects whose notebook/session the store does not expect are
//!   deleted, expected notebooks whose pods are ready are adopted.

pub mod objects;
pub mod status;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use ::kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use ::kube::Client;
use async_trait::async_trait;
use k8s_openapi::api::core::v1::{Pod, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use marina_config::settings::KubernetesSettings;
use marina_config::{Id, Settings};
use serde_json::Value;

use crate::{Endpoint, Expected, Health, Runtime, RuntimeError, StartSpec};
use objects::{marimo_name, sail_name, secret_name};
use status::{classify, PodState};

/// Field manager of every server-side apply.
pub const FIELD_MANAGER: &str = "marina";

/// Runs notebooks as pods. See the module documentation.
pub struct KubeRuntime {
    client: Client,
    settings: KubernetesSettings,
    /// Bound of one start when the caller does not cut it shorter.
    start_timeout: Duration,
    /// How often pod status is read while waiting.
    poll_interval: Duration,
    /// How long a pod may stay unschedulable before a start fails (see [`status::classify`]).
    unschedulable_grace: Duration,
    /// How long `stop` waits for pods to disappear.
    stop_timeout: Duration,
}

fn backend(what: &str, e: ::kube::Error) -> RuntimeError {
    RuntimeError::Backend(format!("{what}: {e}"))
}

fn is_not_found(e: &::kube::Error) -> bool {
    matches!(e, ::kube::Error::Api(s) if s.code == 404)
}

// === impl KubeRuntime ===

impl KubeRuntime {
    /// Connects with the inferred configuration: in-cluster service account, else kubeconfig.
    pub async fn new(settings: &Settings) -> Result<KubeRuntime, RuntimeError> {
        let client = Client::try_default().await.map_err(|e| {
            RuntimeError::Backend(format!(
                "no Kubernetes configuration (in-cluster service account or kubeconfig): {e}"
            ))
        })?;
        Ok(Self::with_client(client, settings))
    }

    /// Uses `client` (a test's mock service, or a custom configuration).
    pub fn with_client(client: Client, settings: &Settings) -> KubeRuntime {
        KubeRuntime {
            client,
            settings: settings.runtime.kubernetes.clone(),
            start_timeout: Duration::from_secs(settings.control.start_timeout_seconds.max(1)),
            poll_interval: Duration::from_secs(1),
            unschedulable_grace: Duration::from_secs(90),
            stop_timeout: Duration::from_secs(60),
        }
    }

    /// Changes the polling interval (tests use a short one).
    pub fn with_poll_interval(mut self, every: Duration) -> KubeRuntime {
        self.poll_interval = every;
        self
    }

    /// Changes how long a pod may stay unschedulable before a start fails. The default, 90 s,
    /// leaves a node autoscaler time to add a node.
    pub fn with_unschedulable_grace(mut self, grace: Duration) -> KubeRuntime {
        self.unschedulable_grace = grace;
        self
    }

    fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.settings.namespace)
    }
    fn services(&self) -> Api<Service> {
        Api::namespaced(self.client.clone(), &self.settings.namespace)
    }
    fn secrets(&self) -> Api<Secret> {
        Api::namespaced(self.client.clone(), &self.settings.namespace)
    }
    fn policies(&self) -> Api<NetworkPolicy> {
        Api::namespaced(self.client.clone(), &self.settings.namespace)
    }

    fn apply_params() -> PatchParams {
        // `force`: Marina is the only writer of these objects; take over any field another
        // manager may have touched instead of failing with a conflict.
        PatchParams::apply(FIELD_MANAGER).force()
    }

    /// Applies a pod and returns its uid (for owner references).
    async fn apply_pod(&self, manifest: &Value) -> Result<String, RuntimeError> {
        let name = manifest["metadata"]["name"].as_str().unwrap_or_default();
        let pod = self
            .pods()
            .patch(name, &Self::apply_params(), &Patch::Apply(manifest))
            .await
            .map_err(|e| RuntimeError::StartFailed(format!("creating pod {name}: {e}")))?;
        pod.metadata
            .uid
            .ok_or_else(|| RuntimeError::Backend(format!("pod {name} has no uid")))
    }

    async fn apply_service(&self, manifest: &Value) -> Result<(), RuntimeError> {
        let name = manifest["metadata"]["name"].as_str().unwrap_or_default();
        self.services()
            .patch(name, &Self::apply_params(), &Patch::Apply(manifest))
            .await
            .map_err(|e| RuntimeError::StartFailed(format!("creating service {name}: {e}")))?;
        Ok(())
    }

    async fn get_pod(&self, name: &str) -> Result<Option<Pod>, RuntimeError> {
        self.pods()
            .get_opt(name)
            .await
            .map_err(|e| backend(&format!("reading pod {name}"), e))
    }

    /// Deletes one object by name; already gone is fine.
    async fn delete_named<K>(&self, api: &Api<K>, name: &str) -> Result<(), RuntimeError>
    where
        K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    {
        match api.delete(name, &DeleteParams::default()).await {
            Ok(_) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(backend(&format!("deleting {name}"), e)),
        }
    }

    /// Deletes every object of notebook `id` whose labels match `selector`.
    async fn delete_objects(&self, id: Id, selector: &str) -> Result<(), RuntimeError> {
        let lp = ListParams::default().labels(selector);
        self.pods()
            .delete_collection(&DeleteParams::default(), &lp)
            .await
            .map_err(|e| backend(&format!("deleting the pods of {id}"), e))?;
        // Services and the Secret are owned by the pods and would be garbage-collected with
        // them; deleting them explicitly makes `stop` complete without relying on the GC.
        for name in [sail_name(id), marimo_name(id)] {
            self.delete_named(&self.services(), &name).await?;
        }
        self.delete_named(&self.secrets(), &secret_name(id)).await?;
        // Deleted last: the Sail pods it protects are already going.
        self.delete_named(&self.policies(), &sail_name(id)).await
    }

    async fn state_of(&self, name: &str) -> Result<Option<PodState>, RuntimeError> {
        Ok(self
            .get_pod(name)
            .await?
            .map(|p| classify(&p, self.unschedulable_grace)))
    }

    async fn wait_ready(&self, id: Id) -> Result<(), RuntimeError> {
        let deadline = Instant::now() + self.start_timeout;
        loop {
            let mut waiting = Vec::new();
            for name in [sail_name(id), marimo_name(id)] {
                match self.state_of(&name).await? {
                    Some(PodState::Ready) => {}
                    Some(PodState::Waiting(why)) => waiting.push(why),
                    Some(PodState::Failed(why)) => return Err(RuntimeError::StartFailed(why)),
                    None => {
                        return Err(RuntimeError::StartFailed(format!(
                            "pod {name} disappeared while starting"
                        )))
                    }
                }
            }
            if waiting.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(RuntimeError::StartFailed(format!(
                    "not ready after {} s: {}",
                    self.start_timeout.as_secs(),
                    waiting.join("; ")
                )));
            }
            tokio::time::sleep(self.poll_interval).await;
        }
    }

    async fn start_inner(&self, spec: &StartSpec) -> Result<Endpoint, RuntimeError> {
        let id = spec.notebook_id;
        if let Some(base) = &spec.base_url {
            if !base.starts_with('/') || base.ends_with('/') || base.contains(char::is_whitespace) {
                return Err(RuntimeError::StartFailed(format!(
                    "base URL {base:?} must start with / and not end with /"
                )));
            }
        }
        // Pods cannot be updated in place: anything left of an earlier incarnation goes first.
        let lp = ListParams::default().labels(&objects::notebook_selector(id));
        let existing = self
            .pods()
            .list(&lp)
            .await
            .map_err(|e| backend("listing pods", e))?;
        if !existing.items.is_empty() {
            self.stop(id).await?;
        }

        let token = random_token();
        let policy = objects::sail_network_policy(id, spec.session_id);
        self.policies()
            .patch(
                &sail_name(id),
                &Self::apply_params(),
                &Patch::Apply(&policy),
            )
            .await
            .map_err(|e| RuntimeError::StartFailed(format!("creating the network policy: {e}")))?;
        let sail_uid = self
            .apply_pod(&objects::sail_pod(spec, &self.settings))
            .await?;
        self.apply_service(&objects::service(
            &sail_name(id),
            id,
            spec.session_id,
            "sail",
            objects::SAIL_PORT,
            &sail_uid,
        ))
        .await?;
        let marimo_uid = self
            .apply_pod(&objects::marimo_pod(spec, &self.settings))
            .await?;
        let secret = objects::token_secret(id, spec.session_id, &token, &marimo_uid);
        self.secrets()
            .patch(
                &secret_name(id),
                &Self::apply_params(),
                &Patch::Apply(&secret),
            )
            .await
            // The error names the object, never its content.
            .map_err(|e| RuntimeError::StartFailed(format!("creating the token secret: {e}")))?;
        self.apply_service(&objects::service(
            &marimo_name(id),
            id,
            spec.session_id,
            "marimo",
            objects::MARIMO_PORT,
            &marimo_uid,
        ))
        .await?;
        self.wait_ready(id).await?;
        Ok(Endpoint {
            upstream: objects::upstream(id, &self.settings.namespace),
            token,
        })
    }
}

fn random_token() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The notebook and session labels of an object, when both parse.
fn owner_labels(labels: Option<&BTreeMap<String, String>>) -> Option<(Id, Option<Id>)> {
    let labels = labels?;
    let id = Id::parse(labels.get(objects::NOTEBOOK)?).ok()?;
    let session = labels.get(objects::SESSION).and_then(|s| Id::parse(s).ok());
    Some((id, session))
}

#[async_trait]
impl Runtime for KubeRuntime {
    fn name(&self) -> &'static str {
        "kubernetes"
    }

    fn isolation(&self) -> &'static str {
        "kubernetes"
    }

    /// Nothing to prepare: images are pulled by the kubelets.
    async fn prepare(&self) -> Result<(), RuntimeError> {
        Ok(())
    }

    async fn start(&self, spec: &StartSpec) -> Result<Endpoint, RuntimeError> {
        let result = self.start_inner(spec).await;
        if let Err(e) = &result {
            tracing::warn!(notebook = %spec.notebook_id, attempt = spec.attempt, "start failed: {e}");
        }
        result
    }

    async fn stop(&self, notebook_id: Id) -> Result<(), RuntimeError> {
        let selector = objects::notebook_selector(notebook_id);
        self.delete_objects(notebook_id, &selector).await?;
        let lp = ListParams::default().labels(&selector);
        let deadline = Instant::now() + self.stop_timeout;
        loop {
            let left = self
                .pods()
                .list(&lp)
                .await
                .map_err(|e| backend("listing pods", e))?;
            if left.items.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                let names: Vec<_> = left
                    .items
                    .iter()
                    .filter_map(|p| p.metadata.name.clone())
                    .collect();
                return Err(RuntimeError::Backend(format!(
                    "pods still terminating after {} s: {}",
                    self.stop_timeout.as_secs(),
                    names.join(", ")
                )));
            }
            tokio::time::sleep(self.poll_interval).await;
        }
    }

    async fn health(&self, notebook_id: Id) -> Result<Health, RuntimeError> {
        let sail = self.state_of(&sail_name(notebook_id)).await?;
        let marimo = self.state_of(&marimo_name(notebook_id)).await?;
        Ok(match (sail, marimo) {
            (None, None) => Health::Missing,
            (None, Some(_)) => Health::Failed("the Sail pod is gone".into()),
            (Some(_), None) => Health::Failed("the Marimo pod is gone".into()),
            (Some(PodState::Failed(why)), _) | (_, Some(PodState::Failed(why))) => {
                Health::Failed(why)
            }
            (Some(PodState::Ready), Some(PodState::Ready)) => Health::Healthy,
            _ => Health::Pending,
        })
    }

    async fn reconcile(&self, expected: &[Expected]) -> Result<Vec<Id>, RuntimeError> {
        let wanted: BTreeSet<(Id, Id)> = expected
            .iter()
            .map(|e| (e.notebook_id, e.session_id))
            .collect();
        let lp = ListParams::default().labels(objects::MANAGED_SELECTOR);
        let pods = self
            .pods()
            .list(&lp)
            .await
            .map_err(|e| backend("listing pods", e))?;
        let services = self
            .services()
            .list(&lp)
            .await
            .map_err(|e| backend("listing services", e))?;
        let secrets = self
            .secrets()
            .list(&lp)
            .await
            .map_err(|e| backend("listing secrets", e))?;
        let policies = self
            .policies()
            .list(&lp)
            .await
            .map_err(|e| backend("listing network policies", e))?;

        // Unexpected (notebook, session) pairs, from every kind of object.
        let mut stray: BTreeSet<(Id, Option<Id>)> = BTreeSet::new();
        let labels_of = pods
            .items
            .iter()
            .map(|p| p.metadata.labels.as_ref())
            .chain(services.items.iter().map(|s| s.metadata.labels.as_ref()))
            .chain(secrets.items.iter().map(|s| s.metadata.labels.as_ref()))
            .chain(policies.items.iter().map(|s| s.metadata.labels.as_ref()));
        for labels in labels_of {
            if let Some((id, session)) = owner_labels(labels) {
                if !session.is_some_and(|s| wanted.contains(&(id, s))) {
                    stray.insert((id, session));
                }
            }
        }
        for (id, session) in &stray {
            let selector = match session {
                Some(s) => format!(
                    "{},{}={s}",
                    objects::notebook_selector(*id),
                    objects::SESSION
                ),
                None => objects::notebook_selector(*id),
            };
            tracing::info!(notebook = %id, "sweeping objects the store does not expect");
            self.pods()
                .delete_collection(
                    &DeleteParams::default(),
                    &ListParams::default().labels(&selector),
                )
                .await
                .map_err(|e| backend(&format!("sweeping the pods of {id}"), e))?;
            // Services and Secrets are deleted only when they belong to the stray session:
            // an expected new session of the same notebook uses the same names.
            for s in &services.items {
                if owner_labels(s.metadata.labels.as_ref()) == Some((*id, *session)) {
                    if let Some(name) = &s.metadata.name {
                        self.delete_named(&self.services(), name).await?;
                    }
                }
            }
            for s in &secrets.items {
                if owner_labels(s.metadata.labels.as_ref()) == Some((*id, *session)) {
                    if let Some(name) = &s.metadata.name {
                        self.delete_named(&self.secrets(), name).await?;
                    }
                }
            }
            for p in &policies.items {
                if owner_labels(p.metadata.labels.as_ref()) == Some((*id, *session)) {
                    if let Some(name) = &p.metadata.name {
                        self.delete_named(&self.policies(), name).await?;
                    }
                }
            }
        }

        // Adopted: expected notebooks whose Sail and Marimo pods of that session are ready.
        let mut adopted = Vec::new();
        for e in expected {
            let ready = |name: String| {
                pods.items.iter().any(|p| {
                    p.metadata.name.as_deref() == Some(name.as_str())
                        && owner_labels(p.metadata.labels.as_ref())
                            == Some((e.notebook_id, Some(e.session_id)))
                        && classify(p, self.unschedulable_grace) == PodState::Ready
                })
            };
            if ready(sail_name(e.notebook_id)) && ready(marimo_name(e.notebook_id)) {
                adopted.push(e.notebook_id);
            }
        }
        Ok(adopted)
    }
}
