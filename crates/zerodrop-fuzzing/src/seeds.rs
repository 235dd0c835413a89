//! The seed corpus: made from the project's own fixtures (the compatibility fixtures'
//! recorded frames and publishes, the example config, the documentation's examples) and a few
//! inputs at the parsers' edges, written to `fuzz/seeds/<target>/` by
//! `cargo test -p zerodrop-fuzzing -- --ignored write_seeds` and committed. The smoke test
//! and `fuzz/run-all.sh` read them from there.

use std::path::PathBuf;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use serde_json::{Value, json};
use zerodrop_core::{ResumeClaims, SessionId};
use zerodrop_server::auth::{ConnectClaims, mint_connect_token};

use crate::targets::{JWT_SECRET, NOW_SEC, RESUME_KEYS};

const FIXTURES: &[&str] = &[
    include_str!("../../zerodrop-server/tests/fixtures/v1/frames.jsonl"),
    include_str!("../../zerodrop-server/tests/fixtures/v1/resume_frame.jsonl"),
    include_str!("../../zerodrop-server/tests/fixtures/v1/resume_query.jsonl"),
    include_str!("../../zerodrop-server/tests/fixtures/v2/frames.jsonl"),
    include_str!("../../zerodrop-server/tests/fixtures/v2/refresh.jsonl"),
    include_str!("../../zerodrop-server/tests/fixtures/v2/resume_frame.jsonl"),
    include_str!("../../zerodrop-server/tests/fixtures/v2/resume_query.jsonl"),
    include_str!("../../zerodrop-server/tests/fixtures/v2/timers.jsonl"),
    include_str!("../../zerodrop-server/tests/fixtures/v3/binary.jsonl"),
];

const EXAMPLE_CONFIG: &str = include_str!("../../../deploy/zerodrop.toml");

/// `docs/guardrails.md`, `docs/operations.md` and `docs/configuration.md`'s config examples.
const DOC_CONFIGS: &[&str] = &[
    "[upstreams.app]\nprimary = \"http://10.0.0.5:9000\"\nsecondary = \"http://10.0.1.5:9000\"\n\
     streams = [\"orders:*\"]\n\n[upstreams.app.circuit]\nmin_calls = 20\n\n[webhooks.github]\n\
     id_header = \"x-github-delivery\"\nupstream = \"app\"\nstream = \"hooks:github\"\n",
    "[webhooks.drill]\nstream = \"drill:webhooks\"\n",
    "store = \"redis\"\nredis_url = \"redis+sentinel://10.0.0.1:26379,10.0.0.2:26379/mymaster\"\n",
    "listen = \"0.0.0.0:7700\"\nmax_frame_bytes = 1023\n",
    "instance_id = \"a.b-c_1\"\njobs_running_kinds = \"webhook:github=4,publish=64\"\n",
    "[streams.\"orders:*\"]\nretention_max_events = 500\nretention_max_age_sec = 3600\n\
     max_payload_bytes = 4096\npublish = \"api-key\"\n\n[streams.\"orders:vip\"]\n\
     retention_max_events = 100000\n\n[streams.\"room:*\"]\npresence = true\n",
];

/// A JWKS document (the unit test's keys: Ed25519 and RSA, pinned and skipped kinds).
const JWKS: &str = r#"{"keys":[
{"kty":"OKP","crv":"Ed25519","kid":"ed","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},
{"kty":"OKP","crv":"Ed25519","kid":"ed-as-es","alg":"ES256","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},
{"kty":"oct","kid":"hs","k":"c2VjcmV0","alg":"HS256"},
{"kty":"OKP","crv":"Ed25519","kid":"enc","use":"enc","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},
{"kty":"RSA","kid":"rsa","n":"sXchDaQebHnPiGvyDOAT4saGEUetSyo9MKLOoWFsueri23bOdgWp4Dy1WlUzewbgBHod5pcM9H95GQRV3JDXboIRROSBigeC5yjU1hGzHHyXss8UDprecbAYxknTcQkhslANGRUZmdTOQ5qTRsLAt6BTYuyvVRdhS8exSZEy_c4gs_7svlJJQ4H9_NxsiIoLwAEk7-Q3UXERGYw_75IDrGA84-lA_-Ct4eTlXHBIY2EaV7t7LjJaynVJCpkv4LKjTTAumiGUIuQhrNhZLuF_RJLqHpM2kgWFLU7-VTdL1VbC2tejvcI2BlMkEpk1BzBZI0KQB0GaDWFLN-aEAw3vRw","e":"AQAB"},
{"kty":"EC","crv":"P-256","kid":"ec","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}
]}"#;

/// Where the committed seeds live: `fuzz/seeds/` at the workspace root.
pub fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds")
}

/// The committed seeds of `target`, in file-name order.
pub fn read(target: &str) -> std::io::Result<Vec<Vec<u8>>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir().join(target))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files.into_iter().map(std::fs::read).collect()
}

/// Every fixture line's `key` value.
fn fixture_values(key: &str) -> Vec<Value> {
    let mut out: Vec<Value> = FIXTURES
        .iter()
        .flat_map(|f| f.lines())
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| v.get(key).cloned())
        .filter(|v| v.is_object())
        .collect();
    out.dedup();
    out
}

fn nested(n: usize) -> String {
    format!("{}1{}", "[".repeat(n), "]".repeat(n))
}

fn with_mode(mode: u8, rest: &[u8]) -> Vec<u8> {
    let mut v = vec![mode];
    v.extend_from_slice(rest);
    v
}

/// The seeds of every target: `(target, seeds)`.
pub fn generate() -> Vec<(&'static str, Vec<Vec<u8>>)> {
    let keys = zerodrop_core::ResumeKeys::parse(RESUME_KEYS).expect("valid ring");
    let claims = ResumeClaims {
        sid: SessionId::parse("s_AAAAAAAAAAAAAAAAAAAAAA").expect("a session id"),
        sub: "u1".into(),
        iat: NOW_SEC - 10,
        exp: NOW_SEC + 900,
        jti: Some("0011223344556677".into()),
        aexp: Some(NOW_SEC + 60),
    };
    let claims_json = serde_json::to_vec(&claims).expect("claims serialise");
    let resume = keys.sign(&claims);

    let mut frames: Vec<Vec<u8>> = fixture_values("send")
        .iter()
        .map(|v| v.to_string().into_bytes())
        .collect();
    frames.push(
        json!({"type":"resume","resumeToken":resume,"lastAck":{"room:1":4},"token":"x.y.z"})
            .to_string()
            .into_bytes(),
    );
    frames.push(format!(r#"{{"type":"publish","stream":"a","data":{}}}"#, nested(64)).into_bytes());
    frames.push(format!(r#"{{"type":"ping","t":{}}}"#, nested(65)).into_bytes());
    frames.push(br#"{"type":"ack","acks":{"a":1.5e300,"b":"x","c":-1}}"#.to_vec());

    let connect = |streams: Vec<String>, publish: Option<Vec<String>>| ConnectClaims {
        sub: "u1".into(),
        exp: 4_000_000_000,
        iat: Some(NOW_SEC),
        streams,
        publish,
        upstreams: vec!["app".into(), "pay*".into()],
        info: None,
    };
    let strings = |v: Option<&Value>| -> Vec<String> {
        v.and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut tokens: Vec<Vec<u8>> = fixture_values("connect")
        .iter()
        .map(|c| {
            let claims = connect(
                strings(c.get("streams")),
                c.get("publish").map(|p| strings(Some(p))),
            );
            with_mode(0, mint_connect_token(JWT_SECRET, &claims).as_bytes())
        })
        .collect();
    let claims_c = serde_json::to_vec(&connect(vec!["room:*".into()], None)).expect("json");
    tokens.push(with_mode(1, &claims_c));
    tokens.push(with_mode(
        1,
        br#"{"sub":"u1","exp":4000000000,"iss":"x","aud":["a"]}"#,
    ));
    for header in [
        r#"{"alg":"RS256","kid":"rsa"}"#,
        r#"{"alg":"none"}"#,
        r#"{"alg":"HS256","kid":"k","typ":"JWT"}"#,
    ] {
        let mut v = header.as_bytes().to_vec();
        v.push(b'\n');
        v.extend_from_slice(&claims_c);
        tokens.push(with_mode(2, &v));
    }
    tokens.push(with_mode(
        0,
        format!("e30.{}.x", B64.encode(&claims_c)).as_bytes(),
    ));

    let publishes: Vec<Vec<u8>> = fixture_values("publish")
        .iter()
        .map(|p| json!({"data": p.get("data")}).to_string().into_bytes())
        .chain([
            format!(r#"{{"data": {}}}"#, nested(64)).into_bytes(),
            format!(r#"{{"data":{}}}"#, nested(65)).into_bytes(),
            br#"{"data": {"k": 1, "k": 2}}"#.to_vec(),
            br#"{"data": {"s": "]]\"[[", "e": "\u00e9", "n": [1.5e10, -0, null]}}"#.to_vec(),
        ])
        .collect();

    // `zerodrop.v3` binary frames: the recorded ones (header, LF, bytes; or raw), and edges.
    let binaries: Vec<Vec<u8>> = fixture_values("sendBinary")
        .iter()
        .map(|b| {
            let bytes = |b64: &Value| {
                zerodrop_core::payload::decode(b64.as_str().unwrap_or_default())
                    .expect("recorded base64")
            };
            match b.get("raw") {
                Some(raw) => bytes(raw),
                None => zerodrop_core::frames::binary::frame(
                    &b["header"].to_string(),
                    &bytes(&b["base64"]),
                ),
            }
        })
        .chain([
            b"{\"type\":\"publish\",\"stream\":\"a\"}\n".to_vec(),
            b"{\"type\":\"publish\",\"stream\":\"a\",\"id\":{\"n\":[1]}}\n\n\n\xff".to_vec(),
            format!(
                "{{\"type\":\"publish\",\"stream\":\"a\",\"id\":{}}}\n",
                nested(65)
            )
            .into_bytes(),
        ])
        .collect();

    vec![
        ("client_frame", frames),
        ("client_binary_frame", binaries),
        (
            "resume_token",
            vec![
                with_mode(0, resume.as_bytes()),
                with_mode(0, b"v1.k9.e30.AAAA"),
                with_mode(1, &claims_json),
                with_mode(1, br#"{"sid":"s_x","sub":"","iat":0,"exp":1800000001}"#),
            ],
        ),
        ("connect_token", tokens),
        (
            "jwks",
            vec![JWKS.as_bytes().to_vec(), br#"{"keys":[]}"#.to_vec()],
        ),
        (
            "last_event_id",
            [
                "5",
                "0123456789abcdef:42",
                " 7 ",
                "a:b:3",
                ":5",
                "e:18446744073709551615",
                "",
            ]
            .iter()
            .map(|s| s.as_bytes().to_vec())
            .collect(),
        ),
        (
            "config_toml",
            std::iter::once(EXAMPLE_CONFIG)
                .chain(DOC_CONFIGS.iter().copied())
                .map(|s| s.as_bytes().to_vec())
                .collect(),
        ),
        ("publish_body", publishes),
    ]
}
