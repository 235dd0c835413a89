//! The event, encoded exactly once.
//!
//! An event's JSON (`{"stream":…,"seq":…,"epoch":…,"ts":…,"data":…}`) is produced by the store
//! at append time, stored verbatim, and from then on only shared: the SSE `data:` line, the
//! HTTP read responses and the WebSocket frame are all built from these bytes without parsing
//! or re-serialising the payload.

use std::time::Instant;

use bytes::Bytes;

use crate::ids::{Epoch, Seq, StreamId};

#[derive(Clone)]
pub struct Event {
    stream: StreamId,
    seq: Seq,
    epoch: Epoch,
    ts: u64,
    json: Bytes,
    data_start: usize,
    /// When this process made the event durable; `None` for events read back from the store.
    /// Only used to measure publish-to-deliver latency.
    committed_at: Option<Instant>,
}

impl Event {
    /// Encodes a new event. `data` must be compact JSON (see [`crate::json::compact`]).
    pub fn encode(stream: StreamId, seq: Seq, epoch: Epoch, ts: u64, data: &str) -> Event {
        let mut s = String::with_capacity(prefix_len(&stream, seq, &epoch, ts) + data.len() + 1);
        // Stream ids and epochs are restricted to characters that need no JSON escaping.
        s.push_str("{\"stream\":\"");
        s.push_str(stream.as_str());
        s.push_str("\",\"seq\":");
        s.push_str(itoa(seq.0).as_str());
        s.push_str(",\"epoch\":\"");
        s.push_str(epoch.as_str());
        s.push_str("\",\"ts\":");
        s.push_str(itoa(ts).as_str());
        s.push_str(",\"data\":");
        let data_start = s.len();
        s.push_str(data);
        s.push('}');
        Event {
            stream,
            seq,
            epoch,
            ts,
            json: Bytes::from(s),
            data_start,
            committed_at: None,
        }
    }

    /// Rebuilds an event from the bytes [`Event::encode`] produced and the store kept.
    pub fn from_stored(stream: StreamId, seq: Seq, epoch: Epoch, ts: u64, json: Bytes) -> Event {
        let data_start = prefix_len(&stream, seq, &epoch, ts).min(json.len().saturating_sub(1));
        Event {
            stream,
            seq,
            epoch,
            ts,
            json,
            data_start,
            committed_at: None,
        }
    }

    /// The length of the JSON [`Event::encode`] makes of these fields and a `data` of
    /// `data_len` bytes, without encoding it.
    pub fn encoded_len(
        stream: &StreamId,
        seq: Seq,
        epoch: &Epoch,
        ts: u64,
        data_len: usize,
    ) -> usize {
        prefix_len(stream, seq, epoch, ts) + data_len + 1
    }

    pub fn with_committed_at(mut self, at: Instant) -> Event {
        self.committed_at = Some(at);
        self
    }

    pub fn stream(&self) -> &StreamId {
        &self.stream
    }

    pub fn seq(&self) -> Seq {
        self.seq
    }

    pub fn epoch(&self) -> &Epoch {
        &self.epoch
    }

    pub fn ts(&self) -> u64 {
        self.ts
    }

    pub fn committed_at(&self) -> Option<Instant> {
        self.committed_at
    }

    /// The event as JSON, as stored. Its length is what retention counts as `bytes`.
    pub fn json(&self) -> &Bytes {
        &self.json
    }

    /// The event's `data` value as JSON text.
    pub fn data(&self) -> &str {
        let end = self.json.len().saturating_sub(1).max(self.data_start);
        std::str::from_utf8(&self.json[self.data_start..end]).unwrap_or("null")
    }

    /// The WebSocket `event` frame: the stored JSON with `"type":"event"` in front.
    pub fn ws_frame(&self) -> String {
        let body = std::str::from_utf8(&self.json[1..]).unwrap_or("}");
        let mut s = String::with_capacity(self.json.len() + 15);
        s.push_str("{\"type\":\"event\",");
        s.push_str(body);
        s
    }

    /// The `zerodrop.v3` binary `event` frame when the payload is bytes (`{"$base64"}`):
    /// the `event` frame without `data`, LF, the bytes (`crate::frames::binary`).
    pub fn ws_binary_frame(&self) -> Option<Vec<u8>> {
        let bytes = crate::payload::data_bytes(self.data())?;
        const DATA: &str = ",\"data\":";
        let fields = self.json.get(1..self.data_start.checked_sub(DATA.len())?)?;
        let mut header = String::with_capacity(fields.len() + 17);
        header.push_str("{\"type\":\"event\",");
        header.push_str(std::str::from_utf8(fields).ok()?);
        header.push('}');
        Some(crate::frames::binary::frame(&header, &bytes))
    }
}

impl std::fmt::Debug for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Event")
            .field("stream", &self.stream)
            .field("seq", &self.seq)
            .field("epoch", &self.epoch)
            .field("ts", &self.ts)
            .field("data", &self.data())
            .finish()
    }
}

fn prefix_len(stream: &StreamId, seq: Seq, epoch: &Epoch, ts: u64) -> usize {
    const FIXED: usize = r#"{"stream":"","seq":,"epoch":"","ts":,"data":"#.len();
    FIXED + stream.as_str().len() + digits(seq.0) + epoch.as_str().len() + digits(ts)
}

fn digits(mut n: u64) -> usize {
    let mut d = 1;
    while n >= 10 {
        n /= 10;
        d += 1;
    }
    d
}

struct Itoa {
    buf: [u8; 20],
    start: usize,
}

impl Itoa {
    fn as_str(&self) -> &str {
        // Only ASCII digits were written.
        std::str::from_utf8(&self.buf[self.start..]).unwrap_or("0")
    }
}

fn itoa(mut n: u64) -> Itoa {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    Itoa { buf, start: i }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ev(seq: u64, ts: u64, data: &str) -> Event {
        Event::encode(
            StreamId::new("room:1").unwrap(),
            Seq(seq),
            Epoch::parse("00ff00ff00ff00ff").unwrap(),
            ts,
            data,
        )
    }

    #[test]
    fn encodes_the_spec_shape() {
        let e = ev(7, 1700000000123, r#"{"a":[1,2]}"#);
        let v: serde_json::Value = serde_json::from_slice(e.json()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"stream":"room:1","seq":7,"epoch":"00ff00ff00ff00ff","ts":1700000000123u64,"data":{"a":[1,2]}})
        );
        assert_eq!(e.data(), r#"{"a":[1,2]}"#);
        let f: serde_json::Value = serde_json::from_str(&e.ws_frame()).unwrap();
        assert_eq!(f["type"], "event");
        assert_eq!(f["seq"], 7);
        assert_eq!(f["data"]["a"][1], 2);
    }

    proptest! {
        #[test]
        fn stored_events_decode_back(seq in 0u64..u64::MAX, ts in 0u64..u64::MAX, n in -1_000_000i64..1_000_000) {
            let data = format!("{{\"n\":{n}}}");
            let e = ev(seq, ts, &data);
            let back = Event::from_stored(e.stream().clone(), e.seq(), e.epoch().clone(), e.ts(), e.json().clone());
            prop_assert_eq!(back.data(), data.as_str());
            let v: serde_json::Value = serde_json::from_slice(back.json()).unwrap();
            prop_assert_eq!(v["seq"].as_u64(), Some(seq));
            prop_assert_eq!(v["ts"].as_u64(), Some(ts));
        }
    }
}
