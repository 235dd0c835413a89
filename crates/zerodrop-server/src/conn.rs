//! HTTP/1.1 connections: the accept loop, and the limits on a connection that is not working
//! on a request.
//!
//! Each accepted socket (`TCP_NODELAY`) is served by hyper, upgrades allowed (WebSockets), in
//! a task of its own beside a watchdog that knows what the connection is doing (`Activity`):
//!
//! - a request in progress (its response not fully sent yet: an SSE stream is one) and an
//!   upgraded WebSocket have no deadline here;
//! - a new connection must send a complete request head within the header timeout;
//! - after a response, a kept-alive connection may wait the idle timeout for its next request;
//!   once a byte of it arrives, its head must be complete within the header timeout.
//!
//! Connections with no request in progress are *pending*. At most `max_pending` are kept:
//! past that, the one pending the longest is closed, so a flood of silent connections costs
//! its sender its own oldest sockets rather than the server its file descriptors, and new
//! clients still get in.
//!
//! hyper's own header timer is not used: in hyper 1.x it starts again the moment a kept-alive
//! connection goes idle, which would close idle connections after the header timeout.
//!
//! A connection closed after an answer that says `Connection: close` (its request's body was
//! left unread, see [`crate::body`]) lingers: it shuts its write side, then reads and
//! discards what the client still sends, for at most 2 s, so that the client sees the
//! answer rather than a reset.
//!
//! On the stop signal the listener closes, every connection is told to finish (hyper's
//! graceful shutdown: an idle one closes at once, a busy one after its response), and
//! [`serve`] returns once every connection task has ended, as `axum::serve` did.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::ConnectInfo;
use axum::http::header::CONNECTION;
use axum::http::{Request, StatusCode};
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use tower::{Service, ServiceExt};

use crate::config::Config;
use crate::metrics::Metrics;
use crate::stall::StallGuard;

/// Put in a 101 answer's extensions by a handler whose upgraded connection writes a frame at
/// once (a WebSocket `welcome`): the 101 head is held back and leaves with that frame, in one
/// send (one segment for the server's core and the client's to process instead of two). The
/// first flush after the head is the one held back; any later write or flush sends it, so the
/// bytes always leave in order, and at the latest with the connection's next write.
#[derive(Clone, Copy, Debug)]
pub struct FirstFrameFollows;

/// The limits of [`serve`].
#[derive(Clone, Copy, Debug)]
pub struct ConnLimits {
    /// A request head must be complete within this (from the accept, or from its first byte).
    pub header: Duration,
    /// A kept-alive connection may wait this long for its next request.
    pub idle: Duration,
    /// Connections with no request in progress kept at most.
    pub max_pending: usize,
    /// A write that has taken no byte for this long fails ([`crate::stall`]).
    pub write_stall: Duration,
}

impl ConnLimits {
    pub fn from_config(cfg: &Config) -> ConnLimits {
        ConnLimits {
            header: Duration::from_secs(cfg.http_header_timeout_sec),
            idle: Duration::from_secs(cfg.http_idle_timeout_sec),
            max_pending: cfg.max_pending_connections.max(1),
            write_stall: cfg.write_stall(),
        }
    }
}

/// What [`serve`] answers requests with ([`crate::http::router()`]), and what each of its
/// layers wraps: cloned for each request, so it must be cheap to clone.
pub trait HttpService:
    Service<
        axum::extract::Request,
        Response = axum::response::Response,
        Error = Infallible,
        Future: Send + 'static,
    > + Clone
    + Send
    + Sync
    + 'static
{
}

impl<S> HttpService for S where
    S: Service<
            axum::extract::Request,
            Response = axum::response::Response,
            Error = Infallible,
            Future: Send + 'static,
        > + Clone
        + Send
        + Sync
        + 'static
{
}

/// Serves `router` on `listener` until `stop` turns true, then waits for every connection.
pub async fn serve(
    listener: TcpListener,
    router: impl HttpService,
    limits: ConnLimits,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    let pending = Arc::new(Pending::new(limits.max_pending));
    // Each connection task holds a receiver; `closed()` tells when the last one has ended.
    let (tasks, task) = watch::channel(());
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(accepted) => accepted,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            },
            _ = stopped(&mut stop) => break,
        };
        // Small frames must not wait for Nagle's algorithm.
        let _ = tcp.set_nodelay(true);
        let conn = Connection {
            activity: Activity::new(&pending),
            limits,
            metrics: metrics.clone(),
            stop: stop.clone(),
            _task: task.clone(),
        };
        tokio::spawn(conn.run(tcp, peer, router.clone()));
    }
    drop(task);
    drop(listener);
    tasks.closed().await;
}

/// A failed accept: the client's problem (it left), or ours (out of file descriptors), in
/// which case accepting again at once would spin.
async fn accept_failed(e: std::io::Error) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    ) {
        return;
    }
    tracing::error!(error = %e, "accept failed; retrying in 1 s");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

struct Connection {
    activity: Arc<Activity>,
    limits: ConnLimits,
    metrics: Arc<Metrics>,
    stop: watch::Receiver<bool>,
    _task: watch::Receiver<()>,
}

impl Connection {
    async fn run(mut self, tcp: TcpStream, peer: SocketAddr, router: impl HttpService) {
        let activity = self.activity.clone();
        let io = TokioIo::new(Watched {
            tcp: StallGuard::new(tcp, self.limits.write_stall),
            activity: activity.clone(),
            linger: None,
            held: None,
        });
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let guard = InFlight::begin(&activity);
            let mut req = req.map(Body::new);
            req.extensions_mut().insert(ConnectInfo(peer));
            let router = router.clone();
            async move {
                let res = match router.oneshot(req).await {
                    Ok(res) => res,
                    Err(never) => match never {},
                };
                if res.status() == StatusCode::SWITCHING_PROTOCOLS {
                    guard.0.upgraded.store(true, Ordering::Relaxed);
                    if res.extensions().get::<FirstFrameFollows>().is_some() {
                        guard.0.hold_head.store(true, Ordering::Relaxed);
                    }
                }
                // Said when the request's body was left unread (see `crate::body`).
                if res
                    .headers()
                    .get(CONNECTION)
                    .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"))
                {
                    guard.0.linger.store(true, Ordering::Relaxed);
                }
                Ok::<_, Infallible>(res.map(|body| Tracked {
                    body,
                    _guard: guard,
                }))
            }
        });
        let mut http = hyper::server::conn::http1::Builder::new();
        // Ours, in the loop below (see the module doc).
        http.header_read_timeout(None);
        let conn = http.serve_connection(io, service).with_upgrades();
        tokio::pin!(conn);
        let mut stopping = false;
        loop {
            if self.activity.evicted() {
                tracing::debug!(%peer, "closing a pending connection: too many pending");
                self.metrics.http_connection_closed("pending_limit");
                break;
            }
            let deadline = self.activity.deadline(&self.limits);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(%peer, error = %e, "connection ended");
                    }
                    break;
                }
                _ = self.activity.changed.notified() => {}
                _ = sleep_until(deadline), if deadline.is_some() => {
                    if self.activity.deadline(&self.limits).is_some_and(|d| d <= Instant::now()) {
                        let reason = self.activity.waiting_for();
                        tracing::debug!(%peer, reason, "closing a connection: no request in time");
                        self.metrics.http_connection_closed(reason);
                        break;
                    }
                }
                _ = stopped(&mut self.stop), if !stopping => {
                    stopping = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
        self.activity.leave();
    }
}

/// Resolves once the server stops (or its stop sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

async fn sleep_until(deadline: Option<Instant>) {
    if let Some(d) = deadline {
        tokio::time::sleep_until(d.into()).await;
    }
}

/// What one connection is doing: updated by its IO (bytes read), its service (requests begun
/// and their responses finished) and the pending set (eviction); read by its watchdog.
struct Activity {
    born: Instant,
    /// Requests whose response is not fully sent yet.
    in_flight: AtomicUsize,
    /// Whether a request has been seen (before: the first head's deadline applies).
    served: AtomicBool,
    /// A WebSocket took the connection over.
    upgraded: AtomicBool,
    /// The next write is a 101 head to hold back ([`FirstFrameFollows`]).
    hold_head: AtomicBool,
    /// An answer said `Connection: close`: on closing, read what the client still sends.
    linger: AtomicBool,
    /// Milliseconds after `born` when the connection last went idle.
    idle_since_ms: AtomicU64,
    /// Milliseconds after `born`, plus one, of the first byte read while idle; 0: none yet.
    head_started_ms: AtomicU64,
    /// Its key in the pending set; 0: not pending.
    pending_key: AtomicU64,
    evicted: AtomicBool,
    pending: Arc<Pending>,
    /// Rung when a deadline may have changed.
    changed: Notify,
}

impl Activity {
    fn new(pending: &Arc<Pending>) -> Arc<Activity> {
        let a = Arc::new(Activity {
            born: Instant::now(),
            in_flight: AtomicUsize::new(0),
            served: AtomicBool::new(false),
            upgraded: AtomicBool::new(false),
            hold_head: AtomicBool::new(false),
            linger: AtomicBool::new(false),
            idle_since_ms: AtomicU64::new(0),
            head_started_ms: AtomicU64::new(0),
            pending_key: AtomicU64::new(0),
            evicted: AtomicBool::new(false),
            pending: pending.clone(),
            changed: Notify::new(),
        });
        pending.enter(&a);
        a
    }

    fn ms(&self) -> u64 {
        self.born.elapsed().as_millis() as u64
    }

    fn at(&self, ms: u64) -> Instant {
        self.born + Duration::from_millis(ms)
    }

    /// When the connection is closed unless a request arrives; `None` while it works.
    fn deadline(&self, limits: &ConnLimits) -> Option<Instant> {
        if self.upgraded.load(Ordering::Relaxed) || self.in_flight.load(Ordering::Relaxed) > 0 {
            return None;
        }
        if !self.served.load(Ordering::Relaxed) {
            return Some(self.born + limits.header);
        }
        match self.head_started_ms.load(Ordering::Relaxed) {
            0 => Some(self.at(self.idle_since_ms.load(Ordering::Relaxed)) + limits.idle),
            started => Some(self.at(started - 1) + limits.header),
        }
    }

    /// Which timeout [`Activity::deadline`] is: `header_timeout` or `idle_timeout`.
    fn waiting_for(&self) -> &'static str {
        let idle = self.served.load(Ordering::Relaxed)
            && self.head_started_ms.load(Ordering::Relaxed) == 0;
        if idle {
            "idle_timeout"
        } else {
            "header_timeout"
        }
    }

    fn evicted(&self) -> bool {
        self.evicted.load(Ordering::Relaxed)
            && self.in_flight.load(Ordering::Relaxed) == 0
            && !self.upgraded.load(Ordering::Relaxed)
    }

    /// Bytes arrived: on an idle connection they start the next head's clock.
    fn read_some(&self) {
        if self.served.load(Ordering::Relaxed)
            && !self.upgraded.load(Ordering::Relaxed)
            && self.in_flight.load(Ordering::Relaxed) == 0
            && self.head_started_ms.load(Ordering::Relaxed) == 0
        {
            self.head_started_ms.store(self.ms() + 1, Ordering::Relaxed);
            self.changed.notify_one();
        }
    }

    fn leave(&self) {
        self.pending.leave(self);
    }
}

/// A request in progress, from its head until its response is fully sent (or dropped).
struct InFlight(Arc<Activity>);

impl InFlight {
    fn begin(a: &Arc<Activity>) -> InFlight {
        if a.in_flight.fetch_add(1, Ordering::Relaxed) == 0 {
            a.pending.leave(a);
            a.evicted.store(false, Ordering::Relaxed);
        }
        a.served.store(true, Ordering::Relaxed);
        a.head_started_ms.store(0, Ordering::Relaxed);
        a.changed.notify_one();
        InFlight(a.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let a = &self.0;
        if a.in_flight.fetch_sub(1, Ordering::Relaxed) == 1 {
            a.idle_since_ms.store(a.ms(), Ordering::Relaxed);
            a.head_started_ms.store(0, Ordering::Relaxed);
            if !a.upgraded.load(Ordering::Relaxed) {
                a.pending.enter(a);
            }
            a.changed.notify_one();
        }
    }
}

/// A response body that keeps its request in progress until hyper is done with it.
struct Tracked {
    body: Body,
    _guard: InFlight,
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// How long a connection closed after an answer that says `Connection: close` keeps reading
/// (and discarding) what the client still sends, and how much of it.
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 16 << 20;

/// The socket, telling its connection's [`Activity`] when bytes arrive; its writes are
/// bounded by the [`StallGuard`].
struct Watched {
    tcp: StallGuard<TcpStream>,
    activity: Arc<Activity>,
    /// Set once the write side is shut and the connection lingers.
    linger: Option<(Pin<Box<tokio::time::Sleep>>, usize)>,
    /// A 101 head held back until the first frame ([`FirstFrameFollows`]), and whether
    /// hyper's flush of it has been held back already (the next flush sends it).
    held: Option<(Vec<u8>, bool)>,
}

impl Watched {
    /// Whether `bufs` are the 101 head to hold back: the first write after the service asked.
    fn holds(&mut self, bufs: &[std::io::IoSlice<'_>]) -> bool {
        if self.held.is_some()
            || !self.activity.hold_head.load(Ordering::Relaxed)
            || !self.activity.hold_head.swap(false, Ordering::Relaxed)
        {
            return false;
        }
        let head = bufs.iter().flat_map(|b| b.iter().copied()).collect();
        self.held = Some((head, false));
        true
    }

    /// Writes the held head with `bufs` after it; answers how many bytes of `bufs` went.
    fn poll_write_held(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        while let Some((head, _)) = self.held.as_mut() {
            if head.is_empty() {
                self.held = None;
                break;
            }
            let mut slices = Vec::with_capacity(bufs.len() + 1);
            slices.push(std::io::IoSlice::new(head));
            slices.extend(bufs.iter().map(|b| std::io::IoSlice::new(b)));
            let n = std::task::ready!(Pin::new(&mut self.tcp).poll_write_vectored(cx, &slices))?;
            if n == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            if n < head.len() {
                head.drain(..n);
                continue;
            }
            let of_bufs = n - head.len();
            self.held = None;
            if of_bufs > 0 || bufs.iter().all(|b| b.is_empty()) {
                return Poll::Ready(Ok(of_bufs));
            }
        }
        Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
    }

    /// After the FIN: reads until the client closes too (or the linger ends). Closing a socket
    /// with unread bytes resets it, and a reset can destroy the answer before the client has
    /// read it: a client still sending a body the server refused would see a transport error
    /// instead of the 413.
    fn poll_linger(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let (timer, left) = self
            .linger
            .get_or_insert_with(|| (Box::pin(tokio::time::sleep(LINGER)), LINGER_BYTES));
        let mut scratch = [0u8; 8192];
        loop {
            let mut buf = ReadBuf::new(&mut scratch);
            match Pin::new(&mut self.tcp).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if !buf.filled().is_empty() => {
                    *left = left.saturating_sub(buf.filled().len());
                    if *left == 0 {
                        return Poll::Ready(Ok(()));
                    }
                }
                Poll::Ready(_) => return Poll::Ready(Ok(())),
                Poll::Pending => {
                    return match timer.as_mut().poll(cx) {
                        Poll::Ready(()) => Poll::Ready(Ok(())),
                        Poll::Pending => Poll::Pending,
                    };
                }
            }
        }
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.tcp).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.read_some();
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let bufs = [std::io::IoSlice::new(buf)];
        if this.holds(&bufs) {
            return Poll::Ready(Ok(buf.len()));
        }
        if this.held.is_some() {
            return this.poll_write_held(cx, &bufs);
        }
        Pin::new(&mut this.tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        if this.holds(bufs) {
            return Poll::Ready(Ok(bufs.iter().map(|b| b.len()).sum()));
        }
        if this.held.is_some() {
            return this.poll_write_held(cx, bufs);
        }
        Pin::new(&mut this.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if let Some((_, flushed_once)) = this.held.as_mut() {
            // hyper's flush of the head: held back once; any other sends it.
            if !*flushed_once {
                *flushed_once = true;
                return Poll::Ready(Ok(()));
            }
            std::task::ready!(this.poll_write_held(cx, &[]))?;
        }
        Pin::new(&mut this.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.held.is_some() {
            std::task::ready!(this.poll_write_held(cx, &[]))?;
        }
        if this.linger.is_none() {
            std::task::ready!(Pin::new(&mut this.tcp).poll_shutdown(cx))?;
            if !this.activity.linger.load(Ordering::Relaxed) {
                return Poll::Ready(Ok(()));
            }
        }
        this.poll_linger(cx)
    }
}

/// The connections with no request in progress, oldest first.
struct Pending {
    max: usize,
    inner: Mutex<PendingInner>,
}

struct PendingInner {
    next: u64,
    waiting: BTreeMap<u64, Weak<Activity>>,
}

impl Pending {
    fn new(max: usize) -> Pending {
        Pending {
            max,
            inner: Mutex::new(PendingInner {
                next: 1,
                waiting: BTreeMap::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PendingInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `a` has no request in progress; past the bound, the oldest pending one is closed.
    fn enter(&self, a: &Arc<Activity>) {
        let mut evicted = Vec::new();
        {
            let mut p = self.lock();
            let key = p.next;
            p.next += 1;
            let old = a.pending_key.swap(key, Ordering::Relaxed);
            if old != 0 {
                p.waiting.remove(&old);
            }
            p.waiting.insert(key, Arc::downgrade(a));
            while p.waiting.len() > self.max {
                let Some((key, oldest)) = p.waiting.pop_first() else {
                    break;
                };
                if let Some(oldest) = oldest.upgrade()
                    && oldest
                        .pending_key
                        .compare_exchange(key, 0, Ordering::Relaxed, Ordering::Relaxed)
                        .is_ok()
                {
                    evicted.push(oldest);
                }
            }
        }
        for a in evicted {
            a.evicted.store(true, Ordering::Relaxed);
            a.changed.notify_one();
        }
    }

    fn leave(&self, a: &Activity) {
        let mut p = self.lock();
        let key = a.pending_key.swap(0, Ordering::Relaxed);
        if key != 0 {
            p.waiting.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_pending_connection_is_evicted_and_busy_ones_do_not_count() {
        let pending = Arc::new(Pending::new(2));
        let a = Activity::new(&pending);
        let b = Activity::new(&pending);
        let busy = InFlight::begin(&a);
        let c = Activity::new(&pending);
        assert!(!a.evicted() && !b.evicted() && !c.evicted(), "a is busy");
        drop(busy);
        assert!(
            b.evicted(),
            "a idle again: three pending, the oldest (b) goes"
        );
        assert!(!a.evicted() && !c.evicted());
        c.leave();
        let _d = Activity::new(&pending);
        assert!(!a.evicted(), "c left: room for d");
        assert_eq!(pending.lock().waiting.len(), 2);
    }

    #[test]
    fn deadlines_follow_what_the_connection_does() {
        let limits = ConnLimits {
            header: Duration::from_secs(10),
            idle: Duration::from_secs(60),
            max_pending: 8,
            write_stall: Duration::from_secs(50),
        };
        let pending = Arc::new(Pending::new(8));
        let a = Activity::new(&pending);
        assert_eq!(a.deadline(&limits), Some(a.born + limits.header));
        a.read_some();
        assert_eq!(
            a.deadline(&limits),
            Some(a.born + limits.header),
            "the first head: from the accept"
        );
        let req = InFlight::begin(&a);
        assert_eq!(a.deadline(&limits), None, "working");
        drop(req);
        let idle = a.deadline(&limits).unwrap();
        assert!(idle >= a.born + limits.idle, "idle: the idle timeout");
        a.read_some();
        assert!(
            a.deadline(&limits).unwrap() < idle,
            "a byte: the header timeout"
        );
        let ws = InFlight::begin(&a);
        a.upgraded.store(true, Ordering::Relaxed);
        drop(ws);
        assert_eq!(a.deadline(&limits), None, "upgraded");
        assert_eq!(pending.lock().waiting.len(), 0);
    }
}
