//! What the guardrails cost, against plain publish in the same run.
//!
//! `cargo bench -p zerodrop --bench guard` starts the release binary twice on fresh data dirs
//! (SQLite, `synchronous=FULL`): `plain` with the HTTP rate limits off, `limited` with
//! `--http-requests-per-sec 1000000000` (every request checked, none refused). Each has a
//! webhook source `bench` appending to `hooks:bench`. For 1 and 64 concurrent senders (each
//! waits for its answer before sending the next) it measures for `SECONDS` (env, default 3),
//! in `ROUNDS` rounds (default 3), alternating:
//! - `publish`: `POST /v1/streams/…/events` with no key;
//! - `publish+key`: the same with a unique `Idempotency-Key`;
//! - `webhook`: `POST /v1/webhooks/bench` with a unique message id (deduplication record,
//!   then an append keyed by it);
//! - `publish (limited)`: `publish` against the rate-limited server.
//!
//! It prints requests/s and the p50/p99 latency (all rounds together), and, in process, the
//! cost of one rate-limit check and of one closed circuit's permit + completion, as a share of
//! the p50 of one publish.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use zerodrop_guard::circuit::{CircuitBreaker, CircuitSettings, Outcome};
use zerodrop_guard::{Clock, SystemClock};
use zerodrop_testkit::server::ServerProcess;

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Publish,
    PublishKey,
    Webhook,
}

struct Figures {
    rate: Vec<f64>,
    hist: Histogram<u64>,
}

impl Figures {
    fn new() -> Figures {
        Figures {
            rate: Vec::new(),
            hist: Histogram::new_with_bounds(1, 60_000_000, 3).unwrap(),
        }
    }
}

static SEQ: AtomicU64 = AtomicU64::new(0);

async fn run(url: &str, key: &str, kind: Kind, senders: usize, secs: u64, into: &mut Figures) {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(senders)
        .build()
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let hist = Arc::new(Mutex::new(
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap(),
    ));
    let measuring = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for w in 0..senders {
        let (client, stop, count, hist, measuring) = (
            client.clone(),
            stop.clone(),
            count.clone(),
            hist.clone(),
            measuring.clone(),
        );
        let (url, key) = (url.to_string(), key.to_string());
        tasks.push(tokio::spawn(async move {
            let text = "x".repeat(110);
            let mut i = w;
            while !stop.load(Ordering::Relaxed) {
                let n = SEQ.fetch_add(1, Ordering::Relaxed);
                let req = match kind {
                    Kind::Publish | Kind::PublishKey => {
                        let r = client
                            .post(format!("{url}/v1/streams/bench:{}/events", i % 100))
                            .body(format!("{{\"data\":{{\"text\":\"{text}\"}}}}"));
                        if kind == Kind::PublishKey {
                            r.header("idempotency-key", format!("k-{n}"))
                        } else {
                            r
                        }
                    }
                    Kind::Webhook => client
                        .post(format!("{url}/v1/webhooks/bench"))
                        .header("idempotency-key", format!("m-{n}"))
                        .body(format!("{{\"text\":\"{text}\",\"n\":{n}}}")),
                };
                let t = Instant::now();
                let r = req.bearer_auth(&key).send().await.unwrap();
                let status = r.status().as_u16();
                let _ = r.bytes().await;
                assert!(status == 201 || status == 202, "status {status}");
                if measuring.load(Ordering::Relaxed) {
                    let us = t.elapsed().as_micros().max(1) as u64;
                    let _ = hist.lock().unwrap().record(us);
                    count.fetch_add(1, Ordering::Relaxed);
                }
                i += senders;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await; // warm-up
    measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    measuring.store(false, Ordering::Relaxed);
    let n = count.load(Ordering::Relaxed);
    into.rate.push(n as f64 / started.elapsed().as_secs_f64());
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    into.hist.add(&*hist.lock().unwrap()).unwrap();
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Nanoseconds per call of `f`, over `n` calls.
fn per_call(n: u32, mut f: impl FnMut()) -> f64 {
    let t = Instant::now();
    for _ in 0..n {
        f();
    }
    t.elapsed().as_nanos() as f64 / f64::from(n)
}

fn main() {
    let rounds = env("ROUNDS", 3);
    let secs = env("SECONDS", 3);
    let bin = Path::new(env!("CARGO_BIN_EXE_zerodrop"));
    let hook = [("ZERODROP_WEBHOOK_BENCH_STREAM", "hooks:bench")];
    let d1 = tempfile::tempdir().unwrap();
    let plain = ServerProcess::spawn(bin, d1.path(), "127.0.0.1:0", &[], &hook).unwrap();
    let d2 = tempfile::tempdir().unwrap();
    let limited = ServerProcess::spawn(
        bin,
        d2.path(),
        "127.0.0.1:0",
        &["--http-requests-per-sec", "1000000000"],
        &hook,
    )
    .unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let cases: [(&str, Kind, &ServerProcess); 4] = [
        ("publish", Kind::Publish, &plain),
        ("publish+key", Kind::PublishKey, &plain),
        ("webhook", Kind::Webhook, &plain),
        ("publish (limited)", Kind::Publish, &limited),
    ];
    println!(
        "durable HTTP, 200-byte bodies, {secs} s per round, {rounds} rounds alternating; req/s is the median round, latencies over all rounds"
    );
    println!(
        "{:<8} {:<18} {:>9} {:>9} {:>9}  vs publish",
        "senders", "case", "req/s", "p50 ms", "p99 ms"
    );
    let mut publish_p50_us = 0.0;
    for senders in [1usize, 64] {
        let mut figs: Vec<Figures> = cases.iter().map(|_| Figures::new()).collect();
        for _ in 0..rounds {
            for (i, (_, kind, p)) in cases.iter().enumerate() {
                rt.block_on(run(
                    &p.url,
                    &p.creds.api_key,
                    *kind,
                    senders,
                    secs,
                    &mut figs[i],
                ));
            }
        }
        let base = median(figs[0].rate.clone());
        for (i, (name, _, _)) in cases.iter().enumerate() {
            let f = &figs[i];
            let rate = median(f.rate.clone());
            let p50 = f.hist.value_at_quantile(0.5) as f64 / 1000.0;
            let p99 = f.hist.value_at_quantile(0.99) as f64 / 1000.0;
            if senders == 1 && i == 0 {
                publish_p50_us = p50 * 1000.0;
            }
            println!(
                "{:<8} {:<18} {:>9.0} {:>9.2} {:>9.2}  {:.2}×",
                senders,
                name,
                rate,
                p50,
                p99,
                rate / base
            );
        }
    }
    // In process: what one check costs, next to one publish.
    let limiter = governor::RateLimiter::keyed(governor::Quota::per_second(
        std::num::NonZeroU32::new(1_000_000_000).unwrap(),
    ));
    let key = (
        "POST /v1/streams/{stream}/events".to_string(),
        "api-key".to_string(),
    );
    let limit_ns = per_call(1_000_000, || {
        let _ = limiter.check_key(&key);
    });
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let breaker = CircuitBreaker::new("bench", CircuitSettings::default(), clock).unwrap();
    let circuit_ns = per_call(1_000_000, || {
        let p = breaker.acquire().unwrap();
        breaker.complete(p, Outcome::Success);
    });
    println!("\nin process, per call (1,000,000 calls):");
    for (name, ns) in [
        ("rate-limit check", limit_ns),
        ("closed circuit permit + completion", circuit_ns),
    ] {
        println!(
            "{:<36} {:>7.0} ns  = {:.3} % of one publish's p50 ({:.0} µs, 1 sender)",
            name,
            ns,
            ns / (publish_p50_us * 1000.0) * 100.0,
            publish_p50_us
        );
    }
}
