//! Durable Streams (SPEC §11) on zerodrop's logs: the rules of the `/ds/` room, which
//! `http/ds/` puts on the wire.
//!
//! A Durable Streams stream is a zerodrop stream with a record beside its log
//! ([`zerodrop_store::Store::stream_record`]): its content type, expiry, the last
//! `Stream-Seq` and its producers' `(epoch, seq)`. Each message is one event: a JSON
//! stream's messages are their JSON values, any other stream's bytes are byte payloads
//! (`zerodrop_core::payload`), split into events of at most `--max-payload-bytes` and
//! appended in one commit, so an append is whole or absent. A position is the seq of the
//! last event before it, in the stream's epoch ([`Offset`]).
//!
//! Writes to one stream are serialised on this instance (a lock per stream), so a producer's
//! check, its append and its new state follow each other. The append commits first and the
//! record after it; the append carries an idempotency key per producer sequence, so a
//! retry after a crash between the two finds the append and answers it as a duplicate.
//!
//! One file per job: this one holds the types, the record and the writes every operation
//! shares; `write.rs` creates and appends (producers, `Stream-Seq`, close), `read.rs` reads
//! and listens, `fork.rs` copies a fork's prefix and erases (with the forks' soft delete).
//!
//! Must not: know HTTP (headers, statuses beyond the typed errors) or write a session.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, Weak};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zerodrop_core::{Epoch, ErrorCode, Seq, StreamId};
use zerodrop_store::{BatchItem, IdempotencyKey, StoreError, StreamBatch, StreamInfo};

use super::App;
use crate::error::ApiError;

mod fork;
mod read;
mod write;

pub use read::{DsListener, render};

/// The content type of a stream created without one.
pub const DEFAULT_CONTENT_TYPE: &str = "application/octet-stream";
/// Most events one catch-up read returns.
pub const READ_EVENTS: usize = 1000;
/// Most events one append may become (JSON messages, or byte chunks).
pub const MAX_APPEND_EVENTS: usize = crate::app::streams::MAX_BATCH_EVENTS;

/// What the room keeps in memory: the per-stream write locks and when each stream was last
/// used (the sliding `Stream-TTL`).
#[derive(Default)]
pub struct DsStreams {
    locks: Mutex<HashMap<StreamId, Weak<tokio::sync::Mutex<()>>>>,
    touched: Mutex<HashMap<StreamId, u64>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl DsStreams {
    fn writer(&self, stream: &StreamId) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = lock(&self.locks);
        if let Some(l) = locks.get(stream).and_then(Weak::upgrade) {
            return l;
        }
        if locks.len() >= 1024 {
            locks.retain(|_, w| w.strong_count() > 0);
        }
        let l = Arc::new(tokio::sync::Mutex::new(()));
        locks.insert(stream.clone(), Arc::downgrade(&l));
        l
    }

    fn touch(&self, stream: &StreamId, now: u64) {
        lock(&self.touched).insert(stream.clone(), now);
    }

    fn touched(&self, stream: &StreamId) -> u64 {
        lock(&self.touched).get(stream).copied().unwrap_or(0)
    }

    fn forget(&self, stream: &StreamId) {
        lock(&self.touched).remove(stream);
    }
}

/// The durable record of a Durable Streams stream.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct DsRecord {
    /// As given at creation (compared by [`same_type`]).
    pub content_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_sec: Option<u64>,
    /// `Stream-Expires-At` as given, and the instant it names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_ms: Option<u64>,
    /// When the stream was created or its record last written (the sliding TTL's floor).
    pub touched_ms: u64,
    /// The last `Stream-Seq` accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_seq: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub producers: BTreeMap<String, Producer>,
    /// Closed. The log's own close ([`zerodrop_store::Store::close_stream`]) is set too once
    /// the log holds an event; a stream closed while empty has only this.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub closed: bool,
    /// A fork: the stream it was forked from, and where (the source's seq, and how far into
    /// the next message).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forked_from: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fork_at: Option<(u64, u64)>,
    /// Forks made from this stream and not erased yet.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub forks: u64,
    /// Deleted while forks of it remain: its log is erased, the record stays (the name
    /// answers 410, and cannot be created again) until the last fork goes.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deleted: bool,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A producer's state: its epoch and the last sequence accepted in it.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Producer {
    pub epoch: u64,
    pub seq: u64,
}

impl DsRecord {
    /// A JSON stream: messages are JSON values, reads are arrays.
    pub fn is_json(&self) -> bool {
        essence(&self.content_type) == "application/json"
    }

    /// Read as text (SSE sends the text as it is); any other non-JSON stream is bytes.
    pub fn is_text(&self) -> bool {
        essence(&self.content_type).starts_with("text/")
    }
}

/// The media type without parameters, lower-cased.
pub fn essence(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// Two content types name the same stream type (case and parameters aside).
pub fn same_type(a: &str, b: &str) -> bool {
    essence(a) == essence(b)
}

/// A position in a stream: after `seq`, in `epoch`. On the wire `<seq, 20 digits>_<epoch>`,
/// so that offsets of one stream sort as their positions do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Offset {
    pub seq: Seq,
    pub epoch: Epoch,
}

impl Offset {
    pub fn encode(&self) -> String {
        format!("{:020}_{}", self.seq.0, self.epoch.as_str())
    }

    /// `None` for anything that is not an offset this room wrote.
    pub fn parse(s: &str) -> Option<Offset> {
        let (seq, epoch) = s.split_once('_')?;
        if seq.len() != 20 || !seq.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Some(Offset {
            seq: Seq(seq.parse().ok()?),
            epoch: Epoch::parse(epoch)?,
        })
    }
}

/// Where a read starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Start {
    /// `-1` or no offset.
    Beginning,
    /// `now`: the tail.
    Now,
    At(Offset),
}

/// The body of a create or an append, as the request gave it.
pub struct Body<'a> {
    pub bytes: &'a [u8],
}

/// The producer headers of an append.
#[derive(Clone, Debug)]
pub struct ProducerClaim {
    pub id: String,
    pub epoch: u64,
    pub seq: u64,
}

/// A fork's origin (`Stream-Forked-From`, `Stream-Fork-Offset`, `Stream-Fork-Sub-Offset`).
#[derive(Clone, Debug)]
pub struct Fork {
    pub source: StreamId,
    /// `None`: the source's tail.
    pub offset: Option<Start>,
    /// Messages (JSON) or bytes (any other type) of the source's next message taken too.
    pub sub: u64,
}

/// A create (`PUT`).
pub struct Create<'a> {
    /// `None`: no `Content-Type` (a fork inherits its source's, a stream takes the default).
    pub content_type: Option<String>,
    pub fork: Option<Fork>,
    pub ttl_sec: Option<u64>,
    pub expires_at: Option<(String, u64)>,
    pub closed: bool,
    pub body: Body<'a>,
}

/// An append (`POST`).
pub struct Append<'a> {
    /// `None`: the request had no `Content-Type`.
    pub content_type: Option<String>,
    pub stream_seq: Option<String>,
    pub producer: Option<ProducerClaim>,
    pub close: bool,
    pub body: Body<'a>,
}

/// A stream as a read or a `HEAD` sees it.
pub struct Seen {
    pub record: DsRecord,
    pub info: StreamInfo,
}

impl Seen {
    /// Closed, by the log or by the record.
    pub fn closed(&self) -> bool {
        self.info.closed || self.record.closed
    }

    pub fn tail(&self) -> Offset {
        Offset {
            seq: self.info.head,
            epoch: self.info.epoch.clone(),
        }
    }
}

/// How an append ended.
pub enum Appended {
    /// New data (or a close) is stored; `producer` echoes the producer's state.
    Stored {
        tail: Offset,
        closed: bool,
        producer: Option<Producer>,
    },
    /// A producer's retry of something already stored: nothing was added.
    Duplicate {
        tail: Offset,
        closed: bool,
        producer: Producer,
    },
}

/// A refusal with the facts the wire needs beside the typed error (boxed: results stay
/// small on the happy path).
pub type DsError = Box<DsRefusal>;

#[derive(Debug)]
pub struct DsRefusal {
    pub error: ApiError,
    /// The status when the room's protocol wants another than the code's (410 for an
    /// offset no longer retained).
    pub status: Option<u16>,
    pub tail: Option<Offset>,
    pub closed: bool,
    /// 403: the producer's current epoch.
    pub producer_epoch: Option<u64>,
    /// 409 on a producer's sequence gap: expected and received.
    pub expected_seq: Option<(u64, u64)>,
}

impl From<ApiError> for DsError {
    fn from(error: ApiError) -> DsError {
        Box::new(DsRefusal {
            error,
            status: None,
            tail: None,
            closed: false,
            producer_epoch: None,
            expected_seq: None,
        })
    }
}

impl From<StoreError> for DsError {
    fn from(e: StoreError) -> DsError {
        DsError::from(ApiError::from(e))
    }
}

fn conflict(message: impl Into<String>) -> DsError {
    ApiError::new(ErrorCode::Conflict, message).into()
}

fn gone(stream: &StreamId) -> DsError {
    let mut e = DsError::from(
        ApiError::new(
            ErrorCode::NotFound,
            format!("stream {stream} was deleted; forks of it remain"),
        )
        .with("stream", stream.as_str())
        .with("deleted", true),
    );
    e.status = Some(410);
    e
}

fn not_found(stream: &StreamId) -> DsError {
    ApiError::new(ErrorCode::NotFound, format!("no stream {stream}"))
        .with("stream", stream.as_str())
        .into()
}

pub type DsResult<T> = Result<T, DsError>;

impl App {
    fn ds_now(&self) -> u64 {
        self.clock().now_ms()
    }

    /// The stream's record, if it is a live Durable Streams stream: one past its expiry is
    /// erased here (log and record) and reads as absent. A zerodrop stream without a record
    /// that holds events reads as an `application/json` stream.
    async fn ds_record(&self, stream: &StreamId) -> DsResult<Option<(DsRecord, bool)>> {
        let Some(text) = self.store.stream_record(stream).await? else {
            let info = self.store.stream_info(stream).await?;
            if info.head == Seq(0) {
                return Ok(None);
            }
            let record = DsRecord {
                content_type: "application/json".into(),
                ttl_sec: None,
                expires_at: None,
                expires_ms: None,
                touched_ms: 0,
                stream_seq: None,
                producers: BTreeMap::new(),
                closed: false,
                forked_from: None,
                fork_at: None,
                forks: 0,
                deleted: false,
            };
            return Ok(Some((record, false)));
        };
        let record: DsRecord = serde_json::from_str(&text).map_err(|e| {
            ApiError::new(
                ErrorCode::Internal,
                format!("the stream's record is unreadable: {e}"),
            )
        })?;
        let now = self.ds_now();
        let last = record.touched_ms.max(self.ds.touched(stream));
        let expired = record.expires_ms.is_some_and(|at| now >= at)
            || record
                .ttl_sec
                .is_some_and(|ttl| now >= last.saturating_add(ttl.saturating_mul(1000)));
        if expired && !record.deleted {
            return Ok(self.ds_erase(stream, record).await?.map(|r| (r, true)));
        }
        Ok(Some((record, true)))
    }

    /// The stream's record, or the typed refusal for a name without a live stream: 404, or
    /// 410 for one deleted while its forks remain.
    async fn ds_live(&self, stream: &StreamId) -> DsResult<DsRecord> {
        match self.ds_record(stream).await? {
            None => Err(not_found(stream)),
            Some((r, _)) if r.deleted => Err(gone(stream)),
            Some((r, _)) => Ok(r),
        }
    }

    async fn ds_put_record(&self, stream: &StreamId, record: &DsRecord) -> DsResult<()> {
        let text = serde_json::to_string(record).unwrap_or_default();
        self.store
            .put_stream_record(stream, Some(text))
            .await
            .map_err(Into::into)
    }

    /// The largest byte chunk one event holds, its payload as base64 within the stream's
    /// payload limit (`--max-payload-bytes`, or its `[streams."<pattern>"]` table's).
    fn ds_chunk(&self, stream: &StreamId) -> usize {
        (self.policy(stream).max_payload_bytes.saturating_sub(16) / 4) * 3
    }

    /// Appends `messages` (one commit), with a key per message when a producer sent them.
    async fn ds_write(
        &self,
        stream: &StreamId,
        messages: Vec<String>,
        producer: Option<&ProducerClaim>,
    ) -> DsResult<(Option<Seq>, bool)> {
        if messages.is_empty() {
            return Ok((None, false));
        }
        if messages.len() > MAX_APPEND_EVENTS {
            return Err(ApiError::new(
                ErrorCode::PayloadTooLarge,
                format!("one append may hold at most {MAX_APPEND_EVENTS} messages"),
            )
            .into());
        }
        let tag = producer.map(|p| {
            let h = Sha256::digest(p.id.as_bytes());
            format!("ds:{}:{}:{}", hex::encode(&h[..12]), p.epoch, p.seq)
        });
        let mut items = Vec::with_capacity(messages.len());
        for (i, data) in messages.into_iter().enumerate() {
            // The stream's policy (who may publish, its payload limit), as for every publish.
            self.check_publish(stream, &data, super::Publisher::ApiKey)?;
            self.check_data(&data)?;
            let idempotency = tag.as_ref().map(|t| IdempotencyKey {
                key: format!("{t}:{i}"),
                fingerprint: Sha256::digest(data.as_bytes()).into(),
            });
            items.push(BatchItem { data, idempotency });
        }
        let n = items.len();
        let mut out = self
            .store
            .append_batch(vec![StreamBatch {
                stream: stream.clone(),
                items,
            }])
            .await?;
        let outcomes = out.pop().unwrap_or_else(|| {
            Err(StoreError::Unavailable(
                "the store answered no part of the append".into(),
            ))
        })?;
        let duplicate = outcomes.iter().all(|o| o.duplicate);
        if !duplicate {
            self.metrics.published(n as u64);
        }
        Ok((outcomes.last().map(|o| o.seq), duplicate))
    }

    /// `DELETE`: erases the log and the record.
    pub async fn ds_delete(&self, stream: &StreamId) -> DsResult<()> {
        let writer = self.ds.writer(stream);
        let _held = writer.lock().await;
        let record = self.ds_live(stream).await?;
        self.ds_erase(stream, record).await.map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_sort_as_positions_and_parse_back() {
        let e = Epoch::parse("00ff00ff00ff00ff").unwrap();
        let a = Offset {
            seq: Seq(9),
            epoch: e.clone(),
        };
        let b = Offset {
            seq: Seq(10),
            epoch: e,
        };
        assert!(a.encode() < b.encode());
        assert_eq!(Offset::parse(&b.encode()), Some(b));
        for bad in [
            "",
            "-1",
            "now",
            "1_00ff00ff00ff00ff",
            "0000000000000000000a_00ff00ff00ff00ff",
        ] {
            assert_eq!(Offset::parse(bad), None, "{bad}");
        }
    }
}
