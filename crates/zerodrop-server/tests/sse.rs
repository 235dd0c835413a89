//! Server-Sent Events: live delivery, `Last-Event-ID` resume, `?resume=`, and resets.

use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use zerodrop_server::config::StoreChoice;
use zerodrop_testkit::server::TestServer;
use zerodrop_testkit::sse::SseClient;

fn seq_of(id: &Option<String>) -> u64 {
    id.as_deref()
        .unwrap()
        .rsplit_once(':')
        .unwrap()
        .1
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_then_last_event_id_resume() {
    let s = TestServer::start().await;
    let api = s.api();
    api.publish("room:1", json!(1)).await;
    let tok = s.token("u1", &["room:*"]);
    let url = format!("{}/v1/streams/room:1/sse?token={tok}", s.url);
    let mut c = SseClient::connect(&url, &[]).await.unwrap();
    api.publish("room:1", json!(2)).await;
    api.publish("room:1", json!(3)).await;
    let evs = c.events(2).await;
    let epoch = api.info("room:1").await["epoch"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(evs[0].id.as_deref(), Some(format!("{epoch}:2").as_str()));
    assert_eq!(evs[0].json()["data"], 2);
    assert_eq!(evs[0].json()["stream"], "room:1");
    assert_eq!(seq_of(&evs[1].id), 3);
    let last = evs[0].id.clone().unwrap();
    drop(c);
    for i in 4..=6 {
        api.publish("room:1", json!(i)).await;
    }
    // The browser reconnects with the last id it saw.
    let mut c = SseClient::connect(&url, &[("last-event-id", &last)])
        .await
        .unwrap();
    let evs = c.events(4).await;
    assert_eq!(
        evs.iter().map(|e| seq_of(&e.id)).collect::<Vec<_>>(),
        vec![3, 4, 5, 6]
    );
    assert!(
        c.next_within(Duration::from_millis(300)).await.is_none(),
        "no duplicates after"
    );
    // A bare seq is taken as the current epoch; ?after= works as well.
    let mut c = SseClient::connect(&url, &[("last-event-id", "5")])
        .await
        .unwrap();
    assert_eq!(seq_of(&c.next().await.id), 6);
    let mut c = SseClient::connect(&format!("{url}&after=4"), &[])
        .await
        .unwrap();
    assert_eq!(
        c.events(2)
            .await
            .iter()
            .map(|e| seq_of(&e.id))
            .collect::<Vec<_>>(),
        vec![5, 6]
    );
    let m = api.metrics_json().await;
    assert_eq!(m["ws_metrics"]["sse_active"], 3);
    drop(c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resets_instead_of_reconnect_loops() {
    let s = TestServer::with(|c| c.retention.max_events = 5).await;
    let api = s.api();
    for i in 1..=20 {
        api.publish("room:1", json!(i)).await;
    }
    let epoch = api.info("room:1").await["epoch"]
        .as_str()
        .unwrap()
        .to_string();
    let tok = s.token("u1", &["room:*"]);
    let url = format!("{}/v1/streams/room:1/sse?token={tok}", s.url);
    // Trimmed: reset, then on from the oldest retained event.
    let mut c = SseClient::connect(&url, &[("last-event-id", &format!("{epoch}:3"))])
        .await
        .unwrap();
    let reset = c.next().await;
    assert_eq!(reset.event, "reset");
    assert_eq!(reset.id.as_deref(), Some(format!("{epoch}:15").as_str()));
    assert_eq!(
        reset.json(),
        json!({"code":"REPLAY_WINDOW_TRIMMED","epoch":epoch,"firstAvailableSeq":16,"headSeq":20})
    );
    let evs = c.events(5).await;
    assert_eq!(
        evs.iter().map(|e| seq_of(&e.id)).collect::<Vec<_>>(),
        vec![16, 17, 18, 19, 20]
    );
    assert_eq!(
        api.metrics_json().await["ws_metrics"]["dropped_messages"],
        12
    );
    // Another epoch: reset with the current one.
    let mut c = SseClient::connect(&url, &[("last-event-id", "00000000000000aa:18")])
        .await
        .unwrap();
    let reset = c.next().await;
    assert_eq!(reset.event, "reset");
    assert_eq!(reset.json()["code"], "EPOCH_CHANGED");
    assert_eq!(reset.json()["epoch"], epoch.as_str());
    assert_eq!(seq_of(&c.next().await.id), 16);
    // Garbage ids are refused up front.
    let r = SseClient::connect(&url, &[("last-event-id", "x:y:z")])
        .await
        .err()
        .unwrap();
    assert_eq!(
        (r.status, r.json["error"]["code"].as_str()),
        (400, Some("INVALID_REQUEST"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_tokens_and_auth() {
    let s = TestServer::start().await;
    let api = s.api();
    let tok = s.token("u1", &["room:*"]);
    let sess = api
        .post("/v1/sessions", Some(&tok), json!({"streams":["room:1"]}))
        .await
        .json;
    let rt = sess["resumeToken"].as_str().unwrap();
    for i in 1..=3 {
        api.publish("room:1", json!(i)).await;
    }
    // ?resume= starts after the session's ack.
    let mut c = SseClient::connect(&format!("{}/v1/streams/room:1/sse?resume={rt}", s.url), &[])
        .await
        .unwrap();
    assert_eq!(
        c.events(3)
            .await
            .iter()
            .map(|e| seq_of(&e.id))
            .collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    let cases = [
        (
            format!("/v1/streams/room:2/sse?resume={rt}"),
            403,
            "FORBIDDEN",
        ),
        (
            "/v1/streams/room:1/sse?resume=v1.k1.a.b".to_string(),
            401,
            "INVALID_RESUME_TOKEN",
        ),
        ("/v1/streams/room:1/sse".to_string(), 401, "UNAUTHORIZED"),
        (
            "/v1/streams/room:1/sse?token=nope".to_string(),
            401,
            "UNAUTHORIZED",
        ),
        (
            format!("/v1/streams/user:1/sse?token={tok}"),
            403,
            "FORBIDDEN",
        ),
        (
            format!("/v1/streams/bad%20id/sse?token={tok}"),
            400,
            "INVALID_STREAM_ID",
        ),
    ];
    for (path, status, code) in cases {
        let r = SseClient::connect(&format!("{}{path}", s.url), &[])
            .await
            .err()
            .unwrap();
        assert_eq!(
            (r.status, r.json["error"]["code"].as_str()),
            (status, Some(code)),
            "{path}"
        );
    }
    let m = api.metrics_json().await;
    assert!(
        m["resume_store_metrics"]["resume_success_rate"]
            .as_f64()
            .unwrap()
            < 1.0
    );
    let prom = api.get("/metrics", None).await.text;
    assert!(
        prom.contains("zerodrop_resumes_total{transport=\"sse\"} 1"),
        "{prom}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drops_counted_while_connected_are_not_counted_again_on_resume() {
    let s = TestServer::with(|c| c.retention.max_events = 5).await;
    let api = s.api();
    let tok = s.token("u1", &["big"]);
    let sess = api
        .post("/v1/sessions", Some(&tok), json!({"streams":["big"]}))
        .await
        .json;
    let rt = sess["resumeToken"].as_str().unwrap().to_string();
    let url = format!("{}/v1/streams/big/sse?resume={rt}", s.url);
    // A client that stops reading: once the socket buffers are full its cursor stays behind,
    // and the events trimmed under it are counted while it is connected.
    let stalled = SseClient::connect(&url, &[]).await.unwrap();
    // 24 MB in all: far more than the socket buffers between a server and a client that
    // does not read can hold.
    let fat = "x".repeat(60_000);
    for i in 0..400 {
        api.publish("big", json!({"i": i, "pad": fat})).await;
    }
    let dropped = |m: serde_json::Value| m["ws_metrics"]["dropped_messages"].as_u64().unwrap();
    let while_connected = dropped(api.metrics_json().await);
    assert!(
        while_connected > 0,
        "the stalled client should have lost events at trim time"
    );
    drop(stalled);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The stalled cursor may still have been counting the last trims when `while_connected`
    // was read; once the client is gone the count settles.
    let before_resume = dropped(api.metrics_json().await);
    assert!(before_resume >= while_connected);
    // The session comes back: its window is trimmed (typed reset), and the events already
    // counted for it are not counted a second time.
    let mut c = SseClient::connect(&url, &[]).await.unwrap();
    let reset = c.next().await;
    assert_eq!(reset.event, "reset");
    assert_eq!(reset.json()["code"], "REPLAY_WINDOW_TRIMMED");
    assert_eq!(reset.json()["firstAvailableSeq"], 396);
    assert_eq!(
        c.events(5)
            .await
            .iter()
            .map(|e| seq_of(&e.id))
            .collect::<Vec<_>>(),
        vec![396, 397, 398, 399, 400]
    );
    assert_eq!(dropped(api.metrics_json().await), before_resume);
}

/// An SSE client that stops reading (a small receive window, then a flood of large events) is
/// let go once a write has made no progress for the stall bound (two ping intervals): hyper
/// stops pulling the body while its write is pending, so it is the connection's stall guard
/// that ends the response. The gauge and the connection slot come back while the client still
/// reads nothing; when it reads again it finds the events that were in flight and then the end
/// of the connection, and `Last-Event-ID` resumes after them with nothing missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_let_go_and_resumes_without_a_gap() {
    const EVENTS: u64 = 320;
    let s = TestServer::with(|c| {
        c.ping_interval_sec = 2;
        c.store = StoreChoice::Memory;
        c.max_connections = 1;
    })
    .await;
    let api = s.api();
    let tok = s.token("u1", &["room:*"]);
    let mut tcp = zerodrop_testkit::small_window_tcp(s.addr).await;
    let request = format!(
        "GET /v1/streams/room:1/sse?token={tok}&after=0 HTTP/1.1\r\nHost: {}\r\n\
         Accept: text/event-stream\r\n\r\n",
        s.addr
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    while api.metrics_json().await["ws_metrics"]["sse_active"] != 1 {
        assert!(
            tokio::time::Instant::now() < until,
            "the SSE response opens"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // From here on the client reads nothing.
    api.publish_padded("room:1", EVENTS, 16 * 1024).await;
    assert_eq!(
        api.await_no_connections(Duration::from_secs(20)).await,
        (0, 0, 0),
        "the stalled response is ended: gauge and slot released"
    );

    // It reads again: what was in flight, then the end of the connection (bounded).
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let until = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, tcp.read(&mut buf)).await {
            Err(_) => panic!("the connection was left open after {} bytes", got.len()),
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.starts_with("HTTP/1.1 200"),
        "{}",
        &text[..text.len().min(200)]
    );
    let ids: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("id: "))
        .collect();
    // The last block may have been cut anywhere: only the ones before it count as read.
    let read: Vec<u64> = ids[..ids.len().saturating_sub(1)]
        .iter()
        .map(|id| seq_of(&Some(id.to_string())))
        .collect();
    let k = read.len() as u64;
    assert!(
        k < EVENTS,
        "the client's buffers never filled: the test proves nothing"
    );
    assert_eq!(read, (1..=k).collect::<Vec<_>>(), "in order, without a gap");

    // Last-Event-ID resumes after what was read; the slot is free again.
    let epoch = api.info("room:1").await["epoch"]
        .as_str()
        .unwrap()
        .to_string();
    let last = format!("{epoch}:{k}");
    let url = format!("{}/v1/streams/room:1/sse?token={tok}", s.url);
    let mut c = SseClient::connect(&url, &[("last-event-id", &last)])
        .await
        .unwrap();
    let rest: Vec<u64> = c
        .events((EVENTS - k) as usize)
        .await
        .iter()
        .map(|e| seq_of(&e.id))
        .collect();
    assert_eq!(rest, (k + 1..=EVENTS).collect::<Vec<_>>());
    assert!(c.next_within(Duration::from_millis(300)).await.is_none());
    let m = api.metrics_json().await;
    assert_eq!(m["ws_metrics"]["dropped_messages"], 0, "{m}");
    assert_eq!(m["ws_metrics"]["sse_active"], 1, "{m}");
}
