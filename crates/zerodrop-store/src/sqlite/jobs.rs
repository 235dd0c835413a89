//! The `sqlite` store's job queue: enqueue (dedupe key, the class's queued cap), claim (due
//! jobs by priority, the running caps, a lease), heartbeat, complete, fail (a retry time or a
//! dead letter), requeue, reads and stats. Every write runs on the writer like an append and
//! decides everything before it writes, so a refusal (`StaleLease`, `QueueFull`) leaves the
//! rows untouched; `guard.rs` hands them over.
//!
//! Must not: change a job for a lease that is not its current one.

use std::collections::HashMap;

use rusqlite::types::Type;
use rusqlite::{Connection, OptionalExtension, Row, params};

use super::guard::{sql, unsigned};
use crate::guard::*;
use crate::{StoreError, StoreResult};

/// The columns [`job_row`] reads, in its order.
macro_rules! job_columns {
    () => {
        "id, kind, class, upstream, payload, dedupe_key, status, attempts, max_attempts, \
         created_ms, available_at_ms, lease_expires_ms, worker, last_error, finished_ms"
    };
}

pub(super) fn bad_value(col: usize, what: &str) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(col, Type::Text, format!("not a {what}").into())
}

pub(super) fn class_at(r: &Row<'_>, col: usize) -> rusqlite::Result<QosClass> {
    usize::try_from(r.get::<_, i64>(col)?)
        .ok()
        .and_then(|i| QosClass::ALL.get(i).copied())
        .ok_or_else(|| bad_value(col, "job class"))
}

pub(super) fn status_at(r: &Row<'_>, col: usize) -> rusqlite::Result<JobStatus> {
    JobStatus::parse(&r.get::<_, String>(col)?).ok_or_else(|| bad_value(col, "job status"))
}

pub(super) fn job_row(r: &Row<'_>) -> rusqlite::Result<JobRecord> {
    Ok(JobRecord {
        id: unsigned(r.get(0)?),
        kind: r.get(1)?,
        class: class_at(r, 2)?,
        upstream: r.get(3)?,
        payload: r.get(4)?,
        dedupe_key: r.get(5)?,
        status: status_at(r, 6)?,
        attempts: u32::try_from(r.get::<_, i64>(7)?).unwrap_or(0),
        max_attempts: u32::try_from(r.get::<_, i64>(8)?).unwrap_or(0),
        created_at_ms: unsigned(r.get(9)?),
        available_at_ms: unsigned(r.get(10)?),
        lease_expires_at_ms: unsigned(r.get(11)?),
        worker: r.get(12)?,
        last_error: r.get(13)?,
        finished_at_ms: unsigned(r.get(14)?),
    })
}

/// Runs `update` on the job `lease` names, only while that lease is current: `update` binds
/// `?1` to the id and `?2` to the attempt and must require both (plus `status = 'running'`);
/// `rest` binds `?3` onwards.
pub(super) fn update_leased(
    conn: &Connection,
    lease: Lease,
    update: &'static str,
    rest: &[&dyn rusqlite::ToSql],
) -> rusqlite::Result<StoreResult<()>> {
    let id = sql(lease.job);
    let attempt = i64::from(lease.attempt);
    let mut all: Vec<&dyn rusqlite::ToSql> = vec![&id, &attempt];
    all.extend_from_slice(rest);
    let changed = conn
        .prepare_cached(update)?
        .execute(rusqlite::params_from_iter(all))?;
    Ok(if changed == 1 {
        Ok(())
    } else {
        Err(StoreError::StaleLease {
            job: lease.job,
            attempt: lease.attempt,
        })
    })
}

pub(super) fn enqueue(
    conn: &Connection,
    job: NewJob,
    caps: &QueuedCaps,
    now_ms: u64,
) -> rusqlite::Result<StoreResult<Enqueued>> {
    if let Some(k) = &job.dedupe_key {
        let held: Option<i64> = conn
            .prepare_cached("SELECT id FROM jobs WHERE dedupe_key = ?1")?
            .query_row(params![k], |r| r.get(0))
            .optional()?;
        if let Some(id) = held {
            return Ok(Ok(Enqueued::Existing(unsigned(id))));
        }
    }
    let cap = caps.per_class[job.class.index()];
    if cap > 0 {
        let queued: i64 = conn
            .prepare_cached("SELECT COUNT(*) FROM jobs WHERE status = 'queued' AND class = ?1")?
            .query_row(params![job.class.index() as i64], |r| r.get(0))?;
        if unsigned(queued) >= cap {
            return Ok(Err(StoreError::QueueFull {
                class: job.class,
                cap,
            }));
        }
    }
    let id: i64 = conn
        .prepare_cached(
            "INSERT INTO jobs (kind, class, upstream, payload, dedupe_key, status, attempts,
               max_attempts, created_ms, available_at_ms, lease_expires_ms, worker, last_error,
               finished_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, 'queued', 0, ?6, ?7, ?8, 0, NULL, NULL, 0)
             RETURNING id",
        )?
        .query_row(
            params![
                job.kind,
                job.class.index() as i64,
                job.upstream,
                job.payload,
                job.dedupe_key,
                i64::from(job.max_attempts),
                sql(now_ms),
                sql(job.available_at_ms),
            ],
            |r| r.get(0),
        )?;
    Ok(Ok(Enqueued::New(unsigned(id))))
}

/// A due job as the claim weighs it: `(available_at_ms, id)` is its place in its class.
pub(super) type Candidate = (i64, i64, String);

pub(super) fn candidate(r: &Row<'_>) -> rusqlite::Result<Candidate> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
}

pub(super) fn claim(
    conn: &Connection,
    worker: &str,
    limit: usize,
    caps: &RunningCaps,
    lease_ms: u64,
    now_ms: u64,
) -> rusqlite::Result<StoreResult<Vec<LeasedJob>>> {
    let now = sql(now_ms);
    let mut per_class = [0u64; 3];
    let mut per_kind: HashMap<String, u64> = HashMap::new();
    {
        let mut stmt = conn.prepare_cached(
            "SELECT class, kind, COUNT(*) FROM jobs
             WHERE status = 'running' AND lease_expires_ms > ?1 GROUP BY class, kind",
        )?;
        let mut rows = stmt.query(params![now])?;
        while let Some(r) = rows.next()? {
            let n = unsigned(r.get(2)?);
            per_class[class_at(r, 0)?.index()] += n;
            *per_kind.entry(r.get(1)?).or_default() += n;
        }
    }
    // Everything is decided before anything is written: the cursors below never see a row
    // this claim changed.
    let mut chosen = Vec::new();
    for class in QosClass::ALL {
        let c = class.index();
        let class_cap = caps.per_class[c];
        let class_full = |n: u64| class_cap > 0 && n >= class_cap;
        if chosen.len() >= limit || class_full(per_class[c]) {
            continue;
        }
        // Running jobs whose lease lapsed (their worker died) are few: read them whole and
        // merge them into the queued ones in claim order.
        let mut lapsed = conn
            .prepare_cached(
                "SELECT available_at_ms, id, kind FROM jobs
                 WHERE status = 'running' AND class = ?1 AND available_at_ms <= ?2
                   AND lease_expires_ms <= ?2
                 ORDER BY available_at_ms, id",
            )?
            .query_map(params![c as i64, now], candidate)?
            .collect::<rusqlite::Result<Vec<_>>>()?
            .into_iter()
            .peekable();
        let mut stmt = conn.prepare_cached(
            "SELECT available_at_ms, id, kind FROM jobs
             WHERE status = 'queued' AND class = ?1 AND available_at_ms <= ?2
             ORDER BY available_at_ms, id",
        )?;
        let mut rows = stmt.query(params![c as i64, now])?;
        let mut queued = rows.next()?.map(candidate).transpose()?;
        while chosen.len() < limit && !class_full(per_class[c]) {
            let from_lapsed = match (&queued, lapsed.peek()) {
                (None, None) => break,
                (Some(_), None) => false,
                (None, Some(_)) => true,
                (Some(q), Some(l)) => (l.0, l.1) < (q.0, q.1),
            };
            let (_, id, kind) = if from_lapsed {
                lapsed.next().expect("peeked")
            } else {
                let next = rows.next()?.map(candidate).transpose()?;
                std::mem::replace(&mut queued, next).expect("matched")
            };
            let kind_cap = caps.for_kind(&kind);
            let running = per_kind.entry(kind).or_default();
            if kind_cap > 0 && *running >= kind_cap {
                continue;
            }
            *running += 1;
            per_class[c] += 1;
            chosen.push(id);
        }
    }
    let mut out = Vec::with_capacity(chosen.len());
    let mut stmt = conn.prepare_cached(concat!(
        "UPDATE jobs SET status = 'running', attempts = attempts + 1, lease_expires_ms = ?2,
           worker = ?3
         WHERE id = ?1 RETURNING ",
        job_columns!()
    ))?;
    for id in chosen {
        let job = stmt.query_row(
            params![id, sql(now_ms.saturating_add(lease_ms)), worker],
            job_row,
        )?;
        out.push(LeasedJob {
            lease: Lease {
                job: job.id,
                attempt: job.attempts,
            },
            job,
        });
    }
    Ok(Ok(out))
}

pub(super) fn fail(
    conn: &Connection,
    lease: Lease,
    failure: Failure,
    now_ms: u64,
) -> rusqlite::Result<StoreResult<()>> {
    match failure {
        Failure::Retry {
            at_ms,
            error,
            counted,
        } => update_leased(
            conn,
            lease,
            "UPDATE jobs SET status = 'queued', available_at_ms = ?3, lease_expires_ms = 0,
               worker = NULL, last_error = ?4, attempts = MAX(attempts - ?5, 0)
             WHERE id = ?1 AND status = 'running' AND attempts = ?2",
            &[&sql(at_ms), &error, &i64::from(!counted)],
        ),
        Failure::Dead { error } => update_leased(
            conn,
            lease,
            "UPDATE jobs SET status = 'dead', lease_expires_ms = 0, worker = NULL,
               last_error = ?3, finished_ms = ?4
             WHERE id = ?1 AND status = 'running' AND attempts = ?2",
            &[&error, &sql(now_ms)],
        ),
    }
}

pub(super) fn stats(conn: &Connection, now_ms: u64) -> rusqlite::Result<JobStats> {
    let mut stats = JobStats {
        by_status: JobStatus::ALL.into_iter().map(|s| (s, 0)).collect(),
        queued_by_class: QosClass::ALL.into_iter().map(|c| (c, 0)).collect(),
        running_by_class: QosClass::ALL.into_iter().map(|c| (c, 0)).collect(),
        oldest_queued_at_ms: None,
    };
    let mut stmt =
        conn.prepare_cached("SELECT status, class, COUNT(*) FROM jobs GROUP BY status, class")?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        let (status, class) = (status_at(r, 0)?, class_at(r, 1)?);
        let n = unsigned(r.get(2)?);
        *stats.by_status.entry(status).or_default() += n;
        match status {
            JobStatus::Queued => *stats.queued_by_class.entry(class).or_default() += n,
            JobStatus::Running => *stats.running_by_class.entry(class).or_default() += n,
            _ => {}
        }
    }
    let oldest: Option<i64> = conn
        .prepare_cached(
            "SELECT MIN(created_ms) FROM jobs WHERE status = 'queued' AND available_at_ms <= ?1",
        )?
        .query_row(params![sql(now_ms)], |r| r.get(0))?;
    stats.oldest_queued_at_ms = oldest.map(unsigned);
    Ok(stats)
}

pub(super) fn heartbeat(
    c: &Connection,
    lease: Lease,
    lease_ms: u64,
    now_ms: u64,
) -> rusqlite::Result<StoreResult<()>> {
    update_leased(
        c,
        lease,
        "UPDATE jobs SET lease_expires_ms = ?3
         WHERE id = ?1 AND status = 'running' AND attempts = ?2",
        &[&sql(now_ms.saturating_add(lease_ms))],
    )
}

pub(super) fn complete(
    c: &Connection,
    lease: Lease,
    now_ms: u64,
) -> rusqlite::Result<StoreResult<()>> {
    update_leased(
        c,
        lease,
        "UPDATE jobs SET status = 'done', lease_expires_ms = 0, worker = NULL,
           finished_ms = ?3
         WHERE id = ?1 AND status = 'running' AND attempts = ?2",
        &[&sql(now_ms)],
    )
}

pub(super) fn requeue(
    c: &Connection,
    id: JobId,
    budget: u32,
    now_ms: u64,
) -> rusqlite::Result<StoreResult<bool>> {
    let changed = c
        .prepare_cached(
            "UPDATE jobs SET status = 'queued', max_attempts = attempts + ?3,
               available_at_ms = ?2, finished_ms = 0
             WHERE id = ?1 AND status = 'dead'",
        )?
        .execute(params![sql(id), sql(now_ms), i64::from(budget)])?;
    Ok(Ok(changed == 1))
}

pub(super) fn get(c: &Connection, id: JobId) -> rusqlite::Result<Option<JobRecord>> {
    c.prepare_cached(concat!(
        "SELECT ",
        job_columns!(),
        " FROM jobs WHERE id = ?1"
    ))?
    .query_row(params![sql(id)], job_row)
    .optional()
}

pub(super) fn list(
    c: &Connection,
    status: Option<JobStatus>,
    limit: usize,
) -> rusqlite::Result<Vec<JobRecord>> {
    let mut stmt = c.prepare_cached(concat!(
        "SELECT ",
        job_columns!(),
        " FROM jobs WHERE ?1 IS NULL OR status = ?1 ORDER BY id DESC LIMIT ?2"
    ))?;
    stmt.query_map(
        params![status.map(JobStatus::as_str), sql(limit as u64)],
        job_row,
    )?
    .collect()
}

pub(super) fn purge_done(c: &Connection, before_ms: u64) -> rusqlite::Result<StoreResult<u64>> {
    let gone = c
        .prepare_cached("DELETE FROM jobs WHERE status = 'done' AND finished_ms < ?1")?
        .execute(params![sql(before_ms)])?;
    Ok(Ok(gone as u64))
}
