//! Server-Sent Events (SPEC §3): one stream per connection, for browsers' `EventSource`.
//!
//! Position, in order of precedence: the `Last-Event-ID` header (`<epoch>:<seq>`, or a bare
//! `<seq>`) that browsers send when they reconnect, `?after=N`, the session's ack with
//! `?resume=`, else the current head (live only). Where that starts is decided by the session
//! module (`App::place`), like on every other transport; this module only encodes its answer.
//! A hole is not an error loop: the client gets `event: reset` with the hole's code and facts,
//! and the stream goes on from the oldest retained event. The reset carries
//! `id: <epoch>:<firstAvailableSeq − 1>`, so a reconnect right after it resumes there.
//!
//! Each write carries every event that is ready (encoded once per event, shared by all
//! subscribers), a `: ping` comment every 15 s keeps proxies from timing out, and a drain
//! ends the stream at this connection's spread moment so the browser reconnects elsewhere.
//!
//! hyper pulls this body only while it can write: a client that stops reading leaves it
//! unpolled, with its timers (ping, drain) asleep. The connection's stall guard (`stall.rs`)
//! ends such a response once a write has made no progress for two ping intervals; dropping
//! the body releases the connection slot and the gauge, and the client resumes with its
//! `Last-Event-ID` like after any other broken connection.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::watch;
use zerodrop_core::{Epoch, ErrorCode, Grants, Seq, SessionId, StreamId};
use zerodrop_store::SessionRecord;

use crate::app::{App, Asker, ConnSlot, Placement, Position};
use crate::auth::bearer;
use crate::drain::DrainPhase;
use crate::error::{ApiError, ApiResult};
use crate::http::extract::{Query, StreamPath};
use crate::live::{Fault, Signal, Subscription};
use crate::metrics::Transport;

const PING_EVERY: Duration = Duration::from_secs(15);
const MAX_EVENTS_PER_CHUNK: usize = 512;

#[derive(Deserialize)]
pub struct SseQuery {
    token: Option<String>,
    resume: Option<String>,
    after: Option<u64>,
}

pub async fn handler(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    StreamPath(stream): StreamPath,
    Query(q): Query<SseQuery>,
) -> Response {
    match open(app, headers, stream, q).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

/// `Last-Event-ID`: `<epoch>:<seq>` or `<seq>`.
fn parse_last_event_id(headers: &HeaderMap) -> ApiResult<Option<(Option<Epoch>, Seq)>> {
    let Some(v) = headers.get("last-event-id") else {
        return Ok(None);
    };
    let bad = || ApiError::invalid("Last-Event-ID must be <epoch>:<seq> or <seq>");
    let s = v.to_str().map_err(|_| bad())?.trim();
    if s.is_empty() {
        return Ok(None);
    }
    let (epoch, seq) = match s.rsplit_once(':') {
        Some((e, n)) => (Some(Epoch::parse(e).ok_or_else(bad)?), n),
        None => (None, s),
    };
    let seq = seq.parse::<u64>().map_err(|_| bad())?;
    Ok(Some((epoch, Seq(seq))))
}

/// `event: reset` for a hole: the same code and facts as the hole's error on every other
/// transport (`headSeq` when known).
fn reset_block(code: ErrorCode, epoch: &Epoch, first: Seq, head: Option<Seq>) -> Bytes {
    let mut data = json!({"code": code.as_str(), "epoch": epoch, "firstAvailableSeq": first});
    if let Some(h) = head {
        data["headSeq"] = json!(h);
    }
    Bytes::from(format!(
        "id: {}:{}\nevent: reset\ndata: {}\n\n",
        epoch,
        first.0.saturating_sub(1),
        data
    ))
}

async fn open(
    app: Arc<App>,
    headers: HeaderMap,
    stream: StreamId,
    q: SseQuery,
) -> ApiResult<Response> {
    let last_event_id = parse_last_event_id(&headers)?;
    // Refused (draining, full) before any store work: a refused upgrade costs nothing.
    let slot = app.admit()?;
    let (session, grants): (Option<SessionRecord>, Option<Grants>) = if let Some(t) = app
        .auth
        .query_token(q.token.as_deref())?
        .or_else(|| bearer(&headers))
    {
        (None, Some(app.auth.verify_connect(t)?.grants()))
    } else if let Some(r) = q.resume.as_deref() {
        (Some(app.resume(r, None, Transport::Sse).await?), None)
    } else {
        return Err(ApiError::unauthorized(
            "pass ?token=<connect token> or ?resume=<resume token>",
        ));
    };
    let resuming = last_event_id.is_some() || session.is_some();
    let position = match (last_event_id, q.after) {
        (Some((epoch, seq)), _) => Position::After { seq, epoch },
        (None, Some(a)) => Position::After {
            seq: Seq(a),
            epoch: None,
        },
        (None, None) => Position::Unstated,
    };
    let asker = match (&session, &grants) {
        (Some(s), _) => Asker::Connection(s),
        (None, Some(g)) => Asker::Grants(g),
        (None, None) => unreachable!("a token or a session was required above"),
    };
    let placed = match app.place(&stream, asker, position, None).await {
        Ok(p) => p,
        Err(e) => {
            if session.is_some() {
                app.metrics.resume_failed(Transport::Sse, e.code);
            }
            return Err(e);
        }
    };
    let mut first_chunk = vec![Bytes::from_static(b"retry: 1000\n\n")];
    // A hole is not an error loop: the client learns of it from `reset` and the stream goes
    // on from the oldest retained event (in the session too, so a reconnect finds it there).
    let (epoch, after, head) = match placed {
        Placement::Start(s) => (s.epoch, s.after, s.head),
        Placement::Hole(h) => {
            if let Some(s) = &session {
                app.restart_in_session(&s.id, &h).await;
            }
            app.metrics.error(h.code);
            first_chunk.push(reset_block(
                h.code,
                &h.epoch,
                h.first_available,
                Some(h.head),
            ));
            (h.epoch.clone(), h.restart_after(), h.head)
        }
    };
    if resuming {
        app.metrics.resume_succeeded(Transport::Sse);
    }
    let signal = Signal::new();
    let mut sub = app.hub.subscribe(
        stream.clone(),
        epoch,
        after,
        signal.clone(),
        session.as_ref().map(|s| s.id.clone()),
    );
    sub.set_replay_until(head);
    signal.wake();
    let mut drain_rx = app.drain.watch();
    let fraction = rand_fraction();
    let drain_at = drain_rx.borrow_and_update().deadline_for(fraction);
    let state = SseConn {
        conn: app.register_connection(&signal),
        session: session.map(|s| s.id.to_string()),
        fraction,
        drain_at,
        app,
        stream,
        sub,
        signal,
        pending: first_chunk.into(),
        ping_at: Instant::now() + PING_EVERY,
        drain_rx,
        retry_at: None,
        opened: Instant::now(),
        delivered: 0,
        _slot: slot,
    };
    state.app.metrics.connection_opened(Transport::Sse);
    tracing::info!(conn = state.conn, transport = "sse", stream = %state.stream,
        session = state.session.as_deref().unwrap_or(""), "connection opened");
    let body = futures_util::stream::unfold(state, |mut st| async move {
        st.next_chunk()
            .await
            .map(|b| (Ok::<_, std::convert::Infallible>(b), st))
    });
    let mut res = Response::new(Body::from_stream(body));
    *res.status_mut() = StatusCode::OK;
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(res)
}

fn rand_fraction() -> f64 {
    let b = zerodrop_core::random_bytes::<8>();
    (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}

struct SseConn {
    app: Arc<App>,
    conn: u64,
    stream: StreamId,
    session: Option<String>,
    sub: Subscription,
    signal: Arc<Signal>,
    pending: VecDeque<Bytes>,
    ping_at: Instant,
    drain_rx: watch::Receiver<DrainPhase>,
    fraction: f64,
    drain_at: Option<Instant>,
    retry_at: Option<Instant>,
    opened: Instant,
    delivered: u64,
    _slot: ConnSlot,
}

impl SseConn {
    /// The next bytes to send, or `None` to end the response.
    async fn next_chunk(&mut self) -> Option<Bytes> {
        loop {
            if let Some(b) = self.pending.pop_front() {
                return Some(b);
            }
            let next = [Some(self.ping_at), self.drain_at, self.retry_at]
                .into_iter()
                .flatten()
                .min()
                .unwrap_or(self.ping_at);
            tokio::select! {
                biased;
                _ = self.signal.woken() => {
                    self.signal.take();
                    if self.drain_rx.has_changed().unwrap_or(false) {
                        self.drain_at = self.drain_rx.borrow_and_update().deadline_for(self.fraction);
                    }
                    self.pull().await;
                }
                _ = tokio::time::sleep_until(next.into()) => {
                    let now = Instant::now();
                    if self.drain_at.is_some_and(|t| t <= now) {
                        return None;
                    }
                    if self.retry_at.is_some_and(|t| t <= now) {
                        self.retry_at = None;
                        self.signal.wake();
                    }
                    if self.ping_at <= now {
                        self.ping_at = now + PING_EVERY;
                        return Some(Bytes::from_static(b": ping\n\n"));
                    }
                }
            }
        }
    }

    async fn pull(&mut self) {
        let mut buf = Vec::new();
        match self
            .app
            .pull(&mut self.sub, MAX_EVENTS_PER_CHUNK, &mut buf)
            .await
        {
            Ok(replayed) => {
                if buf.is_empty() {
                    return;
                }
                let mut chunk =
                    Vec::with_capacity(buf.iter().map(|d| d.event.json().len() + 64).sum());
                let mut oldest: Option<Instant> = None;
                for d in &buf {
                    chunk.extend_from_slice(&d.sse_block());
                    if let Some(at) = d.event.committed_at() {
                        oldest = Some(oldest.map_or(at, |o| o.min(at)));
                    }
                }
                let n = buf.len() as u64;
                self.delivered += n;
                self.app.metrics.delivered(n);
                self.app.metrics.replayed(replayed as u64);
                if let Some(at) = oldest {
                    self.app.metrics.publish_to_deliver(at.elapsed());
                }
                self.pending.push_back(Bytes::from(chunk));
                // One pull may stop short of everything that is ready (catch-up reads are
                // bounded): look again after this chunk is sent; an empty look ends it.
                self.signal.wake();
            }
            Err(Fault::Store(e)) => {
                tracing::debug!(error = %e, "sse catch-up read failed; will retry");
                self.retry_at = Some(Instant::now() + Duration::from_millis(500));
            }
            Err(Fault::Trimmed { newly_dropped, .. }) => {
                self.app.metrics.dropped(newly_dropped);
                self.restart(ErrorCode::ReplayWindowTrimmed).await;
            }
            Err(Fault::EpochChanged { .. }) => self.restart(ErrorCode::EpochChanged).await,
        }
    }

    /// Tells the client about the hole and goes on from the oldest retained event.
    async fn restart(&mut self, code: ErrorCode) {
        match self.app.stream_info(&self.stream).await {
            Ok(info) => {
                self.app.metrics.error(code);
                self.pending.push_back(reset_block(
                    code,
                    &info.epoch,
                    info.first_seq,
                    Some(info.head),
                ));
                let after = Seq(info.first_seq.0.saturating_sub(1));
                let mut sub = self.app.hub.subscribe(
                    self.stream.clone(),
                    info.epoch,
                    after,
                    self.signal.clone(),
                    self.session.as_deref().and_then(SessionId::parse),
                );
                sub.set_replay_until(info.head);
                self.sub = sub;
                self.signal.wake();
            }
            Err(_) => self.retry_at = Some(Instant::now() + Duration::from_millis(500)),
        }
    }
}

impl Drop for SseConn {
    fn drop(&mut self) {
        self.app.unregister_connection(self.conn);
        self.app.metrics.connection_closed(Transport::Sse);
        tracing::info!(
            conn = self.conn,
            transport = "sse",
            stream = %self.stream,
            session = self.session.as_deref().unwrap_or(""),
            duration_ms = self.opened.elapsed().as_millis() as u64,
            delivered = self.delivered,
            "connection closed"
        );
        if let Some(sid) = self.session.as_deref().and_then(SessionId::parse) {
            let app = self.app.clone();
            // The reconnect window starts now.
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move { app.touch(&sid).await });
            }
        }
    }
}
