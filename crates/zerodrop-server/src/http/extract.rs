//! What an HTTP handler takes from a request, as axum extractors whose rejections are our
//! typed errors (`{"error":{code,message}}`), so a handler's signature says what it needs and
//! its body never unwraps an axum rejection by hand.
//!
//! Credentials: [`ApiKey`] and [`Admin`] (the `Authorization` header only), [`ConnectToken`]
//! and [`Caller`] (the header, or `?token=` where a browser cannot set headers; the api key
//! is never taken from a URL, see [`Auth::query_token`](crate::auth::Auth::query_token)).
//! Inputs: [`StreamPath`], [`SessionPath`], [`Path`], [`Query`], [`IdempotencyKey`],
//! [`RawBody`], [`JsonBody`], [`Upgrade`].
//!
//! Extractors run in the order of a handler's parameters, so that order is the order in which
//! a request's faults are reported: keep it when a handler changes.
//!
//! Must not: decide anything beyond the shape and the credential of a request (no store, no
//! session rule); build an error any other way than through [`ApiError`].

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::PathRejection;
use axum::extract::{FromRequest, FromRequestParts, OptionalFromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, StatusCode, Version, header};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use zerodrop_core::{ErrorCode, SessionId, StreamId};

use crate::app::App;
use crate::auth::{ConnectClaims, bearer};
use crate::error::{ApiError, ApiResult};

type AppState = Arc<App>;

/// The api key in `Authorization: Bearer <key>` (backends: publish, webhooks).
pub struct ApiKey;

impl FromRequestParts<AppState> for ApiKey {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &AppState) -> ApiResult<ApiKey> {
        app.auth.require_api_key(&parts.headers).map(|()| ApiKey)
    }
}

/// The admin token in `Authorization: Bearer <token>` (every `/admin` route).
pub struct Admin;

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &AppState) -> ApiResult<Admin> {
        app.auth.require_admin(&parts.headers).map(|()| Admin)
    }
}

#[derive(Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

/// The token of `?token=`, which carries only connect tokens: the api key there is refused.
fn url_token(parts: &Parts, app: &App) -> ApiResult<Option<String>> {
    let axum::extract::Query(q) = axum::extract::Query::<TokenQuery>::try_from_uri(&parts.uri)
        .map_err(|e| ApiError::invalid(format!("invalid query: {e}")))?;
    Ok(app.auth.query_token(q.token.as_deref())?.map(String::from))
}

/// A verified connect token (a client's JWT). `ConnectToken` reads `?token=` (refusing the
/// api key there), then the `Authorization` header; `ConnectToken<false>` reads the header
/// only. As `Option<ConnectToken>`, a request without one is `None` (and a bad one is still
/// refused).
pub struct ConnectToken<const IN_URL: bool = true>(pub ConnectClaims);

impl<const IN_URL: bool> OptionalFromRequestParts<AppState> for ConnectToken<IN_URL> {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        app: &AppState,
    ) -> ApiResult<Option<ConnectToken<IN_URL>>> {
        // `?token=` first: where it is allowed, it is where browsers put it.
        let url = if IN_URL { url_token(parts, app)? } else { None };
        match url.or_else(|| bearer(&parts.headers).map(String::from)) {
            Some(t) => Ok(Some(ConnectToken(app.connect_token(&t).await?))),
            None => Ok(None),
        }
    }
}

impl<const IN_URL: bool> FromRequestParts<AppState> for ConnectToken<IN_URL> {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        app: &AppState,
    ) -> ApiResult<ConnectToken<IN_URL>> {
        <Self as OptionalFromRequestParts<AppState>>::from_request_parts(parts, app)
            .await?
            .ok_or_else(|| {
                ApiError::unauthorized("a connect token is required (Authorization: Bearer <jwt>)")
            })
    }
}

/// Who reads: the api key (the `Authorization` header only) or a verified connect token (the
/// header, or `?token=` for `Caller`; `Caller<false>` reads the header only).
pub enum Caller<const IN_URL: bool = true> {
    ApiKey,
    Connect(ConnectClaims),
}

impl<const IN_URL: bool> Caller<IN_URL> {
    /// Whether this caller may read `stream`: the api key may read any; a connect token the
    /// streams it grants.
    pub fn may_read(&self, stream: &StreamId) -> ApiResult<()> {
        match self {
            Caller::ApiKey => Ok(()),
            Caller::Connect(claims) if claims.grants().may_subscribe(stream.as_str()) => Ok(()),
            Caller::Connect(_) => Err(ApiError::forbidden(format!(
                "stream {stream} is not allowed by the token"
            ))
            .with("stream", stream.as_str())),
        }
    }
}

impl<const IN_URL: bool> FromRequestParts<AppState> for Caller<IN_URL> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &AppState) -> ApiResult<Caller<IN_URL>> {
        // `?token=` is checked (for the api key) even when the header wins.
        let url = if IN_URL { url_token(parts, app)? } else { None };
        let Some(t) = bearer(&parts.headers).map(String::from).or(url) else {
            return Err(ApiError::unauthorized(
                "an api key or a connect token is required (Authorization: Bearer <credential>)",
            ));
        };
        if app.auth.is_api_key(&t) {
            return Ok(Caller::ApiKey);
        }
        Ok(Caller::Connect(app.connect_token(&t).await?))
    }
}

/// The route's captures as axum reads them.
async fn captures<S: Send + Sync, T: DeserializeOwned + Send>(
    parts: &mut Parts,
    state: &S,
) -> Result<T, PathRejection> {
    <axum::extract::Path<T> as FromRequestParts<S>>::from_request_parts(parts, state)
        .await
        .map(|axum::extract::Path(v)| v)
}

/// A stream id from the route's `{stream}`, validated (`INVALID_STREAM_ID` otherwise).
pub struct StreamPath(pub StreamId);

impl<S: Send + Sync> FromRequestParts<S> for StreamPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> ApiResult<StreamPath> {
        let s: String = captures(parts, state).await.map_err(|_| {
            ApiError::new(
                ErrorCode::InvalidStreamId,
                "the stream id is not valid UTF-8",
            )
        })?;
        StreamId::new(&s).map(StreamPath).map_err(|e| {
            ApiError::new(
                ErrorCode::InvalidStreamId,
                format!("invalid stream id: {e}"),
            )
        })
    }
}

/// The session id of the route's `{id}`; `None` when it is malformed. Such an id names no
/// session, so no resume token can be for it: handlers check the credential first and then
/// answer `INVALID_RESUME_TOKEN`.
pub struct SessionPath(pub Option<SessionId>);

impl<S: Send + Sync> FromRequestParts<S> for SessionPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> ApiResult<SessionPath> {
        let s: String = captures(parts, state)
            .await
            .map_err(|_| ApiError::invalid("the session id is not valid UTF-8"))?;
        Ok(SessionPath(SessionId::parse(&s)))
    }
}

/// The route's captures, deserialized (`INVALID_REQUEST` otherwise).
pub struct Path<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for Path<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> ApiResult<Path<T>> {
        captures(parts, state)
            .await
            .map(Path)
            .map_err(|e| ApiError::invalid(format!("invalid path: {e}")))
    }
}

/// The query string, deserialized (`INVALID_REQUEST` otherwise).
pub struct Query<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> ApiResult<Query<T>> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(v)| Query(v))
            .map_err(|e| ApiError::invalid(format!("invalid query: {e}")))
    }
}

/// The `Idempotency-Key` header, if any: 1-255 visible ASCII characters.
pub struct IdempotencyKey(pub Option<String>);

impl<S: Send + Sync> FromRequestParts<S> for IdempotencyKey {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> ApiResult<IdempotencyKey> {
        let Some(v) = parts.headers.get("idempotency-key") else {
            return Ok(IdempotencyKey(None));
        };
        let s = v
            .to_str()
            .ok()
            .filter(|s| valid_idempotency_key(s))
            .ok_or_else(|| {
                ApiError::invalid("Idempotency-Key must be 1-255 visible ASCII characters")
            })?;
        Ok(IdempotencyKey(Some(s.to_string())))
    }
}

/// What an idempotency key may be (the header's, and a batch item's `id`): 1-255 visible
/// ASCII characters.
pub fn valid_idempotency_key(s: &str) -> bool {
    !s.is_empty() && s.len() <= 255 && s.bytes().all(|b| (0x21..0x7f).contains(&b))
}

/// A WebSocket upgrade request (`INVALID_REQUEST` for anything else): HTTP/1.1 `GET` with
/// `Connection: upgrade`, `Upgrade: websocket`, `Sec-WebSocket-Version: 13` and a
/// `Sec-WebSocket-Key`. The server answers it itself (`ws.rs`), so that it can negotiate
/// `permessage-deflate` and put its own layer under the socket.
pub struct Upgrade {
    /// The `Sec-WebSocket-Key`, for the `Sec-WebSocket-Accept` of the answer.
    pub key: Vec<u8>,
    /// The connection, once the `101` has gone out.
    pub on_upgrade: hyper::upgrade::OnUpgrade,
}

impl<S: Send + Sync> FromRequestParts<S> for Upgrade {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> ApiResult<Upgrade> {
        let not = |why: &str| ApiError::invalid(format!("not a WebSocket upgrade: {why}"));
        if parts.version > Version::HTTP_11 {
            return Err(not("WebSockets need HTTP/1.1"));
        }
        if parts.method != Method::GET {
            return Err(not("request method must be `GET`"));
        }
        let h = &parts.headers;
        if !header_has_token(h, header::CONNECTION, "upgrade") {
            return Err(not("Connection header did not include 'upgrade'"));
        }
        if !header_is(h, header::UPGRADE, "websocket") {
            return Err(not("`Upgrade` header did not include 'websocket'"));
        }
        if !header_is(h, header::SEC_WEBSOCKET_VERSION, "13") {
            return Err(not("`Sec-WebSocket-Version` header did not include '13'"));
        }
        let key = h
            .get(header::SEC_WEBSOCKET_KEY)
            .ok_or_else(|| not("`Sec-WebSocket-Key` header missing"))?
            .as_bytes()
            .to_vec();
        let on_upgrade = parts
            .extensions
            .remove::<hyper::upgrade::OnUpgrade>()
            .ok_or_else(|| {
                not("WebSocket request couldn't be upgraded since no upgrade state was present")
            })?;
        Ok(Upgrade { key, on_upgrade })
    }
}

fn header_is(h: &HeaderMap, name: header::HeaderName, value: &str) -> bool {
    h.get(name)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(value.as_bytes()))
}

fn header_has_token(h: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    h.get_all(name).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

/// The request body, read whole: `PAYLOAD_TOO_LARGE` past the body limit, `INVALID_REQUEST`
/// when it cannot be read.
pub struct RawBody(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for RawBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> ApiResult<RawBody> {
        Bytes::from_request(req, state)
            .await
            .map(RawBody)
            .map_err(|r| {
                if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::new(ErrorCode::PayloadTooLarge, "request body too large")
                } else {
                    ApiError::invalid(format!("cannot read the request body: {r}"))
                }
            })
    }
}

/// A JSON request body and what its errors tell the client.
pub trait BodyShape: Sized {
    /// The body's shape as the error of a body that is not it shows it.
    const SHAPE: &'static str;

    /// The value of an empty body; `None` when a body is required.
    fn empty() -> Option<Self> {
        None
    }
}

/// The request body as JSON of shape `T` (`INVALID_REQUEST` naming [`BodyShape::SHAPE`]
/// otherwise). Whatever the content type: clients send JSON without saying so.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + BodyShape> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> ApiResult<JsonBody<T>> {
        let RawBody(body) = RawBody::from_request(req, state).await?;
        if body.is_empty()
            && let Some(v) = T::empty()
        {
            return Ok(JsonBody(v));
        }
        json(&body, T::SHAPE).map(JsonBody)
    }
}

/// `bytes` as JSON of the given shape (for bodies that borrow from the request's bytes).
pub fn json<'a, T: Deserialize<'a>>(bytes: &'a [u8], shape: &str) -> ApiResult<T> {
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::invalid(format!("the body must be JSON {shape}: {e}")))
}

#[cfg(test)]
mod tests {
    //! Each extractor's refusals, with their statuses and codes, and the order in which a
    //! handler's parameters report them.

    use axum::Router;
    use axum::body::Body;
    use axum::http::{Method, header};
    use axum::routing::{get, post};
    use serde_json::Value;
    use tower::ServiceExt;

    use super::*;
    use crate::auth::ConnectClaims;
    use crate::config::{Config, SecretOverrides, StoreChoice};

    const API_KEY: &str = "api-key-for-the-extractor-tests-0123456789";
    const ADMIN: &str = "admin-token-for-the-extractor-tests-0123456789";

    #[derive(Deserialize)]
    struct Q {
        #[allow(dead_code)]
        n: Option<u64>,
    }

    #[derive(Deserialize, Default)]
    struct B {
        x: u64,
    }

    impl BodyShape for B {
        const SHAPE: &'static str = "{\"x\": n}";

        fn empty() -> Option<B> {
            Some(B::default())
        }
    }

    async fn read(StreamPath(s): StreamPath, _: Query<Q>, caller: Caller) -> ApiResult<String> {
        caller.may_read(&s)?;
        Ok(match caller {
            Caller::ApiKey => "api".into(),
            Caller::Connect(c) => c.sub,
        })
    }

    async fn open(ConnectToken(c): ConnectToken<false>) -> String {
        c.sub
    }

    async fn optional(t: Option<ConnectToken>) -> String {
        t.map(|ConnectToken(c)| c.sub).unwrap_or_default()
    }

    async fn admin(_: Admin, JsonBody(b): JsonBody<B>) -> String {
        b.x.to_string()
    }

    async fn session(SessionPath(id): SessionPath) -> String {
        id.map(|i| i.as_str().to_string()).unwrap_or_default()
    }

    async fn setup() -> (Router, String, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut cfg = Config::for_tests(dir.path());
        cfg.store = StoreChoice::Memory;
        cfg.secrets = SecretOverrides {
            api_key: Some(API_KEY.into()),
            admin_token: Some(ADMIN.into()),
            jwt_secret: None,
            resume_keys: None,
        };
        let (app, _) = crate::server::build(cfg).await.expect("app");
        let jwt = app.auth.mint_connect(&ConnectClaims {
            sub: "alice".into(),
            iat: Some(zerodrop_core::now_ms() / 1000),
            exp: zerodrop_core::now_ms() / 1000 + 600,
            streams: vec!["ok.*".into()],
            publish: None,
            upstreams: vec![],
            info: None,
        });
        let router = Router::new()
            .route("/read/{stream}", get(read))
            .route("/open", post(open))
            .route("/optional", get(optional))
            .route("/admin", post(admin))
            .route("/session/{id}", get(session))
            .with_state(app);
        (router, jwt, dir)
    }

    /// The status, and the error code (or the body's text when the request passed).
    async fn call(
        router: Router,
        method: Method,
        uri: String,
        bearer: Option<String>,
        body: &'static str,
    ) -> (u16, String) {
        let mut req = axum::http::Request::builder().method(method).uri(uri);
        if let Some(b) = bearer {
            req = req.header(header::AUTHORIZATION, format!("Bearer {b}"));
        }
        let req = req.body(Body::from(body)).expect("request");
        let res = router.oneshot(req).await.expect("answer");
        let status = res.status().as_u16();
        let bytes = axum::body::to_bytes(res.into_body(), 1 << 20)
            .await
            .expect("body");
        let text = String::from_utf8_lossy(&bytes).to_string();
        match serde_json::from_str::<Value>(&text) {
            Ok(v) if v["error"]["code"].is_string() => (
                status,
                v["error"]["code"].as_str().unwrap_or("").to_string(),
            ),
            _ => (status, text),
        }
    }

    #[tokio::test]
    async fn refusals_are_typed_and_in_parameter_order() {
        let (r, jwt, _dir) = setup().await;
        let get_ = |uri: &str, b: Option<&str>| {
            call(r.clone(), Method::GET, uri.into(), b.map(String::from), "")
        };
        let ok = |s: &str| (200, s.to_string());
        let e = |status: u16, code: &str| (status, code.to_string());

        // The path first, then the query, then the credential.
        assert_eq!(
            get_("/read/bad%20id?n=x", None).await,
            e(400, "INVALID_STREAM_ID")
        );
        assert_eq!(
            get_("/read/ok.a?n=x", None).await,
            e(400, "INVALID_REQUEST")
        );
        assert_eq!(get_("/read/ok.a", None).await, e(401, "UNAUTHORIZED"));
        // The api key: in the header only, and refused in the URL even beside a good header.
        assert_eq!(get_("/read/ok.a", Some(API_KEY)).await, ok("api"));
        let url_key = format!("/read/ok.a?token={API_KEY}");
        assert_eq!(get_(&url_key, Some(API_KEY)).await, e(401, "UNAUTHORIZED"));
        // A connect token: in the header or the URL, for the streams it grants.
        assert_eq!(get_("/read/ok.a", Some(&jwt)).await, ok("alice"));
        assert_eq!(
            get_(&format!("/read/ok.a?token={jwt}"), None).await,
            ok("alice")
        );
        assert_eq!(get_("/read/other", Some(&jwt)).await, e(403, "FORBIDDEN"));
        assert_eq!(
            get_("/read/ok.a", Some("nonsense")).await,
            e(401, "UNAUTHORIZED")
        );

        // `ConnectToken<false>`: the header only.
        let post_ = |uri: &str, b: Option<&str>, body: &'static str| {
            call(
                r.clone(),
                Method::POST,
                uri.into(),
                b.map(String::from),
                body,
            )
        };
        assert_eq!(post_("/open", Some(&jwt), "").await, ok("alice"));
        let in_url = format!("/open?token={jwt}");
        assert_eq!(post_(&in_url, None, "").await, e(401, "UNAUTHORIZED"));
        assert_eq!(
            post_("/open", Some(API_KEY), "").await,
            e(401, "UNAUTHORIZED")
        );

        // `Option<ConnectToken>`: none is `None`, a bad one is still refused.
        assert_eq!(get_("/optional", None).await, ok(""));
        assert_eq!(
            get_(&format!("/optional?token={jwt}"), None).await,
            ok("alice")
        );
        assert_eq!(
            get_("/optional?token=nonsense", None).await,
            e(401, "UNAUTHORIZED")
        );
        assert_eq!(
            get_(&url_key.replace("/read/ok.a", "/optional"), None).await,
            e(401, "UNAUTHORIZED")
        );

        // The admin token before the body; an empty body is the shape's default.
        assert_eq!(post_("/admin", None, "{").await, e(401, "UNAUTHORIZED"));
        assert_eq!(
            post_("/admin", Some(API_KEY), "").await,
            e(401, "UNAUTHORIZED")
        );
        assert_eq!(post_("/admin", Some(ADMIN), "").await, ok("0"));
        assert_eq!(post_("/admin", Some(ADMIN), "{\"x\": 7}").await, ok("7"));
        assert_eq!(
            post_("/admin", Some(ADMIN), "{").await,
            e(400, "INVALID_REQUEST")
        );

        // A malformed session id is not a refusal: it names no session.
        assert_eq!(get_("/session/no.pe", None).await, ok(""));
        assert_eq!(get_("/session/s_1", None).await, ok("s_1"));
        assert_eq!(get_("/session/%FF", None).await, e(400, "INVALID_REQUEST"));
    }

    #[tokio::test]
    async fn a_body_that_is_not_its_shape_says_which_shape() {
        let (r, _, _dir) = setup().await;
        let req = axum::http::Request::builder()
            .method(Method::POST)
            .uri("/admin")
            .header(header::AUTHORIZATION, format!("Bearer {ADMIN}"))
            .body(Body::from("\"text\""))
            .expect("request");
        let res = r.oneshot(req).await.expect("answer");
        assert_eq!(res.status(), StatusCode::BAD_REQUEST);
        let bytes = axum::body::to_bytes(res.into_body(), 1 << 20)
            .await
            .expect("body");
        let v: Value = serde_json::from_slice(&bytes).expect("json");
        let message = v["error"]["message"].as_str().unwrap_or("");
        assert!(
            message.starts_with("the body must be JSON {\"x\": n}: "),
            "{v}"
        );
    }
}
