//! Sessions over HTTP: open, checkpoint, reconnect windows, and every resume error.

use std::time::Duration;

use serde_json::{Value, json};
use zerodrop_core::{ResumeKeys, SessionId};
use zerodrop_testkit::server::TestServer;

async fn open(s: &TestServer, streams: &[&str]) -> Value {
    let tok = s.token("u1", &["room:*"]);
    let r = s
        .api()
        .post("/v1/sessions", Some(&tok), json!({ "streams": streams }))
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    r.json
}

fn seqs(window: &Value) -> Vec<u64> {
    window["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_checkpoint_and_reconnect() {
    let s = TestServer::start().await;
    let api = s.api();
    api.publish("room:1", json!("before")).await;
    let sess = open(&s, &["room:1", "room:2"]).await;
    let sid = sess["sessionId"].as_str().unwrap().to_string();
    let token = sess["resumeToken"].as_str().unwrap().to_string();
    assert!(token.starts_with("v1.k1."));
    assert_eq!(sess["reconnectWindowSec"], 900);
    assert_eq!(sess["instance"], s.app().instance.as_str());
    assert_eq!(sess["streams"]["room:1"]["headSeq"], 1);
    assert_eq!(sess["streams"]["room:1"]["lastAckSequence"], 1);
    assert_eq!(sess["streams"]["room:2"]["headSeq"], 0);
    for i in 2..=6 {
        api.publish("room:1", json!(i)).await;
    }
    api.publish("room:2", json!("r2")).await;
    // The window is what was missed since the session opened.
    let rc = |body: Value| {
        let api = api.clone();
        let sid = sid.clone();
        async move {
            api.post(&format!("/v1/sessions/{sid}/reconnect"), None, body)
                .await
        }
    };
    let r = rc(json!({"resumeToken": token})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["sessionId"], sid.as_str());
    let fresh = r.json["resumeToken"].as_str().unwrap().to_string();
    assert_ne!(fresh, token);
    let w = &r.json["replay"]["room:1"];
    assert_eq!(seqs(w), vec![2, 3, 4, 5, 6]);
    assert_eq!(
        (
            w["fromSeq"].as_u64(),
            w["toSeq"].as_u64(),
            w["complete"].as_bool()
        ),
        (Some(2), Some(6), Some(true))
    );
    assert_eq!(seqs(&r.json["replay"]["room:2"]), vec![1]);
    // The same request twice: the same window (plus what was published since).
    api.publish("room:1", json!(7)).await;
    let r2 = rc(json!({"resumeToken": token})).await;
    assert_eq!(seqs(&r2.json["replay"]["room:1"]), vec![2, 3, 4, 5, 6, 7]);
    // Checkpoints move the window; stale ones are ignored and never regress it.
    let ck = |stream: &str, seq: u64, bearer: &str| {
        let api = api.clone();
        let sid = sid.clone();
        let bearer = bearer.to_string();
        let body = json!({"stream": stream, "seq": seq});
        async move {
            api.post(
                &format!("/v1/sessions/{sid}/checkpoint"),
                Some(&bearer),
                body,
            )
            .await
        }
    };
    let r = ck("room:1", 4, &fresh).await;
    assert_eq!(
        r.json,
        json!({"ackUpdate": "applied", "lastAckSequence": 4})
    );
    let r = ck("room:1", 4, &token).await;
    assert_eq!(
        r.json,
        json!({"ackUpdate": "ignored", "lastAckSequence": 4})
    );
    let r = ck("room:1", 2, &token).await;
    assert_eq!(
        r.json,
        json!({"ackUpdate": "ignored", "lastAckSequence": 4})
    );
    let r = ck("room:1", 8, &token).await;
    assert_eq!((r.status, r.code()), (400, "ACK_BEYOND_HEAD"));
    assert_eq!(r.json["error"]["headSeq"], 7);
    let r = ck("room:9", 1, &token).await;
    assert_eq!((r.status, r.code()), (403, "FORBIDDEN"));
    let r = ck("bad id", 1, &token).await;
    assert_eq!((r.status, r.code()), (400, "INVALID_STREAM_ID"));
    let r = api
        .post(
            &format!("/v1/sessions/{sid}/checkpoint"),
            Some(&token),
            json!({"stream":"room:1"}),
        )
        .await;
    assert_eq!((r.status, r.code()), (400, "INVALID_REQUEST"));
    let r = api
        .post(
            &format!("/v1/sessions/{sid}/checkpoint"),
            None,
            json!({"stream":"room:1","seq":1}),
        )
        .await;
    assert_eq!((r.status, r.code()), (401, "UNAUTHORIZED"));
    // Credentials that are not for this session: a forged token, another session's token, or a
    // path that names no session at all.
    let other = api
        .post(
            "/v1/sessions",
            Some(&s.token("u2", &["room:*"])),
            json!({"streams":["room:1"]}),
        )
        .await
        .json["resumeToken"]
        .as_str()
        .unwrap()
        .to_string();
    let mut forged = token.clone();
    forged.replace_range(
        forged.len() - 2..,
        if token.ends_with("AA") { "BB" } else { "AA" },
    );
    for bad in [forged.as_str(), other.as_str()] {
        let r = ck("room:1", 1, bad).await;
        assert_eq!(
            (r.status, r.code()),
            (401, "INVALID_RESUME_TOKEN"),
            "{}",
            r.text
        );
        let r = rc(json!({"resumeToken": bad})).await;
        assert_eq!(
            (r.status, r.code()),
            (401, "INVALID_RESUME_TOKEN"),
            "{}",
            r.text
        );
    }
    let cases = [
        ("checkpoint", json!({"stream": "room:1", "seq": 1})),
        ("reconnect", json!({"resumeToken": token})),
    ];
    for (route, body) in cases {
        let path = format!("/v1/sessions/not-a-session/{route}");
        let r = api.post(&path, Some(&token), body).await;
        assert_eq!(
            (r.status, r.code()),
            (401, "INVALID_RESUME_TOKEN"),
            "{path}"
        );
    }
    let r = rc(json!({"resumeToken": token})).await;
    assert_eq!(seqs(&r.json["replay"]["room:1"]), vec![5, 6, 7]);
    // A client's lastAckSequence above the stored ack is applied; the window starts after it.
    let r = rc(json!({"resumeToken": token, "lastAckSequence": {"room:1": 6}})).await;
    assert_eq!(seqs(&r.json["replay"]["room:1"]), vec![7]);
    let r = ck("room:1", 5, &token).await;
    assert_eq!(
        r.json,
        json!({"ackUpdate": "ignored", "lastAckSequence": 6})
    );
    // One below the stored ack is served from there, and does not regress the ack.
    let r = rc(json!({"resumeToken": token, "lastAckSequence": {"room:1": 3}})).await;
    assert_eq!(seqs(&r.json["replay"]["room:1"]), vec![4, 5, 6, 7]);
    let r = ck("room:1", 6, &token).await;
    assert_eq!(r.json["ackUpdate"], "ignored");
    let r = rc(json!({"resumeToken": token, "lastAckSequence": {"room:1": 99}})).await;
    assert_eq!(
        r.json["replay"]["room:1"]["error"]["code"],
        "ACK_BEYOND_HEAD"
    );
    assert_eq!(
        seqs(&r.json["replay"]["room:2"]),
        vec![1],
        "other streams are still served"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_windows_are_paged() {
    let s = TestServer::start().await;
    let api = s.api();
    let sess = open(&s, &["room:big"]).await;
    let sid = sess["sessionId"].as_str().unwrap();
    let token = sess["resumeToken"].as_str().unwrap();
    let mut tasks = Vec::new();
    for w in 0..8 {
        let api = api.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..150 {
                api.publish("room:big", json!([w, i])).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let r = api
        .post(
            &format!("/v1/sessions/{sid}/reconnect"),
            None,
            json!({"resumeToken": token}),
        )
        .await;
    let w = &r.json["replay"]["room:big"];
    assert_eq!(w["complete"], false);
    assert_eq!(w["toSeq"], 1000);
    assert_eq!(seqs(w), (1..=1000).collect::<Vec<_>>());
    let rest = api.read("room:big", 1000, 1000).await;
    assert_eq!(rest.json["events"].as_array().unwrap().len(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opening_sessions_checks_the_token() {
    let s = TestServer::with(|c| c.max_streams_per_session = 3).await;
    let api = s.api();
    let r = api
        .post("/v1/sessions", None, json!({"streams":["room:1"]}))
        .await;
    assert_eq!((r.status, r.code()), (401, "UNAUTHORIZED"));
    let r = api
        .post(
            "/v1/sessions",
            Some("garbage"),
            json!({"streams":["room:1"]}),
        )
        .await;
    assert_eq!((r.status, r.code()), (401, "UNAUTHORIZED"));
    let expired = s.creds.token_until("u1", &["room:*"], &[], 1_000_000);
    let r = api
        .post(
            "/v1/sessions",
            Some(&expired),
            json!({"streams":["room:1"]}),
        )
        .await;
    assert_eq!((r.status, r.code()), (401, "UNAUTHORIZED"));
    let tok = s.token("u1", &["room:*"]);
    let r = api
        .post("/v1/sessions", Some(&tok), json!({"streams":["user:1"]}))
        .await;
    assert_eq!((r.status, r.code()), (403, "FORBIDDEN"));
    let r = api
        .post("/v1/sessions", Some(&tok), json!({"streams":["bad id"]}))
        .await;
    assert_eq!((r.status, r.code()), (400, "INVALID_STREAM_ID"));
    let r = api
        .post(
            "/v1/sessions",
            Some(&tok),
            json!({"streams":["room:1","room:2","room:3","room:4"]}),
        )
        .await;
    assert_eq!((r.status, r.code()), (400, "INVALID_REQUEST"));
    let r = api
        .post("/v1/sessions", Some(&tok), json!({"streams": "room:1"}))
        .await;
    assert_eq!((r.status, r.code()), (400, "INVALID_REQUEST"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_errors() {
    let s = TestServer::with(|c| c.reconnect_window_sec = 2).await;
    let api = s.api();
    let sess = open(&s, &["room:1"]).await;
    let sid = sess["sessionId"].as_str().unwrap().to_string();
    let token = sess["resumeToken"].as_str().unwrap().to_string();
    let rc = |sid: String, token: String| {
        let api = api.clone();
        async move {
            api.post(
                &format!("/v1/sessions/{sid}/reconnect"),
                None,
                json!({"resumeToken": token}),
            )
            .await
        }
    };
    // Forged, malformed, or for another session.
    let forged = ResumeKeys::parse("k1:not-the-real-key-at-all").unwrap();
    let claims = s
        .app()
        .auth
        .resume_keys
        .verify(&token, zerodrop_core::now_ms() / 1000)
        .unwrap();
    let evil = forged.sign(&claims);
    for t in [evil.as_str(), "v1.k1.x.y", "nonsense", ""] {
        let r = rc(sid.clone(), t.to_string()).await;
        assert_eq!((r.status, r.code()), (401, "INVALID_RESUME_TOKEN"), "{t}");
    }
    let other = open(&s, &["room:1"]).await;
    let r = rc(
        other["sessionId"].as_str().unwrap().to_string(),
        token.clone(),
    )
    .await;
    assert_eq!((r.status, r.code()), (401, "INVALID_RESUME_TOKEN"));
    let unknown_kid = ResumeKeys::parse("k9:0123456789abcdef0123")
        .unwrap()
        .sign(&claims);
    let r = rc(sid.clone(), unknown_kid).await;
    assert_eq!((r.status, r.code()), (401, "INVALID_RESUME_TOKEN"));
    // A valid token for a session the store does not have.
    let ghost = SessionId::generate();
    let fresh = zerodrop_server::app::Authority {
        exp: None,
        born_ms: zerodrop_core::now_ms(),
    };
    let ghost_token = s.app().mint_token(&ghost, "u1", fresh).unwrap();
    let r = rc(ghost.to_string(), ghost_token).await;
    assert_eq!((r.status, r.code()), (404, "SESSION_NOT_FOUND"));
    let r = api
        .post("/v1/sessions/x/reconnect", None, json!({"nope": 1}))
        .await;
    assert_eq!((r.status, r.code()), (400, "INVALID_REQUEST"));
    // Past the window: the token has expired.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let r = rc(sid.clone(), token.clone()).await;
    assert_eq!((r.status, r.code()), (410, "RECONNECT_WINDOW_EXPIRED"));
    let m = api.metrics_json().await;
    assert!(m["errors"]["INVALID_RESUME_TOKEN"].as_u64().unwrap() >= 6);
    assert_eq!(m["errors"]["RECONNECT_WINDOW_EXPIRED"], 1);
    assert_eq!(m["errors"]["SESSION_NOT_FOUND"], 1);
    assert_eq!(m["resume_store_metrics"]["resume_success_rate"], 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trimmed_windows_and_dropped_messages() {
    let s = TestServer::with(|c| c.retention.max_events = 5).await;
    let api = s.api();
    let sess = open(&s, &["room:1", "room:2"]).await;
    let sid = sess["sessionId"].as_str().unwrap().to_string();
    let token = sess["resumeToken"].as_str().unwrap().to_string();
    for i in 1..=20 {
        api.publish("room:1", json!(i)).await;
    }
    api.publish("room:2", json!("ok")).await;
    let rc = || {
        let api = api.clone();
        let (sid, token) = (sid.clone(), token.clone());
        async move {
            api.post(
                &format!("/v1/sessions/{sid}/reconnect"),
                None,
                json!({"resumeToken": token}),
            )
            .await
        }
    };
    let r = rc().await;
    assert_eq!(r.status, 200);
    let e = &r.json["replay"]["room:1"]["error"];
    assert_eq!(e["code"], "REPLAY_WINDOW_TRIMMED");
    assert_eq!(e["firstAvailableSeq"], 16);
    assert_eq!(e["stream"], "room:1");
    assert_eq!(seqs(&r.json["replay"]["room:2"]), vec![1]);
    let m = api.metrics_json().await;
    assert_eq!(m["ws_metrics"]["dropped_messages"], 15);
    // The same request twice gives the same window (SPEC §3): the hole is answered again, and
    // the same events are not counted again; the other stream goes on.
    let r = rc().await;
    assert_eq!(
        r.json["replay"]["room:1"]["error"]["code"],
        "REPLAY_WINDOW_TRIMMED"
    );
    assert_eq!(seqs(&r.json["replay"]["room:2"]), vec![1]);
    assert_eq!(
        api.metrics_json().await["ws_metrics"]["dropped_messages"],
        15
    );
    let m = api.metrics_json().await;
    assert_eq!(m["resume_store_metrics"]["buffer_trims"], 15);
    assert!(
        (m["resume_store_metrics"]["buffer_trim_rate"]
            .as_f64()
            .unwrap()
            - 15.0 / 21.0)
            .abs()
            < 1e-9
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_keys_rotate_gradually() {
    let dir = tempfile::tempdir().unwrap();
    let k1 = "k1:first-key-0123456789abcdef";
    let k2 = "k2:second-key-0123456789abcdef";
    let with_keys = |spec: &'static str| {
        move |c: &mut zerodrop_server::Config| c.secrets.resume_keys = Some(spec.to_string())
    };
    let s = TestServer::start_in(dir.path(), with_keys(k1)).await;
    let sess = open(&s, &["room:1"]).await;
    let sid = sess["sessionId"].as_str().unwrap().to_string();
    let old = sess["resumeToken"].as_str().unwrap().to_string();
    assert!(old.starts_with("v1.k1."));
    s.stop().await;
    // Step 1: the new key signs, the old one still verifies.
    let both: &'static str = Box::leak(format!("{k2},{k1}").into_boxed_str());
    let s = TestServer::start_in(dir.path(), with_keys(both)).await;
    let r = s
        .api()
        .post(
            &format!("/v1/sessions/{sid}/reconnect"),
            None,
            json!({"resumeToken": old}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let new = r.json["resumeToken"].as_str().unwrap().to_string();
    assert!(new.starts_with("v1.k2."));
    s.stop().await;
    // Step 2: the old key is gone; its tokens no longer verify, the new ones do.
    let s = TestServer::start_in(dir.path(), with_keys(k2)).await;
    let api = s.api();
    let r = api
        .post(
            &format!("/v1/sessions/{sid}/reconnect"),
            None,
            json!({"resumeToken": old}),
        )
        .await;
    assert_eq!((r.status, r.code()), (401, "INVALID_RESUME_TOKEN"));
    let r = api
        .post(
            &format!("/v1/sessions/{sid}/reconnect"),
            None,
            json!({"resumeToken": new}),
        )
        .await;
    assert_eq!(r.status, 200);
    s.stop().await;
}

/// A page that loaded a snapshot at seq N opens its session there (`after`), so the events
/// published while it loaded are replayed, not skipped; every position that cannot be served
/// is a typed error and opens nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_opens_after_a_snapshot_position_with_no_hole() {
    let s = TestServer::with(|c| c.retention.max_events = 5).await;
    let api = s.api();
    for i in 1..=4 {
        api.publish("room:a", json!(i)).await;
    }
    let snapshot = api
        .get("/v1/streams/room:a/events?after=0", Some(&s.creds.api_key))
        .await
        .json;
    let epoch = snapshot["epoch"].as_str().unwrap().to_string();
    assert_eq!(snapshot["headSeq"], 4);
    // Published while the page was rendering its snapshot.
    for i in 5..=7 {
        api.publish("room:a", json!(i)).await;
    }
    let tok = s.token("u1", &["room:*"]);
    let open = |body: Value| {
        let api = api.clone();
        let tok = tok.clone();
        async move { api.post("/v1/sessions", Some(&tok), body).await }
    };
    let sessions = || async {
        api.metrics_json().await["resume_store_metrics"]["sessions"]
            .as_u64()
            .unwrap()
    };
    let before = sessions().await;

    // Every position that cannot be served is refused, with its code, and opens no session.
    let refused = [
        (
            json!({"streams":["room:a"],"after":{"room:a":8}}),
            400,
            "ACK_BEYOND_HEAD",
        ),
        (
            json!({"streams":["room:a"],"after":{"room:a":1}}),
            409,
            "REPLAY_WINDOW_TRIMMED",
        ),
        (
            json!({"streams":["room:a"],"after":{"room:b":1}}),
            400,
            "INVALID_REQUEST",
        ),
        (
            json!({"streams":["room:a"],"after":{"room:a":"4"}}),
            400,
            "INVALID_REQUEST",
        ),
        (
            json!({"streams":["room:a"],"after":{"room:a":{"seq":4,"epoch":"no such epoch!"}}}),
            400,
            "INVALID_REQUEST",
        ),
        (
            json!({"streams":["other:a"],"after":{"other:a":0}}),
            403,
            "FORBIDDEN",
        ),
    ];
    for (body, status, code) in refused {
        let r = open(body.clone()).await;
        assert_eq!((r.status, r.code()), (status, code), "{body}: {}", r.text);
    }
    let r = open(json!({"streams":["room:a"],"after":{"room:a":1}})).await;
    assert_eq!(r.json["error"]["firstAvailableSeq"], 3, "{}", r.text);
    let r = open(json!({"streams":["room:a"],"after":{"room:a":8}})).await;
    assert_eq!(r.json["error"]["headSeq"], 7, "{}", r.text);
    // A snapshot of another incarnation of the log: EPOCH_CHANGED, never a silent hole.
    let other = TestServer::start().await;
    other.api().publish("room:a", json!(1)).await;
    let other_epoch = other
        .api()
        .get("/v1/streams/room:a", Some(&other.creds.api_key))
        .await
        .json["epoch"]
        .as_str()
        .unwrap()
        .to_string();
    let r =
        open(json!({"streams":["room:a"],"after":{"room:a":{"seq":4,"epoch":other_epoch}}})).await;
    assert_eq!((r.status, r.code()), (409, "EPOCH_CHANGED"), "{}", r.text);
    assert_eq!(r.json["error"]["epoch"], epoch.as_str());
    assert_eq!(sessions().await, before, "a refused open stores nothing");

    // Opened at the snapshot: the stream starts after seq 4; another without `after` at head.
    let r = open(json!({
        "streams": ["room:a", "room:c"],
        "after": {"room:a": {"seq": 4, "epoch": epoch}},
    }))
    .await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(
        r.json["streams"]["room:a"],
        json!({"epoch": epoch, "headSeq": 7, "lastAckSequence": 4})
    );
    assert_eq!(r.json["streams"]["room:c"]["lastAckSequence"], 0);
    let sid = r.json["sessionId"].as_str().unwrap().to_string();
    let token = r.json["resumeToken"].as_str().unwrap().to_string();
    let rc = api
        .post(
            &format!("/v1/sessions/{sid}/reconnect"),
            None,
            json!({"resumeToken": token}),
        )
        .await;
    assert_eq!(
        seqs(&rc.json["replay"]["room:a"]),
        vec![5, 6, 7],
        "{}",
        rc.text
    );
    // A bare number works the same, and a WebSocket resume starts at the same place.
    let r = open(json!({"streams":["room:a"],"after":{"room:a":6}})).await;
    assert_eq!(r.json["streams"]["room:a"]["lastAckSequence"], 6);
    let token = r.json["resumeToken"].as_str().unwrap().to_string();
    let mut ws =
        zerodrop_testkit::ws::WsClient::connect(&format!("{}/v1/ws?resume={token}", s.ws_url()))
            .await
            .unwrap();
    ws.expect("welcome").await;
    let sub = ws.expect("subscribed").await;
    assert_eq!(sub["fromSeq"], 7);
    let evs = ws.events(1).await;
    assert_eq!(evs[0]["seq"], 7);
}

/// The WebSocket way to the same: `subscribe {stream, after, epoch}` records the position in
/// the session, so a socket that drops before its first ack resumes right after the snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_subscribe_after_a_snapshot_survives_a_drop_before_any_ack() {
    let s = TestServer::start().await;
    let api = s.api();
    for i in 1..=3 {
        api.publish("room:w", json!(i)).await;
    }
    let epoch = api
        .get("/v1/streams/room:w", Some(&s.creds.api_key))
        .await
        .json["epoch"]
        .as_str()
        .unwrap()
        .to_string();
    let tok = s.token("u1", &["room:*"]);
    let mut ws =
        zerodrop_testkit::ws::WsClient::connect(&format!("{}/v1/ws?token={tok}", s.ws_url()))
            .await
            .unwrap();
    let token = ws.expect("welcome").await["resumeToken"]
        .as_str()
        .unwrap()
        .to_string();
    ws.send(json!({"type":"subscribe","stream":"room:w","after":2,"epoch":epoch}))
        .await;
    assert_eq!(ws.expect("subscribed").await["fromSeq"], 3);
    ws.abort();
    api.publish("room:w", json!(4)).await;
    let mut back =
        zerodrop_testkit::ws::WsClient::connect(&format!("{}/v1/ws?resume={token}", s.ws_url()))
            .await
            .unwrap();
    back.expect("welcome").await;
    assert_eq!(back.expect("subscribed").await["fromSeq"], 3);
    let got: Vec<u64> = back
        .events(2)
        .await
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(got, vec![3, 4]);
}

/// `--max-sessions-per-subject`: one subject holds at most that many live sessions, whichever
/// way it opens them (HTTP, or a WebSocket connect, whose session is written with its first
/// stream); beyond, 429 `RATE_LIMITED` with `Retry-After` (on a socket: the `error` frame
/// answers the first `subscribe`, then close 4429). Resuming a held session never counts;
/// other subjects are not affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subject_holds_at_most_its_cap_of_live_sessions() {
    assert_eq!(
        zerodrop_server::Config::for_tests("unused").max_sessions_per_subject,
        100_000,
        "on by default, generous enough for a subject many clients share"
    );
    let s = TestServer::with(|c| c.max_sessions_per_subject = 3).await;
    let api = s.api();
    let tok = s.token("flood", &["room:*"]);
    let body = json!({"streams": ["room:1"]});
    let mut held = Vec::new();
    for _ in 0..2 {
        let r = api.post("/v1/sessions", Some(&tok), body.clone()).await;
        assert_eq!(r.status, 201, "{}", r.text);
        held.push(r.json);
    }
    let ws_url = format!("{}/v1/ws?token={tok}", s.ws_url());
    let mut third = zerodrop_testkit::ws::WsClient::connect(&ws_url)
        .await
        .unwrap();
    third.expect("welcome").await;
    third
        .send(json!({"type": "subscribe", "stream": "room:1"}))
        .await;
    third.expect("subscribed").await;
    // The cap is reached: HTTP and WebSocket opens are refused, typed.
    for _ in 0..5 {
        let r = api.post("/v1/sessions", Some(&tok), body.clone()).await;
        assert_eq!((r.status, r.code()), (429, "RATE_LIMITED"), "{}", r.text);
        assert_eq!(r.json["error"]["limit"], "sessions_per_subject");
        assert_eq!(r.json["error"]["cap"], 3);
        let wait: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
        assert!((1..=900).contains(&wait), "{wait}");
    }
    let mut refused = zerodrop_testkit::ws::WsClient::connect(&ws_url)
        .await
        .unwrap();
    refused.expect("welcome").await;
    refused
        .send(json!({"type": "subscribe", "stream": "room:1"}))
        .await;
    let f = refused.recv().await;
    assert_eq!(
        (&f["type"], &f["code"]),
        (&json!("error"), &json!("RATE_LIMITED")),
        "{f}"
    );
    assert_eq!(f["limit"], "sessions_per_subject");
    assert!(f["retryAfterMs"].as_u64().unwrap() >= 1000, "{f}");
    assert_eq!(refused.expect_close().await, Some(4429));
    // Another subject opens as usual.
    let other = s.token("someone-else", &["room:*"]);
    let r = api.post("/v1/sessions", Some(&other), body.clone()).await;
    assert_eq!(r.status, 201, "{}", r.text);
    // A held session resumes at the cap, over HTTP and WebSocket.
    let sid = held[0]["sessionId"].as_str().unwrap();
    let token = held[0]["resumeToken"].as_str().unwrap();
    let r = api.reconnect(sid, token).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let resume_url = format!("{}/v1/ws?resume={token}", s.ws_url());
    let mut resumed = zerodrop_testkit::ws::WsClient::connect(&resume_url)
        .await
        .unwrap();
    assert_eq!(resumed.expect("welcome").await["sessionId"], sid);
    let stats = api.metrics_json().await;
    assert_eq!(stats["ws_metrics"]["dropped_messages"], 0);
}
