//! Redis Sentinel for tests: a primary, one replica and three sentinels watching them, every
//! process on a free loopback port and killed on drop.
//!
//! The sentinels are the `redis-server` binary in sentinel mode (`redis-server <conf>
//! --sentinel`), so no package beyond `redis-server` is needed. They are tuned to fail over
//! fast: the primary is down after [`DOWN_AFTER_MS`] without an answer, with a quorum of 2.
//! Multi-line replies (`SENTINEL …`) are read with `redis-cli`, which ships with the server.
//!
//! Every wait here is bounded.

use std::io;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::redis::{RedisConfig, RedisServer, command, free_port, tail, wait_exit};

/// A primary that does not answer for this long is subjectively down.
pub const DOWN_AFTER_MS: u64 = 1000;
/// Sentinel's `failover-timeout` (also the pause before the same primary fails over again).
pub const FAILOVER_TIMEOUT_MS: u64 = 5000;
/// The name the sentinels monitor the primary under.
pub const MASTER_NAME: &str = "zdprimary";
/// How long the sentinels may take to see each other and the replica, or to fail over.
const SETTLE: Duration = Duration::from_secs(20);

/// One sentinel process.
pub struct RedisSentinel {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl RedisSentinel {
    /// A sentinel on a free port watching the primary on `primary_port`.
    pub fn start(primary_port: u16) -> io::Result<RedisSentinel> {
        let mut last_err = io::Error::other("no attempt made");
        for _ in 0..5 {
            let mut s = RedisSentinel {
                port: free_port()?,
                dir: tempfile::Builder::new()
                    .prefix("zerodrop-sentinel-")
                    .tempdir()?,
                child: None,
            };
            match s.launch(primary_port) {
                Ok(()) => return Ok(s),
                Err(e) => last_err = e,
            }
        }
        Err(last_err)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    fn launch(&mut self, primary_port: u16) -> io::Result<()> {
        let dir = self.dir.path();
        // Sentinel rewrites its configuration file, so it lives in the sentinel's own dir.
        let conf = dir.join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndaemonize no\nprotected-mode no\n\
                 dir {dir}\nlogfile {log}\n\
                 sentinel monitor {name} 127.0.0.1 {primary_port} 2\n\
                 sentinel down-after-milliseconds {name} {DOWN_AFTER_MS}\n\
                 sentinel failover-timeout {name} {FAILOVER_TIMEOUT_MS}\n\
                 sentinel parallel-syncs {name} 1\n",
                port = self.port,
                dir = dir.display(),
                log = self.log_path().display(),
                name = MASTER_NAME,
            ),
        )?;
        let mut child = Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if command(self.port, &["PING"], Duration::from_millis(500)).is_ok_and(|r| r == "+PONG")
            {
                self.child = Some(child);
                return Ok(());
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(io::Error::other(format!(
                    "redis-server --sentinel on port {} exited with {status}; log: {}",
                    self.port,
                    tail(&self.log_path())
                )));
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("sentinel on port {} did not answer PING", self.port),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `SENTINEL <args…>` through `redis-cli --raw`: one line per reply element.
    pub fn ask(&self, args: &[&str]) -> io::Result<Vec<String>> {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string(), "--raw", "SENTINEL"])
            .args(args)
            .stdin(Stdio::null())
            .output()?;
        if !out.status.success() {
            return Err(io::Error::other("redis-cli failed"));
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(String::from)
            .collect())
    }

    /// The port of the primary this sentinel names now.
    pub fn primary_port(&self) -> Option<u16> {
        let reply = self.ask(&["get-master-addr-by-name", MASTER_NAME]).ok()?;
        reply.get(1)?.trim().parse().ok()
    }

    /// One field of `SENTINEL master <name>` (e.g. `num-other-sentinels`).
    fn master_field(&self, field: &str) -> Option<String> {
        let reply = self.ask(&["master", MASTER_NAME]).ok()?;
        let at = reply.iter().position(|l| l == field)?;
        reply.get(at + 1).cloned()
    }

    /// The `+switch-master` lines of the sentinel's log: every failover it took part in or
    /// learned of, oldest first (`<name> <old ip> <old port> <new ip> <new port>`).
    pub fn switches(&self) -> Vec<String> {
        std::fs::read_to_string(self.log_path())
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("+switch-master"))
            .map(String::from)
            .collect()
    }

    /// The sentinel's log, for a failing test's message.
    pub fn log(&self) -> String {
        tail(&self.log_path())
    }

    fn log_path(&self) -> std::path::PathBuf {
        self.dir.path().join("sentinel.log")
    }
}

impl Drop for RedisSentinel {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = wait_exit(&mut child, Duration::from_secs(5));
        }
    }
}

/// A primary, its replica, and three sentinels that agree on both and on each other.
pub struct SentinelGroup {
    /// `servers[0]` starts as the primary, `servers[1]` as its replica; after a failover
    /// [`SentinelGroup::primary_port`] says which one leads.
    pub servers: Vec<RedisServer>,
    pub sentinels: Vec<RedisSentinel>,
}

impl SentinelGroup {
    /// Starts everything and waits (bounded) until the replica is in sync and every sentinel
    /// knows the replica and the two other sentinels, so that a failover can be agreed on.
    pub fn start() -> io::Result<SentinelGroup> {
        let primary = RedisServer::start()?;
        let replica = RedisServer::start_with(RedisConfig {
            replica_of: Some(primary.port()),
            ..RedisConfig::default()
        })?;
        let mut sentinels = Vec::new();
        for _ in 0..3 {
            sentinels.push(RedisSentinel::start(primary.port())?);
        }
        let group = SentinelGroup {
            servers: vec![primary, replica],
            sentinels,
        };
        group.settle()?;
        Ok(group)
    }

    /// Waits until the current primary has its replica in sync and every sentinel sees the
    /// replica and the other sentinels.
    pub fn settle(&self) -> io::Result<()> {
        let deadline = Instant::now() + SETTLE;
        loop {
            let ready = self.sentinels.iter().all(|s| {
                s.master_field("num-other-sentinels").as_deref() == Some("2")
                    && s.master_field("num-slaves")
                        .and_then(|n| n.parse::<u32>().ok())
                        .is_some_and(|n| n >= 1)
                    && s.master_field("flags").as_deref() == Some("master")
            }) && self.replica_in_sync();
            if ready {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "the sentinels did not settle; last log lines:\n{}",
                        self.sentinels[0].log()
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The current primary's `INFO replication` lists a replica that is `online`.
    fn replica_in_sync(&self) -> bool {
        let Some(port) = self.primary_port() else {
            return false;
        };
        let out = Command::new("redis-cli")
            .args(["-p", &port.to_string(), "INFO", "replication"])
            .stdin(Stdio::null())
            .output();
        out.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("state=online"))
    }

    /// `redis+sentinel://127.0.0.1:<p1>,127.0.0.1:<p2>,127.0.0.1:<p3>/<name>`
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .sentinels
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port()))
            .collect();
        format!("redis+sentinel://{}/{MASTER_NAME}", hosts.join(","))
    }

    /// The primary's port as the first sentinel that answers names it.
    pub fn primary_port(&self) -> Option<u16> {
        self.sentinels.iter().find_map(RedisSentinel::primary_port)
    }

    /// The index in `servers` of the server on `port`.
    pub fn index_of(&self, port: u16) -> Option<usize> {
        self.servers.iter().position(|s| s.port() == port)
    }

    /// `kill -9` of the current primary; returns its index in `servers`.
    pub fn kill_primary(&mut self) -> io::Result<usize> {
        let port = self
            .primary_port()
            .ok_or_else(|| io::Error::other("no sentinel names a primary"))?;
        let i = self
            .index_of(port)
            .ok_or_else(|| io::Error::other("the sentinels name an unknown primary"))?;
        self.servers[i].kill();
        Ok(i)
    }

    /// `SENTINEL FAILOVER <name>` on the first sentinel: the replica is promoted while the
    /// primary is alive, and the primary becomes its replica.
    pub fn switchover(&self) -> io::Result<()> {
        let reply = self.sentinels[0].ask(&["failover", MASTER_NAME])?;
        if reply.first().map(String::as_str) != Some("OK") {
            return Err(io::Error::other(format!(
                "SENTINEL FAILOVER answered {reply:?}"
            )));
        }
        Ok(())
    }

    /// A replica that lags: the replica (the server that is not the primary) is pointed at a
    /// port where nothing listens, so it keeps what it has and receives nothing more, while
    /// the primary goes on acknowledging writes. Sentinel still counts it as the primary's
    /// replica, and a failover soon after promotes it without the writes made since.
    pub fn cut_replica_link(&self) -> io::Result<()> {
        let primary = self
            .primary_port()
            .ok_or_else(|| io::Error::other("no sentinel names a primary"))?;
        let replica = self
            .servers
            .iter()
            .find(|s| s.port() != primary)
            .ok_or_else(|| io::Error::other("no replica"))?;
        let nowhere = free_port()?.to_string();
        let reply = replica.cmd(&["REPLICAOF", "127.0.0.1", &nowhere])?;
        if !reply.starts_with("+OK") {
            return Err(io::Error::other(format!("REPLICAOF answered {reply}")));
        }
        Ok(())
    }

    /// Waits (bounded) until every sentinel names a primary other than `old_port`, and
    /// returns its port.
    pub fn await_failover(&self, old_port: u16) -> io::Result<u16> {
        let deadline = Instant::now() + SETTLE;
        loop {
            let named: Vec<Option<u16>> = self
                .sentinels
                .iter()
                .map(RedisSentinel::primary_port)
                .collect();
            if let Some(Some(p)) = named.first()
                && *p != old_port
                && named.iter().all(|n| *n == Some(*p))
            {
                return Ok(*p);
            }
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "no failover away from port {old_port}; sentinels name {named:?}; \
                         last log lines:\n{}",
                        self.sentinels[0].log()
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The data dir of server `i` (its `redis.log` explains a failed start).
    pub fn dir(&self, i: usize) -> &Path {
        self.servers[i].dir()
    }
}
