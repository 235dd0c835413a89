//! Many streams on one SSE response (`GET /v1/sse?streams=…`): per-stream order, exact
//! resume of every stream from one `Last-Event-ID`, per-stream resets, typed refusals.

use std::time::Duration;

use serde_json::json;
use zerodrop_server::config::StoreChoice;
use zerodrop_testkit::http::Api;
use zerodrop_testkit::redis::RedisServer;
use zerodrop_testkit::server::TestServer;
use zerodrop_testkit::sse::{SseClient, SseEvent};

/// (stream, seq, data) of an `event: event`.
fn fact(e: &SseEvent) -> (String, u64, serde_json::Value) {
    let j = e.json();
    (
        j["stream"].as_str().unwrap().to_string(),
        j["seq"].as_u64().unwrap(),
        j["data"].clone(),
    )
}

/// Every stored event of `stream` as (seq, data).
async fn stored(api: &Api, stream: &str) -> Vec<(u64, serde_json::Value)> {
    let r = api.read(stream, 0, 1000).await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.json["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["seq"].as_u64().unwrap(), e["data"].clone()))
        .collect()
}

/// Three streams interleaved on one response in per-stream order; after a drop and more
/// publishes, a reconnect with any `id:` seen resumes every stream exactly.
async fn interleave_then_resume(s: &TestServer) {
    let api = s.api();
    let streams = ["many:a", "many:b", "many:c"];
    for st in streams {
        api.publish(st, json!({"before": st})).await;
    }
    let tok = s.token("u1", &["many:*"]);
    let url = format!("{}/v1/sse?streams={}&token={tok}", s.url, streams.join(","));
    let mut c = SseClient::connect(&url, &[]).await.unwrap();
    for round in 0..3 {
        for st in streams {
            api.publish(st, json!({"s": st, "r": round})).await;
        }
    }
    let first = c.events(9).await;
    assert!(first.iter().all(|e| e.event == "event"));
    for st in streams {
        let seqs: Vec<u64> = first
            .iter()
            .map(fact)
            .filter(|f| f.0 == st)
            .map(|f| f.1)
            .collect();
        assert_eq!(seqs, vec![2, 3, 4], "{st} in order from the head");
    }
    drop(c);
    let mut later = Vec::new();
    for round in 3..5 {
        for st in streams {
            let seq = api.publish(st, json!({"s": st, "r": round})).await["seq"]
                .as_u64()
                .unwrap();
            later.push((st.to_string(), seq));
        }
    }
    // Cut after each message of the first response: the id there resumes all three streams.
    for k in [0usize, 4, 8] {
        let id = first[k].id.clone().expect("every event has an id");
        let mut want: Vec<(String, u64)> = first[k + 1..]
            .iter()
            .map(fact)
            .map(|f| (f.0, f.1))
            .collect();
        want.extend(later.iter().cloned());
        let mut c = SseClient::connect(&url, &[("last-event-id", &id)])
            .await
            .unwrap();
        let got: Vec<(String, u64)> = c
            .events(want.len())
            .await
            .iter()
            .map(fact)
            .map(|f| (f.0, f.1))
            .collect();
        for st in streams {
            let of = |v: &[(String, u64)]| -> Vec<u64> {
                v.iter().filter(|f| f.0 == st).map(|f| f.1).collect()
            };
            assert_eq!(
                of(&got),
                of(&want),
                "{st} resumed exactly after message {k}"
            );
        }
        assert!(
            c.next_within(Duration::from_millis(300)).await.is_none(),
            "no duplicates after message {k}"
        );
        // The same cursor as `?lastEventId=` (a new EventSource) answers the same.
        let mut q = SseClient::connect(&format!("{url}&lastEventId={}", urlencode(&id)), &[])
            .await
            .unwrap();
        assert_eq!(q.events(want.len()).await.len(), want.len());
        assert!(q.next_within(Duration::from_millis(200)).await.is_none());
    }
    // Stored data intact: what was published, in order.
    for st in streams {
        let rows = stored(&api, st).await;
        assert_eq!(rows.len(), 6, "{st}");
        assert_eq!(rows[0], (1, json!({"before": st})));
        for (i, (seq, data)) in rows[1..].iter().enumerate() {
            assert_eq!(*seq, i as u64 + 2);
            assert_eq!(*data, json!({"s": st, "r": i}));
        }
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_streams_interleave_and_resume_exactly_on_sqlite() {
    let s = TestServer::start().await;
    interleave_then_resume(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_streams_interleave_and_resume_exactly_on_redis() {
    let redis = RedisServer::start().expect("start redis-server");
    let url = redis.url();
    let s = TestServer::with(|c| {
        c.store = StoreChoice::Redis;
        c.redis_url = url;
    })
    .await;
    interleave_then_resume(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_cursors_and_ungranted_streams_are_typed_refusals() {
    let s = TestServer::with(|c| c.max_streams_per_session = 3).await;
    let api = s.api();
    api.publish("ok:a", json!(1)).await;
    let epoch = api.info("ok:a").await["epoch"]
        .as_str()
        .unwrap()
        .to_string();
    let tok = s.token("u1", &["ok:*"]);
    let base = format!("{}/v1/sse?token={tok}", s.url);
    let refused = |url: String, lei: Option<String>| async move {
        let h: Vec<(&str, &str)> = match &lei {
            Some(v) => vec![("last-event-id", v.as_str())],
            None => vec![],
        };
        match SseClient::connect(&url, &h).await {
            Ok(_) => panic!("{url} {lei:?} was served"),
            Err(r) => (
                r.status,
                r.json["error"]["code"].as_str().unwrap_or("").to_string(),
                r.json["error"]["message"].is_string(),
            ),
        }
    };
    let invalid = (400, "INVALID_REQUEST".to_string(), true);
    for lei in [
        "garbage".to_string(),
        format!("{epoch}:ok:a"),
        format!("{epoch}:ok:a=x"),
        format!("{epoch}:ok:a=1,ok:a=2"),
        // Names a stream that is not in ?streams=.
        format!("{epoch}:ok:a=1,ok:z=1"),
    ] {
        assert_eq!(
            refused(format!("{base}&streams=ok:a,ok:b"), Some(lei.clone())).await,
            invalid,
            "{lei}"
        );
    }
    // A cursor forged for a stream the token does not grant, and ?streams= naming one.
    assert_eq!(
        refused(
            format!("{base}&streams=ok:a,secret:x"),
            Some(format!("{epoch}:ok:a=1,secret:x=0"))
        )
        .await,
        (403, "FORBIDDEN".to_string(), true)
    );
    assert_eq!(
        refused(format!("{base}&streams=secret:x"), None).await,
        (403, "FORBIDDEN".to_string(), true)
    );
    for streams in [
        "",
        "ok:a,,ok:b",
        "ok:a,ok:a",
        "ok:a,ok:b,ok:c,ok:d",
        "bad stream",
    ] {
        assert_eq!(
            refused(format!("{base}&streams={streams}"), None).await,
            invalid,
            "{streams}"
        );
    }
    assert_eq!(
        refused(format!("{}/v1/sse?streams=ok:a", s.url), None).await,
        (401, "UNAUTHORIZED".to_string(), true)
    );
    // Nothing was written by the refusals.
    assert_eq!(stored(&api, "ok:a").await, vec![(1, json!(1))]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hole_resets_its_stream_while_the_others_go_on() {
    let s = TestServer::with(|c| c.retention.max_events = 5).await;
    let api = s.api();
    for i in 1..=10 {
        api.publish("h:trim", json!(i)).await;
    }
    api.publish("h:ok", json!("x")).await;
    api.publish("h:ok", json!("y")).await;
    let epoch = api.info("h:ok").await["epoch"]
        .as_str()
        .unwrap()
        .to_string();
    let tok = s.token("u1", &["h:*"]);
    let url = format!("{}/v1/sse?streams=h:trim,h:ok,h:epoch&token={tok}", s.url);
    // h:trim asks for a trimmed position, h:epoch for another epoch, h:ok goes on exactly.
    let lei = format!("{epoch}:h:trim=2,h:ok=1;0000000000000000:h:epoch=3");
    let mut c = SseClient::connect(&url, &[("last-event-id", &lei)])
        .await
        .unwrap();
    let mut resets = Vec::new();
    let mut events = Vec::new();
    while let Some(e) = c.next_within(Duration::from_millis(500)).await {
        match e.event.as_str() {
            "reset" => resets.push(e.json()),
            "event" => events.push(fact(&e)),
            other => panic!("unexpected {other}"),
        }
    }
    resets.sort_by_key(|r| r["stream"].as_str().unwrap().to_string());
    assert_eq!(resets.len(), 2, "{resets:?}");
    assert_eq!(resets[0]["stream"], "h:epoch");
    assert_eq!(resets[0]["code"], "EPOCH_CHANGED");
    assert_eq!(resets[1]["stream"], "h:trim");
    assert_eq!(resets[1]["code"], "REPLAY_WINDOW_TRIMMED");
    assert_eq!(resets[1]["firstAvailableSeq"], 6);
    let of = |st: &str| -> Vec<u64> { events.iter().filter(|f| f.0 == st).map(|f| f.1).collect() };
    assert_eq!(of("h:trim"), vec![6, 7, 8, 9, 10]);
    assert_eq!(of("h:ok"), vec![2]);
    assert!(of("h:epoch").is_empty());
    // The stream that had a hole goes on live with the others.
    api.publish("h:epoch", json!("e1")).await;
    api.publish("h:trim", json!(11)).await;
    let live = c.events(2).await;
    let mut got: Vec<(String, u64)> = live.iter().map(fact).map(|f| (f.0, f.1)).collect();
    got.sort();
    assert_eq!(
        got,
        vec![("h:epoch".to_string(), 1), ("h:trim".to_string(), 11)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_ends_one_stream_and_the_response_ends_after_the_last() {
    let s = TestServer::start().await;
    let api = s.api();
    let key = api.creds.api_key.clone();
    let close = |stream: &str| {
        let path = format!("/v1/streams/{stream}/close");
        let (api, key) = (s.api(), key.clone());
        async move {
            let r = api
                .request(reqwest::Method::POST, &path, Some(&key), None, &[])
                .await;
            assert_eq!(r.status, 200, "{}", r.text);
        }
    };
    let tok = s.token("u1", &["c:*"]);
    let url = format!("{}/v1/sse?streams=c:1,c:2&token={tok}", s.url);
    let mut c = SseClient::connect(&url, &[]).await.unwrap();
    api.publish("c:1", json!(1)).await;
    api.publish("c:2", json!(1)).await;
    assert_eq!(c.events(2).await.len(), 2);
    close("c:1").await;
    let e = c.next().await;
    assert_eq!(e.event, "closed");
    assert_eq!(e.json(), json!({"stream": "c:1", "lastSeq": 1}));
    // The other stream goes on; its id still carries the closed stream at its last seq.
    api.publish("c:2", json!(2)).await;
    let e = c.next().await;
    assert_eq!(fact(&e).1, 2);
    let id = e.id.unwrap();
    assert!(id.contains("c:1=1") && id.contains("c:2=2"), "{id}");
    close("c:2").await;
    let e = c.next().await;
    assert_eq!(e.json(), json!({"stream": "c:2", "lastSeq": 2}));
    assert!(
        c.next_within(Duration::from_secs(2)).await.is_none(),
        "the response ends after the last stream closed"
    );
    // A reconnect with that id gets both `closed` again at once, and nothing else.
    let mut c = SseClient::connect(&url, &[("last-event-id", &id)])
        .await
        .unwrap();
    let mut closed: Vec<String> = Vec::new();
    while let Some(e) = c.next_within(Duration::from_secs(2)).await {
        assert_eq!(e.event, "closed", "{e:?}");
        closed.push(e.json()["stream"].as_str().unwrap().to_string());
    }
    closed.sort();
    assert_eq!(closed, vec!["c:1", "c:2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_resumes_every_stream_from_its_ack_and_the_cursor_wins() {
    let s = TestServer::start().await;
    let api = s.api();
    let tok = s.token("u1", &["r:*"]);
    let sess = api
        .post(
            "/v1/sessions",
            Some(&tok),
            json!({"streams": ["r:1", "r:2"]}),
        )
        .await
        .json;
    let rt = sess["resumeToken"].as_str().unwrap().to_string();
    for i in 1..=2 {
        api.publish("r:1", json!(i)).await;
        api.publish("r:2", json!(i)).await;
    }
    let url = format!("{}/v1/sse?streams=r:1,r:2&resume={rt}", s.url);
    let mut c = SseClient::connect(&url, &[]).await.unwrap();
    let evs = c.events(4).await;
    let mut got: Vec<(String, u64)> = evs.iter().map(fact).map(|f| (f.0, f.1)).collect();
    got.sort();
    let want = |v: &[(&str, u64)]| -> Vec<(String, u64)> {
        v.iter().map(|(s, n)| (s.to_string(), *n)).collect()
    };
    assert_eq!(got, want(&[("r:1", 1), ("r:1", 2), ("r:2", 1), ("r:2", 2)]));
    let id = evs[1].id.clone().unwrap();
    drop(c);
    api.publish("r:1", json!(3)).await;
    let mut c = SseClient::connect(&url, &[("last-event-id", &id)])
        .await
        .unwrap();
    let mut got: Vec<(String, u64)> = Vec::new();
    while let Some(e) = c.next_within(Duration::from_millis(400)).await {
        let f = fact(&e);
        got.push((f.0, f.1));
    }
    let mut expect: Vec<(String, u64)> = evs[2..].iter().map(fact).map(|f| (f.0, f.1)).collect();
    expect.push(("r:1".to_string(), 3));
    got.sort();
    expect.sort();
    assert_eq!(got, expect, "after {id}");
    // A stream outside the session is refused.
    let r = SseClient::connect(
        &format!("{}/v1/sse?streams=r:1,r:9&resume={rt}", s.url),
        &[],
    )
    .await
    .err()
    .expect("refused");
    assert_eq!(
        (r.status, r.json["error"]["code"].as_str()),
        (403, Some("FORBIDDEN"))
    );
    assert_eq!(r.json["error"]["stream"], "r:9");
}
