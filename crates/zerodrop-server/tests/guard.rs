//! The upstream side end to end (SPEC §7): webhook intake, the job queue delivering to a real
//! local upstream that fails, slows down and recovers on command, circuits with failover,
//! bulkheads, the response cache, and the admin views — on SQLite and on a real Redis.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use zerodrop_server::config::{StoreChoice, UpstreamConfig, WebhookConfig};
use zerodrop_server::guard::config::QosClassSetting;
use zerodrop_store::QosClass;
use zerodrop_testkit::http::Resp;
use zerodrop_testkit::redis::RedisServer;
use zerodrop_testkit::server::TestServer;
use zerodrop_testkit::upstream::{FakeUpstream, Mode};
use zerodrop_testkit::ws::WsClient;

#[derive(Clone, Copy, Debug)]
enum Kind {
    Sqlite,
    Redis,
}

struct Setup {
    s: TestServer,
    _redis: Option<RedisServer>,
}

async fn server(kind: Kind, f: impl FnOnce(&mut zerodrop_server::Config)) -> Setup {
    let redis = match kind {
        Kind::Sqlite => None,
        Kind::Redis => Some(RedisServer::start().expect("start redis-server")),
    };
    let url = redis.as_ref().map(|r| r.url());
    let s = TestServer::with(|c| {
        if let Some(u) = url {
            c.store = StoreChoice::Redis;
            c.redis_url = u;
        }
        // Fast retries, so that a test sees several attempts in well under a second.
        c.guard.jobs.retry.base_ms = 20;
        c.guard.jobs.retry.cap_ms = 100;
        f(c)
    })
    .await;
    Setup { s, _redis: redis }
}

/// A fake upstream, and a server configured knowing its URL.
async fn with_upstream(
    kind: Kind,
    f: impl FnOnce(&mut zerodrop_server::Config, &str),
) -> (FakeUpstream, Setup) {
    let up = FakeUpstream::start().await;
    let url = up.url.clone();
    let setup = server(kind, move |c| f(c, &url)).await;
    (up, setup)
}

/// Panics unless `/metrics` has every one of `lines` (series and value).
async fn metrics_have(s: &TestServer, lines: &[&str]) {
    let m = s.api().get("/metrics", None).await.text;
    for l in lines {
        assert!(m.lines().any(|x| x == *l), "no `{l}` in {m}");
    }
}

fn upstream(url: &str) -> UpstreamConfig {
    UpstreamConfig {
        primary: url.to_string(),
        ..UpstreamConfig::default()
    }
}

async fn webhook(s: &TestServer, source: &str, id: &str, body: Value) -> Resp {
    s.api()
        .request(
            Method::POST,
            &format!("/v1/webhooks/{source}"),
            Some(&s.creds.api_key),
            Some(body.to_string()),
            &[("idempotency-key", id)],
        )
        .await
}

async fn admin(s: &TestServer, path: &str) -> Value {
    let r = s.api().get(path, Some(&s.creds.admin_token)).await;
    assert_eq!(r.status, 200, "{path}: {}", r.text);
    r.json
}

/// Waits (bounded) until the admin view at `path` satisfies `pred`.
async fn admin_until(
    s: &TestServer,
    path: &str,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = std::time::Instant::now() + zerodrop_testkit::WAIT;
    loop {
        let v = admin(s, path).await;
        if pred(&v) {
            return v;
        }
        assert!(std::time::Instant::now() < deadline, "{what}: {v:#}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn intake_dedupes_and_never_runs_twice(kind: Kind) {
    let Setup { s, _redis } = server(kind, |c| {
        c.guard.webhooks.insert(
            "shop".into(),
            WebhookConfig {
                stream: Some("hooks:shop".into()),
                ..WebhookConfig::default()
            },
        );
        c.guard.webhooks.insert(
            "gh".into(),
            WebhookConfig {
                stream: Some("hooks:gh".into()),
                id_pointer: Some("/delivery/id".into()),
                scope: Some("github".into()),
                ..WebhookConfig::default()
            },
        );
    })
    .await;
    let first = webhook(&s, "shop", "m-1", json!({"order": 1})).await;
    assert_eq!(first.status, 202, "{}", first.text);
    assert_eq!(
        (
            &first.json["duplicate"],
            &first.json["hitCount"],
            &first.json["seq"]
        ),
        (&json!(false), &json!(0), &json!(1))
    );
    assert_eq!(first.json["messageId"], "m-1");
    assert_eq!(first.json["scope"], "shop");
    // A retry by the provider: the first answer, counted.
    for n in 1..=2 {
        let again = webhook(&s, "shop", "m-1", json!({"order": 1})).await;
        assert_eq!(again.status, 202);
        assert_eq!(again.json["duplicate"], true);
        assert_eq!(again.json["hitCount"], n);
        assert_eq!(again.json["seq"], 1, "the first answer");
    }
    // The same id with another body.
    let reused = webhook(&s, "shop", "m-1", json!({"order": 2})).await;
    assert_eq!(
        (reused.status, reused.code()),
        (422, "IDEMPOTENCY_KEY_REUSED")
    );
    // Concurrent duplicates of a new id: one runs, the others are answered as duplicates
    // (or told the first is still running); the stream gets the event once.
    let mut tasks = Vec::new();
    for _ in 0..12 {
        let api = s.api();
        let key = s.creds.api_key.clone();
        tasks.push(tokio::spawn(async move {
            api.request(
                Method::POST,
                "/v1/webhooks/shop",
                Some(&key),
                Some(json!({"order": 3}).to_string()),
                &[("idempotency-key", "m-2")],
            )
            .await
        }));
    }
    let mut fresh = 0;
    for t in tasks {
        let r = t.await.unwrap();
        match (r.status, r.json["duplicate"].as_bool()) {
            (202, Some(false)) => fresh += 1,
            (202, Some(true)) => assert_eq!(r.json["seq"], 2),
            (409, _) => {
                assert_eq!(r.code(), "IDEMPOTENCY_IN_PROGRESS");
                assert!(r.headers.get("retry-after").is_some());
            }
            other => panic!("unexpected answer {other:?}: {}", r.text),
        }
    }
    assert_eq!(fresh, 1, "exactly one of the concurrent duplicates ran");
    let events = s.api().read("hooks:shop", 0, 100).await.json;
    let data: Vec<&Value> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["data"])
        .collect();
    assert_eq!(data, vec![&json!({"order": 1}), &json!({"order": 3})]);
    // The id at a JSON pointer, deduplicated in the source's own scope.
    let body = json!({"delivery": {"id": 77}, "x": 1});
    let r = webhook(&s, "gh", "ignored", body.clone()).await;
    assert_eq!(
        (r.status, &r.json["messageId"], &r.json["scope"]),
        (202, &json!("77"), &json!("github"))
    );
    let r = webhook(&s, "gh", "other-header", body).await;
    assert_eq!(
        r.json["duplicate"], true,
        "the header is not this source's id"
    );
    // Bad input: a typed error each, nothing stored.
    let r = webhook(&s, "gh", "x", json!({"delivery": {}})).await;
    assert_eq!((r.status, r.code()), (400, "INVALID_REQUEST"));
    assert!(
        r.json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("/delivery/id")
    );
    let r = s
        .api()
        .request(
            Method::POST,
            "/v1/webhooks/shop",
            Some(&s.creds.api_key),
            Some("{nope".into()),
            &[("idempotency-key", "m-9")],
        )
        .await;
    assert_eq!((r.status, r.code()), (400, "INVALID_REQUEST"));
    let r = s
        .api()
        .request(
            Method::POST,
            "/v1/webhooks/shop",
            Some(&s.creds.api_key),
            Some("{}".into()),
            &[],
        )
        .await;
    assert_eq!(
        (r.status, r.code()),
        (400, "INVALID_REQUEST"),
        "no message id"
    );
    let r = webhook(&s, "nobody", "m-1", json!({})).await;
    assert_eq!((r.status, r.code()), (404, "NOT_FOUND"));
    let r = s
        .api()
        .request(
            Method::POST,
            "/v1/webhooks/shop",
            None,
            Some("{}".into()),
            &[("idempotency-key", "m-8")],
        )
        .await;
    assert_eq!((r.status, r.code()), (401, "UNAUTHORIZED"));
    assert_eq!(s.api().info("hooks:shop").await["headSeq"], 2);
    // The admin listing: keys with their hit counts, publish keys included.
    let keys = admin(&s, "/admin/idempotency?scope=shop&limit=50").await;
    let listed: Vec<(String, u64)> = keys["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| {
            (
                k["key"].as_str().unwrap().to_string(),
                k["hitCount"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(listed.len(), 2, "{keys:#}");
    assert!(listed.contains(&("m-1".into(), 2)), "{listed:?}");
    assert!(
        listed.iter().any(|(k, n)| k == "m-2" && *n == 11),
        "{listed:?}"
    );
    for _ in 0..2 {
        let r = s
            .api()
            .request(
                Method::POST,
                "/v1/streams/orders/events",
                Some(&s.creds.api_key),
                Some(json!({"data": 1}).to_string()),
                &[("idempotency-key", "p-1")],
            )
            .await;
        assert_eq!(r.status, 201);
    }
    let keys = admin(&s, "/admin/idempotency?scope=publish:orders").await;
    assert_eq!(keys["keys"][0]["key"], "p-1");
    assert_eq!(keys["keys"][0]["hitCount"], 1);
    let snap = admin(&s, "/admin/snapshot").await;
    assert_eq!(snap["idempotency"]["byScope"]["shop"]["hitCount"], 13);
    assert_eq!(snap["idempotency"]["byScope"]["publish:orders"]["keys"], 1);
    metrics_have(
        &s,
        &["zerodrop_webhooks_total{source=\"shop\",result=\"reused\"} 1"],
    )
    .await;
}

async fn deliveries_retry_dead_letter_and_requeue(kind: Kind) {
    let (up, Setup { s, _redis }) = with_upstream(kind, |c, url| {
        c.guard.jobs.retry.max_attempts = 3;
        c.guard.upstreams.insert(
            "app".into(),
            UpstreamConfig {
                deliver_path: "/hooks".into(),
                ..upstream(url)
            },
        );
        c.guard.webhooks.insert(
            "pay".into(),
            WebhookConfig {
                upstream: Some("app".into()),
                class: QosClassSetting(QosClass::Batch),
                ..WebhookConfig::default()
            },
        );
    })
    .await;
    // Delivered once, with the message's dedupe key, however often the provider retries.
    let r = webhook(&s, "pay", "evt-1", json!({"amount": 5})).await;
    assert_eq!(r.status, 202, "{}", r.text);
    let job = r.json["jobId"].as_u64().unwrap();
    assert_eq!(
        webhook(&s, "pay", "evt-1", json!({"amount": 5})).await.json["jobId"],
        job
    );
    let got = up.wait_until("one delivery", |r| !r.is_empty()).await;
    let d = &got[0];
    assert_eq!((d.method.as_str(), d.target.as_str()), ("POST", "/hooks"));
    assert_eq!(d.header("idempotency-key"), Some("webhook:pay:evt-1"));
    assert_eq!(d.header("x-zerodrop-job"), Some(job.to_string().as_str()));
    assert_eq!(d.header("x-zerodrop-attempt"), Some("1"));
    assert_eq!(d.header("x-zerodrop-kind"), Some("webhook:pay"));
    assert_eq!(
        d.json(),
        json!({"source": "pay", "messageId": "evt-1", "data": {"amount": 5}})
    );
    admin_until(&s, "/admin/jobs", "the job is done", |v| {
        v["byStatus"]["done"] == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        up.count(),
        1,
        "a duplicate webhook is never delivered again"
    );
    // A failing upstream: every attempt, then a dead letter.
    up.set(Mode::Status(503));
    let r = webhook(&s, "pay", "evt-2", json!({"amount": 6})).await;
    let dead_id = r.json["jobId"].as_u64().unwrap();
    let jobs = admin_until(&s, "/admin/jobs?status=dead", "a dead letter", |v| {
        v["byStatus"]["dead"] == 1
    })
    .await;
    let attempts: Vec<String> = up
        .received()
        .iter()
        .filter(|d| d.header("x-zerodrop-job") == Some(dead_id.to_string().as_str()))
        .map(|d| d.header("x-zerodrop-attempt").unwrap().to_string())
        .collect();
    assert_eq!(attempts, vec!["1", "2", "3"], "max attempts, then no more");
    let dead = &jobs["recentDeadLetters"][0];
    assert_eq!(dead["id"], dead_id);
    assert_eq!(dead["attempts"], 3);
    assert!(
        dead["lastError"].as_str().unwrap().contains("503"),
        "{dead}"
    );
    assert_eq!(jobs["jobs"][0]["id"], dead_id);
    assert!(
        jobs["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["alert"] == "dead_letters")
    );
    // A permanent refusal goes to the dead letters at once.
    up.set(Mode::Status(400));
    let r = webhook(&s, "pay", "evt-3", json!({"amount": 7})).await;
    let perm = r.json["jobId"].as_u64().unwrap();
    admin_until(&s, "/admin/jobs", "two dead letters", |v| {
        v["byStatus"]["dead"] == 2
    })
    .await;
    let n = up
        .received()
        .iter()
        .filter(|d| d.header("x-zerodrop-job") == Some(perm.to_string().as_str()))
        .count();
    assert_eq!(n, 1);
    // Requeue: unknown ids are 404; a dead letter goes back and, the upstream healed, is done.
    let post = |path: String| {
        let api = s.api();
        let tok = s.creds.admin_token.clone();
        async move { api.post(&path, Some(&tok), json!({})).await }
    };
    for bad in ["999999", "abc"] {
        let r = post(format!("/admin/jobs/dead-letters/{bad}/requeue")).await;
        assert_eq!((r.status, r.code()), (404, "NOT_FOUND"), "{bad}");
    }
    let r = post(format!("/admin/jobs/dead-letters/{job}/requeue")).await;
    assert_eq!(
        (r.status, r.code()),
        (404, "NOT_FOUND"),
        "a done job is not a dead letter"
    );
    up.set(Mode::Ok);
    let r = post(format!("/admin/jobs/dead-letters/{dead_id}/requeue")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["requeued"], true);
    admin_until(&s, "/admin/jobs", "the requeued job is done", |v| {
        v["byStatus"]["done"] == 2 && v["byStatus"]["dead"] == 1
    })
    .await;
    let j = s.api().metrics_json().await["guard_metrics"]["jobs"].clone();
    assert_eq!(
        (&j["enabled"], &j["dead_letters"], &j["backlog"]["batch"]),
        (&json!(true), &json!(1), &json!(0)),
        "{j}"
    );
    let last = up.received().into_iter().last().unwrap();
    assert_eq!(
        last.header("x-zerodrop-job"),
        Some(dead_id.to_string().as_str())
    );
    assert_eq!(
        last.header("x-zerodrop-attempt"),
        Some("4"),
        "attempts go on counting after a requeue"
    );
    // The metrics say the same.
    let deadline = std::time::Instant::now() + zerodrop_testkit::WAIT;
    loop {
        let m = s.api().get("/metrics", None).await.text;
        if m.contains("zerodrop_jobs_dead_letters 1")
            && m.contains("zerodrop_jobs_completed_total{upstream=\"app\"} 2")
        {
            assert!(
                m.contains("zerodrop_jobs_failed_total{upstream=\"app\",outcome=\"dead\"} 2"),
                "{m}"
            );
            assert!(
                m.contains("zerodrop_jobs_failed_total{upstream=\"app\",outcome=\"retry\"} 2"),
                "{m}"
            );
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{m}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn tight_circuit(u: &mut UpstreamConfig) {
    u.circuit.window_size = 4;
    u.circuit.min_calls = 2;
    u.circuit.failure_rate_pct = 50.0;
    u.circuit.cooldown_ms = 400;
    u.circuit.half_open_trials = 1;
    u.cache_ttl_sec = 0;
}

async fn get(s: &TestServer, path: &str) -> Resp {
    s.api().get(path, Some(&s.creds.api_key)).await
}

fn target(r: &Resp) -> &str {
    r.headers
        .get("x-zerodrop-upstream-target")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

async fn circuits_open_fail_over_and_close(kind: Kind) {
    let primary = FakeUpstream::start().await;
    let secondary = FakeUpstream::start().await;
    let lone = FakeUpstream::start().await;
    let (p, sec, l) = (primary.url.clone(), secondary.url.clone(), lone.url.clone());
    let Setup { s, _redis } = server(kind, move |c| {
        let mut app = UpstreamConfig {
            secondary: Some(sec),
            ..upstream(&p)
        };
        tight_circuit(&mut app);
        c.guard.upstreams.insert("app".into(), app);
        let mut one = upstream(&l);
        tight_circuit(&mut one);
        one.circuit.slow_call_ms = 50;
        one.circuit.slow_call_rate_pct = 50.0;
        c.guard.upstreams.insert("one".into(), one);
    })
    .await;
    let r = get(&s, "/v1/upstreams/app/items/1?x=2").await;
    assert_eq!((r.status, target(&r)), (200, "primary"));
    assert_eq!(primary.received()[0].target, "/items/1?x=2");
    primary.set(Mode::Status(500));
    // Before the call that opens the circuit: the open state is younger than this.
    let opened = std::time::Instant::now();
    // The upstream's 5xx passes through, and counts against the circuit.
    let r = get(&s, "/v1/upstreams/app/items/1").await;
    assert_eq!((r.status, target(&r)), (500, "primary"));
    // 1 of 2 failed (≥ 50 %, min 2 calls): open; calls fail over to the secondary.
    let before = primary.count();
    let r = get(&s, "/v1/upstreams/app/items/1").await;
    assert_eq!((r.status, target(&r)), (200, "secondary"), "{}", r.text);
    assert_eq!(primary.count(), before, "an open circuit makes no call");
    let c = admin(&s, "/admin/circuits?limit=20").await;
    let state = |c: &Value, up: &str, t: &str| {
        c["circuits"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["upstream"] == up && x["target"] == t)
            .map(|x| x["state"].as_str().unwrap().to_string())
            .unwrap()
    };
    assert_eq!(state(&c, "app", "primary"), "open");
    assert_eq!(state(&c, "app", "secondary"), "closed");
    assert_eq!(
        admin(&s, "/admin/circuits?limit=1").await["circuits"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    // The gauge follows the breaker: open (2) until the cooldown (400 ms) has passed, when
    // time alone makes it half-open (1) — which a loaded machine may reach before this read.
    let m = s.api().get("/metrics", None).await.text;
    let gauge = m
        .lines()
        .find_map(|l| {
            l.strip_prefix("zerodrop_circuit_state{upstream=\"app\",target=\"primary\"} ")
        })
        .unwrap_or_else(|| panic!("no circuit gauge in {m}"));
    if opened.elapsed() < Duration::from_millis(400) {
        assert_eq!(gauge, "2", "open");
    } else {
        assert!(
            gauge == "2" || gauge == "1",
            "open or half-open, got {gauge}"
        );
    }
    // After the cooldown, with no traffic meanwhile, the next call is a trial on the primary;
    // it succeeds and the circuit closes.
    primary.set(Mode::Ok);
    tokio::time::sleep(Duration::from_millis(450)).await;
    assert_eq!(
        state(&admin(&s, "/admin/circuits").await, "app", "primary"),
        "half_open",
        "never stuck open"
    );
    let r = get(&s, "/v1/upstreams/app/items/1").await;
    assert_eq!((r.status, target(&r)), (200, "primary"));
    assert_eq!(
        state(&admin(&s, "/admin/circuits").await, "app", "primary"),
        "closed"
    );
    // Slow calls open a circuit too; with no secondary the answer is 503 with Retry-After.
    lone.set(Mode::Slow(Duration::from_millis(120)));
    for _ in 0..2 {
        assert_eq!(get(&s, "/v1/upstreams/one/x").await.status, 200);
    }
    let r = get(&s, "/v1/upstreams/one/x").await;
    assert_eq!(
        (r.status, r.code()),
        (503, "UPSTREAM_UNAVAILABLE"),
        "{}",
        r.text
    );
    assert_eq!(r.headers.get("retry-after").unwrap(), "1");
    let c = admin(&s, "/admin/circuits").await;
    let one = c["circuits"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["upstream"] == "one")
        .unwrap()
        .clone();
    assert_eq!(one["state"], "open");
    assert_eq!(one["slowCallRatePct"], 100.0);
    // Unknown upstream, no credential.
    assert_eq!(get(&s, "/v1/upstreams/nope/x").await.code(), "NOT_FOUND");
    assert_eq!(s.api().get("/v1/upstreams/app/x", None).await.status, 401);
}

async fn bulkheads_and_the_cache(kind: Kind) {
    let (up, Setup { s, _redis }) = with_upstream(kind, |c, url| {
        let mut u = upstream(url);
        u.bulkhead.max_in_flight = 1;
        u.cache_ttl_sec = 60;
        u.cache_namespace = Some("catalog".into());
        c.guard.upstreams.insert("app".into(), u);
    })
    .await;
    // Cached: the second GET is answered without a call.
    let a = get(&s, "/v1/upstreams/app/items").await;
    let b = get(&s, "/v1/upstreams/app/items").await;
    assert_eq!(a.headers.get("x-zerodrop-cache").unwrap(), "miss");
    assert_eq!(b.headers.get("x-zerodrop-cache").unwrap(), "hit");
    assert_eq!(a.json, b.json);
    assert_eq!(up.count(), 1);
    let cache = admin(&s, "/admin/cache?limit=5000").await;
    assert_eq!(cache["enabled"], true);
    assert_eq!(cache["byNamespace"]["catalog"]["entries"], 1);
    assert_eq!(cache["byNamespace"]["catalog"]["hits"], 1);
    assert_eq!(cache["entries"][0]["key"], "* /items");
    // A connect token's answers are cached per user.
    let tok = s.creds.upstream_token("u1", &["app"]);
    let r = s.api().get("/v1/upstreams/app/items", Some(&tok)).await;
    assert_eq!(r.headers.get("x-zerodrop-cache").unwrap(), "miss");
    assert_eq!(up.received()[1].header("x-zerodrop-sub"), Some("u1"));
    // Clearing.
    let del = |ns: &'static str| {
        let api = s.api();
        let t = s.creds.admin_token.clone();
        async move {
            api.request(
                Method::DELETE,
                &format!("/admin/cache/{ns}"),
                Some(&t),
                None,
                &[],
            )
            .await
        }
    };
    let r = del("catalog").await;
    assert_eq!(
        (r.status, &r.json),
        (200, &json!({"namespace": "catalog", "cleared": 2}))
    );
    let r = del("catalog").await;
    assert_eq!(
        (r.status, &r.json),
        (200, &json!({"namespace": "catalog", "cleared": 0}))
    );
    assert_eq!(
        get(&s, "/v1/upstreams/app/items")
            .await
            .headers
            .get("x-zerodrop-cache")
            .unwrap(),
        "miss"
    );
    // The bulkhead: one call in flight; a second meanwhile is 503 OVER_CAPACITY.
    up.set(Mode::Slow(Duration::from_millis(600)));
    let api = s.api();
    let key = s.creds.api_key.clone();
    let slow = tokio::spawn(async move { api.get("/v1/upstreams/app/slow", Some(&key)).await });
    let v = admin_until(
        &s,
        "/admin/bulkheads?provider=app&limit=100",
        "one call in flight",
        |v| v["inFlightByProvider"]["app"] == 1,
    )
    .await;
    assert_eq!(v["bulkheads"][0]["max"], 1);
    assert_eq!(v["bulkheads"][0]["leases"].as_array().unwrap().len(), 1);
    let r = get(&s, "/v1/upstreams/app/other").await;
    assert_eq!((r.status, r.code()), (503, "OVER_CAPACITY"), "{}", r.text);
    assert!(r.headers.get("retry-after").is_some());
    assert_eq!(slow.await.unwrap().status, 200);
    assert_eq!(
        admin(&s, "/admin/snapshot").await["bulkheads"]["inFlightByProvider"]["app"],
        0
    );
    let r = s
        .api()
        .get("/admin/bulkheads?provider=nope", Some(&s.creds.admin_token))
        .await;
    assert_eq!(r.code(), "NOT_FOUND");
    metrics_have(
        &s,
        &[
            "zerodrop_bulkhead_rejected_total{upstream=\"app\"} 1",
            "zerodrop_cache_requests_total{namespace=\"catalog\",result=\"hit\"} 1",
        ],
    )
    .await;
}

async fn client_publishes_on_bound_streams_reach_the_upstream(kind: Kind) {
    let (up, Setup { s, _redis }) = with_upstream(kind, |c, url| {
        let mut u = upstream(url);
        u.streams = vec!["orders:*".into()];
        c.guard.upstreams.insert("app".into(), u);
    })
    .await;
    let tok = s
        .creds
        .token("u7", &["orders:*", "chat"], &["orders:*", "chat"]);
    let mut c = WsClient::connect(&format!("{}/v1/ws?token={tok}", s.ws_url()))
        .await
        .unwrap();
    c.expect("welcome").await;
    c.send(json!({"type":"publish","stream":"orders:1","data":{"n":1},"id":"a"}))
        .await;
    let p = c.expect("published").await;
    assert_eq!(
        (p["seq"].as_u64(), p["jobId"].is_u64()),
        (Some(1), true),
        "{p}"
    );
    // A retried frame is one append and one delivery.
    c.send(json!({"type":"publish","stream":"orders:1","data":{"n":1},"id":"a"}))
        .await;
    assert_eq!(c.expect("published").await["jobId"], p["jobId"]);
    c.send(json!({"type":"publish","stream":"chat","data":2}))
        .await;
    let q = c.expect("published").await;
    assert!(q.get("jobId").is_none(), "not upstream-bound: {q}");
    let got = up.wait_until("the delivery", |r| !r.is_empty()).await;
    let body = got[0].json();
    assert_eq!(
        (&body["stream"], &body["seq"], &body["sub"], &body["data"]),
        (
            &json!("orders:1"),
            &json!(1),
            &json!("u7"),
            &json!({"n": 1})
        )
    );
    admin_until(&s, "/admin/jobs", "done", |v| v["byStatus"]["done"] == 1).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(up.count(), 1);
    assert_eq!(s.api().info("orders:1").await["headSeq"], 1);
}

macro_rules! on_both_stores {
    ($($name:ident;)*) => {
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::Kind::Sqlite).await })*
        }
        mod redis {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::Kind::Redis).await })*
        }
    };
}

on_both_stores! {
    intake_dedupes_and_never_runs_twice;
    deliveries_retry_dead_letter_and_requeue;
    circuits_open_fail_over_and_close;
    bulkheads_and_the_cache;
    client_publishes_on_bound_streams_reach_the_upstream;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unconfigured_guard_says_so_in_the_snapshot() {
    let s = TestServer::start().await;
    let snap = admin(&s, "/admin/snapshot").await;
    assert_eq!(snap["circuits"]["enabled"], false);
    assert_eq!(snap["bulkheads"]["enabled"], false);
    assert_eq!(snap["jobs"]["enabled"], false);
    assert_eq!(snap["cache"]["enabled"], false);
    assert_eq!(snap["rateLimit"]["enabled"], false);
    assert_eq!(snap["config"]["regionTopology"]["mode"], "single-instance");
    assert_eq!(
        snap["config"]["regionTopology"]["instance"],
        snap["config"]["instance"]
    );
    assert_eq!(admin(&s, "/admin/jobs").await["enabled"], false);
    let g = s.api().metrics_json().await["guard_metrics"].clone();
    assert_eq!(g, json!({"rate_limited": 0, "jobs": {"enabled": false}}));
    assert_eq!(admin(&s, "/admin/circuits").await["circuits"], json!([]));
}

/// The hostile forms of a path that climbs out of the upstream's base, as a client can send
/// them (byte for byte: a URL-parsing client would fold some of them before sending).
const ESCAPES: [&str; 10] = [
    "..%2Fsecret",
    "../secret",
    "%2E%2E/secret",
    "%2e%2e/secret",
    "ok/..%2F..%2Finternal%2Fadmin",
    "ok/../../internal/admin",
    "./secret",
    "..%5Csecret",
    "%252E%252E/secret",
    "a%2fb",
];

/// A client path goes only below the upstream's base URL: every way out is 400
/// `INVALID_REQUEST` before any call, for any credential, and the upstream never sees a path
/// outside `/api`. Who may call: the api key, a token whose `upstreams` claim names the
/// upstream (or a prefix of it), any token for a `public` upstream; else 403.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_paths_stay_under_the_base_and_need_a_grant() {
    let up = FakeUpstream::start().await;
    let base = format!("{}/api", up.url);
    let Setup { s, _redis } = server(Kind::Sqlite, |c| {
        let mut app = upstream(&base);
        app.cache_ttl_sec = 0;
        c.guard.upstreams.insert("app".into(), app);
        let open = UpstreamConfig {
            public: true,
            ..upstream(&format!("{}/pub", up.url))
        };
        c.guard.upstreams.insert("open".into(), open);
    })
    .await;
    let plain = s.token("mallory", &[]);
    let granted = s.creds.upstream_token("u1", &["app"]);
    let by_prefix = s.creds.upstream_token("u2", &["ap*"]);
    let other = s.creds.upstream_token("u3", &["billing"]);
    let key = s.creds.api_key.clone();
    let raw = |target: String, cred: String| {
        let addr = s.addr;
        async move {
            let auth = format!("Bearer {cred}");
            zerodrop_testkit::raw::get(addr, &target, &[("authorization", auth.as_str())]).await
        }
    };
    // The grant: a token that does not name the upstream is refused before anything else.
    for (who, t) in [("no claim", &plain), ("another upstream", &other)] {
        let r = raw("/v1/upstreams/app/items".into(), t.clone()).await;
        assert_eq!(
            (r.status, r.code()),
            (403, "FORBIDDEN"),
            "{who}: {}",
            r.text
        );
        assert_eq!(r.json["error"]["upstream"], "app");
        let r = raw("/v1/upstreams/nope/x".into(), t.clone()).await;
        assert_eq!(
            (r.status, r.code()),
            (403, "FORBIDDEN"),
            "{who}: an unknown name is not told apart: {}",
            r.text
        );
    }
    for t in [&granted, &by_prefix, &key] {
        let r = raw("/v1/upstreams/app/items/1?x=2".into(), t.clone()).await;
        assert_eq!(r.status, 200, "{}", r.text);
    }
    assert_eq!(up.received()[0].target, "/api/items/1?x=2");
    assert_eq!(
        up.received()[0].header("x-zerodrop-sub"),
        Some("u1"),
        "the caller's sub goes along"
    );
    let r = raw("/v1/upstreams/open/x".into(), plain.clone()).await;
    assert_eq!(
        r.status, 200,
        "a public upstream takes any token: {}",
        r.text
    );
    assert_eq!(up.received().last().unwrap().target, "/pub/x");
    let r = raw("/v1/upstreams/nope/x".into(), key.clone()).await;
    assert_eq!((r.status, r.code()), (404, "NOT_FOUND"));
    let r = raw("/v1/upstreams/app/x".into(), "not-a-jwt".into()).await;
    assert_eq!((r.status, r.code()), (401, "UNAUTHORIZED"));
    // Every way out: refused, typed, and nothing is called.
    let before = up.count();
    for esc in ESCAPES {
        for (who, t) in [("token", &granted), ("api key", &key)] {
            let r = raw(format!("/v1/upstreams/app/{esc}"), t.clone()).await;
            assert_eq!(
                (r.status, r.code()),
                (400, "INVALID_REQUEST"),
                "{who} {esc}: {}",
                r.text
            );
            assert!(r.json["error"]["message"].is_string(), "{}", r.text);
        }
        let r = raw(format!("/v1/upstreams/open/{esc}"), plain.clone()).await;
        assert_eq!(r.status, 400, "{esc} on a public upstream: {}", r.text);
    }
    assert_eq!(up.count(), before, "no escape reached the upstream");
    // Dots inside a name, encoded characters and an empty segment are ordinary paths.
    for (path, want) in [
        ("v1.2/file.json", "/api/v1.2/file.json"),
        ("a%20b/...", "/api/a%20b/..."),
        ("x/", "/api/x/"),
    ] {
        let r = raw(format!("/v1/upstreams/app/{path}"), key.clone()).await;
        assert_eq!(r.status, 200, "{path}: {}", r.text);
        assert_eq!(up.received().last().unwrap().target, want);
    }
    for r in up.received() {
        assert!(
            r.target.starts_with("/api/") || r.target.starts_with("/pub/"),
            "the upstream got a path outside its base: {}",
            r.target
        );
    }
}

/// `zerodrop_circuit_state` follows a breaker that time alone moves: open, then half-open
/// once the cooldown is over, with no call and no admin read in between.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_circuit_gauge_turns_half_open_with_no_traffic() {
    let (up, Setup { s, _redis }) = with_upstream(Kind::Sqlite, |c, url| {
        let mut u = upstream(url);
        tight_circuit(&mut u);
        c.guard.upstreams.insert("app".into(), u);
    })
    .await;
    up.set(Mode::Status(500));
    for _ in 0..2 {
        assert_eq!(get(&s, "/v1/upstreams/app/x").await.status, 500);
    }
    let gauge = "zerodrop_circuit_state{upstream=\"app\",target=\"primary\"}";
    metrics_have(&s, &[&format!("{gauge} 2")]).await;
    // The cooldown is 400 ms; nothing but scrapes meanwhile.
    tokio::time::sleep(Duration::from_millis(600)).await;
    metrics_have(&s, &[&format!("{gauge} 1")]).await;
    let c = admin(&s, "/admin/circuits").await;
    assert_eq!(c["circuits"][0]["state"], "half_open", "{c}");
    assert_eq!(up.count(), 2, "no call was made");
    // And back: a good trial closes it, and the gauge says so.
    up.set(Mode::Ok);
    assert_eq!(get(&s, "/v1/upstreams/app/x").await.status, 200);
    metrics_have(&s, &[&format!("{gauge} 0")]).await;
}
