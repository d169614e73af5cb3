//! Backend selection. One trait, one file per algorithm.
//!
//! A selector is *built* once per pool from the configured backends (rings, tables and
//! sequences are built here, off the workers) and *queried* per connection or request with a
//! `usable` filter. Health, draining, disabling, zero weight, the backup tier and the backends
//! already tried for this request are all applied by that one filter (`Pool::select`), so a
//! health flip never rebuilds a ring: a selector just walks on to its next candidate.

pub mod consistent_hash;
pub mod ip_hash;
pub mod least_conn;
pub mod maglev;
pub mod p2c;
pub mod peak_ewma;
pub mod random;
pub mod round_robin;

use crate::config::{
    AffinityConfig, Algorithm, BackendConfig, HashKey, PoolConfig, PoolTimeouts, QueueConfig,
};
use crossbeam_utils::CachePadded;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

/// Hash used for every key (source IP, header value, ...) and by the rings: xxh3, seedless so
/// that every worker and every process maps a key identically.
#[inline]
pub fn hash_key(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(bytes)
}

/// Picks one backend for a key.
pub trait Selector: Send + Sync {
    /// Returns the index of a backend for which `usable(i)` is true, or `None` when the
    /// selector finds none. `backends` is the pool's list the selector was built from (same
    /// order); `key` is the request's hash (ignored by non-hashing algorithms).
    fn select(
        &self,
        backends: &[Arc<BackendState>],
        key: u64,
        usable: &dyn Fn(usize) -> bool,
    ) -> Option<usize>;
}

/// Administrative state set through the admin API (health is separate: `BackendState::up`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum AdminState {
    Enabled = 0,
    /// No new connections; open ones finish.
    Draining = 1,
    Disabled = 2,
}

impl AdminState {
    /// The name the control plane uses: "enabled", "draining" or "disabled".
    pub fn name(self) -> &'static str {
        match self {
            AdminState::Enabled => "enabled",
            AdminState::Draining => "draining",
            AdminState::Disabled => "disabled",
        }
    }

    pub fn from_name(name: &str) -> Option<AdminState> {
        [
            AdminState::Enabled,
            AdminState::Draining,
            AdminState::Disabled,
        ]
        .into_iter()
        .find(|s| s.name() == name)
    }
}

/// Runtime state of one backend, shared by every worker (global, not per worker, so
/// least_conn and peak_ewma see the whole process). This is the one owner of a backend's
/// runtime facts (admin state, health, ejection, runtime weight, slow start): the engine keeps
/// one per id (`pool/address`) for as long as a config has that id, whatever else a reload
/// changes. What the file says of the backend (address, backup, max_connections) is in the
/// pool that each publish builds (`BackendSettings`).
#[derive(Debug)]
pub struct BackendState {
    /// `POOL/ADDRESS`, the stable id users and the admin API see.
    pub id: String,
    pub address: String,
    /// What workers count this backend's traffic under (crate::metrics).
    pub slot: u32,
    /// Health: active checks and passive ejection flip it. Starts up.
    up: AtomicBool,
    admin: AtomicU8,
    /// Weight in 0..=1000, from the config or the admin API.
    weight: AtomicU32,
    /// Slow-start scale in per mille of `weight` (1000 = full share).
    weight_scale: AtomicU32,
    /// Passive ejection: failures in a row (connect errors, resets, timeouts, http 5xx) since
    /// the last success, and how many eject the backend (0 = passive detection off).
    consecutive_failures: AtomicU32,
    eject_after: AtomicU32,
    /// Set by an ejection, cleared by the control plane when it takes the news (`take_ejected`).
    ejected_unreported: AtomicBool,
    /// Open connections (tcp) or in-flight requests (http) across all workers.
    active: CachePadded<AtomicU32>,
    /// Peak-EWMA latency in nanoseconds, stored as f64 bits; see `observe_latency`.
    ewma_ns: AtomicU64,
    /// When `ewma_ns` was last updated, ns since `clock_origin()`.
    ewma_stamp: AtomicU64,
    pub counters: BackendCounters,
}

/// Failure counters of one backend, shared: they are rare, and passive detection needs them
/// process-wide. Per-request counts are per worker (crate::metrics).
#[derive(Debug, Default)]
pub struct BackendCounters {
    pub failures_connect: AtomicU64,
    pub failures_timeout: AtomicU64,
    pub failures_reset: AtomicU64,
    /// http: responses with a 5xx status.
    pub failures_5xx: AtomicU64,
    /// Times passive detection took this backend out of rotation.
    pub ejections: AtomicU64,
}

/// Decay constant of the peak EWMA (Linkerd and Finagle default to 10 s).
const EWMA_DECAY_NS: f64 = 10e9;

fn clock_origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

pub fn now_ns() -> u64 {
    clock_origin().elapsed().as_nanos() as u64
}

/// `now_ns()` for an instant already read (saves a clock read on the request path).
pub fn ns_at(t: Instant) -> u64 {
    t.saturating_duration_since(clock_origin()).as_nanos() as u64
}

impl BackendState {
    pub fn new(pool: &str, cfg: &BackendConfig) -> Self {
        Self::with_slot(pool, cfg, 0)
    }

    /// A backend as a config first names it: up, enabled, at the file's weight.
    pub fn with_slot(pool: &str, cfg: &BackendConfig, slot: u32) -> Self {
        BackendState {
            id: format!("{pool}/{}", cfg.address),
            address: cfg.address.clone(),
            slot,
            up: AtomicBool::new(true),
            admin: AtomicU8::new(AdminState::Enabled as u8),
            weight: AtomicU32::new(cfg.weight),
            weight_scale: AtomicU32::new(1000),
            consecutive_failures: AtomicU32::new(0),
            eject_after: AtomicU32::new(0),
            ejected_unreported: AtomicBool::new(false),
            active: CachePadded::new(AtomicU32::new(0)),
            ewma_ns: AtomicU64::new(0f64.to_bits()),
            ewma_stamp: AtomicU64::new(now_ns()),
            counters: BackendCounters::default(),
        }
    }

    /// Whether the backend takes new connections or requests at all: up, enabled and with a
    /// weight (`Pool::usable` adds its connection cap, the pool's backup tier and the
    /// already-tried filter).
    #[inline]
    pub fn in_rotation(&self) -> bool {
        self.up.load(Relaxed)
            && self.admin.load(Relaxed) == AdminState::Enabled as u8
            && self.weight.load(Relaxed) > 0
    }

    /// `in_rotation` and below `max_connections` (0 = unlimited).
    #[inline]
    pub fn usable(&self, max_connections: u32) -> bool {
        self.in_rotation() && (max_connections == 0 || self.active() < max_connections)
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Relaxed)
    }
    /// Health verdict. Coming up starts a fresh run for passive detection: failures counted
    /// while it was down (requests in flight as it went) must not eject it at once.
    pub fn set_up(&self, up: bool) {
        if up {
            self.consecutive_failures.store(0, Relaxed);
        }
        self.up.store(up, Relaxed)
    }
    pub fn admin(&self) -> AdminState {
        match self.admin.load(Relaxed) {
            1 => AdminState::Draining,
            2 => AdminState::Disabled,
            _ => AdminState::Enabled,
        }
    }
    pub fn set_admin(&self, state: AdminState) {
        self.admin.store(state as u8, Relaxed)
    }
    pub fn weight(&self) -> u32 {
        self.weight.load(Relaxed)
    }
    pub fn set_weight(&self, weight: u32) {
        self.weight.store(weight, Relaxed)
    }
    pub fn set_weight_scale(&self, per_mille: u32) {
        self.weight_scale.store(per_mille.min(1000), Relaxed)
    }
    pub fn weight_scale(&self) -> u32 {
        self.weight_scale.load(Relaxed)
    }

    /// Slow start for selectors that walk a fixed sequence (round robin), which cannot divide
    /// by `effective_weight`: a ramping backend takes each turn it lands on with probability
    /// scale/1000, so its share grows linearly with the scale. Hashing algorithms do not ramp
    /// (a key would move back and forth), as in HAProxy.
    #[inline]
    pub fn admits_during_slow_start(&self) -> bool {
        let scale = self.weight_scale.load(Relaxed);
        scale >= 1000 || fastrand::u32(0..1000) < scale
    }

    /// Passive ejection after `n` failures in a row; 0 turns it off. Set by each publish.
    pub fn set_eject_after(&self, n: u32) {
        self.eject_after.store(n, Relaxed)
    }

    /// Counts a failed connect, reset, timeout or 5xx toward passive ejection: the failure
    /// that completes the run takes the backend out of rotation at once (Envoy's outlier
    /// detection). Only active checks (or, without them, the control plane after `eject`) put
    /// it back.
    #[inline]
    pub fn record_failure(&self) {
        let limit = self.eject_after.load(Relaxed);
        if limit == 0 {
            return;
        }
        let run = self.consecutive_failures.fetch_add(1, Relaxed) + 1;
        if run >= limit && self.up.swap(false, Relaxed) {
            self.consecutive_failures.store(0, Relaxed);
            self.counters.ejections.fetch_add(1, Relaxed);
            self.ejected_unreported.store(true, Relaxed);
        }
    }

    /// A success ends a run of failures. Reads before writing: the common case (no run)
    /// leaves the cache line shared.
    #[inline]
    pub fn record_success(&self) {
        if self.consecutive_failures.load(Relaxed) != 0 {
            self.consecutive_failures.store(0, Relaxed);
        }
    }

    /// Whether the backend was ejected since the last call (the control plane polls this).
    pub fn take_ejected(&self) -> bool {
        self.ejected_unreported.swap(false, Relaxed)
    }

    pub fn fail_connect(&self) {
        self.counters.failures_connect.fetch_add(1, Relaxed);
        self.record_failure();
    }
    pub fn fail_timeout(&self) {
        self.counters.failures_timeout.fetch_add(1, Relaxed);
        self.record_failure();
    }
    pub fn fail_reset(&self) {
        self.counters.failures_reset.fetch_add(1, Relaxed);
        self.record_failure();
    }
    pub fn fail_5xx(&self) {
        self.counters.failures_5xx.fetch_add(1, Relaxed);
        self.record_failure();
    }

    /// Weight after slow start: what dynamic algorithms (least_conn, random, p2c, peak_ewma)
    /// divide by. Never 0 while the configured weight is not 0.
    #[inline]
    pub fn effective_weight(&self) -> u32 {
        let w = self.weight.load(Relaxed);
        let scale = self.weight_scale.load(Relaxed);
        if scale >= 1000 || w == 0 {
            w
        } else {
            ((w as u64 * scale as u64) / 1000).max(1) as u32
        }
    }

    #[inline]
    pub fn active(&self) -> u32 {
        self.active.load(Relaxed)
    }
    #[inline]
    pub fn acquire(&self) {
        self.active.fetch_add(1, Relaxed);
    }
    #[inline]
    pub fn release(&self) {
        self.active.fetch_sub(1, Relaxed);
    }

    /// Current peak-EWMA latency estimate in nanoseconds.
    #[inline]
    pub fn latency_ewma_ns(&self) -> f64 {
        f64::from_bits(self.ewma_ns.load(Relaxed))
    }

    /// The estimate as of `now` (ns since `clock_origin`): decayed toward zero for the time
    /// since the last observation, as Finagle's PeakEwma reads it. A backend that stopped
    /// getting traffic after one slow sample is not shunned forever: its estimate falls until
    /// it wins a comparison again and gets measured.
    #[inline]
    pub fn latency_estimate_ns(&self, now: u64) -> f64 {
        let ewma = self.latency_ewma_ns();
        let since = now.saturating_sub(self.ewma_stamp.load(Relaxed)) as f64;
        ewma * (-since / EWMA_DECAY_NS).exp()
    }

    /// Records one latency observation: a value above the estimate replaces it at once (the
    /// "peak"), a lower one is blended in with a weight that decays with the time since the
    /// last observation. Concurrent updates may lose one observation; that is harmless.
    pub fn observe_latency(&self, sample_ns: u64) {
        self.observe_latency_at(sample_ns, now_ns());
    }

    /// `observe_latency` at a time the caller has already read (`ns_at`).
    pub fn observe_latency_at(&self, sample_ns: u64, now: u64) {
        let last = self.ewma_stamp.swap(now, Relaxed);
        let old = self.latency_ewma_ns();
        let sample = sample_ns as f64;
        let new = if sample > old {
            sample
        } else {
            let w = (-(now.saturating_sub(last) as f64) / EWMA_DECAY_NS).exp();
            old * w + sample * (1.0 - w)
        };
        self.ewma_ns.store(new.to_bits(), Relaxed);
    }
}

/// A pool as the data plane uses it: its backends, the built selector and its settings.
pub struct Pool {
    pub name: String,
    /// What workers count this pool's traffic under (crate::metrics); set by the engine.
    pub id: u16,
    /// Runtime state, in config order (shared with every other publish that has the id).
    pub backends: Vec<Arc<BackendState>>,
    /// What this config says of each backend, same order.
    pub settings: Vec<BackendSettings>,
    pub selector: Box<dyn Selector>,
    pub hash_key: HashKey,
    pub timeouts: PoolTimeouts,
    pub retries: u32,
    /// http: sticky cookie; `affinity_tokens[i]` is backend i's opaque cookie value.
    pub affinity: Option<AffinityConfig>,
    pub affinity_tokens: Vec<[u8; 16]>,
    /// http: idle upstream connections kept per backend per worker.
    pub keepalive: usize,
    pub queue: QueueConfig,
    /// http: requests waiting for a backend below `max_connections`.
    pub queued: AtomicU32,
    /// Signalled when a request on a backend with `max_connections` finishes.
    pub slot_freed: tokio::sync::Notify,
    has_backup: bool,
    /// TLS to the backends (re-encryption); set by the engine.
    pub tls: Option<Arc<crate::tls::client::PoolTls>>,
    /// http: HTTP/1.1 or HTTP/2 to the backends.
    /// A PROXY protocol header first on every backend connection (tcp and tls pools).
    pub send_proxy: Option<crate::config::ProxyVersion>,
    pub http_version: crate::config::HttpVersion,
}

/// A backend as one config describes it; a reload may change any of it while the backend's
/// runtime state carries on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackendSettings {
    /// The address the data plane connects to (`address` resolved by the control plane).
    pub addr: SocketAddr,
    /// Only takes traffic while no primary is up (HAProxy's `backup`).
    pub backup: bool,
    /// 0 = unlimited; beyond it the backend is not selected (tcp refuses, http queues).
    pub max_connections: u32,
}

impl From<&BackendConfig> for BackendSettings {
    fn from(b: &BackendConfig) -> Self {
        BackendSettings {
            addr: b.addr,
            backup: b.backup,
            max_connections: b.max_connections,
        }
    }
}

impl Pool {
    /// Builds a pool; `states` are the shared states of `cfg.backends`, in that order.
    pub fn build(cfg: &PoolConfig, states: Vec<Arc<BackendState>>) -> Pool {
        assert_eq!(cfg.backends.len(), states.len(), "one state per backend");
        let settings: Vec<BackendSettings> = cfg.backends.iter().map(Into::into).collect();
        let selector = build_selector(cfg, &states);
        let eject_after = cfg.passive.map_or(0, |p| p.consecutive_failures);
        for b in &states {
            b.set_eject_after(eject_after);
        }
        let affinity_tokens = states
            .iter()
            .map(|b| affinity_token(&cfg.name, &b.address))
            .collect();
        Pool {
            name: cfg.name.clone(),
            id: 0,
            has_backup: settings.iter().any(|s| s.backup),
            backends: states,
            settings,
            selector,
            hash_key: cfg.hash_key.clone(),
            timeouts: cfg.timeouts,
            retries: cfg.retries,
            affinity: cfg.affinity.clone(),
            affinity_tokens,
            keepalive: cfg.keepalive,
            queue: cfg.queue,
            queued: AtomicU32::new(0),
            slot_freed: tokio::sync::Notify::new(),
            tls: None,
            http_version: cfg.http_version,
            send_proxy: cfg.send_proxy,
        }
    }

    /// A fresh pool with new states for every backend of `cfg`: for tests and the micro
    /// benchmarks, which build pools without an engine.
    pub fn with_fresh_states(cfg: &PoolConfig) -> Pool {
        let states = cfg
            .backends
            .iter()
            .map(|b| Arc::new(BackendState::new(&cfg.name, b)))
            .collect();
        Pool::build(cfg, states)
    }

    /// Whether backend `i` may take a new connection or request now: in rotation and below
    /// its `max_connections` (not counting the backup tier).
    #[inline]
    pub fn usable(&self, i: usize) -> bool {
        self.backends[i].usable(self.settings[i].max_connections)
    }

    /// The usable backend whose affinity token is `token`, if any.
    pub fn pinned(&self, token: &[u8]) -> Option<usize> {
        let i = self.affinity_tokens.iter().position(|t| t == token)?;
        (self.usable(i) && (!self.settings[i].backup || !self.any_primary_up())).then_some(i)
    }

    /// Whether a request finding no usable backend should queue: some candidate is healthy and
    /// enabled but at its `max_connections`.
    pub fn only_busy(&self) -> bool {
        let primary_up = self.any_primary_up();
        self.backends
            .iter()
            .zip(&self.settings)
            .any(|(b, s)| s.max_connections > 0 && b.in_rotation() && (!s.backup || !primary_up))
    }

    /// Picks a backend for `key`, never one in `tried`. Backups are considered only when no
    /// primary is usable (HAProxy's `backup`).
    pub fn select(&self, key: u64, tried: &[u32]) -> Option<usize> {
        let pick = |backup: bool| {
            self.selector.select(&self.backends, key, &|i| {
                let s = &self.settings[i];
                s.backup == backup
                    && self.backends[i].usable(s.max_connections)
                    && !tried.contains(&(i as u32))
            })
        };
        match pick(false) {
            Some(i) => Some(i),
            None if self.has_backup && !self.any_primary_up() => pick(true),
            None => None,
        }
    }

    /// Whether any primary is healthy and enabled, even if busy or already tried: backups only
    /// stand in when every primary is down.
    fn any_primary_up(&self) -> bool {
        self.backends
            .iter()
            .zip(&self.settings)
            .any(|(b, s)| !s.backup && b.in_rotation())
    }
}

/// A backend's sticky-cookie value: 16 hex digits of a hash of its id, so that it is stable
/// across workers, reloads and restarts but does not disclose the address.
pub fn affinity_token(pool: &str, address: &str) -> [u8; 16] {
    let h =
        xxhash_rust::xxh3::xxh3_64_with_seed(format!("{pool}/{address}").as_bytes(), 0x5eed_f457);
    let mut out = [0u8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        *o = b"0123456789abcdef"[((h >> (60 - 4 * i)) & 0xf) as usize];
    }
    out
}

/// Builds the selector for a pool's algorithm from the backends' weights as configured now.
pub fn build_selector(cfg: &PoolConfig, states: &[Arc<BackendState>]) -> Box<dyn Selector> {
    let weights: Vec<u32> = states.iter().map(|b| b.weight()).collect();
    let max_weight = weights.iter().copied().max().unwrap_or(0);
    let names: Vec<&str> = states.iter().map(|b| b.address.as_str()).collect();
    match cfg.algorithm {
        Algorithm::RoundRobin => Box::new(round_robin::RoundRobin::new(&weights)),
        Algorithm::LeastConn => Box::new(least_conn::LeastConn::new()),
        Algorithm::Random => Box::new(random::WeightedRandom::with_max_weight(max_weight)),
        Algorithm::P2c => Box::new(p2c::P2c::with_max_weight(max_weight)),
        Algorithm::PeakEwma => Box::new(peak_ewma::PeakEwma::with_max_weight(max_weight)),
        Algorithm::IpHash => Box::new(ip_hash::IpHash::new(&weights)),
        Algorithm::ConsistentHash => Box::new(consistent_hash::ConsistentHash::new(
            &names,
            &weights,
            cfg.hash_balance_factor,
        )),
        Algorithm::Maglev => Box::new(maglev::Maglev::new(&names, &weights)),
    }
}

/// Weights divided by their gcd and, when their total exceeds `max_total`, scaled down
/// proportionally (never below 1 for a weight above 0): the unit counts that weight-sized
/// tables (round robin sequence, ip_hash table, ketama points) are built from.
pub fn reduced_weights(weights: &[u32], max_total: u64) -> Vec<u64> {
    let g = weights_gcd(weights) as u64;
    let mut units: Vec<u64> = weights.iter().map(|&w| w as u64 / g).collect();
    let total: u64 = units.iter().sum();
    if total > max_total {
        let scale = total as f64 / max_total as f64;
        for u in units.iter_mut().filter(|u| **u > 0) {
            *u = ((*u as f64 / scale).round() as u64).max(1);
        }
    }
    units
}

/// Greatest common divisor of the non-zero weights (1 if none), so that tables sized by
/// weight stay as small as the ratios allow.
pub fn weights_gcd(weights: &[u32]) -> u32 {
    fn gcd(a: u32, b: u32) -> u32 {
        if b == 0 {
            a
        } else {
            gcd(b, a % b)
        }
    }
    weights
        .iter()
        .copied()
        .filter(|&w| w > 0)
        .fold(0, gcd)
        .max(1)
}

#[cfg(test)]
pub(crate) mod tests_support {
    use super::*;

    /// Backends `127.0.0.1:9000+i` with the given weights.
    pub fn backend_configs(weights: &[u32]) -> Vec<BackendConfig> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| {
                let address = format!("127.0.0.1:{}", 9000 + i);
                BackendConfig {
                    addr: address.parse().unwrap(),
                    address,
                    weight,
                    max_connections: 0,
                    backup: false,
                }
            })
            .collect()
    }

    /// Those backends' states, all up.
    pub fn states(weights: &[u32]) -> Vec<Arc<BackendState>> {
        backend_configs(weights)
            .iter()
            .map(|cfg| Arc::new(BackendState::new("test", cfg)))
            .collect()
    }

    /// A pool of `algorithm` over `backend_configs(weights)`.
    pub fn pool_config(name: &str, algorithm: Algorithm, weights: &[u32]) -> PoolConfig {
        PoolConfig::bare(name, algorithm, backend_configs(weights))
    }

    /// That pool built, with fresh states.
    pub fn test_pool(name: &str, algorithm: Algorithm, weights: &[u32]) -> Pool {
        Pool::with_fresh_states(&pool_config(name, algorithm, weights))
    }

    /// Share of `n` picks each backend got, with a different key per pick.
    pub fn share_of_picks(sel: &dyn Selector, b: &[Arc<BackendState>], n: usize) -> Vec<f64> {
        let mut counts = vec![0usize; b.len()];
        for k in 0..n {
            let i = sel
                .select(b, hash_key(&(k as u64).to_le_bytes()), &|i| {
                    b[i].in_rotation()
                })
                .expect("a usable backend");
            counts[i] += 1;
        }
        counts.iter().map(|&c| c as f64 / n as f64).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::tests_support::{pool_config, test_pool};
    use super::*;
    use crate::config::PassiveConfig;

    fn passive_pool(n: u32) -> Pool {
        let mut cfg = pool_config("p", Algorithm::RoundRobin, &[1, 1]);
        cfg.passive = Some(PassiveConfig {
            consecutive_failures: n,
        });
        Pool::with_fresh_states(&cfg)
    }

    #[test]
    fn the_nth_failure_in_a_row_ejects_once_and_is_reported_once() {
        let pool = passive_pool(3);
        let b = &pool.backends[0];
        b.fail_reset();
        b.fail_connect();
        assert!(b.is_up());
        b.fail_5xx();
        assert!(!b.is_up() && b.take_ejected() && !b.take_ejected());
        assert_eq!(b.counters.ejections.load(Relaxed), 1);
        // already out: more failures neither count another ejection nor report again
        for _ in 0..5 {
            b.fail_timeout();
        }
        assert_eq!(b.counters.ejections.load(Relaxed), 1);
        assert!(!b.take_ejected());
        assert!(pool.backends[1].is_up());
        // back up (checks passed): a new run of 3 is needed
        b.set_up(true);
        b.fail_reset();
        b.fail_reset();
        assert!(b.is_up());
    }

    #[test]
    fn a_success_ends_the_run() {
        let pool = passive_pool(2);
        let b = &pool.backends[0];
        for _ in 0..10 {
            b.fail_reset();
            b.record_success();
        }
        assert!(b.is_up() && !b.take_ejected());
    }

    #[test]
    fn without_passive_failures_only_count() {
        let pool = test_pool("p", Algorithm::RoundRobin, &[1]);
        let b = &pool.backends[0];
        for _ in 0..100 {
            b.fail_reset();
        }
        assert!(b.is_up());
        assert_eq!(b.counters.failures_reset.load(Relaxed), 100);
    }

    /// Slow start in a round-robin pool: a backend at scale s gets about s of its share.
    #[test]
    fn round_robin_thins_a_ramping_backend_in_proportion() {
        let pool = test_pool("p", Algorithm::RoundRobin, &[1, 1]);
        for (scale, want) in [(0u32, 0.0), (250, 0.25), (500, 0.5), (1000, 1.0)] {
            pool.backends[1].set_weight_scale(scale);
            let n = 20_000;
            let picks = (0..n).filter(|_| pool.select(0, &[]) == Some(1)).count();
            // b1's share relative to its full one (half the picks)
            let share = picks as f64 / (n as f64 / 2.0);
            assert!((share - want).abs() < 0.05, "scale {scale}: share {share}");
        }
        // with more backends too: at half scale, one of three gets 1/6 of the picks
        let pool = test_pool("p", Algorithm::RoundRobin, &[1, 1, 1]);
        pool.backends[2].set_weight_scale(500);
        let picks = (0..30_000)
            .filter(|_| pool.select(0, &[]) == Some(2))
            .count();
        assert!(
            (picks as f64 / 30_000.0 - 1.0 / 6.0).abs() < 0.02,
            "{picks}"
        );
    }

    /// The file's settings come from the pool, so two pools built over the same states (a
    /// reload) may cap and tier them differently.
    #[test]
    fn max_connections_and_backup_are_the_pools() {
        let mut cfg = pool_config("p", Algorithm::RoundRobin, &[1, 1]);
        let first = Pool::with_fresh_states(&cfg);
        cfg.backends[0].max_connections = 1;
        cfg.backends[1].backup = true;
        let second = Pool::build(&cfg, first.backends.clone());
        // second: b1 only stands in for b0
        assert!((0..20).all(|_| second.select(0, &[]) == Some(0)));
        first.backends[0].acquire();
        // first: no cap, both take turns; second: b0 is full but up, so the request waits
        assert!(first.usable(0) && !second.usable(0));
        let picks: Vec<_> = (0..4).map(|_| first.select(0, &[])).collect();
        assert!(
            picks.contains(&Some(0)) && picks.contains(&Some(1)),
            "{picks:?}"
        );
        assert_eq!(second.select(0, &[]), None);
        assert!(second.only_busy() && !first.only_busy());
        // b0 down: the backup serves
        first.backends[0].set_up(false);
        assert_eq!(second.select(0, &[]), Some(1));
    }

    /// The dynamic algorithms weigh by effective weight instead of thinning.
    #[test]
    fn least_conn_is_not_thinned() {
        let pool = test_pool("p", Algorithm::LeastConn, &[1, 1]);
        pool.backends[1].set_weight_scale(0);
        assert!((0..100).all(|_| pool.usable(1)));
        assert_eq!(pool.backends[1].effective_weight(), 1);
    }
}
