//! A raw WebSocket client that exposes every frame, for exact assertions.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::WAIT;

pub struct WsClient {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub protocol: Option<String>,
}

/// The handshake was refused: its HTTP status and body.
#[derive(Debug)]
pub struct Refused {
    pub status: u16,
    pub body: String,
    /// The `Retry-After` header, if the refusal had one.
    pub retry_after: Option<String>,
}

impl Refused {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
}

/// What the next read brought.
#[derive(Debug)]
pub enum Next {
    Frame(Value),
    Closed(Option<u16>),
    Timeout,
}

impl WsClient {
    /// Connects to `url` (`ws://host/v1/ws?…`) offering `zerodrop.v1`.
    pub async fn connect(url: &str) -> Result<WsClient, Refused> {
        Self::connect_with(url, &["zerodrop.v1"]).await
    }

    pub async fn connect_with(url: &str, protocols: &[&str]) -> Result<WsClient, Refused> {
        Self::handshake(url, protocols, None).await
    }

    /// Connects over a TCP connection the test made (e.g. [`crate::small_window_tcp`]),
    /// offering `zerodrop.v1`.
    pub async fn connect_over(url: &str, tcp: TcpStream) -> Result<WsClient, Refused> {
        Self::handshake(url, &["zerodrop.v1"], Some(tcp)).await
    }

    async fn handshake(
        url: &str,
        protocols: &[&str],
        tcp: Option<TcpStream>,
    ) -> Result<WsClient, Refused> {
        let mut req = url.into_client_request().expect("valid ws url");
        if !protocols.is_empty() {
            req.headers_mut().insert(
                "sec-websocket-protocol",
                HeaderValue::from_str(&protocols.join(", ")).expect("header"),
            );
        }
        let connected = match tcp {
            Some(tcp) => tokio_tungstenite::client_async(req, MaybeTlsStream::Plain(tcp)).await,
            None => tokio_tungstenite::connect_async(req).await,
        };
        match connected {
            Ok((ws, res)) => {
                let protocol = res
                    .headers()
                    .get("sec-websocket-protocol")
                    .and_then(|v| v.to_str().ok())
                    .map(String::from);
                Ok(WsClient { ws, protocol })
            }
            Err(tokio_tungstenite::tungstenite::Error::Http(res)) => Err(Refused {
                status: res.status().as_u16(),
                body: res
                    .body()
                    .as_ref()
                    .map(|b| String::from_utf8_lossy(b).to_string())
                    .unwrap_or_default(),
                retry_after: res
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .map(String::from),
            }),
            Err(e) => Err(Refused {
                status: 0,
                body: e.to_string(),
                retry_after: None,
            }),
        }
    }

    pub async fn send(&mut self, v: Value) {
        self.send_raw(v.to_string()).await;
    }

    pub async fn send_raw(&mut self, text: String) {
        self.ws
            .send(Message::Text(text.into()))
            .await
            .expect("send");
    }

    /// Sends a frame; `false` if the connection is gone (for clients that must survive a
    /// server that dies under them).
    pub async fn try_send(&mut self, v: Value) -> bool {
        self.ws
            .send(Message::Text(v.to_string().into()))
            .await
            .is_ok()
    }

    pub async fn send_binary(&mut self, b: Vec<u8>) {
        self.ws.send(Message::Binary(b.into())).await.expect("send");
    }

    /// The next frame (server pings included), a close, or a timeout after `within`. A
    /// `zerodrop.v3` binary frame is `{"$binary":{"header":<its header>,"base64":<its bytes>}}`.
    pub async fn next_within(&mut self, within: Duration) -> Next {
        loop {
            match tokio::time::timeout(within, self.ws.next()).await {
                Err(_) => return Next::Timeout,
                Ok(None) => return Next::Closed(None),
                Ok(Some(Err(_))) => return Next::Closed(None),
                Ok(Some(Ok(Message::Close(c)))) => {
                    // Send the close reply now, as a browser does: the server waits for it
                    // before it drops the connection.
                    let _ = tokio::time::timeout(Duration::from_secs(1), self.ws.flush()).await;
                    return Next::Closed(c.map(|c| u16::from(c.code)));
                }
                Ok(Some(Ok(Message::Text(t)))) => {
                    return Next::Frame(
                        serde_json::from_str(t.as_str()).expect("server frames are JSON"),
                    );
                }
                Ok(Some(Ok(Message::Binary(b)))) => return Next::Frame(binary_frame(&b)),
                Ok(Some(Ok(_))) => continue,
            }
        }
    }

    /// The next frame that is not a server `ping` (answered), whatever its type, within
    /// `within` in all; `None` on a close or a timeout.
    pub async fn next_answered(&mut self, within: Duration) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_within(left).await {
                Next::Frame(f) if f["type"] == "ping" => {
                    let pong = serde_json::json!({"type": "pong", "t": f["t"]});
                    self.send(pong).await;
                }
                Next::Frame(f) => return Some(f),
                _ => return None,
            }
        }
    }

    /// [`WsClient::next_answered`] that panics on a close or a timeout.
    pub async fn next_frame(&mut self, within: Duration) -> Value {
        match self.next_answered(within).await {
            Some(f) => f,
            None => panic!("expected a frame within {within:?}: closed or timed out"),
        }
    }

    /// The next frame that is not a server `ping` or `token` refresh (pings are answered),
    /// within [`WAIT`] in all.
    pub async fn recv(&mut self) -> Value {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_within(left).await {
                Next::Frame(f) if f["type"] == "ping" => {
                    let pong = serde_json::json!({"type": "pong", "t": f["t"]});
                    self.send(pong).await;
                }
                Next::Frame(f) if f["type"] == "token" => {}
                Next::Frame(f) => return f,
                other => panic!("expected a frame, got {other:?}"),
            }
        }
    }

    /// The next frame, which must have this type.
    pub async fn expect(&mut self, ty: &str) -> Value {
        let f = self.recv().await;
        assert_eq!(f["type"], ty, "unexpected frame: {f}");
        f
    }

    /// Reads `n` event frames (any other frame fails the test); returns their seqs.
    pub async fn events(&mut self, n: usize) -> Vec<Value> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let f = self.recv().await;
            assert_eq!(f["type"], "event", "expected an event, got {f}");
            out.push(f);
        }
        out
    }

    /// Waits (at most [`WAIT`], whatever arrives meanwhile) for the server to close; returns
    /// the close code.
    pub async fn expect_close(&mut self) -> Option<u16> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_within(left).await {
                Next::Closed(c) => return c,
                Next::Frame(_) => continue,
                Next::Timeout => panic!("the server did not close"),
            }
        }
    }

    /// Asserts nothing but pings arrives for `quiet`.
    pub async fn expect_silence(&mut self, quiet: Duration) {
        let until = tokio::time::Instant::now() + quiet;
        loop {
            let left = until.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return;
            }
            match self.next_within(left).await {
                Next::Timeout => return,
                Next::Frame(f) if f["type"] == "ping" || f["type"] == "token" => continue,
                other => panic!("expected silence, got {other:?}"),
            }
        }
    }

    /// Drops the TCP connection without a close frame (a network failure).
    pub fn abort(self) {
        drop(self.ws);
    }

    pub async fn close(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(1), self.ws.close(None)).await;
    }
}

/// A binary frame as [`WsClient::next_within`] shows it.
fn binary_frame(frame: &[u8]) -> Value {
    let (header, bytes) =
        zerodrop_core::frames::binary::split(frame).expect("a binary frame has a header line");
    serde_json::json!({"$binary": {
        "header": serde_json::from_str::<Value>(header).expect("a binary frame's header is JSON"),
        "base64": zerodrop_core::payload::encode(bytes),
    }})
}

/// A binary frame from its header and the base64 of its payload (the form
/// [`WsClient::next_within`] shows).
pub fn binary(header: &Value, base64: &str) -> Vec<u8> {
    let bytes = zerodrop_core::payload::decode(base64).expect("valid base64");
    zerodrop_core::frames::binary::frame(&header.to_string(), &bytes)
}
