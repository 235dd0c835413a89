//! `zerodrop gate`: a drill judged against the SLO file; exit 1 names every breach.
//!
//! `--milestone m1_1k|m2_5k|m3_20k` is release evidence at scale: that many concurrent
//! subscribed WebSocket connections (fan-out and resume), judged the same way — and a breach
//! when fewer clients than the milestone were connected and subscribed when publishing
//! started.
//! `--report FILE` judges an existing drill report instead of running one.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, ValueEnum};
use serde::Serialize;

use crate::common::{OutArgs, TargetArgs, write_report};
use crate::drill::{LoadArgs, Scenario};
use crate::report::DrillReport;
use crate::slo::Slo;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Milestone {
    #[value(name = "m1_1k")]
    M1,
    #[value(name = "m2_5k")]
    M2,
    #[value(name = "m3_20k")]
    M3,
}

impl Milestone {
    pub fn connections(self) -> usize {
        match self {
            Milestone::M1 => 1_000,
            Milestone::M2 => 5_000,
            Milestone::M3 => 20_000,
        }
    }
    pub fn id(self) -> &'static str {
        match self {
            Milestone::M1 => "m1_1k",
            Milestone::M2 => "m2_5k",
            Milestone::M3 => "m3_20k",
        }
    }
}

/// Where a drill stood against a milestone when publishing started: `milestone m1_1k: 987 of
/// 1000 clients were connected and subscribed … (server counted 990 open … connections)`.
fn milestone_status(m: Milestone, drill: &DrillReport) -> String {
    format!(
        "milestone {}: {} of {} clients were connected and subscribed when publishing started (server counted {} open WebSocket/SSE connections)",
        m.id(),
        drill.capacity.connected_at_start,
        m.connections(),
        drill
            .capacity
            .server_active_at_start
            .map(|n| n.to_string())
            .unwrap_or_else(|| "no".into())
    )
}

/// The milestone breach: fewer clients connected and subscribed when publishing started than
/// the milestone asks for.
pub fn milestone_breach(m: Milestone, drill: &DrillReport) -> Option<String> {
    (drill.capacity.connected_at_start < m.connections() as u64).then(|| milestone_status(m, drill))
}

#[derive(Args, Clone, Debug)]
pub struct GateArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    #[command(flatten)]
    pub load: LoadArgs,
    /// Scale milestone: concurrent subscribed connections to hold while judged.
    #[arg(long, value_enum)]
    pub milestone: Option<Milestone>,
    /// Judge this drill report instead of running a drill.
    #[arg(long)]
    pub report: Option<PathBuf>,
    #[command(flatten)]
    pub out: OutArgs,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GateReport {
    pub tool: &'static str,
    pub profile: String,
    pub milestone: Option<&'static str>,
    pub slo_file: String,
    pub passed: bool,
    pub breaches: Vec<String>,
    pub drill: DrillReport,
}

pub async fn run(args: GateArgs) -> anyhow::Result<ExitCode> {
    let slo = Slo::load(args.load.slo.as_deref())?;
    let slo_file = args
        .load
        .slo
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "slo.json (default)".into());
    let mut load = args.load.clone();
    if let Some(m) = args.milestone {
        load.limit = Some(m.connections());
        if let Ok((soft, _)) = crate::common::raise_nofile_limit()
            && args.report.is_none()
            && soft < m.connections() as u64 + 256
        {
            println!(
                "warning: this process may open only {soft} files, fewer than the {} connections of {} need (raise the hard limit: ulimit -Hn)",
                m.connections(),
                m.id()
            );
        }
        if load.scenarios.is_empty() {
            load.scenarios = vec![Scenario::Publish, Scenario::WsFanout, Scenario::Resume];
        }
    }
    let drill = match &args.report {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not JSON", p.display()))?;
            // A gate report embeds its drill; a drill report is one.
            let d = v.get("drill").cloned().unwrap_or(v);
            serde_json::from_value(d)
                .with_context(|| format!("{} is not a drill report", p.display()))?
        }
        None => crate::drill::drive(&args.target, &load, &slo, "gate").await?,
    };
    let mut breaches = slo.judge(&drill);
    if let Some(m) = args.milestone {
        println!("{}", milestone_status(m, &drill));
        breaches.extend(milestone_breach(m, &drill));
    }
    println!("{}", drill.summary());
    let profile = match args.milestone {
        Some(m) => m.id().to_string(),
        None => drill.profile.clone(),
    };
    let report = GateReport {
        tool: "gate",
        profile: profile.clone(),
        milestone: args.milestone.map(Milestone::id),
        slo_file,
        passed: breaches.is_empty(),
        breaches: breaches.clone(),
        drill,
    };
    let path = write_report(&args.out.dir(), "gate", Some(&profile), &report)?;
    if breaches.is_empty() {
        println!(
            "gate PASSED against {}; report: {}",
            report.slo_file,
            path.display()
        );
        Ok(ExitCode::SUCCESS)
    } else {
        println!(
            "gate FAILED against {} — {} breach(es):",
            report.slo_file,
            breaches.len()
        );
        for b in &breaches {
            println!("  - {b}");
        }
        println!("report: {}", path.display());
        Ok(ExitCode::FAILURE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::tests::sample_report;

    #[test]
    fn fewer_connected_clients_than_the_milestone_is_a_breach() {
        let mut r = sample_report();
        r.capacity.connected_at_start = 1_000;
        r.capacity.server_active_at_start = Some(1_000);
        assert_eq!(milestone_breach(Milestone::M1, &r), None);
        let b = milestone_breach(Milestone::M2, &r).unwrap();
        assert!(
            b.starts_with("milestone m2_5k: 1000 of 5000 clients were connected and subscribed"),
            "{b}"
        );
        r.capacity.connected_at_start = 999;
        r.capacity.server_active_at_start = None;
        let b = milestone_breach(Milestone::M1, &r).unwrap();
        assert!(b.contains("999 of 1000"), "{b}");
        assert!(b.contains("server counted no open"), "{b}");
        // A report from before the count existed proves nothing.
        let old: DrillReport = serde_json::from_value({
            let mut v = serde_json::to_value(sample_report()).unwrap();
            v["capacity"]
                .as_object_mut()
                .unwrap()
                .remove("connectedAtStart");
            v
        })
        .unwrap();
        assert!(milestone_breach(Milestone::M1, &old).is_some());
    }
}
