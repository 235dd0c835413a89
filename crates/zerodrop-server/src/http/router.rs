//! The one place the HTTP routes are assembled: every route (the `/v1` API, health,
//! metrics, admin, and the guardrails' routes), the fallbacks, and the layers around them —
//! route-template metrics, per-route rate limits, typed refusals of oversized request heads,
//! bodies settled before the answer, the instance header, CORS (but not on a WebSocket
//! handshake's answer).
//!
//! Must not: handle a request itself (beyond the layers' refusals); be imported by anything
//! but start-up (`server.rs`), since it imports every HTTP-facing module.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, header};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, delete, get, post};
use futures_util::future::Either;
use tower::{Layer, Service};
use tower_http::cors::{AllowOrigin, Cors, CorsLayer};
use zerodrop_core::ErrorCode;

use super::{admin, ds, streams, v1};
use crate::app::App;
use crate::auth::bearer;
use crate::body::Begun;
use crate::conn::HttpService;
use crate::error::ApiError;
use crate::guard::routes as guard;

pub const INSTANCE_HEADER: &str = "x-zerodrop-instance";
/// Most bytes of request headers (names and values) and of a request target. Below the HTTP
/// layer's own limits, so a request past them gets a typed error rather than a bare status.
pub const MAX_HEADER_BYTES: usize = 32 * 1024;
pub const MAX_URI_BYTES: usize = 16 * 1024;

/// The HTTP service: the routes, with the layers around each matched route inside the
/// router, and the layers around every request (fallbacks included) outside it. Those outer
/// layers wrap the router once, not each route: a layer added with `Router::layer` wraps every
/// route on its own, and each request then clones its route's whole stack of boxed services.
pub fn router(app: Arc<App>) -> impl HttpService {
    let cors = cors(&app.cfg.cors_origins);
    // Bodies are read into memory: refuse (413) past a maximal payload and its envelope.
    let body_limit = DefaultBodyLimit::max(app.cfg.max_body_bytes());
    let edge = Edge::new(app.clone());
    let routes = Router::new()
        .route(
            "/v1/streams/{stream}/events",
            post(v1::publish).get(v1::read_events),
        )
        .route(
            "/v1/streams/{stream}",
            get(v1::stream_info).delete(streams::delete_stream),
        )
        .route("/v1/streams/{stream}/close", post(streams::close_stream))
        .route(
            "/v1/events",
            post(streams::publish_batch).layer(DefaultBodyLimit::max(
                app.cfg.max_batch_bytes.max(app.cfg.max_body_bytes()),
            )),
        )
        .route(
            "/ds/v1/stream/{stream}",
            any(ds::handle)
                .layer(DefaultBodyLimit::max(
                    app.cfg.max_batch_bytes.max(app.cfg.max_body_bytes()),
                ))
                .layer(middleware::map_response(ds::security_headers)),
        )
        .route("/v1/streams/{stream}/sse", get(crate::sse::handler))
        .route("/v1/sse", get(crate::sse::many::handler))
        .route("/v1/streams/{stream}/presence", get(v1::presence))
        .route("/v1/sessions", post(v1::open_session))
        .route("/v1/sessions/{id}/checkpoint", post(v1::checkpoint))
        .route("/v1/sessions/{id}/reconnect", post(v1::reconnect))
        .route("/v1/sessions/{id}/refresh", post(v1::refresh))
        .route("/v1/ws", get(crate::ws::handler))
        .route("/v1/webhooks/{source}", post(guard::webhook))
        .route("/v1/upstreams/{upstream}/{*path}", get(guard::upstream_get))
        .route("/health", get(admin::health))
        .route("/health/live", get(admin::live))
        .route("/health/ready", get(admin::ready))
        .route("/metrics", get(admin::metrics))
        .route("/admin/drain/start", post(admin::drain_start))
        .route("/admin/drain/status", get(admin::drain_status))
        .route("/admin/drain/complete", post(admin::drain_complete))
        .route("/admin/snapshot", get(admin::snapshot))
        .route("/admin/revoke", post(admin::revoke))
        .route("/admin/revocations", get(admin::revocations))
        .route("/admin/revocations/{id}", delete(admin::revocation_delete))
        .route("/admin/disconnect", post(admin::disconnect))
        .route("/admin/ratelimit/summary", get(admin::ratelimit_summary))
        .route("/admin/ratelimit/alerts", get(admin::ratelimit_alerts))
        .route("/admin/ratelimit/events", get(admin::ratelimit_events))
        .route("/admin/circuits", get(guard::circuits))
        .route("/admin/bulkheads", get(guard::bulkheads))
        .route("/admin/idempotency", get(guard::idempotency))
        .route("/admin/cache", get(guard::cache))
        .route("/admin/cache/{namespace}", delete(guard::cache_clear))
        .route("/admin/jobs", get(guard::jobs))
        .route(
            "/admin/jobs/dead-letters/{id}/requeue",
            post(guard::requeue),
        )
        .route_layer(PerRoute(app.clone()))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(app);
    // A route's own body limit (`/v1/events`, `/ds/`) is set inside the router, after this
    // one, and wins.
    CorsUnlessUpgrade(cors).layer(Around {
        inner: body_limit.layer(routes),
        steps: edge,
    })
}

/// CORS on every answer but a WebSocket handshake's. Browsers apply no CORS to a WebSocket
/// (they send `Origin` and read no `Access-Control-*` header of its answer), so on a 101 the
/// headers would only be bytes for both sides, at every connect.
#[derive(Clone)]
struct CorsUnlessUpgrade(CorsLayer);

impl<S: Clone> Layer<S> for CorsUnlessUpgrade {
    type Service = CorsOrPlain<S>;

    fn layer(&self, inner: S) -> CorsOrPlain<S> {
        CorsOrPlain {
            cors: self.0.layer(inner.clone()),
            plain: inner,
        }
    }
}

#[derive(Clone)]
struct CorsOrPlain<S> {
    cors: Cors<S>,
    plain: S,
}

impl<S> Service<Request> for CorsOrPlain<S>
where
    S: Service<Request, Response = Response> + Clone,
{
    type Response = Response;
    type Error = S::Error;
    type Future = Either<<Cors<S> as Service<Request>>::Future, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        // Both wrap the same inner service (a router, always ready).
        match self.cors.poll_ready(cx) {
            Poll::Ready(Ok(())) => self.plain.poll_ready(cx),
            other => other,
        }
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let upgrade = req
            .headers()
            .get(header::UPGRADE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
        if upgrade {
            Either::Right(self.plain.call(req))
        } else {
            Either::Left(self.cors.call(req))
        }
    }
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
        .allow_methods([
            Method::GET,
            Method::POST,
            Method::DELETE,
            Method::PUT,
            Method::HEAD,
        ])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            HeaderName::from_static("idempotency-key"),
            HeaderName::from_static("last-event-id"),
            // The Durable Streams room's (`/ds/`).
            header::IF_NONE_MATCH,
            HeaderName::from_static("stream-seq"),
            HeaderName::from_static("stream-ttl"),
            HeaderName::from_static("stream-expires-at"),
            HeaderName::from_static("stream-closed"),
            HeaderName::from_static("producer-id"),
            HeaderName::from_static("producer-epoch"),
            HeaderName::from_static("producer-seq"),
        ])
        .expose_headers([
            header::RETRY_AFTER,
            HeaderName::from_static(INSTANCE_HEADER),
            header::ETAG,
            header::LOCATION,
            HeaderName::from_static("stream-next-offset"),
            HeaderName::from_static("stream-up-to-date"),
            HeaderName::from_static("stream-cursor"),
            HeaderName::from_static("stream-closed"),
            HeaderName::from_static("stream-ttl"),
            HeaderName::from_static("stream-expires-at"),
            HeaderName::from_static("stream-sse-data-encoding"),
            HeaderName::from_static("producer-epoch"),
            HeaderName::from_static("producer-seq"),
            HeaderName::from_static("producer-expected-seq"),
            HeaderName::from_static("producer-received-seq"),
        ])
        .max_age(Duration::from_secs(600))
}

/// Around every matched route: its metrics (counted by route template, the rate limit's
/// refusals included) outside its rate limit ([`rate_limited`]). A service of its own rather
/// than a `from_fn` layer, which would box a clone of the route and a `Next` per request.
#[derive(Clone)]
struct PerRoute(Arc<App>);

impl<S> Layer<S> for PerRoute {
    type Service = Around<S, PerRoute>;

    fn layer(&self, inner: S) -> Around<S, PerRoute> {
        Around {
            inner,
            steps: self.clone(),
        }
    }
}

impl Steps for PerRoute {
    fn call<S: HttpService>(&self, inner: &mut S, req: Request) -> Answer {
        let started = Instant::now();
        let method = req.method().clone();
        // A clone of the template's shared string, not a copy of it.
        let route = req.extensions().get::<MatchedPath>().cloned();
        let answer = answered(inner, rate_limited(&self.0, &req).map_or(Ok(req), Err));
        let app = self.0.clone();
        Box::pin(async move {
            let Ok(res) = answer.await;
            app.metrics.http_request(
                method.as_str(),
                route.as_ref().map_or("unmatched", MatchedPath::as_str),
                res.status().as_u16(),
                started.elapsed(),
            );
            Ok(res)
        })
    }
}

/// An answer on its way, boxed once for the layer it passes.
type Answer = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

/// What a layer does around the service it wraps, for each request: calls it as the request
/// arrives (or answers instead) and returns the answer on its way.
trait Steps: Clone {
    fn call<S: HttpService>(&self, inner: &mut S, req: Request) -> Answer;
}

/// A service that runs `steps` around `inner`.
#[derive(Clone)]
struct Around<S, T> {
    inner: S,
    steps: T,
}

impl<S: HttpService, T: Steps> Service<Request> for Around<S, T> {
    type Response = Response;
    type Error = Infallible;
    type Future = Answer;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Answer {
        self.steps.call(&mut self.inner, req)
    }
}

/// The inner service's answer to `req`, or the refusal made instead of calling it: either way
/// a future of the answer, awaited as it is.
fn answered<S: HttpService>(
    inner: &mut S,
    req: Result<Request, Response>,
) -> Either<std::future::Ready<Result<Response, Infallible>>, S::Future> {
    match req {
        Ok(req) => Either::Right(inner.call(req)),
        Err(refused) => Either::Left(std::future::ready(Ok(refused))),
    }
}

/// Rate limits per `/v1` route and key (SPEC §7): 429 `RATE_LIMITED` with `Retry-After`.
/// Health, metrics and admin routes are never limited, so operators are not locked out.
fn rate_limited(app: &App, req: &Request) -> Option<Response> {
    let limits = app.limits.as_ref()?;
    let route = req.extensions().get::<MatchedPath>()?.as_str();
    if !route.starts_with("/v1/") {
        return None;
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
    let wait = limits.check_key(&bucket, key).err()?;
    app.metrics.rate_limited("http");
    Some(
        ApiError::new(
            ErrorCode::RateLimited,
            format!("too many requests to {bucket} from this key; retry after {wait} s"),
        )
        .retry_after(wait)
        .into_response(),
    )
}

/// Around everything, fallbacks included, from the outside in: the instance header and
/// the error count ([`stamp`]), the body settled before the answer
/// ([`begin`](crate::body::begin) and [`finish`](crate::body::Settling::finish): outside every
/// layer and handler that may answer before reading the body), and the request head's limits
/// ([`head_refusal`]). The inner service is called as the request arrives, so nothing is
/// cloned for it.
impl Steps for Edge {
    fn call<S: HttpService>(&self, inner: &mut S, req: Request) -> Answer {
        let edge = self.clone();
        let (req, settling) = match crate::body::begin(&edge.app, req) {
            Begun::Refused(refused) => (Err(refused), None),
            Begun::Go(req, settling) => (head_refusal(&req).map_or(Ok(req), Err), settling),
        };
        let answer = answered(inner, req);
        Box::pin(async move {
            let Ok(mut res) = answer.await;
            if let Some(settling) = settling {
                res = settling.finish(res).await;
            }
            stamp(&edge, &mut res);
            Ok(res)
        })
    }
}

/// Refuses oversized request heads with a typed error: 431 past [`MAX_HEADER_BYTES`] of
/// headers, 414 past [`MAX_URI_BYTES`] of request target.
fn head_refusal(req: &Request) -> Option<Response> {
    let uri = written_len(req.uri());
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
        return None;
    };
    let mut res = ApiError::invalid(format!("the {what} is {size} bytes; the limit is {limit}"))
        .into_response();
    *res.status_mut() = status;
    Some(res)
}

/// How many bytes `v` displays as, counted without writing them anywhere.
fn written_len(v: &impl std::fmt::Display) -> usize {
    struct Count(usize);
    impl std::fmt::Write for Count {
        fn write_str(&mut self, s: &str) -> std::fmt::Result {
            self.0 += s.len();
            Ok(())
        }
    }
    let mut n = Count(0);
    let _ = std::fmt::write(&mut n, format_args!("{v}"));
    n.0
}

/// Every response names its instance (load balancers may keep affinity with it), and every
/// typed error is counted by code.
fn stamp(edge: &Edge, res: &mut Response) {
    if let Some(code) = res.extensions().get::<ErrorCode>() {
        edge.app.metrics.error(*code);
    }
    if let Some(v) = &edge.instance {
        res.headers_mut()
            .insert(HeaderName::from_static(INSTANCE_HEADER), v.clone());
    }
}

/// What the steps around everything need: the instance's header value is checked once, not
/// per response.
#[derive(Clone)]
struct Edge {
    app: Arc<App>,
    instance: Option<HeaderValue>,
}

impl Edge {
    fn new(app: Arc<App>) -> Edge {
        let instance = HeaderValue::from_str(&app.instance).ok();
        Edge { app, instance }
    }
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
