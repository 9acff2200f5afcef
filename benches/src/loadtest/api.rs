//! The host application's side: the control API, called with members' API keys, and the
//! organization the run sets up (owners, viewers in teams, notebooks shared with them).

use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

/// An API client for one base URL.
#[derive(Clone)]
pub struct Api {
    pub base: String,
    http: reqwest::Client,
}

/// An API answer: status and JSON (`Null` when empty).
pub struct Answer {
    pub status: u16,
    pub body: Value,
}

impl Answer {
    pub fn ok(self, want: u16, what: &str) -> Result<Value> {
        if self.status != want {
            bail!("{what}: {} {}", self.status, self.body);
        }
        Ok(self.body)
    }
}

impl Api {
    pub fn new(base: &str) -> Api {
        Api {
            base: base.to_owned(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("HTTP client"),
        }
    }

    pub async fn call(
        &self,
        key: &str,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<Answer> {
        let method: reqwest::Method = method.parse().context("method")?;
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(key);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.context("control API unreachable")?;
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        Ok(Answer { status, body })
    }

    /// A notebook as the API describes it (`included.notebooks[0]`).
    pub async fn notebook(&self, key: &str, id: &str) -> Result<Value> {
        let v = self
            .call(key, "GET", &format!("/workloads/notebooks/{id}"), None)
            .await?
            .ok(200, "describe notebook")?;
        Ok(v["included"]["notebooks"][0].clone())
    }

    /// `POST …/open`: the one-time URL.
    pub async fn open(&self, key: &str, id: &str) -> Result<Answer> {
        self.call(
            key,
            "POST",
            &format!("/workloads/notebooks/{id}/open"),
            None,
        )
        .await
    }
}

/// A member with an API key.
#[derive(Clone, Debug)]
pub struct Member {
    pub id: String,
    pub key: String,
}

/// One notebook of the run and the people around it.
#[derive(Clone, Debug)]
pub struct NotebookPlan {
    pub index: usize,
    pub id: String,
    pub owner: Member,
    pub viewers: Vec<Member>,
    /// The teams it is shared with and which viewers (by index) are in each.
    pub teams: Vec<(String, Vec<usize>)>,
    pub role: NotebookRole,
    /// The workload config (one for the whole run).
    pub config: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotebookRole {
    /// An owner working, viewers watching, through the edges.
    Active,
    /// The same traffic straight to Marimo: the baseline.
    Direct,
    /// A tab held open with no activity (goes `idle`, then is stopped by its idle timeout).
    IdleTab,
    /// A tab opened and closed (goes `detached`, then is stopped by the detached timeout).
    Detached,
}

pub async fn member(api: &Api, admin: &str, name: &str) -> Result<Member> {
    let m = api
        .call(
            admin,
            "POST",
            "/iam/members",
            Some(json!({"name": name, "role": "member"})),
        )
        .await?
        .ok(201, "create member")?;
    let id = m["id"].as_str().context("member id")?.to_owned();
    let k = api
        .call(
            admin,
            "POST",
            &format!("/iam/members/{id}/api-keys"),
            Some(json!({"name": "loadtest"})),
        )
        .await?
        .ok(201, "create key")?;
    Ok(Member {
        id,
        key: k["secret"].as_str().context("key secret")?.to_owned(),
    })
}

pub async fn team(api: &Api, admin: &str, name: &str, members: &[&Member]) -> Result<String> {
    let t = api
        .call(admin, "POST", "/iam/teams", Some(json!({"name": name})))
        .await?
        .ok(201, "create team")?;
    let id = t["id"].as_str().context("team id")?.to_owned();
    let ids: Vec<&str> = members.iter().map(|m| m.id.as_str()).collect();
    api.call(
        admin,
        "POST",
        &format!("/iam/teams/{id}/members"),
        Some(json!({"memberIds": ids})),
    )
    .await?
    .ok(200, "add team members")?;
    Ok(id)
}

/// Sets up the organization: one workload config, and per notebook an owner, its viewers in
/// one or two teams (two for notebook 0, whose second team the run unshares), the notebook
/// created by its owner and shared by the admin.
pub async fn populate(
    api: &Api,
    admin: &str,
    roles: &[NotebookRole],
    viewers: usize,
    idle_timeout_s: u64,
) -> Result<Vec<NotebookPlan>> {
    let cfg = api
        .call(
            admin,
            "POST",
            "/workloads/configs",
            Some(json!({"name": "Load test", "config": {"sail": {"maxRetries": 1}}})),
        )
        .await?
        .ok(201, "create workload config")?;
    let cfg = cfg["id"].as_str().context("config id")?.to_owned();
    let mut plans = Vec::new();
    for (index, role) in roles.iter().copied().enumerate() {
        let owner = member(api, admin, &format!("Owner {index}")).await?;
        let n_viewers = if role == NotebookRole::Active || role == NotebookRole::Direct {
            viewers
        } else {
            0
        };
        let mut vs = Vec::new();
        for v in 0..n_viewers {
            vs.push(member(api, admin, &format!("Viewer {index}.{v}")).await?);
        }
        let idle = if role == NotebookRole::IdleTab {
            idle_timeout_s
        } else {
            3600
        };
        let nb = api
            .call(
                &owner.key,
                "POST",
                "/workloads/notebooks",
                Some(
                    json!({"workloadConfigId": cfg, "name": format!("Load {index}"),
                            "idleTimeoutSeconds": idle}),
                ),
            )
            .await?
            .ok(201, "create notebook")?;
        let id = nb["item"]["notebookId"]
            .as_str()
            .context("notebook id")?
            .to_owned();
        // Notebook 0's viewers are split over two teams; the second is unshared mid-run.
        let split = if index == 0 && vs.len() >= 2 {
            vs.len() / 2
        } else {
            vs.len()
        };
        let mut teams = Vec::new();
        for (t, range) in [(0..split), (split..vs.len())].into_iter().enumerate() {
            if range.is_empty() {
                continue;
            }
            let members: Vec<&Member> = vs[range.clone()].iter().collect();
            let tid = team(api, admin, &format!("Team {index}.{t}"), &members).await?;
            api.call(
                admin,
                "POST",
                &format!("/workloads/notebooks/{id}/teams"),
                Some(json!({"teamIds": [tid]})),
            )
            .await?
            .ok(200, "share notebook")?;
            teams.push((tid, range.collect()));
        }
        plans.push(NotebookPlan {
            index,
            id,
            owner,
            viewers: vs,
            teams,
            role,
            config: cfg.clone(),
        });
    }
    Ok(plans)
}

/// Deletes what [`populate`] made: notebooks, then teams, members and the config. Returns what
/// could not be deleted.
pub async fn remove(api: &Api, admin: &str, plans: &[NotebookPlan]) -> Vec<String> {
    let mut paths = Vec::new();
    for p in plans {
        paths.push(format!("/workloads/notebooks/{}", p.id));
    }
    for p in plans {
        paths.extend(p.teams.iter().map(|(t, _)| format!("/iam/teams/{t}")));
    }
    for p in plans {
        paths.push(format!("/iam/members/{}", p.owner.id));
        paths.extend(p.viewers.iter().map(|v| format!("/iam/members/{}", v.id)));
    }
    if let Some(p) = plans.first() {
        paths.push(format!("/workloads/configs/{}", p.config));
    }
    let mut failures = Vec::new();
    for path in paths {
        match api.call(admin, "DELETE", &path, None).await {
            Ok(a) if a.status == 204 || a.status == 200 => {}
            Ok(a) => failures.push(format!("DELETE {path}: {} {}", a.status, a.body)),
            Err(e) => failures.push(format!("DELETE {path}: {e}")),
        }
    }
    failures
}
