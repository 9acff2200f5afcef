//! The control plane's Prometheus metrics. Its own module so the shared state and the
//! lifecycle service can both hold them without depending on each other.

use prometheus::{
    HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

/// Prometheus metrics of the control plane.
pub struct Metrics {
    pub registry: Registry,
    /// By matched route, method and status code.
    pub requests: IntCounterVec,
    pub request_seconds: HistogramVec,
    /// Notebooks by status, refreshed by the monitor.
    pub notebooks: IntGaugeVec,
    /// Lifecycle outcomes: `start_ok`, `start_failed`, `start_retry`, `stop_ok`, `stop_failed`,
    /// `idle_stop`, `detached_stop`, `health_failed`.
    pub lifecycle: IntCounterVec,
    pub routes_version: IntGauge,
    /// Activity batches received, by edge.
    pub activity_batches: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry =
            Registry::new_custom(Some("marina_control".into()), None).unwrap_or_default();
        let requests = IntCounterVec::new(
            Opts::new(
                "http_requests_total",
                "HTTP requests by route, method and status",
            ),
            &["route", "method", "status"],
        )
        .expect("static metric definition");
        let request_seconds = HistogramVec::new(
            HistogramOpts::new(
                "http_request_duration_seconds",
                "HTTP request latency by route",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0, 30.0,
            ]),
            &["route"],
        )
        .expect("static metric definition");
        let notebooks =
            IntGaugeVec::new(Opts::new("notebooks", "Notebooks by status"), &["status"])
                .expect("static metric definition");
        let lifecycle = IntCounterVec::new(
            Opts::new("lifecycle_events_total", "Lifecycle outcomes"),
            &["event"],
        )
        .expect("static metric definition");
        let routes_version = IntGauge::new("routes_version", "Current routes version")
            .expect("static metric definition");
        let activity_batches = IntCounterVec::new(
            Opts::new(
                "activity_batches_total",
                "Activity batches received by edge",
            ),
            &["edge"],
        )
        .expect("static metric definition");
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(request_seconds.clone()),
            Box::new(notebooks.clone()),
            Box::new(lifecycle.clone()),
            Box::new(routes_version.clone()),
            Box::new(activity_batches.clone()),
        ] {
            // Registration only fails on duplicate names, which these static names are not.
            let _ = registry.register(c);
        }
        Metrics {
            registry,
            requests,
            request_seconds,
            notebooks,
            lifecycle,
            routes_version,
            activity_batches,
        }
    }

    pub fn event(&self, name: &str) {
        self.lifecycle.with_label_values(&[name]).inc();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
