//! The fault plan and the sampler.
//!
//! Faults come at fixed fractions of the run, one at a time, each waiting for the system to be
//! whole again before the next: a replica killed with SIGKILL, a team unshared (its viewers'
//! sockets must close within 5 s), the control plane restarted, PostgreSQL restarted, one
//! notebook's Marimo killed. For each the report says how long recovery took and what was
//! lost besides the sockets the fault itself cut.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::api::{NotebookPlan, NotebookRole};
use super::deploy::{self, Deployment};
use super::record::{Actor, Fault, FaultScope, Role, Via};
use super::traffic::{unix_now, World};

/// Every second: the notebooks' statuses as the API reports them, and the edges' memory.
pub async fn sample(
    w: Arc<World>,
    plans: Vec<NotebookPlan>,
    admin: String,
    edge_pids: Arc<Mutex<HashMap<usize, u32>>>,
) {
    let actor = Actor {
        notebook: None,
        role: Role::Sampler,
        client: 0,
    };
    let index: HashMap<String, usize> = plans.iter().map(|p| (p.id.clone(), p.index)).collect();
    let mut cpu = cpu_times();
    loop {
        let now_cpu = cpu_times();
        let busy = match (cpu, now_cpu) {
            (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => {
                100.0 * (b1 - b0) as f64 / (t1 - t0) as f64
            }
            _ => 0.0,
        };
        cpu = now_cpu;
        let fds: u64 = edge_pids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|pid| {
                std::fs::read_dir(format!("/proc/{pid}/fd"))
                    .map(|d| d.count() as u64)
                    .unwrap_or(0)
            })
            .sum();
        w.rec.machine(busy, mem_used_gib().unwrap_or(0.0), fds);
        let pids: Vec<(usize, u32)> = edge_pids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(i, p)| (*i, *p))
            .collect();
        for (i, pid) in pids {
            if let Some(kib) = deploy::rss_kib(pid) {
                w.rec.edge_rss(i, kib);
            }
        }
        match w
            .api
            .call(&admin, "GET", "/workloads/notebooks?limit=100", None)
            .await
        {
            Ok(a) if a.status == 200 => {
                let now = w.rec.now();
                let mut g = w.rec.lock();
                for n in a.body["included"]["notebooks"]
                    .as_array()
                    .into_iter()
                    .flatten()
                {
                    let Some(&i) = n["id"].as_str().and_then(|id| index.get(id)) else {
                        continue;
                    };
                    let status = n["status"].as_str().unwrap_or_default().to_owned();
                    let msg = n["statusMessage"].as_str().unwrap_or_default().to_owned();
                    let seen = g.statuses.entry(i).or_default();
                    if seen.last().map(|s| &s.1) != Some(&status) {
                        seen.push((now, status, msg));
                    }
                }
            }
            Ok(a) => w
                .rec
                .error(&actor, Via::Api, format!("list notebooks: {}", a.status)),
            Err(e) => w
                .rec
                .error(&actor, Via::Api, format!("list notebooks: {e}")),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// (busy, total) jiffies of all CPUs, from `/proc/stat`.
fn cpu_times() -> Option<(u64, u64)> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    let v: Vec<u64> = s
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3)? + v.get(4).unwrap_or(&0);
    Some((total - idle, total))
}

/// Memory in use on the machine (MemTotal − MemAvailable), GiB.
fn mem_used_gib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib = |key: &str| -> Option<f64> {
        s.lines()
            .find(|l| l.starts_with(key))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    Some((kib("MemTotal:")? - kib("MemAvailable:")?) / (1024.0 * 1024.0))
}

async fn until(within: Duration, mut ok: impl AsyncFnMut() -> bool) -> Option<f64> {
    let started = Instant::now();
    while started.elapsed() < within {
        if ok().await {
            return Some(started.elapsed().as_secs_f64());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

/// Runs the fault plan; returns when the last fault has recovered (or given up).
pub async fn plan(
    w: &Arc<World>,
    mut d: Option<&mut Deployment>,
    plans: &[NotebookPlan],
    admin: &str,
    duration: Duration,
    edge_pids: &Arc<Mutex<HashMap<usize, u32>>>,
    child_pids: &mut Vec<(i32, u64)>,
) {
    let at = |f: f64| Duration::from_secs_f64(duration.as_secs_f64() * f);
    let rec = &w.rec;
    let wait_until = |t: Duration| {
        let now = Duration::from_secs_f64(rec.now());
        tokio::time::sleep(t.saturating_sub(now))
    };

    // 1. An edge replica killed (SIGKILL): its clients move to another with their cookies.
    wait_until(at(0.15)).await;
    if let Some(d) = d.as_deref_mut().filter(|d| d.edges.len() >= 2) {
        let victim = d.edges.len() - 1;
        let (cut, moved_before) = {
            let g = rec.lock();
            (
                g.open_by_edge.get(&victim).copied().unwrap_or(0),
                g.moved_from.get(&victim).copied().unwrap_or(0),
            )
        };
        let f = rec.fault(Fault {
            kind: "edge_kill".into(),
            target: format!("edge-{victim}"),
            at_s: rec.now(),
            recovered_after_s: None,
            lost: vec![],
            scope: FaultScope::Edge(victim),
        });
        d.edges[victim].part.kill();
        edge_pids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&victim);
        // Recovered: every socket the kill cut is open again on another replica.
        let moved = || rec.lock().moved_from.get(&victim).copied().unwrap_or(0) - moved_before;
        let back = until(Duration::from_secs(60), async || moved() >= cut).await;
        let lost = match back {
            Some(_) => vec![],
            None => vec![format!(
                "{} of the {cut} sockets it cut not reopened elsewhere within 60 s",
                cut - moved()
            )],
        };
        rec.note(format!("the edge kill cut {cut} sockets"));
        rec.recovered(f, back, lost);
        // Back to full strength for the rest of the run.
        if d.restart_edge(victim).is_ok()
            && d.wait_edge(victim, Duration::from_secs(30)).await.is_ok()
        {
            if let Some(pid) = d.edges[victim].part.pid() {
                edge_pids
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(victim, pid);
            }
            rec.note(format!("t={:.1}s edge-{victim} started again", rec.now()));
        }
    }

    // 2. A team removed from a notebook: its viewers' sockets close within 5 s.
    wait_until(at(0.30)).await;
    if let Some(nb) = plans
        .iter()
        .find(|p| p.role == NotebookRole::Active && p.teams.len() >= 2)
    {
        let (team, members) = nb.teams[1].clone();
        {
            let mut r = w.revoked.lock().unwrap_or_else(|p| p.into_inner());
            for v in &members {
                r.insert((nb.index, *v));
            }
        }
        // Counted from the request: the API call's own time is part of what a revoked
        // viewer sees.
        *w.revoked_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(rec.now());
        let answer = w
            .api
            .call(
                admin,
                "DELETE",
                &format!("/workloads/notebooks/{}/teams/{team}", nb.id),
                None,
            )
            .await;
        match answer {
            Ok(a) if a.status == 204 || a.status == 200 => rec.note(format!(
                "t={:.2}s team unshared from notebook {} (the request took {:.3} s)",
                rec.now(),
                nb.index,
                rec.now()
                    - w.revoked_at
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .unwrap_or(0.0)
            )),
            other => rec.note(format!(
                "unshare answered {:?}",
                other.map(|a| (a.status, a.body)).map_err(|e| e.to_string())
            )),
        }
        tokio::time::sleep(Duration::from_secs(10)).await;
        let mut g = rec.lock();
        for v in members {
            let name = format!("viewer {}.{v}", nb.index);
            if !g.revocations.iter().any(|r| r.0 == name) {
                g.revocations.push((name, None));
            }
        }
    }

    // 3. The control plane restarted (SIGTERM, as a rollout does): the edges keep serving what
    //    they know; activity is not lost for more than one batch.
    wait_until(at(0.42)).await;
    let Some(d) = d else {
        rec.note("an existing deployment: the restarts and kills are left out".to_owned());
        return;
    };
    if let Some(pid) = d.control.pid() {
        child_pids.extend(deploy::descendants(pid));
    }
    let f = rec.fault(Fault {
        kind: "control_restart".into(),
        target: "control".into(),
        at_s: rec.now(),
        recovered_after_s: None,
        lost: vec![],
        scope: FaultScope::ControlPath,
    });
    let started = Instant::now();
    let restarted = d.restart_control().await;
    let back = match restarted {
        // From the SIGTERM: the API is away while the old process drains and the new one
        // starts.
        Ok(()) => until(Duration::from_secs(60), async || d.control_ready().await)
            .await
            .map(|_| started.elapsed().as_secs_f64()),
        Err(e) => {
            rec.note(format!("control plane did not start again: {e}"));
            None
        }
    };
    let lost = activity_lost(w, plans, admin, back).await;
    rec.recovered(f, back, lost);

    // 4. PostgreSQL restarted (fast: connections cut).
    wait_until(at(0.56)).await;
    let f = rec.fault(Fault {
        kind: "postgres_restart".into(),
        target: "postgres".into(),
        at_s: rec.now(),
        recovered_after_s: None,
        lost: vec![],
        scope: FaultScope::ControlPath,
    });
    let started = Instant::now();
    // pg_ctl waits for the server: off the load's async threads meanwhile.
    let restarted = tokio::task::block_in_place(|| d.pg.restart());
    let back = match restarted {
        Ok(()) => until(Duration::from_secs(60), async || {
            w.api
                .call(admin, "GET", "/iam/me", None)
                .await
                .is_ok_and(|a| a.status == 200)
        })
        .await
        // From the restart's start: pg_ctl itself waits for the server to be back.
        .map(|_| started.elapsed().as_secs_f64()),
        Err(e) => {
            rec.note(format!("PostgreSQL did not restart: {e}"));
            None
        }
    };
    let lost = activity_lost(w, plans, admin, back).await;
    rec.recovered(f, back, lost);

    // 5. One notebook's Marimo killed: it goes `failed` with a reason, the others are untouched;
    //    its owner starts it again and everyone re-opens.
    wait_until(at(0.70)).await;
    let actives: Vec<&NotebookPlan> = plans
        .iter()
        .filter(|p| p.role == NotebookRole::Active)
        .collect();
    if actives.len() >= 2 {
        let nb = actives[actives.len() - 1];
        match d.marimo_group(&nb.id) {
            Ok(pgid) => {
                let killed = Instant::now();
                let kill_at = rec.now();
                let f = rec.fault(Fault {
                    kind: "marimo_kill".into(),
                    target: format!("notebook {}", nb.index),
                    at_s: rec.now(),
                    recovered_after_s: None,
                    lost: vec![],
                    scope: FaultScope::Notebook(nb.index),
                });
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pgid),
                    nix::sys::signal::Signal::SIGKILL,
                );
                let failed = until(Duration::from_secs(60), async || {
                    rec.lock()
                        .statuses
                        .get(&nb.index)
                        .is_some_and(|s| s.iter().any(|(t, st, _)| st == "failed" && *t >= kill_at))
                })
                .await;
                rec.note(format!(
                    "notebook {} went failed {} after its Marimo was killed",
                    nb.index,
                    failed
                        .map(|s| format!("{s:.1} s"))
                        .unwrap_or_else(|| "never".into())
                ));
                let back = until(Duration::from_secs(180), async || {
                    w.owner_back
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .contains_key(&nb.index)
                })
                .await;
                let lost = if failed.is_none() {
                    vec!["the notebook was never reported failed".to_owned()]
                } else {
                    vec![]
                };
                // From the kill until its owner ran a cell again.
                rec.recovered(f, back.map(|_| killed.elapsed().as_secs_f64()), lost);
            }
            Err(e) => rec.note(format!("marimo_kill skipped: {e}")),
        }
    }
}

/// After a fault on the control path recovered (`back`): two batches later, every owner's
/// activity up to shortly before must be known. What is missing was lost.
async fn activity_lost(
    w: &World,
    plans: &[NotebookPlan],
    admin: &str,
    back: Option<f64>,
) -> Vec<String> {
    if back.is_none() {
        return Vec::new();
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    activity_gaps(w, plans, admin, 2.5).await
}

/// Notebooks whose `lastActiveAt` is behind their owner's activity up to `settle_s` ago by
/// more than one activity batch (1 s) and the API's whole-second rounding.
pub async fn activity_gaps(
    w: &World,
    plans: &[NotebookPlan],
    admin: &str,
    settle_s: f64,
) -> Vec<String> {
    let mut gaps = Vec::new();
    let cutoff = unix_now() - settle_s;
    for p in plans.iter().filter(|p| p.role == NotebookRole::Active) {
        let want = w
            .owner_actions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&p.index)
            .and_then(|v| v.iter().copied().filter(|t| *t <= cutoff).reduce(f64::max));
        let Some(want) = want else { continue };
        let Ok(n) = w.api.notebook(admin, &p.id).await else {
            gaps.push(format!("notebook {}: not readable", p.index));
            continue;
        };
        if n["status"] == "failed" || n["status"] == "starting" {
            continue;
        }
        let got = n["lastActiveAt"].as_str().and_then(parse_rfc3339);
        match got {
            Some(got) if got >= want.floor() - 1.0 => {}
            got => gaps.push(format!(
                "notebook {}: lastActiveAt {} behind its owner's last action by {:.1} s",
                p.index,
                n["lastActiveAt"],
                got.map(|g| want - g).unwrap_or(f64::INFINITY)
            )),
        }
    }
    gaps
}

pub fn parse_rfc3339(s: &str) -> Option<f64> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
    Some(t.unix_timestamp() as f64)
}

/// What the API says of each notebook at the end of the traffic.
#[derive(Clone, Debug, serde::Serialize)]
pub struct FinalState {
    pub notebook: usize,
    pub role: String,
    pub status: String,
    pub status_message: String,
    pub last_active_at: Option<f64>,
    /// The owner's last action (unix seconds) at least 2.5 s before the reading.
    pub last_owner_action: Option<f64>,
    pub first_owner_action: Option<f64>,
}

pub async fn final_state(w: &World, plans: &[NotebookPlan], admin: &str) -> Vec<FinalState> {
    // Let the last batch arrive.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let cutoff = unix_now() - 2.5;
    let mut out = Vec::new();
    for p in plans {
        let n = w.api.notebook(admin, &p.id).await.unwrap_or_default();
        let actions = w
            .owner_actions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&p.index)
            .cloned()
            .unwrap_or_default();
        out.push(FinalState {
            notebook: p.index,
            role: format!("{:?}", p.role),
            status: n["status"].as_str().unwrap_or_default().to_owned(),
            status_message: n["statusMessage"].as_str().unwrap_or_default().to_owned(),
            last_active_at: n["lastActiveAt"].as_str().and_then(parse_rfc3339),
            last_owner_action: actions
                .iter()
                .copied()
                .filter(|t| *t <= cutoff)
                .reduce(f64::max),
            first_owner_action: actions.first().copied(),
        });
    }
    out
}
