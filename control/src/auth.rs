//! Who is calling: API keys for members, the internal token for edges.
//!
//! Authentication is an extractor, so a handler that takes a [`Principal`] (or [`Edge`])
//! cannot run for an unauthenticated request. The two credentials never overlap: the internal
//! token is not an API key (it hashes to nothing in `api_keys`), and [`Edge`] compares only
//! against the internal token, so a member's key is refused on `/internal/v1/*` and the edge's
//! token on the public API.
//!
//! API keys are `mk_` + 43 characters of URL-safe base64 (256 random bits). Only the SHA-256
//! of a key is stored; a lookup hashes the presented secret and finds the row by its unique
//! hash, so comparing secrets never happens in Rust and leaks no timing about them.

use crate::error::{ApiError, StoreError};
use crate::model::{ApiKey, Role};
use crate::state::AppState;
use crate::store::keys::{self, StoredSecret};
use crate::store::notebooks::Viewer;
use crate::store::Db;
use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use base64::Engine;
use marina_config::Id;
use rand::RngCore;
use sha2::{Digest, Sha256};

/// An authenticated member.
#[derive(Clone, Debug)]
pub struct Principal {
    pub member_id: Id,
    pub org_id: Id,
    pub role: Role,
    /// Teams the member belongs to, sorted.
    pub team_ids: Vec<Id>,
    /// The key used (rate limits are per key).
    pub key_id: Id,
}

impl Principal {
    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }

    pub fn in_team(&self, team: Id) -> bool {
        self.team_ids.binary_search(&team).is_ok()
    }

    /// What the store's visibility clause needs of the caller.
    pub fn viewer(&self) -> Viewer {
        Viewer {
            org_id: self.org_id,
            member_id: self.member_id,
            admin: self.is_admin(),
        }
    }

    /// 403 unless the caller is an org admin.
    pub fn require_admin(&self) -> Result<(), ApiError> {
        if self.is_admin() {
            Ok(())
        } else {
            Err(ApiError::Forbidden("only organization admins may do this"))
        }
    }
}

/// A new API key secret.
pub fn new_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    format!(
        "mk_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

/// What is stored for a secret.
pub fn hash_secret(secret: &str) -> String {
    let digest = Sha256::digest(secret.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// The visible start of a secret (`mk_AbCdEfGh`), for listing keys.
pub fn secret_prefix(secret: &str) -> String {
    secret.chars().take(11).collect()
}

fn bearer(parts: &Parts) -> Option<&str> {
    let value = parts.headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = token.trim();
    (!token.is_empty()).then_some(token)
}

impl FromRequestParts<AppState> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let secret = bearer(parts).ok_or(ApiError::Unauthenticated)?;
        // Cheap shape check first: garbage never reaches the database.
        if !secret.starts_with("mk_") || secret.len() > 128 {
            return Err(ApiError::Unauthenticated);
        }
        let principal = lookup_key(state, &hash_secret(secret))
            .await?
            .ok_or(ApiError::Unauthenticated)?;
        if !state.limiter.allow(principal.key_id) {
            return Err(ApiError::RateLimited);
        }
        Ok(principal)
    }
}

/// One round trip: the key, its member and the member's teams.
async fn lookup_key(state: &AppState, hash: &str) -> Result<Option<Principal>, ApiError> {
    Ok(keys::lookup(&state.db, hash).await?.map(|k| Principal {
        key_id: k.key_id,
        member_id: k.member_id,
        org_id: k.org_id,
        role: k.role,
        team_ids: k.team_ids,
    }))
}

/// Issues a new API key for `member`: stores its hash, returns its metadata and the secret
/// (shown this once).
pub async fn issue_key(
    db: &Db,
    member: Id,
    name: &str,
    created_by: Option<Id>,
) -> Result<(ApiKey, String), StoreError> {
    let secret = new_secret();
    let hash = hash_secret(&secret);
    let prefix = secret_prefix(&secret);
    let key = keys::insert(
        db,
        member,
        name,
        StoredSecret {
            hash: &hash,
            prefix: &prefix,
        },
        created_by,
    )
    .await?;
    Ok((key, secret))
}

/// An authenticated edge replica (the internal token).
#[derive(Clone, Copy, Debug)]
pub struct Edge;

impl FromRequestParts<AppState> for Edge {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = bearer(parts).ok_or(ApiError::Unauthenticated)?;
        if constant_time_eq(token.as_bytes(), state.internal_token.as_bytes()) {
            Ok(Edge)
        } else {
            Err(ApiError::Unauthenticated)
        }
    }
}

/// Compares without an early exit, so the time taken says nothing about where they differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_and_hashes() {
        let s = new_secret();
        assert!(s.starts_with("mk_") && s.len() == 46, "{s}");
        assert_ne!(s, new_secret());
        assert_eq!(hash_secret(&s).len(), 64);
        assert_eq!(hash_secret(&s), hash_secret(&s));
    }

    #[test]
    fn eq() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
