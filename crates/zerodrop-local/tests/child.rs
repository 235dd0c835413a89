//! `ServeCommand` and `ServeChild` against `tests/fake-serve`, a shell script that logs the way
//! `zerodrop serve` does (so these tests need no server build): the address from the
//! `listening` line, flags and variables passed, both streams logged, signals, bounded waits,
//! and a start that fails within its bound.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use zerodrop_local::ServeCommand;

fn fake() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fake-serve")
}

fn command(mode: &str) -> ServeCommand {
    ServeCommand::new(&fake(), Path::new("/nonexistent/data"))
        .env("FAKE_SERVE", mode)
        .start_within(Duration::from_secs(10))
}

/// Waits (bounded) until `f` holds.
fn eventually(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "never: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn reports_its_address_and_logs_both_streams_then_drains_on_sigterm() {
    let mut child = command("serve")
        .listen("127.0.0.1:7")
        .args(["--store", "memory"])
        .env("ZERODROP_API_KEY", "k-given")
        .without_inherited_secrets()
        .spawn()
        .unwrap();
    assert_eq!(child.addr(), "127.0.0.1:4321".parse().unwrap());
    assert!(child.pid().is_some());
    let logs = child.logs();
    assert!(
        logs.iter().any(|l| l.contains(r#""message":"listening""#)),
        "the listening line is logged before the address is known: {logs:?}"
    );
    assert!(
        logs.iter()
            .any(|l| l
                == "args: serve --listen 127.0.0.1:7 --data-dir /nonexistent/data --store memory"),
        "{logs:?}"
    );
    eventually("stdout is logged too", || {
        child.logs().iter().any(|l| l == "format=json key=k-given")
    });

    child.signal(libc::SIGTERM);
    let status = child.wait_exit(Duration::from_secs(10)).unwrap();
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    assert!(child.pid().is_none(), "reaped");
    eventually("the drain is logged", || {
        child.logs().iter().any(|l| l.contains("drained"))
    });
    assert!(
        child.wait_exit(Duration::from_secs(1)).is_err(),
        "nothing left to wait for"
    );
}

#[test]
fn a_server_that_never_listens_is_killed_at_the_bound_and_one_that_exits_fails_at_once() {
    let started = Instant::now();
    let e = command("silent")
        .start_within(Duration::from_millis(500))
        .spawn()
        .unwrap_err();
    assert!(
        format!("{e:#}").contains("did not report a listening address within 500ms"),
        "{e:#}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));

    let e = command("exit").spawn().unwrap_err();
    assert!(
        format!("{e:#}").contains("error: unexpected argument"),
        "its output is in the error: {e:#}"
    );

    let e = ServeCommand::new(Path::new("/nonexistent/zerodrop"), Path::new("/tmp"))
        .spawn()
        .unwrap_err();
    assert!(format!("{e:#}").contains("cannot run"), "{e:#}");
}

#[tokio::test]
async fn async_start_and_wait_then_kill_on_drop() {
    let mut child = command("serve").spawn_async().await.unwrap();
    assert_eq!(child.addr().port(), 4321);
    let still = child
        .wait_exit_async(Duration::from_millis(100))
        .await
        .unwrap();
    assert!(still.is_none(), "still running after the bound");
    let pid = child.pid().unwrap() as libc::pid_t;
    drop(child);
    // SAFETY: signal 0 only asks whether the pid exists.
    let alive = unsafe { libc::kill(pid, 0) } == 0;
    assert!(!alive, "dropped means killed and reaped");

    let mut child = command("serve").spawn_async().await.unwrap();
    child.kill9();
    assert!(child.pid().is_none());
}
