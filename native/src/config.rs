//! The engine's view of the configuration: what Python hands over as JSON after validating the
//! TOML file (python/fastlb/config.py, `Config.to_engine()`). Python has already resolved
//! everything a worker must not do itself: durations are milliseconds, host names are resolved to
//! socket addresses, `workers = "auto"` is a number and `cpu_affinity` is a CPU list.

use serde::Deserialize;
use std::net::SocketAddr;

/// Whole-engine configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineConfig {
    pub runtime: RuntimeConfig,
    #[serde(default)]
    pub listeners: Vec<ListenerConfig>,
    #[serde(default)]
    pub pools: Vec<PoolConfig>,
}

/// `[runtime]`: only read when the engine starts; an update may not change it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Number of worker threads, >= 1.
    pub workers: usize,
    /// CPU for worker i is `cpus[i % len]`; empty = no pinning.
    #[serde(default)]
    pub cpus: Vec<usize>,
    /// Process-wide cap on client connections; 0 = unlimited.
    #[serde(default)]
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
    /// Close a connection after this long without a byte either way; 0 = never.
    #[serde(default)]
    pub client_idle_ms: u64,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Http,
}

/// One `[[pools]]` entry.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    pub name: String,
    pub algorithm: Algorithm,
    #[serde(default)]
    pub hash_key: HashKey,
    /// Bounded-load consistent hashing (HAProxy `hash-balance-factor`): a backend is skipped
    /// while its active connections exceed `factor/100 x` the pool average. 0 = off.
    #[serde(default)]
    pub hash_balance_factor: u32,
    pub backends: Vec<BackendConfig>,
    pub timeouts: PoolTimeouts,
    #[serde(default)]
    pub retries: u32,
    #[serde(default)]
    pub drain_timeout_ms: u64,
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
    #[serde(default)]
    pub max_connections: u32,
    #[serde(default)]
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
        for l in &self.listeners {
            if !self.pools.iter().any(|p| p.name == l.pool) {
                return Err(format!("listener {}: unknown pool {}", l.name, l.pool));
            }
        }
        Ok(())
    }
}
