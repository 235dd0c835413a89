//! The Durable Streams protocol (v1) on the wire, under `/ds/v1/stream/{stream}`: `PUT`
//! creates, `POST` appends (and closes), `GET` reads (catch-up, `live=long-poll`,
//! `live=sse`), `HEAD` tells the tail, `DELETE` erases. The rules are the app's
//! (`app/ds/`); this room parses headers and queries, and writes statuses, the protocol's
//! headers and SSE.
//!
//! `read.rs` holds the reads (catch-up, long-poll, SSE); this file the handler, the writes,
//! `HEAD` and the headers' syntax.
//!
//! Must not: decide a stream rule (offsets, producers, expiry are `app/ds/`'s).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;

use super::extract::{RawBody, StreamPath};
use crate::app::App;
use crate::app::ds::{
    self, Append, Appended, Create, DsError, DsRefusal, Fork, Offset, ProducerClaim, Seen, Start,
};
use crate::config::DsAccess;
use crate::error::ApiError;

mod read;

const NEXT_OFFSET: &str = "stream-next-offset";
const UP_TO_DATE: &str = "stream-up-to-date";
const CURSOR: &str = "stream-cursor";
const CLOSED: &str = "stream-closed";
const TTL: &str = "stream-ttl";
const EXPIRES_AT: &str = "stream-expires-at";
const SEQ: &str = "stream-seq";
const PRODUCER_ID: &str = "producer-id";
const PRODUCER_EPOCH: &str = "producer-epoch";
const PRODUCER_SEQ: &str = "producer-seq";
const SSE_ENCODING: &str = "stream-sse-data-encoding";

/// How long a long-poll waits for data before answering 204.
pub const LONG_POLL: Duration = Duration::from_secs(10);
/// How long one SSE response lasts before the server ends it (the client reconnects from
/// the last control event's offset).
pub const SSE_SPAN: Duration = Duration::from_secs(60);
/// Cursor intervals: 20 s counted from 2024-10-09T00:00:00Z.
const CURSOR_EPOCH_SEC: u64 = 1_728_432_000;
const CURSOR_INTERVAL_SEC: u64 = 20;
/// The largest integer a producer header may carry (2^53 − 1).
const MAX_PRODUCER_INT: u64 = (1 << 53) - 1;

type AppState = Arc<App>;

/// Every `/ds/` response carries these (the protocol's browser security headers).
pub async fn security_headers(mut res: Response) -> Response {
    let h = res.headers_mut();
    h.insert(
        HeaderName::from_static("x-content-type-options"),
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        HeaderName::from_static("cross-origin-resource-policy"),
        HeaderValue::from_static("cross-origin"),
    );
    res
}

/// One handler for every method: the stream is the path's last segment.
pub async fn handle(
    State(app): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    StreamPath(stream): StreamPath,
    RawBody(body): RawBody,
) -> Response {
    let write = !matches!(method, Method::GET | Method::HEAD);
    let open = match app.cfg.ds_access {
        DsAccess::Open => true,
        DsAccess::PublicRead => !write,
        DsAccess::Key => false,
    };
    if !open && let Err(e) = app.auth.require_api_key(&headers) {
        return e.into_response();
    }
    let res = match method {
        Method::PUT => create(&app, &uri, &headers, &stream, &body).await,
        Method::POST => append(&app, &headers, &stream, &body).await,
        Method::GET => read::read(&app, &uri, &headers, &stream).await,
        Method::HEAD => head(&app, &stream).await,
        Method::DELETE => app
            .ds_delete(&stream)
            .await
            .map(|()| StatusCode::NO_CONTENT.into_response()),
        _ => Err(ApiError::new(
            zerodrop_core::ErrorCode::MethodNotAllowed,
            "a stream takes PUT, POST, GET, HEAD and DELETE",
        )
        .into()),
    };
    res.unwrap_or_else(|e| refusal(*e))
}

fn refusal(e: DsRefusal) -> Response {
    let status = e.status;
    let mut res = e.error.into_response();
    if let Some(s) = status.and_then(|s| StatusCode::from_u16(s).ok()) {
        *res.status_mut() = s;
    }
    let h = res.headers_mut();
    if let Some(t) = &e.tail {
        set(h, NEXT_OFFSET, &t.encode());
    }
    if e.closed {
        set(h, CLOSED, "true");
    }
    if let Some(epoch) = e.producer_epoch {
        set(h, PRODUCER_EPOCH, &epoch.to_string());
    }
    if let Some((expected, received)) = e.expected_seq {
        set(h, "producer-expected-seq", &expected.to_string());
        set(h, "producer-received-seq", &received.to_string());
    }
    res
}

fn set(h: &mut HeaderMap, name: &'static str, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        h.insert(HeaderName::from_static(name), v);
    }
}

fn text<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, DsError> {
    match headers.get(name) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .map(|s| Some(s.trim()))
            .map_err(|_| ApiError::invalid(format!("header {name} is not text")).into()),
    }
}

fn invalid(message: impl Into<String>) -> DsError {
    ApiError::invalid(message).into()
}

/// A decimal integer without sign, leading zeros, point or exponent.
fn strict_int(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) || (s.len() > 1 && s.starts_with('0'))
    {
        return None;
    }
    s.parse().ok()
}

fn is_true(headers: &HeaderMap, name: &str) -> Result<bool, DsError> {
    Ok(text(headers, name)?.is_some_and(|v| v.eq_ignore_ascii_case("true")))
}

async fn create(
    app: &App,
    uri: &Uri,
    headers: &HeaderMap,
    stream: &zerodrop_core::StreamId,
    body: &Bytes,
) -> Result<Response, DsError> {
    let fork = fork(headers)?;
    let content_type = text(headers, header::CONTENT_TYPE.as_str())?
        .filter(|c| !c.is_empty())
        .map(String::from);
    let ttl = text(headers, TTL)?;
    let expires = text(headers, EXPIRES_AT)?;
    if ttl.is_some() && expires.is_some() {
        return Err(invalid(
            "Stream-TTL and Stream-Expires-At exclude each other",
        ));
    }
    let ttl_sec = ttl
        .map(|t| {
            strict_int(t).ok_or_else(|| {
                invalid(format!("Stream-TTL {t:?} is not a whole number of seconds"))
            })
        })
        .transpose()?;
    let expires_at = expires
        .map(|e| {
            rfc3339_ms(e)
                .map(|ms| (e.to_string(), ms))
                .ok_or_else(|| invalid(format!("Stream-Expires-At {e:?} is not an RFC 3339 time")))
        })
        .transpose()?;
    let closed = is_true(headers, CLOSED)?;
    let (created, seen) = app
        .ds_create(
            stream,
            Create {
                content_type,
                fork,
                ttl_sec,
                expires_at,
                closed,
                body: ds::Body { bytes: body },
            },
        )
        .await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let mut res = status.into_response();
    let h = res.headers_mut();
    set(h, header::CONTENT_TYPE.as_str(), &seen.record.content_type);
    set(h, NEXT_OFFSET, &seen.tail().encode());
    if seen.closed() {
        set(h, CLOSED, "true");
    }
    if created {
        let host = text(headers, header::HOST.as_str())?.unwrap_or("localhost");
        set(
            h,
            header::LOCATION.as_str(),
            &format!("http://{host}{}", uri.path()),
        );
    }
    Ok(res)
}

/// `Stream-Forked-From` (the source's path, `/v1/stream/{stream}`, or its full URL),
/// `Stream-Fork-Offset` and `Stream-Fork-Sub-Offset`.
fn fork(headers: &HeaderMap) -> Result<Option<Fork>, DsError> {
    let from = text(headers, "stream-forked-from")?;
    let offset = text(headers, "stream-fork-offset")?;
    let sub = text(headers, "stream-fork-sub-offset")?;
    let Some(from) = from else {
        if offset.is_some() || sub.is_some() {
            return Err(invalid(
                "Stream-Fork-Offset and Stream-Fork-Sub-Offset need Stream-Forked-From",
            ));
        }
        return Ok(None);
    };
    let name = from
        .rsplit_once("/v1/stream/")
        .map_or(from, |(_, n)| n)
        .split(['?', '#'])
        .next()
        .unwrap_or("");
    let source = zerodrop_core::StreamId::new(name).map_err(|e| {
        DsError::from(ApiError::new(
            zerodrop_core::ErrorCode::InvalidStreamId,
            format!("Stream-Forked-From names no stream: {e}"),
        ))
    })?;
    let offset = offset.map(parse_start).transpose()?;
    let sub = match sub {
        None => 0,
        Some(v) => strict_int(v)
            .ok_or_else(|| invalid(format!("Stream-Fork-Sub-Offset {v:?} is not a count")))?,
    };
    Ok(Some(Fork {
        source,
        offset,
        sub,
    }))
}

/// An offset as a request gives it: `-1` and any all-zero position are the beginning,
/// `now` the tail, anything else an offset this server wrote.
fn parse_start(v: &str) -> Result<Start, DsError> {
    match v {
        "-1" => Ok(Start::Beginning),
        "now" => Ok(Start::Now),
        _ if v
            .split('_')
            .next()
            .is_some_and(|s| !s.is_empty() && s.bytes().all(|b| b == b'0')) =>
        {
            Ok(Start::Beginning)
        }
        _ => Offset::parse(v)
            .map(Start::At)
            .ok_or_else(|| invalid(format!("offset {v:?} is not an offset of this server"))),
    }
}

fn producer(headers: &HeaderMap) -> Result<Option<ProducerClaim>, DsError> {
    let id = text(headers, PRODUCER_ID)?;
    let epoch = text(headers, PRODUCER_EPOCH)?;
    let seq = text(headers, PRODUCER_SEQ)?;
    match (id, epoch, seq) {
        (None, None, None) => Ok(None),
        (Some(id), Some(epoch), Some(seq)) => {
            if id.is_empty() {
                return Err(invalid("Producer-Id is empty"));
            }
            let int = |name: &str, v: &str| {
                strict_int(v)
                    .filter(|n| *n <= MAX_PRODUCER_INT)
                    .ok_or_else(|| invalid(format!("{name} {v:?} is not an integer in 0..2^53")))
            };
            Ok(Some(ProducerClaim {
                id: id.to_string(),
                epoch: int("Producer-Epoch", epoch)?,
                seq: int("Producer-Seq", seq)?,
            }))
        }
        _ => Err(invalid(
            "Producer-Id, Producer-Epoch and Producer-Seq come together or not at all",
        )),
    }
}

async fn append(
    app: &App,
    headers: &HeaderMap,
    stream: &zerodrop_core::StreamId,
    body: &Bytes,
) -> Result<Response, DsError> {
    let producer = producer(headers)?;
    let req = Append {
        content_type: text(headers, header::CONTENT_TYPE.as_str())?
            .filter(|c| !c.is_empty())
            .map(String::from),
        stream_seq: text(headers, SEQ)?.map(String::from),
        close: is_true(headers, CLOSED)?,
        producer: producer.clone(),
        body: ds::Body { bytes: body },
    };
    let out = app.ds_append(stream, req).await?;
    let (status, tail, closed, state) = match out {
        Appended::Stored {
            tail,
            closed,
            producer: p,
        } => {
            // New data from a producer is 200; a close alone, or no producer, 204.
            let status = if p.is_some() && !body.is_empty() {
                StatusCode::OK
            } else {
                StatusCode::NO_CONTENT
            };
            (status, tail, closed, p)
        }
        Appended::Duplicate {
            tail,
            closed,
            producer: p,
        } => (StatusCode::NO_CONTENT, tail, closed, Some(p)),
    };
    let mut res = status.into_response();
    let h = res.headers_mut();
    set(h, NEXT_OFFSET, &tail.encode());
    if closed {
        set(h, CLOSED, "true");
    }
    if let Some(p) = state {
        set(h, PRODUCER_EPOCH, &p.epoch.to_string());
        set(h, PRODUCER_SEQ, &p.seq.to_string());
    }
    Ok(res)
}

async fn head(app: &App, stream: &zerodrop_core::StreamId) -> Result<Response, DsError> {
    let seen = app.ds_seen(stream, false).await?;
    let mut res = StatusCode::OK.into_response();
    let h = res.headers_mut();
    meta_headers(h, &seen);
    set(h, header::CACHE_CONTROL.as_str(), "no-store");
    Ok(res)
}

fn meta_headers(h: &mut HeaderMap, seen: &Seen) {
    set(h, header::CONTENT_TYPE.as_str(), &seen.record.content_type);
    set(h, NEXT_OFFSET, &seen.tail().encode());
    if let Some(t) = seen.record.ttl_sec {
        set(h, TTL, &t.to_string());
    }
    if let Some(e) = &seen.record.expires_at {
        set(h, EXPIRES_AT, e);
    }
    if seen.closed() {
        set(h, CLOSED, "true");
    }
}

/// Milliseconds since the Unix epoch of an RFC 3339 time (`2026-01-02T03:04:05.678Z`,
/// `…+02:00`).
fn rfc3339_ms(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        t.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| t.parse().ok())?
    };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut i = 19;
    let mut ms = 0i64;
    if b.get(i) == Some(&b'.') {
        let start = i + 1;
        i = start;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            return None;
        }
        let frac = &s[start..i.min(start + 3)];
        ms = frac.parse::<i64>().ok()? * 10i64.pow(3 - frac.len() as u32);
    }
    let offset_min = match b.get(i)? {
        b'Z' | b'z' if i + 1 == b.len() => 0,
        sign @ (b'+' | b'-') if i + 6 == b.len() && b[i + 3] == b':' => {
            let m = num(i + 1..i + 3)? * 60 + num(i + 4..i + 6)?;
            if *sign == b'+' { m } else { -m }
        }
        _ => return None,
    };
    // Days from the civil date (Howard Hinnant's algorithm).
    let yy = if mo <= 2 { y - 1 } else { y };
    let era = yy.div_euclid(400);
    let yoe = yy - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + mi * 60 + sec - offset_min * 60;
    u64::try_from(secs * 1000 + ms).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_times() {
        assert_eq!(rfc3339_ms("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            rfc3339_ms("2024-10-09T00:00:00.000Z"),
            Some(CURSOR_EPOCH_SEC * 1000)
        );
        assert_eq!(
            rfc3339_ms("2024-10-09T02:00:00.5+02:00"),
            Some(CURSOR_EPOCH_SEC * 1000 + 500)
        );
        for bad in [
            "",
            "2024-10-09",
            "2024-13-01T00:00:00Z",
            "not-a-timestampZZZZZ",
            "2024-10-09T00:00:00",
        ] {
            assert_eq!(rfc3339_ms(bad), None, "{bad}");
        }
    }

    #[test]
    fn strict_integers() {
        assert_eq!(strict_int("3600"), Some(3600));
        assert_eq!(strict_int("0"), Some(0));
        for bad in ["", "-1", "+1", "01", "1.0", "1e3", "abc"] {
            assert_eq!(strict_int(bad), None, "{bad}");
        }
    }
}
