//! The WebSocket handshake with the upstream: the HTTP/1.1 upgrade request the edge writes
//! itself, the upstream's answer checked, the browser's answer (`101`, or `200` to an HTTP/2
//! extended `CONNECT`), then the relay spawned.

use base64::Engine as _;
use http::header::{self, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Response, StatusCode};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use crate::error::{EdgeError, ErrorKind};
use crate::forward::body::EdgeBody;
use crate::forward::{Conn, ForwardInfo};
use crate::route::RouteEntry;

use super::relay::{run, RelayCtx};

/// How a browser asks for a WebSocket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handshake {
    /// HTTP/1.1: `GET` with `Upgrade: websocket`; answered `101`.
    Upgrade,
    /// HTTP/2 (RFC 8441): `CONNECT` with `:protocol = websocket` on one stream of a shared
    /// connection; answered `200`, with no `Sec-WebSocket-Key`/`-Accept` pair.
    ExtendedConnect,
}

/// Is this request a WebSocket handshake, and of which kind?
pub fn handshake_kind<B>(req: &http::Request<B>) -> Option<Handshake> {
    if req.version() == http::Version::HTTP_2 {
        let websocket = req
            .extensions()
            .get::<hyper::ext::Protocol>()
            .is_some_and(|p| p.as_str().eq_ignore_ascii_case("websocket"));
        return (req.method() == http::Method::CONNECT && websocket)
            .then_some(Handshake::ExtendedConnect);
    }
    req.headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
        .then_some(Handshake::Upgrade)
}

/// Performs the upgrade with the upstream, answers the browser's upgrade, and spawns the relay.
///
/// The upstream is asked over HTTP/1.1, on a connection of its own opened, written and read
/// by `forward`'s HTTP/1.1 code ([`Conn`]): the same header rules as every request (the edge's
/// cookie, the browser's credentials and identity claims out; Marimo's token, `Host` and the
/// `X-Forwarded-*` facts in). No extension is negotiated. An HTTP/2 browser (`ExtendedConnect`)
/// sent no `Sec-WebSocket-Key`, so the edge makes one and checks the upstream's answer to it
/// itself.
#[allow(clippy::too_many_arguments)]
pub async fn upgrade(
    route: &RouteEntry,
    parts: &Parts,
    cookie_names: &[&str; 2],
    info: &ForwardInfo<'_>,
    kind: Handshake,
    on_upgrade: OnUpgrade,
    ctx: RelayCtx,
) -> Result<Response<EdgeBody>, EdgeError> {
    let cfg = ctx.config;
    let mut up = Conn::open(route, cfg.connect_timeout).await?;
    let own_key = (kind == Handshake::ExtendedConnect).then(new_key);
    // Extensions are not negotiated: the relay passes frames through unchanged and compressed
    // payloads would hide message sizes. The key is the edge's own over HTTP/2.
    let skip = |name: &HeaderName| {
        name == header::SEC_WEBSOCKET_EXTENSIONS
            || (own_key.is_some() && name == header::SEC_WEBSOCKET_KEY)
    };
    let answer = up.upgrade(parts, cookie_names, route, info, skip, own_key.as_deref());
    let (status, headers) = match tokio::time::timeout(cfg.response_timeout, answer).await {
        Ok(r) => r?,
        Err(_) => {
            return Err(EdgeError::new(
                ErrorKind::UpstreamTimeout,
                "websocket handshake",
            ))
        }
    };
    if status != StatusCode::SWITCHING_PROTOCOLS {
        // Marimo refused (e.g. 403 for a missing session id): pass the status on, nothing else.
        let mut r = Response::new(EdgeBody::empty());
        *r.status_mut() = status;
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
            if let Some(v) = headers.get(header::SEC_WEBSOCKET_ACCEPT) {
                h.insert(header::SEC_WEBSOCKET_ACCEPT, v.clone());
            }
        }
        Some(key) => {
            // RFC 8441 §5: a 2xx opens the stream. The browser cannot check the upstream's
            // `Sec-WebSocket-Accept` (it never saw a key), so the edge does.
            let accept = headers
                .get(header::SEC_WEBSOCKET_ACCEPT)
                .map(|v| v.as_bytes());
            if accept != Some(accept_for(key).as_bytes()) {
                return Err(EdgeError::new(
                    ErrorKind::UpstreamProtocol,
                    "websocket accept",
                ));
            }
            *out.status_mut() = StatusCode::OK;
        }
    }
    if let Some(v) = headers.get(header::SEC_WEBSOCKET_PROTOCOL) {
        out.headers_mut()
            .insert(header::SEC_WEBSOCKET_PROTOCOL, v.clone());
    }
    // Frames the upstream sent right after its head (possible: it may push `kernel-ready` at
    // once) must reach the browser first.
    let (up, leftover) = (*up).into_socket();
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
