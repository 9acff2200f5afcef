//! The Kubernetes objects of one notebook, built from its [`StartSpec`] as server-side-apply
//! manifests (JSON, so they read like the YAML they become).
//!
//! | Object | Name | Notes |
//! |---|---|---|
//! | Pod | `nb-<id>-sail` | `sail spark server` on 50051, gRPC readiness probe |
//! | Service | `nb-<id>-sail` | owned by the Sail pod |
//! | Pod | `nb-<id>-marimo` | `marimo edit` on 2718, `GET <base>/health` readiness probe |
//! | Service | `nb-<id>-marimo` | owned by the Marimo pod; the edge's upstream |
//! | Secret | `nb-<id>-marimo-token` | Marimo's token, owned by the Marimo pod, mounted as a file |
//! | NetworkPolicy | `nb-<id>-sail` | only the notebook's own pods may reach its Sail pods |
//!
//! `<id>` is the notebook id in lower case (object names must be DNS labels). Every object
//! carries the labels of [`labels`], which is how `stop` and the sweep find them, Sail's
//! worker pods included (they get the labels through Sail's worker pod template).

use std::collections::BTreeMap;

use serde_json::{json, Value};

use marina_config::settings::KubernetesSettings;
use marina_config::workload::{EbsConfig, SailConfig};
use marina_config::Id;

use crate::StartSpec;

pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const COMPONENT: &str = "app.kubernetes.io/component";
pub const NOTEBOOK: &str = "marina.dev/notebook";
pub const SESSION: &str = "marina.dev/session";
/// Label selector of everything Marina manages.
pub const MANAGED_SELECTOR: &str = "app.kubernetes.io/managed-by=marina";

pub const SAIL_PORT: u16 = 50051;
pub const MARIMO_PORT: u16 = 2718;
/// Where the token Secret is mounted in the Marimo pod.
const TOKEN_DIR: &str = "/etc/marina/token";
/// The notebook's working directory in the Marimo pod.
const WORK_DIR: &str = "/work";
/// The default notebook baked into the image (`deploy/notebook-image/notebook.py`).
const IMAGE_NOTEBOOK: &str = "/opt/marina/notebook.py";
/// Where an `ebsConfig` volume is mounted (Sail's working directory, for spills and scratch).
const DATA_DIR: &str = "/data";
/// The user of the notebook image.
const IMAGE_UID: i64 = 1000;

pub fn sail_name(id: Id) -> String {
    format!("nb-{}-sail", id.to_lowercase())
}
pub fn marimo_name(id: Id) -> String {
    format!("nb-{}-marimo", id.to_lowercase())
}
pub fn secret_name(id: Id) -> String {
    format!("nb-{}-marimo-token", id.to_lowercase())
}

/// `<marimo service>.<namespace>.svc:2718`, what the edge connects to.
pub fn upstream(id: Id, namespace: &str) -> String {
    format!("{}.{namespace}.svc:{MARIMO_PORT}", marimo_name(id))
}

pub fn labels(id: Id, session: Id, component: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (MANAGED_BY.to_owned(), "marina".to_owned()),
        (COMPONENT.to_owned(), component.to_owned()),
        (NOTEBOOK.to_owned(), id.to_string()),
        (SESSION.to_owned(), session.to_string()),
    ])
}

/// Selector of every object of one notebook (all sessions, all components).
pub fn notebook_selector(id: Id) -> String {
    format!("{MANAGED_SELECTOR},{NOTEBOOK}={id}")
}

/// Whether Sail runs as a driver that starts worker pods (Sail's `kubernetes-cluster` mode).
pub fn cluster_mode(sail: &SailConfig) -> bool {
    sail.execution_mode == "kubernetes-cluster" || sail.compute.worker.max_nodes > 1
}

fn extra_env(sail: &SailConfig) -> Vec<Value> {
    sail.extra_env
        .iter()
        .map(|(k, v)| json!({"name": k, "value": v.value}))
        .collect()
}

/// An ephemeral volume (a PersistentVolumeClaim created and deleted with the pod) for an
/// `ebsConfig`: `volumeSize` GiB, storage class named after `volumeType` (`gp3`), `iops` and
/// `throughput` as the EBS CSI driver's per-claim annotations.
fn ebs_volume(name: &str, ebs: &EbsConfig) -> Value {
    let mut annotations = serde_json::Map::new();
    if let Some(iops) = ebs.iops {
        annotations.insert("ebs.csi.aws.com/iops".into(), json!(iops.to_string()));
    }
    if let Some(t) = ebs.throughput {
        annotations.insert("ebs.csi.aws.com/throughput".into(), json!(t.to_string()));
    }
    json!({
        "name": name,
        "ephemeral": {"volumeClaimTemplate": {
            "metadata": {"annotations": annotations},
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "storageClassName": ebs.volume_type,
                "resources": {"requests": {"storage": format!("{}Gi", ebs.volume_size)}},
            }
        }}
    })
}

fn node_selector(instance_type: Option<&str>, capacity_type: &str) -> Value {
    let mut sel = serde_json::Map::new();
    if let Some(t) = instance_type.filter(|t| !t.is_empty()) {
        sel.insert("node.kubernetes.io/instance-type".into(), json!(t));
    }
    sel.insert("karpenter.sh/capacity-type".into(), json!(capacity_type));
    Value::Object(sel)
}

/// The Sail pod. In local mode it is the only compute and runs on the worker's capacity type;
/// in cluster mode it is the driver, pinned to on-demand capacity (losing it loses every
/// Spark session), and its workers get the worker instance and capacity types through Sail's
/// worker pod template.
pub fn sail_pod(spec: &StartSpec, k: &KubernetesSettings) -> Value {
    let (id, session, sail) = (spec.notebook_id, spec.session_id, &spec.sail);
    let image = sail
        .lakesail_image_uri
        .as_deref()
        .filter(|i| !i.is_empty())
        .unwrap_or(&k.default_sail_image);
    let cluster = cluster_mode(sail);
    let mut env = extra_env(sail);
    env.push(json!({"name": "RUST_LOG", "value": "info"}));
    let capacity = if cluster {
        "on-demand"
    } else {
        sail.compute.worker.capacity_type.as_str()
    };
    if cluster {
        let worker_template = json!({
            "metadata": {"labels": labels(id, session, "sail-worker")},
            "spec": {
                "nodeSelector": node_selector(
                    sail.compute.worker.instance_type.as_deref(),
                    &sail.compute.worker.capacity_type,
                ),
                "automountServiceAccountToken": false,
            }
        });
        let field = |name: &str, path: &str| json!({"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}});
        let val = |name: &str, value: String| json!({"name": name, "value": value});
        env.extend([
            val("SAIL_MODE", "kubernetes-cluster".into()),
            val(
                "SAIL_CLUSTER__WORKER_MAX_COUNT",
                sail.compute.worker.max_nodes.to_string(),
            ),
            val("SAIL_CLUSTER__DRIVER_LISTEN_HOST", "0.0.0.0".into()),
            field("SAIL_CLUSTER__DRIVER_EXTERNAL_HOST", "status.podIP"),
            val("SAIL_KUBERNETES__IMAGE", image.to_owned()),
            val("SAIL_KUBERNETES__NAMESPACE", k.namespace.clone()),
            field("SAIL_KUBERNETES__DRIVER_POD_NAME", "metadata.name"),
            val(
                "SAIL_KUBERNETES__WORKER_SERVICE_ACCOUNT_NAME",
                k.sail_service_account.clone(),
            ),
            val(
                "SAIL_KUBERNETES__WORKER_POD_TEMPLATE",
                worker_template.to_string(),
            ),
        ]);
    }
    let mut container = json!({
        "name": "sail",
        "image": image,
        "command": ["sail", "spark", "server", "--ip", "0.0.0.0", "--port", SAIL_PORT.to_string()],
        "ports": [{"name": "spark-connect", "containerPort": SAIL_PORT}],
        "env": env,
        // Sail implements the gRPC health service (`grpc.health.v1.Health/Check` answers
        // SERVING), so the kubelet can probe it directly.
        "readinessProbe": {"grpc": {"port": SAIL_PORT}, "periodSeconds": 2, "failureThreshold": 3},
    });
    let mut pod_spec = json!({
        "containers": [],
        "nodeSelector": node_selector(sail.compute.driver.instance_type.as_deref(), capacity),
        "securityContext": {"runAsUser": IMAGE_UID, "runAsGroup": IMAGE_UID, "fsGroup": IMAGE_UID},
    });
    if cluster {
        // The driver creates and deletes its worker pods with this account (see rbac.yaml).
        pod_spec["serviceAccountName"] = json!(k.sail_service_account);
    } else {
        pod_spec["automountServiceAccountToken"] = json!(false);
    }
    if let Some(ebs) = &sail.compute.driver.ebs_config {
        pod_spec["volumes"] = json!([ebs_volume("data", ebs)]);
        container["volumeMounts"] = json!([{"name": "data", "mountPath": DATA_DIR}]);
        container["workingDir"] = json!(DATA_DIR);
    }
    pod_spec["containers"] = json!([container]);
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": sail_name(id), "labels": labels(id, session, "sail")},
        "spec": pod_spec,
    })
}

/// The Marimo pod: the notebook server, reaching its Sail server through `SPARK_REMOTE`.
pub fn marimo_pod(spec: &StartSpec, k: &KubernetesSettings) -> Value {
    let (id, session) = (spec.notebook_id, spec.session_id);
    let mut env = extra_env(&spec.sail);
    env.push(json!({
        "name": "SPARK_REMOTE",
        "value": format!("sc://{}.{}.svc:{SAIL_PORT}", sail_name(id), k.namespace),
    }));
    env.push(json!({"name": "MARIMO_SKIP_UPDATE_CHECK", "value": "1"}));
    // The first argument after the script is `$0`; the base URL arguments follow as "$@", so
    // no value is ever interpolated into shell code.
    let script = format!(
        "test -f {WORK_DIR}/notebook.py || cp {IMAGE_NOTEBOOK} {WORK_DIR}/notebook.py; \
         exec marimo -q edit --headless --host 0.0.0.0 --port {MARIMO_PORT} --skip-update-check \
         --token-password-file {TOKEN_DIR}/token \"$@\" {WORK_DIR}/notebook.py"
    );
    let mut command = vec![json!("sh"), json!("-c"), json!(script), json!("marimo")];
    if let Some(base) = &spec.base_url {
        command.push(json!("--base-url"));
        command.push(json!(base));
    }
    let health = format!("{}/health", spec.base_url.as_deref().unwrap_or(""));
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": marimo_name(id), "labels": labels(id, session, "marimo")},
        "spec": {
            // Notebook code must not get Kubernetes credentials.
            "automountServiceAccountToken": false,
            "securityContext": {"runAsUser": IMAGE_UID, "runAsGroup": IMAGE_UID, "fsGroup": IMAGE_UID},
            "containers": [{
                "name": "marimo",
                "image": k.marimo_image,
                "command": command,
                "workingDir": WORK_DIR,
                "ports": [{"name": "http", "containerPort": MARIMO_PORT}],
                "env": env,
                "readinessProbe": {
                    "httpGet": {"path": health, "port": MARIMO_PORT},
                    "periodSeconds": 1,
                    "failureThreshold": 3,
                },
                "volumeMounts": [
                    {"name": "token", "mountPath": TOKEN_DIR, "readOnly": true},
                    {"name": "work", "mountPath": WORK_DIR},
                ],
            }],
            "volumes": [
                // 0440 with fsGroup: readable by the image user, nobody else.
                {"name": "token", "secret": {"secretName": secret_name(id), "defaultMode": 0o440}},
                {"name": "work", "emptyDir": {}},
            ],
        },
    })
}

/// An owner reference to a pod, so the object is garbage-collected with it.
fn owned_by(pod_name: &str, pod_uid: &str) -> Value {
    json!([{
        "apiVersion": "v1",
        "kind": "Pod",
        "name": pod_name,
        "uid": pod_uid,
        "controller": true,
        "blockOwnerDeletion": true,
    }])
}

pub fn service(
    name: &str,
    id: Id,
    session: Id,
    component: &str,
    port: u16,
    owner_uid: &str,
) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "labels": labels(id, session, component),
            "ownerReferences": owned_by(name, owner_uid),
        },
        "spec": {
            // The session label keeps a Service from ever reaching a previous incarnation.
            "selector": {NOTEBOOK: id.to_string(), SESSION: session.to_string(), COMPONENT: component},
            "ports": [{"name": component, "port": port, "targetPort": port}],
        },
    })
}

pub fn token_secret(id: Id, session: Id, token: &str, marimo_uid: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": secret_name(id),
            "labels": labels(id, session, "marimo"),
            "ownerReferences": owned_by(&marimo_name(id), marimo_uid),
        },
        "type": "Opaque",
        "stringData": {"token": token},
    })
}

/// Sail's Spark Connect port has no authentication and lets clients read and write the Sail
/// pod's filesystem, so only the notebook's own pods (its Marimo pod, its Sail driver and
/// workers) may connect to its Sail pods. A pod selected by any NetworkPolicy accepts only
/// what some policy allows, so this one policy closes the Sail pods to everything else.
/// It is created before the Sail pod (so the pod is never reachable unprotected) and hence
/// carries no owner reference: `stop` and the sweep delete it by name and label.
pub fn sail_network_policy(id: Id, session: Id) -> Value {
    json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": sail_name(id), "labels": labels(id, session, "sail")},
        "spec": {
            "podSelector": {
                "matchLabels": {NOTEBOOK: id.to_string()},
                "matchExpressions": [
                    {"key": COMPONENT, "operator": "In", "values": ["sail", "sail-worker"]},
                ],
            },
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": {NOTEBOOK: id.to_string()}}}]}],
        },
    })
}
