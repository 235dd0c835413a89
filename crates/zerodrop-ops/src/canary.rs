//! `zerodrop canary`: the same drill against a control and a candidate, interleaved
//! (control, candidate, candidate, control, … so drift on a shared machine hits both
//! alike), then the candidate is held to the control within the SLO file's `canary`
//! tolerances. The candidate must also keep zero-drop on its own.

use std::process::ExitCode;

use clap::Args;
use serde::Serialize;

use crate::common::{CredArgs, OutArgs, TargetArgs, write_report};
use crate::drill::LoadArgs;
use crate::report::DrillReport;
use crate::slo::{CanarySlo, Slo};

#[derive(Args, Clone, Debug)]
pub struct CanaryArgs {
    /// Base URL of the control when --control-url is not given.
    #[arg(long, default_value = "http://127.0.0.1:7700")]
    pub url: String,
    /// The running release [default: --url].
    #[arg(long)]
    pub control_url: Option<String>,
    /// The release under test.
    #[arg(long)]
    pub candidate_url: String,
    /// Credentials for both (and for the control when the candidate's are given apart).
    #[command(flatten)]
    pub creds: CredArgs,
    /// The candidate's API key, when it differs from the control's.
    #[arg(long)]
    pub candidate_api_key: Option<String>,
    /// The candidate's JWT secret, when it differs.
    #[arg(long)]
    pub candidate_jwt_secret: Option<String>,
    /// The candidate's data directory (secrets.json), when its credentials differ.
    #[arg(long)]
    pub candidate_data_dir: Option<std::path::PathBuf>,
    /// Drill pairs to run; each pair runs control and candidate, alternating who goes first.
    #[arg(long, default_value_t = 2)]
    pub rounds: u32,
    #[command(flatten)]
    pub load: LoadArgs,
    #[command(flatten)]
    pub out: OutArgs,
}

#[derive(Serialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ScenarioDelta {
    pub scenario: String,
    pub control_p95_ms: f64,
    pub candidate_p95_ms: f64,
    pub p95_regression_pct: f64,
    pub control_error_rate: f64,
    pub candidate_error_rate: f64,
    pub error_rate_delta: f64,
    pub control_resume_success_rate: f64,
    pub candidate_resume_success_rate: f64,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CanaryReport {
    pub tool: &'static str,
    pub profile: String,
    pub control_url: String,
    pub candidate_url: String,
    pub tolerances: CanarySlo,
    pub passed: bool,
    pub breaches: Vec<String>,
    pub deltas: Vec<ScenarioDelta>,
    pub control: Vec<DrillReport>,
    pub candidate: Vec<DrillReport>,
}

/// A scenario's error rate: 5xx + network + unknown status, where an answer that is both 5xx
/// and outside the allowed statuses (a 500, usually) counts once.
pub fn error_rate(d: &DrillReport, scenario: &str) -> f64 {
    d.scenario(scenario)
        .map(|s| {
            let both = s
                .http
                .statuses
                .iter()
                .filter(|(k, _)| {
                    k.parse::<u16>()
                        .is_ok_and(|c| c >= 500 && !s.http.allowed_statuses.contains(&c))
                })
                .map(|(_, n)| *n)
                .sum::<u64>();
            let overlap = if s.http.requests == 0 {
                0.0
            } else {
                both as f64 / s.http.requests as f64
            };
            let http = (s.http.error_5xx_rate + s.http.unknown_status_rate - overlap).max(0.0);
            http + s.network_error_rate
        })
        .unwrap_or(0.0)
}

fn mean(v: impl Iterator<Item = f64>) -> f64 {
    let (s, n) = v.fold((0.0, 0u32), |(s, n), x| (s + x, n + 1));
    if n == 0 { 0.0 } else { s / n as f64 }
}

/// Compares candidate runs with control runs (means over rounds); returns deltas and breaches.
pub fn compare(
    control: &[DrillReport],
    candidate: &[DrillReport],
    tol: &CanarySlo,
) -> (Vec<ScenarioDelta>, Vec<String>) {
    let mut ids: Vec<String> = Vec::new();
    for d in control.iter().chain(candidate) {
        for s in &d.scenarios {
            if !ids.contains(&s.scenario) {
                ids.push(s.scenario.clone());
            }
        }
    }
    let mut deltas = Vec::new();
    let mut breaches = Vec::new();
    // Only the rounds in which a scenario ran say anything about it.
    let ran = |runs: &[DrillReport], id: &str| -> Vec<DrillReport> {
        runs.iter()
            .filter(|d| d.scenario(id).is_some_and(|s| s.not_run.is_none()))
            .cloned()
            .collect()
    };
    let p95 = |runs: &[DrillReport], id: &str| {
        mean(
            runs.iter()
                .filter_map(|d| d.scenario(id))
                .filter(|s| s.latency_ms.count > 0)
                .map(|s| s.latency_ms.p95),
        )
    };
    let resume = |runs: &[DrillReport], id: &str| {
        mean(
            runs.iter()
                .filter_map(|d| d.scenario(id))
                .map(|s| s.resume.success_rate),
        )
    };
    for id in ids {
        let (control, candidate) = (&ran(control, &id)[..], &ran(candidate, &id)[..]);
        if candidate.is_empty() {
            // What the control can do and the candidate cannot is a regression.
            if !control.is_empty() {
                breaches.push(format!(
                    "{id}: not run on the candidate but run on the control"
                ));
            }
            continue;
        }
        if control.is_empty() {
            println!("note: {id} ran on the candidate only, so it is not compared");
            continue;
        }
        let (cp, kp) = (p95(control, &id), p95(candidate, &id));
        let (ce, ke) = (
            mean(control.iter().map(|d| error_rate(d, &id))),
            mean(candidate.iter().map(|d| error_rate(d, &id))),
        );
        let (cr, kr) = (resume(control, &id), resume(candidate, &id));
        let reg = if cp > 0.0 {
            (kp - cp) / cp * 100.0
        } else {
            0.0
        };
        if reg > tol.max_p95_regression_pct && kp - cp > tol.min_p95_delta_ms {
            breaches.push(format!(
                "{id}: candidate p95 {kp:.2} ms is {reg:.1}% above control {cp:.2} ms (max {}%)",
                tol.max_p95_regression_pct
            ));
        }
        if ke - ce > tol.max_error_rate_delta {
            breaches.push(format!(
                "{id}: candidate error rate {ke:.4} exceeds control {ce:.4} by {:.4} (max {})",
                ke - ce,
                tol.max_error_rate_delta
            ));
        }
        if cr - kr > tol.max_resume_success_rate_drop {
            breaches.push(format!(
                "{id}: candidate resume success {kr:.4} is {:.4} below control {cr:.4} (max drop {})",
                cr - kr,
                tol.max_resume_success_rate_drop
            ));
        }
        deltas.push(ScenarioDelta {
            scenario: id,
            control_p95_ms: round2(cp),
            candidate_p95_ms: round2(kp),
            p95_regression_pct: round2(reg),
            control_error_rate: ce,
            candidate_error_rate: ke,
            error_rate_delta: ke - ce,
            control_resume_success_rate: cr,
            candidate_resume_success_rate: kr,
        });
    }
    for (i, d) in candidate.iter().enumerate() {
        if !d.zero_drop_held() {
            let t = &d.totals;
            breaches.push(format!(
                "candidate round {}: zero-drop broken (dropped {}, missing {}, duplicated {}, out of order {})",
                i + 1,
                t.dropped,
                t.missing,
                t.duplicated,
                t.out_of_order
            ));
        }
        for b in d.breaches.iter().filter(|b| {
            b.contains("nothing was measured")
                || b.contains("none delivered")
                || b.contains(": not run — ")
        }) {
            breaches.push(format!("candidate round {}: {b}", i + 1));
        }
    }
    for (i, d) in control.iter().enumerate() {
        if !d.zero_drop_held() {
            println!(
                "warning: the control lost events in round {} — the comparison is weak",
                i + 1
            );
        }
    }
    (deltas, breaches)
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

impl CanaryArgs {
    /// The control: `--control-url`, else `--url`.
    pub fn control_url(&self) -> &str {
        self.control_url.as_deref().unwrap_or(&self.url)
    }
}

pub async fn run(args: CanaryArgs) -> anyhow::Result<ExitCode> {
    let slo = Slo::load(args.load.slo.as_deref())?;
    let control = TargetArgs {
        url: args.control_url().to_string(),
        creds: args.creds.clone(),
    };
    let mut ccreds = args.creds.clone();
    if let Some(d) = &args.candidate_data_dir {
        ccreds = CredArgs {
            data_dir: Some(d.clone()),
            api_key: None,
            jwt_secret: None,
            admin_token: None,
            ca_file: args.creds.ca_file.clone(),
        };
    }
    ccreds.api_key = args.candidate_api_key.clone().or(ccreds.api_key);
    ccreds.jwt_secret = args.candidate_jwt_secret.clone().or(ccreds.jwt_secret);
    let candidate = TargetArgs {
        url: args.candidate_url.clone(),
        creds: ccreds,
    };
    let mut c_runs = Vec::new();
    let mut k_runs = Vec::new();
    for round in 0..args.rounds.max(1) {
        let order: [bool; 2] = if round % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for is_candidate in order {
            let (t, label) = if is_candidate {
                (&candidate, "candidate")
            } else {
                (&control, "control")
            };
            println!("round {} — {label} {}", round + 1, t.url);
            let r = crate::drill::drive(t, &args.load, &slo, label).await?;
            println!("{}", r.summary());
            if is_candidate {
                k_runs.push(r)
            } else {
                c_runs.push(r)
            }
        }
    }
    let (deltas, breaches) = compare(&c_runs, &k_runs, &slo.canary);
    println!(
        "{:<16} {:>10} {:>10} {:>8} {:>10} {:>10}",
        "scenario", "ctl p95", "cand p95", "Δ%", "ctl err", "cand err"
    );
    for d in &deltas {
        println!(
            "{:<16} {:>10.2} {:>10.2} {:>8.1} {:>10.4} {:>10.4}",
            d.scenario,
            d.control_p95_ms,
            d.candidate_p95_ms,
            d.p95_regression_pct,
            d.control_error_rate,
            d.candidate_error_rate
        );
    }
    let profile = args.load.profile.id().to_string();
    let report = CanaryReport {
        tool: "canary",
        profile: profile.clone(),
        control_url: args.control_url().to_string(),
        candidate_url: args.candidate_url.clone(),
        tolerances: slo.canary.clone(),
        passed: breaches.is_empty(),
        breaches: breaches.clone(),
        deltas,
        control: c_runs,
        candidate: k_runs,
    };
    let path = write_report(&args.out.dir(), "canary", Some(&profile), &report)?;
    if breaches.is_empty() {
        println!("canary PASSED; report: {}", path.display());
        Ok(ExitCode::SUCCESS)
    } else {
        println!("canary FAILED — {} breach(es):", breaches.len());
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
    fn equal_runs_pass() {
        let (d, b) = compare(
            &[sample_report()],
            &[sample_report()],
            &CanarySlo::default(),
        );
        assert!(b.is_empty(), "{b:?}");
        assert_eq!(d.len(), 3);
        assert_eq!(d[1].p95_regression_pct, 0.0);
    }

    #[test]
    fn a_slower_or_lossier_candidate_fails_with_deltas() {
        let mut cand = sample_report();
        cand.scenarios[1].latency_ms.p95 = 40.0; // control 12.5
        cand.scenarios[0].http.error_5xx_rate = 0.05;
        cand.scenarios[2].resume.success_rate = 0.9;
        cand.totals.missing = 3;
        let (d, b) = compare(&[sample_report()], &[cand], &CanarySlo::default());
        assert!(
            b.iter()
                .any(|s| s.contains("ws_fanout: candidate p95 40.00 ms is 220.0% above")),
            "{b:?}"
        );
        assert!(
            b.iter()
                .any(|s| s.contains("publish: candidate error rate 0.0500")),
            "{b:?}"
        );
        assert!(
            b.iter()
                .any(|s| s.contains("resume: candidate resume success 0.9000")),
            "{b:?}"
        );
        assert!(b.iter().any(|s| s.contains("zero-drop broken")), "{b:?}");
        assert_eq!(d[1].candidate_p95_ms, 40.0);
    }

    #[test]
    fn a_500_that_is_also_an_unknown_status_counts_once() {
        let mut r = sample_report();
        let h = &mut r.scenarios[0].http;
        h.requests = 100;
        h.statuses = [
            ("201".to_string(), 80),
            ("500".to_string(), 10),
            ("418".to_string(), 5),
            ("503".to_string(), 5),
        ]
        .into_iter()
        .collect();
        h.allowed_statuses = vec![201, 503];
        h.error_5xx_rate = 0.15; // 500 and 503
        h.unknown_status_rate = 0.15; // 500 and 418
        r.scenarios[0].network_error_rate = 0.01;
        // 500 (once) + 503 + 418 = 20 of 100 answers, plus 1 % network errors.
        assert!(
            (error_rate(&r, "publish") - 0.21).abs() < 1e-9,
            "{}",
            error_rate(&r, "publish")
        );
        assert_eq!(error_rate(&r, "nope"), 0.0);
        // And in the comparison: 0.21 against a clean control, not 0.31.
        let (d, _) = compare(&[sample_report()], &[r], &CanarySlo::default());
        assert!((d[0].error_rate_delta - 0.21).abs() < 1e-9, "{d:?}");
    }

    #[test]
    fn a_scenario_the_candidate_could_not_run_is_a_regression() {
        let not_run = |mut r: DrillReport| {
            r.scenarios[0].not_run = Some(crate::report::NotRun {
                reason: "no webhook source".into(),
                required: false,
            });
            r
        };
        let (d, b) = compare(
            &[sample_report()],
            &[not_run(sample_report())],
            &CanarySlo::default(),
        );
        assert_eq!(
            b,
            vec!["publish: not run on the candidate but run on the control".to_string()]
        );
        assert_eq!(d.len(), 2, "{d:?}");
        // Not run on either: nothing to compare, nothing broken.
        let (d, b) = compare(
            &[not_run(sample_report())],
            &[not_run(sample_report())],
            &CanarySlo::default(),
        );
        assert!(b.is_empty(), "{b:?}");
        assert_eq!(d.len(), 2);
        // A round that did not run it does not dilute the rounds that did.
        let mut slow = sample_report();
        slow.scenarios[0].latency_ms.p95 = 40.0;
        let (d, _) = compare(
            &[sample_report(), not_run(sample_report())],
            &[slow, not_run(sample_report())],
            &CanarySlo::default(),
        );
        assert_eq!((d[0].control_p95_ms, d[0].candidate_p95_ms), (8.0, 40.0));
    }

    #[test]
    fn tiny_absolute_differences_are_noise() {
        let mut cand = sample_report();
        cand.scenarios[0].latency_ms.p95 = 11.0; // control 8.0: +37 % but only 3 ms
        let (_, b) = compare(&[sample_report()], &[cand], &CanarySlo::default());
        assert!(b.is_empty(), "{b:?}");
    }
}
