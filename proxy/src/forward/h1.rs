//! The upstream HTTP/1.1 connection of ONE browser connection, driven inside that browser
//! connection's own task.
//!
//! Why not hyper's client here: hyper's `client::conn` runs each upstream connection as a task
//! of its own and hands it every request over a channel and every response (and body chunk)
//! back, so one proxied request costs several extra task wake-ups, and the request headers are
//! rebuilt in a `HeaderMap` only to be encoded again. On the edge's hot path that was most of
//! its user-space time (BENCHMARKS.md). Here the browser connection's task writes the request
//! head straight from the browser's headers into a reused buffer (dropping and adding headers
//! as it goes), reads the response head with `httparse`, and its body reads the upstream socket
//! directly when hyper's server polls it. The parsing is httparse's; this module only frames
//! (RFC 9112 §6.3): `Content-Length`, `chunked` ([`super::chunked`]) or until close, and no
//! body for `HEAD`, 1xx, 204 and 304.
//!
//! Invariants:
//! - A connection goes back to its browser connection's slot only when the whole response was
//!   read, nothing more is buffered, and neither side asked to close. Anything unexpected
//!   (leftover bytes, bad framing, a body dropped half-way) closes it, so one response can
//!   never spill into the next.
//! - The slot is keyed by notebook, run (session) and address, so a connection never serves
//!   another notebook, or a restarted one that got the same port.
//! - A request is sent again (once, on a fresh connection) only when it is idempotent, has no
//!   body, and the reused connection failed before any byte of an answer: the upstream closed it
//!   while idle. A stale idle connection is usually seen before the request is written: the
//!   upstream's FIN makes it readable.

use std::io::{self, Write as _};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming, SizeHint};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::chunked::{self, Step};
use super::headers::{self as rules, ConnectionTokens, ForwardInfo};
use crate::error::{EdgeError, ErrorKind};
use crate::route::RouteEntry;

/// Most header lines accepted in an upstream response head (Marimo sends about ten).
const MAX_HEADERS: usize = 64;
/// Largest upstream response head accepted.
const MAX_HEAD: usize = 60 * 1024;
/// Read size while waiting for a response head (and the smallest body read).
const READ_HEAD: usize = 8 * 1024;
/// Largest single body read.
const READ_BODY: usize = 64 * 1024;

/// The upstream connection slot of one browser connection (HTTP/1.1): an HTTP/1.1 browser
/// connection sends its next request only after the previous response was written, so one slot
/// is enough and the hot path shares no pool (and no lock) across connections. The mutex is
/// per browser connection, uncontended, and never held across an `.await`.
#[derive(Default)]
pub struct Affinity {
    /// Boxed, like everywhere a connection travels: it moves from the slot to the response body
    /// and back on every request, and a pointer moves cheaply (the response types stay small).
    slot: Mutex<Option<Box<Conn>>>,
}

impl Affinity {
    fn take(&self, key: &Key) -> Option<Box<Conn>> {
        let mut slot = self.slot.lock().ok()?;
        match slot.take() {
            Some(c) if c.key == *key => Some(c),
            _ => None,
        }
    }

    fn put(&self, conn: Box<Conn>) {
        if let Ok(mut slot) = self.slot.lock() {
            *slot = Some(conn);
        }
    }
}

#[derive(Clone, PartialEq, Eq)]
struct Key {
    notebook: marina_config::Id,
    session: marina_config::Id,
    upstream: http::uri::Authority,
}

impl Key {
    fn of(route: &RouteEntry) -> Key {
        Key {
            notebook: route.route.notebook_id,
            session: route.route.session_id,
            upstream: route.upstream.clone(),
        }
    }
}

/// One upstream connection with its buffers (both reused from request to request).
pub struct Conn {
    io: TcpStream,
    /// Bytes read from the upstream and not yet consumed.
    buf: BytesMut,
    /// The request being written.
    out: Vec<u8>,
    key: Key,
}

impl Conn {
    async fn connect(
        route: &RouteEntry,
        key: Key,
        timeout: Duration,
    ) -> Result<Box<Conn>, EdgeError> {
        let io = match tokio::time::timeout(timeout, TcpStream::connect(route.upstream.as_str()))
            .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                return Err(EdgeError::new(ErrorKind::UpstreamConnect, "connect").with_cause(e))
            }
            Err(_) => {
                return Err(EdgeError::new(
                    ErrorKind::UpstreamConnect,
                    "connect timeout",
                ))
            }
        };
        let _ = io.set_nodelay(true);
        Ok(Box::new(Conn {
            io,
            buf: BytesMut::with_capacity(READ_HEAD),
            out: Vec::with_capacity(1024),
            key,
        }))
    }

    /// Is this idle connection still open? The upstream closing it makes it readable (EOF);
    /// while it is not readable Tokio answers from its cached readiness, without a system call.
    fn is_open(&self) -> bool {
        let mut probe = [0u8; 1];
        self.buf.is_empty()
            && matches!(self.io.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    /// Writes the encoded head in `out` and the body after it (the head and the first piece of
    /// body in one write).
    async fn write_request(&mut self, body: Incoming, framing: RequestFraming) -> io::Result<()> {
        if framing == RequestFraming::None {
            return self.io.write_all(&self.out).await;
        }
        let chunked = framing == RequestFraming::Chunked;
        let mut body = body;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(io::Error::other)?;
            let Ok(data) = frame.into_data() else {
                continue; // trailers are not forwarded
            };
            if data.is_empty() {
                continue;
            }
            if chunked {
                let _ = write!(self.out, "{:x}\r\n", data.len());
            }
            self.out.extend_from_slice(&data);
            if chunked {
                self.out.extend_from_slice(b"\r\n");
            }
            self.io.write_all(&self.out).await?;
            self.out.clear();
        }
        if chunked {
            self.out.extend_from_slice(b"0\r\n\r\n");
        }
        if !self.out.is_empty() {
            self.io.write_all(&self.out).await?;
        }
        Ok(())
    }

    /// Reads until a whole (final, non-1xx) response head is buffered. `upgrade`: a `101` is
    /// final too (the WebSocket handshake).
    async fn read_head(&mut self, head_request: bool, upgrade: bool) -> Result<Head, Failure> {
        loop {
            if let Some(h) =
                parse_head(&mut self.buf, head_request, upgrade).map_err(Failure::Proto)?
            {
                return Ok(h);
            }
            self.buf.reserve(READ_HEAD);
            match self.io.read_buf(&mut self.buf).await {
                Ok(0) if self.buf.is_empty() => return Err(Failure::Unanswered(None)),
                Ok(0) => return Err(Failure::Proto(ProtoError("connection closed in the head"))),
                Ok(_) => {}
                Err(e) if self.buf.is_empty() => return Err(Failure::Unanswered(Some(e))),
                Err(e) => return Err(Failure::Io(e)),
            }
        }
    }
}

/// The upgrade of a WebSocket handshake ([`crate::ws`]) on a connection of its own: the same
/// connect, head writer and head parser as every request, then the socket is the relay's.
impl Conn {
    /// A fresh connection to the notebook (never from a slot: it becomes the socket).
    pub(crate) async fn open(
        route: &RouteEntry,
        timeout: Duration,
    ) -> Result<Box<Conn>, EdgeError> {
        Conn::connect(route, Key::of(route), timeout).await
    }

    /// Sends the upgrade request (the browser's head for the upstream, as [`encode_request`]
    /// writes every request, plus `Connection: Upgrade`, `Upgrade: websocket`; `skip`: headers
    /// of the browser's not to pass; `key`: the edge's own `Sec-WebSocket-Key`, if any) and
    /// reads the answer's head. The headers of a `101` are those [`parse_head`] passes on.
    pub(crate) async fn upgrade(
        &mut self,
        parts: &Parts,
        names: &[&str; 2],
        route: &RouteEntry,
        info: &ForwardInfo<'_>,
        skip: impl Fn(&HeaderName) -> bool,
        key: Option<&str>,
    ) -> Result<(StatusCode, HeaderMap), EdgeError> {
        encode_head(&mut self.out, parts, names, route, info, skip, |out| {
            out.extend_from_slice(b"connection: Upgrade\r\nupgrade: websocket\r\n");
            if let Some(key) = key {
                line(out, b"sec-websocket-key", key.as_bytes());
            }
        });
        if let Err(e) = self.io.write_all(&self.out).await {
            return Err(Failure::Io(e).into_edge());
        }
        let head = self
            .read_head(false, true)
            .await
            .map_err(Failure::into_edge)?;
        Ok(head.into_parts())
    }

    /// The socket, and what the upstream sent after its head (frames it pushed at once).
    pub(crate) fn into_socket(self) -> (TcpStream, Bytes) {
        let leftover = Bytes::copy_from_slice(&self.buf);
        (self.io, leftover)
    }
}

/// How the request body is framed upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RequestFraming {
    None,
    Length(u64),
    Chunked,
}

/// How the upstream frames the response body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ResponseFraming {
    Empty,
    Length(u64),
    Chunked,
    UntilClose,
}

#[derive(Debug)]
pub(super) struct Head {
    status: StatusCode,
    headers: HeaderMap,
    framing: ResponseFraming,
    /// Neither side asked to close and the framing ends by itself.
    reusable: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("bad upstream response: {0}")]
pub struct ProtoError(&'static str);

#[derive(Debug)]
enum Failure {
    /// The connection failed before any byte of an answer came back (maybe closed while idle).
    Unanswered(Option<io::Error>),
    Io(io::Error),
    Proto(ProtoError),
}

impl Failure {
    fn into_edge(self) -> EdgeError {
        let e = EdgeError::new(ErrorKind::UpstreamProtocol, "request");
        match self {
            Failure::Unanswered(None) => e.with_cause("connection closed without an answer"),
            Failure::Unanswered(Some(io)) | Failure::Io(io) => e.with_cause(io),
            Failure::Proto(p) => e.with_cause(p),
        }
    }
}

/// Sends the request on the browser connection's own upstream connection and returns the
/// response with its body still on the wire.
#[allow(clippy::too_many_arguments)]
pub(super) async fn send(
    home: &Arc<Affinity>,
    route: &RouteEntry,
    parts: &Parts,
    body: Incoming,
    names: &[&str; 2],
    info: &ForwardInfo<'_>,
    connect_timeout: Duration,
    response_timeout: Duration,
) -> Result<(Head, UpstreamBody), EdgeError> {
    let key = Key::of(route);
    let (mut conn, reused) = match home.take(&key) {
        Some(c) if c.is_open() => (c, true),
        _ => (
            Conn::connect(route, key.clone(), connect_timeout).await?,
            false,
        ),
    };
    let framing = request_framing(parts, &body);
    encode_request(&mut conn.out, parts, names, route, info, framing);
    let head_request = parts.method == Method::HEAD;
    let exchange = async {
        if let Err(e) = conn.write_request(body, framing).await {
            return Err(Failure::Unanswered(Some(e)));
        }
        conn.read_head(head_request, false).await
    };
    let result = match tokio::time::timeout(response_timeout, exchange).await {
        Err(_) => return Err(EdgeError::new(ErrorKind::UpstreamTimeout, "response head")),
        Ok(r) => r,
    };
    let head = match result {
        Ok(h) => h,
        Err(Failure::Unanswered(_))
            if reused && framing == RequestFraming::None && parts.method.is_idempotent() =>
        {
            // The upstream closed the idle connection just as the request went out (Marimo's
            // server drops idle keep-alive connections after a few seconds). Nothing of the
            // request body was consumed, so an idempotent request goes again, once, on a fresh
            // connection (RFC 9110 §9.2.2: never a POST, which the upstream might have seen).
            let out = std::mem::take(&mut conn.out);
            conn = Conn::connect(route, key, connect_timeout).await?;
            conn.out = out;
            let retry = async {
                if let Err(e) = conn.io.write_all(&conn.out).await {
                    return Err(Failure::Io(e));
                }
                conn.read_head(head_request, false).await
            };
            match tokio::time::timeout(response_timeout, retry).await {
                Err(_) => return Err(EdgeError::new(ErrorKind::UpstreamTimeout, "response head")),
                Ok(Ok(h)) => h,
                Ok(Err(f)) => return Err(f.into_edge()),
            }
        }
        Err(f) => return Err(f.into_edge()),
    };
    conn.out.clear();
    let state = match head.framing {
        ResponseFraming::Empty => BodyState::Done,
        ResponseFraming::Length(n) => BodyState::Length(n),
        ResponseFraming::Chunked => BodyState::Chunked(chunked::Decoder::default()),
        ResponseFraming::UntilClose => BodyState::UntilClose,
    };
    let mut body = UpstreamBody {
        conn: Some(conn),
        home: home.clone(),
        reusable: head.reusable,
        state,
    };
    body.finish_if_done();
    Ok((head, body))
}

fn request_framing(parts: &Parts, body: &Incoming) -> RequestFraming {
    use hyper::body::Body as _;
    match body.size_hint().exact() {
        Some(0) if !parts.headers.contains_key(header::CONTENT_LENGTH) => RequestFraming::None,
        Some(n) => RequestFraming::Length(n),
        None => RequestFraming::Chunked,
    }
}

/// Writes the request head for the upstream: the browser's headers minus hop-by-hop ones,
/// its credentials and identity claims (the same rules as [`super::rewrite_request_headers`]),
/// plus the notebook's own credential and the `X-Forwarded-*` facts.
fn encode_request(
    out: &mut Vec<u8>,
    parts: &Parts,
    names: &[&str; 2],
    route: &RouteEntry,
    info: &ForwardInfo<'_>,
    framing: RequestFraming,
) {
    encode_head(
        out,
        parts,
        names,
        route,
        info,
        |_| false,
        |out| match framing {
            RequestFraming::None => {}
            RequestFraming::Length(n) => {
                let _ = write!(out, "content-length: {n}\r\n");
            }
            RequestFraming::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        },
    );
}

/// [`encode_request`]'s head writer: `skip` drops more of the browser's headers, `tail` adds
/// the last lines (framing, or the upgrade's) before the blank line.
fn encode_head(
    out: &mut Vec<u8>,
    parts: &Parts,
    names: &[&str; 2],
    route: &RouteEntry,
    info: &ForwardInfo<'_>,
    skip: impl Fn(&HeaderName) -> bool,
    tail: impl FnOnce(&mut Vec<u8>),
) {
    out.clear();
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    let pq = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    out.extend_from_slice(pq.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let tokens = ConnectionTokens::of(parts.headers.get_all(header::CONNECTION).iter());
    let mut cookies_done = false;
    for (name, value) in &parts.headers {
        if !rules::request_header_forwarded(name) || tokens.names(name) || skip(name) {
            continue;
        }
        if name == header::HOST || name == header::CONTENT_LENGTH || name == header::EXPECT {
            continue;
        }
        if name == header::COOKIE {
            if !cookies_done {
                cookies_done = true;
                let start = out.len();
                out.extend_from_slice(b"cookie: ");
                let first = out.len();
                rules::for_each_kept_cookie(&parts.headers, names, |pair| {
                    if out.len() > first {
                        out.extend_from_slice(b"; ");
                    }
                    out.extend_from_slice(pair.as_bytes());
                });
                if out.len() == first {
                    out.truncate(start);
                } else {
                    out.extend_from_slice(b"\r\n");
                }
            }
            continue;
        }
        line(out, name.as_str().as_bytes(), value.as_bytes());
    }
    line(out, b"authorization", route.upstream_auth.as_bytes());
    line(
        out,
        rules::NOTEBOOK_ID_HEADER.as_str().as_bytes(),
        rules::OWN_FILE_KEY.as_bytes(),
    );
    line(out, b"x-forwarded-for", info.forwarded_for.as_bytes());
    line(out, b"x-forwarded-proto", info.proto.as_bytes());
    match &info.host {
        Some(h) => {
            line(out, b"host", h.as_bytes());
            line(out, b"x-forwarded-host", h.as_bytes());
        }
        None => line(out, b"host", route.upstream.as_str().as_bytes()),
    }
    out.extend_from_slice(b"x-request-id: ");
    info.request_id.write_to(out);
    out.extend_from_slice(b"\r\n");
    tail(out);
    out.extend_from_slice(b"\r\n");
}

fn line(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Parses a response head at the start of `buf` (skipping 1xx interim answers), consuming it,
/// and rewrites its headers for the browser (the same rules as
/// [`super::rewrite_response_headers`]). `None`: not complete yet. Header values are slices of
/// the read buffer, not copies.
fn parse_head(
    buf: &mut BytesMut,
    head_request: bool,
    upgrade: bool,
) -> Result<Option<Head>, ProtoError> {
    loop {
        // (name start, name end, value start, value end) of each header, as offsets in `buf`
        // (a head is at most `MAX_HEAD` bytes, so they fit in `u16`: a small array to clear).
        let mut spans = [(0u16, 0u16, 0u16, 0u16); MAX_HEADERS];
        let (len, code, minor, count) = {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut r = httparse::Response::new(&mut headers);
            let base = buf.as_ptr() as usize;
            match r.parse(buf) {
                Ok(httparse::Status::Complete(len)) => {
                    if len > MAX_HEAD {
                        return Err(ProtoError("head too large"));
                    }
                    let at = |p: *const u8| (p as usize - base) as u16;
                    for (span, h) in spans.iter_mut().zip(r.headers.iter()) {
                        let (n, v) = (at(h.name.as_ptr()), at(h.value.as_ptr()));
                        *span = (n, n + h.name.len() as u16, v, v + h.value.len() as u16);
                    }
                    (
                        len,
                        r.code.unwrap_or(0),
                        r.version.unwrap_or(1),
                        r.headers.len(),
                    )
                }
                Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
                    return Err(ProtoError("head too large"))
                }
                Ok(httparse::Status::Partial) => return Ok(None),
                Err(httparse::Error::TooManyHeaders) => return Err(ProtoError("too many headers")),
                Err(_) => return Err(ProtoError("malformed head")),
            }
        };
        if (100..200).contains(&code) && !(upgrade && code == 101) {
            if code == 101 {
                return Err(ProtoError("unexpected protocol switch"));
            }
            // 100 Continue, 103 Early Hints: interim, the real answer follows.
            buf.advance(len);
            continue;
        }
        let status = StatusCode::from_u16(code).map_err(|_| ProtoError("bad status"))?;
        let head = buf.split_to(len).freeze();
        let spans = &spans[..count];
        let tokens = ConnectionTokens::of(
            spans
                .iter()
                .filter(|s| head[s.0 as usize..s.1 as usize].eq_ignore_ascii_case(b"connection"))
                .map(|s| &head[s.2 as usize..s.3 as usize]),
        );
        // `+ 2`: room for the security headers the pipeline adds (`respond::Security::harden`).
        let mut headers = HeaderMap::with_capacity(count + 2);
        let mut length: Option<u64> = None;
        let mut transfer_encoding = false;
        let mut chunked = false;
        for &(ns, ne, vs, ve) in spans {
            let (ns, ne, vs, ve) = (ns as usize, ne as usize, vs as usize, ve as usize);
            let name =
                HeaderName::from_bytes(&head[ns..ne]).map_err(|_| ProtoError("header name"))?;
            let value = &head[vs..ve];
            if name == header::TRANSFER_ENCODING {
                transfer_encoding = true;
                // Only the last coding matters for framing.
                chunked = value
                    .rsplit(|&b| b == b',')
                    .next()
                    .is_some_and(|c| c.trim_ascii().eq_ignore_ascii_case(b"chunked"));
                continue;
            }
            if name == header::CONTENT_LENGTH {
                // 1*DIGIT (RFC 9110 §8.6): `parse` alone would also take a leading `+`.
                let digits = value.trim_ascii();
                let n = Some(digits)
                    .filter(|d| !d.is_empty() && d.iter().all(u8::is_ascii_digit))
                    .and_then(|d| std::str::from_utf8(d).ok())
                    .and_then(|d| d.parse::<u64>().ok())
                    .ok_or(ProtoError("content-length"))?;
                match length {
                    Some(m) if m != n => return Err(ProtoError("conflicting content-length")),
                    Some(_) => continue,
                    None => length = Some(n),
                }
            }
            if !rules::response_header_forwarded(&name, value) || tokens.names(&name) {
                continue;
            }
            let value = HeaderValue::from_maybe_shared(head.slice(vs..ve))
                .map_err(|_| ProtoError("header value"))?;
            headers.append(name, value);
        }
        let no_body = head_request
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
            || status == StatusCode::SWITCHING_PROTOCOLS;
        let framing = if no_body {
            ResponseFraming::Empty
        } else if transfer_encoding {
            headers.remove(header::CONTENT_LENGTH);
            if chunked {
                ResponseFraming::Chunked
            } else {
                ResponseFraming::UntilClose
            }
        } else if let Some(n) = length {
            ResponseFraming::Length(n)
        } else {
            ResponseFraming::UntilClose
        };
        // HTTP/1.0 closes unless asked to keep alive; HTTP/1.1 keeps alive unless asked to close.
        let keep_alive = if minor == 0 {
            tokens.keep_alive
        } else {
            !tokens.close
        };
        let reusable = keep_alive
            && framing != ResponseFraming::UntilClose
            && !(transfer_encoding && length.is_some());
        return Ok(Some(Head {
            status,
            headers,
            framing,
            reusable,
        }));
    }
}

enum BodyState {
    Length(u64),
    Chunked(chunked::Decoder),
    UntilClose,
    Done,
}

/// The upstream response body, read from the upstream socket as hyper's server polls it (in
/// the browser connection's task). Returns its connection to the slot when complete.
pub struct UpstreamBody {
    conn: Option<Box<Conn>>,
    home: Arc<Affinity>,
    reusable: bool,
    state: BodyState,
}

impl UpstreamBody {
    /// The whole body when it is already buffered (small answers arrive with their head).
    fn take_whole(&mut self) -> Option<Bytes> {
        match self.state {
            BodyState::Done => Some(Bytes::new()),
            BodyState::Length(n) => {
                let conn = self.conn.as_mut()?;
                let n = usize::try_from(n).ok()?;
                if conn.buf.len() < n {
                    return None;
                }
                let data = conn.buf.split_to(n).freeze();
                self.state = BodyState::Done;
                self.finish_if_done();
                Some(data)
            }
            _ => None,
        }
    }

    /// When the body is complete: the connection goes home if it can be reused, else closes.
    fn finish_if_done(&mut self) {
        let done = match &self.state {
            BodyState::Done | BodyState::Length(0) => true,
            BodyState::Chunked(d) => d.is_done(),
            _ => false,
        };
        if done {
            self.state = BodyState::Done;
            if let Some(conn) = self.conn.take() {
                if self.reusable && conn.buf.is_empty() {
                    self.home.put(conn);
                }
            }
        }
    }

    pub fn is_end(&self) -> bool {
        matches!(self.state, BodyState::Done | BodyState::Length(0))
    }

    pub fn size_hint(&self) -> SizeHint {
        match self.state {
            BodyState::Done => SizeHint::with_exact(0),
            BodyState::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }

    pub fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<Frame<Bytes>>>> {
        loop {
            let Some(conn) = self.conn.as_mut() else {
                return Poll::Ready(None);
            };
            let want = match &mut self.state {
                BodyState::Done => return Poll::Ready(None),
                BodyState::Length(left) => {
                    if !conn.buf.is_empty() {
                        let n = usize::try_from(*left)
                            .unwrap_or(usize::MAX)
                            .min(conn.buf.len());
                        let data = conn.buf.split_to(n).freeze();
                        *left -= n as u64;
                        self.finish_if_done();
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    usize::try_from(*left).unwrap_or(READ_BODY)
                }
                BodyState::Chunked(d) => match d.step(&mut conn.buf) {
                    Ok(Step::Data(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    Ok(Step::Done) => {
                        self.finish_if_done();
                        return Poll::Ready(None);
                    }
                    Ok(Step::NeedMore) => READ_BODY,
                    Err(e) => {
                        self.conn = None;
                        return Poll::Ready(Some(Err(io::Error::other(e))));
                    }
                },
                BodyState::UntilClose => {
                    if !conn.buf.is_empty() {
                        let data = conn.buf.split().freeze();
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    READ_BODY
                }
            };
            conn.buf.reserve(want.clamp(READ_HEAD, READ_BODY));
            let n = match ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut conn.io),
                cx,
                &mut conn.buf
            )) {
                Ok(n) => n,
                Err(e) => {
                    self.conn = None;
                    return Poll::Ready(Some(Err(e)));
                }
            };
            if n == 0 {
                self.conn = None;
                if matches!(self.state, BodyState::UntilClose) {
                    self.state = BodyState::Done;
                    return Poll::Ready(None);
                }
                return Poll::Ready(Some(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "upstream closed the connection in the body",
                ))));
            }
        }
    }
}

/// The response with its body as the browser gets it: a body already read whole is handed over
/// as it is (and the connection is free again before hyper writes a byte).
pub(super) fn into_body(mut body: UpstreamBody) -> BodyKind {
    match body.take_whole() {
        Some(b) => BodyKind::Whole(b),
        None => BodyKind::Streaming(body),
    }
}

pub(super) enum BodyKind {
    Whole(Bytes),
    Streaming(UpstreamBody),
}

impl Head {
    pub(super) fn into_parts(self) -> (StatusCode, HeaderMap) {
        (self.status, self.headers)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::entry;
    use super::*;

    fn csp() -> HeaderValue {
        HeaderValue::from_static("frame-ancestors https://host.example")
    }

    /// The encoded head, parsed back.
    fn encode(req: http::Request<()>, framing: RequestFraming) -> (String, Vec<(String, String)>) {
        let (parts, ()) = req.into_parts();
        let host = parts.headers.get(header::HOST).cloned();
        let mut out = Vec::new();
        encode_request(
            &mut out,
            &parts,
            &["marina", "__Host-marina"],
            &entry(),
            &ForwardInfo {
                forwarded_for: &HeaderValue::from_static("10.0.0.9"),
                proto: "https",
                host: host.as_ref(),
                request_id: super::super::RequestId { prefix: 1, n: 42 },
            },
            framing,
        );
        let mut hs = [httparse::EMPTY_HEADER; 64];
        let mut r = httparse::Request::new(&mut hs);
        assert!(matches!(r.parse(&out), Ok(httparse::Status::Complete(n)) if n == out.len()));
        let start = format!("{} {}", r.method.unwrap(), r.path.unwrap());
        let headers = r
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_owned(),
                    String::from_utf8(h.value.to_vec()).unwrap(),
                )
            })
            .collect();
        (start, headers)
    }

    fn get<'a>(h: &'a [(String, String)], name: &str) -> Vec<&'a str> {
        h.iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    #[test]
    fn request_head_swaps_credentials_and_drops_identity_claims() {
        let req = http::Request::post("/notebooks/A1B2C3D4E5/api/kernel/run?x=1")
            .header(header::HOST, "127.0.0.1:8000")
            .header(header::AUTHORIZATION, "Bearer browser")
            .header(header::COOKIE, "marina=sealed; theme=dark")
            .header(header::COOKIE, "other=1; __Host-marina=x")
            .header("x-forwarded-user", "admin")
            .header("x-forwarded-for", "1.2.3.4")
            .header("x-remote-user", "admin")
            .header("forwarded", "for=1.2.3.4")
            .header(header::CONNECTION, "keep-alive, X-Secret-Hop")
            .header("x-secret-hop", "1")
            .header(header::TRANSFER_ENCODING, "chunked")
            .header(header::CONTENT_LENGTH, "99")
            .header(header::EXPECT, "100-continue")
            .header("marimo-server-token", "skew")
            .header("x-request-id", "forged")
            .header("x-notebook-id", "%2Fother%2Fnotebook.py")
            .header("x-notebook-id", "second")
            .body(())
            .unwrap();
        let (start, h) = encode(req, RequestFraming::Length(5));
        assert_eq!(start, "POST /notebooks/A1B2C3D4E5/api/kernel/run?x=1");
        assert_eq!(get(&h, "authorization"), ["Bearer marimo-secret"]);
        assert_eq!(get(&h, "cookie"), ["theme=dark; other=1"]);
        assert_eq!(get(&h, "x-forwarded-for"), ["10.0.0.9"]);
        assert_eq!(get(&h, "x-forwarded-proto"), ["https"]);
        assert_eq!(get(&h, "x-forwarded-host"), ["127.0.0.1:8000"]);
        assert_eq!(get(&h, "host"), ["127.0.0.1:8000"]);
        assert_eq!(get(&h, "x-request-id"), ["00000001-2a"]);
        assert_eq!(get(&h, "content-length"), ["5"]);
        assert_eq!(get(&h, "marimo-server-token"), ["skew"]);
        // Marimo opens the file this header names: the edge names the notebook's own.
        assert_eq!(get(&h, "x-notebook-id"), ["notebook.py"]);
        for gone in [
            "x-forwarded-user",
            "x-remote-user",
            "forwarded",
            "x-secret-hop",
            "connection",
            "transfer-encoding",
            "expect",
        ] {
            assert!(get(&h, gone).is_empty(), "{gone} must not go upstream");
        }
    }

    #[test]
    fn request_head_without_other_cookies_has_no_cookie_header() {
        let req = http::Request::get("/notebooks/A1B2C3D4E5/")
            .header(header::COOKIE, "marina=sealed")
            .body(())
            .unwrap();
        let (start, h) = encode(req, RequestFraming::None);
        assert_eq!(start, "GET /notebooks/A1B2C3D4E5/");
        assert!(get(&h, "cookie").is_empty());
        assert!(get(&h, "content-length").is_empty());
        assert_eq!(
            get(&h, "host"),
            ["127.0.0.1:2718"],
            "the upstream's when none"
        );
        let req = http::Request::get("/").body(()).unwrap();
        let (_, h) = encode(req, RequestFraming::Chunked);
        assert_eq!(get(&h, "transfer-encoding"), ["chunked"]);
    }

    fn parse(wire: &[u8], head_request: bool) -> Result<Option<(Head, BytesMut)>, ProtoError> {
        let mut buf = BytesMut::from(wire);
        // As the browser gets it: the pipeline adds the security headers to every response.
        let security = crate::respond::Security::new(csp());
        Ok(parse_head(&mut buf, head_request, false)?.map(|mut h| {
            security.harden(&mut h.headers);
            (h, buf)
        }))
    }

    #[test]
    fn response_head_is_rewritten_and_framed() {
        let wire = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\nSet-Cookie: session_2718=abc; HttpOnly\r\nSet-Cookie: pref=1\r\nAccess-Control-Allow-Origin: *\r\nX-Frame-Options: DENY\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\n\r\nhello";
        let (head, rest) = parse(wire, false).unwrap().unwrap();
        assert_eq!(head.status, StatusCode::OK);
        assert_eq!(head.framing, ResponseFraming::Length(5));
        assert!(head.reusable);
        assert_eq!(&rest[..], b"hello");
        let h = &head.headers;
        let cookies: Vec<_> = h.get_all(header::SET_COOKIE).iter().collect();
        assert_eq!(cookies, vec!["pref=1"]);
        assert!(h.keys().all(|k| !k.as_str().starts_with("access-control-")));
        assert!(h.get(header::X_FRAME_OPTIONS).is_none());
        assert!(h.get("x-hop").is_none());
        assert!(h.get(header::CONNECTION).is_none());
        assert!(h.get("keep-alive").is_none());
        assert_eq!(h[header::CONTENT_LENGTH], "5");
        assert_eq!(h[header::CONTENT_SECURITY_POLICY], csp());
        assert_eq!(h[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
        // Whatever the read boundaries, nothing until the head is complete.
        for cut in 0..wire.len() - 5 {
            assert!(
                parse(&wire[..cut], false).unwrap().is_none(),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn response_framing_follows_rfc_9112() {
        let f = |wire: &[u8], head: bool| {
            let (h, _) = parse(wire, head).unwrap().unwrap();
            (h.framing, h.reusable)
        };
        use ResponseFraming::*;
        assert_eq!(
            f(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                false
            ),
            (Chunked, true)
        );
        assert_eq!(
            f(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
                false
            ),
            (Chunked, false),
            "both: chunked wins, the connection is not trusted again"
        );
        assert_eq!(f(b"HTTP/1.1 200 OK\r\n\r\n", false), (UntilClose, false));
        assert_eq!(
            f(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", true),
            (Empty, true),
            "HEAD"
        );
        assert_eq!(
            f(b"HTTP/1.1 304 Not Modified\r\n\r\n", false),
            (Empty, true)
        );
        assert_eq!(f(b"HTTP/1.1 204 No Content\r\n\r\n", false), (Empty, true));
        assert_eq!(
            f(
                b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nConnection: close\r\n\r\n",
                false
            ),
            (Length(1), false)
        );
        assert_eq!(
            f(b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", false),
            (Length(1), false)
        );
        assert_eq!(
            f(
                b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\nConnection: keep-alive\r\n\r\n",
                false
            ),
            (Length(1), true)
        );
        for bad in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: +1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1 1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: \r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"NOT HTTP\r\n\r\n",
        ] {
            assert!(
                parse(bad, false).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let mut huge = b"HTTP/1.1 200 OK\r\nx-big: ".to_vec();
        huge.resize(MAX_HEAD + 10, b'a');
        assert_eq!(
            parse(&huge, false).err(),
            Some(ProtoError("head too large"))
        );
    }
}
