//! Forks and erasure: the messages a fork copies from its source, and erasing a stream,
//! which leaves a record marked deleted while forks of it remain and takes deleted sources
//! with their last fork.

use zerodrop_core::payload::{bytes_data, data_bytes};
use zerodrop_core::{Seq, StreamId};

use super::{DsRecord, DsResult, Fork, READ_EVENTS, Seen, Start};
use crate::app::App;
use crate::error::ApiError;

/// What a fork copies.
pub(super) struct ForkPrefix {
    pub(super) at: (u64, u64),
    pub(super) messages: Vec<String>,
}

impl App {
    /// The messages a fork copies from its source: every message up to the fork's
    /// position, then `sub` more messages (JSON) or the first `sub` bytes of the next one.
    pub(super) async fn ds_fork_prefix(&self, f: &Fork, source: &DsRecord) -> DsResult<ForkPrefix> {
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

    /// Erases the stream's log; its record goes too unless forks of it remain, in which
    /// case it stays marked deleted (returned). The last fork of a deleted source takes
    /// the source's record with it, up the chain.
    pub(super) async fn ds_erase(
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
}
