//! The log itself: an append (the next seq, the event encoded once and inserted, in the
//! writer's batch) and the reads (bounds, events after a position, the chained digest), each
//! read in one snapshot so bounds and events agree.
//!
//! Must not: trim (`retention.rs` does, in the same batch) or decide a duplicate
//! (`idempotency.rs` does, before the append).

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use rusqlite::{Connection, OptionalExtension, params};
use zerodrop_core::hash::ChainHash;
use zerodrop_core::{Epoch, Event, Seq, StreamId};

use super::readers::snapshot;
use super::writer::{BatchEffects, Writer};
use crate::{AppendOutcome, AppendRequest, ReadResult, StoreResult, StreamInfo};

impl Writer {
    pub(super) fn append(
        &mut self,
        req: AppendRequest,
        fx: &mut BatchEffects,
    ) -> rusqlite::Result<StoreResult<AppendOutcome>> {
        if let Some(k) = &req.idempotency
            && let Some(r) = self.find_idempotent(&req.stream, k)?
        {
            return Ok(r);
        }
        let ts = self.clock.now_ms().max(self.last_ts);
        self.last_ts = ts;
        let meta = self.meta(&req.stream)?;
        let seq = Seq(meta.head + 1);
        let epoch = meta.epoch.clone();
        let event = Event::encode(req.stream.clone(), seq, epoch.clone(), ts, &req.data);
        let len = event.json().len() as u64;
        meta.head = seq.0;
        meta.count += 1;
        meta.bytes += len;
        meta.last_ts = ts;
        self.conn
            .prepare_cached("INSERT INTO events (stream, seq, ts, json) VALUES (?1, ?2, ?3, ?4)")?
            .execute(params![
                req.stream.as_str(),
                seq.0 as i64,
                ts as i64,
                &event.json()[..]
            ])?;
        if let Some(k) = &req.idempotency {
            self.record_idempotent(&req.stream, k, seq, &epoch, ts)?;
        }
        fx.touched.insert(req.stream.clone());
        fx.events
            .push(Arc::new(event.with_committed_at(Instant::now())));
        Ok(Ok(AppendOutcome {
            stream: req.stream,
            seq,
            epoch,
            duplicate: false,
        }))
    }
}

pub(super) fn read_events(
    c: &Connection,
    stream: &StreamId,
    epoch: &Epoch,
    after: Seq,
    limit: usize,
) -> rusqlite::Result<ReadResult> {
    snapshot(c, |c| {
        let info = read_info(c, stream, epoch)?;
        let mut events = Vec::new();
        let mut stmt = c.prepare_cached(
            "SELECT seq, ts, json FROM events WHERE stream = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
        )?;
        let rows = stmt.query_map(
            params![stream.as_str(), after.0 as i64, limit as i64],
            |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, Vec<u8>>(2)?,
                ))
            },
        )?;
        for row in rows {
            let (seq, ts, json) = row?;
            events.push(Arc::new(Event::from_stored(
                stream.clone(),
                Seq(seq as u64),
                info.epoch.clone(),
                ts as u64,
                Bytes::from(json),
            )));
        }
        Ok(ReadResult { info, events })
    })
}

pub(super) fn read_info(
    conn: &Connection,
    stream: &StreamId,
    epoch: &Epoch,
) -> rusqlite::Result<StreamInfo> {
    let row = conn
        .prepare_cached(
            "SELECT epoch, head, first_seq, count, bytes FROM streams WHERE stream = ?1",
        )?
        .query_row(params![stream.as_str()], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, i64>(4)?,
            ))
        })
        .optional()?;
    Ok(match row {
        Some((e, head, first, count, bytes)) => StreamInfo {
            stream: stream.clone(),
            epoch: Epoch::parse(&e).unwrap_or_else(|| epoch.clone()),
            head: Seq(head as u64),
            first_seq: Seq(first as u64),
            count: count as u64,
            bytes: bytes as u64,
        },
        None => StreamInfo::empty(stream.clone(), epoch.clone()),
    })
}

/// The bounds and the chained digest of every retained event, from one snapshot.
pub(super) fn digest(
    c: &Connection,
    stream: &StreamId,
    epoch: &Epoch,
) -> rusqlite::Result<(StreamInfo, String)> {
    snapshot(c, |c| {
        let info = read_info(c, stream, epoch)?;
        let mut h = ChainHash::default();
        let mut stmt =
            c.prepare_cached("SELECT json FROM events WHERE stream = ?1 ORDER BY seq")?;
        let mut rows = stmt.query(params![stream.as_str()])?;
        while let Some(r) = rows.next()? {
            h.push(r.get_ref(0)?.as_blob()?);
        }
        Ok((info, h.hex()))
    })
}
