//! What the workers read: the routing tables the engine publishes and the state every worker
//! shares. At the bottom of the module graph: the engine (above) builds and publishes these, the
//! protocol modules read them, and nothing here imports the engine.

use crate::accesslog::AccessLog;
use crate::balance::Pool;
use crate::config::ListenerConfig;
use crate::l4::passthrough::SniRoutes;
use crate::proxy::route::Cidr;
use crate::proxy::HttpListener;
use crate::tls::server::TlsShared;
use crate::udp::UdpListener;
use arc_swap::{ArcSwap, ArcSwapOption};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::Arc;

/// What every worker shares.
pub struct Shared {
    pub tables: ArcSwap<Tables>,
    /// Client connections open in the whole process.
    pub connections: AtomicUsize,
    /// `runtime.max_connections`; 0 = unlimited.
    pub max_connections: usize,
    /// Read size above which a relay switches to splice (see l4::forward).
    pub splice_threshold: usize,
    /// The access log writer, when `[log].access_log` is on.
    pub access_log: ArcSwapOption<AccessLog>,
    /// This process's `Via` pseudonym (`fastlb-` and 8 hex digits): a request that already
    /// carries it has looped back here.
    pub via_token: String,
    /// Ticket keys and the TLS 1.2 session cache: one set for every worker and listener.
    pub tls: TlsShared,
    /// Worker threads running now (each counts itself out when it ends, however it ends).
    pub live_workers: AtomicUsize,
    /// Set by the engine while every listener of the running config has its sockets, cleared
    /// at stop: with `live_workers`, what `/healthz` reports, read without the engine's lock.
    pub listening: AtomicBool,
}

impl Shared {
    /// `ticket_keys`: those a previous process exported at a binary upgrade, if any.
    pub fn new(max_connections: usize, ticket_keys: Option<&[u8]>) -> Result<Self, String> {
        Ok(Shared {
            tables: ArcSwap::from_pointee(Tables {
                generation: 0,
                listeners: HashMap::new(),
                pools: HashMap::new(),
            }),
            connections: AtomicUsize::new(0),
            access_log: ArcSwapOption::empty(),
            max_connections,
            splice_threshold: splice_threshold(),
            via_token: format!("fastlb-{:08x}", fastrand::u32(..)),
            tls: TlsShared::new(ticket_keys)?,
            live_workers: AtomicUsize::new(0),
            listening: AtomicBool::new(false),
        })
    }
}

/// The routing tables: immutable once published.
pub struct Tables {
    /// Bumped by every publish: a keep-alive connection compares it per request to pick up a
    /// reload (a pointer comparison could be fooled by a freed table's address being reused).
    pub generation: u64,
    pub listeners: HashMap<String, Arc<ListenerEntry>>,
    pub pools: HashMap<String, Arc<Pool>>,
}

/// A listener as workers see it.
pub struct ListenerEntry {
    pub cfg: ListenerConfig,
    pub pool: Arc<Pool>,
    /// What workers count this listener's traffic under (crate::metrics).
    pub id: u16,
    /// Routes, limits and rate limiter of an http listener.
    pub http: Option<HttpListener>,
    /// https and tls: the handshake's settings (certificates as of this publish).
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// tcp with routes: pools by the SNI of the ClientHello (passthrough).
    pub sni: Option<SniRoutes>,
    /// udp: session settings and the process-wide session count.
    pub udp: Option<UdpListener>,
    /// PROXY protocol on accepted connections: whether required, and the trusted sources.
    pub proxy: Option<ProxyAccept>,
    /// The listener was removed by a reload: its connections finish what they are doing and
    /// close.
    pub closing: AtomicBool,
}

pub struct ProxyAccept {
    pub required: bool,
    pub from: Vec<Cidr>,
}

/// `FASTLB_SPLICE_THRESHOLD` (bytes) overrides the measured default; only benchmarks set it.
fn splice_threshold() -> usize {
    std::env::var("FASTLB_SPLICE_THRESHOLD")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&v: &usize| v >= 1024)
        .unwrap_or(crate::l4::forward::SPLICE_THRESHOLD)
}
