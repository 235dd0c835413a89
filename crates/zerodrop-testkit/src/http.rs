//! A small HTTP client for zerodrop's API, returning status, headers and JSON as they are.

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
}
