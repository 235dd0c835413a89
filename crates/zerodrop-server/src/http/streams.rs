//! The routes on streams as a whole (SPEC §11): batch publish (`POST /v1/events`), erase
//! (`DELETE /v1/streams/{stream}`) and close (`POST /v1/streams/{stream}/close`).
//!
//! A batch is checked whole before anything is written: a body of the wrong shape, an empty
//! batch, more than [`MAX_BATCH_EVENTS`] events, a bad stream id, `id` or `data` anywhere in
//! it (`data` larger than any stream accepts included) refuses the whole request (400/413,
//! naming the item's `index`), so a client's mistake never leaves half a batch behind. What
//! one stream's policy refuses (its `max_payload_bytes`, who may publish to it) and what only
//! the store can tell (a key reused with another body, a closed stream) refuse that stream's
//! part of the batch, each of its events answering the error, while the other streams are
//! written.
//!
//! Must not: decide what a batch does to the log (the app's and the store's).

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use serde::de::{SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;
use serde_json::{Value, json};
use zerodrop_core::{ErrorCode, StreamId};

use super::extract::{ApiKey, RawBody, StreamPath, json, valid_idempotency_key};
use super::v1::json_response;
use crate::app::App;
use crate::app::streams::{BatchEvent, MAX_BATCH_EVENTS};
use crate::error::{ApiError, ApiResult};

const SHAPE: &str =
    "{\"events\": [{\"stream\", \"data\", \"id\"?}, …]} or {\"streams\": […], \"data\", \"id\"?}";

/// `{"events": […]}` or `{"streams": […], "data": …}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchBody<'a> {
    #[serde(borrow, default, deserialize_with = "presized")]
    events: Option<Vec<ItemBody<'a>>>,
    #[serde(default)]
    streams: Option<Vec<String>>,
    #[serde(borrow, default, deserialize_with = "present")]
    data: Option<&'a RawValue>,
    #[serde(default)]
    id: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ItemBody<'a> {
    /// Borrowed from the body unless it has escapes.
    #[serde(borrow)]
    stream: Cow<'a, str>,
    #[serde(borrow)]
    data: &'a RawValue,
    #[serde(default)]
    id: Option<String>,
}

/// `events`, read into a vector with room for a typical batch from the start: serde's own grows
/// one from empty (JSON gives no length up front), copying it at each doubling. `null` reads as
/// absent, as a plain `Option` would.
fn presized<'de: 'a, 'a, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Vec<ItemBody<'a>>>, D::Error> {
    struct Items<'a>(PhantomData<ItemBody<'a>>);
    impl<'de: 'a, 'a> Visitor<'de> for Items<'a> {
        type Value = Option<Vec<ItemBody<'a>>>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an array of events")
        }
        fn visit_none<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_seq(self)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut items = Vec::with_capacity(PRESIZED);
            while let Some(item) = seq.next_element()? {
                items.push(item);
            }
            Ok(Some(items))
        }
    }
    d.deserialize_option(Items(PhantomData))
}

/// Room [`presized`] makes for a batch's events at first.
const PRESIZED: usize = 128;

/// A field that is present, `null` included (a plain `Option` reads `null` as absent).
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

/// The batch's events, checked, in request order (the broadcast form is one event per
/// stream, each with the same `data` and `id`).
fn batch_events(app: &App, body: &[u8]) -> ApiResult<Vec<BatchEvent>> {
    let b: BatchBody = json(body, SHAPE)?;
    let items: Vec<(Cow<'_, str>, &RawValue, Option<String>)> = match (b.events, b.streams) {
        (Some(events), None) => {
            if b.data.is_some() || b.id.is_some() {
                return Err(ApiError::invalid(
                    "data and id belong inside each event when the batch is {\"events\": […]}",
                ));
            }
            events
                .into_iter()
                .map(|e| (e.stream, e.data, e.id))
                .collect()
        }
        (None, Some(streams)) => {
            let data = b.data.ok_or_else(|| {
                ApiError::invalid("a broadcast {\"streams\": […]} needs \"data\"")
            })?;
            streams
                .into_iter()
                .map(|s| (Cow::Owned(s), data, b.id.clone()))
                .collect()
        }
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(format!(
                "give either events or streams, not both: {SHAPE}"
            )));
        }
        (None, None) => return Err(ApiError::invalid(format!("the body must be {SHAPE}"))),
    };
    if items.is_empty() {
        return Err(ApiError::invalid(
            "the batch is empty: give at least one event",
        ));
    }
    if items.len() > MAX_BATCH_EVENTS {
        return Err(ApiError::invalid(format!(
            "the batch holds {} events; the limit is {MAX_BATCH_EVENTS}",
            items.len()
        ))
        .with("limit", MAX_BATCH_EVENTS as u64));
    }
    let mut out = Vec::with_capacity(items.len());
    for (index, (stream, data, id)) in items.into_iter().enumerate() {
        let at = |e: ApiError| e.with("index", index as u64);
        let stream = StreamId::new(&stream).map_err(|e| {
            at(ApiError::new(
                ErrorCode::InvalidStreamId,
                format!("invalid stream id {stream:?}: {e}"),
            ))
        })?;
        if let Some(id) = &id
            && !valid_idempotency_key(id)
        {
            return Err(at(ApiError::invalid(
                "an event's id (its idempotency key) must be 1-255 visible ASCII characters",
            )));
        }
        let data = zerodrop_core::json::compact(data.get());
        app.check_data(&data).map_err(at)?;
        out.push(BatchEvent {
            stream,
            data: data.into_owned(),
            id,
        });
    }
    Ok(out)
}

/// `POST /v1/events`: 201 `{results: […]}`, one entry per event in request order.
pub(super) async fn publish_batch(
    State(app): State<Arc<App>>,
    _: ApiKey,
    RawBody(body): RawBody,
) -> ApiResult<Response> {
    let events = batch_events(&app, &body)?;
    let results = app.publish_batch(events).await?;
    let results: Vec<Answer> = results
        .iter()
        .map(|r| match r {
            Ok(o) => Answer::Appended {
                stream: o.stream.as_str(),
                seq: o.seq.0,
                epoch: o.epoch.as_str(),
                duplicate: o.duplicate,
            },
            Err(e) => Answer::Refused(e.envelope()),
        })
        .collect();
    // Serialised into a buffer sized for the answers (an answer is under 100 bytes but for a
    // refusal), not grown from axum's 128 bytes.
    let mut body = Vec::with_capacity(32 + results.len() * 96);
    serde_json::to_writer(&mut body, &Answers { results }).map_err(|e| {
        ApiError::new(
            ErrorCode::Internal,
            format!("cannot encode the answers: {e}"),
        )
    })?;
    Ok(json_response(StatusCode::CREATED, body))
}

/// The answer to a batch, serialised straight from the outcomes (a batch of 1,000 events
/// would otherwise build and drop 1,000 JSON maps).
#[derive(Serialize)]
struct Answers<'a> {
    results: Vec<Answer<'a>>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum Answer<'a> {
    Appended {
        stream: &'a str,
        seq: u64,
        epoch: &'a str,
        duplicate: bool,
    },
    Refused(Value),
}

/// `DELETE /v1/streams/{stream}`: 200 with the stream's new (empty) bounds.
pub(super) async fn delete_stream(
    State(app): State<Arc<App>>,
    _: ApiKey,
    StreamPath(stream): StreamPath,
) -> ApiResult<Json<Value>> {
    let info = app.delete_stream(&stream).await?;
    Ok(Json(json!({
        "stream": info.stream, "epoch": info.epoch, "headSeq": info.head,
        "firstSeq": info.first_seq, "deleted": true,
    })))
}

/// `POST /v1/streams/{stream}/close`: 200 `{stream, epoch, lastSeq, closed: true}`; closing
/// a closed stream answers the same.
pub(super) async fn close_stream(
    State(app): State<Arc<App>>,
    _: ApiKey,
    StreamPath(stream): StreamPath,
) -> ApiResult<Json<Value>> {
    let info = app.close_stream(&stream).await?;
    Ok(Json(json!({
        "stream": info.stream, "epoch": info.epoch, "lastSeq": info.head, "closed": true,
    })))
}
