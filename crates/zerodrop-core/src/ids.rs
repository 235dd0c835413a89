//! Identifiers: stream ids, sequence numbers, epochs and session ids.
//!
//! Stream ids are validated once, at the edge, and then carried as [`StreamId`]; nothing past
//! the edge re-checks them. Because the allowed alphabet (`[A-Za-z0-9_.:-]`) needs no JSON
//! escaping, stream ids and epochs can be written into JSON verbatim.

use std::fmt;
use std::sync::Arc;

use base64::Engine;
use serde::{Deserialize, Serialize};

/// Longest allowed stream id, in bytes.
pub const MAX_STREAM_ID_LEN: usize = 128;

/// A validated stream id: `[A-Za-z0-9_.:-]{1,128}`. Cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamId(Arc<str>);

/// The reason a string is not a stream id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidStreamId {
    #[error("stream id is empty")]
    Empty,
    #[error("stream id is longer than {MAX_STREAM_ID_LEN} bytes")]
    TooLong,
    #[error("stream id may only contain A-Z a-z 0-9 _ . : -")]
    BadChar,
}

impl StreamId {
    pub fn new(s: &str) -> Result<Self, InvalidStreamId> {
        Self::validate(s)?;
        Ok(Self(Arc::from(s)))
    }

    pub fn validate(s: &str) -> Result<(), InvalidStreamId> {
        if s.is_empty() {
            return Err(InvalidStreamId::Empty);
        }
        if s.len() > MAX_STREAM_ID_LEN {
            return Err(InvalidStreamId::TooLong);
        }
        if !s.bytes().all(is_stream_byte) {
            return Err(InvalidStreamId::BadChar);
        }
        Ok(())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn is_stream_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-')
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StreamId({})", &self.0)
    }
}

impl std::borrow::Borrow<str> for StreamId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl Serialize for StreamId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for StreamId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        StreamId::new(&s).map_err(serde::de::Error::custom)
    }
}

/// A per-stream sequence number. The first event of a stream is 1; 0 means "before the first".
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Seq(pub u64);

impl Seq {
    pub const ZERO: Seq = Seq(0);

    pub fn next(self) -> Seq {
        Seq(self.0 + 1)
    }

    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// One incarnation of a stream's log: 16 lowercase hex digits, opaque to clients.
///
/// A new epoch is minted whenever a log may have lost events it once acknowledged (a new
/// database file, a Redis that came back empty); positions from another epoch mean nothing.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Epoch(Arc<str>);

impl Epoch {
    pub fn generate() -> Epoch {
        Epoch(Arc::from(hex::encode(crate::random_bytes::<8>())))
    }

    /// Accepts what [`Epoch::generate`] produces (and, for forward compatibility, any
    /// 1–64 characters of `[A-Za-z0-9_-]`, which keeps it safe inside JSON and SSE ids).
    pub fn parse(s: &str) -> Option<Epoch> {
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        ok.then(|| Epoch(Arc::from(s)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Epoch({})", &self.0)
    }
}

/// A session id: `s_`, the creation time (milliseconds since the Unix epoch, 12 hex digits),
/// then 128 random bits (base64url without padding). The time first makes new ids sort after
/// older ones, so a store's index takes each new session at its end (a few pages written per
/// batch of sessions, not one page per session); the random bits make it unguessable.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SessionId(Arc<str>);

impl SessionId {
    pub fn generate() -> SessionId {
        use crate::clock::Clock;
        let now = crate::clock::SystemClock.now_ms() & 0xFFFF_FFFF_FFFF;
        let raw = crate::random_bytes::<16>();
        let enc = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw);
        SessionId(Arc::from(format!("s_{now:012x}{enc}")))
    }

    /// Accepts any plausible id (`[A-Za-z0-9_-]{1,64}`); unknown ids are the store's answer.
    pub fn parse(s: &str) -> Option<SessionId> {
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        ok.then(|| SessionId(Arc::from(s)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionId({})", &self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_ids_follow_the_spec_alphabet() {
        for ok in [
            "call:42",
            "room:abc",
            "user:7",
            "a",
            "A-Z_0.9:x",
            &"x".repeat(128),
        ] {
            assert!(StreamId::new(ok).is_ok(), "{ok}");
        }
        assert_eq!(StreamId::new(""), Err(InvalidStreamId::Empty));
        assert_eq!(
            StreamId::new(&"x".repeat(129)),
            Err(InvalidStreamId::TooLong)
        );
        for bad in ["a b", "a/b", "ü", "a\"b", "a\\b", "room*", "a\nb"] {
            assert_eq!(StreamId::new(bad), Err(InvalidStreamId::BadChar), "{bad:?}");
        }
    }

    #[test]
    fn generated_ids_are_distinct_and_parse_back() {
        let a = SessionId::generate();
        let b = SessionId::generate();
        assert_ne!(a, b);
        assert_eq!(a.as_str().len(), 2 + 12 + 22);
        // Later ids sort after earlier ones (the store's index appends them).
        std::thread::sleep(std::time::Duration::from_millis(2));
        let c = SessionId::generate();
        assert!(c.as_str() > a.as_str() && c.as_str() > b.as_str());
        assert_eq!(SessionId::parse(a.as_str()), Some(a));
        let e = Epoch::generate();
        assert_eq!(e.as_str().len(), 16);
        assert_eq!(Epoch::parse(e.as_str()), Some(e));
        assert_eq!(Epoch::parse("a:b"), None);
    }
}
