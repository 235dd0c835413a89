//! Retention: how much of a stream's log is kept, and what to trim.
//!
//! Each stream keeps at most `max_events` events, `max_bytes` bytes of event JSON and events no
//! older than `max_age_ms`; the oldest go first. Count and size limits never trim the event
//! just appended (a stream always keeps its newest event); the age limit may empty a stream.
//!
//! A stream that goes over its count or size limit is trimmed a step below it, 1/64 of the
//! limit ([`TRIM_STEP_DIVISOR`]; at least one event, or byte), so that a busy stream at its
//! limit is trimmed once per step of appends rather than at every one: it then holds
//! between `max_events - max_events/64 + 1` and `max_events` events (9,845 to 10,000 by
//! default). Each trim rewrites the pages of the stream's oldest events, and trimming at
//! every append cost a busy SQLite store half its throughput.

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

/// A limit that is exceeded is trimmed to this fraction below it (see the module docs).
pub const TRIM_STEP_DIVISOR: u64 = 64;

/// What a stream retaining `count` events of `bytes` bytes must shed: how many events by
/// the count limit, and the most bytes it may keep by the size limit. Over a limit, the
/// target is a step below it; within it, the limit itself.
fn targets(count: u64, bytes: u64, limits: &Retention) -> (u64, u64) {
    let max_events = limits.max_events.max(1);
    let must_count = if count > max_events {
        let step = (max_events / TRIM_STEP_DIVISOR).max(1);
        count - (max_events + 1 - step)
    } else {
        0
    };
    let keep_bytes = if bytes > limits.max_bytes {
        limits.max_bytes
            - (limits.max_bytes / TRIM_STEP_DIVISOR)
                .max(1)
                .min(limits.max_bytes)
    } else {
        limits.max_bytes
    };
    (must_count, keep_bytes)
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
    let (must_count, keep_bytes) = targets(count, bytes, limits);
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
        let over_bytes = bytes - trim.bytes > keep_bytes;
        if !over_count && !over_bytes {
            break;
        }
        trim.through = seq;
        trim.count += 1;
        trim.bytes += size;
    }
    (trim.count > 0).then_some(trim)
}

/// How many of the oldest events a trim of a stream retaining `count` events of `bytes` bytes
/// needs at least: the events over the count limit, or the bytes over the size limit at the
/// stream's mean event size, whichever is more; 0 when nothing is over. A store reads that
/// many for [`plan_trim`] (and more only if they were not enough), rather than a fixed chunk
/// per trim.
pub fn trim_reads(count: u64, bytes: u64, limits: &Retention) -> u64 {
    let (by_count, keep_bytes) = targets(count, bytes, limits);
    if by_count == 0 && bytes <= limits.max_bytes {
        return 0;
    }
    let over_bytes = bytes.saturating_sub(keep_bytes);
    let mean = (bytes / count.max(1)).max(1);
    by_count.max(over_bytes.div_ceil(mean)).max(1)
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
        // Over the count limit, a step of 1/64 of it goes: then nothing until the next step.
        let many = |n: u64| (1..=n).map(|s| (Seq(s), 1));
        let l = limits(6400, u64::MAX);
        assert_eq!(plan_trim(6400, 6400, &l, many(6400)), None);
        assert_eq!(
            plan_trim(6401, 6401, &l, many(6401)).map(|t| (t.through, t.count)),
            Some((Seq(100), 100))
        );
        assert_eq!(trim_reads(6401, 6401, &l), 100);
        // Over the size limit, bytes go until a step (1/64) under it.
        assert_eq!(
            plan_trim(
                100,
                6500,
                &limits(1000, 6400),
                (1..=100).map(|s| (Seq(s), 65))
            )
            .map(|t| t.count),
            Some(4)
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
            // Within both limits, nothing goes.
            prop_assert!(t.is_none() || count > max_ev || bytes > max_by);
            if let Some(t) = t {
                prop_assert_eq!(t.through.0, t.count);
                // Keeping one more old event would break a limit's target: a step (1/64)
                // below the limit that was exceeded, the limit itself otherwise.
                let step = |limit: u64| (limit / TRIM_STEP_DIVISOR).max(1).min(limit);
                let floor_c = if count > max_ev { max_ev + 1 - step(max_ev) } else { max_ev };
                let keep_b = if bytes > max_by { max_by - step(max_by) } else { max_by };
                let back_c = left_c + 1;
                let back_b = left_b + sizes[(t.count - 1) as usize];
                prop_assert!(back_c > floor_c || back_b > keep_b);
            }
        }

        /// A store that reads `trim_reads` of the oldest events, and reads twice as many
        /// again whenever a plan took all it read, plans what one plan over every event does.
        #[test]
        fn trimming_from_reads_of_trim_reads_plans_as_one_trim_does(sizes in proptest::collection::vec(1u64..500, 1..100), max_ev in 1u64..50, max_by in 1u64..5000) {
            let l = limits(max_ev, max_by);
            let all = || sizes.iter().enumerate().map(|(i, b)| (Seq(i as u64 + 1), *b));
            let (count, bytes) = (sizes.len() as u64, sizes.iter().sum::<u64>());
            let whole = plan_trim(count, bytes, &l, all());
            let mut want = trim_reads(count, bytes, &l) as usize;
            prop_assert!(want > 0 || whole.is_none());
            let mut planned = None;
            while want > 0 {
                let read: Vec<_> = all().take(want).collect();
                planned = plan_trim(count, bytes, &l, read.iter().copied());
                if planned.is_none_or(|t| (t.count as usize) < read.len()) || read.len() < want {
                    break;
                }
                want *= 2;
            }
            prop_assert_eq!(planned, whole);
        }
    }
}
