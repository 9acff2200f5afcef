//! The routes feed: what the edge knows of every running notebook, and who may see it.
//!
//! `GET /internal/v1/routes` answers a [`RoutesSnapshot`] (every up notebook, every team's
//! members, every organization's admins) at its version. With `after=V` it answers only what
//! changed since version `V` ([`RouteChanges`], inside a [`RoutesFeed`]), holding the request
//! (long poll, `waitSeconds`) while nothing did. When `V` cannot be resumed from (the changes
//! were pruned, or `V` is from another database) the answer is a fresh snapshot instead, so an
//! edge never has to know why.
//!
//! Access is sent normalized, as the control plane stores it: a route names its owner, its
//! organization and the teams it is shared with; team memberships and organization admins are
//! separate entries. A member revoked from a team is then one small change whatever the number
//! of notebooks the team sees, and the bytes a change costs do not grow with the number of
//! running notebooks. The edge decides "may this member view" as: the owner edits; a member of
//! one of the route's teams, an admin of its organization, or a member listed in `viewers`
//! views; nobody else gets in.
//!
//! Changes are states, not deltas: `up` carries the whole route as it is now, `teamMember` says
//! whether the pair exists now. Applying a change twice, or one that the snapshot already
//! reflects, is harmless, so a snapshot or change list built from state a little newer than
//! its version is still correct: the next answer repeats what changed since.

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
    /// Members who may view besides the teams and admins: how a static routes file grants
    /// access (the control plane grants through `teams` and its admins, and sends none here).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub viewers: Vec<Id>,
    /// The notebook's organization: its admins may view.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub org_id: Option<Id>,
    /// The teams the notebook is shared with: their members may view.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub teams: Vec<Id>,
}

/// The members of one team.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TeamMembers {
    pub team_id: Id,
    pub members: Vec<Id>,
}

/// The admins of one organization.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrgAdmins {
    pub org_id: Id,
    pub members: Vec<Id>,
}

/// The whole routing table, versioned.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RoutesSnapshot {
    /// Increases with every change; opaque otherwise.
    pub version: u64,
    pub routes: Vec<Route>,
    /// Every team with members (a team absent here has none).
    #[serde(default)]
    pub teams: Vec<TeamMembers>,
    /// Every organization's admins.
    #[serde(default)]
    pub admins: Vec<OrgAdmins>,
}

/// One change, as the state it left behind.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "camelCase")]
pub enum RouteChange {
    /// The notebook is up with this route (new, or replacing the edge's entry).
    Up(Route),
    /// The notebook is not up (stopped, stopping, failed, deleted): drop its route.
    #[serde(rename_all = "camelCase")]
    Down { notebook_id: Id },
    /// Whether `member_id` is in `team_id` now.
    #[serde(rename_all = "camelCase")]
    TeamMember {
        team_id: Id,
        member_id: Id,
        present: bool,
    },
    /// The team is gone, with its memberships.
    #[serde(rename_all = "camelCase")]
    TeamGone { team_id: Id },
    /// Whether `member_id` is an admin of `org_id` now.
    #[serde(rename_all = "camelCase")]
    OrgAdmin {
        org_id: Id,
        member_id: Id,
        present: bool,
    },
}

/// What changed after version `from`, up to and including `version`, in order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteChanges {
    pub from: u64,
    pub version: u64,
    pub changes: Vec<RouteChange>,
}

/// An answer of the routes feed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum RoutesFeed {
    /// Everything, replacing what the edge had.
    Snapshot(RoutesSnapshot),
    /// What changed since the edge's version (which the answer's `from` repeats).
    Changes(RouteChanges),
}

impl RoutesFeed {
    /// The version the edge is at after applying this answer.
    pub fn version(&self) -> u64 {
        match self {
            RoutesFeed::Snapshot(s) => s.version,
            RoutesFeed::Changes(c) => c.version,
        }
    }
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
            org_id: Some(id),
            teams: vec![id],
        };
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["notebookId"], "A1B2C3D4E5");
        assert_eq!(v["upstreamToken"], "t");
        assert_eq!(v["teams"][0], "A1B2C3D4E5");
        assert!(v.get("viewers").is_none(), "empty viewers are not sent");
        assert_eq!(serde_json::from_value::<Route>(v).unwrap(), r);
    }

    #[test]
    fn feed_json_shapes() {
        let id = Id::parse("A1B2C3D4E5").unwrap();
        let feed = RoutesFeed::Changes(RouteChanges {
            from: 3,
            version: 5,
            changes: vec![
                RouteChange::Down { notebook_id: id },
                RouteChange::TeamMember {
                    team_id: id,
                    member_id: id,
                    present: false,
                },
            ],
        });
        let v = serde_json::to_value(&feed).unwrap();
        assert_eq!(v["kind"], "changes");
        assert_eq!(v["changes"][0]["op"], "down");
        assert_eq!(v["changes"][0]["notebookId"], "A1B2C3D4E5");
        assert_eq!(v["changes"][1]["op"], "teamMember");
        assert_eq!(v["changes"][1]["present"], false);
        assert_eq!(serde_json::from_value::<RoutesFeed>(v).unwrap(), feed);
        // A static routes file is a bare snapshot with direct viewers and no kind.
        let file = r#"{"version":1,"routes":[{"notebookId":"A1B2C3D4E5","sessionId":"A1B2C3D4E5",
            "upstream":"127.0.0.1:1","upstreamToken":"t","ownerId":"A1B2C3D4E5","viewers":[]}]}"#;
        let snap: RoutesSnapshot = serde_json::from_str(file).unwrap();
        assert!(snap.routes[0].teams.is_empty() && snap.teams.is_empty());
        let up = serde_json::to_value(RouteChange::Up(snap.routes[0].clone())).unwrap();
        assert_eq!(up["op"], "up");
        assert_eq!(up["upstream"], "127.0.0.1:1");
    }
}
