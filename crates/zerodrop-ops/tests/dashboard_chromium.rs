//! The dashboard rendered by a real headless Chromium: the screenshot is a real picture and
//! the key numbers are in the DOM the browser built. Chromium is required: when it is
//! missing this test fails and says how to install it (`.ci/run` installs it).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use zerodrop_ops::dashboard::{collect, render};
use zerodrop_ops::report::{DrillReport, Percentiles, ResumeStats, ScenarioReport, Totals};
use zerodrop_ops::slo::{SHIPPED, Slo};

fn chromium() -> PathBuf {
    let candidates = [
        std::env::var("ZERODROP_CHROMIUM").unwrap_or_default(),
        "/usr/bin/chromium".into(),
        "/usr/bin/chromium-browser".into(),
    ];
    candidates
        .iter()
        .filter(|c| !c.is_empty())
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| {
            panic!(
                "headless Chromium is required for the dashboard rendering test and was not found \
                 (looked at $ZERODROP_CHROMIUM, /usr/bin/chromium, /usr/bin/chromium-browser). \
                 Install it with `apt-get install -y chromium`; .ci/run does."
            )
        })
}

fn run(mut cmd: std::process::Command) -> std::process::Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start chromium");
    // Bounded: a hung browser is killed after 90 s.
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        if child.try_wait().expect("wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish within 90 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn browser(profile: &Path, page: &Path, extra: &[String]) -> std::process::Command {
    let mut c = std::process::Command::new(chromium());
    c.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--hide-scrollbars",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .args(extra)
    .arg(format!("file://{}", page.display()))
    .stdin(Stdio::null());
    c
}

fn report(at_ms: u64, ws_p95: f64, resume_rate: f64) -> DrillReport {
    let sc = |id: &str, p95: f64| ScenarioReport {
        scenario: id.into(),
        clients: 10,
        publishers: 1,
        published: 500,
        delivered: 5000,
        latency_ms: Percentiles {
            count: 5000,
            p50: p95 / 2.0,
            p95,
            p99: p95 * 1.6,
            max: p95 * 3.0,
        },
        resume: ResumeStats {
            attempts: 40,
            successes: (40.0 * resume_rate) as u64,
            success_rate: resume_rate,
            ..ResumeStats::default()
        },
        ..ScenarioReport::default()
    };
    DrillReport {
        tool: "drill".into(),
        profile: "quick".into(),
        finished_at_ms: at_ms,
        scenarios: vec![
            sc("publish", 4.5),
            sc("ws_fanout", ws_p95),
            sc("resume", 31.0),
        ],
        totals: Totals {
            published: 1500,
            delivered: 15000,
            resume_attempts: 80,
            resume_successes: (80.0 * resume_rate) as u64,
            resume_success_rate: resume_rate,
            delivered_per_sec: 4321.0,
            ..Totals::default()
        },
        ..DrillReport::default()
    }
}

#[test]
fn the_dashboard_renders_in_headless_chromium() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("reliability");
    zerodrop_ops::common::write_report(
        &out,
        "drill",
        Some("quick"),
        &report(1_795_000_000_000, 9.5, 1.0),
    )
    .unwrap();
    zerodrop_ops::common::write_report(
        &out,
        "drill",
        Some("burst"),
        &report(1_795_000_600_000, 12.34, 0.975),
    )
    .unwrap();
    let html = render(&collect(&out).unwrap(), &Slo::parse(SHIPPED).unwrap());
    let page = out.join("dashboard.html");
    std::fs::write(&page, html).unwrap();

    let png = dir.path().join("shot.png");
    let profile = dir.path().join("chromium-profile");
    let shot = run(browser(
        &profile,
        &page,
        &[
            format!("--screenshot={}", png.display()),
            "--window-size=1280,1800".into(),
        ],
    ));
    let bytes = std::fs::read(&png).unwrap_or_else(|e| {
        panic!(
            "no screenshot ({e}); chromium said: {}",
            String::from_utf8_lossy(&shot.stderr)
        )
    });
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "a PNG");
    // A blank 1280×1800 page compresses to a few KB; charts and text make it far larger.
    assert!(
        bytes.len() > 30_000,
        "screenshot looks empty: {} bytes",
        bytes.len()
    );

    let dom = run(browser(&profile, &page, &["--dump-dom".into()]));
    let dom = String::from_utf8_lossy(&dom.stdout);
    assert!(dom.contains("zerodrop reliability dashboard"), "{dom}");
    assert!(
        dom.contains("12.34 ms"),
        "latest ws_fanout p95 is in the DOM"
    );
    assert!(
        dom.contains("97.50%"),
        "latest resume success rate is in the DOM"
    );
    assert!(dom.contains("4321/s"), "throughput is in the DOM");
    assert!(dom.matches("<svg").count() >= 5, "charts are in the DOM");
    if let Ok(keep) = std::env::var("ZERODROP_KEEP_SCREENSHOT") {
        let _ = std::fs::copy(&png, keep);
    }
}
