//! Compression over loopback: WebSocket `permessage-deflate` (negotiated when offered, never
//! when off or not offered, exact events across a resume, the frame limit on the inflated
//! size) and SSE gzip (a flush per event, exact resume with `Last-Event-ID`, one stream and
//! many).

use std::io::Write;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use zerodrop_server::deflate::{ANSWER, DeflateIo};
use zerodrop_testkit::server::TestServer;

const WAIT: Duration = Duration::from_secs(10);
/// What browsers offer.
const OFFER: &str = "permessage-deflate; client_max_window_bits";

/// A state update: 20 fields, a few of which change per event.
fn state(i: u64) -> Value {
    json!({
        "id": "device-0042", "kind": "thermostat", "site": "north-wing", "floor": 3,
        "room": "conference-b", "firmware": "4.2.17", "online": true, "mode": "heat",
        "unit": "celsius", "target": 21.5, "humidity": 40 + i % 7, "temperature": 20.0 + (i % 10) as f64 / 10.0,
        "battery": 97, "signal": -61, "fan": "auto", "schedule": "weekday-office",
        "updatedBy": "controller-7", "alarm": false, "seq": i, "note": "steady"
    })
}

struct Ws {
    ws: WebSocketStream<DeflateIo<TcpStream>>,
    /// The server's `Sec-WebSocket-Extensions` answer.
    ext: Option<String>,
}

impl Ws {
    async fn connect(s: &TestServer, query: &str, offer: Option<&str>) -> Ws {
        let tcp = TcpStream::connect(s.addr).await.unwrap();
        let mut req = format!("{}/v1/ws?{query}", s.ws_url())
            .into_client_request()
            .unwrap();
        if let Some(o) = offer {
            req.headers_mut()
                .insert("sec-websocket-extensions", o.parse().unwrap());
        }
        let (ws, res) = tokio_tungstenite::client_async(req, DeflateIo::client(tcp, 1 << 24))
            .await
            .unwrap();
        let ext = res
            .headers()
            .get("sec-websocket-extensions")
            .map(|v| v.to_str().unwrap().to_string());
        Ws { ws, ext }
    }

    fn compressed_received(&self) -> u64 {
        self.ws.get_ref().inflated()
    }

    async fn send(&mut self, v: Value) {
        self.ws
            .send(Message::Text(v.to_string().into()))
            .await
            .unwrap();
    }

    /// The next frame that is not a server `ping` (answered) or `token`; `None` on a close.
    async fn recv(&mut self) -> Result<Value, Option<u16>> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let m = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .expect("a frame in time");
            match m {
                Some(Ok(Message::Text(t))) => {
                    let f: Value = serde_json::from_str(t.as_str()).unwrap();
                    match f["type"].as_str() {
                        Some("ping") => self.send(json!({"type":"pong","t":f["t"]})).await,
                        Some("token") => {}
                        _ => return Ok(f),
                    }
                }
                Some(Ok(Message::Close(c))) => {
                    let _ = self.ws.flush().await;
                    return Err(c.map(|c| u16::from(c.code)));
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return Err(None),
            }
        }
    }

    async fn expect(&mut self, ty: &str) -> Value {
        let f = self.recv().await.expect("a frame");
        assert_eq!(f["type"], ty, "{f}");
        f
    }
}

/// Subscribes to `stream` from `after`, publishes `from..=to`, and reads exactly those.
async fn publish_and_read(s: &TestServer, c: &mut Ws, stream: &str, from: u64, to: u64) {
    let api = s.api();
    for i in from..=to {
        api.publish(stream, state(i)).await;
    }
    for i in from..=to {
        let f = c.expect("event").await;
        assert_eq!(f["seq"], i, "{f}");
        assert_eq!(f["data"], state(i));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deflate_is_negotiated_and_events_arrive_exactly_across_a_resume() {
    let s = TestServer::start().await;
    let tok = s.token("u1", &["dev:*"]);
    let mut c = Ws::connect(&s, &format!("token={tok}"), Some(OFFER)).await;
    assert_eq!(c.ext.as_deref(), Some(ANSWER));
    assert!(c.ws.get_ref().is_on());
    let welcome = c.expect("welcome").await;
    let resume = welcome["resumeToken"].as_str().unwrap().to_string();
    c.send(json!({"type":"subscribe","stream":"dev:1","after":0}))
        .await;
    c.expect("subscribed").await;
    publish_and_read(&s, &mut c, "dev:1", 1, 20).await;
    // Every event frame came compressed.
    assert!(c.compressed_received() >= 20, "{}", c.compressed_received());
    c.ws.close(None).await.unwrap();
    drop(c);

    let api = s.api();
    for i in 21..=30 {
        api.publish("dev:1", state(i)).await;
    }
    let mut c = Ws::connect(&s, "", Some(OFFER)).await;
    assert_eq!(c.ext.as_deref(), Some(ANSWER));
    c.send(json!({"type":"resume","resumeToken":resume,"lastAck":{"dev:1":20}}))
        .await;
    c.expect("welcome").await;
    let mut got = Vec::new();
    while got.len() < 10 {
        let f = c.recv().await.expect("a frame");
        match f["type"].as_str().unwrap() {
            "event" => {
                assert_eq!(f["data"], state(f["seq"].as_u64().unwrap()));
                got.push(f["seq"].as_u64().unwrap());
            }
            "subscribed" => assert_eq!(f["fromSeq"], 21, "{f}"),
            other => panic!("unexpected {other}: {f}"),
        }
    }
    assert_eq!(got, (21..=30).collect::<Vec<_>>());
    publish_and_read(&s, &mut c, "dev:1", 31, 35).await;
    assert!(c.compressed_received() >= 15);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_offer_or_with_the_setting_off_frames_are_plain() {
    // No offer: no answer, plain frames.
    let s = TestServer::start().await;
    let tok = s.token("u1", &["dev:*"]);
    let mut c = Ws::connect(&s, &format!("token={tok}"), None).await;
    assert_eq!(c.ext, None);
    c.expect("welcome").await;
    c.send(json!({"type":"subscribe","stream":"dev:1","after":0}))
        .await;
    c.expect("subscribed").await;
    publish_and_read(&s, &mut c, "dev:1", 1, 5).await;
    assert!(!c.ws.get_ref().is_on());
    assert_eq!(c.compressed_received(), 0);

    // An offer the server cannot honour (a smaller server window) is declined.
    let mut c = Ws::connect(
        &s,
        &format!("token={tok}"),
        Some("permessage-deflate; server_max_window_bits=10"),
    )
    .await;
    assert_eq!(c.ext, None);
    c.expect("welcome").await;

    // The setting off: never negotiated, whatever is offered.
    let off = TestServer::with(|c| c.ws_deflate = false).await;
    let tok = off.token("u1", &["dev:*"]);
    let mut c = Ws::connect(&off, &format!("token={tok}"), Some(OFFER)).await;
    assert_eq!(c.ext, None);
    c.expect("welcome").await;
    c.send(json!({"type":"subscribe","stream":"dev:1","after":0}))
        .await;
    c.expect("subscribed").await;
    publish_and_read(&off, &mut c, "dev:1", 1, 5).await;
    assert_eq!(c.compressed_received(), 0);
}

/// `payload` as one compressed client frame (RSV1, deflated, without the sync tail).
fn compressed_frame(payload: &[u8]) -> Message {
    let mut c = flate2::Compress::new(flate2::Compression::default(), false);
    let mut out = Vec::with_capacity(payload.len() / 2 + 1024);
    c.compress_vec(payload, &mut out, flate2::FlushCompress::Sync)
        .unwrap();
    assert_eq!(
        c.total_in() as usize,
        payload.len(),
        "one call compresses it all"
    );
    assert!(out.ends_with(&[0, 0, 0xff, 0xff]));
    out.truncate(out.len() - 4);
    let mut f = Frame::message(out, OpCode::Data(Data::Text), true);
    f.header_mut().rsv1 = true;
    Message::Frame(f)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_client_frames_are_read_and_a_bomb_is_payload_too_large() {
    let s = TestServer::start().await;
    let tok = s.token("u1", &["dev:*"]);
    let mut c = Ws::connect(&s, &format!("token={tok}"), Some(OFFER)).await;
    assert_eq!(c.ext.as_deref(), Some(ANSWER));
    c.expect("welcome").await;
    // A compressed subscribe frame is understood.
    let sub = json!({"type":"subscribe","stream":"dev:1","after":0}).to_string();
    c.ws.send(compressed_frame(sub.as_bytes())).await.unwrap();
    c.expect("subscribed").await;
    publish_and_read(&s, &mut c, "dev:1", 1, 3).await;

    // 1 MiB that compresses to about a kilobyte: over the 128 KiB frame limit once inflated.
    let mut bomb = br#"{"type":"ping","t":""#.to_vec();
    bomb.resize(1 << 20, b' ');
    bomb.extend_from_slice(br#""}"#);
    let frame = compressed_frame(&bomb);
    if let Message::Frame(f) = &frame {
        assert!(f.payload().len() < 8 * 1024, "{}", f.payload().len());
    }
    c.ws.send(frame).await.unwrap();
    let e = c.expect("error").await;
    assert_eq!(e["code"], "PAYLOAD_TOO_LARGE", "{e}");
    assert_eq!(c.recv().await.unwrap_err(), Some(1009));

    // The store is intact, and the next connection works.
    let read = s.api().read("dev:1", 0, 10).await;
    assert_eq!(read.json["events"].as_array().unwrap().len(), 3);
    let mut c = Ws::connect(&s, &format!("token={tok}"), Some(OFFER)).await;
    c.expect("welcome").await;
}

/// An SSE response read with incremental gzip decoding.
struct GzSse {
    res: reqwest::Response,
    dec: flate2::write::GzDecoder<Vec<u8>>,
    /// Decoded text not yet split into blocks.
    text: String,
}

impl GzSse {
    async fn open(url: &str, last_event_id: Option<&str>) -> GzSse {
        let mut r = reqwest::Client::new()
            .get(url)
            .header("accept", "text/event-stream")
            .header("accept-encoding", "gzip, deflate, br");
        if let Some(id) = last_event_id {
            r = r.header("last-event-id", id);
        }
        let res = r.send().await.unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(
            res.headers().get("content-encoding").unwrap(),
            "gzip",
            "{:?}",
            res.headers()
        );
        GzSse {
            res,
            dec: flate2::write::GzDecoder::new(Vec::new()),
            text: String::new(),
        }
    }

    /// The next event block (`id`, `data`), skipping comments (pings), within [`WAIT`].
    async fn next(&mut self) -> (Option<String>, Value) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            while let Some(end) = self.text.find("\n\n") {
                let block: String = self.text.drain(..end + 2).collect();
                let mut id = None;
                let mut data = None;
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id: ") {
                        id = Some(v.to_string());
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data = Some(serde_json::from_str(v).unwrap());
                    }
                }
                if let Some(data) = data {
                    return (id, data);
                }
            }
            let chunk = tokio::time::timeout_at(deadline, self.res.chunk())
                .await
                .expect("an SSE chunk in time")
                .unwrap()
                .expect("the response goes on");
            self.dec.write_all(&chunk).unwrap();
            self.dec.flush().unwrap();
            let plain = std::mem::take(self.dec.get_mut());
            self.text.push_str(std::str::from_utf8(&plain).unwrap());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_gzip_flushes_every_event_and_resumes_exactly() {
    let s = TestServer::start().await;
    let api = s.api();
    let tok = s.token("u1", &["dev:*"]);
    let url = format!("{}/v1/streams/dev:1/sse?token={tok}&after=0", s.url);
    let mut c = GzSse::open(&url, None).await;
    let mut last = String::new();
    // Each event is decoded before the next one is published: a flush per event.
    for i in 1..=10 {
        api.publish("dev:1", state(i)).await;
        let (id, data) = c.next().await;
        assert_eq!(data["seq"], i);
        assert_eq!(data["data"], state(i));
        last = id.unwrap();
        assert!(last.ends_with(&format!(":{i}")), "{last}");
    }
    drop(c);
    for i in 11..=15 {
        api.publish("dev:1", state(i)).await;
    }
    let url = format!("{}/v1/streams/dev:1/sse?token={tok}", s.url);
    let mut c = GzSse::open(&url, Some(&last)).await;
    for i in 11..=15 {
        let (_, data) = c.next().await;
        assert_eq!(data["seq"], i);
    }
    api.publish("dev:1", state(16)).await;
    assert_eq!(c.next().await.1["seq"], 16);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_many_gzip_flushes_every_event_and_resumes_exactly() {
    let s = TestServer::start().await;
    let api = s.api();
    let tok = s.token("u1", &["dev:*"]);
    let url = format!("{}/v1/sse?streams=dev:a,dev:b&token={tok}", s.url);
    let mut c = GzSse::open(&url, None).await;
    let mut cursor = String::new();
    for i in 1..=6u64 {
        let stream = if i % 2 == 1 { "dev:a" } else { "dev:b" };
        api.publish(stream, state(i)).await;
        let (id, data) = c.next().await;
        assert_eq!(data["stream"], stream);
        assert_eq!(data["seq"], i.div_ceil(2));
        cursor = id.unwrap();
    }
    drop(c);
    api.publish("dev:b", state(7)).await;
    api.publish("dev:a", state(8)).await;
    let mut c = GzSse::open(&url, Some(&cursor)).await;
    let mut got = [c.next().await.1, c.next().await.1];
    got.sort_by_key(|d| d["stream"].as_str().unwrap().to_string());
    assert_eq!(
        (&got[0]["stream"], &got[0]["seq"]),
        (&json!("dev:a"), &json!(4))
    );
    assert_eq!(
        (&got[1]["stream"], &got[1]["seq"]),
        (&json!("dev:b"), &json!(4))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_is_plain_without_accept_encoding_or_with_the_setting_off() {
    for (off, accept) in [(false, None), (true, Some("gzip"))] {
        let s = TestServer::with(|c| c.sse_gzip = !off).await;
        let tok = s.token("u1", &["dev:*"]);
        s.api().publish("dev:1", state(1)).await;
        let mut r = reqwest::Client::new()
            .get(format!(
                "{}/v1/streams/dev:1/sse?token={tok}&after=0",
                s.url
            ))
            .header("accept", "text/event-stream");
        if let Some(a) = accept {
            r = r.header("accept-encoding", a);
        }
        let mut res = r.send().await.unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(res.headers().get("content-encoding"), None);
        let mut text = String::new();
        while !text.contains("\"seq\":1") {
            let chunk = tokio::time::timeout(WAIT, res.chunk())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            text.push_str(std::str::from_utf8(&chunk).unwrap());
        }
        assert!(text.contains("\"seq\":1"), "{text}");
    }
}
