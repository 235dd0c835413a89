//! `zerodrop gameday`: drills against instances this tool starts itself, while it injects
//! faults, and for each fault whether zero-drop held.
//!
//! One drill per (profile, fault): the fault strikes at 40 % of the run, the instance comes
//! back, publishing goes on to the end and every client must then hold every event, once,
//! in order. Clients reach the instance through a loopback proxy, so a restarted instance
//! (new port) is reached at the same address, and a network cut is the proxy dropping every
//! connection.
//!
//! Faults: `restart` (SIGTERM: graceful drain, then a new process on the same data),
//! `drain` (admin drain first, as a zero-drop deploy does, then restart), `kill9` (SIGKILL,
//! then restart: nothing acknowledged may be lost), `network_cut` (every connection cut,
//! new ones refused for a second), `store_outage` (needs `--store redis`: the Redis server
//! stops for a few seconds; skipped, and reported as skipped, with SQLite).
//!
//! With `--store redis` the instances run with presence on the drill's streams
//! (`--presence 'drill:*'`, a leave grace of [`PRESENCE_GRACE_SEC`]), and the `drain` fault
//! also counts the presence joins and leaves appended from the drain's start to the end of the
//! drill, by the drained process and by the one that took its clients over
//! (`presenceEvents`): a hand-off must emit none, so any makes the fault not held.
//!
//! Each fault ends in one [`Outcome`]: `held`, `not_held` (events lost, duplicated or
//! reordered, the instance not ready again, nothing published, the fault could not be
//! injected — a drain that was refused or never drained included — or the fault ran past
//! its own time limit) or `skipped` (the fault does not exist on this store, or the
//! `--max-minutes` budget left no time for it). A skipped fault is never counted as held;
//! the game day passes when at least one fault ran and every fault that ran held.
//!
//! Time is bounded at three levels: every injection has its own timeout
//! ([`Fault::timeout`]), every (profile, fault) its own time limit ([`limit`]), and the whole
//! game day the budget: a fault starts only when its expected length ([`expected`]) fits in
//! what is left ([`admit`]), and one still running when the budget ends is stopped; it and
//! every fault after it are reported as skipped, with the reason.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use zerodrop_client::HttpClient;

use crate::common::{OutArgs, TargetArgs, bars, say, write_report};
use crate::drill::{LoadArgs, Profile, Scenario};
use crate::instance::{Instance, Secrets, Spec};
use crate::proxy::Proxy;
use crate::redis::RedisProcess;
use crate::report::DrillReport;
use crate::slo::Slo;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Fault {
    #[value(name = "restart")]
    Restart,
    #[value(name = "drain")]
    Drain,
    #[value(name = "kill9")]
    Kill9,
    #[value(name = "network_cut")]
    NetworkCut,
    #[value(name = "store_outage")]
    StoreOutage,
}

impl Fault {
    pub const ALL: [Fault; 5] = [
        Fault::Restart,
        Fault::Drain,
        Fault::Kill9,
        Fault::NetworkCut,
        Fault::StoreOutage,
    ];
    pub fn id(self) -> &'static str {
        match self {
            Fault::Restart => "restart",
            Fault::Drain => "drain",
            Fault::Kill9 => "kill9",
            Fault::NetworkCut => "network_cut",
            Fault::StoreOutage => "store_outage",
        }
    }
}

/// What became of one fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Injected, and nothing was lost, duplicated or reordered.
    Held,
    /// Zero-drop broke, the instance did not come back, nothing was measured, or the fault
    /// could not be injected.
    NotHeld,
    /// The fault does not exist on this store, or the budget left no time for it; nothing
    /// was tested.
    Skipped,
}

impl Outcome {
    pub fn id(self) -> &'static str {
        match self {
            Outcome::Held => "held",
            Outcome::NotHeld => "NOT HELD",
            Outcome::Skipped => "skipped",
        }
    }
}

/// The outcome of a fault that ran.
pub fn outcome(injected: bool, ready: bool, report: &DrillReport) -> Outcome {
    if injected && ready && report.totals.published > 0 && report.zero_drop_held() {
        Outcome::Held
    } else {
        Outcome::NotHeld
    }
}

/// Whether a game day passed: at least one fault ran, and every fault that ran held.
pub fn passed(outcomes: &[Outcome]) -> bool {
    outcomes.iter().any(|o| *o != Outcome::Skipped)
        && outcomes
            .iter()
            .all(|o| matches!(o, Outcome::Held | Outcome::Skipped))
}

#[derive(Args, Clone, Debug)]
pub struct GamedayArgs {
    /// Accepted like on every tool, but a game day never talks to the server at this URL: it
    /// starts its own instances on free loopback ports and injects its faults into those.
    #[arg(long)]
    pub url: Option<String>,
    /// Profiles to run, each once per fault.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "burst,soak")]
    pub profiles: Vec<Profile>,
    /// Faults to inject [default: all].
    #[arg(long, value_enum, value_delimiter = ',')]
    pub faults: Vec<Fault>,
    /// Budget for the whole game day, minutes. A fault starts only when its expected length
    /// fits in what is left; one still running when the budget ends is stopped. Both, and
    /// every fault after them, are reported as skipped with the reason.
    #[arg(long, default_value_t = DEFAULT_MAX_MINUTES)]
    pub max_minutes: f64,
    /// The zerodrop binary to start [default: this executable].
    #[arg(long)]
    pub server_bin: Option<PathBuf>,
    /// Store of the instances: sqlite (default) or redis (a redis-server is started for them).
    #[arg(long, default_value = "sqlite")]
    pub store: String,
    /// The redis-server to start for `--store redis`.
    #[arg(long, default_value = "redis-server")]
    pub redis_server_bin: PathBuf,
    /// Run length per drill in minutes (soak; required with standard).
    #[arg(long)]
    pub minutes: Option<f64>,
    /// Run length per drill in seconds, overriding the profile.
    #[arg(long)]
    pub duration: Option<f64>,
    /// Scenarios (comma-separated) [default: all].
    #[arg(long, value_enum, value_delimiter = ',')]
    pub scenarios: Vec<Scenario>,
    /// Concurrent clients per drill.
    #[arg(long)]
    pub limit: Option<usize>,
    /// How long clients may take to catch up after publishing stops, seconds.
    #[arg(long, default_value_t = 20.0)]
    pub drain_sec: f64,
    #[arg(long)]
    pub slo: Option<PathBuf>,
    #[command(flatten)]
    pub out: OutArgs,
}

/// The default `--max-minutes`: `burst` (every fault) and the first two `soak` faults fit.
pub const DEFAULT_MAX_MINUTES: f64 = 8.0;

/// Why a fault was skipped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SkipKind {
    /// The fault does not exist on this store (`store_outage` without Redis).
    Store,
    /// The `--max-minutes` budget left no time for it, or ran out while it ran.
    Budget,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FaultResult {
    pub profile: String,
    pub fault: Fault,
    pub outcome: Outcome,
    /// Why the fault was skipped (not injectable on this store, or out of budget).
    pub skipped: Option<String>,
    pub skip_kind: Option<SkipKind>,
    /// Whether the fault was injected as intended.
    pub injected: bool,
    /// Why injecting the fault failed (the fault then counts as not held).
    pub injection_error: Option<String>,
    pub injected_at_sec: f64,
    /// From the fault until the instance answered /health/ready again.
    pub recovery_sec: f64,
    /// `null` when the fault was skipped: nothing was tested, so nothing held.
    pub zero_drop_held: Option<bool>,
    /// `drain` with `--store redis`: presence joins and leaves appended from the drain's
    /// start to the end of the drill (0 when every member was handed over); `null` otherwise.
    pub presence_events: Option<u64>,
    pub resume_success_rate: f64,
    pub lost: u64,
    pub duplicated: u64,
    pub out_of_order: u64,
    /// How long the fault was expected to take (what the budget reserved for it).
    pub expected_sec: f64,
    /// The fault's own time limit: past it, it is stopped and counts as not held.
    pub limit_sec: f64,
    /// How long it took (0 when it never started).
    pub elapsed_sec: f64,
    /// It was stopped at its own time limit (not held).
    pub timed_out: bool,
    pub notes: Vec<String>,
    pub drill: Option<DrillReport>,
}

impl FaultResult {
    /// A fault that produced no drill: skipped, or stopped at its time limit.
    fn without_drill(profile: Profile, fault: Fault, outcome: Outcome) -> FaultResult {
        FaultResult {
            profile: profile.id().into(),
            fault,
            outcome,
            skipped: None,
            skip_kind: None,
            injected: false,
            injection_error: None,
            injected_at_sec: 0.0,
            recovery_sec: 0.0,
            zero_drop_held: (outcome != Outcome::Skipped).then_some(outcome == Outcome::Held),
            presence_events: None,
            resume_success_rate: 0.0,
            lost: 0,
            duplicated: 0,
            out_of_order: 0,
            expected_sec: 0.0,
            limit_sec: 0.0,
            elapsed_sec: 0.0,
            timed_out: false,
            notes: Vec::new(),
            drill: None,
        }
    }

    fn skipped(profile: Profile, fault: Fault, kind: SkipKind, why: String) -> FaultResult {
        FaultResult {
            skipped: Some(why),
            skip_kind: Some(kind),
            ..FaultResult::without_drill(profile, fault, Outcome::Skipped)
        }
    }
}

/// One skipped fault, for the report's `skippedFaults` list.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Skipped {
    pub profile: String,
    pub fault: Fault,
    pub kind: SkipKind,
    pub reason: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GamedayReport {
    pub tool: &'static str,
    pub profile: String,
    pub store: String,
    /// At least one fault ran and every fault that ran held.
    pub passed: bool,
    /// Faults that ran (injected or not), held, and skipped.
    pub ran: usize,
    pub held: usize,
    pub skipped: usize,
    /// `--max-minutes`, in seconds.
    pub budget_sec: f64,
    /// Wall time of the whole game day.
    pub elapsed_sec: f64,
    /// The budget stopped or kept out at least one fault.
    pub budget_exhausted: bool,
    /// Every skipped fault with its reason, in run order.
    pub skipped_faults: Vec<Skipped>,
    pub faults: Vec<FaultResult>,
}

/// The presence leave grace of a game day's instances (`--store redis`): longer than a drain
/// and a restart take, so a hand-off keeps every member.
pub const PRESENCE_GRACE_SEC: u64 = 60;

/// The presence joins and leaves this process appended (`zerodrop_presence_*_total`).
async fn presence_counts(url: &str) -> Option<(u64, u64)> {
    let http = HttpClient::with_timeout(url, None, Duration::from_secs(5)).ok()?;
    let answer = http.get_answer("/metrics", None).await.ok()?;
    let text = answer.body.as_str()?;
    let count = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
            .unwrap_or(0.0) as u64
    };
    Some((
        count("zerodrop_presence_joins_total "),
        count("zerodrop_presence_leaves_total "),
    ))
}

/// Their sum.
async fn presence_changes(url: &str) -> Option<u64> {
    presence_counts(url).await.map(|(j, l)| j + l)
}

/// How long the instance may take to answer /health/ready after a fault.
const READY_WITHIN: Duration = Duration::from_secs(30);

async fn wait_ready(url: &str, within: Duration) -> bool {
    let Ok(http) = HttpClient::with_timeout(url, None, Duration::from_secs(2)) else {
        return false;
    };
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Ok(a) = http.get_answer("/health/ready", None).await
            && a.status == 200
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// How long a `drain` fault waits for the instance to report `drained`.
const DRAIN_WITHIN: Duration = Duration::from_secs(10);

/// What a fault costs besides its drill's publishing phase, typically: the instance
/// starting, the clients connecting, the log check and the instance stopping.
const SETUP: Duration = Duration::from_secs(10);

/// Room a fault's time limit leaves beyond its drill, injection and recovery: the instance
/// start (30 s at most), the clients' connect phase (30 s) and the log check.
const LIMIT_SLACK: Duration = Duration::from_secs(90);

impl Fault {
    /// What injecting the fault typically adds to a drill.
    pub fn expected_extra(self) -> Duration {
        Duration::from_secs(match self {
            Fault::Restart => 5,
            Fault::Drain => 6,
            Fault::Kill9 => 3,
            Fault::NetworkCut => 2,
            Fault::StoreOutage => 5,
        })
    }

    /// The longest injecting the fault may take: past it the fault was not injected. A
    /// restart has 15 s to exit after SIGTERM and 30 s to come back; a drain 10 s for
    /// `drain/start`, 10 s to reach `drained`, then a restart's 45 s; a kill -9 10 s to reap
    /// and 30 s to come back; a network cut lasts 1 s; a Redis outage 10 s to stop, 3 s down
    /// and 10 s to answer PING again.
    pub fn timeout(self) -> Duration {
        Duration::from_secs(match self {
            Fault::Restart => 50,
            Fault::Drain => 70,
            Fault::Kill9 => 45,
            Fault::NetworkCut => 10,
            Fault::StoreOutage => 30,
        })
    }
}

/// How long one (profile, fault) is expected to take with a `publishing`-long drill.
pub fn expected(publishing: Duration, fault: Fault) -> Duration {
    publishing + SETUP + fault.expected_extra()
}

/// The time limit of one (profile, fault): its drill (publishing and catch-up), the
/// injection's own timeout, the recovery wait and a slack of 90 s (`LIMIT_SLACK`).
pub fn limit(publishing: Duration, drain: Duration, fault: Fault) -> Duration {
    publishing + drain + fault.timeout() + READY_WITHIN + LIMIT_SLACK
}

/// Whether a fault expected to take `need` may start with `elapsed` of `budget` spent;
/// `Err` says why not.
pub fn admit(budget: Duration, elapsed: Duration, need: Duration) -> Result<(), String> {
    let left = budget.saturating_sub(elapsed);
    if need <= left {
        Ok(())
    } else {
        Err(format!(
            "not started: {:.0} s of the {:.0} s budget (--max-minutes) left, and it takes about {:.0} s",
            left.as_secs_f64(),
            budget.as_secs_f64(),
            need.as_secs_f64()
        ))
    }
}

/// Injects `fault` into `inst` (replacing it when it restarts); returns notes.
/// Injects `fault`. With presence counted (`presence`: the drained process's count when the
/// drain started), the drained process's presence joins and leaves since are added to it.
async fn inject(
    fault: Fault,
    inst: &mut Instance,
    proxy: &Proxy,
    secrets: &Secrets,
    redis: Option<&mut RedisProcess>,
    presence: &mut Option<u64>,
) -> anyhow::Result<Vec<String>> {
    let mut notes = Vec::new();
    match fault {
        Fault::Restart | Fault::Drain | Fault::Kill9 => {
            if fault == Fault::Drain {
                if presence.is_some() {
                    let counts = presence_counts(&inst.url()).await;
                    *presence = counts.map(|(j, l)| j + l);
                    notes.push(format!(
                        "presence joins before the drain: {}",
                        counts.map_or("unknown".into(), |c| c.0.to_string())
                    ));
                }
                let http = HttpClient::with_timeout(&inst.url(), None, Duration::from_secs(10))?;
                let a = http
                    .post_answer(
                        "/admin/drain/start",
                        Some(&secrets.admin_token),
                        &serde_json::json!({"reason": "gameday", "max_session_age_seconds": 1}),
                    )
                    .await
                    .context("POST /admin/drain/start")?;
                notes.push(format!("drain/start answered {}", a.status));
                anyhow::ensure!(
                    a.status == 200,
                    "POST /admin/drain/start answered {} (expected 200): {}",
                    a.status,
                    a.body
                );
                let deadline = Instant::now() + DRAIN_WITHIN;
                let mut last_state = String::from("(no answer)");
                let mut drained = false;
                while Instant::now() < deadline {
                    if let Ok(s) = http
                        .get_answer("/admin/drain/status", Some(&secrets.admin_token))
                        .await
                    {
                        last_state = s
                            .body
                            .get("state")
                            .and_then(|v| v.as_str())
                            .map(str::to_string)
                            .unwrap_or_else(|| format!("HTTP {}", s.status));
                        if last_state == "drained" {
                            drained = true;
                            break;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                anyhow::ensure!(
                    drained,
                    "the instance did not reach `drained` within {} s (last state: {last_state})",
                    DRAIN_WITHIN.as_secs()
                );
                notes.push("drained".into());
                // What the drained process appended since the drain started.
                if let Some(before) = *presence {
                    let after = presence_changes(&inst.url())
                        .await
                        .context("the drained instance's presence counters")?;
                    *presence = Some(after.saturating_sub(before));
                }
            }
            if fault == Fault::Kill9 {
                inst.kill9().await?;
            } else {
                let code = inst.terminate(Duration::from_secs(15)).await?;
                notes.push(format!("exit code after SIGTERM: {code:?}"));
            }
            let next = inst.restart().await.context("restarting the instance")?;
            proxy.set_upstream(next.addr);
            *inst = next;
        }
        Fault::NetworkCut => proxy.partition(Duration::from_secs(1)).await,
        Fault::StoreOutage => match redis {
            Some(r) => {
                r.outage(Duration::from_secs(3)).await?;
                notes.push(format!("redis-server on port {} was down for 3 s", r.port));
            }
            None => anyhow::bail!("store_outage needs --store redis"),
        },
    }
    Ok(notes)
}

fn load_args(args: &GamedayArgs, profile: Profile) -> LoadArgs {
    LoadArgs {
        profile,
        scenarios: args.scenarios.clone(),
        minutes: args.minutes,
        duration: args.duration,
        limit: args.limit,
        rate: None,
        publishers: None,
        payload_bytes: 100,
        drain_sec: args.drain_sec,
        token_pool_file: None,
        slo: args.slo.clone(),
        webhook_source: "drill".into(),
    }
}

/// What every fault of one game day shares.
struct Run<'a> {
    args: &'a GamedayArgs,
    bin: &'a Path,
    secrets: &'a Secrets,
    slo: &'a Slo,
    work: &'a Path,
}

/// One drill on a fresh instance with `fault` striking at 40 % of its publishing phase.
/// Everything it starts (instance, proxy, redis-server, the drill's own work) is stopped
/// when it returns or is dropped.
async fn run_fault(
    r: &Run<'_>,
    profile: Profile,
    fault: Fault,
    expected_sec: f64,
    limit_sec: f64,
) -> anyhow::Result<FaultResult> {
    let started = Instant::now();
    let data = r.work.join(format!("{}-{}", profile.id(), fault.id()));
    let mut spec = Spec::new(r.bin, &data, r.secrets);
    spec.store = r.args.store.clone();
    // The source the drill's `webhook` scenario posts to, so it runs through every fault.
    spec.env.push((
        "ZERODROP_WEBHOOK_DRILL_STREAM".into(),
        "drill:webhooks".into(),
    ));
    let mut redis = None;
    if r.args.store == "redis" {
        let p = RedisProcess::start(&r.args.redis_server_bin, &data.join("redis")).await?;
        spec.args.extend(["--redis-url".to_string(), p.url()]);
        spec.args.extend([
            "--presence".to_string(),
            "drill:*".to_string(),
            "--presence-leave-grace-sec".to_string(),
            PRESENCE_GRACE_SEC.to_string(),
        ]);
        redis = Some(p);
    }
    // `drain` on Redis counts presence events over the hand-off.
    let mut presence = (fault == Fault::Drain && redis.is_some()).then_some(0);
    let mut inst = Instance::start(spec).await?;
    let proxy = Proxy::start(inst.addr).await?;
    let load = load_args(r.args, profile);
    let plan = load.plan()?;
    let target = TargetArgs {
        url: proxy.url(),
        creds: r.secrets.creds(),
    };
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    // The drill and the fault run side by side in this one future, so that stopping it
    // (the fault's time limit, the budget) stops both.
    let drill = crate::drill::drive_with(&target, &load, r.slo, "gameday", Some(started_tx));
    let at = plan.duration.mul_f64(0.4);
    let strike = async {
        let _ = tokio::time::timeout(Duration::from_secs(60), started_rx).await;
        tokio::time::sleep(at).await;
        let t = Instant::now();
        let injected = match tokio::time::timeout(
            fault.timeout(),
            inject(
                fault,
                &mut inst,
                &proxy,
                r.secrets,
                redis.as_mut(),
                &mut presence,
            ),
        )
        .await
        {
            Ok(Ok(n)) => (n, None),
            Ok(Err(e)) => (Vec::new(), Some(format!("{e:#}"))),
            Err(_) => (
                Vec::new(),
                Some(format!(
                    "{} did not complete within its {} s timeout",
                    fault.id(),
                    fault.timeout().as_secs()
                )),
            ),
        };
        let ready = wait_ready(&inst.url(), READY_WITHIN).await;
        (injected, ready, t.elapsed().as_secs_f64())
    };
    let (report, ((notes, injection_error), ready, recovery)) = tokio::join!(drill, strike);
    let report = report.context("the drill failed")?;
    // The process that took the clients over appended these (all of its life).
    let presence_events = match presence {
        Some(old) if injection_error.is_none() => {
            presence_changes(&inst.url()).await.map(|new| old + new)
        }
        _ => None,
    };
    let mut outcome = outcome(injection_error.is_none(), ready, &report);
    if let Some(n) = presence_events {
        say(format!(
            "   {}: presence events during the hand-off: {n}",
            fault.id()
        ));
        if n > 0 {
            outcome = Outcome::NotHeld;
        }
    }
    say(report.summary());
    if let Some(e) = &injection_error {
        say(format!(
            "   {}: the fault could NOT be injected: {e}",
            fault.id()
        ));
    }
    if !ready {
        say(format!(
            "   {}: the instance did not answer /health/ready within {} s",
            fault.id(),
            READY_WITHIN.as_secs()
        ));
    }
    say(format!(
        "   {}: zero-drop {} (recovered in {recovery:.2} s)",
        fault.id(),
        outcome.id()
    ));
    let _ = inst.terminate(Duration::from_secs(10)).await;
    Ok(FaultResult {
        profile: profile.id().into(),
        fault,
        outcome,
        skipped: None,
        skip_kind: None,
        injected: injection_error.is_none(),
        injection_error,
        injected_at_sec: at.as_secs_f64(),
        recovery_sec: round2(recovery),
        zero_drop_held: Some(outcome == Outcome::Held),
        presence_events,
        resume_success_rate: report.totals.resume_success_rate,
        lost: report.totals.dropped + report.totals.missing,
        duplicated: report.totals.duplicated,
        out_of_order: report.totals.out_of_order,
        expected_sec,
        limit_sec,
        elapsed_sec: round2(started.elapsed().as_secs_f64()),
        timed_out: false,
        notes,
        drill: Some(report),
    })
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// The overall bar: faults done of all planned, time spent, the budget and what runs now.
fn overall_bar(total: usize) -> ProgressBar {
    let bar = bars().add(ProgressBar::new(total as u64));
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix:>10} [{bar:30}] {pos}/{len} faults, {elapsed} spent {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_prefix("gameday");
    bar.enable_steady_tick(Duration::from_millis(500));
    bar
}

pub async fn run(args: GamedayArgs) -> anyhow::Result<ExitCode> {
    let clock = Instant::now();
    let bin = match &args.server_bin {
        Some(b) => b.clone(),
        None => std::env::current_exe().context("locating the zerodrop executable")?,
    };
    anyhow::ensure!(
        args.max_minutes.is_finite() && args.max_minutes > 0.0,
        "--max-minutes is the game day's budget in minutes (> 0)"
    );
    let budget = Duration::from_secs_f64(args.max_minutes * 60.0);
    let slo = Slo::load(args.slo.as_deref())?;
    let faults: Vec<Fault> = if args.faults.is_empty() {
        Fault::ALL.to_vec()
    } else {
        args.faults.clone()
    };
    // Refuse a profile that cannot run before any instance starts.
    let mut plans = Vec::new();
    for p in &args.profiles {
        let plan = load_args(&args, *p)
            .plan()
            .with_context(|| format!("gameday profile {}", p.id()))?;
        plans.push((*p, plan.duration));
    }
    if let Some(u) = &args.url {
        say(format!(
            "note: --url {u} is not used: a game day starts its own instances and never touches a running server"
        ));
    }
    let drain = Duration::from_secs_f64(args.drain_sec.max(1.0));
    let secrets = Secrets::generate();
    let work = tempfile::tempdir().context("creating a work directory")?;
    let r = Run {
        args: &args,
        bin: &bin,
        secrets: &secrets,
        slo: &slo,
        work: work.path(),
    };
    let bar = overall_bar(plans.len() * faults.len());
    let mut results = Vec::new();
    // Set once the budget stops or keeps out a fault: every later fault is skipped too.
    let mut out_of_budget: Option<String> = None;
    for (profile, publishing) in &plans {
        let profile = *profile;
        for fault in &faults {
            let fault = *fault;
            let name = format!("{}/{}", profile.id(), fault.id());
            bar.set_message(format!(
                "of {:.0} min budget · {name}",
                budget.as_secs_f64() / 60.0
            ));
            say(format!("== gameday {} / {}", profile.id(), fault.id()));
            let result = if fault == Fault::StoreOutage && args.store != "redis" {
                let why = format!(
                    "store_outage needs --store redis (the {} store is in-process: it has no outage of its own)",
                    args.store
                );
                FaultResult::skipped(profile, fault, SkipKind::Store, why)
            } else if let Some(first) = &out_of_budget {
                let why = format!("not started: the budget (--max-minutes) ran out at {first}");
                FaultResult::skipped(profile, fault, SkipKind::Budget, why)
            } else {
                let need = expected(*publishing, fault);
                let own = limit(*publishing, drain, fault);
                match admit(budget, clock.elapsed(), need) {
                    Err(why) => {
                        out_of_budget = Some(name.clone());
                        FaultResult::skipped(profile, fault, SkipKind::Budget, why)
                    }
                    Ok(()) => {
                        let t = Instant::now();
                        let budget_end = clock + budget;
                        let by_budget = budget_end <= t + own;
                        let stop = if by_budget { budget_end } else { t + own };
                        let f =
                            run_fault(&r, profile, fault, need.as_secs_f64(), own.as_secs_f64());
                        match tokio::time::timeout_at(stop.into(), f).await {
                            Ok(res) => res?,
                            Err(_) if by_budget => {
                                out_of_budget = Some(name.clone());
                                let why = format!(
                                    "stopped when the budget (--max-minutes {}) ran out, {:.1} s into the fault, before its drill finished: not judged",
                                    args.max_minutes,
                                    t.elapsed().as_secs_f64()
                                );
                                let mut s =
                                    FaultResult::skipped(profile, fault, SkipKind::Budget, why);
                                s.expected_sec = need.as_secs_f64();
                                s.limit_sec = own.as_secs_f64();
                                s.elapsed_sec = round2(t.elapsed().as_secs_f64());
                                s
                            }
                            Err(_) => {
                                let why = format!(
                                    "stopped at its time limit of {:.0} s: the drill, the injection or the recovery hung",
                                    own.as_secs_f64()
                                );
                                say(format!("   {}: zero-drop NOT HELD ({why})", fault.id()));
                                let mut s =
                                    FaultResult::without_drill(profile, fault, Outcome::NotHeld);
                                s.timed_out = true;
                                s.expected_sec = need.as_secs_f64();
                                s.limit_sec = own.as_secs_f64();
                                s.elapsed_sec = round2(t.elapsed().as_secs_f64());
                                s.notes.push(why);
                                s
                            }
                        }
                    }
                }
            };
            if let Some(why) = &result.skipped {
                say(format!("   skipped (not counted as held): {why}"));
            }
            results.push(result);
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    bars().remove(&bar);
    let outcomes: Vec<Outcome> = results.iter().map(|r| r.outcome).collect();
    let passed = passed(&outcomes);
    println!(
        "{:<10} {:<14} {:>9} {:>8} {:>6} {:>5} {:>9}",
        "profile", "fault", "zero-drop", "resume", "lost", "dup", "recovery"
    );
    for r in &results {
        let note = match (&r.skipped, &r.injection_error) {
            (Some(s), _) => format!("  ({s})"),
            (None, Some(e)) => format!("  (injection failed: {e})"),
            _ if r.timed_out => format!("  ({})", r.notes.join("; ")),
            _ => String::new(),
        };
        if r.outcome == Outcome::Skipped || r.timed_out {
            println!(
                "{:<10} {:<14} {:>9} {:>8} {:>6} {:>5} {:>9}{note}",
                r.profile,
                r.fault.id(),
                r.outcome.id(),
                "-",
                "-",
                "-",
                "-"
            );
        } else {
            println!(
                "{:<10} {:<14} {:>9} {:>7.1}% {:>6} {:>5} {:>8.2}s{note}",
                r.profile,
                r.fault.id(),
                r.outcome.id(),
                r.resume_success_rate * 100.0,
                r.lost,
                r.duplicated,
                r.recovery_sec
            );
        }
    }
    let ran = outcomes.iter().filter(|o| **o != Outcome::Skipped).count();
    let skipped = outcomes.len() - ran;
    let held = outcomes.iter().filter(|o| **o == Outcome::Held).count();
    println!("{ran} fault(s) ran, {held} held; {skipped} skipped (not counted as held)");
    let skipped_faults: Vec<Skipped> = results
        .iter()
        .filter_map(|r| {
            Some(Skipped {
                profile: r.profile.clone(),
                fault: r.fault,
                kind: r.skip_kind?,
                reason: r.skipped.clone()?,
            })
        })
        .collect();
    for s in &skipped_faults {
        println!("skipped {}/{}: {}", s.profile, s.fault.id(), s.reason);
    }
    if ran == 0 {
        println!("no fault ran: nothing was tested");
    }
    let elapsed = clock.elapsed().as_secs_f64();
    println!(
        "elapsed {:.0} s of the {:.0} s budget (--max-minutes {})",
        elapsed,
        budget.as_secs_f64(),
        args.max_minutes
    );
    let profile = args
        .profiles
        .iter()
        .map(|p| p.id())
        .collect::<Vec<_>>()
        .join("+");
    let report = GamedayReport {
        tool: "gameday",
        profile: profile.clone(),
        store: args.store.clone(),
        passed,
        ran,
        held,
        skipped,
        budget_sec: budget.as_secs_f64(),
        elapsed_sec: round2(elapsed),
        budget_exhausted: out_of_budget.is_some(),
        skipped_faults,
        faults: results,
    };
    let path = write_report(&args.out.dir(), "gameday", Some(&profile), &report)?;
    println!(
        "gameday {}; report: {}",
        if passed { "PASSED" } else { "FAILED" },
        path.display()
    );
    Ok(if passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::tests::sample_report;

    #[test]
    fn a_fault_holds_only_when_injected_ready_published_and_lossless() {
        let good = sample_report();
        assert_eq!(outcome(true, true, &good), Outcome::Held);
        assert_eq!(
            outcome(false, true, &good),
            Outcome::NotHeld,
            "not injected"
        );
        assert_eq!(outcome(true, false, &good), Outcome::NotHeld, "not ready");
        let mut lost = sample_report();
        lost.totals.missing = 1;
        assert_eq!(outcome(true, true, &lost), Outcome::NotHeld);
        let mut empty = sample_report();
        empty.totals.published = 0;
        assert_eq!(outcome(true, true, &empty), Outcome::NotHeld);
    }

    #[test]
    fn standard_game_days_need_minutes_and_limit() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            a: GamedayArgs,
        }
        use clap::Parser;
        let a = Cli::try_parse_from(["x", "--profiles", "standard", "--limit", "100"])
            .unwrap()
            .a;
        let e = load_args(&a, Profile::Standard).plan().unwrap_err();
        assert!(e.to_string().contains("missing: --minutes"), "{e}");
        let a = Cli::try_parse_from([
            "x",
            "--profiles",
            "standard",
            "--limit",
            "100",
            "--minutes",
            "1",
        ])
        .unwrap()
        .a;
        let p = load_args(&a, Profile::Standard).plan().unwrap();
        assert_eq!(p.duration, Duration::from_secs(60));
    }

    #[test]
    fn a_fault_starts_only_when_its_expected_length_fits_the_budget() {
        let s = Duration::from_secs;
        // burst: 30 s of publishing + 10 s around it + the fault's own cost.
        assert_eq!(expected(s(30), Fault::Restart), s(45));
        assert_eq!(expected(s(30), Fault::NetworkCut), s(42));
        assert_eq!(admit(s(480), s(435), s(45)), Ok(()), "exactly fits");
        assert_eq!(
            admit(s(480), s(436), s(45)),
            Err("not started: 44 s of the 480 s budget (--max-minutes) left, and it takes about 45 s".into())
        );
        assert!(admit(s(60), s(90), s(1)).is_err(), "an overspent budget");
        // The own limit covers the drill, the injection's timeout and the recovery wait.
        assert_eq!(limit(s(30), s(20), Fault::Drain), s(30 + 20 + 70 + 30 + 90));
        for f in Fault::ALL {
            assert!(f.timeout() > f.expected_extra(), "{f:?}");
        }
    }

    #[test]
    fn skipped_faults_are_neither_held_nor_failures() {
        use Outcome::*;
        assert!(passed(&[Held, Skipped]));
        assert!(!passed(&[Held, NotHeld, Skipped]));
        assert!(!passed(&[Skipped]), "nothing ran: nothing was tested");
        assert!(!passed(&[]));
        assert_eq!(
            serde_json::to_value(NotHeld).unwrap(),
            serde_json::json!("not_held")
        );
    }
}
