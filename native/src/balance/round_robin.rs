//! Smooth weighted round robin (nginx's algorithm), shared by every worker without a lock.
//!
//! nginx keeps a mutable `current_weight` per backend and per worker; sharing that across
//! workers would need a lock. Instead the smooth sequence for the configured weights is
//! computed once when the pool is built (weights reduced by their gcd, so weights 5/3/2 give a
//! 10-entry table), and workers walk it with one shared atomic counter. Backends that are not
//! usable are skipped by walking on; a weight change through the admin API rebuilds the pool.
//! A fixed sequence cannot divide by a slow-start scale, so a ramping backend instead declines
//! each turn with probability 1 - scale (`BackendState::admits_during_slow_start`).

use super::{reduced_weights, BackendState, Selector};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

/// Largest table kept; beyond it weights are scaled down (ratios stay within 1/TABLE_MAX).
const TABLE_MAX: u64 = 1 << 16;

pub struct RoundRobin {
    /// The smooth sequence of backend indices, one period long.
    sequence: Vec<u32>,
    next: AtomicUsize,
}

impl RoundRobin {
    pub fn new(weights: &[u32]) -> Self {
        RoundRobin {
            sequence: smooth_sequence(weights),
            next: AtomicUsize::new(0),
        }
    }
}

/// One period of nginx's smooth weighted round robin over `weights`.
pub fn smooth_sequence(weights: &[u32]) -> Vec<u32> {
    let reduced = reduced_weights(weights, TABLE_MAX);
    let total: u64 = reduced.iter().sum();
    let mut current = vec![0i64; reduced.len()];
    let mut sequence = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = usize::MAX;
        for (i, &w) in reduced.iter().enumerate() {
            if w == 0 {
                continue;
            }
            current[i] += w as i64;
            if best == usize::MAX || current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total as i64;
        sequence.push(best as u32);
    }
    sequence
}

impl Selector for RoundRobin {
    fn select(
        &self,
        backends: &[Arc<BackendState>],
        _key: u64,
        usable: &dyn Fn(usize) -> bool,
    ) -> Option<usize> {
        let len = self.sequence.len();
        if len > 0 {
            let start = self.next.fetch_add(1, Relaxed);
            // Turns a slow-starting backend declined: they pass to the next entry without
            // moving the cursor, so the backend's share is its scale times its full share.
            let mut declined = 0;
            for step in 0..len {
                let i = self.sequence[(start + step) % len] as usize;
                if usable(i) {
                    if !backends[i].admits_during_slow_start() {
                        declined += 1;
                        continue;
                    }
                    if step > declined {
                        // Skipped some: move the shared cursor past them so the next pick
                        // does not land on the same survivor (keeps the survivors' shares even).
                        self.next.fetch_add(step - declined, Relaxed);
                    }
                    return Some(i);
                }
            }
        }
        // Only zero-weight (from the config) backends remain, e.g. weights changed at runtime.
        (0..backends.len()).find(|&i| usable(i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::tests_support::{share_of_picks, states};

    #[test]
    fn sequence_is_smooth_and_weighted() {
        // nginx's documented example: weights 5, 1, 1 -> a a b a c a a
        assert_eq!(smooth_sequence(&[5, 1, 1]), vec![0, 0, 1, 0, 2, 0, 0]);
        assert_eq!(smooth_sequence(&[10, 6, 4]).len(), 10);
    }

    #[test]
    fn shares_follow_weights_within_two_points() {
        let weights = [5, 3, 2];
        let b = states(&weights);
        let rr = RoundRobin::new(&weights);
        let shares = share_of_picks(&rr, &b, 10_000);
        for (share, w) in shares.iter().zip([0.5, 0.3, 0.2]) {
            assert!((share - w).abs() < 0.02, "{shares:?}");
        }
    }

    #[test]
    fn down_backend_is_skipped_and_the_rest_share_evenly() {
        let b = states(&[1, 1, 1]);
        b[1].set_up(false);
        let rr = RoundRobin::new(&[1, 1, 1]);
        let shares = share_of_picks(&rr, &b, 10_000);
        assert_eq!(shares[1], 0.0);
        assert!((shares[0] - 0.5).abs() < 0.02, "{shares:?}");
    }
}
