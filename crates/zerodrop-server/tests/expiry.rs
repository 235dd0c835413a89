//! A connect token's `exp` on a live connection: `refresh` before it, a fresh token keeps the
//! connection (narrower grants end the streams no longer granted), no answer ends it with
//! `TOKEN_EXPIRED` (close 4401, SSE `event: error`) once the grace has passed.

use std::time::Duration;

use serde_json::{Value, json};
use zerodrop_core::now_ms;
use zerodrop_testkit::server::TestServer;
use zerodrop_testkit::sse::{SseClient, SseRead};
use zerodrop_testkit::ws::WsClient;

fn now_sec() -> u64 {
    now_ms() / 1000
}

async fn server() -> TestServer {
    TestServer::with(|c| c.token_grace_sec = 1).await
}

/// The next frame that is not a ping (answered), whatever its type, within `within`.
async fn frame(c: &mut WsClient, within: Duration) -> Value {
    c.next_frame(within).await
}

/// A socket (past `welcome`) whose connect token, for `room:*`, expires in 3 s; and its `exp`.
async fn connect_for_3s(s: &TestServer) -> (WsClient, u64) {
    let exp = now_sec() + 3;
    let tok = s.creds.token_until("u1", &["room:*"], &[], exp);
    let mut c = WsClient::connect(&format!("{}/v1/ws?token={tok}", s.ws_url()))
        .await
        .unwrap();
    c.expect("welcome").await;
    (c, exp)
}

fn seq(f: &Value) -> u64 {
    f["seq"].as_u64().expect("seq")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_without_a_fresh_token_is_asked_then_closed_with_token_expired() {
    let s = server().await;
    let (mut c, exp) = connect_for_3s(&s).await;
    // Asked a third of the token's remaining lifetime before `exp` (at most 60 s before).
    let ask = frame(&mut c, Duration::from_secs(10)).await;
    assert_eq!(ask, json!({"type":"refresh","exp":exp,"deadline":exp + 1}));
    assert!(now_sec() < exp, "asked before exp");
    // No answer: closed once exp + grace has passed.
    let e = frame(&mut c, Duration::from_secs(10)).await;
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str()),
        (Some("error"), Some("TOKEN_EXPIRED")),
        "{e}"
    );
    assert!(
        now_ms() + 100 >= (exp + 1) * 1000,
        "not before the deadline"
    );
    assert_eq!(c.expect_close().await, Some(4401));
    let m = s.api().get("/metrics", None).await.text;
    assert!(
        m.lines()
            .any(|l| l == "zerodrop_token_refreshes_total{result=\"ok\"} 0"),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_token_keeps_the_socket_with_no_gap_and_ends_the_streams_it_no_longer_grants() {
    let s = server().await;
    let api = s.api();
    let (mut c, exp) = connect_for_3s(&s).await;
    for st in ["room:a", "room:b"] {
        c.send(json!({"type":"subscribe","stream":st,"after":0}))
            .await;
        c.expect("subscribed").await;
    }
    api.publish("room:a", json!(1)).await;
    assert_eq!(seq(&c.events(1).await[0]), 1);
    let ask = frame(&mut c, Duration::from_secs(10)).await;
    assert_eq!(ask["type"], "refresh", "{ask}");
    // Narrower: room:a only, for an hour.
    let fresh = s
        .creds
        .token_until("u1", &["room:a"], &[], now_sec() + 3600);
    c.send(json!({"type":"refresh","token":fresh})).await;
    let e = frame(&mut c, Duration::from_secs(5)).await;
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str(), e["stream"].as_str()),
        (Some("error"), Some("FORBIDDEN"), Some("room:b")),
        "{e}"
    );
    let t = frame(&mut c, Duration::from_secs(5)).await;
    assert_eq!(
        t["type"], "token",
        "a fresh resume token answers the refresh: {t}"
    );
    // Past the old deadline the socket is still open and room:a goes on with no gap.
    tokio::time::sleep(Duration::from_millis(
        ((exp + 2) * 1000).saturating_sub(now_ms()),
    ))
    .await;
    for i in 2..=4 {
        api.publish("room:a", json!(i)).await;
    }
    api.publish("room:b", json!("not granted")).await;
    let got: Vec<u64> = c.events(3).await.iter().map(seq).collect();
    assert_eq!(got, vec![2, 3, 4]);
    c.send(json!({"type":"ping","t":9})).await;
    assert_eq!(
        c.expect("pong").await["t"],
        9,
        "nothing from room:b came first"
    );
    let m = api.get("/metrics", None).await.text;
    assert!(
        m.lines()
            .any(|l| l == "zerodrop_token_refreshes_total{result=\"ok\"} 1"),
        "{m}"
    );
    // room:b left the session too: a resume brings back room:a only.
    let welcome_token = t["resumeToken"].as_str().unwrap().to_string();
    c.abort();
    let mut r = WsClient::connect(&format!("{}/v1/ws?resume={welcome_token}", s.ws_url()))
        .await
        .unwrap();
    r.expect("welcome").await;
    let sub = r.expect("subscribed").await;
    assert_eq!(sub["stream"], "room:a");
    // Nothing was acked: room:a replays from its start.
    let got: Vec<u64> = r.events(4).await.iter().map(seq).collect();
    assert_eq!(got, vec![1, 2, 3, 4]);
    r.send(json!({"type":"ping","t":1})).await;
    assert_eq!(
        r.expect("pong").await["t"],
        1,
        "no other stream was resumed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_refresh_changes_nothing_and_the_deadline_stands() {
    let s = server().await;
    let (mut c, exp) = connect_for_3s(&s).await;
    // Another subject's token, an expired one, and garbage: each an error, none a refresh.
    let other = s
        .creds
        .token_until("u2", &["room:*"], &[], now_sec() + 3600);
    let stale = s.creds.token_until("u1", &["room:*"], &[], now_sec() - 10);
    for (token, code) in [
        (other, "FORBIDDEN"),
        (stale, "TOKEN_EXPIRED"),
        ("x.y.z".to_string(), "UNAUTHORIZED"),
    ] {
        c.send(json!({"type":"refresh","token":token})).await;
        let e = frame(&mut c, Duration::from_secs(5)).await;
        assert_eq!(
            (e["type"].as_str(), e["code"].as_str()),
            (Some("error"), Some(code)),
            "{e}"
        );
        assert!(e.get("stream").is_none(), "a connection-level refusal: {e}");
    }
    let m = s.api().get("/metrics", None).await.text;
    assert!(
        m.lines()
            .any(|l| l == "zerodrop_token_refreshes_total{result=\"refused\"} 3"),
        "{m}"
    );
    loop {
        let f = frame(&mut c, Duration::from_secs(10)).await;
        match f["type"].as_str() {
            Some("refresh") => continue,
            Some("error") => {
                assert_eq!(f["code"], "TOKEN_EXPIRED", "{f}");
                assert!(
                    now_ms() + 100 >= (exp + 1) * 1000,
                    "the old deadline, not earlier"
                );
                break;
            }
            _ => panic!("unexpected {f}"),
        }
    }
    assert_eq!(c.expect_close().await, Some(4401));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sse_stream_opened_with_a_token_ends_with_a_typed_error_at_the_deadline() {
    let s = server().await;
    let api = s.api();
    let exp = now_sec() + 2;
    let tok = s.creds.token_until("u1", &["room:*"], &[], exp);
    let mut c = SseClient::connect(&format!("{}/v1/streams/room:1/sse?token={tok}", s.url), &[])
        .await
        .unwrap();
    api.publish("room:1", json!(1)).await;
    assert_eq!(c.next().await.json()["seq"], 1);
    // The next block, after the grace: the typed end.
    let end = match c.read(Duration::from_secs(10)).await {
        SseRead::Event(e) => e,
        other => panic!("expected the typed end, got {other:?}"),
    };
    assert_eq!(end.event, "error", "{end:?}");
    assert_eq!(end.json()["code"], "TOKEN_EXPIRED");
    assert!(
        now_ms() + 100 >= (exp + 1) * 1000,
        "not before the deadline"
    );
    assert!(matches!(
        c.read(Duration::from_secs(5)).await,
        SseRead::Ended
    ));
}

/// The first frame after `welcome` on a socket resuming with `resume` (and `token`): the
/// answer to the resume.
async fn resume_with(s: &TestServer, resume: &str, token: Option<&str>) -> (WsClient, Value) {
    let mut c = WsClient::connect(&format!("{}/v1/ws", s.ws_url()))
        .await
        .unwrap();
    let mut frame_ = json!({"type":"resume","resumeToken":resume,"lastAck":{"room:a":1}});
    if let Some(t) = token {
        frame_["token"] = json!(t);
    }
    c.send(frame_).await;
    let first = frame(&mut c, Duration::from_secs(5)).await;
    (c, first)
}

/// Sleeps until `exp` plus the test servers' 1 s grace has passed.
async fn past_grace(exp: u64) {
    let until = (exp + 1) * 1000 + 200;
    tokio::time::sleep(Duration::from_millis(until.saturating_sub(now_ms()))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_past_its_tokens_exp_resumes_only_with_a_fresh_token_and_then_has_no_gap() {
    let s = server().await;
    let api = s.api();
    let exp = now_sec() + 2;
    let tok = s.creds.token_until("u1", &["room:*"], &[], exp);
    let mut c = WsClient::connect(&format!("{}/v1/ws?token={tok}", s.ws_url()))
        .await
        .unwrap();
    let w = c.expect("welcome").await;
    c.send(json!({"type":"subscribe","stream":"room:a","after":0}))
        .await;
    c.expect("subscribed").await;
    api.publish("room:a", json!(1)).await;
    assert_eq!(seq(&c.events(1).await[0]), 1);
    let old = w["resumeToken"].as_str().unwrap().to_string();
    let sid = w["sessionId"].as_str().unwrap().to_string();
    c.abort();
    api.publish("room:a", json!(2)).await;
    api.publish("room:a", json!(3)).await;
    past_grace(exp).await;
    // The resume token is still inside its reconnect window, but the session's authority
    // (the connect token's exp + grace) has passed: every way back needs a fresh token.
    let (mut r, e) = resume_with(&s, &old, None).await;
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str()),
        (Some("error"), Some("TOKEN_EXPIRED")),
        "{e}"
    );
    assert_eq!(r.expect_close().await, Some(4401));
    let h = api
        .post(
            &format!("/v1/sessions/{sid}/reconnect"),
            None,
            json!({"resumeToken": old}),
        )
        .await;
    assert_eq!((h.status, h.code()), (401, "TOKEN_EXPIRED"), "{}", h.text);
    let sse = SseClient::connect(
        &format!("{}/v1/streams/room:a/sse?resume={old}", s.url),
        &[],
    )
    .await;
    assert!(sse.is_err(), "SSE refuses the resume too");
    // A fresh token of another subject, an expired one, garbage: refused, the session intact.
    let other = s
        .creds
        .token_until("u2", &["room:*"], &[], now_sec() + 3600);
    let stale = s.creds.token_until("u1", &["room:*"], &[], now_sec() - 10);
    for (token, code, close) in [
        (other.as_str(), "FORBIDDEN", 4403),
        (stale.as_str(), "TOKEN_EXPIRED", 4401),
        ("x.y.z", "UNAUTHORIZED", 4401),
    ] {
        let (mut r, e) = resume_with(&s, &old, Some(token)).await;
        assert_eq!(e["code"], code, "{e}");
        assert_eq!(r.expect_close().await, Some(close));
    }
    // With both: resumed from lastAck 1, events 2 and 3, no gap; and the fresh token is the
    // session's authority now: the socket is asked to refresh before its exp.
    let fresh_exp = now_sec() + 3;
    let fresh = s.creds.token_until("u1", &["room:*"], &[], fresh_exp);
    let (mut r, w) = resume_with(&s, &old, Some(&fresh)).await;
    assert_eq!(w["type"], "welcome", "{w}");
    assert_eq!(w["sessionId"], sid.as_str());
    assert_eq!(r.expect("subscribed").await["stream"], "room:a");
    let got: Vec<u64> = r.events(2).await.iter().map(seq).collect();
    assert_eq!(got, vec![2, 3]);
    let ask = frame(&mut r, Duration::from_secs(10)).await;
    assert_eq!(
        ask,
        json!({"type":"refresh","exp":fresh_exp,"deadline":fresh_exp + 1})
    );
    // The resume token from this welcome carries the fresh authority: until it lapses too,
    // a plain resume works.
    let newer = w["resumeToken"].as_str().unwrap().to_string();
    r.abort();
    let (_r, w) = resume_with(&s, &newer, None).await;
    assert_eq!(w["type"], "welcome", "{w}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_ends_at_its_maximum_age_whatever_its_tokens_say() {
    let s = TestServer::with(|c| {
        c.token_grace_sec = 1;
        c.max_session_age_sec = 3;
    })
    .await;
    let tok = s
        .creds
        .token_until("u1", &["room:*"], &[], now_sec() + 3600);
    let opened = now_ms();
    let mut c = WsClient::connect(&format!("{}/v1/ws?token={tok}", s.ws_url()))
        .await
        .unwrap();
    let w = c.expect("welcome").await;
    let resume = w["resumeToken"].as_str().unwrap().to_string();
    let sid = w["sessionId"].as_str().unwrap().to_string();
    // No `refresh` (the token has an hour): the age ends it.
    let e = frame(&mut c, Duration::from_secs(10)).await;
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str()),
        (Some("error"), Some("RECONNECT_WINDOW_EXPIRED")),
        "{e}"
    );
    assert!(
        now_ms() + 100 >= opened + 3000,
        "not before the session's age"
    );
    assert_eq!(c.expect_close().await, Some(4410));
    // No way back, not even with a fresh token.
    let fresh = s
        .creds
        .token_until("u1", &["room:*"], &[], now_sec() + 3600);
    let (mut r, e) = resume_with(&s, &resume, Some(&fresh)).await;
    assert_eq!(e["code"], "RECONNECT_WINDOW_EXPIRED", "{e}");
    assert_eq!(r.expect_close().await, Some(4410));
    let h = s
        .api()
        .post(
            &format!("/v1/sessions/{sid}/refresh"),
            None,
            json!({"resumeToken": resume, "token": fresh}),
        )
        .await;
    assert_eq!(
        (h.status, h.code()),
        (410, "RECONNECT_WINDOW_EXPIRED"),
        "{}",
        h.text
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_refresh_renews_a_sessions_authority_and_narrows_its_grants() {
    let s = server().await;
    let api = s.api();
    let exp = now_sec() + 2;
    let tok = s.creds.token_until("u1", &["room:*"], &[], exp);
    let open = api
        .post(
            "/v1/sessions",
            Some(&tok),
            json!({"streams": ["room:a", "room:b"]}),
        )
        .await;
    assert_eq!(open.status, 201, "{}", open.text);
    let sid = open.json["sessionId"].as_str().unwrap().to_string();
    let old = open.json["resumeToken"].as_str().unwrap().to_string();
    api.publish("room:a", json!(1)).await;
    past_grace(exp).await;
    let reconnect = |resume: String, token: Option<String>| {
        let (api, sid) = (api.clone(), sid.clone());
        async move {
            let mut body = json!({"resumeToken": resume});
            if let Some(t) = token {
                body["token"] = json!(t);
            }
            api.post(&format!("/v1/sessions/{sid}/reconnect"), None, body)
                .await
        }
    };
    let refresh = |resume: String, token: String| {
        let (api, sid) = (api.clone(), sid.clone());
        async move {
            api.post(
                &format!("/v1/sessions/{sid}/refresh"),
                None,
                json!({"resumeToken": resume, "token": token}),
            )
            .await
        }
    };
    let r = reconnect(old.clone(), None).await;
    assert_eq!((r.status, r.code()), (401, "TOKEN_EXPIRED"), "{}", r.text);
    // Refused refreshes: another subject, an expired token, garbage, a missing field.
    let other = s
        .creds
        .token_until("u2", &["room:*"], &[], now_sec() + 3600);
    let stale = s.creds.token_until("u1", &["room:*"], &[], now_sec() - 10);
    for (token, status, code) in [
        (other, 403, "FORBIDDEN"),
        (stale, 401, "TOKEN_EXPIRED"),
        ("x.y.z".to_string(), 401, "UNAUTHORIZED"),
    ] {
        let r = refresh(old.clone(), token).await;
        assert_eq!((r.status, r.code()), (status, code), "{}", r.text);
    }
    let r = api
        .post(
            &format!("/v1/sessions/{sid}/refresh"),
            None,
            json!({"resumeToken": old}),
        )
        .await;
    assert_eq!((r.status, r.code()), (400, "INVALID_REQUEST"), "{}", r.text);
    // A narrower fresh token: room:b leaves the session.
    let fresh_exp = now_sec() + 3600;
    let fresh = s.creds.token_until("u1", &["room:a"], &[], fresh_exp);
    let r = refresh(old.clone(), fresh.clone()).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["sessionId"], sid.as_str());
    assert_eq!(r.json["exp"], fresh_exp);
    assert_eq!(r.json["ended"], json!(["room:b"]));
    let renewed = r.json["resumeToken"].as_str().unwrap().to_string();
    // The renewed resume token reconnects; the old one still needs a fresh token.
    let r = reconnect(renewed.clone(), None).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let replay = r.json["replay"].as_object().unwrap();
    assert_eq!(
        replay.keys().collect::<Vec<_>>(),
        vec!["room:a"],
        "{}",
        r.text
    );
    assert_eq!(replay["room:a"]["events"][0]["seq"], 1);
    let r = reconnect(old.clone(), None).await;
    assert_eq!((r.status, r.code()), (401, "TOKEN_EXPIRED"), "{}", r.text);
    // The grants were stored: a WebSocket resumed without a token cannot add room:b back.
    let (mut c, w) = resume_with(&s, &renewed, None).await;
    assert_eq!(w["type"], "welcome", "{w}");
    assert_eq!(c.expect("subscribed").await["stream"], "room:a");
    c.send(json!({"type":"subscribe","stream":"room:b"})).await;
    let e = frame(&mut c, Duration::from_secs(5)).await;
    assert_eq!(
        (e["code"].as_str(), e["stream"].as_str()),
        (Some("FORBIDDEN"), Some("room:b")),
        "{e}"
    );
}
