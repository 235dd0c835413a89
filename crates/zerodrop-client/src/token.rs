//! Connect tokens: HS256 JWTs with `sub`, `exp`, `streams` and an optional `publish` list.
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
}

/// Mints a connect token valid for `ttl` from now.
pub fn mint_connect_token(
    secret: &str,
    sub: &str,
    streams: &[String],
    publish: Option<&[String]>,
    ttl: Duration,
) -> Result<String, ClientError> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let claims = ConnectClaims {
        sub: sub.to_string(),
        exp: now + ttl.as_secs().max(1),
        iat: now,
        streams: streams.to_vec(),
        publish: publish.map(<[String]>::to_vec),
    };
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
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
            jsonwebtoken::decode::<ConnectClaims>(
                &t,
                &jsonwebtoken::DecodingKey::from_secret(b"another-secret-xx"),
                &v
            )
            .is_err()
        );
    }
}
