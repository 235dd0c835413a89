//! Clock jumps, end to end: a server whose clock is a `ManualClock` (`jump` changes the wall
//! clock it reads, `advance` lets real time pass). What the protocol defines in wall-clock
//! time (a connect token's `exp`) follows a forward jump at once and never a backward one;
//! what the server measures itself (reconnect windows, the maximum session age, the age of
//! stored events, job leases) counts real elapsed time only.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use zerodrop_core::clock::{Clock, ManualClock};
use zerodrop_core::{Seq, StreamId};
use zerodrop_server::config::{UpstreamConfig, WebhookConfig};
use zerodrop_server::guard::config::QosClassSetting;
use zerodrop_store::{JobStatus, QosClass};
use zerodrop_testkit::http::Resp;
use zerodrop_testkit::server::TestServer;
use zerodrop_testkit::upstream::{FakeUpstream, Mode};

const HOUR: i64 = 3_600_000;
const MIN: u64 = 60_000;

/// A server on `clock` (starting at the real time, so that tokens minted with real
/// timestamps mean what they say).
async fn server(clock: &ManualClock, f: impl FnOnce(&mut zerodrop_server::Config)) -> TestServer {
    let clock: Arc<dyn Clock> = Arc::new(clock.clone());
    TestServer::with(move |c| {
        c.clock = clock;
        f(c)
    })
    .await
}

/// A connect token for `u1` on `room:*` expiring `secs` from the real now.
fn token_for(s: &TestServer, secs: u64) -> String {
    let exp = zerodrop_core::now_ms() / 1000 + secs;
    s.creds.token_until("u1", &["room:*"], &[], exp)
}

async fn open(s: &TestServer, token: &str) -> Resp {
    s.api()
        .post("/v1/sessions", Some(token), json!({"streams": ["room:1"]}))
        .await
}

/// Opens a session on `room:1`: its id and resume token.
async fn opened(s: &TestServer, token: &str) -> (String, String) {
    let r = open(s, token).await;
    assert_eq!(r.status, 201, "{}", r.text);
    (
        r.json["sessionId"].as_str().unwrap().to_string(),
        r.json["resumeToken"].as_str().unwrap().to_string(),
    )
}

fn seqs(window: &Value) -> Vec<u64> {
    window["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect()
}

/// A connect token expiring in 30 minutes is refused once the wall clock jumps an hour
/// forward (it has expired by the clock its issuer uses), and stays refused when the clock
/// goes back (a backward jump never revives a credential). One expiring in 3 hours works
/// throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_tokens_follow_a_forward_jump_and_never_a_backward_one() {
    let clock = ManualClock::starting_now();
    let s = server(&clock, |_| {}).await;
    let (short, long) = (token_for(&s, 30 * 60), token_for(&s, 3 * 3600));
    assert_eq!(open(&s, &short).await.status, 201);
    clock.jump(HOUR);
    let r = open(&s, &short).await;
    assert_eq!((r.status, r.code()), (401, "UNAUTHORIZED"), "{}", r.text);
    assert_eq!(r.json["error"]["message"], "the connect token has expired");
    assert_eq!(open(&s, &long).await.status, 201, "+1 h");
    clock.jump(-2 * HOUR);
    let r = open(&s, &short).await;
    assert_eq!(
        (r.status, r.code()),
        (401, "UNAUTHORIZED"),
        "-1 h: {}",
        r.text
    );
    assert_eq!(open(&s, &long).await.status, 201, "-1 h");
}

/// A session inside its reconnect window (900 s, real time) resumes after a jump of an hour
/// either way, with exactly the events it missed; it ends when the window has really passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_inside_its_window_resumes_after_a_jump_either_way() {
    let clock = ManualClock::starting_now();
    let s = server(&clock, |_| {}).await;
    let api = s.api();
    let (sid, mut resume) = opened(&s, &token_for(&s, 3 * 3600)).await;
    api.publish("room:1", json!(1)).await;
    api.publish("room:1", json!(2)).await;
    // No time passes on the line before the 899 s below: a resume records its new window in
    // the background, and the test must not depend on when that lands.
    clock.jump(HOUR);
    let r = api.reconnect(&sid, &resume).await;
    assert_eq!(r.status, 200, "+1 h: {}", r.text);
    assert_eq!(seqs(&r.json["replay"]["room:1"]), vec![1, 2]);
    resume = r.json["resumeToken"].as_str().unwrap().to_string();
    api.publish("room:1", json!(3)).await;
    clock.jump(-2 * HOUR);
    let r = api.reconnect(&sid, &resume).await;
    assert_eq!(r.status, 200, "-1 h: {}", r.text);
    assert_eq!(seqs(&r.json["replay"]["room:1"]), vec![1, 2, 3]);
    resume = r.json["resumeToken"].as_str().unwrap().to_string();
    // Real time: the window ends 900 s after the last resume, not before.
    clock.advance(899_000);
    let r = api.reconnect(&sid, &resume).await;
    assert_eq!(r.status, 200, "899 s later: {}", r.text);
    resume = r.json["resumeToken"].as_str().unwrap().to_string();
    clock.advance(901_000);
    let r = api.reconnect(&sid, &resume).await;
    assert_eq!(
        (r.status, r.code()),
        (410, "RECONNECT_WINDOW_EXPIRED"),
        "{}",
        r.text
    );
}

/// The session's authority: its connect token's `exp` (+ the grace) is a wall-clock instant,
/// so a forward jump past it ends the session's access (`TOKEN_EXPIRED`) and a backward jump
/// does not give it back; the maximum session age is the server's own duration, which no
/// jump shortens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_authority_follows_the_token_and_the_age_follows_real_time() {
    let clock = ManualClock::starting_now();
    let s = server(&clock, |c| {
        c.reconnect_window_sec = 7200;
        c.max_session_age_sec = 1800;
    })
    .await;
    let api = s.api();
    let (short_sid, short_resume) = opened(&s, &token_for(&s, 30 * 60)).await;
    let (sid, resume) = opened(&s, &token_for(&s, 3 * 3600)).await;
    clock.jump(HOUR);
    let r = api.reconnect(&short_sid, &short_resume).await;
    assert_eq!((r.status, r.code()), (401, "TOKEN_EXPIRED"), "{}", r.text);
    let r = api.reconnect(&sid, &resume).await;
    assert_eq!(
        r.status, 200,
        "+1 h: the session's age is still 0: {}",
        r.text
    );
    clock.jump(-2 * HOUR);
    let r = api.reconnect(&short_sid, &short_resume).await;
    assert_eq!(
        (r.status, r.code()),
        (401, "TOKEN_EXPIRED"),
        "-1 h: {}",
        r.text
    );
    clock.advance(1799 * 1000);
    let r = api.reconnect(&sid, &resume).await;
    assert_eq!(r.status, 200, "1799 s old: {}", r.text);
    clock.advance(1001);
    let r = api.reconnect(&sid, &resume).await;
    assert_eq!(
        (r.status, r.code()),
        (410, "RECONNECT_WINDOW_EXPIRED"),
        "1800 s old: {}",
        r.text
    );
}

/// Retention by age as the server runs it (SQLite, its sweep run at once): an hour's jump
/// either way trims nothing; ten real minutes trim everything older.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_trimmed_by_their_real_age() {
    let clock = ManualClock::starting_now();
    let s = server(&clock, |c| c.retention.max_age_ms = 10 * MIN).await;
    let api = s.api();
    for i in 1..=3 {
        api.publish("room:1", json!(i)).await;
    }
    let db = s.sqlite().expect("the sqlite store");
    let retained = || async {
        let r = s
            .app()
            .read(&StreamId::new("room:1").unwrap(), Seq(0), 10)
            .await;
        r.unwrap()
            .events
            .iter()
            .map(|e| e.seq().0)
            .collect::<Vec<_>>()
    };
    for jump in [HOUR, -2 * HOUR] {
        clock.jump(jump);
        db.sweep_now().await.unwrap();
        assert_eq!(retained().await, vec![1, 2, 3], "jump {jump}");
    }
    clock.advance(10 * MIN);
    api.publish("room:1", json!(4)).await;
    clock.advance(1);
    db.sweep_now().await.unwrap();
    assert_eq!(retained().await, vec![4]);
}

/// A job lease held by a worker whose delivery is still running is not taken over by the
/// instance's own claim loop when the clock jumps an hour either way; with no heartbeat (it
/// is set far apart here) it is taken over once the lease has really lapsed, as attempt 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_lease_is_not_taken_over_on_a_jump() {
    let clock = ManualClock::starting_now();
    let up = FakeUpstream::start().await;
    up.set(Mode::Slow(Duration::from_secs(8)));
    let url = up.url.clone();
    let s = server(&clock, move |c| {
        c.guard.jobs.lease_ms = 60_000;
        c.guard.jobs.heartbeat_ms = 3_600_000;
        c.guard.upstreams.insert(
            "app".into(),
            UpstreamConfig {
                primary: url,
                timeout_ms: 20_000,
                ..UpstreamConfig::default()
            },
        );
        c.guard.webhooks.insert(
            "pay".into(),
            WebhookConfig {
                upstream: Some("app".into()),
                class: QosClassSetting(QosClass::Interactive),
                ..WebhookConfig::default()
            },
        );
    })
    .await;
    let r = s
        .api()
        .request(
            reqwest::Method::POST,
            "/v1/webhooks/pay",
            Some(&s.creds.api_key),
            Some(json!({"n": 1}).to_string()),
            &[("idempotency-key", "evt-1")],
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.text);
    let job = r.json["jobId"].as_u64().unwrap();
    up.wait_until("attempt 1 in flight", |r| r.len() == 1).await;
    let held = s.app().guard_store().job_get(job).await.unwrap().unwrap();
    assert_eq!((held.status, held.attempts), (JobStatus::Running, 1));
    for jump in [HOUR, -2 * HOUR] {
        clock.jump(jump);
        s.app().guard.wake.notify_one();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = s.app().guard_store().job_get(job).await.unwrap().unwrap();
        assert_eq!(
            (
                now.attempts,
                &now.worker,
                now.lease_expires_at_ms,
                up.count()
            ),
            (1, &held.worker, held.lease_expires_at_ms, 1),
            "jump {jump}: the lease stays with its worker"
        );
    }
    clock.advance(60_001);
    s.app().guard.wake.notify_one();
    let got = up.wait_until("attempt 2", |r| r.len() == 2).await;
    assert_eq!(got[1].header("x-zerodrop-attempt"), Some("2"));
}

/// A subject revoked after a jump either way: the session it opened before the revocation
/// and the connect token issued before it are refused (`REVOKED`). A revocation records the
/// later of the two clocks, since sessions are stamped on the time line and tokens on their
/// issuer's clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_covers_what_was_issued_before_it_after_a_jump() {
    for jump in [-HOUR, HOUR] {
        let clock = ManualClock::starting_now();
        let s = server(&clock, |_| {}).await;
        let token = token_for(&s, 3 * 3600);
        let (sid, resume) = opened(&s, &token).await;
        clock.advance(1000); // the revocation comes a second after both were issued
        clock.jump(jump);
        let r = s
            .api()
            .post(
                "/admin/revoke",
                Some(&s.creds.admin_token),
                json!({"sub": "u1"}),
            )
            .await;
        assert_eq!(r.status, 201, "{}", r.text);
        let r = s.api().reconnect(&sid, &resume).await;
        assert_eq!(
            (r.status, r.code()),
            (401, "REVOKED"),
            "jump {jump}: {}",
            r.text
        );
        let r = open(&s, &token).await;
        assert_eq!(
            (r.status, r.code()),
            (401, "REVOKED"),
            "jump {jump}: {}",
            r.text
        );
    }
}
