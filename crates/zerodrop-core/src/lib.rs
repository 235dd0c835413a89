//! zerodrop's domain model, free of I/O.
//!
//! Everything here is a rule that every transport and every store must apply the same way:
//! what a stream id may look like ([`StreamId`]), how an event is encoded once and shared
//! ([`Event`]), how a byte payload sits in it ([`payload`]), when a checkpoint moves ([`checkpoint`]), which events a resume replays
//! ([`window`]), what retention trims ([`retention`]), which stream pattern's settings apply ([`policy`]), how resume tokens are signed
//! ([`token`]), which error codes exist ([`ErrorCode`]) and what time it is where something
//! expires or is trimmed ([`clock`]). Stores and the server call these
//! functions; they never re-implement them.

pub mod checkpoint;
pub mod clock;
pub mod error;
pub mod event;
pub mod frames;
pub mod grant;
pub mod hash;
pub mod ids;
pub mod json;
pub mod payload;
pub mod policy;
pub mod retention;
pub mod token;
pub mod window;

pub use checkpoint::{AckError, AckUpdate};
pub use clock::{Clock, ManualClock, SystemClock};
pub use error::ErrorCode;
pub use event::Event;
pub use grant::Grants;
pub use ids::{Epoch, InvalidStreamId, Seq, SessionId, StreamId};
pub use policy::{PatternTable, RetentionRules, StreamPattern};
pub use retention::Retention;
pub use token::{ResumeClaims, ResumeKeys, TokenError};
pub use window::{ReplayWindow, WindowError};

/// Milliseconds since the Unix epoch as the system clock reads them now (it may jump either
/// way). The unit of every timestamp zerodrop stores or sends; where something expires or is
/// trimmed, time comes from a [`Clock`] instead.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `n` bytes from the operating system's CSPRNG.
///
/// Used for session ids, epochs, token ids and generated secrets. The OS source does not fail
/// on any platform zerodrop supports; if it ever did, continuing with predictable ids would be
/// worse than stopping, so this panics.
///
/// Small requests are served from a per-thread pool of OS randomness, refilled 512 bytes at a
/// time: a publish on Redis asks for an epoch each time, and one system call each was a
/// visible share of the request. Every byte is handed out once and wiped from the pool.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    const POOL: usize = 512;
    thread_local! {
        static RANDOM: std::cell::RefCell<(usize, [u8; POOL])> =
            const { std::cell::RefCell::new((POOL, [0; POOL])) };
    }
    let mut b = [0u8; N];
    if N > POOL / 4 {
        getrandom::fill(&mut b).expect("the operating system's random source failed");
        return b;
    }
    RANDOM.with_borrow_mut(|(used, pool)| {
        if *used + N > POOL {
            getrandom::fill(pool).expect("the operating system's random source failed");
            *used = 0;
        }
        let taken = &mut pool[*used..*used + N];
        b.copy_from_slice(taken);
        taken.fill(0);
        *used += N;
    });
    b
}

/// A UTC timestamp `YYYYMMDDTHHMMSSZ` for file names (reports, quarantined databases).
pub fn utc_stamp(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (h, m, s) = (rem / 3600, (rem % 3600) / 60, rem % 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(mo <= 2);
    format!("{y:04}{mo:02}{d:02}T{h:02}{m:02}{s:02}Z")
}

#[cfg(test)]
mod tests {
    #[test]
    fn random_bytes_are_never_handed_out_twice() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..2_000 {
            assert!(seen.insert(super::random_bytes::<8>()));
        }
        let big: [u8; 256] = super::random_bytes();
        assert_ne!(big, [0; 256]);
    }

    #[test]
    fn utc_stamps() {
        assert_eq!(super::utc_stamp(0), "19700101T000000Z");
        assert_eq!(super::utc_stamp(1_795_000_000_000), "20261118T110640Z");
        assert_eq!(super::utc_stamp(951_782_400_000), "20000229T000000Z");
    }
}
