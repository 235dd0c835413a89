//! Streams as a whole (SPEC §11): batch publish, pages of history before a seq or since a
//! time, erasing a stream and closing it. The store does each atomically; this module groups a
//! batch by stream, applies the history rules (`zerodrop_core::window`) and turns refusals
//! into the typed errors every transport sends.
//!
//! Must not: write a session, or decide a position rule of its own (the window rules are
//! core's).

use foldhash::{HashMap as FastMap, HashMapExt};
use sha2::{Digest, Sha256};
use zerodrop_core::window::{WindowError, before_window, since_window};
use zerodrop_core::{ErrorCode, Seq, StreamId};
use zerodrop_store::{
    AppendOutcome, BatchItem, IdempotencyKey, ReadRange, ReadResult, StoreError, StreamBatch,
    StreamInfo,
};

use super::{App, Hole, Publisher};
use crate::error::ApiError;

/// Most events one batch publish carries.
pub const MAX_BATCH_EVENTS: usize = 1000;

/// One event of a batch, checked: its `data` compact and within the limits.
pub struct BatchEvent {
    pub stream: StreamId,
    pub data: String,
    /// The item's idempotency key (`id`).
    pub id: Option<String>,
}

impl App {
    /// Appends a batch: each stream's events in one commit, contiguous and in request order,
    /// or none of them; the streams do not hold each other back. Answers per event, in
    /// request order. `STORE_UNAVAILABLE` for the whole request only when no stream's part
    /// could be written for that reason.
    pub async fn publish_batch(
        &self,
        events: Vec<BatchEvent>,
    ) -> Result<Vec<Result<AppendOutcome, ApiError>>, ApiError> {
        // The parts in the order their streams first appear; each event's place in its part.
        let mut parts: Vec<StreamBatch> = Vec::with_capacity(events.len());
        let mut part_of: FastMap<StreamId, usize> = FastMap::with_capacity(events.len());
        let mut places = Vec::with_capacity(events.len());
        for e in events {
            let p = *part_of.entry(e.stream.clone()).or_insert_with(|| {
                parts.push(StreamBatch {
                    stream: e.stream.clone(),
                    items: Vec::new(),
                });
                parts.len() - 1
            });
            let idempotency = e.id.map(|key| IdempotencyKey {
                key,
                fingerprint: Sha256::digest(e.data.as_bytes()).into(),
            });
            places.push((p, parts[p].items.len()));
            parts[p].items.push(BatchItem {
                data: e.data,
                idempotency,
            });
        }
        // Each stream's policy (who may publish, its payload limit): a stream's part with an
        // event it refuses is left out of the batch, each of its events answering the refusal
        // (naming the first refused event's `index` in the request). Indexed by part, as
        // `by_part` below.
        let mut refused: Vec<Option<ApiError>> = vec![None; parts.len()];
        for (index, &(p, i)) in places.iter().enumerate() {
            if refused[p].is_some() {
                continue;
            }
            let part = &parts[p];
            if let Err(e) = self.check_publish(&part.stream, &part.items[i].data, Publisher::ApiKey)
            {
                refused[p] = Some(e.with("index", index as u64));
            }
        }
        // `--max-new-streams-per-minute` counts each new stream once; a refused one is left
        // out of the batch and answers its refusal.
        for (i, part) in parts.iter().enumerate() {
            if refused[i].is_some() {
                continue;
            }
            if let Err(e) = self.admit_new_stream(&part.stream, Publisher::ApiKey).await {
                refused[i] = Some(e);
            }
        }
        let names: Vec<StreamId> = parts.iter().map(|p| p.stream.clone()).collect();
        let sent: Vec<usize> = (0..parts.len()).filter(|&i| refused[i].is_none()).collect();
        let batch: Vec<StreamBatch> = parts
            .into_iter()
            .enumerate()
            .filter(|(i, _)| refused[*i].is_none())
            .map(|(_, p)| p)
            .collect();
        let outcomes = if batch.is_empty() {
            Vec::new()
        } else {
            self.store.append_batch(batch).await?
        };
        if !outcomes.is_empty()
            && refused.iter().all(Option::is_none)
            && outcomes
                .iter()
                .all(|o| matches!(o, Err(e) if e.is_unavailable()))
            && let Some(Err(e)) = outcomes.first()
        {
            return Err(ApiError::from(e.clone()));
        }
        let mut by_part: Vec<Option<Result<Vec<AppendOutcome>, StoreError>>> =
            vec![None; names.len()];
        for (p, o) in sent.into_iter().zip(outcomes) {
            by_part[p] = Some(o);
        }
        let published = by_part
            .iter()
            .flatten()
            .filter_map(|r| r.as_ref().ok())
            .flatten()
            .filter(|o| !o.duplicate)
            .count();
        if published > 0 {
            self.metrics.published(published as u64);
        }
        let mut out = Vec::with_capacity(places.len());
        for (p, i) in places {
            let r = match (&refused[p], &by_part[p]) {
                (Some(e), _) => Err(e.clone()),
                (None, Some(Ok(v))) => v
                    .get(i)
                    .cloned()
                    .ok_or_else(|| ApiError::new(ErrorCode::Internal, "a batch answer is missing")),
                (None, Some(Err(e))) => Err(ApiError::from(e.clone())),
                (None, None) => Err(ApiError::new(
                    ErrorCode::Internal,
                    "a batch answer is missing",
                )),
            };
            out.push(r.map_err(|e| e.with("stream", names[p].as_str())));
        }
        Ok(out)
    }

    /// Up to `limit` events before `before`, newest first (`before_window`: the same
    /// refusals a read after a position gets).
    pub async fn read_before(
        &self,
        stream: &StreamId,
        before: Seq,
        epoch: Option<&zerodrop_core::Epoch>,
        limit: usize,
    ) -> Result<ReadResult, ApiError> {
        let res = self
            .store
            .read_range(stream, ReadRange::Before(before), limit)
            .await?;
        if let Err(e) = before_window(before, epoch, &res.info.bounds()) {
            let at = Seq(before.0.saturating_sub(1));
            return Err(Hole::new(stream, at, &e, &res.info).error());
        }
        Ok(res)
    }

    /// The newest `limit` events, newest first: whatever is retained at the head, so never
    /// refused for a trim (only for another epoch).
    pub async fn read_last(
        &self,
        stream: &StreamId,
        epoch: Option<&zerodrop_core::Epoch>,
        limit: usize,
    ) -> Result<ReadResult, ApiError> {
        let res = self
            .store
            .read_range(stream, ReadRange::Before(Seq(u64::MAX)), limit)
            .await?;
        if let Some(e) = epoch
            && *e != res.info.epoch
        {
            let changed = WindowError::EpochChanged {
                current: res.info.epoch.clone(),
            };
            return Err(Hole::new(stream, res.info.head, &changed, &res.info).error());
        }
        Ok(res)
    }

    /// Up to `limit` events from the first one stamped at or after `ts_ms`, in seq order
    /// (`since_window`: refused when trimmed events may belong to the page).
    pub async fn read_since(
        &self,
        stream: &StreamId,
        ts_ms: u64,
        epoch: Option<&zerodrop_core::Epoch>,
        limit: usize,
    ) -> Result<ReadResult, ApiError> {
        let res = self
            .store
            .read_range(stream, ReadRange::Since(ts_ms), limit)
            .await?;
        let found = res.events.first().map(|e| e.seq());
        let bounds = res.info.bounds();
        let checked = match epoch {
            Some(e) if *e != res.info.epoch => Err(WindowError::EpochChanged {
                current: res.info.epoch.clone(),
            }),
            _ => since_window(found, res.info.count, &bounds),
        };
        if let Err(e) = checked {
            let at = Seq(res.info.first_seq.0.saturating_sub(1));
            return Err(Hole::new(stream, at, &e, &res.info).error());
        }
        Ok(res)
    }

    /// Erases the stream's log and idempotency records; it starts again in a new epoch, and
    /// its subscribers are told `EPOCH_CHANGED` (the hub hears of it from the store).
    pub async fn delete_stream(&self, stream: &StreamId) -> Result<StreamInfo, ApiError> {
        self.store
            .delete_stream(stream)
            .await?
            .ok_or_else(|| unknown_stream(stream))
    }

    /// Closes the stream: later appends are refused with `STREAM_CLOSED`, and subscribers get
    /// every event, then `closed`.
    pub async fn close_stream(&self, stream: &StreamId) -> Result<StreamInfo, ApiError> {
        self.store
            .close_stream(stream)
            .await?
            .ok_or_else(|| unknown_stream(stream))
    }
}

fn unknown_stream(stream: &StreamId) -> ApiError {
    ApiError::new(
        ErrorCode::NotFound,
        format!("no stream {stream}: nothing was ever published to it"),
    )
    .with("stream", stream.as_str())
}
