//! A browser tab, as Marimo's own frontend behaves (measured against the real one, see
//! `shared/research/marimo-and-sail-behind-a-proxy.md` §2): it redeems the one-time URL, loads
//! the page and some of its assets, takes the skew token from the page, opens `/ws` (which only
//! ever carries server → client JSON frames), sends every action as an HTTP POST with
//! `Marimo-Session-Id` and `Marimo-Server-Token`, and polls `/api/usage` and `/health`.
//!
//! The same tab can also talk to Marimo directly with its token (the baseline), so one run
//! measures the edge's cost as a ratio.

use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use futures_util::{SinkExt, StreamExt};
use rand::Rng;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use super::record::Via;

pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// How a tab authenticates.
#[derive(Clone, Debug)]
pub enum Auth {
    /// The edge's sealed session cookie (`name=value`).
    Cookie(String),
    /// Marimo's own token (direct to Marimo: the baseline).
    Bearer(String),
}

/// Why a step failed, as a browser would tell: could not connect, or an answer.
#[derive(Debug)]
pub enum Failure {
    /// Nothing listens (a killed replica): try another one.
    Unreachable(String),
    /// An HTTP status where success was expected.
    Status(u16, String),
    Other(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Unreachable(s) => write!(f, "unreachable: {s}"),
            Failure::Status(c, s) => write!(f, "HTTP {c}: {s}"),
            Failure::Other(s) => write!(f, "{s}"),
        }
    }
}

fn from_reqwest(e: reqwest::Error) -> Failure {
    // reqwest's message alone ("error sending request") hides why: add its causes.
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    if e.is_connect() {
        Failure::Unreachable(text)
    } else {
        Failure::Other(text)
    }
}

/// One tab on one notebook.
pub struct Tab {
    /// `http://host:port/notebooks/<ID>/`.
    pub base: String,
    pub via: Via,
    pub auth: Auth,
    /// The notebook's public origin (what the browser sends as `Origin`).
    pub origin: String,
    pub kiosk: bool,
    pub session_id: String,
    pub skew: String,
    /// The notebook's file name as the page states it (what a save must send back).
    pub filename: String,
    pub http: reqwest::Client,
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(60))
        .build()
        .expect("HTTP client")
}

/// A new Marimo browser session id: `s_` and six of `[0-9a-z]`.
pub fn session_id() -> String {
    const CHARS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut rng = rand::thread_rng();
    let tail: String = (0..6)
        .map(|_| CHARS[rng.gen_range(0..CHARS.len())] as char)
        .collect();
    format!("s_{tail}")
}

/// `scheme://host[:port]` of a URL.
pub fn origin_of(url: &str) -> String {
    let after_scheme = url.find("://").map(|i| i + 3).unwrap_or(0);
    let end = url[after_scheme..]
        .find('/')
        .map(|i| i + after_scheme)
        .unwrap_or(url.len());
    url[..end].to_owned()
}

/// Redeems a one-time URL at one replica (`edge_url` replaces the public origin, as a load
/// balancer would route it): the cookie and the notebook's base URL at that replica.
pub async fn redeem(
    http: &reqwest::Client,
    url: &str,
    public_url: &str,
    edge_url: &str,
) -> Result<(String, String), Failure> {
    let at = url.replacen(public_url, edge_url, 1);
    let resp = http.get(&at).send().await.map_err(from_reqwest)?;
    let status = resp.status().as_u16();
    if status != 303 {
        let body = resp.text().await.unwrap_or_default();
        return Err(Failure::Status(status, body.chars().take(200).collect()));
    }
    let header = |n: &str| {
        resp.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let cookie = header("set-cookie")
        .split(';')
        .next()
        .unwrap_or_default()
        .to_owned();
    let location = header("location");
    let path = location
        .strip_prefix(public_url)
        .unwrap_or(&location)
        .split('?')
        .next()
        .unwrap_or_default()
        .to_owned();
    if cookie.is_empty() || !path.starts_with('/') {
        return Err(Failure::Other(format!(
            "handshake: no cookie or location {location:?}"
        )));
    }
    Ok((cookie, format!("{edge_url}{path}")))
}

impl Tab {
    fn authed(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.auth {
            Auth::Cookie(c) => req.header("cookie", c),
            Auth::Bearer(t) => req.bearer_auth(t),
        }
    }

    /// Moves the tab to another replica (same cookie: any replica opens what any seals).
    pub fn move_to(&mut self, edge_url: &str, edge: usize) {
        if let Some(i) = self.base.find("/notebooks/") {
            self.base = format!("{edge_url}{}", &self.base[i..]);
        }
        self.via = Via::Edge(edge);
    }

    pub async fn get(&self, path: &str) -> Result<reqwest::Response, Failure> {
        self.authed(self.http.get(format!("{}{path}", self.base)))
            .send()
            .await
            .map_err(from_reqwest)
    }

    /// Loads the page (following the edge's kiosk redirect for viewers) and `assets` of its
    /// assets; keeps the skew token. Returns the page's size.
    pub async fn load_page(&mut self, assets: usize) -> Result<usize, Failure> {
        let mut path = if self.kiosk { "?kiosk=true" } else { "" }.to_owned();
        let mut html = String::new();
        for _ in 0..2 {
            let resp = self
                .authed(self.http.get(format!("{}{path}", self.base)))
                .header("accept", "text/html")
                .send()
                .await
                .map_err(from_reqwest)?;
            let status = resp.status().as_u16();
            if (300..400).contains(&status) {
                let loc = resp
                    .headers()
                    .get("location")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default();
                path = loc
                    .find('?')
                    .map(|i| loc[i..].to_owned())
                    .unwrap_or_default();
                continue;
            }
            if status != 200 {
                return Err(Failure::Status(status, "page".into()));
            }
            html = resp.text().await.map_err(from_reqwest)?;
            break;
        }
        let marker = "marimo-server-token data-token=\"";
        let at = html
            .find(marker)
            .ok_or_else(|| Failure::Other("no server token in the page".into()))?
            + marker.len();
        self.skew = html[at..].split('"').next().unwrap_or_default().to_owned();
        let name_tag = "<marimo-filename hidden>";
        if let Some(i) = html.find(name_tag) {
            let rest = &html[i + name_tag.len()..];
            self.filename = rest.split('<').next().unwrap_or_default().to_owned();
        }
        for asset in asset_paths(&html).into_iter().take(assets) {
            let r = self.get(&asset).await?;
            if r.status().as_u16() != 200 {
                return Err(Failure::Status(
                    r.status().as_u16(),
                    format!("asset {asset}"),
                ));
            }
            let _ = r.bytes().await.map_err(from_reqwest)?;
        }
        Ok(html.len())
    }

    /// Opens the kernel stream.
    pub async fn open_ws(&self) -> Result<Ws, Failure> {
        let kiosk = if self.kiosk { "&kiosk=true" } else { "" };
        self.open_socket(&format!("ws?session_id={}{kiosk}", self.session_id))
            .await
    }

    /// Opens a WebSocket at `path_and_query` under the base.
    pub async fn open_socket(&self, path_and_query: &str) -> Result<Ws, Failure> {
        let ws_base = self.base.replacen("http", "ws", 1);
        let mut req = format!("{ws_base}{path_and_query}")
            .into_client_request()
            .map_err(|e| Failure::Other(e.to_string()))?;
        let h = req.headers_mut();
        let value = |s: &str| s.parse().map_err(|_| Failure::Other("header".into()));
        match &self.auth {
            Auth::Cookie(c) => {
                h.insert("cookie", value(c)?);
            }
            Auth::Bearer(t) => {
                h.insert("authorization", value(&format!("Bearer {t}"))?);
            }
        }
        h.insert("origin", value(&self.origin)?);
        let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
            .max_message_size(Some(64 << 20))
            .max_frame_size(Some(64 << 20));
        match tokio_tungstenite::connect_async_with_config(req, Some(config), false).await {
            Ok((ws, _)) => Ok(ws),
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(Failure::Status(
                resp.status().as_u16(),
                "ws handshake".into(),
            )),
            Err(tokio_tungstenite::tungstenite::Error::Io(e)) => {
                Err(Failure::Unreachable(e.to_string()))
            }
            Err(e) => Err(Failure::Other(e.to_string())),
        }
    }

    /// A POST as the frontend sends it; returns the status.
    pub async fn post(&self, path: &str, body: serde_json::Value) -> Result<u16, Failure> {
        self.post_as(path, &self.session_id, body).await
    }

    pub async fn post_as(
        &self,
        path: &str,
        session_id: &str,
        body: serde_json::Value,
    ) -> Result<u16, Failure> {
        let resp = self
            .authed(self.http.post(format!("{}{path}", self.base)))
            .header("marimo-session-id", session_id)
            .header("marimo-server-token", &self.skew)
            .header("origin", &self.origin)
            .json(&body)
            .send()
            .await
            .map_err(from_reqwest)?;
        let status = resp.status().as_u16();
        let _ = resp.bytes().await;
        Ok(status)
    }
}

/// Asset paths the page references (`./assets/…`), relative to the base.
fn asset_paths(html: &str) -> Vec<String> {
    let mut out = Vec::new();
    for quote in html.split('"') {
        let p = quote.trim_start_matches("./");
        if p.starts_with("assets/") && (p.ends_with(".js") || p.ends_with(".css")) {
            let p = p.to_owned();
            if !out.contains(&p) {
                out.push(p);
            }
        }
    }
    out
}

/// What ended a socket.
#[derive(Debug)]
pub enum Ended {
    Closed(String),
    Error(String),
}

/// Reads a kernel stream to its end, answering pings and handing every marker found in a text
/// frame to `on_marker` with the time it arrived.
pub async fn read_markers(mut ws: Ws, mut on_marker: impl FnMut(&str, Instant)) -> Ended {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => {
                let now = Instant::now();
                for m in markers(&t) {
                    on_marker(m, now);
                }
            }
            Some(Ok(Message::Ping(p))) => {
                if let Err(e) = ws.send(Message::Pong(p)).await {
                    return Ended::Error(e.to_string());
                }
            }
            Some(Ok(Message::Close(c))) => {
                return Ended::Closed(
                    c.map(|c| format!("{} {}", u16::from(c.code), c.reason))
                        .unwrap_or_else(|| "no code".into()),
                )
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => return Ended::Error(e.to_string()),
            None => return Ended::Closed("eof".into()),
        }
    }
}

/// Output markers: `LTMARK<notebook>x<seq>Z`.
pub fn marker(notebook: usize, seq: u64) -> String {
    format!("LTMARK{notebook}x{seq}Z")
}

pub fn markers(text: &str) -> impl Iterator<Item = &str> {
    text.match_indices("LTMARK").filter_map(move |(i, _)| {
        let rest = &text[i + 6..];
        let end = rest.find(|c: char| !(c.is_ascii_digit() || c == 'x'))?;
        let starts_with_digit = rest.as_bytes().first().is_some_and(u8::is_ascii_digit);
        (starts_with_digit && rest.as_bytes().get(end) == Some(&b'Z'))
            .then(|| &text[i..i + 6 + end + 1])
    })
}

pub fn anyhow_of(f: Failure) -> anyhow::Error {
    anyhow!("{f}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_are_found_in_json_and_escaped_html_alike() {
        let t = r#"{"op":"cell-op","data":{"output":{"data":"<pre>LTMARK3x17Z xxxx</pre>"},"console":[{"data":"LTMARK3x18Z\n"}]}} LTMARK LTMARKxZ LTMARK4x2"#;
        let got: Vec<&str> = markers(t).collect();
        assert_eq!(got, ["LTMARK3x17Z", "LTMARK3x18Z"]);
        assert_eq!(marker(3, 17), "LTMARK3x17Z");
    }

    #[test]
    fn asset_paths_come_from_the_pages_relative_references() {
        let html = r#"<script src="./assets/index-abc.js"></script><link href="./assets/index-abc.css"><img src="./favicon.ico"><script src="./assets/index-abc.js">"#;
        assert_eq!(
            asset_paths(html),
            ["assets/index-abc.js", "assets/index-abc.css"]
        );
    }

    #[test]
    fn origins_are_scheme_host_and_port() {
        assert_eq!(
            origin_of("http://127.0.0.1:8000/notebooks/X/_auth?token=t"),
            "http://127.0.0.1:8000"
        );
        assert_eq!(
            origin_of("https://a1.nb.example.com/_auth?token=t"),
            "https://a1.nb.example.com"
        );
    }

    #[test]
    fn session_ids_have_marimos_shape() {
        let s = session_id();
        assert_eq!(s.len(), 8);
        assert!(s.starts_with("s_"));
        assert!(s[2..]
            .bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase()));
    }
}
