//! Where routes come from: the control plane's long-poll feed, or a static JSON file.
//!
//! The feed answers a snapshot first, then only what changed after the version the edge holds
//! ([`RoutesFeed`]); the edge asks again at once with the new version. After a reconnect the
//! edge asks from the version it has, and the control plane answers the changes it missed, or
//! a fresh snapshot when it cannot (the changes were pruned, or another database). A change list
//! that does not fit (it does not start at the edge's version) is refused and the edge starts
//! over from a snapshot.
//!
//! Either way the edge keeps serving its last good table when the source fails: a control plane
//! restart or a half-written file must not take notebooks offline.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use marina_config::wire::{RoutesFeed, RoutesSnapshot, INTERNAL_PREFIX};

use crate::error::ProxyError;
use crate::metrics::Metrics;
use crate::route::RouteTable;

use super::client::ControlClient;

/// How long the control plane may hold a routes request.
const WAIT_SECONDS: u64 = 25;

pub fn load_file(path: &PathBuf) -> Result<RoutesSnapshot, ProxyError> {
    let text = std::fs::read(path).map_err(|source| ProxyError::File {
        what: "routes file",
        path: path.clone(),
        source,
    })?;
    serde_json::from_slice(&text)
        .map_err(|e| ProxyError::Routes(format!("{}: {e}", path.display())))
}

fn mtime(path: &PathBuf) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Reloads a static routes file when its modification time changes (checked every 500 ms;
/// no inotify dependency for a file that changes rarely).
pub async fn follow_file(path: PathBuf, table: Arc<RouteTable>, metrics: &'static Metrics) {
    let mut seen = mtime(&path);
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        let now = mtime(&path);
        if now == seen {
            continue;
        }
        seen = now;
        match load_file(&path)
            .map_err(|e| e.to_string())
            .and_then(|s| table.apply(s))
        {
            Ok(()) => tracing::info!(version = table.version(), "routes file reloaded"),
            Err(e) => {
                metrics.route_feed_errors.inc();
                tracing::warn!(error = %e, "routes file not applied; keeping the previous routes")
            }
        }
    }
}

/// Follows `GET /internal/v1/routes?after=V&waitSeconds=25`, reconnecting with capped
/// exponential backoff.
pub async fn follow_control(
    client: ControlClient,
    table: Arc<RouteTable>,
    metrics: &'static Metrics,
) {
    let mut backoff = Duration::from_millis(100);
    // Set when a change list did not fit: ask for a snapshot (no `after`) next time.
    let mut resync = false;
    loop {
        // No `after` until something was loaded, so the first answer comes at once.
        let path = if table.is_loaded() && !resync {
            format!(
                "{INTERNAL_PREFIX}/routes?after={}&waitSeconds={WAIT_SECONDS}",
                table.version()
            )
        } else {
            format!("{INTERNAL_PREFIX}/routes")
        };
        let asked = std::time::Instant::now();
        let outcome = client
            .get(&path, Duration::from_secs(WAIT_SECONDS + 10))
            .await;
        let err = match outcome {
            Ok((status, body)) if status.is_success() => {
                metrics.route_feed_bytes.inc_by(body.len() as u64);
                if status == http::StatusCode::NO_CONTENT || body.is_empty() {
                    backoff = Duration::from_millis(100);
                    continue;
                }
                match serde_json::from_slice::<RoutesFeed>(&body) {
                    Ok(RoutesFeed::Changes(c)) if c.changes.is_empty() => {
                        // Nothing new. A control plane that answers at once instead of holding
                        // the request must not turn this loop into a busy one.
                        if let Some(rest) = Duration::from_secs(1).checked_sub(asked.elapsed()) {
                            tokio::time::sleep(rest).await;
                        }
                        backoff = Duration::from_millis(100);
                        continue;
                    }
                    Ok(feed) => {
                        let snapshot = matches!(feed, RoutesFeed::Snapshot(_));
                        match table.apply_feed(feed) {
                            Ok(n) => {
                                if snapshot {
                                    metrics.route_feed_snapshots.inc();
                                }
                                metrics.route_feed_changes.inc_by(n as u64);
                                tracing::debug!(
                                    version = table.version(),
                                    changes = n,
                                    snapshot,
                                    "routes updated"
                                );
                                resync = false;
                                backoff = Duration::from_millis(100);
                                continue;
                            }
                            Err(e) => {
                                resync = true;
                                e
                            }
                        }
                    }
                    Err(e) => format!("routes answer is not a snapshot or change list: {e}"),
                }
            }
            Ok((status, _)) => format!("routes request answered {status}"),
            Err(e) => e.to_string(),
        };
        metrics.route_feed_errors.inc();
        tracing::warn!(error = %err, retry_in_ms = backoff.as_millis() as u64, "routes feed failed; serving the last known routes");
        let jitter =
            Duration::from_millis(rand::random::<u64>() % (backoff.as_millis() as u64 / 2 + 1));
        tokio::time::sleep(backoff + jitter).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}
