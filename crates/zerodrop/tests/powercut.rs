//! Power cuts: the real binary keeps its data dir on a volume that loses every write not yet
//! fsynced (`zerodrop-lazyfs`, LazyFS semantics), under publishers over HTTP and WebSocket
//! (with and without idempotency keys), checkpoints, webhook intake and the job queue. At a
//! random moment the process is killed (`kill -9`) and the volume drops what was not synced;
//! the server starts again on what survived, and a checker compares the store with everything
//! that was acknowledged: every 201 (and `published`, and webhook 202) is in the log at its
//! seq with its content, no seq holds other content, nothing is there twice, each
//! publisher's writes keep their order, every applied checkpoint holds, every accepted job is
//! delivered, and every idempotency record (HTTP key, WebSocket frame id, webhook message id)
//! answers as it first did.
//!
//! `ZERODROP_POWERCUTS=N` sets the number of cuts (default 3: the suite's run; the figures in
//! docs/reliability.md come from `ZERODROP_POWERCUTS=100`). With
//! `ZERODROP_SQLITE_SYNCHRONOUS=normal` (inherited by the server) the store does not fsync
//! each commit and acknowledged writes are expected to go: the checker reports them and does
//! not fail. `ZERODROP_POWERCUT_SEED` replays a run's random cut moments; the seed is printed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use zerodrop_lazyfs::LazyFs;
use zerodrop_testkit::server::{Creds, ServerProcess};
use zerodrop_testkit::upstream::{FakeUpstream, Mode};
use zerodrop_testkit::ws::{Next, WsClient};

const BIN: &str = env!("CARGO_BIN_EXE_zerodrop");
const HTTP_STREAMS: [&str; 2] = ["pc:h0", "pc:h1"];
const WS_STREAM: &str = "pc:ws";
const WEBHOOK_STREAM: &str = "pc:wh";
/// Every request and frame wait is bounded by this.
const TIMEOUT: Duration = Duration::from_secs(5);

/// One acknowledged write: where the server said it is, and what it is.
#[derive(Clone, Debug)]
struct Write {
    stream: String,
    seq: u64,
    data: Value,
}

/// Everything the clients were told, and what the checks found so far.
#[derive(Default)]
struct Ledger {
    /// Per publisher, its acknowledged writes in the order the acknowledgements came; a write
    /// found lost is moved out, so it is counted once.
    writes: BTreeMap<String, Vec<Write>>,
    acknowledged: u64,
    /// HTTP `Idempotency-Key` publishes: (key, write).
    http_keys: Vec<(String, Write)>,
    /// WebSocket publishes with a frame id: (resume token, id, write).
    ws_ids: Vec<(String, u64, Write)>,
    /// Webhook messages answered 202: (message id, body, first answer).
    webhooks: Vec<(String, Value, Value)>,
    /// Checkpoints answered `applied`: (session, stream) → (resume token, seq).
    checkpoints: BTreeMap<(String, String), (String, u64)>,
    checkpoints_applied: u64,
    /// Non-success answers and broken connections, by error code.
    errors: BTreeMap<String, u64>,
    /// A publish sent with an idempotency key or id that got no answer before the cut: the
    /// next cycle retries it first, as a real client would.
    pending_http: Option<(String, Value)>,
    pending_webhook: Option<(String, Value)>,
    /// The WebSocket publisher with ids keeps its session across cuts.
    ws_session: Option<String>,
    ws_pending: Option<(u64, Value)>,
    counter: u64,
    findings: Findings,
    /// Positions already counted as duplicates.
    dup_seen: BTreeSet<(String, u64)>,
    /// Where lost writes were, and what they held: a later write there with other content
    /// is a seq reused.
    lost_at: BTreeMap<(String, u64), Value>,
    /// Idempotency records already found changed (counted once).
    idem_bad: BTreeSet<String>,
    /// How far the idempotency checks have gone.
    checked: (usize, usize, usize),
}

#[derive(Default, Debug, Clone)]
struct Findings {
    lost: u64,
    /// Lost writes whose seq now holds other content.
    seq_reused: u64,
    duplicated: u64,
    reordered: u64,
    checkpoints_regressed: u64,
    sessions_lost: u64,
    idempotency_changed: u64,
    jobs_lost: u64,
    secrets_changed: u64,
    epochs_changed: u64,
    /// Examples, for the failure message.
    notes: Vec<String>,
}

impl Findings {
    fn note(&mut self, s: String) {
        if self.notes.len() < 20 {
            self.notes.push(s);
        }
    }

    fn clean(&self) -> bool {
        self.lost
            + self.seq_reused
            + self.duplicated
            + self.reordered
            + self.checkpoints_regressed
            + self.sessions_lost
            + self.idempotency_changed
            + self.jobs_lost
            + self.secrets_changed
            + self.epochs_changed
            == 0
    }
}

type Shared = Arc<Mutex<Ledger>>;

fn lock(l: &Shared) -> std::sync::MutexGuard<'_, Ledger> {
    l.lock().unwrap_or_else(|p| p.into_inner())
}

impl Ledger {
    fn ack(&mut self, publisher: &str, w: Write) {
        self.acknowledged += 1;
        self.writes.entry(publisher.into()).or_default().push(w);
    }

    fn error(&mut self, code: &str) {
        *self.errors.entry(code.into()).or_default() += 1;
    }

    fn next(&mut self) -> u64 {
        self.counter += 1;
        self.counter
    }
}

/// A small deterministic generator: the cut moments, replayable from the printed seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

struct Http {
    client: reqwest::Client,
    base: String,
    creds: Creds,
}

impl Http {
    /// `Err` when no answer came (the server is gone or did not answer in time).
    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        bearer: &str,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> Result<(u16, Value), ()> {
        let mut r = self
            .client
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(bearer)
            .timeout(TIMEOUT);
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        if let Some(b) = body {
            r = r
                .header("content-type", "application/json")
                .body(b.to_string());
        }
        let res = r.send().await.map_err(|_| ())?;
        let status = res.status().as_u16();
        let text = res.text().await.map_err(|_| ())?;
        Ok((status, serde_json::from_str(&text).unwrap_or(Value::Null)))
    }

    async fn publish(
        &self,
        stream: &str,
        data: &Value,
        key: Option<&str>,
    ) -> Result<(u16, Value), ()> {
        let headers: Vec<(&str, &str)> = key.map(|k| ("idempotency-key", k)).into_iter().collect();
        let path = format!("/v1/streams/{stream}/events");
        self.send(
            reqwest::Method::POST,
            &path,
            &self.creds.api_key,
            Some(json!({"data": data})),
            &headers,
        )
        .await
    }

    async fn webhook(&self, id: &str, body: &Value) -> Result<(u16, Value), ()> {
        self.send(
            reqwest::Method::POST,
            "/v1/webhooks/pay",
            &self.creds.api_key,
            Some(body.clone()),
            &[("idempotency-key", id)],
        )
        .await
    }

    /// A stream's whole log: seq → data, and its epoch.
    async fn log(&self, stream: &str) -> Result<(BTreeMap<u64, Value>, Value), String> {
        let mut out = BTreeMap::new();
        let mut after = 0;
        let mut epoch = Value::Null;
        for _ in 0..10_000 {
            let path = format!("/v1/streams/{stream}/events?after={after}&limit=1000");
            let (status, body) = self
                .send(reqwest::Method::GET, &path, &self.creds.api_key, None, &[])
                .await
                .map_err(|_| format!("reading {stream}: no answer"))?;
            if status != 200 {
                return Err(format!("reading {stream}: {status} {body}"));
            }
            epoch = body["epoch"].clone();
            let events = body["events"].as_array().cloned().unwrap_or_default();
            let Some(last) = events.last().and_then(|e| e["seq"].as_u64()) else {
                break;
            };
            for e in events {
                out.insert(e["seq"].as_u64().unwrap_or(0), e["data"].clone());
            }
            after = last;
        }
        Ok((out, epoch))
    }
}

fn code_of(status: u16, body: &Value) -> String {
    body["error"]["code"]
        .as_str()
        .map(String::from)
        .unwrap_or_else(|| format!("HTTP {status}"))
}

/// The load of one cycle; every task ends when `stop` is set or its connection breaks.
fn start_load(
    http: &Arc<Http>,
    ws_url: &str,
    ledger: &Shared,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    // HTTP without a key, and HTTP with an Idempotency-Key (retried across the cut).
    for (i, stream) in HTTP_STREAMS.iter().enumerate() {
        let (http, ledger, stop) = (http.clone(), ledger.clone(), stop.clone());
        let keyed = i == 1;
        let stream = stream.to_string();
        tasks.push(tokio::spawn(async move {
            let me = format!("http{i}");
            for _ in 0..1_000_000 {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let (key, data) = {
                    let mut l = lock(&ledger);
                    match (keyed, l.pending_http.clone()) {
                        (true, Some(p)) => (Some(p.0), p.1),
                        _ => {
                            let n = l.next();
                            let data = json!({"p": me, "n": n});
                            let key = keyed.then(|| format!("k{n}"));
                            if let Some(k) = &key {
                                l.pending_http = Some((k.clone(), data.clone()));
                            }
                            (key, data)
                        }
                    }
                };
                let Ok((status, body)) = http.publish(&stream, &data, key.as_deref()).await else {
                    lock(&ledger).error("connection");
                    return;
                };
                let refused = {
                    let mut l = lock(&ledger);
                    if status == 201 {
                        let w = Write {
                            stream: stream.clone(),
                            seq: body["seq"].as_u64().unwrap_or(0),
                            data,
                        };
                        if let Some(k) = key {
                            l.pending_http = None;
                            l.http_keys.push((k, w.clone()));
                        }
                        l.ack(&me, w);
                        false
                    } else {
                        l.error(&code_of(status, &body));
                        true
                    }
                };
                if refused {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }));
    }
    // WebSocket publishers: one without ids, one with ids on a session kept across cuts.
    for with_ids in [false, true] {
        let (http, ledger, stop) = (http.clone(), ledger.clone(), stop.clone());
        let ws_url = ws_url.to_string();
        tasks.push(tokio::spawn(async move {
            let me = if with_ids { "ws1" } else { "ws0" };
            ws_publisher(&http, &ws_url, &ledger, &stop, me, with_ids).await;
        }));
    }
    // Webhook intake (an event and a job per message), its message id retried across the cut.
    {
        let (http, ledger, stop) = (http.clone(), ledger.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..1_000_000 {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let (id, body) = {
                    let mut l = lock(&ledger);
                    match l.pending_webhook.clone() {
                        Some(p) => p,
                        None => {
                            let n = l.next();
                            let p = (format!("m{n}"), json!({"p": "webhook", "n": n}));
                            l.pending_webhook = Some(p.clone());
                            p
                        }
                    }
                };
                let Ok((status, answer)) = http.webhook(&id, &body).await else {
                    lock(&ledger).error("connection");
                    return;
                };
                let refused = {
                    let mut l = lock(&ledger);
                    if status == 202 {
                        l.pending_webhook = None;
                        let w = Write {
                            stream: WEBHOOK_STREAM.into(),
                            seq: answer["seq"].as_u64().unwrap_or(0),
                            data: body.clone(),
                        };
                        // For a retried id this may be the duplicate answer: the write's
                        // first answer was lost with the cut, and this one names it.
                        l.ack("webhook", w);
                        l.webhooks.push((id, body, answer));
                        false
                    } else {
                        l.error(&code_of(status, &answer));
                        true
                    }
                };
                if refused {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }));
    }
    // Checkpoints: a session over the HTTP streams acks the newest acknowledged seq.
    {
        let (http, ledger, stop) = (http.clone(), ledger.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let tok = http.creds.token("acker", &["pc:*"], &[]);
            let Ok((201, s)) = http
                .send(
                    reqwest::Method::POST,
                    "/v1/sessions",
                    &tok,
                    Some(json!({"streams": HTTP_STREAMS})),
                    &[],
                )
                .await
            else {
                lock(&ledger).error("session refused");
                return;
            };
            let sid = s["sessionId"].as_str().unwrap_or_default().to_string();
            let rt = s["resumeToken"].as_str().unwrap_or_default().to_string();
            for round in 0..1_000_000usize {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let stream = HTTP_STREAMS[round % 2];
                let seq = {
                    let l = lock(&ledger);
                    l.writes
                        .values()
                        .flatten()
                        .filter(|w| w.stream == stream)
                        .map(|w| w.seq)
                        .max()
                };
                if let Some(seq) = seq {
                    let path = format!("/v1/sessions/{sid}/checkpoint");
                    let Ok((status, body)) = http
                        .send(
                            reqwest::Method::POST,
                            &path,
                            &rt,
                            Some(json!({"stream": stream, "seq": seq})),
                            &[],
                        )
                        .await
                    else {
                        lock(&ledger).error("connection");
                        return;
                    };
                    let mut l = lock(&ledger);
                    if status == 200 && body["ackUpdate"] == "applied" {
                        l.checkpoints_applied += 1;
                        l.checkpoints
                            .insert((sid.clone(), stream.to_string()), (rt.clone(), seq));
                    } else if status != 200 {
                        l.error(&code_of(status, &body));
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    tasks
}

async fn ws_publisher(
    http: &Http,
    ws_url: &str,
    ledger: &Shared,
    stop: &AtomicBool,
    me: &str,
    with_ids: bool,
) {
    let resume = if with_ids {
        lock(ledger).ws_session.clone()
    } else {
        None
    };
    let url = match &resume {
        Some(rt) => format!("{ws_url}/v1/ws?resume={rt}"),
        None => {
            let tok = http.creds.token(me, &["pc:*"], &["pc:*"]);
            format!("{ws_url}/v1/ws?token={tok}")
        }
    };
    let mut ws = match WsClient::connect(&url).await {
        Ok(ws) => ws,
        Err(e) => {
            let mut l = lock(ledger);
            l.error(&format!("ws refused {}", e.status));
            if resume.is_some() && (400..500).contains(&e.status) {
                forget_ws_session(&mut l);
            }
            return;
        }
    };
    let Some(welcome) = next_frame(&mut ws).await else {
        lock(ledger).error("connection");
        return;
    };
    if welcome["type"] != "welcome" {
        let mut l = lock(ledger);
        l.error(welcome["code"].as_str().unwrap_or("ws no welcome"));
        if resume.is_some() {
            forget_ws_session(&mut l);
        }
        return;
    }
    let mut rt = welcome["resumeToken"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    if with_ids {
        lock(ledger).ws_session = Some(rt.clone());
    }
    for _ in 0..1_000_000 {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let (id, data) = {
            let mut l = lock(ledger);
            match (with_ids, l.ws_pending.clone()) {
                (true, Some(p)) => p,
                _ => {
                    let n = l.next();
                    let p = (n, json!({"p": me, "n": n}));
                    if with_ids {
                        l.ws_pending = Some(p.clone());
                    }
                    p
                }
            }
        };
        let mut frame = json!({"type": "publish", "stream": WS_STREAM, "data": data});
        if with_ids {
            frame["id"] = json!(id);
        }
        if !ws.try_send(frame).await {
            lock(ledger).error("connection");
            return;
        }
        loop {
            let Some(f) = next_frame(&mut ws).await else {
                lock(ledger).error("connection");
                return;
            };
            match f["type"].as_str() {
                Some("published") => {
                    let mut l = lock(ledger);
                    let w = Write {
                        stream: WS_STREAM.into(),
                        seq: f["seq"].as_u64().unwrap_or(0),
                        data: data.clone(),
                    };
                    if with_ids {
                        l.ws_pending = None;
                        l.ws_ids.push((rt.clone(), id, w.clone()));
                    }
                    l.ack(me, w);
                    break;
                }
                Some("error") => {
                    lock(ledger).error(f["code"].as_str().unwrap_or("ws error"));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    break;
                }
                Some("token") => {
                    if let Some(t) = f["resumeToken"].as_str() {
                        rt = t.to_string();
                        if with_ids {
                            lock(ledger).ws_session = Some(rt.clone());
                        }
                    }
                }
                _ => {}
            }
        }
    }
}

/// The session is gone (the checker counts that): the next cycle opens a new one. Its
/// unanswered frame id cannot be retried in another session (ids are per session), so it
/// is dropped rather than sent again as a new publish.
fn forget_ws_session(l: &mut Ledger) {
    l.ws_session = None;
    l.ws_pending = None;
}

/// The next frame that is not a ping (answered), or `None` when the socket is gone.
async fn next_frame(ws: &mut WsClient) -> Option<Value> {
    for _ in 0..100 {
        match ws.next_within(TIMEOUT).await {
            Next::Frame(f) if f["type"] == "ping" => {
                if !ws.try_send(json!({"type": "pong", "t": f["t"]})).await {
                    return None;
                }
            }
            Next::Frame(f) => return Some(f),
            Next::Closed(_) | Next::Timeout => return None,
        }
    }
    None
}

/// Compares the restarted server with the ledger; what is wrong goes into the findings.
async fn check(http: &Http, ws_url: &str, ledger: &Shared, epochs: &mut BTreeMap<String, Value>) {
    let streams: BTreeSet<String> = {
        let l = lock(ledger);
        l.writes
            .values()
            .flatten()
            .map(|w| w.stream.clone())
            .collect()
    };
    let mut logs = BTreeMap::new();
    for s in &streams {
        match http.log(s).await {
            Ok((log, epoch)) => {
                let mut l = lock(ledger);
                if let Some(old) = epochs.insert(s.clone(), epoch.clone())
                    && old != epoch
                {
                    l.findings.epochs_changed += 1;
                    l.findings.note(format!("{s}: epoch {old} became {epoch}"));
                }
                logs.insert(s.clone(), log);
            }
            Err(e) => panic!("the restarted server cannot read its log: {e}"),
        }
    }
    let (checkpoints, http_keys, ws_ids, hooks, idem_bad, alive) = {
        let mut guard = lock(ledger);
        let l = &mut *guard;
        // Every acknowledged write at its seq with its content, in its publisher's order.
        for (publisher, writes) in l.writes.iter_mut() {
            let mut kept = Vec::with_capacity(writes.len());
            for w in writes.drain(..) {
                let found = logs.get(&w.stream).and_then(|log| log.get(&w.seq));
                if found == Some(&w.data) {
                    kept.push(w);
                    continue;
                }
                l.findings.lost += 1;
                if found.is_some() {
                    l.findings.seq_reused += 1;
                } else {
                    l.lost_at.insert((w.stream.clone(), w.seq), w.data.clone());
                }
                l.findings.note(format!(
                    "{publisher}: {}#{} {} is {}",
                    w.stream,
                    w.seq,
                    w.data,
                    found.map_or("missing".to_string(), |f| format!("now {f}"))
                ));
            }
            let mut last: BTreeMap<&str, u64> = BTreeMap::new();
            for w in &kept {
                let prev = last.insert(&w.stream, w.seq);
                if prev.is_some_and(|p| p >= w.seq) {
                    l.findings.reordered += 1;
                    l.findings.note(format!(
                        "{publisher}: {}#{} acknowledged after #{prev:?}",
                        w.stream, w.seq
                    ));
                }
            }
            *writes = kept;
        }
        // A seq that lost its write and now holds another one.
        let reused: Vec<(String, u64)> = l
            .lost_at
            .iter()
            .filter(|((s, seq), data)| {
                logs.get(s)
                    .and_then(|log| log.get(seq))
                    .is_some_and(|now| now != *data)
            })
            .map(|(k, _)| k.clone())
            .collect();
        for k in reused {
            l.findings.seq_reused += 1;
            l.findings
                .note(format!("{}#{} now holds another write", k.0, k.1));
            l.lost_at.remove(&k);
        }
        // Nothing of ours twice in a log.
        for (s, log) in &logs {
            let mut first: BTreeMap<String, u64> = BTreeMap::new();
            for (seq, data) in log {
                if data.get("p").is_none() {
                    continue;
                }
                if let Some(f) = first.insert(data.to_string(), *seq)
                    && l.dup_seen.insert((s.clone(), *seq))
                {
                    l.findings.duplicated += 1;
                    l.findings.note(format!("{s}: {data} at #{f} and #{seq}"));
                }
            }
        }
        let checkpoints = l.checkpoints.clone();
        let (from_http, from_ws, from_hook) = l.checked;
        // The records made since the last check, and a sample of the older ones (each check
        // asking every record again would grow with the run).
        fn recent_and_sample<T: Clone>(all: &[T], from: usize) -> Vec<T> {
            let older = all[..from].iter().step_by((from / 10).max(1)).take(10);
            older.chain(&all[from..]).cloned().collect()
        }
        let http_keys = recent_and_sample(&l.http_keys, from_http);
        let ws_ids = recent_and_sample(&l.ws_ids, from_ws);
        let hooks = recent_and_sample(&l.webhooks, from_hook);
        let idem_bad = l.idem_bad.clone();
        l.checked = (l.http_keys.len(), l.ws_ids.len(), l.webhooks.len());
        // Only writes still in the log are asked again: a lost one is already counted.
        let alive: BTreeSet<(String, u64)> = l
            .writes
            .values()
            .flatten()
            .map(|w| (w.stream.clone(), w.seq))
            .collect();
        (checkpoints, http_keys, ws_ids, hooks, idem_bad, alive)
    };
    let mut f = Findings::default();
    // Every applied checkpoint holds (a seq of 0 is ignored and answers the stored ack).
    for ((sid, stream), (rt, seq)) in checkpoints {
        let path = format!("/v1/sessions/{sid}/checkpoint");
        let r = http
            .send(
                reqwest::Method::POST,
                &path,
                &rt,
                Some(json!({"stream": stream, "seq": 0})),
                &[],
            )
            .await;
        match r {
            Ok((200, b)) if b["lastAckSequence"].as_u64().is_some_and(|a| a >= seq) => {}
            Ok((200, b)) => {
                f.checkpoints_regressed += 1;
                f.note(format!(
                    "checkpoint {sid}/{stream} {seq} reads {}",
                    b["lastAckSequence"]
                ));
            }
            other => {
                f.sessions_lost += 1;
                f.note(format!("session {sid}: {other:?}"));
            }
        }
    }
    // Every idempotency record answers the same.
    let mut bad = Vec::new();
    for (key, w) in http_keys
        .iter()
        .filter(|(k, w)| alive.contains(&(w.stream.clone(), w.seq)) && !idem_bad.contains(k))
    {
        let r = http.publish(&w.stream, &w.data, Some(key)).await;
        match r {
            Ok((201, b)) if b["seq"].as_u64() == Some(w.seq) && b["duplicate"] == true => {}
            other => {
                f.idempotency_changed += 1;
                bad.push(key.clone());
                f.note(format!(
                    "key {key} ({}#{}) answers {other:?}",
                    w.stream, w.seq
                ));
            }
        }
    }
    let mut by_session: BTreeMap<String, Vec<(u64, Write)>> = BTreeMap::new();
    for (rt, id, w) in ws_ids.into_iter().filter(|(_, id, w)| {
        alive.contains(&(w.stream.clone(), w.seq)) && !idem_bad.contains(&format!("ws{id}"))
    }) {
        by_session.entry(rt).or_default().push((id, w));
    }
    for (rt, ids) in by_session {
        let url = format!("{ws_url}/v1/ws?resume={rt}");
        let mut ws = match WsClient::connect(&url).await {
            Ok(ws) => ws,
            Err(e) => {
                f.sessions_lost += 1;
                f.note(format!("ws resume refused: {} {}", e.status, e.body));
                continue;
            }
        };
        match next_frame(&mut ws).await {
            Some(w) if w["type"] == "welcome" => {}
            other => {
                f.sessions_lost += 1;
                f.note(format!("ws resume: {other:?}"));
                continue;
            }
        }
        for (id, w) in ids {
            let sent = ws
                .try_send(json!({"type": "publish", "stream": w.stream, "data": w.data, "id": id}))
                .await;
            let answer = if sent {
                next_frame(&mut ws).await
            } else {
                None
            };
            match answer {
                Some(a) if a["type"] == "published" && a["seq"].as_u64() == Some(w.seq) => {}
                other => {
                    f.idempotency_changed += 1;
                    bad.push(format!("ws{id}"));
                    f.note(format!(
                        "ws id {id} ({}#{}) answers {other:?}",
                        w.stream, w.seq
                    ));
                }
            }
        }
        ws.close().await;
    }
    for (id, body, first) in hooks.iter().filter(|(id, _, a)| {
        !idem_bad.contains(id)
            && a["seq"]
                .as_u64()
                .is_some_and(|s| alive.contains(&(WEBHOOK_STREAM.to_string(), s)))
    }) {
        match http.webhook(id, body).await {
            Ok((202, a))
                if a["seq"] == first["seq"]
                    && a["jobId"] == first["jobId"]
                    && a["duplicate"] == true => {}
            other => {
                f.idempotency_changed += 1;
                bad.push(id.clone());
                f.note(format!("webhook {id} (first {first}) answers {other:?}"));
            }
        }
    }
    let mut l = lock(ledger);
    l.findings.checkpoints_regressed += f.checkpoints_regressed;
    l.findings.sessions_lost += f.sessions_lost;
    l.findings.idempotency_changed += f.idempotency_changed;
    l.idem_bad.extend(bad);
    for n in f.notes {
        l.findings.note(n);
    }
    // A lost checkpoint or session is counted once.
    if f.sessions_lost + f.checkpoints_regressed > 0 {
        l.checkpoints.clear();
    }
}

fn spawn(dir: &Path, up: &FakeUpstream) -> ServerProcess {
    let env = [
        ("ZERODROP_UPSTREAM_APP_PRIMARY", up.url.as_str()),
        ("ZERODROP_WEBHOOK_PAY_UPSTREAM", "app"),
        ("ZERODROP_WEBHOOK_PAY_STREAM", WEBHOOK_STREAM),
        ("ZERODROP_JOBS_LEASE_MS", "1500"),
        ("ZERODROP_JOBS_HEARTBEAT_MS", "500"),
        ("ZERODROP_JOBS_BACKOFF_BASE_MS", "20"),
        ("ZERODROP_JOBS_BACKOFF_CAP_MS", "100"),
        // The WebSocket publishers and the checker's re-asks measure the store, not the
        // per-socket frame limit.
        ("ZERODROP_WS_FRAMES_PER_SEC", "100000"),
        // Retention keeps everything the run writes: the checker reads every log from seq 1.
        ("ZERODROP_RETENTION_MAX_EVENTS", "100000000"),
        ("ZERODROP_RETENTION_MAX_BYTES", "10000000000"),
    ];
    match ServerProcess::spawn(Path::new(BIN), dir, "127.0.0.1:0", &[], &env) {
        Ok(p) => p,
        Err(e) => panic!("zerodrop does not start on what survived the cut: {e:#}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_cuts_lose_no_acknowledged_write() {
    if let Some(why) = zerodrop_lazyfs::unavailable() {
        eprintln!("SKIPPED power_cuts_lose_no_acknowledged_write: {why}");
        return;
    }
    let cuts: u64 = std::env::var("ZERODROP_POWERCUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let synchronous =
        std::env::var("ZERODROP_SQLITE_SYNCHRONOUS").unwrap_or_else(|_| "full".into());
    let report_only =
        synchronous.eq_ignore_ascii_case("normal") || synchronous.eq_ignore_ascii_case("off");
    let seed = std::env::var("ZERODROP_POWERCUT_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
                | 1
        });
    eprintln!("power cuts: {cuts}, synchronous={synchronous}, seed {seed}");
    let mut rng = Rng(seed);
    let deadline = Instant::now() + Duration::from_secs(120 + 30 * cuts);

    let up = FakeUpstream::start().await;
    up.set(Mode::Ok);
    let root = tempfile::tempdir().unwrap();
    let mnt = root.path().join("volume");
    std::fs::create_dir(&mnt).unwrap();
    // Declared before the server, so it is dropped (unmounted) after the process is killed,
    // also when an assertion unwinds.
    let mut volume = LazyFs::mount(&mnt).expect("the volume mounts (root and /dev/fuse)");
    // The data dir is the volume's root, which exists before the server does (as a
    // deployment's volume or StateDirectory does): the cut tests the files zerodrop writes.
    let data = mnt.clone();
    let ledger: Shared = Arc::default();
    let mut epochs = BTreeMap::new();
    let mut secrets: Option<String> = None;
    let mut lost_on_volume = zerodrop_lazyfs::CutReport::default();
    let mut p = spawn(&data, &up);
    for cycle in 0..=cuts {
        assert!(
            Instant::now() < deadline,
            "the run took too long (cycle {cycle})"
        );
        let http = Arc::new(Http {
            client: reqwest::Client::new(),
            base: p.url.clone(),
            creds: p.creds.clone(),
        });
        if let Some(old) = &secrets
            && *old != p.creds.api_key
        {
            let mut l = lock(&ledger);
            l.findings.secrets_changed += 1;
            l.findings
                .note(format!("cycle {cycle}: the api key changed"));
        }
        secrets = Some(p.creds.api_key.clone());
        check(&http, &p.ws_url(), &ledger, &mut epochs).await;
        if cycle == cuts {
            break;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = start_load(&http, &p.ws_url(), &ledger, &stop);
        tokio::time::sleep(Duration::from_millis(200 + rng.below(1_300))).await;
        p.kill9();
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            let _ = tokio::time::timeout(TIMEOUT * 2, t).await;
        }
        let r = volume
            .power_cut()
            .expect("the volume remounts after the cut");
        lost_on_volume.files_rolled_back += r.files_rolled_back;
        lost_on_volume.bytes_lost += r.bytes_lost;
        lost_on_volume.names_lost += r.names_lost;
        p = spawn(&data, &up);
    }
    // Every accepted webhook's job reaches the upstream (at least once; its key dedupes).
    let hooks: BTreeSet<String> = lock(&ledger)
        .webhooks
        .iter()
        .map(|(id, _, _)| id.clone())
        .collect();
    let delivered = |up: &FakeUpstream| -> BTreeSet<String> {
        up.received()
            .iter()
            .filter_map(|r| r.json()["messageId"].as_str().map(String::from))
            .collect()
    };
    let until = Instant::now() + Duration::from_secs(30);
    while !hooks.is_subset(&delivered(&up)) && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let missing: Vec<String> = hooks.difference(&delivered(&up)).cloned().collect();
    p.kill9();
    drop(p);
    let stats = volume.stats();
    drop(volume);

    let l = lock(&ledger);
    let mut findings = l.findings.clone();
    findings.jobs_lost = missing.len() as u64;
    if !missing.is_empty() {
        findings.note(format!("jobs never delivered: {missing:?}"));
    }
    let report = json!({
        "fault": "power cut (kill -9, then every write not fsynced discarded)",
        "synchronous": synchronous,
        "seed": seed,
        "cuts": cuts,
        "acknowledged": l.acknowledged,
        "webhooks_accepted": l.webhooks.len(),
        "checkpoints_applied": l.checkpoints_applied,
        "lost": findings.lost,
        "seq_reused": findings.seq_reused,
        "duplicated": findings.duplicated,
        "reordered": findings.reordered,
        "checkpoints_regressed": findings.checkpoints_regressed,
        "sessions_lost": findings.sessions_lost,
        "idempotency_changed": findings.idempotency_changed,
        "jobs_lost": findings.jobs_lost,
        "secrets_changed": findings.secrets_changed,
        "epochs_changed": findings.epochs_changed,
        "typed_errors": l.errors,
        "volume": {
            "writes": stats.writes, "file_syncs": stats.file_syncs, "dir_syncs": stats.dir_syncs,
            "files_rolled_back": lost_on_volume.files_rolled_back,
            "unsynced_bytes_discarded": lost_on_volume.bytes_lost,
            "names_discarded": lost_on_volume.names_lost,
        },
        "examples": findings.notes,
    });
    eprintln!("power-cut report: {report:#}");
    if let Ok(path) = std::env::var("ZERODROP_POWERCUT_REPORT") {
        let _ = std::fs::write(path, format!("{report:#}\n"));
    }
    assert!(l.acknowledged > 0, "no write was acknowledged: {report:#}");
    if !report_only {
        assert!(
            findings.clean(),
            "acknowledged state did not survive a power cut: {report:#}"
        );
    }
}
