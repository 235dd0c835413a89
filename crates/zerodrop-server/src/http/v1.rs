//! The `/v1` API's own handlers (SPEC §3): publish, read, a stream's digest, and the session
//! routes (open, checkpoint, reconnect). Each takes what it needs through the extractors
//! (`extract.rs`) and turns the app's answer into JSON.
//!
//! Must not: decide a protocol rule (where a stream starts, what a hole is, how a checkpoint
//! moves): those are the app's and the core's; a handler only encodes their answer.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Value, json};
use zerodrop_core::{Epoch, ErrorCode, Seq, StreamId};

use super::extract::{
    ApiKey, BodyShape, Caller, ConnectToken, IdempotencyKey, JsonBody, Query, RawBody, SessionPath,
    StreamPath, json,
};
use crate::app::authz::Action;
use crate::app::{
    AckWrite, App, Asker, Authority, OpenAt, Resumed, authority_ended, no_longer_granted,
};
use crate::auth::bearer;
use crate::error::{ApiError, ApiResult};
use crate::metrics::Transport;

/// Most events one read or one reconnect window returns.
pub const MAX_PAGE: usize = 1000;
const DEFAULT_PAGE: usize = 100;

fn not_this_session() -> ApiError {
    ApiError::new(
        ErrorCode::InvalidResumeToken,
        "the resume token is not for this session",
    )
}

/// `{"stream":…,"epoch":…,"headSeq":…,"firstSeq":…,"order":…,"events":[…]}` with each event's
/// stored JSON spliced in.
fn events_page(
    stream: &StreamId,
    info: &zerodrop_store::StreamInfo,
    order: &str,
    events: &[Arc<zerodrop_core::Event>],
) -> String {
    let (epoch, head) = (info.epoch.as_str(), info.head);
    let mut s =
        String::with_capacity(96 + events.iter().map(|e| e.json().len() + 1).sum::<usize>());
    s.push_str("{\"stream\":\"");
    s.push_str(stream.as_str());
    s.push_str("\",\"epoch\":\"");
    s.push_str(epoch);
    s.push_str("\",\"headSeq\":");
    s.push_str(&head.0.to_string());
    s.push_str(",\"firstSeq\":");
    s.push_str(&info.first_seq.0.to_string());
    s.push_str(",\"order\":\"");
    s.push_str(order);
    s.push_str("\",\"events\":[");
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

/// An answer whose body is JSON the handler already wrote.
pub(super) fn json_response(status: StatusCode, body: impl Into<axum::body::Body>) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.into(),
    )
        .into_response()
}

// ---------------------------------------------------------------------------------- streams

#[derive(Deserialize)]
struct PublishBody<'a> {
    #[serde(borrow)]
    data: &'a RawValue,
}

/// A publish body's `data` (`{"data": …}`), borrowed from the body: kept as the client's raw
/// JSON, never re-encoded. Public for the fuzz targets (`zerodrop-fuzzing`).
pub fn publish_data(body: &[u8]) -> ApiResult<&RawValue> {
    json::<PublishBody>(body, "{\"data\": …}").map(|p| p.data)
}

pub(super) async fn publish(
    State(app): State<Arc<App>>,
    _: ApiKey,
    StreamPath(stream): StreamPath,
    IdempotencyKey(key): IdempotencyKey,
    RawBody(body): RawBody,
) -> ApiResult<Response> {
    let data = publish_data(&body)?;
    let out = app
        .publish(stream, data, key, crate::app::Publisher::ApiKey)
        .await?;
    let body = Published {
        duplicate: out.duplicate,
        epoch: &out.epoch,
        seq: out.seq,
        stream: &out.stream,
    };
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// A publish's answer, its fields in the order `json!` wrote them (sorted by name), without
/// building a map of values first.
#[derive(Serialize)]
struct Published<'a> {
    duplicate: bool,
    epoch: &'a Epoch,
    seq: Seq,
    stream: &'a StreamId,
}

pub(super) async fn stream_info(
    State(app): State<Arc<App>>,
    StreamPath(stream): StreamPath,
    caller: Caller<false>,
) -> ApiResult<Json<Value>> {
    // Like a read: the api key, or a connect token that grants the stream (the SDKs' check).
    caller.may_read(&stream)?;
    let (info, hash) = app.digest(&stream).await?;
    let policy = crate::app::policy::policy_json(&app.policy(&stream));
    Ok(Json(json!({
        "stream": info.stream, "epoch": info.epoch, "headSeq": info.head,
        "firstSeq": info.first_seq, "count": info.count, "bytes": info.bytes, "hash": hash,
        "closed": info.closed, "policy": policy,
    })))
}

/// A read's query. `token` is read (and checked) by the [`Caller`] extractor.
#[derive(Deserialize)]
pub struct ReadQuery {
    after: Option<u64>,
    before: Option<u64>,
    last: Option<usize>,
    since_ts: Option<u64>,
    limit: Option<usize>,
    epoch: Option<String>,
}

/// Where a read starts: one of `after` (the default, from 0), `before`, `last`, `since_ts`.
enum ReadFrom {
    After(Seq),
    Before(Seq),
    Last(usize),
    SinceTs(u64),
}

impl ReadQuery {
    fn from(&self) -> ApiResult<ReadFrom> {
        let given = [
            self.after.map(|_| "after"),
            self.before.map(|_| "before"),
            self.last.map(|_| "last"),
            self.since_ts.map(|_| "since_ts"),
        ];
        let named: Vec<&str> = given.into_iter().flatten().collect();
        if named.len() > 1 {
            return Err(ApiError::invalid(format!(
                "give at most one of after, before, last and since_ts (got {})",
                named.join(" and ")
            )));
        }
        if self.last.is_some() && self.limit.is_some() {
            return Err(ApiError::invalid(
                "last is the page size itself: give last or limit, not both",
            ));
        }
        Ok(match (self.before, self.last, self.since_ts) {
            (Some(n), _, _) => ReadFrom::Before(Seq(n)),
            (_, Some(m), _) => ReadFrom::Last(m),
            (_, _, Some(t)) => ReadFrom::SinceTs(t),
            _ => ReadFrom::After(Seq(self.after.unwrap_or(0))),
        })
    }
}

/// A read is allowed with the api key (in the `Authorization` header only), or with a connect
/// token (in the header or `?token=`) that grants the stream.
pub(super) async fn read_events(
    State(app): State<Arc<App>>,
    StreamPath(stream): StreamPath,
    Query(q): Query<ReadQuery>,
    caller: Caller,
) -> ApiResult<Response> {
    caller.may_read(&stream)?;
    let from = q.from()?;
    let limit = q.limit.unwrap_or(DEFAULT_PAGE).clamp(1, MAX_PAGE);
    let client_epoch = match q.epoch.as_deref() {
        Some(e) => {
            Some(zerodrop_core::Epoch::parse(e).ok_or_else(|| ApiError::invalid("invalid epoch"))?)
        }
        None => None,
    };
    let epoch = client_epoch.as_ref();
    let (res, order) = match from {
        ReadFrom::After(after) => (app.read_from(&stream, after, epoch, limit).await?, "asc"),
        ReadFrom::Before(before) => (
            app.read_before(&stream, before, epoch, limit).await?,
            "desc",
        ),
        ReadFrom::Last(m) => (
            app.read_last(&stream, epoch, m.clamp(1, MAX_PAGE)).await?,
            "desc",
        ),
        ReadFrom::SinceTs(t) => (app.read_since(&stream, t, epoch, limit).await?, "asc"),
    };
    let body = events_page(&stream, &res.info, order, &res.events);
    Ok(json_response(StatusCode::OK, body))
}

/// `GET /v1/streams/{stream}/presence`'s query: `cursor` is a page's `nextCursor`; `limit`
/// at most 1,000 (the default). A `token` is read (and checked) by the [`Caller`] extractor.
#[derive(Deserialize)]
pub(super) struct PresenceQuery {
    cursor: Option<String>,
    limit: Option<usize>,
}

/// The stream's members, a page at a time, with the presence log's head in the same snapshot.
pub(super) async fn presence(
    State(app): State<Arc<App>>,
    StreamPath(stream): StreamPath,
    Query(q): Query<PresenceQuery>,
    caller: Caller,
) -> ApiResult<Response> {
    caller.may_read(&stream)?;
    let limit = q
        .limit
        .unwrap_or(zerodrop_store::presence::PAGE_MAX)
        .clamp(1, zerodrop_store::presence::PAGE_MAX);
    let page = app
        .presence_page(&stream, q.cursor.as_deref(), limit)
        .await?;
    let body = PresenceAnswer {
        stream: stream.as_str(),
        epoch: page.epoch.as_str(),
        presence_seq: page.seq,
        occupancy: page.occupancy,
        members: page
            .members
            .iter()
            .map(|m| MemberAnswer {
                sub: &m.sub,
                session_id: m.session_id.as_str(),
                info: &m.info,
                since: m.since,
            })
            .collect(),
        next_cursor: page.next.as_deref(),
    };
    // Written straight from the page: a thousand members are not built as JSON values first.
    let body = serde_json::to_string(&body)
        .map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))?;
    Ok(json_response(StatusCode::OK, body))
}

/// `GET /v1/streams/{stream}/presence`'s answer.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PresenceAnswer<'a> {
    stream: &'a str,
    epoch: &'a str,
    presence_seq: u64,
    occupancy: u64,
    members: Vec<MemberAnswer<'a>>,
    next_cursor: Option<&'a str>,
}

/// One member as the snapshot shows it (`info` is `null` when the token had none).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct MemberAnswer<'a> {
    sub: &'a str,
    session_id: &'a str,
    info: &'a Option<Value>,
    since: u64,
}

// --------------------------------------------------------------------------------- sessions

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct OpenBody {
    #[serde(default)]
    streams: Vec<String>,
    /// Per stream, the position the client already holds: `N`, or `{"seq": N, "epoch": E}`.
    #[serde(default)]
    after: BTreeMap<String, Position>,
}

impl BodyShape for OpenBody {
    const SHAPE: &'static str = "{\"streams\": […], \"after\"?: {stream: seq}}";

    fn empty() -> Option<OpenBody> {
        Some(OpenBody::default())
    }
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

pub(super) async fn open_session(
    State(app): State<Arc<App>>,
    ConnectToken(claims): ConnectToken<false>,
    JsonBody(b): JsonBody<OpenBody>,
) -> ApiResult<Response> {
    let at = open_at(b)?;
    let grants = claims.grants();
    app.authorize(&claims.sub, &grants, Action::Connect, None)
        .await?;
    for a in at
        .iter()
        .filter(|a| grants.may_subscribe(a.stream.as_str()))
    {
        app.authorize(&claims.sub, &grants, Action::Subscribe, Some(&a.stream))
            .await?;
    }
    let (rec, heads) = app.open_session(&claims.sub, grants, &at).await?;
    let authority = Authority {
        exp: Some(claims.exp),
        born_ms: rec.created_at_ms,
    };
    let token = app
        .mint_token(&rec.id, &rec.sub, authority)
        .ok_or_else(|| authority_ended(ErrorCode::TokenExpired))?;
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
pub(super) struct CheckpointBody {
    stream: String,
    seq: u64,
}

impl BodyShape for CheckpointBody {
    const SHAPE: &'static str = "{\"stream\": …, \"seq\": n}";
}

/// The body is taken as a `Result`: a session that cannot be checked is refused before a bad
/// body is.
pub(super) async fn checkpoint(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    SessionPath(sid): SessionPath,
    body: Result<JsonBody<CheckpointBody>, ApiError>,
) -> ApiResult<Json<Value>> {
    let token = bearer(&headers).ok_or_else(|| {
        ApiError::unauthorized("the resume token is required (Authorization: Bearer <resumeToken>)")
    })?;
    let sid = sid.ok_or_else(not_this_session)?;
    let session = app.session_for(token, Some(&sid), None).await?.session;
    let JsonBody(b) = body?;
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
pub(super) struct ReconnectBody {
    resume_token: String,
    #[serde(default)]
    last_ack_sequence: BTreeMap<String, u64>,
    /// A fresh connect token, for a session whose token expired (SPEC §9).
    #[serde(default)]
    token: Option<String>,
}

impl BodyShape for ReconnectBody {
    const SHAPE: &'static str =
        "{\"resumeToken\": …, \"lastAckSequence\": {stream: n}, \"token\"?: connect token}";
}

pub(super) async fn reconnect(
    State(app): State<Arc<App>>,
    SessionPath(sid): SessionPath,
    JsonBody(b): JsonBody<ReconnectBody>,
) -> ApiResult<Response> {
    let Some(sid) = sid else {
        let e = not_this_session();
        app.metrics.resume_failed(Transport::Http, e.code);
        return Err(e);
    };
    let fresh = match b.token.as_deref() {
        Some(t) => match app.fresh_token(t).await {
            Ok(c) => Some(c),
            Err(e) => {
                app.metrics.resume_failed(Transport::Http, e.code);
                return Err(e);
            }
        },
        None => None,
    };
    let Resumed {
        session,
        authority,
        ended,
    } = app
        .resume(&b.resume_token, Some(&sid), fresh.as_ref(), Transport::Http)
        .await?;
    app.authorize(&session.sub, &session.grants, Action::Connect, None)
        .await?;
    let mut replay = String::from("{");
    let mut replayed = 0u64;
    for (i, stream) in ended.iter().enumerate() {
        if i > 0 {
            replay.push(',');
        }
        let e = no_longer_granted(stream);
        app.metrics.error(e.code);
        replay.push_str(&Value::from(stream.as_str()).to_string());
        replay.push(':');
        replay.push_str(&e.envelope().to_string());
    }
    for (i, stream) in session.streams.keys().enumerate() {
        if i > 0 || !ended.is_empty() {
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
    let token = app
        .mint_token(&session.id, &session.sub, authority)
        .unwrap_or_default();
    let body = format!(
        "{{\"sessionId\":{},\"resumeToken\":{},\"replay\":{replay}}}",
        Value::from(session.id.as_str()),
        Value::from(token)
    );
    Ok(json_response(StatusCode::OK, body))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct RefreshBody {
    resume_token: String,
    token: String,
}

impl BodyShape for RefreshBody {
    const SHAPE: &'static str = "{\"resumeToken\": …, \"token\": connect token}";
}

/// `POST /v1/sessions/{id}/refresh`: the session holds its authority from a fresh connect
/// token (same subject; its grants may be narrower, and the streams they no longer grant leave
/// the session). Answers a resume token carrying the new `exp`; it works even after the old
/// token's `exp` plus the grace, as a resume with both tokens does. Connections open now keep
/// their own deadline: a WebSocket refreshes with its `refresh` frame, SSE reopens.
pub(super) async fn refresh(
    State(app): State<Arc<App>>,
    SessionPath(sid): SessionPath,
    JsonBody(b): JsonBody<RefreshBody>,
) -> ApiResult<Json<Value>> {
    let sid = sid.ok_or_else(not_this_session)?;
    let fresh = match app.fresh_token(&b.token).await {
        Ok(c) => c,
        Err(e) => {
            app.metrics.token_refresh(false);
            return Err(e);
        }
    };
    let resumed = match app
        .session_for(&b.resume_token, Some(&sid), Some(&fresh))
        .await
    {
        Ok(r) => r,
        Err(e) => {
            app.metrics.token_refresh(false);
            return Err(e);
        }
    };
    app.metrics.token_refresh(true);
    let token = app
        .mint_token(&resumed.session.id, &resumed.session.sub, resumed.authority)
        .unwrap_or_default();
    let ended: Vec<&str> = resumed.ended.iter().map(StreamId::as_str).collect();
    Ok(Json(json!({
        "sessionId": resumed.session.id,
        "resumeToken": token,
        "exp": fresh.exp,
        "ended": ended,
    })))
}

/// One stream's replay window as JSON, and how many events it carries.
async fn window_json(
    app: &App,
    session: &zerodrop_store::SessionRecord,
    stream: &StreamId,
    client_ack: Option<Seq>,
) -> ApiResult<(String, u64)> {
    let start = app
        .stream_start(Asker::Request(session), stream, client_ack, AckWrite::Wait)
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
