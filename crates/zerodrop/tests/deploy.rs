//! What ships for deployment, checked against the real binary and the real tools: the
//! Prometheus rules, runbooks and Grafana dashboard (built on names the server really
//! exports), the process and build metrics, the example config and `check-config`,
//! `secrets show`, `healthcheck`, the Dockerfile's structure, the systemd unit
//! (`systemd-analyze`) and the nginx example (`nginx -t`, then real traffic through it).
//! Needs `promtool`, `systemd-analyze`, `nginx` and `openssl` on PATH (`.ci/setup` installs
//! them); no Docker engine is needed (the image is not built here).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use zerodrop_server::config::{UpstreamConfig, WebhookConfig};
use zerodrop_testkit::http::Api;
use zerodrop_testkit::server::{ServerProcess, TestServer};
use zerodrop_testkit::sse::SseClient;
use zerodrop_testkit::ws::WsClient;

const BIN: &str = env!("CARGO_BIN_EXE_zerodrop");

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A tool the tests need; its absence fails the test, naming the package that brings it.
fn tool(name: &str, version_arg: &str, package: &str) -> Command {
    let found = Command::new(name)
        .arg(version_arg)
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "{name} is not on PATH: run .ci/setup (Debian package `{package}`)"
    );
    Command::new(name)
}

fn promtool() -> Command {
    tool("promtool", "--version", "prometheus")
}

/// Every `zerodrop_*` metric family a running server exports after some traffic, with the
/// upstream side configured (an upstream, so the job worker and its gauges run, and a webhook
/// source).
async fn exported() -> (String, BTreeSet<String>) {
    let s = TestServer::with(|c| {
        c.guard.upstreams.insert(
            "app".into(),
            UpstreamConfig {
                // Never called: nothing is delivered in this test.
                primary: "http://127.0.0.1:9".into(),
                ..UpstreamConfig::default()
            },
        );
        c.guard.webhooks.insert(
            "drill".into(),
            WebhookConfig {
                stream: Some("drill:webhooks".into()),
                ..WebhookConfig::default()
            },
        );
    })
    .await;
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
    // The job gauges appear with the worker's first upkeep (every 5 s).
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let mut text = api.get("/metrics", None).await.text;
    while !text.contains("# TYPE zerodrop_jobs_oldest_queued_age_seconds ") {
        assert!(
            std::time::Instant::now() < deadline,
            "no job gauges after 15 s:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        text = api.get("/metrics", None).await.text;
    }
    let names = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .map(String::from)
        .collect();
    (text, names)
}

/// The metric families an expression reads (`zerodrop_*` and `process_*`).
fn metric_names(expr: &str) -> BTreeSet<String> {
    metric_refs(expr)
        .into_iter()
        .map(|(name, _)| name)
        .collect()
}

/// Each metric reference of an expression, with the label matchers written right after it
/// (`""` when there are none).
fn metric_refs(expr: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = ["zerodrop_", "process_"]
        .iter()
        .filter_map(|p| rest.find(p))
        .min()
    {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        rest = &tail[end..];
        let matchers = match rest.strip_prefix('{').and_then(|r| r.split_once('}')) {
            Some((m, _)) => m.to_string(),
            None => String::new(),
        };
        out.push((family.to_string(), matchers));
    }
    out
}

/// The value of the one sample of `name` (any labels), and its label text.
fn sample(text: &str, name: &str) -> Option<(String, f64)> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        let labels = match series.strip_prefix(name)? {
            "" => "",
            rest => rest.strip_prefix('{')?.strip_suffix('}')?,
        };
        Some((labels.to_string(), value.parse().ok()?))
    })
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
async fn build_and_process_metrics_have_sane_values() {
    let (text, _) = exported().await;
    let (labels, v) = sample(&text, "zerodrop_build_info").expect("zerodrop_build_info");
    assert_eq!(v, 1.0);
    // No commit label in a plain `cargo build` (the Dockerfile sets ZERODROP_GIT_COMMIT).
    let want = match option_env!("ZERODROP_GIT_COMMIT").filter(|c| !c.is_empty()) {
        Some(c) => format!("version=\"{}\",commit=\"{c}\"", env!("CARGO_PKG_VERSION")),
        None => format!("version=\"{}\"", env!("CARGO_PKG_VERSION")),
    };
    assert_eq!(labels, want);
    if !cfg!(target_os = "linux") {
        assert!(sample(&text, "process_open_fds").is_none());
        return;
    }
    let fds = sample(&text, "process_open_fds")
        .expect("process_open_fds")
        .1;
    let max = sample(&text, "process_max_fds").expect("process_max_fds").1;
    let rss = sample(&text, "process_resident_memory_bytes")
        .expect("process_resident_memory_bytes")
        .1;
    let start = sample(&text, "process_start_time_seconds")
        .expect("process_start_time_seconds")
        .1;
    // This process has stdio, a listener, a database and its WAL open at least.
    let listed = std::fs::read_dir("/proc/self/fd").unwrap().count() as f64;
    assert!(fds >= 5.0 && fds <= max, "open fds {fds}, limit {max}");
    assert!(
        (fds - listed).abs() < 64.0,
        "open fds {fds}, /proc lists {listed}"
    );
    assert!(rss > 1e6 && rss < 64e9, "rss {rss}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    // The test process started before this test, and not days ago.
    assert!(
        start <= now + 1.0 && start > now - 86_400.0,
        "start {start}, now {now}"
    );
    // Descriptors are read at every scrape: 100 more open files show in the next one (the
    // scrapes share one keep-alive connection; give or take its two ends if it is renewed, and
    // the descriptors the other tests of this process close meanwhile: a server that stops
    // closes a dozen or so).
    let s = TestServer::start().await;
    let api = s.api();
    let before = sample(&api.get("/metrics", None).await.text, "process_open_fds")
        .unwrap()
        .1;
    let files: Vec<std::fs::File> = (0..100).map(|_| tempfile::tempfile().unwrap()).collect();
    let after = sample(&api.get("/metrics", None).await.text, "process_open_fds")
        .unwrap()
        .1;
    assert!(
        after >= before + 70.0,
        "{before} then {after} with 100 more files open"
    );
    drop(files);
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
        "ZerodropStoreNotDurable",
        "ZerodropBufferTrimRateHigh",
        "ZerodropInstanceDown",
        "ZerodropRestarting",
        "ZerodropFileDescriptorsNearLimit",
        "ZerodropJobsOldestQueuedHigh",
        "ZerodropDeadLetters",
        "ZerodropDeadLettersRising",
        "ZerodropCircuitOpen",
        "ZerodropBulkheadRejectionsRising",
        "ZerodropRateLimitedSustained",
    ] {
        assert!(text.contains(&format!("alert: {alert}")), "missing {alert}");
    }
    // The instance-down alert watches the scrape job the docs tell operators to name.
    assert!(text.contains(r#"expr: up{job="zerodrop"} == 0"#));
    let deployment = std::fs::read_to_string(repo().join("docs/deployment.md")).unwrap();
    assert!(deployment.contains("job_name: zerodrop"));
}

/// GitHub's anchor for a Markdown heading: lower case, spaces to `-`, punctuation dropped.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// Each alert of alerts.yml with the text of its rule (up to the next alert).
fn alerts() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo().join("deploy/prometheus/alerts.yml")).unwrap();
    text.split("- alert: ")
        .skip(1)
        .map(|block| {
            let (name, body) = block.split_once('\n').unwrap();
            (name.trim().to_string(), body.to_string())
        })
        .collect()
}

#[test]
fn every_alert_has_a_runbook_section() {
    let doc = std::fs::read_to_string(repo().join("docs/runbooks.md")).unwrap();
    let sections: BTreeSet<String> = doc
        .lines()
        .filter_map(|l| l.strip_prefix("## "))
        .map(anchor)
        .collect();
    let alerts = alerts();
    assert_eq!(alerts.len(), 19);
    let mut linked = BTreeSet::new();
    for (name, body) in &alerts {
        let url = body
            .lines()
            .find_map(|l| l.trim().strip_prefix("runbook_url: "))
            .unwrap_or_else(|| panic!("{name} has no runbook_url"))
            .trim_matches('"');
        let (doc_path, frag) = url
            .split_once('#')
            .unwrap_or_else(|| panic!("{name}: {url} has no anchor"));
        assert_eq!(doc_path, "docs/runbooks.md", "{name}");
        assert_eq!(frag, name.to_lowercase(), "{name}: its own section");
        assert!(
            sections.contains(frag),
            "{name}: docs/runbooks.md has no section #{frag}"
        );
        linked.insert(frag.to_string());
    }
    // And no runbook for an alert that no longer exists.
    assert_eq!(linked, sections);
    // In-page links between runbooks point at sections that exist.
    for (i, _) in doc.match_indices("](#") {
        let frag = doc[i + 3..].split(')').next().unwrap();
        assert!(
            sections.contains(frag),
            "a link to #{frag}, no such section"
        );
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
    // The upstream side has its panels.
    for n in [
        "zerodrop_jobs_backlog",
        "zerodrop_jobs_running",
        "zerodrop_jobs_oldest_queued_age_seconds",
        "zerodrop_jobs_dead_letters",
        "zerodrop_circuit_state",
        "zerodrop_bulkhead_in_flight",
        "zerodrop_rate_limited_total",
        "zerodrop_webhooks_total",
    ] {
        assert!(used.contains(n), "no panel shows {n}");
    }
    for n in &used {
        assert!(
            exported.contains(n),
            "the dashboard uses {n}, which the server does not export"
        );
    }
}

#[test]
fn every_dashboard_query_filters_on_the_instance_variable() {
    let path = repo().join("deploy/grafana/zerodrop.json");
    let d: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let vars = d["templating"]["list"].as_array().unwrap();
    let instance = vars
        .iter()
        .find(|v| v["name"] == "instance")
        .expect("an `instance` template variable");
    assert_eq!(instance["type"], "query");
    assert_eq!(
        instance["query"]["query"],
        "label_values(zerodrop_build_info, instance)"
    );
    assert_eq!(instance["includeAll"], true);
    assert_eq!(instance["allValue"], ".*");
    let mut n = 0;
    for p in d["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            let refs = metric_refs(expr);
            assert!(!refs.is_empty(), "{}: {expr}", p["title"]);
            for (name, matchers) in refs {
                assert!(
                    matchers
                        .split(',')
                        .any(|m| m.trim() == r#"instance=~"$instance""#),
                    "panel {}: {name} in `{expr}` does not filter on $instance",
                    p["title"]
                );
                n += 1;
            }
        }
    }
    assert!(n >= 25, "{n} metric references");
}

// ------------------------------------------------------------------------- the binary's CLI

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// `zerodrop <args>` in `cwd`, with no `ZERODROP_*` variable but those in `env`.
fn zerodrop(cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = Command::new(BIN);
    cmd.args(args).current_dir(cwd).stdin(Stdio::null());
    for (k, _) in std::env::vars() {
        if k.starts_with("ZERODROP_") {
            cmd.env_remove(k);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run zerodrop");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `check-config`'s settings: key → (TOML value, source).
fn effective(stdout: &str) -> BTreeMap<String, (String, String)> {
    stdout
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            let (kv, source) = l.rsplit_once("  # ").expect("`key = value  # source`");
            let (k, v) = kv.split_once(" = ").expect("`key = value`");
            (k.to_string(), (v.to_string(), source.to_string()))
        })
        .collect()
}

/// Every setting `zerodrop serve` takes, from its `--help` (flag names with `_`).
fn serve_settings() -> BTreeSet<String> {
    let help = zerodrop(Path::new("."), &["serve", "--help"], &[]).stdout;
    help.lines()
        .filter_map(|l| l.trim_start().strip_prefix("--"))
        .filter_map(|l| l.split([' ', '=']).next())
        .filter(|f| !["help", "config"].contains(f))
        .map(|f| f.replace('-', "_"))
        .collect()
}

#[test]
fn the_shipped_example_config_has_every_setting_at_its_default() {
    let example = repo().join("deploy/zerodrop.toml");
    let text = std::fs::read_to_string(&example).unwrap();
    let settings = serve_settings();
    assert!(settings.len() >= 22, "{settings:?}");
    // The example, as shipped: valid, every value read from the file.
    let cwd = tempfile::tempdir().unwrap();
    let run = zerodrop(
        cwd.path(),
        &["check-config", "--config", example.to_str().unwrap()],
        &[],
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    let from_file = effective(&run.stdout);
    for (k, (_, source)) in &from_file {
        assert_eq!(source, "file", "{k}");
    }
    // The defaults, as check-config prints them without a file.
    let run = zerodrop(cwd.path(), &["check-config"], &[]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let defaults = effective(&run.stdout);
    assert!(
        run.stdout
            .contains("# instance_id: not set (generated at start)")
    );
    // Every key of the example (set, or commented out where there is no fixed default) is a
    // `serve` setting, and every `serve` setting is in the example and in check-config.
    let mut keys = BTreeSet::new();
    let mut last_default: Option<String> = None;
    for line in text.lines() {
        if let Some(d) = line.strip_prefix("# default: ") {
            last_default = Some(d.to_string());
            continue;
        }
        let (commented, kv) = match line.strip_prefix("# ") {
            Some(rest) => (true, rest),
            None => (false, line),
        };
        let Some((k, v)) = kv.split_once(" = ") else {
            continue;
        };
        if !k.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
            continue;
        }
        assert!(
            settings.contains(k),
            "the example sets {k}, not a serve setting"
        );
        let d = last_default
            .take()
            .unwrap_or_else(|| panic!("{k} has no `# default:` comment"));
        if commented {
            // Settings with no fixed default: unset unless given.
            let unset = [
                ("instance_id", "generated at start (zd-xxxxxx)"),
                ("jwks_url", "none (HS256 only)"),
                ("jwt_issuer", "not checked"),
                ("jwt_audience", "not checked"),
                ("authz_upstream", "none (no hooks)"),
            ];
            let want = unset.iter().find(|(key, _)| *key == k);
            assert!(
                want.is_some(),
                "{k} is commented out but has a fixed default"
            );
            assert_eq!(d, want.unwrap().1, "{k}: the comment's default");
            assert!(!defaults.contains_key(k));
        } else {
            let (want, _) = &defaults[k];
            assert_eq!(&d, want, "{k}: the comment's default");
            assert_eq!(v, want, "{k}: the example's value is its default");
            assert_eq!(&from_file[k].0, want, "{k}: as check-config read it");
        }
        assert!(keys.insert(k.to_string()), "{k} twice");
    }
    assert_eq!(keys, settings, "the example against `serve --help`");
    let mut printed: BTreeSet<String> = defaults.keys().cloned().collect();
    for unset in [
        "instance_id",
        "jwks_url",
        "jwt_issuer",
        "jwt_audience",
        "authz_upstream",
    ] {
        printed.insert(unset.into());
    }
    assert_eq!(printed, settings, "check-config against `serve --help`");
    // The commented-out example value is valid too.
    let uncommented = text.replace("# instance_id = ", "instance_id = ");
    let f = cwd.path().join("all.toml");
    std::fs::write(&f, uncommented).unwrap();
    let run = zerodrop(
        cwd.path(),
        &["check-config", "--config", f.to_str().unwrap()],
        &[],
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(
        effective(&run.stdout)["instance_id"],
        ("\"zd-eu-1\"".to_string(), "file".to_string())
    );
    // Nothing was started or created: the default data dir does not exist.
    assert!(!cwd.path().join("zerodrop-data").exists());
}

#[test]
fn check_config_resolves_like_serve_and_never_prints_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("zerodrop.toml");
    std::fs::write(
        &file,
        "retention_max_events = 7\ninstance_id = \"from-file\"\nmax_connections = 5\n\
         store = \"redis\"\nredis_url = \"redis://:file-password-123@127.0.0.1:6390/0\"\n\
         data_dir = \"/nonexistent/zerodrop\"\n",
    )
    .unwrap();
    let api_key = "an-api-key-from-the-environment";
    let resume = "k2:a-resume-key-of-some-length,k1:another-resume-key-value";
    let run = zerodrop(
        dir.path(),
        &[
            "check-config",
            "--config",
            file.to_str().unwrap(),
            "--max-connections",
            "9",
        ],
        &[
            ("ZERODROP_INSTANCE_ID", "from-env"),
            ("ZERODROP_MAX_CONNECTIONS", "8"),
            ("ZERODROP_API_KEY", api_key),
            ("ZERODROP_RESUME_KEYS", resume),
        ],
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    let e = effective(&run.stdout);
    let get = |k: &str| (e[k].0.as_str(), e[k].1.as_str());
    assert_eq!(get("max_connections"), ("9", "flag"));
    assert_eq!(
        get("instance_id"),
        ("\"from-env\"", "env ZERODROP_INSTANCE_ID")
    );
    assert_eq!(get("retention_max_events"), ("7", "file"));
    assert_eq!(get("store"), ("\"redis\"", "file"));
    assert_eq!(get("data_dir"), ("\"/nonexistent/zerodrop\"", "file"));
    assert_eq!(get("reconnect_window_sec"), ("900", "default"));
    assert_eq!(
        get("redis_url"),
        ("\"redis://:<redacted>@127.0.0.1:6390/0\"", "file")
    );
    assert!(run.stdout.contains("#   api_key: from ZERODROP_API_KEY\n"));
    assert!(
        run.stdout
            .contains("#   resume_keys: from ZERODROP_RESUME_KEYS\n")
    );
    assert!(run.stdout.contains(
        "#   jwt_secret: from /nonexistent/zerodrop/secrets.json (generated there on first start if missing)\n"
    ));
    for secret in [api_key, "a-resume-key-of-some-length", "file-password-123"] {
        assert!(
            !run.stdout.contains(secret) && !run.stderr.contains(secret),
            "a secret was printed"
        );
    }
    // The same file and environment given to `serve` run with the same values.
    let data = dir.path().join("d");
    let p = ServerProcess::spawn(
        Path::new(BIN),
        &data,
        "127.0.0.1:0",
        &[
            "--config",
            file.to_str().unwrap(),
            "--max-connections",
            "9",
            "--store",
            "sqlite",
        ],
        &[
            ("ZERODROP_INSTANCE_ID", "from-env"),
            ("ZERODROP_MAX_CONNECTIONS", "8"),
        ],
    )
    .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let snap = rt.block_on(async {
        p.api()
            .get("/admin/snapshot", Some(&p.creds.admin_token))
            .await
            .json
    });
    assert_eq!(snap["config"]["instance"], "from-env");
    assert_eq!(snap["config"]["retention"]["maxEvents"], 7);
    assert_eq!(snap["config"]["maxConnections"], 9);
}

#[test]
fn check_config_refuses_bad_settings_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    // (file text, environment, what the message must name)
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a [&'a str]);
    let cases: &[Case] = &[
        (
            "retention_max_evnts = 5\n",
            &[],
            &["retention_max_evnts", "unknown field"],
        ),
        (
            "max_connections = \"lots\"\n",
            &[],
            &["max_connections", "lots"],
        ),
        ("store = \"mysql\"\n", &[], &["store", "mysql"]),
        ("listen = \"nowhere\"\n", &[], &["listen", "nowhere"]),
        (
            "retention_max_events = 0\n",
            &[],
            &["retention_max_events", "at least 1"],
        ),
        ("ping_interval_sec = -3\n", &[], &["ping_interval_sec"]),
        (
            "max_frame_bytes = 100\n",
            &[],
            &["max_frame_bytes", "at least 1024"],
        ),
        ("instance_id = \"bad id!\"\n", &[], &["instance_id"]),
        (
            "store = \"redis\"\nredis_url = \"redis+sentinel://h1:26379,h2:26379\"\n",
            &[],
            &["redis_url", "master's name"],
        ),
        (
            "[server]\nlisten = \"0.0.0.0:1\"\n",
            &[],
            &["server", "unknown field"],
        ),
        (
            "",
            &[("ZERODROP_RETENTION_MAX_AGE_SEC", "0")],
            &["retention_max_age_sec"],
        ),
        ("", &[("ZERODROP_STORE", "mysql")], &["--store", "mysql"]),
        (
            "",
            &[("ZERODROP_API_KEY", "tiny-key")],
            &["ZERODROP_API_KEY", "16"],
        ),
        (
            "",
            &[("ZERODROP_RESUME_KEYS", "k1")],
            &["ZERODROP_RESUME_KEYS", "kid:secret"],
        ),
    ];
    let file = dir.path().join("bad.toml");
    for (text, env, wants) in cases {
        std::fs::write(&file, text).unwrap();
        let run = zerodrop(
            dir.path(),
            &["check-config", "--config", file.to_str().unwrap()],
            env,
        );
        assert_ne!(
            run.code, 0,
            "{text:?} {env:?} was accepted:\n{}",
            run.stdout
        );
        assert!(run.stdout.is_empty(), "{text:?}: printed settings anyway");
        for w in *wants {
            assert!(
                run.stderr.contains(w),
                "{text:?} {env:?}: the message does not name {w:?}:\n{}",
                run.stderr
            );
        }
        assert!(!run.stderr.contains("tiny-key"), "a secret was printed");
    }
    let run = zerodrop(
        dir.path(),
        &["check-config", "--config", "/nonexistent/zerodrop.toml"],
        &[],
    );
    assert_eq!(run.code, 1);
    assert!(
        run.stderr
            .contains("cannot read config file /nonexistent/zerodrop.toml")
    );
    assert!(!dir.path().join("zerodrop-data").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_show_prints_exactly_the_secret_a_server_generated() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let p = ServerProcess::spawn(Path::new(BIN), &data, "127.0.0.1:0", &[], &[]).unwrap();
    let file: Value =
        serde_json::from_str(&std::fs::read_to_string(data.join("secrets.json")).unwrap()).unwrap();
    let d = data.to_str().unwrap();
    for (name, key) in [
        ("api-key", "apiKey"),
        ("admin-token", "adminToken"),
        ("jwt-secret", "jwtSecret"),
        ("resume-keys", "resumeKeys"),
    ] {
        let run = zerodrop(dir.path(), &["secrets", "show", name, "--data-dir", d], &[]);
        assert_eq!(run.code, 0, "{name}: {}", run.stderr);
        assert_eq!(
            run.stdout,
            format!("{}\n", file[key].as_str().unwrap()),
            "{name}"
        );
        assert_eq!(run.stderr, "", "{name}");
    }
    // The printed key is the one the server runs with: a publish with it is accepted.
    let key = zerodrop(
        dir.path(),
        &["secrets", "show", "api-key"],
        &[("ZERODROP_DATA_DIR", d)],
    );
    assert_eq!(key.code, 0, "{}", key.stderr);
    let mut creds = p.creds.clone();
    creds.api_key = key.stdout.trim_end().to_string();
    let r = Api::new(&p.url, &creds)
        .try_publish("room:1", json!({"n": 1}))
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    // The variable wins over the file, as it does for `serve`.
    let run = zerodrop(
        dir.path(),
        &["secrets", "show", "admin-token", "--data-dir", d],
        &[("ZERODROP_ADMIN_TOKEN", "admin-token-from-the-environment")],
    );
    assert_eq!(run.stdout, "admin-token-from-the-environment\n");
    // An unknown name or a data dir without secrets: an error, nothing on stdout.
    let run = zerodrop(
        dir.path(),
        &["secrets", "show", "password", "--data-dir", d],
        &[],
    );
    assert_eq!(run.code, 2);
    assert_eq!(run.stdout, "");
    assert!(
        run.stderr.contains("invalid value 'password'"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr
            .contains("api-key, admin-token, jwt-secret, resume-keys")
    );
    let nowhere = dir.path().join("nowhere");
    let run = zerodrop(
        dir.path(),
        &[
            "secrets",
            "show",
            "jwt-secret",
            "--data-dir",
            nowhere.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(run.code, 1);
    assert_eq!(run.stdout, "");
    assert!(
        run.stderr.contains(&format!(
            "no JWT secret: {}/secrets.json does not exist; set ZERODROP_JWT_SECRET",
            nowhere.display()
        )),
        "{}",
        run.stderr
    );
    assert!(!nowhere.exists());
    let partial = dir.path().join("partial");
    std::fs::create_dir(&partial).unwrap();
    std::fs::write(
        partial.join("secrets.json"),
        r#"{"apiKey":"only-the-api-key-here"}"#,
    )
    .unwrap();
    let run = zerodrop(
        dir.path(),
        &[
            "secrets",
            "show",
            "resume-keys",
            "--data-dir",
            partial.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(run.code, 1);
    assert!(run.stderr.contains("no resume keys:") && run.stderr.contains("does not hold it"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthcheck_follows_the_servers_listen_address() {
    let dir = tempfile::tempdir().unwrap();
    let p = ServerProcess::spawn(
        Path::new(BIN),
        &dir.path().join("d"),
        "127.0.0.1:0",
        &[],
        &[],
    )
    .unwrap();
    // As in the container: the server's own ZERODROP_LISTEN, on every interface.
    let listen = format!("0.0.0.0:{}", p.addr.port());
    let env = [("ZERODROP_LISTEN", listen.as_str())];
    let run = zerodrop(dir.path(), &["healthcheck"], &env);
    assert_eq!(
        (run.code, run.stdout.as_str()),
        (0, "{\"status\":\"ok\"}\n"),
        "{}",
        run.stderr
    );
    let run = zerodrop(dir.path(), &["healthcheck", "--ready"], &env);
    assert_eq!(
        (run.code, run.stdout.as_str()),
        (0, "{\"ready\":true}\n"),
        "{}",
        run.stderr
    );
    // Draining: not ready, still alive.
    let r = p
        .api()
        .post("/admin/drain/start", Some(&p.creds.admin_token), json!({}))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let run = zerodrop(dir.path(), &["healthcheck", "--ready"], &env);
    assert_eq!(run.code, 1);
    assert!(
        run.stderr.contains("/health/ready answered \"503\""),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("draining"), "{}", run.stderr);
    assert_eq!(zerodrop(dir.path(), &["healthcheck"], &env).code, 0);
    // Nothing listening: a clear failure.
    let closed = format!("127.0.0.1:{}", zerodrop_testkit::free_port());
    let run = zerodrop(dir.path(), &["healthcheck", "--addr", &closed], &[]);
    assert_eq!(run.code, 1);
    assert!(
        run.stderr.contains(&format!("cannot connect to {closed}")),
        "{}",
        run.stderr
    );
}

/// A default of `serve`, as `check-config` prints it without a file.
fn default_of(key: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let run = zerodrop(dir.path(), &["check-config"], &[]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    effective(&run.stdout)[key].0.trim_matches('"').to_string()
}

// ---------------------------------------------------------------------------------- Docker

/// The Dockerfile's instructions (continuations joined, comments dropped): (keyword, rest).
fn dockerfile() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('#') || t.is_empty() {
            continue;
        }
        match t.strip_suffix('\\') {
            Some(part) => {
                cur.push_str(part);
                cur.push(' ');
            }
            None => {
                cur.push_str(t);
                let (k, rest) = cur.split_once(' ').unwrap_or((&cur, ""));
                out.push((k.to_ascii_uppercase(), rest.trim().to_string()));
                cur.clear();
            }
        }
    }
    out
}

#[test]
fn dockerfile_is_multi_stage_unprivileged_with_a_volume_and_the_default_port() {
    let ins = dockerfile();
    let froms: Vec<&String> = ins
        .iter()
        .filter(|(k, _)| k == "FROM")
        .map(|(_, v)| v)
        .collect();
    assert_eq!(froms.len(), 2, "{froms:?}");
    // Builder: the official Rust image, at least the workspace's rust-version.
    let manifest = std::fs::read_to_string(repo().join("Cargo.toml")).unwrap();
    let msrv = manifest
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .unwrap()
        .trim_matches('"');
    let (image, stage) = froms[0].split_once(" AS ").expect("a named builder stage");
    assert_eq!(stage, "builder");
    let tag = image
        .strip_prefix("rust:")
        .expect("the official rust image");
    let version = tag.split('-').next().unwrap();
    let parse = |v: &str| -> Vec<u32> { v.split('.').map(|p| p.parse().unwrap()).collect() };
    assert!(
        parse(version) >= parse(msrv),
        "rust:{version} < rust-version {msrv}"
    );
    assert!(tag.ends_with("-bookworm"), "{tag}");
    assert_eq!(
        froms[1], "debian:bookworm-slim",
        "runtime on slim Debian, same release"
    );
    let runtime: Vec<&(String, String)> = ins
        .iter()
        .skip_while(|(k, v)| !(k == "FROM" && v == froms[1]))
        .collect();
    let one = |key: &str| -> String {
        let v: Vec<&String> = runtime
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v)
            .collect();
        assert_eq!(v.len(), 1, "one {key} in the runtime stage: {v:?}");
        v[0].clone()
    };
    // Not root: a fixed numeric uid that the stage creates.
    let user = one("USER");
    let uid = user.split(':').next().unwrap();
    assert!(!["root", "0", ""].contains(&uid), "USER {user}");
    assert!(uid.parse::<u32>().is_ok_and(|u| u >= 1000), "USER {user}");
    assert!(
        runtime
            .iter()
            .any(|(k, v)| k == "RUN" && v.contains(&format!("--uid {uid}"))),
        "the runtime stage creates uid {uid}"
    );
    // ENV: listen on every interface at the default port; the data dir is the volume.
    let env = one("ENV");
    let var = |name: &str| -> String {
        env.split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("ENV {name}"))
            .to_string()
    };
    let listen = var("ZERODROP_LISTEN");
    let default_port = default_of("listen").rsplit_once(':').unwrap().1.to_string();
    assert_eq!(listen, format!("0.0.0.0:{default_port}"));
    assert_eq!(one("EXPOSE"), default_port);
    let data = var("ZERODROP_DATA_DIR");
    assert_eq!(one("VOLUME"), data);
    assert!(
        runtime
            .iter()
            .any(|(k, v)| k == "RUN" && v.contains(&format!("-o zerodrop -g zerodrop {data}"))),
        "the data dir belongs to the service user"
    );
    // The binary on PATH runs the server and checks its health (no curl in the image).
    assert!(runtime.iter().any(|(k, v)| k == "COPY"
        && v == "--from=builder /usr/local/bin/zerodrop /usr/local/bin/zerodrop"));
    assert!(one("HEALTHCHECK").ends_with(r#"CMD ["zerodrop", "healthcheck"]"#));
    assert_eq!(one("ENTRYPOINT"), r#"["zerodrop"]"#);
    assert_eq!(one("CMD"), r#"["serve"]"#);
    assert_eq!(one("STOPSIGNAL"), "SIGTERM");
    // The build: release, locked, with the optional commit for zerodrop_build_info.
    let build = ins
        .iter()
        .find(|(k, v)| k == "RUN" && v.contains("cargo build"))
        .map(|(_, v)| v.clone())
        .unwrap();
    assert!(
        build.contains("cargo build --release --locked -p zerodrop"),
        "{build}"
    );
    assert!(
        build.contains("ZERODROP_GIT_COMMIT=\"${GIT_COMMIT}\""),
        "{build}"
    );
    // Every file the build copies from the context exists and is not ignored.
    let ignore = std::fs::read_to_string(repo().join(".dockerignore")).unwrap();
    let ignored: Vec<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    for must in ["target/", ".git/"] {
        assert!(ignored.contains(&must), ".dockerignore lacks {must}");
    }
    for (_, v) in ins
        .iter()
        .filter(|(k, v)| k == "COPY" && !v.starts_with("--from"))
    {
        let parts: Vec<&str> = v.split_whitespace().collect();
        for src in &parts[..parts.len() - 1] {
            assert!(repo().join(src).exists(), "COPY {src}: no such file");
            for pat in &ignored {
                let p = pat.trim_end_matches('/');
                assert!(
                    !(src.starts_with(p) || (pat.starts_with("*.") && src.ends_with(&pat[1..]))),
                    "COPY {src} is excluded by .dockerignore {pat}"
                );
            }
        }
    }
}

// --------------------------------------------------------------------------------- systemd

fn unit() -> String {
    std::fs::read_to_string(repo().join("deploy/systemd/zerodrop.service")).unwrap()
}

fn directives(unit: &str, key: &str) -> Vec<String> {
    unit.lines()
        .filter_map(|l| l.strip_prefix(&format!("{key}=")))
        .map(String::from)
        .collect()
}

/// `systemd-analyze verify` on the unit with `/usr/local/bin/zerodrop` replaced by the test
/// binary (verify checks that the commands exist): (success, stderr).
fn verify_unit(text: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("zerodrop.service");
    std::fs::write(&path, text.replace("/usr/local/bin/zerodrop", BIN)).unwrap();
    let out = tool("systemd-analyze", "--version", "systemd")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn systemd_unit_verifies_is_hardened_and_outlasts_the_drain() {
    let text = unit();
    let (ok, stderr) = verify_unit(&text);
    assert!(ok && stderr.is_empty(), "systemd-analyze verify:\n{stderr}");
    // The check is not vacuous: a bad value is reported.
    let (_, stderr) = verify_unit(&text.replace("TimeoutStopSec=45", "TimeoutStopSec=4x5"));
    assert!(stderr.contains("Failed to parse"), "{stderr}");
    // Exposure (systemd-analyze security, 0 best … 10 worst) at most 2.0: "OK".
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("zerodrop.service");
    std::fs::write(&path, text.replace("/usr/local/bin/zerodrop", BIN)).unwrap();
    let out = tool("systemd-analyze", "--version", "systemd")
        .args(["security", "--offline=true", "--threshold=20"])
        .arg(&path)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "exposure above 2.0:\n{report}");
    let one = |k: &str| -> String {
        let v = directives(&text, k);
        assert_eq!(v.len(), 1, "{k}: {v:?}");
        v[0].clone()
    };
    assert_eq!(one("Type"), "simple", "zerodrop does not speak sd_notify");
    assert_eq!(one("User"), "zerodrop");
    assert_eq!(one("StateDirectory"), "zerodrop");
    assert_eq!(one("NoNewPrivileges"), "yes");
    assert_eq!(one("ProtectSystem"), "strict");
    assert_eq!(one("ReadWritePaths"), "/var/lib/zerodrop");
    assert_eq!(one("KillSignal"), "SIGTERM");
    assert_eq!(one("CapabilityBoundingSet"), "");
    let env = directives(&text, "Environment");
    assert!(
        env.contains(&"ZERODROP_DATA_DIR=/var/lib/zerodrop".to_string()),
        "{env:?}"
    );
    // The stop timeout outlasts the drain grace, with room for the last writes.
    let grace: u64 = env
        .iter()
        .find_map(|e| e.strip_prefix("ZERODROP_DRAIN_GRACE_SEC="))
        .map(String::from)
        .unwrap_or_else(|| default_of("drain_grace_sec"))
        .parse()
        .unwrap();
    let stop: u64 = one("TimeoutStopSec").parse().unwrap();
    assert!(
        stop >= grace + 10,
        "TimeoutStopSec={stop}, drain grace {grace} s"
    );
    let nofile: u64 = one("LimitNOFILE").parse().unwrap();
    let max_conn: u64 = default_of("max_connections").parse().unwrap();
    assert!(nofile >= 10 * max_conn, "LimitNOFILE={nofile}");
    // The pre-start check is check-config on the same file as the start, and the shipped
    // example passes it as the unit runs it.
    let start = one("ExecStart");
    let pre = one("ExecStartPre");
    let config = start.split_once(" serve ").unwrap().1;
    assert_eq!(
        pre,
        format!("/usr/local/bin/zerodrop check-config {config}")
    );
    let example = repo().join("deploy/zerodrop.toml");
    let args: Vec<String> = pre
        .replace("/etc/zerodrop/zerodrop.toml", example.to_str().unwrap())
        .split_whitespace()
        .skip(1)
        .map(String::from)
        .collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let envs: Vec<(&str, &str)> = env.iter().filter_map(|e| e.split_once('=')).collect();
    let run = zerodrop(dir.path(), &args, &envs);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stdout
            .contains("data_dir = \"/var/lib/zerodrop\"  # env ZERODROP_DATA_DIR")
    );
    let users = std::fs::read_to_string(repo().join("deploy/systemd/zerodrop.sysusers")).unwrap();
    assert!(users.lines().any(|l| l.starts_with("u zerodrop - ")));
}

// ----------------------------------------------------------------------------------- nginx

fn nginx() -> Command {
    let on_path = Command::new("nginx")
        .arg("-v")
        .output()
        .is_ok_and(|o| o.status.success());
    if on_path || !Path::new("/usr/sbin/nginx").exists() {
        return tool("nginx", "-v", "nginx");
    }
    Command::new("/usr/sbin/nginx")
}

/// An nginx prefix dir with a main config that includes `site` (as `conf.d/` would).
fn nginx_prefix(site: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().display().to_string();
    std::fs::write(dir.path().join("zerodrop.conf"), site).unwrap();
    let main = format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\npid {p}/nginx.pid;\n\
         error_log {p}/error.log warn;\nevents {{ worker_connections 256; }}\nhttp {{\n\
         access_log off;\nclient_body_temp_path {p}/body;\nproxy_temp_path {p}/proxy;\n\
         fastcgi_temp_path {p}/fastcgi;\nuwsgi_temp_path {p}/uwsgi;\nscgi_temp_path {p}/scgi;\n\
         include {p}/zerodrop.conf;\n}}\n"
    );
    std::fs::write(dir.path().join("nginx.conf"), main).unwrap();
    dir
}

fn nginx_args(dir: &Path) -> Vec<String> {
    let p = dir.display().to_string();
    vec![
        "-p".into(),
        p.clone(),
        "-c".into(),
        format!("{p}/nginx.conf"),
        "-e".into(),
        format!("{p}/error.log"),
    ]
}

#[test]
fn nginx_example_passes_nginx_t() {
    let site = std::fs::read_to_string(repo().join("deploy/nginx/zerodrop.conf")).unwrap();
    let certs = tempfile::tempdir().unwrap();
    let (crt, key) = (certs.path().join("c.pem"), certs.path().join("k.pem"));
    let out = tool("openssl", "version", "openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "1", "-subj", "/CN=localhost", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&crt)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let site = site
        .replace("/etc/nginx/tls/zerodrop.crt", crt.to_str().unwrap())
        .replace("/etc/nginx/tls/zerodrop.key", key.to_str().unwrap());
    let dir = nginx_prefix(&site);
    let out = nginx()
        .arg("-t")
        .args(nginx_args(dir.path()))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.contains("test is successful"),
        "{stderr}"
    );
    // The proxy's read timeouts outlast the server's ping interval (WebSocket) and the SSE
    // keep-alive (15 s), so a quiet but healthy connection is never cut.
    let ping: u64 = default_of("ping_interval_sec").parse().unwrap();
    let timeouts: Vec<u64> = site
        .lines()
        .filter_map(|l| l.trim().strip_prefix("proxy_read_timeout "))
        .map(|v| {
            v.trim_end_matches(';')
                .trim_end_matches('s')
                .parse()
                .unwrap()
        })
        .collect();
    assert_eq!(timeouts.len(), 2, "WebSocket and SSE locations");
    assert!(
        timeouts.iter().all(|&t| t >= 2 * ping.max(15)),
        "{timeouts:?}"
    );
}

/// nginx in the foreground; stopped when dropped.
struct Nginx(std::process::Child);

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_through_the_nginx_example() {
    let data = tempfile::tempdir().unwrap();
    let p = ServerProcess::spawn(
        Path::new(BIN),
        &data.path().join("d"),
        "127.0.0.1:0",
        &[],
        &[],
    )
    .unwrap();
    // The example as shipped, with plain-HTTP listeners on free loopback ports (TLS is
    // nginx's own business, checked by `nginx -t` above) and the real server upstream.
    let (https_port, http_port) = (zerodrop_testkit::free_port(), zerodrop_testkit::free_port());
    let site: String = std::fs::read_to_string(repo().join("deploy/nginx/zerodrop.conf"))
        .unwrap()
        .replace(
            "listen 443 ssl http2;",
            &format!("listen 127.0.0.1:{https_port};"),
        )
        .replace("listen 80;", &format!("listen 127.0.0.1:{http_port};"))
        .replace("server 127.0.0.1:7700;", &format!("server {};", p.addr))
        .lines()
        .filter(|l| !l.trim_start().starts_with("ssl_"))
        .map(|l| format!("{l}\n"))
        .collect();
    let dir = nginx_prefix(&site);
    let child = nginx()
        .args(nginx_args(dir.path()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _nginx = Nginx(child);
    let base = format!("http://127.0.0.1:{https_port}");
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let deadline = std::time::Instant::now() + zerodrop_testkit::WAIT;
    while client
        .get(format!("{base}/health/live"))
        .send()
        .await
        .is_err()
    {
        assert!(std::time::Instant::now() < deadline, "nginx did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let proxied = Api::new(&base, &p.creds);
    let r = proxied.get("/health/ready", None).await;
    assert_eq!((r.status, r.json.clone()), (200, json!({"ready": true})));
    // Operator endpoints are not reachable through the proxy, with or without credentials.
    for path in [
        "/metrics",
        "/metrics?format=json",
        "/admin/snapshot",
        "/admin/drain/status",
    ] {
        let r = proxied.get(path, Some(&p.creds.admin_token)).await;
        assert_eq!(r.status, 403, "{path}");
    }
    let r = proxied
        .post("/admin/drain/start", Some(&p.creds.admin_token), json!({}))
        .await;
    assert_eq!(r.status, 403);
    // Plain HTTP is sent to HTTPS.
    let r = client
        .get(format!("http://127.0.0.1:{http_port}/v1/ws"))
        .header("host", "zerodrop.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 301);
    assert_eq!(
        r.headers()["location"],
        "https://zerodrop.example.com/v1/ws"
    );
    // Publish, WebSocket and SSE through the proxy, live.
    proxied.publish("room:1", json!({"n": 1})).await;
    let tok = p.creds.token("u1", &["room:*"], &[]);
    let mut ws = WsClient::connect(&format!("ws://127.0.0.1:{https_port}/v1/ws?token={tok}"))
        .await
        .unwrap();
    ws.expect("welcome").await;
    ws.send(json!({"type":"subscribe","stream":"room:1","after":0}))
        .await;
    ws.expect("subscribed").await;
    assert_eq!(ws.events(1).await[0]["seq"], 1);
    let mut sse = SseClient::connect(
        &format!("{base}/v1/streams/room:1/sse?token={tok}&after=0"),
        &[],
    )
    .await
    .unwrap();
    assert_eq!(sse.next().await.json()["seq"], 1);
    // A live event reaches both at once: nothing buffers it.
    proxied.publish("room:1", json!({"n": 2})).await;
    assert_eq!(ws.events(1).await[0]["seq"], 2);
    assert_eq!(sse.next().await.json()["seq"], 2);
    // The server pinged through the proxy's Upgrade: an answered ping keeps the socket open.
    ws.close().await;
}
