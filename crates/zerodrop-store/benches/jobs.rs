//! Job queue throughput, enqueue → claim → complete, on SQLite and on a real Redis.
//!
//! `cargo bench -p zerodrop-store --bench jobs` enqueues `JOBS` jobs (env, default 2000) from
//! 8 concurrent producers while 8 workers claim them in batches of 16 and complete each, and
//! prints jobs/s from the first enqueue to the last completion: the median of `ROUNDS`
//! rounds (default 3), each on a fresh store (SQLite `synchronous=FULL`; Redis on its own
//! `redis-server`, no replicas).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use zerodrop_store::{
    NewJob, NoSink, QosClass, QueuedCaps, RedisOptions, RedisStore, RunningCaps, SqliteOptions,
    SqliteStore, Store,
};
use zerodrop_testkit::redis::RedisServer;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn round(store: Arc<dyn Store>, jobs: usize) -> f64 {
    let started = Instant::now();
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for p in 0..8 {
        let s = store.clone();
        tasks.push(tokio::spawn(async move {
            for i in (p..jobs).step_by(8) {
                let job = NewJob {
                    kind: "publish".into(),
                    class: QosClass::Interactive,
                    upstream: "app".into(),
                    payload: format!("{{\"i\":{i},\"text\":\"{}\"}}", "x".repeat(100)),
                    dedupe_key: Some(format!("k{i}")),
                    max_attempts: 8,
                    available_at_ms: 0,
                };
                s.job_enqueue(job, &QueuedCaps::default(), zerodrop_core::now_ms())
                    .await
                    .unwrap();
            }
        }));
    }
    for w in 0..8 {
        let (s, done) = (store.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let caps = RunningCaps::default();
            while done.load(Ordering::Relaxed) < jobs as u64 {
                let got = s
                    .job_claim(&format!("w{w}"), 16, &caps, 30_000, zerodrop_core::now_ms())
                    .await
                    .unwrap();
                if got.is_empty() {
                    tokio::task::yield_now().await;
                    continue;
                }
                for j in got {
                    s.job_complete(j.lease, zerodrop_core::now_ms())
                        .await
                        .unwrap();
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    jobs as f64 / started.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let jobs = env("JOBS", 2000);
    let rounds = env("ROUNDS", 3);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut sqlite = Vec::new();
    let mut redis = Vec::new();
    for _ in 0..rounds {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(
            SqliteOptions::new(dir.path().join("zerodrop.db")),
            Arc::new(NoSink),
        )
        .unwrap();
        sqlite.push(rt.block_on(round(Arc::new(s), jobs)));
        let server = RedisServer::start().expect("start redis-server");
        let r = rt.block_on(async {
            let s = RedisStore::connect(RedisOptions::new(&server.url()), Arc::new(NoSink))
                .await
                .unwrap();
            round(Arc::new(s), jobs).await
        });
        redis.push(r);
    }
    println!(
        "job queue: {jobs} jobs, 8 producers, 8 workers claiming 16 at a time; enqueue → complete, median of {rounds}"
    );
    println!("{:<8} {:>10}  rounds", "store", "jobs/s");
    for (name, v) in [("sqlite", sqlite), ("redis", redis)] {
        println!(
            "{:<8} {:>10.0}  {:?}",
            name,
            median(v.clone()),
            v.iter().map(|x| *x as u64).collect::<Vec<_>>()
        );
    }
}
