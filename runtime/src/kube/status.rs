//! Reading a pod's status: ready, still coming up, or failed for a reason worth reporting.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;

/// Waiting reasons that will not resolve by themselves within a start attempt.
const FATAL_WAITING: &[&str] = &[
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "CrashLoopBackOff",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
];

/// What a pod's status means for a start or a health check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PodState {
    /// The `Ready` condition is true (its readiness probe passes).
    Ready,
    /// Scheduling, pulling, starting, or running but not ready yet.
    Waiting(String),
    /// It will not become ready; the message says why.
    Failed(String),
}

/// Classifies `pod`. `unschedulable_grace` is how long `PodScheduled=False` with reason
/// `Unschedulable` is tolerated: a node autoscaler (Karpenter, cluster-autoscaler) reacts to
/// exactly that condition by adding a node, which takes tens of seconds, so failing at once
/// would fail every start that needs a new node.
pub fn classify(pod: &Pod, unschedulable_grace: Duration) -> PodState {
    let name = pod.metadata.name.as_deref().unwrap_or("pod");
    if pod.metadata.deletion_timestamp.is_some() {
        return PodState::Failed(format!("{name} is being deleted"));
    }
    let Some(status) = &pod.status else {
        return PodState::Waiting(format!("{name}: no status yet"));
    };
    match status.phase.as_deref() {
        Some("Failed") | Some("Succeeded") => {
            let why = status
                .message
                .as_deref()
                .or(status.reason.as_deref())
                .unwrap_or("its containers exited");
            return PodState::Failed(format!("{name} terminated: {why}"));
        }
        _ => {}
    }
    for cs in status.container_statuses.iter().flatten() {
        let Some(waiting) = cs.state.as_ref().and_then(|s| s.waiting.as_ref()) else {
            continue;
        };
        let reason = waiting.reason.as_deref().unwrap_or("");
        if FATAL_WAITING.contains(&reason) {
            let mut msg = format!("{name}: container {} is {reason}", cs.name);
            if let Some(m) = waiting.message.as_deref().filter(|m| !m.is_empty()) {
                msg.push_str(&format!(": {m}"));
            }
            if let Some(t) = cs.last_state.as_ref().and_then(|s| s.terminated.as_ref()) {
                msg.push_str(&format!(
                    " (last exit code {}{})",
                    t.exit_code,
                    t.reason
                        .as_deref()
                        .map(|r| format!(", {r}"))
                        .unwrap_or_default()
                ));
            }
            return PodState::Failed(msg);
        }
    }
    let conditions = status.conditions.as_deref().unwrap_or_default();
    for c in conditions {
        if c.type_ == "PodScheduled"
            && c.status == "False"
            && c.reason.as_deref() == Some("Unschedulable")
        {
            let since = c
                .last_transition_time
                .as_ref()
                .map(|t| {
                    // A timestamp in the future (clock skew) counts as "just now".
                    let secs = k8s_openapi::jiff::Timestamp::now()
                        .duration_since(t.0)
                        .as_secs();
                    Duration::from_secs(secs.max(0) as u64)
                })
                .unwrap_or_default();
            let msg = format!(
                "{name} is unschedulable: {}",
                c.message.as_deref().unwrap_or("no node fits")
            );
            return if since >= unschedulable_grace {
                PodState::Failed(msg)
            } else {
                PodState::Waiting(msg)
            };
        }
    }
    if conditions
        .iter()
        .any(|c| c.type_ == "Ready" && c.status == "True")
    {
        return PodState::Ready;
    }
    PodState::Waiting(format!(
        "{name}: {}",
        status.phase.as_deref().unwrap_or("Pending")
    ))
}
