//! Every Marina setting, with its unit and default.
//!
//! Sources, lowest to highest precedence: built-in defaults, a TOML file (`--config FILE`),
//! `MARINA_`-prefixed environment variables with nested keys joined by `__`
//! (`MARINA_PROXY__COOKIE__SAME_SITE=lax`), then command-line flags. Settings are parsed once at
//! start-up into these plain structs and passed down explicitly; nothing else reads the
//! environment. Unknown keys are errors (a typo must not silently fall back to a default), and
//! every error names the key and the source it came from.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Serialized, Toml};
use figment::{Figment, Provider};
use serde::{Deserialize, Serialize};

use crate::addressing::{Addressing, AddressingMode};

/// Why settings could not be loaded. The message names the key and its source.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration file {0} does not exist")]
    MissingFile(PathBuf),
    #[error("invalid configuration: {0}")]
    Invalid(String),
    #[error("invalid setting `{key}`: {message}")]
    Key { key: &'static str, message: String },
}

impl From<figment::Error> for ConfigError {
    fn from(e: figment::Error) -> Self {
        // figment's messages name the key path and the source (file path or env variables).
        let msgs: Vec<String> = e.into_iter().map(|e| e.to_string()).collect();
        ConfigError::Invalid(msgs.join("; "))
    }
}

/// The whole configuration.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Directory for the SQLite database, generated keys, notebook files, logs and the Python
    /// environment. Default `./.marina`.
    pub data_dir: PathBuf,
    pub database: DatabaseSettings,
    /// The shared secret between the control plane and the edge (the internal API).
    pub internal: InternalSettings,
    pub tokens: TokenSettings,
    pub control: ControlSettings,
    pub proxy: ProxySettings,
    pub runtime: RuntimeSettings,
    /// Log filter (tracing `EnvFilter` syntax). Default `info`.
    pub log: String,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            data_dir: PathBuf::from(".marina"),
            database: DatabaseSettings::default(),
            internal: InternalSettings::default(),
            tokens: TokenSettings::default(),
            control: ControlSettings::default(),
            proxy: ProxySettings::default(),
            runtime: RuntimeSettings::default(),
            log: "info".into(),
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseSettings {
    /// `postgres://…` for PostgreSQL, `sqlite://PATH` for a SQLite file; empty means the
    /// embedded default, `DATA_DIR/marina.db` (SQLite, WAL).
    pub url: String,
    /// Connection pool size. Default 8 (0 means the default).
    pub max_connections: u32,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InternalSettings {
    /// Bearer token the edge presents on `/internal/v1/*`. Empty: read from, or generated into,
    /// `DATA_DIR/internal-token`.
    pub token: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokenSettings {
    /// `iss` of URL tokens. Default `marina-control`.
    pub issuer: String,
    /// `aud` of URL tokens: the edge. Default `marina-edge`.
    pub audience: String,
    /// PKCS#8 PEM Ed25519 private key the control plane signs with. Empty: generated on first
    /// start into `DATA_DIR/keys/url-signing.pem` (its public half beside it, `.pub.pem`).
    pub signing_key_file: Option<PathBuf>,
    /// `kid` put in the header of signed tokens. Default `k1`.
    pub signing_key_id: String,
    /// Public keys the edge accepts, by `kid`; several at once allow rotation without downtime.
    /// Empty: the public half of the signing key in the data directory.
    pub public_keys: Vec<PublicKeySetting>,
    /// Clock-skew leeway for `exp`/`nbf`/`iat`, seconds. Default 5.
    pub leeway_seconds: u64,
}

impl Default for TokenSettings {
    fn default() -> Self {
        TokenSettings {
            issuer: "marina-control".into(),
            audience: "marina-edge".into(),
            signing_key_file: None,
            signing_key_id: "k1".into(),
            public_keys: Vec::new(),
            leeway_seconds: 5,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublicKeySetting {
    pub kid: String,
    /// SPKI PEM file of an Ed25519 public key.
    pub file: PathBuf,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlSettings {
    /// Address of the control API. Default `127.0.0.1:8080`.
    pub listen: SocketAddr,
    /// URL at which people and host applications reach the control API (printed, and the
    /// default `frame-ancestors` origin of the host page). Default `http://127.0.0.1:8080`.
    pub public_url: String,
    /// Largest request body accepted, bytes. Default 65536.
    pub max_body_bytes: usize,
    /// Serve the example host page at `/`. Default true; switch off in production.
    pub host_page: bool,
    /// A connected notebook with no activity for this long is `idle`, seconds. Default 300.
    pub idle_after_seconds: u64,
    /// A notebook `detached` (no browser connected) this long is stopped, seconds. Default 14400.
    pub detached_timeout_seconds: u64,
    /// A notebook whose kernel is running cells (as Marimo reports it) is not stopped by the
    /// idle or detached timeout for up to this long, counted from when it was first found busy,
    /// seconds; 0: a busy kernel never holds a notebook. Default 86400.
    pub busy_max_seconds: u64,
    /// How often the lifecycle monitor looks at running notebooks, milliseconds. Default 1000.
    pub monitor_interval_ms: u64,
    /// One start attempt may take this long before it counts as failed, seconds. Default 120.
    pub start_timeout_seconds: u64,
    /// Requests per second one API key may make (0: unlimited). Default 50.
    pub rate_limit_per_second: u32,
}

impl Default for ControlSettings {
    fn default() -> Self {
        ControlSettings {
            listen: "127.0.0.1:8080".parse().expect("literal address"),
            public_url: "http://127.0.0.1:8080".into(),
            max_body_bytes: 64 * 1024,
            host_page: true,
            idle_after_seconds: 300,
            detached_timeout_seconds: 14_400,
            busy_max_seconds: 86_400,
            monitor_interval_ms: 1000,
            start_timeout_seconds: 120,
            rate_limit_per_second: 50,
        }
    }
}

/// `SameSite` attribute of the edge's session cookie.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SameSite {
    Strict,
    Lax,
    /// Needs TLS; the cookie is then also `Partitioned` (CHIPS), for cross-site embedding.
    None,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplayStore {
    /// Seen `jti`s kept in the edge's memory (and a file in the data directory, so a restart of a
    /// single edge still refuses replays). Single-replica only.
    Memory,
    /// Each redemption asks the control plane, whose database makes it single-use across
    /// every edge replica.
    Control,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxySettings {
    /// Address of the edge. Default `127.0.0.1:8000`.
    pub listen: SocketAddr,
    /// Admin listener: `/metrics`, `/healthz`, `/readyz`. Default `127.0.0.1:9090`.
    pub admin_listen: SocketAddr,
    /// `path` (default) or `subdomain`.
    pub addressing: AddressingMode,
    /// Public URL of the edge. Path mode: its origin (`http://127.0.0.1:8000`). Subdomain mode:
    /// scheme and notebook domain (`https://nb.example.com` serves `https://<id>.nb.example.com`).
    pub public_url: String,
    /// Handshake path under the notebook root. Default `/_auth`.
    pub handshake_path: String,
    /// Origins allowed to embed notebooks (`Content-Security-Policy: frame-ancestors`).
    /// Empty: the control plane's public URL (where the example host page is).
    pub frame_ancestors: Vec<String>,
    /// Base URL of the control plane's internal API (routes feed, activity, replay): `http://`
    /// on a private network, or `https://` (server certificate checked against the system's
    /// roots, or `control_ca_file`). Empty in `marina serve`: the control plane of the same
    /// process.
    pub control_url: String,
    /// PEM file of the certificate authorities trusted for an `https://` `control_url`, instead
    /// of the system's (a private CA). Unset: the system's roots.
    pub control_ca_file: Option<PathBuf>,
    /// A static routes file (JSON `RoutesSnapshot`) instead of the control plane's feed.
    pub routes_file: Option<PathBuf>,
    /// Where one-time URL tokens are remembered: `memory` (default) or `control`.
    pub replay_store: ReplayStore,
    /// Name of this edge replica in activity reports. Empty: the hostname and port.
    pub edge_id: String,
    /// How often activity is reported, milliseconds. Default 2000.
    pub activity_interval_ms: u64,
    /// Largest WebSocket message relayed, bytes. Default 16 MiB (Marimo sends up to 8 MB).
    pub max_ws_message_bytes: usize,
    /// Let viewers move UI elements (sliders…), which re-runs cells in the owner's kernel.
    /// Default false: viewers are a strict read-only mirror.
    pub interactive_viewers: bool,
    pub cookie: CookieSettings,
    pub tls: Option<TlsSettings>,
    pub timeouts: ProxyTimeouts,
}

impl Default for ProxySettings {
    fn default() -> Self {
        ProxySettings {
            listen: "127.0.0.1:8000".parse().expect("literal address"),
            admin_listen: "127.0.0.1:9090".parse().expect("literal address"),
            addressing: AddressingMode::Path,
            public_url: "http://127.0.0.1:8000".into(),
            handshake_path: "/_auth".into(),
            frame_ancestors: Vec::new(),
            control_url: String::new(),
            control_ca_file: None,
            routes_file: None,
            replay_store: ReplayStore::Memory,
            edge_id: String::new(),
            activity_interval_ms: 2000,
            max_ws_message_bytes: 16 * 1024 * 1024,
            interactive_viewers: false,
            cookie: CookieSettings::default(),
            tls: None,
            timeouts: ProxyTimeouts::default(),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CookieSettings {
    /// Cookie name. In subdomain mode with TLS it gets the `__Host-` prefix. Default `marina`.
    pub name: String,
    /// `strict` (default), `lax` or `none` (then `Secure; Partitioned`).
    pub same_site: SameSite,
    /// Lifetime of a session cookie, seconds. Default 43200 (12 h).
    pub lifetime_seconds: u64,
    /// Hex-encoded 32-byte sealing keys. The first seals; all open (rotation). Empty: read from,
    /// or generated into, `DATA_DIR/cookie-key`.
    pub keys: Vec<String>,
}

impl Default for CookieSettings {
    fn default() -> Self {
        CookieSettings {
            name: "marina".into(),
            same_site: SameSite::Strict,
            lifetime_seconds: 12 * 3600,
            keys: Vec::new(),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    /// PEM certificate chain, reloaded when the file changes.
    pub cert_file: PathBuf,
    /// PEM private key, reloaded when the file changes.
    pub key_file: PathBuf,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyTimeouts {
    /// A client must send its request head within this, milliseconds; it is also how long an
    /// idle keep-alive connection is kept between requests (hyper counts both with one timer).
    /// Default 30000: longer than Marimo's UI polls (`/api/usage` every 10 s per tab), so a
    /// tab's polls reuse their connection instead of racing its close (the load test saw a
    /// request fail that way with 10000).
    pub header_read_ms: u64,
    /// Connecting to a Marimo server, milliseconds. Default 3000.
    pub upstream_connect_ms: u64,
    /// Waiting for an upstream's response head, milliseconds. Default 60000. Bodies (and
    /// server-sent events) stream without a total limit.
    pub upstream_response_ms: u64,
    /// The edge pings an idle WebSocket this often, seconds. Default 30.
    pub websocket_ping_seconds: u64,
    /// A WebSocket peer silent (not even a pong) this long is closed, seconds. Default 90.
    pub websocket_idle_seconds: u64,
    /// On shutdown, requests get this long to finish, seconds. Default 10.
    pub shutdown_grace_seconds: u64,
}

impl Default for ProxyTimeouts {
    fn default() -> Self {
        ProxyTimeouts {
            header_read_ms: 30_000,
            upstream_connect_ms: 3_000,
            upstream_response_ms: 60_000,
            websocket_ping_seconds: 30,
            websocket_idle_seconds: 90,
            shutdown_grace_seconds: 10,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeKind {
    /// Child processes on this machine (the embedded default).
    Local,
    /// Pods in a Kubernetes namespace.
    Kubernetes,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeSettings {
    /// `local` (default) or `kubernetes`.
    pub kind: RuntimeKind,
    pub local: LocalRuntimeSettings,
    pub kubernetes: KubernetesSettings,
}

impl Default for RuntimeSettings {
    fn default() -> Self {
        RuntimeSettings {
            kind: RuntimeKind::Local,
            local: LocalRuntimeSettings::default(),
            kubernetes: KubernetesSettings::default(),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LocalRuntimeSettings {
    /// Python interpreter used to create the environment. Default `python3`.
    pub python: String,
    /// The virtualenv with the pinned `marimo`, `pysail`, `pyspark-client`. Empty: `DATA_DIR/venv`.
    pub venv_dir: Option<PathBuf>,
    /// Address the notebook servers bind to. Default `127.0.0.1`.
    pub bind_host: String,
    /// How notebook code is isolated: `bubblewrap` (default: each notebook in its own mount,
    /// PID, IPC and network namespaces, see docs/runtimes.md) or `none`, an explicit opt-out
    /// for single-user use in which notebook code runs as Marina's own user with Marina's
    /// files in reach.
    pub sandbox: SandboxKind,
    /// Whether sandboxed notebook code may open connections to the internet (through
    /// `pasta`). Default true. Marina's own listeners and other notebooks stay out of reach
    /// either way.
    pub notebook_internet: bool,
    /// `uid:gid` that sandboxed notebook processes run as when Marina runs as root. Default
    /// `65534:65534` (nobody). Ignored otherwise: an unprivileged Marina maps its own user to
    /// an unprivileged user inside each sandbox.
    pub sandbox_user: String,
}

/// `runtime.local.sandbox`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SandboxKind {
    Bubblewrap,
    None,
}

impl Default for LocalRuntimeSettings {
    fn default() -> Self {
        LocalRuntimeSettings {
            python: "python3".into(),
            venv_dir: None,
            bind_host: "127.0.0.1".into(),
            sandbox: SandboxKind::Bubblewrap,
            notebook_internet: true,
            sandbox_user: "65534:65534".into(),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KubernetesSettings {
    /// Namespace for notebook pods. Default `marina-notebooks`.
    pub namespace: String,
    /// Image of the Marimo pods (with marimo and pyspark-client). Default `marina-notebook:latest`.
    pub marimo_image: String,
    /// Sail image when the workload config gives no `lakesailImageUri`.
    pub default_sail_image: String,
    /// Service account of Sail pods (needs pod rights in cluster mode). Default `marina-sail`.
    pub sail_service_account: String,
    /// How often objects the store does not know are swept, seconds. Default 60.
    pub sweep_interval_seconds: u64,
}

impl Default for KubernetesSettings {
    fn default() -> Self {
        KubernetesSettings {
            namespace: "marina-notebooks".into(),
            marimo_image: "marina-notebook:latest".into(),
            default_sail_image: "marina-notebook:latest".into(),
            sail_service_account: "marina-sail".into(),
            sweep_interval_seconds: 60,
        }
    }
}

// === impl Settings ===

impl Settings {
    /// Loads settings: defaults < `file` < `MARINA_*` environment < `overrides` (the flags).
    pub fn load(file: Option<&Path>, overrides: impl Provider) -> Result<Settings, ConfigError> {
        Self::load_with_env(file, Env::prefixed("MARINA_").split("__"), overrides)
    }

    /// As [`Settings::load`], with the environment given explicitly (for tests).
    pub fn load_with_env(
        file: Option<&Path>,
        env: impl Provider,
        overrides: impl Provider,
    ) -> Result<Settings, ConfigError> {
        let mut fig = Figment::from(Serialized::defaults(Settings::default()));
        if let Some(path) = file {
            if !path.exists() {
                return Err(ConfigError::MissingFile(path.to_owned()));
            }
            fig = fig.merge(Toml::file(path));
        }
        let settings: Settings = fig.merge(env).merge(overrides).extract()?;
        settings.validate()?;
        Ok(settings)
    }

    /// Checks what types alone cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key, message: &str| {
            Err(ConfigError::Key {
                key,
                message: message.into(),
            })
        };
        if parse_origin(&self.proxy.public_url).is_none() {
            return bad(
                "proxy.public_url",
                "must be an http(s) URL with a host and no path",
            );
        }
        if parse_origin(&self.control.public_url).is_none() {
            return bad(
                "control.public_url",
                "must be an http(s) URL with a host and no path",
            );
        }
        if !self.proxy.handshake_path.starts_with('/') || self.proxy.handshake_path.len() < 2 {
            return bad("proxy.handshake_path", "must start with / and name a path");
        }
        if self.proxy.cookie.same_site == SameSite::None && !self.proxy_is_https() {
            return bad(
                "proxy.cookie.same_site",
                "`none` needs an https proxy.public_url",
            );
        }
        for k in &self.proxy.cookie.keys {
            if k.len() != 64 || !k.bytes().all(|b| b.is_ascii_hexdigit()) {
                return bad(
                    "proxy.cookie.keys",
                    "each key must be 64 hex characters (32 bytes)",
                );
            }
        }
        if self.proxy.cookie.lifetime_seconds == 0 {
            return bad("proxy.cookie.lifetime_seconds", "must be positive");
        }
        let control = &self.proxy.control_url;
        if !control.is_empty()
            && !control.starts_with("http://")
            && !control.starts_with("https://")
        {
            return bad("proxy.control_url", "must be an http:// or https:// URL");
        }
        if self.proxy.control_ca_file.is_some() && !control.starts_with("https://") {
            return bad(
                "proxy.control_ca_file",
                "only applies to an https:// proxy.control_url",
            );
        }
        if self.proxy.activity_interval_ms < 100 {
            return bad("proxy.activity_interval_ms", "must be at least 100");
        }
        if self.proxy.max_ws_message_bytes < 1024 {
            return bad("proxy.max_ws_message_bytes", "must be at least 1024");
        }
        if self.control.monitor_interval_ms < 50 {
            return bad("control.monitor_interval_ms", "must be at least 50");
        }
        if self.tokens.leeway_seconds > 300 {
            return bad("tokens.leeway_seconds", "must be at most 300");
        }
        if parse_uid_gid(&self.runtime.local.sandbox_user).is_none() {
            return bad(
                "runtime.local.sandbox_user",
                "must be uid:gid, two numbers other than 0 (e.g. 65534:65534)",
            );
        }
        let db = &self.database.url;
        if !(db.is_empty()
            || db.starts_with("postgres://")
            || db.starts_with("postgresql://")
            || db.starts_with("sqlite:"))
        {
            return bad("database.url", "must be empty, sqlite:PATH or postgres://…");
        }
        for o in &self.proxy.frame_ancestors {
            if o != "'self'" && o != "'none'" && parse_origin(o).is_none() {
                return bad(
                    "proxy.frame_ancestors",
                    "each entry must be an origin (https://host[:port])",
                );
            }
        }
        Ok(())
    }

    /// `runtime.local.sandbox_user` as numbers (validated at load).
    pub fn sandbox_user(&self) -> Option<(u32, u32)> {
        parse_uid_gid(&self.runtime.local.sandbox_user)
    }

    /// Resolves an optional path setting against the data directory.
    pub fn data_path(&self, explicit: Option<&Path>, default_name: &str) -> PathBuf {
        match explicit {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => self.data_dir.join(default_name),
        }
    }

    /// The database URL, with the embedded default resolved.
    pub fn database_url(&self) -> String {
        if self.database.url.is_empty() {
            format!("sqlite://{}", self.data_dir.join("marina.db").display())
        } else {
            self.database.url.clone()
        }
    }

    pub fn proxy_is_https(&self) -> bool {
        self.proxy.public_url.starts_with("https://")
    }

    /// Where notebooks live on the edge (validated by [`Settings::validate`]).
    pub fn addressing(&self) -> Addressing {
        let (scheme, authority) =
            parse_origin(&self.proxy.public_url).unwrap_or(("http", "127.0.0.1:8000"));
        Addressing {
            mode: self.proxy.addressing,
            scheme: scheme.to_owned(),
            authority: authority.to_owned(),
            handshake_path: self.proxy.handshake_path.clone(),
        }
    }

    /// Origins allowed to frame notebooks.
    pub fn frame_ancestors(&self) -> Vec<String> {
        if self.proxy.frame_ancestors.is_empty() {
            vec![self.control.public_url.trim_end_matches('/').to_owned()]
        } else {
            self.proxy.frame_ancestors.clone()
        }
    }
}

/// `uid:gid`, both non-zero: a sandbox user may never be root.
fn parse_uid_gid(s: &str) -> Option<(u32, u32)> {
    let (u, g) = s.split_once(':')?;
    let digits = |x: &str| !x.is_empty() && x.bytes().all(|b| b.is_ascii_digit());
    if !digits(u) || !digits(g) {
        return None;
    }
    let (u, g) = (u.parse().ok()?, g.parse().ok()?);
    (u != 0 && g != 0).then_some((u, g))
}

/// Splits `scheme://authority[/]` into its parts; `None` for anything else.
pub fn parse_origin(url: &str) -> Option<(&str, &str)> {
    let (scheme, rest) = url.split_once("://")?;
    if scheme != "http" && scheme != "https" {
        return None;
    }
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.is_empty() || authority.contains(['/', '?', '#', '@', ' ']) {
        return None;
    }
    Some((scheme, authority))
}

#[cfg(test)]
mod tests {
    use super::*;
    use figment::providers::Serialized;

    fn env(pairs: &[(&str, &str)]) -> impl Provider {
        let mut fig = Figment::new();
        for (k, v) in pairs {
            fig = fig.merge(Serialized::default(k, toml_value(v)));
        }
        fig
    }

    fn toml_value(v: &str) -> figment::value::Value {
        v.parse::<figment::value::Value>()
            .unwrap_or_else(|_| v.into())
    }

    #[test]
    fn idle_keep_alive_outlasts_the_notebook_uis_polls() {
        // Marimo's page polls every 10 s per tab; an edge that closes idle connections at the
        // same period makes every poll race the close.
        const UI_POLL_MS: u64 = 10_000;
        let t = ProxyTimeouts::default();
        assert!(t.header_read_ms >= 2 * UI_POLL_MS, "{}", t.header_read_ms);
    }

    #[test]
    fn defaults_are_valid() {
        let s = Settings::load_with_env(None, Figment::new(), Figment::new()).unwrap();
        assert_eq!(s.proxy.listen.to_string(), "127.0.0.1:8000");
        assert_eq!(s.control.idle_after_seconds, 300);
        assert!(s.database_url().starts_with("sqlite://"));
    }

    #[test]
    fn precedence_flags_over_env_over_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("m.toml");
        std::fs::write(&file, "[proxy]\nlisten = \"127.0.0.1:1000\"\nedge_id = \"file\"\nactivity_interval_ms = 500\n").unwrap();
        let env = env(&[
            ("proxy.edge_id", "env"),
            ("proxy.activity_interval_ms", "700"),
        ]);
        let flags = Serialized::default("proxy.activity_interval_ms", 900);
        let s = Settings::load_with_env(Some(&file), env, flags).unwrap();
        assert_eq!(s.proxy.listen.port(), 1000);
        assert_eq!(s.proxy.edge_id, "env");
        assert_eq!(s.proxy.activity_interval_ms, 900);
    }

    #[test]
    // figment::Jail dictates the closure's error type.
    #[allow(clippy::result_large_err)]
    fn real_environment_variables_use_double_underscore() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("MARINA_PROXY__COOKIE__SAME_SITE", "lax");
            jail.set_env("MARINA_CONTROL__IDLE_AFTER_SECONDS", "7");
            let s = Settings::load(None, Figment::new()).unwrap();
            assert_eq!(s.proxy.cookie.same_site, SameSite::Lax);
            assert_eq!(s.control.idle_after_seconds, 7);
            Ok(())
        });
    }

    #[test]
    // figment::Jail dictates the closure's error type.
    #[allow(clippy::result_large_err)]
    fn bad_env_value_names_key_and_source() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("MARINA_PROXY__LISTEN", "not-an-address");
            let err = Settings::load(None, Figment::new())
                .unwrap_err()
                .to_string();
            assert!(err.to_lowercase().contains("proxy.listen"), "{err}");
            assert!(err.contains("MARINA_"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn unknown_key_in_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("m.toml");
        std::fs::write(&file, "[proxy]\nlisen = \"127.0.0.1:1000\"\n").unwrap();
        let err = Settings::load_with_env(Some(&file), Figment::new(), Figment::new())
            .unwrap_err()
            .to_string();
        assert!(err.contains("lisen"), "{err}");
        assert!(err.contains("m.toml"), "{err}");
    }

    #[test]
    fn missing_file_is_an_error() {
        let err = Settings::load_with_env(
            Some(Path::new("/nonexistent.toml")),
            Figment::new(),
            Figment::new(),
        );
        assert!(matches!(err, Err(ConfigError::MissingFile(_))));
    }

    #[test]
    fn semantic_validation_names_the_key() {
        let flags = Serialized::default("proxy.public_url", "ftp://x");
        let err = Settings::load_with_env(None, Figment::new(), flags)
            .unwrap_err()
            .to_string();
        assert!(err.contains("proxy.public_url"), "{err}");
        let flags = Serialized::default("proxy.cookie.same_site", "none");
        let err = Settings::load_with_env(None, Figment::new(), flags)
            .unwrap_err()
            .to_string();
        assert!(err.contains("proxy.cookie.same_site"), "{err}");
        let flags = Serialized::default("proxy.control_url", "ftp://control:8080");
        let err = Settings::load_with_env(None, Figment::new(), flags)
            .unwrap_err()
            .to_string();
        assert!(err.contains("proxy.control_url"), "{err}");
        let flags = Figment::from(Serialized::default(
            "proxy.control_url",
            "http://control:8080",
        ))
        .merge(Serialized::default("proxy.control_ca_file", "/etc/ca.pem"));
        let err = Settings::load_with_env(None, Figment::new(), flags)
            .unwrap_err()
            .to_string();
        assert!(err.contains("proxy.control_ca_file"), "{err}");
        let flags = Figment::from(Serialized::default(
            "proxy.control_url",
            "https://control:8443",
        ))
        .merge(Serialized::default("proxy.control_ca_file", "/etc/ca.pem"));
        assert!(Settings::load_with_env(None, Figment::new(), flags).is_ok());
    }

    #[test]
    fn the_sandbox_settings_are_checked() {
        for bad in ["0:0", "1000:0", "1000", "a:b", "-1:5", ""] {
            let flags = Serialized::default("runtime.local.sandbox_user", bad);
            let err = Settings::load_with_env(None, Figment::new(), flags)
                .unwrap_err()
                .to_string();
            assert!(err.contains("runtime.local.sandbox_user"), "{bad}: {err}");
        }
        let flags = Serialized::default("runtime.local.sandbox", "docker");
        let err = Settings::load_with_env(None, Figment::new(), flags)
            .unwrap_err()
            .to_string();
        assert!(err.contains("sandbox"), "{err}");
        // Positive controls: the defaults, another user, and the explicit opt-out.
        let s = Settings::load_with_env(None, Figment::new(), Figment::new()).unwrap();
        assert_eq!(s.runtime.local.sandbox, SandboxKind::Bubblewrap);
        assert!(s.runtime.local.notebook_internet);
        assert_eq!(s.sandbox_user(), Some((65534, 65534)));
        let flags = Figment::from(Serialized::default(
            "runtime.local.sandbox_user",
            "4000:4001",
        ))
        .merge(Serialized::default("runtime.local.sandbox", "none"));
        let s = Settings::load_with_env(None, Figment::new(), flags).unwrap();
        assert_eq!(s.sandbox_user(), Some((4000, 4001)));
        assert_eq!(s.runtime.local.sandbox, SandboxKind::None);
    }

    #[test]
    fn origins() {
        assert_eq!(parse_origin("https://a.b:1/"), Some(("https", "a.b:1")));
        assert_eq!(parse_origin("https://a.b/x"), None);
        assert_eq!(parse_origin("javascript:x"), None);
    }
}
