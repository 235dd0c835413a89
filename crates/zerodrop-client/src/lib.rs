//! The zerodrop SDK for Rust.
//!
//! - [`Client`] and [`Subscription`]: what applications use. One session, reconnected with
//!   full-jitter backoff and resumed with the newest token, drains followed to the next url;
//!   each subscription yields its stream's events in seq order, each once, and acks only what
//!   the application marked handled; a gap is read back over HTTP, never skipped; what cannot
//!   be served ends the subscription with a typed [`SubscriptionError`]. Optional end-to-end
//!   encrypted data ([`e2e`], feature `e2e`) and a consistency check ([`Client::verify`]).
//!
//! Below it, the wire-level parts the operator tools use:
//!
//! - [`HttpClient`]: publish (with `Idempotency-Key`), read, stream info, sessions,
//!   checkpoints, HTTP reconnect, health, metrics and the admin routes.
//! - [`WsConnection`]: `GET /v1/ws` with a connect token or a resume token, the frames of
//!   SPEC §4, automatic `pong` answers and resume-token refresh.
//! - [`SseConnection`]: `GET /v1/streams/{stream}/sse` with `Last-Event-ID` / `?after=`.
//! - [`Deduper`]: per-stream seq bookkeeping — drop what was already delivered, flag gaps and
//!   epoch changes. Every transport's events should pass through one.
//! - [`check_stream`]: the consistency check — a stream's `hash` against the chain over the
//!   events it serves.
//! - `mint_connect_token` and `mint_claims` (cargo feature `mint`, off by default): HS256
//!   connect tokens for backends that hold the JWT secret (`ConnectClaims::upstreams` grants
//!   `GET /v1/upstreams/…`).
//! - `e2e` (cargo feature `e2e`, on by default): AES-256-GCM sealing of event data.
//! - `Tls` (cargo feature `tls`, on by default): `https://` and `wss://` with rustls, the
//!   system's roots and optional extra CA certificates.
//!
//! The SDK never links the server: it is what the operator tools use to judge a deployment
//! from the outside.

pub mod backoff;
pub mod client;
pub mod consistency;
pub mod dedupe;
#[cfg(feature = "e2e")]
pub mod e2e;
pub mod error;
pub mod frames;
pub mod http;
pub mod presence;
pub mod sse;
pub mod streams;
#[cfg(feature = "tls")]
pub mod tls;
#[cfg(feature = "mint")]
pub mod token;
pub mod ws;

pub use backoff::Backoff;
pub use client::{
    Client, ClientOptions, OFFERED_PROTOCOLS, Position, Received, SubscribeOptions, Subscription,
    SubscriptionError, TokenSource,
};
pub use consistency::{CheckError, StreamCheck, Verdict, check_stream};
pub use dedupe::{Deduper, Delivery};
pub use error::{ApiError, ClientError};
pub use frames::{ClientFrame, ErrorFrame, Event, ServerFrame, Welcome};
pub use http::{
    Answer, Checkpoint, EventsPage, HttpClient, Published, RawEventsPage, ReconnectAnswer,
    ReplayEntry, Session, SessionStream, StreamInfo, WebhookAccepted,
};
pub use presence::{Members, PresencePage, PresenceView};
pub use sse::{SseAuth, SseConnection, SseMessage, SseOptions};
pub use streams::{BatchEvent, BatchResult, Deleted, History, StreamClosed};
#[cfg(feature = "tls")]
pub use tls::Tls;
#[cfg(feature = "mint")]
pub use token::{ConnectClaims, mint_claims, mint_connect_token};
pub use ws::{WsAuth, WsConnection};

/// The README's example, compiled with the crate's doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

/// The WebSocket subprotocol [`WsConnection::connect`] offers: the wire-level connection
/// speaks `zerodrop.v1` frames (single acks). [`Client`] offers [`OFFERED_PROTOCOLS`].
pub const PROTOCOL: &str = "zerodrop.v1";

/// Turns `http://host:port[/prefix]` into its base without a trailing slash, and the matching
/// `ws://` base.
pub(crate) fn ws_base(http_base: &str) -> Result<String, ClientError> {
    let base = http_base.trim_end_matches('/');
    if let Some(rest) = base.strip_prefix("http://") {
        Ok(format!("ws://{rest}"))
    } else if let Some(rest) = base.strip_prefix("https://") {
        Ok(format!("wss://{rest}"))
    } else {
        Err(ClientError::InvalidUrl(format!(
            "{http_base}: expected http:// or https://"
        )))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn ws_base_follows_the_scheme() {
        assert_eq!(
            super::ws_base("http://127.0.0.1:7700/").unwrap(),
            "ws://127.0.0.1:7700"
        );
        assert_eq!(
            super::ws_base("https://x.example/zd").unwrap(),
            "wss://x.example/zd"
        );
        assert!(super::ws_base("127.0.0.1:7700").is_err());
    }
}
