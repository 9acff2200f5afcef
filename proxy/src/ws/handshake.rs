//! The WebSocket handshake with the upstream: the HTTP/1.1 upgrade request the edge writes
//! itself, the upstream's answer checked, the browser's answer (`101`, or `200` to an HTTP/2
//! extended `CONNECT`), then the relay spawned.

use std::io;

use base64::Engine as _;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Response, StatusCode};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::error::{EdgeError, ErrorKind};
use crate::forward::body::EdgeBody;
use crate::route::RouteEntry;

use super::relay::run;
use super::{Handshake, RelayCtx};

/// Largest upgrade response head accepted from Marimo.
const MAX_HEAD: usize = 16 * 1024;

/// Performs the upgrade with the upstream, answers the browser's upgrade, and spawns the relay.
/// `headers` are already rewritten for the upstream (credentials stripped, Marimo token added).
///
/// The upstream is always asked over HTTP/1.1. An HTTP/2 browser (`ExtendedConnect`) sent no
/// `Sec-WebSocket-Key`, so the edge makes one and checks the upstream's answer to it itself.
pub async fn upgrade(
    route: &RouteEntry,
    path_and_query: &str,
    headers: &HeaderMap,
    kind: Handshake,
    on_upgrade: OnUpgrade,
    ctx: RelayCtx,
) -> Result<Response<EdgeBody>, EdgeError> {
    let cfg = ctx.config;
    let addr = route.upstream.as_str();
    let mut up = match tokio::time::timeout(cfg.connect_timeout, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            return Err(
                EdgeError::new(ErrorKind::UpstreamConnect, "websocket connect").with_cause(e),
            )
        }
        Err(_) => {
            return Err(EdgeError::new(
                ErrorKind::UpstreamConnect,
                "websocket connect timeout",
            ))
        }
    };
    let _ = up.set_nodelay(true);

    let mut req = Vec::with_capacity(1024);
    req.extend_from_slice(b"GET ");
    req.extend_from_slice(path_and_query.as_bytes());
    req.extend_from_slice(b" HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n");
    let own_key = (kind == Handshake::ExtendedConnect).then(new_key);
    for (name, value) in headers {
        // Extensions are not negotiated: the relay passes frames through unchanged and
        // compressed payloads would hide message sizes. The key is the edge's own over HTTP/2.
        if name == header::SEC_WEBSOCKET_EXTENSIONS
            || (own_key.is_some() && name == header::SEC_WEBSOCKET_KEY)
        {
            continue;
        }
        req.extend_from_slice(name.as_str().as_bytes());
        req.extend_from_slice(b": ");
        req.extend_from_slice(value.as_bytes());
        req.extend_from_slice(b"\r\n");
    }
    if let Some(key) = &own_key {
        req.extend_from_slice(b"sec-websocket-key: ");
        req.extend_from_slice(key.as_bytes());
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"\r\n");

    let head = async {
        up.write_all(&req).await?;
        // Read the response head. Small and short-lived; the relay's buffers come from the pool.
        let mut buf = Vec::with_capacity(1024);
        loop {
            let mut chunk = [0u8; 1024];
            let n = up.read(&mut chunk).await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "closed before response",
                ));
            }
            buf.extend_from_slice(&chunk[..n]);
            if let Some(end) = find_head_end(&buf) {
                return Ok((buf, end));
            }
            if buf.len() > MAX_HEAD {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "response head too large",
                ));
            }
        }
    };
    let (buf, end) = match tokio::time::timeout(cfg.response_timeout, head).await {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            return Err(
                EdgeError::new(ErrorKind::UpstreamProtocol, "websocket handshake").with_cause(e),
            )
        }
        Err(_) => {
            return Err(EdgeError::new(
                ErrorKind::UpstreamTimeout,
                "websocket handshake",
            ))
        }
    };
    let mut parsed = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut parsed);
    let status = match resp.parse(&buf[..end]) {
        Ok(httparse::Status::Complete(_)) => resp.code.unwrap_or(502),
        _ => {
            return Err(EdgeError::new(
                ErrorKind::UpstreamProtocol,
                "websocket response head",
            ))
        }
    };
    if status != 101 {
        // Marimo refused (e.g. 403 for a missing session id): pass the status on, nothing else.
        let mut r = Response::new(EdgeBody::empty());
        *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
        r.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        return Ok(r);
    }
    let mut out = Response::new(EdgeBody::empty());
    match &own_key {
        None => {
            *out.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            let h = out.headers_mut();
            h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
            h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        }
        Some(key) => {
            // RFC 8441 §5: a 2xx opens the stream. The browser cannot check the upstream's
            // `Sec-WebSocket-Accept` (it never saw a key), so the edge does.
            let accept = resp
                .headers
                .iter()
                .find(|ph| ph.name.eq_ignore_ascii_case("sec-websocket-accept"))
                .map(|ph| ph.value);
            if accept != Some(accept_for(key).as_bytes()) {
                return Err(EdgeError::new(
                    ErrorKind::UpstreamProtocol,
                    "websocket accept",
                ));
            }
            *out.status_mut() = StatusCode::OK;
        }
    }
    let h = out.headers_mut();
    for ph in resp.headers.iter() {
        let keep = (own_key.is_none() && ph.name.eq_ignore_ascii_case("sec-websocket-accept"))
            || ph.name.eq_ignore_ascii_case("sec-websocket-protocol");
        if keep {
            if let (Ok(n), Ok(v)) = (
                header::HeaderName::try_from(ph.name),
                HeaderValue::from_bytes(ph.value),
            ) {
                h.insert(n, v);
            }
        }
    }
    // Frames the upstream sent right after its head (possible: it may push `kernel-ready` at
    // once) must reach the browser first.
    let leftover = Bytes::copy_from_slice(&buf[end..]);
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let end = run(TokioIo::new(upgraded), up, leftover, ctx).await;
                tracing::debug!(?end, "websocket closed");
            }
            Err(e) => tracing::debug!(error = %e, "browser upgrade failed"),
        }
    });
    Ok(out)
}

/// A fresh `Sec-WebSocket-Key`: 16 random bytes, base64 (RFC 6455 §4.1).
fn new_key() -> String {
    base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 16]>())
}

/// The `Sec-WebSocket-Accept` a server must answer to `key` (RFC 6455 §4.2.2).
fn accept_for(key: &str) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    ctx.update(key.as_bytes());
    ctx.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(ctx.finish().as_ref())
}

fn find_head_end(b: &[u8]) -> Option<usize> {
    b.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_matches_the_rfc_example() {
        // RFC 6455 §1.3.
        assert_eq!(
            accept_for("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        assert_eq!(new_key().len(), 24);
        assert_ne!(new_key(), new_key());
    }
}
