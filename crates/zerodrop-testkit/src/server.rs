//! Running zerodrop for a test: in this process, or as a child process (started and stopped
//! by `zerodrop-local`, which the operator tools use too), and the credentials it generated.
//! This module must not reimplement what `zerodrop-local` does.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use zerodrop_local::{ServeChild, ServeCommand, secrets};
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
        let f = secrets::read_file(dir)?.context("no secrets.json")?;
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
        self.token_with(sub, streams, publish, exp, None)
    }

    /// A connect token carrying the public `info` claim (presence), valid for an hour.
    pub fn token_with_info(&self, sub: &str, streams: &[&str], info: serde_json::Value) -> String {
        let exp = zerodrop_core::now_ms() / 1000 + 3600;
        self.token_with(sub, streams, &[], exp, Some(info))
    }

    fn token_with(
        &self,
        sub: &str,
        streams: &[&str],
        publish: &[&str],
        exp: u64,
        info: Option<serde_json::Value>,
    ) -> String {
        let claims = ConnectClaims {
            sub: sub.into(),
            iat: Some(zerodrop_core::now_ms() / 1000),
            exp,
            streams: streams.iter().map(|s| s.to_string()).collect(),
            publish: (!publish.is_empty()).then(|| publish.iter().map(|s| s.to_string()).collect()),
            upstreams: Vec::new(),
            info,
        };
        mint_connect_token(&self.jwt_secret, &claims)
    }

    /// A connect token for `sub` (no streams) that may call the `upstreams` (names or
    /// prefixes ending in `*`) through `GET /v1/upstreams/…`.
    pub fn upstream_token(&self, sub: &str, upstreams: &[&str]) -> String {
        let claims = ConnectClaims {
            sub: sub.into(),
            iat: Some(zerodrop_core::now_ms() / 1000),
            exp: zerodrop_core::now_ms() / 1000 + 3600,
            streams: Vec::new(),
            publish: None,
            upstreams: upstreams.iter().map(|s| s.to_string()).collect(),
            info: None,
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

/// zerodrop as a child process (`kill -9`, SIGTERM, corrupt files, the real CLI): a
/// [`ServeChild`] with the credentials it generated into its data dir.
pub struct ServerProcess {
    child: ServeChild,
    pub addr: SocketAddr,
    pub url: String,
    pub data_dir: PathBuf,
    pub creds: Creds,
}

impl ServerProcess {
    /// Runs `bin serve --listen <listen> --data-dir <dir> <args…>` with JSON logs and waits
    /// (at most [`WAIT`]) until it listens. The secrets come from the data dir (generated on
    /// the first start), never from this process's `ZERODROP_*` variables; `env` may set
    /// them.
    pub fn spawn(
        bin: &Path,
        data_dir: &Path,
        listen: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<ServerProcess> {
        let cmd = ServeCommand::new(bin, data_dir)
            .listen(listen)
            .args(args)
            .without_inherited_secrets()
            .start_within(WAIT);
        let child = env.iter().fold(cmd, |c, (k, v)| c.env(k, v)).spawn()?;
        let creds = Creds::from_data_dir(data_dir)?;
        let addr = child.addr();
        Ok(ServerProcess {
            child,
            addr,
            url: format!("http://{addr}"),
            data_dir: data_dir.to_path_buf(),
            creds,
        })
    }

    pub fn api(&self) -> Api {
        Api::new(&self.url, &self.creds)
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}", self.addr)
    }

    /// Its pid; 0 once it has exited.
    pub fn pid(&self) -> u32 {
        self.child.pid().unwrap_or(0)
    }

    pub fn logs(&self) -> Vec<String> {
        self.child.logs()
    }

    /// `kill -9`: no drain, no flush, nothing.
    pub fn kill9(&mut self) {
        self.child.kill9();
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
        self.child.signal(signal);
    }

    /// Waits (at most `limit`, then kills) for the process to exit; returns its status.
    pub fn wait_exit(&mut self, limit: Duration) -> anyhow::Result<ExitStatus> {
        match self.child.wait_exit(limit)? {
            Some(s) => Ok(s),
            None => {
                self.child.kill9();
                bail!("zerodrop did not exit within {limit:?}");
            }
        }
    }
}
