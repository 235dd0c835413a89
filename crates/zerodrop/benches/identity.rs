//! What "identity that ends when it should" costs and how fast it acts (SPEC §9).
//!
//! `cargo bench -p zerodrop --bench identity` runs the release binary and prints:
//! - **revocation reach**: two instances on one `redis-server`; `SOCKETS` (default 200)
//!   WebSockets of one subject on node-1; `POST /admin/revoke` on node-0; the time from the
//!   admin call to each socket's `REVOKED` frame (p50/p99/max), over `ROUNDS` rounds (default
//!   5), a new subject each round;
//! - **hook overhead on a cache hit**: one instance without a hook and one with an
//!   authorization hook (an in-process HTTP server answering `ttlSec: 600`); one socket each
//!   subscribes to 50 streams once (the hook's cache fills), then `SUBSCRIBES` (default 2000)
//!   `subscribe` → `subscribed` round trips over those streams; p50/p99 of both and the
//!   difference;
//! - **hook calls under a reconnect storm**: `CLIENTS` (default 1000) clients of distinct
//!   subjects connect and subscribe (two questions each), then all drop and resume (200
//!   handshakes at a time); the hook's calls during the storm and its call rate, with
//!   verdicts cached (`ttlSec` 600) and without (`ttlSec` absent), and what the hook
//!   upstream's bulkhead (256, and the default 16) refuses.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::json;
use zerodrop_testkit::cluster::Cluster;
use zerodrop_testkit::measure::{env_u64, ms_at};
use zerodrop_testkit::server::ServerProcess;
use zerodrop_testkit::ws::WsClient;

/// How long a frame (pings answered) is waited for.
const WAIT: Duration = Duration::from_secs(20);

async fn revocation_reach(bin: &Path, rounds: u64, sockets: u64) {
    let c = Cluster::start(bin, 2, &[]).expect("cluster starts");
    let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
    for round in 0..rounds {
        let sub = format!("leaver-{round}");
        let t = c.token(&sub, &["room:*"]);
        let mut socks = Vec::new();
        for _ in 0..sockets {
            let mut s = WsClient::connect(&format!("{}/v1/ws?token={t}", c.ws_url(1)))
                .await
                .expect("connects");
            s.expect("welcome").await;
            socks.push(s);
        }
        let started = Instant::now();
        let r = c
            .api(0)
            .post(
                "/admin/revoke",
                Some(&c.creds.admin_token),
                json!({"sub": sub}),
            )
            .await;
        assert_eq!(r.status, 201, "{}", r.text);
        let waits = socks.into_iter().map(|mut s| {
            tokio::spawn(async move {
                let f = s.next_answered(WAIT).await;
                assert_eq!(
                    f.as_ref().map(|f| f["code"].clone()),
                    Some(json!("REVOKED"))
                );
                started.elapsed()
            })
        });
        for w in waits {
            h.record(w.await.unwrap().as_micros() as u64).unwrap();
        }
    }
    println!(
        "revocation reach (admin call on node-0 → REVOKED frame on node-1), {} sockets: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        h.len(),
        ms_at(&h, 0.5),
        ms_at(&h, 0.99),
        h.max() as f64 / 1000.0
    );
}

/// An authorization hook on loopback that allows everything, with `ttl` (or none), counting
/// its calls.
async fn hook(ttl: Option<u64>) -> (String, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let n = calls.clone();
    let answer = match ttl {
        Some(t) => json!({"allow": true, "ttlSec": t}),
        None => json!({"allow": true}),
    }
    .to_string();
    let app = axum::Router::new().route(
        "/authz",
        axum::routing::post(move || {
            let (n, a) = (n.clone(), answer.clone());
            async move {
                n.fetch_add(1, Ordering::Relaxed);
                a
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, calls)
}

fn serve_with_hook(bin: &Path, dir: &Path, hook_url: Option<&str>) -> ServerProcess {
    let env: Vec<(&str, &str)> = match hook_url {
        Some(u) => vec![("ZERODROP_UPSTREAM_HOOK_PRIMARY", u)],
        None => vec![],
    };
    let args: &[&str] = match hook_url {
        Some(_) => &[
            "--authz-upstream",
            "hook",
            "--max-connections",
            "5000",
            "--ws-frames-per-sec",
            "1000000",
        ],
        None => &[
            "--max-connections",
            "5000",
            "--ws-frames-per-sec",
            "1000000",
        ],
    };
    ServerProcess::spawn(bin, dir, "127.0.0.1:0", args, &env).expect("server starts")
}

async fn subscribe_latency(p: &ServerProcess, n: u64) -> Histogram<u64> {
    let t = p.creds.token("u1", &["room:*"], &[]);
    let mut c = WsClient::connect(&format!("{}/v1/ws?token={t}", p.ws_url()))
        .await
        .unwrap();
    c.expect("welcome").await;
    for i in 0..50 {
        c.send(json!({"type":"subscribe","stream":format!("room:{i}")}))
            .await;
        c.expect("subscribed").await;
    }
    let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
    for i in 0..n {
        let sent = Instant::now();
        c.send(json!({"type":"subscribe","stream":format!("room:{}", i % 50)}))
            .await;
        c.expect("subscribed").await;
        h.record(sent.elapsed().as_micros() as u64).unwrap();
    }
    h
}

async fn hook_overhead(bin: &Path, n: u64) {
    let (url, calls) = hook(Some(600)).await;
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let plain = serve_with_hook(bin, d1.path(), None);
    let hooked = serve_with_hook(bin, d2.path(), Some(&url));
    // Alternating halves, so that drift on a shared machine hits both alike.
    let (mut a, mut b) = (
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap(),
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap(),
    );
    for _ in 0..2 {
        a.add(subscribe_latency(&plain, n / 2).await).unwrap();
        b.add(subscribe_latency(&hooked, n / 2).await).unwrap();
    }
    println!(
        "subscribe → subscribed, {} round trips each: no hook p50 {:.3} ms p99 {:.3} ms; hook (cache hit) p50 {:.3} ms p99 {:.3} ms; added at p99 {:+.3} ms; hook calls {}",
        a.len(),
        ms_at(&a, 0.5),
        ms_at(&a, 0.99),
        ms_at(&b, 0.5),
        ms_at(&b, 0.99),
        ms_at(&b, 0.99) - ms_at(&a, 0.99),
        calls.load(Ordering::Relaxed)
    );
}

/// Connects (or resumes) one client: `Ok(resume token)`, or the error code it was refused
/// with.
async fn one_client(url: String, subscribe: bool) -> Result<String, String> {
    let mut c = WsClient::connect(&url)
        .await
        .map_err(|e| format!("{e:?}"))?;
    let w = c.next_answered(WAIT).await.ok_or("closed")?;
    if w["type"] != "welcome" {
        return Err(w["code"].as_str().unwrap_or("?").to_string());
    }
    if subscribe {
        c.send(json!({"type":"subscribe","stream":"room:lobby"}))
            .await;
    }
    let s = c.next_answered(WAIT).await.ok_or("closed")?;
    if s["type"] != "subscribed" {
        return Err(s["code"].as_str().unwrap_or("?").to_string());
    }
    let resume = w["resumeToken"].as_str().unwrap_or_default().to_string();
    c.abort();
    Ok(resume)
}

/// `urls` at most `width` at a time: the resume tokens, and the refusals by code.
async fn wave(
    urls: Vec<String>,
    subscribe: bool,
    width: usize,
) -> (Vec<String>, BTreeMap<String, u64>) {
    let gate = Arc::new(tokio::sync::Semaphore::new(width));
    let tasks: Vec<_> = urls
        .into_iter()
        .map(|u| {
            let gate = gate.clone();
            tokio::spawn(async move {
                let _p = gate.acquire().await.unwrap();
                one_client(u, subscribe).await
            })
        })
        .collect();
    let (mut ok, mut refused) = (Vec::new(), BTreeMap::new());
    for t in tasks {
        match t.await.unwrap() {
            Ok(r) => ok.push(r),
            Err(code) => *refused.entry(code).or_insert(0) += 1,
        }
    }
    (ok, refused)
}

async fn storm(bin: &Path, clients: u64, ttl: Option<u64>, bulkhead: u32) {
    let (url, calls) = hook(ttl).await;
    let dir = tempfile::tempdir().unwrap();
    let width = bulkhead.to_string();
    let p = ServerProcess::spawn(
        bin,
        dir.path(),
        "127.0.0.1:0",
        &["--authz-upstream", "hook", "--max-connections", "5000"],
        &[
            ("ZERODROP_UPSTREAM_HOOK_PRIMARY", url.as_str()),
            (
                "ZERODROP_UPSTREAM_HOOK_BULKHEAD_MAX_IN_FLIGHT",
                width.as_str(),
            ),
        ],
    )
    .expect("server starts");
    let ws = p.ws_url();
    let urls = (0..clients)
        .map(|i| {
            let t = p.creds.token(&format!("user-{i}"), &["room:*"], &[]);
            format!("{ws}/v1/ws?token={t}")
        })
        .collect();
    let (resumes, first_refused) = wave(urls, true, 200).await;
    let before = calls.load(Ordering::Relaxed);
    let started = Instant::now();
    let urls = resumes
        .iter()
        .map(|r| format!("{ws}/v1/ws?resume={r}"))
        .collect();
    let (back, refused) = wave(urls, false, 200).await;
    let took = started.elapsed();
    let during = calls.load(Ordering::Relaxed) - before;
    println!(
        "reconnect storm, {clients} clients of distinct subjects (200 handshakes at a time), ttlSec {}, hook bulkhead {bulkhead}: first connects {} ok {first_refused:?} refused, {before} hook calls; storm: {} resumed {refused:?} refused in {:.2} s, {during} hook calls ({:.0}/s, {:.2} per client)",
        ttl.map_or("absent".to_string(), |t| t.to_string()),
        resumes.len(),
        back.len(),
        took.as_secs_f64(),
        during as f64 / took.as_secs_f64(),
        during as f64 / clients as f64
    );
}

fn main() {
    let bin = Path::new(env!("CARGO_BIN_EXE_zerodrop"));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        revocation_reach(bin, env_u64("ROUNDS", 5), env_u64("SOCKETS", 200)).await;
        hook_overhead(bin, env_u64("SUBSCRIBES", 2000)).await;
        let clients = env_u64("CLIENTS", 1000);
        storm(bin, clients, Some(600), 256).await;
        storm(bin, clients, None, 256).await;
        storm(bin, clients, None, 16).await;
    });
}
