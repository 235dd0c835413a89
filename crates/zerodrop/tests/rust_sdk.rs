//! The Rust SDK (`zerodrop_client::Client`) against real servers: every event exactly once
//! and in order across a `kill -9` and restart, a drain to another instance on Redis, and an
//! event lost on the way (read back over HTTP); acks only for what the application handled;
//! and the typed ends — a trimmed log, an epoch change and a session lost when Redis restarts
//! empty, a divergent digest, keys that never arrive.
//!
//! Every wait is bounded; every process is killed on drop.

mod support;

use support::{publish_range, spawn_sqlite};

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;
use zerodrop_client::{
    Client, ClientOptions, HttpClient, Received, SubscribeOptions, Subscription, SubscriptionError,
    TokenSource, Verdict,
};
use zerodrop_testkit::cluster::Cluster;
use zerodrop_testkit::free_port;
use zerodrop_testkit::server::TestServer;

const BIN: &str = env!("CARGO_BIN_EXE_zerodrop");
const LIMIT: Duration = Duration::from_secs(60);

fn opts() -> ClientOptions {
    ClientOptions {
        base_delay: Duration::from_millis(100),
        max_delay: Duration::from_secs(1),
        connect_timeout: Duration::from_secs(3),
        ..ClientOptions::default()
    }
}

fn from_start() -> SubscribeOptions {
    SubscribeOptions {
        after: Some(0),
        epoch: None,
        ..Default::default()
    }
}

/// The next item within `limit`; `None` when nothing came.
async fn next_within(
    sub: &mut Subscription,
    limit: Duration,
) -> Option<Result<Received, SubscriptionError>> {
    tokio::time::timeout(limit, sub.next()).await.ok().flatten()
}

/// Receives and handles events until `last` arrived; their seqs, in arrival order.
async fn receive_until(sub: &mut Subscription, last: u64, seqs: &mut Vec<u64>) {
    let until = Instant::now() + LIMIT;
    while seqs.last() != Some(&last) {
        let left = until.saturating_duration_since(Instant::now());
        match next_within(sub, left).await {
            Some(Ok(e)) => {
                let n: serde_json::Value = e.json().expect("json data");
                assert_eq!(n["n"], e.seq, "data of another event at seq {}", e.seq);
                seqs.push(e.seq);
                e.handled();
            }
            Some(Err(err)) => panic!("the subscription ended: {err} (after {seqs:?})"),
            None => panic!("seq {last} did not arrive within {LIMIT:?}; got {seqs:?}"),
        }
    }
}

/// Nothing more arrives (no late duplicate) for a while.
async fn assert_quiet(sub: &mut Subscription) {
    if let Some(item) = next_within(sub, Duration::from_millis(700)).await {
        panic!("nothing more was expected, got {item:?}");
    }
}

/// The terminal error, within the limit (events before it are handled and skipped).
async fn ended(sub: &mut Subscription) -> SubscriptionError {
    let until = Instant::now() + LIMIT;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        match next_within(sub, left).await {
            Some(Ok(e)) => e.handled(),
            Some(Err(err)) => return err,
            None => panic!("the subscription did not end with an error within {LIMIT:?}"),
        }
    }
}

/// Where the session's stored ack stands: the first seq a reconnect would replay, minus one.
async fn stored_ack(url: &str, client: &Client, stream: &str) -> u64 {
    let (id, token) = client.session();
    let http = HttpClient::new(url, None).unwrap();
    let r = http
        .reconnect(&id, &token, None)
        .await
        .expect("reconnect answers");
    r.replay[stream].from_seq - 1
}

/// Polls until the session's stored ack reached `want` (acks are batched, so they trail).
async fn wait_stored_ack(url: &str, client: &Client, stream: &str, want: u64) {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let got = stored_ack(url, client, stream).await;
        if got == want {
            return;
        }
        assert!(got < want, "acked {got}, beyond what was handled ({want})");
        assert!(
            Instant::now() < until,
            "the ack stayed at {got}, want {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_once_across_a_kill9_and_acks_only_what_was_handled() {
    let data = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut server = spawn_sqlite(data.path(), port, &[]);
    let stream = "rsk:1";
    let token = server.creds.token("app", &["rsk:*"], &[]);
    let client = Client::connect_with(&[&server.url], &token, opts())
        .await
        .unwrap();
    assert_eq!(client.protocol(), "zerodrop.v3");
    let mut sub = client.subscribe_with(stream, from_start());

    // Handled-then-acked: 1..=3 handled, 4 and 5 delivered but not handled.
    publish_range(&server.api(), stream, 1, 5).await;
    let mut held = Vec::new();
    for want in 1..=5u64 {
        let e = next_within(&mut sub, LIMIT).await.unwrap().unwrap();
        assert_eq!(e.seq, want);
        if want <= 3 {
            e.handled();
        } else {
            held.push(e);
        }
    }
    wait_stored_ack(&server.url, &client, stream, 3).await;
    // 5 before 4: the ack waits for the hole to close, then moves to 5.
    held[1].handled();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(stored_ack(&server.url, &client, stream).await, 3);
    held[0].handled();
    wait_stored_ack(&server.url, &client, stream, 5).await;
    let mut seqs: Vec<u64> = (1..=5).collect();

    publish_range(&server.api(), stream, 6, 30).await;
    receive_until(&mut sub, 10, &mut seqs).await;
    // 11..=30 reach the application but are not handled yet: the server keeps them unacked.
    let mut unhandled = Vec::new();
    for want in 11..=30u64 {
        let e = next_within(&mut sub, LIMIT).await.unwrap().unwrap();
        assert_eq!(e.seq, want);
        seqs.push(e.seq);
        unhandled.push(e);
    }
    wait_stored_ack(&server.url, &client, stream, 10).await;
    server.kill9();
    // Down long enough for the backoff to grow. The resume sends lastAck 10, so the server
    // replays 11..=30 again: the SDK must drop them (delivered once already).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let server = spawn_sqlite(data.path(), port, &[]);
    publish_range(&server.api(), stream, 31, 60).await;
    receive_until(&mut sub, 60, &mut seqs).await;
    // Handled late, they still move the ack (after the resume, on the new connection).
    for e in &unhandled {
        e.handled();
    }
    assert_quiet(&mut sub).await;
    assert_eq!(seqs, (1..=60).collect::<Vec<_>>());
    assert_eq!(sub.position().seq, 60);
    assert_eq!(client.protocol(), "zerodrop.v3");
    wait_stored_ack(&server.url, &client, stream, 60).await;
    client.close().await;
    // A closed client's subscription ends without an error.
    assert!(
        next_within(&mut sub, Duration::from_secs(5))
            .await
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_moves_the_client_to_the_next_instance_without_a_gap_or_a_repeat() {
    let c = Cluster::start(Path::new(BIN), 2, &[]).expect("cluster starts");
    let apis = [c.api(0), c.api(1)];
    let stream = "rsd:1";
    let token = c.token("app", &["rsd:*"]);
    let urls = c.urls();
    let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
    let client = Client::connect_with(&urls, &token, opts()).await.unwrap();
    let mut sub = client.subscribe_with(stream, from_start());
    let mut seqs = Vec::new();
    publish_range(&apis[1], stream, 1, 20).await;
    receive_until(&mut sub, 20, &mut seqs).await;

    // Publishing goes on while the client moves.
    let n = support::drain_while_publishing(&c, stream, 20).await;
    publish_range(&apis[1], stream, n + 1, n + 10).await;
    receive_until(&mut sub, n + 10, &mut seqs).await;
    assert_quiet(&mut sub).await;
    assert_eq!(seqs, (1..=n + 10).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_lost_on_the_way_is_read_back_and_acked_on_v1() {
    let s = TestServer::start().await;
    // Negotiates zerodrop.v1 and never forwards the event with seq 2.
    let proxy = support::event_dropping_proxy(s.addr).await;
    let url = format!("http://{proxy}");
    let stream = "rsg:1";
    let token = s.creds.token("app", &["rsg:*"], &[]);
    let client = Client::connect_with(&[&url], &token, opts()).await.unwrap();
    assert_eq!(client.protocol(), "zerodrop.v1");
    let mut sub = client.subscribe_with(stream, from_start());
    publish_range(&s.api(), stream, 1, 10).await;
    let mut seqs = Vec::new();
    receive_until(&mut sub, 10, &mut seqs).await;
    assert_quiet(&mut sub).await;
    // Seq 2 never crossed the socket: it is in its place because the SDK read the gap.
    assert_eq!(seqs, (1..=10).collect::<Vec<_>>());
    // v1 acks (one frame per stream) reached the server.
    wait_stored_ack(&s.url, &client, stream, 10).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_position_the_log_trimmed_ends_with_replay_window_trimmed() {
    let data = tempfile::tempdir().unwrap();
    let port = free_port();
    let retention = ["--retention-max-events", "5"];
    let mut server = spawn_sqlite(data.path(), port, &retention);
    let stream = "rst:1";
    let token = server.creds.token("app", &["rst:*"], &[]);
    let client = Client::connect_with(&[&server.url], &token, opts())
        .await
        .unwrap();
    let mut sub = client.subscribe_with(stream, from_start());
    publish_range(&server.api(), stream, 1, 3).await;
    let mut seqs = Vec::new();
    receive_until(&mut sub, 3, &mut seqs).await;
    wait_stored_ack(&server.url, &client, stream, 3).await;

    // While the client is away, the log moves on past what retention keeps: 16..=20 remain.
    // (It runs on another port meanwhile, so the client cannot come back mid-way.)
    server.kill9();
    let mut elsewhere = spawn_sqlite(data.path(), free_port(), &retention);
    publish_range(&elsewhere.api(), stream, 4, 20).await;
    elsewhere.kill9();
    let server = spawn_sqlite(data.path(), port, &retention);
    let err = ended(&mut sub).await;
    assert_eq!(
        err,
        SubscriptionError::ReplayWindowTrimmed {
            stream: stream.into(),
            first_available_seq: Some(16)
        }
    );
    assert_eq!(err.code(), "REPLAY_WINDOW_TRIMMED");
    assert_eq!(
        sub.position().seq,
        3,
        "the position stays at the last handled"
    );

    // The application resyncs from its snapshot and subscribes again from there.
    let mut again = client.subscribe_with(
        stream,
        SubscribeOptions {
            after: Some(15),
            epoch: sub.position().epoch,
            ..Default::default()
        },
    );
    let mut seqs = Vec::new();
    receive_until(&mut again, 20, &mut seqs).await;
    assert_eq!(seqs, (16..=20).collect::<Vec<_>>());
    // A subscription from a trimmed position ends the same way.
    let mut old = client.subscribe_with("rst:2", from_start());
    publish_range(&server.api(), "rst:2", 1, 8).await;
    // Retention trims behind the appends; wait until 1..=3 are gone.
    let until = Instant::now() + Duration::from_secs(10);
    while server.api().info("rst:2").await["firstSeq"] != 4 {
        assert!(Instant::now() < until, "retention never trimmed rst:2");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut stale = client.subscribe_with(
        "rst:2",
        SubscribeOptions {
            after: Some(1),
            epoch: None,
            ..Default::default()
        },
    );
    // A second subscription to a stream replaces the first: it ends, without an error,
    // after what it had already received.
    for _ in 0..=8 {
        match next_within(&mut old, Duration::from_secs(5)).await {
            Some(Ok(_)) => {}
            Some(Err(e)) => panic!("the replaced subscription ended with {e}"),
            None => break,
        }
    }
    assert!(
        next_within(&mut old, Duration::from_secs(1))
            .await
            .is_none()
    );
    assert_eq!(ended(&mut stale).await.code(), "REPLAY_WINDOW_TRIMMED");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_empty_ends_with_epoch_changed_then_session_not_found() {
    let mut c = Cluster::start(Path::new(BIN), 1, &[]).expect("cluster starts");
    let api = c.api(0);
    let stream = "rse:1";
    let token = c.token("app", &["rse:*"]);
    let url = c.url(0);
    let client = Client::connect_with(&[&url], &token, opts()).await.unwrap();
    let mut sub = client.subscribe_with(stream, from_start());
    publish_range(&api, stream, 1, 3).await;
    let mut seqs = Vec::new();
    receive_until(&mut sub, 3, &mut seqs).await;
    let old_epoch = sub.position().epoch.expect("an epoch");

    c.redis.restart_empty().expect("redis restarts empty");
    let SubscriptionError::EpochChanged { stream: s, epoch } = ended(&mut sub).await else {
        panic!("expected EPOCH_CHANGED")
    };
    assert_eq!(s, stream);
    assert_ne!(epoch, old_epoch);

    // The session went with Redis: the next subscription learns it.
    let mut next = client.subscribe_with(stream, from_start());
    assert_eq!(ended(&mut next).await, SubscriptionError::SessionNotFound);

    // The client opens a new session by itself; subscribing again works, in the new epoch.
    let until = Instant::now() + Duration::from_secs(20);
    while api.try_publish(stream, json!({"n": 1})).await.status != 201 {
        assert!(Instant::now() < until, "publishing never recovered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut fresh = client.subscribe_with(stream, from_start());
    let mut seqs = Vec::new();
    publish_range(&api, stream, 2, 3).await;
    receive_until(&mut fresh, 3, &mut seqs).await;
    assert_eq!(seqs, vec![1, 2, 3]);
    assert_eq!(fresh.position().epoch.as_deref(), Some(epoch.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_from_another_epoch_ends_with_epoch_changed() {
    let s = TestServer::start().await;
    let token = s.creds.token("app", &["rsx:*"], &[]);
    publish_range(&s.api(), "rsx:1", 1, 2).await;
    let client = Client::connect_with(&[&s.url], &token, opts())
        .await
        .unwrap();
    let mut sub = client.subscribe_with(
        "rsx:1",
        SubscribeOptions {
            after: Some(1),
            epoch: Some("0000000000000000".into()),
            ..Default::default()
        },
    );
    let err = ended(&mut sub).await;
    assert_eq!(err.code(), "EPOCH_CHANGED", "{err}");
    let info = s.api().info("rsx:1").await;
    assert_eq!(
        err,
        SubscriptionError::EpochChanged {
            stream: "rsx:1".into(),
            epoch: info["epoch"].as_str().unwrap().into()
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_agrees_with_the_server_and_a_divergent_log_forces_a_resync() {
    let s = TestServer::start().await;
    let stream = "rsv:1";
    let token = s.creds.token("app", &["rsv:*"], &[]);
    publish_range(&s.api(), stream, 1, 5).await;
    let client = Client::connect_with(&[&s.url], &token, opts())
        .await
        .unwrap();
    let check = client.verify(stream).await.unwrap();
    let info = s.api().info(stream).await;
    assert_eq!(
        check.verdict,
        Verdict::Consistent {
            count: 5,
            hash: info["hash"].as_str().unwrap().into()
        }
    );

    // Behind a proxy that alters one served event, the digest no longer matches.
    let proxy = support::broken_proxy(
        s.addr,
        support::Faults {
            alter_served_events: true,
            ..support::Faults::default()
        },
    )
    .await;
    let url = format!("http://{proxy}");
    let client = Client::connect_with(&[&url], &token, opts()).await.unwrap();
    let mut sub = client.subscribe(stream);
    let check = client.verify(stream).await.unwrap();
    assert!(
        matches!(
            check.verdict,
            Verdict::Diverged {
                server_count: 5,
                computed_count: 5,
                ..
            }
        ),
        "{:?}",
        check.verdict
    );
    let err = ended(&mut sub).await;
    assert_eq!(err.code(), "DIVERGED", "{err}");
}

mod e2e {
    use super::*;
    use zerodrop_client::e2e::{GroupKey, seal_text};

    const K1: [u8; 32] = [1; 32];
    const K2: [u8; 32] = [2; 32];

    fn sealed(
        key: &[u8; 32],
        kid: &str,
        stream: &str,
        plain: serde_json::Value,
    ) -> serde_json::Value {
        let s = seal_text(&GroupKey::new(key), kid, stream, &plain.to_string(), None);
        serde_json::to_value(s).unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sealed_events_are_opened_in_order_and_wait_for_their_key() {
        let s = TestServer::start().await;
        let api = s.api();
        let stream = "rsc:1";
        let token = s.creds.token("app", &["rsc:*"], &[]);
        let client = Client::connect_with(&[&s.url], &token, opts())
            .await
            .unwrap();
        client.add_key("k1", &K1).unwrap();
        let mut sub = client.subscribe_with(stream, from_start());

        // Sealed by the client itself, under the publish key.
        client.set_publish_key("k1").unwrap();
        let one = client
            .seal(stream, r#"{"n":1,"secret":"attack at dawn"}"#)
            .unwrap();
        api.publish(stream, serde_json::from_str(&one).unwrap())
            .await;
        api.publish(stream, json!({"n": 2})).await;
        api.publish(stream, sealed(&K2, "k2", stream, json!({"n": 3})))
            .await;
        api.publish(stream, json!({"n": 4})).await;
        api.publish(stream, sealed(&K1, "k1", stream, json!({"n": 5})))
            .await;

        // The server stores ciphertext it cannot read.
        let page = api.read(stream, 0, 10).await;
        let stored = page.json["events"][0]["data"].clone();
        assert_eq!(stored["e2e"], 1, "{stored}");
        assert_eq!(stored["kid"], "k1");
        assert!(!page.text.contains("attack at dawn"), "{}", page.text);

        let e = next_within(&mut sub, LIMIT).await.unwrap().unwrap();
        assert_eq!(
            (e.seq, e.encrypted, e.kid.as_deref()),
            (1, true, Some("k1"))
        );
        assert_eq!(
            e.json::<serde_json::Value>().unwrap()["secret"],
            "attack at dawn"
        );
        e.handled();
        let e = next_within(&mut sub, LIMIT).await.unwrap().unwrap();
        assert_eq!((e.seq, e.encrypted), (2, false));
        e.handled();
        // 3 waits for k2, and 4 and 5 wait behind it: order is kept.
        assert!(
            next_within(&mut sub, Duration::from_millis(600))
                .await
                .is_none()
        );
        assert_eq!(sub.position().seq, 2);
        client.add_key("k2", &K2).unwrap();
        let mut seqs = Vec::new();
        receive_until(&mut sub, 5, &mut seqs).await;
        assert_eq!(seqs, vec![3, 4, 5]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_key_that_never_comes_and_a_full_buffer_are_typed_errors() {
        let s = TestServer::start().await;
        let api = s.api();
        let token = s.creds.token("app", &["rsk2:*"], &[]);
        let client = Client::connect_with(
            &[&s.url],
            &token,
            ClientOptions {
                key_timeout: Duration::from_millis(300),
                ..opts()
            },
        )
        .await
        .unwrap();
        let mut late = client.subscribe_with("rsk2:late", from_start());
        api.publish("rsk2:late", sealed(&K2, "k9", "rsk2:late", json!({"n": 1})))
            .await;
        assert_eq!(
            ended(&mut late).await,
            SubscriptionError::KeyUnavailable {
                stream: "rsk2:late".into(),
                kid: "k9".into()
            }
        );

        let client = Client::connect_with(
            &[&s.url],
            &token,
            ClientOptions {
                key_buffer_events: 3,
                ..opts()
            },
        )
        .await
        .unwrap();
        let mut full = client.subscribe_with("rsk2:full", from_start());
        api.publish("rsk2:full", sealed(&K2, "k9", "rsk2:full", json!({"n": 1})))
            .await;
        publish_range(&api, "rsk2:full", 2, 4).await;
        assert_eq!(
            ended(&mut full).await,
            SubscriptionError::KeyBufferFull {
                stream: "rsk2:full".into(),
                limit: 3
            }
        );

        // Sealed data moved to another stream fails authentication.
        client.add_key("k1", &K1).unwrap();
        let mut moved = client.subscribe_with("rsk2:moved", from_start());
        api.publish(
            "rsk2:moved",
            sealed(&K1, "k1", "rsk2:other", json!({"n": 1})),
        )
        .await;
        assert_eq!(
            ended(&mut moved).await,
            SubscriptionError::DecryptFailed {
                stream: "rsk2:moved".into(),
                seq: 1
            }
        );
    }
}

/// A connect token that expires 3 s from now, and the server's grace of 1 s after it.
async fn short_lived(s: &TestServer) -> (String, u64) {
    let exp = zerodrop_core::now_ms() / 1000 + 3;
    (s.creds.token_until("app", &["exp:*"], &[], exp), exp)
}

/// A token source handing out hour-long tokens for `app` on `exp:*`, failing its first
/// `fail_first` fetches; and how many fetches it saw.
fn counting_source(
    s: &TestServer,
    fail_first: usize,
) -> (TokenSource, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let fetched = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (creds, count) = (s.creds.clone(), fetched.clone());
    let source = TokenSource::new(move || {
        let (creds, count) = (creds.clone(), count.clone());
        async move {
            if count.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < fail_first {
                return Err("the backend is restarting".to_string());
            }
            let exp = zerodrop_core::now_ms() / 1000 + 3600;
            Ok(creds.token_until("app", &["exp:*"], &[], exp))
        }
    });
    (source, fetched)
}

/// Sleeps until `exp` + the grace (1 s) + 1 s has passed, by the wall clock.
async fn past_the_deadline(exp: u64) {
    let at = (exp + 2) * 1000;
    let now = zerodrop_core::now_ms();
    tokio::time::sleep(Duration::from_millis(at.saturating_sub(now))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_source_answers_refresh_and_the_client_outlives_its_first_token_with_no_gap() {
    let s = TestServer::with(|c| c.token_grace_sec = 1).await;
    let stream = "exp:1";
    let (first, exp) = short_lived(&s).await;
    let (source, fetched) = counting_source(&s, 0);
    let o = ClientOptions {
        token_source: Some(source),
        ..opts()
    };
    let client = Client::connect_with(&[&s.url], &first, o).await.unwrap();
    let mut sub = client.subscribe_with(stream, from_start());
    publish_range(&s.api(), stream, 1, 3).await;
    let mut seqs = Vec::new();
    receive_until(&mut sub, 3, &mut seqs).await;
    past_the_deadline(exp).await;
    publish_range(&s.api(), stream, 4, 6).await;
    receive_until(&mut sub, 6, &mut seqs).await;
    assert_quiet(&mut sub).await;
    assert_eq!(seqs, (1..=6).collect::<Vec<_>>());
    assert_eq!(fetched.load(std::sync::atomic::Ordering::Relaxed), 1);
    let m = s.api().get("/metrics", None).await.text;
    assert!(
        m.lines()
            .any(|l| l == "zerodrop_token_refreshes_total{result=\"ok\"} 1"),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_source_the_subscription_ends_with_token_expired() {
    let s = TestServer::with(|c| c.token_grace_sec = 1).await;
    let stream = "exp:2";
    let (first, _) = short_lived(&s).await;
    let client = Client::connect_with(&[&s.url], &first, opts())
        .await
        .unwrap();
    let mut sub = client.subscribe_with(stream, from_start());
    publish_range(&s.api(), stream, 1, 2).await;
    let mut seqs = Vec::new();
    receive_until(&mut sub, 2, &mut seqs).await;
    let err = ended(&mut sub).await;
    assert_eq!(err.code(), "TOKEN_EXPIRED", "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_token_expired_the_token_source_resumes_the_session_with_a_fresh_token_and_no_gap() {
    let s = TestServer::with(|c| c.token_grace_sec = 1).await;
    let stream = "exp:3";
    let (first, exp) = short_lived(&s).await;
    // The source fails when the server asks ahead of `exp` (so the server ends the connection
    // with TOKEN_EXPIRED), then gives tokens: the client resumes with one.
    let (source, fetched) = counting_source(&s, 1);
    let o = ClientOptions {
        token_source: Some(source),
        ..opts()
    };
    let client = Client::connect_with(&[&s.url], &first, o).await.unwrap();
    let session = client.session().0;
    let mut sub = client.subscribe_with(stream, from_start());
    publish_range(&s.api(), stream, 1, 3).await;
    let mut seqs = Vec::new();
    receive_until(&mut sub, 3, &mut seqs).await;
    past_the_deadline(exp).await;
    publish_range(&s.api(), stream, 4, 6).await;
    receive_until(&mut sub, 6, &mut seqs).await;
    assert_quiet(&mut sub).await;
    assert_eq!(seqs, (1..=6).collect::<Vec<_>>());
    assert_eq!(client.session().0, session, "the same session, resumed");
    assert_eq!(fetched.load(std::sync::atomic::Ordering::Relaxed), 2);
    let m = s.api().get("/metrics", None).await.text;
    assert!(
        m.lines()
            .any(|l| l == "zerodrop_token_refreshes_total{result=\"ok\"} 1"),
        "one resume with a fresh token, no refresh frame: {m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_client_ends_with_revoked_and_does_not_reconnect() {
    let s = TestServer::start().await;
    let token = s.creds.token("fired", &["rv:*"], &[]);
    let client = Client::connect_with(&[&s.url], &token, opts())
        .await
        .unwrap();
    let mut sub = client.subscribe_with("rv:1", from_start());
    publish_range(&s.api(), "rv:1", 1, 2).await;
    let mut seqs = Vec::new();
    receive_until(&mut sub, 2, &mut seqs).await;
    let r = s
        .api()
        .post(
            "/admin/revoke",
            Some(&s.creds.admin_token),
            serde_json::json!({"sub":"fired"}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let err = ended(&mut sub).await;
    assert_eq!(err.code(), "REVOKED", "{err}");
    assert!(matches!(err, SubscriptionError::Revoked { .. }), "{err:?}");
    // No loop: over three of its backoff ceilings the client opens no other connection.
    let opened = |m: &str| {
        m.lines()
            .find_map(|l| l.strip_prefix("zerodrop_connections_total{transport=\"ws\"} "))
            .and_then(|v| v.parse::<u64>().ok())
    };
    let before = opened(&s.api().get("/metrics", None).await.text);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = opened(&s.api().get("/metrics", None).await.text);
    assert_eq!(before, after, "no reconnect after REVOKED");
    let mut late = client.subscribe_with("rv:2", from_start());
    assert_eq!(
        ended(&mut late).await.code(),
        "REVOKED",
        "new subscriptions end at once"
    );
}

/// `sub.presence()` (SPEC §10): a snapshot and the presence frames after it, kept current
/// across a disconnect order and the resume that follows it (joins and leaves made meanwhile
/// included), each member once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sub_presence_keeps_the_members_current_across_a_resume() {
    use std::collections::BTreeSet;
    use zerodrop_testkit::ws::WsClient;
    let s = TestServer::with(|c| {
        c.presence = zerodrop_server::config::PresenceConfig {
            patterns: vec!["room:*".into()],
            leave_grace_sec: 1,
            heartbeat_sec: 2,
            max_members: 100,
        };
    })
    .await;
    let member = |sub: &str| {
        let url = format!("{}/v1/ws?token={}", s.ws_url(), s.token(sub, &["room:*"]));
        async move {
            let mut c = WsClient::connect(&url).await.unwrap();
            let w = c.expect("welcome").await;
            c.send(json!({"type":"subscribe","stream":"room:v"})).await;
            c.expect("subscribed").await;
            (c, w["sessionId"].as_str().unwrap().to_string())
        }
    };
    let (mut b, b_sid) = member("bob").await;
    let client = Client::connect_with(&[&s.url], &s.token("ann", &["room:*"]), opts())
        .await
        .unwrap();
    let sub = client.subscribe_with(
        "room:v",
        SubscribeOptions {
            presence: true,
            ..Default::default()
        },
    );
    let mut view = sub.presence().expect("a presence view");
    let ann = client.session().0;
    let ids = |v: &zerodrop_client::PresenceView| -> BTreeSet<String> {
        v.members().into_iter().map(|m| m.session_id).collect()
    };
    let until = |want: BTreeSet<String>, mut v: zerodrop_client::PresenceView| async move {
        let deadline = Instant::now() + LIMIT;
        loop {
            let now: BTreeSet<String> = v.members().into_iter().map(|m| m.session_id).collect();
            if now == want {
                return v;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "members {now:?}, want {want:?}");
            let _ = tokio::time::timeout(left, v.changed()).await;
        }
    };
    view = until([ann.clone(), b_sid.clone()].into(), view).await;
    assert_eq!(ids(&view).len(), 2);
    // The server tells the client to reconnect; it resumes its session at once.
    let r = s
        .api()
        .post(
            "/admin/disconnect",
            Some(&s.creds.admin_token),
            json!({"sessionId": ann}),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.text);
    let (_c, c_sid) = member("carol").await;
    b.send(json!({"type":"unsubscribe","stream":"room:v"}))
        .await;
    b.expect("unsubscribed").await;
    view = until([ann.clone(), c_sid.clone()].into(), view).await;
    let members = view.members();
    let carol = members.iter().find(|m| m.session_id == c_sid).unwrap();
    assert_eq!(carol.sub, "carol");
    assert!(view.current().seq.unwrap() >= 4, "{:?}", view.current());
    // It did resume (not merely stay connected).
    let deadline = Instant::now() + LIMIT;
    while s.api().metrics_json().await["ws_metrics"]["ws_resumes"].as_u64() < Some(1) {
        assert!(Instant::now() < deadline, "the client never resumed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    client.close().await;
}

/// Byte payloads: whatever carried them (a `zerodrop.v3` binary frame, a v2 text frame, a
/// publish of `{"$base64"}` over HTTP), the client hands the same bytes out, and
/// `publish_bytes` stores the same event on v3 (binary) as on v2 (text).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn byte_payloads_reach_the_application_as_the_same_bytes_on_every_version() {
    use zerodrop_client::frames::ServerFrame;
    use zerodrop_client::ws::{WsAuth, WsConnection};
    let s = TestServer::start().await;
    let stream = "bin:1";
    let token = s.creds.token("app", &["bin:*"], &["bin:*"]);
    let client = Client::connect_with(&[&s.url], &token, opts())
        .await
        .unwrap();
    assert_eq!(client.protocol(), "zerodrop.v3");
    let mut sub = client.subscribe_with(stream, from_start());
    let payloads: [&[u8]; 3] = [b"\x00\n\xff", b"", b"{\"json\":\"no\"}"];
    s.api().publish(stream, json!({"$base64": "AAr/"})).await;
    for (protocol, bytes, id) in [
        ("zerodrop.v3", payloads[1], "p-1"),
        ("zerodrop.v2", payloads[2], "p-2"),
    ] {
        let auth = WsAuth::Token(token.clone());
        let mut c = WsConnection::connect_offering(&s.url, auth, LIMIT, protocol)
            .await
            .unwrap();
        assert_eq!(c.protocol(), protocol);
        c.publish_bytes(stream, bytes, Some(id.into()))
            .await
            .unwrap();
        loop {
            match c.recv().await.unwrap() {
                ServerFrame::Published(p) => {
                    assert_eq!(p.id, Some(json!(id)));
                    break;
                }
                ServerFrame::Error(e) => panic!("{protocol}: {e:?}"),
                _ => {}
            }
        }
        c.close().await;
    }
    for (seq, want) in (1..).zip(payloads) {
        let e = next_within(&mut sub, LIMIT).await.unwrap().unwrap();
        assert_eq!((e.seq, e.bytes().as_deref()), (seq, Some(want)));
    }
    // A bare v3 connection decodes the binary frames themselves (the client above could
    // also have read a skipped event back over HTTP).
    let auth = WsAuth::Token(token.clone());
    let mut c = WsConnection::connect_offering(&s.url, auth, LIMIT, "zerodrop.v3")
        .await
        .unwrap();
    c.subscribe(stream, Some(0), None).await.unwrap();
    let mut got = Vec::new();
    while got.len() < payloads.len() {
        if let ServerFrame::Event(e) = c.recv().await.unwrap() {
            got.push((e.seq, e.bytes().unwrap()));
        }
    }
    let want: Vec<(u64, Vec<u8>)> = (1..).zip(payloads.map(<[u8]>::to_vec)).collect();
    assert_eq!(got, want);
    c.close().await;
    // The same events read over HTTP are the `{"$base64"}` objects.
    let page = s.api().read(stream, 0, 10).await.json;
    assert_eq!(page["events"][1]["data"], json!({"$base64": ""}));
    assert_eq!(
        page["events"][2]["data"],
        json!({"$base64": "eyJqc29uIjoibm8ifQ=="})
    );
    client.close().await;
}
