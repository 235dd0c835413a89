//! What the rate limits did (SPEC §7): allowed and blocked counts per bucket per minute, the
//! recent block events, and alerts when blocking stays high. The limiting itself (GCRA) is
//! `governor`'s; this ledger only records its verdicts, on a [`Clock`].
//!
//! Alert rule: a bucket is alerting when each of its last `minutes` whole minutes (the
//! current, partial minute is not judged) saw at least `min_requests` requests, of which at
//! least `blocked_pct` percent were blocked. A minute with no requests breaks the streak.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use serde::Serialize;

use crate::Clock;

const MINUTE_MS: u64 = 60_000;

/// When blocking counts as staying high.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AlertRule {
    pub blocked_pct: u8,
    pub minutes: u32,
    pub min_requests: u64,
}

impl Default for AlertRule {
    fn default() -> Self {
        AlertRule {
            blocked_pct: 50,
            minutes: 3,
            min_requests: 10,
        }
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct Minute {
    index: u64,
    allowed: u64,
    blocked: u64,
}

/// Allowed and blocked requests of one bucket over a window.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BucketSummary {
    pub bucket: String,
    pub allowed: u64,
    pub blocked: u64,
}

/// A bucket whose blocking stayed high.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Alert {
    pub bucket: String,
    /// Whole minutes in a row that met the rule (at least the rule's `minutes`).
    pub minutes: u32,
    /// Start of the first of those minutes, in the clock's milliseconds.
    pub since_ms: u64,
    pub allowed: u64,
    pub blocked: u64,
}

/// One blocked request. `key` is whatever label the caller gave: never a secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BlockEvent {
    pub bucket: String,
    pub key: String,
    pub at_ms: u64,
}

/// The ledger of rate-limit verdicts.
pub struct Ledger {
    clock: Arc<dyn Clock>,
    rule: AlertRule,
    keep_minutes: u64,
    max_events: usize,
    buckets: BTreeMap<String, VecDeque<Minute>>,
    events: VecDeque<BlockEvent>,
}

impl Ledger {
    /// Keeps `keep_minutes` minutes of counts per bucket and the last `max_events` blocks.
    pub fn new(
        clock: Arc<dyn Clock>,
        rule: AlertRule,
        keep_minutes: u64,
        max_events: usize,
    ) -> Ledger {
        Ledger {
            clock,
            rule,
            keep_minutes: keep_minutes.max(1),
            max_events,
            buckets: BTreeMap::new(),
            events: VecDeque::new(),
        }
    }

    fn minute_now(&self) -> (u64, u64) {
        let now = self.clock.now_ms();
        (now, now / MINUTE_MS)
    }

    /// Records one verdict of `bucket` for `key`.
    pub fn record(&mut self, bucket: &str, key: &str, allowed: bool) {
        let (now, index) = self.minute_now();
        let keep = self.keep_minutes;
        let minutes = self.buckets.entry(bucket.to_string()).or_default();
        if minutes.back().is_none_or(|m| m.index != index) {
            minutes.push_back(Minute {
                index,
                ..Minute::default()
            });
        }
        while minutes.front().is_some_and(|m| m.index + keep <= index) {
            minutes.pop_front();
        }
        if let Some(m) = minutes.back_mut() {
            if allowed {
                m.allowed += 1;
            } else {
                m.blocked += 1;
            }
        }
        if !allowed && self.max_events > 0 {
            if self.events.len() == self.max_events {
                self.events.pop_front();
            }
            self.events.push_back(BlockEvent {
                bucket: bucket.to_string(),
                key: key.to_string(),
                at_ms: now,
            });
        }
    }

    /// Allowed and blocked per bucket over the last `minutes` minutes (the current one
    /// included), buckets in name order; buckets with nothing in the window are left out.
    pub fn summary(&self, minutes: u64) -> Vec<BucketSummary> {
        let (_, index) = self.minute_now();
        let from = (index + 1).saturating_sub(minutes.clamp(1, self.keep_minutes));
        self.buckets
            .iter()
            .filter_map(|(bucket, ms)| {
                let (allowed, blocked) = ms
                    .iter()
                    .filter(|m| m.index >= from && m.index <= index)
                    .fold((0, 0), |(a, b), m| (a + m.allowed, b + m.blocked));
                (allowed + blocked > 0).then(|| BucketSummary {
                    bucket: bucket.clone(),
                    allowed,
                    blocked,
                })
            })
            .collect()
    }

    /// The buckets alerting now under the rule, at most `limit`, longest streak first.
    pub fn alerts(&self, limit: usize) -> Vec<Alert> {
        let (_, index) = self.minute_now();
        let rule = self.rule;
        let mut out: Vec<Alert> = self
            .buckets
            .iter()
            .filter_map(|(bucket, ms)| {
                let mut expect = index.checked_sub(1)?;
                let (mut streak, mut allowed, mut blocked) = (0u32, 0u64, 0u64);
                for m in ms.iter().rev().filter(|m| m.index < index) {
                    let total = m.allowed + m.blocked;
                    let high = m.index == expect
                        && total >= rule.min_requests.max(1)
                        && m.blocked * 100 >= u64::from(rule.blocked_pct) * total;
                    if !high {
                        break;
                    }
                    streak += 1;
                    allowed += m.allowed;
                    blocked += m.blocked;
                    let Some(prev) = expect.checked_sub(1) else {
                        break;
                    };
                    expect = prev;
                }
                (streak >= rule.minutes.max(1)).then(|| Alert {
                    bucket: bucket.clone(),
                    minutes: streak,
                    since_ms: (index - u64::from(streak)) * MINUTE_MS,
                    allowed,
                    blocked,
                })
            })
            .collect();
        out.sort_by(|a, b| b.minutes.cmp(&a.minutes).then(a.bucket.cmp(&b.bucket)));
        out.truncate(limit);
        out
    }

    /// The most recent block events, newest first, at most `limit`.
    pub fn events(&self, limit: usize) -> Vec<BlockEvent> {
        self.events.iter().rev().take(limit).cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ManualClock;

    fn ledger(c: &ManualClock) -> Ledger {
        Ledger::new(Arc::new(c.clone()), AlertRule::default(), 60, 3)
    }

    fn hits(l: &mut Ledger, bucket: &str, allowed: u64, blocked: u64) {
        for _ in 0..allowed {
            l.record(bucket, "k", true);
        }
        for _ in 0..blocked {
            l.record(bucket, "k", false);
        }
    }

    fn sum(bucket: &str, allowed: u64, blocked: u64) -> BucketSummary {
        BucketSummary {
            bucket: bucket.into(),
            allowed,
            blocked,
        }
    }

    #[test]
    fn minutes_roll_and_the_summary_covers_exactly_its_window() {
        let c = ManualClock::new(0);
        let mut l = ledger(&c);
        hits(&mut l, "publish", 5, 1);
        c.advance(MINUTE_MS);
        hits(&mut l, "publish", 2, 0);
        hits(&mut l, "sessions", 0, 4);
        assert_eq!(
            l.summary(1),
            vec![sum("publish", 2, 0), sum("sessions", 0, 4)]
        );
        assert_eq!(
            l.summary(2),
            vec![sum("publish", 7, 1), sum("sessions", 0, 4)]
        );
        // Past the kept minutes, old counts are gone.
        c.advance(60 * MINUTE_MS);
        hits(&mut l, "publish", 1, 0);
        assert_eq!(l.summary(60), vec![sum("publish", 1, 0)]);
        assert_eq!(
            l.summary(0),
            vec![sum("publish", 1, 0)],
            "at least one minute"
        );
    }

    #[test]
    fn alerts_need_consecutive_whole_minutes_of_high_blocking() {
        let c = ManualClock::new(10 * MINUTE_MS);
        let mut l = ledger(&c);
        // Minutes 10, 11: high. Minute 12: too few requests. 13, 14, 15: high.
        hits(&mut l, "ws", 4, 6);
        c.advance(MINUTE_MS);
        hits(&mut l, "ws", 5, 5);
        c.advance(MINUTE_MS);
        hits(&mut l, "ws", 0, 9);
        c.advance(MINUTE_MS);
        for _ in 0..2 {
            hits(&mut l, "ws", 1, 9);
            c.advance(MINUTE_MS);
        }
        assert_eq!(l.alerts(20), vec![], "two whole minutes are not enough");
        hits(&mut l, "ws", 5, 5);
        hits(&mut l, "calm", 10, 0);
        assert_eq!(l.alerts(20), vec![], "the current minute is not judged");
        c.advance(MINUTE_MS);
        assert_eq!(
            l.alerts(20),
            vec![Alert {
                bucket: "ws".into(),
                minutes: 3,
                since_ms: 13 * MINUTE_MS,
                allowed: 7,
                blocked: 23,
            }]
        );
        assert_eq!(l.alerts(0), vec![]);
        // An idle minute ends the streak.
        c.advance(MINUTE_MS);
        assert_eq!(l.alerts(20), vec![]);
    }

    #[test]
    fn events_keep_the_newest_blocks_only() {
        let c = ManualClock::new(0);
        let mut l = ledger(&c);
        for i in 0..5 {
            c.advance(1);
            l.record("publish", &format!("key{i}"), false);
            l.record("publish", "ok", true);
        }
        let keys: Vec<_> = l.events(10).into_iter().map(|e| (e.key, e.at_ms)).collect();
        assert_eq!(
            keys,
            vec![("key4".into(), 5), ("key3".into(), 4), ("key2".into(), 3)]
        );
        assert_eq!(l.events(1).len(), 1);
    }
}
