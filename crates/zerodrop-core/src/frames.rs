//! The WebSocket wire frames of SPEC §4, typed once for both ends.
//!
//! The server encodes [`ServerFrame`]s and decodes [`ClientFrame`]s; the Rust SDK does the
//! opposite with the same types, so the two cannot drift. Both enums serialise with
//! `#[serde(tag = "type")]`: one struct per frame, the tag beside its fields.
//!
//! Decoding goes through [`ClientFrame::parse`] and [`ServerFrame::parse`] rather than a
//! derived internally-tagged `Deserialize`: such a derive buffers the whole frame first, and a
//! buffered frame can no longer hand out `data` (or a ping's `t`) as raw JSON text, which must
//! reach the log and the echo byte for byte. `parse` reads the tag, then decodes the frame's
//! own struct from the same text. Each struct rejects a field given twice, and the tag pass
//! rejects a `type` given twice.
//!
//! What the server tolerates on the way in stays optional here (an `ack` without `seq`, a
//! `publish` without `data`), so the server can answer it on the stream the frame names. Event
//! frames are not encoded from [`EventFrame`] by the server: an event's frame is built once at
//! append (`Event::ws_frame`) and shared by every subscriber; [`EventFrame`] decodes it.
//!
//! Must not: do I/O, or decide what a frame means (that is the server's and the SDK's).

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

/// Why a frame could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// Not JSON, not an object, a field of the wrong type, a required field missing, or a
    /// field given twice.
    #[error("invalid frame: {0}")]
    Json(#[from] serde_json::Error),
    /// An object without `type`.
    #[error("a frame needs a type")]
    NoType,
    /// A `zerodrop.v3` binary frame without the LF that ends its header, or whose header is
    /// not UTF-8, or of a type that is never binary.
    #[error("invalid binary frame: {0}")]
    Binary(&'static str),
    /// A `type` this side does not know (at most 32 characters of it are kept).
    #[error("unknown frame type {0:?}")]
    UnknownType(String),
}

/// Reads the tag alone; the frame's other fields are skipped here and read by its struct.
#[derive(Deserialize)]
struct Tag<'a> {
    #[serde(rename = "type", borrow, default)]
    ty: Option<Cow<'a, str>>,
}

fn tag(text: &str) -> Result<Cow<'_, str>, FrameError> {
    let t: Tag<'_> = serde_json::from_str(text)?;
    t.ty.ok_or(FrameError::NoType)
}

/// The tag of a frame that starts with it, as every server frame does (`{"type":"…"`,
/// unescaped), read without a pass over the rest; else the full tag pass. Only for frames
/// from the server: it does not notice a second `type` further on, which [`tag`] refuses in
/// what clients send.
fn leading_tag(text: &str) -> Result<Cow<'_, str>, FrameError> {
    if let Some(rest) = text.strip_prefix(r#"{"type":""#)
        && let Some(end) = rest.find(['"', '\\'])
        && rest.as_bytes()[end] == b'"'
    {
        return Ok(Cow::Borrowed(&rest[..end]));
    }
    tag(text)
}

fn unknown(ty: &str) -> FrameError {
    FrameError::UnknownType(ty.chars().take(32).collect())
}

/// A present field is `Some`, even when it is JSON `null` (`"data": null` is a publish of
/// `null`; a missing `data` is a refusal).
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Box<RawValue>>, D::Error> {
    Box::<RawValue>::deserialize(d).map(Some)
}

/// Raw JSON text for a value known to be valid JSON (a number, a serialised value).
pub fn raw(json: String) -> Box<RawValue> {
    RawValue::from_string(json).unwrap_or_else(|_| null())
}

fn null() -> Box<RawValue> {
    // `null` is valid JSON text; the fallback is never taken.
    RawValue::from_string("null".into()).unwrap_or_default()
}

// ---------------------------------------------------------------------------------------
// Client → server
// ---------------------------------------------------------------------------------------

/// Frames a client sends.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ClientFrame {
    Subscribe(Subscribe),
    Unsubscribe(Unsubscribe),
    Ack(Ack),
    Publish(Publish),
    Ping(Ping),
    Pong(Ping),
    /// Only valid as the first frame of a socket opened without credentials.
    Resume(Resume),
    /// A fresh connect token for the connection's subject, answering the server's `refresh`.
    Refresh(Refresh),
}

/// `subscribe`: from after `after` (default: the head), in `epoch` if given. With `presence`,
/// the stream's `presence` frames too, from after `presenceAfter` (default: the presence
/// log's head) in `presenceEpoch` if given.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct Subscribe {
    pub stream: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub presence: bool,
    #[serde(
        rename = "presenceAfter",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub presence_after: Option<u64>,
    #[serde(
        rename = "presenceEpoch",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub presence_epoch: Option<String>,
}

/// A position in a stream's presence log: the last presence `seq` handled, in `epoch`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct PresenceAt {
    pub after: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<String>,
}

/// `unsubscribe`.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Unsubscribe {
    pub stream: String,
}

/// `ack`: one checkpoint `{stream, seq}` (both protocols), or `zerodrop.v2`'s batched
/// `{acks: {stream: seq, …}}`. A frame carrying both, or neither seq, is the server's to
/// refuse; the batch's values stay raw JSON so one bad entry is answered on its own stream.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct Ack {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acks: Option<BTreeMap<String, Value>>,
}

impl Ack {
    /// A single checkpoint.
    pub fn one(stream: impl Into<String>, seq: u64) -> Ack {
        Ack {
            stream: Some(stream.into()),
            seq: Some(seq),
            acks: None,
        }
    }

    /// `zerodrop.v2`'s batched checkpoint.
    pub fn batch(acks: impl IntoIterator<Item = (String, u64)>) -> Ack {
        Ack {
            stream: None,
            seq: None,
            acks: Some(acks.into_iter().map(|(s, n)| (s, Value::from(n))).collect()),
        }
    }
}

/// `publish`: `data` exactly as the client wrote it; `id` (a string or a number) makes the
/// publish idempotent for the session and is echoed in the answer.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Publish {
    pub stream: String,
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub data: Option<Box<RawValue>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Value>,
}

/// `ping` and `pong`, both ways: `t` is echoed verbatim (`null` when absent).
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Ping {
    #[serde(default, deserialize_with = "present")]
    pub t: Option<Box<RawValue>>,
}

impl Ping {
    /// The raw `t` to echo: the one received, or `null`.
    pub fn echo(&self) -> Ping {
        Ping {
            t: Some(self.t.clone().unwrap_or_else(null)),
        }
    }
}

/// `resume`: the newest resume token and, per stream, the highest seq the client handled.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Resume {
    pub resume_token: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_ack: Option<BTreeMap<String, u64>>,
    /// A fresh connect token for the session's subject: needed once the session's own has
    /// passed its `exp` plus the grace (`TOKEN_EXPIRED`), and it becomes the session's
    /// authority.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// The streams whose `presence` frames go on, each from its position.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presence: Option<BTreeMap<String, PresenceAt>>,
}

/// `refresh` (client → server): a new connect token for the same `sub`.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Refresh {
    pub token: String,
}

impl ClientFrame {
    /// Decodes one client frame.
    pub fn parse(text: &str) -> Result<ClientFrame, FrameError> {
        let ty = tag(text)?;
        Ok(match ty.as_ref() {
            "subscribe" => ClientFrame::Subscribe(serde_json::from_str(text)?),
            "unsubscribe" => ClientFrame::Unsubscribe(serde_json::from_str(text)?),
            "ack" => ClientFrame::Ack(serde_json::from_str(text)?),
            "publish" => ClientFrame::Publish(serde_json::from_str(text)?),
            "ping" => ClientFrame::Ping(serde_json::from_str(text)?),
            "pong" => ClientFrame::Pong(serde_json::from_str(text)?),
            "resume" => ClientFrame::Resume(serde_json::from_str(text)?),
            "refresh" => ClientFrame::Refresh(serde_json::from_str(text)?),
            other => return Err(unknown(other)),
        })
    }

    pub fn to_json(&self) -> String {
        to_json(self)
    }
}

// ---------------------------------------------------------------------------------------
// Server → client
// ---------------------------------------------------------------------------------------

/// Frames the server sends.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ServerFrame {
    Welcome(Welcome),
    Subscribed(Subscribed),
    Unsubscribed(Unsubscribe),
    Event(EventFrame),
    /// A member joined or left the stream (subscribed with `presence`).
    Presence(PresenceFrame),
    Ping(Ping),
    Pong(Ping),
    /// The instance drains: reconnect (elsewhere) with this token after `retryAfterMs`.
    Reconnect(Reconnect),
    Error(ErrorFrame),
    Published(Published),
    /// A refreshed resume token.
    Token(Token),
    /// The connect token behind this connection expires: answer `refresh {token}` before
    /// `deadline`.
    Refresh(RefreshAsk),
    /// The stream was closed: every event up to `lastSeq` was sent before this frame, and
    /// none will follow. The subscription has ended (it is no error: nothing to resync).
    Closed(Closed),
    /// A frame type this side does not know: servers may add frame types, and clients ignore
    /// them. Never sent.
    #[serde(skip)]
    Unknown(String),
}

/// `welcome`: the session this socket holds and how to resume it.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Welcome {
    pub session_id: String,
    pub resume_token: String,
    #[serde(default)]
    pub reconnect_window_sec: u64,
    #[serde(default)]
    pub instance: String,
    #[serde(default)]
    pub protocol: String,
}

/// `subscribed`: events follow from `fromSeq`; history runs to `headSeq`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Subscribed {
    pub stream: String,
    #[serde(default)]
    pub epoch: String,
    #[serde(default)]
    pub head_seq: u64,
    #[serde(default)]
    pub from_seq: u64,
    /// With `presence`: the presence log's epoch, and the seq its frames follow from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presence_epoch: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presence_seq: Option<u64>,
}

/// `presence`: entry `seq` of the stream's presence log (its own seqs and epoch).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct PresenceFrame {
    pub stream: String,
    pub seq: u64,
    #[serde(default)]
    pub epoch: String,
    /// `join` or `leave`.
    pub action: String,
    pub member: PresenceMember,
}

/// A member of a stream's presence: a session of `sub`, with its token's public `info`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PresenceMember {
    pub sub: String,
    pub session_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<Value>,
    /// When it joined (Unix ms).
    #[serde(default)]
    pub since: u64,
}

/// One event, as every transport carries it: `{stream, seq, epoch, ts, data}`.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct EventFrame {
    pub stream: String,
    pub seq: u64,
    #[serde(default)]
    pub epoch: String,
    #[serde(default)]
    pub ts: u64,
    /// The payload exactly as published (JSON text).
    pub data: Box<RawValue>,
}

/// `reconnect`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Reconnect {
    #[serde(default)]
    pub reason: String,
    pub resume_token: String,
    #[serde(default)]
    pub retry_after_ms: u64,
}

/// `closed`: the stream ends at `lastSeq` (SSE: `event: closed` with the same data).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Closed {
    pub stream: String,
    pub last_seq: u64,
}

/// `token`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Token {
    pub resume_token: String,
}

/// `refresh` (server → client): the connect token behind the connection expires at `exp`
/// (Unix seconds); without a fresh one by `deadline` (`exp` + the grace) the connection
/// closes with `TOKEN_EXPIRED`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct RefreshAsk {
    pub exp: u64,
    pub deadline: u64,
}

/// `published`: the answer to a `publish`. `seq` is `null` when the stream is bound to an
/// upstream (the event waits for it: `jobId`); `id` echoes the frame's id (`null` if none).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Published {
    pub stream: String,
    #[serde(default)]
    pub seq: Option<u64>,
    #[serde(default)]
    pub id: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<u64>,
}

/// `error`: a stream-level error (the socket stays open) or a session-level one (the close
/// frame follows). The facts every client reads are typed; any other fact the server adds
/// (`limit`, `retryAfterMs`, …) is kept in `extra`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ErrorFrame {
    #[serde(default)]
    pub code: String,
    #[serde(default)]
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<String>,
    /// The stream's current epoch, on `EPOCH_CHANGED`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<String>,
    /// On `REPLAY_WINDOW_TRIMMED`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_available_seq: Option<u64>,
    /// On `ACK_BEYOND_HEAD`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_seq: Option<u64>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl ErrorFrame {
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> ErrorFrame {
        ErrorFrame {
            code: code.into(),
            message: message.into(),
            ..ErrorFrame::default()
        }
    }

    /// Adds one fact: a typed field when it is one (and of its type), else an extra.
    pub fn with_fact(mut self, key: &str, value: Value) -> ErrorFrame {
        match (key, &value) {
            ("stream", Value::String(s)) => self.stream = Some(s.clone()),
            ("epoch", Value::String(s)) => self.epoch = Some(s.clone()),
            ("firstAvailableSeq", Value::Number(n)) if n.is_u64() => {
                self.first_available_seq = n.as_u64()
            }
            ("headSeq", Value::Number(n)) if n.is_u64() => self.head_seq = n.as_u64(),
            _ => {
                self.extra.insert(key.to_string(), value);
            }
        }
        self
    }
}

impl ServerFrame {
    /// Decodes one server frame; an unknown `type` is [`ServerFrame::Unknown`], not an error.
    /// One pass for a frame that starts with its tag (every frame the server writes: events
    /// are the SDK's hot path), two otherwise.
    pub fn parse(text: &str) -> Result<ServerFrame, FrameError> {
        let ty = leading_tag(text)?;
        Ok(match ty.as_ref() {
            "event" => ServerFrame::Event(serde_json::from_str(text)?),
            "presence" => ServerFrame::Presence(serde_json::from_str(text)?),
            "welcome" => ServerFrame::Welcome(serde_json::from_str(text)?),
            "subscribed" => ServerFrame::Subscribed(serde_json::from_str(text)?),
            "unsubscribed" => ServerFrame::Unsubscribed(serde_json::from_str(text)?),
            "ping" => ServerFrame::Ping(serde_json::from_str(text)?),
            "pong" => ServerFrame::Pong(serde_json::from_str(text)?),
            "reconnect" => ServerFrame::Reconnect(serde_json::from_str(text)?),
            "error" => ServerFrame::Error(serde_json::from_str(text)?),
            "published" => ServerFrame::Published(serde_json::from_str(text)?),
            "token" => ServerFrame::Token(serde_json::from_str(text)?),
            "refresh" => ServerFrame::Refresh(serde_json::from_str(text)?),
            "closed" => ServerFrame::Closed(serde_json::from_str(text)?),
            other => ServerFrame::Unknown(other.chars().take(32).collect()),
        })
    }

    pub fn to_json(&self) -> String {
        to_json(self)
    }
}

/// `zerodrop.v3`'s binary frames, for byte payloads (`crate::payload`): the frame's header as
/// one line of compact JSON (an `event` or `publish` frame without `data`), one LF, then the
/// payload's bytes exactly. Compact JSON escapes every control character, so the first LF
/// ends the header.
pub mod binary {
    use super::{ClientFrame, EventFrame, FrameError, ServerFrame};
    use crate::payload::bytes_value;
    use serde::Deserialize;

    /// The subprotocol that has binary frames.
    pub const PROTOCOL: &str = "zerodrop.v3";

    /// A binary frame: `header`, LF, `bytes`.
    pub fn frame(header: &str, bytes: &[u8]) -> Vec<u8> {
        let mut f = Vec::with_capacity(header.len() + 1 + bytes.len());
        f.extend_from_slice(header.as_bytes());
        f.push(b'\n');
        f.extend_from_slice(bytes);
        f
    }

    /// A binary frame's header and payload.
    pub fn split(frame: &[u8]) -> Result<(&str, &[u8]), FrameError> {
        let lf = frame
            .iter()
            .position(|&b| b == b'\n')
            .ok_or(FrameError::Binary("no LF ends the header"))?;
        let header = std::str::from_utf8(&frame[..lf])
            .map_err(|_| FrameError::Binary("the header is not UTF-8"))?;
        Ok((header, &frame[lf + 1..]))
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct EventHeader {
        #[serde(rename = "type")]
        _ty: String,
        stream: String,
        seq: u64,
        #[serde(default)]
        epoch: String,
        #[serde(default)]
        ts: u64,
    }

    impl ServerFrame {
        /// Decodes a binary server frame: an `event` whose `data` is the payload as
        /// `{"$base64"}`, the same frame a v2 text frame of that event gives.
        pub fn parse_binary(frame: &[u8]) -> Result<ServerFrame, FrameError> {
            let (header, bytes) = split(frame)?;
            let ty = super::leading_tag(header)?;
            if ty != "event" {
                return Err(FrameError::Binary("only an event is a binary server frame"));
            }
            let h: EventHeader = serde_json::from_str(header)?;
            Ok(ServerFrame::Event(EventFrame {
                stream: h.stream,
                seq: h.seq,
                epoch: h.epoch,
                ts: h.ts,
                data: bytes_value(bytes),
            }))
        }
    }

    impl ClientFrame {
        /// Decodes a binary client frame: a `publish` without `data` in its header, the
        /// payload as its `data`.
        pub fn parse_binary(frame: &[u8]) -> Result<ClientFrame, FrameError> {
            let (header, bytes) = split(frame)?;
            match ClientFrame::parse(header)? {
                ClientFrame::Publish(mut p) if p.data.is_none() => {
                    p.data = Some(bytes_value(bytes));
                    Ok(ClientFrame::Publish(p))
                }
                ClientFrame::Publish(_) => Err(FrameError::Binary(
                    "a binary publish carries its data after the header, not in it",
                )),
                _ => Err(FrameError::Binary(
                    "only a publish is a binary client frame",
                )),
            }
        }

        /// A binary `publish` of `bytes` (`data` is ignored).
        pub fn publish_binary(
            stream: &str,
            id: Option<serde_json::Value>,
            bytes: &[u8],
        ) -> Vec<u8> {
            let header = ClientFrame::Publish(super::Publish {
                stream: stream.to_string(),
                data: None,
                id,
            })
            .to_json();
            frame(&header, bytes)
        }
    }

    impl EventFrame {
        /// The payload's bytes when it is a byte payload (`{"$base64"}`), whichever frame
        /// carried it.
        pub fn bytes(&self) -> Option<Vec<u8>> {
            crate::payload::data_bytes(self.data.get())
        }
    }
}

fn to_json<T: Serialize>(frame: &T) -> String {
    // Strings, integers, raw JSON and maps with string keys always serialise; only
    // `ServerFrame::Unknown`, which is never built for sending, could fail.
    serde_json::to_string(frame).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn value(s: &str) -> Value {
        serde_json::from_str(s).unwrap()
    }

    #[test]
    fn server_frames_round_trip_with_the_wire_names() {
        let frames = [
            r#"{"type":"welcome","sessionId":"s_1","resumeToken":"v1.k.p.s","reconnectWindowSec":900,"instance":"i1","protocol":"zerodrop.v1"}"#,
            r#"{"type":"subscribed","stream":"a","epoch":"e","headSeq":3,"fromSeq":4}"#,
            r#"{"type":"unsubscribed","stream":"a"}"#,
            r#"{"type":"event","stream":"room:1","seq":7,"epoch":"ab","ts":5,"data":{"a":[1, 2]}}"#,
            r#"{"type":"ping","t":12}"#,
            r#"{"type":"pong","t":{"x":1.50}}"#,
            r#"{"type":"reconnect","reason":"draining","resumeToken":"x","retryAfterMs":50}"#,
            r#"{"type":"error","code":"REPLAY_WINDOW_TRIMMED","message":"m","stream":"a","firstAvailableSeq":9}"#,
            r#"{"type":"error","code":"RATE_LIMITED","message":"m","retryAfterMs":1000}"#,
            r#"{"type":"published","stream":"a","seq":1,"id":"p-1"}"#,
            r#"{"type":"published","stream":"a","seq":null,"id":null,"jobId":4}"#,
            r#"{"type":"token","resumeToken":"x"}"#,
        ];
        for f in frames {
            let parsed = ServerFrame::parse(f).unwrap();
            assert_eq!(value(&parsed.to_json()), value(f), "{f}");
        }
        // Raw JSON stays as written.
        let ServerFrame::Event(e) = ServerFrame::parse(frames[3]).unwrap() else {
            panic!()
        };
        assert_eq!(e.data.get(), r#"{"a":[1, 2]}"#);
        let ServerFrame::Pong(p) = ServerFrame::parse(frames[5]).unwrap() else {
            panic!()
        };
        assert_eq!(p.t.unwrap().get(), r#"{"x":1.50}"#);
    }

    #[test]
    fn unknown_server_frames_are_tolerated_and_broken_ones_are_not() {
        assert!(
            matches!(ServerFrame::parse(r#"{"type":"typing","x":1}"#).unwrap(), ServerFrame::Unknown(k) if k == "typing")
        );
        // `presence` is known: a member's join, with its public info kept as JSON.
        let ServerFrame::Presence(p) = ServerFrame::parse(
            r#"{"type":"presence","stream":"room:1","seq":2,"epoch":"e","action":"join","member":{"sub":"u","sessionId":"s_1","info":{"n":1},"since":5}}"#,
        )
        .unwrap() else {
            panic!("a presence frame")
        };
        assert_eq!(
            (p.seq, p.action.as_str(), p.member.session_id.as_str()),
            (2, "join", "s_1")
        );
        assert_eq!(p.member.info, Some(serde_json::json!({"n": 1})));
        assert!(ServerFrame::parse(r#"{"type":"presence","stream":"room:1"}"#).is_err());
        assert!(ServerFrame::parse("not json").is_err());
        assert!(ServerFrame::parse(r#"{"type":"event","stream":"a"}"#).is_err());
        assert!(matches!(
            ServerFrame::parse(r#"{"stream":"a"}"#),
            Err(FrameError::NoType)
        ));
        // The tag anywhere, or escaped, still decodes.
        assert!(matches!(
            ServerFrame::parse(r#"{"resumeToken":"x","type":"token"}"#).unwrap(),
            ServerFrame::Token(_)
        ));
        assert!(matches!(
            ServerFrame::parse(r#"{"type":"tok\u0065n","resumeToken":"x"}"#).unwrap(),
            ServerFrame::Token(_)
        ));
        assert!(ServerFrame::parse(r#"{"type":"token""#).is_err());
    }

    #[test]
    fn client_frames_use_the_wire_names() {
        let f = ClientFrame::Resume(Resume {
            resume_token: "t".into(),
            last_ack: Some([("room:1".to_string(), 4u64)].into_iter().collect()),
            token: None,
            ..Resume::default()
        });
        assert_eq!(
            value(&f.to_json()),
            json!({"type":"resume","resumeToken":"t","lastAck":{"room:1":4}})
        );
        let f = ClientFrame::Resume(Resume {
            resume_token: "t".into(),
            last_ack: None,
            token: Some("jwt".into()),
            ..Resume::default()
        });
        assert_eq!(
            value(&f.to_json()),
            json!({"type":"resume","resumeToken":"t","token":"jwt"})
        );
        let f = ClientFrame::Subscribe(Subscribe {
            stream: "a".into(),
            after: Some(0),
            epoch: None,
            ..Subscribe::default()
        });
        assert_eq!(
            f.to_json(),
            r#"{"type":"subscribe","stream":"a","after":0}"#
        );
        let f = ClientFrame::Ack(Ack::one("a", 3));
        assert_eq!(f.to_json(), r#"{"type":"ack","stream":"a","seq":3}"#);
        let f = ClientFrame::Ack(Ack::batch([("a".to_string(), 3), ("b".to_string(), 9)]));
        assert_eq!(f.to_json(), r#"{"type":"ack","acks":{"a":3,"b":9}}"#);
        let f = ClientFrame::Pong(Ping { t: None }.echo());
        assert_eq!(f.to_json(), r#"{"type":"pong","t":null}"#);
    }

    #[test]
    fn client_frames_decode_as_the_server_reads_them() {
        let ClientFrame::Publish(p) =
            ClientFrame::parse(r#"{"type":"publish","stream":"a","data":null,"id":7}"#).unwrap()
        else {
            panic!()
        };
        assert_eq!((p.data.unwrap().get(), p.id), ("null", Some(json!(7))));
        let ClientFrame::Publish(p) =
            ClientFrame::parse(r#"{"type":"publish","stream":"a"}"#).unwrap()
        else {
            panic!()
        };
        assert!(p.data.is_none());
        let ClientFrame::Ping(p) = ClientFrame::parse(r#"{"type":"ping"}"#).unwrap() else {
            panic!()
        };
        assert_eq!(p.echo().t.unwrap().get(), "null");
        let ClientFrame::Ack(a) =
            ClientFrame::parse(r#"{"type":"ack","acks":{"a":1,"b":"x"}}"#).unwrap()
        else {
            panic!()
        };
        assert_eq!(a.acks.unwrap()["b"], json!("x"));
        for bad in [
            "not json",
            "[1]",
            r#"{"type":"ack","type":"ping"}"#,
            r#"{"type":"publish","stream":"a","data":1,"data":2}"#,
            r#"{"type":"subscribe","stream":5}"#,
            r#"{"type":"subscribe"}"#,
        ] {
            assert!(
                matches!(ClientFrame::parse(bad), Err(FrameError::Json(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            ClientFrame::parse(r#"{"stream":"a"}"#),
            Err(FrameError::NoType)
        ));
        assert!(matches!(
            ClientFrame::parse(r#"{"type":"nope"}"#),
            Err(FrameError::UnknownType(t)) if t == "nope"
        ));
    }

    #[test]
    fn binary_frames_carry_bytes_as_the_text_frames_do() {
        use crate::event::Event;
        use crate::{Epoch, Seq, StreamId};
        let bytes = [0u8, b'\n', 0xff, b'{', b'"'];
        let e = Event::encode(
            StreamId::new("room:b").unwrap(),
            Seq(7),
            Epoch::parse("00000000000000aa").unwrap(),
            5,
            &crate::payload::bytes_data(&bytes),
        );
        let f = e.ws_binary_frame().expect("a byte payload is binary on v3");
        let lf = f.iter().position(|&b| b == b'\n').unwrap();
        assert_eq!(
            std::str::from_utf8(&f[..lf]).unwrap(),
            r#"{"type":"event","stream":"room:b","seq":7,"epoch":"00000000000000aa","ts":5}"#
        );
        assert_eq!(&f[lf + 1..], &bytes);
        // Decoded, it is the frame the text form gives.
        let (ServerFrame::Event(bin), ServerFrame::Event(text)) = (
            ServerFrame::parse_binary(&f).unwrap(),
            ServerFrame::parse(&e.ws_frame()).unwrap(),
        ) else {
            panic!("both are events")
        };
        assert_eq!(
            (
                bin.stream.as_str(),
                bin.seq,
                bin.epoch.as_str(),
                bin.ts,
                bin.data.get()
            ),
            (
                text.stream.as_str(),
                text.seq,
                text.epoch.as_str(),
                text.ts,
                text.data.get()
            )
        );
        assert_eq!(bin.bytes().unwrap(), bytes);
        // Empty bytes; any other payload is never binary.
        let empty = Event::encode(
            StreamId::new("a").unwrap(),
            Seq(1),
            Epoch::parse("e").unwrap(),
            1,
            &crate::payload::bytes_data(b""),
        );
        assert!(empty.ws_binary_frame().unwrap().ends_with(b"}\n"));
        for data in [
            r#"{"n":1}"#,
            r#"{"$base64":"!!"}"#,
            r#"{"$base64":"AA==","x":1}"#,
            "\"AA==\"",
        ] {
            let e = Event::encode(
                StreamId::new("a").unwrap(),
                Seq(1),
                Epoch::parse("e").unwrap(),
                1,
                data,
            );
            assert!(e.ws_binary_frame().is_none(), "{data}");
        }
    }

    #[test]
    fn a_binary_publish_is_a_publish_of_the_bytes() {
        let f = ClientFrame::publish_binary("room:b", Some(json!("p-1")), b"\x00\nhi");
        assert!(f.starts_with(br#"{"type":"publish","stream":"room:b","id":"p-1"}"#));
        let ClientFrame::Publish(p) = ClientFrame::parse_binary(&f).unwrap() else {
            panic!("a publish")
        };
        assert_eq!(p.stream, "room:b");
        assert_eq!(p.id, Some(json!("p-1")));
        assert_eq!(
            p.data.unwrap().get(),
            crate::payload::bytes_data(b"\x00\nhi")
        );
        for bad in [
            &b"no newline"[..],
            b"not json\n\x00",
            b"{\"type\":\"subscribe\",\"stream\":\"a\"}\n\x00",
            b"{\"type\":\"publish\",\"stream\":\"a\",\"data\":1}\n\x00",
            b"\xff\xfe\n",
        ] {
            assert!(ClientFrame::parse_binary(bad).is_err(), "{bad:?}");
        }
        assert!(ServerFrame::parse_binary(b"{\"type\":\"pong\"}\n").is_err());
    }
}
