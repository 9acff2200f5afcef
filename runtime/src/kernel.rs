//! Asking a Marimo server whether its kernel is executing: `GET /api/sessions` (the ids of
//! its sessions, with or without a browser attached) then `GET /api/kernel/status` with each
//! session's `Marimo-Session-Id`, which answers `{"state": "running" | "idle" | "stopped"}`
//! (`running`: some cell is queued or running). Both are `GET`s behind Marimo's token only.

use std::time::Duration;

use crate::{Busy, RuntimeError};

/// How long one question to Marimo may take.
pub(crate) const KERNEL_STATUS_TIMEOUT: Duration = Duration::from_secs(2);

/// Asks the Marimo server at `base` (`http://host:port[base_url]`) with `token`.
pub(crate) async fn kernel_busy_at(
    http: &reqwest::Client,
    base: &str,
    token: &str,
) -> Result<Busy, RuntimeError> {
    let err = |what: &str, e: String| RuntimeError::Backend(format!("marimo {what}: {e}"));
    let sessions: serde_json::Value = http
        .get(format!("{base}/api/sessions"))
        .bearer_auth(token)
        .timeout(KERNEL_STATUS_TIMEOUT)
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .map_err(|e| err("sessions", e.without_url().to_string()))?
        .json()
        .await
        .map_err(|e| err("sessions", e.without_url().to_string()))?;
    let ids: Vec<String> = match sessions {
        serde_json::Value::Object(m) => m.keys().cloned().collect(),
        other => return Err(err("sessions", format!("not an object: {other}"))),
    };
    for id in ids {
        let status: serde_json::Value = http
            .get(format!("{base}/api/kernel/status"))
            .bearer_auth(token)
            .header("Marimo-Session-Id", &id)
            .timeout(KERNEL_STATUS_TIMEOUT)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(|e| err("kernel status", e.without_url().to_string()))?
            .json()
            .await
            .map_err(|e| err("kernel status", e.without_url().to_string()))?;
        if status.get("state").and_then(|s| s.as_str()) == Some("running") {
            return Ok(Busy::Running);
        }
    }
    Ok(Busy::Idle)
}
