//! The WebSocket frames of SPEC §4, as Rust types.
//!
//! Server frames are parsed in one pass through a flat, borrowed view and then turned into
//! [`ServerFrame`]; a frame whose `type` this SDK does not know becomes
//! [`ServerFrame::Unknown`] and is ignored by callers (servers may add frame types).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::error::{ApiError, ClientError};

/// One event, as every transport carries it: `{stream, seq, epoch, ts, data}`.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Event {
    pub stream: String,
    pub seq: u64,
    pub epoch: String,
    #[serde(default)]
    pub ts: u64,
    /// The payload exactly as published (JSON text).
    pub data: Box<RawValue>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Welcome {
    pub session_id: String,
    pub resume_token: String,
    pub reconnect_window_sec: u64,
    pub instance: String,
    pub protocol: String,
}

/// A stream-level or session-level `error` frame.
#[derive(Clone, Debug, PartialEq)]
pub struct ErrorFrame {
    pub error: ApiError,
    /// The stream's current epoch, on `EPOCH_CHANGED`.
    pub epoch: Option<String>,
}

#[derive(Clone, Debug)]
pub enum ServerFrame {
    Welcome(Welcome),
    Subscribed {
        stream: String,
        epoch: String,
        head_seq: u64,
        from_seq: u64,
    },
    Event(Event),
    Ping {
        t: serde_json::Value,
    },
    Pong {
        t: serde_json::Value,
    },
    /// The instance drains: reconnect (elsewhere) with this token after `retry_after_ms`.
    Reconnect {
        reason: String,
        resume_token: String,
        retry_after_ms: u64,
    },
    Error(ErrorFrame),
    Published {
        stream: String,
        seq: u64,
        id: Option<serde_json::Value>,
    },
    /// A refreshed resume token.
    Token {
        resume_token: String,
    },
    Unknown {
        kind: String,
    },
}

#[derive(Deserialize)]
struct Flat<'a> {
    #[serde(rename = "type", borrow)]
    kind: std::borrow::Cow<'a, str>,
    #[serde(default)]
    stream: Option<String>,
    #[serde(default)]
    seq: Option<u64>,
    #[serde(default)]
    epoch: Option<String>,
    #[serde(default)]
    ts: Option<u64>,
    #[serde(default, borrow)]
    data: Option<&'a RawValue>,
    #[serde(default, rename = "sessionId")]
    session_id: Option<String>,
    #[serde(default, rename = "resumeToken")]
    resume_token: Option<String>,
    #[serde(default, rename = "reconnectWindowSec")]
    reconnect_window_sec: Option<u64>,
    #[serde(default)]
    instance: Option<String>,
    #[serde(default)]
    protocol: Option<String>,
    #[serde(default, rename = "headSeq")]
    head_seq: Option<u64>,
    #[serde(default, rename = "fromSeq")]
    from_seq: Option<u64>,
    #[serde(default)]
    t: Option<serde_json::Value>,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default, rename = "retryAfterMs")]
    retry_after_ms: Option<u64>,
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default, rename = "firstAvailableSeq")]
    first_available_seq: Option<u64>,
    #[serde(default)]
    id: Option<serde_json::Value>,
}

fn missing(kind: &str, field: &str) -> ClientError {
    ClientError::Protocol(format!("`{kind}` frame without `{field}`"))
}

impl ServerFrame {
    pub fn parse(text: &str) -> Result<ServerFrame, ClientError> {
        let f: Flat<'_> = serde_json::from_str(text)
            .map_err(|e| ClientError::Protocol(format!("bad frame: {e}")))?;
        let kind = f.kind.as_ref();
        Ok(match kind {
            "event" => ServerFrame::Event(Event {
                stream: f.stream.ok_or_else(|| missing(kind, "stream"))?,
                seq: f.seq.ok_or_else(|| missing(kind, "seq"))?,
                epoch: f.epoch.unwrap_or_default(),
                ts: f.ts.unwrap_or(0),
                data: f
                    .data
                    .map(RawValue::to_owned)
                    .ok_or_else(|| missing(kind, "data"))?,
            }),
            "welcome" => ServerFrame::Welcome(Welcome {
                session_id: f.session_id.ok_or_else(|| missing(kind, "sessionId"))?,
                resume_token: f.resume_token.ok_or_else(|| missing(kind, "resumeToken"))?,
                reconnect_window_sec: f.reconnect_window_sec.unwrap_or(0),
                instance: f.instance.unwrap_or_default(),
                protocol: f.protocol.unwrap_or_default(),
            }),
            "subscribed" => ServerFrame::Subscribed {
                stream: f.stream.ok_or_else(|| missing(kind, "stream"))?,
                epoch: f.epoch.unwrap_or_default(),
                head_seq: f.head_seq.unwrap_or(0),
                from_seq: f.from_seq.unwrap_or(0),
            },
            "ping" => ServerFrame::Ping {
                t: f.t.unwrap_or(serde_json::Value::Null),
            },
            "pong" => ServerFrame::Pong {
                t: f.t.unwrap_or(serde_json::Value::Null),
            },
            "reconnect" => ServerFrame::Reconnect {
                reason: f.reason.unwrap_or_default(),
                resume_token: f.resume_token.ok_or_else(|| missing(kind, "resumeToken"))?,
                retry_after_ms: f.retry_after_ms.unwrap_or(0),
            },
            "error" => ServerFrame::Error(ErrorFrame {
                error: ApiError {
                    code: f.code.unwrap_or_default(),
                    message: f.message.unwrap_or_default(),
                    stream: f.stream,
                    first_available_seq: f.first_available_seq,
                },
                epoch: f.epoch,
            }),
            "published" => ServerFrame::Published {
                stream: f.stream.ok_or_else(|| missing(kind, "stream"))?,
                seq: f.seq.ok_or_else(|| missing(kind, "seq"))?,
                id: f.id,
            },
            "token" => ServerFrame::Token {
                resume_token: f.resume_token.ok_or_else(|| missing(kind, "resumeToken"))?,
            },
            other => ServerFrame::Unknown {
                kind: other.to_string(),
            },
        })
    }
}

/// Frames a client sends.
#[derive(Clone, Debug, Serialize)]
#[serde(
    tag = "type",
    rename_all = "lowercase",
    rename_all_fields = "camelCase"
)]
pub enum ClientFrame {
    Subscribe {
        stream: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        after: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        epoch: Option<String>,
    },
    Unsubscribe {
        stream: String,
    },
    Ack {
        stream: String,
        seq: u64,
    },
    /// `zerodrop.v2`'s batched ack: one frame, a checkpoint per stream.
    #[serde(rename = "ack")]
    Acks {
        acks: BTreeMap<String, u64>,
    },
    Resume {
        resume_token: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        last_ack: Option<BTreeMap<String, u64>>,
    },
    Ping {
        t: serde_json::Value,
    },
    Pong {
        t: serde_json::Value,
    },
    Publish {
        stream: String,
        data: serde_json::Value,
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<String>,
    },
}

impl ClientFrame {
    pub fn to_json(&self) -> String {
        // A derive-serialised enum of strings, integers and JSON values cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_every_server_frame() {
        let w = ServerFrame::parse(r#"{"type":"welcome","sessionId":"s_1","resumeToken":"v1.k.p.s","reconnectWindowSec":900,"instance":"i1","protocol":"zerodrop.v1"}"#).unwrap();
        let ServerFrame::Welcome(w) = w else { panic!() };
        assert_eq!(
            (w.session_id.as_str(), w.reconnect_window_sec),
            ("s_1", 900)
        );
        let e = ServerFrame::parse(
            r#"{"type":"event","stream":"room:1","seq":7,"epoch":"ab","ts":5,"data":{"a":[1, 2]}}"#,
        )
        .unwrap();
        let ServerFrame::Event(e) = e else { panic!() };
        assert_eq!(
            (e.stream.as_str(), e.seq, e.data.get()),
            ("room:1", 7, r#"{"a":[1, 2]}"#)
        );
        let s = ServerFrame::parse(
            r#"{"type":"subscribed","stream":"a","epoch":"e","headSeq":3,"fromSeq":4}"#,
        )
        .unwrap();
        assert!(matches!(
            s,
            ServerFrame::Subscribed {
                head_seq: 3,
                from_seq: 4,
                ..
            }
        ));
        let err = ServerFrame::parse(r#"{"type":"error","code":"REPLAY_WINDOW_TRIMMED","message":"m","stream":"a","firstAvailableSeq":9}"#).unwrap();
        let ServerFrame::Error(err) = err else {
            panic!()
        };
        assert_eq!(err.error.first_available_seq, Some(9));
        assert!(
            matches!(ServerFrame::parse(r#"{"type":"ping","t":12}"#).unwrap(), ServerFrame::Ping { t } if t == json!(12))
        );
        assert!(matches!(
            ServerFrame::parse(r#"{"type":"token","resumeToken":"x"}"#).unwrap(),
            ServerFrame::Token { .. }
        ));
        assert!(matches!(
            ServerFrame::parse(
                r#"{"type":"reconnect","reason":"drain","resumeToken":"x","retryAfterMs":50}"#
            )
            .unwrap(),
            ServerFrame::Reconnect {
                retry_after_ms: 50,
                ..
            }
        ));
        assert!(
            matches!(ServerFrame::parse(r#"{"type":"presence","x":1}"#).unwrap(), ServerFrame::Unknown { kind } if kind == "presence")
        );
        assert!(ServerFrame::parse("not json").is_err());
        assert!(ServerFrame::parse(r#"{"type":"event","stream":"a"}"#).is_err());
    }

    #[test]
    fn client_frames_use_the_wire_names() {
        let f = ClientFrame::Resume {
            resume_token: "t".into(),
            last_ack: Some([("room:1".to_string(), 4u64)].into_iter().collect()),
        };
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&f.to_json()).unwrap(),
            json!({"type":"resume","resumeToken":"t","lastAck":{"room:1":4}})
        );
        let f = ClientFrame::Subscribe {
            stream: "a".into(),
            after: Some(0),
            epoch: None,
        };
        assert_eq!(
            f.to_json(),
            r#"{"type":"subscribe","stream":"a","after":0}"#
        );
        let f = ClientFrame::Ack {
            stream: "a".into(),
            seq: 3,
        };
        assert_eq!(f.to_json(), r#"{"type":"ack","stream":"a","seq":3}"#);
        let f = ClientFrame::Acks {
            acks: [("a".to_string(), 3u64), ("b".to_string(), 9)]
                .into_iter()
                .collect(),
        };
        assert_eq!(f.to_json(), r#"{"type":"ack","acks":{"a":3,"b":9}}"#);
    }
}
