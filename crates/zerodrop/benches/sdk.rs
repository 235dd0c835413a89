//! What the Rust SDK's guarantees cost on the receiving side: replaying a backlog (what a
//! client that reconnects after a while receives) through the bare `WsConnection` (parse
//! only, an ack every 100 events), through the `Client` (dedupe, gap check,
//! handled-then-batched acks), and through the `Client` opening AES-256-GCM sealed data.
//!
//! `cargo bench -p zerodrop --bench sdk` starts the release binary on a fresh data dir
//! (SQLite), publishes `EVENTS` 200-byte events (default 8,000: within the default retention
//! of 10,000, so seq 1 is still there) to one stream per case, then subscribes from seq 0 and
//! times the arrival of the last one, `ROUNDS` times (default 5), and prints the median
//! events/s of each case. Client and server share this machine.

use std::path::Path;
use std::time::{Duration, Instant};

use zerodrop_client::e2e::{GroupKey, seal_text};
use zerodrop_client::{
    Client, ClientOptions, HttpClient, ServerFrame, SubscribeOptions, WsAuth, WsConnection,
};
use zerodrop_testkit::server::ServerProcess;

const KEY: [u8; 32] = [7; 32];

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn fill(http: &HttpClient, stream: &str, n: u64, sealed: bool) {
    let text = "x".repeat(110);
    let mut tasks = tokio::task::JoinSet::new();
    for chunk in 0..8u64 {
        let (http, stream, text) = (http.clone(), stream.to_string(), text.clone());
        let key = sealed.then(|| GroupKey::new(&KEY));
        tasks.spawn(async move {
            for i in (chunk..n).step_by(8) {
                let plain = format!(r#"{{"i":{i},"text":"{text}"}}"#);
                let data = match &key {
                    Some(k) => {
                        serde_json::to_string(&seal_text(k, "b1", &stream, &plain, None)).unwrap()
                    }
                    None => plain,
                };
                http.publish(&stream, &data, None).await.unwrap();
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
}

/// Bare connection: subscribe from 0, read frames until `n` events arrived.
async fn raw(url: &str, token: &str, stream: &str, n: u64) -> f64 {
    let auth = WsAuth::Token(token.to_string());
    let mut ws = WsConnection::connect(url, auth, Duration::from_secs(10))
        .await
        .unwrap();
    let started = Instant::now();
    ws.subscribe(stream, Some(0), None).await.unwrap();
    let mut got = 0;
    while got < n {
        if let ServerFrame::Event(_) = ws.recv().await.unwrap() {
            got += 1;
            // The server keeps a bounded window of unacked events in flight.
            if got % 100 == 0 {
                ws.ack(stream, got).await.unwrap();
            }
        }
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    ws.close().await;
    rate
}

/// The SDK: every event handled as it arrives.
async fn sdk(url: &str, token: &str, stream: &str, n: u64, key: bool) -> f64 {
    let client = Client::connect_with(&[url], token, ClientOptions::default())
        .await
        .unwrap();
    if key {
        client.add_key("b1", &KEY).unwrap();
    }
    let started = Instant::now();
    let mut sub = client.subscribe_with(
        stream,
        SubscribeOptions {
            after: Some(0),
            epoch: None,
            ..Default::default()
        },
    );
    let mut last = 0;
    while last < n {
        let e = sub.next().await.unwrap().unwrap();
        assert_eq!(e.seq, last + 1);
        assert_eq!(e.encrypted, key);
        e.handled();
        last = e.seq;
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    client.close().await;
    rate
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let rounds = env("ROUNDS", 5) as usize;
    let n = env("EVENTS", 8_000);
    let dir = tempfile::tempdir().unwrap();
    let bin = Path::new(env!("CARGO_BIN_EXE_zerodrop"));
    let p = ServerProcess::spawn(bin, dir.path(), "127.0.0.1:0", &[], &[]).expect("server starts");
    // A subject per round: each round opens three sessions, and one subject may hold at most
    // `--max-sessions-per-subject` live ones (a test server may set it low).
    let token_for = |round: usize| p.creds.token(&format!("bench-{round}"), &["sdkb:*"], &[]);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let http = HttpClient::new(&p.url, Some(p.creds.api_key.clone())).unwrap();
    rt.block_on(fill(&http, "sdkb:plain", n, false));
    rt.block_on(fill(&http, "sdkb:sealed", n, true));
    let (mut bare, mut client, mut sealed) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let token = token_for(round);
        bare.push(rt.block_on(raw(&p.url, &token, "sdkb:plain", n)));
        client.push(rt.block_on(sdk(&p.url, &token, "sdkb:plain", n, false)));
        sealed.push(rt.block_on(sdk(&p.url, &token, "sdkb:sealed", n, true)));
    }
    println!("replay of {n} events from seq 0 over one WebSocket, median of {rounds}");
    println!("{:<34} {:>10}  rounds", "receiver", "events/s");
    for (name, v) in [
        ("WsConnection (parse only)", bare),
        ("Client (dedupe, handled, acks)", client),
        ("Client, AES-256-GCM sealed data", sealed),
    ] {
        println!(
            "{:<34} {:>10.0}  {:?}",
            name,
            median(v.clone()),
            v.iter().map(|r| *r as u64).collect::<Vec<_>>()
        );
    }
}
