//! Durable Streams appends (`POST /ds/v1/stream/{stream}`) against `/v1` publishes of the
//! same events, durable, over HTTP, with the server on one core.
//!
//! `cargo bench -p zerodrop --bench ds` starts the release binary on a fresh data dir
//! (SQLite, `synchronous=FULL`, `--ds-access open`), pins it to CPU 0 and this process (the
//! publishers) to CPU 1, and in each of `ROUNDS` rounds (env, default 5) runs for `SECONDS`
//! (default 5) each: `PUBLISHERS` (default 64) concurrent publishers, each sending one
//! 200-byte event per request to one of 100 streams and waiting for the answer before the
//! next — first as `/v1` publishes (`{"data": …}`, 201), then as Durable Streams appends of
//! the same JSON value to `application/json` streams (204), then as byte appends of 200 bytes
//! to `application/octet-stream` streams (204: stored as `{"$base64": …}` data). Prints the
//! median durable appends/s of each and their ratios to `/v1`.

use std::path::Path;

use serde_json::json;
use zerodrop_testkit::measure::{HttpAppend, append_rate, env_u64, median, pin, pin_all};
use zerodrop_testkit::server::ServerProcess;

/// What one request sends: path, content type, body.
type Req = (String, &'static str, Vec<u8>);

#[derive(Clone, Copy)]
enum Kind {
    V1,
    DsJson,
    DsBytes,
}

fn request(kind: Kind, stream: usize) -> Req {
    let text = "x".repeat(110);
    match kind {
        Kind::V1 => (
            format!("/v1/streams/v1bench:{stream}/events"),
            "application/json",
            json!({"data": {"text": text}}).to_string().into_bytes(),
        ),
        Kind::DsJson => (
            format!("/ds/v1/stream/dsjson:{stream}"),
            "application/json",
            json!({"text": text}).to_string().into_bytes(),
        ),
        Kind::DsBytes => (
            format!("/ds/v1/stream/dsbytes:{stream}"),
            "application/octet-stream",
            (0..200u32).map(|i| (i * 7 % 256) as u8).collect(),
        ),
    }
}

/// Appends/s: one task per publisher, each cycling over its streams, counted for `secs`
/// after a one-second warm-up.
async fn rate(url: &str, key: &str, kind: Kind, publishers: usize, secs: u64) -> f64 {
    let requests = (0..publishers)
        .map(|w| {
            (0..16)
                .map(|i| {
                    let (path, content_type, body) = request(kind, (w + i * 7) % 100);
                    HttpAppend {
                        path,
                        content_type,
                        body,
                        events: 1,
                    }
                })
                .collect()
        })
        .collect();
    append_rate(url, key, requests, secs).await
}

fn main() {
    let rounds = env_u64("ROUNDS", 5) as usize;
    let secs = env_u64("SECONDS", 5);
    let publishers = env_u64("PUBLISHERS", 64) as usize;
    let dir = tempfile::tempdir().unwrap();
    let bin = Path::new(env!("CARGO_BIN_EXE_zerodrop"));
    let p = ServerProcess::spawn(
        bin,
        dir.path(),
        "127.0.0.1:0",
        &["--ds-access", "open"],
        &[],
    )
    .expect("server starts");
    let pinned = pin_all(p.pid(), 0) && pin(0, 1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let http = reqwest::Client::new();
        for s in 0..100 {
            for (prefix, ct) in [
                ("dsjson", "application/json"),
                ("dsbytes", "application/octet-stream"),
            ] {
                let r = http
                    .put(format!("{}/ds/v1/stream/{prefix}:{s}", p.url))
                    .header("content-type", ct)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status().as_u16(), 201);
            }
        }
    });
    let key = p.creds.api_key.clone();
    let (mut v1, mut json, mut bytes) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        v1.push(rt.block_on(rate(&p.url, &key, Kind::V1, publishers, secs)));
        json.push(rt.block_on(rate(&p.url, &key, Kind::DsJson, publishers, secs)));
        bytes.push(rt.block_on(rate(&p.url, &key, Kind::DsBytes, publishers, secs)));
    }
    println!(
        "durable appends over HTTP, 200-byte events, 100 streams, {publishers} publishers, \
         {secs} s per round, median of {rounds}; server on CPU 0, publishers on CPU 1: {}",
        if pinned { "pinned" } else { "NOT pinned" }
    );
    let rounds_of = |v: &[f64]| v.iter().map(|r| *r as u64).collect::<Vec<_>>();
    let (a, b, c) = (
        median(v1.clone()),
        median(json.clone()),
        median(bytes.clone()),
    );
    println!("{:<32} {:>10}  rounds", "requests", "appends/s");
    println!("{:<32} {a:>10.0}  {:?}", "/v1 publish", rounds_of(&v1));
    println!(
        "{:<32} {b:>10.0}  {:?}",
        "/ds append, JSON",
        rounds_of(&json)
    );
    println!(
        "{:<32} {c:>10.0}  {:?}",
        "/ds append, 200 bytes",
        rounds_of(&bytes)
    );
    println!("/ds JSON / v1: {:.2}x", b / a.max(1.0));
    println!("/ds bytes / v1: {:.2}x", c / a.max(1.0));
}
