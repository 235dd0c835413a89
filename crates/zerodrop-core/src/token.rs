//! Resume tokens: `v1.<kid>.<payload>.<sig>`.
//!
//! `payload` is base64url (no padding) of `{"sid","sub","iat","exp","jti","aexp"}`; `sig` is base64url
//! of HMAC-SHA256 over `v1.<kid>.<payload>` with the key named `kid`. Keys come as
//! `"kid2:secret2,kid1:secret1"`: the first signs, every one verifies, so keys rotate without
//! logging anyone out (add the new key in front, drop the old one after a reconnect window).
//! Signatures are checked in constant time (`Mac::verify_slice`).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::ids::SessionId;

type HmacSha256 = Hmac<Sha256>;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumeClaims {
    pub sid: SessionId,
    pub sub: String,
    /// Issued at, seconds since the Unix epoch.
    pub iat: u64,
    /// Expires at, seconds since the Unix epoch.
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    /// The session's authority: the `exp` (Unix seconds) of the newest connect token presented
    /// for it. A resume after it plus the grace needs a fresh connect token. `None`: a session
    /// opened with the api key (or a token minted before the field existed), bounded only by
    /// the maximum session age.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aexp: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Malformed, unknown key id or bad signature. The reason is for logs, never for clients
    /// beyond this wording.
    #[error("invalid resume token: {0}")]
    Invalid(&'static str),
    #[error("resume token expired")]
    Expired,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct KeysError(String);

/// The resume-token key ring.
#[derive(Clone)]
pub struct ResumeKeys {
    keys: Vec<(String, Vec<u8>)>,
}

impl std::fmt::Debug for ResumeKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print secrets.
        let kids: Vec<&str> = self.keys.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("ResumeKeys").field("kids", &kids).finish()
    }
}

impl ResumeKeys {
    /// Parses `"kid2:secret2,kid1:secret1"`. Key ids are `[A-Za-z0-9_-]{1,32}`; secrets must
    /// be at least 16 bytes.
    pub fn parse(spec: &str) -> Result<ResumeKeys, KeysError> {
        let mut keys = Vec::new();
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (kid, secret) = part
                .split_once(':')
                .ok_or_else(|| KeysError("each resume key must be `kid:secret`".into()))?;
            let kid_ok = !kid.is_empty()
                && kid.len() <= 32
                && kid
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if !kid_ok {
                return Err(KeysError(format!(
                    "resume key id {kid:?} must be 1-32 characters of A-Z a-z 0-9 _ -"
                )));
            }
            if secret.len() < 16 {
                return Err(KeysError(format!(
                    "resume key {kid:?} is shorter than 16 bytes"
                )));
            }
            if keys.iter().any(|(k, _)| k == kid) {
                return Err(KeysError(format!("resume key id {kid:?} appears twice")));
            }
            keys.push((kid.to_string(), secret.as_bytes().to_vec()));
        }
        if keys.is_empty() {
            return Err(KeysError("no resume key given".into()));
        }
        Ok(ResumeKeys { keys })
    }

    /// A fresh single-key ring in the `ZERODROP_RESUME_KEYS` format.
    pub fn generate_spec() -> String {
        format!("k1:{}", B64.encode(crate::random_bytes::<32>()))
    }

    pub fn signing_kid(&self) -> &str {
        &self.keys[0].0
    }

    pub fn sign(&self, claims: &ResumeClaims) -> String {
        let (kid, key) = &self.keys[0];
        // Serialising a struct of strings and integers cannot fail.
        let payload = B64.encode(serde_json::to_vec(claims).unwrap_or_default());
        let signed = format!("v1.{kid}.{payload}");
        let sig = B64.encode(mac(key, signed.as_bytes()).finalize().into_bytes());
        format!("{signed}.{sig}")
    }

    /// Checks the signature and the expiry (`now_sec` in seconds since the Unix epoch).
    pub fn verify(&self, token: &str, now_sec: u64) -> Result<ResumeClaims, TokenError> {
        if token.len() > 4096 {
            return Err(TokenError::Invalid("too long"));
        }
        let mut parts = token.split('.');
        let (Some(v), Some(kid), Some(payload), Some(sig), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(TokenError::Invalid("malformed"));
        };
        if v != "v1" {
            return Err(TokenError::Invalid("unknown version"));
        }
        let key = self
            .keys
            .iter()
            .find(|(k, _)| k == kid)
            .map(|(_, key)| key)
            .ok_or(TokenError::Invalid("unknown key id"))?;
        let sig = B64
            .decode(sig)
            .map_err(|_| TokenError::Invalid("malformed signature"))?;
        let signed_len = token.len() - sig_b64_len(token);
        mac(key, &token.as_bytes()[..signed_len])
            .verify_slice(&sig)
            .map_err(|_| TokenError::Invalid("bad signature"))?;
        let raw = B64
            .decode(payload)
            .map_err(|_| TokenError::Invalid("malformed payload"))?;
        let claims: ResumeClaims =
            serde_json::from_slice(&raw).map_err(|_| TokenError::Invalid("malformed payload"))?;
        if claims.exp <= now_sec {
            return Err(TokenError::Expired);
        }
        Ok(claims)
    }
}

fn sig_b64_len(token: &str) -> usize {
    token
        .rsplit_once('.')
        .map(|(_, s)| s.len() + 1)
        .unwrap_or(0)
}

fn mac(key: &[u8], data: &[u8]) -> HmacSha256 {
    // HMAC accepts keys of any length.
    let mut m = <HmacSha256 as KeyInit>::new_from_slice(key).expect("HMAC takes any key length");
    m.update(data);
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(exp: u64) -> ResumeClaims {
        ResumeClaims {
            sid: SessionId::parse("s_abc").unwrap(),
            sub: "u1".into(),
            iat: 100,
            exp,
            jti: Some("j1".into()),
            aexp: Some(exp.saturating_add(5)),
        }
    }

    #[test]
    fn sign_verify_roundtrip_and_expiry() {
        let keys = ResumeKeys::parse("k1:0123456789abcdef0123").unwrap();
        let t = keys.sign(&claims(1000));
        assert!(t.starts_with("v1.k1."));
        assert_eq!(keys.verify(&t, 999).unwrap(), claims(1000));
        assert_eq!(keys.verify(&t, 1000), Err(TokenError::Expired));
    }

    #[test]
    fn rotation_first_signs_all_verify() {
        let old = ResumeKeys::parse("k1:0123456789abcdef0123").unwrap();
        let both = ResumeKeys::parse("k2:fedcba9876543210fedc,k1:0123456789abcdef0123").unwrap();
        let new_only = ResumeKeys::parse("k2:fedcba9876543210fedc").unwrap();
        let t_old = old.sign(&claims(1000));
        let t_new = both.sign(&claims(1000));
        assert!(t_new.starts_with("v1.k2."));
        assert!(both.verify(&t_old, 1).is_ok());
        assert!(both.verify(&t_new, 1).is_ok());
        assert!(new_only.verify(&t_new, 1).is_ok());
        assert_eq!(
            new_only.verify(&t_old, 1),
            Err(TokenError::Invalid("unknown key id"))
        );
    }

    #[test]
    fn forged_and_malformed_tokens_are_invalid() {
        let keys = ResumeKeys::parse("k1:0123456789abcdef0123").unwrap();
        let other = ResumeKeys::parse("k1:xxxxxxxxxxxxxxxxxxxx").unwrap();
        let forged = other.sign(&claims(1000));
        assert_eq!(
            keys.verify(&forged, 1),
            Err(TokenError::Invalid("bad signature"))
        );
        let t = keys.sign(&claims(1000));
        // Swap the payload for one with a later expiry: the signature no longer matches.
        let parts: Vec<&str> = t.split('.').collect();
        let evil = B64.encode(serde_json::to_vec(&claims(u64::MAX)).unwrap());
        let tampered = format!("v1.k1.{evil}.{}", parts[3]);
        assert!(matches!(
            keys.verify(&tampered, 1),
            Err(TokenError::Invalid(_))
        ));
        for bad in [
            "",
            "v1",
            "v1.k1.x",
            "v2.k1.a.b",
            "v1.k1.a.b.c",
            "v1.k1.!!.!!",
            &"a".repeat(5000),
        ] {
            assert!(
                matches!(keys.verify(bad, 1), Err(TokenError::Invalid(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn key_spec_errors() {
        assert!(ResumeKeys::parse("").is_err());
        assert!(ResumeKeys::parse("nokey").is_err());
        assert!(ResumeKeys::parse("k1:short").is_err());
        assert!(ResumeKeys::parse("k.1:0123456789abcdef0123").is_err());
        assert!(ResumeKeys::parse("k1:0123456789abcdef0123,k1:0123456789abcdef0124").is_err());
        let g = ResumeKeys::generate_spec();
        assert!(ResumeKeys::parse(&g).is_ok());
        assert!(!format!("{:?}", ResumeKeys::parse(&g).unwrap()).contains(&g[3..]));
    }
}
