//! The replay/live seam and slow consumers: no gap and no duplicate, whatever races.

use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use serde_json::json;
use zerodrop_core::{Seq, StreamId};
use zerodrop_server::live::{Hub, HubLimits, Signal};
use zerodrop_server::metrics::Metrics;
use zerodrop_store::{AppendRequest, SqliteOptions, SqliteStore, Store};
use zerodrop_testkit::server::TestServer;
use zerodrop_testkit::ws::WsClient;

async fn append(store: &dyn Store, stream: &StreamId, i: u64) {
    let req = AppendRequest {
        stream: stream.clone(),
        data: i.to_string(),
        idempotency: None,
    };
    store.append(req).await.expect("append");
}

/// Subscribes at `after` while publishers race, then checks the subscriber saw exactly
/// `after+1 ..= head`, in order.
async fn seam_case(before: u64, during: u64, publishers: u64, after: u64, ring: usize) {
    let dir = tempfile::tempdir().unwrap();
    let metrics = Arc::new(Metrics::new());
    let limits = HubLimits {
        ring_events: ring,
        ..HubLimits::default()
    };
    let hub = Arc::new(Hub::new(limits, metrics));
    let store: Arc<dyn Store> = Arc::new(
        SqliteStore::open(SqliteOptions::new(dir.path().join("z.db")), hub.clone()).unwrap(),
    );
    let stream = StreamId::new("seam").unwrap();
    for i in 0..before {
        append(&*store, &stream, i).await;
    }
    let epoch = store.stream_info(&stream).await.unwrap().epoch;
    let mut tasks = Vec::new();
    for p in 0..publishers {
        let (store, stream) = (store.clone(), stream.clone());
        let n = during / publishers + u64::from(p < during % publishers);
        tasks.push(tokio::spawn(async move {
            for i in 0..n {
                append(&*store, &stream, i).await;
            }
        }));
    }
    tokio::task::yield_now().await;
    let signal = Signal::new();
    let mut sub = hub.subscribe(stream.clone(), epoch, Seq(after), signal.clone(), None);
    let head = before + during;
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut buf = Vec::new();
    while sub.cursor().0 < head {
        assert!(
            tokio::time::Instant::now() < deadline,
            "stalled at {:?}",
            sub.cursor()
        );
        signal.take();
        buf.clear();
        sub.pull(&*store, 64, &mut buf).await.unwrap();
        seen.extend(buf.iter().map(|d| d.seq().0));
        if buf.is_empty() {
            let _ = tokio::time::timeout(Duration::from_millis(50), signal.woken()).await;
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let expected: Vec<u64> = (after + 1..=head).collect();
    assert_eq!(seen, expected);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
    #[test]
    fn no_gap_no_duplicate_at_the_seam(
        before in 0u64..40,
        during in 1u64..150,
        publishers in 1u64..4,
        after_pct in 0u64..=100,
        ring in 1usize..40,
    ) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let after = before * after_pct / 100;
        rt.block_on(seam_case(before, during, publishers, after, ring));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_subscribers_racing_publishers_see_every_seq_once() {
    let s = TestServer::with(|c| c.live_ring_events = 8).await;
    let tok = s.token("u1", &["race"]);
    let mut pubs = Vec::new();
    for w in 0..4 {
        let api = s.api();
        pubs.push(tokio::spawn(async move {
            for i in 0..150 {
                api.publish("race", json!([w, i])).await;
            }
        }));
    }
    let mut clients = Vec::new();
    for k in 0..5u64 {
        tokio::time::sleep(Duration::from_millis(15 * k)).await;
        let mut c = WsClient::connect(&format!("{}/v1/ws?token={tok}", s.ws_url()))
            .await
            .unwrap();
        c.expect("welcome").await;
        let after = k * 20;
        // A position must exist before it can be subscribed from.
        let api = s.api();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while api.info("race").await["headSeq"].as_u64().unwrap() < after {
            assert!(tokio::time::Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        c.send(json!({"type":"subscribe","stream":"race","after":after}))
            .await;
        let sub = c.recv().await;
        assert_eq!(sub["type"], "subscribed", "{sub}");
        clients.push((c, after));
    }
    for p in pubs {
        p.await.unwrap();
    }
    for (mut c, after) in clients {
        let n = (600 - after) as usize;
        let seqs: Vec<u64> = c
            .events(n)
            .await
            .iter()
            .map(|f| f["seq"].as_u64().unwrap())
            .collect();
        assert_eq!(seqs, (after + 1..=600).collect::<Vec<_>>());
        c.expect_silence(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_catches_up_from_the_log() {
    let s = TestServer::with(|c| {
        c.live_ring_events = 16;
        c.retention.max_bytes = 64 << 20;
    })
    .await;
    let tok = s.token("u1", &["slow"]);
    let mut slow = WsClient::connect(&format!("{}/v1/ws?token={tok}", s.ws_url()))
        .await
        .unwrap();
    slow.expect("welcome").await;
    slow.send(json!({"type":"subscribe","stream":"slow"})).await;
    slow.expect("subscribed").await;
    let mut fast = WsClient::connect(&format!("{}/v1/ws?token={tok}", s.ws_url()))
        .await
        .unwrap();
    fast.expect("welcome").await;
    fast.send(json!({"type":"subscribe","stream":"slow"})).await;
    fast.expect("subscribed").await;
    // ~25 MB of events while `slow` reads nothing: its socket fills up long before the end,
    // and the ring (16 events) moves far past its cursor.
    let api = s.api();
    let blob = "x".repeat(60_000);
    let publisher = tokio::spawn(async move {
        for i in 0..400 {
            api.publish("slow", json!({"i": i, "blob": blob})).await;
        }
    });
    let fast_seqs: Vec<u64> = fast
        .events(400)
        .await
        .iter()
        .map(|f| f["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(
        fast_seqs,
        (1..=400).collect::<Vec<_>>(),
        "the slow client held no one back"
    );
    publisher.await.unwrap();
    let slow_seqs: Vec<u64> = slow
        .events(400)
        .await
        .iter()
        .map(|f| f["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(slow_seqs, (1..=400).collect::<Vec<_>>());
    assert_eq!(
        s.api().metrics_json().await["ws_metrics"]["dropped_messages"],
        0
    );
}
