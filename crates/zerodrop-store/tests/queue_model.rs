//! The job queue and the webhook idempotency records of the `sqlite` store, property-tested
//! against the `memory` store as the model: random enqueues (dedupe keys, classes, queued
//! caps, jobs not due yet), claims under running caps, heartbeats, completions, failures
//! (counted and uncounted retries, dead letters), requeues, purges, idempotency begins and
//! finishes, with time moving forward between them. Leases are drawn from every lease ever
//! handed out, so stale ones are exercised as much as current ones. After every step both
//! stores must have answered the same (values and errors alike) and must show the same jobs,
//! counts and records.

use std::collections::BTreeMap;
use std::sync::Arc;

use proptest::prelude::*;
use zerodrop_core::retention::Retention;
use zerodrop_store::{
    Failure, GuardStore, JobStatus, Lease, MemoryStore, NewJob, NoSink, QosClass, QueuedCaps,
    RunningCaps, SqliteOptions, SqliteStore, Synchronous,
};

/// Far beyond any wall clock the stores' own sweeps could compare these times with.
const T0: u64 = 4_000_000_000_000;
const KINDS: [&str; 3] = ["publish", "webhook:gh", "report"];
const SCOPES: [&str; 2] = ["gh", "stripe"];

#[derive(Clone, Debug)]
enum Op {
    Enqueue {
        kind: usize,
        class: usize,
        dedupe: Option<u8>,
        delay_ms: u64,
        max_attempts: u32,
        queued_cap: u64,
    },
    Claim {
        worker: usize,
        limit: usize,
        class_caps: [u64; 3],
        /// A cap for `KINDS[0]` (0: none) and for every other kind.
        kind_cap: u64,
        default_kind_cap: u64,
        lease_ms: u64,
    },
    Heartbeat {
        lease: LeasePick,
        lease_ms: u64,
    },
    Complete {
        lease: LeasePick,
    },
    Retry {
        lease: LeasePick,
        delay_ms: u64,
        counted: bool,
    },
    Dead {
        lease: LeasePick,
    },
    Requeue {
        /// Mostly a dead letter, otherwise any id enqueued so far or the next one (no such job).
        dead_letter: bool,
        job: usize,
    },
    Purge {
        /// Mostly right at a done job's finish time (`+ ms`), otherwise `now - ms`.
        at_done: bool,
        job: usize,
        ms: u64,
    },
    IdemBegin {
        scope: usize,
        key: u8,
        fingerprint: u8,
        ttl_ms: u64,
        claim_ms: u64,
    },
    IdemFinish {
        scope: usize,
        key: u8,
    },
    Advance {
        ms: u64,
    },
}

/// A duration of 0 to `max` steps of 100 ms: coarse, so that leases, backoffs, claims and
/// expiries often end exactly at a `now` the test uses (where `<` and `<=` differ).
fn ticks(max: u64) -> impl Strategy<Value = u64> {
    (0..=max).prop_map(|n| n * 100)
}

/// Which lease an operation presents: mostly one of the last few handed out (often still
/// current), otherwise any (mostly stale).
fn lease() -> impl Strategy<Value = LeasePick> {
    prop_oneof![
        3 => (0usize..2).prop_map(LeasePick::Recent),
        1 => any::<usize>().prop_map(LeasePick::Any),
    ]
}

fn job_op() -> impl Strategy<Value = Op> {
    let cap = || prop_oneof![2 => Just(0u64), 1 => 1u64..3];
    // Mostly due at once and claims that take something, so that leases get used.
    let due = prop_oneof![2 => Just(0u64), 1 => ticks(8)];
    let limit = prop_oneof![1 => Just(0usize), 4 => 1usize..4];
    prop_oneof![
        5 => (0..KINDS.len(), 0usize..3, prop::option::of(0u8..3), due, 1u32..4, cap())
            .prop_map(|(kind, class, dedupe, delay_ms, max_attempts, queued_cap)| Op::Enqueue {
                kind, class, dedupe, delay_ms, max_attempts, queued_cap,
            }),
        5 => (0usize..3, limit, [cap(), cap(), cap()], cap(), cap(), ticks(5))
            .prop_map(|(worker, limit, class_caps, kind_cap, default_kind_cap, lease_ms)| Op::Claim {
                worker, limit, class_caps, kind_cap, default_kind_cap, lease_ms,
            }),
        1 => (lease(), ticks(5)).prop_map(|(lease, lease_ms)| Op::Heartbeat { lease, lease_ms }),
        3 => lease().prop_map(|lease| Op::Complete { lease }),
        2 => (lease(), ticks(5), any::<bool>())
            .prop_map(|(lease, delay_ms, counted)| Op::Retry { lease, delay_ms, counted }),
        2 => lease().prop_map(|lease| Op::Dead { lease }),
        2 => (prop::bool::weighted(0.75), any::<usize>())
            .prop_map(|(dead_letter, job)| Op::Requeue { dead_letter, job }),
        2 => (prop::bool::weighted(0.75), any::<usize>(), ticks(2))
            .prop_map(|(at_done, job, ms)| Op::Purge { at_done, job, ms }),
        3 => ticks(8).prop_map(|ms| Op::Advance { ms }),
    ]
}

fn idem_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (0..SCOPES.len(), 0u8..3, 0u8..2, ticks(10), ticks(5))
            .prop_map(|(scope, key, fingerprint, ttl_ms, claim_ms)| Op::IdemBegin {
                scope, key, fingerprint, ttl_ms, claim_ms,
            }),
        2 => (0..SCOPES.len(), 0u8..3).prop_map(|(scope, key)| Op::IdemFinish { scope, key }),
        3 => ticks(5).prop_map(|ms| Op::Advance { ms }),
    ]
}

#[derive(Clone, Copy, Debug)]
enum LeasePick {
    /// The n-th newest lease handed out.
    Recent(usize),
    Any(usize),
}

/// One of the leases handed out so far (a made-up one before the first claim).
fn pick(leases: &[Lease], p: LeasePick) -> Lease {
    match p {
        _ if leases.is_empty() => Lease { job: 1, attempt: 1 },
        LeasePick::Recent(n) => leases[leases.len() - 1 - n.min(leases.len() - 1)],
        LeasePick::Any(i) => leases[i % leases.len()],
    }
}

async fn check(model: &MemoryStore, sqlite: &SqliteStore, ops: Vec<Op>) {
    let mut now = T0;
    let mut leases: Vec<Lease> = Vec::new();
    for (step, op) in ops.into_iter().enumerate() {
        let at = format!("step {step}: {op:?} at T0+{}", now - T0);
        match op {
            Op::Enqueue {
                kind,
                class,
                dedupe,
                delay_ms,
                max_attempts,
                queued_cap,
            } => {
                let job = NewJob {
                    kind: KINDS[kind].into(),
                    class: QosClass::ALL[class],
                    upstream: "app".into(),
                    payload: format!("{{\"step\":{step}}}"),
                    dedupe_key: dedupe.map(|d| format!("d{d}")),
                    max_attempts,
                    available_at_ms: now + delay_ms,
                };
                let mut caps = QueuedCaps::default();
                caps.per_class[class] = queued_cap;
                let want = model.job_enqueue(job.clone(), &caps, now).await;
                let got = sqlite.job_enqueue(job, &caps, now).await;
                assert_eq!(got, want, "{at}");
            }
            Op::Claim {
                worker,
                limit,
                class_caps,
                kind_cap,
                default_kind_cap,
                lease_ms,
            } => {
                let mut per_kind = BTreeMap::new();
                if kind_cap > 0 {
                    per_kind.insert(KINDS[0].to_string(), kind_cap);
                }
                let caps = RunningCaps {
                    per_class: class_caps,
                    per_kind,
                    default_per_kind: default_kind_cap,
                };
                let worker = format!("w{worker}");
                let want = model.job_claim(&worker, limit, &caps, lease_ms, now).await;
                let got = sqlite.job_claim(&worker, limit, &caps, lease_ms, now).await;
                assert_eq!(got, want, "{at}");
                leases.extend(want.unwrap().iter().map(|j| j.lease));
            }
            Op::Heartbeat { lease, lease_ms } => {
                let l = pick(&leases, lease);
                let want = model.job_heartbeat(l, lease_ms, now).await;
                let got = sqlite.job_heartbeat(l, lease_ms, now).await;
                assert_eq!(got, want, "{at}: {l:?}");
            }
            Op::Complete { lease } => {
                let l = pick(&leases, lease);
                let want = model.job_complete(l, now).await;
                let got = sqlite.job_complete(l, now).await;
                assert_eq!(got, want, "{at}: {l:?}");
            }
            Op::Retry {
                lease,
                delay_ms,
                counted,
            } => {
                let l = pick(&leases, lease);
                let failure = Failure::Retry {
                    at_ms: now + delay_ms,
                    error: format!("retry at step {step}"),
                    counted,
                };
                let want = model.job_fail(l, failure.clone(), now).await;
                let got = sqlite.job_fail(l, failure, now).await;
                assert_eq!(got, want, "{at}: {l:?}");
            }
            Op::Dead { lease } => {
                let l = pick(&leases, lease);
                let failure = Failure::Dead {
                    error: format!("dead at step {step}"),
                };
                let want = model.job_fail(l, failure.clone(), now).await;
                let got = sqlite.job_fail(l, failure, now).await;
                assert_eq!(got, want, "{at}: {l:?}");
            }
            Op::Requeue { dead_letter, job } => {
                let dead = model.job_list(Some(JobStatus::Dead), 1000).await.unwrap();
                let job = if dead_letter && !dead.is_empty() {
                    dead[job % dead.len()].id
                } else {
                    let newest = model.job_list(None, 1).await.unwrap();
                    (job as u64) % (newest.first().map_or(0, |j| j.id) + 2)
                };
                let want = model.job_requeue(job, 3, now).await;
                let got = sqlite.job_requeue(job, 3, now).await;
                assert_eq!(got, want, "{at}: job {job}");
            }
            Op::Purge { at_done, job, ms } => {
                let done = model.job_list(Some(JobStatus::Done), 1000).await.unwrap();
                let before = if at_done && !done.is_empty() {
                    done[job % done.len()].finished_at_ms + ms
                } else {
                    now.saturating_sub(ms)
                };
                let want = model.job_purge_done(before).await;
                let got = sqlite.job_purge_done(before).await;
                assert_eq!(got, want, "{at}: before T0+{}", before - T0);
            }
            Op::IdemBegin {
                scope,
                key,
                fingerprint,
                ttl_ms,
                claim_ms,
            } => {
                let (s, k, fp) = (SCOPES[scope], format!("k{key}"), [fingerprint; 32]);
                let want = model.idem_begin(s, &k, fp, ttl_ms, claim_ms, now).await;
                let got = sqlite.idem_begin(s, &k, fp, ttl_ms, claim_ms, now).await;
                assert_eq!(got, want, "{at}");
            }
            Op::IdemFinish { scope, key } => {
                let (s, k) = (SCOPES[scope], format!("k{key}"));
                let answer = format!("{{\"step\":{step}}}");
                let want = model.idem_finish(s, &k, &answer, now).await;
                let got = sqlite.idem_finish(s, &k, &answer, now).await;
                assert_eq!(got, want, "{at}");
            }
            Op::Advance { ms } => now += ms,
        }
        assert_eq!(
            sqlite.job_stats(now).await,
            model.job_stats(now).await,
            "{at}: stats"
        );
        assert_eq!(
            sqlite.job_list(None, 1000).await,
            model.job_list(None, 1000).await,
            "{at}: jobs"
        );
        // Short lists: the right ones are cut off.
        for status in JobStatus::ALL {
            assert_eq!(
                sqlite.job_list(Some(status), 2).await,
                model.job_list(Some(status), 2).await,
                "{at}: {status:?} jobs"
            );
        }
        for limit in [2, 100] {
            assert_eq!(
                sqlite.idem_list(None, limit, now).await,
                model.idem_list(None, limit, now).await,
                "{at}: idempotency records"
            );
        }
        assert_eq!(
            sqlite.idem_list(Some(SCOPES[0]), 2, now).await,
            model.idem_list(Some(SCOPES[0]), 2, now).await,
            "{at}: idempotency records of {}",
            SCOPES[0]
        );
        assert_eq!(
            sqlite.idem_scopes(now).await,
            model.idem_scopes(now).await,
            "{at}: idempotency scopes"
        );
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn run(ops: Vec<Op>) {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = SqliteOptions::new(dir.path().join("zerodrop.db"));
    // A process crash is not under test here: no fsync per commit keeps the cases fast.
    opts.synchronous = Synchronous::Normal;
    let sqlite = SqliteStore::open(opts, Arc::new(NoSink)).unwrap();
    let model = MemoryStore::new(Retention::default(), Arc::new(NoSink));
    runtime().block_on(check(&model, &sqlite, ops));
    sqlite.close();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn sqlite_job_queue_follows_the_memory_model(ops in prop::collection::vec(job_op(), 10..40)) {
        run(ops);
    }

    #[test]
    fn sqlite_webhook_records_follow_the_memory_model(ops in prop::collection::vec(idem_op(), 10..40)) {
        run(ops);
    }
}
