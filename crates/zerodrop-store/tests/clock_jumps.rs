//! Clock jumps, in the stores: the system clock is changed by an hour, forward and back, and
//! nothing the store keeps for a duration (events under the age limit, publish idempotency
//! keys, sessions within their window and the subject's cap) goes early or stays late. The
//! store's time is a `ManualClock`: `jump` moves the wall clock it pretends to read, `advance`
//! lets real time pass. The memory store and the SQLite store (a real file) are held to the
//! same answers; sweeps are run by hand, at the clock's time.

use std::sync::Arc;

use zerodrop_core::clock::{Clock, ManualClock};
use zerodrop_core::retention::Retention;
use zerodrop_core::{Epoch, Grants, Seq, SessionId, StreamId};
use zerodrop_store::{
    AppendRequest, IdempotencyKey, MemoryStore, Revocation, RevokeTarget, SessionCap,
    SessionRecord, SqliteOptions, SqliteStore, Store, StoreError,
};
use zerodrop_testkit::sink::{Recorder, wait_until};

const MIN: u64 = 60_000;
const HOUR: i64 = 3_600_000;
/// 2026-12-06T00:00:00Z: any start will do, a realistic one reads better in failures.
const T0: u64 = 1_796_515_200_000;

enum Kind {
    Memory(Arc<MemoryStore>),
    Sqlite {
        store: Arc<SqliteStore>,
        _dir: tempfile::TempDir,
    },
}

struct Fixture {
    kind: Kind,
    store: Arc<dyn Store>,
    sink: Arc<Recorder>,
    clock: ManualClock,
}

impl Fixture {
    fn memory(retention: Retention, idempotency_ttl_ms: u64) -> Fixture {
        let (sink, clock) = (Arc::new(Recorder::default()), ManualClock::new(T0));
        let m = Arc::new(MemoryStore::with_clock(
            retention,
            idempotency_ttl_ms,
            sink.clone(),
            Arc::new(clock.clone()),
        ));
        Fixture {
            store: m.clone(),
            kind: Kind::Memory(m),
            sink,
            clock,
        }
    }

    fn sqlite(retention: Retention, idempotency_ttl_ms: u64) -> Fixture {
        let (sink, clock) = (Arc::new(Recorder::default()), ManualClock::new(T0));
        let dir = tempfile::tempdir().unwrap();
        let mut opts = SqliteOptions::new(dir.path().join("zerodrop.db"));
        opts.retention = retention;
        opts.idempotency_ttl_ms = idempotency_ttl_ms;
        opts.clock = Arc::new(clock.clone());
        let s = Arc::new(SqliteStore::open(opts, sink.clone()).unwrap());
        Fixture {
            store: s.clone(),
            kind: Kind::Sqlite {
                store: s,
                _dir: dir,
            },
            sink,
            clock,
        }
    }

    /// Every sweep the store runs by itself (age; expired keys and sessions), now.
    async fn sweep(&self) {
        match &self.kind {
            Kind::Memory(m) => m.sweep_now(),
            Kind::Sqlite { store, .. } => store.sweep_now().await.unwrap(),
        }
    }

    async fn seqs(&self, stream: &str) -> Vec<u64> {
        let r = self.store.read(&sid(stream), Seq(0), 100).await.unwrap();
        r.events.iter().map(|e| e.seq().0).collect()
    }

    async fn ts(&self, stream: &str, seq: u64) -> u64 {
        let r = self
            .store
            .read(&sid(stream), Seq(seq - 1), 1)
            .await
            .unwrap();
        r.events[0].ts()
    }

    async fn publish(&self, stream: &str, key: Option<&str>) -> (u64, bool) {
        let idempotency = key.map(|k| IdempotencyKey {
            key: k.into(),
            fingerprint: [7; 32],
        });
        let o = self
            .store
            .append(AppendRequest {
                stream: sid(stream),
                data: "{}".into(),
                idempotency,
            })
            .await
            .unwrap();
        (o.seq.0, o.duplicate)
    }
}

fn sid(s: &str) -> StreamId {
    StreamId::new(s).unwrap()
}

/// Events kept 10 minutes; nothing else limits them.
fn ten_minutes() -> Retention {
    Retention {
        max_events: 1_000_000,
        max_bytes: 1 << 40,
        max_age_ms: 10 * MIN,
    }
}

/// An hour forward, then two back: events younger than the age limit in real elapsed time
/// stay through both jumps, and go exactly when their real age passes it. Timestamps follow
/// the store's time line, never the jumped wall clock.
async fn age_retention_counts_real_time(f: Fixture) {
    for _ in 0..3 {
        f.publish("room:1", None).await; // 1..=3 at T0
    }
    f.clock.advance(5 * MIN);
    for _ in 0..3 {
        f.publish("room:1", None).await; // 4..=6 at T0 + 5 min
    }
    f.clock.jump(HOUR);
    f.sweep().await;
    assert_eq!(
        f.seqs("room:1").await,
        vec![1, 2, 3, 4, 5, 6],
        "+1 h trims nothing"
    );
    assert_eq!(f.clock.wall_ms(), T0 + 5 * MIN + HOUR as u64);
    f.clock.jump(-2 * HOUR);
    f.sweep().await;
    assert_eq!(
        f.seqs("room:1").await,
        vec![1, 2, 3, 4, 5, 6],
        "-1 h trims nothing"
    );
    f.clock.advance(MIN);
    assert_eq!(f.publish("room:1", None).await, (7, false)); // at T0 + 6 min
    assert_eq!(
        f.ts("room:1", 7).await,
        T0 + 6 * MIN,
        "stamped on the time line"
    );
    assert_eq!(f.ts("room:1", 4).await, T0 + 5 * MIN);
    assert_eq!(f.sink.trimmed_total(), 0);
    // Real time: 1..=3 reach 10 minutes at T0 + 10 min and go once they are older.
    f.clock.set(T0 + 10 * MIN);
    f.sweep().await;
    assert_eq!(
        f.seqs("room:1").await,
        vec![1, 2, 3, 4, 5, 6, 7],
        "exactly at the limit: kept"
    );
    f.clock.advance(1);
    f.sweep().await;
    assert_eq!(f.seqs("room:1").await, vec![4, 5, 6, 7]);
    f.clock.set(T0 + 15 * MIN + 1);
    f.sweep().await;
    assert_eq!(f.seqs("room:1").await, vec![7]);
    // The sink hears of the trims after the sweep's commit: wait for it (bounded).
    wait_until(
        std::time::Duration::from_secs(5),
        "6 trims reported",
        || f.sink.trimmed_total() == 6,
    )
    .await;
    assert_eq!(f.sink.trimmed_total(), 6, "each trimmed once");
}

/// A publish `Idempotency-Key` is kept its TTL in real time: a retry after a jump either way
/// still finds it (no duplicate append); after the TTL has really passed it is gone.
async fn idempotency_keys_count_real_time(f: Fixture) {
    assert_eq!(f.publish("room:1", Some("k")).await, (1, false));
    f.clock.advance(20 * MIN);
    f.clock.jump(HOUR);
    f.sweep().await;
    assert_eq!(f.publish("room:1", Some("k")).await, (1, true), "+1 h");
    f.clock.jump(-2 * HOUR);
    f.sweep().await;
    assert_eq!(f.publish("room:1", Some("k")).await, (1, true), "-1 h");
    f.clock.set(T0 + 30 * MIN + 1);
    f.sweep().await;
    assert_eq!(
        f.publish("room:1", Some("k")).await,
        (2, false),
        "past its TTL"
    );
}

fn session(sub: &str, now: u64, window_ms: u64) -> SessionRecord {
    SessionRecord {
        id: SessionId::generate(),
        sub: sub.into(),
        grants: Grants::default(),
        created_at_ms: now,
        expires_at_ms: now + window_ms,
        streams: [(
            sid("room:1"),
            zerodrop_store::SessionStream {
                epoch: Epoch::generate(),
                ack: Seq(0),
                dropped_through: Seq(0),
            },
        )]
        .into_iter()
        .collect(),
    }
}

/// A subject capped at one session: its session counts for its whole reconnect window in
/// real time, whatever the wall clock does, and the refusal says exactly when it ends.
async fn the_session_cap_counts_real_time(f: Fixture) {
    let window = 15 * MIN;
    let cap = SessionCap(1);
    let a = session("u1", f.clock.now_ms(), window);
    f.store.create_session_within(a.clone(), cap).await.unwrap();
    for (jump, label) in [(HOUR, "+1 h"), (-2 * HOUR, "-1 h")] {
        f.clock.jump(jump);
        f.sweep().await;
        let b = session("u1", f.clock.now_ms(), window);
        assert_eq!(
            f.store.create_session_within(b, cap).await,
            Err(StoreError::TooManySessions {
                cap: 1,
                retry_after_ms: window
            }),
            "{label}: the first session still holds the place for its whole window"
        );
        assert!(
            f.store.load_session(&a.id).await.unwrap().is_some(),
            "{label}"
        );
    }
    f.clock.advance(window);
    let b = session("u1", f.clock.now_ms(), window);
    f.store.create_session_within(b, cap).await.unwrap();
}

/// A revocation ending at a wall-clock `until` (30 minutes ahead) is in force until both the
/// time line and the wall clock have passed it: a forward jump does not end it early; after a
/// backward one it lasts until the wall clock catches up (up to the jump longer).
async fn a_revocation_never_lapses_early(f: Fixture) {
    let r = Revocation {
        id: "rv_1".into(),
        target: RevokeTarget::Sub("u1".into()),
        reason: None,
        at_ms: T0,
        until_ms: Some(T0 + 30 * MIN),
        disconnect: false,
    };
    f.store.put_revocation(&r).await.unwrap();
    let ids = || async {
        let all = f.store.revocations().await.unwrap();
        all.into_iter().map(|r| r.id).collect::<Vec<_>>()
    };
    f.clock.jump(HOUR);
    assert_eq!(
        ids().await,
        vec!["rv_1"],
        "+1 h: the wall clock alone has passed it"
    );
    f.clock.jump(-2 * HOUR);
    f.clock.set(T0 + 30 * MIN);
    assert_eq!(
        ids().await,
        vec!["rv_1"],
        "-1 h: the wall clock has not reached it"
    );
    f.clock.set(T0 + 90 * MIN - 1);
    assert_eq!(ids().await, vec!["rv_1"], "the wall clock 1 ms before it");
    f.clock.advance(1);
    assert!(ids().await.is_empty(), "past it on both");
}

macro_rules! both_stores {
    ($($name:ident => $make:expr;)*) => {
        mod memory {
            use super::*;
            $(#[tokio::test]
            async fn $name() {
                let (retention, ttl) = $make;
                super::$name(Fixture::memory(retention, ttl)).await
            })*
        }
        mod sqlite {
            use super::*;
            $(#[tokio::test]
            async fn $name() {
                let (retention, ttl) = $make;
                super::$name(Fixture::sqlite(retention, ttl)).await
            })*
        }
    };
}

both_stores! {
    age_retention_counts_real_time => (ten_minutes(), 24 * 60 * MIN);
    idempotency_keys_count_real_time => (Retention::default(), 30 * MIN);
    the_session_cap_counts_real_time => (Retention::default(), 24 * 60 * MIN);
    a_revocation_never_lapses_early => (Retention::default(), 24 * 60 * MIN);
}

/// SQLite deletes a session `session_grace_ms` after its window ends (until then a late
/// resume is told `RECONNECT_WINDOW_EXPIRED`): a jump either way deletes nothing early; real
/// time does, exactly.
#[tokio::test]
async fn sqlite_deletes_ended_sessions_by_real_time() {
    let clock = ManualClock::new(T0);
    let dir = tempfile::tempdir().unwrap();
    let mut opts = SqliteOptions::new(dir.path().join("zerodrop.db"));
    opts.session_grace_ms = 60 * MIN;
    opts.clock = Arc::new(clock.clone());
    let store = SqliteStore::open(opts, Arc::new(Recorder::default())).unwrap();
    let a = session("u1", T0, 15 * MIN);
    store.create_session(a.clone()).await.unwrap();
    clock.jump(2 * HOUR); // past window + grace by the wall clock
    store.sweep_now().await.unwrap();
    assert!(store.load_session(&a.id).await.unwrap().is_some(), "+2 h");
    clock.jump(-4 * HOUR);
    store.sweep_now().await.unwrap();
    assert!(store.load_session(&a.id).await.unwrap().is_some(), "-2 h");
    clock.set(T0 + 75 * MIN);
    store.sweep_now().await.unwrap();
    assert!(
        store.load_session(&a.id).await.unwrap().is_some(),
        "at window + grace"
    );
    clock.advance(1);
    store.sweep_now().await.unwrap();
    assert!(
        store.load_session(&a.id).await.unwrap().is_none(),
        "past it"
    );
}

/// A restart after the clock went back: the new process's time line starts behind the
/// newest timestamp in the file, and stamps never go backwards (so the age sweep, a prefix
/// delete in append order, stays right).
#[tokio::test]
async fn sqlite_stamps_never_go_back_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("zerodrop.db");
    let first = ManualClock::new(T0);
    let mut opts = SqliteOptions::new(&path);
    opts.clock = Arc::new(first.clone());
    let s = SqliteStore::open(opts, Arc::new(Recorder::default())).unwrap();
    let req = || AppendRequest {
        stream: sid("room:1"),
        data: "{}".into(),
        idempotency: None,
    };
    s.append(req()).await.unwrap();
    s.close();
    drop(s);
    let second = ManualClock::new(T0 - HOUR as u64); // started after a -1 h jump
    let mut opts = SqliteOptions::new(&path);
    opts.clock = Arc::new(second.clone());
    let s = SqliteStore::open(opts, Arc::new(Recorder::default())).unwrap();
    s.append(req()).await.unwrap();
    let r = s.read(&sid("room:1"), Seq(0), 10).await.unwrap();
    let ts: Vec<u64> = r.events.iter().map(|e| e.ts()).collect();
    assert_eq!(ts, vec![T0, T0]);
}
