//! The SDK's stream calls against a real server (SQLite): batch publish and broadcast,
//! history both ways, delete, and a closed stream ending a subscription with a typed end
//! (every event first, then `None`, and [`Subscription::closed`] says where it ended).

use std::time::Duration;

use zerodrop_client::{
    BatchEvent, BatchResult, Client, History, HttpClient, SubscribeOptions, Subscription,
};
use zerodrop_testkit::server::TestServer;

async fn next(sub: &mut Subscription) -> Option<u64> {
    let item = tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .expect("the subscription answers in time")?;
    let e = item.expect("no subscription error");
    e.handled();
    Some(e.seq)
}

fn seqs(results: &[BatchResult]) -> Vec<(String, u64, bool)> {
    results
        .iter()
        .map(|r| match r {
            BatchResult::Published(p) => (p.stream.clone(), p.seq, p.duplicate),
            BatchResult::Refused(e) => (e.code.clone(), 0, false),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_history_close_and_delete_through_the_sdk() {
    let s = TestServer::start().await;
    let http = HttpClient::new(&s.url, Some(s.creds.api_key.clone())).unwrap();
    let client = Client::connect(&s.url, &s.token("u1", &["sdk:*"]))
        .await
        .unwrap();
    let mut sub = client.subscribe_with(
        "sdk:1",
        SubscribeOptions {
            after: Some(0),
            epoch: None,
            ..Default::default()
        },
    );

    let events = [
        BatchEvent {
            stream: "sdk:1",
            data_json: r#"{"n":1}"#,
            id: Some("a"),
        },
        BatchEvent {
            stream: "sdk:2",
            data_json: "2",
            id: None,
        },
        BatchEvent {
            stream: "sdk:1",
            data_json: "[3]",
            id: None,
        },
    ];
    let r = http.publish_batch(&events).await.unwrap();
    assert_eq!(
        seqs(&r),
        vec![
            ("sdk:1".into(), 1, false),
            ("sdk:2".into(), 1, false),
            ("sdk:1".into(), 2, false)
        ]
    );
    let again = http.publish_batch(&events[..1]).await.unwrap();
    assert_eq!(seqs(&again), vec![("sdk:1".into(), 1, true)]);
    let reused = [BatchEvent {
        stream: "sdk:1",
        data_json: "9",
        id: Some("a"),
    }];
    let r = http.publish_batch(&reused).await.unwrap();
    assert_eq!(seqs(&r), vec![("IDEMPOTENCY_KEY_REUSED".into(), 0, false)]);
    let r = http
        .broadcast(&["sdk:1", "sdk:3"], r#""all""#)
        .await
        .unwrap();
    assert_eq!(
        seqs(&r),
        vec![("sdk:1".into(), 3, false), ("sdk:3".into(), 1, false)]
    );

    let page = http.history("sdk:1", History::Before(3), 10).await.unwrap();
    assert_eq!(page.order, "desc");
    let got: Vec<u64> = page.events.iter().map(|e| e.seq).collect();
    assert_eq!(got, vec![2, 1]);
    let last = http.history("sdk:1", History::Last, 1).await.unwrap();
    assert_eq!(last.events[0].seq, 3);
    let e = http
        .history("sdk:1", History::Before(9), 1)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("ACK_BEYOND_HEAD"));

    for want in 1..=3 {
        assert_eq!(next(&mut sub).await, Some(want));
    }
    let closed = http.close_stream("sdk:1").await.unwrap();
    assert_eq!(closed.last_seq, 3);
    assert_eq!(
        next(&mut sub).await,
        None,
        "the subscription ends, no error"
    );
    assert_eq!(sub.closed(), Some(3));
    let e = http.publish("sdk:1", "4", None).await.unwrap_err();
    assert_eq!(e.code(), Some("STREAM_CLOSED"));

    let before = http.stream_info("sdk:2").await.unwrap();
    let deleted = http.delete_stream("sdk:2").await.unwrap();
    assert_ne!(deleted.epoch, before.epoch);
    let info = http.stream_info("sdk:2").await.unwrap();
    assert_eq!((info.head_seq, info.epoch), (0, deleted.epoch));
    let e = http.delete_stream("sdk:none").await.unwrap_err();
    assert_eq!(e.code(), Some("NOT_FOUND"));
    client.close().await;
}
