//! Fake WebSocket upstreams standing in for Marimo's socket, speaking raw RFC 6455 over TCP
//! (so what the edge sends is seen byte for byte, and nothing is buffered on their side).
//!
//! - [`WsUpstream`]: scripted by the client's text messages (`big:N`, `echo:X`, `die`); records
//!   each upgrade request and counts close frames.
//! - [`idle`]: completes the upgrade, then only waits (as Marimo's socket does between outputs),
//!   holding as little memory as it can, for memory measurements.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

/// A minimal raw WebSocket server standing in for Marimo: on text `big:N` it sends an N-byte
/// text message, `echo:X` echoes, `die` drops the connection without a close frame. Records
/// request URIs.
pub struct WsUpstream {
    pub addr: SocketAddr,
    /// Per upgrade request: its URI, a newline, then the whole request head.
    pub uris: Arc<Mutex<Vec<String>>>,
    /// Close frames received (each answered with a close, code 1000).
    pub closes_seen: Arc<Mutex<u32>>,
}

impl WsUpstream {
    /// Listens on an ephemeral loopback port; each connection is served by a task of its own.
    pub async fn start() -> WsUpstream {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let uris: Arc<Mutex<Vec<String>>> = Arc::default();
        let closes: Arc<Mutex<u32>> = Arc::default();
        let (u2, c2) = (uris.clone(), closes.clone());
        tokio::spawn(async move {
            loop {
                let Ok((s, _)) = l.accept().await else { return };
                let (uris, closes) = (u2.clone(), c2.clone());
                tokio::spawn(async move {
                    let _ = serve_scripted(s, uris, closes).await;
                });
            }
        });
        WsUpstream {
            addr,
            uris,
            closes_seen: closes,
        }
    }
}

/// The `Sec-WebSocket-Key` of a request head (empty when absent).
fn request_key(head: &str) -> String {
    head.lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .starts_with("sec-websocket-key:")
                .then(|| l[18..].trim().to_string())
        })
        .unwrap_or_default()
}

/// The `101 Switching Protocols` answer to a request with `key`.
fn switching_protocols(key: &str) -> String {
    let accept = derive_accept_key(key.as_bytes());
    format!("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n")
}

async fn serve_scripted(
    mut s: TcpStream,
    uris: Arc<Mutex<Vec<String>>>,
    closes: Arc<Mutex<u32>>,
) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut b).await?;
        head.push(b[0]);
    }
    let text = String::from_utf8_lossy(&head).to_string();
    let uri = text.split(' ').nth(1).unwrap_or("").to_string();
    uris.lock().unwrap().push(format!("{uri}\n{text}"));
    let key = request_key(&text);
    s.write_all(switching_protocols(&key).as_bytes()).await?;
    loop {
        let mut h = [0u8; 2];
        s.read_exact(&mut h).await?;
        let op = h[0] & 0x0f;
        let mut len = (h[1] & 0x7f) as u64;
        if len == 126 {
            let mut e = [0u8; 2];
            s.read_exact(&mut e).await?;
            len = u16::from_be_bytes(e) as u64;
        } else if len == 127 {
            let mut e = [0u8; 8];
            s.read_exact(&mut e).await?;
            len = u64::from_be_bytes(e);
        }
        let mut mask = [0u8; 4];
        if h[1] & 0x80 != 0 {
            s.read_exact(&mut mask).await?;
        }
        let mut p = vec![0u8; len as usize];
        s.read_exact(&mut p).await?;
        for (i, c) in p.iter_mut().enumerate() {
            *c ^= mask[i % 4];
        }
        match op {
            0x8 => {
                *closes.lock().unwrap() += 1;
                s.write_all(&[0x88, 2, 0x03, 0xe8]).await?;
                return Ok(());
            }
            0x1 => {
                let t = String::from_utf8_lossy(&p).to_string();
                if let Some(n) = t.strip_prefix("big:") {
                    let n: usize = n.parse().unwrap();
                    send_text(&mut s, &vec![b'x'; n]).await?;
                } else if let Some(e) = t.strip_prefix("echo:") {
                    send_text(&mut s, e.as_bytes()).await?;
                } else if t == "die" {
                    return Ok(()); // drop: FIN without a close frame, like a killed process
                }
            }
            _ => {}
        }
    }
}

async fn send_text(s: &mut TcpStream, p: &[u8]) -> std::io::Result<()> {
    let mut h = vec![0x81u8];
    if p.len() < 126 {
        h.push(p.len() as u8);
    } else if p.len() < 65536 {
        h.push(126);
        h.extend_from_slice(&(p.len() as u16).to_be_bytes());
    } else {
        h.push(127);
        h.extend_from_slice(&(p.len() as u64).to_be_bytes());
    }
    s.write_all(&h).await?;
    s.write_all(p).await
}

/// An upstream that completes the upgrade and then just waits (as Marimo's socket does between
/// outputs): nothing kept per connection but the socket and its task. Returns its address.
pub async fn idle() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut head = Vec::with_capacity(512);
                let mut b = [0u8; 256];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = s.read(&mut b).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    head.extend_from_slice(&b[..n]);
                }
                let key = request_key(&String::from_utf8_lossy(&head));
                drop(head);
                let _ = s.write_all(switching_protocols(&key).as_bytes()).await;
                let mut one = [0u8; 1];
                let _ = s.read(&mut one).await;
            });
        }
    });
    addr
}
