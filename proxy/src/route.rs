//! Phase 1, `route`: from the request's host and path to a notebook and its route entry.
//!
//! Runs first, on every request. It may only look things up: it parses the notebook id from the
//! host (subdomain mode) or the path (path mode), tells the handshake path apart, and loads the
//! route entry from the table. Errors: no notebook at this address (404), or a notebook the edge
//! has no route for (404 "notebook not running"), both before anything else happens.
//!
//! The table is an immutable, persistent map (`imbl`) behind an [`ArcSwap`]: readers do one
//! atomic load, no lock. The feed's changes are applied to a copy that shares all but the
//! changed paths with the current map (a change costs O(log n), not a copy of 10,000 entries),
//! and the new version replaces the old one at once. Entries are `Arc`s, so a request keeps the
//! entry it started with even if the table changes under it.
//!
//! Who may view is kept normalized, as the feed sends it ([`marina_config::wire::routes`]): a
//! route names its organization and teams, and the [`Grants`] (team members, organization
//! admins) live beside the routes in their own `ArcSwap`, shared by every entry. A member
//! removed from a team is one change to one small set, and every entry sees it at once.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arc_swap::{ArcSwap, Guard};
use http::uri::Authority;
use http::HeaderValue;
use marina_config::addressing::{AddressingMode, PATH_PREFIX};
use marina_config::wire::{AccessMode, Route, RouteChange, RoutesFeed, RoutesSnapshot};
use marina_config::{Addressing, Id};
use tokio::sync::watch;

use crate::activity::Activity;
use crate::error::{EdgeError, ErrorKind};
use crate::metrics::Metrics;

/// One running notebook, with everything the hot path needs precomputed.
#[derive(Debug)]
pub struct RouteEntry {
    pub route: Route,
    /// `route.viewers` as a set (a static routes file's direct grants; empty from the feed).
    viewers: HashSet<Id>,
    /// Team members and organization admins, shared by every entry of the table.
    grants: Arc<ArcSwap<Grants>>,
    /// `host:port` of the Marimo server, parsed once.
    pub upstream: Authority,
    /// `Bearer <Marimo token>`, marked sensitive so it is never printed.
    pub upstream_auth: HeaderValue,
    /// The notebook's browser origin; WebSocket upgrades must come from it.
    pub origin: String,
    pub activity: Arc<Activity>,
}

// === impl RouteEntry ===

impl RouteEntry {
    /// What `member` may do here now: the owner edits; a listed viewer, a member of one of the
    /// notebook's teams or an admin of its organization views; others nothing.
    pub fn access(&self, member: Id) -> Option<AccessMode> {
        if member == self.route.owner_id {
            return Some(AccessMode::Edit);
        }
        if self.viewers.contains(&member) {
            return Some(AccessMode::View);
        }
        let grants = self.grants.load();
        let admin = self
            .route
            .org_id
            .and_then(|org| grants.admins.get(&org))
            .is_some_and(|set| set.contains(&member));
        let in_team = || {
            self.route
                .teams
                .iter()
                .any(|t| grants.teams.get(t).is_some_and(|set| set.contains(&member)))
        };
        (admin || in_team()).then_some(AccessMode::View)
    }
}

/// Who is in which team, and who administers which organization. The outer maps are
/// persistent (a change copies one path); each set is a plain `HashSet` behind an `Arc`,
/// copied whole when it changes (a team's members, an organization's admins: small).
#[derive(Clone, Debug, Default)]
pub struct Grants {
    teams: imbl::HashMap<Id, Arc<HashSet<Id>>>,
    admins: imbl::HashMap<Id, Arc<HashSet<Id>>>,
}

// === impl Grants ===

impl Grants {
    fn set(map: &mut imbl::HashMap<Id, Arc<HashSet<Id>>>, key: Id, member: Id, present: bool) {
        let had = map.get(&key).is_some_and(|s| s.contains(&member));
        if had == present {
            return;
        }
        let mut set = map.get(&key).map(|s| (**s).clone()).unwrap_or_default();
        if present {
            set.insert(member);
        } else {
            set.remove(&member);
        }
        if set.is_empty() {
            map.remove(&key);
        } else {
            map.insert(key, Arc::new(set));
        }
    }

    /// Team memberships in all (for the memory report and tests).
    pub fn memberships(&self) -> usize {
        self.teams.values().map(|s| s.len()).sum()
    }
}

/// One immutable version of the routing table.
#[derive(Clone, Debug, Default)]
pub struct Table {
    pub version: u64,
    pub by_id: imbl::HashMap<Id, Arc<RouteEntry>>,
}

/// The routing table shared by every connection.
pub struct RouteTable {
    current: ArcSwap<Table>,
    grants: Arc<ArcSwap<Grants>>,
    /// Bumped (to the new version) on every applied snapshot or change list; open WebSockets
    /// watch it to re-check their member's access. Only touched on route changes, never per
    /// request.
    changes: watch::Sender<u64>,
    loaded: AtomicBool,
    addressing: Addressing,
    metrics: &'static Metrics,
}

// === impl RouteTable ===

impl RouteTable {
    pub fn new(metrics: &'static Metrics, addressing: Addressing) -> RouteTable {
        RouteTable {
            current: ArcSwap::from_pointee(Table::default()),
            grants: Arc::new(ArcSwap::from_pointee(Grants::default())),
            changes: watch::channel(0).0,
            loaded: AtomicBool::new(false),
            addressing,
            metrics,
        }
    }

    /// The route of a notebook, if it is running.
    pub fn get(&self, id: Id) -> Option<Arc<RouteEntry>> {
        self.current.load().by_id.get(&id).cloned()
    }

    /// The whole current table (lock-free).
    pub fn load(&self) -> Guard<Arc<Table>> {
        self.current.load()
    }

    /// The current grants (lock-free).
    pub fn grants(&self) -> Guard<Arc<Grants>> {
        self.grants.load()
    }

    pub fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }

    pub fn version(&self) -> u64 {
        self.current.load().version
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Applies one answer of the routes feed: a snapshot replaces everything, a change list
    /// is applied in order on top of the current table. A change list that does not start at
    /// the table's version is refused (the feed answers from the version the edge asked
    /// after, so a mismatch means a confused source; the caller starts over from a snapshot).
    pub fn apply_feed(&self, feed: RoutesFeed) -> Result<usize, String> {
        match feed {
            RoutesFeed::Snapshot(snap) => self.apply(snap).map(|()| 0),
            RoutesFeed::Changes(c) => {
                let old = self.current.load_full();
                if !self.is_loaded() || c.from != old.version {
                    return Err(format!(
                        "changes from version {} do not follow version {}",
                        c.from, old.version
                    ));
                }
                let n = c.changes.len();
                let mut by_id = old.by_id.clone();
                let mut grants = (**self.grants.load()).clone();
                let mut grants_changed = false;
                for change in c.changes {
                    match change {
                        RouteChange::Up(route) => {
                            let id = route.notebook_id;
                            let entry = self.entry(route, old.by_id.get(&id))?;
                            by_id.insert(id, Arc::new(entry));
                        }
                        RouteChange::Down { notebook_id } => {
                            by_id.remove(&notebook_id);
                        }
                        RouteChange::TeamMember {
                            team_id,
                            member_id,
                            present,
                        } => {
                            Grants::set(&mut grants.teams, team_id, member_id, present);
                            grants_changed = true;
                        }
                        RouteChange::TeamGone { team_id } => {
                            grants.teams.remove(&team_id);
                            grants_changed = true;
                        }
                        RouteChange::OrgAdmin {
                            org_id,
                            member_id,
                            present,
                        } => {
                            Grants::set(&mut grants.admins, org_id, member_id, present);
                            grants_changed = true;
                        }
                    }
                }
                // Grants first: a route that arrives with a new team in this list finds its
                // members already in place.
                if grants_changed {
                    self.grants.store(Arc::new(grants));
                }
                self.publish(c.version, by_id);
                Ok(n)
            }
        }
    }

    /// Replaces the table with `snap`. Activity counters carry over for notebooks whose session
    /// did not change. A route with an unusable upstream or token is an error for the whole
    /// snapshot: serving half a table would be harder to reason about than keeping the old one.
    pub fn apply(&self, snap: RoutesSnapshot) -> Result<(), String> {
        let old = self.current.load();
        let mut by_id = imbl::HashMap::new();
        for route in snap.routes {
            let id = route.notebook_id;
            let entry = self.entry(route, old.by_id.get(&id))?;
            by_id.insert(id, Arc::new(entry));
        }
        let mut grants = Grants::default();
        for t in snap.teams {
            if !t.members.is_empty() {
                grants
                    .teams
                    .insert(t.team_id, Arc::new(t.members.into_iter().collect()));
            }
        }
        for a in snap.admins {
            if !a.members.is_empty() {
                grants
                    .admins
                    .insert(a.org_id, Arc::new(a.members.into_iter().collect()));
            }
        }
        self.grants.store(Arc::new(grants));
        self.publish(snap.version, by_id);
        Ok(())
    }

    fn publish(&self, version: u64, by_id: imbl::HashMap<Id, Arc<RouteEntry>>) {
        self.metrics.routes.set(by_id.len() as i64);
        self.current.store(Arc::new(Table { version, by_id }));
        self.loaded.store(true, Ordering::Release);
        self.changes.send_replace(version);
    }

    /// Builds the entry of `route`, keeping `old`'s activity when it is the same session.
    fn entry(&self, route: Route, old: Option<&Arc<RouteEntry>>) -> Result<RouteEntry, String> {
        let id = route.notebook_id;
        let upstream: Authority = route
            .upstream
            .parse()
            .map_err(|_| format!("notebook {id}: invalid upstream address"))?;
        let mut upstream_auth = HeaderValue::try_from(format!("Bearer {}", route.upstream_token))
            .map_err(|_| format!("notebook {id}: invalid upstream token"))?;
        upstream_auth.set_sensitive(true);
        let activity = old
            .filter(|e| e.route.session_id == route.session_id)
            .map(|e| e.activity.clone())
            .unwrap_or_default();
        Ok(RouteEntry {
            viewers: route.viewers.iter().copied().collect(),
            grants: self.grants.clone(),
            upstream,
            upstream_auth,
            origin: self.addressing.notebook_origin(id),
            activity,
            route,
        })
    }
}

/// What the path under the notebook root asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// The handshake path (or anything under it): handled by the edge, never forwarded.
    Handshake,
    /// Path mode, `/notebooks/<ID>` without the slash: the edge redirects to the slash form
    /// itself (Marimo's own redirect would be built from headers the edge does not control).
    AddSlash,
    /// Everything else: forwarded to the notebook.
    Notebook,
}

/// Where [`Target::AddSlash`] sends the browser: the path with its slash, the query kept.
pub fn add_slash_location(uri: &http::Uri) -> String {
    let mut to = format!("{}/", uri.path());
    if let Some(q) = uri.query() {
        to.push('?');
        to.push_str(q);
    }
    to
}

/// Where a request is going.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Located {
    pub notebook: Id,
    pub target: Target,
    /// Length of the notebook's path prefix (`/notebooks/<ID>`), 0 in subdomain mode. The path
    /// after it is what Marimo's route table matches on.
    pub base_len: usize,
}

/// Finds the notebook a request is for from its host and path, without any lookup.
pub fn locate(
    addressing: &Addressing,
    host: Option<&str>,
    path: &str,
) -> Result<Located, EdgeError> {
    let not_found = || EdgeError::new(ErrorKind::NotFound, "route");
    let (notebook, base_len) = match addressing.mode {
        AddressingMode::Path => {
            let rest = path.strip_prefix(PATH_PREFIX).ok_or_else(not_found)?;
            let id = rest
                .get(..marina_config::ids::ID_LEN)
                .and_then(|s| Id::parse(s).ok())
                .ok_or_else(not_found)?;
            (id, PATH_PREFIX.len() + marina_config::ids::ID_LEN)
        }
        AddressingMode::Subdomain => {
            let host = host.ok_or_else(not_found)?;
            let (label, domain) = host.split_once('.').ok_or_else(not_found)?;
            if !domain.eq_ignore_ascii_case(&addressing.authority) {
                return Err(not_found());
            }
            let id = Id::parse_lowercase(label.as_bytes()).map_err(|_| not_found())?;
            (id, 0)
        }
    };
    let rest = &path[base_len..];
    let target = if rest.is_empty() {
        if addressing.mode == AddressingMode::Path {
            Target::AddSlash
        } else {
            Target::Notebook
        }
    } else if !rest.starts_with('/') {
        return Err(not_found());
    } else {
        let hs = addressing.handshake_path.as_str();
        match rest.strip_prefix(hs) {
            Some("") => Target::Handshake,
            Some(more) if more.starts_with('/') => Target::Handshake,
            _ => Target::Notebook,
        }
    };
    Ok(Located {
        notebook,
        target,
        base_len,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn path_addressing() -> Addressing {
        Addressing {
            mode: AddressingMode::Path,
            scheme: "http".into(),
            authority: "127.0.0.1:8000".into(),
            handshake_path: "/_auth".into(),
        }
    }

    fn sub_addressing() -> Addressing {
        Addressing {
            mode: AddressingMode::Subdomain,
            scheme: "https".into(),
            authority: "nb.example.com".into(),
            handshake_path: "/_auth".into(),
        }
    }

    #[test]
    fn path_mode_locates() {
        let a = path_addressing();
        let id = Id::parse("A1B2C3D4E5").unwrap();
        let l = locate(&a, None, "/notebooks/A1B2C3D4E5/api/kernel/run").unwrap();
        assert_eq!(
            (l.notebook, l.target, l.base_len),
            (id, Target::Notebook, 21)
        );
        assert_eq!(
            locate(&a, None, "/notebooks/A1B2C3D4E5").unwrap().target,
            Target::AddSlash
        );
        assert_eq!(
            locate(&a, None, "/notebooks/A1B2C3D4E5/_auth")
                .unwrap()
                .target,
            Target::Handshake
        );
        assert_eq!(
            locate(&a, None, "/notebooks/A1B2C3D4E5/_auth/x")
                .unwrap()
                .target,
            Target::Handshake
        );
        assert_eq!(
            locate(&a, None, "/notebooks/A1B2C3D4E5/_authx")
                .unwrap()
                .target,
            Target::Notebook
        );
        for bad in [
            "/",
            "/notebooks/",
            "/notebooks/a1b2c3d4e5/",
            "/notebooks/A1B2C3D4E5x",
            "/x/A1B2C3D4E5/",
        ] {
            assert_eq!(
                locate(&a, None, bad).unwrap_err().kind,
                ErrorKind::NotFound,
                "{bad}"
            );
        }
    }

    #[test]
    fn subdomain_mode_locates() {
        let a = sub_addressing();
        let id = Id::parse("A1B2C3D4E5").unwrap();
        let l = locate(&a, Some("a1b2c3d4e5.nb.example.com"), "/").unwrap();
        assert_eq!(
            (l.notebook, l.target, l.base_len),
            (id, Target::Notebook, 0)
        );
        let l = locate(&a, Some("A1B2C3D4E5.NB.example.com"), "/_auth").unwrap();
        assert_eq!(l.target, Target::Handshake);
        for host in [
            None,
            Some("nb.example.com"),
            Some("a1b2c3d4e5.other.com"),
            Some("x.a1b2c3d4e5.nb.example.com"),
        ] {
            assert!(locate(&a, host, "/").is_err(), "{host:?}");
        }
    }

    #[test]
    fn table_access_and_swap() {
        let m: &'static Metrics = Box::leak(Box::new(Metrics::new()));
        let t = RouteTable::new(m, path_addressing());
        assert!(!t.is_loaded());
        let nb = Id::parse("A1B2C3D4E5").unwrap();
        let owner = Id::parse("OWNER00000").unwrap();
        let viewer = Id::parse("VIEWER0000").unwrap();
        let mut rx = t.subscribe();
        t.apply(RoutesSnapshot {
            version: 3,
            routes: vec![Route {
                notebook_id: nb,
                session_id: nb,
                upstream: "127.0.0.1:9".into(),
                upstream_token: "tok".into(),
                owner_id: owner,
                viewers: vec![viewer],
                org_id: None,
                teams: vec![],
            }],
            ..Default::default()
        })
        .unwrap();
        assert!(rx.has_changed().unwrap());
        let e = t.get(nb).unwrap();
        assert_eq!(e.access(owner), Some(AccessMode::Edit));
        assert_eq!(e.access(viewer), Some(AccessMode::View));
        assert_eq!(e.access(nb), None);
        assert!(e.upstream_auth.is_sensitive());
        assert_eq!(e.origin, "http://127.0.0.1:8000");
        assert_eq!(t.version(), 3);
        assert_eq!(m.routes.get(), 1);
        let bad = RoutesSnapshot {
            version: 4,
            routes: vec![Route {
                upstream: "not an address/".into(),
                ..e.route.clone()
            }],
            ..Default::default()
        };
        assert!(t.apply(bad).is_err());
        assert_eq!(t.version(), 3, "a bad snapshot keeps the old table");
        rx.mark_unchanged();
    }

    fn feed_route(nb: Id, session: Id, owner: Id, org: Id, teams: Vec<Id>) -> Route {
        Route {
            notebook_id: nb,
            session_id: session,
            upstream: "127.0.0.1:9".into(),
            upstream_token: "tok".into(),
            owner_id: owner,
            viewers: vec![],
            org_id: Some(org),
            teams,
        }
    }

    #[test]
    fn changes_apply_in_order_on_top_of_a_snapshot() {
        use marina_config::wire::{OrgAdmins, RouteChanges, TeamMembers};
        let m: &'static Metrics = Box::leak(Box::new(Metrics::new()));
        let t = RouteTable::new(m, path_addressing());
        let id = |s: &str| Id::parse(s).unwrap();
        let (nb, nb2, s1, s2) = (
            id("NB00000001"),
            id("NB00000002"),
            id("SE00000001"),
            id("SE00000002"),
        );
        let (owner, alice, bob, admin) = (
            id("OWNER00000"),
            id("ALICE00000"),
            id("BOB0000000"),
            id("ADMIN00000"),
        );
        let (org, team) = (id("ORG0000000"), id("TEAM000000"));
        let changes = |from, version, changes| {
            RoutesFeed::Changes(RouteChanges {
                from,
                version,
                changes,
            })
        };
        // Changes before any snapshot are refused: there is nothing to apply them to.
        assert!(t.apply_feed(changes(0, 1, vec![])).is_err());
        t.apply_feed(RoutesFeed::Snapshot(RoutesSnapshot {
            version: 10,
            routes: vec![feed_route(nb, s1, owner, org, vec![team])],
            teams: vec![TeamMembers {
                team_id: team,
                members: vec![alice],
            }],
            admins: vec![OrgAdmins {
                org_id: org,
                members: vec![admin],
            }],
        }))
        .unwrap();
        let e = t.get(nb).unwrap();
        assert_eq!(e.access(owner), Some(AccessMode::Edit));
        assert_eq!(
            e.access(alice),
            Some(AccessMode::View),
            "a team member views"
        );
        assert_eq!(
            e.access(admin),
            Some(AccessMode::View),
            "an org admin views"
        );
        assert_eq!(e.access(bob), None, "anyone else: nothing");
        e.activity.touch(owner, AccessMode::Edit);
        let mut rx = t.subscribe();
        rx.mark_unchanged();
        // A list that does not start at the table's version is refused, the table untouched.
        let down = RouteChange::Down { notebook_id: nb };
        assert!(t.apply_feed(changes(9, 11, vec![down.clone()])).is_err());
        assert!(t.get(nb).is_some() && t.version() == 10);
        // Grants change under an entry a request already holds: it sees them at once.
        let n = t
            .apply_feed(changes(
                10,
                12,
                vec![
                    RouteChange::TeamMember {
                        team_id: team,
                        member_id: alice,
                        present: false,
                    },
                    RouteChange::TeamMember {
                        team_id: team,
                        member_id: bob,
                        present: true,
                    },
                    RouteChange::OrgAdmin {
                        org_id: org,
                        member_id: admin,
                        present: false,
                    },
                    // A second notebook comes up, then the same notebook again (in order: the
                    // last state wins).
                    RouteChange::Up(feed_route(nb2, s1, owner, org, vec![])),
                    RouteChange::Down { notebook_id: nb2 },
                    RouteChange::Up(feed_route(nb2, s2, bob, org, vec![team])),
                ],
            ))
            .unwrap();
        assert_eq!(n, 6);
        assert!(
            rx.has_changed().unwrap(),
            "open sockets are told to re-check"
        );
        assert_eq!(t.version(), 12);
        assert_eq!(e.access(alice), None, "revoked: left the team");
        assert_eq!(e.access(bob), Some(AccessMode::View));
        assert_eq!(e.access(admin), None, "revoked: no longer admin");
        let e2 = t.get(nb2).unwrap();
        assert_eq!((e2.route.session_id, e2.route.owner_id), (s2, bob));
        assert_eq!(m.routes.get(), 2);
        // The same session keeps its unreported activity; a new session starts afresh.
        t.apply_feed(changes(
            12,
            13,
            vec![RouteChange::Up(feed_route(nb, s1, owner, org, vec![]))],
        ))
        .unwrap();
        let kept = t.get(nb).unwrap();
        assert!(Arc::ptr_eq(&kept.activity, &e.activity));
        assert_eq!(
            kept.access(bob),
            None,
            "unshared: the team no longer applies"
        );
        t.apply_feed(changes(
            13,
            14,
            vec![RouteChange::Up(feed_route(nb, s2, owner, org, vec![]))],
        ))
        .unwrap();
        assert!(!Arc::ptr_eq(&t.get(nb).unwrap().activity, &e.activity));
        // A deleted team takes its members' access with it; a stop removes the route.
        t.apply_feed(changes(
            14,
            15,
            vec![RouteChange::TeamGone { team_id: team }, down],
        ))
        .unwrap();
        assert_eq!(
            t.get(nb2).unwrap().access(bob),
            Some(AccessMode::Edit),
            "still the owner"
        );
        assert!(t.get(nb).is_none());
        assert_eq!(t.grants().memberships(), 0);
        // A bad route in a list refuses the whole list.
        let mut bad = feed_route(nb, s1, owner, org, vec![]);
        bad.upstream = "not an address/".into();
        assert!(t
            .apply_feed(changes(15, 16, vec![RouteChange::Up(bad)]))
            .is_err());
        assert_eq!(t.version(), 15);
    }
}
