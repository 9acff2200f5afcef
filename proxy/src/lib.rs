//! `marina-proxy`: the edge between browsers and the per-notebook Marimo servers.
//!
//! Every request passes named phases, each a module with its own tests, sharing one
//! per-request context (see `docs/request-lifecycle.md`):
//!
//! - [`route`]: host or path → notebook id and route entry; the routing table (lock-free swap).
//! - [`authenticate`]: the only phase that sees raw credentials — redeems the one-time URL token
//!   in the handshake ([`authenticate::token`], [`authenticate::replay`]) or opens the sealed
//!   session cookie ([`authenticate::cookie`]) — and yields a verified identity.
//! - [`authorize`]: owner edits, viewers get the read-only allow-list; Marimo session ids are
//!   bound to the member; `/auth/*` refused for everyone.
//! - [`forward`]: streams HTTP to the notebook with credentials swapped; [`ws`] relays
//!   WebSockets frame by frame with no buffer held while idle.
//! - [`activity`]: per-notebook atomics on the hot path, batches to the control plane.
//!
//! Around them:
//! - [`error`]: the one request error type and the one function mapping it to a response;
//!   [`ProxyError`] for start-up.
//! - [`feed`]: routes from the control plane's long-poll feed or a static file.
//! - [`control`]: the client of the control plane's internal API.
//! - [`metrics`], [`admin`]: Prometheus metrics and the admin listener.
//! - [`tls`]: rustls with certificate reload. [`body`]: the response body type.
//! - `edge`: [`Edge::new`] and [`Edge::serve`], the accept loop, the phase pipeline, shutdown.
#![forbid(unsafe_code)]

pub mod activity;
pub mod admin;
pub mod authenticate;
pub mod authorize;
pub mod body;
pub mod control;
mod edge;
pub mod error;
pub mod feed;
pub mod forward;
pub mod metrics;
pub mod route;
pub mod tls;
pub mod ws;

pub use edge::Edge;
pub use error::{EdgeError, ErrorKind, ProxyError};
