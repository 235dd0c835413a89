//! The writer thread: the only write connection. It drains its queue (up to [`MAX_BATCH`]
//! commands), runs them in one `BEGIN IMMEDIATE … COMMIT` (one fsync for the whole batch), and
//! only then answers each caller (several in one task on the callers' runtime: one wake-up per
//! batch) and hands the new events and trims to the sink. A statement
//! that fails rolls back the whole batch and answers every caller in it with the batch's
//! error. It also keeps each stream's bounds (`Meta`) in memory and writes the changed ones
//! back in the batch's commit.
//!
//! Must not: answer a caller, or tell the sink anything, before `COMMIT`; hold a command back
//! for longer than one batch, but for the short wait of a batch of session writes
//! ([`gathers`]); hold an append back at all.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use foldhash::HashMap as FastMap;
use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::oneshot;
use zerodrop_core::RetentionRules;
use zerodrop_core::clock::Clock;
use zerodrop_core::{AckUpdate, Epoch, Event, Seq, SessionId, StreamId};

use super::chunk::OpenChunk;
use super::health::{Health, fault_of};
use super::{MAX_BATCH, closed};
use crate::{
    AppendOutcome, AppendRequest, BatchOutcome, LiveSink, SessionCap, SessionRecord, SessionStream,
    StoreError, StoreResult, StreamBatch, StreamInfo,
};

/// Streams whose bounds the writer keeps in memory before it starts over.
const MAX_CACHED_STREAMS: usize = 100_000;

pub(super) type Reply<T> = oneshot::Sender<StoreResult<T>>;

pub(super) enum Cmd {
    Append(AppendRequest, Reply<AppendOutcome>),
    /// A batch: each stream's part in this one commit, whole or not at all.
    AppendBatch(Vec<StreamBatch>, Reply<BatchOutcome>),
    DeleteStream(StreamId, Reply<Option<StreamInfo>>),
    CloseStream(StreamId, Reply<Option<StreamInfo>>),
    CreateSession(SessionRecord, SessionCap, Reply<()>),
    PutSessionStream(SessionId, StreamId, SessionStream, Reply<()>),
    RemoveSessionStream(SessionId, StreamId, Reply<()>),
    Checkpoint(SessionId, StreamId, Seq, Reply<AckUpdate>),
    CheckpointMany(Vec<(SessionId, StreamId, Seq)>, Reply<usize>),
    Touch(SessionId, u64, Reply<()>),
    /// A session's grants, as JSON.
    Grants(SessionId, String, Reply<()>),
    MarkDropped(SessionId, StreamId, Seq, Reply<()>),
    MaxPages(Option<u64>, Reply<u64>),
    /// Runs the age sweep and the expiry sweep in this batch (they run by themselves every
    /// half second and every minute).
    Sweep(Reply<()>),
    /// Any other write (the job queue, the webhook idempotency records).
    Run(Box<dyn WriterOp>),
}

/// A write run by the writer like the log's own commands: inside the batch's transaction,
/// answered after `COMMIT` (or with the batch's error).
pub(super) trait WriterOp: Send {
    fn apply(self: Box<Self>, conn: &Connection, fx: &mut BatchEffects) -> rusqlite::Result<()>;
    /// The batch failed (or the store refuses every call) before it ran.
    fn refuse(self: Box<Self>, err: &StoreError);
}

/// One write: `run` must not change anything when it answers an `Err` of its own (a refusal
/// such as a stale lease), since the batch commits regardless.
pub(super) struct Op<T, F> {
    pub(super) run: F,
    pub(super) reply: Reply<T>,
}

impl<T, F> WriterOp for Op<T, F>
where
    T: Send + 'static,
    F: FnOnce(&Connection) -> rusqlite::Result<StoreResult<T>> + Send,
{
    fn apply(self: Box<Self>, conn: &Connection, fx: &mut BatchEffects) -> rusqlite::Result<()> {
        let Op { run, reply } = *self;
        settle(fx, reply, Done::other, run(conn))
    }

    fn refuse(self: Box<Self>, err: &StoreError) {
        let _ = self.reply.send(Err(err.clone()));
    }
}

#[derive(Clone)]
pub(super) struct Meta {
    pub(super) epoch: Epoch,
    pub(super) head: u64,
    pub(super) first: u64,
    pub(super) count: u64,
    pub(super) bytes: u64,
    pub(super) last_ts: u64,
    pub(super) closed: bool,
}

pub(super) struct Writer {
    pub(super) conn: Connection,
    pub(super) epoch: Epoch,
    pub(super) health: Arc<Health>,
    /// `PRAGMA max_page_count` as SQLite set it, restored when a test lifts its cap.
    pub(super) default_max_pages: u64,
    /// The limits each stream keeps (the global ones, and the patterns that set their own).
    pub(super) retention: RetentionRules,
    /// Where the stream-by-stream age sweep goes on (the last stream it visited; empty: from
    /// the first). Used only when some streams keep events for a shorter age than others.
    pub(super) age_cursor: String,
    pub(super) idempotency_ttl_ms: u64,
    pub(super) session_grace_ms: u64,
    pub(super) sink: Arc<dyn LiveSink>,
    /// The async runtime the callers wait on, when the store was opened inside one: a batch's
    /// replies are handed to it in one task (see `answer`).
    pub(super) runtime: Option<tokio::runtime::Handle>,
    /// What time it is for timestamps, the age limit, expiry and the session cap.
    pub(super) clock: Arc<dyn Clock>,
    pub(super) up: Arc<AtomicBool>,
    pub(super) commits: Arc<AtomicU64>,
    /// Keyed by stream with `foldhash` (seeded per process), as are `open` and the batch's
    /// `touched`: each appended event looks a stream up in all three, and the standard
    /// SipHash cost the writer several per cent of its time (docs/benchmarks.md).
    pub(super) cache: FastMap<StreamId, Meta>,
    /// Each stream's events appended in this batch, not yet inserted (`chunk.rs`).
    pub(super) open: FastMap<StreamId, OpenChunk>,
    pub(super) last_ts: u64,
    /// Per subject, an upper bound on its live sessions (see `create_session`): sessions
    /// created since an exact count are added, none is ever taken off, so the bound only
    /// errs high. A subject absent here is counted exactly when its cap is next checked.
    pub(super) live_sessions_bound: HashMap<String, u64>,
}

/// A reply to send once the batch's fate is known.
enum Done {
    Append(Reply<AppendOutcome>, StoreResult<AppendOutcome>),
    Unit(Reply<()>, StoreResult<()>),
    Ack(Reply<AckUpdate>, StoreResult<AckUpdate>),
    Count(Reply<usize>, StoreResult<usize>),
    Count64(Reply<u64>, StoreResult<u64>),
    Other(SendReply),
}

/// A [`WriterOp`]'s reply, whatever its type: sends the value, or the batch's error.
type SendReply = Box<dyn FnOnce(Option<&StoreError>) + Send>;

impl Done {
    fn send(self, failure: Option<&StoreError>) {
        // A caller that went away is not an error: the work is done either way.
        match self {
            Done::Append(r, v) => drop(r.send(failure.map_or(v, |e| Err(e.clone())))),
            Done::Unit(r, v) => drop(r.send(failure.map_or(v, |e| Err(e.clone())))),
            Done::Ack(r, v) => drop(r.send(failure.map_or(v, |e| Err(e.clone())))),
            Done::Count(r, v) => drop(r.send(failure.map_or(v, |e| Err(e.clone())))),
            Done::Count64(r, v) => drop(r.send(failure.map_or(v, |e| Err(e.clone())))),
            Done::Other(send) => send(failure),
        }
    }

    fn other<T: Send + 'static>(r: Reply<T>, v: StoreResult<T>) -> Done {
        Done::Other(Box::new(move |failure: Option<&StoreError>| {
            drop(r.send(failure.map_or(v, |e| Err(e.clone()))))
        }))
    }
}

#[derive(Default)]
pub(super) struct BatchEffects {
    done: Vec<Done>,
    pub(super) events: Vec<Arc<Event>>,
    pub(super) trims: Vec<(StreamId, Seq, u64)>,
    pub(super) touched: foldhash::HashSet<StreamId>,
    /// Streams erased in this batch (a new epoch), for the sink after `COMMIT`.
    pub(super) recreated: Vec<StreamId>,
    /// Streams closed in this batch, at their last seq, for the sink after `COMMIT`.
    pub(super) closed: Vec<(StreamId, Seq)>,
}

impl Writer {
    pub(super) fn run(&mut self, rx: mpsc::Receiver<Cmd>) {
        let tick = Duration::from_millis(500);
        let mut next_sweep = Instant::now() + tick;
        let mut next_slow_sweep = Instant::now();
        loop {
            let wait = next_sweep.saturating_duration_since(Instant::now());
            let mut batch = Vec::new();
            match rx.recv_timeout(wait) {
                Ok(cmd) => batch.push(cmd),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    // The store is closing: fold the whole log into the file even if another
                    // connection (a reader still lent out) outlives this one, so the file alone
                    // holds every page when the process ends.
                    let _ = self
                        .conn
                        .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
                    return;
                }
            }
            drain(&rx, &mut batch);
            if gathers(&batch) {
                std::thread::sleep(GATHER);
                drain(&rx, &mut batch);
            }
            let now = Instant::now();
            let sweep = now >= next_sweep;
            if sweep {
                next_sweep = now + tick;
            }
            let slow = now >= next_slow_sweep;
            if slow {
                next_slow_sweep = now + Duration::from_secs(60);
            }
            if batch.is_empty() && !sweep && !slow {
                continue;
            }
            let asked = batch.iter().any(|c| matches!(c, Cmd::Sweep(_)));
            self.process(batch, sweep || asked, slow || asked);
        }
    }

    /// Answers a committed batch's callers. Several replies go to the runtime in one task that
    /// sends them there: each reply sent from this thread wakes a parked worker on its own (a
    /// system call), and where the worker shares this thread's core it runs at once, answers
    /// one caller and parks again, once per reply. One task wakes it once per batch (measured:
    /// docs/benchmarks.md, "One wake per batch of replies").
    fn answer(&self, done: Vec<Done>) {
        let many = done.len() > 1;
        let send_all = move || done.into_iter().for_each(|d| d.send(None));
        match &self.runtime {
            Some(rt) if many => {
                rt.spawn(async move { send_all() });
            }
            _ => send_all(),
        }
    }

    fn process(&mut self, batch: Vec<Cmd>, sweep: bool, slow: bool) {
        if let Some(err) = self.health.refusal() {
            self.up.store(false, Ordering::Relaxed);
            for cmd in batch {
                fail(cmd, &err);
            }
            return;
        }
        let mut fx = BatchEffects::default();
        let mut pending = batch.into_iter();
        let result = (|| -> rusqlite::Result<()> {
            self.conn.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
            for cmd in pending.by_ref() {
                self.apply(cmd, &mut fx)?;
            }
            self.flush_chunks()?;
            self.enforce_retention(&mut fx)?;
            if sweep {
                self.sweep_age(&mut fx)?;
            }
            if slow {
                self.sweep_expired()?;
            }
            self.write_meta(&fx)?;
            self.conn.prepare_cached("COMMIT")?.execute([]).map(|_| ())
        })();
        match result {
            Ok(()) => {
                self.up.store(true, Ordering::Relaxed);
                self.commits.fetch_add(1, Ordering::Relaxed);
                // Answer the callers first (their task is queued ahead of the subscribers'
                // wake-ups): a publisher's 201 must not queue behind the wake-ups of every
                // subscriber (its next publish then overlaps this fan-out, and the subscribers
                // find several events per write).
                self.answer(fx.done);
                if !fx.events.is_empty() {
                    self.sink.committed(&fx.events);
                }
                for (stream, first, count) in &fx.trims {
                    self.sink.trimmed(stream, *first, *count);
                }
                for stream in &fx.recreated {
                    self.sink.recreated(stream);
                }
                for (stream, last) in &fx.closed {
                    self.sink.closed(stream, *last);
                }
                if self.cache.len() > MAX_CACHED_STREAMS {
                    self.cache.clear();
                }
            }
            Err(e) => {
                let _ = self.conn.execute_batch("ROLLBACK");
                self.cache.clear();
                self.open.clear();
                self.last_ts = self.last_ts.max(self.clock.now_ms());
                let was_up = self.up.swap(false, Ordering::Relaxed);
                if was_up && fault_of(&e).is_none() {
                    tracing::error!(error = %e, "sqlite commit failed; writes answer STORE_UNAVAILABLE until one succeeds");
                }
                let err = self.health.fault(e);
                for d in fx.done {
                    d.send(Some(&err));
                }
                // Commands the failed batch never reached.
                for cmd in pending {
                    fail(cmd, &err);
                }
            }
        }
    }

    /// Runs one command inside the batch's transaction. Its reply joins the batch's whatever
    /// happens, so that a statement that fails (a full disk, a damaged page) answers its own
    /// caller with the batch's error too.
    fn apply(&mut self, cmd: Cmd, fx: &mut BatchEffects) -> rusqlite::Result<()> {
        match cmd {
            Cmd::Append(req, reply) => {
                let r = self.append(req, fx);
                settle(fx, reply, Done::Append, r)
            }
            Cmd::AppendBatch(batch, reply) => {
                let r = self.append_batch(batch, fx);
                settle(fx, reply, Done::other, r)
            }
            Cmd::DeleteStream(stream, reply) => {
                let r = self.delete_stream(&stream, fx);
                settle(fx, reply, Done::other, r)
            }
            Cmd::CloseStream(stream, reply) => {
                let r = self.close_stream(&stream, fx);
                settle(fx, reply, Done::other, r)
            }
            Cmd::CreateSession(s, cap, reply) => {
                let r = self.create_session(&s, cap);
                settle(fx, reply, Done::Unit, r)
            }
            Cmd::PutSessionStream(id, stream, state, reply) => {
                let r = self.put_session_stream(&id, &stream, &state);
                settle(fx, reply, Done::Unit, r)
            }
            Cmd::RemoveSessionStream(id, stream, reply) => {
                let r = self.remove_session_stream(&id, &stream);
                settle(fx, reply, Done::Unit, r)
            }
            Cmd::CheckpointMany(acks, reply) => {
                let r = self.checkpoint_many(acks);
                settle(fx, reply, Done::Count, r)
            }
            Cmd::Checkpoint(id, stream, seq, reply) => {
                let r = self.checkpoint(&id, &stream, seq);
                settle(fx, reply, Done::Ack, r)
            }
            Cmd::Touch(id, expires, reply) => {
                let r = self.touch_session(&id, expires);
                settle(fx, reply, Done::Unit, r)
            }
            Cmd::Grants(id, grants, reply) => {
                let r = self.set_session_grants(&id, &grants);
                settle(fx, reply, Done::Unit, r)
            }
            Cmd::MarkDropped(id, stream, through, reply) => {
                let r = self.mark_dropped(&id, &stream, through);
                settle(fx, reply, Done::Unit, r)
            }
            Cmd::MaxPages(pages, reply) => {
                let want = pages.unwrap_or(self.default_max_pages).max(1) as i64;
                let r = self
                    .conn
                    .query_row(&format!("PRAGMA max_page_count = {want}"), [], |r| {
                        r.get::<_, i64>(0)
                    })
                    .map(|now| Ok(now.max(0) as u64));
                settle(fx, reply, Done::Count64, r)
            }
            Cmd::Sweep(reply) => settle(fx, reply, Done::Unit, Ok(Ok(()))),
            Cmd::Run(op) => op.apply(&self.conn, fx),
        }
    }

    pub(super) fn meta(&mut self, stream: &StreamId) -> rusqlite::Result<&mut Meta> {
        if !self.cache.contains_key(stream) {
            let m = self
                .conn
                .prepare_cached(
                    "SELECT epoch, head, first_seq, count, bytes, last_ts, closed FROM streams
                     WHERE stream = ?1",
                )?
                .query_row(params![stream.as_str()], |r| {
                    Ok(Meta {
                        epoch: Epoch::parse(&r.get::<_, String>(0)?)
                            .unwrap_or_else(|| self.epoch.clone()),
                        head: r.get::<_, i64>(1)? as u64,
                        first: r.get::<_, i64>(2)? as u64,
                        count: r.get::<_, i64>(3)? as u64,
                        bytes: r.get::<_, i64>(4)? as u64,
                        last_ts: r.get::<_, i64>(5)? as u64,
                        closed: r.get::<_, i64>(6)? != 0,
                    })
                })
                .optional()?
                .unwrap_or_else(|| Meta {
                    epoch: self.epoch.clone(),
                    head: 0,
                    first: 1,
                    count: 0,
                    bytes: 0,
                    last_ts: 0,
                    closed: false,
                });
            self.cache.insert(stream.clone(), m);
        }
        Ok(self.cache.get_mut(stream).expect("inserted above"))
    }

    fn write_meta(&mut self, fx: &BatchEffects) -> rusqlite::Result<()> {
        for stream in &fx.touched {
            let Some(m) = self.cache.get(stream) else {
                continue;
            };
            self.conn
                .prepare_cached(
                    "INSERT INTO streams (stream, epoch, head, first_seq, count, bytes, last_ts,
                       closed)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                     ON CONFLICT (stream) DO UPDATE SET epoch = ?2, head = ?3, first_seq = ?4,
                       count = ?5, bytes = ?6, last_ts = ?7, closed = ?8",
                )?
                .execute(params![
                    stream.as_str(),
                    m.epoch.as_str(),
                    m.head as i64,
                    m.first as i64,
                    m.count as i64,
                    m.bytes as i64,
                    m.last_ts as i64,
                    i64::from(m.closed)
                ])?;
        }
        Ok(())
    }
}

/// Adds a command's reply to the batch's; a statement that failed fails the batch (the batch's
/// error then answers every reply, this one included).
fn settle<T>(
    fx: &mut BatchEffects,
    reply: Reply<T>,
    done: fn(Reply<T>, StoreResult<T>) -> Done,
    r: rusqlite::Result<StoreResult<T>>,
) -> rusqlite::Result<()> {
    match r {
        Ok(v) => {
            fx.done.push(done(reply, v));
            Ok(())
        }
        Err(e) => {
            fx.done.push(done(reply, Err(closed())));
            Err(e)
        }
    }
}

pub(super) fn record_trim(fx: &mut BatchEffects, stream: &StreamId, first: Seq, count: u64) {
    match fx.trims.iter_mut().find(|(s, _, _)| s == stream) {
        Some(t) => {
            t.1 = first;
            t.2 += count;
        }
        None => fx.trims.push((stream.clone(), first, count)),
    }
}

pub(super) fn meta_info(stream: &StreamId, m: &Meta) -> StreamInfo {
    StreamInfo {
        stream: stream.clone(),
        epoch: m.epoch.clone(),
        head: Seq(m.head),
        first_seq: Seq(m.first),
        count: m.count,
        bytes: m.bytes,
        closed: m.closed,
    }
}

fn fail(cmd: Cmd, err: &StoreError) {
    fn send<T>(r: Reply<T>, err: &StoreError) {
        let _ = r.send(Err(err.clone()));
    }
    match cmd {
        Cmd::Append(_, r) => send(r, err),
        Cmd::AppendBatch(_, r) => send(r, err),
        Cmd::DeleteStream(_, r) | Cmd::CloseStream(_, r) => send(r, err),
        Cmd::CreateSession(_, _, r)
        | Cmd::PutSessionStream(_, _, _, r)
        | Cmd::RemoveSessionStream(_, _, r)
        | Cmd::Touch(_, _, r)
        | Cmd::Grants(_, _, r)
        | Cmd::MarkDropped(_, _, _, r) => send(r, err),
        Cmd::Checkpoint(_, _, _, r) => send(r, err),
        Cmd::CheckpointMany(_, r) => send(r, err),
        Cmd::MaxPages(_, r) => send(r, err),
        Cmd::Sweep(r) => send(r, err),
        Cmd::Run(op) => op.refuse(err),
    }
}

fn drain(rx: &mpsc::Receiver<Cmd>, batch: &mut Vec<Cmd>) {
    while batch.len() < MAX_BATCH {
        match rx.try_recv() {
            Ok(cmd) => batch.push(cmd),
            Err(_) => break,
        }
    }
}

/// How long a batch of session writes waits for more before it begins (see [`gathers`]).
const GATHER: Duration = Duration::from_millis(2);

/// Whether a batch waits [`GATHER`] for more commands before it begins: when it holds more
/// than one command and none that a caller waits on for delivery (an append, a guard write).
/// That is a storm of connects or resumes: each creates a session and adds its streams, and
/// on a small machine the commit (a WAL write and an fsync) costs more than the statements,
/// so gathering them cuts the commits about fourfold (measured: 10,000 WebSocket connects,
/// docs/benchmarks.md). A lone command never waits, and a publish is never held back.
fn gathers(batch: &[Cmd]) -> bool {
    batch.len() > 1
        && batch.len() < MAX_BATCH
        && batch.iter().all(|c| {
            !matches!(
                c,
                Cmd::Append(..) | Cmd::AppendBatch(..) | Cmd::Run(_) | Cmd::MaxPages(..)
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch() -> Cmd {
        Cmd::Touch(SessionId::generate(), 1, oneshot::channel().0)
    }

    fn append() -> Cmd {
        let req = AppendRequest {
            stream: StreamId::new("s").unwrap(),
            data: "1".into(),
            idempotency: None,
        };
        Cmd::Append(req, oneshot::channel().0)
    }

    #[test]
    fn only_a_batch_of_several_session_writes_waits_for_more() {
        assert!(!gathers(&[touch()]), "a lone command never waits");
        assert!(gathers(&[touch(), touch()]));
        assert!(
            !gathers(&[touch(), append()]),
            "a publish is never held back"
        );
        assert!(!gathers(&[append(), append()]));
        let full: Vec<Cmd> = (0..MAX_BATCH).map(|_| touch()).collect();
        assert!(!gathers(&full), "a full batch begins at once");
    }
}
