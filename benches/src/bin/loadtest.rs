//! `loadtest`: runs the load-tested deployment (see `marina_bench::loadtest`) and writes its
//! report. Exits 1 when a check failed, 2 when the run could not be made. `scripts/loadtest.sh`
//! builds and calls it.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use marina_bench::loadtest::{self, traffic::Behaviour, Options};

#[derive(Parser, Debug)]
#[command(
    about = "Marina under load on loopback: PostgreSQL, control plane, N edges, real notebooks, faults"
)]
struct Cli {
    /// The `marina` binary (to start the deployment on loopback).
    #[arg(long, default_value = "target/release/marina")]
    marina: PathBuf,
    /// The notebook Python environment (default: NOTEBOOK_VENV, else <workspace>/.venv).
    #[arg(long)]
    venv: Option<PathBuf>,
    /// Output folder (report.md, report.json, timeline.svg, the parts' logs).
    #[arg(long, default_value = "target/loadtest")]
    out: PathBuf,
    /// A size that fits CI on a 2-core machine in a few minutes (sets the defaults below).
    #[arg(long)]
    smoke: bool,
    /// Notebooks with an owner working through the edges.
    #[arg(long)]
    notebooks: Option<usize>,
    /// Viewers per notebook.
    #[arg(long)]
    viewers: Option<usize>,
    /// Edge replicas.
    #[arg(long)]
    edges: Option<usize>,
    /// Seconds of traffic.
    #[arg(long)]
    duration: Option<u64>,
    /// Extra notebooks driven straight to Marimo (the baseline for the edge's cost).
    #[arg(long)]
    direct: Option<usize>,
    /// Largest cell output, bytes.
    #[arg(long)]
    large_bytes: Option<usize>,
    /// Owner think time, ms, as MIN-MAX.
    #[arg(long)]
    think_ms: Option<String>,
    /// No faults (a clean baseline run).
    #[arg(long)]
    no_faults: bool,
    /// Drive an existing deployment: its control API (then also --admin-key, --public-url).
    #[arg(long, env = "LOADTEST_API")]
    api: Option<String>,
    /// An admin API key of the organization to fill (and empty again).
    #[arg(long, env = "LOADTEST_ADMIN_KEY", hide_env_values = true)]
    admin_key: Option<String>,
    /// The edge's public URL (`proxy.public_url`).
    #[arg(long, env = "LOADTEST_PUBLIC_URL")]
    public_url: Option<String>,
    /// Edge replica addresses to spread clients over, comma-separated (default: the public URL).
    #[arg(long, env = "LOADTEST_EDGES", value_delimiter = ',')]
    edge_urls: Vec<String>,
    /// The internal token, for the direct-to-Marimo baseline only.
    #[arg(long, env = "LOADTEST_INTERNAL_TOKEN", hide_env_values = true)]
    internal_token: Option<String>,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(run(cli)) {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::from(1),
        Err(e) => {
            eprintln!("loadtest: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<bool> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let remote = match (cli.api, cli.admin_key, cli.public_url) {
        (None, _, _) => None,
        (Some(api), Some(admin_key), Some(public_url)) => Some(loadtest::Remote {
            api,
            admin_key,
            public_url,
            edges: cli.edge_urls,
            internal_token: cli.internal_token,
        }),
        _ => anyhow::bail!("--api needs --admin-key and --public-url as well"),
    };
    let venv = match (&remote, cli.venv) {
        (_, Some(v)) => v,
        (Some(_), None) => PathBuf::new(),
        (None, None) => loadtest::venv_from_env(&root)?,
    };
    let (notebooks, viewers, edges, duration, direct, large) = if cli.smoke {
        (3, 2, 2, 100, 1, 1 << 20)
    } else {
        (8, 3, 2, 300, 2, 4 << 20)
    };
    let large = cli.large_bytes.unwrap_or(large);
    let think = cli
        .think_ms
        .as_deref()
        .unwrap_or(if cli.smoke { "800-2500" } else { "1500-5000" });
    let (lo, hi) = think
        .split_once('-')
        .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
        .ok_or_else(|| anyhow::anyhow!("--think-ms: expected MIN-MAX, got {think:?}"))?;
    let notebooks = cli.notebooks.unwrap_or(notebooks);
    anyhow::ensure!(notebooks >= 1, "--notebooks: at least 1");
    let edges = cli.edges.unwrap_or(edges);
    anyhow::ensure!(edges >= 1, "--edges: at least 1");
    let opts = Options {
        marina: cli.marina,
        venv,
        out: cli.out.clone(),
        notebooks,
        // The baseline reads the notebooks' addresses from the internal routes feed.
        direct: if remote.as_ref().is_some_and(|r| r.internal_token.is_none()) {
            0
        } else {
            cli.direct.unwrap_or(direct)
        },
        viewers: cli.viewers.unwrap_or(viewers),
        edges,
        duration: Duration::from_secs(cli.duration.unwrap_or(duration)),
        behaviour: Behaviour {
            think_ms: (lo, hi),
            large_bytes: vec![64 << 10, 512 << 10, large],
            assets: 3,
            attempt_every_s: 6.0,
        },
        idle_after_s: 20,
        idle_timeout_s: 45,
        detached_timeout_s: 35,
        faults: !cli.no_faults,
        label: match (&remote, cli.smoke) {
            (Some(r), _) => format!("the deployment at {}", r.api),
            (None, true) => "smoke".into(),
            (None, false) => "full".into(),
        },
        remote,
    };
    let report = loadtest::run(opts).await?;
    for c in &report.checks {
        eprintln!(
            "{} {}: {}",
            if c.passed { "ok  " } else { "FAIL" },
            c.name,
            c.detail
        );
    }
    eprintln!(
        "loadtest: {} — report in {}",
        if report.passed { "passed" } else { "FAILED" },
        cli.out.join("report.md").display()
    );
    Ok(report.passed)
}
