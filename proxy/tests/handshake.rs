//! The handshake and the session cookie, every way they must fail, against a recording fake
//! upstream (these tests are about the edge, not Marimo).

mod common;

use std::time::Duration;

use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use marina_config::settings::ReplayStore;
use marina_config::wire::{AccessMode, UrlClaims};
use marina_testkit::control::FakeControl;

const NB: &str = "NOTEBOOK01";
const OWNER: &str = "OWNER00001";
const VIEWER: &str = "VIEWER0001";

struct World {
    keys: Keys,
    up: FakeUpstream,
    edge: TestEdge,
    route: marina_config::wire::Route,
}

async fn world() -> World {
    let keys = Keys::generate();
    let up = FakeUpstream::start().await;
    let route = route(NB, "SESSION001", up.addr, id(OWNER), &[id(VIEWER)]);
    let edge = TestEdge::start(&keys, std::slice::from_ref(&route), EdgeOptions::default()).await;
    World {
        keys,
        up,
        edge,
        route,
    }
}

async fn expect_fail(w: &World, token: &str, status: u16, reason: &str) {
    let resp = handshake(&w.edge, id(NB), token).await;
    assert_eq!(resp.status(), status, "{reason}");
    assert!(resp.headers().get("set-cookie").is_none(), "{reason}");
    let csp = resp.headers().get("content-security-policy");
    assert!(
        csp.and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("frame-ancestors")),
        "{reason}: error pages may be framed only by the host application"
    );
    let body = resp.text().await.unwrap();
    assert!(body.contains("<html"), "{reason}: an HTML page");
    assert!(!body.contains(token), "{reason}: never echo the token");
    assert!(
        w.edge
            .metrics
            .render()
            .contains(&format!("outcome=\"{reason}\"")),
        "{reason} counted"
    );
}

#[tokio::test]
async fn handshake_sets_cookie_and_redirects_without_the_token() {
    let logs = logs();
    let w = world().await;
    let token = w.keys.sign(&claims(&w.route, id(OWNER), AccessMode::Edit));
    let resp = handshake(&w.edge, id(NB), &token).await;
    assert_eq!(resp.status(), 303);
    let h = resp.headers();
    assert_eq!(h["location"], "/notebooks/NOTEBOOK01/");
    assert_eq!(h["cache-control"], "no-store");
    assert_eq!(h["referrer-policy"], "no-referrer");
    let sc = h["set-cookie"].to_str().unwrap();
    assert!(sc.starts_with("marina="), "{sc}");
    assert!(sc.contains("Path=/notebooks/NOTEBOOK01"), "{sc}");
    assert!(
        sc.contains("HttpOnly") && sc.contains("SameSite=Strict"),
        "{sc}"
    );
    assert!(!sc.contains("Secure"), "plain http: no Secure");
    assert!(!h["location"].to_str().unwrap().contains(&token));
    let cookie = cookie_pair(&resp);

    // The cookie opens the notebook; the upstream never sees the token or the cookie.
    let r = client()
        .get(w.edge.url("/notebooks/NOTEBOOK01/"))
        .header("cookie", format!("{cookie}; theme=dark"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen = w.up.seen.lock().unwrap().clone();
    assert_eq!(
        seen.len(),
        1,
        "nothing under the handshake path reached the upstream"
    );
    for s in &seen {
        let all = format!("{} {:?}", s.uri, s.headers);
        assert!(!all.contains(&token));
        assert!(!all.contains(cookie.split('=').nth(1).unwrap()));
        assert!(!s.uri.contains("_auth"));
    }
    assert_eq!(seen[0].headers["cookie"], "theme=dark");
    let logged = String::from_utf8_lossy(&logs.lock().unwrap()).to_string();
    assert!(!logged.contains(&token), "token in logs");
    assert!(
        !logged.contains("marimo-upstream-secret"),
        "upstream token in logs"
    );
    assert!(w
        .edge
        .metrics
        .render()
        .contains("marina_edge_handshakes_total{outcome=\"ok\"} 1"));
    w.edge.stop().await;
}

#[tokio::test]
async fn next_parameter_is_honoured_only_under_the_notebook() {
    let w = world().await;
    for (next, expect) in [
        (
            "%2Fnotebooks%2FNOTEBOOK01%2F%3Fkiosk%3Dtrue",
            "/notebooks/NOTEBOOK01/?kiosk=true",
        ),
        ("https%3A%2F%2Fevil.example%2F", "/notebooks/NOTEBOOK01/"),
        ("%2F%2Fevil.example%2F", "/notebooks/NOTEBOOK01/"),
        ("%2Fnotebooks%2FOTHERNOTE1%2F", "/notebooks/NOTEBOOK01/"),
    ] {
        let t = w.keys.sign(&claims(&w.route, id(OWNER), AccessMode::Edit));
        let r = client()
            .get(w.edge.url(&format!(
                "/notebooks/NOTEBOOK01/_auth?token={t}&next={next}"
            )))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 303);
        assert_eq!(r.headers()["location"], expect, "{next}");
    }
    w.edge.stop().await;
}

#[tokio::test]
async fn every_bad_token_is_refused() {
    let w = world().await;
    let base = || claims(&w.route, id(OWNER), AccessMode::Edit);
    let t = now();

    let expired = UrlClaims {
        exp: t - 60,
        iat: t - 400,
        nbf: t - 400,
        ..base()
    };
    expect_fail(&w, &w.keys.sign(&expired), 401, "link_expired").await;

    let future = UrlClaims {
        nbf: t + 120,
        ..base()
    };
    expect_fail(&w, &w.keys.sign(&future), 401, "link_not_yet_valid").await;

    let other_keys = Keys::generate();
    expect_fail(&w, &other_keys.sign(&base()), 401, "link_invalid").await;

    // HS256 with the public key as the HMAC secret (algorithm confusion).
    let mut h = Header::new(Algorithm::HS256);
    h.kid = Some("k1".into());
    for secret in [w.keys.public_pem.as_bytes(), &w.keys.public_raw[..]] {
        let hs = jsonwebtoken::encode(&h, &base(), &EncodingKey::from_secret(secret)).unwrap();
        expect_fail(&w, &hs, 401, "link_invalid").await;
    }

    // alg: none, unsigned.
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    let none = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT","kid":"k1"}"#),
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(&base()).unwrap())
    );
    expect_fail(&w, &none, 401, "link_invalid").await;

    // A signed token with its payload swapped (signature no longer matches).
    let good = w.keys.sign(&base());
    let parts: Vec<&str> = good.split('.').collect();
    let forged_claims = UrlClaims {
        sub: id(VIEWER),
        ..base()
    };
    let forged = format!(
        "{}.{}.{}",
        parts[0],
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(&forged_claims).unwrap()),
        parts[2]
    );
    expect_fail(&w, &forged, 401, "link_invalid").await;

    expect_fail(
        &w,
        &w.keys.sign(&UrlClaims {
            aud: "someone-else".into(),
            ..base()
        }),
        401,
        "link_invalid",
    )
    .await;
    expect_fail(
        &w,
        &w.keys.sign(&UrlClaims {
            iss: "someone-else".into(),
            ..base()
        }),
        401,
        "link_invalid",
    )
    .await;
    expect_fail(
        &w,
        &w.keys.sign(&UrlClaims {
            nb: id("OTHERNOTE1"),
            ..base()
        }),
        403,
        "link_other_notebook",
    )
    .await;
    expect_fail(
        &w,
        &w.keys.sign(&UrlClaims {
            sid: id("OLDSESSION"),
            ..base()
        }),
        401,
        "link_stale_session",
    )
    .await;
    // A stranger, and a viewer holding an `edit` token.
    expect_fail(
        &w,
        &w.keys.sign(&UrlClaims {
            sub: id("STRANGER01"),
            ..base()
        }),
        403,
        "no_access",
    )
    .await;
    expect_fail(
        &w,
        &w.keys.sign(&UrlClaims {
            sub: id(VIEWER),
            ..base()
        }),
        403,
        "no_access",
    )
    .await;
    expect_fail(&w, "not.a.token", 401, "link_invalid").await;

    // No token at all.
    let r = client()
        .get(w.edge.url("/notebooks/NOTEBOOK01/_auth"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // Under the handshake path: never forwarded.
    let r = client()
        .get(w.edge.url("/notebooks/NOTEBOOK01/_auth/anything"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert!(
        w.up.paths().is_empty(),
        "nothing reached the upstream: {:?}",
        w.up.paths()
    );
    w.edge.stop().await;
}

#[tokio::test]
async fn replay_is_refused_in_memory_and_after_restart() {
    let keys = Keys::generate();
    let up = FakeUpstream::start().await;
    let r = route(NB, "SESSION001", up.addr, id(OWNER), &[]);
    let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
    let edge = TestEdge::start_in(
        dir.clone(),
        &keys,
        std::slice::from_ref(&r),
        EdgeOptions::default(),
    )
    .await;
    let token = keys.sign(&claims(&r, id(OWNER), AccessMode::Edit));
    assert_eq!(handshake(&edge, id(NB), &token).await.status(), 303);
    let again = handshake(&edge, id(NB), &token).await;
    assert_eq!(again.status(), 409);
    assert!(again.text().await.unwrap().contains("already used"));
    edge.stop().await;

    // A new edge process on the same data directory still refuses it (the journal).
    let edge =
        TestEdge::start_in(dir, &keys, std::slice::from_ref(&r), EdgeOptions::default()).await;
    assert_eq!(handshake(&edge, id(NB), &token).await.status(), 409);
    edge.stop().await;
}

#[tokio::test]
async fn replay_is_refused_across_replicas_with_the_control_store() {
    let keys = Keys::generate();
    let up = FakeUpstream::start().await;
    let control = FakeControl::start().await;
    let r = route(NB, "SESSION001", up.addr, id(OWNER), &[]);
    let opts = || EdgeOptions {
        replay: ReplayStore::Control,
        control_url: control.url.clone(),
        ..EdgeOptions::default()
    };
    let a = TestEdge::start(&keys, std::slice::from_ref(&r), opts()).await;
    let b = TestEdge::start(&keys, std::slice::from_ref(&r), opts()).await;
    let token = keys.sign(&claims(&r, id(OWNER), AccessMode::Edit));
    assert_eq!(handshake(&a, id(NB), &token).await.status(), 303);
    assert_eq!(
        handshake(&b, id(NB), &token).await.status(),
        409,
        "second replica"
    );
    // A cookie sealed by one replica works on the other (same configured key).
    let t2 = keys.sign(&claims(&r, id(OWNER), AccessMode::Edit));
    let cookie = cookie_pair(&handshake(&a, id(NB), &t2).await);
    let resp = client()
        .get(b.url("/notebooks/NOTEBOOK01/"))
        .header("cookie", cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // Activity reached the control plane.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let batches = control.activity.lock().unwrap().clone();
    assert!(
        batches.iter().any(
            |b| b["activity"]
                .as_array()
                .is_some_and(|n| n.iter().any(|x| x["notebookId"] == NB
                    && x["memberId"] == OWNER
                    && x["mode"] == "edit"
                    && x["lastActiveMs"].is_number()))
        ),
        "{batches:?}"
    );
    a.stop().await;
    b.stop().await;
}

/// The internal API over https: two replicas share the replay store through a control plane
/// whose certificate a private CA signed (`proxy.control_ca_file`); an edge that does not trust
/// that CA never talks to it, and fails closed.
#[tokio::test]
async fn replay_store_over_https_needs_a_trusted_control_plane() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = private_ca(dir.path());
    let keys = Keys::generate();
    let up = FakeUpstream::start().await;
    let control = FakeControl::start_tls(&cert, &key).await;
    assert!(control.url.starts_with("https://"));
    let r = route(NB, "SESSION001", up.addr, id(OWNER), &[]);
    let opts = |ca: Option<&std::path::Path>| EdgeOptions {
        replay: ReplayStore::Control,
        control_url: control.url.clone(),
        control_ca_file: ca.map(|p| p.to_path_buf()),
        ..EdgeOptions::default()
    };
    let a = TestEdge::start(&keys, std::slice::from_ref(&r), opts(Some(&ca))).await;
    let b = TestEdge::start(&keys, std::slice::from_ref(&r), opts(Some(&ca))).await;
    let token = keys.sign(&claims(&r, id(OWNER), AccessMode::Edit));
    assert_eq!(handshake(&a, id(NB), &token).await.status(), 303);
    assert_eq!(
        handshake(&b, id(NB), &token).await.status(),
        409,
        "second replica, over https"
    );
    // Activity batches travel the same way.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(!control.activity.lock().unwrap().is_empty());
    a.stop().await;
    b.stop().await;

    // With the system's roots only, the private CA is not trusted: no redemption, no cookie.
    let untrusting = TestEdge::start(&keys, std::slice::from_ref(&r), opts(None)).await;
    let fresh = keys.sign(&claims(&r, id(OWNER), AccessMode::Edit));
    let resp = handshake(&untrusting, id(NB), &fresh).await;
    assert_eq!(resp.status(), 502);
    assert!(resp.headers().get("set-cookie").is_none());
    untrusting.stop().await;
}

#[tokio::test]
async fn control_store_down_fails_closed() {
    let keys = Keys::generate();
    let up = FakeUpstream::start().await;
    let r = route(NB, "SESSION001", up.addr, id(OWNER), &[]);
    // Nothing listens there.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    let e = TestEdge::start(
        &keys,
        std::slice::from_ref(&r),
        EdgeOptions {
            replay: ReplayStore::Control,
            control_url: url,
            ..EdgeOptions::default()
        },
    )
    .await;
    let token = keys.sign(&claims(&r, id(OWNER), AccessMode::Edit));
    let resp = handshake(&e, id(NB), &token).await;
    assert_eq!(resp.status(), 502);
    assert!(resp.headers().get("set-cookie").is_none());
    e.stop().await;
}

#[tokio::test]
async fn cookie_failures() {
    let w = world().await;
    // `?kiosk=true`: a viewer's plain page request is first redirected there.
    let page = |cookie: Option<String>| {
        let url = w.edge.url("/notebooks/NOTEBOOK01/?kiosk=true");
        async move {
            let mut req = client().get(url).header("accept", "text/html");
            if let Some(c) = cookie {
                req = req.header("cookie", c);
            }
            req.send().await.unwrap()
        }
    };
    // No cookie.
    assert_eq!(page(None).await.status(), 401);
    // Tampered cookie.
    let good = login(&w.edge, &w.keys, &w.route, id(OWNER), AccessMode::Edit).await;
    let mut bad = good.clone().into_bytes();
    let i = bad.len() - 5;
    bad[i] = if bad[i] == b'A' { b'B' } else { b'A' };
    assert_eq!(
        page(Some(String::from_utf8(bad).unwrap())).await.status(),
        401
    );
    // A cookie sealed with another key.
    assert_eq!(page(Some("marina=AAAA".into())).await.status(), 401);
    assert_eq!(page(Some(good.clone())).await.status(), 200);

    // A cookie of another notebook (same edge, same key).
    let other = route("OTHERNOTE1", "SESSION009", w.up.addr, id(OWNER), &[]);
    w.edge
        .set_routes(2, &[w.route.clone(), other.clone()])
        .await;
    wait_until(|| w.edge.metrics.routes.get() == 2).await;
    let other_cookie = login(&w.edge, &w.keys, &other, id(OWNER), AccessMode::Edit).await;
    let r = page(Some(other_cookie)).await;
    assert_eq!(r.status(), 403);
    assert!(r.text().await.unwrap().contains("No access"));

    // The viewer loses access: their cookie stops working; the owner's still works.
    let viewer = login(&w.edge, &w.keys, &w.route, id(VIEWER), AccessMode::View).await;
    assert_eq!(page(Some(viewer.clone())).await.status(), 200);
    let mut no_viewer = w.route.clone();
    no_viewer.viewers.clear();
    w.edge.set_routes(3, &[no_viewer.clone()]).await;
    wait_until(|| w.edge.metrics.routes.get() == 1).await;
    assert_eq!(page(Some(viewer)).await.status(), 403);
    assert_eq!(page(Some(good.clone())).await.status(), 200);

    // The notebook restarts (new session id): the old cookie is refused.
    let mut restarted = no_viewer.clone();
    restarted.session_id = id("SESSION002");
    w.edge.set_routes(4, &[restarted]).await;
    let mut status = 0;
    for _ in 0..30 {
        status = page(Some(good.clone())).await.status().as_u16();
        if status == 401 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, 401, "stale session cookie refused");

    // The notebook stops: clear "not running" page, not a hang.
    w.edge.set_routes(5, &[]).await;
    wait_until(|| w.edge.metrics.routes.get() == 0).await;
    let r = page(Some(good)).await;
    assert_eq!(r.status(), 404);
    assert!(r.text().await.unwrap().contains("not running"));
    w.edge.stop().await;
}

#[tokio::test]
async fn expired_cookie_is_refused() {
    // Seal a cookie that expired, with the edge's own key, through the public API.
    let keys_c =
        marina_proxy::authenticate::cookie::CookieKeys::from_hex(&["11".repeat(32)]).unwrap();
    let w = world().await;
    let expired = keys_c.seal(&marina_proxy::authenticate::cookie::SessionClaims {
        member: id(OWNER),
        notebook: id(NB),
        session: id("SESSION001"),
        mode: AccessMode::Edit,
        expires: now() - 1,
    });
    let r = client()
        .get(w.edge.url("/notebooks/NOTEBOOK01/api/version"))
        .header("cookie", format!("marina={expired}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "session_expired");
    w.edge.stop().await;
}

/// Polls `f` for up to 3 s; panics if it never holds.
pub async fn wait_until(f: impl Fn() -> bool) {
    for _ in 0..60 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("condition not reached in 3 s");
}

#[tokio::test]
async fn routes_follow_the_control_feed_and_survive_its_outage() {
    let keys = Keys::generate();
    let up = FakeUpstream::start().await;
    let control = FakeControl::start().await;
    let r = route(NB, "SESSION001", up.addr, id(OWNER), &[]);
    let edge = TestEdge::start(
        &keys,
        &[],
        EdgeOptions {
            control_url: control.url.clone(),
            control_routes: true,
            ..EdgeOptions::default()
        },
    )
    .await;
    let ready = || async {
        client()
            .get(format!("http://{}/readyz", edge.admin))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    // An empty snapshot (version 0) loads at once: ready, but the notebook is not running.
    wait_until_async(|| async { ready().await == 200 }).await;
    let t = keys.sign(&claims(&r, id(OWNER), AccessMode::Edit));
    assert_eq!(handshake(&edge, id(NB), &t).await.status(), 404);
    // The control plane starts the notebook: the held poll returns the new version.
    *control.routes.lock().unwrap() = marina_config::wire::RoutesSnapshot {
        version: 1,
        routes: vec![r.clone()],
        ..Default::default()
    };
    wait_until(|| edge.metrics.routes.get() == 1).await;
    let cookie = login(&edge, &keys, &r, id(OWNER), AccessMode::Edit).await;
    // The control plane goes away: the edge keeps serving its last routes.
    control.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let resp = client()
        .get(edge.url("/notebooks/NOTEBOOK01/"))
        .header("cookie", cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let m = client()
        .get(format!("http://{}/metrics", edge.admin))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(m.contains("marina_edge_routes 1"), "{m}");
    edge.stop().await;
}

async fn wait_until_async<F, Fut>(f: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..60 {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("condition not reached in 3 s");
}
