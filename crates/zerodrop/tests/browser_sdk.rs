//! The browser SDK (`clients/js`) compiled by `tsc` and run where it is meant to run: its
//! vector tests under Node, and a page in real headless Chromium that receives every event
//! exactly once, in order, across a `kill -9` of the server (WebSocket and SSE) and across a
//! drain to a second instance, and whose presence members view stays the server's across a
//! drain and a `kill -9`. `tsc`, `node` and `chromium` are required; a missing one fails
//! with how to install it.
//!
//! Every wait is bounded (at most 90 s per test); every process is killed on drop.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use serde_json::{Value, json};
use zerodrop_testkit::cluster::Cluster;
use zerodrop_testkit::free_port;
use zerodrop_testkit::tools::{find_tool, run_within};

mod support;

use support::{publish_range, spawn_sqlite};

const BIN: &str = env!("CARGO_BIN_EXE_zerodrop");
const LIMIT: Duration = Duration::from_secs(90);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `tsc -p clients/js --outDir <temp>`: the module the page loads.
fn compile() -> tempfile::TempDir {
    let tsc = find_tool("tsc", "apt-get install -y node-typescript");
    let out = tempfile::tempdir().expect("tempdir");
    let mut cmd = Command::new(tsc);
    cmd.arg("-p")
        .arg(repo().join("clients/js"))
        .arg("--outDir")
        .arg(out.path());
    let o = run_within(cmd, "tsc", Duration::from_secs(120));
    assert!(
        o.status.success(),
        "tsc failed:\n{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        out.path().join("zerodrop.js").exists(),
        "tsc wrote no zerodrop.js"
    );
    out
}

/// What the page reported, in the order it reported it.
type Records = Arc<Mutex<Vec<Value>>>;

#[derive(Clone)]
struct PageState {
    dist: PathBuf,
    records: Records,
}

async fn serve_file(
    State(s): State<PageState>,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> axum::response::Response {
    let path = if name == "index.html" {
        repo().join("clients/js/test/browser.html")
    } else if name.ends_with(".js") && !name.contains('/') && !name.contains("..") {
        s.dist.join(&name)
    } else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let ty = if name.ends_with(".js") {
        "text/javascript"
    } else {
        "text/html; charset=utf-8"
    };
    match std::fs::read(&path) {
        Ok(b) => ([(header::CONTENT_TYPE, ty)], b).into_response(),
        Err(_) => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn report(State(s): State<PageState>, body: String) -> StatusCode {
    match serde_json::from_str::<Vec<Value>>(&body) {
        Ok(batch) => {
            s.records.lock().unwrap().extend(batch);
            StatusCode::NO_CONTENT
        }
        Err(_) => StatusCode::BAD_REQUEST,
    }
}

/// The page's own origin: the test page, the compiled module and `/report`.
async fn page_server(dist: &Path) -> (SocketAddr, Records) {
    let records: Records = Arc::default();
    let state = PageState {
        dist: dist.to_path_buf(),
        records: records.clone(),
    };
    let app = axum::Router::new()
        .route("/report", axum::routing::post(report))
        .route("/{name}", axum::routing::get(serve_file))
        .with_state(state);
    (support::serve_local(app).await, records)
}

/// Headless Chromium on one page, in its own profile; killed when dropped.
struct Browser {
    child: Child,
    _profile: tempfile::TempDir,
}

impl Browser {
    fn open(url: &str) -> Browser {
        let chromium = [
            std::env::var("ZERODROP_CHROMIUM").unwrap_or_default(),
            "/usr/bin/chromium".into(),
            "/usr/bin/chromium-browser".into(),
        ]
        .into_iter()
        .filter(|c| !c.is_empty())
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| {
            panic!(
                "headless Chromium is required by the browser SDK tests and was not found \
                 (looked at $ZERODROP_CHROMIUM, /usr/bin/chromium); install it with \
                 `apt-get install -y chromium`"
            )
        });
        let profile = tempfile::tempdir().expect("profile dir");
        let child = Command::new(chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-extensions",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(url)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromium");
        Browser {
            child,
            _profile: profile,
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn page_url(page: SocketAddr, urls: &[String], token: &str, stream: &str, extra: &str) -> String {
    format!(
        "http://{page}/index.html?urls={}&token={token}&stream={stream}&after=0{extra}",
        urls.join(",")
    )
}

fn snapshot(records: &Records) -> Vec<Value> {
    records.lock().unwrap().clone()
}

fn errors(recs: &[Value]) -> Vec<&Value> {
    recs.iter().filter(|r| r["kind"] == "error").collect()
}

/// The seqs of `stream` the page was given, in delivery order.
fn delivered(recs: &[Value], stream: &str) -> Vec<u64> {
    let mut ev: Vec<&Value> = recs
        .iter()
        .filter(|r| r["kind"] == "event" && r["stream"] == stream)
        .collect();
    ev.sort_by_key(|r| r["i"].as_u64());
    ev.iter().filter_map(|r| r["seq"].as_u64()).collect()
}

fn summary(recs: &[Value], stream: &str) -> String {
    let seqs = delivered(recs, stream);
    format!(
        "page delivered {} events on {stream}: {:?}; errors: {:?}; last records: {:?}",
        seqs.len(),
        seqs,
        errors(recs),
        &recs[recs.len().saturating_sub(5)..]
    )
}

/// Waits until the page holds at least `n` events of `stream` (or reported an error).
async fn wait_for(records: &Records, stream: &str, n: usize, limit: Duration) {
    let until = Instant::now() + limit;
    loop {
        let recs = snapshot(records);
        assert!(
            errors(&recs).is_empty(),
            "the page reported an error: {}",
            summary(&recs, stream)
        );
        if delivered(&recs, stream).len() >= n {
            return;
        }
        assert!(
            Instant::now() < until,
            "timed out waiting for {n} events: {}",
            summary(&recs, stream)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits (10 s at most) until the page's newest position record is at `seq`; returns it.
async fn wait_position(records: &Records, seq: u64) -> Value {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let recs = snapshot(records);
        let pos = recs
            .iter()
            .rev()
            .find(|r| r["kind"] == "position")
            .cloned()
            .unwrap_or(Value::Null);
        if pos["seq"] == seq {
            return pos;
        }
        assert!(
            Instant::now() < until,
            "position never reached {seq}: {pos}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_ready(records: &Records, limit: Duration) -> Value {
    let until = Instant::now() + limit;
    loop {
        let recs = snapshot(records);
        if let Some(r) = recs.iter().find(|r| r["kind"] == "ready") {
            return r.clone();
        }
        assert!(
            Instant::now() < until,
            "the page did not load the SDK in time: {recs:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every seq 1..=n exactly once and in order, the data matching, no error.
fn assert_exactly_once(records: &Records, stream: &str, n: u64) {
    let recs = snapshot(records);
    let seqs = delivered(&recs, stream);
    let want: Vec<u64> = (1..=n).collect();
    assert_eq!(seqs, want, "{}", summary(&recs, stream));
    for r in recs
        .iter()
        .filter(|r| r["kind"] == "event" && r["stream"] == stream)
    {
        assert_eq!(r["data"]["n"], r["seq"], "data of the wrong event: {r}");
    }
    assert!(errors(&recs).is_empty(), "{}", summary(&recs, stream));
}

/// The page survives a `kill -9` of its server and a restart on the same port and data.
async fn kill9_scenario(transport: &str) {
    let dist = compile();
    let (page, records) = page_server(dist.path()).await;
    let data = tempfile::tempdir().expect("data dir");
    let port = free_port();
    let mut server = spawn_sqlite(data.path(), port, &[]);
    let api = server.api();
    let stream = format!("br{transport}:1");
    let token = server
        .creds
        .token("page", &[&format!("br{transport}:*")], &[]);
    let _browser = Browser::open(&page_url(
        page,
        std::slice::from_ref(&server.url),
        &token,
        &stream,
        &format!("&transport={transport}&verifyAt=60"),
    ));
    let ready = wait_ready(&records, LIMIT).await;
    assert_eq!(ready["transport"], transport, "{ready}");

    publish_range(&api, &stream, 1, 30).await;
    wait_for(&records, &stream, 5, LIMIT).await;
    // Mid-stream: the page may not have all 30 yet.
    server.kill9();
    // Down long enough for the page's backoff to grow, so that some of what follows is
    // published before it is back and arrives by the resume's replay.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let server = spawn_sqlite(data.path(), port, &[]);
    let api = server.api();
    publish_range(&api, &stream, 31, 60).await;
    wait_for(&records, &stream, 60, LIMIT).await;
    // Nothing more arrives (no duplicates after the fact).
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_exactly_once(&records, &stream, 60);
    // Every event was handled: the position reached the head.
    let pos = wait_position(&records, 60).await;
    if transport == "ws" {
        assert!(
            pos["protocol"] == "zerodrop.v3",
            "the browser negotiates zerodrop.v3: {pos}"
        );
    }
    // The page's consistency check over the real server agrees with the server's digest.
    let info = api.info(&stream).await;
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let recs = snapshot(&records);
        assert!(errors(&recs).is_empty(), "{}", summary(&recs, &stream));
        if let Some(v) = recs.iter().find(|r| r["kind"] == "verified") {
            assert_eq!(
                (&v["count"], &v["hash"]),
                (&json!(60), &info["hash"]),
                "{v} vs {info}"
            );
            break;
        }
        assert!(
            Instant::now() < until,
            "the page never verified: {}",
            summary(&recs, &stream)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Byte payloads reach the page as bytes (a binary frame on zerodrop.v3, the
    // `{"$base64"}` object over SSE), exactly, around a JSON event.
    for data in [
        json!({"$base64": "AAr/"}),
        json!({"n": 62}),
        json!({"$base64": ""}),
    ] {
        api.publish(&stream, data).await;
    }
    wait_for(&records, &stream, 63, LIMIT).await;
    let recs = snapshot(&records);
    let data = |seq: u64| {
        recs.iter()
            .find(|r| r["kind"] == "event" && r["stream"] == stream.as_str() && r["seq"] == seq)
            .map(|r| r["data"].clone())
    };
    assert_eq!(
        [data(61), data(62), data(63)],
        [
            Some(json!({"$bytes": [0, 10, 255]})),
            Some(json!({"n": 62})),
            Some(json!({"$bytes": []}))
        ],
        "{}",
        summary(&recs, &stream)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_opens_sealed_events_and_ends_on_a_tampered_one() {
    let vectors: Value =
        serde_json::from_str(include_str!("../../../docs/vectors/e2e-aes256gcm.json"))
            .expect("vectors");
    let cases = vectors["cases"].as_array().expect("cases");
    let (a, b) = (&cases[0], &cases[1]);
    assert_eq!(
        (&a["stream"], &a["kid"], &a["key"]),
        (&b["stream"], &b["kid"], &b["key"])
    );
    let stream = a["stream"].as_str().expect("stream");
    let tampered = vectors["invalid"]
        .as_array()
        .expect("invalid")
        .iter()
        .find(|c| {
            c["stream"] == a["stream"]
                && c["error"] == "DECRYPT_FAILED"
                && c["sealed"]["kid"] == a["kid"]
        })
        .expect("a tampered case on the same stream");

    let dist = compile();
    let (page, records) = page_server(dist.path()).await;
    let data = tempfile::tempdir().expect("data dir");
    let server = spawn_sqlite(data.path(), free_port(), &[]);
    let api = server.api();
    let token = server.creds.token("page", &["room:*"], &[]);
    let extra = format!(
        "&transport=ws&kid={}&key={}",
        a["kid"].as_str().unwrap(),
        a["key"].as_str().unwrap()
    );
    let _browser = Browser::open(&page_url(
        page,
        std::slice::from_ref(&server.url),
        &token,
        stream,
        &extra,
    ));
    wait_ready(&records, LIMIT).await;
    api.publish(stream, json!({"n": 1})).await;
    api.publish(stream, a["sealed"].clone()).await;
    api.publish(stream, b["sealed"].clone()).await;
    wait_for(&records, stream, 3, LIMIT).await;
    api.publish(stream, tampered["sealed"].clone()).await;
    api.publish(stream, json!({"n": 5})).await;
    let until = Instant::now() + LIMIT;
    let recs = loop {
        let recs = snapshot(&records);
        if !errors(&recs).is_empty() {
            break recs;
        }
        assert!(
            Instant::now() < until,
            "no error for the tampered event: {}",
            summary(&recs, stream)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let recs_after = snapshot(&records);
    assert_eq!(
        delivered(&recs_after, stream),
        vec![1, 2, 3],
        "{}",
        summary(&recs_after, stream)
    );
    let evs: Vec<&Value> = recs_after.iter().filter(|r| r["kind"] == "event").collect();
    assert_eq!(
        (&evs[0]["data"], &evs[0]["encrypted"]),
        (&json!({"n": 1}), &json!(false))
    );
    for (e, case) in [(evs[1], a), (evs[2], b)] {
        let plain: Value = serde_json::from_str(case["plaintext"].as_str().unwrap()).unwrap();
        assert_eq!((&e["data"], &e["encrypted"]), (&plain, &json!(true)), "{e}");
    }
    let errs = errors(&recs);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(errs[0]["code"], "DECRYPT_FAILED", "{errs:?}");
}

#[test]
fn the_compiled_sdk_passes_its_vector_tests_under_node() {
    let dist = compile();
    let node = find_tool("node", "apt-get install -y nodejs");
    let tests: Vec<PathBuf> = std::fs::read_dir(repo().join("clients/js/test"))
        .expect("clients/js/test")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().ends_with(".test.mjs"))
        .collect();
    assert!(!tests.is_empty(), "no clients/js/test/*.test.mjs");
    let mut cmd = Command::new(node);
    cmd.arg("--test")
        .args(&tests)
        .env("ZERODROP_JS_DIST", dist.path());
    let o = run_within(cmd, "node --test", LIMIT);
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "node --test failed:\n{out}");
    assert!(out.contains("# fail 0"), "{out}");
    assert!(!out.contains("# pass 0"), "no test ran:\n{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_over_websocket_gets_every_event_once_across_a_kill9() {
    kill9_scenario("ws").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_over_sse_gets_every_event_once_across_a_kill9() {
    kill9_scenario("sse").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_follows_a_drain_to_the_second_instance_without_a_gap_or_a_repeat() {
    let dist = compile();
    let (page, records) = page_server(dist.path()).await;
    let c = Cluster::start(Path::new(BIN), 2, &[]).expect("cluster starts");
    let apis = [c.api(0), c.api(1)];
    let stream = "brdrain:1";
    let token = c.token("page", &["brdrain:*"]);
    // The page starts on the first url: the one drained below.
    let _browser = Browser::open(&page_url(page, &c.urls(), &token, stream, "&transport=ws"));
    wait_ready(&records, LIMIT).await;
    publish_range(&apis[1], stream, 1, 20).await;
    wait_for(&records, stream, 20, LIMIT).await;

    // Publishing goes on while the page moves.
    let n = support::drain_while_publishing(&c, stream, 20).await;
    publish_range(&apis[1], stream, n + 1, n + 10).await;
    let total = n + 10;
    wait_for(&records, stream, total as usize, LIMIT).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_exactly_once(&records, stream, total);
    let st = apis[0]
        .get("/admin/drain/status", Some(&c.creds.admin_token))
        .await;
    assert_eq!(st.json["sessionsRemaining"], 0, "{}", st.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_behind_a_proxy_that_loses_an_event_reads_it_over_http_and_acks_on_v1() {
    let dist = compile();
    let (page, records) = page_server(dist.path()).await;
    let data = tempfile::tempdir().expect("data dir");
    let server = spawn_sqlite(data.path(), free_port(), &[]);
    let api = server.api();
    // Negotiates zerodrop.v1 on both sides and never forwards the event with seq 2.
    let proxy = support::event_dropping_proxy(server.addr).await;
    let stream = "brgap:1";
    let token = server.creds.token("page", &["brgap:*"], &[]);
    let _browser = Browser::open(&page_url(
        page,
        &[format!("http://{proxy}")],
        &token,
        stream,
        "&transport=ws",
    ));
    wait_ready(&records, LIMIT).await;
    publish_range(&api, stream, 1, 10).await;
    wait_for(&records, stream, 10, LIMIT).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    // Seq 2 never crossed the socket: it is there, in its place, only because the SDK read
    // the gap with `GET …/events` before delivering 3.
    assert_exactly_once(&records, stream, 10);
    let pos = wait_position(&records, 10).await;
    assert_eq!(pos["protocol"], "zerodrop.v1", "{pos}");
}

/// The page's members view (`subscribe(stream, {presence: true})`): its newest report.
fn page_members(records: &Records) -> Option<Vec<String>> {
    snapshot(records)
        .iter()
        .rev()
        .find(|r| r["kind"] == "presence")
        .map(|r| {
            r["members"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m.as_str().unwrap().to_string())
                .collect()
        })
}

/// Waits until the page's members view is the server's snapshot (session ids, sorted) and
/// holds `n` members.
async fn wait_members(
    records: &Records,
    api: &zerodrop_testkit::http::Api,
    key: &str,
    stream: &str,
    n: usize,
) {
    let until = Instant::now() + LIMIT;
    loop {
        let r = api
            .get(&format!("/v1/streams/{stream}/presence"), Some(key))
            .await;
        let mut server: Vec<String> = r.json["members"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|m| m["sessionId"].as_str().unwrap().to_string())
                    .collect()
            })
            .unwrap_or_default();
        server.sort();
        let page = page_members(records);
        if server.len() == n && page.as_ref() == Some(&server) {
            return;
        }
        let recs = snapshot(records);
        assert!(errors(&recs).is_empty(), "{recs:?}");
        assert!(
            Instant::now() < until,
            "the page's members {page:?} never became the server's {server:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A member: a raw socket of `sub` subscribed to `stream` on `ws_url`.
async fn presence_member(
    ws_url: &str,
    token: &str,
    stream: &str,
) -> zerodrop_testkit::ws::WsClient {
    let mut m = zerodrop_testkit::ws::WsClient::connect(&format!("{ws_url}/v1/ws?token={token}"))
        .await
        .unwrap();
    m.expect("welcome").await;
    m.send(json!({"type":"subscribe","stream":stream})).await;
    m.expect("subscribed").await;
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pages_members_view_stays_current_across_a_drain_and_a_kill9() {
    let dist = compile();
    let (page, records) = page_server(dist.path()).await;
    let mut c = Cluster::start(
        Path::new(BIN),
        2,
        &[
            "--presence",
            "brp:*",
            "--presence-leave-grace-sec",
            "2",
            "--presence-heartbeat-sec",
            "2",
        ],
    )
    .expect("cluster starts");
    let stream = "brp:1";
    let key = c.creds.api_key.clone();
    let token = c.token("page", &["brp:*"]);
    // The page starts on node 0, the one drained below.
    let _browser = Browser::open(&page_url(
        page,
        &c.urls(),
        &token,
        stream,
        "&transport=ws&presence=1",
    ));
    wait_ready(&records, LIMIT).await;
    let _m1 = presence_member(&c.ws_url(1), &c.token("m1", &["brp:*"]), stream).await;
    wait_members(&records, &c.api(1), &key, stream, 2).await;

    // A drain of node 0: the page moves to node 1; a member joins meanwhile.
    let r = c
        .api(0)
        .post(
            "/admin/drain/start",
            Some(&c.creds.admin_token),
            json!({"reason":"rolling_deployment","max_session_age_seconds":1}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let _m2 = presence_member(&c.ws_url(1), &c.token("m2", &["brp:*"]), stream).await;
    wait_members(&records, &c.api(1), &key, stream, 3).await;
    c.terminate(0, Duration::from_secs(30))
        .expect("node 0 exits");
    c.spawn_node(0).expect("node 0 again");

    // A kill -9 of node 1, where the page and both members are: the page resumes on node 0,
    // the members' leases lapse, and a member joins there.
    c.kill9(1);
    let _m3 = presence_member(&c.ws_url(0), &c.token("m3", &["brp:*"]), stream).await;
    wait_members(&records, &c.api(0), &key, stream, 2).await;
}
