//! The load generator of Marina's benchmarks. It treats every target (the upstream directly,
//! the edge, nginx, HAProxy) as a black box reached over loopback TCP.
//!
//! Subcommands:
//! - `mint`: signs a one-time URL token (EdDSA JWT) with an Ed25519 PKCS#8 PEM key.
//! - `login`: redeems such a token at the edge's handshake URL and prints the session cookie.
//! - `http`: N keep-alive HTTP/1.1 connections issuing GETs (closed loop, one request in flight
//!   per connection) for a fixed time; req/s, p50/p99 latency, MiB/s of body.
//! - `ws`: N WebSockets, each sending a message and awaiting its echo; msgs/s and round trips.
//! - Both also report, with `--proxy-pid`/`--upstream-pid`, the CPU time (user + system, from
//!   `/proc/<pid>/stat`) those processes spent per request or message in the measured window:
//!   what each request costs the machine, whoever the scheduler ran first.
//! - `idle`: opens N WebSockets, holds them, and reports the target processes' resident memory
//!   growth per connection (`VmRSS` in `/proc/<pid>/status`).
//! - `report`: medians of the results (JSON lines) and a markdown table for `BENCHMARKS.md`.
//!
//! The client is deliberately minimal (pre-serialised requests, `httparse`, hand-rolled
//! WebSocket frames) so that on its own core it is not the bottleneck. Every loop is bounded in
//! time, and every address must be loopback.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context};
use base64::Engine;
use bytes::{Buf, BytesMut};
use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;
use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout_at;

#[derive(Parser, Debug)]
#[command(about = "Marina benchmark load generator (loopback only)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Sign a URL token (EdDSA JWT) and print it.
    Mint(MintArgs),
    /// Redeem a URL token at the edge and print the session cookie (`name=value`).
    Login(LoginArgs),
    /// HTTP/1.1 GET load.
    Http(HttpArgs),
    /// WebSocket echo load.
    Ws(WsArgs),
    /// Hold idle WebSockets and measure the target's memory per connection.
    Idle(IdleArgs),
    /// Turn result lines into the markdown table of BENCHMARKS.md.
    Report(ReportArgs),
}

#[derive(clap::Args, Debug)]
struct MintArgs {
    /// PKCS#8 PEM Ed25519 private key.
    #[arg(long)]
    key: PathBuf,
    #[arg(long, default_value = "k1")]
    kid: String,
    #[arg(long, default_value = "marina-control")]
    iss: String,
    #[arg(long, default_value = "marina-edge")]
    aud: String,
    /// Member id (the notebook's owner for `edit`).
    #[arg(long)]
    sub: String,
    /// Notebook id.
    #[arg(long)]
    nb: String,
    /// Session id.
    #[arg(long)]
    sid: String,
    #[arg(long, default_value = "edit")]
    mode: String,
    /// Lifetime in seconds.
    #[arg(long, default_value_t = 300)]
    ttl: u64,
}

#[derive(clap::Args, Debug)]
struct LoginArgs {
    /// Address of the edge.
    #[arg(long)]
    addr: SocketAddr,
    /// Request path and query of the handshake, e.g. `/notebooks/ID/_auth?token=…`.
    #[arg(long)]
    path: String,
}

#[derive(clap::Args, Debug, Clone)]
struct Common {
    /// Target address (loopback).
    #[arg(long)]
    addr: SocketAddr,
    /// Request path.
    #[arg(long)]
    path: String,
    /// Concurrent connections.
    #[arg(long, short = 'c')]
    connections: usize,
    /// Measured seconds.
    #[arg(long, default_value_t = 8.0)]
    duration: f64,
    /// Unmeasured warm-up seconds before.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// `Cookie` header value sent on every request (empty: none).
    #[arg(long, default_value = "")]
    cookie: String,
    /// Labels copied into the JSON result line (`target`, `scenario`, `round`).
    #[arg(long, default_value = "")]
    target: String,
    #[arg(long, default_value = "")]
    scenario: String,
    #[arg(long, default_value_t = 0)]
    round: u32,
    /// The proxy's processes (repeatable): their CPU time per request is reported.
    #[arg(long = "proxy-pid")]
    proxy_pids: Vec<u32>,
    /// The upstream's processes (repeatable): their CPU time per request is reported.
    #[arg(long = "upstream-pid")]
    upstream_pids: Vec<u32>,
}

#[derive(clap::Args, Debug)]
struct HttpArgs {
    #[command(flatten)]
    common: Common,
}

#[derive(clap::Args, Debug)]
struct WsArgs {
    #[command(flatten)]
    common: Common,
    /// Payload bytes per message.
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// `Origin` header of the handshake (empty: none).
    #[arg(long, default_value = "")]
    origin: String,
}

#[derive(clap::Args, Debug)]
struct IdleArgs {
    #[arg(long)]
    addr: SocketAddr,
    #[arg(long)]
    path: String,
    /// WebSockets to open and hold.
    #[arg(long, short = 'c', default_value_t = 2000)]
    connections: usize,
    /// Processes whose resident memory is summed (repeatable).
    #[arg(long = "pid", required = true)]
    pids: Vec<u32>,
    /// Seconds to hold the connections before reading memory.
    #[arg(long, default_value_t = 3.0)]
    settle: f64,
    /// Handshakes in flight at once while opening.
    #[arg(long, default_value_t = 64)]
    parallel: usize,
    #[arg(long, default_value = "")]
    cookie: String,
    #[arg(long, default_value = "")]
    origin: String,
    #[arg(long, default_value = "")]
    target: String,
    #[arg(long, default_value = "")]
    scenario: String,
    #[arg(long, default_value_t = 0)]
    round: u32,
}

#[derive(clap::Args, Debug)]
struct ReportArgs {
    /// Result lines (JSON), as printed by `http`, `ws` and `idle`.
    #[arg(long)]
    results: PathBuf,
    /// Markdown file to update between `<!-- bench:start -->` and `<!-- bench:end -->`.
    #[arg(long)]
    out: PathBuf,
    /// `key=value` lines shown above the table (machine, versions, conditions).
    #[arg(long = "meta")]
    meta: Vec<String>,
}

/// One measurement, printed as a JSON line.
#[derive(Debug, Default, Serialize, Deserialize, Clone)]
struct Outcome {
    target: String,
    scenario: String,
    round: u32,
    connections: usize,
    seconds: f64,
    /// Completed requests or echoed messages in the measured window.
    count: u64,
    errors: u64,
    reconnects: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    rps: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    msgs_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    mib_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    p50_us: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    p99_us: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_us: Option<u64>,
    /// Resident memory each further idle socket adds (growth from half to all held).
    #[serde(skip_serializing_if = "Option::is_none")]
    kib_per_conn: Option<f64>,
    /// Growth from none to all held, per socket (includes what the process touches once).
    #[serde(skip_serializing_if = "Option::is_none")]
    kib_all_per_conn: Option<f64>,
    /// Share of one CPU the load generator itself used over the run (near 1.0: it may be the
    /// bottleneck, and the figure is a lower bound).
    #[serde(skip_serializing_if = "Option::is_none")]
    client_cpu: Option<f64>,
    /// CPU time (user + system) the proxy's processes spent per request or message, µs.
    #[serde(skip_serializing_if = "Option::is_none")]
    proxy_cpu_us: Option<f64>,
    /// The same for the upstream's processes.
    #[serde(skip_serializing_if = "Option::is_none")]
    upstream_cpu_us: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rss_before_kib: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rss_mid_kib: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rss_after_kib: Option<u64>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Mint(a) => {
            println!("{}", mint(&a)?);
            Ok(())
        }
        Cmd::Report(a) => report(&a),
        cmd => {
            // One core for the load generator: a single-threaded runtime, no cross-thread sync.
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let local = tokio::task::LocalSet::new();
            local.block_on(&rt, async move {
                match cmd {
                    Cmd::Login(a) => login(&a).await,
                    Cmd::Http(a) => emit(http_load(a.common).await?),
                    Cmd::Ws(a) => emit(ws_load(a).await?),
                    Cmd::Idle(a) => emit(idle(a).await?),
                    Cmd::Mint(_) | Cmd::Report(_) => unreachable!(),
                }
            })
        }
    }
}

fn emit(o: Outcome) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string(&o)?);
    Ok(())
}

fn check_loopback(addr: &SocketAddr) -> anyhow::Result<()> {
    ensure!(
        addr.ip().is_loopback(),
        "{addr}: load goes to loopback addresses only"
    );
    Ok(())
}

/// CPU time a process has used (user + system, all threads), from `/proc/<pid>/stat`.
fn cpu_time_of(pid: &str) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // USER_HZ is 100 on every Linux this runs on.
    Some(Duration::from_millis(ticks * 10))
}

fn cpu_time() -> Option<Duration> {
    cpu_time_of("self")
}

/// The summed CPU time of `pids`; `None` if there are none or one cannot be read.
fn cpu_time_sum(pids: &[u32]) -> Option<Duration> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|p| cpu_time_of(&p.to_string())).sum()
}

/// CPU time the proxy's and the upstream's processes spend in the measured window, sampled at
/// its start and end by a task of its own (the window is where requests are counted).
struct ServerCpu {
    task: tokio::task::JoinHandle<(Option<Duration>, Option<Duration>)>,
}

impl ServerCpu {
    fn start(c: &Common, w: &Window) -> ServerCpu {
        let (proxy, upstream) = (c.proxy_pids.clone(), c.upstream_pids.clone());
        let (start, end) = (w.start, w.end);
        let task = tokio::task::spawn_local(async move {
            tokio::time::sleep_until(tokio::time::Instant::from_std(start)).await;
            let p0 = cpu_time_sum(&proxy);
            let u0 = cpu_time_sum(&upstream);
            tokio::time::sleep_until(tokio::time::Instant::from_std(end)).await;
            let p1 = cpu_time_sum(&proxy);
            let u1 = cpu_time_sum(&upstream);
            let delta = |a: Option<Duration>, b: Option<Duration>| b?.checked_sub(a?);
            (delta(p0, p1), delta(u0, u1))
        });
        ServerCpu { task }
    }

    /// Microseconds of CPU per counted request or message: (proxy, upstream).
    async fn per(self, count: u64) -> (Option<f64>, Option<f64>) {
        let (p, u) = self.task.await.unwrap_or((None, None));
        let per = |d: Option<Duration>| {
            d.filter(|_| count > 0)
                .map(|d| d.as_secs_f64() * 1e6 / count as f64)
        };
        (per(p), per(u))
    }
}

/// Measures the CPU share of the load generator between `new` and `share`.
struct CpuMeter {
    wall: Instant,
    cpu: Option<Duration>,
}

impl CpuMeter {
    fn new() -> CpuMeter {
        CpuMeter {
            wall: Instant::now(),
            cpu: cpu_time(),
        }
    }

    fn share(&self) -> Option<f64> {
        let used = cpu_time()?.checked_sub(self.cpu?)?;
        Some(used.as_secs_f64() / self.wall.elapsed().as_secs_f64().max(1e-3))
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// mint / login

fn mint(a: &MintArgs) -> anyhow::Result<String> {
    let pem = std::fs::read(&a.key).with_context(|| format!("reading {}", a.key.display()))?;
    let key = jsonwebtoken::EncodingKey::from_ed_pem(&pem).context("parsing the Ed25519 key")?;
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
    header.kid = Some(a.kid.clone());
    let iat = now_secs();
    let jti: String = {
        let mut b = [0u8; 16];
        rand::thread_rng().fill(&mut b);
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
    };
    let claims = serde_json::json!({
        "iss": a.iss, "aud": a.aud, "sub": a.sub, "nb": a.nb, "sid": a.sid,
        "mode": a.mode, "jti": jti, "iat": iat, "nbf": iat, "exp": iat + a.ttl,
    });
    Ok(jsonwebtoken::encode(&header, &claims, &key)?)
}

async fn login(a: &LoginArgs) -> anyhow::Result<()> {
    check_loopback(&a.addr)?;
    let mut c = Conn::connect(a.addr).await?;
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: bench-load\r\nAccept: text/html\r\nConnection: close\r\n\r\n",
        a.path, a.addr
    );
    c.s.write_all(req.as_bytes()).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let head = timeout_at(deadline, c.read_head())
        .await
        .context("handshake timed out")??;
    ensure!(
        (300..400).contains(&head.status),
        "handshake answered {} (expected a redirect)",
        head.status
    );
    let cookie = head
        .set_cookie
        .context("handshake set no cookie")?
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_string();
    ensure!(cookie.contains('='), "malformed Set-Cookie");
    println!("{cookie}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// A minimal HTTP/1.1 client connection

struct Head {
    status: u16,
    content_length: Option<u64>,
    chunked: bool,
    close: bool,
    set_cookie: Option<String>,
}

struct Conn {
    s: TcpStream,
    buf: BytesMut,
}

impl Conn {
    async fn connect(addr: SocketAddr) -> io::Result<Conn> {
        let s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        Ok(Conn {
            s,
            buf: BytesMut::with_capacity(16 * 1024),
        })
    }

    async fn fill(&mut self) -> io::Result<()> {
        if self.buf.capacity() - self.buf.len() < 4096 {
            self.buf.reserve(64 * 1024);
        }
        let n = self.s.read_buf(&mut self.buf).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(())
    }

    async fn read_head(&mut self) -> anyhow::Result<Head> {
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 48];
            let mut resp = httparse::Response::new(&mut headers);
            if let httparse::Status::Complete(n) = resp.parse(&self.buf)? {
                let mut head = Head {
                    status: resp.code.unwrap_or(0),
                    content_length: None,
                    chunked: false,
                    close: resp.version == Some(0),
                    set_cookie: None,
                };
                for h in resp.headers.iter() {
                    if h.name.eq_ignore_ascii_case("content-length") {
                        head.content_length = std::str::from_utf8(h.value)
                            .ok()
                            .and_then(|v| v.trim().parse().ok());
                    } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                        head.chunked = contains_token(h.value, "chunked");
                    } else if h.name.eq_ignore_ascii_case("connection") {
                        if contains_token(h.value, "close") {
                            head.close = true;
                        } else if contains_token(h.value, "keep-alive") {
                            head.close = false;
                        }
                    } else if h.name.eq_ignore_ascii_case("set-cookie") && head.set_cookie.is_none()
                    {
                        head.set_cookie = Some(String::from_utf8_lossy(h.value).into_owned());
                    }
                }
                self.buf.advance(n);
                return Ok(head);
            }
            self.fill().await?;
        }
    }

    /// Reads and discards the body of a response to a GET; returns its length.
    async fn skip_body(&mut self, head: &Head) -> anyhow::Result<u64> {
        if head.status == 204 || head.status == 304 || (100..200).contains(&head.status) {
            return Ok(0);
        }
        if head.chunked {
            return self.skip_chunked().await;
        }
        match head.content_length {
            Some(len) => {
                self.skip_exact(len).await?;
                Ok(len)
            }
            None => bail!("response without length on a keep-alive connection"),
        }
    }

    async fn skip_exact(&mut self, len: u64) -> anyhow::Result<()> {
        let mut left = len;
        loop {
            let take = (self.buf.len() as u64).min(left);
            self.buf.advance(take as usize);
            left -= take;
            if left == 0 {
                return Ok(());
            }
            self.fill().await?;
        }
    }

    async fn read_line(&mut self) -> anyhow::Result<BytesMut> {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = self.buf.split_to(i);
                self.buf.advance(2);
                return Ok(line);
            }
            ensure!(self.buf.len() < 8192, "overlong chunk line");
            self.fill().await?;
        }
    }

    async fn skip_chunked(&mut self) -> anyhow::Result<u64> {
        let mut total = 0;
        loop {
            let line = self.read_line().await?;
            let hex = line[..].split(|&b| b == b';').next().unwrap_or_default();
            let size = u64::from_str_radix(std::str::from_utf8(hex)?.trim(), 16)
                .context("bad chunk size")?;
            if size == 0 {
                // Trailers, then the empty line.
                while !self.read_line().await?.is_empty() {}
                return Ok(total);
            }
            self.skip_exact(size + 2).await?;
            total += size;
        }
    }
}

fn contains_token(v: &[u8], token: &str) -> bool {
    std::str::from_utf8(v).is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

fn new_histogram() -> Histogram<u64> {
    // 1 µs to 60 s, 3 significant figures.
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

/// Phases of a timed run: warm-up until `start`, measured until `end`.
#[derive(Clone, Copy)]
struct Window {
    start: Instant,
    end: Instant,
}

impl Window {
    fn new(warmup: f64, duration: f64) -> anyhow::Result<Window> {
        ensure!(
            (0.0..=600.0).contains(&warmup) && duration > 0.0 && duration <= 600.0,
            "warm-up and duration must be within 0–600 s"
        );
        let start = Instant::now() + Duration::from_secs_f64(warmup);
        Ok(Window {
            start,
            end: start + Duration::from_secs_f64(duration),
        })
    }
}

#[derive(Default)]
struct Tally {
    hist: Option<Histogram<u64>>,
    count: u64,
    bytes: u64,
    errors: u64,
    reconnects: u64,
}

impl Tally {
    fn new() -> Tally {
        Tally {
            hist: Some(new_histogram()),
            ..Default::default()
        }
    }

    fn record(&mut self, w: &Window, t0: Instant, t1: Instant, bytes: u64) {
        if t0 >= w.start && t1 <= w.end {
            self.count += 1;
            self.bytes += bytes;
            let us = (t1 - t0).as_micros().max(1) as u64;
            if let Some(h) = self.hist.as_mut() {
                let _ = h.record(us.min(60_000_000));
            }
        }
    }

    fn merge(&mut self, o: Tally) {
        self.count += o.count;
        self.bytes += o.bytes;
        self.errors += o.errors;
        self.reconnects += o.reconnects;
        if let (Some(a), Some(b)) = (self.hist.as_mut(), o.hist.as_ref()) {
            let _ = a.add(b);
        }
    }
}

fn outcome(c: &Common, t: &Tally) -> Outcome {
    let h = t.hist.as_ref();
    let seconds = c.duration;
    Outcome {
        target: c.target.clone(),
        scenario: c.scenario.clone(),
        round: c.round,
        connections: c.connections,
        seconds,
        count: t.count,
        errors: t.errors,
        reconnects: t.reconnects,
        p50_us: h.map(|h| h.value_at_quantile(0.50)),
        p99_us: h.map(|h| h.value_at_quantile(0.99)),
        max_us: h.map(|h| h.max()),
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------------------------
// http

async fn http_load(c: Common) -> anyhow::Result<Outcome> {
    check_loopback(&c.addr)?;
    ensure!(
        (1..=20_000).contains(&c.connections),
        "connections must be 1–20000"
    );
    let mut req = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: bench-load\r\nAccept: */*\r\n",
        c.path, c.addr
    );
    if !c.cookie.is_empty() {
        req.push_str(&format!("Cookie: {}\r\n", c.cookie));
    }
    req.push_str("\r\n");
    let req: Rc<[u8]> = Rc::from(req.into_bytes());
    let meter = CpuMeter::new();
    let w = Window::new(c.warmup, c.duration)?;
    let servers = ServerCpu::start(&c, &w);
    // Open every connection first, so connection set-up is not part of the measurement.
    let mut conns = Vec::with_capacity(c.connections);
    for _ in 0..c.connections {
        conns.push(
            Conn::connect(c.addr)
                .await
                .with_context(|| format!("connecting to {}", c.addr))?,
        );
    }
    let mut tasks = Vec::with_capacity(c.connections);
    for conn in conns {
        let req = req.clone();
        let addr = c.addr;
        tasks.push(tokio::task::spawn_local(http_worker(conn, addr, req, w)));
    }
    let mut total = Tally::new();
    for t in tasks {
        total.merge(t.await?);
    }
    let mut o = outcome(&c, &total);
    o.rps = Some(total.count as f64 / c.duration);
    o.mib_s = Some(total.bytes as f64 / c.duration / (1024.0 * 1024.0));
    o.client_cpu = meter.share();
    (o.proxy_cpu_us, o.upstream_cpu_us) = servers.per(total.count).await;
    ensure!(
        total.count > 0,
        "no successful request (errors: {})",
        total.errors
    );
    Ok(o)
}

async fn http_worker(mut conn: Conn, addr: SocketAddr, req: Rc<[u8]>, w: Window) -> Tally {
    let mut t = Tally::new();
    // Hard stop a little after the window: a stuck request cannot hold the run.
    let hard = tokio::time::Instant::from_std(w.end + Duration::from_secs(2));
    // Bounded: the loop ends at the end of the window (or after too many failures).
    while Instant::now() < w.end && t.errors < 1000 {
        let t0 = Instant::now();
        let r = timeout_at(hard, async {
            conn.s.write_all(&req).await?;
            let head = conn.read_head().await?;
            let n = conn.skip_body(&head).await?;
            anyhow::Ok((head, n))
        })
        .await;
        let t1 = Instant::now();
        let reconnect = match r {
            Ok(Ok((head, n))) => {
                if (200..300).contains(&head.status) {
                    t.record(&w, t0, t1, n);
                } else {
                    t.errors += 1;
                }
                head.close
            }
            Ok(Err(_)) => {
                t.errors += 1;
                true
            }
            Err(_) => break,
        };
        if reconnect && Instant::now() < w.end {
            match timeout_at(hard, Conn::connect(addr)).await {
                Ok(Ok(c)) => {
                    conn = c;
                    t.reconnects += 1;
                }
                _ => {
                    t.errors += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }
    t
}

// ---------------------------------------------------------------------------------------------
// WebSocket

struct Ws {
    c: Conn,
    /// A pre-built masked text frame (the server does not care that the mask repeats).
    frame: Vec<u8>,
    mask: [u8; 4],
}

async fn ws_connect(
    addr: SocketAddr,
    path: &str,
    cookie: &str,
    origin: &str,
    size: usize,
) -> anyhow::Result<Ws> {
    let mut c = Conn::connect(addr).await?;
    let mut key = [0u8; 16];
    rand::thread_rng().fill(&mut key);
    let key = base64::engine::general_purpose::STANDARD.encode(key);
    let mut req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: bench-load\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
    );
    if !origin.is_empty() {
        req.push_str(&format!("Origin: {origin}\r\n"));
    }
    if !cookie.is_empty() {
        req.push_str(&format!("Cookie: {cookie}\r\n"));
    }
    req.push_str("\r\n");
    c.s.write_all(req.as_bytes()).await?;
    let head = c.read_head().await?;
    ensure!(
        head.status == 101,
        "WebSocket handshake answered {}",
        head.status
    );
    let mut mask = [0u8; 4];
    rand::thread_rng().fill(&mut mask);
    let payload: Vec<u8> = (0..size).map(|i| b'a' + (i % 26) as u8).collect();
    Ok(Ws {
        c,
        frame: client_frame(0x1, &payload, mask),
        mask,
    })
}

fn client_frame(opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut f = Vec::with_capacity(payload.len() + 14);
    f.push(0x80 | opcode);
    let len = payload.len();
    if len < 126 {
        f.push(0x80 | len as u8);
    } else if len <= u16::MAX as usize {
        f.push(0x80 | 126);
        f.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        f.push(0x80 | 127);
        f.extend_from_slice(&(len as u64).to_be_bytes());
    }
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

impl Ws {
    /// Sends the message and waits for a complete data message back (answering pings).
    async fn echo(&mut self) -> anyhow::Result<()> {
        self.c.s.write_all(&self.frame).await?;
        self.read_message().await
    }

    async fn read_message(&mut self) -> anyhow::Result<()> {
        loop {
            while self.c.buf.len() < 2 {
                self.c.fill().await?;
            }
            let b0 = self.c.buf[0];
            let b1 = self.c.buf[1];
            let masked = b1 & 0x80 != 0;
            let (len, hlen) = match b1 & 0x7f {
                126 => {
                    while self.c.buf.len() < 4 {
                        self.c.fill().await?;
                    }
                    (u16::from_be_bytes([self.c.buf[2], self.c.buf[3]]) as u64, 4)
                }
                127 => {
                    while self.c.buf.len() < 10 {
                        self.c.fill().await?;
                    }
                    let mut b = [0u8; 8];
                    b.copy_from_slice(&self.c.buf[2..10]);
                    (u64::from_be_bytes(b), 10)
                }
                n => (n as u64, 2),
            };
            let hlen = hlen + if masked { 4 } else { 0 };
            ensure!(len <= 64 * 1024 * 1024, "oversized frame");
            let total = hlen + len as usize;
            while self.c.buf.len() < total {
                self.c.fill().await?;
            }
            let frame = self.c.buf.split_to(total);
            let opcode = b0 & 0x0f;
            let fin = b0 & 0x80 != 0;
            match opcode {
                0x9 => {
                    // Ping: answer with a pong carrying the same payload.
                    let mut payload = frame[hlen..].to_vec();
                    if masked {
                        let m = [
                            frame[hlen - 4],
                            frame[hlen - 3],
                            frame[hlen - 2],
                            frame[hlen - 1],
                        ];
                        for (i, b) in payload.iter_mut().enumerate() {
                            *b ^= m[i % 4];
                        }
                    }
                    let pong = client_frame(0xA, &payload, self.mask);
                    self.c.s.write_all(&pong).await?;
                }
                0xA => {}
                0x8 => bail!("the peer closed the WebSocket"),
                0x0..=0x2 => {
                    if fin {
                        return Ok(());
                    }
                }
                other => bail!("unexpected WebSocket opcode {other}"),
            }
        }
    }
}

async fn ws_load(a: WsArgs) -> anyhow::Result<Outcome> {
    let c = a.common.clone();
    check_loopback(&c.addr)?;
    ensure!(
        (1..=20_000).contains(&c.connections),
        "connections must be 1–20000"
    );
    ensure!(a.size <= 1 << 20, "message size at most 1 MiB");
    let meter = CpuMeter::new();
    let w = Window::new(c.warmup, c.duration)?;
    let servers = ServerCpu::start(&c, &w);
    let mut socks = Vec::with_capacity(c.connections);
    for _ in 0..c.connections {
        socks.push(
            ws_connect(c.addr, &c.path, &c.cookie, &a.origin, a.size)
                .await
                .with_context(|| format!("opening a WebSocket to {}{}", c.addr, c.path))?,
        );
    }
    let mut tasks = Vec::with_capacity(socks.len());
    for ws in socks {
        tasks.push(tokio::task::spawn_local(ws_worker(ws, w, a.size as u64)));
    }
    let mut total = Tally::new();
    for t in tasks {
        total.merge(t.await?);
    }
    let mut o = outcome(&c, &total);
    o.msgs_s = Some(total.count as f64 / c.duration);
    o.client_cpu = meter.share();
    (o.proxy_cpu_us, o.upstream_cpu_us) = servers.per(total.count).await;
    ensure!(
        total.count > 0,
        "no message echoed (errors: {})",
        total.errors
    );
    Ok(o)
}

async fn ws_worker(mut ws: Ws, w: Window, size: u64) -> Tally {
    let mut t = Tally::new();
    let hard = tokio::time::Instant::from_std(w.end + Duration::from_secs(2));
    while Instant::now() < w.end {
        let t0 = Instant::now();
        match timeout_at(hard, ws.echo()).await {
            Ok(Ok(())) => t.record(&w, t0, Instant::now(), size),
            Ok(Err(_)) => {
                // A WebSocket that failed is not reopened: that would measure handshakes.
                t.errors += 1;
                break;
            }
            Err(_) => break,
        }
    }
    t
}

// ---------------------------------------------------------------------------------------------
// idle

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let line = s
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("no VmRSS line")?;
    let kib = line
        .split_whitespace()
        .nth(1)
        .context("malformed VmRSS")?
        .parse()?;
    Ok(kib)
}

fn rss_total(pids: &[u32]) -> anyhow::Result<u64> {
    pids.iter().map(|&p| rss_kib(p)).sum()
}

async fn idle(a: IdleArgs) -> anyhow::Result<Outcome> {
    check_loopback(&a.addr)?;
    ensure!(
        (1..=20_000).contains(&a.connections),
        "connections must be 1–20000"
    );
    ensure!((0.0..=120.0).contains(&a.settle), "settle at most 120 s");
    let before = rss_total(&a.pids)?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let mut held: Vec<Ws> = Vec::with_capacity(a.connections);
    // Memory is read with half the sockets open and again with all of them: the growth between
    // the two is what each further socket costs. The first half also pays for what a process
    // touches once (code paths run the first time, pools and tables sized up), which would
    // otherwise be spread over every socket and move the figure by whole KiB between builds.
    let half = a.connections / 2;
    let mut mid = before;
    for target in [half, a.connections] {
        // Open in batches of `parallel` handshakes, each verified by one echo through the proxy.
        while held.len() < target {
            let n = a.parallel.max(1).min(target - held.len());
            let mut batch = Vec::with_capacity(n);
            for _ in 0..n {
                let (addr, path, cookie, origin) =
                    (a.addr, a.path.clone(), a.cookie.clone(), a.origin.clone());
                batch.push(tokio::task::spawn_local(async move {
                    let mut ws = ws_connect(addr, &path, &cookie, &origin, 64).await?;
                    ws.echo().await?;
                    anyhow::Ok(ws)
                }));
            }
            for t in batch {
                let ws = timeout_at(deadline, t)
                    .await
                    .context("opening the WebSockets took over 120 s")???;
                held.push(ws);
            }
        }
        tokio::time::sleep(Duration::from_secs_f64(a.settle)).await;
        if target == half {
            mid = rss_total(&a.pids)?;
        }
    }
    let after = rss_total(&a.pids)?;
    // Every connection must still be proxied end to end when memory is read.
    let mut errors = 0;
    for ws in held.iter_mut() {
        if !matches!(timeout_at(deadline, ws.echo()).await, Ok(Ok(()))) {
            errors += 1;
        }
    }
    let n = held.len();
    drop(held);
    Ok(Outcome {
        target: a.target,
        scenario: a.scenario,
        round: a.round,
        connections: n,
        seconds: a.settle,
        count: n as u64,
        errors,
        kib_per_conn: Some(after.saturating_sub(mid) as f64 / (n - half).max(1) as f64),
        kib_all_per_conn: Some(after.saturating_sub(before) as f64 / n as f64),
        rss_before_kib: Some(before),
        rss_mid_kib: Some(mid),
        rss_after_kib: Some(after),
        ..Default::default()
    })
}

// ---------------------------------------------------------------------------------------------
// report

const START: &str = "<!-- bench:start -->";
const END: &str = "<!-- bench:end -->";
const TARGETS: [&str; 5] = ["direct", "edge", "nginx", "haproxy", "relay"];

/// A row of the table: a scenario, a metric, and whether more is better.
struct Metric {
    scenario: &'static str,
    label: &'static str,
    get: fn(&Outcome) -> Option<f64>,
    higher_is_better: bool,
    /// The goal for the edge, as a ratio to the best of nginx and HAProxy (or absolute).
    goal: Goal,
}

enum Goal {
    RatioAtLeast(f64),
    RatioAtMost(f64),
    AbsBelow(f64),
    None,
}

/// The proxy's CPU time per request in units of the upstream's, both measured over the same
/// window: the upstream does the same work for every target, so it is a yardstick that moves
/// with the machine's speed, and the ratio does not (the raw µs drift with the VM's load).
fn cpu_relative(o: &Outcome) -> Option<f64> {
    Some(o.proxy_cpu_us? / o.upstream_cpu_us?)
}

fn metrics() -> Vec<Metric> {
    let rps = |o: &Outcome| o.rps;
    let p50 = |o: &Outcome| o.p50_us.map(|v| v as f64 / 1000.0);
    let p99 = |o: &Outcome| o.p99_us.map(|v| v as f64 / 1000.0);
    vec![
        Metric {
            scenario: "small-50",
            label: "small GET, 50 conns: req/s",
            get: rps,
            higher_is_better: true,
            goal: Goal::RatioAtLeast(1.2),
        },
        Metric {
            scenario: "small-50",
            label: "small GET, 50 conns: p50 ms",
            get: p50,
            higher_is_better: false,
            goal: Goal::None,
        },
        Metric {
            scenario: "small-50",
            label: "small GET, 50 conns: p99 ms",
            get: p99,
            higher_is_better: false,
            goal: Goal::RatioAtMost(1.0),
        },
        Metric {
            scenario: "small-50",
            label: "small GET, 50 conns: proxy CPU per req (× upstream's)",
            get: cpu_relative,
            higher_is_better: false,
            goal: Goal::None,
        },
        Metric {
            scenario: "small-50",
            label: "small GET, 50 conns: upstream CPU µs/req",
            get: |o| o.upstream_cpu_us,
            higher_is_better: false,
            goal: Goal::None,
        },
        Metric {
            scenario: "small-256",
            label: "small GET, 256 conns: req/s",
            get: rps,
            higher_is_better: true,
            goal: Goal::RatioAtLeast(1.2),
        },
        Metric {
            scenario: "small-256",
            label: "small GET, 256 conns: p50 ms",
            get: p50,
            higher_is_better: false,
            goal: Goal::None,
        },
        Metric {
            scenario: "small-256",
            label: "small GET, 256 conns: p99 ms",
            get: p99,
            higher_is_better: false,
            goal: Goal::RatioAtMost(1.0),
        },
        Metric {
            scenario: "small-256",
            label: "small GET, 256 conns: proxy CPU per req (× upstream's)",
            get: cpu_relative,
            higher_is_better: false,
            goal: Goal::None,
        },
        Metric {
            scenario: "64k-50",
            label: "64 KiB GET, 50 conns: MiB/s",
            get: |o| o.mib_s,
            higher_is_better: true,
            goal: Goal::None,
        },
        Metric {
            scenario: "64k-50",
            label: "64 KiB GET, 50 conns: p99 ms",
            get: p99,
            higher_is_better: false,
            goal: Goal::None,
        },
        Metric {
            scenario: "64k-50",
            label: "64 KiB GET, 50 conns: proxy CPU per req (× upstream's)",
            get: cpu_relative,
            higher_is_better: false,
            goal: Goal::None,
        },
        Metric {
            scenario: "ws-100",
            label: "WS echo 64 B, 100 conns: msgs/s",
            get: |o| o.msgs_s,
            higher_is_better: true,
            goal: Goal::RatioAtLeast(1.2),
        },
        Metric {
            scenario: "ws-100",
            label: "WS echo 64 B, 100 conns: p99 ms",
            get: p99,
            higher_is_better: false,
            goal: Goal::None,
        },
        Metric {
            scenario: "ws-100",
            label: "WS echo 64 B, 100 conns: proxy CPU per msg (× upstream's)",
            get: cpu_relative,
            higher_is_better: false,
            goal: Goal::None,
        },
        Metric {
            scenario: "idle-2000",
            label: "idle WS, 2000 held: KiB per further WS",
            get: |o| o.kib_per_conn,
            higher_is_better: false,
            goal: Goal::AbsBelow(4.0),
        },
        Metric {
            scenario: "idle-2000",
            label: "idle WS, 2000 held: KiB per WS from start",
            get: |o| o.kib_all_per_conn,
            higher_is_better: false,
            goal: Goal::None,
        },
    ]
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let m = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    })
}

fn fmt_num(v: f64) -> String {
    if v >= 1000.0 {
        // Thousands separators keep req/s readable.
        let s = format!("{:.0}", v);
        let mut out = String::new();
        for (i, ch) in s.chars().enumerate() {
            if i > 0 && (s.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(ch);
        }
        out
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn report(a: &ReportArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&a.results)
        .with_context(|| format!("reading {}", a.results.display()))?;
    let mut rows: Vec<Outcome> = Vec::new();
    for line in text.lines().filter(|l| l.trim_start().starts_with('{')) {
        rows.push(serde_json::from_str(line).with_context(|| format!("bad line: {line}"))?);
    }
    let mut table = String::new();
    table.push_str(START);
    table.push('\n');
    for m in &a.meta {
        let (k, v) = m.split_once('=').unwrap_or((m.as_str(), ""));
        table.push_str(&format!("- **{k}**: {v}\n"));
    }
    let rounds: BTreeMap<&str, usize> = TARGETS
        .iter()
        .map(|t| {
            let mut r: Vec<u32> = rows
                .iter()
                .filter(|o| o.target == *t)
                .map(|o| o.round)
                .collect();
            r.sort();
            r.dedup();
            (*t, r.len())
        })
        .collect();
    table.push_str(&format!(
        "- **rounds per target** (medians shown): {}\n\n",
        rounds
            .iter()
            .map(|(t, n)| format!("{t} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    table.push_str(
        "| metric | direct | edge | nginx | HAProxy | byte relay | edge ÷ best proxy | goal | met |\n",
    );
    table.push_str("|---|---:|---:|---:|---:|---:|---:|---|---|\n");
    for m in metrics() {
        let med: BTreeMap<&str, Option<f64>> = TARGETS
            .iter()
            .map(|t| {
                let v: Vec<f64> = rows
                    .iter()
                    .filter(|o| o.target == *t && o.scenario == m.scenario)
                    .filter_map(|o| (m.get)(o))
                    .collect();
                (*t, median(v))
            })
            .collect();
        let best = match (med["nginx"], med["haproxy"]) {
            (Some(n), Some(h)) => Some(if m.higher_is_better {
                n.max(h)
            } else {
                n.min(h)
            }),
            (x, y) => x.or(y),
        };
        let ratio = match (med["edge"], best) {
            (Some(e), Some(b)) if b > 0.0 => Some(e / b),
            _ => None,
        };
        let cell = |v: Option<f64>| v.map(fmt_num).unwrap_or_else(|| "—".into());
        let (goal, met) = match m.goal {
            Goal::RatioAtLeast(g) => (format!("≥ {g:.1}×"), ratio.map(|r| r >= g)),
            Goal::RatioAtMost(g) => (format!("≤ {g:.1}×"), ratio.map(|r| r <= g)),
            Goal::AbsBelow(g) => (format!("< {g} KiB"), med["edge"].map(|e| e < g)),
            Goal::None => (String::new(), None),
        };
        let met = match met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "",
        };
        table.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            m.label,
            cell(med["direct"]),
            cell(med["edge"]),
            cell(med["nginx"]),
            cell(med["haproxy"]),
            cell(med["relay"]),
            ratio
                .map(|r| format!("{r:.2}×"))
                .unwrap_or_else(|| "—".into()),
            goal,
            met
        ));
    }
    let errors: u64 = rows.iter().map(|o| o.errors).sum();
    let cpu: Vec<String> = TARGETS
        .iter()
        .filter_map(|t| {
            let max = rows
                .iter()
                .filter(|o| o.target == *t)
                .filter_map(|o| o.client_cpu)
                .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))))?;
            Some(format!("{t} {:.0} %", max * 100.0))
        })
        .collect();
    if !cpu.is_empty() {
        table.push_str(&format!(
            "\nLoad generator's highest CPU use in a run (of its one core): {}.",
            cpu.join(", ")
        ));
    }
    table.push_str(&format!(
        "\nFailed requests/messages across all runs: {errors}. For the `direct` column of the idle row \
         the memory is the upstream's own (it terminates the WebSockets).\n"
    ));
    table.push_str(END);

    let doc = std::fs::read_to_string(&a.out).unwrap_or_default();
    let new = match (doc.find(START), doc.find(END)) {
        (Some(s), Some(e)) if e > s => {
            format!("{}{}{}", &doc[..s], table, &doc[e + END.len()..])
        }
        _ => format!("{}\n{}\n", doc.trim_end(), table),
    };
    std::fs::write(&a.out, new).with_context(|| format!("writing {}", a.out.display()))?;
    println!("{}", table);
    Ok(())
}
