//! The header rules of `forward`, written once as predicates and applied by every writer of an
//! upstream request or a browser response: the HTTP/1.1 encoder and parser ([`super::h1`]), the
//! `HeaderMap` rewrites for HTTP/2 ([`super`]) and the WebSocket handshake ([`crate::ws`]). Also
//! the per-request facts they write (`X-Forwarded-*`, `X-Request-Id`).

use std::fmt;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1), plus the
/// pre-standard ones proxies still meet.
const HOP_BY_HOP: &[HeaderName] = &[
    header::CONNECTION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
];

fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(name) || name == "keep-alive" || name == "proxy-connection"
}

/// Is this a header by which a client could claim an identity or a network position that
/// the notebook (or code in it) might believe? Only the edge sets such headers.
pub fn is_identity_header(name: &str) -> bool {
    name == "forwarded"
        || name.starts_with("x-forwarded-")
        || name.starts_with("x-remote-")
        || name.starts_with("x-auth-request-")
        || name.starts_with("x-marina-")
        || matches!(
            name,
            "x-real-ip"
                | "remote-user"
                | "x-user"
                | "x-email"
                | "x-client-ip"
                | "true-client-ip"
                | "x-request-id"
        )
}

/// Marimo's header naming the notebook file a `/public/<f>` request is for. Marimo's service
/// worker sets it from the page; Marimo serves `<that file's directory>/public/<f>`, and in
/// edit mode first adds whatever path it names to its allowed files. Without it Marimo answers
/// 404, so the edge does not drop it but always sets it itself, to [`OWN_FILE_KEY`].
pub const NOTEBOOK_ID_HEADER: HeaderName = HeaderName::from_static("x-notebook-id");

/// The notebook's own file as a Marimo file key. Both runtimes start `marimo edit` in the
/// notebook's directory on its `notebook.py` (local: `DATA_DIR/notebooks/<ID>/`, Kubernetes:
/// `/work`), and Marimo resolves a relative key against its working directory, so this names
/// that file and no other, without the edge knowing where the runtime keeps it.
pub const OWN_FILE_KEY: HeaderValue = HeaderValue::from_static("notebook.py");

/// Does a browser's request header go upstream? Not hop-by-hop ones (nor those its
/// `Connection` names, see [`ConnectionTokens`]), not its `Authorization` (the browser's
/// credentials are for the edge, not the notebook), no identity claim, and not
/// `X-Notebook-Id` (the edge sets it, see [`NOTEBOOK_ID_HEADER`]). The edge's cookie is taken
/// out of `Cookie` separately ([`for_each_kept_cookie`]).
pub fn request_header_forwarded(name: &HeaderName) -> bool {
    !(is_hop_by_hop(name)
        || name == header::AUTHORIZATION
        || name == NOTEBOOK_ID_HEADER
        || is_identity_header(name.as_str()))
}

/// Does an upstream response header go to the browser? Not hop-by-hop ones, not Marimo's own
/// session cookie (`Set-Cookie: session_*`, its credential), no upstream CORS and no
/// `X-Frame-Options` (the edge's `frame-ancestors` decides framing).
pub fn response_header_forwarded(name: &HeaderName, value: &[u8]) -> bool {
    !(is_hop_by_hop(name)
        || name.as_str().starts_with("access-control-")
        || name == header::X_FRAME_OPTIONS
        || (name == header::SET_COOKIE && value.starts_with(b"session_")))
}

/// What a message's `Connection` header says: close, keep-alive, and the other headers it
/// names as hop-by-hop (rare; no allocation without them).
#[derive(Default)]
pub struct ConnectionTokens {
    pub close: bool,
    pub keep_alive: bool,
    named: Vec<HeaderName>,
}

impl ConnectionTokens {
    pub fn of<'a, V: AsRef<[u8]> + 'a>(values: impl Iterator<Item = V>) -> ConnectionTokens {
        let mut t = ConnectionTokens::default();
        for v in values {
            for token in v.as_ref().split(|&b| b == b',') {
                let token = token.trim_ascii();
                if token.is_empty() {
                    continue;
                }
                if token.eq_ignore_ascii_case(b"close") {
                    t.close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    t.keep_alive = true;
                } else if let Ok(n) = HeaderName::from_bytes(token) {
                    if !is_hop_by_hop(&n) {
                        t.named.push(n);
                    }
                }
            }
        }
        t
    }

    /// Does `Connection` name this header (so it is hop-by-hop too)?
    pub fn names(&self, name: &HeaderName) -> bool {
        !self.named.is_empty() && self.named.contains(name)
    }
}

/// Calls `f` with each `name=value` pair of the `Cookie` headers that is not one of the edge's
/// cookies (`names`), trimmed. A `Cookie` header that is not text is dropped whole.
pub fn for_each_kept_cookie(headers: &HeaderMap, names: &[&str], mut f: impl FnMut(&str)) {
    for v in headers.get_all(header::COOKIE) {
        let Ok(v) = v.to_str() else { continue };
        for pair in v.split(';') {
            // Cookie whitespace is ASCII (RFC 6265 §4.2.1).
            let pair = pair.trim_ascii();
            if pair.is_empty() {
                continue;
            }
            let name = pair.split_once('=').map_or(pair, |(n, _)| n).trim_ascii();
            if !names.contains(&name) {
                f(pair);
            }
        }
    }
}

/// The id the edge gives each forwarded request (`X-Request-Id`): a random per-process prefix
/// and a counter, formatted only when written.
#[derive(Debug, Clone, Copy)]
pub struct RequestId {
    pub prefix: u32,
    pub n: u64,
}

impl RequestId {
    /// Appends the id (`{prefix:08x}-{n:x}`) without going through `fmt` (hot path).
    pub fn write_to(&self, out: &mut Vec<u8>) {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        for shift in (0..8).rev() {
            out.push(HEX[(self.prefix >> (shift * 4)) as usize & 0xf]);
        }
        out.push(b'-');
        let digits = (64 - (self.n | 1).leading_zeros()).div_ceil(4);
        for shift in (0..digits).rev() {
            out.push(HEX[(self.n >> (shift * 4)) as usize & 0xf]);
        }
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:08x}-{:x}", self.prefix, self.n)
    }
}

/// Per-request facts the header rewrite needs.
pub struct ForwardInfo<'a> {
    /// The browser connection's peer address, as `X-Forwarded-For` carries it.
    pub forwarded_for: &'a HeaderValue,
    pub proto: &'static str,
    pub host: Option<&'a HeaderValue>,
    pub request_id: RequestId,
}
