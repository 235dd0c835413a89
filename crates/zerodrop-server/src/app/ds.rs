//! Durable Streams (SPEC §11) on zerodrop's logs: the rules of the `/ds/` room, which
//! `http/ds.rs` puts on the wire.
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
//! Must not: know HTTP (headers, statuses beyond the typed errors) or write a session.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, Weak};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zerodrop_core::payload::{bytes_data, data_bytes};
use zerodrop_core::{Epoch, ErrorCode, Event, Seq, StreamId};
use zerodrop_store::{BatchItem, IdempotencyKey, StoreError, StreamBatch, StreamInfo};

use super::App;
use crate::error::ApiError;
use crate::live::{Signal, Subscription};

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

/// A long-poll's or an SSE response's place on the live path ([`App::ds_listen`]).
pub struct DsListener {
    _sub: Subscription,
    pub signal: Arc<Signal>,
    app: Arc<App>,
    id: u64,
}

impl Drop for DsListener {
    fn drop(&mut self) {
        self.app.unregister_connection(self.id);
    }
}

/// What a fork copies.
struct ForkPrefix {
    at: (u64, u64),
    messages: Vec<String>,
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

/// The messages a body holds for a stream of this type: JSON values (one level of an array
/// flattened), or byte chunks of at most `chunk` bytes.
fn messages(json: bool, body: &[u8], chunk: usize, create: bool) -> DsResult<Vec<String>> {
    if !json {
        return Ok(body.chunks(chunk.max(1)).map(bytes_data).collect());
    }
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Vec::new());
    }
    let v: &serde_json::value::RawValue = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(format!("the body is not JSON: {e}")))?;
    let text = v.get().trim_start();
    if text.starts_with('[') {
        let items: Vec<&serde_json::value::RawValue> = serde_json::from_str(text)
            .map_err(|e| ApiError::invalid(format!("the body is not JSON: {e}")))?;
        if items.is_empty() && !create {
            return Err(ApiError::invalid("an empty JSON array appends nothing").into());
        }
        Ok(items
            .iter()
            .map(|i| zerodrop_core::json::compact(i.get()).into_owned())
            .collect())
    } else {
        Ok(vec![zerodrop_core::json::compact(text).into_owned()])
    }
}

/// A producer's claim against its state: `Ok(true)` new, `Ok(false)` a duplicate.
fn check_producer(state: Option<Producer>, claim: &ProducerClaim) -> DsResult<bool> {
    let Some(st) = state else {
        if claim.seq == 0 {
            return Ok(true);
        }
        return Err(gap(0, claim.seq));
    };
    if claim.epoch < st.epoch {
        let mut e = DsError::from(
            ApiError::forbidden(format!(
                "producer {} is at epoch {}; epoch {} is fenced",
                claim.id, st.epoch, claim.epoch
            ))
            .with("producerEpoch", st.epoch),
        );
        e.producer_epoch = Some(st.epoch);
        return Err(e);
    }
    if claim.epoch > st.epoch {
        if claim.seq != 0 {
            return Err(ApiError::invalid(format!(
                "a new producer epoch starts at seq 0, not {}",
                claim.seq
            ))
            .into());
        }
        return Ok(true);
    }
    if claim.seq <= st.seq {
        return Ok(false);
    }
    if claim.seq == st.seq + 1 {
        return Ok(true);
    }
    Err(gap(st.seq + 1, claim.seq))
}

fn gap(expected: u64, received: u64) -> DsError {
    let mut e = DsError::from(
        ApiError::new(
            ErrorCode::Conflict,
            format!("producer sequence gap: expected {expected}, received {received}"),
        )
        .with("expectedSeq", expected)
        .with("receivedSeq", received),
    );
    e.expected_seq = Some((expected, received));
    e
}

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

    /// Erases the stream's log; its record goes too unless forks of it remain, in which
    /// case it stays marked deleted (returned). The last fork of a deleted source takes
    /// the source's record with it, up the chain.
    async fn ds_erase(
        &self,
        stream: &StreamId,
        mut record: DsRecord,
    ) -> DsResult<Option<DsRecord>> {
        self.store.delete_stream(stream).await?;
        self.ds.forget(stream);
        if record.forks > 0 {
            record.deleted = true;
            self.ds_put_record(stream, &record).await?;
            return Ok(Some(record));
        }
        self.store.put_stream_record(stream, None).await?;
        let mut parent = record.forked_from;
        // A chain is as deep as forks were made one from another; bounded all the same.
        for _ in 0..1024 {
            let Some(name) = parent.take() else { break };
            let Ok(p) = StreamId::new(&name) else { break };
            let Some(text) = self.store.stream_record(&p).await? else {
                break;
            };
            let Ok(mut r) = serde_json::from_str::<DsRecord>(&text) else {
                break;
            };
            r.forks = r.forks.saturating_sub(1);
            if r.deleted && r.forks == 0 {
                self.store.put_stream_record(&p, None).await?;
                parent = r.forked_from;
            } else {
                self.ds_put_record(&p, &r).await?;
            }
        }
        Ok(None)
    }

    async fn ds_put_record(&self, stream: &StreamId, record: &DsRecord) -> DsResult<()> {
        let text = serde_json::to_string(record).unwrap_or_default();
        self.store
            .put_stream_record(stream, Some(text))
            .await
            .map_err(Into::into)
    }

    /// The largest byte chunk one event holds, its payload as base64 within
    /// `--max-payload-bytes`.
    fn ds_chunk(&self) -> usize {
        (self.cfg.max_payload_bytes.saturating_sub(16) / 4) * 3
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

    /// `PUT`: creates the stream (a fork: with its source's messages up to the fork's
    /// position copied first), or answers `false` when it exists with the same configuration
    /// (`CONFLICT` when not).
    pub async fn ds_create(&self, stream: &StreamId, req: Create<'_>) -> DsResult<(bool, Seen)> {
        let writer = self.ds.writer(stream);
        let _held = writer.lock().await;
        // A fork's source, locked (a fork only ever locks its sources after itself).
        let source = match &req.fork {
            Some(f) => {
                if f.source == *stream {
                    return Err(ApiError::invalid("a stream cannot be forked from itself").into());
                }
                let w = self.ds.writer(&f.source);
                let held = w.clone().lock_owned().await;
                let record = match self.ds_record(&f.source).await? {
                    None => return Err(not_found(&f.source)),
                    Some((r, _)) if r.deleted => {
                        return Err(conflict(format!(
                            "stream {} was deleted; it cannot be forked",
                            f.source
                        )));
                    }
                    Some((r, _)) => r,
                };
                Some((f.clone(), record, held))
            }
            None => None,
        };
        let content_type = match (&req.content_type, &source) {
            (Some(ct), _) => ct.clone(),
            (None, Some((_, r, _))) => r.content_type.clone(),
            (None, None) => DEFAULT_CONTENT_TYPE.to_string(),
        };
        let (mut ttl_sec, mut expires_at) = (req.ttl_sec, req.expires_at);
        if let Some((_, r, _)) = &source {
            if !same_type(&r.content_type, &content_type) {
                return Err(conflict(format!(
                    "a fork of {} holds {}, not {content_type}",
                    req.fork.as_ref().map(|f| f.source.as_str()).unwrap_or(""),
                    r.content_type
                )));
            }
            if ttl_sec.is_none() && expires_at.is_none() {
                ttl_sec = r.ttl_sec;
                expires_at = r.expires_at.clone().zip(r.expires_ms);
            }
        }
        // Where the fork starts in its source, and what it copies.
        let copy = match &source {
            Some((f, r, _)) => Some(self.ds_fork_prefix(f, r).await?),
            None => None,
        };
        let fork_at = copy.as_ref().map(|c| c.at);
        if let Some((record, stored)) = self.ds_record(stream).await? {
            let info = self.store.stream_info(stream).await?;
            let fork_matches = match (&req.fork, &record.forked_from) {
                (None, None) => true,
                (Some(f), Some(from)) => {
                    from == f.source.as_str()
                        && (f.offset.is_none() && f.sub == 0 || record.fork_at == fork_at)
                }
                _ => false,
            };
            let same = !record.deleted
                && same_type(&record.content_type, &content_type)
                && record.ttl_sec == ttl_sec
                && record.expires_ms == expires_at.as_ref().map(|e| e.1)
                && (info.closed || record.closed) == req.closed
                && fork_matches;
            if !same {
                let mut e = conflict(if record.deleted {
                    format!("stream {stream} was deleted and forks of it remain")
                } else {
                    format!(
                        "stream {stream} exists with another configuration ({}{}{})",
                        record.content_type,
                        record
                            .ttl_sec
                            .map(|t| format!(", ttl {t} s"))
                            .unwrap_or_default(),
                        if info.closed || record.closed {
                            ", closed"
                        } else {
                            ""
                        }
                    )
                });
                e.tail = Some(Offset {
                    seq: info.head,
                    epoch: info.epoch.clone(),
                });
                return Err(e);
            }
            if !stored {
                self.ds_put_record(stream, &record).await?;
            }
            return Ok((false, Seen { record, info }));
        }
        let record = DsRecord {
            content_type,
            ttl_sec,
            expires_ms: expires_at.as_ref().map(|e| e.1),
            expires_at: expires_at.map(|e| e.0),
            touched_ms: self.ds_now(),
            stream_seq: None,
            producers: BTreeMap::new(),
            closed: req.closed,
            forked_from: req.fork.as_ref().map(|f| f.source.as_str().to_string()),
            fork_at,
            forks: 0,
            deleted: false,
        };
        let msgs = messages(record.is_json(), req.body.bytes, self.ds_chunk(), true)?;
        // Whatever an earlier incarnation left (a log without a record) goes first.
        if self.store.stream_info(stream).await?.head != Seq(0) {
            self.store.delete_stream(stream).await?;
        }
        if let Some(c) = copy {
            for part in c.messages.chunks(MAX_APPEND_EVENTS) {
                self.ds_write(stream, part.to_vec(), None).await?;
            }
        }
        self.ds_put_record(stream, &record).await?;
        if let Some((f, mut r, _held)) = source {
            r.forks += 1;
            self.ds_put_record(&f.source, &r).await?;
        }
        self.ds_write(stream, msgs, None).await?;
        if req.closed {
            self.store.close_stream(stream).await?;
        }
        let info = self.store.stream_info(stream).await?;
        Ok((true, Seen { record, info }))
    }

    /// The messages a fork copies from its source: every message up to the fork's
    /// position, then `sub` more messages (JSON) or the first `sub` bytes of the next one.
    async fn ds_fork_prefix(&self, f: &Fork, source: &DsRecord) -> DsResult<ForkPrefix> {
        let info = self.store.stream_info(&f.source).await?;
        let seen = Seen {
            record: source.clone(),
            info: info.clone(),
        };
        let at = match &f.offset {
            None => info.head,
            Some(start) => {
                if matches!(start, Start::Now) {
                    info.head
                } else {
                    self.ds_position(&seen, start)?
                }
            }
        };
        if f.sub > 0 && f.offset.is_none() {
            return Err(
                ApiError::invalid("Stream-Fork-Sub-Offset needs Stream-Fork-Offset").into(),
            );
        }
        let json = source.is_json();
        let upto = if json { at.0 + f.sub } else { at.0 };
        if upto > info.head.0 {
            return Err(ApiError::invalid(format!(
                "the fork's position is beyond the tail of {}",
                f.source
            ))
            .into());
        }
        let mut messages = Vec::new();
        let mut after = Seq(info.first_seq.0.saturating_sub(1));
        while after.0 < upto {
            let res = self.store.read(&f.source, after, READ_EVENTS).await?;
            let Some(last) = res.events.last().map(|e| e.seq()) else {
                break;
            };
            for e in res.events.iter().filter(|e| e.seq().0 <= upto) {
                messages.push(e.data().to_string());
            }
            after = last;
        }
        if !json && f.sub > 0 {
            let res = self.store.read(&f.source, at, 1).await?;
            let next = res
                .events
                .first()
                .and_then(|e| data_bytes(e.data()).or_else(|| Some(e.data().as_bytes().to_vec())))
                .unwrap_or_default();
            let sub = usize::try_from(f.sub).unwrap_or(usize::MAX);
            if res.events.is_empty() || sub > next.len() {
                return Err(ApiError::invalid(format!(
                    "Stream-Fork-Sub-Offset {} is beyond the message at the fork's offset",
                    f.sub
                ))
                .into());
            }
            messages.push(bytes_data(&next[..sub]));
        }
        Ok(ForkPrefix {
            at: (at.0, f.sub),
            messages,
        })
    }

    /// `POST`: appends (and closes, with `Stream-Closed: true`).
    pub async fn ds_append(&self, stream: &StreamId, req: Append<'_>) -> DsResult<Appended> {
        let writer = self.ds.writer(stream);
        let _held = writer.lock().await;
        let mut record = self.ds_live(stream).await?;
        let info = self.store.stream_info(stream).await?;
        let was_closed = info.closed || record.closed;
        let tail = Offset {
            seq: info.head,
            epoch: info.epoch.clone(),
        };
        let empty = req.body.bytes.is_empty();
        if empty && !req.close {
            return Err(ApiError::invalid("an append needs a body").into());
        }
        if !empty {
            match &req.content_type {
                None => {
                    return Err(ApiError::invalid("an append needs a Content-Type").into());
                }
                Some(ct) if !same_type(ct, &record.content_type) => {
                    return Err(conflict(format!(
                        "stream {stream} holds {}, not {ct}",
                        record.content_type
                    )));
                }
                Some(_) => {}
            }
        }
        // The producer first: a fenced or duplicate producer hears so even on a closed stream.
        let producer_state = req
            .producer
            .as_ref()
            .map(|p| record.producers.get(&p.id).copied());
        if let (Some(claim), Some(state)) = (&req.producer, producer_state)
            && !check_producer(state, claim)?
        {
            let st = state.unwrap_or(Producer {
                epoch: claim.epoch,
                seq: claim.seq,
            });
            return Ok(Appended::Duplicate {
                tail,
                closed: was_closed,
                producer: st,
            });
        }
        if was_closed {
            if empty && req.producer.is_none() {
                return Ok(Appended::Stored {
                    tail,
                    closed: true,
                    producer: None,
                });
            }
            let mut e = DsError::from(
                ApiError::new(
                    ErrorCode::StreamClosed,
                    format!("stream {stream} is closed"),
                )
                .with("lastSeq", info.head.0),
            );
            e.tail = Some(tail);
            e.closed = true;
            return Err(e);
        }
        if let Some(seq) = &req.stream_seq
            && record
                .stream_seq
                .as_ref()
                .is_some_and(|last| seq.as_bytes() <= last.as_bytes())
        {
            return Err(conflict(format!(
                "Stream-Seq {seq} is not above the last one, {}",
                record.stream_seq.as_deref().unwrap_or("")
            )));
        }
        let msgs = if empty {
            Vec::new()
        } else {
            messages(record.is_json(), req.body.bytes, self.ds_chunk(), false)?
        };
        let (last, duplicate) = self.ds_write(stream, msgs, req.producer.as_ref()).await?;
        let mut changed = req.close;
        record.closed |= req.close;
        if let Some(seq) = req.stream_seq {
            record.stream_seq = Some(seq);
            changed = true;
        }
        let mut producer = None;
        if let Some(claim) = &req.producer {
            let st = Producer {
                epoch: claim.epoch,
                seq: claim.seq,
            };
            record.producers.insert(claim.id.clone(), st);
            producer = Some(st);
            changed = true;
        }
        if changed {
            record.touched_ms = self.ds_now();
            self.ds_put_record(stream, &record).await?;
        }
        self.ds.touch(stream, self.ds_now());
        if req.close {
            self.store.close_stream(stream).await?;
        }
        let closed = req.close;
        let tail = Offset {
            seq: last.unwrap_or(info.head),
            epoch: info.epoch,
        };
        match (duplicate, producer) {
            (true, Some(p)) => Ok(Appended::Duplicate {
                tail,
                closed,
                producer: p,
            }),
            _ => Ok(Appended::Stored {
                tail,
                closed,
                producer,
            }),
        }
    }

    /// `HEAD` (and the start of every read): the record and the log's bounds. `touch`: the
    /// request counts as a use for the sliding TTL.
    pub async fn ds_seen(&self, stream: &StreamId, touch: bool) -> DsResult<Seen> {
        let record = self.ds_live(stream).await?;
        let info = self.store.stream_info(stream).await?;
        if touch {
            self.ds.touch(stream, self.ds_now());
        }
        Ok(Seen { record, info })
    }

    /// The seq a read starts after, checked against the log (`410`-worthy when trimmed or of
    /// another epoch).
    pub fn ds_position(&self, seen: &Seen, start: &Start) -> DsResult<Seq> {
        let info = &seen.info;
        match start {
            Start::Beginning => Ok(Seq(info.first_seq.0.saturating_sub(1))),
            Start::Now => Ok(info.head),
            Start::At(o) => {
                if o.epoch != info.epoch {
                    let mut e = DsError::from(
                        ApiError::new(
                            ErrorCode::EpochChanged,
                            "the offset is of an earlier incarnation of the stream; read it \
                             again from the beginning",
                        )
                        .with("epoch", info.epoch.as_str()),
                    );
                    e.status = Some(410);
                    return Err(e);
                }
                if o.seq > info.head {
                    return Err(ApiError::invalid("the offset is beyond the stream's tail").into());
                }
                if o.seq.0 + 1 < info.first_seq.0 {
                    let mut e = DsError::from(
                        ApiError::new(
                            ErrorCode::ReplayWindowTrimmed,
                            "the data at this offset is no longer retained",
                        )
                        .with("firstAvailableSeq", info.first_seq.0),
                    );
                    e.status = Some(410);
                    return Err(e);
                }
                Ok(o.seq)
            }
        }
    }

    /// Up to [`READ_EVENTS`] events after `after`, with the bounds of the same snapshot.
    pub async fn ds_read(
        &self,
        stream: &StreamId,
        after: Seq,
    ) -> DsResult<(StreamInfo, Vec<Arc<Event>>)> {
        let res = self.store.read(stream, after, READ_EVENTS).await?;
        Ok((res.info, res.events))
    }

    /// A listener on the stream's live path from `after`, rung by every commit, close and
    /// erase, and by a drain of this instance (then [`App::ds_draining`] says so and the
    /// read ends, so the client continues elsewhere); the caller reads with
    /// [`App::ds_read`] after registering it.
    pub fn ds_listen(self: &Arc<Self>, stream: &StreamId, epoch: &Epoch, after: Seq) -> DsListener {
        let signal = Signal::new();
        let sub = self
            .hub
            .subscribe(stream.clone(), epoch.clone(), after, signal.clone(), None);
        let id = self.register_connection(&signal);
        DsListener {
            _sub: sub,
            signal,
            app: self.clone(),
            id,
        }
    }

    /// The instance drains: long-polls answer and SSE responses end now.
    pub fn ds_draining(&self) -> bool {
        self.drain.is_refusing()
    }

    /// `DELETE`: erases the log and the record.
    pub async fn ds_delete(&self, stream: &StreamId) -> DsResult<()> {
        let writer = self.ds.writer(stream);
        let _held = writer.lock().await;
        let record = self.ds_live(stream).await?;
        self.ds_erase(stream, record).await.map(drop)
    }
}

/// A stream's events as the bytes a read returns: a JSON stream's messages as one array,
/// any other stream's payloads concatenated (an event published as JSON reads as its text).
pub fn render(record: &DsRecord, events: &[Arc<Event>]) -> Vec<u8> {
    if record.is_json() {
        let mut out =
            Vec::with_capacity(events.iter().map(|e| e.data().len() + 1).sum::<usize>() + 2);
        out.push(b'[');
        for (i, e) in events.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(e.data().as_bytes());
        }
        out.push(b']');
        out
    } else {
        let mut out = Vec::new();
        for e in events {
            match data_bytes(e.data()) {
                Some(b) => out.extend_from_slice(&b),
                None => out.extend_from_slice(e.data().as_bytes()),
            }
        }
        out
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

    #[test]
    fn json_bodies_flatten_one_level() {
        let m =
            |b: &str, create| messages(true, b.as_bytes(), 10, create).map_err(|e| e.error.code);
        assert_eq!(m("{\"a\": 1}", false).unwrap(), vec!["{\"a\":1}"]);
        assert_eq!(m("[1, [2, 3]]", false).unwrap(), vec!["1", "[2,3]"]);
        assert_eq!(m("[[[1]]]", false).unwrap(), vec!["[[1]]"]);
        assert_eq!(m("[]", false), Err(ErrorCode::InvalidRequest));
        assert_eq!(m("[]", true).unwrap(), Vec::<String>::new());
        assert_eq!(m("{", false), Err(ErrorCode::InvalidRequest));
        let bytes = messages(false, &[0, 1, 2, 3, 4], 2, false).unwrap();
        assert_eq!(bytes.len(), 3);
    }

    #[test]
    fn producers_are_fenced_deduplicated_and_gapless() {
        let c = |epoch, seq| ProducerClaim {
            id: "p".into(),
            epoch,
            seq,
        };
        let st = Some(Producer { epoch: 1, seq: 4 });
        assert!(check_producer(None, &c(0, 0)).unwrap());
        assert_eq!(
            check_producer(None, &c(0, 1)).unwrap_err().expected_seq,
            Some((0, 1))
        );
        assert_eq!(
            check_producer(st, &c(0, 9)).unwrap_err().producer_epoch,
            Some(1)
        );
        assert!(check_producer(st, &c(2, 0)).unwrap());
        assert_eq!(
            check_producer(st, &c(2, 1)).unwrap_err().error.code,
            ErrorCode::InvalidRequest
        );
        assert!(!check_producer(st, &c(1, 4)).unwrap());
        assert!(!check_producer(st, &c(1, 0)).unwrap());
        assert!(check_producer(st, &c(1, 5)).unwrap());
        assert_eq!(
            check_producer(st, &c(1, 7)).unwrap_err().expected_seq,
            Some((5, 7))
        );
    }
}
