//! The consistency check: does a stream's `hash` (`GET /v1/streams/{stream}`) match the chain
//! a client computes over the retained events it reads back (docs/protocol.md, "Stream
//! digest")?
//!
//! The digest covers exactly the events from `firstSeq` to `headSeq`, so the read must see one
//! unchanging log: an append or a trim between reading the info and the last page makes the
//! two disagree without anything being wrong. [`check_stream`] therefore reads the info again
//! after the events and starts over (a bounded number of times) when the log moved.

use serde::Deserialize;
use zerodrop_core::hash::ChainHash;

use crate::error::ClientError;
use crate::http::{HttpClient, StreamInfo};

/// The largest page the server serves.
const PAGE: u32 = 1000;

/// What the check found for one stream.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// The server's `hash` and `count` are those of the events it serves.
    Consistent { count: u64, hash: String },
    /// They are not: the server's digest covers a log other than the one it serves.
    Diverged {
        server_hash: String,
        computed_hash: String,
        server_count: u64,
        computed_count: u64,
    },
}

/// The stream info the check read (the same before and after the events) and its verdict.
#[derive(Clone, Debug)]
pub struct StreamCheck {
    pub info: StreamInfo,
    pub verdict: Verdict,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(transparent)]
    Client(#[from] ClientError),
    /// Every attempt saw the log change (appends or trims) while it was being read.
    #[error("stream {stream} kept changing during {attempts} reads; check again when quieter")]
    Moving { stream: String, attempts: u32 },
}

/// The digest of events given as the exact text served, in seq order.
pub fn chain<S: AsRef<str>>(events: &[S]) -> String {
    let mut h = ChainHash::default();
    for e in events {
        h.push(e.as_ref().as_bytes());
    }
    h.hex()
}

/// Compares the server's `hash`/`count` with the chain over `events` (the retained events as
/// served, in seq order).
pub fn judge<S: AsRef<str>>(info: &StreamInfo, events: &[S]) -> Verdict {
    let computed_hash = chain(events);
    let computed_count = events.len() as u64;
    if computed_hash == info.hash && computed_count == info.count {
        Verdict::Consistent {
            count: computed_count,
            hash: computed_hash,
        }
    } else {
        Verdict::Diverged {
            server_hash: info.hash.clone(),
            computed_hash,
            server_count: info.count,
            computed_count,
        }
    }
}

/// Reads `stream`'s info and every retained event, and judges them; re-reads (at most
/// `attempts` times in all, at least once) while the log moves under the read.
pub async fn check_stream(
    http: &HttpClient,
    stream: &str,
    attempts: u32,
) -> Result<StreamCheck, CheckError> {
    let attempts = attempts.max(1);
    for _ in 0..attempts {
        let before = http.stream_info(stream).await?;
        let Some(events) = read_retained(http, stream, &before).await? else {
            continue;
        };
        let after = http.stream_info(stream).await?;
        if !same_log(&before, &after) {
            continue;
        }
        let verdict = judge(&after, &events);
        return Ok(StreamCheck {
            info: after,
            verdict,
        });
    }
    Err(CheckError::Moving {
        stream: stream.to_string(),
        attempts,
    })
}

fn same_log(a: &StreamInfo, b: &StreamInfo) -> bool {
    a.epoch == b.epoch && a.head_seq == b.head_seq && a.first_seq == b.first_seq
}

#[derive(Deserialize)]
struct SeqOnly {
    seq: u64,
}

/// The events `firstSeq..=headSeq` of `info` as served, or `None` when the log moved while
/// they were read (an epoch change, a trim past `firstSeq`, a seq out of place).
async fn read_retained(
    http: &HttpClient,
    stream: &str,
    info: &StreamInfo,
) -> Result<Option<Vec<String>>, ClientError> {
    let mut out = Vec::new();
    let mut next = info.first_seq;
    // Each page advances by at least one event or ends the loop, so this bound is never the
    // reason it stops on a log that holds still.
    let pages = info.head_seq.saturating_sub(info.first_seq) / u64::from(PAGE) + 2;
    for _ in 0..pages {
        if next > info.head_seq {
            return Ok(Some(out));
        }
        let page = match http.read_events_raw(stream, next - 1, PAGE).await {
            Ok(p) => p,
            Err(e) if e.code() == Some("REPLAY_WINDOW_TRIMMED") => return Ok(None),
            Err(e) => return Err(e),
        };
        if page.epoch != info.epoch || page.events.is_empty() {
            return Ok(None);
        }
        for raw in &page.events {
            let SeqOnly { seq } = serde_json::from_str(raw.get())
                .map_err(|e| ClientError::Protocol(format!("an event without a seq: {e}")))?;
            if seq > info.head_seq {
                break;
            }
            if seq != next {
                return Ok(None);
            }
            out.push(raw.get().to_string());
            next += 1;
        }
    }
    Ok((next > info.head_seq).then_some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(count: u64, hash: &str) -> StreamInfo {
        StreamInfo {
            stream: "s".into(),
            epoch: "00000000000000aa".into(),
            head_seq: count,
            first_seq: 1,
            count,
            bytes: 0,
            hash: hash.into(),
        }
    }

    #[test]
    fn a_tampered_event_list_diverges() {
        let events = [
            r#"{"stream":"s","seq":1,"epoch":"00000000000000aa","ts":1,"data":{"a":1}}"#,
            r#"{"stream":"s","seq":2,"epoch":"00000000000000aa","ts":2,"data":"é"}"#,
        ];
        let good = chain(&events);
        assert_eq!(
            judge(&info(2, &good), &events),
            Verdict::Consistent {
                count: 2,
                hash: good.clone()
            }
        );
        // The same value with other bytes (a space) is another log to the digest.
        let respaced = [
            events[0],
            r#"{"stream":"s","seq":2,"epoch":"00000000000000aa","ts":2,"data": "é"}"#,
        ];
        let Verdict::Diverged {
            server_hash,
            computed_hash,
            server_count,
            computed_count,
        } = judge(&info(2, &good), &respaced)
        else {
            panic!("a changed event must diverge");
        };
        assert_eq!(server_hash, good);
        assert_eq!(computed_hash, chain(&respaced));
        assert_ne!(computed_hash, good);
        assert_eq!((server_count, computed_count), (2, 2));
        // A missing event diverges in hash and count.
        assert_eq!(
            judge(&info(2, &good), &events[..1]),
            Verdict::Diverged {
                server_hash: good.clone(),
                computed_hash: chain(&events[..1]),
                server_count: 2,
                computed_count: 1,
            }
        );
        assert_eq!(chain::<&str>(&[]), "0".repeat(64));
    }
}
