//! The load-tested deployment (`scripts/loadtest.sh`): PostgreSQL, the control plane, several
//! edge replicas and the local runtime on loopback, many notebooks each with an owner working
//! and viewers watching, faults injected while they do, and a report of what held.
//!
//! The run, in order:
//! 1. [`deploy`]: start the parts; [`api::populate`]: owners, viewers in teams, notebooks.
//! 2. Start every notebook, then the people ([`traffic`]) and the sampler (statuses, the edges'
//!    memory).
//! 3. The fault plan ([`faults`]), at fractions of the duration, each waiting for recovery.
//! 4. Stop the people, check what the API says against what they did, stop every notebook
//!    through the API, shut the deployment down, look for leftover processes.
//! 5. [`report`]: `report.json`, `report.md`, `timeline.svg`.

pub mod api;
pub mod deploy;
pub mod faults;
pub mod record;
pub mod report;
pub mod tab;
pub mod timeline;
pub mod traffic;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use api::{Api, NotebookRole};
use record::Recorder;
use traffic::{Behaviour, World};

/// What to run.
#[derive(Clone, Debug)]
pub struct Options {
    pub marina: PathBuf,
    pub venv: PathBuf,
    pub out: PathBuf,
    /// Notebooks with an owner working through the edges.
    pub notebooks: usize,
    /// Of which this many are driven straight to Marimo instead (the baseline), in addition.
    pub direct: usize,
    pub viewers: usize,
    pub edges: usize,
    pub duration: Duration,
    pub behaviour: Behaviour,
    pub idle_after_s: u64,
    pub idle_timeout_s: u64,
    pub detached_timeout_s: u64,
    pub faults: bool,
    pub label: String,
    /// An existing deployment to drive instead of starting one on loopback.
    pub remote: Option<Remote>,
}

/// A deployment someone else runs: its addresses and keys (`docs/deploy.md`, "Load-testing
/// your deployment"). The faults that need its processes are skipped; the sharing change,
/// the traffic and the checks of what the API says still run.
#[derive(Clone, Debug)]
pub struct Remote {
    /// The control API, e.g. `https://marina-api.example.com`.
    pub api: String,
    /// An admin API key of the organization the run may fill (and empties again after).
    pub admin_key: String,
    /// `proxy.public_url`: what the one-time URLs name.
    pub public_url: String,
    /// Addresses of the edge replicas to spread clients over (default: the public URL).
    pub edges: Vec<String>,
    /// The internal token, only for the direct-to-Marimo baseline (and only where the
    /// notebooks' addresses are reachable from here).
    pub internal_token: Option<String>,
}

/// Where the run's clients go, whoever started the deployment.
struct Conn {
    api: String,
    admin_key: String,
    public_url: String,
    edges: Vec<String>,
    internal_token: String,
}

pub async fn run(opts: Options) -> Result<report::Report> {
    std::fs::create_dir_all(&opts.out)?;
    let started = Instant::now();
    if let Some(remote) = &opts.remote {
        eprintln!("loadtest: driving the deployment at {}", remote.api);
        let conn = Conn {
            api: remote.api.trim_end_matches('/').to_owned(),
            admin_key: remote.admin_key.clone(),
            public_url: remote.public_url.trim_end_matches('/').to_owned(),
            edges: if remote.edges.is_empty() {
                vec![remote.public_url.trim_end_matches('/').to_owned()]
            } else {
                remote
                    .edges
                    .iter()
                    .map(|e| e.trim_end_matches('/').to_owned())
                    .collect()
            },
            internal_token: remote.internal_token.clone().unwrap_or_default(),
        };
        let mut rep = drive(&opts, &conn, None, started).await?;
        report::finish(&mut rep);
        report::write(&rep, &opts.out)?;
        return Ok(rep);
    }
    let work = tempfile::Builder::new()
        .prefix("marina-loadtest-")
        .tempdir_in(std::env::temp_dir())?;
    // Readable by the postgres user PostgreSQL runs as.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755))?;
    }
    eprintln!(
        "loadtest: starting PostgreSQL, the control plane and {} edges in {}",
        opts.edges,
        work.path().display()
    );
    let mut deployment = deploy::Deployment::start(&deploy::Plan {
        marina: opts.marina.clone(),
        venv: opts.venv.clone(),
        dir: work.path().to_owned(),
        edges: opts.edges,
        idle_after_s: opts.idle_after_s,
        detached_timeout_s: opts.detached_timeout_s,
    })
    .await?;
    let conn = Conn {
        api: deployment.api.clone(),
        admin_key: deployment.admin_key.clone(),
        public_url: deployment.public_url.clone(),
        edges: deployment.edges.iter().map(|e| e.url.clone()).collect(),
        internal_token: deployment.internal_token.clone(),
    };
    let result = drive(&opts, &conn, Some(&mut deployment), started).await;
    // Whatever happened, the logs go to the output folder for a person to read.
    for name in
        std::iter::once("control".to_owned()).chain((0..opts.edges).map(|i| format!("edge-{i}")))
    {
        let _ = std::fs::copy(
            work.path().join(format!("{name}.log")),
            opts.out.join(format!("{name}.log")),
        );
    }
    let mut rep = result?;
    rep.leftover_processes = {
        let pids = rep.child_pids.clone();
        deployment.shut_down();
        tokio::time::sleep(Duration::from_millis(500)).await;
        deploy::leftovers(work.path(), &pids)
    };
    report::finish(&mut rep);
    report::write(&rep, &opts.out)?;
    Ok(rep)
}

async fn drive(
    opts: &Options,
    conn: &Conn,
    mut d: Option<&mut deploy::Deployment>,
    started: Instant,
) -> Result<report::Report> {
    let api = Api::new(&conn.api);
    let admin = conn.admin_key.clone();
    let mut roles = vec![NotebookRole::Active; opts.notebooks];
    roles.extend(std::iter::repeat_n(NotebookRole::Direct, opts.direct));
    // The idle and detached checks need this run's short server-wide timeouts: only on the
    // deployment it starts itself.
    if opts.remote.is_none() {
        roles.push(NotebookRole::IdleTab);
        roles.push(NotebookRole::Detached);
    }
    eprintln!(
        "loadtest: creating {} notebooks, their owners and {} viewers each",
        roles.len(),
        opts.viewers
    );
    let plans = api::populate(&api, &admin, &roles, opts.viewers, opts.idle_timeout_s).await?;
    let setup_started = Instant::now();
    for p in &plans {
        api.call(
            &p.owner.key,
            "POST",
            &format!("/workloads/notebooks/{}/start", p.id),
            None,
        )
        .await?
        .ok(200, "start notebook")?;
    }
    let deadline = Instant::now() + Duration::from_secs(120 + 20 * plans.len() as u64);
    for p in &plans {
        loop {
            let n = api.notebook(&admin, &p.id).await?;
            match n["status"].as_str().unwrap_or_default() {
                "running" | "idle" | "detached" => break,
                "failed" => anyhow::bail!(
                    "notebook {} failed to start: {}",
                    p.index,
                    n["statusMessage"]
                ),
                _ if Instant::now() > deadline => anyhow::bail!("notebook {} not up: {n}", p.index),
                _ => tokio::time::sleep(Duration::from_millis(250)).await,
            }
        }
    }
    let start_all_s = setup_started.elapsed().as_secs_f64();
    eprintln!(
        "loadtest: {} notebooks up in {start_all_s:.1} s; traffic for {} s",
        plans.len(),
        opts.duration.as_secs()
    );

    let rec = Recorder::new();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let world = Arc::new(World {
        rec: rec.clone(),
        api: api.clone(),
        public_url: conn.public_url.clone(),
        edges: conn.edges.clone(),
        internal_token: conn.internal_token.clone(),
        behaviour: opts.behaviour.clone(),
        stop: stop_rx,
        revoked: Mutex::default(),
        revoked_at: Mutex::default(),
        owner_sid: Mutex::default(),
        owner_back: Mutex::default(),
        owner_actions: Mutex::default(),
    });
    let mut tasks = Vec::new();
    for p in &plans {
        match p.role {
            NotebookRole::Active | NotebookRole::Direct => {
                tasks.push(tokio::spawn(traffic::owner(world.clone(), p.clone())));
                for v in 0..p.viewers.len() {
                    tasks.push(tokio::spawn(traffic::viewer(world.clone(), p.clone(), v)));
                }
            }
            NotebookRole::IdleTab => tasks.push(tokio::spawn(traffic::quiet_tab(
                world.clone(),
                p.clone(),
                None,
            ))),
            NotebookRole::Detached => tasks.push(tokio::spawn(traffic::quiet_tab(
                world.clone(),
                p.clone(),
                Some(Duration::from_secs(5)),
            ))),
        }
    }
    let pids = edge_pids(d.as_deref());
    let sampler = tokio::spawn(faults::sample(
        world.clone(),
        plans.clone(),
        admin.clone(),
        pids.clone(),
    ));
    let mut child_pids = Vec::new();
    if opts.faults {
        faults::plan(
            &world,
            d.as_deref_mut(),
            &plans,
            &admin,
            opts.duration,
            &pids,
            &mut child_pids,
        )
        .await;
    }
    let remaining = opts
        .duration
        .saturating_sub(Duration::from_secs_f64(rec.now()));
    tokio::time::sleep(remaining).await;
    if let Some(pid) = d.as_ref().and_then(|d| d.control.pid()) {
        child_pids.extend(deploy::descendants(pid));
    }

    // What the API says now, before the people leave: the last owner actions it must know.
    let end_s = rec.now();
    let state = faults::final_state(&world, &plans, &admin).await;
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(30), t).await;
    }
    sampler.abort();

    // Every notebook stops through the API, as the host application would end the day.
    let stop_started = Instant::now();
    let mut stop_failures = Vec::new();
    for p in &plans {
        let a = api
            .call(
                &admin,
                "POST",
                &format!("/workloads/notebooks/{}/stop", p.id),
                None,
            )
            .await;
        if let Ok(a) = &a {
            if a.status != 200 && a.status != 409 {
                stop_failures.push(format!(
                    "notebook {}: stop answered {} {}",
                    p.index, a.status, a.body
                ));
            }
        }
    }
    for p in &plans {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let s = api
                .notebook(&admin, &p.id)
                .await
                .map(|n| n["status"].as_str().unwrap_or_default().to_owned())
                .unwrap_or_default();
            if s == "stopped" || s == "failed" {
                break;
            }
            if Instant::now() > deadline {
                stop_failures.push(format!("notebook {} still {s} 60 s after stop", p.index));
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    let stop_all_s = stop_started.elapsed().as_secs_f64();
    // What the run made goes again (on a shared deployment, nothing of it may stay).
    stop_failures.extend(api::remove(&api, &admin, &plans).await);
    let leaked = match &d {
        Some(d) => {
            let edge_logs: Vec<String> = (0..d.edges.len())
                .map(|i| d.edges[i].part.log_tail(2000))
                .collect();
            leaked_secrets(&plans, d, &edge_logs, &d.control.log_tail(5000))
        }
        None => Vec::new(),
    };
    Ok(report::Report::new(
        opts,
        &rec,
        &plans,
        report::Timings {
            setup_s: started.elapsed().as_secs_f64() - rec.now(),
            start_all_s,
            run_s: end_s,
            stop_all_s,
        },
        state,
        stop_failures,
        child_pids,
        leaked,
    ))
}

fn edge_pids(d: Option<&deploy::Deployment>) -> Arc<Mutex<HashMap<usize, u32>>> {
    Arc::new(Mutex::new(
        d.into_iter()
            .flat_map(|d| d.edges.iter().enumerate())
            .filter_map(|(i, e)| Some((i, e.part.pid()?)))
            .collect(),
    ))
}

/// API keys, the admin key or the internal token found in any log (there must be none).
fn leaked_secrets(
    plans: &[api::NotebookPlan],
    d: &deploy::Deployment,
    edge_logs: &[String],
    control_log: &str,
) -> Vec<String> {
    let mut secrets = vec![
        ("admin key", d.admin_key.clone()),
        ("internal token", d.internal_token.clone()),
    ];
    for p in plans {
        secrets.push(("owner key", p.owner.key.clone()));
        for v in &p.viewers {
            secrets.push(("viewer key", v.key.clone()));
        }
    }
    let mut found = Vec::new();
    for (what, s) in secrets {
        for (name, log) in edge_logs
            .iter()
            .enumerate()
            .map(|(i, l)| (format!("edge-{i}"), l.as_str()))
            .chain(std::iter::once(("control".to_owned(), control_log)))
        {
            if !s.is_empty() && log.contains(&s) {
                found.push(format!("{what} in the {name} log"));
            }
        }
    }
    found
}

/// Reads the notebook environment path, as the other tests do.
pub fn venv_from_env(root: &std::path::Path) -> Result<PathBuf> {
    let dir = std::env::var_os("NOTEBOOK_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join(".venv"));
    if !dir.join("bin/marimo").exists() {
        return Err(anyhow::anyhow!(
            "no notebook environment at {}: run scripts/setup-python.sh (or set NOTEBOOK_VENV)",
            dir.display()
        ))
        .context("--venv");
    }
    Ok(dir)
}
