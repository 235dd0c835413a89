//! The WebSocket transport (SPEC §4): one task per connection.
//!
//! The task owns the socket and a connection `Core` (subscriptions, the budgeted pull loop,
//! holes, ping, token refresh, drain, takeover; see `connection.rs`). It sleeps until
//! something happens: a client frame, or the core's doorbell or timer. This module is the
//! WebSocket `Wire` (how events, holes, pings, tokens and a drain look as frames) and the
//! client frames: decoded as `zerodrop_core::frames::ClientFrame` (the types the Rust SDK
//! encodes with), each variant with its own handler (`on_subscribe`, `on_ack`, …). What the
//! server says goes out as a `ServerFrame`, but for events, whose frame was built once at
//! append and is shared by every subscriber; a burst of events costs one flush per
//! subscriber, not one per event. On `zerodrop.v3` an event whose payload is bytes goes as a
//! binary frame (built once too), and a binary frame from the client is a `publish` of bytes
//! (`zerodrop_core::frames::binary`).
//!
//! The upgrade is answered here (the `101`, the subprotocol, `permessage-deflate` when offered
//! and `--ws-deflate` is on), and tungstenite runs over the upgraded connection through
//! `deflate.rs`'s layer, which compresses and inflates whole frames under it.
//!
//! Acks are applied in memory under the checkpoint rule and written behind (once a second and
//! at close); a crash loses at most those, and a resuming client's own `lastAck` wins anyway.
//!
//! No write waits without bound: the connection's I/O fails a write that has made no progress
//! for two ping intervals (`stall.rs`), so a client that stopped reading costs at most that
//! long, and the timers that wait behind its write (ping, refresh, drain) are late by at most
//! that much. Such a socket is closed with 4408, like one that missed two pings, if the close
//! frame can be written within `CLOSE_WRITE` (it rarely can: the buffers in front of it are
//! full); otherwise the TCP connection is dropped. Either way the session stays for a resume.

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use governor::clock::DefaultClock;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::Value;
use tokio_tungstenite::WebSocketStream;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tungstenite::{Message, Utf8Bytes};
use zerodrop_core::checkpoint::{self, AckError};
use zerodrop_core::frames::binary;
use zerodrop_core::frames::{
    self, Ack, ClientFrame, Closed, FrameError, Ping, PresenceAt, Publish, Published, Reconnect,
    Refresh, RefreshAsk, ServerFrame, Subscribe, Subscribed, Token, Unsubscribe, Welcome,
};
use zerodrop_core::{Epoch, ErrorCode, Grants, Seq, SessionId, StreamId, now_ms};
use zerodrop_store::PresenceEntry;

use crate::app::authz::Action;
use crate::app::presence::presence_frame;
use crate::app::{
    AckWrite, App, Asker, Authority, ConnSlot, Hole, Position, Resumed, StreamStart,
    is_session_cap, no_longer_granted,
};
use crate::auth::{ConnectClaims, bearer};
use crate::conn::FirstFrameFollows;
use crate::connection::{Core, Exit, Leave, Ready, Wire};
use crate::deflate::{self, DeflateIo};
use crate::error::ApiError;
use crate::http::extract::{Query, Upgrade};
use crate::live::Delivery;
use crate::metrics::Transport;

/// Subprotocols this server speaks, newest first (the current one, the previous one, and v1
/// until its removal is announced).
pub const PROTOCOLS: &[&str] = &[V3, "zerodrop.v2", V1];

/// The current version: byte payloads travel as binary frames
/// (`zerodrop_core::frames::binary`).
const V3: &str = binary::PROTOCOL;
/// The previous version: every frame keeps its v1 shape (no batched `acks`).
const V1: &str = "zerodrop.v1";
const FIRST_FRAME_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a socket the server closes waits for the client's close frame (RFC 6455 §7.1.1).
/// Dropping the TCP connection while the client's frames are still unread makes the kernel
/// reset it, and a reset throws away whatever is still queued for the client: a slow or busy
/// client would never read the `reconnect` frame or the close frame in front of it.
pub(crate) const CLOSE_HANDSHAKE: Duration = Duration::from_secs(5);
/// How long the last frames (an `error`, the close frame) may take to be written; beyond, the
/// TCP connection is dropped without them. Capped by the stall bound when that is shorter.
const CLOSE_WRITE: Duration = Duration::from_secs(5);

#[derive(Deserialize)]
pub struct WsQuery {
    token: Option<String>,
    resume: Option<String>,
}

enum Start {
    Connect(ConnectClaims),
    /// A resume token, with a fresh connect token when the URL carries both.
    Resume(String, Option<ConnectClaims>),
    AwaitResume,
}

pub async fn handler(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    ws: Upgrade,
    Query(q): Query<WsQuery>,
) -> Response {
    // A token signed with a JWKS key the instance has not read yet: read it first.
    if let Some(t) = q.token.as_deref().or_else(|| bearer(&headers)) {
        app.auth.prepare(t).await;
    }
    match upgrade(app, headers, q, ws) {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

fn upgrade(
    app: Arc<App>,
    headers: HeaderMap,
    q: WsQuery,
    ws: Upgrade,
) -> Result<Response, ApiError> {
    let offered: Vec<&str> = headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect();
    let protocol = if offered.is_empty() {
        PROTOCOLS[0]
    } else {
        *PROTOCOLS
            .iter()
            .find(|p| offered.contains(p))
            .ok_or_else(|| {
                ApiError::invalid(format!(
                    "unsupported subprotocol; this server speaks {}",
                    PROTOCOLS.join(", ")
                ))
            })?
    };
    let token = app
        .auth
        .query_token(q.token.as_deref())?
        .or_else(|| bearer(&headers));
    let start = match (token, q.resume) {
        (Some(t), Some(r)) => Start::Resume(r, Some(app.auth.verify_refresh(t)?)),
        (Some(t), None) => Start::Connect(app.connect_token_known(t)?),
        (None, Some(r)) => Start::Resume(r, None),
        (None, None) => Start::AwaitResume,
    };
    let slot = app.admit()?;
    let cfg = &app.cfg;
    let config = WebSocketConfig::default()
        .max_message_size(Some(cfg.max_frame_bytes))
        .max_frame_size(Some(cfg.max_frame_bytes))
        // Client frames are small (acks, pongs); tungstenite allocates and zero-fills this
        // much per connection and read, and reserves more for a larger frame when needed.
        .read_buffer_size(1024)
        .write_buffer_size(64 * 1024);
    let compress = cfg.ws_deflate && deflate::negotiate(&headers);
    let limit = cfg.max_frame_bytes;
    let mut res = Response::new(Body::empty());
    *res.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = res.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    let accept = tungstenite::handshake::derive_accept_key(&ws.key);
    h.insert(
        header::SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&accept).map_err(|e| ApiError::invalid(e.to_string()))?,
    );
    if !offered.is_empty() {
        h.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(protocol),
        );
    }
    if compress {
        h.insert(
            header::SEC_WEBSOCKET_EXTENSIONS,
            HeaderValue::from_static(deflate::ANSWER),
        );
    }
    // A connect answers `welcome` at once (unless an authorization hook is asked first): the
    // 101 leaves with it, in one send.
    if matches!(start, Start::Connect(_)) && !app.asks_hook(Action::Connect) {
        res.extensions_mut().insert(FirstFrameFollows);
    }
    let on_upgrade = ws.on_upgrade;
    tokio::spawn(async move {
        // The upgrade fails when the client went away before the 101 (the slot is freed
        // with it).
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let io = DeflateIo::server(TokioIo::new(upgraded), compress, limit);
        let socket = WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
        let mut conn = Conn::new(app, socket, protocol, slot);
        conn.run(start).await;
    });
    Ok(res)
}

/// The socket: tungstenite over the upgraded connection, `permessage-deflate` under it when
/// negotiated.
type Socket = WebSocketStream<DeflateIo<TokioIo<Upgraded>>>;

/// What woke the connection's loop.
enum Turn {
    Frame(Option<Result<Message, tungstenite::Error>>),
    Core(Ready),
}

/// The socket, as the core's [`Wire`].
struct WsWire {
    socket: Socket,
    protocol: &'static str,
}

impl WsWire {
    async fn send_frame(&mut self, f: &ServerFrame) -> Result<(), Exit> {
        self.send_text(f.to_json()).await
    }

    async fn send_text(&mut self, s: String) -> Result<(), Exit> {
        self.socket
            .send(Message::Text(s.into()))
            .await
            .map_err(write_error)
    }
}

impl Wire for WsWire {
    async fn event(&mut self, d: &Delivery) -> Result<(), Exit> {
        let frame = match (self.protocol == V3).then(|| d.ws_binary_frame()).flatten() {
            Some(bytes) => Message::Binary(bytes),
            None => Message::Text(d.ws_frame()),
        };
        self.socket.feed(frame).await.map_err(write_error)
    }

    async fn flush(&mut self) -> Result<(), Exit> {
        self.socket.flush().await.map_err(write_error)
    }

    /// A hole is a stream-level `error`; the stream leaves the session and the client
    /// subscribes again once it has resynced.
    fn goes_on_after_hole(&self) -> bool {
        false
    }

    async fn hole(&mut self, hole: &Hole) -> Result<(), Exit> {
        self.send_text(hole.error().frame()).await
    }

    /// `closed {stream, lastSeq}`: the stream's subscription has ended; the socket stays.
    async fn closed(&mut self, stream: &StreamId, last_seq: Seq) -> Result<(), Exit> {
        self.send_frame(&ServerFrame::Closed(Closed {
            stream: stream.to_string(),
            last_seq: last_seq.0,
        }))
        .await
    }

    async fn ping(&mut self) -> Result<bool, Exit> {
        self.send_frame(&ServerFrame::Ping(Ping {
            t: Some(frames::raw(now_ms().to_string())),
        }))
        .await?;
        Ok(true)
    }

    async fn token(&mut self, resume_token: String) -> Result<(), Exit> {
        self.send_frame(&ServerFrame::Token(Token { resume_token }))
            .await
    }

    async fn ask_refresh(&mut self, exp: u64, deadline: u64) -> Result<(), Exit> {
        self.send_frame(&ServerFrame::Refresh(RefreshAsk { exp, deadline }))
            .await
    }

    /// `reconnect` with a fresh resume token, then close 1012.
    async fn refuse(&mut self, e: ApiError) -> Result<(), Exit> {
        self.send_text(e.frame()).await
    }

    async fn presence(&mut self, e: &PresenceEntry) -> Result<(), Exit> {
        let frame = ServerFrame::Presence(presence_frame(e)).to_json();
        self.socket
            .feed(Message::Text(frame.into()))
            .await
            .map_err(write_error)
    }

    /// A stream-level `error` with `presence: true`: the stream's events go on.
    async fn presence_lost(&mut self, e: ApiError) -> Result<(), Exit> {
        self.send_text(e.frame()).await
    }

    async fn drain(&mut self, resume_token: Option<String>, why: Leave) -> Exit {
        if let Some(resume_token) = resume_token {
            let frame = ServerFrame::Reconnect(Reconnect {
                reason: why.as_str().into(),
                resume_token,
                retry_after_ms: 0,
            });
            if let Err(exit) = self.send_frame(&frame).await {
                return exit;
            }
        }
        Exit::Close {
            code: 1012,
            reason: match why {
                Leave::Draining => "DRAINING",
                Leave::Disconnected => "DISCONNECTED",
            },
            error: None,
        }
    }
}

struct Conn {
    core: Core,
    wire: WsWire,
    limiter: DefaultDirectRateLimiter,
    last_limit_notice: Option<Instant>,
}

impl Conn {
    fn new(app: Arc<App>, socket: Socket, protocol: &'static str, slot: ConnSlot) -> Conn {
        let per_sec = NonZeroU32::new(app.cfg.ws_frames_per_sec).unwrap_or(NonZeroU32::MIN);
        let burst = per_sec.saturating_mul(NonZeroU32::new(2).unwrap_or(NonZeroU32::MIN));
        let ping_every = Duration::from_secs(app.cfg.ping_interval_sec);
        Conn {
            core: Core::new(app, Transport::Ws, slot, ping_every),
            wire: WsWire { socket, protocol },
            limiter: RateLimiter::direct_with_clock(
                Quota::per_second(per_sec).allow_burst(burst),
                limiter_clock(),
            ),
            last_limit_notice: None,
        }
    }

    fn app(&self) -> &Arc<App> {
        &self.core.app
    }

    async fn run(&mut self, start: Start) {
        // Start and finish are boxed: they need more state than the long wait in `serve`, and
        // an idle connection should carry only what waiting needs.
        let exit = match Box::pin(self.begin(start)).await {
            Ok(()) => {
                self.core.log_opened(None);
                match self.serve().await {
                    Ok(()) => Exit::Gone("ended"),
                    Err(exit) => exit,
                }
            }
            Err(exit) => exit,
        };
        Box::pin(self.finish(exit)).await;
    }

    /// Ends the connection: the session's state first (acks, its reconnect window, and a
    /// session that held no stream yet written), then the error and close frames, so that a
    /// resume made once the client has read them finds the session stored and gets its answer
    /// (`REVOKED` after a revocation's close, on any instance).
    async fn finish(&mut self, exit: Exit) {
        let (code, reason) = match &exit {
            Exit::Gone(r) => (None, *r),
            Exit::Close { code, reason, .. } => (Some(*code), *reason),
        };
        self.core.close(code, reason).await;
        if let Exit::Close {
            code,
            reason,
            error,
        } = exit
        {
            if let Some(e) = &error {
                self.app().metrics.error(e.code);
            }
            let frame = CloseFrame {
                code: CloseCode::from(code),
                reason: Utf8Bytes::from_static(reason),
            };
            // Bounded: a client that does not read must not hold the socket for the close.
            let bound = CLOSE_WRITE.min(self.app().cfg.write_stall());
            let socket = &mut self.wire.socket;
            let closed = tokio::time::timeout(bound, async move {
                if let Some(e) = error {
                    let _ = socket.send(Message::Text(e.frame().into())).await;
                }
                socket.send(Message::Close(Some(frame))).await
            })
            .await;
            if matches!(closed, Ok(Ok(()))) {
                self.await_close_reply().await;
            }
        }
    }

    /// Reads (and discards) what the client still sends until its close frame, its end of the
    /// stream, or [`CLOSE_HANDSHAKE`]: only then is the TCP connection dropped, with nothing
    /// unread, so everything written before the close frame reaches the client.
    async fn await_close_reply(&mut self) {
        let until = tokio::time::Instant::now() + CLOSE_HANDSHAKE;
        loop {
            match tokio::time::timeout_at(until, self.wire.socket.next()).await {
                Ok(Some(Ok(Message::Close(_)))) | Ok(Some(Err(_))) | Ok(None) | Err(_) => return,
                Ok(Some(Ok(_))) => {}
            }
        }
    }

    async fn send_frame(&mut self, f: &ServerFrame) -> Result<(), Exit> {
        self.wire.send_frame(f).await
    }

    /// A stream-level error: the socket stays open.
    async fn send_error(&mut self, e: ApiError) -> Result<(), Exit> {
        self.app().metrics.error(e.code);
        self.wire.send_text(e.frame()).await
    }

    async fn begin(&mut self, start: Start) -> Result<(), Exit> {
        match start {
            Start::Connect(claims) => {
                self.app()
                    .authorize(&claims.sub, &claims.grants(), Action::Connect, None)
                    .await
                    .map_err(Exit::error)?;
                // Written with its first stream (see `session::Unwritten`).
                let rec = self.app().open_unwritten(&claims.sub, claims.grants());
                let authority = Authority {
                    exp: Some(claims.exp),
                    born_ms: rec.created_at_ms,
                };
                self.adopt(rec.id, rec.sub, rec.grants, authority).await
            }
            Start::Resume(token, fresh) => {
                self.resume(&token, BTreeMap::new(), fresh.as_ref(), BTreeMap::new())
                    .await
            }
            Start::AwaitResume => {
                let first =
                    tokio::time::timeout(FIRST_FRAME_TIMEOUT, self.wire.socket.next()).await;
                let text = match first {
                    Err(_) => {
                        return Err(Exit::error(ApiError::unauthorized(
                            "no credentials: pass ?token=, ?resume=, or send a resume frame first",
                        )));
                    }
                    Ok(None) | Ok(Some(Err(_))) => return Err(Exit::Gone("closed before resume")),
                    Ok(Some(Ok(Message::Text(t)))) => t,
                    Ok(Some(Ok(_))) => {
                        return Err(Exit::error(ApiError::unauthorized(
                            "the first frame must be a resume frame",
                        )));
                    }
                };
                match ClientFrame::parse(text.as_str()) {
                    Ok(ClientFrame::Resume(r)) => {
                        let fresh = match r.token.as_deref() {
                            Some(t) => match self.app().fresh_token(t).await {
                                Ok(c) => Some(c),
                                Err(e) => {
                                    self.app().metrics.resume_failed(Transport::Ws, e.code);
                                    return Err(Exit::error(e));
                                }
                            },
                            None => None,
                        };
                        self.resume(
                            &r.resume_token,
                            r.last_ack.unwrap_or_default(),
                            fresh.as_ref(),
                            r.presence.unwrap_or_default(),
                        )
                        .await
                    }
                    _ => Err(Exit::error(ApiError::unauthorized(
                        "the first frame must be a resume frame with resumeToken",
                    ))),
                }
            }
        }
    }

    /// Becomes the session's connection and says `welcome`.
    async fn adopt(
        &mut self,
        id: SessionId,
        sub: String,
        grants: Grants,
        authority: Authority,
    ) -> Result<(), Exit> {
        let session_id = id.as_str().to_string();
        self.core.adopt(id, sub, grants, authority, true);
        let app = self.app();
        let welcome = ServerFrame::Welcome(Welcome {
            session_id,
            resume_token: self.core.mint().unwrap_or_default(),
            reconnect_window_sec: app.cfg.reconnect_window_sec,
            instance: app.instance.clone(),
            protocol: self.wire.protocol.to_string(),
        });
        self.send_frame(&welcome).await
    }

    async fn resume(
        &mut self,
        token: &str,
        last_ack: BTreeMap<String, u64>,
        fresh: Option<&ConnectClaims>,
        presence: BTreeMap<String, PresenceAt>,
    ) -> Result<(), Exit> {
        let app = self.app().clone();
        app.metrics.ws_reconnect_attempt();
        let Resumed {
            session,
            authority,
            ended,
        } = app
            .resume(token, None, fresh, Transport::Ws)
            .await
            .map_err(Exit::error)?;
        app.authorize(&session.sub, &session.grants, Action::Connect, None)
            .await
            .map_err(Exit::error)?;
        self.adopt(
            session.id.clone(),
            session.sub.clone(),
            session.grants.clone(),
            authority,
        )
        .await?;
        app.metrics.resume_succeeded(Transport::Ws);
        if fresh.is_some() {
            app.metrics.token_refresh(true);
        }
        for stream in &ended {
            self.send_error(no_longer_granted(stream)).await?;
        }
        for (stream, st) in &session.streams {
            let until = match app
                .authorize(
                    &session.sub,
                    &session.grants,
                    Action::Subscribe,
                    Some(stream),
                )
                .await
            {
                Ok(u) => u,
                Err(e) => {
                    // Refused now: the stream leaves the session, as after any stream error.
                    if let Err(le) = app.unsubscribe_stream(&session.id, stream).await {
                        tracing::debug!(error = %le.message, "could not take a stream out of a session");
                    }
                    self.send_error(e).await?;
                    continue;
                }
            };
            let client_ack = last_ack.get(stream.as_str()).map(|n| Seq(*n));
            match app
                .stream_start(
                    Asker::Connection(&session),
                    stream,
                    client_ack,
                    AckWrite::Background,
                )
                .await
            {
                Ok(start) => {
                    let acked = client_ack.map_or(st.ack, |c| c.max(st.ack));
                    self.core.acks.insert(stream.clone(), acked);
                    self.core.authorized(stream, until);
                    let watch = presence
                        .get(stream.as_str())
                        .map(|p| (Some(p.after), p.epoch.clone()));
                    self.start_sub(stream.clone(), start, watch).await?;
                }
                // A hole has already left the session (`App::place`).
                Err(e) => self.send_error(e).await?,
            }
        }
        Ok(())
    }

    /// Subscribes (the session becomes a member of a stream with presence), and with
    /// `presence` delivers its presence frames from that position (`None`: not asked).
    async fn start_sub(
        &mut self,
        stream: StreamId,
        start: StreamStart,
        presence: Option<(Option<u64>, Option<String>)>,
    ) -> Result<(), Exit> {
        if let Err(e) = self.core.enter(stream.clone(), &start).await {
            return self.send_error(e).await;
        }
        let mut watched = None;
        if let Some((after, epoch)) = presence {
            let epoch = match epoch.as_deref().map(Epoch::parse) {
                Some(None) => {
                    let e =
                        ApiError::invalid("invalid presenceEpoch").with("stream", stream.as_str());
                    return self.send_error(e).await;
                }
                Some(Some(e)) => Some(e),
                None => None,
            };
            match self
                .core
                .watch_presence(&stream, after, epoch.as_ref())
                .await
            {
                Ok(p) => watched = Some(p),
                Err(e) => self.send_error(e).await?,
            }
        }
        self.send_frame(&ServerFrame::Subscribed(Subscribed {
            stream: stream.as_str().to_string(),
            epoch: start.epoch.as_str().to_string(),
            head_seq: start.head.0,
            from_seq: start.after.0 + 1,
            presence_epoch: watched.as_ref().map(|p| p.epoch.as_str().to_string()),
            presence_seq: watched.map(|p| p.after),
        }))
        .await
    }

    async fn serve(&mut self) -> Result<(), Exit> {
        let mut turn: u32 = 0;
        loop {
            // A deadline that has passed runs first: under a steady flow of events the
            // doorbell is always ready, and a drain, a ping or a token refresh must not wait
            // for a lull.
            if self.core.due() {
                self.core.on_timer(&mut self.wire).await?;
            }
            // The core (doorbell, timer) is looked at first, so a wake-up does not also pay
            // for a read attempt; every eighth turn the socket goes first, so a busy stream
            // can never starve the client's frames (pongs, acks).
            turn = turn.wrapping_add(1);
            let (core, socket) = (&mut self.core, &mut self.wire.socket);
            let ev = if turn.is_multiple_of(8) {
                tokio::select! {
                    biased;
                    m = socket.next() => Turn::Frame(m),
                    r = core.ready() => Turn::Core(r),
                }
            } else {
                tokio::select! {
                    biased;
                    r = core.ready() => Turn::Core(r),
                    m = socket.next() => Turn::Frame(m),
                }
            };
            match ev {
                Turn::Core(Ready::Wake) => self.core.on_wake(&mut self.wire).await?,
                Turn::Core(Ready::Timer) => self.core.on_timer(&mut self.wire).await?,
                Turn::Frame(msg) => match msg {
                    None => return Err(Exit::Gone("client closed")),
                    Some(Err(e)) => return Err(read_error(e)),
                    // Boxed: handling a client frame needs far more state than waiting does,
                    // and idle connections should not carry it.
                    Some(Ok(Message::Text(t))) => Box::pin(self.on_text(t)).await?,
                    Some(Ok(Message::Binary(b))) => Box::pin(self.on_binary(b)).await?,
                    Some(Ok(Message::Close(_))) => return Err(Exit::Gone("client closed")),
                    Some(Ok(_)) => {}
                },
            }
        }
    }

    /// Takes one cell of the frame limiter: `false` when the connection is over its rate (the
    /// frame is then dropped; a `RATE_LIMITED` notice goes out at most once a second).
    async fn admit(&mut self) -> Result<bool, Exit> {
        if self.limiter.check().is_ok() {
            return Ok(true);
        }
        self.core.app.metrics.rate_limited("ws");
        let now = Instant::now();
        if self
            .last_limit_notice
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
        {
            self.last_limit_notice = Some(now);
            let e = ApiError::new(ErrorCode::RateLimited, "too many frames; slow down")
                .with("retryAfterMs", 1000);
            self.send_error(e).await?;
        }
        Ok(false)
    }

    /// Whether a parsed frame is a control frame the limiter never drops: a `pong`, or an
    /// `ack` the connection can apply without the store (a subscribed stream, a seq it was
    /// delivered). Any other ack (malformed, unsubscribed, beyond what was delivered) may
    /// cost a store read or an error reply, so it is limited like every other frame. A
    /// client `ping` is limited too: each one makes the server write a reply.
    fn is_exempt(&self, f: &ClientFrame) -> bool {
        match f {
            ClientFrame::Pong(_) => true,
            ClientFrame::Ack(f) => match (&f.acks, f.stream.as_deref(), f.seq) {
                (None, Some(stream), Some(seq)) => self.may_apply(stream, seq),
                (Some(acks), None, None) if self.wire.protocol != V1 => {
                    acks.len() <= self.core.subs.len()
                        && acks
                            .iter()
                            .all(|(s, v)| v.as_u64().is_some_and(|seq| self.may_apply(s, seq)))
                }
                _ => false,
            },
            _ => false,
        }
    }

    /// An ack the connection can apply from what it delivered: a subscribed stream, a seq at
    /// most its cursor.
    fn may_apply(&self, stream: &str, seq: u64) -> bool {
        self.core
            .cursor(stream)
            .is_some_and(|cursor| Seq(seq) <= cursor)
            && self.core.acks.contains_key(stream)
    }

    async fn on_text(&mut self, text: Utf8Bytes) -> Result<(), Exit> {
        // Parsed before it is limited, so acks and pongs can pass; a frame that does not
        // parse (or nests too deep) still costs a cell, so floods of garbage are limited.
        let parsed = parse_frame(text.as_str());
        let exempt = matches!(&parsed, Ok(f) if self.is_exempt(f));
        if !exempt && !self.admit().await? {
            return Ok(());
        }
        match parsed {
            Err(e) => self.send_error(e).await,
            Ok(ClientFrame::Subscribe(f)) => self.on_subscribe(f).await,
            Ok(ClientFrame::Unsubscribe(f)) => self.on_unsubscribe(f).await,
            Ok(ClientFrame::Ack(f)) => self.on_ack(f).await,
            Ok(ClientFrame::Publish(f)) => self.on_publish(f).await,
            Ok(ClientFrame::Ping(f)) => self.on_ping(f).await,
            Ok(ClientFrame::Pong(_)) => {
                self.core.on_pong();
                Ok(())
            }
            Ok(ClientFrame::Resume(_)) => self.on_late_resume().await,
            Ok(ClientFrame::Refresh(f)) => self.on_refresh(f).await,
        }
    }

    /// A binary frame: on `zerodrop.v3` a `publish` of bytes, limited like any text frame;
    /// on the earlier versions, and of any other kind, `INVALID_REQUEST`.
    async fn on_binary(&mut self, frame: Bytes) -> Result<(), Exit> {
        if !self.admit().await? {
            return Ok(());
        }
        if self.wire.protocol != V3 {
            let e = ApiError::invalid(format!(
                "binary frames need the {V3} subprotocol; this socket speaks {}",
                self.wire.protocol
            ));
            return self.send_error(e).await;
        }
        match parse_binary_frame(&frame) {
            Ok(ClientFrame::Publish(f)) => self.on_publish(f).await,
            Ok(_) => unreachable!("a binary client frame is a publish"),
            Err(e) => self.send_error(e).await,
        }
    }

    /// A client `ping`: its `t` comes back verbatim.
    async fn on_ping(&mut self, f: Ping) -> Result<(), Exit> {
        self.send_frame(&ServerFrame::Pong(f.echo())).await
    }

    /// A fresh connect token: it must be valid, unexpired and for the connection's subject.
    /// The connection then holds its authority from it: a new `exp` (asked again before
    /// it), and its grants, which may be narrower: a subscribed stream the new token does not
    /// grant ends with a stream-level `FORBIDDEN` and leaves the session. The answer is a
    /// `token` frame (a fresh resume token); a refused token is an `error` and changes
    /// nothing (the old deadline stands).
    async fn on_refresh(&mut self, f: Refresh) -> Result<(), Exit> {
        let app = self.app().clone();
        let claims = match app.fresh_token(&f.token).await {
            Ok(c) => c,
            Err(e) => {
                app.metrics.token_refresh(false);
                return self.send_error(e).await;
            }
        };
        let Some(session) = &self.core.session else {
            return Ok(());
        };
        if claims.sub != session.sub {
            app.metrics.token_refresh(false);
            return self
                .send_error(ApiError::forbidden(
                    "the new connect token is for another subject",
                ))
                .await;
        }
        let grants = claims.grants();
        if session.grants != grants {
            // Stored first, so that a later resume without a token has no more than these; a
            // store that cannot take them refuses the refresh (the old deadline stands).
            if let Err(e) = app.regrant(&session.id, &grants).await {
                app.metrics.token_refresh(false);
                return self.send_error(e).await;
            }
        }
        let ended: Vec<StreamId> = self
            .core
            .subs
            .iter()
            .map(|s| s.stream.clone())
            .filter(|s| !grants.may_subscribe(s.as_str()))
            .collect();
        if !ended.is_empty() {
            self.core.flush_acks().await;
        }
        for stream in ended {
            if let Err(e) = self.core.leave(&stream).await {
                tracing::debug!(error = %e.message, "could not take an ungranted stream out of a session");
            }
            self.send_error(no_longer_granted(&stream)).await?;
        }
        if let Some(s) = self.core.session.as_mut() {
            s.grants = grants;
        }
        self.core.authorize(claims.exp);
        app.metrics.token_refresh(true);
        let token = self.core.mint().unwrap_or_default();
        self.send_frame(&ServerFrame::Token(Token {
            resume_token: token,
        }))
        .await
    }

    /// `resume` after the socket already holds a session.
    async fn on_late_resume(&mut self) -> Result<(), Exit> {
        self.send_error(ApiError::invalid("resume is only valid as the first frame"))
            .await
    }

    /// Validates the `stream` field of a frame (errors are stream-level).
    async fn frame_stream(&mut self, s: Option<String>) -> Result<Option<StreamId>, Exit> {
        let Some(s) = s else {
            self.send_error(ApiError::invalid("the frame needs a stream"))
                .await?;
            return Ok(None);
        };
        match StreamId::new(&s) {
            Ok(id) => Ok(Some(id)),
            Err(e) => {
                let e = ApiError::new(
                    ErrorCode::InvalidStreamId,
                    format!("invalid stream id: {e}"),
                )
                .with("stream", s.chars().take(160).collect::<String>());
                self.send_error(e).await?;
                Ok(None)
            }
        }
    }

    async fn on_subscribe(&mut self, f: Subscribe) -> Result<(), Exit> {
        let Some(stream) = self.frame_stream(Some(f.stream)).await? else {
            return Ok(());
        };
        let Some(session) = &self.core.session else {
            return Ok(());
        };
        let sid = session.id.clone();
        let already = self.core.subs.iter().any(|s| s.stream == stream);
        if !already && self.core.subs.len() >= self.core.app.cfg.max_streams_per_session {
            let e = ApiError::invalid(format!(
                "a session holds at most {} streams",
                self.core.app.cfg.max_streams_per_session
            ))
            .with("stream", stream.as_str());
            return self.send_error(e).await;
        }
        let client_epoch = match f.epoch.as_deref().map(Epoch::parse) {
            Some(None) => {
                return self
                    .send_error(ApiError::invalid("invalid epoch").with("stream", stream.as_str()))
                    .await;
            }
            Some(Some(e)) => Some(e),
            None => None,
        };
        let position = match (f.after, client_epoch) {
            (Some(seq), epoch) => Position::After {
                seq: Seq(seq),
                epoch,
            },
            (None, Some(epoch)) => Position::Head { epoch },
            (None, None) => Position::Unstated,
        };
        let grants = session.grants.clone();
        let sub = session.sub.clone();
        let app = self.app().clone();
        // The hook is asked about what the token grants (it narrows, never widens).
        let mut until = None;
        if grants.may_subscribe(stream.as_str()) {
            match app
                .authorize(&sub, &grants, Action::Subscribe, Some(&stream))
                .await
            {
                Ok(u) => until = u,
                Err(e) => return self.send_error(e).await,
            }
        }
        let start = match app.subscribe_stream(&sid, &grants, &stream, position).await {
            Ok(start) => start,
            // The store lost the session (restarted empty), or the subject is at its cap: a
            // session-level error.
            Err(e) if e.code == ErrorCode::SessionNotFound || is_session_cap(&e) => {
                return Err(Exit::error(e));
            }
            Err(e) => return self.send_error(e).await,
        };
        let prev = self.core.acks.get(&stream).copied().unwrap_or(Seq(0));
        self.core.acks.insert(stream.clone(), prev.max(start.after));
        self.core.authorized(&stream, until);
        let watch = f.presence.then_some((f.presence_after, f.presence_epoch));
        self.start_sub(stream, start, watch).await
    }

    async fn on_unsubscribe(&mut self, f: Unsubscribe) -> Result<(), Exit> {
        let Some(stream) = self.frame_stream(Some(f.stream)).await? else {
            return Ok(());
        };
        self.core.flush_acks().await;
        if let Err(e) = self.core.leave(&stream).await {
            return self.send_error(e).await;
        }
        self.send_frame(&ServerFrame::Unsubscribed(Unsubscribe {
            stream: stream.as_str().to_string(),
        }))
        .await
    }

    async fn on_ack(&mut self, f: Ack) -> Result<(), Exit> {
        let Some(acks) = f.acks else {
            return self.apply_ack(f.stream, f.seq).await;
        };
        if self.wire.protocol == V1 {
            return self
                .send_error(ApiError::invalid(
                    "a batched ack (acks) needs the zerodrop.v2 subprotocol; on zerodrop.v1 send one {stream, seq} ack per stream",
                ))
                .await;
        }
        if f.stream.is_some() || f.seq.is_some() {
            return self
                .send_error(ApiError::invalid(
                    "an ack carries either acks {stream: seq} or one stream and seq, not both",
                ))
                .await;
        }
        let most = self.core.app.cfg.max_streams_per_session;
        if acks.len() > most {
            return self
                .send_error(ApiError::invalid(format!(
                    "a batched ack carries at most {most} streams (a session holds no more)"
                )))
                .await;
        }
        // Each entry under the single ack's rules; a bad one is answered on its own stream
        // and the others still apply.
        for (stream, seq) in acks {
            match seq.as_u64() {
                Some(seq) => self.apply_ack(Some(stream), Some(seq)).await?,
                None => {
                    let e = ApiError::invalid("an ack's seq is a non-negative integer")
                        .with("stream", stream.chars().take(160).collect::<String>());
                    self.send_error(e).await?
                }
            }
        }
        Ok(())
    }

    /// One checkpoint (a v1 `ack` or one entry of a v2 batched ack).
    async fn apply_ack(&mut self, stream: Option<String>, seq: Option<u64>) -> Result<(), Exit> {
        let Some(stream) = self.frame_stream(stream).await? else {
            return Ok(());
        };
        let Some(seq) = seq.map(Seq) else {
            return self
                .send_error(ApiError::invalid("ack needs a seq").with("stream", stream.as_str()))
                .await;
        };
        let Some(acked) = self.core.acks.get(&stream).copied() else {
            let e = ApiError::invalid("ack for a stream this connection is not subscribed to")
                .with("stream", stream.as_str());
            return self.send_error(e).await;
        };
        // The head we know without asking the store: what was delivered. Beyond it, ask.
        let delivered = self.core.cursor(stream.as_str()).unwrap_or(Seq(0));
        let head = if seq <= delivered {
            delivered
        } else {
            match self.core.app.stream_info(&stream).await {
                Ok(i) => i.head,
                Err(e) => {
                    return self
                        .send_error(ApiError::from(e).with("stream", stream.as_str()))
                        .await;
                }
            }
        };
        match checkpoint::apply(acked, seq, head) {
            Ok(u) => {
                self.core.app.metrics.checkpoint(u.is_applied());
                if u.is_applied() {
                    self.core.acks.insert(stream.clone(), u.last_ack());
                    if let Some(s) = &self.core.session {
                        self.core.app.acks.record(&s.id, &stream, u.last_ack());
                    }
                }
                Ok(())
            }
            Err(AckError::BeyondHead { requested, head }) => {
                self.send_error(ApiError::beyond_head(requested, head, stream.as_str()))
                    .await
            }
        }
    }

    async fn on_publish(&mut self, f: Publish) -> Result<(), Exit> {
        let id = f.id.clone().unwrap_or(Value::Null);
        let Some(stream) = self.frame_stream(Some(f.stream)).await? else {
            return Ok(());
        };
        let Some(session) = &self.core.session else {
            return Ok(());
        };
        if !session.grants.may_publish(stream.as_str()) {
            let e = ApiError::forbidden(format!(
                "publishing to {stream} is not allowed by the token"
            ))
            .with("stream", stream.as_str())
            .with("id", id);
            return self.send_error(e).await;
        }
        if let Err(e) = self
            .core
            .app
            .authorize(
                &session.sub,
                &session.grants,
                Action::Publish,
                Some(&stream),
            )
            .await
        {
            return self.send_error(e.with("id", id)).await;
        }
        let Some(session) = &self.core.session else {
            return Ok(());
        };
        let Some(data) = f.data else {
            let e = ApiError::invalid("publish needs data")
                .with("stream", stream.as_str())
                .with("id", id);
            return self.send_error(e).await;
        };
        // A frame id makes the publish idempotent for this session (a retry after a
        // reconnect is answered with the first result).
        let key = match &id {
            Value::Null => None,
            Value::String(s) if s.len() <= 128 => Some(format!("ws:{}:{s}", session.id)),
            Value::Number(n) => Some(format!("ws:{}:{n}", session.id)),
            _ => {
                let e =
                    ApiError::invalid("id must be a string of at most 128 characters or a number")
                        .with("stream", stream.as_str());
                return self.send_error(e).await;
            }
        };
        let sub = session.sub.clone();
        // The key belongs to the session: the session is durable before the key is, so that
        // a retry after a crash finds both (an unwritten session is written now).
        if key.is_some()
            && let Err(e) = self.core.app.ensure_written(&session.id).await
        {
            return self
                .send_error(e.with("stream", stream.as_str()).with("id", id))
                .await;
        }
        match self
            .core
            .app
            .client_publish(stream.clone(), &data, key, &sub)
            .await
        {
            Ok(out) => {
                self.send_frame(&ServerFrame::Published(Published {
                    stream: stream.as_str().to_string(),
                    seq: out.seq.map(|s| s.0),
                    id: Some(id),
                    job_id: out.job,
                }))
                .await
            }
            Err(e) => {
                self.send_error(e.with("stream", stream.as_str()).with("id", id))
                    .await
            }
        }
    }
}

/// One client frame as the server reads it: refused when it nests too deep, else decoded by
/// [`ClientFrame::parse`]. The frame object is one level; what it carries (`data`, a
/// `ping`'s `t`, which is echoed) may nest as deep as event data may, and no deeper. Public
/// for the fuzz targets (`zerodrop-fuzzing`).
pub fn parse_frame(text: &str) -> Result<ClientFrame, ApiError> {
    check_depth(text)?;
    ClientFrame::parse(text).map_err(|e| ApiError::invalid(e.to_string()))
}

/// One `zerodrop.v3` binary client frame as the server reads it: a `publish` whose `data` is
/// the bytes after its header line, the header under [`parse_frame`]'s depth rule.
pub fn parse_binary_frame(frame: &[u8]) -> Result<ClientFrame, ApiError> {
    let invalid = |e: FrameError| ApiError::invalid(e.to_string());
    check_depth(binary::split(frame).map_err(invalid)?.0)?;
    ClientFrame::parse_binary(frame).map_err(invalid)
}

fn check_depth(text: &str) -> Result<(), ApiError> {
    let depth = zerodrop_core::json::depth(text);
    if depth > zerodrop_core::json::MAX_DEPTH + 1 {
        return Err(ApiError::invalid(format!(
            "the frame nests {depth} levels deep; its fields may nest {} at most",
            zerodrop_core::json::MAX_DEPTH
        )));
    }
    Ok(())
}

/// The clock of every connection's frame limiter, made once: making a clock probes the CPU
/// (CPUID, which traps to the hypervisor in a VM), far too dear to do per connection.
fn limiter_clock() -> DefaultClock {
    static CLOCK: OnceLock<DefaultClock> = OnceLock::new();
    CLOCK.get_or_init(DefaultClock::default).clone()
}

/// A failed write. One that made no progress for the stall bound (`stall.rs`) is a client that
/// stopped reading: it is closed like one that missed two pings (4408). Anything else is a
/// broken connection.
fn write_error(e: tungstenite::Error) -> Exit {
    let stalled = matches!(&e, tungstenite::Error::Io(io) if crate::stall::is_stall(io));
    if stalled {
        Exit::Close {
            code: ErrorCode::PingTimeout.close_code(),
            reason: "WRITE_STALLED",
            error: None,
        }
    } else {
        Exit::Gone("write failed")
    }
}

fn read_error(e: tungstenite::Error) -> Exit {
    let too_big = matches!(e, tungstenite::Error::Capacity(_));
    if too_big {
        Exit::Close {
            code: 1009,
            reason: "PAYLOAD_TOO_LARGE",
            error: Some(ApiError::new(
                ErrorCode::PayloadTooLarge,
                "frame larger than the limit",
            )),
        }
    } else {
        Exit::Gone("read failed")
    }
}
