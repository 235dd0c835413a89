//! The targets' bodies. Each takes arbitrary bytes; a panic is a finding.

use axum::http::HeaderValue;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use hmac::{Hmac, KeyInit, Mac};
use serde_json::Value;
use sha2::Sha256;
use zerodrop_core::frames::{ClientFrame, ServerFrame};
use zerodrop_core::json::{MAX_DEPTH, compact, depth, duplicate_key};
use zerodrop_core::token::TokenError;
use zerodrop_core::{ErrorCode, ResumeKeys};
use zerodrop_server::auth::Auth;
use zerodrop_server::config::Config;
use zerodrop_server::secrets::Secrets;

/// A `zerodrop.v3` binary client frame, as the server reads it
/// (`zerodrop_server::ws::parse_binary_frame`).
///
/// Invariants: what parses is a `publish` whose `data` is the bytes after the first LF,
/// exactly; encoding that publish again gives a frame that parses to the same publish.
pub fn client_binary_frame(data: &[u8]) {
    let Ok(frame) = zerodrop_server::ws::parse_binary_frame(data) else {
        return;
    };
    let ClientFrame::Publish(p) = frame else {
        panic!("a binary frame read as something else than a publish: {data:?}");
    };
    let lf = data
        .iter()
        .position(|&b| b == b'\n')
        .expect("a frame that parsed has an LF");
    let stored = p.data.as_ref().expect("a binary publish has data").get();
    let bytes = zerodrop_core::payload::data_bytes(stored).expect("its data is a byte payload");
    assert_eq!(bytes, &data[lf + 1..], "the bytes of {data:?}");
    let again = ClientFrame::publish_binary(&p.stream, p.id.clone(), &bytes);
    let Ok(ClientFrame::Publish(q)) = zerodrop_server::ws::parse_binary_frame(&again) else {
        panic!("{again:?} (from {data:?}) does not parse as a publish");
    };
    assert_eq!(q.stream, p.stream);
    assert_eq!(q.data.as_ref().map(|d| d.get()), Some(stored));
    let id = |id: &Option<Value>| id.clone().unwrap_or(Value::Null);
    assert!(same_json(&id(&q.id), &id(&p.id)), "the id of {data:?}");
}

/// The resume-key ring of the targets (two keys: the second verifies only).
pub const RESUME_KEYS: &str = "k2:fuzz-resume-key-two-0123456789,k1:fuzz-resume-key-one-0123456789";
/// The key `k1` of [`RESUME_KEYS`], which signs the payloads of `resume_token`'s second mode.
const RESUME_KEY_K1: &[u8] = b"fuzz-resume-key-one-0123456789";
/// The JWT secret of the targets.
pub const JWT_SECRET: &str = "fuzz-jwt-secret-0123456789abcdef";
/// "Now" for resume tokens (2027-01-15), so the target is deterministic.
pub const NOW_SEC: u64 = 1_800_000_000;
/// `--max-payload-bytes` at its default.
pub const MAX_PAYLOAD_BYTES: usize = 65_536;

fn text(data: &[u8]) -> Option<&str> {
    std::str::from_utf8(data).ok()
}

/// The same JSON value; floats may differ in their last bit (serde_json's default float
/// parser is not always correctly rounded, so a float printed and read back can move by one
/// unit in the last place; nothing here decides on a float).
fn same_json(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if x.is_f64() || y.is_f64() => {
            match (x.as_f64(), y.as_f64()) {
                (Some(x), Some(y)) => x == y || ((x - y) / x).abs() < 1e-15,
                _ => false,
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same_json(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| same_json(v, w)))
        }
        _ => a == b,
    }
}

fn value(json: &str) -> Value {
    serde_json::from_str(json).unwrap_or_else(|e| panic!("not JSON ({e}): {json}"))
}

/// Nesting depth of a parsed value, counted like [`depth`] counts text.
fn value_depth(v: &Value) -> usize {
    match v {
        Value::Array(a) => 1 + a.iter().map(value_depth).max().unwrap_or(0),
        Value::Object(o) => 1 + o.values().map(value_depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// The WebSocket client-frame parser as the server reads a text frame (the depth limit, then
/// `ClientFrame::parse`), and the SDK's `ServerFrame::parse` on the same text.
///
/// Invariants: what parses re-encodes to a frame that parses again to the same encoding
/// (`data` and `t` byte for byte); the server's reading and the plain parser agree whenever
/// the depth limit lets a frame through.
pub fn client_frame(data: &[u8]) {
    let Some(text) = text(data) else { return };
    let _ = ServerFrame::parse(text);
    let plain = ClientFrame::parse(text);
    let Ok(frame) = zerodrop_server::ws::parse_frame(text) else {
        return;
    };
    let Ok(plain) = plain else {
        panic!("parse_frame accepted what ClientFrame::parse refused: {text}");
    };
    let json = frame.to_json();
    assert_eq!(json, plain.to_json(), "two readings of {text}");
    let again = zerodrop_server::ws::parse_frame(&json)
        .unwrap_or_else(|e| panic!("{json} (from {text}) does not parse: {}", e.message));
    let json2 = again.to_json();
    assert!(
        json2 == json || same_json(&value(&json2), &value(&json)),
        "{text} → {json} → {json2}"
    );
    // Raw JSON is carried byte for byte.
    match (&frame, &again) {
        (ClientFrame::Publish(a), ClientFrame::Publish(b)) => assert_eq!(
            a.data.as_ref().map(|d| d.get()),
            b.data.as_ref().map(|d| d.get())
        ),
        // A missing `t` is written `"t":null`: both echo `null`.
        (ClientFrame::Ping(a), ClientFrame::Ping(b))
        | (ClientFrame::Pong(a), ClientFrame::Pong(b)) => {
            let echo = |p: &zerodrop_core::frames::Ping| p.echo().t.map(|t| t.get().to_string());
            assert_eq!(echo(a), echo(b))
        }
        _ => {}
    }
}

fn resume_keys() -> ResumeKeys {
    ResumeKeys::parse(RESUME_KEYS).expect("the targets' key ring is valid")
}

fn hmac_b64(key: &[u8], signed: &str) -> String {
    let mut m = <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("any key length");
    m.update(signed.as_bytes());
    B64.encode(m.finalize().into_bytes())
}

/// Resume tokens (`ResumeKeys::verify`). The first byte picks the mode: the rest as a token
/// (forgeries, malformed tokens), or the rest as a payload that `k1` signs (the claims
/// decoder behind a good signature).
///
/// Invariants: a forged signature never verifies; a well-signed token is refused only for
/// its payload or its expiry; claims that verify re-sign to a token that verifies to the same
/// claims, and are not expired.
pub fn resume_token(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let keys = resume_keys();
    let token = if mode & 1 == 0 {
        let Some(t) = text(rest) else { return };
        t.to_string()
    } else {
        let signed = format!("v1.k1.{}", B64.encode(rest));
        let sig = hmac_b64(RESUME_KEY_K1, &signed);
        format!("{signed}.{sig}")
    };
    let verified = keys.verify(&token, NOW_SEC);
    if mode & 1 == 1 {
        assert!(
            matches!(
                verified,
                Ok(_) | Err(TokenError::Expired) | Err(TokenError::Invalid("malformed payload"))
            ) || token.len() > 4096,
            "a token signed by k1 refused: {verified:?}"
        );
    }
    let Ok(claims) = verified else { return };
    assert!(claims.exp > NOW_SEC, "expired claims verified: {claims:?}");
    let again = keys.sign(&claims);
    assert_eq!(
        keys.verify(&again, NOW_SEC).as_ref(),
        Ok(&claims),
        "re-signed {token}"
    );
}

fn auth() -> Auth {
    Auth::new(&Secrets {
        api_key: "fuzz-api-key-0123456789abcdef0123".into(),
        admin_token: "fuzz-admin-token-0123456789abcdef".into(),
        jwt_secret: JWT_SECRET.into(),
        resume_keys: resume_keys(),
    })
}

/// Connect tokens (`Auth::verify_connect`, `Auth::verify_refresh`). The first byte picks the
/// mode: the rest as a token; the rest as claims signed with the JWT secret under an HS256
/// header; or `<header>\n<claims>`, both fuzzed, signed with the JWT secret (algorithm
/// confusion: a header naming another algorithm over an HMAC signature).
///
/// Invariants: only an HS256 header verifies (no JWKS is configured); claims that verify
/// re-mint to a token that verifies to the same claims; a refusal is `UNAUTHORIZED` (or
/// `TOKEN_EXPIRED` for a refresh).
pub fn connect_token(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let auth = auth();
    let token = match mode % 3 {
        0 => match text(rest) {
            Some(t) => t.to_string(),
            None => return,
        },
        m => {
            let (header, claims) = match (m, rest.iter().position(|&b| b == b'\n')) {
                (2, Some(i)) => (&rest[..i], &rest[i + 1..]),
                _ => (&br#"{"alg":"HS256","typ":"JWT"}"#[..], rest),
            };
            let signed = format!("{}.{}", B64.encode(header), B64.encode(claims));
            let sig = hmac_b64(JWT_SECRET.as_bytes(), &signed);
            format!("{signed}.{sig}")
        }
    };
    if let Err(e) = auth.verify_refresh(&token) {
        assert!(
            matches!(e.code, ErrorCode::Unauthorized | ErrorCode::TokenExpired),
            "{:?}",
            e.code
        );
    }
    let claims = match auth.verify_connect(&token) {
        Ok(c) => c,
        Err(e) => {
            assert_eq!(e.code, ErrorCode::Unauthorized);
            return;
        }
    };
    let header = jsonwebtoken::decode_header(&token).expect("a verified token has a header");
    assert_eq!(header.alg, jsonwebtoken::Algorithm::HS256, "{token}");
    let again = auth.mint_connect(&claims);
    assert_eq!(
        auth.verify_connect(&again).ok().as_ref(),
        Some(&claims),
        "re-minted {token}"
    );
}

/// JWKS documents (`jwks::parse`): every key kept is pinned to one of the three asymmetric
/// algorithms, never more than `MAX_KEYS`, and each is a key of the document with a `kid`.
pub fn jwks(data: &[u8]) {
    let Ok(keys) = zerodrop_server::jwks::parse(data) else {
        return;
    };
    assert!(keys.len() <= zerodrop_server::jwks::MAX_KEYS);
    let set: jsonwebtoken::jwk::JwkSet =
        serde_json::from_slice(data).expect("a document parse accepted is a JWK set");
    for (kid, pinned) in &keys {
        assert!(matches!(
            pinned.alg,
            jsonwebtoken::Algorithm::RS256
                | jsonwebtoken::Algorithm::ES256
                | jsonwebtoken::Algorithm::EdDSA
        ));
        let pinned_by_doc = set.keys.iter().any(|k| {
            k.common.key_id.as_deref() == Some(kid.as_str())
                && zerodrop_server::jwks::pin(k) == Some(pinned.alg)
        });
        assert!(pinned_by_doc, "key {kid:?} is not the document's");
    }
}

/// `Last-Event-ID` (`sse::last_event_id`) on any header value hyper would hand over.
///
/// Invariants: the printed form of a position (`<epoch>:<seq>` or `<seq>`, what `id:` lines
/// carry) parses back to the same position; only a blank value is "no position".
pub fn last_event_id(data: &[u8]) {
    let Ok(v) = HeaderValue::from_bytes(data) else {
        return;
    };
    let Ok(parsed) = zerodrop_server::sse::last_event_id(&v) else {
        return;
    };
    let Some((epoch, seq)) = parsed else {
        assert!(
            v.to_str().is_ok_and(|s| s.trim().is_empty()),
            "{v:?} read as no position"
        );
        return;
    };
    let printed = match &epoch {
        Some(e) => format!("{e}:{seq}"),
        None => seq.to_string(),
    };
    let header = HeaderValue::from_str(&printed).expect("a printed position is a header value");
    let again = zerodrop_server::sse::last_event_id(&header)
        .unwrap_or_else(|e| panic!("{printed} (from {v:?}) refused: {}", e.message));
    assert_eq!(again, Some((epoch, seq)), "{v:?} → {printed}");
}

/// The config loader (`Config::from_toml`): a TOML file over the defaults, with its
/// upstream, webhook and stream-policy tables. Invariants: no panic on any text; every config
/// it accepts passes `validate` and its derived bounds compute; each exact stream pattern is
/// the pattern of its own stream's policy.
pub fn config_toml(data: &[u8]) {
    let Some(text) = text(data) else { return };
    let Ok(cfg) = Config::from_toml(text) else {
        return;
    };
    if let Err(e) = cfg.validate() {
        panic!("accepted a config that does not validate ({e:#}): {text}");
    }
    let _ = (cfg.max_body_bytes(), cfg.write_stall());
    // Nothing is more specific than an exact id: each `[streams."<id>"]` is its stream's policy.
    for (pattern, _) in cfg.streams.iter() {
        if let zerodrop_core::StreamPattern::Exact(id) = &pattern {
            assert_eq!(cfg.policy(id).pattern, Some(id.as_str()), "{text}");
        }
    }
}

/// An HTTP publish body (`http::v1::publish_data`) through the checks every event's `data`
/// passes (`app::check_data`: size, the JSON depth limit, duplicate keys, numbers), as
/// `App::publish` runs them.
///
/// Invariants: compaction keeps the value and is idempotent; the text depth counter agrees
/// with the parsed value's depth (where no key is given twice); whatever is accepted is readable by serde_json (with its
/// recursion limit; lone surrogate escapes aside, which JSON allows and JavaScript reads),
/// has no duplicate key, and is accepted in a WebSocket `publish` frame too.
pub fn publish_body(data: &[u8]) {
    let Ok(raw) = zerodrop_server::http::v1::publish_data(data) else {
        return;
    };
    let compacted = compact(raw.get());
    assert_eq!(compact(&compacted), compacted, "compaction is idempotent");
    let parsed: Option<Value> = serde_json::from_str(raw.get()).ok();
    if let Some(v) = &parsed {
        // A parsed object keeps one value per key (the last), so with a key twice the text
        // can nest deeper than the value: the depth counter is compared without them.
        if duplicate_key(raw.get()).is_none() {
            assert_eq!(value_depth(v), depth(raw.get()), "depth of {}", raw.get());
        }
        assert_eq!(depth(&compacted), depth(raw.get()));
        assert!(same_json(&value(&compacted), v), "compacted {}", raw.get());
    }
    match zerodrop_server::app::check_data(&compacted, MAX_PAYLOAD_BYTES) {
        Ok(()) => {
            assert!(depth(&compacted) <= MAX_DEPTH);
            assert!(duplicate_key(&compacted).is_none());
            match serde_json::from_str::<Value>(&compacted) {
                Ok(v) => assert!(parsed.is_some_and(|p| same_json(&p, &v))),
                // JSON's grammar allows a lone surrogate escape (`"\ud800"`): JavaScript reads
                // it, serde_json refuses it. Stored as sent (docs/protocol.md).
                Err(e) => assert!(
                    e.to_string().contains("hex escape"),
                    "accepted data no client reads ({e}): {compacted}"
                ),
            }
            let frame = format!(r#"{{"type":"publish","stream":"s","data":{compacted}}}"#);
            let ws = zerodrop_server::ws::parse_frame(&frame);
            assert!(
                matches!(&ws, Ok(ClientFrame::Publish(p)) if p.data.as_ref().map(|d| d.get()) == Some(&*compacted)),
                "HTTP accepts what a publish frame refuses: {frame}"
            );
        }
        Err(e) => assert!(
            matches!(
                e.code,
                ErrorCode::InvalidRequest | ErrorCode::PayloadTooLarge
            ),
            "{:?}",
            e.code
        ),
    }
}
