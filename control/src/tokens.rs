//! The one-time URL token `open` mints: an EdDSA (Ed25519) JWT with a `kid` header and the
//! [`UrlClaims`] the edge verifies.
//!
//! The private key comes from `tokens.signing_key_file`, or is generated on first start into
//! `DATA_DIR/keys/url-signing.pem` (PKCS#8, mode 0600) with its public half written beside it
//! as `url-signing.pub.pem` (SPKI), which is what the edge reads when `tokens.public_keys` is
//! empty. Ed25519 keys have fixed DER framings, so both PEMs are built here from the 32-byte
//! seed without an ASN.1 library.

use std::path::{Path, PathBuf};

use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use marina_config::wire::{AccessMode, UrlClaims, URL_TOKEN_TTL_SECONDS};
use marina_config::{Id, Settings};
use rand::RngCore;
use ring::signature::KeyPair;

use crate::error::ControlError;

/// PKCS#8 v1 prefix of an Ed25519 private key (RFC 8410): the 32-byte seed follows.
const PKCS8_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];
/// SPKI prefix of an Ed25519 public key: the 32-byte key follows.
const SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// Signs URL tokens.
pub struct Signer {
    key: EncodingKey,
    kid: String,
    issuer: String,
    audience: String,
    /// Where the private key lives (for messages).
    pub key_file: PathBuf,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("kid", &self.kid)
            .field("key_file", &self.key_file)
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// Loads the configured key, or the generated one (generating it on first start).
    pub fn load(settings: &Settings) -> Result<Signer, ControlError> {
        let path = match &settings.tokens.signing_key_file {
            Some(p) if !p.as_os_str().is_empty() => p.clone(),
            _ => {
                let p = settings.data_dir.join("keys").join("url-signing.pem");
                if !p.exists() {
                    generate(&p)?;
                }
                p
            }
        };
        let pem = std::fs::read(&path).map_err(|source| ControlError::File {
            what: "URL signing key",
            path: path.clone(),
            source,
        })?;
        let key = EncodingKey::from_ed_pem(&pem).map_err(|e| ControlError::SigningKey {
            path: path.clone(),
            message: format!("not a PKCS#8 PEM Ed25519 private key: {e}"),
        })?;
        Ok(Signer {
            key,
            kid: settings.tokens.signing_key_id.clone(),
            issuer: settings.tokens.issuer.clone(),
            audience: settings.tokens.audience.clone(),
            key_file: path,
        })
    }

    /// Mints a token for `member` to open `notebook` in its session `session`.
    pub fn mint(
        &self,
        member: Id,
        notebook: Id,
        session: Id,
        mode: AccessMode,
    ) -> Result<String, String> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut jti = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut jti);
        let claims = UrlClaims {
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
            sub: member,
            nb: notebook,
            sid: session,
            mode,
            jti: base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(jti),
            iat: now,
            nbf: now,
            exp: now + URL_TOKEN_TTL_SECONDS,
        };
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, &claims, &self.key).map_err(|e| e.to_string())
    }
}

/// Generates a key pair: the private PEM at `path` (0600), the public PEM at `*.pub.pem`.
fn generate(path: &Path) -> Result<(), ControlError> {
    let mut seed = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut seed);
    let pair = ring::signature::Ed25519KeyPair::from_seed_unchecked(&seed).map_err(|e| {
        ControlError::SigningKey {
            path: path.to_owned(),
            message: format!("generating: {e}"),
        }
    })?;
    let mut der = PKCS8_PREFIX.to_vec();
    der.extend_from_slice(&seed);
    let private = pem("PRIVATE KEY", &der);
    let mut spki = SPKI_PREFIX.to_vec();
    spki.extend_from_slice(pair.public_key().as_ref());
    let public = pem("PUBLIC KEY", &spki);
    let pub_path = public_key_path(path);
    // Public half first: if we crash in between, the next start regenerates both.
    marina_config::secrets::write_private(&pub_path, public.as_bytes())
        .map_err(file_err("URL signing public key", &pub_path))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        // The public key is not secret; let an edge running as another user read it.
        std::fs::set_permissions(&pub_path, std::fs::Permissions::from_mode(0o644))
            .map_err(file_err("URL signing public key", &pub_path))?;
    }
    marina_config::secrets::write_private(path, private.as_bytes())
        .map_err(file_err("URL signing key", path))?;
    tracing::info!(key = %path.display(), "generated the URL signing key");
    Ok(())
}

/// `…/url-signing.pem` → `…/url-signing.pub.pem`.
pub fn public_key_path(private: &Path) -> PathBuf {
    let stem = private
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "url-signing".into());
    private.with_file_name(format!("{stem}.pub.pem"))
}

fn file_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> ControlError + 'a {
    move |source| ControlError::File {
        what,
        path: path.to_owned(),
        source,
    }
}

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{DecodingKey, Validation};

    #[test]
    fn generated_key_signs_tokens_the_public_key_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let settings = Settings {
            data_dir: dir.path().to_owned(),
            ..Settings::default()
        };
        let signer = Signer::load(&settings).unwrap();
        let key_file = dir.path().join("keys/url-signing.pem");
        let pub_file = dir.path().join("keys/url-signing.pub.pem");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        let (m, n, s) = (Id::random(), Id::random(), Id::random());
        let token = signer.mint(m, n, s, AccessMode::View).unwrap();
        let header = jsonwebtoken::decode_header(&token).unwrap();
        assert_eq!(header.alg, Algorithm::EdDSA);
        assert_eq!(header.kid.as_deref(), Some("k1"));
        let public = std::fs::read(&pub_file).unwrap();
        let mut v = Validation::new(Algorithm::EdDSA);
        v.set_audience(&["marina-edge"]);
        v.set_issuer(&["marina-control"]);
        let data = jsonwebtoken::decode::<UrlClaims>(
            &token,
            &DecodingKey::from_ed_pem(&public).unwrap(),
            &v,
        )
        .unwrap();
        assert_eq!(data.claims.sub, m);
        assert_eq!(data.claims.nb, n);
        assert_eq!(data.claims.sid, s);
        assert_eq!(data.claims.mode, AccessMode::View);
        assert_eq!(data.claims.exp - data.claims.iat, 300);
        // A second load reuses the key: tokens still verify with the same public key.
        let again = Signer::load(&settings).unwrap();
        let t2 = again.mint(m, n, s, AccessMode::Edit).unwrap();
        jsonwebtoken::decode::<UrlClaims>(&t2, &DecodingKey::from_ed_pem(&public).unwrap(), &v)
            .unwrap();
    }

    #[test]
    fn a_bad_key_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.pem");
        std::fs::write(&p, "nope").unwrap();
        let settings = Settings {
            tokens: marina_config::settings::TokenSettings {
                signing_key_file: Some(p),
                ..Default::default()
            },
            ..Settings::default()
        };
        let err = Signer::load(&settings).unwrap_err().to_string();
        assert!(err.contains("k.pem"), "{err}");
    }
}
