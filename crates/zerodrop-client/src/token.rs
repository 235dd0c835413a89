//! Connect tokens: HS256 JWTs with `sub`, `exp`, `streams`, an optional `publish` list and
//! an optional `upstreams` list (the upstreams the token may `GET /v1/upstreams/…`).
//!
//! Only a party that holds the server's JWT secret (a backend, or an operator tool) mints
//! them; browsers and devices receive them from their backend.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::ClientError;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ConnectClaims {
    pub sub: String,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// Issued at, seconds since the Unix epoch.
    pub iat: u64,
    /// Stream ids or prefixes ending in `*` this token may read.
    pub streams: Vec<String>,
    /// Stream ids or prefixes this token may publish to over WebSocket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publish: Option<Vec<String>>,
    /// Upstream names or prefixes ending in `*` this token may call through
    /// `GET /v1/upstreams/{upstream}/…` (none by default: only upstreams configured public).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub upstreams: Vec<String>,
    /// Public facts about the subject (a name, an avatar), shown to the members of the
    /// streams with presence (at most 1,024 bytes of JSON).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<serde_json::Value>,
}

impl ConnectClaims {
    /// Claims for `sub` on `streams`, valid for `ttl` from now; set `publish` and `upstreams`
    /// on the result as needed, then [`mint_claims`].
    pub fn new(sub: &str, streams: &[String], ttl: Duration) -> ConnectClaims {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        ConnectClaims {
            sub: sub.to_string(),
            exp: now + ttl.as_secs().max(1),
            iat: now,
            streams: streams.to_vec(),
            publish: None,
            upstreams: Vec::new(),
            info: None,
        }
    }
}

/// Mints a connect token valid for `ttl` from now.
pub fn mint_connect_token(
    secret: &str,
    sub: &str,
    streams: &[String],
    publish: Option<&[String]>,
    ttl: Duration,
) -> Result<String, ClientError> {
    let mut claims = ConnectClaims::new(sub, streams, ttl);
    claims.publish = publish.map(<[String]>::to_vec);
    mint_claims(secret, &claims)
}

/// Mints a connect token carrying exactly `claims`.
pub fn mint_claims(secret: &str, claims: &ConnectClaims) -> Result<String, ClientError> {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .map_err(|e| ClientError::Token(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_tokens_verify_with_the_same_secret_only() {
        let t = mint_connect_token(
            "s3cret-s3cret-s3cret",
            "probe",
            &["room:*".into()],
            Some(&["room:1".into()]),
            Duration::from_secs(60),
        )
        .unwrap();
        let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
        v.required_spec_claims = ["exp".to_string()].into_iter().collect();
        let got = jsonwebtoken::decode::<ConnectClaims>(
            &t,
            &jsonwebtoken::DecodingKey::from_secret(b"s3cret-s3cret-s3cret"),
            &v,
        )
        .unwrap();
        assert_eq!(got.claims.sub, "probe");
        assert_eq!(got.claims.streams, vec!["room:*".to_string()]);
        assert_eq!(got.claims.publish, Some(vec!["room:1".to_string()]));
        assert!(
            got.claims.upstreams.is_empty(),
            "no upstream grant unless asked"
        );
        let mut c = ConnectClaims::new("probe", &[], Duration::from_secs(60));
        c.upstreams = vec!["app".into(), "pay*".into()];
        let t2 = mint_claims("s3cret-s3cret-s3cret", &c).unwrap();
        let got2 = jsonwebtoken::decode::<ConnectClaims>(
            &t2,
            &jsonwebtoken::DecodingKey::from_secret(b"s3cret-s3cret-s3cret"),
            &v,
        )
        .unwrap();
        assert_eq!(got2.claims, c);
        assert!(
            jsonwebtoken::decode::<ConnectClaims>(
                &t,
                &jsonwebtoken::DecodingKey::from_secret(b"another-secret-xx"),
                &v
            )
            .is_err()
        );
    }
}
