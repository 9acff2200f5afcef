//! What the run saw: latencies per traffic kind, errors with who had them, per-second series for
//! the timeline, and the facts the checks judge (outputs produced and received, viewer
//! mutations, socket intervals, revocations).
//!
//! One `Mutex` for everything: this is the load generator, not the edge, and its few thousand
//! events per second are far from contention. Times are seconds since the run's start (`t0`).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

/// Who a client is, so an error can be matched against the faults that could have caused it.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Actor {
    /// Index of the notebook in the run (`None` for the status sampler and set-up).
    pub notebook: Option<usize>,
    pub role: Role,
    /// Index of the client (viewer number; 0 for owners).
    pub client: usize,
}

#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Owner,
    Viewer,
    IdleTab,
    Sampler,
}

/// Where an operation went: through an edge replica (its index), to the control API, or
/// directly to Marimo (the baseline).
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case", tag = "kind", content = "index")]
pub enum Via {
    Edge(usize),
    Api,
    Direct,
}

#[derive(Clone, Debug, Serialize)]
pub struct ErrorEvent {
    pub at_s: f64,
    pub actor: Actor,
    pub via: Via,
    pub what: String,
    /// The injected fault that explains it (`None`: unexpected).
    pub explained_by: Option<String>,
}

/// One injected fault, with the window in which errors it explains are expected.
#[derive(Clone, Debug, Serialize)]
pub struct Fault {
    pub kind: String,
    pub target: String,
    pub at_s: f64,
    /// Seconds until the system was whole again (`None`: it never was).
    pub recovered_after_s: Option<f64>,
    /// What was lost besides the sockets the fault cut (a person-readable list; empty = nothing).
    pub lost: Vec<String>,
    #[serde(skip)]
    pub scope: FaultScope,
}

/// Which clients' errors a fault explains.
#[derive(Clone, Debug, Default)]
pub enum FaultScope {
    /// Everything that went through this edge replica.
    Edge(usize),
    /// Calls to the control API, and handshakes (an edge asks the control plane to redeem).
    #[default]
    ControlPath,
    /// Every client of this notebook, from the fault until it ran again.
    Notebook(usize),
}

/// An output the owner produced (`marker` is unique in the run).
#[derive(Clone, Debug, Serialize)]
pub struct Output {
    pub notebook: usize,
    pub marker: String,
    pub kind: &'static str,
    pub bytes: usize,
    pub run_at_s: f64,
    pub owner_seen_at_s: Option<f64>,
}

/// A per-second bucket of the timeline.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Second {
    pub requests: u64,
    pub errors: u64,
    pub open_sockets: i64,
    #[serde(skip)]
    pub latency: Option<Histogram<u64>>,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub edge_rss_mib: f64,
    /// The machine: CPU busy (all cores, %), memory in use (GiB), the edges' open files.
    pub cpu_busy_pct: f64,
    pub mem_used_gib: f64,
    pub edge_fds: u64,
}

/// When a socket was open: from, and until (`None`: still open).
pub type Interval = (f64, Option<f64>);

#[derive(Default)]
pub struct Inner {
    pub latency: BTreeMap<String, Histogram<u64>>,
    pub errors: Vec<ErrorEvent>,
    pub faults: Vec<Fault>,
    pub outputs: Vec<Output>,
    /// (notebook, viewer) → intervals during which its kiosk socket was open.
    pub viewer_sockets: HashMap<(usize, usize), Vec<Interval>>,
    /// (notebook, viewer) → marker → seconds when received.
    pub viewer_received: HashMap<(usize, usize), HashMap<String, f64>>,
    pub viewer_mutations_tried: u64,
    pub viewer_mutations_succeeded: u64,
    pub viewer_mutations_detail: BTreeMap<String, u64>,
    pub seconds: Vec<Second>,
    pub open_sockets: i64,
    pub peak_open_sockets: i64,
    /// Sockets open now per edge replica.
    pub open_by_edge: HashMap<usize, i64>,
    /// Per replica: clients whose next socket went to another replica.
    pub moved_from: HashMap<usize, i64>,
    /// Revoked viewers: seconds from the unshare call's answer to their socket's close.
    pub revocations: Vec<(String, Option<f64>)>,
    /// Notebook → status changes seen by the sampler: (at, status, statusMessage).
    pub statuses: BTreeMap<usize, Vec<(f64, String, String)>>,
    /// Notebook → the last time its owner did something that counts as activity.
    pub last_owner_action: HashMap<usize, f64>,
    pub edge_rss_peak_kib: HashMap<usize, u64>,
    /// Each replica's first reading (its resident memory before the traffic).
    pub edge_rss_first_kib: HashMap<usize, u64>,
    pub notes: Vec<String>,
}

/// The shared recorder. Cheap to clone.
#[derive(Clone)]
pub struct Recorder {
    t0: Instant,
    inner: Arc<Mutex<Inner>>,
}

impl Recorder {
    pub fn new() -> Recorder {
        Recorder {
            t0: Instant::now(),
            inner: Arc::default(),
        }
    }

    /// Seconds since the start of the run.
    pub fn now(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }

    pub fn at(&self, i: Instant) -> f64 {
        i.saturating_duration_since(self.t0).as_secs_f64()
    }

    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panicking client task must not take the report down with it.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn second(inner: &mut Inner, at: f64) -> &mut Second {
        let i = at.max(0.0) as usize;
        if inner.seconds.len() <= i {
            let open = inner.open_sockets;
            inner.seconds.resize_with(i + 1, || Second {
                open_sockets: open,
                ..Default::default()
            });
        }
        &mut inner.seconds[i]
    }

    /// A completed operation of `kind` that took `took`.
    pub fn latency(&self, kind: &str, took: Duration) {
        let us = (took.as_micros() as u64).max(1);
        let now = self.now();
        let mut g = self.lock();
        g.latency
            .entry(kind.to_owned())
            .or_insert_with(|| Histogram::new_with_bounds(1, 600_000_000, 3).expect("bounds"))
            .saturating_record(us);
        let s = Self::second(&mut g, now);
        s.requests += 1;
        s.latency
            .get_or_insert_with(|| Histogram::new_with_bounds(1, 600_000_000, 3).expect("bounds"))
            .saturating_record(us);
    }

    pub fn error(&self, actor: &Actor, via: Via, what: impl Into<String>) {
        let now = self.now();
        let mut g = self.lock();
        Self::second(&mut g, now).errors += 1;
        g.errors.push(ErrorEvent {
            at_s: now,
            actor: actor.clone(),
            via,
            what: what.into(),
            explained_by: None,
        });
    }

    /// A socket opened through `via`; `previous` is where the same client's last socket was
    /// (so a replica's clients can be seen arriving elsewhere after it was killed).
    pub fn socket_opened(&self, via: Via, previous: Option<Via>) {
        let now = self.now();
        let mut g = self.lock();
        g.open_sockets += 1;
        g.peak_open_sockets = g.peak_open_sockets.max(g.open_sockets);
        if let Via::Edge(i) = via {
            *g.open_by_edge.entry(i).or_default() += 1;
        }
        if let Some(Via::Edge(p)) = previous {
            if previous != Some(via) {
                *g.moved_from.entry(p).or_default() += 1;
            }
        }
        let open = g.open_sockets;
        Self::second(&mut g, now).open_sockets = open;
    }

    pub fn socket_closed(&self, via: Via) {
        let now = self.now();
        let mut g = self.lock();
        g.open_sockets -= 1;
        if let Via::Edge(i) = via {
            *g.open_by_edge.entry(i).or_default() -= 1;
        }
        let open = g.open_sockets;
        Self::second(&mut g, now).open_sockets = open;
    }

    pub fn edge_rss(&self, edge: usize, kib: u64) {
        let now = self.now();
        let mut g = self.lock();
        g.edge_rss_first_kib.entry(edge).or_insert(kib);
        let peak = g.edge_rss_peak_kib.entry(edge).or_default();
        *peak = (*peak).max(kib);
        Self::second(&mut g, now).edge_rss_mib += kib as f64 / 1024.0;
    }

    /// One reading of the machine (see [`Second`]).
    pub fn machine(&self, cpu_busy_pct: f64, mem_used_gib: f64, edge_fds: u64) {
        let now = self.now();
        let mut g = self.lock();
        let s = Self::second(&mut g, now);
        s.cpu_busy_pct = cpu_busy_pct;
        s.mem_used_gib = mem_used_gib;
        s.edge_fds = edge_fds;
    }

    pub fn fault(&self, f: Fault) -> usize {
        let mut g = self.lock();
        g.faults.push(f);
        g.faults.len() - 1
    }

    pub fn recovered(&self, fault: usize, after: Option<f64>, lost: Vec<String>) {
        let mut g = self.lock();
        if let Some(f) = g.faults.get_mut(fault) {
            f.recovered_after_s = after;
            f.lost.extend(lost);
        }
    }

    pub fn note(&self, s: impl Into<String>) {
        self.lock().notes.push(s.into());
    }
}

impl Default for Recorder {
    fn default() -> Self {
        Self::new()
    }
}

/// Percentiles of one histogram, in milliseconds.
#[derive(Clone, Debug, Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

pub fn percentiles(h: &Histogram<u64>) -> Percentiles {
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    Percentiles {
        count: h.len(),
        p50_ms: ms(0.5),
        p90_ms: ms(0.9),
        p99_ms: ms(0.99),
        max_ms: h.max() as f64 / 1000.0,
    }
}

/// Marks each error with the fault that explains it, if any: an error inside a fault's window
/// (from the fault until it recovered, plus `grace`) and within its scope.
pub fn explain(inner: &mut Inner, grace: f64, run_end: f64) {
    let faults = inner.faults.clone();
    for e in &mut inner.errors {
        e.explained_by = faults
            .iter()
            .find(|f| {
                let end = f.at_s + f.recovered_after_s.unwrap_or(run_end - f.at_s) + grace;
                let in_time = e.at_s >= f.at_s - 0.5 && e.at_s <= end;
                let in_scope = match f.scope {
                    FaultScope::Edge(i) => e.via == Via::Edge(i),
                    FaultScope::ControlPath => {
                        e.via == Via::Api
                            || e.what.starts_with("handshake")
                            || e.what.starts_with("open")
                    }
                    FaultScope::Notebook(n) => e.actor.notebook == Some(n),
                };
                in_time && in_scope
            })
            .map(|f| format!("{} {}", f.kind, f.target));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(at: f64, nb: usize, via: Via, what: &str) -> ErrorEvent {
        ErrorEvent {
            at_s: at,
            actor: Actor {
                notebook: Some(nb),
                role: Role::Viewer,
                client: 0,
            },
            via,
            what: what.into(),
            explained_by: None,
        }
    }

    fn fault(kind: &str, at: f64, rec: f64, scope: FaultScope) -> Fault {
        Fault {
            kind: kind.into(),
            target: "x".into(),
            at_s: at,
            recovered_after_s: Some(rec),
            lost: vec![],
            scope,
        }
    }

    #[test]
    fn errors_are_explained_only_inside_a_faults_window_and_scope() {
        let mut inner = Inner::default();
        inner
            .faults
            .push(fault("edge_kill", 10.0, 3.0, FaultScope::Edge(1)));
        inner
            .faults
            .push(fault("control_restart", 30.0, 4.0, FaultScope::ControlPath));
        inner
            .faults
            .push(fault("marimo_kill", 50.0, 5.0, FaultScope::Notebook(2)));
        inner.errors = vec![
            err(11.0, 0, Via::Edge(1), "ws closed"), // edge 1 killed: explained
            err(11.0, 0, Via::Edge(0), "ws closed"), // the other replica: not
            err(20.0, 0, Via::Edge(1), "ws closed"), // edge 1, long after: not
            err(31.0, 0, Via::Api, "open: 503"),     // control restart: explained
            err(31.0, 0, Via::Edge(0), "run: 502"),  // the edges must keep serving: not
            err(52.0, 2, Via::Edge(0), "ws closed"), // the killed notebook: explained
            err(52.0, 1, Via::Edge(0), "ws closed"), // another notebook: not
        ];
        explain(&mut inner, 2.0, 100.0);
        let got: Vec<bool> = inner
            .errors
            .iter()
            .map(|e| e.explained_by.is_some())
            .collect();
        assert_eq!(got, [true, false, false, true, false, true, false]);
    }

    #[test]
    fn seconds_carry_the_open_socket_count_forward() {
        let r = Recorder::new();
        r.socket_opened(Via::Edge(0), None);
        r.socket_opened(Via::Edge(1), Some(Via::Edge(0)));
        r.socket_closed(Via::Edge(0));
        let g = r.lock();
        assert_eq!(g.open_sockets, 1);
        assert_eq!(g.peak_open_sockets, 2);
        assert_eq!(g.seconds[0].open_sockets, 1);
        assert_eq!(g.open_by_edge[&1], 1);
        assert_eq!(g.moved_from[&0], 1);
    }
}
