//! Clients that move between instances the way real ones do, and a publisher that never
//! gives up on an event, for drills across a cluster.
//!
//! - [`WsRoamer`]: a WebSocket client that opens a session on one instance, subscribes from
//!   seq 0, and whenever it is told to `reconnect` (drain) or loses its socket (crash) resumes
//!   on the next instance with its newest resume token and `lastAck` = the last seq it holds.
//! - [`SseRoamer`]: an `EventSource`-like client: when its response ends it reconnects to the
//!   next instance with `Last-Event-ID`.
//! - [`Publisher`]: publishes round-robin over streams and instances with an
//!   `Idempotency-Key` per event, retrying an unanswered publish on the next instance, so
//!   each event is stored exactly once whatever happens to the instance it went to.
//!
//! Each client keeps its own [`Tally`]: what it accepted after dropping seqs it already had,
//! which is what an application would see. Every loop is bounded by a deadline.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::http::Api;
use crate::sse::{SseClient, SseRead};
use crate::ws::{Next, WsClient};

/// The heads every client must reach before it stops (set once publishing has stopped).
pub type Finish = watch::Receiver<Option<Arc<BTreeMap<String, u64>>>>;

/// A pause between attempts at an instance that refused or is not there.
const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// What one client saw.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    pub name: String,
    /// Seqs accepted per stream, in arrival order, after dropping those already held.
    pub seqs: BTreeMap<String, Vec<u64>>,
    /// Events dropped by the client's dedupe (seq at or below the last one it holds).
    pub duplicates: u64,
    /// `(stream, expected, got)`: an event arrived past a hole.
    pub gaps: Vec<(String, u64, u64)>,
    /// Error frames, SSE resets, failed resumes, timeouts.
    pub errors: Vec<String>,
    /// Times the server told the client to go (`reconnect` frame, SSE response ended).
    pub told_to_move: u32,
    /// When each of those happened.
    pub told_at: Vec<Instant>,
    /// Times the connection broke without being told (crash, network).
    pub lost: u32,
    /// Successful reconnects (each a resume on some instance).
    pub resumed: u32,
    /// Attempts refused before a reconnect succeeded (`DRAINING`, nothing listening, …).
    pub refused: u32,
    /// Connection attempts that reached an instance but could not resume the session.
    pub failed_resumes: u32,
    /// Instances that served this client, in order.
    pub instances: Vec<String>,
    /// How long each reconnect took, from losing the old connection to the new one resumed.
    pub reconnect_ms: Vec<u64>,
}

impl Tally {
    fn accept(&mut self, stream: &str, seq: u64, last: &mut u64) {
        if seq <= *last {
            self.duplicates += 1;
            return;
        }
        if seq != *last + 1 {
            self.gaps.push((stream.to_string(), *last + 1, seq));
        }
        *last = seq;
        self.seqs.entry(stream.to_string()).or_default().push(seq);
    }

    fn visited(&mut self, instance: &str) {
        if self.instances.last().map(String::as_str) != Some(instance) {
            self.instances.push(instance.to_string());
        }
    }

    /// Every seq `1..=head` of each of its streams exactly once, in order, and no error.
    pub fn check(&self, heads: &BTreeMap<String, u64>) -> Result<(), String> {
        if !self.errors.is_empty() {
            return Err(format!("{}: errors {:?}", self.name, self.errors));
        }
        if !self.gaps.is_empty() {
            return Err(format!("{}: gaps {:?}", self.name, self.gaps));
        }
        for (stream, seqs) in &self.seqs {
            let head = heads.get(stream).copied().unwrap_or(0);
            let want: Vec<u64> = (1..=head).collect();
            if *seqs != want {
                let missing = want.iter().filter(|s| !seqs.contains(s)).count();
                return Err(format!(
                    "{}: {stream} has {} events, {missing} missing, head {head}",
                    self.name,
                    seqs.len()
                ));
            }
        }
        Ok(())
    }
}

fn done(finish: &Finish, last: &BTreeMap<String, u64>) -> bool {
    match finish.borrow().as_ref() {
        Some(heads) => last
            .iter()
            .all(|(s, seq)| *seq >= heads.get(s).copied().unwrap_or(0)),
        None => false,
    }
}

/// A WebSocket client that follows `reconnect` frames and survives crashes.
pub struct WsRoamer {
    pub name: String,
    /// `ws://host:port` of every instance.
    pub urls: Vec<String>,
    /// Index of the instance it connects to first.
    pub start: usize,
    /// Connect token (used for the first connection only).
    pub token: String,
    pub streams: Vec<String>,
    /// Send an `ack` every this many events (0: never).
    pub ack_every: u64,
    /// Gives up (with an error in its tally) after this long.
    pub deadline: Duration,
}

impl WsRoamer {
    pub fn spawn(self, finish: Finish) -> JoinHandle<Tally> {
        tokio::spawn(self.run(finish))
    }

    async fn run(self, finish: Finish) -> Tally {
        let mut t = Tally {
            name: self.name.clone(),
            ..Tally::default()
        };
        let n = self.urls.len().max(1);
        let until = Instant::now() + self.deadline;
        let mut idx = self.start % n;
        let mut resume: Option<String> = None;
        let mut last: BTreeMap<String, u64> = self.streams.iter().map(|s| (s.clone(), 0)).collect();
        let mut since_ack = 0u64;
        let mut confirmed: std::collections::BTreeSet<String> = Default::default();
        let mut lost_at: Option<Instant> = None;
        while Instant::now() < until {
            let resumed_session = resume.is_some();
            let url = match &resume {
                None => format!("{}/v1/ws?token={}", self.urls[idx], self.token),
                Some(_) => format!("{}/v1/ws", self.urls[idx]),
            };
            let mut ws = match WsClient::connect(&url).await {
                Ok(ws) => ws,
                Err(_) => {
                    t.refused += 1;
                    idx = (idx + 1) % n;
                    tokio::time::sleep(RETRY_PAUSE).await;
                    continue;
                }
            };
            if let Some(token) = &resume {
                let frame = json!({"type": "resume", "resumeToken": token, "lastAck": last});
                if !ws.try_send(frame).await {
                    t.refused += 1;
                    idx = (idx + 1) % n;
                    continue;
                }
            }
            // The welcome, or why not.
            match ws.next_within(crate::WAIT).await {
                Next::Frame(f) if f["type"] == "welcome" => {
                    resume = f["resumeToken"].as_str().map(String::from).or(resume);
                    t.visited(f["instance"].as_str().unwrap_or("?"));
                }
                Next::Frame(f) => {
                    // A session-level error (the socket closes after it).
                    t.failed_resumes += 1;
                    t.errors.push(format!("on connect: {f}"));
                    return t;
                }
                Next::Closed(_) | Next::Timeout => {
                    // Closed before a welcome: it may have been draining at that moment.
                    t.refused += 1;
                    idx = (idx + 1) % n;
                    tokio::time::sleep(RETRY_PAUSE).await;
                    continue;
                }
            }
            if resumed_session {
                t.resumed += 1;
            }
            if let Some(at) = lost_at.take() {
                t.reconnect_ms.push(at.elapsed().as_millis() as u64);
            }
            // Streams the session does not hold yet (a first connection, or one cut off before
            // its subscriptions were confirmed) are subscribed from what the client holds.
            for s in &self.streams {
                if !confirmed.contains(s) {
                    let after = last.get(s).copied().unwrap_or(0);
                    ws.try_send(json!({"type": "subscribe", "stream": s, "after": after}))
                        .await;
                }
            }
            // Read until told to go or cut off.
            loop {
                if done(&finish, &last) {
                    ws.close().await;
                    return t;
                }
                if Instant::now() >= until {
                    break;
                }
                match ws.next_within(Duration::from_millis(200)).await {
                    Next::Timeout => {}
                    Next::Frame(f) => match f["type"].as_str().unwrap_or("") {
                        "event" => {
                            let stream = f["stream"].as_str().unwrap_or("").to_string();
                            let seq = f["seq"].as_u64().unwrap_or(0);
                            let Some(l) = last.get_mut(&stream) else {
                                t.errors
                                    .push(format!("event of a stream never subscribed: {f}"));
                                continue;
                            };
                            t.accept(&stream, seq, l);
                            since_ack += 1;
                            if self.ack_every > 0 && since_ack >= self.ack_every {
                                since_ack = 0;
                                let ack = json!({"type": "ack", "stream": stream, "seq": *l});
                                ws.try_send(ack).await;
                            }
                        }
                        "ping" => {
                            ws.try_send(json!({"type": "pong", "t": f["t"]})).await;
                        }
                        "subscribed" => {
                            if let Some(s) = f["stream"].as_str() {
                                confirmed.insert(s.to_string());
                            }
                        }
                        "token" | "welcome" => {
                            resume = f["resumeToken"].as_str().map(String::from).or(resume);
                        }
                        "reconnect" => {
                            resume = f["resumeToken"].as_str().map(String::from).or(resume);
                            t.told_to_move += 1;
                            t.told_at.push(Instant::now());
                            lost_at = Some(Instant::now());
                            break;
                        }
                        "error" => t.errors.push(f.to_string()),
                        _ => {}
                    },
                    Next::Closed(code) => {
                        if code == Some(4409) {
                            t.errors.push("taken over".into());
                            return t;
                        }
                        t.lost += 1;
                        lost_at = Some(Instant::now());
                        break;
                    }
                }
            }
            drop(ws);
            idx = (idx + 1) % n;
        }
        t.errors.push(format!("deadline: last seqs {last:?}"));
        t
    }
}

/// An `EventSource`-like client on one stream that reconnects elsewhere with `Last-Event-ID`.
pub struct SseRoamer {
    pub name: String,
    /// `http://host:port` of every instance.
    pub urls: Vec<String>,
    pub start: usize,
    pub token: String,
    pub stream: String,
    pub deadline: Duration,
}

impl SseRoamer {
    pub fn spawn(self, finish: Finish) -> JoinHandle<Tally> {
        tokio::spawn(self.run(finish))
    }

    async fn run(self, finish: Finish) -> Tally {
        let mut t = Tally {
            name: self.name.clone(),
            ..Tally::default()
        };
        let client = reqwest::Client::new();
        let n = self.urls.len().max(1);
        let until = Instant::now() + self.deadline;
        let mut idx = self.start % n;
        let mut last_id: Option<String> = None;
        let mut epoch: Option<String> = None;
        let mut last: BTreeMap<String, u64> = BTreeMap::from([(self.stream.clone(), 0)]);
        let mut lost_at: Option<Instant> = None;
        while Instant::now() < until {
            let url = format!(
                "{}/v1/streams/{}/sse?token={}&after=0",
                self.urls[idx], self.stream, self.token
            );
            let headers: Vec<(&str, &str)> = match &last_id {
                Some(id) => vec![("last-event-id", id.as_str())],
                None => vec![],
            };
            let mut sse = match SseClient::try_connect(&client, &url, &headers).await {
                Ok(s) => s,
                Err(refused) => {
                    if refused.status != 0 && refused.status != 503 {
                        t.failed_resumes += 1;
                        t.errors
                            .push(format!("refused {}: {}", refused.status, refused.json));
                        return t;
                    }
                    t.refused += 1;
                    idx = (idx + 1) % n;
                    tokio::time::sleep(RETRY_PAUSE).await;
                    continue;
                }
            };
            t.visited(&self.urls[idx]);
            if let Some(at) = lost_at.take() {
                t.resumed += 1;
                t.reconnect_ms.push(at.elapsed().as_millis() as u64);
            }
            loop {
                if done(&finish, &last) {
                    return t;
                }
                if Instant::now() >= until {
                    break;
                }
                match sse.read(Duration::from_millis(200)).await {
                    SseRead::Timeout => {}
                    SseRead::Ended => {
                        t.told_to_move += 1;
                        t.told_at.push(Instant::now());
                        lost_at = Some(Instant::now());
                        break;
                    }
                    SseRead::Broken => {
                        t.lost += 1;
                        lost_at = Some(Instant::now());
                        break;
                    }
                    SseRead::Event(ev) if ev.event == "event" => {
                        let v: Value = serde_json::from_str(&ev.data).unwrap_or(Value::Null);
                        let e = v["epoch"].as_str().unwrap_or("").to_string();
                        if epoch.as_ref().is_some_and(|old| *old != e) {
                            t.errors
                                .push(format!("epoch changed to {e} without a reset"));
                        }
                        epoch = Some(e);
                        last_id = ev.id.clone();
                        let seq = v["seq"].as_u64().unwrap_or(0);
                        if let Some(l) = last.get_mut(&self.stream) {
                            t.accept(&self.stream, seq, l);
                        }
                    }
                    SseRead::Event(ev) => t.errors.push(format!("{}: {}", ev.event, ev.data)),
                }
            }
            idx = (idx + 1) % n;
        }
        t.errors.push(format!("deadline: last seqs {last:?}"));
        t
    }
}

/// What a publisher got acknowledged.
#[derive(Debug, Default, Clone)]
pub struct Published {
    /// Per stream: `(seq, n)` for every 201, `n` being the publisher's own counter in `data`.
    pub acked: BTreeMap<String, Vec<(u64, u64)>>,
    /// Publishes that had to go to another instance (or try again) before a 201.
    pub retries: u64,
    /// Events that never got a 201 within the attempt limit.
    pub failures: Vec<String>,
    /// Non-201 answers seen, by status (0: no answer at all).
    pub statuses: BTreeMap<u16, u64>,
}

impl Published {
    pub fn count(&self) -> usize {
        self.acked.values().map(Vec::len).sum()
    }
}

/// Publishes `{"n": k}` to `streams[k % len]` through `apis[k % len]` every `every`, until
/// told to stop.
pub struct Publisher {
    pub apis: Vec<Api>,
    pub streams: Vec<String>,
    pub every: Duration,
    /// Attempts per event (across instances) before it counts as a failure.
    pub attempts: usize,
}

impl Publisher {
    pub fn spawn(self, stop: watch::Receiver<bool>) -> JoinHandle<Published> {
        tokio::spawn(self.run(stop))
    }

    async fn run(self, stop: watch::Receiver<bool>) -> Published {
        let mut out = Published::default();
        let n = self.apis.len().max(1);
        let mut tick = tokio::time::interval(self.every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let nonce = crate::free_port();
        let mut k: u64 = 0;
        while !*stop.borrow() {
            tick.tick().await;
            let stream = &self.streams[(k as usize) % self.streams.len()];
            let key = format!("roam-{nonce}-{k}");
            let body = json!({"data": {"n": k}}).to_string();
            let mut ok = false;
            // Bounded in count (`attempts`) and in time: one event never holds the run up for
            // more than half a minute.
            let give_up = tokio::time::Instant::now() + Duration::from_secs(30);
            for attempt in 0..self.attempts {
                let api = &self.apis[(k as usize + attempt) % n];
                if attempt > 0 && tokio::time::Instant::now() >= give_up {
                    break;
                }
                if attempt > 0 {
                    out.retries += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                let res = api
                    .client
                    .post(format!("{}/v1/streams/{stream}/events", api.base))
                    .bearer_auth(&api.creds.api_key)
                    .header("idempotency-key", &key)
                    .header("content-type", "application/json")
                    .timeout(Duration::from_secs(5))
                    .body(body.clone())
                    .send()
                    .await;
                let Ok(res) = res else {
                    *out.statuses.entry(0).or_default() += 1;
                    continue;
                };
                let status = res.status().as_u16();
                if status != 201 {
                    *out.statuses.entry(status).or_default() += 1;
                    continue;
                }
                let Ok(v) = res.json::<Value>().await else {
                    continue;
                };
                if let Some(seq) = v["seq"].as_u64() {
                    out.acked.entry(stream.clone()).or_default().push((seq, k));
                    ok = true;
                    break;
                }
            }
            if !ok {
                out.failures.push(format!("{stream} n={k}"));
            }
            k += 1;
        }
        out
    }
}

/// Reads a stream's whole log through `api` and checks it against what was acknowledged:
/// seqs `1..=head` without a gap, one event per acknowledged publish, each at the seq its 201
/// named with the data that was sent. Returns the head.
pub async fn verify_log(api: &Api, stream: &str, acked: &[(u64, u64)]) -> Result<u64, String> {
    let mut events: Vec<Value> = Vec::new();
    let mut after = 0u64;
    for _ in 0..10_000 {
        let page = api.read(stream, after, 1000).await;
        if page.status != 200 {
            return Err(format!("{stream}: read answered {}", page.status));
        }
        let evs = page.json["events"].as_array().cloned().unwrap_or_default();
        let Some(last) = evs.last() else { break };
        after = last["seq"].as_u64().unwrap_or(u64::MAX);
        events.extend(evs);
    }
    let seqs: Vec<u64> = events.iter().filter_map(|e| e["seq"].as_u64()).collect();
    let head = seqs.len() as u64;
    if seqs != (1..=head).collect::<Vec<_>>() {
        return Err(format!("{stream}: the log has holes"));
    }
    if acked.len() as u64 != head {
        return Err(format!(
            "{stream}: {} publishes acknowledged, {head} events in the log",
            acked.len()
        ));
    }
    for (seq, n) in acked {
        let stored = &events[(*seq - 1) as usize]["data"]["n"];
        if stored.as_u64() != Some(*n) {
            return Err(format!("{stream}: seq {seq} holds {stored}, not n={n}"));
        }
    }
    Ok(head)
}
