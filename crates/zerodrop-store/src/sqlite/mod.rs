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

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use tokio::sync::oneshot;
use zerodrop_core::hash::ChainHash;
use zerodrop_core::retention::{Retention, plan_trim};
use zerodrop_core::{AckUpdate, Epoch, Event, Grants, Seq, SessionId, StreamId, now_ms, utc_stamp};

use crate::memory::apply_checkpoint;
use crate::{
    AppendOutcome, AppendRequest, IdempotencyKey, LiveSink, ReadResult, SessionCap, SessionRecord,
    SessionStream, Store, StoreError, StoreFault, StoreKind, StoreResult, StoreStats, StreamInfo,
};

mod guard;

/// Most commands committed together.
pub const MAX_BATCH: usize = 1024;
/// Rows removed per age sweep at most, so a sweep never holds the writer for long.
const MAX_AGE_SWEEP_ROWS: i64 = 50_000;
/// Streams whose bounds the writer keeps in memory before it starts over.
const MAX_CACHED_STREAMS: usize = 100_000;
const READERS_KEPT: usize = 8;
/// Reads of at most this many events run on the calling thread; larger ones on the blocking
/// pool.
const INLINE_READ_EVENTS: usize = 256;
/// At most one log line per kind of storage failure this often (the line counts the others).
const FAULT_LOG_EVERY: Duration = Duration::from_secs(10);

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
    pub synchronous: Synchronous,
    pub idempotency_ttl_ms: u64,
    /// Sessions are deleted this long after they expired (until then a late resume is told
    /// `RECONNECT_WINDOW_EXPIRED` rather than `SESSION_NOT_FOUND`).
    pub session_grace_ms: u64,
}

impl SqliteOptions {
    pub fn new(path: impl Into<PathBuf>) -> SqliteOptions {
        SqliteOptions {
            path: path.into(),
            retention: Retention::default(),
            synchronous: Synchronous::Full,
            idempotency_ttl_ms: 24 * 3600 * 1000,
            session_grace_ms: 3600 * 1000,
        }
    }
}

type Reply<T> = oneshot::Sender<StoreResult<T>>;

enum Cmd {
    Append(AppendRequest, Reply<AppendOutcome>),
    CreateSession(SessionRecord, SessionCap, Reply<()>),
    PutSessionStream(SessionId, StreamId, SessionStream, Reply<()>),
    RemoveSessionStream(SessionId, StreamId, Reply<()>),
    Checkpoint(SessionId, StreamId, Seq, Reply<AckUpdate>),
    CheckpointMany(Vec<(SessionId, StreamId, Seq)>, Reply<usize>),
    Touch(SessionId, u64, Reply<()>),
    MarkDropped(SessionId, StreamId, Seq, Reply<()>),
    MaxPages(Option<u64>, Reply<u64>),
    /// Any other write (the job queue, the webhook idempotency records).
    Run(Box<dyn WriterOp>),
}

/// A write run by the writer like the log's own commands: inside the batch's transaction,
/// answered after `COMMIT` (or with the batch's error).
trait WriterOp: Send {
    fn apply(self: Box<Self>, conn: &Connection, fx: &mut BatchEffects) -> rusqlite::Result<()>;
    /// The batch failed (or the store refuses every call) before it ran.
    fn refuse(self: Box<Self>, err: &StoreError);
}

/// One write: `run` must not change anything when it answers an `Err` of its own (a refusal
/// such as a stale lease), since the batch commits regardless.
struct Op<T, F> {
    run: F,
    reply: Reply<T>,
}

impl<T, F> WriterOp for Op<T, F>
where
    T: Send + 'static,
    F: FnOnce(&Connection) -> rusqlite::Result<StoreResult<T>> + Send,
{
    fn apply(self: Box<Self>, conn: &Connection, fx: &mut BatchEffects) -> rusqlite::Result<()> {
        let Op { run, reply } = *self;
        settle(fx, reply, Done::other, run(conn))
    }

    fn refuse(self: Box<Self>, err: &StoreError) {
        let _ = self.reply.send(Err(err.clone()));
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
}

impl SqliteStore {
    /// Opens (or creates) the database, quarantining a file that is not a database.
    pub fn open(opts: SqliteOptions, sink: Arc<dyn LiveSink>) -> StoreResult<SqliteStore> {
        let (conn, epoch, quarantined) = open_or_quarantine(&opts)?;
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
        let (tx, rx) = mpsc::channel();
        let mut writer = Writer {
            conn,
            epoch,
            health: health.clone(),
            default_max_pages,
            retention: opts.retention,
            idempotency_ttl_ms: opts.idempotency_ttl_ms,
            session_grace_ms: opts.session_grace_ms,
            sink,
            up: up.clone(),
            commits: commits.clone(),
            cache: HashMap::new(),
            last_ts,
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
        })
    }

    /// Transactions committed by the writer so far (each is one fsync, whatever it held).
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
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
    /// damaged: the store latches into refusing every call ([`StoreFault::Corrupt`]) and logs
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
        drop(lock(&self.tx).take());
        // Readers first, so that the writer's connection is the last one and checkpoints the
        // WAL into the main file as it closes.
        lock(&self.readers.pool).clear();
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

fn configure(conn: &Connection, sync: Synchronous) -> rusqlite::Result<()> {
    conn.busy_timeout(Duration::from_secs(5))?;
    let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(rusqlite::Error::InvalidQuery);
    }
    conn.execute_batch(match sync {
        Synchronous::Full => "PRAGMA synchronous=FULL;",
        Synchronous::Normal => "PRAGMA synchronous=NORMAL;",
    })?;
    conn.execute_batch("PRAGMA temp_store=MEMORY; PRAGMA foreign_keys=OFF;")?;
    Ok(())
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS streams (
    stream TEXT PRIMARY KEY,
    epoch TEXT NOT NULL,
    head INTEGER NOT NULL,
    first_seq INTEGER NOT NULL,
    count INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    last_ts INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    stream TEXT NOT NULL,
    seq INTEGER NOT NULL,
    ts INTEGER NOT NULL,
    json BLOB NOT NULL,
    UNIQUE (stream, seq)
);
CREATE TABLE IF NOT EXISTS idempotency (
    stream TEXT NOT NULL,
    key TEXT NOT NULL,
    fingerprint BLOB NOT NULL,
    seq INTEGER NOT NULL,
    epoch TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    hit_count INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (stream, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS idempotency_created ON idempotency (created_ms);
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    sub TEXT NOT NULL,
    grants TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS sessions_expires ON sessions (expires_ms);
CREATE INDEX IF NOT EXISTS sessions_sub ON sessions (sub, expires_ms);
CREATE TABLE IF NOT EXISTS session_streams (
    session_id TEXT NOT NULL,
    stream TEXT NOT NULL,
    epoch TEXT NOT NULL,
    ack INTEGER NOT NULL,
    dropped_through INTEGER NOT NULL,
    PRIMARY KEY (session_id, stream)
) WITHOUT ROWID;
";

fn init(conn: &Connection, sync: Synchronous) -> rusqlite::Result<Epoch> {
    configure(conn, sync)?;
    conn.execute_batch(SCHEMA)?;
    migrate(conn)?;
    conn.execute_batch(guard::SCHEMA)?;
    let existing: Option<String> = conn
        .query_row("SELECT value FROM meta WHERE key = 'epoch'", [], |r| {
            r.get(0)
        })
        .optional()?;
    if let Some(e) = existing.as_deref().and_then(Epoch::parse) {
        return Ok(e);
    }
    let epoch = Epoch::generate();
    conn.execute(
        "INSERT OR REPLACE INTO meta (key, value) VALUES ('epoch', ?1), ('schema', '1')",
        params![epoch.as_str()],
    )?;
    Ok(epoch)
}

/// Brings a file written by an older version up to [`SCHEMA`], keeping what it holds.
fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    let has_hits = conn
        .prepare("SELECT 1 FROM pragma_table_info('idempotency') WHERE name = 'hit_count'")?
        .exists([])?;
    if !has_hits {
        conn.execute_batch(
            "ALTER TABLE idempotency ADD COLUMN hit_count INTEGER NOT NULL DEFAULT 0",
        )?;
    }
    Ok(())
}

fn is_corruption(e: &rusqlite::Error) -> bool {
    fault_of(e) == Some(StoreFault::Corrupt)
}

/// The storage failure an SQLite error stands for, if it is one.
fn fault_of(e: &rusqlite::Error) -> Option<StoreFault> {
    use rusqlite::ErrorCode as C;
    match e.sqlite_error_code()? {
        C::DiskFull => Some(StoreFault::DiskFull),
        C::NotADatabase | C::DatabaseCorrupt => Some(StoreFault::Corrupt),
        C::SystemIoFailure => Some(StoreFault::Io),
        _ => None,
    }
}

/// `PRAGMA quick_check`: every page and b-tree well formed (`integrity_check` would also
/// compare every index with its table). A damaged file fails as `SQLITE_CORRUPT` with the
/// first problem found.
fn quick_check(conn: &Connection) -> rusqlite::Result<()> {
    let first: String = conn.query_row("PRAGMA quick_check(1)", [], |r| r.get(0))?;
    if first == "ok" {
        return Ok(());
    }
    Err(rusqlite::Error::SqliteFailure(
        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CORRUPT),
        Some(format!("PRAGMA quick_check: {first}")),
    ))
}

fn open_or_quarantine(opts: &SqliteOptions) -> StoreResult<(Connection, Epoch, Option<PathBuf>)> {
    let attempt = || -> rusqlite::Result<(Connection, Epoch)> {
        // A file that does not start like a database is not one, whatever a leftover WAL
        // would make SQLite believe about page 1.
        if !has_database_header(&opts.path) {
            return Err(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_NOTADB),
                Some("the file does not start with the SQLite header".into()),
            ));
        }
        let conn = Connection::open(&opts.path)?;
        // Before anything is written to it: a damaged file is moved aside as it was found.
        quick_check(&conn)?;
        let epoch = init(&conn, opts.synchronous)?;
        Ok((conn, epoch))
    };
    match attempt() {
        Ok((c, e)) => Ok((c, e, None)),
        Err(err) if is_corruption(&err) => {
            let moved = quarantine(&opts.path)?;
            tracing::error!(
                path = %opts.path.display(),
                moved_to = %moved.display(),
                error = %err,
                "the database file is not a usable SQLite database; it was moved aside and a new \
                 one started (every stream gets a new epoch, clients will resync)"
            );
            let (c, e) = attempt().map_err(unavailable)?;
            Ok((c, e, Some(moved)))
        }
        Err(err) => Err(unavailable(err)),
    }
}

/// True for a missing or empty file (SQLite creates it) and for one with the SQLite header.
fn has_database_header(path: &Path) -> bool {
    use std::io::Read;
    let Ok(mut f) = std::fs::File::open(path) else {
        return true;
    };
    let mut head = [0u8; 16];
    match f.read(&mut head) {
        Ok(0) => true,
        Ok(16) => &head == b"SQLite format 3\0",
        _ => false,
    }
}

fn quarantine(path: &Path) -> StoreResult<PathBuf> {
    let stamp = utc_stamp(now_ms());
    let base = path.as_os_str().to_string_lossy().to_string();
    let target = PathBuf::from(format!("{base}.corrupt-{stamp}"));
    std::fs::rename(path, &target)
        .map_err(|e| StoreError::Unavailable(format!("cannot move {base} aside: {e}")))?;
    // A WAL that belonged to the old file must never be applied to the new one.
    for suffix in ["-wal", "-shm"] {
        let side = PathBuf::from(format!("{base}{suffix}"));
        if side.exists() {
            let to = PathBuf::from(format!("{base}.corrupt-{stamp}{suffix}"));
            std::fs::rename(&side, &to)
                .map_err(|e| StoreError::Unavailable(format!("cannot move {base}{suffix}: {e}")))?;
        }
    }
    Ok(target)
}

// ------------------------------------------------------------------------------------ health

/// What the store knows of its file's health, shared by the writer, the readers and
/// [`SqliteStore::check`]: the one place an SQLite failure becomes a [`StoreError`] and a log
/// line.
struct Health {
    path: PathBuf,
    /// Set once the file was found damaged; never cleared (a restart quarantines the file).
    corrupt: AtomicBool,
    logged: Mutex<FaultLog>,
}

/// Per kind of failure: when it was last logged and how many went unlogged since.
#[derive(Default)]
struct FaultLog(HashMap<StoreFault, (Instant, u64)>);

impl FaultLog {
    /// Whether a failure of this kind at `now` gets a log line (`force`: always) and, if so,
    /// how many of its kind went unlogged before it.
    fn admit(&mut self, fault: StoreFault, now: Instant, force: bool) -> Option<u64> {
        match self.0.get_mut(&fault) {
            Some((at, n)) if !force && now.saturating_duration_since(*at) < FAULT_LOG_EVERY => {
                *n += 1;
                None
            }
            Some((at, n)) => {
                let was = *n;
                (*at, *n) = (now, 0);
                Some(was)
            }
            None => {
                self.0.insert(fault, (now, 0));
                Some(0)
            }
        }
    }
}

impl Health {
    fn new(path: PathBuf) -> Health {
        Health {
            path,
            corrupt: AtomicBool::new(false),
            logged: Mutex::new(FaultLog::default()),
        }
    }

    fn is_corrupt(&self) -> bool {
        self.corrupt.load(Ordering::Relaxed)
    }

    /// The error every call gets once the file was found damaged.
    fn refusal(&self) -> Option<StoreError> {
        self.is_corrupt().then(|| StoreError::Fault {
            fault: StoreFault::Corrupt,
            detail: format!(
                "{} is damaged; restart the instance to move it aside",
                self.path.display()
            ),
        })
    }

    /// Classifies a failed SQLite call: a storage failure is logged (at most once per
    /// [`FAULT_LOG_EVERY`] and kind) and, for a damaged file, latched; anything else is
    /// `Unavailable`.
    fn fault(&self, e: rusqlite::Error) -> StoreError {
        let Some(fault) = fault_of(&e) else {
            return unavailable(e);
        };
        let detail = format!("{}: {e}", self.path.display());
        let newly_corrupt =
            fault == StoreFault::Corrupt && !self.corrupt.swap(true, Ordering::Relaxed);
        let admitted = lock(&self.logged).admit(fault, Instant::now(), newly_corrupt);
        if let Some(suppressed) = admitted {
            let path = self.path.display();
            match fault {
                StoreFault::DiskFull => tracing::error!(
                    path = %path, error = %e, fault = fault.as_str(), suppressed,
                    "the disk holding the database is full; publishes and session writes answer \
                     503 STORE_UNAVAILABLE (reads go on, nothing stored is lost) until space is freed"
                ),
                StoreFault::Io => tracing::error!(
                    path = %path, error = %e, fault = fault.as_str(), suppressed,
                    "an I/O error on the database file; the call answered 503 STORE_UNAVAILABLE \
                     and the next one tries again"
                ),
                StoreFault::Corrupt => tracing::error!(
                    path = %path, error = %e, fault = fault.as_str(), suppressed,
                    "the database file is damaged; the instance stops serving it (readiness 503 \
                     store_corrupt, every publish and read 503 STORE_UNAVAILABLE): restart the \
                     instance, whose start-up check moves the file aside and starts a new one \
                     (every stream gets a new epoch)"
                ),
            }
        }
        StoreError::Fault { fault, detail }
    }
}

// ------------------------------------------------------------------------------------ writer

#[derive(Clone)]
struct Meta {
    epoch: Epoch,
    head: u64,
    first: u64,
    count: u64,
    bytes: u64,
    last_ts: u64,
}

struct Writer {
    conn: Connection,
    epoch: Epoch,
    health: Arc<Health>,
    /// `PRAGMA max_page_count` as SQLite set it, restored when a test lifts its cap.
    default_max_pages: u64,
    retention: Retention,
    idempotency_ttl_ms: u64,
    session_grace_ms: u64,
    sink: Arc<dyn LiveSink>,
    up: Arc<AtomicBool>,
    commits: Arc<AtomicU64>,
    cache: HashMap<StreamId, Meta>,
    last_ts: u64,
}

/// A reply to send once the batch's fate is known.
enum Done {
    Append(Reply<AppendOutcome>, StoreResult<AppendOutcome>),
    Unit(Reply<()>, StoreResult<()>),
    Ack(Reply<AckUpdate>, StoreResult<AckUpdate>),
    Count(Reply<usize>, StoreResult<usize>),
    Count64(Reply<u64>, StoreResult<u64>),
    Other(SendReply),
}

/// A [`WriterOp`]'s reply, whatever its type: sends the value, or the batch's error.
type SendReply = Box<dyn FnOnce(Option<&StoreError>) + Send>;

impl Done {
    fn send(self, failure: Option<&StoreError>) {
        // A caller that went away is not an error: the work is done either way.
        match self {
            Done::Append(r, v) => drop(r.send(failure.map_or(v, |e| Err(e.clone())))),
            Done::Unit(r, v) => drop(r.send(failure.map_or(v, |e| Err(e.clone())))),
            Done::Ack(r, v) => drop(r.send(failure.map_or(v, |e| Err(e.clone())))),
            Done::Count(r, v) => drop(r.send(failure.map_or(v, |e| Err(e.clone())))),
            Done::Count64(r, v) => drop(r.send(failure.map_or(v, |e| Err(e.clone())))),
            Done::Other(send) => send(failure),
        }
    }

    fn other<T: Send + 'static>(r: Reply<T>, v: StoreResult<T>) -> Done {
        Done::Other(Box::new(move |failure: Option<&StoreError>| {
            drop(r.send(failure.map_or(v, |e| Err(e.clone()))))
        }))
    }
}

#[derive(Default)]
struct BatchEffects {
    done: Vec<Done>,
    events: Vec<Arc<Event>>,
    trims: Vec<(StreamId, Seq, u64)>,
    touched: HashSet<StreamId>,
}

impl Writer {
    fn run(&mut self, rx: mpsc::Receiver<Cmd>) {
        let tick = Duration::from_millis(500);
        let mut next_sweep = Instant::now() + tick;
        let mut next_slow_sweep = Instant::now();
        loop {
            let wait = next_sweep.saturating_duration_since(Instant::now());
            let mut batch = Vec::new();
            match rx.recv_timeout(wait) {
                Ok(cmd) => batch.push(cmd),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(cmd) => batch.push(cmd),
                    Err(_) => break,
                }
            }
            let now = Instant::now();
            let sweep = now >= next_sweep;
            if sweep {
                next_sweep = now + tick;
            }
            let slow = now >= next_slow_sweep;
            if slow {
                next_slow_sweep = now + Duration::from_secs(60);
            }
            if batch.is_empty() && !sweep && !slow {
                continue;
            }
            self.process(batch, sweep, slow);
        }
    }

    fn process(&mut self, batch: Vec<Cmd>, sweep: bool, slow: bool) {
        if let Some(err) = self.health.refusal() {
            self.up.store(false, Ordering::Relaxed);
            for cmd in batch {
                fail(cmd, &err);
            }
            return;
        }
        let mut fx = BatchEffects::default();
        let mut pending = batch.into_iter();
        let result = (|| -> rusqlite::Result<()> {
            self.conn.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
            for cmd in pending.by_ref() {
                self.apply(cmd, &mut fx)?;
            }
            self.enforce_retention(&mut fx)?;
            if sweep {
                self.sweep_age(&mut fx)?;
            }
            if slow {
                self.sweep_expired()?;
            }
            self.write_meta(&fx)?;
            self.conn.prepare_cached("COMMIT")?.execute([]).map(|_| ())
        })();
        match result {
            Ok(()) => {
                self.up.store(true, Ordering::Relaxed);
                self.commits.fetch_add(1, Ordering::Relaxed);
                // Answer the callers first: a publisher's 201 must not queue behind the wake-ups
                // of every subscriber (its next publish then overlaps this fan-out, and the
                // subscribers find several events per write).
                for d in fx.done {
                    d.send(None);
                }
                if !fx.events.is_empty() {
                    self.sink.committed(&fx.events);
                }
                for (stream, first, count) in &fx.trims {
                    self.sink.trimmed(stream, *first, *count);
                }
                if self.cache.len() > MAX_CACHED_STREAMS {
                    self.cache.clear();
                }
            }
            Err(e) => {
                let _ = self.conn.execute_batch("ROLLBACK");
                self.cache.clear();
                self.last_ts = self.last_ts.max(now_ms());
                let was_up = self.up.swap(false, Ordering::Relaxed);
                if was_up && fault_of(&e).is_none() {
                    tracing::error!(error = %e, "sqlite commit failed; writes answer STORE_UNAVAILABLE until one succeeds");
                }
                let err = self.health.fault(e);
                for d in fx.done {
                    d.send(Some(&err));
                }
                // Commands the failed batch never reached.
                for cmd in pending {
                    fail(cmd, &err);
                }
            }
        }
    }

    /// Runs one command inside the batch's transaction. Its reply joins the batch's whatever
    /// happens, so that a statement that fails (a full disk, a damaged page) answers its own
    /// caller with the batch's error too.
    fn apply(&mut self, cmd: Cmd, fx: &mut BatchEffects) -> rusqlite::Result<()> {
        match cmd {
            Cmd::Append(req, reply) => {
                let r = self.append(req, fx);
                settle(fx, reply, Done::Append, r)
            }
            Cmd::CreateSession(s, cap, reply) => {
                let r = self.create_session(&s, cap);
                settle(fx, reply, Done::Unit, r)
            }
            Cmd::PutSessionStream(id, stream, state, reply) => {
                let r = self.put_session_stream(&id, &stream, &state);
                settle(fx, reply, Done::Unit, r)
            }
            Cmd::RemoveSessionStream(id, stream, reply) => {
                let r = self
                    .conn
                    .prepare_cached(
                        "DELETE FROM session_streams WHERE session_id = ?1 AND stream = ?2",
                    )
                    .and_then(|mut st| st.execute(params![id.as_str(), stream.as_str()]))
                    .map(|_| Ok(()));
                settle(fx, reply, Done::Unit, r)
            }
            Cmd::CheckpointMany(acks, reply) => {
                let r = (|| {
                    let mut applied = 0;
                    for (id, stream, seq) in acks {
                        if let Ok(u) = self.checkpoint(&id, &stream, seq)? {
                            applied += usize::from(u.is_applied());
                        }
                    }
                    Ok(Ok(applied))
                })();
                settle(fx, reply, Done::Count, r)
            }
            Cmd::Checkpoint(id, stream, seq, reply) => {
                let r = self.checkpoint(&id, &stream, seq);
                settle(fx, reply, Done::Ack, r)
            }
            Cmd::Touch(id, expires, reply) => {
                let r = self
                    .conn
                    .prepare_cached("UPDATE sessions SET expires_ms = ?2 WHERE id = ?1")
                    .and_then(|mut st| st.execute(params![id.as_str(), expires as i64]))
                    .map(|_| Ok(()));
                settle(fx, reply, Done::Unit, r)
            }
            Cmd::MarkDropped(id, stream, through, reply) => {
                let r = self
                    .conn
                    .prepare_cached(
                        "UPDATE session_streams SET dropped_through = MAX(dropped_through, ?3)
                         WHERE session_id = ?1 AND stream = ?2",
                    )
                    .and_then(|mut st| {
                        st.execute(params![id.as_str(), stream.as_str(), through.0 as i64])
                    })
                    .map(|_| Ok(()));
                settle(fx, reply, Done::Unit, r)
            }
            Cmd::MaxPages(pages, reply) => {
                let want = pages.unwrap_or(self.default_max_pages).max(1) as i64;
                let r = self
                    .conn
                    .query_row(&format!("PRAGMA max_page_count = {want}"), [], |r| {
                        r.get::<_, i64>(0)
                    })
                    .map(|now| Ok(now.max(0) as u64));
                settle(fx, reply, Done::Count64, r)
            }
            Cmd::Run(op) => op.apply(&self.conn, fx),
        }
    }

    fn meta(&mut self, stream: &StreamId) -> rusqlite::Result<&mut Meta> {
        if !self.cache.contains_key(stream) {
            let m = self
                .conn
                .prepare_cached(
                    "SELECT epoch, head, first_seq, count, bytes, last_ts FROM streams WHERE stream = ?1",
                )?
                .query_row(params![stream.as_str()], |r| {
                    Ok(Meta {
                        epoch: Epoch::parse(&r.get::<_, String>(0)?)
                            .unwrap_or_else(|| self.epoch.clone()),
                        head: r.get::<_, i64>(1)? as u64,
                        first: r.get::<_, i64>(2)? as u64,
                        count: r.get::<_, i64>(3)? as u64,
                        bytes: r.get::<_, i64>(4)? as u64,
                        last_ts: r.get::<_, i64>(5)? as u64,
                    })
                })
                .optional()?
                .unwrap_or_else(|| Meta {
                    epoch: self.epoch.clone(),
                    head: 0,
                    first: 1,
                    count: 0,
                    bytes: 0,
                    last_ts: 0,
                });
            self.cache.insert(stream.clone(), m);
        }
        Ok(self.cache.get_mut(stream).expect("inserted above"))
    }

    fn append(
        &mut self,
        req: AppendRequest,
        fx: &mut BatchEffects,
    ) -> rusqlite::Result<StoreResult<AppendOutcome>> {
        if let Some(k) = &req.idempotency
            && let Some(r) = self.find_idempotent(&req.stream, k)?
        {
            return Ok(r);
        }
        let ts = now_ms().max(self.last_ts);
        self.last_ts = ts;
        let meta = self.meta(&req.stream)?;
        let seq = Seq(meta.head + 1);
        let epoch = meta.epoch.clone();
        let event = Event::encode(req.stream.clone(), seq, epoch.clone(), ts, &req.data);
        let len = event.json().len() as u64;
        meta.head = seq.0;
        meta.count += 1;
        meta.bytes += len;
        meta.last_ts = ts;
        self.conn
            .prepare_cached("INSERT INTO events (stream, seq, ts, json) VALUES (?1, ?2, ?3, ?4)")?
            .execute(params![
                req.stream.as_str(),
                seq.0 as i64,
                ts as i64,
                &event.json()[..]
            ])?;
        if let Some(k) = &req.idempotency {
            self.conn
                .prepare_cached(
                    "INSERT INTO idempotency (stream, key, fingerprint, seq, epoch, created_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )?
                .execute(params![
                    req.stream.as_str(),
                    k.key,
                    &k.fingerprint[..],
                    seq.0 as i64,
                    epoch.as_str(),
                    ts as i64
                ])?;
        }
        fx.touched.insert(req.stream.clone());
        fx.events
            .push(Arc::new(event.with_committed_at(Instant::now())));
        Ok(Ok(AppendOutcome {
            stream: req.stream,
            seq,
            epoch,
            duplicate: false,
        }))
    }

    fn find_idempotent(
        &mut self,
        stream: &StreamId,
        k: &IdempotencyKey,
    ) -> rusqlite::Result<Option<StoreResult<AppendOutcome>>> {
        let found = self
            .conn
            .prepare_cached(
                "SELECT fingerprint, seq, epoch FROM idempotency WHERE stream = ?1 AND key = ?2",
            )?
            .query_row(params![stream.as_str(), k.key], |r| {
                Ok((
                    r.get::<_, Vec<u8>>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                ))
            })
            .optional()?;
        let Some((fp, seq, epoch)) = found else {
            return Ok(None);
        };
        if fp.as_slice() != k.fingerprint.as_slice() {
            return Ok(Some(Err(StoreError::IdempotencyKeyReused)));
        }
        // Counted in the commit that answers the duplicate (the batch commits either way).
        self.conn
            .prepare_cached(
                "UPDATE idempotency SET hit_count = hit_count + 1 WHERE stream = ?1 AND key = ?2",
            )?
            .execute(params![stream.as_str(), k.key])?;
        Ok(Some(Ok(AppendOutcome {
            stream: stream.clone(),
            seq: Seq(seq as u64),
            epoch: Epoch::parse(&epoch).unwrap_or_else(|| self.epoch.clone()),
            duplicate: true,
        })))
    }

    /// Count and size limits, for the streams this batch appended to.
    fn enforce_retention(&mut self, fx: &mut BatchEffects) -> rusqlite::Result<()> {
        let touched: Vec<StreamId> = fx.touched.iter().cloned().collect();
        for stream in touched {
            loop {
                let m = self.meta(&stream)?.clone();
                if m.count <= self.retention.max_events && m.bytes <= self.retention.max_bytes {
                    break;
                }
                let want = (m.count.saturating_sub(self.retention.max_events) as i64).max(64);
                let oldest: Vec<(Seq, u64)> = self
                    .conn
                    .prepare_cached(
                        "SELECT seq, length(json) FROM events WHERE stream = ?1 AND seq >= ?2
                         ORDER BY seq LIMIT ?3",
                    )?
                    .query_map(params![stream.as_str(), m.first as i64, want], |r| {
                        Ok((Seq(r.get::<_, i64>(0)? as u64), r.get::<_, i64>(1)? as u64))
                    })?
                    .collect::<rusqlite::Result<_>>()?;
                let fetched = oldest.len();
                let Some(trim) = plan_trim(m.count, m.bytes, &self.retention, oldest) else {
                    break;
                };
                self.conn
                    .prepare_cached("DELETE FROM events WHERE stream = ?1 AND seq <= ?2")?
                    .execute(params![stream.as_str(), trim.through.0 as i64])?;
                let meta = self.meta(&stream)?;
                meta.first = trim.through.0 + 1;
                meta.count -= trim.count;
                meta.bytes -= trim.bytes;
                record_trim(fx, &stream, Seq(meta.first), trim.count);
                if (trim.count as usize) < fetched {
                    break;
                }
            }
        }
        Ok(())
    }

    /// Age limit: a prefix of the table in rowid order, because `ts` never goes backwards.
    fn sweep_age(&mut self, fx: &mut BatchEffects) -> rusqlite::Result<()> {
        let cutoff = now_ms().saturating_sub(self.retention.max_age_ms) as i64;
        let oldest: Option<(i64, i64)> = self
            .conn
            .prepare_cached("SELECT id, ts FROM events ORDER BY id LIMIT 1")?
            .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        let Some((first_id, first_ts)) = oldest else {
            return Ok(());
        };
        if first_ts >= cutoff {
            return Ok(());
        }
        let boundary: Option<i64> = self
            .conn
            .prepare_cached("SELECT id FROM events WHERE ts >= ?1 ORDER BY id LIMIT 1")?
            .query_row(params![cutoff], |r| r.get(0))
            .optional()?;
        let last_expired = match boundary {
            Some(b) => b - 1,
            None => self
                .conn
                .query_row("SELECT MAX(id) FROM events", [], |r| r.get(0))?,
        };
        let upto = last_expired.min(first_id + MAX_AGE_SWEEP_ROWS);
        let groups: Vec<(String, i64, i64, i64)> = self
            .conn
            .prepare_cached(
                "SELECT stream, MAX(seq), COUNT(*), SUM(length(json)) FROM events
                 WHERE id <= ?1 GROUP BY stream",
            )?
            .query_map(params![upto], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })?
            .collect::<rusqlite::Result<_>>()?;
        self.conn
            .prepare_cached("DELETE FROM events WHERE id <= ?1")?
            .execute(params![upto])?;
        for (stream, max_seq, count, bytes) in groups {
            let Ok(stream) = StreamId::new(&stream) else {
                continue;
            };
            let meta = self.meta(&stream)?;
            meta.first = meta.first.max(max_seq as u64 + 1);
            meta.count = meta.count.saturating_sub(count as u64);
            meta.bytes = meta.bytes.saturating_sub(bytes as u64);
            let first = Seq(meta.first);
            fx.touched.insert(stream.clone());
            record_trim(fx, &stream, first, count as u64);
        }
        Ok(())
    }

    fn sweep_expired(&mut self) -> rusqlite::Result<()> {
        let now = now_ms();
        let idem_cut = now.saturating_sub(self.idempotency_ttl_ms) as i64;
        self.conn.execute(
            "DELETE FROM idempotency WHERE created_ms < ?1",
            params![idem_cut],
        )?;
        guard::sweep_expired(&self.conn, now)?;
        let sess_cut = now.saturating_sub(self.session_grace_ms) as i64;
        self.conn.execute(
            "DELETE FROM session_streams WHERE session_id IN
             (SELECT id FROM sessions WHERE expires_ms < ?1)",
            params![sess_cut],
        )?;
        self.conn.execute(
            "DELETE FROM sessions WHERE expires_ms < ?1",
            params![sess_cut],
        )?;
        Ok(())
    }

    fn write_meta(&mut self, fx: &BatchEffects) -> rusqlite::Result<()> {
        for stream in &fx.touched {
            let Some(m) = self.cache.get(stream) else {
                continue;
            };
            self.conn
                .prepare_cached(
                    "INSERT INTO streams (stream, epoch, head, first_seq, count, bytes, last_ts)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                     ON CONFLICT (stream) DO UPDATE SET epoch = ?2, head = ?3, first_seq = ?4,
                       count = ?5, bytes = ?6, last_ts = ?7",
                )?
                .execute(params![
                    stream.as_str(),
                    m.epoch.as_str(),
                    m.head as i64,
                    m.first as i64,
                    m.count as i64,
                    m.bytes as i64,
                    m.last_ts as i64
                ])?;
        }
        Ok(())
    }

    /// Counted and written by the single writer inside its transaction: no other session can
    /// be created between the count and the insert.
    fn create_session(
        &mut self,
        s: &SessionRecord,
        cap: SessionCap,
    ) -> rusqlite::Result<StoreResult<()>> {
        if cap != SessionCap::NONE {
            let now = now_ms();
            let (live, earliest): (i64, Option<i64>) = self
                .conn
                .prepare_cached(
                    "SELECT COUNT(*), MIN(expires_ms) FROM sessions
                     WHERE sub = ?1 AND expires_ms > ?2 AND id != ?3",
                )?
                .query_row(params![s.sub, now as i64, s.id.as_str()], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })?;
            let earliest = earliest.map_or(now, |e| e.max(0) as u64);
            if let Err(e) = cap.check(live.max(0) as u64, earliest, now) {
                return Ok(Err(e));
            }
        }
        let grants = serde_json::to_string(&s.grants).unwrap_or_else(|_| "{}".into());
        self.conn
            .prepare_cached(
                "INSERT OR REPLACE INTO sessions (id, sub, grants, created_ms, expires_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![
                s.id.as_str(),
                s.sub,
                grants,
                s.created_at_ms as i64,
                s.expires_at_ms as i64
            ])?;
        for (stream, st) in &s.streams {
            self.write_session_stream(&s.id, stream, st)?;
        }
        Ok(Ok(()))
    }

    fn session_exists(&mut self, id: &SessionId) -> rusqlite::Result<bool> {
        Ok(self
            .conn
            .prepare_cached("SELECT 1 FROM sessions WHERE id = ?1")?
            .query_row(params![id.as_str()], |_| Ok(()))
            .optional()?
            .is_some())
    }

    fn put_session_stream(
        &mut self,
        id: &SessionId,
        stream: &StreamId,
        st: &SessionStream,
    ) -> rusqlite::Result<StoreResult<()>> {
        if !self.session_exists(id)? {
            return Ok(Err(StoreError::SessionNotFound));
        }
        self.write_session_stream(id, stream, st)?;
        Ok(Ok(()))
    }

    fn write_session_stream(
        &mut self,
        id: &SessionId,
        stream: &StreamId,
        st: &SessionStream,
    ) -> rusqlite::Result<()> {
        self.conn
            .prepare_cached(
                "INSERT INTO session_streams (session_id, stream, epoch, ack, dropped_through)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (session_id, stream) DO UPDATE SET
                   ack = CASE WHEN epoch = excluded.epoch THEN MAX(ack, excluded.ack) ELSE excluded.ack END,
                   dropped_through = CASE WHEN epoch = excluded.epoch
                     THEN MAX(dropped_through, excluded.dropped_through) ELSE excluded.dropped_through END,
                   epoch = excluded.epoch",
            )?
            .execute(params![
                id.as_str(),
                stream.as_str(),
                st.epoch.as_str(),
                st.ack.0 as i64,
                st.dropped_through.0 as i64
            ])?;
        Ok(())
    }

    fn checkpoint(
        &mut self,
        id: &SessionId,
        stream: &StreamId,
        seq: Seq,
    ) -> rusqlite::Result<StoreResult<AckUpdate>> {
        let row = self
            .conn
            .prepare_cached(
                "SELECT epoch, ack, dropped_through FROM session_streams
                 WHERE session_id = ?1 AND stream = ?2",
            )?
            .query_row(params![id.as_str(), stream.as_str()], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            })
            .optional()?;
        let Some((epoch, ack, dropped)) = row else {
            return Ok(Err(if self.session_exists(id)? {
                StoreError::NotInSession
            } else {
                StoreError::SessionNotFound
            }));
        };
        let mut ss = SessionStream {
            epoch: Epoch::parse(&epoch).unwrap_or_else(|| self.epoch.clone()),
            ack: Seq(ack as u64),
            dropped_through: Seq(dropped as u64),
        };
        let m = self.meta(stream)?.clone();
        let info = meta_info(stream, &m);
        let update = match apply_checkpoint(&mut ss, &info, seq) {
            Ok(u) => u,
            Err(e) => return Ok(Err(e)),
        };
        if update.is_applied() {
            self.conn
                .prepare_cached(
                    "UPDATE session_streams SET ack = ?3 WHERE session_id = ?1 AND stream = ?2",
                )?
                .execute(params![
                    id.as_str(),
                    stream.as_str(),
                    update.last_ack().0 as i64
                ])?;
        }
        Ok(Ok(update))
    }
}

/// Adds a command's reply to the batch's; a statement that failed fails the batch (the batch's
/// error then answers every reply, this one included).
fn settle<T>(
    fx: &mut BatchEffects,
    reply: Reply<T>,
    done: fn(Reply<T>, StoreResult<T>) -> Done,
    r: rusqlite::Result<StoreResult<T>>,
) -> rusqlite::Result<()> {
    match r {
        Ok(v) => {
            fx.done.push(done(reply, v));
            Ok(())
        }
        Err(e) => {
            fx.done.push(done(reply, Err(closed())));
            Err(e)
        }
    }
}

fn record_trim(fx: &mut BatchEffects, stream: &StreamId, first: Seq, count: u64) {
    match fx.trims.iter_mut().find(|(s, _, _)| s == stream) {
        Some(t) => {
            t.1 = first;
            t.2 += count;
        }
        None => fx.trims.push((stream.clone(), first, count)),
    }
}

fn meta_info(stream: &StreamId, m: &Meta) -> StreamInfo {
    StreamInfo {
        stream: stream.clone(),
        epoch: m.epoch.clone(),
        head: Seq(m.head),
        first_seq: Seq(m.first),
        count: m.count,
        bytes: m.bytes,
    }
}

fn fail(cmd: Cmd, err: &StoreError) {
    fn send<T>(r: Reply<T>, err: &StoreError) {
        let _ = r.send(Err(err.clone()));
    }
    match cmd {
        Cmd::Append(_, r) => send(r, err),
        Cmd::CreateSession(_, _, r)
        | Cmd::PutSessionStream(_, _, _, r)
        | Cmd::RemoveSessionStream(_, _, r)
        | Cmd::Touch(_, _, r)
        | Cmd::MarkDropped(_, _, _, r) => send(r, err),
        Cmd::Checkpoint(_, _, _, r) => send(r, err),
        Cmd::CheckpointMany(_, r) => send(r, err),
        Cmd::MaxPages(_, r) => send(r, err),
        Cmd::Run(op) => op.refuse(err),
    }
}

// ----------------------------------------------------------------------------------- readers

struct Readers {
    path: PathBuf,
    epoch: Epoch,
    pool: Mutex<Vec<Connection>>,
    health: Arc<Health>,
}

impl Readers {
    fn open(&self) -> rusqlite::Result<Connection> {
        let conn = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY
                | OpenFlags::SQLITE_OPEN_NO_MUTEX
                | OpenFlags::SQLITE_OPEN_URI,
        )?;
        conn.busy_timeout(Duration::from_secs(5))?;
        Ok(conn)
    }

    fn with<R>(&self, f: impl FnOnce(&mut Connection) -> rusqlite::Result<R>) -> StoreResult<R> {
        if let Some(err) = self.health.refusal() {
            return Err(err);
        }
        let pooled = lock(&self.pool).pop();
        let mut conn = match pooled {
            Some(c) => c,
            None => self.open().map_err(|e| self.health.fault(e))?,
        };
        let r = f(&mut conn);
        if r.is_ok() {
            let mut pool = lock(&self.pool);
            if pool.len() < READERS_KEPT {
                pool.push(conn);
            }
        }
        r.map_err(|e| self.health.fault(e))
    }

    /// Runs a small read on this thread: a WAL read of a few pages costs far less than the two
    /// thread hand-offs of the blocking pool (on one core those dominated resume storms).
    fn run_now<R>(
        &self,
        f: impl FnOnce(&mut Connection, &Epoch) -> rusqlite::Result<R>,
    ) -> StoreResult<R> {
        self.with(|c| f(c, &self.epoch))
    }

    /// Runs a read that may touch many rows on the blocking pool.
    async fn run<R: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&mut Connection, &Epoch) -> rusqlite::Result<R> + Send + 'static,
    ) -> StoreResult<R> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.with(|c| f(c, &me.epoch)))
            .await
            .map_err(|e| StoreError::Unavailable(format!("reader task failed: {e}")))?
    }
}

/// Runs `f` in one read transaction (one WAL snapshot), with cached `BEGIN`/`COMMIT`.
fn snapshot<R>(
    c: &Connection,
    f: impl FnOnce(&Connection) -> rusqlite::Result<R>,
) -> rusqlite::Result<R> {
    c.prepare_cached("BEGIN")?.execute([])?;
    let r = f(c);
    let end = if r.is_ok() { "COMMIT" } else { "ROLLBACK" };
    c.prepare_cached(end)?.execute([])?;
    r
}

fn read_events(
    c: &Connection,
    stream: &StreamId,
    epoch: &Epoch,
    after: Seq,
    limit: usize,
) -> rusqlite::Result<ReadResult> {
    snapshot(c, |c| {
        let info = read_info(c, stream, epoch)?;
        let mut events = Vec::new();
        let mut stmt = c.prepare_cached(
            "SELECT seq, ts, json FROM events WHERE stream = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
        )?;
        let rows = stmt.query_map(
            params![stream.as_str(), after.0 as i64, limit as i64],
            |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, Vec<u8>>(2)?,
                ))
            },
        )?;
        for row in rows {
            let (seq, ts, json) = row?;
            events.push(Arc::new(Event::from_stored(
                stream.clone(),
                Seq(seq as u64),
                info.epoch.clone(),
                ts as u64,
                Bytes::from(json),
            )));
        }
        Ok(ReadResult { info, events })
    })
}

fn read_info(conn: &Connection, stream: &StreamId, epoch: &Epoch) -> rusqlite::Result<StreamInfo> {
    let row = conn
        .prepare_cached(
            "SELECT epoch, head, first_seq, count, bytes FROM streams WHERE stream = ?1",
        )?
        .query_row(params![stream.as_str()], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, i64>(4)?,
            ))
        })
        .optional()?;
    Ok(match row {
        Some((e, head, first, count, bytes)) => StreamInfo {
            stream: stream.clone(),
            epoch: Epoch::parse(&e).unwrap_or_else(|| epoch.clone()),
            head: Seq(head as u64),
            first_seq: Seq(first as u64),
            count: count as u64,
            bytes: bytes as u64,
        },
        None => StreamInfo::empty(stream.clone(), epoch.clone()),
    })
}

fn read_session(conn: &Connection, id: &SessionId) -> rusqlite::Result<Option<SessionRecord>> {
    let row = conn
        .prepare_cached("SELECT sub, grants, created_ms, expires_ms FROM sessions WHERE id = ?1")?
        .query_row(params![id.as_str()], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, i64>(3)?,
            ))
        })
        .optional()?;
    let Some((sub, grants, created, expires)) = row else {
        return Ok(None);
    };
    let mut streams = BTreeMap::new();
    let mut stmt = conn.prepare_cached(
        "SELECT stream, epoch, ack, dropped_through FROM session_streams WHERE session_id = ?1",
    )?;
    let rows = stmt.query_map(params![id.as_str()], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, i64>(2)?,
            r.get::<_, i64>(3)?,
        ))
    })?;
    for row in rows {
        let (stream, epoch, ack, dropped) = row?;
        let (Ok(stream), Some(epoch)) = (StreamId::new(&stream), Epoch::parse(&epoch)) else {
            continue;
        };
        streams.insert(
            stream,
            SessionStream {
                epoch,
                ack: Seq(ack as u64),
                dropped_through: Seq(dropped as u64),
            },
        );
    }
    Ok(Some(SessionRecord {
        id: id.clone(),
        sub,
        grants: serde_json::from_str::<Grants>(&grants).unwrap_or_default(),
        created_at_ms: created as u64,
        expires_at_ms: expires as u64,
        streams,
    }))
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
        self.readers.run_now(|c, epoch| read_info(c, stream, epoch))
    }

    async fn read(&self, stream: &StreamId, after: Seq, limit: usize) -> StoreResult<ReadResult> {
        if limit <= INLINE_READ_EVENTS {
            return self
                .readers
                .run_now(|c, epoch| read_events(c, stream, epoch, after, limit));
        }
        let stream = stream.clone();
        self.readers
            .run(move |c, epoch| read_events(c, &stream, epoch, after, limit))
            .await
    }

    async fn digest(&self, stream: &StreamId) -> StoreResult<(StreamInfo, String)> {
        let stream = stream.clone();
        self.readers
            .run(move |c, epoch| {
                snapshot(c, |c| {
                    let info = read_info(c, &stream, epoch)?;
                    let mut h = ChainHash::default();
                    let mut stmt =
                        c.prepare_cached("SELECT json FROM events WHERE stream = ?1 ORDER BY seq")?;
                    let mut rows = stmt.query(params![stream.as_str()])?;
                    while let Some(r) = rows.next()? {
                        h.push(r.get_ref(0)?.as_blob()?);
                    }
                    Ok((info, h.hex()))
                })
            })
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
        self.readers.run_now(|c, _| read_session(c, id))
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(code: i32) -> rusqlite::Error {
        rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(code), None)
    }

    #[test]
    fn sqlite_failures_map_to_faults() {
        use rusqlite::ffi;
        assert_eq!(
            fault_of(&failure(ffi::SQLITE_FULL)),
            Some(StoreFault::DiskFull)
        );
        assert_eq!(
            fault_of(&failure(ffi::SQLITE_CORRUPT)),
            Some(StoreFault::Corrupt)
        );
        assert_eq!(
            fault_of(&failure(ffi::SQLITE_NOTADB)),
            Some(StoreFault::Corrupt)
        );
        for io in [
            ffi::SQLITE_IOERR,
            ffi::SQLITE_IOERR_READ,
            ffi::SQLITE_IOERR_WRITE,
            ffi::SQLITE_IOERR_FSYNC,
            ffi::SQLITE_IOERR_SHORT_READ,
        ] {
            assert_eq!(fault_of(&failure(io)), Some(StoreFault::Io), "code {io}");
        }
        assert_eq!(fault_of(&failure(ffi::SQLITE_BUSY)), None);
        assert_eq!(fault_of(&rusqlite::Error::InvalidQuery), None);
    }

    #[test]
    fn a_failure_is_classified_once_and_a_damaged_file_latches() {
        let h = Health::new(PathBuf::from("/data/zerodrop.db"));
        match h.fault(failure(rusqlite::ffi::SQLITE_IOERR_WRITE)) {
            StoreError::Fault { fault, detail } => {
                assert_eq!(fault, StoreFault::Io);
                assert!(detail.starts_with("/data/zerodrop.db: "), "{detail}");
            }
            other => panic!("{other:?}"),
        }
        assert!(h.refusal().is_none(), "an I/O error does not latch");
        assert!(matches!(
            h.fault(failure(rusqlite::ffi::SQLITE_BUSY)),
            StoreError::Unavailable(_)
        ));
        let _ = h.fault(failure(rusqlite::ffi::SQLITE_CORRUPT));
        assert!(h.is_corrupt());
        assert!(matches!(
            h.refusal(),
            Some(StoreError::Fault {
                fault: StoreFault::Corrupt,
                ..
            })
        ));
    }

    #[test]
    fn failures_of_one_kind_are_logged_once_per_period_with_a_count() {
        let mut log = FaultLog::default();
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        assert_eq!(log.admit(StoreFault::DiskFull, t0, false), Some(0));
        for i in 1..=500 {
            assert_eq!(log.admit(StoreFault::DiskFull, t0 + ms(i), false), None);
        }
        // Another kind has its own budget; a newly damaged file is always told.
        assert_eq!(log.admit(StoreFault::Io, t0 + ms(10), false), Some(0));
        assert_eq!(log.admit(StoreFault::Io, t0 + ms(20), true), Some(0));
        assert_eq!(
            log.admit(StoreFault::DiskFull, t0 + FAULT_LOG_EVERY, false),
            Some(500)
        );
        assert_eq!(
            log.admit(StoreFault::DiskFull, t0 + FAULT_LOG_EVERY + ms(1), false),
            None
        );
    }
}
