//! Prometheus metrics of the edge.
//!
//! Every labelled series is resolved once, here, at start-up: the hot path only touches
//! pre-resolved atomic counters. (`CounterVec::with_label_values` would take the vector's
//! internal lock and hash the labels on every request, a lock shared across connections.)

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

use crate::error::ErrorKind;

/// Handshake outcomes other than errors.
pub const HANDSHAKE_OK: &str = "ok";

pub struct Metrics {
    pub registry: Registry,
    /// Requests by status class, index = first digit (1..=5).
    status_class: [IntCounter; 6],
    pub upstream_latency: Histogram,
    pub websockets_open: IntGauge,
    pub streams_open: IntGauge,
    pub bytes_to_client: IntCounter,
    pub bytes_to_upstream: IntCounter,
    pub handshake_ok: IntCounter,
    denials: IntCounterVec,
    errors: IntCounterVec,
    pub routes: IntGauge,
    pub route_feed_bytes: IntCounter,
    pub route_feed_changes: IntCounter,
    pub route_feed_snapshots: IntCounter,
    pub activity_reports_failed: IntCounter,
    pub route_feed_errors: IntCounter,
    /// Pre-resolved per-kind counters, indexed by [`kind_index`].
    by_kind: Vec<(
        ErrorKind,
        IntCounter,
        Option<IntCounter>,
        Option<IntCounter>,
    )>,
}

const ALL_KINDS: &[ErrorKind] = &[
    ErrorKind::NotFound,
    ErrorKind::NotRunning,
    ErrorKind::LinkMissing,
    ErrorKind::LinkInvalid,
    ErrorKind::LinkExpired,
    ErrorKind::LinkNotYetValid,
    ErrorKind::LinkOtherNotebook,
    ErrorKind::LinkStaleSession,
    ErrorKind::LinkReplayed,
    ErrorKind::ReplayStoreUnavailable,
    ErrorKind::NoSession,
    ErrorKind::SessionInvalid,
    ErrorKind::SessionExpired,
    ErrorKind::SessionOtherNotebook,
    ErrorKind::SessionStale,
    ErrorKind::NoAccess,
    ErrorKind::DeniedReadOnly,
    ErrorKind::DeniedCredentialEndpoint,
    ErrorKind::DeniedPath,
    ErrorKind::DeniedSessionId,
    ErrorKind::DeniedOrigin,
    ErrorKind::DeniedQuery,
    ErrorKind::BadRequest,
    ErrorKind::UpstreamConnect,
    ErrorKind::UpstreamTimeout,
    ErrorKind::UpstreamProtocol,
    ErrorKind::Internal,
];

fn is_handshake_kind(k: ErrorKind) -> bool {
    use ErrorKind::*;
    matches!(
        k,
        LinkMissing
            | LinkInvalid
            | LinkExpired
            | LinkNotYetValid
            | LinkOtherNotebook
            | LinkStaleSession
            | LinkReplayed
            | ReplayStoreUnavailable
            | NoAccess
            | NotRunning
            | Internal
    )
}

// === impl Metrics ===

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new_custom(Some("marina_edge".into()), None)
            .expect("static metric prefix is valid");
        let requests = IntCounterVec::new(
            Opts::new("requests_total", "Requests answered, by status class"),
            &["class"],
        )
        .expect("static metric definition");
        let status_class =
            ["0xx", "1xx", "2xx", "3xx", "4xx", "5xx"].map(|c| requests.with_label_values(&[c]));
        let upstream_latency = Histogram::with_opts(
            HistogramOpts::new(
                "upstream_response_seconds",
                "Time from sending a request upstream to its response head",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
            ]),
        )
        .expect("static metric definition");
        let websockets_open =
            IntGauge::new("websockets_open", "Proxied WebSockets open now").expect("static");
        let streams_open = IntGauge::new(
            "event_streams_open",
            "Proxied server-sent event streams open now",
        )
        .expect("static");
        let bytes = IntCounterVec::new(
            Opts::new("bytes_relayed_total", "Body and WebSocket bytes relayed"),
            &["direction"],
        )
        .expect("static");
        let bytes_to_client = bytes.with_label_values(&["to_client"]);
        let bytes_to_upstream = bytes.with_label_values(&["to_upstream"]);
        let handshakes = IntCounterVec::new(
            Opts::new("handshakes_total", "URL token handshakes by outcome"),
            &["outcome"],
        )
        .expect("static");
        let handshake_ok = handshakes.with_label_values(&[HANDSHAKE_OK]);
        let denials = IntCounterVec::new(
            Opts::new("denials_total", "Requests refused by policy, by reason"),
            &["reason"],
        )
        .expect("static");
        let errors = IntCounterVec::new(
            Opts::new("errors_total", "Failed requests, by reason"),
            &["reason"],
        )
        .expect("static");
        let routes = IntGauge::new("routes", "Notebooks in the route table").expect("static");
        let activity_reports_failed = IntCounter::new(
            "activity_reports_failed_total",
            "Activity batches the control plane did not accept (kept for the next try)",
        )
        .expect("static");
        let route_feed_errors = IntCounter::new(
            "route_feed_errors_total",
            "Failed attempts to load routes (feed or file)",
        )
        .expect("static");
        let route_feed_bytes = IntCounter::new(
            "route_feed_bytes_total",
            "Bytes of routes feed answers received (snapshots and changes)",
        )
        .expect("static");
        let route_feed_changes = IntCounter::new(
            "route_feed_changes_total",
            "Route changes applied from the feed (a snapshot counts none)",
        )
        .expect("static");
        let route_feed_snapshots = IntCounter::new(
            "route_feed_snapshots_total",
            "Whole snapshots applied (at connect, and after a gap the feed cannot resume)",
        )
        .expect("static");
        let by_kind = ALL_KINDS
            .iter()
            .map(|&k| {
                (
                    k,
                    errors.with_label_values(&[k.reason()]),
                    k.is_denial()
                        .then(|| denials.with_label_values(&[k.reason()])),
                    is_handshake_kind(k).then(|| handshakes.with_label_values(&[k.reason()])),
                )
            })
            .collect();
        for c in [
            Box::new(requests) as Box<dyn prometheus::core::Collector>,
            Box::new(upstream_latency.clone()),
            Box::new(websockets_open.clone()),
            Box::new(streams_open.clone()),
            Box::new(bytes),
            Box::new(handshakes),
            Box::new(denials.clone()),
            Box::new(errors.clone()),
            Box::new(routes.clone()),
            Box::new(activity_reports_failed.clone()),
            Box::new(route_feed_errors.clone()),
            Box::new(route_feed_bytes.clone()),
            Box::new(route_feed_changes.clone()),
            Box::new(route_feed_snapshots.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        Metrics {
            registry,
            status_class,
            upstream_latency,
            websockets_open,
            streams_open,
            bytes_to_client,
            bytes_to_upstream,
            handshake_ok,
            denials,
            errors,
            routes,
            activity_reports_failed,
            route_feed_errors,
            route_feed_bytes,
            route_feed_changes,
            route_feed_snapshots,
            by_kind,
        }
    }

    /// Counts a response by its status class.
    pub fn response(&self, status: u16) {
        let i = (status / 100) as usize;
        self.status_class[i.min(5)].inc();
    }

    /// Counts a failed request: errors by reason, and denials / handshake outcomes.
    pub fn error(&self, kind: ErrorKind, in_handshake: bool) {
        if let Some((_, e, d, h)) = self.by_kind.iter().find(|(k, ..)| *k == kind) {
            e.inc();
            if let Some(d) = d {
                d.inc();
            }
            if in_handshake {
                if let Some(h) = h {
                    h.inc();
                }
            }
        }
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let enc = prometheus::TextEncoder::new();
        enc.encode_to_string(&self.registry.gather())
            .unwrap_or_default()
    }

    /// A denial count, for tests.
    pub fn denials(&self, kind: ErrorKind) -> u64 {
        self.denials.with_label_values(&[kind.reason()]).get()
    }

    /// An error count, for tests.
    pub fn errors(&self, kind: ErrorKind) -> u64 {
        self.errors.with_label_values(&[kind.reason()]).get()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_denials_and_handshakes_by_reason() {
        let m = Metrics::new();
        m.error(ErrorKind::DeniedReadOnly, false);
        m.error(ErrorKind::LinkReplayed, true);
        m.response(403);
        assert_eq!(m.denials(ErrorKind::DeniedReadOnly), 1);
        let text = m.render();
        assert!(
            text.contains("marina_edge_denials_total{reason=\"read_only\"} 1"),
            "{text}"
        );
        assert!(text.contains("marina_edge_handshakes_total{outcome=\"link_replayed\"} 1"));
        assert!(text.contains("marina_edge_requests_total{class=\"4xx\"} 1"));
    }
}
