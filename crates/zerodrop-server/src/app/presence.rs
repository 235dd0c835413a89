//! Presence (SPEC §10): which sessions are members of which streams, decided once for every
//! transport.
//!
//! A session is a member of a stream with presence (`--presence` patterns) while one of its
//! connections is subscribed to it. The connection core asks this module to [`App::join`]
//! when it subscribes (at `subscribe`, and for each stream of a resumed session), to
//! [`App::release`] when the connection ends or loses the stream to a hole (the member stays
//! for `--presence-leave-grace-sec`, so a reconnect, a resume elsewhere or a drain hand-off
//! finds it still there and emits nothing), and to [`App::part`] when the client unsubscribes
//! (it leaves at once). Every member a connection of this instance holds is renewed every third
//! of `--presence-heartbeat-sec` ([`App::presence_beat`]); one whose instance crashed stops
//! being renewed and leaves when the sweep ([`App::presence_sweep`], on every instance; the
//! store makes each leave happen once) finds its lease over.
//!
//! Where a client's presence frames start is decided here too ([`App::place_presence`]): after
//! the position it names in the presence log's epoch, or at the log's head; a position in
//! another epoch or trimmed away is a typed error (`EPOCH_CHANGED`, `REPLAY_WINDOW_TRIMMED`,
//! with `presence: true`), answered by a fresh snapshot.
//!
//! Must not: know a transport's encoding, or hold a lock across a store call.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use zerodrop_core::{Epoch, ErrorCode, SessionId, StreamId};
use zerodrop_store::{
    Claimed, Member, PresenceClaim, PresenceEntry, PresenceLog, PresencePage, PresenceStats,
};

use super::{App, lock};
use crate::error::ApiError;

/// The joins and leaves of the last minutes, and the members this instance holds.
#[derive(Default)]
pub struct Presence {
    /// Per (stream, session): the connection of this instance that holds the member, and the
    /// member as it claimed it.
    held: Mutex<HashMap<(StreamId, SessionId), (u64, Member)>>,
    /// Per minute (Unix minutes): joins and leaves this instance appended.
    minutes: Mutex<VecDeque<(u64, u64, u64)>>,
    /// What the store said last.
    stats: Mutex<PresenceStats>,
}

/// Where a connection's presence frames start.
#[derive(Clone, Debug)]
pub struct PresenceStart {
    pub epoch: Epoch,
    /// Frames follow with seqs above this.
    pub after: u64,
}

/// Renewals in flight at once in a beat.
const BEAT_CONCURRENCY: usize = 32;

/// Minutes of joins and leaves kept for the admin snapshot.
const MINUTES_KEPT: usize = 15;

impl Presence {
    fn tally(&self, joins: u64, leaves: u64) {
        if joins + leaves == 0 {
            return;
        }
        let minute = zerodrop_core::now_ms() / 60_000;
        let mut m = lock(&self.minutes);
        match m.back_mut() {
            Some(last) if last.0 == minute => {
                last.1 += joins;
                last.2 += leaves;
            }
            _ => m.push_back((minute, joins, leaves)),
        }
        while m.len() > MINUTES_KEPT {
            m.pop_front();
        }
    }
}

/// A position `after` in `epoch` (when the client named one) against the log read: another
/// epoch, a position beyond the head, or one trimmed away is a typed error.
pub fn check_presence_position(
    stream: &StreamId,
    after: u64,
    epoch: Option<&Epoch>,
    log: &PresenceLog,
) -> Result<(), ApiError> {
    if let Some(e) = epoch
        && *e != log.epoch
    {
        return Err(presence_error(
            ErrorCode::EpochChanged,
            format!("the presence log of {stream} started again; take a fresh snapshot"),
            stream,
        )
        .with("epoch", log.epoch.as_str()));
    }
    if after > log.head {
        return Err(presence_error(
            ErrorCode::InvalidRequest,
            format!(
                "presence position {after} is beyond the presence head {}",
                log.head
            ),
            stream,
        )
        .with("headSeq", log.head));
    }
    if after + 1 < log.first {
        return Err(presence_error(
            ErrorCode::ReplayWindowTrimmed,
            format!("presence entries after {after} were trimmed; take a fresh snapshot"),
            stream,
        )
        .with("epoch", log.epoch.as_str())
        .with("firstAvailableSeq", log.first));
    }
    Ok(())
}

fn presence_error(code: ErrorCode, message: String, stream: &StreamId) -> ApiError {
    ApiError::new(code, message)
        .with("stream", stream.as_str())
        .with("presence", true)
}

impl App {
    /// Whether `stream` has presence.
    pub fn presence_on(&self, stream: &StreamId) -> bool {
        self.cfg.policy(stream.as_str()).presence
    }

    /// The stream's presence, or a typed refusal for a stream without it.
    fn presence_of(&self, stream: &StreamId) -> Result<(), ApiError> {
        if self.presence_on(stream) {
            return Ok(());
        }
        Err(ApiError::new(
            ErrorCode::NotFound,
            format!("stream {stream} has no presence (see --presence)"),
        )
        .with("stream", stream.as_str()))
    }

    fn heartbeat_ms(&self) -> u64 {
        self.cfg.presence.heartbeat_sec.saturating_mul(1000)
    }

    /// Connection `conn` holds session `sid` (of `sub`, with `info`) on `stream`: the session
    /// is a member from now on (a new member's `join` is appended; one still in its grace just
    /// goes on). `OVER_CAPACITY` (stream-level) when the stream is full. A store that does not
    /// answer refuses nothing: the next beat joins.
    pub async fn join(
        &self,
        conn: u64,
        sid: &SessionId,
        sub: &str,
        info: Option<serde_json::Value>,
        stream: &StreamId,
    ) -> Result<(), ApiError> {
        if !self.presence_on(stream) {
            return Ok(());
        }
        let member = Member {
            sub: sub.to_string(),
            session_id: sid.clone(),
            info,
            since: 0,
        };
        let claim = PresenceClaim {
            stream: stream.clone(),
            member: member.clone(),
            holder: self.holder_name(conn),
            take: true,
            lease_ms: self.heartbeat_ms(),
        };
        let max = self.cfg.presence.max_members;
        match self.store.presence().presence_claim(claim, max).await {
            Ok(Claimed::Full { max }) => {
                return Err(presence_error(
                    ErrorCode::OverCapacity,
                    format!("stream {stream} has {max} presence members already"),
                    stream,
                )
                .with("limit", max));
            }
            Ok(Claimed::Joined(_)) => self.counted(1, 0),
            Ok(Claimed::Renewed) => {}
            Err(e) => {
                tracing::debug!(error = %e, stream = %stream, "presence join not stored yet; the next beat joins");
            }
        }
        lock(&self.presence.held).insert((stream.clone(), sid.clone()), (conn, member));
        Ok(())
    }

    /// Connection `conn` no longer holds `sid` on `stream` (it ended, or lost the stream to a
    /// hole): the member leaves after the grace unless a connection claims it again.
    pub async fn release(&self, conn: u64, sid: &SessionId, stream: &StreamId) {
        if !self.forget(conn, sid, stream) {
            return;
        }
        let grace = self.cfg.presence.leave_grace_sec.saturating_mul(1000);
        if let Err(e) = self
            .store
            .presence()
            .presence_release(stream, sid, &self.holder_name(conn), grace)
            .await
        {
            // Its heartbeat lease ends it anyway.
            tracing::debug!(error = %e, stream = %stream, "presence release not stored");
        }
    }

    /// The session left `stream` (unsubscribed, no longer granted): the member leaves now.
    pub async fn part(&self, conn: u64, sid: &SessionId, stream: &StreamId) {
        if !self.forget(conn, sid, stream) {
            return;
        }
        match self.store.presence().presence_leave(stream, sid).await {
            Ok(Some(_)) => self.counted(0, 1),
            Ok(None) => {}
            Err(e) => {
                tracing::debug!(error = %e, stream = %stream, "presence leave not stored; the lease ends it")
            }
        }
    }

    /// Takes the member out of this instance's beats if `conn` holds it; `false` otherwise.
    fn forget(&self, conn: u64, sid: &SessionId, stream: &StreamId) -> bool {
        let mut held = lock(&self.presence.held);
        let key = (stream.clone(), sid.clone());
        match held.get(&key) {
            Some((c, _)) if *c == conn => {
                held.remove(&key);
                true
            }
            _ => false,
        }
    }

    fn counted(&self, joins: u64, leaves: u64) {
        self.metrics.presence_changes(joins, leaves);
        self.presence.tally(joins, leaves);
    }

    /// Renews every member this instance's connections hold (joining again one whose lease
    /// ran out meanwhile, e.g. while the store was away).
    pub async fn presence_beat(&self) {
        use futures_util::StreamExt;
        let held: Vec<((StreamId, SessionId), (u64, Member))> = lock(&self.presence.held)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let max = self.cfg.presence.max_members;
        let claims = held
            .into_iter()
            .map(|((stream, _), (conn, member))| PresenceClaim {
                stream,
                member,
                holder: self.holder_name(conn),
                take: false,
                lease_ms: self.heartbeat_ms(),
            });
        // A few at a time: thousands of members renew within a beat without one round trip
        // after another.
        let mut renewals = futures_util::stream::iter(claims)
            .map(|c| self.store.presence().presence_claim(c, max))
            .buffer_unordered(BEAT_CONCURRENCY);
        let mut failed = None;
        while let Some(r) = renewals.next().await {
            match r {
                Ok(Claimed::Joined(_)) => self.counted(1, 0),
                Ok(_) => {}
                Err(e) => failed = Some(e),
            }
        }
        if let Some(e) = failed {
            tracing::debug!(error = %e, "presence beat failed; trying again next beat");
        }
    }

    /// Members whose lease ran out leave (on any instance's behalf); the gauges are set from
    /// the store's figures.
    pub async fn presence_sweep(&self) {
        match self
            .store
            .presence()
            .presence_sweep(self.presence_hooks_on())
            .await
        {
            Ok(left) => self.counted(0, left.len() as u64),
            Err(e) => tracing::debug!(error = %e, "presence sweep failed"),
        }
    }

    /// Reads the store's figures for the gauges and the admin snapshot.
    pub async fn presence_census(&self) {
        if let Ok(s) = self.store.presence().presence_stats().await {
            self.metrics.presence_occupancy(s.streams, s.members);
            *lock(&self.presence.stats) = s;
        }
    }

    /// How often members are renewed and lapsed ones swept.
    pub fn presence_periods(&self) -> (Duration, Duration) {
        let beat = Duration::from_millis((self.heartbeat_ms() / 3).max(100));
        let shortest = self
            .cfg
            .presence
            .leave_grace_sec
            .min(self.cfg.presence.heartbeat_sec)
            .saturating_mul(1000);
        let sweep = Duration::from_millis((shortest / 4).clamp(100, 1000));
        (beat, sweep)
    }

    /// The admin snapshot's `presence` section.
    pub fn presence_view(&self) -> serde_json::Value {
        let s = *lock(&self.presence.stats);
        let minutes: Vec<serde_json::Value> = lock(&self.presence.minutes)
            .iter()
            .map(|(m, j, l)| serde_json::json!({"minute": m * 60_000, "joins": j, "leaves": l}))
            .collect();
        serde_json::json!({
            "enabled": self.cfg.presence_anywhere(),
            "patterns": self.cfg.presence.patterns,
            "streams": s.streams,
            "members": s.members,
            "perMinute": minutes,
        })
    }

    /// One page of the stream's members (`GET /v1/streams/{stream}/presence`).
    pub async fn presence_page(
        &self,
        stream: &StreamId,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<PresencePage, ApiError> {
        self.presence_of(stream)?;
        if let Some(c) = cursor
            && SessionId::parse(c).is_none()
        {
            return Err(ApiError::invalid("invalid cursor").with("stream", stream.as_str()));
        }
        self.store
            .presence()
            .presence_members(stream, cursor, limit)
            .await
            .map_err(ApiError::from)
    }

    /// Where presence frames start for a client at `after` in `epoch` (both optional: the
    /// head). Read before any frame is delivered; the caller listens first.
    pub async fn place_presence(
        &self,
        stream: &StreamId,
        after: Option<u64>,
        epoch: Option<&Epoch>,
    ) -> Result<PresenceStart, ApiError> {
        self.presence_of(stream)
            .map_err(|e| e.with("presence", true))?;
        let log = self.presence_read(stream, 0, 0).await?;
        let after = after.unwrap_or(log.head);
        check_presence_position(stream, after, epoch, &log)?;
        Ok(PresenceStart {
            epoch: log.epoch,
            after,
        })
    }

    /// Presence log entries after `after` (a connection's cursor).
    pub async fn presence_read(
        &self,
        stream: &StreamId,
        after: u64,
        limit: usize,
    ) -> Result<PresenceLog, ApiError> {
        self.store
            .presence()
            .presence_read(stream, after, limit)
            .await
            .map_err(ApiError::from)
    }
}

/// The wire shape of an entry, for every transport.
pub fn presence_frame(e: &PresenceEntry) -> zerodrop_core::frames::PresenceFrame {
    zerodrop_core::frames::PresenceFrame {
        stream: e.stream.as_str().to_string(),
        seq: e.seq,
        epoch: e.epoch.as_str().to_string(),
        action: e.action.as_str().to_string(),
        member: zerodrop_core::frames::PresenceMember {
            sub: e.member.sub.clone(),
            session_id: e.member.session_id.as_str().to_string(),
            info: e.member.info.clone(),
            since: e.member.since,
        },
    }
}
