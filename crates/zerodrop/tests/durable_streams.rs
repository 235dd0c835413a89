//! The Durable Streams room (`/ds/`) against the protocol's own conformance suite
//! (`@durable-streams/server-conformance-tests`, pinned in `tests/ds/package.json` and
//! installed there by `npm ci` on first use) on SQLite and on Redis, and the protocol's
//! TypeScript client (`@durable-streams/client`) reading a stream across a `kill -9` and a
//! restart, and across a drain to a second instance on Redis: every byte once, in order.
//!
//! `node` and `npm` are required (`.ci/setup` installs them); a missing one fails with how
//! to install it. Every wait is bounded; every process is killed on drop.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use zerodrop_testkit::cluster::Cluster;
use zerodrop_testkit::free_port;

mod support;

use support::spawn_sqlite;

/// Tests the suite has in version 0.3.6; six of them are the opt-in webhook
/// subscriptions, which it skips unless asked.
const SUITE_TESTS: u64 = 338;
const SUITE_SKIPPED: u64 = 6;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ds")
}

fn tool(name: &str) -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join(name))
            .find(|p| p.exists())
    });
    found.unwrap_or_else(|| {
        panic!(
            "`{name}` is required by the Durable Streams tests and was not found; \
             install it with `apt-get install -y nodejs npm` (or run ./.ci/setup)"
        )
    })
}

/// Runs a command to completion within `limit`, returning its output.
fn run(mut cmd: Command, what: &str, limit: Duration) -> std::process::Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    // Both pipes are read aside, so a chatty child never blocks on a full pipe.
    let out = child.stdout.take().map(|mut s| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = std::io::Read::read_to_end(&mut s, &mut v);
            v
        })
    });
    let err = child.stderr.take().map(|mut s| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = std::io::Read::read_to_end(&mut s, &mut v);
            v
        })
    });
    let until = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() > until {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let join = |h: Option<std::thread::JoinHandle<Vec<u8>>>| {
        h.map(|h| h.join().unwrap_or_default()).unwrap_or_default()
    };
    std::process::Output {
        status,
        stdout: join(out),
        stderr: join(err),
    }
}

/// `npm ci` in `tests/ds` once (the exact versions of `package-lock.json`), again whenever
/// the lock file is newer than the installed tree.
fn install() {
    static ONCE: std::sync::Mutex<bool> = std::sync::Mutex::new(false);
    let mut done = ONCE.lock().unwrap_or_else(|p| p.into_inner());
    if *done {
        return;
    }
    let d = dir();
    let modified = |p: PathBuf| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let stale = match (
        modified(d.join("node_modules/.package-lock.json")),
        modified(d.join("package-lock.json")),
    ) {
        (Some(installed), Some(lock)) => installed < lock,
        _ => true,
    };
    if stale {
        let mut cmd = Command::new(tool("npm"));
        cmd.current_dir(&d)
            .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"]);
        let o = run(cmd, "npm ci", Duration::from_secs(600));
        assert!(
            o.status.success(),
            "npm ci in {} failed:\n{}{}",
            d.display(),
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    *done = true;
}

/// The suite against `base` (`http://host:port/ds`): its JSON report.
fn conformance(base: &str) -> Value {
    install();
    let report = tempfile::NamedTempFile::new().expect("temp file");
    let mut cmd = Command::new(tool("node"));
    cmd.current_dir(dir())
        .arg("node_modules/vitest/vitest.mjs")
        .args(["run", "--config", "vitest.config.mjs", "--reporter=json"])
        .arg(format!("--outputFile={}", report.path().display()))
        .env("DS_BASE_URL", base)
        .env("NO_COLOR", "1");
    let o = run(cmd, "the conformance suite", Duration::from_secs(600));
    let text = std::fs::read_to_string(report.path()).unwrap_or_default();
    let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "no report from the conformance suite ({e}):\n{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    });
    let failed: Vec<String> = v["testResults"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|f| f["assertionResults"].as_array().cloned().unwrap_or_default())
        .filter(|t| t["status"] == "failed")
        .map(|t| {
            format!(
                "{}: {}",
                t["fullName"].as_str().unwrap_or(""),
                t["failureMessages"][0]
                    .as_str()
                    .unwrap_or("")
                    .lines()
                    .next()
                    .unwrap_or("")
            )
        })
        .collect();
    assert!(
        failed.is_empty(),
        "{} conformance tests failed:\n{}",
        failed.len(),
        failed.join("\n")
    );
    assert_eq!(
        (
            v["numTotalTests"].as_u64(),
            v["numPassedTests"].as_u64(),
            v["numPendingTests"].as_u64()
        ),
        (
            Some(SUITE_TESTS),
            Some(SUITE_TESTS - SUITE_SKIPPED),
            Some(SUITE_SKIPPED)
        ),
        "the suite's counts"
    );
    v
}

#[test]
fn the_conformance_suite_passes_on_sqlite() {
    let data = tempfile::tempdir().expect("temp dir");
    let server = spawn_sqlite(data.path(), free_port(), &["--ds-access", "open"]);
    conformance(&format!("{}/ds", server.url));
}

#[test]
fn the_conformance_suite_passes_on_redis() {
    let bin = Path::new(env!("CARGO_BIN_EXE_zerodrop"));
    let cluster = Cluster::start(bin, 1, &["--ds-access", "open"]).expect("cluster starts");
    conformance(&format!("{}/ds", cluster.url(0)));
}
