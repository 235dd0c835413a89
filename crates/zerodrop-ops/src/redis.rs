//! A `redis-server` that a game day starts for its instances (`--store redis`) and stops to
//! inject a store outage. It persists every write (`appendonly yes`, `appendfsync always`)
//! so that an outage is an outage, not a data loss: what the game day then checks is that
//! zerodrop refuses (503) while the store is away and loses nothing when it returns.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

pub struct RedisProcess {
    bin: PathBuf,
    dir: PathBuf,
    pub port: u16,
    child: Option<Child>,
}

fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

async fn ping(port: u16) -> bool {
    let Ok(Ok(mut s)) = tokio::time::timeout(
        Duration::from_millis(500),
        tokio::net::TcpStream::connect(("127.0.0.1", port)),
    )
    .await
    else {
        return false;
    };
    if s.write_all(b"PING\r\n").await.is_err() {
        return false;
    }
    let mut b = [0u8; 16];
    matches!(tokio::time::timeout(Duration::from_millis(500), s.read(&mut b)).await, Ok(Ok(n)) if b[..n].starts_with(b"+PONG"))
}

impl RedisProcess {
    pub async fn start(bin: &Path, dir: &Path) -> anyhow::Result<RedisProcess> {
        std::fs::create_dir_all(dir)?;
        let mut r = RedisProcess {
            bin: bin.to_path_buf(),
            dir: dir.to_path_buf(),
            port: free_port()?,
            child: None,
        };
        r.up().await?;
        Ok(r)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn up(&mut self) -> anyhow::Result<()> {
        let child = Command::new(&self.bin)
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                &self.port.to_string(),
                "--save",
                "",
            ])
            .args(["--appendonly", "yes", "--appendfsync", "always", "--dir"])
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        self.child = Some(child);
        for _ in 0..100 {
            if ping(self.port).await {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!(
            "redis-server on port {} did not answer PING within 10 s",
            self.port
        )
    }

    /// Stops the server (SIGTERM: it flushes its append-only file), keeps it down for
    /// `outage`, then starts it again on the same port with the same data.
    pub async fn outage(&mut self, outage: Duration) -> anyhow::Result<()> {
        if let Some(mut c) = self.child.take() {
            if let Some(pid) = c.id() {
                // SAFETY: kill(2) on our own child's pid.
                unsafe {
                    libc::kill(pid as i32, libc::SIGTERM);
                }
            }
            if tokio::time::timeout(Duration::from_secs(10), c.wait())
                .await
                .is_err()
            {
                let _ = c.kill().await;
            }
        }
        tokio::time::sleep(outage).await;
        self.up().await
    }
}
