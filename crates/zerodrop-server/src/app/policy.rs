//! Per-stream policy (SPEC §11): the `[streams."<pattern>"]` settings that apply to a stream
//! ([`Config::policy`](crate::config::Config::policy): the most specific pattern, each setting
//! it leaves out taken from the global one) held against every publish, whatever its path:
//! `POST /v1/streams/{stream}/events`, each stream's part of a batch, WebSocket `publish`
//! frames (appended or only delivered upstream) and webhooks that append.
//!
//! Retention is the store's to apply (it gets each pattern's limits at start); presence is
//! asked through [`App::presence_on`](super::App::presence_on).
//!
//! Must not: decide anything a transport encodes (refusals are `ApiError`s).

use serde_json::{Value, json};
use zerodrop_core::{ErrorCode, StreamId};

use super::{App, Publisher};
use crate::config::{PublishRule, StreamPolicy};
use crate::error::ApiError;

impl App {
    /// The policy that applies to `stream`.
    pub fn policy(&self, stream: &StreamId) -> StreamPolicy<'_> {
        self.cfg.policy(stream.as_str())
    }

    /// Whether `stream`'s policy lets `by` publish `data` (compact JSON): who may publish
    /// (403 `FORBIDDEN`), then its `max_payload_bytes` (413 `PAYLOAD_TOO_LARGE`). Each
    /// refusal names the stream and the pattern it came from (`pattern`, absent for the
    /// global settings).
    pub fn check_publish(
        &self,
        stream: &StreamId,
        data: &str,
        by: Publisher<'_>,
    ) -> Result<(), ApiError> {
        let policy = self.policy(stream);
        let with_pattern = |e: ApiError| {
            let e = e.with("stream", stream.as_str());
            match policy.pattern {
                Some(p) => e.with("pattern", p),
                None => e,
            }
        };
        let refused = match (policy.publish, by) {
            (PublishRule::Any, _) | (PublishRule::ApiKey, Publisher::ApiKey) => false,
            (PublishRule::ApiKey, Publisher::Subject(_)) | (PublishRule::None, _) => true,
        };
        if refused {
            let who = match policy.publish {
                PublishRule::None => "the stream is read-only",
                _ => "only backends with the api key may publish to it",
            };
            return Err(with_pattern(ApiError::forbidden(format!(
                "publishing to {stream} is not allowed: {who} ({})",
                source(&policy)
            )))
            .with("publish", policy.publish.as_str()));
        }
        if data.len() > policy.max_payload_bytes {
            return Err(with_pattern(ApiError::new(
                ErrorCode::PayloadTooLarge,
                format!(
                    "data is {} bytes; the limit for {stream} is {} ({})",
                    data.len(),
                    policy.max_payload_bytes,
                    source(&policy)
                ),
            ))
            .with("limit", policy.max_payload_bytes as u64));
        }
        Ok(())
    }
}

/// Where the stream's policy came from, for messages.
fn source(policy: &StreamPolicy<'_>) -> String {
    match policy.pattern {
        Some(p) => format!("the policy of [streams.\"{p}\"]"),
        None => "the global settings".into(),
    }
}

/// The policy as `GET /v1/streams/{stream}` shows it.
pub fn policy_json(policy: &StreamPolicy<'_>) -> Value {
    json!({
        "pattern": policy.pattern,
        "retention": {
            "maxEvents": policy.retention.max_events,
            "maxBytes": policy.retention.max_bytes,
            "maxAgeSec": policy.retention.max_age_ms / 1000,
        },
        "maxPayloadBytes": policy.max_payload_bytes,
        "presence": policy.presence,
        "publish": policy.publish.as_str(),
    })
}
