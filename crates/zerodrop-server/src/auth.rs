//! Credentials: api key (backends), admin token, connect tokens (JWT HS256, clients) and
//! resume tokens (session takeover).
//!
//! Shared secrets are compared in constant time, as SHA-256 digests (so the comparison does
//! not even leak the length). Nothing here logs a credential.

use std::sync::Arc;

use axum::http::{HeaderMap, header};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, TokenData, Validation};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use zerodrop_core::clock::{Clock, SystemClock};
use zerodrop_core::token::{ResumeClaims, TokenError};
use zerodrop_core::{ErrorCode, Grants, ResumeKeys, SessionId};

use crate::error::ApiError;
use crate::jwks::Jwks;
use crate::secrets::Secrets;

/// The claims of a connect token.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ConnectClaims {
    pub sub: String,
    pub exp: u64,
    /// Issued at (Unix seconds). A revocation of the subject refuses the tokens issued before
    /// it; a token without `iat` counts as issued before every revocation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    #[serde(default)]
    pub streams: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publish: Option<Vec<String>>,
    /// Upstreams this token may call with `GET /v1/upstreams/{upstream}/…`: names, or
    /// prefixes ending in `*` (the stream patterns' rules). None by default: such a token
    /// calls only upstreams configured `public = true`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub upstreams: Vec<String>,
    /// Public facts about the subject, shown to the members of the streams with presence
    /// (SPEC §10); at most [`MAX_INFO_BYTES`] of compact JSON, else the token is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<serde_json::Value>,
}

/// The largest `info` claim a connect token may carry (compact JSON bytes).
pub const MAX_INFO_BYTES: usize = 1024;

impl ConnectClaims {
    pub fn grants(&self) -> Grants {
        Grants {
            streams: self.streams.clone(),
            publish: self.publish.clone().unwrap_or_default(),
            info: self.info.clone(),
        }
    }

    /// Whether the `upstreams` claim names `upstream` (exactly or by a prefix pattern).
    pub fn may_call_upstream(&self, upstream: &str) -> bool {
        self.upstreams
            .iter()
            .any(|p| zerodrop_core::grant::pattern_matches(p, upstream))
    }
}

/// Refuses claims whose `info` is over [`MAX_INFO_BYTES`] (`PAYLOAD_TOO_LARGE`, with `limit`):
/// every member's `info` is sent to every presence subscriber of its streams.
fn check_info(claims: ConnectClaims) -> Result<ConnectClaims, ApiError> {
    let size = claims.info.as_ref().map_or(0, |i| i.to_string().len());
    if size > MAX_INFO_BYTES {
        return Err(ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!("the connect token's info claim is {size} bytes; at most {MAX_INFO_BYTES}"),
        )
        .with("limit", MAX_INFO_BYTES as u64));
    }
    Ok(claims)
}

/// Mints a connect token with `secret` (the `token` command and tests).
pub fn mint_connect_token(secret: &str, claims: &ConnectClaims) -> String {
    let key = EncodingKey::from_secret(secret.as_bytes());
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &key).unwrap_or_default()
}

pub struct Auth {
    api_key: Box<[u8]>,
    admin_token: Box<[u8]>,
    jwt_decode: DecodingKey,
    jwt_encode: EncodingKey,
    /// HS256 (the JWT secret), and one per algorithm a JWKS key may be pinned to.
    validation: Validation,
    asymmetric: Vec<(Algorithm, Validation)>,
    jwks: Option<Arc<Jwks>>,
    pub resume_keys: ResumeKeys,
    clock: Arc<dyn Clock>,
}

/// How connect tokens are verified besides the JWT secret.
#[derive(Default)]
pub struct TokenRules {
    /// RS256, ES256 and EdDSA keys (`--jwks-url`).
    pub jwks: Option<Arc<Jwks>>,
    /// The `iss` every connect token must carry.
    pub issuer: Option<String>,
    /// The `aud` every connect token must carry.
    pub audience: Option<String>,
    /// What time it is for `exp` and resume tokens; `None`: the system's time line.
    pub clock: Option<Arc<dyn Clock>>,
}

/// Why a connect token was refused.
enum Refusal {
    Expired,
    Invalid(&'static str),
}

/// The algorithms a JWKS key may be pinned to (`jwks::pin`).
/// Seconds a connect token is still accepted after its `exp` (clock skew with its issuer).
const LEEWAY_SEC: u64 = 5;

const ASYMMETRIC: [Algorithm; 3] = [Algorithm::RS256, Algorithm::ES256, Algorithm::EdDSA];

/// The token of an `Authorization: Bearer …` header.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, rest) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| rest.trim())
        .filter(|t| !t.is_empty())
}

impl Auth {
    pub fn new(s: &Secrets) -> Auth {
        Auth::with_rules(s, TokenRules::default())
    }

    pub fn with_rules(s: &Secrets, rules: TokenRules) -> Auth {
        let validation = |alg: Algorithm| {
            let mut v = Validation::new(alg);
            // `exp` is checked against our clock (`decode_connect`), not the library's.
            v.validate_exp = false;
            let mut required = vec!["exp", "sub"];
            if let Some(iss) = &rules.issuer {
                v.set_issuer(&[iss]);
                required.push("iss");
            }
            if let Some(aud) = &rules.audience {
                v.set_audience(&[aud]);
                required.push("aud");
            } else {
                v.validate_aud = false;
            }
            v.set_required_spec_claims(&required);
            v
        };
        Auth {
            api_key: s.api_key.as_bytes().into(),
            admin_token: s.admin_token.as_bytes().into(),
            jwt_decode: DecodingKey::from_secret(s.jwt_secret.as_bytes()),
            jwt_encode: EncodingKey::from_secret(s.jwt_secret.as_bytes()),
            validation: validation(Algorithm::HS256),
            asymmetric: ASYMMETRIC.iter().map(|a| (*a, validation(*a))).collect(),
            jwks: rules.jwks,
            resume_keys: s.resume_keys.clone(),
            clock: rules.clock.unwrap_or_else(SystemClock::shared),
        }
    }

    /// The JWKS keys, when `--jwks-url` is set.
    pub fn jwks(&self) -> Option<Arc<Jwks>> {
        self.jwks.clone()
    }

    /// Makes sure the key a connect token names is known before it is verified: a token
    /// signed with a JWKS key whose `kid` is not in the set read last causes one read of the
    /// set (at most every `--jwks-refresh-min-sec`). Nothing for HS256 tokens.
    pub async fn prepare(&self, token: &str) {
        let Some(jwks) = &self.jwks else { return };
        let Ok(h) = jsonwebtoken::decode_header(token) else {
            return;
        };
        if let (true, Some(kid)) = (ASYMMETRIC.contains(&h.alg), h.kid.as_deref())
            && kid.len() <= 256
        {
            jwks.get_or_read(kid).await;
        }
    }

    /// Compared in constant time over the key's bytes; only a presented value of another
    /// length is told apart at once (a key's length is no secret: `zerodrop` makes 43-byte
    /// keys). A connect token in `?token=`, hundreds of bytes long, is thus never hashed or
    /// scanned to learn that it is not the api key.
    fn matches(expected: &[u8], presented: Option<&str>) -> bool {
        let Some(p) = presented else { return false };
        bool::from(p.as_bytes().ct_eq(expected))
    }

    pub fn require_api_key(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        if Self::matches(&self.api_key, bearer(headers)) {
            Ok(())
        } else {
            Err(ApiError::unauthorized(
                "missing or wrong api key (Authorization: Bearer <key>)",
            ))
        }
    }

    pub fn is_api_key(&self, token: &str) -> bool {
        Self::matches(&self.api_key, Some(token))
    }

    /// A `?token=` parameter, which only ever carries a connect token (browsers cannot set
    /// headers on EventSource or WebSocket). The api key there is refused even though it is
    /// right: URLs land in access logs, proxies and browser history, so the key goes only in
    /// the `Authorization` header.
    pub fn query_token<'a>(&self, token: Option<&'a str>) -> Result<Option<&'a str>, ApiError> {
        match token {
            Some(t) if self.is_api_key(t) => Err(ApiError::unauthorized(
                "the api key is not accepted in the URL (?token=), where logs and browser \
                 history keep it: send it in the Authorization header (Authorization: Bearer \
                 <key>); ?token= takes connect tokens only",
            )),
            t => Ok(t),
        }
    }

    pub fn require_admin(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        if Self::matches(&self.admin_token, bearer(headers)) {
            Ok(())
        } else {
            Err(ApiError::unauthorized(
                "missing or wrong admin token (Authorization: Bearer <token>)",
            ))
        }
    }

    /// Verifies a connect token (call [`Auth::prepare`] first for JWKS keys to be current).
    pub fn verify_connect(&self, token: &str) -> Result<ConnectClaims, ApiError> {
        let claims = self.decode_connect(token).map_err(|r| match r {
            Refusal::Expired => ApiError::unauthorized("the connect token has expired"),
            Refusal::Invalid(why) => ApiError::unauthorized(format!("invalid connect token{why}")),
        })?;
        check_info(claims)
    }

    /// A connect token sent to refresh a live connection (`refresh`): an expired one is
    /// `TOKEN_EXPIRED` (the connection's own deadline still stands), anything else invalid
    /// `UNAUTHORIZED`. The library's leeway does not apply: it must not have expired at all.
    pub fn verify_refresh(&self, token: &str) -> Result<ConnectClaims, ApiError> {
        let expired = || {
            ApiError::new(
                ErrorCode::TokenExpired,
                "the new connect token has expired already",
            )
        };
        match self.decode_connect(token) {
            Ok(c) if self.lapsed(c.exp.saturating_mul(1000)) => Err(expired()),
            Ok(c) => check_info(c),
            Err(Refusal::Expired) => Err(expired()),
            Err(Refusal::Invalid(why)) => Err(ApiError::unauthorized(format!(
                "invalid connect token{why}"
            ))),
        }
    }

    /// The claims, or why the token is refused. The key follows the token's `alg`: HS256 is
    /// the JWT secret's, anything else must name (`kid`) a JWKS key pinned to that very
    /// algorithm; no other algorithm is accepted.
    fn decode_connect(&self, token: &str) -> Result<ConnectClaims, Refusal> {
        use jsonwebtoken::errors::ErrorKind;
        let decoded = match &self.jwks {
            // Without JWKS only HS256 verifies, and `jsonwebtoken` reads the header itself:
            // no read of our own first. A token of another alg is read again below, to say
            // why it is refused.
            None => match jsonwebtoken::decode(token, &self.jwt_decode, &self.validation) {
                Err(e) if *e.kind() == ErrorKind::InvalidAlgorithm => self.decode_by_alg(token)?,
                decoded => decoded,
            },
            Some(_) => self.decode_by_alg(token)?,
        };
        let claims = decoded.map(|d| d.claims).map_err(|e| match e.kind() {
            ErrorKind::ExpiredSignature => Refusal::Expired,
            ErrorKind::InvalidIssuer => Refusal::Invalid(": wrong iss"),
            ErrorKind::InvalidAudience => Refusal::Invalid(": wrong aud"),
            _ => Refusal::Invalid(""),
        })?;
        if self.lapsed(claims.exp.saturating_add(LEEWAY_SEC).saturating_mul(1000)) {
            return Err(Refusal::Expired);
        }
        Ok(claims)
    }

    /// The token decoded with the key and rules its header's `alg` selects, or why no key
    /// may verify it.
    fn decode_by_alg(
        &self,
        token: &str,
    ) -> Result<jsonwebtoken::errors::Result<TokenData<ConnectClaims>>, Refusal> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| Refusal::Invalid(""))?;
        if header.alg == Algorithm::HS256 {
            return Ok(jsonwebtoken::decode(
                token,
                &self.jwt_decode,
                &self.validation,
            ));
        }
        let (_, validation) = self
            .asymmetric
            .iter()
            .find(|(a, _)| *a == header.alg)
            .ok_or(Refusal::Invalid(": unsupported alg"))?;
        let jwks = self
            .jwks
            .as_ref()
            .ok_or(Refusal::Invalid(": no JWKS is configured for this alg"))?;
        let kid = header.kid.as_deref().ok_or(Refusal::Invalid(": no kid"))?;
        let pinned = jwks.get(kid).ok_or(Refusal::Invalid(": unknown kid"))?;
        if pinned.alg != header.alg {
            return Err(Refusal::Invalid(": the key is for another alg"));
        }
        Ok(jsonwebtoken::decode(token, &pinned.key, validation))
    }

    /// Whether a wall-clock instant set by a token's issuer (ms) has passed: a forward jump of
    /// the system clock brings it sooner, a backward one never later (`zerodrop_core::clock`).
    fn lapsed(&self, wall_ms: u64) -> bool {
        self.clock.wall_deadline(wall_ms) <= self.clock.now_ms()
    }

    pub fn mint_connect(&self, claims: &ConnectClaims) -> String {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &self.jwt_encode)
            .unwrap_or_default()
    }

    /// Verifies a resume token; `for_session` must match when the route names a session.
    pub fn verify_resume(
        &self,
        token: &str,
        for_session: Option<&SessionId>,
    ) -> Result<ResumeClaims, ApiError> {
        // Resume tokens are ours: their `exp` is on our clock's time line, like the window.
        let now = self.clock.now_ms() / 1000;
        let claims = self.resume_keys.verify(token, now).map_err(|e| match e {
            TokenError::Invalid(_) => ApiError::new(
                ErrorCode::InvalidResumeToken,
                "invalid resume token; start a new session",
            ),
            TokenError::Expired => ApiError::new(
                ErrorCode::ReconnectWindowExpired,
                "the reconnect window has passed; start a new session and resync",
            ),
        })?;
        if let Some(sid) = for_session
            && *sid != claims.sid
        {
            return Err(ApiError::new(
                ErrorCode::InvalidResumeToken,
                "the resume token belongs to another session",
            ));
        }
        Ok(claims)
    }

    /// A resume token for `sid` expiring at `exp` (Unix seconds) and carrying the session's
    /// authority `aexp` (its newest connect token's `exp`).
    pub fn mint_resume(&self, sid: &SessionId, sub: &str, exp: u64, aexp: Option<u64>) -> String {
        let now = self.clock.now_ms() / 1000;
        let jti = hex::encode(zerodrop_core::random_bytes::<8>());
        self.resume_keys.sign(&ResumeClaims {
            sid: sid.clone(),
            sub: sub.to_string(),
            iat: now,
            exp,
            jti: Some(jti),
            aexp,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> Auth {
        Auth::new(&Secrets {
            api_key: "a".repeat(32),
            admin_token: "b".repeat(32),
            jwt_secret: "c".repeat(32),
            resume_keys: ResumeKeys::parse("k1:0123456789abcdef0123").unwrap(),
        })
    }

    fn headers(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, v.parse().unwrap());
        h
    }

    #[test]
    fn api_and_admin_keys() {
        let a = auth();
        assert!(
            a.require_api_key(&headers(&format!("Bearer {}", "a".repeat(32))))
                .is_ok()
        );
        assert!(
            a.require_api_key(&headers(&format!("bearer {}", "a".repeat(32))))
                .is_ok()
        );
        assert!(a.require_api_key(&headers("Bearer aaaa")).is_err());
        assert!(a.require_api_key(&HeaderMap::new()).is_err());
        assert!(
            a.require_admin(&headers(&format!("Bearer {}", "a".repeat(32))))
                .is_err()
        );
        assert!(
            a.require_admin(&headers(&format!("Bearer {}", "b".repeat(32))))
                .is_ok()
        );
    }

    #[test]
    fn connect_tokens() {
        let a = auth();
        let now = zerodrop_core::now_ms() / 1000;
        let c = ConnectClaims {
            sub: "u1".into(),
            iat: Some(zerodrop_core::now_ms() / 1000),
            exp: now + 60,
            streams: vec!["room:*".into()],
            publish: None,
            upstreams: vec!["app".into(), "pay*".into()],
            info: None,
        };
        let t = a.mint_connect(&c);
        assert_eq!(a.verify_connect(&t).unwrap(), c);
        let expired = a.mint_connect(&ConnectClaims {
            exp: now - 120,
            ..c.clone()
        });
        assert_eq!(
            a.verify_connect(&expired).unwrap_err().message,
            "the connect token has expired"
        );
        assert!(a.verify_connect("nonsense").is_err());
        let mut other = auth();
        other.jwt_decode = DecodingKey::from_secret(b"another secret entirely");
        assert!(other.verify_connect(&t).is_err());
        assert!(c.may_call_upstream("app") && c.may_call_upstream("payments"));
        assert!(!c.may_call_upstream("apps") && !c.may_call_upstream("billing"));
        let none = ConnectClaims {
            upstreams: vec![],
            ..c
        };
        assert!(!none.may_call_upstream("app"), "no grant by default");
        assert!(
            !a.mint_connect(&none).is_empty()
                && a.verify_connect(&a.mint_connect(&none))
                    .unwrap()
                    .upstreams
                    .is_empty()
        );
    }

    #[test]
    fn the_api_key_is_refused_in_the_query() {
        let a = auth();
        let e = a.query_token(Some(&"a".repeat(32))).unwrap_err();
        assert_eq!(e.code, ErrorCode::Unauthorized);
        assert!(e.message.contains("Authorization header"), "{}", e.message);
        assert_eq!(a.query_token(Some("jwt")).unwrap(), Some("jwt"));
        assert_eq!(a.query_token(None).unwrap(), None);
    }

    #[test]
    fn resume_tokens_bind_to_their_session() {
        let a = auth();
        let sid = SessionId::generate();
        let exp = zerodrop_core::now_ms() / 1000 + 60;
        let t = a.mint_resume(&sid, "u1", exp, Some(exp));
        assert_eq!(a.verify_resume(&t, Some(&sid)).unwrap().sid, sid);
        let e = a
            .verify_resume(&t, Some(&SessionId::generate()))
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidResumeToken);
        assert_ne!(
            a.mint_resume(&sid, "u1", exp, Some(exp)),
            t,
            "tokens carry a random jti"
        );
    }
}
