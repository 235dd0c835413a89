//! Every figure the server reports, recorded in one place.
//!
//! Each method updates both views at once: the Prometheus exposition (`metrics` handles
//! registered on a per-instance `PrometheusRecorder`, so several servers can live in one
//! process, e.g. in tests) and the JSON view of SPEC §6 (atomics and HDR histograms). Names,
//! labels and meanings are the SPEC's; `docs/metrics.md` repeats them for dashboards.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram as Hdr;
use metrics::{Counter, Gauge, Histogram, Key, KeyName, Label, Metadata, Recorder, SharedString};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};
use serde_json::{Map, Value, json};
use zerodrop_core::ErrorCode;
use zerodrop_store::Durability;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Transport {
    Ws,
    Sse,
    Http,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Ws => "ws",
            Transport::Sse => "sse",
            Transport::Http => "http",
        }
    }
}

const LATENCY_BUCKETS: &[f64] = &[
    0.0002, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];
const RTT_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// Routes listed in the JSON view even before their first request.
/// The API's routes, each with its success status: listed (at 0) in the JSON view before
/// their first request, so a dashboard sees every route from the start.
const KNOWN_ROUTES: &[(&str, u16)] = &[
    ("POST /v1/streams/{stream}/events", 201),
    ("GET /v1/streams/{stream}", 200),
    ("GET /v1/streams/{stream}/events", 200),
    ("POST /v1/sessions", 201),
    ("POST /v1/sessions/{id}/checkpoint", 200),
    ("POST /v1/sessions/{id}/reconnect", 200),
    ("POST /v1/sessions/{id}/refresh", 200),
];

/// One route template and method (`"METHOD route"`): its counts and latencies for the JSON
/// view, and its Prometheus series (registered on first use).
struct RouteStat {
    count: u64,
    status: BTreeMap<u16, u64>,
    latency_us: Hdr<u64>,
    /// `zerodrop_http_requests_total` by status.
    counters: Vec<(u16, Counter)>,
    /// `zerodrop_http_request_duration_seconds`.
    duration: Option<Histogram>,
}

impl RouteStat {
    fn new() -> RouteStat {
        RouteStat {
            count: 0,
            status: BTreeMap::new(),
            latency_us: new_hdr(),
            counters: Vec::new(),
            duration: None,
        }
    }

    fn expecting(status: u16) -> RouteStat {
        let mut r = RouteStat::new();
        r.status.insert(status, 0);
        r
    }
}

fn new_hdr() -> Hdr<u64> {
    // 1 µs .. 1 h, 3 significant digits: the bounds are constants, so this cannot fail.
    Hdr::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

pub struct Metrics {
    handle: PrometheusHandle,
    recorder: PrometheusRecorder,

    ws_active: Gauge,
    sse_active: Gauge,
    store_up: Gauge,
    /// `zerodrop_store_durability{level}`, one per level in [`Durability::ALL`]'s order.
    store_durability: [Gauge; 4],
    drain_state: Gauge,
    connections_ws: Counter,
    connections_sse: Counter,
    ws_reconnects: Counter,
    resumes: [Counter; 3],
    dropped: Counter,
    published: Counter,
    delivered: Counter,
    replayed: Counter,
    trims: Counter,
    checkpoints_applied: Counter,
    checkpoints_ignored: Counter,
    upgrades_blocked: Counter,
    process: Option<ProcessGauges>,
    rtt: Histogram,
    publish_to_deliver: Histogram,
    failures: Mutex<HashMap<(Transport, ErrorCode), Counter>>,
    /// The guardrails' labelled series (`rate_limited_total`, `jobs_*`, `circuit_state`, …).
    labelled_counters: Mutex<HashMap<String, Counter>>,
    labelled_gauges: Mutex<HashMap<String, Gauge>>,
    n_rate_limited: AtomicU64,

    // JSON view.
    n_ws_active: AtomicI64,
    n_sse_active: AtomicI64,
    n_ws_reconnects: AtomicU64,
    n_ws_resumes: AtomicU64,
    n_ws_resume_failures: AtomicU64,
    n_resumes: AtomicU64,
    n_resume_failures: AtomicU64,
    n_dropped: AtomicU64,
    n_published: AtomicU64,
    n_trimmed: AtomicU64,
    n_upgrades_blocked: AtomicU64,
    rtt_us: Mutex<Hdr<u64>>,
    /// Every route's series, HTTP and JSON view, by `"METHOD route"`: one lookup a request.
    routes: Mutex<HashMap<String, RouteStat>>,
    errors: Mutex<BTreeMap<&'static str, u64>>,
}

/// Facts about the store for the JSON view, gathered by the caller.
pub struct StoreFacts {
    pub kind: &'static str,
    pub up: bool,
    pub durability: Durability,
    pub sessions: u64,
    pub streams: u64,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut b = PrometheusBuilder::new();
        for (name, buckets) in [
            ("zerodrop_rtt_seconds", RTT_BUCKETS),
            ("zerodrop_http_request_duration_seconds", LATENCY_BUCKETS),
            ("zerodrop_publish_to_deliver_seconds", LATENCY_BUCKETS),
        ] {
            b = b
                .set_buckets_for_metric(Matcher::Full(name.into()), buckets)
                .expect("bucket lists are non-empty constants");
        }
        let recorder = b.build_recorder();
        let handle = recorder.handle();
        describe(&recorder);
        let meta = Metadata::new("zerodrop", metrics::Level::INFO, None);
        let counter = |name: &str, labels: &[(&str, &str)]| {
            recorder.register_counter(&key(name, labels), &meta)
        };
        let gauge = |name: &str| recorder.register_gauge(&key(name, &[]), &meta);
        let hist = |name: &str| recorder.register_histogram(&key(name, &[]), &meta);
        let build_info =
            recorder.register_gauge(&key("zerodrop_build_info", &build_labels()), &meta);
        build_info.set(1.0);
        let m = Metrics {
            process: ProcessGauges::register(&gauge),
            ws_active: gauge("zerodrop_ws_active"),
            sse_active: gauge("zerodrop_sse_active"),
            store_up: gauge("zerodrop_store_up"),
            store_durability: Durability::ALL.map(|d| {
                recorder.register_gauge(
                    &key("zerodrop_store_durability", &[("level", d.as_str())]),
                    &meta,
                )
            }),
            drain_state: gauge("zerodrop_drain_state"),
            connections_ws: counter("zerodrop_connections_total", &[("transport", "ws")]),
            connections_sse: counter("zerodrop_connections_total", &[("transport", "sse")]),
            ws_reconnects: counter("zerodrop_ws_reconnects_total", &[]),
            resumes: [
                counter("zerodrop_resumes_total", &[("transport", "ws")]),
                counter("zerodrop_resumes_total", &[("transport", "sse")]),
                counter("zerodrop_resumes_total", &[("transport", "http")]),
            ],
            dropped: counter("zerodrop_dropped_messages_total", &[]),
            published: counter("zerodrop_events_published_total", &[]),
            delivered: counter("zerodrop_events_delivered_total", &[]),
            replayed: counter("zerodrop_events_replayed_total", &[]),
            trims: counter("zerodrop_buffer_trims_total", &[]),
            checkpoints_applied: counter("zerodrop_checkpoints_total", &[("result", "applied")]),
            checkpoints_ignored: counter("zerodrop_checkpoints_total", &[("result", "ignored")]),
            upgrades_blocked: counter("zerodrop_upgrades_blocked_during_drain_total", &[]),
            rtt: hist("zerodrop_rtt_seconds"),
            publish_to_deliver: hist("zerodrop_publish_to_deliver_seconds"),
            failures: Mutex::new(HashMap::new()),
            labelled_counters: Mutex::new(HashMap::new()),
            labelled_gauges: Mutex::new(HashMap::new()),
            n_rate_limited: AtomicU64::new(0),
            n_ws_active: AtomicI64::new(0),
            n_sse_active: AtomicI64::new(0),
            n_ws_reconnects: AtomicU64::new(0),
            n_ws_resumes: AtomicU64::new(0),
            n_ws_resume_failures: AtomicU64::new(0),
            n_resumes: AtomicU64::new(0),
            n_resume_failures: AtomicU64::new(0),
            n_dropped: AtomicU64::new(0),
            n_published: AtomicU64::new(0),
            n_trimmed: AtomicU64::new(0),
            n_upgrades_blocked: AtomicU64::new(0),
            rtt_us: Mutex::new(new_hdr()),
            routes: Mutex::new(
                KNOWN_ROUTES
                    .iter()
                    .map(|(r, ok)| (r.to_string(), RouteStat::expecting(*ok)))
                    .collect(),
            ),
            errors: Mutex::new(ErrorCode::ALL.iter().map(|c| (c.as_str(), 0)).collect()),
            handle,
            recorder,
        };
        // Present from the first scrape, so alerts on them have data.
        m.store_up.set(1.0);
        m.drain_state.set(0.0);
        m.ws_active.set(0.0);
        m.sse_active.set(0.0);
        for t in ["http", "ws"] {
            m.count("zerodrop_rate_limited_total", &[("transport", t)], 0);
        }
        for r in ["ok", "refused"] {
            m.count("zerodrop_token_refreshes_total", &[("result", r)], 0);
        }
        for r in [
            "revoked",
            "disconnected",
            "token_expired",
            "session_expired",
        ] {
            m.count("zerodrop_connections_closed_total", &[("reason", r)], 0);
        }
        m.set("zerodrop_revocations_active", &[], 0.0);
        m.presence_changes(0, 0);
        m.presence_occupancy(0, 0);
        for a in ["connect", "subscribe", "publish"] {
            for r in ["allow", "deny", "unavailable"] {
                m.count(
                    "zerodrop_authz_hook_calls_total",
                    &[("action", a), ("result", r)],
                    0,
                );
            }
        }
        for r in ["header_timeout", "idle_timeout", "pending_limit"] {
            m.count(
                "zerodrop_http_connections_closed_total",
                &[("reason", r)],
                0,
            );
        }
        for t in [Transport::Ws, Transport::Sse, Transport::Http] {
            for c in [
                ErrorCode::InvalidResumeToken,
                ErrorCode::ReconnectWindowExpired,
            ] {
                m.failure_counter(t, c).increment(0);
            }
        }
        m
    }

    fn failure_counter(&self, t: Transport, code: ErrorCode) -> Counter {
        let mut map = lock(&self.failures);
        map.entry((t, code))
            .or_insert_with(|| {
                self.recorder.register_counter(
                    &key(
                        "zerodrop_resume_failures_total",
                        &[("transport", t.as_str()), ("code", code.as_str())],
                    ),
                    &Metadata::new("zerodrop", metrics::Level::INFO, None),
                )
            })
            .clone()
    }

    /// Adds `n` to a labelled counter (registered on first use).
    pub fn count(&self, name: &str, labels: &[(&str, &str)], n: u64) {
        let id = series_id(name, labels);
        let c = lock(&self.labelled_counters)
            .entry(id)
            .or_insert_with(|| {
                self.recorder.register_counter(
                    &key(name, labels),
                    &Metadata::new("zerodrop", metrics::Level::INFO, None),
                )
            })
            .clone();
        c.increment(n);
    }

    /// Sets a labelled gauge (registered on first use).
    pub fn set(&self, name: &str, labels: &[(&str, &str)], v: f64) {
        let id = series_id(name, labels);
        let g = lock(&self.labelled_gauges)
            .entry(id)
            .or_insert_with(|| {
                self.recorder.register_gauge(
                    &key(name, labels),
                    &Metadata::new("zerodrop", metrics::Level::INFO, None),
                )
            })
            .clone();
        g.set(v);
    }

    /// An HTTP connection closed by the server for doing nothing: `reason` is
    /// `header_timeout`, `idle_timeout` or `pending_limit`.
    pub fn http_connection_closed(&self, reason: &str) {
        self.count(
            "zerodrop_http_connections_closed_total",
            &[("reason", reason)],
            1,
        );
    }

    /// A `refresh` answered by the client: `ok` (the connection goes on under the new token)
    /// or `refused` (not a valid token for the connection's subject).
    pub fn token_refresh(&self, ok: bool) {
        let result = if ok { "ok" } else { "refused" };
        self.count("zerodrop_token_refreshes_total", &[("result", result)], 1);
    }

    /// Presence entries this instance appended: members that joined and members that left
    /// (each leave is appended by exactly one instance, whichever swept it).
    pub fn presence_changes(&self, joins: u64, leaves: u64) {
        self.count("zerodrop_presence_joins_total", &[], joins);
        self.count("zerodrop_presence_leaves_total", &[], leaves);
    }

    /// Streams with at least one member, and members over all streams (never per stream).
    pub fn presence_occupancy(&self, streams: u64, members: u64) {
        self.set("zerodrop_presence_streams", &[], streams as f64);
        self.set("zerodrop_presence_members", &[], members as f64);
    }

    /// Revocations in force on this instance.
    pub fn revocations_active(&self, n: usize) {
        self.set("zerodrop_revocations_active", &[], n as f64);
    }

    /// A WebSocket/SSE connection the server ended for `reason` (`revoked`, `disconnected`,
    /// `token_expired`, `session_expired`).
    pub fn connection_ended(&self, reason: &str) {
        self.count(
            "zerodrop_connections_closed_total",
            &[("reason", reason)],
            1,
        );
    }

    /// A request or frame refused by a rate limit (`transport` is `http` or `ws`).
    pub fn rate_limited(&self, transport: &str) {
        self.count(
            "zerodrop_rate_limited_total",
            &[("transport", transport)],
            1,
        );
        self.n_rate_limited.fetch_add(1, Ordering::Relaxed);
    }

    pub fn rate_limited_total(&self) -> u64 {
        self.n_rate_limited.load(Ordering::Relaxed)
    }

    pub fn connection_opened(&self, t: Transport) {
        match t {
            Transport::Ws => {
                self.connections_ws.increment(1);
                self.ws_active.increment(1.0);
                self.n_ws_active.fetch_add(1, Ordering::Relaxed);
            }
            Transport::Sse => {
                self.connections_sse.increment(1);
                self.sse_active.increment(1.0);
                self.n_sse_active.fetch_add(1, Ordering::Relaxed);
            }
            Transport::Http => {}
        }
    }

    pub fn connection_closed(&self, t: Transport) {
        match t {
            Transport::Ws => {
                self.ws_active.decrement(1.0);
                self.n_ws_active.fetch_sub(1, Ordering::Relaxed);
            }
            Transport::Sse => {
                self.sse_active.decrement(1.0);
                self.n_sse_active.fetch_sub(1, Ordering::Relaxed);
            }
            Transport::Http => {}
        }
    }

    /// A WebSocket connection arrived with a resume token (an attempt).
    pub fn ws_reconnect_attempt(&self) {
        self.ws_reconnects.increment(1);
        self.n_ws_reconnects.fetch_add(1, Ordering::Relaxed);
    }

    pub fn resume_succeeded(&self, t: Transport) {
        let i = match t {
            Transport::Ws => 0,
            Transport::Sse => 1,
            Transport::Http => 2,
        };
        self.resumes[i].increment(1);
        self.n_resumes.fetch_add(1, Ordering::Relaxed);
        if t == Transport::Ws {
            self.n_ws_resumes.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn resume_failed(&self, t: Transport, code: ErrorCode) {
        self.failure_counter(t, code).increment(1);
        self.n_resume_failures.fetch_add(1, Ordering::Relaxed);
        if t == Transport::Ws {
            self.n_ws_resume_failures.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn dropped(&self, n: u64) {
        if n > 0 {
            self.dropped.increment(n);
            self.n_dropped.fetch_add(n, Ordering::Relaxed);
        }
    }

    pub fn published(&self, n: u64) {
        self.published.increment(n);
        self.n_published.fetch_add(n, Ordering::Relaxed);
    }

    pub fn delivered(&self, n: u64) {
        self.delivered.increment(n);
    }

    pub fn replayed(&self, n: u64) {
        self.replayed.increment(n);
    }

    pub fn trimmed(&self, n: u64) {
        self.trims.increment(n);
        self.n_trimmed.fetch_add(n, Ordering::Relaxed);
    }

    pub fn checkpoint(&self, applied: bool) {
        if applied {
            self.checkpoints_applied.increment(1);
        } else {
            self.checkpoints_ignored.increment(1);
        }
    }

    pub fn upgrade_blocked_during_drain(&self) {
        self.upgrades_blocked.increment(1);
        self.n_upgrades_blocked.fetch_add(1, Ordering::Relaxed);
    }

    pub fn rtt(&self, d: Duration) {
        self.rtt.record(d.as_secs_f64());
        let _ = lock(&self.rtt_us).record(d.as_micros().max(1) as u64);
    }

    pub fn publish_to_deliver(&self, d: Duration) {
        self.publish_to_deliver.record(d.as_secs_f64());
    }

    pub fn store_up(&self, up: bool) {
        self.store_up.set(if up { 1.0 } else { 0.0 });
    }

    /// The store's durability level: its series 1, the other levels' 0.
    pub fn store_durability(&self, level: Durability) {
        for (d, g) in Durability::ALL.iter().zip(&self.store_durability) {
            g.set(if *d == level { 1.0 } else { 0.0 });
        }
    }

    /// 0 active, 1 draining, 2 drained.
    pub fn drain_state(&self, v: u8) {
        self.drain_state.set(f64::from(v));
    }

    /// A typed error was sent to a client (HTTP body or WebSocket frame).
    pub fn error(&self, code: ErrorCode) {
        *lock(&self.errors).entry(code.as_str()).or_insert(0) += 1;
    }

    /// One HTTP request, by route template (never the raw path). Its series are found by the
    /// borrowed names in one lookup: a request allocates nothing here unless it is the first
    /// of its route and method, or of its status there.
    pub fn http_request(&self, method: &str, route: &str, status: u16, took: Duration) {
        let mut routes = lock(&self.routes);
        ROUTE_NAME.with_borrow_mut(|name| {
            name.clear();
            name.push_str(method);
            name.push(' ');
            name.push_str(route);
            let r = slot(&mut routes, name, RouteStat::new);
            let counter = match r.counters.iter().find(|(s, _)| *s == status) {
                Some((_, c)) => c,
                None => {
                    let c = self.recorder.register_counter(
                        &key(
                            "zerodrop_http_requests_total",
                            &[
                                ("method", method),
                                ("route", route),
                                ("status", &status.to_string()),
                            ],
                        ),
                        &Metadata::new("zerodrop", metrics::Level::INFO, None),
                    );
                    r.counters.push((status, c));
                    &r.counters[r.counters.len() - 1].1
                }
            };
            counter.increment(1);
            r.duration
                .get_or_insert_with(|| {
                    self.recorder.register_histogram(
                        &key(
                            "zerodrop_http_request_duration_seconds",
                            &[("method", method), ("route", route)],
                        ),
                        &Metadata::new("zerodrop", metrics::Level::INFO, None),
                    )
                })
                .record(took.as_secs_f64());
            r.count += 1;
            *r.status.entry(status).or_insert(0) += 1;
            let _ = r.latency_us.record(took.as_micros().max(1) as u64);
        });
    }

    pub fn render_prometheus(&self) -> String {
        if let Some(p) = &self.process {
            p.refresh();
        }
        self.handle.render()
    }

    /// Drains histogram samples into their buckets; call every few seconds.
    pub fn upkeep(&self) {
        self.handle.run_upkeep();
    }

    pub fn dropped_total(&self) -> u64 {
        self.n_dropped.load(Ordering::Relaxed)
    }

    pub fn json(&self, store: StoreFacts, blocked_total: u64) -> Value {
        let ms = |us: u64| (us as f64) / 1000.0;
        let rtt_p95 = {
            let h = lock(&self.rtt_us);
            if h.is_empty() {
                0.0
            } else {
                ms(h.value_at_quantile(0.95))
            }
        };
        let published = self.n_published.load(Ordering::Relaxed);
        let trimmed = self.n_trimmed.load(Ordering::Relaxed);
        let ok = self.n_resumes.load(Ordering::Relaxed);
        let failed = self.n_resume_failures.load(Ordering::Relaxed);
        let success_rate = if ok + failed == 0 {
            1.0
        } else {
            ok as f64 / (ok + failed) as f64
        };
        let mut routes = Map::new();
        // `Map` keeps its keys in order.
        for (name, r) in lock(&self.routes).iter() {
            let q = |p: f64| {
                if r.latency_us.is_empty() {
                    0.0
                } else {
                    ms(r.latency_us.value_at_quantile(p))
                }
            };
            let status: Map<String, Value> = r
                .status
                .iter()
                .map(|(s, n)| (s.to_string(), Value::from(*n)))
                .collect();
            routes.insert(
                name.clone(),
                json!({"count": r.count, "status": status, "p50_ms": q(0.5), "p95_ms": q(0.95), "p99_ms": q(0.99)}),
            );
        }
        let errors: Map<String, Value> = lock(&self.errors)
            .iter()
            .map(|(k, v)| (k.to_string(), Value::from(*v)))
            .collect();
        json!({
            "ws_metrics": {
                "ws_active": self.n_ws_active.load(Ordering::Relaxed).max(0),
                "sse_active": self.n_sse_active.load(Ordering::Relaxed).max(0),
                "ws_reconnects": self.n_ws_reconnects.load(Ordering::Relaxed),
                "ws_resumes": self.n_ws_resumes.load(Ordering::Relaxed),
                "resume_failures": self.n_ws_resume_failures.load(Ordering::Relaxed),
                "dropped_messages": self.n_dropped.load(Ordering::Relaxed),
                "rtt_p95_ms": rtt_p95,
                "ws_upgrades_blocked_during_drain": blocked_total.max(self.n_upgrades_blocked.load(Ordering::Relaxed)),
            },
            "resume_store_metrics": {
                "store": store.kind,
                "up": store.up,
                "durability": store.durability.as_str(),
                "sessions": store.sessions,
                "streams": store.streams,
                "buffer_trims": trimmed,
                "buffer_trim_rate": if published == 0 { 0.0 } else { trimmed as f64 / published as f64 },
                "resume_success_rate": success_rate,
            },
            "routes": routes,
            "errors": errors,
        })
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// `version`, and `commit` when `ZERODROP_GIT_COMMIT` was set at build time (the
/// Dockerfile passes it as a build argument; a plain `cargo build` has none).
fn build_labels() -> Vec<(&'static str, &'static str)> {
    let mut v = vec![("version", env!("CARGO_PKG_VERSION"))];
    if let Some(c) = option_env!("ZERODROP_GIT_COMMIT").filter(|c| !c.is_empty()) {
        v.push(("commit", c));
    }
    v
}

/// The process's own figures, under the names Prometheus client libraries use, read from
/// `/proc/self` at every scrape. Only on Linux: elsewhere they are not exported at all
/// (an absent series, never a made-up 0).
struct ProcessGauges {
    open_fds: Gauge,
    max_fds: Gauge,
    resident_memory: Gauge,
}

impl ProcessGauges {
    #[cfg(target_os = "linux")]
    fn register(gauge: &dyn Fn(&str) -> Gauge) -> Option<ProcessGauges> {
        // Where `/proc/stat` is hidden (systemd's `ProcSubset=pid`), the rest still works.
        if let Some(t) = process_start_time() {
            gauge("process_start_time_seconds").set(t);
        }
        let p = ProcessGauges {
            open_fds: gauge("process_open_fds"),
            max_fds: gauge("process_max_fds"),
            resident_memory: gauge("process_resident_memory_bytes"),
        };
        p.refresh();
        Some(p)
    }

    #[cfg(not(target_os = "linux"))]
    fn register(_gauge: &dyn Fn(&str) -> Gauge) -> Option<ProcessGauges> {
        None
    }

    fn refresh(&self) {
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            // The count includes the descriptor of this listing itself, as other exporters'.
            self.open_fds.set(dir.count() as f64);
        }
        if let Some(n) = max_open_files() {
            self.max_fds.set(n);
        }
        if let Some(b) = resident_bytes() {
            self.resident_memory.set(b);
        }
    }
}

/// The soft `RLIMIT_NOFILE`, from `/proc/self/limits` (absent when unlimited).
fn max_open_files() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// `VmRSS` from `/proc/self/status`, in bytes.
fn resident_bytes() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = text.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: f64 = line["VmRSS:".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kb * 1024.0)
}

/// When this process started, in seconds since the Unix epoch: the boot time (`btime` in
/// `/proc/stat`) plus the process's start in clock ticks after boot (`/proc/self/stat`).
#[cfg(target_os = "linux")]
fn process_start_time() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may contain spaces) start after the last ')';
    // `starttime` is field 22, the 20th after it.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let ticks: f64 = rest.split_whitespace().nth(19)?.parse().ok()?;
    let boot: f64 = std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| boot + ticks / hz as f64)
}

thread_local! {
    /// `"METHOD route"`, the JSON view's name of a route, spelled here for each lookup.
    static ROUTE_NAME: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

/// The value under `k`, made by `make` and stored under an owned copy of `k` on first use
/// only.
fn slot<'m, V>(map: &'m mut HashMap<String, V>, k: &str, make: impl FnOnce() -> V) -> &'m mut V {
    if !map.contains_key(k) {
        map.insert(k.to_string(), make());
    }
    map.get_mut(k)
        .expect("present: inserted above if it was not")
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn key(name: &str, labels: &[(&str, &str)]) -> Key {
    let labels: Vec<Label> = labels
        .iter()
        .map(|(k, v)| Label::new(k.to_string(), v.to_string()))
        .collect();
    Key::from_parts(name.to_string(), labels)
}

fn series_id(name: &str, labels: &[(&str, &str)]) -> String {
    let mut id = name.to_string();
    for (k, v) in labels {
        id.push('|');
        id.push_str(k);
        id.push('=');
        id.push_str(v);
    }
    id
}

fn describe(r: &PrometheusRecorder) {
    let d = |name: &'static str, help: &'static str| {
        (KeyName::from_const_str(name), SharedString::const_str(help))
    };
    let counters = [
        d(
            "zerodrop_connections_total",
            "WebSocket and SSE connections accepted",
        ),
        d(
            "zerodrop_ws_reconnects_total",
            "WebSocket connections that arrived with a resume token",
        ),
        d("zerodrop_resumes_total", "Successful session resumes"),
        d(
            "zerodrop_resume_failures_total",
            "Failed session resumes, by error code",
        ),
        d(
            "zerodrop_dropped_messages_total",
            "Events a live session can never receive",
        ),
        d(
            "zerodrop_events_published_total",
            "Events appended (duplicates excluded)",
        ),
        d(
            "zerodrop_events_delivered_total",
            "Event frames written to WebSocket and SSE clients",
        ),
        d(
            "zerodrop_events_replayed_total",
            "Events sent from a replay window (resume, history)",
        ),
        d("zerodrop_buffer_trims_total", "Events removed by retention"),
        d(
            "zerodrop_checkpoints_total",
            "Checkpoints (acks), by result",
        ),
        d(
            "zerodrop_upgrades_blocked_during_drain_total",
            "WebSocket/SSE connections refused while draining",
        ),
        d(
            "zerodrop_http_requests_total",
            "HTTP requests, by route template and status",
        ),
        d(
            "zerodrop_http_connections_closed_total",
            "HTTP connections closed for doing nothing, by reason (header_timeout, idle_timeout, pending_limit)",
        ),
        d(
            "zerodrop_token_refreshes_total",
            "Fresh connect tokens sent on live connections (refresh), by result (ok, refused)",
        ),
        d(
            "zerodrop_rate_limited_total",
            "Requests (http) and frames (ws) refused with RATE_LIMITED",
        ),
        d(
            "zerodrop_authz_hook_calls_total",
            "Calls to the authorization hook, by action (connect, subscribe, publish) and result (allow, deny, unavailable)",
        ),
        d(
            "zerodrop_connections_closed_total",
            "WebSocket/SSE connections the server ended for their authority, by reason (revoked, disconnected, token_expired, session_expired)",
        ),
        d(
            "zerodrop_presence_joins_total",
            "Members that joined a stream with presence (appended by this instance)",
        ),
        d(
            "zerodrop_presence_leaves_total",
            "Members that left a stream with presence (appended by this instance: each leave once over all instances)",
        ),
        d(
            "zerodrop_webhooks_total",
            "Webhooks received, by source and result (accepted, duplicate, reused)",
        ),
        d(
            "zerodrop_jobs_completed_total",
            "Upstream deliveries completed, by upstream",
        ),
        d(
            "zerodrop_jobs_failed_total",
            "Failed delivery attempts, by upstream and outcome (retry, dead)",
        ),
        d(
            "zerodrop_bulkhead_rejected_total",
            "Upstream calls refused because the bulkhead was full",
        ),
        d(
            "zerodrop_upstream_requests_total",
            "Calls made to upstreams, by upstream, target and result",
        ),
        d(
            "zerodrop_cache_requests_total",
            "Response cache lookups, by namespace and result (hit, miss)",
        ),
    ];
    for (k, h) in counters {
        r.describe_counter(k, None, h);
    }
    let gauges = [
        d("zerodrop_ws_active", "Open WebSocket connections"),
        d("zerodrop_sse_active", "Open SSE connections"),
        d(
            "zerodrop_store_up",
            "1 if the store answered its last check",
        ),
        d(
            "zerodrop_store_durability",
            "1 for the store's durability level (memory, os_buffered, replicated, fsync), 0 for the others",
        ),
        d("zerodrop_drain_state", "0 active, 1 draining, 2 drained"),
        d(
            "zerodrop_revocations_active",
            "Revocations in force (POST /admin/revoke), as this instance last read them",
        ),
        d(
            "zerodrop_presence_streams",
            "Streams with at least one presence member, as the store last said",
        ),
        d(
            "zerodrop_presence_members",
            "Presence members over all streams, as the store last said",
        ),
        d(
            "zerodrop_jobs_backlog",
            "Queued upstream deliveries, by QoS class",
        ),
        d(
            "zerodrop_jobs_running",
            "Running upstream deliveries, by QoS class",
        ),
        d(
            "zerodrop_jobs_oldest_queued_age_seconds",
            "Age of the oldest due queued job (0 when none waits)",
        ),
        d("zerodrop_jobs_dead_letters", "Jobs in the dead letters"),
        d(
            "zerodrop_circuit_state",
            "Circuit breaker state per upstream target: 0 closed, 1 half-open, 2 open",
        ),
        d(
            "zerodrop_bulkhead_in_flight",
            "Upstream calls in flight, per upstream",
        ),
        d(
            "zerodrop_build_info",
            "Always 1; the labels say which build runs",
        ),
        d(
            "process_start_time_seconds",
            "Start time of the process since the Unix epoch, in seconds",
        ),
        d("process_open_fds", "Open file descriptors"),
        d(
            "process_max_fds",
            "Most file descriptors the process may open (soft limit)",
        ),
        d("process_resident_memory_bytes", "Resident memory, in bytes"),
    ];
    for (k, h) in gauges {
        r.describe_gauge(k, None, h);
    }
    let hists = [
        d("zerodrop_rtt_seconds", "WebSocket ping round-trip time"),
        d(
            "zerodrop_http_request_duration_seconds",
            "HTTP request latency by route template",
        ),
        d(
            "zerodrop_publish_to_deliver_seconds",
            "From durable commit to the socket write, for the oldest live event of each write",
        ),
    ];
    for (k, h) in hists {
        r.describe_histogram(k, Some(metrics::Unit::Seconds), h);
    }
}
