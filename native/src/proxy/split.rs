//! A route's weighted split over pools, and its sticky groups (`split_affinity`).
//!
//! The weights are the live ones: the engine builds the split from the file's weights or from
//! those set through the admin API (`Engine::set_split_weights`), and a change publishes new
//! tables, so a split itself never changes and `pick` reads no lock.
//!
//! With `split_affinity`, a client that brings a group cookie naming a pool of the split (with
//! a weight above 0) goes to that pool without touching the sequence; any other client is
//! placed by the sequence and given the cookie. The sequence therefore counts new clients only,
//! so their shares follow the weights exactly.

use super::route::RequestView;
use crate::balance::round_robin::smooth_sequence;
use crate::balance::Pool;
use crate::config::RouteConfig;
use crossbeam_utils::CachePadded;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

/// The pools of one route and the smooth weighted sequence over them.
pub struct Split {
    pools: Vec<Arc<Pool>>,
    weights: Vec<u32>,
    /// One period of the smooth weighted round robin over the weights (zero weights absent).
    sequence: Vec<u32>,
    /// Shared by every worker; padded because it is written on every request while the
    /// routes around it are only read.
    next: CachePadded<AtomicUsize>,
    groups: Option<Groups>,
}

/// `split_affinity`: the cookie and one opaque token per pool of the split.
struct Groups {
    cookie: Arc<str>,
    ttl_ms: u64,
    tokens: Vec<[u8; 16]>,
}

/// A group cookie to set on the response: the client was placed in a pool just now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupCookie {
    pub name: Arc<str>,
    pub token: [u8; 16],
    pub ttl_ms: u64,
}

/// The token naming `pool` in a group cookie: stable across restarts and reloads (a client's
/// group outlives them), opaque (it does not spell the pool's name), 16 hex digits.
pub fn group_token(pool: &str) -> [u8; 16] {
    let hash = xxhash_rust::xxh3::xxh3_64_with_seed(pool.as_bytes(), 0x5eed_5b11_7000_0001);
    let mut out = [0u8; 16];
    for (i, byte) in hash.to_be_bytes().iter().enumerate() {
        out[2 * i] = b"0123456789abcdef"[(byte >> 4) as usize];
        out[2 * i + 1] = b"0123456789abcdef"[(byte & 15) as usize];
    }
    out
}

impl Split {
    pub fn build(r: &RouteConfig, pools: &HashMap<String, Arc<Pool>>) -> Result<Split, String> {
        let split_pools = r
            .split
            .iter()
            .map(|s| {
                pools
                    .get(&s.pool)
                    .cloned()
                    .ok_or_else(|| format!("unknown pool {}", s.pool))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let weights: Vec<u32> = r.split.iter().map(|s| s.weight).collect();
        let sequence = smooth_sequence(&weights);
        if sequence.is_empty() {
            return Err("split: no pool with a weight above 0".into());
        }
        let groups = r.split_affinity.as_ref().map(|a| Groups {
            cookie: a.cookie.as_str().into(),
            ttl_ms: a.ttl_ms,
            tokens: r.split.iter().map(|s| group_token(&s.pool)).collect(),
        });
        Ok(Split {
            pools: split_pools,
            weights,
            sequence,
            next: CachePadded::new(AtomicUsize::new(0)),
            groups,
        })
    }

    #[inline]
    fn next_index(&self) -> usize {
        // A single pool (the common case) skips the shared counter altogether.
        let i = match self.sequence.len() {
            1 => self.sequence[0],
            len => self.sequence[self.next.fetch_add(1, Relaxed) % len],
        };
        i as usize
    }

    /// The pool for this request, and the group cookie to give the client when the split
    /// placed it just now.
    #[inline]
    pub fn pick(&self, req: &impl RequestView) -> (&Arc<Pool>, Option<GroupCookie>) {
        let Some(groups) = &self.groups else {
            return (&self.pools[self.next_index()], None);
        };
        let member = req.cookie(groups.cookie.as_bytes()).and_then(|value| {
            groups
                .tokens
                .iter()
                .position(|t| t[..] == *value)
                .filter(|&i| self.weights[i] > 0)
        });
        if let Some(i) = member {
            return (&self.pools[i], None);
        }
        let i = self.next_index();
        let cookie = GroupCookie {
            name: groups.cookie.clone(),
            token: groups.tokens[i],
            ttl_ms: groups.ttl_ms,
        };
        (&self.pools[i], Some(cookie))
    }
}
