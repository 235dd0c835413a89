//! `/metrics`: the SPEC's names in valid Prometheus text, and the exact JSON shape.

use std::collections::BTreeSet;

use serde_json::json;
use zerodrop_testkit::server::TestServer;
use zerodrop_testkit::ws::WsClient;

/// Checks the text exposition format line by line (what a Prometheus server parses):
/// `# HELP`/`# TYPE` comments, and `name{label="value",…} number` samples whose family has
/// a TYPE. Returns the sample names.
fn parse_exposition(text: &str) -> BTreeSet<String> {
    let mut typed = BTreeSet::new();
    let mut names = BTreeSet::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split(' ');
            let name = it.next().unwrap();
            let kind = it.next().unwrap();
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                "{line}"
            );
            typed.insert(name.to_string());
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        assert!(!line.starts_with('#'), "stray comment: {line}");
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("no value: {line}"));
        assert!(
            value.parse::<f64>().is_ok() || ["+Inf", "-Inf", "NaN"].contains(&value),
            "{line}"
        );
        let name = series.split('{').next().unwrap();
        assert!(
            name.chars()
                .enumerate()
                .all(|(i, c)| c.is_ascii_alphabetic()
                    || c == '_'
                    || c == ':'
                    || (i > 0 && c.is_ascii_digit())),
            "bad metric name in {line}"
        );
        if let Some(labels) = series.strip_prefix(name)
            && !labels.is_empty()
        {
            assert!(labels.starts_with('{') && labels.ends_with('}'), "{line}");
            for pair in labels[1..labels.len() - 1].split("\",") {
                let (k, v) = pair.split_once("=\"").unwrap_or_else(|| panic!("{line}"));
                assert!(
                    k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                    "{line}"
                );
                assert!(!v.contains('\n'), "{line}");
            }
        }
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| typed.contains(*f)))
            .unwrap_or(name);
        assert!(typed.contains(family), "sample without TYPE: {line}");
        names.insert(family.to_string());
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_names_and_json_shape() {
    let s = TestServer::start().await;
    let api = s.api();
    api.publish("room:1", json!(1)).await;
    api.read("room:1", 0, 10).await;
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
    let r = api.get("/metrics", None).await;
    assert_eq!(r.status, 200);
    assert!(
        r.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let names = parse_exposition(&r.text);
    for n in [
        "ws_active",
        "sse_active",
        "connections_total",
        "ws_reconnects_total",
        "resumes_total",
        "resume_failures_total",
        "dropped_messages_total",
        "events_published_total",
        "events_delivered_total",
        "events_replayed_total",
        "buffer_trims_total",
        "checkpoints_total",
        "upgrades_blocked_during_drain_total",
        "http_requests_total",
        "http_request_duration_seconds",
        "publish_to_deliver_seconds",
        "store_up",
        "store_durability",
        "drain_state",
    ] {
        assert!(
            names.contains(&format!("zerodrop_{n}")),
            "missing zerodrop_{n}:\n{}",
            r.text
        );
    }
    assert!(
        r.text
            .contains("# TYPE zerodrop_http_request_duration_seconds histogram")
    );
    assert!(
        r.text
            .contains("# TYPE zerodrop_publish_to_deliver_seconds histogram")
    );
    assert!(r.text.contains("zerodrop_http_requests_total{method=\"POST\",route=\"/v1/streams/{stream}/events\",status=\"201\"} 2"), "{}", r.text);
    assert!(!r.text.contains("room:1"), "raw paths never become labels");
    assert!(r.text.contains("zerodrop_events_published_total 2"));
    assert!(r.text.contains("zerodrop_events_delivered_total 2"));
    assert!(r.text.contains("zerodrop_events_replayed_total 1"));
    assert!(r.text.contains("zerodrop_ws_active 1"));
    assert!(r.text.contains("zerodrop_store_up 1"));
    // The JSON view, key for key.
    let m = api.metrics_json().await;
    let keys = |v: &serde_json::Value| {
        v.as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect::<BTreeSet<_>>()
    };
    assert_eq!(
        keys(&m),
        [
            "errors",
            "guard_metrics",
            "resume_store_metrics",
            "routes",
            "ws_metrics"
        ]
        .map(String::from)
        .into()
    );
    // The upstream side's figures, said to be off while no upstream is configured.
    assert_eq!(
        m["guard_metrics"],
        serde_json::json!({"rate_limited": 0, "jobs": {"enabled": false}})
    );
    assert_eq!(
        keys(&m["ws_metrics"]),
        [
            "ws_active",
            "sse_active",
            "ws_reconnects",
            "ws_resumes",
            "resume_failures",
            "dropped_messages",
            "rtt_p95_ms",
            "ws_upgrades_blocked_during_drain"
        ]
        .map(String::from)
        .into()
    );
    assert_eq!(
        keys(&m["resume_store_metrics"]),
        [
            "store",
            "up",
            "durability",
            "sessions",
            "streams",
            "buffer_trims",
            "buffer_trim_rate",
            "resume_success_rate"
        ]
        .map(String::from)
        .into()
    );
    assert_eq!(m["ws_metrics"]["ws_active"], 1);
    assert_eq!(m["resume_store_metrics"]["store"], "sqlite");
    assert_eq!(m["resume_store_metrics"]["up"], true);
    assert_eq!(m["resume_store_metrics"]["durability"], "fsync");
    assert_eq!(m["resume_store_metrics"]["sessions"], 1);
    assert_eq!(m["resume_store_metrics"]["streams"], 1);
    assert_eq!(m["resume_store_metrics"]["resume_success_rate"], 1.0);
    let route = &m["routes"]["POST /v1/streams/{stream}/events"];
    assert_eq!(route["count"], 2);
    assert_eq!(route["status"]["201"], 2);
    for q in ["p50_ms", "p95_ms", "p99_ms"] {
        assert!(route[q].as_f64().unwrap() > 0.0);
    }
    assert_eq!(m["errors"]["INVALID_RESUME_TOKEN"], 0);
    assert_eq!(m["errors"]["RECONNECT_WINDOW_EXPIRED"], 0);
    // A route not called yet is listed at zero with its success status.
    assert_eq!(
        m["routes"]["POST /v1/sessions/{id}/reconnect"],
        json!({"count": 0, "status": {"200": 0}, "p50_ms": 0.0, "p95_ms": 0.0, "p99_ms": 0.0})
    );
    let r = api.get("/metrics?format=xml", None).await;
    assert_eq!((r.status, r.code()), (400, "INVALID_REQUEST"));
}
