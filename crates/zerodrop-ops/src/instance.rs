//! Local zerodrop instances that a tool starts itself (game days; also the integration
//! tests): `zerodrop serve` on a free loopback port, its address read from the
//! `listening` log line, stopped with SIGTERM (drain) or SIGKILL, and killed when dropped.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// The secrets a tool hands to the instances it starts (so it can talk to them).
#[derive(Clone, Debug)]
pub struct Secrets {
    pub api_key: String,
    pub jwt_secret: String,
    pub admin_token: String,
    pub resume_keys: String,
}

impl Secrets {
    pub fn generate() -> Secrets {
        let r = || {
            zerodrop_core::random_bytes::<24>()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        };
        Secrets {
            api_key: r(),
            jwt_secret: r(),
            admin_token: r(),
            resume_keys: format!("k1:{}", r()),
        }
    }

    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("ZERODROP_API_KEY".into(), self.api_key.clone()),
            ("ZERODROP_JWT_SECRET".into(), self.jwt_secret.clone()),
            ("ZERODROP_ADMIN_TOKEN".into(), self.admin_token.clone()),
            ("ZERODROP_RESUME_KEYS".into(), self.resume_keys.clone()),
        ]
    }

    pub fn creds(&self) -> crate::common::CredArgs {
        crate::common::CredArgs {
            api_key: Some(self.api_key.clone()),
            jwt_secret: Some(self.jwt_secret.clone()),
            admin_token: Some(self.admin_token.clone()),
            data_dir: None,
            ca_file: None,
        }
    }
}

/// How to start an instance.
#[derive(Clone, Debug)]
pub struct Spec {
    pub bin: PathBuf,
    pub data_dir: PathBuf,
    /// `sqlite`, `memory` or `redis`.
    pub store: String,
    /// Extra `serve` flags.
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// `127.0.0.1:0` picks a free port.
    pub listen: String,
}

impl Spec {
    pub fn new(bin: &Path, data_dir: &Path, secrets: &Secrets) -> Spec {
        Spec {
            bin: bin.to_path_buf(),
            data_dir: data_dir.to_path_buf(),
            store: "sqlite".into(),
            args: vec!["--drain-grace-sec".into(), "2".into()],
            env: secrets.env(),
            listen: "127.0.0.1:0".into(),
        }
    }
}

pub struct Instance {
    child: Child,
    pub addr: SocketAddr,
    pub spec: Spec,
    log: Arc<Mutex<VecDeque<String>>>,
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

impl Instance {
    pub async fn start(spec: Spec) -> anyhow::Result<Instance> {
        std::fs::create_dir_all(&spec.data_dir)
            .with_context(|| format!("creating {}", spec.data_dir.display()))?;
        let mut cmd = Command::new(&spec.bin);
        cmd.arg("serve")
            .arg("--listen")
            .arg(&spec.listen)
            .arg("--data-dir")
            .arg(&spec.data_dir)
            .arg("--store")
            .arg(&spec.store)
            .args(&spec.args)
            .env("ZERODROP_LOG_FORMAT", "json")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (k, v) in &spec.env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {} serve", spec.bin.display()))?;
        let log: Arc<Mutex<VecDeque<String>>> = Arc::default();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<SocketAddr>();
        for out in [
            child
                .stdout
                .take()
                .map(|o| Box::new(o) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
            child
                .stderr
                .take()
                .map(|o| Box::new(o) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let (log, tx) = (log.clone(), tx.clone());
            tokio::spawn(async move {
                let mut lines = BufReader::new(out).lines();
                while let Ok(Some(l)) = lines.next_line().await {
                    if let Some(a) = listening_addr(&l) {
                        let _ = tx.send(a);
                    }
                    if let Ok(mut q) = log.lock() {
                        if q.len() >= 200 {
                            q.pop_front();
                        }
                        q.push_back(l);
                    }
                }
            });
        }
        drop(tx);
        let addr = match tokio::time::timeout(Duration::from_secs(30), rx.recv()).await {
            Ok(Some(a)) => a,
            _ => {
                let _ = child.start_kill();
                let tail = log
                    .lock()
                    .map(|q| q.iter().cloned().collect::<Vec<_>>().join("\n"))
                    .unwrap_or_default();
                bail!(
                    "zerodrop serve did not report a listening address within 30 s; its output:\n{tail}"
                );
            }
        };
        Ok(Instance {
            child,
            addr,
            spec,
            log,
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// The last lines the instance logged.
    pub fn log_tail(&self) -> String {
        self.log
            .lock()
            .map(|q| q.iter().cloned().collect::<Vec<_>>().join("\n"))
            .unwrap_or_default()
    }

    fn signal(&self, sig: i32) {
        if let Some(pid) = self.child.id() {
            // SAFETY: kill(2) on our own child's pid; no memory is involved.
            unsafe {
                libc::kill(pid as i32, sig);
            }
        }
    }

    /// SIGTERM (the server drains, then exits); SIGKILL after `grace`.
    pub async fn terminate(&mut self, grace: Duration) -> anyhow::Result<Option<i32>> {
        self.signal(libc::SIGTERM);
        match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(s) => Ok(s?.code()),
            Err(_) => {
                self.kill9().await?;
                Ok(None)
            }
        }
    }

    /// SIGKILL and reap.
    pub async fn kill9(&mut self) -> anyhow::Result<()> {
        self.signal(libc::SIGKILL);
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
        Ok(())
    }

    /// Starts the same spec again (same data dir) after this one has stopped.
    pub async fn restart(&self) -> anyhow::Result<Instance> {
        Instance::start(self.spec.clone()).await
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
}
