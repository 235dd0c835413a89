//! The operator's routes: health and readiness probes, metrics (Prometheus text or JSON),
//! and the admin API (drain, the rate-limit ledger, the reliability snapshot). Every
//! `/admin` handler takes [`Admin`]; the probes and metrics take no credential.
//!
//! Must not: change anything but the drain state, the revocations and the disconnect orders
//! (the admin actions here, each through the app), or answer from anything but live state.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use zerodrop_core::{ErrorCode, SessionId};
use zerodrop_store::durability::sqlite_synchronous_name;
use zerodrop_store::{Revocation, RevokeTarget, StoreDurability};

use super::extract::{Admin, BodyShape, JsonBody, Path, Query};
use crate::app::App;
use crate::app::revocation::new_order;
use crate::error::{ApiError, ApiResult};

// ----------------------------------------------------------------------------------- health

fn store_up(app: &App) -> bool {
    app.store_up.load(Ordering::Relaxed)
}

/// What the store's durability level was read from (docs/reliability.md, "Durability level").
fn durability_settings(d: &StoreDurability) -> Value {
    match d {
        StoreDurability::Memory => json!({}),
        StoreDurability::Sqlite { synchronous } => json!({
            "synchronous": sqlite_synchronous_name(*synchronous).to_ascii_lowercase(),
        }),
        StoreDurability::Redis(r) => {
            let mut v = json!({
                "appendonly": r.appendonly,
                "appendfsync": r.appendfsync,
                "waitReplicas": r.wait_replicas,
                "connectedReplicas": r.connected_replicas,
            });
            if let Some(why) = &r.unread {
                v["unread"] = Value::from(why.as_str());
            }
            v
        }
    }
}

pub(super) async fn health(State(app): State<Arc<App>>) -> Json<Value> {
    let up = store_up(&app);
    let drain = app.drain.state();
    let durability = app.durability();
    let below = app.durability_below_required();
    let status = if drain != crate::drain::DrainState::Active {
        "draining"
    } else if !up || below {
        "degraded"
    } else {
        "ok"
    };
    Json(json!({
        "status": status,
        "instance": app.instance,
        "store": {
            "kind": app.store_kind().as_str(),
            "up": up,
            "durability": durability.level().as_str(),
            "durabilitySettings": durability_settings(&durability),
            "requiredDurability": app.required_durability().map(|d| d.as_str()),
            "durabilityBelowRequired": below,
        },
        "drain": {"state": drain.as_str()},
    }))
}

pub(super) async fn live() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

pub(super) async fn ready(State(app): State<Arc<App>>) -> Response {
    let mut reasons = Vec::new();
    if app.store_corrupt() {
        reasons.push("store_corrupt");
    } else if !store_up(&app) {
        reasons.push("store_unavailable");
    }
    if app.durability_below_required() {
        reasons.push("durability_below_required");
    }
    if app.drain.is_refusing() {
        reasons.push("draining");
    }
    if reasons.is_empty() {
        Json(json!({"ready": true})).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"ready": false, "reasons": reasons})),
        )
            .into_response()
    }
}

#[derive(Deserialize)]
pub(super) struct MetricsQuery {
    format: Option<String>,
}

pub(super) async fn metrics(
    State(app): State<Arc<App>>,
    Query(q): Query<MetricsQuery>,
) -> ApiResult<Response> {
    match q.format.as_deref() {
        Some("json") => Ok(Json(app.metrics_json().await).into_response()),
        None | Some("prometheus") | Some("text") => Ok((
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            Body::from(app.metrics.render_prometheus()),
        )
            .into_response()),
        Some(other) => Err(ApiError::invalid(format!(
            "unknown format {other:?}; use json"
        ))),
    }
}

// ------------------------------------------------------------------------------------ admin

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct DrainBody {
    reason: Option<String>,
    max_session_age_seconds: Option<u64>,
}

impl BodyShape for DrainBody {
    const SHAPE: &'static str = "{\"reason\": …, \"max_session_age_seconds\": n}";

    fn empty() -> Option<DrainBody> {
        Some(DrainBody::default())
    }
}

fn drain_json(app: &App) -> Json<Value> {
    Json(app.drain.status(app.conns.current()))
}

pub(super) async fn drain_start(
    State(app): State<Arc<App>>,
    _: Admin,
    JsonBody(b): JsonBody<DrainBody>,
) -> ApiResult<Json<Value>> {
    let spread = Duration::from_secs(b.max_session_age_seconds.unwrap_or(app.cfg.drain_grace_sec));
    let reason = b.reason.unwrap_or_else(|| "manual".into());
    app.start_drain(&reason, spread);
    Ok(drain_json(&app))
}

pub(super) async fn drain_status(State(app): State<Arc<App>>, _: Admin) -> ApiResult<Json<Value>> {
    let out = drain_json(&app);
    app.metrics.drain_state(app.drain.state().gauge());
    Ok(out)
}

#[derive(Deserialize)]
pub(super) struct LimitQuery {
    minutes: Option<u64>,
    limit: Option<usize>,
}

/// The rate-limit ledger's views; `{"enabled": false}` when HTTP limits are off.
fn ratelimit_view(
    app: &App,
    view: impl FnOnce(&crate::ratelimit::HttpLimits) -> (&'static str, Value),
) -> ApiResult<Json<Value>> {
    Ok(Json(match &app.limits {
        None => json!({"enabled": false}),
        Some(l) => {
            let (key, v) = view(l);
            json!({"enabled": true, key: v})
        }
    }))
}

pub(super) async fn ratelimit_summary(
    State(app): State<Arc<App>>,
    // The query is checked first: a malformed one is 400 whoever asks.
    Query(q): Query<LimitQuery>,
    _: Admin,
) -> ApiResult<Json<Value>> {
    let minutes = q.minutes.unwrap_or(15);
    ratelimit_view(&app, |l| ("summary", l.summary(minutes)))
}

pub(super) async fn ratelimit_alerts(
    State(app): State<Arc<App>>,
    Query(q): Query<LimitQuery>,
    _: Admin,
) -> ApiResult<Json<Value>> {
    let limit = q.limit.unwrap_or(20);
    ratelimit_view(&app, |l| ("alerts", l.alerts(limit)))
}

pub(super) async fn ratelimit_events(
    State(app): State<Arc<App>>,
    Query(q): Query<LimitQuery>,
    _: Admin,
) -> ApiResult<Json<Value>> {
    let limit = q.limit.unwrap_or(50);
    ratelimit_view(&app, |l| ("events", l.events(limit)))
}

pub(super) async fn drain_complete(
    State(app): State<Arc<App>>,
    _: Admin,
) -> ApiResult<Json<Value>> {
    app.complete_drain();
    Ok(drain_json(&app))
}

/// What this deployment's topology is, as far as the instance knows: one instance on its own
/// store, or instances sharing one Redis. zerodrop has no notion of regions: every instance
/// sharing the store is one region.
fn region_topology(app: &App) -> Value {
    let shared = app.store_kind() == zerodrop_store::StoreKind::Redis;
    json!({
        "mode": if shared { "shared-store" } else { "single-instance" },
        "store": app.store_kind().as_str(),
        "instance": app.instance,
        "regions": [{"name": "default", "instances": if shared { Value::Null } else { json!([app.instance]) }}],
        "multiRegion": false,
    })
}

/// The reliability snapshot (SPEC §7), every section from live state; a section whose
/// feature is not configured is present, empty, and says `"enabled": false`.
pub(super) async fn snapshot(State(app): State<Arc<App>>, _: Admin) -> ApiResult<Json<Value>> {
    let c = &app.cfg;
    let stats = app.store_stats().await.ok();
    Ok(Json(json!({
        "config": {
            "instance": app.instance,
            "store": app.store_kind().as_str(),
            "reconnectWindowSec": c.reconnect_window_sec,
            "retention": {
                "maxEvents": c.retention.max_events,
                "maxBytes": c.retention.max_bytes,
                "maxAgeSec": c.retention.max_age_ms / 1000,
            },
            "maxConnections": c.max_connections,
            "maxPayloadBytes": c.max_payload_bytes,
            "maxFrameBytes": c.max_frame_bytes,
            "pingIntervalSec": c.ping_interval_sec,
            "drainGraceSec": c.drain_grace_sec,
            "regionTopology": region_topology(&app),
        },
        "drain": app.drain.status(app.conns.current()),
        "store": {
            "kind": app.store_kind().as_str(),
            "up": store_up(&app),
            "durability": app.durability().level().as_str(),
            "sessions": stats.as_ref().map(|s| s.sessions),
            "streams": stats.as_ref().map(|s| s.streams),
        },
        "rateLimit": match &app.limits {
            None => json!({"enabled": false, "summary": [], "alerts": []}),
            Some(l) => json!({"enabled": true, "summary": l.summary(15), "alerts": l.alerts(20)}),
        },
        "circuits": crate::guard::routes::circuits_view(&app, 20),
        "bulkheads": crate::guard::routes::bulkheads_view(&app),
        "idempotency": {
            "enabled": true,
            "webhookSources": app.guard.cfg.webhooks.keys().collect::<Vec<_>>(),
            "byScope": app.guard_store().idem_scopes(zerodrop_core::now_ms()).await?,
        },
        "jobs": crate::guard::routes::jobs_view(&app, 10).await?,
        "cache": crate::guard::routes::cache_view(&app),
        "presence": app.presence_view(),
    })))
}

// ------------------------------------------------------------------ revocation, disconnect

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct RevokeBody {
    sub: Option<String>,
    session_id: Option<String>,
    reason: Option<String>,
    /// Unix seconds; the default: a session's revocation lasts the maximum session age (after
    /// it nothing it covers can be valid), a subject's until deleted.
    until: Option<u64>,
}

impl BodyShape for RevokeBody {
    const SHAPE: &'static str =
        "{\"sub\": … | \"sessionId\": …, \"reason\"?: …, \"until\"?: unix seconds}";
}

/// Longest `reason` kept (it is echoed to the clients it ends).
const MAX_REASON: usize = 256;

fn target_of(sub: Option<String>, session_id: Option<String>) -> ApiResult<RevokeTarget> {
    match (sub, session_id) {
        (Some(s), None) if !s.is_empty() && s.len() <= 256 => Ok(RevokeTarget::Sub(s)),
        (None, Some(id)) => SessionId::parse(&id)
            .map(RevokeTarget::SessionId)
            .ok_or_else(|| ApiError::invalid(format!("invalid sessionId {id:?}"))),
        (Some(_), None) => Err(ApiError::invalid("sub must be 1-256 characters")),
        _ => Err(ApiError::invalid("give exactly one of sub and sessionId")),
    }
}

fn order_json(r: &Revocation) -> Value {
    let (kind, value) = match &r.target {
        RevokeTarget::Sub(s) => ("sub", s.as_str()),
        RevokeTarget::SessionId(id) => ("sessionId", id.as_str()),
    };
    let mut v = json!({"id": r.id, kind: value, "at": r.at_ms / 1000, "atMs": r.at_ms});
    if let Some(why) = &r.reason {
        v["reason"] = Value::from(why.as_str());
    }
    v["until"] = r.until_ms.map_or(Value::Null, |u| Value::from(u / 1000));
    v
}

/// `POST /admin/revoke`: every connection of the subject (sessions created and connect tokens
/// issued before now) or of the session is closed with `REVOKED` on every instance sharing
/// the store, and its resume tokens are refused; durable in the store.
pub(super) async fn revoke(
    State(app): State<Arc<App>>,
    _: Admin,
    JsonBody(b): JsonBody<RevokeBody>,
) -> ApiResult<Response> {
    let target = target_of(b.sub, b.session_id)?;
    let reason = b.reason.filter(|r| !r.is_empty());
    if reason.as_ref().is_some_and(|r| r.len() > MAX_REASON) {
        return Err(ApiError::invalid(format!(
            "reason is longer than {MAX_REASON} bytes"
        )));
    }
    let now_ms = zerodrop_core::now_ms();
    let until_ms = match (b.until, &target) {
        (Some(u), _) if u.saturating_mul(1000) <= now_ms => {
            return Err(ApiError::invalid("until is in the past"));
        }
        (Some(u), _) => Some(u.saturating_mul(1000)),
        (None, RevokeTarget::SessionId(_)) => {
            Some(now_ms + app.cfg.max_session_age_sec.saturating_mul(1000))
        }
        (None, RevokeTarget::Sub(_)) => None,
    };
    let r = app
        .put_order(new_order(target, reason, until_ms, false, app.clock()))
        .await?;
    tracing::warn!(revocation = %r.id, "revoked");
    Ok((StatusCode::CREATED, Json(order_json(&r))).into_response())
}

pub(super) async fn revocations(State(app): State<Arc<App>>, _: Admin) -> ApiResult<Json<Value>> {
    let list = app.list_revocations().await?;
    let out: Vec<Value> = list.iter().map(order_json).collect();
    Ok(Json(json!({"revocations": out})))
}

pub(super) async fn revocation_delete(
    State(app): State<Arc<App>>,
    _: Admin,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    if !id.starts_with("rv_") || !app.delete_revocation(&id).await? {
        return Err(ApiError::new(
            ErrorCode::NotFound,
            format!("no revocation {id:?}"),
        ));
    }
    tracing::warn!(revocation = %id, "revocation deleted");
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct DisconnectBody {
    sub: Option<String>,
    session_id: Option<String>,
}

impl BodyShape for DisconnectBody {
    const SHAPE: &'static str = "{\"sub\": … | \"sessionId\": …}";
}

/// `POST /admin/disconnect`: the target's connections open now, on every instance, get a
/// `reconnect` frame (with a resume token) and are closed; nothing is revoked.
pub(super) async fn disconnect(
    State(app): State<Arc<App>>,
    _: Admin,
    JsonBody(b): JsonBody<DisconnectBody>,
) -> ApiResult<Response> {
    let target = target_of(b.sub, b.session_id)?;
    let r = app
        .put_order(new_order(target, None, None, true, app.clock()))
        .await?;
    Ok((StatusCode::ACCEPTED, Json(order_json(&r))).into_response())
}
