//! `https://` and `wss://` end to end: a throwaway CA and a server certificate made with the
//! `openssl` CLI, a rustls terminator on loopback in front of a real `zerodrop serve`, and
//! the SDK (HTTP, WebSocket, SSE) and `zerodrop probe` through it, trusting the CA with
//! `Tls::with_ca_file` / `--ca-file`. Without the CA every transport fails with
//! `ClientError::Tls`. The SDK's `Client` subscribes and verifies over the same. Needs `openssl` on PATH.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use support::{Server, args, next_event, tool};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use zerodrop_client::{
    Client, ClientError, ClientOptions, HttpClient, SseAuth, SseConnection, SseMessage, SseOptions,
    SubscribeOptions, Tls, Verdict, WsAuth, WsConnection, mint_connect_token,
};

const T: Duration = Duration::from_secs(10);

/// A CA and a server certificate it signed for `127.0.0.1` / `localhost`.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }
    fn cert(&self) -> PathBuf {
        self.dir.path().join("server.pem")
    }
    fn key(&self) -> PathBuf {
        self.dir.path().join("server.key")
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl on PATH");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn make_pki() -> Pki {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=zerodrop test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ]);
    openssl(d, &ca);
    let mut csr = vec!["req", "-new"];
    csr.extend(ec);
    csr.extend([
        "-nodes",
        "-subj",
        "/CN=localhost",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ]);
    openssl(d, &csr);
    std::fs::write(
        d.join("ext.cnf"),
        "basicConstraints=CA:FALSE\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .unwrap();
    openssl(
        d,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-set_serial",
            "2",
            "-days",
            "1",
            "-extfile",
            "ext.cnf",
            "-out",
            "server.pem",
        ],
    );
    Pki { dir }
}

/// Terminates TLS on a free loopback port and forwards the plain bytes to `upstream`;
/// stops when dropped.
struct Terminator {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Terminator {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn terminator(pki: &Pki, upstream: SocketAddr) -> Terminator {
    let certs = CertificateDer::pem_file_iter(pki.cert())
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(pki.key()).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            conns.spawn(async move {
                // A client that rejects the certificate aborts the handshake: nothing to do.
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut plain) = tokio::net::TcpStream::connect(upstream).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    Terminator { addr, task }
}

fn token(s: &Server, streams: &str) -> String {
    mint_connect_token(
        &s.secrets.jwt_secret,
        "tls-user",
        &[streams.to_string()],
        None,
        Duration::from_secs(300),
    )
    .unwrap()
}

async fn next_sse_event(sse: &mut SseConnection) -> zerodrop_client::Event {
    for _ in 0..50 {
        match tokio::time::timeout(T, sse.next())
            .await
            .expect("an SSE message in time")
            .expect("open")
        {
            SseMessage::Event { event, .. } => return event,
            _ => continue,
        }
    }
    panic!("no SSE event within 50 messages");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_ws_and_sse_over_tls_trust_the_custom_ca_and_fail_clearly_without_it() {
    let pki = make_pki();
    let s = Server::start().await;
    let front = terminator(&pki, s.inst.addr).await;
    let url = format!("https://127.0.0.1:{}", front.addr.port());
    let tls = Tls::with_ca_file(pki.ca()).unwrap();
    assert_eq!(tls.extra_roots(), 1);
    let stream = "tls:1";
    let tok = token(&s, "tls:*");

    // HTTP: publish and read back.
    let http = HttpClient::with_tls(&url, Some(s.secrets.api_key.clone()), T, &tls).unwrap();
    let p = http
        .publish(stream, r#"{"n":1}"#, Some("k1"))
        .await
        .unwrap();
    assert_eq!((p.seq, p.duplicate), (1, false));
    let page = http.read_events(stream, 0, 10, Some(&tok)).await.unwrap();
    assert_eq!(page.events.iter().map(|e| e.seq).collect::<Vec<_>>(), [1]);
    assert_eq!(http.stream_info(stream).await.unwrap().head_seq, 1);

    // WebSocket over wss: subscribe from 0, get the stored event, then a live one.
    let mut ws = WsConnection::connect_with(&url, WsAuth::Token(tok.clone()), T, &tls)
        .await
        .unwrap();
    ws.subscribe(stream, Some(0), None).await.unwrap();
    ws.await_subscribed(stream, |_| {}).await.unwrap();
    let e = next_event(&mut ws).await;
    assert_eq!((e.stream.as_str(), e.seq), (stream, 1));
    assert_eq!(
        http.publish(stream, r#"{"n":2}"#, None).await.unwrap().seq,
        2
    );
    assert_eq!(next_event(&mut ws).await.seq, 2);

    // SSE over https (the HttpClient's TLS): both events from the start, in order.
    let mut sse = SseConnection::connect(
        &http,
        stream,
        &SseAuth::Token(tok.clone()),
        &SseOptions {
            after: Some(0),
            ..SseOptions::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(next_sse_event(&mut sse).await.seq, 1);
    assert_eq!(next_sse_event(&mut sse).await.seq, 2);
    assert_eq!(
        http.publish(stream, r#"{"n":3}"#, None).await.unwrap().seq,
        3
    );
    assert_eq!(next_sse_event(&mut sse).await.seq, 3);
    assert_eq!(next_event(&mut ws).await.seq, 3);

    // The system's roots alone do not know the CA: every transport says so, typed.
    let system = Tls::system();
    let untrusted = HttpClient::with_tls(&url, Some(s.secrets.api_key.clone()), T, &system)
        .unwrap()
        .publish(stream, r#"{"n":4}"#, None)
        .await
        .unwrap_err();
    assert!(
        matches!(&untrusted, ClientError::Tls(m) if m.contains("certificate")),
        "{untrusted:?}"
    );
    assert!(!untrusted.is_network());
    let untrusted = WsConnection::connect_with(&url, WsAuth::Token(tok.clone()), T, &system)
        .await
        .err()
        .expect("wss without the CA fails");
    assert!(
        matches!(&untrusted, ClientError::Tls(m) if m.contains("certificate")),
        "{untrusted:?}"
    );
    // The default constructors use the system's roots too.
    let default_http = HttpClient::new(&url, Some(s.secrets.api_key.clone())).unwrap();
    let untrusted = SseConnection::connect(
        &default_http,
        stream,
        &SseAuth::Token(tok.clone()),
        &SseOptions::default(),
    )
    .await
    .err()
    .expect("SSE without the CA fails");
    assert!(matches!(untrusted, ClientError::Tls(_)), "{untrusted:?}");
    let untrusted = WsConnection::connect(&url, WsAuth::Token(tok), T)
        .await
        .err()
        .expect("wss without the CA fails");
    assert!(matches!(untrusted, ClientError::Tls(_)), "{untrusted:?}");
    // Nothing of that reached the stream.
    assert_eq!(http.stream_info(stream).await.unwrap().head_seq, 3);

    // Plain http:// is untouched by any of this.
    let plain =
        HttpClient::with_tls(&s.url(), Some(s.secrets.api_key.clone()), T, &system).unwrap();
    assert_eq!(plain.stream_info(stream).await.unwrap().head_seq, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_passes_over_https_with_ca_file_and_fails_without_it() {
    let pki = make_pki();
    let s = Server::start().await;
    let front = terminator(&pki, s.inst.addr).await;
    let url = format!("https://127.0.0.1:{}", front.addr.port());
    let work = tempfile::tempdir().unwrap();
    let ca = pki.ca().to_str().unwrap().to_string();

    let mut a = args(&["probe", "--url", &url, "--ca-file", &ca]);
    a.extend(s.creds());
    let ok = tool(work.path(), &a).await;
    assert_eq!(ok.code, 0, "probe over https with --ca-file must pass");
    assert!(ok.stdout.contains("probe passed"), "{}", ok.stdout);

    let mut a = args(&["probe", "--url", &url, "--step-timeout", "3"]);
    a.extend(s.creds());
    let bad = tool(work.path(), &a).await;
    assert_eq!(bad.code, 1, "probe without the CA must fail");
    let out = format!("{}{}", bad.stdout, bad.stderr);
    assert!(
        out.contains("FAIL  health")
            && out.contains("tls: invalid peer certificate: UnknownIssuer"),
        "{out}"
    );

    let mut a = args(&["probe", "--url", &url, "--ca-file", "/nonexistent/ca.pem"]);
    a.extend(s.creds());
    let missing = tool(work.path(), &a).await;
    assert_eq!(missing.code, 1);
    let out = format!("{}{}", missing.stdout, missing.stderr);
    assert!(
        out.contains("--ca-file: tls: CA file /nonexistent/ca.pem"),
        "{out}"
    );

    // The dashboard's live card: ready through the CA, unreachable (TLS) without it.
    let o = work.path().join("out");
    std::fs::create_dir_all(&o).unwrap();
    let o = o.to_str().unwrap();
    let a = args(&["dashboard", "--out-dir", o, "--url", &url, "--ca-file", &ca]);
    let dash = tool(work.path(), &a).await;
    assert_eq!(dash.code, 0, "{}{}", dash.stdout, dash.stderr);
    assert!(
        dash.stdout
            .contains(&format!("live snapshot of {url}: ready")),
        "{}",
        dash.stdout
    );
    let dash = tool(
        work.path(),
        &args(&["dashboard", "--out-dir", o, "--url", &url]),
    )
    .await;
    assert_eq!(dash.code, 0, "{}{}", dash.stdout, dash.stderr);
    assert!(
        dash.stdout.contains(&format!(
            "live snapshot of {url}: unreachable (tls: invalid peer certificate: UnknownIssuer"
        )),
        "{}",
        dash.stdout
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_subscribes_and_verifies_over_wss_and_https() {
    let pki = make_pki();
    let s = Server::start().await;
    let front = terminator(&pki, s.inst.addr).await;
    let url = format!("https://127.0.0.1:{}", front.addr.port());
    let stream = "tlsc:1";
    let tok = token(&s, "tlsc:*");
    let options = |tls: Tls| ClientOptions {
        tls: Some(tls),
        connect_timeout: T,
        ..ClientOptions::default()
    };

    let refused = Client::connect_with(&[&url], &tok, options(Tls::system()))
        .await
        .err()
        .expect("no connection without the CA");
    assert!(matches!(refused, ClientError::Tls(_)), "{refused:?}");

    let tls = Tls::with_ca_file(pki.ca()).unwrap();
    let client = Client::connect_with(&[&url], &tok, options(tls.clone()))
        .await
        .unwrap();
    assert_eq!(client.protocol(), "zerodrop.v3");
    let mut sub = client.subscribe_with(
        stream,
        SubscribeOptions {
            after: Some(0),
            epoch: None,
            ..Default::default()
        },
    );
    let http = HttpClient::with_tls(&url, Some(s.secrets.api_key.clone()), T, &tls).unwrap();
    for n in 1..=3u64 {
        assert_eq!(
            http.publish(stream, &format!(r#"{{"n":{n}}}"#), None)
                .await
                .unwrap()
                .seq,
            n
        );
    }
    for want in 1..=3u64 {
        let e = tokio::time::timeout(T, sub.next())
            .await
            .expect("an event in time")
            .expect("open")
            .expect("no error");
        assert_eq!(e.seq, want);
        e.handled();
    }
    // The consistency check reads the stream over https with the same roots.
    let check = client.verify(stream).await.unwrap();
    assert!(
        matches!(check.verdict, Verdict::Consistent { count: 3, .. }),
        "{:?}",
        check.verdict
    );
}
