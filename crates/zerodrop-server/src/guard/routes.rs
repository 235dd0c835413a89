//! The guardrails' routes: webhook intake, upstream GETs through the cache, and the admin
//! views of circuits, bulkheads, idempotency keys, the cache and the job queue (mounted by
//! the HTTP router, `http/router.rs`, with the same extractors as every other handler).
//!
//! Must not: be imported by the app (what the app shares with these views lives in
//! `guard/mod.rs`).

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{OriginalUri, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use zerodrop_core::{ErrorCode, StreamId};
use zerodrop_store::{IdemBegin, JobStatus};

use super::config::IdSource;
use super::path::ClientPath;
use super::{Answer, CallError, CallPath, by_class};
use crate::app::App;
use crate::error::{ApiError, ApiResult};
use crate::http::extract::{Admin, ApiKey, Caller, Path, Query, RawBody};

/// How long a webhook's first request owns its message id before a retry may take over (the
/// first crashed): a retry meanwhile is 409 `IDEMPOTENCY_IN_PROGRESS`.
const WEBHOOK_CLAIM_MS: u64 = 10_000;

fn retry_secs(ms: u64) -> u64 {
    ms.div_ceil(1000).max(1)
}

/// The message id of a webhook, where its source says it is.
fn message_id(src: &IdSource, headers: &HeaderMap, body: &Value) -> ApiResult<String> {
    let (found, place) = match src {
        IdSource::Header(h) => (
            headers
                .get(h.as_str())
                .and_then(|v| v.to_str().ok())
                .map(String::from),
            format!("header `{h}`"),
        ),
        IdSource::Pointer(p) => (
            body.pointer(p).and_then(|v| match v {
                Value::String(s) => Some(s.clone()),
                Value::Number(n) => Some(n.to_string()),
                _ => None,
            }),
            format!("JSON pointer `{p}` (a string or a number)"),
        ),
    };
    let id = found
        .filter(|s| !s.is_empty())
        .ok_or_else(|| ApiError::invalid(format!("the webhook has no message id at {place}")))?;
    if id.len() > 255 || !id.bytes().all(|b| (0x21..0x7f).contains(&b)) {
        return Err(ApiError::invalid(
            "a message id must be 1-255 visible ASCII characters",
        ));
    }
    Ok(id)
}

/// `POST /v1/webhooks/{source}`: deduplicated by the provider's message id per scope. The
/// first request runs (append and/or enqueue, each itself idempotent on the id, so a takeover
/// after a crash never doubles either); a duplicate gets the first answer with
/// `duplicate: true` and its `hitCount`.
pub(crate) async fn webhook(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    _: ApiKey,
    Path(source): Path<String>,
    RawBody(body): RawBody,
) -> ApiResult<Response> {
    let Some(cfg) = app.guard.cfg.webhooks.get(&source) else {
        return Err(ApiError::new(
            ErrorCode::NotFound,
            format!(
                "no webhook source `{source}` is configured (see [webhooks.<source>] in docs/guardrails.md)"
            ),
        ));
    };
    let raw: Box<serde_json::value::RawValue> = serde_json::from_slice(&body)
        .map_err(|e| ApiError::invalid(format!("the webhook body must be JSON: {e}")))?;
    let value: Value = serde_json::from_str(raw.get())
        .map_err(|e| ApiError::invalid(format!("the webhook body must be JSON: {e}")))?;
    let id = message_id(&cfg.id_source(), &headers, &value)?;
    let scope = cfg.scope.clone().unwrap_or_else(|| source.clone());
    let compact = zerodrop_core::json::compact(raw.get());
    if cfg.stream.is_some() {
        // The body becomes an event's data: refused before its message id is claimed, so a
        // corrected retry with the same id is not held up by a claim that never finishes.
        if let Some(stream) = cfg.stream.as_deref().and_then(|s| StreamId::new(s).ok()) {
            app.check_publish(&stream, &compact, crate::app::Publisher::ApiKey)?;
        }
        app.check_data(&compact)?;
    }
    let fingerprint: [u8; 32] = Sha256::digest(compact.as_bytes()).into();
    let now = app.clock().now_ms();
    let count = |result: &str| {
        app.metrics.count(
            "zerodrop_webhooks_total",
            &[("source", &source), ("result", result)],
            1,
        )
    };
    let begin = app
        .guard_store()
        .idem_begin(
            &scope,
            &id,
            fingerprint,
            cfg.ttl_sec.saturating_mul(1000),
            WEBHOOK_CLAIM_MS,
            now,
        )
        .await?;
    match begin {
        IdemBegin::Reused => {
            count("reused");
            Err(ApiError::new(
                ErrorCode::IdempotencyKeyReused,
                format!("message id `{id}` was already received with a different body"),
            )
            .with("scope", scope.as_str()))
        }
        IdemBegin::InProgress => {
            count("duplicate");
            Err(ApiError::new(
                ErrorCode::IdempotencyInProgress,
                format!(
                    "the first delivery of message id `{id}` is still being processed; retry later"
                ),
            )
            .retry_after(1))
        }
        IdemBegin::Done { answer, hit_count } => {
            count("duplicate");
            let mut a: Value = serde_json::from_str(&answer).unwrap_or_else(|_| json!({}));
            a["duplicate"] = json!(true);
            a["hitCount"] = json!(hit_count);
            Ok((StatusCode::ACCEPTED, Json(a)).into_response())
        }
        IdemBegin::Fresh => {
            let dedupe = format!("webhook:{scope}:{id}");
            let mut answer = json!({
                "source": source, "scope": scope, "messageId": id,
                "duplicate": false, "hitCount": 0,
            });
            if let Some(s) = &cfg.stream {
                let stream = StreamId::new(s).map_err(|_| {
                    ApiError::new(ErrorCode::Internal, "the source's stream id is invalid")
                })?;
                let out = app
                    .publish(
                        stream,
                        &raw,
                        Some(dedupe.clone()),
                        crate::app::Publisher::ApiKey,
                    )
                    .await?;
                answer["stream"] = json!(out.stream);
                answer["seq"] = json!(out.seq);
                answer["epoch"] = json!(out.epoch);
            }
            if let Some(u) = &cfg.upstream {
                let payload = json!({"source": source, "messageId": id, "data": value});
                let job = app
                    .enqueue_job(
                        format!("webhook:{source}"),
                        cfg.class.0,
                        u,
                        payload.to_string(),
                        Some(dedupe),
                    )
                    .await?;
                answer["jobId"] = json!(job.id());
            }
            app.guard_store()
                .idem_finish(&scope, &id, &answer.to_string(), app.clock().now_ms())
                .await?;
            count("accepted");
            Ok((StatusCode::ACCEPTED, Json(answer)).into_response())
        }
    }
}

/// The typed error for a call that got no usable answer.
pub fn call_error(upstream: &str, e: CallError) -> ApiError {
    match e {
        CallError::UnknownUpstream => ApiError::new(
            ErrorCode::NotFound,
            format!("no upstream named `{upstream}` is configured"),
        ),
        CallError::Saturated { retry_after_ms } => ApiError::new(
            ErrorCode::OverCapacity,
            format!("upstream `{upstream}` has its maximum of calls in flight; retry later"),
        )
        .with("upstream", upstream)
        .retry_after(retry_secs(retry_after_ms)),
        CallError::Open { retry_after_ms } => ApiError::new(
            ErrorCode::UpstreamUnavailable,
            format!("upstream `{upstream}` is failing (every circuit open); retry later"),
        )
        .with("upstream", upstream)
        .retry_after(retry_secs(retry_after_ms)),
        CallError::Timeout { target } => ApiError::new(
            ErrorCode::UpstreamTimeout,
            format!("upstream `{upstream}` ({target}) did not answer in time"),
        )
        .with("upstream", upstream),
        CallError::Failed { target, .. } => ApiError::new(
            ErrorCode::UpstreamFailed,
            format!("upstream `{upstream}` ({target}) could not be reached"),
        )
        .with("upstream", upstream),
        CallError::OutsideBase { target } => ApiError::invalid(format!(
            "the path would leave the base URL of upstream `{upstream}` ({target})"
        ))
        .with("upstream", upstream),
    }
}

/// The client's path below `/v1/upstreams/{upstream}/`, exactly as it was sent: the route's
/// own captures are decoded (`..%2F` is already `../` there) and may be normalised on the way.
fn raw_tail(uri: &axum::http::Uri) -> Option<&str> {
    let rest = uri.path().strip_prefix("/v1/upstreams/")?;
    rest.split_once('/').map(|(_, tail)| tail)
}

/// `GET /v1/upstreams/{upstream}/{*path}`: the upstream's answer to `GET <base>/{path}`,
/// through its bulkhead and circuits, cached per namespace. With a connect token the cache
/// key includes the token's `sub` (answers may be per user) and `X-Zerodrop-Sub` tells the
/// upstream who asks.
///
/// Who may call: the api key, a connect token whose `upstreams` claim names the upstream, or
/// any connect token when the upstream is `public`; else 403 (also for an unknown name, so a
/// token cannot list what is configured). What may be called: only paths below the target's
/// base URL (see [`ClientPath`]); anything else is 400 and no call is made.
pub(crate) async fn upstream_get(
    State(app): State<Arc<App>>,
    OriginalUri(uri): OriginalUri,
    Path((name, _)): Path<(String, String)>,
    caller: Caller<false>,
) -> ApiResult<Response> {
    let up = app.guard.upstreams.get(&name);
    let sub = if let Caller::Connect(claims) = caller {
        if !(claims.may_call_upstream(&name) || up.is_some_and(|u| u.cfg.public)) {
            return Err(ApiError::forbidden(format!(
                "upstream `{name}` is not allowed by the token: its `upstreams` claim must name \
                 it (or the upstream be configured `public = true`)"
            ))
            .with("upstream", name.as_str()));
        }
        Some(claims.sub)
    } else {
        None
    };
    let Some(up) = up else {
        return Err(call_error(&name, CallError::UnknownUpstream));
    };
    let raw = raw_tail(&uri).ok_or_else(|| ApiError::invalid("invalid upstream path"))?;
    let client_path = ClientPath::parse(raw, uri.query())
        .map_err(|e| ApiError::invalid(e.0).with("upstream", name.as_str()))?;
    if let Some(t) = up
        .targets
        .iter()
        .find(|t| client_path.under(&t.base).is_none())
    {
        return Err(call_error(&name, CallError::OutsideBase { target: t.role }));
    }
    let target = client_path.display();
    let key = match &sub {
        Some(s) => format!("{s} {target}"),
        None => format!("* {target}"),
    };
    let ns = up.namespace.clone();
    let ttl_ms = up.cfg.cache_ttl_sec.saturating_mul(1000);
    let cached = (ttl_ms > 0)
        .then(|| app.guard.cache.get(&ns, &key))
        .flatten();
    if ttl_ms > 0 {
        let result = if cached.is_some() { "hit" } else { "miss" };
        app.metrics.count(
            "zerodrop_cache_requests_total",
            &[("namespace", &ns), ("result", result)],
            1,
        );
    }
    let (answer, hit) = match cached {
        Some(a) => (a, true),
        None => {
            let mut h = Vec::new();
            if let Some(s) = &sub {
                h.push(("x-zerodrop-sub", s.clone()));
            }
            let a = app
                .guard
                .call(
                    &name,
                    reqwest::Method::GET,
                    CallPath::Client(&client_path),
                    None,
                    &h,
                )
                .await
                .map_err(|e| call_error(&name, e))?;
            if a.status == 200 && ttl_ms > 0 {
                app.guard
                    .cache
                    .put(&ns, &key, a.clone(), a.body.len(), ttl_ms);
            }
            (a, false)
        }
    };
    Ok(answer_response(answer, hit))
}

fn answer_response(a: Answer, hit: bool) -> Response {
    let status = StatusCode::from_u16(a.status).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut res = Response::new(Body::from(a.body));
    *res.status_mut() = status;
    let h = res.headers_mut();
    if let Some(ct) = a.content_type.and_then(|c| HeaderValue::from_str(&c).ok()) {
        h.insert(header::CONTENT_TYPE, ct);
    }
    h.insert(
        "x-zerodrop-cache",
        HeaderValue::from_static(if hit { "hit" } else { "miss" }),
    );
    h.insert(
        "x-zerodrop-upstream-target",
        HeaderValue::from_static(a.target),
    );
    res
}

#[derive(Deserialize)]
pub(crate) struct ListQuery {
    limit: Option<usize>,
    provider: Option<String>,
    scope: Option<String>,
    status: Option<String>,
}

pub(crate) async fn circuits(
    State(app): State<Arc<App>>,
    _: Admin,
    Query(q): Query<ListQuery>,
) -> ApiResult<Json<Value>> {
    let limit = q.limit.unwrap_or(20);
    Ok(Json(circuits_view(&app, limit)))
}

pub fn circuits_view(app: &App, limit: usize) -> Value {
    json!({
        "enabled": !app.guard.upstreams.is_empty(),
        "circuits": app.guard.circuits(limit),
    })
}

pub(crate) async fn bulkheads(
    State(app): State<Arc<App>>,
    _: Admin,
    Query(q): Query<ListQuery>,
) -> ApiResult<Json<Value>> {
    if let Some(p) = &q.provider
        && !app.guard.upstreams.contains_key(p)
    {
        return Err(ApiError::new(
            ErrorCode::NotFound,
            format!("no upstream named `{p}` is configured"),
        ));
    }
    let mut v = bulkheads_view(&app);
    v["bulkheads"] = app
        .guard
        .bulkheads(q.provider.as_deref(), q.limit.unwrap_or(100));
    Ok(Json(v))
}

/// What the snapshot shows of the bulkheads (and `/admin/bulkheads` before its list).
pub fn bulkheads_view(app: &App) -> Value {
    json!({
        "enabled": !app.guard.upstreams.is_empty(),
        "inFlightByProvider": app.guard.in_flight_by_provider(),
    })
}

pub(crate) async fn idempotency(
    State(app): State<Arc<App>>,
    _: Admin,
    Query(q): Query<ListQuery>,
) -> ApiResult<Json<Value>> {
    let limit = q.limit.unwrap_or(50).min(1000);
    let keys = app
        .guard_store()
        .idem_list(q.scope.as_deref(), limit, app.clock().now_ms())
        .await?;
    Ok(Json(json!({"scope": q.scope, "keys": keys})))
}

pub(crate) async fn cache(
    State(app): State<Arc<App>>,
    _: Admin,
    Query(q): Query<ListQuery>,
) -> ApiResult<Json<Value>> {
    let limit = q.limit.unwrap_or(5000);
    let mut v = cache_view(&app);
    v["entries"] = json!(app.guard.cache.entries(limit));
    Ok(Json(v))
}

pub fn cache_view(app: &App) -> Value {
    json!({
        "enabled": !app.guard.upstreams.is_empty() && app.guard.cfg.cache_max_entries > 0,
        "maxEntries": app.guard.cfg.cache_max_entries,
        "evicted": app.guard.cache.evicted(),
        "byNamespace": app.guard.cache.by_namespace(),
    })
}

pub(crate) async fn cache_clear(
    State(app): State<Arc<App>>,
    _: Admin,
    Path(ns): Path<String>,
) -> ApiResult<Json<Value>> {
    let cleared = app.guard.cache.clear(&ns);
    Ok(Json(json!({"namespace": ns, "cleared": cleared})))
}

/// The queue's counts, its alerts and the latest dead letters (snapshot and `/admin/jobs`).
pub async fn jobs_view(app: &App, dead_limit: usize) -> ApiResult<Value> {
    let enabled = !app.guard.upstreams.is_empty();
    let now = app.clock().now_ms();
    let stats = app.guard_store().job_stats(now).await?;
    let dead = app
        .guard_store()
        .job_list(Some(JobStatus::Dead), dead_limit)
        .await?;
    let age = stats.oldest_queued_age_ms(now);
    let threshold = app.guard.cfg.jobs.oldest_alert_sec.saturating_mul(1000);
    let mut alerts = Vec::new();
    if age > threshold {
        alerts.push(json!({
            "alert": "oldest_queued_job",
            "oldestQueuedAgeMs": age,
            "thresholdMs": threshold,
            "message": format!("the oldest due job has waited {} s (threshold {} s): upstreams are slow, failing, or the running caps are too low", age / 1000, threshold / 1000),
        }));
    }
    let n_dead = stats.count(JobStatus::Dead);
    if n_dead > 0 {
        alerts.push(json!({
            "alert": "dead_letters",
            "deadLetters": n_dead,
            "message": format!("{n_dead} job(s) gave up; inspect them in /admin/jobs?status=dead and requeue with POST /admin/jobs/dead-letters/{{id}}/requeue"),
        }));
    }
    let by_status: serde_json::Map<String, Value> = stats
        .by_status
        .iter()
        .map(|(s, n)| (s.as_str().to_string(), json!(n)))
        .collect();
    Ok(json!({
        "enabled": enabled,
        "byStatus": by_status,
        "queuedByClass": by_class(&stats.queued_by_class),
        "runningByClass": by_class(&stats.running_by_class),
        "oldestQueuedAgeMs": age,
        "recentDeadLetters": dead,
        "alerts": alerts,
    }))
}

pub(crate) async fn jobs(
    State(app): State<Arc<App>>,
    _: Admin,
    Query(q): Query<ListQuery>,
) -> ApiResult<Json<Value>> {
    let status = match q.status.as_deref() {
        None => None,
        Some(s) => Some(JobStatus::parse(s).ok_or_else(|| {
            ApiError::invalid(format!(
                "unknown status `{s}`: expected queued, running, done or dead"
            ))
        })?),
    };
    let limit = q.limit.unwrap_or(50).min(1000);
    let mut v = jobs_view(&app, 20).await?;
    v["jobs"] = json!(app.guard_store().job_list(status, limit).await?);
    Ok(Json(v))
}

pub(crate) async fn requeue(
    State(app): State<Arc<App>>,
    _: Admin,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let not_found = || {
        ApiError::new(
            ErrorCode::NotFound,
            format!("no dead letter with id `{id}`"),
        )
    };
    let n: u64 = id.parse().map_err(|_| not_found())?;
    let budget = app.guard.cfg.jobs.retry.max_attempts;
    if !app
        .guard_store()
        .job_requeue(n, budget, app.clock().now_ms())
        .await?
    {
        return Err(not_found());
    }
    app.guard.wake.notify_one();
    let job = app.guard_store().job_get(n).await?;
    Ok(Json(json!({"requeued": true, "job": job})))
}
