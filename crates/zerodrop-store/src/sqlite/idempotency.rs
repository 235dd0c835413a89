//! Publish `Idempotency-Key`s: a key seen before answers the first append's seq and epoch
//! (counted as a hit in the same commit), or `IdempotencyKeyReused` for another body; a new
//! key is recorded in the commit of the append it answers for. Expired keys are swept with the
//! other expired rows (`retention.rs`); listing them is `guard.rs`'.
//!
//! Must not: record a key in any commit but its append's.

use rusqlite::{OptionalExtension, params};
use zerodrop_core::{Epoch, Seq, StreamId};

use super::writer::Writer;
use crate::{AppendOutcome, IdempotencyKey, StoreError, StoreResult};

impl Writer {
    /// The answer to a key seen before (its hit counted in this batch), or `None` for a new
    /// key.
    pub(super) fn find_idempotent(
        &mut self,
        stream: &StreamId,
        k: &IdempotencyKey,
    ) -> rusqlite::Result<Option<StoreResult<AppendOutcome>>> {
        let found = self
            .conn
            .prepare_cached(
                "SELECT fingerprint, seq, epoch FROM idempotency WHERE stream = ?1 AND key = ?2",
            )?
            .query_row(params![stream.as_str(), k.key], |r| {
                Ok((
                    r.get::<_, Vec<u8>>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                ))
            })
            .optional()?;
        let Some((fp, seq, epoch)) = found else {
            return Ok(None);
        };
        if fp.as_slice() != k.fingerprint.as_slice() {
            return Ok(Some(Err(StoreError::IdempotencyKeyReused)));
        }
        // Counted in the commit that answers the duplicate (the batch commits either way).
        self.conn
            .prepare_cached(
                "UPDATE idempotency SET hit_count = hit_count + 1 WHERE stream = ?1 AND key = ?2",
            )?
            .execute(params![stream.as_str(), k.key])?;
        Ok(Some(Ok(AppendOutcome {
            stream: stream.clone(),
            seq: Seq(seq as u64),
            epoch: Epoch::parse(&epoch).unwrap_or_else(|| self.epoch.clone()),
            duplicate: true,
        })))
    }

    /// Records a new key, in the commit of the append it answers for.
    pub(super) fn record_idempotent(
        &mut self,
        stream: &StreamId,
        k: &IdempotencyKey,
        seq: Seq,
        epoch: &Epoch,
        ts: u64,
    ) -> rusqlite::Result<()> {
        self.conn
            .prepare_cached(
                "INSERT INTO idempotency (stream, key, fingerprint, seq, epoch, created_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?
            .execute(params![
                stream.as_str(),
                k.key,
                &k.fingerprint[..],
                seq.0 as i64,
                epoch.as_str(),
                ts as i64
            ])?;
        Ok(())
    }
}
