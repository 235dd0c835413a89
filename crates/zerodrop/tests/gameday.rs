//! `zerodrop gameday` starts its own instances of the real binary, injects faults while a
//! drill runs, and reports for each fault whether zero-drop held.

mod support;

use std::path::Path;

use serde_json::Value;
use support::{BIN, ToolRun, args, reports, tool};

/// A short game day (quick profile, 3 s drills of 16 clients) with `faults` and `extra`
/// flags, on instances of the binary under test, writing its report under `work/reports`.
async fn gameday(work: &Path, faults: &str, extra: &[&str]) -> (ToolRun, Value) {
    let out = work.join("reports");
    let mut a = args(&[
        "gameday",
        "--profiles",
        "quick",
        "--duration",
        "3",
        "--limit",
        "16",
        "--scenarios",
        "publish,ws_fanout,resume",
        "--faults",
        faults,
        "--server-bin",
        BIN,
        "--out-dir",
        out.to_str().unwrap(),
    ]);
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
