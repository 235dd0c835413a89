//! `zerodrop verify` against real processes: two instances on one Redis serve one log
//! (consistent, exit 0, with and without `--recompute`); an instance with its own SQLite log
//! holding the same published data diverges (its events carry its own epoch and ts), exit 1,
//! naming what differs.

mod support;

use std::path::Path;

use serde_json::{Value, json};
use support::{args, reports, tool};
use zerodrop_testkit::cluster::Cluster;
use zerodrop_testkit::http::Api;
use zerodrop_testkit::server::ServerProcess;

const BIN: &str = env!("CARGO_BIN_EXE_zerodrop");

/// The one report of run `n` (each run writes into its own directory).
fn report(dir: &Path, n: usize) -> Value {
    let all = reports(&dir.join(n.to_string()), "verify-");
    assert_eq!(all.len(), 1, "one report per run");
    serde_json::from_str(&std::fs::read_to_string(&all[0]).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_sharing_a_log_are_consistent_and_a_separate_log_diverges() {
    let cluster = Cluster::start(Path::new(BIN), 2, &[]).unwrap();
    let key = cluster.creds.api_key.clone();
    let single_dir = tempfile::tempdir().unwrap();
    let single = ServerProcess::spawn(
        Path::new(BIN),
        single_dir.path(),
        "127.0.0.1:0",
        &[],
        &[("ZERODROP_API_KEY", &key)],
    )
    .unwrap();
    let shared = cluster.api(0);
    let separate = Api::new(&single.url, &cluster.creds);
    for i in 0..12 {
        let data = json!({"i": i, "s": "ünï", "n": {"a": [i, null]}});
        shared.publish("v:1", data.clone()).await;
        separate.publish("v:1", data).await;
    }

    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("reports");
    let base = |run: usize, urls: &[&str], more: &[&str]| {
        let o = out.join(run.to_string());
        let o = o.to_str().unwrap();
        let mut a = args(&[
            "verify",
            "--stream",
            "v:1",
            "--api-key",
            &key,
            "--out-dir",
            o,
        ]);
        a.extend(args(&["--url", urls[0]]));
        for u in &urls[1..] {
            a.extend(args(&["--peer", u]));
        }
        a.extend(args(more));
        a
    };
    let (n0, n1) = (cluster.url(0), cluster.url(1));

    let ok = tool(work.path(), &base(1, &[&n0, &n1], &[])).await;
    assert_eq!(ok.code, 0, "{}{}", ok.stdout, ok.stderr);
    assert!(
        ok.stdout
            .contains("verify: v:1 consistent on 2 instance(s)"),
        "{}",
        ok.stdout
    );
    assert!(!ok.stdout.contains("DIVERGED"), "{}", ok.stdout);
    let r = report(&out, 1);
    assert_eq!(r["consistent"], true);
    let inst = r["instances"].as_array().unwrap();
    assert_eq!(inst.len(), 2);
    assert_eq!(inst[0]["headSeq"], 12);
    assert_eq!(inst[0]["count"], 12);
    assert_eq!(inst[0]["hash"], inst[1]["hash"]);
    assert_ne!(inst[0]["hash"], "0".repeat(64));

    let ok = tool(work.path(), &base(2, &[&n0, &n1], &["--recompute"])).await;
    assert_eq!(ok.code, 0, "{}{}", ok.stdout, ok.stderr);
    assert_eq!(
        ok.stdout.matches("recomputed=match consistent").count(),
        2,
        "{}",
        ok.stdout
    );
    let r = report(&out, 2);
    assert_eq!(r["consistent"], true);
    for i in r["instances"].as_array().unwrap() {
        assert_eq!(
            i["computedHash"], i["hash"],
            "the Redis store's digest is its events'"
        );
        assert_eq!(i["computedCount"], 12);
    }

    let bad = tool(work.path(), &base(3, &[&n0, &single.url], &["--recompute"])).await;
    assert_eq!(bad.code, 1, "{}{}", bad.stdout, bad.stderr);
    assert!(
        bad.stdout.contains("verify: v:1 DIVERGED"),
        "{}",
        bad.stdout
    );
    assert!(
        bad.stdout
            .lines()
            .any(|l| l.starts_with(&single.url) && l.ends_with("DIVERGED")),
        "{}",
        bad.stdout
    );
    let r = report(&out, 3);
    assert_eq!(r["consistent"], false);
    let inst = r["instances"].as_array().unwrap();
    assert_eq!(inst[0]["differences"], json!([]));
    assert_eq!(inst[1]["headSeq"], 12, "same length, other log");
    assert_eq!(
        inst[1]["computedHash"], inst[1]["hash"],
        "each log's digest is its own events'"
    );
    let diffs: Vec<&str> = inst[1]["differences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap())
        .collect();
    assert_eq!(diffs.len(), 2, "{diffs:?}");
    assert!(diffs[0].starts_with("epoch "), "{diffs:?}");
    assert!(diffs[1].starts_with("hash "), "{diffs:?}");
    drop(single);
}
