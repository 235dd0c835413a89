//! What the guardrails keep in the store: the durable job queue for upstream deliveries and
//! the idempotency records of webhook intake (SPEC §7).
//!
//! Contract every implementation keeps (checked by `tests/guard_behaviour.rs`):
//! - Every call is atomic: a crash leaves a job either before or after the call, never half.
//! - `job_enqueue` with a `dedupe_key` already used by a job that still exists returns that
//!   job (`Enqueued::Existing`) and enqueues nothing; queued caps are checked in the same
//!   step as the insert (`StoreError::QueueFull`).
//! - `job_claim` hands out due jobs (`available_at_ms <= now`): queued ones and running ones
//!   whose lease expired (their worker died: redelivery). Classes are served in priority
//!   order (`realtime`, `interactive`, `batch`), oldest `available_at_ms` first (then lowest
//!   id) within a class. Running caps per class and per kind count the running jobs whose
//!   lease has not expired, including the ones this claim hands out. Every claim increments
//!   `attempts`; the lease is the pair (job id, attempts). `attempts` never goes back (only an
//!   uncounted retry gives back the attempt it just took, before anyone else can claim), so
//!   no two claims of a job ever hand out the same lease.
//! - Only the current lease holder may heartbeat, complete or fail a job: a lease whose
//!   attempt number is not the job's current one, or a job no longer running, is refused with
//!   `StoreError::StaleLease` and changes nothing. An expired lease that nobody has claimed
//!   since is still the current one.
//! - Idempotency records: `idem_begin` either creates the record (`Fresh`, state in progress,
//!   the caller now owns it) or reports what exists; duplicates (`InProgress` and `Done`)
//!   increment `hit_count` in the same step. An in-progress record whose claim lapsed
//!   (`claim_ms` passed without `idem_finish`: the owner crashed) is taken over: `Fresh`
//!   again. Records expire `ttl_ms` after creation.

use std::collections::BTreeMap;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::StoreResult;

/// Quality-of-service class of a job: realtime before interactive before batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QosClass {
    Realtime,
    Interactive,
    Batch,
}

impl QosClass {
    pub const ALL: [QosClass; 3] = [QosClass::Realtime, QosClass::Interactive, QosClass::Batch];

    pub fn as_str(self) -> &'static str {
        match self {
            QosClass::Realtime => "realtime",
            QosClass::Interactive => "interactive",
            QosClass::Batch => "batch",
        }
    }

    pub fn parse(s: &str) -> Option<QosClass> {
        QosClass::ALL.into_iter().find(|c| c.as_str() == s)
    }

    /// 0 for realtime, 1 interactive, 2 batch (index into per-class arrays).
    pub fn index(self) -> usize {
        self as usize
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    /// Waiting for a worker (possibly not due yet: `available_at_ms` in the future, a retry
    /// waiting out its backoff).
    Queued,
    /// Held by a worker's lease.
    Running,
    /// Delivered.
    Done,
    /// Gave up after `max_attempts` (or a permanent failure): a dead letter.
    Dead,
}

impl JobStatus {
    pub const ALL: [JobStatus; 4] = [
        JobStatus::Queued,
        JobStatus::Running,
        JobStatus::Done,
        JobStatus::Dead,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Done => "done",
            JobStatus::Dead => "dead",
        }
    }

    pub fn parse(s: &str) -> Option<JobStatus> {
        JobStatus::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

pub type JobId = u64;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewJob {
    /// What the job does, e.g. `publish` or `webhook:github`; running caps apply per kind.
    pub kind: String,
    pub class: QosClass,
    /// Name of the upstream it is delivered to.
    pub upstream: String,
    /// The body delivered (JSON text).
    pub payload: String,
    /// A second enqueue with the same key, while the first job exists, returns the first.
    pub dedupe_key: Option<String>,
    pub max_attempts: u32,
    pub available_at_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Enqueued {
    New(JobId),
    /// The dedupe key was taken: this job already exists, nothing was enqueued.
    Existing(JobId),
}

impl Enqueued {
    pub fn id(&self) -> JobId {
        match self {
            Enqueued::New(id) | Enqueued::Existing(id) => *id,
        }
    }
}

/// Queued caps, checked at enqueue: jobs of the class in status `queued` (0 = no cap).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QueuedCaps {
    pub per_class: [u64; 3],
}

/// Running caps, checked at claim (0 = no cap).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunningCaps {
    pub per_class: [u64; 3],
    /// Cap for the kinds named here.
    pub per_kind: BTreeMap<String, u64>,
    /// Cap for every kind not named in `per_kind`.
    pub default_per_kind: u64,
}

impl RunningCaps {
    pub fn for_kind(&self, kind: &str) -> u64 {
        self.per_kind
            .get(kind)
            .copied()
            .unwrap_or(self.default_per_kind)
    }
}

/// A job as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct JobRecord {
    pub id: JobId,
    pub kind: String,
    pub class: QosClass,
    pub upstream: String,
    pub payload: String,
    pub dedupe_key: Option<String>,
    pub status: JobStatus,
    /// Claims so far (each delivery attempt, including ones whose worker died).
    pub attempts: u32,
    pub max_attempts: u32,
    pub created_at_ms: u64,
    pub available_at_ms: u64,
    /// While running: when the lease expires. Otherwise 0.
    pub lease_expires_at_ms: u64,
    /// While running: who holds the lease.
    pub worker: Option<String>,
    pub last_error: Option<String>,
    /// When it reached `done` or `dead` (0 before).
    pub finished_at_ms: u64,
}

/// Proof of holding a job: the attempt number the claim produced.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Lease {
    pub job: JobId,
    pub attempt: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeasedJob {
    pub lease: Lease,
    /// The job as it is after the claim (status running, attempts incremented).
    pub job: JobRecord,
}

/// How a failed attempt ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failure {
    /// Back to `queued`, due at `at_ms`. `counted: false` gives the attempt back (the job
    /// never reached the upstream, e.g. every circuit was open): `attempts` is decremented.
    Retry {
        at_ms: u64,
        error: String,
        counted: bool,
    },
    /// To the dead letters.
    Dead { error: String },
}

/// Counts for the snapshot, `GET /admin/jobs` and the metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JobStats {
    /// Every status, zeros included.
    pub by_status: BTreeMap<JobStatus, u64>,
    /// Queued jobs per class, zeros included.
    pub queued_by_class: BTreeMap<QosClass, u64>,
    /// Running jobs per class, zeros included.
    pub running_by_class: BTreeMap<QosClass, u64>,
    /// `created_at_ms` of the oldest job in status `queued` that is due (`available_at_ms <=
    /// now`), if any.
    pub oldest_queued_at_ms: Option<u64>,
}

impl JobStats {
    /// Jobs in `status` (0 when a store left it out).
    pub fn count(&self, status: JobStatus) -> u64 {
        self.by_status.get(&status).copied().unwrap_or(0)
    }

    /// How long the oldest due queued job has waited at `now_ms`; 0 when none waits.
    pub fn oldest_queued_age_ms(&self, now_ms: u64) -> u64 {
        self.oldest_queued_at_ms
            .map_or(0, |t| now_ms.saturating_sub(t))
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IdemBegin {
    /// The caller owns the record now and must `idem_finish` it.
    Fresh,
    /// Another request with this key is running.
    InProgress,
    /// Answered before: the stored answer, and the hit count including this duplicate.
    Done { answer: String, hit_count: u64 },
    /// The key was used with another fingerprint: nothing changed.
    Reused,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct IdemRecord {
    pub scope: String,
    pub key: String,
    /// `in_progress` or `done`.
    pub state: &'static str,
    /// Duplicates seen after the first request.
    pub hit_count: u64,
    pub created_at_ms: u64,
    pub expires_at_ms: u64,
}

/// Per scope: how many keys are kept and how many duplicates they absorbed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct IdemScopeStats {
    pub keys: u64,
    pub hit_count: u64,
}

/// The scope under which the publish `Idempotency-Key`s of one stream are listed.
pub fn publish_scope(stream: &str) -> String {
    format!("publish:{stream}")
}

#[async_trait]
pub trait GuardStore: Send + Sync {
    /// Enqueues a job, or returns the one holding its dedupe key.
    async fn job_enqueue(
        &self,
        job: NewJob,
        caps: &QueuedCaps,
        now_ms: u64,
    ) -> StoreResult<Enqueued>;

    /// Leases up to `limit` due jobs to `worker` for `lease_ms`, under the running caps.
    async fn job_claim(
        &self,
        worker: &str,
        limit: usize,
        caps: &RunningCaps,
        lease_ms: u64,
        now_ms: u64,
    ) -> StoreResult<Vec<LeasedJob>>;

    /// Extends the lease to `now_ms + lease_ms`.
    async fn job_heartbeat(&self, lease: Lease, lease_ms: u64, now_ms: u64) -> StoreResult<()>;

    /// Marks the job done.
    async fn job_complete(&self, lease: Lease, now_ms: u64) -> StoreResult<()>;

    /// Ends a failed attempt: back to the queue or to the dead letters.
    async fn job_fail(&self, lease: Lease, failure: Failure, now_ms: u64) -> StoreResult<()>;

    /// Puts a dead letter back in the queue, due now, with `budget` more attempts
    /// (`max_attempts` = `attempts` + `budget`; `attempts` keeps counting, so a lease from
    /// before the requeue stays stale). `false` when no dead letter has this id.
    async fn job_requeue(&self, id: JobId, budget: u32, now_ms: u64) -> StoreResult<bool>;

    async fn job_get(&self, id: JobId) -> StoreResult<Option<JobRecord>>;

    /// Jobs in `status` (every status when `None`), newest first (highest id), at most `limit`.
    async fn job_list(
        &self,
        status: Option<JobStatus>,
        limit: usize,
    ) -> StoreResult<Vec<JobRecord>>;

    async fn job_stats(&self, now_ms: u64) -> StoreResult<JobStats>;

    /// Removes jobs that are `done` and finished before `before_ms`; returns how many.
    async fn job_purge_done(&self, before_ms: u64) -> StoreResult<u64>;

    async fn idem_begin(
        &self,
        scope: &str,
        key: &str,
        fingerprint: [u8; 32],
        ttl_ms: u64,
        claim_ms: u64,
        now_ms: u64,
    ) -> StoreResult<IdemBegin>;

    /// Stores the answer of a `Fresh` record (state done).
    async fn idem_finish(
        &self,
        scope: &str,
        key: &str,
        answer: &str,
        now_ms: u64,
    ) -> StoreResult<()>;

    /// Unexpired records, newest first, at most `limit`. `scope` selects one scope; a
    /// `publish:<stream>` scope lists that stream's publish `Idempotency-Key`s (state done,
    /// `hit_count` = duplicates answered). `None` lists the webhook scopes and every stream's
    /// publish keys.
    async fn idem_list(
        &self,
        scope: Option<&str>,
        limit: usize,
        now_ms: u64,
    ) -> StoreResult<Vec<IdemRecord>>;

    /// Per scope (webhook scopes and `publish:<stream>` scopes that hold keys).
    async fn idem_scopes(&self, now_ms: u64) -> StoreResult<BTreeMap<String, IdemScopeStats>>;
}
