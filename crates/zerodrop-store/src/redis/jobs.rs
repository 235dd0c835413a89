//! The `redis` store's job queue (`zd:{jobs}:…`, one slot): enqueue, claim, heartbeat,
//! complete, fail, requeue, reads, stats and purge, each one script of `guard_lua.rs`, so a
//! refusal (`StaleLease`, `QueueFull`) changes nothing; `guard.rs` hands the calls over.
//! With `WAIT`, an enqueue is acknowledged only once the replicas hold it.
//!
//! Must not: change a job for a lease that is not its current one.

use ::redis::Value;

use super::Shared;
use super::conn::{Call, as_array, as_str, as_u64, fields, unexpected};
use super::guard_lua as lua;
use super::keys::{JOB_DEDUPE, JOB_SEQ, job_key};
use crate::guard::*;
use crate::{StoreError, StoreResult};

/// Most jobs one `job_list` returns (a larger `limit` is cut to it).
pub(super) const JOB_LIST_MAX: usize = 10_000;
/// Purge steps per `job_purge_done` call (each removes up to `lua::PURGE_BATCH`).
pub(super) const PURGE_ROUNDS: usize = 1000;

/// `None` for an empty hash (no such job); `Err` for one that does not decode.
pub(super) fn job_record(v: Value) -> StoreResult<Option<JobRecord>> {
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

pub(super) fn job_records(v: Value, what: &str) -> StoreResult<Vec<JobRecord>> {
    let rows = as_array(v).ok_or_else(|| unexpected(what))?;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        // A job listed by an index is there: an empty hash would be a broken index.
        out.push(job_record(row)?.ok_or_else(|| unexpected(what))?);
    }
    Ok(out)
}

/// 1 applied, 0 refused: the lease is not the job's current one.
pub(super) fn leased(v: Value, lease: Lease, what: &str) -> StoreResult<()> {
    match v {
        Value::Int(1) => Ok(()),
        Value::Int(0) => Err(StoreError::StaleLease {
            job: lease.job,
            attempt: lease.attempt,
        }),
        _ => Err(unexpected(what)),
    }
}

impl Shared {
    pub(super) async fn job_enqueue(
        &self,
        job: NewJob,
        caps: &QueuedCaps,
        now_ms: u64,
    ) -> StoreResult<Enqueued> {
        let n = self.opts.wait_replicas;
        let cap = caps.per_class[job.class.index()];
        let call = Call::new(&self.scripts.guard.enqueue)
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
            self.eval_waiting("enqueue", JOB_SEQ, &call).await?
        } else {
            (self.eval("enqueue", &call).await?, 0)
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
            let timeout_ms = self.opts.wait_timeout.as_millis();
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

    pub(super) async fn job_claim(
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
        let mut call = Call::new(&self.scripts.guard.claim)
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
        let jobs = job_records(self.eval("claim", &call).await?, "claim")?;
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

    pub(super) async fn job_heartbeat(
        &self,
        lease: Lease,
        lease_ms: u64,
        now_ms: u64,
    ) -> StoreResult<()> {
        let call = Call::new(&self.scripts.guard.heartbeat)
            .key(JOB_SEQ)
            .arg(lease.job)
            .arg(lease.attempt)
            .arg(lease_ms)
            .arg(now_ms);
        leased(self.eval("heartbeat", &call).await?, lease, "heartbeat")
    }

    pub(super) async fn job_complete(&self, lease: Lease, now_ms: u64) -> StoreResult<()> {
        let call = Call::new(&self.scripts.guard.finish)
            .key(JOB_SEQ)
            .arg(lease.job)
            .arg(lease.attempt)
            .arg(now_ms)
            .arg("done");
        leased(self.eval("complete", &call).await?, lease, "complete")
    }

    pub(super) async fn job_fail(
        &self,
        lease: Lease,
        failure: Failure,
        now_ms: u64,
    ) -> StoreResult<()> {
        let call = Call::new(&self.scripts.guard.finish)
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
        leased(self.eval("fail", &call).await?, lease, "fail")
    }

    pub(super) async fn job_requeue(
        &self,
        id: JobId,
        budget: u32,
        now_ms: u64,
    ) -> StoreResult<bool> {
        let call = Call::new(&self.scripts.guard.requeue)
            .key(JOB_SEQ)
            .arg(id)
            .arg(now_ms)
            .arg(budget);
        match self.eval("requeue", &call).await? {
            Value::Int(1) => Ok(true),
            Value::Int(0) => Ok(false),
            _ => Err(unexpected("requeue")),
        }
    }

    pub(super) async fn job_get(&self, id: JobId) -> StoreResult<Option<JobRecord>> {
        let mut conn = self.conn.clone();
        let v = self
            .run("job", async {
                ::redis::cmd("HGETALL")
                    .arg(job_key(id))
                    .query_async::<Value>(&mut conn)
                    .await
            })
            .await?;
        job_record(v)
    }

    pub(super) async fn job_list(
        &self,
        status: Option<JobStatus>,
        limit: usize,
    ) -> StoreResult<Vec<JobRecord>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let call = Call::new(&self.scripts.guard.list)
            .key(JOB_SEQ)
            .arg(status.map_or("", JobStatus::as_str))
            .arg(limit.min(JOB_LIST_MAX));
        job_records(self.eval("list jobs", &call).await?, "list jobs")
    }

    pub(super) async fn job_stats(&self, now_ms: u64) -> StoreResult<JobStats> {
        let call = Call::new(&self.scripts.guard.stats)
            .key(JOB_SEQ)
            .arg(now_ms);
        let v =
            as_array(self.eval("job stats", &call).await?).ok_or_else(|| unexpected("stats"))?;
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

    pub(super) async fn job_purge_done(&self, before_ms: u64) -> StoreResult<u64> {
        let mut purged = 0;
        for _ in 0..PURGE_ROUNDS {
            let call = Call::new(&self.scripts.guard.purge)
                .key(JOB_SEQ)
                .key(JOB_DEDUPE)
                .arg(before_ms);
            let n = as_u64(&self.eval("purge jobs", &call).await?)
                .ok_or_else(|| unexpected("purge jobs"))?;
            purged += n;
            if n < lua::PURGE_BATCH as u64 {
                break;
            }
        }
        Ok(purged)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
