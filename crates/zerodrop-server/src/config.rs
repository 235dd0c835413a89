//! Every setting in one typed struct, with its documented default.
//!
//! Precedence: command-line flag > `ZERODROP_*` environment variable > `--config` file (TOML,
//! keys named like the flags with `_`) > default. Secrets are never flags (they would show up
//! in `ps`): they come from the environment or the data dir's `secrets.json`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::parser::ValueSource;
use clap::{ArgMatches, Args, ValueEnum};
use serde::Deserialize;
use zerodrop_core::{PatternTable, Retention};
use zerodrop_guard::retry::RetryPolicy;
use zerodrop_store::{Durability, QueuedCaps, RunningCaps, SentinelUrl};

use crate::guard::config::named_tables;
pub use crate::guard::config::{GuardConfig, JobsConfig, UpstreamConfig, WebhookConfig};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreChoice {
    Sqlite,
    Redis,
    Memory,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncChoice {
    Full,
    Normal,
}

/// `--require-durability`: the weakest store durability level this instance serves with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RequiredDurability {
    /// Any level.
    None,
    /// `replicated` or `fsync`: a 201 survives the loss of the store's machine.
    Replicated,
    /// `fsync` only: a 201 is on the store's disk.
    Fsync,
}

impl RequiredDurability {
    /// The level required, if any.
    pub fn level(self) -> Option<Durability> {
        match self {
            RequiredDurability::None => None,
            RequiredDurability::Replicated => Some(Durability::Replicated),
            RequiredDurability::Fsync => Some(Durability::Fsync),
        }
    }
}

/// `--ds-access`: who may use the Durable Streams routes under `/ds/`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DsAccess {
    /// Every request carries the api key (`Authorization: Bearer`), like `/v1` publishes.
    Key,
    /// Reads (`GET`, `HEAD`) are open; writes (`PUT`, `POST`, `DELETE`) need the api key.
    PublicRead,
    /// No credential at all: for a private network or local development.
    Open,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// How often the store's durability level is read again while serving.
pub const DURABILITY_RECHECK: std::time::Duration = std::time::Duration::from_secs(10);

/// `zerodrop serve` flags. Each has an environment variable and a default.
#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// TOML file with any of the settings below (keys named like the flags, with `_`).
    #[arg(long, env = "ZERODROP_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on (`127.0.0.1:0` picks a free port).
    #[arg(long, env = "ZERODROP_LISTEN", default_value = "127.0.0.1:7700")]
    pub listen: SocketAddr,
    /// Directory for the database and `secrets.json`.
    #[arg(long, env = "ZERODROP_DATA_DIR", default_value = "./zerodrop-data")]
    pub data_dir: PathBuf,
    /// Where streams and sessions live.
    #[arg(long, env = "ZERODROP_STORE", value_enum, default_value = "sqlite")]
    pub store: StoreChoice,
    /// Redis URL(s) for `--store redis`; several comma-separated seeds mean Redis Cluster;
    /// `redis+sentinel://host:port[,host:port…]/<master name>` follows the primary Sentinel
    /// elects.
    #[arg(
        long,
        env = "ZERODROP_REDIS_URL",
        default_value = "redis://127.0.0.1:6379"
    )]
    pub redis_url: String,
    /// Replicas a publish waits for (`WAIT N`) before answering 201, with `--store redis`.
    #[arg(long, env = "ZERODROP_REDIS_WAIT_REPLICAS", default_value_t = 0)]
    pub redis_wait_replicas: u32,
    /// How long a disconnected session can be resumed; also the resume token lifetime.
    #[arg(long, env = "ZERODROP_RECONNECT_WINDOW_SEC", default_value_t = 900)]
    pub reconnect_window_sec: u64,
    /// Events kept per stream at most.
    #[arg(long, env = "ZERODROP_RETENTION_MAX_EVENTS", default_value_t = 10_000)]
    pub retention_max_events: u64,
    /// Bytes of event JSON kept per stream at most.
    #[arg(
        long,
        env = "ZERODROP_RETENTION_MAX_BYTES",
        default_value_t = 16_777_216
    )]
    pub retention_max_bytes: u64,
    /// Oldest event age kept, in seconds.
    #[arg(long, env = "ZERODROP_RETENTION_MAX_AGE_SEC", default_value_t = 86_400)]
    pub retention_max_age_sec: u64,
    /// On SIGTERM, how long the drain may take before the process exits.
    #[arg(long, env = "ZERODROP_DRAIN_GRACE_SEC", default_value_t = 30)]
    pub drain_grace_sec: u64,
    /// Largest WebSocket frame accepted; a larger one closes the socket with 1009.
    #[arg(long, env = "ZERODROP_MAX_FRAME_BYTES", default_value_t = 131_072)]
    pub max_frame_bytes: usize,
    /// WebSocket `permessage-deflate` when the client offers it (`false`: never negotiated).
    /// Messages are compressed one by one (no context takeover), within the frame limit.
    #[arg(long, env = "ZERODROP_WS_DEFLATE", default_value_t = true, action = clap::ArgAction::Set)]
    pub ws_deflate: bool,
    /// gzip for SSE responses whose request accepts it (`Accept-Encoding: gzip`), flushed
    /// after every event and ping (`false`: never).
    #[arg(long, env = "ZERODROP_SSE_GZIP", default_value_t = true, action = clap::ArgAction::Set)]
    pub sse_gzip: bool,
    /// Largest event `data` (compact JSON bytes); larger is 413 `PAYLOAD_TOO_LARGE`.
    #[arg(long, env = "ZERODROP_MAX_PAYLOAD_BYTES", default_value_t = 65_536)]
    pub max_payload_bytes: usize,
    /// Largest `POST /v1/events` (batch publish) request body; larger is 413
    /// `PAYLOAD_TOO_LARGE`. Each event's `data` is held to `--max-payload-bytes` as well.
    #[arg(long, env = "ZERODROP_MAX_BATCH_BYTES", default_value_t = 4_194_304)]
    pub max_batch_bytes: usize,
    /// Server `ping` frame interval; two unanswered pings close the socket (4408). Twice this
    /// is also how long any write may make no progress (a client that stopped reading) before
    /// the connection is given up.
    #[arg(long, env = "ZERODROP_PING_INTERVAL_SEC", default_value_t = 25)]
    pub ping_interval_sec: u64,
    /// How long a live connection outlives its connect token's `exp` while a fresh token is
    /// awaited (`refresh`); then `TOKEN_EXPIRED` (close 4401, SSE `event: error`).
    #[arg(long, env = "ZERODROP_TOKEN_GRACE_SEC", default_value_t = 30)]
    pub token_grace_sec: u64,
    /// The most a session lives, whatever its tokens say: then resumes are refused and its
    /// live connections end with `RECONNECT_WINDOW_EXPIRED` (close 4410).
    #[arg(long, env = "ZERODROP_MAX_SESSION_AGE_SEC", default_value_t = 86_400)]
    pub max_session_age_sec: u64,
    /// Allowed CORS origins, comma-separated, or `*`.
    #[arg(long, env = "ZERODROP_CORS_ORIGINS", default_value = "*")]
    pub cors_origins: String,
    /// Streams with presence (who is subscribed, join/leave events): stream ids or prefixes
    /// ending in `*`, comma-separated (in the config file a list: `presence = ["room:*"]`).
    /// Empty: presence is off.
    #[arg(long, env = "ZERODROP_PRESENCE", default_value = "")]
    pub presence: String,
    /// A member leaves only after this long without any connection of its session, so a
    /// reconnect, a resume elsewhere or a drain hand-off emits no leave and no join.
    #[arg(long, env = "ZERODROP_PRESENCE_LEAVE_GRACE_SEC", default_value_t = 10)]
    pub presence_leave_grace_sec: u64,
    /// A member's connection renews its presence every third of this; the members of an
    /// instance that stopped renewing (a crash) leave once this has passed (plus a sweep).
    #[arg(long, env = "ZERODROP_PRESENCE_HEARTBEAT_SEC", default_value_t = 30)]
    pub presence_heartbeat_sec: u64,
    /// Members per stream; a join beyond is refused with a stream-level `OVER_CAPACITY`.
    #[arg(long, env = "ZERODROP_PRESENCE_MAX_MEMBERS", default_value_t = 10_000)]
    pub presence_max_members: u32,
    /// WebSocket and SSE connections this instance accepts; beyond, 503 `OVER_CAPACITY`.
    #[arg(long, env = "ZERODROP_MAX_CONNECTIONS", default_value_t = 1000)]
    pub max_connections: usize,
    /// Streams one session may hold.
    #[arg(long, env = "ZERODROP_MAX_STREAMS_PER_SESSION", default_value_t = 100)]
    pub max_streams_per_session: usize,
    /// Live sessions one subject (a connect token's `sub`) may hold, over every instance
    /// sharing the store: connected, or disconnected within their reconnect window. Opening
    /// one more (`POST /v1/sessions`, a WebSocket connect) is refused with 429 `RATE_LIMITED`
    /// (`limit: "sessions_per_subject"`) and `Retry-After`; resuming never counts. 0: off.
    /// The default bounds what one leaked or abusive token can make the store hold while
    /// leaving room for a subject many clients share (anonymous viewers, a backend, a load
    /// test); where each user has a subject of their own, set it near their real maximum.
    #[arg(
        long,
        env = "ZERODROP_MAX_SESSIONS_PER_SUBJECT",
        default_value_t = 100_000
    )]
    pub max_sessions_per_subject: u32,
    /// New streams one publisher may create per minute (burst: the same number): the api key
    /// for HTTP publishes and webhooks, the connect token's `sub` for WebSocket `publish`
    /// frames. Beyond, a publish to a stream that does not exist yet is refused with 429
    /// `RATE_LIMITED` (`limit: "new_streams_per_minute"`); existing streams are never
    /// affected. 0: off.
    #[arg(long, env = "ZERODROP_MAX_NEW_STREAMS_PER_MINUTE", default_value_t = 0)]
    pub max_new_streams_per_minute: u32,
    /// Frames per second one WebSocket may send (burst: twice that); beyond, `RATE_LIMITED`.
    /// `pong` and acks of delivered events are exempt.
    #[arg(long, env = "ZERODROP_WS_FRAMES_PER_SEC", default_value_t = 100)]
    pub ws_frames_per_sec: u32,
    /// Requests per second one key (the request's credential, or none) may make to one
    /// `/v1` route (burst: twice that); beyond, 429 `RATE_LIMITED` with `Retry-After`. 0: off.
    #[arg(long, env = "ZERODROP_HTTP_REQUESTS_PER_SEC", default_value_t = 0)]
    pub http_requests_per_sec: u32,
    /// Seconds a connection may take to send a complete request head, counted from its
    /// accept (or, on a kept-alive connection, from the next request's first byte); also the
    /// longest pause within a request body. Past it the connection is closed.
    #[arg(long, env = "ZERODROP_HTTP_HEADER_TIMEOUT_SEC", default_value_t = 10)]
    pub http_header_timeout_sec: u64,
    /// Seconds a kept-alive connection may wait, idle, for its next request before it is
    /// closed. WebSockets and streaming (SSE) responses are never idle.
    #[arg(long, env = "ZERODROP_HTTP_IDLE_TIMEOUT_SEC", default_value_t = 60)]
    pub http_idle_timeout_sec: u64,
    /// Connections with no request in progress (not yet sent a complete request head, or
    /// idle between keep-alive requests) kept open at most; past it the oldest is closed.
    #[arg(long, env = "ZERODROP_MAX_PENDING_CONNECTIONS", default_value_t = 1024)]
    pub max_pending_connections: usize,
    /// How long an `Idempotency-Key` is remembered, in seconds.
    #[arg(long, env = "ZERODROP_IDEMPOTENCY_TTL_SEC", default_value_t = 86_400)]
    pub idempotency_ttl_sec: u64,
    /// SQLite durability: `full` fsyncs every commit (201 survives power loss); `normal`
    /// survives a process crash, but a power loss takes back the commits since the last WAL
    /// checkpoint and their seqs are handed out again in the same epoch (docs/reliability.md).
    #[arg(
        long,
        env = "ZERODROP_SQLITE_SYNCHRONOUS",
        value_enum,
        default_value = "full"
    )]
    pub sqlite_synchronous: SyncChoice,
    /// The weakest store durability level to serve with: `fsync` (a 201 is on the store's
    /// disk) or `replicated` (on N ≥ 1 Redis replicas, or `fsync`). Below it at start the
    /// process refuses to start; below it later (a Redis setting changed) readiness answers
    /// 503 `durability_below_required` until it is back. `none`: any level (a start below
    /// fsync and replicated logs a warning).
    #[arg(
        long,
        env = "ZERODROP_REQUIRE_DURABILITY",
        value_enum,
        default_value = "none"
    )]
    pub require_durability: RequiredDurability,
    /// How often the SQLite file is checked for damage (`PRAGMA quick_check`) while serving,
    /// in seconds; 0 turns the scheduled check off (the start-up check always runs).
    #[arg(
        long,
        env = "ZERODROP_SQLITE_CHECK_INTERVAL_SEC",
        default_value_t = 3600
    )]
    pub sqlite_check_interval_sec: u64,
    /// Who may use the Durable Streams routes (`/ds/v1/stream/{stream}`): `key` (the api
    /// key on every request), `public-read` (reads open, writes need the api key) or `open`
    /// (no credential; a private network or local development only).
    #[arg(long, env = "ZERODROP_DS_ACCESS", value_enum, default_value = "key")]
    pub ds_access: DsAccess,
    /// Newest events each subscribed stream keeps in memory for live fan-out; subscribers
    /// further behind read the log.
    #[arg(long, env = "ZERODROP_LIVE_RING_EVENTS", default_value_t = 1024)]
    pub live_ring_events: usize,
    /// This instance's name in `welcome`, `/health` and `X-Zerodrop-Instance` (default:
    /// generated at start).
    #[arg(long, env = "ZERODROP_INSTANCE_ID")]
    pub instance_id: Option<String>,
    /// Public keys for RS256, ES256 and EdDSA connect tokens: a JWKS document at an
    /// `https://` (or `http://`) URL, or a file (`file:///path` or a plain path). Each key is
    /// pinned to its algorithm; HS256 with the JWT secret keeps working beside it.
    #[arg(long, env = "ZERODROP_JWKS_URL")]
    pub jwks_url: Option<String>,
    /// The least time between two reads of the JWKS on an unknown `kid`.
    #[arg(long, env = "ZERODROP_JWKS_REFRESH_MIN_SEC", default_value_t = 30)]
    pub jwks_refresh_min_sec: u64,
    /// When set, connect tokens must carry this `iss`.
    #[arg(long, env = "ZERODROP_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// When set, connect tokens must carry this `aud`.
    #[arg(long, env = "ZERODROP_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// The upstream (`[upstreams.<name>]`) asked whether a subject may connect, subscribe or
    /// publish (`POST <target><authz_path>`); unset: no hook, the token's grants decide alone.
    #[arg(long, env = "ZERODROP_AUTHZ_UPSTREAM")]
    pub authz_upstream: Option<String>,
    /// The path the authorization hook is posted to, below the upstream's base URL.
    #[arg(long, env = "ZERODROP_AUTHZ_PATH", default_value = "/authz")]
    pub authz_path: String,
    /// Which actions ask the hook: comma-separated of `connect`, `subscribe`, `publish`.
    #[arg(
        long,
        env = "ZERODROP_AUTHZ_ACTIONS",
        default_value = "connect,subscribe,publish"
    )]
    pub authz_actions: String,
    /// Log format.
    #[arg(long, env = "ZERODROP_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// How long a worker holds a job before another may take it over (a heartbeat renews it while the delivery runs), in ms.
    #[arg(long, env = "ZERODROP_JOBS_LEASE_MS", default_value_t = 30_000)]
    pub jobs_lease_ms: u64,
    /// How often a running job's lease is renewed, in ms (at most half the lease).
    #[arg(long, env = "ZERODROP_JOBS_HEARTBEAT_MS", default_value_t = 10_000)]
    pub jobs_heartbeat_ms: u64,
    /// Delivery attempts per job, the first included; after the last the job is a dead letter.
    #[arg(long, env = "ZERODROP_JOBS_MAX_ATTEMPTS", default_value_t = 8)]
    pub jobs_max_attempts: u32,
    /// Ceiling of the first retry's delay in ms; each retry doubles it (full jitter: the delay is drawn from 0 to the ceiling).
    #[arg(long, env = "ZERODROP_JOBS_BACKOFF_BASE_MS", default_value_t = 500)]
    pub jobs_backoff_base_ms: u64,
    /// No retry delay ceiling grows beyond this, in ms.
    #[arg(long, env = "ZERODROP_JOBS_BACKOFF_CAP_MS", default_value_t = 60_000)]
    pub jobs_backoff_cap_ms: u64,
    /// `realtime` jobs one instance runs at once.
    #[arg(long, env = "ZERODROP_JOBS_RUNNING_REALTIME", default_value_t = 32)]
    pub jobs_running_realtime: u64,
    /// `interactive` jobs one instance runs at once.
    #[arg(long, env = "ZERODROP_JOBS_RUNNING_INTERACTIVE", default_value_t = 16)]
    pub jobs_running_interactive: u64,
    /// `batch` jobs one instance runs at once.
    #[arg(long, env = "ZERODROP_JOBS_RUNNING_BATCH", default_value_t = 4)]
    pub jobs_running_batch: u64,
    /// Jobs of one kind (`publish`, `webhook:<source>`) one instance runs at once; 0: no cap beyond the class caps.
    #[arg(long, env = "ZERODROP_JOBS_RUNNING_PER_KIND", default_value_t = 0)]
    pub jobs_running_per_kind: u64,
    /// Running caps of named kinds, overriding `--jobs-running-per-kind` for them:
    /// comma-separated `kind=N` (e.g. `webhook:github=4,publish=64`). Default: none.
    #[arg(long, env = "ZERODROP_JOBS_RUNNING_KINDS", default_value = "")]
    pub jobs_running_kinds: String,
    /// `realtime` jobs queued at most; beyond, 503 `QUEUE_FULL`. 0: no cap.
    #[arg(long, env = "ZERODROP_JOBS_QUEUED_REALTIME", default_value_t = 100_000)]
    pub jobs_queued_realtime: u64,
    /// `interactive` jobs queued at most; beyond, 503 `QUEUE_FULL`. 0: no cap.
    #[arg(
        long,
        env = "ZERODROP_JOBS_QUEUED_INTERACTIVE",
        default_value_t = 100_000
    )]
    pub jobs_queued_interactive: u64,
    /// `batch` jobs queued at most; beyond, 503 `QUEUE_FULL`. 0: no cap.
    #[arg(long, env = "ZERODROP_JOBS_QUEUED_BATCH", default_value_t = 100_000)]
    pub jobs_queued_batch: u64,
    /// The jobs alert fires while the oldest due queued job has waited longer than this, in seconds.
    #[arg(long, env = "ZERODROP_JOBS_OLDEST_ALERT_SEC", default_value_t = 60)]
    pub jobs_oldest_alert_sec: u64,
    /// Delivered jobs are kept (listed, and their dedupe keys held) this long, in seconds.
    #[arg(long, env = "ZERODROP_JOBS_DONE_KEEP_SEC", default_value_t = 3600)]
    pub jobs_done_keep_sec: u64,
    /// Upstream GET answers cached at most, over all namespaces.
    #[arg(long, env = "ZERODROP_CACHE_MAX_ENTRIES", default_value_t = 5000)]
    pub cache_max_entries: usize,
}

/// The same settings, as a config file may give them.
#[derive(Deserialize, Default, Debug)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    store: Option<StoreChoice>,
    redis_url: Option<String>,
    redis_wait_replicas: Option<u32>,
    reconnect_window_sec: Option<u64>,
    retention_max_events: Option<u64>,
    retention_max_bytes: Option<u64>,
    retention_max_age_sec: Option<u64>,
    drain_grace_sec: Option<u64>,
    max_frame_bytes: Option<usize>,
    ws_deflate: Option<bool>,
    sse_gzip: Option<bool>,
    max_payload_bytes: Option<usize>,
    max_batch_bytes: Option<usize>,
    ping_interval_sec: Option<u64>,
    token_grace_sec: Option<u64>,
    max_session_age_sec: Option<u64>,
    cors_origins: Option<String>,
    /// A list here; a comma-separated string as a flag or variable.
    presence: Option<Vec<String>>,
    presence_leave_grace_sec: Option<u64>,
    presence_heartbeat_sec: Option<u64>,
    presence_max_members: Option<u32>,
    max_connections: Option<usize>,
    max_streams_per_session: Option<usize>,
    max_sessions_per_subject: Option<u32>,
    max_new_streams_per_minute: Option<u32>,
    ws_frames_per_sec: Option<u32>,
    http_requests_per_sec: Option<u32>,
    http_header_timeout_sec: Option<u64>,
    http_idle_timeout_sec: Option<u64>,
    max_pending_connections: Option<usize>,
    idempotency_ttl_sec: Option<u64>,
    sqlite_synchronous: Option<SyncChoice>,
    require_durability: Option<RequiredDurability>,
    sqlite_check_interval_sec: Option<u64>,
    ds_access: Option<DsAccess>,
    live_ring_events: Option<usize>,
    instance_id: Option<String>,
    jwks_url: Option<String>,
    jwks_refresh_min_sec: Option<u64>,
    jwt_issuer: Option<String>,
    jwt_audience: Option<String>,
    authz_upstream: Option<String>,
    authz_path: Option<String>,
    authz_actions: Option<String>,
    log_format: Option<LogFormat>,
    jobs_lease_ms: Option<u64>,
    jobs_heartbeat_ms: Option<u64>,
    jobs_max_attempts: Option<u32>,
    jobs_backoff_base_ms: Option<u64>,
    jobs_backoff_cap_ms: Option<u64>,
    jobs_running_realtime: Option<u64>,
    jobs_running_interactive: Option<u64>,
    jobs_running_batch: Option<u64>,
    jobs_running_per_kind: Option<u64>,
    jobs_running_kinds: Option<String>,
    jobs_queued_realtime: Option<u64>,
    jobs_queued_interactive: Option<u64>,
    jobs_queued_batch: Option<u64>,
    jobs_oldest_alert_sec: Option<u64>,
    jobs_done_keep_sec: Option<u64>,
    cache_max_entries: Option<usize>,
    /// `[upstreams.<name>]` tables (see `guard::config`).
    upstreams: Option<toml::Table>,
    /// `[webhooks.<source>]` tables.
    webhooks: Option<toml::Table>,
    /// `[streams."<pattern>"]` tables: per-stream policy (SPEC §11).
    streams: Option<BTreeMap<String, StreamSettings>>,
}

impl FileConfig {
    /// Sets each setting the file gives on `args`, where `defaulted(id)` says that no flag
    /// or variable set it; optional settings only where nothing set them.
    fn apply(self, args: &mut ServeArgs, defaulted: impl Fn(&str) -> bool) {
        macro_rules! take {
            ($($field:ident),*) => {$(
                if defaulted(stringify!($field)) {
                    if let Some(v) = self.$field { args.$field = v; }
                }
            )*};
        }
        take!(
            listen,
            data_dir,
            store,
            redis_url,
            redis_wait_replicas,
            reconnect_window_sec,
            retention_max_events,
            retention_max_bytes,
            retention_max_age_sec,
            drain_grace_sec,
            max_frame_bytes,
            ws_deflate,
            sse_gzip,
            max_payload_bytes,
            max_batch_bytes,
            ping_interval_sec,
            token_grace_sec,
            max_session_age_sec,
            cors_origins,
            presence_leave_grace_sec,
            presence_heartbeat_sec,
            presence_max_members,
            max_connections,
            max_streams_per_session,
            max_sessions_per_subject,
            max_new_streams_per_minute,
            ws_frames_per_sec,
            http_requests_per_sec,
            http_header_timeout_sec,
            http_idle_timeout_sec,
            max_pending_connections,
            idempotency_ttl_sec,
            sqlite_synchronous,
            require_durability,
            sqlite_check_interval_sec,
            ds_access,
            live_ring_events,
            log_format,
            jobs_lease_ms,
            jobs_heartbeat_ms,
            jobs_max_attempts,
            jobs_backoff_base_ms,
            jobs_backoff_cap_ms,
            jobs_running_realtime,
            jobs_running_interactive,
            jobs_running_batch,
            jobs_running_per_kind,
            jobs_running_kinds,
            jobs_queued_realtime,
            jobs_queued_interactive,
            jobs_queued_batch,
            jobs_oldest_alert_sec,
            jobs_done_keep_sec,
            cache_max_entries,
            jwks_refresh_min_sec,
            authz_path,
            authz_actions
        );
        if defaulted("presence")
            && let Some(v) = self.presence
        {
            args.presence = v.join(",");
        }
        if args.instance_id.is_none() {
            args.instance_id = self.instance_id;
        }
        if args.authz_upstream.is_none() {
            args.authz_upstream = self.authz_upstream;
        }
        if args.jwks_url.is_none() {
            args.jwks_url = self.jwks_url;
        }
        if args.jwt_issuer.is_none() {
            args.jwt_issuer = self.jwt_issuer;
        }
        if args.jwt_audience.is_none() {
            args.jwt_audience = self.jwt_audience;
        }
    }
}

/// Secrets as configured in the environment (any may be missing; see `secrets`).
#[derive(Clone, Default)]
pub struct SecretOverrides {
    pub api_key: Option<String>,
    pub admin_token: Option<String>,
    pub jwt_secret: Option<String>,
    pub resume_keys: Option<String>,
}

impl std::fmt::Debug for SecretOverrides {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretOverrides { .. }")
    }
}

impl SecretOverrides {
    pub fn from_env() -> SecretOverrides {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        SecretOverrides {
            api_key: var("ZERODROP_API_KEY"),
            admin_token: var("ZERODROP_ADMIN_TOKEN"),
            jwt_secret: var("ZERODROP_JWT_SECRET"),
            resume_keys: var("ZERODROP_RESUME_KEYS"),
        }
    }
}

/// Presence settings (SPEC §10).
#[derive(Clone, Debug, Default)]
pub struct PresenceConfig {
    /// Stream ids or prefixes ending in `*` whose subscribers are members.
    pub patterns: Vec<String>,
    pub leave_grace_sec: u64,
    pub heartbeat_sec: u64,
    pub max_members: u32,
}

impl PresenceConfig {
    /// Whether `stream` has presence.
    pub fn covers(&self, stream: &str) -> bool {
        self.patterns
            .iter()
            .any(|p| zerodrop_core::grant::pattern_matches(p, stream))
    }
}

/// The resolved configuration the server runs with.
#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub store: StoreChoice,
    pub redis_url: String,
    pub redis_wait_replicas: u32,
    pub reconnect_window_sec: u64,
    pub retention: Retention,
    pub drain_grace_sec: u64,
    pub max_frame_bytes: usize,
    /// WebSocket `permessage-deflate` when offered (`deflate.rs`).
    pub ws_deflate: bool,
    /// SSE gzip when accepted (`deflate.rs`).
    pub sse_gzip: bool,
    pub max_payload_bytes: usize,
    /// Largest batch publish request body (`POST /v1/events`).
    pub max_batch_bytes: usize,
    pub ping_interval_sec: u64,
    pub token_grace_sec: u64,
    pub max_session_age_sec: u64,
    pub cors_origins: String,
    /// Presence (SPEC §10): the stream patterns that have it, and its timings and limit.
    pub presence: PresenceConfig,
    /// Per-stream policy (SPEC §11, `[streams."<pattern>"]`): what each pattern sets for its
    /// streams over the global settings; see [`Config::policy`].
    pub streams: PatternTable<StreamSettings>,
    pub max_connections: usize,
    pub max_streams_per_session: usize,
    /// 0: no cap.
    pub max_sessions_per_subject: u32,
    /// 0: no cap.
    pub max_new_streams_per_minute: u32,
    pub ws_frames_per_sec: u32,
    pub http_requests_per_sec: u32,
    pub http_header_timeout_sec: u64,
    pub http_idle_timeout_sec: u64,
    pub max_pending_connections: usize,
    pub idempotency_ttl_sec: u64,
    pub sqlite_synchronous: SyncChoice,
    pub require_durability: RequiredDurability,
    /// How often the store's durability level is read again (Redis settings can change at run
    /// time), besides whenever the store answers again after failing. Not a setting of its
    /// own: 10 s ([`DURABILITY_RECHECK`]); tests shorten it.
    pub durability_recheck: std::time::Duration,
    pub sqlite_check_interval_sec: u64,
    pub ds_access: DsAccess,
    /// What time it is wherever something expires or is trimmed (`zerodrop_core::clock`). Not
    /// a setting: the system's time line; tests inject a clock they move.
    pub clock: std::sync::Arc<dyn zerodrop_core::Clock>,
    pub live_ring_events: usize,
    pub instance_id: Option<String>,
    pub jwks_url: Option<String>,
    pub jwks_refresh_min_sec: u64,
    pub jwt_issuer: Option<String>,
    pub jwt_audience: Option<String>,
    pub authz_upstream: Option<String>,
    pub authz_path: String,
    pub authz_actions: String,
    pub log_format: LogFormat,
    /// Upstreams, webhook sources, the job queue and the response cache.
    pub guard: GuardConfig,
    pub secrets: SecretOverrides,
}

impl Config {
    /// Defaults for tests and embedding: memory-free defaults as documented, listening on a
    /// free loopback port, data in `data_dir`.
    pub fn for_tests(data_dir: impl Into<PathBuf>) -> Config {
        let args = <ServeArgsParser as clap::Parser>::parse_from(["zerodrop"]).args;
        let mut c = Config::from_args(args, None, BTreeMap::new(), BTreeMap::new())
            .expect("defaults are valid");
        c.listen = "127.0.0.1:0".parse().expect("valid address");
        c.data_dir = data_dir.into();
        c
    }

    /// Resolves flags/env (`args`, with `matches` telling which were defaults) over the file.
    pub fn resolve(args: ServeArgs, matches: &ArgMatches) -> anyhow::Result<Config> {
        let mut file = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read config file {}", path.display()))?;
                let f: FileConfig = toml::from_str(&text)
                    .with_context(|| format!("invalid config file {}", path.display()))?;
                Some(f)
            }
            None => None,
        };
        let mut args = args;
        let vars: Vec<(String, String)> = std::env::vars().collect();
        let (upstreams, webhooks) = match &mut file {
            Some(f) => named_tables(f.upstreams.take(), f.webhooks.take(), &vars)?,
            None => named_tables(None, None, &vars)?,
        };
        let streams = stream_tables(file.as_mut().and_then(|f| f.streams.take()))?;
        if let Some(f) = file {
            let defaulted = |id: &str| {
                matches
                    .value_source(id)
                    .is_none_or(|s| s == ValueSource::DefaultValue)
            };
            f.apply(&mut args, defaulted);
        }
        let mut c =
            Config::from_args(args, Some(SecretOverrides::from_env()), upstreams, webhooks)?;
        c.streams = streams;
        c.validate()?;
        Ok(c)
    }

    /// A config file's text over the defaults, as `serve --config` reads it but without
    /// flags, `ZERODROP_*` variables or secrets: the file parser and every check behind it,
    /// in one call (the fuzz target `config_toml` in `zerodrop-fuzzing`). The defaults are
    /// the flags' own, not the environment's.
    pub fn from_toml(text: &str) -> anyhow::Result<Config> {
        let mut f: FileConfig = toml::from_str(text).context("invalid config file")?;
        let (upstreams, webhooks) = named_tables(f.upstreams.take(), f.webhooks.take(), &[])?;
        let streams = stream_tables(f.streams.take())?;
        let mut args = ServeArgs::defaults();
        f.apply(&mut args, |_| true);
        let mut c = Config::from_args(args, None, upstreams, webhooks)?;
        c.streams = streams;
        c.validate()?;
        Ok(c)
    }

    fn from_args(
        a: ServeArgs,
        secrets: Option<SecretOverrides>,
        upstreams: BTreeMap<String, UpstreamConfig>,
        webhooks: BTreeMap<String, WebhookConfig>,
    ) -> anyhow::Result<Config> {
        let c = Config {
            listen: a.listen,
            data_dir: a.data_dir,
            store: a.store,
            redis_url: a.redis_url,
            redis_wait_replicas: a.redis_wait_replicas,
            reconnect_window_sec: a.reconnect_window_sec,
            retention: Retention {
                max_events: a.retention_max_events,
                max_bytes: a.retention_max_bytes,
                max_age_ms: a.retention_max_age_sec.saturating_mul(1000),
            },
            drain_grace_sec: a.drain_grace_sec,
            max_frame_bytes: a.max_frame_bytes,
            ws_deflate: a.ws_deflate,
            sse_gzip: a.sse_gzip,
            max_payload_bytes: a.max_payload_bytes,
            max_batch_bytes: a.max_batch_bytes,
            ping_interval_sec: a.ping_interval_sec,
            token_grace_sec: a.token_grace_sec,
            max_session_age_sec: a.max_session_age_sec,
            cors_origins: a.cors_origins,
            streams: PatternTable::new(),
            presence: PresenceConfig {
                patterns: a
                    .presence
                    .split(',')
                    .map(str::trim)
                    .filter(|p| !p.is_empty())
                    .map(String::from)
                    .collect(),
                leave_grace_sec: a.presence_leave_grace_sec,
                heartbeat_sec: a.presence_heartbeat_sec,
                max_members: a.presence_max_members,
            },
            max_connections: a.max_connections,
            max_streams_per_session: a.max_streams_per_session,
            max_sessions_per_subject: a.max_sessions_per_subject,
            max_new_streams_per_minute: a.max_new_streams_per_minute,
            ws_frames_per_sec: a.ws_frames_per_sec,
            http_requests_per_sec: a.http_requests_per_sec,
            http_header_timeout_sec: a.http_header_timeout_sec,
            http_idle_timeout_sec: a.http_idle_timeout_sec,
            max_pending_connections: a.max_pending_connections,
            idempotency_ttl_sec: a.idempotency_ttl_sec,
            sqlite_synchronous: a.sqlite_synchronous,
            require_durability: a.require_durability,
            durability_recheck: DURABILITY_RECHECK,
            sqlite_check_interval_sec: a.sqlite_check_interval_sec,
            ds_access: a.ds_access,
            clock: zerodrop_core::SystemClock::shared(),
            live_ring_events: a.live_ring_events,
            instance_id: a.instance_id,
            jwks_url: a.jwks_url,
            jwks_refresh_min_sec: a.jwks_refresh_min_sec,
            jwt_issuer: a.jwt_issuer,
            jwt_audience: a.jwt_audience,
            authz_upstream: a.authz_upstream,
            authz_path: a.authz_path,
            authz_actions: a.authz_actions,
            log_format: a.log_format,
            guard: GuardConfig {
                upstreams,
                webhooks,
                jobs: JobsConfig {
                    lease_ms: a.jobs_lease_ms,
                    heartbeat_ms: a.jobs_heartbeat_ms,
                    retry: RetryPolicy {
                        max_attempts: a.jobs_max_attempts,
                        base_ms: a.jobs_backoff_base_ms,
                        cap_ms: a.jobs_backoff_cap_ms,
                    },
                    running: RunningCaps {
                        per_class: [
                            a.jobs_running_realtime,
                            a.jobs_running_interactive,
                            a.jobs_running_batch,
                        ],
                        per_kind: kind_caps(&a.jobs_running_kinds)?,
                        default_per_kind: a.jobs_running_per_kind,
                    },
                    queued: QueuedCaps {
                        per_class: [
                            a.jobs_queued_realtime,
                            a.jobs_queued_interactive,
                            a.jobs_queued_batch,
                        ],
                    },
                    oldest_alert_sec: a.jobs_oldest_alert_sec,
                    done_keep_sec: a.jobs_done_keep_sec,
                },
                cache_max_entries: a.cache_max_entries,
            },
            secrets: secrets.unwrap_or_default(),
        };
        c.validate()?;
        Ok(c)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        if self.store == StoreChoice::Redis
            && let Some(Err(why)) = SentinelUrl::parse(&self.redis_url)
        {
            // The reason only: the URL may carry a password.
            bail!("--redis-url (redis_url): {why}");
        }
        for p in &self.presence.patterns {
            if zerodrop_core::StreamId::validate(p.strip_suffix('*').unwrap_or(p)).is_err()
                && p != "*"
            {
                bail!(
                    "--presence (presence): {p:?} is neither a stream id nor a prefix ending in '*'"
                );
            }
        }
        if self.presence.heartbeat_sec == 0 {
            bail!("--presence-heartbeat-sec (presence_heartbeat_sec) must be at least 1");
        }
        if self.presence.max_members == 0 {
            bail!("--presence-max-members (presence_max_members) must be at least 1");
        }
        if self.reconnect_window_sec == 0 {
            bail!("--reconnect-window-sec (reconnect_window_sec) must be at least 1");
        }
        if self.retention.max_events == 0 {
            bail!("--retention-max-events (retention_max_events) must be at least 1");
        }
        if self.retention.max_age_ms == 0 {
            bail!("--retention-max-age-sec (retention_max_age_sec) must be at least 1");
        }
        if self.max_payload_bytes == 0 {
            bail!("--max-payload-bytes (max_payload_bytes) must be at least 1");
        }
        for (pattern, s) in self.streams.iter() {
            s.validate()
                .map_err(|why| anyhow::anyhow!("[streams.\"{pattern}\"]: {why}"))?;
        }
        if self.max_batch_bytes == 0 {
            bail!("--max-batch-bytes (max_batch_bytes) must be at least 1");
        }
        if self.max_frame_bytes < 1024 {
            bail!("--max-frame-bytes (max_frame_bytes) must be at least 1024");
        }
        if self.ping_interval_sec == 0 {
            bail!("--ping-interval-sec (ping_interval_sec) must be at least 1");
        }
        if self.live_ring_events == 0 {
            bail!("--live-ring-events (live_ring_events) must be at least 1");
        }
        if self.ws_frames_per_sec == 0 {
            bail!("--ws-frames-per-sec (ws_frames_per_sec) must be at least 1");
        }
        if self.http_header_timeout_sec == 0 {
            bail!("--http-header-timeout-sec (http_header_timeout_sec) must be at least 1");
        }
        if self.http_idle_timeout_sec == 0 {
            bail!("--http-idle-timeout-sec (http_idle_timeout_sec) must be at least 1");
        }
        if self.max_pending_connections == 0 {
            bail!("--max-pending-connections (max_pending_connections) must be at least 1");
        }
        self.guard.validate()?;
        if let Some(up) = &self.authz_upstream
            && !self.guard.upstreams.contains_key(up)
        {
            bail!(
                "--authz-upstream (authz_upstream) {up:?} is not a configured [upstreams.<name>]"
            );
        }
        if !self.authz_path.starts_with('/') {
            bail!("--authz-path (authz_path) must start with /");
        }
        for a in self
            .authz_actions
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
        {
            if !["connect", "subscribe", "publish"].contains(&a) {
                bail!(
                    "--authz-actions (authz_actions): unknown action {a:?} (connect, subscribe, publish)"
                );
            }
        }
        if let Some(id) = &self.instance_id {
            let ok = !id.is_empty()
                && id.len() <= 64
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
            if !ok {
                bail!("--instance-id (instance_id) must be 1-64 characters of A-Z a-z 0-9 - _ .");
            }
        }
        Ok(())
    }

    /// How long a write may make no progress before the connection is given up: twice
    /// `--ping-interval-sec` (default 50 s). A client that has taken no byte for that long
    /// could not have answered two pings either, so it gets the same close code (4408) when
    /// the close frame can still be written, and the TCP connection is dropped otherwise. The
    /// same bound ends SSE responses and plain HTTP responses whose client stopped reading.
    /// Not a setting of its own: it moves with the ping interval (see `stall.rs`).
    pub fn write_stall(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.ping_interval_sec.saturating_mul(2))
    }

    /// Largest HTTP request body accepted: room for a maximal payload plus its envelope
    /// (JSON escaping can at most double `data`'s size when it is sent pretty-printed).
    pub fn max_body_bytes(&self) -> usize {
        self.largest_payload_bytes()
            .saturating_mul(2)
            .saturating_add(16 * 1024)
    }

    /// The largest `data` any stream accepts: `--max-payload-bytes`, or a pattern's larger one.
    pub fn largest_payload_bytes(&self) -> usize {
        self.streams
            .values()
            .filter_map(|s| s.max_payload_bytes)
            .fold(self.max_payload_bytes, usize::max)
    }

    /// The policy that applies to `stream`: its most specific `[streams."<pattern>"]` table's
    /// settings, each one it leaves out taken from the global settings (retention,
    /// `--max-payload-bytes`, the `--presence` list, publishing by api key and by connect
    /// tokens that grant it).
    pub fn policy(&self, stream: &str) -> StreamPolicy<'_> {
        let found = self.streams.resolve(stream);
        let s = found.map(|r| r.value);
        let pick =
            |f: fn(&StreamSettings) -> Option<u64>, global: u64| s.and_then(f).unwrap_or(global);
        StreamPolicy {
            pattern: found.map(|r| r.pattern),
            retention: Retention {
                max_events: pick(|s| s.retention_max_events, self.retention.max_events),
                max_bytes: pick(|s| s.retention_max_bytes, self.retention.max_bytes),
                max_age_ms: s
                    .and_then(|s| s.retention_max_age_sec)
                    .map_or(self.retention.max_age_ms, |sec| sec.saturating_mul(1000)),
            },
            max_payload_bytes: s
                .and_then(|s| s.max_payload_bytes)
                .unwrap_or(self.max_payload_bytes),
            presence: match s.and_then(|s| s.presence) {
                Some(on) => on,
                None => self.presence.covers(stream),
            },
            publish: s.and_then(|s| s.publish).unwrap_or_default(),
        }
    }

    /// Whether any stream has presence (the `--presence` list, or a pattern's `presence`).
    pub fn presence_anywhere(&self) -> bool {
        !self.presence.patterns.is_empty()
            || self.streams.values().any(|s| s.presence == Some(true))
    }

    /// Each pattern's retention limits (the global ones where it sets none), for the store.
    pub fn retention_patterns(&self) -> PatternTable<Retention> {
        self.streams.map(|s| Retention {
            max_events: s.retention_max_events.unwrap_or(self.retention.max_events),
            max_bytes: s.retention_max_bytes.unwrap_or(self.retention.max_bytes),
            max_age_ms: s
                .retention_max_age_sec
                .map_or(self.retention.max_age_ms, |sec| sec.saturating_mul(1000)),
        })
    }
}

/// Who may publish to a stream (`publish` in a `[streams."<pattern>"]` table).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PublishRule {
    /// Backends with the api key, and clients whose connect token grants publishing to the
    /// stream (WebSocket `publish` frames). The default.
    #[default]
    Any,
    /// Backends with the api key only: `publish` frames are refused whatever the token says.
    ApiKey,
    /// Nobody: the stream is read-only (every publish, batch item and webhook append to it is
    /// refused with 403 `FORBIDDEN`).
    None,
}

impl PublishRule {
    pub fn as_str(self) -> &'static str {
        match self {
            PublishRule::Any => "any",
            PublishRule::ApiKey => "api-key",
            PublishRule::None => "none",
        }
    }
}

/// One `[streams."<pattern>"]` table: what it sets for the streams it is the most specific
/// pattern of. Keys named like the global settings; each one left out follows the global
/// setting.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamSettings {
    pub retention_max_events: Option<u64>,
    pub retention_max_bytes: Option<u64>,
    pub retention_max_age_sec: Option<u64>,
    pub max_payload_bytes: Option<usize>,
    /// Presence on or off for these streams, whatever the `--presence` list says.
    pub presence: Option<bool>,
    pub publish: Option<PublishRule>,
}

impl StreamSettings {
    fn validate(&self) -> Result<(), String> {
        let at_least_one = [
            ("retention_max_events", self.retention_max_events),
            ("retention_max_age_sec", self.retention_max_age_sec),
            (
                "max_payload_bytes",
                self.max_payload_bytes.map(|n| n as u64),
            ),
        ];
        for (key, v) in at_least_one {
            if v == Some(0) {
                return Err(format!("{key} must be at least 1"));
            }
        }
        Ok(())
    }
}

/// The policy that applies to one stream ([`Config::policy`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamPolicy<'a> {
    /// The `[streams."<pattern>"]` it came from; `None`: the global settings.
    pub pattern: Option<&'a str>,
    pub retention: Retention,
    pub max_payload_bytes: usize,
    pub presence: bool,
    pub publish: PublishRule,
}

/// `[streams."<pattern>"]` tables → the pattern table (each pattern validated, none twice).
fn stream_tables(
    tables: Option<BTreeMap<String, StreamSettings>>,
) -> anyhow::Result<PatternTable<StreamSettings>> {
    let mut t = PatternTable::new();
    for (pattern, settings) in tables.unwrap_or_default() {
        t.insert(&pattern, settings)
            .map_err(|e| anyhow::anyhow!("[streams.\"{pattern}\"]: {e}"))?;
    }
    Ok(t)
}

/// `kind=N,kind=N` → caps per kind.
fn kind_caps(text: &str) -> anyhow::Result<BTreeMap<String, u64>> {
    let mut caps = BTreeMap::new();
    for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let parsed = item
            .rsplit_once('=')
            .and_then(|(k, n)| Some((k.trim(), n.trim().parse::<u64>().ok()?)))
            .filter(|(k, n)| !k.is_empty() && *n > 0);
        let Some((kind, n)) = parsed else {
            bail!(
                "--jobs-running-kinds (jobs_running_kinds): `{item}` is not `kind=N` with N at least 1"
            );
        };
        caps.insert(kind.to_string(), n);
    }
    Ok(caps)
}

impl ServeArgs {
    /// Every setting at its default (the environment is read for none of them).
    fn defaults() -> ServeArgs {
        let command = <ServeArgsParser as clap::CommandFactory>::command();
        let matches = command
            .mut_args(|a| a.env(None::<&str>))
            .get_matches_from(["zerodrop"]);
        <ServeArgs as clap::FromArgMatches>::from_arg_matches(&matches)
            .expect("the defaults are valid settings")
    }
}

#[derive(clap::Parser)]
struct ServeArgsParser {
    #[command(flatten)]
    args: ServeArgs,
}
