//! The WebSocket protocol over loopback: frames, resume, acks, limits and every close code.

use std::time::Duration;

use serde_json::{Value, json};
use zerodrop_server::config::StoreChoice;
use zerodrop_testkit::server::TestServer;
use zerodrop_testkit::ws::{Next, WsClient};

fn seq(f: &Value) -> u64 {
    f["seq"].as_u64().unwrap()
}

/// An HTTP checkpoint on `room:1` with the session's resume token; its answer.
async fn checkpoint(api: &zerodrop_testkit::http::Api, sid: &str, token: &str, seq: u64) -> Value {
    checkpoint_on(api, sid, token, "room:1", seq).await
}

/// An HTTP checkpoint on `stream` with the session's resume token; its answer.
async fn checkpoint_on(
    api: &zerodrop_testkit::http::Api,
    sid: &str,
    token: &str,
    stream: &str,
    seq: u64,
) -> Value {
    api.post(
        &format!("/v1/sessions/{sid}/checkpoint"),
        Some(token),
        json!({"stream":stream,"seq":seq}),
    )
    .await
    .json
}

async fn connect(s: &TestServer, streams: &[&str]) -> (WsClient, Value) {
    let tok = s.token("u1", streams);
    let mut c = WsClient::connect(&format!("{}/v1/ws?token={tok}", s.ws_url()))
        .await
        .unwrap();
    let welcome = c.expect("welcome").await;
    (c, welcome)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_receive_and_resume_exactly_the_missed_events() {
    let s = TestServer::start().await;
    let api = s.api();
    for i in 1..=3 {
        api.publish("room:1", json!(i)).await;
    }
    let (mut c, welcome) = connect(&s, &["room:*"]).await;
    assert_eq!(c.protocol.as_deref(), Some("zerodrop.v1"));
    assert_eq!(welcome["protocol"], "zerodrop.v1");
    assert_eq!(welcome["reconnectWindowSec"], 900);
    assert_eq!(welcome["instance"], s.app().instance.as_str());
    let sid = welcome["sessionId"].as_str().unwrap().to_string();
    // Live only: starts at the head.
    c.send(json!({"type":"subscribe","stream":"room:1"})).await;
    let sub = c.expect("subscribed").await;
    assert_eq!(
        (sub["headSeq"].as_u64(), sub["fromSeq"].as_u64()),
        (Some(3), Some(4))
    );
    let epoch = sub["epoch"].as_str().unwrap().to_string();
    // With history.
    c.send(json!({"type":"subscribe","stream":"room:2","after":0}))
        .await;
    c.expect("subscribed").await;
    api.publish("room:2", json!("a")).await;
    let e = c.events(1).await;
    assert_eq!((e[0]["stream"].as_str(), seq(&e[0])), (Some("room:2"), 1));
    for i in 4..=6 {
        api.publish("room:1", json!(i)).await;
    }
    let evs = c.events(3).await;
    assert_eq!(evs.iter().map(seq).collect::<Vec<_>>(), vec![4, 5, 6]);
    assert_eq!(evs[0]["epoch"], epoch.as_str());
    assert_eq!(evs[0]["data"], 4);
    c.send(json!({"type":"ack","stream":"room:1","seq":5}))
        .await;
    tokio::time::sleep(Duration::from_millis(400)).await; // acks are written behind
    let token = welcome["resumeToken"].as_str().unwrap().to_string();
    c.abort();
    for i in 7..=10 {
        api.publish("room:1", json!(i)).await;
    }
    // Resume with a first frame, no lastAck: from the stored ack (5).
    let mut c = WsClient::connect(&format!("{}/v1/ws", s.ws_url()))
        .await
        .unwrap();
    c.send(json!({"type":"resume","resumeToken": token})).await;
    let w = c.expect("welcome").await;
    assert_eq!(w["sessionId"], sid.as_str());
    let fresh = w["resumeToken"].as_str().unwrap().to_string();
    let mut subscribed = Vec::new();
    let mut events = Vec::new();
    while events.len() < 6 {
        let f = c.recv().await;
        match f["type"].as_str().unwrap() {
            "subscribed" => subscribed.push(f["stream"].as_str().unwrap().to_string()),
            "event" => events.push((f["stream"].as_str().unwrap().to_string(), seq(&f))),
            other => panic!("unexpected {other}: {f}"),
        }
    }
    subscribed.sort();
    assert_eq!(subscribed, vec!["room:1", "room:2"]);
    let room1: Vec<u64> = events
        .iter()
        .filter(|(s, _)| s == "room:1")
        .map(|(_, q)| *q)
        .collect();
    assert_eq!(room1, vec![6, 7, 8, 9, 10]);
    assert!(
        events.contains(&("room:2".to_string(), 1)),
        "room:2 was never acked"
    );
    c.expect_silence(Duration::from_millis(300)).await;
    c.abort();
    // Resume with ?resume= and the client's own lastAck: exactly what it is missing.
    api.publish("room:1", json!(11)).await;
    let mut c = WsClient::connect(&format!("{}/v1/ws?resume={fresh}", s.ws_url()))
        .await
        .unwrap();
    assert_eq!(c.expect("welcome").await["sessionId"], sid.as_str());
    c.send(json!({"type":"ping","t":1})).await;
    let mut got = Vec::new();
    let mut pong = false;
    while got.len() < 6 || !pong {
        let f = c.recv().await;
        match f["type"].as_str().unwrap() {
            "event" if f["stream"] == "room:1" => got.push(seq(&f)),
            "pong" => {
                assert_eq!(f["t"], 1);
                pong = true;
            }
            _ => {}
        }
    }
    assert_eq!(
        got,
        vec![6, 7, 8, 9, 10, 11],
        "the ack frames were not sent, so 6.. again"
    );
    let m = api.metrics_json().await;
    assert_eq!(m["ws_metrics"]["ws_reconnects"], 2);
    assert_eq!(m["ws_metrics"]["ws_resumes"], 2);
    assert_eq!(m["ws_metrics"]["dropped_messages"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_with_last_ack_and_stream_errors() {
    let s = TestServer::with(|c| c.retention.max_events = 5).await;
    let api = s.api();
    let (mut c, welcome) = connect(&s, &["room:*"]).await;
    let token = welcome["resumeToken"].as_str().unwrap().to_string();
    for st in ["room:a", "room:b"] {
        c.send(json!({"type":"subscribe","stream":st,"after":0}))
            .await;
        c.expect("subscribed").await;
    }
    api.publish("room:a", json!(1)).await;
    api.publish("room:b", json!(1)).await;
    c.events(2).await;
    c.abort();
    for i in 2..=4 {
        api.publish("room:a", json!(i)).await;
    }
    for i in 2..=20 {
        api.publish("room:b", json!(i)).await;
    }
    let mut c = WsClient::connect(&format!("{}/v1/ws", s.ws_url()))
        .await
        .unwrap();
    c.send(json!({"type":"resume","resumeToken": token,"lastAck":{"room:a":2,"room:b":1}}))
        .await;
    c.expect("welcome").await;
    let mut a = Vec::new();
    let mut b_error = None;
    while a.len() < 2 || b_error.is_none() {
        let f = c.recv().await;
        match (f["type"].as_str().unwrap(), f["stream"].as_str()) {
            ("event", Some("room:a")) => a.push(seq(&f)),
            ("error", Some("room:b")) => b_error = Some(f),
            ("subscribed", Some("room:a")) => assert_eq!(f["fromSeq"], 3),
            other => panic!("unexpected {other:?}: {f}"),
        }
    }
    assert_eq!(a, vec![3, 4]);
    let e = b_error.unwrap();
    assert_eq!(e["code"], "REPLAY_WINDOW_TRIMMED");
    assert_eq!(e["firstAvailableSeq"], 16);
    // The socket and the other stream keep going.
    api.publish("room:a", json!(5)).await;
    assert_eq!(seq(&c.events(1).await[0]), 5);
    let m = api.metrics_json().await;
    assert_eq!(m["ws_metrics"]["dropped_messages"], 14);
    // room:b is no longer part of the session; it can be subscribed again after a resync.
    c.send(json!({"type":"subscribe","stream":"room:b","after":15}))
        .await;
    let sub = c.expect("subscribed").await;
    assert_eq!(sub["fromSeq"], 16);
    assert_eq!(
        c.events(5).await.iter().map(seq).collect::<Vec<_>>(),
        vec![16, 17, 18, 19, 20]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_follow_the_checkpoint_rule() {
    let s = TestServer::start().await;
    let api = s.api();
    let (mut c, welcome) = connect(&s, &["room:*"]).await;
    let sid = welcome["sessionId"].as_str().unwrap().to_string();
    let token = welcome["resumeToken"].as_str().unwrap().to_string();
    c.send(json!({"type":"subscribe","stream":"room:1","after":0}))
        .await;
    c.expect("subscribed").await;
    for i in 1..=5 {
        api.publish("room:1", json!(i)).await;
    }
    c.events(5).await;
    c.send(json!({"type":"ack","stream":"room:1","seq":4}))
        .await;
    c.send(json!({"type":"ack","stream":"room:1","seq":2}))
        .await;
    c.send(json!({"type":"ack","stream":"room:1","seq":6}))
        .await;
    let e = c.expect("error").await;
    assert_eq!(
        (
            e["code"].as_str(),
            e["stream"].as_str(),
            e["headSeq"].as_u64()
        ),
        (Some("ACK_BEYOND_HEAD"), Some("room:1"), Some(5))
    );
    c.send(json!({"type":"ack","stream":"room:9","seq":1}))
        .await;
    assert_eq!(c.expect("error").await["code"], "INVALID_REQUEST");
    c.close().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The stored ack is 4: a stale ack never regressed it.
    assert_eq!(
        checkpoint(&api, &sid, &token, 3).await,
        json!({"ackUpdate":"ignored","lastAckSequence":4})
    );
    let m = s.api().get("/metrics", None).await.text;
    assert!(
        m.contains("zerodrop_checkpoints_total{result=\"applied\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("zerodrop_checkpoints_total{result=\"ignored\"} 2"),
        "{m}"
    );
}

/// `zerodrop.v2`'s batched ack: every entry under the single ack's rules, a bad entry answered
/// on its own stream while the others apply; on `zerodrop.v1` the form stays refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_acks_on_v2_apply_each_entry_under_the_checkpoint_rule() {
    let s = TestServer::start().await;
    let api = s.api();
    let tok = s.token("u1", &["room:*"]);
    let mut c = WsClient::connect_with(
        &format!("{}/v1/ws?token={tok}", s.ws_url()),
        &["zerodrop.v2", "zerodrop.v1"],
    )
    .await
    .unwrap();
    assert_eq!(c.protocol.as_deref(), Some("zerodrop.v2"));
    let welcome = c.expect("welcome").await;
    assert_eq!(welcome["protocol"], "zerodrop.v2");
    let sid = welcome["sessionId"].as_str().unwrap().to_string();
    let token = welcome["resumeToken"].as_str().unwrap().to_string();
    for st in ["room:1", "room:2"] {
        c.send(json!({"type":"subscribe","stream":st,"after":0}))
            .await;
        c.expect("subscribed").await;
    }
    for i in 1..=3 {
        api.publish("room:1", json!(i)).await;
        api.publish("room:2", json!(i)).await;
    }
    assert_eq!(c.events(6).await.len(), 6);
    c.send(json!({"type":"ack","acks":{"room:1":3,"room:2":2}}))
        .await;
    // Bad entries: beyond the head, a stream not subscribed, an invalid id, a seq that is
    // not a number; the good entry among them still applies.
    c.send(json!({"type":"ack","acks":{
        "room:2": 9, "room:7": 1, "bad stream!": 1, "room:1": "x"
    }}))
    .await;
    let mut errors = std::collections::BTreeMap::new();
    for _ in 0..4 {
        let e = c.expect("error").await;
        errors.insert(
            e["stream"].as_str().unwrap().to_string(),
            e["code"].as_str().unwrap().to_string(),
        );
        if e["code"] == "ACK_BEYOND_HEAD" {
            assert_eq!(e["headSeq"], 3, "{e}");
        }
    }
    let want: std::collections::BTreeMap<String, String> = [
        ("bad stream!", "INVALID_STREAM_ID"),
        ("room:1", "INVALID_REQUEST"),
        ("room:2", "ACK_BEYOND_HEAD"),
        ("room:7", "INVALID_REQUEST"),
    ]
    .into_iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(errors, want);
    // Both forms at once, or a batch larger than a session can hold, are refused whole.
    c.send(json!({"type":"ack","stream":"room:1","seq":1,"acks":{"room:1":1}}))
        .await;
    let e = c.expect("error").await;
    assert_eq!(
        (e["code"].as_str(), e.get("stream")),
        (Some("INVALID_REQUEST"), None)
    );
    let many: serde_json::Map<String, Value> =
        (0..200).map(|i| (format!("room:{i}"), json!(1))).collect();
    c.send(json!({"type":"ack","acks":many})).await;
    let e = c.expect("error").await;
    assert_eq!(
        (e["code"].as_str(), e.get("stream")),
        (Some("INVALID_REQUEST"), None)
    );
    // A stale entry is ignored, never a regression, and a later good batch applies.
    c.send(json!({"type":"ack","acks":{"room:1":1,"room:2":3}}))
        .await;
    c.send(json!({"type":"ping","t":"fence"})).await;
    assert_eq!(c.expect("pong").await["t"], "fence");
    c.close().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        checkpoint(&api, &sid, &token, 2).await,
        json!({"ackUpdate":"ignored","lastAckSequence":3})
    );
    assert_eq!(
        checkpoint_on(&api, &sid, &token, "room:2", 2).await,
        json!({"ackUpdate":"ignored","lastAckSequence":3})
    );

    // The same frame on a v1 socket is INVALID_REQUEST, and applies nothing.
    let mut v1 = WsClient::connect_with(
        &format!("{}/v1/ws?token={tok}", s.ws_url()),
        &["zerodrop.v1"],
    )
    .await
    .unwrap();
    assert_eq!(v1.expect("welcome").await["protocol"], "zerodrop.v1");
    v1.send(json!({"type":"subscribe","stream":"room:1","after":0}))
        .await;
    v1.expect("subscribed").await;
    v1.events(3).await;
    v1.send(json!({"type":"ack","acks":{"room:1":3}})).await;
    let e = v1.expect("error").await;
    assert_eq!(e["code"], "INVALID_REQUEST");
    assert!(
        e["message"].as_str().unwrap().contains("zerodrop.v2"),
        "{e}"
    );
    v1.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_get_typed_errors_and_the_socket_stays_open() {
    let s = TestServer::with(|c| {
        c.max_frame_bytes = 4096;
        c.max_streams_per_session = 2;
    })
    .await;
    let api = s.api();
    let (mut c, _) = connect(&s, &["room:*"]).await;
    let cases = [
        ("not json".to_string(), "INVALID_REQUEST"),
        ("{\"type\":\"nope\"}".into(), "INVALID_REQUEST"),
        ("{\"no\":\"type\"}".into(), "INVALID_REQUEST"),
        ("[1,2,3]".into(), "INVALID_REQUEST"),
        ("{\"type\":\"subscribe\"}".into(), "INVALID_REQUEST"),
        (
            "{\"type\":\"subscribe\",\"stream\":\"bad id\"}".into(),
            "INVALID_STREAM_ID",
        ),
        (
            "{\"type\":\"subscribe\",\"stream\":\"user:1\"}".into(),
            "FORBIDDEN",
        ),
        (
            "{\"type\":\"subscribe\",\"stream\":\"room:1\",\"after\":-1}".into(),
            "INVALID_REQUEST",
        ),
        (
            "{\"type\":\"subscribe\",\"stream\":\"room:1\",\"after\":99}".into(),
            "ACK_BEYOND_HEAD",
        ),
        (
            "{\"type\":\"subscribe\",\"stream\":\"room:1\",\"epoch\":\"ffffffffffffffff\"}".into(),
            "EPOCH_CHANGED",
        ),
        (
            "{\"type\":\"publish\",\"stream\":\"room:1\",\"data\":1}".into(),
            "FORBIDDEN",
        ),
        (
            "{\"type\":\"resume\",\"resumeToken\":\"x\"}".into(),
            "INVALID_REQUEST",
        ),
    ];
    for (frame, code) in &cases {
        c.send_raw(frame.clone()).await;
        let e = c.expect("error").await;
        assert_eq!(e["code"], *code, "{frame}: {e}");
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    c.send_binary(vec![1, 2, 3]).await;
    assert_eq!(c.expect("error").await["code"], "INVALID_REQUEST");
    for st in ["room:1", "room:2"] {
        c.send(json!({"type":"subscribe","stream":st})).await;
        c.expect("subscribed").await;
    }
    c.send(json!({"type":"subscribe","stream":"room:3"})).await;
    assert_eq!(c.expect("error").await["code"], "INVALID_REQUEST");
    // Still working.
    api.publish("room:1", json!("alive")).await;
    assert_eq!(c.events(1).await[0]["data"], "alive");
    c.send(json!({"type":"unsubscribe","stream":"room:1"}))
        .await;
    assert_eq!(c.expect("unsubscribed").await["stream"], "room:1");
    api.publish("room:1", json!("not delivered")).await;
    c.expect_silence(Duration::from_millis(300)).await;
    // A frame over the limit closes with 1009.
    c.send_raw(format!(
        "{{\"type\":\"ping\",\"t\":\"{}\"}}",
        "x".repeat(5000)
    ))
    .await;
    assert_eq!(close_after_too_large(&mut c).await, Some(1009));
    assert_eq!(api.info("room:1").await["headSeq"], 2, "stored data intact");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_frames() {
    let s = TestServer::start().await;
    let tok = s.creds.token("u1", &["room:*"], &["room:chat"]);
    let mut c = WsClient::connect(&format!("{}/v1/ws?token={tok}", s.ws_url()))
        .await
        .unwrap();
    c.expect("welcome").await;
    c.send(json!({"type":"subscribe","stream":"room:chat"}))
        .await;
    c.expect("subscribed").await;
    c.send(json!({"type":"publish","stream":"room:chat","data":{"m":"hi"},"id":"c1"}))
        .await;
    let mut published = None;
    let mut event = None;
    while published.is_none() || event.is_none() {
        let f = c.recv().await;
        match f["type"].as_str().unwrap() {
            "published" => published = Some(f),
            "event" => event = Some(f),
            other => panic!("{other}"),
        }
    }
    let p = published.unwrap();
    assert_eq!(
        (p["stream"].as_str(), p["seq"].as_u64(), p["id"].as_str()),
        (Some("room:chat"), Some(1), Some("c1"))
    );
    assert_eq!(event.unwrap()["data"], json!({"m":"hi"}));
    // The same id again is the same publish.
    c.send(json!({"type":"publish","stream":"room:chat","data":{"m":"hi"},"id":"c1"}))
        .await;
    assert_eq!(c.expect("published").await["seq"], 1);
    c.send(json!({"type":"publish","stream":"room:other","data":1}))
        .await;
    assert_eq!(c.expect("error").await["code"], "FORBIDDEN");
    c.send(json!({"type":"publish","stream":"room:chat"})).await;
    assert_eq!(c.expect("error").await["code"], "INVALID_REQUEST");
    assert_eq!(s.api().info("room:chat").await["headSeq"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_and_session_level_errors() {
    let s = TestServer::with(|c| c.reconnect_window_sec = 2).await;
    let base = s.ws_url();
    // Subprotocols: none offered gets the current one; only unknown ones are refused.
    let tok = s.token("u1", &["room:*"]);
    let mut c = WsClient::connect_with(&format!("{base}/v1/ws?token={tok}"), &[])
        .await
        .unwrap();
    assert_eq!(c.expect("welcome").await["protocol"], "zerodrop.v3");
    let c2 = WsClient::connect_with(
        &format!("{base}/v1/ws?token={tok}"),
        &["zerodrop.v0", "zerodrop.v1"],
    )
    .await
    .unwrap();
    assert_eq!(c2.protocol.as_deref(), Some("zerodrop.v1"));
    // Several offered: the server picks the newest, whatever the client's order.
    for (offered, chosen) in [
        (&["zerodrop.v1", "zerodrop.v2"][..], "zerodrop.v2"),
        (
            &["zerodrop.v1", "zerodrop.v3", "zerodrop.v2"][..],
            "zerodrop.v3",
        ),
    ] {
        let mut c3 = WsClient::connect_with(&format!("{base}/v1/ws?token={tok}"), offered)
            .await
            .unwrap();
        assert_eq!(c3.protocol.as_deref(), Some(chosen));
        assert_eq!(c3.expect("welcome").await["protocol"], chosen);
        c3.close().await;
    }
    let r = WsClient::connect_with(&format!("{base}/v1/ws?token={tok}"), &["zerodrop.v9"])
        .await
        .err()
        .unwrap();
    assert_eq!(
        (r.status, r.json()["error"]["code"].as_str()),
        (400, Some("INVALID_REQUEST"))
    );
    // A bad connect token is refused before the upgrade.
    let r = WsClient::connect(&format!("{base}/v1/ws?token=garbage"))
        .await
        .err()
        .unwrap();
    assert_eq!(
        (r.status, r.json()["error"]["code"].as_str()),
        (401, Some("UNAUTHORIZED"))
    );
    // A plain GET is not an upgrade.
    let r = s.api().get("/v1/ws", None).await;
    assert_eq!((r.status, r.code()), (400, "INVALID_REQUEST"));
    // Session-level resume errors: error frame, then the close code.
    let tok_welcome = {
        let (c3, w) = connect(&s, &["room:*"]).await;
        c3.abort();
        w
    };
    let valid = tok_welcome["resumeToken"].as_str().unwrap().to_string();
    let ghost = s
        .app()
        .mint_token(
            &zerodrop_core::SessionId::generate(),
            "u1",
            zerodrop_server::app::Authority {
                exp: None,
                born_ms: zerodrop_core::now_ms(),
            },
        )
        .unwrap();
    for (first, code, close) in [
        (
            json!({"type":"resume","resumeToken":"v1.k1.bad.sig"}),
            "INVALID_RESUME_TOKEN",
            4401,
        ),
        (
            json!({"type":"resume","resumeToken": ghost}),
            "SESSION_NOT_FOUND",
            4404,
        ),
        (
            json!({"type":"subscribe","stream":"room:1"}),
            "UNAUTHORIZED",
            4401,
        ),
    ] {
        let mut c = WsClient::connect(&format!("{base}/v1/ws")).await.unwrap();
        c.send(first).await;
        let e = c.expect("error").await;
        assert_eq!(e["code"], code);
        assert_eq!(c.expect_close().await, Some(close), "{code}");
    }
    let mut c = WsClient::connect(&format!("{base}/v1/ws?resume=nonsense"))
        .await
        .unwrap();
    assert_eq!(c.expect("error").await["code"], "INVALID_RESUME_TOKEN");
    assert_eq!(c.expect_close().await, Some(4401));
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let mut c = WsClient::connect(&format!("{base}/v1/ws?resume={valid}"))
        .await
        .unwrap();
    assert_eq!(c.expect("error").await["code"], "RECONNECT_WINDOW_EXPIRED");
    assert_eq!(c.expect_close().await, Some(4410));
    let m = s.api().metrics_json().await;
    assert_eq!(m["ws_metrics"]["resume_failures"], 4);
    let prom = s.api().get("/metrics", None).await.text;
    assert!(
        prom.contains(
            "zerodrop_resume_failures_total{transport=\"ws\",code=\"INVALID_RESUME_TOKEN\"} 2"
        ),
        "{prom}"
    );
    c2.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limit_and_takeover() {
    let s = TestServer::with(|c| c.max_connections = 2).await;
    let (mut a, welcome) = connect(&s, &["room:*"]).await;
    let (_b, _) = connect(&s, &["room:*"]).await;
    let tok = s.token("u1", &["room:*"]);
    let r = WsClient::connect(&format!("{}/v1/ws?token={tok}", s.ws_url()))
        .await
        .err()
        .unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["error"]["code"], "OVER_CAPACITY");
    let sse = zerodrop_testkit::sse::SseClient::connect(
        &format!("{}/v1/streams/room:1/sse?token={tok}", s.url),
        &[],
    )
    .await
    .err()
    .unwrap();
    assert_eq!(
        (sse.status, sse.json["error"]["code"].as_str()),
        (503, Some("OVER_CAPACITY")),
        "SSE counts too"
    );
    // Both refusals say when to come back.
    let http = reqwest::Client::new();
    let ws_upgrade = http
        .get(format!("{}/v1/ws?token={tok}", s.url))
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==");
    let sse_get = http.get(format!("{}/v1/streams/room:1/sse?token={tok}", s.url));
    for req in [ws_upgrade, sse_get] {
        let r = req.send().await.unwrap();
        assert_eq!(r.status().as_u16(), 503);
        let retry = r
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        assert!(retry.is_some_and(|s| s >= 1), "Retry-After: {retry:?}");
    }
    // A resume of a session held by a live socket takes it over: the old socket is closed.
    let token = welcome["resumeToken"].as_str().unwrap().to_string();
    drop(_b);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut c = WsClient::connect(&format!("{}/v1/ws?resume={token}", s.ws_url()))
        .await
        .unwrap();
    c.expect("welcome").await;
    assert_eq!(a.expect("error").await["code"], "SESSION_TAKEN_OVER");
    assert_eq!(a.expect_close().await, Some(4409));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pings_measure_rtt_and_silent_clients_are_closed() {
    let s = TestServer::with(|c| c.ping_interval_sec = 1).await;
    let (mut c, _) = connect(&s, &["room:*"]).await;
    // recv() answers pings: the connection stays up across several intervals.
    c.send(json!({"type":"subscribe","stream":"room:1"})).await;
    c.expect("subscribed").await;
    let until = tokio::time::Instant::now() + Duration::from_millis(3500);
    while tokio::time::Instant::now() < until {
        match c.next_within(Duration::from_millis(200)).await {
            Next::Frame(f) if f["type"] == "ping" => {
                c.send(json!({"type":"pong","t":f["t"]})).await
            }
            Next::Closed(code) => panic!("closed: {code:?}"),
            _ => {}
        }
    }
    let m = s.api().metrics_json().await;
    assert!(m["ws_metrics"]["rtt_p95_ms"].as_f64().unwrap() > 0.0);
    // A client that never answers is closed with 4408 after two missed pings.
    let (mut quiet, _) = connect(&s, &["room:*"]).await;
    let mut pings = 0;
    let code = loop {
        match quiet.next_within(Duration::from_secs(5)).await {
            Next::Frame(f) if f["type"] == "ping" => pings += 1,
            Next::Frame(_) => {}
            Next::Closed(code) => break code,
            Next::Timeout => panic!("never closed"),
        }
    };
    assert_eq!(code, Some(4408));
    assert!(pings >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_and_pongs_are_never_rate_limited_other_frames_are() {
    let s = TestServer::start().await; // 100 frames/s, burst 200
    let api = s.api();
    for i in 1..=300 {
        api.publish("room:1", json!(i)).await;
    }
    let (mut c, welcome) = connect(&s, &["room:*"]).await;
    let sid = welcome["sessionId"].as_str().unwrap().to_string();
    let token = welcome["resumeToken"].as_str().unwrap().to_string();
    c.send(json!({"type":"subscribe","stream":"room:1","after":0}))
        .await;
    c.expect("subscribed").await;
    let evs = c.events(300).await;
    // A page that acks every event of the replay, and answers pings, in one burst.
    for e in &evs {
        c.send(json!({"type":"ack","stream":"room:1","seq":seq(e)}))
            .await;
    }
    for _ in 0..50 {
        c.send(json!({"type":"pong","t":1})).await;
    }
    // A ping as a fence: everything before it was handled, and none of it was an error.
    c.send(json!({"type":"ping","t":"fence"})).await;
    loop {
        let f = c.recv().await;
        assert_ne!(f["type"], "error", "{f}");
        if f["type"] == "pong" {
            assert_eq!(f["t"], "fence");
            break;
        }
    }
    // Floods of anything else still are limited: subscribes and garbage alike.
    for i in 0..500 {
        if i % 2 == 0 {
            c.send_raw("not json".into()).await;
        } else {
            c.send(json!({"type":"subscribe","stream":"room:2"})).await;
        }
    }
    let mut limited = false;
    for _ in 0..600 {
        match c.next_within(Duration::from_secs(5)).await {
            Next::Frame(f) if f["code"] == "RATE_LIMITED" => {
                assert_eq!(f["retryAfterMs"], 1000);
                limited = true;
                break;
            }
            Next::Frame(_) => {}
            other => panic!("socket ended: {other:?}"),
        }
    }
    assert!(limited, "a flood of non-control frames is rate limited");
    let m = api.get("/metrics", None).await.text;
    let n = m
        .lines()
        .find_map(|l| l.strip_prefix("zerodrop_rate_limited_total{transport=\"ws\"} "))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(n > 0, "dropped frames are counted: {n}");
    c.close().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The last ack of the burst was applied: 300 is stored, a lower one is ignored.
    assert_eq!(
        checkpoint(&api, &sid, &token, 299).await,
        json!({"ackUpdate":"ignored","lastAckSequence":300})
    );
}

/// Events of this size, this many: far more than a small client window and the server's
/// send buffer (at most 4 MiB here) hold together, so a client that stops reading stalls the
/// server's writes.
const BIG_EVENTS: u64 = 320;
const BIG_PAD: usize = 16 * 1024;

/// A client that stops reading (a small receive window, then a flood of large events) holds
/// its socket no longer than the write-stall bound (two ping intervals) and a bounded close:
/// the gauge and the connection slot come back while it still reads nothing. When it reads
/// again it finds the events that were already in flight, then the end of the connection (the
/// 4408 close frame cannot get past the full buffers, so it is a bare end here; 4408 when it
/// could be written), and its session resumes from what it read with nothing missing, nothing
/// repeated and nothing counted as dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_let_go_and_resumes_without_a_gap() {
    let s = TestServer::with(|c| {
        // Stall bound 4 s. Long enough for the flood to fill the buffers (the memory store
        // publishes quickly) before two missed pings could close the socket the old way.
        c.ping_interval_sec = 2;
        c.store = StoreChoice::Memory;
        // The resume below needs the slot the stalled socket held.
        c.max_connections = 1;
    })
    .await;
    let api = s.api();
    let tok = s.token("u1", &["room:*"]);
    let tcp = zerodrop_testkit::small_window_tcp(s.addr).await;
    let mut c = WsClient::connect_over(&format!("{}/v1/ws?token={tok}", s.ws_url()), tcp)
        .await
        .unwrap();
    let welcome = c.expect("welcome").await;
    let token = welcome["resumeToken"].as_str().unwrap().to_string();
    c.send(json!({"type":"subscribe","stream":"room:1","after":0}))
        .await;
    c.expect("subscribed").await;

    // From here on the client reads nothing.
    api.publish_padded("room:1", BIG_EVENTS, BIG_PAD).await;
    assert_eq!(
        api.await_no_connections(Duration::from_secs(20)).await,
        (0, 0, 0),
        "the stalled socket is let go: gauge and slot released"
    );

    // It reads again: what was in flight, in order, then the end.
    let mut read = Vec::new();
    let end = loop {
        assert!(
            read.len() as u64 <= BIG_EVENTS,
            "more events than published"
        );
        match c.next_within(Duration::from_secs(5)).await {
            Next::Frame(f) if f["type"] == "event" => read.push(seq(&f)),
            Next::Frame(f) => assert!(
                ["ping", "token"].contains(&f["type"].as_str().unwrap_or("")),
                "{f}"
            ),
            Next::Closed(code) => break code,
            Next::Timeout => panic!("the connection was left open after {} events", read.len()),
        }
    };
    assert!(
        matches!(end, None | Some(4408)),
        "a bare end or 4408, got {end:?}"
    );
    let k = read.len() as u64;
    assert!(
        k < BIG_EVENTS,
        "the client's buffers never filled: the test proves nothing"
    );
    assert_eq!(read, (1..=k).collect::<Vec<_>>(), "in order, without a gap");

    // The session resumes after what the client read; the slot is free again.
    let mut c = WsClient::connect(&format!("{}/v1/ws", s.ws_url()))
        .await
        .unwrap();
    c.send(json!({"type":"resume","resumeToken":token,"lastAck":{"room:1":k}}))
        .await;
    c.expect("welcome").await;
    let sub = c.expect("subscribed").await;
    assert_eq!(sub["fromSeq"], k + 1);
    let rest: Vec<u64> = c
        .events((BIG_EVENTS - k) as usize)
        .await
        .iter()
        .map(seq)
        .collect();
    assert_eq!(rest, (k + 1..=BIG_EVENTS).collect::<Vec<_>>());
    c.expect_silence(Duration::from_millis(300)).await;
    let m = api.metrics_json().await;
    assert_eq!(m["ws_metrics"]["dropped_messages"], 0, "{m}");
    assert_eq!(m["ws_metrics"]["ws_active"], 1, "{m}");
    c.close().await;
}

/// `zerodrop.v3`: an event whose payload is bytes (a Durable Streams append, a binary
/// publish, or any `{"$base64"}` data) is a binary frame on v3 and the `{"$base64"}` text
/// frame on v2, live and replayed; a binary frame from a v3 client publishes bytes under the
/// publish rules and limits; on v2 a binary frame is refused and stores nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v3_carries_byte_payloads_as_binary_frames_both_ways() {
    let s = TestServer::with(|c| {
        c.max_payload_bytes = 1024;
        c.max_frame_bytes = 4096;
    })
    .await;
    let api = s.api();
    let http = reqwest::Client::new();
    let ds = format!("{}/ds/v1/stream/bin:1", s.url);
    let append = |body: Vec<u8>| {
        http.post(&ds)
            .bearer_auth(&s.creds.api_key)
            .header("content-type", "application/octet-stream")
            .body(body)
            .send()
    };
    let r = http
        .put(&ds)
        .bearer_auth(&s.creds.api_key)
        .header("content-type", "application/octet-stream")
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    assert!(
        append(vec![0, b'\n', 0xff, 7])
            .await
            .unwrap()
            .status()
            .is_success()
    );
    api.publish("bin:1", json!({"n": 1})).await;

    let tok = s.creds.token("u1", &["bin:*"], &["bin:1"]);
    let url = format!("{}/v1/ws?token={tok}", s.ws_url());
    let mut v3 = WsClient::connect_with(&url, &["zerodrop.v3"])
        .await
        .unwrap();
    let mut v2 = WsClient::connect_with(&url, &["zerodrop.v2"])
        .await
        .unwrap();
    let resume = v3.expect("welcome").await["resumeToken"].clone();
    v2.expect("welcome").await;
    for c in [&mut v3, &mut v2] {
        c.send(json!({"type":"subscribe","stream":"bin:1","after":0}))
            .await;
        assert_eq!(c.expect("subscribed").await["headSeq"], 2);
    }
    let header = |seq: u64| json!({"type": "event", "stream": "bin:1", "seq": seq});
    let binary = |f: &Value, seq: u64, b64: &str| {
        let h = &f["$binary"]["header"];
        assert_eq!(
            (&h["type"], &h["stream"], &h["seq"], &f["$binary"]["base64"]),
            (
                &header(seq)["type"],
                &header(seq)["stream"],
                &header(seq)["seq"],
                &json!(b64)
            ),
            "{f}"
        );
        assert!(
            h["epoch"].is_string() && h["ts"].is_u64() && h.get("data").is_none(),
            "{f}"
        );
    };
    // Replayed: a byte payload is binary on v3, the `{"$base64"}` object on v2; JSON is text.
    binary(&v3.recv().await, 1, "AAr/Bw==");
    assert_eq!(v3.recv().await["data"], json!({"n": 1}));
    let f = v2.recv().await;
    assert_eq!(
        (&f["seq"], &f["data"]),
        (&json!(1), &json!({"$base64": "AAr/Bw=="}))
    );
    assert_eq!(v2.recv().await["data"], json!({"n": 1}));

    // A binary publish (v3) is stored as the byte payload and delivered live to both.
    let frame =
        |hdr: Value, bytes: &[u8]| zerodrop_core::frames::binary::frame(&hdr.to_string(), bytes);
    v3.send_binary(frame(
        json!({"type":"publish","stream":"bin:1","id":"b-1"}),
        b"\x00hi\n",
    ))
    .await;
    let mut got = Vec::new();
    while got.len() < 2 {
        got.push(v3.recv().await);
    }
    got.sort_by_key(|f| f["$binary"].is_object());
    assert_eq!(got[0]["type"], "published", "{got:?}");
    assert_eq!((&got[0]["seq"], &got[0]["id"]), (&json!(3), &json!("b-1")));
    binary(&got[1], 3, "AGhpCg==");
    assert_eq!(v2.recv().await["data"], json!({"$base64": "AGhpCg=="}));
    let page = api.read("bin:1", 2, 10).await.json;
    assert_eq!(page["events"][0]["data"], json!({"$base64": "AGhpCg=="}));

    // Refusals store nothing: bytes past the payload limit (base64 grows them by 4/3), a
    // stream the token may not publish to, a header that is no publish, a frame with no LF.
    let refusals = [
        (
            frame(
                json!({"type":"publish","stream":"bin:1","id":"big"}),
                &[1; 800],
            ),
            "PAYLOAD_TOO_LARGE",
        ),
        (
            frame(json!({"type":"publish","stream":"bin:2"}), b"x"),
            "FORBIDDEN",
        ),
        (
            frame(json!({"type":"ack","stream":"bin:1","seq":1}), b"x"),
            "INVALID_REQUEST",
        ),
        (b"no header line".to_vec(), "INVALID_REQUEST"),
    ];
    for (f, code) in refusals {
        v3.send_binary(f).await;
        assert_eq!(v3.expect("error").await["code"], code);
    }
    v2.send_binary(frame(json!({"type":"publish","stream":"bin:1"}), b"x"))
        .await;
    let e = v2.expect("error").await;
    assert_eq!(e["code"], "INVALID_REQUEST");
    assert!(
        e["message"].as_str().unwrap().contains("zerodrop.v3"),
        "{e}"
    );
    assert_eq!(api.info("bin:1").await["headSeq"], 3, "nothing stored");

    // A resumed v3 socket replays from the log as binary frames too.
    v3.abort();
    let token = resume.as_str().unwrap();
    let mut again = WsClient::connect_with(
        &format!("{}/v1/ws?resume={token}", s.ws_url()),
        &["zerodrop.v3"],
    )
    .await
    .unwrap();
    again.expect("welcome").await;
    assert!(append(vec![9; 3]).await.unwrap().status().is_success());
    let mut seqs = Vec::new();
    while seqs.last() != Some(&4) {
        let f = again.recv().await;
        let seq = f["$binary"]["header"]["seq"].as_u64().or(f["seq"].as_u64());
        if let Some(seq) = seq {
            if seq == 4 {
                binary(&f, 4, "CQkJ");
            }
            seqs.push(seq);
        }
    }
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");

    // A binary frame over the frame limit closes with 1009.
    again
        .send_binary(frame(
            json!({"type":"publish","stream":"bin:1"}),
            &[0; 5000],
        ))
        .await;
    assert_eq!(close_after_too_large(&mut again).await, Some(1009));
    assert_eq!(api.info("bin:1").await["headSeq"], 4, "stored data intact");
}

/// The close code that follows a frame over the limit (`None`: no close within 5 s); an
/// `error` on the way must be `PAYLOAD_TOO_LARGE`, events may still arrive before it.
async fn close_after_too_large(c: &mut WsClient) -> Option<u16> {
    loop {
        match c.next_within(Duration::from_secs(5)).await {
            Next::Frame(f) if f["type"] == "error" => assert_eq!(f["code"], "PAYLOAD_TOO_LARGE"),
            Next::Frame(_) => {}
            Next::Closed(code) => return code,
            Next::Timeout => return None,
        }
    }
}

/// A connect's 101 leaves with its `welcome`, in one send: the client's first read after the
/// request holds both (two sends would wake it with the 101 alone). A socket that must speak
/// first (a `resume` frame) gets its 101 at once, as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_101_of_a_connect_leaves_with_its_welcome() {
    let s = TestServer::start().await;
    for round in 0..20 {
        let tok = s.token("u1", &["room:*"]);
        let got = first_read_after_upgrade(&s, &format!("/v1/ws?token={tok}")).await;
        assert!(got.starts_with("HTTP/1.1 101"), "round {round}: {got}");
        assert!(got.contains(r#""type":"welcome""#), "round {round}: {got}");
    }
    // No credentials: the client speaks first, so its 101 is not held back.
    let got = first_read_after_upgrade(&s, "/v1/ws").await;
    assert!(got.starts_with("HTTP/1.1 101"), "{got}");
    assert!(!got.contains("welcome"), "{got}");
}

/// A browser's handshake carries `Origin`, yet CORS does not apply to a WebSocket: its 101
/// carries no `Access-Control-*` header, while a plain request with the same `Origin` does.
#[tokio::test]
async fn a_websocket_handshake_is_answered_without_cors_headers() {
    let s = TestServer::start().await;
    let origin = "Origin: https://app.example\r\n";
    let tok = s.token("u1", &["room:*"]);
    for target in [format!("/v1/ws?token={tok}"), "/v1/ws".to_string()] {
        let got = first_read_with(&s, &target, origin).await;
        assert!(got.starts_with("HTTP/1.1 101"), "{got}");
        assert!(
            !got.to_ascii_lowercase().contains("access-control-"),
            "{got}"
        );
    }
    let res = reqwest::Client::new()
        .get(format!("{}/health", s.url))
        .header("origin", "https://app.example")
        .send()
        .await
        .unwrap();
    assert!(
        res.headers().contains_key("access-control-allow-origin"),
        "{:?}",
        res.headers()
    );
}

/// What one read returns after an upgrade request for `target` on a fresh connection.
async fn first_read_after_upgrade(s: &TestServer, target: &str) -> String {
    first_read_with(s, target, "").await
}

/// [`first_read_after_upgrade`] with `extra` header lines (each ending in CRLF).
async fn first_read_with(s: &TestServer, target: &str, extra: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let request = format!(
        "GET {target} HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n",
        s.addr
    );
    let mut tcp = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 16 * 1024];
    let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf))
        .await
        .expect("an answer")
        .unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}
