//! Request bodies read to their end before the answer goes out.
//!
//! An HTTP/1.1 connection can carry the next request only once the previous request's body
//! has been read off it. A refusal answered before the body was read (429 from the rate
//! limiter, 401, 404, 405, 414, 431, a drain's 503) would otherwise make hyper close the
//! connection without saying so, and the client's next request on it — often a publish, a
//! POST no client retries by itself — would fail with a transport error instead of getting
//! its answer. So around every request [`begin`] and [`Settling::finish`] read and discard
//! what the handler left of the body, at most
//! [`Config::max_body_bytes`](crate::config::Config::max_body_bytes) bytes within the header
//! timeout; when the rest cannot be read within those bounds, the answer says
//! `Connection: close` so the client knows not to reuse the connection. A body declared
//! larger than that limit is refused (413) before anything is read, also with
//! `Connection: close`.
//!
//! The same timeout bounds a body that stalls while a handler reads it: no byte for
//! `--http-header-timeout-sec` ends the read with an error (400) and the connection closes.

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use http_body::{Frame, SizeHint};
use tokio::time::Sleep;
use zerodrop_core::ErrorCode;

use crate::app::App;
use crate::error::ApiError;

/// What [`begin`] kept of a request with a body, for [`Settling::finish`] once its answer is
/// made: the body's unread rest and the bounds for reading it.
pub struct Settling {
    rest: Arc<Mutex<Rest>>,
    limit: usize,
    pause: Duration,
    expects_continue: bool,
}

/// What [`begin`] made of a request.
pub enum Begun {
    /// Its body is declared past the limit: this is the answer.
    Refused(Response),
    /// The request to answer (its body paced by the header timeout) and, when it has a body,
    /// what [`Settling::finish`] must do once it is answered.
    Go(Request, Option<Settling>),
}

/// The first half of settling a request, run outside every handler and every layer that may
/// refuse it.
pub fn begin(app: &App, req: Request) -> Begun {
    if req.body().is_end_stream() {
        return Begun::Go(req, None);
    }
    let limit = match req.uri().path() {
        // A batch publish has its own, larger limit (`--max-batch-bytes`).
        "/v1/events" => app.cfg.max_batch_bytes.max(app.cfg.max_body_bytes()),
        _ => app.cfg.max_body_bytes(),
    };
    let pause = Duration::from_secs(app.cfg.http_header_timeout_sec);
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(n) = declared.filter(|n| *n > limit as u64) {
        let mut res = ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!("the request body is {n} bytes; the limit is {limit}"),
        )
        .into_response();
        close(&mut res);
        return Begun::Refused(res);
    }
    // A client waiting for `100 Continue` is not sent one for a body nobody wants.
    let expects_continue = req.headers().contains_key(header::EXPECT);
    let (parts, body) = req.into_parts();
    let rest = Arc::new(Mutex::new(Rest {
        body,
        stalled: false,
    }));
    let paced = Paced {
        rest: rest.clone(),
        pause,
        timer: None,
    };
    let settling = Settling {
        rest,
        limit,
        pause,
        expects_continue,
    };
    Begun::Go(Request::from_parts(parts, Body::new(paced)), Some(settling))
}

impl Settling {
    /// The second half: reads and discards what the handler left of the body (within the
    /// limit and the timeout), or marks the answer `Connection: close` when it cannot.
    pub async fn finish(self, mut res: Response) -> Response {
        let left = {
            let mut r = lock(&self.rest);
            (!r.stalled).then(|| std::mem::take(&mut r.body))
        };
        let settled = match left {
            None => false,
            Some(b) if b.is_end_stream() => true,
            // Refused for its size (a body without a declared length): not read any further.
            Some(_) if res.status() == StatusCode::PAYLOAD_TOO_LARGE => false,
            Some(_) if self.expects_continue => false,
            Some(b) => discard(b, self.limit, self.pause).await,
        };
        if !settled {
            close(&mut res);
        }
        res
    }
}

fn close(res: &mut Response) {
    res.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
}

/// Reads the rest of a body: whether it ended within `limit` bytes and `within`.
async fn discard(body: Body, limit: usize, within: Duration) -> bool {
    let mut left = limit;
    let mut data = body.into_data_stream();
    let read = async {
        while let Some(chunk) = data.next().await {
            let Ok(chunk) = chunk else { return false };
            let Some(rest) = left.checked_sub(chunk.len()) else {
                return false;
            };
            left = rest;
        }
        true
    };
    tokio::time::timeout(within, read).await.unwrap_or(false)
}

/// What the handler has not read of the body; `stalled` once it stopped arriving.
struct Rest {
    body: Body,
    stalled: bool,
}

fn lock(rest: &Mutex<Rest>) -> MutexGuard<'_, Rest> {
    rest.lock().unwrap_or_else(|p| p.into_inner())
}

/// The body as handlers see it: shared with [`settle`], and an error after `pause` without a
/// byte.
struct Paced {
    rest: Arc<Mutex<Rest>>,
    pause: Duration,
    timer: Option<Pin<Box<Sleep>>>,
}

impl HttpBody for Paced {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = &mut *self;
        let polled = {
            let mut rest = lock(&this.rest);
            if rest.stalled {
                return Poll::Ready(Some(Err(stalled(this.pause))));
            }
            Pin::new(&mut rest.body).poll_frame(cx)
        };
        if polled.is_ready() {
            this.timer = None;
            return polled;
        }
        let pause = this.pause;
        let timer = this
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(pause)));
        if timer.as_mut().poll(cx).is_ready() {
            lock(&this.rest).stalled = true;
            return Poll::Ready(Some(Err(stalled(pause))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        lock(&self.rest).body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        lock(&self.rest).body.size_hint()
    }
}

fn stalled(pause: Duration) -> axum::Error {
    axum::Error::new(format!(
        "no byte of the request body for {} s",
        pause.as_secs()
    ))
}
