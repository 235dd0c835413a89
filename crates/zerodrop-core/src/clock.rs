//! Time as zerodrop decides with it: one injectable source for every expiry and retention
//! decision, so that a change of the system clock cannot shorten a duration the server owns,
//! and tests can move time by hand.
//!
//! Two readings, because two kinds of deadline exist:
//! - [`Clock::now_ms`], zerodrop's own time line: Unix milliseconds as the system clock read
//!   when the process started, then moved only by real elapsed time (the monotonic clock). No
//!   change of the system clock moves it, either way. Everything the server measures itself is
//!   on it: the age of the events it stored, the reconnect windows it started, the resume
//!   tokens it signs, the leases it grants, the maximum session age, the timestamps it writes.
//! - [`Clock::wall_deadline`], for an instant someone else set in wall-clock time (a connect
//!   token's `exp`): where it falls on that line. A forward jump of the system clock is
//!   believed at once (the instant comes sooner: a token expires as the new wall clock says),
//!   a backward one never (the instant never comes later: no credential lives longer because
//!   the clock went back).
//!
//! The production clock is [`SystemClock`]; every one in a process shares the same time line.
//! [`ManualClock`] moves only when told to, and can [`ManualClock::jump`] the wall clock it
//! pretends to read without time passing.
//!
//! Must not: be read for anything but "now" (this is not a timer), or be replaced by the
//! system clock ([`crate::now_ms`]) where something expires or is trimmed.

use std::fmt::Debug;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

/// A source of time (see the module docs for the two readings).
pub trait Clock: Send + Sync + Debug {
    /// zerodrop's time line, Unix milliseconds: never goes backwards, and moves only with real
    /// elapsed time, whatever the system clock does.
    fn now_ms(&self) -> u64;

    /// The system clock as it reads now, Unix milliseconds; may jump either way.
    fn wall_ms(&self) -> u64;

    /// How far the system clock has ever been seen ahead of [`Clock::now_ms`] (0 if never):
    /// the forward jumps believed so far. Grows, never shrinks.
    fn wall_ahead_ms(&self) -> u64;

    /// Where an instant set in wall-clock time (`wall_ms`, e.g. a connect token's `exp`) falls
    /// on this clock's time line: earlier by the forward jumps seen, never later.
    fn wall_deadline(&self, wall_ms: u64) -> u64 {
        wall_ms.saturating_sub(self.wall_ahead_ms())
    }

    /// The earlier of the two readings: what to hold the end of a restriction set in
    /// wall-clock time against (a revocation's `until`), so that it lapses only once both say
    /// so and no jump either way ends it early.
    fn restriction_now_ms(&self) -> u64 {
        self.now_ms().min(self.wall_ms())
    }
}

/// Records that the wall clock reads `wall` while the time line reads `now`, and answers the
/// largest lead seen.
fn observe(ahead: &AtomicU64, now: u64, wall: u64) -> u64 {
    let lead = wall.saturating_sub(now);
    ahead.fetch_max(lead, Ordering::SeqCst).max(lead)
}

/// The process's time line: the system clock read once, then the monotonic clock.
#[derive(Debug)]
struct Line {
    origin: Instant,
    origin_ms: u64,
    ahead: AtomicU64,
}

fn line() -> &'static Line {
    static LINE: OnceLock<Line> = OnceLock::new();
    LINE.get_or_init(|| Line {
        origin: Instant::now(),
        origin_ms: crate::now_ms(),
        ahead: AtomicU64::new(0),
    })
}

/// The real clock. Every `SystemClock` in a process reads the same time line, anchored to the
/// system clock the first time any of them is used.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl SystemClock {
    /// The real clock, shared (what the server runs with unless a test injects another).
    pub fn shared() -> Arc<dyn Clock> {
        Arc::new(SystemClock)
    }
}

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        let l = line();
        l.origin_ms + l.origin.elapsed().as_millis() as u64
    }

    fn wall_ms(&self) -> u64 {
        crate::now_ms()
    }

    fn wall_ahead_ms(&self) -> u64 {
        let now = self.now_ms();
        observe(&line().ahead, now, self.wall_ms())
    }
}

/// A clock that moves only when told to; clones share the same time. Its wall clock starts on
/// its time line and moves with it, except by [`ManualClock::jump`].
#[derive(Clone, Debug, Default)]
pub struct ManualClock {
    ms: Arc<AtomicU64>,
    /// The pretended system clock minus `ms`.
    wall_offset: Arc<AtomicI64>,
    ahead: Arc<AtomicU64>,
}

impl ManualClock {
    pub fn new(start_ms: u64) -> ManualClock {
        ManualClock {
            ms: Arc::new(AtomicU64::new(start_ms)),
            ..ManualClock::default()
        }
    }

    /// A manual clock starting at the system clock's now (for tests whose tokens are minted
    /// with real timestamps).
    pub fn starting_now() -> ManualClock {
        ManualClock::new(crate::now_ms())
    }

    /// `ms` of real time pass: the time line and the wall clock move together.
    pub fn advance(&self, ms: u64) {
        self.ms.fetch_add(ms, Ordering::SeqCst);
    }

    /// Time passes until the time line reads `ms` (never backwards).
    pub fn set(&self, ms: u64) {
        self.ms.fetch_max(ms, Ordering::SeqCst);
    }

    /// The system clock is changed by `delta_ms` (forward if positive), and no time passes.
    pub fn jump(&self, delta_ms: i64) {
        self.wall_offset.fetch_add(delta_ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.ms.load(Ordering::SeqCst)
    }

    fn wall_ms(&self) -> u64 {
        let now = self.now_ms() as i64;
        now.saturating_add(self.wall_offset.load(Ordering::SeqCst))
            .max(0) as u64
    }

    fn wall_ahead_ms(&self) -> u64 {
        observe(&self.ahead, self.now_ms(), self.wall_ms())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: u64 = 3_600_000;

    #[test]
    fn a_manual_clock_moves_only_forward_and_is_shared() {
        let c = ManualClock::new(10);
        let d = c.clone();
        c.advance(5);
        assert_eq!(d.now_ms(), 15);
        d.set(3);
        assert_eq!(c.now_ms(), 15, "never backwards");
        d.set(40);
        assert_eq!(c.now_ms(), 40);
        assert_eq!(c.wall_ms(), 40, "the wall clock moves with time");
    }

    #[test]
    fn a_jump_moves_the_wall_clock_and_not_the_time_line() {
        let c = ManualClock::new(10 * HOUR);
        c.jump(HOUR as i64);
        assert_eq!((c.now_ms(), c.wall_ms()), (10 * HOUR, 11 * HOUR));
        c.jump(-2 * HOUR as i64);
        assert_eq!((c.now_ms(), c.wall_ms()), (10 * HOUR, 9 * HOUR));
        c.advance(5);
        assert_eq!((c.now_ms(), c.wall_ms()), (10 * HOUR + 5, 9 * HOUR + 5));
    }

    #[test]
    fn a_wall_deadline_comes_sooner_after_a_forward_jump_and_never_later() {
        let c = ManualClock::new(10 * HOUR);
        let exp = 10 * HOUR + 30 * 60_000; // a token's exp, half an hour ahead
        assert_eq!(c.wall_deadline(exp), exp);
        c.jump(-(HOUR as i64));
        assert_eq!(c.wall_deadline(exp), exp, "a backward jump extends nothing");
        c.jump(2 * HOUR as i64); // now an hour ahead of the time line
        assert_eq!(
            c.wall_deadline(exp),
            exp - HOUR,
            "expired by the new wall clock"
        );
        assert!(c.wall_deadline(exp) <= c.now_ms());
        c.jump(-(HOUR as i64)); // back where it was: the lead once seen stays
        assert_eq!(c.wall_deadline(exp), exp - HOUR);
        assert_eq!(c.wall_ahead_ms(), HOUR);
    }

    #[test]
    fn a_restriction_lapses_only_when_both_readings_agree() {
        let c = ManualClock::new(10 * HOUR);
        c.jump(HOUR as i64);
        assert_eq!(
            c.restriction_now_ms(),
            10 * HOUR,
            "not the jumped wall clock"
        );
        c.jump(-2 * HOUR as i64);
        assert_eq!(c.restriction_now_ms(), 9 * HOUR, "the wall clock, behind");
    }

    #[test]
    fn the_system_clock_is_one_line_per_process_near_the_wall_clock() {
        let (a, b) = (SystemClock, SystemClock);
        let x = a.now_ms();
        let y = b.now_ms();
        assert!(y >= x);
        // Anchored to the system clock: within a minute of it unless it jumped meanwhile.
        assert!(a.now_ms().abs_diff(a.wall_ms()) < 60_000);
        let exp = a.wall_ms() + HOUR;
        assert!(a.wall_deadline(exp) <= exp);
    }
}
