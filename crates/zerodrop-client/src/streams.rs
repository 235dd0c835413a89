//! Streams as a whole (SPEC §11) over HTTP: batch publish, history in either direction,
//! close and delete. Like the rest of [`HttpClient`], nothing is retried behind the caller's
//! back; a batch whose events carry an `id` can be retried as a whole safely.

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::error::{ApiError, ClientError};
use crate::http::{EventsPage, HttpClient, Published, expect_json};

/// One event of a batch: its stream, its data (JSON text), and an optional idempotency key.
#[derive(Clone, Debug)]
pub struct BatchEvent<'a> {
    pub stream: &'a str,
    pub data_json: &'a str,
    pub id: Option<&'a str>,
}

/// One event's answer in a batch: stored (or a duplicate of an earlier append), or refused
/// with its stream's part (`IDEMPOTENCY_KEY_REUSED`, `STREAM_CLOSED`, …).
#[derive(Clone, Debug, PartialEq)]
pub enum BatchResult {
    Published(Published),
    Refused(ApiError),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum ResultBody {
    Refused { error: ApiError },
    Published(Published),
}

#[derive(Deserialize)]
struct BatchAnswer {
    results: Vec<ResultBody>,
}

/// Where a history page starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum History {
    /// Events after this seq, oldest first (`?after=`).
    After(u64),
    /// Events before this seq, newest first (`?before=`).
    Before(u64),
    /// The newest events, newest first (`?last=`).
    Last,
    /// From the first event stamped at or after this time (ms), oldest first (`?since_ts=`).
    SinceTs(u64),
}

/// The answer to a close: the stream ends at `last_seq`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StreamClosed {
    pub stream: String,
    pub epoch: String,
    pub last_seq: u64,
}

/// The answer to a delete: the stream starts again, empty, in `epoch`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Deleted {
    pub stream: String,
    pub epoch: String,
}

fn raw(json: &str) -> Result<&RawValue, ClientError> {
    serde_json::from_str(json).map_err(|e| ClientError::Protocol(format!("data is not JSON: {e}")))
}

impl HttpClient {
    /// `POST /v1/events` with `{"events": […]}` (api key): one answer per event, in order.
    /// Each stream's events are stored in one commit, contiguous and in this order, or none
    /// of them.
    pub async fn publish_batch(
        &self,
        events: &[BatchEvent<'_>],
    ) -> Result<Vec<BatchResult>, ClientError> {
        #[derive(serde::Serialize)]
        struct Item<'a> {
            stream: &'a str,
            data: &'a RawValue,
            #[serde(skip_serializing_if = "Option::is_none")]
            id: Option<&'a str>,
        }
        let items = events
            .iter()
            .map(|e| {
                Ok(Item {
                    stream: e.stream,
                    data: raw(e.data_json)?,
                    id: e.id,
                })
            })
            .collect::<Result<Vec<_>, ClientError>>()?;
        self.batch(&serde_json::json!({ "events": items })).await
    }

    /// `POST /v1/events` with `{"streams": […], "data": …}`: one event to many streams.
    pub async fn broadcast(
        &self,
        streams: &[&str],
        data_json: &str,
    ) -> Result<Vec<BatchResult>, ClientError> {
        let body = serde_json::json!({ "streams": streams, "data": raw(data_json)? });
        self.batch(&body).await
    }

    async fn batch(&self, body: &serde_json::Value) -> Result<Vec<BatchResult>, ClientError> {
        let req = self
            .http_client()
            .post(self.url("/v1/events"))
            .header(reqwest::header::AUTHORIZATION, self.api_key_header()?)
            .json(body);
        let a: BatchAnswer = expect_json(req.send().await).await?;
        Ok(a.results
            .into_iter()
            .map(|r| match r {
                ResultBody::Published(p) => BatchResult::Published(p),
                ResultBody::Refused { error } => BatchResult::Refused(error),
            })
            .collect())
    }

    /// `GET /v1/streams/{stream}/events` from `from`, at most `limit` events (api key).
    pub async fn history(
        &self,
        stream: &str,
        from: History,
        limit: u32,
    ) -> Result<EventsPage, ClientError> {
        let query = match from {
            History::After(n) => vec![("after", n.to_string()), ("limit", limit.to_string())],
            History::Before(n) => vec![("before", n.to_string()), ("limit", limit.to_string())],
            History::Last => vec![("last", limit.to_string())],
            History::SinceTs(t) => vec![("since_ts", t.to_string()), ("limit", limit.to_string())],
        };
        let req = self
            .http_client()
            .get(self.url(&format!("/v1/streams/{stream}/events")))
            .query(&query)
            .header(reqwest::header::AUTHORIZATION, self.api_key_header()?);
        expect_json(req.send().await).await
    }

    /// `POST /v1/streams/{stream}/close` (api key): later appends get `STREAM_CLOSED`.
    pub async fn close_stream(&self, stream: &str) -> Result<StreamClosed, ClientError> {
        let req = self
            .http_client()
            .post(self.url(&format!("/v1/streams/{stream}/close")))
            .header(reqwest::header::AUTHORIZATION, self.api_key_header()?);
        expect_json(req.send().await).await
    }

    /// `DELETE /v1/streams/{stream}` (api key): the log and its idempotency records are
    /// erased; the stream starts again in a new epoch.
    pub async fn delete_stream(&self, stream: &str) -> Result<Deleted, ClientError> {
        let req = self
            .http_client()
            .delete(self.url(&format!("/v1/streams/{stream}")))
            .header(reqwest::header::AUTHORIZATION, self.api_key_header()?);
        expect_json(req.send().await).await
    }
}
