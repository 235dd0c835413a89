//! What only the `redis` store has to get right: outages, restarts with and without data, a
//! log that goes back, several instances sharing the live path, pub/sub reconnects and `WAIT`,
//! and the durability level read from Redis's own settings (`redis/durability.rs`).
//! Every test runs its own `redis-server` processes; every wait is bounded.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use zerodrop_core::clock::ManualClock;
use zerodrop_core::retention::Retention;
use zerodrop_core::window::{WindowError, replay_window};
use zerodrop_core::{Epoch, Event, Grants, Seq, SessionId, StreamId, now_ms};
use zerodrop_store::{
    AppendRequest, BatchItem, IdempotencyKey, LiveSink, MemoryStore, NoSink, RedisOptions,
    RedisStore, SessionCap, SessionRecord, SessionStream, Store, StoreError, StreamBatch,
};
use zerodrop_testkit::redis::{RedisCluster, RedisConfig, RedisServer};
use zerodrop_testkit::sink::{Recorder, wait_until};

#[path = "redis/durability.rs"]
mod durability;
#[path = "redis/guard.rs"]
mod guard;

fn sid(s: &str) -> StreamId {
    StreamId::new(s).unwrap()
}

fn req(stream: &str, data: &str) -> AppendRequest {
    AppendRequest {
        stream: sid(stream),
        data: data.into(),
        idempotency: None,
    }
}

fn big() -> Retention {
    Retention {
        max_events: 1_000_000,
        max_bytes: 1 << 40,
        max_age_ms: 86_400_000,
    }
}

async fn connect(server: &RedisServer, sink: Arc<dyn LiveSink>) -> RedisStore {
    let mut opts = RedisOptions::new(&server.url());
    opts.retention = big();
    opts.every_stream = true;
    RedisStore::connect(opts, sink).await.unwrap()
}

/// Retries `f` until it succeeds, for at most `limit`.
async fn eventually<T, F, Fut>(limit: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let deadline = Instant::now() + limit;
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "still failing after {limit:?}: {e}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

fn session(id: &SessionId, stream: &str, epoch: &Epoch, ack: u64) -> SessionRecord {
    SessionRecord {
        id: id.clone(),
        sub: "u1".into(),
        grants: Grants {
            streams: vec!["*".into()],
            publish: vec![],
            info: None,
        },
        created_at_ms: now_ms(),
        expires_at_ms: now_ms() + 900_000,
        streams: [(
            sid(stream),
            SessionStream {
                epoch: epoch.clone(),
                ack: Seq(ack),
                dropped_through: Seq(0),
            },
        )]
        .into_iter()
        .collect(),
    }
}

/// Watches `stream` and waits until its feed flows (the sink is told it `missed` events).
async fn watch_until_heard(store: &RedisStore, sink: &Recorder, stream: &str) {
    store.watch(&sid(stream));
    wait_until(Duration::from_secs(5), "the stream's feed", || {
        sink.was_missed(stream)
    })
    .await;
}

/// Without `every_stream`, the sink hears the events of the watched streams only, from every
/// instance, starting once the stream's channel is subscribed (told as `missed`), stopping at
/// `unwatch`; after the live connection is lost and back, the watched streams are heard again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sink_hears_the_events_of_the_watched_streams_only() {
    let mut server = RedisServer::start_durable().unwrap();
    let mut opts = RedisOptions::new(&server.url());
    opts.retention = big();
    let other = RedisStore::connect(opts.clone(), Arc::new(NoSink))
        .await
        .unwrap();
    let sink = Arc::new(Recorder::default());
    let store = RedisStore::connect(opts, sink.clone()).await.unwrap();
    let heard = |s: &str| sink.seqs_of(s);
    // Not watched: neither this instance's appends nor another's reach the sink.
    store.append(req("w:1", "1")).await.unwrap();
    other.append(req("w:1", "2")).await.unwrap();

    watch_until_heard(&store, &sink, "w:1").await;
    other.append(req("w:1", "3")).await.unwrap();
    store.append(req("w:1", "4")).await.unwrap();
    wait_until(Duration::from_secs(5), "seqs 3 and 4", || {
        heard("w:1").len() == 2
    })
    .await;
    assert_eq!(
        heard("w:1"),
        vec![3, 4],
        "only what came after the feed started"
    );

    // Let go of w:1, watch w:2: one connection hears both channels in publication order, so
    // once w:2's event is heard, an event of w:1 published before it would have been too.
    store.unwatch(&sid("w:1"));
    watch_until_heard(&store, &sink, "w:2").await;
    other.append(req("w:1", "5")).await.unwrap();
    other.append(req("w:2", "1")).await.unwrap();
    wait_until(Duration::from_secs(5), "w:2's seq 1", || {
        heard("w:2") == vec![1]
    })
    .await;
    assert_eq!(heard("w:1"), vec![3, 4], "w:1 is no longer heard");
    // Watching twice changes nothing; the store's own appends are heard like another's.
    store.watch(&sid("w:2"));
    store.append(req("w:2", "2")).await.unwrap();
    wait_until(Duration::from_secs(5), "w:2's seq 2", || {
        heard("w:2") == vec![1, 2]
    })
    .await;

    // The live connection drops and comes back: the sink is reset, and the watched stream
    // is heard again without being watched anew.
    server.stop().unwrap();
    server.start_again().unwrap();
    wait_until(Duration::from_secs(10), "a reset", || {
        sink.resets.load(Ordering::SeqCst) >= 1 && store.live_connected()
    })
    .await;
    eventually(Duration::from_secs(10), || other.append(req("w:2", "3"))).await;
    wait_until(Duration::from_secs(5), "w:2's seq 3", || {
        heard("w:2") == vec![1, 2, 3]
    })
    .await;
    assert_eq!(heard("w:1"), vec![3, 4]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_fails_fast_and_a_restart_with_data_continues_the_log() {
    let mut server = RedisServer::start_durable().unwrap();
    let sink = Arc::new(Recorder::default());
    let store = connect(&server, sink.clone()).await;
    for i in 1..=5u64 {
        assert_eq!(
            store
                .append(req("room:1", &i.to_string()))
                .await
                .unwrap()
                .seq,
            Seq(i)
        );
    }
    let epoch = store.stream_info(&sid("room:1")).await.unwrap().epoch;

    server.stop().unwrap();
    let outage = Instant::now();
    let mut failures = 0;
    while outage.elapsed() < Duration::from_secs(3) {
        let started = Instant::now();
        match store.append(req("room:1", "\"lost?\"")).await {
            Err(StoreError::Unavailable(_)) => failures += 1,
            other => panic!("an append while Redis is down answered {other:?}"),
        }
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "an append took {:?}",
            started.elapsed()
        );
        assert!(store.ping().await.is_err());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(failures >= 3);

    server.start_again().unwrap();
    let o = eventually(Duration::from_secs(10), || store.append(req("room:1", "6"))).await;
    assert_eq!(
        (o.seq, &o.epoch),
        (Seq(6), &epoch),
        "same log, same epoch, no gap"
    );
    eventually(Duration::from_secs(5), || store.ping()).await;
    let r = store.read(&sid("room:1"), Seq(0), 100).await.unwrap();
    assert_eq!(
        r.events.iter().map(|e| e.seq().0).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5, 6]
    );
    assert_eq!(r.events[5].data(), "6");
    assert_eq!(r.info.epoch, epoch);
    // The live path came back too, and told the sink to re-read what it may have missed.
    wait_until(Duration::from_secs(10), "the live path", || {
        store.live_connected()
    })
    .await;
    assert!(sink.resets.load(Ordering::SeqCst) >= 1);
    let o = store.append(req("room:1", "7")).await.unwrap();
    assert_eq!(o.seq, Seq(7));
    wait_until(Duration::from_secs(5), "seq 7 on the live path", || {
        sink.seqs_of("room:1").last() == Some(&7)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_started_while_redis_is_down_works_once_it_is_up() {
    let mut server = RedisServer::start().unwrap();
    server.stop().unwrap();
    let sink = Arc::new(Recorder::default());
    let started = Instant::now();
    let store = connect(&server, sink.clone()).await;
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(!store.live_connected());
    assert!(matches!(
        store.append(req("room:1", "1")).await,
        Err(StoreError::Unavailable(_))
    ));
    assert!(store.ping().await.is_err());
    server.start_again().unwrap();
    let o = eventually(Duration::from_secs(10), || store.append(req("room:1", "1"))).await;
    assert_eq!(o.seq, Seq(1));
    wait_until(Duration::from_secs(10), "the live path", || {
        store.live_connected()
    })
    .await;
    store.append(req("room:1", "2")).await.unwrap();
    wait_until(Duration::from_secs(5), "seq 2 on the live path", || {
        sink.seqs_of("room:1").last() == Some(&2)
    })
    .await;
    // A session with more streams than one Lua call can unpack.
    let epoch = o.epoch;
    let id = SessionId::generate();
    let mut s = session(&id, "room:1", &epoch, 0);
    for i in 0..5000 {
        let st = SessionStream {
            epoch: epoch.clone(),
            ack: Seq(0),
            dropped_through: Seq(0),
        };
        s.streams.insert(sid(&format!("many:{i}")), st);
    }
    store.create_session(s).await.unwrap();
    assert_eq!(
        store
            .load_session(&id)
            .await
            .unwrap()
            .unwrap()
            .streams
            .len(),
        5001
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_without_data_renews_epochs_and_forgets_sessions() {
    let mut server = RedisServer::start().unwrap();
    let store = connect(&server, Arc::new(NoSink)).await;
    for i in 1..=5u64 {
        store.append(req("room:1", &i.to_string())).await.unwrap();
    }
    let old = store.stream_info(&sid("room:1")).await.unwrap();
    let never_written = store.stream_info(&sid("room:quiet")).await.unwrap();
    assert_eq!(never_written.epoch, old.epoch);
    let id = SessionId::generate();
    store
        .create_session(session(&id, "room:1", &old.epoch, 3))
        .await
        .unwrap();
    assert!(store.load_session(&id).await.unwrap().is_some());

    server.restart_empty().unwrap();
    let loaded = eventually(Duration::from_secs(10), || store.load_session(&id)).await;
    assert!(loaded.is_none(), "SESSION_NOT_FOUND after the data is gone");
    let info = store.stream_info(&sid("room:1")).await.unwrap();
    assert_ne!(info.epoch, old.epoch, "a lost log must get a new epoch");
    assert_eq!((info.head, info.count), (Seq(0), 0));
    assert!(matches!(
        replay_window(Seq(3), Some(&old.epoch), &info.bounds()),
        Err(WindowError::EpochChanged { .. })
    ));
    // Streams never written to move to the new epoch too, and stay stable there.
    let quiet = store.stream_info(&sid("room:quiet")).await.unwrap();
    assert_ne!(quiet.epoch, old.epoch);
    assert_eq!(quiet.epoch, info.epoch);
    let o = store.append(req("room:1", "1")).await.unwrap();
    assert_eq!((o.seq, &o.epoch), (Seq(1), &info.epoch));
    assert!(matches!(
        store.checkpoint(&id, &sid("room:1"), Seq(1)).await,
        Err(StoreError::SessionNotFound)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_that_went_back_or_lost_its_bounds_gets_a_new_epoch() {
    let server = RedisServer::start().unwrap();
    let sink = Arc::new(Recorder::default());
    let store = connect(&server, sink.clone()).await;
    for i in 1..=10u64 {
        store.append(req("room:1", &i.to_string())).await.unwrap();
    }
    let before = store.stream_info(&sid("room:1")).await.unwrap();
    // What a failover to a replica that missed the last writes looks like.
    assert_eq!(
        server.cmd(&["HSET", "zd:{room:1}:m", "head", "7"]).unwrap(),
        ":0"
    );
    let after = store.stream_info(&sid("room:1")).await.unwrap();
    assert_ne!(after.epoch, before.epoch);
    assert_eq!(
        (after.head, after.first_seq, after.count),
        (Seq(0), Seq(1), 0)
    );
    let o = store.append(req("room:1", "\"again\"")).await.unwrap();
    assert_eq!((o.seq, &o.epoch), (Seq(1), &after.epoch));
    wait_until(Duration::from_secs(5), "a reset", || {
        sink.resets.load(Ordering::SeqCst) >= 1
    })
    .await;

    // Bounds gone while the events are still there (e.g. evicted): not trusted either.
    for _ in 0..3 {
        store.append(req("room:2", "1")).await.unwrap();
    }
    let before = store.stream_info(&sid("room:2")).await.unwrap();
    assert_eq!(server.cmd(&["DEL", "zd:{room:2}:m"]).unwrap(), ":1");
    let after = store.stream_info(&sid("room:2")).await.unwrap();
    assert_ne!(after.epoch, before.epoch);
    assert_eq!(after.head, Seq(0));
    assert!(
        store
            .read(&sid("room:2"), Seq(0), 10)
            .await
            .unwrap()
            .events
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_instance_sees_every_append_in_order() {
    let server = RedisServer::start().unwrap();
    let sink_a = Arc::new(Recorder::default());
    let sink_b = Arc::new(Recorder::default());
    let a = Arc::new(connect(&server, sink_a.clone()).await);
    let b = Arc::new(connect(&server, sink_b.clone()).await);
    let mut tasks = Vec::new();
    for (n, store) in [a.clone(), b.clone(), a.clone(), b.clone()]
        .into_iter()
        .enumerate()
    {
        tasks.push(tokio::spawn(async move {
            for i in 0..50 {
                store
                    .append(req("room:shared", &format!("[{n},{i}]")))
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let all: Vec<u64> = (1..=200).collect();
    wait_until(Duration::from_secs(5), "both sinks", || {
        sink_a.seqs_of("room:shared").len() == 200 && sink_b.seqs_of("room:shared").len() == 200
    })
    .await;
    assert_eq!(sink_a.seqs_of("room:shared"), all);
    assert_eq!(sink_b.seqs_of("room:shared"), all);
    // Any instance reads what another wrote, with the same bytes.
    let ra = a.read(&sid("room:shared"), Seq(190), 100).await.unwrap();
    let rb = b.read(&sid("room:shared"), Seq(190), 100).await.unwrap();
    assert_eq!(ra.events.len(), 10);
    for (x, y) in ra.events.iter().zip(&rb.events) {
        assert_eq!(x.json(), y.json());
    }
    // Sessions too.
    let id = SessionId::generate();
    a.create_session(session(&id, "room:shared", &ra.info.epoch, 0))
        .await
        .unwrap();
    assert_eq!(
        b.checkpoint(&id, &sid("room:shared"), Seq(150))
            .await
            .unwrap()
            .last_ack(),
        Seq(150)
    );
    assert_eq!(
        a.load_session(&id).await.unwrap().unwrap().streams[&sid("room:shared")].ack,
        Seq(150)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_subscription_resets_the_sink_and_live_delivery_resumes() {
    let server = RedisServer::start().unwrap();
    let sink = Arc::new(Recorder::default());
    let store = connect(&server, sink.clone()).await;
    store.append(req("room:1", "1")).await.unwrap();
    assert_eq!(sink.resets.load(Ordering::SeqCst), 0);
    let killed = server.cmd(&["CLIENT", "KILL", "TYPE", "pubsub"]).unwrap();
    assert_eq!(killed, ":1");
    wait_until(Duration::from_secs(5), "a reset", || {
        sink.resets.load(Ordering::SeqCst) == 1
    })
    .await;
    wait_until(Duration::from_secs(5), "the live path", || {
        store.live_connected()
    })
    .await;
    store.append(req("room:1", "2")).await.unwrap();
    // The sink hears of an append right after it is answered.
    wait_until(Duration::from_secs(5), "seq 2 on the live path", || {
        sink.seqs_of("room:1") == vec![1, 2]
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_replicas_refuses_to_acknowledge_what_no_replica_holds() {
    let primary = RedisServer::start().unwrap();
    let mut opts = RedisOptions::new(&primary.url());
    opts.wait_replicas = 1;
    opts.wait_timeout = Duration::from_millis(300);
    let store = RedisStore::connect(opts, Arc::new(NoSink)).await.unwrap();
    let started = Instant::now();
    match store.append(req("room:1", "1")).await {
        Err(StoreError::Unavailable(msg)) => assert!(msg.contains("0 of 1"), "{msg}"),
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    // The event is in the primary's log, but reads show confirmed events only (a failover
    // may take this one back); they are not held up by the waiting connection either.
    assert_eq!(primary.cmd(&["XLEN", "zd:{room:1}:l"]).unwrap(), ":1");
    assert_eq!(
        store.stream_info(&sid("room:1")).await.unwrap().head,
        Seq(0)
    );
    let r = store.read(&sid("room:1"), Seq(0), 10).await.unwrap();
    assert_eq!((r.info.head, r.events.len()), (Seq(0), 0));

    // With a replica attached, the same append is acknowledged.
    let _replica = RedisServer::start_with(RedisConfig {
        replica_of: Some(primary.port()),
        ..RedisConfig::default()
    })
    .unwrap();
    let o = eventually(Duration::from_secs(15), || store.append(req("room:1", "2"))).await;
    assert!(o.seq >= Seq(2));
}

/// A retry with the same `Idempotency-Key` is a duplicate, and its answer promises the same
/// thing as the first: the event is held by the replicas. Without one it is refused again;
/// once a replica holds the original, the retry is acknowledged as the duplicate it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_replicas_refuses_a_duplicate_until_a_replica_holds_the_original() {
    let primary = RedisServer::start().unwrap();
    let mut opts = RedisOptions::new(&primary.url());
    opts.wait_replicas = 1;
    opts.wait_timeout = Duration::from_millis(300);
    let store = RedisStore::connect(opts.clone(), Arc::new(NoSink))
        .await
        .unwrap();
    let mut keyed = req("room:1", "\"pay\"");
    keyed.idempotency = Some(zerodrop_store::IdempotencyKey {
        key: "k1".into(),
        fingerprint: [7; 32],
    });
    for attempt in 0..2 {
        match store.append(keyed.clone()).await {
            Err(StoreError::Unavailable(msg)) => {
                assert!(msg.contains("0 of 1"), "attempt {attempt}: {msg}");
            }
            other => panic!("attempt {attempt}: expected Unavailable, got {other:?}"),
        }
    }
    // Another instance (its own connections) is refused the same way.
    let other = RedisStore::connect(opts, Arc::new(NoSink)).await.unwrap();
    match other.append(keyed.clone()).await {
        Err(StoreError::Unavailable(msg)) => assert!(msg.contains("0 of 1"), "{msg}"),
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert_eq!(
        primary.cmd(&["XLEN", "zd:{room:1}:l"]).unwrap(),
        ":1",
        "stored once, however often retried"
    );
    assert_eq!(
        store.stream_info(&sid("room:1")).await.unwrap().head,
        Seq(0),
        "not shown before a replica holds it"
    );

    let _replica = RedisServer::start_with(RedisConfig {
        replica_of: Some(primary.port()),
        ..RedisConfig::default()
    })
    .unwrap();
    let o = eventually(Duration::from_secs(15), || other.append(keyed.clone())).await;
    assert_eq!((o.seq, o.duplicate), (Seq(1), true));
    // The first instance too; its own WAIT may still time out once on a loaded machine (a
    // replica acknowledges within the 300 ms bound only when it gets the CPU), so retried.
    let o = eventually(Duration::from_secs(15), || store.append(keyed.clone())).await;
    assert_eq!((o.seq, o.duplicate), (Seq(1), true));
}

/// With `WAIT`, no instance hears of an event before the replicas hold it: a refused
/// append rings no doorbell; a confirmed one (a retry included) rings it for everything up to
/// it, and concurrent appends of two instances reach every sink once each, in seq order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_wait_replicas_events_go_live_only_once_replicated() {
    let primary = RedisServer::start().unwrap();
    let mut opts = RedisOptions::new(&primary.url());
    opts.wait_replicas = 1;
    opts.wait_timeout = Duration::from_millis(300);
    opts.every_stream = true;
    let sinks = [Arc::new(Recorder::default()), Arc::new(Recorder::default())];
    let a = RedisStore::connect(opts.clone(), sinks[0].clone())
        .await
        .unwrap();
    let b = RedisStore::connect(opts, sinks[1].clone()).await.unwrap();
    let mut keyed = req("live:1", "\"first\"");
    keyed.idempotency = Some(zerodrop_store::IdempotencyKey {
        key: "k".into(),
        fingerprint: [3; 32],
    });
    assert!(matches!(
        a.append(keyed.clone()).await,
        Err(StoreError::Unavailable(_))
    ));
    // In the log, but neither on the live path nor shown by reads.
    assert_eq!(primary.cmd(&["XLEN", "zd:{live:1}:l"]).unwrap(), ":1");
    assert_eq!(a.stream_info(&sid("live:1")).await.unwrap().head, Seq(0));
    tokio::time::sleep(Duration::from_millis(500)).await;
    for s in &sinks {
        assert!(s.seqs_of("live:1").is_empty(), "{:?}", s.seqs_of("live:1"));
    }

    let _replica = RedisServer::start_with(RedisConfig {
        replica_of: Some(primary.port()),
        ..RedisConfig::default()
    })
    .unwrap();
    let o = eventually(Duration::from_secs(15), || b.append(keyed.clone())).await;
    assert_eq!((o.seq, o.duplicate), (Seq(1), true));
    // Confirmed: shown by reads on every instance.
    for store in [&a, &b] {
        let r = store.read(&sid("live:1"), Seq(0), 10).await.unwrap();
        assert_eq!((r.info.head, r.events.len()), (Seq(1), 1));
    }
    for s in &sinks {
        wait_until(Duration::from_secs(5), "seq 1 live once confirmed", || {
            s.seqs_of("live:1") == vec![1]
        })
        .await;
    }

    // Both instances append at once: every sink gets 2..=41 once each, in order.
    let (ra, rb) = tokio::join!(
        async {
            for i in 0..20 {
                a.append(req("live:1", &i.to_string())).await?;
            }
            Ok::<_, StoreError>(())
        },
        async {
            for i in 0..20 {
                b.append(req("live:1", &i.to_string())).await?;
            }
            Ok::<_, StoreError>(())
        }
    );
    ra.unwrap();
    rb.unwrap();
    for s in &sinks {
        wait_until(Duration::from_secs(5), "every seq live", || {
            s.seqs_of("live:1").len() >= 41
        })
        .await;
        assert_eq!(s.seqs_of("live:1"), (1..=41).collect::<Vec<_>>());
    }
}

/// A store pointed at a replica (what a single URL becomes when a failover demotes its
/// master): it is not ready, writes answer `Unavailable` (an outage, not a refusal), reads
/// still work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_replica_is_an_outage_for_writes_and_readiness() {
    let primary = RedisServer::start().unwrap();
    let writer = connect(&primary, Arc::new(NoSink)).await;
    writer.append(req("ro:1", "1")).await.unwrap();
    writer.ping().await.unwrap();
    let replica = RedisServer::start_with(RedisConfig {
        replica_of: Some(primary.port()),
        ..RedisConfig::default()
    })
    .unwrap();
    let store = connect(&replica, Arc::new(NoSink)).await;
    let info = eventually(Duration::from_secs(15), || async {
        let i = store.stream_info(&sid("ro:1")).await?;
        if i.head == Seq(1) {
            Ok(i)
        } else {
            Err(StoreError::Unavailable("not replicated yet".into()))
        }
    })
    .await;
    assert_eq!(info.count, 1);
    match store.ping().await {
        Err(StoreError::Unavailable(msg)) => assert!(msg.contains("replica"), "{msg}"),
        other => panic!("a replica is not ready: {other:?}"),
    }
    match store.append(req("ro:1", "2")).await {
        Err(StoreError::Unavailable(msg)) => assert!(
            msg.contains("READONLY") || msg.contains("ReadOnly"),
            "{msg}"
        ),
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert_eq!(writer.stream_info(&sid("ro:1")).await.unwrap().head, Seq(1));
}

/// The append script's trimming is `plan_trim` evaluated in Lua: it must agree with the memory
/// store (which calls `plan_trim`) on every bound, for events of varied sizes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trimming_agrees_with_plan_trim() {
    let server = RedisServer::start().unwrap();
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    for case in 0..6 {
        let retention = Retention {
            max_events: 1 + next(12),
            max_bytes: 200 + next(2_000),
            max_age_ms: 86_400_000,
        };
        let mut opts = RedisOptions::new(&server.url());
        opts.retention = retention;
        opts.every_stream = true;
        let redis_sink = Arc::new(Recorder::default());
        let memory_sink = Arc::new(Recorder::default());
        let redis = RedisStore::connect(opts, redis_sink.clone()).await.unwrap();
        let memory = MemoryStore::new(retention, memory_sink.clone());
        let stream = format!("case:{case}");
        for _ in 0..40 {
            let data = format!("\"{}\"", "x".repeat(next(400) as usize));
            redis.append(req(&stream, &data)).await.unwrap();
            memory.append(req(&stream, &data)).await.unwrap();
            let r = redis.stream_info(&sid(&stream)).await.unwrap();
            let m = memory.stream_info(&sid(&stream)).await.unwrap();
            assert_eq!(
                (r.head, r.first_seq, r.count, r.bytes),
                (m.head, m.first_seq, m.count, m.bytes),
                "{retention:?}"
            );
        }
        let trimmed = |s: &Recorder| s.trims.lock().unwrap().iter().map(|t| t.2).sum::<u64>();
        wait_until(Duration::from_secs(5), "trim notices", || {
            trimmed(&redis_sink) == trimmed(&memory_sink)
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_events_are_exactly_the_encoded_events() {
    let server = RedisServer::start().unwrap();
    let store = connect(&server, Arc::new(NoSink)).await;
    let datas = [
        "{\"a\":[1,2,{\"b\":\"c|d\"}]}",
        "\"\\u00e9 é 😀\"",
        "null",
        "-1.5e3",
    ];
    for d in datas {
        store.append(req("enc", d)).await.unwrap();
    }
    let r = store.read(&sid("enc"), Seq(0), 10).await.unwrap();
    for (e, d) in r.events.iter().zip(datas) {
        let expected = Event::encode(e.stream().clone(), e.seq(), e.epoch().clone(), e.ts(), d);
        assert_eq!(e.json(), expected.json());
        assert_eq!(e.data(), d);
        let v: serde_json::Value = serde_json::from_slice(e.json()).unwrap();
        assert_eq!(v["epoch"], r.info.epoch.as_str());
    }
    let ts: Vec<u64> = r.events.iter().map(|e| e.ts()).collect();
    assert!(ts.windows(2).all(|w| w[0] <= w[1]));
    assert!(ts[0].abs_diff(now_ms()) < 60_000);
}

/// Events are stamped on the Redis server's clock, not the instance's: the instance measures
/// the offset between the two and sends its estimate with each append (`redis/clock.rs`). A
/// stream's stamps never go back: an append after a stamp from the future takes that stamp,
/// and a stamp of another length is compared as a number.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_are_stamped_on_the_redis_clock_and_never_go_back() {
    let server = RedisServer::start().unwrap();
    // This instance's time line is an hour behind the Redis server's clock (the same machine's).
    let hour = 3_600_000u64;
    let mut opts = RedisOptions::new(&server.url());
    opts.retention = big();
    opts.clock = Arc::new(ManualClock::new(now_ms() - hour));
    let store = RedisStore::connect(opts, Arc::new(NoSink)).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let offset = loop {
        if let Some(o) = store.clock_offset_ms() {
            break o;
        }
        assert!(Instant::now() < deadline, "no clock offset measured");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(offset.abs_diff(hour as i64) < 10_000, "{offset}");
    let stamps = || async { store.read(&sid("clock"), Seq(0), 10).await.unwrap().events };
    store.append(req("clock", "1")).await.unwrap();
    let first = stamps().await[0].ts();
    assert!(first.abs_diff(now_ms()) < 10_000, "{first}");
    // A stamp an hour ahead (another instance's, or Redis's clock stepped back since).
    let ahead = now_ms() + hour;
    server
        .cmd(&["HSET", "zd:{clock}:m", "ts", &ahead.to_string()])
        .unwrap();
    store.append(req("clock", "2")).await.unwrap();
    // A shorter stamp is an older one, whatever its first digits.
    server
        .cmd(&["HSET", "zd:{clock}:m", "ts", "999999"])
        .unwrap();
    store.append(req("clock", "3")).await.unwrap();
    let ts: Vec<u64> = stamps().await.iter().map(|e| e.ts()).collect();
    assert_eq!(ts[..2], [first, ahead]);
    assert!(ts[2].abs_diff(now_ms()) < 10_000, "{ts:?}");
}

/// On a single server a batch's parts go together, in calls of at most 256 items: a batch
/// larger than that (a part of 200 items, one of 100, a refused one, one of 300 alone in its
/// call, one with a duplicate) answers each part exactly as the memory store does (whole, contiguous, in request
/// order, or refused whole: a closed stream, a key reused with another body), stores exactly
/// that, and every new event reaches the live sink once, in seq order per stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_over_several_calls_answers_each_part_as_the_memory_store_does() {
    let server = RedisServer::start().unwrap();
    let sink = Arc::new(Recorder::default());
    let redis = connect(&server, sink.clone()).await;
    let memory = MemoryStore::new(big(), Arc::new(NoSink));
    let key = |k: &str, body: u8| IdempotencyKey {
        key: k.into(),
        fingerprint: [body; 32],
    };
    let item = |i: usize, idempotency: Option<IdempotencyKey>| BatchItem {
        data: format!("{{\"i\":{i}}}"),
        idempotency,
    };
    let part = |stream: &str, items: Vec<BatchItem>| StreamBatch {
        stream: sid(stream),
        items,
    };
    for store in [&redis as &dyn Store, &memory] {
        store.append(req("b:closed", "1")).await.unwrap();
        store.close_stream(&sid("b:closed")).await.unwrap();
        let first = vec![part("b:keys", vec![item(0, Some(key("k", 1)))])];
        store.append_batch(first).await.unwrap().remove(0).unwrap();
    }
    let batch = vec![
        part("b:a", (0..200).map(|i| item(i, None)).collect()),
        part("b:b", (0..100).map(|i| item(i, None)).collect()),
        part("b:closed", vec![item(0, None)]),
        part("b:c", (0..300).map(|i| item(i, None)).collect()),
        part("b:keys", vec![item(1, None), item(2, Some(key("k", 2)))]),
        part(
            "b:more",
            vec![
                item(3, Some(key("k2", 1))),
                item(3, Some(key("k2", 1))),
                item(4, None),
            ],
        ),
    ];
    let got = redis.append_batch(batch.clone()).await.unwrap();
    let want = memory.append_batch(batch).await.unwrap();
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        match (g, w) {
            (Ok(g), Ok(w)) => {
                let view = |o: &[zerodrop_store::AppendOutcome]| {
                    o.iter()
                        .map(|o| (o.stream.to_string(), o.seq.0, o.duplicate))
                        .collect::<Vec<_>>()
                };
                assert_eq!(view(g), view(w), "part {i}");
            }
            (Err(g), Err(w)) => assert_eq!(g, w, "part {i}"),
            _ => panic!("part {i}: redis {g:?}, memory {w:?}"),
        }
    }
    assert!(matches!(got[2], Err(StoreError::StreamClosed { .. })));
    assert!(matches!(got[4], Err(StoreError::IdempotencyKeyReused)));
    for stream in ["b:a", "b:b", "b:c", "b:keys", "b:more", "b:closed"] {
        let r = redis.read(&sid(stream), Seq(0), 1_000).await.unwrap();
        let m = memory.read(&sid(stream), Seq(0), 1_000).await.unwrap();
        let datas = |r: &zerodrop_store::ReadResult| {
            r.events
                .iter()
                .map(|e| (e.seq().0, e.data().to_string()))
                .collect::<Vec<_>>()
        };
        assert_eq!(datas(&r), datas(&m), "{stream}");
        assert_eq!(r.info.head, m.info.head, "{stream}");
    }
    // 1 + 1 before the batch, then 200 + 100 + 300 + 2 (the repeated key adds nothing).
    wait_until(Duration::from_secs(5), "every event live", || {
        sink.committed.lock().unwrap().len() == 604
    })
    .await;
    for stream in ["b:a", "b:b", "b:c", "b:keys", "b:more"] {
        let head = redis.stream_info(&sid(stream)).await.unwrap().head.0;
        assert_eq!(
            sink.seqs_of(stream),
            (1..=head).collect::<Vec<_>>(),
            "{stream}"
        );
    }
}

/// Single appends made at the same time (many in flight on the multiplexed connection) each
/// answer what they would have answered alone: seqs 1..=n per stream, each once; a key sent
/// twenty times at once appended once and the others its duplicates; a reused key and a closed stream refused without touching their neighbours;
/// every event live once, in seq order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_single_appends_answer_as_one_at_a_time() {
    let server = RedisServer::start().unwrap();
    let sink = Arc::new(Recorder::default());
    let redis = connect(&server, sink.clone()).await;
    let keyed = |stream: &str, data: &str, k: &str, body: u8| AppendRequest {
        idempotency: Some(IdempotencyKey {
            key: k.into(),
            fingerprint: [body; 32],
        }),
        ..req(stream, data)
    };
    redis.append(req("g:closed", "0")).await.unwrap();
    redis.close_stream(&sid("g:closed")).await.unwrap();
    redis.append(keyed("g:keys", "0", "k", 1)).await.unwrap();
    let mut reqs = Vec::new();
    for i in 0..100 {
        for s in 0..4 {
            reqs.push(req(&format!("g:{s}"), &format!("{{\"i\":{i}}}")));
        }
        if i % 5 == 0 {
            reqs.push(keyed("g:keys", "1", "once", 7));
            reqs.push(req("g:closed", "1"));
            reqs.push(keyed("g:keys", "2", "k", 2));
        }
    }
    let outcomes = futures_util::future::join_all(reqs.into_iter().map(|r| redis.append(r))).await;
    let (mut seqs, mut once, mut closed, mut reused) = (Vec::new(), Vec::new(), 0, 0);
    for o in outcomes {
        match o {
            Ok(o) if o.stream.as_str() == "g:keys" => once.push((o.seq.0, o.duplicate)),
            Ok(o) => seqs.push((o.stream.to_string(), o.seq.0, o.duplicate)),
            Err(StoreError::StreamClosed { last_seq }) => {
                assert_eq!(last_seq, Seq(1));
                closed += 1;
            }
            Err(StoreError::IdempotencyKeyReused) => reused += 1,
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!((closed, reused), (20, 20));
    assert_eq!(once.iter().filter(|(_, dup)| !dup).count(), 1, "{once:?}");
    assert!(once.iter().all(|(seq, _)| *seq == 2), "{once:?}");
    for s in 0..4 {
        let stream = format!("g:{s}");
        let mut mine: Vec<u64> = seqs
            .iter()
            .filter(|(st, _, dup)| *st == stream && !dup)
            .map(|(_, q, _)| *q)
            .collect();
        mine.sort_unstable();
        assert_eq!(mine, (1..=100).collect::<Vec<_>>(), "{stream}");
        let stored = redis.read(&sid(&stream), Seq(0), 1_000).await.unwrap();
        let mut datas: Vec<String> = stored.events.iter().map(|e| e.data().to_string()).collect();
        datas.sort();
        let mut want: Vec<String> = (0..100).map(|i| format!("{{\"i\":{i}}}")).collect();
        want.sort();
        assert_eq!(datas, want, "{stream}");
    }
    for (s, head) in [("g:keys", 2), ("g:closed", 1)] {
        assert_eq!(
            redis.stream_info(&sid(s)).await.unwrap().head,
            Seq(head),
            "{s}"
        );
    }
    // 2 before (the closed stream's one and the first keyed), then 400 + 1.
    wait_until(Duration::from_secs(5), "every event live", || {
        sink.committed.lock().unwrap().len() == 403
    })
    .await;
    for (s, n) in [
        ("g:0", 100),
        ("g:1", 100),
        ("g:2", 100),
        ("g:3", 100),
        ("g:keys", 2),
    ] {
        assert_eq!(sink.seqs_of(s), (1..=n).collect::<Vec<_>>(), "{s}");
    }
}

/// The same store on a three-node Redis Cluster: every script stays on its stream's slot,
/// sessions on theirs, and the live path carries events from every node.
/// The per-subject cap is counted in Redis: instances opening sessions for one subject at the
/// same time never exceed it together, on one server and on a cluster (where the subject's
/// set and the sessions live in different slots).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_session_cap_holds_across_instances() {
    let server = RedisServer::start().unwrap();
    let a: Arc<dyn Store> = Arc::new(connect(&server, Arc::new(NoSink)).await);
    let b: Arc<dyn Store> = Arc::new(connect(&server, Arc::new(NoSink)).await);
    let epoch = a.stream_info(&sid("room:1")).await.unwrap().epoch;
    let tries = (0..24).map(|i| {
        let store = if i % 2 == 0 { a.clone() } else { b.clone() };
        let s = session(&SessionId::generate(), "room:1", &epoch, 0);
        tokio::spawn(async move { store.create_session_within(s, SessionCap(6)).await })
    });
    let mut admitted = 0;
    for t in tries {
        match t.await.unwrap() {
            Ok(()) => admitted += 1,
            Err(StoreError::TooManySessions { cap: 6, .. }) => {}
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(admitted, 6);

    let cluster = RedisCluster::start(3).unwrap();
    let mut stores: Vec<Arc<dyn Store>> = Vec::new();
    for _ in 0..2 {
        let opts = RedisOptions::new(&cluster.urls());
        stores.push(Arc::new(
            RedisStore::connect(opts, Arc::new(NoSink)).await.unwrap(),
        ));
    }
    let epoch = stores[0].stream_info(&sid("room:1")).await.unwrap().epoch;
    let mut admitted = 0;
    for i in 0..10 {
        let s = session(&SessionId::generate(), "room:1", &epoch, 0);
        match stores[i % 2]
            .create_session_within(s.clone(), SessionCap(4))
            .await
        {
            Ok(()) => {
                admitted += 1;
                assert!(
                    stores[(i + 1) % 2]
                        .load_session(&s.id)
                        .await
                        .unwrap()
                        .is_some()
                );
            }
            Err(StoreError::TooManySessions { cap: 4, .. }) => {
                assert_eq!(stores[0].load_session(&s.id).await.unwrap(), None);
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(admitted, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_on_a_redis_cluster() {
    let cluster = RedisCluster::start(3).unwrap();
    let sink = Arc::new(Recorder::default());
    let mut opts = RedisOptions::new(&cluster.urls());
    opts.retention = Retention {
        max_events: 5,
        max_bytes: 1 << 20,
        max_age_ms: 86_400_000,
    };
    opts.every_stream = true;
    let store = RedisStore::connect(opts, sink.clone()).await.unwrap();
    // Enough streams to land on every node.
    let streams: Vec<String> = (0..12).map(|i| format!("room:{i}")).collect();
    for s in &streams {
        for i in 1..=7u64 {
            assert_eq!(
                store.append(req(s, &i.to_string())).await.unwrap().seq,
                Seq(i)
            );
        }
    }
    for s in &streams {
        let r = store.read(&sid(s), Seq(0), 100).await.unwrap();
        assert_eq!(
            r.events.iter().map(|e| e.seq().0).collect::<Vec<_>>(),
            vec![3, 4, 5, 6, 7]
        );
        assert_eq!(
            (r.info.head, r.info.first_seq, r.info.count),
            (Seq(7), Seq(3), 5)
        );
        wait_until(Duration::from_secs(5), "every seq on the live path", || {
            sink.seqs_of(s).len() == 7
        })
        .await;
        assert_eq!(sink.seqs_of(s), (1..=7).collect::<Vec<_>>());
        // A stream's epoch is stable from its first touch on.
        assert_eq!(
            store.stream_info(&sid(s)).await.unwrap().epoch,
            r.info.epoch
        );
    }
    let quiet = store.stream_info(&sid("room:quiet")).await.unwrap();
    assert_eq!(
        store.stream_info(&sid("room:quiet")).await.unwrap().epoch,
        quiet.epoch
    );
    let o = store.append(req("room:quiet", "1")).await.unwrap();
    assert_eq!(o.epoch, quiet.epoch);
    // Idempotency, sessions and checkpoints.
    let mut r1 = req("room:0", "\"pay\"");
    r1.idempotency = Some(zerodrop_store::IdempotencyKey {
        key: "k".into(),
        fingerprint: [1; 32],
    });
    let first = store.append(r1.clone()).await.unwrap();
    assert!(store.append(r1).await.unwrap().duplicate);
    let id = SessionId::generate();
    store
        .create_session(session(&id, "room:0", &first.epoch, 0))
        .await
        .unwrap();
    assert!(
        store
            .checkpoint(&id, &sid("room:0"), first.seq)
            .await
            .unwrap()
            .is_applied()
    );
    let stats = store.stats().await.unwrap();
    assert_eq!((stats.sessions, stats.streams), (1, 13));
    guard::on_a_cluster(&store).await;
    store.ping().await.unwrap();
    assert_eq!(cluster.nodes().len(), 3);
    // WAIT goes to the node that holds the stream, in the same pipeline as the append.
    let mut opts = RedisOptions::new(&cluster.urls());
    opts.wait_replicas = 1;
    opts.wait_timeout = Duration::from_millis(300);
    let waiting = RedisStore::connect(opts, Arc::new(NoSink)).await.unwrap();
    match waiting.append(req("room:5", "8")).await {
        Err(StoreError::Unavailable(msg)) => assert!(msg.contains("0 of 1"), "{msg}"),
        other => panic!("expected Unavailable, got {other:?}"),
    }

    // One seed URL of a cluster node is enough: the store notices the cluster and follows
    // the slots instead of meeting MOVED for every stream that lives on another node.
    let seed_sink = Arc::new(Recorder::default());
    let seeded = RedisStore::connect(
        RedisOptions {
            every_stream: true,
            ..RedisOptions::new(&cluster.nodes()[0].url())
        },
        seed_sink.clone(),
    )
    .await
    .unwrap();
    for s in &streams {
        let one = format!("one:{s}");
        assert_eq!(seeded.append(req(&one, "1")).await.unwrap().seq, Seq(1));
        assert_eq!(store.stream_info(&sid(&one)).await.unwrap().head, Seq(1));
        assert_eq!(
            seeded.read(&sid(s), Seq(0), 100).await.unwrap().info,
            store.stream_info(&sid(s)).await.unwrap()
        );
    }
    for s in &streams {
        let one = format!("one:{s}");
        wait_until(
            Duration::from_secs(5),
            "the live path of a seeded store",
            || seed_sink.seqs_of(&one) == vec![1],
        )
        .await;
    }
}
