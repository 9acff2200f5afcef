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
//! Files, each importing only the ones after it: [`handshake`] (how a browser asks, the
//! upgrade with the upstream), [`relay`] (its settings and context, both directions of a
//! socket, the buffer pool, the edge's own frames and close codes), [`frame`] (the frame-header
//! codec).

mod frame;
mod handshake;
mod relay;

pub use handshake::{handshake_kind, upgrade, Handshake};
pub use relay::{close, run, End, RelayCtx, WsConfig};
