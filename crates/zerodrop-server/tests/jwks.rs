//! Connect tokens signed with asymmetric keys (SPEC §9): RS256, ES256 and EdDSA verified from
//! a JWKS file or URL beside HS256; every key pinned to its algorithm (algorithm confusion
//! and `kid` injection refused); rotation without a restart, with reads on unknown `kid`s
//! rate-limited; `iss` and `aud` checks. Keys are generated per run with `openssl`.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use zerodrop_core::now_ms;
use zerodrop_testkit::server::TestServer;
use zerodrop_testkit::ws::WsClient;

/// A private key, its algorithm and `kid`, and its public JWK.
struct Signer {
    alg: Algorithm,
    kid: String,
    key: EncodingKey,
    der: Vec<u8>,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl runs (the test set-up installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn signer(dir: &Path, alg: Algorithm, kid: &str) -> Signer {
    let der = dir.join(format!("{kid}.der"));
    let der_s = der.to_str().unwrap();
    let key = match alg {
        Algorithm::RS256 => {
            let pem = dir.join(format!("{kid}.pem"));
            let pem_s = pem.to_str().unwrap();
            openssl(
                dir,
                &[
                    "genpkey",
                    "-algorithm",
                    "RSA",
                    "-pkeyopt",
                    "rsa_keygen_bits:2048",
                    "-out",
                    pem_s,
                ],
            );
            openssl(
                dir,
                &[
                    "rsa",
                    "-in",
                    pem_s,
                    "-traditional",
                    "-outform",
                    "DER",
                    "-out",
                    der_s,
                ],
            );
            EncodingKey::from_rsa_der(&std::fs::read(&der).unwrap())
        }
        Algorithm::ES256 => {
            // genpkey writes EC keys as SEC1; the signer takes PKCS#8.
            let pem = dir.join(format!("{kid}.pem"));
            let pem_s = pem.to_str().unwrap();
            openssl(
                dir,
                &[
                    "genpkey",
                    "-algorithm",
                    "EC",
                    "-pkeyopt",
                    "ec_paramgen_curve:P-256",
                    "-out",
                    pem_s,
                ],
            );
            openssl(
                dir,
                &[
                    "pkcs8", "-topk8", "-nocrypt", "-in", pem_s, "-outform", "DER", "-out", der_s,
                ],
            );
            EncodingKey::from_ec_der(&std::fs::read(&der).unwrap())
        }
        Algorithm::EdDSA => {
            openssl(
                dir,
                &[
                    "genpkey",
                    "-algorithm",
                    "ed25519",
                    "-outform",
                    "DER",
                    "-out",
                    der_s,
                ],
            );
            EncodingKey::from_ed_der(&std::fs::read(&der).unwrap())
        }
        other => panic!("no signer for {other:?}"),
    };
    Signer {
        alg,
        kid: kid.to_string(),
        key,
        der: std::fs::read(&der).unwrap(),
    }
}

impl Signer {
    fn jwk(&self) -> Value {
        let mut jwk =
            serde_json::to_value(Jwk::from_encoding_key(&self.key, self.alg).unwrap()).unwrap();
        jwk["kid"] = json!(self.kid);
        jwk
    }

    /// A token for `sub` on `room:*`, with this key's `alg` and `kid` (overridable).
    fn token(&self, sub: &str, extra: Value) -> String {
        sign(&self.key, self.alg, Some(&self.kid), sub, extra)
    }
}

fn sign(key: &EncodingKey, alg: Algorithm, kid: Option<&str>, sub: &str, extra: Value) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_string);
    let now = now_ms() / 1000;
    let mut claims = json!({"sub": sub, "exp": now + 600, "iat": now, "streams": ["room:*"]});
    for (k, v) in extra.as_object().unwrap() {
        claims[k] = v.clone();
    }
    jsonwebtoken::encode(&header, &claims, key).unwrap()
}

fn jwks(signers: &[&Signer]) -> String {
    json!({"keys": signers.iter().map(|s| s.jwk()).collect::<Vec<_>>()}).to_string()
}

/// `POST /v1/sessions` with `token`: the status and error code.
async fn open(s: &TestServer, token: &str) -> (u16, String) {
    let r = s
        .api()
        .post("/v1/sessions", Some(token), json!({"streams":["room:a"]}))
        .await;
    (r.status, r.code().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rs256_es256_and_eddsa_verify_from_a_jwks_file_beside_hs256() {
    let dir = tempfile::tempdir().unwrap();
    let rsa = signer(dir.path(), Algorithm::RS256, "rsa-1");
    let ec = signer(dir.path(), Algorithm::ES256, "ec-1");
    let ed = signer(dir.path(), Algorithm::EdDSA, "ed-1");
    let file = dir.path().join("jwks.json");
    std::fs::write(&file, jwks(&[&rsa, &ec, &ed])).unwrap();
    let url = format!("file://{}", file.display());
    let s = TestServer::with(|c| c.jwks_url = Some(url)).await;
    for k in [&rsa, &ec, &ed] {
        assert_eq!(
            open(&s, &k.token("u1", json!({}))).await,
            (201, String::new()),
            "{:?}",
            k.alg
        );
    }
    assert_eq!(
        open(&s, &s.creds.token("u1", &["room:*"], &[])).await.0,
        201,
        "HS256 still works"
    );
    // A WebSocket and an SSE stream with an EdDSA token.
    let t = ed.token("u1", json!({}));
    let mut c = WsClient::connect(&format!("{}/v1/ws?token={t}", s.ws_url()))
        .await
        .unwrap();
    c.expect("welcome").await;
    // Expired, or signed by a key that is not the JWKS's under a known kid: refused.
    let now = now_ms() / 1000;
    let r = s
        .api()
        .post(
            "/v1/sessions",
            Some(&ec.token("u1", json!({"exp": now - 60}))),
            json!({}),
        )
        .await;
    assert_eq!((r.status, r.code()), (401, "UNAUTHORIZED"));
    assert!(r.text.contains("expired"), "{}", r.text);
    let impostor = signer(dir.path(), Algorithm::ES256, "ec-impostor");
    let forged = sign(
        &impostor.key,
        Algorithm::ES256,
        Some("ec-1"),
        "u1",
        json!({}),
    );
    assert_eq!(open(&s, &forged).await, (401, "UNAUTHORIZED".into()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn algorithm_confusion_and_kid_injection_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let rsa = signer(dir.path(), Algorithm::RS256, "rsa-1");
    let ec = signer(dir.path(), Algorithm::ES256, "ec-1");
    let file = dir.path().join("jwks.json");
    std::fs::write(&file, jwks(&[&rsa, &ec])).unwrap();
    let s = TestServer::with(|c| {
        c.jwks_url = Some(file.display().to_string());
        c.jwks_refresh_min_sec = 3600;
    })
    .await;
    // The RSA public key (as its JWK, its DER, its modulus) used as an HS256 secret, with and
    // without the RSA key's kid: HS256 is only ever the JWT secret's.
    let public = rsa.jwk();
    let secrets: Vec<Vec<u8>> = vec![
        public.to_string().into_bytes(),
        public["n"].as_str().unwrap().as_bytes().to_vec(),
        rsa.der.clone(),
    ];
    for secret in &secrets {
        for kid in [Some("rsa-1"), None] {
            let t = sign(
                &EncodingKey::from_secret(secret),
                Algorithm::HS256,
                kid,
                "u1",
                json!({}),
            );
            assert_eq!(
                open(&s, &t).await,
                (401, "UNAUTHORIZED".into()),
                "HS256 with the public key, kid {kid:?}"
            );
        }
    }
    // A key presented for another algorithm than its own: an ES256 token naming the RSA key.
    let t = sign(&ec.key, Algorithm::ES256, Some("rsa-1"), "u1", json!({}));
    let r = s.api().post("/v1/sessions", Some(&t), json!({})).await;
    assert_eq!((r.status, r.code()), (401, "UNAUTHORIZED"));
    assert!(r.text.contains("another alg"), "{}", r.text);
    // kid injection: paths, SQL, huge, empty, missing.
    let long = "k".repeat(5000);
    for kid in [
        "../../../../etc/passwd",
        "rsa-1' OR '1'='1",
        long.as_str(),
        "",
    ] {
        let t = sign(&rsa.key, Algorithm::RS256, Some(kid), "u1", json!({}));
        assert_eq!(
            open(&s, &t).await,
            (401, "UNAUTHORIZED".into()),
            "kid {:?}",
            &kid[..kid.len().min(40)]
        );
    }
    let t = sign(&rsa.key, Algorithm::RS256, None, "u1", json!({}));
    let r = s.api().post("/v1/sessions", Some(&t), json!({})).await;
    assert_eq!((r.status, r.code()), (401, "UNAUTHORIZED"));
    assert!(r.text.contains("no kid"), "{}", r.text);
    // `alg: none` and algorithms zerodrop does not take.
    let unsigned = {
        use base64::Engine;
        let b = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let now = now_ms() / 1000;
        format!(
            "{}.{}.",
            b.encode(r#"{"alg":"none","typ":"JWT"}"#),
            b.encode(json!({"sub":"u1","exp":now + 60,"streams":["room:*"]}).to_string())
        )
    };
    assert_eq!(open(&s, &unsigned).await, (401, "UNAUTHORIZED".into()));
    let hs512 = sign(
        &EncodingKey::from_secret(s.creds.jwt_secret.as_bytes()),
        Algorithm::HS512,
        None,
        "u1",
        json!({}),
    );
    assert_eq!(
        open(&s, &hs512).await,
        (401, "UNAUTHORIZED".into()),
        "only HS256 with the secret"
    );
    // The honest tokens still work.
    assert_eq!(open(&s, &rsa.token("u1", json!({}))).await.0, 201);
}

/// Serves a JWKS document (replaceable) and counts the reads.
struct JwksServer {
    doc: Arc<std::sync::Mutex<String>>,
    reads: Arc<AtomicUsize>,
    url: String,
    _task: tokio::task::JoinHandle<()>,
}

impl JwksServer {
    async fn start(doc: String) -> JwksServer {
        let doc = Arc::new(std::sync::Mutex::new(doc));
        let reads = Arc::new(AtomicUsize::new(0));
        let (d, r) = (doc.clone(), reads.clone());
        let app = axum::Router::new().route(
            "/jwks.json",
            axum::routing::get(move || {
                let (d, r) = (d.clone(), r.clone());
                async move {
                    r.fetch_add(1, Ordering::SeqCst);
                    let body = d.lock().unwrap().clone();
                    ([("content-type", "application/json")], body)
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        JwksServer {
            doc,
            reads,
            url,
            _task: task,
        }
    }

    fn set(&self, doc: String) {
        *self.doc.lock().unwrap() = doc;
    }

    fn reads(&self) -> usize {
        self.reads.load(Ordering::SeqCst)
    }
}

/// The next frame that is not a ping (answered).
async fn frame(c: &mut WsClient) -> Value {
    c.next_frame(Duration::from_secs(10)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_rotate_without_a_restart_and_unknown_kids_cost_one_read_per_period() {
    let dir = tempfile::tempdir().unwrap();
    let old = signer(dir.path(), Algorithm::EdDSA, "2026-a");
    let new = signer(dir.path(), Algorithm::ES256, "2026-b");
    let served = JwksServer::start(jwks(&[&old])).await;
    let url = served.url.clone();
    let s = TestServer::with(|c| {
        c.jwks_url = Some(url);
        c.jwks_refresh_min_sec = 2;
    })
    .await;
    assert_eq!(served.reads(), 1, "read once at start");
    let t_old = old.token("u1", json!({}));
    let mut ws = WsClient::connect(&format!("{}/v1/ws?token={t_old}", s.ws_url()))
        .await
        .unwrap();
    ws.expect("welcome").await;
    // The new key is published; a token with it is accepted once the period since the last
    // read has passed (the first read on its unknown kid).
    served.set(jwks(&[&old, &new]));
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let t_new = new.token("u1", json!({}));
    assert_eq!(open(&s, &t_new).await.0, 201);
    assert_eq!(served.reads(), 2);
    // A flood of 30 made-up kids costs at most one read per period it spans (none when it
    // fits in one; a loaded machine may stretch it over more).
    let flood = std::time::Instant::now();
    for i in 0..30 {
        let t = sign(
            &new.key,
            Algorithm::ES256,
            Some(&format!("made-up-{i}")),
            "u1",
            json!({}),
        );
        assert_eq!(open(&s, &t).await.0, 401);
    }
    let periods = (flood.elapsed().as_millis() / 2000) as usize;
    assert!(
        served.reads() - 2 <= periods,
        "{} reads for 30 unknown kids over {periods} whole periods",
        served.reads() - 2
    );
    // The old key is withdrawn: the socket opened with it stays, and refreshes with the new.
    served.set(jwks(&[&new]));
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let before = served.reads();
    let t = sign(
        &new.key,
        Algorithm::ES256,
        Some("made-up-again"),
        "u1",
        json!({}),
    );
    assert_eq!(open(&s, &t).await.0, 401);
    assert_eq!(
        served.reads(),
        before + 1,
        "one read for the unknown kid after the period"
    );
    assert_eq!(
        open(&s, &old.token("u1", json!({}))).await,
        (401, "UNAUTHORIZED".into()),
        "withdrawn"
    );
    ws.send(json!({"type":"refresh","token": new.token("u1", json!({}))}))
        .await;
    let f = frame(&mut ws).await;
    assert_eq!(f["type"], "token", "{f}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issuer_and_audience_are_checked_when_configured() {
    let s = TestServer::with(|c| {
        c.jwt_issuer = Some("https://auth.example".into());
        c.jwt_audience = Some("zerodrop".into());
    })
    .await;
    let key = EncodingKey::from_secret(s.creds.jwt_secret.as_bytes());
    let tok = |extra: Value| sign(&key, Algorithm::HS256, None, "u1", extra);
    assert_eq!(
        open(
            &s,
            &tok(json!({"iss":"https://auth.example","aud":"zerodrop"}))
        )
        .await
        .0,
        201
    );
    for (extra, why) in [
        (json!({}), "no iss, no aud"),
        (json!({"iss":"https://auth.example"}), "no aud"),
        (
            json!({"iss":"https://evil.example","aud":"zerodrop"}),
            "wrong iss",
        ),
        (
            json!({"iss":"https://auth.example","aud":"other"}),
            "wrong aud",
        ),
    ] {
        assert_eq!(
            open(&s, &tok(extra)).await,
            (401, "UNAUTHORIZED".into()),
            "{why}"
        );
    }
}
