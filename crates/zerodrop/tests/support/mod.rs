//! Support for the operator-tool tests: the real `zerodrop` binary on a free loopback port,
//! the tools run as subprocesses (real CLI, real exit codes), and a deliberately broken
//! proxy that sits in front of a real server and answers 500s or drops one event.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::extract::ws::{Message as AxMessage, WebSocketUpgrade};
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message as TMessage;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use zerodrop_ops::instance::{Instance, Secrets, Spec};

pub const BIN: &str = env!("CARGO_BIN_EXE_zerodrop");

/// A real server with known secrets, in its own data dir; killed when dropped.
pub struct Server {
    pub inst: Instance,
    pub secrets: Secrets,
    pub dir: tempfile::TempDir,
}

impl Server {
    pub async fn start() -> Server {
        let dir = tempfile::tempdir().expect("tempdir");
        let secrets = Secrets::generate();
        let spec = Spec::new(Path::new(BIN), &dir.path().join("data"), &secrets);
        let inst = Instance::start(spec).await.expect("zerodrop serve starts");
        Server { inst, secrets, dir }
    }

    /// A server that generates its own secrets into `secrets.json` (first start).
    pub async fn start_self_generated() -> Server {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut spec = Spec::new(
            Path::new(BIN),
            &dir.path().join("data"),
            &Secrets::generate(),
        );
        spec.env.clear();
        let inst = Instance::start(spec).await.expect("zerodrop serve starts");
        Server {
            inst,
            secrets: Secrets::generate(),
            dir,
        }
    }

    pub fn url(&self) -> String {
        self.inst.url()
    }

    /// Credential flags for a tool run.
    pub fn creds(&self) -> Vec<String> {
        vec![
            "--api-key".into(),
            self.secrets.api_key.clone(),
            "--jwt-secret".into(),
            self.secrets.jwt_secret.clone(),
            "--admin-token".into(),
            self.secrets.admin_token.clone(),
        ]
    }
}

pub struct ToolRun {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `zerodrop <args>` in `cwd` (bounded to 180 s) and returns its exit code and output.
pub async fn tool(cwd: &Path, args: &[String]) -> ToolRun {
    let child = tokio::process::Command::new(BIN)
        .args(args)
        .current_dir(cwd)
        .env_remove("ZERODROP_API_KEY")
        .env_remove("ZERODROP_JWT_SECRET")
        .env_remove("ZERODROP_ADMIN_TOKEN")
        .env_remove("ZERODROP_DATA_DIR")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn zerodrop");
    let out = tokio::time::timeout(Duration::from_secs(180), child.wait_with_output())
        .await
        .expect("the tool finishes within 180 s")
        .expect("tool output");
    let run = ToolRun {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    eprintln!(
        "$ zerodrop {}\n{}{}exit {}",
        args.first().cloned().unwrap_or_default(),
        run.stdout,
        run.stderr,
        run.code
    );
    run
}

pub fn args(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// Reports in `dir` whose name starts with `prefix`.
pub fn reports(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    v.retain(|p| {
        p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(prefix) && n.ends_with(".json"))
    });
    v.sort();
    v
}

/// An SLO file with the shipped shape but latency limits no test machine misses: tests
/// judge correctness, never wall-clock speed.
pub fn lenient_slo(dir: &Path) -> PathBuf {
    let mut v: serde_json::Value =
        serde_json::from_str(include_str!("../../../../slo.json")).expect("slo.json");
    for (_, s) in v["scenarios"]
        .as_object_mut()
        .expect("scenarios")
        .iter_mut()
    {
        if s.get("p95_ms").is_some() {
            s["p95_ms"] = serde_json::json!(60_000);
        }
    }
    v["canary"]["max_p95_regression_pct"] = serde_json::json!(100_000);
    let p = dir.join("slo-test.json");
    std::fs::write(&p, serde_json::to_vec_pretty(&v).expect("json")).expect("write slo");
    p
}

/// What the broken proxy breaks.
#[derive(Clone, Copy, Debug, Default)]
pub struct Faults {
    /// Every n-th publish is answered 500 without reaching the server.
    pub fail_publish_every: Option<u64>,
    /// WebSocket `event` frames with this seq never reach the client.
    pub drop_event_seq: Option<u64>,
    /// Log reads (`GET …/events`) come back with `"n":3` changed to `"n":33`: the events
    /// served no longer chain to the stream's `hash`.
    pub alter_served_events: bool,
    /// Every webhook reaches the server with an `Idempotency-Key` of its own (the provider's
    /// id plus a counter), so the server cannot tell a duplicate from a new message.
    pub break_webhook_dedupe: bool,
}

struct ProxyState {
    upstream: SocketAddr,
    faults: Faults,
    http: reqwest::Client,
    publishes: AtomicU64,
}

/// A broken proxy that drops the WebSocket event with seq 2: zero-drop is broken on purpose.
pub async fn event_dropping_proxy(upstream: SocketAddr) -> SocketAddr {
    let faults = Faults {
        drop_event_seq: Some(2),
        ..Faults::default()
    };
    broken_proxy(upstream, faults).await
}

/// Starts the broken proxy in front of `upstream`; it lives as long as the runtime.
pub async fn broken_proxy(upstream: SocketAddr, faults: Faults) -> SocketAddr {
    let state = Arc::new(ProxyState {
        upstream,
        faults,
        http: reqwest::Client::new(),
        publishes: AtomicU64::new(0),
    });
    let app = axum::Router::new()
        .route("/v1/ws", axum::routing::get(ws))
        .fallback(forward)
        .with_state(state);
    serve_local(app).await
}

/// Serves `app` on a free loopback port for as long as the runtime lives; its address.
pub async fn serve_local(app: axum::Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    addr
}

async fn forward(State(st): State<Arc<ProxyState>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    if parts.method == axum::http::Method::POST && parts.uri.path().ends_with("/events") {
        let n = st.publishes.fetch_add(1, Ordering::Relaxed) + 1;
        if st.faults.fail_publish_every.is_some_and(|k| n % k == 0) {
            return (
                axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                [("content-type", "application/json")],
                r#"{"error":{"code":"INTERNAL","message":"injected by the broken proxy"}}"#,
            )
                .into_response();
        }
    }
    let rekey = (st.faults.break_webhook_dedupe
        && parts.method == axum::http::Method::POST
        && parts.uri.path().starts_with("/v1/webhooks/"))
    .then(|| st.publishes.fetch_add(1, Ordering::Relaxed));
    let Ok(bytes) = axum::body::to_bytes(body, 4 << 20).await else {
        return axum::http::StatusCode::BAD_REQUEST.into_response();
    };
    let mut rb = st
        .http
        .request(
            parts.method.clone(),
            format!("http://{}{path}", st.upstream),
        )
        .body(bytes);
    for (k, v) in parts.headers.iter() {
        if k != "host" && k != "content-length" {
            rb = match rekey {
                Some(n) if k == "idempotency-key" => {
                    rb.header(k, format!("{}-{n}", v.to_str().unwrap_or("")))
                }
                _ => rb.header(k, v),
            };
        }
    }
    let alter = st.faults.alter_served_events
        && parts.method == axum::http::Method::GET
        && parts.uri.path().ends_with("/events");
    match rb.send().await {
        Ok(resp) if alter => {
            let status = resp.status().as_u16();
            let body = resp.text().await.unwrap_or_default();
            Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .body(axum::body::Body::from(
                    body.replace(r#""n":3}"#, r#""n":33}"#),
                ))
                .unwrap_or_else(|_| axum::http::StatusCode::BAD_GATEWAY.into_response())
        }
        Ok(resp) => {
            let mut b = Response::builder().status(resp.status().as_u16());
            for (k, v) in resp.headers() {
                if k != "content-length" && k != "transfer-encoding" {
                    b = b.header(k, v);
                }
            }
            b.body(axum::body::Body::from_stream(resp.bytes_stream()))
                .unwrap_or_else(|_| axum::http::StatusCode::BAD_GATEWAY.into_response())
        }
        Err(_) => axum::http::StatusCode::BAD_GATEWAY.into_response(),
    }
}

async fn ws(
    State(st): State<Arc<ProxyState>>,
    upgrade: WebSocketUpgrade,
    req: Request,
) -> Response {
    let q = req
        .uri()
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    let Ok(mut up_req) = format!("ws://{}/v1/ws{q}", st.upstream).into_client_request() else {
        return axum::http::StatusCode::BAD_REQUEST.into_response();
    };
    up_req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        axum::http::HeaderValue::from_static("zerodrop.v1"),
    );
    let up = match tokio_tungstenite::connect_async(up_req).await {
        Ok((s, _)) => s,
        Err(_) => return axum::http::StatusCode::BAD_GATEWAY.into_response(),
    };
    let drop_seq = st.faults.drop_event_seq;
    upgrade
        .protocols(["zerodrop.v1"])
        .on_upgrade(move |client| async move {
            let (mut up_tx, mut up_rx) = up.split();
            let (mut c_tx, mut c_rx) = client.split();
            let to_server = async {
                while let Some(Ok(m)) = c_rx.next().await {
                    let m = match m {
                        AxMessage::Text(t) => TMessage::text(t.as_str().to_string()),
                        AxMessage::Close(_) => break,
                        _ => continue,
                    };
                    if up_tx.send(m).await.is_err() {
                        break;
                    }
                }
            };
            let to_client = async {
                while let Some(Ok(m)) = up_rx.next().await {
                    let m = match m {
                        TMessage::Text(t) => {
                            if let Some(seq) = drop_seq
                                && let Ok(v) = serde_json::from_str::<serde_json::Value>(t.as_str())
                                && v["type"] == "event"
                                && v["seq"] == seq
                            {
                                continue; // the broken part: this event is lost
                            }
                            AxMessage::Text(t.as_str().to_string().into())
                        }
                        TMessage::Close(_) => break,
                        _ => continue,
                    };
                    if c_tx.send(m).await.is_err() {
                        break;
                    }
                }
            };
            tokio::select! {
                _ = to_server => {}
                _ = to_client => {}
            }
        })
}

/// The next event frame of `ws` (other frames are skipped), each frame within 5 s, at most
/// 50 frames.
pub async fn next_event(ws: &mut zerodrop_client::WsConnection) -> zerodrop_client::Event {
    for _ in 0..50 {
        match tokio::time::timeout(Duration::from_secs(5), ws.recv())
            .await
            .expect("a frame in time")
            .expect("open")
        {
            zerodrop_client::ServerFrame::Event(e) => return e,
            _ => continue,
        }
    }
    panic!("no event within 50 frames");
}

/// Starts a drain of instance 0 of `c` (sessions older than 1 s are moved) and keeps
/// publishing `{"n": n}` to `stream` on instance 1, from `after + 1`, every 50 ms, until the
/// drained instance holds no session (at least 20 publishes, at most 30 s). The last `n`.
pub async fn drain_while_publishing(
    c: &zerodrop_testkit::cluster::Cluster,
    stream: &str,
    after: u64,
) -> u64 {
    let (drained, other) = (c.api(0), c.api(1));
    let r = drained
        .post(
            "/admin/drain/start",
            Some(&c.creds.admin_token),
            serde_json::json!({"reason": "rolling_deployment", "max_session_age_seconds": 1}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let mut n = after;
    let until = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        n += 1;
        let r = other.publish(stream, serde_json::json!({ "n": n })).await;
        assert_eq!(r["seq"], n);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let st = drained
            .get("/admin/drain/status", Some(&c.creds.admin_token))
            .await;
        if n >= after + 20 && st.json["sessionsRemaining"] == 0 {
            return n;
        }
        assert!(
            std::time::Instant::now() < until,
            "the drained instance still holds a session: {}",
            st.text
        );
    }
}

/// Publishes `{"n": n}` for every n in `from..=to`, each landing at seq n.
pub async fn publish_range(api: &zerodrop_testkit::http::Api, stream: &str, from: u64, to: u64) {
    for n in from..=to {
        let r = api.publish(stream, serde_json::json!({ "n": n })).await;
        assert_eq!(r["seq"], n, "publish {n}: {r}");
    }
}

/// `zerodrop serve --store sqlite <args…>` as a child process on `127.0.0.1:<port>`.
pub fn spawn_sqlite(
    dir: &Path,
    port: u16,
    args: &[&str],
) -> zerodrop_testkit::server::ServerProcess {
    let mut all = vec!["--store", "sqlite"];
    all.extend_from_slice(args);
    zerodrop_testkit::server::ServerProcess::spawn(
        Path::new(BIN),
        dir,
        &format!("127.0.0.1:{port}"),
        &all,
        &[],
    )
    .expect("zerodrop serve starts")
}
