//! How the log lies in the file: the events one batch (one transaction) appends to a stream
//! are one row of `chunks`, not one row each. A row holds a run of consecutive seqs
//! (`seq` … `last`), the newest event's time (`last_ts`) and a body that is each event in
//! turn: its `ts` (8 bytes, little-endian), the length of its `data` (4 bytes) and the `data`.
//! The writer gathers a stream's new events in an [`OpenChunk`] and inserts it before the
//! batch reads or trims the log, and before `COMMIT`; a chunk is cut at [`CHUNK_MAX_EVENTS`]
//! or [`CHUNK_MAX_BYTES`], so that a read of one event never loads much more.
//!
//! A chunk keeps each event's `data`, not its whole JSON: the rest (`stream`, `seq`, `epoch`,
//! `ts`) is the row's or the stream's, and a read encodes the event again
//! ([`Event::encode`], byte for byte what the append made, since a stream's epoch changes only
//! with an erasure that deletes its chunks). About a third fewer bytes for the commit to
//! write and the checkpointer to copy at 200-byte events.
//!
//! Why: each row costs two B-tree inserts (the table and its `(stream, last)` index) and, at
//! the retention limit, two deletes. At 200-byte events these were most of the writer's work;
//! a batch of many events per stream now pays them once per chunk (docs/benchmarks.md).
//!
//! Trims remove whole chunks. A chunk that a trim reaches into stays until its last event is
//! trimmed: its events before the stream's `first_seq` are hidden by every read (they are
//! read from the same snapshot as the bounds), and counted in neither `count` nor `bytes`.
//! Erasing a stream (`DELETE`) removes all its chunks at once.
//!
//! Must not: be read without the stream's bounds from the same snapshot (a hidden event would
//! show), or hold an open chunk across a batch (it is flushed or dropped with the batch).

use rusqlite::{Connection, params};
use zerodrop_core::{Epoch, Event, Seq, StreamId};

use super::writer::Writer;

/// Events in one chunk at most.
const CHUNK_MAX_EVENTS: u64 = 256;
/// Body bytes in one chunk at most (an event larger than this is a chunk of its own).
const CHUNK_MAX_BYTES: usize = 32 * 1024;

const HEADER: usize = 12;

/// A stream's events appended in this batch and not yet inserted.
pub(super) struct OpenChunk {
    first: u64,
    last: u64,
    last_ts: u64,
    body: Vec<u8>,
}

/// One stored event, borrowed from its chunk's body.
pub(super) struct Stored<'a> {
    pub(super) seq: u64,
    pub(super) ts: u64,
    /// The event's `data`, compact JSON.
    pub(super) data: &'a [u8],
}

impl Stored<'_> {
    /// The event, encoded again as the append encoded it.
    pub(super) fn event(&self, stream: &StreamId, epoch: &Epoch) -> rusqlite::Result<Event> {
        let data = std::str::from_utf8(self.data).map_err(|_| damaged())?;
        Ok(Event::encode(
            stream.clone(),
            Seq(self.seq),
            epoch.clone(),
            self.ts,
            data,
        ))
    }

    /// The length of the event's JSON: what `bytes` counts.
    pub(super) fn json_len(&self, stream: &StreamId, epoch: &Epoch) -> u64 {
        Event::encoded_len(stream, Seq(self.seq), epoch, self.ts, self.data.len()) as u64
    }
}

/// The events of a chunk body whose first event is `seq`, in order. A body that does not
/// decode is a damaged file: the read fails as SQLite's own damage does (`SQLITE_CORRUPT`).
pub(super) fn events(seq: u64, body: &[u8]) -> Events<'_> {
    Events {
        body,
        seq,
        failed: false,
    }
}

pub(super) struct Events<'a> {
    body: &'a [u8],
    seq: u64,
    failed: bool,
}

impl<'a> Iterator for Events<'a> {
    type Item = rusqlite::Result<Stored<'a>>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.body.is_empty() || self.failed {
            return None;
        }
        let Some((head, rest)) = self.body.split_at_checked(HEADER) else {
            self.failed = true;
            return Some(Err(damaged()));
        };
        let ts = u64::from_le_bytes(head[..8].try_into().expect("8 bytes"));
        let len = u32::from_le_bytes(head[8..].try_into().expect("4 bytes")) as usize;
        let Some((data, rest)) = rest.split_at_checked(len) else {
            self.failed = true;
            return Some(Err(damaged()));
        };
        self.body = rest;
        let seq = self.seq;
        self.seq += 1;
        Some(Ok(Stored { seq, ts, data }))
    }
}

fn damaged() -> rusqlite::Error {
    rusqlite::Error::SqliteFailure(
        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CORRUPT),
        Some("a chunk of the log does not decode".into()),
    )
}

/// Calls `f` with each stored event of `stream` from seq `from` on, in seq order, until it
/// answers `false` or fails (events before `from`, hidden or asked past, are skipped).
pub(super) fn walk(
    c: &Connection,
    stream: &StreamId,
    from: u64,
    mut f: impl FnMut(&Stored<'_>) -> rusqlite::Result<bool>,
) -> rusqlite::Result<()> {
    let mut stmt = c.prepare_cached(
        "SELECT seq, body FROM chunks WHERE stream = ?1 AND last >= ?2 ORDER BY last",
    )?;
    let mut rows = stmt.query(params![stream.as_str(), clamp(from)])?;
    while let Some(r) = rows.next()? {
        let seq = r.get::<_, i64>(0)? as u64;
        for e in events(seq, r.get_ref(1)?.as_blob()?) {
            let e = e?;
            if e.seq >= from && !f(&e)? {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// Calls `f` with each stored event of `stream` before seq `before`, newest first, until it
/// answers `false` or fails.
pub(super) fn walk_back(
    c: &Connection,
    stream: &StreamId,
    before: u64,
    mut f: impl FnMut(&Stored<'_>) -> rusqlite::Result<bool>,
) -> rusqlite::Result<()> {
    if before == 0 {
        return Ok(());
    }
    // The chunk holding `before - 1` (or the newest, if that is past the head), then each
    // older one.
    let mut stmt = c.prepare_cached(
        "SELECT seq, body FROM chunks WHERE stream = ?1 AND last <= coalesce(
           (SELECT last FROM chunks WHERE stream = ?1 AND last >= ?2 ORDER BY last LIMIT 1),
           9223372036854775807)
         ORDER BY last DESC",
    )?;
    let mut rows = stmt.query(params![stream.as_str(), clamp(before - 1)])?;
    while let Some(r) = rows.next()? {
        let seq = r.get::<_, i64>(0)? as u64;
        let mut chunk = Vec::new();
        for e in events(seq, r.get_ref(1)?.as_blob()?) {
            chunk.push(e?);
        }
        for e in chunk.iter().rev() {
            if e.seq < before && !f(e)? {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// The count, last seq and bytes (of their JSON, in `epoch`) of `stream`'s stored events from
/// `from` on while `keep` holds for them (`None`: none).
pub(super) fn measure(
    c: &Connection,
    stream: &StreamId,
    epoch: &Epoch,
    from: u64,
    mut keep: impl FnMut(&Stored<'_>) -> bool,
) -> rusqlite::Result<Option<(u64, u64, u64)>> {
    let (mut count, mut through, mut bytes) = (0, 0, 0);
    walk(c, stream, from, |e| {
        if !keep(e) {
            return Ok(false);
        }
        count += 1;
        through = e.seq;
        bytes += e.json_len(stream, epoch);
        Ok(true)
    })?;
    Ok((count > 0).then_some((count, through, bytes)))
}

/// Deletes the chunks of `stream` whose every event is at or before `through` (the one that
/// reaches past it stays, its earlier events hidden by the stream's new `first_seq`).
pub(super) fn delete_through(
    c: &Connection,
    stream: &StreamId,
    through: u64,
) -> rusqlite::Result<()> {
    c.prepare_cached("DELETE FROM chunks WHERE stream = ?1 AND last <= ?2")?
        .execute(params![stream.as_str(), clamp(through)])?;
    Ok(())
}

fn clamp(seq: u64) -> i64 {
    seq.min(i64::MAX as u64) as i64
}

fn insert(c: &Connection, stream: &str, chunk: &OpenChunk) -> rusqlite::Result<()> {
    c.prepare_cached(
        "INSERT INTO chunks (stream, seq, last, last_ts, body) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![
        stream,
        chunk.first as i64,
        chunk.last as i64,
        chunk.last_ts as i64,
        &chunk.body[..]
    ])?;
    Ok(())
}

/// Inserts a one-event chunk from an event's whole JSON: what a file from before chunks
/// becomes, row for row. Its `data` is what follows the first `,"data":` (stream ids, epochs
/// and numbers cannot hold one).
pub(super) fn insert_one(
    c: &Connection,
    stream: &str,
    seq: u64,
    ts: u64,
    json: &[u8],
) -> rusqlite::Result<()> {
    const DATA: &[u8] = b",\"data\":";
    let start = json
        .windows(DATA.len())
        .position(|w| w == DATA)
        .ok_or_else(damaged)?
        + DATA.len();
    let data = json
        .get(start..json.len().saturating_sub(1))
        .ok_or_else(damaged)?;
    let mut chunk = OpenChunk {
        first: seq,
        last: seq,
        last_ts: ts,
        body: Vec::with_capacity(HEADER + data.len()),
    };
    push(&mut chunk.body, ts, data);
    insert(c, stream, &chunk)
}

fn push(body: &mut Vec<u8>, ts: u64, data: &[u8]) {
    body.extend_from_slice(&ts.to_le_bytes());
    body.extend_from_slice(&(data.len() as u32).to_le_bytes());
    body.extend_from_slice(data);
}

impl Writer {
    /// Adds the event `seq` of `stream` (its `data`) to its open chunk; a full chunk is
    /// inserted first.
    pub(super) fn chunk_event(
        &mut self,
        stream: &StreamId,
        seq: u64,
        ts: u64,
        data: &[u8],
    ) -> rusqlite::Result<()> {
        if let Some(open) = self.open.get_mut(stream) {
            let full = open.last - open.first + 1 >= CHUNK_MAX_EVENTS
                || open.body.len() + HEADER + data.len() > CHUNK_MAX_BYTES;
            if !full && open.last + 1 == seq {
                open.last = seq;
                open.last_ts = ts;
                push(&mut open.body, ts, data);
                return Ok(());
            }
            let done = self.open.remove(stream).expect("found above");
            insert(&self.conn, stream.as_str(), &done)?;
        }
        let mut chunk = OpenChunk {
            first: seq,
            last: seq,
            last_ts: ts,
            body: Vec::with_capacity(CHUNK_MAX_BYTES.min(64 * (HEADER + data.len()))),
        };
        push(&mut chunk.body, ts, data);
        self.open.insert(stream.clone(), chunk);
        Ok(())
    }

    /// Inserts every open chunk: before the batch reads or trims the log, and before `COMMIT`.
    pub(super) fn flush_chunks(&mut self) -> rusqlite::Result<()> {
        for (stream, chunk) in std::mem::take(&mut self.open) {
            insert(&self.conn, stream.as_str(), &chunk)?;
        }
        Ok(())
    }
}
