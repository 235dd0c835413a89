//! The application layer: the state every transport shares, publishing, connection admission,
//! session holders and drains; its [`session`] module owns every session decision, its
//! `durability` module the store's durability level as the instance serves with it.
//!
//! The store is private to this module tree. Transports (HTTP, WebSocket, SSE) and the guard
//! reach it only through the narrow accessors here: reads of the log, a cursor's pull, the
//! guard's job queue and idempotency records ([`App::guard_store`]), health. So no transport
//! can write a session or decide a position rule: those live in [`session`].

pub mod authz;
pub mod ds;
mod durability;
pub mod policy;
pub mod presence;
mod presence_hooks;
pub mod revocation;
pub mod session;
pub mod streams;

pub use session::{
    AckWrite, Asker, Authority, Hole, OpenAt, Placement, Position, Resumed, StreamStart,
    authority_ended, is_session_cap, no_longer_granted,
};

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::value::RawValue;
use sha2::{Digest, Sha256};
use zerodrop_core::{ErrorCode, Seq, SessionId, StreamId};
use zerodrop_store::{
    AppendOutcome, AppendRequest, GuardStore, IdempotencyKey, ReadResult, Store, StoreKind,
    StoreResult, StoreStats, StreamInfo,
};

use crate::auth::Auth;
use crate::config::Config;
use crate::drain::{Connections, Drain, DrainState};
use crate::error::ApiError;
use crate::live::{Delivery, Fault, Hub, Signal, Subscription};
use crate::metrics::{Metrics, StoreFacts};

/// How long a resume waits for its session's previous connection here to end
/// ([`App::await_release`]).
const TAKEOVER_WAIT: Duration = Duration::from_secs(1);

/// Who publishes, for `--max-new-streams-per-minute`: backends with the api key share one
/// bucket (HTTP publishes and webhooks); a WebSocket `publish` frame counts for its token's
/// `sub`.
#[derive(Clone, Copy, Debug)]
pub enum Publisher<'a> {
    ApiKey,
    Subject(&'a str),
}

impl Publisher<'_> {
    fn key(self) -> String {
        match self {
            Publisher::ApiKey => "api-key".into(),
            Publisher::Subject(sub) => format!("sub:{sub}"),
        }
    }

    fn transport(self) -> &'static str {
        match self {
            Publisher::ApiKey => "http",
            Publisher::Subject(_) => "ws",
        }
    }
}

pub struct App {
    pub cfg: Config,
    pub instance: String,
    /// Private to the application layer: sessions are written only by [`session`], and
    /// transports read through the accessors below.
    store: Arc<dyn Store>,
    pub hub: Arc<Hub>,
    pub metrics: Arc<Metrics>,
    pub auth: Auth,
    pub drain: Drain,
    pub conns: Connections,
    pub store_up: AtomicBool,
    /// The store's durability level as last read (`durability.rs`).
    durability: Mutex<durability::DurabilityState>,
    /// WebSocket acks applied in memory and not yet written to the store.
    pub acks: AckBuffer,
    /// HTTP rate limits per route and key; `None` when `--http-requests-per-sec` is 0.
    pub limits: Option<crate::ratelimit::HttpLimits>,
    /// New streams per publisher and minute; `None` when `--max-new-streams-per-minute` is 0.
    pub new_streams: Option<crate::ratelimit::NewStreamLimit>,
    /// Upstreams, their circuits, bulkheads and cache, and the job queue's settings.
    pub guard: crate::guard::Guard,
    /// Which connection on this instance holds each session, so a resume can take it over.
    holders: Mutex<HashMap<SessionId, Holder>>,
    /// Told whenever a holder lets its session go ([`App::await_release`]).
    released: tokio::sync::Notify,
    /// WebSocket sessions that hold no stream yet and are not written (`session.rs`).
    unwritten: session::Unwritten,
    /// Names this process's connections in holder notices (instance ids may be reused).
    holder_prefix: String,
    /// Every open WebSocket/SSE connection's doorbell, so a drain reaches them all at once.
    doorbells: Mutex<HashMap<u64, Arc<Signal>>>,
    next_conn_id: AtomicU64,
    /// Revocations and disconnect orders as this instance knows them (`revocation.rs`).
    orders: revocation::Orders,
    /// The authorization hooks, when `--authz-upstream` is set (`authz.rs`).
    hooks: Option<authz::Hooks>,
    /// The presence members this instance holds, and its joins and leaves (`presence.rs`).
    presence: presence::Presence,
    /// The Durable Streams room's write locks and uses (`ds.rs`).
    ds: ds::DsStreams,
}

/// A WebSocket connection holding a session on this instance.
struct Holder {
    conn: u64,
    /// Kicked, the connection closes with `SESSION_TAKEN_OVER`.
    signal: Arc<Signal>,
    /// Our own holder notice came back through the shared store: any notice for this
    /// session heard after it is from a newer connection elsewhere. Notices heard before it
    /// were sent before ours, by connections older than this one, and change nothing.
    confirmed: bool,
}

/// Most written-behind acks in one store call (one transaction).
const ACK_CHUNK: usize = 128;

/// WebSocket acks are applied in memory under the checkpoint rule at once, and written to the
/// store once a second, in chunks of 128 (`ACK_CHUNK`) (and when their connection closes):
/// thousands of sockets acking every few events would otherwise cost the store a write each. A crash loses at most
/// the last second of acks, which only means a resuming client is offered events it already
/// has (and its own `lastAck` overrides the stored one anyway).
#[derive(Default)]
pub struct AckBuffer {
    pending: Mutex<HashMap<(SessionId, StreamId), Seq>>,
}

impl AckBuffer {
    pub fn record(&self, sid: &SessionId, stream: &StreamId, seq: Seq) {
        let mut p = lock(&self.pending);
        let slot = p.entry((sid.clone(), stream.clone())).or_insert(seq);
        *slot = (*slot).max(seq);
    }

    /// The ack waiting to be written for this session's stream, if any.
    pub fn pending(&self, sid: &SessionId, stream: &StreamId) -> Option<Seq> {
        lock(&self.pending)
            .get(&(sid.clone(), stream.clone()))
            .copied()
    }

    fn take(&self, only: Option<&SessionId>) -> Vec<(SessionId, StreamId, Seq)> {
        let mut p = lock(&self.pending);
        match only {
            None => p.drain().map(|((a, b), c)| (a, b, c)).collect(),
            Some(sid) => {
                let keys: Vec<_> = p.keys().filter(|(s, _)| s == sid).cloned().collect();
                keys.into_iter()
                    .filter_map(|k| p.remove(&k).map(|seq| (k.0, k.1, seq)))
                    .collect()
            }
        }
    }
}

/// A long-lived connection's claim on a slot of `--max-connections`.
pub struct ConnSlot {
    app: Arc<App>,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let left = self.app.conns.release();
        self.app.drain.on_connections(left);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl App {
    pub fn new(
        cfg: Config,
        instance: String,
        store: Arc<dyn Store>,
        hub: Arc<Hub>,
        metrics: Arc<Metrics>,
        auth: Auth,
        guard: crate::guard::Guard,
    ) -> App {
        let max = cfg.max_connections;
        let limits = crate::ratelimit::HttpLimits::new(cfg.http_requests_per_sec);
        let new_streams = crate::ratelimit::NewStreamLimit::new(cfg.max_new_streams_per_minute);
        let gauge = metrics.clone();
        App {
            instance,
            store,
            hub,
            metrics,
            auth,
            drain: Drain::observed(move |s| gauge.drain_state(s.gauge())),
            conns: Connections::new(max),
            store_up: AtomicBool::new(true),
            durability: Mutex::new(durability::DurabilityState::new()),
            acks: AckBuffer::default(),
            limits,
            new_streams,
            guard,
            holders: Mutex::new(HashMap::new()),
            released: tokio::sync::Notify::new(),
            unwritten: session::Unwritten::default(),
            holder_prefix: hex::encode(zerodrop_core::random_bytes::<6>()),
            doorbells: Mutex::new(HashMap::new()),
            next_conn_id: AtomicU64::new(1),
            orders: revocation::Orders::default(),
            hooks: authz::Hooks::from_config(&cfg),
            presence: presence::Presence::default(),
            ds: ds::DsStreams::default(),
            cfg,
        }
    }

    /// What time it is wherever something expires or is trimmed (`zerodrop_core::clock`).
    pub fn clock(&self) -> &dyn zerodrop_core::Clock {
        &*self.cfg.clock
    }

    pub fn window(&self) -> Duration {
        Duration::from_secs(self.cfg.reconnect_window_sec)
    }

    pub fn store_kind(&self) -> StoreKind {
        self.store.kind()
    }

    /// A stream's bounds (head, oldest retained seq, epoch).
    pub async fn stream_info(&self, stream: &StreamId) -> StoreResult<StreamInfo> {
        self.store.stream_info(stream).await
    }

    /// Up to `limit` events after `after`, with the bounds of the same snapshot.
    pub async fn read(
        &self,
        stream: &StreamId,
        after: Seq,
        limit: usize,
    ) -> StoreResult<ReadResult> {
        self.store.read(stream, after, limit).await
    }

    /// A stream's bounds and the chained digest of its retained events.
    pub async fn digest(&self, stream: &StreamId) -> StoreResult<(StreamInfo, String)> {
        self.store.digest(stream).await
    }

    /// Moves a subscription's cursor over what is ready (ring or log); see
    /// [`Subscription::pull`].
    pub async fn pull(
        &self,
        sub: &mut Subscription,
        budget: usize,
        out: &mut Vec<Arc<Delivery>>,
    ) -> Result<usize, Fault> {
        sub.pull(&*self.store, budget, out).await
    }

    pub async fn store_stats(&self) -> StoreResult<StoreStats> {
        self.store.stats().await
    }

    pub async fn store_ping(&self) -> StoreResult<()> {
        self.store.ping().await
    }

    /// The store refuses every call until a restart (readiness says `store_corrupt`).
    pub fn store_corrupt(&self) -> bool {
        self.store.corrupt()
    }

    /// The guard's part of the store: the job queue and the webhook idempotency records. It
    /// has no session in it, so the guard (and the admin snapshot) may hold it.
    pub fn guard_store(&self) -> &dyn GuardStore {
        &*self.store
    }

    /// Admission for a new WebSocket/SSE connection: refused while draining (`DRAINING`) or
    /// at the connection limit (`OVER_CAPACITY`).
    pub fn admit(self: &Arc<Self>) -> Result<ConnSlot, ApiError> {
        if self.drain.is_refusing() {
            self.drain.blocked_upgrade();
            self.metrics.upgrade_blocked_during_drain();
            return Err(ApiError::new(
                ErrorCode::Draining,
                "this instance is draining; reconnect elsewhere with your resume token",
            )
            .retry_after(self.drain.retry_after_sec()));
        }
        if !self.conns.try_acquire() {
            return Err(ApiError::new(
                ErrorCode::OverCapacity,
                format!("connection limit ({}) reached", self.cfg.max_connections),
            )
            .retry_after(2));
        }
        Ok(ConnSlot { app: self.clone() })
    }

    /// When a reconnect window starting now ends (ms on [`App::clock`]).
    pub fn window_end(&self) -> u64 {
        self.clock().now_ms() + self.cfg.reconnect_window_sec * 1000
    }

    /// Starts `sid`'s reconnect window again (now); `ending`: its connection is over. A
    /// session not written yet is written now (`session::Unwritten`).
    pub async fn touch(&self, sid: &SessionId, ending: bool) {
        match self.write_unwritten(sid, None, ending).await {
            Ok(session::Pending::NotHere | session::Pending::WrittenMeanwhile) => {}
            Ok(session::Pending::WrittenNow) => return,
            Err(e) => {
                tracing::debug!(error = %e.message, "could not write a session");
                return;
            }
        }
        if let Err(e) = self.store.touch_session(sid, self.window_end()).await {
            tracing::debug!(error = %e, "could not extend a session's reconnect window");
        }
    }

    /// Writes buffered WebSocket acks (all of them, or one session's). A large flush goes to
    /// the store in chunks, one after the other, so that a publish queued behind it waits for
    /// one chunk rather than for thousands of acks (and a single-core server is never busy
    /// with them for long at a stretch).
    pub async fn flush_acks(&self, only: Option<&SessionId>) {
        let mut batch = self.acks.take(only);
        while !batch.is_empty() {
            let rest = batch.split_off(batch.len().min(ACK_CHUNK));
            if let Err(e) = self.store.checkpoint_many(batch.clone()).await {
                tracing::debug!(error = %e, "could not store acks; keeping them for the next flush");
                for (sid, stream, seq) in batch.into_iter().chain(rest) {
                    self.acks.record(&sid, &stream, seq);
                }
                return;
            }
            batch = rest;
        }
    }

    /// What every event's `data` must be before it is stored or forwarded: see
    /// [`check_data`], with the largest payload any stream accepts (`--max-payload-bytes`,
    /// or a `[streams."<pattern>"]` table's larger `max_payload_bytes`). The stream's own
    /// limit is [`App::check_publish`]'s.
    pub fn check_data(&self, data: &str) -> Result<(), ApiError> {
        check_data(data, self.cfg.largest_payload_bytes())
    }

    /// `--max-new-streams-per-minute`: a publish that would create `stream` counts for its
    /// publisher. Only when the limit is on does this look the stream up (its head: 0 means
    /// it was never written). Two first publishes racing may both count: the limit errs
    /// toward counting, never toward letting more through.
    async fn admit_new_stream(&self, stream: &StreamId, by: Publisher<'_>) -> Result<(), ApiError> {
        let Some(limit) = &self.new_streams else {
            return Ok(());
        };
        if self.store.stream_info(stream).await?.head != Seq(0) {
            return Ok(());
        }
        limit.check(by.key()).map_err(|wait| {
            self.metrics.rate_limited(by.transport());
            ApiError::new(
                ErrorCode::RateLimited,
                format!(
                    "this publisher created its {} new streams of the minute \
                     (--max-new-streams-per-minute); publishing to existing streams goes on",
                    self.cfg.max_new_streams_per_minute
                ),
            )
            .with("limit", "new_streams_per_minute")
            .with("stream", stream.as_str())
            .with("retryAfterMs", wait * 1000)
            .retry_after(wait)
        })
    }

    /// Appends one event (HTTP publish, webhooks and WebSocket `publish` frames).
    pub async fn publish(
        &self,
        stream: StreamId,
        data: &RawValue,
        idempotency_key: Option<String>,
        by: Publisher<'_>,
    ) -> Result<AppendOutcome, ApiError> {
        let data = zerodrop_core::json::compact(data.get());
        self.check_publish(&stream, &data, by)?;
        self.check_data(&data)?;
        self.admit_new_stream(&stream, by).await?;
        let idempotency = idempotency_key.map(|key| IdempotencyKey {
            key,
            fingerprint: Sha256::digest(data.as_bytes()).into(),
        });
        let out = self
            .store
            .append(AppendRequest {
                stream,
                data: data.into_owned(),
                idempotency,
            })
            .await?;
        if !out.duplicate {
            self.metrics.published(1);
        }
        Ok(out)
    }

    fn holder_name(&self, conn: u64) -> String {
        format!("{}-{conn}", self.holder_prefix)
    }

    /// Registers `conn` as the holder of `sid` on this instance; an earlier holder here is
    /// kicked (its socket closes with `SESSION_TAKEN_OVER`). With a shared store the other
    /// instances are told too (best effort), so that a holder there closes as well.
    pub fn hold_session(&self, sid: &SessionId, conn: u64, signal: &Arc<Signal>) {
        let holder = Holder {
            conn,
            signal: signal.clone(),
            confirmed: false,
        };
        let previous = lock(&self.holders).insert(sid.clone(), holder);
        if let Some(old) = previous {
            old.signal.kick();
        }
        if self.store_kind() == StoreKind::Redis {
            let (store, sid, name) = (self.store.clone(), sid.clone(), self.holder_name(conn));
            tokio::spawn(async move {
                if let Err(e) = store.announce_holder(&sid, &name).await {
                    tracing::debug!(error = %e, "could not announce a session holder");
                }
            });
        }
    }

    pub fn release_session(&self, sid: &SessionId, conn: u64) {
        let mut h = lock(&self.holders);
        if h.get(sid).is_some_and(|x| x.conn == conn) {
            h.remove(sid);
            drop(h);
            self.released.notify_waiters();
        }
    }

    /// Before a resume reads its session: a connection here that still holds it is kicked and
    /// awaited (at most [`TAKEOVER_WAIT`]), since its end writes the acks it received before
    /// it lets go. A client that acks, closes and resumes at once (faster than its old
    /// socket's end is handled) then resumes after those acks, not before them.
    pub(crate) async fn await_release(&self, sid: &SessionId) {
        let deadline = tokio::time::Instant::now() + TAKEOVER_WAIT;
        loop {
            // Registered before the check, so a release between the two is not missed.
            let released = self.released.notified();
            match lock(&self.holders).get(sid) {
                None => return,
                Some(holder) => holder.signal.kick(),
            }
            if tokio::time::timeout_at(deadline, released).await.is_err() {
                return;
            }
        }
    }

    /// A holder notice from the shared store (ours included, in one order for every
    /// instance): a newer connection anywhere closes ours with `SESSION_TAKEN_OVER`.
    pub fn session_held(&self, sid: &SessionId, holder: &str) {
        let mut h = lock(&self.holders);
        let Some(mine) = h.get_mut(sid) else { return };
        if holder == self.holder_name(mine.conn) {
            mine.confirmed = true;
        } else if holder
            .strip_prefix(self.holder_prefix.as_str())
            .is_some_and(|rest| rest.starts_with('-'))
        {
            // One of ours: local takeovers are settled in `hold_session`, and our own notices
            // may arrive in any order.
        } else if mine.confirmed
            && let Some(old) = h.remove(sid)
        {
            old.signal.kick();
        }
    }

    /// A new connection's id, with its doorbell registered for drains.
    pub fn register_connection(&self, signal: &Arc<Signal>) -> u64 {
        let id = self.next_conn_id.fetch_add(1, Ordering::Relaxed);
        lock(&self.doorbells).insert(id, signal.clone());
        id
    }

    pub fn unregister_connection(&self, id: u64) {
        lock(&self.doorbells).remove(&id);
    }

    fn ring_every_connection(&self) {
        let bells: Vec<Arc<Signal>> = lock(&self.doorbells).values().cloned().collect();
        for b in bells {
            b.wake();
        }
    }

    /// Starts a drain: connections learn their reconnect moment when they next look.
    pub fn start_drain(&self, reason: &str, spread: Duration) -> DrainState {
        let state = self.drain.start(reason, spread);
        self.metrics.drain_state(state.gauge());
        self.ring_every_connection();
        state
    }

    /// Ends a drain: every remaining connection is closed now.
    pub fn complete_drain(&self) {
        self.drain.complete();
        self.metrics.drain_state(self.drain.state().gauge());
        self.ring_every_connection();
    }

    pub async fn metrics_json(&self) -> serde_json::Value {
        let stats = self.store.stats().await.unwrap_or_default();
        let mut v = self.metrics.json(
            StoreFacts {
                kind: self.store_kind().as_str(),
                up: self.store_up.load(Ordering::Relaxed),
                durability: self.durability().level(),
                sessions: stats.sessions,
                streams: stats.streams,
            },
            self.drain.blocked_total(),
        );
        v["guard_metrics"] = self.guard_metrics_json().await;
        v
    }

    /// The JSON view's `guard_metrics`: the queue's backlog, oldest age and dead letters (from
    /// the store, so every instance reports the shared queue), and this instance's rate-limit
    /// refusals. `jobs` is `{"enabled": false}` while no upstream is configured.
    async fn guard_metrics_json(&self) -> serde_json::Value {
        let rate_limited = self.metrics.rate_limited_total();
        if self.guard.upstreams.is_empty() {
            return serde_json::json!({"rate_limited": rate_limited, "jobs": {"enabled": false}});
        }
        let now = self.clock().now_ms();
        let jobs = match self.store.job_stats(now).await {
            Ok(s) => {
                use crate::guard::by_class;
                serde_json::json!({
                    "enabled": true,
                    "backlog": by_class(&s.queued_by_class),
                    "running": by_class(&s.running_by_class),
                    "oldest_queued_age_ms": s.oldest_queued_age_ms(now),
                    "dead_letters": s.count(zerodrop_store::JobStatus::Dead),
                })
            }
            Err(_) => serde_json::json!({"enabled": true, "store_unavailable": true}),
        };
        serde_json::json!({"rate_limited": rate_limited, "jobs": jobs})
    }
}

/// What every event's `data` must be before it is stored or forwarded: at most
/// `max_payload_bytes` once compacted, nested at most [`zerodrop_core::json::MAX_DEPTH`]
/// deep, no object with the same key twice (stored as sent, readers would disagree on which
/// value wins), and no number beyond the range of a double (readers fail on it or read
/// `Infinity`). `data` is compact JSON.
pub fn check_data(data: &str, max_payload_bytes: usize) -> Result<(), ApiError> {
    if data.len() > max_payload_bytes {
        return Err(ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!(
                "data is {} bytes; the limit is {max_payload_bytes}",
                data.len()
            ),
        ));
    }
    let found = zerodrop_core::json::inspect(data);
    let depth = found.depth;
    if depth > zerodrop_core::json::MAX_DEPTH {
        return Err(ApiError::invalid(format!(
            "data nests {depth} levels deep; the limit is {}",
            zerodrop_core::json::MAX_DEPTH
        )));
    }
    if let Some(key) = found.duplicate_key {
        return Err(ApiError::invalid(format!(
            "data has an object with the key {} twice; keys must be unique in each object",
            serde_json::Value::from(key)
        )));
    }
    if let Some(n) = found.out_of_range {
        let n: String = n.chars().take(40).collect();
        return Err(ApiError::invalid(format!(
            "data has the number {n}, beyond the range of a double (about 1.8e308): clients \
             could not read it"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::StoreChoice;

    #[tokio::test]
    async fn holder_notices_close_only_a_holder_whose_own_notice_came_first() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut cfg = Config::for_tests(dir.path());
        cfg.store = StoreChoice::Memory;
        let (app, _) = crate::server::build(cfg).await.expect("app");
        let sid = SessionId::generate();
        let conn = Signal::new();
        app.hold_session(&sid, 7, &conn);
        // Heard before our own notice: sent earlier, by an older connection elsewhere.
        app.session_held(&sid, "0a0b0c-3");
        assert!(!conn.is_kicked());
        app.session_held(&sid, &app.holder_name(7));
        // Our own connections settle takeovers locally, whatever order their notices take.
        app.session_held(&sid, &app.holder_name(6));
        assert!(!conn.is_kicked());
        // A newer connection elsewhere.
        app.session_held(&sid, "0a0b0c-9");
        assert!(conn.is_kicked());
        // A local takeover kicks the older local holder at once.
        let (first, second) = (Signal::new(), Signal::new());
        app.hold_session(&sid, 10, &first);
        app.hold_session(&sid, 11, &second);
        assert!(first.is_kicked() && !second.is_kicked());
    }
}
