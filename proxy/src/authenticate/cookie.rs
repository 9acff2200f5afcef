//! The edge's session cookie: sealed (AES-256-GCM), self-contained, verifiable by any replica.
//!
//! Layout of the value, before base64url (no padding):
//!
//! ```text
//! version (1) | nonce (12) | AES-256-GCM( member (10) | notebook (10) | session (10) | mode (1) | expires, unix s, BE (8) ) + tag (16)
//! ```
//!
//! 68 bytes, 91 characters. The version byte is also the AEAD's associated data, so it cannot be
//! swapped. Keys come from configuration (`proxy.cookie.keys`, hex; the first seals, every one
//! opens, for rotation) or from `DATA_DIR/cookie-key`. The AES keys and the key that binds Marimo
//! session ids to members (owned by `authorize`, [`crate::authorize::SessionBinding`]) are both
//! derived here from the configured keys with HKDF, so one secret never serves two algorithms
//! directly.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use marina_config::wire::AccessMode;
use marina_config::Id;
use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use ring::{hkdf, hmac};

const VERSION: u8 = 1;
const PLAIN_LEN: usize = 10 + 10 + 10 + 1 + 8;
const SEALED_LEN: usize = 1 + NONCE_LEN + PLAIN_LEN + 16;
const SALT: &[u8] = b"marina-edge-cookie-v1";

/// What a session cookie says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionClaims {
    pub member: Id,
    pub notebook: Id,
    /// The notebook's session (run) id at the handshake.
    pub session: Id,
    pub mode: AccessMode,
    /// Unix seconds.
    pub expires: u64,
}

/// Why a cookie did not open. Mapped to an `EdgeError` by the authenticate phase.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum CookieError {
    #[error("cookie does not open")]
    Invalid,
}

/// The sealing keys.
pub struct CookieKeys {
    /// First seals; all open.
    keys: Vec<LessSafeKey>,
    rng: SystemRandom,
}

// === impl CookieKeys ===

impl CookieKeys {
    /// Builds keys from 32-byte secrets (the first is the current one).
    pub fn new(secrets: &[[u8; 32]]) -> Option<CookieKeys> {
        secrets.first()?;
        let keys = secrets
            .iter()
            .map(|s| {
                let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, SALT).extract(s);
                let okm = prk
                    .expand(&[b"seal"], &aead::AES_256_GCM)
                    .expect("32 bytes is within HKDF's output limit");
                LessSafeKey::new(UnboundKey::from(okm))
            })
            .collect();
        Some(CookieKeys {
            keys,
            rng: SystemRandom::new(),
        })
    }

    /// Parses hex secrets (64 hex characters each).
    pub fn from_hex(hex: &[String]) -> Option<CookieKeys> {
        CookieKeys::new(&parse_secrets(hex)?)
    }

    /// Seals claims into a cookie value.
    pub fn seal(&self, c: &SessionClaims) -> String {
        let mut out = Vec::with_capacity(SEALED_LEN);
        out.push(VERSION);
        let mut nonce = [0u8; NONCE_LEN];
        // The OS RNG does not fail on supported platforms; a zero nonce would still be unique
        // enough for one cookie but we never reach it in practice.
        let _ = self.rng.fill(&mut nonce);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(c.member.as_str().as_bytes());
        out.extend_from_slice(c.notebook.as_str().as_bytes());
        out.extend_from_slice(c.session.as_str().as_bytes());
        out.push(match c.mode {
            AccessMode::Edit => b'e',
            AccessMode::View => b'v',
        });
        out.extend_from_slice(&c.expires.to_be_bytes());
        let (head, body) = out.split_at_mut(1 + NONCE_LEN);
        let tag = self.keys[0]
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&head[..1]),
                body,
            )
            .expect("sealing a short buffer cannot fail");
        out.extend_from_slice(tag.as_ref());
        URL_SAFE_NO_PAD.encode(out)
    }

    /// Opens a cookie value. Does not check expiry or notebook: the caller does, so it can say
    /// which one failed.
    pub fn open(&self, value: &str) -> Result<SessionClaims, CookieError> {
        if value.len() > 128 {
            return Err(CookieError::Invalid);
        }
        let raw = URL_SAFE_NO_PAD
            .decode(value)
            .map_err(|_| CookieError::Invalid)?;
        if raw.len() != SEALED_LEN || raw[0] != VERSION {
            return Err(CookieError::Invalid);
        }
        for key in &self.keys {
            let mut buf = [0u8; SEALED_LEN];
            buf.copy_from_slice(&raw);
            let (head, body) = buf.split_at_mut(1 + NONCE_LEN);
            let nonce =
                Nonce::try_assume_unique_for_key(&head[1..]).map_err(|_| CookieError::Invalid)?;
            if let Ok(plain) = key.open_in_place(nonce, Aad::from(&head[..1]), body) {
                return decode_plain(plain);
            }
        }
        Err(CookieError::Invalid)
    }
}

/// The key that binds Marimo session ids to members ([`crate::authorize::SessionBinding`]),
/// derived from the current (first) configured secret beside the sealing keys.
pub fn session_binding_key(current: &[u8; 32]) -> hmac::Key {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, SALT).extract(current);
    hmac::Key::from(
        prk.expand(&[b"marimo-session"], hmac::HMAC_SHA256)
            .expect("HMAC key length is within HKDF's output limit"),
    )
}

/// Parses hex secrets (64 hex characters each; the first is the current one). `None` when one
/// is malformed or there is none.
pub fn parse_secrets(hex: &[String]) -> Option<Vec<[u8; 32]>> {
    let mut secrets = Vec::with_capacity(hex.len());
    for h in hex {
        secrets.push(parse_hex32(h.trim())?);
    }
    (!secrets.is_empty()).then_some(secrets)
}

fn decode_plain(p: &[u8]) -> Result<SessionClaims, CookieError> {
    let id = |r: std::ops::Range<usize>| Id::parse_bytes(&p[r]).map_err(|_| CookieError::Invalid);
    let mode = match p[30] {
        b'e' => AccessMode::Edit,
        b'v' => AccessMode::View,
        _ => return Err(CookieError::Invalid),
    };
    Ok(SessionClaims {
        member: id(0..10)?,
        notebook: id(10..20)?,
        session: id(20..30)?,
        mode,
        expires: u64::from_be_bytes(p[31..39].try_into().map_err(|_| CookieError::Invalid)?),
    })
}

/// Parses 64 hex characters into 32 bytes.
pub fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    let b = s.as_bytes();
    if b.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        let hi = (b[2 * i] as char).to_digit(16)?;
        let lo = (b[2 * i + 1] as char).to_digit(16)?;
        *o = (hi * 16 + lo) as u8;
    }
    Some(out)
}

/// Does `name=value` pair `pair` (from a `Cookie` header) carry cookie `name`? Returns the value.
/// Whitespace around names and values is ASCII (RFC 6265 §4.2.1), so the ASCII trims do.
pub fn cookie_value<'a>(pair: &'a str, name: &str) -> Option<&'a str> {
    let (n, v) = pair.split_once('=')?;
    (n.trim_ascii() == name).then(|| v.trim_ascii().trim_matches('"'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> Id {
        Id::parse(s).unwrap()
    }

    fn claims() -> SessionClaims {
        SessionClaims {
            member: id("MEMBER0001"),
            notebook: id("NOTEBOOK01"),
            session: id("SESSION001"),
            mode: AccessMode::View,
            expires: 1_900_000_000,
        }
    }

    #[test]
    fn seals_and_opens_with_rotation() {
        let old = CookieKeys::new(&[[1; 32]]).unwrap();
        let rotated = CookieKeys::new(&[[2; 32], [1; 32]]).unwrap();
        let v = old.seal(&claims());
        assert_eq!(v.len(), 91);
        assert_eq!(
            rotated.open(&v),
            Ok(claims()),
            "old cookies open after rotation"
        );
        let v2 = rotated.seal(&claims());
        assert_eq!(
            old.open(&v2),
            Err(CookieError::Invalid),
            "new key unknown to old"
        );
        assert_ne!(
            old.seal(&claims()),
            old.seal(&claims()),
            "fresh nonce each time"
        );
    }

    #[test]
    fn tampering_is_detected() {
        let k = CookieKeys::new(&[[7; 32]]).unwrap();
        let v = k.seal(&claims());
        let mut raw = URL_SAFE_NO_PAD.decode(&v).unwrap();
        for i in [0, 5, 20, 40, raw.len() - 1] {
            raw[i] ^= 1;
            assert!(k.open(&URL_SAFE_NO_PAD.encode(&raw)).is_err(), "byte {i}");
            raw[i] ^= 1;
        }
        assert!(k.open("").is_err());
        assert!(k.open("not base64 !!").is_err());
        assert!(k.open(&v[..v.len() - 2]).is_err());
    }

    #[test]
    fn hex_and_cookie_pairs() {
        assert_eq!(parse_hex32(&"ab".repeat(32)), Some([0xab; 32]));
        assert_eq!(parse_hex32("abc"), None);
        assert_eq!(parse_hex32(&"zz".repeat(32)), None);
        assert_eq!(cookie_value(" marina=abc", "marina"), Some("abc"));
        assert_eq!(cookie_value("marinax=abc", "marina"), None);
    }
}
