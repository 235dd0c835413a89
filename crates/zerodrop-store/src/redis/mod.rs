//! The `redis` store: several zerodrop instances share one Redis (or a Redis Cluster).
//!
//! Why this shape:
//! - **One Lua script per operation.** An append checks and records its idempotency key,
//!   assigns the next seq, `XADD`s the event JSON with the explicit id `0-<seq>`, trims to the
//!   retention limits, updates the stream's bounds and rings the live doorbell (`PUBLISH`;
//!   after `WAIT` instead, when appends wait for replicas), all in one atomic step on the
//!   server (see `redis/lua.rs`). Nothing is ever re-sent after a failure: a command error
//!   answers `Unavailable`, because a blindly repeated `XADD` would be a duplicate append.
//!   [`ConnectionManager`] reconnects in the background.
//! - **Hash tags.** Every key of one stream is tagged `{<stream>}` so each script runs on one
//!   slot; the same code serves a single server and a Redis Cluster (several comma-separated
//!   `redis://` seed nodes select the cluster client, and so does a single URL whose server
//!   says `cluster_enabled:1` at start). Sessions are tagged by their id.
//! - **Epochs beside the log.** Each stream's bounds hash holds its epoch. On a single server
//!   a never-written stream reports the shared base epoch (`zd:epoch`, created with the first
//!   touch), so its epoch is stable before the first append and equal to its neighbours'. A log
//!   that vanished (Redis restarted empty: the base epoch key is gone too) or went backwards
//!   (a head lower than one this instance saw in the same epoch: a failover to a stale replica,
//!   a lost AOF tail) starts again, empty, in a new epoch — clients are told `EPOCH_CHANGED`
//!   instead of being handed a hole.
//! - **Live path = pub/sub only.** The sink is fed solely from this instance's subscription,
//!   for events of every instance including its own. A stream's events go to its own channel
//!   (`zd:live:e:<stream>`), which only the instances that watch the stream
//!   ([`Store::watch`]: the hub has subscribers for it) subscribe to: an instance hears
//!   nothing of the streams it does not serve, and Redis writes each event to no more
//!   subscribers than need it. Trims, renewed epochs, closes, presence and holder notices go
//!   to the shared channel `zd:live`, which every instance hears. One connection hears both,
//!   in the order Redis published them, which keeps each stream in seq order. An append
//!   answers once the script ran (the event is stored); the local sink hears of it a round
//!   trip later, like every other instance. Pub/sub is only a doorbell: once it is subscribed
//!   again after a drop, the sink is told to [`LiveSink::reset`], and once a newly watched
//!   stream's channel is subscribed, [`LiveSink::missed`] for it, so subscribers re-read the
//!   log. An instance learns a stream's head (to notice a log that went back) from its own
//!   appends and reads and from the events of the streams it watches.
//! - **Holder notices.** [`Store::announce_holder`] publishes `h|<holder>|<session>` on the
//!   same channel; every instance hears it in channel order ([`LiveSink::session_held`]) and
//!   can close an older connection of a session that was resumed elsewhere. A notice lost in a
//!   pub/sub gap only leaves that older socket open a while; nothing depends on it.
//! - **Checkpoints** decide with [`zerodrop_core::checkpoint::apply`] (via the shared helper)
//!   on a snapshot of the session stream and the stream's bounds, then commit with a
//!   compare-and-set script; a concurrent change makes it start over. The ack rule stays in
//!   one place, and sessions and streams may live in different cluster slots.
//!
//! `ZERODROP_REDIS_WAIT_REPLICAS=N`: after the append script, `WAIT N timeout` on the same
//! connection (a pipeline of both). Fewer acknowledgements in time answer `Unavailable`: the
//! event *is* in the log (Redis cannot take it back) but its durability was not confirmed, so a
//! publisher retries with its `Idempotency-Key`. A duplicate is acknowledged only under the
//! same `WAIT` (the script makes a write after the original for it to cover). In this mode the
//! doorbell does not ring inside the script: once `WAIT` confirmed an append (or a duplicate),
//! a second script publishes every event of the stream up to it that was not published yet,
//! behind a per-stream watermark (`lua::PUBLISH_THROUGH`), so the channel stays in seq order
//! per stream whichever instance's `WAIT` answers first, and no event is rung live before N
//! replicas hold it. Reads of the log are held back the same way: they end at the last
//! confirmed event (the watermark, or a later head this instance saw confirmed; `lua.rs`'s
//! `visible`), so this instance's remembered heads are all confirmed, and a failover to a
//! replica that holds every confirmed event is not mistaken for a log that went back (which
//! would start it again, empty, in a new epoch). Appends in this mode use their own
//! connection so that reads never queue behind a blocked `WAIT`.
//!
//! Sentinel: one `redis+sentinel://` URL (`sentinel.rs`) makes every connection, the live
//! subscription included, go to the primary the sentinels name, asked again after an outage
//! or a `READONLY`; the command that met it answers `Unavailable` and is never re-sent.
//!
//! Durability: the level is read from Redis's own settings (`CONFIG GET appendonly`,
//! `appendfsync`, `INFO replication`; `durability.rs`), raised to `replicated` by `WAIT`. A
//! Redis that refuses `CONFIG` gets the weakest level that cannot be excluded.
//!
//! Stats are approximate and cheap: streams = members of the age index (`zd:streams`, every
//! stream appended to since the data set began), sessions = members of `zd:sessions` whose
//! delete-at time (the end of their reconnect window) is still ahead, by this instance's clock.
//!
//! Keys (`S` a stream id, `I` a session id):
//! - `zd:{S}:m` bounds hash, no TTL; `zd:{S}:l` the Redis Stream of events;
//!   `zd:{S}:i:<key>` an idempotency record (`<fingerprint> <seq> <epoch>`, TTL = the
//!   idempotency TTL), `zd:{S}:ih:<key>` the duplicates it answered (same TTL), `zd:{S}:ik`
//!   the stream's keys by creation time (listed by [`crate::GuardStore::idem_list`]);
//!   `zd:{S}:r` the stream's record ([`crate::Store::stream_record`]), a string.
//! - `zd:s:{I}` session hash (`sub grants created expires`, `t:<S>` = `<epoch> <ack>
//!   <dropped_through>`), expiring when its reconnect window ends (`expires`; at least 60 s
//!   after its last create or touch, so a window shorter than that still reads as expired
//!   rather than missing for a moment). Nothing is lost by not keeping it longer: the server
//!   mints a resume token together with the write that sets the window's end (and touches
//!   again when a connection closes), so the token expires with the window, to within
//!   milliseconds, and a later resume is answered `RECONNECT_WINDOW_EXPIRED` on the token
//!   alone, before the session is looked up.
//! - `zd:u:{<sub>}` a subject's live sessions (sorted set: session id → end of its reconnect
//!   window), pruned and counted against the per-subject cap by the script that admits a new
//!   session (`lua::SUBJECT_OPEN`), moved on by touches, expiring with its last window.
//! - `zd:epoch` base epoch (single server), `zd:streams` age index, `zd:sessions` stats index,
//!   `zd:live` the shared pub/sub channel (trims, renewed epochs, closes, presence and holder
//!   notices), `zd:live:e:<S>` a stream's event channel.
//! - The job queue (`zd:{jobs}:…`) and the webhook idempotency records (`zd:{idem}:…`): see
//!   `redis/guard.rs`.
//! - Presence (`zd:{S}:p…`, `zd:presence`): see `redis/presence.rs`.
//! - `zd:{rev}:h` the revocations (id → record), `zd:{rev}:v` their version, bumped with
//!   every change (`redis/revocations.rs`).
//!
//! Event timestamps come from the Redis server's clock, kept monotonic per stream, so
//! instances with skewed clocks still agree: an append sends Redis's clock as this instance
//! estimates it (`redis/clock.rs`), or the script reads `TIME` when there is no estimate.
//! Needs Redis ≥ 6.2
//! (`XTRIM MINID`, `ZADD LT`); tested with 7.0.
//!
//! On a cluster there is no key every slot can read, so a stream's first epoch is its own
//! (random, stored at its first touch — `stream_info` included — and stable from then on)
//! rather than shared with its neighbours. The cluster client never retries: a request that
//! meets a `MOVED` during resharding answers `Unavailable` once while the slot map refreshes.
//!
//! One file per job: this one holds the store's handle (connect, the shared state, the
//! background tasks) and its [`Store`] methods, which delegate. `keys.rs` names every key,
//! `conn.rs` sends commands and scripts and decodes replies, `health.rs` judges failures and
//! answers readiness, `durability.rs` reads the persistence settings, `log.rs` appends and
//! reads, `sessions.rs` keeps sessions, checkpoints and the per-subject cap, `retention.rs`
//! sweeps by age, `live.rs` feeds the sink from pub/sub, `guard.rs` the [`crate::GuardStore`]
//! methods (the job queue is `jobs.rs`, the webhook records and key listings
//! `idempotency.rs`); `lua.rs` and `guard_lua.rs` are the scripts. The rules every store
//! shares are `crate::rules`'.
//!
//! Must not: re-send a command that may have run, or let the sink hear of an event from
//! anywhere but the pub/sub subscription.

mod clock;
mod conn;
mod durability;
mod guard;
mod guard_lua;
mod health;
mod idempotency;
mod jobs;
mod keys;
mod live;
mod log;
mod lua;
mod presence;
mod retention;
mod revocations;
mod sentinel;
mod sessions;
mod streams;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::cluster::ClusterClientBuilder;
use ::redis::{Client, RedisError};
use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use zerodrop_core::PatternTable;
use zerodrop_core::clock::{Clock, SystemClock};
use zerodrop_core::retention::Retention;
use zerodrop_core::{AckUpdate, Epoch, Seq, SessionId, StreamId};

use self::clock::clock_loop;
use self::conn::{Conn, Scripts};
use self::keys::{SESSIONS_INDEX, STREAMS_INDEX};
use self::live::{Endpoints, live_loop};
use self::retention::sweep_loop;
pub use self::sentinel::SentinelUrl;
use self::sentinel::{Primary, Resolver};
use crate::{
    AppendOutcome, AppendRequest, BatchOutcome, LiveSink, ReadRange, ReadResult, RedisPersistence,
    SessionCap, SessionRecord, SessionStream, Store, StoreDurability, StoreError, StoreKind,
    StoreResult, StoreStats, StreamBatch, StreamInfo,
};

#[derive(Clone, Debug)]
pub struct RedisOptions {
    /// `redis://…` URLs; more than one selects the cluster client (they are seed nodes), as
    /// does one that points at a cluster node. One `redis+sentinel://` URL ([`SentinelUrl`])
    /// follows the primary its sentinels name.
    pub urls: Vec<String>,
    pub retention: Retention,
    /// Stream patterns that keep their own limits (`[streams."pattern"]`); the most specific
    /// pattern matching a stream applies, else [`RedisOptions::retention`].
    pub retention_patterns: PatternTable<Retention>,
    pub idempotency_ttl_ms: u64,
    /// Sessions are deleted this long after their reconnect window ends (and at least 60 s
    /// after their last create or touch). 0 (the default): the key's TTL is the window.
    pub session_grace_ms: u64,
    /// `ZERODROP_REDIS_WAIT_REPLICAS`: replicas that must hold an append before it is
    /// acknowledged. 0 = do not wait.
    pub wait_replicas: u32,
    /// The `WAIT` timeout.
    pub wait_timeout: Duration,
    /// Longest time one operation may take before it answers `Unavailable`.
    pub command_timeout: Duration,
    /// Connection attempts give up after this long.
    pub connect_timeout: Duration,
    /// `ping` answers within this.
    pub ping_timeout: Duration,
    /// What time it is for session windows and the per-subject cap: the system's time line
    /// ([`SystemClock`]) unless a test injects one. Events' timestamps and their age limit are
    /// on the Redis server's clock (`TIME`, or this clock plus the measured offset to it:
    /// `redis/clock.rs`), and key TTLs are handed to Redis as durations.
    pub clock: Arc<dyn Clock>,
    /// The sink hears of every stream's events (one pattern subscription to every event
    /// channel), not only of the streams watched ([`Store::watch`], which this makes a no-op).
    /// For tools and tests that follow the store without a hub; `false` by default.
    pub every_stream: bool,
}

impl RedisOptions {
    /// From `ZERODROP_REDIS_URL`: one URL, several comma-separated cluster seed nodes, or one
    /// `redis+sentinel://` URL (whose own commas separate sentinels).
    pub fn new(urls: &str) -> RedisOptions {
        let urls = if SentinelUrl::parse(urls).is_some() {
            vec![urls.trim().to_string()]
        } else {
            urls.split(',')
                .map(str::trim)
                .filter(|u| !u.is_empty())
                .map(String::from)
                .collect()
        };
        RedisOptions {
            urls,
            retention: Retention::default(),
            retention_patterns: PatternTable::new(),
            idempotency_ttl_ms: 24 * 3600 * 1000,
            session_grace_ms: 0,
            wait_replicas: 0,
            wait_timeout: Duration::from_secs(1),
            command_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(1),
            ping_timeout: Duration::from_millis(500),
            clock: SystemClock::shared(),
            every_stream: false,
        }
    }
}

pub struct RedisStore {
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

struct Shared {
    opts: RedisOptions,
    cluster: bool,
    conn: Conn,
    /// Appends go here when they `WAIT`, so that nothing else queues behind a blocked `WAIT`.
    wait_conn: Option<Conn>,
    scripts: Scripts,
    sink: Arc<dyn LiveSink>,
    /// This instance's prefix for the origin tokens of its appends.
    instance: String,
    next_token: AtomicU64,
    /// The pub/sub subscription is up.
    live_up: AtomicBool,
    /// Highest head seen per stream, with its epoch.
    known: Mutex<HashMap<StreamId, (Epoch, u64)>>,
    /// Redis answered the last command (outages are logged once, not per request).
    up: AtomicBool,
    /// The current outage was logged (so its end is logged too).
    announced: AtomicBool,
    /// When an outage was last logged.
    last_announced: Mutex<Option<Instant>>,
    /// The persistence settings last read (`durability.rs`).
    durability: Mutex<Option<RedisPersistence>>,
    /// `CONFIG GET` was refused at the last read (logged once per refusal).
    config_refused: AtomicBool,
    /// Fewer replicas were connected than `WAIT` asks for at the last read.
    short_of_replicas: AtomicBool,
    /// The streams whose event channels the live subscription should hear (`live.rs`).
    watched: Mutex<HashSet<StreamId>>,
    /// Names a stream whose place in `watched` changed, for the live task to follow.
    watch_tx: mpsc::UnboundedSender<StreamId>,
    /// Redis's clock against this instance's time line (`clock.rs`).
    clock_offset: clock::ClockOffset,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl RedisStore {
    /// Connects and subscribes to the live channel. A single server that is down at start is
    /// not an error: the store answers `Unavailable` until it is reachable. A cluster must be
    /// reachable to learn its slots. One URL is asked `INFO cluster` first: a cluster node
    /// gets the cluster client (a server that does not answer is taken for a single one). A
    /// `redis+sentinel://` URL asks no server at start: its first command asks the sentinels.
    pub async fn connect(opts: RedisOptions, sink: Arc<dyn LiveSink>) -> StoreResult<RedisStore> {
        if opts.urls.is_empty() {
            return Err(StoreError::Unavailable("no redis URL configured".into()));
        }
        let bad_url = |e: RedisError| StoreError::Unavailable(format!("redis URL: {e}"));
        if let Some(url) = SentinelUrl::parse(&opts.urls[0]) {
            let url = url.map_err(|e| StoreError::Unavailable(format!("redis URL: {e}")))?;
            let resolver = Arc::new(Resolver::new(url, opts.connect_timeout));
            let primary = |response: Duration| {
                Conn::Sentinel(Primary::new(
                    resolver.clone(),
                    manager_config(&opts, response),
                ))
            };
            let conn = primary(opts.command_timeout);
            let wait_conn =
                (opts.wait_replicas > 0).then(|| primary(opts.command_timeout + opts.wait_timeout));
            let endpoints = Endpoints::Sentinel(resolver.clone());
            return Ok(Self::start(opts, sink, false, conn, wait_conn, endpoints).await);
        }
        let mut live_clients = Vec::new();
        for u in &opts.urls {
            live_clients.push(Client::open(u.as_str()).map_err(bad_url)?);
        }
        let cluster = opts.urls.len() > 1 || {
            let probe = opts.connect_timeout + opts.command_timeout;
            match cluster_enabled(&live_clients[0], probe).await {
                Some(enabled) => enabled,
                None => {
                    tracing::warn!(
                        "redis did not answer INFO at start; assuming a single server (list \
                         several seed nodes in ZERODROP_REDIS_URL to select Redis Cluster)"
                    );
                    false
                }
            }
        };
        let (conn, wait_conn) = if cluster {
            // No retries: a request that may have reached a node is never sent again.
            let client = ClusterClientBuilder::new(opts.urls.clone())
                .retries(0)
                .connection_timeout(opts.connect_timeout)
                .response_timeout(opts.command_timeout + opts.wait_timeout)
                .build()
                .map_err(bad_url)?;
            let connect = || async {
                tokio::time::timeout(opts.command_timeout, client.get_async_connection())
                    .await
                    .map_err(|_| {
                        StoreError::Unavailable("redis cluster: connect timed out".into())
                    })?
                    .map_err(|e| StoreError::Unavailable(format!("redis cluster: {e}")))
                    .map(Conn::Cluster)
            };
            let conn = connect().await?;
            // Its own node connections, so that a blocked WAIT holds up no other command.
            let wait_conn = if opts.wait_replicas > 0 {
                Some(connect().await?)
            } else {
                None
            };
            (conn, wait_conn)
        } else {
            let manager = |response: Duration| {
                let config = manager_config(&opts, response);
                ConnectionManager::new_lazy_with_config(live_clients[0].clone(), config)
                    .map(Conn::Single)
                    .map_err(bad_url)
            };
            let conn = manager(opts.command_timeout)?;
            let wait_conn = if opts.wait_replicas > 0 {
                Some(manager(opts.command_timeout + opts.wait_timeout)?)
            } else {
                None
            };
            (conn, wait_conn)
        };
        let endpoints = Endpoints::Fixed(live_clients);
        Ok(Self::start(opts, sink, cluster, conn, wait_conn, endpoints).await)
    }

    /// The shared state and the background tasks, once the connections are chosen.
    async fn start(
        opts: RedisOptions,
        sink: Arc<dyn LiveSink>,
        cluster: bool,
        conn: Conn,
        wait_conn: Option<Conn>,
        endpoints: Endpoints,
    ) -> RedisStore {
        let (watch_tx, watch_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            cluster,
            conn,
            wait_conn,
            scripts: Scripts::new(),
            sink,
            instance: Epoch::generate().to_string(),
            next_token: AtomicU64::new(1),
            live_up: AtomicBool::new(false),
            known: Mutex::new(HashMap::new()),
            up: AtomicBool::new(true),
            announced: AtomicBool::new(false),
            last_announced: Mutex::new(None),
            durability: Mutex::new(None),
            config_refused: AtomicBool::new(false),
            short_of_replicas: AtomicBool::new(false),
            watched: Mutex::new(HashSet::new()),
            watch_tx,
            clock_offset: clock::ClockOffset::new(),
            opts,
        });
        let (ready_tx, ready_rx) = oneshot::channel();
        let live = tokio::spawn(live_loop(shared.clone(), endpoints, watch_rx, ready_tx));
        let sweeper = tokio::spawn(sweep_loop(shared.clone()));
        let clock = tokio::spawn(clock_loop(shared.clone()));
        // Subscribe before the first append, so that its event reaches the sink.
        let _ = tokio::time::timeout(shared.opts.command_timeout, ready_rx).await;
        RedisStore {
            shared,
            tasks: vec![live, sweeper, clock],
        }
    }

    /// Whether the live subscription is up (the sink gets the events of the watched streams,
    /// from every instance).
    pub fn live_connected(&self) -> bool {
        self.shared.live_up.load(Ordering::Relaxed)
    }

    /// The Redis server's clock minus this instance's, in ms, once measured (appends send
    /// their stamp from it; none on a cluster).
    pub fn clock_offset_ms(&self) -> Option<i64> {
        self.shared.clock_offset.get()
    }
}

impl Drop for RedisStore {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// How a single server's (or a Sentinel-elected primary's) connection manager connects: one
/// reconnection attempt per failed command, never a command sent twice.
fn manager_config(opts: &RedisOptions, response: Duration) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(opts.connect_timeout))
        .set_response_timeout(Some(response))
        .set_number_of_retries(1)
        .set_min_delay(Duration::from_millis(50))
        .set_max_delay(Duration::from_millis(500))
}

/// Whether the server is a Redis Cluster node (`INFO cluster` says `cluster_enabled:1`), or
/// `None` if it did not answer in time.
async fn cluster_enabled(client: &Client, limit: Duration) -> Option<bool> {
    let probe = async {
        let mut conn = client.get_multiplexed_async_connection().await?;
        let info: String = ::redis::cmd("INFO")
            .arg("cluster")
            .query_async(&mut conn)
            .await?;
        Ok::<_, RedisError>(info.lines().any(|l| l.trim() == "cluster_enabled:1"))
    };
    tokio::time::timeout(limit, probe).await.ok()?.ok()
}

#[async_trait]
impl Store for RedisStore {
    fn kind(&self) -> StoreKind {
        StoreKind::Redis
    }

    async fn append(&self, req: AppendRequest) -> StoreResult<AppendOutcome> {
        self.shared.append(req).await
    }

    async fn stream_info(&self, stream: &StreamId) -> StoreResult<StreamInfo> {
        self.shared.info(stream).await
    }

    async fn read(&self, stream: &StreamId, after: Seq, limit: usize) -> StoreResult<ReadResult> {
        if limit == 0 {
            let info = self.shared.info(stream).await?;
            return Ok(ReadResult {
                info,
                events: Vec::new(),
            });
        }
        self.shared
            .read(
                stream,
                ReadRange::After(after),
                i64::try_from(limit).unwrap_or(i64::MAX),
            )
            .await
    }

    async fn append_batch(&self, batch: Vec<StreamBatch>) -> StoreResult<BatchOutcome> {
        self.shared.append_batch(batch).await
    }

    async fn read_range(
        &self,
        stream: &StreamId,
        range: ReadRange,
        limit: usize,
    ) -> StoreResult<ReadResult> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.shared.read(stream, range, limit).await
    }

    async fn delete_stream(&self, stream: &StreamId) -> StoreResult<Option<StreamInfo>> {
        self.shared.delete_stream(stream).await
    }

    async fn close_stream(&self, stream: &StreamId) -> StoreResult<Option<StreamInfo>> {
        self.shared.close_stream(stream).await
    }

    async fn digest(&self, stream: &StreamId) -> StoreResult<(StreamInfo, String)> {
        self.shared.digest(stream).await
    }

    async fn create_session_within(
        &self,
        session: SessionRecord,
        cap: SessionCap,
    ) -> StoreResult<()> {
        self.shared.create_session_within(session, cap).await
    }

    async fn load_session(&self, id: &SessionId) -> StoreResult<Option<SessionRecord>> {
        self.shared.load_session(id).await
    }

    async fn put_session_stream(
        &self,
        id: &SessionId,
        stream: &StreamId,
        state: SessionStream,
    ) -> StoreResult<()> {
        self.shared.put_session_stream(id, stream, state).await
    }

    async fn remove_session_stream(&self, id: &SessionId, stream: &StreamId) -> StoreResult<()> {
        self.shared.remove_session_stream(id, stream).await
    }

    async fn checkpoint(
        &self,
        id: &SessionId,
        stream: &StreamId,
        seq: Seq,
    ) -> StoreResult<AckUpdate> {
        self.shared.checkpoint(id, stream, seq).await
    }

    async fn checkpoint_many(&self, acks: Vec<(SessionId, StreamId, Seq)>) -> StoreResult<usize> {
        self.shared.checkpoint_many(acks).await
    }

    async fn set_session_grants(
        &self,
        id: &SessionId,
        grants: &zerodrop_core::Grants,
    ) -> StoreResult<()> {
        self.shared.set_session_grants(id, grants).await
    }

    async fn stream_record(&self, stream: &StreamId) -> StoreResult<Option<String>> {
        self.shared.stream_record(stream).await
    }

    async fn put_stream_record(
        &self,
        stream: &StreamId,
        record: Option<String>,
    ) -> StoreResult<()> {
        self.shared.put_stream_record(stream, record).await
    }

    async fn put_revocation(&self, r: &crate::Revocation) -> StoreResult<()> {
        self.shared.put_revocation(r).await
    }

    async fn delete_revocation(&self, id: &str) -> StoreResult<bool> {
        self.shared.delete_revocation(id).await
    }

    async fn revocations(&self) -> StoreResult<Vec<crate::Revocation>> {
        self.shared.revocations().await
    }

    async fn revocations_version(&self) -> StoreResult<Option<u64>> {
        self.shared.revocations_version().await
    }

    async fn touch_session(&self, id: &SessionId, expires_at_ms: u64) -> StoreResult<()> {
        self.shared.touch_session(id, expires_at_ms).await
    }

    async fn mark_dropped(
        &self,
        id: &SessionId,
        stream: &StreamId,
        through: Seq,
    ) -> StoreResult<()> {
        self.shared.mark_dropped(id, stream, through).await
    }

    async fn ping(&self) -> StoreResult<()> {
        self.shared.ping().await
    }

    async fn durability(&self) -> StoreDurability {
        self.shared.durability().await
    }

    async fn announce_holder(&self, id: &SessionId, holder: &str) -> StoreResult<()> {
        self.shared.announce_holder(id, holder).await
    }

    fn watch(&self, stream: &StreamId) {
        self.shared.watch(stream, true);
    }

    fn unwatch(&self, stream: &StreamId) {
        self.shared.watch(stream, false);
    }

    async fn stats(&self) -> StoreResult<StoreStats> {
        let s = &self.shared;
        let mut c1 = s.conn.clone();
        let mut c2 = s.conn.clone();
        let sessions = s.run("stats", async {
            ::redis::cmd("ZCOUNT")
                .arg(SESSIONS_INDEX)
                .arg(format!("({}", s.opts.clock.now_ms()))
                .arg("+inf")
                .query_async::<u64>(&mut c1)
                .await
        });
        let streams = s.run("stats", async {
            ::redis::cmd("ZCARD")
                .arg(STREAMS_INDEX)
                .query_async::<u64>(&mut c2)
                .await
        });
        let (sessions, streams) = tokio::join!(sessions, streams);
        Ok(StoreStats {
            sessions: sessions?,
            streams: streams?,
        })
    }

    fn presence(&self) -> &dyn crate::PresenceStore {
        self.shared.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_lists() {
        assert_eq!(RedisOptions::new("redis://a:1").urls, vec!["redis://a:1"]);
        assert_eq!(
            RedisOptions::new(" redis://a:1, redis://b:2 ,").urls,
            vec!["redis://a:1", "redis://b:2"]
        );
        assert_eq!(
            RedisOptions::new(" redis+sentinel://a:1,b:2/m ").urls,
            vec!["redis+sentinel://a:1,b:2/m"]
        );
    }
}
