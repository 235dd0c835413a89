//! A real `redis-server` for tests, on a free loopback port, in its own temporary directory.
//!
//! Tests that exercise the `redis` store need the real thing: failure behaviour (a stopped
//! server, a restart that keeps or loses its data, a pub/sub connection that drops) is exactly
//! what a fake would get wrong. Each [`RedisServer`] owns one process; it can be stopped
//! gracefully, killed, and started again on the same port with or without its data, and the
//! process is killed when the value is dropped, so a failing test leaves nothing behind.
//!
//! Every wait here is bounded: a server that does not answer `PING` in time is an error, never
//! a hang. Port 6379 is never used (a shared Redis may run there).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a server may take to answer its first `PING`.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a graceful stop may take before the process is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts at finding a port that stays free until `redis-server` binds it.
const PORT_ATTEMPTS: usize = 5;

/// How a test server keeps its data.
#[derive(Clone, Debug, Default)]
pub struct RedisConfig {
    /// `--appendonly yes --appendfsync always`: every acknowledged write survives a restart
    /// (and `kill -9`). Without it nothing is persisted (`--save ""`, no AOF).
    pub durable: bool,
    /// Start as a replica of the server on this loopback port.
    pub replica_of: Option<u16>,
    /// Extra `redis-server` arguments, e.g. `["--maxmemory", "10mb"]`.
    pub extra_args: Vec<String>,
}

/// One `redis-server` process on `127.0.0.1:<port>`.
pub struct RedisServer {
    port: u16,
    config: RedisConfig,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl RedisServer {
    /// A server that keeps nothing on disk.
    pub fn start() -> io::Result<RedisServer> {
        Self::start_with(RedisConfig::default())
    }

    /// A server that persists every write (AOF, fsync always).
    pub fn start_durable() -> io::Result<RedisServer> {
        Self::start_with(RedisConfig {
            durable: true,
            ..RedisConfig::default()
        })
    }

    pub fn start_with(config: RedisConfig) -> io::Result<RedisServer> {
        let mut last_err = io::Error::other("no attempt made");
        for _ in 0..PORT_ATTEMPTS {
            let mut server = RedisServer {
                port: free_port()?,
                config: config.clone(),
                dir: tempfile::Builder::new()
                    .prefix("zerodrop-redis-")
                    .tempdir()?,
                child: None,
            };
            match server.launch() {
                Ok(()) => return Ok(server),
                // Most likely another process took the port between probing and binding.
                Err(e) => last_err = e,
            }
        }
        Err(last_err)
    }

    /// `redis://127.0.0.1:<port>`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The directory holding the server's data and its log (`redis.log`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// This server's log lines about replication (syncs, role changes, flushes), oldest first:
    /// what a failing failover test shows, so that a replica's full resync or an empty server's
    /// promotion can be told from a write the product lost.
    pub fn replication_log(&self) -> Vec<String> {
        const WORDS: [&str; 5] = ["master", "replica", "sync", "flushing", "discarding"];
        std::fs::read_to_string(log_path(self.dir()))
            .unwrap_or_default()
            .lines()
            .filter(|l| {
                let l = l.to_ascii_lowercase();
                WORDS.iter().any(|w| l.contains(w)) && !l.contains("overcommit")
            })
            .map(String::from)
            .collect()
    }

    /// The process id while it runs (to pin or watch it).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Graceful stop: `SHUTDOWN` (a durable server flushes its AOF first), falling back to
    /// SIGTERM and finally SIGKILL if the process has not exited in time.
    pub fn stop(&mut self) -> io::Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        // The connection closes without a reply when the shutdown succeeds.
        let _ = command(self.port, &["SHUTDOWN"], Duration::from_secs(2));
        if wait_exit(&mut child, STOP_TIMEOUT / 2)? {
            return Ok(());
        }
        // SAFETY: `kill` with a pid this value owns and a valid signal number has no memory
        // effects; the worst outcome is an error code, which is ignored (SIGKILL follows).
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
        }
        if wait_exit(&mut child, STOP_TIMEOUT / 2)? {
            return Ok(());
        }
        child.kill()?;
        child.wait()?;
        Ok(())
    }

    /// SIGKILL: no flush, no goodbye (what a crash looks like to clients).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port with whatever data it kept. Does nothing if it
    /// is running.
    pub fn start_again(&mut self) -> io::Result<()> {
        if self.is_running() {
            return Ok(());
        }
        self.launch()
    }

    /// Starts the server again on the same port as a replica of the server on `port` (a failed
    /// primary rejoining after a failover). Does nothing if it is running.
    ///
    /// It rejoins with `replica-priority 0`: it holds nothing until its first full sync (which
    /// the primary delays by `repl-diskless-sync-delay`, 5 s), and Sentinel would promote it
    /// meanwhile (it picks a replica whose link went down a moment ago, synced or not), so a
    /// second, spurious failover would wipe the data set. A failover test meant to make one
    /// failover thus makes one.
    pub fn start_again_as_replica_of(&mut self, port: u16) -> io::Result<()> {
        if self.is_running() {
            return Ok(());
        }
        self.config.replica_of = Some(port);
        let never_promoted = ["--replica-priority".to_string(), "0".to_string()];
        if !self.config.extra_args.ends_with(&never_promoted) {
            self.config.extra_args.extend(never_promoted);
        }
        self.launch()
    }

    /// Stops the server gracefully and starts it again on the same port, keeping its data.
    pub fn restart(&mut self) -> io::Result<()> {
        self.stop()?;
        self.launch()
    }

    /// Kills the server, deletes all its data and starts it again, empty, on the same port.
    pub fn restart_empty(&mut self) -> io::Result<()> {
        self.kill();
        self.wipe()?;
        self.launch()
    }

    /// Deletes the server's data files. Only while it is stopped.
    pub fn wipe(&mut self) -> io::Result<()> {
        if self.is_running() {
            return Err(io::Error::other("wipe needs a stopped server"));
        }
        for entry in std::fs::read_dir(self.dir.path())? {
            let path = entry?.path();
            if path.file_name().is_some_and(|n| n == "redis.log") {
                continue;
            }
            if path.is_dir() {
                std::fs::remove_dir_all(&path)?;
            } else {
                std::fs::remove_file(&path)?;
            }
        }
        Ok(())
    }

    /// Sends one command and returns the first line of the reply (`+OK`, `:1`, `$5`, …).
    /// Enough for test set-up such as `CONFIG SET`; not a client.
    pub fn cmd(&self, args: &[&str]) -> io::Result<String> {
        command(self.port, args, Duration::from_secs(5))
    }

    fn launch(&mut self) -> io::Result<()> {
        let port = self.port.to_string();
        let dir = self.dir.path().to_path_buf();
        let mut args: Vec<String> = vec![
            "--port".into(),
            port,
            "--bind".into(),
            "127.0.0.1".into(),
            "--dir".into(),
            dir.display().to_string(),
            "--logfile".into(),
            log_path(&dir).display().to_string(),
            "--daemonize".into(),
            "no".into(),
            "--protected-mode".into(),
            "no".into(),
            "--save".into(),
            String::new(),
        ];
        if self.config.durable {
            args.extend(["--appendonly", "yes", "--appendfsync", "always"].map(String::from));
        } else {
            args.extend(["--appendonly", "no"].map(String::from));
        }
        if let Some(p) = self.config.replica_of {
            args.extend(["--replicaof".to_string(), "127.0.0.1".into(), p.to_string()]);
        }
        args.extend(self.config.extra_args.iter().cloned());
        let mut child = Command::new("redis-server")
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(reply) = command(self.port, &["PING"], Duration::from_millis(500))
                && reply == "+PONG"
            {
                // A server that answers PING may still be loading its AOF; wait until a data
                // command is no longer refused with LOADING (a cluster node without slots
                // answers CLUSTERDOWN, which is fine here).
                if let Ok(r) = command(
                    self.port,
                    &["EXISTS", "zerodrop-testkit-probe"],
                    Duration::from_millis(500),
                ) && !r.starts_with("-LOADING")
                {
                    self.child = Some(child);
                    return Ok(());
                }
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(io::Error::other(format!(
                    "redis-server on port {} exited with {status}; log: {}",
                    self.port,
                    tail(&log_path(&dir))
                )));
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "redis-server on port {} did not answer PING in time",
                        self.port
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn log_path(dir: &Path) -> PathBuf {
    dir.join("redis.log")
}

pub(crate) fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join("\n")
}

/// A port that was free a moment ago; never 6379.
pub(crate) fn free_port() -> io::Result<u16> {
    for _ in 0..16 {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        if port != 6379 {
            return Ok(port);
        }
    }
    Err(io::Error::other("no free port"))
}

pub(crate) fn wait_exit(child: &mut Child, timeout: Duration) -> io::Result<bool> {
    let deadline = Instant::now() + timeout;
    loop {
        if child.try_wait()?.is_some() {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One RESP command over a fresh connection; returns the first reply line.
pub(crate) fn command(port: u16, args: &[&str], timeout: Duration) -> io::Result<String> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut req = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        req.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        req.extend_from_slice(a.as_bytes());
        req.extend_from_slice(b"\r\n");
    }
    stream.write_all(&req)?;
    let mut reader = BufReader::new(stream.take(64 * 1024));
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed",
        ));
    }
    Ok(line.trim_end().to_string())
}

/// A Redis Cluster of `masters` primaries (no replicas) on free loopback ports, created with
/// `redis-cli --cluster create`. The nodes are killed on drop.
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start(masters: usize) -> io::Result<RedisCluster> {
        let mut nodes = Vec::new();
        for _ in 0..masters.max(3) {
            nodes.push(RedisServer::start_with(RedisConfig {
                extra_args: [
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "2000",
                ]
                .map(String::from)
                .to_vec(),
                ..RedisConfig::default()
            })?);
        }
        let mut args: Vec<String> = vec!["--cluster".into(), "create".into()];
        args.extend(nodes.iter().map(|n| format!("127.0.0.1:{}", n.port())));
        args.extend(["--cluster-replicas", "0", "--cluster-yes"].map(String::from));
        let out = Command::new("redis-cli")
            .args(&args)
            .stdin(Stdio::null())
            .output()?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "redis-cli --cluster create failed: {}",
                String::from_utf8_lossy(&out.stdout)
            )));
        }
        let cluster = RedisCluster { nodes };
        let deadline = Instant::now() + START_TIMEOUT;
        while !cluster.is_ok()? {
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "cluster_state never became ok",
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(cluster)
    }

    /// Every node agrees the cluster is up.
    fn is_ok(&self) -> io::Result<bool> {
        for n in &self.nodes {
            let out = Command::new("redis-cli")
                .args(["-p", &n.port().to_string(), "cluster", "info"])
                .stdin(Stdio::null())
                .output()?;
            if !String::from_utf8_lossy(&out.stdout).contains("cluster_state:ok") {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The seed node list, as `ZERODROP_REDIS_URL` takes it: `redis://a,redis://b,…`.
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(RedisServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }
}

/// `redis-benchmark -p <port> -n <n> -c <clients> -q XADD bench '*' f v`: the raw `XADD` rate
/// of a server, the baseline benchmarks compare with. Prints the command and its result line.
pub fn xadd_baseline(port: u16, clients: u32, n: u32) -> Result<f64, String> {
    let args = [
        "-p".to_string(),
        port.to_string(),
        "-n".into(),
        n.to_string(),
        "-c".into(),
        clients.to_string(),
        "-q".into(),
        "XADD".into(),
        "bench".into(),
        "*".into(),
        "f".into(),
        "v".into(),
    ];
    println!("$ redis-benchmark {}", args.join(" "));
    let out = Command::new("redis-benchmark")
        .args(&args)
        .output()
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stdout);
    // `-q` prints e.g. "XADD bench * f v: 81234.56 requests per second, p50=0.311 msec"; the
    // line may carry progress output before a carriage return.
    let line = text.rsplit('\r').next().unwrap_or(&text).trim().to_string();
    println!("  {line}");
    line.split(": ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("cannot read redis-benchmark output: {text:?}"))
}
