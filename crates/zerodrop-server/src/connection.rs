//! The connection core: everything a long-lived connection does that does not depend on how
//! its bytes are framed, written once for the WebSocket ([`crate::ws`]) and SSE
//! ([`crate::sse`]) transports.
//!
//! A [`Core`] holds the connection's session (when it has one), a [`Subscription`] per
//! stream with the acks applied to it, and one timer for every deadline (ping, token refresh,
//! drain, store retry). It sleeps until the hub rings its doorbell or a deadline passes, then:
//!
//! - **delivers**: pulls everything after each cursor within a budget and hands the events to
//!   the transport, which writes them in one flush;
//! - **turns faults into holes**: a trim that overtook a cursor or a log that changed epoch is
//!   placed by the session module ([`App::hole_under_cursor`]: counted, recorded, the stream
//!   taken out of the session or restarted at the oldest retained event) and the transport
//!   only encodes the [`Hole`]; a failed store read is retried shortly;
//! - **pings**, and closes a connection whose pings go unanswered twice;
//! - **refreshes** the resume token and the session's reconnect window;
//! - **drains**: at this connection's spread moment the transport says goodbye with a fresh
//!   resume token;
//! - **ends with its authority**: a connection whose authority is a connect token (given at
//!   connect, or carried by the resume token it resumed with) is asked for a fresh one
//!   (`refresh`) before the token's `exp`, and closed with `TOKEN_EXPIRED` once `exp` plus the
//!   grace (`--token-grace-sec`) has passed without one; a session's connection also ends at
//!   the session's maximum age (`RECONNECT_WINDOW_EXPIRED`);
//! - **is taken over** when a newer connection resumes its session;
//! - **keeps its session present** in the streams with presence it is subscribed to (the
//!   session module's `App::join`, `App::release`, `App::part`), and delivers the presence
//!   frames of the streams it watches from their cursors (`App::place_presence`).
//!
//! The transport implements [`Wire`]: how an event, a hole, a ping, a token and a drain look
//! on its wire. It decides no session rule.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::time::Sleep;
use zerodrop_core::{Epoch, ErrorCode, Grants, Seq, SessionId, StreamId};
use zerodrop_store::PresenceEntry;

use crate::app::authz::Action;
use crate::app::presence::{PresenceStart, check_presence_position};
use crate::app::revocation::{Bearer, Verdict};
use crate::app::{App, Authority, ConnSlot, Hole, StreamStart, authority_ended};
use crate::drain::DrainPhase;
use crate::error::ApiError;
use crate::live::{Delivery, Fault, Signal, Subscription};
use crate::metrics::Transport;

/// Most events written per wake; the rest follows on the next turn, after client frames had
/// their chance.
const MAX_EVENTS_PER_WRITE: usize = 512;
/// How soon a failed store read is tried again.
const STORE_RETRY: Duration = Duration::from_millis(500);
/// How long before a connect token's `exp` a fresh one is asked for (at most).
const ASK_AHEAD: Duration = Duration::from_secs(60);

/// Why a connection ends.
pub(crate) enum Exit {
    /// The client closed or the connection broke.
    Gone(&'static str),
    /// We close with this code, after sending `error` if given.
    Close {
        code: u16,
        reason: &'static str,
        error: Option<ApiError>,
    },
}

impl Exit {
    pub(crate) fn error(e: ApiError) -> Exit {
        Exit::Close {
            code: e.code.close_code(),
            reason: e.code.as_str(),
            error: Some(e),
        }
    }
}

/// How a transport puts the core's news on its wire. Every method but [`Wire::drain`] may
/// fail with the [`Exit`] that ends the connection (a broken or stalled write).
pub(crate) trait Wire {
    /// Queues one event; [`Wire::flush`] writes what was queued.
    async fn event(&mut self, d: &Delivery) -> Result<(), Exit>;
    async fn flush(&mut self) -> Result<(), Exit>;
    /// Whether a stream goes on from the oldest retained event after a hole (SSE, one stream
    /// per connection) or leaves the session (WebSocket: the client resyncs and subscribes
    /// again).
    fn goes_on_after_hole(&self) -> bool;
    /// Tells the client about a hole (already counted and recorded).
    async fn hole(&mut self, hole: &Hole) -> Result<(), Exit>;
    /// The stream was closed and every event up to `last_seq` was handed over: tell the
    /// client it ends there (its subscription has ended; the stream stays in the session, so
    /// a resume gets what it missed, then this again). A transport of one stream (SSE) ends
    /// with it.
    async fn closed(&mut self, stream: &StreamId, last_seq: Seq) -> Result<(), Exit>;
    /// A keep-alive; `true` when the client must answer it (a `pong`).
    async fn ping(&mut self) -> Result<bool, Exit>;
    /// A fresh resume token for the session.
    async fn token(&mut self, resume_token: String) -> Result<(), Exit>;
    /// The connect token expires at `exp` (Unix seconds): ask for a fresh one before
    /// `deadline`. A transport the client cannot answer on (SSE) says nothing.
    async fn ask_refresh(&mut self, exp: u64, deadline: u64) -> Result<(), Exit>;
    /// A stream-level refusal found while the connection runs (the authorization hook denied
    /// or could not answer a re-check); the stream has left the session already. A transport
    /// of one stream (SSE) ends with it.
    async fn refuse(&mut self, e: ApiError) -> Result<(), Exit>;
    /// The drain moment of this connection, or a disconnect order: say goodbye (with a resume
    /// token when there is a session) and tell how the connection ends.
    async fn drain(&mut self, resume_token: Option<String>, why: Leave) -> Exit;
    /// Queues one presence entry (sent with the next [`Wire::flush`]).
    async fn presence(&mut self, e: &PresenceEntry) -> Result<(), Exit>;
    /// A stream's presence frames cannot go on from the cursor (the presence log started
    /// again, or was trimmed past it): they stop; the stream's events go on.
    async fn presence_lost(&mut self, e: ApiError) -> Result<(), Exit>;
}

/// A stream whose presence frames this connection delivers.
struct PresenceCursor {
    stream: StreamId,
    epoch: Epoch,
    /// The last presence seq delivered.
    after: u64,
    /// Set by the hub when the presence log grew.
    mark: Arc<AtomicBool>,
}

/// Most presence entries read per stream and turn.
const PRESENCE_READ: usize = 256;

/// Why a connection is asked to reconnect (elsewhere, or here at once).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Leave {
    Draining,
    /// `POST /admin/disconnect`: nothing is revoked, the client may resume at once.
    Disconnected,
}

impl Leave {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Leave::Draining => "draining",
            Leave::Disconnected => "disconnected",
        }
    }
}

/// The session a connection holds.
pub(crate) struct Held {
    pub id: SessionId,
    pub sub: String,
    pub grants: Grants,
    /// What its access stands on: the newest connect token's `exp`, the session's age.
    pub authority: Authority,
}

/// Every deadline of a connection; one timer serves them all.
struct Timers {
    ping: Instant,
    refresh: Instant,
    drain: Option<Instant>,
    retry: Option<Instant>,
    /// When to ask for a fresh connect token (`refresh`).
    ask: Option<Instant>,
    /// When the connection's authority ends: its connect token's `exp` plus the grace, or
    /// its session's maximum age.
    expire: Option<Instant>,
    /// When the first authorization hook verdict of a subscription runs out.
    authz: Option<Instant>,
}

impl Timers {
    fn next(&self) -> Instant {
        [
            Some(self.ping),
            Some(self.refresh),
            self.drain,
            self.retry,
            self.ask,
            self.expire,
            self.authz,
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(self.ping)
    }
}

/// What woke a connection's core.
pub(crate) enum Ready {
    /// The doorbell: new events, a drain phase, a takeover.
    Wake,
    /// A deadline passed.
    Timer,
}

pub(crate) struct Core {
    pub app: Arc<App>,
    pub id: u64,
    transport: Transport,
    pub signal: Arc<Signal>,
    pub session: Option<Held>,
    pub subs: Vec<Subscription>,
    /// Per subscribed stream, the ack as applied (written behind by `App::acks`).
    pub acks: HashMap<StreamId, Seq>,
    ping_every: Duration,
    ping_outstanding: Option<Instant>,
    missed_pings: u8,
    drain_rx: watch::Receiver<DrainPhase>,
    drain_fraction: f64,
    timers: Timers,
    /// Boxed once per connection: the one timer behind [`Core::ready`].
    sleep: std::pin::Pin<Box<Sleep>>,
    buf: Vec<Arc<Delivery>>,
    opened: Instant,
    pub delivered: u64,
    /// The `exp` (Unix seconds) of the connect token this connection holds its authority
    /// from (given at connect, carried by a resume token, or refreshed); `None`: none (a
    /// session opened with the api key).
    exp: Option<u64>,
    /// The error the connection ends with at `timers.expire`.
    expire_code: ErrorCode,
    /// Who the connection is for revocations: its subject (without a session: its connect
    /// token's) and when its authority was issued (its session's creation, or the token's
    /// `iat`).
    bearer: Option<(String, u64)>,
    /// The generation of revocations and disconnect orders it opened in, and last looked at.
    orders_born: u64,
    orders_seen: u64,
    /// Per subscribed stream, when the authorization hook's verdict runs out (asked again).
    authz: HashMap<StreamId, Instant>,
    /// Whom the hook is asked about without a session (SSE with a connect token).
    token_grants: Option<Grants>,
    /// Streams with presence where this connection keeps its session a member.
    members: Vec<StreamId>,
    /// Streams whose presence frames it delivers.
    watching: Vec<PresenceCursor>,
    closed: bool,
    _slot: ConnSlot,
}

impl Core {
    /// A connection admitted into `slot`, registered for drains; it pings every `ping_every`.
    pub(crate) fn new(
        app: Arc<App>,
        transport: Transport,
        slot: ConnSlot,
        ping_every: Duration,
    ) -> Core {
        let mut drain_rx = app.drain.watch();
        let signal = Signal::new();
        let id = app.register_connection(&signal);
        // Spread drain reconnects evenly, whatever the id pattern.
        let drain_fraction =
            (id.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11) as f64 / (1u64 << 53) as f64;
        let now = Instant::now();
        let timers = Timers {
            ping: now + ping_every,
            refresh: now + refresh_every(&app),
            drain: drain_rx.borrow_and_update().deadline_for(drain_fraction),
            retry: None,
            ask: None,
            expire: None,
            authz: None,
        };
        let sleep = Box::pin(tokio::time::sleep_until(timers.next().into()));
        app.metrics.connection_opened(transport);
        Core {
            id,
            transport,
            signal,
            session: None,
            subs: Vec::new(),
            acks: HashMap::new(),
            ping_every,
            ping_outstanding: None,
            missed_pings: 0,
            drain_rx,
            drain_fraction,
            timers,
            sleep,
            buf: Vec::new(),
            opened: now,
            delivered: 0,
            exp: None,
            expire_code: ErrorCode::TokenExpired,
            bearer: None,
            orders_born: app.orders_generation(),
            orders_seen: app.orders_generation(),
            authz: HashMap::new(),
            token_grants: None,
            members: Vec::new(),
            watching: Vec::new(),
            closed: false,
            _slot: slot,
            app,
        }
    }

    pub(crate) fn sid_str(&self) -> &str {
        self.session.as_ref().map(|s| s.id.as_str()).unwrap_or("")
    }

    /// The connection now serves this session, under its `authority` (the connection ends
    /// with it). `hold`: it becomes the session's one connection on this instance (a later
    /// resume takes it over).
    pub(crate) fn adopt(
        &mut self,
        id: SessionId,
        sub: String,
        grants: Grants,
        authority: Authority,
        hold: bool,
    ) {
        if hold {
            self.app.hold_session(&id, self.id, &self.signal);
        }
        self.bearer = Some((sub.clone(), authority.born_ms));
        self.session = Some(Held {
            id,
            sub,
            grants,
            authority,
        });
        self.exp = authority.exp;
        self.arm_authority();
    }

    /// A connection without a session (SSE opened with a connect token) is `sub`'s, under a
    /// token issued at `iat` (Unix seconds; `None`: before every revocation) granting
    /// `grants` (what the authorization hook is told).
    pub(crate) fn identify(&mut self, sub: &str, iat: Option<u64>, grants: Grants) {
        self.bearer = Some((sub.to_string(), iat.unwrap_or(0).saturating_mul(1000)));
        self.token_grants = Some(grants);
    }

    /// Whether a revocation or a disconnect order made since the connection last looked ends
    /// it: `REVOKED` (close 4403), or a `reconnect` frame (as in a drain).
    async fn obey_orders(&mut self, wire: &mut impl Wire) -> Result<(), Exit> {
        let g = self.app.orders_generation();
        if g == self.orders_seen {
            return Ok(());
        }
        self.orders_seen = g;
        let Some((sub, issued_ms)) = &self.bearer else {
            return Ok(());
        };
        let b = Bearer {
            sub,
            session: self.session.as_ref().map(|s| &s.id),
            issued_ms: *issued_ms,
        };
        match self.app.verdict(b, self.orders_born) {
            Some(Verdict::Revoked(e)) => {
                self.app.metrics.connection_ended("revoked");
                Err(Exit::error(e))
            }
            Some(Verdict::Disconnect) => {
                self.app.metrics.connection_ended("disconnected");
                Err(wire
                    .drain(self.mint_written().await, Leave::Disconnected)
                    .await)
            }
            None => Ok(()),
        }
    }

    /// The connection (and its session) holds its authority from a connect token expiring at
    /// `exp` (Unix seconds), given at connect or in a `refresh`.
    pub(crate) fn authorize(&mut self, exp: u64) {
        self.exp = Some(exp);
        if let Some(s) = self.session.as_mut() {
            s.authority.exp = Some(exp);
        }
        self.arm_authority();
    }

    /// Sets the deadlines that follow the authority: a fresh connect token is asked for 60 s
    /// before `exp`, or a third of the token's remaining lifetime before when that is shorter;
    /// the connection ends `--token-grace-sec` after `exp` (`TOKEN_EXPIRED`), or at its
    /// session's maximum age (`RECONNECT_WINDOW_EXPIRED`), whichever comes first.
    fn arm_authority(&mut self) {
        let now_ms = self.app.clock().now_ms();
        let now = Instant::now();
        let at = |ms: u64| now + Duration::from_millis(ms.saturating_sub(now_ms));
        self.timers.ask = self.exp.map(|exp| {
            let exp_ms = self.app.clock().wall_deadline(exp.saturating_mul(1000));
            let left = exp_ms.saturating_sub(now_ms);
            at(exp_ms) - ASK_AHEAD.min(Duration::from_millis(left / 3))
        });
        let end = match &self.session {
            Some(s) => Some(self.app.authority_end(s.authority)),
            None => self.exp.map(|exp| {
                let ms = exp
                    .saturating_add(self.app.cfg.token_grace_sec)
                    .saturating_mul(1000);
                (self.app.clock().wall_deadline(ms), ErrorCode::TokenExpired)
            }),
        };
        self.timers.expire = end.map(|(ms, _)| at(ms));
        if let Some((_, code)) = end {
            self.expire_code = code;
        }
    }

    /// A resume token for the session held (none once its authority has ended).
    pub(crate) fn mint(&self) -> Option<String> {
        let s = self.session.as_ref()?;
        self.app.mint_token(&s.id, &s.sub, s.authority)
    }

    /// A resume token for a client about to reconnect, perhaps to another instance: the
    /// session is written first if it was not yet (`session::Unwritten`).
    async fn mint_written(&self) -> Option<String> {
        let s = self.session.as_ref()?;
        if let Err(e) = self.app.ensure_written(&s.id).await {
            tracing::debug!(error = %e.message, "could not write a session before its reconnect");
        }
        self.mint()
    }

    /// At `debug`: a connect storm must not pay a log line per connection twice; the line at
    /// its end (`info`) says who it was, how long it lasted and why it ended.
    pub(crate) fn log_opened(&self, stream: Option<&StreamId>) {
        tracing::debug!(
            conn = self.id,
            transport = self.transport.as_str(),
            session = %self.sid_str(),
            sub = self.session.as_ref().map(|s| s.sub.as_str()).unwrap_or(""),
            stream = stream.map(StreamId::as_str).unwrap_or(""),
            "connection opened"
        );
    }

    /// Delivers `stream` from `start` (replacing a subscription to it); the doorbell rings so
    /// that what is ready goes out on the next turn.
    pub(crate) fn subscribe(&mut self, stream: StreamId, start: &StreamStart) {
        self.subscribe_at(stream, start.epoch.clone(), start.after, start.head);
    }

    fn subscribe_at(&mut self, stream: StreamId, epoch: Epoch, after: Seq, head: Seq) {
        self.subs.retain(|s| s.stream != stream);
        let session = self.session.as_ref().map(|s| s.id.clone());
        let mut sub = self
            .app
            .hub
            .subscribe(stream, epoch, after, self.signal.clone(), session);
        sub.set_replay_until(head);
        self.subs.push(sub);
        self.signal.wake();
    }

    /// Subscribes like [`Core::subscribe`], and makes the session a member of a stream with
    /// presence. A full stream refuses (`OVER_CAPACITY`): the stream leaves the session again.
    pub(crate) async fn enter(
        &mut self,
        stream: StreamId,
        start: &StreamStart,
    ) -> Result<(), ApiError> {
        self.subscribe(stream.clone(), start);
        let Some(s) = &self.session else {
            return Ok(());
        };
        match self
            .app
            .join(self.id, &s.id, &s.sub, s.grants.info.clone(), &stream)
            .await
        {
            Ok(()) => {
                if self.app.presence_on(&stream) && !self.members.contains(&stream) {
                    self.members.push(stream);
                }
                Ok(())
            }
            Err(e) => {
                self.flush_acks().await;
                if let Err(le) = self.leave(&stream).await {
                    tracing::debug!(error = %le.message, "could not take a stream out of a session");
                }
                Err(e)
            }
        }
    }

    /// Delivers `stream`'s presence frames after `after` in `epoch` (the head when `None`):
    /// listening first, then placing, so nothing appended in between is missed.
    pub(crate) async fn watch_presence(
        &mut self,
        stream: &StreamId,
        after: Option<u64>,
        epoch: Option<&Epoch>,
    ) -> Result<PresenceStart, ApiError> {
        self.unwatch(stream);
        let mark = self
            .app
            .hub
            .presence_listen(stream, self.id, self.signal.clone());
        match self.app.place_presence(stream, after, epoch).await {
            Ok(start) => {
                self.watching.push(PresenceCursor {
                    stream: stream.clone(),
                    epoch: start.epoch.clone(),
                    after: start.after,
                    mark,
                });
                Ok(start)
            }
            Err(e) => {
                self.app.hub.presence_unlisten(stream, self.id);
                Err(e)
            }
        }
    }

    fn unwatch(&mut self, stream: &StreamId) {
        if self.watching.iter().any(|w| w.stream == *stream) {
            self.watching.retain(|w| w.stream != *stream);
            self.app.hub.presence_unlisten(stream, self.id);
        }
    }

    /// The members this connection keeps present are released (they leave after the grace
    /// unless another connection of their session claims them).
    async fn release_members(&mut self) {
        let Some(s) = &self.session else { return };
        for stream in std::mem::take(&mut self.members) {
            self.app.release(self.id, &s.id, &stream).await;
        }
    }

    pub(crate) fn unsubscribe(&mut self, stream: &StreamId) {
        self.unwatch(stream);
        self.subs.retain(|s| s.stream != *stream);
        self.acks.remove(stream);
        if self.authz.remove(stream).is_some() {
            self.timers.authz = self.authz.values().min().copied();
        }
    }

    /// The authorization hook allowed `stream` until `until` (`None`: for good): it is asked
    /// again then.
    pub(crate) fn authorized(&mut self, stream: &StreamId, until: Option<Instant>) {
        match until {
            Some(t) => {
                self.authz.insert(stream.clone(), t);
            }
            None => {
                self.authz.remove(stream);
            }
        }
        self.timers.authz = self.authz.values().min().copied();
    }

    /// Asks the hook again about every subscription whose verdict ran out: allowed goes on;
    /// denied or unanswered ends the stream (it leaves the session) with the hook's error.
    async fn reauthorize(&mut self, wire: &mut impl Wire) -> Result<(), Exit> {
        let now = Instant::now();
        let due: Vec<StreamId> = self
            .authz
            .iter()
            .filter(|(_, t)| **t <= now)
            .map(|(s, _)| s.clone())
            .collect();
        let (sub, grants) = match (&self.session, &self.bearer, &self.token_grants) {
            (Some(s), _, _) => (s.sub.clone(), s.grants.clone()),
            (None, Some((sub, _)), Some(g)) => (sub.clone(), g.clone()),
            _ => {
                self.authz.clear();
                self.timers.authz = None;
                return Ok(());
            }
        };
        for stream in due {
            self.authz.remove(&stream);
            match self
                .app
                .authorize(&sub, &grants, Action::Subscribe, Some(&stream))
                .await
            {
                Ok(until) => self.authorized(&stream, until),
                Err(e) => {
                    self.app.metrics.error(e.code);
                    self.flush_acks().await;
                    if let Err(le) = self.leave(&stream).await {
                        tracing::debug!(error = %le.message, "could not take a stream out of a session");
                    }
                    wire.refuse(e).await?;
                }
            }
        }
        self.timers.authz = self.authz.values().min().copied();
        Ok(())
    }

    /// `stream` leaves the connection and its session (the caller flushes buffered acks
    /// first, so that they are written while the stream is still in the session).
    pub(crate) async fn leave(&mut self, stream: &StreamId) -> Result<(), ApiError> {
        self.unsubscribe(stream);
        match &self.session {
            Some(s) => {
                if let Some(i) = self.members.iter().position(|m| m == stream) {
                    self.members.remove(i);
                    self.app.part(self.id, &s.id, stream).await;
                }
                self.app.unsubscribe_stream(&s.id, stream).await
            }
            None => Ok(()),
        }
    }

    /// What was delivered on `stream` so far (its cursor).
    pub(crate) fn cursor(&self, stream: &str) -> Option<Seq> {
        self.subs
            .iter()
            .find(|s| s.stream.as_str() == stream)
            .map(Subscription::cursor)
    }

    /// Whether a deadline has passed (checked before waiting, so that a steady flow of
    /// events cannot hold back a drain, a ping or a refresh).
    pub(crate) fn due(&self) -> bool {
        self.timers.next() <= Instant::now()
    }

    /// Waits for the doorbell or the next deadline.
    pub(crate) async fn ready(&mut self) -> Ready {
        let next = tokio::time::Instant::from_std(self.timers.next());
        if self.sleep.deadline() != next {
            self.sleep.as_mut().reset(next);
        }
        tokio::select! {
            biased;
            _ = self.signal.woken() => Ready::Wake,
            _ = &mut self.sleep => Ready::Timer,
        }
    }

    /// The doorbell rang: a takeover, a drain phase change, or new events.
    pub(crate) async fn on_wake(&mut self, wire: &mut impl Wire) -> Result<(), Exit> {
        self.signal.take();
        if self.signal.is_kicked() {
            return Err(Exit::error(ApiError::new(
                ErrorCode::SessionTakenOver,
                "a newer connection resumed this session",
            )));
        }
        if self.drain_rx.has_changed().unwrap_or(false) {
            let phase = *self.drain_rx.borrow_and_update();
            self.timers.drain = phase.deadline_for(self.drain_fraction);
        }
        self.obey_orders(wire).await?;
        self.deliver(wire).await
    }

    /// Runs every deadline that has passed.
    pub(crate) async fn on_timer(&mut self, wire: &mut impl Wire) -> Result<(), Exit> {
        let now = Instant::now();
        if self.timers.expire.is_some_and(|t| t <= now) {
            self.app.metrics.connection_ended(match self.expire_code {
                ErrorCode::TokenExpired => "token_expired",
                _ => "session_expired",
            });
            return Err(Exit::error(match self.expire_code {
                ErrorCode::TokenExpired => ApiError::new(
                    ErrorCode::TokenExpired,
                    "the connect token expired and no fresh one came (refresh); resume with a \
                     new token (resume {resumeToken, token}) or connect again with it",
                ),
                code => authority_ended(code),
            }));
        }
        if self.timers.drain.is_some_and(|t| t <= now) {
            return Err(wire.drain(self.mint_written().await, Leave::Draining).await);
        }
        if self.timers.ask.is_some_and(|t| t <= now) {
            self.timers.ask = None;
            if let Some(exp) = self.exp {
                wire.ask_refresh(exp, exp + self.app.cfg.token_grace_sec)
                    .await?;
            }
        }
        if self.timers.authz.is_some_and(|t| t <= now) {
            self.reauthorize(wire).await?;
        }
        if self.timers.retry.is_some_and(|t| t <= now) {
            self.timers.retry = None;
            self.signal.wake();
        }
        if self.timers.ping <= now {
            self.timers.ping = now + self.ping_every;
            self.ping(wire).await?;
        }
        if self.timers.refresh <= now {
            self.timers.refresh = now + refresh_every(&self.app);
            if let Some(s) = &self.session {
                let id = s.id.clone();
                self.app.touch(&id, false).await;
                if let Some(token) = self.mint() {
                    wire.token(token).await?;
                }
            }
        }
        Ok(())
    }

    async fn ping(&mut self, wire: &mut impl Wire) -> Result<(), Exit> {
        if self.ping_outstanding.is_some() {
            self.missed_pings += 1;
            if self.missed_pings >= 2 {
                return Err(Exit::error(ApiError::new(
                    ErrorCode::PingTimeout,
                    "two pings went unanswered",
                )));
            }
        }
        let sent = Instant::now();
        if wire.ping().await? {
            self.ping_outstanding = Some(sent);
        }
        Ok(())
    }

    /// The client answered a ping.
    pub(crate) fn on_pong(&mut self) {
        if let Some(sent) = self.ping_outstanding.take() {
            self.app.metrics.rtt(sent.elapsed());
        }
        self.missed_pings = 0;
    }

    /// Hands the transport whatever is new after every cursor, then flushes once.
    async fn deliver(&mut self, wire: &mut impl Wire) -> Result<(), Exit> {
        let mut budget = MAX_EVENTS_PER_WRITE;
        let mut frames = 0u64;
        let mut oldest: Option<Instant> = None;
        let mut faults = Vec::new();
        for i in 0..self.subs.len() {
            // Pull until this cursor is caught up (an empty pull) or the budget is spent: one
            // pull may stop short of everything that is ready (a catch-up read is bounded).
            while budget > 0 {
                self.buf.clear();
                match self
                    .app
                    .pull(&mut self.subs[i], budget, &mut self.buf)
                    .await
                {
                    Ok(replayed) => {
                        if replayed > 0 {
                            self.app.metrics.replayed(replayed as u64);
                        }
                        for d in &self.buf {
                            if let Some(at) = d.event.committed_at() {
                                oldest = Some(oldest.map_or(at, |o| o.min(at)));
                            }
                            wire.event(d).await?;
                        }
                        let n = self.buf.len();
                        frames += n as u64;
                        budget -= n;
                        if n == 0 {
                            break;
                        }
                    }
                    Err(f) => {
                        faults.push((i, f));
                        break;
                    }
                }
            }
            if budget == 0 {
                break;
            }
        }
        if frames > 0 {
            wire.flush().await?;
            self.delivered += frames;
            self.app.metrics.delivered(frames);
            if let Some(at) = oldest {
                self.app.metrics.publish_to_deliver(at.elapsed());
            }
        }
        // From the last, so that removing one leaves the indexes of the others as they were.
        for (i, fault) in faults.into_iter().rev() {
            self.on_fault(i, fault, wire).await?;
        }
        self.end_closed(wire).await?;
        if budget == 0 {
            self.signal.wake();
        }
        self.deliver_presence(wire).await
    }

    /// Hands the transport the presence entries after each marked cursor, then flushes once.
    async fn deliver_presence(&mut self, wire: &mut impl Wire) -> Result<(), Exit> {
        let mut sent = 0usize;
        let mut lost = Vec::new();
        for i in 0..self.watching.len() {
            let w = &self.watching[i];
            if !w.mark.swap(false, Ordering::AcqRel) {
                continue;
            }
            let (stream, after) = (w.stream.clone(), w.after);
            let log = match self.app.presence_read(&stream, after, PRESENCE_READ).await {
                Ok(log) => log,
                Err(e) => {
                    tracing::debug!(error = %e.message, stream = %stream, "presence read failed; will retry");
                    self.watching[i].mark.store(true, Ordering::Release);
                    self.timers.retry = Some(Instant::now() + STORE_RETRY);
                    continue;
                }
            };
            let w = &mut self.watching[i];
            if let Err(e) = check_presence_position(&stream, after, Some(&w.epoch), &log) {
                lost.push((i, e));
                continue;
            }
            for e in &log.entries {
                wire.presence(e).await?;
                w.after = e.seq;
            }
            sent += log.entries.len();
            if log.entries.len() == PRESENCE_READ {
                w.mark.store(true, Ordering::Release);
                self.signal.wake();
            }
        }
        if sent > 0 {
            wire.flush().await?;
        }
        for (i, e) in lost.into_iter().rev() {
            let w = self.watching.remove(i);
            self.app.hub.presence_unlisten(&w.stream, self.id);
            self.app.metrics.error(e.code);
            wire.presence_lost(e).await?;
        }
        Ok(())
    }

    /// Ends the subscriptions whose stream was closed and whose every event was handed over
    /// (and flushed): the transport says `closed`.
    async fn end_closed(&mut self, wire: &mut impl Wire) -> Result<(), Exit> {
        let mut i = self.subs.len();
        while i > 0 {
            i -= 1;
            if let Some(last) = self.subs[i].ended() {
                let stream = self.subs.remove(i).stream.clone();
                self.acks.remove(&stream);
                wire.closed(&stream, last).await?;
            }
        }
        Ok(())
    }

    /// A pull that cannot go on. A failed read is tried again shortly; a hole is placed by
    /// the session module and the transport tells the client.
    async fn on_fault(&mut self, i: usize, fault: Fault, wire: &mut impl Wire) -> Result<(), Exit> {
        let goes_on = wire.goes_on_after_hole();
        let (stream, cursor) = (self.subs[i].stream.clone(), self.subs[i].cursor());
        let sid = self.session.as_ref().map(|s| s.id.clone());
        let hole = match self
            .app
            .hole_under_cursor(sid.as_ref(), &stream, cursor, fault, goes_on)
            .await
        {
            Ok(hole) => hole,
            Err(e) => {
                // Keep the subscription; look again shortly.
                tracing::debug!(error = %e, stream = %stream, "catch-up read failed; will retry");
                self.timers.retry = Some(Instant::now() + STORE_RETRY);
                return Ok(());
            }
        };
        if goes_on {
            self.subscribe_at(stream, hole.epoch.clone(), hole.restart_after(), hole.head);
        } else {
            self.subs.remove(i);
            self.acks.remove(&stream);
            self.unwatch(&stream);
            // The client resyncs and subscribes again: within the grace, that emits nothing.
            if let (Some(s), Some(m)) = (
                &self.session,
                self.members.iter().position(|m| *m == stream),
            ) {
                self.members.remove(m);
                self.app.release(self.id, &s.id, &stream).await;
            }
        }
        self.app.metrics.error(hole.code);
        wire.hole(&hole).await
    }

    /// Writes this session's buffered acks now (before the socket goes, or before a stream
    /// leaves the session).
    pub(crate) async fn flush_acks(&self) {
        if let Some(s) = &self.session {
            self.app.flush_acks(Some(&s.id)).await;
        }
    }

    /// The end of the connection: buffered acks written, the reconnect window started, the
    /// session let go. Without it (a response body dropped mid-stream), [`Drop`] does the
    /// same in the background.
    pub(crate) async fn close(&mut self, code: Option<u16>, reason: &str) {
        self.closed = true;
        self.flush_acks().await;
        self.release_members().await;
        if let Some(s) = &self.session {
            self.app.touch(&s.id, true).await;
            self.app.release_session(&s.id, self.id);
        }
        self.log_closed(code, reason);
    }

    fn log_closed(&self, code: Option<u16>, reason: &str) {
        tracing::info!(
            conn = self.id,
            transport = self.transport.as_str(),
            session = %self.sid_str(),
            sub = self.bearer.as_ref().map(|(s, _)| s.as_str()).unwrap_or(""),
            close_code = code,
            reason,
            duration_ms = self.opened.elapsed().as_millis() as u64,
            delivered = self.delivered,
            "connection closed"
        );
    }
}

impl Drop for Core {
    fn drop(&mut self) {
        self.app.unregister_connection(self.id);
        self.app.metrics.connection_closed(self.transport);
        for w in std::mem::take(&mut self.watching) {
            self.app.hub.presence_unlisten(&w.stream, self.id);
        }
        if self.closed {
            return;
        }
        self.log_closed(None, "dropped");
        if let Some(s) = self.session.take() {
            let app = self.app.clone();
            let (conn, members) = (self.id, std::mem::take(&mut self.members));
            // The reconnect window starts now, and so do the members' graces. The session is
            // let go once its acks are written, as `close` does (a resume waits for that).
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    app.flush_acks(Some(&s.id)).await;
                    app.release_session(&s.id, conn);
                    app.touch(&s.id, true).await;
                    for stream in members {
                        app.release(conn, &s.id, &stream).await;
                    }
                });
            } else {
                self.app.release_session(&s.id, self.id);
            }
        }
    }
}

fn refresh_every(app: &App) -> Duration {
    Duration::from_secs((app.cfg.reconnect_window_sec / 3).max(1))
}
