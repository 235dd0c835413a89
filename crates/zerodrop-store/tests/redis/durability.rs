//! The durability level read from a real Redis: its persistence settings as they change at
//! run time, a `CONFIG` it refuses, replicas `WAIT` counts on, an outage, and a cluster whose
//! weakest master counts.

use zerodrop_store::{Durability, RedisPersistence, StoreDurability, Unread};

use super::*;

async fn persistence(store: &RedisStore) -> RedisPersistence {
    match store.durability().await {
        StoreDurability::Redis(p) => p,
        other => panic!("not a redis report: {other:?}"),
    }
}

fn started_with(args: &[&str]) -> RedisServer {
    RedisServer::start_with(RedisConfig {
        extra_args: args.iter().map(|a| a.to_string()).collect(),
        ..RedisConfig::default()
    })
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_level_follows_redis_persistence_settings_as_they_change() {
    let mut server = RedisServer::start().unwrap();
    let store = connect(&server, Arc::new(NoSink)).await;
    let p = persistence(&store).await;
    assert_eq!(
        p,
        RedisPersistence {
            appendonly: Some("no".into()),
            appendfsync: Some("everysec".into()),
            wait_replicas: 0,
            connected_replicas: Some(0),
            unread: None,
        }
    );
    assert_eq!(p.level(), Durability::Memory);
    for (setting, value, level) in [
        ("appendonly", "yes", Durability::OsBuffered),
        ("appendfsync", "always", Durability::Fsync),
        ("appendfsync", "no", Durability::OsBuffered),
        ("appendfsync", "always", Durability::Fsync),
        ("appendonly", "no", Durability::Memory),
    ] {
        assert_eq!(
            server.cmd(&["CONFIG", "SET", setting, value]).unwrap(),
            "+OK"
        );
        let p = persistence(&store).await;
        assert_eq!(
            (p.level(), p.unread),
            (level, None),
            "after CONFIG SET {setting} {value}"
        );
    }
    // While Redis does not answer, the last level read stands.
    assert_eq!(
        server.cmd(&["CONFIG", "SET", "appendonly", "yes"]).unwrap(),
        "+OK"
    );
    assert_eq!(store.durability().await.level(), Durability::Fsync);
    server.kill();
    let p = persistence(&store).await;
    assert_eq!((p.level(), p.unread), (Durability::Fsync, None));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_config_get_gives_the_weakest_level_that_cannot_be_excluded() {
    // What managed Redis services do: CONFIG is renamed away (or denied by an ACL).
    let server = started_with(&["--rename-command", "CONFIG", ""]);
    let store = connect(&server, Arc::new(NoSink)).await;
    let p = persistence(&store).await;
    assert_eq!(p.level(), Durability::Memory);
    assert_eq!((p.appendonly, p.appendfsync), (None, None));
    assert_eq!(p.connected_replicas, Some(0), "INFO is still allowed");
    match &p.unread {
        Some(Unread::Refused(why)) => assert!(why.contains("unknown command"), "{why}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    // Appends that wait for a replica are `replicated` whatever the persistence.
    let mut opts = RedisOptions::new(&server.url());
    opts.wait_replicas = 1;
    let waiting = RedisStore::connect(opts, Arc::new(NoSink)).await.unwrap();
    let p = persistence(&waiting).await;
    assert_eq!(p.level(), Durability::Replicated);
    assert!(matches!(p.unread, Some(Unread::Refused(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_for_a_replica_is_replicated_and_the_replicas_are_counted() {
    let primary = RedisServer::start().unwrap();
    let mut opts = RedisOptions::new(&primary.url());
    opts.wait_replicas = 1;
    let store = RedisStore::connect(opts, Arc::new(NoSink)).await.unwrap();
    let p = persistence(&store).await;
    // No replica yet: every publish fails its WAIT, so no 201 is weaker than `replicated`.
    assert_eq!(
        (p.level(), p.wait_replicas, p.connected_replicas),
        (Durability::Replicated, 1, Some(0))
    );
    assert!(p.short_of_replicas());
    let _replica = RedisServer::start_with(RedisConfig {
        replica_of: Some(primary.port()),
        ..RedisConfig::default()
    })
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let p = persistence(&store).await;
        if p.connected_replicas == Some(1) {
            assert_eq!(p.level(), Durability::Replicated);
            assert!(!p.short_of_replicas());
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the replica never connected: {p:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Persistence that is stronger than replication wins.
    primary
        .cmd(&["CONFIG", "SET", "appendonly", "yes"])
        .unwrap();
    primary
        .cmd(&["CONFIG", "SET", "appendfsync", "always"])
        .unwrap();
    assert_eq!(store.durability().await.level(), Durability::Fsync);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_never_answered_reports_its_level_as_unread() {
    let mut server = started_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    server.stop().unwrap();
    let store = connect(&server, Arc::new(NoSink)).await;
    let d = store.durability().await;
    assert!(d.unreachable(), "{d:?}");
    assert_eq!(d.level(), Durability::Memory);
    server.start_again().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while store.durability().await.unreachable() {
        assert!(Instant::now() < deadline, "never read");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(store.durability().await.level(), Durability::Fsync);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_cluster_the_weakest_master_counts() {
    let cluster = RedisCluster::start(3).unwrap();
    let store = RedisStore::connect(RedisOptions::new(&cluster.urls()), Arc::new(NoSink))
        .await
        .unwrap();
    assert_eq!(store.durability().await.level(), Durability::Memory);
    for n in cluster.nodes() {
        assert_eq!(
            n.cmd(&["CONFIG", "SET", "appendonly", "yes"]).unwrap(),
            "+OK"
        );
        assert_eq!(
            n.cmd(&["CONFIG", "SET", "appendfsync", "always"]).unwrap(),
            "+OK"
        );
    }
    assert_eq!(store.durability().await.level(), Durability::Fsync);
    let weak = &cluster.nodes()[1];
    assert_eq!(
        weak.cmd(&["CONFIG", "SET", "appendfsync", "everysec"])
            .unwrap(),
        "+OK"
    );
    let p = persistence(&store).await;
    assert_eq!(
        (p.level(), p.appendfsync.as_deref()),
        (Durability::OsBuffered, Some("everysec"))
    );
}
