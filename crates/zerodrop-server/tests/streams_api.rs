//! Streams as a complete API (SPEC §11, docs/protocol.md "Streams as a whole"): batch publish,
//! history before a seq / the newest / since a time, delete and close — each on SQLite (a
//! real file), on Redis (a real `redis-server` started on a free port) and on the memory
//! store, with exact seqs,
//! orders and error codes, and the stored data checked intact after every bad input.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use zerodrop_server::config::StoreChoice;
use zerodrop_testkit::http::{Api, Resp};
use zerodrop_testkit::redis::{RedisCluster, RedisServer};
use zerodrop_testkit::server::TestServer;
use zerodrop_testkit::sse::{SseClient, SseRead};
use zerodrop_testkit::ws::WsClient;

/// Retention for every server here: history tests trim past it.
const KEEP: u64 = 8;

async fn sqlite() -> TestServer {
    TestServer::with(|c| {
        c.retention.max_events = KEEP;
        c.max_payload_bytes = 1024;
        c.max_batch_bytes = 64 * 1024;
    })
    .await
}

/// The memory store (tests only), held to the same answers.
async fn memory() -> TestServer {
    TestServer::with(|c| {
        c.store = StoreChoice::Memory;
        c.retention.max_events = KEEP;
        c.max_payload_bytes = 1024;
        c.max_batch_bytes = 64 * 1024;
    })
    .await
}

/// A Redis Cluster of three primaries: a batch's streams land on different slots (and nodes),
/// and each stream's part is still atomic (one script on its slot).
async fn redis_cluster() -> (RedisCluster, TestServer) {
    let cluster = RedisCluster::start(3).expect("start a redis cluster");
    let urls = cluster.urls();
    let s = TestServer::with(|c| {
        c.store = StoreChoice::Redis;
        c.redis_url = urls;
        c.retention.max_events = KEEP;
        c.max_payload_bytes = 1024;
        c.max_batch_bytes = 64 * 1024;
    })
    .await;
    (cluster, s)
}

async fn redis() -> (RedisServer, TestServer) {
    let redis = RedisServer::start().expect("start redis-server");
    let url = redis.url();
    let s = TestServer::with(|c| {
        c.store = StoreChoice::Redis;
        c.redis_url = url;
        c.retention.max_events = KEEP;
        c.max_payload_bytes = 1024;
        c.max_batch_bytes = 64 * 1024;
    })
    .await;
    (redis, s)
}

async fn batch(api: &Api, body: Value) -> Resp {
    let key = api.creds.api_key.clone();
    api.post("/v1/events", Some(&key), body).await
}

/// A stream's stored state: head, epoch, digest and every retained event's seq and data.
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
    json!({"info": info, "events": events})
}

fn seqs(page: &Value) -> Vec<u64> {
    page["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["seq"].as_u64().expect("seq"))
        .collect()
}

fn result(r: &Resp, i: usize) -> (String, u64, bool) {
    let x = &r.json["results"][i];
    (
        x["stream"].as_str().unwrap_or("").to_string(),
        x["seq"].as_u64().unwrap_or(0),
        x["duplicate"].as_bool().unwrap_or(false),
    )
}

async fn batch_publish(s: &TestServer) {
    let api = s.api();
    api.publish("a:1", json!("first")).await;
    // A live subscriber of both streams gets the batch's events like single publishes.
    let mut c = ws(s, &["a:*", "b:*"]).await;
    for stream in ["a:1", "b:1"] {
        c.send(json!({"type": "subscribe", "stream": stream})).await;
        c.expect("subscribed").await;
    }
    // Items of two streams interleaved: each stream's in request order, contiguous.
    let r = batch(
        &api,
        json!({"events": [
            {"stream": "a:1", "data": "x"},
            {"stream": "b:1", "data": {"y": 1}},
            {"stream": "a:1", "data": "z"},
            {"stream": "b:1", "data": [2], "id": "k1"},
        ]}),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(result(&r, 0), ("a:1".into(), 2, false));
    assert_eq!(result(&r, 1), ("b:1".into(), 1, false));
    assert_eq!(result(&r, 2), ("a:1".into(), 3, false));
    assert_eq!(result(&r, 3), ("b:1".into(), 2, false));
    let a = stored(&api, "a:1").await;
    assert_eq!(a["events"], json!([[1, "first"], [2, "x"], [3, "z"]]));
    let live: Vec<(String, u64)> = c
        .events(4)
        .await
        .iter()
        .map(|e| {
            (
                e["stream"].as_str().unwrap().to_string(),
                e["seq"].as_u64().unwrap(),
            )
        })
        .collect();
    let of = |name: &str| -> Vec<u64> {
        live.iter()
            .filter(|(s, _)| s == name)
            .map(|(_, q)| *q)
            .collect()
    };
    assert_eq!((of("a:1"), of("b:1")), (vec![2, 3], vec![1, 2]), "{live:?}");
    c.close().await;

    // The same key with the same body: the original's answer; twice in one batch, too.
    let r = batch(
        &api,
        json!({"events": [
            {"stream": "b:1", "data": [2], "id": "k1"},
            {"stream": "b:1", "data": "new", "id": "k9"},
            {"stream": "b:1", "data": "new", "id": "k9"},
        ]}),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(result(&r, 0), ("b:1".into(), 2, true));
    assert_eq!(result(&r, 1), ("b:1".into(), 3, false));
    assert_eq!(result(&r, 2), ("b:1".into(), 3, true));

    // Broadcast: one event to many streams.
    let r = batch(
        &api,
        json!({"streams": ["c:1", "c:2", "a:1"], "data": {"n": 1}}),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(result(&r, 0), ("c:1".into(), 1, false));
    assert_eq!(result(&r, 1), ("c:2".into(), 1, false));
    assert_eq!(result(&r, 2), ("a:1".into(), 4, false));
    // A broadcast's `id` is the key on each of its streams: a retry is a duplicate on each.
    let once = json!({"streams": ["c:3", "c:4"], "data": "once", "id": "bc-1"});
    let r = batch(&api, once.clone()).await;
    assert_eq!(result(&r, 0), ("c:3".into(), 1, false));
    let r = batch(&api, once).await;
    assert_eq!(result(&r, 0), ("c:3".into(), 1, true));
    assert_eq!(result(&r, 1), ("c:4".into(), 1, true));

    // A key reused with another body refuses its stream's whole part; other streams commit.
    let before_a = stored(&api, "a:1").await;
    let r = batch(
        &api,
        json!({"events": [
            {"stream": "a:1", "data": "p"},
            {"stream": "c:1", "data": "q"},
            {"stream": "a:1", "data": "other body", "id": "k-a"},
        ]}),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(result(&r, 1), ("c:1".into(), 2, false));
    let r2 = batch(
        &api,
        json!({"events": [
            {"stream": "a:1", "data": "p2"},
            {"stream": "a:1", "data": "changed", "id": "k-a"},
            {"stream": "c:2", "data": "ok"},
        ]}),
    )
    .await;
    assert_eq!(r2.status, 201, "{}", r2.text);
    for i in [0, 1] {
        assert_eq!(
            r2.json["results"][i]["error"]["code"], "IDEMPOTENCY_KEY_REUSED",
            "{}",
            r2.text
        );
        assert_eq!(r2.json["results"][i]["error"]["stream"], "a:1");
    }
    assert_eq!(result(&r2, 2), ("c:2".into(), 2, false));
    let after_a = stored(&api, "a:1").await;
    assert_eq!(
        after_a["events"],
        json!([[1, "first"], [2, "x"], [3, "z"], [4, {"n": 1}], [5, "p"], [6, "other body"]])
    );
    assert_ne!(before_a, after_a, "the first batch wrote a:1");

    // Refusals of the whole request: nothing written by any of them.
    let snapshot = json!([
        stored(&api, "a:1").await,
        stored(&api, "b:1").await,
        stored(&api, "c:1").await
    ]);
    let many: Vec<Value> = (0..1001)
        .map(|i| json!({"stream": "a:1", "data": i}))
        .collect();
    let big = "x".repeat(2000);
    let huge: Vec<Value> = (0..100)
        .map(|_| json!({"stream": "a:1", "data": "y".repeat(900)}))
        .collect();
    let bad: Vec<(Value, u16, &str)> = vec![
        (json!({"events": []}), 400, "INVALID_REQUEST"),
        (json!({"streams": [], "data": 1}), 400, "INVALID_REQUEST"),
        (json!({}), 400, "INVALID_REQUEST"),
        (
            json!({"events": [{"stream": "a:1", "data": 1}], "streams": ["a:1"], "data": 1}),
            400,
            "INVALID_REQUEST",
        ),
        (json!({"streams": ["a:1"]}), 400, "INVALID_REQUEST"),
        (json!({"events": many}), 400, "INVALID_REQUEST"),
        (
            json!({"events": [{"stream": "a:1", "data": 1}, {"stream": "bad id!", "data": 2}]}),
            400,
            "INVALID_STREAM_ID",
        ),
        (
            json!({"events": [{"stream": "a:1", "data": 1}, {"stream": "b:1", "data": big}]}),
            413,
            "PAYLOAD_TOO_LARGE",
        ),
        (json!({"events": huge}), 413, "PAYLOAD_TOO_LARGE"),
        (
            json!({"events": [{"stream": "a:1", "data": 1, "id": ""}]}),
            400,
            "INVALID_REQUEST",
        ),
        (
            json!({"events": [{"stream": "a:1", "data": 1, "extra": 2}]}),
            400,
            "INVALID_REQUEST",
        ),
    ];
    for (body, status, code) in bad {
        let r = batch(&api, body.clone()).await;
        assert_eq!((r.status, r.code()), (status, code), "{body}: {}", r.text);
    }
    let r = api
        .request(
            Method::POST,
            "/v1/events",
            None,
            Some("{\"events\":[]}".into()),
            &[],
        )
        .await;
    assert_eq!((r.status, r.code()), (401, "UNAUTHORIZED"), "{}", r.text);
    let idx = batch(
        &api,
        json!({"events": [{"stream": "a:1", "data": 1}, {"stream": "bad id!", "data": 2}]}),
    )
    .await;
    assert_eq!(idx.json["error"]["index"], 1, "{}", idx.text);
    let now = json!([
        stored(&api, "a:1").await,
        stored(&api, "b:1").await,
        stored(&api, "c:1").await
    ]);
    assert_eq!(snapshot, now, "a refused batch wrote nothing");
}

async fn history(s: &TestServer) {
    let api = s.api();
    let key = api.creds.api_key.clone();
    for i in 1..=6 {
        api.publish("h:1", json!(i)).await;
    }
    let get = |q: String| {
        let api = api.clone();
        let key = key.clone();
        async move {
            api.get(&format!("/v1/streams/h:1/events?{q}"), Some(&key))
                .await
        }
    };
    let r = get("before=5&limit=3".into()).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["order"], "desc");
    assert_eq!(seqs(&r.json), vec![4, 3, 2]);
    assert_eq!(
        seqs(&get("before=3&limit=10".into()).await.json),
        vec![2, 1]
    );
    assert_eq!(seqs(&get("before=1".into()).await.json), Vec::<u64>::new());
    let r = get("last=2".into()).await;
    assert_eq!(
        (r.json["order"].as_str(), seqs(&r.json)),
        (Some("desc"), vec![6, 5])
    );
    let r = get("after=4".into()).await;
    assert_eq!(
        (r.json["order"].as_str(), seqs(&r.json)),
        (Some("asc"), vec![5, 6])
    );
    // since_ts: from the first event stamped at or after T, ascending.
    let all = api.read("h:1", 0, 100).await.json;
    let ts: Vec<u64> = all["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["ts"].as_u64().unwrap())
        .collect();
    let t = ts[3];
    let r = get(format!("since_ts={t}")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let got = seqs(&r.json);
    let first = got[0] as usize;
    assert!(
        ts[first - 1] >= t && (first == 1 || ts[first - 2] < t),
        "{got:?} {ts:?}"
    );
    assert_eq!(*got.last().unwrap(), 6);
    let r = get(format!("since_ts={}", ts[5] + 60_000)).await;
    assert_eq!(seqs(&r.json), Vec::<u64>::new());
    // Combinations and positions refused like `after`'s.
    for q in [
        "before=3&after=1",
        "last=2&since_ts=1",
        "before=3&last=1",
        "last=2&limit=3",
    ] {
        let r = get(q.into()).await;
        assert_eq!(
            (r.status, r.code()),
            (400, "INVALID_REQUEST"),
            "{q}: {}",
            r.text
        );
    }
    let r = get("before=9".into()).await;
    assert_eq!((r.status, r.code()), (400, "ACK_BEYOND_HEAD"), "{}", r.text);
    let r = get("before=7&epoch=00000000000000aa".into()).await;
    assert_eq!((r.status, r.code()), (409, "EPOCH_CHANGED"), "{}", r.text);
    // Trim past retention: 6 + 6 = 12 published, 8 kept (5..=12).
    for i in 7..=12 {
        api.publish("h:1", json!(i)).await;
    }
    assert_eq!(api.info("h:1").await["firstSeq"], 5);
    let r = get("before=5".into()).await;
    assert_eq!(
        (r.status, r.code()),
        (409, "REPLAY_WINDOW_TRIMMED"),
        "{}",
        r.text
    );
    assert_eq!(r.json["error"]["firstAvailableSeq"], 5);
    let r = get("before=7&limit=5".into()).await;
    assert_eq!(seqs(&r.json), vec![6, 5], "stops at the oldest retained");
    assert_eq!(r.json["firstSeq"], 5);
    let r = get("since_ts=0".into()).await;
    assert_eq!(
        (r.status, r.code()),
        (409, "REPLAY_WINDOW_TRIMMED"),
        "{}",
        r.text
    );
    let r = get("last=3".into()).await;
    assert_eq!(seqs(&r.json), vec![12, 11, 10]);
    // A connect token that does not grant the stream is refused, like `after`.
    let tok = s.token("u1", &["other:*"]);
    let r = api.get("/v1/streams/h:1/events?last=1", Some(&tok)).await;
    assert_eq!((r.status, r.code()), (403, "FORBIDDEN"), "{}", r.text);
}

async fn ws(s: &TestServer, streams: &[&str]) -> WsClient {
    let tok = s.token("u1", streams);
    let mut c = WsClient::connect(&format!("{}/v1/ws?token={tok}", s.ws_url()))
        .await
        .expect("ws connects");
    c.expect("welcome").await;
    c
}

async fn delete(s: &TestServer) {
    let api = s.api();
    let key = api.creds.api_key.clone();
    for i in 1..=3 {
        let r = api
            .request(
                Method::POST,
                "/v1/streams/d:1/events",
                Some(&key),
                Some(json!({"data": i}).to_string()),
                &[("idempotency-key", &format!("key-{i}"))],
            )
            .await;
        assert_eq!(r.status, 201, "{}", r.text);
    }
    let old_epoch = api.info("d:1").await["epoch"].as_str().unwrap().to_string();
    let mut c = ws(s, &["d:*"]).await;
    c.send(json!({"type": "subscribe", "stream": "d:1", "after": 0}))
        .await;
    c.expect("subscribed").await;
    let got: Vec<u64> = c
        .events(3)
        .await
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(got, vec![1, 2, 3]);

    let r = api
        .request(Method::DELETE, "/v1/streams/d:1", None, None, &[])
        .await;
    assert_eq!((r.status, r.code()), (401, "UNAUTHORIZED"));
    let r = api
        .request(Method::DELETE, "/v1/streams/d:1", Some(&key), None, &[])
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let new_epoch = r.json["epoch"].as_str().unwrap().to_string();
    assert_ne!(new_epoch, old_epoch);
    assert_eq!(r.json["headSeq"], 0);
    let f = c.expect("error").await;
    assert_eq!(f["code"], "EPOCH_CHANGED", "{f}");
    assert_eq!(f["stream"], "d:1");
    assert_eq!(f["epoch"], new_epoch.as_str());

    let info = api.info("d:1").await;
    assert_eq!(
        (info["headSeq"].as_u64(), info["count"].as_u64()),
        (Some(0), Some(0))
    );
    assert_eq!(info["epoch"], new_epoch.as_str());
    assert_eq!(seqs(&api.read("d:1", 0, 10).await.json), Vec::<u64>::new());
    // Its idempotency records went with it: the key appends anew, in the new epoch.
    let r = api
        .request(
            Method::POST,
            "/v1/streams/d:1/events",
            Some(&key),
            Some(json!({"data": "again"}).to_string()),
            &[("idempotency-key", "key-1")],
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(
        (r.json["seq"].as_u64(), r.json["duplicate"].as_bool()),
        (Some(1), Some(false))
    );
    assert_eq!(r.json["epoch"], new_epoch.as_str());

    let r = api
        .request(Method::DELETE, "/v1/streams/never:1", Some(&key), None, &[])
        .await;
    assert_eq!((r.status, r.code()), (404, "NOT_FOUND"), "{}", r.text);
    let r = api
        .request(
            Method::DELETE,
            "/v1/streams/bad%20id",
            Some(&key),
            None,
            &[],
        )
        .await;
    assert_eq!(
        (r.status, r.code()),
        (400, "INVALID_STREAM_ID"),
        "{}",
        r.text
    );
    c.close().await;
}

async fn close(s: &TestServer) {
    let api = s.api();
    let key = api.creds.api_key.clone();
    api.publish("z:1", json!(1)).await;
    api.publish("z:1", json!(2)).await;
    let mut c = ws(s, &["z:*"]).await;
    c.send(json!({"type": "subscribe", "stream": "z:1", "after": 0}))
        .await;
    c.expect("subscribed").await;
    assert_eq!(c.events(2).await.len(), 2);
    let sse_url = format!(
        "{}/v1/streams/z:1/sse?token={}&after=1",
        s.url,
        s.token("u2", &["z:*"])
    );
    let mut sse = SseClient::connect(&sse_url, &[]).await.expect("sse");
    assert_eq!(sse.next().await.json()["seq"], 2);

    let close = |stream: &str| {
        let path = format!("/v1/streams/{stream}/close");
        let (api, key) = (api.clone(), key.clone());
        async move {
            api.request(Method::POST, &path, Some(&key), None, &[])
                .await
        }
    };
    let r = close("z:1").await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        (r.json["lastSeq"].as_u64(), r.json["closed"].as_bool()),
        (Some(2), Some(true))
    );
    let f = c.expect("closed").await;
    assert_eq!(f, json!({"type": "closed", "stream": "z:1", "lastSeq": 2}));
    let e = sse.next().await;
    assert_eq!(e.event, "closed");
    assert_eq!(e.json(), json!({"stream": "z:1", "lastSeq": 2}));
    assert!(matches!(
        sse.read(Duration::from_secs(5)).await,
        SseRead::Ended
    ));

    let stored_before = stored(&api, "z:1").await;
    let r = api.try_publish("z:1", json!(3)).await;
    assert_eq!((r.status, r.code()), (409, "STREAM_CLOSED"), "{}", r.text);
    assert_eq!(r.json["error"]["lastSeq"], 2);
    let r = batch(&api, json!({"streams": ["z:1", "z:2"], "data": 3})).await;
    assert_eq!(
        r.json["results"][0]["error"]["code"], "STREAM_CLOSED",
        "{}",
        r.text
    );
    assert_eq!(result(&r, 1), ("z:2".into(), 1, false));
    assert_eq!(stored(&api, "z:1").await, stored_before);
    // A WebSocket publish frame is refused the same way, at stream level.
    let tok = s.creds.token("u3", &["z:*"], &["z:*"]);
    let mut p = WsClient::connect(&format!("{}/v1/ws?token={tok}", s.ws_url()))
        .await
        .expect("ws connects");
    p.expect("welcome").await;
    p.send(json!({"type": "publish", "stream": "z:1", "data": 3, "id": "p1"}))
        .await;
    let f = p.expect("error").await;
    assert_eq!(
        (f["code"].as_str(), f["stream"].as_str()),
        (Some("STREAM_CLOSED"), Some("z:1")),
        "{f}"
    );
    p.close().await;
    assert_eq!(api.info("z:1").await["closed"], true);
    assert_eq!(api.info("z:2").await["closed"], false);
    // Closing again changes nothing; an unknown stream is 404.
    assert_eq!(close("z:1").await.json["lastSeq"], 2);
    let r = close("never:2").await;
    assert_eq!((r.status, r.code()), (404, "NOT_FOUND"), "{}", r.text);

    // A later subscriber (a resume after the close) gets what it missed, then `closed`.
    let mut late = ws(s, &["z:*"]).await;
    late.send(json!({"type": "subscribe", "stream": "z:1", "after": 1}))
        .await;
    late.expect("subscribed").await;
    assert_eq!(late.events(1).await[0]["seq"], 2);
    assert_eq!(late.expect("closed").await["lastSeq"], 2);
    let mut sse = SseClient::connect(&sse_url, &[]).await.expect("sse");
    assert_eq!(sse.next().await.json()["seq"], 2);
    assert_eq!(sse.next().await.event, "closed");
    // The socket itself stays open for its other streams.
    c.send(json!({"type": "subscribe", "stream": "z:2", "after": 0}))
        .await;
    c.expect("subscribed").await;
    assert_eq!(c.events(1).await[0]["data"], 3);
    c.close().await;
    late.close().await;
}

/// One test per store for each scenario: `on_sqlite::<scenario>`, `on_redis::<scenario>`,
/// `on_redis_cluster::<scenario>` and `on_memory::<scenario>`.
macro_rules! on_both_stores {
    ($($scenario:ident),*) => {
        mod on_sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::$scenario(&super::sqlite().await).await;
                }
            )*
        }
        mod on_memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::$scenario(&super::memory().await).await;
                }
            )*
        }
        mod on_redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    let (_redis, s) = super::redis().await;
                    super::$scenario(&s).await;
                }
            )*
        }
        mod on_redis_cluster {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    let (_cluster, s) = super::redis_cluster().await;
                    super::$scenario(&s).await;
                }
            )*
        }
    };
}

on_both_stores!(batch_publish, history, delete, close);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_state_survives_a_restart_on_sqlite() {
    let s = sqlite().await;
    s.api().publish("r:1", json!(1)).await;
    let key = s.creds.api_key.clone();
    let r = s
        .api()
        .request(Method::POST, "/v1/streams/r:1/close", Some(&key), None, &[])
        .await;
    assert_eq!(r.status, 200);
    let dir = s.data_dir.clone();
    let owner = s.stop().await;
    let s = TestServer::start_in(&dir, |c| c.retention.max_events = KEEP).await;
    assert_eq!(s.api().info("r:1").await["closed"], true);
    let r = s.api().try_publish("r:1", json!(2)).await;
    assert_eq!((r.status, r.code()), (409, "STREAM_CLOSED"));
    drop(s);
    drop(owner);
}
