//! Per-stream policy (SPEC §11, docs/configuration.md "Per-stream policy"): patterns with
//! different retention (events, bytes, age), payload limits, publish rules and presence, held
//! against single publishes, batches and WebSocket `publish` frames, and shown by
//! `GET /v1/streams/{stream}` — on SQLite (a real file), on Redis (a real `redis-server` on a
//! free port) and on the memory store, with exact error codes and the stored data checked
//! intact after every refusal. The config file's `[streams."<pattern>"]` tables and their
//! refusals are checked through `Config::from_toml`.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use zerodrop_server::Config;
use zerodrop_server::config::{PublishRule, StoreChoice, StreamSettings};
use zerodrop_testkit::http::{Api, Resp};
use zerodrop_testkit::redis::RedisServer;
use zerodrop_testkit::server::TestServer;
use zerodrop_testkit::ws::WsClient;

/// The global settings every server here runs with, under the patterns.
const GLOBAL_PAYLOAD: usize = 1024;
const GLOBAL_EVENTS: u64 = 100;
/// `blob:*` keeps this many bytes of event JSON.
const BLOB_BYTES: u64 = 400;

/// Five patterns: an exact id over its prefix, a read-only prefix, a short-lived prefix and
/// one with presence.
fn policies(c: &mut Config) {
    c.max_payload_bytes = GLOBAL_PAYLOAD;
    c.retention.max_events = GLOBAL_EVENTS;
    let tables = [
        (
            "orders:*",
            StreamSettings {
                retention_max_events: Some(3),
                max_payload_bytes: Some(64),
                publish: Some(PublishRule::ApiKey),
                ..StreamSettings::default()
            },
        ),
        (
            "orders:vip",
            StreamSettings {
                retention_max_events: Some(5),
                max_payload_bytes: Some(4096),
                ..StreamSettings::default()
            },
        ),
        (
            "audit:*",
            StreamSettings {
                publish: Some(PublishRule::None),
                ..StreamSettings::default()
            },
        ),
        (
            "tmp:*",
            StreamSettings {
                retention_max_age_sec: Some(1),
                ..StreamSettings::default()
            },
        ),
        (
            "room:*",
            StreamSettings {
                presence: Some(true),
                ..StreamSettings::default()
            },
        ),
        (
            "blob:*",
            StreamSettings {
                retention_max_bytes: Some(BLOB_BYTES),
                ..StreamSettings::default()
            },
        ),
    ];
    for (pattern, settings) in tables {
        c.streams
            .insert(pattern, settings)
            .expect("a valid pattern");
    }
}

/// What a stream holds: its bounds and every retained event's seq and data.
async fn stored(api: &Api, stream: &str) -> Value {
    let info = api.info(stream).await;
    let page = api.read(stream, 0, 1000).await;
    let events: Vec<Value> = page.json["events"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(|e| json!([e["seq"], e["data"]]))
        .collect();
    json!({"head": info["headSeq"], "first": info["firstSeq"], "count": info["count"],
           "hash": info["hash"], "events": events})
}

/// Waits (until `deadline`) for the age sweep to empty `stream`, which held two events: its
/// bounds then say head 2, first 3.
async fn trimmed_by_age(api: &Api, stream: &str, deadline: Instant) {
    loop {
        let info = api.info(stream).await;
        if info["count"] == 0 {
            assert_eq!(
                (&info["headSeq"], &info["firstSeq"]),
                (&json!(2), &json!(3))
            );
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{stream} was not trimmed by age: {info}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn error_of(r: &Resp) -> (u16, &str) {
    (r.status, r.json["error"]["code"].as_str().unwrap_or(""))
}

/// A string whose JSON form (quotes included) is `n` bytes.
fn data_of(n: usize) -> Value {
    json!("x".repeat(n - 2))
}

async fn check_policies(s: &TestServer) {
    let api = s.api();
    let key = api.creds.api_key.clone();

    // The policy each stream gets, and where it came from.
    let info = api.info("orders:1").await;
    assert_eq!(
        info["policy"],
        json!({"pattern": "orders:*", "retention": {"maxEvents": 3, "maxBytes": 16_777_216,
               "maxAgeSec": 86_400}, "maxPayloadBytes": 64, "presence": false,
               "publish": "api-key"}),
        "{info}"
    );
    assert_eq!(
        api.info("orders:vip").await["policy"]["pattern"],
        "orders:vip"
    );
    assert_eq!(
        api.info("orders:vip").await["policy"]["maxPayloadBytes"],
        4096
    );
    assert_eq!(
        api.info("chat:1").await["policy"],
        json!({"pattern": null, "retention": {"maxEvents": GLOBAL_EVENTS,
               "maxBytes": 16_777_216, "maxAgeSec": 86_400},
               "maxPayloadBytes": GLOBAL_PAYLOAD, "presence": false, "publish": "any"})
    );
    assert_eq!(api.info("audit:x").await["policy"]["publish"], "none");
    assert_eq!(
        api.info("tmp:1").await["policy"]["retention"]["maxAgeSec"],
        1
    );
    assert_eq!(api.info("room:1").await["policy"]["presence"], true);

    // Retention by count: each stream keeps what its own pattern says.
    for i in 1..=6 {
        api.publish("orders:1", json!(i)).await;
        api.publish("orders:vip", json!(i)).await;
        api.publish("chat:1", json!(i)).await;
    }
    let bounds = |v: &Value| (v["first"].as_u64(), v["count"].as_u64());
    assert_eq!(bounds(&stored(&api, "orders:1").await), (Some(4), Some(3)));
    assert_eq!(
        bounds(&stored(&api, "orders:vip").await),
        (Some(2), Some(5))
    );
    assert_eq!(bounds(&stored(&api, "chat:1").await), (Some(1), Some(6)));

    // Retention by size: blob:* keeps 400 bytes of event JSON, other streams 16 MiB. The
    // events are all as long (same-length stream ids, seqs of one digit, same data), so exactly
    // as many as fit stay.
    for _ in 1..=6 {
        api.publish("blob:1", json!("y".repeat(40))).await;
        api.publish("text:1", json!("y".repeat(40))).await;
    }
    let big = api.info("text:1").await;
    let each = big["bytes"].as_u64().expect("bytes") / 6;
    let blob = api.info("blob:1").await;
    let kept = BLOB_BYTES / each;
    assert!((1..6).contains(&kept), "{each} bytes per event");
    assert_eq!(
        (&blob["count"], &blob["bytes"], &blob["firstSeq"]),
        (&json!(kept), &json!(kept * each), &json!(7 - kept)),
        "{blob}"
    );
    assert_eq!(big["count"], 6);

    // Payload: 64 bytes for orders:*, the global 1,024 elsewhere, 4,096 for orders:vip.
    let before = stored(&api, "orders:1").await;
    let r = api.try_publish("orders:1", data_of(65)).await;
    assert_eq!(error_of(&r), (413, "PAYLOAD_TOO_LARGE"), "{}", r.text);
    assert_eq!(r.json["error"]["pattern"], "orders:*");
    assert_eq!(r.json["error"]["limit"], 64);
    assert_eq!(r.json["error"]["stream"], "orders:1");
    assert_eq!(stored(&api, "orders:1").await, before);
    api.publish("orders:1", data_of(64)).await;
    api.publish("chat:1", data_of(65)).await;
    let r = api.try_publish("chat:1", data_of(1025)).await;
    assert_eq!(error_of(&r), (413, "PAYLOAD_TOO_LARGE"), "{}", r.text);
    assert!(r.json["error"].get("pattern").is_none(), "{}", r.text);
    let out = api.publish("orders:vip", data_of(4000)).await;
    assert_eq!(out["seq"], 7);
    let r = api.try_publish("orders:vip", data_of(4097)).await;
    assert_eq!(error_of(&r), (413, "PAYLOAD_TOO_LARGE"), "{}", r.text);

    // Who may publish: nobody to audit:*, the api key only to orders:*.
    let r = api.try_publish("audit:1", json!("no")).await;
    assert_eq!(error_of(&r), (403, "FORBIDDEN"), "{}", r.text);
    assert_eq!(
        (&r.json["error"]["pattern"], &r.json["error"]["publish"]),
        (&json!("audit:*"), &json!("none"))
    );
    assert_eq!(api.info("audit:1").await["headSeq"], 0);
    let tok = s
        .creds
        .token("u1", &["orders:*", "chat:*"], &["orders:*", "chat:*"]);
    let mut c = WsClient::connect(&format!("{}/v1/ws?token={tok}", s.ws_url()))
        .await
        .expect("ws connects");
    c.expect("welcome").await;
    let before = stored(&api, "orders:1").await;
    c.send(json!({"type": "publish", "stream": "orders:1", "data": 1, "id": "p1"}))
        .await;
    let e = c.expect("error").await;
    assert_eq!(
        (&e["code"], &e["stream"], &e["pattern"], &e["id"]),
        (
            &json!("FORBIDDEN"),
            &json!("orders:1"),
            &json!("orders:*"),
            &json!("p1")
        ),
        "{e}"
    );
    c.send(json!({"type": "publish", "stream": "chat:1", "data": 1, "id": "p2"}))
        .await;
    assert_eq!(c.expect("published").await["seq"], 8);
    // Payload over WebSocket: orders:vip takes more than the global limit, and no more than
    // its own.
    c.send(json!({"type": "publish", "stream": "orders:vip", "data": data_of(2000), "id": "p3"}))
        .await;
    assert_eq!(c.expect("published").await["seq"], 8);
    c.send(json!({"type": "publish", "stream": "orders:vip", "data": data_of(4097), "id": "p4"}))
        .await;
    let e = c.expect("error").await;
    assert_eq!(
        (&e["code"], &e["pattern"], &e["limit"], &e["id"]),
        (
            &json!("PAYLOAD_TOO_LARGE"),
            &json!("orders:vip"),
            &json!(4096),
            &json!("p4")
        ),
        "{e}"
    );
    c.close().await;
    assert_eq!(stored(&api, "orders:1").await, before);

    // A batch: each stream's part under its own policy, atomic per stream.
    let chat_before = stored(&api, "chat:1").await;
    let r = api
        .post(
            "/v1/events",
            Some(&key),
            json!({"events": [
                {"stream": "chat:1", "data": "a"},
                {"stream": "orders:1", "data": "small"},
                {"stream": "orders:1", "data": data_of(65)},
                {"stream": "audit:1", "data": "b"},
                {"stream": "orders:vip", "data": data_of(2000)},
            ]}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let results = &r.json["results"];
    assert_eq!(
        (&results[0]["stream"], &results[0]["seq"]),
        (&json!("chat:1"), &json!(9))
    );
    for i in [1, 2] {
        let e = &results[i]["error"];
        assert_eq!(
            (&e["code"], &e["index"], &e["pattern"]),
            (&json!("PAYLOAD_TOO_LARGE"), &json!(2), &json!("orders:*")),
            "{e}"
        );
    }
    assert_eq!(results[3]["error"]["code"], "FORBIDDEN");
    assert_eq!(results[4]["seq"], 9);
    assert_eq!(stored(&api, "orders:1").await, before);
    assert_eq!(api.info("audit:1").await["headSeq"], 0);
    assert_eq!(
        stored(&api, "chat:1").await["head"].as_u64(),
        chat_before["head"].as_u64().map(|h| h + 1)
    );
    // Data no stream accepts refuses the whole batch (a client's mistake), as before.
    let r = api
        .post(
            "/v1/events",
            Some(&key),
            json!({"events": [{"stream": "chat:1", "data": "a"},
                              {"stream": "orders:vip", "data": data_of(4097)}]}),
        )
        .await;
    assert_eq!(error_of(&r), (413, "PAYLOAD_TOO_LARGE"), "{}", r.text);
    assert_eq!(r.json["error"]["index"], 1);
    assert_eq!(stored(&api, "chat:1").await["head"], 9);

    // Presence only where a pattern turns it on.
    let r = api.get("/v1/streams/room:1/presence", Some(&key)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = api.get("/v1/streams/chat:1/presence", Some(&key)).await;
    assert_eq!(error_of(&r), (404, "NOT_FOUND"), "{}", r.text);

    // Retention by age: tmp:* keeps a second, every other stream a day.
    api.publish("tmp:1", json!(1)).await;
    api.publish("tmp:1", json!(2)).await;
    api.publish("keep:1", json!(1)).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    trimmed_by_age(&api, "tmp:1", deadline).await;
    let keep = stored(&api, "keep:1").await;
    assert_eq!(
        (&keep["count"], &keep["events"]),
        (&json!(1), &json!([[1, 1]]))
    );
    assert_eq!(bounds(&stored(&api, "chat:1").await).1, Some(9));
}

/// `$setup`, then `$check` on a server of each store: SQLite, a `redis-server` of its own,
/// and memory.
macro_rules! on_every_store {
    ($setup:expr, $check:expr) => {{
        let redis = RedisServer::start().expect("start redis-server");
        for store in [StoreChoice::Sqlite, StoreChoice::Redis, StoreChoice::Memory] {
            let url = redis.url();
            let s = TestServer::with(|c| {
                $setup(c);
                c.store = store;
                c.redis_url = url;
            })
            .await;
            $check(&s).await;
            s.stop().await;
        }
    }};
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_on_every_store() {
    on_every_store!(policies, check_policies);
}

/// The config file's tables: the policy they give, and each refusal's message.
#[test]
fn config_file_tables() {
    let c = Config::from_toml(
        r#"
max_payload_bytes = 2048
presence = ["room:*"]

[streams."orders:*"]
retention_max_events = 500
retention_max_age_sec = 3600
max_payload_bytes = 256
publish = "api-key"

[streams."orders:eu:*"]
max_payload_bytes = 512

[streams."room:quiet"]
presence = false

[streams."*"]
publish = "any"
"#,
    )
    .expect("a valid config");
    let p = c.policy("orders:eu:1");
    assert_eq!(
        (p.pattern, p.max_payload_bytes, p.publish),
        (Some("orders:eu:*"), 512, PublishRule::Any)
    );
    let p = c.policy("orders:us");
    assert_eq!(
        (
            p.pattern,
            p.retention.max_events,
            p.retention.max_age_ms,
            p.max_payload_bytes,
            p.publish
        ),
        (Some("orders:*"), 500, 3_600_000, 256, PublishRule::ApiKey)
    );
    assert_eq!(c.policy("chat").pattern, Some("*"));
    assert_eq!(c.policy("chat").max_payload_bytes, 2048);
    assert!(c.policy("room:1").presence);
    assert!(!c.policy("room:quiet").presence);
    // The largest payload any stream takes bounds request bodies.
    assert_eq!(c.largest_payload_bytes(), 2048);

    let refused = |text: &str| {
        format!(
            "{:#}",
            Config::from_toml(text).expect_err("an invalid config")
        )
    };
    let e = refused("[streams.\"orders:**\"]\nmax_payload_bytes = 1\n");
    assert!(
        e.contains("[streams.\"orders:**\"]") && e.contains("prefix ending in '*'"),
        "{e}"
    );
    let e = refused("[streams.\"a b\"]\n");
    assert!(e.contains("neither a stream id"), "{e}");
    let e = refused("[streams.\"orders:*\"]\nmax_events = 3\n");
    assert!(e.contains("unknown field `max_events`"), "{e}");
    let e = refused("[streams.\"orders:*\"]\nretention_max_events = 0\n");
    assert!(
        e.contains("[streams.\"orders:*\"]: retention_max_events must be at least 1"),
        "{e}"
    );
    let e = refused("[streams.\"orders:*\"]\npublish = \"tokens\"\n");
    assert!(e.contains("unknown variant `tokens`"), "{e}");
    let e = refused("[streams.\"a\"]\n[streams.\"a\"]\n");
    assert!(e.contains("duplicate") || e.contains("defined"), "{e}");
}

/// A pattern that keeps events longer than the global age: the global age still trims every
/// other stream (SQLite: stream by stream; Redis: by the age index's shifted scores), and the
/// pattern's streams keep theirs.
async fn check_longer_age(s: &TestServer) {
    let api = s.api();
    for stream in ["keep:1", "gone:1", "gone:2"] {
        api.publish(stream, json!(1)).await;
        api.publish(stream, json!(2)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    for stream in ["gone:1", "gone:2"] {
        trimmed_by_age(&api, stream, deadline).await;
    }
    let keep = stored(&api, "keep:1").await;
    assert_eq!(keep["events"], json!([[1, 1], [2, 2]]), "{keep}");
    assert_eq!(
        api.info("keep:1").await["policy"]["retention"]["maxAgeSec"],
        3600
    );
    assert_eq!(
        api.info("gone:1").await["policy"]["retention"]["maxAgeSec"],
        1
    );
}

fn longer_age(c: &mut Config) {
    c.retention.max_age_ms = 1000;
    let keep = StreamSettings {
        retention_max_age_sec: Some(3600),
        ..StreamSettings::default()
    };
    c.streams.insert("keep:*", keep).expect("a valid pattern");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn longer_age_than_global_on_every_store() {
    on_every_store!(longer_age, check_longer_age);
}
