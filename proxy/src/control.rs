//! The edge's client for the control plane's internal API (`/internal/v1/*`): the routes feed,
//! activity batches and, with the shared replay store, token redemption. Never used per request.

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
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
    client: Client<HttpConnector, Full<Bytes>>,
    base: String,
    auth: HeaderValue,
}

// === impl ControlClient ===

impl ControlClient {
    /// `control_url` is `http://host:port[/prefix]`; the token is sent as a Bearer credential.
    pub fn new(control_url: &str, token: &str) -> Result<ControlClient, ProxyError> {
        let base = control_url.trim_end_matches('/').to_owned();
        if !base.starts_with("http://") {
            return Err(ProxyError::Config(
                "proxy.control_url must be an http:// URL (the internal API is meant for a private network)".into(),
            ));
        }
        let mut auth = HeaderValue::try_from(format!("Bearer {token}"))
            .map_err(|_| ProxyError::Config("internal token is not a valid header value".into()))?;
        auth.set_sensitive(true);
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(Duration::from_secs(3)));
        http.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(http);
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
                .map_err(|e| ControlError::Unreachable(e.to_string()))?;
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
