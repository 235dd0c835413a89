//! The application state every transport shares, and the session rules they all call.
//!
//! One behaviour, one place: opening a session, taking one over with a resume token, and
//! deciding where a resumed stream starts ([`App::stream_start`]) are written once here and
//! used by WebSocket, SSE and HTTP alike.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::value::RawValue;
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;
use zerodrop_core::window::{WindowError, newly_dropped, replay_window};
use zerodrop_core::{ErrorCode, Grants, Seq, SessionId, StreamId, now_ms};
use zerodrop_store::{
    AppendOutcome, AppendRequest, IdempotencyKey, SessionRecord, SessionStream, Store, StoreKind,
};

use crate::auth::Auth;
use crate::config::Config;
use crate::drain::{Connections, Drain};
use crate::error::ApiError;
use crate::live::Hub;
use crate::metrics::{Metrics, StoreFacts, Transport};

pub struct App {
    pub cfg: Config,
    pub instance: String,
    pub store: Arc<dyn Store>,
    pub hub: Arc<Hub>,
    pub metrics: Arc<Metrics>,
    pub auth: Auth,
    pub drain: Drain,
    pub conns: Connections,
    pub store_up: AtomicBool,
    /// Which connection on this instance holds each session, so a resume can take it over.
    holders: Mutex<HashMap<SessionId, Holder>>,
    /// Names this process's connections in holder notices (instance ids may be reused).
    holder_prefix: String,
    next_conn_id: AtomicU64,
}

/// A WebSocket connection holding a session on this instance.
struct Holder {
    conn: u64,
    /// Closes the connection with `SESSION_TAKEN_OVER`.
    kick: oneshot::Sender<()>,
    /// Our own holder notice came back through the shared store: any notice for this
    /// session heard after it is from a newer connection elsewhere. Notices heard before it
    /// were sent before ours, by connections older than this one, and change nothing.
    confirmed: bool,
}

/// Where a resumed (or newly subscribed) stream starts.
#[derive(Clone, Debug)]
pub struct StreamStart {
    pub epoch: zerodrop_core::Epoch,
    /// Deliver events after this seq.
    pub after: Seq,
    pub head: Seq,
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

impl App {
    pub fn new(
        cfg: Config,
        instance: String,
        store: Arc<dyn Store>,
        hub: Arc<Hub>,
        metrics: Arc<Metrics>,
        auth: Auth,
    ) -> App {
        let max = cfg.max_connections;
        App {
            cfg,
            instance,
            store,
            hub,
            metrics,
            auth,
            drain: Drain::new(),
            conns: Connections::new(max),
            store_up: AtomicBool::new(true),
            holders: Mutex::new(HashMap::new()),
            holder_prefix: hex::encode(zerodrop_core::random_bytes::<6>()),
            next_conn_id: AtomicU64::new(1),
        }
    }

    pub fn window(&self) -> Duration {
        Duration::from_secs(self.cfg.reconnect_window_sec)
    }

    pub fn store_kind(&self) -> StoreKind {
        self.store.kind()
    }

    pub fn next_conn_id(&self) -> u64 {
        self.next_conn_id.fetch_add(1, Ordering::Relaxed)
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

    pub fn mint_token(&self, sid: &SessionId, sub: &str) -> String {
        self.auth
            .mint_resume(sid, sub, self.cfg.reconnect_window_sec)
    }

    pub async fn touch(&self, sid: &SessionId) {
        let until = now_ms() + self.cfg.reconnect_window_sec * 1000;
        if let Err(e) = self.store.touch_session(sid, until).await {
            tracing::debug!(error = %e, "could not extend a session's reconnect window");
        }
    }

    /// Creates a session for `sub` holding `streams`, each starting at its current head.
    pub async fn open_session(
        &self,
        sub: &str,
        grants: Grants,
        streams: &[StreamId],
    ) -> Result<SessionRecord, ApiError> {
        if streams.len() > self.cfg.max_streams_per_session {
            return Err(ApiError::invalid(format!(
                "a session holds at most {} streams",
                self.cfg.max_streams_per_session
            )));
        }
        let mut rec = SessionRecord {
            id: SessionId::generate(),
            sub: sub.to_string(),
            grants,
            created_at_ms: now_ms(),
            expires_at_ms: now_ms() + self.cfg.reconnect_window_sec * 1000,
            streams: Default::default(),
        };
        for s in streams {
            if !rec.grants.may_subscribe(s.as_str()) {
                return Err(
                    ApiError::forbidden(format!("stream {s} is not allowed by the token"))
                        .with("stream", s.as_str()),
                );
            }
            let info = self.store.stream_info(s).await?;
            rec.streams.insert(
                s.clone(),
                SessionStream {
                    epoch: info.epoch,
                    ack: info.head,
                    dropped_through: Seq(0),
                },
            );
        }
        self.store.create_session(rec.clone()).await?;
        Ok(rec)
    }

    /// Takes over a session with a resume token. Counts a failure (with its code) for
    /// `transport`; the caller counts the success once the connection is really resumed.
    pub async fn resume(
        &self,
        token: &str,
        expected: Option<&SessionId>,
        transport: Transport,
    ) -> Result<SessionRecord, ApiError> {
        let r = self.resume_inner(token, expected).await;
        if let Err(e) = &r {
            self.metrics.resume_failed(transport, e.code);
            tracing::info!(transport = transport.as_str(), code = %e.code, "resume failed");
        }
        r
    }

    async fn resume_inner(
        &self,
        token: &str,
        expected: Option<&SessionId>,
    ) -> Result<SessionRecord, ApiError> {
        let session = self.session_for(token, expected).await?;
        self.touch(&session.id).await;
        Ok(session)
    }

    /// The session a resume token stands for, checked: signature, expiry, existence, owner.
    pub async fn session_for(
        &self,
        token: &str,
        expected: Option<&SessionId>,
    ) -> Result<SessionRecord, ApiError> {
        let claims = self.auth.verify_resume(token, expected)?;
        let session = self.store.load_session(&claims.sid).await?.ok_or_else(|| {
            ApiError::new(
                ErrorCode::SessionNotFound,
                "no such session (the store may have restarted empty); start a new session",
            )
        })?;
        if session.sub != claims.sub {
            return Err(ApiError::new(
                ErrorCode::InvalidResumeToken,
                "the resume token does not match the session",
            ));
        }
        if session.expires_at_ms <= now_ms() {
            return Err(ApiError::new(
                ErrorCode::ReconnectWindowExpired,
                "the session's reconnect window has passed; start a new session and resync",
            ));
        }
        Ok(session)
    }

    /// The resume rule for one stream of a session: the window starts after the client's
    /// `lastAck` when it gives one (the client knows best what it holds; a value above the
    /// stored ack is also applied as a checkpoint, one below never regresses it), else after
    /// the stored ack; it must be in the same epoch and still retained. A trimmed window
    /// counts its lost events once per session.
    pub async fn stream_start(
        &self,
        session: &SessionRecord,
        stream: &StreamId,
        client_ack: Option<Seq>,
    ) -> Result<StreamStart, ApiError> {
        let Some(ss) = session.streams.get(stream) else {
            return Err(
                ApiError::forbidden("the stream is not part of this session")
                    .with("stream", stream.as_str()),
            );
        };
        let info = self.store.stream_info(stream).await?;
        if ss.epoch != info.epoch {
            let e = WindowError::EpochChanged {
                current: info.epoch.clone(),
            };
            return Err(ApiError::window(e, stream.as_str()));
        }
        let after = client_ack.unwrap_or(ss.ack);
        if after > info.head {
            return Err(ApiError::beyond_head(after, info.head, stream.as_str()));
        }
        if after > ss.ack {
            match self.store.checkpoint(&session.id, stream, after).await {
                Ok(u) => self.metrics.checkpoint(u.is_applied()),
                Err(e) => return Err(ApiError::from(e).with("stream", stream.as_str())),
            }
        }
        match replay_window(after, Some(&ss.epoch), &info.bounds()) {
            Ok(_) => Ok(StreamStart {
                epoch: info.epoch,
                after,
                head: info.head,
            }),
            Err(e) => {
                if let WindowError::Trimmed {
                    first_available, ..
                } = &e
                {
                    let n = newly_dropped(after, *first_available, ss.dropped_through);
                    if n > 0 {
                        self.metrics.dropped(n);
                        let through = Seq(first_available.0 - 1);
                        if let Err(err) =
                            self.store.mark_dropped(&session.id, stream, through).await
                        {
                            tracing::debug!(error = %err, "could not record counted drops");
                        }
                    }
                }
                Err(ApiError::window(e, stream.as_str()))
            }
        }
    }

    /// Appends one event (HTTP publish and WebSocket `publish` frames).
    pub async fn publish(
        &self,
        stream: StreamId,
        data: &RawValue,
        idempotency_key: Option<String>,
    ) -> Result<AppendOutcome, ApiError> {
        let data = zerodrop_core::json::compact(data.get());
        if data.len() > self.cfg.max_payload_bytes {
            return Err(ApiError::new(
                ErrorCode::PayloadTooLarge,
                format!(
                    "data is {} bytes; the limit is {}",
                    data.len(),
                    self.cfg.max_payload_bytes
                ),
            ));
        }
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

    fn holders(&self) -> std::sync::MutexGuard<'_, HashMap<SessionId, Holder>> {
        self.holders.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn holder_name(&self, conn: u64) -> String {
        format!("{}-{conn}", self.holder_prefix)
    }

    /// Registers `conn` as the holder of `sid` on this instance; an earlier holder here is
    /// told to close. With a shared store the other instances are told too (best effort), so
    /// a holder there closes as well. Returns the signal this connection gets when it is taken
    /// over in turn.
    pub fn hold_session(&self, sid: &SessionId, conn: u64) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        let holder = Holder {
            conn,
            kick: tx,
            confirmed: false,
        };
        let previous = self.holders().insert(sid.clone(), holder);
        if let Some(old) = previous {
            let _ = old.kick.send(());
        }
        if self.store_kind() == StoreKind::Redis {
            let (store, sid, name) = (self.store.clone(), sid.clone(), self.holder_name(conn));
            tokio::spawn(async move {
                if let Err(e) = store.announce_holder(&sid, &name).await {
                    tracing::debug!(error = %e, "could not announce a session holder");
                }
            });
        }
        rx
    }

    pub fn release_session(&self, sid: &SessionId, conn: u64) {
        let mut h = self.holders();
        if h.get(sid).is_some_and(|x| x.conn == conn) {
            h.remove(sid);
        }
    }

    /// A holder notice from the shared store (ours included, in one order for every
    /// instance): a newer connection anywhere closes ours with `SESSION_TAKEN_OVER`.
    pub fn session_held(&self, sid: &SessionId, holder: &str) {
        let mut h = self.holders();
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
            let _ = old.kick.send(());
        }
    }

    pub async fn metrics_json(&self) -> serde_json::Value {
        let stats = self.store.stats().await.unwrap_or_default();
        self.metrics.json(
            StoreFacts {
                kind: self.store_kind().as_str(),
                up: self.store_up.load(Ordering::Relaxed),
                sessions: stats.sessions,
                streams: stats.streams,
            },
            self.drain.blocked_total(),
        )
    }
}

#[cfg(test)]
mod tests {
    use tokio::sync::oneshot::error::TryRecvError;

    use super::*;
    use crate::config::StoreChoice;

    #[tokio::test]
    async fn holder_notices_close_only_a_holder_whose_own_notice_came_first() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut cfg = Config::for_tests(dir.path());
        cfg.store = StoreChoice::Memory;
        let (app, _) = crate::server::build(cfg).await.expect("app");
        let sid = SessionId::generate();
        let mut kicked = app.hold_session(&sid, 7);
        // Heard before our own notice: sent earlier, by an older connection elsewhere.
        app.session_held(&sid, "0a0b0c-3");
        assert_eq!(kicked.try_recv(), Err(TryRecvError::Empty));
        app.session_held(&sid, &app.holder_name(7));
        // Our own connections settle takeovers locally, whatever order their notices take.
        app.session_held(&sid, &app.holder_name(6));
        assert_eq!(kicked.try_recv(), Err(TryRecvError::Empty));
        // A newer connection elsewhere.
        app.session_held(&sid, "0a0b0c-9");
        assert_eq!(kicked.try_recv(), Ok(()));
        // A local takeover closes the older local holder at once.
        let mut first = app.hold_session(&sid, 10);
        let _second = app.hold_session(&sid, 11);
        assert_eq!(first.try_recv(), Ok(()));
    }
}
