//! `GET /v1/ws`: one WebSocket session, opened with a connect token or resumed with a
//! resume token.
//!
//! The connection answers the server's `ping` with `pong` by itself and always keeps the
//! newest resume token (from `welcome`, `token` and `reconnect` frames), so a caller can
//! resume after any drop with [`WsConnection::resume_token`]. Every frame is still handed to
//! the caller, who ignores the kinds it does not care about.

use std::collections::BTreeMap;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::error::ClientError;
use crate::frames::{
    Ack, ClientFrame, Ping, PresenceAt, Publish, Resume, ServerFrame, Subscribe, Welcome,
};

/// How a connection authenticates.
#[derive(Clone, Debug)]
pub enum WsAuth {
    /// A connect token (`?token=`): a new session.
    Token(String),
    /// Take over a session: no token on the URL, the first frame is
    /// `{"type":"resume","resumeToken":…,"lastAck":{…}}`.
    Resume {
        resume_token: String,
        last_ack: BTreeMap<String, u64>,
        /// A fresh connect token, for a session whose own expired (`TOKEN_EXPIRED`).
        token: Option<String>,
        /// The streams whose `presence` frames go on, each from its position.
        presence: BTreeMap<String, PresenceAt>,
    },
    /// Take over a session with `?resume=<token>` (the session's stored acks apply).
    ResumeQuery(String),
}

pub struct WsConnection {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    welcome: Welcome,
    resume_token: String,
}

fn config() -> WebSocketConfig {
    // Small read buffers: a drill holds hundreds of these and tungstenite zero-fills the
    // whole buffer before each read.
    WebSocketConfig::default()
        .read_buffer_size(16 * 1024)
        .max_message_size(Some(4 << 20))
}

fn ws_error(e: WsError) -> ClientError {
    match e {
        WsError::Http(resp) => {
            let status = resp.status().as_u16();
            let ra = crate::http::retry_after(resp.headers());
            let body = resp.body().clone().unwrap_or_default();
            ClientError::from_body(status, &body, ra)
        }
        WsError::ConnectionClosed | WsError::AlreadyClosed => ClientError::Closed {
            code: None,
            reason: "connection closed".into(),
        },
        #[cfg(feature = "tls")]
        WsError::Io(e) if crate::tls::tls_cause(&e).is_some() => {
            ClientError::Tls(crate::tls::tls_cause(&e).unwrap_or_default())
        }
        #[cfg(feature = "tls")]
        WsError::Tls(e) => ClientError::Tls(e.to_string()),
        WsError::Io(e) => ClientError::Network(e.to_string()),
        WsError::Protocol(p) => ClientError::Network(format!("websocket protocol: {p}")),
        other => ClientError::Network(other.to_string()),
    }
}

impl WsConnection {
    /// Connects, authenticates and waits for `welcome` (at most `timeout` in all).
    pub async fn connect(
        base_url: &str,
        auth: WsAuth,
        timeout: Duration,
    ) -> Result<WsConnection, ClientError> {
        Self::connect_offering(base_url, auth, timeout, crate::PROTOCOL).await
    }

    /// [`WsConnection::connect`] offering `protocols` (a `Sec-WebSocket-Protocol` value, e.g.
    /// `"zerodrop.v3, zerodrop.v2, zerodrop.v1"`); [`WsConnection::protocol`] says which one the server
    /// chose.
    pub async fn connect_offering(
        base_url: &str,
        auth: WsAuth,
        timeout: Duration,
        protocols: &'static str,
    ) -> Result<WsConnection, ClientError> {
        #[cfg(feature = "tls")]
        return Self::connect_tls_offering(
            base_url,
            auth,
            timeout,
            crate::tls::Tls::current(),
            protocols,
        )
        .await;
        #[cfg(not(feature = "tls"))]
        Self::connect_timed(base_url, auth, timeout, protocols).await
    }

    /// [`WsConnection::connect`] trusting the roots of `tls` for `wss://`.
    #[cfg(feature = "tls")]
    pub async fn connect_with(
        base_url: &str,
        auth: WsAuth,
        timeout: Duration,
        tls: &crate::tls::Tls,
    ) -> Result<WsConnection, ClientError> {
        Self::connect_tls_offering(base_url, auth, timeout, tls, crate::PROTOCOL).await
    }

    /// [`WsConnection::connect_offering`] trusting the roots of `tls` for `wss://`.
    #[cfg(feature = "tls")]
    pub async fn connect_tls_offering(
        base_url: &str,
        auth: WsAuth,
        timeout: Duration,
        tls: &crate::tls::Tls,
        protocols: &'static str,
    ) -> Result<WsConnection, ClientError> {
        let connector = tokio_tungstenite::Connector::Rustls(tls.client_config());
        Self::connect_timed(base_url, auth, timeout, protocols, Some(connector)).await
    }

    async fn connect_timed(
        base_url: &str,
        auth: WsAuth,
        timeout: Duration,
        protocols: &'static str,
        #[cfg(feature = "tls")] connector: Option<tokio_tungstenite::Connector>,
    ) -> Result<WsConnection, ClientError> {
        let fut = Self::connect_inner(
            base_url,
            auth,
            protocols,
            #[cfg(feature = "tls")]
            connector,
        );
        tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| ClientError::Timeout("websocket connect and welcome".into()))?
    }

    async fn connect_inner(
        base_url: &str,
        auth: WsAuth,
        protocols: &'static str,
        #[cfg(feature = "tls")] connector: Option<tokio_tungstenite::Connector>,
    ) -> Result<WsConnection, ClientError> {
        let base = crate::ws_base(base_url)?;
        let url = match &auth {
            WsAuth::Token(t) => format!("{base}/v1/ws?token={t}"),
            WsAuth::Resume { .. } => format!("{base}/v1/ws"),
            WsAuth::ResumeQuery(t) => format!("{base}/v1/ws?resume={t}"),
        };
        let mut req = url
            .as_str()
            .into_client_request()
            .map_err(|e| ClientError::InvalidUrl(e.to_string()))?;
        req.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_static(protocols),
        );
        #[cfg(feature = "tls")]
        let connected =
            tokio_tungstenite::connect_async_tls_with_config(req, Some(config()), true, connector)
                .await;
        #[cfg(not(feature = "tls"))]
        let connected =
            tokio_tungstenite::connect_async_with_config(req, Some(config()), true).await;
        let (ws, _resp) = connected.map_err(ws_error)?;
        let mut conn = WsConnection {
            ws,
            welcome: Welcome::default(),
            resume_token: String::new(),
        };
        if let WsAuth::Resume {
            resume_token,
            last_ack,
            token,
            presence,
        } = auth
        {
            let last_ack = (!last_ack.is_empty()).then_some(last_ack);
            conn.send(&ClientFrame::Resume(Resume {
                resume_token,
                last_ack,
                token,
                presence: (!presence.is_empty()).then_some(presence),
            }))
            .await?;
        }
        loop {
            match conn.recv().await? {
                ServerFrame::Welcome(w) => {
                    conn.welcome = w;
                    return Ok(conn);
                }
                ServerFrame::Error(e) => return Err(ClientError::Frame(e.into())),
                // Nothing else is expected before `welcome`; tolerate pings and unknowns.
                _ => continue,
            }
        }
    }

    pub fn welcome(&self) -> &Welcome {
        &self.welcome
    }

    /// The subprotocol the server chose (`zerodrop.v3`, `zerodrop.v2` or `zerodrop.v1`).
    pub fn protocol(&self) -> &str {
        &self.welcome.protocol
    }

    pub fn session_id(&self) -> &str {
        &self.welcome.session_id
    }

    /// The newest resume token the server handed out on this connection.
    pub fn resume_token(&self) -> &str {
        &self.resume_token
    }

    pub async fn send(&mut self, frame: &ClientFrame) -> Result<(), ClientError> {
        self.ws
            .send(Message::text(frame.to_json()))
            .await
            .map_err(ws_error)
    }

    pub async fn subscribe(
        &mut self,
        stream: &str,
        after: Option<u64>,
        epoch: Option<&str>,
    ) -> Result<(), ClientError> {
        self.send(&ClientFrame::Subscribe(Subscribe {
            stream: stream.to_string(),
            after,
            epoch: epoch.map(str::to_string),
            ..Subscribe::default()
        }))
        .await
    }

    pub async fn ack(&mut self, stream: &str, seq: u64) -> Result<(), ClientError> {
        self.send(&ClientFrame::Ack(Ack::one(stream, seq))).await
    }

    pub async fn publish(
        &mut self,
        stream: &str,
        data: serde_json::Value,
        id: Option<String>,
    ) -> Result<(), ClientError> {
        let data = serde_json::value::to_raw_value(&data)
            .map_err(|e| ClientError::Protocol(format!("publish data: {e}")))?;
        self.send_publish(stream, data, id.map(serde_json::Value::String))
            .await
    }

    /// A text `publish` of `data` (raw JSON).
    async fn send_publish(
        &mut self,
        stream: &str,
        data: Box<serde_json::value::RawValue>,
        id: Option<serde_json::Value>,
    ) -> Result<(), ClientError> {
        self.send(&ClientFrame::Publish(Publish {
            stream: stream.to_string(),
            data: Some(data),
            id,
        }))
        .await
    }

    /// Publishes `bytes` as a byte payload (stored as `{"$base64"}`): one binary frame on
    /// `zerodrop.v3`, the `{"$base64"}` text form on the earlier versions. Answered by
    /// `published` like [`WsConnection::publish`].
    pub async fn publish_bytes(
        &mut self,
        stream: &str,
        bytes: &[u8],
        id: Option<String>,
    ) -> Result<(), ClientError> {
        let id = id.map(serde_json::Value::String);
        if self.protocol() == zerodrop_core::frames::binary::PROTOCOL {
            let frame = ClientFrame::publish_binary(stream, id, bytes);
            return self
                .ws
                .send(Message::Binary(frame.into()))
                .await
                .map_err(ws_error);
        }
        self.send_publish(stream, zerodrop_core::payload::bytes_value(bytes), id)
            .await
    }

    /// The next frame from the server. `ping` is answered before it is returned; a close
    /// becomes [`ClientError::Closed`] with the server's close code. Cancel-safe.
    pub async fn recv(&mut self) -> Result<ServerFrame, ClientError> {
        loop {
            let msg = match self.ws.next().await {
                None => {
                    return Err(ClientError::Closed {
                        code: None,
                        reason: "connection closed".into(),
                    });
                }
                Some(Err(e)) => return Err(ws_error(e)),
                Some(Ok(m)) => m,
            };
            let frame = match msg {
                Message::Text(t) => ServerFrame::parse(t.as_str())?,
                // `zerodrop.v3`: a byte payload's event, decoded to the frame its text form
                // gives.
                Message::Binary(b) => ServerFrame::parse_binary(&b)?,
                Message::Close(c) => {
                    return Err(ClientError::Closed {
                        code: c.as_ref().map(|c| u16::from(c.code)),
                        reason: c.map(|c| c.reason.to_string()).unwrap_or_default(),
                    });
                }
                // Control frames are handled by tungstenite.
                _ => continue,
            };
            match &frame {
                ServerFrame::Ping(p) => {
                    let pong = ClientFrame::Pong(Ping::echo(p));
                    self.send(&pong).await?;
                }
                ServerFrame::Welcome(w) => self.resume_token = w.resume_token.clone(),
                ServerFrame::Token(t) => self.resume_token = t.resume_token.clone(),
                ServerFrame::Reconnect(r) => self.resume_token = r.resume_token.clone(),
                _ => {}
            }
            return Ok(frame);
        }
    }

    /// Waits for `subscribed` for `stream` (or its stream-level error), handing every other
    /// frame that arrives meanwhile to `other`.
    pub async fn await_subscribed(
        &mut self,
        stream: &str,
        mut other: impl FnMut(ServerFrame),
    ) -> Result<(String, u64, u64), ClientError> {
        loop {
            match self.recv().await? {
                ServerFrame::Subscribed(s) if s.stream == stream => {
                    return Ok((s.epoch, s.head_seq, s.from_seq));
                }
                ServerFrame::Error(e) if e.stream.as_deref() == Some(stream) => {
                    return Err(ClientError::Frame(e.into()));
                }
                f => other(f),
            }
        }
    }

    /// Closes politely (close frame, bounded wait).
    pub async fn close(mut self) {
        let _ = tokio::time::timeout(Duration::from_millis(500), self.ws.close(None)).await;
    }

    /// Drops the connection abruptly: the TCP connection closes without a WebSocket close
    /// frame, like a phone losing its network. Returns the newest resume token.
    pub fn abort(self) -> String {
        self.resume_token
    }
}
