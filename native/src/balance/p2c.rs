//! Power of two choices (Mitzenmacher; Envoy's `LEAST_REQUEST` with `choice_count = 2`): draw
//! two distinct usable backends at random, weighted by `effective_weight`, and keep the one with
//! fewer active connections per unit of weight.
//!
//! Comparing two random candidates instead of scanning for the global minimum avoids the herd
//! effect of least connections when the counts are stale or shared by many workers (every
//! worker would pick the same "least" backend at once), while still reducing the maximum load
//! exponentially compared with random. It needs no shared cursor, only the global active
//! counts. `peak_ewma` draws three candidates the same way and compares a latency-aware cost.

use super::random::pick;
use super::{BackendState, Selector};
use std::sync::Arc;

/// Power-of-two-choices selection on active connections per weight.
#[derive(Debug, Default)]
pub struct P2c {
    /// The pool's largest configured weight, for `random::pick` (0: unknown).
    max_weight: u32,
}

impl P2c {
    pub fn new() -> Self {
        P2c::default()
    }

    pub fn with_max_weight(max_weight: u32) -> Self {
        P2c { max_weight }
    }
}

/// Two distinct usable backends drawn by weight (the second drawn among the others), or one
/// when only one is usable; `None` when none is.
pub fn two_candidates(
    backends: &[Arc<BackendState>],
    usable: &dyn Fn(usize) -> bool,
    rng: &mut fastrand::Rng,
    max_weight: u32,
) -> Option<(usize, Option<usize>)> {
    let a = pick(backends, usable, rng, max_weight)?;
    let b = pick(backends, &|i| i != a && usable(i), rng, max_weight);
    Some((a, b))
}

/// Whether `b` carries strictly less load per unit of weight than `a`
/// (`active_b / w_b < active_a / w_a`, cross-multiplied).
#[inline]
fn less_loaded(b: &BackendState, a: &BackendState) -> bool {
    (b.active() as u64) * (a.effective_weight() as u64)
        < (a.active() as u64) * (b.effective_weight() as u64)
}

impl Selector for P2c {
    fn select(
        &self,
        backends: &[Arc<BackendState>],
        _key: u64,
        usable: &dyn Fn(usize) -> bool,
    ) -> Option<usize> {
        match two_candidates(backends, usable, &mut fastrand::Rng::new(), self.max_weight)? {
            (a, Some(b)) if less_loaded(&backends[b], &backends[a]) => Some(b),
            (a, _) => Some(a),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::tests_support::{share_of_picks, states};

    #[test]
    fn shares_follow_weights_within_two_points() {
        fastrand::seed(3);
        let b = states(&[5, 3, 2]);
        // Idle backends tie, so the first (weighted) candidate wins.
        let shares = share_of_picks(&P2c::new(), &b, 10_000);
        for (share, w) in shares.iter().zip([0.5, 0.3, 0.2]) {
            assert!((share - w).abs() < 0.02, "{shares:?}");
        }
    }

    #[test]
    fn shares_follow_weights_under_load() {
        fastrand::seed(3);
        let b = states(&[5, 3, 2]);
        let p2c = P2c::new();
        let mut open: Vec<usize> = Vec::new();
        let mut counts = [0usize; 3];
        for _ in 0..10_000 {
            let i = p2c.select(&b, 0, &|i| b[i].in_rotation()).unwrap();
            b[i].acquire();
            open.push(i);
            counts[i] += 1;
            if open.len() > 100 {
                let j = open.swap_remove(fastrand::usize(..open.len()));
                b[j].release();
            }
        }
        for (c, w) in counts.iter().zip([0.5, 0.3, 0.2]) {
            assert!((*c as f64 / 10_000.0 - w).abs() < 0.02, "{counts:?}");
        }
    }

    #[test]
    fn candidates_are_distinct_and_usable() {
        fastrand::seed(3);
        let b = states(&[1, 1, 1, 1]);
        b[2].set_up(false);
        let mut rng = fastrand::Rng::with_seed(3);
        for _ in 0..1000 {
            let (a, c) = two_candidates(&b, &|i| b[i].in_rotation(), &mut rng, 0).unwrap();
            let c = c.unwrap();
            assert_ne!(a, c);
            assert!(a != 2 && c != 2);
        }
    }

    #[test]
    fn picks_the_better_of_the_two() {
        // With two usable backends both are always the candidates: the pick must be the one
        // with fewer active connections per weight, whatever the draw order.
        fastrand::seed(3);
        let b = states(&[2, 1, 1]);
        b[2].set_up(false);
        for _ in 0..4 {
            b[0].acquire(); // 4/2 = 2
        }
        for _ in 0..3 {
            b[1].acquire(); // 3/1 = 3
        }
        let p2c = P2c::new();
        for _ in 0..1000 {
            assert_eq!(p2c.select(&b, 0, &|i| b[i].in_rotation()), Some(0));
        }
        b[0].acquire();
        b[0].acquire();
        b[0].acquire(); // 7/2 = 3.5
        for _ in 0..1000 {
            assert_eq!(p2c.select(&b, 0, &|i| b[i].in_rotation()), Some(1));
        }
    }

    #[test]
    fn one_usable_backend_is_picked() {
        let b = states(&[1, 1, 1]);
        b[0].set_up(false);
        b[2].set_up(false);
        b[1].acquire();
        let p2c = P2c::new();
        for _ in 0..100 {
            assert_eq!(p2c.select(&b, 0, &|i| b[i].in_rotation()), Some(1));
        }
    }

    #[test]
    fn down_backends_are_never_picked_and_none_when_all_down() {
        fastrand::seed(3);
        let b = states(&[5, 3, 2]);
        b[1].set_up(false);
        let shares = share_of_picks(&P2c::new(), &b, 10_000);
        assert_eq!(shares[1], 0.0);
        for s in &b {
            s.set_up(false);
        }
        assert_eq!(P2c::new().select(&b, 0, &|i| b[i].in_rotation()), None);
        assert_eq!(P2c::new().select(&[], 0, &|_| true), None);
    }
}
