//! Retention: how much of a stream's log is kept, and what to trim.
//!
//! Each stream keeps at most `max_events` events, `max_bytes` bytes of event JSON and events no
//! older than `max_age_ms`; the oldest go first. Count and size limits never trim the event
//! just appended (a stream always keeps its newest event); the age limit may empty a stream.

use crate::ids::Seq;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    pub max_events: u64,
    pub max_bytes: u64,
    pub max_age_ms: u64,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            max_events: 10_000,
            max_bytes: 16 * 1024 * 1024,
            max_age_ms: 86_400_000,
        }
    }
}

/// What to remove from the head of a log: every event with seq `<= through`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Trim {
    pub through: Seq,
    pub count: u64,
    pub bytes: u64,
}

/// Plans the trim after an append, for a stream now retaining `count` events of `bytes`
/// bytes. `oldest` yields `(seq, bytes)` of retained events from the oldest on; it is only
/// consumed as far as needed.
pub fn plan_trim(
    count: u64,
    bytes: u64,
    limits: &Retention,
    oldest: impl IntoIterator<Item = (Seq, u64)>,
) -> Option<Trim> {
    let must_count = count.saturating_sub(limits.max_events.max(1));
    if must_count == 0 && bytes <= limits.max_bytes {
        return None;
    }
    let mut trim = Trim {
        through: Seq(0),
        count: 0,
        bytes: 0,
    };
    for (seq, size) in oldest {
        let remaining = count - trim.count;
        if remaining <= 1 {
            break; // keep the newest
        }
        let over_count = trim.count < must_count;
        let over_bytes = bytes - trim.bytes > limits.max_bytes;
        if !over_count && !over_bytes {
            break;
        }
        trim.through = seq;
        trim.count += 1;
        trim.bytes += size;
    }
    (trim.count > 0).then_some(trim)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn limits(ev: u64, by: u64) -> Retention {
        Retention {
            max_events: ev,
            max_bytes: by,
            max_age_ms: u64::MAX,
        }
    }

    #[test]
    fn trims_by_count_then_bytes() {
        let sizes = |n: u64| (1..=n).map(|s| (Seq(s), 10));
        assert_eq!(plan_trim(5, 50, &limits(5, 1000), sizes(5)), None);
        assert_eq!(
            plan_trim(6, 60, &limits(5, 1000), sizes(6)),
            Some(Trim {
                through: Seq(1),
                count: 1,
                bytes: 10
            })
        );
        assert_eq!(
            plan_trim(6, 60, &limits(100, 35), sizes(6)),
            Some(Trim {
                through: Seq(3),
                count: 3,
                bytes: 30
            })
        );
        // Never trims the newest event, even if it alone is over the byte limit.
        assert_eq!(
            plan_trim(2, 200, &limits(100, 50), [(Seq(1), 100), (Seq(2), 100)]),
            Some(Trim {
                through: Seq(1),
                count: 1,
                bytes: 100
            })
        );
    }

    proptest! {
        /// After the planned trim, the stream is within its limits (or holds one event), and
        /// the trim never takes more than it must.
        #[test]
        fn trims_exactly_enough(sizes in proptest::collection::vec(1u64..500, 1..100), max_ev in 1u64..50, max_by in 1u64..5000) {
            let count = sizes.len() as u64;
            let bytes: u64 = sizes.iter().sum();
            let l = limits(max_ev, max_by);
            let oldest = sizes.iter().enumerate().map(|(i, b)| (Seq(i as u64 + 1), *b));
            let t = plan_trim(count, bytes, &l, oldest);
            let (tc, tb) = t.map(|t| (t.count, t.bytes)).unwrap_or((0, 0));
            let left_c = count - tc;
            let left_b = bytes - tb;
            prop_assert!(left_c >= 1);
            prop_assert!(left_c == 1 || (left_c <= max_ev && left_b <= max_by));
            if let Some(t) = t {
                prop_assert_eq!(t.through.0, t.count);
                // Keeping one more old event would break a limit.
                let back_c = left_c + 1;
                let back_b = left_b + sizes[(t.count - 1) as usize];
                prop_assert!(back_c > max_ev || back_b > max_by);
            }
        }
    }
}
