//! Reads on the wire: the query (`offset` once, `live`, `cursor`), catch-up pages, long-polls
//! and SSE (`data` and `control` events), the protocol's cursor.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use zerodrop_core::Seq;

use super::{
    CLOSED, CURSOR, CURSOR_EPOCH_SEC, CURSOR_INTERVAL_SEC, LONG_POLL, NEXT_OFFSET, SSE_ENCODING,
    SSE_SPAN, UP_TO_DATE, invalid, parse_start, set, text,
};
use crate::app::App;
use crate::app::ds::{self, DsError, Offset, Seen, Start};
use crate::error::ApiError;

/// The read's query: `offset` (once), `live`, `cursor`; anything else is ignored.
struct ReadQuery {
    start: Option<Start>,
    live: Option<String>,
    cursor: Option<u64>,
}

fn read_query(uri: &Uri) -> Result<ReadQuery, DsError> {
    let mut q = ReadQuery {
        start: None,
        live: None,
        cursor: None,
    };
    let mut offsets = 0;
    for pair in uri
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "offset" => {
                offsets += 1;
                q.start = Some(parse_start(v)?);
            }
            "live" => q.live = Some(v.to_string()),
            "cursor" => q.cursor = v.parse().ok(),
            _ => {}
        }
    }
    if offsets > 1 {
        return Err(invalid("offset given more than once"));
    }
    Ok(q)
}

/// The protocol's cursor: the current 20-second interval, always past the client's.
fn cursor(app: &App, client: Option<u64>) -> u64 {
    let now = app.clock().now_ms() / 1000;
    let interval = now.saturating_sub(CURSOR_EPOCH_SEC) / CURSOR_INTERVAL_SEC;
    match client {
        Some(c) if c >= interval => {
            let [j] = zerodrop_core::random_bytes::<1>();
            c + 1 + u64::from(j) % 180
        }
        _ => interval,
    }
}

pub(super) async fn read(
    app: &Arc<App>,
    uri: &Uri,
    headers: &HeaderMap,
    stream: &zerodrop_core::StreamId,
) -> Result<Response, DsError> {
    let q = read_query(uri)?;
    let live = match q.live.as_deref() {
        None | Some("false") => None,
        Some("long-poll") => Some(false),
        Some("sse") => Some(true),
        Some(other) => return Err(invalid(format!("live={other:?} is not a read mode"))),
    };
    if live.is_some() && q.start.is_none() {
        return Err(invalid("a live read needs an offset"));
    }
    if live.is_some() && app.ds_draining() {
        let e = ApiError::new(
            zerodrop_core::ErrorCode::Draining,
            "this instance is draining; read on from another",
        );
        return Err(e.retry_after(app.drain.retry_after_sec()).into());
    }
    let start = q.start.unwrap_or(Start::Beginning);
    let seen = app.ds_seen(stream, true).await?;
    let after = app.ds_position(&seen, &start)?;
    if live == Some(true) {
        return Ok(sse(app.clone(), stream.clone(), seen, after, q.cursor));
    }
    let now = start == Start::Now;
    let (info, events) = if now && live.is_none() {
        (seen.info.clone(), Vec::new())
    } else {
        app.ds_read(stream, after).await?
    };
    let closed_record = seen.record.closed;
    let (info, events) =
        if live == Some(false) && events.is_empty() && !(info.closed || closed_record) {
            wait(app, stream, &info, after).await?
        } else {
            (info, events)
        };
    let closed = info.closed || closed_record;
    let last = events.last().map_or(after, |e| e.seq());
    let tail = Offset {
        seq: last,
        epoch: info.epoch.clone(),
    };
    let up_to_date = last >= info.head;
    let mut res = if live == Some(false) && events.is_empty() {
        StatusCode::NO_CONTENT.into_response()
    } else {
        let body = ds::render(&seen.record, &events);
        let etag = format!(
            "\"{}:{}:{}{}\"",
            info.epoch.as_str(),
            after.0,
            last.0,
            if closed && up_to_date { ":c" } else { "" }
        );
        if !now
            && live.is_none()
            && text(headers, header::IF_NONE_MATCH.as_str())? == Some(etag.as_str())
        {
            let mut r = StatusCode::NOT_MODIFIED.into_response();
            set(r.headers_mut(), header::ETAG.as_str(), &etag);
            set(r.headers_mut(), NEXT_OFFSET, &tail.encode());
            return Ok(r);
        }
        let mut r = (StatusCode::OK, body).into_response();
        if !now {
            set(r.headers_mut(), header::ETAG.as_str(), &etag);
        }
        r
    };
    let h = res.headers_mut();
    set(h, header::CONTENT_TYPE.as_str(), &seen.record.content_type);
    set(h, NEXT_OFFSET, &tail.encode());
    if up_to_date {
        set(h, UP_TO_DATE, "true");
        if closed {
            set(h, CLOSED, "true");
        }
    }
    if live.is_some() || now {
        set(h, header::CACHE_CONTROL.as_str(), "no-store");
    }
    if live.is_some() {
        set(h, CURSOR, &cursor(app, q.cursor).to_string());
    }
    Ok(res)
}

/// A long-poll with nothing to read yet: listens, then reads until data, a close or the
/// timeout.
async fn wait(
    app: &Arc<App>,
    stream: &zerodrop_core::StreamId,
    seen: &zerodrop_store::StreamInfo,
    after: Seq,
) -> Result<(zerodrop_store::StreamInfo, Vec<Arc<zerodrop_core::Event>>), DsError> {
    let listener = app.ds_listen(stream, &seen.epoch, after);
    let signal = &listener.signal;
    let deadline = Instant::now() + LONG_POLL;
    loop {
        let (info, events) = app.ds_read(stream, after).await?;
        if !events.is_empty() || info.closed || info.epoch != seen.epoch || app.ds_draining() {
            return Ok((info, events));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || tokio::time::timeout(left, signal.woken()).await.is_err() {
            return Ok((info, events));
        }
        signal.take();
    }
}

/// `live=sse`: `event: data` blocks, each followed by an `event: control` with the next
/// offset and a cursor; ends at a closed stream's last event, after [`SSE_SPAN`], or when
/// the instance drains (the client reconnects from its last offset, elsewhere).
fn sse(
    app: Arc<App>,
    stream: zerodrop_core::StreamId,
    seen: Seen,
    after: Seq,
    client_cursor: Option<u64>,
) -> Response {
    let json = seen.record.is_json();
    let binary = !json && !seen.record.is_text();
    let epoch = seen.info.epoch.clone();
    let body = async_stream(move |tx| async move {
        let listener = app.ds_listen(&stream, &epoch, after);
        let signal = &listener.signal;
        let deadline = Instant::now() + SSE_SPAN;
        let mut cursor_at = after;
        let mut client = client_cursor;
        let mut first = true;
        loop {
            let (info, events) = match app.ds_read(&stream, cursor_at).await {
                Ok(r) => r,
                Err(_) => return,
            };
            if info.epoch != epoch {
                return;
            }
            let mut block = String::new();
            if let Some(last) = events.last() {
                let data = ds::render(&seen.record, &events);
                block.push_str("event: data\n");
                if binary {
                    block.push_str("data:");
                    block.push_str(&STANDARD.encode(&data));
                    block.push('\n');
                } else {
                    for line in split_lines(&String::from_utf8_lossy(&data)) {
                        // A reader strips one space after the colon: a line that starts
                        // with one gets another in front.
                        block.push_str(if line.starts_with(' ') {
                            "data: "
                        } else {
                            "data:"
                        });
                        block.push_str(line);
                        block.push('\n');
                    }
                }
                block.push('\n');
                cursor_at = last.seq();
            }
            let up_to_date = cursor_at >= info.head;
            let closed = (info.closed || seen.record.closed) && up_to_date;
            if !events.is_empty() || first || closed {
                let next = Offset {
                    seq: cursor_at,
                    epoch: info.epoch.clone(),
                };
                let mut control = serde_json::Map::new();
                control.insert("streamNextOffset".into(), next.encode().into());
                if closed {
                    control.insert("streamClosed".into(), true.into());
                } else {
                    let c = cursor(&app, client);
                    client = Some(c);
                    control.insert("streamCursor".into(), c.to_string().into());
                }
                if up_to_date {
                    control.insert("upToDate".into(), true.into());
                }
                block.push_str("event: control\ndata:");
                block.push_str(&serde_json::Value::Object(control).to_string());
                block.push_str("\n\n");
                first = false;
            }
            if !block.is_empty() && tx.send(Bytes::from(block)).await.is_err() {
                return;
            }
            if closed {
                return;
            }
            if !up_to_date {
                continue;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || app.ds_draining() {
                return;
            }
            let _ = tokio::time::timeout(left, signal.woken()).await;
            signal.take();
            if app.ds_draining() {
                return;
            }
        }
    });
    let mut res = Response::new(body);
    let h = res.headers_mut();
    set(h, header::CONTENT_TYPE.as_str(), "text/event-stream");
    set(h, header::CACHE_CONTROL.as_str(), "no-cache");
    if binary {
        set(h, SSE_ENCODING, "base64");
    }
    res
}

/// Text split at every line break (`\r\n`, `\r` or `\n`), so a payload can never end an SSE
/// event or start a field of its own.
fn split_lines(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = s;
    loop {
        match rest.find(['\r', '\n']) {
            None => {
                out.push(rest);
                return out;
            }
            Some(i) => {
                out.push(&rest[..i]);
                let skip = if rest[i..].starts_with("\r\n") { 2 } else { 1 };
                rest = &rest[i + skip..];
            }
        }
    }
}

/// A body fed by a task through a small channel; the task ends when the client goes.
fn async_stream<F, Fut>(f: F) -> Body
where
    F: FnOnce(tokio::sync::mpsc::Sender<Bytes>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(8);
    tokio::spawn(f(tx));
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, std::convert::Infallible>(b), rx))
    });
    Body::from_stream(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_split_at_every_break() {
        assert_eq!(split_lines("a\r\nb\rc\nd"), vec!["a", "b", "c", "d"]);
        assert_eq!(split_lines("x"), vec!["x"]);
    }
}
