//! The WAL checkpointer: copying committed pages from the write-ahead log back into the
//! database file, on a thread and connection of its own, so that the writer's commits never
//! wait for it.
//!
//! SQLite's default runs a checkpoint inside the commit that grows the log past 1,000 pages
//! (4 MB), on the writer: every few thousand events a commit also copied the log, and the
//! pages every commit touches (a stream's row, the index's right edge) were copied again each
//! time. Here the writer's WAL hook only counts the log's pages and, past
//! [`CHECKPOINT_PAGES`] (`SqliteOptions::checkpoint_pages`), wakes this thread, which runs a `PASSIVE` checkpoint: it copies what
//! no reader still needs and never blocks the writer or a reader (docs/benchmarks.md, "Batch
//! publish", has the figures). When the log grows past four times that anyway
//! (this thread stalled, or a reader held an old snapshot for long), the writer checkpoints in
//! its commit as SQLite would, so the log stays bounded whatever happens here.
//!
//! Must not: change what the database holds (a checkpoint only moves committed pages), or
//! answer anyone: durability is the writer's `COMMIT` (the log is synced there).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::Connection;
use rusqlite::wal::CheckpointMode;

use super::health::Health;

/// Log pages (of 4 KiB by default) after which the checkpointer is woken: 32 MiB.
pub const CHECKPOINT_PAGES: u64 = 8192;

/// The log grows to this many times the threshold before the writer checkpoints itself.
const WRITER_FACTOR: u64 = 4;

/// A log that holds pages is checkpointed at least this often, so that a slowly written or
/// idle instance's file holds everything and its log is short to replay.
const PERIOD: Duration = Duration::from_secs(2);

/// What the writer and the checkpointer share.
#[derive(Default)]
pub(super) struct WalState {
    /// Pages in the log after the latest commit (as the WAL hook reports them).
    pub pages: AtomicU64,
    /// Checkpoints the checkpointer ran (for tests and the bench).
    pub checkpoints: AtomicU64,
    /// Set by the store's close: the checkpointer ends at its next wake-up.
    pub stop: AtomicBool,
}

/// The running checkpointer: how to wake it, and its thread.
pub(super) struct Checkpointer {
    state: Arc<WalState>,
    wake: mpsc::SyncSender<()>,
    thread: JoinHandle<()>,
}

impl Checkpointer {
    /// Stops the thread and waits for it, so that its connection is closed before the
    /// writer's (the last connection folds the rest of the log into the file as it closes).
    pub(super) fn stop(self) {
        self.state.stop.store(true, Ordering::Relaxed);
        // Full means a wake-up is pending already: the thread sees `stop` with it.
        let _ = self.wake.try_send(());
        let _ = self.thread.join();
    }
}

/// Installs the writer's WAL hook: counts the log's pages after each commit, wakes the
/// checkpointer past `threshold`, and checkpoints itself past four times that. Replaces SQLite's automatic checkpoint on this connection.
pub(super) fn hook(
    conn: &mut Connection,
    state: Arc<WalState>,
    wake: mpsc::SyncSender<()>,
    threshold: u64,
) -> rusqlite::Result<()> {
    conn.wal_hook(Some(move |wal: &mut rusqlite::hooks::Wal, pages: i32| {
        let pages = pages.max(0) as u64;
        state.pages.store(pages, Ordering::Relaxed);
        if pages >= threshold.saturating_mul(WRITER_FACTOR) {
            // Best effort, as SQLite's own automatic checkpoint: a failure here is not the
            // commit's (it is durable already) and the next commit tries again.
            let _ = wal.checkpoint_v2(CheckpointMode::PASSIVE);
        } else if pages >= threshold {
            // Full means a wake-up is pending already.
            let _ = wake.try_send(());
        }
        Ok(())
    }))
}

/// Starts the checkpointer on its own connection to the same file; `wake` is the sender the
/// writer's hook holds a clone of.
pub(super) fn start(
    conn: Connection,
    state: Arc<WalState>,
    wake: (mpsc::SyncSender<()>, mpsc::Receiver<()>),
    health: Arc<Health>,
) -> std::io::Result<Checkpointer> {
    let (sender, woken) = wake;
    let shared = state.clone();
    let thread = std::thread::Builder::new()
        .name("zerodrop-sqlite-checkpoint".into())
        .spawn(move || run(conn, &shared, &woken, &health))?;
    Ok(Checkpointer {
        state,
        wake: sender,
        thread,
    })
}

fn run(conn: Connection, state: &WalState, wake: &mpsc::Receiver<()>, health: &Health) {
    loop {
        let woken = match wake.recv_timeout(PERIOD) {
            Ok(()) => true,
            Err(mpsc::RecvTimeoutError::Timeout) => false,
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        };
        if state.stop.load(Ordering::Relaxed) {
            return;
        }
        if !woken && state.pages.load(Ordering::Relaxed) == 0 {
            continue;
        }
        match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
            Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
        }) {
            Ok((log, done)) => {
                state.checkpoints.fetch_add(1, Ordering::Relaxed);
                if !woken && log == done {
                    // Everything is in the file; stay quiet until the next commit says more.
                    state.pages.store(0, Ordering::Relaxed);
                }
            }
            // Classified and logged once per fault kind, as the writer's failures are (a
            // damaged file latches the store); the next wake-up tries again.
            Err(e) => drop(health.fault(e)),
        }
    }
}
