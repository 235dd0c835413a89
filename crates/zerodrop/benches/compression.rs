//! Compression on a state-update workload (SPEC §11): WebSocket `permessage-deflate` on and
//! off, SSE gzip on and off.
//!
//! `cargo bench -p zerodrop --bench compression` runs the release binary (SQLite), a fresh
//! server per mode: `CLIENTS` (default 20) clients subscribe to one stream, then `EVENTS`
//! (default 500) events are published one by one, each a 20-field object of which three
//! fields change per event, and every client reads all of them. Prints, per delivered event,
//! the bytes the clients read from the network after they were subscribed (frames or the
//! response body: what the wire carries, headers of TCP and TLS aside) and the server's CPU
//! time from the first publish to the last event read, and the server's resident memory per
//! connection once all are connected.

use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use zerodrop_server::deflate::DeflateIo;
use zerodrop_testkit::measure::{cpu_secs, env_u64, rss_bytes};
use zerodrop_testkit::server::ServerProcess;

const STREAM: &str = "dev:1";
const WAIT: Duration = Duration::from_secs(60);

/// Event `i` of the workload: 20 fields, three of which change per event.
fn state(i: u64) -> Value {
    json!({
        "id": "device-0042", "kind": "thermostat", "site": "north-wing", "floor": 3,
        "room": "conference-b", "firmware": "4.2.17", "online": true, "mode": "heat",
        "unit": "celsius", "target": 21.5, "humidity": 40 + i % 7,
        "temperature": 20.0 + (i % 10) as f64 / 10.0, "battery": 97, "signal": -61,
        "fan": "auto", "schedule": "weekday-office", "updatedBy": "controller-7",
        "alarm": false, "version": i, "note": "steady"
    })
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    WsDeflate,
    WsPlain,
    SseGzip,
    SsePlain,
}

/// A TCP stream that counts the bytes read from it.
struct Counted {
    tcp: TcpStream,
    read: Arc<AtomicU64>,
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.tcp).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.read.fetch_add(n as u64, Ordering::Relaxed);
        r
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

/// A subscribed client: reads `events` events, returns the bytes it read after subscribing.
type Reader = tokio::task::JoinHandle<u64>;

async fn ws_client(p: &ServerProcess, token: &str, offer: bool, events: u64) -> Reader {
    let read = Arc::new(AtomicU64::new(0));
    let tcp = TcpStream::connect(p.addr).await.unwrap();
    let io = Counted {
        tcp,
        read: read.clone(),
    };
    let mut req = format!("{}/v1/ws?token={token}", p.ws_url())
        .into_client_request()
        .unwrap();
    if offer {
        req.headers_mut().insert(
            "sec-websocket-extensions",
            "permessage-deflate; client_max_window_bits"
                .parse()
                .unwrap(),
        );
    }
    let (mut ws, _) = tokio_tungstenite::client_async(req, DeflateIo::client(io, 1 << 24))
        .await
        .unwrap();
    assert_eq!(ws.get_ref().is_on(), offer);
    let sub = json!({"type":"subscribe","stream":STREAM});
    ws.send(Message::Text(sub.to_string().into()))
        .await
        .unwrap();
    loop {
        let Some(Ok(Message::Text(t))) = ws.next().await else {
            panic!("subscribed");
        };
        let f: Value = serde_json::from_str(t.as_str()).unwrap();
        if f["type"] == "subscribed" {
            break;
        }
    }
    let base = read.load(Ordering::Relaxed);
    tokio::spawn(async move {
        let mut got = 0;
        while got < events {
            let m = tokio::time::timeout(WAIT, ws.next())
                .await
                .expect("every event arrives");
            let Some(Ok(m)) = m else {
                panic!("the socket closed");
            };
            if let Message::Text(t) = m {
                let f: Value = serde_json::from_str(t.as_str()).unwrap();
                match f["type"].as_str() {
                    Some("event") => got += 1,
                    Some("ping") => {
                        let pong = json!({"type":"pong","t":f["t"]}).to_string();
                        ws.send(Message::Text(pong.into())).await.unwrap();
                    }
                    _ => {}
                }
            }
        }
        read.load(Ordering::Relaxed) - base
    })
}

async fn sse_client(p: &ServerProcess, token: &str, gzip: bool, events: u64) -> Reader {
    let url = format!("{}/v1/streams/{STREAM}/sse?token={token}", p.url);
    let mut r = reqwest::Client::new()
        .get(url)
        .header("accept", "text/event-stream");
    if gzip {
        r = r.header("accept-encoding", "gzip");
    }
    let mut res = r.send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers().get("content-encoding").is_some(), gzip);
    // The first chunk (`retry:`) is there at once: what follows is the events.
    let first = res.chunk().await.unwrap().expect("a first chunk");
    let mut dec = flate2::write::GzDecoder::new(Vec::new());
    let mut text = Vec::new();
    let mut feed = move |chunk: &[u8], dec: &mut flate2::write::GzDecoder<Vec<u8>>| {
        use std::io::Write;
        if gzip {
            dec.write_all(chunk).unwrap();
            dec.flush().unwrap();
            text.extend_from_slice(&std::mem::take(dec.get_mut()));
        } else {
            text.extend_from_slice(chunk);
        }
        let n = count(&text, b"event: event\n");
        // Keep the tail that may hold the start of a split marker.
        let keep = text.len().saturating_sub(32);
        text.drain(..keep);
        n
    };
    feed(&first, &mut dec);
    tokio::spawn(async move {
        let mut got = 0;
        let mut bytes = 0;
        while got < events {
            let chunk = tokio::time::timeout(WAIT, res.chunk())
                .await
                .expect("every event arrives")
                .unwrap()
                .expect("the response goes on");
            bytes += chunk.len() as u64;
            got += feed(&chunk, &mut dec);
        }
        bytes
    })
}

/// Occurrences of `pat` in `hay` that end before its last 32 bytes are kept for the next
/// call (the caller drops the rest).
fn count(hay: &[u8], pat: &[u8]) -> u64 {
    let keep = hay.len().saturating_sub(32);
    hay.windows(pat.len())
        .enumerate()
        .filter(|(i, w)| *w == pat && *i < keep)
        .count() as u64
}

struct Figures {
    bytes_per_event: f64,
    cpu_us_per_event: f64,
    rss_per_conn: f64,
    delivered: u64,
    secs: f64,
}

async fn run(bin: &Path, mode: Mode, clients: u64, events: u64) -> Figures {
    let dir = tempfile::tempdir().unwrap();
    let p = ServerProcess::spawn(bin, dir.path(), "127.0.0.1:0", &[], &[]).expect("starts");
    let api = p.api();
    api.publish(STREAM, json!({"warm": true})).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_before = rss_bytes(p.pid());
    let mut readers = Vec::new();
    for c in 0..clients {
        let token = p.creds.token(&format!("client-{c}"), &["dev:*"], &[]);
        readers.push(match mode {
            Mode::WsDeflate => ws_client(&p, &token, true, events).await,
            Mode::WsPlain => ws_client(&p, &token, false, events).await,
            Mode::SseGzip => sse_client(&p, &token, true, events).await,
            Mode::SsePlain => sse_client(&p, &token, false, events).await,
        });
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_after = rss_bytes(p.pid());
    let cpu_before = cpu_secs(p.pid());
    let started = Instant::now();
    for i in 0..events {
        api.publish(STREAM, state(i)).await;
    }
    let mut bytes = 0;
    for r in readers {
        bytes += r.await.unwrap();
    }
    let secs = started.elapsed().as_secs_f64();
    let cpu = cpu_secs(p.pid()) - cpu_before;
    let delivered = clients * events;
    Figures {
        bytes_per_event: bytes as f64 / delivered as f64,
        cpu_us_per_event: cpu * 1e6 / delivered as f64,
        rss_per_conn: rss_after.saturating_sub(rss_before) as f64 / clients as f64,
        delivered,
        secs,
    }
}

fn main() {
    let bin = Path::new(env!("CARGO_BIN_EXE_zerodrop"));
    let clients = env_u64("CLIENTS", 20);
    let events = env_u64("EVENTS", 500);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let sample = state(1).to_string();
    println!(
        "{clients} clients on one stream, {events} events of {} bytes of data each; per delivered event",
        sample.len()
    );
    println!(
        "{:<28} {:>14} {:>14} {:>14} {:>11} {:>8}",
        "mode", "wire B/event", "CPU µs/event", "RSS B/conn", "delivered", "secs"
    );
    for (label, mode) in [
        ("WebSocket, plain", Mode::WsPlain),
        ("WebSocket, permessage-deflate", Mode::WsDeflate),
        ("SSE, plain", Mode::SsePlain),
        ("SSE, gzip", Mode::SseGzip),
    ] {
        let f = rt.block_on(run(bin, mode, clients, events));
        println!(
            "{label:<28} {:>14.1} {:>14.2} {:>14.0} {:>11} {:>8.2}",
            f.bytes_per_event, f.cpu_us_per_event, f.rss_per_conn, f.delivered, f.secs
        );
    }
}
