//! Marina's configuration and the types the control plane and the edge share.
//!
//! `proxy` and `control` never depend on each other: everything they exchange over the wire
//! (the one-time URL token's claims, the routes feed, activity batches, replay checks) is
//! defined here, once, so both sides agree on it by construction.
//!
//! Layout:
//! - [`settings`]: every setting, its unit and default, and how it is loaded
//!   (defaults < TOML file < `MARINA_` environment < command-line flags).
//! - [`ids`]: the 10-character `[0-9A-Z]` identifiers the API uses.
//! - [`addressing`]: where a notebook lives on the edge (subdomain or path mode).
//! - [`wire`]: the control plane ↔ edge protocol.
//! - [`workload`]: the workload config (`config.sail`) shape of the API, used by the runtime too.
//! - [`secrets`]: files holding generated secrets (mode 0600).
#![forbid(unsafe_code)]

pub mod addressing;
pub mod ids;
pub mod secrets;
pub mod settings;
pub mod wire;
pub mod workload;

pub use addressing::Addressing;
pub use ids::{Id, IdError};
pub use settings::{ConfigError, Settings};
