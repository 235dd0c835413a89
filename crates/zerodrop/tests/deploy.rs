//! The shipped Prometheus rules and Grafana dashboard: valid, and built on names the server
//! really exports. Needs `promtool` on PATH (`.ci/setup` installs it).

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{Value, json};
use zerodrop_testkit::server::TestServer;
use zerodrop_testkit::ws::WsClient;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn promtool() -> Command {
    let found = Command::new("promtool")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "promtool is not on PATH: run .ci/setup (Debian package `prometheus`)"
    );
    Command::new("promtool")
}

/// Every `zerodrop_*` metric family a running server exports after some traffic.
async fn exported() -> (String, BTreeSet<String>) {
    let s = TestServer::start().await;
    let api = s.api();
    api.publish("room:1", json!(1)).await;
    let tok = s.token("u1", &["room:*"]);
    let mut c = WsClient::connect(&format!("{}/v1/ws?token={tok}", s.ws_url()))
        .await
        .unwrap();
    c.expect("welcome").await;
    c.send(json!({"type":"subscribe","stream":"room:1","after":0}))
        .await;
    c.expect("subscribed").await;
    c.events(1).await;
    api.publish("room:1", json!(2)).await;
    c.events(1).await;
    c.send(json!({"type":"ack","stream":"room:1","seq":2}))
        .await;
    c.close().await;
    let text = api.get("/metrics", None).await.text;
    let names = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .map(String::from)
        .collect();
    (text, names)
}

fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = expr;
    while let Some(i) = rest.find("zerodrop_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        out.insert(family.to_string());
        rest = &tail[end..];
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exposition_passes_promtool() {
    let (text, _) = exported().await;
    let mut child = promtool()
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alert_rules_pass_promtool_and_use_exported_names() {
    let rules = repo().join("deploy/prometheus/alerts.yml");
    let out = promtool()
        .args(["check", "rules"])
        .arg(&rules)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, exported) = exported().await;
    let text = std::fs::read_to_string(&rules).unwrap();
    let used = metric_names(&text);
    for n in &used {
        assert!(
            exported.contains(n),
            "alerts.yml uses {n}, which the server does not export"
        );
    }
    for alert in [
        "ZerodropDroppedMessages",
        "ZerodropResumeSuccessRateLow",
        "ZerodropResumeFailuresRising",
        "ZerodropRttHigh",
        "ZerodropUpgradesBlockedOutsideDrain",
        "ZerodropStoreDown",
        "ZerodropBufferTrimRateHigh",
    ] {
        assert!(text.contains(&format!("alert: {alert}")), "missing {alert}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_uses_exported_names() {
    let path = repo().join("deploy/grafana/zerodrop.json");
    let d: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let (_, exported) = exported().await;
    let mut used = BTreeSet::new();
    for p in d["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            used.extend(metric_names(t["expr"].as_str().unwrap()));
        }
    }
    assert!(used.len() >= 12, "{used:?}");
    for n in &used {
        assert!(
            exported.contains(n),
            "the dashboard uses {n}, which the server does not export"
        );
    }
}
