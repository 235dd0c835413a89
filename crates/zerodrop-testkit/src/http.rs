//! A small HTTP client for zerodrop's API, returning status, headers and JSON as they are.

use std::time::Duration;

use reqwest::Method;
use reqwest::header::HeaderMap;
use serde_json::Value;

use crate::server::Creds;

#[derive(Clone)]
pub struct Api {
    pub base: String,
    pub client: reqwest::Client,
    pub creds: Creds,
}

#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: HeaderMap,
    pub text: String,
    pub json: Value,
}

impl Resp {
    /// The `error.code` of a typed error body.
    pub fn code(&self) -> &str {
        self.json["error"]["code"].as_str().unwrap_or("")
    }
}

impl Api {
    pub fn new(base: &str, creds: &Creds) -> Api {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(64)
            .build()
            .expect("http client");
        Api {
            base: base.trim_end_matches('/').to_string(),
            client,
            creds: creds.clone(),
        }
    }

    pub async fn request(
        &self,
        method: Method,
        path: &str,
        bearer: Option<&str>,
        body: Option<String>,
        headers: &[(&str, &str)],
    ) -> Resp {
        let mut r = self
            .client
            .request(method, format!("{}{}", self.base, path));
        if let Some(b) = bearer {
            r = r.bearer_auth(b);
        }
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        if let Some(b) = body {
            r = r.header("content-type", "application/json").body(b);
        }
        let res = r.send().await.expect("request sent");
        let status = res.status().as_u16();
        let headers = res.headers().clone();
        let text = res.text().await.unwrap_or_default();
        let json = serde_json::from_str(&text).unwrap_or(Value::Null);
        Resp {
            status,
            headers,
            text,
            json,
        }
    }

    pub async fn get(&self, path: &str, bearer: Option<&str>) -> Resp {
        self.request(Method::GET, path, bearer, None, &[]).await
    }

    pub async fn post(&self, path: &str, bearer: Option<&str>, body: Value) -> Resp {
        self.request(Method::POST, path, bearer, Some(body.to_string()), &[])
            .await
    }

    /// `POST /v1/sessions/{sid}/reconnect` with `resume_token` and nothing else in the body.
    pub async fn reconnect(&self, sid: &str, resume_token: &str) -> Resp {
        self.post(
            &format!("/v1/sessions/{sid}/reconnect"),
            None,
            serde_json::json!({"resumeToken": resume_token}),
        )
        .await
    }

    /// Publishes `data` with the api key; panics unless it is stored (201).
    pub async fn publish(&self, stream: &str, data: Value) -> Value {
        let r = self.try_publish(stream, data).await;
        assert_eq!(r.status, 201, "publish failed: {}", r.text);
        r.json
    }

    pub async fn try_publish(&self, stream: &str, data: Value) -> Resp {
        let body = serde_json::json!({ "data": data }).to_string();
        let path = format!("/v1/streams/{stream}/events");
        self.request(
            Method::POST,
            &path,
            Some(&self.creds.api_key.clone()),
            Some(body),
            &[],
        )
        .await
    }

    /// Events after `after` (api key).
    pub async fn read(&self, stream: &str, after: u64, limit: usize) -> Resp {
        let path = format!("/v1/streams/{stream}/events?after={after}&limit={limit}");
        self.get(&path, Some(&self.creds.api_key.clone())).await
    }

    pub async fn info(&self, stream: &str) -> Value {
        let r = self
            .get(
                &format!("/v1/streams/{stream}"),
                Some(&self.creds.api_key.clone()),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        r.json
    }

    pub async fn metrics_json(&self) -> Value {
        self.get("/metrics?format=json", None).await.json
    }

    /// Publishes `n` events of a little more than `pad` bytes each on `stream`
    /// (`{"i": 1..=n, "pad": "xx…"}`), one after the other.
    pub async fn publish_padded(&self, stream: &str, n: u64, pad: usize) {
        let pad = "x".repeat(pad);
        for i in 1..=n {
            self.publish(stream, serde_json::json!({"i": i, "pad": pad}))
                .await;
        }
    }

    /// Polls, for at most `within`, until no WebSocket or SSE connection is left: the
    /// `ws_active` and `sse_active` gauges of the JSON metrics view and the taken connection
    /// slots (`sessionsRemaining` of the drain status) all at 0. The last figures seen, as
    /// `(ws_active, sse_active, slots)`.
    pub async fn await_no_connections(&self, within: Duration) -> (u64, u64, u64) {
        let until = tokio::time::Instant::now() + within;
        let admin = self.creds.admin_token.clone();
        loop {
            let m = self.metrics_json().await;
            let st = self.get("/admin/drain/status", Some(&admin)).await.json;
            let seen = (
                m["ws_metrics"]["ws_active"].as_u64().unwrap_or(u64::MAX),
                m["ws_metrics"]["sse_active"].as_u64().unwrap_or(u64::MAX),
                st["sessionsRemaining"].as_u64().unwrap_or(u64::MAX),
            );
            if seen == (0, 0, 0) || tokio::time::Instant::now() >= until {
                return seen;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
