//! Authorization hooks (SPEC §9) against a real hook server on loopback: connect, subscribe
//! and publish ask it; a denial is `FORBIDDEN` with its reason; a hook that is down refuses
//! with `AUTHZ_UNAVAILABLE` (fail closed); verdicts are cached for their `ttlSec`, and a live
//! subscription whose verdict ran out is asked again and ends when denied; questions asked at
//! once share one call.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use zerodrop_server::config::UpstreamConfig;
use zerodrop_testkit::server::TestServer;
use zerodrop_testkit::sse::{SseClient, SseRead};
use zerodrop_testkit::ws::WsClient;

/// What the hook answers per (action, stream); anything else is allowed with no ttl.
#[derive(Default)]
struct Policy {
    verdicts: HashMap<(String, String), Value>,
    down: bool,
}

struct Hook {
    policy: Arc<Mutex<Policy>>,
    calls: Arc<Mutex<Vec<Value>>>,
    count: Arc<AtomicUsize>,
    url: String,
    _task: tokio::task::JoinHandle<()>,
}

impl Hook {
    async fn start() -> Hook {
        let policy = Arc::new(Mutex::new(Policy::default()));
        let calls = Arc::new(Mutex::new(Vec::new()));
        let count = Arc::new(AtomicUsize::new(0));
        let (p, c, n) = (policy.clone(), calls.clone(), count.clone());
        let app = axum::Router::new().route(
            "/authz",
            axum::routing::post(move |body: String| {
                let (p, c, n) = (p.clone(), c.clone(), n.clone());
                async move {
                    n.fetch_add(1, Ordering::SeqCst);
                    // Slow enough that questions asked together overlap.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    let q: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
                    c.lock().unwrap().push(q.clone());
                    let p = p.lock().unwrap();
                    if p.down {
                        return (
                            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                            "down".to_string(),
                        );
                    }
                    let key = (
                        q["action"].as_str().unwrap_or("").to_string(),
                        q["stream"].as_str().unwrap_or("").to_string(),
                    );
                    let v = p
                        .verdicts
                        .get(&key)
                        .cloned()
                        .unwrap_or(json!({"allow": true}));
                    (axum::http::StatusCode::OK, v.to_string())
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Hook {
            policy,
            calls,
            count,
            url,
            _task: task,
        }
    }

    fn set(&self, action: &str, stream: &str, verdict: Value) {
        self.policy
            .lock()
            .unwrap()
            .verdicts
            .insert((action.into(), stream.into()), verdict);
    }

    fn down(&self, down: bool) {
        self.policy.lock().unwrap().down = down;
    }

    fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }
}

async fn server(hook: &Hook) -> TestServer {
    let url = hook.url.clone();
    TestServer::with(move |c| {
        c.guard.upstreams.insert(
            "hook".into(),
            UpstreamConfig {
                primary: url,
                timeout_ms: 2000,
                ..UpstreamConfig::default()
            },
        );
        c.authz_upstream = Some("hook".into());
    })
    .await
}

/// The next frame that is not a ping (answered).
async fn frame(c: &mut WsClient) -> Value {
    c.next_frame(Duration::from_secs(10)).await
}

async fn metric(s: &TestServer, line: &str) -> bool {
    s.api()
        .get("/metrics", None)
        .await
        .text
        .lines()
        .any(|l| l == line)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_subscribe_and_publish_ask_the_hook_and_a_denial_is_forbidden_with_its_reason() {
    let hook = Hook::start().await;
    hook.set("connect", "", json!({"allow": true, "ttlSec": 60}));
    hook.set("subscribe", "room:a", json!({"allow": true, "ttlSec": 60}));
    hook.set(
        "subscribe",
        "room:b",
        json!({"allow": false, "ttlSec": 60, "reason": "not invited"}),
    );
    hook.set(
        "publish",
        "room:a",
        json!({"allow": false, "reason": "read-only room"}),
    );
    let s = server(&hook).await;
    let t = s.creds.token("u1", &["room:*"], &["room:*"]);
    let mut c = WsClient::connect(&format!("{}/v1/ws?token={t}", s.ws_url()))
        .await
        .unwrap();
    c.expect("welcome").await;
    c.send(json!({"type":"subscribe","stream":"room:a"})).await;
    assert_eq!(frame(&mut c).await["type"], "subscribed");
    c.send(json!({"type":"subscribe","stream":"room:b"})).await;
    let e = frame(&mut c).await;
    assert_eq!(
        (
            e["code"].as_str(),
            e["stream"].as_str(),
            e["reason"].as_str()
        ),
        (Some("FORBIDDEN"), Some("room:b"), Some("not invited")),
        "{e}"
    );
    c.send(json!({"type":"publish","stream":"room:a","data":1,"id":"p1"}))
        .await;
    let e = frame(&mut c).await;
    assert_eq!(
        (e["code"].as_str(), e["id"].as_str()),
        (Some("FORBIDDEN"), Some("p1")),
        "{e}"
    );
    assert!(
        e["message"].as_str().unwrap().contains("read-only room"),
        "{e}"
    );
    // A stream the token does not grant is refused by the grants; the hook is not asked.
    let asked = hook.count();
    c.send(json!({"type":"subscribe","stream":"secret:x"}))
        .await;
    assert_eq!(frame(&mut c).await["code"], "FORBIDDEN");
    assert_eq!(hook.count(), asked, "not granted: no call");
    // What the hook was told.
    let calls = hook.calls.lock().unwrap().clone();
    let sub_a = calls
        .iter()
        .find(|q| q["action"] == "subscribe" && q["stream"] == "room:a")
        .unwrap();
    assert_eq!(sub_a["sub"], "u1");
    assert_eq!(sub_a["claims"]["streams"], json!(["room:*"]));
    let conn = calls.iter().find(|q| q["action"] == "connect").unwrap();
    assert_eq!(conn["stream"], Value::Null);
    // Twenty sockets of u1 at once: connect and room:a are cached (ttlSec 60): no call.
    let before = hook.count();
    let mut joins = Vec::new();
    for _ in 0..20 {
        let url = format!("{}/v1/ws?token={t}", s.ws_url());
        joins.push(tokio::spawn(async move {
            let mut c = WsClient::connect(&url).await.unwrap();
            c.expect("welcome").await;
            c.send(json!({"type":"subscribe","stream":"room:a"})).await;
            c.expect("subscribed").await;
        }));
    }
    for j in joins {
        j.await.unwrap();
    }
    assert_eq!(hook.count(), before, "cached verdicts");
    // Twenty new sockets of another subject at once: one call per question, shared.
    let t2 = s.creds.token("u2", &["room:*"], &[]);
    let before = hook.count();
    let mut joins = Vec::new();
    for _ in 0..20 {
        let url = format!("{}/v1/ws?token={t2}", s.ws_url());
        joins.push(tokio::spawn(async move {
            let mut c = WsClient::connect(&url).await.unwrap();
            c.expect("welcome").await;
        }));
    }
    for j in joins {
        j.await.unwrap();
    }
    assert_eq!(
        hook.count() - before,
        1,
        "asked once for twenty connects at once"
    );
    assert!(
        metric(
            &s,
            "zerodrop_authz_hook_calls_total{action=\"subscribe\",result=\"deny\"} 1"
        )
        .await
    );
    // HTTP: a session asking for room:b is refused whole.
    let r = s
        .api()
        .post(
            "/v1/sessions",
            Some(&t),
            json!({"streams":["room:a","room:b"]}),
        )
        .await;
    assert_eq!((r.status, r.code()), (403, "FORBIDDEN"), "{}", r.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hook_that_is_down_refuses_with_authz_unavailable() {
    let hook = Hook::start().await;
    hook.down(true);
    let s = server(&hook).await;
    let t = s.creds.token("u1", &["room:*"], &[]);
    let mut c = WsClient::connect(&format!("{}/v1/ws?token={t}", s.ws_url()))
        .await
        .unwrap();
    let e = frame(&mut c).await;
    assert_eq!(e["code"], "AUTHZ_UNAVAILABLE", "{e}");
    assert_eq!(c.expect_close().await, Some(1013));
    let r = s
        .api()
        .post("/v1/sessions", Some(&t), json!({"streams":["room:a"]}))
        .await;
    assert_eq!(
        (r.status, r.code()),
        (503, "AUTHZ_UNAVAILABLE"),
        "{}",
        r.text
    );
    let sse = SseClient::connect(&format!("{}/v1/streams/room:a/sse?token={t}", s.url), &[]).await;
    assert!(sse.is_err(), "SSE refused");
    assert!(
        metric(
            &s,
            "zerodrop_authz_hook_calls_total{action=\"connect\",result=\"unavailable\"} 3"
        )
        .await
    );
    // Back up: allowed again (nothing was cached from the failures).
    hook.down(false);
    let r = s
        .api()
        .post("/v1/sessions", Some(&t), json!({"streams":["room:a"]}))
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verdict_that_runs_out_is_asked_again_and_a_denial_ends_the_stream() {
    let hook = Hook::start().await;
    hook.set("subscribe", "room:a", json!({"allow": true, "ttlSec": 1}));
    let s = server(&hook).await;
    let api = s.api();
    let t = s.creds.token("u1", &["room:*"], &[]);
    let mut c = WsClient::connect(&format!("{}/v1/ws?token={t}", s.ws_url()))
        .await
        .unwrap();
    c.expect("welcome").await;
    for st in ["room:a", "room:c"] {
        c.send(json!({"type":"subscribe","stream":st})).await;
        c.expect("subscribed").await;
    }
    let mut sse = SseClient::connect(&format!("{}/v1/streams/room:a/sse?token={t}", s.url), &[])
        .await
        .unwrap();
    api.publish("room:a", json!(1)).await;
    assert_eq!(c.events(1).await[0]["seq"], 1);
    assert_eq!(sse.next().await.json()["seq"], 1);
    // The invitation ends: the next question is denied, and both transports end room:a.
    hook.set(
        "subscribe",
        "room:a",
        json!({"allow": false, "reason": "left the call"}),
    );
    let e = frame(&mut c).await;
    assert_eq!(
        (e["code"].as_str(), e["stream"].as_str()),
        (Some("FORBIDDEN"), Some("room:a")),
        "{e}"
    );
    match sse.read(Duration::from_secs(10)).await {
        SseRead::Event(e) => {
            assert_eq!(e.event, "error", "{e:?}");
            assert_eq!(e.json()["code"], "FORBIDDEN");
        }
        other => panic!("expected the typed end, got {other:?}"),
    }
    // The socket stays, room:c goes on, room:a delivers nothing more.
    api.publish("room:a", json!(2)).await;
    api.publish("room:c", json!(1)).await;
    let ev = c.events(1).await;
    assert_eq!(
        (ev[0]["stream"].as_str(), ev[0]["seq"].as_u64()),
        (Some("room:c"), Some(1))
    );
    c.send(json!({"type":"ping","t":4})).await;
    assert_eq!(c.expect("pong").await["t"], 4);
    // Both connections' verdicts ran out together: one call or two (shared when they overlap).
    let m = api.get("/metrics", None).await.text;
    let denies: u64 = m
        .lines()
        .find_map(|l| {
            l.strip_prefix("zerodrop_authz_hook_calls_total{action=\"subscribe\",result=\"deny\"} ")
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!((1..=2).contains(&denies), "{m}");
}
