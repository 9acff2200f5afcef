//! Test support: a real `marina serve` in a temporary data directory, on free loopback ports,
//! with the notebook Python environment of `scripts/setup-python.sh` (both from
//! `marina_testkit::venv`), and a small API client.
#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub use marina_testkit::venv::{dir as venv, free_port};

/// A running `marina serve`.
pub struct Marina {
    child: Child,
    pub dir: tempfile::TempDir,
    pub api: String,
    pub edge: String,
    pub edge_admin: String,
    pub admin_key: String,
    pub http: reqwest::Client,
}

impl Marina {
    /// Starts `marina serve` with extra `MARINA_*` settings and waits until it is ready.
    pub async fn start(settings: &[(&str, &str)]) -> Marina {
        Self::start_in(tempfile::tempdir().unwrap(), settings).await
    }

    /// As `start`, in an existing data directory (a restart).
    pub async fn start_in(dir: tempfile::TempDir, settings: &[(&str, &str)]) -> Marina {
        let (cp, ep, ap) = (free_port(), free_port(), free_port());
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_marina"));
        cmd.arg("serve")
            .arg("--data-dir")
            .arg(dir.path())
            .arg("--control-listen")
            .arg(format!("127.0.0.1:{cp}"))
            .arg("--proxy-listen")
            .arg(format!("127.0.0.1:{ep}"))
            .env("MARINA_PROXY__ADMIN_LISTEN", format!("127.0.0.1:{ap}"))
            .env("MARINA_RUNTIME__LOCAL__VENV_DIR", venv())
            .env("MARINA_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::from(
                std::fs::File::create(dir.path().join("serve.log")).unwrap(),
            ))
            .stderr(Stdio::from(
                std::fs::File::create(dir.path().join("serve.err")).unwrap(),
            ));
        for (k, v) in settings {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn marina serve");
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        let mut m = Marina {
            child,
            api: format!("http://127.0.0.1:{cp}"),
            edge: format!("http://127.0.0.1:{ep}"),
            edge_admin: format!("http://127.0.0.1:{ap}"),
            admin_key: String::new(),
            http,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(Some(status)) = m.child.try_wait() {
                panic!("marina serve exited ({status}):\n{}", m.logs());
            }
            let ready = m
                .http
                .get(format!("{}/readyz", m.api))
                .send()
                .await
                .map(|r| r.status().is_success());
            let key = std::fs::read_to_string(m.dir.path().join("admin-api-key")).ok();
            if let (Ok(true), Some(key)) = (ready, key) {
                m.admin_key = key.trim().to_owned();
                break;
            }
            assert!(
                Instant::now() < deadline,
                "marina serve not ready:\n{}",
                m.logs()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        m
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn logs(&self) -> String {
        let read = |n: &str| std::fs::read_to_string(self.dir.path().join(n)).unwrap_or_default();
        format!("{}{}", read("serve.log"), read("serve.err"))
    }

    /// An API call as `key`; returns status and JSON body (Null when empty).
    pub async fn call(
        &self,
        key: &str,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let url = format!("{}{}", self.api, path);
        let mut req = self
            .http
            .request(method.parse().unwrap(), url)
            .header("Authorization", format!("Bearer {key}"));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("API request");
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        (status, value)
    }

    /// As `call`, asserting the status.
    pub async fn ok(
        &self,
        key: &str,
        method: &str,
        path: &str,
        body: Option<Value>,
        want: u16,
    ) -> Value {
        let (status, value) = self.call(key, method, path, body).await;
        assert_eq!(
            status,
            want,
            "{method} {path} -> {status} {value}\n{}",
            tail(&self.logs(), 30)
        );
        value
    }

    /// A workload config and a notebook owned by the admin; returns the notebook id.
    pub async fn create_notebook(&self, name: &str) -> String {
        let cfg = self
            .ok(
                &self.admin_key,
                "POST",
                "/workloads/configs",
                Some(json!({"name": "Local", "config": {"sail": {}}})),
                201,
            )
            .await;
        let cfg_id = cfg["id"].as_str().expect("config id").to_owned();
        let nb = self
            .ok(
                &self.admin_key,
                "POST",
                "/workloads/notebooks",
                Some(json!({"workloadConfigId": cfg_id, "name": name})),
                201,
            )
            .await;
        nb["item"]["notebookId"]
            .as_str()
            .expect("notebook id")
            .to_owned()
    }

    /// Polls the notebook until its status is one of `want` (`|`-separated; panics on `failed`
    /// unless wanted).
    pub async fn wait_status(&self, id: &str, want: &str, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let v = self
                .ok(
                    &self.admin_key,
                    "GET",
                    &format!("/workloads/notebooks/{id}"),
                    None,
                    200,
                )
                .await;
            let nb = v["included"]["notebooks"][0].clone();
            let status = nb["status"].as_str().unwrap_or_default().to_owned();
            if want.split('|').any(|w| w == status) {
                return nb;
            }
            if status == "failed" && !want.contains("failed") {
                panic!("notebook failed: {nb}\n{}", tail(&self.logs(), 40));
            }
            assert!(
                Instant::now() < deadline,
                "notebook still {status}, wanted {want}: {nb}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Kills the server the hard way (a crash), keeping its data directory.
    pub fn crash(mut self) -> tempfile::TempDir {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
        drop(self);
        dir
    }

    /// Stops the server as a person would (SIGTERM) and waits for it.
    pub fn terminate(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Marina {
    fn drop(&mut self) {
        self.terminate();
    }
}

pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Processes whose command line mentions `needle` (other than this test process).
pub fn processes_mentioning(needle: &str) -> Vec<String> {
    let me = std::process::id();
    let mut found = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            if pid == me {
                continue;
            }
            if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
                let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
                if cmd.contains(needle) {
                    found.push(format!("{pid}: {cmd}"));
                }
            }
        }
    }
    found
}

/// A browser's session with the edge: the cookie it got from the handshake.
pub struct EdgeSession {
    pub cookie: String,
    pub base: String,
    pub origin: String,
}

/// Redeems a one-time URL like a browser would; returns the session and the raw response.
pub async fn redeem(
    http: &reqwest::Client,
    url: &str,
) -> Result<(EdgeSession, reqwest::header::HeaderMap), (u16, String)> {
    let resp = http.get(url).send().await.expect("handshake request");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    if status != 303 {
        return Err((status, resp.text().await.unwrap_or_default()));
    }
    let set_cookie = headers
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let cookie = set_cookie.split(';').next().unwrap_or_default().to_owned();
    let location = headers
        .get("location")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let origin = url.splitn(4, '/').take(3).collect::<Vec<_>>().join("/");
    let base = if location.starts_with("http") {
        location.to_owned()
    } else {
        format!("{origin}{location}")
    };
    Ok((
        EdgeSession {
            cookie,
            base,
            origin,
        },
        headers,
    ))
}
