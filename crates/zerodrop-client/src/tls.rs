//! TLS for `https://` and `wss://` (cargo feature `tls`, on by default): rustls with the
//! aws-lc-rs crypto provider.
//!
//! A [`Tls`] value is one rustls client configuration shared by every transport: the HTTP
//! calls and SSE bodies of an [`HttpClient`](crate::HttpClient) and the WebSocket of a
//! [`WsConnection`](crate::WsConnection) trust exactly the same roots. Those are the
//! system's roots (what `rustls-platform-verifier` loads: the OS store on Linux, the platform
//! verifier on macOS and Windows), plus any CA certificates added with [`Tls::with_ca_pem`] /
//! [`Tls::with_ca_file`], for deployments behind a private or self-signed CA.
//!
//! Constructors without a `Tls` argument (`HttpClient::new`, `WsConnection::connect`) use
//! the process default: [`Tls::system`] unless [`Tls::install_default`] set another one.
//! Plain `http://` and `ws://` never touch any of this.

use std::fmt;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use rustls::ClientConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use crate::error::ClientError;

/// The trust configuration for `https://` and `wss://` connections.
#[derive(Clone)]
pub struct Tls {
    config: Arc<ClientConfig>,
    extra_roots: usize,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls")
            .field("extra_roots", &self.extra_roots)
            .finish_non_exhaustive()
    }
}

static DEFAULT: OnceLock<Tls> = OnceLock::new();

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn build(extra: Vec<CertificateDer<'static>>) -> Result<ClientConfig, rustls::Error> {
    let provider = provider();
    let verifier = if extra.is_empty() {
        rustls_platform_verifier::Verifier::new(provider.clone())?
    } else {
        rustls_platform_verifier::Verifier::new_with_extra_roots(extra, provider.clone())?
    };
    Ok(ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth())
}

impl Tls {
    /// The system's trust roots. On a host without any CA certificates every `https://`
    /// connection fails its handshake (unknown issuer); `http://` is unaffected.
    pub fn system() -> Tls {
        let config = build(Vec::new()).unwrap_or_else(|_| {
            ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .expect("aws-lc-rs supports the default protocol versions")
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth()
        });
        Tls {
            config: Arc::new(config),
            extra_roots: 0,
        }
    }

    /// The system's roots plus every certificate in `pem` (one or more
    /// `-----BEGIN CERTIFICATE-----` blocks).
    pub fn with_ca_pem(pem: &[u8]) -> Result<Tls, ClientError> {
        let certs = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ClientError::Tls(format!("CA certificate PEM: {e}")))?;
        if certs.is_empty() {
            return Err(ClientError::Tls(
                "CA certificate PEM: no CERTIFICATE block".into(),
            ));
        }
        let extra_roots = certs.len();
        let config = build(certs).map_err(|e| ClientError::Tls(format!("CA certificate: {e}")))?;
        Ok(Tls {
            config: Arc::new(config),
            extra_roots,
        })
    }

    /// [`Tls::with_ca_pem`] with the contents of a PEM file.
    pub fn with_ca_file(path: impl AsRef<Path>) -> Result<Tls, ClientError> {
        let path = path.as_ref();
        let pem = std::fs::read(path)
            .map_err(|e| ClientError::Tls(format!("CA file {}: {e}", path.display())))?;
        Self::with_ca_pem(&pem).map_err(|e| match e {
            ClientError::Tls(m) => ClientError::Tls(format!("{}: {m}", path.display())),
            other => other,
        })
    }

    /// Makes `self` the process default, used by the constructors that take no `Tls`.
    /// Fails (handing `self` back) once the default was installed or first used.
    pub fn install_default(self) -> Result<(), Tls> {
        DEFAULT.set(self)
    }

    /// The process default (see [`Tls::install_default`]).
    pub fn current() -> &'static Tls {
        DEFAULT.get_or_init(Tls::system)
    }

    /// How many CA certificates were added on top of the system's roots.
    pub fn extra_roots(&self) -> usize {
        self.extra_roots
    }

    pub(crate) fn client_config(&self) -> Arc<ClientConfig> {
        self.config.clone()
    }
}

/// The rustls error behind a failed connection, if it was a TLS failure.
pub(crate) fn tls_cause(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    for _ in 0..16 {
        let err = cur?;
        if let Some(t) = err.downcast_ref::<rustls::Error>() {
            return Some(t.to_string());
        }
        // An `io::Error`'s `source()` skips the error it wraps: descend into that one.
        cur = match err.downcast_ref::<std::io::Error>() {
            Some(io) => io
                .get_ref()
                .map(|inner| inner as &(dyn std::error::Error + 'static)),
            None => err.source(),
        };
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_ca_input_is_a_tls_error() {
        let e = Tls::with_ca_pem(b"not a certificate").unwrap_err();
        assert!(matches!(e, ClientError::Tls(_)), "{e:?}");
        let e = Tls::with_ca_file("/nonexistent/zerodrop-ca.pem").unwrap_err();
        assert!(
            matches!(&e, ClientError::Tls(m) if m.contains("/nonexistent/zerodrop-ca.pem")),
            "{e:?}"
        );
        assert_eq!(Tls::system().extra_roots(), 0);
    }
}
