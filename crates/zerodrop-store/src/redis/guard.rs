//! The `redis` store's job queue and webhook idempotency records ([`GuardStore`]), shared by
//! every instance like the log. Each operation is one Lua script (`redis/guard_lua.rs`), the
//! rules are those of the memory store (`memory/guard.rs`), checked by the same suite.
//!
//! Why this shape:
//! - **Two hash tags.** Every job key is tagged `{jobs}` and every webhook idempotency key
//!   `{idem}`, so a claim that looks at all classes, or a begin that prunes its scope, runs on
//!   one slot of a Redis Cluster. The price: the whole queue lives on one node.
//! - **Indexes per status.** A job is a hash; sorted sets put it in the order each operation
//!   needs (claim: class queue by available_at then id, leases by expiry; list: by id; purge:
//!   by finished_at), so every script works on the few members it needs instead of scanning
//!   jobs. Every bound is a constant in `guard_lua.rs`, documented on the script it bounds.
//! - **Durable like an append.** With `ZERODROP_REDIS_WAIT_REPLICAS=N` an enqueue is answered
//!   only once `WAIT` saw N replicas hold it (a dedupe hit too: its script writes after the
//!   original for `WAIT` to cover), otherwise `Unavailable` — the job *is* queued, a retry with
//!   its dedupe key finds it. The other operations do not wait: a lease, a completion or an
//!   answer lost in a failover makes a job be delivered again (at least once), never lost.
//! - **Ids never come back.** A new id is at least the server's clock in ms × 1000, so a
//!   server that restarted without its data does not reissue ids that workers may still hold
//!   leases on.
//!
//! Keys (zero-padded ids are the sorted-set members, so that equal scores sort by id):
//! - `zd:{jobs}:seq` the last id; `zd:{jobs}:j:<id>` a job hash (`id kind class up pay dd st att
//!   max cr av le wk err fin`); `zd:{jobs}:dd` dedupe key → id.
//! - `zd:{jobs}:s:<status>` jobs of a status by id; `zd:{jobs}:q:<class>` queued jobs by
//!   available_at, `zd:{jobs}:qc` queued jobs by created_at; `zd:{jobs}:r:<class>` and
//!   `zd:{jobs}:k:<kind>` running jobs by lease expiry (expired leases stay until claimed
//!   again or finished: they are still the current ones); `zd:{jobs}:fin` done jobs by
//!   finished_at.
//! - `zd:{idem}:r:<len(scope)>:<scope>:<key>` a webhook idempotency record (`fp ans hits cr exp
//!   claim`, Redis TTL = its TTL); `zd:{idem}:c:<scope>` / `zd:{idem}:e:<scope>` the scope's
//!   keys by created_at / by expiry (pruned of expired entries whenever the scope is used);
//!   `zd:{idem}:scopes` the scopes that hold records.
//! - Publish keys, beside their stream's log: `zd:{S}:i:<key>` the record (see `log.rs`),
//!   `zd:{S}:ih:<key>` its hit count, `zd:{S}:ik` the stream's keys by created ms;
//!   `zd:{idem}:ps` the streams with keys (added after a keyed append, which then sets `pk` in
//!   the stream's bounds; removed by `idem_scopes` once every key expired, `pk` cleared first).
//!
//! Expiry follows the callers' clocks (`now_ms`), as in the other stores; the Redis TTLs only
//! collect records nobody asks about any more.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use ::redis::Value;
use async_trait::async_trait;
use futures_util::StreamExt;
use zerodrop_core::StreamId;

use super::conn::{Call, Lua, as_array, as_str, as_u64, unexpected};
use super::keys::{idem_key, meta_key};
use super::{RedisStore, Shared};
use crate::guard::*;
use crate::{StoreError, StoreResult};

use super::guard_lua as lua;

const JOB_SEQ: &str = "zd:{jobs}:seq";
const JOB_DEDUPE: &str = "zd:{jobs}:dd";
const IDEM_SCOPES: &str = "zd:{idem}:scopes";
const PUBLISH_STREAMS: &str = "zd:{idem}:ps";
/// Most jobs one `job_list` returns (a larger `limit` is cut to it).
const JOB_LIST_MAX: usize = 10_000;
/// Most records one `idem_list` returns.
const IDEM_LIST_MAX: usize = 10_000;
/// Purge steps per `job_purge_done` call (each removes up to `lua::PURGE_BATCH`).
const PURGE_ROUNDS: usize = 1000;
/// Scopes (webhook scopes, streams with publish keys) one listing or count visits at most.
const SCOPES_MAX: usize = 10_000;
/// `SSCAN` rounds when reading a set of scopes.
const SCAN_ROUNDS: usize = 1000;
/// Scopes read concurrently.
const SCOPES_AT_ONCE: usize = 32;

pub(super) struct GuardScripts {
    enqueue: Lua,
    claim: Lua,
    heartbeat: Lua,
    finish: Lua,
    requeue: Lua,
    list: Lua,
    stats: Lua,
    purge: Lua,
    idem_begin: Lua,
    idem_finish: Lua,
    idem_scope: Lua,
    publish_keys: Lua,
}

impl GuardScripts {
    pub(super) fn new() -> GuardScripts {
        GuardScripts {
            enqueue: Lua::new(lua::enqueue()),
            claim: Lua::new(lua::claim()),
            heartbeat: Lua::new(lua::heartbeat()),
            finish: Lua::new(lua::finish()),
            requeue: Lua::new(lua::requeue()),
            list: Lua::new(lua::list()),
            stats: Lua::new(lua::stats()),
            purge: Lua::new(lua::purge()),
            idem_begin: Lua::new(lua::idem_begin()),
            idem_finish: Lua::new(lua::IDEM_FINISH),
            idem_scope: Lua::new(lua::idem_scope()),
            publish_keys: Lua::new(lua::publish_keys()),
        }
    }
}

fn job_key(id: JobId) -> String {
    format!("zd:{{jobs}}:j:{id}")
}

/// The scope's length first: scopes and keys are free text, and `("a:b", "c")` must not
/// name the record of `("a", "b:c")`.
fn idem_prefix(scope: &str) -> String {
    format!("zd:{{idem}}:r:{}:{scope}:", scope.len())
}

fn idem_created_key(scope: &str) -> String {
    format!("zd:{{idem}}:c:{scope}")
}

fn idem_expiry_key(scope: &str) -> String {
    format!("zd:{{idem}}:e:{scope}")
}

pub(super) fn publish_index_key(s: &StreamId) -> String {
    format!("zd:{{{s}}}:ik")
}

pub(super) fn publish_hits_key(s: &StreamId, key: &str) -> String {
    format!("zd:{{{s}}}:ih:{key}")
}

fn publish_hits_prefix(s: &StreamId) -> String {
    publish_hits_key(s, "")
}

/// A hash as a script or `HGETALL` returns it: a flat field/value list (RESP2) or a map.
fn fields(v: Value) -> Option<HashMap<String, String>> {
    let pairs: Vec<(Value, Value)> = match v {
        Value::Array(a) => {
            let mut it = a.into_iter();
            let mut pairs = Vec::new();
            while let Some(k) = it.next() {
                pairs.push((k, it.next()?));
            }
            pairs
        }
        Value::Map(m) => m,
        _ => return None,
    };
    pairs
        .iter()
        .map(|(k, v)| Some((as_str(k)?.to_string(), as_str(v)?.to_string())))
        .collect()
}

/// `None` for an empty hash (no such job); `Err` for one that does not decode.
fn job_record(v: Value) -> StoreResult<Option<JobRecord>> {
    let f = fields(v).ok_or_else(|| unexpected("job"))?;
    if f.is_empty() {
        return Ok(None);
    }
    let text = |k: &str| f.get(k).cloned();
    let num = |k: &str| f.get(k).and_then(|v| v.parse::<u64>().ok());
    let decode = || {
        Some(JobRecord {
            id: num("id")?,
            kind: text("kind")?,
            class: QosClass::parse(f.get("class")?)?,
            upstream: text("up")?,
            payload: text("pay")?,
            dedupe_key: text("dd"),
            status: JobStatus::parse(f.get("st")?)?,
            attempts: u32::try_from(num("att")?).ok()?,
            max_attempts: u32::try_from(num("max")?).ok()?,
            created_at_ms: num("cr")?,
            available_at_ms: num("av")?,
            lease_expires_at_ms: num("le")?,
            worker: text("wk"),
            last_error: text("err"),
            finished_at_ms: num("fin")?,
        })
    };
    decode().map(Some).ok_or_else(|| unexpected("job"))
}

fn job_records(v: Value, what: &str) -> StoreResult<Vec<JobRecord>> {
    let rows = as_array(v).ok_or_else(|| unexpected(what))?;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        // A job listed by an index is there: an empty hash would be a broken index.
        out.push(job_record(row)?.ok_or_else(|| unexpected(what))?);
    }
    Ok(out)
}

/// 1 applied, 0 refused: the lease is not the job's current one.
fn leased(v: Value, lease: Lease, what: &str) -> StoreResult<()> {
    match v {
        Value::Int(1) => Ok(()),
        Value::Int(0) => Err(StoreError::StaleLease {
            job: lease.job,
            attempt: lease.attempt,
        }),
        _ => Err(unexpected(what)),
    }
}

fn newest_first(out: &mut Vec<IdemRecord>, limit: usize) {
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
}

#[async_trait]
impl GuardStore for RedisStore {
    async fn job_enqueue(
        &self,
        job: NewJob,
        caps: &QueuedCaps,
        now_ms: u64,
    ) -> StoreResult<Enqueued> {
        let s = &self.shared;
        let n = s.opts.wait_replicas;
        let cap = caps.per_class[job.class.index()];
        let call = Call::new(&s.scripts.guard.enqueue)
            .key(JOB_SEQ)
            .key(JOB_DEDUPE)
            .arg(job.kind.as_str())
            .arg(job.class.as_str())
            .arg(job.upstream.as_str())
            .arg(job.payload.as_str())
            .arg(if job.dedupe_key.is_some() { "1" } else { "0" })
            .arg(job.dedupe_key.as_deref().unwrap_or(""))
            .arg(job.max_attempts)
            .arg(job.available_at_ms)
            .arg(now_ms)
            .arg(cap)
            .arg(if n > 0 { "1" } else { "0" });
        let (reply, acked) = if n > 0 {
            s.eval_waiting("enqueue", JOB_SEQ, &call).await?
        } else {
            (s.eval("enqueue", &call).await?, 0)
        };
        let v = as_array(reply).ok_or_else(|| unexpected("enqueue"))?;
        let id = v.get(1).and_then(as_u64);
        let done = match (v.first().and_then(as_str), id) {
            (Some("new"), Some(id)) => Enqueued::New(id),
            (Some("existing"), Some(id)) => Enqueued::Existing(id),
            (Some("full"), _) => {
                return Err(StoreError::QueueFull {
                    class: job.class,
                    cap,
                });
            }
            _ => return Err(unexpected("enqueue")),
        };
        if n > 0 && acked < u64::from(n) {
            let timeout_ms = s.opts.wait_timeout.as_millis();
            return Err(StoreError::Unavailable(match done {
                Enqueued::New(_) => format!(
                    "redis: the job reached {acked} of {n} replicas within {timeout_ms} ms (it is \
                     queued but its durability is not confirmed; retry with a dedupe key)"
                ),
                Enqueued::Existing(_) => format!(
                    "redis: the earlier job with this dedupe key reached {acked} of {n} replicas \
                     within {timeout_ms} ms (its durability is not confirmed; retry later)"
                ),
            }));
        }
        Ok(done)
    }

    async fn job_claim(
        &self,
        worker: &str,
        limit: usize,
        caps: &RunningCaps,
        lease_ms: u64,
        now_ms: u64,
    ) -> StoreResult<Vec<LeasedJob>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let s = &self.shared;
        let mut call = Call::new(&s.scripts.guard.claim)
            .key(JOB_SEQ)
            .arg(worker)
            .arg(limit.min(u32::MAX as usize))
            .arg(lease_ms)
            .arg(now_ms)
            .arg(caps.per_class[0])
            .arg(caps.per_class[1])
            .arg(caps.per_class[2])
            .arg(caps.default_per_kind)
            .arg(caps.per_kind.len());
        for (kind, cap) in &caps.per_kind {
            call = call.arg(kind.as_str()).arg(*cap);
        }
        let jobs = job_records(s.eval("claim", &call).await?, "claim")?;
        Ok(jobs
            .into_iter()
            .map(|job| LeasedJob {
                lease: Lease {
                    job: job.id,
                    attempt: job.attempts,
                },
                job,
            })
            .collect())
    }

    async fn job_heartbeat(&self, lease: Lease, lease_ms: u64, now_ms: u64) -> StoreResult<()> {
        let s = &self.shared;
        let call = Call::new(&s.scripts.guard.heartbeat)
            .key(JOB_SEQ)
            .arg(lease.job)
            .arg(lease.attempt)
            .arg(lease_ms)
            .arg(now_ms);
        leased(s.eval("heartbeat", &call).await?, lease, "heartbeat")
    }

    async fn job_complete(&self, lease: Lease, now_ms: u64) -> StoreResult<()> {
        let s = &self.shared;
        let call = Call::new(&s.scripts.guard.finish)
            .key(JOB_SEQ)
            .arg(lease.job)
            .arg(lease.attempt)
            .arg(now_ms)
            .arg("done");
        leased(s.eval("complete", &call).await?, lease, "complete")
    }

    async fn job_fail(&self, lease: Lease, failure: Failure, now_ms: u64) -> StoreResult<()> {
        let s = &self.shared;
        let call = Call::new(&s.scripts.guard.finish)
            .key(JOB_SEQ)
            .arg(lease.job)
            .arg(lease.attempt)
            .arg(now_ms);
        let call = match failure {
            Failure::Retry {
                at_ms,
                error,
                counted,
            } => call
                .arg("retry")
                .arg(error)
                .arg(at_ms)
                .arg(if counted { "1" } else { "0" }),
            Failure::Dead { error } => call.arg("dead").arg(error),
        };
        leased(s.eval("fail", &call).await?, lease, "fail")
    }

    async fn job_requeue(&self, id: JobId, budget: u32, now_ms: u64) -> StoreResult<bool> {
        let s = &self.shared;
        let call = Call::new(&s.scripts.guard.requeue)
            .key(JOB_SEQ)
            .arg(id)
            .arg(now_ms)
            .arg(budget);
        match s.eval("requeue", &call).await? {
            Value::Int(1) => Ok(true),
            Value::Int(0) => Ok(false),
            _ => Err(unexpected("requeue")),
        }
    }

    async fn job_get(&self, id: JobId) -> StoreResult<Option<JobRecord>> {
        let s = &self.shared;
        let mut conn = s.conn.clone();
        let v = s
            .run("job", async {
                ::redis::cmd("HGETALL")
                    .arg(job_key(id))
                    .query_async::<Value>(&mut conn)
                    .await
            })
            .await?;
        job_record(v)
    }

    async fn job_list(
        &self,
        status: Option<JobStatus>,
        limit: usize,
    ) -> StoreResult<Vec<JobRecord>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let s = &self.shared;
        let call = Call::new(&s.scripts.guard.list)
            .key(JOB_SEQ)
            .arg(status.map_or("", JobStatus::as_str))
            .arg(limit.min(JOB_LIST_MAX));
        job_records(s.eval("list jobs", &call).await?, "list jobs")
    }

    async fn job_stats(&self, now_ms: u64) -> StoreResult<JobStats> {
        let s = &self.shared;
        let call = Call::new(&s.scripts.guard.stats).key(JOB_SEQ).arg(now_ms);
        let v = as_array(s.eval("job stats", &call).await?).ok_or_else(|| unexpected("stats"))?;
        let n: Option<Vec<u64>> = v.iter().take(10).map(as_u64).collect();
        let (Some(n), Some(oldest)) = (n.filter(|n| n.len() == 10), v.get(10)) else {
            return Err(unexpected("job stats"));
        };
        Ok(JobStats {
            by_status: JobStatus::ALL
                .into_iter()
                .zip(n[0..4].iter().copied())
                .collect(),
            queued_by_class: QosClass::ALL
                .into_iter()
                .zip(n[4..7].iter().copied())
                .collect(),
            running_by_class: QosClass::ALL
                .into_iter()
                .zip(n[7..10].iter().copied())
                .collect(),
            // -1: no due queued job.
            oldest_queued_at_ms: as_u64(oldest),
        })
    }

    async fn job_purge_done(&self, before_ms: u64) -> StoreResult<u64> {
        let s = &self.shared;
        let mut purged = 0;
        for _ in 0..PURGE_ROUNDS {
            let call = Call::new(&s.scripts.guard.purge)
                .key(JOB_SEQ)
                .key(JOB_DEDUPE)
                .arg(before_ms);
            let n = as_u64(&s.eval("purge jobs", &call).await?)
                .ok_or_else(|| unexpected("purge jobs"))?;
            purged += n;
            if n < lua::PURGE_BATCH as u64 {
                break;
            }
        }
        Ok(purged)
    }

    async fn idem_begin(
        &self,
        scope: &str,
        key: &str,
        fingerprint: [u8; 32],
        ttl_ms: u64,
        claim_ms: u64,
        now_ms: u64,
    ) -> StoreResult<IdemBegin> {
        let s = &self.shared;
        let prefix = idem_prefix(scope);
        let call = Call::new(&s.scripts.guard.idem_begin)
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
        let v = as_array(s.eval("idempotency begin", &call).await?)
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

    async fn idem_finish(
        &self,
        scope: &str,
        key: &str,
        answer: &str,
        _now_ms: u64,
    ) -> StoreResult<()> {
        let s = &self.shared;
        let call = Call::new(&s.scripts.guard.idem_finish)
            .key(format!("{}{key}", idem_prefix(scope)))
            .arg(answer);
        s.eval("idempotency finish", &call).await?;
        Ok(())
    }

    async fn idem_list(
        &self,
        scope: Option<&str>,
        limit: usize,
        now_ms: u64,
    ) -> StoreResult<Vec<IdemRecord>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let s = &self.shared;
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
                s.set_members(IDEM_SCOPES).await?,
                s.publish_streams().await?,
            ),
        };
        let webhook = futures_util::stream::iter(scopes)
            .map(|sc| async move { s.webhook_records(&sc, limit, now_ms).await })
            .buffer_unordered(SCOPES_AT_ONCE)
            .collect::<Vec<_>>();
        let publish = futures_util::stream::iter(streams)
            .map(|st| async move { s.publish_records(&st, limit, now_ms).await })
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

    async fn idem_scopes(&self, now_ms: u64) -> StoreResult<BTreeMap<String, IdemScopeStats>> {
        let s = &self.shared;
        let (scopes, streams) = tokio::join!(s.set_members(IDEM_SCOPES), s.publish_streams());
        let webhook = futures_util::stream::iter(scopes?)
            .map(|sc| async move {
                let st = s.webhook_stats(&sc, now_ms).await?;
                Ok::<_, StoreError>((sc, st))
            })
            .buffer_unordered(SCOPES_AT_ONCE)
            .collect::<Vec<_>>();
        let publish = futures_util::stream::iter(streams?)
            .map(|stream| async move {
                let st = s.publish_scope_stats(&stream, now_ms).await?;
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

#[cfg(test)]
mod tests {
    use ::redis::cluster_routing::Slot;

    use super::*;

    #[test]
    fn each_family_of_keys_is_on_one_slot() {
        let slot = Slot::for_key(JOB_SEQ);
        for k in [JOB_DEDUPE, &job_key(u64::MAX)] {
            assert_eq!(Slot::for_key(k), slot, "{k}");
        }
        assert_eq!(slot, Slot::for_key("jobs"));
        let slot = Slot::for_key(IDEM_SCOPES);
        for scope in ["gh", "a {b} c", "publish:x"] {
            for k in [
                format!("{}any {{key}}", idem_prefix(scope)),
                idem_created_key(scope),
                idem_expiry_key(scope),
            ] {
                assert_eq!(Slot::for_key(&k), slot, "{k}");
            }
        }
        assert_eq!(slot, Slot::for_key("idem"));
    }

    #[test]
    fn record_keys_do_not_collide_across_scopes() {
        assert_ne!(
            format!("{}c", idem_prefix("a:b")),
            format!("{}b:c", idem_prefix("a"))
        );
    }

    #[test]
    fn job_records_decode_and_broken_ones_are_refused() {
        let hash = |pairs: &[(&str, &str)]| {
            Value::Array(
                pairs
                    .iter()
                    .flat_map(|(k, v)| {
                        [
                            Value::BulkString(k.as_bytes().to_vec()),
                            Value::BulkString(v.as_bytes().to_vec()),
                        ]
                    })
                    .collect(),
            )
        };
        let mut pairs = vec![
            ("id", "1800000000000000"),
            ("kind", "webhook:gh"),
            ("class", "interactive"),
            ("up", "app"),
            ("pay", "{\"a\":1}"),
            ("st", "running"),
            ("att", "2"),
            ("max", "5"),
            ("cr", "10"),
            ("av", "11"),
            ("le", "12"),
            ("wk", "w1"),
            ("fin", "0"),
        ];
        let j = job_record(hash(&pairs)).unwrap().unwrap();
        assert_eq!(
            (j.id, j.class, j.status, j.attempts, j.worker.as_deref()),
            (
                1_800_000_000_000_000,
                QosClass::Interactive,
                JobStatus::Running,
                2,
                Some("w1")
            )
        );
        assert_eq!((j.dedupe_key, j.last_error), (None, None));
        assert_eq!(job_record(Value::Array(vec![])).unwrap(), None);
        pairs[2] = ("class", "urgent");
        assert!(job_record(hash(&pairs)).is_err());
    }
}
