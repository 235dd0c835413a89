//! Creating and appending: a stream's or a fork's `PUT`, and `POST` with its producer,
//! `Stream-Seq` and close rules.

use std::collections::BTreeMap;

use zerodrop_core::payload::bytes_data;
use zerodrop_core::{ErrorCode, Seq, StreamId};

use super::{
    Append, Appended, Create, DEFAULT_CONTENT_TYPE, DsError, DsRecord, DsResult, MAX_APPEND_EVENTS,
    Offset, Producer, ProducerClaim, Seen, conflict, not_found, same_type,
};
use crate::app::App;
use crate::error::ApiError;

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
            // A `PUT` without fork headers only ensures the stream exists, fork or not.
            let fork_matches = match (&req.fork, &record.forked_from) {
                (None, _) => true,
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
        let msgs = messages(
            record.is_json(),
            req.body.bytes,
            self.ds_chunk(stream),
            true,
        )?;
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
            messages(
                record.is_json(),
                req.body.bytes,
                self.ds_chunk(stream),
                false,
            )?
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
}

#[cfg(test)]
mod tests {
    use super::*;

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
