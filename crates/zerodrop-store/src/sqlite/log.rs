//! The log itself: an append (the next seq, the event encoded once and inserted, in the
//! writer's batch) and the reads (bounds, events after a position, the chained digest), each
//! read in one snapshot so bounds and events agree.
//!
//! Must not: trim (`retention.rs` does, in the same batch) or decide a duplicate
//! (`idempotency.rs` does, before the append).

use std::sync::Arc;
use std::time::Instant;

use rusqlite::{Connection, OptionalExtension, params};
use zerodrop_core::hash::ChainHash;
use zerodrop_core::{Epoch, Event, Seq, StreamId};

use super::chunk::{Stored, walk, walk_back};
use super::readers::snapshot;
use super::writer::{BatchEffects, Writer, meta_info};
use crate::rules::{plan_items, planned_outcomes};
use crate::{
    AppendOutcome, AppendRequest, BatchOutcome, IdempotencyKey, Planned, ReadRange, ReadResult,
    StoreError, StoreResult, StreamBatch, StreamInfo,
};

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
        let meta = self.meta(&req.stream)?;
        if meta.closed {
            return Ok(Err(StoreError::StreamClosed {
                last_seq: Seq(meta.head),
            }));
        }
        let now = self.stamp();
        let (seq, epoch) =
            self.append_event(&req.stream, &req.data, req.idempotency.as_ref(), now, fx)?;
        Ok(Ok(AppendOutcome {
            stream: req.stream,
            seq,
            epoch,
            duplicate: false,
        }))
    }

    /// The clock, read once per command: every event a command appends has the same `ts`.
    fn stamp(&self) -> (u64, Instant) {
        (self.clock.now_ms(), Instant::now())
    }

    /// The next seq of `stream`: the event encoded once and added to the stream's chunk, its
    /// key recorded, in this batch.
    fn append_event(
        &mut self,
        stream: &StreamId,
        data: &str,
        key: Option<&IdempotencyKey>,
        (now_ms, now): (u64, Instant),
        fx: &mut BatchEffects,
    ) -> rusqlite::Result<(Seq, Epoch)> {
        let ts = now_ms.max(self.last_ts);
        self.last_ts = ts;
        let meta = self.meta(stream)?;
        let seq = Seq(meta.head + 1);
        let epoch = meta.epoch.clone();
        let event = Event::encode(stream.clone(), seq, epoch.clone(), ts, data);
        let len = event.json().len() as u64;
        meta.head = seq.0;
        meta.count += 1;
        meta.bytes += len;
        meta.last_ts = ts;
        self.chunk_event(stream, seq.0, ts, data.as_bytes())?;
        if let Some(k) = key {
            self.record_idempotent(stream, k, seq, &epoch, ts)?;
        }
        if !fx.touched.contains(stream) {
            fx.touched.insert(stream.clone());
        }
        fx.events.push(Arc::new(event.with_committed_at(now)));
        Ok((seq, epoch))
    }

    /// Every stream's part of a batch in this one transaction: each part planned whole first
    /// (`plan_items`), so a refused part writes nothing.
    pub(super) fn append_batch(
        &mut self,
        batch: Vec<StreamBatch>,
        fx: &mut BatchEffects,
    ) -> rusqlite::Result<StoreResult<BatchOutcome>> {
        let mut results = Vec::with_capacity(batch.len());
        let now = self.stamp();
        for part in batch {
            let meta = self.meta(&part.stream)?;
            let closed = meta.closed.then_some(Seq(meta.head));
            let plan = match plan_items(&part.items, closed, |k| {
                self.lookup_idempotent(&part.stream, &k.key)
            })? {
                Ok(plan) => plan,
                Err(e) => {
                    results.push(Err(e));
                    continue;
                }
            };
            let mut appended = Vec::new();
            for (item, p) in part.items.iter().zip(&plan) {
                match p {
                    Planned::Append => {
                        let at = self.append_event(
                            &part.stream,
                            &item.data,
                            item.idempotency.as_ref(),
                            now,
                            fx,
                        )?;
                        appended.push(at);
                    }
                    Planned::Duplicate { .. } | Planned::SameAs(_) => {
                        if let Some(k) = &item.idempotency {
                            self.count_hit(&part.stream, &k.key)?;
                        }
                    }
                }
            }
            results.push(Ok(planned_outcomes(&part.stream, &plan, &appended)));
        }
        Ok(Ok(results))
    }

    /// Whether the store holds anything of `stream` (a row, or a write in this batch).
    fn known(&mut self, stream: &StreamId) -> rusqlite::Result<bool> {
        if self.cache.contains_key(stream) {
            return Ok(true);
        }
        self.conn
            .prepare_cached("SELECT 1 FROM streams WHERE stream = ?1")?
            .exists(params![stream.as_str()])
    }

    /// Erases the log and its keys; the stream goes on, empty and open, in a new epoch.
    pub(super) fn delete_stream(
        &mut self,
        stream: &StreamId,
        fx: &mut BatchEffects,
    ) -> rusqlite::Result<StoreResult<Option<StreamInfo>>> {
        if !self.known(stream)? {
            return Ok(Ok(None));
        }
        // This batch's events of the stream go with the rest.
        self.open.remove(stream);
        self.conn
            .prepare_cached("DELETE FROM chunks WHERE stream = ?1")?
            .execute(params![stream.as_str()])?;
        self.conn
            .prepare_cached("DELETE FROM idempotency WHERE stream = ?1")?
            .execute(params![stream.as_str()])?;
        let meta = self.meta(stream)?;
        meta.epoch = Epoch::generate();
        meta.head = 0;
        meta.first = 1;
        meta.count = 0;
        meta.bytes = 0;
        meta.closed = false;
        let info = meta_info(stream, meta);
        fx.touched.insert(stream.clone());
        fx.trims.retain(|(s, _, _)| s != stream);
        fx.recreated.push(stream.clone());
        Ok(Ok(Some(info)))
    }

    pub(super) fn close_stream(
        &mut self,
        stream: &StreamId,
        fx: &mut BatchEffects,
    ) -> rusqlite::Result<StoreResult<Option<StreamInfo>>> {
        if !self.known(stream)? {
            return Ok(Ok(None));
        }
        let meta = self.meta(stream)?;
        let newly = !meta.closed;
        meta.closed = true;
        let info = meta_info(stream, meta);
        if newly {
            fx.touched.insert(stream.clone());
            fx.closed.push((stream.clone(), info.head));
        }
        Ok(Ok(Some(info)))
    }
}

pub(super) fn read_events(
    c: &Connection,
    stream: &StreamId,
    epoch: &Epoch,
    range: ReadRange,
    limit: usize,
) -> rusqlite::Result<ReadResult> {
    snapshot(c, |c| {
        let info = read_info(c, stream, epoch)?;
        let mut events = Vec::new();
        if limit == 0 {
            return Ok(ReadResult { info, events });
        }
        let first = info.first_seq.0;
        let mut add = |e: &Stored<'_>| {
            events.push(Arc::new(e.event(stream, &info.epoch)?));
            Ok(events.len() < limit)
        };
        match range {
            ReadRange::After(s) => walk(c, stream, s.0.saturating_add(1).max(first), add)?,
            ReadRange::Before(s) => walk_back(c, stream, s.0, |e| Ok(e.seq >= first && add(e)?))?,
            ReadRange::Since(ts) => walk(c, stream, first, |e| Ok(e.ts < ts || add(e)?))?,
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
            "SELECT epoch, head, first_seq, count, bytes, closed FROM streams WHERE stream = ?1",
        )?
        .query_row(params![stream.as_str()], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, i64>(4)?,
                r.get::<_, i64>(5)?,
            ))
        })
        .optional()?;
    Ok(match row {
        Some((e, head, first, count, bytes, closed)) => StreamInfo {
            stream: stream.clone(),
            epoch: Epoch::parse(&e).unwrap_or_else(|| epoch.clone()),
            head: Seq(head as u64),
            first_seq: Seq(first as u64),
            count: count as u64,
            bytes: bytes as u64,
            closed: closed != 0,
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
        walk(c, stream, info.first_seq.0, |e| {
            h.push(e.event(stream, &info.epoch)?.json());
            Ok(true)
        })?;
        Ok((info, h.hex()))
    })
}
