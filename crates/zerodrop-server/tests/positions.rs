//! One answer per position case, on every entry point (docs/protocol.md, "Position answers").
//!
//! The same cases — in window, trimmed, other epoch, beyond head, unknown stream, not granted —
//! run through every way a client names a position: WebSocket `resume` (`lastAck`) and
//! `subscribe` (`after`, `epoch`), `POST /v1/sessions` (`after`), the HTTP reconnect
//! (`lastAckSequence`), the HTTP checkpoint, SSE (`Last-Event-ID`; `?resume=` with `?after=`)
//! and the HTTP read (`?after=`). Each answer is reduced to the same shape (served from a seq,
//! or refused with a code and the hole's facts) and must equal the case's one answer.
//!
//! The server runs on Redis so that a stream can change epoch under a session that holds it
//! (the stream's epoch is rewritten beside its log, as if the log had been lost and
//! recreated), which is the only way a position without an epoch meets another one.

use std::time::Duration;

use serde_json::{Value, json};
use zerodrop_server::config::StoreChoice;
use zerodrop_testkit::redis::RedisServer;
use zerodrop_testkit::server::TestServer;
use zerodrop_testkit::sse::SseClient;
use zerodrop_testkit::ws::{Next, WsClient};

/// Events published on every stream of a case; retention keeps the last 5 (16..=20).
const PUBLISHED: u64 = 20;
const FIRST: u64 = 16;
const OTHER_EPOCH: &str = "00000000000000aa";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Case {
    InWindow,
    Trimmed,
    OtherEpoch,
    BeyondHead,
    UnknownStream,
    NotGranted,
}

const CASES: [Case; 6] = [
    Case::InWindow,
    Case::Trimmed,
    Case::OtherEpoch,
    Case::BeyondHead,
    Case::UnknownStream,
    Case::NotGranted,
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Entry {
    WsResume,
    WsSubscribe,
    OpenSession,
    Reconnect,
    Checkpoint,
    SseLastEventId,
    SseResumeAfter,
    HttpRead,
}

const ENTRIES: [Entry; 8] = [
    Entry::WsResume,
    Entry::WsSubscribe,
    Entry::OpenSession,
    Entry::Reconnect,
    Entry::Checkpoint,
    Entry::SseLastEventId,
    Entry::SseResumeAfter,
    Entry::HttpRead,
];

/// An entry point's answer, reduced to what every transport must agree on.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Answer {
    /// Served: delivery starts at this seq (`None`: the entry point says only that it
    /// accepted the position, as a checkpoint does).
    Served(Option<u64>),
    /// A hole or a refusal: the code and the facts a client resyncs from.
    Refused {
        code: String,
        epoch: Option<String>,
        first_available: Option<u64>,
        head: Option<u64>,
    },
    /// The entry point does not look at a position for a stream its session does not hold
    /// (WebSocket `resume`, HTTP reconnect): nothing is answered for it.
    Ignored,
}

fn refused(e: &Value) -> Answer {
    Answer::Refused {
        code: e["code"].as_str().unwrap_or("").to_string(),
        epoch: e["epoch"].as_str().map(str::to_string),
        first_available: e["firstAvailableSeq"].as_u64(),
        head: e["headSeq"].as_u64(),
    }
}

fn hole(code: &str, epoch: &str, first: u64, head: u64) -> Answer {
    Answer::Refused {
        code: code.into(),
        epoch: Some(epoch.into()),
        first_available: Some(first),
        head: Some(head),
    }
}

fn forbidden() -> Answer {
    Answer::Refused {
        code: "FORBIDDEN".into(),
        epoch: None,
        first_available: None,
        head: None,
    }
}

/// One case on one entry point: the stream, the position the client holds, and the epoch it
/// believes that position belongs to.
struct Setup<'a> {
    s: &'a TestServer,
    redis: &'a RedisServer,
    stream: String,
    after: u64,
    /// The epoch the stream had when the client learned its position.
    epoch: String,
    /// Rewrites the stream's epoch after the client's session (if any) holds it.
    move_epoch: bool,
    /// The token grants `room:*`; a `secret:` stream is not granted.
    granted: bool,
}

impl Setup<'_> {
    fn token(&self) -> String {
        self.s.token("u1", &["room:*"])
    }

    /// The stream the session holds: the case's stream when it may, else a granted one.
    fn held(&self) -> String {
        if self.granted {
            self.stream.clone()
        } else {
            format!("room:held-{}", self.stream)
        }
    }

    async fn open(&self) -> (String, String) {
        let r = self
            .s
            .api()
            .post(
                "/v1/sessions",
                Some(&self.token()),
                json!({"streams": [self.held()]}),
            )
            .await;
        assert_eq!(r.status, 201, "{}", r.text);
        let sid = r.json["sessionId"].as_str().unwrap().to_string();
        let token = r.json["resumeToken"].as_str().unwrap().to_string();
        self.after_open().await;
        (sid, token)
    }

    /// What happens to the log once the client holds its position.
    async fn after_open(&self) {
        if self.move_epoch {
            let key = format!("zd:{{{}}}:m", self.stream);
            self.redis
                .cmd(&["HSET", &key, "epoch", OTHER_EPOCH])
                .expect("rewrite the stream's epoch");
        }
    }
}

async fn ws_answer(c: &mut WsClient, stream: &str) -> Answer {
    for _ in 0..10 {
        match c.next_within(Duration::from_secs(2)).await {
            Next::Frame(v) => match v["type"].as_str() {
                Some("subscribed") if v["stream"] == stream => {
                    return Answer::Served(v["fromSeq"].as_u64());
                }
                Some("error") if v["stream"] == stream => return refused(&v),
                _ => continue,
            },
            Next::Timeout => return Answer::Ignored,
            other => panic!("the socket ended: {other:?}"),
        }
    }
    panic!("no answer for {stream}")
}

async fn sse_answer(url: &str, headers: &[(&str, &str)]) -> Answer {
    match SseClient::connect(url, headers).await {
        Err(r) => refused(&r.json["error"]),
        Ok(mut c) => {
            let e = c.next().await;
            match e.event.as_str() {
                "reset" => refused(&e.json()),
                _ => Answer::Served(e.json()["seq"].as_u64()),
            }
        }
    }
}

async fn ask(entry: Entry, t: &Setup<'_>) -> Answer {
    let s = t.s;
    let api = s.api();
    let stream = t.stream.as_str();
    match entry {
        Entry::WsResume => {
            let (_, token) = t.open().await;
            let mut c = WsClient::connect(&format!("{}/v1/ws", s.ws_url()))
                .await
                .unwrap();
            c.send(json!({"type": "resume", "resumeToken": token, "lastAck": {stream: t.after}}))
                .await;
            c.expect("welcome").await;
            ws_answer(&mut c, stream).await
        }
        Entry::WsSubscribe => {
            let mut c = WsClient::connect(&format!("{}/v1/ws?token={}", s.ws_url(), t.token()))
                .await
                .unwrap();
            c.expect("welcome").await;
            t.after_open().await;
            c.send(
                json!({"type": "subscribe", "stream": stream, "after": t.after, "epoch": t.epoch}),
            )
            .await;
            ws_answer(&mut c, stream).await
        }
        Entry::OpenSession => {
            t.after_open().await;
            let body =
                json!({"streams": [stream], "after": {stream: {"seq": t.after, "epoch": t.epoch}}});
            let r = api.post("/v1/sessions", Some(&t.token()), body).await;
            if r.status == 201 {
                let ack = r.json["streams"][stream]["lastAckSequence"].as_u64();
                Answer::Served(ack.map(|a| a + 1))
            } else {
                refused(&r.json["error"])
            }
        }
        Entry::Reconnect => {
            let (sid, token) = t.open().await;
            let body = json!({"resumeToken": token, "lastAckSequence": {stream: t.after}});
            let r = api
                .post(&format!("/v1/sessions/{sid}/reconnect"), None, body)
                .await;
            assert_eq!(r.status, 200, "{}", r.text);
            let w = &r.json["replay"][stream];
            if w.is_null() {
                Answer::Ignored
            } else if w["error"].is_object() {
                refused(&w["error"])
            } else {
                Answer::Served(w["fromSeq"].as_u64())
            }
        }
        Entry::Checkpoint => {
            let (sid, token) = t.open().await;
            let body = json!({"stream": stream, "seq": t.after});
            let r = api
                .post(
                    &format!("/v1/sessions/{sid}/checkpoint"),
                    Some(&token),
                    body,
                )
                .await;
            if r.status == 200 {
                Answer::Served(None)
            } else {
                refused(&r.json["error"])
            }
        }
        Entry::SseLastEventId => {
            t.after_open().await;
            let url = format!("{}/v1/streams/{stream}/sse?token={}", s.url, t.token());
            let id = format!("{}:{}", t.epoch, t.after);
            sse_answer(&url, &[("last-event-id", &id)]).await
        }
        Entry::SseResumeAfter => {
            let (_, token) = t.open().await;
            let url = format!(
                "{}/v1/streams/{stream}/sse?resume={token}&after={}",
                s.url, t.after
            );
            sse_answer(&url, &[]).await
        }
        Entry::HttpRead => {
            t.after_open().await;
            let path = format!(
                "/v1/streams/{stream}/events?after={}&epoch={}&token={}",
                t.after,
                t.epoch,
                t.token()
            );
            let r = api.get(&path, None).await;
            if r.status == 200 {
                let first = r.json["events"][0]["seq"].as_u64();
                Answer::Served(first)
            } else {
                refused(&r.json["error"])
            }
        }
    }
}

/// The one answer each case has, whatever the entry point (docs/protocol.md).
fn expected(case: Case, entry: Entry, epoch: &str) -> Answer {
    let served_from = |from: u64| match entry {
        Entry::Checkpoint => Answer::Served(None),
        _ => Answer::Served(Some(from)),
    };
    match case {
        Case::InWindow => served_from(18),
        Case::Trimmed => hole("REPLAY_WINDOW_TRIMMED", epoch, FIRST, PUBLISHED),
        Case::OtherEpoch => hole("EPOCH_CHANGED", OTHER_EPOCH, FIRST, PUBLISHED),
        Case::BeyondHead => hole("ACK_BEYOND_HEAD", epoch, FIRST, PUBLISHED),
        Case::UnknownStream => hole("ACK_BEYOND_HEAD", epoch, 1, 0),
        Case::NotGranted => match entry {
            // These carry positions only for the session's own streams.
            Entry::WsResume | Entry::Reconnect => Answer::Ignored,
            _ => forbidden(),
        },
    }
}

fn slug(e: Entry) -> &'static str {
    match e {
        Entry::WsResume => "wsresume",
        Entry::WsSubscribe => "wssub",
        Entry::OpenSession => "open",
        Entry::Reconnect => "reconnect",
        Entry::Checkpoint => "ckpt",
        Entry::SseLastEventId => "sselei",
        Entry::SseResumeAfter => "sseafter",
        Entry::HttpRead => "read",
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_entry_point_gives_the_same_answer_to_each_position() {
    let redis = RedisServer::start().expect("start redis-server");
    let url = redis.url();
    let s = TestServer::with(|c| {
        c.store = StoreChoice::Redis;
        c.redis_url = url;
        c.retention.max_events = 5;
    })
    .await;
    let api = s.api();
    let base_epoch = api.info("room:nobody-yet").await["epoch"]
        .as_str()
        .unwrap()
        .to_string();
    let mut failures = Vec::new();
    for entry in ENTRIES {
        for case in CASES {
            let name = format!("{}-{case:?}", slug(entry)).to_lowercase();
            let (stream, granted) = match case {
                Case::NotGranted => (format!("secret:{name}"), false),
                _ => (format!("room:{name}"), true),
            };
            if !matches!(case, Case::UnknownStream | Case::NotGranted) {
                for i in 1..=PUBLISHED {
                    api.publish(&stream, json!(i)).await;
                }
            }
            let epoch = api.info(&stream).await["epoch"]
                .as_str()
                .unwrap_or(&base_epoch)
                .to_string();
            let after = match case {
                Case::InWindow => 17,
                Case::Trimmed => 3,
                Case::OtherEpoch => 18,
                Case::BeyondHead => 25,
                Case::UnknownStream | Case::NotGranted => 3,
            };
            let setup = Setup {
                s: &s,
                redis: &redis,
                stream,
                after,
                epoch: epoch.clone(),
                move_epoch: case == Case::OtherEpoch,
                granted,
            };
            let got = ask(entry, &setup).await;
            let want = expected(case, entry, &epoch);
            if got != want {
                failures.push(format!("{entry:?} / {case:?}: got {got:?}, want {want:?}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    s.stop().await;
}

/// A hole is counted once per session and event. An HTTP reconnect leaves the stream in the
/// session, so the same request twice gives the same answer (SPEC §3); a WebSocket resume
/// takes it out with its stream-level error, so the next resume does not repeat it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hole_is_counted_once_and_leaves_the_session_only_on_a_socket() {
    let s = TestServer::with(|c| c.retention.max_events = 5).await;
    let api = s.api();
    let tok = s.token("u1", &["room:*"]);
    let r = api
        .post("/v1/sessions", Some(&tok), json!({"streams": ["room:1"]}))
        .await;
    let sid = r.json["sessionId"].as_str().unwrap().to_string();
    let token = r.json["resumeToken"].as_str().unwrap().to_string();
    for i in 1..=20 {
        api.publish("room:1", json!(i)).await;
    }
    let reconnect = || api.reconnect(&sid, &token);
    let r = reconnect().await;
    assert_eq!(
        r.json["replay"]["room:1"]["error"]["code"], "REPLAY_WINDOW_TRIMMED",
        "{}",
        r.text
    );
    assert_eq!(r.json["replay"]["room:1"]["error"]["firstAvailableSeq"], 16);
    let dropped = api.metrics_json().await["ws_metrics"]["dropped_messages"].clone();
    assert_eq!(dropped, 15);
    let dropped_now = || {
        let api = api.clone();
        async move { api.metrics_json().await["ws_metrics"]["dropped_messages"].clone() }
    };
    let r = reconnect().await;
    assert_eq!(
        r.json["replay"]["room:1"]["error"]["code"], "REPLAY_WINDOW_TRIMMED",
        "the same request gives the same answer: {}",
        r.text
    );
    assert_eq!(dropped_now().await, dropped, "counted once");
    // A socket's resume answers the hole once more (not counted again) and drops the stream.
    let resume = |token: String| {
        let url = format!("{}/v1/ws?resume={token}", s.ws_url());
        async move {
            let mut ws = WsClient::connect(&url).await.expect("resume");
            let welcome = ws.expect("welcome").await;
            (ws, welcome["resumeToken"].as_str().unwrap().to_string())
        }
    };
    let (mut ws, token) = resume(token.clone()).await;
    let f = ws.expect("error").await;
    assert_eq!(
        (f["code"].as_str(), f["stream"].as_str()),
        (Some("REPLAY_WINDOW_TRIMMED"), Some("room:1")),
        "{f}"
    );
    ws.close().await;
    assert_eq!(dropped_now().await, dropped, "counted once");
    let (mut ws, _) = resume(token).await;
    ws.expect_silence(Duration::from_millis(300)).await;
    ws.close().await;
    assert_eq!(dropped_now().await, dropped);
    s.stop().await;
}
