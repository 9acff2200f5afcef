//! The control plane ↔ edge protocol. Both sides link this module, so they agree by
//! construction; neither links the other.
//!
//! - The one-time URL token ([`UrlClaims`]): minted by `open`, signed with the control plane's
//!   Ed25519 key (`EdDSA`), redeemed once by the edge.
//! - The routes feed ([`RoutesSnapshot`]): `GET /internal/v1/routes?after=V&waitSeconds=S`
//!   answers at once with the current snapshot when its version is not `V`, otherwise holds the
//!   request (long poll) until the routes change or `S` seconds pass. The edge keeps serving its
//!   last snapshot while the control plane is unreachable.
//! - Activity ([`ActivityBatch`]): `POST /internal/v1/activity`, every few seconds.
//! - Replay checks ([`RedeemRequest`]): `POST /internal/v1/redeem` when the edge is configured
//!   with the shared replay store; 200 first time, 409 after.
//!
//! Every internal call carries `Authorization: Bearer <internal token>`; member API keys are
//! never accepted there.

use serde::{Deserialize, Serialize};

use crate::ids::Id;

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

/// One running notebook as the edge needs to know it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Route {
    pub notebook_id: Id,
    /// Current session id; cookies of another session are refused.
    pub session_id: Id,
    /// `host:port` of the notebook's Marimo server.
    pub upstream: String,
    /// Marimo's own token; the edge sends it upstream as `Authorization: Bearer`, the browser
    /// never sees it.
    pub upstream_token: String,
    /// The owner (edit access).
    pub owner_id: Id,
    /// Every other member who may currently see the notebook (team members, org admins).
    /// A member missing from here has lost access: their cookies stop working and their
    /// WebSockets are closed.
    pub viewers: Vec<Id>,
}

/// The whole routing table, versioned.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RoutesSnapshot {
    /// Increases with every change; opaque otherwise.
    pub version: u64,
    pub routes: Vec<Route>,
}

/// Activity of one notebook seen by one edge replica since its last report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NotebookActivity {
    pub notebook_id: Id,
    pub session_id: Id,
    /// Unix milliseconds of the latest browser request or message; `None` if none since the
    /// last report.
    pub last_active_ms: Option<i64>,
    /// WebSockets (and event streams) open to this notebook through this replica now.
    pub open_websockets: u32,
}

/// What an edge replica reports every `proxy.activity_interval_ms`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ActivityBatch {
    pub edge_id: String,
    /// Unix milliseconds when the batch was cut.
    pub sent_at_ms: i64,
    /// Every notebook with activity or open connections on this replica. A notebook absent from
    /// a replica's latest batch has no connection through it.
    pub notebooks: Vec<NotebookActivity>,
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
    fn route_json_shape() {
        let id = Id::parse("A1B2C3D4E5").unwrap();
        let r = Route {
            notebook_id: id,
            session_id: id,
            upstream: "127.0.0.1:1".into(),
            upstream_token: "t".into(),
            owner_id: id,
            viewers: vec![],
        };
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["notebookId"], "A1B2C3D4E5");
        assert_eq!(v["upstreamToken"], "t");
        assert_eq!(serde_json::from_value::<Route>(v).unwrap(), r);
    }

    #[test]
    fn mode_is_lowercase() {
        assert_eq!(
            serde_json::to_string(&AccessMode::View).unwrap(),
            "\"view\""
        );
    }
}
