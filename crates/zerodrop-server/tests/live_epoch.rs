//! A live subscriber learns of a recreated log through the live path itself: when the first
//! event of a new epoch reaches its topic, or when the store it reads from reports a new epoch
//! after a reset — never by waiting until the new epoch's seqs pass its old cursor.

use std::sync::Arc;

use zerodrop_core::{Retention, Seq, StreamId};
use zerodrop_server::live::{Fault, Hub, HubLimits, Signal};
use zerodrop_server::metrics::Metrics;
use zerodrop_store::{AppendRequest, LiveSink, MemoryStore, NoSink, Store};

async fn append(store: &dyn Store, stream: &StreamId, n: u64) {
    for i in 0..n {
        let req = AppendRequest {
            stream: stream.clone(),
            data: i.to_string(),
            idempotency: None,
        };
        store.append(req).await.expect("append");
    }
}

fn hub() -> Arc<Hub> {
    Arc::new(Hub::new(HubLimits::default(), Arc::new(Metrics::new())))
}

#[tokio::test]
async fn an_event_of_a_new_epoch_surfaces_epoch_changed_at_once() {
    let hub = hub();
    let stream = StreamId::new("room:1").unwrap();
    // The old incarnation: 50 events, the subscriber has all of them.
    let old = MemoryStore::new(Retention::default(), hub.clone());
    append(&old, &stream, 50).await;
    let old_epoch = old.stream_info(&stream).await.unwrap().epoch;
    let signal = Signal::new();
    let mut sub = hub.subscribe(
        stream.clone(),
        old_epoch.clone(),
        Seq(50),
        signal.clone(),
        None,
    );
    let mut out = Vec::new();
    assert_eq!(sub.pull(&old, 100, &mut out).await.unwrap(), 0);
    assert!(out.is_empty());

    // The log is recreated (e.g. Redis restarted empty) and its first event arrives live.
    let new = MemoryStore::new(Retention::default(), Arc::new(NoSink));
    append(&new, &stream, 1).await;
    let first = new.read(&stream, Seq(0), 10).await.unwrap().events;
    let new_epoch = first[0].epoch().clone();
    assert_ne!(new_epoch, old_epoch);
    hub.committed(&first);

    // Seq 1 is far below the cursor (50): the ring alone would call the cursor caught up.
    match sub.pull(&new, 100, &mut out).await {
        Err(Fault::EpochChanged { current }) => assert_eq!(current, new_epoch),
        other => panic!("expected EpochChanged, got {other:?}"),
    }
    assert!(out.is_empty(), "nothing of the new epoch is delivered");
}

#[tokio::test]
async fn a_reset_makes_subscribers_ask_the_store_which_reports_the_new_epoch() {
    let hub = hub();
    let stream = StreamId::new("room:2").unwrap();
    let old = MemoryStore::new(Retention::default(), hub.clone());
    append(&old, &stream, 5).await;
    let old_epoch = old.stream_info(&stream).await.unwrap().epoch;
    let signal = Signal::new();
    let mut sub = hub.subscribe(stream.clone(), old_epoch, Seq(5), signal.clone(), None);
    let mut out = Vec::new();
    sub.pull(&old, 100, &mut out).await.unwrap();

    // The feed had a gap, and the store now holds a new, empty incarnation.
    hub.reset();
    let new = MemoryStore::new(Retention::default(), Arc::new(NoSink));
    match sub.pull(&new, 100, &mut out).await {
        Err(Fault::EpochChanged { current }) => {
            assert_eq!(current, new.stream_info(&stream).await.unwrap().epoch)
        }
        other => panic!("expected EpochChanged, got {other:?}"),
    }
}
