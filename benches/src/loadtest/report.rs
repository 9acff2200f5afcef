//! The verdict: the checks that make a run pass or fail, and the three files an operator
//! reads (`report.json` as data, `report.md` for a person, `timeline.svg` to look at).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Result;
use serde::Serialize;

use super::api::{NotebookPlan, NotebookRole};
use super::faults::FinalState;
use super::record::{self, ErrorEvent, Fault, Percentiles, Recorder, Second};
use super::Options;

/// How long after an output a viewer whose socket is open must have it.
const VIEWER_GRACE_S: f64 = 15.0;
/// Errors this long after a fault recovered are still its doing (clients back off).
const FAULT_GRACE_S: f64 = 8.0;
/// The most a revoked viewer's socket may stay open.
const REVOCATION_LIMIT_S: f64 = 5.0;

#[derive(Clone, Debug, Default, Serialize)]
pub struct Timings {
    pub setup_s: f64,
    pub start_all_s: f64,
    pub run_s: f64,
    pub stop_all_s: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Check {
    pub name: String,
    pub passed: bool,
    pub detail: String,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Machine {
    pub cpus: usize,
    pub cpu_busy_mean_pct: f64,
    pub cpu_busy_p90_pct: f64,
    pub mem_used_peak_gib: f64,
    pub mem_total_gib: f64,
    pub edge_fds_peak: u64,
    pub fd_limit: u64,
}

fn machine(t: &[Second]) -> Machine {
    let mut busy: Vec<f64> = t
        .iter()
        .map(|s| s.cpu_busy_pct)
        .filter(|b| *b > 0.0)
        .collect();
    busy.sort_by(f64::total_cmp);
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let total_kib: f64 = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0.0);
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let fd_limit = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3)?.parse().ok())
        .unwrap_or(0);
    Machine {
        cpus: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        cpu_busy_mean_pct: busy.iter().sum::<f64>() / busy.len().max(1) as f64,
        cpu_busy_p90_pct: busy.get(busy.len() * 9 / 10).copied().unwrap_or(0.0),
        mem_used_peak_gib: t.iter().map(|s| s.mem_used_gib).fold(0.0, f64::max),
        mem_total_gib: total_kib / (1024.0 * 1024.0),
        edge_fds_peak: t.iter().map(|s| s.edge_fds).max().unwrap_or(0),
        fd_limit,
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct EdgeMemory {
    pub edge: usize,
    pub peak_rss_mib: f64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    pub label: String,
    /// An existing deployment: its processes, logs and memory are not ours to read.
    pub remote: bool,
    pub passed: bool,
    pub notebooks: usize,
    pub direct_notebooks: usize,
    pub viewers_per_notebook: usize,
    pub edges: usize,
    pub duration_s: f64,
    pub large_output_bytes: Vec<usize>,
    pub timings: Timings,
    pub errors_unexpected: usize,
    pub errors_expected: usize,
    pub unexpected: Vec<ErrorEvent>,
    pub expected_by_fault: BTreeMap<String, usize>,
    pub viewer_mutations_tried: u64,
    pub viewer_mutations_succeeded: u64,
    pub viewer_mutations_detail: BTreeMap<String, u64>,
    pub outputs_produced: usize,
    pub outputs_seen_by_owner: usize,
    pub viewer_outputs_expected: usize,
    pub viewer_outputs_received: usize,
    pub viewer_outputs_missed: Vec<String>,
    /// Per traffic kind (`direct_*`: straight to Marimo, the baseline).
    pub latency: BTreeMap<String, Percentiles>,
    /// p50 and p99 through the edge over direct, per kind measured both ways.
    pub edge_over_direct: BTreeMap<String, (f64, f64)>,
    pub faults: Vec<Fault>,
    pub revocations: Vec<(String, Option<f64>)>,
    pub final_states: Vec<FinalState>,
    pub status_history: BTreeMap<usize, Vec<(f64, String, String)>>,
    pub edge_memory: Vec<EdgeMemory>,
    pub peak_open_sockets: i64,
    pub edge_rss_per_socket_kib: Option<f64>,
    /// The machine during the traffic: mean and peak CPU busy (%), peak memory in use (GiB),
    /// peak open files of the edges, and the file limit they run under.
    pub machine: Machine,
    pub stop_failures: Vec<String>,
    pub leftover_processes: Vec<String>,
    pub leaked_secrets: Vec<String>,
    pub notes: Vec<String>,
    pub checks: Vec<Check>,
    pub timeline: Vec<Second>,
    #[serde(skip)]
    pub child_pids: Vec<(i32, u64)>,
    #[serde(skip)]
    roles: Vec<NotebookRole>,
}

impl Report {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        opts: &Options,
        rec: &Recorder,
        plans: &[NotebookPlan],
        timings: Timings,
        final_states: Vec<FinalState>,
        stop_failures: Vec<String>,
        child_pids: Vec<(i32, u64)>,
        leaked_secrets: Vec<String>,
    ) -> Report {
        let run_end = timings.run_s;
        let mut g = rec.lock();
        record::explain(&mut g, FAULT_GRACE_S, run_end);
        let (expected, unexpected): (Vec<_>, Vec<_>) = g
            .errors
            .iter()
            .cloned()
            .partition(|e| e.explained_by.is_some());
        let mut expected_by_fault = BTreeMap::new();
        for e in &expected {
            *expected_by_fault
                .entry(e.explained_by.clone().unwrap_or_default())
                .or_insert(0) += 1;
        }

        // Every output the owner saw, against every viewer whose socket was open from the run
        // to VIEWER_GRACE_S after it.
        let mut latency: BTreeMap<String, Percentiles> = g
            .latency
            .iter()
            .map(|(k, h)| (k.clone(), record::percentiles(h)))
            .collect();
        let mut viewer_hist: BTreeMap<String, hdrhistogram::Histogram<u64>> = BTreeMap::new();
        let (mut expected_n, mut received_n, mut missed) = (0, 0, Vec::new());
        for o in g.outputs.iter().filter(|o| o.owner_seen_at_s.is_some()) {
            let Some(plan) = plans.get(o.notebook) else {
                continue;
            };
            for v in 0..plan.viewers.len() {
                let open = g.viewer_sockets.get(&(o.notebook, v)).is_some_and(|ivs| {
                    ivs.iter().any(|(a, b)| {
                        *a <= o.run_at_s && b.unwrap_or(run_end) >= o.run_at_s + VIEWER_GRACE_S
                    })
                });
                if !open {
                    continue;
                }
                expected_n += 1;
                match g
                    .viewer_received
                    .get(&(o.notebook, v))
                    .and_then(|m| m.get(&o.marker))
                {
                    Some(at) => {
                        received_n += 1;
                        // Per output kind: a line of text and a multi-megabyte table do not
                        // travel alike.
                        let prefix = if plan.role == NotebookRole::Direct {
                            "direct_"
                        } else {
                            ""
                        };
                        let kind = format!("{prefix}viewer_output_{}", o.kind);
                        viewer_hist
                            .entry(kind)
                            .or_insert_with(|| {
                                hdrhistogram::Histogram::new_with_bounds(1, 600_000_000, 3)
                                    .expect("bounds")
                            })
                            .saturating_record((((at - o.run_at_s).max(0.0)) * 1e6) as u64);
                    }
                    None => missed.push(format!(
                        "viewer {}.{v} missed {} ({} output, {} bytes, run at {:.1} s)",
                        o.notebook, o.marker, o.kind, o.bytes, o.run_at_s
                    )),
                }
            }
        }
        for (k, h) in &viewer_hist {
            latency.insert(k.clone(), record::percentiles(h));
        }
        let mut edge_over_direct = BTreeMap::new();
        for (k, p) in &latency {
            if let Some(d) = latency.get(&format!("direct_{k}")) {
                if d.p50_ms > 0.0 && d.p99_ms > 0.0 {
                    edge_over_direct.insert(k.clone(), (p.p50_ms / d.p50_ms, p.p99_ms / d.p99_ms));
                }
            }
        }
        let mut edge_memory: Vec<EdgeMemory> = g
            .edge_rss_peak_kib
            .iter()
            .map(|(e, kib)| EdgeMemory {
                edge: *e,
                peak_rss_mib: *kib as f64 / 1024.0,
            })
            .collect();
        edge_memory.sort_by_key(|m| m.edge);
        let mut timeline = g.seconds.clone();
        // A second the sampler missed (it reads once a second, and a slow API call delays it)
        // shows the readings before it, not a drop to zero.
        for i in 1..timeline.len() {
            if timeline[i].mem_used_gib == 0.0 {
                let prev = timeline[i - 1].clone();
                let s = &mut timeline[i];
                s.cpu_busy_pct = prev.cpu_busy_pct;
                s.mem_used_gib = prev.mem_used_gib;
                s.edge_rss_mib = prev.edge_rss_mib;
                s.edge_fds = prev.edge_fds;
            }
        }
        for s in &mut timeline {
            if let Some(h) = &s.latency {
                s.p50_ms = h.value_at_quantile(0.5) as f64 / 1000.0;
                s.p99_ms = h.value_at_quantile(0.99) as f64 / 1000.0;
            }
        }
        // Growth over each replica's first reading: what the sockets and traffic cost.
        let growth_kib: f64 = g
            .edge_rss_peak_kib
            .iter()
            .map(|(e, peak)| {
                peak.saturating_sub(*g.edge_rss_first_kib.get(e).unwrap_or(peak)) as f64
            })
            .sum();
        Report {
            label: opts.label.clone(),
            remote: opts.remote.is_some(),
            passed: false,
            notebooks: opts.notebooks,
            direct_notebooks: opts.direct,
            viewers_per_notebook: opts.viewers,
            edges: opts.edges,
            duration_s: opts.duration.as_secs_f64(),
            large_output_bytes: opts.behaviour.large_bytes.clone(),
            timings,
            errors_unexpected: unexpected.len(),
            errors_expected: expected.len(),
            unexpected,
            expected_by_fault,
            viewer_mutations_tried: g.viewer_mutations_tried,
            viewer_mutations_succeeded: g.viewer_mutations_succeeded,
            viewer_mutations_detail: g.viewer_mutations_detail.clone(),
            outputs_produced: g.outputs.len(),
            outputs_seen_by_owner: g
                .outputs
                .iter()
                .filter(|o| o.owner_seen_at_s.is_some())
                .count(),
            viewer_outputs_expected: expected_n,
            viewer_outputs_received: received_n,
            viewer_outputs_missed: missed,
            latency,
            edge_over_direct,
            faults: g.faults.clone(),
            revocations: g.revocations.clone(),
            final_states,
            status_history: g.statuses.clone(),
            edge_memory,
            peak_open_sockets: g.peak_open_sockets,
            edge_rss_per_socket_kib: (g.peak_open_sockets > 0)
                .then(|| growth_kib / g.peak_open_sockets as f64),
            machine: machine(&timeline),
            stop_failures,
            leftover_processes: Vec::new(),
            leaked_secrets,
            notes: g.notes.clone(),
            checks: Vec::new(),
            timeline,
            child_pids,
            roles: plans.iter().map(|p| p.role).collect(),
        }
    }
}

/// Judges the run: every check, and `passed` when all hold.
pub fn finish(r: &mut Report) {
    let mut checks = Vec::new();
    let mut check = |name: &str, passed: bool, detail: String| {
        checks.push(Check {
            name: name.to_owned(),
            passed,
            detail,
        })
    };
    check(
        "no unexpected error",
        r.errors_unexpected == 0,
        format!(
            "{} unexpected, {} explained by the injected faults",
            r.errors_unexpected, r.errors_expected
        ),
    );
    check(
        "viewers mutate nothing",
        r.viewer_mutations_succeeded == 0 && r.viewer_mutations_tried > 0,
        format!(
            "{} of {} forbidden attempts succeeded",
            r.viewer_mutations_succeeded, r.viewer_mutations_tried
        ),
    );
    check(
        "every viewer saw every owner output",
        r.viewer_outputs_missed.is_empty() && r.viewer_outputs_expected > 0,
        format!(
            "{} of {} expected deliveries ({} outputs produced, {} seen by their owner)",
            r.viewer_outputs_received,
            r.viewer_outputs_expected,
            r.outputs_produced,
            r.outputs_seen_by_owner
        ),
    );
    let slow: Vec<String> = r
        .revocations
        .iter()
        .filter(|(_, t)| t.is_none_or(|t| t > REVOCATION_LIMIT_S))
        .map(|(n, t)| {
            format!(
                "{n}: {}",
                t.map(|t| format!("{t:.2} s"))
                    .unwrap_or_else(|| "never closed".into())
            )
        })
        .collect();
    let worst = r.revocations.iter().filter_map(|r| r.1).fold(0.0, f64::max);
    check(
        "revoked viewers' sockets close within 5 s",
        slow.is_empty(),
        if r.revocations.is_empty() {
            "no revocation in this run (needs notebook 0 with 2+ viewers)".into()
        } else if slow.is_empty() {
            format!(
                "{} sockets, slowest {worst:.3} s after the unshare request",
                r.revocations.len()
            )
        } else {
            slow.join("; ")
        },
    );
    let unrecovered: Vec<String> = r
        .faults
        .iter()
        .filter(|f| f.recovered_after_s.is_none() || !f.lost.is_empty())
        .map(|f| {
            format!(
                "{} {}: {}",
                f.kind,
                f.target,
                if f.recovered_after_s.is_none() {
                    "never recovered".to_owned()
                } else {
                    f.lost.join("; ")
                }
            )
        })
        .collect();
    check(
        "every fault recovered, nothing lost",
        unrecovered.is_empty(),
        if unrecovered.is_empty() {
            format!("{} faults", r.faults.len())
        } else {
            unrecovered.join("; ")
        },
    );
    let states = state_problems(r);
    check(
        "statuses and lastActiveAt agree with what the clients did",
        states.is_empty(),
        if states.is_empty() {
            if r.roles.contains(&NotebookRole::IdleTab) {
                "active notebooks stayed running, the idle tab's went idle, the closed tab's detached, each then stopped by its timeout".into()
            } else {
                "active notebooks stayed running, lastActiveAt kept up with their owners".into()
            }
        } else {
            states.join("; ")
        },
    );
    check(
        "every notebook stops and no process is left",
        r.stop_failures.is_empty() && r.leftover_processes.is_empty(),
        if r.stop_failures.is_empty() && r.leftover_processes.is_empty() {
            format!(
                "all stopped in {:.1} s; no process left",
                r.timings.stop_all_s
            )
        } else {
            [r.stop_failures.clone(), r.leftover_processes.clone()]
                .concat()
                .join("; ")
        },
    );
    check(
        "no credential in any log",
        r.leaked_secrets.is_empty(),
        if r.remote {
            "not checked: the deployment's logs are not here".into()
        } else if r.leaked_secrets.is_empty() {
            "none of the run's keys or tokens".into()
        } else {
            r.leaked_secrets.join("; ")
        },
    );
    let peak = r
        .edge_memory
        .iter()
        .map(|m| m.peak_rss_mib)
        .fold(0.0, f64::max);
    check(
        "edge memory bounded",
        r.remote || (peak > 0.0 && peak < 1024.0),
        if r.remote {
            format!(
                "not measured here (read the edges' metrics); {} sockets at the peak",
                r.peak_open_sockets
            )
        } else {
            format!(
                "peak {peak:.1} MiB per replica, {} KiB of growth per open socket at the peak ({} sockets)",
                r.edge_rss_per_socket_kib.map(|k| format!("{k:.0}")).unwrap_or_else(|| "-".into()),
                r.peak_open_sockets
            )
        },
    );
    r.passed = checks.iter().all(|c| c.passed);
    r.checks = checks;
}

fn state_problems(r: &Report) -> Vec<String> {
    let mut out = Vec::new();
    let killed: Option<(usize, f64, f64)> = r
        .faults
        .iter()
        .find(|f| f.kind == "marimo_kill")
        .and_then(|f| {
            let n = f.target.trim_start_matches("notebook ").parse().ok()?;
            Some((
                n,
                f.at_s,
                f.at_s + f.recovered_after_s.unwrap_or(f64::INFINITY) + 5.0,
            ))
        });
    for (i, role) in r.roles.iter().enumerate() {
        let history = r.status_history.get(&i).cloned().unwrap_or_default();
        let fin = r.final_states.iter().find(|s| s.notebook == i);
        match role {
            NotebookRole::Active | NotebookRole::Direct => {
                for (at, status, msg) in &history {
                    // The first seconds: nobody has opened it yet (detached).
                    if *at < 10.0 || status == "running" {
                        continue;
                    }
                    if killed.is_some_and(|(n, from, to)| n == i && *at >= from && *at <= to) {
                        continue;
                    }
                    out.push(format!("notebook {i} was {status} at {at:.1} s ({msg})"));
                }
                if let Some((n, _, _)) = killed {
                    if n == i && !history.iter().any(|h| h.1 == "failed" && !h.2.is_empty()) {
                        out.push(format!("notebook {i}: its Marimo was killed but it never showed failed with a reason"));
                    }
                }
                if let Some(f) = fin {
                    match (f.last_active_at, f.last_owner_action) {
                        (Some(got), Some(want)) if got < want.floor() - 1.0 => out.push(format!(
                            "notebook {i}: lastActiveAt {:.0} behind the owner's last action {:.1} by more than a batch",
                            got, want
                        )),
                        (None, Some(_)) => out.push(format!("notebook {i}: lastActiveAt missing")),
                        _ => {}
                    }
                    if f.status != "running" {
                        out.push(format!(
                            "notebook {i} ended {} ({})",
                            f.status, f.status_message
                        ));
                    }
                }
            }
            NotebookRole::IdleTab | NotebookRole::Detached => {
                let (want, reason) = if *role == NotebookRole::IdleTab {
                    ("idle", "without activity")
                } else {
                    ("detached", "no browser connected")
                };
                let went = history.iter().position(|h| h.1 == want);
                let stopped = history
                    .iter()
                    .skip(went.unwrap_or(usize::MAX).saturating_add(0))
                    .find(|h| h.1 == "stopped");
                match (went, stopped) {
                    (None, _) => out.push(format!("notebook {i} ({role:?}) never went {want}")),
                    (Some(_), None) => out.push(format!(
                        "notebook {i} ({role:?}) went {want} but was not stopped by its timeout"
                    )),
                    (Some(_), Some((_, _, msg))) if !msg.contains(reason) => out.push(format!(
                        "notebook {i} ({role:?}) stopped, but not for being {want}: {msg}"
                    )),
                    _ => {}
                }
                if *role == NotebookRole::IdleTab {
                    // The UI's timers kept polling: they must not count as activity.
                    if let (Some(f), Some(first)) = (fin, fin.and_then(|f| f.first_owner_action)) {
                        if f.last_active_at.is_some_and(|t| t > first + 2.0) {
                            out.push(format!(
                                "notebook {i}: lastActiveAt moved {:.0} s past the tab's only action (polls counted as activity)",
                                f.last_active_at.unwrap_or(0.0) - first
                            ));
                        }
                    }
                }
            }
        }
    }
    out
}

pub fn write(r: &Report, out: &Path) -> Result<()> {
    std::fs::write(out.join("report.json"), serde_json::to_vec_pretty(r)?)?;
    std::fs::write(out.join("report.md"), markdown(r))?;
    super::timeline::draw(r, &out.join("timeline.svg"))?;
    Ok(())
}

fn markdown(r: &Report) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(s, "# Load test: {}\n", r.label);
    let _ = writeln!(
        s,
        "**{}**: {} notebooks through {} edge replicas (+{} straight to Marimo as the baseline, +1 idle tab, +1 closed tab), {} viewers each, {:.0} s of traffic. Set-up {:.0} s (all notebooks up in {:.1} s), stop of all notebooks {:.1} s.\n",
        if r.passed { "PASSED" } else { "FAILED" },
        r.notebooks, r.edges, r.direct_notebooks, r.viewers_per_notebook, r.timings.run_s,
        r.timings.setup_s, r.timings.start_all_s, r.timings.stop_all_s
    );
    let _ = writeln!(
        s,
        "![timeline](timeline.svg)\n\n## Checks\n\n| | check | detail |\n|---|---|---|"
    );
    for c in &r.checks {
        let _ = writeln!(
            s,
            "| {} | {} | {} |",
            if c.passed { "ok" } else { "**FAIL**" },
            c.name,
            c.detail
        );
    }
    let _ = writeln!(
        s,
        "\n## Faults\n\n| fault | target | at | recovered after | lost |\n|---|---|---|---|---|"
    );
    for f in &r.faults {
        let _ = writeln!(
            s,
            "| {} | {} | {:.1} s | {} | {} |",
            f.kind,
            f.target,
            f.at_s,
            f.recovered_after_s
                .map(|t| format!("{t:.1} s"))
                .unwrap_or_else(|| "never".into()),
            if f.lost.is_empty() {
                "nothing".into()
            } else {
                f.lost.join("; ")
            }
        );
    }
    for (fault, n) in &r.expected_by_fault {
        let _ = writeln!(
            s,
            "\n- {n} client errors explained by {fault} (sockets it cut, calls while it lasted)"
        );
    }
    let _ = writeln!(
        s,
        "\n## Latency (ms)\n\n| kind | count | p50 | p90 | p99 | max |\n|---|---|---|---|---|---|"
    );
    for (k, p) in &r.latency {
        let _ = writeln!(
            s,
            "| {k} | {} | {:.1} | {:.1} | {:.1} | {:.1} |",
            p.count, p.p50_ms, p.p90_ms, p.p99_ms, p.max_ms
        );
    }
    if !r.edge_over_direct.is_empty() {
        let _ = writeln!(s, "\nThrough the edge over straight to Marimo, same run:\n\n| kind | p50 ratio | p99 ratio |\n|---|---|---|");
        for (k, (a, b)) in &r.edge_over_direct {
            let _ = writeln!(s, "| {k} | {a:.2} | {b:.2} |");
        }
    }
    let _ = writeln!(
        s,
        "\n## Viewers\n\n- {} forbidden attempts, {} succeeded: {}\n- {} of {} expected output deliveries received",
        r.viewer_mutations_tried,
        r.viewer_mutations_succeeded,
        r.viewer_mutations_detail.iter().map(|(k, v)| format!("{k} ×{v}")).collect::<Vec<_>>().join(", "),
        r.viewer_outputs_received,
        r.viewer_outputs_expected
    );
    for m in r.viewer_outputs_missed.iter().take(20) {
        let _ = writeln!(s, "  - {m}");
    }
    for (n, t) in &r.revocations {
        let _ = writeln!(
            s,
            "- revoked {n}: socket closed {} after the unshare request",
            t.map(|t| format!("{t:.3} s"))
                .unwrap_or_else(|| "never".into())
        );
    }
    let _ = writeln!(s, "\n## Edge memory\n");
    for m in &r.edge_memory {
        let _ = writeln!(s, "- edge-{}: peak {:.1} MiB RSS", m.edge, m.peak_rss_mib);
    }
    let _ = writeln!(
        s,
        "- peak {} open sockets (all replicas); edge RSS grew {} KiB per socket (peak over first reading)",
        r.peak_open_sockets,
        r.edge_rss_per_socket_kib.map(|k| format!("{k:.0}")).unwrap_or_else(|| "-".into())
    );
    let m = &r.machine;
    let _ = writeln!(
        s,
        "\n## The machine\n\n- CPU busy {:.0} % on average, {:.0} % at p90 ({} cores)\n- memory in use at most {:.1} of {:.1} GiB\n- the edges' open files at most {} (limit {} each)",
        m.cpu_busy_mean_pct, m.cpu_busy_p90_pct, m.cpus, m.mem_used_peak_gib, m.mem_total_gib, m.edge_fds_peak, m.fd_limit
    );
    if !r.unexpected.is_empty() {
        let _ = writeln!(s, "\n## Unexpected errors (first 30)\n");
        for e in r.unexpected.iter().take(30) {
            let _ = writeln!(
                s,
                "- {:.1} s {:?} via {:?}: {}",
                e.at_s, e.actor, e.via, e.what
            );
        }
    }
    let _ = writeln!(s, "\n## Status history\n");
    for (i, h) in &r.status_history {
        let role = r
            .roles
            .get(*i)
            .map(|r| format!("{r:?}"))
            .unwrap_or_default();
        let line: Vec<String> = h.iter().map(|(t, st, _)| format!("{st}@{t:.0}s")).collect();
        let _ = writeln!(s, "- notebook {i} ({role}): {}", line.join(" → "));
    }
    if !r.notes.is_empty() {
        let _ = writeln!(s, "\n## Notes\n");
        for n in &r.notes {
            let _ = writeln!(s, "- {n}");
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run in which everything held.
    fn clean() -> Report {
        Report {
            viewer_mutations_tried: 10,
            viewer_outputs_expected: 4,
            viewer_outputs_received: 4,
            edge_memory: vec![EdgeMemory {
                edge: 0,
                peak_rss_mib: 30.0,
            }],
            roles: vec![NotebookRole::Active, NotebookRole::IdleTab],
            status_history: BTreeMap::from([
                (
                    0,
                    vec![
                        (0.1, "detached".into(), String::new()),
                        (1.0, "running".into(), String::new()),
                    ],
                ),
                (
                    1,
                    vec![
                        (1.0, "running".into(), String::new()),
                        (21.0, "idle".into(), String::new()),
                        (
                            46.0,
                            "stopped".into(),
                            "stopped after 45 s without activity (idleTimeoutSeconds)".into(),
                        ),
                    ],
                ),
            ]),
            ..Report::default()
        }
    }

    fn failed(r: &Report) -> Vec<&str> {
        r.checks
            .iter()
            .filter(|c| !c.passed)
            .map(|c| c.name.as_str())
            .collect()
    }

    #[test]
    fn a_clean_run_passes_and_each_broken_promise_fails_its_own_check() {
        let mut r = clean();
        finish(&mut r);
        assert!(r.passed, "{:?}", r.checks);

        let mut r = clean();
        r.viewer_mutations_succeeded = 1;
        finish(&mut r);
        assert_eq!(failed(&r), ["viewers mutate nothing"]);

        // Nothing tried proves nothing.
        let mut r = clean();
        r.viewer_mutations_tried = 0;
        finish(&mut r);
        assert_eq!(failed(&r), ["viewers mutate nothing"]);

        let mut r = clean();
        r.viewer_outputs_missed = vec!["viewer 0.0 missed LTMARK0x1Z".into()];
        finish(&mut r);
        assert_eq!(failed(&r), ["every viewer saw every owner output"]);

        let mut r = clean();
        r.revocations = vec![
            ("viewer 0.1".into(), Some(0.01)),
            ("viewer 0.2".into(), Some(5.5)),
        ];
        finish(&mut r);
        assert_eq!(failed(&r), ["revoked viewers' sockets close within 5 s"]);

        let mut r = clean();
        r.errors_unexpected = 1;
        finish(&mut r);
        assert_eq!(failed(&r), ["no unexpected error"]);

        let mut r = clean();
        r.leftover_processes = vec!["4242: marimo edit".into()];
        finish(&mut r);
        assert_eq!(failed(&r), ["every notebook stops and no process is left"]);
    }

    #[test]
    fn statuses_must_follow_what_the_clients_did() {
        // An active notebook seen idle after the first seconds fails; in the first seconds
        // (nobody has opened it yet) it does not.
        let mut r = clean();
        r.status_history
            .get_mut(&0)
            .expect("nb 0")
            .push((30.0, "idle".into(), String::new()));
        finish(&mut r);
        assert_eq!(
            failed(&r),
            ["statuses and lastActiveAt agree with what the clients did"]
        );
        let mut r = clean();
        r.status_history
            .get_mut(&0)
            .expect("nb 0")
            .insert(1, (5.0, "idle".into(), String::new()));
        finish(&mut r);
        assert!(r.passed, "{:?}", r.checks);

        // The idle tab's notebook must go idle and be stopped for it, not for something else.
        let mut r = clean();
        r.status_history.get_mut(&1).expect("nb 1")[2].2 =
            "stopped after 35 s with no browser connected".into();
        finish(&mut r);
        assert_eq!(
            failed(&r),
            ["statuses and lastActiveAt agree with what the clients did"]
        );

        // lastActiveAt behind the owner's last action by more than a batch fails.
        let mut r = clean();
        r.final_states = vec![FinalState {
            notebook: 0,
            role: "Active".into(),
            status: "running".into(),
            status_message: String::new(),
            last_active_at: Some(1000.0),
            last_owner_action: Some(1003.5),
            first_owner_action: Some(900.0),
        }];
        finish(&mut r);
        assert_eq!(
            failed(&r),
            ["statuses and lastActiveAt agree with what the clients did"]
        );
        r.final_states[0].last_active_at = Some(1002.0);
        finish(&mut r);
        assert!(r.passed, "{:?}", r.checks);
    }
}
