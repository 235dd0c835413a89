//! The stream operations beyond a single append: a batch (one `APPEND_BATCH` script per
//! stream in a cluster or when appends `WAIT`, so each stream's part is atomic on its own
//! slot, whatever slots the other streams live on, the scripts of one batch running
//! concurrently; on a single server the parts go together, `APPEND_BATCHES`), erasing a
//! stream and closing it.
//!
//! Must not: send one stream's part of a batch twice, or let a script touch another stream's
//! keys (an `APPEND_BATCHES` call, on a single server only, runs each part on its own
//! stream's keys).

use ::redis::Value;
use futures_util::future::join_all;

use zerodrop_core::{Epoch, Seq, StreamId};

use super::Shared;
use super::conn::{Call, as_array, as_str, as_u64, unexpected};
use super::keys::{idem_key, meta_key, publish_hits_key, publish_hits_prefix, publish_index_key};
use super::log::parse_bounds;
use crate::{AppendOutcome, BatchOutcome, StoreError, StoreResult, StreamBatch, StreamInfo};

/// Most items one `APPEND_BATCHES` call carries (a part is never split; Redis runs nothing
/// else while a script runs).
pub(super) const BATCH_CALL_ITEMS: usize = 256;

impl Shared {
    /// Each stream's part in its own script, all sent at once on the multiplexed connection
    /// (the parts are independent: one refused or failed leaves the others as they are, and
    /// each stream's events reach the live channel in seq order from its own script). On a
    /// single server without `WAIT`, the parts go in calls of up to [`BATCH_CALL_ITEMS`] items
    /// that each run one `APPEND_BATCHES` script: the same parts, one script call instead of
    /// one per stream.
    pub(super) async fn append_batch(&self, batch: Vec<StreamBatch>) -> StoreResult<BatchOutcome> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        if self.cluster || self.opts.wait_replicas > 0 {
            return Ok(join_all(batch.iter().map(|part| self.append_part(part))).await);
        }
        let mut calls: Vec<&[StreamBatch]> = Vec::new();
        let (mut start, mut items) = (0, 0);
        for (i, part) in batch.iter().enumerate() {
            if i > start && items + part.items.len() > BATCH_CALL_ITEMS {
                calls.push(&batch[start..i]);
                (start, items) = (i, 0);
            }
            items += part.items.len();
        }
        calls.push(&batch[start..]);
        let outcomes = join_all(calls.into_iter().map(|parts| self.append_parts(parts))).await;
        Ok(outcomes.into_iter().flatten().collect())
    }

    /// Several streams' parts in one `APPEND_BATCHES` call; each part's outcome as
    /// [`Shared::append_part`] would give it.
    async fn append_parts(&self, parts: &[StreamBatch]) -> Vec<StoreResult<Vec<AppendOutcome>>> {
        let tokens: Vec<String> = parts.iter().map(|_| self.origin_token()).collect();
        let mut call = Call::new(&self.scripts.append_batches).arg(parts.len());
        for (part, token) in parts.iter().zip(&tokens) {
            call = call.part(self.part_call(part, token));
        }
        let replies = match self.eval("append batch", &call).await {
            Ok(Value::Array(v)) if v.len() == parts.len() => v,
            other => {
                let e = other.err().unwrap_or_else(|| unexpected("append batch"));
                return parts.iter().map(|_| Err(e.clone())).collect();
            }
        };
        let finished = parts
            .iter()
            .zip(&tokens)
            .zip(replies)
            .map(|((part, token), reply)| self.finish_part(part, token, reply));
        join_all(finished).await
    }

    async fn append_part(&self, part: &StreamBatch) -> StoreResult<Vec<AppendOutcome>> {
        let token = self.origin_token();
        let call = self.part_call(part, &token);
        let waits = self.opts.wait_replicas > 0;
        let reply = if waits {
            self.eval_and_wait(&part.stream, &call).await?
        } else {
            self.eval("append batch", &call).await?
        };
        self.finish_part(part, &token, reply).await
    }

    /// A stream part's `APPEND_BATCH` call.
    fn part_call(&self, part: &StreamBatch, token: &str) -> Call<'_> {
        let stream = &part.stream;
        let mut keys = vec![publish_index_key(stream)];
        let key_of = |k: &str, hits: bool| match hits {
            false => idem_key(stream, k),
            true => publish_hits_key(stream, k),
        };
        for hits in [false, true] {
            for item in &part.items {
                keys.push(match &item.idempotency {
                    Some(k) => key_of(&k.key, hits),
                    None => meta_key(stream),
                });
            }
        }
        let r = self.limits(stream);
        let waits = self.opts.wait_replicas > 0;
        let mut call = self
            .stream_call(&self.scripts.append_batch, stream, keys)
            .arg(self.opts.idempotency_ttl_ms.max(1))
            .arg(r.max_events)
            .arg(r.max_bytes)
            .arg(token)
            .arg(if waits { "1" } else { "0" })
            .arg(part.items.len());
        for item in &part.items {
            let (fp, key) = match &item.idempotency {
                Some(k) => (hex::encode(k.fingerprint), k.key.as_str()),
                None => (String::new(), ""),
            };
            call = call.arg(item.data.as_str()).arg(fp).arg(key);
        }
        call
    }

    /// A stream part's outcome from its `APPEND_BATCH` reply, and what follows a new event:
    /// the highest head noted, the doorbell after `WAIT`, the age index, the key listing.
    async fn finish_part(
        &self,
        part: &StreamBatch,
        token: &str,
        reply: Value,
    ) -> StoreResult<Vec<AppendOutcome>> {
        let stream = &part.stream;
        let waits = self.opts.wait_replicas > 0;
        let v = as_array(reply).ok_or_else(|| unexpected("append batch"))?;
        match v.first().and_then(as_str) {
            Some("reused") => return Err(StoreError::IdempotencyKeyReused),
            Some("closed") => {
                let head = v
                    .get(1)
                    .and_then(as_u64)
                    .ok_or_else(|| unexpected("append batch"))?;
                return Err(StoreError::StreamClosed {
                    last_seq: Seq(head),
                });
            }
            Some("ok") => {}
            _ => return Err(unexpected("append batch")),
        }
        let num = |i: usize| {
            v.get(i)
                .and_then(as_u64)
                .ok_or_else(|| unexpected("append batch"))
        };
        let (ts, indexed, renewed, unlisted, last) = (num(1)?, num(2)?, num(3)?, num(4)?, num(5)?);
        let new_epoch = v.get(6).and_then(as_str).and_then(Epoch::parse);
        if renewed == 1 {
            tracing::warn!(stream = %stream,
                "the stream's log was lost or went back; it starts again in a new epoch");
        }
        let mut outcomes = Vec::with_capacity(part.items.len());
        let mut rest = v.iter().skip(7);
        while let (Some(seq), Some(epoch), Some(dup)) = (rest.next(), rest.next(), rest.next()) {
            let (Some(seq), Some(epoch), Some(dup)) = (
                as_u64(seq),
                as_str(epoch).and_then(Epoch::parse),
                as_u64(dup),
            ) else {
                return Err(unexpected("append batch"));
            };
            outcomes.push(AppendOutcome {
                stream: stream.clone(),
                seq: Seq(seq),
                epoch,
                duplicate: dup == 1,
            });
        }
        if outcomes.len() != part.items.len() {
            return Err(unexpected("append batch"));
        }
        if let Some(epoch) = &new_epoch
            && last > 0
        {
            self.observe(stream, epoch, last);
            if waits {
                self.publish_through(stream, epoch, last, token).await;
            }
            if indexed == 0
                && let Err(e) = self.index(stream, ts).await
            {
                tracing::debug!(stream = %stream, error = %e, "age index not updated");
            }
        } else if waits && let Some(o) = outcomes.iter().max_by_key(|o| o.seq) {
            // Duplicates only: the first attempt may have had its WAIT refused (no doorbell yet).
            self.publish_through(stream, &o.epoch, o.seq.0, token).await;
        }
        if unlisted == 1 {
            self.list_publish_keys(stream).await;
        }
        Ok(outcomes)
    }

    pub(super) async fn delete_stream(&self, stream: &StreamId) -> StoreResult<Option<StreamInfo>> {
        let call = self
            .stream_call(
                &self.scripts.delete,
                stream,
                vec![publish_index_key(stream)],
            )
            .arg(idem_key(stream, ""))
            .arg(publish_hits_prefix(stream));
        let v = as_array(self.eval("delete stream", &call).await?)
            .ok_or_else(|| unexpected("delete stream"))?;
        if v.is_empty() {
            return Ok(None);
        }
        let (info, _) = parse_bounds(stream, &v).ok_or_else(|| unexpected("delete stream"))?;
        self.observe(stream, &info.epoch, 0);
        Ok(Some(info))
    }

    pub(super) async fn close_stream(&self, stream: &StreamId) -> StoreResult<Option<StreamInfo>> {
        let call = self.stream_call(&self.scripts.close, stream, Vec::new());
        let v = as_array(self.eval("close stream", &call).await?)
            .ok_or_else(|| unexpected("close stream"))?;
        if v.is_empty() {
            return Ok(None);
        }
        let (info, _) = parse_bounds(stream, &v).ok_or_else(|| unexpected("close stream"))?;
        Ok(Some(info))
    }
}
