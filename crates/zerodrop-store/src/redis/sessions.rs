//! Sessions and checkpoints: a session hash per id whose TTL follows its reconnect window,
//! each subject's live sessions in a sorted set that one script prunes, counts against the cap
//! and joins (`lua::SUBJECT_OPEN`, the cap rule of [`crate::SessionCap`] spelled out on the
//! server), a session's streams, and acks decided by [`crate::rules::apply_checkpoint`] on a
//! snapshot and committed by compare-and-set.
//!
//! Must not: decide a rule in Rust that `crate::rules` holds, or move an ack without the
//! compare-and-set.

use std::collections::{BTreeMap, HashMap};

use ::redis::Value;
use futures_util::StreamExt;
use zerodrop_core::{AckUpdate, Epoch, Grants, Seq, SessionId, StreamId};

use super::Shared;
use super::conn::{Call, as_array, as_str, as_u64, unexpected};
use super::keys::{SESSIONS_INDEX, session_key, stream_field, subject_key};
use crate::rules::apply_checkpoint;
use crate::{SessionCap, SessionRecord, SessionStream, StoreError, StoreResult};

/// A session is kept at least this long after it was created or touched, however old its
/// expiry (the other stores delete expired sessions in a sweep that runs about this often).
pub(super) const SESSION_MIN_KEEP_MS: u64 = 60_000;
/// Checkpoint compare-and-set attempts before giving up.
pub(super) const CAS_ATTEMPTS: usize = 16;
/// Written-behind acks applied concurrently by `checkpoint_many`.
pub(super) const CHECKPOINTS_AT_ONCE: usize = 32;

pub(super) fn encode_session_stream(st: &SessionStream) -> String {
    format!("{} {} {}", st.epoch, st.ack.0, st.dropped_through.0)
}

pub(super) fn decode_session_stream(v: &str) -> Option<SessionStream> {
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

impl Shared {
    /// The subject's count and the session live in different slots (sessions are tagged by
    /// id, subjects by subject), so they are two scripts: first the subject's set admits the
    /// session atomically (the cap holds however many instances open sessions at once), then
    /// the session is written. A session write that fails takes its place back (best effort:
    /// a place left behind only counts until the window it was given ends).
    pub(super) async fn create_session_within(
        &self,
        session: SessionRecord,
        cap: SessionCap,
    ) -> StoreResult<()> {
        let now = self.opts.clock.now_ms();
        let subject = subject_key(&session.sub);
        let admit = Call::new(&self.scripts.subject_open)
            .key(subject.as_str())
            .arg(now)
            .arg(cap.0)
            .arg(session.id.as_str())
            .arg(session.expires_at_ms);
        let verdict = as_array(self.eval("open session", &admit).await?)
            .ok_or_else(|| unexpected("open session"))?;
        match verdict.first().and_then(as_u64) {
            Some(1) => {}
            Some(0) => {
                let earliest = verdict.get(1).and_then(as_u64).unwrap_or(now);
                return cap.check(u64::from(cap.0), earliest, now);
            }
            _ => return Err(unexpected("open session")),
        }
        let created = self.write_session(&session).await;
        if created.is_err() {
            let mut conn = self.conn.clone();
            let _ = self
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

    pub(super) async fn load_session(&self, id: &SessionId) -> StoreResult<Option<SessionRecord>> {
        let mut conn = self.conn.clone();
        let key = session_key(id);
        let fields: HashMap<String, String> = self
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

    pub(super) async fn put_session_stream(
        &self,
        id: &SessionId,
        stream: &StreamId,
        state: SessionStream,
    ) -> StoreResult<()> {
        let call = Call::new(&self.scripts.session_put)
            .key(session_key(id))
            .arg(stream_field(stream))
            .arg(encode_session_stream(&state));
        match self.eval("put session stream", &call).await? {
            Value::Int(1) => Ok(()),
            Value::Int(0) => Err(StoreError::SessionNotFound),
            _ => Err(unexpected("put session stream")),
        }
    }

    pub(super) async fn remove_session_stream(
        &self,
        id: &SessionId,
        stream: &StreamId,
    ) -> StoreResult<()> {
        let mut conn = self.conn.clone();
        self.run("remove session stream", async {
            ::redis::cmd("HDEL")
                .arg(session_key(id))
                .arg(stream_field(stream))
                .query_async::<Value>(&mut conn)
                .await
        })
        .await?;
        Ok(())
    }

    pub(super) async fn checkpoint(
        &self,
        id: &SessionId,
        stream: &StreamId,
        seq: Seq,
    ) -> StoreResult<AckUpdate> {
        let key = session_key(id);
        let field = stream_field(stream);
        for _ in 0..CAS_ATTEMPTS {
            let mut conn = self.conn.clone();
            let read_session = self.run("checkpoint", async {
                ::redis::cmd("HMGET")
                    .arg(&key)
                    .arg("sub")
                    .arg(&field)
                    .query_async::<(Option<String>, Option<String>)>(&mut conn)
                    .await
            });
            let (session, info) = tokio::join!(read_session, self.info(stream));
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
            let call = Call::new(&self.scripts.session_cas)
                .key(key.as_str())
                .arg(field.as_str())
                .arg(stored.as_str())
                .arg(encode_session_stream(&ss));
            if let Value::Int(1) = self.eval("checkpoint", &call).await? {
                return Ok(update);
            }
        }
        Err(StoreError::Unavailable(
            "checkpoint: the session stream kept changing".into(),
        ))
    }

    pub(super) async fn checkpoint_many(
        &self,
        acks: Vec<(SessionId, StreamId, Seq)>,
    ) -> StoreResult<usize> {
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

    pub(super) async fn set_session_grants(
        &self,
        id: &SessionId,
        grants: &Grants,
    ) -> StoreResult<()> {
        let grants = serde_json::to_string(grants).unwrap_or_else(|_| "{}".into());
        let call = Call::new(&self.scripts.session_grants)
            .key(session_key(id))
            .arg(grants);
        match self.eval("set session grants", &call).await? {
            Value::Int(1) => Ok(()),
            _ => Err(StoreError::SessionNotFound),
        }
    }

    pub(super) async fn touch_session(
        &self,
        id: &SessionId,
        expires_at_ms: u64,
    ) -> StoreResult<()> {
        let deadline = self.session_deadline(expires_at_ms);
        let call = Call::new(&self.scripts.session_touch)
            .key(session_key(id))
            .arg(expires_at_ms)
            .arg(self.keep_for(deadline));
        let Some(sub) = as_str(&self.eval("touch session", &call).await?).map(str::to_string)
        else {
            return Ok(());
        };
        self.index_session(id, deadline, true).await;
        // The subject's set follows (best effort, like the stats index: a session missing its
        // new end there only stops counting against the cap when its first window ends).
        let subject = Call::new(&self.scripts.subject_touch)
            .key(subject_key(&sub))
            .arg(id.as_str())
            .arg(expires_at_ms)
            .arg(self.opts.clock.now_ms());
        if let Err(e) = self.eval("touch subject", &subject).await {
            tracing::debug!(session = %id, error = %e, "subject's session set not updated");
        }
        Ok(())
    }

    pub(super) async fn mark_dropped(
        &self,
        id: &SessionId,
        stream: &StreamId,
        through: Seq,
    ) -> StoreResult<()> {
        let call = Call::new(&self.scripts.session_dropped)
            .key(session_key(id))
            .arg(stream_field(stream))
            .arg(through.0);
        self.eval("mark dropped", &call).await?;
        Ok(())
    }

    /// Writes the session hash (replacing one with the same id) and indexes it for stats.
    pub(super) async fn write_session(&self, session: &SessionRecord) -> StoreResult<()> {
        let deadline = self.session_deadline(session.expires_at_ms);
        let grants = serde_json::to_string(&session.grants).unwrap_or_else(|_| "{}".into());
        let mut call = Call::new(&self.scripts.session_create)
            .key(session_key(&session.id))
            .arg(self.keep_for(deadline))
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

    pub(super) fn session_deadline(&self, expires_at_ms: u64) -> u64 {
        expires_at_ms
            .saturating_add(self.opts.session_grace_ms)
            .max(self.opts.clock.now_ms() + SESSION_MIN_KEEP_MS)
    }

    /// How long a key deleted at `deadline` (on our clock) is kept from now: Redis is handed a
    /// duration (`PEXPIRE`), never an instant, so that a difference between our clock and the
    /// Redis server's cannot delete a session early.
    fn keep_for(&self, deadline: u64) -> u64 {
        deadline.saturating_sub(self.opts.clock.now_ms()).max(1)
    }

    /// The stats index only: a failure here loses nothing but an approximate count.
    pub(super) async fn index_session(&self, id: &SessionId, deadline: u64, only_existing: bool) {
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
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
