//! A minimal `text/event-stream` reader that exposes ids, event names and data.

use std::time::Duration;

use serde_json::Value;

use crate::WAIT;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    pub id: Option<String>,
    pub event: String,
    pub data: String,
}

impl SseEvent {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data).expect("event data is JSON")
    }
}

pub struct SseClient {
    res: reqwest::Response,
    buf: String,
    /// Comment lines seen (e.g. `: ping`).
    pub comments: Vec<String>,
}

#[derive(Debug)]
pub struct SseRefused {
    pub status: u16,
    pub json: Value,
}

/// What one read of a stream brought.
#[derive(Debug)]
pub enum SseRead {
    Event(SseEvent),
    /// Nothing within the wait.
    Timeout,
    /// The response ended (the server finished it, e.g. in a drain).
    Ended,
    /// The connection broke mid-response (the server died, the network failed).
    Broken,
}

impl SseClient {
    pub async fn connect(url: &str, headers: &[(&str, &str)]) -> Result<SseClient, SseRefused> {
        let client = reqwest::Client::new();
        let mut r = client.get(url).header("accept", "text/event-stream");
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        let res = r.send().await.expect("request sent");
        Self::from_response(res).await
    }

    /// Like [`SseClient::connect`], but a connection that cannot be made at all (nothing
    /// listens) is a refusal with status 0 instead of a panic.
    pub async fn try_connect(
        client: &reqwest::Client,
        url: &str,
        headers: &[(&str, &str)],
    ) -> Result<SseClient, SseRefused> {
        let mut r = client.get(url).header("accept", "text/event-stream");
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        match r.send().await {
            Ok(res) => Self::from_response(res).await,
            Err(e) => Err(SseRefused {
                status: 0,
                json: Value::String(e.to_string()),
            }),
        }
    }

    async fn from_response(res: reqwest::Response) -> Result<SseClient, SseRefused> {
        if res.status().as_u16() != 200 {
            let status = res.status().as_u16();
            let json = res.json().await.unwrap_or(Value::Null);
            return Err(SseRefused { status, json });
        }
        assert_eq!(
            res.headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok()),
            Some("text/event-stream")
        );
        Ok(SseClient {
            res,
            buf: String::new(),
            comments: Vec::new(),
        })
    }

    /// The next event (comment-only and `retry:` blocks are skipped), or `None` when the
    /// stream ended or nothing came within `within`.
    pub async fn next_within(&mut self, within: Duration) -> Option<SseEvent> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            while let Some(pos) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..pos + 2).collect();
                if let Some(ev) = self.parse(&block) {
                    return Some(ev);
                }
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match tokio::time::timeout(left, self.res.chunk()).await {
                Ok(Ok(Some(chunk))) => self.buf.push_str(&String::from_utf8_lossy(&chunk)),
                _ => return None,
            }
        }
    }

    /// The next event, telling a quiet stream from one that ended.
    pub async fn read(&mut self, within: Duration) -> SseRead {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            while let Some(pos) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..pos + 2).collect();
                if let Some(ev) = self.parse(&block) {
                    return SseRead::Event(ev);
                }
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match tokio::time::timeout(left, self.res.chunk()).await {
                Ok(Ok(Some(chunk))) => self.buf.push_str(&String::from_utf8_lossy(&chunk)),
                Ok(Ok(None)) => return SseRead::Ended,
                Ok(Err(_)) => return SseRead::Broken,
                Err(_) => return SseRead::Timeout,
            }
        }
    }

    pub async fn next(&mut self) -> SseEvent {
        self.next_within(WAIT).await.expect("an SSE event")
    }

    /// Reads `n` events named `event`.
    pub async fn events(&mut self, n: usize) -> Vec<SseEvent> {
        let mut out = Vec::new();
        while out.len() < n {
            let e = self.next().await;
            assert_eq!(e.event, "event", "unexpected SSE event {e:?}");
            out.push(e);
        }
        out
    }

    fn parse(&mut self, block: &str) -> Option<SseEvent> {
        let mut id = None;
        let mut event = None;
        let mut data: Vec<&str> = Vec::new();
        for line in block.lines() {
            if let Some(c) = line.strip_prefix(':') {
                self.comments.push(c.trim().to_string());
            } else if let Some(v) = line.strip_prefix("id:") {
                id = Some(v.trim_start().to_string());
            } else if let Some(v) = line.strip_prefix("event:") {
                event = Some(v.trim_start().to_string());
            } else if let Some(v) = line.strip_prefix("data:") {
                data.push(v.strip_prefix(' ').unwrap_or(v));
            }
        }
        if event.is_none() && data.is_empty() {
            return None;
        }
        Some(SseEvent {
            id,
            event: event.unwrap_or_else(|| "message".into()),
            data: data.join("\n"),
        })
    }
}
