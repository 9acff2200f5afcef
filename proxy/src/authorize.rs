//! Phase 3, `authorize`: what the verified caller may do, and the request rewrites that make it
//! hold whatever the browser sends.
//!
//! Runs after `authenticate`, on every request except the handshake. It sees the [`Identity`],
//! never a credential. It may refuse (403 with a short JSON body, counted by reason) or rewrite
//! the request: Marimo session ids are bound to the member, viewers' event streams are forced
//! into kiosk mode, `access_token` is dropped. It never does I/O.
//!
//! Why the edge must do this: Marimo's `edit` server gives every authenticated caller full
//! rights (research §0): a viewer could save the file, run code, or open a shell. So:
//! - `edit` (the owner): everything except Marimo's own credential endpoints (`/auth/*`).
//! - `view`: only the [`VIEWER_ALLOW`] table below; everything else is refused, including
//!   routes Marimo may add in a later version (allow-list, not deny-list).
//! - Everyone: every Marimo session id the browser sends (`Marimo-Session-Id`, `session_id=`) is
//!   replaced by `s_` + HMAC(member ‖ notebook ‖ browser sid), see
//!   [`CookieKeys::bind_session_id`]. A viewer who learns the owner's browser session id gets a
//!   different effective id, so it can neither act as the owner nor evict the owner's
//!   connection; and no edge replica needs shared state to agree.

use std::borrow::Cow;

use http::{HeaderName, HeaderValue, Method, Uri};
use marina_config::wire::AccessMode;

use crate::authenticate::cookie::CookieKeys;
use crate::authenticate::Identity;
use crate::error::{EdgeError, ErrorKind};

/// Header Marimo uses to tie an HTTP call to a browser session. (A `HeaderName` rather than a
/// `&str`: a string is parsed into a name again on every lookup.)
pub const SESSION_HEADER: HeaderName = HeaderName::from_static("marimo-session-id");
/// Header `/api/kernel/execute` accepts to act on a session without a socket (viewers: never).
pub const STABLE_SESSION_HEADER: HeaderName = HeaderName::from_static("marimo-stable-session-id");

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
/// here is refused for `view` sessions. The tests below and `tests/marimo_readonly.rs` try every
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
    rule(Post, Exact("/api/export/html")),
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

    /// The authorize phase. `rel` is the path after the notebook's prefix. Rewrites `uri` and
    /// `headers` in place.
    pub fn authorize(
        &self,
        keys: &CookieKeys,
        id: &Identity,
        parts: &mut http::request::Parts,
        base_len: usize,
        upgrade: bool,
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
            let bound = keys.bind_session_id(id.member, id.notebook, sid);
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
                keys.bind_session_id(id.member, id.notebook, sid)
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

/// Rewrites a query: `session_id` bound to the member, `access_token` dropped, `kiosk` forced to
/// `true` when asked. `None` if nothing changes.
fn rewrite_query(
    q: &str,
    force_kiosk: bool,
    bind: impl Fn(&str) -> [u8; 8],
) -> Result<Option<String>, EdgeError> {
    let touches = |k: &str| k == "session_id" || k == "access_token" || k == "kiosk";
    if !force_kiosk
        && !q
            .split('&')
            .any(|p| touches(p.split('=').next().unwrap_or("")))
    {
        return Ok(None);
    }
    let mut out = String::with_capacity(q.len() + 12);
    for pair in q.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let keep: Cow<'_, str> = match k {
            "access_token" => continue,
            "kiosk" if force_kiosk => continue,
            "session_id" => {
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

    fn parts(method: &str, uri: &str) -> http::request::Parts {
        http::Request::builder()
            .method(Method::from_bytes(method.as_bytes()).unwrap())
            .uri(uri)
            .body(())
            .unwrap()
            .into_parts()
            .0
    }

    fn keys() -> CookieKeys {
        CookieKeys::new(&[[3; 32]]).unwrap()
    }

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
            .authorize(&keys(), &ident(mode), &mut p, 0, upgrade)
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
            ("GET", "/@file/123-x.png"),
            ("GET", "/public/logo.svg"),
            ("GET", "/api/usage"),
            ("GET", "/api/kernel/status"),
            ("POST", "/api/packages/sandbox"),
            ("POST", "/api/datasources/discover"),
            ("POST", "/api/kernel/read_code"),
            ("POST", "/api/export/html"),
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
            .authorize(&keys(), &ident(AccessMode::View), &mut p, 0, true)
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
        assert!(q.contains("file=nb.py"), "{q}");
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
            .authorize(&keys(), &ident(AccessMode::Edit), &mut p, 0, true)
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::DeniedSessionId);
        let mut p = parts("POST", "/api/kernel/run");
        p.headers
            .insert(SESSION_HEADER, HeaderValue::from_static("owner-session"));
        let e = STRICT
            .authorize(&keys(), &ident(AccessMode::Edit), &mut p, 0, false)
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

    #[test]
    fn path_mode_prefix_is_skipped() {
        let mut p = parts("POST", "/notebooks/NOTEBOOK01/api/kernel/run");
        let e = STRICT
            .authorize(&keys(), &ident(AccessMode::View), &mut p, 21, false)
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::DeniedReadOnly);
        let mut p = parts("GET", "/notebooks/NOTEBOOK01/");
        assert!(STRICT
            .authorize(&keys(), &ident(AccessMode::View), &mut p, 21, false)
            .is_ok());
    }
}
