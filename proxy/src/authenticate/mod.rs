//! Phase 2, `authenticate`: who is asking. The ONLY phase that sees raw credentials.
//!
//! Runs after `route`, on every request:
//! - On the handshake path it redeems the one-time URL token ([`token`], [`replay`]) and answers
//!   the redirect that sets the session cookie itself; nothing under the handshake path is ever
//!   forwarded.
//! - Everywhere else it opens the session cookie ([`cookie`]) and checks it against the current
//!   route (same notebook, same session, member still owner or viewer, not expired).
//!
//! It returns a verified [`Identity`] — member, notebook, session and mode — and later phases
//! see only that. Errors are 401 (no/invalid/expired/stale credentials), 403 (another notebook,
//! no access), 409 (link already used) or 502 (shared replay store unreachable).

pub mod cookie;
pub mod replay;
pub mod token;

use std::fmt::Write as _;

use http::{header, HeaderMap, HeaderValue};
use marina_config::addressing::AddressingMode;
use marina_config::settings::SameSite;
use marina_config::wire::AccessMode;
use marina_config::{Id, Settings};

use crate::error::{EdgeError, ErrorKind};
use crate::route::{Located, RouteEntry};
use cookie::{CookieKeys, SessionClaims};
use replay::ReplayStore;
use token::TokenVerifier;

/// A verified caller. Carries no credential.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Identity {
    pub member: Id,
    pub notebook: Id,
    /// The notebook's session (run) id this identity is valid for.
    pub session: Id,
    pub mode: AccessMode,
}

/// The result of a successful handshake: where to send the browser and the cookie to set.
pub struct Handshake {
    pub identity: Identity,
    pub location: String,
    pub set_cookie: HeaderValue,
}

pub struct Authenticator {
    pub verifier: TokenVerifier,
    pub keys: CookieKeys,
    pub replay: ReplayStore,
    /// The cookie's name as the browser sends it (`__Host-` prefixed when applicable).
    cookie_name: String,
    /// `; HttpOnly; SameSite=…[; Secure][; Partitioned]`, fixed at start.
    cookie_attrs: String,
    mode: AddressingMode,
    lifetime: u64,
    handshake_path: String,
}

// === impl Authenticator ===

impl Authenticator {
    pub fn new(
        settings: &Settings,
        verifier: TokenVerifier,
        keys: CookieKeys,
        replay: ReplayStore,
    ) -> Authenticator {
        let https = settings.proxy_is_https();
        let mode = settings.proxy.addressing;
        let base = &settings.proxy.cookie.name;
        // `__Host-` requires Secure, Path=/ and no Domain: only possible per notebook origin.
        let cookie_name = if mode == AddressingMode::Subdomain && https {
            format!("__Host-{base}")
        } else {
            base.clone()
        };
        let mut cookie_attrs = String::from("; HttpOnly; SameSite=");
        cookie_attrs.push_str(match settings.proxy.cookie.same_site {
            SameSite::Strict => "Strict",
            SameSite::Lax => "Lax",
            SameSite::None => "None",
        });
        if https || settings.proxy.cookie.same_site == SameSite::None {
            cookie_attrs.push_str("; Secure");
        }
        if settings.proxy.cookie.same_site == SameSite::None {
            // Third-party iframes only get cookies when partitioned per top-level site (CHIPS).
            cookie_attrs.push_str("; Partitioned");
        }
        Authenticator {
            verifier,
            keys,
            replay,
            cookie_name,
            cookie_attrs,
            mode,
            lifetime: settings.proxy.cookie.lifetime_seconds,
            handshake_path: settings.proxy.handshake_path.clone(),
        }
    }

    pub fn cookie_name(&self) -> &str {
        &self.cookie_name
    }

    /// Redeems the URL token of a handshake request.
    ///
    /// Order matters: everything that can be checked locally is checked before the token is
    /// marked used, so a token refused for another reason is not burnt.
    pub async fn handshake(
        &self,
        loc: &Located,
        path: &str,
        query: Option<&str>,
        route: Option<&RouteEntry>,
        now: u64,
    ) -> Result<Handshake, EdgeError> {
        if path[loc.base_len..] != self.handshake_path {
            return Err(EdgeError::new(
                ErrorKind::NotFound,
                "under the handshake path",
            ));
        }
        let mut token = None;
        let mut next = None;
        for pair in query.unwrap_or("").split('&') {
            match pair.split_once('=') {
                Some(("token", v)) => token = Some(v),
                Some(("next", v)) => next = Some(v),
                _ => {}
            }
        }
        let token = token.ok_or_else(|| EdgeError::new(ErrorKind::LinkMissing, "handshake"))?;
        let claims = self.verifier.verify(token)?;
        if claims.nb != loc.notebook {
            return Err(EdgeError::new(ErrorKind::LinkOtherNotebook, "handshake"));
        }
        let route = route.ok_or_else(|| EdgeError::new(ErrorKind::NotRunning, "handshake"))?;
        if claims.sid != route.route.session_id {
            return Err(EdgeError::new(ErrorKind::LinkStaleSession, "handshake"));
        }
        let mode = effective_mode(claims.mode, route.access(claims.sub))
            .ok_or_else(|| EdgeError::new(ErrorKind::NoAccess, "handshake"))?;
        self.replay.redeem(&claims.jti, claims.exp, now).await?;

        let identity = Identity {
            member: claims.sub,
            notebook: claims.nb,
            session: claims.sid,
            mode,
        };
        let root = root_path(&path[..loc.base_len]);
        let location = match next.and_then(|n| valid_next(n, &root, &self.handshake_path)) {
            Some(n) => n,
            None => root.clone(),
        };
        let value = self.keys.seal(&SessionClaims {
            member: identity.member,
            notebook: identity.notebook,
            session: identity.session,
            mode,
            expires: now + self.lifetime,
        });
        let c = self.set_cookie_line(&value, &path[..loc.base_len]);
        let mut set_cookie = HeaderValue::try_from(c)
            .map_err(|e| EdgeError::new(ErrorKind::Internal, "set-cookie").with_cause(e))?;
        set_cookie.set_sensitive(true);
        Ok(Handshake {
            identity,
            location,
            set_cookie,
        })
    }

    /// The `Set-Cookie` line for a sealed value; `base` is the notebook's path prefix (path mode).
    fn set_cookie_line(&self, value: &str, base: &str) -> String {
        let cookie_path = match self.mode {
            AddressingMode::Path => base,
            AddressingMode::Subdomain => "/",
        };
        let mut c = String::with_capacity(200);
        let _ = write!(
            c,
            "{}={}; Path={}; Max-Age={}{}",
            self.cookie_name, value, cookie_path, self.lifetime, self.cookie_attrs
        );
        c
    }

    /// Opens the session cookie of an ordinary request and checks it against the route.
    pub fn session(
        &self,
        headers: &HeaderMap,
        loc: &Located,
        route: &RouteEntry,
        now: u64,
    ) -> Result<Identity, EdgeError> {
        let mut seen_any = false;
        let mut other_notebook = false;
        let mut found = None;
        'outer: for h in headers.get_all(header::COOKIE) {
            let Ok(h) = h.to_str() else { continue };
            for pair in h.split(';') {
                if let Some(v) = cookie::cookie_value(pair, &self.cookie_name) {
                    seen_any = true;
                    match self.keys.open(v) {
                        Ok(c) if c.notebook == loc.notebook => {
                            found = Some(c);
                            break 'outer;
                        }
                        Ok(_) => other_notebook = true,
                        Err(_) => {}
                    }
                }
            }
        }
        let c = match found {
            Some(c) => c,
            None if other_notebook => {
                return Err(EdgeError::new(ErrorKind::SessionOtherNotebook, "cookie"))
            }
            None if seen_any => return Err(EdgeError::new(ErrorKind::SessionInvalid, "cookie")),
            None => return Err(EdgeError::new(ErrorKind::NoSession, "cookie")),
        };
        if c.expires <= now {
            return Err(EdgeError::new(ErrorKind::SessionExpired, "cookie"));
        }
        if c.session != route.route.session_id {
            return Err(EdgeError::new(ErrorKind::SessionStale, "cookie"));
        }
        let mode = effective_mode(c.mode, route.access(c.member))
            .ok_or_else(|| EdgeError::new(ErrorKind::NoAccess, "cookie"))?;
        Ok(Identity {
            member: c.member,
            notebook: c.notebook,
            session: c.session,
            mode,
        })
    }

    /// Is this identity still valid under the (possibly new) route? Used by open WebSockets
    /// when the route table changes.
    pub fn still_valid(identity: &Identity, route: Option<&RouteEntry>) -> bool {
        match route {
            Some(r) => {
                r.route.session_id == identity.session
                    && effective_mode(identity.mode, r.access(identity.member))
                        == Some(identity.mode)
            }
            None => false,
        }
    }
}

/// The mode a member gets: what the credential says, but never more than the route grants
/// (an `edit` credential of someone who is no longer the owner is refused, not downgraded, as
/// the control plane only mints `edit` for the owner).
fn effective_mode(claimed: AccessMode, granted: Option<AccessMode>) -> Option<AccessMode> {
    match (claimed, granted?) {
        (AccessMode::Edit, AccessMode::Edit) => Some(AccessMode::Edit),
        (AccessMode::Edit, AccessMode::View) => None,
        (AccessMode::View, _) => Some(AccessMode::View),
    }
}

/// `/notebooks/<ID>/` in path mode, `/` in subdomain mode.
fn root_path(base: &str) -> String {
    format!("{base}/")
}

/// Accepts `next` only as a same-origin path under the notebook root, outside the handshake
/// path, without tricks (`//host`, backslashes, encoded slashes, control characters).
fn valid_next(raw: &str, root: &str, handshake_path: &str) -> Option<String> {
    if raw.len() > 2048 {
        return None;
    }
    let n = percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .ok()?;
    if !n.starts_with(root)
        || n.starts_with("//")
        || n.contains('\\')
        || n.contains("/../")
        || n.ends_with("/..")
        || n.chars().any(|c| c.is_control() || c == ' ')
    {
        return None;
    }
    let rest = &n[root.len() - 1..];
    if rest == handshake_path
        || rest.starts_with(&format!("{handshake_path}/"))
        || rest.starts_with(&format!("{handshake_path}?"))
    {
        return None;
    }
    // Re-check that the path does not become protocol-relative after the root (`/` root).
    if rest.starts_with("//") {
        return None;
    }
    Some(n.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_is_same_origin_under_the_root() {
        let r = "/notebooks/A1B2C3D4E5/";
        let hp = "/_auth";
        assert_eq!(
            valid_next("/notebooks/A1B2C3D4E5/?kiosk=true", r, hp).as_deref(),
            Some("/notebooks/A1B2C3D4E5/?kiosk=true")
        );
        for bad in [
            "https://evil.example/",
            "//evil.example/",
            "/notebooks/OTHERNOTE1/",
            "/notebooks/A1B2C3D4E5/_auth?token=x",
            "/notebooks/A1B2C3D4E5/../OTHERNOTE1/",
            "/notebooks/A1B2C3D4E5/%0d%0aSet-Cookie:x",
            "%2F%2Fevil.example",
            "/notebooks/A1B2C3D4E5\\evil",
        ] {
            assert_eq!(valid_next(bad, r, hp), None, "{bad}");
        }
        assert_eq!(valid_next("//evil", "/", hp), None);
        assert_eq!(valid_next("/x", "/", hp).as_deref(), Some("/x"));
    }

    fn authenticator(edit: impl FnOnce(&mut Settings)) -> Authenticator {
        let mut s = Settings::default();
        edit(&mut s);
        s.validate().unwrap();
        let verifier = TokenVerifier::new(Default::default(), "i", "a", 0);
        let dir = tempfile::tempdir().unwrap();
        let replay =
            ReplayStore::Memory(replay::MemoryReplay::open(dir.path().join("j"), 0).unwrap());
        Authenticator::new(&s, verifier, CookieKeys::new(&[[1; 32]]).unwrap(), replay)
    }

    #[test]
    fn cookie_attributes_follow_mode_scheme_and_same_site() {
        let a = authenticator(|_| {});
        assert_eq!(
            a.set_cookie_line("V", "/notebooks/A1B2C3D4E5"),
            "marina=V; Path=/notebooks/A1B2C3D4E5; Max-Age=43200; HttpOnly; SameSite=Strict"
        );
        let a = authenticator(|s| {
            s.proxy.addressing = AddressingMode::Subdomain;
            s.proxy.public_url = "https://nb.example.com".into();
        });
        assert_eq!(
            a.set_cookie_line("V", ""),
            "__Host-marina=V; Path=/; Max-Age=43200; HttpOnly; SameSite=Strict; Secure"
        );
        let a = authenticator(|s| {
            s.proxy.addressing = AddressingMode::Subdomain;
            s.proxy.public_url = "https://nb.example.com".into();
            s.proxy.cookie.same_site = SameSite::None;
        });
        assert!(a
            .set_cookie_line("V", "")
            .ends_with("SameSite=None; Secure; Partitioned"));
        let a = authenticator(|s| {
            s.proxy.public_url = "https://edge.example.com".into();
            s.proxy.cookie.same_site = SameSite::Lax;
        });
        assert_eq!(
            a.set_cookie_line("V", "/notebooks/A1B2C3D4E5"),
            "marina=V; Path=/notebooks/A1B2C3D4E5; Max-Age=43200; HttpOnly; SameSite=Lax; Secure"
        );
        // Subdomain mode over plain http cannot use `__Host-` (it requires Secure).
        let a = authenticator(|s| {
            s.proxy.addressing = AddressingMode::Subdomain;
            s.proxy.public_url = "http://nb.localhost:8000".into();
        });
        assert!(a.set_cookie_line("V", "").starts_with("marina=V; Path=/;"));
    }

    #[test]
    fn modes() {
        use AccessMode::*;
        assert_eq!(effective_mode(Edit, Some(Edit)), Some(Edit));
        assert_eq!(effective_mode(Edit, Some(View)), None);
        assert_eq!(effective_mode(View, Some(Edit)), Some(View));
        assert_eq!(effective_mode(View, None), None);
    }
}
