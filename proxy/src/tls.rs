//! TLS for the edge listener: rustls with the ring provider, ALPN `h2` and `http/1.1`, and the
//! certificate and key reloaded when their files change (no restart to renew a certificate).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use marina_config::settings::TlsSettings;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;

use crate::error::ProxyError;

/// Serves the current certificate; swapped atomically on reload.
#[derive(Debug)]
pub struct CertResolver {
    current: ArcSwap<CertifiedKey>,
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

fn load(cert: &PathBuf, key: &PathBuf) -> Result<CertifiedKey, ProxyError> {
    let read = |p: &PathBuf, what| {
        std::fs::read(p).map_err(|source| ProxyError::File {
            what,
            path: p.clone(),
            source,
        })
    };
    let cert_pem = read(cert, "TLS certificate")?;
    let key_pem = read(key, "TLS key")?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut &cert_pem[..])
        .collect::<Result<_, _>>()
        .map_err(|e| ProxyError::Tls(format!("{}: {e}", cert.display())))?;
    if certs.is_empty() {
        return Err(ProxyError::Tls(format!(
            "{}: no certificate",
            cert.display()
        )));
    }
    let key_der = rustls_pemfile::private_key(&mut &key_pem[..])
        .map_err(|e| ProxyError::Tls(format!("{}: {e}", key.display())))?
        .ok_or_else(|| ProxyError::Tls(format!("{}: no private key", key.display())))?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key_der)
        .map_err(|e| ProxyError::Tls(format!("{}: {e}", key.display())))?;
    Ok(CertifiedKey::new(certs, signing))
}

/// Builds the acceptor and the resolver to reload.
pub fn acceptor(tls: &TlsSettings) -> Result<(TlsAcceptor, Arc<CertResolver>), ProxyError> {
    let resolver = Arc::new(CertResolver {
        current: ArcSwap::from_pointee(load(&tls.cert_file, &tls.key_file)?),
    });
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| ProxyError::Tls(e.to_string()))?
    .with_no_client_auth()
    .with_cert_resolver(resolver.clone());
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok((TlsAcceptor::from(Arc::new(config)), resolver))
}

fn mtimes(tls: &TlsSettings) -> (Option<SystemTime>, Option<SystemTime>) {
    let m = |p: &PathBuf| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    (m(&tls.cert_file), m(&tls.key_file))
}

/// Reloads the certificate when either file changes; keeps the old one if the new pair is bad
/// (e.g. the certificate was written before its key).
pub async fn follow(tls: TlsSettings, resolver: Arc<CertResolver>) {
    let mut seen = mtimes(&tls);
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tick.tick().await;
        let now = mtimes(&tls);
        if now == seen {
            continue;
        }
        match load(&tls.cert_file, &tls.key_file) {
            Ok(ck) => {
                resolver.current.store(Arc::new(ck));
                seen = now;
                tracing::info!("TLS certificate reloaded");
            }
            Err(e) => {
                tracing::warn!(error = %e, "TLS certificate not reloaded; keeping the old one")
            }
        }
    }
}
