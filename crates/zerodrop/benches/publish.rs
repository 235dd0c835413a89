//! Durable publish throughput over HTTP, client and server on this machine.
//!
//! `cargo bench -p zerodrop --bench publish` starts the release binary on a fresh data dir
//! (SQLite, `synchronous=FULL`), then for 1 and 64 concurrent publishers (each waits for its
//! 201 before sending the next) publishes 200-byte events to 100 streams for `SECONDS`
//! (env, default 5) and prints the median events/s over `ROUNDS` rounds (default 5).

use std::path::Path;

use zerodrop_testkit::measure::{PublishRequest, env_u64, median, publish_rate};
use zerodrop_testkit::server::ServerProcess;

/// Each of `publishers` publishers sends one event per request, over the 100 streams in turn.
fn requests(publishers: usize) -> Vec<Vec<PublishRequest>> {
    let body = format!("{{\"data\":{{\"text\":\"{}\"}}}}", "x".repeat(110));
    (0..publishers)
        .map(|w| {
            (0..100)
                .map(|k| {
                    let stream = (w + k * publishers) % 100;
                    (
                        format!("/v1/streams/bench:{stream}/events"),
                        body.clone(),
                        1,
                    )
                })
                .collect()
        })
        .collect()
}

fn main() {
    let rounds = env_u64("ROUNDS", 5);
    let secs = env_u64("SECONDS", 5);
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
        one.push(rt.block_on(publish_rate(&p.url, &p.creds.api_key, requests(1), secs)));
        many.push(rt.block_on(publish_rate(&p.url, &p.creds.api_key, requests(64), secs)));
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
