//! A real Marimo 0.25 `edit` server ([`Server`], from the notebook environment of
//! [`crate::venv`]), and driving one through its own HTTP and WebSocket API the way its
//! frontend does ([`Marimo`], [`Session`]), whoever started it (a test, or a runtime).
//!
//! The protocol, read from marimo 0.25.2's source and checked against a live server:
//! 1. Every request carries the server's token: `Authorization: Bearer <token>` (HTTP and the
//!    WebSocket handshake alike). `/health` is the only route that needs none.
//! 2. `GET <base>/` returns the page; it embeds the *skew-protection* token as
//!    `"serverToken": "<t>"`. Every POST must send it back as `Marimo-Server-Token`.
//! 3. `GET <base>/ws?session_id=s_xxxxxx` (6 lowercase alphanumerics) opens a session and
//!    starts its kernel process. The server only sends: text frames
//!    `{"op": "<name>", "data": {...}}`. The first useful one is `kernel-ready` (with the
//!    notebook's `cell_ids` and `codes`).
//! 4. `POST <base>/api/kernel/instantiate` with `Marimo-Session-Id: s_xxxxxx` and
//!    `{"objectIds": [], "values": [], "autoRun": true}` runs the notebook's cells.
//! 5. `POST <base>/api/kernel/run` with `{"cellIds": [id], "codes": [code]}` runs (and
//!    registers, for an unseen id) a cell.
//! 6. Results arrive on the WebSocket as `cell-op` messages for the cell: `console` holds
//!    stdout/stderr chunks (`{"channel": "stdout", "data": "..."}`), `output` the cell's
//!    value (`{"mimetype", "data"}`), `status` goes `queued → running → idle`. A run ends with
//!    `completed-run`.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// How long one step (kernel start, one run) may take on a busy 2-core machine.
const STEP_TIMEOUT: Duration = Duration::from_secs(90);

/// A `marimo edit --headless` server on a free loopback port, started the way the runtimes
/// start one: in the notebook's directory, on its file, with a token file. Stopped with
/// SIGTERM (so it stops its kernels) when dropped.
pub struct Server {
    child: tokio::process::Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// `--base-url` (path mode), or `""` (Marimo at its root).
    pub base_url: String,
}

impl Server {
    /// Starts Marimo on `file` in `dir` (its working directory and `HOME`) with `token` (written
    /// to `<dir>/token`) and `base_url` (`""` for none); waits until `/health` answers 200.
    /// Its output is discarded.
    pub async fn start(dir: &Path, file: &Path, token: &str, base_url: &str) -> Server {
        let marimo = crate::venv::dir().join("bin/marimo");
        let pw = dir.join("token");
        std::fs::write(&pw, token).unwrap();
        let port = crate::venv::free_port();
        let mut cmd = tokio::process::Command::new(marimo);
        cmd.args(["edit", "--headless", "--host", "127.0.0.1", "--port"])
            .arg(port.to_string())
            .args(["--skip-update-check", "--token-password-file"])
            .arg(&pw);
        if !base_url.is_empty() {
            cmd.args(["--base-url", base_url]);
        }
        let child = cmd
            .arg(file)
            .current_dir(dir)
            .env("HOME", dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        let health = format!("http://127.0.0.1:{port}{base_url}/health");
        for _ in 0..200 {
            if let Ok(r) = http.get(&health).send().await {
                if r.status() == 200 {
                    return Server {
                        child,
                        port,
                        base_url: base_url.to_owned(),
                    };
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("marimo did not become healthy");
    }

    /// `127.0.0.1:<port>`, what a route's `upstream` holds.
    pub fn upstream(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // SIGTERM lets Marimo stop its kernel processes (SIGKILL would orphan them).
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status();
        }
    }
}

/// A client of a Marimo server: `upstream` is `host:port`, `base_url` its `--base-url` (path
/// mode).
pub struct Marimo {
    pub base: String,
    pub ws_base: String,
    token: String,
    http: reqwest::Client,
}

/// What one cell run produced.
#[derive(Debug, Default)]
pub struct CellRun {
    pub stdout: String,
    pub stderr: String,
    /// The last non-empty `output` (the cell's value, or an error description).
    pub output: Option<Value>,
}

/// An open editing session (a WebSocket plus the headers POSTs need).
pub struct Session {
    ws: Ws,
    marimo_base: String,
    token: String,
    http: reqwest::Client,
    pub session_id: String,
    pub server_token: String,
    /// The `kernel-ready` message.
    pub kernel_ready: Value,
}

impl Marimo {
    pub fn new(upstream: &str, base_url: Option<&str>, token: &str) -> Marimo {
        let base_path = base_url.unwrap_or("");
        Marimo {
            base: format!("http://{upstream}{base_path}"),
            ws_base: format!("ws://{upstream}{base_path}"),
            token: token.to_owned(),
            http: reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("HTTP client"),
        }
    }

    /// `GET <base><path>`, with the bearer token or without any credential.
    pub async fn get(&self, path: &str, authenticated: bool) -> reqwest::Response {
        let mut req = self.http.get(format!("{}{path}", self.base));
        if authenticated {
            req = req.bearer_auth(&self.token);
        }
        req.send().await.expect("GET to marimo")
    }

    /// The skew-protection token embedded in the page.
    pub async fn server_token(&self) -> Result<String, String> {
        let page = self.get("/", true).await;
        if !page.status().is_success() {
            return Err(format!("GET / answered {}", page.status()));
        }
        let html = page.text().await.map_err(|e| e.to_string())?;
        let key = "\"serverToken\": \"";
        let start = html.find(key).ok_or("no serverToken in the page")? + key.len();
        let len = html[start..].find('"').ok_or("unterminated serverToken")?;
        Ok(html[start..start + len].to_owned())
    }

    /// Opens the session `session_id` (`s_` + 6 of `[0-9a-z]`) and waits for `kernel-ready`.
    pub async fn connect(&self, session_id: &str) -> Result<Session, String> {
        let server_token = self.server_token().await?;
        let mut req = format!("{}/ws?session_id={session_id}", self.ws_base)
            .into_client_request()
            .map_err(|e| e.to_string())?;
        req.headers_mut().insert(
            "Authorization",
            format!("Bearer {}", self.token)
                .parse()
                .map_err(|_| "bad token header")?,
        );
        let (ws, _) = tokio_tungstenite::connect_async(req)
            .await
            .map_err(|e| format!("WebSocket: {e}"))?;
        let mut session = Session {
            ws,
            marimo_base: self.base.clone(),
            token: self.token.clone(),
            http: self.http.clone(),
            session_id: session_id.to_owned(),
            server_token,
            kernel_ready: Value::Null,
        };
        session.kernel_ready = session.wait_for("kernel-ready", |_| true).await?;
        Ok(session)
    }
}

impl Session {
    /// Reads messages until one with `op` satisfies `pred`; returns its `data`.
    pub async fn wait_for(
        &mut self,
        op: &str,
        mut pred: impl FnMut(&Value) -> bool,
    ) -> Result<Value, String> {
        let mut seen = Vec::new();
        tokio::time::timeout(STEP_TIMEOUT, async {
            loop {
                let data = self.next_message(&mut seen).await?;
                if data.get("op").and_then(Value::as_str) == Some(op) && pred(&data) {
                    return Ok(data);
                }
            }
        })
        .await
        .map_err(|_| format!("no {op} within {STEP_TIMEOUT:?}; ops seen: {seen:?}"))?
    }

    async fn next_message(&mut self, seen: &mut Vec<String>) -> Result<Value, String> {
        use futures_util::StreamExt;
        loop {
            let msg = self
                .ws
                .next()
                .await
                .ok_or("the WebSocket closed")?
                .map_err(|e| format!("WebSocket: {e}"))?;
            match msg {
                Message::Text(t) => {
                    let v: Value =
                        serde_json::from_str(t.as_str()).map_err(|e| format!("bad frame: {e}"))?;
                    let op = v
                        .get("op")
                        .and_then(Value::as_str)
                        .unwrap_or("?")
                        .to_owned();
                    seen.push(op);
                    return Ok(v.get("data").cloned().unwrap_or(Value::Null));
                }
                Message::Close(c) => return Err(format!("the WebSocket closed: {c:?}")),
                _ => continue,
            }
        }
    }

    /// `POST <base><path>` with the session's headers; the answer's status and JSON body.
    pub async fn post_json(&self, path: &str, body: Value) -> Result<(u16, Value), String> {
        let resp = self
            .http
            .post(format!("{}{path}", self.marimo_base))
            .bearer_auth(&self.token)
            .header("Marimo-Session-Id", &self.session_id)
            .header("Marimo-Server-Token", &self.server_token)
            .json(&body)
            .send()
            .await
            .map_err(|e| format!("POST {path}: {e}"))?;
        let status = resp.status().as_u16();
        let text = resp.text().await.map_err(|e| e.to_string())?;
        Ok((
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        ))
    }

    async fn post(&self, path: &str, body: Value) -> Result<(), String> {
        let (status, answer) = self.post_json(path, body).await?;
        if !(200..300).contains(&status) {
            return Err(format!("POST {path}: {status} {answer}"));
        }
        Ok(())
    }

    /// Runs every cell of the notebook (what opening it in a browser does).
    pub async fn instantiate(&mut self) -> Result<(), String> {
        self.post(
            "/api/kernel/instantiate",
            json!({"objectIds": [], "values": [], "autoRun": true}),
        )
        .await?;
        let done = self.wait_for("completed-run", |_| true).await?;
        match done.get("outcome").and_then(Value::as_str) {
            Some("succeeded") | None => Ok(()),
            Some(other) => Err(format!("instantiate: {other}: {done}")),
        }
    }

    /// Runs `code` as cell `cell_id` (registering it if new) and collects what it printed and
    /// returned.
    pub async fn run_cell(&mut self, cell_id: &str, code: &str) -> Result<CellRun, String> {
        self.post(
            "/api/kernel/run",
            json!({"cellIds": [cell_id], "codes": [code]}),
        )
        .await?;
        let mut run = CellRun::default();
        let mut seen = Vec::new();
        tokio::time::timeout(STEP_TIMEOUT, async {
            loop {
                let data = self.next_message(&mut seen).await?;
                match data.get("op").and_then(Value::as_str) {
                    Some("completed-run") => return Ok::<_, String>(()),
                    Some("cell-op") if data["cell_id"] == cell_id => {
                        collect(&mut run, &data);
                    }
                    _ => {}
                }
            }
        })
        .await
        .map_err(|_| format!("cell {cell_id} did not complete; ops seen: {seen:?}"))??;
        Ok(run)
    }
}

fn collect(run: &mut CellRun, data: &Value) {
    let console = match &data["console"] {
        Value::Array(items) => items.clone(),
        Value::Null => Vec::new(),
        one => vec![one.clone()],
    };
    for c in console {
        let text = c["data"].as_str().unwrap_or_default();
        match c["channel"].as_str() {
            Some("stdout") => run.stdout.push_str(text),
            Some("stderr") => run.stderr.push_str(text),
            _ => {}
        }
    }
    let out = &data["output"];
    if !out.is_null() && out["data"] != "" {
        run.output = Some(out.clone());
    }
}
