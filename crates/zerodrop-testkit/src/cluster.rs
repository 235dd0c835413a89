//! Several real zerodrop processes on one real `redis-server`: what a load balancer sees.
//!
//! Every instance listens on its own fixed loopback port (so a restarted instance comes back
//! at the same address, like a pod behind a service), runs `--store redis` against the same
//! Redis, and shares one `secrets.json` (the first instance generates it; the others read the
//! same data dir), so any instance verifies any other's resume tokens. Instances are named
//! `node-0`, `node-1`, … (`--instance-id`), which is what `X-Zerodrop-Instance` and `welcome`
//! say. Everything is killed on drop.

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use anyhow::Context;

use crate::http::Api;
use crate::redis::RedisServer;
use crate::server::{Creds, ServerProcess};

pub struct Cluster {
    pub redis: RedisServer,
    bin: PathBuf,
    dir: tempfile::TempDir,
    ports: Vec<u16>,
    nodes: Vec<Option<ServerProcess>>,
    args: Vec<String>,
    pub creds: Creds,
}

impl Cluster {
    /// `n` instances of `bin` on a new Redis that keeps nothing on disk. `args` are extra
    /// `serve` flags for every instance.
    pub fn start(bin: &Path, n: usize, args: &[&str]) -> anyhow::Result<Cluster> {
        Self::start_on(bin, RedisServer::start()?, n, args)
    }

    /// `n` instances on the given Redis.
    pub fn start_on(
        bin: &Path,
        redis: RedisServer,
        n: usize,
        args: &[&str],
    ) -> anyhow::Result<Cluster> {
        let dir = tempfile::Builder::new()
            .prefix("zerodrop-cluster-")
            .tempdir()?;
        let mut ports = Vec::with_capacity(n);
        while ports.len() < n {
            let p = crate::free_port();
            if !ports.contains(&p) {
                ports.push(p);
            }
        }
        let mut cluster = Cluster {
            redis,
            bin: bin.to_path_buf(),
            dir,
            ports,
            nodes: (0..n).map(|_| None).collect(),
            args: args.iter().map(|a| a.to_string()).collect(),
            creds: Creds {
                api_key: String::new(),
                admin_token: String::new(),
                jwt_secret: String::new(),
            },
        };
        for i in 0..n {
            cluster.spawn_node(i)?;
        }
        cluster.creds = cluster.node(0).creds.clone();
        Ok(cluster)
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Starts (or starts again) instance `i` on its port.
    pub fn spawn_node(&mut self, i: usize) -> anyhow::Result<()> {
        anyhow::ensure!(self.nodes[i].is_none(), "node-{i} is running");
        let listen = format!("127.0.0.1:{}", self.ports[i]);
        let redis_url = self.redis.url();
        let name = format!("node-{i}");
        let mut args: Vec<&str> = vec![
            "--store",
            "redis",
            "--redis-url",
            &redis_url,
            "--instance-id",
            &name,
        ];
        args.extend(self.args.iter().map(String::as_str));
        // A port just released by a killed instance can take a moment to bind again.
        let mut last = None;
        for _ in 0..3 {
            match ServerProcess::spawn(&self.bin, self.dir.path(), &listen, &args, &[]) {
                Ok(p) => {
                    self.nodes[i] = Some(p);
                    return Ok(());
                }
                Err(e) => {
                    last = Some(e);
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
        Err(last.context("no attempt")?).with_context(|| format!("starting node-{i}"))
    }

    /// The running instance `i` (panics if it is down).
    pub fn node(&self, i: usize) -> &ServerProcess {
        self.nodes[i].as_ref().expect("the node is running")
    }

    pub fn is_running(&self, i: usize) -> bool {
        self.nodes[i].is_some()
    }

    /// `http://127.0.0.1:<port>` of instance `i`, whether or not it runs right now.
    pub fn url(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.ports[i])
    }

    pub fn ws_url(&self, i: usize) -> String {
        format!("ws://127.0.0.1:{}", self.ports[i])
    }

    pub fn urls(&self) -> Vec<String> {
        (0..self.len()).map(|i| self.url(i)).collect()
    }

    pub fn ws_urls(&self) -> Vec<String> {
        (0..self.len()).map(|i| self.ws_url(i)).collect()
    }

    /// An API client for instance `i` (at its fixed address).
    pub fn api(&self, i: usize) -> Api {
        Api::new(&self.url(i), &self.creds)
    }

    /// Connect token for `sub` on `streams`.
    pub fn token(&self, sub: &str, streams: &[&str]) -> String {
        self.creds.token(sub, streams, &[])
    }

    /// `kill -9` of instance `i`.
    pub fn kill9(&mut self, i: usize) {
        if let Some(mut p) = self.nodes[i].take() {
            p.kill9();
        }
    }

    /// SIGTERM to instance `i`; waits at most `limit` for its exit status. Its logs are
    /// returned too (they are gone with the process otherwise).
    pub fn terminate(
        &mut self,
        i: usize,
        limit: Duration,
    ) -> anyhow::Result<(ExitStatus, Vec<String>)> {
        self.signal_term(i);
        self.reap(i, limit)
    }

    /// Sends SIGTERM to instance `i` without waiting; [`Cluster::reap`] collects it.
    pub fn signal_term(&self, i: usize) {
        if let Some(p) = &self.nodes[i] {
            p.send_term();
        }
    }

    /// Waits (at most `limit`) for instance `i` to exit, e.g. after [`Cluster::signal_term`].
    pub fn reap(&mut self, i: usize, limit: Duration) -> anyhow::Result<(ExitStatus, Vec<String>)> {
        let mut p = self.nodes[i].take().context("not running")?;
        let status = p.wait_exit(limit)?;
        Ok((status, p.logs()))
    }

    pub fn logs(&self, i: usize) -> Vec<String> {
        self.nodes[i]
            .as_ref()
            .map(ServerProcess::logs)
            .unwrap_or_default()
    }
}
