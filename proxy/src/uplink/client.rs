//! The edge's client for the control plane's internal API (`/internal/v1/*`): the routes feed,
//! activity batches and, with the shared replay store, token redemption. Never used per request.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use marina_config::Settings;

use crate::error::ProxyError;

/// Largest answer accepted from the control plane (a routes snapshot of many notebooks).
const MAX_ANSWER: usize = 64 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control plane unreachable: {0}")]
    Unreachable(String),
    #[error("control plane did not answer in time")]
    Timeout,
}

#[derive(Clone)]
pub struct ControlClient {
    /// Speaks `http://` and `https://`; which one is fixed by `base` (checked in `new`).
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    base: String,
    auth: HeaderValue,
}

// === impl ControlClient ===

impl ControlClient {
    /// `control_url` is `http://host:port[/prefix]` (a private network) or `https://…`, whose
    /// certificate is checked against the CAs in `ca_file` if given, else the system's roots.
    /// The token is sent as a Bearer credential.
    pub fn new(
        control_url: &str,
        ca_file: Option<&Path>,
        token: &str,
    ) -> Result<ControlClient, ProxyError> {
        let base = control_url.trim_end_matches('/').to_owned();
        let https = base.starts_with("https://");
        if !https && !base.starts_with("http://") {
            return Err(ProxyError::Config(
                "proxy.control_url must be an http:// or https:// URL".into(),
            ));
        }
        let mut auth = HeaderValue::try_from(format!("Bearer {token}"))
            .map_err(|_| ProxyError::Config("internal token is not a valid header value".into()))?;
        auth.set_sensitive(true);
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(Duration::from_secs(3)));
        http.set_nodelay(true);
        // The scheme of each request decides, and every request carries `base`'s scheme: an
        // https control plane is never spoken to in clear text.
        http.enforce_http(false);
        let tls = client_tls(https.then_some(ca_file).flatten())?;
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Ok(ControlClient { client, base, auth })
    }

    /// The internal token: `internal.token`, else the file `DATA_DIR/internal-token` (created
    /// if missing, as the control plane does, so whichever starts first makes it).
    pub fn internal_token(s: &Settings) -> Result<String, ProxyError> {
        if !s.internal.token.is_empty() {
            return Ok(s.internal.token.clone());
        }
        let path = s.data_dir.join("internal-token");
        marina_config::secrets::load_or_create_hex(&path, 32).map_err(|source| ProxyError::File {
            what: "internal token",
            path,
            source,
        })
    }

    pub async fn post_json(
        &self,
        path: &str,
        body: Vec<u8>,
    ) -> Result<(StatusCode, Bytes), ControlError> {
        self.send(
            Method::POST,
            path,
            Bytes::from(body),
            Duration::from_secs(5),
        )
        .await
    }

    pub async fn get(
        &self,
        path_and_query: &str,
        timeout: Duration,
    ) -> Result<(StatusCode, Bytes), ControlError> {
        self.send(Method::GET, path_and_query, Bytes::new(), timeout)
            .await
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Bytes,
        timeout: Duration,
    ) -> Result<(StatusCode, Bytes), ControlError> {
        let has_body = !body.is_empty();
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{}", self.base, path))
            .header(header::AUTHORIZATION, self.auth.clone());
        if has_body {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(body))
            .map_err(|e| ControlError::Unreachable(e.to_string()))?;
        let work = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| ControlError::Unreachable(causes(&e)))?;
            let status = resp.status();
            let body = Limited::new(resp.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map_err(|e| ControlError::Unreachable(e.to_string()))?
                .to_bytes();
            Ok((status, body))
        };
        tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| ControlError::Timeout)?
    }
}

/// The TLS client configuration: the CAs of `ca_file` when given, else the system's roots.
fn client_tls(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, ProxyError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let file_err = |source| ProxyError::File {
                what: "proxy.control_ca_file",
                path: path.to_path_buf(),
                source,
            };
            let pem = std::fs::read(path).map_err(file_err)?;
            for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                roots
                    .add(cert.map_err(file_err)?)
                    .map_err(|e| ProxyError::Tls(format!("proxy.control_ca_file: {e}")))?;
            }
            if roots.is_empty() {
                return Err(ProxyError::Tls(format!(
                    "proxy.control_ca_file: no certificate in {}",
                    path.display()
                )));
            }
        }
        None => {
            // Unreadable system certificates are skipped; none at all only fails at connect.
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ProxyError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// An error with its causes (`client error (Connect): invalid peer certificate: UnknownIssuer`
/// rather than `client error (Connect)`), so a misconfigured CA is plain in the edge's log.
fn causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = cause.source();
    }
    out
}
