//! Idempotency records. Publish `Idempotency-Key`s: a key seen before answers the first
//! append's seq and epoch (counted as a hit in the same commit), or `IdempotencyKeyReused` for
//! another body; a new key is recorded in the commit of the append it answers for. Webhook
//! records ([`crate::GuardStore::idem_begin`]): fresh, in progress, done or reused, with their
//! answer. And the listings of both (`idem_list`, `idem_scopes`). Expired publish keys are
//! swept with the other expired rows (`retention.rs`), expired webhook records too
//! ([`sweep_expired`]).
//!
//! Must not: record a publish key in any commit but its append's.

use std::collections::BTreeMap;

use rusqlite::{Connection, OptionalExtension, Row, params};
use zerodrop_core::{Epoch, Seq, StreamId};

use super::guard::{sql, unsigned};
use super::writer::Writer;
use crate::guard::*;
use crate::{AppendOutcome, IdempotencyKey, StoreError, StoreResult};

impl Writer {
    /// The answer to a key seen before (its hit counted in this batch), or `None` for a new
    /// key.
    pub(super) fn find_idempotent(
        &mut self,
        stream: &StreamId,
        k: &IdempotencyKey,
    ) -> rusqlite::Result<Option<StoreResult<AppendOutcome>>> {
        let Some((fp, seq, epoch)) = self.lookup_idempotent(stream, &k.key)? else {
            return Ok(None);
        };
        if fp != k.fingerprint {
            return Ok(Some(Err(StoreError::IdempotencyKeyReused)));
        }
        self.count_hit(stream, &k.key)?;
        Ok(Some(Ok(AppendOutcome {
            stream: stream.clone(),
            seq,
            epoch,
            duplicate: true,
        })))
    }

    /// A key's record: the fingerprint of its body, and the seq and epoch it answers.
    pub(super) fn lookup_idempotent(
        &mut self,
        stream: &StreamId,
        key: &str,
    ) -> rusqlite::Result<Option<([u8; 32], Seq, Epoch)>> {
        let found = self
            .conn
            .prepare_cached(
                "SELECT fingerprint, seq, epoch FROM idempotency WHERE stream = ?1 AND key = ?2",
            )?
            .query_row(params![stream.as_str(), key], |r| {
                Ok((
                    r.get::<_, Vec<u8>>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                ))
            })
            .optional()?;
        Ok(found.map(|(fp, seq, epoch)| {
            // A stored fingerprint of another length matches no body.
            let fp = <[u8; 32]>::try_from(fp.as_slice()).unwrap_or([0; 32]);
            let epoch = Epoch::parse(&epoch).unwrap_or_else(|| self.epoch.clone());
            (fp, Seq(seq as u64), epoch)
        }))
    }

    /// Counts a duplicate, in the commit that answers it (the batch commits either way).
    pub(super) fn count_hit(&mut self, stream: &StreamId, key: &str) -> rusqlite::Result<()> {
        self.conn
            .prepare_cached(
                "UPDATE idempotency SET hit_count = hit_count + 1 WHERE stream = ?1 AND key = ?2",
            )?
            .execute(params![stream.as_str(), key])?;
        Ok(())
    }

    /// Records a new key, in the commit of the append it answers for.
    pub(super) fn record_idempotent(
        &mut self,
        stream: &StreamId,
        k: &IdempotencyKey,
        seq: Seq,
        epoch: &Epoch,
        ts: u64,
    ) -> rusqlite::Result<()> {
        self.conn
            .prepare_cached(
                "INSERT INTO idempotency (stream, key, fingerprint, seq, epoch, created_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?
            .execute(params![
                stream.as_str(),
                k.key,
                &k.fingerprint[..],
                seq.0 as i64,
                epoch.as_str(),
                ts as i64
            ])?;
        Ok(())
    }
}

// ------------------------------------------------------------- webhook records, listings

/// Removes the webhook records that expired by `now_ms` (the writer's periodic sweep).
pub(super) fn sweep_expired(conn: &Connection, now_ms: u64) -> rusqlite::Result<()> {
    conn.prepare_cached("DELETE FROM webhook_idempotency WHERE expires_ms <= ?1")?
        .execute(params![sql(now_ms)])?;
    Ok(())
}

pub(super) fn idem_begin(
    conn: &Connection,
    scope: &str,
    key: &str,
    fingerprint: [u8; 32],
    ttl_ms: u64,
    claim_ms: u64,
    now_ms: u64,
) -> rusqlite::Result<StoreResult<IdemBegin>> {
    let now = sql(now_ms);
    let claim_until = sql(now_ms.saturating_add(claim_ms));
    conn.prepare_cached(
        "DELETE FROM webhook_idempotency WHERE scope = ?1 AND key = ?2 AND expires_ms <= ?3",
    )?
    .execute(params![scope, key, now])?;
    let found = conn
        .prepare_cached(
            "SELECT fingerprint, answer, hit_count, claim_until_ms FROM webhook_idempotency
             WHERE scope = ?1 AND key = ?2",
        )?
        .query_row(params![scope, key], |r| {
            Ok((
                r.get::<_, Vec<u8>>(0)?,
                r.get::<_, Option<String>>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, i64>(3)?,
            ))
        })
        .optional()?;
    let Some((fp, answer, hits, held_until)) = found else {
        conn.prepare_cached(
            "INSERT INTO webhook_idempotency (scope, key, fingerprint, answer, hit_count,
               created_ms, expires_ms, claim_until_ms)
             VALUES (?1, ?2, ?3, NULL, 0, ?4, ?5, ?6)",
        )?
        .execute(params![
            scope,
            key,
            &fingerprint[..],
            now,
            sql(now_ms.saturating_add(ttl_ms)),
            claim_until
        ])?;
        return Ok(Ok(IdemBegin::Fresh));
    };
    if fp.as_slice() != fingerprint.as_slice() {
        return Ok(Ok(IdemBegin::Reused));
    }
    if answer.is_none() && held_until <= now {
        // The owner's claim lapsed (it crashed): this request takes over.
        conn.prepare_cached(
            "UPDATE webhook_idempotency SET claim_until_ms = ?3 WHERE scope = ?1 AND key = ?2",
        )?
        .execute(params![scope, key, claim_until])?;
        return Ok(Ok(IdemBegin::Fresh));
    }
    conn.prepare_cached(
        "UPDATE webhook_idempotency SET hit_count = hit_count + 1 WHERE scope = ?1 AND key = ?2",
    )?
    .execute(params![scope, key])?;
    Ok(Ok(match answer {
        Some(answer) => IdemBegin::Done {
            answer,
            hit_count: unsigned(hits) + 1,
        },
        None => IdemBegin::InProgress,
    }))
}

/// Which publish keys a listing covers: every stream's, one stream's, or none (a webhook
/// scope was asked for).
fn publish_streams(scope: Option<&str>) -> Option<Option<&str>> {
    match scope {
        None => Some(None),
        // The prefix `publish_scope` puts before the stream's name.
        Some(s) => s.strip_prefix("publish:").map(Some),
    }
}

pub(super) fn idem_list(
    conn: &Connection,
    scope: Option<&str>,
    limit: usize,
    now_ms: u64,
    ttl_ms: u64,
) -> rusqlite::Result<Vec<IdemRecord>> {
    let now = sql(now_ms);
    let lim = sql(limit as u64);
    let mut out = Vec::new();
    // Each part is cut at `limit` in the final order, so the merge below sees every record
    // that can make the list.
    let webhook = |r: &Row<'_>| {
        Ok(IdemRecord {
            scope: r.get(0)?,
            key: r.get(1)?,
            state: if r.get::<_, bool>(2)? {
                "done"
            } else {
                "in_progress"
            },
            hit_count: unsigned(r.get(3)?),
            created_at_ms: unsigned(r.get(4)?),
            expires_at_ms: unsigned(r.get(5)?),
        })
    };
    match scope {
        Some(s) => {
            let mut stmt = conn.prepare_cached(
                "SELECT scope, key, answer IS NOT NULL, hit_count, created_ms, expires_ms
                 FROM webhook_idempotency WHERE scope = ?1 AND expires_ms > ?2
                 ORDER BY created_ms DESC, key DESC LIMIT ?3",
            )?;
            for r in stmt.query_map(params![s, now, lim], webhook)? {
                out.push(r?);
            }
        }
        None => {
            let mut stmt = conn.prepare_cached(
                "SELECT scope, key, answer IS NOT NULL, hit_count, created_ms, expires_ms
                 FROM webhook_idempotency WHERE expires_ms > ?1
                 ORDER BY created_ms DESC, scope DESC, key DESC LIMIT ?2",
            )?;
            for r in stmt.query_map(params![now, lim], webhook)? {
                out.push(r?);
            }
        }
    }
    if let Some(stream) = publish_streams(scope) {
        // Kept while `created_ms + ttl > now`.
        let cut = now.saturating_sub(sql(ttl_ms));
        let publish = |r: &Row<'_>| {
            let created = unsigned(r.get(3)?);
            Ok(IdemRecord {
                scope: publish_scope(&r.get::<_, String>(0)?),
                key: r.get(1)?,
                state: "done",
                hit_count: unsigned(r.get(2)?),
                created_at_ms: created,
                expires_at_ms: created.saturating_add(ttl_ms),
            })
        };
        let mut stmt = conn.prepare_cached(
            "SELECT stream, key, hit_count, created_ms FROM idempotency
             WHERE created_ms > ?1 AND (?2 IS NULL OR stream = ?2)
             ORDER BY created_ms DESC, stream DESC, key DESC LIMIT ?3",
        )?;
        for r in stmt.query_map(params![cut, stream, lim], publish)? {
            out.push(r?);
        }
    }
    out.sort_by(|a, b| {
        (b.created_at_ms, &b.scope, &b.key).cmp(&(a.created_at_ms, &a.scope, &a.key))
    });
    out.truncate(limit);
    Ok(out)
}

pub(super) fn idem_scopes(
    conn: &Connection,
    now_ms: u64,
    ttl_ms: u64,
) -> rusqlite::Result<BTreeMap<String, IdemScopeStats>> {
    let now = sql(now_ms);
    let mut out: BTreeMap<String, IdemScopeStats> = BTreeMap::new();
    let mut add = |scope: String, keys: i64, hits: i64| {
        let s = out.entry(scope).or_default();
        s.keys += unsigned(keys);
        s.hit_count += unsigned(hits);
    };
    let mut stmt = conn.prepare_cached(
        "SELECT scope, COUNT(*), SUM(hit_count) FROM webhook_idempotency
         WHERE expires_ms > ?1 GROUP BY scope",
    )?;
    let mut rows = stmt.query(params![now])?;
    while let Some(r) = rows.next()? {
        add(r.get(0)?, r.get(1)?, r.get(2)?);
    }
    let mut stmt = conn.prepare_cached(
        "SELECT stream, COUNT(*), SUM(hit_count) FROM idempotency
         WHERE created_ms > ?1 GROUP BY stream",
    )?;
    let mut rows = stmt.query(params![now.saturating_sub(sql(ttl_ms))])?;
    while let Some(r) = rows.next()? {
        add(publish_scope(&r.get::<_, String>(0)?), r.get(1)?, r.get(2)?);
    }
    Ok(out)
}

pub(super) fn idem_finish(
    c: &Connection,
    scope: &str,
    key: &str,
    answer: &str,
) -> rusqlite::Result<StoreResult<()>> {
    c.prepare_cached("UPDATE webhook_idempotency SET answer = ?3 WHERE scope = ?1 AND key = ?2")?
        .execute(params![scope, key, answer])?;
    Ok(Ok(()))
}
