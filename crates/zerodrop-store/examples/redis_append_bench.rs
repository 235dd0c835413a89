//! Append throughput of `RedisStore` against the raw `XADD` rate of the same Redis, in one run.
//!
//! Starts its own `redis-server` on a free loopback port, runs `redis-benchmark … XADD` against
//! it (the baseline: what Redis does with no script, no idempotency, no bounds, no pub/sub),
//! then appends through the store with 1 and 64 concurrent appenders, and prints each rate
//! with its ratio to the baseline measured with the same client count.
//!
//! `cargo run --release -p zerodrop-store --example redis_append_bench [-- --durable]`
//! (`--durable`: AOF with `appendfsync always`, as a deployment that must survive a crash).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use zerodrop_core::retention::Retention;
use zerodrop_core::{Event, Seq, StreamId};
use zerodrop_store::{AppendRequest, LiveSink, RedisOptions, RedisStore, Store};
use zerodrop_testkit::redis::{RedisServer, xadd_baseline};

/// Counts what the live path delivers, like a hub with no subscribers would.
#[derive(Default)]
struct Count(AtomicU64);

impl LiveSink for Count {
    fn committed(&self, events: &[Arc<Event>]) {
        self.0.fetch_add(events.len() as u64, Ordering::Relaxed);
    }
    fn trimmed(&self, _: &StreamId, _: Seq, _: u64) {}
}

async fn store_rate(store: Arc<RedisStore>, appenders: u64, per_appender: u64) -> f64 {
    let data = format!("{{\"kind\":\"bench\",\"pad\":\"{}\"}}", "x".repeat(64));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..appenders {
        let store = store.clone();
        let data = data.clone();
        tasks.push(tokio::spawn(async move {
            // 100 streams, as a gateway with many rooms would see.
            for i in 0..per_appender {
                let stream = StreamId::new(&format!("room:{}", (w * 7 + i) % 100)).expect("id");
                let req = AppendRequest {
                    stream,
                    data: data.clone(),
                    idempotency: None,
                };
                store.append(req).await.expect("append");
            }
        }));
    }
    for t in tasks {
        t.await.expect("appender");
    }
    (appenders * per_appender) as f64 / started.elapsed().as_secs_f64()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), String> {
    let durable = std::env::args().any(|a| a == "--durable");
    let server = if durable {
        RedisServer::start_durable()
    } else {
        RedisServer::start()
    }
    .map_err(|e| format!("start redis-server: {e}"))?;
    println!(
        "redis-server on port {} ({})",
        server.port(),
        if durable {
            "appendonly yes, appendfsync always"
        } else {
            "no persistence"
        }
    );
    let base_1 = xadd_baseline(server.port(), 1, 20_000)?;
    let base_64 = xadd_baseline(server.port(), 64, 100_000)?;

    let sink = Arc::new(Count::default());
    let mut opts = RedisOptions::new(&server.url());
    opts.retention = Retention::default();
    opts.every_stream = true;
    let store = Arc::new(
        RedisStore::connect(opts, sink.clone())
            .await
            .map_err(|e| e.to_string())?,
    );
    // Warm-up: scripts loaded, streams created.
    store_rate(store.clone(), 4, 250).await;
    let rate_1 = store_rate(store.clone(), 1, 20_000).await;
    let rate_64 = store_rate(store.clone(), 64, 1_000).await;
    println!();
    println!("| appenders | RedisStore appends/s | redis-benchmark XADD/s (same -c) | ratio |");
    println!("|---|---|---|---|");
    println!("| 1 | {rate_1:.0} | {base_1:.0} | {:.2} |", rate_1 / base_1);
    println!(
        "| 64 | {rate_64:.0} | {base_64:.0} | {:.2} |",
        rate_64 / base_64
    );
    println!(
        "live events delivered to this instance's sink: {}",
        sink.0.load(Ordering::Relaxed)
    );
    Ok(())
}
