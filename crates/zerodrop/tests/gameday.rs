//! `zerodrop gameday` starts its own instances of the real binary, injects faults while a
//! drill runs, and reports for each fault whether zero-drop held.

mod support;

use support::{BIN, args, reports, tool};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_drop_holds_through_restart_drain_kill9_and_a_network_cut() {
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("reports");
    let run = tool(
        work.path(),
        &args(&[
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
            "restart,drain,kill9,network_cut,store_outage",
            "--server-bin",
            BIN,
            "--out-dir",
            out.to_str().unwrap(),
        ]),
    )
    .await;
    assert_eq!(run.code, 0, "zero-drop must hold through every fault");
    let r = reports(&out, "gameday-quick-");
    assert_eq!(r.len(), 1);
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&r[0]).unwrap()).unwrap();
    assert_eq!(v["passed"], true);
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
    assert!(faults[4]["skipped"].as_str().unwrap().contains("redis"));
}
