//! The Kubernetes runtime against a fake API server. There is no cluster here, so kube's
//! `tower-test` mock service stands in for one: [`FakeApi`] answers the requests the runtime
//! sends (server-side apply, get, list, delete, delete-collection) from an in-memory object
//! store, records every request for assertions, and reports pod status as each test scripts
//! it. What this cannot show: a real kubelet, scheduler, image pulls, probes or garbage
//! collection (see docs/runtimes.md).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use marina_config::workload::SailConfig;
use marina_config::{Id, Settings};
use marina_runtime::kube::KubeRuntime;
use marina_runtime::{Expected, Health, Runtime, RuntimeError, StartSpec};
use serde_json::{json, Value};

const NS: &str = "marina-notebooks";

#[derive(Clone, Debug)]
struct Recorded {
    method: Method,
    path: String,
    query: String,
    body: Value,
}

#[derive(Default)]
struct State {
    /// kind ("pods", "services", "secrets") → name → object.
    objects: BTreeMap<String, BTreeMap<String, Value>>,
    /// Status to report for a pod, by name.
    pod_status: BTreeMap<String, Value>,
    requests: Vec<Recorded>,
}

#[derive(Clone, Default)]
struct FakeApi(Arc<Mutex<State>>);

fn matches_selector(obj: &Value, selector: &str) -> bool {
    selector.split(',').filter(|s| !s.is_empty()).all(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        obj["metadata"]["labels"][k] == v
    })
}

fn query_param(query: &str, key: &str) -> Option<String> {
    url::form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
}

fn not_found(name: &str) -> (StatusCode, Value) {
    (
        StatusCode::NOT_FOUND,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": format!("{name} not found"), "reason": "NotFound", "code": 404}),
    )
}

impl FakeApi {
    /// A runtime whose client talks to this fake.
    fn runtime(&self, settings: &Settings) -> KubeRuntime {
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let api = self.clone();
        tokio::spawn(async move {
            let mut handle = std::pin::pin!(handle);
            while let Some((req, send)) = handle.next_request().await {
                let (parts, body) = req.into_parts();
                let bytes = body.collect_bytes().await.unwrap_or_default();
                let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                let (status, json) = api.respond(
                    parts.method.clone(),
                    parts.uri.path(),
                    parts.uri.query().unwrap_or(""),
                    body,
                );
                send.send_response(
                    Response::builder()
                        .status(status)
                        .header("content-type", "application/json")
                        .body(Body::from(serde_json::to_vec(&json).unwrap()))
                        .unwrap(),
                );
            }
        });
        let client = kube::Client::new(service, NS);
        KubeRuntime::with_client(client, settings)
            .with_poll_interval(Duration::from_millis(10))
            .with_unschedulable_grace(Duration::ZERO)
    }

    fn set_pod_status(&self, name: &str, status: Value) {
        self.0
            .lock()
            .unwrap()
            .pod_status
            .insert(name.into(), status);
    }

    fn requests(&self) -> Vec<Recorded> {
        self.0.lock().unwrap().requests.clone()
    }

    fn clear_requests(&self) {
        self.0.lock().unwrap().requests.clear();
    }

    fn names(&self, kind: &str) -> Vec<String> {
        let s = self.0.lock().unwrap();
        s.objects
            .get(kind)
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }

    fn object(&self, kind: &str, name: &str) -> Value {
        self.0.lock().unwrap().objects[kind][name].clone()
    }

    fn with_status(state: &State, kind: &str, mut obj: Value) -> Value {
        if kind == "pods" {
            let name = obj["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            obj["status"] = state
                .pod_status
                .get(&name)
                .cloned()
                .unwrap_or(json!({"phase": "Pending"}));
        }
        obj
    }

    fn respond(&self, method: Method, path: &str, query: &str, body: Value) -> (StatusCode, Value) {
        let mut s = self.0.lock().unwrap();
        s.requests.push(Recorded {
            method: method.clone(),
            path: path.to_owned(),
            query: query.to_owned(),
            body: body.clone(),
        });
        let core = format!("/api/v1/namespaces/{NS}/");
        let networking = format!("/apis/networking.k8s.io/v1/namespaces/{NS}/");
        let Some(rest) = path
            .strip_prefix(&core)
            .or_else(|| path.strip_prefix(&networking))
        else {
            return not_found(path);
        };
        let (kind, name) = match rest.split_once('/') {
            Some((k, n)) => (k.to_owned(), Some(n.to_owned())),
            None => (rest.to_owned(), None),
        };
        let selector = query_param(query, "labelSelector").unwrap_or_default();
        let is_delete = method == Method::DELETE;
        match (method, name) {
            (Method::PATCH, Some(name)) => {
                let mut obj = body;
                obj["metadata"]["uid"] = json!(format!("uid-{name}"));
                obj["metadata"]["namespace"] = json!(NS);
                s.objects
                    .entry(kind.clone())
                    .or_default()
                    .insert(name, obj.clone());
                (StatusCode::OK, Self::with_status(&s, &kind, obj))
            }
            (Method::GET, Some(name)) => match s.objects.get(&kind).and_then(|m| m.get(&name)) {
                Some(obj) => (StatusCode::OK, Self::with_status(&s, &kind, obj.clone())),
                None => not_found(&name),
            },
            (Method::DELETE, Some(name)) => {
                match s.objects.get_mut(&kind).and_then(|m| m.remove(&name)) {
                    Some(obj) => (StatusCode::OK, obj),
                    None => not_found(&name),
                }
            }
            (Method::GET, None) | (Method::DELETE, None) => {
                let matching: Vec<String> = s
                    .objects
                    .get(&kind)
                    .map(|m| {
                        m.iter()
                            .filter(|(_, o)| matches_selector(o, &selector))
                            .map(|(n, _)| n.clone())
                            .collect()
                    })
                    .unwrap_or_default();
                let items: Vec<Value> = matching
                    .iter()
                    .map(|n| Self::with_status(&s, &kind, s.objects[&kind][n].clone()))
                    .collect();
                if is_delete {
                    if let Some(m) = s.objects.get_mut(&kind) {
                        for n in &matching {
                            m.remove(n);
                        }
                    }
                }
                let list_kind = match kind.as_str() {
                    "pods" => "PodList",
                    "services" => "ServiceList",
                    "networkpolicies" => "NetworkPolicyList",
                    _ => "SecretList",
                };
                (
                    StatusCode::OK,
                    json!({"apiVersion": "v1", "kind": list_kind, "metadata": {"resourceVersion": "1"}, "items": items}),
                )
            }
            _ => not_found(path),
        }
    }
}

fn ready() -> Value {
    json!({"phase": "Running", "conditions": [
        {"type": "PodScheduled", "status": "True"},
        {"type": "Ready", "status": "True"},
    ]})
}

fn waiting(container: &str, reason: &str, message: &str) -> Value {
    json!({"phase": "Pending", "containerStatuses": [{
        "name": container, "image": "img", "imageID": "", "ready": false, "restartCount": 3,
        "state": {"waiting": {"reason": reason, "message": message}},
        "lastState": {"terminated": {"exitCode": 2, "reason": "Error"}},
    }]})
}

fn unschedulable() -> Value {
    json!({"phase": "Pending", "conditions": [{
        "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
        "message": "0/3 nodes are available: 3 Insufficient cpu.",
        "lastTransitionTime": "2026-01-01T00:00:00Z",
    }]})
}

fn settings() -> Settings {
    let mut s = Settings::default();
    s.control.start_timeout_seconds = 5;
    s
}

fn spec(id: Id, sail: &str, base_url: Option<&str>) -> StartSpec {
    StartSpec {
        notebook_id: id,
        session_id: Id::random(),
        sail: serde_json::from_str::<SailConfig>(sail).unwrap(),
        base_url: base_url.map(str::to_owned),
        attempt: 1,
    }
}

const CLUSTER_CONFIG: &str = r#"{
  "executionMode": "local",
  "compute": {
    "driver": {"instanceType": "c8g.2xlarge",
               "ebsConfig": {"volumeType": "gp3", "volumeSize": 100, "iops": 3000, "throughput": 125}},
    "worker": {"instanceType": "c8g.4xlarge", "maxNodes": 4, "capacityType": "spot"}
  },
  "lakesailImageUri": "registry.example/sail:0.7.2",
  "extraEnv": {"FOO": {"type": "string", "value": "bar"}}
}"#;

fn env_value<'a>(container: &'a Value, name: &str) -> Option<&'a Value> {
    container["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)
}

#[tokio::test]
async fn start_applies_both_pods_and_services_and_waits_until_ready() {
    let api = FakeApi::default();
    let rt = api.runtime(&settings());
    let id = Id::parse("A1B2C3D4E5").unwrap();
    let (sail, marimo) = ("nb-a1b2c3d4e5-sail", "nb-a1b2c3d4e5-marimo");
    api.set_pod_status(sail, ready());
    api.set_pod_status(marimo, ready());
    let spec = spec(id, CLUSTER_CONFIG, Some("/notebooks/A1B2C3D4E5"));

    let endpoint = rt.start(&spec).await.expect("start");
    assert_eq!(
        endpoint.upstream,
        "nb-a1b2c3d4e5-marimo.marina-notebooks.svc:2718"
    );
    assert_eq!(endpoint.token.len(), 64);

    // Server-side apply, in dependency order, all with field manager `marina`.
    let applies: Vec<String> = api
        .requests()
        .iter()
        .filter(|r| r.method == Method::PATCH)
        .map(|r| {
            assert_eq!(
                query_param(&r.query, "fieldManager").as_deref(),
                Some("marina"),
                "{r:?}"
            );
            assert_eq!(query_param(&r.query, "force").as_deref(), Some("true"));
            // Server-side apply needs the full type in the body.
            let group = if r.path.starts_with("/api/v1/") {
                "v1"
            } else {
                "networking.k8s.io/v1"
            };
            assert_eq!(r.body["apiVersion"], group, "{r:?}");
            assert!(r.body["kind"].is_string(), "{r:?}");
            r.path
                .rsplit_once("/namespaces/marina-notebooks/")
                .unwrap()
                .1
                .to_owned()
        })
        .collect();
    assert_eq!(
        applies,
        [
            format!("networkpolicies/{sail}"),
            format!("pods/{sail}"),
            format!("services/{sail}"),
            format!("pods/{marimo}"),
            "secrets/nb-a1b2c3d4e5-marimo-token".into(),
            format!("services/{marimo}"),
        ]
    );

    // The Sail pod: labels, image, node selection, volume, cluster mode.
    let pod = api.object("pods", sail);
    let labels = &pod["metadata"]["labels"];
    assert_eq!(labels["app.kubernetes.io/managed-by"], "marina");
    assert_eq!(labels["app.kubernetes.io/component"], "sail");
    assert_eq!(labels["marina.dev/notebook"], "A1B2C3D4E5");
    assert_eq!(labels["marina.dev/session"], spec.session_id.to_string());
    let c = &pod["spec"]["containers"][0];
    assert_eq!(c["image"], "registry.example/sail:0.7.2");
    assert_eq!(c["readinessProbe"]["grpc"]["port"], 50051);
    assert_eq!(
        pod["spec"]["nodeSelector"]["node.kubernetes.io/instance-type"],
        "c8g.2xlarge"
    );
    assert_eq!(
        pod["spec"]["nodeSelector"]["karpenter.sh/capacity-type"],
        "on-demand"
    );
    assert_eq!(pod["spec"]["serviceAccountName"], "marina-sail");
    let claim = &pod["spec"]["volumes"][0]["ephemeral"]["volumeClaimTemplate"];
    assert_eq!(claim["spec"]["resources"]["requests"]["storage"], "100Gi");
    assert_eq!(claim["spec"]["storageClassName"], "gp3");
    assert_eq!(
        claim["metadata"]["annotations"]["ebs.csi.aws.com/iops"],
        "3000"
    );
    assert_eq!(
        env_value(c, "SAIL_MODE").unwrap()["value"],
        "kubernetes-cluster"
    );
    assert_eq!(
        env_value(c, "SAIL_CLUSTER__WORKER_MAX_COUNT").unwrap()["value"],
        "4"
    );
    assert_eq!(
        env_value(c, "SAIL_CLUSTER__DRIVER_LISTEN_HOST").unwrap()["value"],
        "0.0.0.0"
    );
    assert_eq!(
        env_value(c, "SAIL_CLUSTER__DRIVER_EXTERNAL_HOST").unwrap()["valueFrom"]["fieldRef"]
            ["fieldPath"],
        "status.podIP"
    );
    assert_eq!(
        env_value(c, "SAIL_KUBERNETES__DRIVER_POD_NAME").unwrap()["valueFrom"]["fieldRef"]
            ["fieldPath"],
        "metadata.name"
    );
    assert_eq!(
        env_value(c, "SAIL_KUBERNETES__NAMESPACE").unwrap()["value"],
        NS
    );
    assert_eq!(
        env_value(c, "SAIL_KUBERNETES__IMAGE").unwrap()["value"],
        "registry.example/sail:0.7.2"
    );
    assert_eq!(env_value(c, "FOO").unwrap()["value"], "bar");
    let template: Value = serde_json::from_str(
        env_value(c, "SAIL_KUBERNETES__WORKER_POD_TEMPLATE").unwrap()["value"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        template["metadata"]["labels"]["marina.dev/notebook"],
        "A1B2C3D4E5"
    );
    assert_eq!(
        template["spec"]["nodeSelector"]["karpenter.sh/capacity-type"],
        "spot"
    );
    assert_eq!(
        template["spec"]["nodeSelector"]["node.kubernetes.io/instance-type"],
        "c8g.4xlarge"
    );

    // Services are owned by their pods and select the session's pod.
    let svc = api.object("services", sail);
    assert_eq!(
        svc["metadata"]["ownerReferences"][0]["uid"],
        format!("uid-{sail}")
    );
    assert_eq!(svc["metadata"]["ownerReferences"][0]["kind"], "Pod");
    assert_eq!(svc["spec"]["ports"][0]["port"], 50051);
    assert_eq!(
        svc["spec"]["selector"]["marina.dev/session"],
        spec.session_id.to_string()
    );
    let svc = api.object("services", marimo);
    assert_eq!(
        svc["metadata"]["ownerReferences"][0]["uid"],
        format!("uid-{marimo}")
    );
    assert_eq!(svc["spec"]["ports"][0]["port"], 2718);

    // The Marimo pod reads its token from the Secret, which the pod owns.
    let pod = api.object("pods", marimo);
    let c = &pod["spec"]["containers"][0];
    let command = c["command"].to_string();
    assert!(
        command.contains("--token-password-file /etc/marina/token/token"),
        "{command}"
    );
    assert!(
        command.contains(r#""--base-url","/notebooks/A1B2C3D4E5""#),
        "{command}"
    );
    assert!(
        !command.contains(&endpoint.token),
        "the token is never on a command line"
    );
    assert_eq!(
        c["readinessProbe"]["httpGet"]["path"],
        "/notebooks/A1B2C3D4E5/health"
    );
    assert_eq!(c["readinessProbe"]["httpGet"]["port"], 2718);
    assert_eq!(
        env_value(c, "SPARK_REMOTE").unwrap()["value"],
        "sc://nb-a1b2c3d4e5-sail.marina-notebooks.svc:50051"
    );
    assert_eq!(pod["spec"]["automountServiceAccountToken"], false);
    let secret = api.object("secrets", "nb-a1b2c3d4e5-marimo-token");
    assert_eq!(secret["stringData"]["token"], endpoint.token.as_str());
    assert_eq!(
        secret["metadata"]["ownerReferences"][0]["uid"],
        format!("uid-{marimo}")
    );
    assert_eq!(rt.health(id).await.unwrap(), Health::Healthy);

    // Only the notebook's own pods reach its Sail pods.
    let policy = api.object("networkpolicies", sail);
    assert_eq!(
        policy["spec"]["podSelector"]["matchLabels"]["marina.dev/notebook"],
        "A1B2C3D4E5"
    );
    assert_eq!(
        policy["spec"]["podSelector"]["matchExpressions"][0]["values"],
        json!(["sail", "sail-worker"])
    );
    assert_eq!(policy["spec"]["policyTypes"], json!(["Ingress"]));
    assert_eq!(
        policy["spec"]["ingress"],
        json!([{"from": [{"podSelector": {"matchLabels": {"marina.dev/notebook": "A1B2C3D4E5"}}}]}])
    );

    // A new start replaces the previous incarnation before creating pods.
    api.clear_requests();
    let again = self::spec(id, "{}", None);
    rt.start(&again).await.expect("second start");
    let reqs = api.requests();
    let first_delete = reqs
        .iter()
        .position(|r| r.method == Method::DELETE)
        .expect("a delete");
    let first_apply = reqs.iter().position(|r| r.method == Method::PATCH).unwrap();
    assert!(first_delete < first_apply, "{reqs:#?}");
    assert_eq!(
        api.object("pods", sail)["metadata"]["labels"]["marina.dev/session"],
        again.session_id.to_string()
    );
}

#[tokio::test]
async fn local_mode_sail_pod_has_no_cluster_settings() {
    let api = FakeApi::default();
    let rt = api.runtime(&settings());
    let id = Id::random();
    let sail = format!("nb-{}-sail", id.to_lowercase());
    api.set_pod_status(&sail, ready());
    api.set_pod_status(&format!("nb-{}-marimo", id.to_lowercase()), ready());
    rt.start(&spec(
        id,
        r#"{"compute": {"worker": {"capacityType": "spot"}}}"#,
        None,
    ))
    .await
    .unwrap();
    let pod = api.object("pods", &sail);
    let c = &pod["spec"]["containers"][0];
    assert!(env_value(c, "SAIL_MODE").is_none());
    assert_eq!(
        c["image"], "marina-notebook:latest",
        "the default Sail image"
    );
    assert_eq!(pod["spec"]["automountServiceAccountToken"], false);
    assert!(pod["spec"].get("serviceAccountName").is_none());
    // The only compute, so it runs on the worker capacity type.
    assert_eq!(
        pod["spec"]["nodeSelector"]["karpenter.sh/capacity-type"],
        "spot"
    );
    let marimo = api.object("pods", &format!("nb-{}-marimo", id.to_lowercase()));
    assert_eq!(
        marimo["spec"]["containers"][0]["readinessProbe"]["httpGet"]["path"],
        "/health"
    );
}

#[tokio::test]
async fn start_fails_with_the_pod_failure_reason() {
    let cases = [
        (
            "sail",
            waiting("sail", "ErrImagePull", "pull access denied"),
            "ErrImagePull",
        ),
        (
            "sail",
            waiting("sail", "ImagePullBackOff", "Back-off pulling image"),
            "ImagePullBackOff",
        ),
        (
            "marimo",
            waiting("marimo", "CrashLoopBackOff", "back-off 10s"),
            "CrashLoopBackOff",
        ),
        ("marimo", unschedulable(), "unschedulable"),
        (
            "sail",
            json!({"phase": "Failed", "message": "OOMKilled"}),
            "OOMKilled",
        ),
    ];
    for (component, status, expect) in cases {
        let api = FakeApi::default();
        let rt = api.runtime(&settings());
        let id = Id::random();
        let (sail, marimo) = (
            format!("nb-{}-sail", id.to_lowercase()),
            format!("nb-{}-marimo", id.to_lowercase()),
        );
        api.set_pod_status(&sail, ready());
        api.set_pod_status(&marimo, ready());
        api.set_pod_status(if component == "sail" { &sail } else { &marimo }, status);
        let err = rt.start(&spec(id, "{}", None)).await.expect_err(expect);
        let RuntimeError::StartFailed(msg) = &err else {
            panic!("{expect}: expected StartFailed, got {err:?}");
        };
        assert!(msg.contains(expect), "{expect}: {msg}");
        assert!(msg.contains(component), "{expect}: names the pod: {msg}");
        assert!(matches!(rt.health(id).await.unwrap(), Health::Failed(_)));
    }
}

#[tokio::test]
async fn unschedulable_within_the_grace_keeps_waiting_until_the_timeout() {
    let api = FakeApi::default();
    let mut s = settings();
    s.control.start_timeout_seconds = 1;
    let rt = api
        .runtime(&s)
        .with_unschedulable_grace(Duration::from_secs(u32::MAX as u64 * 1000));
    let id = Id::random();
    api.set_pod_status(&format!("nb-{}-sail", id.to_lowercase()), unschedulable());
    api.set_pod_status(&format!("nb-{}-marimo", id.to_lowercase()), ready());
    let err = rt
        .start(&spec(id, "{}", None))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("not ready after 1 s"), "{err}");
    assert!(err.contains("Insufficient cpu"), "{err}");
    assert_eq!(rt.health(id).await.unwrap(), Health::Pending);
}

#[tokio::test]
async fn stop_deletes_pods_workers_services_and_secret() {
    let api = FakeApi::default();
    let rt = api.runtime(&settings());
    let id = Id::random();
    let lower = id.to_lowercase();
    api.set_pod_status(&format!("nb-{lower}-sail"), ready());
    api.set_pod_status(&format!("nb-{lower}-marimo"), ready());
    let spec = spec(id, CLUSTER_CONFIG, None);
    rt.start(&spec).await.unwrap();
    // A worker pod Sail started, labelled through the worker pod template.
    let template: Value = serde_json::from_str(
        env_value(
            &api.object("pods", &format!("nb-{lower}-sail"))["spec"]["containers"][0],
            "SAIL_KUBERNETES__WORKER_POD_TEMPLATE",
        )
        .unwrap()["value"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    api.0.lock().unwrap().objects.get_mut("pods").unwrap().insert(
        "sail-worker-1".into(),
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "sail-worker-1", "labels": template["metadata"]["labels"]}}),
    );
    // Another notebook's objects must survive.
    let other = Id::random();
    api.set_pod_status(&format!("nb-{}-sail", other.to_lowercase()), ready());
    api.set_pod_status(&format!("nb-{}-marimo", other.to_lowercase()), ready());
    rt.start(&self::spec(other, "{}", None)).await.unwrap();

    api.clear_requests();
    rt.stop(id).await.unwrap();
    let reqs = api.requests();
    let collection = reqs
        .iter()
        .find(|r| r.method == Method::DELETE && r.path.ends_with("/pods"))
        .expect("delete-collection of pods");
    assert_eq!(
        query_param(&collection.query, "labelSelector").unwrap(),
        format!("app.kubernetes.io/managed-by=marina,marina.dev/notebook={id}")
    );
    let remaining = |kind: &str| -> Vec<String> {
        api.names(kind)
            .into_iter()
            .filter(|n| n.contains(&lower) || n.starts_with("sail-worker"))
            .collect()
    };
    assert!(remaining("pods").is_empty(), "{:?}", api.names("pods"));
    assert!(remaining("services").is_empty());
    assert!(remaining("secrets").is_empty());
    assert!(remaining("networkpolicies").is_empty());
    assert_eq!(api.names("pods").len(), 2, "the other notebook's pods stay");
    assert_eq!(api.names("networkpolicies").len(), 1);
    assert_eq!(rt.health(id).await.unwrap(), Health::Missing);
    // Stopping what does not exist is not an error (404s are fine).
    rt.stop(id).await.unwrap();
}

#[tokio::test]
async fn reconcile_sweeps_unexpected_objects_and_adopts_ready_ones() {
    let api = FakeApi::default();
    let rt = api.runtime(&settings());
    let (a, b) = (Id::random(), Id::random());
    for id in [a, b] {
        api.set_pod_status(&format!("nb-{}-sail", id.to_lowercase()), ready());
        api.set_pod_status(&format!("nb-{}-marimo", id.to_lowercase()), ready());
    }
    let spec_a = spec(a, "{}", None);
    rt.start(&spec_a).await.unwrap();
    rt.start(&spec(b, "{}", None)).await.unwrap();
    // An object from some old Marina with no session label at all.
    api.0
        .lock()
        .unwrap()
        .objects
        .get_mut("secrets")
        .unwrap()
        .insert(
            "nb-old-marimo-token".into(),
            json!({"metadata": {"name": "nb-old-marimo-token", "labels": {
            "app.kubernetes.io/managed-by": "marina", "marina.dev/notebook": b.to_string()}}}),
        );

    let expected = [Expected {
        notebook_id: a,
        session_id: spec_a.session_id,
        endpoint: None,
    }];
    let adopted = rt.reconcile(&expected).await.unwrap();
    assert_eq!(adopted, vec![a]);
    let lower_b = b.to_lowercase();
    for kind in ["pods", "services", "secrets", "networkpolicies"] {
        let names = api.names(kind);
        assert!(
            !names
                .iter()
                .any(|n| n.contains(&lower_b) || n.contains("old")),
            "{kind}: {names:?}"
        );
        assert!(
            names.iter().any(|n| n.contains(&a.to_lowercase())),
            "{kind}: {names:?}"
        );
    }
    let sweep = api
        .requests()
        .into_iter()
        .find(|r| r.method == Method::DELETE && r.path.ends_with("/pods"))
        .unwrap();
    assert!(query_param(&sweep.query, "labelSelector")
        .unwrap()
        .contains(&format!("marina.dev/notebook={b}")));

    // A notebook that is expected but not ready is not adopted (and not deleted).
    api.set_pod_status(
        &format!("nb-{}-marimo", a.to_lowercase()),
        json!({"phase": "Running"}),
    );
    assert!(rt.reconcile(&expected).await.unwrap().is_empty());
    assert_eq!(api.names("pods").len(), 2);

    // The store now expects a different session of `a`: this one is swept.
    let newer = [Expected {
        notebook_id: a,
        session_id: Id::random(),
        endpoint: None,
    }];
    assert!(rt.reconcile(&newer).await.unwrap().is_empty());
    assert!(api.names("pods").is_empty());
    assert!(api.names("services").is_empty());
    assert!(api.names("secrets").is_empty());
    assert!(api.names("networkpolicies").is_empty());
}

/// `KubeRuntime::new` infers its configuration (here a kubeconfig file): it must build a real
/// client (TLS included) and report an unreachable API server as a backend error, and a
/// missing configuration as a clear error.
#[tokio::test]
async fn new_uses_the_kubeconfig_and_reports_an_unreachable_api_server() {
    let dir = tempfile::tempdir().unwrap();
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let kubeconfig = dir.path().join("config");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: test\n\
             clusters: [{{name: test, cluster: {{server: 'https://127.0.0.1:{port}', insecure-skip-tls-verify: true}}}}]\n\
             users: [{{name: test, user: {{token: not-a-real-token}}}}]\n\
             contexts: [{{name: test, context: {{cluster: test, user: test, namespace: marina-notebooks}}}}]\n"
        ),
    )
    .unwrap();
    std::env::remove_var("KUBERNETES_SERVICE_HOST");
    std::env::set_var("KUBECONFIG", &kubeconfig);
    let rt = KubeRuntime::new(&settings())
        .await
        .expect("client from the kubeconfig");
    let err = rt.health(Id::random()).await.unwrap_err();
    assert!(matches!(err, RuntimeError::Backend(_)), "{err:?}");
    assert!(!err.to_string().contains("not-a-real-token"), "{err}");

    std::env::set_var("KUBECONFIG", dir.path().join("missing"));
    let Err(err) = KubeRuntime::new(&settings()).await else {
        panic!("no configuration must be an error");
    };
    assert!(
        err.to_string().contains("no Kubernetes configuration"),
        "{err}"
    );
}
