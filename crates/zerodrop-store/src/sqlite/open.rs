//! Opening the database file: the connection's pragmas (WAL, `synchronous`, and reading back
//! the `synchronous` in force: the store's durability level), the schema and its migrations,
//! the epoch kept in `meta`, and moving aside a file that is not a usable database so that a
//! new one (with a new epoch) takes its place.
//!
//! Must not: run after start-up (a file found damaged later is latched by `health.rs` and
//! moved aside by the next start), or drop a file it cannot read: it is renamed, never deleted.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};
use zerodrop_core::{Epoch, now_ms, utc_stamp};

use super::health::{is_corruption, quick_check};
use super::{SqliteOptions, Synchronous, chunk, guard, unavailable};
use crate::{StoreError, StoreResult};

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

/// The writer's page cache, in KiB. SQLite's default (2 MiB) is smaller than what one of the
/// writer's transactions touches under load (thousands of appends, and the trims of the
/// streams at their retention limit), so dirty pages spilled to the WAL in the middle of the
/// transaction, and the same pages were written again at `COMMIT`. The cache grows only as
/// pages are used.
const WRITER_CACHE_KIB: i64 = 64 * 1024;

/// Sizes the writer's page cache ([`WRITER_CACHE_KIB`]).
pub(super) fn writer_cache(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(&format!("PRAGMA cache_size = -{WRITER_CACHE_KIB};"))
}

/// The checkpointer's own connection to the file: the same pragmas as the writer's (its
/// `synchronous` is what syncs the file after a checkpoint).
pub(super) fn checkpoint_connection(
    path: &Path,
    sync: Synchronous,
) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    configure(&conn, sync)?;
    Ok(conn)
}

/// `PRAGMA synchronous` as the connection reports it (0 `OFF` … 3 `EXTRA`): what the level
/// is read from, rather than the option that asked for it.
pub(super) fn synchronous(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row("PRAGMA synchronous", [], |r| r.get(0))
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
    last_ts INTEGER NOT NULL,
    closed INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY,
    stream TEXT NOT NULL,
    seq INTEGER NOT NULL,
    last INTEGER NOT NULL,
    last_ts INTEGER NOT NULL,
    body BLOB NOT NULL,
    UNIQUE (stream, last)
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
CREATE TABLE IF NOT EXISTS stream_records (
    stream TEXT PRIMARY KEY,
    record TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS revocations (
    id TEXT PRIMARY KEY,
    record TEXT NOT NULL,
    until_ms INTEGER
) WITHOUT ROWID;
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
        "INSERT OR REPLACE INTO meta (key, value) VALUES ('epoch', ?1), ('schema', '2')",
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
    let has_closed = conn
        .prepare("SELECT 1 FROM pragma_table_info('streams') WHERE name = 'closed'")?
        .exists([])?;
    if !has_closed {
        conn.execute_batch("ALTER TABLE streams ADD COLUMN closed INTEGER NOT NULL DEFAULT 0")?;
    }
    let has_event_rows = conn
        .prepare("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'events'")?
        .exists([])?;
    if has_event_rows {
        // A file from before chunks (`chunk.rs`): each event row becomes a chunk of one, in
        // the same order, in one transaction.
        let tx = conn.unchecked_transaction()?;
        {
            let mut rows = tx.prepare("SELECT stream, seq, ts, json FROM events ORDER BY id")?;
            let mut rows = rows.query([])?;
            while let Some(r) = rows.next()? {
                let stream: String = r.get(0)?;
                let seq = r.get::<_, i64>(1)?.max(0) as u64;
                let ts = r.get::<_, i64>(2)?.max(0) as u64;
                chunk::insert_one(&tx, &stream, seq, ts, r.get_ref(3)?.as_blob()?)?;
            }
        }
        tx.execute_batch("DROP TABLE events; UPDATE meta SET value = '2' WHERE key = 'schema';")?;
        tx.commit()?;
    }
    Ok(())
}

pub(super) fn open_or_quarantine(
    opts: &SqliteOptions,
) -> StoreResult<(Connection, Epoch, Option<PathBuf>)> {
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
        // A log left by a process that did not close its store (a crash, `kill -9`) is folded
        // into the file now: from here on the file holds every page, so the scheduled damage
        // check reads what is on disk rather than the log's copies, and the checkpointer
        // starts from an empty log.
        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
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
