//! When a failed delivery is tried again: exponential backoff with full jitter, dead letter
//! after the last attempt (SPEC §7).
//!
//! Full jitter (a uniform delay in `[0, min(cap, base · 2^(attempt-1))]`) spreads the retries
//! of many jobs that failed together, so a recovering upstream is not hit by a synchronised
//! wave. The random source is a parameter: tests pin it, the server draws from the OS.

use serde::{Deserialize, Serialize};

use crate::circuit::InvalidSetting;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// Attempts in all, the first included; after the last a job is a dead letter.
    pub max_attempts: u32,
    /// Ceiling of the first retry's delay.
    pub base_ms: u64,
    /// No delay ceiling grows beyond this.
    pub cap_ms: u64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 8,
            base_ms: 500,
            cap_ms: 60_000,
        }
    }
}

/// What to do after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    RetryIn { delay_ms: u64 },
    DeadLetter,
}

impl RetryPolicy {
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        if self.max_attempts == 0 {
            return Err(InvalidSetting {
                setting: "jobs_max_attempts",
                message: "must be at least 1".into(),
            });
        }
        if self.base_ms == 0 {
            return Err(InvalidSetting {
                setting: "jobs_backoff_base_ms",
                message: "must be at least 1".into(),
            });
        }
        if self.cap_ms < self.base_ms {
            return Err(InvalidSetting {
                setting: "jobs_backoff_cap_ms",
                message: format!("must be at least the base of {} ms", self.base_ms),
            });
        }
        Ok(())
    }

    /// The delay ceiling after failed attempt number `attempt` (1-based).
    pub fn ceiling_ms(&self, attempt: u32) -> u64 {
        let doublings = attempt.saturating_sub(1).min(63);
        self.base_ms
            .saturating_mul(1u64 << doublings)
            .min(self.cap_ms)
    }

    /// After attempt `attempt` failed: retry after a delay drawn uniformly from
    /// `[0, ceiling]` using `random` (any `u64`), or give up.
    pub fn after_failure(&self, attempt: u32, random: u64) -> Next {
        if attempt >= self.max_attempts {
            return Next::DeadLetter;
        }
        let ceiling = self.ceiling_ms(attempt);
        Next::RetryIn {
            delay_ms: random % (ceiling + 1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ceilings_double_up_to_the_cap_then_dead_letter() {
        let p = RetryPolicy {
            max_attempts: 5,
            base_ms: 100,
            cap_ms: 500,
        };
        let ceilings: Vec<u64> = (1..=5).map(|a| p.ceiling_ms(a)).collect();
        assert_eq!(ceilings, vec![100, 200, 400, 500, 500]);
        assert_eq!(
            p.after_failure(4, u64::MAX),
            Next::RetryIn {
                delay_ms: u64::MAX % 501
            }
        );
        assert_eq!(p.after_failure(1, 100), Next::RetryIn { delay_ms: 100 });
        assert_eq!(p.after_failure(1, 101), Next::RetryIn { delay_ms: 0 });
        assert_eq!(p.after_failure(5, 7), Next::DeadLetter);
        assert_eq!(p.after_failure(9, 7), Next::DeadLetter);
    }

    #[test]
    fn invalid_policies_are_refused_by_name() {
        let bad = |p: RetryPolicy| p.validate().unwrap_err().setting;
        let ok = RetryPolicy::default();
        assert!(ok.validate().is_ok());
        assert_eq!(
            bad(RetryPolicy {
                max_attempts: 0,
                ..ok.clone()
            }),
            "jobs_max_attempts"
        );
        assert_eq!(
            bad(RetryPolicy {
                base_ms: 0,
                ..ok.clone()
            }),
            "jobs_backoff_base_ms"
        );
        assert_eq!(bad(RetryPolicy { cap_ms: 10, ..ok }), "jobs_backoff_cap_ms");
    }

    proptest! {
        /// Every delay lies in [0, ceiling], the ceiling never shrinks, and a delay equal to
        /// the ceiling and one of 0 are both reachable (full jitter, not "equal jitter").
        #[test]
        fn full_jitter_stays_within_its_ceiling(
            base in 1u64..10_000, extra in 0u64..1_000_000, attempts in 1u32..80, r: u64
        ) {
            let p = RetryPolicy { max_attempts: attempts + 1, base_ms: base, cap_ms: base + extra };
            let mut last = 0;
            for a in 1..=attempts {
                let c = p.ceiling_ms(a);
                prop_assert!(c >= last && c <= p.cap_ms && c >= base.min(p.cap_ms));
                last = c;
                match p.after_failure(a, r) {
                    Next::RetryIn { delay_ms } => prop_assert!(delay_ms <= c),
                    Next::DeadLetter => prop_assert!(false, "attempt {a} of {}", attempts + 1),
                }
                prop_assert_eq!(p.after_failure(a, c), Next::RetryIn { delay_ms: c });
                prop_assert_eq!(p.after_failure(a, c + 1), Next::RetryIn { delay_ms: 0 });
            }
            prop_assert_eq!(p.after_failure(attempts + 1, r), Next::DeadLetter);
        }
    }
}
