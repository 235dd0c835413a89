//! The HTTP connection's own limits, seen from raw sockets: a refusal answered before the
//! request body was read keeps the keep-alive connection usable; half a request head, a
//! connection that sends nothing and an idle keep-alive connection are closed after their
//! timeouts while WebSockets and SSE streams stay open; connections with no request in
//! progress are bounded.

use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use zerodrop_testkit::WAIT;
use zerodrop_testkit::server::TestServer;
use zerodrop_testkit::sse::SseClient;
use zerodrop_testkit::ws::WsClient;

/// One HTTP/1.1 response read off a raw connection.
#[derive(Debug)]
struct Answer {
    status: u16,
    /// Header names lower-cased.
    headers: Vec<(String, String)>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Reads one response (status line, headers, a `Content-Length` body); `None` when the
/// connection ends first.
async fn read_answer(r: &mut BufReader<TcpStream>) -> Option<Answer> {
    let mut line = String::new();
    let n = tokio::time::timeout(WAIT, r.read_line(&mut line))
        .await
        .expect("an answer within the wait")
        .ok()?;
    if n == 0 {
        return None;
    }
    let status = line.split(' ').nth(1)?.parse().ok()?;
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).await.ok()? == 0 {
            return None;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':')?;
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    let a = Answer { status, headers };
    let len: usize = a.header("content-length")?.parse().ok()?;
    let mut body = vec![0; len];
    r.read_exact(&mut body).await.ok()?;
    Some(a)
}

/// Whether the peer closed the connection within `within` (EOF or a reset; bytes before the
/// end, such as a `408`, are read past).
async fn closes_within(r: &mut BufReader<TcpStream>, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout_at(deadline, r.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

/// `zerodrop_http_connections_closed_total{reason=…}`, read in process (a scrape would be
/// one more connection).
fn closed_for(s: &TestServer, reason: &str) -> u64 {
    let text = s.app().metrics.render_prometheus();
    let series = format!("zerodrop_http_connections_closed_total{{reason=\"{reason}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(series.as_str()))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{series} not exported"))
}

async fn connect(s: &TestServer) -> BufReader<TcpStream> {
    BufReader::new(TcpStream::connect(s.addr).await.expect("connect"))
}

/// A publish written as clients write it: the head, a pause, then the body.
async fn publish_in_two_writes(r: &mut BufReader<TcpStream>, key: &str, path: &str, n: usize) {
    let body = json!({"data": {"n": n}}).to_string();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: zerodrop\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let s = r.get_mut();
    s.write_all(head.as_bytes()).await.expect("write head");
    tokio::time::sleep(Duration::from_millis(30)).await;
    // The server may have answered (and, before the fix, closed) already: a failed write
    // shows up as a missing answer below.
    let _ = s.write_all(body.as_bytes()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_publish_keeps_the_keep_alive_connection() {
    let s = TestServer::with(|c| c.http_requests_per_sec = 5).await;
    let key = s.creds.api_key.clone();
    let mut conn = connect(&s).await;
    let mut statuses = Vec::new();
    for n in 0..16 {
        let a = read_after(&mut conn, &key, "/v1/streams/rl/events", n).await;
        let a = a.unwrap_or_else(|| panic!("request {n} got no answer; before: {statuses:?}"));
        assert!([201, 429].contains(&a.status), "request {n}: {}", a.status);
        assert_ne!(
            a.header("connection"),
            Some("close"),
            "the body was sent: the connection stays usable"
        );
        statuses.push(a.status);
    }
    assert!(
        statuses.contains(&201) && statuses.contains(&429),
        "{statuses:?}"
    );

    // An unknown route and a refused credential, answered before the body: the same.
    for path in ["/v1/nowhere", "/v1/streams/bad%20id/events"] {
        let a = read_after(&mut conn, "wrong", path, 0)
            .await
            .expect("answered");
        assert!(a.status >= 400, "{path}: {}", a.status);
        let a = read_after(&mut conn, "wrong", path, 0).await;
        assert!(a.is_some(), "{path}: the connection survived the refusal");
    }

    // A pooled client with a single connection: every publish gets an answer.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(1)
        .http1_only()
        .build()
        .unwrap();
    let mut seen = Vec::new();
    for n in 0..16 {
        let res = client
            .post(format!("{}/v1/streams/rl2/events", s.url))
            .bearer_auth(&key)
            .header("content-type", "application/json")
            .body(json!({"data": n}).to_string())
            .send()
            .await
            .unwrap_or_else(|e| panic!("publish {n}: transport error {e}; before: {seen:?}"));
        seen.push(res.status().as_u16());
        assert!([201, 429].contains(&seen[n]), "{seen:?}");
    }
    assert!(seen.contains(&429), "{seen:?}");
}

async fn read_after(
    conn: &mut BufReader<TcpStream>,
    key: &str,
    path: &str,
    n: usize,
) -> Option<Answer> {
    publish_in_two_writes(conn, key, path, n).await;
    read_answer(conn).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_too_large_to_read_is_refused_with_connection_close() {
    let s = TestServer::with(|c| c.max_payload_bytes = 1024).await;
    let mut conn = connect(&s).await;
    let head = format!(
        "POST /v1/streams/big/events HTTP/1.1\r\nHost: zerodrop\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: 10000000\r\n\r\n",
        s.creds.api_key
    );
    conn.get_mut().write_all(head.as_bytes()).await.unwrap();
    let a = read_answer(&mut conn).await.expect("answered");
    assert_eq!(a.status, 413);
    assert_eq!(
        a.header("connection"),
        Some("close"),
        "the body is left unread: the client is told"
    );
}

fn limits(header: u64, idle: u64) -> impl FnOnce(&mut zerodrop_server::Config) {
    move |c| {
        c.http_header_timeout_sec = header;
        c.http_idle_timeout_sec = idle;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_a_head_and_silence_are_closed_after_the_header_timeout() {
    let s = TestServer::with(limits(1, 30)).await;
    let mut half = connect(&s).await;
    half.get_mut()
        .write_all(b"GET /health/live HTTP/1.1\r\nHost: zerodrop\r\nX-Slow: ")
        .await
        .unwrap();
    let mut silent = connect(&s).await;
    let started = Instant::now();
    assert!(
        closes_within(&mut half, WAIT).await,
        "half a head: still open"
    );
    assert!(
        closes_within(&mut silent, WAIT).await,
        "silence: still open"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "not before the timeout"
    );
    assert_eq!(closed_for(&s, "header_timeout"), 2);
    // A complete request in time is served.
    let mut ok = connect(&s).await;
    ok.get_mut()
        .write_all(b"GET /health/live HTTP/1.1\r\nHost: zerodrop\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_answer(&mut ok).await.expect("answered").status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_body_is_not_waited_for() {
    let s = TestServer::with(limits(1, 30)).await;
    let mut conn = connect(&s).await;
    let head = format!(
        "POST /v1/streams/slow/events HTTP/1.1\r\nHost: zerodrop\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"data\":",
        s.creds.api_key
    );
    conn.get_mut().write_all(head.as_bytes()).await.unwrap();
    let a = read_answer(&mut conn).await.expect("answered");
    assert_eq!(a.status, 400);
    assert_eq!(a.header("connection"), Some("close"));
    assert!(closes_within(&mut conn, WAIT).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
    let s = TestServer::with(limits(1, 5)).await;
    let mut conn = connect(&s).await;
    for _ in 0..2 {
        conn.get_mut()
            .write_all(b"GET /health/live HTTP/1.1\r\nHost: zerodrop\r\n\r\n")
            .await
            .unwrap();
        let a = read_answer(&mut conn).await.expect("answered");
        assert_eq!(a.status, 200);
        assert_ne!(a.header("connection"), Some("close"));
    }
    // Idle past the header timeout: still open (the idle timeout applies).
    assert!(
        !closes_within(&mut conn, Duration::from_secs(2)).await,
        "closed by the header timeout while idle"
    );
    assert!(closes_within(&mut conn, WAIT).await, "idle for ever");
    assert_eq!(closed_for(&s, "idle_timeout"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_and_sse_streams_outlive_the_timeouts() {
    let s = TestServer::with(|c| {
        limits(1, 1)(c);
        c.ping_interval_sec = 60;
    })
    .await;
    let api = s.api();
    let tok = s.token("u1", &["room:*"]);
    let mut ws = WsClient::connect(&format!("{}/v1/ws?token={tok}", s.ws_url()))
        .await
        .expect("ws connects");
    ws.expect("welcome").await;
    ws.send(json!({"type": "subscribe", "stream": "room:1"}))
        .await;
    ws.expect("subscribed").await;
    let url = format!("{}/v1/streams/room:1/sse?token={tok}", s.url);
    let mut sse = SseClient::connect(&url, &[]).await.expect("sse connects");
    tokio::time::sleep(Duration::from_millis(3500)).await;
    api.publish("room:1", json!("late")).await;
    let ev = ws.expect("event").await;
    assert_eq!(ev["data"], "late");
    let evs = sse.events(1).await;
    assert_eq!(evs[0].json()["data"], "late");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_without_a_request_are_bounded_oldest_closed_first() {
    const MAX: usize = 8;
    const EXTRA: usize = 4;
    let s = TestServer::with(|c| {
        limits(30, 30)(c);
        c.max_pending_connections = MAX;
    })
    .await;
    // A streaming response is a request in progress: it does not count.
    let tok = s.token("u1", &["room:*"]);
    let url = format!("{}/v1/streams/room:1/sse?token={tok}", s.url);
    let mut sse = SseClient::connect(&url, &[]).await.expect("sse connects");
    let mut conns = Vec::new();
    for _ in 0..MAX + EXTRA {
        conns.push(connect(&s).await);
        // Accepted in order.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (i, c) in conns.iter_mut().enumerate().take(EXTRA) {
        assert!(
            closes_within(c, WAIT).await,
            "connection {i}: the oldest go first"
        );
    }
    for (i, c) in conns.iter_mut().enumerate().skip(EXTRA) {
        assert!(
            !closes_within(c, Duration::from_millis(300)).await,
            "connection {i}: within the bound, kept"
        );
    }
    assert_eq!(closed_for(&s, "pending_limit"), EXTRA as u64);
    // The kept ones are served, and the stream still flows.
    let last = conns.last_mut().unwrap();
    last.get_mut()
        .write_all(b"GET /health/live HTTP/1.1\r\nHost: zerodrop\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_answer(last).await.expect("answered").status, 200);
    s.api().publish("room:1", json!("still")).await;
    assert_eq!(sse.events(1).await[0].json()["data"], "still");
}
