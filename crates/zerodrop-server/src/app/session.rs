//! Sessions: every decision about a session and its streams, made once for every transport.
//!
//! [`App::place`] is the one function that decides where a stream starts for a client given a
//! position (the session's stored ack, a client `lastAck`, `Last-Event-ID`, `after`, or the
//! head, with or without an epoch). Its answer is a [`Placement`]: a start, or a [`Hole`] that
//! is already counted in `dropped_messages` and recorded in the session. WebSocket (`resume`,
//! `subscribe`), SSE, `POST /v1/sessions`, the HTTP reconnect and the HTTP checkpoint call it
//! (through the entry points below) and only encode its answer: an `error` frame, an
//! `event: reset` block, a JSON entry. docs/protocol.md ("Position answers") lists the answer
//! to each case.
//!
//! This module also owns every write to a session: creating it (with the subject's cap),
//! adding, re-basing and removing its streams, checkpoints, the record of counted drops.
//! Transports must not write sessions themselves (the store is private to `app`), decide a
//! position rule, or count drops.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use zerodrop_core::checkpoint::AckUpdate;
use zerodrop_core::window::{WindowError, newly_dropped, replay_window};
use zerodrop_core::{Epoch, ErrorCode, Grants, Seq, SessionId, StreamId};
use zerodrop_store::{SessionCap, SessionRecord, SessionStream, StoreError};

use super::App;
use super::revocation::Bearer;
use crate::auth::ConnectClaims;
use crate::error::ApiError;
use crate::live::{DropMark, Fault};
use crate::metrics::Transport;

/// One stream of a session being opened, and where it starts.
#[derive(Clone, Debug)]
pub struct OpenAt {
    pub stream: StreamId,
    /// The last seq the client already holds (from a snapshot); `None`: the stream's head.
    pub after: Option<Seq>,
    /// The epoch that position belongs to, when the client knows it.
    pub epoch: Option<Epoch>,
}

/// WebSocket sessions opened with a connect token that hold no stream yet. Such a session
/// holds nothing a crash could lose, so it is not written when it opens (its `welcome` waits
/// for no durable write): it is written with its first stream, in the one write that adds it
/// (one durable write per connection), or, when none comes, as soon as anything else needs it
/// in the store: its connection's end (which starts its reconnect window), a token refresh, a
/// drain's or an order's `reconnect`, a resume here that takes it over, a `publish` with an
/// `id` (its idempotency key belongs to the session). A session lost unwritten (a crash) is
/// `SESSION_NOT_FOUND` on resume: start a new one, nothing was in it.
#[derive(Default)]
pub(crate) struct Unwritten(Mutex<HashMap<SessionId, Arc<UnwrittenSession>>>);

struct UnwrittenSession {
    rec: SessionRecord,
    /// Held while it is written; `true` once it is.
    written: tokio::sync::Mutex<bool>,
}

impl Unwritten {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SessionId, Arc<UnwrittenSession>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What [`App::write_unwritten`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Pending {
    /// No unwritten session of that id on this instance: it is in the store, or nowhere.
    NotHere,
    /// It was unwritten and this call wrote it (with the stream it was given).
    WrittenNow,
    /// Another call wrote it meanwhile (without the stream this one was given).
    WrittenMeanwhile,
}

/// Where a stream starts for a client.
#[derive(Clone, Debug)]
pub struct StreamStart {
    pub epoch: Epoch,
    /// Deliver events after this seq.
    pub after: Seq,
    pub head: Seq,
}

/// When a resume's `lastAck` checkpoint is written (see [`App::stream_start`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AckWrite {
    Wait,
    Background,
}

/// What the client says about where it is on a stream.
#[derive(Clone, Debug)]
pub enum Position {
    /// Nothing: a resume starts after the session's stored ack, anything else at the head.
    Unstated,
    /// The last seq the client holds; the epoch it belongs to when the client says so. On a
    /// resume a position without an epoch belongs to the session's epoch for that stream; on
    /// a new subscription, to the stream's current epoch.
    After { seq: Seq, epoch: Option<Epoch> },
    /// The head, of the epoch the client knows (a `subscribe` with an `epoch` and no `after`):
    /// another epoch is a hole like any other.
    Head { epoch: Epoch },
}

/// Who asks, which decides what authorizes the stream and whose record a hole goes into.
#[derive(Clone, Copy)]
pub enum Asker<'a> {
    /// A live connection's session resuming one of its streams (the stream must be in it). A
    /// hole takes the stream out of the session, like any stream-level error on a socket
    /// (SPEC §4): the client subscribes again once it has resynced.
    Connection(&'a SessionRecord),
    /// An HTTP request on behalf of a session (reconnect, checkpoint; the stream must be in
    /// it). A hole leaves the stream in the session, so that a retried request gets the same
    /// answer (SPEC §3: the same reconnect twice gives the same window); the drops it counted
    /// are recorded in the session, so that they are counted once.
    Request(&'a SessionRecord),
    /// A new subscription under a token's grants (WebSocket `subscribe`, `POST /v1/sessions`,
    /// SSE with a connect token).
    Grants(&'a Grants),
}

impl<'a> Asker<'a> {
    /// The session asking, if any.
    fn session(self) -> Option<&'a SessionRecord> {
        match self {
            Asker::Connection(s) | Asker::Request(s) => Some(s),
            Asker::Grants(_) => None,
        }
    }
}

/// A position that cannot be served: the client's events after it are not all in the log.
#[derive(Clone, Debug)]
pub struct Hole {
    pub stream: StreamId,
    /// `REPLAY_WINDOW_TRIMMED`, `EPOCH_CHANGED` or `ACK_BEYOND_HEAD`.
    pub code: ErrorCode,
    /// The stream's current epoch.
    pub epoch: Epoch,
    /// The oldest event still retained (`headSeq + 1` when none is).
    pub first_available: Seq,
    pub head: Seq,
    /// The position asked for.
    pub after: Seq,
}

impl Hole {
    pub(crate) fn new(
        stream: &StreamId,
        after: Seq,
        e: &WindowError,
        info: &zerodrop_store::StreamInfo,
    ) -> Hole {
        let code = match e {
            WindowError::Trimmed { .. } => ErrorCode::ReplayWindowTrimmed,
            WindowError::EpochChanged { .. } => ErrorCode::EpochChanged,
            WindowError::BeyondHead { .. } => ErrorCode::AckBeyondHead,
        };
        Hole {
            stream: stream.clone(),
            code,
            epoch: info.epoch.clone(),
            first_available: info.first_seq,
            head: info.head,
            after,
        }
    }

    /// The one error every transport sends for this hole: the code, `stream`, and the facts
    /// a client resyncs from (`epoch`, `firstAvailableSeq`, `headSeq`).
    pub fn error(&self) -> ApiError {
        let message = match self.code {
            ErrorCode::ReplayWindowTrimmed => {
                "events after your position were trimmed; resync from a snapshot, then read on \
                 from firstAvailableSeq"
                    .to_string()
            }
            ErrorCode::EpochChanged => "the stream's log was recreated; resync".to_string(),
            _ => format!(
                "position {} is beyond the stream head {}",
                self.after, self.head
            ),
        };
        ApiError::new(self.code, message)
            .with("stream", self.stream.as_str())
            .with("epoch", self.epoch.as_str())
            .with("firstAvailableSeq", self.first_available.0)
            .with("headSeq", self.head.0)
    }

    /// Where a transport that goes on after a hole (SSE) restarts: before the oldest retained
    /// event, in the current epoch.
    pub fn restart_after(&self) -> Seq {
        Seq(self.first_available.0.saturating_sub(1))
    }
}

/// The answer to a position: a start, or a hole (already counted and recorded).
#[derive(Clone, Debug)]
pub enum Placement {
    Start(StreamStart),
    Hole(Hole),
}

impl Placement {
    /// For callers that answer a hole like any other refusal (an `error` frame or entry).
    pub fn into_result(self) -> Result<StreamStart, ApiError> {
        match self {
            Placement::Start(s) => Ok(s),
            Placement::Hole(h) => Err(h.error()),
        }
    }
}

/// The refusal of a session past its subject's cap (`--max-sessions-per-subject`).
pub fn is_session_cap(e: &ApiError) -> bool {
    e.code == ErrorCode::RateLimited
        && e.extra.get("limit").and_then(|v| v.as_str()) == Some("sessions_per_subject")
}

fn not_in_session(stream: &StreamId) -> ApiError {
    ApiError::forbidden("the stream is not part of this session").with("stream", stream.as_str())
}

fn not_granted(stream: &StreamId) -> ApiError {
    ApiError::forbidden(format!("stream {stream} is not allowed by the token"))
        .with("stream", stream.as_str())
}

impl App {
    /// Where `stream` starts for `asker` at `position`: the one position rule (see the
    /// module doc and docs/protocol.md, "Position answers").
    ///
    /// - The stream must be in the session (`FORBIDDEN` otherwise), or granted by the token.
    /// - No position: a session resumes after its stored ack (or a higher one still in this
    ///   instance's ack buffer), in the epoch it holds; a new subscription starts at the head.
    /// - A position is checked by the replay window rule: another epoch is `EPOCH_CHANGED`,
    ///   past the head `ACK_BEYOND_HEAD`, a trimmed next event `REPLAY_WINDOW_TRIMMED`.
    /// - A hole counts its lost events in `dropped_messages`, once per session and event. On a
    ///   live connection ([`Asker::Connection`]) a trimmed or other-epoch one takes the stream
    ///   out of the session: the client resyncs and subscribes again from the position it
    ///   then holds (the SDKs already treat a stream error so). An HTTP request
    ///   ([`Asker::Request`]) leaves it there, so a retry gets the same answer. A position
    ///   past the head leaves the session as it was.
    /// - On a resume, a client position above the stored ack is applied as a checkpoint,
    ///   when `ack_write` says (awaited, or in the background); a hole writes none.
    pub async fn place(
        &self,
        stream: &StreamId,
        asker: Asker<'_>,
        position: Position,
        ack_write: Option<AckWrite>,
    ) -> Result<Placement, ApiError> {
        let held = match asker {
            Asker::Connection(s) | Asker::Request(s) => Some(
                s.streams
                    .get(stream)
                    .ok_or_else(|| not_in_session(stream))?,
            ),
            Asker::Grants(g) => {
                if !g.may_subscribe(stream.as_str()) {
                    return Err(not_granted(stream));
                }
                if let Some(start) = self.at_live_head(stream, &position) {
                    return Ok(Placement::Start(start));
                }
                None
            }
        };
        let info = self.store.stream_info(stream).await?;
        let stored = match (asker.session(), held) {
            (Some(s), Some(ss)) => Some(
                ss.ack
                    .max(self.acks.pending(&s.id, stream).unwrap_or(Seq(0))),
            ),
            _ => None,
        };
        let (after, epoch) = match (position, held) {
            (Position::After { seq, epoch }, held) => {
                (seq, epoch.or_else(|| held.map(|ss| ss.epoch.clone())))
            }
            (Position::Head { epoch }, _) => (info.head, Some(epoch)),
            (Position::Unstated, Some(ss)) => (stored.unwrap_or(ss.ack), Some(ss.epoch.clone())),
            (Position::Unstated, None) => {
                return Ok(Placement::Start(StreamStart {
                    epoch: info.epoch,
                    after: info.head,
                    head: info.head,
                }));
            }
        };
        if let Err(e) = replay_window(after, epoch.as_ref(), &info.bounds()) {
            let hole = Hole::new(stream, after, &e, &info);
            self.record_hole(asker, held, &hole).await;
            return Ok(Placement::Hole(hole));
        }
        if let (Some(s), Some(stored), Some(how)) = (asker.session(), stored, ack_write)
            && after > stored
        {
            self.write_ack(&s.id, stream, after, how).await?;
        }
        Ok(Placement::Start(StreamStart {
            epoch: info.epoch,
            after,
            head: info.head,
        }))
    }

    /// A new subscription at the head of a stream whose live feed this instance follows
    /// already (no position, or the head as the feed knows it, in its epoch): it starts there
    /// with no store read, as every subscriber after the first of a busy stream does. The
    /// feed's head may lag the store's by the events being pushed right now; they are then
    /// delivered as new, which they are to a subscriber that joins now. Anything else (a
    /// position below the head, which the replay window must check) asks the store.
    fn at_live_head(&self, stream: &StreamId, position: &Position) -> Option<StreamStart> {
        let (epoch, head) = self.hub.head(stream)?;
        let at_head = match position {
            Position::Unstated => true,
            Position::After { seq, epoch: e } => {
                *seq == head && e.as_ref().is_none_or(|e| *e == epoch)
            }
            Position::Head { epoch: e } => *e == epoch,
        };
        at_head.then_some(StreamStart {
            epoch,
            after: head,
            head,
        })
    }

    /// Counts a hole's lost events (trimmed ones: an epoch change or a position past the head
    /// loses nothing the log still had), once per session and event. A live connection's
    /// stream leaves its session with the hole (unless the position was only past the head);
    /// an HTTP request's stays, with what was counted recorded.
    async fn record_hole(&self, asker: Asker<'_>, held: Option<&SessionStream>, hole: &Hole) {
        let mut counted_now = false;
        if hole.code == ErrorCode::ReplayWindowTrimmed {
            let counted = held.map_or(Seq(0), |ss| ss.dropped_through);
            let n = newly_dropped(hole.after, hole.first_available, counted);
            if n > 0 {
                self.metrics.dropped(n);
                counted_now = true;
            }
        }
        match asker {
            // A position past the head loses nothing: it is the client's mistake (or a log
            // that went back without a new epoch, which the store prevents), and the stream
            // stays.
            Asker::Connection(s) if hole.code != ErrorCode::AckBeyondHead => {
                // The stream leaves the session with its hole; so does the record of what was
                // counted, which a stream added again starts from its own new position.
                if let Err(e) = self.store.remove_session_stream(&s.id, &hole.stream).await {
                    tracing::debug!(error = %e, "could not take a stream with a hole out of its session");
                }
            }
            Asker::Request(s) if counted_now => {
                let through = hole.restart_after();
                if let Err(e) = self.store.mark_dropped(&s.id, &hole.stream, through).await {
                    tracing::debug!(error = %e, "could not record counted drops");
                }
            }
            _ => {}
        }
    }

    async fn write_ack(
        &self,
        sid: &SessionId,
        stream: &StreamId,
        after: Seq,
        how: AckWrite,
    ) -> Result<Option<AckUpdate>, ApiError> {
        match how {
            AckWrite::Wait => match self.store.checkpoint(sid, stream, after).await {
                Ok(u) => {
                    self.metrics.checkpoint(u.is_applied());
                    Ok(Some(u))
                }
                Err(e) => Err(ApiError::from(e).with("stream", stream.as_str())),
            },
            AckWrite::Background => {
                self.metrics.checkpoint(true);
                let (store, sid, stream) = (self.store.clone(), sid.clone(), stream.clone());
                tokio::spawn(async move {
                    if let Err(e) = store.checkpoint(&sid, &stream, after).await {
                        tracing::debug!(error = %e, "could not store a resume's lastAck");
                    }
                });
                Ok(None)
            }
        }
    }

    /// The resume rule for one stream of a session (WebSocket `resume`, HTTP reconnect):
    /// [`App::place`] with the client's `lastAck` if it gives one (it knows best what it
    /// holds), else the stored ack; a hole is answered as an error.
    ///
    /// `ack_write` says when a client's higher `lastAck` is stored: an HTTP reconnect waits
    /// for it (its answer promises the checkpoint); a socket resuming does not (the write runs
    /// in the background, so a resume storm does not queue behind a thousand durable writes).
    pub async fn stream_start(
        &self,
        asker: Asker<'_>,
        stream: &StreamId,
        client_ack: Option<Seq>,
        ack_write: AckWrite,
    ) -> Result<StreamStart, ApiError> {
        let position = match client_ack {
            Some(seq) => Position::After { seq, epoch: None },
            None => Position::Unstated,
        };
        self.place(stream, asker, position, Some(ack_write))
            .await?
            .into_result()
    }

    /// `POST /v1/sessions/{id}/checkpoint`: the client holds `stream` through `seq`. The
    /// position is placed like any other (a hole is the same answer as on a resume); then the
    /// ack is applied under the checkpoint rule, atomically with the head it is checked
    /// against. Acks applied on this instance but not yet written go first, so the rule sees
    /// them.
    pub async fn checkpoint(
        &self,
        session: &SessionRecord,
        stream: &StreamId,
        seq: Seq,
    ) -> Result<AckUpdate, ApiError> {
        self.flush_acks(Some(&session.id)).await;
        let position = Position::After { seq, epoch: None };
        self.place(stream, Asker::Request(session), position, None)
            .await?
            .into_result()?;
        let update = self
            .store
            .checkpoint(&session.id, stream, seq)
            .await
            .map_err(|e| ApiError::from(e).with("stream", stream.as_str()))?;
        self.metrics.checkpoint(update.is_applied());
        Ok(update)
    }

    /// A page of `stream` after `after` (`GET …/events`, and a reconnect's window): the same
    /// position rule, with the same answers, except that a read is no session, so a hole is
    /// not counted in `dropped_messages`. A position within the head is a page, empty at the
    /// head.
    pub async fn read_from(
        &self,
        stream: &StreamId,
        after: Seq,
        epoch: Option<&Epoch>,
        limit: usize,
    ) -> Result<zerodrop_store::ReadResult, ApiError> {
        let res = self.store.read(stream, after, limit).await?;
        if let Err(e) = replay_window(after, epoch, &res.info.bounds()) {
            return Err(Hole::new(stream, after, &e, &res.info).error());
        }
        Ok(res)
    }

    /// WebSocket `subscribe`: adds `stream` to the session at `position` (the head when none),
    /// or moves it there. A session the store lost answers `SESSION_NOT_FOUND` (no `stream`:
    /// it is the session's error, not the stream's).
    pub async fn subscribe_stream(
        &self,
        sid: &SessionId,
        grants: &Grants,
        stream: &StreamId,
        position: Position,
    ) -> Result<StreamStart, ApiError> {
        let start = self
            .place(stream, Asker::Grants(grants), position, None)
            .await?
            .into_result()?;
        let state = SessionStream {
            epoch: start.epoch.clone(),
            ack: start.after,
            dropped_through: Seq(0),
        };
        match self
            .write_unwritten(sid, Some((stream, state.clone())), false)
            .await
        {
            Ok(Pending::WrittenNow) => return Ok(start),
            Ok(Pending::NotHere | Pending::WrittenMeanwhile) => {}
            // The subject's session cap: the session's error, as at a connect.
            Err(e) if is_session_cap(&e) => return Err(e),
            Err(e) => return Err(e.with("stream", stream.as_str())),
        }
        match self.store.put_session_stream(sid, stream, state).await {
            Ok(()) => Ok(start),
            Err(StoreError::SessionNotFound) => Err(ApiError::from(StoreError::SessionNotFound)),
            Err(e) => Err(ApiError::from(e).with("stream", stream.as_str())),
        }
    }

    /// WebSocket `unsubscribe`: the stream leaves the session.
    pub async fn unsubscribe_stream(
        &self,
        sid: &SessionId,
        stream: &StreamId,
    ) -> Result<(), ApiError> {
        self.store
            .remove_session_stream(sid, stream)
            .await
            .map_err(|e| ApiError::from(e).with("stream", stream.as_str()))
    }

    /// A hole found under a live connection's cursor (a trim overtook it, or the log changed
    /// epoch), answered like a hole found by [`App::place`]: the same code and facts
    /// ([`Hole::error`]). The hub has counted the trimmed events it saw first (drop marks);
    /// what the pull counted on top is counted here. The stream leaves the session, as after
    /// any hole on a live connection, unless the connection `goes_on` from the oldest retained
    /// event (SSE): then the session holds it from there. A failed read (of the log, or of the
    /// stream's bounds for the hole's facts) is not a hole: the caller looks again shortly.
    pub async fn hole_under_cursor(
        &self,
        sid: Option<&SessionId>,
        stream: &StreamId,
        cursor: Seq,
        fault: Fault,
        goes_on: bool,
    ) -> Result<Hole, StoreError> {
        let code = match fault {
            Fault::Store(e) => return Err(e),
            Fault::Trimmed { newly_dropped, .. } => {
                self.metrics.dropped(newly_dropped);
                ErrorCode::ReplayWindowTrimmed
            }
            Fault::EpochChanged { .. } => ErrorCode::EpochChanged,
        };
        let info = self.store.stream_info(stream).await?;
        let hole = Hole {
            stream: stream.clone(),
            code,
            epoch: info.epoch,
            first_available: info.first_seq,
            head: info.head,
            after: cursor,
        };
        if let Some(sid) = sid {
            if goes_on {
                self.restart_in_session(sid, &hole).await;
            } else if let Err(e) = self.store.remove_session_stream(sid, stream).await {
                tracing::debug!(error = %e, "could not remove a stream from a session");
            }
        }
        Ok(hole)
    }

    /// SSE goes on after a hole from the oldest retained event: for a session, that is the
    /// stream subscribed again at that position, so a reconnect with the same `?resume=`
    /// finds it there.
    pub async fn restart_in_session(&self, sid: &SessionId, hole: &Hole) {
        let state = SessionStream {
            epoch: hole.epoch.clone(),
            ack: hole.restart_after(),
            dropped_through: hole.restart_after(),
        };
        if let Err(e) = self
            .store
            .put_session_stream(sid, &hole.stream, state)
            .await
        {
            tracing::debug!(error = %e, "could not restart a session's stream after a hole");
        }
    }

    /// Remembers drops the hub counted under a connected session, so that a later resume
    /// does not count them again.
    pub async fn record_drop_mark(&self, m: &DropMark) {
        if let Err(e) = self
            .store
            .mark_dropped(&m.session, &m.stream, m.through)
            .await
        {
            tracing::debug!(error = %e, "could not record counted drops");
        }
    }

    /// Creates a session for `sub` holding `streams`. Each starts at its current head, or
    /// right after the position the client says it already holds (a snapshot it loaded at
    /// seq N, optionally of a known epoch), placed by [`App::place`]: the session never starts
    /// on a hole (a hole refuses the whole request). Returns the record and each stream's head
    /// at opening. The subject's live sessions are capped (`--max-sessions-per-subject`): the
    /// store counts them and creates the session in one step, for every instance sharing it.
    pub async fn open_session(
        &self,
        sub: &str,
        grants: Grants,
        streams: &[OpenAt],
    ) -> Result<(SessionRecord, Vec<Seq>), ApiError> {
        if streams.len() > self.cfg.max_streams_per_session {
            return Err(ApiError::invalid(format!(
                "a session holds at most {} streams",
                self.cfg.max_streams_per_session
            )));
        }
        let mut rec = self.new_session(sub, grants);
        let mut heads = Vec::with_capacity(streams.len());
        for at in streams {
            let position = match at.after {
                None => Position::Unstated,
                Some(seq) => Position::After {
                    seq,
                    epoch: at.epoch.clone(),
                },
            };
            let start = self
                .place(&at.stream, Asker::Grants(&rec.grants), position, None)
                .await?
                .into_result()?;
            heads.push(start.head);
            rec.streams.insert(
                at.stream.clone(),
                SessionStream {
                    epoch: start.epoch,
                    ack: start.after,
                    dropped_through: Seq(0),
                },
            );
        }
        self.create_within_cap(rec.clone()).await?;
        Ok((rec, heads))
    }

    /// A new session record for `sub` under `grants`, holding no stream, its reconnect window
    /// starting now.
    fn new_session(&self, sub: &str, grants: Grants) -> SessionRecord {
        SessionRecord {
            id: SessionId::generate(),
            sub: sub.to_string(),
            grants,
            created_at_ms: self.clock().now_ms(),
            expires_at_ms: self.window_end(),
            streams: Default::default(),
        }
    }

    /// Writes a new session, counted against its subject's cap (`--max-sessions-per-subject`)
    /// in the same step; a refusal at the cap is logged.
    async fn create_within_cap(&self, rec: SessionRecord) -> Result<(), StoreError> {
        let cap = SessionCap(self.cfg.max_sessions_per_subject);
        let sub = rec.sub.clone();
        let result = self.store.create_session_within(rec, cap).await;
        if let Err(StoreError::TooManySessions { .. }) = &result {
            tracing::info!(
                sub,
                cap = cap.0,
                "session refused: the subject is at its cap"
            );
        }
        result
    }

    /// A WebSocket session for `sub` under `grants`, holding no stream: not written until it
    /// is needed in the store (see `Unwritten` in this module). The subject's cap is applied
    /// when it is written.
    pub fn open_unwritten(&self, sub: &str, grants: Grants) -> SessionRecord {
        let rec = self.new_session(sub, grants);
        let entry = UnwrittenSession {
            rec: rec.clone(),
            written: tokio::sync::Mutex::new(false),
        };
        self.unwritten
            .lock()
            .insert(rec.id.clone(), Arc::new(entry));
        rec
    }

    /// Writes `sid` if it is an unwritten session of this instance, with `first` in it, its
    /// reconnect window starting now. `ending`: its connection is over, so it leaves the
    /// unwritten set whether or not the write succeeds (a later resume finds it in the store,
    /// or gets `SESSION_NOT_FOUND`); otherwise a failed write leaves it unwritten, unless the
    /// subject's cap refused it.
    pub(crate) async fn write_unwritten(
        &self,
        sid: &SessionId,
        first: Option<(&StreamId, SessionStream)>,
        ending: bool,
    ) -> Result<Pending, ApiError> {
        let Some(entry) = self.unwritten.lock().get(sid).cloned() else {
            return Ok(Pending::NotHere);
        };
        let mut written = entry.written.lock().await;
        if *written {
            return Ok(Pending::WrittenMeanwhile);
        }
        let mut rec = entry.rec.clone();
        rec.expires_at_ms = self.window_end();
        if let Some((stream, state)) = first {
            rec.streams.insert(stream.clone(), state);
        }
        let result = self.create_within_cap(rec).await;
        // Past the cap it is refused for good: its connection closes with that error.
        let refused = matches!(result, Err(StoreError::TooManySessions { .. }));
        if result.is_ok() || ending || refused {
            *written = result.is_ok();
            let mut map = self.unwritten.lock();
            if map.get(sid).is_some_and(|e| Arc::ptr_eq(e, &entry)) {
                map.remove(sid);
            }
        }
        result.map(|()| Pending::WrittenNow).map_err(ApiError::from)
    }

    /// Writes `sid` now if it is an unwritten session of this instance (before something
    /// durable that belongs to it: a publish's idempotency key).
    pub async fn ensure_written(&self, sid: &SessionId) -> Result<(), ApiError> {
        self.write_unwritten(sid, None, false).await.map(|_| ())
    }

    /// Takes over a session with a resume token (and a fresh connect token when the client
    /// brings one: see [`App::session_for`]). Counts a failure (with its code) for
    /// `transport`; the caller counts the success once the connection is really resumed.
    pub async fn resume(
        &self,
        token: &str,
        expected: Option<&SessionId>,
        fresh: Option<&ConnectClaims>,
        transport: Transport,
    ) -> Result<Resumed, ApiError> {
        // A WebSocket or SSE resume is a new connection for the session; an HTTP reconnect
        // only reads what the session would replay and leaves a live connection alone.
        let takeover = transport != Transport::Http;
        let r = self.resume_inner(token, expected, fresh, takeover).await;
        if let Err(e) = &r {
            self.metrics.resume_failed(transport, e.code);
            tracing::info!(transport = transport.as_str(), code = %e.code, "resume failed");
        }
        r
    }

    async fn resume_inner(
        &self,
        token: &str,
        expected: Option<&SessionId>,
        fresh: Option<&ConnectClaims>,
        takeover: bool,
    ) -> Result<Resumed, ApiError> {
        let resumed = self
            .session_checked(token, expected, fresh, takeover)
            .await?;
        // The new window is recorded in the background: a resume storm must not queue a
        // thousand durable writes in front of its replays.
        let store = Arc::clone(&self.store);
        let (sid, until) = (resumed.session.id.clone(), self.window_end());
        tokio::spawn(async move {
            if let Err(e) = store.touch_session(&sid, until).await {
                tracing::debug!(error = %e, "could not extend a session's reconnect window");
            }
        });
        Ok(resumed)
    }

    /// The session a resume token stands for, checked: signature, expiry, existence, owner,
    /// and its authority (SPEC §9): past the maximum session age it is over
    /// (`RECONNECT_WINDOW_EXPIRED`); past its connect token's `exp` plus the grace it needs a
    /// fresh connect token (`TOKEN_EXPIRED` without one). A `fresh` token (already verified)
    /// must be for the session's subject; it becomes the session's authority: its `exp`, and
    /// its grants, which may be narrower (the streams it no longer grants leave the session
    /// and are listed in [`Resumed::ended`]).
    pub async fn session_for(
        &self,
        token: &str,
        expected: Option<&SessionId>,
        fresh: Option<&ConnectClaims>,
    ) -> Result<Resumed, ApiError> {
        self.session_checked(token, expected, fresh, false).await
    }

    /// [`App::session_for`]; for a `takeover` (a resume: a new connection for the session),
    /// once the token is good, a connection here still holding the session is ended first
    /// ([`App::await_release`]), so what it wrote is what the session reads.
    async fn session_checked(
        &self,
        token: &str,
        expected: Option<&SessionId>,
        fresh: Option<&ConnectClaims>,
        takeover: bool,
    ) -> Result<Resumed, ApiError> {
        let claims = self.auth.verify_resume(token, expected)?;
        // A revoked subject's or session's token is refused as such whether or not its session
        // is in the store yet (a session with no stream is written when its connection ends,
        // and a revoked connection's end may still be writing it). The token was minted at or
        // after its session's creation, within the second of its `iat`: a revocation made
        // after that second covers the session too, as the check below would find.
        let minted = Bearer {
            sub: &claims.sub,
            session: Some(&claims.sid),
            issued_ms: claims.iat.saturating_mul(1000).saturating_add(999),
        };
        if let Some(e) = self.revocation_for(minted) {
            return Err(e);
        }
        if takeover {
            self.await_release(&claims.sid).await;
        }
        let mut found = self.store.load_session(&claims.sid).await?;
        if found.is_none()
            && self.write_unwritten(&claims.sid, None, false).await? != Pending::NotHere
        {
            // A session of a connection here that held no stream yet: written now.
            found = self.store.load_session(&claims.sid).await?;
        }
        let mut session = found.ok_or_else(|| {
            ApiError::new(
                ErrorCode::SessionNotFound,
                "no such session (the store may have restarted empty); start a new session",
            )
        })?;
        if session.sub != claims.sub {
            return Err(ApiError::new(
                ErrorCode::InvalidResumeToken,
                "the resume token does not match the session",
            ));
        }
        let bearer = Bearer {
            sub: &session.sub,
            session: Some(&session.id),
            issued_ms: session.created_at_ms,
        };
        if let Some(e) = self.revocation_for(bearer) {
            return Err(e);
        }
        if session.expires_at_ms <= self.clock().now_ms() {
            return Err(ApiError::new(
                ErrorCode::ReconnectWindowExpired,
                "the session's reconnect window has passed; start a new session and resync",
            ));
        }
        let mut authority = Authority {
            exp: claims.aexp,
            born_ms: session.created_at_ms,
        };
        let mut ended = Vec::new();
        if let Some(fresh) = fresh {
            if fresh.sub != session.sub {
                return Err(ApiError::forbidden(
                    "the connect token is for another subject than the session",
                ));
            }
            authority.exp = Some(fresh.exp);
            // The age bound stands whatever the token says; checked before anything changes.
            self.check_authority(authority)?;
            ended = self.narrow(&mut session, fresh.grants()).await?;
        } else {
            self.check_authority(authority)?;
        }
        Ok(Resumed {
            session,
            authority,
            ended,
        })
    }

    /// The session now holds its authority from a fresh connect token with `grants`: they are
    /// stored (a later resume without a token has no more than them), and each stream they no
    /// longer grant leaves the session. Answers those streams.
    pub async fn narrow(
        &self,
        session: &mut SessionRecord,
        grants: Grants,
    ) -> Result<Vec<StreamId>, ApiError> {
        if session.grants == grants {
            return Ok(Vec::new());
        }
        self.regrant(&session.id, &grants).await?;
        let ended: Vec<StreamId> = session
            .streams
            .keys()
            .filter(|s| !grants.may_subscribe(s.as_str()))
            .cloned()
            .collect();
        for stream in &ended {
            self.store
                .remove_session_stream(&session.id, stream)
                .await
                .map_err(|e| ApiError::from(e).with("stream", stream.as_str()))?;
            session.streams.remove(stream);
        }
        session.grants = grants;
        Ok(ended)
    }

    /// Stores a session's grants from a fresher connect token.
    pub async fn regrant(&self, sid: &SessionId, grants: &Grants) -> Result<(), ApiError> {
        self.ensure_written(sid).await?;
        Ok(self.store.set_session_grants(sid, grants).await?)
    }

    /// When a session's access ends (ms on the server's clock, [`App::clock`]) and the error it
    /// ends with: its connect token's `exp` plus the grace (`TOKEN_EXPIRED`, a wall-clock
    /// instant placed with `wall_deadline`) or its maximum age (`RECONNECT_WINDOW_EXPIRED`),
    /// whichever comes first.
    pub fn authority_end(&self, a: Authority) -> (u64, ErrorCode) {
        let aged = a
            .born_ms
            .saturating_add(self.cfg.max_session_age_sec.saturating_mul(1000));
        match a.exp {
            Some(exp) => {
                let lapsed = self.clock().wall_deadline(
                    exp.saturating_add(self.cfg.token_grace_sec)
                        .saturating_mul(1000),
                );
                if lapsed < aged {
                    (lapsed, ErrorCode::TokenExpired)
                } else {
                    (aged, ErrorCode::ReconnectWindowExpired)
                }
            }
            None => (aged, ErrorCode::ReconnectWindowExpired),
        }
    }

    /// `Ok` while the session's authority stands; else the error it ended with.
    pub fn check_authority(&self, a: Authority) -> Result<(), ApiError> {
        let (end, code) = self.authority_end(a);
        if end > self.clock().now_ms() {
            return Ok(());
        }
        Err(authority_ended(code))
    }

    /// A resume token for a session whose authority still stands (`None` once it has ended:
    /// no token is minted past it). It expires with the reconnect window, or at the session's
    /// maximum age if that comes first, and carries the authority's `exp` (`aexp`).
    pub fn mint_token(&self, sid: &SessionId, sub: &str, a: Authority) -> Option<String> {
        self.check_authority(a).ok()?;
        let now = self.clock().now_ms() / 1000;
        let aged = (a.born_ms / 1000).saturating_add(self.cfg.max_session_age_sec);
        let exp = (now + self.cfg.reconnect_window_sec).min(aged);
        Some(self.auth.mint_resume(sid, sub, exp, a.exp))
    }
}

/// The error a session's access ends with (see [`App::authority_end`]).
pub fn authority_ended(code: ErrorCode) -> ApiError {
    match code {
        ErrorCode::TokenExpired => ApiError::new(
            ErrorCode::TokenExpired,
            "the session's connect token expired; resume with a fresh one (resume {resumeToken, \
             token}) or connect again with it",
        ),
        _ => ApiError::new(
            ErrorCode::ReconnectWindowExpired,
            "the session reached its maximum age (--max-session-age-sec); start a new session \
             and resync",
        ),
    }
}

/// What a session's access stands on (SPEC §9).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Authority {
    /// The `exp` (Unix seconds) of the newest connect token presented for the session;
    /// `None`: it was opened with the api key (or its resume token predates the field), and
    /// only its age bounds it.
    pub exp: Option<u64>,
    /// When the session was created (Unix ms): the maximum session age counts from it.
    pub born_ms: u64,
}

/// A session taken over with a resume token.
#[derive(Debug)]
pub struct Resumed {
    pub session: SessionRecord,
    pub authority: Authority,
    /// Streams a fresh connect token no longer grants: they left the session, and the client
    /// is told each with a stream-level `FORBIDDEN`.
    pub ended: Vec<StreamId>,
}

/// The stream-level `FORBIDDEN` for a stream a fresher token no longer grants.
pub fn no_longer_granted(stream: &StreamId) -> ApiError {
    ApiError::forbidden(format!(
        "stream {stream} is not allowed by the refreshed token"
    ))
    .with("stream", stream.as_str())
}
