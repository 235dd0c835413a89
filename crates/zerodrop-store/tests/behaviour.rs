//! One behaviour suite, run against every store: the stores must be indistinguishable.

use std::sync::Arc;
use std::time::Duration;

use zerodrop_core::retention::Retention;
use zerodrop_core::window::{WindowError, replay_window};
use zerodrop_core::{AckUpdate, Epoch, Grants, Seq, SessionId, StreamId, now_ms};
use zerodrop_store::{
    AppendRequest, IdempotencyKey, MemoryStore, RedisOptions, RedisStore, Revocation, RevokeTarget,
    SessionCap, SessionRecord, SessionStream, SqliteOptions, SqliteStore, Store, StoreError,
};
use zerodrop_testkit::redis::RedisServer;
use zerodrop_testkit::sink::{Recorder, wait_until};

struct Fixture {
    store: Arc<dyn Store>,
    sink: Arc<Recorder>,
    _dir: Option<tempfile::TempDir>,
    _redis: Option<RedisServer>,
}

fn memory(retention: Retention) -> Fixture {
    let sink = Arc::new(Recorder::default());
    Fixture {
        store: Arc::new(MemoryStore::new(retention, sink.clone())),
        sink,
        _dir: None,
        _redis: None,
    }
}

fn sqlite(retention: Retention) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let sink = Arc::new(Recorder::default());
    let mut opts = SqliteOptions::new(dir.path().join("zerodrop.db"));
    opts.retention = retention;
    let store = SqliteStore::open(opts, sink.clone()).unwrap();
    Fixture {
        store: Arc::new(store),
        sink,
        _dir: Some(dir),
        _redis: None,
    }
}

/// A store on its own `redis-server`, so that tests never see each other's keys.
async fn redis(retention: Retention) -> Fixture {
    let server = RedisServer::start().expect("start redis-server");
    let sink = Arc::new(Recorder::default());
    let mut opts = RedisOptions::new(&server.url());
    opts.retention = retention;
    // The fixture's sink checks every stream's events, as the other stores report them.
    opts.every_stream = true;
    let store = RedisStore::connect(opts, sink.clone()).await.unwrap();
    Fixture {
        store: Arc::new(store),
        sink,
        _dir: None,
        _redis: Some(server),
    }
}

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

async fn publish_n(f: &Fixture, stream: &str, n: u64) {
    for i in 0..n {
        f.store
            .append(req(stream, &format!("{{\"i\":{i}}}")))
            .await
            .unwrap();
    }
}

async fn seqs_contiguous_and_live_in_order(f: Fixture) {
    for i in 1..=20u64 {
        let o = f
            .store
            .append(req("room:1", &format!("{{\"i\":{i}}}")))
            .await
            .unwrap();
        assert_eq!(o.seq, Seq(i));
        assert!(!o.duplicate);
    }
    f.store.append(req("room:2", "null")).await.unwrap();
    let r = f.store.read(&sid("room:1"), Seq(0), 100).await.unwrap();
    let seqs: Vec<u64> = r.events.iter().map(|e| e.seq().0).collect();
    assert_eq!(seqs, (1..=20).collect::<Vec<_>>());
    assert_eq!(r.info.head, Seq(20));
    assert_eq!(r.info.first_seq, Seq(1));
    assert_eq!(r.info.count, 20);
    assert_eq!(r.events[4].data(), "{\"i\":5}");
    let bytes: u64 = r.events.iter().map(|e| e.json().len() as u64).sum();
    assert_eq!(r.info.bytes, bytes);
    // Read pages.
    let page = f.store.read(&sid("room:1"), Seq(15), 3).await.unwrap();
    assert_eq!(
        page.events.iter().map(|e| e.seq().0).collect::<Vec<_>>(),
        vec![16, 17, 18]
    );
    // The sink saw every commit, each stream in order (it is told right after the callers
    // are answered, so give it a moment).
    wait_until(Duration::from_secs(5), "every commit", || {
        f.sink.committed.lock().unwrap().len() >= 21
    })
    .await;
    assert_eq!(f.sink.seqs_of("room:1"), (1..=20).collect::<Vec<_>>());
    assert_eq!(f.sink.committed.lock().unwrap().len(), 21);
    // A stream never written to.
    let empty = f.store.stream_info(&sid("nobody")).await.unwrap();
    assert_eq!(
        (empty.head, empty.first_seq, empty.count),
        (Seq(0), Seq(1), 0)
    );
    assert_eq!(empty.epoch, r.info.epoch);
}

async fn concurrent_appends_stay_contiguous(f: Fixture) {
    let mut tasks = Vec::new();
    for w in 0..16 {
        let store = f.store.clone();
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            for i in 0..25 {
                let o = store
                    .append(req("hot", &format!("[{w},{i}]")))
                    .await
                    .unwrap();
                got.push(o.seq.0);
            }
            got
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        let got = t.await.unwrap();
        assert!(
            got.windows(2).all(|w| w[0] < w[1]),
            "one writer's seqs increase"
        );
        all.extend(got);
    }
    all.sort_unstable();
    assert_eq!(all, (1..=400).collect::<Vec<_>>());
    let r = f.store.read(&sid("hot"), Seq(0), 1000).await.unwrap();
    assert_eq!(r.events.len(), 400);
    assert!(
        r.events
            .iter()
            .enumerate()
            .all(|(i, e)| e.seq().0 == i as u64 + 1)
    );
}

async fn idempotency_keys(f: Fixture) {
    let key = |k: &str, body: u8| IdempotencyKey {
        key: k.into(),
        fingerprint: [body; 32],
    };
    let mut r1 = req("pay", "{\"amount\":1}");
    r1.idempotency = Some(key("k1", 1));
    let a = f.store.append(r1.clone()).await.unwrap();
    let b = f.store.append(r1.clone()).await.unwrap();
    assert_eq!((a.seq, a.duplicate), (Seq(1), false));
    assert_eq!((b.seq, b.duplicate), (Seq(1), true));
    assert_eq!(a.epoch, b.epoch);
    let mut other = r1.clone();
    other.idempotency = Some(key("k1", 2));
    assert_eq!(
        f.store.append(other).await.unwrap_err(),
        StoreError::IdempotencyKeyReused
    );
    // Same key on another stream is another key.
    let mut elsewhere = req("pay2", "{\"amount\":1}");
    elsewhere.idempotency = Some(key("k1", 1));
    assert!(!f.store.append(elsewhere).await.unwrap().duplicate);
    // Concurrent retries: exactly one append.
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let store = f.store.clone();
        let mut r = req("pay", "{\"amount\":2}");
        r.idempotency = Some(key("k2", 3));
        tasks.push(tokio::spawn(async move { store.append(r).await.unwrap() }));
    }
    let mut seqs = Vec::new();
    let mut firsts = 0;
    for t in tasks {
        let o = t.await.unwrap();
        seqs.push(o.seq);
        firsts += usize::from(!o.duplicate);
    }
    assert_eq!(firsts, 1);
    assert!(seqs.iter().all(|s| *s == Seq(2)));
    assert_eq!(f.store.stream_info(&sid("pay")).await.unwrap().head, Seq(2));
}

async fn retention_by_count_and_bytes(f: Fixture) {
    publish_n(&f, "r", 12).await;
    let info = f.store.stream_info(&sid("r")).await.unwrap();
    assert_eq!(
        (info.head, info.first_seq, info.count),
        (Seq(12), Seq(8), 5)
    );
    let r = f.store.read(&sid("r"), Seq(0), 100).await.unwrap();
    assert_eq!(r.events.first().unwrap().seq(), Seq(8));
    assert!(matches!(
        replay_window(Seq(3), None, &r.info.bounds()),
        Err(WindowError::Trimmed {
            first_available: Seq(8),
            ..
        })
    ));
    // The sink hears of trims right after the append is answered.
    wait_until(Duration::from_secs(5), "7 trims", || {
        f.sink.trimmed_total() >= 7
    })
    .await;
    assert_eq!(f.sink.trimmed_total(), 7);
    // Bytes: each event here is ~60 bytes; a 10-KiB event pushes the older ones out.
    let big = format!("\"{}\"", "x".repeat(10_000));
    f.store.append(req("r", &big)).await.unwrap();
    let info = f.store.stream_info(&sid("r")).await.unwrap();
    assert_eq!(
        (info.head, info.count, info.first_seq),
        (Seq(13), 1, Seq(13))
    );
}

async fn retention_by_age(f: Fixture) {
    publish_n(&f, "old", 3).await;
    // max_age is 1 s here and the sweep runs at least every second.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let info = f.store.stream_info(&sid("old")).await.unwrap();
        if info.count == 0 {
            assert_eq!((info.head, info.first_seq), (Seq(3), Seq(4)));
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "age retention never ran: {info:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The sink hears of the trim right after the commit that made it.
    wait_until(Duration::from_secs(5), "the age trim", || {
        f.sink
            .trims
            .lock()
            .unwrap()
            .iter()
            .any(|t| t.0 == "old" && t.1 == 4)
    })
    .await;
    // The stream goes on from where it was.
    let o = f.store.append(req("old", "1")).await.unwrap();
    assert_eq!(o.seq, Seq(4));
}

fn session(id: &SessionId, streams: &[(&str, &Epoch, u64)]) -> SessionRecord {
    SessionRecord {
        id: id.clone(),
        sub: "u1".into(),
        grants: Grants {
            streams: vec!["room:*".into()],
            publish: vec![],
            // The connect token's public `info` (presence) is kept with the grants.
            info: Some(serde_json::json!({"name": "Ann"})),
        },
        created_at_ms: now_ms(),
        expires_at_ms: now_ms() + 900_000,
        streams: streams
            .iter()
            .map(|(s, e, ack)| {
                (
                    sid(s),
                    SessionStream {
                        epoch: (*e).clone(),
                        ack: Seq(*ack),
                        dropped_through: Seq(0),
                    },
                )
            })
            .collect(),
    }
}

async fn sessions_and_checkpoints(f: Fixture) {
    publish_n(&f, "room:1", 10).await;
    let epoch = f.store.stream_info(&sid("room:1")).await.unwrap().epoch;
    let id = SessionId::generate();
    f.store
        .create_session(session(&id, &[("room:1", &epoch, 2)]))
        .await
        .unwrap();
    let loaded = f.store.load_session(&id).await.unwrap().unwrap();
    assert_eq!(loaded.streams[&sid("room:1")].ack, Seq(2));
    assert_eq!(loaded.grants.streams, vec!["room:*".to_string()]);
    let room1 = sid("room:1");
    let ck = |s: u64| f.store.checkpoint(&id, &room1, Seq(s));
    assert_eq!(ck(5).await.unwrap(), AckUpdate::Applied(Seq(5)));
    assert_eq!(ck(5).await.unwrap(), AckUpdate::Ignored(Seq(5)));
    assert_eq!(ck(3).await.unwrap(), AckUpdate::Ignored(Seq(5)));
    assert_eq!(
        ck(11).await.unwrap_err(),
        StoreError::AckBeyondHead {
            requested: Seq(11),
            head: Seq(10)
        }
    );
    assert_eq!(ck(10).await.unwrap(), AckUpdate::Applied(Seq(10)));
    assert_eq!(
        f.store
            .checkpoint(&id, &sid("room:9"), Seq(1))
            .await
            .unwrap_err(),
        StoreError::NotInSession
    );
    assert_eq!(
        f.store
            .checkpoint(&SessionId::generate(), &sid("room:1"), Seq(1))
            .await
            .unwrap_err(),
        StoreError::SessionNotFound
    );
    // Streams come and go.
    let st = SessionStream {
        epoch: epoch.clone(),
        ack: Seq(0),
        dropped_through: Seq(0),
    };
    f.store
        .put_session_stream(&id, &sid("room:2"), st.clone())
        .await
        .unwrap();
    assert_eq!(
        f.store
            .put_session_stream(&SessionId::generate(), &sid("room:2"), st)
            .await
            .unwrap_err(),
        StoreError::SessionNotFound
    );
    // Batched acks: applied, stale, unknown session and unknown stream in one call.
    let batch = vec![
        (id.clone(), sid("room:1"), Seq(10)),
        (id.clone(), sid("room:1"), Seq(3)),
        (SessionId::generate(), sid("room:1"), Seq(5)),
        (id.clone(), sid("room:9"), Seq(1)),
    ];
    assert_eq!(
        f.store.checkpoint_many(batch).await.unwrap(),
        0,
        "10 was already the ack"
    );
    f.store
        .put_session_stream(
            &id,
            &sid("room:2"),
            SessionStream {
                epoch: epoch.clone(),
                ack: Seq(0),
                dropped_through: Seq(0),
            },
        )
        .await
        .unwrap();
    publish_n(&f, "room:2", 3).await;
    let batch = vec![
        (id.clone(), sid("room:2"), Seq(2)),
        (id.clone(), sid("room:2"), Seq(1)),
    ];
    assert_eq!(f.store.checkpoint_many(batch).await.unwrap(), 1);
    let s = f.store.load_session(&id).await.unwrap().unwrap();
    assert_eq!(s.streams[&sid("room:2")].ack, Seq(2));
    // Re-adding a stream in the same epoch never moves its ack backwards.
    let lower = SessionStream {
        epoch: epoch.clone(),
        ack: Seq(1),
        dropped_through: Seq(0),
    };
    f.store
        .put_session_stream(&id, &sid("room:1"), lower)
        .await
        .unwrap();
    let s = f.store.load_session(&id).await.unwrap().unwrap();
    assert_eq!(s.streams[&sid("room:1")].ack, Seq(10));
    f.store
        .remove_session_stream(&id, &sid("room:1"))
        .await
        .unwrap();
    f.store
        .mark_dropped(&id, &sid("room:2"), Seq(4))
        .await
        .unwrap();
    f.store.touch_session(&id, 42).await.unwrap();
    let s = f.store.load_session(&id).await.unwrap().unwrap();
    assert_eq!(
        s.streams.keys().map(|k| k.as_str()).collect::<Vec<_>>(),
        vec!["room:2"]
    );
    assert_eq!(s.streams[&sid("room:2")].dropped_through, Seq(4));
    assert_eq!(s.expires_at_ms, 42);
    assert!(
        f.store
            .load_session(&SessionId::generate())
            .await
            .unwrap()
            .is_none()
    );
    let stats = f.store.stats().await.unwrap();
    assert_eq!(stats.sessions, 1);
    assert!(stats.streams >= 1);
    // A checkpoint against another epoch is refused.
    let other = Epoch::generate();
    let id2 = SessionId::generate();
    f.store
        .create_session(session(&id2, &[("room:1", &other, 0)]))
        .await
        .unwrap();
    assert!(matches!(
        f.store
            .checkpoint(&id2, &sid("room:1"), Seq(1))
            .await
            .unwrap_err(),
        StoreError::EpochChanged { .. }
    ));
}

async fn digest_is_the_chain_of_retained_events(f: Fixture) {
    let (empty, h0) = f.store.digest(&sid("d")).await.unwrap();
    assert_eq!(empty.count, 0);
    assert_eq!(h0, "0".repeat(64));
    publish_n(&f, "d", 3).await;
    let (_, h) = f.store.digest(&sid("d")).await.unwrap();
    let r = f.store.read(&sid("d"), Seq(0), 10).await.unwrap();
    let mut chain = zerodrop_core::hash::ChainHash::default();
    for e in &r.events {
        chain.push(e.json());
    }
    assert_eq!(h, chain.hex());
}

/// The per-subject cap: live sessions only (a resume never counts again, a session past its
/// reconnect window no longer counts), refused with nothing written, exact under concurrency.
async fn sessions_per_subject_are_capped(f: Fixture) {
    let cap = SessionCap(3);
    let of = |sub: &str, expires_at_ms: u64| {
        let mut s = session(&SessionId::generate(), &[]);
        s.sub = sub.into();
        s.expires_at_ms = expires_at_ms;
        s
    };
    let later = now_ms() + 900_000;
    let mut held = Vec::new();
    for i in 0..3 {
        let s = of("capped", later + i);
        f.store.create_session_within(s.clone(), cap).await.unwrap();
        held.push(s);
    }
    let refused = of("capped", later);
    match f.store.create_session_within(refused.clone(), cap).await {
        Err(StoreError::TooManySessions {
            cap: 3,
            retry_after_ms,
            // The store measures on its own time line (the system clock at process start, moved
            // on by the monotonic clock), which may trail this test's system clock reading by a
            // little: a second of slack.
        }) => assert!(
            (800_000..=901_000).contains(&retry_after_ms),
            "the earliest window ends in about 900 s: {retry_after_ms}"
        ),
        other => panic!("expected TooManySessions, got {other:?}"),
    }
    assert_eq!(f.store.load_session(&refused.id).await.unwrap(), None);
    // Writing a held session again is no new session; other subjects are not affected.
    f.store
        .create_session_within(held[0].clone(), cap)
        .await
        .unwrap();
    f.store
        .create_session_within(of("other", later), cap)
        .await
        .unwrap();
    // Without a cap, anything goes (and what was opened without one counts once it is on).
    f.store.create_session(of("capped", later)).await.unwrap();
    assert!(matches!(
        f.store
            .create_session_within(of("capped", later), cap)
            .await,
        Err(StoreError::TooManySessions { .. })
    ));
    // A session whose reconnect window ended no longer counts: end two of them.
    for s in &held[..2] {
        f.store.touch_session(&s.id, now_ms() - 1).await.unwrap();
    }
    f.store
        .create_session_within(of("capped", later), cap)
        .await
        .unwrap();
    assert!(matches!(
        f.store
            .create_session_within(of("capped", later), cap)
            .await,
        Err(StoreError::TooManySessions { .. })
    ));
    // A touch moves a session's end forward: a long-lived session keeps counting.
    f.store
        .touch_session(&held[2].id, now_ms() + 1_800_000)
        .await
        .unwrap();
    // Sessions born already ended never count.
    for _ in 0..5 {
        f.store
            .create_session_within(of("lapsed", now_ms() - 1), cap)
            .await
            .unwrap();
    }
    f.store
        .create_session_within(of("lapsed", later), cap)
        .await
        .unwrap();
    // Twenty at once against a cap of five: exactly five get in.
    let tries = (0..20).map(|_| {
        let (store, s) = (f.store.clone(), of("race", later));
        tokio::spawn(async move { store.create_session_within(s, SessionCap(5)).await })
    });
    let mut admitted = 0;
    for t in tries {
        match t.await.unwrap() {
            Ok(()) => admitted += 1,
            Err(StoreError::TooManySessions { cap: 5, .. }) => {}
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(admitted, 5);
}

/// A session's grants are replaced (a fresher connect token); a gone session is
/// `SessionNotFound`. Revocations are kept, listed while in force, replaced by id, deleted
/// once, and the version (where the store has one) moves with every change.
async fn grants_and_revocations(f: Fixture) {
    let id = SessionId::generate();
    f.store.create_session(session(&id, &[])).await.unwrap();
    let narrower = Grants {
        streams: vec!["room:1".into()],
        publish: vec![],
        info: None,
    };
    f.store.set_session_grants(&id, &narrower).await.unwrap();
    let loaded = f.store.load_session(&id).await.unwrap().unwrap();
    assert_eq!(loaded.grants, narrower);
    assert_eq!(
        f.store
            .set_session_grants(&SessionId::generate(), &narrower)
            .await
            .unwrap_err(),
        StoreError::SessionNotFound
    );
    let v0 = f.store.revocations_version().await.unwrap();
    let rev = |id: &str, until_ms: Option<u64>| Revocation {
        id: id.into(),
        target: RevokeTarget::Sub("u1".into()),
        reason: Some("why".into()),
        at_ms: now_ms(),
        until_ms,
        disconnect: false,
    };
    let forever = rev("rv_1", None);
    f.store.put_revocation(&forever).await.unwrap();
    f.store
        .put_revocation(&rev("rv_lapsed", Some(now_ms() - 1)))
        .await
        .unwrap();
    let mut session_rev = rev("rv_2", Some(now_ms() + 60_000));
    session_rev.target = RevokeTarget::SessionId(id.clone());
    f.store.put_revocation(&session_rev).await.unwrap();
    let mut listed = f.store.revocations().await.unwrap();
    listed.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(
        listed,
        vec![forever.clone(), session_rev.clone()],
        "lapsed ones are not listed"
    );
    let v1 = f.store.revocations_version().await.unwrap();
    assert!(
        v0.is_none() || v1 != v0,
        "the version moved: {v0:?} → {v1:?}"
    );
    assert!(f.store.delete_revocation("rv_2").await.unwrap());
    assert!(!f.store.delete_revocation("rv_2").await.unwrap(), "once");
    assert_eq!(f.store.revocations().await.unwrap(), vec![forever]);
    let v2 = f.store.revocations_version().await.unwrap();
    assert!(
        v2.is_none() || v2 != v1,
        "the version moved: {v1:?} → {v2:?}"
    );
}

/// A stream's record: absent, written, replaced, kept apart from the log (an erased log
/// leaves it), removed.
async fn stream_records(f: Fixture) {
    let (a, b) = (sid("rec:a"), sid("rec:b"));
    assert_eq!(f.store.stream_record(&a).await.unwrap(), None);
    f.store
        .put_stream_record(&a, Some("{\"v\":1}".into()))
        .await
        .unwrap();
    f.store
        .put_stream_record(&b, Some("b".into()))
        .await
        .unwrap();
    f.store
        .put_stream_record(&a, Some("{\"v\":2}".into()))
        .await
        .unwrap();
    assert_eq!(
        f.store.stream_record(&a).await.unwrap().as_deref(),
        Some("{\"v\":2}")
    );
    publish_n(&f, "rec:a", 2).await;
    f.store.delete_stream(&a).await.unwrap();
    assert_eq!(
        f.store.stream_record(&a).await.unwrap().as_deref(),
        Some("{\"v\":2}")
    );
    f.store.put_stream_record(&a, None).await.unwrap();
    assert_eq!(f.store.stream_record(&a).await.unwrap(), None);
    assert_eq!(
        f.store.stream_record(&b).await.unwrap().as_deref(),
        Some("b")
    );
}

macro_rules! suite {
    ($($name:ident => $retention:expr;)*) => {
        mod memory_store {
            use super::*;
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(memory($retention)).await })*
        }
        mod sqlite_store {
            use super::*;
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(sqlite($retention)).await })*
        }
        mod redis_store {
            use super::*;
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(redis($retention).await).await })*
        }
    };
}

suite! {
    seqs_contiguous_and_live_in_order => big();
    concurrent_appends_stay_contiguous => big();
    idempotency_keys => big();
    retention_by_count_and_bytes => Retention { max_events: 5, max_bytes: 4096, max_age_ms: 86_400_000 };
    retention_by_age => Retention { max_events: 100, max_bytes: 1 << 20, max_age_ms: 1000 };
    sessions_and_checkpoints => big();
    digest_is_the_chain_of_retained_events => big();
    sessions_per_subject_are_capped => big();
    grants_and_revocations => big();
    stream_records => big();
}
