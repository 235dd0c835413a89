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

use zerodrop_core::checkpoint::{self, AckError};
use zerodrop_core::{AckUpdate, Epoch, Seq, StreamId};

use crate::{
    AppendOutcome, BatchItem, IdempotencyKey, SessionStream, StoreError, StoreResult, StreamInfo,
};

/// What one item of a stream's part of a batch becomes ([`plan_items`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Planned {
    /// A new event, after the part's earlier new ones (contiguous, in the part's order).
    Append,
    /// Its key was recorded by an earlier append with the same body: that append's answer.
    Duplicate { seq: Seq, epoch: Epoch },
    /// Its key is that of the earlier item at this index of the same part, with the same
    /// body: that item's answer.
    SameAs(usize),
}

/// The batch rule for one stream's part, decided before anything of it is written, so the
/// part is written whole or not at all: each item with a key seen before (`seen` answers a
/// key's recorded fingerprint, seq and epoch) is a duplicate when its body's fingerprint is
/// the same, and refuses the whole part (`IdempotencyKeyReused`) when it differs; a key used
/// twice in the part likewise (the second is a duplicate of the first, or refuses the part).
/// A part with anything new to append to a stream closed at `closed` is refused
/// (`StreamClosed`); a part of duplicates only still answers them.
///
/// Spelled out again, to stay atomic, in Redis's `APPEND_BATCH` script (`redis/lua.rs`).
pub fn plan_items<E>(
    items: &[BatchItem],
    closed: Option<Seq>,
    mut seen: impl FnMut(&IdempotencyKey) -> Result<Option<([u8; 32], Seq, Epoch)>, E>,
) -> Result<StoreResult<Vec<Planned>>, E> {
    let mut plan: Vec<Planned> = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let Some(k) = &item.idempotency else {
            plan.push(Planned::Append);
            continue;
        };
        let earlier = items[..i]
            .iter()
            .position(|o| o.idempotency.as_ref().is_some_and(|ok| ok.key == k.key));
        if let Some(j) = earlier {
            let first = items[j].idempotency.as_ref().map(|ok| ok.fingerprint);
            if first != Some(k.fingerprint) {
                return Ok(Err(StoreError::IdempotencyKeyReused));
            }
            // `j` is the first item with this key: its own plan says where the answer is.
            plan.push(match &plan[j] {
                Planned::Duplicate { seq, epoch } => Planned::Duplicate {
                    seq: *seq,
                    epoch: epoch.clone(),
                },
                _ => Planned::SameAs(j),
            });
            continue;
        }
        match seen(k)? {
            Some((fp, _, _)) if fp != k.fingerprint => {
                return Ok(Err(StoreError::IdempotencyKeyReused));
            }
            Some((_, seq, epoch)) => plan.push(Planned::Duplicate { seq, epoch }),
            None => plan.push(Planned::Append),
        }
    }
    if let Some(last_seq) = closed
        && plan.contains(&Planned::Append)
    {
        return Ok(Err(StoreError::StreamClosed { last_seq }));
    }
    Ok(Ok(plan))
}

/// Each item's answer, once the part's new events got `appended` (their seqs and epoch, in
/// the part's order).
pub fn planned_outcomes(
    stream: &StreamId,
    plan: &[Planned],
    appended: &[(Seq, Epoch)],
) -> Vec<AppendOutcome> {
    let mut out: Vec<AppendOutcome> = Vec::with_capacity(plan.len());
    let mut new = appended.iter();
    for p in plan {
        let o = match p {
            Planned::Append => {
                let (seq, epoch) = new
                    .next()
                    .cloned()
                    .unwrap_or_else(|| (Seq(0), Epoch::generate()));
                AppendOutcome {
                    stream: stream.clone(),
                    seq,
                    epoch,
                    duplicate: false,
                }
            }
            Planned::Duplicate { seq, epoch } => AppendOutcome {
                stream: stream.clone(),
                seq: *seq,
                epoch: epoch.clone(),
                duplicate: true,
            },
            Planned::SameAs(j) => AppendOutcome {
                duplicate: true,
                ..out[*j].clone()
            },
        };
        out.push(o);
    }
    out
}

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
