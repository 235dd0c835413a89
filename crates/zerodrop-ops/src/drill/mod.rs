//! `zerodrop drill`: many WebSocket and SSE clients and HTTP publishers with forced
//! disconnects; every delivery is verified (each seq once, in order, none missing) and every
//! acknowledged publish is looked up in the log afterwards.

pub mod engine;
pub mod plan;
pub mod track;
pub mod webhook;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use hdrhistogram::Histogram;
use tokio::sync::watch;
use tokio::time::Instant;
use zerodrop_client::HttpClient;

pub use plan::{Plan, PlanOverrides, Profile, Scenario};

use crate::common::{OutArgs, TargetArgs, duration_bar, now_ms, run_id, write_report};
use crate::report::*;
use crate::slo::Slo;
use engine::{Ctx, Finish, TaskStats, Tokens};
use plan::Behaviour;
use track::new_histogram;

/// Options shared by every tool that runs a drill (drill, gate, canary, gameday).
#[derive(Args, Clone, Debug)]
pub struct LoadArgs {
    /// Load profile.
    #[arg(long, value_enum, default_value = "quick")]
    pub profile: Profile,
    /// Scenarios to run (comma-separated) [default: all].
    #[arg(long, value_enum, value_delimiter = ',')]
    pub scenarios: Vec<Scenario>,
    /// Run length in minutes (soak, standard).
    #[arg(long)]
    pub minutes: Option<f64>,
    /// Run length in seconds, overriding the profile (short checks).
    #[arg(long)]
    pub duration: Option<f64>,
    /// Concurrent clients in all, spread over the scenarios (standard).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Events/s per publisher, or `max` (one request in flight, as fast as answers come).
    #[arg(long)]
    pub rate: Option<String>,
    /// HTTP publishers per scenario, overriding the profile.
    #[arg(long)]
    pub publishers: Option<usize>,
    /// Payload size in bytes of padding per event.
    #[arg(long, default_value_t = 100)]
    pub payload_bytes: usize,
    /// How long clients may take to catch up after publishing stops, seconds.
    #[arg(long, default_value_t = 10.0)]
    pub drain_sec: f64,
    /// File of pre-minted connect tokens (one per line) for servers whose JWT secret the tool
    /// does not know; they must allow the streams `drill:*`.
    #[arg(long)]
    pub token_pool_file: Option<PathBuf>,
    /// SLO file (allowed statuses; the drill's informational breaches).
    #[arg(long)]
    pub slo: Option<PathBuf>,
    /// Webhook source the `webhook` scenario posts to (`POST /v1/webhooks/{source}`); the
    /// server's config must declare it with a stream (`[webhooks.drill]`,
    /// `stream = "drill:webhooks"`).
    #[arg(long, default_value = "drill")]
    pub webhook_source: String,
}

impl LoadArgs {
    pub fn plan(&self) -> anyhow::Result<Plan> {
        if self.profile == Profile::Standard {
            anyhow::ensure!(
                self.minutes.is_some() && self.limit.is_some(),
                "--profile standard needs --minutes M and --limit L (standard = soak judged with \
                 --minutes M --limit L, L concurrent clients); missing: {}",
                [
                    self.minutes.is_none().then_some("--minutes"),
                    self.limit.is_none().then_some("--limit"),
                ]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .join(" and ")
            );
        }
        let rate = match self.rate.as_deref() {
            None => None,
            Some("max") => Some(None),
            Some(r) => {
                Some(Some(r.parse::<f64>().ok().filter(|v| *v > 0.0).context(
                    "--rate is events/s per publisher (> 0) or `max`",
                )?))
            }
        };
        let duration = match (self.duration, self.minutes) {
            (Some(s), _) => Some(Duration::from_secs_f64(s.max(0.5))),
            (None, Some(m)) => Some(Duration::from_secs_f64((m * 60.0).max(1.0))),
            _ => None,
        };
        Ok(plan::plan(
            self.profile,
            &PlanOverrides {
                duration,
                limit: self.limit,
                rate,
                scenarios: self.scenarios.clone(),
                publishers: self.publishers,
            },
        ))
    }
}

#[derive(Args, Clone, Debug)]
pub struct DrillArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    #[command(flatten)]
    pub load: LoadArgs,
    #[command(flatten)]
    pub out: OutArgs,
}

pub async fn run(args: DrillArgs) -> anyhow::Result<ExitCode> {
    let slo = Slo::load(args.load.slo.as_deref())?;
    let report = drive(&args.target, &args.load, &slo, "drill").await?;
    println!("{}", report.summary());
    for b in &report.breaches {
        println!("  SLO: {b}");
    }
    let path = write_report(
        &args.out.dir(),
        "drill",
        Some(report.profile.as_str()),
        &report,
    )?;
    println!("report: {}", path.display());
    Ok(if report.zero_drop_held() {
        ExitCode::SUCCESS
    } else {
        println!("zero-drop did NOT hold");
        ExitCode::FAILURE
    })
}

/// Runs one drill against `target` and returns its report (judged against `slo`).
pub async fn drive(
    target: &TargetArgs,
    load: &LoadArgs,
    slo: &Slo,
    tool: &str,
) -> anyhow::Result<DrillReport> {
    drive_with(target, load, slo, tool, None).await
}

/// [`drive`], telling `publishing` when every client is connected and publishing starts
/// (a game day times its faults from there).
pub async fn drive_with(
    target: &TargetArgs,
    load: &LoadArgs,
    slo: &Slo,
    tool: &str,
    publishing: Option<tokio::sync::oneshot::Sender<()>>,
) -> anyhow::Result<DrillReport> {
    let plan = load.plan()?;
    let creds = target.creds.resolve()?;
    let http = HttpClient::new(&target.url, Some(creds.api_key()?.to_string()))?;
    let run = run_id();
    let tokens = match &load.token_pool_file {
        Some(f) => {
            let text =
                std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
            let pool: Vec<String> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_string)
                .collect();
            anyhow::ensure!(!pool.is_empty(), "{} holds no token", f.display());
            Tokens::Pool(pool)
        }
        None => Tokens::Secret {
            secret: creds.jwt_secret()?.to_string(),
            run: run.clone(),
            ttl: plan.duration + Duration::from_secs(900),
        },
    };
    execute(
        &plan,
        http,
        &target.url,
        tokens,
        run,
        load.payload_bytes,
        Duration::from_secs_f64(load.drain_sec.max(1.0)),
        &load.webhook_source,
        slo,
        tool,
        publishing,
    )
    .await
}

struct ScenarioRun {
    streams: Vec<String>,
    stream_base: usize,
    /// Each client's task with the index of the stream it follows.
    tasks: Vec<(usize, tokio::task::JoinHandle<TaskStats>)>,
    publishers: Vec<tokio::task::JoinHandle<TaskStats>>,
    /// The `webhook` scenario's target (or why it cannot run); its publishers are senders.
    webhook: Option<webhook::Prepared>,
}

#[allow(clippy::too_many_arguments)]
pub async fn execute(
    plan: &Plan,
    http: HttpClient,
    url: &str,
    tokens: Tokens,
    run: String,
    payload_bytes: usize,
    drain: Duration,
    webhook_source: &str,
    slo: &Slo,
    tool: &str,
    publishing: Option<tokio::sync::oneshot::Sender<()>>,
) -> anyhow::Result<DrillReport> {
    let started_at_ms = now_ms();
    let metrics_before = http.metrics_json().await.ok();
    let cpu_before = cpu_seconds();
    let (stop_tx, stop_rx) = watch::channel(false);
    // Connect phase + run + drain, with slack: no task outlives this.
    let hard_deadline = Instant::now() + Duration::from_secs(60) + plan.duration + drain;
    let ctx = Arc::new(Ctx {
        http: http.clone(),
        base: url.trim_end_matches('/').to_string(),
        tokens,
        run: run.clone(),
        t0: std::time::Instant::now(),
        pad: "x".repeat(payload_bytes),
        stop: stop_rx,
        hard_deadline,
        published: AtomicU64::new(0),
        delivered: AtomicU64::new(0),
        ready: AtomicUsize::new(0),
        connected: AtomicUsize::new(0),
    });
    let (storm_tx, storm_rx) = watch::channel(0u32);
    let mut all_streams: Vec<String> = Vec::new();
    let mut head_txs: Vec<watch::Sender<Option<u64>>> = Vec::new();
    let mut runs: Vec<ScenarioRun> = Vec::new();
    let mut client_no = 0usize;
    let mut storm_at: Option<f64> = None;

    // Clients first: they subscribe from seq 0 of fresh streams, then publishing starts.
    for sp in &plan.scenarios {
        let base = all_streams.len();
        if sp.scenario == Scenario::Webhook {
            // The source's stream is the server's; the drill learns it from the first answer.
            runs.push(ScenarioRun {
                streams: Vec::new(),
                stream_base: base,
                tasks: Vec::new(),
                publishers: Vec::new(),
                webhook: Some(webhook::preflight(&http, webhook_source, &run, sp.requested).await),
            });
            continue;
        }
        let streams: Vec<String> = (0..sp.streams.max(1))
            .map(|k| format!("drill:{run}:{}:{k}", sp.scenario.id()))
            .collect();
        let mut heads = Vec::new();
        for s in &streams {
            all_streams.push(s.clone());
            let (tx, rx) = watch::channel(None);
            head_txs.push(tx);
            heads.push(rx);
        }
        if let Behaviour::StormAt(f) = sp.behaviour {
            storm_at = Some(f);
        }
        let mut tasks = Vec::new();
        for i in 0..sp.clients {
            let k = i % streams.len();
            let fin = Finish {
                head: heads[k].clone(),
            };
            let ctx = ctx.clone();
            let stream = streams[k].clone();
            let behaviour = sp.behaviour.clone();
            client_no += 1;
            let n = client_no;
            // Only the storm scenario's clients hear the storm.
            let storm = if matches!(sp.behaviour, Behaviour::StormAt(_)) {
                storm_rx.clone()
            } else {
                watch::channel(0u32).1
            };
            let h = match sp.scenario {
                Scenario::SseFanout => {
                    tokio::spawn(engine::sse_client(ctx, n, base + k, stream, behaviour, fin))
                }
                _ => tokio::spawn(engine::ws_client(
                    ctx,
                    n,
                    base + k,
                    stream,
                    behaviour,
                    storm,
                    fin,
                )),
            };
            tasks.push((base + k, h));
        }
        runs.push(ScenarioRun {
            streams,
            stream_base: base,
            tasks,
            publishers: Vec::new(),
            webhook: None,
        });
    }
    let total_clients = plan.clients();
    let connect_deadline = Instant::now() + Duration::from_secs(30);
    while ctx.ready.load(Ordering::Relaxed) < total_clients && Instant::now() < connect_deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // What publishing starts against: the clients that connected and subscribed, and the
    // server's own count of open WebSocket and SSE connections.
    let connected_at_start = ctx.connected.load(Ordering::Relaxed) as u64;
    let server_active_at_start = http
        .metrics_json()
        .await
        .ok()
        .and_then(|m| server_active(&m));

    // Publishers.
    let mut w = 0u32;
    let source: Arc<str> = Arc::from(webhook_source);
    for (sp, r) in plan.scenarios.iter().zip(runs.iter_mut()) {
        if let Some(prep) = &r.webhook {
            if prep.outcome.is_ok() {
                for _ in 0..sp.publishers {
                    r.publishers.push(tokio::spawn(webhook::sender(
                        ctx.clone(),
                        w,
                        source.clone(),
                        sp.rate,
                    )));
                    w += 1;
                }
            }
            continue;
        }
        for p in 0..sp.publishers {
            let n = r.streams.len();
            let ks: Vec<usize> = if sp.publishers >= n {
                vec![p % n]
            } else {
                (0..n).filter(|k| k % sp.publishers == p).collect()
            };
            let mine: Vec<(usize, String)> = ks
                .into_iter()
                .map(|k| (r.stream_base + k, r.streams[k].clone()))
                .collect();
            r.publishers.push(tokio::spawn(engine::publisher(
                ctx.clone(),
                w,
                mine,
                sp.rate,
            )));
            w += 1;
        }
    }

    if let Some(p) = publishing {
        let _ = p.send(());
    }

    // The run: progress, the storm, then stop publishing.
    let bar = duration_bar(plan.duration, tool);
    let run_start = Instant::now();
    let run_end = run_start + plan.duration;
    let storm_time = storm_at.map(|f| run_start + plan.duration.mul_f64(f));
    let mut stormed = false;
    while Instant::now() < run_end {
        tokio::time::sleep(Duration::from_millis(250).min(run_end - Instant::now())).await;
        if let Some(st) = storm_time
            && !stormed
            && Instant::now() >= st
        {
            stormed = true;
            let _ = storm_tx.send(1);
        }
        bar.set_position(run_start.elapsed().as_secs());
        bar.set_message(format!(
            "published {} delivered {}",
            ctx.published.load(Ordering::Relaxed),
            ctx.delivered.load(Ordering::Relaxed)
        ));
    }
    let _ = stop_tx.send(true);
    let measured = run_start.elapsed();
    bar.finish_and_clear();
    crate::common::bars().remove(&bar);

    // Publishers' results, then each stream's final head.
    let mut pub_stats: Vec<Vec<TaskStats>> = Vec::new();
    let mut acked_max: HashMap<usize, u64> = HashMap::new();
    for r in &mut runs {
        let mut v = Vec::new();
        if let Some(prep) = &mut r.webhook {
            v.push(std::mem::take(&mut prep.stats));
        }
        for h in r.publishers.drain(..) {
            if let Ok(s) = h.await {
                for (idx, _, _, seq) in &s.acked {
                    let m = acked_max.entry(*idx).or_default();
                    *m = (*m).max(*seq);
                }
                v.push(s);
            }
        }
        pub_stats.push(v);
    }
    let drain_deadline = Instant::now() + drain;
    for (idx, s) in all_streams.iter().enumerate() {
        let mut head = acked_max.get(&idx).copied().unwrap_or(0);
        // The log may hold events whose 201 never arrived (a timed-out or cut request).
        for _ in 0..20 {
            match http.stream_info(s).await {
                Ok(info) => {
                    head = head.max(info.head_seq);
                    break;
                }
                Err(e) if e.status() == Some(404) => break,
                Err(_) if Instant::now() < drain_deadline => {
                    tokio::time::sleep(Duration::from_millis(250)).await
                }
                Err(_) => break,
            }
        }
        // `send_replace` also stores the value when no client listens (publish-only streams).
        head_txs[idx].send_replace(Some(head));
    }

    // Clients finish once they hold every seq, or at the drain deadline.
    let mut client_stats: Vec<Vec<TaskStats>> = Vec::new();
    for r in &mut runs {
        let mut v = Vec::new();
        for (idx, mut h) in r.tasks.drain(..) {
            let left = drain_deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, &mut h).await {
                Ok(Ok(s)) => v.push(s),
                _ => {
                    // Still waiting for events that never came: its count is lost, and it is
                    // charged every event of its own stream.
                    h.abort();
                    v.push(cut_off(idx));
                }
            }
        }
        client_stats.push(v);
    }
    let heads: Vec<u64> = head_txs.iter().map(|t| t.borrow().unwrap_or(0)).collect();
    let cpu = cpu_seconds().zip(cpu_before).map(|(a, b)| a - b);

    // The log check: every acknowledged payload once, seqs contiguous.
    let mut log_checks: Vec<LogCheck> = Vec::new();
    let mut webhook_checks: Vec<Option<WebhookStats>> = Vec::new();
    for (r, pubs) in runs.iter().zip(&pub_stats) {
        if let Some(prep) = &r.webhook {
            // The webhook scenario's log is the source's stream, checked by message id.
            let (w, log) = match &prep.outcome {
                Ok(t) => webhook::check(&http, webhook_source, &run, t, pubs).await,
                Err(_) => (WebhookStats::default(), LogCheck::default()),
            };
            log_checks.push(log);
            webhook_checks.push(Some(w));
            continue;
        }
        let acked: Vec<&(usize, u32, u64, u64)> =
            pubs.iter().flat_map(|p| p.acked.iter()).collect();
        log_checks.push(check_log(&http, &r.streams, r.stream_base, &acked, &heads).await);
        webhook_checks.push(None);
    }
    let metrics_after = http.metrics_json().await.ok();

    // Assemble.
    let mut scenarios = Vec::new();
    let mut totals = Totals::default();
    for ((((sp, r), pubs), (clients, log)), wh) in plan
        .scenarios
        .iter()
        .zip(&runs)
        .zip(&pub_stats)
        .zip(client_stats.iter().zip(log_checks))
        .zip(webhook_checks)
    {
        let mut sc = assemble(sp, r, pubs, clients, log, &heads, slo);
        if let (Some(prep), Some(w)) = (&r.webhook, wh) {
            match &prep.outcome {
                Ok(_) => {
                    sc.streams = 1;
                    sc.published = w.accepted;
                    sc.webhook = Some(w);
                }
                Err(not_run) => {
                    sc.publishers = 0;
                    sc.not_run = Some(not_run.clone());
                    sc.webhook = Some(WebhookStats {
                        source: webhook_source.to_string(),
                        ..w
                    });
                }
            }
        }
        totals.published += sc.published;
        totals.delivered += sc.delivered;
        totals.missing += sc.missing + sc.log.missing;
        totals.duplicated += sc.duplicated + sc.log.duplicated;
        totals.out_of_order += sc.out_of_order;
        totals.resume_attempts += sc.resume.attempts;
        totals.resume_successes += sc.resume.successes;
        scenarios.push(sc);
    }
    totals.resume_success_rate = rate(totals.resume_successes, totals.resume_attempts, 1.0);
    let secs = measured.as_secs_f64().max(0.001);
    totals.published_per_sec = totals.published as f64 / secs;
    totals.delivered_per_sec = totals.delivered as f64 / secs;
    let server = metrics_delta(metrics_before.as_ref(), metrics_after.as_ref());
    totals.dropped = server
        .get("droppedMessages")
        .and_then(|v| v.as_u64())
        .unwrap_or(0);
    let cores = std::thread::available_parallelism()
        .map(|n| n.get() as u64)
        .unwrap_or(1);
    let wall = Duration::from_millis(now_ms().saturating_sub(started_at_ms))
        .as_secs_f64()
        .max(0.001);
    let cpu_percent = cpu.map(|c| c / wall * 100.0).unwrap_or(0.0);
    let mut report = DrillReport {
        tool: tool.to_string(),
        profile: plan.profile.id().to_string(),
        url: url.to_string(),
        run_id: run,
        started_at_ms,
        finished_at_ms: now_ms(),
        duration_sec: secs,
        scenarios,
        totals,
        server,
        load_generator: LoadGenerator {
            cpu_percent: (cpu_percent * 10.0).round() / 10.0,
            cores,
            verified_events_per_sec: 0.0,
            saturated: cpu_percent > 85.0 * cores as f64,
        },
        capacity: Capacity::default(),
        breaches: Vec::new(),
    };
    // Deliveries this process received and verified (publishes are not deliveries).
    report.load_generator.verified_events_per_sec = report.totals.delivered as f64 / secs;
    report.breaches = slo.judge(&report);
    report.capacity = Capacity {
        connections: plan.clients() as u64,
        connected_at_start,
        server_active_at_start,
        streams: all_streams.len() as u64,
        delivered_per_sec: report.totals.delivered_per_sec,
        published_per_sec: report.totals.published_per_sec,
        slo_met: report.breaches.is_empty(),
    };
    Ok(report)
}

/// The stats of a client cut off at the deadline: it received nothing that counts, on the
/// stream `idx` it followed, and its connection ended unexpectedly.
fn cut_off(idx: usize) -> TaskStats {
    TaskStats {
        unexpected: 1,
        tracker: Some((idx, track::Tracker::default())),
        ..TaskStats::default()
    }
}

fn rate(n: u64, d: u64, empty: f64) -> f64 {
    if d == 0 { empty } else { n as f64 / d as f64 }
}

fn assemble(
    sp: &plan::ScenarioPlan,
    r: &ScenarioRun,
    pubs: &[TaskStats],
    clients: &[TaskStats],
    log: LogCheck,
    heads: &[u64],
    slo: &Slo,
) -> ScenarioReport {
    let id = sp.scenario.id();
    let allowed = slo.allowed_statuses(id);
    let mut statuses: BTreeMap<u16, u64> = BTreeMap::new();
    let mut network_errors = 0;
    let mut attempts = 0;
    let mut publish_latency: Histogram<u64> = new_histogram();
    let mut deliver_latency: Histogram<u64> = new_histogram();
    let mut sc = ScenarioReport {
        scenario: id.to_string(),
        streams: r.streams.len() as u64,
        clients: sp.clients as u64,
        publishers: sp.publishers as u64,
        ..ScenarioReport::default()
    };
    let mut resume_failures: BTreeMap<String, u64> = BTreeMap::new();
    for s in pubs.iter().chain(clients) {
        for (k, v) in &s.statuses {
            *statuses.entry(*k).or_default() += v;
        }
        network_errors += s.network_errors;
        attempts += s.attempts;
        let _ = publish_latency.add(&s.publish_latency_us);
        sc.published += s.acked.len() as u64;
        sc.resume.attempts += s.resume_attempts;
        sc.resume.successes += s.resume_successes;
        for (k, v) in &s.resume_failures {
            *resume_failures.entry(k.clone()).or_default() += v;
        }
        sc.resets += s.resets;
        sc.forced_disconnects += s.forced;
        sc.unexpected_disconnects += s.unexpected;
    }
    for s in clients {
        match &s.tracker {
            Some((idx, t)) => {
                // `idx` is the client's own stream (a client cut off at the deadline too).
                let head = heads.get(*idx).copied().unwrap_or(0);
                let _ = deliver_latency.add(&t.latency_us);
                let missing = t.missing(head);
                sc.delivered += t.distinct;
                sc.expected_deliveries += head;
                sc.missing += missing;
                sc.duplicated += t.duplicated;
                sc.out_of_order += t.out_of_order;
                if missing + t.duplicated + t.out_of_order > 0 {
                    sc.clients_with_loss += 1;
                }
            }
            None => {
                // Every client reports its stream (see `cut_off`); one that did not cannot be
                // verified, so it is charged the longest stream of its scenario.
                let head = (r.stream_base..r.stream_base + r.streams.len())
                    .filter_map(|i| heads.get(i).copied())
                    .max()
                    .unwrap_or(0);
                sc.expected_deliveries += head;
                sc.missing += head;
                sc.clients_with_loss += 1;
            }
        }
    }
    let requests: u64 = statuses.values().sum();
    let e5 = statuses
        .iter()
        .filter(|(k, _)| **k >= 500)
        .map(|(_, v)| v)
        .sum::<u64>();
    let unknown = statuses
        .iter()
        .filter(|(k, _)| !allowed.contains(k))
        .map(|(_, v)| v)
        .sum::<u64>();
    sc.http = HttpStats {
        requests,
        statuses: statuses.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        allowed_statuses: allowed,
        error_5xx_rate: rate(e5, requests, 0.0),
        unknown_status_rate: rate(unknown, requests, 0.0),
    };
    sc.network_errors = network_errors;
    sc.network_error_rate = rate(network_errors, attempts.max(requests + network_errors), 0.0);
    sc.publish_latency_ms = Percentiles::from_us(&publish_latency);
    sc.latency_ms = if matches!(sp.scenario, Scenario::Publish | Scenario::Webhook) {
        sc.publish_latency_ms.clone()
    } else {
        Percentiles::from_us(&deliver_latency)
    };
    sc.resume.expected = !matches!(sp.behaviour, Behaviour::Steady) && sp.clients > 0;
    sc.resume.success_rate = rate(sc.resume.successes, sc.resume.attempts, 1.0);
    sc.resume.failures = resume_failures;
    sc.log = log;
    sc
}

/// Reads each stream back and checks it against what publishers were told (201).
async fn check_log(
    http: &HttpClient,
    streams: &[String],
    base: usize,
    acked: &[&(usize, u32, u64, u64)],
    heads: &[u64],
) -> LogCheck {
    let mut lc = LogCheck {
        streams: streams.len() as u64,
        ..LogCheck::default()
    };
    for (k, s) in streams.iter().enumerate() {
        let idx = base + k;
        let mut seen: HashMap<(u32, u64), u64> = HashMap::new();
        let mut after = 0u64;
        let mut expect = 1u64;
        let head = heads.get(idx).copied().unwrap_or(0);
        let mut pages = 0;
        let mut trimmed_below = 0u64;
        while after < head && pages < 10_000 {
            pages += 1;
            let page = match http.read_events(s, after, 1000, None).await {
                Ok(p) => p,
                Err(e) if e.code() == Some("REPLAY_WINDOW_TRIMMED") => {
                    // Retention trimmed the oldest events (a publish-only stream has no
                    // subscriber whose cursor they could be lost to): check from the first
                    // retained one.
                    let first = match &e {
                        zerodrop_client::ClientError::Http { error, .. } => {
                            error.first_available_seq
                        }
                        _ => None,
                    };
                    match first {
                        Some(f) if f > after + 1 => {
                            lc.trimmed += f - 1 - after;
                            trimmed_below = f;
                            after = f - 1;
                            expect = f;
                            continue;
                        }
                        _ => break,
                    }
                }
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    if pages > 20 {
                        break;
                    }
                    continue;
                }
            };
            if page.events.is_empty() {
                break;
            }
            for e in &page.events {
                if e.seq != expect {
                    lc.seq_holes += 1;
                }
                expect = e.seq + 1;
                after = e.seq;
                lc.events += 1;
                if let Ok(p) = serde_json::from_str::<track::Payload>(e.data.get()) {
                    *seen.entry((p.w, p.c)).or_default() += 1;
                }
            }
        }
        lc.duplicated += seen
            .values()
            .filter(|n| **n > 1)
            .map(|n| n - 1)
            .sum::<u64>();
        lc.missing += acked
            .iter()
            .filter(|(i, w, c, seq)| {
                *i == idx && *seq >= trimmed_below && !seen.contains_key(&(*w, *c))
            })
            .count() as u64;
    }
    lc
}

/// Open WebSocket + SSE connections in a `GET /metrics?format=json` document.
fn server_active(m: &serde_json::Value) -> Option<u64> {
    let ws = m.pointer("/ws_metrics/ws_active")?.as_u64()?;
    let sse = m.pointer("/ws_metrics/sse_active")?.as_u64()?;
    Some(ws + sse)
}

/// Differences of the counters of `GET /metrics?format=json` over the run.
fn metrics_delta(
    before: Option<&serde_json::Value>,
    after: Option<&serde_json::Value>,
) -> serde_json::Value {
    let (Some(b), Some(a)) = (before, after) else {
        return serde_json::json!({"available": false});
    };
    if a.pointer("/ws_metrics/dropped_messages").is_none() {
        // Not the SPEC §6 shape: say so rather than report a silent zero.
        return serde_json::json!({"available": false});
    }
    let d = |path: &[&str]| -> u64 {
        let get = |v: &serde_json::Value| {
            path.iter()
                .try_fold(v, |v, k| v.get(k))
                .and_then(|v| v.as_u64())
                .unwrap_or(0)
        };
        get(a).saturating_sub(get(b))
    };
    serde_json::json!({
        "available": true,
        "droppedMessages": d(&["ws_metrics", "dropped_messages"]),
        "wsReconnects": d(&["ws_metrics", "ws_reconnects"]),
        "wsResumes": d(&["ws_metrics", "ws_resumes"]),
        "resumeFailures": d(&["ws_metrics", "resume_failures"]),
        "bufferTrims": d(&["resume_store_metrics", "buffer_trims"]),
        "rttP95Ms": a.pointer("/ws_metrics/rtt_p95_ms").cloned().unwrap_or(serde_json::Value::Null),
        "resumeSuccessRate": a.pointer("/resume_store_metrics/resume_success_rate").cloned().unwrap_or(serde_json::Value::Null),
    })
}

/// CPU seconds (user + system) this process has used, from /proc/self/stat.
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| (utime + stime) / hz as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_is_readable() {
        let a = cpu_seconds().unwrap();
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_add(i * i);
        }
        assert!(x > 0);
        assert!(cpu_seconds().unwrap() >= a);
    }

    fn load(profile: Profile, minutes: Option<f64>, limit: Option<usize>) -> LoadArgs {
        LoadArgs {
            profile,
            scenarios: Vec::new(),
            minutes,
            duration: None,
            limit,
            rate: None,
            publishers: None,
            payload_bytes: 100,
            drain_sec: 10.0,
            token_pool_file: None,
            slo: None,
            webhook_source: "drill".into(),
        }
    }

    #[test]
    fn standard_needs_minutes_and_limit() {
        for (m, l, missing) in [
            (None, None, "missing: --minutes and --limit"),
            (Some(5.0), None, "missing: --limit"),
            (None, Some(800), "missing: --minutes"),
        ] {
            let e = load(Profile::Standard, m, l)
                .plan()
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("--profile standard needs --minutes M and --limit L"),
                "{e}"
            );
            assert!(e.ends_with(missing), "{e}");
        }
        let p = load(Profile::Standard, Some(5.0), Some(800))
            .plan()
            .unwrap();
        assert_eq!(p.duration, Duration::from_secs(300));
        assert!((790..=810).contains(&p.clients()), "{}", p.clients());
        // The other profiles have defaults of their own.
        assert!(load(Profile::Soak, None, None).plan().is_ok());
    }

    #[test]
    fn a_client_cut_off_at_the_deadline_is_charged_its_own_stream() {
        let sp = plan::plan(
            Profile::Quick,
            &PlanOverrides {
                scenarios: vec![Scenario::WsFanout],
                ..Default::default()
            },
        )
        .scenarios
        .remove(0);
        let r = ScenarioRun {
            streams: vec!["a".into(), "b".into()],
            stream_base: 3,
            tasks: Vec::new(),
            publishers: Vec::new(),
            webhook: None,
        };
        // Stream 3 (the scenario's first) has 10 events, stream 4 has 70.
        let heads = [0, 0, 0, 10, 70];
        let sc = assemble(
            &sp,
            &r,
            &[],
            &[cut_off(4)],
            LogCheck::default(),
            &heads,
            &Slo::parse(crate::slo::SHIPPED).unwrap(),
        );
        assert_eq!(sc.missing, 70);
        assert_eq!(sc.expected_deliveries, 70);
        assert_eq!(sc.clients_with_loss, 1);
        assert_eq!(sc.unexpected_disconnects, 1);
    }

    #[test]
    fn metric_deltas() {
        let b = serde_json::json!({"ws_metrics":{"dropped_messages":2}});
        let a = serde_json::json!({"ws_metrics":{"dropped_messages":5}});
        let d = metrics_delta(Some(&b), Some(&a));
        assert_eq!(d["droppedMessages"], 3);
        assert_eq!(metrics_delta(None, Some(&a))["available"], false);
        let m = serde_json::json!({"ws_metrics":{"ws_active":7,"sse_active":3}});
        assert_eq!(server_active(&m), Some(10));
        assert_eq!(server_active(&a), None);
    }
}
