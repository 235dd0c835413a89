//! The memory store's job queue and webhook idempotency records: the reference for the
//! rules in [`crate::guard`], kept as plain maps under the store's one mutex.
//!
//! Must not: hold anything a restart should keep (it is for tests).

use std::collections::{BTreeMap, HashMap};

use async_trait::async_trait;

use crate::guard::*;
use crate::{MemoryStore, StoreError, StoreResult};

#[derive(Default)]
pub(crate) struct GuardState {
    next_id: JobId,
    jobs: BTreeMap<JobId, JobRecord>,
    dedupe: HashMap<String, JobId>,
    idem: HashMap<(String, String), Idem>,
}

struct Idem {
    fingerprint: [u8; 32],
    answer: Option<String>,
    hit_count: u64,
    created_at_ms: u64,
    expires_at_ms: u64,
    claim_until_ms: u64,
}

impl GuardState {
    fn leased(&mut self, lease: Lease) -> StoreResult<&mut JobRecord> {
        match self.jobs.get_mut(&lease.job) {
            Some(j) if j.status == JobStatus::Running && j.attempts == lease.attempt => Ok(j),
            _ => Err(StoreError::StaleLease {
                job: lease.job,
                attempt: lease.attempt,
            }),
        }
    }

    fn finish(&mut self, id: JobId, status: JobStatus, error: Option<String>, now_ms: u64) {
        if let Some(j) = self.jobs.get_mut(&id) {
            j.status = status;
            j.lease_expires_at_ms = 0;
            j.worker = None;
            if error.is_some() {
                j.last_error = error;
            }
            j.finished_at_ms = now_ms;
        }
    }

    fn expire_idem(&mut self, now_ms: u64) {
        self.idem.retain(|_, r| r.expires_at_ms > now_ms);
    }
}

fn running_live(j: &JobRecord, now_ms: u64) -> bool {
    j.status == JobStatus::Running && j.lease_expires_at_ms > now_ms
}

#[async_trait]
impl GuardStore for MemoryStore {
    async fn job_enqueue(
        &self,
        job: NewJob,
        caps: &QueuedCaps,
        now_ms: u64,
    ) -> StoreResult<Enqueued> {
        let mut st = self.inner.lock();
        let g = &mut st.guard;
        if let Some(k) = &job.dedupe_key
            && let Some(id) = g.dedupe.get(k)
            && g.jobs.contains_key(id)
        {
            return Ok(Enqueued::Existing(*id));
        }
        let cap = caps.per_class[job.class.index()];
        if cap > 0 {
            let queued = g
                .jobs
                .values()
                .filter(|j| j.class == job.class && j.status == JobStatus::Queued)
                .count() as u64;
            if queued >= cap {
                return Err(StoreError::QueueFull {
                    class: job.class,
                    cap,
                });
            }
        }
        g.next_id += 1;
        let id = g.next_id;
        if let Some(k) = &job.dedupe_key {
            g.dedupe.insert(k.clone(), id);
        }
        g.jobs.insert(
            id,
            JobRecord {
                id,
                kind: job.kind,
                class: job.class,
                upstream: job.upstream,
                payload: job.payload,
                dedupe_key: job.dedupe_key,
                status: JobStatus::Queued,
                attempts: 0,
                max_attempts: job.max_attempts,
                created_at_ms: now_ms,
                available_at_ms: job.available_at_ms,
                lease_expires_at_ms: 0,
                worker: None,
                last_error: None,
                finished_at_ms: 0,
            },
        );
        Ok(Enqueued::New(id))
    }

    async fn job_claim(
        &self,
        worker: &str,
        limit: usize,
        caps: &RunningCaps,
        lease_ms: u64,
        now_ms: u64,
    ) -> StoreResult<Vec<LeasedJob>> {
        let mut st = self.inner.lock();
        let g = &mut st.guard;
        let mut per_class = [0u64; 3];
        let mut per_kind: HashMap<String, u64> = HashMap::new();
        for j in g.jobs.values().filter(|j| running_live(j, now_ms)) {
            per_class[j.class.index()] += 1;
            *per_kind.entry(j.kind.clone()).or_default() += 1;
        }
        let mut due: Vec<(QosClass, u64, JobId)> = g
            .jobs
            .values()
            .filter(|j| {
                j.available_at_ms <= now_ms
                    && (j.status == JobStatus::Queued
                        || (j.status == JobStatus::Running && j.lease_expires_at_ms <= now_ms))
            })
            .map(|j| (j.class, j.available_at_ms, j.id))
            .collect();
        due.sort();
        let mut out = Vec::new();
        for (class, _, id) in due {
            if out.len() >= limit {
                break;
            }
            let j = &g.jobs[&id];
            let class_cap = caps.per_class[class.index()];
            if class_cap > 0 && per_class[class.index()] >= class_cap {
                continue;
            }
            let kind_cap = caps.for_kind(&j.kind);
            let running = per_kind.get(&j.kind).copied().unwrap_or(0);
            if kind_cap > 0 && running >= kind_cap {
                continue;
            }
            per_class[class.index()] += 1;
            *per_kind.entry(j.kind.clone()).or_default() += 1;
            let j = g.jobs.get_mut(&id).expect("listed above");
            j.status = JobStatus::Running;
            j.attempts += 1;
            j.lease_expires_at_ms = now_ms + lease_ms;
            j.worker = Some(worker.to_string());
            out.push(LeasedJob {
                lease: Lease {
                    job: id,
                    attempt: j.attempts,
                },
                job: j.clone(),
            });
        }
        Ok(out)
    }

    async fn job_heartbeat(&self, lease: Lease, lease_ms: u64, now_ms: u64) -> StoreResult<()> {
        let mut st = self.inner.lock();
        st.guard.leased(lease)?.lease_expires_at_ms = now_ms + lease_ms;
        Ok(())
    }

    async fn job_complete(&self, lease: Lease, now_ms: u64) -> StoreResult<()> {
        let mut st = self.inner.lock();
        st.guard.leased(lease)?;
        st.guard.finish(lease.job, JobStatus::Done, None, now_ms);
        Ok(())
    }

    async fn job_fail(&self, lease: Lease, failure: Failure, now_ms: u64) -> StoreResult<()> {
        let mut st = self.inner.lock();
        let j = st.guard.leased(lease)?;
        match failure {
            Failure::Retry {
                at_ms,
                error,
                counted,
            } => {
                j.status = JobStatus::Queued;
                j.available_at_ms = at_ms;
                j.lease_expires_at_ms = 0;
                j.worker = None;
                j.last_error = Some(error);
                if !counted {
                    j.attempts = j.attempts.saturating_sub(1);
                }
            }
            Failure::Dead { error } => {
                st.guard
                    .finish(lease.job, JobStatus::Dead, Some(error), now_ms);
            }
        }
        Ok(())
    }

    async fn job_requeue(&self, id: JobId, budget: u32, now_ms: u64) -> StoreResult<bool> {
        let mut st = self.inner.lock();
        match st.guard.jobs.get_mut(&id) {
            Some(j) if j.status == JobStatus::Dead => {
                j.status = JobStatus::Queued;
                j.max_attempts = j.attempts.saturating_add(budget);
                j.available_at_ms = now_ms;
                j.finished_at_ms = 0;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn job_get(&self, id: JobId) -> StoreResult<Option<JobRecord>> {
        Ok(self.inner.lock().guard.jobs.get(&id).cloned())
    }

    async fn job_list(
        &self,
        status: Option<JobStatus>,
        limit: usize,
    ) -> StoreResult<Vec<JobRecord>> {
        let st = self.inner.lock();
        Ok(st
            .guard
            .jobs
            .values()
            .rev()
            .filter(|j| status.is_none_or(|s| j.status == s))
            .take(limit)
            .cloned()
            .collect())
    }

    async fn job_stats(&self, now_ms: u64) -> StoreResult<JobStats> {
        let st = self.inner.lock();
        let mut stats = JobStats {
            by_status: JobStatus::ALL.into_iter().map(|s| (s, 0)).collect(),
            queued_by_class: QosClass::ALL.into_iter().map(|c| (c, 0)).collect(),
            running_by_class: QosClass::ALL.into_iter().map(|c| (c, 0)).collect(),
            oldest_queued_at_ms: None,
        };
        for j in st.guard.jobs.values() {
            *stats.by_status.entry(j.status).or_default() += 1;
            match j.status {
                JobStatus::Queued => {
                    *stats.queued_by_class.entry(j.class).or_default() += 1;
                    if j.available_at_ms <= now_ms {
                        let oldest = stats.oldest_queued_at_ms.get_or_insert(j.created_at_ms);
                        *oldest = (*oldest).min(j.created_at_ms);
                    }
                }
                JobStatus::Running => *stats.running_by_class.entry(j.class).or_default() += 1,
                _ => {}
            }
        }
        Ok(stats)
    }

    async fn job_purge_done(&self, before_ms: u64) -> StoreResult<u64> {
        let mut st = self.inner.lock();
        let g = &mut st.guard;
        let gone: Vec<JobId> = g
            .jobs
            .values()
            .filter(|j| j.status == JobStatus::Done && j.finished_at_ms < before_ms)
            .map(|j| j.id)
            .collect();
        for id in &gone {
            if let Some(j) = g.jobs.remove(id)
                && let Some(k) = j.dedupe_key
            {
                g.dedupe.remove(&k);
            }
        }
        Ok(gone.len() as u64)
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
        let mut st = self.inner.lock();
        let g = &mut st.guard;
        g.expire_idem(now_ms);
        let id = (scope.to_string(), key.to_string());
        if let Some(r) = g.idem.get_mut(&id) {
            if r.fingerprint != fingerprint {
                return Ok(IdemBegin::Reused);
            }
            match &r.answer {
                Some(a) => {
                    r.hit_count += 1;
                    return Ok(IdemBegin::Done {
                        answer: a.clone(),
                        hit_count: r.hit_count,
                    });
                }
                None if r.claim_until_ms > now_ms => {
                    r.hit_count += 1;
                    return Ok(IdemBegin::InProgress);
                }
                None => {
                    // The owner's claim lapsed (it crashed): this request takes over.
                    r.claim_until_ms = now_ms + claim_ms;
                    return Ok(IdemBegin::Fresh);
                }
            }
        }
        g.idem.insert(
            id,
            Idem {
                fingerprint,
                answer: None,
                hit_count: 0,
                created_at_ms: now_ms,
                expires_at_ms: now_ms + ttl_ms,
                claim_until_ms: now_ms + claim_ms,
            },
        );
        Ok(IdemBegin::Fresh)
    }

    async fn idem_finish(
        &self,
        scope: &str,
        key: &str,
        answer: &str,
        _now_ms: u64,
    ) -> StoreResult<()> {
        let mut st = self.inner.lock();
        if let Some(r) = st.guard.idem.get_mut(&(scope.to_string(), key.to_string())) {
            r.answer = Some(answer.to_string());
        }
        Ok(())
    }

    async fn idem_list(
        &self,
        scope: Option<&str>,
        limit: usize,
        now_ms: u64,
    ) -> StoreResult<Vec<IdemRecord>> {
        let st = self.inner.lock();
        let mut out: Vec<IdemRecord> = st
            .guard
            .idem
            .iter()
            .filter(|((s, _), r)| scope.is_none_or(|x| x == s) && r.expires_at_ms > now_ms)
            .map(|((s, k), r)| IdemRecord {
                scope: s.clone(),
                key: k.clone(),
                state: if r.answer.is_some() {
                    "done"
                } else {
                    "in_progress"
                },
                hit_count: r.hit_count,
                created_at_ms: r.created_at_ms,
                expires_at_ms: r.expires_at_ms,
            })
            .collect();
        let ttl = self.inner.idempotency_ttl_ms;
        for ((stream, key), e) in &st.idempotency {
            let s = publish_scope(stream.as_str());
            if scope.is_some_and(|x| x != s) || e.created_ms + ttl <= now_ms {
                continue;
            }
            out.push(IdemRecord {
                scope: s,
                key: key.clone(),
                state: "done",
                hit_count: e.hit_count,
                created_at_ms: e.created_ms,
                expires_at_ms: e.created_ms + ttl,
            });
        }
        out.sort_by(|a, b| {
            (b.created_at_ms, &b.scope, &b.key).cmp(&(a.created_at_ms, &a.scope, &a.key))
        });
        out.truncate(limit);
        Ok(out)
    }

    async fn idem_scopes(&self, now_ms: u64) -> StoreResult<BTreeMap<String, IdemScopeStats>> {
        let all = self.idem_list(None, usize::MAX, now_ms).await?;
        let mut out: BTreeMap<String, IdemScopeStats> = BTreeMap::new();
        for r in all {
            let s = out.entry(r.scope).or_default();
            s.keys += 1;
            s.hit_count += r.hit_count;
        }
        Ok(out)
    }
}
