//! Public keys for asymmetric connect tokens (SPEC §9): RS256, ES256 and EdDSA, from a JWKS
//! document at a URL or in a file.
//!
//! Every key is pinned to one algorithm when it is read: its `alg`, or else the one its type
//! allows (RSA → RS256, EC P-256 → ES256, OKP Ed25519 → EdDSA). A token is verified only
//! with a key pinned to the token's own `alg`; HS256 never reaches this module (the JWT
//! secret verifies it), so a public key can never be used as an HMAC secret. Keys without a
//! `kid`, for encryption, of another type or curve, or `oct` (shared secrets) are skipped.
//!
//! The set is read at start, every [`PERIOD`] (so a removed key stops working), and on a token
//! whose `kid` is unknown — at most once per `--jwks-refresh-min-sec`, so a flood of made-up
//! `kid`s costs one read per period. A read is bounded in size ([`MAX_BYTES`]), time
//! ([`TIMEOUT`]) and keys ([`MAX_KEYS`]); a failed read keeps the keys last read.
//!
//! Must not: log a token.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use jsonwebtoken::jwk::{
    AlgorithmParameters, EllipticCurve, Jwk, JwkSet, KeyAlgorithm, PublicKeyUse,
};
use jsonwebtoken::{Algorithm, DecodingKey};

/// How often the set is read again anyway.
pub const PERIOD: Duration = Duration::from_secs(300);
/// The largest JWKS document read.
pub const MAX_BYTES: usize = 256 * 1024;
/// The most keys kept from one document.
pub const MAX_KEYS: usize = 100;
/// How long one read may take.
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// A key and the one algorithm it verifies.
#[derive(Clone)]
pub struct Pinned {
    pub alg: Algorithm,
    pub key: DecodingKey,
}

enum Source {
    Url(String),
    File(PathBuf),
}

pub struct Jwks {
    source: Source,
    keys: RwLock<Arc<HashMap<String, Pinned>>>,
    /// When the last read (successful or not) started.
    last_read: Mutex<Option<Instant>>,
    min_gap: Duration,
    /// One read at a time: tokens with unknown `kid`s that arrive together wait for it.
    reading: tokio::sync::Mutex<()>,
    http: reqwest::Client,
}

/// The algorithm a JWK verifies, or `None` when it is not a signing key zerodrop uses.
pub fn pin(jwk: &Jwk) -> Option<Algorithm> {
    if matches!(
        jwk.common.public_key_use,
        Some(PublicKeyUse::Encryption | PublicKeyUse::Other(_))
    ) {
        return None;
    }
    let declared = jwk.common.key_algorithm;
    match &jwk.algorithm {
        AlgorithmParameters::RSA(_) if matches!(declared, None | Some(KeyAlgorithm::RS256)) => {
            Some(Algorithm::RS256)
        }
        AlgorithmParameters::EllipticCurve(p)
            if p.curve == EllipticCurve::P256
                && matches!(declared, None | Some(KeyAlgorithm::ES256)) =>
        {
            Some(Algorithm::ES256)
        }
        AlgorithmParameters::OctetKeyPair(p)
            if p.curve == EllipticCurve::Ed25519
                && matches!(declared, None | Some(KeyAlgorithm::EdDSA)) =>
        {
            Some(Algorithm::EdDSA)
        }
        _ => None,
    }
}

/// The keys of a JWKS document, each pinned to its algorithm, by `kid`.
pub fn parse(doc: &[u8]) -> anyhow::Result<HashMap<String, Pinned>> {
    let set: JwkSet =
        serde_json::from_slice(doc).context("not a JWKS document ({\"keys\":[…]})")?;
    let mut keys = HashMap::new();
    for jwk in &set.keys {
        let (Some(kid), Some(alg)) = (jwk.common.key_id.as_ref(), pin(jwk)) else {
            continue;
        };
        let Ok(key) = DecodingKey::from_jwk(jwk) else {
            continue;
        };
        if keys.len() >= MAX_KEYS {
            tracing::warn!(
                max = MAX_KEYS,
                "the JWKS has more keys than are kept; the rest are skipped"
            );
            break;
        }
        keys.insert(kid.clone(), Pinned { alg, key });
    }
    Ok(keys)
}

impl Jwks {
    /// Reads the set once; a source that cannot be read refuses the start.
    pub async fn open(url: &str, min_gap: Duration) -> anyhow::Result<Jwks> {
        let source = if url.starts_with("https://") || url.starts_with("http://") {
            Source::Url(url.to_string())
        } else {
            Source::File(PathBuf::from(url.strip_prefix("file://").unwrap_or(url)))
        };
        let jwks = Jwks {
            source,
            keys: RwLock::new(Arc::new(HashMap::new())),
            last_read: Mutex::new(None),
            min_gap,
            reading: tokio::sync::Mutex::new(()),
            http: reqwest::Client::builder().timeout(TIMEOUT).build()?,
        };
        let n = jwks
            .read()
            .await
            .with_context(|| format!("cannot read the JWKS at {url}"))?;
        tracing::info!(keys = n, "JWKS read");
        Ok(jwks)
    }

    /// The key for `kid` as last read.
    pub fn get(&self, kid: &str) -> Option<Pinned> {
        self.keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(kid)
            .cloned()
    }

    /// The key for `kid`, reading the set again first when the key is unknown and the last
    /// read is at least `--jwks-refresh-min-sec` old.
    pub async fn get_or_read(&self, kid: &str) -> Option<Pinned> {
        if let Some(k) = self.get(kid) {
            return Some(k);
        }
        let _one = self.reading.lock().await;
        if let Some(k) = self.get(kid) {
            return Some(k); // read by the token that held the lock
        }
        if self.since_last_read().is_some_and(|d| d < self.min_gap) {
            return None;
        }
        if let Err(e) = self.read().await {
            tracing::warn!(error = %format!("{e:#}"), "could not read the JWKS; keeping the keys last read");
        }
        self.get(kid)
    }

    /// Reads the set again if [`PERIOD`] has passed since the last read (the periodic task).
    pub async fn read_if_stale(&self) {
        if self.since_last_read().is_some_and(|d| d < PERIOD) {
            return;
        }
        let _one = self.reading.lock().await;
        if let Err(e) = self.read().await {
            tracing::warn!(error = %format!("{e:#}"), "could not read the JWKS; keeping the keys last read");
        }
    }

    fn since_last_read(&self) -> Option<Duration> {
        self.last_read
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map(|t| t.elapsed())
    }

    /// Reads the set; answers how many keys it kept.
    async fn read(&self) -> anyhow::Result<usize> {
        *self.last_read.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        let doc = match &self.source {
            Source::File(path) => {
                let path = path.clone();
                let read = tokio::task::spawn_blocking(move || std::fs::read(&path));
                let bytes = tokio::time::timeout(TIMEOUT, read)
                    .await
                    .context("timed out")??
                    .context("cannot read the file")?;
                if bytes.len() > MAX_BYTES {
                    bail!("the JWKS is larger than {MAX_BYTES} bytes");
                }
                bytes
            }
            Source::Url(url) => {
                let mut res = self.http.get(url).send().await?.error_for_status()?;
                let mut body = Vec::new();
                while let Some(chunk) = res.chunk().await? {
                    if body.len() + chunk.len() > MAX_BYTES {
                        bail!("the JWKS is larger than {MAX_BYTES} bytes");
                    }
                    body.extend_from_slice(&chunk);
                }
                body
            }
        };
        let keys = parse(&doc)?;
        let n = keys.len();
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(keys);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_pinned_by_alg_or_type_and_others_skipped() {
        let doc = serde_json::json!({"keys": [
            // Ed25519 by type; the same key declared for another algorithm is skipped.
            {"kty":"OKP","crv":"Ed25519","kid":"ed","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},
            {"kty":"OKP","crv":"Ed25519","kid":"ed-as-es","alg":"ES256","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},
            // A shared secret in a JWKS is never a key here.
            {"kty":"oct","kid":"hs","k":"c2VjcmV0","alg":"HS256"},
            // No kid, or an encryption key.
            {"kty":"OKP","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},
            {"kty":"OKP","crv":"Ed25519","kid":"enc","use":"enc","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},
            // RSA by type, and declared RS256.
            {"kty":"RSA","kid":"rsa","n":"sXchDaQebHnPiGvyDOAT4saGEUetSyo9MKLOoWFsueri23bOdgWp4Dy1WlUzewbgBHod5pcM9H95GQRV3JDXboIRROSBigeC5yjU1hGzHHyXss8UDprecbAYxknTcQkhslANGRUZmdTOQ5qTRsLAt6BTYuyvVRdhS8exSZEy_c4gs_7svlJJQ4H9_NxsiIoLwAEk7-Q3UXERGYw_75IDrGA84-lA_-Ct4eTlXHBIY2EaV7t7LjJaynVJCpkv4LKjTTAumiGUIuQhrNhZLuF_RJLqHpM2kgWFLU7-VTdL1VbC2tejvcI2BlMkEpk1BzBZI0KQB0GaDWFLN-aEAw3vRw","e":"AQAB"},
            {"kty":"RSA","kid":"rsa-rs256","alg":"RS256","n":"sXchDaQebHnPiGvyDOAT4saGEUetSyo9MKLOoWFsueri23bOdgWp4Dy1WlUzewbgBHod5pcM9H95GQRV3JDXboIRROSBigeC5yjU1hGzHHyXss8UDprecbAYxknTcQkhslANGRUZmdTOQ5qTRsLAt6BTYuyvVRdhS8exSZEy_c4gs_7svlJJQ4H9_NxsiIoLwAEk7-Q3UXERGYw_75IDrGA84-lA_-Ct4eTlXHBIY2EaV7t7LjJaynVJCpkv4LKjTTAumiGUIuQhrNhZLuF_RJLqHpM2kgWFLU7-VTdL1VbC2tejvcI2BlMkEpk1BzBZI0KQB0GaDWFLN-aEAw3vRw","e":"AQAB"},
            {"kty":"RSA","kid":"rsa-ps","alg":"PS256","n":"sXch","e":"AQAB"},
        ]});
        let keys = parse(doc.to_string().as_bytes()).unwrap();
        let mut kids: Vec<(&str, Algorithm)> =
            keys.iter().map(|(k, p)| (k.as_str(), p.alg)).collect();
        kids.sort_by_key(|(k, _)| *k);
        assert_eq!(
            kids,
            vec![
                ("ed", Algorithm::EdDSA),
                ("rsa", Algorithm::RS256),
                ("rsa-rs256", Algorithm::RS256)
            ]
        );
        assert!(parse(b"[]").is_err() && parse(b"{").is_err());
    }
}
