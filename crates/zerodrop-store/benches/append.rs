//! Durable append throughput of the SQLite store against raw SQLite in the same run.
//!
//! `cargo bench -p zerodrop-store --bench append` prints, for 200-byte events on 100 streams:
//! - raw: rusqlite inserts into a table shaped like ours, `synchronous=FULL`, all in one
//!   transaction (the ceiling: one fsync for everything, no API at all);
//! - raw-16: the same, committed every 16 inserts;
//! - store-1 / store-64: `SqliteStore::append` from 1 and 64 concurrent tasks (each append
//!   answered only after its group commit).
//!
//! Each figure is the median of `ROUNDS` rounds (env, default 5); ratios are against raw.

use std::sync::Arc;
use std::time::{Duration, Instant};

use zerodrop_core::StreamId;
use zerodrop_store::{AppendRequest, NoSink, SqliteOptions, SqliteStore, Store};
use zerodrop_testkit::measure::{median, payload, raw_sqlite_inserts as raw};

const STREAMS: usize = 100;

async fn store(n: usize, concurrency: usize) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = SqliteOptions::new(dir.path().join("z.db"));
    opts.retention.max_events = u64::MAX;
    opts.retention.max_bytes = u64::MAX;
    let store = Arc::new(SqliteStore::open(opts, Arc::new(NoSink)).unwrap());
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

fn main() {
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
    ];
    for _ in 0..rounds {
        rows[0].1.push(raw(50_000, 50_000));
        rows[1].1.push(raw(20_000, 16));
        rows[2].1.push(rt.block_on(store(3_000, 1)));
        rows[3].1.push(rt.block_on(store(40_000, 64)));
        std::thread::sleep(Duration::from_millis(200));
    }
    let base = median(rows[0].1.clone());
    println!("durable appends/s, 200-byte events, {STREAMS} streams, median of {rounds} rounds");
    println!("{:<22} {:>12} {:>10}", "case", "appends/s", "vs raw");
    for (name, v) in rows {
        let m = median(v);
        println!("{name:<22} {m:>12.0} {:>9.2}x", m / base);
    }
}
