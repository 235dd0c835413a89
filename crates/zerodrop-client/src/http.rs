//! The HTTP API of SPEC §3.
//!
//! Every call returns the server's typed error ([`ClientError::Http`] with the SPEC code) or
//! a network error; nothing is retried behind the caller's back, because the operator tools
//! must see every status the server produced. `publish` takes an `Idempotency-Key` so a caller
//! *can* retry safely.

use std::collections::BTreeMap;
use std::time::Duration;

use reqwest::header::{AUTHORIZATION, HeaderMap, RETRY_AFTER};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use serde_json::value::RawValue;

use crate::error::{ApiError, ClientError};
use crate::frames::Event;

/// The answer to a publish: `201 {stream, seq, epoch, duplicate}`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct Published {
    pub stream: String,
    pub seq: u64,
    pub epoch: String,
    #[serde(default)]
    pub duplicate: bool,
}

/// The answer to a webhook: `202 {source, scope, messageId, duplicate, hitCount, stream?,
/// seq?, jobId?}`. A duplicate is answered like the first (same `stream`, `seq`, `jobId`)
/// with `duplicate: true` and the number of duplicates so far in `hitCount`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WebhookAccepted {
    pub source: String,
    pub scope: String,
    pub message_id: String,
    #[serde(default)]
    pub duplicate: bool,
    #[serde(default)]
    pub hit_count: u64,
    /// The stream the body was appended to, when the source appends to one.
    #[serde(default)]
    pub stream: Option<String>,
    #[serde(default)]
    pub seq: Option<u64>,
    /// The delivery job, when the source delivers to an upstream.
    #[serde(default)]
    pub job_id: Option<u64>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StreamInfo {
    pub stream: String,
    pub epoch: String,
    pub head_seq: u64,
    #[serde(default)]
    pub first_seq: u64,
    #[serde(default)]
    pub count: u64,
    #[serde(default)]
    pub bytes: u64,
    #[serde(default)]
    pub hash: String,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EventsPage {
    pub stream: String,
    pub epoch: String,
    pub head_seq: u64,
    /// The oldest retained seq.
    #[serde(default)]
    pub first_seq: u64,
    /// `"asc"`, or `"desc"` (newest first) for a page before a seq or of the newest.
    #[serde(default)]
    pub order: String,
    pub events: Vec<Event>,
}

/// A page of `GET …/events` whose events are kept as the exact text the server sent: what
/// the stream digest is computed over (re-serialising a parsed event could change its bytes).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RawEventsPage {
    pub stream: String,
    pub epoch: String,
    pub head_seq: u64,
    pub events: Vec<Box<RawValue>>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionStream {
    #[serde(default)]
    pub epoch: String,
    #[serde(default)]
    pub head_seq: u64,
    #[serde(default)]
    pub last_ack_sequence: u64,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Session {
    pub session_id: String,
    pub resume_token: String,
    #[serde(default)]
    pub reconnect_window_sec: u64,
    #[serde(default)]
    pub instance: String,
    #[serde(default)]
    pub streams: BTreeMap<String, SessionStream>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Checkpoint {
    /// `applied` or `ignored`.
    pub ack_update: String,
    pub last_ack_sequence: u64,
}

/// One stream's replay window in a reconnect answer, or the reason it cannot be served.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplayEntry {
    #[serde(default)]
    pub epoch: Option<String>,
    #[serde(default)]
    pub from_seq: u64,
    #[serde(default)]
    pub to_seq: u64,
    #[serde(default)]
    pub events: Vec<Event>,
    #[serde(default)]
    pub complete: Option<bool>,
    #[serde(default)]
    pub error: Option<ApiError>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReconnectAnswer {
    pub session_id: String,
    pub resume_token: String,
    #[serde(default)]
    pub replay: BTreeMap<String, ReplayEntry>,
}

/// A status and JSON body, for routes the caller inspects whatever the status
/// (health, readiness, admin).
#[derive(Clone, Debug)]
pub struct Answer {
    pub status: u16,
    pub body: Value,
}

#[derive(Clone, Debug)]
pub struct HttpClient {
    base: String,
    api_key: Option<String>,
    http: reqwest::Client,
    /// No overall timeout: SSE bodies stay open for as long as the caller reads.
    streaming: reqwest::Client,
}

impl HttpClient {
    /// `base_url` is `http://host:port` (an optional path prefix is kept).
    pub fn new(base_url: &str, api_key: Option<String>) -> Result<HttpClient, ClientError> {
        Self::with_timeout(base_url, api_key, Duration::from_secs(10))
    }

    pub fn with_timeout(
        base_url: &str,
        api_key: Option<String>,
        timeout: Duration,
    ) -> Result<HttpClient, ClientError> {
        #[cfg(feature = "tls")]
        return Self::with_tls(base_url, api_key, timeout, crate::tls::Tls::current());
        #[cfg(not(feature = "tls"))]
        Self::build(base_url, api_key, timeout, |b| b)
    }

    /// [`HttpClient::with_timeout`] trusting the roots of `tls` for `https://` (the calls and
    /// the SSE bodies alike).
    #[cfg(feature = "tls")]
    pub fn with_tls(
        base_url: &str,
        api_key: Option<String>,
        timeout: Duration,
        tls: &crate::tls::Tls,
    ) -> Result<HttpClient, ClientError> {
        let config = tls.client_config();
        Self::build(base_url, api_key, timeout, move |b| {
            b.tls_backend_preconfigured(rustls::ClientConfig::clone(&config))
        })
    }

    fn build(
        base_url: &str,
        api_key: Option<String>,
        timeout: Duration,
        tls: impl Fn(reqwest::ClientBuilder) -> reqwest::ClientBuilder,
    ) -> Result<HttpClient, ClientError> {
        crate::ws_base(base_url)?;
        let build = |total: Option<Duration>| {
            let mut b = tls(reqwest::Client::builder())
                .connect_timeout(Duration::from_secs(5))
                .tcp_nodelay(true)
                .pool_idle_timeout(Duration::from_secs(30));
            if let Some(t) = total {
                b = b.timeout(t);
            }
            b.build().map_err(|e| ClientError::Network(e.to_string()))
        };
        Ok(HttpClient {
            base: base_url.trim_end_matches('/').to_string(),
            api_key,
            http: build(Some(timeout))?,
            streaming: build(None)?,
        })
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    pub fn api_key(&self) -> Option<&str> {
        self.api_key.as_deref()
    }

    pub(crate) fn streaming_client(&self) -> &reqwest::Client {
        &self.streaming
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub(crate) fn http_client(&self) -> &reqwest::Client {
        &self.http
    }

    pub(crate) fn api_key_header(&self) -> Result<String, ClientError> {
        self.api_key
            .as_deref()
            .map(|k| format!("Bearer {k}"))
            .ok_or_else(|| ClientError::Token("no API key configured".into()))
    }

    /// `POST /v1/streams/{stream}/events` with `{"data": data}`; `data` is JSON text.
    pub async fn publish(
        &self,
        stream: &str,
        data_json: &str,
        idempotency_key: Option<&str>,
    ) -> Result<Published, ClientError> {
        let mut req = self
            .http
            .post(self.url(&format!("/v1/streams/{stream}/events")))
            .header(AUTHORIZATION, self.api_key_header()?)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(format!("{{\"data\":{data_json}}}"));
        if let Some(k) = idempotency_key {
            req = req.header("Idempotency-Key", k);
        }
        expect_json(req.send().await).await
    }

    /// `POST /v1/webhooks/{source}` with `body_json` as the body, as a webhook provider sends
    /// it; `idempotency_key` goes in the `Idempotency-Key` header (the default place a source
    /// reads the message id from).
    pub async fn webhook(
        &self,
        source: &str,
        body_json: &str,
        idempotency_key: Option<&str>,
    ) -> Result<WebhookAccepted, ClientError> {
        let mut req = self
            .http
            .post(self.url(&format!("/v1/webhooks/{source}")))
            .header(AUTHORIZATION, self.api_key_header()?)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body_json.to_string());
        if let Some(k) = idempotency_key {
            req = req.header("Idempotency-Key", k);
        }
        expect_json(req.send().await).await
    }

    /// `GET /v1/streams/{stream}` (api key).
    pub async fn stream_info(&self, stream: &str) -> Result<StreamInfo, ClientError> {
        let req = self
            .http
            .get(self.url(&format!("/v1/streams/{stream}")))
            .header(AUTHORIZATION, self.api_key_header()?);
        expect_json(req.send().await).await
    }

    /// `GET /v1/streams/{stream}/events?after=N&limit=M`, with the api key or, when given, a
    /// connect token.
    pub async fn read_events(
        &self,
        stream: &str,
        after: u64,
        limit: u32,
        connect_token: Option<&str>,
    ) -> Result<EventsPage, ClientError> {
        self.events_page(stream, after, limit, connect_token).await
    }

    /// [`HttpClient::read_events`] with every event as the exact JSON text served.
    pub async fn read_events_raw(
        &self,
        stream: &str,
        after: u64,
        limit: u32,
    ) -> Result<RawEventsPage, ClientError> {
        self.events_page(stream, after, limit, None).await
    }

    async fn events_page<T: DeserializeOwned>(
        &self,
        stream: &str,
        after: u64,
        limit: u32,
        connect_token: Option<&str>,
    ) -> Result<T, ClientError> {
        let auth = match connect_token {
            Some(t) => format!("Bearer {t}"),
            None => self.api_key_header()?,
        };
        let req = self
            .http
            .get(self.url(&format!("/v1/streams/{stream}/events")))
            .query(&[("after", after.to_string()), ("limit", limit.to_string())])
            .header(AUTHORIZATION, auth);
        expect_json(req.send().await).await
    }

    /// One page of `GET /v1/streams/{stream}/presence` (after `cursor`), with the api key or,
    /// when given, a connect token.
    pub async fn presence(
        &self,
        stream: &str,
        cursor: Option<&str>,
        connect_token: Option<&str>,
    ) -> Result<crate::presence::PresencePage, ClientError> {
        let auth = match connect_token {
            Some(t) => format!("Bearer {t}"),
            None => self.api_key_header()?,
        };
        let mut req = self
            .http
            .get(self.url(&format!("/v1/streams/{stream}/presence")))
            .header(AUTHORIZATION, auth);
        if let Some(c) = cursor {
            req = req.query(&[("cursor", c)]);
        }
        expect_json(req.send().await).await
    }

    /// `POST /v1/sessions` with a connect token.
    pub async fn open_session(
        &self,
        connect_token: &str,
        streams: &[String],
    ) -> Result<Session, ClientError> {
        let req = self
            .http
            .post(self.url("/v1/sessions"))
            .header(AUTHORIZATION, format!("Bearer {connect_token}"))
            .json(&serde_json::json!({ "streams": streams }));
        expect_json(req.send().await).await
    }

    /// `POST /v1/sessions/{id}/checkpoint` with the resume token.
    pub async fn checkpoint(
        &self,
        session_id: &str,
        resume_token: &str,
        stream: &str,
        seq: u64,
    ) -> Result<Checkpoint, ClientError> {
        let req = self
            .http
            .post(self.url(&format!("/v1/sessions/{session_id}/checkpoint")))
            .header(AUTHORIZATION, format!("Bearer {resume_token}"))
            .json(&serde_json::json!({ "stream": stream, "seq": seq }));
        expect_json(req.send().await).await
    }

    /// `POST /v1/sessions/{id}/reconnect`.
    pub async fn reconnect(
        &self,
        session_id: &str,
        resume_token: &str,
        last_ack: Option<&BTreeMap<String, u64>>,
    ) -> Result<ReconnectAnswer, ClientError> {
        let mut body = serde_json::json!({ "resumeToken": resume_token });
        if let Some(l) = last_ack {
            body["lastAckSequence"] = serde_json::to_value(l).unwrap_or(Value::Null);
        }
        let req = self
            .http
            .post(self.url(&format!("/v1/sessions/{session_id}/reconnect")))
            .json(&body);
        expect_json(req.send().await).await
    }

    /// Any GET whose status and JSON body the caller judges itself (`/health`,
    /// `/health/ready`, `/metrics?format=json`). A non-JSON body becomes a JSON string.
    pub async fn get_answer(
        &self,
        path: &str,
        bearer: Option<&str>,
    ) -> Result<Answer, ClientError> {
        let mut req = self.http.get(self.url(path));
        if let Some(b) = bearer {
            req = req.header(AUTHORIZATION, format!("Bearer {b}"));
        }
        answer(req.send().await).await
    }

    /// A POST with a JSON body whose status and body the caller judges (admin routes).
    pub async fn post_answer(
        &self,
        path: &str,
        bearer: Option<&str>,
        body: &Value,
    ) -> Result<Answer, ClientError> {
        let mut req = self.http.post(self.url(path)).json(body);
        if let Some(b) = bearer {
            req = req.header(AUTHORIZATION, format!("Bearer {b}"));
        }
        answer(req.send().await).await
    }

    /// `GET /metrics?format=json`.
    pub async fn metrics_json(&self) -> Result<Value, ClientError> {
        let a = self.get_answer("/metrics?format=json", None).await?;
        if a.status != 200 {
            return Err(ClientError::Protocol(format!(
                "/metrics?format=json answered {}",
                a.status
            )));
        }
        Ok(a.body)
    }
}

pub(crate) fn retry_after(h: &HeaderMap) -> Option<Duration> {
    h.get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
}

pub(crate) async fn expect_json<T: DeserializeOwned>(
    sent: Result<reqwest::Response, reqwest::Error>,
) -> Result<T, ClientError> {
    let resp = sent.map_err(ClientError::from_reqwest)?;
    let status = resp.status().as_u16();
    let ra = retry_after(resp.headers());
    let body = resp.bytes().await.map_err(ClientError::from_reqwest)?;
    if !(200..300).contains(&status) {
        return Err(ClientError::from_body(status, &body, ra));
    }
    serde_json::from_slice(&body).map_err(|e| {
        ClientError::Protocol(format!(
            "unexpected {status} body ({e}): {}",
            String::from_utf8_lossy(&body[..body.len().min(200)])
        ))
    })
}

async fn answer(sent: Result<reqwest::Response, reqwest::Error>) -> Result<Answer, ClientError> {
    let resp = sent.map_err(ClientError::from_reqwest)?;
    let status = resp.status().as_u16();
    let body = resp.bytes().await.map_err(ClientError::from_reqwest)?;
    let body = serde_json::from_slice(&body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
    Ok(Answer { status, body })
}
