//! End-to-end encrypted event data (docs/protocol.md, "End-to-end encrypted data").
//!
//! The application holds group keys, one per key epoch id (`kid`); the server only ever sees
//! the sealed form `{"e2e":1,"kid":…,"n":…,"ct":…}`: AES-256-GCM with a 12-byte random nonce
//! `n` and the 16-byte tag appended to `ct`, both base64url without padding, and as
//! associated data `"zerodrop-e2e-v1\n" + stream + "\n" + kid` — so a sealed value moved to
//! another stream or relabelled with another key epoch fails to open. The browser SDK seals
//! and opens the same bytes (vectors in `docs/vectors/e2e-aes256gcm.json`).

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// The sealed form of event data, exactly as it travels in `data`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sealed {
    /// The format version: 1.
    pub e2e: u64,
    /// The key epoch id the data was sealed under.
    pub kid: String,
    /// The nonce, base64url without padding (12 bytes).
    pub n: String,
    /// Ciphertext with the tag appended, base64url without padding.
    pub ct: String,
}

/// Why sealed data could not be opened.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum E2eError {
    /// Not in the sealed format (`MALFORMED_SEALED`).
    #[error("MALFORMED_SEALED: {0}")]
    Malformed(String),
    /// Authentication failed: wrong key, altered ciphertext, another stream or kid
    /// (`DECRYPT_FAILED`).
    #[error("DECRYPT_FAILED: sealed data failed authentication")]
    DecryptFailed,
}

impl E2eError {
    pub fn code(&self) -> &'static str {
        match self {
            E2eError::Malformed(_) => "MALFORMED_SEALED",
            E2eError::DecryptFailed => "DECRYPT_FAILED",
        }
    }
}

/// One group key: 32 bytes for AES-256-GCM.
pub struct GroupKey(LessSafeKey);

impl std::fmt::Debug for GroupKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GroupKey(..)")
    }
}

impl GroupKey {
    pub fn new(raw: &[u8; 32]) -> GroupKey {
        // 32 bytes is exactly AES-256's key length, the one way `new` can fail.
        let unbound = UnboundKey::new(&AES_256_GCM, raw).expect("a 32-byte AES-256 key");
        GroupKey(LessSafeKey::new(unbound))
    }
}

/// Whether a key epoch id is valid: 1–64 characters of `[A-Za-z0-9._-]`.
pub fn valid_kid(kid: &str) -> bool {
    (1..=64).contains(&kid.len())
        && kid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn aad(stream: &str, kid: &str) -> Aad<Vec<u8>> {
    Aad::from(format!("zerodrop-e2e-v1\n{stream}\n{kid}").into_bytes())
}

/// Seals the JSON text `plaintext` for `stream` under `kid`, with a fresh random nonce unless
/// one is given (only test vectors give one: a nonce must never repeat under a key).
pub fn seal_text(
    key: &GroupKey,
    kid: &str,
    stream: &str,
    plaintext: &str,
    nonce: Option<[u8; NONCE_LEN]>,
) -> Sealed {
    assert!(
        valid_kid(kid),
        "kid must be 1-64 characters of [A-Za-z0-9._-]"
    );
    let n = nonce.unwrap_or_else(|| {
        let mut n = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut n)
            .expect("the system's random source");
        n
    });
    let mut buf = plaintext.as_bytes().to_vec();
    key.0
        .seal_in_place_append_tag(Nonce::assume_unique_for_key(n), aad(stream, kid), &mut buf)
        .expect("AES-GCM seals any plaintext of event size");
    Sealed {
        e2e: 1,
        kid: kid.to_string(),
        n: URL_SAFE_NO_PAD.encode(n),
        ct: URL_SAFE_NO_PAD.encode(buf),
    }
}

/// Event data in the sealed shape: an object with exactly `e2e`, `kid`, `n` and `ct`. Anything
/// else is plain data (`Ok(None)`); the sealed shape with bad values is `MALFORMED_SEALED`.
pub fn parse_sealed(data: &RawValue) -> Result<Option<Sealed>, E2eError> {
    let text = data.get();
    if !text.trim_start().starts_with('{') {
        return Ok(None);
    }
    let Ok(map) = serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(text) else {
        return Ok(None);
    };
    let mut keys: Vec<&str> = map.keys().map(String::as_str).collect();
    keys.sort_unstable();
    if keys != ["ct", "e2e", "kid", "n"] {
        return Ok(None);
    }
    let bad = |why: &str| E2eError::Malformed(why.to_string());
    if map["e2e"] != serde_json::json!(1) {
        return Err(bad("unknown e2e format version"));
    }
    let field = |k: &str| map[k].as_str().map(str::to_string);
    let kid = field("kid")
        .filter(|k| valid_kid(k))
        .ok_or_else(|| bad("invalid kid"))?;
    let n = field("n").ok_or_else(|| bad("the nonce is not a string"))?;
    let ct = field("ct").ok_or_else(|| bad("the ciphertext is not a string"))?;
    Ok(Some(Sealed { e2e: 1, kid, n, ct }))
}

/// Opens sealed data for `stream` to its plaintext JSON text.
pub fn open_text(key: &GroupKey, stream: &str, sealed: &Sealed) -> Result<String, E2eError> {
    if sealed.e2e != 1 {
        return Err(E2eError::Malformed("unknown e2e format version".into()));
    }
    let n: [u8; NONCE_LEN] = URL_SAFE_NO_PAD
        .decode(&sealed.n)
        .ok()
        .and_then(|n| n.try_into().ok())
        .ok_or_else(|| E2eError::Malformed("the nonce is not 12 bytes of base64url".into()))?;
    let mut ct = URL_SAFE_NO_PAD
        .decode(&sealed.ct)
        .ok()
        .filter(|c| c.len() >= AES_256_GCM.tag_len())
        .ok_or_else(|| E2eError::Malformed("the ciphertext is shorter than the tag".into()))?;
    let plain = key
        .0
        .open_in_place(
            Nonce::assume_unique_for_key(n),
            aad(stream, &sealed.kid),
            &mut ct,
        )
        .map_err(|_| E2eError::DecryptFailed)?;
    String::from_utf8(plain.to_vec()).map_err(|_| E2eError::DecryptFailed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_then_open_round_trips_and_binds_the_stream() {
        let key = GroupKey::new(&[7u8; 32]);
        let s = seal_text(&key, "k1", "room:1", r#"{"a":1}"#, None);
        assert_eq!(open_text(&key, "room:1", &s).unwrap(), r#"{"a":1}"#);
        assert_eq!(open_text(&key, "room:2", &s), Err(E2eError::DecryptFailed));
        // Two seals of one plaintext differ (fresh nonces).
        assert_ne!(s, seal_text(&key, "k1", "room:1", r#"{"a":1}"#, None));
    }

    #[test]
    fn only_the_exact_sealed_shape_counts_as_sealed() {
        let raw = |s: &str| RawValue::from_string(s.to_string()).unwrap();
        assert_eq!(parse_sealed(&raw(r#"{"n":1}"#)), Ok(None));
        assert_eq!(parse_sealed(&raw(r#""text""#)), Ok(None));
        assert_eq!(
            parse_sealed(&raw(r#"{"e2e":1,"kid":"k","n":"x","ct":"y","more":1}"#)),
            Ok(None)
        );
        assert!(matches!(
            parse_sealed(&raw(r#"{"e2e":1,"kid":"bad kid","n":"x","ct":"y"}"#)),
            Err(E2eError::Malformed(_))
        ));
        assert!(matches!(
            parse_sealed(&raw(r#"{"e2e":1,"kid":"k","n":"x","ct":"y"}"#)),
            Ok(Some(_))
        ));
    }
}
