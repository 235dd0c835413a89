//! The job queue and the webhook idempotency records, one suite run against every store.
//! Time is passed in explicitly (`now_ms`), so every lease expiry and backoff is exact.

use std::collections::BTreeSet;
use std::sync::Arc;

use zerodrop_core::retention::Retention;
use zerodrop_store::{
    AppendRequest, Enqueued, Failure, IdemBegin, IdempotencyKey, JobStatus, Lease, MemoryStore,
    NewJob, NoSink, QosClass, QueuedCaps, RedisOptions, RedisStore, RunningCaps, SqliteOptions,
    SqliteStore, Store, StoreError,
};
use zerodrop_testkit::redis::RedisServer;

struct Fixture {
    store: Arc<dyn Store>,
    _dir: Option<tempfile::TempDir>,
    _redis: Option<RedisServer>,
}

fn memory() -> Fixture {
    Fixture {
        store: Arc::new(MemoryStore::new(Retention::default(), Arc::new(NoSink))),
        _dir: None,
        _redis: None,
    }
}

fn sqlite() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(
        SqliteOptions::new(dir.path().join("zerodrop.db")),
        Arc::new(NoSink),
    )
    .unwrap();
    Fixture {
        store: Arc::new(store),
        _dir: Some(dir),
        _redis: None,
    }
}

async fn redis() -> Fixture {
    let server = RedisServer::start().expect("start redis-server");
    let store = RedisStore::connect(RedisOptions::new(&server.url()), Arc::new(NoSink))
        .await
        .unwrap();
    Fixture {
        store: Arc::new(store),
        _dir: None,
        _redis: Some(server),
    }
}

const T0: u64 = 1_800_000_000_000;

fn job(kind: &str, class: QosClass) -> NewJob {
    NewJob {
        kind: kind.into(),
        class,
        upstream: "app".into(),
        payload: format!("{{\"kind\":\"{kind}\"}}"),
        dedupe_key: None,
        max_attempts: 3,
        available_at_ms: T0,
    }
}

fn open() -> RunningCaps {
    RunningCaps::default()
}

fn ids(jobs: &[zerodrop_store::LeasedJob]) -> Vec<u64> {
    jobs.iter().map(|j| j.job.id).collect()
}

async fn enqueue(f: &Fixture, j: NewJob) -> u64 {
    match f
        .store
        .job_enqueue(j, &QueuedCaps::default(), T0)
        .await
        .unwrap()
    {
        Enqueued::New(id) => id,
        e => panic!("expected a new job, got {e:?}"),
    }
}

async fn claim_lease_complete(f: Fixture) {
    let s = &f.store;
    let a = enqueue(&f, job("publish", QosClass::Batch)).await;
    let b = enqueue(&f, job("publish", QosClass::Batch)).await;
    assert!(b > a, "ids grow: {a} then {b}");
    let got = s.job_claim("w1", 1, &open(), 1000, T0).await.unwrap();
    assert_eq!(ids(&got), vec![a]);
    let l = got[0].lease;
    assert_eq!(l, Lease { job: a, attempt: 1 });
    assert_eq!(got[0].job.status, JobStatus::Running);
    assert_eq!(got[0].job.worker.as_deref(), Some("w1"));
    assert_eq!(got[0].job.lease_expires_at_ms, T0 + 1000);
    assert_eq!(got[0].job.payload, "{\"kind\":\"publish\"}");
    // A heartbeat moves the lease: at T0+1500 the job is still held.
    s.job_heartbeat(l, 1000, T0 + 900).await.unwrap();
    let got = s
        .job_claim("w2", 10, &open(), 1000, T0 + 1500)
        .await
        .unwrap();
    assert_eq!(ids(&got), vec![b], "a is held until T0+1900");
    s.job_complete(l, T0 + 1600).await.unwrap();
    let done = s.job_get(a).await.unwrap().unwrap();
    assert_eq!(done.status, JobStatus::Done);
    assert_eq!(done.finished_at_ms, T0 + 1600);
    assert_eq!(done.attempts, 1);
    // Completing twice is refused.
    assert_eq!(
        s.job_complete(l, T0 + 1700).await.unwrap_err(),
        StoreError::StaleLease { job: a, attempt: 1 }
    );
    assert!(s.job_get(999_999).await.unwrap().is_none());
}

async fn expired_lease_is_redelivered_and_the_stale_worker_refused(f: Fixture) {
    let s = &f.store;
    let a = enqueue(&f, job("publish", QosClass::Realtime)).await;
    let first = s.job_claim("w1", 10, &open(), 1000, T0).await.unwrap();
    assert!(
        s.job_claim("w2", 10, &open(), 1000, T0 + 999)
            .await
            .unwrap()
            .is_empty()
    );
    // w1 died: at T0+1000 the lease has expired and w2 gets the job, attempt 2.
    let second = s
        .job_claim("w2", 10, &open(), 1000, T0 + 1000)
        .await
        .unwrap();
    assert_eq!(ids(&second), vec![a]);
    assert_eq!(second[0].lease.attempt, 2);
    let stale = first[0].lease;
    let stale_err = StoreError::StaleLease { job: a, attempt: 1 };
    assert_eq!(
        s.job_complete(stale, T0 + 1100).await.unwrap_err(),
        stale_err
    );
    assert_eq!(
        s.job_heartbeat(stale, 1000, T0 + 1100).await.unwrap_err(),
        stale_err
    );
    let retry = Failure::Retry {
        at_ms: T0,
        error: "x".into(),
        counted: true,
    };
    assert_eq!(
        s.job_fail(stale, retry, T0 + 1100).await.unwrap_err(),
        stale_err
    );
    let j = s.job_get(a).await.unwrap().unwrap();
    assert_eq!(
        (j.status, j.attempts, j.worker.as_deref()),
        (JobStatus::Running, 2, Some("w2"))
    );
    s.job_complete(second[0].lease, T0 + 1200).await.unwrap();
    assert_eq!(s.job_get(a).await.unwrap().unwrap().status, JobStatus::Done);
    // An expired lease nobody claimed since is still the current one.
    let c = enqueue(&f, job("publish", QosClass::Realtime)).await;
    let got = s
        .job_claim("w3", 10, &open(), 100, T0 + 2000)
        .await
        .unwrap();
    assert_eq!(ids(&got), vec![c]);
    s.job_complete(got[0].lease, T0 + 5000).await.unwrap();
}

async fn retries_backoff_dead_letter_and_requeue(f: Fixture) {
    let s = &f.store;
    let a = enqueue(&f, job("webhook:gh", QosClass::Interactive)).await;
    let l1 = s.job_claim("w", 1, &open(), 1000, T0).await.unwrap()[0].lease;
    let retry = |at: u64| Failure::Retry {
        at_ms: at,
        error: "upstream 500".into(),
        counted: true,
    };
    s.job_fail(l1, retry(T0 + 500), T0 + 10).await.unwrap();
    let j = s.job_get(a).await.unwrap().unwrap();
    assert_eq!(j.status, JobStatus::Queued);
    assert_eq!(j.available_at_ms, T0 + 500);
    assert_eq!(j.last_error.as_deref(), Some("upstream 500"));
    assert_eq!(j.lease_expires_at_ms, 0);
    assert!(
        s.job_claim("w", 1, &open(), 1000, T0 + 499)
            .await
            .unwrap()
            .is_empty(),
        "backoff"
    );
    let l2 = s.job_claim("w", 1, &open(), 1000, T0 + 500).await.unwrap()[0].lease;
    assert_eq!(l2.attempt, 2);
    // An uncounted retry (the upstream was never reached) gives the attempt back.
    s.job_fail(
        l2,
        Failure::Retry {
            at_ms: T0 + 600,
            error: "circuit open".into(),
            counted: false,
        },
        T0 + 501,
    )
    .await
    .unwrap();
    assert_eq!(s.job_get(a).await.unwrap().unwrap().attempts, 1);
    let l3 = s.job_claim("w", 1, &open(), 1000, T0 + 600).await.unwrap()[0].lease;
    assert_eq!(l3.attempt, 2);
    s.job_fail(
        l3,
        Failure::Dead {
            error: "gave up".into(),
        },
        T0 + 700,
    )
    .await
    .unwrap();
    let dead = s.job_get(a).await.unwrap().unwrap();
    assert_eq!(dead.status, JobStatus::Dead);
    assert_eq!(dead.last_error.as_deref(), Some("gave up"));
    assert_eq!(dead.finished_at_ms, T0 + 700);
    assert!(
        s.job_claim("w", 1, &open(), 1000, T0 + 10_000)
            .await
            .unwrap()
            .is_empty()
    );
    let listed = s.job_list(Some(JobStatus::Dead), 10).await.unwrap();
    assert_eq!(listed.iter().map(|j| j.id).collect::<Vec<_>>(), vec![a]);
    assert!(
        !s.job_requeue(a + 1000, 3, T0 + 800).await.unwrap(),
        "unknown id"
    );
    assert!(s.job_requeue(a, 3, T0 + 800).await.unwrap());
    assert!(
        !s.job_requeue(a, 3, T0 + 800).await.unwrap(),
        "no longer a dead letter"
    );
    let j = s.job_get(a).await.unwrap().unwrap();
    // Three more attempts; the count goes on, so no earlier lease becomes current again.
    assert_eq!(
        (j.status, j.attempts, j.max_attempts, j.available_at_ms),
        (JobStatus::Queued, 2, 5, T0 + 800)
    );
    let l = s.job_claim("w", 1, &open(), 1000, T0 + 800).await.unwrap()[0].lease;
    assert_eq!(l.attempt, 3);
    assert_eq!(
        s.job_complete(l2, T0 + 850).await.unwrap_err(),
        StoreError::StaleLease { job: a, attempt: 2 },
        "a lease from before the dead letter"
    );
    s.job_complete(l, T0 + 900).await.unwrap();
    // A done job is not a dead letter.
    assert!(!s.job_requeue(a, 3, T0 + 1000).await.unwrap());
}

async fn classes_in_priority_and_caps(f: Fixture) {
    let s = &f.store;
    let b1 = enqueue(&f, job("report", QosClass::Batch)).await;
    let i1 = enqueue(&f, job("publish", QosClass::Interactive)).await;
    let r1 = enqueue(&f, job("publish", QosClass::Realtime)).await;
    let r2 = enqueue(&f, job("publish", QosClass::Realtime)).await;
    let mut later = job("publish", QosClass::Realtime);
    later.available_at_ms = T0 + 5000;
    let r3 = enqueue(&f, later).await;
    // Priority: realtime (oldest first), then interactive, then batch; r3 is not due.
    let got = s.job_claim("w", 10, &open(), 60_000, T0).await.unwrap();
    assert_eq!(ids(&got), vec![r1, r2, i1, b1]);
    for j in &got {
        s.job_complete(j.lease, T0 + 1).await.unwrap();
    }
    // Running caps: realtime at most 1, kind "publish" at most 2.
    let mut caps = RunningCaps {
        per_class: [1, 0, 0],
        default_per_kind: 0,
        ..Default::default()
    };
    caps.per_kind.insert("publish".into(), 2);
    let x1 = enqueue(&f, job("publish", QosClass::Realtime)).await;
    let x2 = enqueue(&f, job("publish", QosClass::Realtime)).await;
    let y1 = enqueue(&f, job("publish", QosClass::Batch)).await;
    let y2 = enqueue(&f, job("publish", QosClass::Batch)).await;
    let z1 = enqueue(&f, job("report", QosClass::Batch)).await;
    let got = s
        .job_claim("w", 10, &caps, 60_000, T0 + 6000)
        .await
        .unwrap();
    // x1 (the oldest due realtime job) fills the realtime cap, so x2 and r3 wait; y1 is the
    // second publish; y2 would be a third; z1 is another kind.
    assert_eq!(ids(&got), vec![x1, y1, z1]);
    // Caps count what is still running: nothing more until one finishes.
    assert!(
        s.job_claim("w", 10, &caps, 60_000, T0 + 6001)
            .await
            .unwrap()
            .is_empty()
    );
    s.job_complete(got[0].lease, T0 + 6002).await.unwrap();
    let next = s
        .job_claim("w", 10, &caps, 60_000, T0 + 6003)
        .await
        .unwrap();
    assert_eq!(ids(&next), vec![x2]);
    let _ = (r3, y2);
    // Queued caps: at most 2 queued batch jobs (y2 is one).
    let qcaps = QueuedCaps {
        per_class: [0, 0, 2],
    };
    s.job_enqueue(job("report", QosClass::Batch), &qcaps, T0)
        .await
        .unwrap();
    assert_eq!(
        s.job_enqueue(job("report", QosClass::Batch), &qcaps, T0)
            .await
            .unwrap_err(),
        StoreError::QueueFull {
            class: QosClass::Batch,
            cap: 2
        }
    );
    // Another class is not affected.
    s.job_enqueue(job("report", QosClass::Interactive), &qcaps, T0)
        .await
        .unwrap();
}

async fn dedupe_keys_and_stats(f: Fixture) {
    let s = &f.store;
    let mut j = job("webhook:gh", QosClass::Interactive);
    j.dedupe_key = Some("gh:123".into());
    let a = s
        .job_enqueue(j.clone(), &QueuedCaps::default(), T0)
        .await
        .unwrap();
    let b = s
        .job_enqueue(j.clone(), &QueuedCaps::default(), T0 + 1)
        .await
        .unwrap();
    assert!(matches!(a, Enqueued::New(_)));
    assert_eq!(b, Enqueued::Existing(a.id()));
    enqueue(&f, job("publish", QosClass::Realtime)).await;
    let mut late = job("publish", QosClass::Batch);
    late.available_at_ms = T0 + 60_000;
    enqueue(&f, late).await;
    let st = s.job_stats(T0 + 10).await.unwrap();
    assert_eq!(st.by_status[&JobStatus::Queued], 3);
    assert_eq!(st.by_status[&JobStatus::Running], 0);
    assert_eq!(st.by_status[&JobStatus::Dead], 0);
    assert_eq!(st.queued_by_class[&QosClass::Interactive], 1);
    assert_eq!(st.queued_by_class[&QosClass::Batch], 1);
    assert_eq!(
        st.oldest_queued_at_ms,
        Some(T0),
        "the not-yet-due job does not count"
    );
    let got = s.job_claim("w", 10, &open(), 1000, T0 + 10).await.unwrap();
    assert_eq!(got.len(), 2);
    let st = s.job_stats(T0 + 10).await.unwrap();
    assert_eq!(st.by_status[&JobStatus::Running], 2);
    assert_eq!(st.running_by_class[&QosClass::Realtime], 1);
    assert_eq!(st.oldest_queued_at_ms, None);
    for g in &got {
        s.job_complete(g.lease, T0 + 20).await.unwrap();
    }
    // While the job exists its key holds; purging done jobs frees it.
    let c = s
        .job_enqueue(j.clone(), &QueuedCaps::default(), T0 + 30)
        .await
        .unwrap();
    assert_eq!(c, Enqueued::Existing(a.id()));
    assert_eq!(
        s.job_purge_done(T0 + 20).await.unwrap(),
        0,
        "finished at T0+20, not before"
    );
    assert_eq!(s.job_purge_done(T0 + 21).await.unwrap(), 2);
    assert!(s.job_get(a.id()).await.unwrap().is_none());
    let d = s
        .job_enqueue(j, &QueuedCaps::default(), T0 + 40)
        .await
        .unwrap();
    assert!(matches!(d, Enqueued::New(id) if id != a.id()));
    let all = s.job_list(None, 10).await.unwrap();
    let listed: Vec<u64> = all.iter().map(|j| j.id).collect();
    let mut sorted = listed.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    assert_eq!(listed, sorted, "newest first");
    assert_eq!(s.job_list(None, 1).await.unwrap().len(), 1);
}

async fn concurrent_claims_hand_each_job_out_once(f: Fixture) {
    let mut want = BTreeSet::new();
    for _ in 0..40 {
        want.insert(enqueue(&f, job("publish", QosClass::Interactive)).await);
    }
    let mut tasks = Vec::new();
    for w in 0..8 {
        let s = f.store.clone();
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let got = s
                    .job_claim(&format!("w{w}"), 3, &RunningCaps::default(), 60_000, T0)
                    .await
                    .unwrap();
                if got.is_empty() {
                    return mine;
                }
                for g in got {
                    s.job_complete(g.lease, T0 + 1).await.unwrap();
                    mine.push(g.job.id);
                }
            }
        }));
    }
    let mut seen = Vec::new();
    for t in tasks {
        seen.extend(t.await.unwrap());
    }
    seen.sort();
    assert_eq!(seen, want.into_iter().collect::<Vec<_>>(), "every job once");
}

fn fp(b: u8) -> [u8; 32] {
    [b; 32]
}

const TTL: u64 = 72 * 3600 * 1000;

async fn webhook_idempotency(f: Fixture) {
    let s = &f.store;
    assert_eq!(
        s.idem_begin("gh", "m1", fp(1), TTL, 30_000, T0)
            .await
            .unwrap(),
        IdemBegin::Fresh
    );
    // A concurrent duplicate while the first runs.
    assert_eq!(
        s.idem_begin("gh", "m1", fp(1), TTL, 30_000, T0 + 1)
            .await
            .unwrap(),
        IdemBegin::InProgress
    );
    assert_eq!(
        s.idem_begin("gh", "m1", fp(2), TTL, 30_000, T0 + 1)
            .await
            .unwrap(),
        IdemBegin::Reused
    );
    s.idem_finish("gh", "m1", "{\"status\":202}", T0 + 2)
        .await
        .unwrap();
    assert_eq!(
        s.idem_begin("gh", "m1", fp(1), TTL, 30_000, T0 + 3)
            .await
            .unwrap(),
        IdemBegin::Done {
            answer: "{\"status\":202}".into(),
            hit_count: 2
        }
    );
    assert_eq!(
        s.idem_begin("gh", "m1", fp(2), TTL, 30_000, T0 + 3)
            .await
            .unwrap(),
        IdemBegin::Reused
    );
    // Another scope is another key.
    assert_eq!(
        s.idem_begin("stripe", "m1", fp(2), TTL, 30_000, T0 + 4)
            .await
            .unwrap(),
        IdemBegin::Fresh
    );
    // A lapsed claim (the owner crashed) is taken over.
    assert_eq!(
        s.idem_begin("gh", "m2", fp(1), TTL, 1000, T0 + 5)
            .await
            .unwrap(),
        IdemBegin::Fresh
    );
    assert_eq!(
        s.idem_begin("gh", "m2", fp(1), TTL, 1000, T0 + 1004)
            .await
            .unwrap(),
        IdemBegin::InProgress
    );
    assert_eq!(
        s.idem_begin("gh", "m2", fp(1), TTL, 1000, T0 + 1005)
            .await
            .unwrap(),
        IdemBegin::Fresh
    );
    s.idem_finish("gh", "m2", "{}", T0 + 1006).await.unwrap();
    let listed = s.idem_list(Some("gh"), 10, T0 + 2000).await.unwrap();
    let keys: Vec<(&str, &str, u64)> = listed
        .iter()
        .map(|r| (r.key.as_str(), r.state, r.hit_count))
        .collect();
    assert_eq!(
        keys,
        vec![("m2", "done", 1), ("m1", "done", 2)],
        "newest first"
    );
    assert_eq!(listed[1].created_at_ms, T0);
    assert_eq!(listed[1].expires_at_ms, T0 + TTL);
    assert_eq!(
        s.idem_list(Some("gh"), 1, T0 + 2000).await.unwrap().len(),
        1
    );
    let scopes = s.idem_scopes(T0 + 2000).await.unwrap();
    assert_eq!((scopes["gh"].keys, scopes["gh"].hit_count), (2, 3));
    assert_eq!((scopes["stripe"].keys, scopes["stripe"].hit_count), (1, 0));
    // Expiry: after the TTL the key is new again and no longer listed.
    assert!(
        s.idem_list(Some("gh"), 10, T0 + TTL + 5000)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        s.idem_begin("gh", "m1", fp(2), TTL, 30_000, T0 + TTL + 1)
            .await
            .unwrap(),
        IdemBegin::Fresh
    );
}

async fn concurrent_webhook_duplicates_begin_once(f: Fixture) {
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let s = f.store.clone();
        tasks.push(tokio::spawn(async move {
            s.idem_begin("gh", "same", fp(7), TTL, 30_000, T0)
                .await
                .unwrap()
        }));
    }
    let mut fresh = 0;
    for t in tasks {
        match t.await.unwrap() {
            IdemBegin::Fresh => fresh += 1,
            IdemBegin::InProgress => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(fresh, 1);
    let r = &f.store.idem_list(Some("gh"), 10, T0).await.unwrap()[0];
    assert_eq!((r.state, r.hit_count), ("in_progress", 15));
}

async fn publish_keys_are_listed_with_their_hits(f: Fixture) {
    let s = &f.store;
    let r = AppendRequest {
        stream: zerodrop_core::StreamId::new("orders").unwrap(),
        data: "{\"n\":1}".into(),
        idempotency: Some(IdempotencyKey {
            key: "order-1".into(),
            fingerprint: fp(3),
        }),
    };
    s.append(r.clone()).await.unwrap();
    s.append(r.clone()).await.unwrap();
    s.append(r).await.unwrap();
    let now = zerodrop_core::now_ms();
    let listed = s.idem_list(Some("publish:orders"), 10, now).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (listed[0].key.as_str(), listed[0].state, listed[0].hit_count),
        ("order-1", "done", 2)
    );
    let all = s.idem_list(None, 10, now).await.unwrap();
    assert!(
        all.iter()
            .any(|r| r.scope == "publish:orders" && r.key == "order-1")
    );
    let scopes = s.idem_scopes(now).await.unwrap();
    assert_eq!(
        (
            scopes["publish:orders"].keys,
            scopes["publish:orders"].hit_count
        ),
        (1, 2)
    );
    assert!(
        s.idem_list(Some("publish:other"), 10, now)
            .await
            .unwrap()
            .is_empty()
    );
}

macro_rules! suite {
    ($($name:ident;)*) => {
        mod memory_store {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::memory()).await })*
        }
        mod sqlite_store {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::sqlite()).await })*
        }
        mod redis_store {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::redis().await).await })*
        }
    };
}

suite! {
    claim_lease_complete;
    expired_lease_is_redelivered_and_the_stale_worker_refused;
    retries_backoff_dead_letter_and_requeue;
    classes_in_priority_and_caps;
    dedupe_keys_and_stats;
    concurrent_claims_hand_each_job_out_once;
    webhook_idempotency;
    concurrent_webhook_duplicates_begin_once;
    publish_keys_are_listed_with_their_hits;
}
