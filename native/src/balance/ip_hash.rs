//! Weighted hash of the client key (nginx `ip_hash`, HAProxy `balance source` with
//! `hash-type map-based`): `table[key % len]`, where the table holds each backend's index
//! `weight / gcd` times.
//!
//! The cheapest sticky mapping, but not a consistent one: changing the set of backends or a
//! weight remaps most keys (use `consistent_hash` or `maglev` when that matters). A backend
//! that is down, draining or busy does *not* change the table: its keys are rehashed (the key
//! hashed again with an attempt counter, up to 20 times) so that they spread over the others
//! while every other key stays where it was, and come back when it does.

use super::{hash_key, reduced_weights, BackendState, Selector};
use std::sync::Arc;

/// Largest table kept; beyond it weights are scaled down (ratios stay within 1/TABLE_MAX).
const TABLE_MAX: u64 = 1 << 16;
/// Rehashes of a key whose backend is not usable before the linear scan.
const REHASHES: u64 = 20;

/// Weighted modulo hashing.
#[derive(Debug, Clone)]
pub struct IpHash {
    /// Backend indices, each `weight / gcd` times, in backend order.
    table: Vec<u32>,
}

impl IpHash {
    /// Builds the table from the configured weights; zero-weight backends get no entries.
    pub fn new(weights: &[u32]) -> Self {
        let reduced = reduced_weights(weights, TABLE_MAX);
        let table = reduced
            .iter()
            .enumerate()
            .flat_map(|(i, &w)| std::iter::repeat_n(i as u32, w as usize))
            .collect();
        IpHash { table }
    }
}

/// The key hashed again for attempt `n`: xxh3 of the key's and the attempt's little-endian
/// bytes (shared by `maglev`).
#[inline]
pub fn rehash(key: u64, attempt: u64) -> u64 {
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&key.to_le_bytes());
    bytes[8..].copy_from_slice(&attempt.to_le_bytes());
    hash_key(&bytes)
}

/// The first usable backend scanning from `key % n`: the last resort when rehashing found
/// none, spread by key rather than always the lowest index.
#[inline]
pub fn scan_from_key(n: usize, key: u64, usable: &dyn Fn(usize) -> bool) -> Option<usize> {
    if n == 0 {
        return None;
    }
    let start = (key % n as u64) as usize;
    (0..n).map(|s| (start + s) % n).find(|&i| usable(i))
}

impl Selector for IpHash {
    fn select(
        &self,
        backends: &[Arc<BackendState>],
        key: u64,
        usable: &dyn Fn(usize) -> bool,
    ) -> Option<usize> {
        let len = self.table.len() as u64;
        if len > 0 {
            let i = self.table[(key % len) as usize] as usize;
            if usable(i) {
                return Some(i);
            }
            for attempt in 1..=REHASHES {
                let i = self.table[(rehash(key, attempt) % len) as usize] as usize;
                if usable(i) {
                    return Some(i);
                }
            }
        }
        scan_from_key(backends.len(), key, usable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::tests_support::{share_of_picks, states};

    fn key(k: u64) -> u64 {
        hash_key(&k.to_le_bytes())
    }

    #[test]
    fn table_repeats_each_index_by_reduced_weight() {
        assert_eq!(
            IpHash::new(&[10, 6, 4]).table,
            vec![0, 0, 0, 0, 0, 1, 1, 1, 2, 2]
        );
        assert_eq!(IpHash::new(&[2, 0, 4]).table, vec![0, 2, 2]);
        assert!(IpHash::new(&[0, 0]).table.is_empty());
        let big = IpHash::new(&[1000, 999, 1]);
        assert!(big.table.len() as u64 <= TABLE_MAX + 3);
        assert!(big.table.contains(&2));
    }

    #[test]
    fn shares_follow_weights_within_two_points() {
        let b = states(&[5, 3, 2]);
        let shares = share_of_picks(&IpHash::new(&[5, 3, 2]), &b, 10_000);
        for (share, w) in shares.iter().zip([0.5, 0.3, 0.2]) {
            assert!((share - w).abs() < 0.02, "{shares:?}");
        }
    }

    #[test]
    fn a_key_is_sticky() {
        let b = states(&[1, 1, 1]);
        let h = IpHash::new(&[1, 1, 1]);
        for k in 0..100 {
            let first = h.select(&b, key(k), &|i| b[i].in_rotation());
            assert_eq!(h.select(&b, key(k), &|i| b[i].in_rotation()), first);
        }
    }

    #[test]
    fn a_down_backend_moves_only_its_keys_and_they_spread() {
        let b = states(&[1, 1, 1, 1]);
        let h = IpHash::new(&[1, 1, 1, 1]);
        let before: Vec<usize> = (0..10_000)
            .map(|k| h.select(&b, key(k), &|i| b[i].in_rotation()).unwrap())
            .collect();
        b[1].set_up(false);
        let mut moved_to = [0usize; 4];
        for k in 0..10_000u64 {
            let after = h.select(&b, key(k), &|i| b[i].in_rotation()).unwrap();
            assert_ne!(after, 1);
            if before[k as usize] != 1 {
                assert_eq!(after, before[k as usize]);
            } else {
                moved_to[after] += 1;
            }
        }
        let moved: usize = moved_to.iter().sum();
        for (i, &m) in moved_to.iter().enumerate().filter(|&(i, _)| i != 1) {
            let share = m as f64 / moved as f64;
            assert!((share - 1.0 / 3.0).abs() < 0.05, "{i}: {moved_to:?}");
        }
    }

    #[test]
    fn falls_back_to_a_scan_and_none_when_all_down() {
        let b = states(&[1, 1, 1]);
        let h = IpHash::new(&[1, 0, 0]); // only backend 0 is in the table
        b[0].set_up(false);
        for k in 0..100 {
            let i = h.select(&b, key(k), &|i| b[i].in_rotation()).unwrap();
            assert!(i == 1 || i == 2);
        }
        for s in &b {
            s.set_up(false);
        }
        assert_eq!(h.select(&b, 42, &|i| b[i].in_rotation()), None);
        assert_eq!(IpHash::new(&[]).select(&[], 42, &|_| true), None);
    }
}
