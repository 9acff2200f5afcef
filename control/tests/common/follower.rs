//! A model edge for the control plane's tests: it follows the routes feed as the real edge
//! does (a snapshot, then change lists applied on top) and answers "who may view", so the
//! tests can hold the feed to its promise: a snapshot plus the changes after it is the same as
//! a fresh snapshot, after every kind of change.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use super::Harness;

/// What a follower knows, comparable with a fresh snapshot's.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct State {
    /// Notebook → its route JSON.
    pub routes: BTreeMap<String, Value>,
    /// Team → members (no empty sets).
    pub teams: BTreeMap<String, BTreeSet<String>>,
    /// Organization → admins (no empty sets).
    pub admins: BTreeMap<String, BTreeSet<String>>,
}

#[derive(Debug, Default)]
pub struct Follower {
    pub version: u64,
    pub state: State,
    /// Answers applied, by kind.
    pub snapshots: usize,
    pub change_lists: usize,
    /// Changes applied in all.
    pub changes: usize,
}

fn set_of(v: &Value) -> BTreeSet<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|m| m.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn s(v: &Value) -> String {
    v.as_str().expect("a string id").to_owned()
}

impl State {
    pub fn of_snapshot(snap: &Value) -> State {
        let mut st = State::default();
        for r in snap["routes"].as_array().expect("routes") {
            st.routes.insert(s(&r["notebookId"]), r.clone());
        }
        for t in snap["teams"].as_array().expect("teams") {
            let m = set_of(&t["members"]);
            if !m.is_empty() {
                st.teams.insert(s(&t["teamId"]), m);
            }
        }
        for a in snap["admins"].as_array().expect("admins") {
            let m = set_of(&a["members"]);
            if !m.is_empty() {
                st.admins.insert(s(&a["orgId"]), m);
            }
        }
        st
    }

    fn set(map: &mut BTreeMap<String, BTreeSet<String>>, key: String, member: String, on: bool) {
        let e = map.entry(key.clone()).or_default();
        if on {
            e.insert(member);
        } else {
            e.remove(&member);
        }
        if e.is_empty() {
            map.remove(&key);
        }
    }

    /// Who may view notebook `nb` besides its owner: its teams' members and its
    /// organization's admins, as the edge decides it.
    pub fn viewers(&self, nb: &str) -> Vec<String> {
        let Some(r) = self.routes.get(nb) else {
            return Vec::new();
        };
        let owner = s(&r["ownerId"]);
        let mut out = BTreeSet::new();
        for t in r["teams"].as_array().into_iter().flatten() {
            if let Some(m) = self.teams.get(&s(t)) {
                out.extend(m.iter().cloned());
            }
        }
        if let Some(org) = r.get("orgId").and_then(|o| o.as_str()) {
            if let Some(a) = self.admins.get(org) {
                out.extend(a.iter().cloned());
            }
        }
        out.remove(&owner);
        out.into_iter().collect()
    }
}

impl Follower {
    /// Applies one feed answer; panics on anything the real edge would refuse.
    pub fn apply(&mut self, feed: &Value) {
        match feed["kind"].as_str() {
            Some("snapshot") => {
                self.state = State::of_snapshot(feed);
                self.snapshots += 1;
            }
            Some("changes") => {
                assert_eq!(
                    feed["from"].as_u64(),
                    Some(self.version),
                    "a change list starts at the version asked after: {feed}"
                );
                let changes = feed["changes"].as_array().expect("changes");
                for c in changes {
                    let st = &mut self.state;
                    match c["op"].as_str() {
                        Some("up") => {
                            let mut r = c.clone();
                            r.as_object_mut().unwrap().remove("op");
                            st.routes.insert(s(&c["notebookId"]), r);
                        }
                        Some("down") => {
                            st.routes.remove(&s(&c["notebookId"]));
                        }
                        Some("teamMember") => State::set(
                            &mut st.teams,
                            s(&c["teamId"]),
                            s(&c["memberId"]),
                            c["present"].as_bool().unwrap(),
                        ),
                        Some("teamGone") => {
                            st.teams.remove(&s(&c["teamId"]));
                        }
                        Some("orgAdmin") => State::set(
                            &mut st.admins,
                            s(&c["orgId"]),
                            s(&c["memberId"]),
                            c["present"].as_bool().unwrap(),
                        ),
                        other => panic!("unknown change {other:?}: {c}"),
                    }
                }
                if !changes.is_empty() {
                    self.change_lists += 1;
                }
                self.changes += changes.len();
            }
            other => panic!("unknown feed answer {other:?}: {feed}"),
        }
        self.version = feed["version"].as_u64().expect("version");
    }

    /// Asks after its version without waiting until nothing is new; returns the answers.
    pub async fn catch_up(&mut self, h: &Harness) -> Vec<Value> {
        let mut seen = Vec::new();
        loop {
            let feed = if self.version == 0 {
                h.routes(None, 0).await
            } else {
                h.routes(Some(self.version), 0).await
            };
            let empty = feed["kind"] == "changes" && feed["changes"] == serde_json::json!([]);
            if !empty {
                self.apply(&feed);
            }
            seen.push(feed);
            if empty {
                return seen;
            }
        }
    }

    /// Catches up, then checks it knows exactly what a fresh snapshot says.
    pub async fn check(&mut self, h: &Harness) {
        self.catch_up(h).await;
        let fresh = State::of_snapshot(&h.routes(None, 0).await);
        assert_eq!(
            self.state, fresh,
            "snapshot + changes must equal a fresh snapshot"
        );
    }
}
