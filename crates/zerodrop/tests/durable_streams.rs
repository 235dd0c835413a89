//! The Durable Streams room (`/ds/`) against the protocol's own conformance suite
//! (`@durable-streams/server-conformance-tests`, pinned in `tests/ds/package.json` and
//! installed there by `npm ci` on first use) on SQLite and on Redis, and the protocol's
//! TypeScript client (`@durable-streams/client`) reading a stream across a `kill -9` and a
//! restart, and across a drain to a second instance on Redis: every byte once, in order.
//!
//! `node` and `npm` are required (`.ci/setup` installs them); a missing one fails with how
//! to install it. Every wait is bounded; every process is killed on drop.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use zerodrop_testkit::cluster::Cluster;
use zerodrop_testkit::free_port;
use zerodrop_testkit::tools::{find_tool, run_within};

mod support;

use support::spawn_sqlite;

/// Tests the suite has in version 0.3.6; six of them are the opt-in webhook
/// subscriptions, which it skips unless asked.
const SUITE_TESTS: u64 = 338;
const SUITE_SKIPPED: u64 = 6;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ds")
}

/// Where `name` is on `PATH`; a missing tool fails with how to install it.
fn tool(name: &str) -> PathBuf {
    find_tool(name, "apt-get install -y nodejs npm (or run ./.ci/setup)")
}

/// `npm ci` in `tests/ds` once (the exact versions of `package-lock.json`), again whenever
/// the lock file is newer than the installed tree.
fn install() {
    static ONCE: std::sync::Mutex<bool> = std::sync::Mutex::new(false);
    let mut done = ONCE.lock().unwrap_or_else(|p| p.into_inner());
    if *done {
        return;
    }
    let d = dir();
    let modified = |p: PathBuf| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let stale = match (
        modified(d.join("node_modules/.package-lock.json")),
        modified(d.join("package-lock.json")),
    ) {
        (Some(installed), Some(lock)) => installed < lock,
        _ => true,
    };
    if stale {
        tool("npm");
        let mut cmd = Command::new("npm");
        cmd.current_dir(&d)
            .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"]);
        let o = run_within(cmd, "npm ci", Duration::from_secs(600));
        assert!(
            o.status.success(),
            "npm ci in {} failed:\n{}{}",
            d.display(),
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    *done = true;
}

/// The suite against `base` (`http://host:port/ds`): its JSON report.
fn conformance(base: &str) -> Value {
    install();
    let report = tempfile::NamedTempFile::new().expect("temp file");
    tool("node");
    let mut cmd = Command::new("node");
    cmd.current_dir(dir())
        .arg("node_modules/vitest/vitest.mjs")
        .args(["run", "--config", "vitest.config.mjs", "--reporter=json"])
        .arg(format!("--outputFile={}", report.path().display()))
        .env("DS_BASE_URL", base)
        .env("NO_COLOR", "1");
    let o = run_within(cmd, "the conformance suite", Duration::from_secs(600));
    let text = std::fs::read_to_string(report.path()).unwrap_or_default();
    let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "no report from the conformance suite ({e}):\n{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    });
    let failed: Vec<String> = v["testResults"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|f| {
            f["assertionResults"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .filter(|t| t["status"] == "failed")
        .map(|t| {
            format!(
                "{}: {}",
                t["fullName"].as_str().unwrap_or(""),
                t["failureMessages"][0]
                    .as_str()
                    .unwrap_or("")
                    .lines()
                    .next()
                    .unwrap_or("")
            )
        })
        .collect();
    assert!(
        failed.is_empty(),
        "{} conformance tests failed:\n{}",
        failed.len(),
        failed.join("\n")
    );
    assert_eq!(
        (
            v["numTotalTests"].as_u64(),
            v["numPassedTests"].as_u64(),
            v["numPendingTests"].as_u64()
        ),
        (
            Some(SUITE_TESTS),
            Some(SUITE_TESTS - SUITE_SKIPPED),
            Some(SUITE_SKIPPED)
        ),
        "the suite's counts"
    );
    v
}

#[test]
fn the_conformance_suite_passes_on_sqlite() {
    let data = tempfile::tempdir().expect("temp dir");
    let server = spawn_sqlite(data.path(), free_port(), &["--ds-access", "open"]);
    conformance(&format!("{}/ds", server.url));
}

#[test]
fn the_conformance_suite_passes_on_redis() {
    let bin = Path::new(env!("CARGO_BIN_EXE_zerodrop"));
    let cluster = Cluster::start(bin, 1, &["--ds-access", "open"]).expect("cluster starts");
    conformance(&format!("{}/ds", cluster.url(0)));
}

/// The bytes of append `i` (1-based): eight bytes, every value of a byte in turn.
fn chunk(i: u32) -> Vec<u8> {
    let mut b = i.to_be_bytes().to_vec();
    b.extend_from_slice(&[0x00, 0xff, (i % 256) as u8, b'\n']);
    b
}

/// `PUT` an `application/octet-stream` stream on `base` (`http://host:port`).
async fn create(http: &reqwest::Client, base: &str, stream: &str) {
    let r = http
        .put(format!("{base}/ds/v1/stream/{stream}"))
        .header("content-type", "application/octet-stream")
        .send()
        .await
        .expect("PUT");
    assert_eq!(r.status().as_u16(), 201, "PUT {stream}");
}

/// Appends `from..=to` on `base`; a connection refused (the instance is starting again) is
/// retried for at most 20 s. The producer headers make a retry of an append that was stored
/// before its answer was lost a duplicate, never a second copy.
async fn append(http: &reqwest::Client, base: &str, stream: &str, from: u32, to: u32) {
    for i in from..=to {
        let until = Instant::now() + Duration::from_secs(20);
        loop {
            let r = http
                .post(format!("{base}/ds/v1/stream/{stream}"))
                .header("content-type", "application/octet-stream")
                .header("producer-id", "test")
                .header("producer-epoch", "0")
                .header("producer-seq", (i - 1).to_string())
                .body(chunk(i))
                .send()
                .await;
            match r {
                Ok(r) => {
                    assert!(
                        matches!(r.status().as_u16(), 200 | 204),
                        "append {i}: {}",
                        r.status()
                    );
                    break;
                }
                Err(e) => {
                    assert!(Instant::now() < until, "append {i}: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

/// `tests/ds/reader.mjs` running: its progress (bytes held) and, at the end, its report.
struct Reader {
    child: std::process::Child,
    have: std::sync::mpsc::Receiver<usize>,
}

impl Reader {
    fn start(origins: &[String], stream: &str, expected: usize, live: &str) -> Reader {
        install();
        tool("node");
        let mut child = Command::new("node")
            .current_dir(dir())
            .arg("reader.mjs")
            .arg(origins.join(","))
            .arg(format!("/ds/v1/stream/{stream}"))
            .arg(expected.to_string())
            .arg(live)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("node starts");
        let (tx, have) = std::sync::mpsc::channel();
        let err = child.stderr.take().expect("stderr");
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(err).lines().map_while(Result::ok) {
                match line.strip_prefix("have ").and_then(|n| n.parse().ok()) {
                    Some(n) => {
                        let _ = tx.send(n);
                    }
                    None => eprintln!("reader: {line}"),
                }
            }
        });
        Reader { child, have }
    }

    /// Waits (at most 30 s) until the reader holds at least `n` bytes.
    fn holds(&self, n: usize) {
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match self.have.recv_timeout(left) {
                Ok(have) if have >= n => return,
                Ok(_) => {}
                Err(e) => panic!("the reader did not reach {n} bytes: {e}"),
            }
        }
    }

    /// Its report, once it has every byte (at most 90 s).
    fn finish(mut self) -> Value {
        let mut out = self.child.stdout.take().expect("stdout");
        let until = Instant::now() + Duration::from_secs(90);
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                break s;
            }
            assert!(Instant::now() < until, "the reader did not finish");
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut out, &mut text);
        assert!(status.success(), "the reader failed ({status}): {text}");
        serde_json::from_str(text.trim()).expect("the reader's report")
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn decoded(report: &Value) -> Vec<u8> {
    report["bytes"]
        .as_array()
        .expect("bytes")
        .iter()
        .map(|b| {
            b.as_u64()
                .and_then(|b| u8::try_from(b).ok())
                .expect("a byte")
        })
        .collect()
}

fn expected(n: u32) -> Vec<u8> {
    (1..=n).flat_map(chunk).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_reads_every_byte_once_across_a_kill9_and_restart() {
    for live in ["long-poll", "sse"] {
        let data = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let args = ["--ds-access", "open"];
        let mut server = spawn_sqlite(data.path(), port, &args);
        let (base, http) = (server.url.clone(), reqwest::Client::new());
        let stream = format!("ds-kill-{live}");
        create(&http, &base, &stream).await;
        append(&http, &base, &stream, 1, 20).await;
        let reader = Reader::start(std::slice::from_ref(&base), &stream, 60 * 8, live);
        reader.holds(20 * 8);
        append(&http, &base, &stream, 21, 30).await;
        reader.holds(30 * 8);
        server.kill9();
        let server = spawn_sqlite(data.path(), port, &args);
        append(&http, &server.url, &stream, 31, 60).await;
        let report = reader.finish();
        assert_eq!(
            decoded(&report),
            expected(60),
            "{live}: every byte once, in order"
        );
        assert!(
            report["failures"].as_u64() >= Some(1),
            "{live}: the reader met the kill: {report}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_reads_every_byte_once_across_a_drain_to_another_instance() {
    let bin = Path::new(env!("CARGO_BIN_EXE_zerodrop"));
    let mut c = Cluster::start(bin, 2, &["--ds-access", "open"]).expect("cluster starts");
    let (a, b, http) = (c.url(0), c.url(1), reqwest::Client::new());
    let stream = "ds-drain";
    create(&http, &a, stream).await;
    append(&http, &a, stream, 1, 20).await;
    let reader = Reader::start(&[a.clone(), b.clone()], stream, 60 * 8, "long-poll");
    reader.holds(20 * 8);
    append(&http, &b, stream, 21, 30).await;
    reader.holds(30 * 8);
    // SIGTERM: the instance drains and exits; its long-poll ends with it.
    let (status, _) = c
        .terminate(0, Duration::from_secs(60))
        .expect("the drained instance exits");
    assert!(status.success(), "drained instance: {status}");
    append(&http, &b, stream, 31, 60).await;
    let report = reader.finish();
    assert_eq!(decoded(&report), expected(60), "every byte once, in order");
    assert!(
        report["served"][&a].as_u64() >= Some(1) && report["served"][&b].as_u64() >= Some(1),
        "both instances served the reader: {report}"
    );
}

/// Status and error code of a response (the code: `None` for a success).
async fn outcome(r: reqwest::Response) -> (u16, Option<String>) {
    let status = r.status().as_u16();
    let body: Value = r.json().await.unwrap_or(Value::Null);
    (status, body["error"]["code"].as_str().map(String::from))
}

fn code(status: u16, code: &str) -> (u16, Option<String>) {
    (status, Some(code.to_string()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_with_typed_errors_and_the_stream_stays_intact() {
    let data = tempfile::tempdir().expect("temp dir");
    let server = spawn_sqlite(data.path(), free_port(), &["--ds-access", "open"]);
    let http = reqwest::Client::new();
    let url = |s: &str| format!("{}/ds/v1/stream/{s}", server.url);
    let put = |s: &str, ct: &str, body: &'static str| {
        http.put(url(s))
            .header("content-type", ct)
            .body(body)
            .send()
    };
    let post = |s: &str, ct: &str, body: &'static str| {
        http.post(url(s))
            .header("content-type", ct)
            .body(body)
            .send()
    };
    assert_eq!(
        put("j", "application/json", "[1,2]")
            .await
            .unwrap()
            .status(),
        201
    );
    let before = http
        .get(url("j"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(before, "[1,2]");

    let refusals = [
        (
            post("j", "application/json", "{").await,
            code(400, "INVALID_REQUEST"),
        ),
        (
            post("j", "application/json", "[]").await,
            code(400, "INVALID_REQUEST"),
        ),
        (post("j", "text/plain", "x").await, code(409, "CONFLICT")),
        (
            post("j", "application/json", "").await,
            code(400, "INVALID_REQUEST"),
        ),
        (
            post("nope", "application/json", "1").await,
            code(404, "NOT_FOUND"),
        ),
        (put("j", "text/plain", "").await, code(409, "CONFLICT")),
        (
            put("bad id!", "text/plain", "").await,
            code(400, "INVALID_STREAM_ID"),
        ),
        (
            http.put(url("t")).header("stream-ttl", "01").send().await,
            code(400, "INVALID_REQUEST"),
        ),
        (
            http.get(format!("{}?offset=xyz", url("j"))).send().await,
            code(400, "INVALID_REQUEST"),
        ),
        (
            http.get(format!("{}?live=sse", url("j"))).send().await,
            code(400, "INVALID_REQUEST"),
        ),
        (
            http.post(url("j"))
                .header("content-type", "application/json")
                .header("producer-id", "p")
                .header("producer-epoch", "0")
                .header("producer-seq", "3")
                .body("1")
                .send()
                .await,
            code(409, "CONFLICT"),
        ),
        (
            http.post(url("j"))
                .header("content-type", "application/json")
                .header("producer-id", "p")
                .body("1")
                .send()
                .await,
            code(400, "INVALID_REQUEST"),
        ),
    ];
    for (i, (r, want)) in refusals.into_iter().enumerate() {
        assert_eq!(outcome(r.expect("answer")).await, want, "refusal {i}");
    }
    // A payload past --max-payload-bytes (64 KiB) as one JSON message.
    let big = format!("\"{}\"", "x".repeat(70 * 1024));
    let r = http
        .post(url("j"))
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(outcome(r).await, code(413, "PAYLOAD_TOO_LARGE"));
    // Closed: appends are refused, the data stays.
    let r = http
        .post(url("j"))
        .header("stream-closed", "true")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 204);
    assert_eq!(
        outcome(post("j", "application/json", "3").await.unwrap()).await,
        code(409, "STREAM_CLOSED")
    );
    let after = http
        .get(url("j"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(after, before, "nothing refused was stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn byte_payloads_reach_the_v1_api_as_base64_data() {
    let data = tempfile::tempdir().expect("temp dir");
    let server = spawn_sqlite(data.path(), free_port(), &["--ds-access", "open"]);
    let http = reqwest::Client::new();
    let r = http
        .put(format!("{}/ds/v1/stream/bin", server.url))
        .header("content-type", "application/octet-stream")
        .body(vec![0u8, 1, 0xfe, 0xff])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let page = server.api().read("bin", 0, 10).await;
    assert_eq!(page.status, 200, "{}", page.text);
    let events = page.json["events"].as_array().expect("events");
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["seq"], 1);
    assert_eq!(
        events[0]["data"],
        serde_json::json!({"$base64": "AAH+/w=="})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_key_guards_ds_by_default_and_public_read_opens_reads_only() {
    let http = reqwest::Client::new();
    let data = tempfile::tempdir().expect("temp dir");
    let server = spawn_sqlite(data.path(), free_port(), &[]);
    let url = format!("{}/ds/v1/stream/k", server.url);
    let key = server.creds.api_key.clone();
    let r = http.put(&url).send().await.unwrap();
    assert_eq!(outcome(r).await, code(401, "UNAUTHORIZED"));
    let r = http
        .put(&url)
        .bearer_auth(&key)
        .body("a")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let r = http.get(&url).send().await.unwrap();
    assert_eq!(outcome(r).await, code(401, "UNAUTHORIZED"));
    let r = http.get(&url).bearer_auth(&key).send().await.unwrap();
    assert_eq!(r.text().await.unwrap(), "a");
    drop(server);

    let data = tempfile::tempdir().expect("temp dir");
    let server = spawn_sqlite(data.path(), free_port(), &["--ds-access", "public-read"]);
    let url = format!("{}/ds/v1/stream/k", server.url);
    let key = server.creds.api_key.clone();
    let r = http.put(&url).body("b").send().await.unwrap();
    assert_eq!(outcome(r).await, code(401, "UNAUTHORIZED"));
    let r = http
        .put(&url)
        .bearer_auth(&key)
        .body("b")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let r = http.get(&url).send().await.unwrap();
    assert_eq!(r.text().await.unwrap(), "b");
    let r = http.delete(&url).send().await.unwrap();
    assert_eq!(outcome(r).await, code(401, "UNAUTHORIZED"));
}
