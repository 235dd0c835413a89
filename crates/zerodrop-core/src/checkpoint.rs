//! The checkpoint (ack) rule.
//!
//! An ack says "I have everything up to seq N". It only ever moves forward: an ack at or below
//! the stored one is `ignored` and changes nothing; an ack beyond the stream's head is refused.
//! Every transport (HTTP checkpoint, WebSocket `ack`, the `lastAck` of a resume) and every
//! store calls [`apply`]; nothing else decides.

use crate::ids::Seq;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AckUpdate {
    /// The stored ack moved forward to the new value.
    Applied(Seq),
    /// The ack was at or below the stored one; the stored value stays.
    Ignored(Seq),
}

impl AckUpdate {
    /// The ack as stored after this update.
    pub fn last_ack(self) -> Seq {
        match self {
            AckUpdate::Applied(s) | AckUpdate::Ignored(s) => s,
        }
    }

    pub fn is_applied(self) -> bool {
        matches!(self, AckUpdate::Applied(_))
    }

    pub fn as_str(self) -> &'static str {
        match self {
            AckUpdate::Applied(_) => "applied",
            AckUpdate::Ignored(_) => "ignored",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AckError {
    #[error("ack {requested} is beyond the stream head {head}")]
    BeyondHead { requested: Seq, head: Seq },
}

/// Applies an ack of `requested` to a stored ack of `stored`, on a stream whose head is `head`.
pub fn apply(stored: Seq, requested: Seq, head: Seq) -> Result<AckUpdate, AckError> {
    if requested > head {
        return Err(AckError::BeyondHead { requested, head });
    }
    if requested > stored {
        Ok(AckUpdate::Applied(requested))
    } else {
        Ok(AckUpdate::Ignored(stored))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn examples() {
        assert_eq!(
            apply(Seq(3), Seq(5), Seq(9)),
            Ok(AckUpdate::Applied(Seq(5)))
        );
        assert_eq!(
            apply(Seq(5), Seq(5), Seq(9)),
            Ok(AckUpdate::Ignored(Seq(5)))
        );
        assert_eq!(
            apply(Seq(5), Seq(2), Seq(9)),
            Ok(AckUpdate::Ignored(Seq(5)))
        );
        assert_eq!(
            apply(Seq(5), Seq(10), Seq(9)),
            Err(AckError::BeyondHead {
                requested: Seq(10),
                head: Seq(9)
            })
        );
        assert_eq!(
            apply(Seq(0), Seq(0), Seq(0)),
            Ok(AckUpdate::Ignored(Seq(0)))
        );
    }

    proptest! {
        /// Any sequence of acks leaves the stored value equal to the largest valid ack seen,
        /// never regresses, and never exceeds the head.
        #[test]
        fn acks_are_monotonic(head in 0u64..1000, acks in proptest::collection::vec(0u64..1200, 0..64)) {
            let mut stored = Seq(0);
            let mut best = 0u64;
            for a in acks {
                let before = stored;
                match apply(stored, Seq(a), Seq(head)) {
                    Ok(u) => {
                        prop_assert!(a <= head);
                        stored = u.last_ack();
                        prop_assert_eq!(u.is_applied(), a > before.0);
                        best = best.max(a);
                    }
                    Err(AckError::BeyondHead { .. }) => prop_assert!(a > head),
                }
                prop_assert!(stored >= before);
                prop_assert!(stored.0 <= head);
            }
            prop_assert_eq!(stored.0, best);
        }
    }
}
