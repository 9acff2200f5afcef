//! What Marina's tests share, in one dev-only crate (listed under `[dev-dependencies]` only).
//!
//! - [`venv`]: the notebook Python environment the real-Marimo tests use, and free ports.
//! - [`marimo`]: a real `marimo edit` server, and a client speaking Marimo's own protocol.
//! - [`ws_upstream`]: fake WebSocket upstreams standing in for Marimo's socket.
//! - [`control`]: the fake control plane the edge's tests talk to (its answers are checked
//!   against the real internal router by `tests/control_contract.rs`).
//!
//! It depends on `marina-config` only, never on `marina-control` or `marina-proxy`: the edge's
//! tests use it without meeting the control plane.

pub mod control;
pub mod marimo;
pub mod venv;
pub mod ws_upstream;
