//! The `sqlite` store's [`GuardStore`]: the job queue (`jobs.rs`) and the webhook idempotency
//! records (`idempotency.rs`, beside the publish keys), and the tables both live in.
//!
//! Every change goes through the writer thread like an append: one call is one command of a
//! group commit, answered after `COMMIT`, so a `kill -9` after the answer cannot take it back,
//! and claims are serialised with every other write (a job is handed out once however many
//! workers ask at the same time). Each command decides everything before it writes, so a
//! refusal (`StaleLease`, `QueueFull`) leaves the rows untouched. Reads use the reader
//! connections, each in one snapshot.
//!
//! Layout: `jobs` ids come from `AUTOINCREMENT`, so an id is never reused, even after the
//! newest job was purged (a lease or a dedupe answer naming it stays unambiguous). `class` is
//! stored as its priority index, so that the claim index `(status, class, available_at_ms,
//! id)` yields due jobs of one class in claim order. Dedupe keys live in a partial unique
//! index. `webhook_idempotency` is keyed (scope, key); expired records are ignored by every
//! read, dropped when their key is used again and swept with the other expired rows. Publish
//! keys stay in the log's `idempotency` table (written and counted in the append's commit):
//! they are only listed (by `idempotency.rs`).
//!
//! Must not: write anywhere but on the writer, or read outside one snapshot.

use std::collections::BTreeMap;

use async_trait::async_trait;

use super::readers::snapshot;
use super::{SqliteStore, idempotency, jobs};
use crate::StoreResult;
use crate::guard::*;

pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    class INTEGER NOT NULL,
    upstream TEXT NOT NULL,
    payload TEXT NOT NULL,
    dedupe_key TEXT,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    max_attempts INTEGER NOT NULL,
    created_ms INTEGER NOT NULL,
    available_at_ms INTEGER NOT NULL,
    lease_expires_ms INTEGER NOT NULL,
    worker TEXT,
    last_error TEXT,
    finished_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_claim ON jobs (status, class, available_at_ms, id);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_dedupe ON jobs (dedupe_key) WHERE dedupe_key IS NOT NULL;
CREATE TABLE IF NOT EXISTS webhook_idempotency (
    scope TEXT NOT NULL,
    key TEXT NOT NULL,
    fingerprint BLOB NOT NULL,
    answer TEXT,
    hit_count INTEGER NOT NULL,
    created_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL,
    claim_until_ms INTEGER NOT NULL,
    PRIMARY KEY (scope, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS webhook_idempotency_expires ON webhook_idempotency (expires_ms);
";

/// Times and counts as SQLite integers (values past `i64::MAX` are not times anyone waits for).
pub(super) fn sql(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub(super) fn unsigned(v: i64) -> u64 {
    v.max(0) as u64
}

#[async_trait]
impl GuardStore for SqliteStore {
    async fn job_enqueue(
        &self,
        job: NewJob,
        caps: &QueuedCaps,
        now_ms: u64,
    ) -> StoreResult<Enqueued> {
        let caps = caps.clone();
        self.write(move |c| jobs::enqueue(c, job, &caps, now_ms))
            .await
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
        let (worker, caps) = (worker.to_string(), caps.clone());
        self.write(move |c| jobs::claim(c, &worker, limit, &caps, lease_ms, now_ms))
            .await
    }

    async fn job_heartbeat(&self, lease: Lease, lease_ms: u64, now_ms: u64) -> StoreResult<()> {
        self.write(move |c| jobs::heartbeat(c, lease, lease_ms, now_ms))
            .await
    }

    async fn job_complete(&self, lease: Lease, now_ms: u64) -> StoreResult<()> {
        self.write(move |c| jobs::complete(c, lease, now_ms)).await
    }

    async fn job_fail(&self, lease: Lease, failure: Failure, now_ms: u64) -> StoreResult<()> {
        self.write(move |c| jobs::fail(c, lease, failure, now_ms))
            .await
    }

    async fn job_requeue(&self, id: JobId, budget: u32, now_ms: u64) -> StoreResult<bool> {
        self.write(move |c| jobs::requeue(c, id, budget, now_ms))
            .await
    }

    async fn job_get(&self, id: JobId) -> StoreResult<Option<JobRecord>> {
        self.readers.run_now(|c, _| jobs::get(c, id))
    }

    async fn job_list(
        &self,
        status: Option<JobStatus>,
        limit: usize,
    ) -> StoreResult<Vec<JobRecord>> {
        self.readers
            .run(move |c, _| jobs::list(c, status, limit))
            .await
    }

    async fn job_stats(&self, now_ms: u64) -> StoreResult<JobStats> {
        self.readers
            .run(move |c, _| snapshot(c, |c| jobs::stats(c, now_ms)))
            .await
    }

    async fn job_purge_done(&self, before_ms: u64) -> StoreResult<u64> {
        self.write(move |c| jobs::purge_done(c, before_ms)).await
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
        let (scope, key) = (scope.to_string(), key.to_string());
        self.write(move |c| {
            idempotency::idem_begin(c, &scope, &key, fingerprint, ttl_ms, claim_ms, now_ms)
        })
        .await
    }

    async fn idem_finish(
        &self,
        scope: &str,
        key: &str,
        answer: &str,
        _now_ms: u64,
    ) -> StoreResult<()> {
        let (scope, key, answer) = (scope.to_string(), key.to_string(), answer.to_string());
        self.write(move |c| idempotency::idem_finish(c, &scope, &key, &answer))
            .await
    }

    async fn idem_list(
        &self,
        scope: Option<&str>,
        limit: usize,
        now_ms: u64,
    ) -> StoreResult<Vec<IdemRecord>> {
        let scope = scope.map(str::to_string);
        let ttl = self.idempotency_ttl_ms;
        self.readers
            .run(move |c, _| {
                snapshot(c, |c| {
                    idempotency::idem_list(c, scope.as_deref(), limit, now_ms, ttl)
                })
            })
            .await
    }

    async fn idem_scopes(&self, now_ms: u64) -> StoreResult<BTreeMap<String, IdemScopeStats>> {
        let ttl = self.idempotency_ttl_ms;
        self.readers
            .run(move |c, _| snapshot(c, |c| idempotency::idem_scopes(c, now_ms, ttl)))
            .await
    }
}
