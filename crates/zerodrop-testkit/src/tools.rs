//! Outside programs the tests drive (`node`, `npm`, `tsc`): finding them, and running one to
//! completion within a time limit.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// `name` in `/usr/bin` or anywhere on `PATH`; panics with `install` (how to get it) when the
/// machine lacks it.
pub fn find_tool(name: &str, install: &str) -> PathBuf {
    let usr = Path::new("/usr/bin").join(name);
    if usr.exists() {
        return usr;
    }
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join(name))
            .find(|p| p.exists())
    });
    found.unwrap_or_else(|| {
        panic!("`{name}` is required by these tests and was not found; install it with `{install}`")
    })
}

/// Runs `cmd` to completion within `limit` (then kills it and panics), returning its output.
/// Both pipes are read aside, so a chatty child never blocks on a full pipe.
pub fn run_within(mut cmd: Command, what: &str, limit: Duration) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    let read_aside = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        pipe.map(|mut s| {
            std::thread::spawn(move || {
                let mut v = Vec::new();
                let _ = s.read_to_end(&mut v);
                v
            })
        })
    };
    let out = read_aside(child.stdout.take().map(|s| Box::new(s) as _));
    let err = read_aside(child.stderr.take().map(|s| Box::new(s) as _));
    let until = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() > until {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let join = |h: Option<std::thread::JoinHandle<Vec<u8>>>| {
        h.map(|h| h.join().unwrap_or_default()).unwrap_or_default()
    };
    Output {
        status,
        stdout: join(out),
        stderr: join(err),
    }
}
