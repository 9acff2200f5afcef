//! Verification of the one-time URL token (a JWT signed by the control plane with Ed25519).
//!
//! The edge holds public keys only, selected by the header's `kid`, and accepts exactly one
//! algorithm, `EdDSA`: a token with `alg: none`, an HMAC algorithm (the classic "public key as
//! HMAC secret" confusion) or RSA/ECDSA is refused before any key is touched.

use std::collections::HashMap;

use jsonwebtoken::errors::ErrorKind as JwtError;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use marina_config::wire::UrlClaims;
use marina_config::Settings;

use crate::error::{EdgeError, ErrorKind, ProxyError};

/// Longest token considered; anything longer is not ours.
const MAX_TOKEN_LEN: usize = 4096;

pub struct TokenVerifier {
    keys: HashMap<String, DecodingKey>,
    validation: Validation,
}

// === impl TokenVerifier ===

impl TokenVerifier {
    /// Loads the configured public keys (`tokens.public_keys`), or the public half of the
    /// control plane's signing key in the data directory under `tokens.signing_key_id`.
    pub fn from_settings(s: &Settings) -> Result<TokenVerifier, ProxyError> {
        let mut files = Vec::new();
        if s.tokens.public_keys.is_empty() {
            files.push((
                s.tokens.signing_key_id.clone(),
                s.data_dir.join("keys").join("url-signing.pub.pem"),
            ));
        } else {
            for k in &s.tokens.public_keys {
                files.push((k.kid.clone(), k.file.clone()));
            }
        }
        let mut keys = HashMap::new();
        for (kid, path) in files {
            let pem = std::fs::read(&path).map_err(|source| ProxyError::File {
                what: "URL token public key",
                path: path.clone(),
                source,
            })?;
            let key = DecodingKey::from_ed_pem(&pem).map_err(|e| ProxyError::Key {
                what: "Ed25519 public key (SPKI PEM)",
                path: path.display().to_string(),
                message: e.to_string(),
            })?;
            keys.insert(kid, key);
        }
        Ok(TokenVerifier::new(
            keys,
            &s.tokens.issuer,
            &s.tokens.audience,
            s.tokens.leeway_seconds,
        ))
    }

    pub fn new(
        keys: HashMap<String, DecodingKey>,
        issuer: &str,
        audience: &str,
        leeway: u64,
    ) -> TokenVerifier {
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_issuer(&[issuer]);
        validation.set_audience(&[audience]);
        validation.leeway = leeway;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "nbf", "iss", "aud", "sub"]);
        TokenVerifier { keys, validation }
    }

    /// Checks signature, algorithm, key id, issuer, audience, `exp` and `nbf` (with leeway).
    /// Notebook, session and single use are checked by the caller, which knows the route.
    pub fn verify(&self, token: &str) -> Result<UrlClaims, EdgeError> {
        let invalid = |ctx| EdgeError::new(ErrorKind::LinkInvalid, ctx);
        if token.is_empty() || token.len() > MAX_TOKEN_LEN {
            return Err(invalid("token length"));
        }
        // `decode_header` refuses `alg: none` (not an algorithm jsonwebtoken knows).
        let header = jsonwebtoken::decode_header(token).map_err(|_| invalid("token header"))?;
        if header.alg != Algorithm::EdDSA {
            return Err(invalid("token algorithm"));
        }
        let key = header
            .kid
            .as_deref()
            .and_then(|kid| self.keys.get(kid))
            .ok_or_else(|| invalid("token key id"))?;
        match jsonwebtoken::decode::<UrlClaims>(token, key, &self.validation) {
            Ok(data) => Ok(data.claims),
            Err(e) => Err(match e.kind() {
                JwtError::ExpiredSignature => EdgeError::new(ErrorKind::LinkExpired, "token exp"),
                JwtError::ImmatureSignature => {
                    EdgeError::new(ErrorKind::LinkNotYetValid, "token nbf")
                }
                JwtError::InvalidSignature => invalid("token signature"),
                JwtError::InvalidAudience => invalid("token audience"),
                JwtError::InvalidIssuer => invalid("token issuer"),
                JwtError::InvalidAlgorithm => invalid("token algorithm"),
                _ => invalid("token claims"),
            }),
        }
    }
}
