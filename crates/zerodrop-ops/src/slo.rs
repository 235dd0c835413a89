//! The SLO baseline file (`slo.json`) and the judge that holds a drill report against it.
//!
//! A breach is a sentence naming the scenario, the measure, the measured value and the
//! limit. A drill that measured nothing (no event published or delivered where the scenario
//! should have some) is a breach too: a gate that passes on an empty run cannot fail. So is
//! a run whose server-counted dropped messages could not be read, and a log with seq holes.
//!
//! Unknown keys are refused (a misspelt limit would otherwise silently not apply); every
//! section may carry an `about` string for documentation.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::report::{DrillReport, ScenarioReport, WebhookStats};

/// The SLO file shipped at the repository root; used when `--slo` is not given and no
/// `slo.json` is in the current directory.
pub const SHIPPED: &str = include_str!("../../../slo.json");

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Slo {
    pub version: u32,
    /// Documentation only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub about: Option<String>,
    #[serde(default)]
    pub scenarios: BTreeMap<String, ScenarioSlo>,
    #[serde(default)]
    pub global: GlobalSlo,
    #[serde(default)]
    pub canary: CanarySlo,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ScenarioSlo {
    /// Documentation only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub about: Option<String>,
    /// Publish-to-deliver p95 (for `publish`: the publish request's p95), milliseconds.
    pub p95_ms: Option<f64>,
    pub error_5xx_rate: Option<f64>,
    pub network_error_rate: Option<f64>,
    pub unknown_status_rate: Option<f64>,
    /// HTTP statuses that are expected answers; anything else counts as unknown.
    pub allowed_statuses: Option<Vec<u16>>,
    pub min_resume_success_rate: Option<f64>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GlobalSlo {
    /// Documentation only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub about: Option<String>,
    /// Dropped (server-counted) plus missing (never received by a drill client).
    #[serde(default)]
    pub max_dropped: u64,
    #[serde(default)]
    pub max_duplicated: u64,
    #[serde(default)]
    pub max_out_of_order: u64,
    #[serde(default = "default_min_resume")]
    pub min_resume_success_rate: f64,
}

fn default_min_resume() -> f64 {
    0.98
}

impl Default for GlobalSlo {
    fn default() -> Self {
        GlobalSlo {
            about: None,
            max_dropped: 0,
            max_duplicated: 0,
            max_out_of_order: 0,
            min_resume_success_rate: default_min_resume(),
        }
    }
}

/// How much worse a canary may be than its control.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CanarySlo {
    /// Documentation only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub about: Option<String>,
    /// Candidate p95 may exceed control p95 by at most this percentage…
    #[serde(default = "d20")]
    pub max_p95_regression_pct: f64,
    /// …unless the difference is below this many milliseconds (noise floor).
    #[serde(default = "d5")]
    pub min_p95_delta_ms: f64,
    /// Candidate error rate (5xx + network + unknown status) minus control's.
    #[serde(default = "d001")]
    pub max_error_rate_delta: f64,
    /// Control resume success rate minus candidate's.
    #[serde(default = "d002")]
    pub max_resume_success_rate_drop: f64,
}

fn d20() -> f64 {
    20.0
}
fn d5() -> f64 {
    5.0
}
fn d001() -> f64 {
    0.01
}
fn d002() -> f64 {
    0.02
}

impl Default for CanarySlo {
    fn default() -> Self {
        CanarySlo {
            about: None,
            max_p95_regression_pct: d20(),
            min_p95_delta_ms: d5(),
            max_error_rate_delta: d001(),
            max_resume_success_rate_drop: d002(),
        }
    }
}

impl Slo {
    pub fn parse(text: &str) -> anyhow::Result<Slo> {
        let slo: Slo = serde_json::from_str(text).context("not an SLO file")?;
        anyhow::ensure!(
            slo.version == 1,
            "unsupported SLO file version {}",
            slo.version
        );
        for (id, s) in &slo.scenarios {
            anyhow::ensure!(
                crate::drill::Scenario::from_id(id).is_some(),
                "unknown scenario {id:?} in SLO file (known: {})",
                crate::drill::Scenario::ALL.map(|s| s.id()).join(", ")
            );
            for (name, v) in [
                ("error_5xx_rate", s.error_5xx_rate),
                ("network_error_rate", s.network_error_rate),
                ("unknown_status_rate", s.unknown_status_rate),
                ("min_resume_success_rate", s.min_resume_success_rate),
            ] {
                if let Some(v) = v {
                    anyhow::ensure!((0.0..=1.0).contains(&v), "{id}.{name} must be 0..1, is {v}");
                }
            }
        }
        Ok(slo)
    }

    /// `path`, else `./slo.json`, else the shipped file.
    pub fn load(path: Option<&Path>) -> anyhow::Result<Slo> {
        match path {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("reading {}", p.display()))?;
                Slo::parse(&text).with_context(|| format!("in {}", p.display()))
            }
            None => match std::fs::read_to_string("slo.json") {
                Ok(t) => Slo::parse(&t).context("in ./slo.json"),
                Err(_) => Slo::parse(SHIPPED),
            },
        }
    }

    /// Allowed statuses of a scenario (201 and 200 when the file names none).
    pub fn allowed_statuses(&self, scenario: &str) -> Vec<u16> {
        self.scenarios
            .get(scenario)
            .and_then(|s| s.allowed_statuses.clone())
            .unwrap_or_else(|| vec![200, 201])
    }

    /// Every breach of `report` against this SLO; empty means the gate passes.
    pub fn judge(&self, report: &DrillReport) -> Vec<String> {
        let mut breaches = Vec::new();
        for sc in &report.scenarios {
            if let Some(n) = &sc.not_run {
                // Not run for want of configuration is a note, unless it was asked for.
                if n.required {
                    breaches.push(format!("{}: not run — {}", sc.scenario, n.reason));
                }
                continue;
            }
            if let Some(w) = &sc.webhook {
                judge_webhook(&sc.scenario, w, &self.global, &mut breaches);
            }
            if let Some(s) = self.scenarios.get(&sc.scenario) {
                judge_scenario(sc, s, &mut breaches);
            }
            vacuous(sc, &mut breaches);
            if sc.log.seq_holes > 0 {
                breaches.push(format!(
                    "{}: {} seq hole(s) in the log (seqs not contiguous from 1 to head)",
                    sc.scenario, sc.log.seq_holes
                ));
            }
        }
        let t = &report.totals;
        let g = &self.global;
        if report.server.get("available").and_then(|v| v.as_bool()) != Some(true) {
            breaches.push(
                "global: server dropped count unavailable (GET /metrics?format=json could not be read \
                 before and after the run), so server-side drops cannot be ruled out"
                    .to_string(),
            );
        }
        if t.dropped + t.missing > g.max_dropped {
            breaches.push(format!(
                "global: {} events lost (server-counted dropped {}, never received by a client {}), max_dropped is {}",
                t.dropped + t.missing,
                t.dropped,
                t.missing,
                g.max_dropped
            ));
        }
        if t.duplicated > g.max_duplicated {
            breaches.push(format!(
                "global: {} duplicated deliveries, max_duplicated is {}",
                t.duplicated, g.max_duplicated
            ));
        }
        if t.out_of_order > g.max_out_of_order {
            breaches.push(format!(
                "global: {} out-of-order deliveries, max_out_of_order is {}",
                t.out_of_order, g.max_out_of_order
            ));
        }
        if t.resume_attempts > 0 && t.resume_success_rate < g.min_resume_success_rate {
            breaches.push(format!(
                "global: resume success rate {:.4} ({} of {}) below {}",
                t.resume_success_rate,
                t.resume_successes,
                t.resume_attempts,
                g.min_resume_success_rate
            ));
        }
        breaches
    }
}

fn judge_scenario(sc: &ScenarioReport, s: &ScenarioSlo, out: &mut Vec<String>) {
    let id = &sc.scenario;
    if let Some(max) = s.p95_ms
        && sc.latency_ms.count > 0
        && sc.latency_ms.p95 > max
    {
        out.push(format!(
            "{id}: p95 latency {:.1} ms above {max} ms",
            sc.latency_ms.p95
        ));
    }
    let checks = [
        ("5xx rate", sc.http.error_5xx_rate, s.error_5xx_rate),
        (
            "network error rate",
            sc.network_error_rate,
            s.network_error_rate,
        ),
        (
            "unknown status rate",
            sc.http.unknown_status_rate,
            s.unknown_status_rate,
        ),
    ];
    for (name, got, max) in checks {
        if let Some(max) = max
            && got > max
        {
            out.push(format!("{id}: {name} {got:.4} above {max}"));
        }
    }
    if let Some(allowed) = &s.allowed_statuses {
        let odd: Vec<String> = sc
            .http
            .statuses
            .keys()
            .filter(|k| {
                k.parse::<u16>()
                    .map(|c| !allowed.contains(&c))
                    .unwrap_or(true)
            })
            .map(|k| format!("{k}×{}", sc.http.statuses[k]))
            .collect();
        if !odd.is_empty() && s.unknown_status_rate.is_none() {
            out.push(format!(
                "{id}: statuses outside allowed {allowed:?}: {}",
                odd.join(", ")
            ));
        }
    }
    if let Some(min) = s.min_resume_success_rate
        && sc.resume.attempts > 0
        && sc.resume.success_rate < min
    {
        out.push(format!(
            "{id}: resume success rate {:.4} ({} of {}) below {min}",
            sc.resume.success_rate, sc.resume.successes, sc.resume.attempts
        ));
    }
}

/// What the webhook verification found: always breaches (a duplicate answered as new ran
/// twice, an answer naming another seq is a lie about where the event is, a stream that
/// could not be read verified nothing), and drops and doubles by name against the global
/// limits that also count them.
fn judge_webhook(id: &str, w: &WebhookStats, g: &GlobalSlo, out: &mut Vec<String>) {
    let stream = w.stream.as_deref().unwrap_or("its stream");
    if let Some(e) = &w.read_error {
        out.push(format!(
            "{id}: {stream} could not be read back, nothing was verified: {e}"
        ));
    }
    if w.drops > g.max_dropped {
        out.push(format!(
            "{id}: {} accepted webhook(s) missing from {stream} (drops), max_dropped is {}",
            w.drops, g.max_dropped
        ));
    }
    if w.doubles > g.max_duplicated {
        out.push(format!(
            "{id}: {} webhook append(s) beyond the first of their message id in {stream} (doubles: run twice), max_duplicated is {}",
            w.doubles, g.max_duplicated
        ));
    }
    if w.answered_as_new > 0 {
        out.push(format!(
            "{id}: {} duplicate(s) answered as new (duplicate: false for an id already accepted)",
            w.answered_as_new
        ));
    }
    if w.seq_mismatches > 0 {
        out.push(format!(
            "{id}: {} answer(s) name a seq other than the first answer's or than where {stream} holds the id",
            w.seq_mismatches
        ));
    }
    if w.uncounted_duplicates > 0 {
        out.push(format!(
            "{id}: {} duplicate answer(s) with hitCount 0 (the duplicate was not counted)",
            w.uncounted_duplicates
        ));
    }
    if w.accepted > 0 && w.duplicates_sent == 0 {
        out.push(format!(
            "{id}: no duplicate was sent (nothing was measured)"
        ));
    } else if w.duplicates_sent > 0 && w.duplicate_answers == 0 {
        out.push(format!(
            "{id}: {} duplicate(s) sent, none answered as a duplicate (nothing was measured)",
            w.duplicates_sent
        ));
    }
}

/// A scenario that should have carried events but carried none measured nothing.
fn vacuous(sc: &ScenarioReport, out: &mut Vec<String>) {
    if sc.publishers > 0 && sc.published == 0 {
        let what = if sc.webhook.is_some() {
            "no webhook was accepted"
        } else {
            "no event was published"
        };
        out.push(format!("{}: {what} (nothing was measured)", sc.scenario));
    } else if sc.clients > 0 && sc.published > 0 && sc.delivered == 0 {
        out.push(format!(
            "{}: {} events published, none delivered to {} clients",
            sc.scenario, sc.published, sc.clients
        ));
    }
    if sc.resume.expected && sc.resume.attempts == 0 {
        out.push(format!(
            "{}: no resume was attempted (nothing was measured)",
            sc.scenario
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::tests::sample_report;

    #[test]
    fn the_shipped_file_parses() {
        let slo = Slo::parse(SHIPPED).unwrap();
        assert!(slo.scenarios.contains_key("publish"));
        assert_eq!(slo.global.max_dropped, 0);
        assert!(slo.canary.max_p95_regression_pct > 0.0);
    }

    #[test]
    fn the_shipped_file_has_a_p95_for_every_scenario() {
        let slo = Slo::parse(SHIPPED).unwrap();
        for sc in crate::drill::Scenario::ALL {
            let s = &slo.scenarios[sc.id()];
            assert!(s.p95_ms.is_some_and(|v| v > 0.0), "{}", sc.id());
        }
        assert_eq!(slo.scenarios["resume"].p95_ms, Some(400.0));
        assert_eq!(slo.scenarios["reconnect_storm"].p95_ms, Some(200.0));
    }

    #[test]
    fn unknown_scenarios_and_bad_rates_are_refused() {
        assert!(Slo::parse(r#"{"version":1,"scenarios":{"nope":{}}}"#).is_err());
        assert!(
            Slo::parse(r#"{"version":1,"scenarios":{"publish":{"error_5xx_rate":3}}}"#).is_err()
        );
        assert!(Slo::parse(r#"{"version":2}"#).is_err());
    }

    #[test]
    fn a_clean_report_passes_and_each_breach_is_named() {
        let slo = Slo::parse(SHIPPED).unwrap();
        let good = sample_report();
        assert_eq!(slo.judge(&good), Vec::<String>::new());

        let mut bad = sample_report();
        bad.scenarios[0].latency_ms.p95 = 1e6;
        bad.scenarios[0].http.error_5xx_rate = 0.5;
        bad.totals.missing = 1;
        bad.totals.duplicated = 2;
        bad.totals.resume_success_rate = 0.5;
        bad.totals.resume_attempts = 10;
        let b = slo.judge(&bad);
        assert!(
            b.iter().any(|s| s.contains("publish: p95 latency")),
            "{b:?}"
        );
        assert!(b.iter().any(|s| s.contains("5xx rate 0.5000")), "{b:?}");
        assert!(b.iter().any(|s| s.contains("1 events lost")), "{b:?}");
        assert!(b.iter().any(|s| s.contains("2 duplicated")), "{b:?}");
        assert!(
            b.iter().any(|s| s.contains("resume success rate 0.5000")),
            "{b:?}"
        );
    }

    #[test]
    fn log_seq_holes_are_a_breach() {
        let slo = Slo::parse(SHIPPED).unwrap();
        let mut r = sample_report();
        r.scenarios[1].log.seq_holes = 2;
        let b = slo.judge(&r);
        assert_eq!(b.len(), 1, "{b:?}");
        assert!(
            b[0].contains("ws_fanout: 2 seq hole(s) in the log"),
            "{b:?}"
        );
    }

    #[test]
    fn an_unreadable_server_dropped_count_is_a_breach_not_zero() {
        let slo = Slo::parse(SHIPPED).unwrap();
        for server in [
            serde_json::Value::Null,
            serde_json::json!({"available": false}),
        ] {
            let mut r = sample_report();
            r.server = server;
            let b = slo.judge(&r);
            assert_eq!(b.len(), 1, "{b:?}");
            assert!(b[0].contains("server dropped count unavailable"), "{b:?}");
        }
    }

    #[test]
    fn unknown_keys_are_refused_and_about_is_allowed() {
        for bad in [
            r#"{"version":1,"scenarios":{"publish":{"p95":50}}}"#,
            r#"{"version":1,"global":{"max_droped":0}}"#,
            r#"{"version":1,"canary":{"max_p95_regression":20}}"#,
            r#"{"version":1,"scenarioz":{}}"#,
        ] {
            let e = Slo::parse(bad).unwrap_err();
            assert!(format!("{e:#}").contains("unknown field"), "{bad}: {e:#}");
        }
        let ok = Slo::parse(
            r#"{"version":1,"about":"x","scenarios":{"publish":{"about":"y","p95_ms":5}},
               "global":{"about":"z"},"canary":{"about":"w"}}"#,
        )
        .unwrap();
        assert_eq!(ok.scenarios["publish"].p95_ms, Some(5.0));
        assert_eq!(ok.about.as_deref(), Some("x"));
    }

    /// `sample_report` with a clean webhook scenario added.
    fn with_webhook() -> DrillReport {
        let mut r = sample_report();
        let mut sc = r.scenarios[0].clone();
        sc.scenario = "webhook".into();
        sc.http.statuses = [("202".to_string(), 130), ("429".to_string(), 3)]
            .into_iter()
            .collect();
        sc.webhook = Some(WebhookStats {
            source: "drill".into(),
            stream: Some("drill:webhooks".into()),
            sent: 100,
            accepted: 100,
            duplicates_sent: 30,
            duplicate_answers: 30,
            max_hit_count: 1,
            ..WebhookStats::default()
        });
        r.scenarios.push(sc);
        r
    }

    #[test]
    fn webhook_findings_are_breaches_by_name() {
        let slo = Slo::parse(SHIPPED).unwrap();
        assert_eq!(slo.judge(&with_webhook()), Vec::<String>::new());
        let mut r = with_webhook();
        let w = r.scenarios[3].webhook.as_mut().unwrap();
        w.doubles = 1;
        w.answered_as_new = 1;
        w.seq_mismatches = 2;
        w.uncounted_duplicates = 3;
        r.scenarios[3].log.duplicated = 1;
        r.totals.duplicated = 1;
        let b = slo.judge(&r);
        assert_eq!(b.len(), 5, "{b:?}");
        assert!(
            b[0].starts_with("webhook: 1 webhook append(s) beyond the first"),
            "{b:?}"
        );
        assert!(
            b[0].contains("in drill:webhooks (doubles: run twice)"),
            "{b:?}"
        );
        assert!(
            b[1].starts_with("webhook: 1 duplicate(s) answered as new"),
            "{b:?}"
        );
        assert!(
            b[2].starts_with("webhook: 2 answer(s) name a seq other"),
            "{b:?}"
        );
        assert!(
            b[3].starts_with("webhook: 3 duplicate answer(s) with hitCount 0"),
            "{b:?}"
        );
        assert!(b[4].starts_with("global: 1 duplicated"), "{b:?}");

        let mut r = with_webhook();
        let w = r.scenarios[3].webhook.as_mut().unwrap();
        w.drops = 2;
        w.read_error = Some("reading drill:webhooks after 4: HTTP 500".into());
        r.totals.missing = 2;
        let b = slo.judge(&r);
        assert!(
            b.iter()
                .any(|s| s.starts_with("webhook: drill:webhooks could not be read back")),
            "{b:?}"
        );
        assert!(
            b.iter().any(|s| s
                .starts_with("webhook: 2 accepted webhook(s) missing from drill:webhooks (drops)")),
            "{b:?}"
        );
        assert!(
            b.iter().any(|s| s.starts_with("global: 2 events lost")),
            "{b:?}"
        );

        // A webhook run that sent no duplicate, or got none answered, measured nothing.
        let mut r = with_webhook();
        r.scenarios[3].webhook.as_mut().unwrap().duplicates_sent = 0;
        assert_eq!(
            slo.judge(&r),
            vec!["webhook: no duplicate was sent (nothing was measured)"]
        );
        let mut r = with_webhook();
        r.scenarios[3].webhook.as_mut().unwrap().duplicate_answers = 0;
        let b = slo.judge(&r);
        assert_eq!(
            b,
            vec![
                "webhook: 30 duplicate(s) sent, none answered as a duplicate (nothing was measured)"
            ]
        );
        let mut r = with_webhook();
        r.scenarios[3].published = 0;
        assert_eq!(
            slo.judge(&r),
            vec!["webhook: no webhook was accepted (nothing was measured)"]
        );
        // 422 (the same id with another body) is not an answer the drill expects.
        let mut r = with_webhook();
        r.scenarios[3].http.statuses.insert("422".into(), 1);
        r.scenarios[3].http.unknown_status_rate = 0.5;
        assert_eq!(
            slo.judge(&r),
            vec!["webhook: unknown status rate 0.5000 above 0.01"]
        );
    }

    #[test]
    fn a_scenario_not_run_breaches_only_when_required() {
        let slo = Slo::parse(SHIPPED).unwrap();
        let mut r = with_webhook();
        r.scenarios[3].published = 0;
        r.scenarios[3].not_run = Some(crate::report::NotRun {
            reason: "the server has no webhook source `drill`".into(),
            required: false,
        });
        assert_eq!(slo.judge(&r), Vec::<String>::new());
        r.scenarios[3].not_run.as_mut().unwrap().required = true;
        assert_eq!(
            slo.judge(&r),
            vec!["webhook: not run — the server has no webhook source `drill`"]
        );
    }

    #[test]
    fn an_empty_run_is_a_breach() {
        let slo = Slo::parse(SHIPPED).unwrap();
        let mut r = sample_report();
        r.scenarios[1].delivered = 0;
        let b = slo.judge(&r);
        assert!(b.iter().any(|s| s.contains("none delivered")), "{b:?}");
    }
}
