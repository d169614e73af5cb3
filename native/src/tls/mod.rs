//! TLS with rustls: listener (server) configs with certificates by SNI, client-certificate
//! verification and shared ticket keys; pool (client) configs for re-encryption; the ClientHello
//! peek for SNI passthrough.

pub mod client;
pub mod client_hello;
pub mod server;
pub mod tickets;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::sync::{Arc, OnceLock};

/// The crypto provider: aws-lc-rs, chosen by measuring handshakes (bench/tls_provider/README.md:
/// 20-31% less server CPU per handshake than ring, the same per GB, and the only one with the
/// X25519MLKEM768 key exchange browsers offer first). Post-quantum is preferred when a client
/// offers it (rustls' `prefer-post-quantum`), at ~1.7x the CPU of an X25519 handshake.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .clone()
}

/// Every certificate of a PEM text, in order.
pub fn pem_chain(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let chain = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("bad PEM: {e}"))?;
    if chain.is_empty() {
        return Err("no certificate in it".into());
    }
    Ok(chain)
}

/// The private key of a PEM text (PKCS#8, SEC1 or PKCS#1).
pub fn pem_key(pem: &str) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| format!("bad PEM key: {e}"))
}

/// How a handshake ended: `fastlb_tls_handshakes_total{result}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeResult {
    /// A full handshake.
    Ok,
    /// Resumed from a ticket or a session id.
    Resumed,
    /// Not finished within `timeouts.header_read`.
    Timeout,
    /// Client certificate missing or refused.
    ClientCert,
    /// No version, cipher or ALPN protocol in common.
    Protocol,
    /// Not TLS, a closed or reset connection, or anything else.
    Error,
}

impl HandshakeResult {
    pub const ALL: [HandshakeResult; 6] = [
        HandshakeResult::Ok,
        HandshakeResult::Resumed,
        HandshakeResult::Timeout,
        HandshakeResult::ClientCert,
        HandshakeResult::Protocol,
        HandshakeResult::Error,
    ];

    pub fn name(self) -> &'static str {
        match self {
            HandshakeResult::Ok => "ok",
            HandshakeResult::Resumed => "resumed",
            HandshakeResult::Timeout => "timeout",
            HandshakeResult::ClientCert => "client_cert",
            HandshakeResult::Protocol => "protocol",
            HandshakeResult::Error => "error",
        }
    }

    /// Classifies a failed handshake by its error.
    pub fn of_error(e: &std::io::Error) -> Self {
        use rustls::Error as E;
        let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<E>()) else {
            return HandshakeResult::Error;
        };
        match tls {
            E::NoCertificatesPresented | E::InvalidCertificate(_) => HandshakeResult::ClientCert,
            E::PeerIncompatible(_) | E::NoApplicationProtocol => HandshakeResult::Protocol,
            _ => HandshakeResult::Error,
        }
    }
}

/// TLS versions as the metric's `version` label has them; index 0: none negotiated.
pub const VERSIONS: [&str; 3] = ["unknown", "1.2", "1.3"];

pub fn version_index(v: Option<rustls::ProtocolVersion>) -> usize {
    match v {
        Some(rustls::ProtocolVersion::TLSv1_2) => 1,
        Some(rustls::ProtocolVersion::TLSv1_3) => 2,
        _ => 0,
    }
}

/// What a request's TLS session says, for headers and the access log.
#[derive(Debug, Default)]
pub struct SessionInfo {
    pub version: &'static str,
    pub cipher: &'static str,
    pub sni: Option<String>,
    pub alpn: Option<String>,
    /// The client certificate's subject (RFC 4514) and SHA-256 fingerprint (hex).
    pub client_subject: Option<String>,
    pub client_fingerprint: Option<String>,
}

impl SessionInfo {
    pub fn of(conn: &rustls::ServerConnection) -> Self {
        let leaf = conn.peer_certificates().and_then(|c| c.first());
        SessionInfo {
            version: VERSIONS[version_index(conn.protocol_version())],
            cipher: conn
                .negotiated_cipher_suite()
                .and_then(|s| s.suite().as_str())
                .unwrap_or(""),
            sni: conn.server_name().map(str::to_string),
            alpn: conn
                .alpn_protocol()
                .map(|p| String::from_utf8_lossy(p).into_owned()),
            client_subject: leaf.map(|c| subject(c.as_ref())),
            client_fingerprint: leaf.map(|c| {
                hex(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, c.as_ref()).as_ref())
            }),
        }
    }

    /// What a PROXY v2 header to a `send_proxy` backend says of this session.
    pub fn proxy_tlvs(&self) -> crate::net::proxy_header::TlsTlvs<'_> {
        crate::net::proxy_header::TlsTlvs {
            alpn: self.alpn.as_deref().map(str::as_bytes),
            authority: self.sni.as_deref(),
            version: match self.version {
                "1.3" => "TLSv1.3",
                "1.2" => "TLSv1.2",
                _ => "",
            },
            cipher: self.cipher,
            client_cert: self.client_subject.is_some(),
            client_cn: self.client_subject.as_deref().and_then(common_name),
        }
    }

    /// The access log's TLS fields.
    pub fn log_fields(&self, line: &mut crate::accesslog::Line) {
        line.str("tls_version", self.version.as_bytes())
            .str("tls_cipher", self.cipher.as_bytes())
            .opt_str("sni", self.sni.as_deref().map(str::as_bytes))
            .opt_str("alpn", self.alpn.as_deref().map(str::as_bytes))
            .opt_str(
                "client_cert_subject",
                self.client_subject.as_deref().map(str::as_bytes),
            );
    }
}

/// A certificate's subject as RFC 4514 text (`CN=alice,O=Example`: the last RDN first, as
/// OpenSSL's RFC 2253 form and nginx's `$ssl_client_s_dn` have it).
fn subject(der: &[u8]) -> String {
    use x509_parser::objects::{oid2abbrev, oid_registry};
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return String::new();
    };
    let mut out = String::new();
    let rdns: Vec<_> = cert.subject().iter_rdn().collect();
    for rdn in rdns.into_iter().rev() {
        for (k, attr) in rdn.iter().enumerate() {
            out.push_str(match (k, out.is_empty()) {
                (0, true) => "",
                (0, false) => ",",
                _ => "+",
            });
            match oid2abbrev(attr.attr_type(), oid_registry()) {
                Ok(name) => out.push_str(name),
                Err(_) => out.push_str(&attr.attr_type().to_id_string()),
            }
            out.push('=');
            match attr.as_str() {
                Ok(v) => escape_rfc4514(&mut out, v),
                // Not a string type: the DER as `#hex` (RFC 4514 2.4).
                Err(_) => {
                    out.push('#');
                    out.push_str(&hex(attr.attr_value().data));
                }
            }
        }
    }
    out
}

fn escape_rfc4514(out: &mut String, value: &str) {
    let last = value.chars().count().saturating_sub(1);
    for (i, c) in value.chars().enumerate() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';')
            || (i == 0 && matches!(c, '#' | ' '))
            || (i == last && c == ' ');
        if special {
            out.push('\\');
        }
        out.push(c);
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The CN of an RFC 4514 subject ("CN=alice,O=Example" -> "alice"); none when it has none or
/// it holds an escaped character (the TLV carries it raw: better none than a wrong one).
fn common_name(subject: &str) -> Option<&str> {
    let cn = subject
        .split(',')
        .find_map(|rdn| rdn.trim().strip_prefix("CN="))?;
    (!cn.contains('\\') && !cn.is_empty()).then_some(cn)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_common_name_of_a_subject() {
        assert_eq!(common_name("CN=alice,O=Example"), Some("alice"));
        assert_eq!(common_name("O=Example,CN=bob"), Some("bob"));
        assert_eq!(common_name("O=Example"), None);
        assert_eq!(common_name("CN=a\\,b,O=x"), None);
    }

    #[test]
    fn subject_values_are_escaped_as_rfc_4514_says() {
        let escaped = |v: &str| {
            let mut out = String::new();
            escape_rfc4514(&mut out, v);
            out
        };
        assert_eq!(escaped("alice"), "alice");
        assert_eq!(escaped("Doe, John"), "Doe\\, John");
        assert_eq!(escaped("a+b;c<d>e\"f\\g"), "a\\+b\\;c\\<d\\>e\\\"f\\\\g");
        // '#' and a space only at the start; a space at the end too.
        assert_eq!(escaped("#1 x #2 "), "\\#1 x #2\\ ");
        assert_eq!(escaped(" lead"), "\\ lead");
    }
}
