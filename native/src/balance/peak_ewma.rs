//! Peak-EWMA (after Finagle's `p2cPeakEwma`, Linkerd's and tower's default balancer): power of
//! d choices (d = 3 here) on an estimate of the latency a new request would see,
//! `latency_ewma_ns * (active + 1) / effective_weight`.
//!
//! The latency estimate (`BackendState::observe_latency`) jumps up at once on a slow sample
//! and decays slowly back, also while the backend gets no traffic (it is read decayed, as in
//! Finagle), so a backend that turns slow loses traffic immediately and wins it back
//! gradually, and one unlucky sample cannot shut a backend out; multiplying by the load it
//! would have with this request keeps a fast backend from being flooded. Three distinct usable
//! candidates are drawn by `effective_weight` (see `CHOICES`) and the one of lower `cost` wins.
//!
//! A backend with no observation yet (estimate 0: new, or never connected) is *unknown*. While
//! it has nothing in flight it costs almost nothing, so it is tried at once and gets its first
//! observation (at L4 that is the connect time, a fraction of a millisecond later). While its
//! first request is in flight it costs as much as a very slow backend, so a burst does not pile
//! onto a backend nobody has measured (Finagle's "penalty"); unknown backends still compare by
//! load among themselves, so a pool that has measured nothing degrades to weighted p2c.

use super::random::pick;
use super::{BackendState, Selector};
use std::sync::Arc;

/// Latency assumed for an unknown backend with nothing in flight: 1 ns, below any
/// measurement, so that it is tried.
const UNKNOWN_IDLE_NS: f64 = 1.0;
/// Latency assumed for an unknown backend with requests in flight: 1000 s, above any real
/// latency, so that it gets no more until its first observation lands.
const UNKNOWN_BUSY_NS: f64 = 1e12;

/// Peak-EWMA selection.
#[derive(Debug, Default)]
pub struct PeakEwma {
    /// The pool's largest configured weight, for `random::pick` (0: unknown).
    max_weight: u32,
}

impl PeakEwma {
    pub fn new() -> Self {
        PeakEwma::default()
    }

    pub fn with_max_weight(max_weight: u32) -> Self {
        PeakEwma { max_weight }
    }
}

/// Expected cost of sending one more request to `b`: latency estimate (see the module doc for
/// unknown backends) times the load it would have, per unit of weight. Lower is better; a
/// weight of 0 costs infinity.
#[inline]
pub fn cost(b: &BackendState, now: u64) -> f64 {
    let active = b.active();
    let ewma = b.latency_estimate_ns(now);
    let latency = if ewma > 0.0 {
        ewma
    } else if active == 0 {
        UNKNOWN_IDLE_NS
    } else {
        UNKNOWN_BUSY_NS
    };
    latency * (active as f64 + 1.0) / b.effective_weight() as f64
}

/// Candidates compared per pick. Two (plain p2c) picks two slow backends with probability
/// s(s-1)/(n(n-1)) when s of n are slow, 2.2% for 2 of 10, which alone puts the slow latency
/// at p99 (bench/slow_backends.py measures it). Three makes that impossible with two slow
/// backends and rare with more (s(s-1)(s-2)/(n(n-1)(n-2)), 0.8% for 3 of 10), while the picks
/// stay random samples, so workers do not herd onto one "best" backend the way a scan for the
/// global minimum would.
const CHOICES: usize = 3;

/// Costs within this factor count as equal, and then the candidate drawn first (a random,
/// weighted pick) stays: otherwise, at low concurrency, the backend whose estimate is lowest by
/// a hair wins every draw it is in (measured: 26% of the requests for one of 8 equal fast
/// backends, against 12.5% fair). A slow backend or one more request in flight (twice the cost)
/// is still told apart.
const SAME_COST: f64 = 1.25;

impl Selector for PeakEwma {
    fn select(
        &self,
        backends: &[Arc<BackendState>],
        _key: u64,
        usable: &dyn Fn(usize) -> bool,
    ) -> Option<usize> {
        let mut rng = fastrand::Rng::new();
        let first = pick(backends, usable, &mut rng, self.max_weight)?;
        let now = super::now_ns();
        let mut drawn = [first; CHOICES];
        let (mut best, mut best_cost) = (first, cost(&backends[first], now));
        for n in 1..CHOICES {
            let seen = &drawn[..n];
            let Some(c) = pick(
                backends,
                &|i| !seen.contains(&i) && usable(i),
                &mut rng,
                self.max_weight,
            ) else {
                break;
            };
            drawn[n] = c;
            let c_cost = cost(&backends[c], now);
            if c_cost * SAME_COST < best_cost {
                (best, best_cost) = (c, c_cost);
            }
        }
        Some(best)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::tests_support::states;

    const MS: u64 = 1_000_000;

    /// Picks `n` times, acquiring on the pick; once `held` requests are in flight, each pick is
    /// followed by the release of a random one. Returns each backend's share of picks.
    fn simulate(b: &[Arc<BackendState>], n: usize, held: usize) -> Vec<f64> {
        let sel = PeakEwma::new();
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
    fn equal_latencies_share_by_weight_within_two_points() {
        fastrand::seed(5);
        let b = states(&[5, 3, 2]);
        for s in &b {
            s.observe_latency(MS);
        }
        let shares = simulate(&b, 10_000, 200);
        for (share, w) in shares.iter().zip([0.5, 0.3, 0.2]) {
            assert!((share - w).abs() < 0.02, "{shares:?}");
        }
    }

    #[test]
    fn a_much_slower_backend_gets_much_less() {
        fastrand::seed(5);
        let b = states(&[1, 1, 1]);
        b[0].observe_latency(MS);
        b[1].observe_latency(MS);
        b[2].observe_latency(50 * MS);
        let shares = simulate(&b, 10_000, 30);
        assert!(shares[2] < 0.05, "{shares:?}");
        assert!(shares[0] > 0.4 && shares[1] > 0.4, "{shares:?}");
    }

    /// The seed's scenario: 2 of 10 backends slow. Plain p2c would send ~2.2% of requests to
    /// a slow one (both candidates slow); three choices send none once both are measured.
    #[test]
    fn two_slow_of_ten_get_no_request_once_measured() {
        fastrand::seed(7);
        let b = states(&[1; 10]);
        for (i, s) in b.iter().enumerate() {
            s.observe_latency(if i < 2 { 40 * MS } else { MS });
        }
        let shares = simulate(&b, 20_000, 8);
        assert!(shares[0] + shares[1] < 0.001, "{shares:?}");
        assert!(shares[2..].iter().all(|&s| s > 0.08), "{shares:?}");
    }

    #[test]
    fn an_estimate_decays_while_the_backend_gets_no_traffic() {
        let b = states(&[1]);
        b[0].observe_latency(50 * MS);
        let now = crate::balance::now_ns();
        let later = b[0].latency_estimate_ns(now + 20_000 * MS);
        let expected = 50.0 * MS as f64 * (-2.0f64).exp();
        assert!(
            (later - expected).abs() < 0.01 * expected,
            "{later} vs {expected}"
        );
        assert!(b[0].latency_estimate_ns(now) > later);
    }

    #[test]
    fn picks_the_cheaper_of_the_two() {
        // With two usable backends both are always the candidates.
        fastrand::seed(5);
        let b = states(&[1, 1, 1]);
        b[2].set_up(false);
        b[0].observe_latency(10 * MS); // 10 ms * (0 + 1) = 10
        b[1].observe_latency(2 * MS);
        for _ in 0..2 {
            b[1].acquire(); // 2 ms * (2 + 1) = 6
        }
        let sel = PeakEwma::new();
        for _ in 0..1000 {
            assert_eq!(sel.select(&b, 0, &|i| b[i].in_rotation()), Some(1));
        }
        b[1].acquire(); // 8: within SAME_COST of 10, either may win
        let picks: Vec<_> = (0..1000)
            .map(|_| sel.select(&b, 0, &|i| b[i].in_rotation()).unwrap())
            .collect();
        assert!(picks.contains(&0) && picks.contains(&1));
        for _ in 0..3 {
            b[1].acquire(); // 2 ms * 7 = 14
        }
        for _ in 0..1000 {
            assert_eq!(sel.select(&b, 0, &|i| b[i].in_rotation()), Some(0));
        }
        let now = crate::balance::now_ns();
        assert!(cost(&b[0], now) < cost(&b[1], now));
    }

    #[test]
    fn an_unknown_backend_is_tried_but_not_flooded() {
        fastrand::seed(5);
        let b = states(&[1, 1, 1]);
        b[0].observe_latency(MS);
        b[1].observe_latency(MS);
        let sel = PeakEwma::new();
        // Nothing is released: the unknown backend gets one request, then waits to be measured.
        let mut picks = [0usize; 3];
        for _ in 0..1000 {
            let i = sel.select(&b, 0, &|i| b[i].in_rotation()).unwrap();
            b[i].acquire();
            picks[i] += 1;
        }
        assert_eq!(picks[2], 1, "{picks:?}");
        // Once measured as fast, it takes its share.
        b[2].observe_latency(MS / 2);
        for _ in 0..1000 {
            let i = sel.select(&b, 0, &|i| b[i].in_rotation()).unwrap();
            b[i].acquire();
            picks[i] += 1;
        }
        assert!(picks[2] > 500, "{picks:?}");
    }

    #[test]
    fn nothing_measured_degrades_to_weighted_p2c() {
        fastrand::seed(5);
        let b = states(&[1, 1, 1]);
        let sel = PeakEwma::new();
        for _ in 0..300 {
            let i = sel.select(&b, 0, &|i| b[i].in_rotation()).unwrap();
            b[i].acquire();
        }
        for s in &b {
            assert!((s.active() as i64 - 100).abs() <= 5, "{}", s.active());
        }
    }

    #[test]
    fn down_backends_are_never_picked_and_none_when_all_down() {
        fastrand::seed(5);
        let b = states(&[5, 3, 2]);
        for s in &b {
            s.observe_latency(MS);
        }
        b[0].set_up(false);
        let shares = simulate(&b, 10_000, 50);
        assert_eq!(shares[0], 0.0);
        for s in &b {
            s.set_up(false);
        }
        assert_eq!(PeakEwma::new().select(&b, 0, &|i| b[i].in_rotation()), None);
        assert_eq!(PeakEwma::new().select(&[], 0, &|_| true), None);
    }
}
