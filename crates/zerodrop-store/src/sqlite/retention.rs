//! What the writer removes over time: the count and size limits after each batch's appends
//! (`zerodrop_core::retention::plan_trim`, with each stream's own limits), the age limit at
//! least every second, and once a minute the expired idempotency keys, webhook records and
//! sessions. Every trim is recorded in the batch, for the sink to hear after `COMMIT`.
//!
//! The age limit is swept in two ways. The table's oldest rows (rowid order: `ts` never goes
//! backwards) go once they are older than the longest age any stream keeps, whatever their
//! stream. When stream patterns keep events for different ages, the streams with a shorter
//! age than the longest are also visited one by one, [`AGE_SWEEP_STREAMS`] per sweep in name
//! order, each trimmed to its own age: with many streams a shorter age is enforced within
//! `streams / AGE_SWEEP_STREAMS` sweeps rather than within one.
//!
//! Must not: trim outside the writer's batch, or hold the writer for long (an age sweep removes
//! at most [`MAX_AGE_SWEEP_ROWS`] rows each way).

use rusqlite::{OptionalExtension, params};
use zerodrop_core::retention::{plan_trim, trim_reads};
use zerodrop_core::{Seq, StreamId};

use super::chunk;
use super::idempotency;
use super::writer::{BatchEffects, Meta, Writer, record_trim};
use crate::rules::cutoff;

/// Rows removed per age sweep at most, so a sweep never holds the writer for long.
const MAX_AGE_SWEEP_ROWS: i64 = 50_000;
/// Streams visited per sweep by the stream-by-stream age sweep.
const AGE_SWEEP_STREAMS: i64 = 1_000;

impl Writer {
    /// Count and size limits, for the streams this batch appended to (`plan_trim`, from the
    /// `trim_reads` oldest events, read again twice as far in the rare case a plan takes all
    /// it was given).
    pub(super) fn enforce_retention(&mut self, fx: &mut BatchEffects) -> rusqlite::Result<()> {
        let touched: Vec<StreamId> = fx.touched.iter().cloned().collect();
        for stream in touched {
            let limits = *self.retention.for_stream(stream.as_str());
            let m = self.meta(&stream)?.clone();
            let mut want = trim_reads(m.count, m.bytes, &limits);
            if want == 0 {
                continue;
            }
            if m.bytes <= limits.max_bytes {
                // Only the count limit binds (the common case of a busy stream): exactly the
                // `want` oldest go, and their sizes are read as they are deleted.
                self.trim_oldest(&stream, &m, want, fx)?;
                continue;
            }
            let trim = loop {
                let mut oldest: Vec<(Seq, u64)> = Vec::new();
                chunk::walk(&self.conn, &stream, m.first, |e| {
                    oldest.push((Seq(e.seq), e.json_len(&stream, &m.epoch)));
                    Ok((oldest.len() as u64) < want)
                })?;
                let fetched = oldest.len() as u64;
                let trim = plan_trim(m.count, m.bytes, &limits, oldest);
                if trim.is_none_or(|t| t.count < fetched) || fetched < want {
                    break trim;
                }
                want *= 2;
            };
            let Some(trim) = trim else {
                continue;
            };
            self.delete_through(&stream, trim.through.0, trim.count, trim.bytes, fx)?;
        }
        Ok(())
    }

    /// Removes the `n` oldest events of `stream` (from its `first` on): their sizes are read
    /// from their chunks' headers, then the chunks they fill are deleted.
    fn trim_oldest(
        &mut self,
        stream: &StreamId,
        m: &Meta,
        n: u64,
        fx: &mut BatchEffects,
    ) -> rusqlite::Result<()> {
        let mut seen = 0;
        let oldest = chunk::measure(&self.conn, stream, &m.epoch, m.first, |_| {
            seen += 1;
            seen <= n
        })?;
        let Some((count, through, bytes)) = oldest else {
            return Ok(());
        };
        self.delete_through(stream, through, count, bytes, fx)
    }

    /// Deletes `stream`'s events through `through` (`count` of them, `bytes` in all: the
    /// caller read them), whole chunks in one range delete, and moves its record
    /// ([`Self::forget_oldest`]).
    fn delete_through(
        &mut self,
        stream: &StreamId,
        through: u64,
        count: u64,
        bytes: u64,
        fx: &mut BatchEffects,
    ) -> rusqlite::Result<()> {
        chunk::delete_through(&self.conn, stream, through)?;
        self.forget_oldest(stream, through, count, bytes, fx)
    }

    /// The stream's record after its oldest events through `through` were deleted (`count`
    /// of them, `bytes` in all): its bounds move, and the trim is told to the live path.
    fn forget_oldest(
        &mut self,
        stream: &StreamId,
        through: u64,
        count: u64,
        bytes: u64,
        fx: &mut BatchEffects,
    ) -> rusqlite::Result<()> {
        let meta = self.meta(stream)?;
        meta.first = meta.first.max(through + 1);
        meta.count = meta.count.saturating_sub(count);
        meta.bytes = meta.bytes.saturating_sub(bytes);
        let first = Seq(meta.first);
        fx.touched.insert(stream.clone());
        record_trim(fx, stream, first, count);
        Ok(())
    }

    /// Age limit: the longest age over the whole table, then each shorter one stream by stream.
    pub(super) fn sweep_age(&mut self, fx: &mut BatchEffects) -> rusqlite::Result<()> {
        self.sweep_age_prefix(fx)?;
        if !self.retention.one_age() {
            self.sweep_age_streams(fx)?;
        }
        Ok(())
    }

    /// The streams whose age is shorter than the longest, from the cursor on: each trimmed
    /// (a prefix of its seqs, since its `ts` never goes backwards) to its own age.
    fn sweep_age_streams(&mut self, fx: &mut BatchEffects) -> rusqlite::Result<()> {
        let now = self.clock.now_ms();
        let longest = self.retention.longest_age_ms();
        let names: Vec<String> = self
            .conn
            .prepare_cached(
                "SELECT stream FROM streams WHERE stream > ?1 AND count > 0
                 ORDER BY stream LIMIT ?2",
            )?
            .query_map(params![self.age_cursor, AGE_SWEEP_STREAMS], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        let mut removed = 0i64;
        let mut last = String::new();
        let full = names.len() as i64 == AGE_SWEEP_STREAMS;
        for name in names {
            if removed >= MAX_AGE_SWEEP_ROWS {
                break;
            }
            last.clone_from(&name);
            let age = self.retention.for_stream(&name).max_age_ms;
            let Ok(stream) = StreamId::new(&name) else {
                continue;
            };
            if age >= longest {
                continue; // the prefix sweep keeps it
            }
            let cut = cutoff(now, age);
            let m = self.meta(&stream)?;
            let (first, epoch) = (m.first, m.epoch.clone());
            let expired = chunk::measure(&self.conn, &stream, &epoch, first, |e| e.ts < cut)?;
            let Some((count, max_seq, bytes)) = expired else {
                continue;
            };
            self.delete_through(&stream, max_seq, count, bytes, fx)?;
            removed += count as i64;
        }
        self.age_cursor = if full || removed >= MAX_AGE_SWEEP_ROWS {
            last
        } else {
            String::new()
        };
        Ok(())
    }

    /// The longest age: a prefix of the table in rowid order (`last_ts` never goes backwards
    /// from one batch's chunks to the next), whole chunks whose newest event is past it.
    fn sweep_age_prefix(&mut self, fx: &mut BatchEffects) -> rusqlite::Result<()> {
        let age_cut = cutoff(self.clock.now_ms(), self.retention.longest_age_ms()) as i64;
        let oldest: Option<(i64, i64)> = self
            .conn
            .prepare_cached("SELECT id, last_ts FROM chunks ORDER BY id LIMIT 1")?
            .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        let Some((first_id, first_ts)) = oldest else {
            return Ok(());
        };
        if first_ts >= age_cut {
            return Ok(());
        }
        let boundary: Option<i64> = self
            .conn
            .prepare_cached("SELECT id FROM chunks WHERE last_ts >= ?1 ORDER BY id LIMIT 1")?
            .query_row(params![age_cut], |r| r.get(0))
            .optional()?;
        let last_expired = match boundary {
            Some(b) => b - 1,
            None => self
                .conn
                .query_row("SELECT MAX(id) FROM chunks", [], |r| r.get(0))?,
        };
        let upto = last_expired.min(first_id + MAX_AGE_SWEEP_ROWS);
        let groups: Vec<(String, i64)> = self
            .conn
            .prepare_cached("SELECT stream, MAX(last) FROM chunks WHERE id <= ?1 GROUP BY stream")?
            .query_map(params![upto], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        // Each stream's chunks in the prefix are its oldest: what they hold that is not hidden
        // already is measured before they go.
        let mut gone = Vec::with_capacity(groups.len());
        for (stream, max_seq) in groups {
            let Ok(stream) = StreamId::new(&stream) else {
                continue;
            };
            let m = self.meta(&stream)?;
            let (first, epoch) = (m.first, m.epoch.clone());
            let through = max_seq as u64;
            let measured =
                chunk::measure(&self.conn, &stream, &epoch, first, |e| e.seq <= through)?;
            if let Some(m) = measured {
                gone.push((stream, m));
            }
        }
        self.conn
            .prepare_cached("DELETE FROM chunks WHERE id <= ?1")?
            .execute(params![upto])?;
        for (stream, (count, through, bytes)) in gone {
            self.forget_oldest(&stream, through, count, bytes, fx)?;
        }
        Ok(())
    }

    pub(super) fn sweep_expired(&mut self) -> rusqlite::Result<()> {
        let now = self.clock.now_ms();
        let idem_cut = cutoff(now, self.idempotency_ttl_ms) as i64;
        self.conn.execute(
            "DELETE FROM idempotency WHERE created_ms < ?1",
            params![idem_cut],
        )?;
        idempotency::sweep_expired(&self.conn, now)?;
        let sess_cut = cutoff(now, self.session_grace_ms) as i64;
        self.conn.execute(
            "DELETE FROM session_streams WHERE session_id IN
             (SELECT id FROM sessions WHERE expires_ms < ?1)",
            params![sess_cut],
        )?;
        self.conn.execute(
            "DELETE FROM sessions WHERE expires_ms < ?1",
            params![sess_cut],
        )?;
        Ok(())
    }
}
