//! `zerodrop capacity`: how many instances a peak needs, from measured capacity.
//!
//! Model (documented in docs/operations.md): a stream at peak carries
//! `--events-per-stream-per-sec` events to `--subscribers-per-stream` subscribers, so it
//! costs `e × s` deliveries/s and `s` connections. One instance's capacity in streams is the
//! smaller of its measured deliveries/s ÷ (e × s) and `--max-connections` ÷ s. Instances are
//! planned to run at most at `headroom` (0.7 = 70 %) of that capacity. When more instances
//! than `--multi-region-threshold` are needed, one region is too large a failure domain and
//! the multi-region programme is triggered.
//!
//! With `--url` the server's own figures are read too: its connection limit (from
//! `/admin/snapshot`, with the admin token) replaces `--max-connections` unless that is given,
//! and its open connections and delivery rate over `--sample-sec` (the `/metrics` counters)
//! are recorded. A server does not measure its own delivery ceiling, so the rate still comes
//! from a drill report; only when there is none does the rate the server delivered during the
//! sample stand in, as a lower bound.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use zerodrop_client::HttpClient;

use crate::common::{CredArgs, OutArgs, write_report};
use crate::report::DrillReport;

#[derive(Args, Clone, Debug)]
pub struct CapacityArgs {
    /// Streams active at the expected peak.
    #[arg(long)]
    pub expected_peak_streams: u64,
    /// Drill or gate report to take the measurement from [default: the newest in --out-dir].
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Per-instance capacity in streams, instead of deriving it from a report.
    #[arg(long)]
    pub per_instance_capacity: Option<u64>,
    #[arg(long, default_value_t = 1.0)]
    pub events_per_stream_per_sec: f64,
    #[arg(long, default_value_t = 2.0)]
    pub subscribers_per_stream: f64,
    /// The instances' connection limit (`--max-connections`) [default: the server's, with
    /// --url and the admin token; else 1000].
    #[arg(long)]
    pub max_connections: Option<u64>,
    /// A running instance whose own figures (connection limit, open connections, delivery
    /// rate) are read and recorded [default: none; plan from reports only].
    #[arg(long)]
    pub url: Option<String>,
    /// How long to watch the server's delivery counters with --url, seconds.
    #[arg(long, default_value_t = 5.0)]
    pub sample_sec: f64,
    /// The admin token reads the server's connection limit (`/admin/snapshot`).
    #[command(flatten)]
    pub creds: CredArgs,
    /// Fraction of measured capacity an instance is planned to use at peak.
    #[arg(long, default_value_t = 0.7)]
    pub headroom: f64,
    /// More instances than this in one region trigger the multi-region programme.
    #[arg(long, default_value_t = 10)]
    pub multi_region_threshold: u64,
    #[command(flatten)]
    pub out: OutArgs,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CapacityReport {
    pub tool: String,
    pub expected_peak_streams: u64,
    pub per_instance_capacity: u64,
    pub headroom: f64,
    pub instances_needed: u64,
    pub multi_region_threshold: u64,
    pub activate_multi_region_program: bool,
    /// Where the capacity came from and what it assumed.
    pub basis: serde_json::Value,
}

/// Instances for `expected` streams at `headroom` of `per_instance` each.
pub fn instances_needed(expected: u64, per_instance: u64, headroom: f64) -> u64 {
    let usable = (per_instance as f64 * headroom).floor().max(1.0);
    ((expected as f64 / usable).ceil() as u64).max(1)
}

/// Per-instance capacity in streams from a measured delivery rate.
pub fn streams_per_instance(delivered_per_sec: f64, eps: f64, subs: f64, max_conns: u64) -> u64 {
    let by_rate = delivered_per_sec / (eps * subs).max(1e-9);
    let by_conns = max_conns as f64 / subs.max(1e-9);
    by_rate.min(by_conns).floor().max(0.0) as u64
}

/// The newest report in `dir` that carries a drill measurement.
pub fn latest_drill(dir: &Path) -> anyhow::Result<(PathBuf, DrillReport)> {
    let mut best: Option<(u64, PathBuf, DrillReport)> = None;
    let entries = std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    for e in entries.flatten() {
        let p = e.path();
        let name = p
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        if !(name.starts_with("drill-") || name.starts_with("gate-")) || !name.ends_with(".json") {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(&p) else {
            continue;
        };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
            continue;
        };
        let v = v.get("drill").cloned().unwrap_or(v);
        let Ok(d) = serde_json::from_value::<DrillReport>(v) else {
            continue;
        };
        if d.capacity.delivered_per_sec <= 0.0 {
            continue;
        }
        if best.as_ref().is_none_or(|(t, _, _)| d.finished_at_ms > *t) {
            best = Some((d.finished_at_ms, p, d));
        }
    }
    best.map(|(_, p, d)| (p, d))
        .with_context(|| format!("no drill or gate report with a measurement in {} (run `zerodrop drill --rate max` first)", dir.display()))
}

/// The default connection limit when neither `--max-connections` nor the server gives one.
const DEFAULT_MAX_CONNECTIONS: u64 = 1000;

/// The value of a Prometheus counter or gauge `name` in `text`, summed over its label sets.
pub fn prom_value(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with(' ') || rest.starts_with('{')) {
            continue;
        }
        let value = rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok());
        if let Some(v) = value {
            found = Some(found.unwrap_or(0.0) + v);
        }
    }
    found
}

/// What a running server says about itself.
#[derive(Debug, Clone, Default)]
pub struct ServerFigures {
    pub url: String,
    /// Why the server could not be read at all.
    pub error: Option<String>,
    /// `config.maxConnections` of `/admin/snapshot`.
    pub max_connections: Option<u64>,
    /// Why the connection limit could not be read.
    pub max_connections_error: Option<String>,
    pub ws_active: Option<u64>,
    pub sse_active: Option<u64>,
    /// `zerodrop_events_delivered_total` at the end of the sample.
    pub delivered_total: Option<f64>,
    pub delivered_per_sec: Option<f64>,
    pub published_per_sec: Option<f64>,
    pub sample_sec: f64,
}

impl ServerFigures {
    fn json(&self) -> Value {
        json!({
            "url": self.url,
            "reachable": self.error.is_none(),
            "error": self.error,
            "maxConnections": self.max_connections,
            "maxConnectionsError": self.max_connections_error,
            "wsActive": self.ws_active,
            "sseActive": self.sse_active,
            "eventsDeliveredTotal": self.delivered_total,
            "deliveredPerSec": self.delivered_per_sec,
            "publishedPerSec": self.published_per_sec,
            "sampleSec": self.sample_sec,
            "note": "a server does not measure its own delivery ceiling: deliveredPerSec is what it carried during the sample",
        })
    }
}

/// Reads `url`'s connection limit (with `admin_token`), open connections and delivery rate
/// over `sample`.
pub async fn read_server(url: &str, admin_token: Option<&str>, sample: Duration) -> ServerFigures {
    let mut f = ServerFigures {
        url: url.to_string(),
        sample_sec: sample.as_secs_f64(),
        ..ServerFigures::default()
    };
    let http = match HttpClient::with_timeout(url, None, Duration::from_secs(5)) {
        Ok(h) => h,
        Err(e) => {
            f.error = Some(format!("{e}"));
            return f;
        }
    };
    let counters = |a: &zerodrop_client::Answer| -> Option<(f64, f64)> {
        let text = a.body.as_str()?;
        Some((
            prom_value(text, "zerodrop_events_delivered_total")?,
            prom_value(text, "zerodrop_events_published_total").unwrap_or(0.0),
        ))
    };
    let first = match http.get_answer("/metrics", None).await {
        Ok(a) if a.status == 200 => counters(&a),
        Ok(a) => {
            f.error = Some(format!("GET /metrics answered {}", a.status));
            return f;
        }
        Err(e) => {
            f.error = Some(format!("GET /metrics: {e}"));
            return f;
        }
    };
    let t0 = Instant::now();
    match admin_token {
        None => {
            f.max_connections_error = Some(
                "no admin token (--admin-token, ZERODROP_ADMIN_TOKEN or --data-dir): /admin/snapshot not read"
                    .into(),
            )
        }
        Some(t) => match http.get_answer("/admin/snapshot", Some(t)).await {
            Ok(a) if a.status == 200 => {
                f.max_connections = a.body.pointer("/config/maxConnections").and_then(Value::as_u64);
                if f.max_connections.is_none() {
                    f.max_connections_error =
                        Some("/admin/snapshot has no config.maxConnections".into());
                }
            }
            Ok(a) => {
                f.max_connections_error = Some(format!("GET /admin/snapshot answered {}", a.status))
            }
            Err(e) => f.max_connections_error = Some(format!("GET /admin/snapshot: {e}")),
        },
    }
    if let Ok(m) = http.metrics_json().await {
        f.ws_active = m.pointer("/ws_metrics/ws_active").and_then(Value::as_u64);
        f.sse_active = m.pointer("/ws_metrics/sse_active").and_then(Value::as_u64);
    }
    tokio::time::sleep(sample.saturating_sub(t0.elapsed())).await;
    let last = match http.get_answer("/metrics", None).await {
        Ok(a) if a.status == 200 => counters(&a),
        _ => None,
    };
    let dt = t0.elapsed().as_secs_f64().max(0.001);
    if let (Some((d0, p0)), Some((d1, p1))) = (first, last) {
        f.delivered_total = Some(d1);
        f.delivered_per_sec = Some(((d1 - d0).max(0.0) / dt * 10.0).round() / 10.0);
        f.published_per_sec = Some(((p1 - p0).max(0.0) / dt * 10.0).round() / 10.0);
    }
    f
}

/// A drill report read from `p` (a gate report's embedded drill too).
fn read_drill(p: &Path) -> anyhow::Result<DrillReport> {
    let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
    let v: Value = serde_json::from_str(&text)?;
    let v = v.get("drill").cloned().unwrap_or(v);
    serde_json::from_value::<DrillReport>(v).context("not a drill report")
}

pub async fn run(args: CapacityArgs) -> anyhow::Result<ExitCode> {
    if !(args.headroom > 0.0 && args.headroom <= 1.0) {
        bail!("--headroom is the fraction of capacity to use at peak, in (0, 1]");
    }
    anyhow::ensure!(
        args.sample_sec.is_finite() && args.sample_sec > 0.0,
        "--sample-sec is how long to watch the server, in seconds (> 0)"
    );
    let server = match &args.url {
        None => None,
        Some(u) => {
            let creds = args.creds.resolve()?;
            let f = read_server(
                u,
                creds.admin_token.as_deref(),
                Duration::from_secs_f64(args.sample_sec),
            )
            .await;
            match &f.error {
                Some(e) => println!(
                    "server {u}: could not be read ({e}); planning from reports and flags only"
                ),
                None => {
                    let open = match (f.ws_active, f.sse_active) {
                        (Some(w), Some(s)) => {
                            format!("{} connection(s) open (ws {w}, sse {s})", w + s)
                        }
                        _ => "open connections unknown".into(),
                    };
                    println!(
                        "server {u}: {open}, {} deliveries/s over {:.1} s; connection limit {}",
                        f.delivered_per_sec
                            .map(|r| format!("{r:.1}"))
                            .unwrap_or_else(|| "?".into()),
                        f.sample_sec,
                        match (f.max_connections, &f.max_connections_error) {
                            (Some(m), _) => format!("{m} (from /admin/snapshot)"),
                            (None, Some(e)) => format!("not read: {e}"),
                            (None, None) => "not read".into(),
                        }
                    );
                }
            }
            Some(f)
        }
    };
    let (max_connections, max_connections_source) = match (
        args.max_connections,
        server.as_ref().and_then(|f| f.max_connections),
    ) {
        (Some(m), _) => (m, "--max-connections"),
        (None, Some(m)) => (m, "server"),
        (None, None) => (DEFAULT_MAX_CONNECTIONS, "default"),
    };
    let server_json = server.as_ref().map(ServerFigures::json);
    let (cap, basis) = match args.per_instance_capacity {
        Some(c) => (
            c,
            json!({"source": "--per-instance-capacity", "server": server_json}),
        ),
        None => {
            let measured = match &args.report {
                Some(p) => Some((p.display().to_string(), read_drill(p)?)),
                None => match latest_drill(&args.out.dir()) {
                    Ok((p, d)) => Some((p.display().to_string(), d)),
                    Err(e) if server.is_none() => return Err(e),
                    Err(_) => None,
                },
            };
            let (source, rate, connections, slo_met) = match &measured {
                Some((p, d)) => {
                    if server.is_some() {
                        println!(
                            "a server does not measure its own delivery ceiling: deliveries/s come from {p}"
                        );
                    }
                    (
                        p.clone(),
                        d.capacity.delivered_per_sec,
                        Some(d.capacity.connections),
                        Some(d.capacity.slo_met),
                    )
                }
                None => {
                    let observed = server
                        .as_ref()
                        .and_then(|f| f.delivered_per_sec)
                        .filter(|r| *r > 0.0);
                    let Some(r) = observed else {
                        bail!(
                            "no measurement to plan from: no drill or gate report with a measurement in {}, and a server \
                             does not measure its own delivery ceiling ({}) (run `zerodrop drill --rate max` first)",
                            args.out.dir().display(),
                            match &server {
                                Some(f) if f.error.is_some() =>
                                    "and this one could not be read".to_string(),
                                Some(f) => format!(
                                    "this one delivered nothing during the {:.1} s sample",
                                    f.sample_sec
                                ),
                                None => "no --url was given".to_string(),
                            }
                        );
                    };
                    println!(
                        "warning: no drill report: planning from the {r:.1} deliveries/s the server carried during the sample, \
                         a lower bound on its capacity (run `zerodrop drill --rate max` for a ceiling)"
                    );
                    ("server-observed".to_string(), r, None, None)
                }
            };
            let c = streams_per_instance(
                rate,
                args.events_per_stream_per_sec,
                args.subscribers_per_stream,
                max_connections,
            );
            if slo_met == Some(false) {
                println!(
                    "warning: the measured run did not meet its SLO; its rate overstates safe capacity"
                );
            }
            (
                c,
                json!({
                    "source": source,
                    "measuredDeliveredPerSec": rate,
                    "measuredConnections": connections,
                    "sloMet": slo_met,
                    "eventsPerStreamPerSec": args.events_per_stream_per_sec,
                    "subscribersPerStream": args.subscribers_per_stream,
                    "maxConnections": max_connections,
                    "maxConnectionsSource": max_connections_source,
                    "server": server_json,
                }),
            )
        }
    };
    if cap == 0 {
        bail!(
            "per-instance capacity is 0 streams: the measurement cannot carry one stream of this shape"
        );
    }
    let needed = instances_needed(args.expected_peak_streams, cap, args.headroom);
    let report = CapacityReport {
        tool: "capacity".into(),
        expected_peak_streams: args.expected_peak_streams,
        per_instance_capacity: cap,
        headroom: args.headroom,
        instances_needed: needed,
        multi_region_threshold: args.multi_region_threshold,
        activate_multi_region_program: needed > args.multi_region_threshold,
        basis,
    };
    println!(
        "peak {} streams ÷ ({} streams/instance × {:.0}% headroom) → {} instance(s)",
        report.expected_peak_streams,
        cap,
        args.headroom * 100.0,
        needed
    );
    println!(
        "multi-region programme: {} (threshold: more than {} instances in one region)",
        if report.activate_multi_region_program {
            "ACTIVATE"
        } else {
            "not needed"
        },
        args.multi_region_threshold
    );
    let path = write_report(&args.out.dir(), "capacity", None, &report)?;
    println!("report: {}", path.display());
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headroom_maths() {
        // 1,000 streams per instance at 70 % → 700 usable.
        assert_eq!(instances_needed(700, 1000, 0.7), 1);
        assert_eq!(instances_needed(701, 1000, 0.7), 2);
        assert_eq!(instances_needed(7_000, 1000, 0.7), 10);
        assert_eq!(instances_needed(0, 1000, 0.7), 1);
        assert_eq!(
            instances_needed(10, 1, 0.7),
            10,
            "never divides by zero usable capacity"
        );
    }

    #[test]
    fn capacity_is_the_tighter_of_rate_and_connections() {
        // 50,000 deliveries/s, 1 ev/s to 2 subscribers → 25,000 by rate; 1,000 conns → 500.
        assert_eq!(streams_per_instance(50_000.0, 1.0, 2.0, 1000), 500);
        assert_eq!(streams_per_instance(600.0, 1.0, 2.0, 100_000), 300);
    }

    #[test]
    fn reads_prometheus_counters() {
        let text = "# HELP zerodrop_events_delivered_total Event frames\n\
                    # TYPE zerodrop_events_delivered_total counter\n\
                    zerodrop_events_delivered_total 1604\n\
                    zerodrop_events_delivered_total_extra 9\n\
                    zerodrop_resumes_total{transport=\"ws\"} 3\n\
                    zerodrop_resumes_total{transport=\"sse\"} 2\n";
        assert_eq!(
            prom_value(text, "zerodrop_events_delivered_total"),
            Some(1604.0)
        );
        assert_eq!(prom_value(text, "zerodrop_resumes_total"), Some(5.0));
        assert_eq!(prom_value(text, "zerodrop_dropped_messages_total"), None);
    }
}
