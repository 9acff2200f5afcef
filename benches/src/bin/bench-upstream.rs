//! The upstream of the benchmarks: a small, fast HTTP/1.1 server standing in for a Marimo
//! server. Routes match on the path suffix (the edge forwards `/notebooks/<ID>/…` unchanged):
//! `…/small` answers ~100 bytes, `…/64k` answers 64 KiB, `…/ws` is a WebSocket echo.
//! Anything else is 404.

use std::convert::Infallible;
use std::net::SocketAddr;

use anyhow::Context;
use bytes::Bytes;
use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{
    HeaderValue, CONNECTION, CONTENT_TYPE, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, UPGRADE,
};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;

#[derive(Parser, Debug)]
#[command(about = "Benchmark upstream: /…/small, /…/64k, /…/ws (echo)")]
struct Args {
    /// Address to listen on (loopback only).
    #[arg(long, default_value = "127.0.0.1:18101")]
    listen: SocketAddr,
    /// Runtime worker threads; 1 uses a current-thread runtime.
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

/// ~100 bytes, like a small JSON answer.
const SMALL: &[u8] = b"{\"status\":\"ok\",\"kernel\":\"idle\",\"cells\":[1,2,3,4,5,6,7,8],\"version\":\"0.13.0\",\"padding\":\"xxxxxxxxx\"}\n";

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.listen.ip().is_loopback(),
        "the benchmark upstream binds to loopback only"
    );
    let rt = if args.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()?
    };
    rt.block_on(serve(args.listen))
}

async fn serve(addr: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    let big = Bytes::from(vec![b'x'; 64 * 1024]);
    let small = Bytes::from_static(SMALL);
    println!("bench-upstream listening on {addr}");
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                eprintln!("accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let (big, small) = (big.clone(), small.clone());
        tokio::spawn(async move {
            let svc = service_fn(move |req| handle(req, big.clone(), small.clone()));
            let _ = http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), svc)
                .with_upgrades()
                .await;
        });
    }
}

async fn handle(
    req: Request<Incoming>,
    big: Bytes,
    small: Bytes,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path();
    let resp = if path.ends_with("/small") {
        body(small, "application/json")
    } else if path.ends_with("/64k") {
        body(big, "application/octet-stream")
    } else if path.ends_with("/ws") {
        websocket(req)
    } else {
        status(StatusCode::NOT_FOUND)
    };
    Ok(resp)
}

fn body(b: Bytes, ct: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(b));
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(ct));
    r
}

fn status(s: StatusCode) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = s;
    r
}

fn websocket(mut req: Request<Incoming>) -> Response<Full<Bytes>> {
    let is_upgrade = req
        .headers()
        .get(UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let Some(key) = req.headers().get(SEC_WEBSOCKET_KEY).cloned() else {
        return status(StatusCode::BAD_REQUEST);
    };
    if !is_upgrade {
        return status(StatusCode::BAD_REQUEST);
    }
    let accept = derive_accept_key(key.as_bytes());
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let mut ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        while let Some(Ok(msg)) = ws.next().await {
            if msg.is_close() {
                break;
            }
            // Pings are answered by tungstenite on the next read/flush; data is echoed.
            if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                break;
            }
        }
    });
    let mut r = status(StatusCode::SWITCHING_PROTOCOLS);
    let h = r.headers_mut();
    h.insert(UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(v) = HeaderValue::from_str(&accept) {
        h.insert(SEC_WEBSOCKET_ACCEPT, v);
    }
    r
}
