//! The SDK's one error type. Server errors keep their SPEC code so callers can branch on it.

use std::time::Duration;

use serde::Deserialize;

/// A server error body: `{"error":{"code":…,"message":…, …extra facts}}`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct ApiError {
    #[serde(default)]
    pub code: String,
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub stream: Option<String>,
    #[serde(default, rename = "firstAvailableSeq")]
    pub first_available_seq: Option<u64>,
}

impl From<crate::frames::ErrorFrame> for ApiError {
    fn from(f: crate::frames::ErrorFrame) -> ApiError {
        ApiError {
            code: f.code,
            message: f.message,
            stream: f.stream,
            first_available_seq: f.first_available_seq,
        }
    }
}

impl From<crate::frames::FrameError> for ClientError {
    fn from(e: crate::frames::FrameError) -> ClientError {
        ClientError::Protocol(format!("bad frame: {e}"))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with a non-success status.
    #[error("HTTP {status} {}: {}", .error.code, .error.message)]
    Http {
        status: u16,
        error: ApiError,
        retry_after: Option<Duration>,
    },
    /// Connecting, sending or receiving failed below HTTP (refused, reset, timed out).
    #[error("network: {0}")]
    Network(String),
    /// The request or the answer did not finish in time.
    #[error("timed out: {0}")]
    Timeout(String),
    /// The server sent something the protocol does not allow.
    #[error("protocol: {0}")]
    Protocol(String),
    /// A session-level `error` frame (the socket is closing with the code's close code).
    #[error("server error frame {}: {}", .0.code, .0.message)]
    Frame(ApiError),
    /// The WebSocket closed; `code` is the close code when the server sent one.
    #[error("closed (code {code:?}): {reason}")]
    Closed { code: Option<u16>, reason: String },
    #[error("invalid url: {0}")]
    InvalidUrl(String),
    #[error("token: {0}")]
    Token(String),
    /// A TLS setup or handshake failure: an unreadable CA file, or a server certificate
    /// that does not verify against the trusted roots.
    #[error("tls: {0}")]
    Tls(String),
}

impl ClientError {
    /// The SPEC error code carried by this error, if any (HTTP body, error frame, or the code
    /// implied by a WebSocket close code).
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Http { error, .. } | ClientError::Frame(error) => {
                Some(error.code.as_str())
            }
            ClientError::Closed { code: Some(c), .. } => match c {
                4401 => Some("INVALID_RESUME_TOKEN"),
                4410 => Some("RECONNECT_WINDOW_EXPIRED"),
                4404 => Some("SESSION_NOT_FOUND"),
                4408 => Some("PING_TIMEOUT"),
                4409 => Some("SESSION_TAKEN_OVER"),
                1012 => Some("DRAINING"),
                1013 => Some("STORE_UNAVAILABLE"),
                _ => None,
            },
            _ => None,
        }
    }

    /// The HTTP status, when the server answered with one.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Http { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Whether this is a failure below HTTP (no status): refused, reset, timed out.
    pub fn is_network(&self) -> bool {
        matches!(self, ClientError::Network(_) | ClientError::Timeout(_))
    }

    pub(crate) fn from_reqwest(e: reqwest::Error) -> ClientError {
        #[cfg(feature = "tls")]
        if let Some(cause) = crate::tls::tls_cause(&e) {
            return ClientError::Tls(format!("{cause} ({e})"));
        }
        if e.is_timeout() {
            ClientError::Timeout(e.to_string())
        } else if e.is_decode() {
            ClientError::Protocol(e.to_string())
        } else {
            ClientError::Network(e.to_string())
        }
    }

    /// Builds the error for a non-success answer from its status and body.
    pub(crate) fn from_body(
        status: u16,
        body: &[u8],
        retry_after: Option<Duration>,
    ) -> ClientError {
        #[derive(Deserialize)]
        struct Body {
            error: ApiError,
        }
        let error = serde_json::from_slice::<Body>(body)
            .map(|b| b.error)
            .unwrap_or_else(|_| ApiError {
                code: String::new(),
                message: String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned(),
                ..ApiError::default()
            });
        ClientError::Http {
            status,
            error,
            retry_after,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_bodies_keep_their_code_and_facts() {
        let e = ClientError::from_body(
            409,
            br#"{"error":{"code":"REPLAY_WINDOW_TRIMMED","message":"gone","stream":"room:1","firstAvailableSeq":41}}"#,
            None,
        );
        assert_eq!(e.code(), Some("REPLAY_WINDOW_TRIMMED"));
        assert_eq!(e.status(), Some(409));
        let ClientError::Http { error, .. } = e else {
            panic!()
        };
        assert_eq!(error.first_available_seq, Some(41));
        let e = ClientError::from_body(502, b"<html>bad gateway</html>", None);
        assert_eq!(e.code(), Some(""));
        assert!(e.to_string().contains("bad gateway"));
        let closed = ClientError::Closed {
            code: Some(4410),
            reason: String::new(),
        };
        assert_eq!(closed.code(), Some("RECONNECT_WINDOW_EXPIRED"));
    }
}
