//! New subscribed WebSocket connections per second: `limit`, the protocol's floor, zerodrop.
//!
//! `cargo bench -p zerodrop --bench connect_floor` runs yardstick's `idle` test (the connect
//! phase of `shared/peers/run-all.sh`) against three servers in turn, each on a fresh process
//! pinned to CPU 0, yardstick pinned to CPU 1, `ROUNDS` rounds (env, default 5) of `CONNS`
//! connections (default 10,000) with the order rotating each round:
//!
//! - `limit`, yardstick's minimal broadcaster: a 101 and one frame per connection;
//! - **the floor**: a server that speaks only zerodrop's connect exchange (the 101, a
//!   `welcome` of zerodrop's size, the client's `subscribe` read, a `subscribed`) and does
//!   nothing else: no token check, no session, no store. It is this bench's own binary,
//!   started again with `CONNECT_FLOOR_LISTEN` set;
//! - zerodrop, the release binary on a fresh data dir.
//!
//! Per target it prints connections/s (yardstick's `conns_per_s`), and the CPU that the
//! server and yardstick each spent per connection while connecting (from `/proc`, between
//! yardstick's "opening" and "open in" lines; 10 ms ticks). The floor's rate is the most any
//! server speaking this exchange can show in this harness on this machine: what bounds it
//! is yardstick's own CPU per connection, which an extra round trip and larger frames make
//! dearer than `limit`'s. The ratios are per round, then the median.
//!
//! Yardstick is looked for in `YARDSTICK_DIR` (default `../shared/peers/yardstick/target/
//! release` beside the workspace); without it the bench says how to build it and stops.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use zerodrop_local::process::pin_before_exec;
use zerodrop_local::{ServeChild, ServeCommand};
use zerodrop_testkit::free_port;
use zerodrop_testkit::measure::{cpu_secs, env_u64, median};
use zerodrop_testkit::server::Creds;

const FLOOR_ENV: &str = "CONNECT_FLOOR_LISTEN";

fn main() {
    if let Ok(addr) = std::env::var(FLOOR_ENV) {
        floor::serve(&addr);
        return;
    }
    let dir = std::env::var_os("YARDSTICK_DIR").map_or_else(
        || {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../../shared/peers/yardstick/target/release")
        },
        PathBuf::from,
    );
    let (yardstick, limit) = (dir.join("yardstick"), dir.join("limit-server"));
    if !yardstick.is_file() || !limit.is_file() {
        println!(
            "yardstick not found in {} (set YARDSTICK_DIR, or build it: cd shared/peers/yardstick \
             && cargo build --release); skipping",
            dir.display()
        );
        return;
    }
    let rounds = env_u64("ROUNDS", 5) as usize;
    let conns = env_u64("CONNS", 10_000);
    let targets = [Target::Limit, Target::Floor, Target::Zerodrop];
    let mut runs: Vec<[Option<Run>; 3]> = Vec::new();
    println!(
        "yardstick idle --conns {conns} --threads 1; servers on CPU 0, yardstick on CPU 1; \
         {rounds} rounds, order rotating"
    );
    println!(
        "{:<6} {:<9} {:>11} {:>16} {:>19}",
        "round", "target", "conns/s", "server µs/conn", "yardstick µs/conn"
    );
    for r in 0..rounds {
        let mut row: [Option<Run>; 3] = [None, None, None];
        for i in 0..targets.len() {
            let t = targets[(i + r) % targets.len()];
            match measure(t, &yardstick, &limit, conns) {
                Ok(run) => {
                    println!(
                        "{:<6} {:<9} {:>11.0} {:>16.0} {:>19.0}",
                        r + 1,
                        t.name(),
                        run.rate,
                        run.server_us,
                        run.yardstick_us
                    );
                    row[t as usize] = Some(run);
                }
                Err(e) => println!("{:<6} {:<9} failed: {e}", r + 1, t.name()),
            }
        }
        runs.push(row);
    }
    println!("medians over the rounds:");
    for t in targets {
        let of = |f: fn(&Run) -> f64| {
            median(
                runs.iter()
                    .filter_map(|row| row[t as usize].as_ref().map(f))
                    .collect(),
            )
        };
        println!(
            "{:<9} {:>11.0} conns/s, server {:.0} µs/conn, yardstick {:.0} µs/conn",
            t.name(),
            of(|r| r.rate),
            of(|r| r.server_us),
            of(|r| r.yardstick_us)
        );
    }
    let ratio = |a: Target, b: Target| {
        median(
            runs.iter()
                .filter_map(|row| {
                    let (a, b) = (row[a as usize].as_ref()?, row[b as usize].as_ref()?);
                    Some(a.rate / b.rate.max(1.0))
                })
                .collect(),
        )
    };
    println!(
        "rate ratios (per round, median): floor / limit {:.2}x, zerodrop / limit {:.2}x, \
         zerodrop / floor {:.2}x",
        ratio(Target::Floor, Target::Limit),
        ratio(Target::Zerodrop, Target::Limit),
        ratio(Target::Zerodrop, Target::Floor)
    );
}

#[derive(Clone, Copy)]
enum Target {
    Limit = 0,
    Floor = 1,
    Zerodrop = 2,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Limit => "limit",
            Target::Floor => "floor",
            Target::Zerodrop => "zerodrop",
        }
    }
}

struct Run {
    rate: f64,
    server_us: f64,
    yardstick_us: f64,
}

/// A child process, killed and reaped when dropped.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `cmd` started on CPU `cpu` alone (set before it runs, so a runtime sizes itself to it).
fn pinned(mut cmd: Command, cpu: usize) -> std::io::Result<Child> {
    pin_before_exec(&mut cmd, cpu);
    cmd.spawn()
}

fn wait_port(port: u16, within: Duration) -> bool {
    let end = Instant::now() + within;
    while Instant::now() < end {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// The server under test, stopped and reaped when dropped.
enum Server {
    Other(Reaped),
    Zerodrop(ServeChild),
}

impl Server {
    fn pid(&self) -> Option<u32> {
        match self {
            Server::Other(c) => Some(c.0.id()),
            Server::Zerodrop(c) => c.pid(),
        }
    }
}

/// `limit` or the floor on a free port, pinned to CPU 0, once it listens.
fn start_other(t: Target, limit: &Path) -> Result<(Server, SocketAddr), String> {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut cmd = match t {
        Target::Limit => {
            let mut c = Command::new(limit);
            c.args(["--listen", &listen]);
            c
        }
        _ => {
            let mut c = Command::new(std::env::current_exe().map_err(|e| e.to_string())?);
            c.env(FLOOR_ENV, &listen);
            c
        }
    };
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    let server = Server::Other(Reaped(pinned(cmd, 0).map_err(|e| format!("start: {e}"))?));
    if !wait_port(port, Duration::from_secs(20)) {
        return Err("the server did not listen within 20 s".into());
    }
    Ok((server, SocketAddr::from(([127, 0, 0, 1], port))))
}

fn measure(t: Target, yardstick: &Path, limit: &Path, conns: u64) -> Result<Run, String> {
    let data = tempfile::tempdir().map_err(|e| e.to_string())?;
    let (server, addr, creds) = match t {
        Target::Zerodrop => {
            let child = ServeCommand::new(Path::new(env!("CARGO_BIN_EXE_zerodrop")), data.path())
                .without_inherited_secrets()
                .env("ZERODROP_MAX_CONNECTIONS", (conns + 1_000).to_string())
                .keep_last_lines(100)
                .on_cpu(0)
                .spawn()
                .map_err(|e| format!("start: {e:#}"))?;
            let creds = Creds::from_data_dir(data.path()).map_err(|e| e.to_string())?;
            let addr = child.addr();
            (Server::Zerodrop(child), addr, Some(creds))
        }
        other => {
            let (server, addr) = start_other(other, limit)?;
            (server, addr, None)
        }
    };
    let mut args: Vec<String> = vec![
        "idle".into(),
        "--target".into(),
        match t {
            Target::Limit => "limit",
            _ => "zerodrop",
        }
        .into(),
        "--url".into(),
        format!("http://{addr}"),
    ];
    match t {
        Target::Zerodrop => {
            let creds = creds.ok_or("no credentials")?;
            args.extend(["--api-key".into(), creds.api_key]);
            args.extend(["--jwt-secret".into(), creds.jwt_secret]);
        }
        // The floor checks no credential; yardstick wants some to mint its token.
        Target::Floor => {
            args.extend(["--api-key".into(), "floor-api-key-0000".into()]);
            args.extend([
                "--jwt-secret".into(),
                "floor-jwt-secret-0000000000000000".into(),
            ]);
        }
        Target::Limit => {}
    }
    let sp = server.pid().ok_or("the server is gone")?;
    args.extend(
        [
            "--conns",
            &conns.to_string(),
            "--settle",
            "0.5",
            "--hold",
            "0.5",
            "--threads",
            "1",
            "--server-pid",
            &sp.to_string(),
            "--json",
        ]
        .map(String::from),
    );
    let mut ys = Command::new(yardstick);
    ys.args(&args).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut ys = Reaped(pinned(ys, 1).map_err(|e| format!("yardstick: {e}"))?);
    let yp = ys.0.id();
    // CPU of both processes when the connecting starts and when it ends, read as yardstick
    // says so on stderr.
    let stderr = ys.0.stderr.take().ok_or("no stderr")?;
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut start = None;
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("opening") {
                start = Some((cpu_secs(yp), cpu_secs(sp)));
            } else if line.contains(" open in ") {
                let end = (cpu_secs(yp), cpu_secs(sp));
                let _ = tx.send(start.map(|s| (end.0 - s.0, end.1 - s.1)));
            }
        }
    });
    let out = ys.0.stdout.take().ok_or("no stdout")?;
    let report: serde_json::Value =
        serde_json::from_reader(out).map_err(|e| format!("yardstick's report: {e}"))?;
    let _ = ys.0.wait();
    let _ = reader.join();
    let cpu = rx
        .try_recv()
        .ok()
        .flatten()
        .ok_or("no connect phase seen")?;
    let open = report["open"].as_f64().unwrap_or(0.0).max(1.0);
    if report["connect_errors"].as_u64() != Some(0) {
        return Err(format!("connect errors: {}", report["connect_errors"]));
    }
    drop(server);
    Ok(Run {
        rate: report["conns_per_s"].as_f64().unwrap_or(0.0),
        server_us: cpu.1 * 1e6 / open,
        yardstick_us: cpu.0 * 1e6 / open,
    })
}

/// The floor: zerodrop's connect exchange and nothing else.
mod floor {
    use std::convert::Infallible;

    use axum::body::Body;
    use futures_util::{SinkExt, StreamExt};
    use hyper::body::Incoming;
    use hyper::header::{
        CONNECTION, HeaderValue, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_PROTOCOL,
        UPGRADE,
    };
    use hyper::{Request, Response, StatusCode};
    use hyper_util::rt::TokioIo;
    use tokio_tungstenite::WebSocketStream;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
    use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

    /// A `welcome` as zerodrop sends it (same fields and lengths).
    const WELCOME: &str = r#"{"type":"welcome","sessionId":"s_01a24d6ffa3651vaRurAccxqpGdHL-eN_w","resumeToken":"v1.k1.eyJzaWQiOiJzXzAxYTI0ZDZmZmEzNjUxdmFSdXJBY2N4cXBHZEhMLWVOX3ciLCJzdWIiOiJ1MSIsImlhdCI6MTc5NjU5NTUxMywiZXhwIjoxNzk2NTk2NDEzLCJqdGkiOiJhMjkxZTYyY2JkNWY0MWI3IiwiYWV4cCI6MTc5NjU5OTExM30.pPum235jBIHrCo9Xth2G_yJfy3OYz4gr5GplkNk2lSE","reconnectWindowSec":900,"instance":"zd-d62b27","protocol":"zerodrop.v1"}"#;
    const SUBSCRIBED: &str = r#"{"type":"subscribed","stream":"s0","epoch":"e_7b1d2c3a4f5e6d7c","fromSeq":1,"headSeq":0}"#;

    pub fn serve(addr: &str) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let addr: std::net::SocketAddr = addr.parse().expect("listen address");
            let sock = tokio::net::TcpSocket::new_v4().expect("socket");
            let _ = sock.set_reuseaddr(true);
            sock.bind(addr).expect("bind");
            let listener = sock.listen(4096).expect("listen");
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), hyper::service::service_fn(upgrade))
                        .with_upgrades()
                        .await;
                });
            }
        });
    }

    async fn upgrade(mut req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
        let key = req.headers().get(SEC_WEBSOCKET_KEY).cloned();
        let offered = req.headers().contains_key(SEC_WEBSOCKET_PROTOCOL);
        let on_upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let Ok(upgraded) = on_upgrade.await else {
                return;
            };
            let config = WebSocketConfig::default().read_buffer_size(1024);
            let mut ws = WebSocketStream::from_raw_socket(
                TokioIo::new(upgraded),
                Role::Server,
                Some(config),
            )
            .await;
            if ws.send(Message::Text(WELCOME.into())).await.is_err() {
                return;
            }
            let mut subscribed = false;
            while let Some(Ok(m)) = ws.next().await {
                match m {
                    Message::Text(_) if !subscribed => {
                        subscribed = true;
                        if ws.send(Message::Text(SUBSCRIBED.into())).await.is_err() {
                            return;
                        }
                    }
                    Message::Close(_) => break,
                    _ => {}
                }
            }
        });
        let mut res = Response::new(Body::empty());
        *res.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let h = res.headers_mut();
        h.insert(UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(CONNECTION, HeaderValue::from_static("upgrade"));
        if let Some(accept) = key
            .map(|k| derive_accept_key(k.as_bytes()))
            .and_then(|a| HeaderValue::from_str(&a).ok())
        {
            h.insert(SEC_WEBSOCKET_ACCEPT, accept);
        }
        if offered {
            h.insert(
                SEC_WEBSOCKET_PROTOCOL,
                HeaderValue::from_static("zerodrop.v1"),
            );
        }
        Ok(res)
    }
}
