//! Consistent hashing on a ketama ring (`crate::ring`), with optional bounded loads.
//!
//! A key goes to the backend owning the first ring point at or after it; when that backend is
//! not usable the walk goes on clockwise to the next distinct backend, so a backend going down
//! moves only its own keys, each to its ring neighbour, and they come back when it does.
//!
//! Bounded loads (HAProxy `hash-balance-factor`, Mirrokni, Thorup and Zadimoghaddam,
//! "Consistent Hashing with Bounded Loads"): with a factor `f > 0`, a backend is skipped while
//! its active connections are at or above `ceil(f/100 * (total_active + 1) / usable_count)`,
//! i.e. `f`% of the average load counting this request, so one hot key cannot pile everything
//! onto one backend; keys spill to the next backends on the ring, still deterministically. The
//! bound counts connections, not weights (the paper's unweighted form). With `f >= 100` some
//! usable backend is always under it; should none be, the first usable one on the walk is used.

use super::ip_hash::scan_from_key;
use super::{BackendState, Selector};
use crate::ring::HashRing;
use std::sync::Arc;

/// Consistent-hash selection.
#[derive(Debug, Clone)]
pub struct ConsistentHash {
    ring: HashRing,
    /// Bounded-load factor in percent of the average load; 0 = unbounded.
    balance_factor: u32,
}

impl ConsistentHash {
    /// Builds the ring from the backends' names (addresses) and configured weights.
    pub fn new(names: &[&str], weights: &[u32], hash_balance_factor: u32) -> Self {
        ConsistentHash {
            ring: HashRing::new(names, weights),
            balance_factor: hash_balance_factor,
        }
    }

    /// The most active connections a backend may have and still be picked, or `None` when
    /// unbounded; `Some(0)` when nothing is usable. Costs one pass over the backends per pick
    /// when bounded (the counts are global atomics; no per-pool total is kept in sync).
    fn load_bound(
        &self,
        backends: &[Arc<BackendState>],
        usable: &dyn Fn(usize) -> bool,
    ) -> Option<u64> {
        if self.balance_factor == 0 {
            return None;
        }
        let (mut total, mut count) = (0u64, 0u64);
        for (i, b) in backends.iter().enumerate() {
            if usable(i) {
                total += b.active() as u64;
                count += 1;
            }
        }
        if count == 0 {
            return Some(0);
        }
        let den = 100 * count;
        Some((self.balance_factor as u64 * (total + 1)).div_ceil(den))
    }
}

/// Which backends a ring walk has already met (a backend has many points).
struct Seen {
    small: [u64; 4],
    big: Vec<u64>,
}

impl Seen {
    fn new(n: usize) -> Self {
        let big = if n > 256 {
            vec![0; n.div_ceil(64)]
        } else {
            Vec::new()
        };
        Seen { small: [0; 4], big }
    }

    /// Marks `i`; false if it was already marked.
    fn insert(&mut self, i: usize) -> bool {
        let words = if self.big.is_empty() {
            &mut self.small[..]
        } else {
            &mut self.big[..]
        };
        let (w, bit) = (i / 64, 1u64 << (i % 64));
        let new = words[w] & bit == 0;
        words[w] |= bit;
        new
    }
}

impl Selector for ConsistentHash {
    fn select(
        &self,
        backends: &[Arc<BackendState>],
        key: u64,
        usable: &dyn Fn(usize) -> bool,
    ) -> Option<usize> {
        let bound = self.load_bound(backends, usable);
        if bound == Some(0) {
            return None;
        }
        let fits = |i: usize| bound.is_none_or(|max| (backends[i].active() as u64) < max);
        let mut walk = self.ring.candidates(key);
        let Some(first) = walk.next() else {
            // No backend had a weight when the ring was built.
            return scan_from_key(backends.len(), key, usable);
        };
        let first_usable = usable(first);
        if first_usable && fits(first) {
            return Some(first);
        }
        // Walk on to each further distinct backend until one is usable (and under the bound).
        let mut seen = Seen::new(backends.len());
        seen.insert(first);
        let mut met = 1;
        let mut fallback = first_usable.then_some(first);
        for i in walk {
            if met == self.ring.members() {
                break;
            }
            if !seen.insert(i) {
                continue;
            }
            met += 1;
            if usable(i) {
                if fits(i) {
                    return Some(i);
                }
                fallback.get_or_insert(i);
            }
        }
        fallback.or_else(|| scan_from_key(backends.len(), key, usable))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::hash_key;
    use crate::balance::tests_support::{share_of_picks, states};

    fn build(b: &[Arc<BackendState>], factor: u32) -> ConsistentHash {
        let names: Vec<&str> = b.iter().map(|s| s.address.as_str()).collect();
        let weights: Vec<u32> = b.iter().map(|s| s.weight()).collect();
        ConsistentHash::new(&names, &weights, factor)
    }

    fn key(k: u64) -> u64 {
        hash_key(&k.to_le_bytes())
    }

    #[test]
    fn shares_follow_weights_within_two_points() {
        let b = states(&[5, 3, 2]);
        let shares = share_of_picks(&build(&b, 0), &b, 10_000);
        println!("consistent_hash 5/3/2 shares: {shares:?}");
        for (share, w) in shares.iter().zip([0.5, 0.3, 0.2]) {
            assert!((share - w).abs() < 0.02, "{shares:?}");
        }
    }

    #[test]
    fn a_down_backend_moves_only_its_keys() {
        let b = states(&[1; 10]);
        let ch = build(&b, 0);
        let before: Vec<usize> = (0..10_000)
            .map(|k| ch.select(&b, key(k), &|i| b[i].in_rotation()).unwrap())
            .collect();
        b[4].set_up(false);
        for k in 0..10_000u64 {
            let after = ch.select(&b, key(k), &|i| b[i].in_rotation()).unwrap();
            assert_ne!(after, 4);
            if before[k as usize] != 4 {
                assert_eq!(after, before[k as usize], "key {k}");
            }
        }
        b[4].set_up(true);
        for k in 0..10_000u64 {
            assert_eq!(
                ch.select(&b, key(k), &|i| b[i].in_rotation()),
                Some(before[k as usize])
            );
        }
    }

    #[test]
    fn walks_to_the_last_usable_and_none_when_all_down() {
        let b = states(&[1; 300]); // more than the walk's on-stack bitset
        let ch = build(&b, 0);
        for s in &b[..299] {
            s.set_up(false);
        }
        assert_eq!(ch.select(&b, key(1), &|i| b[i].in_rotation()), Some(299));
        b[299].set_up(false);
        assert_eq!(ch.select(&b, key(1), &|i| b[i].in_rotation()), None);
        let small = states(&[1, 1]);
        let ch = build(&small, 125);
        small[0].set_up(false);
        small[1].set_up(false);
        assert_eq!(ch.select(&small, key(1), &|i| small[i].in_rotation()), None);
        assert_eq!(
            ConsistentHash::new(&[], &[], 0).select(&[], 1, &|_| true),
            None
        );
    }

    /// A key whose ring owner is backend 0.
    fn key_of_backend_0(ch: &ConsistentHash) -> u64 {
        (0..)
            .map(key)
            .find(|&k| ch.ring.lookup(k) == Some(0))
            .unwrap()
    }

    #[test]
    fn unbounded_sends_a_hot_key_to_one_backend() {
        let b = states(&[1; 4]);
        let ch = build(&b, 0);
        let hot = key_of_backend_0(&ch);
        for _ in 0..100 {
            let i = ch.select(&b, hot, &|i| b[i].in_rotation()).unwrap();
            b[i].acquire();
        }
        assert_eq!(b[0].active(), 100);
    }

    #[test]
    fn bounded_load_spreads_a_hot_key_past_the_bound() {
        let b = states(&[1; 4]);
        let ch = build(&b, 125);
        let hot = key_of_backend_0(&ch);
        let mut order = Vec::new();
        for n in 0..100u64 {
            let i = ch.select(&b, hot, &|i| b[i].in_rotation()).unwrap();
            // Whatever was picked was under the bound for the load before it.
            let bound = (125 * (n + 1)).div_ceil(400);
            assert!((b[i].active() as u64) < bound, "pick {n}: {i}");
            b[i].acquire();
            order.push(i);
        }
        assert_eq!(order[0], 0);
        let active: Vec<u32> = b.iter().map(|s| s.active()).collect();
        assert!(active[0] <= 32, "{active:?}"); // ceil(1.25 * 100 / 4)
        assert!(active.iter().all(|&a| a > 0), "{active:?}");
        // Released again, the key goes home.
        for s in &b {
            while s.active() > 0 {
                s.release();
            }
        }
        assert_eq!(ch.select(&b, hot, &|i| b[i].in_rotation()), Some(0));
    }

    #[test]
    fn bounded_load_keeps_a_single_usable_backend() {
        let b = states(&[1; 3]);
        let ch = build(&b, 125);
        b[1].set_up(false);
        b[2].set_up(false);
        for _ in 0..10 {
            let i = ch.select(&b, key(9), &|i| b[i].in_rotation()).unwrap();
            assert_eq!(i, 0);
            b[i].acquire();
        }
    }
}
