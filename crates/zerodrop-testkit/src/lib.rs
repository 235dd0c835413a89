//! Shared test support. Everything binds loopback on free ports and stops what it starts.
//!
//! - [`server`]: zerodrop in this process ([`server::TestServer`]) or as a real process
//!   ([`server::ServerProcess`], for `kill -9` and signal tests);
//! - [`http`]: a small HTTP client for the API; [`raw`]: requests sent byte for byte (hostile
//!   paths that a URL-parsing client would normalise);
//! - [`ws`] and [`sse`]: raw protocol clients that expose every frame, for exact assertions;
//! - [`redis`]: real `redis-server` processes (and clusters) the tests can stop and restart;
//!   [`sentinel`]: a primary, its replica and three Sentinels watching them;
//! - [`cluster`]: several zerodrop processes on one Redis; [`roam`]: clients that move
//!   between them (drain, crash) and a publisher that retries elsewhere, with their tallies;
//! - [`hog`]: busy threads that load the machine for timing-sensitive guarantees;
//!   [`measure`]: what benchmarks share (the raw SQLite ceiling, pinning to a core);
//! - [`files`]: damage done to a data file the way a bad disk does it;
//! - [`upstream`]: a fake application backend that fails, slows down and recovers on command.

pub mod cluster;
pub mod files;
pub mod hog;
pub mod http;
pub mod measure;
pub mod raw;
pub mod redis;
pub mod roam;
pub mod sentinel;
pub mod server;
pub mod sink;
pub mod sse;
pub mod tools;
pub mod upstream;
pub mod ws;

use std::time::Duration;

/// How long any single wait in a test may take before it fails.
pub const WAIT: Duration = Duration::from_secs(10);

/// A TCP connection to `addr` with a small receive buffer: a client that stops reading on it
/// fills it, and then the server's send buffer, after a few hundred KiB at most.
pub async fn small_window_tcp(addr: std::net::SocketAddr) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("tcp socket");
    // Before connect, so that the window offered in the handshake is already small.
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    socket.connect(addr).await.expect("connect")
}

/// A free TCP port on 127.0.0.1 (for processes that must be restarted on the same port).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}
