//! The `memory` store: the same behaviour as the others, nothing on disk. For tests.
//!
//! All state sits behind one mutex; the sink is told of commits while the mutex is held, which
//! keeps per-stream order trivially (sinks only enqueue and wake, they never call back).
//!
//! The log, idempotency keys, retention and sessions stay in this one file on purpose: they
//! are one job here (plain maps under one lock, each operation a few lines), and splitting
//! them would spread that lock's state over several files. The job queue and webhook records
//! are `guard.rs`. The rules every store applies are `crate::rules`' and `zerodrop_core`'s,
//! called from here like from the other stores.
//!
//! Must not: be the home of a rule another store needs, or be used where data must survive
//! the process.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use zerodrop_core::RetentionRules;
use zerodrop_core::clock::{Clock, SystemClock};
use zerodrop_core::hash::ChainHash;
use zerodrop_core::retention::{Retention, plan_trim};
use zerodrop_core::{AckUpdate, Epoch, Event, Seq, SessionId, StreamId};

use crate::presence::{PresenceBook, PresenceStore};
use crate::rules::{apply_checkpoint, cutoff, merge_session_stream, plan_items, planned_outcomes};
use crate::{
    AppendOutcome, AppendRequest, BatchOutcome, LiveSink, Planned, ReadRange, ReadResult,
    SessionCap, SessionRecord, SessionStream, Store, StoreDurability, StoreError, StoreKind,
    StoreResult, StoreStats, StreamBatch, StreamInfo,
};

mod guard;

pub struct MemoryStore {
    pub(crate) inner: Arc<Inner>,
    /// Members and presence logs (the shared in-process rules, `crate::presence`).
    presence: PresenceBook,
}

pub(crate) struct Inner {
    epoch: Epoch,
    retention: RetentionRules,
    pub(crate) idempotency_ttl_ms: u64,
    sink: Arc<dyn LiveSink>,
    /// What time it is for timestamps, the age limit, expiry and the session cap.
    clock: Arc<dyn Clock>,
    state: Mutex<State>,
}

#[derive(Default)]
pub(crate) struct State {
    streams: HashMap<StreamId, MemStream>,
    sessions: HashMap<SessionId, SessionRecord>,
    revocations: Vec<crate::Revocation>,
    records: HashMap<StreamId, String>,
    /// Each subject's sessions, pruned of ended ones whenever the subject opens another.
    by_sub: HashMap<String, Vec<SessionId>>,
    pub(crate) idempotency: HashMap<(StreamId, String), IdemEntry>,
    last_ts: u64,
    pub(crate) guard: guard::GuardState,
}

struct MemStream {
    epoch: Epoch,
    head: Seq,
    bytes: u64,
    events: VecDeque<Arc<Event>>,
    closed: bool,
}

pub(crate) struct IdemEntry {
    fingerprint: [u8; 32],
    seq: Seq,
    epoch: Epoch,
    pub(crate) created_ms: u64,
    pub(crate) hit_count: u64,
}

impl MemStream {
    fn info(&self, stream: &StreamId) -> StreamInfo {
        StreamInfo {
            stream: stream.clone(),
            epoch: self.epoch.clone(),
            head: self.head,
            first_seq: self
                .events
                .front()
                .map(|e| e.seq())
                .unwrap_or(self.head.next()),
            count: self.events.len() as u64,
            bytes: self.bytes,
            closed: self.closed,
        }
    }
}

impl MemoryStore {
    pub fn new(retention: Retention, sink: Arc<dyn LiveSink>) -> MemoryStore {
        Self::with_idempotency_ttl(retention, 24 * 3600 * 1000, sink)
    }

    pub fn with_idempotency_ttl(
        retention: Retention,
        idempotency_ttl_ms: u64,
        sink: Arc<dyn LiveSink>,
    ) -> MemoryStore {
        Self::with_clock(retention, idempotency_ttl_ms, sink, SystemClock::shared())
    }

    /// A store whose time (timestamps, the age limit, expiry) is `clock`'s.
    pub fn with_clock(
        retention: Retention,
        idempotency_ttl_ms: u64,
        sink: Arc<dyn LiveSink>,
        clock: Arc<dyn Clock>,
    ) -> MemoryStore {
        let rules = RetentionRules::new(retention, Default::default());
        Self::with_rules(rules, idempotency_ttl_ms, sink, clock)
    }

    /// A store whose streams keep what `retention` says for each (per-stream patterns over
    /// the global limits), on `clock`'s time.
    pub fn with_rules(
        retention: RetentionRules,
        idempotency_ttl_ms: u64,
        sink: Arc<dyn LiveSink>,
        clock: Arc<dyn Clock>,
    ) -> MemoryStore {
        let presence = PresenceBook::new(sink.clone(), clock.clone());
        let inner = Arc::new(Inner {
            epoch: Epoch::generate(),
            retention,
            idempotency_ttl_ms,
            sink,
            clock,
            state: Mutex::new(State::default()),
        });
        spawn_sweeper(Arc::downgrade(&inner));
        MemoryStore { inner, presence }
    }

    /// Runs the age sweep now, at the clock's time (it runs by itself every half second).
    /// For tests that move the clock.
    #[doc(hidden)]
    pub fn sweep_now(&self) {
        self.inner.sweep(self.inner.clock.now_ms());
    }
}

/// Age retention, at least every second, for as long as the store lives.
fn spawn_sweeper(inner: Weak<Inner>) {
    std::thread::Builder::new()
        .name("zerodrop-memory-sweep".into())
        .spawn(move || {
            loop {
                std::thread::sleep(Duration::from_millis(500));
                let Some(inner) = inner.upgrade() else { return };
                inner.sweep(inner.clock.now_ms());
            }
        })
        .expect("spawn memory store sweeper");
}

impl Inner {
    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent data (every mutation is completed
        // before anything can panic), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn sweep(&self, now: u64) {
        let mut st = self.lock();
        let mut trims = Vec::new();
        for (id, s) in st.streams.iter_mut() {
            let age_cut = cutoff(now, self.retention.for_stream(id.as_str()).max_age_ms);
            let mut n = 0;
            while s.events.front().is_some_and(|e| e.ts() < age_cut) {
                if let Some(e) = s.events.pop_front() {
                    s.bytes -= e.json().len() as u64;
                    n += 1;
                }
            }
            if n > 0 {
                trims.push((id.clone(), s.info(id).first_seq, n));
            }
        }
        let ttl_cut = cutoff(now, self.idempotency_ttl_ms);
        st.idempotency.retain(|_, e| e.created_ms >= ttl_cut);
        for (id, first, n) in trims {
            self.sink.trimmed(&id, first, n);
        }
    }

    fn stream_mut<'a>(&self, st: &'a mut State, stream: &StreamId) -> &'a mut MemStream {
        st.streams
            .entry(stream.clone())
            .or_insert_with(|| MemStream {
                epoch: self.epoch.clone(),
                head: Seq(0),
                bytes: 0,
                events: VecDeque::new(),
                closed: false,
            })
    }

    /// Appends one event to `stream` (the next seq, a monotonic ts), for the sink in `events`.
    fn push_event(
        &self,
        st: &mut State,
        stream: &StreamId,
        data: &str,
        events: &mut Vec<Arc<Event>>,
    ) -> (Seq, Epoch) {
        let ts = self.clock.now_ms().max(st.last_ts);
        st.last_ts = ts;
        let s = self.stream_mut(st, stream);
        let seq = s.head.next();
        let event = Arc::new(
            Event::encode(stream.clone(), seq, s.epoch.clone(), ts, data)
                .with_committed_at(Instant::now()),
        );
        s.head = seq;
        s.bytes += event.json().len() as u64;
        s.events.push_back(event.clone());
        events.push(event);
        (seq, s.epoch.clone())
    }

    fn record_key(
        &self,
        st: &mut State,
        stream: &StreamId,
        k: crate::IdempotencyKey,
        seq: Seq,
        epoch: &Epoch,
    ) {
        st.idempotency.insert(
            (stream.clone(), k.key),
            IdemEntry {
                fingerprint: k.fingerprint,
                seq,
                epoch: epoch.clone(),
                created_ms: st.last_ts,
                hit_count: 0,
            },
        );
    }

    /// Trims by count and size after appends (`plan_trim`): the new first seq and how many
    /// went, when any did.
    fn enforce_retention(&self, st: &mut State, stream: &StreamId) -> Option<(Seq, u64)> {
        let s = st.streams.get_mut(stream)?;
        let oldest = s.events.iter().map(|e| (e.seq(), e.json().len() as u64));
        let limits = self.retention.for_stream(stream.as_str());
        let t = plan_trim(s.events.len() as u64, s.bytes, limits, oldest)?;
        for _ in 0..t.count {
            s.events.pop_front();
        }
        s.bytes -= t.bytes;
        Some((s.info(stream).first_seq, t.count))
    }

    fn info(&self, st: &State, stream: &StreamId) -> StreamInfo {
        match st.streams.get(stream) {
            Some(s) => s.info(stream),
            None => StreamInfo::empty(stream.clone(), self.epoch.clone()),
        }
    }
}

#[async_trait]
impl Store for MemoryStore {
    fn kind(&self) -> StoreKind {
        StoreKind::Memory
    }

    async fn append(&self, req: AppendRequest) -> StoreResult<AppendOutcome> {
        let inner = &self.inner;
        let mut guard = inner.lock();
        let st = &mut *guard;
        if let Some(k) = &req.idempotency
            && let Some(e) = st.idempotency.get_mut(&(req.stream.clone(), k.key.clone()))
        {
            if e.fingerprint != k.fingerprint {
                return Err(StoreError::IdempotencyKeyReused);
            }
            e.hit_count += 1;
            return Ok(AppendOutcome {
                stream: req.stream,
                seq: e.seq,
                epoch: e.epoch.clone(),
                duplicate: true,
            });
        }
        if let Some(s) = st.streams.get(&req.stream)
            && s.closed
        {
            return Err(StoreError::StreamClosed { last_seq: s.head });
        }
        let mut events = Vec::with_capacity(1);
        let (seq, epoch) = inner.push_event(st, &req.stream, &req.data, &mut events);
        if let Some(k) = req.idempotency {
            inner.record_key(st, &req.stream, k, seq, &epoch);
        }
        let trim = inner.enforce_retention(st, &req.stream);
        inner.sink.committed(&events);
        if let Some((first, count)) = trim {
            inner.sink.trimmed(&req.stream, first, count);
        }
        Ok(AppendOutcome {
            stream: req.stream,
            seq,
            epoch,
            duplicate: false,
        })
    }

    async fn append_batch(&self, batch: Vec<StreamBatch>) -> StoreResult<BatchOutcome> {
        let inner = &self.inner;
        let mut guard = inner.lock();
        let st = &mut *guard;
        let mut results = Vec::with_capacity(batch.len());
        let mut events = Vec::new();
        let mut trims = Vec::new();
        for part in batch {
            let closed = st
                .streams
                .get(&part.stream)
                .and_then(|s| s.closed.then_some(s.head));
            let idem = &st.idempotency;
            let lookup = plan_items(&part.items, closed, |k| {
                Ok::<_, std::convert::Infallible>(
                    idem.get(&(part.stream.clone(), k.key.clone()))
                        .map(|e| (e.fingerprint, e.seq, e.epoch.clone())),
                )
            });
            let plan = match lookup {
                Ok(Ok(plan)) => plan,
                Err(never) => match never {},
                Ok(Err(e)) => {
                    results.push(Err(e));
                    continue;
                }
            };
            let mut appended = Vec::new();
            for (item, p) in part.items.into_iter().zip(&plan) {
                match p {
                    Planned::Append => {
                        let (seq, epoch) =
                            inner.push_event(st, &part.stream, &item.data, &mut events);
                        if let Some(k) = item.idempotency {
                            inner.record_key(st, &part.stream, k, seq, &epoch);
                        }
                        appended.push((seq, epoch));
                    }
                    Planned::Duplicate { .. } | Planned::SameAs(_) => {
                        if let Some(k) = item.idempotency
                            && let Some(e) = st.idempotency.get_mut(&(part.stream.clone(), k.key))
                        {
                            e.hit_count += 1;
                        }
                    }
                }
            }
            if let Some((first, count)) = inner.enforce_retention(st, &part.stream) {
                trims.push((part.stream.clone(), first, count));
            }
            results.push(Ok(planned_outcomes(&part.stream, &plan, &appended)));
        }
        if !events.is_empty() {
            inner.sink.committed(&events);
        }
        for (stream, first, count) in trims {
            inner.sink.trimmed(&stream, first, count);
        }
        Ok(results)
    }

    async fn read_range(
        &self,
        stream: &StreamId,
        range: ReadRange,
        limit: usize,
    ) -> StoreResult<ReadResult> {
        let st = self.inner.lock();
        let info = self.inner.info(&st, stream);
        let Some(s) = st.streams.get(stream) else {
            return Ok(ReadResult {
                info,
                events: Vec::new(),
            });
        };
        let events = match range {
            ReadRange::After(after) => {
                let from = s.events.partition_point(|e| e.seq() <= after);
                s.events.iter().skip(from).take(limit).cloned().collect()
            }
            ReadRange::Before(before) => {
                let to = s.events.partition_point(|e| e.seq() < before);
                s.events
                    .iter()
                    .take(to)
                    .rev()
                    .take(limit)
                    .cloned()
                    .collect()
            }
            ReadRange::Since(ts) => {
                let from = s.events.partition_point(|e| e.ts() < ts);
                s.events.iter().skip(from).take(limit).cloned().collect()
            }
        };
        Ok(ReadResult { info, events })
    }

    async fn delete_stream(&self, stream: &StreamId) -> StoreResult<Option<StreamInfo>> {
        let info = {
            let mut guard = self.inner.lock();
            let st = &mut *guard;
            let Some(s) = st.streams.get_mut(stream) else {
                return Ok(None);
            };
            s.epoch = Epoch::generate();
            s.head = Seq(0);
            s.bytes = 0;
            s.events.clear();
            s.closed = false;
            let info = s.info(stream);
            st.idempotency.retain(|(s, _), _| s != stream);
            info
        };
        self.inner.sink.recreated(stream);
        Ok(Some(info))
    }

    async fn close_stream(&self, stream: &StreamId) -> StoreResult<Option<StreamInfo>> {
        let mut guard = self.inner.lock();
        let Some(s) = guard.streams.get_mut(stream) else {
            return Ok(None);
        };
        let newly = !s.closed;
        s.closed = true;
        let info = s.info(stream);
        // Under the lock, like commits: the sink hears of the close after every event.
        if newly {
            self.inner.sink.closed(stream, info.head);
        }
        Ok(Some(info))
    }

    async fn stream_info(&self, stream: &StreamId) -> StoreResult<StreamInfo> {
        let st = self.inner.lock();
        Ok(self.inner.info(&st, stream))
    }

    async fn read(&self, stream: &StreamId, after: Seq, limit: usize) -> StoreResult<ReadResult> {
        self.read_range(stream, ReadRange::After(after), limit)
            .await
    }

    async fn digest(&self, stream: &StreamId) -> StoreResult<(StreamInfo, String)> {
        let st = self.inner.lock();
        let info = self.inner.info(&st, stream);
        let mut h = ChainHash::default();
        if let Some(s) = st.streams.get(stream) {
            for e in &s.events {
                h.push(e.json());
            }
        }
        Ok((info, h.hex()))
    }

    async fn create_session_within(
        &self,
        session: SessionRecord,
        cap: SessionCap,
    ) -> StoreResult<()> {
        let now = self.inner.clock.now_ms();
        let mut guard = self.inner.lock();
        let State {
            sessions, by_sub, ..
        } = &mut *guard;
        let ids = by_sub.entry(session.sub.clone()).or_default();
        let live = |id: &SessionId| {
            sessions
                .get(id)
                .filter(|s| s.sub == session.sub && SessionCap::is_live(s.expires_at_ms, now))
        };
        ids.retain(|id| *id != session.id && live(id).is_some());
        let earliest = ids.iter().filter_map(live).map(|s| s.expires_at_ms);
        cap.check(ids.len() as u64, earliest.min().unwrap_or(now), now)?;
        ids.push(session.id.clone());
        sessions.insert(session.id.clone(), session);
        Ok(())
    }

    async fn load_session(&self, id: &SessionId) -> StoreResult<Option<SessionRecord>> {
        Ok(self.inner.lock().sessions.get(id).cloned())
    }

    async fn put_session_stream(
        &self,
        id: &SessionId,
        stream: &StreamId,
        state: SessionStream,
    ) -> StoreResult<()> {
        let mut st = self.inner.lock();
        let s = st.sessions.get_mut(id).ok_or(StoreError::SessionNotFound)?;
        let state = merge_session_stream(s.streams.get(stream), state);
        s.streams.insert(stream.clone(), state);
        Ok(())
    }

    async fn remove_session_stream(&self, id: &SessionId, stream: &StreamId) -> StoreResult<()> {
        let mut st = self.inner.lock();
        if let Some(s) = st.sessions.get_mut(id) {
            s.streams.remove(stream);
        }
        Ok(())
    }

    async fn checkpoint(
        &self,
        id: &SessionId,
        stream: &StreamId,
        seq: Seq,
    ) -> StoreResult<AckUpdate> {
        let mut guard = self.inner.lock();
        let info = self.inner.info(&guard, stream);
        let session = guard
            .sessions
            .get_mut(id)
            .ok_or(StoreError::SessionNotFound)?;
        let ss = session
            .streams
            .get_mut(stream)
            .ok_or(StoreError::NotInSession)?;
        apply_checkpoint(ss, &info, seq)
    }

    async fn set_session_grants(
        &self,
        id: &SessionId,
        grants: &zerodrop_core::Grants,
    ) -> StoreResult<()> {
        let mut st = self.inner.lock();
        let s = st.sessions.get_mut(id).ok_or(StoreError::SessionNotFound)?;
        s.grants = grants.clone();
        Ok(())
    }

    async fn stream_record(&self, stream: &StreamId) -> StoreResult<Option<String>> {
        Ok(self.inner.lock().records.get(stream).cloned())
    }

    async fn put_stream_record(
        &self,
        stream: &StreamId,
        record: Option<String>,
    ) -> StoreResult<()> {
        let mut st = self.inner.lock();
        match record {
            Some(r) => st.records.insert(stream.clone(), r),
            None => st.records.remove(stream),
        };
        Ok(())
    }

    async fn put_revocation(&self, r: &crate::Revocation) -> StoreResult<()> {
        let mut st = self.inner.lock();
        st.revocations.retain(|x| x.id != r.id);
        st.revocations.push(r.clone());
        Ok(())
    }

    async fn delete_revocation(&self, id: &str) -> StoreResult<bool> {
        let mut st = self.inner.lock();
        let before = st.revocations.len();
        st.revocations.retain(|x| x.id != id);
        Ok(st.revocations.len() < before)
    }

    async fn revocations(&self) -> StoreResult<Vec<crate::Revocation>> {
        let now = self.inner.clock.restriction_now_ms();
        let st = self.inner.lock();
        Ok(st
            .revocations
            .iter()
            .filter(|r| r.active(now))
            .cloned()
            .collect())
    }

    async fn touch_session(&self, id: &SessionId, expires_at_ms: u64) -> StoreResult<()> {
        if let Some(s) = self.inner.lock().sessions.get_mut(id) {
            s.expires_at_ms = expires_at_ms;
        }
        Ok(())
    }

    async fn mark_dropped(
        &self,
        id: &SessionId,
        stream: &StreamId,
        through: Seq,
    ) -> StoreResult<()> {
        if let Some(ss) = self
            .inner
            .lock()
            .sessions
            .get_mut(id)
            .and_then(|s| s.streams.get_mut(stream))
        {
            ss.dropped_through = ss.dropped_through.max(through);
        }
        Ok(())
    }

    async fn ping(&self) -> StoreResult<()> {
        Ok(())
    }

    async fn durability(&self) -> StoreDurability {
        StoreDurability::Memory
    }

    async fn stats(&self) -> StoreResult<StoreStats> {
        let st = self.inner.lock();
        Ok(StoreStats {
            sessions: st.sessions.len() as u64,
            streams: st.streams.len() as u64,
        })
    }

    fn presence(&self) -> &dyn PresenceStore {
        &self.presence
    }
}
