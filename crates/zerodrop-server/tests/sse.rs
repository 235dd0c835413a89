//! Server-Sent Events: live delivery, `Last-Event-ID` resume, `?resume=`, and resets.

use std::time::Duration;

use serde_json::json;
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
        json!({"code":"REPLAY_WINDOW_TRIMMED","epoch":epoch,"firstAvailableSeq":16})
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
    assert_eq!(dropped(api.metrics_json().await), while_connected);
}
