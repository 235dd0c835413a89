//! The SDK proper: a [`Client`] that keeps one WebSocket session alive and hands each
//! [`Subscription`] its stream's events in seq order, each once, or a typed
//! [`SubscriptionError`] that says why not (docs/sdk.md is the contract).
//!
//! One task (the driver) owns the connection and every subscription's bookkeeping; the
//! [`Client`], its [`Subscription`]s and each [`Received`] event talk to it over a channel.
//! What the driver does:
//!
//! - **Reconnect.** A dropped socket is reopened with full-jitter backoff ([`Backoff`]), on
//!   the next url of the list, and the session resumed with its newest resume token and
//!   `lastAck` = the highest seq each subscription handled. A `reconnect` frame (a drain) is
//!   followed at once (or after its `retryAfterMs`), without backoff.
//! - **Acks.** An event is acked only after the application calls [`Received::handled`];
//!   acks are batched, at most one frame every `ack_interval` (`zerodrop.v2` and later: one
//!   frame for all streams; `zerodrop.v1`: one per stream), carrying the highest seq handled without a
//!   hole.
//! - **Dedupe and gaps.** A seq at or below the last delivered is dropped; a seq more than one
//!   past it makes the driver read the missing range with `GET …/events` (connect token)
//!   and deliver it first. A range the log no longer has ends the subscription with
//!   [`SubscriptionError::ReplayWindowTrimmed`].
//! - **End-to-end encryption** (feature `e2e`): sealed data is opened with the key of its key
//!   epoch; an event whose key is not there yet waits (with every later event of its stream)
//!   until [`Client::add_key`] brings it, for at most `key_timeout` and `key_buffer_events`.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use serde_json::value::RawValue;
use tokio::sync::{mpsc, oneshot};

use crate::backoff::Backoff;
use crate::consistency::{CheckError, StreamCheck, Verdict, check_stream};
use crate::error::{ApiError, ClientError};
use crate::frames::{
    Ack, ClientFrame, Event, PresenceAt, Refresh, ServerFrame, Subscribe, Subscribed, Unsubscribe,
};
use crate::http::HttpClient;
use crate::presence::{Next as PresenceNext, PresenceView, Tracker};
use crate::ws::{WsAuth, WsConnection};

/// The subprotocols the SDK offers, current first.
pub const OFFERED_PROTOCOLS: &str = "zerodrop.v3, zerodrop.v2, zerodrop.v1";

/// How a [`Client`] behaves; [`ClientOptions::default`] has the documented defaults.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// At most one ack frame this often (default 100 ms).
    pub ack_interval: Duration,
    /// Backoff base (default 250 ms).
    pub base_delay: Duration,
    /// Backoff cap (default 10 s).
    pub max_delay: Duration,
    /// One connection attempt, up to `welcome` (default 10 s).
    pub connect_timeout: Duration,
    /// Encrypted events that may wait for a key, per stream (default 1,000).
    pub key_buffer_events: usize,
    /// How long an event may wait for its key (default 10 s).
    pub key_timeout: Duration,
    /// The roots `https://`/`wss://` servers are checked against (default: the process-wide
    /// [`crate::Tls::current`]).
    #[cfg(feature = "tls")]
    pub tls: Option<crate::Tls>,
    /// Where fresh connect tokens come from. The server asks for one (`refresh`) before the
    /// current token's `exp`; without a source, or when it fails, the server closes the
    /// connection once `exp` plus its grace has passed and the subscriptions end with
    /// `TOKEN_EXPIRED` (default: none).
    pub token_source: Option<TokenSource>,
}

/// A source of fresh connect tokens for the same subject (typically a call to the
/// application's backend), used to answer the server's `refresh` and for the requests the
/// client makes with its connect token after that.
#[derive(Clone)]
pub struct TokenSource(Arc<dyn Fn() -> TokenFuture + Send + Sync>);

/// A fetch of a fresh connect token: the token, or why there is none.
type TokenFuture = Pin<Box<dyn Future<Output = Result<String, String>> + Send>>;

impl TokenSource {
    /// `fetch` returns a new connect token, or why it could not.
    pub fn new<F, Fut>(fetch: F) -> TokenSource
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<String, String>> + Send + 'static,
    {
        TokenSource(Arc::new(move || Box::pin(fetch())))
    }
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenSource")
    }
}

impl Default for ClientOptions {
    fn default() -> ClientOptions {
        ClientOptions {
            ack_interval: Duration::from_millis(100),
            base_delay: Duration::from_millis(250),
            max_delay: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            key_buffer_events: 1000,
            key_timeout: Duration::from_secs(10),
            #[cfg(feature = "tls")]
            tls: None,
            token_source: None,
        }
    }
}

/// Where a subscription starts.
#[derive(Clone, Debug, Default)]
pub struct SubscribeOptions {
    /// Replay what followed this seq first; `None` starts at the head (live only).
    pub after: Option<u64>,
    /// The epoch of the snapshot `after` was read from: another epoch is
    /// [`SubscriptionError::EpochChanged`] instead of a replay of meaningless seqs.
    pub epoch: Option<String>,
    /// Keep a view of the stream's presence members ([`Subscription::presence`]): a snapshot
    /// and the `presence` frames after it, current across reconnects (a stream with presence
    /// on the server, SPEC §10).
    pub presence: bool,
}

/// The last handled event of a subscription: subscribe again with `after: seq` and
/// `epoch` to miss nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Position {
    pub epoch: Option<String>,
    pub seq: u64,
}

/// Why a subscription ended. Every variant means the same thing: the application must resync
/// the stream from its own state (a snapshot) and subscribe again from there. Transient
/// conditions (drain, store outage, overload, network) never end a subscription.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SubscriptionError {
    /// The stream's log was recreated; positions of the old epoch mean nothing.
    #[error("EPOCH_CHANGED: the log of {stream} was recreated (epoch {epoch})")]
    EpochChanged { stream: String, epoch: String },
    /// What follows the position was trimmed from the log.
    #[error(
        "REPLAY_WINDOW_TRIMMED: {stream} no longer holds what followed the position (first available {first_available_seq:?})"
    )]
    ReplayWindowTrimmed {
        stream: String,
        first_available_seq: Option<u64>,
    },
    /// The store no longer has the session (e.g. Redis restarted empty). Every subscription
    /// of the client ends with it.
    #[error("SESSION_NOT_FOUND: the session is gone from the store")]
    SessionNotFound,
    /// The client was away longer than the reconnect window.
    #[error("RECONNECT_WINDOW_EXPIRED: away longer than the reconnect window")]
    ReconnectWindowExpired,
    /// Another connection resumed this session.
    #[error("SESSION_TAKEN_OVER: another connection resumed the session")]
    SessionTakenOver,
    /// The connect token (or the resume token) is invalid or expired.
    #[error("UNAUTHORIZED: {message}")]
    Unauthorized { message: String },
    /// An operator revoked the subject or the session: the client stops connecting.
    #[error("REVOKED: {message}")]
    Revoked { message: String },
    /// The token does not grant the stream.
    #[error("FORBIDDEN: {message}")]
    Forbidden { stream: String, message: String },
    /// The consistency check found the server's digest and its events disagree.
    #[error(
        "DIVERGED: {stream}: server says {server_count} events / {server_hash}, its events chain to {computed_count} / {computed_hash}"
    )]
    Diverged {
        stream: String,
        server_hash: String,
        computed_hash: String,
        server_count: u64,
        computed_count: u64,
    },
    /// An encrypted event's key epoch did not arrive within `key_timeout`.
    #[error("KEY_UNAVAILABLE: no key for {kid} arrived in time ({stream})")]
    KeyUnavailable { stream: String, kid: String },
    /// More than `key_buffer_events` events waited for a key.
    #[error("KEY_BUFFER_FULL: more than {limit} events of {stream} waited for a key")]
    KeyBufferFull { stream: String, limit: usize },
    /// Sealed data failed authentication (wrong key, altered, moved between streams).
    #[error("DECRYPT_FAILED: event {seq} of {stream}")]
    DecryptFailed { stream: String, seq: u64 },
    /// Data in the sealed shape with bad values.
    #[error("MALFORMED_SEALED: event {seq} of {stream}: {why}")]
    MalformedSealed {
        stream: String,
        seq: u64,
        why: String,
    },
    /// Any other code the server ended the stream with (e.g. `ACK_BEYOND_HEAD`).
    #[error("{code}: {message}")]
    Server { code: String, message: String },
}

impl SubscriptionError {
    /// The error code (docs/sdk.md, "Typed, terminal errors").
    pub fn code(&self) -> &str {
        match self {
            SubscriptionError::EpochChanged { .. } => "EPOCH_CHANGED",
            SubscriptionError::ReplayWindowTrimmed { .. } => "REPLAY_WINDOW_TRIMMED",
            SubscriptionError::SessionNotFound => "SESSION_NOT_FOUND",
            SubscriptionError::ReconnectWindowExpired => "RECONNECT_WINDOW_EXPIRED",
            SubscriptionError::SessionTakenOver => "SESSION_TAKEN_OVER",
            SubscriptionError::Unauthorized { .. } => "UNAUTHORIZED",
            SubscriptionError::Revoked { .. } => "REVOKED",
            SubscriptionError::Forbidden { .. } => "FORBIDDEN",
            SubscriptionError::Diverged { .. } => "DIVERGED",
            SubscriptionError::KeyUnavailable { .. } => "KEY_UNAVAILABLE",
            SubscriptionError::KeyBufferFull { .. } => "KEY_BUFFER_FULL",
            SubscriptionError::DecryptFailed { .. } => "DECRYPT_FAILED",
            SubscriptionError::MalformedSealed { .. } => "MALFORMED_SEALED",
            SubscriptionError::Server { code, .. } => code,
        }
    }

    /// The typed error for a server error body or frame about `stream`; `None` when the
    /// condition is transient (retried, never surfaced).
    fn from_api(e: &ApiError, stream: Option<&str>) -> Option<SubscriptionError> {
        Self::from_api_epoch(e, stream, None)
    }

    /// [`SubscriptionError::from_api`] with the epoch an `EPOCH_CHANGED` frame carries.
    fn from_api_epoch(
        e: &ApiError,
        stream: Option<&str>,
        epoch: Option<&str>,
    ) -> Option<SubscriptionError> {
        let stream = e
            .stream
            .as_deref()
            .or(stream)
            .unwrap_or_default()
            .to_string();
        Some(match e.code.as_str() {
            "DRAINING"
            | "STORE_UNAVAILABLE"
            | "OVER_CAPACITY"
            | "RATE_LIMITED"
            | "INTERNAL"
            | "UPSTREAM_UNAVAILABLE"
            | "" => return None,
            "EPOCH_CHANGED" => SubscriptionError::EpochChanged {
                stream,
                epoch: epoch.unwrap_or_default().to_string(),
            },
            "REPLAY_WINDOW_TRIMMED" => SubscriptionError::ReplayWindowTrimmed {
                stream,
                first_available_seq: e.first_available_seq,
            },
            "SESSION_NOT_FOUND" => SubscriptionError::SessionNotFound,
            "RECONNECT_WINDOW_EXPIRED" => SubscriptionError::ReconnectWindowExpired,
            "SESSION_TAKEN_OVER" => SubscriptionError::SessionTakenOver,
            "UNAUTHORIZED" | "INVALID_RESUME_TOKEN" => SubscriptionError::Unauthorized {
                message: e.message.clone(),
            },
            "REVOKED" => SubscriptionError::Revoked {
                message: e.message.clone(),
            },
            "FORBIDDEN" => SubscriptionError::Forbidden {
                stream,
                message: e.message.clone(),
            },
            code => SubscriptionError::Server {
                code: code.to_string(),
                message: e.message.clone(),
            },
        })
    }

    /// Whether a failed connection attempt (or a closed socket) is final.
    fn from_client(e: &ClientError, last_frame: Option<&ApiError>) -> Option<SubscriptionError> {
        match e {
            ClientError::Http { status, error, .. } => match status {
                401 | 403 => SubscriptionError::from_api(&coded(*status, error), None),
                _ => None,
            },
            ClientError::Frame(error) => SubscriptionError::from_api(error, None),
            ClientError::Closed {
                code: Some(code @ (4401 | 4403 | 4404 | 4409 | 4410)),
                ..
            } => {
                if let Some(f) = last_frame {
                    return SubscriptionError::from_api(f, None);
                }
                let code = match code {
                    4401 => "UNAUTHORIZED",
                    4403 => "FORBIDDEN",
                    4404 => "SESSION_NOT_FOUND",
                    4409 => "SESSION_TAKEN_OVER",
                    _ => "RECONNECT_WINDOW_EXPIRED",
                };
                SubscriptionError::from_api(
                    &ApiError {
                        code: code.into(),
                        message: format!("the server closed the socket with {code}"),
                        ..ApiError::default()
                    },
                    None,
                )
            }
            _ => None,
        }
    }

    /// The same error about another stream (a session-level error ends every subscription).
    fn for_stream(&self, other: &str) -> SubscriptionError {
        let mut e = self.clone();
        match &mut e {
            SubscriptionError::EpochChanged { stream, .. }
            | SubscriptionError::ReplayWindowTrimmed { stream, .. }
            | SubscriptionError::Forbidden { stream, .. }
            | SubscriptionError::Diverged { stream, .. }
            | SubscriptionError::KeyUnavailable { stream, .. }
            | SubscriptionError::KeyBufferFull { stream, .. }
            | SubscriptionError::DecryptFailed { stream, .. }
            | SubscriptionError::MalformedSealed { stream, .. } => *stream = other.to_string(),
            _ => {}
        }
        e
    }
}

/// `error` with the code its status implies when the body named none (a 401 or 403 from
/// something in front of the server).
fn coded(status: u16, error: &ApiError) -> ApiError {
    let mut error = error.clone();
    if error.code.is_empty() {
        match status {
            401 => error.code = "UNAUTHORIZED".into(),
            403 => error.code = "FORBIDDEN".into(),
            _ => {}
        }
    }
    error
}

/// One event given to the application. Call [`Received::handled`] once the application has
/// done what it does with it: only handled events are acked and count in the position.
#[derive(Debug)]
pub struct Received {
    pub stream: String,
    pub seq: u64,
    pub epoch: String,
    pub ts: u64,
    /// The application data as JSON text (opened, when it arrived sealed).
    pub data: Box<RawValue>,
    /// Whether `data` arrived sealed (feature `e2e`).
    pub encrypted: bool,
    /// The key epoch `data` was sealed under.
    pub kid: Option<String>,
    sub: u64,
    cmd: mpsc::UnboundedSender<Cmd>,
}

impl Received {
    /// The payload's bytes when it is a byte payload (`{"$base64"}`: a Durable Streams
    /// append, a binary publish), whichever frame carried it (a `zerodrop.v3` binary frame
    /// or the text form).
    pub fn bytes(&self) -> Option<Vec<u8>> {
        zerodrop_core::payload::data_bytes(self.data.get())
    }

    /// Marks the event handled: it may now be acked. Idempotent; events may be handled in any
    /// order (the ack carries the highest seq handled without a hole).
    pub fn handled(&self) {
        let _ = self.cmd.send(Cmd::Handled {
            stream: self.stream.clone(),
            sub: self.sub,
            seq: self.seq,
        });
    }

    /// `data` parsed as `T`.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_str(self.data.get())
    }
}

type Item = Result<Received, SubscriptionError>;

/// One stream's events in seq order, each once, as a [`futures_util::Stream`] (or with
/// [`Subscription::next`]). It yields `Err` once, when it ends for a reason the application
/// must handle, and then `None`; it yields `None` without an error when the client closed,
/// or when the stream was closed (`POST /v1/streams/{stream}/close`) and every event up to
/// its last was delivered: then [`Subscription::closed`] says so. Dropping it unsubscribes.
pub struct Subscription {
    stream: String,
    id: u64,
    presence: Option<PresenceView>,
    rx: mpsc::UnboundedReceiver<Item>,
    position: Arc<Mutex<Position>>,
    ended: Arc<Mutex<Option<u64>>>,
    cmd: mpsc::UnboundedSender<Cmd>,
}

impl Subscription {
    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// The next event, the terminal error, or `None` once ended.
    pub async fn next(&mut self) -> Option<Item> {
        self.rx.recv().await
    }

    /// The last handled event's position.
    pub fn position(&self) -> Position {
        lock(&self.position).clone()
    }

    /// The stream's members, kept current (subscribed with [`SubscribeOptions::presence`]).
    pub fn presence(&self) -> Option<PresenceView> {
        self.presence.clone()
    }

    /// The stream's last seq once the subscription ended because the stream was closed (a
    /// typed end, not an error: there is nothing to resync and nothing to reconnect for);
    /// `None` while it runs or when it ended otherwise.
    pub fn closed(&self) -> Option<u64> {
        *lock(&self.ended)
    }
}

impl futures_util::Stream for Subscription {
    type Item = Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Item>> {
        self.rx.poll_recv(cx)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let _ = self.cmd.send(Cmd::Unsubscribe {
            stream: std::mem::take(&mut self.stream),
            sub: self.id,
        });
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(feature = "e2e")]
type Keys = Arc<Mutex<HashMap<String, Arc<crate::e2e::GroupKey>>>>;

/// What the client, its subscriptions and events tell the driver.
enum Cmd {
    Subscribe {
        stream: String,
        sub: u64,
        opts: SubscribeOptions,
        tx: mpsc::UnboundedSender<Item>,
        position: Arc<Mutex<Position>>,
        presence: Option<Tracker>,
        ended: Arc<Mutex<Option<u64>>>,
    },
    Unsubscribe {
        stream: String,
        sub: u64,
    },
    Handled {
        stream: String,
        sub: u64,
        seq: u64,
    },
    /// A key was added: events waiting for one may now open.
    #[cfg(feature = "e2e")]
    KeysChanged,
    Fail {
        stream: String,
        error: SubscriptionError,
    },
    Close(oneshot::Sender<()>),
    /// What the [`TokenSource`] answered to the server's `refresh`.
    Refreshed(Result<String, String>),
}

/// State the client handle reads without asking the driver.
struct Shared {
    protocol: Mutex<String>,
    /// The session id and its newest resume token.
    session: Mutex<(String, String)>,
    url: AtomicUsize,
}

/// A zerodrop client: one WebSocket session (reconnected and resumed for as long as it
/// lives) serving any number of [`Subscription`]s. Dropping it closes it.
pub struct Client {
    cmd: mpsc::UnboundedSender<Cmd>,
    shared: Arc<Shared>,
    /// One per url, holding the newest connect token (shared with the driver).
    https: Arc<Mutex<Vec<HttpClient>>>,
    next_sub: AtomicU64,
    #[cfg(feature = "e2e")]
    keys: Keys,
    #[cfg(feature = "e2e")]
    publish_kid: Mutex<Option<String>>,
}

impl Client {
    /// Connects to `url` (`http(s)://host:port`) with a connect token, with the default
    /// [`ClientOptions`]. Returns once the session is open; a refused token is an error here
    /// (`ClientError::Http` 401/403), as is a server that cannot be reached.
    pub async fn connect(url: &str, connect_token: &str) -> Result<Client, ClientError> {
        Self::connect_with(&[url], connect_token, ClientOptions::default()).await
    }

    /// Connects to the first of `urls` that answers; each reconnect goes to the next one (so a
    /// drained instance hands its clients to the others).
    pub async fn connect_with(
        urls: &[&str],
        connect_token: &str,
        opts: ClientOptions,
    ) -> Result<Client, ClientError> {
        if urls.is_empty() {
            return Err(ClientError::InvalidUrl(
                "connect needs at least one url".into(),
            ));
        }
        let urls: Vec<String> = urls
            .iter()
            .map(|u| u.trim_end_matches('/').to_string())
            .collect();
        let https = Arc::new(Mutex::new(
            urls.iter()
                .map(|u| http_client(u, connect_token, &opts))
                .collect::<Result<Vec<_>, _>>()?,
        ));
        let mut last = None;
        let mut first = None;
        for (i, url) in urls.iter().enumerate() {
            match open(url, WsAuth::Token(connect_token.to_string()), &opts).await {
                Ok(c) => {
                    first = Some((i, c));
                    break;
                }
                Err(e @ ClientError::Http { .. })
                    if SubscriptionError::from_client(&e, None).is_some() =>
                {
                    return Err(e);
                }
                Err(e) => last = Some(e),
            }
        }
        let Some((idx, conn)) = first else {
            return Err(last.unwrap_or_else(|| ClientError::Network("no url answered".into())));
        };
        let shared = Arc::new(Shared {
            protocol: Mutex::new(conn.protocol().to_string()),
            session: Mutex::new((
                conn.session_id().to_string(),
                conn.resume_token().to_string(),
            )),
            url: AtomicUsize::new(idx),
        });
        let (tx, rx) = mpsc::unbounded_channel();
        #[cfg(feature = "e2e")]
        let keys: Keys = Arc::default();
        let driver = Driver {
            backoff: Backoff::new(opts.base_delay, opts.max_delay),
            urls,
            idx,
            token: connect_token.to_string(),
            https: https.clone(),
            resume_token: Some(conn.resume_token().to_string()),
            conn: Some(conn),
            subs: HashMap::new(),
            cmd_rx: rx,
            cmd_tx: tx.clone(),
            shared: shared.clone(),
            delay: Duration::ZERO,
            last_session_error: None,
            refused: None,
            fresh_needed: false,
            ack_due: false,
            #[cfg(feature = "e2e")]
            keys: keys.clone(),
            opts,
        };
        tokio::spawn(driver.run());
        Ok(Client {
            cmd: tx,
            shared,
            https,
            next_sub: AtomicU64::new(1),
            #[cfg(feature = "e2e")]
            keys,
            #[cfg(feature = "e2e")]
            publish_kid: Mutex::new(None),
        })
    }

    /// Subscribes to `stream` from its head (live only).
    pub fn subscribe(&self, stream: &str) -> Subscription {
        self.subscribe_with(stream, SubscribeOptions::default())
    }

    /// Subscribes to `stream` from a position (`after`, `epoch`). A second subscription to
    /// the same stream replaces the first (which ends).
    pub fn subscribe_with(&self, stream: &str, opts: SubscribeOptions) -> Subscription {
        let (tx, rx) = mpsc::unbounded_channel();
        let id = self.next_sub.fetch_add(1, Ordering::Relaxed);
        let position = Arc::new(Mutex::new(Position {
            epoch: opts.epoch.clone(),
            seq: opts.after.unwrap_or(0),
        }));
        let (tracker, view) = match opts.presence {
            true => {
                let (t, v) = Tracker::new();
                (Some(t), Some(v))
            }
            false => (None, None),
        };
        let ended = Arc::new(Mutex::new(None));
        let _ = self.cmd.send(Cmd::Subscribe {
            stream: stream.to_string(),
            sub: id,
            opts,
            tx,
            position: position.clone(),
            presence: tracker,
            ended: ended.clone(),
        });
        Subscription {
            stream: stream.to_string(),
            id,
            presence: view,
            rx,
            position,
            ended,
            cmd: self.cmd.clone(),
        }
    }

    /// The session's id and newest resume token (what `POST /v1/sessions/{id}/reconnect`
    /// and a later `WsConnection` resume take).
    pub fn session(&self) -> (String, String) {
        lock(&self.shared.session).clone()
    }

    /// The negotiated subprotocol of the current (or last) connection.
    pub fn protocol(&self) -> String {
        lock(&self.shared.protocol).clone()
    }

    /// The consistency check (docs/sdk.md): recomputes `stream`'s digest over the events the
    /// server serves and compares it with the server's `hash`/`count`. A
    /// [`Verdict::Diverged`] also ends the stream's subscription with
    /// [`SubscriptionError::Diverged`], forcing a resync.
    pub async fn verify(&self, stream: &str) -> Result<StreamCheck, CheckError> {
        let http = {
            let https = lock(&self.https);
            https[self.shared.url.load(Ordering::Relaxed) % https.len()].clone()
        };
        let http = &http;
        let check = check_stream(http, stream, 3).await?;
        if let Verdict::Diverged {
            server_hash,
            computed_hash,
            server_count,
            computed_count,
        } = &check.verdict
        {
            let _ = self.cmd.send(Cmd::Fail {
                stream: stream.to_string(),
                error: SubscriptionError::Diverged {
                    stream: stream.to_string(),
                    server_hash: server_hash.clone(),
                    computed_hash: computed_hash.clone(),
                    server_count: *server_count,
                    computed_count: *computed_count,
                },
            });
        }
        Ok(check)
    }

    /// Adds the group key of key epoch `kid` (1–64 characters of `[A-Za-z0-9._-]`); events
    /// waiting for it are opened and delivered in order.
    #[cfg(feature = "e2e")]
    pub fn add_key(&self, kid: &str, key: &[u8; 32]) -> Result<(), ClientError> {
        if !crate::e2e::valid_kid(kid) {
            return Err(ClientError::Protocol(format!(
                "kid {kid:?}: expected 1-64 characters of [A-Za-z0-9._-]"
            )));
        }
        lock(&self.keys).insert(kid.to_string(), Arc::new(crate::e2e::GroupKey::new(key)));
        let _ = self.cmd.send(Cmd::KeysChanged);
        Ok(())
    }

    /// The key epoch [`Client::seal`] seals under (its key must have been added).
    #[cfg(feature = "e2e")]
    pub fn set_publish_key(&self, kid: &str) -> Result<(), ClientError> {
        if !lock(&self.keys).contains_key(kid) {
            return Err(ClientError::Protocol(format!("no key for kid {kid}")));
        }
        *lock(&self.publish_kid) = Some(kid.to_string());
        Ok(())
    }

    /// Seals the JSON text `data_json` for `stream` under the publish key: the sealed JSON
    /// text to publish as the event's `data`.
    #[cfg(feature = "e2e")]
    pub fn seal(&self, stream: &str, data_json: &str) -> Result<String, ClientError> {
        serde_json::from_str::<&RawValue>(data_json)
            .map_err(|e| ClientError::Protocol(format!("data is not JSON: {e}")))?;
        let kid = lock(&self.publish_kid)
            .clone()
            .ok_or_else(|| ClientError::Protocol("no publish key: call set_publish_key".into()))?;
        let key = lock(&self.keys)
            .get(&kid)
            .cloned()
            .ok_or_else(|| ClientError::Protocol(format!("no key for kid {kid}")))?;
        let sealed = crate::e2e::seal_text(&key, &kid, stream, data_json, None);
        Ok(serde_json::to_string(&sealed).unwrap_or_default())
    }

    /// Sends what was handled but not yet acked, closes the socket and ends every
    /// subscription (they yield `None`).
    pub async fn close(self) {
        let (tx, rx) = oneshot::channel();
        if self.cmd.send(Cmd::Close(tx)).is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(2), rx).await;
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let (tx, _rx) = oneshot::channel();
        let _ = self.cmd.send(Cmd::Close(tx));
    }
}

fn http_client(url: &str, token: &str, opts: &ClientOptions) -> Result<HttpClient, ClientError> {
    let timeout = Duration::from_secs(10);
    #[cfg(feature = "tls")]
    if let Some(tls) = &opts.tls {
        return HttpClient::with_tls(url, Some(token.to_string()), timeout, tls);
    }
    let _ = opts;
    HttpClient::with_timeout(url, Some(token.to_string()), timeout)
}

async fn open(url: &str, auth: WsAuth, opts: &ClientOptions) -> Result<WsConnection, ClientError> {
    #[cfg(feature = "tls")]
    if let Some(tls) = &opts.tls {
        return WsConnection::connect_tls_offering(
            url,
            auth,
            opts.connect_timeout,
            tls,
            OFFERED_PROTOCOLS,
        )
        .await;
    }
    WsConnection::connect_offering(url, auth, opts.connect_timeout, OFFERED_PROTOCOLS).await
}

/// Event data ready for the application: the (opened) data, whether it was sealed, and
/// under which key epoch.
type Opened = (Box<RawValue>, bool, Option<String>);

/// One subscription's bookkeeping, owned by the driver.
struct Sub {
    id: u64,
    tx: mpsc::UnboundedSender<Item>,
    position: Arc<Mutex<Position>>,
    epoch: Option<String>,
    /// The last seq given to the application (`None`: not known yet).
    delivered: Option<u64>,
    /// The highest seq handled without a hole.
    handled: Option<u64>,
    /// Handled seqs above a hole.
    handled_ahead: BTreeSet<u64>,
    acked: u64,
    /// The current connection's session holds the stream (`subscribed` arrived).
    in_session: bool,
    /// Events received, not yet delivered (a gap being read, a key awaited).
    inbox: VecDeque<Event>,
    /// The first event waiting for a key: since when, and which key.
    waiting_key: Option<(Instant, String)>,
    /// A gap read failed transiently: try again at this time.
    retry_at: Option<Instant>,
    /// The wait between failed gap reads (reset by a read that succeeds).
    repair: Backoff,
    /// The presence view it keeps, if asked.
    presence: Option<Tracker>,
    /// A presence snapshot failed: take it again at this time.
    presence_retry: Option<Instant>,
    /// The server said the stream was closed at this seq: the subscription ends once every
    /// event up to it was delivered.
    closed_at: Option<u64>,
    /// Where the handle reads that it ended that way.
    ended: Arc<Mutex<Option<u64>>>,
}

impl Sub {
    fn publish_position(&self) {
        *lock(&self.position) = Position {
            epoch: self.epoch.clone(),
            seq: self.handled.unwrap_or(0),
        };
    }
}

enum Flow {
    Go,
    /// The connection is gone: reconnect after this long.
    Lost(Duration),
    /// The server asked the client to move (a drain): close politely, reconnect after this
    /// long (no backoff).
    Move(Duration),
    Closed,
}

struct Driver {
    urls: Vec<String>,
    idx: usize,
    token: String,
    opts: ClientOptions,
    https: Arc<Mutex<Vec<HttpClient>>>,
    conn: Option<WsConnection>,
    resume_token: Option<String>,
    subs: HashMap<String, Sub>,
    cmd_rx: mpsc::UnboundedReceiver<Cmd>,
    cmd_tx: mpsc::UnboundedSender<Cmd>,
    shared: Arc<Shared>,
    backoff: Backoff,
    /// The wait before the next connection attempt.
    delay: Duration,
    /// A session-level error frame, explaining the close that follows it.
    last_session_error: Option<ApiError>,
    /// The connect token was refused: no more connection attempts; new subscriptions end
    /// with this at once.
    refused: Option<SubscriptionError>,
    /// The session's connect token expired (`TOKEN_EXPIRED`) and a token source is set: the
    /// next attempt resumes with a fresh connect token from it.
    fresh_needed: bool,
    ack_due: bool,
    #[cfg(feature = "e2e")]
    keys: Keys,
}

impl Driver {
    async fn run(mut self) {
        let mut tick = tokio::time::interval(self.opts.ack_interval.max(Duration::from_millis(5)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        if let Some(mut c) = self.conn.take() {
            self.on_welcome(&mut c, false).await;
            self.conn = Some(c);
        }
        loop {
            let Some(mut conn) = self.conn.take() else {
                if let Flow::Closed = self.reconnect().await {
                    return;
                }
                continue;
            };
            let flow = tokio::select! {
                r = conn.recv() => match r {
                    Ok(frame) => self.on_frame(&mut conn, frame).await,
                    Err(e) => self.on_lost(e),
                },
                cmd = self.cmd_rx.recv() => self.on_cmd(Some(&mut conn), cmd).await,
                _ = tick.tick() => {
                    self.on_tick(Some(&mut conn)).await;
                    Flow::Go
                }
            };
            match flow {
                Flow::Go => self.conn = Some(conn),
                Flow::Lost(delay) | Flow::Move(delay) => {
                    self.resume_token = self
                        .resume_token
                        .take()
                        .map(|_| conn.resume_token().to_string());
                    if let Some(t) = &self.resume_token {
                        lock(&self.shared.session).1 = t.clone();
                    }
                    if let Flow::Move(_) = flow {
                        conn.close().await;
                    }
                    self.delay = delay;
                    self.idx = (self.idx + 1) % self.urls.len();
                    self.shared.url.store(self.idx, Ordering::Relaxed);
                }
                Flow::Closed => {
                    self.flush_acks(&mut conn).await;
                    conn.close().await;
                    return;
                }
            }
        }
    }

    /// Waits out the delay (serving commands meanwhile), then tries the current url once.
    async fn reconnect(&mut self) -> Flow {
        let until = tokio::time::Instant::now() + self.delay;
        let mut tick = tokio::time::interval(self.opts.ack_interval.max(Duration::from_millis(5)));
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(until), if self.refused.is_none() => break,
                cmd = self.cmd_rx.recv() => {
                    if let Flow::Closed = self.on_cmd(None, cmd).await {
                        return Flow::Closed;
                    }
                }
                _ = tick.tick() => self.on_tick(None).await,
            }
        }
        let resuming = self.resume_token.is_some();
        // A session whose connect token expired resumes with a fresh one (SPEC §9).
        let fresh = match (resuming && self.fresh_needed, &self.opts.token_source) {
            (true, Some(source)) => {
                match tokio::time::timeout(self.opts.connect_timeout, (source.0)()).await {
                    Ok(Ok(t)) => Some(t),
                    _ => {
                        // No fresh token: the session ends as it would without a source.
                        self.fresh_needed = false;
                        self.resume_token = None;
                        self.fail_all(&SubscriptionError::Server {
                            code: "TOKEN_EXPIRED".into(),
                            message: "the connect token expired and the token source gave no \
                                      fresh one"
                                .into(),
                        });
                        return Flow::Go;
                    }
                }
            }
            _ => None,
        };
        let auth = match &self.resume_token {
            Some(t) => WsAuth::Resume {
                token: fresh.clone(),
                resume_token: t.clone(),
                last_ack: self
                    .subs
                    .iter()
                    .filter(|(_, s)| s.in_session)
                    .filter_map(|(k, s)| s.handled.map(|h| (k.clone(), h)))
                    .collect(),
                presence: self
                    .subs
                    .iter()
                    .filter(|(_, s)| s.in_session)
                    .filter_map(|(k, s)| {
                        let (after, epoch) = s.presence.as_ref()?.position()?;
                        Some((k.clone(), PresenceAt { after, epoch }))
                    })
                    .collect(),
            },
            None => WsAuth::Token(self.token.clone()),
        };
        for s in self.subs.values_mut() {
            if !resuming {
                s.in_session = false;
            }
        }
        match open(&self.urls[self.idx], auth, &self.opts).await {
            Ok(mut c) => {
                if let Some(token) = fresh {
                    self.fresh_needed = false;
                    self.use_token(token);
                }
                self.resume_token = Some(c.resume_token().to_string());
                *lock(&self.shared.protocol) = c.protocol().to_string();
                *lock(&self.shared.session) =
                    (c.session_id().to_string(), c.resume_token().to_string());
                self.on_welcome(&mut c, resuming).await;
                self.conn = Some(c);
                self.delay = Duration::ZERO;
            }
            Err(e) => {
                let retry_after = match &e {
                    ClientError::Http { retry_after, .. } => retry_after.unwrap_or_default(),
                    _ => Duration::ZERO,
                };
                let err = SubscriptionError::from_client(&e, None);
                if resuming && fresh.is_none() && self.wants_fresh(err.as_ref()) {
                    // Resumed at once with a fresh token (no backoff: nothing failed but
                    // the token's age).
                    self.fresh_needed = true;
                    self.delay = Duration::ZERO;
                    return Flow::Go;
                }
                if let Some(err) = err {
                    self.fail_all(&err);
                    self.resume_token = None;
                    if !resuming {
                        // The connect token itself was refused: trying again cannot help.
                        self.refused = Some(err);
                    }
                }
                self.delay = self.backoff.next_delay(retry_after);
                self.idx = (self.idx + 1) % self.urls.len();
                self.shared.url.store(self.idx, Ordering::Relaxed);
            }
        }
        Flow::Go
    }

    /// A session is open: streams the session does not hold yet are subscribed from their
    /// position (a resumed session announces its own streams with `subscribed`).
    async fn on_welcome(&mut self, conn: &mut WsConnection, resumed: bool) {
        self.backoff.reset();
        self.last_session_error = None;
        let mut frames = Vec::new();
        for (stream, s) in self.subs.iter_mut() {
            if !resumed {
                s.in_session = false;
            }
            if !s.in_session {
                frames.push(subscribe_frame(stream, s));
            }
        }
        for f in frames {
            let _ = conn.send(&f).await;
        }
    }

    /// Whether `err` ends only the session's token, and a token source can renew it.
    fn wants_fresh(&self, err: Option<&SubscriptionError>) -> bool {
        self.opts.token_source.is_some()
            && self.resume_token.is_some()
            && err.is_some_and(|e| e.code() == "TOKEN_EXPIRED")
    }

    /// From now on the client uses `token` (its own HTTP requests too).
    fn use_token(&mut self, token: String) {
        let fresh: Result<Vec<HttpClient>, ClientError> = self
            .urls
            .iter()
            .map(|u| http_client(u, &token, &self.opts))
            .collect();
        if let Ok(fresh) = fresh {
            *lock(&self.https) = fresh;
        }
        self.token = token;
    }

    fn on_lost(&mut self, e: ClientError) -> Flow {
        let err = SubscriptionError::from_client(&e, self.last_session_error.as_ref());
        if self.wants_fresh(err.as_ref()) {
            self.last_session_error = None;
            self.fresh_needed = true;
            return Flow::Lost(Duration::ZERO);
        }
        if let Some(err) = err {
            self.fail_all(&err);
            self.resume_token = None;
            if let SubscriptionError::Revoked { .. } = err {
                // Connecting again cannot help: no loop.
                self.refused = Some(err);
            }
            return Flow::Lost(Duration::ZERO);
        }
        Flow::Lost(self.backoff.next_delay(Duration::ZERO))
    }

    async fn on_frame(&mut self, conn: &mut WsConnection, frame: ServerFrame) -> Flow {
        match frame {
            ServerFrame::Subscribed(Subscribed {
                stream,
                epoch,
                from_seq,
                presence_seq,
                ..
            }) => {
                let Some(s) = self.subs.get_mut(&stream) else {
                    return Flow::Go;
                };
                s.in_session = true;
                if let Some(known) = &s.epoch
                    && *known != epoch
                {
                    self.fail(
                        &stream,
                        SubscriptionError::EpochChanged {
                            stream: stream.clone(),
                            epoch,
                        },
                    );
                    return Flow::Go;
                }
                s.epoch = Some(epoch);
                if s.delivered.is_none() {
                    let before = from_seq.saturating_sub(1);
                    s.delivered = Some(before);
                    s.handled.get_or_insert(before);
                    s.acked = s.acked.max(before);
                }
                s.publish_position();
                if s.presence.as_ref().is_some_and(Tracker::needs_snapshot) {
                    if presence_seq.is_some() {
                        self.presence_snapshot(conn, &stream).await;
                    } else {
                        // Resumed without presence frames (no position yet): ask for them.
                        self.presence_resubscribe(conn, &stream).await;
                    }
                }
            }
            ServerFrame::Presence(f) => {
                let stream = f.stream.clone();
                let again = self
                    .subs
                    .get_mut(&stream)
                    .and_then(|s| s.presence.as_mut())
                    .is_some_and(|t| t.frame(f) == PresenceNext::Snapshot);
                if again {
                    self.presence_resubscribe(conn, &stream).await;
                }
            }
            ServerFrame::Error(f)
                if f.extra.get("presence") == Some(&serde_json::Value::Bool(true)) =>
            {
                // The presence frames stopped; the events go on. A log that started again or
                // was trimmed past the position: a fresh snapshot and the frames after it.
                // Anything else (no presence on the stream): the view ends.
                let Some(stream) = f.stream.clone() else {
                    return Flow::Go;
                };
                if matches!(f.code.as_str(), "EPOCH_CHANGED" | "REPLAY_WINDOW_TRIMMED") {
                    self.presence_resubscribe(conn, &stream).await;
                } else if let Some(s) = self.subs.get_mut(&stream) {
                    s.presence = None;
                }
            }
            ServerFrame::Event(e) => {
                let stream = e.stream.clone();
                if let Some(s) = self.subs.get_mut(&stream) {
                    s.inbox.push_back(e);
                    self.pump(&stream).await;
                }
            }
            ServerFrame::Closed(c) => {
                if let Some(s) = self.subs.get_mut(&c.stream) {
                    s.closed_at = Some(c.last_seq);
                    self.pump(&c.stream).await;
                }
            }
            ServerFrame::Reconnect(r) => {
                // A drain: everything in flight arrived before this frame. Go now, elsewhere.
                self.flush_acks(conn).await;
                return Flow::Move(Duration::from_millis(r.retry_after_ms));
            }
            ServerFrame::Error(f) => {
                let epoch = f.epoch.clone();
                self.on_error_frame(f.into(), epoch)
            }
            ServerFrame::Token(t) => lock(&self.shared.session).1 = t.resume_token,
            ServerFrame::Refresh(_) => {
                // Fetched aside: the events keep flowing while the backend mints the token.
                if let Some(source) = self.opts.token_source.clone() {
                    let tx = self.cmd_tx.clone();
                    tokio::spawn(async move {
                        let _ = tx.send(Cmd::Refreshed((source.0)().await));
                    });
                }
            }
            _ => {}
        }
        Flow::Go
    }

    /// The HTTP client of the url the driver is on now.
    fn http(&self) -> HttpClient {
        let https = lock(&self.https);
        https[self.idx % https.len()].clone()
    }

    /// Takes a snapshot of `stream`'s members (every page) and applies the frames that
    /// arrived before it; a snapshot that fails is taken again at the next `subscribed`.
    async fn presence_snapshot(&mut self, conn: &mut WsConnection, stream: &str) {
        let http = self.http();
        let mut pages = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            match http.presence(stream, cursor.as_deref(), None).await {
                Ok(p) => {
                    cursor = p.next_cursor.clone();
                    pages.push(p);
                    if cursor.is_none() {
                        break;
                    }
                }
                Err(_) => {
                    // Frames keep arriving meanwhile; the snapshot is taken again shortly.
                    if let Some(s) = self.subs.get_mut(stream) {
                        s.presence_retry =
                            Some(Instant::now() + s.repair.next_delay(Duration::ZERO));
                    }
                    return;
                }
            }
        }
        let again = self
            .subs
            .get_mut(stream)
            .and_then(|s| {
                s.presence_retry = None;
                s.presence.as_mut()
            })
            .is_some_and(|t| t.snapshot(pages) == PresenceNext::Snapshot);
        if again {
            self.presence_resubscribe(conn, stream).await;
        }
    }

    /// Starts `stream`'s presence over: subscribed again from the events' position, with
    /// presence frames from the head, then a snapshot.
    async fn presence_resubscribe(&mut self, conn: &mut WsConnection, stream: &str) {
        let Some(s) = self.subs.get_mut(stream) else {
            return;
        };
        if let Some(t) = s.presence.as_mut() {
            t.restart();
        }
        let f = subscribe_frame(stream, s);
        let _ = conn.send(&f).await;
    }

    fn on_error_frame(&mut self, e: ApiError, epoch: Option<String>) {
        if e.code == "INVALID_REQUEST" {
            return;
        }
        let Some(err) = SubscriptionError::from_api_epoch(&e, None, epoch.as_deref()) else {
            return; // transient: the server retries or closes, and the SDK reconnects
        };
        match e.stream.clone() {
            Some(stream) => {
                if let Some(s) = self.subs.get_mut(&stream) {
                    s.in_session = false;
                }
                self.fail(&stream, err);
            }
            None => self.last_session_error = Some(e),
        }
    }

    async fn on_cmd(&mut self, mut conn: Option<&mut WsConnection>, cmd: Option<Cmd>) -> Flow {
        let Some(cmd) = cmd else {
            return Flow::Closed;
        };
        match cmd {
            Cmd::Subscribe {
                stream,
                sub,
                opts,
                tx,
                position,
                presence,
                ended,
            } => {
                if let Some(err) = &self.refused {
                    let _ = tx.send(Err(err.for_stream(&stream)));
                    return Flow::Go;
                }
                if let Some(old) = self.subs.remove(&stream)
                    && old.in_session
                    && let Some(c) = conn.as_deref_mut()
                {
                    let _ = c
                        .send(&ClientFrame::Unsubscribe(Unsubscribe {
                            stream: stream.clone(),
                        }))
                        .await;
                }
                let s = Sub {
                    id: sub,
                    tx,
                    position,
                    epoch: opts.epoch,
                    delivered: opts.after,
                    handled: opts.after,
                    handled_ahead: BTreeSet::new(),
                    acked: opts.after.unwrap_or(0),
                    in_session: false,
                    inbox: VecDeque::new(),
                    waiting_key: None,
                    retry_at: None,
                    repair: Backoff::new(self.opts.base_delay, self.opts.max_delay),
                    presence,
                    presence_retry: None,
                    closed_at: None,
                    ended,
                };
                if let Some(c) = conn {
                    let _ = c.send(&subscribe_frame(&stream, &s)).await;
                }
                self.subs.insert(stream, s);
            }
            Cmd::Unsubscribe { stream, sub } => {
                if self.subs.get(&stream).is_some_and(|s| s.id == sub) {
                    let s = self.subs.remove(&stream);
                    if let (Some(c), Some(s)) = (conn, s)
                        && s.in_session
                    {
                        let _ = c
                            .send(&ClientFrame::Unsubscribe(Unsubscribe { stream }))
                            .await;
                    }
                }
            }
            Cmd::Handled { stream, sub, seq } => {
                if let Some(s) = self.subs.get_mut(&stream)
                    && s.id == sub
                {
                    let mut handled = s.handled.unwrap_or(seq.saturating_sub(1));
                    if seq > handled {
                        s.handled_ahead.insert(seq);
                        while s.handled_ahead.remove(&(handled + 1)) {
                            handled += 1;
                        }
                        s.handled = Some(handled);
                        s.publish_position();
                        self.ack_due = true;
                    }
                }
            }
            #[cfg(feature = "e2e")]
            Cmd::KeysChanged => {
                let streams: Vec<String> = self.subs.keys().cloned().collect();
                for s in streams {
                    self.pump(&s).await;
                }
            }
            Cmd::Fail { stream, error } => self.fail(&stream, error),
            Cmd::Close(done) => {
                if let Some(c) = conn {
                    self.flush_acks(c).await;
                }
                self.subs.clear();
                let _ = done.send(());
                return Flow::Closed;
            }
            // A source that failed sends nothing: the server's deadline then ends the
            // connection with `TOKEN_EXPIRED`, as without a source.
            Cmd::Refreshed(Ok(token)) => {
                self.use_token(token.clone());
                if let Some(c) = conn {
                    let _ = c.send(&ClientFrame::Refresh(Refresh { token })).await;
                }
            }
            Cmd::Refreshed(Err(_)) => {}
        }
        Flow::Go
    }

    async fn on_tick(&mut self, mut conn: Option<&mut WsConnection>) {
        if let Some(c) = conn.as_deref_mut()
            && self.ack_due
        {
            self.flush_acks(c).await;
        }
        let now = Instant::now();
        let mut expired = Vec::new();
        let mut retry = Vec::new();
        for (stream, s) in &self.subs {
            if let Some((since, kid)) = &s.waiting_key
                && now.duration_since(*since) >= self.opts.key_timeout
            {
                expired.push((stream.clone(), kid.clone()));
            }
            if s.retry_at.is_some_and(|t| now >= t) {
                retry.push(stream.clone());
            }
        }
        let presence_due: Vec<String> = self
            .subs
            .iter()
            .filter(|(_, s)| s.in_session && s.presence_retry.is_some_and(|t| now >= t))
            .map(|(k, _)| k.clone())
            .collect();
        if let Some(c) = conn {
            for stream in presence_due {
                self.presence_snapshot(c, &stream).await;
            }
        }
        for (stream, kid) in expired {
            let err = SubscriptionError::KeyUnavailable {
                stream: stream.clone(),
                kid,
            };
            self.fail(&stream, err);
        }
        for stream in retry {
            if let Some(s) = self.subs.get_mut(&stream) {
                s.retry_at = None;
            }
            self.pump(&stream).await;
        }
    }

    async fn flush_acks(&mut self, conn: &mut WsConnection) {
        self.ack_due = false;
        let mut acks = BTreeMap::new();
        for (stream, s) in self.subs.iter_mut() {
            if let Some(h) = s.handled
                && s.in_session
                && h > s.acked
            {
                acks.insert(stream.clone(), h);
                s.acked = h;
            }
        }
        if acks.is_empty() {
            return;
        }
        if conn.protocol() != crate::PROTOCOL {
            let _ = conn.send(&ClientFrame::Ack(Ack::batch(acks))).await;
        } else {
            for (stream, seq) in acks {
                let _ = conn.send(&ClientFrame::Ack(Ack::one(stream, seq))).await;
            }
        }
    }

    /// Ends one subscription with `err`.
    fn fail(&mut self, stream: &str, err: SubscriptionError) {
        if let Some(s) = self.subs.remove(stream) {
            let _ = s.tx.send(Err(err));
        }
    }

    /// Ends the subscription of a closed stream once everything up to its last seq was
    /// delivered: its handle yields `None` and [`Subscription::closed`] answers the last seq.
    fn end_if_closed(&mut self, stream: &str) {
        let Some(s) = self.subs.get(stream) else {
            return;
        };
        if let Some(last) = s.closed_at
            && s.inbox.is_empty()
            && s.delivered.unwrap_or(0) >= last
            && let Some(s) = self.subs.remove(stream)
        {
            *lock(&s.ended) = Some(last);
        }
    }

    fn fail_all(&mut self, err: &SubscriptionError) {
        for (stream, s) in self.subs.drain() {
            let _ = s.tx.send(Err(err.for_stream(&stream)));
        }
    }

    /// Delivers `stream`'s inbox in order: dedupe, gap repair, key waits.
    async fn pump(&mut self, stream: &str) {
        loop {
            let Some(s) = self.subs.get_mut(stream) else {
                return;
            };
            if s.retry_at.is_some() {
                return; // a gap read failed for now; the tick tries again
            }
            let Some(e) = s.inbox.front() else {
                self.end_if_closed(stream);
                return;
            };
            if let Some(known) = &s.epoch
                && *known != e.epoch
            {
                let epoch = e.epoch.clone();
                self.fail(
                    stream,
                    SubscriptionError::EpochChanged {
                        stream: stream.to_string(),
                        epoch,
                    },
                );
                return;
            }
            if let Some(d) = s.delivered {
                if e.seq <= d {
                    s.inbox.pop_front();
                    continue;
                }
                if e.seq > d + 1 {
                    let to = e.seq - 1;
                    match self.read_range(stream, d, to).await {
                        Ok(missing) => {
                            if let Some(s) = self.subs.get_mut(stream) {
                                s.repair.reset();
                                for m in missing.into_iter().rev() {
                                    s.inbox.push_front(m);
                                }
                            }
                            continue;
                        }
                        Err(Some(err)) => {
                            self.fail(stream, err);
                            return;
                        }
                        Err(None) => {
                            // Transient: the events stay where they are, in order; the tick
                            // tries again.
                            if let Some(s) = self.subs.get_mut(stream) {
                                s.retry_at =
                                    Some(Instant::now() + s.repair.next_delay(Duration::ZERO));
                            }
                            return;
                        }
                    }
                }
            }
            let opened = match self.open_data(stream) {
                Ok(Some(o)) => o,
                Ok(None) => return, // waiting for a key
                Err(err) => {
                    self.fail(stream, err);
                    return;
                }
            };
            let Some(s) = self.subs.get_mut(stream) else {
                return;
            };
            let Some(e) = s.inbox.pop_front() else {
                return;
            };
            s.waiting_key = None;
            if s.epoch.is_none() {
                s.epoch = Some(e.epoch.clone());
            }
            s.delivered = Some(e.seq);
            if s.handled.is_none() {
                s.handled = Some(e.seq - 1);
            }
            let (data, encrypted, kid) = opened;
            let r = Received {
                stream: e.stream,
                seq: e.seq,
                epoch: e.epoch,
                ts: e.ts,
                data,
                encrypted,
                kid,
                sub: s.id,
                cmd: self.cmd_tx.clone(),
            };
            if s.tx.send(Ok(r)).is_err() {
                // The application dropped the subscription; its Drop unsubscribes.
                return;
            }
        }
    }

    /// The data of the inbox's first event, opened when sealed; `Ok(None)` when its key is not
    /// there yet (the event waits).
    #[cfg(feature = "e2e")]
    fn open_data(&mut self, stream: &str) -> Result<Option<Opened>, SubscriptionError> {
        use crate::e2e::{E2eError, open_text, parse_sealed};
        let limit = self.opts.key_buffer_events;
        let Some(s) = self.subs.get_mut(stream) else {
            return Ok(None);
        };
        let Some(e) = s.inbox.front() else {
            return Ok(None);
        };
        let (seq, stream_s) = (e.seq, stream.to_string());
        let malformed = |why: String| SubscriptionError::MalformedSealed {
            stream: stream_s.clone(),
            seq,
            why,
        };
        let sealed = match parse_sealed(&e.data) {
            Ok(None) => return Ok(Some((e.data.clone(), false, None))),
            Ok(Some(sealed)) => sealed,
            Err(E2eError::Malformed(why)) => return Err(malformed(why)),
            Err(E2eError::DecryptFailed) => return Err(malformed("undecodable".into())),
        };
        let key = lock(&self.keys).get(&sealed.kid).cloned();
        let Some(key) = key else {
            if s.inbox.len() > limit {
                return Err(SubscriptionError::KeyBufferFull {
                    stream: stream.to_string(),
                    limit,
                });
            }
            if s.waiting_key.is_none() {
                s.waiting_key = Some((Instant::now(), sealed.kid.clone()));
            }
            return Ok(None);
        };
        let decrypt_failed = || SubscriptionError::DecryptFailed {
            stream: stream.to_string(),
            seq,
        };
        let text = open_text(&key, stream, &sealed).map_err(|err| match err {
            E2eError::Malformed(why) => malformed(why),
            E2eError::DecryptFailed => decrypt_failed(),
        })?;
        let data = RawValue::from_string(text).map_err(|_| decrypt_failed())?;
        Ok(Some((data, true, Some(sealed.kid))))
    }

    #[cfg(not(feature = "e2e"))]
    fn open_data(&mut self, stream: &str) -> Result<Option<Opened>, SubscriptionError> {
        Ok(self
            .subs
            .get(stream)
            .and_then(|s| s.inbox.front())
            .map(|e| (e.data.clone(), false, None)))
    }

    /// Reads `(after, to]` of `stream` over HTTP. `Err(Some)` ends the subscription;
    /// `Err(None)` is transient (try again later).
    async fn read_range(
        &mut self,
        stream: &str,
        after: u64,
        to: u64,
    ) -> Result<Vec<Event>, Option<SubscriptionError>> {
        let mut out = Vec::new();
        let mut at = after;
        let http = &self.http();
        while at < to {
            let limit = (to - at).min(1000) as u32;
            let page = match http.read_events(stream, at, limit, None).await {
                Ok(p) => p,
                Err(e) => {
                    return Err(match &e {
                        ClientError::Http { status, error, .. } => {
                            SubscriptionError::from_api(&coded(*status, error), Some(stream))
                        }
                        _ => None,
                    });
                }
            };
            let Some(first) = page.events.first() else {
                // The server served `to + 1` but its log reads short: try again later.
                return Err(None);
            };
            if first.seq > at + 1 {
                return Err(Some(SubscriptionError::ReplayWindowTrimmed {
                    stream: stream.to_string(),
                    first_available_seq: Some(first.seq),
                }));
            }
            for e in page.events {
                if e.seq > to {
                    break;
                }
                at = e.seq;
                out.push(e);
            }
        }
        Ok(out)
    }
}

fn subscribe_frame(stream: &str, s: &Sub) -> ClientFrame {
    let at = s.presence.as_ref().and_then(Tracker::position);
    ClientFrame::Subscribe(Subscribe {
        stream: stream.to_string(),
        after: s.handled,
        epoch: s.epoch.clone(),
        presence: s.presence.is_some(),
        presence_after: at.as_ref().map(|a| a.0),
        presence_epoch: at.and_then(|a| a.1),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_codes_map_to_typed_errors_and_transient_ones_to_none() {
        let api = |code: &str| ApiError {
            code: code.into(),
            message: "m".into(),
            stream: Some("a".into()),
            first_available_seq: Some(7),
        };
        for transient in [
            "DRAINING",
            "STORE_UNAVAILABLE",
            "OVER_CAPACITY",
            "RATE_LIMITED",
        ] {
            assert_eq!(SubscriptionError::from_api(&api(transient), None), None);
        }
        assert_eq!(
            SubscriptionError::from_api(&api("REPLAY_WINDOW_TRIMMED"), None),
            Some(SubscriptionError::ReplayWindowTrimmed {
                stream: "a".into(),
                first_available_seq: Some(7)
            })
        );
        assert_eq!(
            SubscriptionError::from_api(&api("EPOCH_CHANGED"), None)
                .unwrap()
                .code(),
            "EPOCH_CHANGED"
        );
        let closed = ClientError::Closed {
            code: Some(4404),
            reason: String::new(),
        };
        assert_eq!(
            SubscriptionError::from_client(&closed, None),
            Some(SubscriptionError::SessionNotFound)
        );
        let drain = ClientError::Closed {
            code: Some(1012),
            reason: String::new(),
        };
        assert_eq!(SubscriptionError::from_client(&drain, None), None);
        let refused = ClientError::Http {
            status: 401,
            error: ApiError::default(),
            retry_after: None,
        };
        assert_eq!(
            SubscriptionError::from_client(&refused, None)
                .unwrap()
                .code(),
            "UNAUTHORIZED"
        );
        let busy = ClientError::Http {
            status: 503,
            error: api("DRAINING"),
            retry_after: None,
        };
        assert_eq!(SubscriptionError::from_client(&busy, None), None);
    }
}
