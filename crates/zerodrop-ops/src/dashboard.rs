//! `zerodrop dashboard`: one self-contained HTML page from the JSON reports in the reports
//! directory — latency percentiles over time, error rates against their SLO lines, resume
//! success, losses, the latest probe and capacity. Inline SVG and CSS only: the page needs
//! no network to be viewed. With `--url` it also carries a snapshot of that server taken
//! when the page was written (readiness, open connections, dropped count, resume success).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use serde_json::Value;

use crate::common::OutArgs;
use crate::drill::Scenario;
use crate::report::DrillReport;
use crate::slo::Slo;

#[derive(Args, Clone, Debug)]
pub struct DashboardArgs {
    /// A running instance to add a live snapshot of (taken when the page is written)
    /// [default: none; the page shows the reports only].
    #[arg(long)]
    pub url: Option<String>,
    /// PEM file with CA certificates to trust for an `https://` --url on top of the system's
    /// roots (a private or self-signed CA)
    #[arg(long, env = "ZERODROP_CA_FILE", value_name = "PATH")]
    pub ca_file: Option<PathBuf>,
    /// SLO file whose limits are drawn as lines.
    #[arg(long)]
    pub slo: Option<PathBuf>,
    /// Reports are read from, and dashboard.html written to, --out-dir.
    #[command(flatten)]
    pub out: OutArgs,
}

/// One drill run on the time axis.
#[derive(Debug, Clone)]
pub struct Run {
    pub label: String,
    pub at_ms: u64,
    pub drill: DrillReport,
}

/// Everything the page shows, gathered from the reports.
#[derive(Debug, Default)]
pub struct Collected {
    pub runs: Vec<Run>,
    pub probes: Vec<(u64, bool, Option<String>, String)>,
    pub capacity: Option<Value>,
    /// Per game-day report: (fault, outcome: `held`, `not_held` or `skipped`).
    pub gamedays: Vec<(String, Vec<(String, String)>)>,
    pub files: usize,
    /// The `--url` server as it was when the page was written.
    pub live: Option<Live>,
}

/// A server's state at one moment: `/health/ready` and `/metrics?format=json`.
#[derive(Debug, Clone, Default)]
pub struct Live {
    pub url: String,
    pub at_ms: u64,
    /// Why the server could not be read.
    pub error: Option<String>,
    pub ready: bool,
    pub metrics: Option<Value>,
}

/// Reads `url`'s readiness and metrics (never fails: an unreachable server is a state).
pub async fn live(url: &str) -> Live {
    let mut l = Live {
        url: url.to_string(),
        at_ms: zerodrop_core::now_ms(),
        ..Live::default()
    };
    let http = match zerodrop_client::HttpClient::with_timeout(
        url,
        None,
        std::time::Duration::from_secs(5),
    ) {
        Ok(h) => h,
        Err(e) => {
            l.error = Some(e.to_string());
            return l;
        }
    };
    match http.get_answer("/health/ready", None).await {
        Ok(a) => l.ready = a.status == 200,
        Err(e) => {
            l.error = Some(e.to_string());
            return l;
        }
    }
    l.metrics = http.metrics_json().await.ok();
    l
}

fn drill_of(v: &Value) -> Option<DrillReport> {
    serde_json::from_value::<DrillReport>(v.clone())
        .ok()
        .filter(|d| !d.scenarios.is_empty())
}

/// Reads every `*.json` report in `dir` (unknown or broken files are skipped).
pub fn collect(dir: &Path) -> anyhow::Result<Collected> {
    let mut c = Collected::default();
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    entries.sort();
    for p in entries {
        let Ok(text) = std::fs::read_to_string(&p) else {
            continue;
        };
        let Ok(v) = serde_json::from_str::<Value>(&text) else {
            continue;
        };
        let name = p
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("?")
            .to_string();
        c.files += 1;
        match v.get("tool").and_then(|t| t.as_str()).unwrap_or("") {
            "drill" => {
                if let Some(d) = drill_of(&v) {
                    c.runs.push(Run {
                        label: format!("drill {}", d.profile),
                        at_ms: d.finished_at_ms,
                        drill: d,
                    });
                }
            }
            "gate" => {
                if let Some(d) = v.get("drill").and_then(drill_of) {
                    c.runs.push(Run {
                        label: format!("gate {}", d.profile),
                        at_ms: d.finished_at_ms,
                        drill: d,
                    });
                }
            }
            "canary" => {
                for side in ["control", "candidate"] {
                    for d in v
                        .get(side)
                        .and_then(|x| x.as_array())
                        .into_iter()
                        .flatten()
                        .filter_map(drill_of)
                    {
                        c.runs.push(Run {
                            label: format!("canary {side}"),
                            at_ms: d.finished_at_ms,
                            drill: d,
                        });
                    }
                }
            }
            "gameday" => {
                let mut faults = Vec::new();
                for f in v
                    .get("faults")
                    .and_then(|x| x.as_array())
                    .into_iter()
                    .flatten()
                {
                    let fault = f
                        .get("fault")
                        .and_then(|x| x.as_str())
                        .unwrap_or("?")
                        .to_string();
                    // `outcome` since skipped faults exist; older reports only say held or not.
                    let outcome = match f.get("outcome").and_then(|x| x.as_str()) {
                        Some(o) => o.to_string(),
                        None if f.get("zeroDropHeld").and_then(|x| x.as_bool()) == Some(true) => {
                            "held".to_string()
                        }
                        None => "not_held".to_string(),
                    };
                    faults.push((fault.clone(), outcome));
                    if let Some(d) = f.get("drill").and_then(drill_of) {
                        c.runs.push(Run {
                            label: format!("gameday {fault}"),
                            at_ms: d.finished_at_ms,
                            drill: d,
                        });
                    }
                }
                c.gamedays.push((name, faults));
            }
            "probe" => c.probes.push((
                v.get("startedAtMs").and_then(|x| x.as_u64()).unwrap_or(0),
                v.get("ok").and_then(|x| x.as_bool()).unwrap_or(false),
                v.get("failedStep")
                    .and_then(|x| x.as_str())
                    .map(str::to_string),
                name,
            )),
            "capacity" => c.capacity = Some(v),
            _ => {}
        }
    }
    c.runs.sort_by_key(|r| r.at_ms);
    c.probes.sort_by_key(|p| p.0);
    Ok(c)
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

const COLORS: [&str; 5] = ["#2563eb", "#d97706", "#dc2626", "#059669", "#7c3aed"];

/// An SVG line chart: `series` share the x axis (run index); `limit` is a dashed SLO line.
fn line_chart(
    title: &str,
    unit: &str,
    series: &[(&str, Vec<Option<f64>>)],
    limit: Option<(&str, f64)>,
) -> String {
    let (w, h, l, r, t, b) = (560.0, 236.0, 56.0, 12.0, 28.0, 40.0);
    let n = series.iter().map(|s| s.1.len()).max().unwrap_or(0);
    let mut max = series
        .iter()
        .flat_map(|s| s.1.iter().flatten().copied())
        .fold(0.0f64, f64::max);
    if let Some((_, v)) = limit {
        max = max.max(v);
    }
    let max = if max <= 0.0 { 1.0 } else { max * 1.1 };
    let x = |i: usize| {
        l + if n <= 1 {
            (w - l - r) / 2.0
        } else {
            i as f64 * (w - l - r) / (n - 1) as f64
        }
    };
    let y = |v: f64| t + (h - t - b) * (1.0 - v / max);
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg class="chart" viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" aria-label="{t}"><text x="{l}" y="18" class="ct">{t}</text>"#,
        t = esc(title)
    );
    for k in 0..=4 {
        let v = max * k as f64 / 4.0;
        let yy = y(v);
        let _ = write!(
            s,
            r##"<line x1="{l}" x2="{x2}" y1="{yy:.1}" y2="{yy:.1}" stroke="#e5e7eb"/><text x="{tx}" y="{ty:.1}" class="ax" text-anchor="end">{v}</text>"##,
            x2 = w - r,
            tx = l - 4.0,
            ty = yy + 4.0,
            v = fmt_num(v)
        );
    }
    let _ = write!(
        s,
        r#"<text x="{}" y="{}" class="ax" text-anchor="end">{}</text>"#,
        w - r,
        h - 6.0,
        esc(unit)
    );
    // Run numbers on the x axis (they match the table's # column).
    for i in (0..n).step_by((n / 12).max(1)) {
        let _ = write!(
            s,
            r#"<text x="{:.1}" y="{}" class="ax" text-anchor="middle">#{}</text>"#,
            x(i),
            h - b + 14.0,
            i + 1
        );
    }
    if let Some((label, v)) = limit {
        let yy = y(v);
        let _ = write!(
            s,
            r##"<line x1="{l}" x2="{x2}" y1="{yy:.1}" y2="{yy:.1}" stroke="#dc2626" stroke-dasharray="6 4"/><text x="{tx}" y="{ty:.1}" class="slo" text-anchor="end">{lab} {v}</text>"##,
            x2 = w - r,
            tx = w - r,
            ty = yy - 4.0,
            lab = esc(label),
            v = fmt_num(v)
        );
    }
    for (si, (name, vals)) in series.iter().enumerate() {
        let c = COLORS[si % COLORS.len()];
        let pts: Vec<String> = vals
            .iter()
            .enumerate()
            .filter_map(|(i, v)| v.map(|v| format!("{:.1},{:.1}", x(i), y(v))))
            .collect();
        if pts.len() > 1 {
            let _ = write!(
                s,
                r#"<polyline fill="none" stroke="{c}" stroke-width="2" points="{}"/>"#,
                pts.join(" ")
            );
        }
        for (i, v) in vals.iter().enumerate() {
            if let Some(v) = v {
                let _ = write!(
                    s,
                    r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{c}"><title>{} #{}: {}</title></circle>"#,
                    x(i),
                    y(*v),
                    esc(name),
                    i + 1,
                    fmt_num(*v)
                );
            }
        }
        let _ = write!(
            s,
            r#"<rect x="{lx}" y="{ly}" width="10" height="10" fill="{c}"/><text x="{tx}" y="{ty}" class="ax">{}</text>"#,
            esc(name),
            lx = l + si as f64 * 100.0,
            ly = h - 15.0,
            tx = l + 14.0 + si as f64 * 100.0,
            ty = h - 6.0
        );
    }
    if n == 0 {
        let _ = write!(
            s,
            r#"<text x="{}" y="{}" class="ax">no data yet</text>"#,
            w / 2.0 - 30.0,
            h / 2.0
        );
    }
    s.push_str("</svg>");
    s
}

fn fmt_num(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.4}")
    }
}

/// The page.
pub fn render(c: &Collected, slo: &Slo) -> String {
    let mut h = String::new();
    let generated = zerodrop_core::utc_stamp(zerodrop_core::now_ms());
    let _ = write!(
        h,
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><title>zerodrop reliability dashboard</title><style>
body{{font:14px system-ui,sans-serif;margin:24px;color:#111827;background:#f9fafb}}h1{{font-size:22px;margin:0 0 4px}}h2{{font-size:17px;margin:28px 0 8px}}
.cards{{display:flex;flex-wrap:wrap;gap:12px}}.card{{background:#fff;border:1px solid #e5e7eb;border-radius:8px;padding:10px 14px;min-width:150px}}
.card .v{{font-size:22px;font-weight:600}}.card .k{{color:#6b7280;font-size:12px}}.ok{{color:#059669}}.bad{{color:#dc2626}}
.grid{{display:flex;flex-wrap:wrap;gap:12px}}.chart{{background:#fff;border:1px solid #e5e7eb;border-radius:8px}}.ct{{font-weight:600;font-size:13px}}.ax{{font-size:10px;fill:#6b7280}}.slo{{font-size:10px;fill:#dc2626}}
table{{border-collapse:collapse;background:#fff}}td,th{{border:1px solid #e5e7eb;padding:4px 8px;text-align:right}}th{{background:#f3f4f6}}td.l,th.l{{text-align:left}}
</style></head><body><h1>zerodrop reliability dashboard</h1><div class="k">generated {generated} from {} report file(s)</div>"#,
        c.files
    );

    // Cards: the latest run.
    h.push_str(r#"<h2>Latest</h2><div class="cards">"#);
    if let Some(last) = c.runs.last() {
        let d = &last.drill;
        let lost = d.totals.dropped + d.totals.missing;
        let held = d.zero_drop_held();
        let _ = write!(
            h,
            r#"<div class="card"><div class="k">latest run</div><div class="v">{}</div><div class="k">{}</div></div>"#,
            esc(&last.label),
            zerodrop_core::utc_stamp(last.at_ms)
        );
        let _ = write!(
            h,
            r#"<div class="card"><div class="k">zero-drop</div><div class="v {}" id="zero-drop">{}</div><div class="k">lost {lost} · duplicated {} · out of order {}</div></div>"#,
            if held { "ok" } else { "bad" },
            if held { "held" } else { "BROKEN" },
            d.totals.duplicated,
            d.totals.out_of_order
        );
        let _ = write!(
            h,
            r#"<div class="card"><div class="k">resume success</div><div class="v" id="resume-rate">{:.2}%</div><div class="k">{} of {}</div></div>"#,
            d.totals.resume_success_rate * 100.0,
            d.totals.resume_successes,
            d.totals.resume_attempts
        );
        for sc in &d.scenarios {
            if sc.not_run.is_some() {
                let _ = write!(
                    h,
                    r#"<div class="card"><div class="k">{} p95</div><div class="v" data-scenario="{}">not run</div><div class="k">{}</div></div>"#,
                    esc(&sc.scenario),
                    esc(&sc.scenario),
                    esc(sc.not_run.as_ref().map(|n| n.reason.as_str()).unwrap_or(""))
                );
                continue;
            }
            let _ = write!(
                h,
                r#"<div class="card"><div class="k">{} p95</div><div class="v" data-scenario="{}">{} ms</div><div class="k">p50 {} · p99 {}</div></div>"#,
                esc(&sc.scenario),
                esc(&sc.scenario),
                fmt_num(sc.latency_ms.p95),
                fmt_num(sc.latency_ms.p50),
                fmt_num(sc.latency_ms.p99)
            );
        }
        let _ = write!(
            h,
            r#"<div class="card"><div class="k">throughput</div><div class="v">{:.0}/s</div><div class="k">delivered · {:.0}/s published</div></div>"#,
            d.totals.delivered_per_sec, d.totals.published_per_sec
        );
    } else {
        h.push_str(r#"<div class="card"><div class="v">no drill yet</div><div class="k">run zerodrop drill</div></div>"#);
    }
    if let Some((at, ok, step, _)) = c.probes.last() {
        let _ = write!(
            h,
            r#"<div class="card"><div class="k">last probe {}</div><div class="v {}">{}</div><div class="k">{}</div></div>"#,
            zerodrop_core::utc_stamp(*at),
            if *ok { "ok" } else { "bad" },
            if *ok { "passed" } else { "FAILED" },
            esc(step.as_deref().unwrap_or("all steps"))
        );
    }
    if let Some(l) = &c.live {
        let m = |p: &str| {
            l.metrics
                .as_ref()
                .and_then(|m| m.pointer(p))
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| v.to_string())
                })
                .unwrap_or_else(|| "?".into())
        };
        let (class, state, detail) = match &l.error {
            Some(e) => ("bad", "unreachable", e.clone()),
            None => (
                if l.ready { "ok" } else { "bad" },
                if l.ready { "ready" } else { "NOT READY" },
                format!(
                    "ws {} · sse {} · dropped {} · resume success {} · store {} up {}",
                    m("/ws_metrics/ws_active"),
                    m("/ws_metrics/sse_active"),
                    m("/ws_metrics/dropped_messages"),
                    m("/resume_store_metrics/resume_success_rate"),
                    m("/resume_store_metrics/store"),
                    m("/resume_store_metrics/up")
                ),
            ),
        };
        let _ = write!(
            h,
            r#"<div class="card"><div class="k">live {} at {}</div><div class="v {class}" id="live">{state}</div><div class="k">{}</div></div>"#,
            esc(&l.url),
            zerodrop_core::utc_stamp(l.at_ms),
            esc(&detail)
        );
    }
    if let Some(cap) = &c.capacity {
        let g = |k: &str| cap.get(k).map(|v| v.to_string()).unwrap_or_default();
        let _ = write!(
            h,
            r#"<div class="card"><div class="k">capacity</div><div class="v">{} instance(s)</div><div class="k">{} streams at peak · {} per instance · multi-region {}</div></div>"#,
            g("instancesNeeded"),
            g("expectedPeakStreams"),
            g("perInstanceCapacity"),
            g("activateMultiRegionProgram")
        );
    }
    h.push_str("</div>");

    // Latency per scenario.
    h.push_str(r#"<h2>Publish-to-deliver latency over time</h2><div class="grid">"#);
    for sc in Scenario::ALL {
        let id = sc.id();
        let vals = |f: fn(&crate::report::Percentiles) -> f64| -> Vec<Option<f64>> {
            c.runs
                .iter()
                .map(|r| {
                    r.drill
                        .scenario(id)
                        .filter(|s| s.latency_ms.count > 0)
                        .map(|s| f(&s.latency_ms))
                })
                .collect()
        };
        let p50 = vals(|p| p.p50);
        if p50.iter().all(Option::is_none) {
            continue;
        }
        let limit = slo
            .scenarios
            .get(id)
            .and_then(|s| s.p95_ms)
            .map(|v| ("SLO p95", v));
        h.push_str(&line_chart(
            &format!("{id} latency"),
            "ms",
            &[
                ("p50", p50),
                ("p95", vals(|p| p.p95)),
                ("p99", vals(|p| p.p99)),
            ],
            limit,
        ));
    }
    h.push_str("</div>");

    // Error rates against the SLO.
    h.push_str(r#"<h2>Error rates against the SLO</h2><div class="grid">"#);
    type Pick = fn(&crate::report::ScenarioReport) -> f64;
    type Limit = fn(&crate::slo::ScenarioSlo) -> Option<f64>;
    let kinds: [(&str, Pick, Limit); 3] = [
        ("5xx rate", |s| s.http.error_5xx_rate, |s| s.error_5xx_rate),
        (
            "network error rate",
            |s| s.network_error_rate,
            |s| s.network_error_rate,
        ),
        (
            "unknown status rate",
            |s| s.http.unknown_status_rate,
            |s| s.unknown_status_rate,
        ),
    ];
    for (name, pick, lim) in kinds {
        let series: Vec<(&str, Vec<Option<f64>>)> = Scenario::ALL
            .iter()
            .map(|sc| {
                (
                    sc.id(),
                    c.runs
                        .iter()
                        .map(|r| {
                            r.drill
                                .scenario(sc.id())
                                .filter(|s| s.not_run.is_none())
                                .map(pick)
                        })
                        .collect::<Vec<_>>(),
                )
            })
            .filter(|(_, v)| v.iter().any(Option::is_some))
            .collect();
        let limit = slo
            .scenarios
            .values()
            .filter_map(lim)
            .fold(None, |a: Option<f64>, v| Some(a.map_or(v, |a| a.min(v))));
        h.push_str(&line_chart(
            name,
            "fraction",
            &series,
            limit.map(|v| ("SLO", v)),
        ));
    }
    h.push_str("</div>");

    // Resume and losses.
    h.push_str(r#"<h2>Resume success and losses</h2><div class="grid">"#);
    let resume: Vec<Option<f64>> = c
        .runs
        .iter()
        .map(|r| (r.drill.totals.resume_attempts > 0).then_some(r.drill.totals.resume_success_rate))
        .collect();
    h.push_str(&line_chart(
        "resume success rate",
        "fraction",
        &[("success", resume)],
        Some(("SLO min", slo.global.min_resume_success_rate)),
    ));
    let lost: Vec<Option<f64>> = c
        .runs
        .iter()
        .map(|r| Some((r.drill.totals.dropped + r.drill.totals.missing) as f64))
        .collect();
    let dup: Vec<Option<f64>> = c
        .runs
        .iter()
        .map(|r| Some(r.drill.totals.duplicated as f64))
        .collect();
    let ooo: Vec<Option<f64>> = c
        .runs
        .iter()
        .map(|r| Some(r.drill.totals.out_of_order as f64))
        .collect();
    h.push_str(&line_chart(
        "dropped, duplicated, out of order",
        "events",
        &[("lost", lost), ("duplicated", dup), ("out of order", ooo)],
        Some(("max", slo.global.max_dropped as f64)),
    ));
    h.push_str("</div>");

    if !c.gamedays.is_empty() {
        h.push_str(r#"<h2>Game days</h2><table><tr><th class="l">report</th><th class="l">fault</th><th class="l">zero-drop</th></tr>"#);
        for (name, faults) in &c.gamedays {
            for (f, outcome) in faults {
                let (class, text) = match outcome.as_str() {
                    "held" => ("ok", "held"),
                    "skipped" => ("", "skipped"),
                    _ => ("bad", "BROKEN"),
                };
                let _ = write!(
                    h,
                    r#"<tr><td class="l">{}</td><td class="l">{}</td><td class="l {}">{}</td></tr>"#,
                    esc(name),
                    esc(f),
                    class,
                    text
                );
            }
        }
        h.push_str("</table>");
    }

    h.push_str(r#"<h2>Runs</h2><table id="runs"><tr><th>#</th><th class="l">when (UTC)</th><th class="l">run</th><th>published</th><th>delivered</th>"#);
    for sc in Scenario::ALL {
        let _ = write!(h, "<th>{} p95 ms</th>", sc.id());
    }
    h.push_str("<th>resume</th><th>lost</th><th>dup</th><th>SLO</th></tr>");
    for (i, r) in c.runs.iter().enumerate().rev() {
        let d = &r.drill;
        let _ = write!(
            h,
            r#"<tr><td>{}</td><td class="l">{}</td><td class="l">{}</td><td>{}</td><td>{}</td>"#,
            i + 1,
            zerodrop_core::utc_stamp(r.at_ms),
            esc(&r.label),
            d.totals.published,
            d.totals.delivered
        );
        for sc in Scenario::ALL {
            match d.scenario(sc.id()).filter(|s| s.not_run.is_none()) {
                Some(s) => {
                    let _ = write!(h, "<td>{}</td>", fmt_num(s.latency_ms.p95));
                }
                None => h.push_str("<td>–</td>"),
            }
        }
        let _ = write!(
            h,
            r#"<td>{:.2}%</td><td>{}</td><td>{}</td><td class="{}">{}</td></tr>"#,
            d.totals.resume_success_rate * 100.0,
            d.totals.dropped + d.totals.missing,
            d.totals.duplicated,
            if d.breaches.is_empty() { "ok" } else { "bad" },
            if d.breaches.is_empty() {
                "met".to_string()
            } else {
                format!("{} breach(es)", d.breaches.len())
            }
        );
    }
    h.push_str("</table></body></html>\n");
    h
}

pub async fn run(args: DashboardArgs) -> anyhow::Result<ExitCode> {
    let dir = args.out.dir();
    let slo = Slo::load(args.slo.as_deref())?;
    let mut c = collect(&dir)?;
    if let Some(u) = &args.url {
        if let Some(ca) = &args.ca_file {
            crate::common::install_ca_file(ca)?;
        }
        let l = live(u).await;
        match &l.error {
            Some(e) => println!("live snapshot of {u}: unreachable ({e})"),
            None => println!(
                "live snapshot of {u}: {}",
                if l.ready { "ready" } else { "NOT ready" }
            ),
        }
        c.live = Some(l);
    }
    let html = render(&c, &slo);
    let path = dir.join("dashboard.html");
    std::fs::write(&path, html).with_context(|| format!("writing {}", path.display()))?;
    println!(
        "dashboard: {} ({} runs from {} reports)",
        path.display(),
        c.runs.len(),
        c.files
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::tests::sample_report;

    #[test]
    fn renders_the_reports_numbers_without_any_network_reference() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = sample_report();
        a.finished_at_ms = 1_795_000_000_000;
        let mut b = sample_report();
        b.finished_at_ms = 1_795_000_100_000;
        b.scenarios[1].latency_ms.p95 = 17.25;
        crate::common::write_report(dir.path(), "drill", Some("quick"), &a).unwrap();
        crate::common::write_report(
            dir.path(),
            "gate",
            Some("quick"),
            &serde_json::json!({"tool":"gate","drill":b}),
        )
        .unwrap();
        crate::common::write_report(dir.path(), "probe", None, &serde_json::json!({"tool":"probe","ok":false,"failedStep":"ws resume","startedAtMs":1})).unwrap();
        std::fs::write(dir.path().join("broken.json"), "{").unwrap();
        let c = collect(dir.path()).unwrap();
        assert_eq!(c.runs.len(), 2);
        let html = render(&c, &Slo::parse(crate::slo::SHIPPED).unwrap());
        assert!(html.contains("17.25 ms"), "latest ws_fanout p95 card");
        assert!(html.contains("ws resume"), "failed probe step");
        assert!(html.contains("<svg"));
        assert!(
            !html.contains("http://") && !html.contains("https://") && !html.contains("src="),
            "self-contained"
        );
    }

    #[test]
    fn a_scenario_not_run_shows_as_such_and_plots_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = sample_report();
        r.finished_at_ms = 1_795_000_000_000;
        let mut w = r.scenarios[0].clone();
        w.scenario = "webhook".into();
        w.latency_ms = Default::default();
        w.http.error_5xx_rate = 0.5;
        w.not_run = Some(crate::report::NotRun {
            reason: "the server has no webhook source `drill`".into(),
            required: false,
        });
        r.scenarios.push(w);
        crate::common::write_report(dir.path(), "drill", Some("quick"), &r).unwrap();
        let html = render(
            &collect(dir.path()).unwrap(),
            &Slo::parse(crate::slo::SHIPPED).unwrap(),
        );
        assert!(
            html.contains(r#"<div class="v" data-scenario="webhook">not run</div><div class="k">the server has no webhook source `drill`</div>"#),
            "{html}"
        );
        // Its (empty) rates are not plotted as measurements: no webhook series anywhere.
        assert!(!html.contains(">webhook<"), "{html}");
        assert!(!html.contains("webhook latency"), "{html}");
    }
}
