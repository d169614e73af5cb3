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
pub struct WeightedRandom;

impl WeightedRandom {
    pub fn new() -> Self {
        WeightedRandom
    }
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
        weighted_pick(backends, usable, &mut fastrand::Rng::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::tests_support::{share_of_picks, states};

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
        assert_eq!(r.select(&b, 0, &|i| b[i].usable()), None);
        assert_eq!(r.select(&[], 0, &|_| true), None);
        // A zero weight is never picked, even by a filter that lets it through.
        assert_eq!(r.select(&b, 0, &|i| i == 2), None);
    }
}
