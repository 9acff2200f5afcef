//! Phase 1, `route`: from the request's host and path to a notebook and its route entry.
//!
//! Runs first, on every request. It may only look things up: it parses the notebook id from the
//! host (subdomain mode) or the path (path mode), tells the handshake path apart, and loads the
//! route entry from the table. Errors: no notebook at this address (404), or a notebook the edge
//! has no route for (404 "notebook not running"), both before anything else happens.
//!
//! The table itself is an immutable map behind an [`ArcSwap`]: readers do one atomic load, no
//! lock; a new snapshot replaces the whole map at once. Entries are `Arc`s, so a request keeps
//! the entry it started with even if the table changes under it.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arc_swap::{ArcSwap, Guard};
use http::uri::Authority;
use http::HeaderValue;
use marina_config::addressing::{AddressingMode, PATH_PREFIX};
use marina_config::wire::{AccessMode, Route, RoutesSnapshot};
use marina_config::{Addressing, Id};
use tokio::sync::watch;

use crate::activity::Activity;
use crate::error::{EdgeError, ErrorKind};
use crate::metrics::Metrics;

/// One running notebook, with everything the hot path needs precomputed.
#[derive(Debug)]
pub struct RouteEntry {
    pub route: Route,
    viewers: HashSet<Id>,
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
    /// What `member` may do here now: the owner edits, listed viewers view, others nothing.
    pub fn access(&self, member: Id) -> Option<AccessMode> {
        if member == self.route.owner_id {
            Some(AccessMode::Edit)
        } else if self.viewers.contains(&member) {
            Some(AccessMode::View)
        } else {
            None
        }
    }
}

/// One immutable version of the routing table.
#[derive(Debug, Default)]
pub struct Table {
    pub version: u64,
    pub by_id: HashMap<Id, Arc<RouteEntry>>,
}

/// The routing table shared by every connection.
pub struct RouteTable {
    current: ArcSwap<Table>,
    /// Bumped (to the new version) on every applied snapshot; open WebSockets watch it to
    /// re-check their member's access. Only touched on route changes, never per request.
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

    pub fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }

    pub fn version(&self) -> u64 {
        self.current.load().version
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Replaces the table with `snap`. Activity counters carry over for notebooks whose session
    /// did not change. A route with an unusable upstream or token is an error for the whole
    /// snapshot: serving half a table would be harder to reason about than keeping the old one.
    pub fn apply(&self, snap: RoutesSnapshot) -> Result<(), String> {
        let old = self.current.load();
        let mut by_id = HashMap::with_capacity(snap.routes.len());
        for route in snap.routes {
            let id = route.notebook_id;
            let upstream: Authority = route
                .upstream
                .parse()
                .map_err(|_| format!("notebook {id}: invalid upstream address"))?;
            let mut upstream_auth =
                HeaderValue::try_from(format!("Bearer {}", route.upstream_token))
                    .map_err(|_| format!("notebook {id}: invalid upstream token"))?;
            upstream_auth.set_sensitive(true);
            let activity = old
                .by_id
                .get(&id)
                .filter(|e| e.route.session_id == route.session_id)
                .map(|e| e.activity.clone())
                .unwrap_or_default();
            let entry = RouteEntry {
                viewers: route.viewers.iter().copied().collect(),
                upstream,
                upstream_auth,
                origin: self.addressing.notebook_origin(id),
                activity,
                route,
            };
            by_id.insert(id, Arc::new(entry));
        }
        self.metrics.routes.set(by_id.len() as i64);
        let version = snap.version;
        self.current.store(Arc::new(Table { version, by_id }));
        self.loaded.store(true, Ordering::Release);
        self.changes.send_replace(version);
        Ok(())
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
            }],
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
        };
        assert!(t.apply(bad).is_err());
        assert_eq!(t.version(), 3, "a bad snapshot keeps the old table");
        rx.mark_unchanged();
    }
}
