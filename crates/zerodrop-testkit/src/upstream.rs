//! A fake application backend ("upstream") on a free loopback port, for the guardrail tests:
//! it records every request it gets and answers as told — fine, failing, slow — switchable
//! while the test runs, so a test can make it fail, slow down and recover on command.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::IntoResponse;

use crate::WAIT;

/// How the upstream answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// 200 at once.
    Ok,
    /// This status at once (e.g. 500, 503, 400).
    Status(u16),
    /// 200 after this long.
    Slow(Duration),
}

/// One request the upstream received.
#[derive(Clone, Debug)]
pub struct Received {
    pub method: String,
    /// Path and query.
    pub target: String,
    /// Header names in lower case.
    pub headers: BTreeMap<String, String>,
    pub body: String,
    /// The status it was (or, while a slow answer is pending, will be) answered with.
    pub status: u16,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

struct Shared {
    mode: Mutex<Mode>,
    received: Mutex<Vec<Received>>,
}

pub struct FakeUpstream {
    pub addr: SocketAddr,
    /// `http://127.0.0.1:<port>`.
    pub url: String,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

async fn answer(
    State(s): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> impl IntoResponse {
    let mode = *lock(&s.mode);
    let status = match mode {
        Mode::Ok | Mode::Slow(_) => 200,
        Mode::Status(c) => c,
    };
    let target = uri
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    // Recorded on arrival, so that a test sees a slow call while it is still in flight.
    let n = {
        let mut r = lock(&s.received);
        r.push(Received {
            method: method.to_string(),
            target: target.clone(),
            headers: headers
                .iter()
                .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
                .collect(),
            body: String::from_utf8_lossy(&body).into_owned(),
            status,
        });
        r.len()
    };
    if let Mode::Slow(d) = mode {
        tokio::time::sleep(d).await;
    }
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        code,
        [("content-type", "application/json")],
        serde_json::json!({"target": target, "n": n}).to_string(),
    )
}

impl FakeUpstream {
    pub async fn start() -> FakeUpstream {
        let shared = Arc::new(Shared {
            mode: Mutex::new(Mode::Ok),
            received: Mutex::new(Vec::new()),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port");
        let addr = listener.local_addr().expect("local addr");
        let app = axum::Router::new()
            .fallback(answer)
            .with_state(shared.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeUpstream {
            addr,
            url: format!("http://{addr}"),
            shared,
            task,
        }
    }

    pub fn set(&self, mode: Mode) {
        *lock(&self.shared.mode) = mode;
    }

    pub fn received(&self) -> Vec<Received> {
        lock(&self.shared.received).clone()
    }

    pub fn count(&self) -> usize {
        lock(&self.shared.received).len()
    }

    /// Waits (at most [`WAIT`]) until `pred` holds for what was received; panics otherwise.
    pub async fn wait_until(
        &self,
        what: &str,
        pred: impl Fn(&[Received]) -> bool,
    ) -> Vec<Received> {
        let deadline = Instant::now() + WAIT;
        loop {
            let r = self.received();
            if pred(&r) {
                return r;
            }
            if Instant::now() > deadline {
                panic!("upstream: {what} did not happen within {WAIT:?}; received {r:#?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}
