//! The operator tools against a real server started by the test, and against a deliberately
//! broken proxy in front of it: probe, gate and canary must pass on the healthy server and
//! FAIL, naming why, on the broken one.

mod support;

use support::{
    Faults, Server, args, broken_proxy, event_dropping_proxy, lenient_slo, reports, tool,
};
use zerodrop_server::config::WebhookConfig;
use zerodrop_testkit::server::TestServer;

fn with(mut a: Vec<String>, more: Vec<String>) -> Vec<String> {
    a.extend(more);
    a
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_passes_on_a_real_server_and_names_the_failed_step_when_an_event_is_dropped() {
    let s = Server::start().await;
    let work = tempfile::tempdir().unwrap();
    let ok = tool(
        work.path(),
        &with(args(&["probe", "--url", &s.url()]), s.creds()),
    )
    .await;
    assert_eq!(ok.code, 0, "probe must pass on a healthy server");
    assert!(ok.stdout.contains("probe passed"));
    assert_eq!(
        reports(&work.path().join(".output/reliability"), "probe-").len(),
        1
    );

    let broken = event_dropping_proxy(s.inst.addr).await;
    let bad = tool(
        work.path(),
        &with(
            args(&[
                "probe",
                "--url",
                &format!("http://{broken}"),
                "--step-timeout",
                "2",
            ]),
            s.creds(),
        ),
    )
    .await;
    assert_eq!(bad.code, 1, "probe must fail when an event is lost");
    assert!(
        bad.stdout.contains("probe FAILED at step `ws resume`"),
        "{}",
        bad.stdout
    );

    let failing = broken_proxy(
        s.inst.addr,
        Faults {
            fail_publish_every: Some(1),
            ..Faults::default()
        },
    )
    .await;
    let bad = tool(
        work.path(),
        &with(
            args(&["probe", "--url", &format!("http://{failing}")]),
            s.creds(),
        ),
    )
    .await;
    assert_eq!(bad.code, 1);
    assert!(
        bad.stdout.contains("probe FAILED at step `publish`"),
        "{}",
        bad.stdout
    );
    assert!(bad.stdout.contains("HTTP 500"), "{}", bad.stdout);

    // No credentials at all: a clear error, exit 1.
    let none = tool(work.path(), &args(&["probe", "--url", &s.url()])).await;
    assert_eq!(none.code, 1);
    assert!(
        none.stdout.contains("no API key") || none.stderr.contains("no API key"),
        "{}",
        none.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gate_passes_a_healthy_server_and_fails_on_500s_and_on_lost_events() {
    let s = Server::start().await;
    let work = tempfile::tempdir().unwrap();
    let slo = lenient_slo(work.path());
    let gate = |url: String| {
        with(
            args(&[
                "gate",
                "--url",
                &url,
                "--profile",
                "quick",
                "--duration",
                "3",
                "--limit",
                "24",
                "--scenarios",
                "publish,ws_fanout,resume",
                "--slo",
                slo.to_str().unwrap(),
            ]),
            s.creds(),
        )
    };
    let ok = tool(work.path(), &gate(s.url())).await;
    assert_eq!(ok.code, 0, "gate must pass a healthy server");
    assert!(ok.stdout.contains("gate PASSED"));

    let failing = broken_proxy(
        s.inst.addr,
        Faults {
            fail_publish_every: Some(4),
            ..Faults::default()
        },
    )
    .await;
    let bad = tool(work.path(), &gate(format!("http://{failing}"))).await;
    assert_eq!(bad.code, 1, "gate must fail on 500s");
    assert!(bad.stdout.contains("publish: 5xx rate"), "{}", bad.stdout);
    assert!(
        bad.stdout.contains("unknown status rate"),
        "500 is not an allowed status: {}",
        bad.stdout
    );

    let dropping = event_dropping_proxy(s.inst.addr).await;
    let bad = tool(work.path(), &gate(format!("http://{dropping}"))).await;
    assert_eq!(bad.code, 1, "gate must fail when events are lost");
    assert!(bad.stdout.contains("events lost"), "{}", bad.stdout);

    // The gate reports embed the drill and name the breaches.
    let r = reports(&work.path().join(".output/reliability"), "gate-quick-");
    assert_eq!(r.len(), 3);
    let last: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(r.last().unwrap()).unwrap()).unwrap();
    assert!(
        last["breaches"].as_array().is_some_and(|b| !b.is_empty())
            || !last["passed"].as_bool().unwrap_or(true)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_passes_equal_releases_and_fails_a_candidate_that_errors() {
    let s = Server::start().await;
    let work = tempfile::tempdir().unwrap();
    let slo = lenient_slo(work.path());
    let canary = |candidate: String| {
        with(
            args(&[
                "canary",
                "--control-url",
                &s.url(),
                "--candidate-url",
                &candidate,
                "--profile",
                "quick",
                "--duration",
                "2",
                "--limit",
                "12",
                "--scenarios",
                "publish,ws_fanout",
                "--rounds",
                "1",
                "--slo",
                slo.to_str().unwrap(),
            ]),
            s.creds(),
        )
    };
    let same = tool(work.path(), &canary(s.url())).await;
    assert_eq!(same.code, 0, "the same release against itself passes");
    assert!(same.stdout.contains("canary PASSED"));

    let failing = broken_proxy(
        s.inst.addr,
        Faults {
            fail_publish_every: Some(3),
            ..Faults::default()
        },
    )
    .await;
    let bad = tool(work.path(), &canary(format!("http://{failing}"))).await;
    assert_eq!(
        bad.code, 1,
        "a candidate answering 500s must fail the canary"
    );
    assert!(
        bad.stdout.contains("candidate error rate"),
        "{}",
        bad.stdout
    );
    let r = reports(&work.path().join(".output/reliability"), "canary-quick-");
    let last: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(r.last().unwrap()).unwrap()).unwrap();
    assert_eq!(last["passed"], false);
    assert!(last["deltas"].as_array().is_some_and(|d| {
        d.iter()
            .any(|x| x["errorRateDelta"].as_f64().unwrap_or(0.0) > 0.01)
    }));
}

/// The `webhook` scenario against a real server with a `drill` source (SQLite): every
/// accepted message id is in the stream once and every second copy was answered as a
/// duplicate, and gate passes; behind a proxy that hides the message ids from the server's
/// dedupe, the same gate fails on the doubles; a source the server lacks is a named breach
/// when the scenario was asked for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_gate_passes_a_deduplicating_server_and_fails_on_doubles() {
    let s = TestServer::with(|c| {
        c.guard.webhooks.insert(
            "drill".into(),
            WebhookConfig {
                stream: Some("drill:webhooks".into()),
                ..WebhookConfig::default()
            },
        );
    })
    .await;
    let creds = args(&[
        "--api-key",
        &s.creds.api_key,
        "--jwt-secret",
        &s.creds.jwt_secret,
    ]);
    let work = tempfile::tempdir().unwrap();
    let slo = lenient_slo(work.path());
    let out = work.path().join(".output/reliability");
    let gate = |url: &str, more: &[&str]| {
        let mut a = args(&[
            "gate",
            "--url",
            url,
            "--profile",
            "quick",
            "--duration",
            "2",
            "--scenarios",
            "webhook",
            "--slo",
            slo.to_str().unwrap(),
        ]);
        a.extend(args(more));
        with(a, creds.clone())
    };
    let last_webhook = || -> serde_json::Value {
        let r = reports(&out, "gate-quick-");
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(r.last().unwrap()).unwrap()).unwrap();
        v["drill"]["scenarios"][0].clone()
    };

    let ok = tool(work.path(), &gate(&s.url, &[])).await;
    assert_eq!(ok.code, 0, "gate must pass a server that deduplicates");
    assert!(ok.stdout.contains("gate PASSED"), "{}", ok.stdout);
    assert!(
        ok.stdout.contains("webhook drill → drill:webhooks: sent"),
        "{}",
        ok.stdout
    );
    let sc = last_webhook();
    assert_eq!(sc["scenario"], "webhook");
    let w = &sc["webhook"];
    let accepted = w["accepted"].as_u64().unwrap();
    assert!(accepted >= 10, "{w}");
    assert_eq!(w["failed"], 0, "{w}");
    assert_eq!(w["stream"], "drill:webhooks");
    assert_eq!(w["scope"], "drill");
    assert!(w["duplicatesSequential"].as_u64().unwrap() > 0, "{w}");
    assert!(w["duplicatesConcurrent"].as_u64().unwrap() > 0, "{w}");
    let dups = w["duplicatesSent"].as_u64().unwrap();
    assert!(w["duplicateAnswers"].as_u64().unwrap() >= dups, "{w}");
    for k in [
        "drops",
        "doubles",
        "answeredAsNew",
        "seqMismatches",
        "uncountedDuplicates",
    ] {
        assert_eq!(w[k], 0, "{k}: {w}");
    }
    assert_eq!(sc["published"], accepted);
    assert_eq!(
        sc["log"]["events"], accepted,
        "each accepted id once in the stream"
    );
    assert!(sc["http"]["statuses"]["202"].as_u64().unwrap() >= accepted + dups);
    assert!(sc["latencyMs"]["count"].as_u64().unwrap() > 0);
    // What the drill read back is what the server holds: the run's ids, once each.
    let run = format!(
        "drill-{}-",
        reports(&out, "gate-quick-")
            .last()
            .map(|p| std::fs::read_to_string(p).unwrap())
            .map(
                |t| serde_json::from_str::<serde_json::Value>(&t).unwrap()["drill"]["runId"]
                    .as_str()
                    .unwrap()
                    .to_string()
            )
            .unwrap()
    );
    let page = s
        .api()
        .get(
            "/v1/streams/drill:webhooks/events?after=0&limit=1000",
            Some(&s.creds.api_key),
        )
        .await
        .json;
    let mut ids: Vec<&str> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["data"]["id"].as_str())
        .filter(|id| id.starts_with(&run))
        .collect();
    assert_eq!(ids.len() as u64, accepted);
    ids.dedup();
    assert_eq!(ids.len() as u64, accepted);

    // Every copy looks new to the server: it runs them twice, and the gate says so.
    let broken = broken_proxy(
        s.addr,
        Faults {
            break_webhook_dedupe: true,
            ..Faults::default()
        },
    )
    .await;
    let bad = tool(work.path(), &gate(&format!("http://{broken}"), &[])).await;
    assert_eq!(bad.code, 1, "gate must fail when webhooks run twice");
    assert!(
        bad.stdout.contains("(doubles: run twice)"),
        "{}",
        bad.stdout
    );
    assert!(
        bad.stdout.contains("duplicate(s) answered as new"),
        "{}",
        bad.stdout
    );
    assert!(bad.stdout.contains("global: "), "{}", bad.stdout);
    let w = &last_webhook()["webhook"];
    assert_eq!(w["doubles"], w["duplicatesSent"], "{w}");
    assert_eq!(w["drops"], 0, "{w}");

    // Asked for a source the server does not have: not run, and a breach naming the fix.
    let missing = tool(work.path(), &gate(&s.url, &["--webhook-source", "nope"])).await;
    assert_eq!(missing.code, 1);
    assert!(
        missing.stdout.contains(
            "webhook: not run — the server has no webhook source `nope` (POST /v1/webhooks/nope answered 404 NOT_FOUND): add [webhooks.nope] with stream = \"drill:webhooks\" to its config file (or set ZERODROP_WEBHOOK_NOPE_STREAM=drill:webhooks)"
        ),
        "{}",
        missing.stdout
    );
    let sc = last_webhook();
    assert_eq!(sc["notRun"]["required"], true, "{sc}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_then_capacity_dashboard_and_snapshot() {
    let s = Server::start().await;
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("reports");
    let o = out.to_str().unwrap().to_string();
    let drill = tool(
        work.path(),
        &with(
            args(&[
                "drill",
                "--url",
                &s.url(),
                "--profile",
                "quick",
                "--duration",
                "3",
                "--limit",
                "30",
                "--out-dir",
                &o,
            ]),
            s.creds(),
        ),
    )
    .await;
    assert_eq!(drill.code, 0, "zero-drop holds on a healthy server");
    let r = reports(&out, "drill-quick-");
    assert_eq!(r.len(), 1);
    let rep: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&r[0]).unwrap()).unwrap();
    assert_eq!(rep["scenarios"].as_array().unwrap().len(), 6);
    // This server has no webhook source: part of the default set, the scenario is reported
    // as not run, saying what to configure, and breaches nothing.
    let webhook = &rep["scenarios"][5];
    assert_eq!(webhook["scenario"], "webhook");
    assert_eq!(webhook["notRun"]["required"], false, "{webhook}");
    assert!(
        webhook["notRun"]["reason"]
            .as_str()
            .unwrap()
            .contains("add [webhooks.drill] with stream = \"drill:webhooks\""),
        "{webhook}"
    );
    assert!(
        drill
            .stdout
            .contains("webhook          not run: the server has no webhook source `drill`"),
        "{}",
        drill.stdout
    );
    assert!(
        !rep["breaches"].to_string().contains("webhook"),
        "{}",
        rep["breaches"]
    );
    assert_eq!(rep["totals"]["missing"], 0);
    assert_eq!(rep["totals"]["duplicated"], 0);
    assert!(rep["totals"]["delivered"].as_u64().unwrap() > 0);
    assert!(
        rep["totals"]["resumeAttempts"].as_u64().unwrap() > 0,
        "forced disconnects happened"
    );
    // Every planned client was connected and subscribed when publishing started, and the
    // server saw them.
    let planned = rep["capacity"]["connections"].as_u64().unwrap();
    assert!(planned >= 30, "{}", rep["capacity"]);
    assert_eq!(
        rep["capacity"]["connectedAtStart"], planned,
        "{}",
        rep["capacity"]
    );
    assert!(
        rep["capacity"]["serverActiveAtStart"].as_u64().unwrap() > 0,
        "{}",
        rep["capacity"]
    );
    for sc in rep["scenarios"].as_array().unwrap() {
        assert_eq!(sc["log"]["missing"], 0, "{sc}");
        assert_eq!(sc["log"]["duplicated"], 0, "{sc}");
    }

    let cap = tool(
        work.path(),
        &args(&[
            "capacity",
            "--expected-peak-streams",
            "5000",
            "--out-dir",
            &o,
        ]),
    )
    .await;
    assert_eq!(cap.code, 0);
    let c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&reports(&out, "capacity-")[0]).unwrap())
            .unwrap();
    for k in [
        "expectedPeakStreams",
        "perInstanceCapacity",
        "headroom",
        "instancesNeeded",
        "multiRegionThreshold",
        "activateMultiRegionProgram",
    ] {
        assert!(c.get(k).is_some(), "capacity report lacks {k}: {c}");
    }
    assert_eq!(c["headroom"], 0.7);
    assert!(c["instancesNeeded"].as_u64().unwrap() >= 1);

    let dash = tool(work.path(), &args(&["dashboard", "--out-dir", &o])).await;
    assert_eq!(dash.code, 0);
    let html = std::fs::read_to_string(out.join("dashboard.html")).unwrap();
    assert!(html.contains("ws_fanout latency"));
    assert!(!html.contains(r#"id="live""#), "no --url, no live card");
    // With --url the page carries the server's state as it was when the page was written.
    let dash = tool(
        work.path(),
        &args(&["dashboard", "--out-dir", &o, "--url", &s.url()]),
    )
    .await;
    assert_eq!(dash.code, 0);
    assert!(
        dash.stdout
            .contains(&format!("live snapshot of {}: ready", s.url())),
        "{}",
        dash.stdout
    );
    let html = std::fs::read_to_string(out.join("dashboard.html")).unwrap();
    assert!(html.contains(r#"<div class="v ok" id="live">ready</div>"#));
    assert!(html.contains("store sqlite up true"), "live card details");

    let snap = tool(
        work.path(),
        &with(
            args(&["snapshot", "--url", &s.url(), "--out-dir", &o]),
            s.creds(),
        ),
    )
    .await;
    assert_eq!(snap.code, 0);
    assert!(snap.stdout.contains("== drain"), "{}", snap.stdout);
    let bad = tool(
        work.path(),
        &args(&[
            "snapshot",
            "--url",
            &s.url(),
            "--admin-token",
            "wrong",
            "--api-key",
            "x",
        ]),
    )
    .await;
    assert_eq!(bad.code, 1, "a refused snapshot is a failure");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_come_from_the_data_dir() {
    let s = Server::start_self_generated().await;
    let work = tempfile::tempdir().unwrap();
    let data = s.dir.path().join("data");
    let ok = tool(
        work.path(),
        &args(&[
            "probe",
            "--url",
            &s.url(),
            "--data-dir",
            data.to_str().unwrap(),
        ]),
    )
    .await;
    assert_eq!(ok.code, 0, "secrets.json supplies the credentials");
    // A flag wins over the file: a wrong API key on the command line fails.
    let bad = tool(
        work.path(),
        &args(&[
            "probe",
            "--url",
            &s.url(),
            "--data-dir",
            data.to_str().unwrap(),
            "--api-key",
            "wrong",
        ]),
    )
    .await;
    assert_eq!(bad.code, 1);
    assert!(bad.stdout.contains("HTTP 401"), "{}", bad.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_pool_replaces_the_jwt_secret() {
    let s = Server::start().await;
    let work = tempfile::tempdir().unwrap();
    let pool = work.path().join("tokens.txt");
    let mut lines = vec!["# pre-minted connect tokens".to_string()];
    for i in 0..3 {
        lines.push(
            zerodrop_client::mint_connect_token(
                &s.secrets.jwt_secret,
                &format!("pool-{i}"),
                &["drill:*".into()],
                None,
                std::time::Duration::from_secs(600),
            )
            .unwrap(),
        );
    }
    std::fs::write(&pool, lines.join("\n")).unwrap();
    let run = tool(
        work.path(),
        &args(&[
            "drill",
            "--url",
            &s.url(),
            "--api-key",
            &s.secrets.api_key,
            "--token-pool-file",
            pool.to_str().unwrap(),
            "--duration",
            "2",
            "--limit",
            "6",
            "--scenarios",
            "ws_fanout,resume",
        ]),
    )
    .await;
    assert_eq!(run.code, 0, "pool tokens connect every client");
    assert!(
        run.stdout.contains("missing 0 duplicated 0"),
        "{}",
        run.stdout
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_exits_1_when_events_are_lost() {
    let s = Server::start().await;
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("reports");
    let dropping = event_dropping_proxy(s.inst.addr).await;
    let run = tool(
        work.path(),
        &with(
            args(&[
                "drill",
                "--url",
                &format!("http://{dropping}"),
                "--profile",
                "quick",
                "--duration",
                "2",
                "--limit",
                "8",
                "--scenarios",
                "ws_fanout",
                "--drain-sec",
                "2",
                "--out-dir",
                out.to_str().unwrap(),
            ]),
            s.creds(),
        ),
    )
    .await;
    assert_eq!(run.code, 1, "drill must fail when events are lost");
    assert!(
        run.stdout.contains("zero-drop did NOT hold"),
        "{}",
        run.stdout
    );
    let r = reports(&out, "drill-quick-");
    assert_eq!(r.len(), 1, "the failed drill still writes its report");
    let rep: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&r[0]).unwrap()).unwrap();
    let fanout = &rep["scenarios"][0];
    assert_eq!(fanout["scenario"], "ws_fanout");
    // Seq 2 never reached any of the clients of the stream(s) it was published on.
    assert!(
        fanout["missing"].as_u64().unwrap() >= 1,
        "the lost event is counted: {fanout}"
    );
    assert!(fanout["clientsWithLoss"].as_u64().unwrap() >= 1, "{fanout}");
    assert!(rep["totals"]["missing"].as_u64().unwrap() >= 1);
    assert!(
        rep["breaches"]
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b.as_str().unwrap().contains("events lost")),
        "{}",
        rep["breaches"]
    );
    // The log itself is whole: the loss is on the way to the clients.
    assert_eq!(fanout["log"]["missing"], 0);
}

/// `capacity --url` reads the server's own figures: its connection limit (from
/// `/admin/snapshot`) bounds the plan, and its counters are recorded. The delivery ceiling
/// still comes from a drill report: a server does not measure its own, and the tool says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capacity_url_plans_with_the_servers_own_connection_limit() {
    use zerodrop_ops::instance::{Instance, Secrets, Spec};
    let dir = tempfile::tempdir().unwrap();
    let secrets = Secrets::generate();
    let mut spec = Spec::new(
        std::path::Path::new(support::BIN),
        &dir.path().join("data"),
        &secrets,
    );
    spec.args.extend(["--max-connections".into(), "300".into()]);
    let inst = Instance::start(spec).await.expect("zerodrop serve starts");
    let s = Server { inst, secrets, dir };
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("reports");
    let o = out.to_str().unwrap().to_string();
    let url = s.url();
    let capacity = |more: &[&str]| {
        let mut a = args(&[
            "capacity",
            "--expected-peak-streams",
            "1000",
            "--events-per-stream-per-sec",
            "0.1",
            "--sample-sec",
            "1",
            "--out-dir",
            &o,
        ]);
        a.extend(args(more));
        a
    };
    let admin = ["--admin-token", s.secrets.admin_token.as_str()];
    let with_url = [&["--url", url.as_str()][..], &admin[..]].concat();

    // No report yet, and an idle server has no delivery rate to offer: nothing to plan from.
    let none = tool(work.path(), &capacity(&with_url)).await;
    assert_eq!(none.code, 1, "{}", none.stdout);
    assert!(
        none.stdout.contains(&format!(
            "server {url}: 0 connection(s) open (ws 0, sse 0), 0.0 deliveries/s over 1.0 s; \
             connection limit 300 (from /admin/snapshot)"
        )),
        "{}",
        none.stdout
    );
    assert!(
        none.stderr.contains("no measurement to plan from")
            && none
                .stderr
                .contains("this one delivered nothing during the 1.0 s sample"),
        "{}",
        none.stderr
    );

    let drill = tool(
        work.path(),
        &with(
            args(&[
                "drill",
                "--url",
                &url,
                "--duration",
                "2",
                "--limit",
                "8",
                "--scenarios",
                "ws_fanout",
                "--out-dir",
                &o,
            ]),
            s.creds(),
        ),
    )
    .await;
    assert_eq!(drill.code, 0);
    let drill_report = reports(&out, "drill-quick-").pop().unwrap();
    let d: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&drill_report).unwrap()).unwrap();
    // The one capacity report written since the last call.
    let mut seen: Vec<std::path::PathBuf> = Vec::new();
    let mut read = |n: usize| -> serde_json::Value {
        let r = reports(&out, "capacity-");
        assert_eq!(r.len(), n, "{r:?}");
        let new: Vec<_> = r.into_iter().filter(|p| !seen.contains(p)).collect();
        assert_eq!(new.len(), 1, "{new:?}");
        seen.push(new[0].clone());
        serde_json::from_str(&std::fs::read_to_string(&new[0]).unwrap()).unwrap()
    };

    // With the server: 300 connections ÷ 2 subscribers per stream = 150 streams (the rate,
    // at 0.1 event/s per stream, allows far more); 1000 ÷ floor(150 × 0.7) → 10 instances.
    let ok = tool(work.path(), &capacity(&with_url)).await;
    assert_eq!(ok.code, 0, "{}", ok.stderr);
    assert!(
        ok.stdout.contains(&format!(
            "a server does not measure its own delivery ceiling: deliveries/s come from {}",
            drill_report.display()
        )),
        "{}",
        ok.stdout
    );
    let c = read(1);
    assert_eq!(c["perInstanceCapacity"], 150, "{c}");
    assert_eq!(c["instancesNeeded"], 10, "{c}");
    let b = &c["basis"];
    assert_eq!(b["source"], drill_report.display().to_string());
    assert_eq!(b["maxConnections"], 300);
    assert_eq!(b["maxConnectionsSource"], "server");
    assert_eq!(b["server"]["url"], url);
    assert_eq!(b["server"]["reachable"], true);
    assert_eq!(b["server"]["maxConnections"], 300);
    assert!(b["server"]["maxConnectionsError"].is_null(), "{b}");
    // The server wrote at least every event the drill's clients verified.
    assert!(
        b["server"]["eventsDeliveredTotal"].as_f64().unwrap()
            >= d["totals"]["delivered"].as_f64().unwrap(),
        "{b}"
    );
    assert!(d["totals"]["delivered"].as_u64().unwrap() > 0);

    // Without --url the model's default limit of 1,000 applies: 500 streams.
    let plain = tool(work.path(), &capacity(&[])).await;
    assert_eq!(plain.code, 0);
    let c = read(2);
    assert_eq!(c["perInstanceCapacity"], 500);
    assert_eq!(c["basis"]["maxConnectionsSource"], "default");
    assert!(c["basis"]["server"].is_null());

    // --url without the admin token: the limit cannot be read, and the tool says why.
    let no_admin = tool(work.path(), &capacity(&["--url", &url])).await;
    assert_eq!(no_admin.code, 0);
    assert!(
        no_admin
            .stdout
            .contains("connection limit not read: no admin token"),
        "{}",
        no_admin.stdout
    );
    let c = read(3);
    assert_eq!(c["perInstanceCapacity"], 500);
    assert_eq!(c["basis"]["maxConnectionsSource"], "default");
    assert!(
        c["basis"]["server"]["maxConnectionsError"]
            .as_str()
            .unwrap()
            .starts_with("no admin token")
    );

    // An explicit --max-connections wins over the server's.
    let flag = tool(
        work.path(),
        &capacity(&[&with_url[..], &["--max-connections", "200"][..]].concat()),
    )
    .await;
    assert_eq!(flag.code, 0);
    let c = read(4);
    assert_eq!(c["perInstanceCapacity"], 100);
    assert_eq!(c["basis"]["maxConnectionsSource"], "--max-connections");

    // A server that cannot be reached: said so, and the plan falls back to the report.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let gone = format!("http://{closed}");
    let off = tool(work.path(), &capacity(&["--url", &gone])).await;
    assert_eq!(off.code, 0);
    assert!(
        off.stdout
            .contains(&format!("server {gone}: could not be read")),
        "{}",
        off.stdout
    );
    let c = read(5);
    assert_eq!(c["perInstanceCapacity"], 500);
    assert_eq!(c["basis"]["server"]["reachable"], false);
}

/// What a newcomer types first, answered with what to type instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mistyped_first_commands_say_what_to_type_instead() {
    let work = tempfile::tempdir().unwrap();
    let quick = tool(work.path(), &args(&["drill", "--quick"])).await;
    assert_eq!(quick.code, 2);
    assert!(
        quick.stderr.contains("`--profile quick`"),
        "{}",
        quick.stderr
    );
    // A taken address names the setting that moves it.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let serve = tool(work.path(), &args(&["serve", "--listen", &addr])).await;
    assert_eq!(serve.code, 1);
    assert!(
        serve.stderr.contains("--listen") && serve.stderr.contains(&addr),
        "{}",
        serve.stderr
    );
}
