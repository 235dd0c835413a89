//! Stalled readers: a write that makes no progress for [`Config::write_stall`] fails.
//!
//! A client that stops reading (on purpose, or frozen) fills its receive buffer and then our
//! send buffer; from then on every write waits for it. Nothing above the socket can notice
//! on its own: hyper stops pulling an SSE body (or any response) while its write is pending,
//! and a WebSocket task waiting in a flush does not run its ping, drain or refresh timers.
//! Such a connection would hold a `--max-connections` slot, its gauge and its session forever,
//! and a drain could never finish.
//!
//! So every accepted connection's I/O is wrapped in a [`StallGuard`] (by `conn.rs`): once a write (or flush)
//! has returned `Pending` and no byte has been taken since for the bound, it fails with
//! [`io::ErrorKind::TimedOut`] carrying [`WriteStalled`]. hyper then drops the connection
//! (an SSE body ends, its slot and gauge are released); the WebSocket task sees the error,
//! tries a bounded close with 4408 and drops the socket. The session stays: the client
//! resumes from what it acknowledged, like after any other broken connection.
//!
//! The bound is about progress, not duration: a slow client that keeps reading, however slowly,
//! is never cut off, and the clock restarts after it fires (the caller decides what comes next,
//! e.g. a bounded attempt to write a close frame).
//!
//! [`Config::write_stall`]: crate::config::Config::write_stall

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// The error payload of a write that made no progress for the bound.
#[derive(Debug)]
pub struct WriteStalled;

impl std::fmt::Display for WriteStalled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the peer has taken no byte for the write-stall bound")
    }
}

impl std::error::Error for WriteStalled {}

/// Whether an I/O error is a [`StallGuard`] giving up.
pub fn is_stall(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<WriteStalled>())
}

/// An I/O object whose writes fail once they have made no progress for `limit`.
pub struct StallGuard<IO> {
    io: IO,
    limit: Duration,
    /// Set when a write first returned `Pending`, cleared by any completed write. Boxed, and
    /// only while stalled: an idle connection carries one pointer.
    stalled: Option<Pin<Box<Sleep>>>,
}

impl<IO> StallGuard<IO> {
    pub fn new(io: IO, limit: Duration) -> StallGuard<IO> {
        StallGuard {
            io,
            limit,
            stalled: None,
        }
    }

    /// Passes a completed write through (a write that returns has taken bytes, or failed: the
    /// stall is over either way); turns a `Pending` one into [`WriteStalled`] once the bound
    /// has passed since the first `Pending` with no progress.
    fn write<T>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if r.is_ready() {
            self.stalled = None;
            return r;
        }
        self.pending(cx)
    }

    /// A write or flush that is `Pending`: still waiting, or [`WriteStalled`] once the bound has
    /// passed since the first `Pending` with no progress (the clock then restarts).
    fn pending<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let limit = self.limit;
        let timer = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match timer.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(()) => {
                self.stalled = None;
                Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, WriteStalled)))
            }
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for StallGuard<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for StallGuard<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write(cx, buf);
        this.write(cx, r)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.write(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    /// A flush that returns is no progress of its own (a TCP flush always returns at once); a
    /// pending one is bounded like a write.
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.io).poll_flush(cx) {
            Poll::Pending => this.pending(cx),
            ready => ready,
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A peer that never reads fails the writer after the bound; one that reads does not.
    #[tokio::test]
    async fn a_write_without_progress_fails_after_the_bound() {
        let (a, mut b) = tokio::io::duplex(1024);
        let mut w = StallGuard::new(a, Duration::from_millis(200));
        let chunk = vec![7u8; 4096];
        // The peer reads: a write far larger than the pipe goes through.
        let reader = tokio::spawn(async move {
            let mut got = vec![0u8; 4096];
            b.read_exact(&mut got).await.map(|_| b)
        });
        tokio::time::timeout(Duration::from_secs(10), w.write_all(&chunk))
            .await
            .expect("bounded")
            .expect("a reading peer takes everything");
        let _b = reader.await.expect("reader").expect("read");
        // The peer stops reading: the pipe fills, then the write fails with WriteStalled.
        let err = tokio::time::timeout(Duration::from_secs(10), w.write_all(&chunk))
            .await
            .expect("bounded")
            .expect_err("a stalled peer fails the write");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(is_stall(&err));
    }

    /// The bound is on progress, not on duration: a peer that keeps reading, slowly, is never
    /// cut off, though the whole write takes longer than the bound.
    #[tokio::test]
    async fn a_slow_reader_is_never_cut_off() {
        let (a, mut b) = tokio::io::duplex(256);
        let mut w = StallGuard::new(a, Duration::from_secs(1));
        let total = 32 * 1024;
        let reader = tokio::spawn(async move {
            let mut got = 0;
            let mut buf = [0u8; 256];
            while got < total {
                tokio::time::sleep(Duration::from_millis(10)).await;
                match b.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got += n,
                }
            }
            got
        });
        let started = tokio::time::Instant::now();
        tokio::time::timeout(Duration::from_secs(60), w.write_all(&vec![1u8; total]))
            .await
            .expect("bounded")
            .expect("a reading peer is never cut off");
        assert_eq!(reader.await.expect("reader"), total);
        assert!(
            started.elapsed() > Duration::from_secs(1),
            "longer than the bound in all"
        );
    }
}
