//! Authorization hooks (SPEC §9): the application's own backend decides whether a subject may
//! connect, subscribe to a stream or publish to it, beyond what its token grants.
//!
//! A hook is a §7 upstream (`--authz-upstream`, with its circuit breaker and bulkhead), asked
//! `POST <target><--authz-path> {sub, action, stream, claims}` and answering `{allow, ttlSec?,
//! reason?}`. Verdicts are cached per (sub, action, stream) for `ttlSec` (none: not cached);
//! questions asked at once for the same key share one call, so a reconnect storm of one
//! subject costs one call per key. A denial is 403 `FORBIDDEN` with the hook's `reason`; a
//! hook that fails, times out, is shed by its circuit or bulkhead, or answers anything but a
//! verdict refuses with 503 `AUTHZ_UNAVAILABLE` (fail closed). A live subscription allowed
//! for `ttlSec` is asked again when it runs out (the connection core's timer).
//!
//! Must not: decide by itself (no default allow when the hook cannot answer).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::OnceCell;
use zerodrop_core::{ErrorCode, Grants, StreamId};

use super::App;
use crate::config::Config;
use crate::error::ApiError;
use crate::guard::CallPath;

/// Cached verdicts kept at most (then the cache starts over).
const MAX_CACHED: usize = 100_000;
/// The longest `ttlSec` honoured.
const MAX_TTL: Duration = Duration::from_secs(86_400);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    Connect,
    Subscribe,
    Publish,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Connect => "connect",
            Action::Subscribe => "subscribe",
            Action::Publish => "publish",
        }
    }
}

/// A hook's answer.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Answer {
    allow: bool,
    #[serde(default)]
    ttl_sec: Option<u64>,
    #[serde(default)]
    reason: Option<String>,
}

/// A verdict and how long it holds (`None`: for this question only).
#[derive(Clone, Debug)]
struct Verdict {
    allow: bool,
    until: Option<Instant>,
    reason: Option<String>,
}

type Key = (String, Action, String);
type Asked = Arc<OnceCell<Result<Verdict, ApiError>>>;

pub struct Hooks {
    upstream: String,
    path: String,
    actions: Vec<Action>,
    cache: Mutex<HashMap<Key, Verdict>>,
    asking: Mutex<HashMap<Key, Asked>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Hooks {
    /// The hooks configured (`None` without `--authz-upstream`).
    pub fn from_config(cfg: &Config) -> Option<Hooks> {
        let upstream = cfg.authz_upstream.clone()?;
        let actions = cfg
            .authz_actions
            .split(',')
            .map(str::trim)
            .filter_map(|a| match a {
                "connect" => Some(Action::Connect),
                "subscribe" => Some(Action::Subscribe),
                "publish" => Some(Action::Publish),
                _ => None,
            })
            .collect();
        Some(Hooks {
            upstream,
            path: cfg.authz_path.clone(),
            actions,
            cache: Mutex::new(HashMap::new()),
            asking: Mutex::new(HashMap::new()),
        })
    }

    fn cached(&self, key: &Key) -> Option<Verdict> {
        let mut cache = lock(&self.cache);
        match cache.get(key) {
            Some(v) if v.until.is_some_and(|u| u > Instant::now()) => Some(v.clone()),
            Some(_) => {
                cache.remove(key);
                None
            }
            None => None,
        }
    }

    fn remember(&self, key: Key, v: &Verdict) {
        if v.until.is_none() {
            return;
        }
        let mut cache = lock(&self.cache);
        if cache.len() >= MAX_CACHED {
            let now = Instant::now();
            cache.retain(|_, v| v.until.is_some_and(|u| u > now));
            if cache.len() >= MAX_CACHED {
                cache.clear();
            }
        }
        cache.insert(key, v.clone());
    }
}

fn unavailable(why: &str) -> ApiError {
    ApiError::new(
        ErrorCode::AuthzUnavailable,
        format!("the authorization hook could not answer ({why}); try again shortly"),
    )
}

impl App {
    /// Whether `action` is asked of an authorization hook (`--authz-upstream`, its actions).
    pub fn asks_hook(&self, action: Action) -> bool {
        self.hooks
            .as_ref()
            .is_some_and(|h| h.actions.contains(&action))
    }

    /// Asks the hook (or its cache) whether `sub` may do `action` (on `stream`). `Ok(None)`:
    /// allowed (no hook for this action, or a verdict without `ttlSec`); `Ok(Some(t))`:
    /// allowed until `t`, when a live subscription is asked again; `Err`: `FORBIDDEN` (the
    /// hook's `reason`) or `AUTHZ_UNAVAILABLE`. Stream-level errors carry `stream`.
    pub async fn authorize(
        &self,
        sub: &str,
        grants: &Grants,
        action: Action,
        stream: Option<&StreamId>,
    ) -> Result<Option<Instant>, ApiError> {
        let Some(hooks) = &self.hooks else {
            return Ok(None);
        };
        if !hooks.actions.contains(&action) {
            return Ok(None);
        }
        let key: Key = (
            sub.to_string(),
            action,
            stream.map(|s| s.as_str().to_string()).unwrap_or_default(),
        );
        let verdict = match hooks.cached(&key) {
            Some(v) => v,
            None => {
                let cell: Asked = lock(&hooks.asking).entry(key.clone()).or_default().clone();
                let v = cell
                    .get_or_init(|| self.ask_hook(hooks, sub, grants, action, stream))
                    .await
                    .clone();
                {
                    let mut asking = lock(&hooks.asking);
                    if asking.get(&key).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
                        asking.remove(&key);
                    }
                }
                let v = v?;
                hooks.remember(key, &v);
                v
            }
        };
        let with_stream = |e: ApiError| match stream {
            Some(s) => e.with("stream", s.as_str()),
            None => e,
        };
        if !verdict.allow {
            let mut message = format!("the authorization hook denied {}", action.as_str());
            if let Some(s) = stream {
                message.push_str(&format!(" on {s}"));
            }
            if let Some(why) = &verdict.reason {
                message.push_str(": ");
                message.push_str(why);
            }
            let mut e = ApiError::forbidden(message);
            if let Some(why) = verdict.reason {
                e = e.with("reason", why);
            }
            return Err(with_stream(e));
        }
        Ok(verdict.until)
    }

    async fn ask_hook(
        &self,
        hooks: &Hooks,
        sub: &str,
        grants: &Grants,
        action: Action,
        stream: Option<&StreamId>,
    ) -> Result<Verdict, ApiError> {
        let body = json!({
            "sub": sub,
            "action": action.as_str(),
            "stream": stream.map(StreamId::as_str),
            "claims": {"sub": sub, "streams": grants.streams, "publish": grants.publish},
        });
        let asked = Instant::now();
        let answer = self
            .guard
            .call(
                &hooks.upstream,
                reqwest::Method::POST,
                CallPath::Configured(&hooks.path),
                Some(Bytes::from(body.to_string())),
                &[],
            )
            .await;
        let result = match answer {
            Ok(a) if a.status == 200 => match serde_json::from_slice::<Answer>(&a.body) {
                Ok(ans) => Ok(Verdict {
                    allow: ans.allow,
                    until: ans
                        .ttl_sec
                        .filter(|t| *t > 0)
                        .map(|t| asked + Duration::from_secs(t).min(MAX_TTL)),
                    reason: ans.reason.map(|r| r.chars().take(256).collect()),
                }),
                Err(_) => Err(unavailable("its answer is not {allow, ttlSec?, reason?}")),
            },
            Ok(a) => Err(unavailable(&format!("it answered {}", a.status))),
            Err(e) => Err(unavailable(&e.describe())),
        };
        let label = match &result {
            Ok(v) if v.allow => "allow",
            Ok(_) => "deny",
            Err(_) => "unavailable",
        };
        self.metrics.count(
            "zerodrop_authz_hook_calls_total",
            &[("action", action.as_str()), ("result", label)],
            1,
        );
        if let Err(e) = &result {
            tracing::warn!(action = action.as_str(), error = %e.message, "authorization hook unavailable");
        }
        result
    }
}
