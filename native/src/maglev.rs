//! Maglev lookup table (Google's Maglev paper, section 3.4; weighted as in Envoy's
//! `maglev_lb.cc`), standalone so that it can be tested and golden-vectored on its own.
//!
//! Every backend has a permutation of the `M = 65537` table slots, given by an `offset` and a
//! `skip` hashed from its name (`xxh64(name, 0xf00d) % M` and `xxh64(name, 0xbeef) % (M-1) + 1`;
//! `M` is prime, so every skip visits every slot). Backends take turns claiming their next
//! free slot until the table is full; a backend of weight `w` takes a turn on `w/max_weight` of
//! the rounds, so it ends with a share of the slots proportional to its weight. A lookup is one
//! array index, and adding or removing one backend disturbs few slots beyond its own share.
//!
//! Compared with the ketama ring (`ring.rs`): O(1) lookups and a near-exact weighted split, at
//! the price of a fixed 256 KiB table per pool and somewhat more keys moving on a change.

/// Table size: a prime, so that every skip yields a full permutation (Envoy's default).
pub const TABLE_SIZE: u64 = 65537;
/// Seed of the hash that gives a backend's first slot.
const OFFSET_SEED: u64 = 0xf00d;
/// Seed of the hash that gives a backend's stride.
const SKIP_SEED: u64 = 0xbeef;

/// A filled Maglev table over backend indices.
#[derive(Debug, Clone, Default)]
pub struct MaglevTable {
    /// `TABLE_SIZE` backend indices, or empty when no backend has a weight above 0.
    entries: Vec<u32>,
}

/// A backend's state while the table fills.
struct Builder {
    index: u32,
    offset: u64,
    skip: u64,
    /// Position in the permutation of the next slot to try.
    next: u64,
    weight: u64,
    /// Slots claimed so far.
    claimed: u64,
}

impl MaglevTable {
    /// Builds the table; `names[i]` and `weights[i]` describe backend `i`. Backends with
    /// weight 0 get no entries. With more backends than slots, some get none.
    pub fn new(names: &[&str], weights: &[u32]) -> Self {
        debug_assert_eq!(names.len(), weights.len());
        let mut builders: Vec<Builder> = names
            .iter()
            .zip(weights)
            .enumerate()
            .filter(|(_, (_, &w))| w > 0)
            .map(|(i, (name, &w))| Builder {
                index: i as u32,
                offset: xxhash_rust::xxh64::xxh64(name.as_bytes(), OFFSET_SEED) % TABLE_SIZE,
                skip: xxhash_rust::xxh64::xxh64(name.as_bytes(), SKIP_SEED) % (TABLE_SIZE - 1) + 1,
                next: 0,
                weight: w as u64,
                claimed: 0,
            })
            .collect();
        let Some(max_weight) = builders.iter().map(|b| b.weight).max() else {
            return MaglevTable::default();
        };
        const EMPTY: u32 = u32::MAX;
        let mut entries = vec![EMPTY; TABLE_SIZE as usize];
        let mut filled = 0;
        // Envoy's rule, in integers: in round `r` a backend takes a turn while
        // `r * weight / max_weight >= claimed`, so the heaviest takes one every round.
        let mut round: u64 = 1;
        while filled < TABLE_SIZE {
            for b in builders.iter_mut() {
                if round * b.weight < b.claimed * max_weight {
                    continue;
                }
                let mut slot = (b.offset + b.skip * b.next) % TABLE_SIZE;
                while entries[slot as usize] != EMPTY {
                    b.next += 1;
                    slot = (b.offset + b.skip * b.next) % TABLE_SIZE;
                }
                entries[slot as usize] = b.index;
                b.next += 1;
                b.claimed += 1;
                filled += 1;
                if filled == TABLE_SIZE {
                    break;
                }
            }
            round += 1;
        }
        MaglevTable { entries }
    }

    /// The backend for `key`: `entries[key % M]`. `None` when no backend has a weight.
    #[inline]
    pub fn lookup(&self, key: u64) -> Option<usize> {
        if self.entries.is_empty() {
            return None;
        }
        Some(self.entries[(key % TABLE_SIZE) as usize] as usize)
    }

    /// Number of entries: `TABLE_SIZE`, or 0 when empty.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the table is empty (no backend with a weight above 0).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::hash_key;

    const KEYS: u64 = 100_000;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.0.0.{}:8080", i + 1)).collect()
    }

    fn table(names: &[String], weights: &[u32]) -> MaglevTable {
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        MaglevTable::new(&refs, weights)
    }

    fn key(k: u64) -> u64 {
        hash_key(&k.to_le_bytes())
    }

    fn slots_of(t: &MaglevTable, i: usize) -> usize {
        t.entries.iter().filter(|&&e| e as usize == i).count()
    }

    #[test]
    fn equal_weights_split_the_table_evenly() {
        let t = table(&names(5), &[1; 5]);
        assert_eq!(t.len(), TABLE_SIZE as usize);
        for i in 0..5 {
            let slots = slots_of(&t, i) as i64;
            assert!((slots - TABLE_SIZE as i64 / 5).abs() <= 1, "{slots}");
        }
    }

    #[test]
    fn zero_weight_gets_no_entries_and_empty_finds_nothing() {
        let t = table(&names(3), &[2, 0, 1]);
        assert_eq!(slots_of(&t, 1), 0);
        assert!(MaglevTable::new(&[], &[]).lookup(1).is_none());
        assert!(table(&names(2), &[0, 0]).is_empty());
        assert_eq!(table(&names(2), &[0, 0]).lookup(1), None);
    }

    /// Guards against accidental changes of the hashes or the fill order: these values must
    /// never change, or every deployed table would remap its keys.
    #[test]
    fn golden_vectors() {
        let n = [
            "10.0.0.1:80",
            "10.0.0.2:80",
            "10.0.0.3:80",
            "10.0.0.4:80",
            "10.0.0.5:80",
        ];
        let t = MaglevTable::new(&n, &[1, 1, 1, 1, 1]);
        let got: Vec<usize> = GOLDEN_KEYS.iter().map(|&k| t.lookup(k).unwrap()).collect();
        assert_eq!(got, GOLDEN_OWNERS);
    }
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
    const GOLDEN_OWNERS: [usize; 8] = [2, 1, 1, 2, 2, 0, 1, 2];

    #[test]
    fn adding_an_eleventh_backend_moves_about_one_eleventh() {
        let ten = table(&names(10), &[1; 10]);
        let eleven = table(&names(11), &[1; 11]);
        let moved = (0..KEYS)
            .filter(|&k| ten.lookup(key(k)) != eleven.lookup(key(k)))
            .count() as f64
            / KEYS as f64;
        println!("maglev 10->11 moved fraction: {moved:.4}");
        assert!(moved <= 1.2 / 11.0, "{moved}");
    }

    #[test]
    fn removing_a_backend_moves_mostly_its_keys() {
        // Maglev rebuilds the permutation fill, so a removal also disturbs a few other slots
        // (the paper's "minimal disruption" is approximate); the usable filter of
        // `balance::maglev` avoids even that by keeping the table and rehashing around a
        // down backend.
        let all = names(10);
        let t = table(&all, &[1; 10]);
        let mut fewer = all.clone();
        fewer.remove(3);
        let t9 = table(&fewer, &[1; 9]);
        let mut others_moved = 0;
        for k in 0..KEYS {
            let before = t.lookup(key(k)).unwrap();
            let after = &fewer[t9.lookup(key(k)).unwrap()];
            if before != 3 && &all[before] != after {
                others_moved += 1;
            }
        }
        let fraction = others_moved as f64 / KEYS as f64;
        println!("maglev 10->9 keys of other backends moved: {fraction:.4}");
        assert!(fraction < 0.02, "{fraction}");
    }

    #[test]
    fn weights_three_to_one_share_within_two_points() {
        let t = table(&names(2), &[3, 1]);
        let share = slots_of(&t, 0) as f64 / TABLE_SIZE as f64;
        assert!((share - 0.75).abs() < 0.005, "{share}");
        let first = (0..KEYS).filter(|&k| t.lookup(key(k)) == Some(0)).count();
        let share = first as f64 / KEYS as f64;
        assert!((share - 0.75).abs() < 0.02, "{share}");
    }
}
