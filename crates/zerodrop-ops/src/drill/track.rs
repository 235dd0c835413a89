//! Per-client delivery verification: every seq once, in order, none missing.

use hdrhistogram::Histogram;
use serde::Deserialize;

/// The payload every drill publisher sends: publisher, counter, send time (ns since the run
/// started, one monotonic clock for the whole process).
#[derive(Deserialize)]
pub struct Payload {
    pub w: u32,
    pub c: u64,
    pub t: u64,
}

pub fn new_histogram() -> Histogram<u64> {
    // 1 µs .. 1 h, 3 significant digits; auto-resize keeps huge outliers instead of failing.
    let mut h = Histogram::new_with_bounds(1, 3_600_000_000, 3)
        .unwrap_or_else(|_| Histogram::new(3).expect("3 significant digits is valid"));
    h.auto(true);
    h
}

pub struct Tracker {
    seen: Vec<u64>,
    /// Every seq in `1..=contiguous` has arrived.
    pub contiguous: u64,
    /// Highest seq seen.
    pub last: u64,
    pub epoch: Option<String>,
    pub distinct: u64,
    pub duplicated: u64,
    pub out_of_order: u64,
    /// Seqs a resume legitimately sends again (the client asked from `contiguous` while it
    /// already held some later ones): `(from, to]`.
    redelivery: (u64, u64),
    pub latency_us: Histogram<u64>,
}

impl Default for Tracker {
    fn default() -> Self {
        Tracker {
            seen: Vec::new(),
            contiguous: 0,
            last: 0,
            epoch: None,
            distinct: 0,
            duplicated: 0,
            out_of_order: 0,
            redelivery: (0, 0),
            latency_us: new_histogram(),
        }
    }
}

impl Tracker {
    fn is_seen(&self, seq: u64) -> bool {
        let (i, b) = ((seq / 64) as usize, seq % 64);
        self.seen.get(i).map(|w| w & (1 << b) != 0).unwrap_or(false)
    }

    fn mark(&mut self, seq: u64) {
        let (i, b) = ((seq / 64) as usize, seq % 64);
        if self.seen.len() <= i {
            self.seen.resize(i + 1, 0);
        }
        self.seen[i] |= 1 << b;
    }

    /// Called before a resume that asks for everything after `contiguous`.
    pub fn expect_redelivery(&mut self) {
        self.redelivery = (self.contiguous, self.last);
    }

    /// Records one delivery; returns whether it was fresh. `now_ns` is the run clock.
    pub fn on_event(&mut self, seq: u64, epoch: &str, data: &str, now_ns: u64) -> bool {
        if self.epoch.as_deref() != Some(epoch) {
            self.epoch = Some(epoch.to_string());
        }
        if seq == 0 {
            return false;
        }
        if self.is_seen(seq) {
            let (from, to) = self.redelivery;
            if !(seq > from && seq <= to) {
                self.duplicated += 1;
            }
            return false;
        }
        self.mark(seq);
        self.distinct += 1;
        if seq < self.last {
            self.out_of_order += 1;
        } else {
            self.last = seq;
        }
        while self.is_seen(self.contiguous + 1) {
            self.contiguous += 1;
        }
        if let Ok(p) = serde_json::from_str::<Payload>(data) {
            let us = now_ns.saturating_sub(p.t) / 1000;
            let _ = self.latency_us.record(us.max(1));
        }
        true
    }

    /// Seqs in `1..=head` never received.
    pub fn missing(&self, head: u64) -> u64 {
        let got = (1..=head).filter(|s| self.is_seen(*s)).count() as u64;
        head - got
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_duplicates_gaps_and_order() {
        let mut t = Tracker::default();
        let d = r#"{"w":0,"c":1,"t":0}"#;
        assert!(t.on_event(1, "e", d, 5_000));
        assert!(t.on_event(2, "e", d, 5_000));
        assert!(!t.on_event(2, "e", d, 5_000));
        assert_eq!(t.duplicated, 1);
        assert!(t.on_event(4, "e", d, 5_000));
        assert_eq!((t.contiguous, t.last), (2, 4));
        assert_eq!(t.missing(4), 1);
        assert!(t.on_event(3, "e", d, 5_000));
        assert_eq!(t.out_of_order, 1);
        assert_eq!((t.contiguous, t.missing(4), t.missing(6)), (4, 0, 2));
        assert_eq!(t.latency_us.len(), 4);
    }

    #[test]
    fn a_requested_redelivery_is_not_a_duplicate() {
        let mut t = Tracker::default();
        for s in [1, 2, 4, 5] {
            t.on_event(s, "e", "{}", 0);
        }
        t.expect_redelivery();
        for s in [3, 4, 5] {
            t.on_event(s, "e", "{}", 0);
        }
        assert_eq!(t.duplicated, 0);
        t.on_event(1, "e", "{}", 0);
        assert_eq!(t.duplicated, 1);
    }
}
