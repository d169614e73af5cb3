//! Loops for the micro benchmarks (bench/micro, pytest-benchmark): each runs an operation `n`
//! times inside Rust and returns the total nanoseconds, so that a figure is the data plane's
//! cost and not the Python call around it.

use crate::balance::{self, Pool};
use crate::config::{Algorithm, BackendConfig, PoolConfig};
use crate::h1::parse::{self, Limits};
use std::hint::black_box;
use std::time::Instant;

/// Parses `head` (a whole HTTP/1.1 request head) `n` times; Err with the reason if it is not
/// one.
pub fn parse_head(head: &[u8], n: u64) -> Result<u64, String> {
    let limits = Limits {
        max_header_bytes: 64 * 1024,
        max_headers: 100,
    };
    let mut headers = Vec::with_capacity(32);
    match parse::parse_request(head, &limits, &mut headers) {
        Ok(Some(_)) => {}
        Ok(None) => return Err("incomplete head".into()),
        Err(e) => return Err(format!("refused: {}", e.status())),
    }
    let t0 = Instant::now();
    for _ in 0..n {
        let parsed = parse::parse_request(black_box(head), &limits, &mut headers);
        black_box(&parsed);
    }
    Ok(t0.elapsed().as_nanos() as u64)
}

/// A pool of `backends` equal backends under `algorithm`, as the engine builds it.
pub fn pool(algorithm: &str, backends: usize) -> Result<Pool, String> {
    let algorithm: Algorithm = serde_json::from_value(serde_json::Value::String(algorithm.into()))
        .map_err(|e| format!("algorithm: {e}"))?;
    let cfgs: Vec<BackendConfig> = (0..backends)
        .map(|i| {
            let address = format!("10.{}.{}.{}:80", i >> 16 & 255, i >> 8 & 255, i & 255);
            BackendConfig {
                addr: address.parse().expect("a literal address"),
                address,
                weight: 1,
                max_connections: 0,
                backup: false,
            }
        })
        .collect();
    let pool = Pool::with_fresh_states(&PoolConfig::bare("bench", algorithm, cfgs));
    for (i, b) in pool.backends.iter().enumerate() {
        b.observe_latency(1_000_000 + i as u64 * 1000);
    }
    Ok(pool)
}

/// `n` selections (with a different key each) from `pool`, as a request makes them (the
/// usable filter included).
pub fn select(pool: &Pool, n: u64) -> u64 {
    let t0 = Instant::now();
    for k in 0..n {
        let key = balance::hash_key(&k.to_le_bytes());
        black_box(pool.select(black_box(key), &[]));
    }
    t0.elapsed().as_nanos() as u64
}
