//! The lifecycle against a real store and a runtime that binds real ports: start/stop/open/
//! ping, retries and timeouts, concurrent calls, the monitor, the routes feed and
//! revocation, one-time token redemption, and reconciliation after a restart.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::http::{Method, StatusCode};
use common::follower::Follower;
use common::{code, Harness, Store};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use marina_config::wire::{AccessMode, UrlClaims};
use serde_json::{json, Value};

async fn start_open_ping_stop(store: Store) {
    let mut h = Harness::new(store).await;
    h.start_monitor().await;
    let cfg = h.config(&h.admin, 3).await;
    let (member, member_key) = h.member(&h.admin, "member").await;
    let team = h.team(&h.admin, &[&member]).await;
    let nb = h.notebook(&h.admin, &cfg, &[&team]).await;

    // Not running: open, ping and stop are 409.
    for action in ["open", "ping", "stop"] {
        let (s, v) = h
            .post_empty(&format!("/workloads/notebooks/{nb}/{action}"), &h.admin)
            .await;
        assert_eq!(s, StatusCode::CONFLICT, "{action}: {v}");
    }
    let (s, v) = h
        .post_empty(&format!("/workloads/notebooks/{nb}/open"), &h.admin)
        .await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::CONFLICT, "notebook_not_running")
    );

    let (s, v) = h
        .post_empty(&format!("/workloads/notebooks/{nb}/start"), &h.admin)
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["status"], "starting");
    let session = v["sessionId"].as_str().unwrap().to_owned();
    let (s, v) = h
        .post_empty(&format!("/workloads/notebooks/{nb}/start"), &h.admin)
        .await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::CONFLICT, "invalid_notebook_state")
    );
    let running = h.wait_up(&h.admin, &nb, 10).await;
    assert_eq!(running["sessionId"], session.as_str());
    let id = marina_config::Id::parse(&nb).unwrap();
    assert!(h.runtime.is_running(id));
    // Its upstream really answers.
    let addr = h.runtime.addr(id).unwrap();
    assert!(tokio::net::TcpStream::connect(&addr).await.is_ok());
    // The workload config is fixed while it runs.
    let cfg2 = h.config(&h.admin, 3).await;
    let (s, v) = h
        .patch(
            &format!("/workloads/notebooks/{nb}"),
            &h.admin,
            json!({"workloadConfigId": cfg2}),
        )
        .await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::CONFLICT, "notebook_not_stopped")
    );
    let (s, _) = h
        .patch(
            &format!("/workloads/notebooks/{nb}"),
            &h.admin,
            json!({"name": "still fine"}),
        )
        .await;
    assert_eq!(s, StatusCode::OK);

    // open: a URL on the edge with a one-time EdDSA token; the owner edits, a viewer views.
    let public = std::fs::read(h.dir.path().join("keys/url-signing.pub.pem")).unwrap();
    let mut validation = Validation::new(Algorithm::EdDSA);
    validation.set_audience(&["marina-edge"]);
    validation.set_issuer(&["marina-control"]);
    let me = h.get("/iam/me", &h.admin).await.1["member"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut jtis = Vec::new();
    for (key, who, mode) in [
        (&h.admin, &me, AccessMode::Edit),
        (&member_key, &member, AccessMode::View),
    ] {
        let (s, v) = h
            .post_empty(&format!("/workloads/notebooks/{nb}/open"), key)
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!(v.as_object().unwrap().len(), 1);
        let url = v["url"].as_str().unwrap();
        let prefix = format!("http://127.0.0.1:8000/notebooks/{nb}/_auth?token=");
        assert!(url.starts_with(&prefix), "{url}");
        let token = &url[prefix.len()..];
        let header = jsonwebtoken::decode_header(token).unwrap();
        assert_eq!(header.kid.as_deref(), Some("k1"));
        let claims = jsonwebtoken::decode::<UrlClaims>(
            token,
            &DecodingKey::from_ed_pem(&public).unwrap(),
            &validation,
        )
        .unwrap()
        .claims;
        assert_eq!(
            (
                claims.sub.to_string(),
                claims.nb.to_string(),
                claims.sid.to_string()
            ),
            (who.clone(), nb.clone(), session.clone())
        );
        assert_eq!(claims.mode, mode);
        assert_eq!(claims.exp - claims.iat, 300);
        jtis.push(claims.jti);
    }
    assert_ne!(jtis[0], jtis[1]);

    // ping: 204 and lastActiveAt set.
    let (s, _) = h
        .post_empty(&format!("/workloads/notebooks/{nb}/ping"), &member_key)
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert!(h.notebook_json(&h.admin, &nb).await["lastActiveAt"].is_string());

    // stop → stopping → stopped; the runtime no longer has it.
    let (s, v) = h
        .post_empty(&format!("/workloads/notebooks/{nb}/stop"), &h.admin)
        .await;
    assert_eq!(
        (s, v["status"].as_str()),
        (StatusCode::OK, Some("stopping"))
    );
    h.wait_status(&h.admin, &nb, "stopped", 10).await;
    assert!(!h.runtime.is_running(id));
    // A new start gets a new session id.
    let (_, v) = h
        .post_empty(&format!("/workloads/notebooks/{nb}/start"), &h.admin)
        .await;
    assert_ne!(v["sessionId"].as_str().unwrap(), session);
    h.wait_up(&h.admin, &nb, 10).await;
    // Deleting a running notebook stops it first.
    assert_eq!(
        h.delete(&format!("/workloads/notebooks/{nb}"), &h.admin)
            .await
            .0,
        StatusCode::NO_CONTENT
    );
    assert!(!h.runtime.is_running(id));
}
both!(start_open_ping_stop);

async fn start_retries_and_failures(store: Store) {
    let h = Harness::with(store, |s| s.control.start_timeout_seconds = 1).await;
    // Two failures, three attempts allowed: it runs, after stopping each failed attempt.
    let cfg3 = h.config(&h.admin, 3).await;
    let nb = h.notebook(&h.admin, &cfg3, &[]).await;
    h.runtime.fail_starts.store(2, Ordering::SeqCst);
    let stops_before = h.runtime.stop_calls.load(Ordering::SeqCst);
    h.run(&h.admin, &nb).await;
    assert_eq!(
        h.runtime.stop_calls.load(Ordering::SeqCst) - stops_before,
        2
    );
    // Two failures, two attempts: failed, with the reason.
    let cfg2 = h.config(&h.admin, 2).await;
    let nb2 = h.notebook(&h.admin, &cfg2, &[]).await;
    h.runtime.fail_starts.store(2, Ordering::SeqCst);
    h.post_empty(&format!("/workloads/notebooks/{nb2}/start"), &h.admin)
        .await;
    let failed = h.wait_status(&h.admin, &nb2, "failed", 10).await;
    let msg = failed["statusMessage"].as_str().unwrap();
    assert!(
        msg.contains("2 attempt(s)") && msg.contains("sail exited"),
        "{msg}"
    );
    // failed → start again is allowed, and clears the message.
    let (s, v) = h
        .post_empty(&format!("/workloads/notebooks/{nb2}/start"), &h.admin)
        .await;
    assert_eq!(
        (s, v["statusMessage"].clone()),
        (StatusCode::OK, Value::Null)
    );
    h.wait_status(&h.admin, &nb2, "running", 10).await;
    // Attempts that hang are cut at the start timeout.
    let cfg1 = h.config(&h.admin, 1).await;
    let nb3 = h.notebook(&h.admin, &cfg1, &[]).await;
    h.runtime.start_delay_ms.store(3000, Ordering::SeqCst);
    h.post_empty(&format!("/workloads/notebooks/{nb3}/start"), &h.admin)
        .await;
    let failed = h.wait_status(&h.admin, &nb3, "failed", 10).await;
    assert!(
        failed["statusMessage"]
            .as_str()
            .unwrap()
            .contains("timed out"),
        "{failed}"
    );
    h.runtime.start_delay_ms.store(0, Ordering::SeqCst);
}
both!(start_retries_and_failures);

async fn stop_overtakes_a_slow_start(store: Store) {
    let h = Harness::new(store).await;
    let cfg = h.config(&h.admin, 1).await;
    let nb = h.notebook(&h.admin, &cfg, &[]).await;
    h.runtime.start_delay_ms.store(1500, Ordering::SeqCst);
    h.post_empty(&format!("/workloads/notebooks/{nb}/start"), &h.admin)
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (s, v) = h
        .post_empty(&format!("/workloads/notebooks/{nb}/stop"), &h.admin)
        .await;
    assert_eq!(
        (s, v["status"].as_str()),
        (StatusCode::OK, Some("stopping"))
    );
    h.wait_status(&h.admin, &nb, "stopped", 10).await;
    tokio::time::sleep(Duration::from_millis(1800)).await;
    // The aborted start neither came back to life nor left a server behind.
    assert_eq!(h.status(&h.admin, &nb).await, "stopped");
    assert!(!h.runtime.is_running(marina_config::Id::parse(&nb).unwrap()));
    h.runtime.start_delay_ms.store(0, Ordering::SeqCst);
}
both!(stop_overtakes_a_slow_start);

async fn concurrent_lifecycle_calls(store: Store) {
    let h = std::sync::Arc::new(Harness::new(store).await);
    let cfg = h.config(&h.admin, 3).await;
    let nb = h.notebook(&h.admin, &cfg, &[]).await;
    h.runtime.start_delay_ms.store(300, Ordering::SeqCst);
    let race = |action: &'static str| {
        let h = h.clone();
        let nb = nb.clone();
        async move {
            let tasks: Vec<_> = (0..8)
                .map(|_| {
                    let h = h.clone();
                    let nb = nb.clone();
                    tokio::spawn(async move {
                        h.post_empty(&format!("/workloads/notebooks/{nb}/{action}"), &h.admin)
                            .await
                            .0
                    })
                })
                .collect();
            let mut ok = 0;
            let mut conflict = 0;
            for t in tasks {
                match t.await.unwrap() {
                    StatusCode::OK => ok += 1,
                    StatusCode::CONFLICT => conflict += 1,
                    other => panic!("unexpected {other}"),
                }
            }
            (ok, conflict)
        }
    };
    assert_eq!(race("start").await, (1, 7));
    assert_eq!(
        h.runtime.start_calls.load(Ordering::SeqCst),
        1,
        "one start drove the runtime once"
    );
    h.wait_status(&h.admin, &nb, "running", 10).await;
    assert_eq!(race("stop").await, (1, 7));
    h.wait_status(&h.admin, &nb, "stopped", 10).await;
    h.runtime.start_delay_ms.store(0, Ordering::SeqCst);
}
both!(concurrent_lifecycle_calls);

async fn routes_feed_and_revocation(store: Store) {
    let h = std::sync::Arc::new(Harness::new(store).await);
    let cfg = h.config(&h.admin, 3).await;
    let (viewer, _) = h.member(&h.admin, "member").await;
    let (owner, owner_key) = h.member(&h.admin, "member").await;
    let (outsider, outsider_key) = h.member(&h.admin, "member").await;
    // Another organization's admin never views this organization's notebooks.
    let (_, other_admin, _) = h.cp.create_organization("other", "root").await.unwrap();
    let team = h.team(&h.admin, &[&viewer, &owner]).await;
    let nb = h.notebook(&owner_key, &cfg, &[&team]).await;
    let me = h.get("/iam/me", &h.admin).await.1["member"]["id"]
        .as_str()
        .unwrap()
        .to_owned();

    // A model edge follows the feed from here on: after every change it must know exactly
    // what a fresh snapshot says (checked by `check`), and answer who may view as the edge does.
    let mut edge = Follower::default();
    edge.check(&h).await;
    let v0 = h.routes(None, 0).await;
    assert_eq!(v0["kind"], "snapshot");
    assert_eq!(v0["routes"], json!([]));
    h.run(&owner_key, &nb).await;
    edge.check(&h).await;
    assert_eq!(edge.snapshots, 1, "after the first snapshot, only changes");
    assert!(edge.changes >= 1);
    let snap = h.routes(None, 0).await;
    assert!(snap["version"].as_u64().unwrap() > v0["version"].as_u64().unwrap());
    let route = &snap["routes"][0];
    assert_eq!(route["notebookId"], nb.as_str());
    assert_eq!(route["ownerId"], owner.as_str());
    let id = marina_config::Id::parse(&nb).unwrap();
    assert_eq!(route["upstream"], h.runtime.addr(id).unwrap().as_str());
    assert!(route["upstreamToken"].as_str().unwrap().len() >= 10);
    let mut want = vec![viewer.clone(), me.clone()];
    want.sort();
    assert_eq!(
        edge.state.viewers(&nb),
        want,
        "team members and admins, not the owner, not outsiders"
    );
    assert!(!edge.state.viewers(&nb).contains(&outsider));
    assert!(!edge.state.viewers(&nb).contains(&other_admin.to_string()));

    // A poll with the current version waits; unsharing answers it at once, with only what
    // changed: the notebook's route without the team.
    let version = edge.version;
    let started = std::time::Instant::now();
    let waiter = {
        let h = h.clone();
        tokio::spawn(async move { h.routes(Some(version), 20).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !waiter.is_finished(),
        "the long poll must wait while nothing changes"
    );
    assert_eq!(
        h.delete(
            &format!("/workloads/notebooks/{nb}/teams/{team}"),
            &owner_key
        )
        .await
        .0,
        StatusCode::NO_CONTENT
    );
    let after = waiter.await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "woken by the change, not the timeout"
    );
    assert_eq!(after["kind"], "changes", "{after}");
    assert!(after["version"].as_u64().unwrap() > version);
    assert_eq!(after["changes"][0]["op"], "up", "{after}");
    assert_eq!(
        after["changes"][0]["teams"],
        Value::Null,
        "no teams left: {after}"
    );
    edge.apply(&after);
    edge.check(&h).await;
    assert_eq!(edge.state.viewers(&nb), vec![me.clone()]);
    // Re-sharing, then removing the viewer from the team, revokes too.
    h.post(
        &format!("/workloads/notebooks/{nb}/teams"),
        &owner_key,
        json!({"teamIds": [team]}),
    )
    .await;
    edge.check(&h).await;
    assert!(edge.state.viewers(&nb).contains(&viewer));
    h.delete(&format!("/iam/teams/{team}/members/{viewer}"), &h.admin)
        .await;
    let answers = edge.catch_up(&h).await;
    assert_eq!(
        answers[0]["changes"],
        json!([{"op": "teamMember", "teamId": team, "memberId": viewer, "present": false}]),
        "a member leaving a team is one small change"
    );
    edge.check(&h).await;
    assert!(!edge.state.viewers(&nb).contains(&viewer));
    // Demoting the admin revokes his admin view; promoting the outsider grants one.
    h.patch(
        &format!("/iam/members/{outsider}"),
        &h.admin,
        json!({"role": "admin"}),
    )
    .await;
    h.patch(
        &format!("/iam/members/{me}"),
        &h.admin,
        json!({"role": "member"}),
    )
    .await;
    edge.check(&h).await;
    assert_eq!(edge.state.viewers(&nb), vec![outsider.clone()]);
    // Deleting a member revokes too.
    let (s, _) = h.delete(&format!("/iam/members/{me}"), &outsider_key).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    edge.check(&h).await;
    // A poll that times out answers an empty change list at the same version.
    let cur = edge.version;
    let t = std::time::Instant::now();
    let same = h.routes(Some(cur), 1).await;
    assert!(t.elapsed() >= Duration::from_millis(900));
    assert_eq!(same["kind"], "changes");
    assert_eq!(same["changes"], json!([]));
    assert_eq!(same["version"].as_u64(), Some(cur));
    // Stopping removes the route.
    h.post_empty(&format!("/workloads/notebooks/{nb}/stop"), &owner_key)
        .await;
    edge.check(&h).await;
    assert!(edge.state.routes.is_empty());
    assert_eq!(h.routes(None, 0).await["routes"], json!([]));
    assert_eq!(edge.snapshots, 1, "one snapshot, then changes only");
}
both!(routes_feed_and_revocation);

async fn redeem_is_single_use(store: Store) {
    let h = Harness::new(store).await;
    let token = h.internal_token();
    let exp = common::now_ms() / 1000 + 300;
    let body = json!({"jti": "abc123", "exp": exp});
    let (s, _) = h
        .call(
            Method::POST,
            "/internal/v1/redeem",
            Some(&token),
            Some(body.clone()),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, v) = h
        .call(
            Method::POST,
            "/internal/v1/redeem",
            Some(&token),
            Some(body),
        )
        .await;
    assert_eq!((s, code(&v)), (StatusCode::CONFLICT, "token_replayed"));
    let (s, v) = h
        .call(
            Method::POST,
            "/internal/v1/redeem",
            Some(&token),
            Some(json!({"jti": "x"})),
        )
        .await;
    assert_eq!((s, common::field(&v)), (StatusCode::BAD_REQUEST, "exp"));
}
both!(redeem_is_single_use);

/// Short timeouts for the monitor tests.
fn quick(s: &mut marina_config::Settings) {
    s.control.monitor_interval_ms = 100;
    s.control.idle_after_seconds = 1;
    s.control.detached_timeout_seconds = 2;
    s.proxy.activity_interval_ms = 200;
}

async fn monitor_detached_then_stopped(store: Store) {
    let mut h = Harness::with(store, quick).await;
    h.start_monitor().await;
    let cfg = h.config(&h.admin, 3).await;
    let nb = h.notebook(&h.admin, &cfg, &[]).await;
    h.run(&h.admin, &nb).await;
    // Nobody connected: detached, then stopped after the detached timeout.
    h.wait_status(&h.admin, &nb, "detached", 5).await;
    let stopped = h.wait_status(&h.admin, &nb, "stopped", 10).await;
    assert!(
        stopped["statusMessage"]
            .as_str()
            .unwrap()
            .contains("no browser connected"),
        "{stopped}"
    );
}
both!(monitor_detached_then_stopped);

async fn monitor_idle_then_stopped_and_activity_wakes(store: Store) {
    let mut h = Harness::with(store, |s| {
        quick(s);
        s.control.detached_timeout_seconds = 3600;
    })
    .await;
    h.start_monitor().await;
    let cfg = h.config(&h.admin, 3).await;
    let nb = h.notebook(&h.admin, &cfg, &[]).await;
    h.patch(
        &format!("/workloads/notebooks/{nb}"),
        &h.admin,
        json!({"idleTimeoutSeconds": 3}),
    )
    .await;
    h.run(&h.admin, &nb).await;
    let session = h.notebook_json(&h.admin, &nb).await["sessionId"]
        .as_str()
        .unwrap()
        .to_owned();
    let connected = |active: Option<i64>| json!([{"notebookId": nb, "sessionId": session, "lastActiveMs": active, "openSockets": 1}]);
    // Connected but quiet: idle after idle_after (1 s). The edge keeps reporting its open
    // WebSocket, or it would expire and the notebook count as detached.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        h.activity("edge-a", connected(None)).await;
        let status = h.status(&h.admin, &nb).await;
        if status == "idle" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never idle: {status}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Activity through an edge brings it straight back to running.
    h.activity("edge-a", connected(Some(common::now_ms())))
        .await;
    assert_eq!(h.status(&h.admin, &nb).await, "running");
    assert!(h.notebook_json(&h.admin, &nb).await["lastActiveAt"].is_string());
    // Without further activity: idle, then stopped at idleTimeoutSeconds (3 s), even though
    // the browser stays connected.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        h.activity("edge-a", connected(None)).await;
        let v = h.notebook_json(&h.admin, &nb).await;
        if v["status"] == "stopping" || v["status"] == "stopped" {
            assert!(
                v["statusMessage"]
                    .as_str()
                    .unwrap()
                    .contains("without activity"),
                "{v}"
            );
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never stopped: {v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
both!(monitor_idle_then_stopped_and_activity_wakes);

async fn monitor_idle_timeout_zero_disables_and_edges_expire(store: Store) {
    let mut h = Harness::with(store, |s| {
        quick(s);
        s.control.detached_timeout_seconds = 3600;
    })
    .await;
    h.start_monitor().await;
    let cfg = h.config(&h.admin, 3).await;
    let nb = h.notebook(&h.admin, &cfg, &[]).await;
    h.patch(
        &format!("/workloads/notebooks/{nb}"),
        &h.admin,
        json!({"idleTimeoutSeconds": 0}),
    )
    .await;
    h.run(&h.admin, &nb).await;
    let session = h.notebook_json(&h.admin, &nb).await["sessionId"]
        .as_str()
        .unwrap()
        .to_owned();
    let entry =
        json!([{"notebookId": nb, "sessionId": session, "lastActiveMs": null, "openSockets": 2}]);
    for _ in 0..15 {
        h.activity("edge-b", entry.clone()).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        h.status(&h.admin, &nb).await,
        "idle",
        "3 s quiet with idleTimeoutSeconds 0: idle, not stopped"
    );
    // The edge stops reporting: after a few intervals its connections no longer count.
    h.wait_status(&h.admin, &nb, "detached", 5).await;
    // A ping is presence and activity: straight back to running.
    assert_eq!(
        h.post_empty(&format!("/workloads/notebooks/{nb}/ping"), &h.admin)
            .await
            .0,
        StatusCode::NO_CONTENT
    );
    assert_eq!(h.status(&h.admin, &nb).await, "running");
}
both!(monitor_idle_timeout_zero_disables_and_edges_expire);

async fn monitor_marks_dead_notebooks_failed(store: Store) {
    let mut h = Harness::with(store, quick).await;
    h.start_monitor().await;
    let cfg = h.config(&h.admin, 3).await;
    let nb = h.notebook(&h.admin, &cfg, &[]).await;
    h.run(&h.admin, &nb).await;
    h.runtime.crash(
        marina_config::Id::parse(&nb).unwrap(),
        "marimo exited with status 137 (OOM killed)",
    );
    let failed = h.wait_status(&h.admin, &nb, "failed", 5).await;
    assert!(
        failed["statusMessage"].as_str().unwrap().contains("OOM"),
        "{failed}"
    );
    assert_eq!(h.routes(None, 0).await["routes"], json!([]));
}
both!(monitor_marks_dead_notebooks_failed);

async fn restart_reconciles(store: Store) {
    let mut h = Harness::new(store).await;
    let cfg = h.config(&h.admin, 3).await;
    let alive = h.notebook(&h.admin, &cfg, &[]).await;
    let gone = h.notebook(&h.admin, &cfg, &[]).await;
    let starting = h.notebook(&h.admin, &cfg, &[]).await;
    let stopping = h.notebook(&h.admin, &cfg, &[]).await;
    h.run(&h.admin, &alive).await;
    h.run(&h.admin, &gone).await;
    h.run(&h.admin, &stopping).await;
    let alive_session = h.notebook_json(&h.admin, &alive).await["sessionId"].clone();
    // Stage a crash of the control plane mid-way: one notebook's servers vanished, one was
    // starting, one stopping.
    h.runtime.vanish(marina_config::Id::parse(&gone).unwrap());
    h.sql(&format!("UPDATE notebooks SET status = 'starting', session_id = 'SESSION001' WHERE id = '{starting}'")).await;
    h.sql(&format!(
        "UPDATE notebooks SET status = 'stopping' WHERE id = '{stopping}'"
    ))
    .await;
    h.restart().await;
    let v = h.wait_up(&h.admin, &alive, 1).await;
    assert_eq!(&v["sessionId"], &alive_session, "adopted");
    let v = h.notebook_json(&h.admin, &gone).await;
    assert_eq!(v["status"], "stopped", "{v}");
    assert!(v["statusMessage"].as_str().unwrap().contains("restart"));
    let v = h.wait_up(&h.admin, &starting, 10).await;
    assert_eq!(
        v["sessionId"], "SESSION001",
        "the interrupted start is driven to the end"
    );
    h.wait_status(&h.admin, &stopping, "stopped", 10).await;
    assert!(!h
        .runtime
        .is_running(marina_config::Id::parse(&stopping).unwrap()));
    let routes = h.routes(None, 0).await;
    let ids: Vec<&str> = routes["routes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["notebookId"].as_str().unwrap())
        .collect();
    let mut want = vec![alive.as_str(), starting.as_str()];
    want.sort();
    assert_eq!(ids, want);
}
both!(restart_reconciles);

/// A start or stop whose driver died with another control replica is driven again by the
/// monitor's leaseholder.
async fn stuck_transitions_are_redriven(store: Store) {
    let mut h = Harness::with(store, |s| {
        quick(s);
        s.control.detached_timeout_seconds = 3600;
    })
    .await;
    let cfg = h.config(&h.admin, 3).await;
    let starting = h.notebook(&h.admin, &cfg, &[]).await;
    let stopping = h.notebook(&h.admin, &cfg, &[]).await;
    h.run(&h.admin, &stopping).await;
    h.start_monitor().await;
    // As another replica would have left them: transitions begun long ago, no driver here.
    h.sql(&format!(
        "UPDATE notebooks SET status = 'starting', session_id = 'SESSION002', transition_at = 0 WHERE id = '{starting}'"
    ))
    .await;
    h.sql(&format!(
        "UPDATE notebooks SET status = 'stopping', transition_at = 0 WHERE id = '{stopping}'"
    ))
    .await;
    let v = h.wait_up(&h.admin, &starting, 10).await;
    assert_eq!(v["sessionId"], "SESSION002");
    h.wait_status(&h.admin, &stopping, "stopped", 10).await;
    assert!(!h
        .runtime
        .is_running(marina_config::Id::parse(&stopping).unwrap()));
}
both!(stuck_transitions_are_redriven);

/// An edge's batch may exceed the public body limit (64 KiB): thousands of notebooks.
#[tokio::test]
async fn large_activity_batches_are_accepted() {
    let h = Harness::new(Store::Sqlite).await;
    let entries: Vec<Value> = (0..2000)
        .map(|_| {
            json!({"notebookId": marina_config::Id::random(), "sessionId": marina_config::Id::random(),
                   "lastActiveMs": common::now_ms(), "openSockets": 1})
        })
        .collect();
    assert!(json!(entries).to_string().len() > 64 * 1024);
    h.activity("edge-big", json!(entries)).await;
}

/// A graceful shutdown does not wait out the edges' routes long polls (up to 30 s, during which
/// a restarting control plane would refuse every API call): they answer at once with the
/// snapshot, and the server is gone within a second or two. (Found by the load test's
/// control-plane restart: the API was unreachable for 13 s.)
async fn a_graceful_shutdown_answers_the_routes_long_poll_at_once(store: Store) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let h = Harness::new(store).await;
    let version = h.routes(None, 0).await["version"]
        .as_u64()
        .expect("version");
    let cp = marina_control::ControlPlane::open(&h.settings, h.runtime.clone())
        .await
        .expect("open");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(cp.serve(listener, async move {
        let _ = stopped.await;
    }));
    let token = h.internal_token();
    let poll = tokio::spawn(async move {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let req = format!(
            "GET /internal/v1/routes?after={version}&waitSeconds=25 HTTP/1.1\r\nHost: control\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).await.expect("read");
        out
    });
    // The poll is held (nothing changes)…
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !poll.is_finished(),
        "the long poll must wait while nothing changes"
    );
    // …until the shutdown begins.
    let begun = std::time::Instant::now();
    stop.send(()).expect("signal");
    let answer = tokio::time::timeout(Duration::from_secs(5), poll)
        .await
        .expect("the long poll answers at the shutdown")
        .expect("poll task");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.contains(&format!("\"version\":{version}")),
        "{answer}"
    );
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("the server stops")
        .expect("server task")
        .expect("serve");
    assert!(
        begun.elapsed() < Duration::from_secs(5),
        "shutdown took {:?}",
        begun.elapsed()
    );
}
both!(a_graceful_shutdown_answers_the_routes_long_poll_at_once);
