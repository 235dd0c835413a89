//! `zerodrop capacity`: how many instances a peak needs, from measured capacity.
//!
//! Model (documented in docs/operations.md): a stream at peak carries
//! `--events-per-stream-per-sec` events to `--subscribers-per-stream` subscribers, so it
//! costs `e × s` deliveries/s and `s` connections. One instance's capacity in streams is the
//! smaller of its measured deliveries/s ÷ (e × s) and `--max-connections` ÷ s. Instances are
//! planned to run at most at `headroom` (0.7 = 70 %) of that capacity. When more instances
//! than `--multi-region-threshold` are needed, one region is too large a failure domain and
//! the multi-region programme is triggered.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Args;
use serde::{Deserialize, Serialize};

use crate::common::{OutArgs, write_report};
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
    /// The instances' connection limit (`--max-connections`).
    #[arg(long, default_value_t = 1000)]
    pub max_connections: u64,
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

pub async fn run(args: CapacityArgs) -> anyhow::Result<ExitCode> {
    if !(args.headroom > 0.0 && args.headroom <= 1.0) {
        bail!("--headroom is the fraction of capacity to use at peak, in (0, 1]");
    }
    let (cap, basis) = match args.per_instance_capacity {
        Some(c) => (c, serde_json::json!({"source": "--per-instance-capacity"})),
        None => {
            let (path, d) = match &args.report {
                Some(p) => {
                    let text = std::fs::read_to_string(p)
                        .with_context(|| format!("reading {}", p.display()))?;
                    let v: serde_json::Value = serde_json::from_str(&text)?;
                    let v = v.get("drill").cloned().unwrap_or(v);
                    (
                        p.clone(),
                        serde_json::from_value::<DrillReport>(v).context("not a drill report")?,
                    )
                }
                None => latest_drill(&args.out.dir())?,
            };
            let c = streams_per_instance(
                d.capacity.delivered_per_sec,
                args.events_per_stream_per_sec,
                args.subscribers_per_stream,
                args.max_connections,
            );
            if !d.capacity.slo_met {
                println!(
                    "warning: the measured run did not meet its SLO; its rate overstates safe capacity"
                );
            }
            (
                c,
                serde_json::json!({
                    "source": path.display().to_string(),
                    "measuredDeliveredPerSec": d.capacity.delivered_per_sec,
                    "measuredConnections": d.capacity.connections,
                    "sloMet": d.capacity.slo_met,
                    "eventsPerStreamPerSec": args.events_per_stream_per_sec,
                    "subscribersPerStream": args.subscribers_per_stream,
                    "maxConnections": args.max_connections,
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
}
