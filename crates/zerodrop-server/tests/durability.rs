//! The store's durability level, read from the store's own settings: in `/health`, in
//! `zerodrop_store_durability{level}` and the JSON metrics view, and held against
//! `--require-durability` at start (refused) and while serving (readiness). Real SQLite files
//! and real `redis-server`s.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use zerodrop_server::config::{RequiredDurability, StoreChoice, SyncChoice};
use zerodrop_server::{Config, start};
use zerodrop_testkit::http::Api;
use zerodrop_testkit::redis::{RedisConfig, RedisServer};
use zerodrop_testkit::server::TestServer;

const LEVELS: [&str; 4] = ["memory", "os_buffered", "replicated", "fsync"];

/// The four `zerodrop_store_durability` lines of an exposition, in the order of [`LEVELS`].
fn durability_lines(text: &str) -> Vec<String> {
    LEVELS
        .iter()
        .map(|level| {
            let series = format!("zerodrop_store_durability{{level=\"{level}\"}} ");
            let lines: Vec<&str> = text.lines().filter(|l| l.starts_with(&series)).collect();
            assert_eq!(lines.len(), 1, "one line for {level}:\n{text}");
            lines[0].to_string()
        })
        .collect()
}

/// Exactly `level`'s line is 1, the others 0.
fn expected_lines(level: &str) -> Vec<String> {
    LEVELS
        .iter()
        .map(|l| {
            let v = if *l == level { 1 } else { 0 };
            format!("zerodrop_store_durability{{level=\"{l}\"}} {v}")
        })
        .collect()
}

/// `/health`'s store section, the exposition's durability lines and the JSON view all say
/// `level`.
async fn assert_level(api: &Api, level: &str) -> Value {
    let h = api.get("/health", None).await;
    assert_eq!(h.status, 200);
    assert_eq!(h.json["store"]["durability"], level, "{}", h.text);
    let m = api.get("/metrics", None).await;
    assert_eq!(durability_lines(&m.text), expected_lines(level));
    assert!(
        m.text.contains("# TYPE zerodrop_store_durability gauge"),
        "{}",
        m.text
    );
    let j = api.metrics_json().await;
    assert_eq!(j["resume_store_metrics"]["durability"], level);
    h.json
}

async fn eventually(what: &str, limit: Duration, mut ok: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !ok().await {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn redis_with(args: &[&str]) -> RedisServer {
    RedisServer::start_with(RedisConfig {
        extra_args: args.iter().map(|a| a.to_string()).collect(),
        ..RedisConfig::default()
    })
    .expect("start redis-server")
}

fn on_redis(c: &mut Config, redis: &RedisServer) {
    c.store = StoreChoice::Redis;
    c.redis_url = redis.url();
    c.durability_recheck = Duration::from_millis(200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_full_is_fsync_and_normal_is_os_buffered() {
    let s = TestServer::start().await;
    let h = assert_level(&s.api(), "fsync").await;
    assert_eq!(
        h["store"],
        json!({
            "kind": "sqlite",
            "up": true,
            "durability": "fsync",
            "durabilitySettings": {"synchronous": "full"},
            "requiredDurability": null,
            "durabilityBelowRequired": false,
        })
    );
    assert_eq!(h["status"], "ok");
    s.stop().await;

    let s = TestServer::with(|c| c.sqlite_synchronous = SyncChoice::Normal).await;
    let h = assert_level(&s.api(), "os_buffered").await;
    assert_eq!(
        h["store"]["durabilitySettings"],
        json!({"synchronous": "normal"})
    );
    assert_eq!(h["status"], "ok", "no requirement: only a warning at start");
    let snap = s
        .api()
        .get("/admin/snapshot", Some(&s.creds.admin_token))
        .await;
    assert_eq!(snap.json["store"]["durability"], "os_buffered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_store_is_memory() {
    let s = TestServer::with(|c| c.store = StoreChoice::Memory).await;
    let h = assert_level(&s.api(), "memory").await;
    assert_eq!(h["store"]["durabilitySettings"], json!({}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_below_the_required_level_is_refused_with_the_setting_to_change() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config::for_tests(dir.path());
    cfg.sqlite_synchronous = SyncChoice::Normal;
    cfg.require_durability = RequiredDurability::Fsync;
    let err = format!("{:#}", start(cfg).await.err().expect("refused"));
    assert_eq!(
        err,
        "the store's durability level is os_buffered (SQLite PRAGMA synchronous=NORMAL, set by \
         --sqlite-synchronous), below --require-durability fsync: set --sqlite-synchronous full \
         (ZERODROP_SQLITE_SYNCHRONOUS=full)"
    );
    // `replicated` is not met by a single SQLite file at `normal` either, and `fsync` meets it.
    let mut cfg = Config::for_tests(dir.path());
    cfg.sqlite_synchronous = SyncChoice::Normal;
    cfg.require_durability = RequiredDurability::Replicated;
    assert!(start(cfg).await.is_err());
    let s = TestServer::start_in(dir.path(), |c| {
        c.require_durability = RequiredDurability::Replicated;
    })
    .await;
    let h = assert_level(&s.api(), "fsync").await;
    assert_eq!(h["store"]["requiredDurability"], "replicated");
    assert_eq!(s.api().get("/health/ready", None).await.status, 200);
    s.stop().await;

    // A Redis without persistence, under a requirement.
    let redis = RedisServer::start().expect("start redis-server");
    let mut cfg = Config::for_tests(dir.path());
    on_redis(&mut cfg, &redis);
    cfg.require_durability = RequiredDurability::Fsync;
    let err = format!("{:#}", start(cfg).await.err().expect("refused"));
    assert!(
        err.starts_with(
            "the store's durability level is memory (Redis appendonly no, appendfsync everysec; \
             no replica is waited for (--redis-wait-replicas 0)), below --require-durability \
             fsync: on the Redis server, CONFIG SET appendonly yes and CONFIG SET appendfsync \
             always"
        ),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_levels_come_from_its_persistence_settings() {
    for (args, level, appendonly, appendfsync) in [
        (&[][..], "memory", "no", "everysec"),
        (
            &["--appendonly", "yes", "--appendfsync", "everysec"][..],
            "os_buffered",
            "yes",
            "everysec",
        ),
        (
            &["--appendonly", "yes", "--appendfsync", "always"][..],
            "fsync",
            "yes",
            "always",
        ),
    ] {
        let redis = redis_with(args);
        let s = TestServer::with(|c| on_redis(c, &redis)).await;
        let h = assert_level(&s.api(), level).await;
        assert_eq!(
            h["store"]["durabilitySettings"],
            json!({
                "appendonly": appendonly,
                "appendfsync": appendfsync,
                "waitReplicas": 0,
                "connectedReplicas": 0,
            }),
            "{args:?}"
        );
        s.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_level_that_drops_below_the_requirement_turns_readiness_503_until_it_is_back() {
    let redis = redis_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let s = TestServer::with(|c| {
        on_redis(c, &redis);
        c.require_durability = RequiredDurability::Fsync;
    })
    .await;
    let api = s.api();
    assert_level(&api, "fsync").await;
    let r = api.get("/health/ready", None).await;
    assert_eq!((r.status, r.json), (200, json!({"ready": true})));

    assert_eq!(
        redis.cmd(&["CONFIG", "SET", "appendonly", "no"]).unwrap(),
        "+OK"
    );
    eventually("readiness 503", Duration::from_secs(10), async || {
        api.get("/health/ready", None).await.status == 503
    })
    .await;
    let r = api.get("/health/ready", None).await;
    assert_eq!(
        (r.status, r.json),
        (
            503,
            json!({"ready": false, "reasons": ["durability_below_required"]})
        )
    );
    let h = api.get("/health", None).await.json;
    assert_eq!(h["status"], "degraded");
    assert_eq!(
        (
            &h["store"]["durability"],
            &h["store"]["requiredDurability"],
            &h["store"]["durabilityBelowRequired"],
            &h["store"]["up"],
        ),
        (
            &json!("memory"),
            &json!("fsync"),
            &json!(true),
            &json!(true)
        )
    );
    assert_eq!(h["store"]["durabilitySettings"]["appendonly"], "no");
    assert_level(&api, "memory").await;
    // Publishes are the store's business: Redis still takes them.
    assert_eq!(api.try_publish("room:1", json!(1)).await.status, 201);

    assert_eq!(
        redis.cmd(&["CONFIG", "SET", "appendonly", "yes"]).unwrap(),
        "+OK"
    );
    eventually("readiness 200", Duration::from_secs(10), async || {
        api.get("/health/ready", None).await.status == 200
    })
    .await;
    assert_level(&api, "fsync").await;
    let h = api.get("/health", None).await.json;
    assert_eq!(
        (&h["status"], &h["store"]["durabilityBelowRequired"]),
        (&json!("ok"), &json!(false))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_for_a_replica_is_replicated() {
    let primary = RedisServer::start().expect("start redis-server");
    let _replica = RedisServer::start_with(RedisConfig {
        replica_of: Some(primary.port()),
        ..RedisConfig::default()
    })
    .expect("start a replica");
    let s = TestServer::with(|c| {
        on_redis(c, &primary);
        c.redis_wait_replicas = 1;
        c.require_durability = RequiredDurability::Replicated;
    })
    .await;
    let api = s.api();
    assert_level(&api, "replicated").await;
    eventually("the replica counted", Duration::from_secs(15), async || {
        api.get("/health", None).await.json["store"]["durabilitySettings"]["connectedReplicas"] == 1
    })
    .await;
    let h = api.get("/health", None).await.json;
    assert_eq!(
        h["store"]["durabilitySettings"],
        json!({
            "appendonly": "no",
            "appendfsync": "everysec",
            "waitReplicas": 1,
            "connectedReplicas": 1,
        })
    );
    assert_eq!(api.get("/health/ready", None).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_refuses_config_is_reported_at_the_weakest_level() {
    let redis = redis_with(&["--rename-command", "CONFIG", ""]);
    let s = TestServer::with(|c| on_redis(c, &redis)).await;
    let h = assert_level(&s.api(), "memory").await;
    let settings = &h["store"]["durabilitySettings"];
    assert_eq!(
        (
            &settings["appendonly"],
            &settings["appendfsync"],
            &settings["waitReplicas"]
        ),
        (&Value::Null, &Value::Null, &json!(0))
    );
    assert!(
        settings["unread"]
            .as_str()
            .is_some_and(|why| why.contains("unknown command")),
        "{settings}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_down_at_start_is_read_once_it_answers() {
    let mut redis = redis_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    redis.stop().unwrap();
    // Not refused: the level cannot be read yet, so the instance starts not ready.
    let s = TestServer::with(|c| {
        on_redis(c, &redis);
        c.require_durability = RequiredDurability::Fsync;
    })
    .await;
    let api = s.api();
    eventually("readiness 503", Duration::from_secs(10), async || {
        api.get("/health/ready", None).await.status == 503
    })
    .await;
    let h = api.get("/health", None).await.json;
    assert_eq!(
        h["store"]["durability"], "memory",
        "counted as the weakest until read"
    );
    assert!(
        h["store"]["durabilitySettings"]["unread"].is_string(),
        "{h}"
    );
    redis.start_again().unwrap();
    eventually("readiness 200", Duration::from_secs(15), async || {
        api.get("/health/ready", None).await.status == 200
    })
    .await;
    let h = assert_level(&api, "fsync").await;
    assert_eq!(
        h["store"]["durabilitySettings"],
        json!({
            "appendonly": "yes",
            "appendfsync": "always",
            "waitReplicas": 0,
            "connectedReplicas": 0,
        })
    );
}
