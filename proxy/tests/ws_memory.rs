//! Memory per idle proxied WebSocket (target: < 4 KiB). Alone in its own test binary so no
//! other test allocates while it measures the process's resident set.
//!
//! The process holds the edge *and* the client sockets *and* a minimal upstream, so the figure
//! is an upper bound for the edge's share. The upstream is `marina_testkit::ws_upstream::idle`.

mod common;

use std::time::Duration;

use common::*;
use marina_config::wire::AccessMode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn rss_bytes() -> usize {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: usize = s
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb * 1024
}

/// Opens a WebSocket through the edge by hand and keeps only the TCP stream.
async fn raw_ws(edge: &TestEdge, cookie: &str, i: usize) -> TcpStream {
    let mut s = TcpStream::connect(edge.addr).await.unwrap();
    let req = format!(
        "GET /notebooks/NOTEBOOK01/ws?session_id=s_{i:06} HTTP/1.1\r\nHost: {}\r\nOrigin: {}\r\nCookie: {cookie}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        edge.addr,
        edge.origin()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut b = [0u8; 256];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut b).await.unwrap();
        assert!(n > 0, "closed during upgrade");
        got.extend_from_slice(&b[..n]);
    }
    assert!(
        got.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    s
}

/// A client socket upgraded directly at the upstream (the baseline).
async fn raw_direct(up: std::net::SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(up).await.unwrap();
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut b = [0u8; 256];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut b).await.unwrap();
        assert!(n > 0);
        got.extend_from_slice(&b[..n]);
    }
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_websockets_cost_little_memory() {
    let keys = Keys::generate();
    let up = marina_testkit::ws_upstream::idle().await;
    let r = route("NOTEBOOK01", "SESSION001", up, id("OWNER00001"), &[]);
    let edge = TestEdge::start(&keys, std::slice::from_ref(&r), EdgeOptions::default()).await;
    let cookie = login(&edge, &keys, &r, id("OWNER00001"), AccessMode::Edit).await;
    // Baseline: the same client and upstream sockets without the edge in between.
    let mut direct = Vec::new();
    for _ in 0..200 {
        direct.push(raw_direct(up).await);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let d0 = rss_bytes();
    for _ in 0..2000 {
        direct.push(raw_direct(up).await);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let direct_per = rss_bytes().saturating_sub(d0) / 2000;
    drop(direct);
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Warm up allocator arenas, the buffer pool and the runtime.
    let mut socks = Vec::new();
    for i in 0..200 {
        socks.push(raw_ws(&edge, &cookie, i).await);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = rss_bytes();
    let n = 2000;
    for i in 200..200 + n {
        socks.push(raw_ws(&edge, &cookie, i).await);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(edge.metrics.websockets_open.get(), (n + 200) as i64);
    let after = rss_bytes();
    let per = after.saturating_sub(before) / n;
    let edge_share = per.saturating_sub(direct_per);
    println!(
        "idle proxied WebSocket: {per} bytes per socket with the edge, {direct_per} without: \
         edge share {edge_share} bytes ({n} sockets, RSS {before} -> {after})"
    );
    assert!(
        edge_share < 4096,
        "edge holds {edge_share} bytes per idle WebSocket"
    );
    drop(socks);
    edge.stop().await;
}
