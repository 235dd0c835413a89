//! Running zerodrop for a test: in this process, or as a child process.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use zerodrop_server::auth::{ConnectClaims, mint_connect_token};
use zerodrop_server::{Config, Running};

use crate::WAIT;
use crate::http::Api;

/// The credentials a server generated into its data dir.
#[derive(Clone, Debug)]
pub struct Creds {
    pub api_key: String,
    pub admin_token: String,
    pub jwt_secret: String,
}

impl Creds {
    pub fn from_data_dir(dir: &Path) -> anyhow::Result<Creds> {
        let f = zerodrop_server::secrets::read_file(dir)?.context("no secrets.json")?;
        Ok(Creds {
            api_key: f.api_key.context("apiKey")?,
            admin_token: f.admin_token.context("adminToken")?,
            jwt_secret: f.jwt_secret.context("jwtSecret")?,
        })
    }

    /// A connect token for `sub` allowed on `streams` (and publishing to `publish`).
    pub fn token(&self, sub: &str, streams: &[&str], publish: &[&str]) -> String {
        self.token_until(sub, streams, publish, zerodrop_core::now_ms() / 1000 + 3600)
    }

    pub fn token_until(&self, sub: &str, streams: &[&str], publish: &[&str], exp: u64) -> String {
        let claims = ConnectClaims {
            sub: sub.into(),
            exp,
            streams: streams.iter().map(|s| s.to_string()).collect(),
            publish: (!publish.is_empty()).then(|| publish.iter().map(|s| s.to_string()).collect()),
            upstreams: Vec::new(),
        };
        mint_connect_token(&self.jwt_secret, &claims)
    }

    /// A connect token for `sub` (no streams) that may call the `upstreams` (names or
    /// prefixes ending in `*`) through `GET /v1/upstreams/…`.
    pub fn upstream_token(&self, sub: &str, upstreams: &[&str]) -> String {
        let claims = ConnectClaims {
            sub: sub.into(),
            exp: zerodrop_core::now_ms() / 1000 + 3600,
            streams: Vec::new(),
            publish: None,
            upstreams: upstreams.iter().map(|s| s.to_string()).collect(),
        };
        mint_connect_token(&self.jwt_secret, &claims)
    }
}

/// zerodrop running inside the test process, on a free port, with a real data dir.
pub struct TestServer {
    running: Option<Running>,
    pub addr: SocketAddr,
    pub url: String,
    pub creds: Creds,
    pub data_dir: PathBuf,
    _dir: Option<tempfile::TempDir>,
}

impl TestServer {
    /// SQLite store in a fresh temporary directory, every other setting at its default.
    pub async fn start() -> TestServer {
        Self::with(|_| {}).await
    }

    pub async fn with(f: impl FnOnce(&mut Config)) -> TestServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().to_path_buf();
        let mut s = Self::start_in(&path, f).await;
        s._dir = Some(dir);
        s
    }

    /// Starts on `data_dir` (e.g. to restart a stopped server on the same data).
    pub async fn start_in(data_dir: &Path, f: impl FnOnce(&mut Config)) -> TestServer {
        let mut cfg = Config::for_tests(data_dir);
        f(&mut cfg);
        let running = zerodrop_server::start(cfg).await.expect("server starts");
        let addr = running.addr;
        let creds = Creds::from_data_dir(data_dir).expect("secrets written");
        TestServer {
            running: Some(running),
            addr,
            url: format!("http://{addr}"),
            creds,
            data_dir: data_dir.to_path_buf(),
            _dir: None,
        }
    }

    pub fn app(&self) -> &Arc<zerodrop_server::app::App> {
        &self.running.as_ref().expect("running").app
    }

    /// The SQLite store (the default), to reach its test hooks.
    pub fn sqlite(&self) -> Option<&Arc<zerodrop_store::SqliteStore>> {
        self.running.as_ref().and_then(|r| r.sqlite())
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}", self.addr)
    }

    pub fn api(&self) -> Api {
        Api::new(&self.url, &self.creds)
    }

    pub fn token(&self, sub: &str, streams: &[&str]) -> String {
        self.creds.token(sub, streams, &[])
    }

    /// Stops (no drain) and keeps the data dir for a restart; returns the dir's owner.
    pub async fn stop(mut self) -> Option<tempfile::TempDir> {
        if let Some(r) = self.running.take() {
            r.stop_now().await.expect("clean stop");
        }
        self._dir.take()
    }

    /// Drains over `grace`, then stops.
    pub async fn shutdown(mut self, grace: Duration) {
        if let Some(r) = self.running.take() {
            r.shutdown(grace).await.expect("clean shutdown");
        }
    }
}

/// zerodrop as a child process (`kill -9`, SIGTERM, corrupt files, the real CLI).
pub struct ServerProcess {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub url: String,
    pub data_dir: PathBuf,
    pub creds: Creds,
    logs: Arc<Mutex<Vec<String>>>,
}

impl ServerProcess {
    /// Runs `bin serve --listen <listen> --data-dir <dir> <args…>` with JSON logs and waits
    /// until it listens.
    pub fn spawn(
        bin: &Path,
        data_dir: &Path,
        listen: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<ServerProcess> {
        let mut cmd = Command::new(bin);
        cmd.arg("serve")
            .arg("--listen")
            .arg(listen)
            .arg("--data-dir")
            .arg(data_dir)
            .args(args)
            .env("ZERODROP_LOG_FORMAT", "json")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for k in [
            "ZERODROP_API_KEY",
            "ZERODROP_ADMIN_TOKEN",
            "ZERODROP_JWT_SECRET",
            "ZERODROP_RESUME_KEYS",
        ] {
            cmd.env_remove(k);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot run {}", bin.display()))?;
        let stderr = child.stderr.take().context("stderr")?;
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        {
            let logs = logs.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                        && v["message"] == "listening"
                        && let Some(a) = v["addr"]
                            .as_str()
                            .and_then(|a| a.parse::<SocketAddr>().ok())
                    {
                        let _ = tx.send(a);
                    }
                    logs.lock().unwrap_or_else(|p| p.into_inner()).push(line);
                }
            });
        }
        let addr = match rx.recv_timeout(WAIT) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                let l = logs.lock().unwrap_or_else(|p| p.into_inner()).join("\n");
                bail!("zerodrop did not start listening:\n{l}");
            }
        };
        let creds = Creds::from_data_dir(data_dir)?;
        Ok(ServerProcess {
            child: Some(child),
            addr,
            url: format!("http://{addr}"),
            data_dir: data_dir.to_path_buf(),
            creds,
            logs,
        })
    }

    pub fn api(&self) -> Api {
        Api::new(&self.url, &self.creds)
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// `kill -9`: no drain, no flush, nothing.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then waits (at most `limit`) for the exit status.
    pub fn terminate(&mut self, limit: Duration) -> anyhow::Result<ExitStatus> {
        self.send_term();
        self.wait_exit(limit)
    }

    /// SIGTERM without waiting (the server drains; [`ServerProcess::wait_exit`] collects it).
    pub fn send_term(&self) {
        self.send_signal(libc::SIGTERM);
    }

    /// Sends `signal` (e.g. `libc::SIGINT`, as Ctrl-C does) without waiting.
    pub fn send_signal(&self, signal: libc::c_int) {
        if let Some(c) = &self.child {
            // SAFETY: kill(2) with a pid we own and a valid signal number has no memory
            // effects.
            unsafe {
                libc::kill(c.id() as libc::pid_t, signal);
            }
        }
    }

    /// Waits (at most `limit`, then kills) for the process to exit; returns its status.
    pub fn wait_exit(&mut self, limit: Duration) -> anyhow::Result<ExitStatus> {
        let mut c = self.child.take().context("not running")?;
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = c.try_wait()? {
                return Ok(s);
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                bail!("zerodrop did not exit within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}
