//! The operator's routes: health and readiness probes, metrics (Prometheus text or JSON),
//! and the admin API (drain, the rate-limit ledger, the reliability snapshot). Every
//! `/admin` handler takes [`Admin`]; the probes and metrics take no credential.
//!
//! Must not: change anything but the drain state (the only admin action here), or answer
//! from anything but live state.

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
use zerodrop_store::StoreDurability;
use zerodrop_store::durability::sqlite_synchronous_name;

use super::extract::{Admin, BodyShape, JsonBody, Query};
use crate::app::App;
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
    })))
}
