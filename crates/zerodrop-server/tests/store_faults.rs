//! The SQLite store failing under a running server: a full disk, a file damaged while it is
//! served. Each answers 503 `STORE_UNAVAILABLE` with the cause in `reason`, never a 201, and
//! leaves what was stored intact.

use serde_json::{Value, json};
use zerodrop_testkit::http::{Api, Resp};
use zerodrop_testkit::server::TestServer;

fn pad(i: u64) -> Value {
    json!({"i": i, "pad": "p".repeat(1000)})
}

/// Every event of `stream` (pages of 1,000), as `(seq, data)`.
async fn all_events(api: &Api, stream: &str) -> Vec<(u64, Value)> {
    let mut out = Vec::new();
    for _ in 0..100 {
        let after = out.last().map_or(0, |(s, _)| *s);
        let page = api.read(stream, after, 1000).await;
        assert_eq!(page.status, 200, "{}", page.text);
        let evs = page.json["events"].as_array().unwrap().clone();
        if evs.is_empty() {
            return out;
        }
        out.extend(
            evs.iter()
                .map(|e| (e["seq"].as_u64().unwrap(), e["data"].clone())),
        );
    }
    panic!("more than 100 pages");
}

#[track_caller]
fn assert_store_fault(r: &Resp, reason: &str, retry_after: &str) {
    assert_eq!(
        (r.status, r.code(), r.json["error"]["reason"].as_str()),
        (503, "STORE_UNAVAILABLE", Some(reason)),
        "{}",
        r.text
    );
    assert_eq!(
        r.headers.get("retry-after").and_then(|v| v.to_str().ok()),
        Some(retry_after)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_writes_keeps_every_event_and_recovers_without_a_gap() {
    let s = TestServer::start().await;
    let api = s.api();
    let stream = "full:1";
    for i in 1..=20 {
        assert_eq!(api.publish(stream, pad(i)).await["seq"], i);
    }
    let tok = s.token("u1", &["full:*"]);
    let open = |api: Api, tok: String| async move {
        api.post("/v1/sessions", Some(&tok), json!({"streams": [stream]}))
            .await
    };
    assert_eq!(open(api.clone(), tok.clone()).await.status, 201);

    // The file may not grow any more: what a full disk looks like to SQLite.
    let sqlite = s.sqlite().expect("sqlite store");
    let cap = sqlite.limit_pages(Some(1)).await.unwrap();
    assert_eq!(cap, sqlite.page_count().await.unwrap());
    let mut head = 20;
    let mut refused = None;
    for i in 21..2_000 {
        let r = api.try_publish(stream, pad(i)).await;
        if r.status != 201 {
            refused = Some(r);
            break;
        }
        head += 1;
        assert_eq!(
            r.json["seq"], head,
            "what fits in the file's free space is stored"
        );
    }
    let r = refused.expect("the file filled up");
    assert_store_fault(&r, "disk_full", "5");
    let msg = r.json["error"]["message"].as_str().unwrap();
    assert!(msg.contains("disk is full"), "{msg}");

    let before = api.info(stream).await;
    assert_eq!(before["headSeq"], head);
    for i in 0..5 {
        let r = api.try_publish(stream, pad(10_000 + i)).await;
        assert_store_fault(&r, "disk_full", "5");
    }
    // Session writes are refused the same way (a new session needs room too).
    let mut session_refused = None;
    for _ in 0..2_000 {
        let r = open(api.clone(), tok.clone()).await;
        if r.status != 201 {
            session_refused = Some(r);
            break;
        }
    }
    assert_store_fault(
        &session_refused.expect("sessions filled the file"),
        "disk_full",
        "5",
    );
    // Everything stored is intact and readable: same head, same hash, every event.
    assert_eq!(api.info(stream).await, before);
    let events = all_events(&api, stream).await;
    assert_eq!(
        events.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        (1..=head).collect::<Vec<_>>()
    );
    for (seq, data) in &events {
        assert_eq!(data, &pad(*seq), "seq {seq}");
    }
    assert_eq!(
        s.api().get("/health/live", None).await.status,
        200,
        "the server is alive"
    );

    // Space is back: the next publish is the next seq, no gap, and sessions open again.
    sqlite.limit_pages(None).await.unwrap();
    assert_eq!(api.publish(stream, pad(head + 1)).await["seq"], head + 1);
    assert_eq!(open(api.clone(), tok.clone()).await.status, 201);
    let events = all_events(&api, stream).await;
    assert_eq!(
        events.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        (1..=head + 1).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_damaged_while_served_stops_serving_and_says_why() {
    let s = TestServer::start().await;
    let api = s.api();
    let stream = "dmg:1";
    for i in 1..=1_500 {
        api.publish(stream, pad(i)).await;
    }
    // Closing checkpoints the WAL: every event is in the main file, which is then damaged
    // behind a valid header while a new server serves it.
    let dir = s.stop().await.expect("data dir kept");
    let s = TestServer::start_in(dir.path(), |_| {}).await;
    let api = s.api();
    assert_eq!(api.info(stream).await["headSeq"], 1_500);
    assert!(
        zerodrop_testkit::files::damage_middle_pages(&dir.path().join("zerodrop.db")).unwrap() > 0
    );

    let mut refused = None;
    for after in (0..1_500).step_by(250) {
        let r = api.read(stream, after, 250).await;
        if r.status != 200 {
            refused = Some(r);
            break;
        }
    }
    assert_store_fault(
        &refused.expect("a read reached the damage"),
        "corrupt",
        "30",
    );
    // From then on nothing is served from the file: no publish is acknowledged, and
    // readiness names the cause.
    assert_store_fault(&api.try_publish(stream, pad(0)).await, "corrupt", "30");
    assert_store_fault(&api.read(stream, 0, 10).await, "corrupt", "30");
    let ready = api.get("/health/ready", None).await;
    assert_eq!(
        (ready.status, ready.json.clone()),
        (503, json!({"ready": false, "reasons": ["store_corrupt"]}))
    );
    assert!(s.sqlite().unwrap().check().await.is_err());
}
