//! The routes feed: what the edge knows of every running notebook.

use serde::{Deserialize, Serialize};

use crate::ids::Id;

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
}
