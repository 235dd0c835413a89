//! Sessions and checkpoints: creating a session within its subject's cap (counted and
//! inserted in the writer's transaction, so no other session is created in between), a
//! session's streams (re-adding one keeps the larger position), acks under the checkpoint rule
//! against the head the writer holds, touches and drop marks; and reading a session back.
//!
//! Must not: decide a rule itself: the checkpoint, merge and cap rules are `crate::rules`'
//! (the SQL here spells the merge and "live" rules once more, to stay one statement).

use std::collections::BTreeMap;

use rusqlite::{Connection, OptionalExtension, params};
use zerodrop_core::{AckUpdate, Epoch, Grants, Seq, SessionId, StreamId};

use super::writer::{Writer, meta_info};
use crate::rules::apply_checkpoint;
use crate::{SessionCap, SessionRecord, SessionStream, StoreError, StoreResult};

/// Subjects whose session bound the writer keeps at most (a few MB).
const MAX_BOUNDS_KEPT: usize = 100_000;

impl Writer {
    /// Counted and written by the single writer inside its transaction: no other session can
    /// be created between the count and the insert.
    ///
    /// Counting a subject's sessions costs a scan of them, which a subject that many clients
    /// share (thousands of sessions) cannot pay on every connect. So the writer keeps an upper
    /// bound per subject (`live_sessions_bound`: this process is the file's only writer, and
    /// only a creation adds a live session): below the cap the bound admits at once; at the
    /// cap the subject is counted exactly, and only the exact count refuses. A batch that
    /// rolls back leaves the bound high, never low.
    pub(super) fn create_session(
        &mut self,
        s: &SessionRecord,
        cap: SessionCap,
    ) -> rusqlite::Result<StoreResult<()>> {
        let bound = self.live_sessions_bound.get(&s.sub).copied();
        if cap != SessionCap::NONE && bound.is_none_or(|b| cap.check(b, 0, 0).is_err()) {
            let now = self.clock.now_ms();
            // `expires_ms > now` is `SessionCap::is_live`, in SQL so that counting is one query.
            let (live, earliest): (i64, Option<i64>) = self
                .conn
                .prepare_cached(
                    "SELECT COUNT(*), MIN(expires_ms) FROM sessions
                     WHERE sub = ?1 AND expires_ms > ?2 AND id != ?3",
                )?
                .query_row(params![s.sub, now as i64, s.id.as_str()], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })?;
            let live = live.max(0) as u64;
            if self.live_sessions_bound.len() >= MAX_BOUNDS_KEPT {
                // Only a cache: a subject dropped from it is counted exactly next time.
                self.live_sessions_bound.clear();
            }
            self.live_sessions_bound.insert(s.sub.clone(), live);
            let earliest = earliest.map_or(now, |e| e.max(0) as u64);
            if let Err(e) = cap.check(live, earliest, now) {
                return Ok(Err(e));
            }
        }
        if let Some(b) = self.live_sessions_bound.get_mut(&s.sub) {
            *b += 1;
        }
        let grants = serde_json::to_string(&s.grants).unwrap_or_else(|_| "{}".into());
        self.conn
            .prepare_cached(
                "INSERT OR REPLACE INTO sessions (id, sub, grants, created_ms, expires_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![
                s.id.as_str(),
                s.sub,
                grants,
                s.created_at_ms as i64,
                s.expires_at_ms as i64
            ])?;
        for (stream, st) in &s.streams {
            self.write_session_stream(&s.id, stream, st)?;
        }
        Ok(Ok(()))
    }

    fn session_exists(&mut self, id: &SessionId) -> rusqlite::Result<bool> {
        Ok(self
            .conn
            .prepare_cached("SELECT 1 FROM sessions WHERE id = ?1")?
            .query_row(params![id.as_str()], |_| Ok(()))
            .optional()?
            .is_some())
    }

    pub(super) fn put_session_stream(
        &mut self,
        id: &SessionId,
        stream: &StreamId,
        st: &SessionStream,
    ) -> rusqlite::Result<StoreResult<()>> {
        if !self.session_exists(id)? {
            return Ok(Err(StoreError::SessionNotFound));
        }
        self.write_session_stream(id, stream, st)?;
        Ok(Ok(()))
    }

    fn write_session_stream(
        &mut self,
        id: &SessionId,
        stream: &StreamId,
        st: &SessionStream,
    ) -> rusqlite::Result<()> {
        // The upsert is `rules::merge_session_stream` in SQL: within one epoch neither the ack
        // nor the drop mark moves backwards; another epoch replaces both.
        self.conn
            .prepare_cached(
                "INSERT INTO session_streams (session_id, stream, epoch, ack, dropped_through)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (session_id, stream) DO UPDATE SET
                   ack = CASE WHEN epoch = excluded.epoch THEN MAX(ack, excluded.ack) ELSE excluded.ack END,
                   dropped_through = CASE WHEN epoch = excluded.epoch
                     THEN MAX(dropped_through, excluded.dropped_through) ELSE excluded.dropped_through END,
                   epoch = excluded.epoch",
            )?
            .execute(params![
                id.as_str(),
                stream.as_str(),
                st.epoch.as_str(),
                st.ack.0 as i64,
                st.dropped_through.0 as i64
            ])?;
        Ok(())
    }

    /// Written-behind acks: those that cannot be applied are skipped (see
    /// [`crate::Store::checkpoint_many`]); answers how many were.
    pub(super) fn checkpoint_many(
        &mut self,
        acks: Vec<(SessionId, StreamId, Seq)>,
    ) -> rusqlite::Result<StoreResult<usize>> {
        let mut applied = 0;
        for (id, stream, seq) in acks {
            if let Ok(u) = self.checkpoint(&id, &stream, seq)? {
                applied += usize::from(u.is_applied());
            }
        }
        Ok(Ok(applied))
    }

    pub(super) fn remove_session_stream(
        &mut self,
        id: &SessionId,
        stream: &StreamId,
    ) -> rusqlite::Result<StoreResult<()>> {
        self.conn
            .prepare_cached("DELETE FROM session_streams WHERE session_id = ?1 AND stream = ?2")?
            .execute(params![id.as_str(), stream.as_str()])?;
        Ok(Ok(()))
    }

    pub(super) fn set_session_grants(
        &mut self,
        id: &SessionId,
        grants: &str,
    ) -> rusqlite::Result<StoreResult<()>> {
        let changed = self
            .conn
            .prepare_cached("UPDATE sessions SET grants = ?2 WHERE id = ?1")?
            .execute(params![id.as_str(), grants])?;
        Ok(if changed == 0 {
            Err(StoreError::SessionNotFound)
        } else {
            Ok(())
        })
    }

    pub(super) fn touch_session(
        &mut self,
        id: &SessionId,
        expires: u64,
    ) -> rusqlite::Result<StoreResult<()>> {
        self.conn
            .prepare_cached("UPDATE sessions SET expires_ms = ?2 WHERE id = ?1")?
            .execute(params![id.as_str(), expires as i64])?;
        Ok(Ok(()))
    }

    pub(super) fn mark_dropped(
        &mut self,
        id: &SessionId,
        stream: &StreamId,
        through: Seq,
    ) -> rusqlite::Result<StoreResult<()>> {
        self.conn
            .prepare_cached(
                "UPDATE session_streams SET dropped_through = MAX(dropped_through, ?3)
                 WHERE session_id = ?1 AND stream = ?2",
            )?
            .execute(params![id.as_str(), stream.as_str(), through.0 as i64])?;
        Ok(Ok(()))
    }

    pub(super) fn checkpoint(
        &mut self,
        id: &SessionId,
        stream: &StreamId,
        seq: Seq,
    ) -> rusqlite::Result<StoreResult<AckUpdate>> {
        let row = self
            .conn
            .prepare_cached(
                "SELECT epoch, ack, dropped_through FROM session_streams
                 WHERE session_id = ?1 AND stream = ?2",
            )?
            .query_row(params![id.as_str(), stream.as_str()], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            })
            .optional()?;
        let Some((epoch, ack, dropped)) = row else {
            return Ok(Err(if self.session_exists(id)? {
                StoreError::NotInSession
            } else {
                StoreError::SessionNotFound
            }));
        };
        let mut ss = SessionStream {
            epoch: Epoch::parse(&epoch).unwrap_or_else(|| self.epoch.clone()),
            ack: Seq(ack as u64),
            dropped_through: Seq(dropped as u64),
        };
        let m = self.meta(stream)?.clone();
        let info = meta_info(stream, &m);
        let update = match apply_checkpoint(&mut ss, &info, seq) {
            Ok(u) => u,
            Err(e) => return Ok(Err(e)),
        };
        if update.is_applied() {
            self.conn
                .prepare_cached(
                    "UPDATE session_streams SET ack = ?3 WHERE session_id = ?1 AND stream = ?2",
                )?
                .execute(params![
                    id.as_str(),
                    stream.as_str(),
                    update.last_ack().0 as i64
                ])?;
        }
        Ok(Ok(update))
    }
}

pub(super) fn read_session(
    conn: &Connection,
    id: &SessionId,
) -> rusqlite::Result<Option<SessionRecord>> {
    let row = conn
        .prepare_cached("SELECT sub, grants, created_ms, expires_ms FROM sessions WHERE id = ?1")?
        .query_row(params![id.as_str()], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, i64>(3)?,
            ))
        })
        .optional()?;
    let Some((sub, grants, created, expires)) = row else {
        return Ok(None);
    };
    let mut streams = BTreeMap::new();
    let mut stmt = conn.prepare_cached(
        "SELECT stream, epoch, ack, dropped_through FROM session_streams WHERE session_id = ?1",
    )?;
    let rows = stmt.query_map(params![id.as_str()], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, i64>(2)?,
            r.get::<_, i64>(3)?,
        ))
    })?;
    for row in rows {
        let (stream, epoch, ack, dropped) = row?;
        let (Ok(stream), Some(epoch)) = (StreamId::new(&stream), Epoch::parse(&epoch)) else {
            continue;
        };
        streams.insert(
            stream,
            SessionStream {
                epoch,
                ack: Seq(ack as u64),
                dropped_through: Seq(dropped as u64),
            },
        );
    }
    Ok(Some(SessionRecord {
        id: id.clone(),
        sub,
        grants: serde_json::from_str::<Grants>(&grants).unwrap_or_default(),
        created_at_ms: created as u64,
        expires_at_ms: expires as u64,
        streams,
    }))
}
