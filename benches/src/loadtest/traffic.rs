//! The people: owners working, viewers watching (and now and then trying what a viewer may
//! not), idle tabs. Each is a task that behaves like a browser does when things fail: a socket
//! that drops is reopened with back-off, on another replica if its own does not answer, with
//! the same cookie; when the cookie stops working the tab re-opens through the API, as the
//! host application would.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::Rng;
use serde_json::json;
use tokio::sync::{mpsc, watch};

use super::api::{Api, Member, NotebookPlan, NotebookRole};
use super::record::{Actor, Recorder, Role, Via};
use super::tab::{self, Auth, Ended, Failure, Tab, Ws};

/// How the people behave.
#[derive(Clone, Debug)]
pub struct Behaviour {
    /// Owner think time between actions, ms.
    pub think_ms: (u64, u64),
    /// Sizes of the large outputs (bytes of HTML in one cell output).
    pub large_bytes: Vec<usize>,
    /// Assets a tab loads with the page.
    pub assets: usize,
    /// Seconds between a viewer's forbidden attempts.
    pub attempt_every_s: f64,
}

/// What every actor shares.
pub struct World {
    pub rec: Recorder,
    pub api: Api,
    pub public_url: String,
    pub edges: Vec<String>,
    pub internal_token: String,
    pub behaviour: Behaviour,
    pub stop: watch::Receiver<bool>,
    /// Viewers whose team was unshared: (notebook, viewer).
    pub revoked: Mutex<HashSet<(usize, usize)>>,
    /// When the unshare call answered (run seconds).
    pub revoked_at: Mutex<Option<f64>>,
    /// The owner's Marimo session id per notebook (what an attacking viewer would present).
    pub owner_sid: Mutex<HashMap<usize, String>>,
    /// Notebook → when its owner ran a cell again after a restart.
    pub owner_back: Mutex<HashMap<usize, f64>>,
    /// Notebook → unix seconds of each owner action that counts as activity.
    pub owner_actions: Mutex<HashMap<usize, Vec<f64>>>,
}

pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl World {
    fn stopping(&self) -> bool {
        *self.stop.borrow()
    }

    /// Sleeps `d`, or less when the run ends. Returns whether the run goes on.
    async fn sleep(&self, d: Duration) -> bool {
        let mut stop = self.stop.clone();
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = stop.wait_for(|s| *s) => {}
        }
        !self.stopping()
    }

    fn acted(&self, nb: usize) {
        self.owner_actions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(nb)
            .or_default()
            .push(unix_now());
    }

    fn is_revoked(&self, nb: usize, v: usize) -> bool {
        self.revoked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&(nb, v))
    }

    /// The notebook's Marimo address and token, from the routes feed (for the baseline).
    async fn direct_target(&self, notebook_id: &str) -> Option<(String, String)> {
        let v: serde_json::Value = reqwest::Client::new()
            .get(format!("{}/internal/v1/routes", self.api.base))
            .bearer_auth(&self.internal_token)
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        let r = v["routes"]
            .as_array()?
            .iter()
            .find(|r| r["notebookId"] == notebook_id)?;
        Some((
            r["upstream"].as_str()?.to_owned(),
            r["upstreamToken"].as_str()?.to_owned(),
        ))
    }
}

/// Why a connection attempt failed.
enum ConnectError {
    /// `open` says the notebook is not up (409).
    NotRunning,
    /// `open` says the caller cannot see the notebook (403/404).
    NoAccess,
    Failed(String),
}

/// Opens a tab on the notebook: reuses `tab` (its cookie) when there is one, else re-opens
/// through the API. Moves to the next replica when one does not answer.
async fn connect(
    w: &World,
    nb: &NotebookPlan,
    who: &Member,
    kiosk: bool,
    edge: &mut usize,
    tab: &mut Option<Tab>,
) -> Result<Ws, ConnectError> {
    let rec = &w.rec;
    if nb.role == NotebookRole::Direct {
        let (upstream, token) = w.direct_target(&nb.id).await.ok_or(ConnectError::Failed(
            "no route for the direct notebook".into(),
        ))?;
        let t = tab.get_or_insert_with(|| Tab {
            base: String::new(),
            via: Via::Direct,
            auth: Auth::Bearer(String::new()),
            origin: String::new(),
            kiosk,
            session_id: tab::session_id(),
            skew: String::new(),
            filename: String::new(),
            http: tab::client(),
        });
        t.base = format!("http://{upstream}/notebooks/{}/", nb.id);
        t.origin = format!("http://{upstream}");
        t.auth = Auth::Bearer(token);
        return open_page_and_ws(w, t, "direct_").await;
    }
    // With a cookie: the socket again, on this replica or the next ones.
    if let Some(t) = tab.as_mut() {
        for _ in 0..w.edges.len() {
            let started = Instant::now();
            match t.open_ws().await {
                Ok(ws) => {
                    rec.latency("ws_connect", started.elapsed());
                    return Ok(ws);
                }
                Err(Failure::Unreachable(_)) if t.origin == w.public_url => {
                    *edge = (*edge + 1) % w.edges.len();
                    t.move_to(&w.edges[*edge], *edge);
                }
                Err(Failure::Status(401 | 403 | 404, _)) => {
                    // The cookie stopped working (new session, lost access): re-open below.
                    *tab = None;
                    break;
                }
                Err(e) => return Err(ConnectError::Failed(format!("ws: {e}"))),
            }
        }
    }
    if tab.is_none() {
        let started = Instant::now();
        let answer = w
            .api
            .open(&who.key, &nb.id)
            .await
            .map_err(|e| ConnectError::Failed(format!("open: {e}")))?;
        match answer.status {
            200 => rec.latency("open", started.elapsed()),
            409 => return Err(ConnectError::NotRunning),
            403 | 404 => return Err(ConnectError::NoAccess),
            s => return Err(ConnectError::Failed(format!("open: {s} {}", answer.body))),
        }
        let url = answer.body["url"].as_str().unwrap_or_default().to_owned();
        let http = tab::client();
        let mut last = String::new();
        // Path mode: the URL names the public origin, and any replica serves it (a load
        // balancer's job, done here by the client). Subdomain mode: the notebook's own origin.
        let origin = tab::origin_of(&url);
        let spread = origin == w.public_url;
        for _ in 0..w.edges.len() {
            let started = Instant::now();
            let at = if spread {
                w.edges[*edge].clone()
            } else {
                origin.clone()
            };
            match tab::redeem(&http, &url, &origin, &at).await {
                Ok((cookie, base)) => {
                    rec.latency("handshake", started.elapsed());
                    *tab = Some(Tab {
                        base,
                        via: Via::Edge(*edge),
                        auth: Auth::Cookie(cookie),
                        origin: origin.clone(),
                        kiosk,
                        session_id: tab::session_id(),
                        skew: String::new(),
                        filename: String::new(),
                        http: http.clone(),
                    });
                    break;
                }
                Err(Failure::Unreachable(e)) => {
                    last = e;
                    *edge = (*edge + 1) % w.edges.len();
                }
                Err(e) => return Err(ConnectError::Failed(format!("handshake: {e}"))),
            }
        }
        if tab.is_none() {
            return Err(ConnectError::Failed(format!(
                "handshake: no replica answers: {last}"
            )));
        }
    }
    let t = tab.as_mut().expect("set above");
    match open_page_and_ws(w, t, "").await {
        Err(ConnectError::Failed(e)) if e.contains("HTTP 401") || e.contains("HTTP 403") => {
            *tab = None;
            Err(ConnectError::Failed(e))
        }
        other => other,
    }
}

async fn open_page_and_ws(w: &World, t: &mut Tab, prefix: &str) -> Result<Ws, ConnectError> {
    let started = Instant::now();
    t.load_page(w.behaviour.assets)
        .await
        .map_err(|e| ConnectError::Failed(format!("page: {e}")))?;
    w.rec.latency(&format!("{prefix}page"), started.elapsed());
    let started = Instant::now();
    let ws = t
        .open_ws()
        .await
        .map_err(|e| ConnectError::Failed(format!("ws: {e}")))?;
    w.rec
        .latency(&format!("{prefix}ws_connect"), started.elapsed());
    Ok(ws)
}

enum Event {
    Marker(String, Instant),
    Ended(Ended),
}

/// Runs the socket's reader in a task of its own, counted as an open socket through `via`.
fn spawn_reader(
    rec: &Recorder,
    via: Via,
    previous: Option<Via>,
    ws: Ws,
    on_marker: impl FnMut(&str, Instant) + Send + 'static,
    done: impl FnOnce(Ended) + Send + 'static,
) -> Reader {
    rec.socket_opened(via, previous);
    let counted = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let task_rec = rec.clone();
    let task_counted = counted.clone();
    let task = tokio::spawn(async move {
        let ended = tab::read_markers(ws, on_marker).await;
        if task_counted.swap(false, std::sync::atomic::Ordering::SeqCst) {
            task_rec.socket_closed(via);
        }
        done(ended);
    });
    Reader {
        task,
        rec: rec.clone(),
        via,
        counted,
    }
}

/// Aborts the reader when dropped (the run ended or the tab moved on), counting the socket
/// closed exactly once.
struct Reader {
    task: tokio::task::JoinHandle<()>,
    rec: Recorder,
    via: Via,
    counted: Arc<std::sync::atomic::AtomicBool>,
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.task.abort();
        if self
            .counted
            .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            self.rec.socket_closed(self.via);
        }
    }
}

/// Back-off between reconnect attempts, as Marimo's frontend does (growing, capped).
fn backoff(attempt: u32) -> Duration {
    Duration::from_millis((250u64 << attempt.min(4)).min(4000))
}

// === owners ===

/// The cells an owner runs (fixed ids, so the notebook does not grow).
fn cell_code(kind: &str, marker: &str, seq: u64, bytes: usize) -> (&'static str, String) {
    match kind {
        "run_text" => ("lttext0001", format!("print('{marker}')")),
        "run_large" => (
            "ltlarge001",
            format!("import marimo as mo\nmo.Html('<pre>{marker}</pre><i>' + 'x' * {bytes} + '</i>')"),
        ),
        _ => (
            "ltspark001",
            format!(
                "from pyspark.sql import SparkSession as _S\n_v = _S.builder.getOrCreate().sql('select {seq} as v').collect()[0].v\nprint('LTMARK' + '{nb}x' + str(_v) + 'Z')",
                nb = marker
                    .trim_start_matches("LTMARK")
                    .split('x')
                    .next()
                    .unwrap_or_default()
            ),
        ),
    }
}

pub async fn owner(w: Arc<World>, nb: NotebookPlan) {
    let actor = Actor {
        notebook: Some(nb.index),
        role: Role::Owner,
        client: 0,
    };
    let direct = nb.role == NotebookRole::Direct;
    let prefix = if direct { "direct_" } else { "" };
    let mut edge = nb.index % w.edges.len();
    let mut tab: Option<Tab> = None;
    let mut seq = 0u64;
    let mut attempt = 0u32;
    let mut cells: Vec<(&'static str, String)> = Vec::new();
    let mut restarted = false;
    let mut prev_via: Option<Via> = None;
    while !w.stopping() {
        let ws = match connect(&w, &nb, &nb.owner, false, &mut edge, &mut tab).await {
            Ok(ws) => ws,
            Err(e) => {
                let via = tab.as_ref().map(|t| t.via).unwrap_or(Via::Api);
                match e {
                    ConnectError::NotRunning => {
                        // The host application starts a failed notebook again.
                        if ensure_started(&w, &actor, &nb).await {
                            restarted = true;
                            tab = None;
                        }
                    }
                    ConnectError::NoAccess => w.rec.error(&actor, Via::Api, "open: owner refused"),
                    ConnectError::Failed(msg) => {
                        w.rec.error(&actor, via, msg);
                        if attempt >= 3 && ensure_started(&w, &actor, &nb).await {
                            restarted = true;
                            tab = None;
                        }
                    }
                }
                attempt += 1;
                if !w.sleep(backoff(attempt)).await {
                    break;
                }
                continue;
            }
        };
        attempt = 0;
        let Some(t) = tab.as_ref() else { continue };
        if !direct {
            w.acted(nb.index);
        }
        w.owner_sid
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(nb.index, t.session_id.clone());
        let (tx, mut rx) = mpsc::unbounded_channel();
        let tx2 = tx.clone();
        let reader = spawn_reader(
            &w.rec,
            t.via,
            prev_via.replace(t.via),
            ws,
            move |m, at| {
                let _ = tx.send(Event::Marker(m.to_owned(), at));
            },
            move |e| {
                let _ = tx2.send(Event::Ended(e));
            },
        );
        let mut last_poll = Instant::now();
        let mut last_ping = Instant::now() - Duration::from_secs(60);
        'work: loop {
            let think = {
                let (lo, hi) = w.behaviour.think_ms;
                rand::thread_rng().gen_range(lo..=hi.max(lo))
            };
            if !w.sleep(Duration::from_millis(think)).await {
                break;
            }
            if last_poll.elapsed() >= Duration::from_secs(10) {
                last_poll = Instant::now();
                poll(&w, &actor, t, prefix).await;
            }
            if direct && last_ping.elapsed() >= Duration::from_secs(5) {
                // No edge sees this tab: the host application's ping is its only activity
                // (every 5 s here, for the run's 20 s idle threshold; hosts ping every 60 s
                // against the default 300 s).
                last_ping = Instant::now();
                let path = format!("/workloads/notebooks/{}/ping", nb.id);
                match w.api.call(&nb.owner.key, "POST", &path, None).await {
                    Ok(a) if a.status < 300 => w.acted(nb.index),
                    Ok(a) => w.rec.error(&actor, Via::Api, format!("ping: {}", a.status)),
                    Err(e) => w.rec.error(&actor, Via::Api, format!("ping: {e}")),
                }
            }
            // A socket that ended while thinking.
            while let Ok(ev) = rx.try_recv() {
                if let Event::Ended(e) = ev {
                    w.rec
                        .error(&actor, t.via, format!("owner socket ended: {e:?}"));
                    break 'work;
                }
            }
            let pick: f64 = rand::thread_rng().gen();
            let kind = if pick < 0.45 {
                "run_text"
            } else if pick < 0.65 {
                "run_spark"
            } else if pick < 0.85 {
                "run_large"
            } else {
                "save"
            };
            if !direct {
                w.acted(nb.index);
            }
            if kind == "save" {
                if cells.is_empty() {
                    continue;
                }
                let started = Instant::now();
                let n = cells.len();
                let body = json!({
                    "cellIds": cells.iter().map(|c| c.0).collect::<Vec<_>>(),
                    "codes": cells.iter().map(|c| c.1.clone()).collect::<Vec<_>>(),
                    "names": vec!["_"; n],
                    "configs": vec![json!({}); n],
                    "filename": t.filename,
                    "persist": true,
                });
                match t.post("api/kernel/save", body).await {
                    Ok(200) => w.rec.latency(&format!("{prefix}save"), started.elapsed()),
                    Ok(s) => w.rec.error(&actor, t.via, format!("save: HTTP {s}")),
                    Err(e) => w.rec.error(&actor, t.via, format!("save: {e}")),
                }
                continue;
            }
            seq += 1;
            let marker = tab::marker(nb.index, seq);
            let bytes = if kind == "run_large" {
                let sizes = &w.behaviour.large_bytes;
                sizes[rand::thread_rng().gen_range(0..sizes.len())]
            } else {
                marker.len()
            };
            let (cell, code) = cell_code(kind, &marker, seq, bytes);
            match cells.iter_mut().find(|c| c.0 == cell) {
                Some(c) => c.1 = code.clone(),
                None => cells.push((cell, code.clone())),
            }
            let started = Instant::now();
            let output = {
                let mut g = w.rec.lock();
                g.outputs.push(super::record::Output {
                    notebook: nb.index,
                    marker: marker.clone(),
                    kind: match kind {
                        "run_text" => "text",
                        "run_large" => "large",
                        _ => "spark",
                    },
                    bytes,
                    run_at_s: w.rec.at(started),
                    owner_seen_at_s: None,
                });
                g.outputs.len() - 1
            };
            match t
                .post(
                    "api/kernel/run",
                    json!({"cellIds": [cell], "codes": [code]}),
                )
                .await
            {
                Ok(200) => {}
                Ok(s) => {
                    w.rec.error(&actor, t.via, format!("{kind}: HTTP {s}"));
                    continue;
                }
                Err(e) => {
                    w.rec.error(&actor, t.via, format!("{kind}: {e}"));
                    continue;
                }
            }
            // Wait for the output on the owner's own socket.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
            loop {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(Event::Marker(m, at))) if m == marker => {
                        w.rec.latency(&format!("{prefix}{kind}"), at - started);
                        w.rec.lock().outputs[output].owner_seen_at_s = Some(w.rec.at(at));
                        if restarted {
                            restarted = false;
                            w.owner_back
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .insert(nb.index, w.rec.now());
                        }
                        break;
                    }
                    Ok(Some(Event::Marker(..))) => {}
                    Ok(Some(Event::Ended(e))) => {
                        if !w.stopping() {
                            w.rec
                                .error(&actor, t.via, format!("owner socket ended: {e:?}"));
                        }
                        break 'work;
                    }
                    Ok(None) => break 'work,
                    Err(_) => {
                        w.rec
                            .error(&actor, t.via, format!("{kind}: no output within 90 s"));
                        break;
                    }
                }
            }
        }
        drop(reader);
    }
}

/// When the notebook is `failed` (or stopped), starts it and waits until it is up. Returns
/// whether it was started.
async fn ensure_started(w: &World, actor: &Actor, nb: &NotebookPlan) -> bool {
    let Ok(n) = w.api.notebook(&nb.owner.key, &nb.id).await else {
        return false;
    };
    let status = n["status"].as_str().unwrap_or_default();
    if status != "failed" && status != "stopped" {
        return false;
    }
    // What the owner saw is part of the status history (the sampler reads once a second and
    // can miss a short `failed`).
    {
        let now = w.rec.now();
        let msg = n["statusMessage"].as_str().unwrap_or_default().to_owned();
        let mut g = w.rec.lock();
        let h = g.statuses.entry(nb.index).or_default();
        h.push((now, status.to_owned(), msg));
        h.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    w.rec.note(format!(
        "t={:.1}s notebook {} was {status} ({}); its owner starts it again",
        w.rec.now(),
        nb.index,
        n["statusMessage"].as_str().unwrap_or_default()
    ));
    let started = Instant::now();
    match w
        .api
        .call(
            &nb.owner.key,
            "POST",
            &format!("/workloads/notebooks/{}/start", nb.id),
            None,
        )
        .await
    {
        Ok(a) if a.status == 200 => {}
        Ok(a) => {
            w.rec
                .error(actor, Via::Api, format!("start: {} {}", a.status, a.body));
            return false;
        }
        Err(e) => {
            w.rec.error(actor, Via::Api, format!("start: {e}"));
            return false;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(180);
    while Instant::now() < deadline && !w.stopping() {
        if let Ok(n) = w.api.notebook(&nb.owner.key, &nb.id).await {
            match n["status"].as_str().unwrap_or_default() {
                "running" | "idle" | "detached" => {
                    w.rec.latency("restart", started.elapsed());
                    return true;
                }
                "failed" => {
                    w.rec.error(
                        actor,
                        Via::Api,
                        format!("restart failed: {}", n["statusMessage"]),
                    );
                    return false;
                }
                _ => {}
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    false
}

/// The UI's timers: `/api/usage` (every 10 s per tab) and `/health`.
async fn poll(w: &World, actor: &Actor, t: &Tab, prefix: &str) {
    for path in ["api/usage", "health"] {
        let started = Instant::now();
        match t.get(path).await {
            Ok(r) if r.status().is_success() => {
                let _ = r.bytes().await;
                w.rec.latency(&format!("{prefix}poll"), started.elapsed());
            }
            Ok(r) => w
                .rec
                .error(actor, t.via, format!("poll {path}: HTTP {}", r.status())),
            Err(e) => w.rec.error(actor, t.via, format!("poll {path}: {e}")),
        }
    }
}

// === viewers ===

pub async fn viewer(w: Arc<World>, nb: NotebookPlan, v: usize) {
    let actor = Actor {
        notebook: Some(nb.index),
        role: Role::Viewer,
        client: v,
    };
    let direct = nb.role == NotebookRole::Direct;
    let prefix = if direct { "direct_" } else { "" };
    let who = nb.viewers[v].clone();
    let mut edge = (nb.index + v + 1) % w.edges.len();
    let mut tab: Option<Tab> = None;
    let mut attempt = 0u32;
    let mut prev_via: Option<Via> = None;
    // A kiosk mirrors the owner's session: until the owner has one, Marimo answers
    // MARIMO_NO_SESSION. Viewers arrive once the owner is working, as on a shared link.
    while !w.stopping()
        && !w
            .owner_sid
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&nb.index)
    {
        w.sleep(Duration::from_millis(200)).await;
    }
    while !w.stopping() {
        let ws = match connect(&w, &nb, &who, true, &mut edge, &mut tab).await {
            Ok(ws) => ws,
            Err(ConnectError::NoAccess) if w.is_revoked(nb.index, v) => {
                w.rec.note(format!(
                    "t={:.1}s viewer {}.{v}, whose team was unshared, is refused by open (as it must be)",
                    w.rec.now(),
                    nb.index
                ));
                return;
            }
            Err(e) => {
                let via = tab.as_ref().map(|t| t.via).unwrap_or(Via::Api);
                let msg = match e {
                    ConnectError::NotRunning => "open: notebook not running".to_owned(),
                    ConnectError::NoAccess => "open: viewer refused".to_owned(),
                    ConnectError::Failed(m) => m,
                };
                w.rec.error(&actor, via, msg);
                attempt += 1;
                if !w.sleep(backoff(attempt)).await {
                    break;
                }
                continue;
            }
        };
        let Some(t) = tab.as_ref() else { continue };
        let opened = Instant::now();
        let opened_at = w.rec.now();
        let key = (nb.index, v);
        w.rec
            .lock()
            .viewer_sockets
            .entry(key)
            .or_default()
            .push((opened_at, None));
        let (tx, mut rx) = mpsc::unbounded_channel::<Ended>();
        let rec = w.rec.clone();
        let rec2 = w.rec.clone();
        let reader = spawn_reader(
            &w.rec,
            t.via,
            prev_via.replace(t.via),
            ws,
            move |m, at| {
                let at = rec.at(at);
                rec.lock()
                    .viewer_received
                    .entry(key)
                    .or_default()
                    .entry(m.to_owned())
                    .or_insert(at);
            },
            move |e| {
                let now = rec2.now();
                if let Some(last) = rec2
                    .lock()
                    .viewer_sockets
                    .get_mut(&key)
                    .and_then(|s| s.last_mut())
                {
                    last.1 = Some(now);
                }
                let _ = tx.send(e);
            },
        );
        let mut last_poll = Instant::now();
        let mut next_attempt = jitter(w.behaviour.attempt_every_s);
        loop {
            tokio::select! {
                ended = rx.recv() => {
                    if w.is_revoked(nb.index, v) {
                        let at = w.rec.now();
                        let since = w.revoked_at.lock().unwrap_or_else(|p| p.into_inner()).unwrap_or(at);
                        w.rec.lock().revocations.push((format!("viewer {}.{v}", nb.index), Some(at - since)));
                    } else if matches!(&ended, Some(Ended::Closed(r)) if r.contains("MARIMO_NO_SESSION")) {
                        // The owner's session is gone (its notebook restarts): the page waits.
                    } else if !w.stopping() {
                        w.rec.error(&actor, t.via, format!("viewer socket ended: {ended:?}"));
                    }
                    break;
                }
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
            if w.stopping() {
                break;
            }
            if last_poll.elapsed() >= Duration::from_secs(10) {
                last_poll = Instant::now();
                poll(&w, &actor, t, prefix).await;
            }
            if !direct && Instant::now() >= next_attempt && !w.is_revoked(nb.index, v) {
                next_attempt = jitter(w.behaviour.attempt_every_s);
                forbidden_attempt(&w, &actor, t).await;
            }
        }
        drop(reader);
        if w.is_revoked(nb.index, v) {
            // Its socket is gone; the next connect re-opens through the API and is refused.
            tab = None;
        }
        // Back off unless the socket lived a while (a browser does not hammer a failing server).
        if opened.elapsed() >= Duration::from_secs(5) {
            attempt = 0;
        } else {
            attempt += 1;
            if !w.sleep(backoff(attempt)).await {
                break;
            }
        }
    }
}

fn jitter(every_s: f64) -> Instant {
    let f: f64 = rand::thread_rng().gen_range(0.5..1.5);
    Instant::now() + Duration::from_secs_f64(every_s * f)
}

/// One thing a viewer may not do, tried through the edge: each must be refused.
async fn forbidden_attempt(w: &World, actor: &Actor, t: &Tab) {
    let owner_sid = w
        .owner_sid
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&actor.notebook.unwrap_or(0))
        .cloned()
        .unwrap_or_else(|| "s_000000".into());
    let pick = rand::thread_rng().gen_range(0..8);
    let run = json!({"cellIds": ["ltviewer01"], "codes": ["print('viewer was here')"]});
    let (name, result): (&str, Result<u16, Failure>) = match pick {
        0 => ("run", t.post("api/kernel/run", run).await),
        1 => ("run as the owner", t.post_as("api/kernel/run", &owner_sid, run).await),
        2 => (
            "save",
            t.post(
                "api/kernel/save",
                json!({"cellIds": [], "codes": [], "names": [], "configs": [], "filename": t.filename}),
            )
            .await,
        ),
        3 => ("takeover", t.post("api/kernel/takeover", json!({})).await),
        4 => (
            "execute",
            t.post("api/kernel/execute", json!({"code": "print('viewer was here')"})).await,
        ),
        5 => (
            "terminal",
            match t.open_socket("terminal/ws").await {
                Ok(_) => Ok(101),
                Err(Failure::Status(s, _)) => Ok(s),
                Err(e) => Err(e),
            },
        ),
        6 => (
            "editor socket with the owner's session id",
            // The edge may let the socket through as a kiosk under an id derived from the
            // viewer: that is a refusal. An editor session (`kiosk: false`) is a success.
            match t.open_socket(&format!("ws?session_id={owner_sid}")).await {
                Ok(ws) => match kernel_ready_kiosk(ws).await {
                    Some(true) => Ok(403),
                    Some(false) => Ok(101),
                    None => Err(Failure::Other("no kernel-ready on the socket".into())),
                },
                Err(Failure::Status(s, _)) => Ok(s),
                Err(e) => Err(e),
            },
        ),
        _ => (
            "list sessions",
            match t.get("api/sessions").await {
                Ok(r) => Ok(r.status().as_u16()),
                Err(e) => Err(e),
            },
        ),
    };
    match result {
        Ok(status) => {
            let mut g = w.rec.lock();
            g.viewer_mutations_tried += 1;
            let ok = (200..300).contains(&status) || status == 101;
            if ok {
                g.viewer_mutations_succeeded += 1;
            }
            *g.viewer_mutations_detail
                .entry(format!(
                    "{name}: {}",
                    if ok {
                        "SUCCEEDED".to_owned()
                    } else {
                        status.to_string()
                    }
                ))
                .or_default() += 1;
        }
        Err(e) => w
            .rec
            .error(actor, t.via, format!("forbidden attempt {name}: {e}")),
    }
}

/// Reads a socket up to Marimo's `kernel-ready` and says whether it is a kiosk (read-only).
async fn kernel_ready_kiosk(mut ws: Ws) -> Option<bool> {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await.ok()?? {
            Ok(Message::Text(t)) if t.contains("\"kernel-ready\"") => {
                let v: serde_json::Value = serde_json::from_str(&t).ok()?;
                return v["data"]["kiosk"].as_bool();
            }
            Ok(Message::Close(_)) | Err(_) => return None,
            Ok(_) => {}
        }
    }
}

// === idle and detached tabs ===

/// The owner's tab on the idle-tab notebook (held open, polling only: `idle`, then stopped by
/// its idle timeout) or the detached one (closed after a few seconds: `detached`, then stopped
/// by the detached timeout).
pub async fn quiet_tab(w: Arc<World>, nb: NotebookPlan, hold: Option<Duration>) {
    let actor = Actor {
        notebook: Some(nb.index),
        role: Role::IdleTab,
        client: 0,
    };
    // Replica 0: the fault plan kills the last one, and an idle tab must stay open to be idle.
    let mut edge = 0;
    let mut tab: Option<Tab> = None;
    let mut attempt = 0;
    let ws = loop {
        match connect(&w, &nb, &nb.owner, false, &mut edge, &mut tab).await {
            Ok(ws) => break ws,
            Err(e) => {
                attempt += 1;
                if attempt > 10 || !w.sleep(backoff(attempt)).await {
                    let msg = match e {
                        ConnectError::Failed(m) => m,
                        _ => "open refused".into(),
                    };
                    w.rec.error(&actor, Via::Api, format!("quiet tab: {msg}"));
                    return;
                }
            }
        }
    };
    w.acted(nb.index);
    let Some(t) = tab.as_ref() else { return };
    let (tx, mut rx) = mpsc::unbounded_channel::<Ended>();
    let reader = spawn_reader(
        &w.rec,
        t.via,
        None,
        ws,
        |_, _| {},
        move |e| {
            let _ = tx.send(e);
        },
    );
    if let Some(hold) = hold {
        w.sleep(hold).await;
        drop(reader);
        w.rec.note(format!(
            "t={:.1}s the detached notebook's only tab closed",
            w.rec.now()
        ));
        return;
    }
    let mut last_poll = Instant::now() - Duration::from_secs(10);
    loop {
        tokio::select! {
            ended = rx.recv() => {
                // Expected once the monitor stops the notebook for idleness; the checks
                // compare this with the notebook's status history.
                w.rec.note(format!("t={:.1}s the idle tab's socket ended: {ended:?}", w.rec.now()));
                break;
            }
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        if w.stopping() {
            break;
        }
        if last_poll.elapsed() >= Duration::from_secs(10) {
            last_poll = Instant::now();
            for path in ["api/usage", "health"] {
                let _ = t.get(path).await;
            }
        }
    }
    drop(reader);
}
