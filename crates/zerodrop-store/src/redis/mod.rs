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
//! - **Live path = pub/sub only.** The sink is fed solely from this instance's subscription to
//!   the live channel, for events of every instance including its own; one channel delivered
//!   in publication order keeps each stream in seq order. An append answers once the script
//!   ran (the event is stored); the local sink hears of it a round trip later, like every
//!   other instance. Pub/sub is only a doorbell: once it is subscribed again after a drop, the
//!   sink is told to [`LiveSink::reset`] so subscribers re-read the log.
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
//! replicas hold it. Reads of the log are not held back: a subscriber that re-reads the log
//! (it fell behind, it resumes) may see an event whose `WAIT` has not answered yet, and an
//! event shown that way and then lost in a failover is caught by the epoch check above.
//! Appends in this mode use their own connection so that reads never queue behind a blocked
//! `WAIT`.
//!
//! Stats are approximate and cheap: streams = members of the age index (`zd:streams`, every
//! stream appended to since the data set began), sessions = members of `zd:sessions` whose
//! delete-at time (the end of their reconnect window) is still ahead, by this instance's clock.
//!
//! Keys (`S` a stream id, `I` a session id):
//! - `zd:{S}:m` bounds hash, no TTL; `zd:{S}:l` the Redis Stream of events;
//!   `zd:{S}:i:<key>` an idempotency record (`<fingerprint> <seq> <epoch>`, TTL = the
//!   idempotency TTL), `zd:{S}:ih:<key>` the duplicates it answered (same TTL), `zd:{S}:ik`
//!   the stream's keys by creation time (listed by [`crate::GuardStore::idem_list`]).
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
//!   `zd:live` the pub/sub channel (events, trims, renewed epochs, holder notices).
//! - The job queue (`zd:{jobs}:…`) and the webhook idempotency records (`zd:{idem}:…`): see
//!   `redis/guard.rs`.
//!
//! Event timestamps come from the Redis server's clock (`TIME` inside the script), kept
//! monotonic per stream, so instances with skewed clocks still agree. Needs Redis ≥ 6.2
//! (`XTRIM MINID`, `ZADD LT`); tested with 7.0.
//!
//! On a cluster there is no key every slot can read, so a stream's first epoch is its own
//! (random, stored at its first touch — `stream_info` included — and stable from then on)
//! rather than shared with its neighbours. The cluster client never retries: a request that
//! meets a `MOVED` during resharding answers `Unavailable` once while the slot map refreshes.

mod guard;
mod guard_lua;
mod lua;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ::redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use ::redis::cluster::ClusterClientBuilder;
use ::redis::cluster_async::ClusterConnection;
use ::redis::cluster_routing::{Route, SingleNodeRoutingInfo, SlotAddr};
use ::redis::{
    Client, Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, Script, ServerErrorKind,
    ToRedisArgs, Value,
};
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use zerodrop_core::hash::ChainHash;
use zerodrop_core::retention::Retention;
use zerodrop_core::{AckUpdate, Epoch, Event, Grants, Seq, SessionId, StreamId, now_ms};

use crate::rules::apply_checkpoint;
use crate::{
    AppendOutcome, AppendRequest, LiveSink, ReadResult, SessionCap, SessionRecord, SessionStream,
    Store, StoreError, StoreKind, StoreResult, StoreStats, StreamInfo,
};

/// The shared base epoch of a single server's streams.
const BASE_EPOCH_KEY: &str = "zd:epoch";
/// Sorted set: stream → time before which it needs no age check.
const STREAMS_INDEX: &str = "zd:streams";
/// Sorted set: session id → delete-at time (ms).
const SESSIONS_INDEX: &str = "zd:sessions";
/// The live doorbell.
const CHANNEL: &str = "zd:live";
/// How often age retention runs.
const SWEEP_EVERY: Duration = Duration::from_millis(500);
/// Streams visited per age sweep step, and events removed per stream per call.
const SWEEP_BATCH: usize = 256;
const SWEEP_CAP: u64 = 10_000;
/// How often expired sessions leave the stats index.
const SESSION_SWEEP_EVERY: Duration = Duration::from_secs(60);
/// A session is kept at least this long after it was created or touched, however old its
/// expiry (the other stores delete expired sessions in a sweep that runs about this often).
const SESSION_MIN_KEEP_MS: u64 = 60_000;
/// Checkpoint compare-and-set attempts before giving up.
const CAS_ATTEMPTS: usize = 16;
/// Written-behind acks applied concurrently by `checkpoint_many`.
const CHECKPOINTS_AT_ONCE: usize = 32;
/// Streams whose last seen position this instance remembers (to notice a log going back).
const MAX_KNOWN_STREAMS: usize = 100_000;
/// Events one doorbell after `WAIT` publishes at most (a backlog beyond is skipped: the live
/// hub re-reads the log when it sees a seq skipped).
const PUBLISH_THROUGH_MAX: u64 = 1_000;
/// An outage is logged at most this often (see `Shared::down`).
const OUTAGE_LOG_EVERY: Duration = Duration::from_secs(30);
/// The pub/sub connection is pinged this often; a silent one is replaced.
const LIVE_PING_EVERY: Duration = Duration::from_secs(5);

#[derive(Clone, Debug)]
pub struct RedisOptions {
    /// `redis://…` URLs; more than one selects the cluster client (they are seed nodes), as
    /// does one that points at a cluster node.
    pub urls: Vec<String>,
    pub retention: Retention,
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
}

impl RedisOptions {
    /// From `ZERODROP_REDIS_URL`: one URL, or several comma-separated cluster seed nodes.
    pub fn new(urls: &str) -> RedisOptions {
        RedisOptions {
            urls: urls
                .split(',')
                .map(str::trim)
                .filter(|u| !u.is_empty())
                .map(String::from)
                .collect(),
            retention: Retention::default(),
            idempotency_ttl_ms: 24 * 3600 * 1000,
            session_grace_ms: 0,
            wait_replicas: 0,
            wait_timeout: Duration::from_secs(1),
            command_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(1),
            ping_timeout: Duration::from_millis(500),
        }
    }
}

/// One connection that may be a single server's or a cluster's; both pipeline and are `Clone`.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// A script and its source (`EVAL` needs the source when the server lost its script cache).
struct Lua {
    script: Script,
    body: String,
}

impl Lua {
    fn new(body: impl Into<String>) -> Lua {
        let body = body.into();
        Lua {
            script: Script::new(&body),
            body,
        }
    }
}

struct Scripts {
    append: Lua,
    info: Lua,
    read: Lua,
    age: Lua,
    indexed: Lua,
    session_create: Lua,
    session_put: Lua,
    session_touch: Lua,
    session_dropped: Lua,
    session_cas: Lua,
    subject_open: Lua,
    subject_touch: Lua,
    publish_through: Lua,
    keys_listed: Lua,
    guard: guard::GuardScripts,
}

impl Scripts {
    fn new() -> Scripts {
        Scripts {
            append: Lua::new(lua::append()),
            info: Lua::new(lua::info()),
            read: Lua::new(lua::read()),
            age: Lua::new(lua::age()),
            indexed: Lua::new(lua::INDEXED),
            session_create: Lua::new(lua::SESSION_CREATE),
            session_put: Lua::new(lua::SESSION_PUT),
            session_touch: Lua::new(lua::SESSION_TOUCH),
            session_dropped: Lua::new(lua::SESSION_DROPPED),
            session_cas: Lua::new(lua::SESSION_CAS),
            subject_open: Lua::new(lua::SUBJECT_OPEN),
            subject_touch: Lua::new(lua::SUBJECT_TOUCH),
            publish_through: Lua::new(lua::PUBLISH_THROUGH),
            keys_listed: Lua::new(lua::KEYS_LISTED),
            guard: guard::GuardScripts::new(),
        }
    }
}

/// One script call: keys and arguments, sent as `EVALSHA` (or `EVAL` once the server said it
/// does not know the script — nothing ran then, so sending it again is safe).
struct Call<'a> {
    lua: &'a Lua,
    keys: Vec<String>,
    args: Vec<Vec<u8>>,
}

impl<'a> Call<'a> {
    fn new(lua: &'a Lua) -> Call<'a> {
        Call {
            lua,
            keys: Vec::new(),
            args: Vec::new(),
        }
    }

    fn key(mut self, k: impl Into<String>) -> Self {
        self.keys.push(k.into());
        self
    }

    fn arg(mut self, a: impl ToRedisArgs) -> Self {
        self.args.extend(a.to_redis_args());
        self
    }

    fn cmd(&self, by_hash: bool) -> Cmd {
        let mut c = if by_hash {
            let mut c = ::redis::cmd("EVALSHA");
            c.arg(self.lua.script.get_hash());
            c
        } else {
            let mut c = ::redis::cmd("EVAL");
            c.arg(self.lua.body.as_str());
            c
        };
        c.arg(self.keys.len()).arg(&self.keys);
        for a in &self.args {
            c.arg(&a[..]);
        }
        c
    }
}

/// Server errors that mean "not here, not now" rather than "this request is wrong": the data
/// is loading after a restart (`LOADING`), this node was demoted to a replica by a failover
/// (`READONLY`), a slot is moving or just moved (`MOVED`, `ASK`, `TRYAGAIN`), or the cluster or
/// its master is down (`CLUSTERDOWN`, `MASTERDOWN`). They pass once the deployment settles.
fn is_transient(kind: ServerErrorKind) -> bool {
    matches!(
        kind,
        ServerErrorKind::BusyLoading
            | ServerErrorKind::ReadOnly
            | ServerErrorKind::Moved
            | ServerErrorKind::Ask
            | ServerErrorKind::TryAgain
            | ServerErrorKind::MasterDown
            | ServerErrorKind::ClusterDown
    )
}

/// The connection, not the command, failed — or the server says it cannot serve here and now
/// ([`is_transient`]): an outage, logged once and answered `STORE_UNAVAILABLE` with
/// `Retry-After`, not a refusal worth a line per request.
fn is_outage(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_unrecoverable_error()
        || matches!(e.kind(), ErrorKind::Server(k) if is_transient(k))
}

fn is_noscript(e: &RedisError) -> bool {
    e.kind() == ErrorKind::Server(ServerErrorKind::NoScript)
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
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn meta_key(s: &StreamId) -> String {
    format!("zd:{{{s}}}:m")
}

fn log_key(s: &StreamId) -> String {
    format!("zd:{{{s}}}:l")
}

fn idem_key(s: &StreamId, key: &str) -> String {
    format!("zd:{{{s}}}:i:{key}")
}

fn session_key(id: &SessionId) -> String {
    format!("zd:s:{{{id}}}")
}

/// A subject's live sessions, tagged by the subject (its own slot on a cluster).
fn subject_key(sub: &str) -> String {
    format!("zd:u:{{{sub}}}")
}

fn stream_field(s: &StreamId) -> String {
    format!("t:{s}")
}

fn encode_session_stream(st: &SessionStream) -> String {
    format!("{} {} {}", st.epoch, st.ack.0, st.dropped_through.0)
}

fn decode_session_stream(v: &str) -> Option<SessionStream> {
    let mut it = v.split(' ');
    let epoch = Epoch::parse(it.next()?)?;
    let ack = it.next()?.parse().ok()?;
    let dropped = it.next()?.parse().ok()?;
    Some(SessionStream {
        epoch,
        ack: Seq(ack),
        dropped_through: Seq(dropped),
    })
}

fn unexpected(what: &str) -> StoreError {
    StoreError::Unavailable(format!("redis: unexpected reply to {what}"))
}

fn as_bytes(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

fn as_str(v: &Value) -> Option<&str> {
    as_bytes(v).and_then(|b| std::str::from_utf8(b).ok())
}

fn as_u64(v: &Value) -> Option<u64> {
    match v {
        Value::Int(i) => u64::try_from(*i).ok(),
        _ => as_str(v)?.parse().ok(),
    }
}

fn as_array(v: Value) -> Option<Vec<Value>> {
    match v {
        Value::Array(a) => Some(a),
        _ => None,
    }
}

/// The bounds part of a stream script's reply: `epoch, head, first, count, bytes, renewed`.
fn parse_bounds(stream: &StreamId, v: &[Value]) -> Option<(StreamInfo, bool)> {
    let info = StreamInfo {
        stream: stream.clone(),
        epoch: Epoch::parse(as_str(v.first()?)?)?,
        head: Seq(as_u64(v.get(1)?)?),
        first_seq: Seq(as_u64(v.get(2)?)?),
        count: as_u64(v.get(3)?)?,
        bytes: as_u64(v.get(4)?)?,
    };
    Some((info, as_u64(v.get(5)?)? == 1))
}

/// A decoded live message.
enum Live<'a> {
    /// A new event (the message also names the append that made it, for diagnostics).
    Event {
        event: Event,
    },
    Trimmed {
        stream: StreamId,
        first: Seq,
        count: u64,
    },
    Renewed {
        stream: StreamId,
        epoch: Epoch,
    },
    /// A connection (on any instance) now holds a session.
    Held {
        holder: &'a str,
        session: SessionId,
    },
}

fn text(p: Option<&[u8]>) -> Option<&str> {
    p.and_then(|b| std::str::from_utf8(b).ok())
}

fn parse_live(payload: &[u8]) -> Option<Live<'_>> {
    let mut parts = payload.splitn(7, |b| *b == b'|');
    let kind = parts.next()?;
    match kind {
        b"e" => {
            let _origin = text(parts.next())?;
            let stream = StreamId::new(text(parts.next())?).ok()?;
            let seq = text(parts.next())?.parse().ok()?;
            let epoch = Epoch::parse(text(parts.next())?)?;
            let ts = text(parts.next())?.parse().ok()?;
            let json = Bytes::copy_from_slice(parts.next()?);
            let event = Event::from_stored(stream, Seq(seq), epoch, ts, json);
            Some(Live::Event { event })
        }
        b"t" => Some(Live::Trimmed {
            stream: StreamId::new(text(parts.next())?).ok()?,
            first: Seq(text(parts.next())?.parse().ok()?),
            count: text(parts.next())?.parse().ok()?,
        }),
        b"r" => Some(Live::Renewed {
            stream: StreamId::new(text(parts.next())?).ok()?,
            epoch: Epoch::parse(text(parts.next())?)?,
        }),
        b"h" => Some(Live::Held {
            holder: text(parts.next())?,
            session: SessionId::parse(text(parts.next())?)?,
        }),
        _ => None,
    }
}

impl RedisStore {
    /// Connects and subscribes to the live channel. A single server that is down at start is
    /// not an error: the store answers `Unavailable` until it is reachable. A cluster must be
    /// reachable to learn its slots. One URL is asked `INFO cluster` first: a cluster node
    /// gets the cluster client (a server that does not answer is taken for a single one).
    pub async fn connect(opts: RedisOptions, sink: Arc<dyn LiveSink>) -> StoreResult<RedisStore> {
        if opts.urls.is_empty() {
            return Err(StoreError::Unavailable("no redis URL configured".into()));
        }
        let bad_url = |e: RedisError| StoreError::Unavailable(format!("redis URL: {e}"));
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
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(opts.connect_timeout))
                    .set_response_timeout(Some(response))
                    .set_number_of_retries(1)
                    .set_min_delay(Duration::from_millis(50))
                    .set_max_delay(Duration::from_millis(500));
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
            opts,
        });
        let (ready_tx, ready_rx) = oneshot::channel();
        let live = tokio::spawn(live_loop(shared.clone(), live_clients, ready_tx));
        let sweeper = tokio::spawn(sweep_loop(shared.clone()));
        // Subscribe before the first append, so that its event reaches the sink.
        let _ = tokio::time::timeout(shared.opts.command_timeout, ready_rx).await;
        Ok(RedisStore {
            shared,
            tasks: vec![live, sweeper],
        })
    }

    /// Whether the live subscription is up (the sink gets events of every instance).
    pub fn live_connected(&self) -> bool {
        self.shared.live_up.load(Ordering::Relaxed)
    }
}

impl Drop for RedisStore {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
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

enum Appended {
    New {
        seq: u64,
        epoch: Epoch,
        ts: u64,
        indexed: bool,
        /// The stream is not known to be among those with publish keys yet.
        unlisted: bool,
    },
    Duplicate {
        seq: u64,
        epoch: Epoch,
        unlisted: bool,
    },
    Reused,
}

impl Shared {
    /// Runs a Redis operation under the command timeout; maps every failure to `Unavailable`
    /// and logs an outage once.
    async fn run<T>(
        &self,
        what: &str,
        fut: impl std::future::Future<Output = Result<T, RedisError>>,
    ) -> StoreResult<T> {
        self.run_within(self.opts.command_timeout, what, fut).await
    }

    async fn run_within<T>(
        &self,
        limit: Duration,
        what: &str,
        fut: impl std::future::Future<Output = Result<T, RedisError>>,
    ) -> StoreResult<T> {
        match tokio::time::timeout(limit, fut).await {
            Ok(Ok(v)) => {
                if !self.up.swap(true, Ordering::Relaxed)
                    && self.announced.swap(false, Ordering::Relaxed)
                {
                    tracing::info!("redis answers again");
                }
                Ok(v)
            }
            Ok(Err(e)) => Err(self.failed(what, e)),
            Err(_) => Err(self.down(what, "timed out")),
        }
    }

    /// A command that failed: an outage ([`is_outage`], logged once), or a refusal — Redis
    /// answered but said no, which is not an outage and is worth a line each time.
    fn failed(&self, what: &str, e: RedisError) -> StoreError {
        if is_outage(&e) {
            return self.down(what, &e.to_string());
        }
        tracing::error!(operation = what, error = %e, "redis refused a command");
        StoreError::Unavailable(format!("redis {what}: {e}"))
    }

    /// Logs the start of an outage — at most every [`OUTAGE_LOG_EVERY`], because some
    /// outages flap per request: a master demoted by a failover still answers reads, so
    /// every read would otherwise end an outage that the next write starts again.
    fn down(&self, what: &str, why: &str) -> StoreError {
        if self.up.swap(false, Ordering::Relaxed) {
            let mut last = lock(&self.last_announced);
            if last.is_none_or(|t| t.elapsed() >= OUTAGE_LOG_EVERY) {
                *last = Some(Instant::now());
                self.announced.store(true, Ordering::Relaxed);
                tracing::warn!(
                    operation = what,
                    error = why,
                    "redis is unreachable or cannot serve; requests answer STORE_UNAVAILABLE \
                     until it is back"
                );
            }
        }
        StoreError::Unavailable(format!("redis {what}: {why}"))
    }

    async fn eval(&self, what: &str, call: &Call<'_>) -> StoreResult<Value> {
        let mut conn = self.conn.clone();
        self.run(what, async {
            match call.cmd(true).query_async::<Value>(&mut conn).await {
                Err(e) if is_noscript(&e) => call.cmd(false).query_async(&mut conn).await,
                other => other,
            }
        })
        .await
    }

    fn known(&self, stream: &StreamId) -> (String, u64) {
        match lock(&self.known).get(stream) {
            Some((e, h)) => (e.to_string(), *h),
            None => (String::new(), 0),
        }
    }

    /// Remembers the highest head seen in an epoch; a later, lower head in the same epoch
    /// means the log went back.
    fn observe(&self, stream: &StreamId, epoch: &Epoch, head: u64) {
        let mut known = lock(&self.known);
        if known.len() >= MAX_KNOWN_STREAMS && !known.contains_key(stream) {
            known.clear();
        }
        match known.get_mut(stream) {
            Some((e, h)) if e == epoch => *h = (*h).max(head),
            Some(entry) => *entry = (epoch.clone(), head),
            None => {
                known.insert(stream.clone(), (epoch.clone(), head));
            }
        }
    }

    /// A stream script call with the shared prelude's arguments filled in.
    fn stream_call<'a>(
        &self,
        script: &'a Lua,
        stream: &StreamId,
        extra_keys: Vec<String>,
    ) -> Call<'a> {
        let (known_epoch, known_head) = self.known(stream);
        let mut call = Call::new(script).key(meta_key(stream)).key(log_key(stream));
        for k in extra_keys {
            call = call.key(k);
        }
        if !self.cluster {
            call = call.key(BASE_EPOCH_KEY);
        }
        call.arg(stream.as_str())
            .arg(Epoch::generate().as_str())
            .arg(known_epoch)
            .arg(known_head)
            .arg(if self.cluster { "0" } else { "1" })
            .arg(CHANNEL)
    }

    fn renewed(&self, stream: &StreamId, info: &StreamInfo) {
        tracing::warn!(
            stream = %stream,
            epoch = %info.epoch,
            "the stream's log was lost or went back; it starts again in a new epoch"
        );
    }

    async fn info(&self, stream: &StreamId) -> StoreResult<StreamInfo> {
        let call = self.stream_call(&self.scripts.info, stream, Vec::new());
        let v =
            as_array(self.eval("stream info", &call).await?).ok_or_else(|| unexpected("info"))?;
        let (info, renewed) = parse_bounds(stream, &v).ok_or_else(|| unexpected("info"))?;
        if renewed {
            self.renewed(stream, &info);
        }
        self.observe(stream, &info.epoch, info.head.0);
        Ok(info)
    }

    async fn read(&self, stream: &StreamId, after: Seq, limit: i64) -> StoreResult<ReadResult> {
        let call = self
            .stream_call(&self.scripts.read, stream, Vec::new())
            .arg(after.0)
            .arg(limit);
        let v = as_array(self.eval("read", &call).await?).ok_or_else(|| unexpected("read"))?;
        let (info, renewed) = parse_bounds(stream, &v).ok_or_else(|| unexpected("read"))?;
        if renewed {
            self.renewed(stream, &info);
        }
        self.observe(stream, &info.epoch, info.head.0);
        let mut events = Vec::with_capacity(v.len().saturating_sub(6) / 3);
        let mut rest = v.into_iter().skip(6);
        while let Some(seq) = rest.next() {
            let (Some(seq), Some(ts), Some(Value::BulkString(json))) = (
                as_u64(&seq),
                rest.next().as_ref().and_then(as_u64),
                rest.next(),
            ) else {
                return Err(unexpected("read"));
            };
            events.push(Arc::new(Event::from_stored(
                stream.clone(),
                Seq(seq),
                info.epoch.clone(),
                ts,
                Bytes::from(json),
            )));
        }
        Ok(ReadResult { info, events })
    }

    async fn append_once(&self, req: &AppendRequest, token: &str) -> StoreResult<Appended> {
        let (keys, fp, key) = match &req.idempotency {
            Some(k) => (
                vec![
                    idem_key(&req.stream, &k.key),
                    guard::publish_hits_key(&req.stream, &k.key),
                    guard::publish_index_key(&req.stream),
                ],
                hex::encode(k.fingerprint),
                k.key.as_str(),
            ),
            None => (vec![meta_key(&req.stream)], String::new(), ""),
        };
        let r = &self.opts.retention;
        let call = self
            .stream_call(&self.scripts.append, &req.stream, keys)
            .arg(req.data.as_str())
            .arg(fp)
            .arg(self.opts.idempotency_ttl_ms.max(1))
            .arg(r.max_events)
            .arg(r.max_bytes)
            .arg(token)
            .arg(if self.opts.wait_replicas > 0 {
                "1"
            } else {
                "0"
            })
            .arg(key);
        let reply = match &self.wait_conn {
            None if self.opts.wait_replicas == 0 => self.eval("append", &call).await?,
            _ => self.eval_and_wait(&req.stream, &call).await?,
        };
        let v = as_array(reply).ok_or_else(|| unexpected("append"))?;
        match v.first().and_then(as_str) {
            Some("ok") => {
                let (Some(seq), Some(epoch), Some(ts), Some(indexed), Some(renewed), Some(keys)) = (
                    v.get(1).and_then(as_u64),
                    v.get(2).and_then(as_str).and_then(Epoch::parse),
                    v.get(3).and_then(as_u64),
                    v.get(4).and_then(as_u64),
                    v.get(5).and_then(as_u64),
                    v.get(6).and_then(as_u64),
                ) else {
                    return Err(unexpected("append"));
                };
                if renewed == 1 {
                    tracing::warn!(stream = %req.stream, epoch = %epoch,
                        "the stream's log was lost or went back; it starts again in a new epoch");
                }
                Ok(Appended::New {
                    seq,
                    epoch,
                    ts,
                    indexed: indexed == 1,
                    unlisted: keys == 1,
                })
            }
            Some("dup") => {
                let (Some(seq), Some(epoch), Some(unlisted)) = (
                    v.get(1).and_then(as_u64),
                    v.get(2).and_then(as_str).and_then(Epoch::parse),
                    v.get(3).and_then(as_u64),
                ) else {
                    return Err(unexpected("append"));
                };
                Ok(Appended::Duplicate {
                    seq,
                    epoch,
                    unlisted: unlisted == 1,
                })
            }
            Some("reused") => Ok(Appended::Reused),
            _ => Err(unexpected("append")),
        }
    }

    /// The append script and `WAIT` in one pipeline (see [`Shared::eval_waiting`]); an append
    /// or a duplicate that fewer replicas than asked acknowledged answers `Unavailable`.
    async fn eval_and_wait(&self, stream: &StreamId, call: &Call<'_>) -> StoreResult<Value> {
        let (script, acked) = self.eval_waiting("append", &meta_key(stream), call).await?;
        let n = self.opts.wait_replicas;
        let timeout_ms = self.opts.wait_timeout.as_millis() as u64;
        let kind = as_array(script.clone())
            .as_deref()
            .and_then(|v| v.first())
            .and_then(as_str)
            .map(String::from);
        // Every acknowledgement waits: a new event, and a duplicate as well, since the
        // original it points at may not be replicated yet (the script made a write after it
        // for this `WAIT` to cover).
        if acked < u64::from(n) {
            match kind.as_deref() {
                Some("ok") => {
                    return Err(StoreError::Unavailable(format!(
                        "redis: the append reached {acked} of {n} replicas within {timeout_ms} ms \
                         (it is in the log but its durability is not confirmed; retry with an idempotency key)"
                    )));
                }
                Some("dup") => {
                    return Err(StoreError::Unavailable(format!(
                        "redis: the earlier append with this idempotency key reached {acked} of {n} \
                         replicas within {timeout_ms} ms (its durability is not confirmed; retry later)"
                    )));
                }
                _ => {}
            }
        }
        Ok(script)
    }

    /// A script and `WAIT` in one pipeline, so both run on the same connection (the waiting
    /// one, on the master of `route_key`'s slot) and `WAIT` covers the script's writes — and
    /// every earlier write on that server, replication being one ordered stream. Replies the
    /// script's value and how many replicas acknowledged; judging that is the caller's.
    async fn eval_waiting(
        &self,
        what: &str,
        route_key: &str,
        call: &Call<'_>,
    ) -> StoreResult<(Value, u64)> {
        let n = self.opts.wait_replicas;
        let timeout_ms = self.opts.wait_timeout.as_millis() as u64;
        let mut conn = self.wait_conn.clone().unwrap_or_else(|| self.conn.clone());
        let route =
            SingleNodeRoutingInfo::SpecificNode(Route::with_key(route_key, SlotAddr::Master));
        let send = |by_hash: bool| {
            let mut p = ::redis::pipe();
            p.ignore_errors();
            p.add_command(call.cmd(by_hash));
            p.cmd("WAIT").arg(n).arg(timeout_ms);
            p
        };
        let mut values = Vec::new();
        for by_hash in [true, false] {
            let p = send(by_hash);
            let limit = self.opts.command_timeout + self.opts.wait_timeout;
            values = self
                .run_within(limit, what, async {
                    match &mut conn {
                        Conn::Cluster(c) => c.route_pipeline(p, 0, 2, route.clone()).await,
                        other => p.query_async::<Vec<Value>>(other).await,
                    }
                })
                .await?;
            match values.first() {
                Some(Value::ServerError(e)) if e.kind() == Some(ServerErrorKind::NoScript) => {
                    continue;
                }
                _ => break,
            }
        }
        let mut it = values.into_iter();
        let (Some(script), Some(acks)) = (it.next(), it.next()) else {
            return Err(unexpected(what));
        };
        if let Value::ServerError(e) = &script {
            return Err(self.failed(what, e.clone().into()));
        }
        Ok((script, as_u64(&acks).unwrap_or(0)))
    }

    /// The doorbell of an append that `WAIT`ed, rung once `WAIT` confirmed it (see
    /// `lua::PUBLISH_THROUGH`). A failure here loses no event: it is durable, and subscribers
    /// get it with the next doorbell of its stream (the hub re-reads the log on a skipped seq)
    /// or when they next read the log.
    async fn publish_through(&self, stream: &StreamId, epoch: &Epoch, seq: u64, token: &str) {
        let call = Call::new(&self.scripts.publish_through)
            .key(meta_key(stream))
            .key(log_key(stream))
            .arg(stream.as_str())
            .arg(epoch.as_str())
            .arg(seq)
            .arg(CHANNEL)
            .arg(token)
            .arg(PUBLISH_THROUGH_MAX);
        if let Err(e) = self.eval("live doorbell", &call).await {
            tracing::debug!(stream = %stream, seq, error = %e, "live doorbell not rung");
        }
    }

    /// Adds a stream to the age index (once per incarnation of its log).
    async fn index(&self, stream: &StreamId, ts: u64) -> StoreResult<()> {
        let mut conn = self.conn.clone();
        self.run("index", async {
            ::redis::cmd("ZADD")
                .arg(STREAMS_INDEX)
                .arg("LT")
                .arg(ts)
                .arg(stream.as_str())
                .query_async::<Value>(&mut conn)
                .await
        })
        .await?;
        self.eval(
            "index",
            &Call::new(&self.scripts.indexed).key(meta_key(stream)),
        )
        .await?;
        Ok(())
    }

    /// Writes the session hash (replacing one with the same id) and indexes it for stats.
    async fn write_session(&self, session: &SessionRecord) -> StoreResult<()> {
        let deadline = self.session_deadline(session.expires_at_ms);
        let grants = serde_json::to_string(&session.grants).unwrap_or_else(|_| "{}".into());
        let mut call = Call::new(&self.scripts.session_create)
            .key(session_key(&session.id))
            .arg(deadline)
            .arg("sub")
            .arg(session.sub.as_str())
            .arg("grants")
            .arg(grants)
            .arg("created")
            .arg(session.created_at_ms)
            .arg("expires")
            .arg(session.expires_at_ms);
        for (stream, st) in &session.streams {
            call = call
                .arg(stream_field(stream))
                .arg(encode_session_stream(st));
        }
        self.eval("create session", &call).await?;
        self.index_session(&session.id, deadline, false).await;
        Ok(())
    }

    fn session_deadline(&self, expires_at_ms: u64) -> u64 {
        expires_at_ms
            .saturating_add(self.opts.session_grace_ms)
            .max(now_ms() + SESSION_MIN_KEEP_MS)
    }

    /// The stats index only: a failure here loses nothing but an approximate count.
    async fn index_session(&self, id: &SessionId, deadline: u64, only_existing: bool) {
        let mut conn = self.conn.clone();
        let indexed = self
            .run("session index", async {
                let mut c = ::redis::cmd("ZADD");
                c.arg(SESSIONS_INDEX);
                if only_existing {
                    c.arg("XX");
                }
                c.arg(deadline)
                    .arg(id.as_str())
                    .query_async::<Value>(&mut conn)
                    .await
            })
            .await;
        if let Err(e) = indexed {
            tracing::debug!(session = %id, error = %e, "session stats index not updated");
        }
    }

    fn on_live(&self, payload: &[u8]) {
        match parse_live(payload) {
            Some(Live::Event { event }) => {
                let stream = event.stream().clone();
                let (epoch, seq) = (event.epoch().clone(), event.seq().0);
                let event = Arc::new(event.with_committed_at(Instant::now()));
                self.sink.committed(std::slice::from_ref(&event));
                self.observe(&stream, &epoch, seq);
            }
            Some(Live::Trimmed {
                stream,
                first,
                count,
            }) => self.sink.trimmed(&stream, first, count),
            Some(Live::Renewed { stream, epoch }) => {
                self.observe(&stream, &epoch, 0);
                self.sink.reset();
            }
            Some(Live::Held { holder, session }) => self.sink.session_held(&session, holder),
            None => tracing::debug!("ignored a live message in an unknown format"),
        }
    }

    /// The live path is down.
    fn live_lost(&self) {
        self.live_up.store(false, Ordering::Relaxed);
    }
}

/// Keeps this instance subscribed to the live channel, feeding the sink. After any gap in the
/// subscription the sink is reset, because events published meanwhile were not seen.
async fn live_loop(shared: Arc<Shared>, clients: Vec<Client>, ready: oneshot::Sender<()>) {
    let mut ready = Some(ready);
    let mut gap = false;
    let mut attempt: usize = 0;
    let mut logged = false;
    loop {
        let client = &clients[attempt % clients.len()];
        attempt = attempt.wrapping_add(1);
        let timeout = shared.opts.connect_timeout;
        let subscribed = tokio::time::timeout(timeout, async {
            let mut ps = client.get_async_pubsub().await?;
            ps.subscribe(CHANNEL).await?;
            Ok::<_, RedisError>(ps)
        })
        .await;
        let ps = match subscribed {
            Ok(Ok(ps)) => ps,
            Ok(Err(e)) => {
                gap = true;
                if !logged {
                    tracing::warn!(error = %e, "redis live subscription failed; retrying");
                    logged = true;
                }
                ready.take();
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            Err(_) => {
                gap = true;
                ready.take();
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        if logged {
            tracing::info!("redis live subscription restored");
            logged = false;
        }
        shared.live_up.store(true, Ordering::Relaxed);
        if gap {
            shared.sink.reset();
        }
        if let Some(r) = ready.take() {
            let _ = r.send(());
        }
        let (mut sink, mut stream) = ps.split();
        let mut ping = tokio::time::interval(LIVE_PING_EVERY);
        ping.tick().await;
        loop {
            tokio::select! {
                msg = stream.next() => match msg {
                    Some(msg) => shared.on_live(msg.get_payload_bytes()),
                    None => break,
                },
                _ = ping.tick() => {
                    let pong = tokio::time::timeout(timeout, sink.ping::<Value>()).await;
                    if !matches!(pong, Ok(Ok(_))) {
                        break;
                    }
                }
            }
        }
        shared.live_lost();
        gap = true;
        if !logged {
            tracing::warn!("redis live subscription lost; resubscribing");
            logged = true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Age retention at least every second, and the session index's housekeeping.
async fn sweep_loop(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next_session_sweep = Instant::now();
    loop {
        tick.tick().await;
        if shared.sweep_age().await.is_err() {
            continue;
        }
        if Instant::now() >= next_session_sweep {
            next_session_sweep = Instant::now() + SESSION_SWEEP_EVERY;
            let mut conn = shared.conn.clone();
            let _ = shared
                .run("session sweep", async {
                    ::redis::cmd("ZREMRANGEBYSCORE")
                        .arg(SESSIONS_INDEX)
                        .arg("-inf")
                        .arg(now_ms())
                        .query_async::<Value>(&mut conn)
                        .await
                })
                .await;
        }
    }
}

impl Shared {
    async fn sweep_age(&self) -> StoreResult<()> {
        let mut conn = self.conn.clone();
        let (secs, micros): (u64, u64) = self
            .run("time", async {
                ::redis::cmd("TIME").query_async(&mut conn).await
            })
            .await?;
        let cutoff = (secs * 1000 + micros / 1000).saturating_sub(self.opts.retention.max_age_ms);
        // Bounded: a sweep never runs longer than a few batches.
        for _ in 0..8 {
            let due: Vec<String> = self
                .run("age index", async {
                    ::redis::cmd("ZRANGEBYSCORE")
                        .arg(STREAMS_INDEX)
                        .arg("-inf")
                        .arg(format!("({cutoff}"))
                        .arg("LIMIT")
                        .arg(0)
                        .arg(SWEEP_BATCH)
                        .query_async(&mut conn)
                        .await
                })
                .await?;
            for name in &due {
                let Ok(stream) = StreamId::new(name) else {
                    continue;
                };
                let call = Call::new(&self.scripts.age)
                    .key(meta_key(&stream))
                    .key(log_key(&stream));
                let call = if self.cluster {
                    call
                } else {
                    call.key(BASE_EPOCH_KEY)
                };
                let call = call
                    .arg(stream.as_str())
                    .arg(Epoch::generate().as_str())
                    .arg("")
                    .arg(0)
                    .arg(if self.cluster { "0" } else { "1" })
                    .arg(CHANNEL)
                    .arg(self.opts.retention.max_age_ms)
                    .arg(SWEEP_CAP);
                let v = as_array(self.eval("age retention", &call).await?)
                    .ok_or_else(|| unexpected("age retention"))?;
                let score = v
                    .first()
                    .and_then(as_u64)
                    .ok_or_else(|| unexpected("age retention"))?;
                self.run("age index", async {
                    ::redis::cmd("ZADD")
                        .arg(STREAMS_INDEX)
                        .arg("XX")
                        .arg(score)
                        .arg(name)
                        .query_async::<Value>(&mut conn)
                        .await
                })
                .await?;
            }
            if due.len() < SWEEP_BATCH {
                break;
            }
        }
        Ok(())
    }
}

#[async_trait]
impl Store for RedisStore {
    fn kind(&self) -> StoreKind {
        StoreKind::Redis
    }

    async fn append(&self, req: AppendRequest) -> StoreResult<AppendOutcome> {
        let s = &self.shared;
        let n = s.next_token.fetch_add(1, Ordering::Relaxed);
        let token = format!("{}-{n}", s.instance);
        match s.append_once(&req, &token).await {
            Ok(Appended::New {
                seq,
                epoch,
                ts,
                indexed,
                unlisted,
            }) => {
                s.observe(&req.stream, &epoch, seq);
                if s.opts.wait_replicas > 0 {
                    s.publish_through(&req.stream, &epoch, seq, &token).await;
                }
                if !indexed && let Err(e) = s.index(&req.stream, ts).await {
                    // The event is durable; only age retention of this stream waits for the
                    // next append to index it.
                    tracing::debug!(stream = %req.stream, error = %e, "age index not updated");
                }
                if unlisted {
                    s.list_publish_keys(&req.stream).await;
                }
                Ok(AppendOutcome {
                    stream: req.stream,
                    seq: Seq(seq),
                    epoch,
                    duplicate: false,
                })
            }
            Ok(Appended::Duplicate {
                seq,
                epoch,
                unlisted,
            }) => {
                if s.opts.wait_replicas > 0 {
                    // The first attempt may have had its WAIT refused: no doorbell yet.
                    s.publish_through(&req.stream, &epoch, seq, &token).await;
                }
                if unlisted {
                    s.list_publish_keys(&req.stream).await;
                }
                Ok(AppendOutcome {
                    stream: req.stream,
                    seq: Seq(seq),
                    epoch,
                    duplicate: true,
                })
            }
            Ok(Appended::Reused) => Err(StoreError::IdempotencyKeyReused),
            Err(e) => Err(e),
        }
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
            .read(stream, after, i64::try_from(limit).unwrap_or(i64::MAX))
            .await
    }

    async fn digest(&self, stream: &StreamId) -> StoreResult<(StreamInfo, String)> {
        let r = self.shared.read(stream, Seq(0), -1).await?;
        let mut h = ChainHash::default();
        for e in &r.events {
            h.push(e.json());
        }
        Ok((r.info, h.hex()))
    }

    /// The subject's count and the session live in different slots (sessions are tagged by
    /// id, subjects by subject), so they are two scripts: first the subject's set admits the
    /// session atomically (the cap holds however many instances open sessions at once), then
    /// the session is written. A session write that fails takes its place back (best effort:
    /// a place left behind only counts until the window it was given ends).
    async fn create_session_within(
        &self,
        session: SessionRecord,
        cap: SessionCap,
    ) -> StoreResult<()> {
        let s = &self.shared;
        let now = now_ms();
        let subject = subject_key(&session.sub);
        let admit = Call::new(&s.scripts.subject_open)
            .key(subject.as_str())
            .arg(now)
            .arg(cap.0)
            .arg(session.id.as_str())
            .arg(session.expires_at_ms);
        let verdict = as_array(s.eval("open session", &admit).await?)
            .ok_or_else(|| unexpected("open session"))?;
        match verdict.first().and_then(as_u64) {
            Some(1) => {}
            Some(0) => {
                let earliest = verdict.get(1).and_then(as_u64).unwrap_or(now);
                return cap.check(u64::from(cap.0), earliest, now);
            }
            _ => return Err(unexpected("open session")),
        }
        let created = s.write_session(&session).await;
        if created.is_err() {
            let mut conn = s.conn.clone();
            let _ = s
                .run("open session", async {
                    ::redis::cmd("ZREM")
                        .arg(&subject)
                        .arg(session.id.as_str())
                        .query_async::<Value>(&mut conn)
                        .await
                })
                .await;
        }
        created
    }

    async fn load_session(&self, id: &SessionId) -> StoreResult<Option<SessionRecord>> {
        let s = &self.shared;
        let mut conn = s.conn.clone();
        let key = session_key(id);
        let fields: HashMap<String, String> = s
            .run("load session", async {
                ::redis::cmd("HGETALL")
                    .arg(&key)
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        let Some(sub) = fields.get("sub") else {
            return Ok(None);
        };
        let num = |k: &str| {
            fields
                .get(k)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let mut streams = BTreeMap::new();
        for (k, v) in &fields {
            let Some(name) = k.strip_prefix("t:") else {
                continue;
            };
            let (Ok(stream), Some(st)) = (StreamId::new(name), decode_session_stream(v)) else {
                continue;
            };
            streams.insert(stream, st);
        }
        Ok(Some(SessionRecord {
            id: id.clone(),
            sub: sub.clone(),
            grants: fields
                .get("grants")
                .and_then(|g| serde_json::from_str::<Grants>(g).ok())
                .unwrap_or_default(),
            created_at_ms: num("created"),
            expires_at_ms: num("expires"),
            streams,
        }))
    }

    async fn put_session_stream(
        &self,
        id: &SessionId,
        stream: &StreamId,
        state: SessionStream,
    ) -> StoreResult<()> {
        let s = &self.shared;
        let call = Call::new(&s.scripts.session_put)
            .key(session_key(id))
            .arg(stream_field(stream))
            .arg(encode_session_stream(&state));
        match s.eval("put session stream", &call).await? {
            Value::Int(1) => Ok(()),
            Value::Int(0) => Err(StoreError::SessionNotFound),
            _ => Err(unexpected("put session stream")),
        }
    }

    async fn remove_session_stream(&self, id: &SessionId, stream: &StreamId) -> StoreResult<()> {
        let s = &self.shared;
        let mut conn = s.conn.clone();
        s.run("remove session stream", async {
            ::redis::cmd("HDEL")
                .arg(session_key(id))
                .arg(stream_field(stream))
                .query_async::<Value>(&mut conn)
                .await
        })
        .await?;
        Ok(())
    }

    async fn checkpoint(
        &self,
        id: &SessionId,
        stream: &StreamId,
        seq: Seq,
    ) -> StoreResult<AckUpdate> {
        let s = &self.shared;
        let key = session_key(id);
        let field = stream_field(stream);
        for _ in 0..CAS_ATTEMPTS {
            let mut conn = s.conn.clone();
            let read_session = s.run("checkpoint", async {
                ::redis::cmd("HMGET")
                    .arg(&key)
                    .arg("sub")
                    .arg(&field)
                    .query_async::<(Option<String>, Option<String>)>(&mut conn)
                    .await
            });
            let (session, info) = tokio::join!(read_session, s.info(stream));
            let (sub, stored) = session?;
            if sub.is_none() {
                return Err(StoreError::SessionNotFound);
            }
            let Some(stored) = stored else {
                return Err(StoreError::NotInSession);
            };
            let mut ss = decode_session_stream(&stored).ok_or_else(|| unexpected("checkpoint"))?;
            let update = apply_checkpoint(&mut ss, &info?, seq)?;
            if !update.is_applied() {
                return Ok(update);
            }
            let call = Call::new(&s.scripts.session_cas)
                .key(key.as_str())
                .arg(field.as_str())
                .arg(stored.as_str())
                .arg(encode_session_stream(&ss));
            if let Value::Int(1) = s.eval("checkpoint", &call).await? {
                return Ok(update);
            }
        }
        Err(StoreError::Unavailable(
            "checkpoint: the session stream kept changing".into(),
        ))
    }

    async fn checkpoint_many(&self, acks: Vec<(SessionId, StreamId, Seq)>) -> StoreResult<usize> {
        // Each ack is its own compare-and-set over a few round trips. Acks of different
        // session streams are independent, so several run at once (a flush of many sessions'
        // acks does not take one round trip after another); those of one session stream run
        // in the order given, as one after another would.
        let mut groups: Vec<((SessionId, StreamId), Vec<Seq>)> = Vec::new();
        let mut index: HashMap<(SessionId, StreamId), usize> = HashMap::new();
        for (id, stream, seq) in acks {
            let key = (id, stream);
            match index.get(&key) {
                Some(&i) => groups[i].1.push(seq),
                None => {
                    index.insert(key.clone(), groups.len());
                    groups.push((key, vec![seq]));
                }
            }
        }
        let results: Vec<StoreResult<usize>> = futures_util::stream::iter(groups)
            .map(|((id, stream), seqs)| async move {
                let mut applied = 0;
                for seq in seqs {
                    match self.checkpoint(&id, &stream, seq).await {
                        Ok(u) => applied += usize::from(u.is_applied()),
                        Err(StoreError::Unavailable(e)) => {
                            return Err(StoreError::Unavailable(e));
                        }
                        // The session or stream is gone, or the ack is beyond the head.
                        Err(_) => {}
                    }
                }
                Ok(applied)
            })
            .buffer_unordered(CHECKPOINTS_AT_ONCE)
            .collect()
            .await;
        results.into_iter().sum()
    }

    async fn touch_session(&self, id: &SessionId, expires_at_ms: u64) -> StoreResult<()> {
        let s = &self.shared;
        let deadline = s.session_deadline(expires_at_ms);
        let call = Call::new(&s.scripts.session_touch)
            .key(session_key(id))
            .arg(expires_at_ms)
            .arg(deadline);
        let Some(sub) = as_str(&s.eval("touch session", &call).await?).map(str::to_string) else {
            return Ok(());
        };
        s.index_session(id, deadline, true).await;
        // The subject's set follows (best effort, like the stats index: a session missing its
        // new end there only stops counting against the cap when its first window ends).
        let subject = Call::new(&s.scripts.subject_touch)
            .key(subject_key(&sub))
            .arg(id.as_str())
            .arg(expires_at_ms)
            .arg(now_ms());
        if let Err(e) = s.eval("touch subject", &subject).await {
            tracing::debug!(session = %id, error = %e, "subject's session set not updated");
        }
        Ok(())
    }

    async fn mark_dropped(
        &self,
        id: &SessionId,
        stream: &StreamId,
        through: Seq,
    ) -> StoreResult<()> {
        let s = &self.shared;
        let call = Call::new(&s.scripts.session_dropped)
            .key(session_key(id))
            .arg(stream_field(stream))
            .arg(through.0);
        s.eval("mark dropped", &call).await?;
        Ok(())
    }

    /// A single server is asked its `ROLE`: a master demoted to a replica by a failover still
    /// answers, but refuses every write (`READONLY`), so it is not ready. A cluster client
    /// follows the masters itself; it is asked `PING`.
    async fn ping(&self) -> StoreResult<()> {
        let s = &self.shared;
        let mut conn = s.conn.clone();
        let cmd = ::redis::cmd(if s.cluster { "PING" } else { "ROLE" });
        let ping = cmd.query_async::<Value>(&mut conn);
        match tokio::time::timeout(s.opts.ping_timeout, ping).await {
            Ok(Ok(Value::Array(role))) if !s.cluster => match role.first().and_then(as_str) {
                Some("slave" | "replica") => {
                    Err(s.down("ping", "the server is a read-only replica"))
                }
                _ => Ok(()),
            },
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) if is_outage(&e) => Err(s.down("ping", &e.to_string())),
            // It answered (`ROLE` may be denied by an ACL): reachable.
            Ok(Err(_)) => Ok(()),
            Err(_) => Err(s.down("ping", "timed out")),
        }
    }

    async fn announce_holder(&self, id: &SessionId, holder: &str) -> StoreResult<()> {
        if holder.contains('|') {
            return Err(StoreError::Unavailable(
                "a holder name must not contain '|'".into(),
            ));
        }
        let s = &self.shared;
        let mut conn = s.conn.clone();
        let payload = format!("h|{holder}|{id}");
        s.run("announce holder", async {
            ::redis::cmd("PUBLISH")
                .arg(CHANNEL)
                .arg(payload)
                .query_async::<Value>(&mut conn)
                .await
        })
        .await?;
        Ok(())
    }

    async fn stats(&self) -> StoreResult<StoreStats> {
        let s = &self.shared;
        let mut c1 = s.conn.clone();
        let mut c2 = s.conn.clone();
        let sessions = s.run("stats", async {
            ::redis::cmd("ZCOUNT")
                .arg(SESSIONS_INDEX)
                .arg(format!("({}", now_ms()))
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
}

#[cfg(test)]
mod tests {
    use ::redis::cluster_routing::Slot;

    use super::*;

    #[test]
    fn every_key_of_a_stream_is_on_one_slot() {
        for s in ["room:1", "a", "call:42", "x.y_z-0", &"q".repeat(128)] {
            let stream = StreamId::new(s).unwrap();
            let slot = Slot::for_key(meta_key(&stream));
            assert_eq!(Slot::for_key(log_key(&stream)), slot);
            assert_eq!(Slot::for_key(idem_key(&stream, "any {key} at all")), slot);
            assert_eq!(Slot::for_key(guard::publish_hits_key(&stream, "{k}")), slot);
            assert_eq!(Slot::for_key(guard::publish_index_key(&stream)), slot);
            assert_eq!(slot, Slot::for_key(s), "the tag is the stream id itself");
        }
        let id = SessionId::generate();
        assert_eq!(Slot::for_key(session_key(&id)), Slot::for_key(id.as_str()));
    }

    #[test]
    fn session_streams_round_trip() {
        let st = SessionStream {
            epoch: Epoch::generate(),
            ack: Seq(41),
            dropped_through: Seq(7),
        };
        assert_eq!(decode_session_stream(&encode_session_stream(&st)), Some(st));
        assert_eq!(decode_session_stream("not an entry"), None);
        assert_eq!(decode_session_stream("e 1"), None);
    }

    #[test]
    fn live_messages_decode() {
        let e = Event::encode(
            StreamId::new("room:1").unwrap(),
            Seq(3),
            Epoch::parse("00ff00ff00ff00ff").unwrap(),
            1_700_000_000_123,
            "{\"a\":\"x|y\"}",
        );
        let mut msg = b"e|inst-9|room:1|3|00ff00ff00ff00ff|1700000000123|".to_vec();
        msg.extend_from_slice(e.json());
        let Some(Live::Event { event }) = parse_live(&msg) else {
            panic!("not an event")
        };
        assert_eq!(event.json(), e.json());
        assert_eq!(event.data(), "{\"a\":\"x|y\"}");
        assert_eq!((event.seq(), event.ts()), (Seq(3), 1_700_000_000_123));
        assert!(matches!(
            parse_live(b"t|room:1|8|7"),
            Some(Live::Trimmed {
                first: Seq(8),
                count: 7,
                ..
            })
        ));
        assert!(matches!(
            parse_live(b"r|room:1|abc"),
            Some(Live::Renewed { .. })
        ));
        assert!(matches!(
            parse_live(b"h|ab12-7|s_1-x"),
            Some(Live::Held { holder: "ab12-7", session }) if session.as_str() == "s_1-x"
        ));
        assert!(parse_live(b"h|ab12-7|bad id").is_none());
        assert!(parse_live(b"e|x|bad stream|1|e|1|{}").is_none());
        assert!(parse_live(b"z|whatever").is_none());
    }

    fn server_error(line: &str) -> RedisError {
        match ::redis::parse_redis_value(format!("-{line}\r\n").as_bytes()) {
            Ok(Value::ServerError(e)) => e.into(),
            Ok(v) => panic!("not an error reply: {v:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn errors_that_pass_with_the_deployment_are_outages() {
        for line in [
            "READONLY You can't write against a read only replica.",
            "MOVED 3999 127.0.0.1:6381",
            "ASK 3999 127.0.0.1:6381",
            "LOADING Redis is loading the dataset in memory",
            "MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.",
            "TRYAGAIN Multiple keys request during rehashing of slot",
            "CLUSTERDOWN The cluster is down",
        ] {
            assert!(is_outage(&server_error(line)), "{line}");
        }
        for line in [
            "ERR Error running script (call to f_0123): @user_script:1: bad argument",
            "WRONGTYPE Operation against a key holding the wrong kind of value",
            "NOSCRIPT No matching script. Please use EVAL.",
            "CROSSSLOT Keys in request don't hash to the same slot",
            "NOPERM this user has no permissions to run the 'eval' command",
        ] {
            assert!(!is_outage(&server_error(line)), "{line}");
        }
        let io = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(is_outage(&io));
    }

    #[test]
    fn url_lists() {
        assert_eq!(RedisOptions::new("redis://a:1").urls, vec!["redis://a:1"]);
        assert_eq!(
            RedisOptions::new(" redis://a:1, redis://b:2 ,").urls,
            vec!["redis://a:1", "redis://b:2"]
        );
    }
}
