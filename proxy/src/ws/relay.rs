//! The frame relay: both directions of one proxied socket, with no buffer held while idle,
//! and the edge's own frames (pings, close frames) injected at frame boundaries.

use std::cell::RefCell;
use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use tokio::sync::watch;

use crate::activity::{MemberActivity, StreamGuard};
use crate::authenticate::{Authenticator, Identity};
use crate::metrics::Metrics;
use crate::route::RouteTable;

use super::frame::FrameParser;

/// Close codes the edge sends (RFC 6455 §7.4.1).
pub mod close {
    pub const GOING_AWAY: u16 = 1001;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const UPSTREAM_GONE: u16 = 1011;
}

/// Settings of the relay.
#[derive(Clone, Copy, Debug)]
pub struct WsConfig {
    pub max_message: u64,
    pub ping_every: Duration,
    pub idle_after: Duration,
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
}

/// What the relay task needs to know about its socket.
pub struct RelayCtx {
    pub identity: Identity,
    pub activity: Arc<MemberActivity>,
    pub guard: StreamGuard,
    pub routes: Arc<RouteTable>,
    pub shutdown: watch::Receiver<bool>,
    pub metrics: &'static Metrics,
    pub config: WsConfig,
}

const BUF_SIZE: usize = 16 * 1024;
const POOL_MAX: usize = 64;
thread_local! {
    /// Buffers for data in flight. Per thread, so taking one never contends with another
    /// connection; a buffer may come back on another thread, which is fine.
    static POOL: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

fn take_buf() -> Box<[u8]> {
    POOL.with(|p| p.borrow_mut().pop())
        .unwrap_or_else(|| vec![0u8; BUF_SIZE].into_boxed_slice())
}

fn give_buf(b: Box<[u8]>) {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        if p.len() < POOL_MAX {
            p.push(b);
        }
    })
}

/// Why a relay ended (for logs and tests).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// Both sides closed.
    Closed,
    /// A read or write failed.
    Error,
    /// The edge closed it (revocation, shutdown, idle, message too big) and the deadline passed.
    ClosedByEdge,
}

/// Relays between the browser and the upstream until both are closed.
pub async fn run<B, U>(browser: B, upstream: U, leftover: Bytes, mut ctx: RelayCtx) -> End
where
    B: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let cfg = ctx.config;
    let mut relay = Relay {
        browser,
        upstream,
        up: Pipe::new(true),
        down: Pipe::new(false),
        max_message: cfg.max_message,
        last_browser_rx: Instant::now(),
        activity: ctx.activity.clone(),
        metrics: ctx.metrics,
    };
    if !leftover.is_empty() {
        relay.down.preload(&leftover);
    }
    let mut routes_rx = ctx.routes.subscribe();
    routes_rx.mark_unchanged();
    // One timer per socket, re-armed to the next instant that matters (ping, idle limit,
    // close deadline, linger): an idle socket wakes once per ping interval, not every second.
    let mut last_ping = Instant::now();
    let mut deadline: Option<Instant> = None;
    let mut linger: Option<Instant> = None;
    let timer = tokio::time::sleep(cfg.ping_every);
    tokio::pin!(timer);
    let end = loop {
        tokio::select! {
            r = poll_fn(|cx| match relay.poll(cx) {
                Poll::Ready(end) => Poll::Ready(Some(end)),
                // One direction just finished: give the other a few seconds (re-arm the timer).
                Poll::Pending if linger.is_none() && relay.half_closed() => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            }) => match r {
                Some(end) => break end,
                None => linger = Some(Instant::now() + Duration::from_secs(5)),
            },
            changed = routes_rx.changed(), if deadline.is_none() => {
                if changed.is_err() {
                    continue;
                }
                let route = ctx.routes.get(ctx.identity.notebook);
                if !Authenticator::still_valid(&ctx.identity, route.as_deref()) {
                    // Access revoked (or the notebook stopped / restarted): the member's cookie no
                    // longer works, so neither does this socket.
                    let code = match route {
                        Some(r) if r.route.session_id == ctx.identity.session => close::POLICY,
                        _ => close::GOING_AWAY,
                    };
                    relay.close(code, "access ended");
                    deadline = Some(Instant::now() + Duration::from_secs(2));
                }
            }
            _ = ctx.shutdown.changed(), if deadline.is_none() => {
                relay.close(close::GOING_AWAY, "edge shutting down");
                deadline = Some(Instant::now() + Duration::from_secs(1));
            }
            _ = &mut timer => {
                let now = Instant::now();
                if deadline.is_some_and(|d| now >= d) {
                    break End::ClosedByEdge;
                }
                if linger.is_some_and(|l| now >= l) {
                    break End::Closed;
                }
                if deadline.is_none() {
                    let silent = now.duration_since(relay.last_browser_rx);
                    if silent >= cfg.idle_after {
                        relay.close(close::GOING_AWAY, "idle");
                        deadline = Some(now + Duration::from_secs(1));
                    } else if silent >= cfg.ping_every
                        && now.duration_since(last_ping) >= cfg.ping_every
                    {
                        relay.down.inject = Some(Control::ping());
                        last_ping = now;
                    }
                }
            }
        }
        // Re-arm: the earliest of the close deadline, the linger end, the next ping and the
        // idle limit (both measured from the browser's latest bytes).
        let next = match (deadline, linger) {
            (Some(d), _) => d,
            (None, Some(l)) => l,
            (None, None) => {
                let quiet_since = relay.last_browser_rx;
                let next_ping = quiet_since.max(last_ping) + cfg.ping_every;
                next_ping.min(quiet_since + cfg.idle_after)
            }
        };
        timer
            .as_mut()
            .reset(tokio::time::Instant::from_std(next.max(Instant::now())));
    };
    drop(ctx.guard);
    end
}

/// Both directions of one proxied socket.
struct Relay<B, U> {
    browser: B,
    upstream: U,
    /// Browser → upstream (masked client frames).
    up: Pipe,
    /// Upstream → browser.
    down: Pipe,
    max_message: u64,
    last_browser_rx: Instant,
    activity: Arc<MemberActivity>,
    metrics: &'static Metrics,
}

impl<B, U> Relay<B, U>
where
    B: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<End> {
        let up = self.up.poll(
            cx,
            &mut self.browser,
            &mut self.upstream,
            self.max_message,
            &mut Hooks {
                last_rx: Some(&mut self.last_browser_rx),
                activity: Some(&self.activity),
                bytes: &self.metrics.bytes_to_upstream,
                peer_close: &mut self.down,
            },
        );
        let down = self.down_poll(cx);
        match (up, down) {
            (Poll::Ready(PipeEnd::Error), _) | (_, Poll::Ready(PipeEnd::Error)) => {
                Poll::Ready(End::Error)
            }
            (Poll::Ready(PipeEnd::Done), Poll::Ready(PipeEnd::Done)) => Poll::Ready(End::Closed),
            // One direction is finished and the other side has sent its close frame: the
            // close handshake is complete, the server side (us) closes the TCP connection
            // (RFC 6455 §7.1.1) instead of waiting for the peer to do it.
            (_, Poll::Ready(PipeEnd::Done)) if self.up.parser.saw_close => Poll::Ready(End::Closed),
            (Poll::Ready(PipeEnd::Done), _) if self.down.parser.saw_close => {
                Poll::Ready(End::Closed)
            }
            _ => Poll::Pending,
        }
    }

    fn down_poll(&mut self, cx: &mut Context<'_>) -> Poll<PipeEnd> {
        self.down.poll(
            cx,
            &mut self.upstream,
            &mut self.browser,
            self.max_message,
            &mut Hooks {
                last_rx: None,
                activity: None,
                bytes: &self.metrics.bytes_to_client,
                peer_close: &mut self.up,
            },
        )
    }

    /// Closes both sides with `code` at the next frame boundaries.
    fn close(&mut self, code: u16, reason: &str) {
        self.down.inject = Some(Control::close(code, reason, false));
        self.down.stop_after_inject = true;
        self.up.inject = Some(Control::close(close::GOING_AWAY, "", true));
        self.up.stop_after_inject = true;
    }

    /// One direction is done (the other then gets a few seconds to finish).
    fn half_closed(&self) -> bool {
        self.up.finished.is_some() || self.down.finished.is_some()
    }
}

/// A small frame the edge writes itself.
#[derive(Clone, Debug)]
struct Control {
    bytes: [u8; 40],
    len: u8,
}

impl Control {
    fn ping() -> Control {
        let mut bytes = [0u8; 40];
        bytes[0] = 0x89;
        Control { bytes, len: 2 }
    }

    /// A close frame; `masked` for frames towards the upstream (clients must mask).
    fn close(code: u16, reason: &str, masked: bool) -> Control {
        let reason = &reason.as_bytes()[..reason.len().min(30)];
        let mut payload = [0u8; 32];
        payload[..2].copy_from_slice(&code.to_be_bytes());
        payload[2..2 + reason.len()].copy_from_slice(reason);
        let plen = 2 + reason.len();
        let mut bytes = [0u8; 40];
        bytes[0] = 0x88;
        let mut at = 2;
        if masked {
            bytes[1] = 0x80 | plen as u8;
            let mask: [u8; 4] = rand::random();
            bytes[2..6].copy_from_slice(&mask);
            at = 6;
            for i in 0..plen {
                bytes[at + i] = payload[i] ^ mask[i % 4];
            }
        } else {
            bytes[1] = plen as u8;
            bytes[at..at + plen].copy_from_slice(&payload[..plen]);
        }
        Control {
            bytes,
            len: (at + plen) as u8,
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum PipeEnd {
    Done,
    Error,
}

struct Hooks<'a> {
    last_rx: Option<&'a mut Instant>,
    activity: Option<&'a Arc<MemberActivity>>,
    bytes: &'a prometheus::IntCounter,
    /// The opposite pipe, to ask it to carry a close frame.
    peer_close: &'a mut Pipe,
}

/// One direction of the relay.
struct Pipe {
    /// Frames from the browser (masked) or from the upstream.
    from_client: bool,
    /// Data in flight: borrowed from the pool only while non-empty.
    buf: Option<Box<[u8]>>,
    pos: usize,
    end: usize,
    /// Bytes of `buf[..end]` after which the pipe must stop (a violating frame starts there).
    cut: Option<usize>,
    parser: FrameParser,
    inject: Option<Control>,
    stop_after_inject: bool,
    need_flush: bool,
    eof: bool,
    finished: Option<PipeEnd>,
}

impl Pipe {
    fn new(from_client: bool) -> Pipe {
        Pipe {
            from_client,
            buf: None,
            pos: 0,
            end: 0,
            cut: None,
            parser: FrameParser::default(),
            inject: None,
            stop_after_inject: false,
            need_flush: false,
            eof: false,
            finished: None,
        }
    }

    /// Queues bytes that arrived with the upgrade response.
    fn preload(&mut self, data: &[u8]) {
        let mut b = take_buf();
        let n = data.len().min(b.len());
        b[..n].copy_from_slice(&data[..n]);
        let _ = self.parser.feed(&b[..n], u64::MAX);
        self.buf = Some(b);
        self.pos = 0;
        self.end = n;
    }

    fn release(&mut self) {
        if let Some(b) = self.buf.take() {
            give_buf(b);
        }
        self.pos = 0;
        self.end = 0;
    }

    fn poll<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
        w: &mut W,
        max_message: u64,
        hooks: &mut Hooks<'_>,
    ) -> Poll<PipeEnd>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        if let Some(f) = self.finished {
            return Poll::Ready(f);
        }
        loop {
            // 1. Write what is in flight (back-pressure: no reading until it is written).
            if self.buf.is_some() {
                let limit = self.cut.unwrap_or(self.end);
                while self.pos < limit {
                    let b = self
                        .buf
                        .as_ref()
                        .map(|b| &b[self.pos..limit])
                        .unwrap_or(&[]);
                    match ready!(Pin::new(&mut *w).poll_write(cx, b)) {
                        Ok(0) | Err(_) => return self.finish(PipeEnd::Error),
                        Ok(n) => {
                            self.pos += n;
                            hooks.bytes.inc_by(n as u64);
                            self.need_flush = true;
                        }
                    }
                }
                self.release();
                if self.cut.take().is_some() {
                    // The next frame breaks the size limit: close both ways.
                    self.inject = Some(Control::close(
                        close::TOO_BIG,
                        "message too big",
                        self.from_client,
                    ));
                    self.stop_after_inject = true;
                    hooks.peer_close.inject = Some(Control::close(
                        close::TOO_BIG,
                        "message too big",
                        !self.from_client,
                    ));
                    hooks.peer_close.stop_after_inject = true;
                    // The other pipe may already have been polled in this round.
                    cx.waker().wake_by_ref();
                    self.parser = FrameParser::default();
                }
            }
            // 2. Our own frame, only between frames.
            if self.inject.is_some() && self.parser.at_boundary() {
                if let Some(c) = self.inject.take() {
                    let mut b = take_buf();
                    let n = c.len as usize;
                    b[..n].copy_from_slice(&c.bytes[..n]);
                    self.buf = Some(b);
                    self.pos = 0;
                    self.end = n;
                    if self.stop_after_inject {
                        self.eof = true;
                    }
                    continue;
                }
            }
            if self.need_flush {
                if ready!(Pin::new(&mut *w).poll_flush(cx)).is_err() {
                    return self.finish(PipeEnd::Error);
                }
                self.need_flush = false;
            }
            // 3. End of this direction: pass the close on to the writer.
            if self.eof {
                if self.stop_after_inject && self.inject.is_some() {
                    // Mid-frame: the injected frame cannot be sent; just close.
                    self.inject = None;
                }
                let _ = ready!(Pin::new(&mut *w).poll_shutdown(cx));
                return self.finish(PipeEnd::Done);
            }
            // 4. Read, with a pooled buffer held only for this attempt.
            let mut b = take_buf();
            let got = {
                let mut rb = ReadBuf::new(&mut b);
                match Pin::new(&mut *r).poll_read(cx, &mut rb) {
                    Poll::Pending => None,
                    Poll::Ready(Ok(())) => Some(rb.filled().len()),
                    // A reset is an end like any other; the other side is told below.
                    Poll::Ready(Err(_)) => Some(0),
                }
            };
            let n = match got {
                None => {
                    give_buf(b);
                    return Poll::Pending;
                }
                Some(n) => n,
            };
            if n == 0 {
                give_buf(b);
                self.eof = true;
                // The peer vanished without a close frame: tell the other side properly.
                if !self.parser.saw_close && self.inject.is_none() {
                    self.inject = Some(if self.from_client {
                        Control::close(close::GOING_AWAY, "", true)
                    } else {
                        Control::close(close::UPSTREAM_GONE, "notebook went away", false)
                    });
                }
                self.stop_after_inject = true;
                if self.inject.is_some() && self.parser.at_boundary() {
                    // Step 2 writes it, then step 3 shuts down.
                    self.eof = false;
                }
                continue;
            }
            if let Some(t) = hooks.last_rx.as_deref_mut() {
                *t = Instant::now();
            }
            let fed = self.parser.feed(&b[..n], max_message);
            if let (Some(a), true) = (hooks.activity, fed.messages > 0) {
                a.touch();
            }
            if fed.violation.is_some() && !fed.clean {
                // Part of the offending frame's header is already out: no clean way to close.
                give_buf(b);
                return self.finish(PipeEnd::Error);
            }
            self.cut = fed.violation;
            self.buf = Some(b);
            self.pos = 0;
            self.end = n;
        }
    }

    fn finish(&mut self, end: PipeEnd) -> Poll<PipeEnd> {
        self.release();
        self.finished = Some(end);
        Poll::Ready(end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_frames_are_well_formed() {
        let c = Control::close(1008, "access ended", false);
        assert_eq!(&c.bytes[..4], &[0x88, 14, 0x03, 0xf0]);
        let m = Control::close(1001, "", true);
        assert_eq!(m.bytes[1], 0x80 | 2);
        let mask = &m.bytes[2..6];
        assert_eq!(
            [m.bytes[6] ^ mask[0], m.bytes[7] ^ mask[1]],
            1001u16.to_be_bytes()
        );
        let mut p = FrameParser::default();
        p.feed(&c.bytes[..c.len as usize], 10);
        assert!(p.saw_close && p.at_boundary());
    }
}
