//! Where the log and the sessions live.
//!
//! [`Store`] is the one interface the server talks to; `sqlite` (the default: one file, a
//! single group-committing writer), `redis` (several instances sharing one Redis or Redis
//! Cluster) and `memory` (tests) implement it with the same behaviour, checked by one shared
//! suite (`tests/behaviour.rs`).
//!
//! Contract every implementation keeps:
//! - `append` answers only once the event is durable, and only then (right after answering)
//!   hands it to the [`LiveSink`] — live delivery never shows an event a crash could take back.
//! - Seqs are contiguous per stream, assigned by the store; events never change.
//! - The sink sees the committed events of one stream in seq order.
//! - Checkpoints follow [`zerodrop_core::checkpoint::apply`], atomically with the head they
//!   are checked against.
//! - Idempotency keys are recorded in the same commit as the append they answer for.
//! - Retention trims in the same commit as the append that exceeds a limit, and by age at
//!   least every second; every trim is reported to the sink.
//! - A subject's live sessions are counted against its [`SessionCap`] in the same atomic
//!   step that creates the session, so the cap holds for every instance sharing the store.
//! - "Durable" means what the store's own settings make it: each store reports its
//!   [`Durability`] level, read from those settings ([`Store::durability`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use zerodrop_core::window::LogBounds;
use zerodrop_core::{AckUpdate, Epoch, Event, Grants, Seq, SessionId, StreamId};

pub mod durability;
pub mod guard;
pub mod memory;
pub mod presence;
pub mod redis;
pub mod revocation;
mod rules;
pub mod sqlite;

pub use self::durability::{Durability, RedisPersistence, StoreDurability, Unread};
pub use self::guard::{
    Enqueued, Failure, GuardStore, IdemBegin, IdemRecord, IdemScopeStats, JobId, JobRecord,
    JobStats, JobStatus, Lease, LeasedJob, NewJob, QosClass, QueuedCaps, RunningCaps,
};
pub use self::redis::{RedisOptions, RedisStore, SentinelUrl};
pub use memory::MemoryStore;
pub use presence::{
    Claimed, Member, PresenceAction, PresenceClaim, PresenceEntry, PresenceLog, PresencePage,
    PresenceStats, PresenceStore,
};
pub use revocation::{Revocation, RevokeTarget};
pub use rules::SessionCap;
pub use rules::{Planned, plan_items, planned_outcomes};
pub use sqlite::{SqliteOptions, SqliteStore, Synchronous};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    Sqlite,
    Redis,
    Memory,
}

impl StoreKind {
    pub fn as_str(self) -> &'static str {
        match self {
            StoreKind::Sqlite => "sqlite",
            StoreKind::Redis => "redis",
            StoreKind::Memory => "memory",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The store cannot be reached or cannot write; nothing was applied.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The store's storage failed (disk full, damaged file, I/O error); nothing was applied
    /// and what was stored before is untouched. The detail names the file and the cause.
    #[error("store failed ({}): {detail}", fault.as_str())]
    Fault { fault: StoreFault, detail: String },
    #[error("idempotency key reused with a different request body")]
    IdempotencyKeyReused,
    #[error("a request with this idempotency key is still in progress")]
    IdempotencyInProgress,
    #[error("ack {requested} is beyond the stream head {head}")]
    AckBeyondHead { requested: Seq, head: Seq },
    #[error("session not found")]
    SessionNotFound,
    #[error("stream is not part of the session")]
    NotInSession,
    #[error("the stream's log was recreated (epoch {current})")]
    EpochChanged { current: Epoch },
    /// The class's queued cap is reached: nothing was enqueued.
    #[error("the {} queue is full ({cap} jobs queued)", class.as_str())]
    QueueFull { class: QosClass, cap: u64 },
    /// The lease is not the job's current one (or the job is no longer running): nothing
    /// changed.
    #[error("job {job}: the lease of attempt {attempt} is no longer held")]
    StaleLease { job: JobId, attempt: u32 },
    /// The subject already holds `cap` live sessions: nothing was created. The earliest of
    /// them ends its reconnect window in `retry_after_ms` (unless it is resumed meanwhile).
    #[error("the subject already holds {cap} live sessions")]
    TooManySessions { cap: u32, retry_after_ms: u64 },
    /// The stream was closed ([`Store::close_stream`]) at `last_seq`: nothing was appended.
    #[error("the stream was closed at seq {last_seq}")]
    StreamClosed { last_seq: Seq },
}

impl StoreError {
    /// The store could not do the work at all (as opposed to refusing the request): the
    /// client should retry later, `STORE_UNAVAILABLE`.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_) | StoreError::Fault { .. })
    }
}

/// Why a store's storage failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StoreFault {
    /// No space left for the file (`SQLITE_FULL`): writes fail until space is freed; reads
    /// go on.
    DiskFull,
    /// The file is damaged (`SQLITE_CORRUPT`, `SQLITE_NOTADB`, or a failed
    /// `PRAGMA quick_check`): the store stops serving it until a restart moves it aside.
    Corrupt,
    /// The operating system failed a read or a write (`SQLITE_IOERR*`).
    Io,
}

impl StoreFault {
    pub fn as_str(self) -> &'static str {
        match self {
            StoreFault::DiskFull => "disk_full",
            StoreFault::Corrupt => "corrupt",
            StoreFault::Io => "io_error",
        }
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// An `Idempotency-Key` and the fingerprint (SHA-256) of the request body it came with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdempotencyKey {
    pub key: String,
    pub fingerprint: [u8; 32],
}

#[derive(Clone, Debug)]
pub struct AppendRequest {
    pub stream: StreamId,
    /// Compact, valid JSON.
    pub data: String,
    pub idempotency: Option<IdempotencyKey>,
}

#[derive(Clone, Debug)]
pub struct AppendOutcome {
    pub stream: StreamId,
    pub seq: Seq,
    pub epoch: Epoch,
    /// The key had been seen: `seq`/`epoch` are those of the first append, nothing was added.
    pub duplicate: bool,
}

/// One event of a batch ([`Store::append_batch`]).
#[derive(Clone, Debug)]
pub struct BatchItem {
    /// Compact, valid JSON.
    pub data: String,
    pub idempotency: Option<IdempotencyKey>,
}

/// One stream's part of a batch: appended in one commit, contiguous and in this order, or not
/// at all.
#[derive(Clone, Debug)]
pub struct StreamBatch {
    pub stream: StreamId,
    pub items: Vec<BatchItem>,
}

/// Per [`StreamBatch`], in the order given: each item's outcome, or the one refusal that left
/// the whole stream's part unwritten.
pub type BatchOutcome = Vec<StoreResult<Vec<AppendOutcome>>>;

/// A stream's log as the store sees it now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamInfo {
    pub stream: StreamId,
    pub epoch: Epoch,
    pub head: Seq,
    /// Oldest retained seq; `head + 1` when nothing is retained.
    pub first_seq: Seq,
    pub count: u64,
    pub bytes: u64,
    /// Closed ([`Store::close_stream`]): `head` is its last seq, and appends are refused.
    pub closed: bool,
}

impl StreamInfo {
    pub fn empty(stream: StreamId, epoch: Epoch) -> StreamInfo {
        StreamInfo {
            stream,
            epoch,
            head: Seq(0),
            first_seq: Seq(1),
            count: 0,
            bytes: 0,
            closed: false,
        }
    }

    pub fn bounds(&self) -> LogBounds {
        LogBounds {
            epoch: self.epoch.clone(),
            first_seq: self.first_seq,
            head: self.head,
        }
    }
}

/// Which of a stream's events a read takes ([`Store::read_range`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadRange {
    /// seq > N, oldest first.
    After(Seq),
    /// seq < N, newest first.
    Before(Seq),
    /// Stamped at or after T (ms), oldest first.
    Since(u64),
}

/// Events with seq above some position, read in the same snapshot as `info`.
#[derive(Clone, Debug)]
pub struct ReadResult {
    pub info: StreamInfo,
    pub events: Vec<Arc<Event>>,
}

/// A session's per-stream state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionStream {
    /// The epoch the session's position refers to.
    pub epoch: Epoch,
    /// `lastAckSequence`.
    pub ack: Seq,
    /// Events up to here were already counted in `dropped_messages` for this session.
    pub dropped_through: Seq,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionRecord {
    pub id: SessionId,
    pub sub: String,
    pub grants: Grants,
    pub created_at_ms: u64,
    pub expires_at_ms: u64,
    pub streams: BTreeMap<StreamId, SessionStream>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    pub sessions: u64,
    pub streams: u64,
}

/// Receives what became durable, in commit order. Implemented by the server's live hub.
pub trait LiveSink: Send + Sync + 'static {
    /// Events that just became durable. Per stream, in seq order. A store shared by several
    /// instances (Redis) reports the events of the streams this instance watches
    /// ([`Store::watch`]); the others report every stream's.
    fn committed(&self, events: &[Arc<Event>]);
    /// Retention removed `count` events of `stream`; the oldest retained is now `first_seq`.
    fn trimmed(&self, stream: &StreamId, first_seq: Seq, count: u64);
    /// The feed may have missed events (e.g. a cross-instance notification channel
    /// reconnected): whatever the sink caches is suspect, subscribers must re-read the log.
    fn reset(&self) {}
    /// The stream's log was erased ([`Store::delete_stream`]) and starts again in a new
    /// epoch: whatever the sink caches of it is void. By default, like [`LiveSink::reset`].
    fn recreated(&self, stream: &StreamId) {
        let _ = stream;
        self.reset();
    }
    /// The stream was closed at `last_seq` ([`Store::close_stream`]); nothing follows it.
    fn closed(&self, stream: &StreamId, last_seq: Seq) {
        let _ = (stream, last_seq);
    }
    /// Another connection, possibly on another instance sharing the store, now holds the
    /// session `id`; `holder` names it (see [`Store::announce_holder`]). Best effort: stores
    /// that are not shared never call it.
    fn session_held(&self, id: &SessionId, holder: &str) {
        let _ = (id, holder);
    }
    /// The presence log of `stream` grew (on any instance sharing the store): its presence
    /// subscribers read it from their positions. A doorbell only; after a [`LiveSink::reset`]
    /// every presence subscriber reads again.
    fn presence_changed(&self, stream: &StreamId) {
        let _ = stream;
    }
    /// The feed of `stream` may have missed events (it started after [`Store::watch`] was
    /// called, or started again): what the sink caches of it is suspect, its subscribers
    /// must re-read the log. By default, like [`LiveSink::reset`].
    fn missed(&self, stream: &StreamId) {
        let _ = stream;
        self.reset();
    }
}

/// A sink that ignores everything (tools and tests that need no live path).
pub struct NoSink;

impl LiveSink for NoSink {
    fn committed(&self, _: &[Arc<Event>]) {}
    fn trimmed(&self, _: &StreamId, _: Seq, _: u64) {}
}

#[async_trait]
pub trait Store: GuardStore + Send + Sync + 'static {
    fn kind(&self) -> StoreKind;

    /// Appends one event; answers once it is durable.
    async fn append(&self, req: AppendRequest) -> StoreResult<AppendOutcome>;

    /// Appends a batch: each [`StreamBatch`] in one commit, contiguous and in its order, or
    /// none of it (an idempotency key reused with another body, a closed stream); the
    /// other streams' parts are not held back by it. An item whose key was seen before (in an
    /// earlier append, or earlier in the same part with the same body) is a duplicate and
    /// adds nothing ([`crate::rules::plan_items`]). Answers once everything written is durable.
    async fn append_batch(&self, batch: Vec<StreamBatch>) -> StoreResult<BatchOutcome>;

    /// Up to `limit` events of `range` (after or before a seq, or since a time), in its
    /// order, with the bounds of the same snapshot.
    async fn read_range(
        &self,
        stream: &StreamId,
        range: ReadRange,
        limit: usize,
    ) -> StoreResult<ReadResult>;

    /// Erases the stream's log and its idempotency records; it starts again, empty and open,
    /// in a new epoch (the sink hears [`LiveSink::recreated`]). `None` when the store holds
    /// nothing of the stream.
    async fn delete_stream(&self, stream: &StreamId) -> StoreResult<Option<StreamInfo>>;

    /// Closes the stream at its head: later appends are refused with
    /// [`StoreError::StreamClosed`] (a duplicate of an earlier keyed append still answers),
    /// and the sink hears [`LiveSink::closed`]. Closing a closed stream changes nothing.
    /// `None` when the store holds nothing of the stream.
    async fn close_stream(&self, stream: &StreamId) -> StoreResult<Option<StreamInfo>>;

    /// The stream's bounds. A stream never written to has head 0 and the store's epoch.
    async fn stream_info(&self, stream: &StreamId) -> StoreResult<StreamInfo>;

    /// Up to `limit` events with seq > `after`, with the bounds of the same snapshot.
    async fn read(&self, stream: &StreamId, after: Seq, limit: usize) -> StoreResult<ReadResult>;

    /// The bounds and the chained digest of all retained events ([`zerodrop_core::hash`]).
    async fn digest(&self, stream: &StreamId) -> StoreResult<(StreamInfo, String)>;

    /// Creates (or replaces) a session, with no cap on its subject's sessions.
    async fn create_session(&self, session: SessionRecord) -> StoreResult<()> {
        self.create_session_within(session, SessionCap::NONE).await
    }

    /// Creates (or replaces) a session unless its subject already holds `cap` live sessions
    /// other than this one ([`StoreError::TooManySessions`], nothing written). Counting and
    /// creating are one atomic step for every instance sharing the store.
    async fn create_session_within(
        &self,
        session: SessionRecord,
        cap: SessionCap,
    ) -> StoreResult<()>;

    async fn load_session(&self, id: &SessionId) -> StoreResult<Option<SessionRecord>>;

    /// Adds the stream to the session, or replaces its state. Within the same epoch the stored
    /// ack never moves backwards (the larger of the two is kept).
    async fn put_session_stream(
        &self,
        id: &SessionId,
        stream: &StreamId,
        state: SessionStream,
    ) -> StoreResult<()>;

    async fn remove_session_stream(&self, id: &SessionId, stream: &StreamId) -> StoreResult<()>;

    /// Applies an ack under the checkpoint rule, against the stream's current head.
    async fn checkpoint(
        &self,
        id: &SessionId,
        stream: &StreamId,
        seq: Seq,
    ) -> StoreResult<AckUpdate>;

    /// Applies many acks (written-behind WebSocket acks) under the same rule. Entries that
    /// cannot be applied (the session or stream is gone, the ack is stale) are skipped: the
    /// result says how many were applied.
    async fn checkpoint_many(&self, acks: Vec<(SessionId, StreamId, Seq)>) -> StoreResult<usize> {
        let mut applied = 0;
        for (id, stream, seq) in acks {
            match self.checkpoint(&id, &stream, seq).await {
                Ok(u) => applied += usize::from(u.is_applied()),
                Err(e) if e.is_unavailable() => return Err(e),
                Err(_) => {}
            }
        }
        Ok(applied)
    }

    /// Replaces the session's grants (a fresher connect token, which may grant less).
    /// `SessionNotFound` when the session is gone.
    async fn set_session_grants(&self, id: &SessionId, grants: &Grants) -> StoreResult<()>;

    /// Records a revocation (replacing one with the same id).
    async fn put_revocation(&self, r: &Revocation) -> StoreResult<()>;

    /// Deletes a revocation; `false` when there was none with that id.
    async fn delete_revocation(&self, id: &str) -> StoreResult<bool>;

    /// The revocations in force now (lapsed ones are left out, and may be pruned).
    async fn revocations(&self) -> StoreResult<Vec<Revocation>>;

    /// A number that changes whenever the set of revocations changes, on any instance sharing
    /// the store, so that instances re-read it only then. `None`: only this process writes
    /// the store, and it knows its own changes.
    async fn revocations_version(&self) -> StoreResult<Option<u64>> {
        Ok(None)
    }

    /// The stream's record: a small document kept beside its log by a protocol served on it
    /// (the Durable Streams room's content type, expiry and writers), opaque to the store.
    /// `None` when the stream has none.
    async fn stream_record(&self, stream: &StreamId) -> StoreResult<Option<String>>;

    /// Replaces the stream's record (`Some`) or removes it (`None`), durably: the answer
    /// comes once the change is as durable as an append.
    async fn put_stream_record(&self, stream: &StreamId, record: Option<String>)
    -> StoreResult<()>;

    /// Moves the session's expiry (activity extends the reconnect window).
    async fn touch_session(&self, id: &SessionId, expires_at_ms: u64) -> StoreResult<()>;

    /// Records that events up to `through` were counted as dropped for this session's stream.
    async fn mark_dropped(
        &self,
        id: &SessionId,
        stream: &StreamId,
        through: Seq,
    ) -> StoreResult<()>;

    /// Cheap liveness check used by readiness.
    async fn ping(&self) -> StoreResult<()>;

    /// What a 201 survives, read from the store's own settings ([`durability`]): SQLite's
    /// `PRAGMA synchronous` as the write connection reports it (read when the file was
    /// opened: it cannot change while the store runs), Redis's `appendonly`/`appendfsync`
    /// and connected replicas, asked of the server on every call (what was read last while
    /// the server does not answer), nothing for the memory store.
    async fn durability(&self) -> StoreDurability;

    /// The store found its data damaged and refuses every call until the instance restarts
    /// (readiness says `store_corrupt` rather than `store_unavailable`).
    fn corrupt(&self) -> bool {
        false
    }

    /// Tells every instance sharing this store that the connection named `holder` (an opaque
    /// token without `|`) now holds session `id`, so that an older connection elsewhere can be
    /// closed. Every instance's sink, this one's included, hears it through
    /// [`LiveSink::session_held`], in one order for all. A store that only one instance uses
    /// has nothing to tell and does nothing. Best effort: correctness never depends on it.
    async fn announce_holder(&self, id: &SessionId, holder: &str) -> StoreResult<()> {
        let _ = (id, holder);
        Ok(())
    }

    /// This instance serves `stream` live: from now until [`Store::unwatch`], the sink hears
    /// of its new events ([`LiveSink::committed`]). A store whose sink hears of every
    /// stream's events anyway (one process: memory, SQLite) ignores it. A store that feeds the
    /// sink from elsewhere (Redis pub/sub) starts the stream's feed in the background and
    /// tells the sink [`LiveSink::missed`] once it flows, since events appended in between
    /// were not heard. Called once per stream until its `unwatch`; never blocks.
    fn watch(&self, stream: &StreamId) {
        let _ = stream;
    }

    /// This instance no longer serves `stream` live: the sink need not hear of its events.
    fn unwatch(&self, stream: &StreamId) {
        let _ = stream;
    }

    async fn stats(&self) -> StoreResult<StoreStats>;

    /// The store's presence ([`presence`]): members and presence logs, shared by every
    /// instance that shares the store.
    fn presence(&self) -> &dyn PresenceStore;
}
