//! Ketama consistent-hash ring (libketama, nginx `hash ... consistent`, Pingora's
//! `pingora-ketama`), standalone so that it can be tested and golden-vectored on its own.
//!
//! Each backend puts 160 points on a 64-bit circle per unit of weight, after the weights are
//! divided by their gcd (weights 2/2/2 give the same ring as 1/1/1). Point `j` of backend
//! `name` sits at `xxh3_64("{name}-{j}")` (seedless xxh3, the same hash as
//! `balance::hash_key`), so the ring depends only on the names and weights, never on their
//! order or on the process. A key belongs to the first point clockwise at or after it, so
//! adding a backend only takes keys from its neighbours and removing one only moves its own.
//!
//! Health is not the ring's concern: `candidates` walks on clockwise from the key and the
//! caller (`balance::consistent_hash`) skips backends that are not usable, so a health flip
//! never rebuilds the ring and moves only the keys of the backend that flipped.

use crate::balance::{hash_key, reduced_weights};

/// Points per unit of (gcd-reduced) weight, as in libketama and nginx.
pub const POINTS_PER_WEIGHT: u64 = 160;

/// Largest total of reduced weights kept (4096 units = 655,360 points, 10 MiB); beyond it the
/// weights are scaled down so that their ratios stay within 1/4096.
const UNITS_MAX: u64 = 1 << 12;

/// A sorted ketama ring over backend indices.
#[derive(Debug, Clone, Default)]
pub struct HashRing {
    /// `(point, backend index)` sorted by point (then index, so that equal points are ordered
    /// the same way in every process).
    points: Vec<(u64, u32)>,
    /// How many distinct backends have points (those with a weight above 0).
    members: usize,
}

impl HashRing {
    /// Builds the ring; `names[i]` and `weights[i]` describe backend `i`. Backends with weight
    /// 0 get no points. Two backends with the same name get the same points and the lower
    /// index wins every one of them.
    pub fn new(names: &[&str], weights: &[u32]) -> Self {
        debug_assert_eq!(names.len(), weights.len());
        let units = reduced_weights(weights, UNITS_MAX);
        let total: u64 = units.iter().sum();
        let mut points = Vec::with_capacity((total * POINTS_PER_WEIGHT) as usize);
        for (i, (name, &u)) in names.iter().zip(&units).enumerate() {
            for j in 0..u * POINTS_PER_WEIGHT {
                points.push((point_hash(name, j), i as u32));
            }
        }
        points.sort_unstable();
        HashRing {
            points,
            members: units.iter().filter(|&&u| u > 0).count(),
        }
    }

    /// Number of points on the ring.
    pub fn len(&self) -> usize {
        self.points.len()
    }

    /// Whether the ring has no points (no backend with a weight above 0).
    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }

    /// Number of distinct backends on the ring.
    pub fn members(&self) -> usize {
        self.members
    }

    /// Position of the first point at or after `key`, wrapping to 0 past the last point.
    #[inline]
    fn position(&self, key: u64) -> usize {
        let p = self.points.partition_point(|&(point, _)| point < key);
        if p == self.points.len() {
            0
        } else {
            p
        }
    }

    /// The backend owning `key`: the one at the first point at or after it (clockwise,
    /// wrapping). `None` when the ring is empty.
    #[inline]
    pub fn lookup(&self, key: u64) -> Option<usize> {
        if self.points.is_empty() {
            return None;
        }
        Some(self.points[self.position(key)].1 as usize)
    }

    /// Backends in fallback order for `key`: the owner of every point clockwise from the key,
    /// each point once and around the ring once (so a backend appears once per point it has;
    /// callers that need distinct backends skip repeats). Empty when the ring is empty.
    pub fn candidates(&self, key: u64) -> impl Iterator<Item = usize> + '_ {
        let len = self.points.len();
        let start = if len == 0 { 0 } else { self.position(key) };
        (0..len).map(move |step| self.points[(start + step) % len].1 as usize)
    }
}

/// Where point `j` of backend `name` sits: `xxh3_64` of the bytes of `"{name}-{j}"`.
fn point_hash(name: &str, j: u64) -> u64 {
    hash_key(format!("{name}-{j}").as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEYS: u64 = 100_000;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.0.0.{}:8080", i + 1)).collect()
    }

    fn ring(names: &[String], weights: &[u32]) -> HashRing {
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        HashRing::new(&refs, weights)
    }

    fn key(k: u64) -> u64 {
        hash_key(&k.to_le_bytes())
    }

    #[test]
    fn points_per_weight_after_gcd_and_zero_weight_gets_none() {
        let n = names(3);
        assert_eq!(ring(&n, &[1, 1, 1]).len(), 480);
        assert_eq!(ring(&n, &[2, 2, 2]).len(), 480);
        assert_eq!(ring(&n, &[4, 2, 0]).len(), 480);
        assert_eq!(ring(&n, &[4, 2, 0]).members(), 2);
        let r = ring(&n, &[4, 2, 0]);
        assert!((0..KEYS).all(|k| r.lookup(key(k)) != Some(2)));
        assert!(r.candidates(key(7)).all(|i| i != 2));
    }

    #[test]
    fn empty_ring_finds_nothing() {
        let r = HashRing::new(&[], &[]);
        assert!(r.is_empty());
        assert_eq!(r.lookup(42), None);
        assert_eq!(r.candidates(42).count(), 0);
        assert_eq!(ring(&names(2), &[0, 0]).lookup(42), None);
    }

    #[test]
    fn huge_weights_are_scaled_down() {
        let r = ring(&names(3), &[1000, 999, 1]);
        assert!(r.len() as u64 <= (UNITS_MAX + 3) * POINTS_PER_WEIGHT);
        assert_eq!(r.members(), 3);
    }

    #[test]
    fn lookup_is_first_point_at_or_after_key_and_wraps() {
        let r = ring(&names(3), &[1, 1, 1]);
        let (first, last) = (r.points[0], r.points[r.len() - 1]);
        assert_eq!(r.lookup(first.0), Some(first.1 as usize));
        assert_eq!(r.lookup(0), Some(first.1 as usize));
        assert_eq!(r.lookup(last.0), Some(last.1 as usize));
        assert_eq!(r.lookup(last.0 + 1), Some(first.1 as usize));
        assert_eq!(r.lookup(u64::MAX), Some(first.1 as usize));
        let mid = r.points[100];
        assert_eq!(r.lookup(r.points[99].0 + 1), Some(mid.1 as usize));
    }

    #[test]
    fn candidates_walk_every_point_once_starting_at_the_owner() {
        let r = ring(&names(4), &[1, 2, 1, 1]);
        let k = key(12345);
        let walk: Vec<usize> = r.candidates(k).collect();
        assert_eq!(walk.len(), r.len());
        assert_eq!(Some(walk[0]), r.lookup(k));
        for i in 0..4 {
            let expected = if i == 1 { 320 } else { 160 };
            assert_eq!(walk.iter().filter(|&&c| c == i).count(), expected);
        }
    }

    /// Guards against accidental changes of the point hash or the lookup: these values must
    /// never change, or every deployed ring would remap its keys.
    #[test]
    fn golden_vectors() {
        let n = [
            "10.0.0.1:80",
            "10.0.0.2:80",
            "10.0.0.3:80",
            "10.0.0.4:80",
            "10.0.0.5:80",
        ];
        let r = HashRing::new(&n, &[1, 1, 1, 1, 1]);
        assert_eq!(point_hash("10.0.0.1:80", 0), GOLDEN_POINT);
        let got: Vec<usize> = GOLDEN_KEYS.iter().map(|&k| r.lookup(k).unwrap()).collect();
        assert_eq!(got, GOLDEN_OWNERS);
    }
    const GOLDEN_POINT: u64 = 8_520_510_903_655_117_293;
    const GOLDEN_KEYS: [u64; 8] = [
        0,
        1,
        42,
        0x8000_0000_0000_0000,
        u64::MAX,
        0x1234_5678_9abc_def0,
        0xdead_beef_cafe_f00d,
        0x0123_4567_89ab_cdef,
    ];
    const GOLDEN_OWNERS: [usize; 8] = [0, 0, 0, 1, 0, 0, 4, 1];

    fn moved_fraction(a: &HashRing, b: &HashRing) -> f64 {
        let moved = (0..KEYS)
            .filter(|&k| a.lookup(key(k)) != b.lookup(key(k)))
            .count();
        moved as f64 / KEYS as f64
    }

    #[test]
    fn adding_an_eleventh_backend_moves_about_one_eleventh() {
        let ten = ring(&names(10), &[1; 10]);
        let eleven = ring(&names(11), &[1; 11]);
        let moved = moved_fraction(&ten, &eleven);
        println!("ring 10->11 moved fraction: {moved:.4}");
        assert!(moved <= 1.2 / 11.0, "{moved}");
        // Every key that moved, moved to the new backend.
        assert!((0..KEYS).all(|k| {
            let (before, after) = (ten.lookup(key(k)), eleven.lookup(key(k)));
            before == after || after == Some(10)
        }));
    }

    #[test]
    fn removing_a_backend_moves_only_its_keys() {
        let all = names(10);
        let r = ring(&all, &[1; 10]);
        let mut fewer = all.clone();
        fewer.remove(3);
        let r9 = ring(&fewer, &[1; 9]);
        for k in 0..KEYS {
            let before = r.lookup(key(k)).unwrap();
            let after = &fewer[r9.lookup(key(k)).unwrap()];
            if before != 3 {
                assert_eq!(&all[before], after, "key {k}");
            }
        }
        // Skipping it on the walk (as the usable filter does) gives the same answer.
        for k in 0..KEYS {
            let walked = r.candidates(key(k)).find(|&i| i != 3).unwrap();
            assert_eq!(&all[walked], &fewer[r9.lookup(key(k)).unwrap()]);
        }
    }

    #[test]
    fn weights_three_to_one_share_within_two_points() {
        let r = ring(&names(2), &[3, 1]);
        let first = (0..KEYS).filter(|&k| r.lookup(key(k)) == Some(0)).count();
        let share = first as f64 / KEYS as f64;
        println!("ring 3:1 share of the first: {share:.4}");
        assert!((share - 0.75).abs() < 0.02, "{share}");
    }
}
