//! A black-box pass with hostile input: forged and tampered credentials, payloads nested too
//! deep to parse, oversized request heads, odd stream ids on every transport. Each gets its
//! typed error; nothing stored changes; the server stays up and keeps serving.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use reqwest::Method;
use serde_json::{Value, json};
use zerodrop_testkit::server::TestServer;
use zerodrop_testkit::ws::{Next, WsClient};

fn b64(v: &Value) -> String {
    B64.encode(v.to_string())
}

fn nested(depth: usize) -> String {
    format!("{}{}", "[".repeat(depth), "]".repeat(depth))
}

/// Connect tokens that must not open anything: 401 `UNAUTHORIZED` on every route that takes
/// one, and a refused upgrade.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_connect_tokens_are_unauthorized_everywhere() {
    let s = TestServer::start().await;
    let api = s.api();
    let now = zerodrop_core::now_ms() / 1000;
    let claims = json!({"sub": "mallory", "exp": now + 3600, "streams": ["*"]});
    let good = s.token("mallory", &["room:1"]);
    let parts: Vec<&str> = good.split('.').collect();
    let hs = |alg: jsonwebtoken::Algorithm, secret: &str, claims: &Value| {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(alg),
            claims,
            &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    };
    let secret = s.creds.jwt_secret.clone();
    let forged = vec![
        ("garbage", "not-a-jwt".to_string()),
        (
            "alg none",
            format!(
                "{}.{}.",
                b64(&json!({"alg":"none","typ":"JWT"})),
                b64(&claims)
            ),
        ),
        (
            "HS512 with the real secret",
            hs(jsonwebtoken::Algorithm::HS512, &secret, &claims),
        ),
        (
            "HS256 with another secret",
            hs(jsonwebtoken::Algorithm::HS256, &"z".repeat(32), &claims),
        ),
        (
            "expired",
            hs(
                jsonwebtoken::Algorithm::HS256,
                &secret,
                &json!({"sub": "mallory", "exp": now - 120, "streams": ["*"]}),
            ),
        ),
        (
            "no exp",
            hs(
                jsonwebtoken::Algorithm::HS256,
                &secret,
                &json!({"sub": "mallory", "streams": ["*"]}),
            ),
        ),
        (
            "widened streams under the original signature",
            format!("{}.{}.{}", parts[0], b64(&claims), parts[2]),
        ),
        ("empty signature", format!("{}.{}.", parts[0], parts[1])),
    ];
    for (what, tok) in &forged {
        let answers = [
            api.post("/v1/sessions", Some(tok), json!({"streams":["room:1"]}))
                .await,
            api.get("/v1/streams/room:1/events?after=0", Some(tok))
                .await,
            api.get(&format!("/v1/streams/room:1/sse?token={tok}"), None)
                .await,
        ];
        for r in answers {
            assert_eq!(
                (r.status, r.code()),
                (401, "UNAUTHORIZED"),
                "{what}: {}",
                r.text
            );
        }
        let refused = WsClient::connect(&format!("{}/v1/ws?token={tok}", s.ws_url()))
            .await
            .err()
            .unwrap_or_else(|| panic!("{what}: the upgrade is refused"));
        assert_eq!(
            (refused.status, refused.json()["error"]["code"].as_str()),
            (401, Some("UNAUTHORIZED")),
            "{what}"
        );
    }
    // The real token still works: nothing was locked out or changed.
    let r = api
        .post("/v1/sessions", Some(&good), json!({"streams":["room:1"]}))
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(
        api.metrics_json().await["resume_store_metrics"]["sessions"],
        1
    );
}

/// Resume tokens that are malformed, tampered with or signed by an unknown key:
/// `INVALID_RESUME_TOKEN` over HTTP (401) and WebSocket (close 4401), never a session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_resume_tokens_are_invalid_on_every_transport() {
    let s = TestServer::start().await;
    let api = s.api();
    api.publish("room:1", json!("kept")).await;
    let tok = s.token("u1", &["room:*"]);
    let open = api
        .post("/v1/sessions", Some(&tok), json!({"streams":["room:1"]}))
        .await
        .json;
    let sid = open["sessionId"].as_str().unwrap().to_string();
    let real = open["resumeToken"].as_str().unwrap().to_string();
    let p: Vec<&str> = real.split('.').collect();
    assert_eq!(p.len(), 4, "{real}");
    let payload: Value = serde_json::from_slice(&B64.decode(p[2]).unwrap()).unwrap();
    let mut other_sid = payload.clone();
    other_sid["sid"] = json!("0000000000000000000000000000000000000000");
    let mut longer = payload.clone();
    longer["exp"] = json!(payload["exp"].as_u64().unwrap() + 86_400);
    let mut flipped = p[3].to_string();
    let last = flipped.pop().unwrap();
    flipped.push(if last == 'A' { 'B' } else { 'A' });
    let forged = vec![
        ("empty", String::new()),
        ("garbage", "v1.k1.garbage.garbage".to_string()),
        ("three parts", format!("{}.{}.{}", p[0], p[1], p[2])),
        ("five parts", format!("{real}.x")),
        ("another version", format!("v2.{}.{}.{}", p[1], p[2], p[3])),
        ("unknown key id", format!("v1.k9.{}.{}", p[2], p[3])),
        (
            "flipped signature",
            format!("v1.{}.{}.{flipped}", p[1], p[2]),
        ),
        (
            "another session under the original signature",
            format!("v1.{}.{}.{}", p[1], b64(&other_sid), p[3]),
        ),
        (
            "a later expiry under the original signature",
            format!("v1.{}.{}.{}", p[1], b64(&longer), p[3]),
        ),
        (
            "a payload that is not JSON",
            format!("v1.{}.{}.{}", p[1], B64.encode("{{{"), p[3]),
        ),
        ("very long", format!("v1.k1.{}.{}", "A".repeat(8000), p[3])),
    ];
    for (what, bad) in &forged {
        let r = api
            .post(
                &format!("/v1/sessions/{sid}/reconnect"),
                None,
                json!({"resumeToken": bad}),
            )
            .await;
        assert_eq!(
            (r.status, r.code()),
            (401, "INVALID_RESUME_TOKEN"),
            "{what}: {}",
            r.text
        );
        let r = api
            .post(
                &format!("/v1/sessions/{sid}/checkpoint"),
                Some(bad),
                json!({"stream":"room:1","seq":1}),
            )
            .await;
        assert!(
            matches!(
                (r.status, r.code()),
                (401, "INVALID_RESUME_TOKEN") | (401, "UNAUTHORIZED")
            ),
            "{what}: {}",
            r.text
        );
        if bad.is_empty() {
            continue;
        }
        let mut ws = WsClient::connect(&format!("{}/v1/ws", s.ws_url()))
            .await
            .unwrap();
        ws.send(json!({"type":"resume","resumeToken":bad})).await;
        let f = ws.recv().await;
        assert_eq!(
            (f["type"].as_str(), f["code"].as_str()),
            (Some("error"), Some("INVALID_RESUME_TOKEN")),
            "{what}: {f}"
        );
        assert_eq!(ws.expect_close().await, Some(4401), "{what}");
    }
    // The real token still resumes, with the stored ack untouched.
    let r = api
        .post(
            &format!("/v1/sessions/{sid}/reconnect"),
            None,
            json!({"resumeToken": real}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["replay"]["room:1"]["fromSeq"], 2);
}

/// Payloads nested deeper than clients can parse, oversized request heads and odd stream ids
/// on every transport: each a typed error, with the log, the socket and the server intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_payloads_heads_and_stream_ids_leave_everything_intact() {
    let s = TestServer::start().await;
    let api = s.api();
    let key = s.creds.api_key.clone();
    for i in 0..3 {
        api.publish("keep", json!(i)).await;
    }
    let before = api.info("keep").await;
    let publish_raw = |body: String| {
        let api = api.clone();
        let key = key.clone();
        async move {
            api.request(
                Method::POST,
                "/v1/streams/keep/events",
                Some(&key),
                Some(body),
                &[],
            )
            .await
        }
    };
    // Nesting: 64 levels are data; 65 or 20,000 (which fits in the payload limit) are not.
    for depth in [65, 20_000] {
        let r = publish_raw(format!("{{\"data\":{}}}", nested(depth))).await;
        assert_eq!((r.status, r.code()), (400, "INVALID_REQUEST"), "{}", r.text);
        assert!(r.text.contains("limit is 64"), "{}", r.text);
    }
    assert_eq!(api.info("keep").await, before, "nothing was stored");
    let r = api
        .request(
            Method::POST,
            "/v1/streams/deep/events",
            Some(&key),
            Some(format!("{{\"data\":{}}}", nested(64))),
            &[],
        )
        .await;
    assert_eq!(r.status, 201, "64 levels are data: {}", r.text);
    // Heads past the limits: typed, with their own statuses.
    let big = "h".repeat(40 * 1024);
    let r = api
        .request(
            Method::GET,
            "/health",
            None,
            None,
            &[("x-big", big.as_str())],
        )
        .await;
    assert_eq!((r.status, r.code()), (431, "INVALID_REQUEST"), "{}", r.text);
    let r = api
        .get(
            &format!(
                "/v1/streams/keep/events?after=0&pad={}",
                "p".repeat(20 * 1024)
            ),
            Some(&key),
        )
        .await;
    assert_eq!((r.status, r.code()), (414, "INVALID_REQUEST"), "{}", r.text);
    let r = api
        .request(
            Method::POST,
            "/v1/streams/keep/events",
            Some(&format!("{key}{}", "k".repeat(40 * 1024))),
            Some(r#"{"data":1}"#.into()),
            &[],
        )
        .await;
    assert_eq!((r.status, r.code()), (431, "INVALID_REQUEST"), "{}", r.text);

    // The same over WebSocket: a deep `publish` and odd subscribe ids are frame errors, and
    // the socket goes on.
    let tok = s.creds.token("u1", &["*"], &["*"]);
    let mut ws = WsClient::connect(&format!("{}/v1/ws?token={tok}", s.ws_url()))
        .await
        .unwrap();
    ws.expect("welcome").await;
    ws.send_raw(format!(
        r#"{{"type":"publish","stream":"keep","data":{},"id":1}}"#,
        nested(65)
    ))
    .await;
    let f = ws.expect("error").await;
    assert_eq!(f["code"], "INVALID_REQUEST", "{f}");
    ws.send_raw(format!(r#"{{"type":"ping","t":{}}}"#, nested(20_000)))
        .await;
    assert_eq!(ws.expect("error").await["code"], "INVALID_REQUEST");
    let long = "x".repeat(129);
    for id in ["", "a b", "a/b", "café", "a*", long.as_str(), "\u{0}"] {
        ws.send(json!({"type":"subscribe","stream":id,"after":0}))
            .await;
        let f = ws.expect("error").await;
        assert_eq!(f["code"], "INVALID_STREAM_ID", "{id:?}: {f}");
    }
    ws.send(json!({"type":"subscribe","stream":"keep","after":0}))
        .await;
    assert_eq!(ws.expect("subscribed").await["fromSeq"], 1);
    assert_eq!(ws.events(3).await.len(), 3, "the socket still serves");
    // The deepest event allowed is readable by a client that parses whole frames.
    ws.send(json!({"type":"subscribe","stream":"deep","after":0}))
        .await;
    ws.expect("subscribed").await;
    assert_eq!(ws.events(1).await[0]["data"].to_string(), nested(64));
    match ws.next_within(std::time::Duration::from_millis(200)).await {
        Next::Timeout => {}
        other => panic!("nothing else arrives: {other:?}"),
    }
    // SSE and reads refuse odd ids before anything starts.
    for id in ["a%20b", "a%2Fb", "caf%C3%A9", "%00"] {
        let r = api
            .get(&format!("/v1/streams/{id}/sse?token={tok}"), None)
            .await;
        assert_eq!((r.status, r.code()), (400, "INVALID_STREAM_ID"), "{id}");
        let r = api
            .get(&format!("/v1/streams/{id}/events"), Some(&key))
            .await;
        assert_eq!((r.status, r.code()), (400, "INVALID_STREAM_ID"), "{id}");
    }
    assert_eq!(api.info("keep").await, before, "stored data is untouched");
    assert_eq!(api.get("/health/ready", None).await.status, 200);
    assert_eq!(
        api.metrics_json().await["ws_metrics"]["dropped_messages"],
        0
    );
}

/// The upstream proxy and the api key's place: a client path that climbs out of the
/// upstream's base (`..`, encoded or raw, encoded slashes, backslashes), sent byte for byte,
/// is 400 and never reaches the upstream; the api key in `?token=` is 401 on every route that
/// reads one (it belongs in the `Authorization` header), while connect tokens keep `?token=`.
/// Stored streams are untouched throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_escapes_and_the_api_key_in_the_url_are_refused() {
    let up = zerodrop_testkit::upstream::FakeUpstream::start().await;
    let base = format!("{}/api", up.url);
    let s = TestServer::with(|c| {
        c.guard.upstreams.insert(
            "app".into(),
            zerodrop_server::config::UpstreamConfig {
                primary: base,
                cache_ttl_sec: 0,
                ..Default::default()
            },
        );
    })
    .await;
    let api = s.api();
    let key = s.creds.api_key.clone();
    for i in 0..3 {
        api.publish("keep", json!(i)).await;
    }
    let before = api.info("keep").await;
    let granted = s.creds.upstream_token("mallory", &["app"]);
    let plain = s.token("mallory", &[]);
    let send = |target: String, cred: &str| {
        let auth = format!("Bearer {cred}");
        let addr = s.addr;
        async move {
            zerodrop_testkit::raw::get(addr, &target, &[("authorization", auth.as_str())]).await
        }
    };
    for esc in [
        "..%2Fsecret",
        "../secret",
        "%2E%2E/secret",
        "ok/..%2F..%2Finternal%2Fadmin",
        "..",
        "%2e%2e",
        ".%2e/secret",
        "..\\secret",
        "..%5csecret",
        "%252e%252e/secret",
        "ok/%2F%2Fevil.example/x",
    ] {
        for cred in [granted.as_str(), key.as_str()] {
            let r = send(format!("/v1/upstreams/app/{esc}"), cred).await;
            assert_eq!(
                (r.status, r.code()),
                (400, "INVALID_REQUEST"),
                "{esc}: {}",
                r.text
            );
        }
        let r = send(format!("/v1/upstreams/app/{esc}"), &plain).await;
        assert_eq!(
            (r.status, r.code()),
            (403, "FORBIDDEN"),
            "{esc}: {}",
            r.text
        );
    }
    assert_eq!(
        up.count(),
        0,
        "nothing reached the upstream: {:?}",
        up.received()
    );
    let r = send("/v1/upstreams/app/fine".into(), &granted).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(up.received()[0].target, "/api/fine");

    // The api key in the URL: refused even where it would be right in the header.
    let says_header = |r: &zerodrop_testkit::http::Resp| {
        r.json["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("Authorization header"))
    };
    for (path, bearer) in [
        (format!("/v1/streams/keep/events?after=0&token={key}"), None),
        (
            format!("/v1/streams/keep/events?token={key}"),
            Some(key.as_str()),
        ),
        (format!("/v1/streams/keep/sse?token={key}"), None),
    ] {
        let r = api.get(&path, bearer).await;
        assert_eq!(
            (r.status, r.code()),
            (401, "UNAUTHORIZED"),
            "{path}: {}",
            r.text
        );
        assert!(says_header(&r), "{path}: {}", r.text);
    }
    let refused = WsClient::connect(&format!("{}/v1/ws?token={key}", s.ws_url()))
        .await
        .err()
        .expect("the upgrade is refused");
    assert_eq!(refused.status, 401);
    assert_eq!(refused.json()["error"]["code"], "UNAUTHORIZED");
    assert!(
        refused.json()["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("Authorization header")),
        "{}",
        refused.json()
    );
    // The right places still work: the key in the header, a connect token in the URL.
    let r = api.get("/v1/streams/keep/events?after=0", Some(&key)).await;
    assert_eq!(
        r.json["events"].as_array().map(Vec::len),
        Some(3),
        "{}",
        r.text
    );
    let tok = s.token("reader", &["keep"]);
    let r = api
        .get(
            &format!("/v1/streams/keep/events?after=0&token={tok}"),
            None,
        )
        .await;
    assert_eq!(
        r.json["events"].as_array().map(Vec::len),
        Some(3),
        "{}",
        r.text
    );
    assert_eq!(api.info("keep").await, before, "stored data is untouched");
    assert_eq!(api.get("/health/ready", None).await.status, 200);
}

/// Duplicate keys inside `data` (any depth, any spelling) are refused with 400
/// `INVALID_REQUEST` on HTTP publish, WebSocket `publish` and webhook intake, and a flood of
/// sessions for one subject stops at `--max-sessions-per-subject` with 429 `RATE_LIMITED`
/// (close 4429 on a socket). Nothing stored changes; the server keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_data_keys_and_session_floods_change_nothing() {
    use zerodrop_server::config::WebhookConfig;
    let s = TestServer::with(|c| {
        c.max_sessions_per_subject = 5;
        c.guard.webhooks.insert(
            "shop".into(),
            WebhookConfig {
                stream: Some("keep-hooks".into()),
                ..WebhookConfig::default()
            },
        );
    })
    .await;
    let api = s.api();
    let key = s.creds.api_key.clone();
    for i in 0..3 {
        api.publish("keep", json!({"i": i})).await;
    }
    let hook = |id: &'static str, body: &'static str| {
        let (api, key) = (api.clone(), key.clone());
        async move {
            api.request(
                Method::POST,
                "/v1/webhooks/shop",
                Some(&key),
                Some(body.into()),
                &[("idempotency-key", id)],
            )
            .await
        }
    };
    assert_eq!(hook("m-0", r#"{"order":0}"#).await.status, 202);
    let before = (api.info("keep").await, api.info("keep-hooks").await);
    let dup_bodies = [
        r#"{"data":{"k":1,"k":2}}"#,
        r#"{"data":[1,{"a":{"b":[{"c":1,"c":1}]}}]}"#,
        r#"{"data":{"k":1,"\u006b":2}}"#,
        r#"{"data":{"é":1,"\u00e9":2}}"#,
        r#"{"data":{"k":{},"x":0,"k":{}}}"#,
        r#"{"data":1,"data":2}"#,
    ];
    for body in dup_bodies {
        let r = api
            .request(
                Method::POST,
                "/v1/streams/keep/events",
                Some(&key),
                Some(body.into()),
                &[("idempotency-key", "dup-1")],
            )
            .await;
        assert_eq!(
            (r.status, r.code()),
            (400, "INVALID_REQUEST"),
            "{body}: {}",
            r.text
        );
        assert!(
            r.text.contains("twice") || r.text.contains("duplicate"),
            "{}",
            r.text
        );
    }
    // The same key in different objects is fine, and stored byte for byte.
    let fine = r#"{"k":{"k":1},"l":[{"k":2},{"k":2}],"s":"{\"k\":1,\"k\":2}"}"#;
    let r = api
        .request(
            Method::POST,
            "/v1/streams/fine/events",
            Some(&key),
            Some(format!(r#"{{"data":{fine}}}"#)),
            &[],
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let stored = api.read("fine", 0, 10).await;
    let text = stored.text.clone();
    assert!(text.contains(&format!(r#""data":{fine}"#)), "{text}");
    // A webhook body that would be stored: refused before its message id is claimed, so the
    // corrected retry with the same id goes through.
    let r = hook("m-1", r#"{"order":1,"order":2}"#).await;
    assert_eq!((r.status, r.code()), (400, "INVALID_REQUEST"), "{}", r.text);
    assert_eq!(api.info("keep-hooks").await, before.1, "nothing stored");
    // Over WebSocket: a frame error, the socket goes on.
    let tok = s.creds.token("writer", &["*"], &["*"]);
    let mut ws = WsClient::connect(&format!("{}/v1/ws?token={tok}", s.ws_url()))
        .await
        .unwrap();
    ws.expect("welcome").await;
    for (i, data) in [r#"{"k":1,"k":2}"#, r#"[[{"a":[],"\u0061":0}]]"#]
        .iter()
        .enumerate()
    {
        ws.send_raw(format!(
            r#"{{"type":"publish","stream":"keep","data":{data},"id":{i}}}"#
        ))
        .await;
        let f = ws.expect("error").await;
        assert_eq!(
            (&f["code"], &f["id"]),
            (&json!("INVALID_REQUEST"), &json!(i)),
            "{f}"
        );
    }
    ws.send(json!({"type":"subscribe","stream":"keep","after":0}))
        .await;
    ws.expect("subscribed").await;
    assert_eq!(ws.events(3).await.len(), 3, "the socket still serves");

    // A flood of sessions for one subject: HTTP opens at once, then WebSocket connects.
    // `writer` holds one already (the socket above).
    let flood = s.token("writer", &["keep"]);
    let opens = (0..40).map(|_| {
        let (api, flood) = (api.clone(), flood.clone());
        tokio::spawn(async move {
            api.post("/v1/sessions", Some(&flood), json!({"streams": ["keep"]}))
                .await
        })
    });
    let mut admitted = 0;
    for o in opens {
        let r = o.await.unwrap();
        match r.status {
            201 => admitted += 1,
            _ => {
                assert_eq!((r.status, r.code()), (429, "RATE_LIMITED"), "{}", r.text);
                assert!(r.headers.contains_key("retry-after"));
            }
        }
    }
    assert_eq!(admitted, 4, "the cap of 5, the socket's session included");
    for _ in 0..10 {
        let mut c = WsClient::connect(&format!("{}/v1/ws?token={flood}", s.ws_url()))
            .await
            .unwrap();
        // The session is written with its first stream: refused there.
        c.expect("welcome").await;
        c.send(json!({"type":"subscribe","stream":"keep"})).await;
        let f = c.recv().await;
        assert_eq!(
            (&f["type"], &f["code"]),
            (&json!("error"), &json!("RATE_LIMITED")),
            "{f}"
        );
        assert_eq!(c.expect_close().await, Some(4429));
    }
    let other = s.token("someone-else", &["keep"]);
    let r = api
        .post("/v1/sessions", Some(&other), json!({"streams": ["keep"]}))
        .await;
    assert_eq!(r.status, 201, "other subjects open as usual: {}", r.text);

    assert_eq!(hook("m-1", r#"{"order":1}"#).await.status, 202);
    assert_eq!(api.info("keep").await, before.0, "stored data is untouched");
    let hooks = api.info("keep-hooks").await;
    assert_eq!(hooks["headSeq"], 2, "only the corrected webhook was stored");
    assert_eq!(api.get("/health/ready", None).await.status, 200);
    assert_eq!(
        api.metrics_json().await["ws_metrics"]["dropped_messages"],
        0
    );
}

/// Found by the `publish_body` fuzz target: `{"data": 1e3092}` is valid JSON and was stored,
/// but no client could read it back (serde_json: "number out of range"; `JSON.parse`:
/// `Infinity`). Refused on both transports now, and nothing is stored; a large finite double
/// is still stored byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numbers_beyond_a_double_are_refused_on_every_transport() {
    let s = TestServer::start().await;
    let api = s.api();
    let key = s.creds.api_key.clone();
    for body in [r#"{"data": 1e3092}"#, r#"{"data":[1,{"n":-1e400}]}"#] {
        let r = api
            .request(
                Method::POST,
                "/v1/streams/nums/events",
                Some(&key),
                Some(body.into()),
                &[],
            )
            .await;
        assert_eq!(
            (r.status, r.code()),
            (400, "INVALID_REQUEST"),
            "{body}: {}",
            r.text
        );
        assert!(r.text.contains("range of a double"), "{}", r.text);
    }
    let tok = s.creds.token("writer", &["*"], &["*"]);
    let mut ws = WsClient::connect(&format!("{}/v1/ws?token={tok}", s.ws_url()))
        .await
        .unwrap();
    ws.expect("welcome").await;
    ws.send_raw(r#"{"type":"publish","stream":"nums","data":{"x":1E+309},"id":1}"#.into())
        .await;
    let f = ws.expect("error").await;
    assert_eq!(
        (&f["code"], &f["id"]),
        (&json!("INVALID_REQUEST"), &json!(1)),
        "{f}"
    );
    let fine = r#"{"max":1.7976931348623157e308,"tiny":1e-400,"s":"1e999"}"#;
    let r = api
        .request(
            Method::POST,
            "/v1/streams/nums/events",
            Some(&key),
            Some(format!(r#"{{"data":{fine}}}"#)),
            &[],
        )
        .await;
    assert_eq!((r.status, r.code()), (201, ""), "{}", r.text);
    let stored = api.read("nums", 0, 10).await;
    assert!(
        stored.text.contains(&format!(r#""data":{fine}"#)),
        "{}",
        stored.text
    );
    assert_eq!(
        stored.text.matches(r#""seq":"#).count(),
        1,
        "{}",
        stored.text
    );
}
