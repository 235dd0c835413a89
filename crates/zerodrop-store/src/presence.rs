//! Presence (SPEC §10): who is in a stream now, and the ordered, recoverable log of who
//! joined and left.
//!
//! A **member** is a session subscribed to a stream whose presence is on. The server claims a
//! member for as long as one of its connections holds the session: [`PresenceStore::presence_claim`]
//! at subscribe and resume, the same call again every beat (it renews the claim's lease, and
//! joins again a member that lapsed meanwhile), and [`PresenceStore::presence_release`] when
//! the connection ends, which shortens the lease to the leave grace. A member whose lease ran
//! out leaves at the next [`PresenceStore::presence_sweep`] (every instance sweeps: the store
//! makes each leave happen once). So a reconnect, a resume elsewhere or a drain hand-off within
//! the grace claims the member again before it lapses, and emits nothing; a crashed instance
//! stops renewing, and its members leave once their last lease (the heartbeat) ran out.
//!
//! Each stream has a presence log: `join`/`leave` entries with their own `seq` (1, 2, 3 …, no
//! gaps) and `epoch`, kept up to [`LOG_KEEP`] entries. The member list and the log's head are
//! read in one snapshot ([`PresenceStore::presence_members`]), so a snapshot at `presenceSeq`
//! followed by the log after it has no hole and no duplicate.
//!
//! The rules here are every backend's: [`PresenceBook`] is the in-process implementation that
//! the memory and SQLite stores share (a single instance holds every connection, so its
//! presence lives with the process and starts a new epoch with it: docs/decisions.md,
//! "Presence"); the Redis store spells the same rules out in Lua (`redis/presence.rs`).
//!
//! Must not: decide who may be a member or which streams have presence (the server does).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use zerodrop_core::clock::Clock;
use zerodrop_core::{Epoch, SessionId, StreamId};

use crate::{LiveSink, StoreResult};

/// Presence log entries kept per stream; a position further back is answered as trimmed (the
/// client takes a fresh snapshot).
pub const LOG_KEEP: u64 = 10_000;

/// Most members one page of a snapshot holds.
pub const PAGE_MAX: usize = 1_000;

/// One member: a session of `sub`, with the public `info` of its connect token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Member {
    pub sub: String,
    pub session_id: SessionId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<Value>,
    /// When it joined (Unix ms).
    pub since: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PresenceAction {
    Join,
    Leave,
}

impl PresenceAction {
    pub fn as_str(self) -> &'static str {
        match self {
            PresenceAction::Join => "join",
            PresenceAction::Leave => "leave",
        }
    }
}

/// One entry of a stream's presence log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceEntry {
    pub stream: StreamId,
    pub seq: u64,
    pub epoch: Epoch,
    pub action: PresenceAction,
    pub member: Member,
    /// Members of the stream right after this entry (`stream.occupied` is a join to 1,
    /// `stream.vacated` a leave to 0).
    #[serde(default)]
    pub occupancy: u64,
}

/// A connection's claim on a member: renewed for `lease_ms` from now (the store's clock).
#[derive(Clone, Debug)]
pub struct PresenceClaim {
    pub stream: StreamId,
    /// `since` is ignored for a member already present (it keeps its own).
    pub member: Member,
    /// The connection that holds it (an opaque name): only that one's release shortens the
    /// lease, so an old connection that closes after a newer one claimed changes nothing.
    pub holder: String,
    /// The claim takes the member over from whichever connection held it (a subscribe, a
    /// resume); a beat (`false`) renews only a member its holder still holds, so an old
    /// connection's beat cannot take it back from a newer one elsewhere.
    pub take: bool,
    pub lease_ms: u64,
}

/// What a claim did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claimed {
    /// A new member: this entry was appended.
    Joined(PresenceEntry),
    /// Already a member: its lease was renewed, nothing appended.
    Renewed,
    /// The stream has `max` members already: nothing changed.
    Full { max: u32 },
}

/// One page of a stream's members, read in one snapshot with the log's head.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PresencePage {
    pub epoch: Epoch,
    /// The presence log's head when the page was read.
    pub seq: u64,
    pub occupancy: u64,
    /// Ordered by session id.
    pub members: Vec<Member>,
    /// The last session id of this page when more follow (the next page's cursor).
    pub next: Option<String>,
}

/// Presence log entries after some seq, with the log's bounds in the same snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PresenceLog {
    pub epoch: Epoch,
    pub head: u64,
    /// The oldest entry kept (`head + 1` when none is).
    pub first: u64,
    pub entries: Vec<PresenceEntry>,
}

/// A page of at most `limit` members from up to `limit + 1` read in order: the cursor of the
/// next page is the last member's session id when more followed.
pub(crate) fn page_of(mut members: Vec<Member>, limit: usize) -> (Vec<Member>, Option<String>) {
    if members.len() <= limit {
        return (members, None);
    }
    members.truncate(limit);
    let next = members.last().map(|m| m.session_id.as_str().to_string());
    (members, next)
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PresenceStats {
    /// Streams with at least one member.
    pub streams: u64,
    pub members: u64,
}

#[async_trait]
pub trait PresenceStore: Send + Sync {
    /// Joins the member (appending `join`) or renews its lease (see [`PresenceClaim::take`]),
    /// unless the stream already has `max_members` members.
    async fn presence_claim(&self, claim: PresenceClaim, max_members: u32) -> StoreResult<Claimed>;

    /// The member's lease ends `lease_ms` from now, if `holder` still holds it.
    async fn presence_release(
        &self,
        stream: &StreamId,
        session: &SessionId,
        holder: &str,
        lease_ms: u64,
    ) -> StoreResult<()>;

    /// The member leaves now (the session unsubscribed); `None` when it was not a member.
    async fn presence_leave(
        &self,
        stream: &StreamId,
        session: &SessionId,
    ) -> StoreResult<Option<PresenceEntry>>;

    /// Every member whose lease ran out leaves; each leave is appended once, whichever
    /// instance sweeps. `hooks`: occupancy webhooks are on, so a stream whose entries are not
    /// all hooked yet stays in sight of [`PresenceStore::presence_unhooked`] even when empty.
    async fn presence_sweep(&self, hooks: bool) -> StoreResult<Vec<PresenceEntry>>;

    /// Streams whose presence log has entries after their webhook cursor: each with the log's
    /// epoch and the cursor (the last seq whose webhooks are done).
    async fn presence_unhooked(&self) -> StoreResult<Vec<(StreamId, Epoch, u64)>>;

    /// The webhooks of `stream`'s entries through `seq` in `epoch` are done: the cursor moves
    /// there (never back; not at all in another epoch).
    async fn presence_hooked(&self, stream: &StreamId, epoch: &Epoch, seq: u64) -> StoreResult<()>;

    /// Up to `limit` members with session ids after `after`, and the log's head.
    async fn presence_members(
        &self,
        stream: &StreamId,
        after: Option<&str>,
        limit: usize,
    ) -> StoreResult<PresencePage>;

    /// Up to `limit` log entries with seq > `after`.
    async fn presence_read(
        &self,
        stream: &StreamId,
        after: u64,
        limit: usize,
    ) -> StoreResult<PresenceLog>;

    async fn presence_stats(&self) -> StoreResult<PresenceStats>;
}

/// The presence of every stream in this process: the memory and SQLite stores' presence.
pub struct PresenceBook {
    epoch: Epoch,
    sink: Arc<dyn LiveSink>,
    clock: Arc<dyn Clock>,
    rooms: Mutex<HashMap<StreamId, Room>>,
}

#[derive(Default)]
struct Room {
    seq: u64,
    /// The webhook cursor.
    hooked: u64,
    log: VecDeque<PresenceEntry>,
    members: BTreeMap<String, Held>,
}

struct Held {
    member: Member,
    holder: String,
    until_ms: u64,
}

impl Room {
    fn append(
        &mut self,
        stream: &StreamId,
        epoch: &Epoch,
        action: PresenceAction,
        member: Member,
    ) -> PresenceEntry {
        self.seq += 1;
        let e = PresenceEntry {
            stream: stream.clone(),
            seq: self.seq,
            epoch: epoch.clone(),
            action,
            member,
            occupancy: self.members.len() as u64,
        };
        self.log.push_back(e.clone());
        while self.log.len() as u64 > LOG_KEEP {
            self.log.pop_front();
        }
        e
    }

    fn first(&self) -> u64 {
        self.log.front().map(|e| e.seq).unwrap_or(self.seq + 1)
    }
}

impl PresenceBook {
    /// A book in a new epoch: what an earlier process knew is gone.
    pub fn new(sink: Arc<dyn LiveSink>, clock: Arc<dyn Clock>) -> PresenceBook {
        PresenceBook {
            epoch: Epoch::generate(),
            sink,
            clock,
            rooms: Mutex::new(HashMap::new()),
        }
    }

    fn rooms(&self) -> std::sync::MutexGuard<'_, HashMap<StreamId, Room>> {
        self.rooms.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl PresenceStore for PresenceBook {
    async fn presence_claim(&self, claim: PresenceClaim, max_members: u32) -> StoreResult<Claimed> {
        let now = self.clock.now_ms();
        let key = claim.member.session_id.as_str().to_string();
        let out = {
            let mut rooms = self.rooms();
            let room = rooms.entry(claim.stream.clone()).or_default();
            if let Some(h) = room.members.get_mut(&key) {
                if claim.take || h.holder == claim.holder {
                    h.holder = claim.holder;
                    h.until_ms = h.until_ms.max(now + claim.lease_ms);
                }
                return Ok(Claimed::Renewed);
            }
            if room.members.len() as u64 >= u64::from(max_members) {
                return Ok(Claimed::Full { max: max_members });
            }
            let member = Member {
                since: now,
                ..claim.member
            };
            room.members.insert(
                key,
                Held {
                    member: member.clone(),
                    holder: claim.holder,
                    until_ms: now + claim.lease_ms,
                },
            );
            room.append(&claim.stream, &self.epoch, PresenceAction::Join, member)
        };
        self.sink.presence_changed(&claim.stream);
        Ok(Claimed::Joined(out))
    }

    async fn presence_release(
        &self,
        stream: &StreamId,
        session: &SessionId,
        holder: &str,
        lease_ms: u64,
    ) -> StoreResult<()> {
        let now = self.clock.now_ms();
        if let Some(h) = self
            .rooms()
            .get_mut(stream)
            .and_then(|r| r.members.get_mut(session.as_str()))
            && h.holder == holder
        {
            h.until_ms = h.until_ms.min(now + lease_ms);
        }
        Ok(())
    }

    async fn presence_leave(
        &self,
        stream: &StreamId,
        session: &SessionId,
    ) -> StoreResult<Option<PresenceEntry>> {
        let out = {
            let mut rooms = self.rooms();
            let Some(room) = rooms.get_mut(stream) else {
                return Ok(None);
            };
            let Some(h) = room.members.remove(session.as_str()) else {
                return Ok(None);
            };
            room.append(stream, &self.epoch, PresenceAction::Leave, h.member)
        };
        self.sink.presence_changed(stream);
        Ok(Some(out))
    }

    async fn presence_unhooked(&self) -> StoreResult<Vec<(StreamId, Epoch, u64)>> {
        Ok(self
            .rooms()
            .iter()
            .filter(|(_, r)| r.seq > r.hooked)
            .map(|(s, r)| (s.clone(), self.epoch.clone(), r.hooked))
            .collect())
    }

    async fn presence_hooked(&self, stream: &StreamId, epoch: &Epoch, seq: u64) -> StoreResult<()> {
        if *epoch == self.epoch
            && let Some(r) = self.rooms().get_mut(stream)
        {
            r.hooked = r.hooked.max(seq.min(r.seq));
        }
        Ok(())
    }

    async fn presence_sweep(&self, _hooks: bool) -> StoreResult<Vec<PresenceEntry>> {
        let now = self.clock.now_ms();
        let mut left = Vec::new();
        {
            let mut rooms = self.rooms();
            for (stream, room) in rooms.iter_mut() {
                let gone: Vec<String> = room
                    .members
                    .iter()
                    .filter(|(_, h)| h.until_ms <= now)
                    .map(|(k, _)| k.clone())
                    .collect();
                for k in gone {
                    if let Some(h) = room.members.remove(&k) {
                        left.push(room.append(
                            stream,
                            &self.epoch,
                            PresenceAction::Leave,
                            h.member,
                        ));
                    }
                }
            }
        }
        let mut rung: Vec<&StreamId> = left.iter().map(|e| &e.stream).collect();
        rung.dedup();
        for s in rung {
            self.sink.presence_changed(s);
        }
        Ok(left)
    }

    async fn presence_members(
        &self,
        stream: &StreamId,
        after: Option<&str>,
        limit: usize,
    ) -> StoreResult<PresencePage> {
        let rooms = self.rooms();
        let empty = Room::default();
        let room = rooms.get(stream).unwrap_or(&empty);
        let limit = limit.clamp(1, PAGE_MAX);
        let from = match after {
            Some(a) => std::ops::Bound::Excluded(a.to_string()),
            None => std::ops::Bound::Unbounded,
        };
        let (members, next) = page_of(
            room.members
                .range((from, std::ops::Bound::Unbounded))
                .take(limit + 1)
                .map(|(_, h)| h.member.clone())
                .collect(),
            limit,
        );
        Ok(PresencePage {
            epoch: self.epoch.clone(),
            seq: room.seq,
            occupancy: room.members.len() as u64,
            members,
            next,
        })
    }

    async fn presence_read(
        &self,
        stream: &StreamId,
        after: u64,
        limit: usize,
    ) -> StoreResult<PresenceLog> {
        let rooms = self.rooms();
        let empty = Room::default();
        let room = rooms.get(stream).unwrap_or(&empty);
        let entries = room
            .log
            .iter()
            .filter(|e| e.seq > after)
            .take(limit)
            .cloned()
            .collect();
        Ok(PresenceLog {
            epoch: self.epoch.clone(),
            head: room.seq,
            first: room.first(),
            entries,
        })
    }

    async fn presence_stats(&self) -> StoreResult<PresenceStats> {
        let rooms = self.rooms();
        let mut s = PresenceStats::default();
        for r in rooms.values().filter(|r| !r.members.is_empty()) {
            s.streams += 1;
            s.members += r.members.len() as u64;
        }
        Ok(s)
    }
}
