//! The rules every store applies to its own data, in one place, so that `sqlite`, `redis` and
//! `memory` cannot drift apart: what a checkpoint does to a session's stream, what re-adding a
//! stream to a session keeps, which sessions count against a subject's cap, and when something
//! kept for a while (an event under the age limit, an idempotency record, an ended session) is
//! past keeping.
//!
//! Where a backend must decide inside its own engine to stay atomic (a SQL statement in the
//! SQLite writer's transaction, a Lua script on the Redis server), the rule is spelled out
//! there once more, with a comment naming the function here; the behaviour suite
//! (`tests/behaviour.rs`) holds every store to the same answers.
//!
//! Must not: do I/O, hold state, or know how any backend stores anything. The protocol rules
//! underneath (the ack rule, retention's trim plan) are `zerodrop_core`'s; this module only
//! applies them to the store's records.

use zerodrop_core::AckUpdate;
use zerodrop_core::Seq;
use zerodrop_core::checkpoint::{self, AckError};

use crate::{SessionStream, StoreError, StoreResult, StreamInfo};

/// The checkpoint rule applied to a session's stored stream state, against the stream's
/// bounds read in the same atomic step: refused in another epoch, otherwise
/// [`zerodrop_core::checkpoint::apply`] (forward only, never beyond the head). On success the
/// state carries the new ack, for the caller to write back.
pub(crate) fn apply_checkpoint(
    ss: &mut SessionStream,
    info: &StreamInfo,
    seq: Seq,
) -> StoreResult<AckUpdate> {
    if ss.epoch != info.epoch {
        return Err(StoreError::EpochChanged {
            current: info.epoch.clone(),
        });
    }
    let update = checkpoint::apply(ss.ack, seq, info.head).map_err(|e| match e {
        AckError::BeyondHead { requested, head } => StoreError::AckBeyondHead { requested, head },
    })?;
    ss.ack = update.last_ack();
    Ok(update)
}

/// What a session keeps when a stream is (re-)added with `new` while it holds `old`: within the
/// same epoch the ack and the drop count never move backwards (the larger of each is kept); in
/// another epoch the new state replaces the old one.
///
/// Spelled out again, to stay atomic, in the SQLite writer's `session_streams` upsert
/// (`sqlite/sessions.rs`) and in Redis's `SESSION_PUT` script (`redis/lua.rs`).
pub(crate) fn merge_session_stream(
    old: Option<&SessionStream>,
    new: SessionStream,
) -> SessionStream {
    match old {
        Some(old) if old.epoch == new.epoch => SessionStream {
            ack: new.ack.max(old.ack),
            dropped_through: new.dropped_through.max(old.dropped_through),
            epoch: new.epoch,
        },
        _ => new,
    }
}

/// The moment before which something kept for `keep_ms` is past keeping at `now_ms`: an event
/// stamped before it is beyond the age limit, an idempotency record created before it has
/// expired, a session whose window ended before it is deleted. Whatever is stamped at or after
/// it stays.
///
/// Redis's `AGE` script (`redis/lua.rs`) computes the same cutoff from the server's clock.
pub(crate) fn cutoff(now_ms: u64, keep_ms: u64) -> u64 {
    now_ms.saturating_sub(keep_ms)
}

/// How many live sessions one subject (`sub`) may hold; 0: no cap.
///
/// A session is live until its reconnect window ends ([`SessionCap::is_live`]): connected,
/// or disconnected and still resumable. Resuming one never counts again; only creating one
/// does. Every store applies the same two rules below, atomically with the session's creation:
/// the memory store calls them under its lock; the SQLite writer counts with the same
/// comparison in SQL inside its transaction (`sqlite/sessions.rs`) and then calls
/// [`SessionCap::check`]; Redis's `SUBJECT_OPEN` script (`redis/lua.rs`) spells both out once
/// more, on the server.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SessionCap(pub u32);

impl SessionCap {
    /// No cap.
    pub const NONE: SessionCap = SessionCap(0);

    /// A session whose window ends at `expires_at_ms` still counts at `now_ms`.
    pub fn is_live(expires_at_ms: u64, now_ms: u64) -> bool {
        expires_at_ms > now_ms
    }

    /// Whether one more session may open beside `live` live ones. When it may not, the
    /// refusal, given when the earliest of them ends (`earliest_expiry_ms`).
    pub fn check(self, live: u64, earliest_expiry_ms: u64, now_ms: u64) -> StoreResult<()> {
        if self.0 == 0 || live < u64::from(self.0) {
            return Ok(());
        }
        Err(StoreError::TooManySessions {
            cap: self.0,
            retry_after_ms: earliest_expiry_ms.saturating_sub(now_ms),
        })
    }
}

#[cfg(test)]
mod tests {
    use zerodrop_core::Epoch;

    use super::*;

    fn state(epoch: &Epoch, ack: u64, dropped: u64) -> SessionStream {
        SessionStream {
            epoch: epoch.clone(),
            ack: Seq(ack),
            dropped_through: Seq(dropped),
        }
    }

    #[test]
    fn re_adding_a_stream_keeps_the_larger_position_within_an_epoch() {
        let (e1, e2) = (Epoch::generate(), Epoch::generate());
        let old = state(&e1, 9, 4);
        assert_eq!(
            merge_session_stream(Some(&old), state(&e1, 3, 7)),
            state(&e1, 9, 7)
        );
        assert_eq!(
            merge_session_stream(Some(&old), state(&e2, 3, 0)),
            state(&e2, 3, 0)
        );
        assert_eq!(
            merge_session_stream(None, state(&e1, 1, 0)),
            state(&e1, 1, 0)
        );
    }

    #[test]
    fn a_checkpoint_moves_forward_within_its_epoch_only() {
        let epoch = Epoch::generate();
        let mut info = StreamInfo::empty(zerodrop_core::StreamId::new("s").unwrap(), epoch.clone());
        info.head = Seq(10);
        let mut ss = state(&epoch, 4, 0);
        assert!(
            apply_checkpoint(&mut ss, &info, Seq(7))
                .unwrap()
                .is_applied()
        );
        assert_eq!(ss.ack, Seq(7));
        assert!(
            !apply_checkpoint(&mut ss, &info, Seq(5))
                .unwrap()
                .is_applied()
        );
        assert_eq!(ss.ack, Seq(7));
        assert!(matches!(
            apply_checkpoint(&mut ss, &info, Seq(11)),
            Err(StoreError::AckBeyondHead { .. })
        ));
        let mut other = state(&Epoch::generate(), 4, 0);
        assert!(matches!(
            apply_checkpoint(&mut other, &info, Seq(5)),
            Err(StoreError::EpochChanged { .. })
        ));
    }

    #[test]
    fn the_cap_counts_sessions_whose_window_has_not_ended() {
        assert!(SessionCap::is_live(1_001, 1_000));
        assert!(!SessionCap::is_live(1_000, 1_000));
        assert!(SessionCap::NONE.check(1_000, 0, 0).is_ok());
        assert!(SessionCap(2).check(1, 5_000, 1_000).is_ok());
        assert_eq!(
            SessionCap(2).check(2, 5_000, 1_000),
            Err(StoreError::TooManySessions {
                cap: 2,
                retry_after_ms: 4_000
            })
        );
        assert_eq!(cutoff(1_000, 300), 700);
        assert_eq!(cutoff(100, 300), 0);
    }
}
