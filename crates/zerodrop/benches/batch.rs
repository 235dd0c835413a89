//! Batch publish against single publishes, durable, over HTTP, with the server on one core.
//!
//! `cargo bench -p zerodrop --bench batch` starts the release binary on a fresh data dir
//! (SQLite, `synchronous=FULL`), pins it to CPU 0 and this process (the publishers) to CPU 1,
//! and in each of `ROUNDS` rounds (env, default 5) runs for `SECONDS` (default 5) each:
//! `PUBLISHERS` (default 64) concurrent publishers sending one 200-byte event per
//! `POST /v1/streams/{stream}/events`, then the same publishers sending `BATCH` (default 100)
//! such events per `POST /v1/events`, spread over 100 streams (bodies built before the clock
//! starts). Each publisher waits for its 201 before sending the next request; the publishers
//! share one event loop, as `redis-benchmark`'s clients do (`PUBLISHER_THREADS`, default 1,
//! for a runtime of more worker threads on the same core). Then the same
//! single publishes with their one field misnamed (`datum` for `data`), each answered 400
//! once its body is parsed: everything a publish costs the server but the append, with a
//! typed error's answer in place of the 201's (which costs more to build). Then the same
//! single publishes to the floor (below). Then the raw
//! ceiling in the same run: rusqlite inserts of the same events, all in one transaction
//! (`zerodrop_testkit::measure`). Prints the median durable events/s of each, batch / single,
//! and batch / raw, and those two ratios for round 1 alone (with the default retention, every
//! stream is at its limit from round 2 on, and commits also trim).
//!
//! `STORE=redis`: the server runs on a `redis-server` of its own (started here, pinned to
//! CPU 1 with the publishers, no persistence), and the ceiling is `redis-benchmark`'s `XADD`
//! rate against that Redis at the same concurrency (`-c PUBLISHERS`, run from CPU 0 before the
//! server is busy), as in the cluster bench.
//!
//! The floor is a server in this process: a one-route axum server on
//! CPU 0 (a thread of its own) that reads each body, parses its JSON and answers 201 with a
//! JSON body the size of a publish's answer, and nothing else: no credential, no store, no
//! metrics. What the HTTP framework alone allows in this harness, printed beside `XADD`
//! (or beside the single publishes on SQLite), so a target above it shows as such.
//!
//! It also prints where the CPU went: per event over the counted seconds (median of the
//! rounds, from `/proc`, 10 ms ticks), the server's threads by name (`zerodrop`: the request
//! threads; `zerodrop-sqlite`: the writer and the checkpointer), Redis, and the publishers
//! (this process); beside them the CPU per event that a 0.5x ratio leaves each core: what
//! the raw inserts take on one core, or what `redis-benchmark` leaves when CPU 1 holds Redis
//! and the publishers.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{Value, json};
use zerodrop_testkit::measure::{
    PublishRequest, answered_rate_watched, cpu_secs, env_u64, median, pin, pin_all,
    raw_sqlite_inserts,
};
use zerodrop_testkit::redis::{RedisServer, xadd_baseline};
use zerodrop_testkit::server::ServerProcess;

fn env(name: &str, default: usize) -> usize {
    env_u64(name, default as u64) as usize
}

/// What one request of a publisher sends: its path, body, and how many events it carries.
fn request(publisher: usize, round: usize, phase: Phase) -> PublishRequest {
    let text = "x".repeat(110);
    let field = match phase {
        // The same request with its one field misnamed, answered 400 once its body is parsed.
        Phase::Refused => "datum",
        Phase::Single | Phase::Floor => "data",
        Phase::Batch(n) => return batch_request(publisher, round, n, &text),
    };
    let stream = (publisher + round) % 100;
    let body = json!({field: {"text": text}}).to_string();
    (format!("/v1/streams/bench:{stream}/events"), body, 1)
}

/// A `POST /v1/events` of `batch` events over the 100 streams.
fn batch_request(publisher: usize, round: usize, batch: usize, text: &str) -> PublishRequest {
    let events: Vec<Value> = (0..batch)
        .map(|i| json!({"stream": format!("bench:{}", (publisher + round + i) % 100), "data": {"text": text}}))
        .collect();
    (
        "/v1/events".into(),
        json!({"events": events}).to_string(),
        batch as u64,
    )
}

/// Distinct requests each publisher cycles through.
const BODIES: usize = 16;

/// What a phase's requests are: single publishes, batches of n events, single publishes
/// refused before they reach the store, or single publishes to the floor server.
#[derive(Clone, Copy)]
enum Phase {
    Single,
    Batch(usize),
    Refused,
    Floor,
}

impl Phase {
    /// The status every answer in the phase must carry.
    fn answered(self) -> u16 {
        match self {
            Phase::Refused => 400,
            _ => 201,
        }
    }
}

/// Each publisher's requests, built before the clock starts (the client's JSON is not what is
/// measured).
fn requests(publishers: usize, phase: Phase) -> Vec<Vec<PublishRequest>> {
    (0..publishers)
        .map(|w| (0..BODIES).map(|r| request(w, r, phase)).collect())
        .collect()
}

fn main() {
    let rounds = env("ROUNDS", 5);
    let secs = env_u64("SECONDS", 5);
    let publishers = env("PUBLISHERS", 64);
    let batch = env("BATCH", 100).max(1);
    let on_redis = std::env::var("STORE").is_ok_and(|s| s == "redis");
    let redis = on_redis.then(|| RedisServer::start().expect("redis-server starts"));
    // The ceiling on Redis: `XADD` at the same concurrency, from the server's core while it
    // is still idle.
    let redis_pid = redis.as_ref().and_then(|r| r.pid());
    let xadd = redis.as_ref().map(|r| {
        let pinned = redis_pid.is_some_and(|pid| pin_all(pid, 1)) && pin(0, 0);
        let n = (publishers as u32 * 2_000).max(100_000);
        let before = redis_pid.map_or(0.0, cpu_secs);
        let rate = xadd_baseline(r.port(), publishers as u32, n).expect("redis-benchmark");
        let redis_us = (redis_pid.map_or(0.0, cpu_secs) - before) * 1e6 / f64::from(n);
        (rate, redis_us, pinned)
    });
    let dir = tempfile::tempdir().unwrap();
    let bin = Path::new(env!("CARGO_BIN_EXE_zerodrop"));
    let url = redis.as_ref().map(|r| r.url()).unwrap_or_default();
    let store: Vec<&str> = if on_redis {
        vec!["--store", "redis", "--redis-url", &url]
    } else {
        Vec::new()
    };
    let p =
        ServerProcess::spawn(bin, dir.path(), "127.0.0.1:0", &store, &[]).expect("server starts");
    // The server's threads so far and any it starts later inherit its pinning.
    let pinned = pin_all(p.pid(), 0) && pin(0, 1) && xadd.as_ref().is_none_or(|x| x.2);
    // The publishers: one event loop on CPU 1, as `redis-benchmark` is one, unless
    // `PUBLISHER_THREADS` asks for more (worker threads sharing that core).
    let threads = env("PUBLISHER_THREADS", 1);
    let rt = if threads > 1 {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    }
    .unwrap();
    // Per phase (single, batched, refused, floor) and round: events/s, and where the CPU went.
    let mut rates: [Vec<f64>; 4] = Default::default();
    let mut cpu: [Vec<Cpu>; 4] = Default::default();
    let floor_url = floor_server();
    let mut raw = Vec::new();
    let mut watch = vec![p.pid(), std::process::id()];
    watch.extend(redis_pid);
    for _ in 0..rounds {
        let key = &p.creds.api_key;
        let phases = [
            Phase::Single,
            Phase::Batch(batch),
            Phase::Refused,
            Phase::Floor,
        ];
        for (i, phase) in phases.into_iter().enumerate() {
            let url = match phase {
                Phase::Floor => &floor_url,
                _ => &p.url,
            };
            let (rate, per_event) = rt.block_on(answered_rate_watched(
                url,
                key,
                requests(publishers, phase),
                secs,
                &watch,
                phase.answered(),
            ));
            rates[i].push(rate);
            cpu[i].push(Cpu::of(&per_event, phase));
        }
        if xadd.is_none() {
            raw.push(raw_sqlite_inserts(200_000, 200_000));
        }
    }
    let [single, batched, refused, floor] = rates;
    let rounds_of = |v: &[f64]| v.iter().map(|r| *r as u64).collect::<Vec<_>>();
    println!(
        "durable HTTP publish on {}, 200-byte events, 100 streams, {publishers} publishers, \
         {secs} s per round, median of {rounds}; server on CPU 0, publishers on CPU 1: {}",
        if on_redis { "Redis" } else { "SQLite" },
        if pinned { "pinned" } else { "NOT pinned" }
    );
    println!("{:<24} {:>10}  rounds", "requests", "events/s");
    let (s, b) = (median(single.clone()), median(batched.clone()));
    println!("{:<24} {s:>10.0}  {:?}", "1 event each", rounds_of(&single));
    println!(
        "{:<24} {b:>10.0}  {:?}",
        format!("{batch} events each"),
        rounds_of(&batched)
    );
    let f = median(refused.clone());
    println!(
        "{:<24} {f:>10.0}  {:?}",
        "refused 400 (no store)",
        rounds_of(&refused)
    );
    let fl = median(floor.clone());
    println!(
        "{:<24} {fl:>10.0}  {:?}",
        "floor (axum, one route)",
        rounds_of(&floor)
    );
    println!("batch / single: {:.2}x", b / s.max(1.0));
    println!("single / floor: {:.2}x", s / fl.max(1.0));
    println!(
        "CPU per event, µs: {:>9} {:>16} {:>13} {:>11}",
        "zerodrop", "zerodrop-sqlite", "redis-server", "publishers"
    );
    for (phase, label) in [
        "1 event each",
        "batched",
        "refused (per req)",
        "floor (server)",
    ]
    .into_iter()
    .enumerate()
    {
        let m = |f: fn(&Cpu) -> f64| median(cpu[phase].iter().map(f).collect());
        println!(
            "  {label:<16} {:>9.2} {:>16.2} {:>13.2} {:>11.2}",
            m(|c| c.server),
            m(|c| c.sqlite),
            m(|c| c.redis),
            m(|c| c.publishers)
        );
    }
    if let Some((x, redis_us, _)) = xadd {
        println!(
            "{:<24} {x:>10.0}",
            format!("redis-benchmark XADD -c {publishers}")
        );
        println!("single / XADD: {:.2}x", s / x.max(1.0));
        println!(
            "refused / XADD: {:.2}x (the request path and a typed error, no store)",
            f / x.max(1.0)
        );
        println!("batch / XADD: {:.2}x", b / x.max(1.0));
        println!(
            "floor / XADD: {:.2}x (what the HTTP framework alone allows here)",
            fl / x.max(1.0)
        );
        println!(
            "Redis CPU per XADD in that run: {redis_us:.2} µs; single / XADD 0.5x leaves \
             {:.2} µs per publish on each core (CPU 0 the server, CPU 1 Redis and the publishers)",
            2e6 / x.max(1.0)
        );
        return;
    }
    let r = median(raw.clone());
    println!(
        "{:<24} {r:>10.0}  {:?}",
        "raw SQLite, 1 txn",
        rounds_of(&raw)
    );
    println!(
        "batch / raw one-transaction inserts: {:.2}x",
        b / r.max(1.0)
    );
    println!(
        "raw inserts take {:.2} µs per event on one core; batch / raw 0.5x leaves the server's \
         core {:.2} µs per event",
        1e6 / r.max(1.0),
        2e6 / r.max(1.0)
    );
    // Round 1 alone: from round 2 on, with the defaults, every stream sits at its retention
    // limit (10,000 events) and commits also trim.
    if let (Some(s1), Some(b1), Some(r1)) = (single.first(), batched.first(), raw.first()) {
        println!(
            "round 1 (no stream at its retention limit yet): batch / single {:.2}x, batch / raw {:.2}x",
            b1 / s1.max(1.0),
            b1 / r1.max(1.0)
        );
    }
}

/// Where one phase's CPU went, in µs per event: the server's request threads (the floor's
/// thread in the floor phase) and its SQLite threads (writer and checkpointer), Redis, and the
/// publishers (this process's threads but the floor's).
#[derive(Default)]
struct Cpu {
    server: f64,
    sqlite: f64,
    redis: f64,
    publishers: f64,
}

impl Cpu {
    /// From the per-thread-name figures of the watched processes in `phase`: the server, this
    /// process, then Redis when there is one.
    fn of(per_event: &[BTreeMap<String, f64>], phase: Phase) -> Cpu {
        let named = |i: usize, name: &str| {
            per_event
                .get(i)
                .and_then(|m| m.get(name))
                .copied()
                .unwrap_or(0.0)
        };
        let all = |i: usize| per_event.get(i).map_or(0.0, |m| m.values().sum());
        let floor = named(1, FLOOR_THREAD);
        Cpu {
            server: match phase {
                Phase::Floor => floor,
                _ => named(0, "zerodrop"),
            },
            sqlite: named(0, "zerodrop-sqlite"),
            redis: all(2),
            publishers: all(1) - floor,
        }
    }
}

/// The floor server's thread name.
const FLOOR_THREAD: &str = "publish-floor";

/// Starts the floor: a one-route axum server on a thread of its own pinned to CPU 0 (one
/// runtime thread), answering every `POST /v1/streams/{stream}/events` whose body parses as
/// JSON with 201 and an answer shaped like a publish's. Returns its base URL.
fn floor_server() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a loopback port");
    let url = format!("http://{}", listener.local_addr().expect("its address"));
    listener.set_nonblocking(true).expect("non-blocking");
    std::thread::Builder::new()
        .name(FLOOR_THREAD.into())
        .spawn(move || {
            pin(0, 0);
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            rt.block_on(async move {
                let app = axum::Router::new().route(
                    "/v1/streams/{stream}/events",
                    axum::routing::post(floor_publish),
                );
                let l = tokio::net::TcpListener::from_std(listener).expect("a tokio listener");
                axum::serve(l, app).await.expect("the floor serves");
            });
        })
        .expect("the floor's thread");
    url
}

async fn floor_publish(
    axum::extract::Path(stream): axum::extract::Path<String>,
    body: axum::body::Bytes,
) -> (axum::http::StatusCode, axum::Json<Value>) {
    let status = match serde_json::from_slice::<Value>(&body) {
        Ok(v) if v.get("data").is_some() => axum::http::StatusCode::CREATED,
        _ => axum::http::StatusCode::BAD_REQUEST,
    };
    let answer = json!({"stream": stream, "seq": 12_345, "epoch": "e_0123456789abcdef", "ts": 1_765_000_000_000u64});
    (status, axum::Json(answer))
}
