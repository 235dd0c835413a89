//! The drain lifecycle on one instance: the admin API and its token, the refusals while
//! draining (with `Retry-After`), `complete` closing what is still connected, and the
//! Prometheus values that report it — including a drain that finishes by itself.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use zerodrop_server::config::StoreChoice;
use zerodrop_testkit::http::Api;
use zerodrop_testkit::server::TestServer;
use zerodrop_testkit::sse::{SseClient, SseRead};
use zerodrop_testkit::ws::{Next, WsClient};

/// The value of an unlabelled sample in the Prometheus text, if present.
async fn prometheus(api: &Api, name: &str) -> Option<f64> {
    let r = api.get("/metrics", None).await;
    assert_eq!(r.status, 200);
    r.text.lines().find_map(|l| {
        l.strip_prefix(name)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}

/// A subscribed WebSocket client holding a session.
async fn subscriber(s: &TestServer, tok: &str) -> WsClient {
    let mut c = WsClient::connect(&format!("{}/v1/ws?token={tok}", s.ws_url()))
        .await
        .expect("websocket connects");
    c.expect("welcome").await;
    c.send(json!({"type":"subscribe","stream":"room:1","after":0}))
        .await;
    c.expect("subscribed").await;
    c
}

async fn status(api: &Api, admin: &str) -> Value {
    let r = api.get("/admin/drain/status", Some(admin)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.json
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn complete_closes_what_is_still_connected() {
    let s = TestServer::start().await;
    let api = s.api();
    let admin = s.creds.admin_token.clone();
    let tok = s.token("u1", &["room:*"]);
    let mut wss = vec![subscriber(&s, &tok).await, subscriber(&s, &tok).await];
    let mut sse = SseClient::connect(
        &format!("{}/v1/streams/room:1/sse?token={tok}&after=0", s.url),
        &[],
    )
    .await
    .expect("sse opens");
    assert_eq!(prometheus(&api, "zerodrop_drain_state").await, Some(0.0));

    // The admin API wants the admin token, for every drain operation.
    for path in ["/admin/drain/start", "/admin/drain/complete"] {
        let r = api.post(path, None, json!({})).await;
        assert_eq!((r.status, r.code()), (401, "UNAUTHORIZED"), "{path}");
        let r = api.post(path, Some(&s.creds.api_key), json!({})).await;
        assert_eq!((r.status, r.code()), (401, "UNAUTHORIZED"), "{path}");
    }
    assert_eq!(status(&api, &admin).await["state"], "active");

    // A long drain: nobody is due to move for a minute.
    let before = zerodrop_core::now_ms();
    let r = api
        .post(
            "/admin/drain/start",
            Some(&admin),
            json!({"reason":"rolling_deployment","max_session_age_seconds":60}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let st = status(&api, &admin).await;
    assert_eq!(
        (
            st["state"].as_str(),
            st["reason"].as_str(),
            st["sessionsRemaining"].as_u64()
        ),
        (Some("draining"), Some("rolling_deployment"), Some(3))
    );
    let started = st["startedAt"].as_u64().expect("startedAt");
    assert!(
        (before..=zerodrop_core::now_ms()).contains(&started),
        "{st}"
    );
    assert_eq!(st["deadline"].as_u64(), Some(started + 60_000), "{st}");
    assert_eq!(prometheus(&api, "zerodrop_drain_state").await, Some(1.0));

    // New upgrades are refused with DRAINING and Retry-After, and counted.
    let refused = WsClient::connect(&format!("{}/v1/ws?token={tok}", s.ws_url()))
        .await
        .err()
        .expect("no new WebSocket while draining");
    assert_eq!(
        (refused.status, refused.json()["error"]["code"].as_str()),
        (503, Some("DRAINING"))
    );
    let after: u64 = refused
        .retry_after
        .as_deref()
        .expect("Retry-After on the WebSocket refusal")
        .parse()
        .expect("Retry-After in seconds");
    assert!(after >= 1);
    let r = api
        .get(&format!("/v1/streams/room:1/sse?token={tok}"), None)
        .await;
    assert_eq!((r.status, r.code()), (503, "DRAINING"));
    assert!(r.headers.contains_key("retry-after"));
    // A resume is refused before it is tried: no store work, no resume failure.
    let r = api
        .get("/v1/streams/room:1/sse?resume=not-a-resume-token", None)
        .await;
    assert_eq!((r.status, r.code()), (503, "DRAINING"));
    assert_eq!(
        api.metrics_json().await["errors"]["INVALID_RESUME_TOKEN"],
        0
    );
    assert_eq!(
        prometheus(&api, "zerodrop_upgrades_blocked_during_drain_total").await,
        Some(3.0)
    );
    // The connected clients are still there.
    for c in &mut wss {
        c.expect_silence(Duration::from_millis(200)).await;
    }
    assert_eq!(status(&api, &admin).await["sessionsRemaining"], 3);

    // `complete` while they are connected: every one is told and closed now.
    let r = api
        .post("/admin/drain/complete", Some(&admin), json!({}))
        .await;
    assert_eq!(
        (r.status, r.json["state"].as_str()),
        (200, Some("drained")),
        "{}",
        r.text
    );
    for c in &mut wss {
        let f = c.expect("reconnect").await;
        assert_eq!(f["reason"], "draining");
        assert!(f["resumeToken"].as_str().is_some_and(|t| !t.is_empty()));
        assert_eq!(c.expect_close().await, Some(1012));
    }
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        match sse.read(Duration::from_millis(500)).await {
            SseRead::Ended => break,
            SseRead::Event(_) | SseRead::Timeout => {
                assert!(Instant::now() < until, "the SSE response ends");
            }
            SseRead::Broken => panic!("the SSE response was cut, not ended"),
        }
    }
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let st = status(&api, &admin).await;
        assert_eq!(st["state"], "drained");
        if st["sessionsRemaining"] == 0 {
            assert_eq!(st["upgradesBlocked"], 3);
            break;
        }
        assert!(Instant::now() < until, "connections close: {st}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(prometheus(&api, "zerodrop_drain_state").await, Some(2.0));
    assert_eq!(
        prometheus(&api, "zerodrop_upgrades_blocked_during_drain_total").await,
        Some(3.0)
    );
    assert_eq!(prometheus(&api, "zerodrop_ws_active").await, Some(0.0));
}

/// The last connection leaving turns a drain `drained`; the gauge follows without anyone
/// asking for the status (which is the only place it used to be refreshed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gauge_follows_a_drain_that_finishes_by_itself() {
    let s = TestServer::start().await;
    let api = s.api();
    let admin = s.creds.admin_token.clone();
    let tok = s.token("u1", &["room:*"]);
    let mut c = subscriber(&s, &tok).await;
    let r = api
        .post(
            "/admin/drain/start",
            Some(&admin),
            json!({"reason":"scale_down","max_session_age_seconds":1}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(prometheus(&api, "zerodrop_drain_state").await, Some(1.0));
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        match c.next_within(Duration::from_millis(500)).await {
            Next::Frame(f) if f["type"] == "reconnect" => {}
            Next::Frame(_) | Next::Timeout => {}
            Next::Closed(code) => {
                assert_eq!(code, Some(1012));
                break;
            }
        }
        assert!(Instant::now() < until, "the client is told to move in time");
    }
    let until = Instant::now() + Duration::from_secs(5);
    while prometheus(&api, "zerodrop_drain_state").await != Some(2.0) {
        assert!(
            Instant::now() < until,
            "zerodrop_drain_state turns 2 once no connection remains"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status(&api, &admin).await["state"], "drained");
}

/// A client that stops reading cannot keep a drain from finishing: its pending write is given
/// up after the stall bound (two ping intervals), the socket closed or dropped, and the drain
/// turns `drained` by itself, although that client was never handed its `reconnect` frame.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_does_not_hold_a_drain() {
    let s = TestServer::with(|c| {
        c.ping_interval_sec = 2;
        c.store = StoreChoice::Memory;
    })
    .await;
    let api = s.api();
    let admin = s.creds.admin_token.clone();
    let tok = s.token("u1", &["room:*"]);
    let tcp = zerodrop_testkit::small_window_tcp(s.addr).await;
    let mut c = WsClient::connect_over(&format!("{}/v1/ws?token={tok}", s.ws_url()), tcp)
        .await
        .expect("websocket connects");
    c.expect("welcome").await;
    c.send(json!({"type":"subscribe","stream":"room:1","after":0}))
        .await;
    c.expect("subscribed").await;
    // The client reads nothing from here on; the flood fills both kernel buffers.
    api.publish_padded("room:1", 320, 16 * 1024).await;
    let r = api
        .post(
            "/admin/drain/start",
            Some(&admin),
            json!({"reason":"rolling_deployment","max_session_age_seconds":1}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    // Stall bound (4 s) + bounded close (4 s) + slack; the client still reads nothing.
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let st = status(&api, &admin).await;
        if st["state"] == "drained" {
            assert_eq!(st["sessionsRemaining"], 0, "{st}");
            break;
        }
        assert!(
            Instant::now() < until,
            "the drain is held by a stalled client: {st}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(prometheus(&api, "zerodrop_ws_active").await, Some(0.0));
    c.abort();
}
