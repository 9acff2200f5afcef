//! Phase 4, `forward` (WebSocket): the upgrade handshake with the upstream and the frame relay.
//!
//! Memory is the design constraint: a notebook tab keeps its socket open for hours, mostly
//! idle. The relay therefore holds **no buffer while a socket is idle**. Each direction borrows
//! a 16 KiB buffer from a per-thread pool only for the duration of one read attempt: if the read
//! is `Pending` the buffer goes straight back (an `AsyncRead` keeps no reference to it), and if
//! data arrived it is kept only until that data has been written on (back-pressure: nothing
//! more is read until the other side accepted it). An idle proxied socket costs its two sockets
//! and one task.
//!
//! The edge owns the upstream TCP connection and writes the HTTP/1.1 upgrade request itself
//! (no WebSocket library, no extensions negotiated: frames pass through unchanged). Browsers
//! reach it either way: an HTTP/1.1 `Upgrade`, or on HTTP/2 an extended `CONNECT` (RFC 8441)
//! whose stream then carries the same frames; the upstream leg is HTTP/1.1 in both cases. It parses
//! frame *headers* as bytes stream past, never payloads, to
//! - count browser → notebook data messages as activity (not pings/pongs),
//! - enforce `proxy.max_ws_message_bytes` (close 1009),
//! - know frame boundaries, the only places where it may inject its own frames: pings to the
//!   browser, and close frames (1011 when the upstream vanished, 1008 when the member's access
//!   was revoked, 1001 on shutdown or idle timeout).

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Response, StatusCode};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::activity::{Activity, StreamGuard};
use crate::authenticate::{Authenticator, Identity};
use crate::error::{EdgeError, ErrorKind};
use crate::forward::body::EdgeBody;
use crate::metrics::Metrics;
use crate::route::{RouteEntry, RouteTable};

/// Close codes the edge sends (RFC 6455 §7.4.1).
pub mod close {
    pub const GOING_AWAY: u16 = 1001;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const UPSTREAM_GONE: u16 = 1011;
}

const BUF_SIZE: usize = 16 * 1024;
const POOL_MAX: usize = 64;
/// Largest upgrade response head accepted from Marimo.
const MAX_HEAD: usize = 16 * 1024;

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

/// Settings of the relay.
#[derive(Clone, Copy, Debug)]
pub struct WsConfig {
    pub max_message: u64,
    pub ping_every: Duration,
    pub idle_after: Duration,
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
}

/// How a browser asks for a WebSocket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handshake {
    /// HTTP/1.1: `GET` with `Upgrade: websocket`; answered `101`.
    Upgrade,
    /// HTTP/2 (RFC 8441): `CONNECT` with `:protocol = websocket` on one stream of a shared
    /// connection; answered `200`, with no `Sec-WebSocket-Key`/`-Accept` pair.
    ExtendedConnect,
}

/// Is this request a WebSocket handshake, and of which kind?
pub fn handshake_kind<B>(req: &http::Request<B>) -> Option<Handshake> {
    if req.version() == http::Version::HTTP_2 {
        let websocket = req
            .extensions()
            .get::<hyper::ext::Protocol>()
            .is_some_and(|p| p.as_str().eq_ignore_ascii_case("websocket"));
        return (req.method() == http::Method::CONNECT && websocket)
            .then_some(Handshake::ExtendedConnect);
    }
    req.headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
        .then_some(Handshake::Upgrade)
}

/// What the relay task needs to know about its socket.
pub struct RelayCtx {
    pub identity: Identity,
    pub activity: Arc<Activity>,
    pub guard: StreamGuard,
    pub routes: Arc<RouteTable>,
    pub shutdown: watch::Receiver<bool>,
    pub metrics: &'static Metrics,
    pub config: WsConfig,
}

/// Performs the upgrade with the upstream, answers the browser's upgrade, and spawns the relay.
/// `headers` are already rewritten for the upstream (credentials stripped, Marimo token added).
///
/// The upstream is always asked over HTTP/1.1. An HTTP/2 browser (`ExtendedConnect`) sent no
/// `Sec-WebSocket-Key`, so the edge makes one and checks the upstream's answer to it itself.
pub async fn upgrade(
    route: &RouteEntry,
    path_and_query: &str,
    headers: &HeaderMap,
    kind: Handshake,
    on_upgrade: OnUpgrade,
    ctx: RelayCtx,
) -> Result<Response<EdgeBody>, EdgeError> {
    let cfg = ctx.config;
    let addr = route.upstream.as_str();
    let mut up = match tokio::time::timeout(cfg.connect_timeout, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            return Err(
                EdgeError::new(ErrorKind::UpstreamConnect, "websocket connect").with_cause(e),
            )
        }
        Err(_) => {
            return Err(EdgeError::new(
                ErrorKind::UpstreamConnect,
                "websocket connect timeout",
            ))
        }
    };
    let _ = up.set_nodelay(true);

    let mut req = Vec::with_capacity(1024);
    req.extend_from_slice(b"GET ");
    req.extend_from_slice(path_and_query.as_bytes());
    req.extend_from_slice(b" HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n");
    let own_key = (kind == Handshake::ExtendedConnect).then(new_key);
    for (name, value) in headers {
        // Extensions are not negotiated: the relay passes frames through unchanged and
        // compressed payloads would hide message sizes. The key is the edge's own over HTTP/2.
        if name == header::SEC_WEBSOCKET_EXTENSIONS
            || (own_key.is_some() && name == header::SEC_WEBSOCKET_KEY)
        {
            continue;
        }
        req.extend_from_slice(name.as_str().as_bytes());
        req.extend_from_slice(b": ");
        req.extend_from_slice(value.as_bytes());
        req.extend_from_slice(b"\r\n");
    }
    if let Some(key) = &own_key {
        req.extend_from_slice(b"sec-websocket-key: ");
        req.extend_from_slice(key.as_bytes());
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"\r\n");

    let head = async {
        up.write_all(&req).await?;
        // Read the response head. Small and short-lived; the relay's buffers come from the pool.
        let mut buf = Vec::with_capacity(1024);
        loop {
            let mut chunk = [0u8; 1024];
            let n = up.read(&mut chunk).await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "closed before response",
                ));
            }
            buf.extend_from_slice(&chunk[..n]);
            if let Some(end) = find_head_end(&buf) {
                return Ok((buf, end));
            }
            if buf.len() > MAX_HEAD {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "response head too large",
                ));
            }
        }
    };
    let (buf, end) = match tokio::time::timeout(cfg.response_timeout, head).await {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            return Err(
                EdgeError::new(ErrorKind::UpstreamProtocol, "websocket handshake").with_cause(e),
            )
        }
        Err(_) => {
            return Err(EdgeError::new(
                ErrorKind::UpstreamTimeout,
                "websocket handshake",
            ))
        }
    };
    let mut parsed = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut parsed);
    let status = match resp.parse(&buf[..end]) {
        Ok(httparse::Status::Complete(_)) => resp.code.unwrap_or(502),
        _ => {
            return Err(EdgeError::new(
                ErrorKind::UpstreamProtocol,
                "websocket response head",
            ))
        }
    };
    if status != 101 {
        // Marimo refused (e.g. 403 for a missing session id): pass the status on, nothing else.
        let mut r = Response::new(EdgeBody::empty());
        *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
        r.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        return Ok(r);
    }
    let mut out = Response::new(EdgeBody::empty());
    match &own_key {
        None => {
            *out.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            let h = out.headers_mut();
            h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
            h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        }
        Some(key) => {
            // RFC 8441 §5: a 2xx opens the stream. The browser cannot check the upstream's
            // `Sec-WebSocket-Accept` (it never saw a key), so the edge does.
            let accept = resp
                .headers
                .iter()
                .find(|ph| ph.name.eq_ignore_ascii_case("sec-websocket-accept"))
                .map(|ph| ph.value);
            if accept != Some(accept_for(key).as_bytes()) {
                return Err(EdgeError::new(
                    ErrorKind::UpstreamProtocol,
                    "websocket accept",
                ));
            }
            *out.status_mut() = StatusCode::OK;
        }
    }
    let h = out.headers_mut();
    for ph in resp.headers.iter() {
        let keep = (own_key.is_none() && ph.name.eq_ignore_ascii_case("sec-websocket-accept"))
            || ph.name.eq_ignore_ascii_case("sec-websocket-protocol");
        if keep {
            if let (Ok(n), Ok(v)) = (
                header::HeaderName::try_from(ph.name),
                HeaderValue::from_bytes(ph.value),
            ) {
                h.insert(n, v);
            }
        }
    }
    // Frames the upstream sent right after its head (possible: it may push `kernel-ready` at
    // once) must reach the browser first.
    let leftover = Bytes::copy_from_slice(&buf[end..]);
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let end = run(TokioIo::new(upgraded), up, leftover, ctx).await;
                tracing::debug!(?end, "websocket closed");
            }
            Err(e) => tracing::debug!(error = %e, "browser upgrade failed"),
        }
    });
    Ok(out)
}

/// A fresh `Sec-WebSocket-Key`: 16 random bytes, base64 (RFC 6455 §4.1).
fn new_key() -> String {
    base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 16]>())
}

/// The `Sec-WebSocket-Accept` a server must answer to `key` (RFC 6455 §4.2.2).
fn accept_for(key: &str) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    ctx.update(key.as_bytes());
    ctx.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(ctx.finish().as_ref())
}

fn find_head_end(b: &[u8]) -> Option<usize> {
    b.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
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
    activity: Arc<Activity>,
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
    activity: Option<&'a Arc<Activity>>,
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

/// Incremental WebSocket frame-header parser: sees every byte once, copies only headers.
#[derive(Default, Debug)]
struct FrameParser {
    hdr: [u8; 14],
    have: u8,
    /// Payload bytes left in the current frame.
    remaining: u64,
    /// Size of the data message being received (sum of its fragments).
    msg_len: u64,
    saw_close: bool,
}

#[derive(Debug, Default, PartialEq, Eq)]
struct Fed {
    /// Complete data messages seen in this chunk.
    messages: u32,
    /// Offset in the chunk where a frame that breaks the size limit starts.
    violation: Option<usize>,
    /// The violating frame's header began in this chunk (so a close can be injected before it).
    clean: bool,
}

impl FrameParser {
    fn at_boundary(&self) -> bool {
        self.have == 0 && self.remaining == 0
    }

    fn feed(&mut self, data: &[u8], max_message: u64) -> Fed {
        let mut out = Fed::default();
        let mut i = 0;
        while i < data.len() {
            if self.remaining > 0 {
                let take = (self.remaining.min((data.len() - i) as u64)) as usize;
                self.remaining -= take as u64;
                i += take;
                continue;
            }
            // Header bytes.
            let frame_start = i.checked_sub(self.have as usize);
            self.hdr[self.have as usize] = data[i];
            self.have += 1;
            i += 1;
            let need = header_len(&self.hdr[..self.have as usize]);
            if let Some(need) = need {
                if self.have as usize == need {
                    let (fin, opcode, len) = parse_header(&self.hdr[..need]);
                    self.have = 0;
                    self.remaining = len;
                    match opcode {
                        0x1 | 0x2 => self.msg_len = len,
                        0x0 => self.msg_len = self.msg_len.saturating_add(len),
                        0x8 => self.saw_close = true,
                        _ => {}
                    }
                    if matches!(opcode, 0x0..=0x2) {
                        if self.msg_len > max_message {
                            out.violation = Some(frame_start.unwrap_or(0));
                            out.clean = frame_start.is_some();
                            return out;
                        }
                        if fin {
                            out.messages += 1;
                            self.msg_len = 0;
                        }
                    }
                }
            }
        }
        out
    }
}

/// Total header length once enough bytes are known.
fn header_len(h: &[u8]) -> Option<usize> {
    if h.len() < 2 {
        return None;
    }
    let masked = h[1] & 0x80 != 0;
    let ext = match h[1] & 0x7f {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    Some(2 + ext + if masked { 4 } else { 0 })
}

fn parse_header(h: &[u8]) -> (bool, u8, u64) {
    let fin = h[0] & 0x80 != 0;
    let opcode = h[0] & 0x0f;
    let len = match h[1] & 0x7f {
        126 => u16::from_be_bytes([h[2], h[3]]) as u64,
        127 => u64::from_be_bytes([h[2], h[3], h[4], h[5], h[6], h[7], h[8], h[9]]),
        n => n as u64,
    };
    (fin, opcode, len)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(fin: bool, opcode: u8, len: usize, masked: bool) -> Vec<u8> {
        let mut v = vec![(if fin { 0x80 } else { 0 }) | opcode];
        let m = if masked { 0x80 } else { 0 };
        if len < 126 {
            v.push(m | len as u8);
        } else if len < 65536 {
            v.push(m | 126);
            v.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            v.push(m | 127);
            v.extend_from_slice(&(len as u64).to_be_bytes());
        }
        if masked {
            v.extend_from_slice(&[1, 2, 3, 4]);
        }
        v.extend(std::iter::repeat_n(b'x', len));
        v
    }

    #[test]
    fn accept_matches_the_rfc_example() {
        // RFC 6455 §1.3.
        assert_eq!(
            accept_for("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        assert_eq!(new_key().len(), 24);
        assert_ne!(new_key(), new_key());
    }

    #[test]
    fn counts_data_messages_not_control_frames() {
        let mut data = frame(true, 1, 5, true);
        data.extend(frame(true, 9, 0, true)); // ping
        data.extend(frame(false, 2, 200, true));
        data.extend(frame(true, 0, 70_000, true));
        data.extend(frame(true, 10, 3, true)); // pong
        let mut p = FrameParser::default();
        // Feed in awkward chunk sizes so headers split across chunks.
        let mut total = 0;
        for chunk in data.chunks(3) {
            total += p.feed(chunk, 1 << 20).messages;
        }
        assert_eq!(total, 2);
        assert!(p.at_boundary());
    }

    #[test]
    fn finds_the_frame_breaking_the_limit() {
        let mut data = frame(true, 1, 10, false);
        let at = data.len();
        data.extend(frame(false, 1, 600, false));
        data.extend(frame(true, 0, 600, false));
        let mut p = FrameParser::default();
        let fed = p.feed(&data, 1000);
        assert_eq!(fed.messages, 1);
        // The first fragment fits; the continuation makes the message too big.
        assert_eq!(fed.violation, Some(at + 2 + 2 + 600));
        assert!(fed.clean);
    }

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
