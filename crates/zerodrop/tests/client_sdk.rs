//! `zerodrop-client` against the real server: every call the SDK offers, and the typed
//! errors a client branches on.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use support::{Server, next_event};
use zerodrop_client::{
    Deduper, Delivery, HttpClient, ServerFrame, SseAuth, SseConnection, SseMessage, SseOptions,
    WsAuth, WsConnection, mint_connect_token,
};

const T: Duration = Duration::from_secs(5);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_speaks_every_part_of_the_protocol() {
    let s = Server::start().await;
    let url = s.url();
    let http = HttpClient::new(&url, Some(s.secrets.api_key.clone())).unwrap();
    let stream = "sdk:1".to_string();
    let token = mint_connect_token(
        &s.secrets.jwt_secret,
        "sdk-user",
        &["sdk:*".into()],
        Some(&["sdk:*".into()]),
        Duration::from_secs(300),
    )
    .unwrap();

    // WebSocket: welcome, subscribe, publish frame (publish claim), event, ack.
    let mut ws = WsConnection::connect(&url, WsAuth::Token(token.clone()), T)
        .await
        .unwrap();
    assert_eq!(ws.welcome().protocol, "zerodrop.v1");
    ws.subscribe(&stream, Some(0), None).await.unwrap();
    let (epoch, head, _) = ws.await_subscribed(&stream, |_| {}).await.unwrap();
    assert_eq!(head, 0);
    ws.publish(&stream, serde_json::json!({"n": 1}), Some("m1".into()))
        .await
        .unwrap();
    let mut published = None;
    let mut events = Vec::new();
    while published.is_none() || events.is_empty() {
        match tokio::time::timeout(T, ws.recv()).await.unwrap().unwrap() {
            ServerFrame::Published(p) => published = p.seq,
            ServerFrame::Event(e) => events.push(e),
            _ => {}
        }
    }
    assert_eq!(published, Some(1));
    assert_eq!(events[0].seq, 1);
    let mut dedupe = Deduper::new();
    assert_eq!(dedupe.offer(&stream, &events[0].epoch, 1), Delivery::Fresh);
    ws.ack(&stream, 1).await.unwrap();

    // HTTP publish with an idempotency key, read back with the connect token.
    let p = http
        .publish(&stream, r#"{"n":2}"#, Some("k2"))
        .await
        .unwrap();
    assert_eq!((p.seq, p.duplicate), (2, false));
    assert!(
        http.publish(&stream, r#"{"n":2}"#, Some("k2"))
            .await
            .unwrap()
            .duplicate
    );
    let reused = http
        .publish(&stream, r#"{"n":3}"#, Some("k2"))
        .await
        .unwrap_err();
    assert_eq!(reused.code(), Some("IDEMPOTENCY_KEY_REUSED"));
    let page = http
        .read_events(&stream, 0, 10, Some(&token))
        .await
        .unwrap();
    assert_eq!(
        page.events.iter().map(|e| e.seq).collect::<Vec<_>>(),
        [1, 2]
    );
    assert_eq!(http.stream_info(&stream).await.unwrap().head_seq, 2);
    assert_eq!(next_event(&mut ws).await.seq, 2);

    // Drop, publish, resume with lastAck: exactly the missed events, deduped.
    let session = ws.session_id().to_string();
    let resume_token = ws.abort();
    http.publish(&stream, r#"{"n":3}"#, None).await.unwrap();
    let last_ack: BTreeMap<String, u64> = [(stream.clone(), 2)].into_iter().collect();
    let mut ws = WsConnection::connect(
        &url,
        WsAuth::Resume {
            resume_token: resume_token.clone(),
            last_ack,
            token: None,
            presence: Default::default(),
        },
        T,
    )
    .await
    .unwrap();
    assert_eq!(ws.session_id(), session);
    let e = next_event(&mut ws).await;
    assert_eq!(e.seq, 3);
    assert_eq!(dedupe.offer(&stream, &e.epoch, 2), Delivery::Fresh);
    assert_eq!(dedupe.offer(&stream, &e.epoch, 3), Delivery::Fresh);
    assert_eq!(dedupe.offer(&stream, &e.epoch, 3), Delivery::Duplicate);

    // HTTP checkpoint and reconnect with the session's token.
    let fresh_token = ws.resume_token().to_string();
    let c = http
        .checkpoint(&session, &fresh_token, &stream, 3)
        .await
        .unwrap();
    assert_eq!((c.ack_update.as_str(), c.last_ack_sequence), ("applied", 3));
    let beyond = http
        .checkpoint(&session, &fresh_token, &stream, 99)
        .await
        .unwrap_err();
    assert_eq!(beyond.code(), Some("ACK_BEYOND_HEAD"));
    let r = http.reconnect(&session, &fresh_token, None).await.unwrap();
    assert!(r.replay[&stream].events.is_empty());

    // SSE with Last-Event-ID, and with the session's resume token.
    let mut sse = SseConnection::connect(
        &http,
        &stream,
        &SseAuth::Token(token.clone()),
        &SseOptions {
            last_event_id: Some(format!("{epoch}:1")),
            after: None,
        },
    )
    .await
    .unwrap();
    let mut got = Vec::new();
    while got.len() < 2 {
        if let SseMessage::Event { event, .. } =
            tokio::time::timeout(T, sse.next()).await.unwrap().unwrap()
        {
            got.push(event.seq);
        }
    }
    assert_eq!(got, [2, 3]);
    assert_eq!(sse.last_event_id(), Some(format!("{epoch}:3").as_str()));
    let opened = http
        .open_session(&token, std::slice::from_ref(&stream))
        .await
        .unwrap();
    assert_eq!(opened.streams[&stream].head_seq, 3);
    let sse = SseConnection::connect(
        &http,
        &stream,
        &SseAuth::Resume(opened.resume_token.clone()),
        &SseOptions::default(),
    )
    .await;
    assert!(sse.is_ok(), "{:?}", sse.err());

    // Typed failures.
    let bad = WsConnection::connect(
        &url,
        WsAuth::Resume {
            resume_token: "v1.k1.bogus.sig".into(),
            last_ack: BTreeMap::new(),
            token: None,
            presence: Default::default(),
        },
        T,
    )
    .await
    .err()
    .unwrap();
    assert_eq!(bad.code(), Some("INVALID_RESUME_TOKEN"), "{bad}");
    let forbidden = SseConnection::connect(
        &http,
        "other:1",
        &SseAuth::Token(token.clone()),
        &SseOptions::default(),
    )
    .await
    .err()
    .unwrap();
    assert_eq!(
        (forbidden.status(), forbidden.code()),
        (Some(403), Some("FORBIDDEN"))
    );
    let unauth = HttpClient::new(&url, Some("wrong".into()))
        .unwrap()
        .publish(&stream, "1", None)
        .await
        .unwrap_err();
    assert_eq!(unauth.status(), Some(401));
    let refused = HttpClient::new("http://127.0.0.1:1", Some("k".into()))
        .unwrap()
        .publish(&stream, "1", None)
        .await
        .unwrap_err();
    assert!(refused.is_network(), "{refused}");
    ws.close().await;
}
