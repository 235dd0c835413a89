//! The upstream side (SPEC §7), wired: named upstreams behind circuit breakers (one per
//! target, failover to the secondary while the primary is open) and a bulkhead, the response
//! cache for their GETs, and the job worker that delivers queued jobs to them.
//!
//! The state machines are `zerodrop-guard`'s and the queue is the store's; this module only
//! makes the calls and moves jobs between them, and keeps the circuit gauges in step with the
//! breakers (also when time alone moves one, see [`worker::spawn_circuit_gauges`]).
//!
//! Must not: import the app or the HTTP layer (the app holds a [`Guard`]; the tasks that
//! need the app are in [`worker`], the routes in [`routes`]).

pub mod config;
pub mod path;
pub mod routes;
pub mod worker;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use serde_json::{Value, json};
use zerodrop_guard::Clock;
use zerodrop_guard::bulkhead::Bulkhead;
use zerodrop_guard::cache::ResponseCache;
use zerodrop_guard::circuit::{CircuitBreaker, CircuitState, Outcome};

use crate::metrics::Metrics;
use config::{GuardConfig, UpstreamConfig};
use path::ClientPath;

/// One way to reach an upstream (its primary or its secondary).
pub struct Target {
    /// `primary` or `secondary`.
    pub role: &'static str,
    /// The configured URL without a trailing `/`.
    pub url: String,
    /// The same, parsed: client paths are built below it.
    pub base: reqwest::Url,
    pub circuit: CircuitBreaker,
}

/// Where below a target a call goes.
#[derive(Clone, Copy, Debug)]
pub enum CallPath<'a> {
    /// An operator's setting (`deliver_path`), appended as it is.
    Configured(&'a str),
    /// A client's path: appended segment by segment, and only if it stays below the target.
    Client(&'a ClientPath),
}

impl CallPath<'_> {
    fn url(&self, t: &Target) -> Option<String> {
        match self {
            CallPath::Configured(p) => Some(format!("{}{p}", t.url)),
            CallPath::Client(p) => p.under(&t.base).map(String::from),
        }
    }
}

pub struct Upstream {
    pub name: String,
    pub cfg: UpstreamConfig,
    pub targets: Vec<Target>,
    pub bulkhead: Bulkhead,
    pub namespace: String,
}

/// An upstream's answer.
#[derive(Clone, Debug)]
pub struct Answer {
    pub status: u16,
    pub content_type: Option<String>,
    pub body: Bytes,
    /// Which target answered (`primary` or `secondary`).
    pub target: &'static str,
}

/// Why a call did not get an answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CallError {
    UnknownUpstream,
    /// The bulkhead is full: no call was made.
    Saturated {
        retry_after_ms: u64,
    },
    /// Every target's circuit is open: no call was made.
    Open {
        retry_after_ms: u64,
    },
    /// The call was made and timed out.
    Timeout {
        target: &'static str,
    },
    /// The call was made and could not complete (connection refused, reset, …).
    Failed {
        target: &'static str,
        detail: String,
    },
    /// The path would leave the target's base URL: no call was made.
    OutsideBase {
        target: &'static str,
    },
}

impl CallError {
    /// Whether the upstream was never reached (nothing to count against the job's attempts).
    pub fn not_attempted(&self) -> bool {
        matches!(
            self,
            CallError::Saturated { .. }
                | CallError::Open { .. }
                | CallError::UnknownUpstream
                | CallError::OutsideBase { .. }
        )
    }

    pub fn describe(&self) -> String {
        match self {
            CallError::UnknownUpstream => "no such upstream is configured".into(),
            CallError::Saturated { retry_after_ms } => {
                format!("bulkhead full; retry in {retry_after_ms} ms")
            }
            CallError::Open { retry_after_ms } => {
                format!("every circuit is open; retry in {retry_after_ms} ms")
            }
            CallError::Timeout { target } => format!("{target} timed out"),
            CallError::Failed { target, detail } => format!("{target} failed: {detail}"),
            CallError::OutsideBase { target } => {
                format!("the path would leave the {target}'s base URL")
            }
        }
    }
}

pub struct Guard {
    pub cfg: GuardConfig,
    pub upstreams: BTreeMap<String, Upstream>,
    pub cache: ResponseCache<Answer>,
    pub clock: Arc<dyn Clock>,
    http: reqwest::Client,
    /// Rung on every enqueue so the worker claims at once instead of at its next poll.
    pub wake: tokio::sync::Notify,
    /// Rung when a call leaves a breaker open, so the gauge task learns its cooldown's end.
    circuit_opened: tokio::sync::Notify,
    metrics: Arc<Metrics>,
}

impl Guard {
    /// The guardrails over `clock` (the server's: leases and job times are on the same time
    /// line as every other expiry).
    pub fn new(
        cfg: GuardConfig,
        metrics: Arc<Metrics>,
        clock: Arc<dyn Clock>,
    ) -> anyhow::Result<Guard> {
        let cache = ResponseCache::new(cfg.cache_max_entries, clock.clone());
        let mut upstreams = BTreeMap::new();
        for (name, u) in &cfg.upstreams {
            let mut targets = Vec::new();
            let urls = std::iter::once(("primary", &u.primary))
                .chain(u.secondary.iter().map(|s| ("secondary", s)));
            for (role, url) in urls {
                let circuit =
                    CircuitBreaker::new(format!("{name}/{role}"), u.circuit.clone(), clock.clone())
                        .map_err(|e| anyhow::anyhow!("upstreams.{name}.circuit: {e}"))?;
                let url = url.trim_end_matches('/').to_string();
                let base = reqwest::Url::parse(&url)
                    .map_err(|e| anyhow::anyhow!("upstreams.{name}.{role}: `{url}`: {e}"))?;
                targets.push(Target {
                    role,
                    url,
                    base,
                    circuit,
                });
                metrics.set(
                    "zerodrop_circuit_state",
                    &[("upstream", name), ("target", role)],
                    0.0,
                );
            }
            let bulkhead = Bulkhead::new(name.clone(), u.bulkhead.clone(), clock.clone())
                .map_err(|e| anyhow::anyhow!("upstreams.{name}.bulkhead: {e}"))?;
            metrics.set("zerodrop_bulkhead_in_flight", &[("upstream", name)], 0.0);
            metrics.count("zerodrop_bulkhead_rejected_total", &[("upstream", name)], 0);
            metrics.count("zerodrop_jobs_completed_total", &[("upstream", name)], 0);
            for outcome in ["retry", "dead"] {
                metrics.count(
                    "zerodrop_jobs_failed_total",
                    &[("upstream", name), ("outcome", outcome)],
                    0,
                );
            }
            let namespace = u.cache_namespace.clone().unwrap_or_else(|| name.clone());
            cache.set_version(&namespace, u.cache_version);
            upstreams.insert(
                name.clone(),
                Upstream {
                    name: name.clone(),
                    cfg: u.clone(),
                    targets,
                    bulkhead,
                    namespace,
                },
            );
        }
        for source in cfg.webhooks.keys() {
            for result in ["accepted", "duplicate", "reused"] {
                metrics.count(
                    "zerodrop_webhooks_total",
                    &[("source", source), ("result", result)],
                    0,
                );
            }
        }
        let http = reqwest::Client::builder()
            .pool_idle_timeout(Duration::from_secs(30))
            .build()?;
        Ok(Guard {
            cfg,
            upstreams,
            cache,
            clock,
            http,
            wake: tokio::sync::Notify::new(),
            circuit_opened: tokio::sync::Notify::new(),
            metrics,
        })
    }

    pub fn enabled(&self) -> bool {
        !self.upstreams.is_empty() || !self.cfg.webhooks.is_empty()
    }

    /// One call to the upstream `name`: through its bulkhead, to the first target whose
    /// circuit lets it through; the outcome is counted by that circuit (5xx, a timeout or a
    /// failed connection is a failure; the breaker itself measures slowness).
    pub async fn call(
        &self,
        name: &str,
        method: reqwest::Method,
        path: CallPath<'_>,
        body: Option<Bytes>,
        headers: &[(&str, String)],
    ) -> Result<Answer, CallError> {
        let up = self.upstreams.get(name).ok_or(CallError::UnknownUpstream)?;
        let lease = match up.bulkhead.acquire() {
            Ok(l) => l,
            Err(s) => {
                self.metrics
                    .count("zerodrop_bulkhead_rejected_total", &[("upstream", name)], 1);
                return Err(CallError::Saturated {
                    retry_after_ms: s.retry_after_ms,
                });
            }
        };
        self.in_flight_gauge(up);
        let result = self.call_target(up, method, path, body, headers).await;
        up.bulkhead.release(&lease);
        self.in_flight_gauge(up);
        result
    }

    async fn call_target(
        &self,
        up: &Upstream,
        method: reqwest::Method,
        path: CallPath<'_>,
        body: Option<Bytes>,
        headers: &[(&str, String)],
    ) -> Result<Answer, CallError> {
        // Every target's URL first: a path that leaves any base is refused before a permit is
        // taken (the route has checked already; this is the last word before a call).
        let mut urls = Vec::with_capacity(up.targets.len());
        for t in &up.targets {
            urls.push(
                path.url(t)
                    .ok_or(CallError::OutsideBase { target: t.role })?,
            );
        }
        let mut wait = u64::MAX;
        let mut chosen = None;
        for (t, url) in up.targets.iter().zip(urls) {
            match t.circuit.acquire() {
                Ok(permit) => {
                    chosen = Some((t, url, permit));
                    break;
                }
                Err(r) => wait = wait.min(r.retry_after_ms),
            }
        }
        self.circuit_gauges(up);
        let Some((target, url, permit)) = chosen else {
            return Err(CallError::Open {
                retry_after_ms: wait,
            });
        };
        let mut req = self
            .http
            .request(method, url)
            .timeout(Duration::from_millis(up.cfg.timeout_ms));
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        if let Some(b) = body {
            req = req.header("content-type", "application/json").body(b);
        }
        let sent = async {
            let res = req.send().await?;
            let status = res.status().as_u16();
            let content_type = res
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .map(String::from);
            let body = res.bytes().await?;
            Ok::<_, reqwest::Error>((status, content_type, body))
        }
        .await;
        let (outcome, result, label) = match sent {
            Ok((status, content_type, body)) => {
                let answer = Answer {
                    status,
                    content_type,
                    body,
                    target: target.role,
                };
                if status >= 500 {
                    (Outcome::Failure, Ok(answer), "5xx")
                } else {
                    (Outcome::Success, Ok(answer), "ok")
                }
            }
            Err(e) if e.is_timeout() => (
                Outcome::Failure,
                Err(CallError::Timeout {
                    target: target.role,
                }),
                "timeout",
            ),
            Err(e) => (
                Outcome::Failure,
                Err(CallError::Failed {
                    target: target.role,
                    detail: error_chain(&e),
                }),
                "error",
            ),
        };
        target.circuit.complete(permit, outcome);
        self.circuit_gauges(up);
        self.metrics.count(
            "zerodrop_upstream_requests_total",
            &[
                ("upstream", &up.name),
                ("target", target.role),
                ("result", label),
            ],
            1,
        );
        result
    }

    /// Sets `zerodrop_circuit_state` of `up`'s targets to their state now.
    fn circuit_gauges(&self, up: &Upstream) {
        let mut open = false;
        for t in &up.targets {
            let state = t.circuit.state();
            open |= state == CircuitState::Open;
            self.metrics.set(
                "zerodrop_circuit_state",
                &[("upstream", &up.name), ("target", t.role)],
                gauge_value(state),
            );
        }
        if open {
            self.circuit_opened.notify_one();
        }
    }

    /// Every circuit gauge set to its breaker's state now; returns when time alone next moves
    /// one of them (the earliest end of a cooldown), if it will.
    pub fn refresh_circuit_gauges(&self) -> Option<u64> {
        let mut due = None;
        for up in self.upstreams.values() {
            for t in &up.targets {
                let state = t.circuit.state();
                self.metrics.set(
                    "zerodrop_circuit_state",
                    &[("upstream", &up.name), ("target", t.role)],
                    gauge_value(state),
                );
                if let Some(at) = t.circuit.next_change_at_ms() {
                    due = Some(due.map_or(at, |d: u64| d.min(at)));
                }
            }
        }
        due
    }

    fn in_flight_gauge(&self, up: &Upstream) {
        self.metrics.set(
            "zerodrop_bulkhead_in_flight",
            &[("upstream", &up.name)],
            f64::from(up.bulkhead.in_flight()),
        );
    }

    /// `GET /admin/circuits`: every breaker, at most `limit`.
    pub fn circuits(&self, limit: usize) -> Value {
        // Reading the breakers may move them (a cooldown that ended): the gauges follow.
        self.refresh_circuit_gauges();
        let list: Vec<Value> = self
            .upstreams
            .values()
            .flat_map(|u| {
                u.targets.iter().map(move |t| {
                    let mut v = json!(t.circuit.snapshot());
                    v["upstream"] = json!(u.name);
                    v["target"] = json!(t.role);
                    v["url"] = json!(t.url);
                    v
                })
            })
            .take(limit)
            .collect();
        json!(list)
    }

    /// `GET /admin/bulkheads`: one upstream's or every bulkhead, each with at most `limit`
    /// leases.
    pub fn bulkheads(&self, provider: Option<&str>, limit: usize) -> Value {
        let list: Vec<Value> = self
            .upstreams
            .values()
            .filter(|u| provider.is_none_or(|p| p == u.name))
            .map(|u| json!(u.bulkhead.snapshot(limit)))
            .collect();
        json!(list)
    }

    pub fn in_flight_by_provider(&self) -> Value {
        let m: serde_json::Map<String, Value> = self
            .upstreams
            .values()
            .map(|u| (u.name.clone(), json!(u.bulkhead.in_flight())))
            .collect();
        Value::Object(m)
    }
}

/// `zerodrop_circuit_state`'s value for a state (docs/metrics.md).
fn gauge_value(state: CircuitState) -> f64 {
    match state {
        CircuitState::Closed => 0.0,
        CircuitState::HalfOpen => 1.0,
        CircuitState::Open => 2.0,
    }
}

/// Per-class counts as a JSON object keyed by class name.
pub fn by_class(m: &std::collections::BTreeMap<zerodrop_store::QosClass, u64>) -> Value {
    let o: serde_json::Map<String, Value> = m
        .iter()
        .map(|(c, n)| (c.as_str().to_string(), json!(n)))
        .collect();
    Value::Object(o)
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
