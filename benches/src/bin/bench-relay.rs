//! A reference point for the benchmarks, not a proxy anyone should run: a byte relay that
//! forwards each client connection to its own upstream connection without looking at the bytes
//! (no HTTP parsing, no authentication, nothing rewritten). It is the floor of what any proxy
//! pays on this machine for reading and writing every message on both legs, so the gap between
//! it and a real proxy is that proxy's own work.
//!
//! `--work-ns N` adds N nanoseconds of busy work after every read, to measure how throughput on
//! a shared core reacts to a proxy's per-message CPU cost (see BENCHMARKS.md).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Parser, Debug)]
#[command(about = "Byte relay: each client connection to its own upstream connection")]
struct Args {
    /// Address to listen on (loopback only).
    #[arg(long, default_value = "127.0.0.1:18106")]
    listen: SocketAddr,
    /// The upstream.
    #[arg(long, default_value = "127.0.0.1:18101")]
    upstream: SocketAddr,
    /// Busy work after every read, in nanoseconds.
    #[arg(long, default_value_t = 0)]
    work_ns: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.listen.ip().is_loopback(), "listen on loopback only");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("bind {}", args.listen))?;
        let work = Duration::from_nanos(args.work_ns);
        loop {
            let (client, _) = listener.accept().await?;
            tokio::spawn(async move {
                let Ok(up) = TcpStream::connect(args.upstream).await else {
                    return;
                };
                let _ = client.set_nodelay(true);
                let _ = up.set_nodelay(true);
                let (mut cr, mut cw) = client.into_split();
                let (mut ur, mut uw) = up.into_split();
                // Both directions in this one task, like a proxy's connection task.
                let _ =
                    tokio::try_join!(pump(&mut cr, &mut uw, work), pump(&mut ur, &mut cw, work));
            });
        }
    })
}

async fn pump(
    from: &mut (impl AsyncReadExt + Unpin),
    to: &mut (impl AsyncWriteExt + Unpin),
    work: Duration,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return to.shutdown().await;
        }
        if !work.is_zero() {
            let t = Instant::now();
            while t.elapsed() < work {
                std::hint::spin_loop();
            }
        }
        to.write_all(&buf[..n]).await?;
    }
}
