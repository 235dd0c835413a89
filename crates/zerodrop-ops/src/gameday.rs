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
//! Each fault ends in one [`Outcome`]: `held`, `not_held` (events lost, duplicated or
//! reordered, the instance not ready again, nothing published, or the fault could not be
//! injected — a drain that was refused or never drained included) or `skipped` (the fault
//! does not exist on this store). A skipped fault is never counted as held; the game day
//! passes when at least one fault ran and every fault that ran held.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, ValueEnum};
use serde::Serialize;
use zerodrop_client::HttpClient;

use crate::common::{OutArgs, TargetArgs, write_report};
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
    /// The fault does not exist on this store; nothing was tested.
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
    /// Profiles to run, each once per fault.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "burst,soak")]
    pub profiles: Vec<Profile>,
    /// Faults to inject [default: all].
    #[arg(long, value_enum, value_delimiter = ',')]
    pub faults: Vec<Fault>,
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

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FaultResult {
    pub profile: String,
    pub fault: Fault,
    pub outcome: Outcome,
    /// Why the fault was skipped (not injectable on this store).
    pub skipped: Option<String>,
    /// Whether the fault was injected as intended.
    pub injected: bool,
    /// Why injecting the fault failed (the fault then counts as not held).
    pub injection_error: Option<String>,
    pub injected_at_sec: f64,
    /// From the fault until the instance answered /health/ready again.
    pub recovery_sec: f64,
    /// `null` when the fault was skipped: nothing was tested, so nothing held.
    pub zero_drop_held: Option<bool>,
    pub resume_success_rate: f64,
    pub lost: u64,
    pub duplicated: u64,
    pub out_of_order: u64,
    pub notes: Vec<String>,
    pub drill: Option<DrillReport>,
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
    pub faults: Vec<FaultResult>,
}

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

/// Injects `fault` into `inst` (replacing it when it restarts); returns notes.
async fn inject(
    fault: Fault,
    inst: &mut Instance,
    proxy: &Proxy,
    secrets: &Secrets,
    redis: Option<&mut RedisProcess>,
) -> anyhow::Result<Vec<String>> {
    let mut notes = Vec::new();
    match fault {
        Fault::Restart | Fault::Drain | Fault::Kill9 => {
            if fault == Fault::Drain {
                let http = HttpClient::new(&inst.url(), None)?;
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
    }
}

pub async fn run(args: GamedayArgs) -> anyhow::Result<ExitCode> {
    let bin = match &args.server_bin {
        Some(b) => b.clone(),
        None => std::env::current_exe().context("locating the zerodrop executable")?,
    };
    let slo = Slo::load(args.slo.as_deref())?;
    let faults: Vec<Fault> = if args.faults.is_empty() {
        Fault::ALL.to_vec()
    } else {
        args.faults.clone()
    };
    // Refuse a profile that cannot run before any instance starts.
    for p in &args.profiles {
        load_args(&args, *p)
            .plan()
            .with_context(|| format!("gameday profile {}", p.id()))?;
    }
    let secrets = Secrets::generate();
    let work = tempfile::tempdir().context("creating a work directory")?;
    let mut results = Vec::new();
    for profile in &args.profiles {
        for fault in &faults {
            let fault = *fault;
            println!("== gameday {} / {}", profile.id(), fault.id());
            if fault == Fault::StoreOutage && args.store != "redis" {
                let why = format!(
                    "store_outage needs --store redis (the {} store is in-process: it has no outage of its own)",
                    args.store
                );
                println!("   skipped (not counted as held): {why}");
                results.push(FaultResult {
                    profile: profile.id().into(),
                    fault,
                    outcome: Outcome::Skipped,
                    skipped: Some(why),
                    injected: false,
                    injection_error: None,
                    injected_at_sec: 0.0,
                    recovery_sec: 0.0,
                    zero_drop_held: None,
                    resume_success_rate: 0.0,
                    lost: 0,
                    duplicated: 0,
                    out_of_order: 0,
                    notes: Vec::new(),
                    drill: None,
                });
                continue;
            }
            let data = work.path().join(format!("{}-{}", profile.id(), fault.id()));
            let mut spec = Spec::new(&bin, &data, &secrets);
            spec.store = args.store.clone();
            let mut redis = None;
            if args.store == "redis" {
                let r = RedisProcess::start(&args.redis_server_bin, &data.join("redis")).await?;
                spec.args.extend(["--redis-url".to_string(), r.url()]);
                redis = Some(r);
            }
            let mut inst = Instance::start(spec).await?;
            let proxy = Proxy::start(inst.addr).await?;
            let load = load_args(&args, *profile);
            let plan = load.plan()?;
            let target = TargetArgs {
                url: proxy.url(),
                creds: secrets.creds(),
            };
            let slo2 = slo.clone();
            let (started_tx, started_rx) = tokio::sync::oneshot::channel();
            let drill = tokio::spawn(async move {
                crate::drill::drive_with(&target, &load, &slo2, "gameday", Some(started_tx)).await
            });
            // The fault strikes at 40 % of the publishing phase.
            let _ = tokio::time::timeout(Duration::from_secs(60), started_rx).await;
            let at = plan.duration.mul_f64(0.4);
            tokio::time::sleep(at).await;
            let t = Instant::now();
            let (notes, injection_error) =
                match inject(fault, &mut inst, &proxy, &secrets, redis.as_mut()).await {
                    Ok(n) => (n, None),
                    Err(e) => (Vec::new(), Some(format!("{e:#}"))),
                };
            let ready = wait_ready(&inst.url(), Duration::from_secs(30)).await;
            let recovery = t.elapsed().as_secs_f64();
            let report = drill.await.context("the drill task failed")??;
            let outcome = outcome(injection_error.is_none(), ready, &report);
            println!("{}", report.summary());
            if let Some(e) = &injection_error {
                println!("   {}: the fault could NOT be injected: {e}", fault.id());
            }
            if !ready {
                println!(
                    "   {}: the instance did not answer /health/ready within 30 s",
                    fault.id()
                );
            }
            println!(
                "   {}: zero-drop {} (recovered in {recovery:.2} s)",
                fault.id(),
                outcome.id()
            );
            let _ = inst.terminate(Duration::from_secs(10)).await;
            results.push(FaultResult {
                profile: profile.id().into(),
                fault,
                outcome,
                skipped: None,
                injected: injection_error.is_none(),
                injection_error,
                injected_at_sec: at.as_secs_f64(),
                recovery_sec: (recovery * 100.0).round() / 100.0,
                zero_drop_held: Some(outcome == Outcome::Held),
                resume_success_rate: report.totals.resume_success_rate,
                lost: report.totals.dropped + report.totals.missing,
                duplicated: report.totals.duplicated,
                out_of_order: report.totals.out_of_order,
                notes,
                drill: Some(report),
            });
        }
    }
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
            _ => String::new(),
        };
        if r.outcome == Outcome::Skipped {
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
    if ran == 0 {
        println!("no fault ran: nothing was tested");
    }
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
