//! The load engine: publishers, WebSocket and SSE clients, each a task that keeps its own
//! counts and hands them back when the run ends (no shared lock on the hot path).
//!
//! Every client survives the faults a game day injects: an unexpected close or a refused
//! connection starts a reconnect episode (resume with the token and `lastAck`; a refused
//! session falls back to a new session subscribed after the last contiguous seq), retried
//! with backoff until the run's hard deadline. Publishers retry with the same
//! `Idempotency-Key`, so a retry can never append twice. The run ends for a client once it
//! holds every seq up to its stream's final head, or at the hard deadline.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram;
use tokio::sync::watch;
use tokio::time::Instant;
use zerodrop_client::{
    ClientError, HttpClient, ServerFrame, SseAuth, SseConnection, SseMessage, SseOptions, WsAuth,
    WsConnection,
};

use super::plan::Behaviour;
use super::track::{Tracker, new_histogram};

/// Connect tokens for the synthetic clients: minted from the JWT secret, or taken in turn
/// from a pool of pre-minted tokens.
pub enum Tokens {
    Secret {
        secret: String,
        run: String,
        ttl: Duration,
    },
    Pool(Vec<String>),
}

impl Tokens {
    pub fn for_client(&self, i: usize, streams: &[String]) -> Result<String, ClientError> {
        match self {
            Tokens::Secret { secret, run, ttl } => zerodrop_client::mint_connect_token(
                secret,
                &format!("drill-{run}-{i}"),
                streams,
                None,
                *ttl,
            ),
            Tokens::Pool(p) => p
                .get(i % p.len().max(1))
                .cloned()
                .ok_or_else(|| ClientError::Token("the token pool is empty".into())),
        }
    }
}

/// What every task of one run shares.
pub struct Ctx {
    pub http: HttpClient,
    pub base: String,
    pub tokens: Tokens,
    pub run: String,
    pub t0: std::time::Instant,
    pub pad: String,
    /// Turns true when publishers must stop.
    pub stop: watch::Receiver<bool>,
    /// No task runs past this.
    pub hard_deadline: Instant,
    pub published: AtomicU64,
    pub delivered: AtomicU64,
    /// Clients whose first connect attempt ended (connected or not).
    pub ready: AtomicUsize,
    /// Clients that connected and subscribed in the connect phase.
    pub connected: AtomicUsize,
}

impl Ctx {
    pub fn now_ns(&self) -> u64 {
        self.t0.elapsed().as_nanos() as u64
    }
    pub(crate) fn stopped(&self) -> bool {
        *self.stop.borrow()
    }
}

/// Counts one task hands back.
pub struct TaskStats {
    pub statuses: BTreeMap<u16, u64>,
    pub network_errors: u64,
    pub attempts: u64,
    pub publish_latency_us: Histogram<u64>,
    pub acked: Vec<(usize, u32, u64, u64)>,
    pub resume_attempts: u64,
    pub resume_successes: u64,
    pub resume_failures: BTreeMap<String, u64>,
    pub resets: u64,
    pub forced: u64,
    pub unexpected: u64,
    pub tracker: Option<(usize, Tracker)>,
    /// The webhook senders' message ids and their answers.
    pub webhooks: Vec<super::webhook::Sent>,
}

impl Default for TaskStats {
    fn default() -> Self {
        TaskStats {
            statuses: BTreeMap::new(),
            network_errors: 0,
            attempts: 0,
            publish_latency_us: new_histogram(),
            acked: Vec::new(),
            resume_attempts: 0,
            resume_successes: 0,
            resume_failures: BTreeMap::new(),
            resets: 0,
            forced: 0,
            unexpected: 0,
            tracker: None,
            webhooks: Vec::new(),
        }
    }
}

impl TaskStats {
    pub(crate) fn count_error(&mut self, e: &ClientError) {
        match e.status() {
            Some(s) => *self.statuses.entry(s).or_default() += 1,
            None => self.network_errors += 1,
        }
    }
}

fn jitter(min: Duration, max: Duration) -> Duration {
    let r = u32::from_le_bytes(zerodrop_core::random_bytes::<4>()) as f64 / u32::MAX as f64;
    min + (max.saturating_sub(min)).mul_f64(r)
}

/// Paces a sender at a fixed rate (or not at all: as fast as answers come).
pub(crate) struct Pacer {
    interval: Option<Duration>,
    next: Instant,
}

impl Pacer {
    pub(crate) fn new(rate: Option<f64>) -> Pacer {
        Pacer {
            interval: rate.map(|r| Duration::from_secs_f64(1.0 / r.max(0.001))),
            next: Instant::now(),
        }
    }

    /// Waits for the next slot; false once the run stops (or is past its deadline).
    pub(crate) async fn ready(&mut self, ctx: &Ctx) -> bool {
        if ctx.stopped() || Instant::now() >= ctx.hard_deadline {
            return false;
        }
        if let Some(iv) = self.interval {
            let now = Instant::now();
            if self.next > now {
                let mut stop = ctx.stop.clone();
                tokio::select! {
                    _ = tokio::time::sleep_until(self.next) => {}
                    _ = stop.wait_for(|s| *s) => return false,
                }
            } else if now - self.next > Duration::from_secs(1) {
                self.next = now; // fell behind (server stalled): do not burst to catch up
            }
            self.next += iv;
        }
        true
    }
}

/// One publisher: paced at `rate` ev/s (or as fast as answers come), round-robin over its
/// streams, retrying each event with the same key until it is acknowledged or the deadline.
pub async fn publisher(
    ctx: Arc<Ctx>,
    w: u32,
    streams: Vec<(usize, String)>,
    rate: Option<f64>,
) -> TaskStats {
    let mut st = TaskStats::default();
    let mut pacer = Pacer::new(rate);
    let mut c: u64 = 0;
    while pacer.ready(&ctx).await {
        c += 1;
        let (idx, stream) = &streams[(c as usize) % streams.len()];
        let payload = format!(
            "{{\"w\":{w},\"c\":{c},\"t\":{},\"p\":\"{}\"}}",
            ctx.now_ns(),
            ctx.pad
        );
        let key = format!("drill-{}-{w}-{c}", ctx.run);
        let mut tries = 0u32;
        loop {
            tries += 1;
            st.attempts += 1;
            let sent = Instant::now();
            match ctx.http.publish(stream, &payload, Some(&key)).await {
                Ok(p) => {
                    *st.statuses.entry(201).or_default() += 1;
                    let _ = st
                        .publish_latency_us
                        .record((sent.elapsed().as_micros() as u64).max(1));
                    st.acked.push((*idx, w, c, p.seq));
                    ctx.published.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                Err(e) => {
                    st.count_error(&e);
                    let retry = e.is_network()
                        || matches!(e.status(), Some(429 | 503 | 409 | 500 | 502 | 504));
                    if !retry || tries >= 50 || Instant::now() >= ctx.hard_deadline {
                        break;
                    }
                    let wait = match &e {
                        ClientError::Http {
                            retry_after: Some(ra),
                            ..
                        } => (*ra).min(Duration::from_secs(1)),
                        _ => Duration::from_millis((50 * tries as u64).min(500)),
                    };
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
    st
}

/// How a subscriber ends: once it holds `1..=head` of its stream.
pub struct Finish {
    pub head: watch::Receiver<Option<u64>>,
}

fn done(t: &Tracker, fin: &Finish) -> bool {
    matches!(*fin.head.borrow(), Some(h) if t.contiguous >= h)
}

/// A WebSocket subscriber for `stream`.
pub async fn ws_client(
    ctx: Arc<Ctx>,
    i: usize,
    stream_idx: usize,
    stream: String,
    behaviour: Behaviour,
    mut storm: watch::Receiver<u32>,
    fin: Finish,
) -> TaskStats {
    let mut st = TaskStats::default();
    let mut t = Tracker::default();
    let scope = [format!("drill:{}:*", ctx.run)];
    let token = match ctx.tokens.for_client(i, &scope) {
        Ok(t) => t,
        Err(_) => {
            st.network_errors += 1;
            ctx.ready.fetch_add(1, Ordering::Relaxed);
            st.tracker = Some((stream_idx, t));
            return st;
        }
    };
    let mut conn = fresh(&ctx, &mut st, &token, &stream, 0, &mut t).await;
    if conn.is_some() {
        ctx.connected.fetch_add(1, Ordering::Relaxed);
    }
    ctx.ready.fetch_add(1, Ordering::Relaxed);
    let mut next_drop = match &behaviour {
        Behaviour::DropEvery(a, b) => Some(Instant::now() + jitter(*a, *b)),
        _ => None,
    };
    let mut unacked = 0u32;
    let mut last_ack = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut stormed = false;
    while Instant::now() < ctx.hard_deadline && !done(&t, &fin) {
        let Some(c) = conn.as_mut() else {
            // Not connected: the previous episode ran out of time.
            break;
        };
        let far = Instant::now() + Duration::from_secs(3600);
        tokio::select! {
            r = c.recv() => match r {
                Ok(ServerFrame::Event(e)) => {
                    if e.stream == stream && t.on_event(e.seq, &e.epoch, e.data.get(), ctx.now_ns()) {
                        ctx.delivered.fetch_add(1, Ordering::Relaxed);
                        unacked += 1;
                        if unacked >= 50 {
                            unacked = 0;
                            last_ack = t.contiguous;
                            let _ = c.ack(&stream, t.contiguous).await;
                        }
                    }
                }
                Ok(ServerFrame::Error(e)) if e.stream.is_some() => {
                    // The stream's position could not be served: the client resyncs by
                    // subscribing again after what it holds (the loss shows as missing).
                    st.resets += 1;
                    let _ = c.subscribe(&stream, Some(t.contiguous), None).await;
                }
                Ok(ServerFrame::Reconnect(r)) => {
                    // Drain: the server hands a fresh token and closes; come back later.
                    let token_now = c.resume_token().to_string();
                    conn.take();
                    tokio::time::sleep(Duration::from_millis(r.retry_after_ms.min(2000))).await;
                    conn = resume(&ctx, &mut st, &token, token_now, &stream, &mut t).await;
                }
                Ok(_) => {}
                Err(_) if done(&t, &fin) => break,
                Err(_) => {
                    st.unexpected += 1;
                    let token_now = c.resume_token().to_string();
                    conn.take();
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    conn = resume(&ctx, &mut st, &token, token_now, &stream, &mut t).await;
                }
            },
            _ = tokio::time::sleep_until(next_drop.unwrap_or(far)), if next_drop.is_some() && !ctx.stopped() => {
                st.forced += 1;
                let token_now = c.resume_token().to_string();
                if let Some(c) = conn.take() { c.abort(); }
                tokio::time::sleep(jitter(Duration::from_millis(50), Duration::from_millis(400))).await;
                conn = resume(&ctx, &mut st, &token, token_now, &stream, &mut t).await;
                if let Behaviour::DropEvery(a, b) = &behaviour {
                    next_drop = Some(Instant::now() + jitter(*a, *b));
                }
            }
            r = storm.changed(), if !stormed => {
                stormed = true;
                if r.is_ok() && *storm.borrow() > 0 {
                    st.forced += 1;
                    let token_now = c.resume_token().to_string();
                    if let Some(c) = conn.take() { c.abort(); }
                    conn = resume(&ctx, &mut st, &token, token_now, &stream, &mut t).await;
                }
            }
            _ = tick.tick() => {
                if t.contiguous > last_ack {
                    last_ack = t.contiguous;
                    unacked = 0;
                    let _ = c.ack(&stream, t.contiguous).await;
                }
            }
        }
    }
    if let Some(c) = conn {
        c.close().await;
    }
    st.tracker = Some((stream_idx, t));
    st
}

/// A new session subscribed after `after`, retried until the deadline.
async fn fresh(
    ctx: &Ctx,
    st: &mut TaskStats,
    token: &str,
    stream: &str,
    after: u64,
    t: &mut Tracker,
) -> Option<WsConnection> {
    let mut backoff = Duration::from_millis(50);
    while Instant::now() < ctx.hard_deadline {
        st.attempts += 1;
        match WsConnection::connect(
            &ctx.base,
            WsAuth::Token(token.to_string()),
            Duration::from_secs(10),
        )
        .await
        {
            Ok(mut c) => {
                if c.subscribe(stream, Some(after), None).await.is_ok() {
                    let mut early = Vec::new();
                    match c.await_subscribed(stream, |f| early.push(f)).await {
                        Ok(_) => {
                            for f in early {
                                if let ServerFrame::Event(e) = f
                                    && e.stream == stream
                                    && t.on_event(e.seq, &e.epoch, e.data.get(), ctx.now_ns())
                                {
                                    ctx.delivered.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            return Some(c);
                        }
                        Err(e) => st.count_error(&e),
                    }
                }
            }
            Err(e) => st.count_error(&e),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
    None
}

/// One reconnect episode: resume the session; on a session-level refusal start a new
/// session after the last contiguous seq. Network failures retry within the episode.
async fn resume(
    ctx: &Ctx,
    st: &mut TaskStats,
    connect_token: &str,
    resume_token: String,
    stream: &str,
    t: &mut Tracker,
) -> Option<WsConnection> {
    st.resume_attempts += 1;
    t.expect_redelivery();
    let mut backoff = Duration::from_millis(50);
    let failure = loop {
        if Instant::now() >= ctx.hard_deadline {
            break "deadline".to_string();
        }
        st.attempts += 1;
        let last_ack = [(stream.to_string(), t.contiguous)].into_iter().collect();
        let auth = WsAuth::Resume {
            resume_token: resume_token.clone(),
            last_ack,
            token: None,
            presence: Default::default(),
        };
        match WsConnection::connect(&ctx.base, auth, Duration::from_secs(10)).await {
            Ok(mut c) => {
                let mut early = Vec::new();
                match c.await_subscribed(stream, |f| early.push(f)).await {
                    Ok(_) => {
                        for f in early {
                            if let ServerFrame::Event(e) = f
                                && e.stream == stream
                                && t.on_event(e.seq, &e.epoch, e.data.get(), ctx.now_ns())
                            {
                                ctx.delivered.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        st.resume_successes += 1;
                        return Some(c);
                    }
                    Err(e) => {
                        if e.code().is_some_and(|c| !c.is_empty()) {
                            st.resets += 1;
                            break e.code().unwrap_or("error").to_string();
                        }
                        st.network_errors += 1;
                    }
                }
            }
            Err(e) => {
                let code = e.code().map(str::to_string);
                let session_level = matches!(
                    code.as_deref(),
                    Some(
                        "INVALID_RESUME_TOKEN"
                            | "RECONNECT_WINDOW_EXPIRED"
                            | "SESSION_NOT_FOUND"
                            | "UNAUTHORIZED"
                            | "FORBIDDEN"
                    )
                );
                st.count_error(&e);
                if session_level {
                    break code.unwrap_or_default();
                }
                // Refused, reset, draining, over capacity: the instance may be restarting.
                if let ClientError::Http {
                    retry_after: Some(ra),
                    ..
                } = &e
                {
                    backoff = (*ra).min(Duration::from_secs(1));
                }
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
    };
    *st.resume_failures.entry(failure).or_default() += 1;
    let after = t.contiguous;
    fresh(ctx, st, connect_token, stream, after, t).await
}

/// An SSE subscriber for `stream`: drops now and then (per `behaviour`) and comes back with
/// `Last-Event-ID`, like a browser's EventSource.
pub async fn sse_client(
    ctx: Arc<Ctx>,
    i: usize,
    stream_idx: usize,
    stream: String,
    behaviour: Behaviour,
    fin: Finish,
) -> TaskStats {
    let mut st = TaskStats::default();
    let mut t = Tracker::default();
    let scope = [format!("drill:{}:*", ctx.run)];
    let Ok(token) = ctx.tokens.for_client(i, &scope) else {
        st.network_errors += 1;
        ctx.ready.fetch_add(1, Ordering::Relaxed);
        st.tracker = Some((stream_idx, t));
        return st;
    };
    let auth = SseAuth::Token(token);
    let mut conn = sse_open(&ctx, &mut st, &auth, &stream, &t).await;
    if conn.is_some() {
        ctx.connected.fetch_add(1, Ordering::Relaxed);
    }
    ctx.ready.fetch_add(1, Ordering::Relaxed);
    let mut next_drop = match &behaviour {
        Behaviour::DropEvery(a, b) => Some(Instant::now() + jitter(*a, *b)),
        _ => None,
    };
    let mut check = tokio::time::interval(Duration::from_millis(100));
    while Instant::now() < ctx.hard_deadline && !done(&t, &fin) {
        let Some(c) = conn.as_mut() else { break };
        let far = Instant::now() + Duration::from_secs(3600);
        tokio::select! {
            m = c.next() => match m {
                Ok(SseMessage::Event { event, .. }) => {
                    if t.on_event(event.seq, &event.epoch, event.data.get(), ctx.now_ns()) {
                        ctx.delivered.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok(SseMessage::Reset { .. }) => st.resets += 1,
                Ok(_) => {}
                Err(_) if done(&t, &fin) => break,
                Err(_) => {
                    st.unexpected += 1;
                    drop(conn.take());
                    st.resume_attempts += 1;
                    conn = sse_reopen(&ctx, &mut st, &auth, &stream, &mut t).await;
                }
            },
            _ = tokio::time::sleep_until(next_drop.unwrap_or(far)), if next_drop.is_some() && !ctx.stopped() => {
                st.forced += 1;
                drop(conn.take());
                tokio::time::sleep(jitter(Duration::from_millis(50), Duration::from_millis(400))).await;
                st.resume_attempts += 1;
                conn = sse_reopen(&ctx, &mut st, &auth, &stream, &mut t).await;
                if let Behaviour::DropEvery(a, b) = &behaviour {
                    next_drop = Some(Instant::now() + jitter(*a, *b));
                }
            }
            _ = check.tick() => {}
        }
    }
    st.tracker = Some((stream_idx, t));
    st
}

async fn sse_reopen(
    ctx: &Ctx,
    st: &mut TaskStats,
    auth: &SseAuth,
    stream: &str,
    t: &mut Tracker,
) -> Option<SseConnection> {
    t.expect_redelivery();
    let c = sse_open(ctx, st, auth, stream, t).await;
    if c.is_some() {
        st.resume_successes += 1;
    } else {
        *st.resume_failures.entry("deadline".into()).or_default() += 1;
    }
    c
}

async fn sse_open(
    ctx: &Ctx,
    st: &mut TaskStats,
    auth: &SseAuth,
    stream: &str,
    t: &Tracker,
) -> Option<SseConnection> {
    let opts = match &t.epoch {
        Some(e) => SseOptions {
            last_event_id: Some(format!("{e}:{}", t.contiguous)),
            after: None,
        },
        None => SseOptions {
            last_event_id: None,
            after: Some(t.contiguous),
        },
    };
    let mut backoff = Duration::from_millis(50);
    while Instant::now() < ctx.hard_deadline {
        st.attempts += 1;
        match SseConnection::connect(&ctx.http, stream, auth, &opts).await {
            Ok(c) => return Some(c),
            Err(e) => {
                st.count_error(&e);
                if let ClientError::Http {
                    retry_after: Some(ra),
                    ..
                } = &e
                {
                    backoff = (*ra).min(Duration::from_secs(1));
                }
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
    None
}
