//! `zerodrop serve` as a child process of a tool or a test.
//!
//! [`ServeCommand`] says how to start it (binary, data dir, listen address, flags, variables);
//! [`ServeCommand::spawn`] (blocking) or [`ServeCommand::spawn_async`] starts it and returns a
//! [`ServeChild`] once the server has logged the address it listens on. Both streams of the
//! child are read by a thread each into its log (all lines, or the newest N). A [`ServeChild`]
//! can be signalled (SIGTERM drains, SIGINT is Ctrl-C, SIGKILL is a crash), waited for within
//! a limit, and is killed and reaped when dropped, so no server outlives its owner.
//!
//! Every wait here is bounded. This module must not speak the server's protocol (the callers
//! do, over the wire) nor decide what a stop means for a test or a game day.

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// The variables a server takes its secrets from before it reads `secrets.json`.
pub const SECRET_VARS: [&str; 4] = [
    "ZERODROP_API_KEY",
    "ZERODROP_ADMIN_TOKEN",
    "ZERODROP_JWT_SECRET",
    "ZERODROP_RESUME_KEYS",
];

/// How often a wait looks at the child again.
const POLL: Duration = Duration::from_millis(20);

/// How to start `<bin> serve --listen <listen> --data-dir <data_dir> <args…>`.
///
/// The child logs JSON (`ZERODROP_LOG_FORMAT=json`, which a variable given here overrides),
/// inherits this process's other variables, and has no stdin. (No `Debug`: its variables may
/// hold secrets.)
#[derive(Clone)]
pub struct ServeCommand {
    bin: PathBuf,
    data_dir: PathBuf,
    listen: String,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    env_remove: Vec<OsString>,
    keep_lines: usize,
    start_within: Duration,
    cpu: Option<usize>,
}

impl ServeCommand {
    /// `bin serve` on `data_dir`, on a free loopback port, keeping every log line, and given
    /// 30 s to report its address.
    pub fn new(bin: &Path, data_dir: &Path) -> ServeCommand {
        ServeCommand {
            bin: bin.to_path_buf(),
            data_dir: data_dir.to_path_buf(),
            listen: "127.0.0.1:0".into(),
            args: Vec::new(),
            env: Vec::new(),
            env_remove: Vec::new(),
            keep_lines: usize::MAX,
            start_within: Duration::from_secs(30),
            cpu: None,
        }
    }

    /// The `--listen` address (`127.0.0.1:0` picks a free port).
    pub fn listen(mut self, addr: &str) -> ServeCommand {
        self.listen = addr.into();
        self
    }

    /// More `serve` flags, after `--listen` and `--data-dir`.
    pub fn args<I, S>(mut self, args: I) -> ServeCommand
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_os_string()));
        self
    }

    /// Sets a variable in the child's environment.
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> ServeCommand {
        self.env
            .push((key.as_ref().to_os_string(), value.as_ref().to_os_string()));
        self
    }

    /// Removes an inherited variable from the child's environment (one set with
    /// [`ServeCommand::env`] still applies).
    pub fn env_remove(mut self, key: impl AsRef<OsStr>) -> ServeCommand {
        self.env_remove.push(key.as_ref().to_os_string());
        self
    }

    /// Removes the inherited [`SECRET_VARS`], so the server takes its secrets from (or
    /// generates them into) its data dir's `secrets.json`, whatever this process's
    /// environment holds.
    pub fn without_inherited_secrets(self) -> ServeCommand {
        SECRET_VARS.iter().fold(self, |c, k| c.env_remove(k))
    }

    /// Keeps only the newest `n` log lines (a long-running instance), instead of all.
    pub fn keep_last_lines(mut self, n: usize) -> ServeCommand {
        self.keep_lines = n.max(1);
        self
    }

    /// How long the server has to log its address before it is killed and the start fails.
    pub fn start_within(mut self, limit: Duration) -> ServeCommand {
        self.start_within = limit;
        self
    }

    /// Runs the server on CPU `cpu` alone, set before it starts, so that its runtime sizes
    /// itself to that one core (as `taskset -c` would; for benchmarks "per core").
    pub fn on_cpu(mut self, cpu: usize) -> ServeCommand {
        self.cpu = Some(cpu);
        self
    }

    /// Starts the server and blocks (at most [`ServeCommand::start_within`]) until it has
    /// logged its address. For code that is not async; async code uses
    /// [`ServeCommand::spawn_async`], which leaves its runtime's thread free meanwhile.
    pub fn spawn(self) -> anyhow::Result<ServeChild> {
        let limit = self.start_within;
        let (mut child, addrs) = self.launch()?;
        match addrs.recv_timeout(limit) {
            Ok(a) => {
                child.addr = a;
                Ok(child)
            }
            Err(_) => child.failed_to_start(limit),
        }
    }

    /// [`ServeCommand::spawn`] for async code.
    pub async fn spawn_async(self) -> anyhow::Result<ServeChild> {
        let limit = self.start_within;
        let (mut child, addrs) = self.launch()?;
        let deadline = Instant::now() + limit;
        loop {
            match addrs.try_recv() {
                Ok(a) => {
                    child.addr = a;
                    return Ok(child);
                }
                // Both streams closed: the process is gone without having listened.
                Err(TryRecvError::Disconnected) => return child.failed_to_start(limit),
                Err(TryRecvError::Empty) if Instant::now() >= deadline => {
                    return child.failed_to_start(limit);
                }
                Err(TryRecvError::Empty) => tokio::time::sleep(POLL).await,
            }
        }
    }

    /// Starts the process and its two readers; the receiver gets the address once logged and
    /// is disconnected when both streams have ended.
    fn launch(self) -> anyhow::Result<(ServeChild, Receiver<SocketAddr>)> {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("serve")
            .arg("--listen")
            .arg(&self.listen)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(&self.args)
            .env("ZERODROP_LOG_FORMAT", "json")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for k in &self.env_remove {
            cmd.env_remove(k);
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        if let Some(cpu) = self.cpu {
            pin_before_exec(&mut cmd, cpu);
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot run {} serve", self.bin.display()))?;
        let log = Arc::new(Mutex::new(Log {
            lines: VecDeque::new(),
            keep: self.keep_lines,
        }));
        let (tx, rx) = mpsc::channel();
        let streams: [Option<Box<dyn Read + Send>>; 2] = [
            child.stdout.take().map(|o| Box::new(o) as _),
            child.stderr.take().map(|e| Box::new(e) as _),
        ];
        for out in streams.into_iter().flatten() {
            let (log, tx) = (log.clone(), tx.clone());
            // A thread per stream, ended by the stream's end (the process's exit), so a
            // chatty server never blocks on a full pipe and no runtime is needed.
            std::thread::Builder::new()
                .name("zerodrop-serve-log".into())
                .spawn(move || {
                    for line in BufReader::new(out).lines().map_while(Result::ok) {
                        let addr = listening_addr(&line);
                        // Kept before the address is announced, so a caller that has the
                        // address also finds the `listening` line in the log.
                        lock(&log).push(line);
                        if let Some(a) = addr {
                            let _ = tx.send(a);
                        }
                    }
                })
                .context("cannot start a log reader thread")?;
        }
        Ok((
            ServeChild {
                child: Some(child),
                addr: SocketAddr::from(([127, 0, 0, 1], 0)),
                bin: self.bin,
                log,
            },
            rx,
        ))
    }
}

/// Pins process (or thread) `pid` (0: the caller) to CPU `cpu`; false when the machine has
/// no such CPU or refuses.
pub fn pin(pid: u32, cpu: usize) -> bool {
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET writes inside it for cpu < 1024.
    unsafe {
        if cpu >= libc::CPU_SETSIZE as usize {
            return false;
        }
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(pid as libc::pid_t, std::mem::size_of_val(&set), &set) == 0
    }
}

/// Makes `cmd`'s process start on CPU `cpu` alone (pinned between fork and exec). A machine
/// without that CPU leaves it unpinned.
pub fn pin_before_exec(cmd: &mut Command, cpu: usize) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure makes one system call (sched_setaffinity) in the forked child.
    unsafe {
        cmd.pre_exec(move || {
            pin(0, cpu);
            Ok(())
        });
    }
}

/// The address in a `listening` log line: JSON (`"addr":"…"`) or text (`addr=…`).
pub fn listening_addr(line: &str) -> Option<SocketAddr> {
    if !line.contains("listening") {
        return None;
    }
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
        let a = v
            .get("addr")
            .or_else(|| v.pointer("/fields/addr"))?
            .as_str()?;
        return a.parse().ok();
    }
    line.split(|c: char| c.is_whitespace() || c == '"')
        .filter_map(|w| w.strip_prefix("addr=").or(Some(w)))
        .find_map(|w| w.parse::<SocketAddr>().ok())
}

/// The lines a child logged, the oldest dropped beyond `keep`.
struct Log {
    lines: VecDeque<String>,
    keep: usize,
}

impl Log {
    fn push(&mut self, line: String) {
        if self.lines.len() >= self.keep {
            self.lines.pop_front();
        }
        self.lines.push_back(line);
    }
}

/// A poisoned log is still a log: a reader that panicked does not hide what was read.
fn lock(log: &Mutex<Log>) -> std::sync::MutexGuard<'_, Log> {
    log.lock().unwrap_or_else(|p| p.into_inner())
}

/// A running `zerodrop serve`, killed and reaped when dropped.
pub struct ServeChild {
    /// `None` once the process has been reaped.
    child: Option<Child>,
    addr: SocketAddr,
    bin: PathBuf,
    log: Arc<Mutex<Log>>,
}

impl std::fmt::Debug for ServeChild {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServeChild")
            .field("pid", &self.pid())
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl ServeChild {
    /// The address it reported in its `listening` line.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its process id; `None` once it has been reaped.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The lines it has logged (both streams), oldest first.
    pub fn logs(&self) -> Vec<String> {
        lock(&self.log).lines.iter().cloned().collect()
    }

    /// Sends `signal` (`libc::SIGTERM` drains, `libc::SIGINT` is Ctrl-C) without waiting.
    /// Nothing happens once it has been reaped.
    pub fn signal(&self, signal: libc::c_int) {
        if let Some(c) = &self.child {
            // SAFETY: kill(2) on our own, not yet reaped, child's pid with a valid signal
            // number; no memory is involved.
            unsafe {
                libc::kill(c.id() as libc::pid_t, signal);
            }
        }
    }

    /// `kill -9` and reap: no drain, no flush, nothing.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            // A SIGKILLed process exits at once; this only collects its status.
            let _ = c.wait();
        }
    }

    /// Waits (blocking, at most `limit`) for it to exit and reaps it. `None`: still running
    /// after `limit` (it is left running, to be signalled or killed).
    pub fn wait_exit(&mut self, limit: Duration) -> anyhow::Result<Option<ExitStatus>> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.try_exit()? {
                return Ok(Some(s));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(POLL);
        }
    }

    /// [`ServeChild::wait_exit`] for async code.
    pub async fn wait_exit_async(&mut self, limit: Duration) -> anyhow::Result<Option<ExitStatus>> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.try_exit()? {
                return Ok(Some(s));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Its exit status if it has exited (and reaps it); an error once it has been reaped.
    fn try_exit(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        let c = self
            .child
            .as_mut()
            .context("zerodrop serve is not running")?;
        let s = c.try_wait().context("waiting for zerodrop serve")?;
        if s.is_some() {
            self.child = None;
        }
        Ok(s)
    }

    fn failed_to_start<T>(mut self, limit: Duration) -> anyhow::Result<T> {
        self.kill9();
        bail!(
            "{} serve did not report a listening address within {limit:?}; its output:\n{}",
            self.bin.display(),
            self.logs().join("\n")
        )
    }
}

impl Drop for ServeChild {
    fn drop(&mut self) {
        self.kill9();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_address_in_json_and_text_logs() {
        let j = r#"{"timestamp":"x","level":"INFO","addr":"127.0.0.1:40123","store":"sqlite","message":"listening"}"#;
        assert_eq!(listening_addr(j), Some("127.0.0.1:40123".parse().unwrap()));
        let t = "2026-11-22T21:20:04Z  INFO zerodrop_server::server: listening addr=127.0.0.1:7700 store=sqlite";
        assert_eq!(listening_addr(t), Some("127.0.0.1:7700".parse().unwrap()));
        assert_eq!(listening_addr("started addr=127.0.0.1:1"), None);
    }

    #[test]
    fn a_full_log_drops_its_oldest_lines() {
        let mut log = Log {
            lines: VecDeque::new(),
            keep: 2,
        };
        for l in ["a", "b", "c"] {
            log.push(l.into());
        }
        assert_eq!(log.lines, ["b", "c"]);
    }
}
