//! Live fan-out: the fast path in front of the log.
//!
//! The log is the truth; this module only makes reading its tail cheap. Each stream with
//! subscribers has a [`Topic`] holding a ring of its newest durable events (each encoded once
//! and shared by every subscriber, see [`Delivery`]) and the listeners to wake when it grows.
//! A subscriber is a cursor ([`Subscription`]): on every wake it takes the events after its
//! cursor from the ring, and when the ring does not reach back that far (a slow consumer, a
//! new subscription with history, a feed that missed something) it reads them from the store.
//! Nothing is ever pushed into a per-client queue, so a slow client cannot lose events and
//! cannot hold anyone else back; it just reads the log from further behind.
//!
//! The replay/live seam is safe by construction: a subscription registers with its topic
//! *before* it first reads, every read starts strictly after the cursor, and the cursor only
//! moves over contiguous seqs — no gap and no duplicate, whatever races the publishers run.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use tokio::sync::mpsc;
use tungstenite::Utf8Bytes;
use zerodrop_core::window::{WindowError, newly_dropped, replay_window};
use zerodrop_core::{Epoch, Event, Seq, SessionId, StreamId, now_ms};
use zerodrop_store::{LiveSink, Store, StoreError};

use crate::metrics::Metrics;

const SHARDS: usize = 32;
/// Most events one catch-up read takes from the log.
const LOG_READ_EVENTS: usize = 256;

/// One durable event, with its wire encodings built at most once.
pub struct Delivery {
    pub event: Arc<Event>,
    ws: OnceLock<Utf8Bytes>,
    /// `zerodrop.v3`'s binary frame, for a byte payload (`None` for any other).
    ws_binary: OnceLock<Option<Bytes>>,
    sse: OnceLock<Bytes>,
}

impl Delivery {
    pub fn new(event: Arc<Event>) -> Arc<Delivery> {
        Arc::new(Delivery {
            event,
            ws: OnceLock::new(),
            ws_binary: OnceLock::new(),
            sse: OnceLock::new(),
        })
    }

    pub fn seq(&self) -> Seq {
        self.event.seq()
    }

    /// The WebSocket `event` frame (shared bytes).
    pub fn ws_frame(&self) -> Utf8Bytes {
        self.ws
            .get_or_init(|| Utf8Bytes::from(self.event.ws_frame()))
            .clone()
    }

    /// The `zerodrop.v3` binary `event` frame (shared bytes) when the payload is bytes.
    pub fn ws_binary_frame(&self) -> Option<Bytes> {
        self.ws_binary
            .get_or_init(|| self.event.ws_binary_frame().map(Bytes::from))
            .clone()
    }

    /// The SSE message: `id: <epoch>:<seq>`, `event: event`, `data: <event JSON>`.
    pub fn sse_block(&self) -> Bytes {
        self.sse
            .get_or_init(|| {
                let e = &self.event;
                let json = e.json();
                let mut b = Vec::with_capacity(json.len() + 64);
                b.extend_from_slice(b"id: ");
                b.extend_from_slice(e.epoch().as_str().as_bytes());
                b.push(b':');
                b.extend_from_slice(e.seq().to_string().as_bytes());
                b.extend_from_slice(b"\nevent: event\ndata: ");
                b.extend_from_slice(json);
                b.extend_from_slice(b"\n\n");
                Bytes::from(b)
            })
            .clone()
    }

    fn size(&self) -> usize {
        self.event.json().len()
    }
}

/// A connection's doorbell: the hub rings it when its streams grow; drains and takeovers ring
/// it too. `wake` is a couple of atomic operations (no lock), and cheap when the connection is
/// already due to look.
#[derive(Default)]
pub struct Signal {
    pending: AtomicBool,
    kicked: AtomicBool,
    waker: AtomicWaker,
}

impl Signal {
    pub fn new() -> Arc<Signal> {
        Arc::new(Signal::default())
    }

    pub fn wake(&self) {
        if !self.pending.swap(true, Ordering::AcqRel) {
            self.waker.wake();
        }
    }

    /// Asks the connection to close because a newer one took its session over.
    pub fn kick(&self) {
        self.kicked.store(true, Ordering::Release);
        self.wake();
    }

    pub fn is_kicked(&self) -> bool {
        self.kicked.load(Ordering::Acquire)
    }

    /// Resolves once rung (at once if a ring is pending). Cancel-safe.
    pub fn woken(&self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            if self.pending.load(Ordering::Acquire) {
                return Poll::Ready(());
            }
            self.waker.register(cx.waker());
            if self.pending.load(Ordering::Acquire) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
    }

    /// Clears the ring; call before looking, so a ring during the look is not lost. (An RMW,
    /// so that whatever was published before the ring we clear is visible to the look.)
    pub fn take(&self) {
        self.pending.swap(false, Ordering::AcqRel);
    }
}

struct Listener {
    signal: Arc<Signal>,
    /// Last seq delivered; read at trim time to count drops.
    cursor: AtomicU64,
    /// Drops up to here were counted for this listener already.
    dropped_through: AtomicU64,
    /// The session this cursor serves, if any: drops counted here are recorded in it.
    session: Option<SessionId>,
    /// Its index in its topic's listeners (kept under that lock), so that leaving costs the
    /// same with ten listeners or a million: a mass disconnect is not quadratic.
    slot: AtomicUsize,
}

impl Listener {
    /// Asks for drops counted through `through` to be recorded in this cursor's session.
    fn remember_drops(
        &self,
        marks: &mpsc::UnboundedSender<DropMark>,
        stream: &StreamId,
        through: Seq,
    ) {
        if let Some(session) = &self.session {
            let _ = marks.send(DropMark {
                session: session.clone(),
                stream: stream.clone(),
                through,
            });
        }
    }
}

/// Drops counted for a session's stream while it was connected. The server records each in
/// the store (`Store::mark_dropped`), so that a later resume of the session, on any instance,
/// does not count the same events again (`dropped_messages` counts once per session and
/// event).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DropMark {
    pub session: SessionId,
    pub stream: StreamId,
    pub through: Seq,
}

#[derive(Default)]
struct Ring {
    items: VecDeque<Arc<Delivery>>,
    bytes: usize,
    /// The seq the next pushed event must have; `None` when unknown (new or reset).
    next: Option<Seq>,
    epoch: Option<Epoch>,
    /// Times the ring was cleared: a log read taken before a clear says nothing about what
    /// the feed will bring after it (see [`Ring::learn`]).
    clears: u64,
}

impl Ring {
    fn clear(&mut self) {
        self.items.clear();
        self.bytes = 0;
        self.next = None;
        self.epoch = None;
        self.clears += 1;
    }

    /// A log read of this topic's stream found `head` in `epoch`, in a snapshot taken after
    /// a listener was registered here and while the ring was not cleared (`clears` as read
    /// before the read). A ring that knows nothing yet learns where the feed goes on: every
    /// event after that snapshot is pushed here (the topic existed before it), and any at or
    /// below `head` that is pushed late is a repeat. So the next reader caught up at `head`
    /// is answered from memory instead of reading the log again, which is what every new
    /// subscriber of a quiet stream would otherwise do.
    fn learn(&mut self, epoch: &Epoch, head: Seq, clears: u64) {
        if self.clears == clears && self.next.is_none() && self.items.is_empty() {
            self.next = Some(head.next());
            self.epoch = Some(epoch.clone());
        }
    }

    /// The head and epoch the feed is at, when the ring knows them.
    fn head(&self) -> Option<(Epoch, Seq)> {
        match (&self.epoch, self.next) {
            (Some(e), Some(n)) => Some((e.clone(), Seq(n.0.saturating_sub(1)))),
            _ => None,
        }
    }

    fn push(&mut self, d: Arc<Delivery>, max_events: usize, max_bytes: usize) {
        let seq = d.seq();
        if self.epoch.as_ref().is_some_and(|e| e != d.event.epoch()) {
            self.clear();
        }
        match self.next {
            Some(n) if seq < n => return, // already have it (a feed may repeat itself)
            Some(n) if seq > n => self.clear(), // the feed skipped something: start over
            _ => {}
        }
        self.epoch = Some(d.event.epoch().clone());
        self.bytes += d.size();
        self.items.push_back(d);
        self.next = Some(seq.next());
        while self.items.len() > 1 && (self.items.len() > max_events || self.bytes > max_bytes) {
            if let Some(old) = self.items.pop_front() {
                self.bytes -= old.size();
            }
        }
    }

    fn trim(&mut self, first: Seq) {
        while self.items.front().is_some_and(|d| d.seq() < first) {
            if let Some(old) = self.items.pop_front() {
                self.bytes -= old.size();
            }
        }
    }

    /// Appends the events after `cursor` (at most `max`) if the ring can tell what they are;
    /// `false` means "read the store".
    fn after(&self, cursor: Seq, max: usize, out: &mut Vec<Arc<Delivery>>) -> bool {
        let Some(next) = self.next else { return false };
        let want = cursor.next();
        if want >= next {
            // Caught up with the feed (or ahead of it, having read a fresher store snapshot):
            // whatever comes next will be pushed here and wake us.
            return true;
        }
        let Some(front) = self.items.front() else {
            return false;
        };
        if front.seq() > want {
            return false;
        }
        let start = (want.0 - front.seq().0) as usize;
        out.extend(self.items.iter().skip(start).take(max).cloned());
        true
    }
}

pub struct Topic {
    ring: RwLock<Ring>,
    listeners: Mutex<Vec<Arc<Listener>>>,
    /// When the last listener left (ms), 0 while there are listeners.
    idle_since_ms: AtomicU64,
    /// The stream was closed at seq `closed - 1`; 0 while it is open (or not known closed).
    closed: AtomicU64,
}

impl Topic {
    fn new() -> Topic {
        Topic {
            ring: RwLock::new(Ring::default()),
            listeners: Mutex::new(Vec::new()),
            idle_since_ms: AtomicU64::new(0),
            closed: AtomicU64::new(0),
        }
    }

    fn set_closed(&self, last_seq: Option<Seq>) {
        let v = last_seq.map_or(0, |s| s.0.saturating_add(1));
        self.closed.store(v, Ordering::Release);
    }

    fn wake_all(&self) {
        for l in lock(&self.listeners).iter() {
            l.signal.wake();
        }
    }
}

/// Hub settings.
#[derive(Clone, Copy, Debug)]
pub struct HubLimits {
    /// Newest events kept per topic.
    pub ring_events: usize,
    /// Bytes of event JSON kept per topic.
    pub ring_bytes: usize,
    /// A topic without listeners keeps its ring this long, so a reconnect storm right after a
    /// drop is served from memory.
    pub idle_ttl: Duration,
}

impl Default for HubLimits {
    fn default() -> Self {
        HubLimits {
            ring_events: 1024,
            ring_bytes: 1 << 20,
            idle_ttl: Duration::from_secs(120),
        }
    }
}

pub struct Hub {
    shards: Vec<Mutex<HashMap<StreamId, Arc<Topic>>>>,
    limits: HubLimits,
    metrics: Arc<Metrics>,
    marks: mpsc::UnboundedSender<DropMark>,
    marks_rx: Mutex<Option<mpsc::UnboundedReceiver<DropMark>>>,
    /// Per stream, the connections receiving its presence frames: their doorbells and their
    /// "read the presence log again" marks.
    presence: Mutex<HashMap<StreamId, PresenceListeners>>,
    /// The store that feeds this hub, told which streams have a topic here
    /// ([`Store::watch`]): a shared store feeds only those. Unset, nothing is told.
    feed: OnceLock<Weak<dyn Store>>,
}

type PresenceListeners = HashMap<u64, (Arc<Signal>, Arc<AtomicBool>)>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn read<T>(m: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(m: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(|p| p.into_inner())
}

impl Hub {
    pub fn new(limits: HubLimits, metrics: Arc<Metrics>) -> Hub {
        let (marks, marks_rx) = mpsc::unbounded_channel();
        Hub {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            limits,
            metrics,
            marks,
            marks_rx: Mutex::new(Some(marks_rx)),
            presence: Mutex::new(HashMap::new()),
            feed: OnceLock::new(),
        }
    }

    /// From now on `store` is told of every topic made here ([`Store::watch`]) and of every
    /// topic swept ([`Store::unwatch`]), so that it feeds this hub the streams it serves.
    /// Topics that already exist are watched at once.
    pub fn follow(&self, store: &Arc<dyn Store>) {
        let _ = self.feed.set(Arc::downgrade(store));
        for shard in &self.shards {
            for stream in lock(shard).keys() {
                store.watch(stream);
            }
        }
    }

    fn feed(&self) -> Option<Arc<dyn Store>> {
        self.feed.get().and_then(Weak::upgrade)
    }

    /// Connection `conn` receives `stream`'s presence frames: when its presence log grows,
    /// the returned mark is set and the doorbell rung. The mark starts set, so the first turn
    /// reads whatever came before the listener was registered.
    pub fn presence_listen(
        &self,
        stream: &StreamId,
        conn: u64,
        signal: Arc<Signal>,
    ) -> Arc<AtomicBool> {
        let mark = Arc::new(AtomicBool::new(true));
        lock(&self.presence)
            .entry(stream.clone())
            .or_default()
            .insert(conn, (signal.clone(), mark.clone()));
        signal.wake();
        mark
    }

    pub fn presence_unlisten(&self, stream: &StreamId, conn: u64) {
        let mut p = lock(&self.presence);
        if let Some(l) = p.get_mut(stream) {
            l.remove(&conn);
            if l.is_empty() {
                p.remove(stream);
            }
        }
    }

    fn ring_presence(&self, stream: Option<&StreamId>) {
        let p = lock(&self.presence);
        let all: Vec<&PresenceListeners> = match stream {
            Some(s) => p.get(s).into_iter().collect(),
            None => p.values().collect(),
        };
        for (signal, mark) in all.into_iter().flat_map(|l| l.values()) {
            mark.store(true, Ordering::Release);
            signal.wake();
        }
    }

    /// The drops counted for sessions, to record in the store (taken once, by the server).
    pub fn take_drop_marks(&self) -> Option<mpsc::UnboundedReceiver<DropMark>> {
        lock(&self.marks_rx).take()
    }

    fn shard(&self, stream: &StreamId) -> &Mutex<HashMap<StreamId, Arc<Topic>>> {
        use std::hash::{Hash, Hasher};
        let mut h = std::hash::DefaultHasher::new();
        stream.hash(&mut h);
        &self.shards[(h.finish() as usize) % SHARDS]
    }

    fn get(&self, stream: &StreamId) -> Option<Arc<Topic>> {
        lock(self.shard(stream)).get(stream).cloned()
    }

    /// Registers a cursor at `after` on `stream`, for `session` if the connection has one.
    /// The caller must then pull: the first pull reads whatever the log holds after `after`.
    pub fn subscribe(
        &self,
        stream: StreamId,
        epoch: Epoch,
        after: Seq,
        signal: Arc<Signal>,
        session: Option<SessionId>,
    ) -> Subscription {
        let topic = {
            let mut shard = lock(self.shard(&stream));
            match shard.get(&stream) {
                Some(t) => t.clone(),
                None => {
                    let t = Arc::new(Topic::new());
                    shard.insert(stream.clone(), t.clone());
                    // Under the shard's lock, so that a sweep's `unwatch` cannot come after it.
                    if let Some(store) = self.feed() {
                        store.watch(&stream);
                    }
                    t
                }
            }
        };
        let listener = Arc::new(Listener {
            signal,
            cursor: AtomicU64::new(after.0),
            dropped_through: AtomicU64::new(0),
            session,
            slot: AtomicUsize::new(0),
        });
        {
            let mut ls = lock(&topic.listeners);
            listener.slot.store(ls.len(), Ordering::Relaxed);
            ls.push(listener.clone());
        }
        topic.idle_since_ms.store(0, Ordering::Relaxed);
        Subscription {
            stream,
            epoch,
            topic,
            listener,
            cursor: after,
            replay_until: after,
            marks: self.marks.clone(),
        }
    }

    /// Where the live feed of `stream` is (its epoch and head), when this instance knows it
    /// from memory: the stream has a topic whose ring saw an event or learnt the head from a
    /// log read. It may lag the store by the events being pushed right now, never lead it.
    pub fn head(&self, stream: &StreamId) -> Option<(Epoch, Seq)> {
        let topic = self.get(stream)?;
        read(&topic.ring).head()
    }

    /// Forgets topics that have had no listener for `idle_ttl`.
    pub fn sweep(&self) {
        let now = now_ms();
        let ttl = self.limits.idle_ttl.as_millis() as u64;
        let feed = self.feed();
        for shard in &self.shards {
            lock(shard).retain(|stream, t| {
                let since = t.idle_since_ms.load(Ordering::Relaxed);
                let keep =
                    since == 0 || now.saturating_sub(since) < ttl || !lock(&t.listeners).is_empty();
                if !keep && let Some(store) = &feed {
                    store.unwatch(stream);
                }
                keep
            });
        }
    }

    /// Topics currently held (for tests and introspection).
    pub fn topics(&self) -> usize {
        self.shards.iter().map(|s| lock(s).len()).sum()
    }
}

impl LiveSink for Hub {
    fn committed(&self, events: &[Arc<Event>]) {
        let mut i = 0;
        while i < events.len() {
            let stream = events[i].stream();
            let mut j = i + 1;
            while j < events.len() && events[j].stream() == stream {
                j += 1;
            }
            if let Some(topic) = self.get(stream) {
                {
                    let mut ring = write(&topic.ring);
                    for e in &events[i..j] {
                        ring.push(
                            Delivery::new(e.clone()),
                            self.limits.ring_events,
                            self.limits.ring_bytes,
                        );
                    }
                }
                topic.wake_all();
            }
            i = j;
        }
    }

    fn trimmed(&self, stream: &StreamId, first_seq: Seq, count: u64) {
        self.metrics.trimmed(count);
        let Some(topic) = self.get(stream) else {
            return;
        };
        write(&topic.ring).trim(first_seq);
        let lost_through = first_seq.0.saturating_sub(1);
        for l in lock(&topic.listeners).iter() {
            let n = newly_dropped(
                Seq(l.cursor.load(Ordering::Acquire)),
                first_seq,
                Seq(l.dropped_through.load(Ordering::Acquire)),
            );
            if n > 0 {
                self.metrics.dropped(n);
                l.dropped_through.fetch_max(lost_through, Ordering::AcqRel);
                l.remember_drops(&self.marks, stream, Seq(lost_through));
                // Its next look finds the hole and tells the client.
                l.signal.wake();
            }
        }
    }

    fn recreated(&self, stream: &StreamId) {
        let Some(topic) = self.get(stream) else {
            return;
        };
        write(&topic.ring).clear();
        topic.set_closed(None);
        // Each cursor's next look reads the log, which tells it of the new epoch.
        topic.wake_all();
    }

    fn closed(&self, stream: &StreamId, last_seq: Seq) {
        let Some(topic) = self.get(stream) else {
            return;
        };
        topic.set_closed(Some(last_seq));
        topic.wake_all();
    }

    fn missed(&self, stream: &StreamId) {
        let Some(topic) = self.get(stream) else {
            return;
        };
        // The ring may have learnt a head from a log read made before the feed flowed, and
        // events after it were not pushed: each cursor's next look reads the log.
        write(&topic.ring).clear();
        topic.wake_all();
    }

    fn reset(&self) {
        for shard in &self.shards {
            let topics: Vec<Arc<Topic>> = lock(shard).values().cloned().collect();
            for t in topics {
                write(&t.ring).clear();
                t.wake_all();
            }
        }
        self.ring_presence(None);
    }

    fn presence_changed(&self, stream: &StreamId) {
        self.ring_presence(Some(stream));
    }
}

/// Why a subscription cannot go on.
#[derive(Debug)]
pub enum Fault {
    /// Events after the cursor were trimmed. `newly_dropped` were not counted before.
    Trimmed {
        first_available: Seq,
        newly_dropped: u64,
    },
    /// The log was recreated (or went backwards): positions of the old epoch mean nothing.
    EpochChanged {
        current: Epoch,
    },
    Store(StoreError),
}

/// One client's cursor over one stream.
pub struct Subscription {
    pub stream: StreamId,
    pub epoch: Epoch,
    topic: Arc<Topic>,
    listener: Arc<Listener>,
    cursor: Seq,
    /// Events up to here were already in the log when the subscription started.
    replay_until: Seq,
    marks: mpsc::UnboundedSender<DropMark>,
}

impl Subscription {
    pub fn cursor(&self) -> Seq {
        self.cursor
    }

    /// Events at or below this seq count as replayed rather than live.
    pub fn set_replay_until(&mut self, head: Seq) {
        self.replay_until = head;
    }

    /// Appends up to `max` events after the cursor to `out`, from the ring or the log, and
    /// moves the cursor over them. Returns how many of them were replays.
    pub async fn pull(
        &mut self,
        store: &dyn Store,
        max: usize,
        out: &mut Vec<Arc<Delivery>>,
    ) -> Result<usize, Fault> {
        let start = out.len();
        let from_ring = {
            let ring = read(&self.topic.ring);
            // A ring already in another epoch says nothing about this cursor: ask the log.
            ring.epoch.as_ref().is_none_or(|e| *e == self.epoch)
                && ring.after(self.cursor, max, out)
        };
        if !from_ring {
            let clears = read(&self.topic.ring).clears;
            // Small reads are cheap (and run inline on SQLite); the next look reads on.
            let res = store
                .read(&self.stream, self.cursor, max.min(LOG_READ_EVENTS))
                .await
                .map_err(Fault::Store)?;
            match replay_window(self.cursor, Some(&self.epoch), &res.info.bounds()) {
                Ok(_) => {}
                Err(WindowError::Trimmed {
                    first_available, ..
                }) => {
                    let counted = Seq(self.listener.dropped_through.load(Ordering::Acquire));
                    let n = newly_dropped(self.cursor, first_available, counted);
                    let through = Seq(first_available.0.saturating_sub(1));
                    self.listener
                        .dropped_through
                        .fetch_max(through.0, Ordering::AcqRel);
                    if n > 0 {
                        self.listener
                            .remember_drops(&self.marks, &self.stream, through);
                    }
                    return Err(Fault::Trimmed {
                        first_available,
                        newly_dropped: n,
                    });
                }
                Err(WindowError::EpochChanged { current }) => {
                    return Err(Fault::EpochChanged { current });
                }
                // Our cursor is past the log's head: the log went backwards.
                Err(WindowError::BeyondHead { .. }) => {
                    return Err(Fault::EpochChanged {
                        current: res.info.epoch,
                    });
                }
            }
            if res.info.epoch == self.epoch {
                write(&self.topic.ring).learn(&res.info.epoch, res.info.head, clears);
                if res.info.closed {
                    self.topic.set_closed(Some(res.info.head));
                }
            }
            out.extend(res.events.into_iter().map(Delivery::new));
        }
        let mut replayed = 0;
        let mut i = start;
        while i < out.len() {
            let (seq, epoch_differs) = {
                let e = &out[i].event;
                (e.seq(), *e.epoch() != self.epoch)
            };
            if epoch_differs {
                let current = out[i].event.epoch().clone();
                out.truncate(i);
                self.listener.cursor.store(self.cursor.0, Ordering::Release);
                return Err(Fault::EpochChanged { current });
            }
            if seq != self.cursor.next() {
                // Never skip: leave the rest for the next look, which reads the log.
                out.truncate(i);
                self.listener.signal.wake();
                break;
            }
            self.cursor = seq;
            if seq <= self.replay_until {
                replayed += 1;
            }
            i += 1;
        }
        self.listener.cursor.store(self.cursor.0, Ordering::Release);
        Ok(replayed)
    }

    /// The stream ended here: it was closed at this seq and the cursor has delivered every
    /// event up to it.
    pub fn ended(&self) -> Option<Seq> {
        let v = self.topic.closed.load(Ordering::Acquire);
        (v > 0 && Seq(v - 1) == self.cursor).then_some(self.cursor)
    }

    /// Whether the ring says there is nothing after the cursor (a cheap check before a pull).
    pub fn maybe_behind(&self) -> bool {
        let ring = read(&self.topic.ring);
        match ring.next {
            Some(next) => self.cursor.next() < next,
            None => true,
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut ls = lock(&self.topic.listeners);
        let i = self.listener.slot.load(Ordering::Relaxed);
        if ls.get(i).is_some_and(|l| Arc::ptr_eq(l, &self.listener)) {
            ls.swap_remove(i);
            if let Some(moved) = ls.get(i) {
                moved.slot.store(i, Ordering::Relaxed);
            }
        } else {
            debug_assert!(false, "a listener's slot is kept under the topic's lock");
            ls.retain(|l| !Arc::ptr_eq(l, &self.listener));
        }
        if ls.is_empty() {
            self.topic
                .idle_since_ms
                .store(now_ms().max(1), Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zerodrop_core::Retention;
    use zerodrop_store::{AppendRequest, MemoryStore};

    fn ev(seq: u64) -> Arc<Event> {
        Arc::new(Event::encode(
            StreamId::new("s").unwrap(),
            Seq(seq),
            Epoch::parse("e1").unwrap(),
            1,
            "1",
        ))
    }

    #[test]
    fn ring_serves_contiguous_tails_only() {
        let mut r = Ring::default();
        let mut out = Vec::new();
        assert!(
            !r.after(Seq(0), 10, &mut out),
            "unknown ring sends readers to the log"
        );
        for s in 5..=9 {
            r.push(Delivery::new(ev(s)), 100, 1 << 20);
        }
        assert!(r.after(Seq(6), 10, &mut out));
        assert_eq!(
            out.iter().map(|d| d.seq().0).collect::<Vec<_>>(),
            vec![7, 8, 9]
        );
        out.clear();
        assert!(
            !r.after(Seq(3), 10, &mut out),
            "before the ring: read the log"
        );
        assert!(r.after(Seq(9), 10, &mut out) && out.is_empty(), "caught up");
        r.push(Delivery::new(ev(9)), 100, 1 << 20);
        assert_eq!(r.items.len(), 5, "a repeated event is ignored");
        r.push(Delivery::new(ev(12)), 100, 1 << 20);
        assert_eq!(r.items.len(), 1, "a gap in the feed restarts the ring");
        assert!(!r.after(Seq(9), 10, &mut out));
        for s in 13..=20 {
            r.push(Delivery::new(ev(s)), 4, 1 << 20);
        }
        assert_eq!(r.items.front().unwrap().seq(), Seq(17));
        r.trim(Seq(19));
        assert_eq!(r.items.front().unwrap().seq(), Seq(19));
    }

    #[test]
    fn a_ring_learns_the_head_from_a_log_read_only_if_nothing_cleared_it_since() {
        let e1 = Epoch::parse("e1").unwrap();
        let mut r = Ring::default();
        let mut out = Vec::new();
        let before = r.clears;
        r.learn(&e1, Seq(4), before);
        assert_eq!(r.head(), Some((e1.clone(), Seq(4))));
        assert!(
            r.after(Seq(4), 10, &mut out) && out.is_empty(),
            "caught up at the head"
        );
        assert!(
            !r.after(Seq(2), 10, &mut out),
            "below the head: read the log"
        );
        // A late push of what the read already saw is a repeat; the next one is taken.
        r.push(Delivery::new(ev(4)), 100, 1 << 20);
        assert!(r.items.is_empty());
        r.push(Delivery::new(ev(5)), 100, 1 << 20);
        assert!(r.after(Seq(4), 10, &mut out));
        assert_eq!(out.iter().map(|d| d.seq().0).collect::<Vec<_>>(), vec![5]);
        // Learning never overrides what the feed said.
        r.learn(&e1, Seq(9), r.clears);
        assert_eq!(r.head(), Some((e1.clone(), Seq(5))));
        // A read taken before a clear (a feed that may have missed events) teaches nothing.
        let stale = r.clears;
        r.clear();
        r.learn(&e1, Seq(5), stale);
        assert_eq!(r.head(), None);
        r.learn(&e1, Seq(7), r.clears);
        assert_eq!(r.head(), Some((e1, Seq(7))));
    }

    #[tokio::test]
    async fn the_first_pull_of_a_quiet_stream_tells_the_hub_its_head() {
        let metrics = Arc::new(Metrics::new());
        let hub = Arc::new(Hub::new(HubLimits::default(), metrics));
        let store = MemoryStore::new(Retention::default(), hub.clone());
        let s = StreamId::new("quiet").unwrap();
        for i in 0..3 {
            let req = AppendRequest {
                stream: s.clone(),
                data: i.to_string(),
                idempotency: None,
            };
            store.append(req).await.unwrap();
        }
        let epoch = store.stream_info(&s).await.unwrap().epoch;
        assert_eq!(hub.head(&s), None, "no topic yet");
        let mut sub = hub.subscribe(s.clone(), epoch.clone(), Seq(1), Signal::new(), None);
        assert_eq!(hub.head(&s), None, "a topic that saw nothing knows nothing");
        let mut out = Vec::new();
        sub.pull(&store, 100, &mut out).await.unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(hub.head(&s), Some((epoch.clone(), Seq(3))));
        // The next event reaches the subscriber through the ring, after what it read.
        let req = AppendRequest {
            stream: s.clone(),
            data: "3".into(),
            idempotency: None,
        };
        store.append(req).await.unwrap();
        out.clear();
        sub.pull(&store, 100, &mut out).await.unwrap();
        assert_eq!(out.iter().map(|d| d.seq().0).collect::<Vec<_>>(), vec![4]);
        assert_eq!(hub.head(&s), Some((epoch, Seq(4))));
    }

    /// A feed that starts after the topic's first log read (a shared store subscribing to
    /// the stream's channel) may have missed events the ring would wait for forever: told
    /// `missed`, the hub wakes the subscriber, whose next pull reads them from the log.
    #[tokio::test]
    async fn a_feed_that_missed_events_makes_the_subscribers_read_the_log() {
        let hub = Arc::new(Hub::new(HubLimits::default(), Arc::new(Metrics::new())));
        // The hub hears nothing from this store: the feed has not started.
        let store = MemoryStore::new(Retention::default(), Arc::new(zerodrop_store::NoSink));
        let s = StreamId::new("late").unwrap();
        let append = |data: &str| AppendRequest {
            stream: s.clone(),
            data: data.into(),
            idempotency: None,
        };
        store.append(append("1")).await.unwrap();
        let epoch = store.stream_info(&s).await.unwrap().epoch;
        let signal = Signal::new();
        let mut sub = hub.subscribe(s.clone(), epoch.clone(), Seq(0), signal.clone(), None);
        let mut out = Vec::new();
        sub.pull(&store, 100, &mut out).await.unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(
            hub.head(&s),
            Some((epoch.clone(), Seq(1))),
            "learnt from the log"
        );
        signal.take();
        store.append(append("2")).await.unwrap();
        out.clear();
        sub.pull(&store, 100, &mut out).await.unwrap();
        assert!(out.is_empty(), "the ring believes it is caught up");
        hub.missed(&s);
        assert!(
            signal.pending.load(Ordering::Acquire),
            "the subscriber is woken"
        );
        assert_eq!(hub.head(&s), None, "the ring forgot what it learnt");
        sub.pull(&store, 100, &mut out).await.unwrap();
        assert_eq!(out.iter().map(|d| d.seq().0).collect::<Vec<_>>(), vec![2]);
    }

    /// Leaving in any order keeps every remaining listener where its slot says, and each
    /// remaining one still gets what is published.
    #[tokio::test]
    async fn listeners_leave_in_any_order_and_the_rest_still_receive() {
        let metrics = Arc::new(Metrics::new());
        let hub = Arc::new(Hub::new(HubLimits::default(), metrics));
        let store = MemoryStore::new(Retention::default(), hub.clone());
        let s = StreamId::new("many").unwrap();
        let req = AppendRequest {
            stream: s.clone(),
            data: "0".into(),
            idempotency: None,
        };
        store.append(req).await.unwrap();
        let epoch = store.stream_info(&s).await.unwrap().epoch;
        let mut subs: Vec<Option<Subscription>> = (0..7)
            .map(|_| Some(hub.subscribe(s.clone(), epoch.clone(), Seq(1), Signal::new(), None)))
            .collect();
        let topic = hub.get(&s).unwrap();
        for leave in [3, 0, 6, 4] {
            subs[leave] = None;
            let ls = lock(&topic.listeners);
            for (i, l) in ls.iter().enumerate() {
                assert_eq!(l.slot.load(Ordering::Relaxed), i, "after {leave} left");
            }
        }
        assert_eq!(lock(&topic.listeners).len(), 3);
        let req = AppendRequest {
            stream: s.clone(),
            data: "1".into(),
            idempotency: None,
        };
        store.append(req).await.unwrap();
        for sub in subs.iter_mut().flatten() {
            let mut out = Vec::new();
            sub.pull(&store, 100, &mut out).await.unwrap();
            assert_eq!(out.iter().map(|d| d.seq().0).collect::<Vec<_>>(), vec![2]);
        }
        subs.clear();
        assert!(lock(&topic.listeners).is_empty());
        assert_ne!(topic.idle_since_ms.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn subscription_reads_history_then_live_without_gap_or_duplicate() {
        let metrics = Arc::new(Metrics::new());
        let hub = Arc::new(Hub::new(HubLimits::default(), metrics));
        let store = MemoryStore::new(Retention::default(), hub.clone());
        let s = StreamId::new("room:1").unwrap();
        for i in 0..5 {
            store
                .append(AppendRequest {
                    stream: s.clone(),
                    data: i.to_string(),
                    idempotency: None,
                })
                .await
                .unwrap();
        }
        let epoch = store.stream_info(&s).await.unwrap().epoch;
        let signal = Signal::new();
        let mut sub = hub.subscribe(s.clone(), epoch, Seq(2), signal.clone(), None);
        let mut out = Vec::new();
        sub.pull(&store, 100, &mut out).await.unwrap();
        assert_eq!(
            out.iter().map(|d| d.seq().0).collect::<Vec<_>>(),
            vec![3, 4, 5]
        );
        for i in 5..8 {
            store
                .append(AppendRequest {
                    stream: s.clone(),
                    data: i.to_string(),
                    idempotency: None,
                })
                .await
                .unwrap();
        }
        tokio::time::timeout(Duration::from_secs(1), signal.woken())
            .await
            .unwrap();
        signal.take();
        out.clear();
        sub.pull(&store, 100, &mut out).await.unwrap();
        assert_eq!(
            out.iter().map(|d| d.seq().0).collect::<Vec<_>>(),
            vec![6, 7, 8]
        );
        assert!(!sub.maybe_behind());
        // Every live subscriber gets the same encoded frame: built once, shared.
        let mut other = hub.subscribe(s.clone(), sub.epoch.clone(), Seq(5), Signal::new(), None);
        let mut theirs = Vec::new();
        other.pull(&store, 100, &mut theirs).await.unwrap();
        assert_eq!(theirs.len(), 3);
        for (mine, theirs) in out.iter().zip(&theirs) {
            assert!(Arc::ptr_eq(mine, theirs), "one delivery per event");
            assert_eq!(
                mine.ws_frame().as_str().as_ptr(),
                theirs.ws_frame().as_str().as_ptr(),
                "one frame encoding per event"
            );
            assert_eq!(mine.sse_block().as_ptr(), theirs.sse_block().as_ptr());
        }
        drop(other);
        drop(sub);
        assert_eq!(hub.topics(), 1);
    }

    #[tokio::test]
    async fn events_trimmed_under_a_connected_subscriber_are_dropped_once() {
        let metrics = Arc::new(Metrics::new());
        let hub = Arc::new(Hub::new(HubLimits::default(), metrics.clone()));
        let retention = Retention {
            max_events: 5,
            ..Retention::default()
        };
        let store = MemoryStore::new(retention, hub.clone());
        let s = StreamId::new("room:1").unwrap();
        let epoch = store.stream_info(&s).await.unwrap().epoch;
        let mut marks = hub.take_drop_marks().unwrap();
        // A connected subscriber at 0 that does not read (a stalled client), for a session.
        let session = SessionId::generate();
        let mut sub = hub.subscribe(
            s.clone(),
            epoch,
            Seq(0),
            Signal::new(),
            Some(session.clone()),
        );
        for i in 0..12 {
            let req = AppendRequest {
                stream: s.clone(),
                data: i.to_string(),
                idempotency: None,
            };
            store.append(req).await.unwrap();
        }
        // Seqs 1..=7 are gone: counted at trim time, once, and remembered in the session
        // (so that its resume does not count them again).
        assert_eq!(metrics.dropped_total(), 7);
        let mut last = None;
        while let Ok(m) = marks.try_recv() {
            assert_eq!((&m.session, &m.stream), (&session, &s));
            last = Some(m.through);
        }
        assert_eq!(last, Some(Seq(7)));
        let mut out = Vec::new();
        match sub.pull(&store, 100, &mut out).await {
            Err(Fault::Trimmed {
                first_available,
                newly_dropped,
            }) => {
                assert_eq!((first_available, newly_dropped), (Seq(8), 0));
            }
            other => panic!("expected a trimmed fault, got {other:?}"),
        }
        assert_eq!(metrics.dropped_total(), 7);
        // A connection ends a trimmed subscription (the client resyncs); one that kept up
        // loses nothing when more trims happen.
        let epoch = sub.epoch.clone();
        drop(sub);
        let mut fast = hub.subscribe(s.clone(), epoch, Seq(12), Signal::new(), None);
        for i in 0..6 {
            let req = AppendRequest {
                stream: s.clone(),
                data: i.to_string(),
                idempotency: None,
            };
            store.append(req).await.unwrap();
            out.clear();
            fast.pull(&store, 100, &mut out).await.unwrap();
        }
        assert_eq!(fast.cursor(), Seq(18));
        assert_eq!(metrics.dropped_total(), 7);
    }
}
