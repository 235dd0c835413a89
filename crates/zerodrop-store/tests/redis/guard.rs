//! The job queue and webhook idempotency records on Redis: what the shared suite
//! (`guard_behaviour.rs`) cannot show with one store on one healthy server — a crash of a
//! durable server, a server that lost its data, several instances on one queue, and long
//! random sequences checked against the memory store, the reference.

use std::collections::HashMap;
use std::fmt::Debug;

use zerodrop_store::{
    Enqueued, Failure, GuardStore, IdemBegin, IdemRecord, IdempotencyKey, JobRecord, JobStatus,
    Lease, NewJob, QosClass, QueuedCaps, RunningCaps,
};

use super::*;

const T0: u64 = 1_800_000_000_000;

fn job(kind: &str, class: QosClass, dedupe: Option<&str>) -> NewJob {
    NewJob {
        kind: kind.into(),
        class,
        upstream: "app".into(),
        payload: format!("{{\"kind\":\"{kind}\"}}"),
        dedupe_key: dedupe.map(String::from),
        max_attempts: 3,
        available_at_ms: T0,
    }
}

async fn enqueue(store: &RedisStore, j: NewJob) -> u64 {
    match store
        .job_enqueue(j, &QueuedCaps::default(), T0)
        .await
        .unwrap()
    {
        Enqueued::New(id) => id,
        e => panic!("expected a new job, got {e:?}"),
    }
}

fn ids(jobs: &[zerodrop_store::LeasedJob]) -> Vec<u64> {
    jobs.iter().map(|j| j.job.id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_and_idempotency_records_survive_a_crash_of_a_durable_server() {
    let mut server = RedisServer::start_durable().unwrap();
    let store = connect(&server, Arc::new(NoSink)).await;
    let open = RunningCaps::default();
    let a = enqueue(&store, job("publish", QosClass::Realtime, Some("d1"))).await;
    let b = enqueue(&store, job("publish", QosClass::Batch, None)).await;
    let c = enqueue(&store, job("report", QosClass::Batch, None)).await;
    let held = store.job_claim("w1", 1, &open, 60_000, T0).await.unwrap();
    assert_eq!(ids(&held), vec![a]);
    assert_eq!(
        store
            .idem_begin("gh", "m1", [1; 32], 3_600_000, 30_000, T0)
            .await
            .unwrap(),
        IdemBegin::Fresh
    );
    store.idem_finish("gh", "m1", "{}", T0 + 1).await.unwrap();
    let mut keyed = req("orders", "1");
    keyed.idempotency = Some(IdempotencyKey {
        key: "o-1".into(),
        fingerprint: [2; 32],
    });
    store.append(keyed.clone()).await.unwrap();
    assert!(store.append(keyed.clone()).await.unwrap().duplicate);
    let before = store.job_list(None, 10).await.unwrap();

    // kill -9: what was acknowledged is in the AOF (fsync always).
    server.kill();
    assert!(matches!(
        store.job_get(a).await,
        Err(StoreError::Unavailable(_))
    ));
    assert!(matches!(
        store
            .job_enqueue(
                job("publish", QosClass::Batch, None),
                &QueuedCaps::default(),
                T0
            )
            .await,
        Err(StoreError::Unavailable(_))
    ));
    server.start_again().unwrap();

    let after = eventually(Duration::from_secs(10), || store.job_list(None, 10)).await;
    assert_eq!(after, before, "every job as it was");
    assert_eq!(
        store
            .job_enqueue(
                job("publish", QosClass::Realtime, Some("d1")),
                &QueuedCaps::default(),
                T0
            )
            .await
            .unwrap(),
        Enqueued::Existing(a),
        "the dedupe key still holds"
    );
    // The lease from before the crash is still the current one; the queue order is kept.
    store.job_complete(held[0].lease, T0 + 10).await.unwrap();
    let rest = store
        .job_claim("w2", 10, &open, 60_000, T0 + 10)
        .await
        .unwrap();
    assert_eq!(ids(&rest), vec![b, c]);
    let d = enqueue(&store, job("publish", QosClass::Batch, None)).await;
    assert!(d > c, "ids go on growing: {d} after {c}");
    assert_eq!(
        store
            .idem_begin("gh", "m1", [1; 32], 3_600_000, 30_000, T0 + 20)
            .await
            .unwrap(),
        IdemBegin::Done {
            answer: "{}".into(),
            hit_count: 1
        }
    );
    let keys = store
        .idem_list(Some("publish:orders"), 10, now_ms())
        .await
        .unwrap();
    assert_eq!(
        keys.iter()
            .map(|r| (r.key.as_str(), r.hit_count))
            .collect::<Vec<_>>(),
        vec![("o-1", 1)]
    );

    // A server that comes back without its data: the jobs are gone, and a worker still
    // holding a lease from before is refused rather than completing some new job that got
    // the same id.
    server.restart_empty().unwrap();
    let stale = rest[0].lease;
    let err = eventually(Duration::from_secs(10), || async {
        match store.job_complete(stale, T0 + 30).await {
            Err(StoreError::Unavailable(e)) => Err(StoreError::Unavailable(e)),
            other => Ok(other),
        }
    })
    .await;
    assert_eq!(
        err,
        Err(StoreError::StaleLease {
            job: stale.job,
            attempt: stale.attempt
        })
    );
    let e = enqueue(&store, job("publish", QosClass::Batch, None)).await;
    assert!(e > d, "no id is handed out twice: {e} after {d}");
    let again = store
        .job_claim("w3", 10, &open, 60_000, T0 + 30)
        .await
        .unwrap();
    assert_eq!(ids(&again), vec![e]);
    assert_eq!(
        store.job_complete(stale, T0 + 40).await,
        Err(StoreError::StaleLease {
            job: stale.job,
            attempt: stale.attempt
        })
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_share_one_queue_and_hand_every_job_out_once() {
    let server = RedisServer::start().unwrap();
    let a = Arc::new(connect(&server, Arc::new(NoSink)).await);
    let b = Arc::new(connect(&server, Arc::new(NoSink)).await);
    let mut want = Vec::new();
    for i in 0..60 {
        let class = QosClass::ALL[i % 3];
        want.push(enqueue(&a, job("publish", class, None)).await);
    }
    // The other instance sees them, and the lease one hands out binds the other.
    let st = b.job_stats(T0).await.unwrap();
    assert_eq!(st.by_status[&JobStatus::Queued], 60);
    assert_eq!(
        b.job_get(want[0]).await.unwrap(),
        a.job_get(want[0]).await.unwrap()
    );
    let first = b
        .job_claim("b0", 1, &RunningCaps::default(), 60_000, T0)
        .await
        .unwrap();
    assert_eq!(ids(&first), vec![want[0]], "the oldest realtime job");
    assert!(
        a.job_heartbeat(first[0].lease, 60_000, T0 + 1)
            .await
            .is_ok()
    );
    a.job_complete(first[0].lease, T0 + 2).await.unwrap();
    assert!(matches!(
        b.job_complete(first[0].lease, T0 + 3).await,
        Err(StoreError::StaleLease { .. })
    ));

    let mut tasks = Vec::new();
    for w in 0..6 {
        let s = if w % 2 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            // Bounded: 60 jobs, at least one per round until the queue is empty.
            for _ in 0..100 {
                let got = s
                    .job_claim(&format!("w{w}"), 2, &RunningCaps::default(), 60_000, T0 + 5)
                    .await
                    .unwrap();
                if got.is_empty() {
                    break;
                }
                for g in got {
                    s.job_complete(g.lease, T0 + 6).await.unwrap();
                    mine.push(g.job.id);
                }
            }
            mine
        }));
    }
    let mut seen = vec![want[0]];
    for t in tasks {
        seen.extend(t.await.unwrap());
    }
    seen.sort();
    assert_eq!(seen, want, "every job exactly once");
    let st = a.job_stats(T0 + 7).await.unwrap();
    assert_eq!(
        (
            st.by_status[&JobStatus::Done],
            st.by_status[&JobStatus::Queued]
        ),
        (60, 0)
    );
}

/// With `WAIT`, an enqueue is answered only once a replica holds the job, as an append is; a
/// retry with the dedupe key finds the job and is answered under the same rule.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_wait_replicas_an_enqueue_is_acknowledged_only_once_replicated() {
    let primary = RedisServer::start().unwrap();
    let mut opts = RedisOptions::new(&primary.url());
    opts.wait_replicas = 1;
    opts.wait_timeout = Duration::from_millis(300);
    let store = RedisStore::connect(opts, Arc::new(NoSink)).await.unwrap();
    let plain = connect(&primary, Arc::new(NoSink)).await;
    let keyed = || job("webhook:gh", QosClass::Interactive, Some("gh:1"));
    for (attempt, what) in [(0, "the job reached 0 of 1"), (1, "the earlier job")] {
        match store.job_enqueue(keyed(), &QueuedCaps::default(), T0).await {
            Err(StoreError::Unavailable(msg)) => assert!(msg.contains(what), "{attempt}: {msg}"),
            other => panic!("attempt {attempt}: expected Unavailable, got {other:?}"),
        }
    }
    let queued = plain.job_list(None, 10).await.unwrap();
    assert_eq!(queued.len(), 1, "queued once, however often retried");
    // A full queue is refused as such: nothing was written, there is nothing to wait for.
    let caps = QueuedCaps {
        per_class: [0, 1, 0],
    };
    assert_eq!(
        store
            .job_enqueue(job("report", QosClass::Interactive, None), &caps, T0)
            .await,
        Err(StoreError::QueueFull {
            class: QosClass::Interactive,
            cap: 1
        })
    );

    let _replica = RedisServer::start_with(RedisConfig {
        replica_of: Some(primary.port()),
        ..RedisConfig::default()
    })
    .unwrap();
    let open = QueuedCaps::default();
    let again = eventually(Duration::from_secs(15), || {
        store.job_enqueue(keyed(), &open, T0)
    })
    .await;
    assert_eq!(again, Enqueued::Existing(queued[0].id));
    // A new job too, once the replica confirms it (a loaded machine may let one WAIT time
    // out: the retry carries a dedupe key, so it never enqueues twice).
    let fresh = eventually(Duration::from_secs(15), || {
        store.job_enqueue(job("report", QosClass::Batch, Some("r:2")), &open, T0)
    })
    .await;
    assert!(fresh.id() > queued[0].id, "{fresh:?}");
    assert_eq!(plain.job_list(None, 10).await.unwrap().len(), 2);
}

/// Publish keys expire with the idempotency TTL; a stream whose keys all expired leaves the
/// set of streams with keys and comes back with its next keyed append. A record written
/// before keys had hit counters still answers its duplicates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_keys_expire_and_old_records_still_answer() {
    let server = RedisServer::start().unwrap();
    let mut opts = RedisOptions::new(&server.url());
    opts.retention = big();
    opts.idempotency_ttl_ms = 300;
    let store = RedisStore::connect(opts, Arc::new(NoSink)).await.unwrap();
    let keyed = |stream: &str, key: &str| {
        let mut r = req(stream, "1");
        r.idempotency = Some(IdempotencyKey {
            key: key.into(),
            fingerprint: [9; 32],
        });
        r
    };
    let first = store.append(keyed("orders", "o-1")).await.unwrap();
    store.append(keyed("orders", "o-2")).await.unwrap();
    assert!(
        store
            .append(keyed("orders", "o-1"))
            .await
            .unwrap()
            .duplicate
    );
    let listed = store
        .idem_list(Some("publish:orders"), 10, now_ms())
        .await
        .unwrap();
    assert_eq!(
        listed
            .iter()
            .map(|r| (
                r.key.as_str(),
                r.hit_count,
                r.expires_at_ms - r.created_at_ms
            ))
            .collect::<Vec<_>>(),
        vec![("o-2", 0, 300), ("o-1", 1, 300)]
    );
    assert_eq!(
        server
            .cmd(&["SISMEMBER", "zd:{idem}:ps", "orders"])
            .unwrap(),
        ":1"
    );

    tokio::time::sleep(Duration::from_millis(400)).await;
    let now = now_ms();
    assert!(store.idem_list(None, 10, now).await.unwrap().is_empty());
    assert!(store.idem_scopes(now).await.unwrap().is_empty());
    assert_eq!(
        server
            .cmd(&["SISMEMBER", "zd:{idem}:ps", "orders"])
            .unwrap(),
        ":0",
        "no keys left: no longer visited"
    );
    store.append(keyed("orders", "o-3")).await.unwrap();
    let scopes = store.idem_scopes(now_ms()).await.unwrap();
    assert_eq!(
        (
            scopes["publish:orders"].keys,
            scopes["publish:orders"].hit_count
        ),
        (1, 0)
    );

    // A record in the format from before hit counters (and no entry in the key index).
    let old = format!("{} {} {}", hex::encode([9; 32]), first.seq.0, first.epoch);
    assert_eq!(
        server
            .cmd(&["SET", "zd:{orders}:i:legacy", &old, "PX", "60000"])
            .unwrap(),
        "+OK"
    );
    let dup = store.append(keyed("orders", "legacy")).await.unwrap();
    assert_eq!((dup.seq, dup.duplicate), (first.seq, true));
    assert_eq!(server.cmd(&["GET", "zd:{orders}:ih:legacy"]).unwrap(), "$1");

    // A listing that did not happen (the `SADD` after an append failed, or its `WAIT` did):
    // the stream's next keyed append, a duplicate too, lists it.
    assert_eq!(
        server.cmd(&["HEXISTS", "zd:{orders}:m", "pk"]).unwrap(),
        ":1"
    );
    assert_eq!(server.cmd(&["HDEL", "zd:{orders}:m", "pk"]).unwrap(), ":1");
    assert_eq!(
        server.cmd(&["SREM", "zd:{idem}:ps", "orders"]).unwrap(),
        ":1"
    );
    assert!(
        store
            .append(keyed("orders", "o-3"))
            .await
            .unwrap()
            .duplicate
    );
    assert_eq!(
        server
            .cmd(&["SISMEMBER", "zd:{idem}:ps", "orders"])
            .unwrap(),
        ":1"
    );
    assert_eq!(
        server.cmd(&["HEXISTS", "zd:{orders}:m", "pk"]).unwrap(),
        ":1"
    );
    let all = store.idem_list(None, 10, now_ms()).await.unwrap();
    assert_eq!(
        all.iter()
            .map(|r| (r.key.as_str(), r.hit_count))
            .collect::<Vec<_>>(),
        vec![("o-3", 1)]
    );
}

/// The job queue and the idempotency records on a cluster: every script stays on its slot
/// (`{jobs}`, `{idem}`, the stream's), wherever those live. `room:0` holds one publish key with
/// one duplicate (set up by the caller).
pub async fn on_a_cluster(store: &RedisStore) {
    let open = RunningCaps::default();
    let a = enqueue(store, job("publish", QosClass::Batch, Some("d"))).await;
    let b = enqueue(store, job("publish", QosClass::Realtime, None)).await;
    assert_eq!(
        store
            .job_enqueue(
                job("publish", QosClass::Batch, Some("d")),
                &QueuedCaps::default(),
                T0
            )
            .await
            .unwrap(),
        Enqueued::Existing(a)
    );
    let got = store.job_claim("w", 10, &open, 1000, T0).await.unwrap();
    assert_eq!(ids(&got), vec![b, a]);
    store
        .job_heartbeat(got[0].lease, 1000, T0 + 1)
        .await
        .unwrap();
    store.job_complete(got[0].lease, T0 + 2).await.unwrap();
    let dead = Failure::Dead { error: "x".into() };
    store.job_fail(got[1].lease, dead, T0 + 3).await.unwrap();
    assert!(store.job_requeue(a, 3, T0 + 4).await.unwrap());
    let st = store.job_stats(T0 + 4).await.unwrap();
    assert_eq!(
        (
            st.by_status[&JobStatus::Queued],
            st.by_status[&JobStatus::Done]
        ),
        (1, 1)
    );
    assert_eq!(st.oldest_queued_at_ms, Some(T0));
    assert_eq!(store.job_list(None, 10).await.unwrap().len(), 2);
    assert_eq!(store.job_purge_done(T0 + 10).await.unwrap(), 1);
    assert_eq!(
        store
            .idem_begin("gh", "m", [1; 32], 60_000, 1000, T0)
            .await
            .unwrap(),
        IdemBegin::Fresh
    );
    store.idem_finish("gh", "m", "{}", T0).await.unwrap();
    assert_eq!(
        store.idem_list(Some("gh"), 10, T0).await.unwrap()[0].state,
        "done"
    );
    let now = now_ms();
    let all = store.idem_list(None, 10, now).await.unwrap();
    assert!(
        all.iter()
            .any(|r| r.scope == "publish:room:0" && r.key == "k" && r.hit_count == 1),
        "{all:?}"
    );
    let scopes = store.idem_scopes(now).await.unwrap();
    assert_eq!(scopes["gh"].keys, 1);
    assert_eq!(scopes["publish:room:0"].keys, 1);
}

/// xorshift64*: the same operations for a seed on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// The memory store's id for each of this store's ids (the i-th job enqueued in each).
#[derive(Default)]
struct Ids {
    to_memory: HashMap<u64, u64>,
}

impl Ids {
    /// An id this store never answered `New` with maps to `u64::MAX`: a mismatch the
    /// comparison then reports.
    fn id(&self, id: u64) -> u64 {
        self.to_memory.get(&id).copied().unwrap_or(u64::MAX)
    }

    fn job(&self, mut j: JobRecord) -> JobRecord {
        j.id = self.id(j.id);
        j
    }

    fn err<T>(&self, r: Result<T, StoreError>) -> Result<T, StoreError> {
        r.map_err(|e| match e {
            StoreError::StaleLease { job, attempt } => StoreError::StaleLease {
                job: self.id(job),
                attempt,
            },
            e => e,
        })
    }
}

#[track_caller]
fn agree<T: PartialEq + Debug>(step: usize, what: &str, redis: T, memory: T) {
    assert_eq!(
        redis, memory,
        "step {step}: {what} (left: redis, right: memory)"
    );
}

/// The job queue and the webhook idempotency records agree with the memory store over long
/// seeded sequences of random operations at controlled times: enqueues with dedupe keys and
/// queued caps, claims under class and kind caps (redeliveries of expired leases included),
/// heartbeats, completions, retries, dead letters, requeues and purges by current and stale
/// lease holders, begins and finishes of idempotency records that expire and are taken over;
/// stats and listings are compared all along.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guard_store_agrees_with_the_memory_store() {
    let server = RedisServer::start().unwrap();
    for seed in [1u64, 2, 3, 0x5eed] {
        assert_eq!(server.cmd(&["FLUSHALL"]).unwrap(), "+OK");
        let redis = connect(&server, Arc::new(NoSink)).await;
        let memory = MemoryStore::new(big(), Arc::new(NoSink));
        run_model(seed, &redis, &memory).await;
    }
}

async fn run_model(seed: u64, redis: &RedisStore, memory: &MemoryStore) {
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut ids = Ids::default();
    let mut jobs: Vec<(u64, u64)> = Vec::new();
    let mut leases: Vec<(Lease, Lease)> = Vec::new();
    let mut now = T0;
    let mut reached = std::collections::BTreeSet::new();
    let kinds = ["a", "b", "c"];
    for step in 0..400 {
        now += rng.below(200);
        match rng.below(100) {
            0..=29 => {
                let mut j = job(
                    kinds[rng.below(3) as usize],
                    QosClass::ALL[rng.below(3) as usize],
                    None,
                );
                if rng.chance(30) {
                    j.dedupe_key = Some(format!("d{}", rng.below(5)));
                }
                j.available_at_ms = if rng.chance(70) {
                    now - rng.below(100)
                } else {
                    now + rng.below(500)
                };
                let caps = if rng.chance(20) {
                    QueuedCaps {
                        per_class: [rng.below(4), rng.below(4), rng.below(4)],
                    }
                } else {
                    QueuedCaps::default()
                };
                let r = redis.job_enqueue(j.clone(), &caps, now).await;
                let m = memory.job_enqueue(j, &caps, now).await;
                if let (Ok(Enqueued::New(r)), Ok(Enqueued::New(m))) = (&r, &m) {
                    ids.to_memory.insert(*r, *m);
                    jobs.push((*r, *m));
                }
                let r = r.map(|e| match e {
                    Enqueued::New(id) => Enqueued::New(ids.id(id)),
                    Enqueued::Existing(id) => Enqueued::Existing(ids.id(id)),
                });
                agree(step, "enqueue", r, m);
            }
            30..=54 => {
                let mut caps = RunningCaps::default();
                if rng.chance(50) {
                    caps.per_class = [rng.below(3), rng.below(3), rng.below(4)];
                }
                if rng.chance(40) {
                    caps.per_kind.insert("a".into(), 1 + rng.below(2));
                }
                if rng.chance(30) {
                    caps.default_per_kind = 1 + rng.below(3);
                }
                let worker = format!("w{}", rng.below(3));
                let limit = 1 + rng.below(5) as usize;
                let lease_ms = 100 + rng.below(900);
                let r = redis.job_claim(&worker, limit, &caps, lease_ms, now).await;
                let m = memory.job_claim(&worker, limit, &caps, lease_ms, now).await;
                let (r, m) = (r.unwrap(), m.unwrap());
                for (r, m) in r.iter().zip(&m) {
                    leases.push((r.lease, m.lease));
                }
                let r: Vec<(u32, JobRecord)> = r
                    .into_iter()
                    .map(|l| (l.lease.attempt, ids.job(l.job)))
                    .collect();
                let m: Vec<(u32, JobRecord)> =
                    m.into_iter().map(|l| (l.lease.attempt, l.job)).collect();
                agree(step, "claim", r, m);
            }
            55..=84 if !leases.is_empty() => {
                // Mostly a recent lease (likely still held), sometimes any (likely stale).
                let n = leases.len() as u64;
                let i = if rng.chance(70) {
                    n - 1 - rng.below(n.min(4))
                } else {
                    rng.below(n)
                };
                let (rl, ml) = leases[i as usize];
                let (what, r, m) = match rng.below(10) {
                    0..=3 => (
                        "complete",
                        redis.job_complete(rl, now).await,
                        memory.job_complete(ml, now).await,
                    ),
                    4..=5 => (
                        "heartbeat",
                        redis.job_heartbeat(rl, 500, now).await,
                        memory.job_heartbeat(ml, 500, now).await,
                    ),
                    6..=7 => {
                        let f = Failure::Retry {
                            at_ms: now + rng.below(300),
                            error: format!("e{step}"),
                            counted: rng.chance(70),
                        };
                        (
                            "retry",
                            redis.job_fail(rl, f.clone(), now).await,
                            memory.job_fail(ml, f, now).await,
                        )
                    }
                    _ => {
                        let f = Failure::Dead {
                            error: format!("dead {step}"),
                        };
                        (
                            "dead",
                            redis.job_fail(rl, f.clone(), now).await,
                            memory.job_fail(ml, f, now).await,
                        )
                    }
                };
                agree(step, what, ids.err(r), m);
            }
            85..=89 if !jobs.is_empty() => {
                let (r, m) = jobs[rng.below(jobs.len() as u64) as usize];
                agree(
                    step,
                    "requeue",
                    redis.job_requeue(r, 3, now).await,
                    memory.job_requeue(m, 3, now).await,
                );
            }
            90..=91 => {
                let before = now - rng.below(2000);
                agree(
                    step,
                    "purge",
                    redis.job_purge_done(before).await,
                    memory.job_purge_done(before).await,
                );
            }
            _ => idem_step(&mut rng, step, now, redis, memory).await,
        }
        if step % 5 == 0 {
            idem_step(&mut rng, step, now, redis, memory).await;
        }
        // Every state some job was in after some step (the memory store is cheap to ask).
        reached.extend(
            memory
                .job_list(None, usize::MAX)
                .await
                .unwrap()
                .iter()
                .map(|j| j.status),
        );
        if step % 10 == 9 {
            agree(
                step,
                "stats",
                redis.job_stats(now).await,
                memory.job_stats(now).await,
            );
            let r = redis.job_list(None, 1000).await.unwrap();
            let r: Vec<JobRecord> = r.into_iter().map(|j| ids.job(j)).collect();
            agree(step, "list", r, memory.job_list(None, 1000).await.unwrap());
            for st in JobStatus::ALL {
                let r = redis.job_list(Some(st), 3).await.unwrap();
                let r: Vec<JobRecord> = r.into_iter().map(|j| ids.job(j)).collect();
                agree(
                    step,
                    st.as_str(),
                    r,
                    memory.job_list(Some(st), 3).await.unwrap(),
                );
            }
            let scope = ["gh", "stripe"][rng.below(2) as usize];
            agree(
                step,
                "idem list",
                redis.idem_list(Some(scope), 3, now).await,
                memory.idem_list(Some(scope), 3, now).await,
            );
            let all: Result<Vec<IdemRecord>, _> = redis.idem_list(None, 100, now).await;
            agree(
                step,
                "idem list all",
                all,
                memory.idem_list(None, 100, now).await,
            );
            agree(
                step,
                "idem scopes",
                redis.idem_scopes(now).await,
                memory.idem_scopes(now).await,
            );
        }
    }
    // The sequence did reach every state (a model test that never gets there proves little).
    assert_eq!(
        reached.into_iter().collect::<Vec<_>>(),
        JobStatus::ALL.to_vec(),
        "seed {seed}"
    );
}

async fn idem_step(rng: &mut Rng, step: usize, now: u64, redis: &RedisStore, memory: &MemoryStore) {
    let scope = ["gh", "stripe"][rng.below(2) as usize];
    let key = format!("k{}", rng.below(6));
    if rng.chance(70) {
        let fp = if rng.chance(90) { [1; 32] } else { [2; 32] };
        // TTLs of seconds in this test's time, which runs far ahead of the server's clock:
        // the records expire here long before Redis' own TTL collects them.
        let ttl = 3000 + rng.below(3000);
        let claim = 200 + rng.below(800);
        agree(
            step,
            "idem begin",
            redis.idem_begin(scope, &key, fp, ttl, claim, now).await,
            memory.idem_begin(scope, &key, fp, ttl, claim, now).await,
        );
    } else {
        let answer = format!("{{\"step\":{step}}}");
        agree(
            step,
            "idem finish",
            redis.idem_finish(scope, &key, &answer, now).await,
            memory.idem_finish(scope, &key, &answer, now).await,
        );
    }
}
