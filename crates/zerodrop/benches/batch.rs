//! Batch publish against single publishes, durable, over HTTP, client and server on this
//! machine.
//!
//! `cargo bench -p zerodrop --bench batch` starts the release binary on a fresh data dir
//! (SQLite, `synchronous=FULL`) and, in each of `ROUNDS` rounds (env, default 5), runs for
//! `SECONDS` (default 5) each: `PUBLISHERS` (default 64) concurrent publishers sending one
//! 200-byte event per `POST /v1/streams/{stream}/events`, then the same publishers sending
//! `BATCH` (default 100) such events per `POST /v1/events`, spread over 100 streams. Each
//! publisher waits for its 201 before sending the next request. Prints the median durable
//! events/s of each and their ratio, measured in the same run.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use zerodrop_testkit::server::ServerProcess;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// What one request of a publisher sends: its path, body, and how many events it carries.
fn request(publisher: usize, round: usize, batch: usize) -> (String, String, u64) {
    let text = "x".repeat(110);
    if batch == 0 {
        let stream = (publisher + round) % 100;
        let body = json!({"data": {"text": text}}).to_string();
        return (format!("/v1/streams/bench:{stream}/events"), body, 1);
    }
    let events: Vec<Value> = (0..batch)
        .map(|i| json!({"stream": format!("bench:{}", (publisher + round + i) % 100), "data": {"text": text}}))
        .collect();
    (
        "/v1/events".into(),
        json!({"events": events}).to_string(),
        batch as u64,
    )
}

/// Durable events/s with `publishers` publishers; `batch` events per request (0: single).
async fn run(url: &str, key: &str, publishers: usize, batch: usize, secs: u64) -> f64 {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(publishers)
        .build()
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for w in 0..publishers {
        let (client, stop, count) = (client.clone(), stop.clone(), count.clone());
        let (url, key) = (url.to_string(), key.to_string());
        tasks.push(tokio::spawn(async move {
            let mut round = 0;
            while !stop.load(Ordering::Relaxed) {
                let (path, body, n) = request(w, round, batch);
                let r = client
                    .post(format!("{url}{path}"))
                    .bearer_auth(&key)
                    .body(body)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status().as_u16(), 201);
                let _ = r.bytes().await;
                count.fetch_add(n, Ordering::Relaxed);
                round += 1;
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
    let rounds = env("ROUNDS", 5);
    let secs = env("SECONDS", 5) as u64;
    let publishers = env("PUBLISHERS", 64);
    let batch = env("BATCH", 100).max(1);
    let dir = tempfile::tempdir().unwrap();
    let bin = Path::new(env!("CARGO_BIN_EXE_zerodrop"));
    let p = ServerProcess::spawn(bin, dir.path(), "127.0.0.1:0", &[], &[]).expect("server starts");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut single = Vec::new();
    let mut batched = Vec::new();
    for _ in 0..rounds {
        single.push(rt.block_on(run(&p.url, &p.creds.api_key, publishers, 0, secs)));
        batched.push(rt.block_on(run(&p.url, &p.creds.api_key, publishers, batch, secs)));
    }
    let rounds_of = |v: &[f64]| v.iter().map(|r| *r as u64).collect::<Vec<_>>();
    println!(
        "durable HTTP publish, 200-byte events, 100 streams, {publishers} publishers, \
         {secs} s per round, median of {rounds}"
    );
    println!("{:<24} {:>10}  rounds", "requests", "events/s");
    let (s, b) = (median(single.clone()), median(batched.clone()));
    println!("{:<24} {s:>10.0}  {:?}", "1 event each", rounds_of(&single));
    println!(
        "{:<24} {b:>10.0}  {:?}",
        format!("{batch} events each"),
        rounds_of(&batched)
    );
    println!("batch / single: {:.2}x", b / s.max(1.0));
}
