//! The drill report: what every load-driving tool (drill, gate, canary, gameday) writes, and
//! what gate, canary, capacity and the dashboard read back. Field names are camelCase JSON;
//! the schema is documented in docs/operations.md.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct Percentiles {
    pub count: u64,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    /// From a histogram of microseconds, in milliseconds.
    pub fn from_us(h: &Histogram<u64>) -> Percentiles {
        if h.is_empty() {
            return Percentiles::default();
        }
        let ms = |v: u64| (v as f64 / 1000.0 * 100.0).round() / 100.0;
        Percentiles {
            count: h.len(),
            p50: ms(h.value_at_quantile(0.50)),
            p95: ms(h.value_at_quantile(0.95)),
            p99: ms(h.value_at_quantile(0.99)),
            max: ms(h.max()),
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpStats {
    /// HTTP answers received (every attempt, retries included).
    pub requests: u64,
    /// Count per status code.
    pub statuses: BTreeMap<String, u64>,
    pub allowed_statuses: Vec<u16>,
    pub error_5xx_rate: f64,
    pub unknown_status_rate: f64,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ResumeStats {
    /// Whether this scenario forces disconnects (so zero attempts means it measured nothing).
    pub expected: bool,
    pub attempts: u64,
    pub successes: u64,
    pub success_rate: f64,
    /// Failed resumes by error code (or `network`).
    pub failures: BTreeMap<String, u64>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LogCheck {
    pub streams: u64,
    /// Events the log holds (sum of heads).
    pub events: u64,
    /// Acknowledged publishes (201) whose payload is not in the log.
    pub missing: u64,
    /// Payloads the log holds more than once (an idempotent retry appended twice).
    pub duplicated: u64,
    /// Seqs that are not 1..head contiguous.
    pub seq_holes: u64,
    /// Events already trimmed by retention when the log was read (not checked, not lost).
    #[serde(default)]
    pub trimmed: u64,
}

/// Why a planned scenario did not run (its server lacks what it needs).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NotRun {
    pub reason: String,
    /// Whether that is a breach: the scenario was named in `--scenarios`, or what it met was
    /// a failure rather than a feature left unconfigured.
    pub required: bool,
}

/// The `webhook` scenario's own findings. Drops and doubles also count in the scenario's
/// `log.missing` and `log.duplicated` (and so in the totals), like a publish's.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WebhookStats {
    /// `--webhook-source`.
    pub source: String,
    /// The dedupe scope the server answered with.
    pub scope: String,
    /// The stream the source appends to (from the first 202), read back afterwards.
    pub stream: Option<String>,
    /// The read-back started at this seq (the first webhook of the run).
    pub from_seq: u64,
    /// Distinct message ids sent.
    pub sent: u64,
    /// Message ids answered 202 at least once.
    pub accepted: u64,
    /// Message ids never answered 202 (given up after retries, or refused).
    pub failed: u64,
    /// Second copies sent of an id: after its first answer, or at the same time as it.
    pub duplicates_sent: u64,
    pub duplicates_sequential: u64,
    pub duplicates_concurrent: u64,
    /// 202 answers that said `duplicate: true` (second copies, and retries of a request whose
    /// first answer was lost after it was accepted).
    pub duplicate_answers: u64,
    /// Answers that said `duplicate: false` for an id already answered so: run twice.
    pub answered_as_new: u64,
    /// `duplicate: true` answers with a `hitCount` of 0 (the duplicate was not counted).
    pub uncounted_duplicates: u64,
    pub max_hit_count: u64,
    /// Answers whose seq differs from the id's first answer, or from where the stream holds it.
    pub seq_mismatches: u64,
    /// Requests sent again after 429, 503, 409, 5xx or a network error.
    pub retries: u64,
    /// Accepted ids missing from the stream.
    pub drops: u64,
    /// Appends beyond the first of one id (accepted or not): ran more than once.
    pub doubles: u64,
    /// Ids in the stream that were never answered 202 (their answer was lost): no loss.
    pub appended_unacknowledged: u64,
    /// Accepted ids already trimmed by retention when the stream was read (not checked).
    pub trimmed: u64,
    /// Why the stream could not be read back (nothing could be verified).
    pub read_error: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ScenarioReport {
    pub scenario: String,
    pub streams: u64,
    pub clients: u64,
    pub publishers: u64,
    /// Events acknowledged (201) to the drill's publishers.
    pub published: u64,
    /// Fresh deliveries (each event counted once per client).
    pub delivered: u64,
    /// Deliveries every client should have had: Σ clients × head.
    pub expected_deliveries: u64,
    /// Publish-to-deliver latency; for `publish`, the publish request latency.
    pub latency_ms: Percentiles,
    pub publish_latency_ms: Percentiles,
    pub http: HttpStats,
    /// Transport failures (refused, reset, timed out) ÷ HTTP requests and connects.
    pub network_errors: u64,
    pub network_error_rate: f64,
    pub resume: ResumeStats,
    /// Deliveries a client never got (after the drain wait).
    pub missing: u64,
    /// Events a client received twice.
    pub duplicated: u64,
    /// Events that arrived after a later seq of their stream.
    pub out_of_order: u64,
    /// Clients with any missing, duplicated or out-of-order event.
    pub clients_with_loss: u64,
    /// SSE `reset` events and WebSocket stream errors (a position the server could not serve).
    pub resets: u64,
    pub forced_disconnects: u64,
    pub unexpected_disconnects: u64,
    pub log: LogCheck,
    /// Set when the scenario did not run; its other figures are then empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_run: Option<NotRun>,
    /// The `webhook` scenario's findings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<WebhookStats>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Totals {
    pub published: u64,
    pub delivered: u64,
    /// Server-counted `dropped_messages` during the run (0 when the metrics could not be
    /// read: `server.available` is then false, and the SLO judge reports a breach).
    pub dropped: u64,
    pub missing: u64,
    pub duplicated: u64,
    pub out_of_order: u64,
    pub resume_attempts: u64,
    pub resume_successes: u64,
    pub resume_success_rate: f64,
    pub published_per_sec: f64,
    pub delivered_per_sec: f64,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadGenerator {
    /// CPU the drill process used, % of one core, over the run.
    pub cpu_percent: f64,
    pub cores: u64,
    /// Deliveries received and verified per second by this process (publishes excluded).
    pub verified_events_per_sec: f64,
    /// True when the drill itself was near saturation (its numbers then understate the server).
    pub saturated: bool,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Capacity {
    /// Concurrent client connections the drill planned.
    pub connections: u64,
    /// Clients connected and subscribed when publishing started.
    #[serde(default)]
    pub connected_at_start: u64,
    /// The server's open WebSocket + SSE connections (`ws_active + sse_active` of
    /// `/metrics?format=json`) when publishing started; `null` when unreadable.
    #[serde(default)]
    pub server_active_at_start: Option<u64>,
    pub streams: u64,
    pub delivered_per_sec: f64,
    pub published_per_sec: f64,
    /// Whether the run met the SLO it was judged against (drill: the default SLO).
    pub slo_met: bool,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DrillReport {
    pub tool: String,
    pub profile: String,
    pub url: String,
    pub run_id: String,
    pub started_at_ms: u64,
    pub finished_at_ms: u64,
    pub duration_sec: f64,
    pub scenarios: Vec<ScenarioReport>,
    pub totals: Totals,
    /// `GET /metrics?format=json` deltas over the run (`null` when unavailable).
    pub server: serde_json::Value,
    pub load_generator: LoadGenerator,
    pub capacity: Capacity,
    /// SLO breaches (drill: against the default SLO; informational, drill still exits 0
    /// unless zero-drop itself broke).
    pub breaches: Vec<String>,
}

impl DrillReport {
    pub fn scenario(&self, id: &str) -> Option<&ScenarioReport> {
        self.scenarios.iter().find(|s| s.scenario == id)
    }

    /// Whether the zero-drop promise held: nothing lost, duplicated or reordered.
    pub fn zero_drop_held(&self) -> bool {
        let t = &self.totals;
        t.dropped == 0 && t.missing == 0 && t.duplicated == 0 && t.out_of_order == 0
    }

    /// A human summary, one line per scenario.
    pub fn summary(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{:<16} {:>7} {:>9} {:>8} {:>8} {:>8} {:>7} {:>7} {:>7} {:>7} {:>5} {:>5}",
            "scenario",
            "clients",
            "published",
            "p50 ms",
            "p95 ms",
            "p99 ms",
            "5xx",
            "net",
            "unk",
            "resume",
            "miss",
            "dup"
        );
        for sc in &self.scenarios {
            if let Some(n) = &sc.not_run {
                let _ = writeln!(s, "{:<16} not run: {}", sc.scenario, n.reason);
                continue;
            }
            let resume = if sc.resume.attempts > 0 {
                format!("{:.1}%", sc.resume.success_rate * 100.0)
            } else {
                "-".into()
            };
            let _ = writeln!(
                s,
                "{:<16} {:>7} {:>9} {:>8.2} {:>8.2} {:>8.2} {:>7.4} {:>7.4} {:>7.4} {:>7} {:>5} {:>5}",
                sc.scenario,
                sc.clients,
                sc.published,
                sc.latency_ms.p50,
                sc.latency_ms.p95,
                sc.latency_ms.p99,
                sc.http.error_5xx_rate,
                sc.network_error_rate,
                sc.http.unknown_status_rate,
                resume,
                sc.missing + sc.log.missing,
                sc.duplicated + sc.log.duplicated
            );
        }
        for w in self
            .scenarios
            .iter()
            .filter(|sc| sc.not_run.is_none())
            .filter_map(|sc| sc.webhook.as_ref())
        {
            let _ = writeln!(
                s,
                "webhook {} → {}: sent {}, accepted {}, failed {}, retries {}; duplicates sent {} ({} after the answer, {} concurrent), answered as duplicates {}, as new {}; seq mismatches {}; drops {}, doubles {}{}",
                w.source,
                w.stream.as_deref().unwrap_or("no stream"),
                w.sent,
                w.accepted,
                w.failed,
                w.retries,
                w.duplicates_sent,
                w.duplicates_sequential,
                w.duplicates_concurrent,
                w.duplicate_answers,
                w.answered_as_new,
                w.seq_mismatches,
                w.drops,
                w.doubles,
                w.read_error
                    .as_ref()
                    .map(|e| format!("; stream NOT read back: {e}"))
                    .unwrap_or_default()
            );
        }
        let t = &self.totals;
        let _ = writeln!(
            s,
            "published {} ({:.0}/s), delivered {} ({:.0}/s); dropped {} missing {} duplicated {} out-of-order {}; resume {}/{}",
            t.published,
            t.published_per_sec,
            t.delivered,
            t.delivered_per_sec,
            if self.server.get("available").and_then(|v| v.as_bool()) == Some(true) {
                t.dropped.to_string()
            } else {
                "n/a (no metrics)".to_string()
            },
            t.missing,
            t.duplicated,
            t.out_of_order,
            t.resume_successes,
            t.resume_attempts
        );
        let _ = write!(
            s,
            "load generator: {:.0}% CPU of one core ({} cores), {:.0} verified events/s{}",
            self.load_generator.cpu_percent,
            self.load_generator.cores,
            self.load_generator.verified_events_per_sec,
            if self.load_generator.saturated {
                " — SATURATED: the drill, not the server, may be the bottleneck"
            } else {
                ""
            }
        );
        s
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A report that meets the shipped SLO.
    pub(crate) fn sample_report() -> DrillReport {
        let sc = |id: &str, clients: u64, p95: f64| ScenarioReport {
            scenario: id.into(),
            streams: 1,
            clients,
            publishers: 1,
            published: 100,
            delivered: 100 * clients,
            expected_deliveries: 100 * clients,
            latency_ms: Percentiles {
                count: 100,
                p50: p95 / 2.0,
                p95,
                p99: p95 * 1.5,
                max: p95 * 2.0,
            },
            http: HttpStats {
                requests: 100,
                statuses: [("201".to_string(), 100)].into_iter().collect(),
                allowed_statuses: vec![201],
                ..HttpStats::default()
            },
            resume: ResumeStats {
                expected: id == "resume",
                attempts: if id == "resume" { 10 } else { 0 },
                successes: if id == "resume" { 10 } else { 0 },
                success_rate: 1.0,
                ..ResumeStats::default()
            },
            ..ScenarioReport::default()
        };
        DrillReport {
            tool: "drill".into(),
            profile: "quick".into(),
            scenarios: vec![
                sc("publish", 0, 8.0),
                sc("ws_fanout", 10, 12.5),
                sc("resume", 5, 30.0),
            ],
            server: serde_json::json!({"available": true, "droppedMessages": 0}),
            totals: Totals {
                published: 300,
                delivered: 1500,
                resume_attempts: 10,
                resume_successes: 10,
                resume_success_rate: 1.0,
                ..Totals::default()
            },
            ..DrillReport::default()
        }
    }

    #[test]
    fn percentiles_are_milliseconds() {
        let mut h = Histogram::<u64>::new(3).unwrap();
        for v in 1..=1000u64 {
            h.record(v * 1000).unwrap();
        }
        let p = Percentiles::from_us(&h);
        assert_eq!(p.count, 1000);
        assert!((p.p50 - 500.0).abs() < 2.0, "{p:?}");
        assert!((p.p99 - 990.0).abs() < 3.0, "{p:?}");
        assert_eq!(
            Percentiles::from_us(&Histogram::new(3).unwrap()),
            Percentiles::default()
        );
    }

    #[test]
    fn reports_round_trip_and_summarise() {
        let r = sample_report();
        let back: DrillReport = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back.scenarios.len(), 3);
        assert!(r.zero_drop_held());
        assert!(r.summary().contains("ws_fanout"));
    }
}
