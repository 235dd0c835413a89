//! A connect token's `exp` on a live connection: `refresh` before it, a fresh token keeps the
//! connection (narrower grants end the streams no longer granted), no answer ends it with
//! `TOKEN_EXPIRED` (close 4401, SSE `event: error`) once the grace has passed.

use std::time::Duration;

use serde_json::{Value, json};
use zerodrop_core::now_ms;
use zerodrop_testkit::server::TestServer;
use zerodrop_testkit::sse::{SseClient, SseRead};
use zerodrop_testkit::ws::{Next, WsClient};

fn now_sec() -> u64 {
    now_ms() / 1000
}

async fn server() -> TestServer {
    TestServer::with(|c| c.token_grace_sec = 1).await
}

/// The next frame that is not a ping (answered), whatever its type, within `within`.
async fn frame(c: &mut WsClient, within: Duration) -> Value {
    let until = tokio::time::Instant::now() + within;
    loop {
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        match c.next_within(left).await {
            Next::Frame(f) if f["type"] == "ping" => {
                c.send(json!({"type":"pong","t":f["t"]})).await;
            }
            Next::Frame(f) => return f,
            other => panic!("expected a frame, got {other:?}"),
        }
    }
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
