//! `GET /v1/streams/{stream}/sse`: a `text/event-stream` body read incrementally.
//!
//! Positions travel as SSE ids `<epoch>:<seq>`; a reconnect sends the last one as
//! `Last-Event-ID`, exactly what a browser's `EventSource` does. A position the server cannot
//! serve arrives as an `event: reset` (the page learns of the hole) and the stream goes on
//! from the first retained event.

use std::pin::Pin;

use futures_util::StreamExt;
use serde::Deserialize;

use crate::error::ClientError;
use crate::frames::Event;
use crate::http::HttpClient;

#[derive(Clone, Debug)]
pub enum SseAuth {
    Token(String),
    Resume(String),
}

#[derive(Clone, Debug, Default)]
pub struct SseOptions {
    /// Sent as the `Last-Event-ID` header: `<epoch>:<seq>` or a bare `<seq>`.
    pub last_event_id: Option<String>,
    /// `?after=N`.
    pub after: Option<u64>,
}

/// The `data` of an `event: reset`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Reset {
    pub code: String,
    #[serde(default)]
    pub epoch: String,
    #[serde(default)]
    pub first_available_seq: u64,
}

#[derive(Clone, Debug)]
pub enum SseMessage {
    Event {
        id: Option<String>,
        event: Event,
    },
    Reset {
        id: Option<String>,
        reset: Reset,
    },
    /// A `: comment` line (the server's keep-alive `: ping`).
    Comment(String),
    /// An event type this SDK does not know.
    Other {
        event: String,
        data: String,
    },
}

/// An incremental `text/event-stream` parser (the WHATWG rules this protocol needs:
/// `id`, `event`, multi-line `data`, comments, `\n` or `\r\n` line ends).
#[derive(Debug, Default)]
pub struct SseParser {
    buf: Vec<u8>,
    id: Option<String>,
    event: Option<String>,
    data: Option<String>,
}

/// One dispatched SSE block.
#[derive(Clone, Debug, PartialEq)]
pub enum RawSse {
    Comment(String),
    Block {
        id: Option<String>,
        event: String,
        data: String,
    },
}

impl SseParser {
    /// Feeds bytes and returns every block completed by them.
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<RawSse> {
        self.buf.extend_from_slice(chunk);
        let mut out = Vec::new();
        let mut start = 0;
        while let Some(nl) = self.buf[start..].iter().position(|&b| b == b'\n') {
            let end = start + nl;
            let mut line = &self.buf[start..end];
            if line.last() == Some(&b'\r') {
                line = &line[..line.len() - 1];
            }
            let line = String::from_utf8_lossy(line).into_owned();
            start = end + 1;
            self.line(&line, &mut out);
        }
        self.buf.drain(..start);
        out
    }

    fn line(&mut self, line: &str, out: &mut Vec<RawSse>) {
        if line.is_empty() {
            if let Some(data) = self.data.take() {
                out.push(RawSse::Block {
                    id: self.id.take(),
                    event: self.event.take().unwrap_or_else(|| "message".into()),
                    data,
                });
            } else {
                self.id = None;
                self.event = None;
            }
            return;
        }
        if let Some(c) = line.strip_prefix(':') {
            out.push(RawSse::Comment(c.trim_start().to_string()));
            return;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "id" => self.id = Some(value.to_string()),
            "event" => self.event = Some(value.to_string()),
            "data" => match &mut self.data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => self.data = Some(value.to_string()),
            },
            _ => {}
        }
    }
}

pub struct SseConnection {
    body: Pin<Box<dyn futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    parser: SseParser,
    pending: std::collections::VecDeque<RawSse>,
    last_event_id: Option<String>,
}

impl SseConnection {
    /// Opens the stream; an error status before the stream starts comes back as
    /// [`ClientError::Http`] with the SPEC code.
    pub async fn connect(
        http: &HttpClient,
        stream: &str,
        auth: &SseAuth,
        opts: &SseOptions,
    ) -> Result<SseConnection, ClientError> {
        let mut query: Vec<(&str, String)> = Vec::new();
        match auth {
            SseAuth::Token(t) => query.push(("token", t.clone())),
            SseAuth::Resume(t) => query.push(("resume", t.clone())),
        }
        if let Some(a) = opts.after {
            query.push(("after", a.to_string()));
        }
        let mut req = http
            .streaming_client()
            .get(format!("{}/v1/streams/{stream}/sse", http.base_url()))
            .query(&query)
            .header(reqwest::header::ACCEPT, "text/event-stream");
        if let Some(id) = &opts.last_event_id {
            req = req.header("Last-Event-ID", id.as_str());
        }
        let resp = tokio::time::timeout(std::time::Duration::from_secs(10), req.send())
            .await
            .map_err(|_| ClientError::Timeout("SSE connect".into()))?
            .map_err(ClientError::from_reqwest)?;
        let status = resp.status().as_u16();
        if status != 200 {
            let ra = crate::http::retry_after(resp.headers());
            let body = resp.bytes().await.unwrap_or_default();
            return Err(ClientError::from_body(status, &body, ra));
        }
        Ok(SseConnection {
            body: Box::pin(resp.bytes_stream()),
            parser: SseParser::default(),
            pending: Default::default(),
            last_event_id: opts.last_event_id.clone(),
        })
    }

    /// The id of the last event or reset received (what a reconnect sends as
    /// `Last-Event-ID`).
    pub fn last_event_id(&self) -> Option<&str> {
        self.last_event_id.as_deref()
    }

    /// The next message; [`ClientError::Closed`] when the server ends the body.
    pub async fn next(&mut self) -> Result<SseMessage, ClientError> {
        loop {
            if let Some(raw) = self.pending.pop_front() {
                return Ok(match raw {
                    RawSse::Comment(c) => SseMessage::Comment(c),
                    RawSse::Block { id, event, data } => {
                        if id.is_some() {
                            self.last_event_id = id.clone();
                        }
                        match event.as_str() {
                            "event" | "message" => SseMessage::Event {
                                id,
                                event: serde_json::from_str(&data).map_err(|e| {
                                    ClientError::Protocol(format!("bad SSE event data: {e}"))
                                })?,
                            },
                            "reset" => SseMessage::Reset {
                                id,
                                reset: serde_json::from_str(&data).map_err(|e| {
                                    ClientError::Protocol(format!("bad SSE reset data: {e}"))
                                })?,
                            },
                            _ => SseMessage::Other { event, data },
                        }
                    }
                });
            }
            match self.body.next().await {
                None => {
                    return Err(ClientError::Closed {
                        code: None,
                        reason: "SSE body ended".into(),
                    });
                }
                Some(Err(e)) => return Err(ClientError::from_reqwest(e)),
                Some(Ok(chunk)) => self.pending.extend(self.parser.feed(&chunk)),
            }
        }
    }
}

/// Splits an SSE id `<epoch>:<seq>` (or a bare `<seq>`).
pub fn parse_event_id(id: &str) -> Option<(Option<&str>, u64)> {
    match id.rsplit_once(':') {
        Some((epoch, seq)) => Some((Some(epoch), seq.parse().ok()?)),
        None => Some((None, id.parse().ok()?)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_blocks_across_chunk_boundaries() {
        let mut p = SseParser::default();
        let mut got = p.feed(b": ping\n\nid: e1:7\nevent: ev");
        got.extend(p.feed(b"ent\r\ndata: {\"a\":\ndata: 1}\n\n"));
        got.extend(p.feed(b"data: plain\n\n"));
        assert_eq!(
            got,
            vec![
                RawSse::Comment("ping".into()),
                RawSse::Block {
                    id: Some("e1:7".into()),
                    event: "event".into(),
                    data: "{\"a\":\n1}".into()
                },
                RawSse::Block {
                    id: None,
                    event: "message".into(),
                    data: "plain".into()
                },
            ]
        );
    }

    #[test]
    fn event_ids() {
        assert_eq!(parse_event_id("abc:12"), Some((Some("abc"), 12)));
        assert_eq!(parse_event_id("12"), Some((None, 12)));
        assert_eq!(parse_event_id("abc:x"), None);
    }
}
