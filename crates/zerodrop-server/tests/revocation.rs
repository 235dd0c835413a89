//! Revocation and disconnect (SPEC §9) on one instance with a real SQLite file: a revoked
//! subject's or session's connections end with `REVOKED` (close 4403, SSE `event: error`),
//! its resume tokens and the connect tokens issued before are refused, the revocation is
//! listed, deletable and survives a restart; a disconnect order sends `reconnect` and the
//! client resumes at once; bad admin input is a typed error.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use zerodrop_core::now_ms;
use zerodrop_testkit::server::TestServer;
use zerodrop_testkit::sse::{SseClient, SseRead};
use zerodrop_testkit::ws::WsClient;

/// The next frame that is not a ping (answered).
async fn frame(c: &mut WsClient) -> Value {
    c.next_frame(Duration::from_secs(10)).await
}

/// A socket of `sub` past `welcome`, subscribed to `room:a`; and its welcome.
async fn socket(s: &TestServer, token: &str) -> (WsClient, Value) {
    let mut c = WsClient::connect(&format!("{}/v1/ws?token={token}", s.ws_url()))
        .await
        .unwrap();
    let w = c.expect("welcome").await;
    c.send(json!({"type":"subscribe","stream":"room:a"})).await;
    c.expect("subscribed").await;
    (c, w)
}

/// Waits past the current second, so that a token minted next has an `iat` after a
/// revocation made before (`iat` has whole seconds).
async fn next_second() {
    tokio::time::sleep(Duration::from_millis(1100 - now_ms() % 1000)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_subject_is_closed_everywhere_refused_until_deleted_and_it_survives_a_restart() {
    let s = TestServer::start().await;
    let api = s.api();
    let admin = s.creds.admin_token.clone();
    let t1 = s.creds.token("u1", &["room:*"], &[]);
    let t2 = s.creds.token("u2", &["room:*"], &[]);
    let (mut a, wa) = socket(&s, &t1).await;
    let (mut b, _) = socket(&s, &t1).await;
    let (mut other, _) = socket(&s, &t2).await;
    let mut sse = SseClient::connect(&format!("{}/v1/streams/room:a/sse?token={t1}", s.url), &[])
        .await
        .unwrap();
    let r = api
        .post(
            "/admin/revoke",
            Some(&admin),
            json!({"sub":"u1","reason":"left the company"}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let id = r.json["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("rv_"), "{id}");
    assert_eq!(r.json["sub"], "u1");
    assert_eq!(
        r.json["until"],
        Value::Null,
        "a subject's revocation lasts until deleted"
    );
    for c in [&mut a, &mut b] {
        let e = frame(c).await;
        assert_eq!(
            (e["type"].as_str(), e["code"].as_str()),
            (Some("error"), Some("REVOKED")),
            "{e}"
        );
        assert!(
            e["message"].as_str().unwrap().contains("left the company"),
            "{e}"
        );
        assert_eq!(c.expect_close().await, Some(4403));
    }
    match sse.read(Duration::from_secs(10)).await {
        SseRead::Event(e) => {
            assert_eq!(e.event, "error", "{e:?}");
            assert_eq!(e.json()["code"], "REVOKED");
        }
        other => panic!("expected the typed end, got {other:?}"),
    }
    // u2 is untouched.
    other.send(json!({"type":"ping","t":5})).await;
    assert_eq!(other.expect("pong").await["t"], 5);
    // The resume token and the old connect token are refused; HTTP too.
    let resume = wa["resumeToken"].as_str().unwrap();
    let sid = wa["sessionId"].as_str().unwrap();
    let rc = api.reconnect(sid, resume).await;
    assert_eq!((rc.status, rc.code()), (401, "REVOKED"), "{}", rc.text);
    let mut c = WsClient::connect(&format!("{}/v1/ws?resume={resume}", s.ws_url()))
        .await
        .unwrap();
    let e = frame(&mut c).await;
    assert_eq!(e["code"], "REVOKED", "{e}");
    assert_eq!(c.expect_close().await, Some(4403));
    let refused = WsClient::connect(&format!("{}/v1/ws?token={t1}", s.ws_url())).await;
    assert!(
        refused.is_err(),
        "the old connect token is refused before the upgrade"
    );
    let open = api
        .post("/v1/sessions", Some(&t1), json!({"streams":["room:a"]}))
        .await;
    assert_eq!(
        (open.status, open.code()),
        (401, "REVOKED"),
        "{}",
        open.text
    );
    // A token issued after the revocation works (the backend decides whom it mints for).
    next_second().await;
    let fresh = s.creds.token("u1", &["room:*"], &[]);
    let open = api
        .post("/v1/sessions", Some(&fresh), json!({"streams":["room:a"]}))
        .await;
    assert_eq!(open.status, 201, "{}", open.text);
    // Listed; metrics; then a restart on the same data keeps it.
    let list = api.get("/admin/revocations", Some(&admin)).await;
    assert_eq!(
        list.json["revocations"].as_array().unwrap().len(),
        1,
        "{}",
        list.text
    );
    assert_eq!(list.json["revocations"][0]["id"], id.as_str());
    let m = api.get("/metrics", None).await.text;
    assert!(
        m.lines().any(|l| l == "zerodrop_revocations_active 1"),
        "{m}"
    );
    assert!(
        m.lines()
            .any(|l| l == "zerodrop_connections_closed_total{reason=\"revoked\"} 3"),
        "{m}"
    );
    drop((a, b, other, c));
    let dir = s.stop().await.expect("the data dir");
    let s = TestServer::start_in(dir.path(), |_| {}).await;
    let api = s.api();
    let open = api
        .post("/v1/sessions", Some(&t1), json!({"streams":["room:a"]}))
        .await;
    assert_eq!(
        (open.status, open.code()),
        (401, "REVOKED"),
        "after a restart: {}",
        open.text
    );
    // Deleted: the old token works again.
    let del = api
        .request(
            Method::DELETE,
            &format!("/admin/revocations/{id}"),
            Some(&admin),
            None,
            &[],
        )
        .await;
    assert_eq!(del.status, 204, "{}", del.text);
    let open = api
        .post("/v1/sessions", Some(&t1), json!({"streams":["room:a"]}))
        .await;
    assert_eq!(open.status, 201, "{}", open.text);
    let del = api
        .request(
            Method::DELETE,
            &format!("/admin/revocations/{id}"),
            Some(&admin),
            None,
            &[],
        )
        .await;
    assert_eq!((del.status, del.code()), (404, "NOT_FOUND"), "{}", del.text);
    drop(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_session_ends_alone_and_a_disconnect_lets_the_client_resume_at_once() {
    let s = TestServer::start().await;
    let api = s.api();
    let admin = s.creds.admin_token.clone();
    let t1 = s.creds.token("u1", &["room:*"], &[]);
    let (mut a, wa) = socket(&s, &t1).await;
    let (mut b, wb) = socket(&s, &t1).await;
    let r = api
        .post(
            "/admin/revoke",
            Some(&admin),
            json!({"sessionId": wa["sessionId"]}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert!(
        r.json["until"].as_u64().is_some(),
        "a session's revocation lapses: {}",
        r.text
    );
    let e = frame(&mut a).await;
    assert_eq!(e["code"], "REVOKED", "{e}");
    assert_eq!(a.expect_close().await, Some(4403));
    b.send(json!({"type":"ping","t":1})).await;
    assert_eq!(
        b.expect("pong").await["t"],
        1,
        "the other session of u1 stays"
    );
    // Disconnect b: a reconnect frame with a resume token, close 1012, and it resumes at once
    // with what was published meanwhile.
    let r = api
        .post(
            "/admin/disconnect",
            Some(&admin),
            json!({"sessionId": wb["sessionId"]}),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.text);
    let f = frame(&mut b).await;
    assert_eq!(
        (f["type"].as_str(), f["reason"].as_str()),
        (Some("reconnect"), Some("disconnected")),
        "{f}"
    );
    assert_eq!(b.expect_close().await, Some(1012));
    api.publish("room:a", json!(1)).await;
    let token = f["resumeToken"].as_str().unwrap();
    let mut c = WsClient::connect(&format!("{}/v1/ws?resume={token}", s.ws_url()))
        .await
        .unwrap();
    let w = c.expect("welcome").await;
    assert_eq!(w["sessionId"], wb["sessionId"]);
    c.expect("subscribed").await;
    assert_eq!(c.events(1).await[0]["seq"], 1);
    // The order is spent: the resumed socket stays.
    c.send(json!({"type":"ping","t":2})).await;
    assert_eq!(c.expect("pong").await["t"], 2);
    let list = api.get("/admin/revocations", Some(&admin)).await;
    assert_eq!(
        list.json["revocations"].as_array().unwrap().len(),
        1,
        "disconnects are not listed: {}",
        list.text
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_admin_input_is_a_typed_error_and_changes_nothing() {
    let s = TestServer::start().await;
    let api = s.api();
    let admin = s.creds.admin_token.clone();
    let past = now_ms() / 1000 - 10;
    for (body, code) in [
        (json!({}), "INVALID_REQUEST"),
        (json!({"sub":"u1","sessionId":"s_x"}), "INVALID_REQUEST"),
        (json!({"sub":""}), "INVALID_REQUEST"),
        (json!({"sessionId":"not a session"}), "INVALID_REQUEST"),
        (json!({"sub":"u1","until": past}), "INVALID_REQUEST"),
        (
            json!({"sub":"u1","reason": "x".repeat(300)}),
            "INVALID_REQUEST",
        ),
        (json!({"sub":"u1","extra": 1}), "INVALID_REQUEST"),
    ] {
        let r = api.post("/admin/revoke", Some(&admin), body.clone()).await;
        assert_eq!((r.status, r.code()), (400, code), "{body}: {}", r.text);
    }
    let r = api.post("/admin/disconnect", Some(&admin), json!({})).await;
    assert_eq!((r.status, r.code()), (400, "INVALID_REQUEST"), "{}", r.text);
    let r = api
        .post("/admin/revoke", Some(&s.creds.api_key), json!({"sub":"u1"}))
        .await;
    assert_eq!(
        (r.status, r.code()),
        (401, "UNAUTHORIZED"),
        "the api key is no admin token"
    );
    let r = api
        .request(
            Method::DELETE,
            "/admin/revocations/rv_nope",
            Some(&admin),
            None,
            &[],
        )
        .await;
    assert_eq!((r.status, r.code()), (404, "NOT_FOUND"), "{}", r.text);
    let list = api.get("/admin/revocations", Some(&admin)).await;
    assert_eq!(
        list.json,
        json!({"revocations": []}),
        "nothing was recorded"
    );
    let t1 = s.creds.token("u1", &["room:*"], &[]);
    let open = api
        .post("/v1/sessions", Some(&t1), json!({"streams":["room:a"]}))
        .await;
    assert_eq!(open.status, 201, "{}", open.text);
}
