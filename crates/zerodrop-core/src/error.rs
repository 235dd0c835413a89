//! The error codes of the wire contract, with their HTTP status and WebSocket close code.
//!
//! This is the one place where a code is tied to a status: every transport asks the code.

use serde::{Serialize, Serializer};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ErrorCode {
    InvalidResumeToken,
    ReconnectWindowExpired,
    SessionNotFound,
    ReplayWindowTrimmed,
    EpochChanged,
    StoreUnavailable,
    Draining,
    Unauthorized,
    Forbidden,
    InvalidRequest,
    InvalidStreamId,
    PayloadTooLarge,
    AckBeyondHead,
    IdempotencyKeyReused,
    IdempotencyInProgress,
    RateLimited,
    OverCapacity,
    NotFound,
    MethodNotAllowed,
    /// A newer connection resumed this session; the older socket is closed with 4409.
    SessionTakenOver,
    /// The client missed two pings in a row; the socket is closed with 4408.
    PingTimeout,
    /// The connect token behind a live connection expired and no fresh one came in time.
    TokenExpired,
    /// An operator revoked the subject or the session (`POST /admin/revoke`): 401 over HTTP,
    /// close 4403 on a socket.
    Revoked,
    /// The authorization hook failed or did not answer in time: refused (fail closed).
    AuthzUnavailable,
    /// Every target of an upstream is refused by its open circuit; `Retry-After` says when
    /// a trial call is next allowed.
    UpstreamUnavailable,
    /// The upstream answered with an error (5xx) or could not be reached.
    UpstreamFailed,
    /// The upstream did not answer within its timeout.
    UpstreamTimeout,
    /// A job queue class is at its queued cap; nothing was enqueued.
    QueueFull,
    /// The stream was closed (`POST /v1/streams/{stream}/close`): it takes no more events.
    StreamClosed,
    /// The request contradicts a Durable Streams stream's state (`/ds/`): its configuration,
    /// content type, writer sequence (`Stream-Seq`) or a producer's sequence.
    Conflict,
    Internal,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 31] = [
        ErrorCode::InvalidResumeToken,
        ErrorCode::ReconnectWindowExpired,
        ErrorCode::SessionNotFound,
        ErrorCode::ReplayWindowTrimmed,
        ErrorCode::EpochChanged,
        ErrorCode::StoreUnavailable,
        ErrorCode::Draining,
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::InvalidRequest,
        ErrorCode::InvalidStreamId,
        ErrorCode::PayloadTooLarge,
        ErrorCode::AckBeyondHead,
        ErrorCode::IdempotencyKeyReused,
        ErrorCode::IdempotencyInProgress,
        ErrorCode::RateLimited,
        ErrorCode::OverCapacity,
        ErrorCode::NotFound,
        ErrorCode::MethodNotAllowed,
        ErrorCode::SessionTakenOver,
        ErrorCode::PingTimeout,
        ErrorCode::TokenExpired,
        ErrorCode::Revoked,
        ErrorCode::AuthzUnavailable,
        ErrorCode::UpstreamUnavailable,
        ErrorCode::UpstreamFailed,
        ErrorCode::UpstreamTimeout,
        ErrorCode::QueueFull,
        ErrorCode::StreamClosed,
        ErrorCode::Conflict,
        ErrorCode::Internal,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidResumeToken => "INVALID_RESUME_TOKEN",
            ErrorCode::ReconnectWindowExpired => "RECONNECT_WINDOW_EXPIRED",
            ErrorCode::SessionNotFound => "SESSION_NOT_FOUND",
            ErrorCode::ReplayWindowTrimmed => "REPLAY_WINDOW_TRIMMED",
            ErrorCode::EpochChanged => "EPOCH_CHANGED",
            ErrorCode::StoreUnavailable => "STORE_UNAVAILABLE",
            ErrorCode::Draining => "DRAINING",
            ErrorCode::Unauthorized => "UNAUTHORIZED",
            ErrorCode::Forbidden => "FORBIDDEN",
            ErrorCode::InvalidRequest => "INVALID_REQUEST",
            ErrorCode::InvalidStreamId => "INVALID_STREAM_ID",
            ErrorCode::PayloadTooLarge => "PAYLOAD_TOO_LARGE",
            ErrorCode::AckBeyondHead => "ACK_BEYOND_HEAD",
            ErrorCode::IdempotencyKeyReused => "IDEMPOTENCY_KEY_REUSED",
            ErrorCode::IdempotencyInProgress => "IDEMPOTENCY_IN_PROGRESS",
            ErrorCode::RateLimited => "RATE_LIMITED",
            ErrorCode::OverCapacity => "OVER_CAPACITY",
            ErrorCode::NotFound => "NOT_FOUND",
            ErrorCode::MethodNotAllowed => "METHOD_NOT_ALLOWED",
            ErrorCode::SessionTakenOver => "SESSION_TAKEN_OVER",
            ErrorCode::PingTimeout => "PING_TIMEOUT",
            ErrorCode::TokenExpired => "TOKEN_EXPIRED",
            ErrorCode::Revoked => "REVOKED",
            ErrorCode::AuthzUnavailable => "AUTHZ_UNAVAILABLE",
            ErrorCode::UpstreamUnavailable => "UPSTREAM_UNAVAILABLE",
            ErrorCode::UpstreamFailed => "UPSTREAM_FAILED",
            ErrorCode::UpstreamTimeout => "UPSTREAM_TIMEOUT",
            ErrorCode::QueueFull => "QUEUE_FULL",
            ErrorCode::StreamClosed => "STREAM_CLOSED",
            ErrorCode::Conflict => "CONFLICT",
            ErrorCode::Internal => "INTERNAL",
        }
    }

    /// The HTTP status an HTTP route answers with.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::InvalidResumeToken
            | ErrorCode::Unauthorized
            | ErrorCode::TokenExpired
            | ErrorCode::Revoked => 401,
            ErrorCode::ReconnectWindowExpired => 410,
            ErrorCode::SessionNotFound | ErrorCode::NotFound => 404,
            ErrorCode::ReplayWindowTrimmed
            | ErrorCode::EpochChanged
            | ErrorCode::IdempotencyInProgress
            | ErrorCode::SessionTakenOver
            | ErrorCode::StreamClosed
            | ErrorCode::Conflict => 409,
            ErrorCode::StoreUnavailable
            | ErrorCode::Draining
            | ErrorCode::OverCapacity
            | ErrorCode::UpstreamUnavailable
            | ErrorCode::AuthzUnavailable
            | ErrorCode::QueueFull => 503,
            ErrorCode::UpstreamFailed => 502,
            ErrorCode::UpstreamTimeout => 504,
            ErrorCode::Forbidden => 403,
            ErrorCode::InvalidRequest | ErrorCode::InvalidStreamId | ErrorCode::AckBeyondHead => {
                400
            }
            ErrorCode::PayloadTooLarge => 413,
            ErrorCode::IdempotencyKeyReused => 422,
            ErrorCode::RateLimited => 429,
            ErrorCode::MethodNotAllowed => 405,
            ErrorCode::PingTimeout => 408,
            ErrorCode::Internal => 500,
        }
    }

    /// The WebSocket close code used when this error ends a connection (session-level errors).
    pub fn close_code(self) -> u16 {
        match self {
            ErrorCode::InvalidResumeToken | ErrorCode::Unauthorized | ErrorCode::TokenExpired => {
                4401
            }
            ErrorCode::ReconnectWindowExpired => 4410,
            ErrorCode::SessionNotFound => 4404,
            ErrorCode::Forbidden | ErrorCode::Revoked => 4403,
            ErrorCode::StoreUnavailable
            | ErrorCode::OverCapacity
            | ErrorCode::UpstreamUnavailable
            | ErrorCode::UpstreamFailed
            | ErrorCode::UpstreamTimeout
            | ErrorCode::AuthzUnavailable
            | ErrorCode::QueueFull => 1013,
            ErrorCode::Draining => 1012,
            ErrorCode::PayloadTooLarge => 1009,
            ErrorCode::RateLimited => 4429,
            ErrorCode::SessionTakenOver => 4409,
            ErrorCode::PingTimeout => 4408,
            ErrorCode::Internal => 1011,
            ErrorCode::ReplayWindowTrimmed
            | ErrorCode::EpochChanged
            | ErrorCode::InvalidRequest
            | ErrorCode::InvalidStreamId
            | ErrorCode::AckBeyondHead
            | ErrorCode::IdempotencyKeyReused
            | ErrorCode::IdempotencyInProgress
            | ErrorCode::NotFound
            | ErrorCode::StreamClosed
            | ErrorCode::Conflict
            | ErrorCode::MethodNotAllowed => 4400,
        }
    }

    /// Whether the client should retry after a pause (`Retry-After` is set).
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorCode::StoreUnavailable
                | ErrorCode::Draining
                | ErrorCode::OverCapacity
                | ErrorCode::RateLimited
                | ErrorCode::IdempotencyInProgress
                | ErrorCode::UpstreamUnavailable
                | ErrorCode::UpstreamFailed
                | ErrorCode::UpstreamTimeout
                | ErrorCode::QueueFull
        )
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for ErrorCode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_statuses_and_close_codes() {
        let expect = [
            (ErrorCode::InvalidResumeToken, 401, 4401),
            (ErrorCode::ReconnectWindowExpired, 410, 4410),
            (ErrorCode::SessionNotFound, 404, 4404),
            (ErrorCode::StoreUnavailable, 503, 1013),
            (ErrorCode::Draining, 503, 1012),
            (ErrorCode::TokenExpired, 401, 4401),
        ];
        for (code, status, close) in expect {
            assert_eq!(code.http_status(), status, "{code}");
            assert_eq!(code.close_code(), close, "{code}");
        }
        assert_eq!(ErrorCode::ReplayWindowTrimmed.http_status(), 409);
        assert_eq!(ErrorCode::EpochChanged.http_status(), 409);
        assert_eq!(ErrorCode::PayloadTooLarge.http_status(), 413);
        assert_eq!(ErrorCode::IdempotencyKeyReused.http_status(), 422);
        assert_eq!(ErrorCode::IdempotencyInProgress.http_status(), 409);
        assert_eq!(ErrorCode::RateLimited.http_status(), 429);
        assert_eq!(ErrorCode::OverCapacity.http_status(), 503);
        assert_eq!(ErrorCode::StreamClosed.http_status(), 409);
        let names: std::collections::HashSet<_> =
            ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(names.len(), ErrorCode::ALL.len());
    }
}
