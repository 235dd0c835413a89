//! Local zerodrop instances that a tool starts itself (game days; also the integration
//! tests): what to start (`Spec`: binary, data dir, store, flags, the secrets handed over in
//! variables) and the instance's life, stopped with SIGTERM (drain) or SIGKILL, and killed
//! when dropped. Starting the process, reading its address and its logs are
//! `zerodrop-local`'s; this module must not do them itself.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use zerodrop_local::{ServeChild, ServeCommand};

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

/// A started instance; killed when dropped.
pub struct Instance {
    child: ServeChild,
    pub addr: SocketAddr,
    pub spec: Spec,
}

/// Log lines an instance keeps for a failure's report (a game day runs for minutes).
const LOG_LINES: usize = 200;

impl Instance {
    pub async fn start(spec: Spec) -> anyhow::Result<Instance> {
        std::fs::create_dir_all(&spec.data_dir)
            .with_context(|| format!("creating {}", spec.data_dir.display()))?;
        let cmd = ServeCommand::new(&spec.bin, &spec.data_dir)
            .listen(&spec.listen)
            .args(["--store", spec.store.as_str()])
            .args(&spec.args)
            .env("NO_COLOR", "1")
            .keep_last_lines(LOG_LINES)
            .start_within(Duration::from_secs(30));
        let child = spec
            .env
            .iter()
            .fold(cmd, |c, (k, v)| c.env(k, v))
            .spawn_async()
            .await?;
        Ok(Instance {
            addr: child.addr(),
            child,
            spec,
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.pid()
    }

    /// The last lines the instance logged.
    pub fn log_tail(&self) -> String {
        self.child.logs().join("\n")
    }

    /// SIGTERM (the server drains, then exits); SIGKILL after `grace`.
    pub async fn terminate(&mut self, grace: Duration) -> anyhow::Result<Option<i32>> {
        self.child.signal(libc::SIGTERM);
        match self.child.wait_exit_async(grace).await? {
            Some(s) => Ok(s.code()),
            None => {
                self.kill9().await?;
                Ok(None)
            }
        }
    }

    /// SIGKILL and reap.
    pub async fn kill9(&mut self) -> anyhow::Result<()> {
        self.child.kill9();
        Ok(())
    }

    /// Starts the same spec again (same data dir) after this one has stopped.
    pub async fn restart(&self) -> anyhow::Result<Instance> {
        Instance::start(self.spec.clone()).await
    }
}
