//! The real binary as a process: crash safety (`kill -9`), corrupt files, SIGTERM drains,
//! secrets, logs and configuration precedence.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use zerodrop_testkit::server::ServerProcess;
use zerodrop_testkit::ws::WsClient;

const BIN: &str = env!("CARGO_BIN_EXE_zerodrop");

fn spawn(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> ServerProcess {
    ServerProcess::spawn(Path::new(BIN), dir, "127.0.0.1:0", args, env).expect("zerodrop starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_burst_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = spawn(dir.path(), &[], &[]);
    let api = p.api();
    // A session with a checkpoint, to check it survives too.
    let tok = p.creds.token("u1", &["crash:*"], &[]);
    let sess = api
        .post("/v1/sessions", Some(&tok), json!({"streams":["crash:0"]}))
        .await
        .json;
    let sid = sess["sessionId"].as_str().unwrap().to_string();
    let rt = sess["resumeToken"].as_str().unwrap().to_string();
    for i in 0..3 {
        api.publish("crash:0", json!({"w": 99, "i": i})).await;
    }
    let r = api
        .post(
            &format!("/v1/sessions/{sid}/checkpoint"),
            Some(&rt),
            json!({"stream":"crash:0","seq":2}),
        )
        .await;
    assert_eq!(r.json["ackUpdate"], "applied");
    // 8 publishers on 4 streams, recording every 201.
    let acked: Arc<Mutex<HashMap<(String, u64), Value>>> = Arc::default();
    let mut tasks = Vec::new();
    for w in 0..8u64 {
        let (api, acked) = (api.clone(), acked.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..100_000u64 {
                let stream = format!("crash:{}", w % 4);
                let data = json!({"w": w, "i": i});
                let body = json!({"data": data}).to_string();
                let url = format!("{}/v1/streams/{stream}/events", api.base);
                let res = api
                    .client
                    .post(url)
                    .bearer_auth(&api.creds.api_key)
                    .body(body)
                    .send()
                    .await;
                let Ok(res) = res else { return }; // the server is gone
                if res.status().as_u16() != 201 {
                    return;
                }
                let Ok(v) = res.json::<Value>().await else {
                    return;
                };
                let seq = v["seq"].as_u64().unwrap();
                acked.lock().unwrap().insert((stream, seq), data);
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    p.kill9();
    for t in tasks {
        t.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > 100,
        "the burst ran ({} acknowledged)",
        acked.len()
    );
    let p = spawn(dir.path(), &[], &[]);
    let api = p.api();
    for k in 0..4 {
        let stream = format!("crash:{k}");
        let info = api.info(&stream).await;
        let head = info["headSeq"].as_u64().unwrap();
        let mut got = Vec::new();
        let mut after = 0;
        loop {
            let page = api.read(&stream, after, 1000).await.json;
            let evs = page["events"].as_array().unwrap().clone();
            if evs.is_empty() {
                break;
            }
            after = evs.last().unwrap()["seq"].as_u64().unwrap();
            got.extend(evs);
        }
        let seqs: Vec<u64> = got.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
        assert_eq!(seqs, (1..=head).collect::<Vec<_>>(), "{stream}: contiguous");
        for ((s, seq), data) in acked.iter().filter(|((s, _), _)| *s == stream) {
            assert!(
                *seq <= head,
                "{s} seq {seq} was acknowledged but is gone (head {head})"
            );
            assert_eq!(&got[(*seq - 1) as usize]["data"], data, "{s} seq {seq}");
        }
    }
    // The session and its checkpoint survived; the old token still resumes it.
    let r = api
        .post(
            &format!("/v1/sessions/{sid}/checkpoint"),
            Some(&rt),
            json!({"stream":"crash:0","seq":1}),
        )
        .await;
    assert_eq!(r.json, json!({"ackUpdate":"ignored","lastAckSequence":2}));
    let r = api
        .post(
            &format!("/v1/sessions/{sid}/reconnect"),
            None,
            json!({"resumeToken": rt}),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json["replay"]["crash:0"]["fromSeq"], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_database_is_moved_aside_and_streams_get_a_new_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = spawn(dir.path(), &[], &[]);
    let api = p.api();
    let old_epoch = api.publish("room:1", json!(1)).await["epoch"]
        .as_str()
        .unwrap()
        .to_string();
    let tok = p.creds.token("u1", &["room:*"], &[]);
    let sess = api
        .post("/v1/sessions", Some(&tok), json!({"streams":["room:1"]}))
        .await
        .json;
    p.terminate(Duration::from_secs(30)).unwrap();
    let db = dir.path().join("zerodrop.db");
    std::fs::write(
        &db,
        b"this is not a database, it is garbage from a bad disk............",
    )
    .unwrap();
    let p = spawn(dir.path(), &[], &[]);
    assert_quarantined_at_start(dir.path(), &p);
    assert_a_new_epoch(&p, &old_epoch, 0).await;
    let api = p.api();
    let sid = sess["sessionId"].as_str().unwrap();
    let r = api
        .post(
            &format!("/v1/sessions/{sid}/reconnect"),
            None,
            json!({"resumeToken": sess["resumeToken"]}),
        )
        .await;
    assert_eq!((r.status, r.code()), (404, "SESSION_NOT_FOUND"));
    // Secrets were untouched: the same api key works.
    assert_eq!(api.try_publish("room:1", json!(1)).await.status, 201);
}

/// The start-up quarantine as SPEC §2 tells it: the file moved to
/// `zerodrop.db.corrupt-<UTC stamp>` and one error line naming both paths.
/// `room:1` starts again in a new epoch, and a client that held position `after` of the old
/// one is told so (409 `EPOCH_CHANGED`) instead of being handed a silent hole.
async fn assert_a_new_epoch(p: &ServerProcess, old_epoch: &str, after: u64) {
    let api = p.api();
    let info = api.info("room:1").await;
    assert_ne!(info["epoch"], old_epoch, "a new epoch: clients must resync");
    assert_eq!(info["headSeq"], 0);
    let r = api
        .get(
            &format!("/v1/streams/room:1/events?after={after}&epoch={old_epoch}"),
            Some(&p.creds.api_key),
        )
        .await;
    assert_eq!((r.status, r.code()), (409, "EPOCH_CHANGED"));
}

fn assert_quarantined_at_start(dir: &Path, p: &ServerProcess) {
    let moved: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("zerodrop.db.corrupt-"))
        .collect();
    assert!(
        moved
            .iter()
            .any(|n| n.len() == "zerodrop.db.corrupt-20261122T000000Z".len()),
        "{moved:?}"
    );
    let line = p
        .logs()
        .into_iter()
        .find(|l| l.contains("moved aside"))
        .expect("an error line about the quarantine");
    let v: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["level"], "ERROR");
    let path = dir.join("zerodrop.db");
    assert_eq!(v["path"].as_str(), path.to_str());
    let moved_to = v["moved_to"].as_str().unwrap();
    assert!(
        moved.iter().any(|n| dir.join(n).to_str() == Some(moved_to)),
        "{moved_to} is one of {moved:?}"
    );
}

/// `n` events of about 1 KB on `stream` (enough pages for the middle of the file to be only
/// events); returns the epoch.
async fn fill(api: &zerodrop_testkit::http::Api, stream: &str, n: u64) -> String {
    let mut epoch = String::new();
    for i in 1..=n {
        let r = api
            .publish(stream, json!({"i": i, "pad": "p".repeat(1000)}))
            .await;
        epoch = r["epoch"].as_str().unwrap().to_string();
    }
    epoch
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_damaged_behind_a_valid_header_is_moved_aside_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = spawn(dir.path(), &[], &[]);
    let old_epoch = fill(&p.api(), "room:1", 1_500).await;
    p.terminate(Duration::from_secs(30)).unwrap();
    let db = dir.path().join("zerodrop.db");
    assert!(zerodrop_testkit::files::damage_middle_pages(&db).unwrap() > 0);

    let p = spawn(dir.path(), &[], &[]);
    assert_quarantined_at_start(dir.path(), &p);
    assert_a_new_epoch(&p, &old_epoch, 1500).await;
    let api = p.api();
    assert_eq!(api.publish("room:1", json!(1)).await["seq"], 1);
    assert_eq!(api.get("/health/ready", None).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scheduled_check_stops_serving_a_damaged_file_and_a_restart_quarantines_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = spawn(dir.path(), &[], &[]);
    let old_epoch = fill(&p.api(), "room:1", 1_500).await;
    p.terminate(Duration::from_secs(30)).unwrap();

    // Served while a bad disk damages it; the check runs every second.
    let mut p = spawn(dir.path(), &["--sqlite-check-interval-sec", "1"], &[]);
    let api = p.api();
    assert_eq!(api.get("/health/ready", None).await.status, 200);
    let db = dir.path().join("zerodrop.db");
    assert!(zerodrop_testkit::files::damage_middle_pages(&db).unwrap() > 0);
    let deadline = std::time::Instant::now() + zerodrop_testkit::WAIT;
    let ready = loop {
        let r = api.get("/health/ready", None).await;
        if r.status != 200 || std::time::Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        (ready.status, ready.json.clone()),
        (503, json!({"ready": false, "reasons": ["store_corrupt"]}))
    );
    let r = api.try_publish("room:1", json!(1)).await;
    assert_eq!(
        (r.status, r.code(), r.json["error"]["reason"].as_str()),
        (503, "STORE_UNAVAILABLE", Some("corrupt")),
        "{}",
        r.text
    );
    assert!(r.headers.contains_key("retry-after"));
    assert_eq!(api.read("room:1", 0, 10).await.code(), "STORE_UNAVAILABLE");
    let damaged: Vec<Value> = p
        .logs()
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["fault"] == "corrupt")
        .collect();
    assert_eq!(
        damaged.len(),
        1,
        "one line, however many calls failed: {damaged:?}"
    );
    assert_eq!(damaged[0]["level"], "ERROR");
    assert_eq!(damaged[0]["path"].as_str(), db.to_str());
    assert!(
        damaged[0]["message"]
            .as_str()
            .unwrap()
            .contains("restart the instance"),
        "{}",
        damaged[0]
    );
    p.terminate(Duration::from_secs(30)).unwrap();

    // The restart's check moves the file aside; streams start over in a new epoch.
    let p = spawn(dir.path(), &[], &[]);
    assert_quarantined_at_start(dir.path(), &p);
    let info = p.api().info("room:1").await;
    assert_ne!(info["epoch"], old_epoch.as_str());
    assert_eq!(info["headSeq"], 0);
    assert_eq!(p.api().get("/health/ready", None).await.status, 200);
}

/// A WebSocket session is written with its first stream (its `welcome` waits for no durable
/// write): across a `kill -9`, a session that held a stream resumes with it and gets what was
/// published meanwhile; one whose socket ended before the crash was written then and resumes;
/// one that never held a stream and was still open answers `SESSION_NOT_FOUND` (nothing was
/// in it: start a new one); one that published with an `id` was written before the publish, so
/// the retry of that id is answered with the first publish. A drain writes an unwritten
/// session before its `reconnect`, so that token resumes on the next process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_keeps_every_session_that_held_a_stream_and_a_drain_writes_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = spawn(dir.path(), &["--drain-grace-sec", "3"], &[]);
    let tok = p.creds.token("u1", &["room:*"], &["room:*"]);
    let url = |p: &ServerProcess| format!("{}/v1/ws?token={tok}", p.ws_url());
    let mut held = WsClient::connect(&url(&p)).await.unwrap();
    let held_welcome = held.expect("welcome").await;
    held.send(json!({"type":"subscribe","stream":"room:1"}))
        .await;
    held.expect("subscribed").await;
    let mut open = WsClient::connect(&url(&p)).await.unwrap();
    let open_welcome = open.expect("welcome").await;
    let mut ended = WsClient::connect(&url(&p)).await.unwrap();
    let ended_welcome = ended.expect("welcome").await;
    ended.close().await;
    // A publisher that never subscribes: its `id` is kept with its session.
    let mut publisher = WsClient::connect(&url(&p)).await.unwrap();
    let publisher_welcome = publisher.expect("welcome").await;
    let publish = json!({"type":"publish","stream":"room:2","data":"once","id":"p1"});
    publisher.send(publish.clone()).await;
    assert_eq!(publisher.expect("published").await["seq"], 1);
    p.api().publish("room:1", json!("missed")).await;
    assert_eq!(held.expect("event").await["seq"], 1);
    // The ended socket's session is written as its connection ends (in the background).
    tokio::time::sleep(Duration::from_millis(500)).await;
    p.kill9();
    drop((held, open, publisher));

    let mut p = spawn(dir.path(), &["--drain-grace-sec", "3"], &[]);
    let resume = |p: &ServerProcess, w: &Value| {
        format!(
            "{}/v1/ws?resume={}",
            p.ws_url(),
            w["resumeToken"].as_str().unwrap()
        )
    };
    let mut c = WsClient::connect(&resume(&p, &held_welcome)).await.unwrap();
    assert_eq!(
        c.expect("welcome").await["sessionId"],
        held_welcome["sessionId"]
    );
    assert_eq!(c.expect("subscribed").await["fromSeq"], 1);
    let e = c.expect("event").await;
    assert_eq!(
        (&e["seq"], &e["data"]),
        (&json!(1), &json!("missed")),
        "{e}"
    );
    c.abort();
    let mut c = WsClient::connect(&resume(&p, &ended_welcome))
        .await
        .unwrap();
    assert_eq!(
        c.expect("welcome").await["sessionId"],
        ended_welcome["sessionId"]
    );
    c.abort();
    let mut c = WsClient::connect(&resume(&p, &publisher_welcome))
        .await
        .unwrap();
    c.expect("welcome").await;
    c.send(publish).await;
    let f = c.expect("published").await;
    assert_eq!(f["seq"], 1, "the retry of id p1 is the first publish: {f}");
    assert_eq!(p.api().info("room:2").await["headSeq"], 1);
    c.abort();
    let mut c = WsClient::connect(&resume(&p, &open_welcome)).await.unwrap();
    let f = c.expect("error").await;
    assert_eq!(f["code"], "SESSION_NOT_FOUND", "{f}");

    // An unwritten session at a drain: written before its `reconnect` frame.
    let mut d = WsClient::connect(&url(&p)).await.unwrap();
    let d_welcome = d.expect("welcome").await;
    let waiter = std::thread::spawn(move || p.terminate(Duration::from_secs(20)).map(|s| s.code()));
    let f = d.expect("reconnect").await;
    let token = f["resumeToken"].as_str().unwrap().to_string();
    assert_eq!(d.expect_close().await, Some(1012));
    assert_eq!(waiter.join().unwrap().unwrap(), Some(0));
    let p = spawn(dir.path(), &[], &[]);
    let mut c = WsClient::connect(&format!("{}/v1/ws?resume={token}", p.ws_url()))
        .await
        .unwrap();
    assert_eq!(
        c.expect("welcome").await["sessionId"],
        d_welcome["sessionId"]
    );
}

/// A revoked subject's resume token is refused as revoked even when its session is not in
/// the store: here a session that never held a stream, lost unwritten to a `kill -9` (before
/// the revocation it is `SESSION_NOT_FOUND`, as above). On several instances the same holds
/// for a revoked connection whose end has not written its session yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_subjects_resume_token_is_refused_as_revoked_without_its_session() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = spawn(dir.path(), &[], &[]);
    let tok = p.creds.token("quiet", &["room:*"], &[]);
    let mut c = WsClient::connect(&format!("{}/v1/ws?token={tok}", p.ws_url()))
        .await
        .unwrap();
    let w = c.expect("welcome").await;
    let (sid, resume) = (
        w["sessionId"].as_str().unwrap().to_string(),
        w["resumeToken"].as_str().unwrap().to_string(),
    );
    p.kill9();
    drop(c);
    let p = spawn(dir.path(), &[], &[]);
    let api = p.api();
    let r = api.reconnect(&sid, &resume).await;
    assert_eq!(
        (r.status, r.code()),
        (404, "SESSION_NOT_FOUND"),
        "{}",
        r.text
    );
    // Past the second of the token's `iat` (whole seconds), so the revocation covers it.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let admin = p.creds.admin_token.clone();
    let r = api
        .post("/admin/revoke", Some(&admin), json!({"sub":"quiet"}))
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let r = api.reconnect(&sid, &resume).await;
    assert_eq!((r.status, r.code()), (401, "REVOKED"), "{}", r.text);
    let mut c = WsClient::connect(&format!("{}/v1/ws?resume={resume}", p.ws_url()))
        .await
        .unwrap();
    let f = c.expect("error").await;
    assert_eq!(f["code"], "REVOKED", "{f}");
    assert_eq!(c.expect_close().await, Some(4403));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_websockets_then_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = spawn(dir.path(), &["--drain-grace-sec", "3"], &[]);
    let tok = p.creds.token("u1", &["room:*"], &[]);
    let mut c = WsClient::connect(&format!("{}/v1/ws?token={tok}", p.ws_url()))
        .await
        .unwrap();
    let welcome = c.expect("welcome").await;
    c.send(json!({"type":"subscribe","stream":"room:1"})).await;
    c.expect("subscribed").await;
    let pid = p.pid();
    let waiter = std::thread::spawn(move || p.terminate(Duration::from_secs(20)).map(|s| s.code()));
    let f = c.recv().await;
    assert_eq!(f["type"], "reconnect", "{f}");
    assert_eq!(f["reason"], "draining");
    let token = f["resumeToken"].as_str().unwrap();
    assert!(token.starts_with("v1.") && token != welcome["resumeToken"].as_str().unwrap());
    assert_eq!(c.expect_close().await, Some(1012));
    let code = waiter.join().unwrap().unwrap();
    assert_eq!(code, Some(0), "pid {pid} exits 0 after draining");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_start_generates_private_secrets_and_logs_are_json_without_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("fresh");
    let p = spawn(&data, &[], &[]);
    let secrets = data.join("secrets.json");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&secrets).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            std::fs::metadata(&data).unwrap().permissions().mode() & 0o777,
            0o700
        );
    }
    let f: Value = serde_json::from_str(&std::fs::read_to_string(&secrets).unwrap()).unwrap();
    for k in ["apiKey", "adminToken", "jwtSecret", "resumeKeys"] {
        assert!(f[k].as_str().is_some_and(|v| v.len() >= 16), "{k}");
    }
    // `zerodrop token` mints a token this server accepts.
    let out = std::process::Command::new(BIN)
        .args(["token", "--sub", "u1", "--streams", "room:*", "--data-dir"])
        .arg(&data)
        .env_remove("ZERODROP_JWT_SECRET")
        .output()
        .unwrap();
    assert!(out.status.success());
    let tok = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let mut c = WsClient::connect(&format!("{}/v1/ws?token={tok}", p.ws_url()))
        .await
        .unwrap();
    let w = c.expect("welcome").await;
    let rt = w["resumeToken"].as_str().unwrap().to_string();
    c.abort();
    let mut bad = WsClient::connect(&format!("{}/v1/ws?resume=v1.k1.x.y", p.ws_url()))
        .await
        .unwrap();
    bad.expect("error").await;
    let api = p.api();
    api.publish("room:1", json!(1)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let logs = p.logs();
    assert!(
        logs.iter().any(|l| l.contains("secrets.json")),
        "the secrets' path is logged"
    );
    // One line per connection at `info`, at its end, saying whose it was.
    assert!(!logs.iter().any(|l| l.contains("connection opened")));
    assert!(
        logs.iter()
            .any(|l| l.contains("connection closed") && l.contains(r#""sub":"u1""#)),
        "{logs:?}"
    );
    assert!(
        logs.iter()
            .any(|l| l.contains("resume failed") && l.contains("INVALID_RESUME_TOKEN"))
    );
    for l in &logs {
        serde_json::from_str::<Value>(l).unwrap_or_else(|_| panic!("not JSON: {l}"));
        for k in ["apiKey", "adminToken", "jwtSecret"] {
            assert!(
                !l.contains(f[k].as_str().unwrap()),
                "a secret leaked into the logs: {l}"
            );
        }
        assert!(
            !l.contains(&rt) && !l.contains(&tok),
            "a token leaked into the logs: {l}"
        );
    }
    let out = std::process::Command::new(BIN)
        .args(["token", "--sub", "u1", "--data-dir"])
        .arg(dir.path().join("nowhere"))
        .env_remove("ZERODROP_JWT_SECRET")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no JWT secret"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_come_from_flags_then_env_then_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("zerodrop.toml");
    std::fs::write(
        &file,
        "retention_max_events = 7\ninstance_id = \"from-file\"\nmax_connections = 5\n",
    )
    .unwrap();
    let data = dir.path().join("d");
    let p = spawn(
        &data,
        &["--config", file.to_str().unwrap(), "--max-connections", "9"],
        &[
            ("ZERODROP_INSTANCE_ID", "from-env"),
            ("ZERODROP_MAX_CONNECTIONS", "8"),
        ],
    );
    let api = p.api();
    let snap = api
        .get("/admin/snapshot", Some(&p.creds.admin_token))
        .await
        .json;
    assert_eq!(snap["config"]["instance"], "from-env");
    assert_eq!(snap["config"]["retention"]["maxEvents"], 7);
    assert_eq!(snap["config"]["maxConnections"], 9);
    for key in [
        "drain",
        "store",
        "rateLimit",
        "circuits",
        "bulkheads",
        "idempotency",
        "jobs",
        "cache",
    ] {
        assert!(snap.get(key).is_some(), "snapshot has {key}");
    }
    let r = api.get("/admin/snapshot", None).await;
    assert_eq!((r.status, r.code()), (401, "UNAUTHORIZED"));
    // Bad settings are refused at start-up with a message.
    let out = std::process::Command::new(BIN)
        .args(["serve", "--retention-max-events", "0", "--data-dir"])
        .arg(dir.path().join("x"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--retention-max-events"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_ctrl_c_exits_at_once_instead_of_waiting_out_the_drain() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = spawn(dir.path(), &["--drain-grace-sec", "300"], &[]);
    let tok = p.creds.token("u1", &["room:*"], &[]);
    let mut c = WsClient::connect(&format!("{}/v1/ws?token={tok}", p.ws_url()))
        .await
        .unwrap();
    c.expect("welcome").await;
    p.send_signal(libc::SIGINT);
    // The connected client keeps the drain going (it has up to 300 s to leave).
    let mut draining = false;
    for _ in 0..200 {
        if p.logs().iter().any(|l| l.contains("shutdown requested")) {
            draining = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(draining, "{:?}", p.logs());
    p.send_signal(libc::SIGINT);
    // Well under the 300 s drain: the second signal does not wait for it.
    let status = p.wait_exit(Duration::from_secs(60)).expect("exits");
    assert_eq!(status.code(), Some(130));
    let logs = p.logs();
    assert!(
        logs.iter().any(|l| l.contains("second shutdown signal")),
        "{logs:?}"
    );
}

/// `zerodrop serve` with these arguments and variables, run to its exit (a start that is
/// refused). Secrets and durability settings of this process's environment are not passed on.
fn serve_refused(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = std::process::Command::new(BIN);
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("d"))
        .args(args);
    for k in [
        "ZERODROP_SQLITE_SYNCHRONOUS",
        "ZERODROP_REQUIRE_DURABILITY",
        "ZERODROP_STORE",
        "ZERODROP_CONFIG",
    ] {
        cmd.env_remove(k);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_below_the_required_durability_refuses_to_start() {
    let refusal = "zerodrop: the store's durability level is os_buffered (SQLite PRAGMA \
                   synchronous=NORMAL, set by --sqlite-synchronous), below --require-durability \
                   fsync: set --sqlite-synchronous full (ZERODROP_SQLITE_SYNCHRONOUS=full)";
    let (code, stderr) = serve_refused(
        &[
            "--sqlite-synchronous",
            "normal",
            "--require-durability",
            "fsync",
        ],
        &[],
    );
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.lines().any(|l| l == refusal), "{stderr}");
    assert!(!stderr.contains("listening"), "{stderr}");
    // The same from the environment.
    let (code, stderr) = serve_refused(
        &[],
        &[
            ("ZERODROP_SQLITE_SYNCHRONOUS", "normal"),
            ("ZERODROP_REQUIRE_DURABILITY", "replicated"),
        ],
    );
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("below --require-durability replicated"),
        "{stderr}"
    );
    // A value that is not a level is a configuration error, whichever way it comes.
    let (code, stderr) = serve_refused(&["--require-durability", "os_buffered"], &[]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("invalid value 'os_buffered' for '--require-durability"),
        "{stderr}"
    );
    let (code, stderr) = serve_refused(&[], &[("ZERODROP_REQUIRE_DURABILITY", "always")]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("--require-durability"), "{stderr}");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("zerodrop.toml");
    std::fs::write(&file, "require_durability = \"sometimes\"\n").unwrap();
    let (code, stderr) = serve_refused(&["--config", file.to_str().unwrap()], &[]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("invalid config file") && stderr.contains("require_durability"),
        "{stderr}"
    );

    // Without the requirement it starts, with one warning that names the level and the way up.
    let p = spawn(
        &dir.path().join("weak"),
        &["--sqlite-synchronous", "normal"],
        &[],
    );
    let warnings: Vec<Value> = p
        .logs()
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("a 201 is not fsync- or replica-durable"))
        })
        .collect();
    assert_eq!(warnings.len(), 1, "{:?}", p.logs());
    let w = &warnings[0];
    assert_eq!(
        (&w["level"], &w["durability"], &w["setting"], &w["raise"]),
        (
            &json!("WARN"),
            &json!("os_buffered"),
            &json!("SQLite PRAGMA synchronous=NORMAL, set by --sqlite-synchronous"),
            &json!("set --sqlite-synchronous full (ZERODROP_SQLITE_SYNCHRONOUS=full)")
        )
    );
    let h = p.api().get("/health", None).await.json;
    assert_eq!(h["store"]["durability"], "os_buffered");
    assert_eq!(p.api().get("/health/ready", None).await.status, 200);
}
