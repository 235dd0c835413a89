//! Network faults between real processes in network namespaces this test creates: a zerodrop
//! instance in one namespace, its `redis-server` in another, the clients in the test's own.
//! Delay, loss and full partitions hit first the path between the instance and Redis, then
//! the one between the clients and the instance, while a publisher publishes (with
//! idempotency keys, retrying until answered) and SDK clients subscribe and resume.
//!
//! Packet loss and partitions are `nftables` rules on the links (`numgen random` drops, or
//! every packet dropped: a silent partition, not a refused connection). This machine's kernel
//! has no `sch_netem`, so delay comes from a TCP proxy on each path that holds every chunk for
//! the delay before passing it on (in order); the Redis path's proxy runs inside the
//! instance's namespace. Checked afterwards:
//! every acknowledged event is in the log at its seq with its data, the log has no hole and no
//! duplicate, and every client has every event in order, or ended with a typed error after a
//! gap-free prefix; the instance recovers with nothing restarted.
//!
//! Needs root (network namespaces, `tc`): elsewhere the test says so and passes. Every phase
//! is bounded in time; the namespaces (and with them the links) and the processes are removed
//! on drop, also when the test fails.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use zerodrop_client::{Client, ClientOptions, SubscribeOptions, SubscriptionError};
use zerodrop_testkit::server::ServerProcess;

const BIN: &str = env!("CARGO_BIN_EXE_zerodrop");
const STREAM: &str = "part:1";

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip").args(args).output()?;
    anyhow::ensure!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn in_ns(ns: &str, cmd: &[&str]) -> anyhow::Result<()> {
    let mut args = vec!["netns", "exec", ns];
    args.extend_from_slice(cmd);
    ip(&args)
}

/// Two namespaces and two links: clients (here) ↔ instance ↔ Redis. Removed on drop.
struct Lab {
    inst: String,
    redis_ns: String,
    id: String,
    /// Addresses: the instance on the client link, Redis on the Redis link.
    inst_addr: String,
    redis_addr: String,
    redis: Option<Child>,
}

impl Lab {
    fn new() -> anyhow::Result<Lab> {
        let id = format!("{:x}", std::process::id() % 0xffff);
        let net = std::process::id() % 250 + 1;
        let lab = Lab {
            inst: format!("zdpi-{id}"),
            redis_ns: format!("zdpr-{id}"),
            inst_addr: format!("10.213.{net}.2"),
            redis_addr: format!("10.213.{net}.6"),
            id,
            redis: None,
        };
        // Leftovers of an earlier run with the same pid are removed first.
        let _ = ip(&["netns", "del", &lab.inst]);
        let _ = ip(&["netns", "del", &lab.redis_ns]);
        let _ = ip(&["link", "del", &format!("zc{}", lab.id)]);
        ip(&["netns", "add", &lab.inst])?;
        ip(&["netns", "add", &lab.redis_ns])?;
        let (c, i, r, s) = (
            format!("zc{}", lab.id),
            format!("zi{}", lab.id),
            format!("zr{}", lab.id),
            format!("zs{}", lab.id),
        );
        ip(&["link", "add", &c, "type", "veth", "peer", "name", &i])?;
        ip(&["link", "set", &i, "netns", &lab.inst])?;
        ip(&["addr", "add", &format!("10.213.{net}.1/30"), "dev", &c])?;
        ip(&["link", "set", &c, "up"])?;
        ip(&["link", "add", &r, "type", "veth", "peer", "name", &s])?;
        ip(&["link", "set", &r, "netns", &lab.inst])?;
        ip(&["link", "set", &s, "netns", &lab.redis_ns])?;
        let n = |ns: &str, a: &[&str]| {
            let mut v = vec!["-n", ns];
            v.extend_from_slice(a);
            ip(&v)
        };
        n(
            &lab.inst,
            &["addr", "add", &format!("{}/30", lab.inst_addr), "dev", &i],
        )?;
        n(
            &lab.inst,
            &["addr", "add", &format!("10.213.{net}.5/30"), "dev", &r],
        )?;
        n(
            &lab.redis_ns,
            &["addr", "add", &format!("{}/30", lab.redis_addr), "dev", &s],
        )?;
        for (ns, dev) in [(&lab.inst, &i), (&lab.inst, &r), (&lab.redis_ns, &s)] {
            n(ns, &["link", "set", dev, "up"])?;
        }
        n(&lab.inst, &["link", "set", "lo", "up"])?;
        n(&lab.redis_ns, &["link", "set", "lo", "up"])?;
        Ok(lab)
    }

    fn start_redis(&mut self) -> anyhow::Result<String> {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.redis_ns, "redis-server"])
            .args([
                "--port",
                "6390",
                "--bind",
                &self.redis_addr,
                "--protected-mode",
                "no",
            ])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        self.redis = Some(child);
        let url = format!("redis://{}:6390", self.redis_addr);
        // Reachable from the instance's namespace.
        let until = Instant::now() + Duration::from_secs(10);
        while in_ns(
            &self.inst,
            &["redis-cli", "-h", &self.redis_addr, "-p", "6390", "ping"],
        )
        .is_err()
        {
            anyhow::ensure!(Instant::now() < until, "redis did not answer");
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(url)
    }

    /// Drops packets leaving through both ends of a link: `Some(percent)` (100: partitioned),
    /// `None` heals it.
    fn impair(&self, link: Link, loss: Option<u32>) {
        let ends = match link {
            Link::Clients => [
                (None, format!("zc{}", self.id)),
                (Some(self.inst.clone()), format!("zi{}", self.id)),
            ],
            Link::Redis => [
                (Some(self.inst.clone()), format!("zr{}", self.id)),
                (Some(self.redis_ns.clone()), format!("zs{}", self.id)),
            ],
        };
        for (ns, dev) in ends {
            let table = format!("zdp{}", self.id);
            let nft = |args: &[&str]| {
                let mut cmd = match &ns {
                    Some(ns) => {
                        let mut c = Command::new("ip");
                        c.args(["netns", "exec", ns, "nft"]);
                        c
                    }
                    None => Command::new("nft"),
                };
                let out = cmd.args(args).output().expect("nft runs");
                assert!(
                    out.status.success(),
                    "nft {args:?}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            };
            // One table per link end, replaced whole at each change.
            let _ = match &ns {
                Some(ns) => Command::new("ip")
                    .args([
                        "netns", "exec", ns, "nft", "delete", "table", "inet", &table,
                    ])
                    .output(),
                None => Command::new("nft")
                    .args(["delete", "table", "inet", &table])
                    .output(),
            };
            let Some(pct) = loss else { continue };
            nft(&["add", "table", "inet", &table]);
            nft(&[
                "add",
                "chain",
                "inet",
                &table,
                "out",
                "{ type filter hook output priority 0 ; policy accept ; }",
            ]);
            let pct = pct.to_string();
            let mut rule = vec!["add", "rule", "inet", &table, "out", "oifname", &dev];
            if pct != "100" {
                rule.extend(["numgen", "random", "mod", "100", "<", &pct]);
            }
            rule.push("drop");
            nft(&rule);
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Link {
    Clients,
    Redis,
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(mut c) = self.redis.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = ip(&["netns", "del", &self.inst]);
        let _ = ip(&["netns", "del", &self.redis_ns]);
        let _ = ip(&["link", "del", &format!("zc{}", self.id)]);
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", &format!("zdp{}", self.id)])
            .output();
    }
}

/// A TCP proxy that holds every chunk for the current delay (ms) before passing it on, in
/// order, per direction; `reset` drops every connection open at that moment (as a NAT or a
/// load balancer losing its state would). Runs on its own thread, inside network namespace
/// `ns` when given; stops when the returned sender is dropped.
fn delay_proxy(
    ns: Option<&str>,
    listen: &str,
    to: String,
    delay_ms: Arc<AtomicU64>,
    reset: Arc<tokio::sync::Notify>,
) -> (String, tokio::sync::oneshot::Sender<()>) {
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let ns = ns.map(String::from);
    let listen = listen.to_string();
    std::thread::spawn(move || {
        if let Some(ns) = ns {
            let f = std::fs::File::open(format!("/var/run/netns/{ns}")).expect("netns file");
            // SAFETY: setns on this thread only, with a namespace fd we hold open.
            let rc =
                unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns into {ns}");
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind(&listen)
                .await
                .expect("proxy binds");
            addr_tx
                .send(listener.local_addr().unwrap().to_string())
                .unwrap();
            let serve = async {
                loop {
                    let Ok((down, _)) = listener.accept().await else {
                        continue;
                    };
                    let (to, delay, reset) = (to.clone(), delay_ms.clone(), reset.clone());
                    tokio::spawn(async move {
                        let Ok(up) = tokio::net::TcpStream::connect(&to).await else {
                            return;
                        };
                        let (dr, dw) = down.into_split();
                        let (ur, uw) = up.into_split();
                        let there = tokio::spawn(pump(dr, uw, delay.clone()));
                        tokio::select! {
                            _ = pump(ur, dw, delay) => {}
                            _ = reset.notified() => {}
                        }
                        there.abort();
                    });
                }
            };
            tokio::select! {
                _ = serve => {}
                _ = stop_rx => {}
            }
        });
    });
    (addr_rx.recv().expect("proxy address"), stop_tx)
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay_ms: Arc<AtomicU64>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let writer = tokio::spawn(async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    });
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let due = tokio::time::Instant::now()
                    + Duration::from_millis(delay_ms.load(Ordering::Relaxed));
                if tx.send((due, buf[..n].to_vec())).is_err() {
                    break;
                }
            }
        }
    }
    drop(tx);
    let _ = writer.await;
}

/// What the publisher got acknowledged: n → seq.
type Acked = Arc<Mutex<BTreeMap<u64, u64>>>;

/// Publishes 1, 2, … with one idempotency key each, retrying a publish until it is answered
/// 201 (or `until`), so every event it moves past is acknowledged.
async fn publisher(url: String, key: String, acked: Acked, stop: Instant) -> (u64, u64) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let (mut n, mut retries) = (1u64, 0u64);
    while Instant::now() < stop {
        let r = http
            .post(format!("{url}/v1/streams/{STREAM}/events"))
            .bearer_auth(&key)
            .header("idempotency-key", format!("k-{n}"))
            .json(&json!({"data": {"n": n}}))
            .send()
            .await;
        match r {
            Ok(res) if res.status().as_u16() == 201 => {
                let v: Value = res.json().await.unwrap_or(Value::Null);
                let seq = v["seq"].as_u64().expect("201 carries seq");
                acked.lock().unwrap().insert(n, seq);
                n += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            _ => {
                retries += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    (n - 1, retries)
}

/// What one SDK client received: seqs in order, and how its subscription ended (if it did).
type Got = Arc<Mutex<(Vec<u64>, Option<SubscriptionError>)>>;

async fn subscriber(url: String, token: String, got: Got) -> Client {
    let opts = ClientOptions {
        base_delay: Duration::from_millis(100),
        max_delay: Duration::from_millis(500),
        connect_timeout: Duration::from_secs(3),
        ..ClientOptions::default()
    };
    let client = Client::connect_with(&[&url], &token, opts)
        .await
        .expect("client connects");
    let mut sub = client.subscribe_with(
        STREAM,
        SubscribeOptions {
            after: Some(0),
            epoch: None,
            ..Default::default()
        },
    );
    tokio::spawn(async move {
        while let Some(item) = sub.next().await {
            match item {
                Ok(e) => {
                    got.lock().unwrap().0.push(e.seq);
                    e.handled();
                }
                Err(err) => {
                    got.lock().unwrap().1 = Some(err);
                    return;
                }
            }
        }
    });
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_and_lossy_links_lose_no_acknowledged_event_and_hide_no_gap() {
    let mut lab = match Lab::new() {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "SKIPPED: network namespaces are not available here (needs root and iproute2): {e:#}"
            );
            return;
        }
    };
    let redis_direct = lab.start_redis().expect("redis starts in its namespace");
    // Delay proxies: Redis's inside the instance's namespace, the clients' in ours.
    let redis_delay = Arc::new(AtomicU64::new(0));
    let (redis_proxy, _stop_redis_proxy) = delay_proxy(
        Some(&lab.inst),
        "127.0.0.1:0",
        redis_direct.trim_start_matches("redis://").to_string(),
        redis_delay.clone(),
        Arc::new(tokio::sync::Notify::new()),
    );
    let redis_url = format!("redis://{redis_proxy}");
    // The instance runs in its namespace through a wrapper (the harness runs `<bin> serve …`).
    let dir = tempfile::tempdir().unwrap();
    let wrapper = dir.path().join("zerodrop-in-ns");
    std::fs::write(
        &wrapper,
        format!("#!/bin/sh\nexec ip netns exec {} {BIN} \"$@\"\n", lab.inst),
    )
    .unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let server = ServerProcess::spawn(
        Path::new(&wrapper),
        &data,
        &format!("{}:0", lab.inst_addr),
        &["--store", "redis", "--redis-url", &redis_url],
        &[],
    )
    .expect("zerodrop starts in its namespace");
    let client_delay = Arc::new(AtomicU64::new(0));
    let client_reset = Arc::new(tokio::sync::Notify::new());
    let (client_proxy, _stop_client_proxy) = delay_proxy(
        None,
        "127.0.0.1:0",
        server.addr.to_string(),
        client_delay.clone(),
        client_reset.clone(),
    );
    // Publisher and subscribers go through the clients' path; checks go direct.
    let url = format!("http://{client_proxy}");
    let direct = server.url.clone();
    let acked: Acked = Arc::default();
    // (name, link, packet loss %, delay ms, reset the clients' connections)
    let phases: [(&str, Link, Option<u32>, u64, bool); 7] = [
        (
            "redis path: 50 ms delay, 10 % loss",
            Link::Redis,
            Some(10),
            50,
            false,
        ),
        ("redis path: partitioned", Link::Redis, Some(100), 50, false),
        ("redis path: healed", Link::Redis, None, 0, false),
        (
            "client path: 50 ms delay, 10 % loss",
            Link::Clients,
            Some(10),
            50,
            false,
        ),
        (
            "client path: partitioned",
            Link::Clients,
            Some(100),
            50,
            false,
        ),
        (
            "client path: connections reset",
            Link::Clients,
            Some(100),
            50,
            true,
        ),
        ("client path: healed", Link::Clients, None, 0, false),
    ];
    let phase_len = Duration::from_secs(3);
    let publish_until = Instant::now() + phase_len * (phases.len() as u32 + 1);
    let pub_task = tokio::spawn(publisher(
        url.clone(),
        server.creds.api_key.clone(),
        acked.clone(),
        publish_until,
    ));
    let mut clients = Vec::new();
    let mut gots = Vec::new();
    for i in 0..3 {
        let got: Got = Arc::default();
        let token = server
            .creds
            .token(&format!("watcher-{i}"), &["part:*"], &[]);
        clients.push(subscriber(url.clone(), token, got.clone()).await);
        gots.push(got);
    }
    tokio::time::sleep(phase_len).await;
    for (name, link, loss, delay, reset) in phases {
        lab.impair(link, loss);
        if reset {
            client_reset.notify_waiters();
        }
        match link {
            Link::Redis => redis_delay.store(delay, Ordering::Relaxed),
            Link::Clients => client_delay.store(delay, Ordering::Relaxed),
        }
        eprintln!(
            "{name}: {} acknowledged so far",
            acked.lock().unwrap().len()
        );
        tokio::time::sleep(phase_len).await;
    }
    let (published, retries) = pub_task.await.unwrap();
    eprintln!("publisher: {published} acknowledged, {retries} retried attempts");
    assert!(
        published > 20,
        "the publisher got through between the faults"
    );
    // Recovery, nothing restarted: healthy, and every client catches up (or ended typed).
    let http = reqwest::Client::new();
    let health: Value = http
        .get(format!("{direct}/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["status"], "ok", "{health}");
    // The log: contiguous, each acknowledged event at its seq with its data, none twice.
    let page: Value = http
        .get(format!(
            "{url}/v1/streams/{STREAM}/events?after=0&limit=1000"
        ))
        .bearer_auth(&server.creds.api_key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let events = page["events"].as_array().expect("events");
    let head = page["headSeq"].as_u64().unwrap();
    assert_eq!(events.len() as u64, head, "one page holds the whole log");
    let mut seen_n = BTreeMap::new();
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e["seq"].as_u64(), Some(i as u64 + 1), "no hole");
        let n = e["data"]["n"].as_u64().unwrap();
        assert!(
            seen_n.insert(n, i as u64 + 1).is_none(),
            "n={n} stored twice"
        );
    }
    let acked = acked.lock().unwrap().clone();
    for (n, seq) in &acked {
        assert_eq!(seen_n.get(n), Some(seq), "acknowledged n={n} at seq {seq}");
    }
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let done = gots.iter().all(|g| {
            let g = g.lock().unwrap();
            g.1.is_some() || g.0.last() == Some(&head)
        });
        if done {
            break;
        }
        assert!(
            Instant::now() < until,
            "clients did not catch up: {:?}",
            gots.iter()
                .map(|g| g.lock().unwrap().0.len())
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (i, g) in gots.iter().enumerate() {
        let (seqs, end) = &*g.lock().unwrap();
        let expect: Vec<u64> = (1..=seqs.len() as u64).collect();
        assert!(!seqs.is_empty(), "client {i} received events");
        assert_eq!(seqs, &expect, "client {i}: in order, no gap, no duplicate");
        match end {
            None => assert_eq!(seqs.len() as u64, head, "client {i} has every event"),
            Some(e) => eprintln!("client {i} ended typed after {}: {e}", seqs.len()),
        }
    }
    // The reset phase made every client reconnect and resume its session.
    let metrics = http
        .get(format!("{direct}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let resumes: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("zerodrop_resumes_total{transport=\"ws\"} "))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(
        resumes >= 3,
        "every client resumed after the reset: {resumes}"
    );
    eprintln!(
        "log head {head}, {} acknowledged, 3 clients checked, {resumes} WebSocket resumes",
        acked.len()
    );
    for c in clients {
        c.close().await;
    }
}
