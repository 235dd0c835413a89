//! A loopback TCP proxy that a game day puts between its clients and an instance: the
//! instance may restart on another port behind it, and it can cut every connection (a
//! network partition) and refuse new ones for a while.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct Proxy {
    pub addr: SocketAddr,
    upstream: Arc<Mutex<SocketAddr>>,
    refuse: Arc<AtomicBool>,
    cut: watch::Sender<u64>,
    stop: watch::Sender<bool>,
}

impl Proxy {
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let upstream = Arc::new(Mutex::new(upstream));
        let refuse = Arc::new(AtomicBool::new(false));
        let (cut, cut_rx) = watch::channel(0u64);
        let (stop, mut stop_rx) = watch::channel(false);
        let (up, rf) = (upstream.clone(), refuse.clone());
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    _ = stop_rx.wait_for(|s| *s) => break,
                };
                let Ok((client, _)) = accepted else { continue };
                if rf.load(Ordering::Relaxed) {
                    drop(client);
                    continue;
                }
                let target = up.lock().map(|a| *a).ok();
                let mut cut_rx = cut_rx.clone();
                let mut stop_rx = stop_rx.clone();
                tokio::spawn(async move {
                    let Some(target) = target else { return };
                    let Ok(Ok(mut server)) =
                        tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(target))
                            .await
                    else {
                        return;
                    };
                    let mut client = client;
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    cut_rx.mark_unchanged();
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut_rx.changed() => {}
                        _ = stop_rx.wait_for(|s| *s) => {}
                    }
                });
            }
        });
        Ok(Proxy {
            addr,
            upstream,
            refuse,
            cut,
            stop,
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set_upstream(&self, a: SocketAddr) {
        if let Ok(mut u) = self.upstream.lock() {
            *u = a;
        }
    }

    /// Cuts every open connection and refuses new ones for `outage`.
    pub async fn partition(&self, outage: Duration) {
        self.refuse.store(true, Ordering::Relaxed);
        self.cut.send_modify(|g| *g += 1);
        tokio::time::sleep(outage).await;
        self.refuse.store(false, Ordering::Relaxed);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn forwards_and_cuts() {
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let echo_addr = echo.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = echo.accept().await {
                tokio::spawn(async move {
                    let mut b = [0u8; 64];
                    while let Ok(n) = s.read(&mut b).await {
                        if n == 0 || s.write_all(&b[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        let p = Proxy::start(echo_addr).await.unwrap();
        let mut c = TcpStream::connect(p.addr).await.unwrap();
        c.write_all(b"hi").await.unwrap();
        let mut b = [0u8; 2];
        c.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"hi");
        p.partition(Duration::from_millis(50)).await;
        let mut rest = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(2), c.read_to_end(&mut rest))
            .await
            .unwrap()
            .unwrap_or(0);
        assert_eq!(n, 0, "the cut connection is closed");
    }
}
