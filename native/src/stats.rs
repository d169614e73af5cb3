//! Counters of listeners, read by `Engine::stats()`. Backend counters live in
//! `balance::BackendCounters` beside the backend's other shared state.

use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Counters of one listener; kept across reloads while the listener's name stays.
#[derive(Debug, Default)]
pub struct ListenerStats {
    pub connections_total: AtomicU64,
    pub connections_active: AtomicU64,
    pub dropped_max_connections: AtomicU64,
    pub dropped_no_backend: AtomicU64,
    pub dropped_rate_limited: AtomicU64,
    /// http: requests whose head was read (including refused ones).
    pub requests_total: AtomicU64,
    /// http: requests answered 400/408/431 for malformed input.
    pub bad_requests: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    /// Sum and count of finished connection lifetimes (microseconds), for the mean until the
    /// histogram lands.
    pub duration_us_sum: AtomicU64,
    pub duration_count: AtomicU64,
}

/// JSON shape of one listener in `Engine.stats()`.
#[derive(Serialize)]
pub struct ListenerSnapshot<'a> {
    pub name: &'a str,
    pub protocol: &'a str,
    pub bind: String,
    pub pool: &'a str,
    pub connections_total: u64,
    pub connections_active: u64,
    pub dropped: Dropped,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub requests_total: u64,
    pub duration_us_sum: u64,
    pub duration_count: u64,
}

#[derive(Serialize)]
pub struct Dropped {
    pub max_connections: u64,
    pub no_backend: u64,
    pub rate_limited: u64,
    pub bad_request: u64,
}

impl ListenerStats {
    pub fn dropped(&self) -> Dropped {
        Dropped {
            max_connections: self.dropped_max_connections.load(Relaxed),
            no_backend: self.dropped_no_backend.load(Relaxed),
            rate_limited: self.dropped_rate_limited.load(Relaxed),
            bad_request: self.bad_requests.load(Relaxed),
        }
    }
}
