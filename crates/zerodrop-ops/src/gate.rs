//! `zerodrop gate`: a drill judged against the SLO file; exit 1 names every breach.
//!
//! `--milestone m1_1k|m2_5k|m3_20k` is release evidence at scale: that many concurrent
//! subscribed WebSocket connections (fan-out and resume), judged the same way.
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
    let breaches = slo.judge(&drill);
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
