//! Durable publish throughput over HTTP, client and server on this machine.
//!
//! `cargo bench -p zerodrop --bench publish` starts the release binary on a fresh data dir
//! (SQLite, `synchronous=FULL`), then for 1 and 64 concurrent publishers (each waits for its
//! 201 before sending the next) publishes 200-byte events to 100 streams for `SECONDS`
//! (env, default 5) and prints the median events/s over `ROUNDS` rounds (default 5).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use zerodrop_testkit::server::ServerProcess;

async fn run(url: &str, key: &str, publishers: usize, secs: u64) -> f64 {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(publishers)
        .build()
        .unwrap();
    let body = format!("{{\"data\":{{\"text\":\"{}\"}}}}", "x".repeat(110));
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for w in 0..publishers {
        let (client, body, stop, count) =
            (client.clone(), body.clone(), stop.clone(), count.clone());
        let (url, key) = (url.to_string(), key.to_string());
        tasks.push(tokio::spawn(async move {
            let mut i = w;
            while !stop.load(Ordering::Relaxed) {
                let u = format!("{url}/v1/streams/bench:{}/events", i % 100);
                let r = client
                    .post(u)
                    .bearer_auth(&key)
                    .body(body.clone())
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status().as_u16(), 201);
                let _ = r.bytes().await;
                count.fetch_add(1, Ordering::Relaxed);
                i += publishers;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await; // warm-up
    let start_n = count.load(Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let n = count.load(Ordering::Relaxed) - start_n;
    let rate = n as f64 / started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    rate
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let secs: u64 = std::env::var("SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let dir = tempfile::tempdir().unwrap();
    let bin = Path::new(env!("CARGO_BIN_EXE_zerodrop"));
    let p = ServerProcess::spawn(bin, dir.path(), "127.0.0.1:0", &[], &[]).expect("server starts");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut one = Vec::new();
    let mut many = Vec::new();
    for _ in 0..rounds {
        one.push(rt.block_on(run(&p.url, &p.creds.api_key, 1, secs)));
        many.push(rt.block_on(run(&p.url, &p.creds.api_key, 64, secs)));
    }
    println!(
        "durable HTTP publish, 200-byte events, 100 streams, {secs} s per round, median of {rounds}"
    );
    println!("{:<16} {:>10}  rounds", "publishers", "events/s");
    println!(
        "{:<16} {:>10.0}  {:?}",
        1,
        median(one.clone()),
        one.iter().map(|v| *v as u64).collect::<Vec<_>>()
    );
    println!(
        "{:<16} {:>10.0}  {:?}",
        64,
        median(many.clone()),
        many.iter().map(|v| *v as u64).collect::<Vec<_>>()
    );
}
