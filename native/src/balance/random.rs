//! Weighted random: each usable backend is picked with probability
//! `effective_weight / sum of the usable backends' effective weights`.
//!
//! No shared state at all (each worker draws from its own thread-local generator), so it is
//! the cheapest algorithm under contention; over many picks its shares follow the weights,
//! with the variance of a coin toss. One pass over the backends (weighted reservoir sampling
//! of one item), so every backend's weight and `usable` are read once per pick even while the
//! admin API or slow start change them. `p2c` and `peak_ewma` draw their candidates here.

use super::{BackendState, Selector};
use std::sync::Arc;

/// Weighted random selection over the usable backends.
#[derive(Debug, Default)]
pub struct WeightedRandom {
    /// The largest configured weight of the pool (0: unknown, always scan); see `pick`.
    max_weight: u32,
}

impl WeightedRandom {
    pub fn new() -> Self {
        WeightedRandom::default()
    }

    pub fn with_max_weight(max_weight: u32) -> Self {
        WeightedRandom { max_weight }
    }
}

/// Draws before `pick` falls back to the scan (a pool where most backends are unusable).
const REJECTION_TRIES: usize = 16;

/// `weighted_pick` in O(1) for the usual pool: draw a backend uniformly and accept it with
/// probability `effective_weight / max_weight` (rejection sampling, exact since no effective
/// weight exceeds the configured maximum: slow start only scales down, and a weight changed
/// through the admin API rebuilds the selector). The scan alone cost 5 µs per pick with 1000
/// backends (bench/micro). After `REJECTION_TRIES` misses, the scan decides; either way each
/// usable backend is chosen with probability proportional to its weight.
pub fn pick(
    backends: &[Arc<BackendState>],
    usable: &dyn Fn(usize) -> bool,
    rng: &mut fastrand::Rng,
    max_weight: u32,
) -> Option<usize> {
    if max_weight > 0 && !backends.is_empty() {
        for _ in 0..REJECTION_TRIES {
            let i = rng.usize(..backends.len());
            if !usable(i) {
                continue;
            }
            let w = backends[i].effective_weight();
            if w > 0 && (w >= max_weight || rng.u32(..max_weight) < w) {
                return Some(i);
            }
        }
    }
    weighted_pick(backends, usable, rng)
}

/// One backend for which `usable(i)` holds, with probability proportional to its
/// `effective_weight`; `None` when no usable backend has a weight above 0.
///
/// Weighted reservoir sampling: walking the backends with a running total `T`, backend `i`
/// replaces the choice with probability `w_i / T`, which leaves each backend chosen with
/// probability `w_i / W` at the end.
pub fn weighted_pick(
    backends: &[Arc<BackendState>],
    usable: &dyn Fn(usize) -> bool,
    rng: &mut fastrand::Rng,
) -> Option<usize> {
    let mut total: u64 = 0;
    let mut chosen = None;
    for (i, b) in backends.iter().enumerate() {
        if !usable(i) {
            continue;
        }
        let w = b.effective_weight() as u64;
        if w == 0 {
            continue;
        }
        total += w;
        if rng.u64(0..total) < w {
            chosen = Some(i);
        }
    }
    chosen
}

impl Selector for WeightedRandom {
    fn select(
        &self,
        backends: &[Arc<BackendState>],
        _key: u64,
        usable: &dyn Fn(usize) -> bool,
    ) -> Option<usize> {
        // Forked from the thread-local generator: one thread-local access per pick.
        pick(backends, usable, &mut fastrand::Rng::new(), self.max_weight)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::tests_support::{share_of_picks, states};

    /// The O(1) rejection path (a known maximum weight) keeps the shares exact: weights, a
    /// slow-start scale below the maximum, and a pool where most backends are unusable (the
    /// scan fallback).
    #[test]
    fn rejection_sampling_follows_weights() {
        fastrand::seed(11);
        let b = states(&[5, 3, 2]);
        let shares = share_of_picks(&WeightedRandom::with_max_weight(5), &b, 20_000);
        for (share, w) in shares.iter().zip([0.5, 0.3, 0.2]) {
            assert!((share - w).abs() < 0.02, "{shares:?}");
        }
        b[0].set_weight_scale(400); // effective 2 of 5: shares 2/7, 3/7, 2/7
        let shares = share_of_picks(&WeightedRandom::with_max_weight(5), &b, 20_000);
        for (share, w) in shares.iter().zip([2.0 / 7.0, 3.0 / 7.0, 2.0 / 7.0]) {
            assert!((share - w).abs() < 0.02, "{shares:?}");
        }
        let many = states(&[1; 1000]);
        for s in &many[..998] {
            s.set_up(false);
        }
        let shares = share_of_picks(&WeightedRandom::with_max_weight(1), &many, 2_000);
        assert!((shares[998] - 0.5).abs() < 0.05, "{:?}", &shares[998..]);
        assert!((shares[999] - 0.5).abs() < 0.05, "{:?}", &shares[998..]);
    }

    #[test]
    fn shares_follow_weights_within_two_points() {
        fastrand::seed(7);
        let b = states(&[5, 3, 2]);
        let shares = share_of_picks(&WeightedRandom::new(), &b, 10_000);
        for (share, w) in shares.iter().zip([0.5, 0.3, 0.2]) {
            assert!((share - w).abs() < 0.02, "{shares:?}");
        }
    }

    #[test]
    fn slow_start_scale_lowers_the_share() {
        fastrand::seed(7);
        let b = states(&[4, 4]);
        b[1].set_weight_scale(250); // effective weights 4 and 1
        let shares = share_of_picks(&WeightedRandom::new(), &b, 10_000);
        assert!((shares[0] - 0.8).abs() < 0.02, "{shares:?}");
    }

    #[test]
    fn down_backends_are_never_picked() {
        fastrand::seed(7);
        let b = states(&[5, 3, 2]);
        b[0].set_up(false);
        let shares = share_of_picks(&WeightedRandom::new(), &b, 10_000);
        assert_eq!(shares[0], 0.0);
        assert!((shares[1] - 0.6).abs() < 0.02, "{shares:?}");
    }

    #[test]
    fn nothing_usable_gives_none() {
        let b = states(&[1, 1, 0]);
        b[0].set_up(false);
        b[1].set_up(false);
        let r = WeightedRandom::new();
        assert_eq!(r.select(&b, 0, &|i| b[i].in_rotation()), None);
        assert_eq!(r.select(&[], 0, &|_| true), None);
        // A zero weight is never picked, even by a filter that lets it through.
        assert_eq!(r.select(&b, 0, &|i| i == 2), None);
    }
}
