//! The engine's view of the configuration: what Python hands over as JSON after validating the
//! TOML file (python/fastlb/config.py, `Config.to_engine()`). Python has already resolved
//! everything a worker must not do itself: durations are milliseconds, host names are resolved to
//! socket addresses, `workers = "auto"` is a number and `cpu_affinity` is a CPU list.
//!
//! Every field is required: the defaults live in the Python schema only, so that the two sides
//! cannot drift apart. An `Option` is written `null` when unset (`required` makes serde insist
//! on the key).

use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;

/// Whole-engine configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineConfig {
    pub runtime: RuntimeConfig,
    /// `[log].access_log`: "stdout" or a file path; None = off.
    #[serde(deserialize_with = "required")]
    pub access_log: Option<String>,
    pub listeners: Vec<ListenerConfig>,
    pub pools: Vec<PoolConfig>,
    /// `[geoip].database`, an absolute path; None: no database (no `country` routes).
    #[serde(deserialize_with = "required")]
    pub geoip: Option<String>,
}

/// `[runtime]`: only read when the engine starts; an update may not change it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Number of worker threads, >= 1.
    pub workers: usize,
    /// CPU for worker i is `cpus[i % len]`; empty = no pinning.
    pub cpus: Vec<usize>,
    /// Process-wide cap on client connections; 0 = unlimited.
    pub max_connections: usize,
}

/// One `[[listeners]]` entry.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub name: String,
    pub bind: SocketAddr,
    pub protocol: Protocol,
    /// The pool (tcp), or the default pool (http).
    pub pool: String,
    /// Close a connection after this long without a byte either way; 0 = never. For http,
    /// the wait for the next request on a keep-alive connection.
    pub client_idle_ms: u64,
    /// http: a request head must arrive whole within this long of its first byte (slowloris);
    /// 0 = no limit.
    pub header_read_ms: u64,
    /// http: largest request head (request line and headers) accepted; beyond it 431.
    pub max_header_bytes: usize,
    /// http: most header fields in one request head; beyond it 431.
    pub max_headers: usize,
    /// http: per client IP request rate limit.
    #[serde(deserialize_with = "required")]
    pub rate_limit: Option<RateLimitConfig>,
    /// http: content routes, first match wins; none matching means `pool`. tcp: routes by SNI
    /// (passthrough).
    pub routes: Vec<RouteConfig>,
    /// https and tls: the server side of TLS.
    #[serde(deserialize_with = "required")]
    pub tls: Option<ListenerTlsConfig>,
    /// udp: flows and sessions.
    #[serde(deserialize_with = "required")]
    pub udp: Option<UdpConfig>,
    /// http and https: the HTTP/2 side (h2c with prior knowledge, h2 by ALPN).
    #[serde(deserialize_with = "required")]
    pub http2: Option<Http2Config>,
    /// PROXY protocol on accepted connections (tcp, tls, http, https); None: off.
    #[serde(deserialize_with = "required")]
    pub proxy_protocol: Option<ProxyProtocolConfig>,
    /// http and https: networks whose X-Forwarded-For is believed (see proxy::client_addr).
    pub trusted_proxies: Vec<String>,
    /// http and https: response compression (see proxy::compress); None: off.
    #[serde(deserialize_with = "required")]
    pub compression: Option<CompressionConfig>,
}

/// `compression = { algorithms, min_size, types, levels }`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CompressionConfig {
    /// "zstd", "br", "gzip", in the order that breaks q-value ties.
    pub algorithms: Vec<String>,
    pub min_size: u64,
    /// Media types, `text/*` for a prefix.
    pub types: Vec<String>,
    pub gzip_level: u32,
    pub br_level: u32,
    pub zstd_level: i32,
}

/// `[listeners.http2]`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Http2Config {
    /// Streams a client may have open at once on one connection; beyond, they are refused.
    pub max_concurrent_streams: u32,
    /// Largest header list (HPACK-decoded) a client may send.
    pub max_header_list_size: u32,
}

impl Default for Http2Config {
    fn default() -> Self {
        Http2Config {
            max_concurrent_streams: 100,
            max_header_list_size: 65536,
        }
    }
}

/// The HTTP version fastlb speaks to a pool's backends.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
pub enum HttpVersion {
    #[default]
    #[serde(rename = "1.1")]
    Http11,
    #[serde(rename = "2")]
    Http2,
}

/// `udp = { responses, per_packet, max_sessions }` with `timeouts.session_idle`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct UdpConfig {
    /// A session ends after this long without a datagram either way.
    pub session_idle_ms: u64,
    /// A session ends once every datagram the client sent in it had this many replies
    /// (nginx `proxy_responses`); 0 = only when idle.
    pub responses: u32,
    /// Balance every datagram; sessions are then per (client, backend).
    pub per_packet: bool,
    /// Sessions of this listener in the whole process; a new flow beyond it is dropped.
    pub max_sessions: u32,
}

/// `[listeners.tls]`, the files already read by the control plane.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ListenerTlsConfig {
    /// At least one; the first is the default for a ClientHello whose SNI matches none.
    pub certificates: Vec<CertificateConfig>,
    pub min_version: TlsVersion,
    /// Protocols offered by ALPN, in preference order.
    pub alpn: Vec<String>,
    #[serde(deserialize_with = "required")]
    pub client_ca_pem: Option<String>,
    pub client_auth: ClientAuth,
    pub session_tickets: bool,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CertificateConfig {
    /// The path as written in the config file, for messages.
    pub cert: String,
    /// The certificate file: the leaf, then its chain.
    pub chain_pem: String,
    pub key_pem: String,
    /// The leaf's DNS names (lower-case; `*.` for wildcards), read by the control plane.
    pub names: Vec<String>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
pub enum TlsVersion {
    #[serde(rename = "1.2")]
    Tls12,
    #[serde(rename = "1.3")]
    Tls13,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    Off,
    Optional,
    Required,
}

/// `[pools.tls]`: TLS to the backends (re-encryption).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PoolTlsConfig {
    /// Verify the backend's certificate (against `ca_pem`, else the system roots).
    pub verify: bool,
    #[serde(deserialize_with = "required")]
    pub ca_pem: Option<String>,
    /// The name sent and verified; None: the request's Host (http), else the backend's host.
    #[serde(deserialize_with = "required")]
    pub sni: Option<String>,
    /// A client certificate (mTLS to the backend).
    #[serde(deserialize_with = "required")]
    pub cert_pem: Option<String>,
    #[serde(deserialize_with = "required")]
    pub key_pem: Option<String>,
}

/// `redirect = { scheme, code, host, path }`: fastlb answers with a redirect.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RedirectConfig {
    #[serde(deserialize_with = "required")]
    pub scheme: Option<String>,
    pub code: u16,
    #[serde(deserialize_with = "required")]
    pub host: Option<String>,
    #[serde(deserialize_with = "required")]
    pub path: Option<String>,
}

/// Token bucket per client IP: `requests_per_second` sustained, `burst` at once.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    pub requests_per_second: f64,
    pub burst: u32,
}

/// One `[[listeners.routes]]` entry. Every condition given must hold. Header names are
/// lower-cased by the control plane; `pool = "x"` arrives as `split = [{pool: "x", weight: 1}]`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// The route's `name`, or its index as a decimal string: how the admin API names it
    /// (live split weights) and what its counters are kept under across reloads.
    pub name: String,
    #[serde(deserialize_with = "required")]
    pub host: Option<String>,
    #[serde(deserialize_with = "required")]
    pub path_prefix: Option<String>,
    #[serde(deserialize_with = "required")]
    pub path_exact: Option<String>,
    #[serde(deserialize_with = "required")]
    pub path_regex: Option<String>,
    pub headers: BTreeMap<String, String>,
    pub cookies: BTreeMap<String, String>,
    pub query: BTreeMap<String, String>,
    /// Networks as `addr/len`, host bits already cleared.
    pub source_cidr: Vec<String>,
    /// ISO 3166-1 alpha-2 codes, upper case: the client's country by `[geoip].database`.
    pub country: Vec<String>,
    /// Fields set, added and removed on the request to the backend, and on its response.
    pub request_headers: HeaderRulesConfig,
    pub response_headers: HeaderRulesConfig,
    /// With `path_prefix`: what replaces that prefix in the path sent to the backend.
    #[serde(deserialize_with = "required")]
    pub rewrite_prefix: Option<String>,
    /// Empty for a redirect route.
    pub split: Vec<SplitConfig>,
    /// tcp listeners: the TLS SNI (exact, or `*.domain`), read from the ClientHello.
    #[serde(deserialize_with = "required")]
    pub sni: Option<String>,
    #[serde(deserialize_with = "required")]
    pub redirect: Option<RedirectConfig>,
    /// Sticky A/B groups: a client the split placed keeps its pool by this cookie.
    #[serde(deserialize_with = "required")]
    pub split_affinity: Option<SplitAffinityConfig>,
}

/// `request_headers` / `response_headers` of a route: (name, value) pairs in the file's order.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HeaderRulesConfig {
    pub set: Vec<(String, String)>,
    pub add: Vec<(String, String)>,
    pub remove: Vec<String>,
}

/// `proxy_protocol = { accept, from }`: who may send a PROXY header (v1 or v2), and whether
/// every connection must carry one.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ProxyProtocolConfig {
    pub required: bool,
    /// Networks (`addr/len`) trusted to send one.
    pub from: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SplitAffinityConfig {
    pub cookie: String,
    /// Max-Age of the cookie; 0: a session cookie.
    pub ttl_ms: u64,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SplitConfig {
    pub pool: String,
    pub weight: u32,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Http,
    /// HTTP over TLS.
    Https,
    /// TLS terminated; the plaintext stream relayed to the pool.
    Tls,
    /// Datagrams, relayed per flow (client address and port).
    Udp,
}

impl Protocol {
    /// As written in the config.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Http => "http",
            Protocol::Https => "https",
            Protocol::Tls => "tls",
            Protocol::Udp => "udp",
        }
    }

    /// Whether the listener speaks HTTP (routes, rewriting) rather than relaying a stream.
    pub fn is_http(self) -> bool {
        matches!(self, Protocol::Http | Protocol::Https)
    }
}

/// One `[[pools]]` entry.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    pub name: String,
    pub algorithm: Algorithm,
    pub hash_key: HashKey,
    /// Bounded-load consistent hashing (HAProxy `hash-balance-factor`): a backend is skipped
    /// while its active connections exceed `factor/100 x` the pool average. 0 = off.
    pub hash_balance_factor: u32,
    pub backends: Vec<BackendConfig>,
    pub timeouts: PoolTimeouts,
    /// At most `MAX_RETRIES`.
    pub retries: u32,
    /// http: sticky-cookie insert.
    #[serde(deserialize_with = "required")]
    pub affinity: Option<AffinityConfig>,
    /// http: idle upstream connections kept per backend per worker; 0 = no keep-alive.
    pub keepalive: usize,
    /// http: requests waiting for a backend below its `max_connections`.
    pub queue: QueueConfig,
    /// Outlier ejection from live traffic; None = off.
    #[serde(deserialize_with = "required")]
    pub passive: Option<PassiveConfig>,
    /// TLS to the backends; None: plain TCP.
    #[serde(deserialize_with = "required")]
    pub tls: Option<PoolTlsConfig>,
    /// http: HTTP/1.1 or HTTP/2 to the backends.
    pub http_version: HttpVersion,
    /// A PROXY protocol header first on every backend connection; None: off.
    #[serde(deserialize_with = "required")]
    pub send_proxy: Option<ProxyVersion>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ProxyVersion {
    V1,
    V2,
}

/// `passive = { consecutive_failures, eject }`: the engine ejects; the control plane times
/// `eject` and returns the backend (so `eject` is not sent).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PassiveConfig {
    pub consecutive_failures: u32,
}

/// Most retries a pool may have (`retries`; the Python schema reads it from here).
pub const MAX_RETRIES: u32 = 10;
/// Most backends one connection or request tries.
pub const MAX_TRIES: usize = MAX_RETRIES as usize + 1;

impl PoolConfig {
    /// A bare pool for tests and the micro benchmarks, which build pools without the control
    /// plane: no keep-alive, no queue, 1 s timeouts. These are not the config's defaults (the
    /// Python schema has those).
    pub fn bare(name: &str, algorithm: Algorithm, backends: Vec<BackendConfig>) -> Self {
        PoolConfig {
            name: name.into(),
            algorithm,
            hash_key: HashKey::SourceIp,
            hash_balance_factor: 0,
            backends,
            timeouts: PoolTimeouts {
                connect_ms: 1000,
                read_ms: 1000,
                send_ms: 1000,
                idle_ms: 1000,
            },
            retries: 0,
            affinity: None,
            keepalive: 0,
            queue: QueueConfig {
                size: 0,
                timeout_ms: 0,
            },
            passive: None,
            send_proxy: None,
            tls: None,
            http_version: HttpVersion::Http11,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AffinityConfig {
    pub cookie: String,
    /// Max-Age of the cookie; 0 = a session cookie.
    pub ttl_ms: u64,
}

/// HAProxy's per-server queue: a request finding every candidate at `max_connections` waits
/// up to `timeout_ms` (then 503); beyond `size` waiting requests it gets 503 at once.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct QueueConfig {
    pub size: u32,
    pub timeout_ms: u64,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    RoundRobin,
    LeastConn,
    Random,
    P2c,
    PeakEwma,
    IpHash,
    ConsistentHash,
    Maglev,
}

/// What a hashing algorithm hashes. Only `source_ip` applies to tcp listeners.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum HashKey {
    #[default]
    SourceIp,
    Header(String),
    Cookie(String),
    Path,
    Query(String),
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// As written in the config (`host:port`); with the pool name it is the backend's id.
    pub address: String,
    /// `address` resolved by the control plane.
    pub addr: SocketAddr,
    pub weight: u32,
    /// 0 = unlimited.
    pub max_connections: u32,
    pub backup: bool,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PoolTimeouts {
    pub connect_ms: u64,
    pub read_ms: u64,
    pub send_ms: u64,
    pub idle_ms: u64,
}

/// Makes an `Option` field required: without it serde takes a missing key as `None`.
fn required<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::deserialize(d)
}

impl EngineConfig {
    /// Parses the JSON the control plane sends; errors name the JSON path.
    pub fn from_json(text: &str) -> Result<Self, String> {
        let cfg: EngineConfig = serde_json::from_str(text).map_err(|e| e.to_string())?;
        cfg.check()?;
        Ok(cfg)
    }

    /// The few invariants the engine relies on (Python validates the rest with field names).
    fn check(&self) -> Result<(), String> {
        if self.runtime.workers == 0 {
            return Err("runtime.workers: must be >= 1".into());
        }
        if let Some(p) = self.pools.iter().find(|p| p.retries > MAX_RETRIES) {
            return Err(format!("pool {}: retries above {MAX_RETRIES}", p.name));
        }
        let known = |pool: &str| self.pools.iter().any(|p| p.name == pool);
        for l in &self.listeners {
            if !known(&l.pool) {
                return Err(format!("listener {}: unknown pool {}", l.name, l.pool));
            }
            if matches!(l.protocol, Protocol::Https | Protocol::Tls) != l.tls.is_some() {
                return Err(format!(
                    "listener {}: tls settings wanted with https and tls only",
                    l.name
                ));
            }
            if (l.protocol == Protocol::Udp) != l.udp.is_some() {
                return Err(format!(
                    "listener {}: udp settings wanted with udp only",
                    l.name
                ));
            }
            if l.protocol.is_http() != l.http2.is_some() {
                return Err(format!(
                    "listener {}: http2 settings wanted with http and https only",
                    l.name
                ));
            }
            for (i, r) in l.routes.iter().enumerate() {
                if r.redirect.is_some() {
                    continue;
                }
                if r.split.is_empty() || r.split.iter().all(|s| s.weight == 0) {
                    return Err(format!("listener {} route {i}: no pool to send to", l.name));
                }
                if let Some(s) = r.split.iter().find(|s| !known(&s.pool)) {
                    return Err(format!(
                        "listener {} route {i}: unknown pool {}",
                        l.name, s.pool
                    ));
                }
            }
        }
        Ok(())
    }
}
