//! Many streams on one SSE response against one `EventSource` per stream (SPEC §11).
//!
//! `ulimit -n 20000; cargo bench -p zerodrop --bench sse_many` runs the release binary (SQLite)
//! twice, a fresh server each: `CLIENTS` (default 20) clients each subscribe to the same
//! `STREAMS` (default 100) streams, once as one SSE response per stream
//! (`/v1/streams/{stream}/sse`) and once as one response over all of them
//! (`/v1/sse?streams=…`). Then `EVENTS` (default 20) events per stream are published (one
//! batch of one event per stream at a time) and every client reads all of them. Prints, per
//! subscribed stream, the server's resident memory once everyone is subscribed and its CPU
//! time from the first publish to the last event read, and the same per delivered event.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;
use zerodrop_testkit::measure::{cpu_secs, env_u64, rss_bytes};
use zerodrop_testkit::server::ServerProcess;
use zerodrop_testkit::sse::SseClient;

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// One response per stream.
    PerStream,
    /// One response over every stream.
    Many,
}

struct Figures {
    bytes_per_stream: f64,
    cpu_us_per_stream: f64,
    cpu_us_per_event: f64,
    delivered: u64,
    secs: f64,
}

async fn run(bin: &Path, mode: Mode, clients: u64, streams: u64, events: u64) -> Figures {
    let dir = tempfile::tempdir().unwrap();
    let p = ServerProcess::spawn(
        bin,
        dir.path(),
        "127.0.0.1:0",
        &["--max-connections", "10000"],
        &[],
    )
    .expect("server starts");
    let names: Vec<String> = (0..streams).map(|k| format!("room:{k}")).collect();
    let api = p.api();
    let key = p.creds.api_key.clone();
    // Every stream exists before anyone subscribes (the same start for both modes).
    let r = api
        .post(
            "/v1/events",
            Some(&key),
            json!({"streams": names, "data": {"warm": true}}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_before = rss_bytes(p.pid());
    let mut conns = Vec::new();
    for c in 0..clients {
        let token = p.creds.token(&format!("client-{c}"), &["room:*"], &[]);
        match mode {
            Mode::PerStream => {
                for s in &names {
                    let url = format!("{}/v1/streams/{s}/sse?token={token}", p.url);
                    conns.push((SseClient::connect(&url, &[]).await.expect("opens"), 1));
                }
            }
            Mode::Many => {
                let url = format!("{}/v1/sse?streams={}&token={token}", p.url, names.join(","));
                conns.push((SseClient::connect(&url, &[]).await.expect("opens"), streams));
            }
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_after = rss_bytes(p.pid());
    let cpu_before = cpu_secs(p.pid());
    let started = Instant::now();
    for i in 0..events {
        let r = api
            .post(
                "/v1/events",
                Some(&key),
                json!({"streams": names, "data": {"i": i}}),
            )
            .await;
        assert_eq!(r.status, 201, "{}", r.text);
    }
    let readers = conns.into_iter().map(|(mut c, n)| {
        tokio::spawn(async move {
            let want = n * events;
            let mut got = 0;
            while got < want {
                let e = c
                    .next_within(Duration::from_secs(30))
                    .await
                    .expect("every event arrives");
                if e.event == "event" {
                    got += 1;
                }
            }
            got
        })
    });
    let mut delivered = 0;
    for r in readers {
        delivered += r.await.unwrap();
    }
    let secs = started.elapsed().as_secs_f64();
    let cpu = cpu_secs(p.pid()) - cpu_before;
    let subscribed = (clients * streams) as f64;
    Figures {
        bytes_per_stream: rss_after.saturating_sub(rss_before) as f64 / subscribed,
        cpu_us_per_stream: cpu * 1e6 / subscribed,
        cpu_us_per_event: cpu * 1e6 / delivered as f64,
        delivered,
        secs,
    }
}

fn main() {
    let bin = Path::new(env!("CARGO_BIN_EXE_zerodrop"));
    let clients = env_u64("CLIENTS", 20);
    let streams = env_u64("STREAMS", 100);
    let events = env_u64("EVENTS", 20);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!(
        "{clients} clients × {streams} streams, {events} events per stream; server figures per subscribed stream and per delivered event"
    );
    println!(
        "{:<34} {:>14} {:>16} {:>14} {:>11} {:>8}",
        "mode", "RSS B/stream", "CPU µs/stream", "CPU µs/event", "delivered", "secs"
    );
    for (label, mode) in [
        ("one response per stream", Mode::PerStream),
        ("one response over all streams", Mode::Many),
    ] {
        let f = rt.block_on(run(bin, mode, clients, streams, events));
        println!(
            "{label:<34} {:>14.0} {:>16.1} {:>14.2} {:>11} {:>8.2}",
            f.bytes_per_stream, f.cpu_us_per_stream, f.cpu_us_per_event, f.delivered, f.secs
        );
    }
}
