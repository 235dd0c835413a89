//! The `redis` store's idempotency records as the guard sees them: webhook records
//! (`zd:{idem}:…`: begin, finish, each one script of `guard_lua.rs`), and the listings and
//! per-scope counts of those and of the publish keys (`zd:{S}:i…`, written by the append
//! script, see `log.rs`), gathered scope by scope and stream by stream.
//!
//! Must not: write a publish key (only the append script does, in the append's step).

use std::collections::{BTreeMap, BTreeSet};

use ::redis::Value;
use futures_util::StreamExt;
use zerodrop_core::StreamId;

use super::Shared;
use super::conn::{Call, as_array, as_str, as_u64, unexpected};
use super::keys::{
    IDEM_SCOPES, PUBLISH_STREAMS, idem_created_key, idem_expiry_key, idem_key, idem_prefix,
    meta_key, publish_hits_prefix, publish_index_key,
};
use crate::guard::*;
use crate::{StoreError, StoreResult};

/// Most records one `idem_list` returns.
pub(super) const IDEM_LIST_MAX: usize = 10_000;
/// Scopes (webhook scopes, streams with publish keys) one listing or count visits at most.
pub(super) const SCOPES_MAX: usize = 10_000;
/// `SSCAN` rounds when reading a set of scopes.
pub(super) const SCAN_ROUNDS: usize = 1000;
/// Scopes read concurrently.
pub(super) const SCOPES_AT_ONCE: usize = 32;

pub(super) fn newest_first(out: &mut Vec<IdemRecord>, limit: usize) {
    out.sort_by(|a, b| {
        (b.created_at_ms, &b.scope, &b.key).cmp(&(a.created_at_ms, &a.scope, &a.key))
    });
    out.truncate(limit);
}

impl Shared {
    /// Lists the stream among those with publish keys, then flags its bounds so that keyed
    /// appends stop asking. A failure is tried again by the stream's next keyed append; until
    /// then only the all-scopes listing misses its keys.
    pub(super) async fn list_publish_keys(&self, stream: &StreamId) {
        let listed = async {
            self.set_change("SADD", PUBLISH_STREAMS, stream.as_str())
                .await?;
            let call = Call::new(&self.scripts.keys_listed).key(meta_key(stream));
            self.eval("publish key streams", &call).await
        };
        if let Err(e) = listed.await {
            tracing::debug!(stream = %stream, error = %e, "stream not listed among publish keys");
        }
    }

    /// Up to [`SCOPES_MAX`] members of a set, sorted.
    async fn set_members(&self, key: &str) -> StoreResult<Vec<String>> {
        let mut out = BTreeSet::new();
        let mut cursor: u64 = 0;
        for _ in 0..SCAN_ROUNDS {
            let mut conn = self.conn.clone();
            let (next, batch): (u64, Vec<String>) = self
                .run("scopes", async {
                    ::redis::cmd("SSCAN")
                        .arg(key)
                        .arg(cursor)
                        .arg("COUNT")
                        .arg(500)
                        .query_async(&mut conn)
                        .await
                })
                .await?;
            out.extend(batch);
            cursor = next;
            if cursor == 0 || out.len() >= SCOPES_MAX {
                break;
            }
        }
        Ok(out.into_iter().take(SCOPES_MAX).collect())
    }

    async fn set_change(&self, cmd: &str, key: &str, member: &str) -> StoreResult<()> {
        let mut conn = self.conn.clone();
        self.run("scopes", async {
            ::redis::cmd(cmd)
                .arg(key)
                .arg(member)
                .query_async::<Value>(&mut conn)
                .await
        })
        .await?;
        Ok(())
    }

    fn scope_call<'a>(&'a self, scope: &str, now_ms: u64, limit: usize, mode: &str) -> Call<'a> {
        Call::new(&self.scripts.guard.idem_scope)
            .key(idem_created_key(scope))
            .key(idem_expiry_key(scope))
            .key(IDEM_SCOPES)
            .arg(scope)
            .arg(idem_prefix(scope))
            .arg(now_ms)
            .arg(limit)
            .arg(mode)
    }

    async fn webhook_records(
        &self,
        scope: &str,
        limit: usize,
        now_ms: u64,
    ) -> StoreResult<Vec<IdemRecord>> {
        let call = self.scope_call(scope, now_ms, limit, "list");
        let v = as_array(self.eval("idempotency list", &call).await?)
            .ok_or_else(|| unexpected("idempotency list"))?;
        let mut out = Vec::with_capacity(v.len() / 5);
        for r in v.chunks(5) {
            let [key, done, hits, created, expires] = r else {
                return Err(unexpected("idempotency list"));
            };
            let (Some(key), Some(done), Some(hits), Some(created), Some(expires)) = (
                as_str(key),
                as_u64(done),
                as_u64(hits),
                as_u64(created),
                as_u64(expires),
            ) else {
                return Err(unexpected("idempotency list"));
            };
            out.push(IdemRecord {
                scope: scope.to_string(),
                key: key.to_string(),
                state: if done == 1 { "done" } else { "in_progress" },
                hit_count: hits,
                created_at_ms: created,
                expires_at_ms: expires,
            });
        }
        Ok(out)
    }

    async fn webhook_stats(&self, scope: &str, now_ms: u64) -> StoreResult<IdemScopeStats> {
        let call = self.scope_call(scope, now_ms, 0, "stats");
        let v = as_array(self.eval("idempotency scopes", &call).await?)
            .ok_or_else(|| unexpected("idempotency scopes"))?;
        match (v.first().and_then(as_u64), v.get(1).and_then(as_u64)) {
            (Some(keys), Some(hit_count)) => Ok(IdemScopeStats { keys, hit_count }),
            _ => Err(unexpected("idempotency scopes")),
        }
    }

    fn publish_call<'a>(
        &'a self,
        stream: &StreamId,
        now_ms: u64,
        limit: usize,
        mode: &str,
    ) -> Call<'a> {
        Call::new(&self.scripts.guard.publish_keys)
            .key(publish_index_key(stream))
            .key(meta_key(stream))
            .arg(idem_key(stream, ""))
            .arg(publish_hits_prefix(stream))
            .arg(now_ms)
            .arg(self.opts.idempotency_ttl_ms.max(1))
            .arg(limit)
            .arg(mode)
    }

    async fn publish_records(
        &self,
        stream: &StreamId,
        limit: usize,
        now_ms: u64,
    ) -> StoreResult<Vec<IdemRecord>> {
        let call = self.publish_call(stream, now_ms, limit, "list");
        let v = as_array(self.eval("publish keys", &call).await?)
            .ok_or_else(|| unexpected("publish keys"))?;
        let ttl = self.opts.idempotency_ttl_ms.max(1);
        let scope = publish_scope(stream.as_str());
        let mut out = Vec::with_capacity(v.len() / 3);
        for r in v.chunks(3) {
            let [key, hits, created] = r else {
                return Err(unexpected("publish keys"));
            };
            let (Some(key), Some(hits), Some(created)) =
                (as_str(key), as_u64(hits), as_u64(created))
            else {
                return Err(unexpected("publish keys"));
            };
            out.push(IdemRecord {
                scope: scope.clone(),
                key: key.to_string(),
                state: "done",
                hit_count: hits,
                created_at_ms: created,
                expires_at_ms: created + ttl,
            });
        }
        Ok(out)
    }

    /// The stream's live keys and hits, and whether its key index still exists.
    async fn publish_stats(
        &self,
        stream: &StreamId,
        now_ms: u64,
    ) -> StoreResult<(IdemScopeStats, bool)> {
        let call = self.publish_call(stream, now_ms, 0, "stats");
        let v = as_array(self.eval("publish keys", &call).await?)
            .ok_or_else(|| unexpected("publish keys"))?;
        match (
            v.first().and_then(as_u64),
            v.get(1).and_then(as_u64),
            v.get(2).and_then(as_u64),
        ) {
            (Some(keys), Some(hit_count), Some(indexed)) => {
                Ok((IdemScopeStats { keys, hit_count }, indexed > 0))
            }
            _ => Err(unexpected("publish keys")),
        }
    }

    /// A stream's publish key stats; one whose every key expired leaves the set of streams
    /// with keys (the script already cleared its `pk` flag, so its next keyed append lists it
    /// again). The index lives on the stream's slot and the set elsewhere, so the removal is
    /// checked after the fact: a keyed append between the script and the removal may have
    /// listed the stream just before it was removed, and is seen now, so it is put back.
    async fn publish_scope_stats(
        &self,
        stream: &StreamId,
        now_ms: u64,
    ) -> StoreResult<IdemScopeStats> {
        let (stats, indexed) = self.publish_stats(stream, now_ms).await?;
        if indexed {
            return Ok(stats);
        }
        self.set_change("SREM", PUBLISH_STREAMS, stream.as_str())
            .await?;
        let (stats, indexed) = self.publish_stats(stream, now_ms).await?;
        if indexed {
            self.set_change("SADD", PUBLISH_STREAMS, stream.as_str())
                .await?;
        }
        Ok(stats)
    }

    /// The streams with publish keys, as far as they parse as stream ids.
    async fn publish_streams(&self) -> StoreResult<Vec<StreamId>> {
        Ok(self
            .set_members(PUBLISH_STREAMS)
            .await?
            .into_iter()
            .filter_map(|s| StreamId::new(&s).ok())
            .collect())
    }

    pub(super) async fn idem_begin(
        &self,
        scope: &str,
        key: &str,
        fingerprint: [u8; 32],
        ttl_ms: u64,
        claim_ms: u64,
        now_ms: u64,
    ) -> StoreResult<IdemBegin> {
        let prefix = idem_prefix(scope);
        let call = Call::new(&self.scripts.guard.idem_begin)
            .key(format!("{prefix}{key}"))
            .key(idem_created_key(scope))
            .key(idem_expiry_key(scope))
            .key(IDEM_SCOPES)
            .arg(scope)
            .arg(key)
            .arg(hex::encode(fingerprint))
            .arg(ttl_ms)
            .arg(claim_ms)
            .arg(now_ms)
            .arg(prefix.as_str());
        let v = as_array(self.eval("idempotency begin", &call).await?)
            .ok_or_else(|| unexpected("idempotency begin"))?;
        match v.first().and_then(as_str) {
            Some("fresh") => Ok(IdemBegin::Fresh),
            Some("in_progress") => Ok(IdemBegin::InProgress),
            Some("reused") => Ok(IdemBegin::Reused),
            Some("done") => match (v.get(1).and_then(as_str), v.get(2).and_then(as_u64)) {
                (Some(answer), Some(hit_count)) => Ok(IdemBegin::Done {
                    answer: answer.to_string(),
                    hit_count,
                }),
                _ => Err(unexpected("idempotency begin")),
            },
            _ => Err(unexpected("idempotency begin")),
        }
    }

    pub(super) async fn idem_finish(
        &self,
        scope: &str,
        key: &str,
        answer: &str,
        _now_ms: u64,
    ) -> StoreResult<()> {
        let call = Call::new(&self.scripts.guard.idem_finish)
            .key(format!("{}{key}", idem_prefix(scope)))
            .arg(answer);
        self.eval("idempotency finish", &call).await?;
        Ok(())
    }

    pub(super) async fn idem_list(
        &self,
        scope: Option<&str>,
        limit: usize,
        now_ms: u64,
    ) -> StoreResult<Vec<IdemRecord>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let limit = limit.min(IDEM_LIST_MAX);
        let (scopes, streams) = match scope {
            // A webhook scope may in principle be called `publish:<stream>` too: both count.
            Some(sc) => (
                vec![sc.to_string()],
                sc.strip_prefix("publish:")
                    .and_then(|st| StreamId::new(st).ok())
                    .into_iter()
                    .collect(),
            ),
            None => (
                self.set_members(IDEM_SCOPES).await?,
                self.publish_streams().await?,
            ),
        };
        let webhook = futures_util::stream::iter(scopes)
            .map(|sc| async move { self.webhook_records(&sc, limit, now_ms).await })
            .buffer_unordered(SCOPES_AT_ONCE)
            .collect::<Vec<_>>();
        let publish = futures_util::stream::iter(streams)
            .map(|st| async move { self.publish_records(&st, limit, now_ms).await })
            .buffer_unordered(SCOPES_AT_ONCE)
            .collect::<Vec<_>>();
        let (webhook, publish) = tokio::join!(webhook, publish);
        let mut out = Vec::new();
        for part in webhook.into_iter().chain(publish) {
            out.extend(part?);
        }
        newest_first(&mut out, limit);
        Ok(out)
    }

    pub(super) async fn idem_scopes(
        &self,
        now_ms: u64,
    ) -> StoreResult<BTreeMap<String, IdemScopeStats>> {
        let (scopes, streams) = tokio::join!(self.set_members(IDEM_SCOPES), self.publish_streams());
        let webhook = futures_util::stream::iter(scopes?)
            .map(|sc| async move {
                let st = self.webhook_stats(&sc, now_ms).await?;
                Ok::<_, StoreError>((sc, st))
            })
            .buffer_unordered(SCOPES_AT_ONCE)
            .collect::<Vec<_>>();
        let publish = futures_util::stream::iter(streams?)
            .map(|stream| async move {
                let st = self.publish_scope_stats(&stream, now_ms).await?;
                Ok::<_, StoreError>((publish_scope(stream.as_str()), st))
            })
            .buffer_unordered(SCOPES_AT_ONCE)
            .collect::<Vec<_>>();
        let (webhook, publish) = tokio::join!(webhook, publish);
        let mut out = BTreeMap::new();
        for r in webhook.into_iter().chain(publish) {
            let (scope, st) = r?;
            if st.keys > 0 {
                let e: &mut IdemScopeStats = out.entry(scope).or_default();
                e.keys += st.keys;
                e.hit_count += st.hit_count;
            }
        }
        Ok(out)
    }
}
