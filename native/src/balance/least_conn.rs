//! Weighted least connections (HAProxy `leastconn`, nginx `least_conn`): the usable backend
//! with the fewest active connections per unit of weight.
//!
//! The active counts are the global ones in `BackendState` (every worker's connections or
//! requests), not a per-worker view, so N workers do not each send their "first" connection to
//! the same idle backend. The score is `(active + 1) / effective_weight`: the load the backend
//! would have with this connection, so that among idle backends the heaviest goes first, and
//! compared by cross-multiplication in integers (no floats, no rounding ties). Equal scores are
//! broken by a shared rotating start index, so that equal idle backends take turns instead of
//! the first one taking every short-lived connection.

use super::{BackendState, Selector};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

/// Weighted least-connections selection.
#[derive(Debug, Default)]
pub struct LeastConn {
    /// Where the next scan starts; ties go to the first backend at or after it.
    next: AtomicUsize,
}

impl LeastConn {
    pub fn new() -> Self {
        LeastConn {
            next: AtomicUsize::new(0),
        }
    }
}

/// Whether load `a_load / a_weight` is strictly below `b_load / b_weight`, without dividing.
/// A weight of 0 counts as an infinite load (never below anything).
#[inline]
fn lower(a_load: u64, a_weight: u64, b_load: u64, b_weight: u64) -> bool {
    a_load * b_weight < b_load * a_weight
}

impl Selector for LeastConn {
    fn select(
        &self,
        backends: &[Arc<BackendState>],
        _key: u64,
        usable: &dyn Fn(usize) -> bool,
    ) -> Option<usize> {
        let n = backends.len();
        if n == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Relaxed) % n;
        // (index, distance from start, active + 1, weight)
        let mut best: Option<(usize, usize, u64, u64)> = None;
        for step in 0..n {
            let i = if start + step >= n {
                start + step - n
            } else {
                start + step
            };
            if !usable(i) {
                continue;
            }
            let b = &backends[i];
            let (load, weight) = (b.active() as u64 + 1, b.effective_weight() as u64);
            match best {
                Some((_, _, best_load, best_weight))
                    if !lower(load, weight, best_load, best_weight) => {}
                _ => best = Some((i, step, load, weight)),
            }
        }
        let (i, step, _, _) = best?;
        if step > 0 {
            // Move the shared start past the pick, so that the next tie goes to the backend
            // after it even when the ones before it are down (keeps tied shares even).
            self.next.fetch_add(step, Relaxed);
        }
        Some(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::tests_support::{share_of_picks, states};

    /// Picks `n` times, acquiring on the pick; once `held` connections are open, each pick is
    /// followed by the release of a random open one. Returns each backend's share of picks.
    fn simulate(sel: &LeastConn, b: &[Arc<BackendState>], n: usize, held: usize) -> Vec<f64> {
        let mut open: Vec<usize> = Vec::new();
        let mut counts = vec![0usize; b.len()];
        for _ in 0..n {
            let i = sel
                .select(b, 0, &|i| b[i].in_rotation())
                .expect("a usable backend");
            b[i].acquire();
            open.push(i);
            counts[i] += 1;
            if open.len() > held {
                let j = open.swap_remove(fastrand::usize(..open.len()));
                b[j].release();
            }
        }
        counts.iter().map(|&c| c as f64 / n as f64).collect()
    }

    #[test]
    fn shares_follow_weights_within_two_points_under_churn() {
        fastrand::seed(11);
        let b = states(&[5, 3, 2]);
        let shares = simulate(&LeastConn::new(), &b, 10_000, 100);
        for (share, w) in shares.iter().zip([0.5, 0.3, 0.2]) {
            assert!((share - w).abs() < 0.02, "{shares:?}");
        }
    }

    #[test]
    fn open_connections_follow_weights_exactly() {
        let b = states(&[5, 3, 2]);
        let lc = LeastConn::new();
        for _ in 0..1000 {
            let i = lc.select(&b, 0, &|i| b[i].in_rotation()).unwrap();
            b[i].acquire();
        }
        let active: Vec<u32> = b.iter().map(|s| s.active()).collect();
        assert_eq!(active, vec![500, 300, 200]);
    }

    #[test]
    fn picks_the_minimum_active_per_weight() {
        let b = states(&[1, 2, 1]);
        for _ in 0..6 {
            b[0].acquire(); // (6+1)/1 = 7
        }
        for _ in 0..5 {
            b[1].acquire(); // (5+1)/2 = 3
        }
        for _ in 0..3 {
            b[2].acquire(); // (3+1)/1 = 4
        }
        let lc = LeastConn::new();
        for _ in 0..5 {
            assert_eq!(lc.select(&b, 0, &|i| b[i].in_rotation()), Some(1));
        }
        b[1].acquire(); // 7/2 = 3.5
        b[1].acquire(); // 8/2 = 4: tie with backend 2, both get turns
        let picks: Vec<usize> = (0..4)
            .map(|_| lc.select(&b, 0, &|i| b[i].in_rotation()).unwrap())
            .collect();
        assert!(picks.contains(&1) && picks.contains(&2) && !picks.contains(&0));
    }

    #[test]
    fn ties_rotate_evenly_even_past_a_down_backend() {
        let b = states(&[1, 1, 1]);
        b[0].set_up(false);
        let shares = share_of_picks(&LeastConn::new(), &b, 10_000);
        assert_eq!(shares, vec![0.0, 0.5, 0.5]);
    }

    #[test]
    fn down_backends_are_never_picked() {
        fastrand::seed(11);
        let b = states(&[5, 3, 2]);
        b[0].set_up(false);
        let shares = simulate(&LeastConn::new(), &b, 10_000, 50);
        assert_eq!(shares[0], 0.0);
        assert!((shares[1] - 0.6).abs() < 0.02, "{shares:?}");
    }

    #[test]
    fn nothing_usable_gives_none() {
        let b = states(&[1, 1]);
        b[0].set_up(false);
        b[1].set_up(false);
        let lc = LeastConn::new();
        assert_eq!(lc.select(&b, 0, &|i| b[i].in_rotation()), None);
        assert_eq!(lc.select(&[], 0, &|_| true), None);
    }
}
