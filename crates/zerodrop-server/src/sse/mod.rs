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
//!
//! Many streams on one response (`GET /v1/sse?streams=…`) live in [`many`]: the same
//! authentication (`authenticate`), body (`SseConn`) and wire, with a cursor over every
//! stream as each message's id.

pub mod many;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use zerodrop_core::{Epoch, Grants, Seq, StreamId};
use zerodrop_store::{PresenceEntry, SessionRecord};

use crate::app::authz::Action;
use crate::app::presence::presence_frame;
use crate::app::{
    App, Asker, Authority, ConnSlot, Hole, Placement, Position, Resumed, StreamStart,
};
use crate::auth::bearer;
use crate::connection::{Core, Exit, Leave, Ready, Wire};
use crate::deflate::{self, GzipBody};
use crate::error::{ApiError, ApiResult};
use crate::http::extract::{Query, StreamPath};
use crate::live::Delivery;
use crate::metrics::Transport;

pub(crate) const PING_EVERY: Duration = Duration::from_secs(15);

#[derive(Deserialize)]
pub struct SseQuery {
    token: Option<String>,
    resume: Option<String>,
    after: Option<u64>,
    /// `presence=true`: the stream's presence entries too, as `event: presence` (no `id:`,
    /// so `Last-Event-ID` stays the events' position), from after `presenceAfter` in
    /// `presenceEpoch` (default: the presence log's head).
    #[serde(default)]
    presence: bool,
    #[serde(rename = "presenceAfter")]
    presence_after: Option<u64>,
    #[serde(rename = "presenceEpoch")]
    presence_epoch: Option<String>,
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
    headers.get("last-event-id").map_or(Ok(None), last_event_id)
}

/// A `Last-Event-ID` header's value: `<epoch>:<seq>` or a bare `<seq>` (what this module
/// writes as `id:`), `None` when it is blank, `INVALID_REQUEST` for anything else. Public for
/// the fuzz targets (`zerodrop-fuzzing`).
pub fn last_event_id(value: &HeaderValue) -> ApiResult<Option<(Option<Epoch>, Seq)>> {
    let bad = || ApiError::invalid("Last-Event-ID must be <epoch>:<seq> or <seq>");
    let s = value.to_str().map_err(|_| bad())?.trim();
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
/// transport. Its id is the position a reconnect goes on from: before the oldest retained
/// event, in the current epoch.
fn reset_block(hole: &Hole) -> Bytes {
    let data = json!({
        "code": hole.code.as_str(),
        "epoch": hole.epoch,
        "firstAvailableSeq": hole.first_available,
        "headSeq": hole.head,
    });
    Bytes::from(format!(
        "id: {}:{}\nevent: reset\ndata: {}\n\n",
        hole.epoch,
        hole.restart_after().0,
        data
    ))
}

/// Who an SSE request is, from its connect token (`?token=` or `Authorization`) and/or its
/// `?resume=` token: shared by the one-stream and the many-stream routes.
pub(crate) struct Authed {
    /// The session resumed with `?resume=`.
    pub session: Option<SessionRecord>,
    authority: Option<Authority>,
    /// What a connect token (without `?resume=`) grants.
    grants: Option<Grants>,
    /// A connect token's `exp` bounds the response (`TOKEN_EXPIRED` after the grace).
    exp: Option<u64>,
    bearer_of: Option<(String, Option<u64>)>,
    /// Whom the authorization hook is asked about.
    pub who: String,
    pub who_grants: Grants,
}

impl Authed {
    /// Who asks for a position: the session, or the connect token's grants.
    pub(crate) fn asker(&self) -> Asker<'_> {
        match (&self.session, &self.grants) {
            (Some(s), _) => Asker::Connection(s),
            (None, Some(g)) => Asker::Grants(g),
            (None, None) => unreachable!("a token or a session is required to be Authed"),
        }
    }

    /// The connection core of the response, under this authority.
    pub(crate) fn into_core(self, app: Arc<App>, slot: ConnSlot) -> Core {
        let mut core = Core::new(app, Transport::Sse, slot, PING_EVERY);
        if let (Some(s), Some(authority)) = (self.session, self.authority) {
            // SSE does not hold the session: a `?resume=` reconnect is a new response, and the
            // old one ends when its client goes.
            core.adopt(s.id, s.sub, s.grants, authority, false);
        }
        if let Some(exp) = self.exp {
            core.authorize(exp);
        }
        if let (Some((sub, iat)), Some(g)) = (self.bearer_of, self.grants) {
            core.identify(&sub, iat, g);
        }
        core
    }
}

/// Checks the credentials of an SSE request and the authorization hook's `Connect`.
pub(crate) async fn authenticate(
    app: &App,
    headers: &HeaderMap,
    token: Option<&str>,
    resume: Option<&str>,
) -> ApiResult<Authed> {
    // With a connect token, its `exp` bounds the stream (`TOKEN_EXPIRED` after the grace).
    // With both, the connect token is a fresh authority for the session resumed.
    let mut exp = None;
    let mut bearer_of = None;
    let token = app.auth.query_token(token)?.or_else(|| bearer(headers));
    let (resumed, grants): (Option<Resumed>, Option<Grants>) = match (token, resume) {
        (Some(t), Some(r)) => {
            let fresh = app.fresh_token(t).await.inspect_err(|e| {
                app.metrics.resume_failed(Transport::Sse, e.code);
            })?;
            let resumed = app.resume(r, None, Some(&fresh), Transport::Sse).await?;
            app.metrics.token_refresh(true);
            (Some(resumed), None)
        }
        (Some(t), None) => {
            let claims = app.connect_token(t).await?;
            exp = Some(claims.exp);
            bearer_of = Some((claims.sub.clone(), claims.iat));
            (None, Some(claims.grants()))
        }
        (None, Some(r)) => (Some(app.resume(r, None, None, Transport::Sse).await?), None),
        (None, None) => {
            return Err(ApiError::unauthorized(
                "pass ?token=<connect token> or ?resume=<resume token>",
            ));
        }
    };
    let authority = resumed.as_ref().map(|r| r.authority);
    let session: Option<SessionRecord> = resumed.map(|r| r.session);
    // The authorization hook, about what the token or the session grants.
    let (who, who_grants) = match (&session, &grants, &bearer_of) {
        (Some(s), _, _) => (s.sub.clone(), s.grants.clone()),
        (None, Some(g), Some((sub, _))) => (sub.clone(), g.clone()),
        _ => unreachable!("a token or a session was required above"),
    };
    app.authorize(&who, &who_grants, Action::Connect, None)
        .await?;
    Ok(Authed {
        session,
        authority,
        grants,
        exp,
        bearer_of,
        who,
        who_grants,
    })
}

async fn open(
    app: Arc<App>,
    headers: HeaderMap,
    stream: StreamId,
    q: SseQuery,
) -> ApiResult<Response> {
    let last_event_id = parse_last_event_id(&headers)?;
    let gzip = app.cfg.sse_gzip && deflate::accepts_gzip(&headers);
    // Refused (draining, full) before any store work: a refused upgrade costs nothing.
    let slot = app.admit()?;
    let auth = authenticate(&app, &headers, q.token.as_deref(), q.resume.as_deref()).await?;
    let mut authz_until = None;
    if auth.who_grants.may_subscribe(stream.as_str()) {
        authz_until = app
            .authorize(
                &auth.who,
                &auth.who_grants,
                Action::Subscribe,
                Some(&stream),
            )
            .await?;
    }
    let session = &auth.session;
    let resuming = last_event_id.is_some() || session.is_some();
    let position = match (last_event_id, q.after) {
        (Some((epoch, seq)), _) => Position::After { seq, epoch },
        (None, Some(a)) => Position::After {
            seq: Seq(a),
            epoch: None,
        },
        (None, None) => Position::Unstated,
    };
    let placed = match app.place(&stream, auth.asker(), position, None).await {
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
            if let Some(s) = session {
                app.restart_in_session(&s.id, &h).await;
            }
            app.metrics.error(h.code);
            first_chunk.push(reset_block(&h));
            (h.epoch.clone(), h.restart_after(), h.head)
        }
    };
    if resuming {
        app.metrics.resume_succeeded(Transport::Sse);
    }
    let mut core = auth.into_core(app, slot);
    core.enter(stream.clone(), &StreamStart { epoch, after, head })
        .await?;
    if q.presence {
        let epoch = match q.presence_epoch.as_deref().map(Epoch::parse) {
            Some(None) => return Err(ApiError::invalid("invalid presenceEpoch")),
            Some(Some(e)) => Some(e),
            None => None,
        };
        core.watch_presence(&stream, q.presence_after, epoch.as_ref())
            .await?;
    }
    core.authorized(&stream, authz_until);
    core.log_opened(Some(&stream));
    let wire = SseWire {
        pending: first_chunk.into(),
        chunk: Vec::new(),
    };
    Ok(encoded(respond(core, wire, gzip), gzip))
}

/// The `text/event-stream` response that runs `core` over `wire`.
fn respond(core: Core, wire: SseWire, gzip: bool) -> Response {
    let state = SseConn::new(core, wire).with_gzip(gzip);
    stream_response(Body::from_stream(futures_util::stream::unfold(
        state,
        |mut st| async move {
            st.next_chunk()
                .await
                .map(|b| (Ok::<_, std::convert::Infallible>(b), st))
        },
    )))
}

/// The headers of a gzip body (the request accepts it and `--sse-gzip` is on: see
/// [`SseConn::with_gzip`]).
pub(crate) fn encoded(mut res: Response, gzip: bool) -> Response {
    if gzip {
        let h = res.headers_mut();
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        h.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    }
    res
}

/// `body` as a `text/event-stream` response (unbuffered by proxies).
pub(crate) fn stream_response(body: Body) -> Response {
    let mut res = Response::new(body);
    *res.status_mut() = StatusCode::OK;
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    res
}

/// The response body, as the core's [`Wire`]: what the core says is queued as chunks that
/// hyper pulls as it can write them.
pub(crate) struct SseWire {
    pub(crate) pending: VecDeque<Bytes>,
    /// Events of the current delivery, sent as one chunk.
    pub(crate) chunk: Vec<u8>,
}

/// A transport whose bytes are a `text/event-stream` body: what is queued in
/// [`SseBody::pending`] goes out in order.
pub(crate) trait SseBody: Wire {
    fn pending(&mut self) -> &mut VecDeque<Bytes>;
}

impl SseBody for SseWire {
    fn pending(&mut self) -> &mut VecDeque<Bytes> {
        &mut self.pending
    }
}

impl Wire for SseWire {
    async fn event(&mut self, d: &Delivery) -> Result<(), Exit> {
        self.chunk.extend_from_slice(&d.sse_block());
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), Exit> {
        if !self.chunk.is_empty() {
            self.pending
                .push_back(Bytes::from(std::mem::take(&mut self.chunk)));
        }
        Ok(())
    }

    /// One stream per connection: after the `reset`, it goes on from the oldest retained
    /// event.
    fn goes_on_after_hole(&self) -> bool {
        true
    }

    async fn hole(&mut self, hole: &Hole) -> Result<(), Exit> {
        self.flush().await?;
        self.pending.push_back(reset_block(hole));
        Ok(())
    }

    /// `event: closed` with `{stream, lastSeq}`, then the response ends (a browser SDK closes
    /// its `EventSource` on it; a bare one that reconnects gets `closed` again at once).
    async fn closed(&mut self, stream: &StreamId, last_seq: Seq) -> Result<(), Exit> {
        self.flush().await?;
        let data = json!({"stream": stream.as_str(), "lastSeq": last_seq.0});
        self.pending
            .push_back(Bytes::from(format!("event: closed\ndata: {data}\n\n")));
        Err(Exit::Gone("closed"))
    }

    /// A comment: keeps proxies from timing the response out; nothing comes back.
    async fn ping(&mut self) -> Result<bool, Exit> {
        self.pending.push_back(Bytes::from_static(b": ping\n\n"));
        Ok(false)
    }

    /// `EventSource` resumes with `Last-Event-ID` (and the `?resume=` it was opened with).
    async fn token(&mut self, _resume_token: String) -> Result<(), Exit> {
        Ok(())
    }

    /// Nothing: an SSE client cannot answer. Its stream ends at `deadline` with
    /// `event: error` `TOKEN_EXPIRED`, and the client opens a new one with a fresh token.
    async fn ask_refresh(&mut self, _exp: u64, _deadline: u64) -> Result<(), Exit> {
        Ok(())
    }

    /// The response ends; the browser reconnects (elsewhere) with its `Last-Event-ID`.
    async fn refuse(&mut self, e: ApiError) -> Result<(), Exit> {
        Err(Exit::error(e))
    }

    async fn drain(&mut self, _resume_token: Option<String>, why: Leave) -> Exit {
        Exit::Gone(why.as_str())
    }

    async fn presence(&mut self, e: &PresenceEntry) -> Result<(), Exit> {
        let data = serde_json::to_string(&presence_frame(e)).unwrap_or_default();
        self.chunk
            .extend_from_slice(format!("event: presence\ndata: {data}\n\n").as_bytes());
        Ok(())
    }

    /// `event: error` with the refusal (`presence: true`); the events go on.
    async fn presence_lost(&mut self, e: ApiError) -> Result<(), Exit> {
        self.flush().await?;
        let data = serde_json::Value::Object(e.body());
        self.pending
            .push_back(Bytes::from(format!("event: error\ndata: {data}\n\n")));
        Ok(())
    }
}

/// A response body in progress: the core, its wire, and whether it has ended.
pub(crate) struct SseConn<W> {
    core: Core,
    wire: W,
    /// The connection has ended: what is pending goes out, then the response ends.
    ended: bool,
    /// The body is gzip: each chunk goes out compressed.
    gzip: Option<GzipBody>,
}

/// `event: error`: why the server ends the stream (`{"code","message"}`).
pub(crate) fn error_block(e: &ApiError) -> Bytes {
    let data = json!({"code": e.code.as_str(), "message": e.message});
    Bytes::from(format!("event: error\ndata: {data}\n\n"))
}

impl<W: SseBody> SseConn<W> {
    pub(crate) fn new(core: Core, wire: W) -> SseConn<W> {
        SseConn {
            core,
            wire,
            ended: false,
            gzip: None,
        }
    }

    /// gzip the body when `on`: each chunk (a delivery's events, a ping) is compressed on its
    /// own and ends with a flush, so the client decodes it on arrival.
    pub(crate) fn with_gzip(mut self, on: bool) -> SseConn<W> {
        self.gzip = on.then(GzipBody::new);
        self
    }

    /// The next bytes to send (compressed with gzip: decodable on arrival), or `None` to end
    /// the response.
    pub(crate) async fn next_chunk(&mut self) -> Option<Bytes> {
        let plain = self.next_plain().await;
        match (&mut self.gzip, plain) {
            (None, plain) => plain,
            (Some(gz), Some(b)) => Some(Bytes::from(gz.piece(&b))),
            (Some(gz), None) => gz.finish().map(Bytes::from),
        }
    }

    async fn next_plain(&mut self) -> Option<Bytes> {
        loop {
            if let Some(b) = self.wire.pending().pop_front() {
                return Some(b);
            }
            if self.ended {
                return None;
            }
            let turn = match self.core.ready().await {
                Ready::Wake => self.core.on_wake(&mut self.wire).await,
                Ready::Timer => self.core.on_timer(&mut self.wire).await,
            };
            if let Err(exit) = turn {
                let reason = match exit {
                    Exit::Gone(r) => r,
                    Exit::Close { reason, error, .. } => {
                        // A typed end (`TOKEN_EXPIRED`): the last block says why.
                        if let Some(e) = error {
                            self.core.app.metrics.error(e.code);
                            self.wire.pending().push_back(error_block(&e));
                        }
                        reason
                    }
                };
                self.core.close(None, reason).await;
                self.ended = true;
            }
        }
    }
}
