//! The `sqlite` store's job queue and webhook idempotency records ([`crate::guard`]).
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
//! they are only listed here.

use std::collections::{BTreeMap, HashMap};

use async_trait::async_trait;
use rusqlite::types::Type;
use rusqlite::{Connection, OptionalExtension, Row, params};

use super::SqliteStore;
use super::readers::snapshot;
use crate::guard::*;
use crate::{StoreError, StoreResult};

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

/// The columns [`job_row`] reads, in its order.
macro_rules! job_columns {
    () => {
        "id, kind, class, upstream, payload, dedupe_key, status, attempts, max_attempts, \
         created_ms, available_at_ms, lease_expires_ms, worker, last_error, finished_ms"
    };
}

/// Removes the webhook records that expired by `now_ms` (the writer's periodic sweep).
pub(super) fn sweep_expired(conn: &Connection, now_ms: u64) -> rusqlite::Result<()> {
    conn.prepare_cached("DELETE FROM webhook_idempotency WHERE expires_ms <= ?1")?
        .execute(params![sql(now_ms)])?;
    Ok(())
}

/// Times and counts as SQLite integers (values past `i64::MAX` are not times anyone waits for).
fn sql(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn unsigned(v: i64) -> u64 {
    v.max(0) as u64
}

fn bad_value(col: usize, what: &str) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(col, Type::Text, format!("not a {what}").into())
}

fn class_at(r: &Row<'_>, col: usize) -> rusqlite::Result<QosClass> {
    usize::try_from(r.get::<_, i64>(col)?)
        .ok()
        .and_then(|i| QosClass::ALL.get(i).copied())
        .ok_or_else(|| bad_value(col, "job class"))
}

fn status_at(r: &Row<'_>, col: usize) -> rusqlite::Result<JobStatus> {
    JobStatus::parse(&r.get::<_, String>(col)?).ok_or_else(|| bad_value(col, "job status"))
}

fn job_row(r: &Row<'_>) -> rusqlite::Result<JobRecord> {
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
fn update_leased(
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

fn enqueue(
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
type Candidate = (i64, i64, String);

fn candidate(r: &Row<'_>) -> rusqlite::Result<Candidate> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
}

fn claim(
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

fn fail(
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

fn idem_begin(
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

fn idem_list(
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

fn idem_scopes(
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

fn stats(conn: &Connection, now_ms: u64) -> rusqlite::Result<JobStats> {
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

#[async_trait]
impl GuardStore for SqliteStore {
    async fn job_enqueue(
        &self,
        job: NewJob,
        caps: &QueuedCaps,
        now_ms: u64,
    ) -> StoreResult<Enqueued> {
        let caps = caps.clone();
        self.write(move |c| enqueue(c, job, &caps, now_ms)).await
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
        self.write(move |c| claim(c, &worker, limit, &caps, lease_ms, now_ms))
            .await
    }

    async fn job_heartbeat(&self, lease: Lease, lease_ms: u64, now_ms: u64) -> StoreResult<()> {
        self.write(move |c| {
            update_leased(
                c,
                lease,
                "UPDATE jobs SET lease_expires_ms = ?3
                 WHERE id = ?1 AND status = 'running' AND attempts = ?2",
                &[&sql(now_ms.saturating_add(lease_ms))],
            )
        })
        .await
    }

    async fn job_complete(&self, lease: Lease, now_ms: u64) -> StoreResult<()> {
        self.write(move |c| {
            update_leased(
                c,
                lease,
                "UPDATE jobs SET status = 'done', lease_expires_ms = 0, worker = NULL,
                   finished_ms = ?3
                 WHERE id = ?1 AND status = 'running' AND attempts = ?2",
                &[&sql(now_ms)],
            )
        })
        .await
    }

    async fn job_fail(&self, lease: Lease, failure: Failure, now_ms: u64) -> StoreResult<()> {
        self.write(move |c| fail(c, lease, failure, now_ms)).await
    }

    async fn job_requeue(&self, id: JobId, budget: u32, now_ms: u64) -> StoreResult<bool> {
        self.write(move |c| {
            let changed = c
                .prepare_cached(
                    "UPDATE jobs SET status = 'queued', max_attempts = attempts + ?3,
                       available_at_ms = ?2, finished_ms = 0
                     WHERE id = ?1 AND status = 'dead'",
                )?
                .execute(params![sql(id), sql(now_ms), i64::from(budget)])?;
            Ok(Ok(changed == 1))
        })
        .await
    }

    async fn job_get(&self, id: JobId) -> StoreResult<Option<JobRecord>> {
        self.readers.run_now(|c, _| {
            c.prepare_cached(concat!(
                "SELECT ",
                job_columns!(),
                " FROM jobs WHERE id = ?1"
            ))?
            .query_row(params![sql(id)], job_row)
            .optional()
        })
    }

    async fn job_list(
        &self,
        status: Option<JobStatus>,
        limit: usize,
    ) -> StoreResult<Vec<JobRecord>> {
        self.readers
            .run(move |c, _| {
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
            })
            .await
    }

    async fn job_stats(&self, now_ms: u64) -> StoreResult<JobStats> {
        self.readers
            .run(move |c, _| snapshot(c, |c| stats(c, now_ms)))
            .await
    }

    async fn job_purge_done(&self, before_ms: u64) -> StoreResult<u64> {
        self.write(move |c| {
            let gone = c
                .prepare_cached("DELETE FROM jobs WHERE status = 'done' AND finished_ms < ?1")?
                .execute(params![sql(before_ms)])?;
            Ok(Ok(gone as u64))
        })
        .await
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
        self.write(move |c| idem_begin(c, &scope, &key, fingerprint, ttl_ms, claim_ms, now_ms))
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
        self.write(move |c| {
            c.prepare_cached(
                "UPDATE webhook_idempotency SET answer = ?3 WHERE scope = ?1 AND key = ?2",
            )?
            .execute(params![scope, key, answer])?;
            Ok(Ok(()))
        })
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
            .run(move |c, _| snapshot(c, |c| idem_list(c, scope.as_deref(), limit, now_ms, ttl)))
            .await
    }

    async fn idem_scopes(&self, now_ms: u64) -> StoreResult<BTreeMap<String, IdemScopeStats>> {
        let ttl = self.idempotency_ttl_ms;
        self.readers
            .run(move |c, _| snapshot(c, |c| idem_scopes(c, now_ms, ttl)))
            .await
    }
}
