//! The `sqlite` store: one file, WAL mode, one writer thread that group-commits.
//!
//! Why this shape: durability costs one fsync per commit, so throughput comes from putting
//! many writes in one commit. A single `std::thread` owns the only write connection, drains
//! whatever is queued (up to [`MAX_BATCH`] commands), runs them in one `BEGIN IMMEDIATE …
//! COMMIT`, and only after `COMMIT` answers each caller and hands the new events to the live
//! sink. Readers use their own connections (WAL: they never wait for the writer) on tokio's
//! blocking pool, each read in one transaction so bounds and events come from one snapshot.
//!
//! Layout: `events` is a rowid table in append order with `UNIQUE(stream, seq)`; because the
//! writer keeps `ts` monotonic, the oldest rows by rowid are the oldest by time, which makes the
//! age sweep a cheap prefix delete. Per-stream bounds live in `streams`, cached by the writer.
//! The guardrails' job queue and webhook idempotency records (`guard`) are written by the same
//! writer, in the same group commits.
//!
//! A file that is not a database, or that fails `PRAGMA quick_check` at open, is moved aside to
//! `<name>.corrupt-<UTC stamp>` and a new one (with a new epoch, so clients resync) takes its
//! place. At run time every SQLite failure is classified once (`Health::fault`): a full disk
//! or an I/O error fails that call with [`StoreError::Fault`] and the next call tries again; a
//! damaged file (`SQLITE_CORRUPT`, `SQLITE_NOTADB`, or a failed scheduled [`SqliteStore::check`])
//! latches the store into refusing every call until a restart quarantines the file.
//!
//! One file per job: this one holds the store's handle (open, close, the scheduled check) and
//! its [`Store`] methods, which only hand commands to the writer or reads to the readers.
//! `open.rs` opens the file (pragmas, schema, migration, quarantine), `health.rs` classifies
//! failures, `writer.rs` runs the group commits, `readers.rs` the read connections; what the
//! writer and readers do for each concern is in `log.rs` (append, read, digest),
//! `idempotency.rs` (publish keys), `retention.rs` (trims by count, size and age; expiry),
//! `sessions.rs` (sessions, checkpoints, the per-subject cap) and `guard.rs` (the job queue and
//! webhook records). The rules the stores share are `crate::rules`'.
//!
//! Must not: let anything but the writer thread write, or answer a write before its `COMMIT`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{Connection, OpenFlags};
use tokio::sync::oneshot;
use zerodrop_core::clock::{Clock, SystemClock};
use zerodrop_core::retention::Retention;
use zerodrop_core::{AckUpdate, Epoch, Seq, SessionId, StreamId};
use zerodrop_core::{PatternTable, RetentionRules};

pub use self::checkpoint::CHECKPOINT_PAGES;
use self::checkpoint::WalState;
use self::health::{Health, quick_check};
use self::readers::Readers;
use self::writer::{Cmd, Op, Reply, Writer};
use crate::{
    AppendOutcome, AppendRequest, BatchOutcome, LiveSink, ReadRange, ReadResult, SessionCap,
    SessionRecord, SessionStream, Store, StoreDurability, StoreError, StoreKind, StoreResult,
    StoreStats, StreamBatch, StreamInfo,
};

mod checkpoint;
mod chunk;
mod guard;
mod health;
mod idempotency;
mod jobs;
mod log;
mod open;
mod presence;
mod readers;
mod retention;
mod sessions;
mod writer;

/// Most commands committed together.
pub const MAX_BATCH: usize = 1024;
/// Reads of at most this many events run on the calling thread; larger ones on the blocking
/// pool.
const INLINE_READ_EVENTS: usize = 256;

/// `PRAGMA synchronous` for the write connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Synchronous {
    /// fsync at every commit: a 201 survives power loss. The default.
    #[default]
    Full,
    /// Survives a process crash (`kill -9`); the last commits may be lost on power loss.
    Normal,
}

#[derive(Clone, Debug)]
pub struct SqliteOptions {
    pub path: PathBuf,
    pub retention: Retention,
    /// Stream patterns that keep their own limits (`[streams."pattern"]`); the most specific
    /// pattern matching a stream applies, else [`SqliteOptions::retention`].
    pub retention_patterns: PatternTable<Retention>,
    pub synchronous: Synchronous,
    pub idempotency_ttl_ms: u64,
    /// Sessions are deleted this long after they expired (until then a late resume is told
    /// `RECONNECT_WINDOW_EXPIRED` rather than `SESSION_NOT_FOUND`).
    pub session_grace_ms: u64,
    /// What time it is for timestamps, the age limit and expiry: the system's time line
    /// ([`SystemClock`]) unless a test injects one it moves.
    pub clock: Arc<dyn Clock>,
    /// Log pages after which the checkpointer copies the WAL into the file
    /// ([`CHECKPOINT_PAGES`] unless a test wants it sooner; `checkpoint.rs`).
    pub checkpoint_pages: u64,
}

impl SqliteOptions {
    pub fn new(path: impl Into<PathBuf>) -> SqliteOptions {
        SqliteOptions {
            path: path.into(),
            retention: Retention::default(),
            retention_patterns: PatternTable::new(),
            synchronous: Synchronous::Full,
            idempotency_ttl_ms: 24 * 3600 * 1000,
            session_grace_ms: 3600 * 1000,
            clock: SystemClock::shared(),
            checkpoint_pages: CHECKPOINT_PAGES,
        }
    }
}

pub struct SqliteStore {
    tx: Mutex<Option<mpsc::Sender<Cmd>>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    readers: Arc<Readers>,
    health: Arc<Health>,
    up: Arc<AtomicBool>,
    commits: Arc<AtomicU64>,
    quarantined: Option<PathBuf>,
    /// How long a publish `Idempotency-Key` is kept (listed with this expiry).
    idempotency_ttl_ms: u64,
    /// `PRAGMA synchronous` of the write connection, read back once it was set.
    synchronous: i64,
    /// The writer's clock, for what the store decides outside it (revocations in force).
    clock: Arc<dyn Clock>,
    /// Members and presence logs, in this process (`presence.rs`).
    presence: crate::presence::PresenceBook,
    /// The log's size and the checkpoints run off the writer (`checkpoint.rs`).
    wal: Arc<WalState>,
    checkpointer: Mutex<Option<checkpoint::Checkpointer>>,
}

impl SqliteStore {
    /// Opens (or creates) the database, quarantining a file that is not a database.
    pub fn open(opts: SqliteOptions, sink: Arc<dyn LiveSink>) -> StoreResult<SqliteStore> {
        let (mut conn, epoch, quarantined) = open::open_or_quarantine(&opts)?;
        open::writer_cache(&conn).map_err(unavailable)?;
        let synchronous = open::synchronous(&conn).map_err(unavailable)?;
        let health = Arc::new(Health::new(opts.path.clone()));
        let readers = Arc::new(Readers {
            path: opts.path.clone(),
            epoch: epoch.clone(),
            pool: Mutex::new(Vec::new()),
            health: health.clone(),
        });
        let up = Arc::new(AtomicBool::new(true));
        let commits = Arc::new(AtomicU64::new(0));
        let last_ts: u64 = conn
            .query_row("SELECT COALESCE(MAX(last_ts), 0) FROM streams", [], |r| {
                r.get::<_, i64>(0)
            })
            .map(|v| v.max(0) as u64)
            .map_err(unavailable)?;
        let default_max_pages: u64 = conn
            .query_row("PRAGMA max_page_count", [], |r| r.get::<_, i64>(0))
            .map(|v| v.max(1) as u64)
            .map_err(unavailable)?;
        let presence = presence::book(sink.clone(), opts.clock.clone());
        let wal = Arc::new(WalState::default());
        let (wake, woken) = mpsc::sync_channel(1);
        checkpoint::hook(
            &mut conn,
            wal.clone(),
            wake.clone(),
            opts.checkpoint_pages.max(1),
        )
        .map_err(unavailable)?;
        let own = open::checkpoint_connection(&opts.path, opts.synchronous).map_err(unavailable)?;
        let checkpointer = checkpoint::start(own, wal.clone(), (wake, woken), health.clone())
            .map_err(|e| StoreError::Unavailable(format!("cannot start the checkpointer: {e}")))?;
        let (tx, rx) = mpsc::channel();
        let mut writer = Writer {
            conn,
            epoch,
            health: health.clone(),
            default_max_pages,
            retention: RetentionRules::new(opts.retention, opts.retention_patterns.clone()),
            age_cursor: String::new(),
            idempotency_ttl_ms: opts.idempotency_ttl_ms,
            session_grace_ms: opts.session_grace_ms,
            sink,
            runtime: tokio::runtime::Handle::try_current().ok(),
            clock: opts.clock.clone(),
            up: up.clone(),
            commits: commits.clone(),
            cache: Default::default(),
            open: Default::default(),
            last_ts,
            live_sessions_bound: HashMap::new(),
        };
        let handle = std::thread::Builder::new()
            .name("zerodrop-sqlite-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| StoreError::Unavailable(format!("cannot start the writer: {e}")))?;
        Ok(SqliteStore {
            tx: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(handle)),
            readers,
            health,
            up,
            commits,
            quarantined,
            idempotency_ttl_ms: opts.idempotency_ttl_ms,
            synchronous,
            clock: opts.clock,
            presence,
            wal,
            checkpointer: Mutex::new(Some(checkpointer)),
        })
    }

    /// Transactions committed by the writer so far (each is one fsync, whatever it held).
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    /// Checkpoints the checkpointer thread ran so far, and the log's pages after the latest
    /// commit. For tests and benchmarks.
    #[doc(hidden)]
    pub fn wal_checkpoints(&self) -> (u64, u64) {
        (
            self.wal.checkpoints.load(Ordering::Relaxed),
            self.wal.pages.load(Ordering::Relaxed),
        )
    }

    /// Where a corrupt database file was moved at open, if one was.
    pub fn quarantined(&self) -> Option<&Path> {
        self.quarantined.as_deref()
    }

    pub fn epoch(&self) -> &Epoch {
        &self.readers.epoch
    }

    /// Runs `PRAGMA quick_check` on the file as it is on disk now (a fresh read-only
    /// connection, so neither the writer nor the readers wait for it). A file that fails it is
    /// damaged: the store latches into refusing every call ([`crate::StoreFault::Corrupt`]) and logs
    /// one error naming the file, so that the operator restarts the instance, whose start-up
    /// check then moves the file aside.
    pub async fn check(&self) -> StoreResult<()> {
        if let Some(e) = self.health.refusal() {
            return Err(e);
        }
        let (path, health) = (self.readers.path.clone(), self.health.clone());
        let found = tokio::task::spawn_blocking(move || {
            let conn = Connection::open_with_flags(
                &path,
                OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )?;
            conn.busy_timeout(Duration::from_secs(5))?;
            quick_check(&conn)
        })
        .await
        .map_err(|e| StoreError::Unavailable(format!("the quick_check task failed: {e}")))?;
        found.map_err(|e| health.fault(e))
    }

    /// Caps the file at `pages` pages (`PRAGMA max_page_count`; `None` lifts the cap), and
    /// answers the cap now in force. Never lower than the file's current size: what a full
    /// disk looks like to the writer, without filling one. For tests and drills.
    #[doc(hidden)]
    pub async fn limit_pages(&self, pages: Option<u64>) -> StoreResult<u64> {
        self.call(|r| Cmd::MaxPages(pages, r)).await
    }

    /// Runs the age sweep and the expiry sweep (idempotency keys, webhook records, ended
    /// sessions) in the next batch, at the clock's time; answers once it committed. They run by
    /// themselves every half second and every minute. For tests that move the clock.
    #[doc(hidden)]
    pub async fn sweep_now(&self) -> StoreResult<()> {
        self.call(Cmd::Sweep).await
    }

    /// Pages the file holds now (its size over the page size).
    #[doc(hidden)]
    pub async fn page_count(&self) -> StoreResult<u64> {
        self.readers.run_now(|c, _| {
            c.query_row("PRAGMA page_count", [], |r| r.get::<_, i64>(0))
                .map(|v| v.max(0) as u64)
        })
    }

    /// Lets the writer finish what is queued, then stops it. Later calls fail with
    /// `Unavailable`.
    pub fn close(&self) {
        // Readers and the checkpointer first, before the writer hears that the store closes,
        // so that no other connection is open (or checkpointing) when the writer folds the
        // log into the file and closes last: the file alone then holds every page, and the
        // log is gone. The writer's own commits bound the log meanwhile.
        lock(&self.readers.pool).clear();
        if let Some(c) = lock(&self.checkpointer).take() {
            c.stop();
        }
        drop(lock(&self.tx).take());
        if let Some(h) = lock(&self.writer).take() {
            let _ = h.join();
        }
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Cmd) -> StoreResult<T> {
        let (reply, rx) = oneshot::channel();
        {
            let tx = lock(&self.tx);
            let tx = tx.as_ref().ok_or_else(closed)?;
            tx.send(make(reply)).map_err(|_| closed())?;
        }
        rx.await.map_err(|_| closed())?
    }

    /// Runs `run` on the writer, in the next group commit; answers once that is durable.
    async fn write<T: Send + 'static>(
        &self,
        run: impl FnOnce(&Connection) -> rusqlite::Result<StoreResult<T>> + Send + 'static,
    ) -> StoreResult<T> {
        self.call(|reply| Cmd::Run(Box::new(Op { run, reply })))
            .await
    }
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        self.close();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn closed() -> StoreError {
    StoreError::Unavailable("the sqlite writer has stopped".into())
}

fn unavailable(e: rusqlite::Error) -> StoreError {
    StoreError::Unavailable(format!("sqlite: {e}"))
}

#[async_trait]
impl Store for SqliteStore {
    fn kind(&self) -> StoreKind {
        StoreKind::Sqlite
    }

    async fn append(&self, req: AppendRequest) -> StoreResult<AppendOutcome> {
        self.call(|r| Cmd::Append(req, r)).await
    }

    async fn stream_info(&self, stream: &StreamId) -> StoreResult<StreamInfo> {
        self.readers
            .run_now(|c, epoch| log::read_info(c, stream, epoch))
    }

    async fn read(&self, stream: &StreamId, after: Seq, limit: usize) -> StoreResult<ReadResult> {
        if limit <= INLINE_READ_EVENTS {
            return self.readers.run_now(|c, epoch| {
                log::read_events(c, stream, epoch, ReadRange::After(after), limit)
            });
        }
        self.read_range(stream, ReadRange::After(after), limit)
            .await
    }

    async fn append_batch(&self, batch: Vec<StreamBatch>) -> StoreResult<BatchOutcome> {
        self.call(|r| Cmd::AppendBatch(batch, r)).await
    }

    async fn read_range(
        &self,
        stream: &StreamId,
        range: ReadRange,
        limit: usize,
    ) -> StoreResult<ReadResult> {
        let stream = stream.clone();
        self.readers
            .run(move |c, epoch| log::read_events(c, &stream, epoch, range, limit))
            .await
    }

    async fn delete_stream(&self, stream: &StreamId) -> StoreResult<Option<StreamInfo>> {
        let stream = stream.clone();
        self.call(|r| Cmd::DeleteStream(stream, r)).await
    }

    async fn close_stream(&self, stream: &StreamId) -> StoreResult<Option<StreamInfo>> {
        let stream = stream.clone();
        self.call(|r| Cmd::CloseStream(stream, r)).await
    }

    async fn digest(&self, stream: &StreamId) -> StoreResult<(StreamInfo, String)> {
        let stream = stream.clone();
        self.readers
            .run(move |c, epoch| log::digest(c, &stream, epoch))
            .await
    }

    async fn create_session_within(
        &self,
        session: SessionRecord,
        cap: SessionCap,
    ) -> StoreResult<()> {
        self.call(|r| Cmd::CreateSession(session, cap, r)).await
    }

    async fn load_session(&self, id: &SessionId) -> StoreResult<Option<SessionRecord>> {
        self.readers.run_now(|c, _| sessions::read_session(c, id))
    }

    async fn put_session_stream(
        &self,
        id: &SessionId,
        stream: &StreamId,
        state: SessionStream,
    ) -> StoreResult<()> {
        let (id, stream) = (id.clone(), stream.clone());
        self.call(|r| Cmd::PutSessionStream(id, stream, state, r))
            .await
    }

    async fn remove_session_stream(&self, id: &SessionId, stream: &StreamId) -> StoreResult<()> {
        let (id, stream) = (id.clone(), stream.clone());
        self.call(|r| Cmd::RemoveSessionStream(id, stream, r)).await
    }

    async fn checkpoint(
        &self,
        id: &SessionId,
        stream: &StreamId,
        seq: Seq,
    ) -> StoreResult<AckUpdate> {
        let (id, stream) = (id.clone(), stream.clone());
        self.call(|r| Cmd::Checkpoint(id, stream, seq, r)).await
    }

    async fn checkpoint_many(&self, acks: Vec<(SessionId, StreamId, Seq)>) -> StoreResult<usize> {
        self.call(|r| Cmd::CheckpointMany(acks, r)).await
    }

    async fn set_session_grants(
        &self,
        id: &SessionId,
        grants: &zerodrop_core::Grants,
    ) -> StoreResult<()> {
        let id = id.clone();
        let grants = serde_json::to_string(grants).unwrap_or_else(|_| "{}".into());
        self.call(|r| Cmd::Grants(id, grants, r)).await
    }

    async fn stream_record(&self, stream: &StreamId) -> StoreResult<Option<String>> {
        let stream = stream.clone();
        self.readers.run_now(move |c, _| {
            let mut stmt =
                c.prepare_cached("SELECT record FROM stream_records WHERE stream = ?1")?;
            let mut rows = stmt.query([stream.as_str()])?;
            Ok(match rows.next()? {
                Some(row) => Some(row.get::<_, String>(0)?),
                None => None,
            })
        })
    }

    async fn put_stream_record(
        &self,
        stream: &StreamId,
        record: Option<String>,
    ) -> StoreResult<()> {
        let stream = stream.as_str().to_string();
        self.write(move |c| {
            match record {
                Some(r) => c
                    .prepare_cached(
                        "INSERT OR REPLACE INTO stream_records (stream, record) VALUES (?1, ?2)",
                    )?
                    .execute(rusqlite::params![stream, r])?,
                None => c
                    .prepare_cached("DELETE FROM stream_records WHERE stream = ?1")?
                    .execute([stream])?,
            };
            Ok(Ok(()))
        })
        .await
    }

    async fn put_revocation(&self, r: &crate::Revocation) -> StoreResult<()> {
        let (id, until) = (r.id.clone(), r.until_ms.map(|u| u as i64));
        let record = serde_json::to_string(r).unwrap_or_default();
        self.write(move |c| {
            c.prepare_cached(
                "INSERT OR REPLACE INTO revocations (id, record, until_ms) VALUES (?1, ?2, ?3)",
            )?
            .execute(rusqlite::params![id, record, until])?;
            Ok(Ok(()))
        })
        .await
    }

    async fn delete_revocation(&self, id: &str) -> StoreResult<bool> {
        let (id, now) = (id.to_string(), self.clock.restriction_now_ms() as i64);
        self.write(move |c| {
            // Lapsed ones go too: nothing reads them again.
            c.prepare_cached("DELETE FROM revocations WHERE until_ms <= ?1")?
                .execute([now])?;
            let n = c
                .prepare_cached("DELETE FROM revocations WHERE id = ?1")?
                .execute([id])?;
            Ok(Ok(n > 0))
        })
        .await
    }

    async fn revocations(&self) -> StoreResult<Vec<crate::Revocation>> {
        // A revocation lapses only once both readings of the clock say so.
        let now = self.clock.restriction_now_ms();
        self.readers.run_now(move |c, _| {
            let mut stmt = c.prepare_cached(
                "SELECT record FROM revocations WHERE until_ms IS NULL OR until_ms > ?1",
            )?;
            let rows = stmt.query_map([now as i64], |r| r.get::<_, String>(0))?;
            let mut out = Vec::new();
            for row in rows {
                if let Ok(r) = serde_json::from_str::<crate::Revocation>(&row?) {
                    out.push(r);
                }
            }
            Ok(out)
        })
    }

    async fn touch_session(&self, id: &SessionId, expires_at_ms: u64) -> StoreResult<()> {
        let id = id.clone();
        self.call(|r| Cmd::Touch(id, expires_at_ms, r)).await
    }

    async fn mark_dropped(
        &self,
        id: &SessionId,
        stream: &StreamId,
        through: Seq,
    ) -> StoreResult<()> {
        let (id, stream) = (id.clone(), stream.clone());
        self.call(|r| Cmd::MarkDropped(id, stream, through, r))
            .await
    }

    async fn ping(&self) -> StoreResult<()> {
        if lock(&self.tx).is_none() {
            return Err(closed());
        }
        if !self.up.load(Ordering::Relaxed) {
            return Err(StoreError::Unavailable(
                "the last sqlite commit failed".into(),
            ));
        }
        self.readers
            .run_now(|c, _| c.prepare_cached("SELECT 1")?.query_row([], |_| Ok(())))
    }

    fn corrupt(&self) -> bool {
        self.health.is_corrupt()
    }

    async fn durability(&self) -> StoreDurability {
        StoreDurability::Sqlite {
            synchronous: self.synchronous,
        }
    }

    async fn stats(&self) -> StoreResult<StoreStats> {
        self.readers
            .run(|c, _| {
                let sessions: i64 =
                    c.query_row("SELECT COUNT(*) FROM sessions", [], |r| r.get(0))?;
                let streams: i64 = c.query_row("SELECT COUNT(*) FROM streams", [], |r| r.get(0))?;
                Ok(StoreStats {
                    sessions: sessions as u64,
                    streams: streams as u64,
                })
            })
            .await
    }

    fn presence(&self) -> &dyn crate::PresenceStore {
        &self.presence
    }
}
