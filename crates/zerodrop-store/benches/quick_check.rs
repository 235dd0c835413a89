//! What the SQLite store's damage check (`PRAGMA quick_check`) costs on a realistically sized
//! file: at every start-up, and every `--sqlite-check-interval-sec` while serving.
//!
//! `cargo bench -p zerodrop-store --bench quick_check` builds a file of `EVENTS` (env,
//! default 100,000) 200-byte events on 100 streams with the store itself, closes it, then
//! prints the file's size, the median of `ROUNDS` (env, default 5) reopenings (the start-up
//! check included) and of as many scheduled checks (`SqliteStore::check`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use zerodrop_core::StreamId;
use zerodrop_store::{AppendRequest, NoSink, SqliteOptions, SqliteStore, Store, Synchronous};

const STREAMS: usize = 100;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let (events, rounds) = (env("EVENTS", 100_000), env("ROUNDS", 5).max(1));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("zerodrop.db");
    let opts = || {
        let mut o = SqliteOptions::new(&path);
        o.synchronous = Synchronous::Normal;
        o
    };
    rt.block_on(async {
        let store = Arc::new(SqliteStore::open(opts(), Arc::new(NoSink)).unwrap());
        let data = format!("{{\"text\":\"{}\"}}", "x".repeat(110));
        let tasks: Vec<_> = (0..64)
            .map(|t| {
                let (store, data) = (store.clone(), data.clone());
                tokio::spawn(async move {
                    for i in (t..events).step_by(64) {
                        let stream = StreamId::new(&format!("bench:{}", i % STREAMS)).unwrap();
                        let req = AppendRequest {
                            stream,
                            data: data.clone(),
                            idempotency: None,
                        };
                        store.append(req).await.unwrap();
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        store.close();
    });
    let bytes = std::fs::metadata(&path).unwrap().len();
    let mut opens = Vec::new();
    let mut checks = Vec::new();
    for _ in 0..rounds {
        let started = Instant::now();
        let store = SqliteStore::open(opts(), Arc::new(NoSink)).unwrap();
        opens.push(started.elapsed());
        assert!(store.quarantined().is_none());
        let started = Instant::now();
        rt.block_on(store.check()).unwrap();
        checks.push(started.elapsed());
        store.close();
    }
    println!(
        "{events} events, {:.1} MiB: open (with quick_check) {:.1} ms, scheduled check {:.1} ms \
         (median of {rounds})",
        bytes as f64 / (1024.0 * 1024.0),
        median(opens).as_secs_f64() * 1e3,
        median(checks).as_secs_f64() * 1e3,
    );
}
