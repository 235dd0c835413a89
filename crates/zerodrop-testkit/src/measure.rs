//! What benchmarks share: the raw SQLite ceiling that store and HTTP figures are compared
//! with in the same run, a closed-loop HTTP publisher, pinning a process to one core (figures
//! "per core"), and reading their settings and histograms.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rusqlite::{Connection, params};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use zerodrop_core::{Epoch, Event, Seq, StreamId};

/// Streams the raw inserts are spread over.
pub const RAW_STREAMS: usize = 100;

/// ~200 bytes of event JSON once wrapped (`{"text":"x…"}`), the payload the throughput
/// benchmarks publish.
pub fn payload() -> String {
    format!("{{\"text\":\"{}\"}}", "x".repeat(110))
}

/// Raw rusqlite inserts/s of one row per event (WAL, `synchronous=FULL`; the store's layout
/// before it kept a batch's events of a stream in one row, `sqlite/chunk.rs`), `n` events over
/// [`RAW_STREAMS`] streams, a commit every `commit_every` (`n`: all in one transaction, the
/// ceiling with no durability per event).
pub fn raw_sqlite_inserts(n: usize, commit_every: usize) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let conn = Connection::open(dir.path().join("raw.db")).unwrap();
    conn.query_row("PRAGMA journal_mode=WAL", [], |_| Ok(()))
        .unwrap();
    conn.execute_batch(
        "PRAGMA synchronous=FULL;
         CREATE TABLE events (id INTEGER PRIMARY KEY, stream TEXT NOT NULL, seq INTEGER NOT NULL,
           ts INTEGER NOT NULL, json BLOB NOT NULL, UNIQUE (stream, seq));",
    )
    .unwrap();
    let names: Vec<StreamId> = (0..RAW_STREAMS)
        .map(|i| StreamId::new(&format!("bench:{i}")).unwrap())
        .collect();
    let epoch = Epoch::parse("0123456789abcdef").unwrap();
    let data = payload();
    let started = Instant::now();
    let mut i = 0;
    while i < n {
        conn.execute_batch("BEGIN").unwrap();
        {
            let mut stmt = conn
                .prepare_cached(
                    "INSERT INTO events (stream, seq, ts, json) VALUES (?1, ?2, ?3, ?4)",
                )
                .unwrap();
            for _ in 0..commit_every.min(n - i) {
                let s = &names[i % RAW_STREAMS];
                let seq = (i / RAW_STREAMS + 1) as u64;
                let e = Event::encode(s.clone(), Seq(seq), epoch.clone(), 1, &data);
                stmt.execute(params![s.as_str(), seq as i64, 1i64, &e.json()[..]])
                    .unwrap();
                i += 1;
            }
        }
        conn.execute_batch("COMMIT").unwrap();
    }
    n as f64 / started.elapsed().as_secs_f64()
}

/// Pins process (or thread) `pid` (0: the caller) to CPU `cpu` (the spawner's, shared).
pub use zerodrop_local::process::pin;

/// The median of `v` (the upper one of an even count); 0 for none.
pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// A benchmark setting from the environment, or `default`.
pub fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The `q` quantile of a histogram of microseconds, in milliseconds.
pub fn ms_at(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

/// One request of a publisher: its path, its body, and how many events it carries.
pub type PublishRequest = (String, String, u64);

/// One append over HTTP of any kind: its path, content type, body, and how many events it
/// carries.
pub struct HttpAppend {
    pub path: String,
    pub content_type: &'static str,
    pub body: Vec<u8>,
    pub events: u64,
}

impl From<PublishRequest> for HttpAppend {
    fn from((path, body, events): PublishRequest) -> HttpAppend {
        HttpAppend {
            path,
            content_type: "application/json",
            body: body.into_bytes(),
            events,
        }
    }
}

/// Durable events/s over HTTP: one task per entry of `requests`, each cycling through its own
/// requests (built before the clock starts) with the api key `key`, waiting for each 201
/// before the next; counted for `secs` after a one-second warm-up.
pub async fn publish_rate(
    url: &str,
    key: &str,
    requests: Vec<Vec<PublishRequest>>,
    secs: u64,
) -> f64 {
    publish_rate_watched(url, key, requests, secs, &[]).await.0
}

/// [`publish_rate`], and what each process of `watch` spent per event over the counted
/// seconds: its CPU time (user + system) in µs per event, per thread name
/// ([`thread_cpu_secs`]).
pub async fn publish_rate_watched(
    url: &str,
    key: &str,
    requests: Vec<Vec<PublishRequest>>,
    secs: u64,
    watch: &[u32],
) -> (f64, Vec<BTreeMap<String, f64>>) {
    answered_rate_watched(url, key, requests, secs, watch, 201).await
}

/// [`publish_rate_watched`] for requests each answered `status`: with a status that refuses
/// them, what the requests cost without the work they were refused before.
pub async fn answered_rate_watched(
    url: &str,
    key: &str,
    requests: Vec<Vec<PublishRequest>>,
    secs: u64,
    watch: &[u32],
    status: u16,
) -> (f64, Vec<BTreeMap<String, f64>>) {
    let appends = requests
        .into_iter()
        .map(|mine| mine.into_iter().map(HttpAppend::from).collect())
        .collect();
    append_rate_watched(url, key, appends, secs, watch, &[status]).await
}

/// [`publish_rate`] for appends of any content type: each answered 201 or 204 (a Durable
/// Streams append) before the next.
///
/// Each publisher is one keep-alive connection that writes its requests' bytes, built before
/// the clock starts, and reads each answer's head and `Content-Length` body: as little client
/// work per request as `redis-benchmark` does per command, so that on a shared core the
/// publishers take as little as they can from what they measure.
pub async fn append_rate(url: &str, key: &str, requests: Vec<Vec<HttpAppend>>, secs: u64) -> f64 {
    append_rate_watched(url, key, requests, secs, &[], &[201, 204])
        .await
        .0
}

/// [`append_rate`], with the CPU per event of each process of `watch`, as
/// [`publish_rate_watched`]; each answer's status must be one of `answered`.
async fn append_rate_watched(
    url: &str,
    key: &str,
    requests: Vec<Vec<HttpAppend>>,
    secs: u64,
    watch: &[u32],
    answered: &[u16],
) -> (f64, Vec<BTreeMap<String, f64>>) {
    let addr = url
        .strip_prefix("http://")
        .expect("an http:// URL")
        .trim_end_matches('/')
        .to_string();
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for mine in requests {
        let wire: Vec<(Vec<u8>, u64)> = mine
            .iter()
            .map(|a| (request_bytes(&addr, key, a), a.events))
            .collect();
        let (stop, count, addr) = (stop.clone(), count.clone(), addr.clone());
        let answered = answered.to_vec();
        tasks.push(tokio::spawn(async move {
            let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
            conn.set_nodelay(true).unwrap();
            let mut buf = Vec::with_capacity(4096);
            let mut round = 0;
            while !stop.load(Ordering::Relaxed) {
                let (bytes, events) = &wire[round % wire.len()];
                conn.write_all(bytes).await.unwrap();
                let status = read_answer(&mut conn, &mut buf).await;
                assert!(answered.contains(&status), "{status}");
                count.fetch_add(*events, Ordering::Relaxed);
                round += 1;
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await; // warm-up
    let cpu_before: Vec<_> = watch.iter().map(|&pid| thread_cpu_secs(pid)).collect();
    let start_n = count.load(Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let n = count.load(Ordering::Relaxed) - start_n;
    let rate = n as f64 / started.elapsed().as_secs_f64();
    let per_event = watch
        .iter()
        .zip(cpu_before)
        .map(|(&pid, before)| {
            let mut after = thread_cpu_secs(pid);
            for (name, secs) in after.iter_mut() {
                *secs = (*secs - before.get(name).copied().unwrap_or(0.0)) * 1e6 / n.max(1) as f64;
            }
            after
        })
        .collect();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    (rate, per_event)
}

/// One append as HTTP/1.1 bytes on a keep-alive connection.
fn request_bytes(host: &str, key: &str, a: &HttpAppend) -> Vec<u8> {
    let mut out = format!(
        "POST {} HTTP/1.1\r\nhost: {host}\r\nauthorization: Bearer {key}\r\n\
         content-type: {}\r\ncontent-length: {}\r\n\r\n",
        a.path,
        a.content_type,
        a.body.len()
    )
    .into_bytes();
    out.extend_from_slice(&a.body);
    out
}

/// Reads one answer (its head and its `Content-Length` body) and returns its status. `buf`
/// carries what was read past it (nothing, with one request at a time).
async fn read_answer(conn: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> u16 {
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 24];
        let mut res = httparse::Response::new(&mut headers);
        if let httparse::Status::Complete(head) = res.parse(buf).expect("an HTTP answer") {
            let status = res.code.expect("a status");
            let mut len = 0usize;
            for h in res.headers.iter() {
                if h.name.eq_ignore_ascii_case("content-length") {
                    len = std::str::from_utf8(h.value)
                        .unwrap()
                        .trim()
                        .parse()
                        .unwrap();
                }
                assert!(
                    !h.name.eq_ignore_ascii_case("transfer-encoding"),
                    "a chunked answer"
                );
            }
            while buf.len() < head + len {
                read_more(conn, buf).await;
            }
            buf.drain(..head + len);
            return status;
        }
        read_more(conn, buf).await;
    }
}

async fn read_more(conn: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) {
    let mut chunk = [0u8; 4096];
    let n = conn.read(&mut chunk).await.unwrap();
    assert!(n > 0, "the server closed the connection");
    buf.extend_from_slice(&chunk[..n]);
}

/// Pins every thread of process `pid` to `cpu` (threads started later inherit it).
pub fn pin_all(pid: u32, cpu: usize) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    // Every thread is pinned, even after one refused.
    let pinned: Vec<bool> = tasks
        .filter_map(|t| t.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .map(|tid| pin(tid, cpu))
        .collect();
    pinned.iter().all(|ok| *ok)
}

/// Resident memory of process `pid` in bytes (`VmRSS`), 0 when it cannot be read.
pub fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// CPU time (user + system) process `pid` has used, in seconds; 0 when it cannot be read.
pub fn cpu_secs(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(0.0, |stat| stat_cpu_secs(&stat))
}

/// CPU time (user + system) each of process `pid`'s live threads has used, in seconds, summed
/// per thread name (`/proc/{pid}/task/*/comm`; a thread that ended is no longer counted).
/// Empty when it cannot be read.
pub fn thread_cpu_secs(pid: u32) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in tasks.flatten() {
        let path = task.path();
        let (Ok(name), Ok(stat)) = (
            std::fs::read_to_string(path.join("comm")),
            std::fs::read_to_string(path.join("stat")),
        ) else {
            continue;
        };
        *out.entry(name.trim().to_string()).or_insert(0.0) += stat_cpu_secs(&stat);
    }
    out
}

/// utime + stime of a `/proc/…/stat` line, in seconds.
fn stat_cpu_secs(stat: &str) -> f64 {
    // Fields after the command name, which is in parentheses and may hold spaces.
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after the state.
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (ticks(11) + ticks(12)) as f64 / hz
}
