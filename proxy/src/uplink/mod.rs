//! The edge's uplink to the control plane: the client of its internal API ([`client`]), where
//! routes come from ([`feed`]: the long-poll feed or a static file) and the activity reporter
//! ([`report`]). Background tasks and start-up only, never a request, except the shared replay
//! store's redemption in the handshake ([`crate::authenticate::replay`]).

pub mod client;
pub mod feed;
pub mod report;
