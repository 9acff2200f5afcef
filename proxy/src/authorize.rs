//! Phase 3, `authorize`: what the verified caller may do, and the request rewrites that make it
//! hold whatever the browser sends.
//!
//! Runs after `authenticate`, on every request except the handshake. It sees the [`Identity`],
//! never a credential. It may refuse (403, or 400 for an ambiguous query, with a short JSON body,
//! counted by reason) or rewrite the request: Marimo session ids are bound to the member,
//! viewers' event streams are forced into kiosk mode, `access_token` and `file` are dropped. It
//! never does I/O.
//!
//! Why the edge must do this: Marimo's `edit` server gives every authenticated caller full
//! rights (research §0): a viewer could save the file, run code, or open a shell. So:
//! - `edit` (the owner): everything except Marimo's own credential endpoints (`/auth/*`).
//! - `view`: only the [`VIEWER_ALLOW`] table below; everything else is refused, including
//!   routes Marimo may add in a later version (allow-list, not deny-list).
//! - Everyone: every Marimo session id the browser sends (`Marimo-Session-Id`, `session_id=`) is
//!   replaced by `s_` + HMAC(member ‖ notebook ‖ browser sid), see
//!   [`SessionBinding::bind_session_id`]. A viewer who learns the owner's browser session id gets a
//!   different effective id, so it can neither act as the owner nor evict the owner's
//!   connection; and no edge replica needs shared state to agree.
//! - Everyone: a request that can change something (any method but `GET`/`HEAD`) and every
//!   session transport must come from the notebook's own origin ([`check_origin`]). The
//!   session cookie alone cannot tell: sibling notebooks (`a.<domain>`, `b.<domain>`) are
//!   *same-site*, so even `SameSite=Strict` sends the owner's cookie with a request that a page
//!   of another notebook makes.
//! - Everyone: nothing in the request may make Marimo open another notebook's file. Its query
//!   `file=` is dropped (below), its `X-Notebook-Id` header is replaced by `forward`
//!   ([`crate::forward::request_header_forwarded`]), and `/@file/` may only name Marimo's own
//!   virtual files ([`is_virtual_file`]).

use std::borrow::Cow;

use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Uri};
use marina_config::wire::AccessMode;
use marina_config::Id;
use ring::hmac;

use crate::authenticate::Identity;
use crate::error::{EdgeError, ErrorKind};

/// Header Marimo uses to tie an HTTP call to a browser session. (A `HeaderName` rather than a
/// `&str`: a string is parsed into a name again on every lookup.)
pub const SESSION_HEADER: HeaderName = HeaderName::from_static("marimo-session-id");
/// Header `/api/kernel/execute` accepts to act on a session without a socket (viewers: never).
pub const STABLE_SESSION_HEADER: HeaderName = HeaderName::from_static("marimo-stable-session-id");
/// Fetch metadata (`same-origin`, `same-site`, `cross-site`, `none`): which site a browser
/// request comes from. Like `Origin`, page script cannot set it.
pub const FETCH_SITE_HEADER: HeaderName = HeaderName::from_static("sec-fetch-site");

/// The key that binds Marimo session ids to members. Derived at start from the cookie secret
/// beside the sealing keys ([`crate::authenticate::cookie::session_binding_key`]), so every
/// replica with the same configured key binds the same way.
pub struct SessionBinding {
    key: hmac::Key,
}

// === impl SessionBinding ===

impl SessionBinding {
    pub fn new(key: hmac::Key) -> SessionBinding {
        SessionBinding { key }
    }

    /// The Marimo session id the notebook sees for `browser_sid` sent by `member`:
    /// `s_` + 6 base36 characters of HMAC(key, member ‖ notebook ‖ browser sid).
    ///
    /// Every replica computes the same value with no shared state, and a member can only ever
    /// produce ids derived from their own member id: presenting someone else's browser session id
    /// yields a different effective id, so a viewer can never act as (or evict) the owner's
    /// Marimo session.
    pub fn bind_session_id(&self, member: Id, notebook: Id, browser_sid: &str) -> [u8; 8] {
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(member.as_str().as_bytes());
        ctx.update(notebook.as_str().as_bytes());
        ctx.update(browser_sid.as_bytes());
        let tag = ctx.sign();
        let mut n = u64::from_be_bytes(
            tag.as_ref()[..8]
                .try_into()
                .expect("HMAC-SHA256 is 32 bytes"),
        );
        let mut out = *b"s_000000";
        for slot in out[2..].iter_mut().rev() {
            *slot = b"0123456789abcdefghijklmnopqrstuvwxyz"[(n % 36) as usize];
            n /= 36;
        }
        out
    }
}

/// Which kind of request a rule admits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `GET` or `HEAD`, no upgrade.
    Read,
    /// `POST`, no upgrade.
    Post,
    /// The session transport: a WebSocket upgrade on `/ws`, or `GET /sse`.
    Stream,
}

#[derive(Clone, Copy, Debug)]
pub enum Pattern {
    Exact(&'static str),
    Prefix(&'static str),
}

/// One allowed (kind, path) for viewers; `interactive` rules apply only with
/// `proxy.interactive_viewers`.
#[derive(Clone, Copy, Debug)]
pub struct Rule {
    pub kind: Kind,
    pub path: Pattern,
    pub interactive: bool,
}

const fn rule(kind: Kind, path: Pattern) -> Rule {
    Rule {
        kind,
        path,
        interactive: false,
    }
}

use Kind::{Post, Read, Stream};
use Pattern::{Exact, Prefix};

/// THE viewer allow-list (research §2.2 and §4), relative to the notebook root. Anything not
/// here is refused for `view` sessions. The tests below and `tests/marimo.rs` try every
/// route the research marks "deny" against it and against a real Marimo server.
pub static VIEWER_ALLOW: &[Rule] = &[
    // Pages and static assets.
    rule(Read, Exact("/")),
    rule(Read, Prefix("/assets/")),
    rule(Read, Exact("/favicon.ico")),
    rule(Read, Exact("/favicon-16x16.png")),
    rule(Read, Exact("/favicon-32x32.png")),
    rule(Read, Exact("/manifest.json")),
    rule(Read, Prefix("/android-chrome-")),
    rule(Read, Exact("/apple-touch-icon.png")),
    rule(Read, Exact("/logo.png")),
    rule(Read, Exact("/public-files-sw.js")),
    rule(Read, Prefix("/public/")),
    rule(Read, Prefix("/@file/")),
    rule(Read, Exact("/og/thumbnail")),
    // Health and what the viewer UI polls.
    rule(Read, Exact("/health")),
    rule(Read, Exact("/healthz")),
    rule(Read, Exact("/api/usage")),
    rule(Read, Exact("/api/lsp/health")),
    rule(Read, Exact("/api/version")),
    rule(Read, Exact("/api/status/connections")),
    rule(Read, Exact("/api/export/availability")),
    rule(Read, Exact("/api/kernel/status")),
    // The read-only POSTs the viewer UI makes on load.
    rule(Post, Exact("/api/packages/sandbox")),
    rule(Post, Exact("/api/datasources/discover")),
    rule(Post, Exact("/api/kernel/read_code")),
    // Not `/api/export/html`: the viewer UI never calls it on its own (research §2.2), and it
    // reads every virtual file named in its JSON body (`files`), which the edge does not parse
    // (bodies are streamed). A viewer sees the same outputs live.
    // The session transports, with kiosk forced (see `authorize`).
    rule(Stream, Exact("/ws")),
    rule(Stream, Exact("/sse")),
    // "Interactive viewers": UI elements re-run cells in the owner's kernel.
    Rule {
        kind: Post,
        path: Exact("/api/kernel/set_ui_element_value"),
        interactive: true,
    },
    Rule {
        kind: Post,
        path: Exact("/api/kernel/set_model_value"),
        interactive: true,
    },
    Rule {
        kind: Post,
        path: Exact("/api/kernel/function_call"),
        interactive: true,
    },
];

/// Requests the Marimo UI makes by itself on a timer: not activity (otherwise an open tab
/// would keep a notebook busy forever).
static PASSIVE: &[&str] = &[
    "/health",
    "/healthz",
    "/api/usage",
    "/api/lsp/health",
    "/api/status/connections",
    "/api/kernel/status",
];

/// The session transport a request opens, if any.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    None,
    WebSocket,
    EventStream,
}

/// What `authorize` decided for a request it let through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub transport: Transport,
    /// Counts as activity for the notebook.
    pub activity: bool,
    /// A viewer asked for the notebook page without `kiosk=true`: send the browser to the same
    /// page with it, so Marimo's UI starts as a read-only mirror (no "Take over" button that
    /// the edge would refuse anyway). The page's query is what the UI copies into its
    /// WebSocket URL, where the edge forces `kiosk=true` regardless.
    pub kiosk_redirect: bool,
}

/// Where [`Decision::kiosk_redirect`] sends the browser: the same page with `kiosk=true`
/// added to its query.
pub fn kiosk_location(uri: &Uri) -> String {
    match uri.query() {
        Some(q) if !q.is_empty() => format!("{}?{q}&kiosk=true", uri.path()),
        _ => format!("{}?kiosk=true", uri.path()),
    }
}

/// The policy knobs from configuration.
#[derive(Clone, Copy, Debug)]
pub struct Policy {
    pub interactive_viewers: bool,
}

// === impl Policy ===

impl Policy {
    /// Is this (kind, relative path) allowed for a viewer?
    pub fn viewer_allows(&self, kind: Kind, rel: &str) -> bool {
        VIEWER_ALLOW.iter().any(|r| {
            r.kind == kind
                && (!r.interactive || self.interactive_viewers)
                && match r.path {
                    Exact(p) => rel == p,
                    Prefix(p) => rel.starts_with(p),
                }
        })
    }

    /// The authorize phase. `rel` is the path after the notebook's prefix; `own_origin` is the
    /// notebook's browser origin ([`crate::route::RouteEntry::origin`]). Rewrites `uri` and
    /// `headers` in place.
    pub fn authorize(
        &self,
        binding: &SessionBinding,
        id: &Identity,
        parts: &mut http::request::Parts,
        base_len: usize,
        upgrade: bool,
        own_origin: &str,
    ) -> Result<Decision, EdgeError> {
        let method = &parts.method;
        let uri = &mut parts.uri;
        let headers = &mut parts.headers;
        let path = uri.path();
        let rel = &path[base_len.min(path.len())..];
        let rel = if rel.is_empty() { "/" } else { rel };
        let rel = normalized(rel)?;

        // Marimo's own credential endpoints: `/auth/token` hands out Marimo's token, `/auth/login`
        // mints Marimo cookies. The edge does authentication; nobody needs them.
        if rel == "/auth" || rel.starts_with("/auth/") {
            return Err(EdgeError::new(
                ErrorKind::DeniedCredentialEndpoint,
                "authorize",
            ));
        }
        // Marimo reads `/@file/<len>-<name>` from the shared-memory segment `<name>`, whatever
        // it is called; only the names Marimo's kernel gives its outputs may be asked for.
        if let Some(name) = rel.strip_prefix("/@file/") {
            if !is_virtual_file(name) {
                return Err(EdgeError::new(ErrorKind::DeniedPath, "virtual file"));
            }
        }
        let kind = if upgrade {
            if *method != Method::GET {
                return Err(EdgeError::new(ErrorKind::BadRequest, "upgrade method"));
            }
            Stream
        } else if *method == Method::GET && rel == "/sse" {
            Stream
        } else if *method == Method::GET || *method == Method::HEAD {
            Read
        } else if *method == Method::POST {
            Post
        } else if *method == Method::CONNECT || *method == Method::TRACE {
            // Tunnels and loop-backs are nothing Marimo serves (a WebSocket's extended CONNECT
            // arrives here as its `GET`).
            return Err(EdgeError::new(ErrorKind::BadRequest, "method"));
        } else {
            // PUT/DELETE/PATCH/OPTIONS…: Marimo's API uses none for viewers.
            Kind::Post
        };
        match kind {
            // Reads change nothing, and the browser keeps their answers from other origins
            // (no CORS headers pass); the page itself must load from a link.
            Read => {}
            Post => check_origin(headers, own_origin, false)?,
            // A socket's handshake always carries `Origin` in browsers; an event stream
            // (a same-origin `GET`) need not, but opens a Marimo session like a socket.
            Stream => check_origin(headers, own_origin, upgrade)?,
        }
        let viewer = id.mode == AccessMode::View;
        if viewer {
            let is_post_like = *method != Method::POST && kind == Post;
            if is_post_like || !self.viewer_allows(kind, &rel) {
                return Err(EdgeError::new(ErrorKind::DeniedReadOnly, "authorize"));
            }
            headers.remove(STABLE_SESSION_HEADER);
        }

        let activity = !PASSIVE.contains(&rel.as_ref());

        // Bind Marimo session ids to the member, for everyone.
        if let Some(v) = headers.get(SESSION_HEADER) {
            let sid = v
                .to_str()
                .ok()
                .filter(|s| is_marimo_sid(s))
                .ok_or_else(|| EdgeError::new(ErrorKind::DeniedSessionId, "session header"))?;
            let bound = binding.bind_session_id(id.member, id.notebook, sid);
            headers.insert(
                SESSION_HEADER,
                HeaderValue::from_bytes(&bound)
                    .map_err(|_| EdgeError::new(ErrorKind::Internal, "sid"))?,
            );
        }
        let transport = match kind {
            Stream if upgrade => Transport::WebSocket,
            Stream => Transport::EventStream,
            _ => Transport::None,
        };
        let force_kiosk = viewer && kind == Stream;
        let at_root = rel == "/";
        if let Some(q) = uri.query() {
            if let Some(new_q) = rewrite_query(q, force_kiosk, |sid| {
                binding.bind_session_id(id.member, id.notebook, sid)
            })? {
                *uri = rebuild(uri, Some(&new_q))?;
            }
        } else if force_kiosk {
            *uri = rebuild(uri, Some("kiosk=true"))?;
        }
        let kiosk_redirect = viewer
            && kind == Read
            && *method == Method::GET
            && at_root
            && !uri
                .query()
                .is_some_and(|q| q.split('&').any(|p| p == "kiosk=true"));
        Ok(Decision {
            transport,
            activity,
            kiosk_redirect,
        })
    }
}

/// Is this request from the notebook's own origin, as far as the browser says? The ONE origin
/// check, for state-changing requests and session transports alike.
///
/// Browsers set `Origin` and `Sec-Fetch-Site` themselves and page script cannot forge either
/// (forbidden request headers), so a request that carries them is judged by them: `Origin`
/// must equal `own_origin` (`null`, from sandboxed frames and opaque redirects, never does),
/// and `Sec-Fetch-Site` must be `same-origin` or `none` (typed in, bookmarked). A request with
/// neither comes from a non-browser client, which holds the cookie itself and needs no
/// protection from a page; it passes unless `require_origin` (WebSocket handshakes, which
/// browsers always send with `Origin`). A repeated header is refused: one browser sends one.
///
/// In path mode every notebook shares one origin, so this separates notebooks from other
/// sites but not from each other (`docs/proxy.md`, "What path mode gives up").
pub fn check_origin(
    headers: &HeaderMap,
    own_origin: &str,
    require_origin: bool,
) -> Result<(), EdgeError> {
    let refuse = |context| Err(EdgeError::new(ErrorKind::DeniedOrigin, context));
    let mut origins = headers.get_all(header::ORIGIN).iter();
    match (origins.next(), origins.next()) {
        (None, _) if require_origin => return refuse("no origin"),
        (None, _) => {}
        (Some(o), None) if o.as_bytes().eq_ignore_ascii_case(own_origin.as_bytes()) => {}
        _ => return refuse("origin"),
    }
    let mut sites = headers.get_all(FETCH_SITE_HEADER).iter();
    match (sites.next(), sites.next()) {
        (None, _) => Ok(()),
        (Some(s), None)
            if s.as_bytes().eq_ignore_ascii_case(b"same-origin")
                || s.as_bytes().eq_ignore_ascii_case(b"none") =>
        {
            Ok(())
        }
        _ => refuse("sec-fetch-site"),
    }
}

/// Is `name` (after `/@file/`) a virtual file as Marimo's kernel names them?
///
/// `VirtualFile` URLs are `./@file/<byte length>-<name>` with `<name>` from `random_filename`:
/// `<native thread id>-<8 ASCII letters or digits>.<ext>` (`ext` is chosen by the code that
/// made the output: `png`, `csv`, a downloaded file's extension…), plus the constant empty file
/// `0-empty.txt` (and its short form `empty.txt`). Marimo serves any name as the POSIX
/// shared-memory segment `/dev/shm/<name>`, which on a shared host includes other programs'
/// segments (multiprocessing's `psm_*`, PostgreSQL's `PostgreSQL.<n>`, …). This shape cannot
/// tell one notebook's outputs from another's: the private `/dev/shm` each notebook gets from
/// its runtime does that; this is defence in depth.
pub fn is_virtual_file(name: &str) -> bool {
    if name == "empty.txt" || name == "0-empty.txt" {
        return true;
    }
    let digits = |s: &str| (1..=20).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit());
    let mut parts = name.splitn(3, '-');
    let (Some(len), Some(tid), Some(rest)) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    let Some((random, ext)) = rest.split_at_checked(8) else {
        return false;
    };
    let Some(ext) = ext.strip_prefix('.') else {
        return false;
    };
    digits(len)
        && digits(tid)
        && random.bytes().all(|b| b.is_ascii_alphanumeric())
        && (1..=32).contains(&ext.len())
        && ext
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'+' | b'-'))
}

/// Marimo's browser session id shape: `^s_[0-9a-z]{6}$`.
pub fn is_marimo_sid(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 8
        && b.starts_with(b"s_")
        && b[2..]
            .iter()
            .all(|c| c.is_ascii_digit() || c.is_ascii_lowercase())
}

/// The path as Marimo's router will see it (percent-decoded, as uvicorn does), refused if it
/// has dot segments, empty segments, backslashes or NULs — so `/assets/%2e%2e/api/kernel/run`
/// or `/api%2Fkernel%2Frun` cannot slip past the allow-list.
fn normalized(rel: &str) -> Result<Cow<'_, str>, EdgeError> {
    let bad = || EdgeError::new(ErrorKind::DeniedPath, "path");
    let decoded: Cow<'_, str> = if rel.as_bytes().contains(&b'%') {
        percent_encoding::percent_decode_str(rel)
            .decode_utf8()
            .map_err(|_| bad())?
    } else {
        Cow::Borrowed(rel)
    };
    if plain_segments(decoded.as_bytes()) {
        Ok(decoded)
    } else {
        Err(bad())
    }
}

/// One pass over a path: no backslash or NUL anywhere, and after each `/` a segment that is
/// neither `.` nor `..` nor empty (an empty last segment, a trailing slash, is fine).
fn plain_segments(path: &[u8]) -> bool {
    let segment_ok = |seg: &[u8], last: bool| match seg {
        b"" => last,
        b"." | b".." => false,
        _ => true,
    };
    // Start of the segment after the latest `/`; the text before the first `/` is not one.
    let mut start = None;
    for (i, &b) in path.iter().enumerate() {
        match b {
            b'\\' | 0 => return false,
            b'/' => {
                if let Some(s) = start {
                    if !segment_ok(&path[s..i], false) {
                        return false;
                    }
                }
                start = Some(i + 1);
            }
            _ => {}
        }
    }
    start.is_none_or(|s| segment_ok(&path[s..], true))
}

/// The raw key of one `key=value` query pair (all of it without `=`).
fn query_key(pair: &str) -> &str {
    pair.split_once('=').map_or(pair, |(k, _)| k)
}

/// A query key the edge rewrites, as Marimo will read it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum QueryKey {
    /// `session_id`: bound to the member.
    SessionId,
    /// `kiosk`: forced to `true` for viewers' transports.
    Kiosk,
    /// `access_token`: Marimo's credential; the edge authenticates, so it is dropped.
    AccessToken,
    /// `file`: which notebook file Marimo opens. A single-file `marimo edit notebook.py` serves
    /// its own file when the key is absent (`get_unique_file_key()`, on the page, `/ws`, `/sse`,
    /// `/og/thumbnail`), and in edit mode adds any path it is given to its allowed files
    /// (`SessionManager.app_manager`), so it is dropped for everyone.
    File,
    Other,
}

impl QueryKey {
    fn of_plain(key: &str) -> QueryKey {
        match key {
            "session_id" => QueryKey::SessionId,
            "kiosk" => QueryKey::Kiosk,
            "access_token" => QueryKey::AccessToken,
            "file" => QueryKey::File,
            _ => QueryKey::Other,
        }
    }

    /// Classifies a raw query key as Marimo's Starlette reads it: `urllib.parse.parse_qsl`
    /// turns `+` into a space, then decodes `%XX` escapes as UTF-8, and the LAST value of a
    /// repeated key wins. A key in plain form is matched as is (no allocation). A key with an
    /// escape or a `+` is decoded; it is refused if it decodes to one of the names above (an
    /// encoded spelling has no use but to make the edge and Marimo read different keys:
    /// `%73ession_id=` is `session_id=` to Marimo) or if its escapes are malformed or not
    /// UTF-8 (Python keeps those literally or as U+FFFD; refusing is simpler than agreeing on
    /// every decoder's repair). Rare, so the decoded copy's allocation does not matter.
    fn of(raw: &str) -> Result<QueryKey, EdgeError> {
        let b = raw.as_bytes();
        if !b.iter().any(|&c| c == b'%' || c == b'+') {
            return Ok(QueryKey::of_plain(raw));
        }
        let malformed = || EdgeError::new(ErrorKind::DeniedQuery, "query key escape");
        let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            match b[i] {
                b'+' => {
                    out.push(b' ');
                    i += 1;
                }
                b'%' => {
                    let (hi, lo) = match (b.get(i + 1), b.get(i + 2)) {
                        (Some(&h), Some(&l)) => (hex(h), hex(l)),
                        _ => (None, None),
                    };
                    let (Some(hi), Some(lo)) = (hi, lo) else {
                        return Err(malformed());
                    };
                    out.push(hi << 4 | lo);
                    i += 3;
                }
                c => {
                    out.push(c);
                    i += 1;
                }
            }
        }
        let decoded = std::str::from_utf8(&out).map_err(|_| malformed())?;
        match QueryKey::of_plain(decoded) {
            QueryKey::Other => Ok(QueryKey::Other),
            _ => Err(EdgeError::new(ErrorKind::DeniedQuery, "encoded query key")),
        }
    }
}

/// Rewrites a query: `session_id` bound to the member, `access_token` and `file` dropped,
/// `kiosk` forced to `true` when asked. `None` if nothing changes (then nothing is allocated
/// either, unless a key has escapes). Refused (400): keys [`QueryKey::of`] refuses, and a
/// repeated `session_id` or `kiosk` (Marimo takes the last; which one the edge should bind is
/// ambiguous, and no browser sends two).
fn rewrite_query(
    q: &str,
    force_kiosk: bool,
    bind: impl Fn(&str) -> [u8; 8],
) -> Result<Option<String>, EdgeError> {
    // First pass: judge every key, so a later one cannot hide behind an earlier rewrite.
    let (mut sids, mut kiosks, mut touched) = (0u32, 0u32, force_kiosk);
    for pair in q.split('&') {
        match QueryKey::of(query_key(pair))? {
            QueryKey::SessionId => sids += 1,
            QueryKey::Kiosk => kiosks += 1,
            QueryKey::AccessToken | QueryKey::File => touched = true,
            QueryKey::Other => {}
        }
    }
    if sids > 1 || kiosks > 1 {
        return Err(EdgeError::new(ErrorKind::DeniedQuery, "repeated query key"));
    }
    if !touched && sids == 0 {
        return Ok(None);
    }
    // Second pass: every key that matters is in plain form now (the first pass refused the
    // others), so matching the raw key is matching what Marimo will read.
    let mut out = String::with_capacity(q.len() + 12);
    for pair in q.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let keep: Cow<'_, str> = match QueryKey::of_plain(k) {
            QueryKey::AccessToken | QueryKey::File => continue,
            QueryKey::Kiosk if force_kiosk => continue,
            QueryKey::SessionId => {
                // Marimo's shape has no `%` or `+`, so the raw value is the decoded one.
                if !is_marimo_sid(v) {
                    return Err(EdgeError::new(
                        ErrorKind::DeniedSessionId,
                        "session_id query",
                    ));
                }
                let b = bind(v);
                let s = std::str::from_utf8(&b)
                    .map_err(|_| EdgeError::new(ErrorKind::Internal, "sid"))?;
                Cow::Owned(format!("session_id={s}"))
            }
            _ => Cow::Borrowed(pair),
        };
        if !out.is_empty() {
            out.push('&');
        }
        out.push_str(&keep);
    }
    if force_kiosk {
        if !out.is_empty() {
            out.push('&');
        }
        out.push_str("kiosk=true");
    }
    Ok(Some(out))
}

/// `uri` with its query replaced. Scheme and authority stay: an HTTP/2 request carries its
/// host there (`:authority`), not in a `Host` header, and forwarding needs it.
fn rebuild(uri: &Uri, query: Option<&str>) -> Result<Uri, EdgeError> {
    let path = uri.path();
    let pq = match query {
        Some(q) if !q.is_empty() => format!("{path}?{q}"),
        _ => path.to_owned(),
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(
        pq.parse()
            .map_err(|e| EdgeError::new(ErrorKind::BadRequest, "rewritten uri").with_cause(e))?,
    );
    Uri::from_parts(parts)
        .map_err(|e| EdgeError::new(ErrorKind::BadRequest, "rewritten uri").with_cause(e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authenticate::cookie::session_binding_key;
    use marina_config::Id;

    fn ident(mode: AccessMode) -> Identity {
        let m = Id::parse("MEMBER0001").unwrap();
        let nb = Id::parse("NOTEBOOK01").unwrap();
        Identity {
            member: m,
            notebook: nb,
            session: nb,
            mode,
        }
    }

    /// A request as the notebook's own page sends it (with its `Origin`).
    fn parts(method: &str, uri: &str) -> http::request::Parts {
        let mut p = bare(method, uri);
        p.headers
            .insert(header::ORIGIN, HeaderValue::from_static(OWN));
        p
    }

    /// A request with no browser headers at all (as a script or `curl` sends it).
    fn bare(method: &str, uri: &str) -> http::request::Parts {
        http::Request::builder()
            .method(Method::from_bytes(method.as_bytes()).unwrap())
            .uri(uri)
            .body(())
            .unwrap()
            .into_parts()
            .0
    }

    fn keys() -> SessionBinding {
        SessionBinding::new(session_binding_key(&[3; 32]))
    }

    /// The notebook's own origin (subdomain mode), and a sibling notebook's: same site.
    const OWN: &str = "https://notebook01.nb.example";
    const SIBLING: &str = "https://notebook02.nb.example";

    /// Runs one request through the phase; `Ok((uri, headers))` or the error kind.
    fn check(
        policy: Policy,
        mode: AccessMode,
        method: &str,
        path: &str,
        upgrade: bool,
    ) -> Result<(Uri, http::HeaderMap, Decision), ErrorKind> {
        let mut p = parts(method, path);
        p.headers
            .insert(SESSION_HEADER, HeaderValue::from_static("s_abc123"));
        p.headers
            .insert(STABLE_SESSION_HEADER, HeaderValue::from_static("stable"));
        policy
            .authorize(&keys(), &ident(mode), &mut p, 0, upgrade, OWN)
            .map(|d| (p.uri, p.headers, d))
            .map_err(|e| e.kind)
    }

    const STRICT: Policy = Policy {
        interactive_viewers: false,
    };
    const INTERACTIVE: Policy = Policy {
        interactive_viewers: true,
    };

    /// Every route research §2.2 marks "deny" for viewers (the list `tests/marimo.rs` also
    /// tries against a real Marimo), plus probes: a route under an allowed prefix's sibling,
    /// the mutating sockets as plain requests, and methods the viewer UI never uses.
    fn denied_for_viewers() -> Vec<(&'static str, &'static str)> {
        let mut v: Vec<(&str, &str)> = include_str!("../tests/data/viewer-denied-routes.txt")
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| l.split_once(' ').expect("METHOD PATH"))
            .collect();
        assert!(v.len() > 80, "the research's deny list");
        v.extend([
            ("GET", "/api/marimo/v1/anything"),
            ("GET", "/terminal/ws"),
            ("GET", "/ws_sync"),
            ("GET", "/api/documentation/snippets"),
            ("PUT", "/api/kernel/read_code"),
            ("DELETE", "/"),
            ("POST", "/"),
            ("POST", "/ws"),
        ]);
        v
    }

    #[test]
    fn viewers_are_refused_every_deny_route() {
        for (m, p) in denied_for_viewers() {
            let e = check(STRICT, AccessMode::View, m, p, false).unwrap_err();
            assert_eq!(e, ErrorKind::DeniedReadOnly, "{m} {p}");
        }
        // The mutating WebSockets are refused as upgrades too.
        for p in ["/terminal/ws", "/ws_sync", "/lsp/pylsp", "/api/kernel/run"] {
            let e = check(STRICT, AccessMode::View, "GET", p, true).unwrap_err();
            assert_eq!(e, ErrorKind::DeniedReadOnly, "WS {p}");
        }
    }

    #[test]
    fn viewers_get_the_allow_list() {
        for (m, p) in [
            ("GET", "/"),
            ("HEAD", "/"),
            ("GET", "/assets/index-abc.js"),
            ("GET", "/@file/123-4567-AbCd09zZ.png"),
            ("GET", "/public/logo.svg"),
            ("GET", "/api/usage"),
            ("GET", "/api/kernel/status"),
            ("POST", "/api/packages/sandbox"),
            ("POST", "/api/datasources/discover"),
            ("POST", "/api/kernel/read_code"),
        ] {
            assert!(
                check(STRICT, AccessMode::View, m, p, false).is_ok(),
                "{m} {p}"
            );
        }
        assert!(check(
            INTERACTIVE,
            AccessMode::View,
            "POST",
            "/api/kernel/set_ui_element_value",
            false
        )
        .is_ok());
        assert!(check(
            INTERACTIVE,
            AccessMode::View,
            "POST",
            "/api/kernel/run",
            false
        )
        .is_err());
    }

    #[test]
    fn owner_passes_except_credentials() {
        for (m, p) in denied_for_viewers() {
            assert!(
                check(STRICT, AccessMode::Edit, m, p, false).is_ok(),
                "{m} {p}"
            );
        }
        assert!(check(STRICT, AccessMode::Edit, "GET", "/terminal/ws", true).is_ok());
        for who in [AccessMode::Edit, AccessMode::View] {
            for p in ["/auth/token", "/auth/login", "/auth%2Ftoken"] {
                for m in ["GET", "POST"] {
                    assert_eq!(
                        check(STRICT, who, m, p, false).unwrap_err(),
                        ErrorKind::DeniedCredentialEndpoint,
                        "{who:?} {m} {p}"
                    );
                }
            }
        }
    }

    #[test]
    fn path_tricks_are_refused() {
        for p in [
            "/assets/../api/kernel/run",
            "/assets/%2e%2e/api/kernel/run",
            "/api%2Fkernel%2Frun",
            "//api/kernel/run",
            "/assets/%5c..%5capi",
            "/assets/%ff",
            "/assets/x/.",
        ] {
            let e = check(STRICT, AccessMode::View, "GET", p, false).unwrap_err();
            assert!(
                matches!(e, ErrorKind::DeniedPath | ErrorKind::DeniedReadOnly),
                "{p}: {e:?}"
            );
        }
        // The encoded form of a denied route is refused for viewers even though it looks like
        // nothing Marimo knows.
        assert!(check(
            STRICT,
            AccessMode::View,
            "POST",
            "/api%2Fkernel%2Frun",
            false
        )
        .is_err());
    }

    #[test]
    fn rewriting_the_query_keeps_the_authority() {
        // HTTP/2 requests name their host in the URI (`:authority`), not in `Host`.
        let mut p = parts("GET", "http://nb.test:8000/ws?session_id=s_abc123");
        STRICT
            .authorize(&keys(), &ident(AccessMode::View), &mut p, 0, true, OWN)
            .unwrap();
        assert_eq!(p.uri.authority().map(|a| a.as_str()), Some("nb.test:8000"));
        assert_eq!(p.uri.scheme_str(), Some("http"));
        assert_eq!(p.uri.path(), "/ws");
        let q = p.uri.query().unwrap();
        assert!(q.contains("kiosk=true") && !q.contains("s_abc123"), "{q}");
    }

    #[test]
    fn tunnels_are_refused_for_everyone() {
        for who in [AccessMode::Edit, AccessMode::View] {
            for m in ["CONNECT", "TRACE"] {
                assert_eq!(
                    check(STRICT, who, m, "/ws", false).unwrap_err(),
                    ErrorKind::BadRequest,
                    "{who:?} {m}"
                );
            }
        }
    }

    #[test]
    fn plain_segments_refuses_dot_empty_and_escape_segments() {
        for ok in [
            "/",
            "/ws",
            "/assets/",
            "/assets/a.js",
            "/a/.b",
            "/a/..b",
            "/a/b..",
            "/.well",
            "/a/b/",
        ] {
            assert!(plain_segments(ok.as_bytes()), "{ok} should pass");
        }
        for bad in [
            "//", "//a", "/a//b", "/a//", "/.", "/..", "/./a", "/../a", "/a/.", "/a/..", "/a/./b",
            "/a/../b", "/a\\b", "/a\0b", "\\", "\0",
        ] {
            assert!(!plain_segments(bad.as_bytes()), "{bad:?} should be refused");
        }
    }

    #[test]
    fn viewer_stream_is_forced_to_kiosk_and_bound() {
        let (uri, _, d) = check(
            STRICT,
            AccessMode::View,
            "GET",
            "/ws?session_id=s_abc123&kiosk=false&access_token=leak&file=nb.py",
            true,
        )
        .unwrap();
        assert_eq!(d.transport, Transport::WebSocket);
        let q = uri.query().unwrap();
        assert!(
            q.contains("kiosk=true") && !q.contains("kiosk=false"),
            "{q}"
        );
        assert!(
            !q.contains("access_token") && !q.contains("s_abc123"),
            "{q}"
        );
        assert!(!q.contains("file="), "{q}");
        let bound = keys().bind_session_id(
            ident(AccessMode::View).member,
            ident(AccessMode::View).notebook,
            "s_abc123",
        );
        assert!(q.contains(&format!(
            "session_id={}",
            std::str::from_utf8(&bound).unwrap()
        )));
        // SSE too, even without a query.
        let (uri, _, d) = check(STRICT, AccessMode::View, "GET", "/sse", false).unwrap();
        assert_eq!(d.transport, Transport::EventStream);
        assert_eq!(uri.query(), Some("kiosk=true"));
    }

    #[test]
    fn session_ids_are_bound_for_everyone() {
        for mode in [AccessMode::Edit, AccessMode::View] {
            let (_, h, _) = check(STRICT, mode, "GET", "/api/usage", false).unwrap();
            let sid = h.get(SESSION_HEADER).unwrap().to_str().unwrap();
            assert!(is_marimo_sid(sid) && sid != "s_abc123", "{sid}");
            assert_eq!(
                h.get(STABLE_SESSION_HEADER).is_some(),
                mode == AccessMode::Edit
            );
        }
        // Owner's socket keeps its own kiosk choice but gets the bound session id.
        let (uri, _, _) = check(
            STRICT,
            AccessMode::Edit,
            "GET",
            "/ws?session_id=s_abc123",
            true,
        )
        .unwrap();
        assert!(!uri.query().unwrap().contains("kiosk"));
        assert!(!uri.query().unwrap().contains("s_abc123"));
        // Malformed ids are refused.
        let mut p = parts("GET", "/ws?session_id=s_ABC123");
        let e = STRICT
            .authorize(&keys(), &ident(AccessMode::Edit), &mut p, 0, true, OWN)
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::DeniedSessionId);
        let mut p = parts("POST", "/api/kernel/run");
        p.headers
            .insert(SESSION_HEADER, HeaderValue::from_static("owner-session"));
        let e = STRICT
            .authorize(&keys(), &ident(AccessMode::Edit), &mut p, 0, false, OWN)
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::DeniedSessionId);
    }

    #[test]
    fn a_viewer_opening_the_page_is_sent_to_the_kiosk_view() {
        let redirect = |mode, method, path| {
            check(STRICT, mode, method, path, false)
                .unwrap()
                .2
                .kiosk_redirect
        };
        assert!(redirect(AccessMode::View, "GET", "/"));
        assert!(redirect(AccessMode::View, "GET", "/?foo=1"));
        assert!(!redirect(AccessMode::View, "GET", "/?kiosk=true"));
        assert!(!redirect(AccessMode::View, "GET", "/?foo=1&kiosk=true"));
        assert!(!redirect(AccessMode::View, "GET", "/assets/index.js"));
        assert!(!redirect(AccessMode::View, "HEAD", "/"));
        assert!(!redirect(AccessMode::Edit, "GET", "/"));
    }

    #[test]
    fn polls_are_not_activity() {
        assert!(
            !check(STRICT, AccessMode::View, "GET", "/api/usage", false)
                .unwrap()
                .2
                .activity
        );
        assert!(
            check(STRICT, AccessMode::Edit, "POST", "/api/kernel/run", false)
                .unwrap()
                .2
                .activity
        );
    }

    /// Runs `method path` by `mode` with exactly these headers; the error kind if refused.
    fn with_headers(
        mode: AccessMode,
        method: &str,
        path: &str,
        upgrade: bool,
        headers: &[(&'static str, &'static str)],
    ) -> Result<(Uri, Decision), ErrorKind> {
        let mut p = bare(method, path);
        for (n, v) in headers {
            p.headers.append(*n, HeaderValue::from_static(v));
        }
        STRICT
            .authorize(&keys(), &ident(mode), &mut p, 0, upgrade, OWN)
            .map(|d| (p.uri, d))
            .map_err(|e| e.kind)
    }

    #[test]
    fn state_changes_and_sockets_must_come_from_the_notebooks_own_origin() {
        let run = |h: &[(&'static str, &'static str)]| {
            with_headers(AccessMode::Edit, "POST", "/api/kernel/run", false, h)
        };
        // Positive controls: the notebook's own page, a fetch the browser marks same-origin or
        // user-initiated, and a non-browser client (neither header).
        for ok in [
            &[("origin", OWN)][..],
            &[("origin", "HTTPS://NOTEBOOK01.nb.example")],
            &[("sec-fetch-site", "same-origin")],
            &[("origin", OWN), ("sec-fetch-site", "same-origin")],
            &[("sec-fetch-site", "none")],
            &[],
        ] {
            assert!(run(ok).is_ok(), "{ok:?}");
        }
        // Attacks: a sibling notebook's page (same site, so the cookie came along), another
        // site, an opaque origin, a same-site fetch, two origins.
        for bad in [
            &[("origin", SIBLING)][..],
            &[("origin", "https://evil.example")],
            &[("origin", "null")],
            &[("origin", "https://notebook01.nb.example.evil.example")],
            &[("sec-fetch-site", "same-site")],
            &[("sec-fetch-site", "cross-site")],
            &[("origin", OWN), ("sec-fetch-site", "same-site")],
            &[("origin", OWN), ("origin", SIBLING)],
        ] {
            assert_eq!(run(bad).unwrap_err(), ErrorKind::DeniedOrigin, "{bad:?}");
        }
        // Every method but GET/HEAD is a state change, for viewers' allowed POSTs too.
        for m in ["PUT", "DELETE", "PATCH", "OPTIONS"] {
            let e = with_headers(AccessMode::Edit, m, "/api/x", false, &[("origin", SIBLING)]);
            assert_eq!(e.unwrap_err(), ErrorKind::DeniedOrigin, "{m}");
        }
        let e = with_headers(
            AccessMode::View,
            "POST",
            "/api/kernel/read_code",
            false,
            &[("sec-fetch-site", "same-site")],
        );
        assert_eq!(e.unwrap_err(), ErrorKind::DeniedOrigin);
        // Reads pass whatever their origin (the browser keeps the answer from that page).
        for m in ["GET", "HEAD"] {
            assert!(
                with_headers(AccessMode::Edit, m, "/", false, &[("origin", SIBLING)]).is_ok(),
                "{m}"
            );
        }
        // Sockets need their own origin, as before; a socket without `Origin` is refused.
        let ws = |h: &[(&'static str, &'static str)]| {
            with_headers(AccessMode::Edit, "GET", "/ws?session_id=s_abc123", true, h)
        };
        assert!(ws(&[("origin", OWN)]).is_ok());
        assert_eq!(ws(&[]).unwrap_err(), ErrorKind::DeniedOrigin);
        assert_eq!(
            ws(&[("sec-fetch-site", "same-origin")]).unwrap_err(),
            ErrorKind::DeniedOrigin
        );
        assert_eq!(
            ws(&[("origin", SIBLING)]).unwrap_err(),
            ErrorKind::DeniedOrigin
        );
        // An event stream opens a Marimo session like a socket: same rule, `Origin` optional
        // (a same-origin `GET` carries none).
        let sse = |h: &[(&'static str, &'static str)]| {
            with_headers(
                AccessMode::View,
                "GET",
                "/sse?session_id=s_abc123",
                false,
                h,
            )
        };
        assert!(sse(&[]).is_ok());
        assert!(sse(&[("sec-fetch-site", "same-origin")]).is_ok());
        assert_eq!(
            sse(&[("sec-fetch-site", "same-site")]).unwrap_err(),
            ErrorKind::DeniedOrigin
        );
        assert_eq!(
            sse(&[("origin", SIBLING)]).unwrap_err(),
            ErrorKind::DeniedOrigin
        );
    }

    /// The query after `authorize`, or the error kind.
    fn query_after(mode: AccessMode, path: &str, upgrade: bool) -> Result<String, ErrorKind> {
        check(STRICT, mode, "GET", path, upgrade).map(|(u, ..)| u.query().unwrap_or("").into())
    }

    #[test]
    fn query_keys_are_read_as_marimo_reads_them() {
        for who in [AccessMode::Edit, AccessMode::View] {
            // The attack: Starlette decodes `%73` to `s` and takes the last value, so Marimo
            // would have registered the raw `s_evil`. Any encoded spelling of a key the edge
            // rewrites is refused, as are repeats and malformed escapes.
            for bad in [
                "/ws?session_id=s_abc123&%73ession_id=s_evil00",
                "/ws?%73ession_id=s_evil00",
                "/ws?session%5Fid=s_evil00",
                "/ws?session_id=s_abc123&session_id=s_abc124",
                "/ws?session_id=s_abc123&kiosk=true&kiosk=false",
                "/ws?session_id=s_abc123&%6Biosk=false",
                "/ws?session_id=s_abc123&%61ccess_token=t",
                "/ws?session_id=s_abc123&%66ile=%2Fother%2Fnotebook.py",
                "/ws?session_id=s_abc123&%zz=1",
                "/ws?session_id=s_abc123&a%4=1",
                "/ws?session_id=s_abc123&a%=1",
                "/ws?session_id=s_abc123&a%FF=1",
            ] {
                assert_eq!(
                    query_after(who, bad, true).unwrap_err(),
                    ErrorKind::DeniedQuery,
                    "{who:?} {bad}"
                );
            }
        }
        // Positive controls: the plain key is bound; other encoded keys pass untouched (`+`
        // is a space to Marimo, `session+id` is not `session_id`).
        let q = query_after(AccessMode::Edit, "/ws?session_id=s_abc123", true).unwrap();
        assert_eq!(q, bound_for(AccessMode::Edit, "s_abc123"));
        let q = query_after(
            AccessMode::Edit,
            "/ws?session_id=s_abc123&a+b=1&x%20y=%zz&session+id=s_evil00",
            true,
        )
        .unwrap();
        assert_eq!(
            q,
            format!(
                "{}&a+b=1&x%20y=%zz&session+id=s_evil00",
                bound_for(AccessMode::Edit, "s_abc123")
            )
        );
        // An encoded value is no way round the shape check either.
        assert_eq!(
            query_after(AccessMode::Edit, "/ws?session_id=%73_abc123", true).unwrap_err(),
            ErrorKind::DeniedSessionId
        );
    }

    #[test]
    fn file_is_dropped_from_every_query() {
        for who in [AccessMode::Edit, AccessMode::View] {
            for path in [
                "/?kiosk=true&file=%2Fother%2Fnotebook.py",
                "/?file=/other/notebook.py&kiosk=true&file=x",
                "/og/thumbnail?file=/other/notebook.py",
            ] {
                let q = query_after(who, path, false).unwrap();
                assert_eq!(
                    q,
                    "kiosk=true".repeat(path.contains("kiosk") as usize),
                    "{path}"
                );
            }
            let q = query_after(who, "/ws?file=/o/notebook.py&session_id=s_abc123", true).unwrap();
            assert!(
                !q.contains("file") && q.contains(&bound_for(who, "s_abc123")),
                "{q}"
            );
        }
        // Positive control: the owner's page without `file=` is left alone (nothing allocated).
        let mut p = parts("GET", "/?foo=1&kiosk=true");
        let before = p.uri.clone();
        STRICT
            .authorize(&keys(), &ident(AccessMode::Edit), &mut p, 0, false, OWN)
            .unwrap();
        assert_eq!(p.uri, before);
    }

    fn bound_for(who: AccessMode, sid: &str) -> String {
        let id = ident(who);
        let b = keys().bind_session_id(id.member, id.notebook, sid);
        format!("session_id={}", std::str::from_utf8(&b).unwrap())
    }

    #[test]
    fn virtual_files_are_only_marimos_own() {
        for ok in [
            "0-empty.txt",
            "empty.txt",
            "52011-139873428375232-Ab3dE9xZ.png",
            "12-1-abcdefgh.csv",
            "7-42-ABCDEFGH.tar.gz",
            "7-42-ABCDEFGH.svg+xml",
        ] {
            assert!(is_virtual_file(ok), "{ok}");
        }
        for bad in [
            "",
            "12-psm_0a1b2c3d",
            "128-PostgreSQL.1804289383",
            "10-sem.x",
            "12-1-abcdefg.png",
            "12-1-abcdefghi.png",
            "12-1-abcdefgh",
            "12-1-abcdefgh.",
            "12-1-abc_efgh.png",
            "x-1-abcdefgh.png",
            "12-x-abcdefgh.png",
            "12-1-abcdefgh.p/ng",
            "12-1-abcdefgh.p%2Fng",
            "12--abcdefgh.png",
            "123456789012345678901-1-abcdefgh.png",
        ] {
            assert!(!is_virtual_file(bad), "{bad}");
        }
        for who in [AccessMode::Edit, AccessMode::View] {
            assert!(check(
                STRICT,
                who,
                "GET",
                "/@file/12-1-abcdefgh.png?download=1",
                false
            )
            .is_ok());
            for bad in [
                "/@file/12-psm_0a1b2c3d",
                "/@file/99-PostgreSQL.1",
                "/@file/%31-x",
            ] {
                assert_eq!(
                    check(STRICT, who, "GET", bad, false).unwrap_err(),
                    ErrorKind::DeniedPath,
                    "{who:?} {bad}"
                );
            }
        }
    }

    #[test]
    fn export_is_the_owners() {
        assert_eq!(
            check(STRICT, AccessMode::View, "POST", "/api/export/html", false).unwrap_err(),
            ErrorKind::DeniedReadOnly
        );
        assert!(check(STRICT, AccessMode::Edit, "POST", "/api/export/html", false).is_ok());
    }

    #[test]
    fn path_mode_prefix_is_skipped() {
        let mut p = parts("POST", "/notebooks/NOTEBOOK01/api/kernel/run");
        let e = STRICT
            .authorize(&keys(), &ident(AccessMode::View), &mut p, 21, false, OWN)
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::DeniedReadOnly);
        let mut p = parts("GET", "/notebooks/NOTEBOOK01/");
        assert!(STRICT
            .authorize(&keys(), &ident(AccessMode::View), &mut p, 21, false, OWN)
            .is_ok());
    }

    #[test]
    fn session_binding_depends_on_member() {
        let id = |s: &str| Id::parse(s).unwrap();
        let k = SessionBinding::new(session_binding_key(&[9; 32]));
        let nb = id("NOTEBOOK01");
        let a = k.bind_session_id(id("MEMBER0001"), nb, "s_abc123");
        let b = k.bind_session_id(id("MEMBER0002"), nb, "s_abc123");
        assert_ne!(a, b);
        assert_eq!(a, k.bind_session_id(id("MEMBER0001"), nb, "s_abc123"));
        let s = std::str::from_utf8(&a).unwrap();
        assert!(
            s.starts_with("s_")
                && s[2..]
                    .bytes()
                    .all(|c| c.is_ascii_digit() || c.is_ascii_lowercase())
        );
        // Another replica with the same configured key derives the same id.
        let k2 = SessionBinding::new(session_binding_key(&[9; 32]));
        assert_eq!(a, k2.bind_session_id(id("MEMBER0001"), nb, "s_abc123"));
    }
}
