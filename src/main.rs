//! `marina`: the one binary.
//!
//! - `marina serve`: control plane, edge and local runtime in one process (the embedded default).
//! - `marina control` / `marina proxy`: each part alone, for production (they talk over the wire).
//! - `marina admin …`: what an operator needs by hand (API keys, the effective configuration).
//!
//! This is the binary edge: errors are `anyhow` here and typed everywhere below.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use figment::providers::Serialized;
use figment::Figment;
use marina_config::settings::{RuntimeKind, Settings};
use marina_config::Id;
use marina_runtime::Runtime;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// mimalloc rather than glibc's malloc: the edge allocates and frees small buffers on every
/// request, and glibc's allocator (with its `malloc_consolidate` passes) took 6-7 % of the
/// edge's CPU in the benchmark profile (BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "marina",
    version,
    about = "Hosted Marimo notebooks backed by Sail"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Control plane, edge and local runtime in one process, on loopback.
    Serve(ServeArgs),
    /// The control plane alone.
    Control(PartArgs),
    /// The edge alone.
    Proxy(ProxyArgs),
    /// Administrative commands.
    #[command(subcommand)]
    Admin(AdminCommand),
}

/// Flags every command shares. Flags win over `MARINA_*` environment variables, which win
/// over the configuration file, which wins over the defaults.
#[derive(Args, Clone)]
struct Common {
    /// TOML configuration file.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Data directory (database, keys, notebooks, logs). Default ./.marina
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    common: Common,
    /// Address of the control API and host page. Default 127.0.0.1:8080
    #[arg(long, value_name = "ADDR")]
    control_listen: Option<SocketAddr>,
    /// Address of the edge. Default 127.0.0.1:8000
    #[arg(long, value_name = "ADDR")]
    proxy_listen: Option<SocketAddr>,
}

#[derive(Args)]
struct PartArgs {
    #[command(flatten)]
    common: Common,
    /// Listen address (overrides control.listen).
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
}

#[derive(Args)]
struct ProxyArgs {
    #[command(flatten)]
    common: Common,
    /// Listen address (overrides proxy.listen).
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Admin listen address for /metrics and health (overrides proxy.admin_listen).
    #[arg(long, value_name = "ADDR")]
    admin_listen: Option<SocketAddr>,
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Create an API key for a member (default: the first admin) and print it once.
    CreateKey {
        #[command(flatten)]
        common: Common,
        /// Member id (10 characters 0-9A-Z).
        #[arg(long)]
        member: Option<String>,
        /// A name for the key.
        #[arg(long, default_value = "cli")]
        name: String,
    },
    /// Print the effective configuration (after file, environment and flags) as TOML-like JSON.
    Config {
        #[command(flatten)]
        common: Common,
    },
}

fn main() -> std::process::ExitCode {
    // Errors are for people: one line with its causes, no backtrace.
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("marina: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let cli = Cli::parse();
    // One scheduler thread per CPU this process may run on. With a single CPU (a pinned edge
    // replica, a one-core container) the single-threaded scheduler does the same work without
    // the work-stealing machinery a multi-threaded one pays for on every wake-up.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut builder = if cpus == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    let runtime = builder
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => serve(args).await,
            Command::Control(args) => control(args).await,
            Command::Proxy(args) => proxy(args).await,
            Command::Admin(cmd) => admin(cmd).await,
        }
    })
}

/// Loads settings with the given flag overrides on top.
fn load(common: &Common, flags: Figment) -> Result<Settings> {
    let mut flags = flags;
    if let Some(dir) = &common.data_dir {
        flags = flags.merge(Serialized::default("data_dir", dir));
    }
    Settings::load(common.config.as_deref(), flags).map_err(|e| anyhow::anyhow!("{e}"))
}

fn init_tracing(settings: &Settings) {
    use tracing_subscriber::EnvFilter;
    // RUST_LOG, when set, is a developer's override of `log`.
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&settings.log))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .try_init();
}

/// Resolves when the process is asked to stop (Ctrl-C or SIGTERM).
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

/// A shutdown broadcast: one signal, many waiters.
fn shutdown_channel() -> (
    watch::Sender<bool>,
    impl Fn() -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>>,
) {
    let (tx, rx) = watch::channel(false);
    let waiter = move || {
        let mut rx = rx.clone();
        Box::pin(async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }) as std::pin::Pin<Box<dyn Future<Output = ()> + Send>>
    };
    (tx, waiter)
}

async fn bind(addr: SocketAddr, what: &str) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} for the {what}"))
}

async fn make_runtime(settings: &Settings) -> Result<Arc<dyn Runtime>> {
    Ok(match settings.runtime.kind {
        RuntimeKind::Local => {
            Arc::new(marina_runtime::local::LocalRuntime::new(settings).context("local runtime")?)
        }
        RuntimeKind::Kubernetes => Arc::new(
            marina_runtime::kube::KubeRuntime::new(settings)
                .await
                .context("kubernetes runtime")?,
        ),
    })
}

async fn serve(args: ServeArgs) -> Result<()> {
    let defaults = Settings::default();
    let mut flags = Figment::new();
    if let Some(a) = args.control_listen {
        flags = flags.merge(Serialized::default("control.listen", a));
    }
    if let Some(a) = args.proxy_listen {
        flags = flags.merge(Serialized::default("proxy.listen", a));
    }
    let mut settings = load(&args.common, flags)?;
    // In one process the public URLs follow the listen addresses unless set explicitly, and
    // the edge reaches the control plane of this same process over loopback.
    if settings.control.public_url == defaults.control.public_url {
        settings.control.public_url = format!("http://{}", settings.control.listen);
    }
    if settings.proxy.public_url == defaults.proxy.public_url {
        settings.proxy.public_url = format!("http://{}", settings.proxy.listen);
    }
    if settings.proxy.control_url.is_empty() && settings.proxy.routes_file.is_none() {
        settings.proxy.control_url = format!("http://{}", settings.control.listen);
    }
    settings.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
    init_tracing(&settings);
    std::fs::create_dir_all(&settings.data_dir)
        .with_context(|| format!("creating data directory {}", settings.data_dir.display()))?;

    let runtime = make_runtime(&settings).await?;
    let control_listener = bind(settings.control.listen, "control API").await?;
    let proxy_listener = bind(settings.proxy.listen, "edge").await?;
    let admin_listener = bind(settings.proxy.admin_listen, "edge admin endpoints").await?;

    let control = marina_control::ControlPlane::open(&settings, runtime.clone())
        .await
        .context("opening the control plane")?;
    let bootstrap = control.bootstrap().map(|b| b.admin_key_file.clone());
    let edge = marina_proxy::Edge::new(&settings)
        .await
        .context("starting the edge")?;

    let (stop_tx, stop) = shutdown_channel();
    let mut control_task = tokio::spawn(control.serve(control_listener, stop()));
    let mut edge_task = tokio::spawn(edge.serve(proxy_listener, admin_listener, stop()));

    // Listening for Ctrl-C and SIGTERM from here on: a signal while the notebook environment is
    // being prepared (a first install takes minutes) still shuts down in order.
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    let mut interrupted = false;

    // First run: the notebook environment (about 800 MB) is installed now, with progress.
    if settings.runtime.kind == RuntimeKind::Local {
        eprintln!("marina: checking the notebook Python environment (first run installs it, with progress)…");
        let prepared = tokio::select! {
            r = runtime.prepare() => Some(r),
            _ = &mut shutdown => None,
        };
        match prepared {
            None => interrupted = true,
            Some(Err(e)) => {
                eprintln!("marina: notebooks cannot start here: {e}");
                eprintln!("marina: the API works, but notebooks cannot start until this is fixed.");
            }
            Some(Ok(())) if runtime.isolation() == "none" => {
                eprintln!(
                    "marina: WARNING: runtime.local.sandbox = \"none\": notebooks run UNSANDBOXED \
                     as this user; their code can read Marina's keys and database (single-user use only)"
                );
            }
            Some(Ok(())) => eprintln!(
                "marina: notebooks run sandboxed ({}: bubblewrap + pasta)",
                runtime.isolation()
            ),
        }
    }
    if interrupted {
        return shut_down(
            &settings,
            &runtime,
            stop_tx,
            control_task,
            edge_task,
            Ok(()),
        )
        .await;
    }

    let key_file = bootstrap.unwrap_or_else(|| settings.data_dir.join("admin-api-key"));
    eprintln!();
    eprintln!("  Marina is ready.");
    eprintln!(
        "  Host page (embeds notebooks):  {}/",
        settings.control.public_url
    );
    eprintln!(
        "  Control API:                   {}/workloads/notebooks",
        settings.control.public_url
    );
    eprintln!(
        "  Edge (notebooks):              {}",
        settings.proxy.public_url
    );
    eprintln!(
        "  Edge metrics:                  http://{}/metrics",
        settings.proxy.admin_listen
    );
    eprintln!("  Admin API key:                 {}", key_file.display());
    eprintln!("  Stop with Ctrl-C.");
    eprintln!();

    let outcome = tokio::select! {
        _ = &mut shutdown => Ok(()),
        r = &mut control_task => part_ended(r, "control plane"),
        r = &mut edge_task => part_ended(r, "edge"),
    };
    shut_down(
        &settings,
        &runtime,
        stop_tx,
        control_task,
        edge_task,
        outcome,
    )
    .await
}

/// The end of `marina serve`: tells both parts to stop, waits for them to drain, then stops
/// the local notebooks, and returns `outcome`.
async fn shut_down<C, E>(
    settings: &Settings,
    runtime: &Arc<dyn Runtime>,
    stop_tx: watch::Sender<bool>,
    mut control_task: tokio::task::JoinHandle<C>,
    mut edge_task: tokio::task::JoinHandle<E>,
    outcome: Result<()>,
) -> Result<()> {
    let _ = stop_tx.send(true);
    // Both parts drain first (the edge closes WebSockets with 1001 and lets requests in flight
    // finish, which still need their notebooks); each one still running is waited for, within
    // the edge's grace and a little more.
    let bound = std::time::Duration::from_secs(settings.proxy.timeouts.shutdown_grace_seconds + 5);
    let drained = async {
        if !control_task.is_finished() {
            let _ = (&mut control_task).await;
        }
        if !edge_task.is_finished() {
            let _ = (&mut edge_task).await;
        }
    };
    if tokio::time::timeout(bound, drained).await.is_err() {
        eprintln!(
            "marina: the parts did not finish draining within {} s; exiting",
            bound.as_secs()
        );
    }
    // Local notebooks are child processes of this one: take them down with it. Their store
    // records are settled by reconciliation at the next start.
    if settings.runtime.kind == RuntimeKind::Local {
        if let Err(e) = runtime.reconcile(&[]).await {
            eprintln!("marina: stopping local notebooks: {e}");
        }
    }
    outcome
}

/// How a part's task ended while Marina was meant to keep running: always an error.
fn part_ended<E: std::fmt::Display>(
    joined: Result<Result<(), E>, tokio::task::JoinError>,
    what: &str,
) -> Result<()> {
    match joined {
        Ok(Ok(())) => bail!("the {what} stopped unexpectedly"),
        Ok(Err(e)) => bail!("the {what} failed: {e}"),
        Err(e) => bail!("the {what} crashed: {e}"),
    }
}

async fn control(args: PartArgs) -> Result<()> {
    let mut flags = Figment::new();
    if let Some(a) = args.listen {
        flags = flags.merge(Serialized::default("control.listen", a));
    }
    let settings = load(&args.common, flags)?;
    init_tracing(&settings);
    let runtime = make_runtime(&settings).await?;
    let listener = bind(settings.control.listen, "control API").await?;
    let control = marina_control::ControlPlane::open(&settings, runtime.clone()).await?;
    if let Some(b) = control.bootstrap() {
        eprintln!(
            "marina: first start: admin API key written to {}",
            b.admin_key_file.display()
        );
    }
    if settings.runtime.kind == RuntimeKind::Local {
        let rt = runtime.clone();
        tokio::spawn(async move {
            if let Err(e) = rt.prepare().await {
                tracing::error!("notebook environment: {e}");
            }
        });
    }
    tracing::info!(listen = %settings.control.listen, "control plane listening");
    control.serve(listener, shutdown_signal()).await?;
    Ok(())
}

async fn proxy(args: ProxyArgs) -> Result<()> {
    let mut flags = Figment::new();
    if let Some(a) = args.listen {
        flags = flags.merge(Serialized::default("proxy.listen", a));
    }
    if let Some(a) = args.admin_listen {
        flags = flags.merge(Serialized::default("proxy.admin_listen", a));
    }
    let settings = load(&args.common, flags)?;
    init_tracing(&settings);
    let listener = bind(settings.proxy.listen, "edge").await?;
    let admin = bind(settings.proxy.admin_listen, "edge admin endpoints").await?;
    let edge = marina_proxy::Edge::new(&settings).await?;
    tracing::info!(listen = %settings.proxy.listen, admin = %settings.proxy.admin_listen, "edge listening");
    edge.serve(listener, admin, shutdown_signal()).await?;
    Ok(())
}

async fn admin(cmd: AdminCommand) -> Result<()> {
    match cmd {
        AdminCommand::CreateKey {
            common,
            member,
            name,
        } => {
            let settings = load(&common, Figment::new())?;
            let member = match member {
                Some(m) => Some(Id::parse(&m).map_err(|e| anyhow::anyhow!("--member: {e}"))?),
                None => None,
            };
            let runtime = make_runtime(&settings).await?;
            let control = marina_control::ControlPlane::open(&settings, runtime).await?;
            let secret = control.create_api_key(member, &name).await?;
            println!("{secret}");
            Ok(())
        }
        AdminCommand::Config { common } => {
            let settings = load(&common, Figment::new())?;
            let mut value = serde_json::to_value(&settings)?;
            redact(&mut value);
            println!("{}", serde_json::to_string_pretty(&value)?);
            Ok(())
        }
    }
}

/// Hides secret values when printing the configuration.
fn redact(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, v) in map.iter_mut() {
                if k == "url" {
                    if let serde_json::Value::String(url) = v {
                        *url = redact_url_password(url);
                    }
                } else if k == "token" || k == "keys" {
                    if !v.is_null() && v != &serde_json::Value::String(String::new()) {
                        *v = serde_json::Value::String("<redacted>".into());
                    }
                } else {
                    redact(v);
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(redact),
        _ => {}
    }
}

/// `postgres://user:secret@host/db` → `postgres://user:<redacted>@host/db`.
fn redact_url_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((userinfo, host)) = rest.split_once('@') else {
        return url.to_owned();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:<redacted>@{host}"),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printed_configuration_hides_secrets() {
        let mut v = serde_json::json!({
            "database": {"url": "postgres://marina:hunter2@db:5432/marina"},
            "internal": {"token": "abc"},
            "proxy": {"cookie": {"keys": ["00"]}},
        });
        redact(&mut v);
        let s = v.to_string();
        assert!(
            !s.contains("hunter2") && !s.contains("abc") && !s.contains("\"00\""),
            "{s}"
        );
        assert!(
            s.contains("postgres://marina:<redacted>@db:5432/marina"),
            "{s}"
        );
    }
}
