//! The client side of TLS: a pool's rustls config for re-encrypting to its backends, built at
//! each publish. Resumption is rustls' in-memory session cache, one per pool config, which all
//! workers share (a reconnecting worker resumes a session another one started).

use super::{pem_chain, pem_key, provider};
use crate::config::PoolTlsConfig;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::sync::{Arc, OnceLock};

/// What a pool needs to open TLS connections to its backends.
pub struct PoolTls {
    pub connector: tokio_rustls::TlsConnector,
    /// The name sent and verified when the config gives one.
    pub sni: Option<ServerName<'static>>,
    /// Tells this config's connections apart from other pools' to the same address (another
    /// client certificate, other roots): a parked connection is only reused by its own.
    pub id: u64,
}

/// The system's trusted roots, read once (rustls-native-certs: /etc/ssl/certs and friends).
fn system_roots() -> Arc<RootCertStore> {
    static ROOTS: OnceLock<Arc<RootCertStore>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let mut roots = RootCertStore::empty();
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
            Arc::new(roots)
        })
        .clone()
}

pub fn build(cfg: &PoolTlsConfig, alpn: &[&[u8]]) -> Result<PoolTls, String> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = if cfg.verify {
        let roots = match &cfg.ca_pem {
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                for cert in pem_chain(ca).map_err(|e| format!("ca: {e}"))? {
                    roots.add(cert).map_err(|e| format!("ca: {e}"))?;
                }
                Arc::new(roots)
            }
            None => system_roots(),
        };
        builder.with_root_certificates(roots)
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
    };
    let mut config = match (&cfg.cert_pem, &cfg.key_pem) {
        (Some(cert), Some(key)) => {
            let chain = pem_chain(cert).map_err(|e| format!("cert: {e}"))?;
            let key = pem_key(key).map_err(|e| format!("key: {e}"))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("cert: {e}"))?
        }
        _ => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let sni = match &cfg.sni {
        Some(name) => {
            Some(ServerName::try_from(name.clone()).map_err(|e| format!("sni: {name:?}: {e}"))?)
        }
        None => None,
    };
    Ok(PoolTls {
        connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
        sni,
        id: fastrand::u64(1..),
    })
}

/// `verify = false`: any certificate is accepted, but the handshake's signatures are still
/// checked (the session is encrypted, just not authenticated).
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
