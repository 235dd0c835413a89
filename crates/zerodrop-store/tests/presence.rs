//! Presence (SPEC §10) on every store — memory, a real SQLite file and a real `redis-server`:
//! joins, renewals and the holder rule, the member cap, releases that end after their lease
//! and leave exactly once, immediate leaves, the log's contiguous seqs, and pages past 1,000
//! members.

use std::sync::Arc;
use std::time::Duration;

use zerodrop_core::retention::Retention;
use zerodrop_core::{SessionId, StreamId};
use zerodrop_store::{
    Claimed, Member, MemoryStore, PresenceAction, PresenceClaim, RedisOptions, RedisStore,
    SqliteOptions, SqliteStore, Store,
};
use zerodrop_testkit::redis::RedisServer;
use zerodrop_testkit::sink::Recorder;

struct Fixture {
    name: &'static str,
    store: Arc<dyn Store>,
    _dir: Option<tempfile::TempDir>,
    _redis: Option<RedisServer>,
}

async fn every_store() -> Vec<Fixture> {
    let sink = Arc::new(Recorder::default());
    let dir = tempfile::tempdir().unwrap();
    let sqlite = SqliteStore::open(
        SqliteOptions::new(dir.path().join("zerodrop.db")),
        sink.clone(),
    )
    .unwrap();
    let server = RedisServer::start().expect("start redis-server");
    let opts = RedisOptions {
        every_stream: true,
        ..RedisOptions::new(&server.url())
    };
    let redis = RedisStore::connect(opts, sink.clone()).await.unwrap();
    vec![
        Fixture {
            name: "memory",
            store: Arc::new(MemoryStore::new(Retention::default(), sink.clone())),
            _dir: None,
            _redis: None,
        },
        Fixture {
            name: "sqlite",
            store: Arc::new(sqlite),
            _dir: Some(dir),
            _redis: None,
        },
        Fixture {
            name: "redis",
            store: Arc::new(redis),
            _dir: None,
            _redis: Some(server),
        },
    ]
}

fn stream(s: &str) -> StreamId {
    StreamId::new(s).unwrap()
}

fn session(n: usize) -> SessionId {
    SessionId::parse(&format!("s_{n:06}")).unwrap()
}

fn claim(s: &str, n: usize, holder: &str, take: bool, lease_ms: u64) -> PresenceClaim {
    PresenceClaim {
        stream: stream(s),
        member: Member {
            sub: format!("u{n}"),
            session_id: session(n),
            info: Some(serde_json::json!({"name": format!("user {n}"), "n": n})),
            since: 0,
        },
        holder: holder.into(),
        take,
        lease_ms,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_rules_hold_on_every_store() {
    for f in every_store().await {
        let p = f.store.presence();
        let name = f.name;
        let room = stream("room:1");
        // Joins append in order; a second claim renews.
        let Claimed::Joined(j1) = p
            .presence_claim(claim("room:1", 1, "h1", true, 60_000), 2)
            .await
            .unwrap()
        else {
            panic!("{name}: first claim joins")
        };
        assert_eq!((j1.seq, j1.action), (1, PresenceAction::Join), "{name}");
        assert_eq!(
            j1.member.info,
            Some(serde_json::json!({"name":"user 1","n":1})),
            "{name}"
        );
        assert!(j1.member.since > 0, "{name}: since is stamped");
        let Claimed::Joined(j2) = p
            .presence_claim(claim("room:1", 2, "h2", true, 60_000), 2)
            .await
            .unwrap()
        else {
            panic!("{name}: second member joins")
        };
        assert_eq!((j2.seq, &j2.epoch), (2, &j1.epoch), "{name}");
        assert_eq!(
            p.presence_claim(claim("room:1", 1, "h1", true, 60_000), 2)
                .await
                .unwrap(),
            Claimed::Renewed,
            "{name}"
        );
        // The cap refuses a third member, and nothing is appended.
        assert_eq!(
            p.presence_claim(claim("room:1", 3, "h3", true, 60_000), 2)
                .await
                .unwrap(),
            Claimed::Full { max: 2 },
            "{name}"
        );
        // A release by a connection that does not hold the member changes nothing.
        p.presence_release(&room, &session(1), "other", 0)
            .await
            .unwrap();
        // A beat by a connection that no longer holds member 2 does not take it back.
        p.presence_claim(claim("room:1", 2, "old", false, 60_000), 2)
            .await
            .unwrap();
        p.presence_release(&room, &session(2), "old", 0)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(
            p.presence_sweep(false).await.unwrap().is_empty(),
            "{name}: nobody lapsed"
        );
        // The holder's release ends the lease: one leave, once.
        p.presence_release(&room, &session(1), "h1", 0)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
        let left = p.presence_sweep(false).await.unwrap();
        assert_eq!(left.len(), 1, "{name}: {left:?}");
        assert_eq!(
            (
                left[0].seq,
                left[0].action,
                left[0].member.session_id.clone()
            ),
            (3, PresenceAction::Leave, session(1)),
            "{name}"
        );
        assert!(
            p.presence_sweep(false).await.unwrap().is_empty(),
            "{name}: each leave once"
        );
        // An immediate leave, once.
        let l = p
            .presence_leave(&room, &session(2))
            .await
            .unwrap()
            .expect("a member");
        assert_eq!((l.seq, l.action), (4, PresenceAction::Leave), "{name}");
        assert!(
            p.presence_leave(&room, &session(2))
                .await
                .unwrap()
                .is_none(),
            "{name}"
        );
        // The log: contiguous seqs in one epoch, read from any position.
        let log = p.presence_read(&room, 0, 100).await.unwrap();
        assert_eq!(
            (log.head, log.first, &log.epoch),
            (4, 1, &j1.epoch),
            "{name}"
        );
        let seqs: Vec<u64> = log.entries.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, vec![1, 2, 3, 4], "{name}");
        let tail = p.presence_read(&room, 2, 1).await.unwrap();
        assert_eq!(
            tail.entries.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![3],
            "{name}"
        );
        let page = p.presence_members(&room, None, 1000).await.unwrap();
        assert_eq!(
            (
                page.seq,
                page.occupancy,
                page.members.len(),
                page.next.clone()
            ),
            (4, 0, 0, None),
            "{name}"
        );
        // A stream never joined has an empty log in a stable epoch.
        let empty = p.presence_read(&stream("room:none"), 0, 10).await.unwrap();
        let again = p
            .presence_members(&stream("room:none"), None, 10)
            .await
            .unwrap();
        assert_eq!((empty.head, empty.entries.len()), (0, 0), "{name}");
        assert_eq!(empty.epoch, again.epoch, "{name}");
        let stats = p.presence_stats().await.unwrap();
        assert_eq!((stats.streams, stats.members), (0, 0), "{name}");
        // Each entry says how many members were left right after it.
        let occ: Vec<u64> = log.entries.iter().map(|e| e.occupancy).collect();
        assert_eq!(occ, vec![1, 2, 1, 0], "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_cursor_moves_forward_in_its_epoch_only() {
    for f in every_store().await {
        let p = f.store.presence();
        let name = f.name;
        let room = stream("room:h");
        // The stream's webhook cursor while it has entries not hooked; `None` once all are.
        let cursor = || async {
            p.presence_unhooked()
                .await
                .unwrap()
                .into_iter()
                .find(|(s, _, _)| *s == room)
                .map(|(_, e, c)| (e, c))
        };
        p.presence_claim(claim("room:h", 1, "h", true, 60_000), 10)
            .await
            .unwrap();
        p.presence_claim(claim("room:h", 2, "h", true, 60_000), 10)
            .await
            .unwrap();
        let (epoch, at) = cursor().await.expect("pending");
        assert_eq!(at, 0, "{name}");
        p.presence_hooked(&room, &zerodrop_core::Epoch::generate(), 2)
            .await
            .unwrap();
        p.presence_hooked(&room, &epoch, 1).await.unwrap();
        assert_eq!(
            cursor().await.map(|c| c.1),
            Some(1),
            "{name}: another epoch moves nothing"
        );
        p.presence_hooked(&room, &epoch, 5).await.unwrap();
        p.presence_hooked(&room, &epoch, 1).await.unwrap();
        assert_eq!(cursor().await, None, "{name}: all hooked, never back");
        // An empty stream with entries not hooked stays in the sweep's sight while hooks are on.
        p.presence_leave(&room, &session(1)).await.unwrap();
        p.presence_leave(&room, &session(2)).await.unwrap();
        p.presence_sweep(true).await.unwrap();
        assert_eq!(cursor().await.map(|c| c.1), Some(2), "{name}");
        p.presence_hooked(&room, &epoch, 4).await.unwrap();
        p.presence_sweep(true).await.unwrap();
        assert_eq!(cursor().await, None, "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_page_past_a_thousand_in_session_id_order() {
    for f in every_store().await {
        let p = f.store.presence();
        let name = f.name;
        let room = stream("room:big");
        for n in 0..1_005 {
            let c = p
                .presence_claim(claim("room:big", n, "h", true, 60_000), 10_000)
                .await
                .unwrap();
            assert!(matches!(c, Claimed::Joined(_)), "{name}: {c:?}");
        }
        let first = p.presence_members(&room, None, 5_000).await.unwrap();
        assert_eq!(
            (first.occupancy, first.seq, first.members.len()),
            (1_005, 1_005, 1_000),
            "{name}: clamped to 1,000"
        );
        let cursor = first.next.clone().expect("more follow");
        assert_eq!(cursor, session(999).as_str(), "{name}");
        let second = p
            .presence_members(&room, Some(&cursor), 1_000)
            .await
            .unwrap();
        assert_eq!(
            (second.members.len(), second.next.clone()),
            (5, None),
            "{name}"
        );
        let ids: Vec<SessionId> = first
            .members
            .iter()
            .chain(&second.members)
            .map(|m| m.session_id.clone())
            .collect();
        assert_eq!(
            ids,
            (0..1_005).map(session).collect::<Vec<_>>(),
            "{name}: every member once, in order"
        );
        let stats = p.presence_stats().await.unwrap();
        assert_eq!((stats.streams, stats.members), (1, 1_005), "{name}");
    }
}
