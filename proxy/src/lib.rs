//! `marina-proxy`: the edge between browsers and the per-notebook Marimo servers.
//!
//! Every request passes named phases, each a module with its own tests, sharing one
//! per-request context (see `docs/request-lifecycle.md`):
//!
//! - [`route`]: host or path → notebook id and route entry; the routing table (lock-free swap).
//! - [`authenticate`]: the only phase that sees raw credentials — redeems the one-time URL token
//!   in the handshake ([`authenticate::token`], [`authenticate::replay`]) or opens the sealed
//!   session cookie ([`authenticate::cookie`]) — and yields a verified identity.
//! - [`authorize`]: owner edits, viewers get the read-only allow-list; Marimo session ids are
//!   bound to the member ([`authorize::SessionBinding`]); `/auth/*` refused for everyone.
//! - [`forward`]: streams HTTP to the notebook with credentials swapped ([`forward::body`]: the
//!   response body type); [`ws`] relays WebSockets frame by frame with no buffer held while idle.
//! - [`activity`]: the per-notebook in-memory counters the hot path bumps (no I/O).
//!
//! Around them:
//! - [`error`]: [`EdgeError`], the one request error type, and [`ProxyError`] for start-up.
//! - [`respond`]: what the edge answers itself (error pages, redirects, the handshake's
//!   answer) and the security headers every response gets, added in one place.
//! - [`uplink`]: the control plane's internal API ([`uplink::client`]), the routes feed or file
//!   ([`uplink::feed`]) and the activity reporter ([`uplink::report`]).
//! - [`metrics`], [`admin`]: Prometheus metrics and the admin listener. [`tls`]: rustls with
//!   certificate reload.
//! - `pipeline`: the phases in order for one request (`RequestCtx`, the request's facts
//!   computed once); `edge`: [`Edge::new`] (building) and [`Edge::serve`] (accept, TLS, drain).
//!
//! # Dependency order
//!
//! The modules form one line; each imports (`use crate::…`) only modules below it, never one
//! above (test modules aside), so there is no import circle:
//!
//! ```text
//! edge → pipeline → tls → admin → respond → ws → forward → authorize → authenticate
//!      → uplink → route → activity → metrics → error
//! ```
//!
//! Inside a module the files form a line too (`forward`: `mod.rs` → `body` → `h1` → `headers`,
//! `chunked`; `ws`: `handshake` → `relay` → `frame`; `uplink`: `feed`, `report` → `client`).
//! The test below checks the line from the `use crate::` lines of every file (the same as
//! `grep -rn '^use crate::' proxy/src`, each file's module against its imports).
#![forbid(unsafe_code)]

pub mod activity;
pub mod admin;
pub mod authenticate;
pub mod authorize;
mod edge;
pub mod error;
pub mod forward;
pub mod metrics;
mod pipeline;
pub mod respond;
pub mod route;
pub mod tls;
pub mod uplink;
pub mod ws;

pub use edge::Edge;
pub use error::{EdgeError, ErrorKind, ProxyError};

#[cfg(test)]
mod tests {
    use std::path::Path;

    /// The dependency order of the module doc, bottom first.
    const ORDER: &[&str] = &[
        "error",
        "metrics",
        "activity",
        "route",
        "uplink",
        "authenticate",
        "authorize",
        "forward",
        "ws",
        "respond",
        "admin",
        "tls",
        "pipeline",
        "edge",
    ];

    fn rank(module: &str) -> usize {
        ORDER
            .iter()
            .position(|m| *m == module)
            .unwrap_or_else(|| panic!("module {module} is not in the dependency order"))
    }

    fn files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                files(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }

    #[test]
    fn no_module_imports_one_above_it() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut all = Vec::new();
        files(&src, &mut all);
        for path in all {
            let rel = path.strip_prefix(&src).unwrap();
            let first = rel.iter().next().unwrap().to_str().unwrap();
            let module = first.strip_suffix(".rs").unwrap_or(first);
            if module == "lib" {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            // Test modules may reach up (a forward test checks a response as the browser gets it).
            let code = text.split("#[cfg(test)]").next().unwrap();
            for line in code.lines() {
                let Some(rest) = line.trim_start().strip_prefix("use crate::") else {
                    continue;
                };
                let dep: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                assert!(
                    rank(&dep) <= rank(module),
                    "{} ({module}) imports {dep}, which is above it",
                    rel.display()
                );
            }
        }
    }
}
