//! Per-stream delivery bookkeeping: at most once to the application, gaps made visible.
//!
//! The server promises every event in order, once. A client still dedupes by seq because
//! the replay/live seam, a resume racing a late frame, or a buggy proxy could hand it an
//! event twice — and it must *notice* a gap rather than carry on silently. The rule: an
//! event is fresh when its seq is the next one; at or below the last delivered seq it is a
//! duplicate and dropped; above the next one it is delivered but reported as a gap; an epoch
//! other than the one seen before means every position is void (resync).

use std::collections::{BTreeMap, HashMap};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// The next seq: deliver it.
    Fresh,
    /// At or below the last delivered seq: drop it.
    Duplicate,
    /// Above the next seq: `expected..got` never arrived. The event is delivered and the
    /// cursor moves to `got`; the caller decides how to fill or report the hole.
    Gap { expected: u64, got: u64 },
    /// The stream's log was recreated; positions from the old epoch mean nothing. The cursor
    /// restarts at this event.
    EpochChanged { previous: String },
}

#[derive(Clone, Debug, Default)]
struct Cursor {
    epoch: Option<String>,
    last: u64,
}

#[derive(Clone, Debug, Default)]
pub struct Deduper {
    streams: HashMap<String, Cursor>,
}

impl Deduper {
    pub fn new() -> Deduper {
        Deduper::default()
    }

    /// Starts `stream` at a known position (e.g. after reading history up to `last`).
    pub fn set_position(&mut self, stream: &str, epoch: Option<&str>, last: u64) {
        self.streams.insert(
            stream.to_string(),
            Cursor {
                epoch: epoch.map(str::to_string),
                last,
            },
        );
    }

    /// Judges one incoming event and moves the cursor.
    pub fn offer(&mut self, stream: &str, epoch: &str, seq: u64) -> Delivery {
        let cursor = match self.streams.get_mut(stream) {
            Some(c) => c,
            None => self.streams.entry(stream.to_string()).or_default(),
        };
        match &cursor.epoch {
            Some(known) if known != epoch => {
                let previous = known.clone();
                cursor.epoch = Some(epoch.to_string());
                cursor.last = seq;
                return Delivery::EpochChanged { previous };
            }
            Some(_) => {}
            None => cursor.epoch = Some(epoch.to_string()),
        }
        if seq <= cursor.last {
            Delivery::Duplicate
        } else if seq == cursor.last + 1 {
            cursor.last = seq;
            Delivery::Fresh
        } else {
            let expected = cursor.last + 1;
            cursor.last = seq;
            Delivery::Gap { expected, got: seq }
        }
    }

    /// The last delivered seq of `stream` (0 before the first).
    pub fn last(&self, stream: &str) -> u64 {
        self.streams.get(stream).map(|c| c.last).unwrap_or(0)
    }

    pub fn epoch(&self, stream: &str) -> Option<&str> {
        self.streams.get(stream).and_then(|c| c.epoch.as_deref())
    }

    /// Every stream's last delivered seq: what a resume sends as `lastAck`.
    pub fn positions(&self) -> BTreeMap<String, u64> {
        self.streams
            .iter()
            .map(|(s, c)| (s.clone(), c.last))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_duplicate_gap_and_epoch() {
        let mut d = Deduper::new();
        assert_eq!(d.offer("a", "e1", 1), Delivery::Fresh);
        assert_eq!(d.offer("a", "e1", 2), Delivery::Fresh);
        assert_eq!(d.offer("a", "e1", 2), Delivery::Duplicate);
        assert_eq!(d.offer("a", "e1", 1), Delivery::Duplicate);
        assert_eq!(
            d.offer("a", "e1", 5),
            Delivery::Gap {
                expected: 3,
                got: 5
            }
        );
        assert_eq!(d.offer("a", "e1", 4), Delivery::Duplicate);
        assert_eq!(d.last("a"), 5);
        assert_eq!(
            d.offer("a", "e2", 1),
            Delivery::EpochChanged {
                previous: "e1".into()
            }
        );
        assert_eq!(d.offer("a", "e2", 2), Delivery::Fresh);
        // Streams are independent.
        assert_eq!(d.offer("b", "x", 1), Delivery::Fresh);
        assert_eq!(d.positions().get("a"), Some(&2));
    }

    #[test]
    fn a_known_position_suppresses_what_was_read_before() {
        let mut d = Deduper::new();
        d.set_position("a", Some("e"), 10);
        assert_eq!(d.offer("a", "e", 10), Delivery::Duplicate);
        assert_eq!(d.offer("a", "e", 11), Delivery::Fresh);
    }
}
