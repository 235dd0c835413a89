//! N/N-1: recorded client sessions replayed against the current server, for every
//! subprotocol it speaks: `tests/fixtures/v3/` (the current one), `tests/fixtures/v2/` (the
//! previous one) and `tests/fixtures/v1/`. The v3 and v2 sets each hold every frame type in
//! both directions (v3 its binary frames too); the browser SDK's tests
//! (`clients/js/test/fixtures.test.mjs`) hold it to the same recordings.
//!
//! Each file is one session of a client of that version, one step per line:
//!
//! - `{"config": {"pingIntervalSec", "reconnectWindowSec", "tokenGraceSec", "presence"}}`:
//!   first line only, the server's timers (and the stream patterns with presence) for this
//!   session (default: the defaults);
//! - `{"publish": {"stream", "data"}}`: a backend publishes over HTTP (api key);
//! - `{"connect": {"streams", "publish"?, "expInSec"?}}`: a WebSocket offering only the set's
//!   version, with a connect token (expiring in an hour, or in `expInSec`); `{"connect": "resume"}`: with `?resume=` and the newest resume token;
//!   `{"connect": "bare"}`: no credential (a `resume` frame comes first);
//! - `{"sendBinary": {"header", "base64"}}`: a `zerodrop.v3` binary client frame (the header's
//!   compact JSON, LF, the bytes); `{"sendBinary": {"raw"}}`: a binary frame of exactly those
//!   bytes (base64), for malformed ones;
//! - `{"recvBinary": {"header", "base64"}}`: the next server frame is that binary frame
//!   (header compared like `recv`);
//! - `{"send": frame}`: a client frame (`"$resumeToken"` is the newest resume token, `"$t"`
//!   the `t` of the last server `ping`, `"$connectToken"` a fresh connect token for the last
//!   `connect`'s grants);
//! - `{"recv": frame}`: the next server frame (a server `ping` is answered and a `token`
//!   skipped on the way), exactly, but for the fields that differ from run to run (ids,
//!   tokens, times, epochs, human-readable messages, a ping's `t`), compared as `"*"`;
//! - `{"await": frame}`: the next server frame of that frame's type, whatever comes before it
//!   (for the frames timers send: `ping`, `token`); compared like `recv`;
//! - `{"drain": true}`: an operator completes a drain (`POST /admin/drain/complete`);
//! - `{"closeStream": stream}`: a backend closes a stream (`POST /v1/streams/{stream}/close`);
//! - `{"close": true}`: the client closes its socket.
//!
//! The v1 frames were recorded from a v1 client against the server as it was when v1 was the
//! current version. `ZERODROP_RECORD_FIXTURES=v2 cargo test -p zerodrop-server --test compat`
//! records a set again from the server under test (`v1`, `v2`, or `1` for both; only for a
//! deliberate, documented change).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use zerodrop_testkit::server::TestServer;
use zerodrop_testkit::ws::{Next, WsClient};

/// Fields whose values differ between runs; their presence is still checked.
const VOLATILE: &[&str] = &[
    "sessionId",
    "resumeToken",
    "ts",
    "instance",
    "epoch",
    "message",
    "exp",
    "deadline",
    "presenceEpoch",
    "since",
];

fn normalize(v: &Value) -> Value {
    // A ping's `t` is the server's clock; a pong's is the client's own, kept.
    if v["type"] == "ping" && v["t"].is_number() {
        let mut v = v.clone();
        v["t"] = json!("*");
        return v;
    }
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, v)| {
                    let v = if VOLATILE.contains(&k.as_str()) && !v.is_null() {
                        json!("*")
                    } else {
                        normalize(v)
                    };
                    (k.clone(), v)
                })
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(normalize).collect()),
        other => other.clone(),
    }
}

/// What a `send` step's placeholders stand for.
struct Held<'a> {
    /// `"$resumeToken"`: the newest resume token.
    resume_token: &'a str,
    /// `"$t"`: the `t` of the last server `ping`.
    t: &'a Value,
    /// `"$connectToken"`: a fresh connect token (an hour) for the last `connect`'s grants.
    connect_token: &'a str,
}

fn substitute(v: &Value, held: &Held<'_>) -> Value {
    match v {
        Value::String(s) if s == "$resumeToken" => json!(held.resume_token),
        Value::String(s) if s == "$t" => held.t.clone(),
        Value::String(s) if s == "$connectToken" => json!(held.connect_token),
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, v)| (k.clone(), substitute(v, held)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(|v| substitute(v, held)).collect()),
        other => other.clone(),
    }
}

/// The next server frame of type `ty`, skipping any other (a ping is not answered).
async fn await_frame(c: &mut WsClient, ty: &Value, at: &str) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match c.next_within(left).await {
            Next::Frame(f) if &f["type"] == ty => return f,
            Next::Frame(_) => {}
            other => panic!("{at}: expected a {ty} frame, got {other:?}"),
        }
    }
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// Replays one fixture; in record mode returns the steps with what the server sent.
async fn replay(path: &Path, protocol: &str, record: bool) -> Vec<Value> {
    let text = std::fs::read_to_string(path).expect("fixture readable");
    let steps: Vec<Value> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("a fixture line is JSON"))
        .collect();
    let name = path.file_name().unwrap().to_string_lossy().to_string();
    let timers = steps.first().and_then(|s| s.get("config")).cloned();
    let s = TestServer::with(|c| {
        if let Some(t) = &timers {
            if let Some(n) = t["pingIntervalSec"].as_u64() {
                c.ping_interval_sec = n;
            }
            if let Some(n) = t["reconnectWindowSec"].as_u64() {
                c.reconnect_window_sec = n;
            }
            if let Some(n) = t["tokenGraceSec"].as_u64() {
                c.token_grace_sec = n;
            }
            if let Some(p) = t["presence"].as_array() {
                c.presence.patterns = p
                    .iter()
                    .filter_map(|p| p.as_str().map(String::from))
                    .collect();
            }
        }
    })
    .await;
    let api = s.api();
    let mut ws: Option<WsClient> = None;
    let mut token = String::new();
    let mut ping_t = Value::Null;
    let mut connect_token = String::new();
    let mut out = Vec::with_capacity(steps.len());
    for (i, step) in steps.iter().enumerate() {
        let at = format!("{name} line {}", i + 1);
        if step.get("config").is_some() {
            assert_eq!(i, 0, "{at}: config comes first");
        } else if let Some(p) = step.get("publish") {
            api.publish(p["stream"].as_str().unwrap(), p["data"].clone())
                .await;
        } else if let Some(c) = step.get("connect") {
            let base = s.ws_url();
            let url = if c == "resume" {
                format!("{base}/v1/ws?resume={token}")
            } else if c == "bare" {
                format!("{base}/v1/ws")
            } else {
                let (streams, publish) = (strings(&c["streams"]), strings(&c["publish"]));
                let now = zerodrop_core::now_ms() / 1000;
                // `expInSec`: a token that expires that soon (the server asks for `refresh`).
                let exp = c["expInSec"].as_u64().map_or(now + 3600, |n| now + n);
                let t = s.creds.token_until("u1", &streams, &publish, exp);
                connect_token = s.creds.token_until("u1", &streams, &publish, now + 3600);
                format!("{base}/v1/ws?token={t}")
            };
            let client = WsClient::connect_with(&url, &[protocol])
                .await
                .unwrap_or_else(|r| panic!("{at}: handshake refused: {r:?}"));
            assert_eq!(client.protocol.as_deref(), Some(protocol), "{at}");
            ws = Some(client);
        } else if let Some(f) = step.get("sendBinary") {
            let c = ws.as_mut().unwrap_or_else(|| panic!("{at}: no socket"));
            let frame = match f["raw"].as_str() {
                Some(raw) => zerodrop_core::payload::decode(raw)
                    .unwrap_or_else(|| panic!("{at}: raw is not base64")),
                None => zerodrop_testkit::ws::binary(&f["header"], f["base64"].as_str().unwrap()),
            };
            c.send_binary(frame).await;
        } else if let Some(f) = step.get("send") {
            let c = ws.as_mut().unwrap_or_else(|| panic!("{at}: no socket"));
            let held = Held {
                resume_token: &token,
                t: &ping_t,
                connect_token: &connect_token,
            };
            c.send(substitute(f, &held)).await;
        } else if let Some((kind, want)) = step
            .get("recv")
            .map(|w| ("recv", w))
            .or_else(|| step.get("await").map(|w| ("await", w)))
            .or_else(|| step.get("recvBinary").map(|w| ("recvBinary", w)))
        {
            let c = ws.as_mut().unwrap_or_else(|| panic!("{at}: no socket"));
            let got = if kind == "recvBinary" {
                let f = c.recv().await;
                assert!(
                    f["$binary"].is_object(),
                    "{at}: expected a binary frame, got {f}"
                );
                f["$binary"].clone()
            } else if kind == "recv" {
                c.recv().await
            } else {
                await_frame(c, &want["type"], &at).await
            };
            if let Some(t) = got["resumeToken"].as_str() {
                token = t.to_string();
            }
            if got["type"] == "ping" {
                ping_t = got["t"].clone();
            }
            let got = normalize(&got);
            if record {
                out.push(json!({ kind: got }));
                continue;
            }
            assert_eq!(
                &got, want,
                "{at}: the server's frame differs from the {protocol} recording"
            );
        } else if step.get("drain").is_some() {
            let r = api
                .post(
                    "/admin/drain/complete",
                    Some(&s.creds.admin_token),
                    json!({}),
                )
                .await;
            assert_eq!(r.status, 200, "{at}: {}", r.text);
        } else if let Some(stream) = step.get("closeStream").and_then(Value::as_str) {
            let key = s.creds.api_key.clone();
            let r = api
                .post(
                    &format!("/v1/streams/{stream}/close"),
                    Some(&key),
                    json!({}),
                )
                .await;
            assert_eq!(r.status, 200, "{at}: {}", r.text);
        } else if step.get("close").is_some() {
            if let Some(c) = ws.take() {
                c.close().await;
            }
        } else {
            panic!("{at}: unknown step {step}");
        }
        out.push(step.clone());
    }
    if let Some(c) = ws.take() {
        c.close().await;
    }
    out
}

fn fixtures(set: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(set);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("tests/fixtures/{set}: {e}"))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    files.sort();
    files
}

/// Replays (or records) one set; returns every frame of it, sent and received.
async fn run_set(set: &str, protocol: &str) -> Vec<Value> {
    let record = std::env::var("ZERODROP_RECORD_FIXTURES").is_ok_and(|v| v == "1" || v == set);
    let files = fixtures(set);
    assert!(
        files.len() >= 3,
        "the {set} fixtures are missing: {files:?}"
    );
    let mut frames = Vec::new();
    for f in &files {
        let steps = replay(f, protocol, record).await;
        for s in &steps {
            for kind in ["send", "recv", "await", "sendBinary", "recvBinary"] {
                if let Some(frame) = s.get(kind) {
                    let ty = frame.get("header").unwrap_or(frame)["type"].clone();
                    frames.push(json!({ "dir": kind, "type": ty }));
                }
            }
        }
        if record {
            let lines: Vec<String> = steps.iter().map(Value::to_string).collect();
            std::fs::write(f, lines.join("\n") + "\n").expect("fixture written");
        }
    }
    frames
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorded_v1_sessions_run_unchanged_against_the_current_server() {
    let frames = run_set("v1", "zerodrop.v1").await;
    let recvs = frames.iter().filter(|f| f["dir"] == "recv").count();
    assert!(recvs >= 20, "the fixtures check too little: {recvs} frames");
}

/// Every frame type of SPEC §4, in each direction it travels, is in the v2 recordings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorded_v2_sessions_hold_every_frame_type_and_run_against_the_current_server() {
    let frames = run_set("v2", "zerodrop.v2").await;
    assert_every_frame_type("v2", &frames);
}

/// The current version's recordings hold every frame type too, and its binary frames both
/// ways: byte payloads delivered and published, and malformed binary frames refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorded_v3_sessions_hold_every_frame_type_and_binary_frames_both_ways() {
    let frames = run_set("v3", "zerodrop.v3").await;
    assert_every_frame_type("v3", &frames);
    let binary = |dir: &str, ty: &str| frames.iter().any(|f| f["dir"] == dir && f["type"] == ty);
    assert!(
        binary("recvBinary", "event"),
        "no v3 fixture receives a binary event"
    );
    assert!(
        binary("sendBinary", "publish"),
        "no v3 fixture sends a binary publish"
    );
}

fn assert_every_frame_type(set: &str, frames: &[Value]) {
    let has = |dir: &str, ty: &str| {
        frames
            .iter()
            .any(|f| (f["dir"] == dir || (dir == "recv" && f["dir"] == "await")) && f["type"] == ty)
    };
    let client = [
        "subscribe",
        "unsubscribe",
        "ack",
        "publish",
        "ping",
        "pong",
        "resume",
        "refresh",
    ];
    let server = [
        "welcome",
        "subscribed",
        "unsubscribed",
        "event",
        "presence",
        "ping",
        "pong",
        "reconnect",
        "error",
        "published",
        "token",
        "refresh",
        "closed",
    ];
    for ty in client {
        assert!(has("send", ty), "no {set} fixture sends a {ty} frame");
    }
    for ty in server {
        assert!(has("recv", ty), "no {set} fixture receives a {ty} frame");
    }
}

/// The fixtures are v1 through and through: a batched ack on a v1 socket stays
/// `INVALID_REQUEST`, which one of them records.
#[test]
fn a_fixture_records_the_batched_ack_refused_on_v1() {
    let all: String = fixtures("v1")
        .iter()
        .map(|f| std::fs::read_to_string(f).unwrap())
        .collect();
    assert!(all.contains(r#""acks":"#), "no fixture sends a batched ack");
}
