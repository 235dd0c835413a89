//! The stream digest as served: `hash` of `GET /v1/streams/{s}` is the chain (docs/protocol.md,
//! "Stream digest") over the `events[]` elements of `GET …/events`, byte for byte, before and
//! after retention trims the oldest events. The data published is that of the shared vectors
//! (docs/vectors/stream-digest.json); the server assigns its own `ts` and `epoch`, so the
//! hashes themselves are the vectors' only in the core test.

use serde::Deserialize;
use serde_json::value::RawValue;
use zerodrop_core::hash::ChainHash;
use zerodrop_testkit::http::Api;
use zerodrop_testkit::server::TestServer;

#[derive(Deserialize)]
struct Page {
    #[serde(rename = "headSeq")]
    head_seq: u64,
    events: Vec<Box<RawValue>>,
}

#[derive(Deserialize)]
struct Seq {
    seq: u64,
}

#[derive(Deserialize)]
struct Data {
    data: Box<RawValue>,
}

/// Every `data` value in the vectors, in order, as JSON text.
fn vector_data() -> Vec<String> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/vectors/stream-digest.json"
    );
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut out = Vec::new();
    for case in doc["cases"].as_array().unwrap() {
        for e in case["events"].as_array().unwrap() {
            let d: Data = serde_json::from_str(e.as_str().unwrap()).unwrap();
            out.push(d.data.get().to_string());
        }
    }
    out
}

/// The chain over every retained event as served (pages of 2, so paging is exercised), the
/// number of events, and the first seq read.
async fn served_chain(api: &Api, stream: &str, first_seq: u64) -> (String, u64, Option<u64>) {
    let mut h = ChainHash::default();
    let mut n = 0;
    let mut first = None;
    let mut after = first_seq - 1;
    for _ in 0..100 {
        let r = api.read(stream, after, 2).await;
        assert_eq!(r.status, 200, "{}", r.text);
        let page: Page = serde_json::from_str(&r.text).unwrap();
        if page.events.is_empty() {
            assert_eq!(after, page.head_seq);
            return (h.hex(), n, first);
        }
        for e in &page.events {
            let Seq { seq } = serde_json::from_str(e.get()).unwrap();
            assert_eq!(seq, after + 1, "contiguous");
            first.get_or_insert(seq);
            // The raw element text, never a re-serialisation.
            h.push(e.get().as_bytes());
            after = seq;
            n += 1;
        }
    }
    panic!("paging did not end");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_served_hash_is_the_chain_over_the_served_events_before_and_after_a_trim() {
    let s = TestServer::with(|c| c.retention.max_events = 5).await;
    let api = s.api();
    let stream = "digest:1";

    let info = api.info(stream).await;
    assert_eq!(info["hash"], "0".repeat(64));
    assert_eq!(info["count"], 0);

    let data = vector_data();
    assert!(data.len() > 5, "enough data to trim past retention");
    for (i, d) in data.iter().enumerate() {
        let v: serde_json::Value = serde_json::from_str(d).unwrap();
        api.publish(stream, v).await;
        let info = api.info(stream).await;
        let first = info["firstSeq"].as_u64().unwrap();
        let head = info["headSeq"].as_u64().unwrap();
        assert_eq!(head, i as u64 + 1);
        assert_eq!(first, head.saturating_sub(5) + 1, "retention keeps 5");
        let (hash, n, first_read) = served_chain(&api, stream, first).await;
        assert_eq!(info["count"].as_u64().unwrap(), n);
        assert_eq!(first_read, Some(first));
        assert_eq!(
            info["hash"].as_str().unwrap(),
            hash,
            "after {} publishes",
            i + 1
        );
    }
    assert!(
        api.info(stream).await["firstSeq"].as_u64().unwrap() > 1,
        "the oldest events were trimmed"
    );
    // The events keep the published data as the vectors spell it (compacted input, unicode
    // as is), which is what makes the vectors' event text realistic.
    let r = api.read(stream, data.len() as u64 - 1, 1).await;
    let page: Page = serde_json::from_str(&r.text).unwrap();
    let last: Data = serde_json::from_str(page.events[0].get()).unwrap();
    assert_eq!(last.data.get(), data[data.len() - 1]);
}

/// The SDKs' consistency check reads the digest with the connect token they subscribe with:
/// `GET /v1/streams/{s}` takes the api key or a connect token that grants the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_token_that_grants_the_stream_reads_its_digest() {
    let s = TestServer::start().await;
    let api = s.api();
    api.publish("chat:a", serde_json::json!(1)).await;
    let with_key = api.info("chat:a").await;
    let tok = s.token("u1", &["chat:*"]);
    let r = api.get("/v1/streams/chat:a", Some(&tok)).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json, with_key);
    let r = api.get("/v1/streams/room:1", Some(&tok)).await;
    assert_eq!((r.status, r.code()), (403, "FORBIDDEN"));
    let r = api.get("/v1/streams/chat:a", None).await;
    assert_eq!((r.status, r.code()), (401, "UNAUTHORIZED"));
    let r = api.get("/v1/streams/chat:a", Some("not-a-token")).await;
    assert_eq!(r.status, 401);
}
