//! Durable append throughput of the SQLite store against raw SQLite in the same run.
//!
//! `cargo bench -p zerodrop-store --bench append` prints, for 200-byte events on 100 streams:
//! - raw: rusqlite inserts into a table shaped like ours, `synchronous=FULL`, all in one
//!   transaction (the ceiling: one fsync for everything, no API at all);
//! - raw-16: the same, committed every 16 inserts;
//! - store-1 / store-64: `SqliteStore::append` from 1 and 64 concurrent tasks (each append
//!   answered only after its group commit);
//! - store-64 × 100: `SqliteStore::append_batch` from 64 concurrent tasks, each batch 100
//!   events over the 100 streams (one per stream, as the HTTP batch bench sends them): the
//!   store's own ceiling for `POST /v1/events`, with no HTTP in front of it.
//!
//! The whole process (the raw inserts, the store's writer and checkpointer, the tasks) runs on
//! CPU 0, as the server does in the HTTP benches. Each figure is the median of `ROUNDS`
//! rounds (env, default 5); ratios are against raw.

use std::sync::Arc;
use std::time::{Duration, Instant};

use zerodrop_core::StreamId;
use zerodrop_store::{
    AppendRequest, BatchItem, NoSink, SqliteOptions, SqliteStore, Store, StreamBatch,
};
use zerodrop_testkit::measure::{median, payload, pin_all, raw_sqlite_inserts as raw};

const STREAMS: usize = 100;

/// A store on a fresh file with no retention limit (every round appends to empty streams).
fn open_store(dir: &tempfile::TempDir) -> Arc<SqliteStore> {
    let mut opts = SqliteOptions::new(dir.path().join("z.db"));
    opts.retention.max_events = u64::MAX;
    opts.retention.max_bytes = u64::MAX;
    Arc::new(SqliteStore::open(opts, Arc::new(NoSink)).unwrap())
}

async fn store(n: usize, concurrency: usize) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(&dir);
    let data = payload();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..concurrency {
        let (store, data) = (store.clone(), data.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = w;
            while i < n {
                let stream = StreamId::new(&format!("bench:{}", i % STREAMS)).unwrap();
                let req = AppendRequest {
                    stream,
                    data: data.clone(),
                    idempotency: None,
                };
                store.append(req).await.unwrap();
                i += concurrency;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    store.close();
    rate
}

/// `n` events in batches of `size` (one event per stream, streams in turn) from
/// `concurrency` tasks, each waiting for its batch's commit before sending the next.
async fn store_batches(n: usize, concurrency: usize, size: usize) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(&dir);
    let data = payload();
    let streams: Vec<StreamId> = (0..STREAMS)
        .map(|i| StreamId::new(&format!("bench:{i}")).unwrap())
        .collect();
    let batches = n / size;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..concurrency {
        let (store, data, streams) = (store.clone(), data.clone(), streams.clone());
        tasks.push(tokio::spawn(async move {
            let mut b = w;
            while b < batches {
                let batch = (0..size)
                    .map(|i| StreamBatch {
                        stream: streams[(b + i) % STREAMS].clone(),
                        items: vec![BatchItem {
                            data: data.clone(),
                            idempotency: None,
                        }],
                    })
                    .collect();
                let outcome = store.append_batch(batch).await.unwrap();
                assert!(outcome.iter().all(|part| part.is_ok()));
                b += concurrency;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let rate = (batches * size) as f64 / started.elapsed().as_secs_f64();
    store.close();
    rate
}

fn main() {
    // Threads started from here on (the runtime's, each store's) inherit this.
    let pinned = pin_all(std::process::id(), 0);
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut rows: Vec<(&str, Vec<f64>)> = vec![
        ("raw (1 txn)", vec![]),
        ("raw (commit/16)", vec![]),
        ("store, 1 appender", vec![]),
        ("store, 64 appenders", vec![]),
        ("store, 64 × 100 batched", vec![]),
    ];
    for _ in 0..rounds {
        rows[0].1.push(raw(50_000, 50_000));
        rows[1].1.push(raw(20_000, 16));
        rows[2].1.push(rt.block_on(store(3_000, 1)));
        rows[3].1.push(rt.block_on(store(40_000, 64)));
        rows[4].1.push(rt.block_on(store_batches(200_000, 64, 100)));
        std::thread::sleep(Duration::from_millis(200));
    }
    let base = median(rows[0].1.clone());
    println!(
        "durable appends/s, 200-byte events, {STREAMS} streams, median of {rounds} rounds; \
         on CPU 0: {}",
        if pinned { "pinned" } else { "NOT pinned" }
    );
    println!("{:<24} {:>12} {:>10}", "case", "appends/s", "vs raw");
    for (name, v) in rows {
        let m = median(v);
        println!("{name:<24} {m:>12.0} {:>9.2}x", m / base);
    }
}
