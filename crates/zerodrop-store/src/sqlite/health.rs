//! What the store knows of its file's health: the one place an SQLite failure becomes a
//! [`StoreError`] (a [`StoreFault`] or `Unavailable`) and a log line (at most one per kind of
//! failure every [`FAULT_LOG_EVERY`]), the latch a damaged file sets, and `PRAGMA
//! quick_check`.
//!
//! Must not: retry anything, or clear the corruption latch (only a restart, which quarantines
//! the file, does).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rusqlite::Connection;

use super::{lock, unavailable};
use crate::{StoreError, StoreFault};

/// At most one log line per kind of storage failure this often (the line counts the others).
const FAULT_LOG_EVERY: Duration = Duration::from_secs(10);

pub(super) fn is_corruption(e: &rusqlite::Error) -> bool {
    fault_of(e) == Some(StoreFault::Corrupt)
}

/// The storage failure an SQLite error stands for, if it is one.
pub(super) fn fault_of(e: &rusqlite::Error) -> Option<StoreFault> {
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
pub(super) fn quick_check(conn: &Connection) -> rusqlite::Result<()> {
    let first: String = conn.query_row("PRAGMA quick_check(1)", [], |r| r.get(0))?;
    if first == "ok" {
        return Ok(());
    }
    Err(rusqlite::Error::SqliteFailure(
        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CORRUPT),
        Some(format!("PRAGMA quick_check: {first}")),
    ))
}

/// What the store knows of its file's health, shared by the writer, the readers and
/// [`SqliteStore::check`](super::SqliteStore::check): the one place an SQLite failure becomes a [`StoreError`] and a log
/// line.
pub(super) struct Health {
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
    pub(super) fn new(path: PathBuf) -> Health {
        Health {
            path,
            corrupt: AtomicBool::new(false),
            logged: Mutex::new(FaultLog::default()),
        }
    }

    pub(super) fn is_corrupt(&self) -> bool {
        self.corrupt.load(Ordering::Relaxed)
    }

    /// The error every call gets once the file was found damaged.
    pub(super) fn refusal(&self) -> Option<StoreError> {
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
    pub(super) fn fault(&self, e: rusqlite::Error) -> StoreError {
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
