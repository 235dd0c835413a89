//! N/N-1: recorded `zerodrop.v1` client sessions replayed against the current server.
//!
//! Each file in `tests/fixtures/v1/` is one session of a v1 client, one step per line:
//!
//! - `{"publish": {"stream", "data"}}`: a backend publishes over HTTP (api key);
//! - `{"connect": {"streams", "publish"?}}`: a WebSocket offering only `zerodrop.v1`, with a
//!   connect token; `{"connect": "resume"}`: with `?resume=` and the newest resume token;
//!   `{"connect": "bare"}`: no credential (a `resume` frame comes first);
//! - `{"send": frame}`: a client frame (`"$resumeToken"` is the newest resume token);
//! - `{"recv": frame}`: the next server frame, exactly, but for the fields that differ from
//!   run to run (ids, tokens, times, epochs, human-readable messages), compared as `"*"`;
//! - `{"close": true}`: the client closes its socket.
//!
//! The frames were recorded from a v1 client against the server as it was when v1 was the
//! current version. `ZERODROP_RECORD_FIXTURES=1 cargo test -p zerodrop-server --test compat`
//! records them again from the server under test (only for a deliberate, documented change).

use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use zerodrop_testkit::server::TestServer;
use zerodrop_testkit::ws::WsClient;

/// Fields whose values differ between runs; their presence is still checked.
const VOLATILE: &[&str] = &[
    "sessionId",
    "resumeToken",
    "ts",
    "instance",
    "epoch",
    "message",
];

fn normalize(v: &Value) -> Value {
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

fn substitute(v: &Value, token: &str) -> Value {
    match v {
        Value::String(s) if s == "$resumeToken" => json!(token),
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, v)| (k.clone(), substitute(v, token)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(|v| substitute(v, token)).collect()),
        other => other.clone(),
    }
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// Replays one fixture; in record mode returns the steps with what the server sent.
async fn replay(path: &Path, record: bool) -> Vec<Value> {
    let text = std::fs::read_to_string(path).expect("fixture readable");
    let steps: Vec<Value> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("a fixture line is JSON"))
        .collect();
    let name = path.file_name().unwrap().to_string_lossy().to_string();
    let s = TestServer::start().await;
    let api = s.api();
    let mut ws: Option<WsClient> = None;
    let mut token = String::new();
    let mut out = Vec::with_capacity(steps.len());
    for (i, step) in steps.iter().enumerate() {
        let at = format!("{name} line {}", i + 1);
        if let Some(p) = step.get("publish") {
            api.publish(p["stream"].as_str().unwrap(), p["data"].clone())
                .await;
        } else if let Some(c) = step.get("connect") {
            let base = s.ws_url();
            let url = if c == "resume" {
                format!("{base}/v1/ws?resume={token}")
            } else if c == "bare" {
                format!("{base}/v1/ws")
            } else {
                let t = s
                    .creds
                    .token("u1", &strings(&c["streams"]), &strings(&c["publish"]));
                format!("{base}/v1/ws?token={t}")
            };
            let client = WsClient::connect_with(&url, &["zerodrop.v1"])
                .await
                .unwrap_or_else(|r| panic!("{at}: handshake refused: {r:?}"));
            assert_eq!(client.protocol.as_deref(), Some("zerodrop.v1"), "{at}");
            ws = Some(client);
        } else if let Some(f) = step.get("send") {
            let c = ws.as_mut().unwrap_or_else(|| panic!("{at}: no socket"));
            c.send(substitute(f, &token)).await;
        } else if let Some(want) = step.get("recv") {
            let c = ws.as_mut().unwrap_or_else(|| panic!("{at}: no socket"));
            let got = c.recv().await;
            if let Some(t) = got["resumeToken"].as_str() {
                token = t.to_string();
            }
            let got = normalize(&got);
            if record {
                out.push(json!({"recv": got}));
                continue;
            }
            assert_eq!(
                &got, want,
                "{at}: the server's frame differs from the v1 recording"
            );
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

fn fixtures() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v1");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("tests/fixtures/v1 exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    files.sort();
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorded_v1_sessions_run_unchanged_against_the_current_server() {
    let record = std::env::var_os("ZERODROP_RECORD_FIXTURES").is_some();
    let files = fixtures();
    assert!(files.len() >= 3, "the v1 fixtures are missing: {files:?}");
    let mut recvs = 0;
    for f in &files {
        let steps = replay(f, record).await;
        recvs += steps.iter().filter(|s| s.get("recv").is_some()).count();
        if record {
            let lines: Vec<String> = steps.iter().map(Value::to_string).collect();
            std::fs::write(f, lines.join("\n") + "\n").expect("fixture written");
        }
    }
    assert!(recvs >= 20, "the fixtures check too little: {recvs} frames");
}

/// The fixtures are v1 through and through: a batched ack on a v1 socket stays
/// `INVALID_REQUEST`, which one of them records.
#[test]
fn a_fixture_records_the_batched_ack_refused_on_v1() {
    let all: String = fixtures()
        .iter()
        .map(|f| std::fs::read_to_string(f).unwrap())
        .collect();
    assert!(all.contains(r#""acks":"#), "no fixture sends a batched ack");
}
