//! The replay window rule.
//!
//! A client that holds position `after` in epoch `E` is owed the events `(after, head]`. That
//! is only possible if the stream is still in epoch `E` and the event `after + 1` is still
//! retained. [`replay_window`] decides; every resume path (WebSocket `resume` and `subscribe`,
//! SSE `Last-Event-ID`, HTTP reconnect and reads) calls it.

use crate::ids::{Epoch, Seq};

/// What a store knows about a stream's log right now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogBounds {
    pub epoch: Epoch,
    /// Oldest retained seq, or `head + 1` when nothing is retained.
    pub first_seq: Seq,
    pub head: Seq,
}

/// The events a client is owed: `from ..= to` (empty when `from > to`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplayWindow {
    pub from: Seq,
    pub to: Seq,
}

impl ReplayWindow {
    pub fn after(self) -> Seq {
        Seq(self.from.0 - 1)
    }

    pub fn len(self) -> u64 {
        (self.to.0 + 1).saturating_sub(self.from.0)
    }

    pub fn is_empty(self) -> bool {
        self.len() == 0
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WindowError {
    #[error("the stream's log was recreated (epoch {current}); resync")]
    EpochChanged { current: Epoch },
    #[error("events after {after} were trimmed; the oldest retained is {first_available}")]
    Trimmed { after: Seq, first_available: Seq },
    #[error("position {after} is beyond the stream head {head}")]
    BeyondHead { after: Seq, head: Seq },
}

/// The rule for a page of the events before `before` (newest first): the newest one it asks
/// for, `before - 1`, is what `after + 1` is to [`replay_window`]. Refused in another epoch;
/// beyond the head when `before - 1` is past it; trimmed when `before - 1` is no longer
/// retained (a page that reaches the oldest retained event only stops there: the answer's
/// `firstSeq` tells the client where the log begins). `before = 1` asks for nothing and is
/// never refused for a trim.
pub fn before_window(
    before: Seq,
    client_epoch: Option<&Epoch>,
    log: &LogBounds,
) -> Result<(), WindowError> {
    let newest = Seq(before.0.saturating_sub(1));
    if let Some(e) = client_epoch
        && *e != log.epoch
    {
        return Err(WindowError::EpochChanged {
            current: log.epoch.clone(),
        });
    }
    if newest > log.head {
        return Err(WindowError::BeyondHead {
            after: newest,
            head: log.head,
        });
    }
    if newest.0 >= 1 && newest < log.first_seq {
        return Err(WindowError::Trimmed {
            after: newest,
            first_available: log.first_seq,
        });
    }
    Ok(())
}

/// The rule for a page of the events stamped at or after a time, given the first event the
/// page found (`found`) and how many the log retains: events were trimmed (`first_seq > 1`)
/// and any of them may have been stamped at or after that time — the page starts at the
/// oldest retained event, or the log retains none — so the answer would hide a hole.
/// Stamps never decrease along a log, so a page that starts after the oldest retained event
/// proves every trimmed one older than the time.
pub fn since_window(found: Option<Seq>, retained: u64, log: &LogBounds) -> Result<(), WindowError> {
    let trimmed = log.first_seq.0 > 1;
    let may_hide = match found {
        Some(seq) => seq == log.first_seq,
        None => retained == 0,
    };
    if trimmed && may_hide {
        return Err(WindowError::Trimmed {
            after: Seq(log.first_seq.0 - 1),
            first_available: log.first_seq,
        });
    }
    Ok(())
}

/// The window owed to a client at position `after`, which it holds in `client_epoch` (if it
/// knows one).
pub fn replay_window(
    after: Seq,
    client_epoch: Option<&Epoch>,
    log: &LogBounds,
) -> Result<ReplayWindow, WindowError> {
    if let Some(e) = client_epoch
        && *e != log.epoch
    {
        return Err(WindowError::EpochChanged {
            current: log.epoch.clone(),
        });
    }
    if after > log.head {
        return Err(WindowError::BeyondHead {
            after,
            head: log.head,
        });
    }
    if after.next() < log.first_seq {
        return Err(WindowError::Trimmed {
            after,
            first_available: log.first_seq,
        });
    }
    Ok(ReplayWindow {
        from: after.next(),
        to: log.head,
    })
}

/// How many events a session at `after` can never receive because everything before
/// `first_available` is gone, not counting the ones already counted (`counted_through`).
/// This is what `dropped_messages` adds, once per session and event.
pub fn newly_dropped(after: Seq, first_available: Seq, counted_through: Seq) -> u64 {
    let lost_through = first_available.0.saturating_sub(1);
    lost_through.saturating_sub(after.0.max(counted_through.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn bounds(first: u64, head: u64) -> LogBounds {
        LogBounds {
            epoch: Epoch::parse("e1").unwrap(),
            first_seq: Seq(first),
            head: Seq(head),
        }
    }

    #[test]
    fn examples() {
        let b = bounds(41, 100);
        assert_eq!(
            replay_window(Seq(40), None, &b),
            Ok(ReplayWindow {
                from: Seq(41),
                to: Seq(100)
            })
        );
        assert_eq!(replay_window(Seq(100), None, &b).unwrap().len(), 0);
        assert_eq!(
            replay_window(Seq(39), None, &b),
            Err(WindowError::Trimmed {
                after: Seq(39),
                first_available: Seq(41)
            })
        );
        assert_eq!(
            replay_window(Seq(101), None, &b),
            Err(WindowError::BeyondHead {
                after: Seq(101),
                head: Seq(100)
            })
        );
        let other = Epoch::parse("e2").unwrap();
        assert!(matches!(
            replay_window(Seq(50), Some(&other), &b),
            Err(WindowError::EpochChanged { .. })
        ));
        // An empty stream, and a stream whose every event was trimmed.
        assert!(replay_window(Seq(0), None, &bounds(1, 0)).is_ok());
        assert!(replay_window(Seq(10), None, &bounds(11, 10)).is_ok());
        assert!(replay_window(Seq(9), None, &bounds(11, 10)).is_err());
    }

    #[test]
    fn drops_are_counted_once() {
        assert_eq!(newly_dropped(Seq(10), Seq(41), Seq(0)), 30);
        assert_eq!(newly_dropped(Seq(10), Seq(41), Seq(40)), 0);
        assert_eq!(newly_dropped(Seq(10), Seq(51), Seq(40)), 10);
        assert_eq!(newly_dropped(Seq(50), Seq(41), Seq(0)), 0);
    }

    proptest! {
        /// A window, when granted, is exactly the retained events after the position, and it
        /// is granted whenever those events are all retained.
        #[test]
        fn window_is_exact(first in 1u64..200, len in 0u64..200, after in 0u64..450) {
            let head = first + len - if len == 0 { 1 } else { 0 };
            let head = head.max(first.saturating_sub(1));
            let b = bounds(first, head);
            match replay_window(Seq(after), None, &b) {
                Ok(w) => {
                    prop_assert_eq!(w.from.0, after + 1);
                    prop_assert_eq!(w.to.0, head);
                    prop_assert!(w.from >= b.first_seq);
                }
                Err(WindowError::Trimmed { .. }) => prop_assert!(after + 1 < first),
                Err(WindowError::BeyondHead { .. }) => prop_assert!(after > head),
                Err(WindowError::EpochChanged { .. }) => prop_assert!(false),
            }
        }
    }

    #[test]
    fn a_page_before_a_seq_is_refused_where_after_would_be() {
        let b = bounds(41, 100);
        assert!(before_window(Seq(101), None, &b).is_ok(), "the newest page");
        assert!(
            before_window(Seq(42), None, &b).is_ok(),
            "stops at the oldest retained"
        );
        assert_eq!(
            before_window(Seq(41), None, &b),
            Err(WindowError::Trimmed {
                after: Seq(40),
                first_available: Seq(41)
            })
        );
        assert!(matches!(
            before_window(Seq(102), None, &b),
            Err(WindowError::BeyondHead { .. })
        ));
        assert!(before_window(Seq(1), None, &b).is_ok(), "asks for nothing");
        assert!(before_window(Seq(1), None, &bounds(1, 0)).is_ok());
        let other = Epoch::parse("e2").unwrap();
        assert!(matches!(
            before_window(Seq(50), Some(&other), &b),
            Err(WindowError::EpochChanged { .. })
        ));
    }

    #[test]
    fn a_page_since_a_time_is_refused_only_when_it_may_hide_trimmed_events() {
        let trimmed = bounds(41, 100);
        assert!(since_window(Some(Seq(42)), 60, &trimmed).is_ok());
        assert!(
            since_window(None, 60, &trimmed).is_ok(),
            "every event is older"
        );
        assert!(since_window(Some(Seq(41)), 60, &trimmed).is_err());
        assert!(since_window(None, 0, &bounds(101, 100)).is_err());
        let whole = bounds(1, 100);
        assert!(since_window(Some(Seq(1)), 100, &whole).is_ok());
        assert!(since_window(None, 0, &bounds(1, 0)).is_ok());
    }
}
