//! The guardrails in the real binary: jobs survive `kill -9` (none lost, none completed
//! twice), and upstream settings come from the config file and the environment, bad ones
//! refused at start-up with a message naming them.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};
use zerodrop_testkit::server::ServerProcess;
use zerodrop_testkit::upstream::{FakeUpstream, Mode};

const BIN: &str = env!("CARGO_BIN_EXE_zerodrop");

fn spawn(dir: &Path, env: &[(&str, &str)]) -> ServerProcess {
    ServerProcess::spawn(Path::new(BIN), dir, "127.0.0.1:0", &[], env).expect("zerodrop starts")
}

async fn jobs(p: &ServerProcess) -> Value {
    p.api()
        .get("/admin/jobs?limit=100", Some(&p.creds.admin_token))
        .await
        .json
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_with_jobs_in_flight_loses_none_and_completes_none_twice() {
    let up = FakeUpstream::start().await;
    // Every delivery hangs, so that the crash finds jobs running and jobs queued.
    up.set(Mode::Slow(Duration::from_secs(30)));
    let dir = tempfile::tempdir().unwrap();
    let env = [
        ("ZERODROP_UPSTREAM_APP_PRIMARY", up.url.as_str()),
        ("ZERODROP_UPSTREAM_APP_TIMEOUT_MS", "60000"),
        ("ZERODROP_WEBHOOK_PAY_UPSTREAM", "app"),
        ("ZERODROP_JOBS_LEASE_MS", "1500"),
        ("ZERODROP_JOBS_HEARTBEAT_MS", "500"),
        ("ZERODROP_JOBS_RUNNING_INTERACTIVE", "4"),
        ("ZERODROP_JOBS_BACKOFF_BASE_MS", "20"),
        ("ZERODROP_JOBS_BACKOFF_CAP_MS", "100"),
    ];
    let mut p = spawn(dir.path(), &env);
    const N: usize = 12;
    for i in 0..N {
        let r = p
            .api()
            .request(
                Method::POST,
                "/v1/webhooks/pay",
                Some(&p.creds.api_key),
                Some(json!({"i": i}).to_string()),
                &[("idempotency-key", &format!("evt-{i}"))],
            )
            .await;
        assert_eq!(r.status, 202, "{}", r.text);
    }
    up.wait_until("4 deliveries in flight", |r| r.len() >= 4)
        .await;
    let before = jobs(&p).await;
    assert_eq!(before["byStatus"]["running"], 4, "{before:#}");
    assert_eq!(before["byStatus"]["queued"], (N - 4) as u64);
    p.kill9();
    // The upstream heals; the next start redelivers the 4 whose worker died (once their
    // lease ran out) and delivers the rest.
    up.set(Mode::Ok);
    let p = spawn(dir.path(), &env);
    let deadline = Instant::now() + Duration::from_secs(20);
    let after = loop {
        let j = jobs(&p).await;
        if j["byStatus"]["done"] == N as u64 {
            break j;
        }
        assert!(Instant::now() < deadline, "{j:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for s in ["queued", "running", "dead"] {
        assert_eq!(after["byStatus"][s], 0, "{s}: {after:#}");
    }
    // Every message reached the upstream, each with its own key; the 4 that were in flight
    // twice (attempt 1 cut by the crash, attempt 2 completed), every other exactly once.
    let mut by_key: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for d in up.received() {
        by_key
            .entry(d.header("idempotency-key").unwrap().to_string())
            .or_default()
            .push(d.header("x-zerodrop-attempt").unwrap().to_string());
    }
    assert_eq!(by_key.len(), N, "{by_key:?}");
    let twice: Vec<_> = by_key.values().filter(|a| a.len() == 2).collect();
    assert_eq!(twice.len(), 4, "{by_key:?}");
    for a in twice {
        assert_eq!(a, &vec!["1".to_string(), "2".to_string()]);
    }
    assert!(by_key.values().all(|a| a.len() <= 2), "{by_key:?}");
    let done: Vec<u64> = after["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["attempts"].as_u64().unwrap())
        .collect();
    assert_eq!(done.iter().filter(|a| **a == 2).count(), 4, "{done:?}");
}

fn check_config(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = std::process::Command::new(BIN);
    cmd.arg("check-config").args(args).current_dir(dir.path());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn upstreams_come_from_the_file_and_the_environment_and_bad_ones_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("z.toml");
    std::fs::write(
        &file,
        "[upstreams.app]\nprimary = \"http://127.0.0.1:9\"\nstreams = [\"orders:*\"]\n\
         [upstreams.app.circuit]\nmin_calls = 4\n\n[webhooks.gh]\nid_header = \"x-github-delivery\"\nupstream = \"app\"\n",
    )
    .unwrap();
    let f = file.to_str().unwrap();
    let (ok, out, err) = check_config(
        &["--config", f],
        &[
            ("ZERODROP_UPSTREAM_APP_SECONDARY", "http://127.0.0.1:10"),
            ("ZERODROP_JOBS_RUNNING_KINDS", "webhook:gh=2, publish=9"),
        ],
    );
    assert!(ok, "{err}");
    assert!(
        out.contains(
            "jobs_running_kinds = \"publish=9,webhook:gh=2\"  # env ZERODROP_JOBS_RUNNING_KINDS"
        ),
        "{out}"
    );
    assert!(
        out.contains("# [upstreams.app] primary http://127.0.0.1:9, secondary http://127.0.0.1:10"),
        "{out}"
    );
    assert!(out.contains("circuit min_calls 4 of 20"), "{out}");
    assert!(
        out.contains("# [webhooks.gh] id from Header(\"x-github-delivery\")"),
        "{out}"
    );
    let refused = [
        (
            vec![("ZERODROP_UPSTREAM_APP_CIRCUIT_MIN_CALLS", "50")],
            "upstreams.app.circuit: invalid setting `min_calls`",
        ),
        (
            vec![("ZERODROP_UPSTREAM_APP_CIRCUIT_FAILURE_RATE_PCT", "150")],
            "`failure_rate_pct`: must be above 0 and at most 100",
        ),
        (
            vec![("ZERODROP_UPSTREAM_APP_PRIMARY", "ftp://x")],
            "upstreams.app.primary",
        ),
        (
            vec![("ZERODROP_UPSTREAM_APP_BULKHEAD_MAX_IN_FLIGHT", "0")],
            "upstreams.app.bulkhead",
        ),
        (
            vec![("ZERODROP_WEBHOOK_GH_UPSTREAM", "billing")],
            "no upstream named `billing`",
        ),
        (
            vec![("ZERODROP_UPSTREAM_APP_COLOUR", "red")],
            "ZERODROP_UPSTREAM_APP_COLOUR: no such setting",
        ),
        (
            vec![("ZERODROP_JOBS_HEARTBEAT_MS", "20000")],
            "--jobs-heartbeat-ms",
        ),
        (
            vec![("ZERODROP_JOBS_RUNNING_KINDS", "publish=0")],
            "--jobs-running-kinds",
        ),
        (
            vec![("ZERODROP_JOBS_RUNNING_KINDS", "publish")],
            "`publish` is not `kind=N`",
        ),
    ];
    for (env, want) in refused {
        let (ok, _, err) = check_config(&["--config", f], &env);
        assert!(!ok, "{env:?} was accepted");
        assert!(err.contains(want), "{env:?}: {err}");
    }
    // `serve` refuses the same way, before listening.
    let out = std::process::Command::new(BIN)
        .args(["serve", "--config", f, "--data-dir"])
        .arg(dir.path().join("d"))
        .env("ZERODROP_UPSTREAM_APP_CIRCUIT_MIN_CALLS", "50")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("min_calls"));
}
