//! The public API against a real SQLite file and a real PostgreSQL database: shapes, errors,
//! authentication, tenancy, pagination, workload configs, IAM and the operational endpoints.

mod common;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use common::{code, field, Harness, Store};
use serde_json::{json, Value};

const NB_KEYS: [&str; 15] = [
    "id",
    "memberId",
    "workloadConfigId",
    "name",
    "description",
    "status",
    "statusMessage",
    "idleTimeoutSeconds",
    "detachedTimeoutSeconds",
    "lastActiveAt",
    "sessionId",
    "createdAt",
    "createdBy",
    "updatedAt",
    "updatedBy",
];

fn keys(v: &Value) -> Vec<String> {
    let mut k: Vec<String> = v.as_object().expect("object").keys().cloned().collect();
    k.sort();
    k
}

fn sorted(k: &[&str]) -> Vec<String> {
    let mut k: Vec<String> = k.iter().map(|s| s.to_string()).collect();
    k.sort();
    k
}

async fn bootstrap_and_me(store: Store) {
    let h = Harness::new(store).await;
    let boot = h.cp.bootstrap().unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&boot.admin_key_file)
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
    }
    let (s, v) = h.get("/iam/me", &h.admin).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["member"]["role"], "admin");
    assert_eq!(v["member"]["id"], boot.admin_member_id.to_string());
    assert_eq!(
        v["member"]["organizationId"],
        boot.organization_id.to_string()
    );
    // The admin CLI's key works too.
    let key = h.cp.create_api_key(None, "cli").await.unwrap();
    assert_eq!(h.get("/iam/me", &key).await.0, StatusCode::OK);
    let err =
        h.cp.create_api_key(Some(marina_config::Id::random()), "x")
            .await;
    assert!(err.is_err());
}
both!(bootstrap_and_me);

async fn authentication_failures(store: Store) {
    let h = Harness::new(store).await;
    // No header, a wrong scheme, an unknown key.
    let (s, v) = h
        .call(Method::GET, "/workloads/notebooks", None, None)
        .await;
    assert_eq!((s, code(&v)), (StatusCode::UNAUTHORIZED, "unauthenticated"));
    let req = Request::get("/workloads/notebooks")
        .header("authorization", format!("Basic {}", h.admin))
        .body(Body::empty())
        .unwrap();
    assert_eq!(h.raw(req).await.0, StatusCode::UNAUTHORIZED);
    let (s, _) = h
        .get(
            "/workloads/notebooks",
            "mk_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    // A deleted key stops working at once.
    let me = h.get("/iam/me", &h.admin).await.1["member"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (s, created) = h
        .post(
            &format!("/iam/members/{me}/api-keys"),
            &h.admin,
            json!({"name": "temp"}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let secret = created["secret"].as_str().unwrap();
    assert!(created["apiKey"].get("secret").is_none());
    assert_eq!(h.get("/iam/me", secret).await.0, StatusCode::OK);
    let key_id = created["apiKey"]["id"].as_str().unwrap();
    assert_eq!(
        h.delete(&format!("/iam/members/{me}/api-keys/{key_id}"), &h.admin)
            .await
            .0,
        StatusCode::NO_CONTENT
    );
    assert_eq!(h.get("/iam/me", secret).await.0, StatusCode::UNAUTHORIZED);
    // The key listing never shows secrets.
    let (_, list) = h
        .get(&format!("/iam/members/{me}/api-keys"), &h.admin)
        .await;
    assert!(!list.to_string().contains(&h.admin));
    // The internal token is refused on the public API; member keys on the internal API.
    let internal = h.internal_token();
    assert_eq!(
        h.get("/workloads/notebooks", &internal).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        h.get("/internal/v1/routes", &h.admin).await.0,
        StatusCode::UNAUTHORIZED
    );
    let (s, _) = h.call(Method::GET, "/internal/v1/routes", None, None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _) = h
        .post(
            "/internal/v1/redeem",
            &h.admin,
            json!({"jti": "x", "exp": 1}),
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _) = h
        .post(
            "/internal/v1/activity",
            &h.admin,
            json!({"edgeId": "e", "sentAtMs": 0, "notebooks": []}),
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(
        h.get("/internal/v1/routes", &internal).await.0,
        StatusCode::OK
    );
    // Health needs nothing.
    assert_eq!(
        h.call(Method::GET, "/healthz", None, None).await.0,
        StatusCode::OK
    );
    assert_eq!(
        h.call(Method::GET, "/readyz", None, None).await.0,
        StatusCode::OK
    );
}
both!(authentication_failures);

async fn notebook_crud_and_shapes(store: Store) {
    let h = Harness::new(store).await;
    let cfg = h.config(&h.admin, 3).await;
    let team = h.team(&h.admin, &[]).await;
    let (s, v) = h
        .post(
            "/workloads/notebooks",
            &h.admin,
            json!({"workloadConfigId": cfg, "name": "Daily Sales Analysis", "teamIds": [team]}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(keys(&v), sorted(&["item", "included"]));
    assert_eq!(
        keys(&v["item"]),
        sorted(&["notebookId", "teamIds", "workloadConfigId"])
    );
    assert_eq!(v["item"]["teamIds"], json!([team]));
    assert_eq!(
        keys(&v["included"]),
        sorted(&["notebooks", "teams", "workloadConfigs"])
    );
    let nb = &v["included"]["notebooks"][0];
    assert_eq!(keys(nb), sorted(&NB_KEYS));
    assert_eq!(nb["status"], "stopped");
    assert_eq!(nb["idleTimeoutSeconds"], 3600);
    assert_eq!(nb["detachedTimeoutSeconds"], 14400);
    for null in ["description", "statusMessage", "lastActiveAt", "sessionId"] {
        assert_eq!(nb[null], Value::Null, "{null}");
    }
    let created = nb["createdAt"].as_str().unwrap();
    assert!(
        created.len() == 20 && created.ends_with('Z') && created.as_bytes()[10] == b'T',
        "{created}"
    );
    let t = &v["included"]["teams"][0];
    assert_eq!(keys(t), sorted(&["team", "memberCount"]));
    assert_eq!(
        keys(&t["team"]),
        sorted(&[
            "id",
            "organizationId",
            "name",
            "createdAt",
            "createdBy",
            "updatedAt",
            "updatedBy",
            "defaultRoleId"
        ])
    );
    let wc = &v["included"]["workloadConfigs"][0];
    assert_eq!(
        keys(wc),
        sorted(&[
            "id",
            "name",
            "workloadType",
            "clusterId",
            "config",
            "endpointLimits",
            "createdAt",
            "createdBy",
            "updatedAt",
            "updatedBy"
        ])
    );
    assert_eq!(wc["config"]["sail"]["maxRetries"], 3);
    assert_eq!(wc["endpointLimits"], json!({"spark_connect": 0}));
    let id = v["item"]["notebookId"].as_str().unwrap().to_owned();

    // Describe and list.
    let (s, got) = h.get(&format!("/workloads/notebooks/{id}"), &h.admin).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(got["item"], v["item"]);
    let (s, list) = h.get("/workloads/notebooks", &h.admin).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        keys(&list),
        sorted(&["total", "items", "included", "nextPageToken"])
    );
    assert_eq!(list["total"], 1);
    assert_eq!(list["nextPageToken"], Value::Null);
    assert_eq!(list["items"][0]["notebookId"], id);

    // PATCH returns the flat notebook; description null clears.
    let (s, p) = h
        .patch(
            &format!("/workloads/notebooks/{id}"),
            &h.admin,
            json!({"name": "Renamed", "description": "d", "idleTimeoutSeconds": 0}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{p}");
    assert_eq!(keys(&p), sorted(&NB_KEYS));
    assert_eq!(
        (
            p["name"].as_str(),
            p["description"].as_str(),
            p["idleTimeoutSeconds"].as_i64()
        ),
        (Some("Renamed"), Some("d"), Some(0))
    );
    let (_, p) = h
        .patch(
            &format!("/workloads/notebooks/{id}"),
            &h.admin,
            json!({"description": null}),
        )
        .await;
    assert_eq!(p["description"], Value::Null);
    assert_eq!(p["name"], "Renamed");
    // The workload config may change while stopped.
    let cfg2 = h.config(&h.admin, 2).await;
    let (s, p) = h
        .patch(
            &format!("/workloads/notebooks/{id}"),
            &h.admin,
            json!({"workloadConfigId": cfg2}),
        )
        .await;
    assert_eq!(
        (s, p["workloadConfigId"].as_str()),
        (StatusCode::OK, Some(cfg2.as_str()))
    );

    // Teams of a notebook.
    let (s, tl) = h
        .get(&format!("/workloads/notebooks/{id}/teams"), &h.admin)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        keys(&tl["items"][0]),
        sorted(&[
            "notebookId",
            "teamId",
            "createdAt",
            "createdBy",
            "updatedAt",
            "updatedBy"
        ])
    );
    let team2 = h.team(&h.admin, &[]).await;
    let (s, tl) = h
        .post(
            &format!("/workloads/notebooks/{id}/teams"),
            &h.admin,
            json!({"teamIds": [team2, team]}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{tl}");
    assert_eq!(
        tl["items"].as_array().unwrap().len(),
        2,
        "adding one already there is fine"
    );
    let (s, tn) = h
        .get(&format!("/workloads/teams/{team2}/notebooks"), &h.admin)
        .await;
    assert_eq!((s, tn["total"].as_i64()), (StatusCode::OK, Some(1)));
    assert_eq!(
        h.delete(
            &format!("/workloads/notebooks/{id}/teams/{team2}"),
            &h.admin
        )
        .await
        .0,
        StatusCode::NO_CONTENT
    );
    let (s, v) = h
        .delete(
            &format!("/workloads/notebooks/{id}/teams/{team2}"),
            &h.admin,
        )
        .await;
    assert_eq!((s, code(&v)), (StatusCode::NOT_FOUND, "team_not_found"));
    let (_, tn) = h
        .get(&format!("/workloads/teams/{team2}/notebooks"), &h.admin)
        .await;
    assert_eq!(tn["total"], 0);

    // Delete: gone, links too.
    assert_eq!(
        h.delete(&format!("/workloads/notebooks/{id}"), &h.admin)
            .await
            .0,
        StatusCode::NO_CONTENT
    );
    let (s, v) = h.get(&format!("/workloads/notebooks/{id}"), &h.admin).await;
    assert_eq!((s, code(&v)), (StatusCode::NOT_FOUND, "notebook_not_found"));
    let (_, tn) = h
        .get(&format!("/workloads/teams/{team}/notebooks"), &h.admin)
        .await;
    assert_eq!(tn["total"], 0);
}
both!(notebook_crud_and_shapes);

async fn bad_input_names_the_field(store: Store) {
    let h = Harness::with(store, |s| s.control.max_body_bytes = 2048).await;
    let cfg = h.config(&h.admin, 3).await;
    let cases: Vec<(Value, &str)> = vec![
        (json!({"name": "x"}), "workloadConfigId"),
        (json!({"workloadConfigId": cfg}), "name"),
        (
            json!({"workloadConfigId": cfg, "name": "x", "colour": "red"}),
            "colour",
        ),
        (
            json!({"workloadConfigId": cfg, "name": "x", "idleTimeoutSeconds": "soon"}),
            "idleTimeoutSeconds",
        ),
        (
            json!({"workloadConfigId": cfg, "name": "x", "idleTimeoutSeconds": -1}),
            "idleTimeoutSeconds",
        ),
        (
            json!({"workloadConfigId": "nope", "name": "x"}),
            "workloadConfigId",
        ),
        (
            json!({"workloadConfigId": "ZZZZZZZZZZ", "name": "x"}),
            "workloadConfigId",
        ),
        (json!({"workloadConfigId": cfg, "name": "  "}), "name"),
        (
            json!({"workloadConfigId": cfg, "name": "x", "teamIds": ["ZZZZZZZZZZ"]}),
            "teamIds[0]",
        ),
        (
            json!({"workloadConfigId": cfg, "name": "x", "teamIds": "A1B2C3D4E5"}),
            "teamIds",
        ),
    ];
    for (body, want) in cases {
        let (s, v) = h.post("/workloads/notebooks", &h.admin, body.clone()).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body} → {v}");
        assert_eq!(field(&v), want, "{body} → {v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(want),
            "{v}"
        );
    }
    // Workload config validation names nested fields.
    let (s, v) = h
        .post(
            "/workloads/configs",
            &h.admin,
            json!({"name": "c", "config": {"sail": {"maxRetries": 0}}}),
        )
        .await;
    assert_eq!(
        (s, field(&v)),
        (StatusCode::BAD_REQUEST, "config.sail.maxRetries")
    );
    let (s, v) = h
        .post(
            "/workloads/configs",
            &h.admin,
            json!({"name": "c", "config": {"sail": {"compute": {"worker": {"maxNodes": "many"}}}}}),
        )
        .await;
    assert_eq!(
        (s, field(&v)),
        (
            StatusCode::BAD_REQUEST,
            "config.sail.compute.worker.maxNodes"
        )
    );
    // Path ids, query parameters.
    let (s, v) = h.get("/workloads/notebooks/not-an-id", &h.admin).await;
    assert_eq!((s, field(&v)), (StatusCode::BAD_REQUEST, "notebook"));
    let (s, v) = h
        .delete("/workloads/notebooks/A1B2C3D4E5/teams/x", &h.admin)
        .await;
    assert_eq!((s, field(&v)), (StatusCode::BAD_REQUEST, "team"));
    for q in ["limit=101", "limit=-1", "limit=abc"] {
        let (s, v) = h.get(&format!("/workloads/notebooks?{q}"), &h.admin).await;
        assert_eq!((s, field(&v)), (StatusCode::BAD_REQUEST, "limit"), "{q}");
    }
    let (s, v) = h
        .get("/workloads/notebooks?pageToken=garbage!", &h.admin)
        .await;
    assert_eq!((s, field(&v)), (StatusCode::BAD_REQUEST, "pageToken"));
    let (s, v) = h.get("/workloads/notebooks?colour=red", &h.admin).await;
    assert_eq!((s, field(&v)), (StatusCode::BAD_REQUEST, "colour"));
    // Malformed JSON, wrong content type, missing content type, too large.
    let post = |ct: Option<&str>, body: String| {
        let mut b = Request::post("/workloads/notebooks")
            .header("authorization", format!("Bearer {}", h.admin));
        if let Some(ct) = ct {
            b = b.header("content-type", ct);
        }
        b.body(Body::from(body)).unwrap()
    };
    let (s, _, b) = h
        .raw(post(Some("application/json"), "{\"name\":".into()))
        .await;
    let v: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!((s, code(&v)), (StatusCode::BAD_REQUEST, "malformed_json"));
    let (s, _, b) = h.raw(post(Some("text/plain"), "{}".into())).await;
    let v: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(
        (s, code(&v)),
        (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
    );
    let (s, _, _) = h.raw(post(None, "{}".into())).await;
    assert_eq!(s, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let big =
        json!({"workloadConfigId": cfg, "name": "x", "description": "y".repeat(4096)}).to_string();
    let (s, _, b) = h.raw(post(Some("application/json"), big)).await;
    let v: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(
        (s, code(&v)),
        (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
    );
    let (s, v) = h
        .call(Method::PUT, "/workloads/notebooks", Some(&h.admin), None)
        .await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed")
    );
    // Unknown routes answer in the same shape.
    let (s, v) = h.get("/nope", &h.admin).await;
    assert_eq!((s, code(&v)), (StatusCode::NOT_FOUND, "route_not_found"));
}
both!(bad_input_names_the_field);

async fn tenancy(store: Store) {
    let h = Harness::new(store).await;
    let cfg = h.config(&h.admin, 3).await;
    let (alice, alice_key) = h.member(&h.admin, "member").await;
    let (bob, bob_key) = h.member(&h.admin, "member").await;
    let (_carol, carol_key) = h.member(&h.admin, "member").await;
    let team = h.team(&h.admin, &[&alice, &bob]).await;
    let other_team = h.team(&h.admin, &[]).await;

    // Members can read configs but not write them.
    assert_eq!(
        h.get(&format!("/workloads/configs/{cfg}"), &alice_key)
            .await
            .0,
        StatusCode::OK
    );
    let (s, v) = h
        .post(
            "/workloads/configs",
            &alice_key,
            json!({"name": "x", "config": {"sail": {}}}),
        )
        .await;
    assert_eq!((s, code(&v)), (StatusCode::FORBIDDEN, "forbidden"));

    // Alice shares only with her own teams.
    let (s, _) = h
        .post(
            "/workloads/notebooks",
            &alice_key,
            json!({"workloadConfigId": cfg, "name": "n", "teamIds": [other_team]}),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let shared = h.notebook(&alice_key, &cfg, &[&team]).await;
    let private = h.notebook(&alice_key, &cfg, &[]).await;
    let (s, _) = h
        .post(
            &format!("/workloads/notebooks/{private}/teams"),
            &alice_key,
            json!({"teamIds": [other_team]}),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);

    // Bob (same team) sees the shared one only; may not change it.
    let (_, list) = h.get("/workloads/notebooks", &bob_key).await;
    assert_eq!(list["total"], 1);
    assert_eq!(list["items"][0]["notebookId"], shared);
    assert_eq!(
        h.get(&format!("/workloads/notebooks/{private}"), &bob_key)
            .await
            .0,
        StatusCode::NOT_FOUND
    );
    for (m, path, body) in [
        (
            Method::PATCH,
            format!("/workloads/notebooks/{shared}"),
            Some(json!({"name": "mine"})),
        ),
        (
            Method::DELETE,
            format!("/workloads/notebooks/{shared}"),
            None,
        ),
        (
            Method::POST,
            format!("/workloads/notebooks/{shared}/start"),
            None,
        ),
        (
            Method::POST,
            format!("/workloads/notebooks/{shared}/stop"),
            None,
        ),
        (
            Method::POST,
            format!("/workloads/notebooks/{shared}/teams"),
            Some(json!({"teamIds": [team]})),
        ),
        (
            Method::DELETE,
            format!("/workloads/notebooks/{shared}/teams/{team}"),
            None,
        ),
    ] {
        let (s, v) = h.call(m.clone(), &path, Some(&bob_key), body).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{m} {path}: {v}");
    }
    // Carol (no team) sees nothing, and gets 404 (not 403) for what she cannot see.
    let (_, list) = h.get("/workloads/notebooks", &carol_key).await;
    assert_eq!(list["total"], 0);
    assert_eq!(
        h.post_empty(&format!("/workloads/notebooks/{shared}/start"), &carol_key)
            .await
            .0,
        StatusCode::NOT_FOUND
    );
    let (s, _) = h
        .get(&format!("/workloads/teams/{team}/notebooks"), &carol_key)
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, tl) = h
        .get(&format!("/workloads/teams/{team}/notebooks"), &bob_key)
        .await;
    assert_eq!((s, tl["total"].as_i64()), (StatusCode::OK, Some(1)));
    // Admins see everything of their organization.
    let (_, list) = h.get("/workloads/notebooks", &h.admin).await;
    assert_eq!(list["total"], 2);
    // Members may not administer identities.
    assert_eq!(
        h.get("/iam/members", &alice_key).await.0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        h.post("/iam/teams", &alice_key, json!({"name": "t"}))
            .await
            .0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        h.get(&format!("/iam/members/{bob}/api-keys"), &alice_key)
            .await
            .0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        h.get(&format!("/iam/members/{alice}/api-keys"), &alice_key)
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(
        h.get(&format!("/iam/teams/{team}/members"), &alice_key)
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(
        h.get(&format!("/iam/teams/{other_team}"), &alice_key)
            .await
            .0,
        StatusCode::FORBIDDEN
    );

    // A second organization sees none of it, and cannot reference it.
    let (_, _, other_admin) = h.cp.create_organization("other", "root").await.unwrap();
    let (_, list) = h.get("/workloads/notebooks", &other_admin).await;
    assert_eq!(list["total"], 0);
    for path in [
        format!("/workloads/notebooks/{shared}"),
        format!("/workloads/notebooks/{shared}/teams"),
        format!("/workloads/configs/{cfg}"),
        format!("/workloads/teams/{team}/notebooks"),
        format!("/iam/members/{alice}"),
        format!("/iam/teams/{team}"),
    ] {
        let (s, v) = h.get(&path, &other_admin).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{path}: {v}");
    }
    for path in [
        format!("/workloads/notebooks/{shared}/start"),
        format!("/workloads/notebooks/{shared}/open"),
        format!("/workloads/notebooks/{shared}/ping"),
    ] {
        assert_eq!(
            h.post_empty(&path, &other_admin).await.0,
            StatusCode::NOT_FOUND,
            "{path}"
        );
    }
    assert_eq!(
        h.delete(&format!("/workloads/notebooks/{shared}"), &other_admin)
            .await
            .0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        h.delete(&format!("/workloads/configs/{cfg}"), &other_admin)
            .await
            .0,
        StatusCode::NOT_FOUND
    );
    let (s, v) = h
        .post(
            "/workloads/notebooks",
            &other_admin,
            json!({"workloadConfigId": cfg, "name": "steal"}),
        )
        .await;
    assert_eq!(
        (s, field(&v)),
        (StatusCode::BAD_REQUEST, "workloadConfigId")
    );
    let other_cfg = h.config(&other_admin, 3).await;
    let (s, v) = h
        .post(
            "/workloads/notebooks",
            &other_admin,
            json!({"workloadConfigId": other_cfg, "name": "x", "teamIds": [team]}),
        )
        .await;
    assert_eq!((s, field(&v)), (StatusCode::BAD_REQUEST, "teamIds[0]"));
    let (s, _) = h
        .post(
            &format!("/iam/teams/{team}/members"),
            &other_admin,
            json!({"memberIds": [alice]}),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let other_team2 = h.team(&other_admin, &[]).await;
    let (s, v) = h
        .post(
            &format!("/iam/teams/{other_team2}/members"),
            &other_admin,
            json!({"memberIds": [alice]}),
        )
        .await;
    assert_eq!((s, field(&v)), (StatusCode::BAD_REQUEST, "memberIds[0]"));
    // And the first organization sees nothing of the second.
    let (_, list) = h.get("/workloads/configs", &h.admin).await;
    assert!(!list.to_string().contains(&other_cfg));
}
both!(tenancy);

async fn pagination(store: Store) {
    let h = Harness::new(store).await;
    let cfg = h.config(&h.admin, 3).await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(h.notebook(&h.admin, &cfg, &[]).await);
    }
    // Stage known creation times: the newest first, ties broken by id ascending, which the
    // keyset pagination must respect across page boundaries.
    ids.sort();
    let times = [1_000_i64, 3_000, 2_000, 2_000, 2_000];
    for (id, t) in ids.iter().zip(times) {
        h.sql(&format!(
            "UPDATE notebooks SET created_at = {t} WHERE id = '{id}'"
        ))
        .await;
    }
    let expected = vec![
        ids[1].clone(),
        ids[2].clone(),
        ids[3].clone(),
        ids[4].clone(),
        ids[0].clone(),
    ];
    let (_, all) = h.get("/workloads/notebooks", &h.admin).await;
    let listed: Vec<String> = all["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["notebookId"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(listed, expected);
    let mut seen = Vec::new();
    let mut token: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &token {
            Some(t) => format!("/workloads/notebooks?limit=2&pageToken={t}"),
            None => "/workloads/notebooks?limit=2".into(),
        };
        let (s, page) = h.get(&path, &h.admin).await;
        assert_eq!(s, StatusCode::OK, "{page}");
        assert_eq!(page["total"], 5, "total counts everything visible");
        for i in page["items"].as_array().unwrap() {
            seen.push(i["notebookId"].as_str().unwrap().to_owned());
        }
        pages += 1;
        match page["nextPageToken"].as_str() {
            Some(t) => token = Some(t.to_owned()),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, expected);
    let (s, zero) = h.get("/workloads/notebooks?limit=0", &h.admin).await;
    assert_eq!(
        (
            s,
            zero["total"].as_i64(),
            zero["items"].as_array().map(Vec::len)
        ),
        (StatusCode::OK, Some(5), Some(0))
    );
}
both!(pagination);

async fn workload_configs(store: Store) {
    let h = Harness::new(store).await;
    let seed = json!({
        "name": "Production Cluster",
        "workloadType": "notebook",
        "config": {"sail": {
            "executionMode": "local", "maxRetries": 3,
            "compute": {
                "driver": {"instanceType": "c8g.2xlarge", "ebsConfig": {"volumeType": "gp3", "volumeSize": 100, "iops": 3000, "throughput": 125, "deleteOnTermination": true}},
                "worker": {"instanceType": "c8g.4xlarge", "ebsConfig": {"volumeType": "gp3", "volumeSize": 100, "iops": 3000, "throughput": 125, "deleteOnTermination": true}, "maxNodes": 4, "capacityType": "on-demand"}
            },
            "lakesailImageUri": "public.ecr.aws/lakesail/sail:0.7.2",
            "libraries": [{"pypi": {"package": "polars==1.2", "repo": null}}],
            "extraEnv": {"FOO": {"type": "string", "value": "bar"}}
        }},
        "endpointLimits": {"spark_connect": 4}
    });
    let (s, c) = h.post("/workloads/configs", &h.admin, seed).await;
    assert_eq!(s, StatusCode::CREATED, "{c}");
    let id = c["id"].as_str().unwrap().to_owned();
    assert_eq!(c["config"]["sail"]["compute"]["worker"]["maxNodes"], 4);
    assert_eq!(c["config"]["sail"]["extraEnv"]["FOO"]["value"], "bar");
    assert_eq!(c["endpointLimits"]["spark_connect"], 4);
    assert_eq!(c["clusterId"], Value::Null);
    let (s, list) = h.get("/workloads/configs", &h.admin).await;
    assert_eq!((s, list["total"].as_i64()), (StatusCode::OK, Some(1)));
    let (s, p) = h
        .patch(
            &format!("/workloads/configs/{id}"),
            &h.admin,
            json!({"name": "Small", "config": {"sail": {"maxRetries": 1}}}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{p}");
    assert_eq!(
        (
            p["name"].as_str(),
            p["config"]["sail"]["maxRetries"].as_i64()
        ),
        (Some("Small"), Some(1))
    );
    assert_eq!(
        p["endpointLimits"]["spark_connect"], 4,
        "absent fields are kept"
    );
    let (_, member_key) = h.member(&h.admin, "member").await;
    assert_eq!(
        h.patch(
            &format!("/workloads/configs/{id}"),
            &member_key,
            json!({"name": "x"})
        )
        .await
        .0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        h.delete(&format!("/workloads/configs/{id}"), &member_key)
            .await
            .0,
        StatusCode::FORBIDDEN
    );
    // In use: 409; free: 204.
    let nb = h.notebook(&h.admin, &id, &[]).await;
    let (s, v) = h
        .delete(&format!("/workloads/configs/{id}"), &h.admin)
        .await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::CONFLICT, "workload_config_in_use")
    );
    h.delete(&format!("/workloads/notebooks/{nb}"), &h.admin)
        .await;
    assert_eq!(
        h.delete(&format!("/workloads/configs/{id}"), &h.admin)
            .await
            .0,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        h.get(&format!("/workloads/configs/{id}"), &h.admin).await.0,
        StatusCode::NOT_FOUND
    );
}
both!(workload_configs);

async fn identity_administration(store: Store) {
    let h = Harness::new(store).await;
    let me = h.get("/iam/me", &h.admin).await.1["member"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (m, key) = h.member(&h.admin, "member").await;
    let (s, list) = h.get("/iam/members", &h.admin).await;
    assert_eq!((s, list["total"].as_i64()), (StatusCode::OK, Some(2)));
    let (s, v) = h
        .post(
            "/iam/members",
            &h.admin,
            json!({"name": "x", "role": "owner"}),
        )
        .await;
    assert_eq!((s, field(&v)), (StatusCode::BAD_REQUEST, "role"));
    let (s, v) = h
        .post(
            "/iam/members",
            &h.admin,
            json!({"name": "x", "email": "nope"}),
        )
        .await;
    assert_eq!((s, field(&v)), (StatusCode::BAD_REQUEST, "email"));
    // Self may read himself, not others.
    assert_eq!(
        h.get(&format!("/iam/members/{m}"), &key).await.0,
        StatusCode::OK
    );
    assert_eq!(
        h.get(&format!("/iam/members/{me}"), &key).await.0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        h.patch(&format!("/iam/members/{m}"), &key, json!({"role": "admin"}))
            .await
            .0,
        StatusCode::FORBIDDEN
    );
    // Promote, then the promoted admin works as one.
    let (s, v) = h
        .patch(
            &format!("/iam/members/{m}"),
            &h.admin,
            json!({"role": "admin"}),
        )
        .await;
    assert_eq!((s, v["role"].as_str()), (StatusCode::OK, Some("admin")));
    assert_eq!(h.get("/iam/members", &key).await.0, StatusCode::OK);
    // The last admin cannot be demoted or deleted.
    assert_eq!(
        h.patch(
            &format!("/iam/members/{m}"),
            &h.admin,
            json!({"role": "member"})
        )
        .await
        .0,
        StatusCode::OK
    );
    let (s, v) = h
        .patch(
            &format!("/iam/members/{me}"),
            &h.admin,
            json!({"role": "member"}),
        )
        .await;
    assert_eq!((s, code(&v)), (StatusCode::CONFLICT, "last_admin"));
    let (s, v) = h.delete(&format!("/iam/members/{me}"), &h.admin).await;
    assert_eq!((s, code(&v)), (StatusCode::CONFLICT, "last_admin"));
    // Teams and membership.
    let team = h.team(&h.admin, &[&m]).await;
    let (s, t) = h.get(&format!("/iam/teams/{team}"), &h.admin).await;
    assert_eq!((s, t["memberCount"].as_i64()), (StatusCode::OK, Some(1)));
    let (s, t) = h
        .patch(
            &format!("/iam/teams/{team}"),
            &h.admin,
            json!({"name": "Data"}),
        )
        .await;
    assert_eq!((s, t["name"].as_str()), (StatusCode::OK, Some("Data")));
    let (s, tl) = h.get("/iam/teams", &h.admin).await;
    assert_eq!(
        (
            s,
            tl["total"].as_i64(),
            tl["items"][0]["memberCount"].as_i64()
        ),
        (StatusCode::OK, Some(1), Some(1))
    );
    let (_, me_v) = h.get("/iam/me", &key).await;
    assert_eq!(me_v["teamIds"], json!([team]));
    let (s, ml) = h.get(&format!("/iam/teams/{team}/members"), &h.admin).await;
    assert_eq!(
        (s, ml["items"][0]["memberId"].as_str()),
        (StatusCode::OK, Some(m.as_str()))
    );
    assert_eq!(
        h.delete(&format!("/iam/teams/{team}/members/{m}"), &h.admin)
            .await
            .0,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        h.delete(&format!("/iam/teams/{team}/members/{m}"), &h.admin)
            .await
            .0,
        StatusCode::NOT_FOUND
    );
    let (_, me_v) = h.get("/iam/me", &key).await;
    assert_eq!(me_v["teamIds"], json!([]));
    // A member owning notebooks cannot be deleted; without them he can, and his keys die.
    let cfg = h.config(&h.admin, 3).await;
    let nb = h.notebook(&key, &cfg, &[]).await;
    let (s, v) = h.delete(&format!("/iam/members/{m}"), &h.admin).await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::CONFLICT, "member_owns_notebooks")
    );
    h.delete(&format!("/workloads/notebooks/{nb}"), &key).await;
    assert_eq!(
        h.delete(&format!("/iam/members/{m}"), &h.admin).await.0,
        StatusCode::NO_CONTENT
    );
    assert_eq!(h.get("/iam/me", &key).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(
        h.delete(&format!("/iam/teams/{team}"), &h.admin).await.0,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        h.get(&format!("/iam/teams/{team}"), &h.admin).await.0,
        StatusCode::NOT_FOUND
    );
}
both!(identity_administration);

async fn rate_limit(store: Store) {
    let h = Harness::with(store, |s| s.control.rate_limit_per_second = 5).await;
    let mut statuses = Vec::new();
    for _ in 0..12 {
        statuses.push(h.get("/iam/me", &h.admin).await);
    }
    let limited: Vec<&(StatusCode, Value)> = statuses
        .iter()
        .filter(|(s, _)| *s == StatusCode::TOO_MANY_REQUESTS)
        .collect();
    assert!(!limited.is_empty(), "12 requests at 5/s must hit the limit");
    assert_eq!(code(&limited[0].1), "rate_limited");
    // Another key has its own budget.
    let key = h.cp.create_api_key(None, "other").await.unwrap();
    assert_eq!(h.get("/iam/me", &key).await.0, StatusCode::OK);
}
both!(rate_limit);

#[tokio::test]
async fn operational_endpoints() {
    let h = Harness::new(Store::Sqlite).await;
    h.get("/workloads/notebooks", &h.admin).await;
    let (s, _, body) = h
        .raw(Request::get("/metrics").body(Body::empty()).unwrap())
        .await;
    assert_eq!(s, StatusCode::OK);
    let text = String::from_utf8(body).unwrap();
    assert!(text.contains("marina_control_http_requests_total{method=\"GET\",route=\"/workloads/notebooks\",status=\"200\"} 1"), "{text}");
    let (s, api) = h.call(Method::GET, "/openapi.json", None, None).await;
    assert_eq!(s, StatusCode::OK);
    let paths = api["paths"].as_object().unwrap();
    for p in [
        "/workloads/notebooks",
        "/workloads/notebooks/{notebook}",
        "/workloads/notebooks/{notebook}/start",
        "/workloads/notebooks/{notebook}/stop",
        "/workloads/notebooks/{notebook}/open",
        "/workloads/notebooks/{notebook}/ping",
        "/workloads/notebooks/{notebook}/teams",
        "/workloads/notebooks/{notebook}/teams/{team}",
        "/workloads/teams/{team}/notebooks",
        "/workloads/configs",
        "/workloads/configs/{config}",
        "/iam/me",
        "/iam/members",
        "/iam/members/{member}",
        "/iam/members/{member}/api-keys",
        "/iam/members/{member}/api-keys/{key}",
        "/iam/teams",
        "/iam/teams/{team}",
        "/iam/teams/{team}/members",
        "/iam/teams/{team}/members/{member}",
        "/internal/v1/routes",
        "/internal/v1/activity",
        "/internal/v1/redeem",
    ] {
        assert!(paths.contains_key(p), "openapi lacks {p}");
    }
    assert!(api["components"]["schemas"]["Notebook"].is_object());
    let (s, hc) = h.call(Method::GET, "/host-config.json", None, None).await;
    assert_eq!(
        (s, hc["edgeOrigin"].as_str()),
        (StatusCode::OK, Some("http://127.0.0.1:8000"))
    );
    // The test runtime isolates nothing, and the page is told so (it then shows a warning).
    assert_eq!(hc["notebookIsolation"], "none");
    let (s, headers, _) = h.raw(Request::get("/").body(Body::empty()).unwrap()).await;
    assert_eq!(s, StatusCode::OK);
    assert!(headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    let off = Harness::with(Store::Sqlite, |s| s.control.host_page = false).await;
    assert_eq!(
        off.raw(Request::get("/").body(Body::empty()).unwrap())
            .await
            .0,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn postgres_variant_fails_loudly_without_a_server() {
    // Documented behaviour: without TEST_POSTGRES_URL the postgres variants fail with a hint.
    if std::env::var("TEST_POSTGRES_URL").is_ok() {
        return;
    }
    let r = tokio::spawn(async { common::PgDatabase::create().await }).await;
    let panic = r.expect_err("must fail without TEST_POSTGRES_URL");
    let msg = panic.into_panic();
    let msg = msg
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| msg.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default();
    assert!(msg.contains("scripts/test.sh"), "{msg}");
}

/// `ControlPlane::serve` on a real loopback listener, and its graceful shutdown.
#[tokio::test]
async fn serves_over_loopback_and_shuts_down() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let settings = common::fast_settings(dir.path());
    let runtime = std::sync::Arc::new(common::TestRuntime::default());
    let cp = marina_control::ControlPlane::open(&settings, runtime)
        .await
        .unwrap();
    let key = std::fs::read_to_string(&cp.bootstrap().unwrap().admin_key_file).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(cp.serve(listener, async {
        let _ = rx.await;
    }));
    let get = |path: &str, key: Option<&str>| {
        let auth = key
            .map(|k| format!("Authorization: Bearer {}\r\n", k.trim()))
            .unwrap_or_default();
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n")
    };
    for (req, want) in [
        (get("/healthz", None), "HTTP/1.1 200"),
        (get("/iam/me", Some(&key)), "HTTP/1.1 200"),
        (get("/iam/me", None), "HTTP/1.1 401"),
    ] {
        let mut sock = tokio::net::TcpStream::connect(addr).await.unwrap();
        sock.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        sock.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with(want), "{req} → {out}");
    }
    tx.send(()).unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(5), server)
        .await
        .expect("serve returns after shutdown")
        .unwrap()
        .unwrap();
}

/// Two admins demoting each other at once: exactly one succeeds, one admin remains.
async fn last_admin_race(store: Store) {
    let h = std::sync::Arc::new(Harness::new(store).await);
    let me = h.get("/iam/me", &h.admin).await.1["member"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (other, other_key) = h.member(&h.admin, "admin").await;
    let a = {
        let h = h.clone();
        tokio::spawn(async move {
            h.patch(
                &format!("/iam/members/{other}"),
                &h.admin,
                json!({"role": "member"}),
            )
            .await
            .0
        })
    };
    let b = {
        let h = h.clone();
        let me = me.clone();
        tokio::spawn(async move {
            h.patch(
                &format!("/iam/members/{me}"),
                &other_key,
                json!({"role": "member"}),
            )
            .await
            .0
        })
    };
    let mut outcomes = vec![a.await.unwrap(), b.await.unwrap()];
    outcomes.sort();
    // The loser is refused as last admin (409) or, if it ran second with a key that had just
    // been demoted, as a non-admin (403).
    assert_eq!(outcomes[0], StatusCode::OK, "{outcomes:?}");
    assert!(
        [StatusCode::FORBIDDEN, StatusCode::CONFLICT].contains(&outcomes[1]),
        "{outcomes:?}"
    );
    let key = h.cp.create_api_key(None, "check").await.unwrap();
    let (_, list) = h.get("/iam/members", &key).await;
    let admins = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["role"] == "admin")
        .count();
    assert_eq!(admins, 1);
}
both!(last_admin_race);
