//! The server side of TLS: a listener's rustls config, built at each publish from the PEM text
//! the control plane read, and the handshake a worker runs on each accepted connection.
//!
//! What must outlive a reload lives in `TlsShared`, made once per process: the ticket keys
//! (see tls::tickets; shared by every worker and every listener, so a ticket issued by one
//! worker resumes on any other, before and after a reload or a binary upgrade) and the TLS 1.2
//! session cache. Certificates are per publish: new handshakes use the newest, open connections keep
//! the session they have.

use super::tickets::TicketKeys;
use super::{pem_chain, pem_key, provider, HandshakeResult};
use crate::config::{ClientAuth, ListenerTlsConfig, TlsVersion};
use rustls::server::{
    ClientHello, NoServerSessionStorage, ProducesTickets, ResolvesServerCert,
    ServerSessionMemoryCache, StoresServerSessions, WebPkiClientVerifier,
};
use rustls::sign::CertifiedKey;
use rustls::{HandshakeKind, RootCertStore, ServerConfig, ServerConnection};
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

/// TLS 1.2 sessions remembered by id, process-wide.
const SESSION_CACHE_SIZE: usize = 20_000;

/// Process-wide TLS state that survives reloads.
pub struct TlsShared {
    tickets: Arc<TicketKeys>,
    ticketer: Arc<dyn ProducesTickets>,
    sessions: Arc<dyn StoresServerSessions>,
}

impl TlsShared {
    /// Fresh ticket keys, or those a previous process exported (a binary upgrade).
    pub fn new(ticket_keys: Option<&[u8]>) -> Result<Self, String> {
        let tickets = Arc::new(match ticket_keys {
            Some(bytes) => TicketKeys::import(bytes)?,
            None => TicketKeys::new()?,
        });
        Ok(TlsShared {
            ticketer: tickets.clone(),
            tickets,
            sessions: ServerSessionMemoryCache::new(SESSION_CACHE_SIZE),
        })
    }

    /// The ticket keys, for the process that takes over at a binary upgrade.
    pub fn export_ticket_keys(&self) -> Vec<u8> {
        self.tickets.export()
    }
}

/// Certificates by the names they are for: exact names first, then `*.parent` wildcards (one
/// label), else the first certificate of the list.
struct CertStore {
    exact: HashMap<String, Arc<CertifiedKey>>,
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Arc<CertifiedKey>,
}

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertStore")
            .field("exact", &self.exact.keys())
            .field("wildcard", &self.wildcard.keys())
            .finish()
    }
}

impl CertStore {
    fn find(&self, sni: Option<&str>) -> &Arc<CertifiedKey> {
        let Some(name) = sni else {
            return &self.default;
        };
        // rustls hands over the SNI lower-cased and validated as a DNS name.
        if let Some(c) = self.exact.get(name) {
            return c;
        }
        name.split_once('.')
            .and_then(|(_, parent)| self.wildcard.get(parent))
            .unwrap_or(&self.default)
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.find(hello.server_name()).clone())
    }
}

/// Builds a listener's rustls config; errors name the certificate they are about.
pub fn build(
    cfg: &ListenerTlsConfig,
    shared: &TlsShared,
    supported_alpn: Option<&[&str]>,
) -> Result<Arc<ServerConfig>, String> {
    let provider = provider();
    let mut exact = HashMap::new();
    let mut wildcard = HashMap::new();
    let mut default = None;
    for c in &cfg.certificates {
        let chain = pem_chain(&c.chain_pem).map_err(|e| format!("{}: {e}", c.cert))?;
        let key = pem_key(&c.key_pem).map_err(|e| format!("{}: key: {e}", c.cert))?;
        let certified = CertifiedKey::from_der(chain, key, &provider)
            .map_err(|e| format!("{}: {e}", c.cert))?;
        let certified = Arc::new(certified);
        for name in &c.names {
            match name.strip_prefix("*.") {
                Some(parent) => wildcard.entry(parent.to_string()),
                None => exact.entry(name.clone()),
            }
            .or_insert_with(|| certified.clone());
        }
        default.get_or_insert(certified);
    }
    let default = default.ok_or("no certificate")?;
    let versions: &[&rustls::SupportedProtocolVersion] = match cfg.min_version {
        TlsVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersion::Tls13 => &[&rustls::version::TLS13],
    };
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .map_err(|e| e.to_string())?;
    let builder = match (&cfg.client_ca_pem, cfg.client_auth) {
        (Some(ca), ClientAuth::Optional | ClientAuth::Required) => {
            let mut roots = RootCertStore::empty();
            for cert in pem_chain(ca).map_err(|e| format!("client_ca: {e}"))? {
                roots.add(cert).map_err(|e| format!("client_ca: {e}"))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), provider);
            let verifier = if cfg.client_auth == ClientAuth::Optional {
                verifier.allow_unauthenticated()
            } else {
                verifier
            };
            builder.with_client_cert_verifier(verifier.build().map_err(|e| e.to_string())?)
        }
        _ => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(Arc::new(CertStore {
        exact,
        wildcard,
        default,
    }));
    // Only what the data plane speaks, when it interprets the stream (None: all of them).
    config.alpn_protocols = cfg
        .alpn
        .iter()
        .filter(|p| supported_alpn.is_none_or(|s| s.contains(&p.as_str())))
        .map(|p| p.as_bytes().to_vec())
        .collect();
    if cfg.session_tickets {
        config.ticketer = shared.ticketer.clone();
        // One ticket per full handshake: enough for a client's next connection, and each costs
        // an encryption (OpenSSL sends two).
        config.send_tls13_tickets = 1;
        config.session_storage = shared.sessions.clone();
    } else {
        config.send_tls13_tickets = 0;
        config.session_storage = Arc::new(NoServerSessionStorage {});
    }
    Ok(Arc::new(config))
}

/// How a finished server handshake went, for the metrics.
pub fn completed(conn: &ServerConnection) -> HandshakeResult {
    match conn.handshake_kind() {
        Some(HandshakeKind::Resumed) => HandshakeResult::Resumed,
        _ => HandshakeResult::Ok,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sni_picks_exact_then_wildcard_then_the_first() {
        let key = |n: u8| {
            Arc::new(CertifiedKey::new(
                vec![rustls::pki_types::CertificateDer::from(vec![n])],
                Arc::new(NoKey),
            ))
        };
        let (a, b, c) = (key(1), key(2), key(3));
        let store = CertStore {
            exact: HashMap::from([("api.example.com".to_string(), b.clone())]),
            wildcard: HashMap::from([("example.com".to_string(), c.clone())]),
            default: a.clone(),
        };
        let pick = |sni| store.find(sni).cert[0].as_ref()[0];
        assert_eq!(pick(Some("api.example.com")), 2);
        assert_eq!(pick(Some("www.example.com")), 3);
        // A wildcard covers one label only, and not the bare parent.
        assert_eq!(pick(Some("a.b.example.com")), 1);
        assert_eq!(pick(Some("example.com")), 1);
        assert_eq!(pick(None), 1);
    }

    #[derive(Debug)]
    struct NoKey;
    impl rustls::sign::SigningKey for NoKey {
        fn choose_scheme(
            &self,
            _: &[rustls::SignatureScheme],
        ) -> Option<Box<dyn rustls::sign::Signer>> {
            None
        }
        fn algorithm(&self) -> rustls::SignatureAlgorithm {
            rustls::SignatureAlgorithm::ECDSA
        }
    }
}
