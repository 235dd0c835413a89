//! Presence (SPEC §10) end to end, on a real SQLite file and on two instances sharing a real
//! `redis-server`: exact join/leave sequences, the leave grace, reconnects, resumes elsewhere
//! and drain hand-offs that emit nothing, the snapshot/subscribe-after seam, `event: presence`
//! on SSE, pages with `nextCursor`, the member cap, typed refusals, metrics and the admin
//! snapshot. Grace and heartbeat are short (1 s, 2 s); every wait is bounded.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use zerodrop_server::Config;
use zerodrop_server::config::{PresenceConfig, StoreChoice};
use zerodrop_testkit::redis::RedisServer;
use zerodrop_testkit::server::TestServer;
use zerodrop_testkit::sse::SseClient;
use zerodrop_testkit::ws::WsClient;

/// How long a test waits for a leave that is due after the grace (and a sweep).
const LEAVE_WITHIN: Duration = Duration::from_secs(8);
/// Longer than the grace plus a sweep and a beat: nothing may arrive meanwhile.
const QUIET: Duration = Duration::from_millis(2_500);

fn presence(c: &mut Config) {
    c.presence = PresenceConfig {
        patterns: vec!["room:*".into()],
        leave_grace_sec: 1,
        heartbeat_sec: 2,
        max_members: 10_000,
    };
}

fn on_redis(c: &mut Config, redis: &RedisServer) {
    presence(c);
    c.store = StoreChoice::Redis;
    c.redis_url = redis.url();
}

/// A socket of `token` past `welcome`; and the welcome.
async fn connect(s_ws: &str, token: &str) -> (WsClient, Value) {
    let mut c = WsClient::connect(&format!("{s_ws}/v1/ws?token={token}"))
        .await
        .expect("ws connects");
    let w = c.expect("welcome").await;
    (c, w)
}

/// Subscribes `stream` with presence frames (optionally after a presence seq).
async fn watch(c: &mut WsClient, stream: &str, after: Option<u64>) -> Value {
    let mut f = json!({"type":"subscribe","stream":stream,"presence":true});
    if let Some(a) = after {
        f["presenceAfter"] = json!(a);
    }
    c.send(f).await;
    c.expect("subscribed").await
}

async fn join(c: &mut WsClient, stream: &str) -> Value {
    c.send(json!({"type":"subscribe","stream":stream})).await;
    c.expect("subscribed").await
}

async fn presence_frame(c: &mut WsClient) -> Value {
    let f = c.next_frame(LEAVE_WITHIN).await;
    assert_eq!(f["type"], "presence", "expected a presence frame, got {f}");
    f
}

fn sid(welcome: &Value) -> String {
    welcome["sessionId"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_and_leaves_in_exact_order_with_the_grace_on_sqlite() {
    let s = TestServer::with(presence).await;
    assert!(
        s.sqlite().is_some(),
        "the default store: a real SQLite file"
    );
    let api = s.api();
    let (mut w, _) = connect(&s.ws_url(), &s.token("watcher", &["room:*"])).await;
    let sub = watch(&mut w, "room:1", None).await;
    // The watcher's own join is seq 1: its frames follow from there.
    assert_eq!(sub["presenceSeq"], 1, "{sub}");
    let epoch = sub["presenceEpoch"].as_str().unwrap().to_string();

    let ann = s
        .creds
        .token_with_info("ann", &["room:*"], json!({"name":"Ann","avatar":"a.png"}));
    let (mut a, wa) = connect(&s.ws_url(), &ann).await;
    join(&mut a, "room:1").await;
    let j = presence_frame(&mut w).await;
    assert_eq!(
        (&j["seq"], &j["action"], &j["epoch"]),
        (&json!(2), &json!("join"), &json!(epoch))
    );
    assert_eq!(j["member"]["sub"], "ann");
    assert_eq!(j["member"]["sessionId"], sid(&wa).as_str());
    assert_eq!(j["member"]["info"], json!({"name":"Ann","avatar":"a.png"}));
    assert!(j["member"]["since"].as_u64().unwrap() > 0);

    // The snapshot: both members, at seq 2.
    let r = api
        .get("/v1/streams/room:1/presence", Some(&s.creds.api_key))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        (&r.json["presenceSeq"], &r.json["occupancy"]),
        (&json!(2), &json!(2))
    );
    assert_eq!(r.json["epoch"], epoch.as_str());
    let subs: Vec<&str> = r.json["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["sub"].as_str().unwrap())
        .collect();
    assert!(
        subs.contains(&"ann") && subs.contains(&"watcher"),
        "{subs:?}"
    );
    assert_eq!(r.json["nextCursor"], Value::Null);

    // Ann's socket breaks: nothing within the grace, then one leave.
    a.abort();
    let l = presence_frame(&mut w).await;
    assert_eq!(
        (&l["seq"], &l["action"], &l["member"]["sub"]),
        (&json!(3), &json!("leave"), &json!("ann"))
    );
    w.expect_silence(QUIET).await;

    // An unsubscribe leaves at once.
    let (mut b, _) = connect(&s.ws_url(), &s.token("bob", &["room:*"])).await;
    join(&mut b, "room:1").await;
    assert_eq!(presence_frame(&mut w).await["seq"], 4);
    b.send(json!({"type":"unsubscribe","stream":"room:1"}))
        .await;
    b.expect("unsubscribed").await;
    let l = presence_frame(&mut w).await;
    assert_eq!(
        (&l["seq"], &l["action"], &l["member"]["sub"]),
        (&json!(5), &json!("leave"), &json!("bob"))
    );

    let prom = reqwest::get(format!("{}/metrics", s.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "zerodrop_presence_joins_total 3",
        "zerodrop_presence_leaves_total 2",
    ] {
        assert!(
            prom.contains(name),
            "{name} in:\n{}",
            prom.lines()
                .filter(|l| l.contains("presence"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    let snap = api.get("/admin/snapshot", Some(&s.creds.admin_token)).await;
    assert_eq!(snap.json["presence"]["enabled"], true, "{}", snap.text);
    let per_minute = snap.json["presence"]["perMinute"].as_array().unwrap();
    let joins: u64 = per_minute
        .iter()
        .map(|m| m["joins"].as_u64().unwrap())
        .sum();
    let leaves: u64 = per_minute
        .iter()
        .map(|m| m["leaves"].as_u64().unwrap())
        .sum();
    assert_eq!((joins, leaves), (3, 2));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_a_resume_and_a_takeover_emit_nothing() {
    let s = TestServer::with(presence).await;
    let (mut w, _) = connect(&s.ws_url(), &s.token("watcher", &["room:*"])).await;
    watch(&mut w, "room:1", None).await;
    let (mut a, wa) = connect(&s.ws_url(), &s.token("ann", &["room:*"])).await;
    join(&mut a, "room:1").await;
    assert_eq!(presence_frame(&mut w).await["action"], "join");
    let token = wa["resumeToken"].as_str().unwrap().to_string();

    // The socket drops; the client resumes within the grace.
    a.abort();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut a2 = WsClient::connect(&format!("{}/v1/ws?resume={token}", s.ws_url()))
        .await
        .unwrap();
    a2.expect("welcome").await;
    a2.expect("subscribed").await;
    // A second resume while the first socket is open takes it over: still nothing.
    let mut a3 = WsClient::connect(&format!("{}/v1/ws?resume={token}", s.ws_url()))
        .await
        .unwrap();
    a3.expect("welcome").await;
    a3.expect("subscribed").await;
    assert_eq!(a2.expect_close().await, Some(4409));
    w.expect_silence(QUIET).await;
    let r = s
        .api()
        .get("/v1/streams/room:1/presence", Some(&s.creds.api_key))
        .await;
    assert_eq!(
        (&r.json["occupancy"], &r.json["presenceSeq"]),
        (&json!(2), &json!(2)),
        "{}",
        r.text
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_then_a_subscription_after_its_seq_has_no_hole_and_no_duplicate() {
    let s = TestServer::with(presence).await;
    let api = s.api();
    let mut sockets = Vec::new();
    for n in 0..3 {
        let (mut c, _) = connect(&s.ws_url(), &s.token(&format!("u{n}"), &["room:*"])).await;
        join(&mut c, "room:s").await;
        sockets.push(c);
    }
    let snap = api
        .get("/v1/streams/room:s/presence", Some(&s.creds.api_key))
        .await;
    let at = snap.json["presenceSeq"].as_u64().unwrap();
    let mut view: std::collections::BTreeSet<String> = snap.json["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["sessionId"].as_str().unwrap().to_string())
        .collect();
    // Changes after the snapshot and before the subscription, then after it.
    sockets
        .pop()
        .unwrap()
        .send(json!({"type":"unsubscribe","stream":"room:s"}))
        .await;
    let (mut late, _) = connect(&s.ws_url(), &s.token("late", &["room:*"])).await;
    join(&mut late, "room:s").await;
    // The watcher (sub `w`, no grant to be a member elsewhere) reads with a connect token.
    let (mut w, _) = connect(&s.ws_url(), &s.token("w", &["room:s"])).await;
    let sub = watch(&mut w, "room:s", Some(at)).await;
    assert_eq!(sub["presenceSeq"], at, "{sub}");
    sockets
        .pop()
        .unwrap()
        .send(json!({"type":"unsubscribe","stream":"room:s"}))
        .await;
    // Expected: the leave of u2, the join of late, the watcher's own join, the leave of u1.
    let mut seqs = Vec::new();
    for _ in 0..4 {
        let f = presence_frame(&mut w).await;
        seqs.push(f["seq"].as_u64().unwrap());
        let id = f["member"]["sessionId"].as_str().unwrap().to_string();
        match f["action"].as_str().unwrap() {
            "join" => assert!(view.insert(id), "a duplicate join: {f}"),
            _ => assert!(view.remove(&id), "a leave of a non-member: {f}"),
        }
    }
    assert_eq!(seqs, (at + 1..=at + 4).collect::<Vec<_>>());
    w.expect_silence(Duration::from_millis(500)).await;
    let end = api
        .get("/v1/streams/room:s/presence", Some(&s.creds.api_key))
        .await;
    let now: std::collections::BTreeSet<String> = end.json["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["sessionId"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(view, now);
    assert_eq!(end.json["presenceSeq"], at + 4);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_carries_presence_events_without_moving_last_event_id() {
    let s = TestServer::with(presence).await;
    let t = s.token("viewer", &["room:*"]);
    let mut sse = SseClient::connect(
        &format!("{}/v1/streams/room:e/sse?token={t}&presence=true", s.url),
        &[],
    )
    .await
    .unwrap();
    let (mut a, _) = connect(&s.ws_url(), &s.token("ann", &["room:*"])).await;
    join(&mut a, "room:e").await;
    let e = sse.next().await;
    assert_eq!(e.event, "presence", "{e:?}");
    let p = e.json();
    assert_eq!(
        (&p["seq"], &p["action"], &p["member"]["sub"]),
        (&json!(1), &json!("join"), &json!("ann"))
    );
    assert_eq!(
        e.id, None,
        "presence blocks carry no id: Last-Event-ID stays the events' position"
    );
    s.api().publish("room:e", json!({"hi": 1})).await;
    let ev = sse.next().await;
    assert_eq!(ev.event, "event");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_follow_next_cursor() {
    let s = TestServer::with(presence).await;
    let mut sockets = Vec::new();
    for n in 0..5 {
        let (mut c, _) = connect(&s.ws_url(), &s.token(&format!("u{n}"), &["room:*"])).await;
        join(&mut c, "room:p").await;
        sockets.push(c);
    }
    let api = s.api();
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..5 {
        let path = match &cursor {
            Some(c) => format!("/v1/streams/room:p/presence?limit=2&cursor={c}"),
            None => "/v1/streams/room:p/presence?limit=2".to_string(),
        };
        let r = api.get(&path, Some(&s.creds.api_key)).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.json["occupancy"], 5);
        seen.extend(
            r.json["members"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["sessionId"].as_str().unwrap().to_string()),
        );
        cursor = r.json["nextCursor"].as_str().map(String::from);
        if cursor.is_none() {
            break;
        }
    }
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(
        (seen.len(), sorted),
        (5, seen.clone()),
        "every member once, in order"
    );
    // A connect token granting the stream reads it too.
    let t = s.token("reader", &["room:p"]);
    let r = api
        .get(&format!("/v1/streams/room:p/presence?token={t}"), None)
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_beyond_the_cap_is_a_stream_level_over_capacity() {
    let s = TestServer::with(|c| {
        presence(c);
        c.presence.max_members = 2;
    })
    .await;
    let (mut a, _) = connect(&s.ws_url(), &s.token("a", &["room:*"])).await;
    let (mut b, _) = connect(&s.ws_url(), &s.token("b", &["room:*"])).await;
    join(&mut a, "room:c").await;
    join(&mut b, "room:c").await;
    let (mut c, _) = connect(&s.ws_url(), &s.token("c", &["room:*"])).await;
    c.send(json!({"type":"subscribe","stream":"room:c"})).await;
    let e = c.expect("error").await;
    assert_eq!(
        (&e["code"], &e["stream"], &e["limit"]),
        (&json!("OVER_CAPACITY"), &json!("room:c"), &json!(2)),
        "{e}"
    );
    // The socket goes on; the stream is not subscribed: its events do not arrive.
    s.api().publish("room:c", json!(1)).await;
    c.expect_silence(Duration::from_millis(500)).await;
    join(&mut c, "room:d").await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_a_typed_error() {
    let s = TestServer::with(presence).await;
    let api = s.api();
    let key = Some(s.creds.api_key.as_str());
    let r = api.get("/v1/streams/other:1/presence", key).await;
    assert_eq!((r.status, r.code()), (404, "NOT_FOUND"), "{}", r.text);
    let r = api.get("/v1/streams/bad%20id/presence", key).await;
    assert_eq!(
        (r.status, r.code()),
        (400, "INVALID_STREAM_ID"),
        "{}",
        r.text
    );
    let r = api
        .get("/v1/streams/room:1/presence?cursor=not.a.session", key)
        .await;
    assert_eq!((r.status, r.code()), (400, "INVALID_REQUEST"), "{}", r.text);
    let t = s.token("x", &["room:2"]);
    let r = api
        .get(&format!("/v1/streams/room:1/presence?token={t}"), None)
        .await;
    assert_eq!((r.status, r.code()), (403, "FORBIDDEN"), "{}", r.text);
    let r = api.get("/v1/streams/room:1/presence", None).await;
    assert_eq!(r.status, 401, "{}", r.text);
    // An info claim over 1,024 bytes is refused at connect.
    let big = s
        .creds
        .token_with_info("big", &["room:*"], json!({"bio": "x".repeat(2_000)}));
    let refused = WsClient::connect(&format!("{}/v1/ws?token={big}", s.ws_url()))
        .await
        .err()
        .expect("refused");
    assert_eq!(refused.status, 413);
    assert_eq!(refused.json()["error"]["code"], "PAYLOAD_TOO_LARGE");
    // Presence frames of a stream without presence, or from beyond the head: stream errors
    // with `presence: true`; the events subscription stands.
    let (mut c, _) = connect(&s.ws_url(), &s.token("c", &["*"])).await;
    c.send(json!({"type":"subscribe","stream":"other:1","presence":true}))
        .await;
    let e = c.expect("error").await;
    assert_eq!(
        (&e["code"], &e["presence"]),
        (&json!("NOT_FOUND"), &json!(true)),
        "{e}"
    );
    c.expect("subscribed").await;
    c.send(json!({"type":"subscribe","stream":"room:9","presence":true,"presenceAfter":99}))
        .await;
    let e = c.expect("error").await;
    assert_eq!(
        (&e["code"], &e["presence"], &e["headSeq"]),
        (&json!("INVALID_REQUEST"), &json!(true), &json!(1)),
        "{e}"
    );
    c.expect("subscribed").await;
    c.send(json!({"type":"subscribe","stream":"room:9","presence":true,"presenceAfter":0,"presenceEpoch":"00000000000000000000000000000000"})).await;
    let e = c.expect("error").await;
    assert_eq!(
        (&e["code"], &e["presence"]),
        (&json!("EPOCH_CHANGED"), &json!(true)),
        "{e}"
    );
    c.expect("subscribed").await;
    s.stop().await;
}

/// Starts instance B on the same Redis with A's secrets (so resume tokens verify on both).
async fn second_instance(a: &TestServer, redis: &RedisServer, dir: &Path) -> TestServer {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy(a.data_dir.join("secrets.json"), dir.join("secrets.json")).unwrap();
    TestServer::start_in(dir, |c| on_redis(c, redis)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_redis_a_resume_elsewhere_and_a_drain_hand_off_emit_nothing() {
    let redis = RedisServer::start().expect("start redis-server");
    let a = TestServer::with(|c| on_redis(c, &redis)).await;
    let b_dir = tempfile::tempdir().unwrap();
    let b = second_instance(&a, &redis, b_dir.path()).await;
    // The watcher is on B; the members on A.
    let (mut w, _) = connect(&b.ws_url(), &b.token("watcher", &["room:*"])).await;
    watch(&mut w, "room:r", None).await;
    let mut members = Vec::new();
    for n in 0..3 {
        let (mut c, welcome) = connect(&a.ws_url(), &a.token(&format!("m{n}"), &["room:*"])).await;
        join(&mut c, "room:r").await;
        let f = presence_frame(&mut w).await;
        assert_eq!(
            (&f["action"], &f["member"]["sub"]),
            (&json!("join"), &json!(format!("m{n}")))
        );
        members.push((c, welcome));
    }
    let head = b
        .api()
        .get("/v1/streams/room:r/presence", Some(&b.creds.api_key))
        .await
        .json["presenceSeq"]
        .clone();
    // A drains: every member gets `reconnect` and resumes on B.
    let r = a
        .api()
        .post(
            "/admin/drain/start",
            Some(&a.creds.admin_token),
            json!({"reason":"rolling_deployment","max_session_age_seconds":1}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let mut moved = Vec::new();
    for (mut c, _) in members {
        let f = c.expect("reconnect").await;
        let token = f["resumeToken"].as_str().unwrap().to_string();
        assert_eq!(c.expect_close().await, Some(1012));
        let mut c2 = WsClient::connect(&format!("{}/v1/ws?resume={token}", b.ws_url()))
            .await
            .unwrap();
        c2.expect("welcome").await;
        c2.expect("subscribed").await;
        moved.push(c2);
    }
    w.expect_silence(QUIET).await;
    let after = b
        .api()
        .get("/v1/streams/room:r/presence", Some(&b.creds.api_key))
        .await;
    assert_eq!(
        (&after.json["presenceSeq"], &after.json["occupancy"]),
        (&head, &json!(4)),
        "{}",
        after.text
    );
    // A member that goes for good leaves once, observed on the other instance.
    moved.pop().unwrap().abort();
    let l = presence_frame(&mut w).await;
    assert_eq!(
        (&l["action"], &l["member"]["sub"]),
        (&json!("leave"), &json!("m2"))
    );
    w.expect_silence(QUIET).await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn occupancy_webhooks_arrive_once_each_in_order_with_their_idempotency_keys() {
    let up = zerodrop_testkit::upstream::FakeUpstream::start().await;
    let url = up.url.clone();
    let s = TestServer::with(move |c| {
        presence(c);
        c.guard.upstreams.insert(
            "app".into(),
            zerodrop_server::config::UpstreamConfig {
                primary: url,
                deliver_path: "/presence".into(),
                presence: vec!["room:*".into()],
                ..Default::default()
            },
        );
    })
    .await;
    let (mut a, wa) = connect(&s.ws_url(), &s.token("ann", &["room:*"])).await;
    let (mut b, wb) = connect(&s.ws_url(), &s.token("bob", &["room:*"])).await;
    join(&mut a, "room:w").await;
    join(&mut b, "room:w").await;
    a.send(json!({"type":"unsubscribe","stream":"room:w"}))
        .await;
    a.expect("unsubscribed").await;
    b.abort(); // leaves after the grace
    let want = [
        ("stream.occupied", &wa, 1),
        ("member.joined", &wa, 1),
        ("member.joined", &wb, 2),
        ("member.left", &wa, 1),
        ("member.left", &wb, 0),
        ("stream.vacated", &wb, 0),
    ];
    up.wait_until("six presence webhooks", |r| r.len() >= want.len())
        .await;
    // Nothing more comes (each transition once).
    tokio::time::sleep(Duration::from_millis(800)).await;
    let got: Vec<_> = up
        .received()
        .into_iter()
        .filter(|r| r.status == 200)
        .collect();
    assert_eq!(got.len(), want.len(), "{got:#?}");
    let mut keys = std::collections::BTreeSet::new();
    for (r, (ty, who, occupancy)) in got.iter().zip(want) {
        let body = r.json();
        assert_eq!(r.target, "/presence");
        assert_eq!(
            (&body["type"], &body["stream"]),
            (&json!(ty), &json!("room:w")),
            "{body}"
        );
        assert_eq!(body["member"]["sessionId"], who["sessionId"], "{body}");
        assert_eq!(body["occupancy"], occupancy, "{body}");
        let key = r.header("idempotency-key").expect("an Idempotency-Key");
        assert_eq!(body["idempotencyKey"], key);
        assert!(
            key.starts_with("presence:room:w:") && key.ends_with(ty),
            "{key}"
        );
        assert!(keys.insert(key.to_string()), "one key per transition");
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sse_session_is_a_member_and_a_grant_taken_away_makes_it_leave() {
    let s = TestServer::with(presence).await;
    let (mut w, _) = connect(&s.ws_url(), &s.token("watcher", &["room:*"])).await;
    watch(&mut w, "room:g", None).await;
    // An SSE response of a session (`?resume=`) keeps that session a member.
    let (mut a, wa) = connect(&s.ws_url(), &s.token("ann", &["room:*"])).await;
    join(&mut a, "room:g").await;
    assert_eq!(presence_frame(&mut w).await["action"], "join");
    let token = wa["resumeToken"].as_str().unwrap().to_string();
    a.close().await;
    let _sse = SseClient::connect(
        &format!("{}/v1/streams/room:g/sse?resume={token}", s.url),
        &[],
    )
    .await
    .unwrap();
    w.expect_silence(QUIET).await;
    // A socket whose refreshed token no longer grants the stream leaves it (at once: no grace).
    let (mut b, _) = connect(&s.ws_url(), &s.token("bob", &["room:*"])).await;
    join(&mut b, "room:g").await;
    assert_eq!(presence_frame(&mut w).await["member"]["sub"], "bob");
    b.send(json!({"type":"refresh","token": s.token("bob", &["other:*"])}))
        .await;
    let e = b.expect("error").await;
    assert_eq!(
        (&e["code"], &e["stream"]),
        (&json!("FORBIDDEN"), &json!("room:g")),
        "{e}"
    );
    let l = presence_frame(&mut w).await;
    assert_eq!(
        (&l["action"], &l["member"]["sub"]),
        (&json!("leave"), &json!("bob"))
    );
    s.stop().await;
}
