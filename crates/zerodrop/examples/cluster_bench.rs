//! zerodrop on Redis, measured end to end with real processes: publish throughput over HTTP
//! against `redis-benchmark`'s `XADD` rate on the same Redis in the same run, cross-instance
//! fan-out to 1,000 WebSocket subscribers, and a full drain of 1,000 clients to another
//! instance.
//!
//! ```sh
//! cargo build --release -p zerodrop --bin zerodrop --example cluster_bench
//! ./target/release/examples/cluster_bench                 # every part
//! ./target/release/examples/cluster_bench publish fanout  # some parts
//! ```
//!
//! Options: `--bin PATH` (default: the `zerodrop` next to this program's directory),
//! `--subscribers N` (1000), `--rate R` events/s for the fan-out (100), `--secs S` (10),
//! `--spread S1,S2` drain `max_session_age_seconds` values (0,5).
//!
//! Everything (Redis, the instances, this client) shares the machine: read ratios and
//! relative figures, not absolute ones.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;
use zerodrop_testkit::cluster::Cluster;
use zerodrop_testkit::http::Api;
use zerodrop_testkit::redis::{RedisServer, xadd_baseline};
use zerodrop_testkit::roam::{Publisher, Tally, WsRoamer, verify_log};

type Res<T> = Result<T, String>;

struct Opts {
    bin: PathBuf,
    parts: Vec<String>,
    subscribers: usize,
    rate: u64,
    secs: u64,
    spreads: Vec<u64>,
}

fn opts() -> Res<Opts> {
    let mut o = Opts {
        bin: std::env::current_exe()
            .map_err(|e| e.to_string())?
            .parent()
            .and_then(|p| p.parent())
            .map(|p| p.join("zerodrop"))
            .ok_or("cannot find the zerodrop binary; pass --bin")?,
        parts: Vec::new(),
        subscribers: 1000,
        rate: 100,
        secs: 10,
        spreads: vec![0, 5],
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--bin" => o.bin = PathBuf::from(val()?),
            "--subscribers" => o.subscribers = val()?.parse().map_err(|_| "--subscribers N")?,
            "--rate" => o.rate = val()?.parse().map_err(|_| "--rate R")?,
            "--secs" => o.secs = val()?.parse().map_err(|_| "--secs S")?,
            "--spread" => {
                o.spreads = val()?
                    .split(',')
                    .map(|s| s.parse().map_err(|_| "--spread S1,S2"))
                    .collect::<Result<_, _>>()?
            }
            "publish" | "fanout" | "drain" => o.parts.push(a),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if o.parts.is_empty() {
        o.parts = vec!["publish".into(), "fanout".into(), "drain".into()];
    }
    if !o.bin.exists() {
        return Err(format!("{} does not exist; pass --bin", o.bin.display()));
    }
    Ok(o)
}

fn pct(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn cluster(bin: &std::path::Path, redis: RedisServer, n: usize) -> Res<Cluster> {
    Cluster::start_on(bin, redis, n, &["--max-connections", "5000"]).map_err(|e| e.to_string())
}

// ------------------------------------------------------------------------------- publish

/// `publishers` concurrent HTTP publishers, `each` publishes apiece, spread over `apis` and 100
/// streams. Returns (publishes/s, p50 ms, p99 ms).
async fn publish_rate(apis: &[Api], publishers: usize, each: usize) -> Res<(f64, f64, f64)> {
    let data = format!("{{\"kind\":\"bench\",\"pad\":\"{}\"}}", "x".repeat(64));
    let body = json!({"data": serde_json::from_str::<Value>(&data).map_err(|e| e.to_string())?})
        .to_string();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..publishers {
        let api = apis[w % apis.len()].clone();
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(each);
            for i in 0..each {
                let stream = format!("bench:{}", (w * 7 + i) % 100);
                let t = Instant::now();
                let res = api
                    .client
                    .post(format!("{}/v1/streams/{stream}/events", api.base))
                    .bearer_auth(&api.creds.api_key)
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await
                    .map_err(|e| e.to_string())?;
                if res.status().as_u16() != 201 {
                    return Err(format!("publish answered {}", res.status()));
                }
                let _ = res.bytes().await;
                lat.push(t.elapsed().as_micros() as u64);
            }
            Ok::<_, String>(lat)
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.map_err(|e| e.to_string())??);
    }
    let rate = (publishers * each) as f64 / started.elapsed().as_secs_f64();
    lat.sort_unstable();
    Ok((
        rate,
        pct(&lat, 0.5) as f64 / 1000.0,
        pct(&lat, 0.99) as f64 / 1000.0,
    ))
}

async fn bench_publish(o: &Opts) -> Res<()> {
    println!("\n## Publish throughput over HTTP (Redis without persistence)\n");
    let redis = RedisServer::start().map_err(|e| e.to_string())?;
    let port = redis.port();
    let base_1 = xadd_baseline(port, 1, 20_000)?;
    let base_64 = xadd_baseline(port, 64, 100_000)?;
    let c = cluster(&o.bin, redis, 2)?;
    let one = [c.api(0)];
    let both = [c.api(0), c.api(1)];
    publish_rate(&one, 8, 100).await?; // warm-up: scripts, connections, streams
    let (r1, p50_1, p99_1) = publish_rate(&one, 1, 5_000).await?;
    let (r64, p50_64, p99_64) = publish_rate(&one, 64, 300).await?;
    let (r64b, p50_64b, p99_64b) = publish_rate(&both, 64, 300).await?;
    println!();
    println!(
        "| publishers | instances | zerodrop publishes/s (201) | p50 ms | p99 ms | redis-benchmark XADD/s (same -c) | ratio |"
    );
    println!("|---|---|---|---|---|---|---|");
    println!(
        "| 1 | 1 | {r1:.0} | {p50_1:.2} | {p99_1:.2} | {base_1:.0} | {:.2} |",
        r1 / base_1
    );
    println!(
        "| 64 | 1 | {r64:.0} | {p50_64:.2} | {p99_64:.2} | {base_64:.0} | {:.2} |",
        r64 / base_64
    );
    println!(
        "| 64 | 2 | {r64b:.0} | {p50_64b:.2} | {p99_64b:.2} | {base_64:.0} | {:.2} |",
        r64b / base_64
    );
    Ok(())
}

// -------------------------------------------------------------------------------- fan-out

struct SubStats {
    received: AtomicU64,
    gaps: AtomicU64,
    last_at: Mutex<Option<Instant>>,
    /// Publish-to-receive latencies (µs) per instance index.
    lat: Vec<Mutex<Vec<u64>>>,
}

/// The unsigned number right after the first `key` in `text`.
fn num_after(text: &str, key: &str) -> Option<u64> {
    let at = text.find(key)? + key.len();
    let digits: &str = &text[at..];
    let end = digits
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(digits.len());
    digits[..end].parse().ok()
}

/// One plain WebSocket subscriber (no roaming): subscribes live, records latency and gaps
/// until `stop` or until it has `want` events.
async fn subscriber(
    url: String,
    node: usize,
    origin: Instant,
    stats: Arc<SubStats>,
    ready: Arc<AtomicUsize>,
    want: watch::Receiver<Option<u64>>,
) -> Res<()> {
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
        url.as_str(),
    )
    .map_err(|e| e.to_string())?;
    req.headers_mut().insert(
        "sec-websocket-protocol",
        "zerodrop.v1".parse().map_err(|_| "header")?,
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .map_err(|e| e.to_string())?;
    let mut lat = Vec::new();
    let mut last = 0u64;
    let mut got = 0u64;
    let until = Instant::now() + Duration::from_secs(600);
    while Instant::now() < until {
        if let Some(w) = *want.borrow()
            && got >= w
        {
            break;
        }
        let msg = match tokio::time::timeout(Duration::from_millis(500), ws.next()).await {
            Err(_) => continue,
            Ok(Some(Ok(m))) => m,
            Ok(_) => return Err("subscriber lost its connection".into()),
        };
        let Message::Text(t) = msg else { continue };
        // Event frames are most of the traffic: read the two numbers without parsing the
        // frame, so that this process (which shares the machine) spends little per event.
        if let Some(rest) = t.as_str().strip_prefix("{\"type\":\"event\",") {
            let now = origin.elapsed().as_micros() as u64;
            let sent = num_after(rest, "\"t\":").unwrap_or(now);
            lat.push(now.saturating_sub(sent));
            let seq = num_after(rest, "\"seq\":").unwrap_or(0);
            if last != 0 && seq != last + 1 {
                stats.gaps.fetch_add(1, Ordering::Relaxed);
            }
            last = seq;
            got += 1;
            continue;
        }
        let f: Value = serde_json::from_str(t.as_str()).map_err(|e| e.to_string())?;
        match f["type"].as_str() {
            Some("welcome") => {
                let sub = json!({"type": "subscribe", "stream": "fan:1"}).to_string();
                ws.send(Message::Text(sub.into()))
                    .await
                    .map_err(|e| e.to_string())?;
            }
            Some("subscribed") => {
                ready.fetch_add(1, Ordering::Relaxed);
            }
            Some("ping") => {
                let pong = json!({"type": "pong", "t": f["t"]}).to_string();
                let _ = ws.send(Message::Text(pong.into())).await;
            }
            _ => {}
        }
    }
    stats.received.fetch_add(got, Ordering::Relaxed);
    {
        let mut l = stats.last_at.lock().map_err(|_| "poisoned")?;
        let now = Instant::now();
        if l.is_none_or(|t| t < now) {
            *l = Some(now);
        }
    }
    stats.lat[node]
        .lock()
        .map_err(|_| "poisoned")?
        .extend_from_slice(&lat);
    let _ = ws.close(None).await;
    Ok(())
}

async fn bench_fanout(o: &Opts) -> Res<()> {
    println!(
        "\n## Cross-instance fan-out: 1 publisher on node-0, {} WebSocket subscribers over node-0 and node-1\n",
        o.subscribers
    );
    let redis = RedisServer::start().map_err(|e| e.to_string())?;
    let c = cluster(&o.bin, redis, 2)?;
    let tok = c.token("bench", &["fan:*"]);
    let origin = Instant::now();
    let stats = Arc::new(SubStats {
        received: AtomicU64::new(0),
        gaps: AtomicU64::new(0),
        last_at: Mutex::new(None),
        lat: vec![Mutex::new(Vec::new()), Mutex::new(Vec::new())],
    });
    let ready = Arc::new(AtomicUsize::new(0));
    let (want_tx, want) = watch::channel(None);
    let mut subs = Vec::new();
    for k in 0..o.subscribers {
        let node = k % 2;
        let url = format!("{}/v1/ws?token={tok}", c.ws_url(node));
        subs.push(tokio::spawn(subscriber(
            url,
            node,
            origin,
            stats.clone(),
            ready.clone(),
            want.clone(),
        )));
        if k % 100 == 99 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let until = Instant::now() + Duration::from_secs(60);
    while ready.load(Ordering::Relaxed) < o.subscribers {
        if Instant::now() > until {
            return Err(format!(
                "only {} subscribers subscribed",
                ready.load(Ordering::Relaxed)
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "{} subscribers subscribed ({} per instance); publishing {} events/s for {} s on node-0",
        o.subscribers,
        o.subscribers / 2,
        o.rate,
        o.secs
    );
    // The publisher runs on its own thread, so that the subscribers' work in this process
    // does not hold back its pace.
    let api = c.api(0);
    let (rate, secs) = (o.rate.max(1), o.secs);
    let started = Instant::now();
    let publishing = std::thread::spawn(move || -> Res<u64> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(async move {
            let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut published = 0u64;
            while started.elapsed() < Duration::from_secs(secs) {
                tick.tick().await;
                let t = origin.elapsed().as_micros() as u64;
                let r = api.try_publish("fan:1", json!({"t": t})).await;
                if r.status != 201 {
                    return Err(format!("publish answered {}: {}", r.status, r.text));
                }
                published += 1;
            }
            Ok(published)
        })
    });
    let published = tokio::task::spawn_blocking(move || publishing.join())
        .await
        .map_err(|e| e.to_string())?
        .map_err(|_| "the publisher panicked")??;
    let publish_secs = started.elapsed().as_secs_f64();
    want_tx.send_replace(Some(published));
    for s in subs {
        tokio::time::timeout(Duration::from_secs(120), s)
            .await
            .map_err(|_| "subscribers did not finish")?
            .map_err(|e| e.to_string())??;
    }
    let last = stats
        .last_at
        .lock()
        .map_err(|_| "poisoned")?
        .unwrap_or_else(Instant::now);
    let secs = last.duration_since(started).as_secs_f64();
    let delivered = stats.received.load(Ordering::Relaxed);
    let expected = published * o.subscribers as u64;
    println!(
        "published {published} events in {publish_secs:.1} s ({:.0}/s); delivered {delivered} of {expected} \
         in {secs:.1} s = {:.0} deliveries/s; gaps seen by subscribers: {}",
        published as f64 / publish_secs,
        delivered as f64 / secs,
        stats.gaps.load(Ordering::Relaxed)
    );
    println!();
    println!("| subscribers on | deliveries | p50 ms | p99 ms | max ms |");
    println!("|---|---|---|---|---|");
    let mut all = Vec::new();
    for (node, l) in stats.lat.iter().enumerate() {
        let mut l = l.lock().map_err(|_| "poisoned")?.clone();
        l.sort_unstable();
        let name = if node == 0 {
            "node-0 (publisher's instance)"
        } else {
            "node-1 (other instance)"
        };
        println!(
            "| {name} | {} | {:.2} | {:.2} | {:.2} |",
            l.len(),
            pct(&l, 0.5) as f64 / 1000.0,
            pct(&l, 0.99) as f64 / 1000.0,
            l.last().copied().unwrap_or(0) as f64 / 1000.0
        );
        all.extend(l);
    }
    all.sort_unstable();
    println!(
        "| both | {} | {:.2} | {:.2} | {:.2} |",
        all.len(),
        pct(&all, 0.5) as f64 / 1000.0,
        pct(&all, 0.99) as f64 / 1000.0,
        all.last().copied().unwrap_or(0) as f64 / 1000.0
    );
    Ok(())
}

// ---------------------------------------------------------------------------------- drain

async fn bench_drain(o: &Opts, spread: u64) -> Res<()> {
    println!(
        "\n## Drain of {} WebSocket clients from node-0 to node-1, max_session_age_seconds={spread}\n",
        o.subscribers
    );
    let redis = RedisServer::start().map_err(|e| e.to_string())?;
    let c = cluster(&o.bin, redis, 2)?;
    let apis = [c.api(0), c.api(1)];
    let streams: Vec<String> = (0..10).map(|i| format!("drain:{i}")).collect();
    let tok = c.token("bench", &["drain:*"]);
    let (finish_tx, finish) = watch::channel(None);
    let mut clients = Vec::new();
    for k in 0..o.subscribers {
        let r = WsRoamer {
            name: format!("ws-{k}"),
            urls: c.ws_urls(),
            start: 0,
            token: tok.clone(),
            streams: vec![streams[k % streams.len()].clone()],
            ack_every: 0,
            deadline: Duration::from_secs(300),
        };
        clients.push(r.spawn(finish.clone()));
        if k % 100 == 99 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let connected = |api: Api| async move {
        let m = api.metrics_json().await;
        m["ws_metrics"]["ws_active"].as_u64().unwrap_or(0)
    };
    let until = Instant::now() + Duration::from_secs(60);
    while connected(apis[0].clone()).await < o.subscribers as u64 {
        if Instant::now() > until {
            return Err("clients did not all connect to node-0".into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Publishing continues on node-1 throughout (50 events/s over 10 streams).
    let (stop_tx, stop) = watch::channel(false);
    let publisher = Publisher {
        apis: vec![apis[1].clone()],
        streams: streams.clone(),
        every: Duration::from_millis(20),
        attempts: 50,
    }
    .spawn(stop);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let admin = c.creds.admin_token.clone();
    let t0 = Instant::now();
    let r = apis[0]
        .post(
            "/admin/drain/start",
            Some(&admin),
            json!({"reason": "rolling_deployment", "max_session_age_seconds": spread}),
        )
        .await;
    if r.status != 200 {
        return Err(format!("drain/start answered {}", r.status));
    }
    let mut drained_at = None;
    let mut all_on_1_at = None;
    let until = Instant::now() + Duration::from_secs(spread + 120);
    while (drained_at.is_none() || all_on_1_at.is_none()) && Instant::now() < until {
        if drained_at.is_none() {
            let s = apis[0].get("/admin/drain/status", Some(&admin)).await.json;
            if s["state"] == "drained" {
                drained_at = Some(t0.elapsed());
            }
        }
        if all_on_1_at.is_none() && connected(apis[1].clone()).await >= o.subscribers as u64 {
            all_on_1_at = Some(t0.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop_tx.send_replace(true);
    let published = publisher.await.map_err(|e| e.to_string())?;
    let mut heads = BTreeMap::new();
    for s in &streams {
        let acked = published.acked.get(s).cloned().unwrap_or_default();
        heads.insert(s.clone(), verify_log(&apis[1], s, &acked).await?);
    }
    finish_tx.send_replace(Some(Arc::new(heads.clone())));
    let mut tallies: Vec<Tally> = Vec::new();
    for h in clients {
        tallies.push(
            tokio::time::timeout(Duration::from_secs(120), h)
                .await
                .map_err(|_| "clients did not finish")?
                .map_err(|e| e.to_string())?,
        );
    }
    let failed = tallies.iter().filter(|t| t.check(&heads).is_err()).count();
    let failed_resumes: u32 = tallies.iter().map(|t| t.failed_resumes).sum();
    let resumed: u32 = tallies.iter().map(|t| t.resumed).sum();
    let refused: u32 = tallies.iter().map(|t| t.refused).sum();
    let dups: u64 = tallies.iter().map(|t| t.duplicates).sum();
    let mut ms: Vec<u64> = tallies
        .iter()
        .flat_map(|t| t.reconnect_ms.iter().copied())
        .collect();
    ms.sort_unstable();
    let dropped = |m: Value| m["ws_metrics"]["dropped_messages"].as_u64().unwrap_or(0);
    let d0 = dropped(apis[0].metrics_json().await);
    let d1 = dropped(apis[1].metrics_json().await);
    let secs = |d: Option<Duration>| {
        d.map_or("not reached".into(), |d| {
            format!("{:.2} s", d.as_secs_f64())
        })
    };
    println!(
        "| clients | spread (s) | node-0 drained after | all on node-1 after | resumes | failed resumes | refused attempts | reconnect p50 / p99 / max ms | clients with a gap or error | duplicates dropped | dropped_messages (node-0, node-1) | events published meanwhile |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    println!(
        "| {} | {spread} | {} | {} | {resumed} | {failed_resumes} | {refused} | {} / {} / {} | {failed} | {dups} | {d0}, {d1} | {} |",
        o.subscribers,
        secs(drained_at),
        secs(all_on_1_at),
        pct(&ms, 0.5),
        pct(&ms, 0.99),
        ms.last().copied().unwrap_or(0),
        published.count()
    );
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Res<()> {
    let o = opts()?;
    println!("zerodrop: {}", o.bin.display());
    if o.parts.iter().any(|p| p == "publish") {
        bench_publish(&o).await?;
    }
    if o.parts.iter().any(|p| p == "fanout") {
        bench_fanout(&o).await?;
    }
    if o.parts.iter().any(|p| p == "drain") {
        for s in o.spreads.clone() {
            bench_drain(&o, s).await?;
        }
    }
    Ok(())
}
