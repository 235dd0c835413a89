//! What presence costs and how fast it is seen (SPEC §10).
//!
//! `ulimit -n 20000; cargo bench -p zerodrop --bench presence` runs the release binary and
//! prints, with `MEMBERS` (default 10,000) members on one stream:
//! - **join visibility**: two instances on one `redis-server` with presence on `room:*`;
//!   `MEMBERS` WebSockets of distinct subjects subscribed to `room:big` on node-0 (each
//!   answering pings); a watcher on node-1 subscribed with `presence: true`; then `ROUNDS`
//!   (default 200) times a new client on node-0 subscribes, and the time from its `subscribe`
//!   to the watcher's `presence` `join` frame for its session is recorded (p50/p99/max); the
//!   client then unsubscribes (its `leave` follows at once);
//! - **snapshot**: `GET /v1/streams/room:big/presence` read with the Rust SDK
//!   (`HttpClient::presence`), every page (1,000 members each) to the last, `SNAPSHOTS`
//!   (default 20) times, on that Redis cluster (node-1) and on one SQLite instance holding the
//!   same number of members: the whole snapshot's time and one page's (p50/p99).

use std::path::Path;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::json;
use tokio::sync::oneshot;
use zerodrop_client::HttpClient;
use zerodrop_testkit::cluster::Cluster;
use zerodrop_testkit::http::Api;
use zerodrop_testkit::measure::{env_u64, ms_at};
use zerodrop_testkit::server::{Creds, ServerProcess};
use zerodrop_testkit::ws::WsClient;

/// How long a frame (pings answered) is waited for.
const WAIT: Duration = Duration::from_secs(30);

const STREAM: &str = "room:big";

/// Every instance's settings: presence on `room:*`, room for the members and their frames.
const ARGS: &[&str] = &[
    "--presence",
    "room:*",
    "--presence-max-members",
    "100000",
    "--max-connections",
    "30000",
    "--ws-frames-per-sec",
    "1000000",
];

/// Connects and subscribes to [`STREAM`] (with its presence frames when `presence`).
async fn member(url: &str, presence: bool) -> WsClient {
    let mut c = WsClient::connect(url).await.expect("connects");
    let w = c.next_answered(WAIT).await.expect("welcome");
    assert_eq!(w["type"], "welcome", "{w}");
    c.send(json!({"type":"subscribe","stream":STREAM,"presence":presence}))
        .await;
    let s = c.next_answered(WAIT).await.expect("subscribed");
    assert_eq!(s["type"], "subscribed", "{s}");
    c
}

/// `n` members of distinct subjects, 200 handshakes at a time, each kept alive (pings
/// answered) by its own task until the returned senders are dropped.
async fn fill(ws: &str, creds: &Creds, n: u64) -> Vec<oneshot::Sender<()>> {
    let started = Instant::now();
    let mut stops = Vec::with_capacity(n as usize);
    let mut next = 0;
    while next < n {
        let batch: Vec<_> = (next..(next + 200).min(n))
            .map(|i| {
                let token = creds.token(&format!("member-{i}"), &["room:*"], &[]);
                let url = format!("{ws}/v1/ws?token={token}");
                tokio::spawn(async move { member(&url, false).await })
            })
            .collect();
        next += batch.len() as u64;
        for b in batch {
            let mut c = b.await.unwrap();
            let (tx, mut rx) = oneshot::channel::<()>();
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = &mut rx => break,
                        f = c.next_answered(WAIT) => if f.is_none() { break },
                    }
                }
                c.abort();
            });
            stops.push(tx);
        }
    }
    println!(
        "  {n} members subscribed in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    stops
}

async fn join_visibility(c: &Cluster, rounds: u64) {
    let url = format!(
        "{}/v1/ws?token={}",
        c.ws_url(1),
        c.token("watcher", &["room:*"])
    );
    let mut watcher = member(&url, true).await;
    let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
    for r in 0..rounds {
        let url = format!(
            "{}/v1/ws?token={}",
            c.ws_url(0),
            c.token(&format!("joiner-{r}"), &["room:*"])
        );
        let mut j = WsClient::connect(&url).await.expect("connects");
        let w = j.next_answered(WAIT).await.expect("welcome");
        let sid = w["sessionId"].as_str().unwrap().to_string();
        let started = Instant::now();
        j.send(json!({"type":"subscribe","stream":STREAM})).await;
        loop {
            let f = watcher
                .next_answered(WAIT)
                .await
                .expect("the watcher hears the join");
            if f["type"] == "presence"
                && f["action"] == "join"
                && f["member"]["sessionId"] == sid.as_str()
            {
                break;
            }
        }
        h.record(started.elapsed().as_micros() as u64).unwrap();
        j.send(json!({"type":"unsubscribe","stream":STREAM})).await;
        j.close().await;
    }
    println!(
        "join visible on the other instance ({} rounds): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        h.len(),
        ms_at(&h, 0.5),
        ms_at(&h, 0.99),
        h.max() as f64 / 1000.0
    );
}

/// Reads every page with the Rust SDK (`HttpClient::presence`, typed), `times` times.
async fn snapshots(label: &str, api: &Api, times: u64, members: u64) {
    let http = HttpClient::new(&api.base, Some(api.creds.api_key.clone())).unwrap();
    let mut whole = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
    let mut page = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
    for _ in 0..times {
        let started = Instant::now();
        let mut cursor: Option<String> = None;
        let mut seen = 0;
        loop {
            let t = Instant::now();
            let p = http
                .presence(STREAM, cursor.as_deref(), None)
                .await
                .expect("a page");
            page.record(t.elapsed().as_micros() as u64).unwrap();
            seen += p.members.len() as u64;
            match p.next_cursor {
                Some(c) => cursor = Some(c),
                None => break,
            }
        }
        whole.record(started.elapsed().as_micros() as u64).unwrap();
        assert!(seen >= members, "{seen} members of {members}");
    }
    println!(
        "snapshot of {members} members, {label} ({times} times): whole p50 {:.1} ms, p99 {:.1} ms; one page of 1,000 p50 {:.1} ms, p99 {:.1} ms",
        ms_at(&whole, 0.5),
        ms_at(&whole, 0.99),
        ms_at(&page, 0.5),
        ms_at(&page, 0.99)
    );
}

fn main() {
    let bin = Path::new(env!("CARGO_BIN_EXE_zerodrop"));
    let members = env_u64("MEMBERS", 10_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let c = Cluster::start(bin, 2, ARGS).expect("cluster starts");
        let stops = fill(&c.ws_url(0), &c.creds, members).await;
        join_visibility(&c, env_u64("ROUNDS", 200)).await;
        snapshots(
            "Redis (node-1)",
            &c.api(1),
            env_u64("SNAPSHOTS", 20),
            members,
        )
        .await;
        drop(stops);
        drop(c);

        let dir = tempfile::tempdir().unwrap();
        let p =
            ServerProcess::spawn(bin, dir.path(), "127.0.0.1:0", ARGS, &[]).expect("server starts");
        let stops = fill(&p.ws_url(), &p.creds, members).await;
        snapshots("SQLite", &p.api(), env_u64("SNAPSHOTS", 20), members).await;
        drop(stops);
    });
}
