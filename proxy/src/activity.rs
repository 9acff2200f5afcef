//! Phase 5, `activity`: what each person did in a notebook, for the control plane's lifecycle
//! decisions and for presence (who has it open).
//!
//! Only the in-memory counters: the hot path bumps per-(notebook, member) atomics that hang off
//! the route entry (no lock, no allocation once a member is known, no I/O). Reporting them to
//! the control plane is the uplink's job ([`crate::uplink::report`]).
//!
//! The members of one notebook run live in a small copy-on-write list behind an [`ArcSwap`]:
//! readers take a lock-free snapshot and scan it (a notebook is open to a handful of people;
//! the scan beats hashing at that size), and a member seen for the first time in this run is
//! added by copying the list (`rcu`), once per member per run. Entries are never removed while
//! the run's route entry lives, so a socket is never counted on an entry the reporter no longer
//! sees; a new session starts with an empty list.

use std::sync::atomic::{AtomicI64, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use marina_config::wire::AccessMode;
use marina_config::Id;
use prometheus::IntGauge;

/// Unix milliseconds now.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// One notebook run's activity on this replica, per member. Shared (in an `Arc`) by the route
/// entry and the reporter; carried over to the new route entry when a feed change keeps the
/// same notebook session.
#[derive(Debug, Default)]
pub struct Activity {
    members: ArcSwap<Vec<Arc<MemberActivity>>>,
}

/// One member's activity in one notebook run on this replica.
#[derive(Debug)]
pub struct MemberActivity {
    pub member: Id,
    pub mode: AccessMode,
    /// Unix ms of the latest activity not yet reported; 0 = none.
    last_active_ms: AtomicI64,
    /// WebSockets and event streams open through this replica now.
    open_streams: AtomicU32,
    /// Unix ms when `open_streams` last went from 0 to 1.
    open_since_ms: AtomicI64,
}

/// What [`MemberActivity::cut`] takes for one report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cut {
    /// Unreported activity, if any.
    pub last_active_ms: Option<i64>,
    pub open_streams: u32,
    /// Since when a stream has been open without a break (`None` when none is).
    pub open_since_ms: Option<i64>,
}

// === impl Activity ===

impl Activity {
    /// The counters of `member` in this run, added on first sight.
    pub fn member(&self, member: Id, mode: AccessMode) -> Arc<MemberActivity> {
        if let Some(m) = self.find(member) {
            return m;
        }
        self.members.rcu(|list| {
            if list.iter().any(|m| m.member == member) {
                return Arc::clone(list);
            }
            let mut next = Vec::with_capacity(list.len() + 1);
            next.extend(list.iter().cloned());
            next.push(Arc::new(MemberActivity::new(member, mode)));
            Arc::new(next)
        });
        // Present now: it was there or was just added, and entries are never removed.
        self.find(member)
            .unwrap_or_else(|| Arc::new(MemberActivity::new(member, mode)))
    }

    fn find(&self, member: Id) -> Option<Arc<MemberActivity>> {
        self.members
            .load()
            .iter()
            .find(|m| m.member == member)
            .cloned()
    }

    /// Records activity of `member` now (see [`MemberActivity::touch`]). Takes no reference
    /// count for a known member: one lock-free load and a scan.
    pub fn touch(&self, member: Id, mode: AccessMode) {
        let list = self.members.load();
        match list.iter().find(|m| m.member == member) {
            Some(m) => m.touch(),
            None => {
                drop(list);
                self.member(member, mode).touch();
            }
        }
    }

    /// Every member seen in this run, for the reporter.
    pub fn members(&self) -> Arc<Vec<Arc<MemberActivity>>> {
        self.members.load_full()
    }

    /// Open streams over all members.
    pub fn open_streams(&self) -> u32 {
        self.members.load().iter().map(|m| m.open_streams()).sum()
    }
}

// === impl MemberActivity ===

impl MemberActivity {
    fn new(member: Id, mode: AccessMode) -> MemberActivity {
        MemberActivity {
            member,
            mode,
            last_active_ms: AtomicI64::new(0),
            open_streams: AtomicU32::new(0),
            open_since_ms: AtomicI64::new(0),
        }
    }

    /// Records activity now. Skips the store when the stored value is already fresh (within
    /// 50 ms), so a busy notebook does not bounce one cache line between cores per request.
    pub fn touch(&self) {
        let now = now_ms();
        if now - self.last_active_ms.load(Ordering::Relaxed) >= 50 {
            self.last_active_ms.store(now, Ordering::Relaxed);
        }
    }

    /// Counts an open WebSocket or event stream until the guard is dropped.
    pub fn open_stream(self: &Arc<Self>, gauge: &'static IntGauge) -> StreamGuard {
        if self.open_streams.fetch_add(1, Ordering::Relaxed) == 0 {
            self.open_since_ms.store(now_ms(), Ordering::Relaxed);
        }
        gauge.inc();
        StreamGuard {
            activity: self.clone(),
            gauge,
        }
    }

    /// Takes the unreported activity and reads the open streams.
    pub fn cut(&self) -> Cut {
        let last = self.last_active_ms.swap(0, Ordering::Relaxed);
        let open = self.open_streams.load(Ordering::Relaxed);
        let since = self.open_since_ms.load(Ordering::Relaxed);
        Cut {
            last_active_ms: (last != 0).then_some(last),
            open_streams: open,
            open_since_ms: (open > 0 && since != 0).then_some(since),
        }
    }

    pub fn open_streams(&self) -> u32 {
        self.open_streams.load(Ordering::Relaxed)
    }

    pub fn last_active_ms(&self) -> i64 {
        self.last_active_ms.load(Ordering::Relaxed)
    }
}

/// Keeps a stream counted while alive.
#[derive(Debug)]
pub struct StreamGuard {
    activity: Arc<MemberActivity>,
    gauge: &'static IntGauge,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.activity.open_streams.fetch_sub(1, Ordering::Relaxed);
        self.gauge.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gauge() -> &'static IntGauge {
        Box::leak(Box::new(IntGauge::new("g", "g").unwrap()))
    }

    #[test]
    fn members_are_counted_apart() {
        let a = Activity::default();
        let (alice, bob) = (
            Id::parse("ALICE00000").unwrap(),
            Id::parse("BOB0000000").unwrap(),
        );
        a.touch(alice, AccessMode::Edit);
        let g = a.member(bob, AccessMode::View).open_stream(gauge());
        assert_eq!(a.members().len(), 2, "each member once");
        assert!(Arc::ptr_eq(
            &a.member(bob, AccessMode::View),
            &a.member(bob, AccessMode::View)
        ));
        let cuts: Vec<(Id, Cut)> = a.members().iter().map(|m| (m.member, m.cut())).collect();
        assert_eq!(cuts[0].0, alice);
        assert!(cuts[0].1.last_active_ms.is_some());
        assert_eq!(cuts[0].1.open_streams, 0);
        assert_eq!(cuts[0].1.open_since_ms, None);
        assert_eq!(cuts[1].0, bob);
        assert_eq!(
            cuts[1].1.last_active_ms, None,
            "a socket alone is not activity"
        );
        assert_eq!(cuts[1].1.open_streams, 1);
        assert!(cuts[1].1.open_since_ms.is_some());
        assert_eq!(a.open_streams(), 1);
        // Activity is taken once; the open stream stays until its guard goes.
        assert_eq!(a.member(alice, AccessMode::Edit).cut().last_active_ms, None);
        drop(g);
        assert_eq!(a.open_streams(), 0);
        assert_eq!(a.member(bob, AccessMode::View).cut().open_since_ms, None);
    }

    #[test]
    fn concurrent_first_sight_adds_a_member_once() {
        let a = Arc::new(Activity::default());
        let ids: Vec<Id> = (0..8)
            .map(|i| Id::parse(&format!("MEMBER000{i}")).unwrap())
            .collect();
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (a, ids) = (a.clone(), ids.clone());
                std::thread::spawn(move || {
                    for id in &ids {
                        a.touch(*id, AccessMode::View);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(a.members().len(), 8);
    }
}
