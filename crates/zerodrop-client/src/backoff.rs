//! Exponential backoff with full jitter: the n-th attempt in a row waits a uniformly random
//! time in `[0, min(max, base·2ⁿ)]`, never less than what the server asked for
//! (`Retry-After`, `retryAfterMs`). Full jitter spreads a crowd of clients that lost the same
//! server over the whole window instead of bringing them back in waves.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
    state: RandomState,
    counter: u64,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Backoff {
        Backoff {
            base,
            max: max.max(base),
            attempt: 0,
            state: RandomState::new(),
            counter: 0,
        }
    }

    /// The ceiling of the next wait: `min(max, base·2ⁿ)`.
    pub fn cap(&self) -> Duration {
        let factor = 1u32 << self.attempt.min(20);
        self.base.saturating_mul(factor).min(self.max)
    }

    /// The next wait (and counts the attempt); `at_least` is the server's ask, if any.
    pub fn next_delay(&mut self, at_least: Duration) -> Duration {
        let cap = self.cap();
        self.attempt = self.attempt.saturating_add(1);
        cap.mul_f64(self.unit()).max(at_least)
    }

    /// A connection succeeded: the next failure starts from `base` again.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    /// A uniform number in `[0, 1]` (jitter needs spread, not cryptographic strength).
    fn unit(&mut self) -> f64 {
        self.counter = self.counter.wrapping_add(1);
        let mut h = self.state.build_hasher();
        h.write_u64(self.counter);
        (h.finish() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_stay_under_a_doubling_cap_and_spread() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let caps: Vec<u64> = (0..6)
            .map(|_| {
                let cap = b.cap();
                let d = b.next_delay(Duration::ZERO);
                assert!(d <= cap, "{d:?} > {cap:?}");
                cap.as_millis() as u64
            })
            .collect();
        assert_eq!(caps, [100, 200, 400, 800, 1000, 1000]);
        b.reset();
        assert_eq!(b.cap(), Duration::from_millis(100));
        // The server's ask is a floor.
        assert!(b.next_delay(Duration::from_secs(3)) >= Duration::from_secs(3));
        // Full jitter: many draws under one cap are not all alike.
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(1));
        let draws: Vec<Duration> = (0..50).map(|_| b.next_delay(Duration::ZERO)).collect();
        assert!(draws.iter().any(|d| *d < Duration::from_millis(500)));
        assert!(draws.iter().any(|d| *d > Duration::from_millis(500)));
    }
}
