//! Signals that long-lived connections watch without taking a lock on every poll: "the edge is
//! draining" (every HTTP connection and WebSocket) and "the route table changed" (every
//! WebSocket, to re-check its member's access).
//!
//! Why not `tokio::sync::watch`: a pending `Receiver::changed()` locks the channel's list of
//! waiters each time it is polled, to refresh its waker. A connection's future is polled on
//! every request and every WebSocket message, and thousands of connections watch the same
//! channel, so that is a lock shared across connections on the hot path — which the edge does
//! not take (ARCHITECTURE.md). Here a [`Subscriber`] hands its task's waker to the signal once;
//! after that a poll is an atomic load and a pointer comparison. The lock (tokio's `Notify`) is
//! taken again only when the signal fires, or when the subscriber is polled from another task.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use tokio::sync::futures::OwnedNotified;
use tokio::sync::Notify;

/// A signal raised by one owner and watched by many [`Subscriber`]s.
#[derive(Default)]
pub struct Signal {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Bumped by every `raise`; subscribers compare it with the value they last saw.
    generation: AtomicU64,
    raised: Arc<Notify>,
    /// Live subscribers, and a wake-up for `all_gone` when the last one goes.
    subscribers: AtomicUsize,
    gone: Notify,
}

impl Signal {
    pub fn new() -> Signal {
        Signal::default()
    }

    /// A subscriber that fires on the next `raise` (not on earlier ones).
    pub fn subscribe(&self) -> Subscriber {
        self.inner.subscribers.fetch_add(1, Ordering::AcqRel);
        let mut s = Subscriber {
            inner: self.inner.clone(),
            seen: 0,
            notified: Box::pin(self.inner.raised.clone().notified_owned()),
            waker: None,
        };
        s.rearm();
        s
    }

    /// Fires every subscriber.
    pub fn raise(&self) {
        self.inner.generation.fetch_add(1, Ordering::AcqRel);
        self.inner.raised.notify_waiters();
    }

    /// Resolves once no subscriber is left (dropped), e.g. the last WebSocket after a drain.
    pub async fn all_gone(&self) {
        loop {
            let gone = self.inner.gone.notified();
            tokio::pin!(gone);
            // Registered before the check: a subscriber dropped in between still wakes us.
            gone.as_mut().enable();
            if self.inner.subscribers.load(Ordering::Acquire) == 0 {
                return;
            }
            gone.await;
        }
    }
}

/// One watcher of a [`Signal`], owned by one connection.
pub struct Subscriber {
    inner: Arc<Inner>,
    /// The generation this subscriber has already reported.
    seen: u64,
    /// Registered in the signal's waiter list (enabled) before `seen` was read, so a `raise`
    /// after that read always reaches it.
    notified: Pin<Box<OwnedNotified>>,
    /// The waker `notified` holds; while the caller's waker is the same, nothing to refresh.
    waker: Option<Waker>,
}

impl Subscriber {
    /// `Ready` once per `raise` that happened since the last `Ready` (several coalesce).
    pub fn poll_changed(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            if self.inner.generation.load(Ordering::Acquire) != self.seen {
                self.rearm();
                return Poll::Ready(());
            }
            if self.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                // The hot path: our task is already registered.
                return Poll::Pending;
            }
            // First poll, or a different task: hand over this waker (takes the Notify's lock).
            if self.notified.as_mut().poll(cx).is_ready() {
                // Raised between the generation check and now: re-check it.
                self.rearm();
                continue;
            }
            self.waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
    }

    pub async fn changed(&mut self) {
        poll_fn(|cx| self.poll_changed(cx)).await
    }

    /// A fresh registration, then the generation it covers.
    fn rearm(&mut self) {
        self.notified = Box::pin(self.inner.raised.clone().notified_owned());
        self.notified.as_mut().enable();
        self.waker = None;
        self.seen = self.inner.generation.load(Ordering::Acquire);
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        if self.inner.subscribers.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.inner.gone.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn fires_once_per_raise_and_only_for_later_raises() {
        let s = Signal::new();
        s.raise(); // before subscribing: not seen
        let mut sub = s.subscribe();
        let pending = tokio::time::timeout(Duration::from_millis(50), sub.changed()).await;
        assert!(pending.is_err(), "no raise since subscribing");
        s.raise();
        s.raise(); // coalesced with the previous one
        tokio::time::timeout(Duration::from_secs(1), sub.changed())
            .await
            .expect("raised");
        let pending = tokio::time::timeout(Duration::from_millis(50), sub.changed()).await;
        assert!(pending.is_err(), "both raises reported at once");
    }

    #[tokio::test]
    async fn a_waiting_task_is_woken_from_another_task() {
        let s = Arc::new(Signal::new());
        let mut sub = s.subscribe();
        let waiter = tokio::spawn(async move {
            // Polled (and registered) before the raise, then woken by it.
            sub.changed().await;
            sub
        });
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        s.raise();
        let sub = tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("woken")
            .unwrap();
        drop(sub);
        tokio::time::timeout(Duration::from_secs(1), s.all_gone())
            .await
            .expect("no subscriber left");
    }

    #[tokio::test]
    async fn all_gone_waits_for_the_last_subscriber() {
        let s = Arc::new(Signal::new());
        let a = s.subscribe();
        let b = s.subscribe();
        let s2 = s.clone();
        let done = tokio::spawn(async move { s2.all_gone().await });
        drop(a);
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(!done.is_finished(), "one subscriber is still alive");
        drop(b);
        tokio::time::timeout(Duration::from_secs(1), done)
            .await
            .expect("finished")
            .unwrap();
    }

    /// A waker that records being woken.
    struct Woken(std::sync::atomic::AtomicBool);

    impl std::task::Wake for Woken {
        fn wake(self: Arc<Self>) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    fn woken() -> (Arc<Woken>, Waker) {
        let w = Arc::new(Woken(Default::default()));
        (w.clone(), Waker::from(w))
    }

    #[test]
    fn the_registered_task_is_woken_however_often_it_polled() {
        let s = Signal::new();
        let mut sub = s.subscribe();
        let (a, waker_a) = woken();
        let mut cx = Context::from_waker(&waker_a);
        // The fast path (same waker, nothing raised) must keep the registration.
        for _ in 0..1000 {
            assert!(sub.poll_changed(&mut cx).is_pending());
        }
        assert!(!a.0.load(Ordering::SeqCst));
        s.raise();
        assert!(a.0.load(Ordering::SeqCst), "woken by the raise");
        assert!(sub.poll_changed(&mut cx).is_ready());
        // Polled from another task: that task is the one woken next.
        let (b, waker_b) = woken();
        a.0.store(false, Ordering::SeqCst);
        assert!(sub.poll_changed(&mut cx).is_pending());
        assert!(sub
            .poll_changed(&mut Context::from_waker(&waker_b))
            .is_pending());
        s.raise();
        assert!(b.0.load(Ordering::SeqCst), "the new task is woken");
        assert!(sub
            .poll_changed(&mut Context::from_waker(&waker_b))
            .is_ready());
    }
}
