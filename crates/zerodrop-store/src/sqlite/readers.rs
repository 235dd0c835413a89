//! The read connections: read-only, WAL (they never wait for the writer), pooled, each read
//! in one transaction so that bounds and events come from one snapshot. Small reads run on the
//! calling thread, large ones on tokio's blocking pool.
//!
//! Must not: write, or hand out a connection while the file is latched as damaged.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};
use zerodrop_core::Epoch;

use super::health::Health;
use super::lock;
use crate::{StoreError, StoreResult};

const READERS_KEPT: usize = 8;

pub(super) struct Readers {
    pub(super) path: PathBuf,
    pub(super) epoch: Epoch,
    pub(super) pool: Mutex<Vec<Connection>>,
    pub(super) health: Arc<Health>,
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
    pub(super) fn run_now<R>(
        &self,
        f: impl FnOnce(&mut Connection, &Epoch) -> rusqlite::Result<R>,
    ) -> StoreResult<R> {
        self.with(|c| f(c, &self.epoch))
    }

    /// Runs a read that may touch many rows on the blocking pool.
    pub(super) async fn run<R: Send + 'static>(
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
pub(super) fn snapshot<R>(
    c: &Connection,
    f: impl FnOnce(&Connection) -> rusqlite::Result<R>,
) -> rusqlite::Result<R> {
    c.prepare_cached("BEGIN")?.execute([])?;
    let r = f(c);
    let end = if r.is_ok() { "COMMIT" } else { "ROLLBACK" };
    c.prepare_cached(end)?.execute([])?;
    r
}
