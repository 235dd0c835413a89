//! Several real zerodrop processes on one real `redis-server`: fan-out across instances,
//! resumes on another instance over every transport, rolling restarts and crashes under
//! publish load, and Redis outages with and without its data.
//!
//! Every wait is bounded; every process is killed on drop.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::watch;
use zerodrop_testkit::cluster::Cluster;
use zerodrop_testkit::http::Api;
use zerodrop_testkit::redis::RedisServer;
use zerodrop_testkit::roam::{Publisher, SseRoamer, Tally, WsRoamer, verify_log};
use zerodrop_testkit::sse::SseClient;
use zerodrop_testkit::ws::WsClient;

const BIN: &str = env!("CARGO_BIN_EXE_zerodrop");

fn bin() -> &'static Path {
    Path::new(BIN)
}

/// Polls `f` every 50 ms until it holds, at most `limit`.
async fn eventually<F, Fut>(what: &str, limit: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let until = Instant::now() + limit;
    while !f().await {
        assert!(Instant::now() < until, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn seqs(events: &[Value]) -> Vec<u64> {
    events.iter().map(|e| e["seq"].as_u64().unwrap()).collect()
}

async fn ws(url: &str) -> WsClient {
    WsClient::connect(url).await.expect("websocket connects")
}

/// The JSON metrics' `dropped_messages`.
async fn dropped(api: &Api) -> u64 {
    api.metrics_json().await["ws_metrics"]["dropped_messages"]
        .as_u64()
        .expect("dropped_messages")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_fan_out_and_resume_each_others_sessions() {
    let c = Cluster::start(bin(), 3, &[]).expect("cluster starts");
    let apis: Vec<Api> = (0..3).map(|i| c.api(i)).collect();
    let tok = c.token("u1", &["fan:*", "res:*"]);

    // Every instance answers with its own name; the admin API wants the admin token.
    for (i, api) in apis.iter().enumerate() {
        let h = api.get("/health", None).await;
        assert_eq!(h.json["instance"], format!("node-{i}"));
        // A Redis without persistence: every instance reads and reports it.
        assert_eq!(
            (
                &h.json["store"]["kind"],
                &h.json["store"]["up"],
                &h.json["store"]["durability"]
            ),
            (&json!("redis"), &json!(true), &json!("memory"))
        );
        assert_eq!(
            h.headers["x-zerodrop-instance"].to_str().unwrap(),
            format!("node-{i}")
        );
        let r = api.get("/admin/drain/status", None).await;
        assert_eq!((r.status, r.code()), (401, "UNAUTHORIZED"));
        assert_eq!(
            r.headers["x-zerodrop-instance"].to_str().unwrap(),
            format!("node-{i}")
        );
        let r = api
            .get("/admin/drain/status", Some("not-the-admin-token-at-all"))
            .await;
        assert_eq!(r.status, 401);
        let r = api
            .post("/admin/drain/start", Some(&c.creds.api_key), json!({}))
            .await;
        assert_eq!(r.status, 401, "the api key is not the admin token");
        let r = api
            .get("/admin/drain/status", Some(&c.creds.admin_token))
            .await;
        assert_eq!((r.status, r.json["state"].as_str()), (200, Some("active")));
    }

    // A WebSocket and an SSE subscriber on every instance; publishes on every instance.
    let mut wss = Vec::new();
    let mut sses = Vec::new();
    for i in 0..3 {
        let mut w = ws(&format!("{}/v1/ws?token={tok}", c.ws_url(i))).await;
        assert_eq!(w.expect("welcome").await["instance"], format!("node-{i}"));
        w.send(json!({"type":"subscribe","stream":"fan:1","after":0}))
            .await;
        w.expect("subscribed").await;
        wss.push(w);
        let url = format!("{}/v1/streams/fan:1/sse?token={tok}&after=0", c.url(i));
        sses.push(SseClient::connect(&url, &[]).await.expect("sse opens"));
    }
    for round in 0..3 {
        for (i, api) in apis.iter().enumerate() {
            api.publish("fan:1", json!({"from": i, "round": round}))
                .await;
        }
    }
    for w in &mut wss {
        let evs = w.events(9).await;
        assert_eq!(seqs(&evs), (1..=9).collect::<Vec<_>>());
        assert_eq!(evs[4]["data"], json!({"from": 1, "round": 1}));
    }
    for s in &mut sses {
        let evs = s.events(9).await;
        let got: Vec<u64> = evs
            .iter()
            .map(|e| e.json()["seq"].as_u64().unwrap())
            .collect();
        assert_eq!(got, (1..=9).collect::<Vec<_>>());
    }

    // A session opened on node-0 (WebSocket) resumes on node-1 with exactly what it missed.
    let mut a = ws(&format!("{}/v1/ws?token={tok}", c.ws_url(0))).await;
    let welcome = a.expect("welcome").await;
    let sid = welcome["sessionId"].as_str().unwrap().to_string();
    a.send(json!({"type":"subscribe","stream":"res:1"})).await;
    a.expect("subscribed").await;
    for k in 1..=3 {
        apis[2].publish("res:1", json!(k)).await;
    }
    assert_eq!(seqs(&a.events(3).await), vec![1, 2, 3]);
    a.abort(); // the network drops
    for k in 4..=6 {
        apis[2].publish("res:1", json!(k)).await;
    }
    let mut b = ws(&format!("{}/v1/ws", c.ws_url(1))).await;
    b.send(
        json!({"type":"resume","resumeToken": welcome["resumeToken"],
                  "lastAck": {"res:1": 3}}),
    )
    .await;
    let wb = b.expect("welcome").await;
    assert_eq!(
        (wb["sessionId"].as_str(), wb["instance"].as_str()),
        (Some(sid.as_str()), Some("node-1"))
    );
    let sub = b.expect("subscribed").await;
    assert_eq!(
        (sub["stream"].as_str(), sub["fromSeq"].as_u64()),
        (Some("res:1"), Some(4))
    );
    assert_eq!(seqs(&b.events(3).await), vec![4, 5, 6]);
    apis[0].publish("res:1", json!(7)).await; // published on another instance: live on B
    assert_eq!(seqs(&b.events(1).await), vec![7]);
    // A socket's resume stores a higher lastAck in the background: wait (bounded) until the
    // store holds it. A checkpoint at 0 is always ignored and reports the stored ack.
    let ck = format!("/v1/sessions/{sid}/checkpoint");
    let token = wb["resumeToken"].as_str().unwrap().to_string();
    let mut stored = None;
    for _ in 0..100 {
        let r = apis[2]
            .post(&ck, Some(&token), json!({"stream": "res:1", "seq": 0}))
            .await;
        assert_eq!(r.json["ackUpdate"], "ignored", "{}", r.text);
        stored = r.json["lastAckSequence"].as_u64();
        if stored == Some(3) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(stored, Some(3), "the resume's lastAck reached the store");

    // The same session resumed on node-2 while node-1 still holds it: node-1's socket is
    // told and closed (a holder notice through Redis), the new one goes on.
    let mut c2 = ws(&format!(
        "{}/v1/ws?resume={}",
        c.ws_url(2),
        wb["resumeToken"].as_str().unwrap()
    ))
    .await;
    let wc = c2.expect("welcome").await;
    assert_eq!(wc["instance"], "node-2");
    let f = b.recv().await;
    assert_eq!(
        (f["type"].as_str(), f["code"].as_str()),
        (Some("error"), Some("SESSION_TAKEN_OVER")),
        "{f}"
    );
    assert_eq!(b.expect_close().await, Some(4409));
    // `?resume=` starts after the stored ack (3: node-1 got no ack for 4..7).
    assert_eq!(c2.expect("subscribed").await["fromSeq"], 4);
    assert_eq!(seqs(&c2.events(4).await), vec![4, 5, 6, 7]);
    c2.expect_silence(Duration::from_millis(300)).await;
    let rt = wc["resumeToken"].as_str().unwrap().to_string();
    c2.close().await;

    // HTTP checkpoint on node-0, then SSE `?resume=` on node-0 starts after it.
    let r = apis[0]
        .post(
            &format!("/v1/sessions/{sid}/checkpoint"),
            Some(&rt),
            json!({"stream":"res:1","seq":5}),
        )
        .await;
    assert_eq!(r.json, json!({"ackUpdate":"applied","lastAckSequence":5}));
    let mut s0 = SseClient::connect(
        &format!("{}/v1/streams/res:1/sse?resume={rt}", c.url(0)),
        &[],
    )
    .await
    .expect("sse resumes on node-0");
    let evs = s0.events(2).await;
    assert_eq!(
        evs.iter()
            .map(|e| e.json()["seq"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        vec![6, 7]
    );
    let epoch = evs[0].json()["epoch"].as_str().unwrap().to_string();

    // SSE with `Last-Event-ID` (what a browser sends after a drop) on node-1.
    apis[1].publish("res:1", json!(8)).await;
    assert_eq!(
        s0.events(1).await[0].id.as_deref(),
        Some(format!("{epoch}:8").as_str())
    );
    let last_id = format!("{epoch}:6");
    let mut s1 = SseClient::connect(
        &format!("{}/v1/streams/res:1/sse?token={tok}", c.url(1)),
        &[("last-event-id", &last_id)],
    )
    .await
    .expect("sse resumes on node-1");
    let evs = s1.events(2).await;
    assert_eq!(
        evs.iter()
            .map(|e| e.json()["seq"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        vec![7, 8]
    );

    // HTTP reconnect on node-2: the window after the stored ack (5).
    let r = apis[2]
        .post(
            &format!("/v1/sessions/{sid}/reconnect"),
            None,
            json!({"resumeToken": rt}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let w = &r.json["replay"]["res:1"];
    assert_eq!(
        (
            w["fromSeq"].as_u64(),
            w["toSeq"].as_u64(),
            w["complete"].as_bool()
        ),
        (Some(6), Some(8), Some(true))
    );
    assert_eq!(seqs(w["events"].as_array().unwrap()), vec![6, 7, 8]);

    // Sessions opened over HTTP on one instance resume on another as well.
    let sess = apis[1]
        .post("/v1/sessions", Some(&tok), json!({"streams":["res:1"]}))
        .await;
    assert_eq!(
        (sess.status, sess.json["instance"].as_str()),
        (201, Some("node-1"))
    );
    apis[1].publish("res:1", json!(9)).await;
    let r = apis[0]
        .post(
            &format!(
                "/v1/sessions/{}/reconnect",
                sess.json["sessionId"].as_str().unwrap()
            ),
            None,
            json!({"resumeToken": sess.json["resumeToken"]}),
        )
        .await;
    assert_eq!(
        seqs(r.json["replay"]["res:1"]["events"].as_array().unwrap()),
        vec![9]
    );

    for api in &apis {
        assert_eq!(dropped(api).await, 0);
    }
}

/// Spawns `ws` WebSocket roamers (two streams each) and `sse` SSE roamers, spread over the
/// instances, all subscribed from seq 0.
fn spawn_clients(
    c: &Cluster,
    streams: &[String],
    ws: usize,
    sse: usize,
    finish: &zerodrop_testkit::roam::Finish,
) -> Vec<tokio::task::JoinHandle<Tally>> {
    // One subject per roamer: together they are more sessions than one subject may hold
    // (`--max-sessions-per-subject`, which a deployment may set as low as 100).
    let tok = |k: usize| c.token(&format!("roamer-{k}"), &["load:*"]);
    let n = streams.len();
    let deadline = Duration::from_secs(120);
    let mut out = Vec::new();
    for k in 0..ws {
        let r = WsRoamer {
            name: format!("ws-{k}"),
            urls: c.ws_urls(),
            start: k % c.len(),
            token: tok(k),
            streams: vec![streams[k % n].clone(), streams[(k + 1) % n].clone()],
            ack_every: 25,
            deadline,
        };
        out.push(r.spawn(finish.clone()));
    }
    for k in 0..sse {
        let r = SseRoamer {
            name: format!("sse-{k}"),
            urls: c.urls(),
            start: k % c.len(),
            token: tok(ws + k),
            stream: streams[k % n].clone(),
            deadline,
        };
        out.push(r.spawn(finish.clone()));
    }
    out
}

/// WebSocket + SSE connections open on instance `i`.
async fn connections(api: &Api) -> u64 {
    let m = api.metrics_json().await;
    m["ws_metrics"]["ws_active"].as_u64().unwrap_or(0)
        + m["ws_metrics"]["sse_active"].as_u64().unwrap_or(0)
}

/// Stops publishing, checks the log of every stream against what was acknowledged, lets the
/// clients catch up to the heads and checks every client saw every seq exactly once, in
/// order. Returns the tallies.
async fn settle(
    apis: &[Api],
    streams: &[String],
    stop: watch::Sender<bool>,
    publisher: tokio::task::JoinHandle<zerodrop_testkit::roam::Published>,
    finish: watch::Sender<Option<Arc<BTreeMap<String, u64>>>>,
    clients: Vec<tokio::task::JoinHandle<Tally>>,
) -> Vec<Tally> {
    stop.send_replace(true);
    let published = publisher.await.expect("publisher");
    assert!(
        published.failures.is_empty(),
        "unpublished: {:?}",
        published.failures
    );
    let mut heads = BTreeMap::new();
    for s in streams {
        let acked = published.acked.get(s).cloned().unwrap_or_default();
        let head = verify_log(&apis[0], s, &acked)
            .await
            .expect("the log holds every acknowledged event");
        assert!(head > 0, "{s} was published to");
        heads.insert(s.clone(), head);
    }
    finish.send_replace(Some(Arc::new(heads.clone())));
    let mut tallies = Vec::new();
    for h in clients {
        let t = tokio::time::timeout(Duration::from_secs(60), h)
            .await
            .expect("clients finish")
            .expect("client task");
        tallies.push(t);
    }
    let failed: Vec<String> = tallies
        .iter()
        .filter_map(|t| t.check(&heads).err())
        .collect();
    let dup: u64 = tallies.iter().map(|t| t.duplicates).sum();
    let moved: u32 = tallies.iter().map(|t| t.resumed).sum();
    let refused: u32 = tallies.iter().map(|t| t.refused).sum();
    let mut ms: Vec<u64> = tallies
        .iter()
        .flat_map(|t| t.reconnect_ms.iter().copied())
        .collect();
    ms.sort_unstable();
    println!(
        "{} clients, {} events published ({} retried), heads {heads:?}; {moved} resumes \
         (reconnect p50 {} ms, max {} ms), {refused} refused attempts, {dup} duplicates dropped \
         by the clients, {} clients failed",
        tallies.len(),
        published.count(),
        published.retries,
        ms.get(ms.len() / 2).copied().unwrap_or(0),
        ms.last().copied().unwrap_or(0),
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "{} clients failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert_eq!(tallies.iter().map(|t| t.failed_resumes).sum::<u32>(), 0);
    tallies
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_of_two_instances_under_load_drops_nothing() {
    let mut c = Cluster::start(bin(), 2, &["--drain-grace-sec", "4"]).expect("cluster starts");
    let apis: Vec<Api> = (0..2).map(|i| c.api(i)).collect();
    let admin = c.creds.admin_token.clone();
    let streams: Vec<String> = (0..4).map(|i| format!("load:roll{i}")).collect();
    let (finish_tx, finish) = watch::channel(None);
    let clients = spawn_clients(&c, &streams, 160, 60, &finish);
    eventually(
        "220 clients are connected",
        Duration::from_secs(30),
        || async { connections(&apis[0]).await + connections(&apis[1]).await == 220 },
    )
    .await;
    let (stop_tx, stop) = watch::channel(false);
    let publisher = Publisher {
        apis: apis.clone(),
        streams: streams.clone(),
        every: Duration::from_millis(8),
        attempts: 200,
    }
    .spawn(stop);
    tokio::time::sleep(Duration::from_secs(1)).await;

    // node-0: drained through the admin API, then restarted.
    let drain_started = Instant::now();
    let r = apis[0]
        .post(
            "/admin/drain/start",
            Some(&admin),
            json!({"reason":"rolling_deployment","max_session_age_seconds":3}),
        )
        .await;
    assert_eq!(
        (
            r.status,
            r.json["state"].as_str(),
            r.json["reason"].as_str()
        ),
        (200, Some("draining"), Some("rolling_deployment")),
        "{}",
        r.text
    );
    let at_start = r.json["sessionsRemaining"].as_u64().unwrap();
    assert!(at_start > 50, "node-0 held its clients: {at_start}");
    let ready = apis[0].get("/health/ready", None).await;
    assert_eq!(ready.status, 503);
    assert_eq!(ready.json["reasons"], json!(["draining"]));
    let tok = c.token("late", &["load:*"]);
    let refused = WsClient::connect(&format!("{}/v1/ws?token={tok}", c.ws_url(0)))
        .await
        .err()
        .expect("no new WebSocket while draining");
    assert_eq!(
        (refused.status, refused.json()["error"]["code"].as_str()),
        (503, Some("DRAINING"))
    );
    let sse = apis[0]
        .get(&format!("/v1/streams/load:roll0/sse?token={tok}"), None)
        .await;
    assert_eq!((sse.status, sse.code()), (503, "DRAINING"));
    assert!(sse.headers.contains_key("retry-after"));
    // Progress, until no session remains.
    let mut seen = vec![at_start];
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let s = apis[0].get("/admin/drain/status", Some(&admin)).await.json;
        seen.push(s["sessionsRemaining"].as_u64().unwrap_or(u64::MAX));
        if s["state"] == "drained" {
            break;
        }
        assert!(Instant::now() < until, "node-0 drains in time: {seen:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        seen.iter().any(|n| *n > 0 && *n < at_start),
        "sessionsRemaining went down gradually: {seen:?}"
    );
    let s = apis[0]
        .post("/admin/drain/complete", Some(&admin), json!({}))
        .await;
    assert_eq!(
        (
            s.status,
            s.json["state"].as_str(),
            s.json["sessionsRemaining"].as_u64()
        ),
        (200, Some("drained"), Some(0))
    );
    let blocked = s.json["upgradesBlocked"].as_u64().unwrap();
    assert!(blocked >= 2, "refused upgrades are counted: {blocked}");
    let m = apis[0].metrics_json().await;
    assert_eq!(
        m["ws_metrics"]["ws_upgrades_blocked_during_drain"].as_u64(),
        Some(blocked)
    );
    assert_eq!(dropped(&apis[0]).await, 0);
    let (status, _) = tokio::task::block_in_place(|| c.terminate(0, Duration::from_secs(20)))
        .expect("node-0 stops");
    assert_eq!(status.code(), Some(0));
    tokio::task::block_in_place(|| c.spawn_node(0)).expect("node-0 restarts");
    tokio::time::sleep(Duration::from_secs(1)).await;

    // node-1: SIGTERM drains it over --drain-grace-sec, then it exits 0; then it restarts.
    assert_eq!(dropped(&apis[1]).await, 0);
    let second_drain = Instant::now();
    c.signal_term(1);
    eventually(
        "node-1 reports draining",
        Duration::from_secs(3),
        || async {
            let url = format!("{}/health/ready", apis[1].base);
            let r = apis[1].client.get(url).send().await;
            r.is_ok_and(|r| r.status().as_u16() == 503)
        },
    )
    .await;
    let (status, logs) =
        tokio::task::block_in_place(|| c.reap(1, Duration::from_secs(20))).expect("node-1 stops");
    assert_eq!(status.code(), Some(0));
    assert!(logs.iter().any(|l| l.contains("drain started")));
    tokio::task::block_in_place(|| c.spawn_node(1)).expect("node-1 restarts");
    tokio::time::sleep(Duration::from_secs(1)).await;

    let tallies = settle(&apis, &streams, stop_tx, publisher, finish_tx, clients).await;
    for t in &tallies {
        assert!(t.told_to_move >= 1, "{} was drained at least once", t.name);
    }
    // node-0's clients were told to move over the 3 s it was given, not all at once: when
    // each got its `reconnect` frame (or its SSE response ended), from the drain's start.
    let mut told: Vec<u64> = tallies
        .iter()
        .flat_map(|t| t.told_at.iter())
        .filter(|at| **at >= drain_started && **at < second_drain)
        .map(|at| at.duration_since(drain_started).as_millis() as u64)
        .collect();
    told.sort_unstable();
    assert!(
        told.len() as u64 >= at_start * 9 / 10,
        "{} of node-0's {at_start} clients were told to move",
        told.len()
    );
    let pct = |p: usize| told[(told.len() - 1) * p / 100];
    println!(
        "node-0 drain: reconnects told at p0 {} ms, p25 {} ms, p75 {} ms, p100 {} ms",
        pct(0),
        pct(25),
        pct(75),
        pct(100)
    );
    assert!(
        pct(100) - pct(0) >= 1_500 && pct(75) - pct(25) >= 750,
        "reconnects spread over most of max_session_age_seconds (3 s): {told:?}"
    );
    for api in &apis {
        assert_eq!(dropped(api).await, 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_one_instance_under_load_loses_nothing() {
    let mut c = Cluster::start(bin(), 2, &[]).expect("cluster starts");
    let apis: Vec<Api> = (0..2).map(|i| c.api(i)).collect();
    let streams: Vec<String> = (0..3).map(|i| format!("load:crash{i}")).collect();
    let (finish_tx, finish) = watch::channel(None);
    let clients = spawn_clients(&c, &streams, 60, 20, &finish);
    eventually(
        "80 clients are connected",
        Duration::from_secs(30),
        || async { connections(&apis[0]).await + connections(&apis[1]).await == 80 },
    )
    .await;
    let (stop_tx, stop) = watch::channel(false);
    let publisher = Publisher {
        apis: apis.clone(),
        streams: streams.clone(),
        every: Duration::from_millis(5),
        attempts: 200,
    }
    .spawn(stop);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    c.kill9(0);
    eventually(
        "every client is on node-1",
        Duration::from_secs(20),
        || async { connections(&apis[1]).await == 80 },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let tallies = settle(&apis[1..], &streams, stop_tx, publisher, finish_tx, clients).await;
    let moved = tallies.iter().filter(|t| t.lost > 0).count();
    assert_eq!(
        moved, 40,
        "the clients of node-0 lost their connection and resumed"
    );
    assert_eq!(dropped(&apis[1]).await, 0);
}

/// Log lines of instance `i` whose message contains `needle`.
fn log_count(c: &Cluster, i: usize, needle: &str) -> usize {
    c.logs(i)
        .iter()
        .filter(|l| {
            serde_json::from_str::<Value>(l)
                .ok()
                .and_then(|v| v["message"].as_str().map(|m| m.contains(needle)))
                .unwrap_or(false)
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outages_with_and_without_data() {
    let redis = RedisServer::start_durable().expect("redis-server starts");
    let mut c = Cluster::start_on(bin(), redis, 2, &[]).expect("cluster starts");
    let apis: Vec<Api> = (0..2).map(|i| c.api(i)).collect();
    let tok = c.token("u1", &["out:*"]);
    let mut w = ws(&format!("{}/v1/ws?token={tok}", c.ws_url(0))).await;
    let welcome = w.expect("welcome").await;
    w.send(json!({"type":"subscribe","stream":"out:1","after":0}))
        .await;
    w.expect("subscribed").await;
    let mut s = SseClient::connect(
        &format!("{}/v1/streams/out:1/sse?token={tok}&after=0", c.url(1)),
        &[],
    )
    .await
    .expect("sse opens");
    let sess = apis[1]
        .post("/v1/sessions", Some(&tok), json!({"streams":["out:1"]}))
        .await
        .json;
    let mut epoch = String::new();
    for k in 1..=3 {
        epoch = apis[k % 2].publish("out:1", json!(k)).await["epoch"]
            .as_str()
            .unwrap()
            .to_string();
    }
    assert_eq!(seqs(&w.events(3).await), vec![1, 2, 3]);
    assert_eq!(s.events(3).await.len(), 3);

    // Redis stops for a few seconds (its data is on disk).
    c.redis.stop().expect("redis stops");
    let down_at = Instant::now();
    for api in &apis {
        eventually(
            "readiness reports the store",
            Duration::from_secs(5),
            || async {
                let r = api.get("/health/ready", None).await;
                r.status == 503 && r.json["reasons"] == json!(["store_unavailable"])
            },
        )
        .await;
        let r = api.try_publish("out:1", json!("lost?")).await;
        assert_eq!(
            (r.status, r.code()),
            (503, "STORE_UNAVAILABLE"),
            "{}",
            r.text
        );
        assert!(r.headers.contains_key("retry-after"));
        let h = api.get("/health", None).await.json;
        assert_eq!(
            (h["status"].as_str(), &h["store"]["up"]),
            (Some("degraded"), &json!(false))
        );
        let text = api.get("/metrics", None).await.text;
        assert!(
            text.lines().any(|l| l == "zerodrop_store_up 0"),
            "store_up is 0"
        );
    }
    // Connected clients stay connected.
    w.send(json!({"type":"ping","t":7})).await;
    assert_eq!(w.expect("pong").await["t"], 7);
    assert!(matches!(
        s.read(Duration::from_millis(300)).await,
        zerodrop_testkit::sse::SseRead::Timeout
    ));
    tokio::time::sleep(Duration::from_secs(3).saturating_sub(down_at.elapsed())).await;
    c.redis.start_again().expect("redis starts again");
    for api in &apis {
        eventually("ready again", Duration::from_secs(10), || async {
            api.get("/health/ready", None).await.status == 200
        })
        .await;
    }
    // Nothing was stored while it was down; the log goes on in the same epoch.
    let r = apis[0].publish("out:1", json!(4)).await;
    assert_eq!(
        (r["seq"].as_u64(), r["epoch"].as_str()),
        (Some(4), Some(epoch.as_str()))
    );
    assert_eq!(seqs(&w.events(1).await), vec![4]);
    assert_eq!(s.events(1).await[0].json()["seq"], 4);
    for i in 0..2 {
        assert_eq!(
            log_count(&c, i, "store unreachable"),
            1,
            "node-{i}: logged once"
        );
        assert_eq!(log_count(&c, i, "store reachable again"), 1, "node-{i}");
        assert_eq!(log_count(&c, i, "redis refused a command"), 0, "node-{i}");
    }

    // Redis comes back empty: sessions are gone, streams start a new epoch, and connected
    // clients are told.
    c.redis.restart_empty().expect("redis restarts empty");
    let f = w.recv().await;
    assert_eq!(
        (f["type"].as_str(), f["code"].as_str(), f["stream"].as_str()),
        (Some("error"), Some("EPOCH_CHANGED"), Some("out:1")),
        "{f}"
    );
    let new_epoch = f["epoch"].as_str().unwrap().to_string();
    assert_ne!(new_epoch, epoch);
    // A hole under a live cursor carries the facts of every other hole: the new epoch, the
    // oldest retained event and the head (an empty log: 1 and 0).
    assert_eq!(
        (f["firstAvailableSeq"].as_u64(), f["headSeq"].as_u64()),
        (Some(1), Some(0)),
        "{f}"
    );
    let reset = s.next().await;
    assert_eq!(reset.event, "reset", "{reset:?}");
    assert_eq!(
        reset.json(),
        json!({"code":"EPOCH_CHANGED","epoch":new_epoch,"firstAvailableSeq":1,"headSeq":0})
    );
    assert_eq!(reset.id.as_deref(), Some(format!("{new_epoch}:0").as_str()));
    // Its session is gone: resubscribing closes the socket with SESSION_NOT_FOUND.
    w.send(json!({"type":"subscribe","stream":"out:1","after":0}))
        .await;
    let f = w.recv().await;
    assert_eq!(f["code"], "SESSION_NOT_FOUND", "{f}");
    assert_eq!(w.expect_close().await, Some(4404));
    for api in &apis {
        eventually(
            "ready after the empty restart",
            Duration::from_secs(10),
            || async { api.get("/health/ready", None).await.status == 200 },
        )
        .await;
    }
    let r = apis[0]
        .post(
            &format!(
                "/v1/sessions/{}/reconnect",
                sess["sessionId"].as_str().unwrap()
            ),
            None,
            json!({"resumeToken": sess["resumeToken"]}),
        )
        .await;
    assert_eq!((r.status, r.code()), (404, "SESSION_NOT_FOUND"));
    let mut again = ws(&format!(
        "{}/v1/ws?resume={}",
        c.ws_url(1),
        welcome["resumeToken"].as_str().unwrap()
    ))
    .await;
    assert_eq!(again.expect("error").await["code"], "SESSION_NOT_FOUND");
    assert_eq!(again.expect_close().await, Some(4404));
    let r = apis[1].publish("out:1", json!("new")).await;
    assert_eq!(
        (r["seq"].as_u64(), r["epoch"].as_str()),
        (Some(1), Some(new_epoch.as_str()))
    );
    let e = s.events(1).await;
    assert_eq!(e[0].id.as_deref(), Some(format!("{new_epoch}:1").as_str()));
    for api in &apis {
        assert_eq!(dropped(api).await, 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_in_redis_is_bounded_and_trimmed_windows_are_typed_on_any_instance() {
    let window_ms: i64 = 600_000;
    let c = Cluster::start(
        bin(),
        2,
        &[
            "--retention-max-events",
            "5",
            "--reconnect-window-sec",
            "600",
        ],
    )
    .expect("cluster starts");
    let apis: Vec<Api> = (0..2).map(|i| c.api(i)).collect();
    let tok = c.token("u1", &["trim:*"]);
    let sess = apis[0]
        .post("/v1/sessions", Some(&tok), json!({"streams":["trim:1"]}))
        .await
        .json;
    let sid = sess["sessionId"].as_str().unwrap().to_string();
    for k in 1..=8 {
        apis[k % 2].publish("trim:1", json!(k)).await;
    }
    // The log keeps 5 events, in Redis too; the session expires with its reconnect window.
    let info = apis[1].info("trim:1").await;
    assert_eq!(
        (
            info["headSeq"].as_u64(),
            info["firstSeq"].as_u64(),
            info["count"].as_u64()
        ),
        (Some(8), Some(4), Some(5))
    );
    assert_eq!(c.redis.cmd(&["XLEN", "zd:{trim:1}:l"]).unwrap(), ":5");
    let ttl = c.redis.cmd(&["PTTL", &format!("zd:s:{{{sid}}}")]).unwrap();
    let ttl: i64 = ttl.trim_start_matches(':').parse().unwrap();
    assert!(
        ttl > window_ms - 30_000 && ttl <= window_ms,
        "a session's TTL in Redis is its reconnect window ({window_ms} ms): {ttl}"
    );
    // A resume on the other instance gets the same typed error as on SQLite.
    let r = apis[1]
        .post(
            &format!("/v1/sessions/{sid}/reconnect"),
            None,
            json!({"resumeToken": sess["resumeToken"]}),
        )
        .await;
    assert_eq!(r.status, 200);
    let e = &r.json["replay"]["trim:1"]["error"];
    assert_eq!(
        (e["code"].as_str(), e["firstAvailableSeq"].as_u64()),
        (Some("REPLAY_WINDOW_TRIMMED"), Some(4)),
        "{}",
        r.text
    );
    assert_eq!(
        dropped(&apis[1]).await,
        3,
        "the trimmed events are counted once"
    );
    let r = apis[0].read("trim:1", 0, 10).await;
    assert_eq!((r.status, r.code()), (409, "REPLAY_WINDOW_TRIMMED"));
}

/// What one drained client saw, in order: frames up to and including the socket's end.
#[derive(Debug)]
struct DrainedClient {
    /// Events received (each acked at once, so acks are in flight when the drain comes).
    events: u64,
    /// The `reconnect` frame's resume token, if one arrived.
    reconnect_token: Option<String>,
    /// Frames that arrived after `reconnect` (there must be none).
    after_reconnect: Vec<String>,
    /// The close code; `None` for a connection that broke without a close frame.
    close: Option<u16>,
}

/// A client that subscribes, then stalls for `stall` (a phone in the background, a busy
/// event loop): it reads nothing but keeps sending acks. Then it reads until its socket ends,
/// acking every event and answering pings.
async fn drained_client(
    url: String,
    stream: String,
    stall: Duration,
    limit: Duration,
) -> DrainedClient {
    let mut ws = ws(&url).await;
    ws.expect("welcome").await;
    ws.send(json!({"type":"subscribe","stream":stream,"after":0}))
        .await;
    let mut out = DrainedClient {
        events: 0,
        reconnect_token: None,
        after_reconnect: Vec::new(),
        close: None,
    };
    let stalled = tokio::time::Instant::now() + stall;
    while tokio::time::Instant::now() < stalled {
        ws.try_send(json!({"type":"ack","stream":stream,"seq":0}))
            .await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let until = tokio::time::Instant::now() + limit;
    loop {
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            out.after_reconnect
                .push("no close before the deadline".into());
            return out;
        }
        match ws.next_within(left).await {
            zerodrop_testkit::ws::Next::Frame(f) => {
                if out.reconnect_token.is_some() {
                    out.after_reconnect.push(f.to_string());
                    continue;
                }
                match f["type"].as_str().unwrap_or("") {
                    "event" => {
                        out.events += 1;
                        let ack = json!({"type":"ack","stream":f["stream"],"seq":f["seq"]});
                        ws.try_send(ack).await;
                    }
                    "ping" => {
                        ws.try_send(json!({"type":"pong","t":f["t"]})).await;
                    }
                    "reconnect" => {
                        out.reconnect_token = f["resumeToken"].as_str().map(String::from);
                    }
                    _ => {}
                }
            }
            zerodrop_testkit::ws::Next::Closed(code) => {
                out.close = code;
                return out;
            }
            zerodrop_testkit::ws::Next::Timeout => {}
        }
    }
}

/// SPEC §5: a drained socket is closed with 1012 only once its `reconnect` frame is flushed.
/// Clients stall while the drain starts (their sockets fill up) and keep acking, and busy
/// threads load both cores: when the server closes a socket, frames from the client are still
/// unread and frames to it are still queued. A socket closed with unread input is reset by the
/// kernel, which throws away what was queued for the client — its `reconnect` frame included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_on_a_busy_machine_hands_every_client_its_reconnect_frame_before_1012() {
    let c = Cluster::start(bin(), 2, &[]).expect("cluster starts");
    let apis: Vec<Api> = (0..2).map(|i| c.api(i)).collect();
    let tok = c.token("busy", &["busy:*"]);
    let clients: Vec<_> = (0..50)
        .map(|i| {
            let url = format!("{}/v1/ws?token={tok}", c.ws_url(0));
            tokio::spawn(drained_client(
                url,
                format!("busy:{}", i % 5),
                Duration::from_secs(4),
                Duration::from_secs(60),
            ))
        })
        .collect();
    eventually(
        "50 clients are connected",
        Duration::from_secs(30),
        || async { connections(&apis[0]).await == 50 },
    )
    .await;
    // 60 KiB events, as fast as one publisher goes.
    let blob = "x".repeat(60 * 1024);
    let publisher = {
        let api = apis[1].clone();
        tokio::spawn(async move {
            let mut n = 0u64;
            let until = Instant::now() + Duration::from_secs(8);
            while Instant::now() < until {
                api.publish(&format!("busy:{}", n % 5), json!({"n": n, "blob": blob}))
                    .await;
                n += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            n
        })
    };
    let hog = zerodrop_testkit::hog::CpuHog::start(4, Duration::from_secs(60));
    eventually(
        "every stream has events queued for its clients",
        Duration::from_secs(20),
        || async {
            for i in 0..5 {
                let r = apis[1]
                    .get(&format!("/v1/streams/busy:{i}"), Some(&c.creds.api_key))
                    .await;
                if r.json["headSeq"].as_u64().unwrap_or(0) < 3 {
                    return false;
                }
            }
            true
        },
    )
    .await;
    let r = apis[0]
        .post(
            "/admin/drain/start",
            Some(&c.creds.admin_token),
            json!({"reason":"rolling_deployment","max_session_age_seconds":3}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let mut seen = Vec::new();
    for h in clients {
        seen.push(h.await.expect("client task"));
    }
    drop(hog);
    let published = publisher.await.expect("publisher");
    let bad: Vec<&DrainedClient> = seen
        .iter()
        .filter(|d| {
            d.reconnect_token.is_none() || d.close != Some(1012) || !d.after_reconnect.is_empty()
        })
        .collect();
    println!(
        "{} events published; {} clients received {} events; {} without reconnect-then-1012",
        published,
        seen.len(),
        seen.iter().map(|d| d.events).sum::<u64>(),
        bad.len()
    );
    assert!(
        bad.is_empty(),
        "every client gets `reconnect` (with a resume token) and then close 1012: {bad:?}"
    );
    assert!(
        seen.iter().all(|d| d.events > 0),
        "acks were in flight during the drain"
    );
    // The token in the frame is fresh and takes the session over on the other instance.
    let token = seen[0].reconnect_token.clone().unwrap_or_default();
    let mut moved = ws(&format!("{}/v1/ws", c.ws_url(1))).await;
    moved
        .send(json!({"type":"resume","resumeToken":token}))
        .await;
    assert_eq!(moved.expect("welcome").await["instance"], "node-1");
    assert_eq!(moved.expect("subscribed").await["stream"], "busy:0");
    assert_eq!(dropped(&apis[0]).await, 0);
}

/// A revocation made on instance 0 closes the subject's sockets and SSE streams on instance 1
/// (polled from Redis every 250 ms) and refuses their resume tokens on both; it survives a
/// `kill -9` of a Redis that persists. The delay from the admin call to each close frame is
/// printed (docs/benchmarks.md), not asserted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_on_one_instance_closes_the_subject_on_the_other() {
    let redis = RedisServer::start_durable().expect("redis starts");
    let mut c = Cluster::start_on(bin(), redis, 2, &[]).expect("cluster starts");
    let admin = c.creds.admin_token.clone();
    let t = c.token("gone", &["room:*"]);
    let keep = c.token("stays", &["room:*"]);
    let mut socks = Vec::new();
    for _ in 0..20 {
        let mut s = ws(&format!("{}/v1/ws?token={t}", c.ws_url(1))).await;
        let w = s.expect("welcome").await;
        socks.push((s, w));
    }
    let mut other = ws(&format!("{}/v1/ws?token={keep}", c.ws_url(1))).await;
    other.expect("welcome").await;
    let mut sse = SseClient::connect(
        &format!("{}/v1/streams/room:a/sse?token={t}", c.url(1)),
        &[],
    )
    .await
    .unwrap();
    let started = Instant::now();
    let r = c
        .api(0)
        .post("/admin/revoke", Some(&admin), json!({"sub":"gone"}))
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let mut took = Vec::new();
    for (s, _) in socks.iter_mut() {
        loop {
            match s.next_within(Duration::from_secs(10)).await {
                zerodrop_testkit::ws::Next::Frame(f) if f["type"] == "ping" => continue,
                zerodrop_testkit::ws::Next::Frame(f) => {
                    assert_eq!(f["code"], "REVOKED", "{f}");
                    took.push(started.elapsed());
                    break;
                }
                other => panic!("expected REVOKED, got {other:?}"),
            }
        }
        assert_eq!(s.expect_close().await, Some(4403));
    }
    match sse.read(Duration::from_secs(10)).await {
        zerodrop_testkit::sse::SseRead::Event(e) => assert_eq!(e.json()["code"], "REVOKED"),
        other => panic!("expected the typed end, got {other:?}"),
    }
    took.sort();
    println!(
        "revoke on node-0 → close frame on node-1: p50 {:?}, p99 {:?}, max {:?} ({} sockets)",
        took[took.len() / 2],
        took[(took.len() * 99).div_ceil(100) - 1],
        took[took.len() - 1],
        took.len()
    );
    other.send(json!({"type":"ping","t":3})).await;
    assert_eq!(other.expect("pong").await["t"], 3, "another subject stays");
    let (_, w) = &socks[0];
    let (sid, resume) = (
        w["sessionId"].as_str().unwrap(),
        w["resumeToken"].as_str().unwrap(),
    );
    for i in 0..2 {
        let r = c.api(i).reconnect(sid, resume).await;
        assert_eq!(
            (r.status, r.code()),
            (401, "REVOKED"),
            "node-{i}: {}",
            r.text
        );
    }
    // Redis is killed and comes back from its AOF: the revocation is still in force and
    // listed, on both instances.
    c.redis.kill();
    c.redis.restart().expect("redis restarts");
    for i in 0..2 {
        let api = c.api(i);
        eventually(
            "the revocation is listed again",
            Duration::from_secs(15),
            || {
                let (api, admin) = (api.clone(), admin.clone());
                async move {
                    let l = api.get("/admin/revocations", Some(&admin)).await;
                    l.status == 200 && l.json["revocations"][0]["sub"] == "gone"
                }
            },
        )
        .await;
        let r = api.reconnect(sid, resume).await;
        assert_eq!(
            (r.status, r.code()),
            (401, "REVOKED"),
            "node-{i} after the restart: {}",
            r.text
        );
    }
}

/// Presence across a crash (SPEC §10): the members held by an instance killed with `kill -9`
/// stop being renewed and leave once their heartbeat lapses (plus the grace and a sweep),
/// observed by the other instance; each leaves exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_instances_presence_members_leave_once_observed_by_the_other() {
    let mut c = Cluster::start(
        bin(),
        2,
        &[
            "--presence",
            "room:*",
            "--presence-leave-grace-sec",
            "1",
            "--presence-heartbeat-sec",
            "2",
        ],
    )
    .expect("cluster starts");
    let watcher = c.token("watcher", &["room:*"]);
    let mut w = ws(&format!("{}/v1/ws?token={watcher}", c.ws_url(1))).await;
    w.expect("welcome").await;
    w.send(json!({"type":"subscribe","stream":"room:k","presence":true}))
        .await;
    w.expect("subscribed").await;
    let mut members = Vec::new();
    for n in 0..3 {
        let t = c.token(&format!("m{n}"), &["room:*"]);
        let mut m = ws(&format!("{}/v1/ws?token={t}", c.ws_url(0))).await;
        let welcome = m.expect("welcome").await;
        m.send(json!({"type":"subscribe","stream":"room:k"})).await;
        m.expect("subscribed").await;
        let j = w.next_frame(Duration::from_secs(10)).await;
        assert_eq!(
            (&j["type"], &j["action"]),
            (&json!("presence"), &json!("join")),
            "{j}"
        );
        members.push((m, welcome["sessionId"].as_str().unwrap().to_string()));
    }
    c.kill9(0);
    // Bounded by the heartbeat (2 s) + the grace (1 s) + sweeps, with room for a slow machine.
    let mut left = std::collections::BTreeSet::new();
    for _ in 0..3 {
        let l = w.next_frame(Duration::from_secs(20)).await;
        assert_eq!(
            (&l["type"], &l["action"]),
            (&json!("presence"), &json!("leave")),
            "{l}"
        );
        assert!(
            left.insert(l["member"]["sessionId"].as_str().unwrap().to_string()),
            "a second leave of one member: {l}"
        );
    }
    let expected: std::collections::BTreeSet<String> =
        members.iter().map(|(_, s)| s.clone()).collect();
    assert_eq!(left, expected);
    w.expect_silence(Duration::from_secs(3)).await;
    let api = c.api(1);
    let r = api
        .get("/v1/streams/room:k/presence", Some(&c.creds.api_key))
        .await;
    assert_eq!(r.json["occupancy"], 1, "{}", r.text);
    assert_eq!(r.json["presenceSeq"], 7, "{}", r.text);
}

/// Occupancy webhooks (SPEC §10) survive a `kill -9` of the instance that queued them: the
/// jobs are in the store, any worker delivers them, and the other instance pumps on from the
/// stream's webhook cursor — every transition delivered once, in order, with its key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn occupancy_webhooks_survive_a_kill_9_of_the_instance_that_queued_them() {
    use zerodrop_testkit::upstream::{FakeUpstream, Mode};
    let up = FakeUpstream::start().await;
    up.set(Mode::Status(503));
    let cfg = tempfile::tempdir().unwrap();
    let file = cfg.path().join("zerodrop.toml");
    std::fs::write(
        &file,
        format!(
            "presence = [\"room:*\"]\n[upstreams.app]\nprimary = \"{}\"\npresence = [\"room:*\"]\n",
            up.url
        ),
    )
    .unwrap();
    let mut c = Cluster::start(
        bin(),
        2,
        &[
            "--config",
            file.to_str().unwrap(),
            "--presence-leave-grace-sec",
            "1",
            "--presence-heartbeat-sec",
            "2",
            "--jobs-max-attempts",
            "1000",
            "--jobs-backoff-base-ms",
            "50",
            "--jobs-backoff-cap-ms",
            "200",
            "--jobs-lease-ms",
            "1000",
            "--jobs-heartbeat-ms",
            "300",
        ],
    )
    .expect("cluster starts");
    // Node 0 alone queues.
    c.kill9(1);
    let mut members = Vec::new();
    for n in 0..2 {
        let t = c.token(&format!("m{n}"), &["room:*"]);
        let mut m = ws(&format!("{}/v1/ws?token={t}", c.ws_url(0))).await;
        let welcome = m.expect("welcome").await;
        m.send(json!({"type":"subscribe","stream":"room:w"})).await;
        m.expect("subscribed").await;
        members.push((m, welcome["sessionId"].as_str().unwrap().to_string()));
    }
    // The first transition is queued and tried (and refused) by node 0.
    up.wait_until("a first attempt", |r| !r.is_empty()).await;
    c.spawn_node(1).expect("node 1 again");
    c.kill9(0);
    up.set(Mode::Ok);
    // The members of node 0 leave on node 1's sweep; every webhook follows, once.
    let ok =
        |r: &[zerodrop_testkit::upstream::Received]| r.iter().filter(|x| x.status == 200).count();
    let deadline = Instant::now() + Duration::from_secs(30);
    while ok(&up.received()) < 6 {
        assert!(Instant::now() < deadline, "webhooks: {:#?}", up.received());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let got: Vec<Value> = up
        .received()
        .into_iter()
        .filter(|r| r.status == 200)
        .map(|r| {
            let body = r.json();
            assert_eq!(
                r.header("idempotency-key"),
                body["idempotencyKey"].as_str(),
                "{body}"
            );
            body
        })
        .collect();
    let types: Vec<&str> = got.iter().map(|b| b["type"].as_str().unwrap()).collect();
    assert_eq!(
        types,
        [
            "stream.occupied",
            "member.joined",
            "member.joined",
            "member.left",
            "member.left",
            "stream.vacated"
        ],
        "{got:#?}"
    );
    let keys: std::collections::BTreeSet<&str> = got
        .iter()
        .map(|b| b["idempotencyKey"].as_str().unwrap())
        .collect();
    assert_eq!(keys.len(), 6, "one delivery per transition");
    let seqs: Vec<u64> = got.iter().map(|b| b["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] <= w[1]), "in order: {seqs:?}");
    let left: std::collections::BTreeSet<String> = got
        .iter()
        .filter(|b| b["type"] == "member.left")
        .map(|b| b["member"]["sessionId"].as_str().unwrap().to_string())
        .collect();
    let expected: std::collections::BTreeSet<String> =
        members.iter().map(|(_, s)| s.clone()).collect();
    assert_eq!(left, expected);
}
