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
//!
//! This file holds the scripts and the [`GuardStore`] methods, which delegate: the job queue is
//! `jobs.rs`, the idempotency records and their listings `idempotency.rs`, the key names
//! `keys.rs`.
//!
//! Must not: decide a guard rule outside a script (each operation is one atomic step).

use std::collections::BTreeMap;

use async_trait::async_trait;

use super::RedisStore;
use super::conn::Lua;
use super::guard_lua as lua;
use crate::StoreResult;
use crate::guard::*;

pub(super) struct GuardScripts {
    pub(super) enqueue: Lua,
    pub(super) claim: Lua,
    pub(super) heartbeat: Lua,
    pub(super) finish: Lua,
    pub(super) requeue: Lua,
    pub(super) list: Lua,
    pub(super) stats: Lua,
    pub(super) purge: Lua,
    pub(super) idem_begin: Lua,
    pub(super) idem_finish: Lua,
    pub(super) idem_scope: Lua,
    pub(super) publish_keys: Lua,
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

#[async_trait]
impl GuardStore for RedisStore {
    async fn job_enqueue(
        &self,
        job: NewJob,
        caps: &QueuedCaps,
        now_ms: u64,
    ) -> StoreResult<Enqueued> {
        self.shared.job_enqueue(job, caps, now_ms).await
    }

    async fn job_claim(
        &self,
        worker: &str,
        limit: usize,
        caps: &RunningCaps,
        lease_ms: u64,
        now_ms: u64,
    ) -> StoreResult<Vec<LeasedJob>> {
        self.shared
            .job_claim(worker, limit, caps, lease_ms, now_ms)
            .await
    }

    async fn job_heartbeat(&self, lease: Lease, lease_ms: u64, now_ms: u64) -> StoreResult<()> {
        self.shared.job_heartbeat(lease, lease_ms, now_ms).await
    }

    async fn job_complete(&self, lease: Lease, now_ms: u64) -> StoreResult<()> {
        self.shared.job_complete(lease, now_ms).await
    }

    async fn job_fail(&self, lease: Lease, failure: Failure, now_ms: u64) -> StoreResult<()> {
        self.shared.job_fail(lease, failure, now_ms).await
    }

    async fn job_requeue(&self, id: JobId, budget: u32, now_ms: u64) -> StoreResult<bool> {
        self.shared.job_requeue(id, budget, now_ms).await
    }

    async fn job_get(&self, id: JobId) -> StoreResult<Option<JobRecord>> {
        self.shared.job_get(id).await
    }

    async fn job_list(
        &self,
        status: Option<JobStatus>,
        limit: usize,
    ) -> StoreResult<Vec<JobRecord>> {
        self.shared.job_list(status, limit).await
    }

    async fn job_stats(&self, now_ms: u64) -> StoreResult<JobStats> {
        self.shared.job_stats(now_ms).await
    }

    async fn job_purge_done(&self, before_ms: u64) -> StoreResult<u64> {
        self.shared.job_purge_done(before_ms).await
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
        self.shared
            .idem_begin(scope, key, fingerprint, ttl_ms, claim_ms, now_ms)
            .await
    }

    async fn idem_finish(
        &self,
        scope: &str,
        key: &str,
        answer: &str,
        _now_ms: u64,
    ) -> StoreResult<()> {
        self.shared.idem_finish(scope, key, answer, _now_ms).await
    }

    async fn idem_list(
        &self,
        scope: Option<&str>,
        limit: usize,
        now_ms: u64,
    ) -> StoreResult<Vec<IdemRecord>> {
        self.shared.idem_list(scope, limit, now_ms).await
    }

    async fn idem_scopes(&self, now_ms: u64) -> StoreResult<BTreeMap<String, IdemScopeStats>> {
        self.shared.idem_scopes(now_ms).await
    }
}
