//! The HTTP API over loopback, on a real SQLite file: every route, every error code it can
//! produce, and bad input that leaves stored data intact.

use reqwest::Method;
use serde_json::{Value, json};
use zerodrop_testkit::server::TestServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_read_and_stream_info() {
    let s = TestServer::start().await;
    let api = s.api();
    let a = api.publish("room:1", json!({"hello": "world"})).await;
    assert_eq!(a["seq"], 1);
    assert_eq!(a["stream"], "room:1");
    assert_eq!(a["duplicate"], false);
    let epoch = a["epoch"].as_str().unwrap().to_string();
    for i in 2..=5 {
        let r = api.publish("room:1", json!({"n": i})).await;
        assert_eq!(r["seq"], i);
        assert_eq!(r["epoch"], epoch.as_str());
    }
    let r = api.read("room:1", 2, 100).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json["headSeq"], 5);
    assert_eq!(r.json["epoch"], epoch.as_str());
    let seqs: Vec<u64> = r.json["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, vec![3, 4, 5]);
    let e = &r.json["events"][0];
    assert_eq!(e["stream"], "room:1");
    assert_eq!(e["data"], json!({"n": 3}));
    assert!(e["ts"].as_u64().unwrap() > 1_700_000_000_000);
    // limit
    let r = api.read("room:1", 0, 2).await;
    assert_eq!(r.json["events"].as_array().unwrap().len(), 2);
    let r = api.read("room:1", 0, 5000).await;
    assert_eq!(r.json["events"].as_array().unwrap().len(), 5);
    // at the head, a page of nothing; past it, the answer every entry point gives
    let r = api.read("room:1", 5, 10).await;
    assert_eq!(
        (r.status, r.json["events"].as_array().unwrap().len()),
        (200, 0)
    );
    let r = api.read("room:1", 9, 10).await;
    assert_eq!(
        (r.status, r.code(), r.json["error"]["headSeq"].as_u64()),
        (400, "ACK_BEYOND_HEAD", Some(5))
    );
    let info = api.info("room:1").await;
    assert_eq!(info["headSeq"], 5);
    assert_eq!(info["firstSeq"], 1);
    assert_eq!(info["count"], 5);
    assert_eq!(info["epoch"], epoch.as_str());
    let bytes: usize = api.read("room:1", 0, 100).await.json["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.to_string().len())
        .sum();
    assert_eq!(info["bytes"].as_u64().unwrap() as usize, bytes);
    assert_eq!(info["hash"].as_str().unwrap().len(), 64);
    // Payloads are stored compact, whatever the publisher's formatting.
    let body = "{ \"data\" :\n { \"a\" : [ 1 , 2 ] , \"s\": \"x  y\" } }";
    let path = "/v1/streams/fmt/events";
    let key = s.creds.api_key.clone();
    let r = api
        .request(Method::POST, path, Some(&key), Some(body.into()), &[])
        .await;
    assert_eq!(r.status, 201);
    let r = api.read("fmt", 0, 1).await;
    assert!(
        r.text.contains(r#""data":{"a":[1,2],"s":"x  y"}"#),
        "{}",
        r.text
    );
    assert!(r.json["events"][0]["data"] == json!({"a": [1, 2], "s": "x  y"}));
    assert!(r.headers.get("x-zerodrop-instance").is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_keys() {
    let s = TestServer::start().await;
    let api = s.api();
    let key = s.creds.api_key.clone();
    let post = |body: &'static str, idem: &'static str| {
        let api = api.clone();
        let key = key.clone();
        async move {
            api.request(
                Method::POST,
                "/v1/streams/pay/events",
                Some(&key),
                Some(body.into()),
                &[("idempotency-key", idem)],
            )
            .await
        }
    };
    let first = post(r#"{"data":{"amount":5}}"#, "order-1").await;
    assert_eq!(
        (first.status, first.json["duplicate"].clone()),
        (201, json!(false))
    );
    let again = post(r#"{"data": {"amount": 5}}"#, "order-1").await;
    assert_eq!(again.status, 201);
    assert_eq!(again.json["duplicate"], true);
    assert_eq!(again.json["seq"], first.json["seq"]);
    assert_eq!(again.json["epoch"], first.json["epoch"]);
    let other = post(r#"{"data":{"amount":6}}"#, "order-1").await;
    assert_eq!(
        (other.status, other.code()),
        (422, "IDEMPOTENCY_KEY_REUSED")
    );
    let bad = post(r#"{"data":1}"#, "").await;
    assert_eq!((bad.status, bad.code()), (400, "INVALID_REQUEST"));
    // Concurrent retries append once.
    let mut tasks = Vec::new();
    for _ in 0..10 {
        tasks.push(tokio::spawn(post(r#"{"data":"x"}"#, "order-2")));
    }
    let mut seqs = Vec::new();
    let mut firsts = 0;
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 201);
        seqs.push(r.json["seq"].as_u64().unwrap());
        firsts += usize::from(r.json["duplicate"] == false);
    }
    assert_eq!(firsts, 1);
    assert!(seqs.iter().all(|s| *s == 2));
    assert_eq!(api.info("pay").await["headSeq"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_typed_and_leaves_data_intact() {
    let s = TestServer::with(|c| c.max_payload_bytes = 1024).await;
    let api = s.api();
    for i in 0..3 {
        api.publish("keep", json!(i)).await;
    }
    let before = api.info("keep").await;
    let key = s.creds.api_key.clone();
    let post = |path: String, body: String, bearer: Option<String>| {
        let api = api.clone();
        async move {
            api.request(Method::POST, &path, bearer.as_deref(), Some(body), &[])
                .await
        }
    };
    let ev = "/v1/streams/keep/events".to_string();
    let cases: Vec<(String, String, Option<String>, u16, &str)> = vec![
        (
            ev.clone(),
            r#"{"data":1}"#.into(),
            None,
            401,
            "UNAUTHORIZED",
        ),
        (
            ev.clone(),
            r#"{"data":1}"#.into(),
            Some("wrong-key-wrong-key".into()),
            401,
            "UNAUTHORIZED",
        ),
        (
            ev.clone(),
            "not json".into(),
            Some(key.clone()),
            400,
            "INVALID_REQUEST",
        ),
        (
            ev.clone(),
            "{\"data\":".into(),
            Some(key.clone()),
            400,
            "INVALID_REQUEST",
        ),
        (
            ev.clone(),
            r#"{"nodata":1}"#.into(),
            Some(key.clone()),
            400,
            "INVALID_REQUEST",
        ),
        (
            ev.clone(),
            "[1,2]".into(),
            Some(key.clone()),
            400,
            "INVALID_REQUEST",
        ),
        (
            ev.clone(),
            format!("{{\"data\":\"{}\"}}", "x".repeat(2000)),
            Some(key.clone()),
            413,
            "PAYLOAD_TOO_LARGE",
        ),
        (
            ev.clone(),
            format!("{{\"data\":\"{}\"}}", "x".repeat(200_000)),
            Some(key.clone()),
            413,
            "PAYLOAD_TOO_LARGE",
        ),
        (
            // Past the body limit (2 × 1 KiB + 16 KiB) the body is refused unread, so even
            // a body that is not JSON is 413, not 400.
            ev.clone(),
            "y".repeat(19 * 1024),
            Some(key.clone()),
            413,
            "PAYLOAD_TOO_LARGE",
        ),
        (
            "/v1/streams/bad%20id/events".into(),
            r#"{"data":1}"#.into(),
            Some(key.clone()),
            400,
            "INVALID_STREAM_ID",
        ),
        (
            format!("/v1/streams/{}/events", "x".repeat(129)),
            r#"{"data":1}"#.into(),
            Some(key.clone()),
            400,
            "INVALID_STREAM_ID",
        ),
        (
            "/v1/streams/a%2Fb/events".into(),
            r#"{"data":1}"#.into(),
            Some(key.clone()),
            400,
            "INVALID_STREAM_ID",
        ),
    ];
    for (path, body, bearer, status, code) in cases {
        let r = post(path.clone(), body.clone(), bearer).await;
        assert_eq!(
            (r.status, r.code()),
            (status, code),
            "{path} {}: {}",
            &body[..body.len().min(40)],
            r.text
        );
        assert!(
            r.json["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
    }
    let after = api.info("keep").await;
    assert_eq!(before, after, "stored data is untouched");
    // Reads and info need credentials; unknown routes and methods are typed too.
    let r = api.get("/v1/streams/keep/events", None).await;
    assert_eq!((r.status, r.code()), (401, "UNAUTHORIZED"));
    let r = api.get("/v1/streams/keep", None).await;
    assert_eq!((r.status, r.code()), (401, "UNAUTHORIZED"));
    let r = api
        .get("/v1/streams/keep/events?after=abc", Some(&key))
        .await;
    assert_eq!((r.status, r.code()), (400, "INVALID_REQUEST"));
    let r = api.get("/v1/nothing", None).await;
    assert_eq!((r.status, r.code()), (404, "NOT_FOUND"));
    let r = api
        .request(
            Method::DELETE,
            "/v1/streams/keep/events",
            Some(&key),
            None,
            &[],
        )
        .await;
    assert_eq!((r.status, r.code()), (405, "METHOD_NOT_ALLOWED"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_with_a_connect_token_and_trimmed_windows() {
    let s = TestServer::with(|c| c.retention.max_events = 5).await;
    let api = s.api();
    for i in 1..=12 {
        api.publish("room:7", json!(i)).await;
    }
    let tok = s.token("u1", &["room:*"]);
    let r = api
        .get("/v1/streams/room:7/events?after=8", Some(&tok))
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json["events"].as_array().unwrap().len(), 4);
    let r = api
        .get(
            &format!("/v1/streams/room:7/events?after=10&token={tok}"),
            None,
        )
        .await;
    assert_eq!(r.status, 200);
    let other = s.token("u1", &["user:*"]);
    let r = api.get("/v1/streams/room:7/events", Some(&other)).await;
    assert_eq!((r.status, r.code()), (403, "FORBIDDEN"));
    let r = api.read("room:7", 3, 10).await;
    assert_eq!((r.status, r.code()), (409, "REPLAY_WINDOW_TRIMMED"));
    assert_eq!(r.json["error"]["firstAvailableSeq"], 8);
    assert_eq!(r.json["error"]["stream"], "room:7");
    // seq 8 is still there: after=7 is fine.
    assert_eq!(api.read("room:7", 7, 10).await.status, 200);
    let epoch = api.info("room:7").await["epoch"]
        .as_str()
        .unwrap()
        .to_string();
    let key = s.creds.api_key.clone();
    let r = api
        .get(
            &format!("/v1/streams/room:7/events?after=9&epoch={epoch}"),
            Some(&key),
        )
        .await;
    assert_eq!(r.status, 200);
    let r = api
        .get(
            "/v1/streams/room:7/events?after=9&epoch=0123456789abcdef",
            Some(&key),
        )
        .await;
    assert_eq!((r.status, r.code()), (409, "EPOCH_CHANGED"));
    assert_eq!(r.json["error"]["epoch"], epoch.as_str());
    let info = api.info("room:7").await;
    assert_eq!(
        (info["firstSeq"].as_u64(), info["count"].as_u64()),
        (Some(8), Some(5))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_readiness() {
    let s = TestServer::start().await;
    let api = s.api();
    let h = api.get("/health", None).await;
    assert_eq!(h.status, 200);
    assert_eq!(h.json["status"], "ok");
    assert_eq!(
        h.json["store"],
        json!({
            "kind": "sqlite",
            "up": true,
            "durability": "fsync",
            "durabilitySettings": {"synchronous": "full"},
            "requiredDurability": null,
            "durabilityBelowRequired": false,
        })
    );
    assert_eq!(h.json["drain"]["state"], "active");
    assert_eq!(h.json["instance"], s.app().instance.as_str());
    assert_eq!(api.get("/health/live", None).await.status, 200);
    let r = api.get("/health/ready", None).await;
    assert_eq!((r.status, r.json.clone()), (200, json!({"ready": true})));
    // Draining: readiness 503 with the reason; publishes still work.
    let admin = s.creds.admin_token.clone();
    let r = api
        .post(
            "/admin/drain/start",
            Some(&admin),
            json!({"reason":"test","max_session_age_seconds":1}),
        )
        .await;
    assert_eq!(r.status, 200);
    let r = api.get("/health/ready", None).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.json["ready"], false);
    assert!(
        r.json["reasons"]
            .as_array()
            .unwrap()
            .contains(&Value::from("draining"))
    );
    assert_eq!(api.get("/health", None).await.json["status"], "draining");
    assert_eq!(api.try_publish("x", json!(1)).await.status, 201);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_preflight_and_headers() {
    let s = TestServer::start().await;
    let api = s.api();
    let r = api
        .request(
            Method::OPTIONS,
            "/v1/streams/x/events",
            None,
            None,
            &[
                ("origin", "https://app.example"),
                ("access-control-request-method", "POST"),
                (
                    "access-control-request-headers",
                    "authorization,idempotency-key",
                ),
            ],
        )
        .await;
    assert!(r.status < 300, "{}", r.status);
    let h = |name: &str| {
        r.headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default()
    };
    assert_eq!(h("access-control-allow-origin"), "*");
    // Listed one by one: a `*` would not cover `Authorization` (Fetch standard), and Firefox
    // and Safari would refuse the request.
    assert_eq!(
        h("access-control-allow-headers"),
        "authorization,content-type,idempotency-key,last-event-id,if-none-match,stream-seq,\
         stream-ttl,stream-expires-at,stream-closed,producer-id,producer-epoch,producer-seq"
    );
    // PUT and HEAD: the Durable Streams routes (`/ds/`).
    assert_eq!(
        h("access-control-allow-methods"),
        "GET,POST,DELETE,PUT,HEAD"
    );
    assert_eq!(h("access-control-max-age"), "600");
    assert!(
        h("access-control-allow-credentials").is_empty(),
        "no credentials"
    );
    // A session open from a page: the same answer on every route.
    let r = api
        .request(
            Method::OPTIONS,
            "/v1/sessions",
            None,
            None,
            &[
                ("origin", "https://app.example"),
                ("access-control-request-method", "POST"),
                (
                    "access-control-request-headers",
                    "authorization,content-type",
                ),
            ],
        )
        .await;
    assert!(r.status < 300, "{}", r.status);
    assert_eq!(
        r.headers.get("access-control-allow-headers").unwrap(),
        "authorization,content-type,idempotency-key,last-event-id,if-none-match,stream-seq,\
         stream-ttl,stream-expires-at,stream-closed,producer-id,producer-epoch,producer-seq"
    );
    let s2 = TestServer::with(|c| c.cors_origins = "https://ok.example".into()).await;
    let api2 = s2.api();
    let r = api2
        .request(
            Method::GET,
            "/health",
            None,
            None,
            &[("origin", "https://ok.example")],
        )
        .await;
    assert_eq!(
        r.headers.get("access-control-allow-origin").unwrap(),
        "https://ok.example"
    );
    let r = api2
        .request(
            Method::GET,
            "/health",
            None,
            None,
            &[("origin", "https://evil.example")],
        )
        .await;
    assert!(r.headers.get("access-control-allow-origin").is_none());
    // A request without `Origin` (a backend's publish, a 404) gets the CORS headers the layer
    // gives every such request: with `*`, the origin and the exposed headers, no `Vary`.
    let key = s.creds.api_key.clone();
    for (path, status) in [("/v1/streams/x/events", 201), ("/v1/nothing/here", 404)] {
        let r = api
            .request(
                Method::POST,
                path,
                Some(&key),
                Some(r#"{"data":1}"#.into()),
                &[],
            )
            .await;
        assert_eq!(r.status, status, "{path}");
        let h = |name: &str| {
            r.headers
                .get(name)
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_default()
        };
        assert_eq!(h("access-control-allow-origin"), "*", "{path}");
        assert!(
            h("access-control-expose-headers").contains("x-zerodrop-instance"),
            "{path}: {}",
            h("access-control-expose-headers")
        );
        assert!(r.headers.get("vary").is_none(), "{path}");
    }
    // With a list of origins: `Vary: Origin` (once), no allowed origin.
    let key2 = s2.creds.api_key.clone();
    let r = api2
        .request(
            Method::POST,
            "/v1/streams/x/events",
            Some(&key2),
            Some(r#"{"data":1}"#.into()),
            &[],
        )
        .await;
    assert_eq!(r.status, 201);
    let vary: Vec<_> = r.headers.get_all("vary").iter().collect();
    assert_eq!(vary, ["origin"]);
    assert!(r.headers.get("access-control-allow-origin").is_none());
    assert!(r.headers.get("access-control-expose-headers").is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_body_limit_follows_the_payload_limit() {
    // A payload limit above the HTTP stack's own default (2 MiB) is honoured: the body limit
    // is 2 × max-payload-bytes + 16 KiB, documented in docs/configuration.md.
    let s = TestServer::with(|c| c.max_payload_bytes = 3 << 20).await;
    let api = s.api();
    let key = s.creds.api_key.clone();
    let big = format!("{{\"data\":\"{}\"}}", "z".repeat(5 << 19)); // 2.5 MiB of data
    let r = api
        .request(
            Method::POST,
            "/v1/streams/big/events",
            Some(&key),
            Some(big),
            &[],
        )
        .await;
    assert_eq!(r.status, 201, "{}", &r.text[..r.text.len().min(200)]);
    let over = "w".repeat((6 << 20) + 16 * 1024 + 1);
    let r = api
        .request(
            Method::POST,
            "/v1/streams/big/events",
            Some(&key),
            Some(over),
            &[],
        )
        .await;
    assert_eq!((r.status, r.code()), (413, "PAYLOAD_TOO_LARGE"));
    assert_eq!(api.info("big").await["headSeq"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_default_to_100_events_and_clamp_to_1000() {
    let s = TestServer::start().await;
    let api = s.api();
    // 1,100 events, published by 50 concurrent publishers (group commit keeps this quick).
    let mut tasks = Vec::new();
    for w in 0..50 {
        let api = api.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..22 {
                let r = api.try_publish("many", json!({"w": w, "i": i})).await;
                assert_eq!(r.status, 201, "{}", r.text);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let key = s.creds.api_key.clone();
    let seqs = |r: &zerodrop_testkit::http::Resp| -> Vec<u64> {
        r.json["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["seq"].as_u64().unwrap())
            .collect()
    };
    let r = api.get("/v1/streams/many/events?after=0", Some(&key)).await;
    assert_eq!((r.status, r.json["headSeq"].as_u64()), (200, Some(1100)));
    assert_eq!(seqs(&r), (1..=100).collect::<Vec<_>>(), "default page");
    let r = api
        .get("/v1/streams/many/events?after=0&limit=5000", Some(&key))
        .await;
    assert_eq!(seqs(&r), (1..=1000).collect::<Vec<_>>(), "clamped to 1000");
    let r = api
        .get("/v1/streams/many/events?after=1000&limit=1000", Some(&key))
        .await;
    assert_eq!(seqs(&r), (1001..=1100).collect::<Vec<_>>());
}

/// `--http-requests-per-sec`: per route and key, 429 `RATE_LIMITED` with `Retry-After` past
/// the burst; other keys, other routes and the operator's routes are unaffected; the admin
/// views and the snapshot show what was blocked, and never a credential.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_rate_limits_per_route_and_key() {
    let s = TestServer::with(|c| c.http_requests_per_sec = 2).await;
    let api = s.api();
    let admin = s.creds.admin_token.clone();
    // Burst of 4 (twice the rate), then refused.
    let mut statuses = Vec::new();
    for i in 0..8 {
        statuses.push(api.try_publish("rl:1", json!(i)).await);
    }
    let ok = statuses.iter().filter(|r| r.status == 201).count();
    assert!((4..=5).contains(&ok), "the burst passes: {ok}");
    let refused = statuses.iter().find(|r| r.status == 429).expect("a 429");
    assert_eq!(refused.code(), "RATE_LIMITED", "{}", refused.text);
    let wait: u64 = refused.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&wait), "Retry-After {wait}");
    assert_eq!(
        api.info("rl:1").await["headSeq"],
        ok as u64,
        "refused means not stored"
    );
    // Another key (a connect token reading) and another route are unaffected.
    let tok = s.token("u1", &["rl:*"]);
    let r = api.get("/v1/streams/rl:1/events?after=0", Some(&tok)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(api.get("/health", None).await.status, 200);
    for _ in 0..10 {
        assert_eq!(
            api.get("/admin/drain/status", Some(&admin)).await.status,
            200
        );
    }
    // What operators see.
    let sum = api
        .get("/admin/ratelimit/summary?minutes=15", Some(&admin))
        .await;
    assert_eq!(sum.status, 200, "{}", sum.text);
    let publish = sum.json["summary"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["bucket"] == "POST /v1/streams/{stream}/events")
        .cloned()
        .expect("the publish bucket");
    assert_eq!(
        (publish["allowed"].as_u64(), publish["blocked"].as_u64()),
        (Some(ok as u64), Some(8 - ok as u64))
    );
    let ev = api
        .get("/admin/ratelimit/events?limit=2", Some(&admin))
        .await;
    let events = ev.json["events"].as_array().unwrap();
    assert_eq!(events.len(), 2);
    assert!(
        !ev.text.contains(&s.creds.api_key),
        "no credential is shown"
    );
    assert_eq!(events[0]["key"], "api-key", "{}", ev.text);
    // Keys: one user's tokens share theirs; requests without a credential are keyed by
    // their address. Each has its own burst.
    let tok2 = s.token("u1", &["rl:1"]);
    let mut user = Vec::new();
    for t in [&tok, &tok2, &tok, &tok2, &tok, &tok2] {
        user.push(
            api.get("/v1/streams/rl:1/events?after=0", Some(t))
                .await
                .status,
        );
    }
    assert!(
        user.contains(&429),
        "u1's two tokens share one key: {user:?}"
    );
    let mut anon = Vec::new();
    for _ in 0..6 {
        anon.push(api.get("/v1/streams/rl:1", None).await.status);
    }
    assert!(anon.contains(&429) && anon.contains(&401), "{anon:?}");
    let ev = api
        .get("/admin/ratelimit/events?limit=50", Some(&admin))
        .await;
    let keys: std::collections::BTreeSet<&str> = ev.json["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["key"].as_str().unwrap())
        .collect();
    assert_eq!(
        keys,
        ["api-key", "ip:127.0.0.1", "sub:u1"].into_iter().collect(),
        "{}",
        ev.text
    );
    let m = api.get("/metrics", None).await.text;
    let refused = user.iter().chain(&anon).filter(|s| **s == 429).count() + (8 - ok);
    assert!(
        m.contains(&format!(
            "zerodrop_rate_limited_total{{transport=\"http\"}} {refused}"
        )),
        "{m}"
    );
    let al = api.get("/admin/ratelimit/alerts", Some(&admin)).await;
    assert_eq!((al.status, al.json["enabled"].as_bool()), (200, Some(true)));
    assert_eq!(
        api.get("/admin/ratelimit/summary", None).await.code(),
        "UNAUTHORIZED"
    );
    let snap = api.get("/admin/snapshot", Some(&admin)).await.json;
    assert_eq!(snap["rateLimit"]["enabled"], true);
    assert!(!snap["rateLimit"]["summary"].as_array().unwrap().is_empty());
    // Off by default, and said so.
    let off = TestServer::start().await;
    let r = off
        .api()
        .get("/admin/ratelimit/summary", Some(&off.creds.admin_token))
        .await;
    assert_eq!(r.json, json!({"enabled": false}));
}

/// `--max-new-streams-per-minute`: off by default; when on, a publisher (the api key; a
/// connect token's `sub` over WebSocket) creates at most that many streams a minute. A
/// publish that would create one more is 429 `RATE_LIMITED` with `Retry-After` and stores
/// nothing; publishes to existing streams are never affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_streams_per_minute_are_capped_per_publisher() {
    assert_eq!(
        zerodrop_server::Config::for_tests("unused").max_new_streams_per_minute,
        0,
        "off by default"
    );
    let s = TestServer::with(|c| c.max_new_streams_per_minute = 2).await;
    let api = s.api();
    api.publish("ns:1", json!(1)).await;
    api.publish("ns:2", json!(1)).await;
    let r = api.try_publish("ns:3", json!(1)).await;
    assert_eq!((r.status, r.code()), (429, "RATE_LIMITED"), "{}", r.text);
    assert_eq!(r.json["error"]["limit"], "new_streams_per_minute");
    assert_eq!(r.json["error"]["stream"], "ns:3");
    let wait: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(
        (1..=30).contains(&wait),
        "one new stream every 30 s: {wait}"
    );
    assert_eq!(api.info("ns:3").await["headSeq"], 0, "nothing stored");
    for i in 0..20 {
        api.publish(if i % 2 == 0 { "ns:1" } else { "ns:2" }, json!(i))
            .await;
    }
    // Over WebSocket the publisher is the token's subject, with a bucket of its own.
    let tok = s.creds.token("writer", &["ns:*"], &["ns:*"]);
    let mut ws =
        zerodrop_testkit::ws::WsClient::connect(&format!("{}/v1/ws?token={tok}", s.ws_url()))
            .await
            .unwrap();
    ws.expect("welcome").await;
    for (i, stream) in ["ns:w1", "ns:w2", "ns:w3", "ns:1", "ns:w1"]
        .iter()
        .enumerate()
    {
        ws.send(json!({"type":"publish","stream":stream,"data":i,"id":i}))
            .await;
        let f = ws.recv().await;
        if *stream == "ns:w3" {
            assert_eq!(
                (&f["type"], &f["code"]),
                (&json!("error"), &json!("RATE_LIMITED")),
                "{f}"
            );
            assert_eq!(f["limit"], "new_streams_per_minute");
            assert_eq!(f["id"], i);
        } else {
            assert_eq!(f["type"], "published", "{stream}: {f}");
        }
    }
    assert_eq!(api.info("ns:w3").await["headSeq"], 0, "nothing stored");
    assert_eq!(api.info("ns:w1").await["headSeq"], 2);
    let m = api.metrics_json().await;
    assert_eq!(m["guard_metrics"]["rate_limited"], 2, "{m}");
}
