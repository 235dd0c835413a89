//! The guardrails' background tasks. The job worker: claims due jobs from the store's queue,
//! delivers each to its upstream while a heartbeat keeps its lease, and ends it — done,
//! retried after a jittered backoff, or a dead letter. And the task that keeps the circuit
//! gauges in step with the breakers ([`spawn_circuit_gauges`]).
//!
//! What makes a delivery safe to repeat is the lease rule in the store: a worker that lost its
//! lease (it stalled past the lease, another worker took the job) cannot complete it, and its
//! heartbeat learns so and stops the delivery. Every delivery carries `Idempotency-Key` (the
//! job's dedupe key, else `job-<id>`), so an upstream that sees a redelivery after a crash can
//! tell.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use tokio::sync::{Semaphore, watch};
use zerodrop_guard::retry::Next;
use zerodrop_store::{Enqueued, Failure, JobStatus, LeasedJob, NewJob, QosClass, StoreError};

use super::CallError;
use crate::app::{App, Publisher};
use crate::error::ApiError;

/// How often the worker looks for due jobs when nothing woke it.
const POLL: Duration = Duration::from_millis(200);

impl App {
    /// Enqueues a delivery to `upstream` and wakes the worker.
    pub async fn enqueue_job(
        &self,
        kind: String,
        class: QosClass,
        upstream: &str,
        payload: String,
        dedupe_key: Option<String>,
    ) -> Result<Enqueued, ApiError> {
        let now = self.clock().now_ms();
        let job = NewJob {
            kind,
            class,
            upstream: upstream.to_string(),
            payload,
            dedupe_key,
            max_attempts: self.guard.cfg.jobs.retry.max_attempts,
            available_at_ms: now,
        };
        let out = self
            .guard_store()
            .job_enqueue(job, &self.guard.cfg.jobs.queued, now)
            .await?;
        self.guard.wake.notify_one();
        Ok(out)
    }
}

/// What a client `publish` frame did.
pub struct ClientPublish {
    pub seq: Option<zerodrop_core::Seq>,
    pub job: Option<zerodrop_store::JobId>,
}

impl App {
    /// A client `publish` frame: appended, and on an upstream-bound stream also (or only)
    /// queued for delivery to its upstream. The delivery's dedupe key is the frame's
    /// idempotency key when there is one (a retried frame is delivered once), else the
    /// appended seq.
    pub async fn client_publish(
        &self,
        stream: zerodrop_core::StreamId,
        data: &serde_json::value::RawValue,
        key: Option<String>,
        sub: &str,
    ) -> Result<ClientPublish, ApiError> {
        // The stream's policy, before anything is appended or queued.
        let compact = zerodrop_core::json::compact(data.get());
        self.check_publish(&stream, &compact, Publisher::Subject(sub))?;
        self.check_data(&compact)?;
        let Some((upstream, cfg)) = self.guard.cfg.bound_upstream(stream.as_str()) else {
            let out = self
                .publish(stream, data, key, Publisher::Subject(sub))
                .await?;
            return Ok(ClientPublish {
                seq: Some(out.seq),
                job: None,
            });
        };
        let (upstream, mode, class) = (upstream.to_string(), cfg.mode, cfg.class.0);
        let mut payload = serde_json::json!({
            "stream": stream, "sub": sub, "data": serde_json::from_str::<serde_json::Value>(data.get())
                .map_err(|e| ApiError::invalid(format!("data is not JSON: {e}")))?,
        });
        let mut seq = None;
        let mut dedupe = key.as_ref().map(|k| format!("publish:{stream}:{k}"));
        if mode == super::config::BoundMode::AppendAndDeliver {
            let out = self
                .publish(stream.clone(), data, key, Publisher::Subject(sub))
                .await?;
            payload["seq"] = serde_json::json!(out.seq);
            payload["epoch"] = serde_json::json!(out.epoch);
            dedupe.get_or_insert_with(|| format!("publish:{stream}:{}:{}", out.epoch, out.seq));
            seq = Some(out.seq);
        } else {
            // Not stored, but held to the same rules as data that is.
            self.check_data(&zerodrop_core::json::compact(data.get()))?;
        }
        let job = self
            .enqueue_job(
                "publish".into(),
                class,
                &upstream,
                payload.to_string(),
                dedupe,
            )
            .await?;
        Ok(ClientPublish {
            seq,
            job: Some(job.id()),
        })
    }
}

/// Runs the worker until `stop`; returns once the jobs it was running ended (or lost their
/// lease, when the process stops first: another instance or the next start redelivers them).
pub fn spawn(app: Arc<App>, mut stop: watch::Receiver<bool>) {
    if app.guard.upstreams.is_empty() {
        return;
    }
    let worker = format!(
        "{}/{}",
        app.instance,
        hex::encode(zerodrop_core::random_bytes::<4>())
    );
    let slots = Arc::new(Semaphore::new(app.guard.cfg.jobs.concurrency()));
    tokio::spawn(async move {
        loop {
            if *stop.borrow() {
                return;
            }
            let free = slots.available_permits();
            let mut claimed = Vec::new();
            if free > 0 && app.store_up.load(std::sync::atomic::Ordering::Relaxed) {
                let jobs = &app.guard.cfg.jobs;
                match app
                    .guard_store()
                    .job_claim(
                        &worker,
                        free,
                        &jobs.running,
                        jobs.lease_ms,
                        app.clock().now_ms(),
                    )
                    .await
                {
                    Ok(c) => claimed = c,
                    Err(e) => tracing::debug!(error = %e, "job claim failed"),
                }
            }
            let got = claimed.len();
            for job in claimed {
                let Ok(permit) = slots.clone().acquire_owned().await else {
                    return;
                };
                let app = app.clone();
                tokio::spawn(async move {
                    run(&app, job).await;
                    drop(permit);
                    // A slot is free: claim again now rather than at the next poll.
                    app.guard.wake.notify_one();
                });
            }
            if got == 0 || got == free {
                tokio::select! {
                    _ = app.guard.wake.notified() => {}
                    _ = tokio::time::sleep(POLL) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
        }
    });
}

/// Delivers one leased job and ends it.
async fn run(app: &App, leased: LeasedJob) {
    let LeasedJob { lease, job } = leased;
    let jobs = &app.guard.cfg.jobs;
    let Some(up) = app.guard.upstreams.get(&job.upstream) else {
        let error = format!("no upstream named `{}` is configured", job.upstream);
        end(app, &job.upstream, lease, Failure::Dead { error }).await;
        return;
    };
    let path = up.cfg.deliver_path.clone();
    let idem = job
        .dedupe_key
        .clone()
        .unwrap_or_else(|| format!("job-{}", job.id));
    let headers = [
        ("idempotency-key", idem),
        ("x-zerodrop-job", job.id.to_string()),
        ("x-zerodrop-attempt", lease.attempt.to_string()),
        ("x-zerodrop-kind", job.kind.clone()),
    ];
    let body = Bytes::from(job.payload.clone());
    let deliver = app.guard.call(
        &job.upstream,
        reqwest::Method::POST,
        super::CallPath::Configured(&path),
        Some(body),
        &headers,
    );
    // The heartbeat renews the lease while the delivery runs; a refused renewal means the
    // lease is gone (this worker stalled past it), and the delivery is abandoned.
    let heartbeat = async {
        let mut tick = tokio::time::interval(Duration::from_millis(jobs.heartbeat_ms));
        tick.tick().await;
        loop {
            tick.tick().await;
            match app
                .guard_store()
                .job_heartbeat(lease, jobs.lease_ms, app.clock().now_ms())
                .await
            {
                Err(StoreError::StaleLease { .. }) => return,
                Err(e) => tracing::debug!(error = %e, job = lease.job, "heartbeat failed"),
                Ok(()) => {}
            }
        }
    };
    let result = tokio::select! {
        r = deliver => r,
        () = heartbeat => {
            tracing::warn!(job = lease.job, "job lease lost during delivery; it will be redelivered");
            return;
        }
    };
    let now = app.clock().now_ms();
    let failure = match result {
        Ok(a) if (200..300).contains(&a.status) => {
            match app.guard_store().job_complete(lease, now).await {
                Ok(()) => app.metrics.count(
                    "zerodrop_jobs_completed_total",
                    &[("upstream", &job.upstream)],
                    1,
                ),
                Err(e) => tracing::warn!(error = %e, job = lease.job, "job completion refused"),
            }
            return;
        }
        // A refusal that a retry cannot change: straight to the dead letters.
        Ok(a) if (400..500).contains(&a.status) && a.status != 408 && a.status != 429 => {
            Failure::Dead {
                error: format!("upstream answered {} (permanent)", a.status),
            }
        }
        Ok(a) => retry(
            app,
            &job,
            lease.attempt,
            format!("upstream answered {}", a.status),
        ),
        Err(e) if e.not_attempted() => {
            let wait = match &e {
                CallError::Saturated { retry_after_ms } | CallError::Open { retry_after_ms } => {
                    (*retry_after_ms).clamp(50, 60_000)
                }
                _ => 1000,
            };
            Failure::Retry {
                at_ms: now + wait,
                error: e.describe(),
                counted: false,
            }
        }
        Err(e) => retry(app, &job, lease.attempt, e.describe()),
    };
    end(app, &job.upstream, lease, failure).await;
}

/// The retry policy counts attempts of the job's current budget: a requeued dead letter's
/// attempts go on counting (so that no old lease is current again), and its budget ends at
/// the job's own `max_attempts`.
fn retry(app: &App, job: &zerodrop_store::JobRecord, attempt: u32, error: String) -> Failure {
    let random = u64::from_le_bytes(zerodrop_core::random_bytes::<8>());
    let policy = &app.guard.cfg.jobs.retry;
    let before = job.max_attempts.saturating_sub(policy.max_attempts);
    match policy.after_failure(attempt.saturating_sub(before), random) {
        Next::RetryIn { delay_ms } => Failure::Retry {
            at_ms: app.clock().now_ms() + delay_ms,
            error,
            counted: true,
        },
        Next::DeadLetter => Failure::Dead {
            error: format!("{error}; gave up after {attempt} attempts"),
        },
    }
}

async fn end(app: &App, upstream: &str, lease: zerodrop_store::Lease, failure: Failure) {
    let outcome = match &failure {
        Failure::Retry { counted: false, .. } => None,
        Failure::Retry { .. } => Some("retry"),
        Failure::Dead { .. } => Some("dead"),
    };
    match app
        .guard_store()
        .job_fail(lease, failure, app.clock().now_ms())
        .await
    {
        Ok(()) => {
            if let Some(o) = outcome {
                app.metrics.count(
                    "zerodrop_jobs_failed_total",
                    &[("upstream", upstream), ("outcome", o)],
                    1,
                );
            }
        }
        Err(e) => tracing::warn!(error = %e, job = lease.job, "could not record the attempt"),
    }
}

/// Refreshes the queue gauges and purges old delivered jobs (every few seconds).
pub async fn upkeep(app: &App) {
    if app.guard.upstreams.is_empty() {
        return;
    }
    let now = app.clock().now_ms();
    let Ok(stats) = app.guard_store().job_stats(now).await else {
        return;
    };
    let m = &app.metrics;
    for (class, n) in &stats.queued_by_class {
        m.set(
            "zerodrop_jobs_backlog",
            &[("class", class.as_str())],
            *n as f64,
        );
    }
    for (class, n) in &stats.running_by_class {
        m.set(
            "zerodrop_jobs_running",
            &[("class", class.as_str())],
            *n as f64,
        );
    }
    let age = stats.oldest_queued_age_ms(now) as f64 / 1000.0;
    m.set("zerodrop_jobs_oldest_queued_age_seconds", &[], age);
    m.set(
        "zerodrop_jobs_dead_letters",
        &[],
        stats.count(JobStatus::Dead) as f64,
    );
    let keep = app.guard.cfg.jobs.done_keep_sec.saturating_mul(1000);
    if let Err(e) = app
        .guard_store()
        .job_purge_done(now.saturating_sub(keep))
        .await
    {
        tracing::debug!(error = %e, "purging delivered jobs failed");
    }
}

/// Keeps `zerodrop_circuit_state` in step with what time alone changes: a breaker runs no
/// timer (an open one turns half-open when it is next asked), so this task asks each one at
/// the end of its cooldown, and sets the gauges then. It sleeps until the earliest such
/// moment; a call that opens a breaker wakes it to learn the new one. Stops with the server.
pub fn spawn_circuit_gauges(app: Arc<App>, mut stop: watch::Receiver<bool>) {
    if app.guard.upstreams.is_empty() {
        return;
    }
    tokio::spawn(async move {
        let guard = &app.guard;
        loop {
            let due = guard.refresh_circuit_gauges();
            // The clock counts whole milliseconds elapsed, so sleeping until `due` by it never
            // wakes before the breaker agrees the cooldown is over.
            let nap = match due {
                Some(at) => Duration::from_millis(at.saturating_sub(guard.clock.now_ms()).max(1)),
                None => Duration::from_secs(3600),
            };
            tokio::select! {
                () = tokio::time::sleep(nap) => {}
                () = guard.circuit_opened.notified() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    });
}
