//! Maglev consistent hashing (`crate::maglev`, Envoy's `MAGLEV` policy): `table[key % 65537]`.
//!
//! Faster lookups than the ring (one index, no search) and a near-exact weighted split. A
//! backend that is not usable does not rebuild the table: its keys are looked up again with
//! the key rehashed (attempts 1 to 32, see `ip_hash::rehash`), which lands them on the other
//! backends in proportion to their table shares, then a linear scan. So the keys of healthy
//! backends never move when one goes down, and come back when it returns.

use super::ip_hash::{rehash, scan_from_key};
use super::{BackendState, Selector};
use crate::maglev::MaglevTable;
use std::sync::Arc;

/// Lookups with the key rehashed before the linear scan.
const REHASHES: u64 = 32;

/// Maglev selection.
#[derive(Debug, Clone)]
pub struct Maglev {
    table: MaglevTable,
}

impl Maglev {
    /// Builds the table from the backends' names (addresses) and configured weights.
    pub fn new(names: &[&str], weights: &[u32]) -> Self {
        Maglev {
            table: MaglevTable::new(names, weights),
        }
    }
}

impl Selector for Maglev {
    fn select(
        &self,
        backends: &[Arc<BackendState>],
        key: u64,
        usable: &dyn Fn(usize) -> bool,
    ) -> Option<usize> {
        if let Some(i) = self.table.lookup(key) {
            if usable(i) {
                return Some(i);
            }
            for attempt in 1..=REHASHES {
                match self.table.lookup(rehash(key, attempt)) {
                    Some(i) if usable(i) => return Some(i),
                    _ => {}
                }
            }
        }
        scan_from_key(backends.len(), key, usable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::hash_key;
    use crate::balance::tests_support::{share_of_picks, states};

    fn build(b: &[Arc<BackendState>]) -> Maglev {
        let names: Vec<&str> = b.iter().map(|s| s.address.as_str()).collect();
        let weights: Vec<u32> = b.iter().map(|s| s.weight()).collect();
        Maglev::new(&names, &weights)
    }

    fn key(k: u64) -> u64 {
        hash_key(&k.to_le_bytes())
    }

    #[test]
    fn shares_follow_weights_within_two_points() {
        let b = states(&[5, 3, 2]);
        let shares = share_of_picks(&build(&b), &b, 10_000);
        for (share, w) in shares.iter().zip([0.5, 0.3, 0.2]) {
            assert!((share - w).abs() < 0.02, "{shares:?}");
        }
    }

    #[test]
    fn a_down_backend_moves_only_its_keys_and_they_spread() {
        let b = states(&[1; 5]);
        let m = build(&b);
        let before: Vec<usize> = (0..10_000)
            .map(|k| m.select(&b, key(k), &|i| b[i].in_rotation()).unwrap())
            .collect();
        b[2].set_up(false);
        let mut moved_to = [0usize; 5];
        for k in 0..10_000u64 {
            let after = m.select(&b, key(k), &|i| b[i].in_rotation()).unwrap();
            assert_ne!(after, 2);
            if before[k as usize] == 2 {
                moved_to[after] += 1;
            } else {
                assert_eq!(after, before[k as usize], "key {k}");
            }
        }
        let moved: usize = moved_to.iter().sum();
        for &m in moved_to.iter().filter(|&&m| m > 0) {
            let share = m as f64 / moved as f64;
            assert!((share - 0.25).abs() < 0.05, "{moved_to:?}");
        }
        assert_eq!(moved_to.iter().filter(|&&m| m > 0).count(), 4);
        b[2].set_up(true);
        for k in 0..10_000u64 {
            assert_eq!(
                m.select(&b, key(k), &|i| b[i].in_rotation()),
                Some(before[k as usize])
            );
        }
    }

    #[test]
    fn falls_back_to_a_scan_and_none_when_all_down() {
        let b = states(&[1, 1, 1]);
        let m = Maglev::new(&["a", "b", "c"], &[1, 0, 0]); // only backend 0 has entries
        b[0].set_up(false);
        for k in 0..100 {
            let i = m.select(&b, key(k), &|i| b[i].in_rotation()).unwrap();
            assert!(i == 1 || i == 2);
        }
        for s in &b {
            s.set_up(false);
        }
        assert_eq!(m.select(&b, 7, &|i| b[i].in_rotation()), None);
        assert_eq!(Maglev::new(&[], &[]).select(&[], 7, &|_| true), None);
    }
}
