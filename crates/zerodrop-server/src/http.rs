//! The HTTP API (SPEC §3): thin handlers over [`App`], and the router that assembles every
//! route, the fallback and the middleware in one place.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};
use tower_http::cors::{AllowOrigin, CorsLayer};
use zerodrop_core::{Epoch, ErrorCode, Seq, SessionId, StreamId};

use crate::app::{AckWrite, App, OpenAt};
use crate::auth::bearer;
use crate::error::{ApiError, ApiResult};
use crate::metrics::Transport;

pub const INSTANCE_HEADER: &str = "x-zerodrop-instance";
/// Most events one read or one reconnect window returns.
pub const MAX_PAGE: usize = 1000;
const DEFAULT_PAGE: usize = 100;
/// Most bytes of request headers (names and values) and of a request target. Below the HTTP
/// layer's own limits, so a request past them gets a typed error rather than a bare status.
pub const MAX_HEADER_BYTES: usize = 32 * 1024;
pub const MAX_URI_BYTES: usize = 16 * 1024;

pub fn router(app: Arc<App>) -> Router {
    let cors = cors(&app.cfg.cors_origins);
    let body_limit = DefaultBodyLimit::max(app.cfg.max_body_bytes());
    Router::new()
        .route(
            "/v1/streams/{stream}/events",
            post(publish).get(read_events),
        )
        .route("/v1/streams/{stream}", get(stream_info))
        .route("/v1/streams/{stream}/sse", get(crate::sse::handler))
        .route("/v1/sessions", post(open_session))
        .route("/v1/sessions/{id}/checkpoint", post(checkpoint))
        .route("/v1/sessions/{id}/reconnect", post(reconnect))
        .route("/v1/ws", get(crate::ws::handler))
        .route("/health", get(health))
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/admin/drain/start", post(drain_start))
        .route("/admin/drain/status", get(drain_status))
        .route("/admin/drain/complete", post(drain_complete))
        .route("/admin/snapshot", get(snapshot))
        .route("/admin/ratelimit/summary", get(ratelimit_summary))
        .route("/admin/ratelimit/alerts", get(ratelimit_alerts))
        .route("/admin/ratelimit/events", get(ratelimit_events))
        .merge(crate::guard::routes::routes())
        .route_layer(middleware::from_fn_with_state(app.clone(), rate_limit))
        .route_layer(middleware::from_fn_with_state(app.clone(), track))
        // Bodies are read into memory: refuse (413) past a maximal payload and its envelope.
        .layer(body_limit)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(head_limits))
        // Outside every layer and handler that may answer before reading the body.
        .layer(middleware::from_fn_with_state(
            app.clone(),
            crate::body::settle,
        ))
        .layer(middleware::from_fn_with_state(app.clone(), stamp))
        .layer(cors)
        .with_state(app)
}

fn cors(origins: &str) -> CorsLayer {
    let allow = if origins.trim() == "*" {
        AllowOrigin::any()
    } else {
        let list: Vec<HeaderValue> = origins
            .split(',')
            .map(str::trim)
            .filter(|o| !o.is_empty())
            .filter_map(|o| HeaderValue::from_str(o).ok())
            .collect();
        AllowOrigin::list(list)
    };
    // Listed, not `*`: by the Fetch standard a wildcard never covers `Authorization`, so
    // Firefox and Safari would refuse a cross-origin publish or session open with a bearer.
    CorsLayer::new()
        .allow_origin(allow)
        .allow_methods([Method::GET, Method::POST, Method::DELETE])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            HeaderName::from_static("idempotency-key"),
            HeaderName::from_static("last-event-id"),
        ])
        .expose_headers([
            header::RETRY_AFTER,
            HeaderName::from_static(INSTANCE_HEADER),
        ])
        .max_age(Duration::from_secs(600))
}

/// Counts every matched request by route template.
async fn track(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = req.method().clone();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let res = next.run(req).await;
    app.metrics.http_request(
        method.as_str(),
        &route,
        res.status().as_u16(),
        started.elapsed(),
    );
    res
}

/// Rate limits per `/v1` route and key (SPEC §7): 429 `RATE_LIMITED` with `Retry-After`.
/// Health, metrics and admin routes are never limited, so operators are not locked out.
async fn rate_limit(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let Some(limits) = &app.limits else {
        return next.run(req).await;
    };
    let Some(route) = req.extensions().get::<MatchedPath>().map(|m| m.as_str()) else {
        return next.run(req).await;
    };
    if !route.starts_with("/v1/") {
        return next.run(req).await;
    }
    let bucket = format!("{} {route}", req.method());
    let credential = bearer(req.headers()).map(String::from).or_else(|| {
        req.uri().query().and_then(|q| {
            q.split('&')
                .filter_map(|kv| kv.split_once('='))
                .find(|(k, _)| *k == "token" || *k == "resume")
                .map(|(_, v)| v.to_string())
        })
    });
    let key = match credential.as_deref() {
        Some(c) if app.auth.is_api_key(c) => "api-key".to_string(),
        Some(c) => match app.auth.verify_connect(c) {
            Ok(claims) => format!("sub:{}", claims.sub),
            Err(_) => crate::ratelimit::label(Some(c)),
        },
        None => match req
            .extensions()
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        {
            Some(axum::extract::ConnectInfo(addr)) => format!("ip:{}", addr.ip()),
            None => crate::ratelimit::label(None),
        },
    };
    match limits.check_key(&bucket, key) {
        Ok(()) => next.run(req).await,
        Err(wait) => {
            app.metrics.rate_limited("http");
            ApiError::new(
                ErrorCode::RateLimited,
                format!("too many requests to {bucket} from this key; retry after {wait} s"),
            )
            .retry_after(wait)
            .into_response()
        }
    }
}

/// Refuses oversized request heads with a typed error: 431 past [`MAX_HEADER_BYTES`] of
/// headers, 414 past [`MAX_URI_BYTES`] of request target.
async fn head_limits(req: Request, next: Next) -> Response {
    let uri = req.uri().to_string().len();
    let headers: usize = req
        .headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len())
        .sum();
    let (status, what, size, limit) = if uri > MAX_URI_BYTES {
        (
            StatusCode::URI_TOO_LONG,
            "request target",
            uri,
            MAX_URI_BYTES,
        )
    } else if headers > MAX_HEADER_BYTES {
        (
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "request headers",
            headers,
            MAX_HEADER_BYTES,
        )
    } else {
        return next.run(req).await;
    };
    let mut res = ApiError::invalid(format!("the {what} is {size} bytes; the limit is {limit}"))
        .into_response();
    *res.status_mut() = status;
    res
}

/// Every response names its instance (load balancers may keep affinity with it), and every
/// typed error is counted by code.
async fn stamp(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let mut res = next.run(req).await;
    if let Some(code) = res.extensions().get::<ErrorCode>() {
        app.metrics.error(*code);
    }
    if let Ok(v) = HeaderValue::from_str(&app.instance) {
        res.headers_mut()
            .insert(HeaderName::from_static(INSTANCE_HEADER), v);
    }
    res
}

async fn not_found(State(app): State<Arc<App>>, method: Method) -> ApiError {
    app.metrics
        .http_request(method.as_str(), "unmatched", 404, Duration::ZERO);
    ApiError::new(ErrorCode::NotFound, "no such route")
}

async fn method_not_allowed(State(app): State<Arc<App>>, method: Method) -> ApiError {
    app.metrics
        .http_request(method.as_str(), "unmatched", 405, Duration::ZERO);
    ApiError::new(
        ErrorCode::MethodNotAllowed,
        "method not allowed on this route",
    )
}

// -------------------------------------------------------------------------------- extractors

pub fn stream_id(p: Result<Path<String>, PathRejection>) -> ApiResult<StreamId> {
    let Path(s) = p.map_err(|_| {
        ApiError::new(
            ErrorCode::InvalidStreamId,
            "the stream id is not valid UTF-8",
        )
    })?;
    StreamId::new(&s).map_err(|e| {
        ApiError::new(
            ErrorCode::InvalidStreamId,
            format!("invalid stream id: {e}"),
        )
    })
}

/// The session id of the path; `None` when it is malformed. Such an id names no session, so
/// no resume token can be for it: callers check the credential first and then answer
/// [`not_this_session`].
fn session_id(p: Result<Path<String>, PathRejection>) -> ApiResult<Option<SessionId>> {
    let Path(s) = p.map_err(|_| ApiError::invalid("the session id is not valid UTF-8"))?;
    Ok(SessionId::parse(&s))
}

fn not_this_session() -> ApiError {
    ApiError::new(
        ErrorCode::InvalidResumeToken,
        "the resume token is not for this session",
    )
}

pub(crate) fn body_bytes(b: Result<Bytes, BytesRejection>) -> ApiResult<Bytes> {
    b.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(ErrorCode::PayloadTooLarge, "request body too large")
        } else {
            ApiError::invalid(format!("cannot read the request body: {r}"))
        }
    })
}

fn json_body<'a, T: Deserialize<'a>>(bytes: &'a [u8], shape: &str) -> ApiResult<T> {
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::invalid(format!("the body must be JSON {shape}: {e}")))
}

pub fn query<T>(q: Result<Query<T>, QueryRejection>) -> ApiResult<T> {
    q.map(|Query(v)| v)
        .map_err(|e| ApiError::invalid(format!("invalid query: {e}")))
}

fn idempotency_key(headers: &HeaderMap) -> ApiResult<Option<String>> {
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let s = v
        .to_str()
        .ok()
        .filter(|s| !s.is_empty() && s.len() <= 255 && s.bytes().all(|b| (0x21..0x7f).contains(&b)))
        .ok_or_else(|| {
            ApiError::invalid("Idempotency-Key must be 1-255 visible ASCII characters")
        })?;
    Ok(Some(s.to_string()))
}

/// `{"stream":…,"epoch":…,"headSeq":…,"events":[…]}` with each event's stored JSON spliced in.
fn events_page(
    stream: &StreamId,
    epoch: &str,
    head: Seq,
    events: &[Arc<zerodrop_core::Event>],
) -> String {
    let mut s =
        String::with_capacity(96 + events.iter().map(|e| e.json().len() + 1).sum::<usize>());
    s.push_str("{\"stream\":\"");
    s.push_str(stream.as_str());
    s.push_str("\",\"epoch\":\"");
    s.push_str(epoch);
    s.push_str("\",\"headSeq\":");
    s.push_str(&head.0.to_string());
    s.push_str(",\"events\":[");
    push_events(&mut s, events);
    s.push_str("]}");
    s
}

fn push_events(s: &mut String, events: &[Arc<zerodrop_core::Event>]) {
    for (i, e) in events.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(std::str::from_utf8(e.json()).unwrap_or("null"));
    }
}

fn json_response(status: StatusCode, body: String) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

// ---------------------------------------------------------------------------------- streams

#[derive(Deserialize)]
struct PublishBody<'a> {
    #[serde(borrow)]
    data: &'a RawValue,
}

async fn publish(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    app.auth.require_api_key(&headers)?;
    let stream = stream_id(path)?;
    let key = idempotency_key(&headers)?;
    let body = body_bytes(body)?;
    let p: PublishBody = json_body(&body, "{\"data\": …}")?;
    let out = app
        .publish(stream, p.data, key, crate::app::Publisher::ApiKey)
        .await?;
    let body = json!({
        "stream": out.stream, "seq": out.seq, "epoch": out.epoch, "duplicate": out.duplicate,
    });
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

async fn stream_info(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult<Json<Value>> {
    let stream = stream_id(path)?;
    // Like a read: the api key, or a connect token that grants the stream (the SDKs' check).
    authorize_read(&app, &headers, None, &stream)?;
    let (info, hash) = app.digest(&stream).await?;
    Ok(Json(json!({
        "stream": info.stream, "epoch": info.epoch, "headSeq": info.head,
        "firstSeq": info.first_seq, "count": info.count, "bytes": info.bytes, "hash": hash,
    })))
}

#[derive(Deserialize)]
pub struct ReadQuery {
    after: Option<u64>,
    limit: Option<usize>,
    token: Option<String>,
    epoch: Option<String>,
}

/// A read is allowed with the api key (in the `Authorization` header only), or with a connect
/// token (in the header or `?token=`) that grants the stream.
fn authorize_read(
    app: &App,
    headers: &HeaderMap,
    token: Option<&str>,
    stream: &StreamId,
) -> ApiResult<()> {
    let token = app.auth.query_token(token)?;
    let presented = bearer(headers).or(token);
    let Some(t) = presented else {
        return Err(ApiError::unauthorized(
            "an api key or a connect token is required",
        ));
    };
    if app.auth.is_api_key(t) {
        return Ok(());
    }
    let claims = app.auth.verify_connect(t)?;
    if !claims.grants().may_subscribe(stream.as_str()) {
        return Err(
            ApiError::forbidden(format!("stream {stream} is not allowed by the token"))
                .with("stream", stream.as_str()),
        );
    }
    Ok(())
}

async fn read_events(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
    q: Result<Query<ReadQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let stream = stream_id(path)?;
    let q = query(q)?;
    authorize_read(&app, &headers, q.token.as_deref(), &stream)?;
    let after = Seq(q.after.unwrap_or(0));
    let limit = q.limit.unwrap_or(DEFAULT_PAGE).clamp(1, MAX_PAGE);
    let client_epoch = match q.epoch.as_deref() {
        Some(e) => {
            Some(zerodrop_core::Epoch::parse(e).ok_or_else(|| ApiError::invalid("invalid epoch"))?)
        }
        None => None,
    };
    let res = app
        .read_from(&stream, after, client_epoch.as_ref(), limit)
        .await?;
    let body = events_page(&stream, res.info.epoch.as_str(), res.info.head, &res.events);
    Ok(json_response(StatusCode::OK, body))
}

// --------------------------------------------------------------------------------- sessions

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct OpenBody {
    #[serde(default)]
    streams: Vec<String>,
    /// Per stream, the position the client already holds: `N`, or `{"seq": N, "epoch": E}`.
    #[serde(default)]
    after: BTreeMap<String, Position>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Position {
    Seq(u64),
    At { seq: u64, epoch: Option<String> },
}

/// The streams of `POST /v1/sessions` with where each starts; every `after` key must be one of
/// the streams.
fn open_at(b: OpenBody) -> ApiResult<Vec<OpenAt>> {
    let streams = stream_list(&b.streams)?;
    for name in b.after.keys() {
        if !streams.iter().any(|s| s.as_str() == name) {
            return Err(ApiError::invalid(format!(
                "after names {name:?}, which is not in streams"
            )));
        }
    }
    streams
        .into_iter()
        .map(|stream| {
            let (after, epoch) = match b.after.get(stream.as_str()) {
                None => (None, None),
                Some(Position::Seq(n)) => (Some(Seq(*n)), None),
                Some(Position::At { seq, epoch }) => {
                    let epoch = match epoch.as_deref() {
                        None => None,
                        Some(e) => Some(Epoch::parse(e).ok_or_else(|| {
                            ApiError::invalid(format!("invalid epoch {e:?}"))
                                .with("stream", stream.as_str())
                        })?),
                    };
                    (Some(Seq(*seq)), epoch)
                }
            };
            Ok(OpenAt {
                stream,
                after,
                epoch,
            })
        })
        .collect()
}

fn stream_list(names: &[String]) -> ApiResult<Vec<StreamId>> {
    let mut out: Vec<StreamId> = Vec::with_capacity(names.len());
    for n in names {
        let s = StreamId::new(n).map_err(|e| {
            ApiError::new(
                ErrorCode::InvalidStreamId,
                format!("invalid stream id {n:?}: {e}"),
            )
        })?;
        if !out.contains(&s) {
            out.push(s);
        }
    }
    Ok(out)
}

async fn open_session(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let token = bearer(&headers).ok_or_else(|| {
        ApiError::unauthorized("a connect token is required (Authorization: Bearer <jwt>)")
    })?;
    let claims = app.auth.verify_connect(token)?;
    let body = body_bytes(body)?;
    let b: OpenBody = if body.is_empty() {
        OpenBody::default()
    } else {
        json_body(&body, "{\"streams\": […], \"after\"?: {stream: seq}}")?
    };
    let at = open_at(b)?;
    let (rec, heads) = app.open_session(&claims.sub, claims.grants(), &at).await?;
    let token = app.mint_token(&rec.id, &rec.sub);
    let streams: serde_json::Map<String, Value> = at
        .iter()
        .zip(heads)
        .filter_map(|(a, head)| {
            let st = rec.streams.get(&a.stream)?;
            Some((
                a.stream.to_string(),
                json!({"epoch": st.epoch, "headSeq": head, "lastAckSequence": st.ack}),
            ))
        })
        .collect();
    let body = json!({
        "sessionId": rec.id, "resumeToken": token,
        "reconnectWindowSec": app.cfg.reconnect_window_sec, "instance": app.instance,
        "streams": streams,
    });
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckpointBody {
    stream: String,
    seq: u64,
}

async fn checkpoint(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<Value>> {
    let sid = session_id(path)?;
    let token = bearer(&headers).ok_or_else(|| {
        ApiError::unauthorized("the resume token is required (Authorization: Bearer <resumeToken>)")
    })?;
    let sid = sid.ok_or_else(not_this_session)?;
    let session = app.session_for(token, Some(&sid)).await?;
    let body = body_bytes(body)?;
    let b: CheckpointBody = json_body(&body, "{\"stream\": …, \"seq\": n}")?;
    let stream = StreamId::new(&b.stream).map_err(|e| {
        ApiError::new(
            ErrorCode::InvalidStreamId,
            format!("invalid stream id: {e}"),
        )
    })?;
    let update = app.checkpoint(&session, &stream, Seq(b.seq)).await?;
    Ok(Json(
        json!({"ackUpdate": update.as_str(), "lastAckSequence": update.last_ack()}),
    ))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ReconnectBody {
    resume_token: String,
    #[serde(default)]
    last_ack_sequence: BTreeMap<String, u64>,
}

async fn reconnect(
    State(app): State<Arc<App>>,
    path: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let sid = session_id(path)?;
    let body = body_bytes(body)?;
    let b: ReconnectBody = json_body(
        &body,
        "{\"resumeToken\": …, \"lastAckSequence\": {stream: n}}",
    )?;
    let Some(sid) = sid else {
        let e = not_this_session();
        app.metrics.resume_failed(Transport::Http, e.code);
        return Err(e);
    };
    let session = app
        .resume(&b.resume_token, Some(&sid), Transport::Http)
        .await?;
    let mut replay = String::from("{");
    let mut replayed = 0u64;
    for (i, stream) in session.streams.keys().enumerate() {
        if i > 0 {
            replay.push(',');
        }
        replay.push('"');
        replay.push_str(stream.as_str());
        replay.push_str("\":");
        let client_ack = b.last_ack_sequence.get(stream.as_str()).map(|n| Seq(*n));
        match window_json(&app, &session, stream, client_ack).await {
            Ok((json, n)) => {
                replay.push_str(&json);
                replayed += n;
            }
            Err(e) => {
                app.metrics.error(e.code);
                replay.push_str(&e.envelope().to_string());
            }
        }
    }
    replay.push('}');
    app.metrics.resume_succeeded(Transport::Http);
    app.metrics.replayed(replayed);
    let token = app.mint_token(&session.id, &session.sub);
    let body = format!(
        "{{\"sessionId\":{},\"resumeToken\":{},\"replay\":{replay}}}",
        Value::from(session.id.as_str()),
        Value::from(token)
    );
    Ok(json_response(StatusCode::OK, body))
}

/// One stream's replay window as JSON, and how many events it carries.
async fn window_json(
    app: &App,
    session: &zerodrop_store::SessionRecord,
    stream: &StreamId,
    client_ack: Option<Seq>,
) -> ApiResult<(String, u64)> {
    let start = app
        .stream_start(session, stream, client_ack, AckWrite::Wait)
        .await?;
    let res = app
        .read_from(stream, start.after, Some(&start.epoch), MAX_PAGE)
        .await?;
    let to = res.events.last().map(|e| e.seq()).unwrap_or(start.after);
    let mut s = format!(
        "{{\"epoch\":\"{}\",\"fromSeq\":{},\"toSeq\":{},\"complete\":{},\"events\":[",
        res.info.epoch,
        start.after.0 + 1,
        to.0,
        to >= res.info.head
    );
    push_events(&mut s, &res.events);
    s.push_str("]}");
    Ok((s, res.events.len() as u64))
}

// ----------------------------------------------------------------------------------- health

fn store_up(app: &App) -> bool {
    app.store_up.load(Ordering::Relaxed)
}

async fn health(State(app): State<Arc<App>>) -> Json<Value> {
    let up = store_up(&app);
    let drain = app.drain.state();
    let status = if drain != crate::drain::DrainState::Active {
        "draining"
    } else if !up {
        "degraded"
    } else {
        "ok"
    };
    Json(json!({
        "status": status,
        "instance": app.instance,
        "store": {"kind": app.store_kind().as_str(), "up": up},
        "drain": {"state": drain.as_str()},
    }))
}

async fn live() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn ready(State(app): State<Arc<App>>) -> Response {
    let mut reasons = Vec::new();
    if app.store_corrupt() {
        reasons.push("store_corrupt");
    } else if !store_up(&app) {
        reasons.push("store_unavailable");
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
struct MetricsQuery {
    format: Option<String>,
}

async fn metrics(
    State(app): State<Arc<App>>,
    q: Result<Query<MetricsQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let q = query(q)?;
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
struct DrainBody {
    reason: Option<String>,
    max_session_age_seconds: Option<u64>,
}

fn drain_json(app: &App) -> Json<Value> {
    Json(app.drain.status(app.conns.current()))
}

async fn drain_start(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<Value>> {
    app.auth.require_admin(&headers)?;
    let body = body_bytes(body)?;
    let b: DrainBody = if body.is_empty() {
        DrainBody::default()
    } else {
        json_body(&body, "{\"reason\": …, \"max_session_age_seconds\": n}")?
    };
    let spread = Duration::from_secs(b.max_session_age_seconds.unwrap_or(app.cfg.drain_grace_sec));
    let reason = b.reason.unwrap_or_else(|| "manual".into());
    app.start_drain(&reason, spread);
    Ok(drain_json(&app))
}

async fn drain_status(State(app): State<Arc<App>>, headers: HeaderMap) -> ApiResult<Json<Value>> {
    app.auth.require_admin(&headers)?;
    let out = drain_json(&app);
    app.metrics.drain_state(app.drain.state().gauge());
    Ok(out)
}

#[derive(Deserialize)]
struct LimitQuery {
    minutes: Option<u64>,
    limit: Option<usize>,
}

/// The rate-limit ledger's views; `{"enabled": false}` when HTTP limits are off.
fn ratelimit_view(
    app: &App,
    headers: &HeaderMap,
    view: impl FnOnce(&crate::ratelimit::HttpLimits) -> (&'static str, Value),
) -> ApiResult<Json<Value>> {
    app.auth.require_admin(headers)?;
    Ok(Json(match &app.limits {
        None => json!({"enabled": false}),
        Some(l) => {
            let (key, v) = view(l);
            json!({"enabled": true, key: v})
        }
    }))
}

async fn ratelimit_summary(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    q: Result<Query<LimitQuery>, QueryRejection>,
) -> ApiResult<Json<Value>> {
    let minutes = query(q)?.minutes.unwrap_or(15);
    ratelimit_view(&app, &headers, |l| ("summary", l.summary(minutes)))
}

async fn ratelimit_alerts(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    q: Result<Query<LimitQuery>, QueryRejection>,
) -> ApiResult<Json<Value>> {
    let limit = query(q)?.limit.unwrap_or(20);
    ratelimit_view(&app, &headers, |l| ("alerts", l.alerts(limit)))
}

async fn ratelimit_events(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    q: Result<Query<LimitQuery>, QueryRejection>,
) -> ApiResult<Json<Value>> {
    let limit = query(q)?.limit.unwrap_or(50);
    ratelimit_view(&app, &headers, |l| ("events", l.events(limit)))
}

async fn drain_complete(State(app): State<Arc<App>>, headers: HeaderMap) -> ApiResult<Json<Value>> {
    app.auth.require_admin(&headers)?;
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
async fn snapshot(State(app): State<Arc<App>>, headers: HeaderMap) -> ApiResult<Json<Value>> {
    app.auth.require_admin(&headers)?;
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
