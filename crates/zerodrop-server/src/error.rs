//! Typed errors as they leave the server: `{"error":{"code","message",…}}`.
//!
//! Every HTTP error response and every WebSocket `error` frame is built from an [`ApiError`],
//! so the code, the status, the close code and the `Retry-After` hint always agree.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};
use zerodrop_core::frames::{ErrorFrame, ServerFrame};
use zerodrop_core::window::WindowError;
use zerodrop_core::{ErrorCode, Seq};
use zerodrop_store::{StoreError, StoreFault};

#[derive(Debug, Clone)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    /// Extra facts inside the `error` object (`stream`, `firstAvailableSeq`, …).
    pub extra: Map<String, Value>,
    pub retry_after_sec: Option<u64>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        let retry_after_sec = code.is_retryable().then_some(1);
        ApiError {
            code,
            message: message.into(),
            extra: Map::new(),
            retry_after_sec,
        }
    }

    pub fn with(mut self, key: &str, value: impl Into<Value>) -> ApiError {
        self.extra.insert(key.to_string(), value.into());
        self
    }

    pub fn retry_after(mut self, secs: u64) -> ApiError {
        self.retry_after_sec = Some(secs);
        self
    }

    pub fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::InvalidRequest, message)
    }

    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::Unauthorized, message)
    }

    pub fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::Forbidden, message)
    }

    /// The `error` object's fields.
    pub fn body(&self) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("code".into(), Value::from(self.code.as_str()));
        m.insert("message".into(), Value::from(self.message.clone()));
        for (k, v) in &self.extra {
            m.insert(k.clone(), v.clone());
        }
        m
    }

    /// `{"error":{…}}`, as HTTP bodies and the stream-level errors of a reconnect carry it.
    pub fn envelope(&self) -> Value {
        json!({ "error": Value::Object(self.body()) })
    }

    /// The WebSocket `error` frame.
    pub fn frame(&self) -> String {
        let frame = self.extra.iter().fold(
            ErrorFrame::new(self.code.as_str(), self.message.clone()),
            |f, (k, v)| f.with_fact(k, v.clone()),
        );
        ServerFrame::Error(frame).to_json()
    }

    pub fn window(e: WindowError, stream: &str) -> ApiError {
        match e {
            WindowError::EpochChanged { current } => ApiError::new(
                ErrorCode::EpochChanged,
                "the stream's log was recreated; resync",
            )
            .with("stream", stream)
            .with("epoch", current.as_str()),
            WindowError::Trimmed {
                first_available, ..
            } => ApiError::new(
                ErrorCode::ReplayWindowTrimmed,
                "events after your position were trimmed; resync from a snapshot, then read on \
                 from firstAvailableSeq",
            )
            .with("stream", stream)
            .with("firstAvailableSeq", first_available.0),
            WindowError::BeyondHead { after, head } => ApiError::new(
                ErrorCode::AckBeyondHead,
                format!("position {after} is beyond the stream head {head}"),
            )
            .with("stream", stream)
            .with("headSeq", head.0),
        }
    }

    pub fn beyond_head(requested: Seq, head: Seq, stream: &str) -> ApiError {
        ApiError::new(
            ErrorCode::AckBeyondHead,
            format!("ack {requested} is beyond the stream head {head}"),
        )
        .with("stream", stream)
        .with("headSeq", head.0)
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        match e {
            StoreError::Unavailable(m) => {
                tracing::debug!(error = %m, "store unavailable");
                ApiError::new(
                    ErrorCode::StoreUnavailable,
                    "the store is unavailable and nothing was acknowledged; retry with backoff (with the same Idempotency-Key, a retry never appends twice)",
                )
            }
            // The store has logged it (with the file, at most once per kind every 10 s).
            StoreError::Fault { fault, detail } => {
                tracing::debug!(error = %detail, "store failed");
                let (message, retry) = match fault {
                    StoreFault::DiskFull => (
                        "the store's disk is full and nothing was acknowledged; stored events are intact and readable; retry once space is freed (with the same Idempotency-Key, a retry never appends twice)",
                        5,
                    ),
                    StoreFault::Corrupt => (
                        "the store's data file is damaged and nothing was acknowledged; this instance serves no stored data until it is restarted; retry, on another instance if there is one",
                        30,
                    ),
                    StoreFault::Io => (
                        "the store's disk failed a read or write and nothing was acknowledged; retry with backoff (with the same Idempotency-Key, a retry never appends twice)",
                        1,
                    ),
                };
                ApiError::new(ErrorCode::StoreUnavailable, message)
                    .with("reason", fault.as_str())
                    .retry_after(retry)
            }
            StoreError::IdempotencyKeyReused => ApiError::new(
                ErrorCode::IdempotencyKeyReused,
                "this Idempotency-Key was used with a different body; use a new key",
            ),
            StoreError::IdempotencyInProgress => ApiError::new(
                ErrorCode::IdempotencyInProgress,
                "the first request with this Idempotency-Key is still running; retry later",
            ),
            StoreError::AckBeyondHead { requested, head } => ApiError::new(
                ErrorCode::AckBeyondHead,
                format!("ack {requested} is beyond the stream head {head}"),
            )
            .with("headSeq", head.0),
            StoreError::StreamClosed { last_seq } => ApiError::new(
                ErrorCode::StreamClosed,
                format!("the stream was closed at seq {last_seq} and takes no more events"),
            )
            .with("lastSeq", last_seq.0),
            StoreError::SessionNotFound => ApiError::new(
                ErrorCode::SessionNotFound,
                "no such session (the store may have restarted empty); start a new session",
            ),
            StoreError::NotInSession => {
                ApiError::forbidden("the stream is not part of this session")
            }
            StoreError::EpochChanged { current } => ApiError::new(
                ErrorCode::EpochChanged,
                "the stream's log was recreated; resync",
            )
            .with("epoch", current.as_str()),
            StoreError::QueueFull { class, cap } => ApiError::new(
                ErrorCode::QueueFull,
                format!(
                    "the {} job queue holds its cap of {cap} queued jobs and nothing was enqueued; retry later",
                    class.as_str()
                ),
            )
            .with("class", class.as_str())
            .retry_after(5),
            StoreError::StaleLease { job, attempt } => ApiError::new(
                ErrorCode::Internal,
                format!("job {job}: the lease of attempt {attempt} is no longer held"),
            ),
            // `RATE_LIMITED` rather than a code of its own: every client already backs off on
            // it (the SDKs retry it), and `limit` says which limit it was.
            StoreError::TooManySessions {
                cap,
                retry_after_ms,
            } => {
                let secs = retry_after_ms.div_ceil(1000).max(1);
                ApiError::new(
                    ErrorCode::RateLimited,
                    format!(
                        "this subject already holds {cap} live sessions (--max-sessions-per-subject); \
                         resume one of them with its resume token, or retry once one has ended"
                    ),
                )
                .with("limit", "sessions_per_subject")
                .with("cap", cap)
                .with("retryAfterMs", secs * 1000)
                .retry_after(secs)
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.code.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut res = (status, axum::Json(self.envelope())).into_response();
        if let Some(s) = self.retry_after_sec
            && let Ok(v) = HeaderValue::from_str(&s.to_string())
        {
            res.headers_mut().insert(header::RETRY_AFTER, v);
        }
        // Lets the metrics layer count the code without parsing the body.
        res.extensions_mut().insert(self.code);
        res
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
