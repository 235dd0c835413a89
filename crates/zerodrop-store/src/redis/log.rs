//! The log: an append (one script: idempotency, seq, `XADD`, trims, bounds, the doorbell;
//! with `WAIT` when appends wait for replicas, and the doorbell rung after it), the reads
//! (bounds, events after a position, the chained digest) and the epoch check that turns a log
//! that vanished or went back into a new epoch.
//!
//! Must not: send an append twice, or publish an event live before `WAIT` confirmed it when
//! appends wait for replicas.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use ::redis::Value;
use bytes::Bytes;
use zerodrop_core::hash::ChainHash;
use zerodrop_core::{Epoch, Event, Seq, StreamId};

use super::conn::{Call, Lua, as_array, as_str, as_u64, unexpected};
use super::keys::{
    BASE_EPOCH_KEY, CHANNEL, STREAMS_INDEX, idem_key, log_key, meta_key, publish_hits_key,
    publish_index_key,
};
use super::{Shared, lock};
use crate::{
    AppendOutcome, AppendRequest, ReadRange, ReadResult, StoreError, StoreResult, StreamInfo,
};

/// Streams whose last seen position this instance remembers (to notice a log going back).
pub(super) const MAX_KNOWN_STREAMS: usize = 100_000;
/// Events one doorbell after `WAIT` publishes at most (a backlog beyond is skipped: the live
/// hub re-reads the log when it sees a seq skipped).
pub(super) const PUBLISH_THROUGH_MAX: u64 = 1_000;

/// Values in the bounds part of a stream script's reply.
pub(super) const BOUNDS_LEN: usize = 7;

/// The bounds part of a stream script's reply: `epoch, head, first, count, bytes, renewed,
/// closed`.
pub(super) fn parse_bounds(stream: &StreamId, v: &[Value]) -> Option<(StreamInfo, bool)> {
    let info = StreamInfo {
        stream: stream.clone(),
        epoch: Epoch::parse(as_str(v.first()?)?)?,
        head: Seq(as_u64(v.get(1)?)?),
        first_seq: Seq(as_u64(v.get(2)?)?),
        count: as_u64(v.get(3)?)?,
        bytes: as_u64(v.get(4)?)?,
        closed: as_u64(v.get(6)?)? == 1,
    };
    Some((info, as_u64(v.get(5)?)? == 1))
}

/// The append script's reply for a new event, `ok <seq> <epoch> <ts> <indexed> <renewed>
/// <unlisted>`, and whether the stream's log was renewed.
fn parse_new(line: &str) -> Option<(Appended, bool)> {
    let mut f = line.split(' ');
    if f.next()? != "ok" {
        return None;
    }
    let seq = f.next()?.parse().ok()?;
    let epoch = Epoch::parse(f.next()?)?;
    let ts = f.next()?.parse().ok()?;
    let mut flag = || match f.next() {
        Some("1") => Some(true),
        Some("0") => Some(false),
        _ => None,
    };
    let (indexed, renewed, unlisted) = (flag()?, flag()?, flag()?);
    f.next().is_none().then_some((
        Appended::New {
            seq,
            epoch,
            ts,
            indexed,
            unlisted,
        },
        renewed,
    ))
}

pub(super) enum Appended {
    New {
        seq: u64,
        epoch: Epoch,
        ts: u64,
        indexed: bool,
        /// The stream is not known to be among those with publish keys yet.
        unlisted: bool,
    },
    Duplicate {
        seq: u64,
        epoch: Epoch,
        unlisted: bool,
    },
    Reused,
    Closed {
        head: u64,
    },
}

impl Shared {
    pub(super) async fn append(&self, req: AppendRequest) -> StoreResult<AppendOutcome> {
        let token = self.origin_token();
        match self.append_once(&req, &token).await {
            Ok(Appended::New {
                seq,
                epoch,
                ts,
                indexed,
                unlisted,
            }) => {
                self.observe(&req.stream, &epoch, seq);
                if self.opts.wait_replicas > 0 {
                    self.publish_through(&req.stream, &epoch, seq, &token).await;
                }
                if !indexed && let Err(e) = self.index(&req.stream, ts).await {
                    // The event is durable; only age retention of this stream waits for the
                    // next append to index it.
                    tracing::debug!(stream = %req.stream, error = %e, "age index not updated");
                }
                if unlisted {
                    self.list_publish_keys(&req.stream).await;
                }
                Ok(AppendOutcome {
                    stream: req.stream,
                    seq: Seq(seq),
                    epoch,
                    duplicate: false,
                })
            }
            Ok(Appended::Duplicate {
                seq,
                epoch,
                unlisted,
            }) => {
                if self.opts.wait_replicas > 0 {
                    // The first attempt may have had its WAIT refused: no doorbell yet.
                    self.publish_through(&req.stream, &epoch, seq, &token).await;
                }
                if unlisted {
                    self.list_publish_keys(&req.stream).await;
                }
                Ok(AppendOutcome {
                    stream: req.stream,
                    seq: Seq(seq),
                    epoch,
                    duplicate: true,
                })
            }
            Ok(Appended::Reused) => Err(StoreError::IdempotencyKeyReused),
            Ok(Appended::Closed { head }) => Err(StoreError::StreamClosed {
                last_seq: Seq(head),
            }),
            Err(e) => Err(e),
        }
    }

    /// A fresh token naming one append of this instance on the live channel.
    pub(super) fn origin_token(&self) -> String {
        let n = self.next_token.fetch_add(1, Ordering::Relaxed);
        format!("{}-{n}", self.instance)
    }

    pub(super) fn known(&self, stream: &StreamId) -> (String, u64) {
        match lock(&self.known).get(stream) {
            Some((e, h)) => (e.to_string(), *h),
            None => (String::new(), 0),
        }
    }

    /// Remembers the highest head seen in an epoch; a later, lower head in the same epoch
    /// means the log went back.
    pub(super) fn observe(&self, stream: &StreamId, epoch: &Epoch, head: u64) {
        let mut known = lock(&self.known);
        if known.len() >= MAX_KNOWN_STREAMS && !known.contains_key(stream) {
            known.clear();
        }
        match known.get_mut(stream) {
            Some((e, h)) if e == epoch => *h = (*h).max(head),
            Some(entry) => *entry = (epoch.clone(), head),
            None => {
                known.insert(stream.clone(), (epoch.clone(), head));
            }
        }
    }

    /// A stream script call with the shared prelude's arguments filled in.
    pub(super) fn stream_call<'a>(
        &self,
        script: &'a Lua,
        stream: &StreamId,
        extra_keys: Vec<String>,
    ) -> Call<'a> {
        let (known_epoch, known_head) = self.known(stream);
        let mut call = Call::new(script).key(meta_key(stream)).key(log_key(stream));
        for k in extra_keys {
            call = call.key(k);
        }
        if !self.cluster {
            call = call.key(BASE_EPOCH_KEY);
        }
        call.arg(stream.as_str())
            .arg(Epoch::generate().as_str())
            .arg(known_epoch)
            .arg(known_head)
            .arg(if self.cluster { "0" } else { "1" })
            .arg(CHANNEL)
    }

    /// `"1"` when appends `WAIT` for replicas: reads then show confirmed events only.
    pub(super) fn waits(&self) -> &'static str {
        if self.opts.wait_replicas > 0 {
            "1"
        } else {
            "0"
        }
    }

    pub(super) fn renewed(&self, stream: &StreamId, info: &StreamInfo) {
        tracing::warn!(
            stream = %stream,
            epoch = %info.epoch,
            "the stream's log was lost or went back; it starts again in a new epoch"
        );
    }

    pub(super) async fn info(&self, stream: &StreamId) -> StoreResult<StreamInfo> {
        let call = self
            .stream_call(&self.scripts.info, stream, Vec::new())
            .arg(self.waits());
        let v =
            as_array(self.eval("stream info", &call).await?).ok_or_else(|| unexpected("info"))?;
        let (info, renewed) = parse_bounds(stream, &v).ok_or_else(|| unexpected("info"))?;
        if renewed {
            self.renewed(stream, &info);
        }
        self.observe(stream, &info.epoch, info.head.0);
        Ok(info)
    }

    pub(super) async fn read(
        &self,
        stream: &StreamId,
        range: ReadRange,
        limit: i64,
    ) -> StoreResult<ReadResult> {
        let (position, mode) = match range {
            ReadRange::After(s) => (s.0, "a"),
            ReadRange::Before(s) => (s.0, "b"),
            ReadRange::Since(ts) => (ts, "s"),
        };
        let call = self
            .stream_call(&self.scripts.read, stream, Vec::new())
            .arg(position)
            .arg(limit)
            .arg(self.waits())
            .arg(mode);
        let v = as_array(self.eval("read", &call).await?).ok_or_else(|| unexpected("read"))?;
        let (info, renewed) = parse_bounds(stream, &v).ok_or_else(|| unexpected("read"))?;
        if renewed {
            self.renewed(stream, &info);
        }
        self.observe(stream, &info.epoch, info.head.0);
        let mut events = Vec::with_capacity(v.len().saturating_sub(BOUNDS_LEN) / 3);
        let mut rest = v.into_iter().skip(BOUNDS_LEN);
        while let Some(seq) = rest.next() {
            let (Some(seq), Some(ts), Some(Value::BulkString(json))) = (
                as_u64(&seq),
                rest.next().as_ref().and_then(as_u64),
                rest.next(),
            ) else {
                return Err(unexpected("read"));
            };
            events.push(Arc::new(Event::from_stored(
                stream.clone(),
                Seq(seq),
                info.epoch.clone(),
                ts,
                Bytes::from(json),
            )));
        }
        Ok(ReadResult { info, events })
    }

    pub(super) async fn append_once(
        &self,
        req: &AppendRequest,
        token: &str,
    ) -> StoreResult<Appended> {
        let keys = match &req.idempotency {
            Some(k) => vec![
                idem_key(&req.stream, &k.key),
                publish_hits_key(&req.stream, &k.key),
                publish_index_key(&req.stream),
            ],
            None => Vec::new(),
        };
        let r = self.limits(&req.stream);
        let waits = self.opts.wait_replicas > 0;
        // The trailing arguments only as far as this append needs them (`lua::APPEND`).
        let mut call = self
            .stream_call(&self.scripts.append, &req.stream, keys)
            .arg(req.data.as_str())
            .arg(r.max_events)
            .arg(r.max_bytes)
            .arg(token);
        call = match self.redis_now_ms() {
            Some(ms) => call.arg(ms),
            None => call.arg(""),
        };
        if waits || req.idempotency.is_some() {
            call = call.arg(if waits { "1" } else { "0" });
        }
        if let Some(k) = &req.idempotency {
            call = call
                .arg(hex::encode(k.fingerprint))
                .arg(self.opts.idempotency_ttl_ms.max(1))
                .arg(k.key.as_str());
        }
        let reply = match &self.wait_conn {
            None if self.opts.wait_replicas == 0 => self.eval("append", &call).await?,
            _ => self.eval_and_wait(&req.stream, &call).await?,
        };
        if let Some(line) = as_str(&reply) {
            let (appended, renewed) = parse_new(line).ok_or_else(|| unexpected("append"))?;
            if renewed && let Appended::New { epoch, .. } = &appended {
                tracing::warn!(stream = %req.stream, epoch = %epoch,
                    "the stream's log was lost or went back; it starts again in a new epoch");
            }
            return Ok(appended);
        }
        let v = as_array(reply).ok_or_else(|| unexpected("append"))?;
        match v.first().and_then(as_str) {
            Some("dup") => {
                let (Some(seq), Some(epoch), Some(unlisted)) = (
                    v.get(1).and_then(as_u64),
                    v.get(2).and_then(as_str).and_then(Epoch::parse),
                    v.get(3).and_then(as_u64),
                ) else {
                    return Err(unexpected("append"));
                };
                Ok(Appended::Duplicate {
                    seq,
                    epoch,
                    unlisted: unlisted == 1,
                })
            }
            Some("reused") => Ok(Appended::Reused),
            Some("closed") => Ok(Appended::Closed {
                head: v
                    .get(1)
                    .and_then(as_u64)
                    .ok_or_else(|| unexpected("append"))?,
            }),
            _ => Err(unexpected("append")),
        }
    }

    /// The append script and `WAIT` in one pipeline (see [`Shared::eval_waiting`]); an append
    /// or a duplicate that fewer replicas than asked acknowledged answers `Unavailable`.
    pub(super) async fn eval_and_wait(
        &self,
        stream: &StreamId,
        call: &Call<'_>,
    ) -> StoreResult<Value> {
        let (script, acked) = self.eval_waiting("append", &meta_key(stream), call).await?;
        let n = self.opts.wait_replicas;
        let timeout_ms = self.opts.wait_timeout.as_millis() as u64;
        // A new event's reply is one string starting `ok `; the others are arrays.
        let kind = match &script {
            Value::Array(v) => v.first().and_then(as_str),
            one => as_str(one).and_then(|s| s.split(' ').next()),
        };
        // Every acknowledgement waits: a new event, and a duplicate as well, since the
        // original it points at may not be replicated yet (the script made a write after it
        // for this `WAIT` to cover).
        if acked < u64::from(n) {
            match kind {
                Some("ok") => {
                    return Err(StoreError::Unavailable(format!(
                        "redis: the append reached {acked} of {n} replicas within {timeout_ms} ms \
                         (it is in the log but its durability is not confirmed; retry with an idempotency key)"
                    )));
                }
                Some("dup") => {
                    return Err(StoreError::Unavailable(format!(
                        "redis: the earlier append with this idempotency key reached {acked} of {n} \
                         replicas within {timeout_ms} ms (its durability is not confirmed; retry later)"
                    )));
                }
                _ => {}
            }
        }
        Ok(script)
    }

    /// The doorbell of an append that `WAIT`ed, rung once `WAIT` confirmed it (see
    /// `lua::PUBLISH_THROUGH`). A failure here loses no event: it is durable, and subscribers
    /// get it with the next doorbell of its stream (the hub re-reads the log on a skipped seq)
    /// or when they next read the log.
    pub(super) async fn publish_through(
        &self,
        stream: &StreamId,
        epoch: &Epoch,
        seq: u64,
        token: &str,
    ) {
        let call = Call::new(&self.scripts.publish_through)
            .key(meta_key(stream))
            .key(log_key(stream))
            .arg(stream.as_str())
            .arg(epoch.as_str())
            .arg(seq)
            .arg(CHANNEL)
            .arg(token)
            .arg(PUBLISH_THROUGH_MAX);
        if let Err(e) = self.eval("live doorbell", &call).await {
            tracing::debug!(stream = %stream, seq, error = %e, "live doorbell not rung");
        }
    }

    /// Adds a stream to the age index (once per incarnation of its log), scored by its oldest
    /// event's ts plus its [`Shared::age_shift`].
    pub(super) async fn index(&self, stream: &StreamId, ts: u64) -> StoreResult<()> {
        let mut conn = self.conn.clone();
        let score = ts.saturating_add(self.age_shift(stream));
        self.run("index", async {
            ::redis::cmd("ZADD")
                .arg(STREAMS_INDEX)
                .arg("LT")
                .arg(score)
                .arg(stream.as_str())
                .query_async::<Value>(&mut conn)
                .await
        })
        .await?;
        self.eval(
            "index",
            &Call::new(&self.scripts.indexed).key(meta_key(stream)),
        )
        .await?;
        Ok(())
    }

    pub(super) async fn digest(&self, stream: &StreamId) -> StoreResult<(StreamInfo, String)> {
        let r = self.read(stream, ReadRange::After(Seq(0)), -1).await?;
        let mut h = ChainHash::default();
        for e in &r.events {
            h.push(e.json());
        }
        Ok((r.info, h.hex()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_events_reply_is_read_field_by_field() {
        let (a, renewed) = parse_new("ok 42 e_1a2b 1765000000123 1 0 1").unwrap();
        assert!(!renewed);
        let Appended::New {
            seq,
            epoch,
            ts,
            indexed,
            unlisted,
        } = a
        else {
            panic!("not a new event");
        };
        assert_eq!(
            (seq, epoch.as_str(), ts, indexed, unlisted),
            (42, "e_1a2b", 1_765_000_000_123, true, true)
        );
        assert!(parse_new("ok 1 e 2 0 1 0").unwrap().1);
    }

    #[test]
    fn a_reply_that_is_not_exactly_seven_fields_is_refused() {
        for bad in [
            "",
            "ok",
            "dup 1 e 2 0 0 0",
            "ok 1 e 2 0 0",
            "ok 1 e 2 0 0 0 0",
            "ok x e 2 0 0 0",
            "ok 1 e -2 0 0 0",
            "ok 1 e 2 2 0 0",
            "ok 1 e 2 0 yes 0",
            "ok 1 e|x 2 0 0 0",
            "ok  1 e 2 0 0 0",
        ] {
            assert!(parse_new(bad).is_none(), "{bad:?}");
        }
    }
}
