//! The control plane ↔ edge protocol. Both sides link this module, so they agree by
//! construction; neither links the other.
//!
//! - The one-time URL token ([`UrlClaims`]): minted by `open`, signed with the control plane's
//!   Ed25519 key (`EdDSA`), redeemed once by the edge.
//! - The routes feed ([`RoutesFeed`], see [`routes`]): `GET /internal/v1/routes` answers a
//!   snapshot; `?after=V&waitSeconds=S` answers what changed since `V` (a fresh snapshot when
//!   `V` cannot be resumed from), holding the request (long poll) until something changes or `S`
//!   seconds pass. The edge keeps serving its last table while the control plane is
//!   unreachable.
//! - Activity ([`ActivityBatch`]): `POST /internal/v1/activity`, every few seconds.
//! - Replay checks ([`RedeemRequest`]): `POST /internal/v1/redeem` when the edge is configured
//!   with the shared replay store; 200 first time, 409 after.
//!
//! Every internal call carries `Authorization: Bearer <internal token>`; member API keys are
//! never accepted there.

use serde::{Deserialize, Serialize};

use crate::ids::Id;

pub mod activity;
pub mod routes;

pub use activity::*;
pub use routes::*;

/// Path prefix of the internal API.
pub const INTERNAL_PREFIX: &str = "/internal/v1";
/// Lifetime of the URL token `open` mints, seconds.
pub const URL_TOKEN_TTL_SECONDS: u64 = 300;
/// The only JWT algorithm either side uses for URL tokens.
pub const URL_TOKEN_ALG: &str = "EdDSA";

/// What the token lets its bearer do in the notebook.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessMode {
    /// The owner: full Marimo editor (minus Marimo's own credential endpoints).
    Edit,
    /// Anyone else who may see the notebook: a read-only kiosk mirror of the owner's session.
    View,
}

/// Claims of the one-time URL token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UrlClaims {
    pub iss: String,
    pub aud: String,
    /// The member the URL was minted for.
    pub sub: Id,
    /// The notebook.
    pub nb: Id,
    /// The notebook's session id at minting (changes on every start).
    pub sid: Id,
    pub mode: AccessMode,
    /// Unique token id, for single use.
    pub jti: String,
    pub iat: u64,
    pub nbf: u64,
    pub exp: u64,
}

/// Ask the control plane to mark a URL token as used.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RedeemRequest {
    pub jti: String,
    /// The token's `exp`; the record may be forgotten after it.
    pub exp: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mode_is_lowercase() {
        assert_eq!(
            serde_json::to_string(&AccessMode::View).unwrap(),
            "\"view\""
        );
    }
}
