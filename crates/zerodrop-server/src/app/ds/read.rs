//! Reading: what a read or a `HEAD` sees, where a read starts, a page of events, the
//! listener of long-polls and SSE, and the bytes a read returns.

use std::sync::Arc;

use zerodrop_core::payload::data_bytes;
use zerodrop_core::{Epoch, ErrorCode, Event, Seq, StreamId};
use zerodrop_store::StreamInfo;

use super::{DsError, DsRecord, DsResult, READ_EVENTS, Seen, Start};
use crate::app::App;
use crate::error::ApiError;
use crate::live::{Signal, Subscription};

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

impl App {
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
