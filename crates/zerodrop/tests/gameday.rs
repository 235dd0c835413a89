//! `zerodrop gameday` starts its own instances of the real binary, injects faults while a
//! drill runs, and reports for each fault whether zero-drop held.

mod support;

use std::path::Path;

use serde_json::Value;
use support::{BIN, ToolRun, args, reports, tool};

/// A short game day (quick profile, 3 s drills of 16 clients) with `faults` and `extra`
/// flags, on instances of the binary under test, writing its report under `work/reports`.
async fn gameday(work: &Path, faults: &str, extra: &[&str]) -> (ToolRun, Value) {
    gameday_of(work, "3", faults, extra).await
}

/// [`gameday`] with `duration` seconds of publishing per drill.
async fn gameday_of(work: &Path, duration: &str, faults: &str, extra: &[&str]) -> (ToolRun, Value) {
    let out = work.join("reports");
    let mut a = args(&[
        "gameday",
        "--profiles",
        "quick",
        "--duration",
        duration,
        "--limit",
        "16",
        "--scenarios",
        "publish,ws_fanout,resume",
        "--faults",
        faults,
        "--out-dir",
        out.to_str().unwrap(),
    ]);
    if !extra.contains(&"--server-bin") {
        a.extend(args(&["--server-bin", BIN]));
    }
    a.extend(args(extra));
    let run = tool(work, &a).await;
    let r = reports(&out, "gameday-quick-");
    assert_eq!(r.len(), 1, "one report: {}", run.stdout);
    let v = serde_json::from_str(&std::fs::read_to_string(&r[0]).unwrap()).unwrap();
    (run, v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_drop_holds_through_restart_drain_kill9_and_a_network_cut() {
    let work = tempfile::tempdir().unwrap();
    let (run, v) = gameday(
        work.path(),
        "restart,drain,kill9,network_cut,store_outage",
        &[],
    )
    .await;
    assert_eq!(run.code, 0, "zero-drop must hold through every fault");
    assert_eq!(v["passed"], true);
    assert_eq!(v["ran"], 4);
    assert_eq!(v["held"], 4);
    assert_eq!(v["skipped"], 1);
    let faults = v["faults"].as_array().unwrap();
    let ids: Vec<&str> = faults
        .iter()
        .map(|f| f["fault"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        ["restart", "drain", "kill9", "network_cut", "store_outage"]
    );
    for f in &faults[..4] {
        assert_eq!(f["outcome"], "held", "{f}");
        assert_eq!(f["injected"], true, "{f}");
        assert_eq!(f["zeroDropHeld"], true, "{f}");
        assert_eq!(f["lost"], 0, "{}", f["fault"]);
        let d = &f["drill"];
        assert!(
            d["totals"]["published"].as_u64().unwrap() > 0,
            "{}",
            f["fault"]
        );
        // The fault really reached the steady ws_fanout clients (they never drop by
        // themselves): they had to resume.
        let fanout = d["scenarios"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["scenario"] == "ws_fanout")
            .unwrap();
        assert!(
            fanout["resume"]["attempts"].as_u64().unwrap() > 0,
            "{}: the fault touched no client: {fanout}",
            f["fault"]
        );
    }
    // SQLite has no store outage of its own: skipped, said so, and never counted as held.
    assert_eq!(faults[4]["outcome"], "skipped", "{}", faults[4]);
    assert!(faults[4]["skipped"].as_str().unwrap().contains("redis"));
    assert_eq!(faults[4]["injected"], false);
    assert!(faults[4]["zeroDropHeld"].is_null(), "{}", faults[4]);
    assert!(faults[4]["drill"].is_null());
    assert!(
        run.stdout
            .contains("4 fault(s) ran, 4 held; 1 skipped (not counted as held)"),
        "{}",
        run.stdout
    );
}

/// With `--store redis` the game day starts its own redis-server and really stops it for a
/// few seconds mid-run: publishes are refused while it is away, and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_store_outage_is_injected_for_real_and_zero_drop_holds() {
    let work = tempfile::tempdir().unwrap();
    let (run, v) = gameday(work.path(), "store_outage", &["--store", "redis"]).await;
    assert_eq!(run.code, 0, "zero-drop must hold through a Redis outage");
    assert_eq!(v["store"], "redis");
    assert_eq!(v["passed"], true);
    assert_eq!(
        (v["ran"].as_u64(), v["skipped"].as_u64()),
        (Some(1), Some(0))
    );
    let f = &v["faults"][0];
    assert_eq!(f["fault"], "store_outage");
    assert_eq!(f["outcome"], "held", "{f}");
    assert_eq!(f["injected"], true, "{f}");
    assert!(f["skipped"].is_null(), "{f}");
    assert_eq!(f["lost"], 0);
    assert!(
        f["notes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n.as_str().unwrap().contains("was down for 3 s")),
        "{f}"
    );
    // The outage took at least as long as Redis was down.
    assert!(f["recoverySec"].as_f64().unwrap() >= 3.0, "{f}");
    // The outage was felt: publishes were refused (503) or failed while Redis was away.
    let publish = f["drill"]["scenarios"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["scenario"] == "publish")
        .unwrap();
    assert!(publish["published"].as_u64().unwrap() > 0);
    let refused = publish["http"]["statuses"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| k.as_str() != "201")
        .map(|(_, n)| n.as_u64().unwrap())
        .sum::<u64>()
        + publish["networkErrors"].as_u64().unwrap();
    assert!(
        refused > 0,
        "the store outage touched no publish: {publish}"
    );
}

/// With `--store redis` a drain hands every presence member over: the game day counts the
/// joins and leaves appended from the drain's start to the end of the drill, and there are
/// none (SPEC §10).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_on_redis_hands_presence_over_with_no_join_or_leave() {
    let work = tempfile::tempdir().unwrap();
    let (run, v) = gameday(work.path(), "drain", &["--store", "redis"]).await;
    assert_eq!(run.code, 0, "{}", run.stdout);
    let f = &v["faults"][0];
    assert_eq!(
        (&f["fault"], &f["outcome"]),
        (&serde_json::json!("drain"), &serde_json::json!("held")),
        "{f}"
    );
    assert_eq!(f["presenceEvents"], 0, "{f}");
    let members = f["notes"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|n| {
            n.as_str()?
                .strip_prefix("presence joins before the drain: ")
        })
        .expect("the members were counted");
    assert!(members.parse::<u64>().unwrap() > 0, "{f}");
    assert!(
        run.stdout
            .contains("presence events during the hand-off: 0"),
        "{}",
        run.stdout
    );
}

/// The in-memory store keeps nothing across a kill -9: every acknowledged event is gone, and
/// the game day must say so (NOT HELD, exit 1), while a store_outage it cannot inject on that
/// store is skipped, not held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fault_that_loses_events_fails_the_game_day() {
    let work = tempfile::tempdir().unwrap();
    let (run, v) = gameday(
        work.path(),
        "kill9,store_outage",
        &["--store", "memory", "--drain-sec", "5"],
    )
    .await;
    assert_eq!(
        run.code, 1,
        "losing events under kill -9 fails the game day"
    );
    assert!(run.stdout.contains("gameday FAILED"), "{}", run.stdout);
    assert!(
        run.stdout.contains("1 fault(s) ran, 0 held; 1 skipped"),
        "{}",
        run.stdout
    );
    assert_eq!(v["passed"], false);
    let kill9 = &v["faults"][0];
    assert_eq!(kill9["fault"], "kill9");
    assert_eq!(kill9["outcome"], "not_held", "{kill9}");
    assert_eq!(kill9["injected"], true, "the fault itself was injected");
    assert_eq!(kill9["zeroDropHeld"], false);
    assert!(kill9["lost"].as_u64().unwrap() > 0, "{kill9}");
    assert_eq!(v["faults"][1]["outcome"], "skipped");
}

/// A fault starts only when its expected length fits in what is left of `--max-minutes`;
/// the first that does not fit, and every fault after it, is skipped and says why, and the
/// game day still ends with a verdict on what ran and a full report.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_that_do_not_fit_the_budget_are_skipped_with_the_reason() {
    let work = tempfile::tempdir().unwrap();
    // With 3 s of publishing, restart is expected to take 3 + 10 + 5 = 18 s and drain
    // 3 + 10 + 6 = 19 s. A 21 s budget lets restart start; once it has run (3 s of
    // publishing at least) at most 18 s are left, so drain does not fit.
    let (run, v) = gameday(
        work.path(),
        "restart,drain,network_cut",
        &["--max-minutes", "0.35", "--url", "http://127.0.0.1:7700"],
    )
    .await;
    assert_eq!(run.code, 0, "the fault that ran held: {}", run.stdout);
    assert!(
        run.stdout
            .contains("note: --url http://127.0.0.1:7700 is not used"),
        "{}",
        run.stdout
    );
    assert_eq!(v["passed"], true);
    assert_eq!(
        (v["ran"].as_u64(), v["held"].as_u64(), v["skipped"].as_u64()),
        (Some(1), Some(1), Some(2))
    );
    assert_eq!(v["budgetSec"], 21.0);
    assert_eq!(v["budgetExhausted"], true);
    let f = v["faults"].as_array().unwrap();
    assert_eq!(f[0]["fault"], "restart");
    assert_eq!(f[0]["outcome"], "held", "{}", f[0]);
    assert_eq!(f[0]["expectedSec"], 18.0);
    // Its own limit: 3 s publishing + 20 s catch-up + 50 s restart timeout + 30 s recovery
    // + 90 s slack.
    assert_eq!(f[0]["limitSec"], 193.0);
    assert!(f[0]["skipped"].is_null() && f[0]["skipKind"].is_null());
    let reason = "not started: the budget (--max-minutes) ran out at quick/drain";
    for (x, id) in f[1..].iter().zip(["drain", "network_cut"]) {
        assert_eq!(x["fault"], id);
        assert_eq!(x["outcome"], "skipped", "{x}");
        assert_eq!(x["skipKind"], "budget", "{x}");
        assert!(x["zeroDropHeld"].is_null() && x["drill"].is_null(), "{x}");
        assert_eq!(x["injected"], false);
    }
    let first = f[1]["skipped"].as_str().unwrap();
    assert!(
        first.starts_with("not started: ") && first.ends_with("left, and it takes about 19 s"),
        "{first}"
    );
    assert_eq!(f[2]["skipped"], reason);
    let listed = v["skippedFaults"].as_array().unwrap();
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert_eq!(
        (
            &listed[0]["fault"],
            &listed[0]["kind"],
            &listed[0]["reason"]
        ),
        (&f[1]["fault"], &f[1]["skipKind"], &f[1]["skipped"])
    );
    assert_eq!(listed[1]["reason"], reason);
    assert!(
        run.stdout
            .contains("1 fault(s) ran, 1 held; 2 skipped (not counted as held)"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout
            .contains(&format!("skipped quick/network_cut: {reason}")),
        "{}",
        run.stdout
    );
    // stderr is not a terminal here: no progress bar was drawn.
    assert!(!run.stderr.contains("faults,"), "{}", run.stderr);
}

/// A fault still running when the budget ends is stopped there (here an instance that never
/// comes up, which on its own would only give up after 30 s) and reported as skipped with
/// the reason; nothing ran, so the game day fails, with its report.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fault_running_when_the_budget_ends_is_stopped_and_reported_skipped() {
    use std::os::unix::fs::PermissionsExt;
    let work = tempfile::tempdir().unwrap();
    let hang = work.path().join("never-listens");
    std::fs::write(&hang, "#!/bin/sh\nexec sleep 60\n").unwrap();
    std::fs::set_permissions(&hang, std::fs::Permissions::from_mode(0o755)).unwrap();
    // restart with 0.5 s of publishing is expected to take 15.5 s: it starts inside a
    // 16.2 s budget, and the budget stops it.
    let (run, v) = gameday_of(
        work.path(),
        "0.5",
        "restart,kill9",
        &[
            "--max-minutes",
            "0.27",
            "--server-bin",
            hang.to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(run.code, 1, "nothing ran: {}", run.stdout);
    assert!(run.stdout.contains("no fault ran: nothing was tested"));
    assert!(run.stdout.contains("gameday FAILED"), "{}", run.stdout);
    assert_eq!(v["passed"], false);
    assert_eq!(
        (v["ran"].as_u64(), v["skipped"].as_u64()),
        (Some(0), Some(2))
    );
    let f = v["faults"].as_array().unwrap();
    assert_eq!(f[0]["outcome"], "skipped", "{}", f[0]);
    assert_eq!(f[0]["skipKind"], "budget");
    let why = f[0]["skipped"].as_str().unwrap();
    assert!(
        why.starts_with("stopped when the budget (--max-minutes 0.27) ran out")
            && why.ends_with("before its drill finished: not judged"),
        "{why}"
    );
    assert!(f[0]["timedOut"] == false && f[0]["drill"].is_null());
    assert_eq!(
        f[1]["skipped"],
        "not started: the budget (--max-minutes) ran out at quick/restart"
    );
    // The budget is what ended the run: the instance's own 30 s start-up limit never came.
    let budget = v["budgetSec"].as_f64().unwrap();
    assert!(v["elapsedSec"].as_f64().unwrap() < budget + 10.0, "{v}");

    // A budget that is not a positive number of minutes is refused before anything starts.
    let bad = tool(
        work.path(),
        &args(&["gameday", "--profiles", "quick", "--max-minutes", "0"]),
    )
    .await;
    assert_eq!(bad.code, 1);
    assert!(bad.stderr.contains("--max-minutes"), "{}", bad.stderr);
}
