//! Phase 4, `forward` (WebSocket): the upgrade handshake with the upstream and the frame relay.
//!
//! Memory is the design constraint: a notebook tab keeps its socket open for hours, mostly
//! idle. The relay therefore holds **no buffer while a socket is idle**. Each direction borrows
//! a 16 KiB buffer from a per-thread pool only for the duration of one read attempt: if the read
//! is `Pending` the buffer goes straight back (an `AsyncRead` keeps no reference to it), and if
//! data arrived it is kept only until that data has been written on (back-pressure: nothing
//! more is read until the other side accepted it). An idle proxied socket costs its two sockets
//! and one task.
//!
//! The edge owns the upstream TCP connection and writes the HTTP/1.1 upgrade request itself
//! ([`handshake`], with `forward`'s HTTP/1.1 connection, head writer and head parser; no
//! WebSocket library, no extensions negotiated: frames pass through unchanged). Browsers
//! reach it either way: an HTTP/1.1 `Upgrade`, or on HTTP/2 an extended `CONNECT` (RFC 8441)
//! whose stream then carries the same frames; the upstream leg is HTTP/1.1 in both cases. It parses
//! frame *headers* as bytes stream past, never payloads, to
//! - count browser → notebook data messages as activity (not pings/pongs),
//! - enforce `proxy.max_ws_message_bytes` (close 1009),
//! - know frame boundaries, the only places where it may inject its own frames: pings to the
//!   browser, and close frames (1011 when the upstream vanished, 1008 when the member's access
//!   was revoked, 1001 on shutdown or idle timeout).
//!
//! Files: [`handshake`] (the upgrade), [`relay`] (both directions of a socket, the buffer pool,
//! the edge's own frames), [`frame`] (the frame-header codec).

mod frame;
mod handshake;
mod relay;

use std::sync::Arc;
use std::time::Duration;

use http::header;
use tokio::sync::watch;

use crate::activity::{Activity, StreamGuard};
use crate::authenticate::Identity;
use crate::metrics::Metrics;
use crate::route::RouteTable;

pub use handshake::upgrade;
pub use relay::{run, End};

/// Close codes the edge sends (RFC 6455 §7.4.1).
pub mod close {
    pub const GOING_AWAY: u16 = 1001;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const UPSTREAM_GONE: u16 = 1011;
}

/// Settings of the relay.
#[derive(Clone, Copy, Debug)]
pub struct WsConfig {
    pub max_message: u64,
    pub ping_every: Duration,
    pub idle_after: Duration,
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
}

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

/// What the relay task needs to know about its socket.
pub struct RelayCtx {
    pub identity: Identity,
    pub activity: Arc<Activity>,
    pub guard: StreamGuard,
    pub routes: Arc<RouteTable>,
    pub shutdown: watch::Receiver<bool>,
    pub metrics: &'static Metrics,
    pub config: WsConfig,
}
