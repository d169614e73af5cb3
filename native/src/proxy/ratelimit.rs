//! Per-client-IP rate limit shared by every worker thread, without a lock.
//!
//! A token bucket per IP (`burst` requests at once, refilled at `requests_per_second`) kept as
//! GCRA, the generic cell rate algorithm: one "theoretical arrival time" (TAT) per IP, the
//! time at which its bucket is full again. A request at `now` passes when
//! `max(TAT, now) - now <= tau` (tau = (burst - 1) x interval) and then moves TAT one interval
//! on; a compare-exchange does that, so concurrent requests of one IP never overdraw it.
//!
//! The TATs live in a fixed table of atomics: 65536 slots of 16 bytes (an IP tag and a TAT),
//! 1 MiB per limiter, in groups of 8 slots that share two cache lines. An IP hashes to one
//! group and probes only it. A slot whose TAT has passed holds a full bucket, i.e. nothing
//! worth keeping, so another IP may take it over; entries never need sweeping. Only when all
//! 8 slots of a group are held by other IPs still limited (more than ~65k IPs active at once,
//! or an unlucky group) does an IP share one of them, chosen by its hash so it is always the
//! same one: colliding IPs then share a bucket, which errs toward limiting, not passing.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering::AcqRel, Ordering::Acquire, Ordering::Relaxed};

const GROUP_SLOTS: usize = 8;
const GROUPS: usize = 8192;

/// Longest interval between two requests (one a year): keeps the arithmetic far from
/// overflow for a rate of 0, a negative one or NaN, which then mean "burst only, no refill".
const MAX_INTERVAL_NS: u64 = 365 * 24 * 3600 * 1_000_000_000;

#[derive(Default)]
#[repr(C)]
struct Slot {
    /// Hash of the IP, never 0; 0 = never used.
    key: AtomicU64,
    /// Theoretical arrival time in the caller's nanoseconds; at or before now = full bucket.
    tat: AtomicU64,
}

/// 8 slots = 128 bytes, aligned so a probe touches exactly two cache lines.
#[derive(Default)]
#[repr(C, align(128))]
struct Group([Slot; GROUP_SLOTS]);

pub struct RateLimiter {
    groups: Box<[Group]>,
    /// Nanoseconds between two requests at the sustained rate.
    interval_ns: u64,
    /// How far TAT may run ahead of now and still let a request through.
    tau_ns: u64,
    /// Random per limiter, so that nobody can pick addresses that crowd one group.
    seed: u64,
}

impl RateLimiter {
    /// `burst` 0 is taken as 1: a limiter that passes nothing is a misconfiguration, not a
    /// rate.
    pub fn new(requests_per_second: f64, burst: u32) -> Self {
        let interval = 1e9 / requests_per_second;
        let interval_ns = if interval.is_finite() && interval > 0.0 {
            (interval.round() as u64).clamp(1, MAX_INTERVAL_NS)
        } else {
            MAX_INTERVAL_NS
        };
        let burst = u64::from(burst.max(1));
        RateLimiter {
            groups: (0..GROUPS).map(|_| Group::default()).collect(),
            interval_ns,
            tau_ns: interval_ns.saturating_mul(burst - 1),
            seed: fastrand::u64(..),
        }
    }

    /// Ok when this request from `ip` may pass; Err(retry_after_secs) (rounded up, >= 1) when
    /// over the limit. `now_ns` is a monotonic clock in nanoseconds supplied by the caller.
    pub fn check(&self, ip: IpAddr, now_ns: u64) -> Result<(), u64> {
        // One client whether it reaches a dual-stack socket as v4 or as v4-mapped v6.
        let key = match ip.to_canonical() {
            IpAddr::V4(a) => xxhash_rust::xxh3::xxh3_64_with_seed(&a.octets(), self.seed),
            IpAddr::V6(a) => xxhash_rust::xxh3::xxh3_64_with_seed(&a.octets(), self.seed),
        }
        .max(1);
        let group = &self.groups[key as usize % GROUPS].0;
        self.admit(self.slot(group, key, now_ns), now_ns)
    }

    /// The slot holding `key`'s TAT, claiming one if it has none.
    fn slot<'a>(&self, group: &'a [Slot; GROUP_SLOTS], key: u64, now: u64) -> &'a Slot {
        if let Some(s) = group.iter().find(|s| s.key.load(Acquire) == key) {
            return s;
        }
        // Claim the first free or expired slot. A slot another thread claims for this same IP
        // meanwhile is used as is, so racing requests of one IP end up in one slot; a lost
        // race for a slot moves on to the next.
        for s in group {
            let mut seen = s.key.load(Acquire);
            loop {
                if seen == key {
                    return s;
                }
                if seen != 0 && s.tat.load(Acquire) > now {
                    break; // another IP, still limited
                }
                match s.key.compare_exchange(seen, key, AcqRel, Acquire) {
                    // Taken over with the old IP's TAT, which is past: `admit` treats it as a
                    // full bucket. (Should that IP be admitted between our two loads, one of
                    // its requests is charged to us; the error is one request.)
                    Ok(_) => return s,
                    Err(now_there) => seen = now_there,
                }
            }
        }
        // Every slot is held by an IP still limited: share one, the same one for this IP
        // every time (the hash's top bits, independent of the bits that chose the group).
        &group[(key >> 61) as usize]
    }

    fn admit(&self, slot: &Slot, now: u64) -> Result<(), u64> {
        let mut old = slot.tat.load(Relaxed);
        loop {
            let tat = old.max(now);
            let ahead = tat - now;
            if ahead > self.tau_ns {
                let wait_ns = ahead - self.tau_ns;
                return Err(wait_ns.div_ceil(1_000_000_000).max(1));
            }
            let next = tat.saturating_add(self.interval_ns);
            match slot.tat.compare_exchange_weak(old, next, Relaxed, Relaxed) {
                Ok(_) => return Ok(()),
                Err(current) => old = current,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::sync::atomic::AtomicUsize;

    const SEC: u64 = 1_000_000_000;
    /// A start well away from 0, as a monotonic clock would be.
    const T0: u64 = 1_000 * SEC;

    fn v4(n: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(n))
    }

    #[test]
    fn limiter_is_send_and_sync_and_one_mib() {
        fn check<T: Send + Sync>() {}
        check::<RateLimiter>();
        assert_eq!(std::mem::size_of::<Group>(), 128);
        assert_eq!(GROUPS * std::mem::size_of::<Group>(), 1 << 20);
    }

    #[test]
    fn burst_then_reject() {
        let rl = RateLimiter::new(10.0, 5);
        let ip = v4(1);
        for i in 0..5 {
            assert_eq!(rl.check(ip, T0), Ok(()), "request {i}");
        }
        assert_eq!(rl.check(ip, T0), Err(1));
        assert_eq!(rl.check(ip, T0), Err(1));
    }

    #[test]
    fn refills_one_request_per_interval() {
        let rl = RateLimiter::new(10.0, 2);
        let ip = v4(7);
        assert!(rl.check(ip, T0).is_ok());
        assert!(rl.check(ip, T0).is_ok());
        assert!(rl.check(ip, T0).is_err());
        // 1/rps = 100 ms later exactly one more passes.
        assert!(rl.check(ip, T0 + 99_999_999).is_err());
        assert!(rl.check(ip, T0 + 100_000_000).is_ok());
        assert!(rl.check(ip, T0 + 100_000_000).is_err());
        // Idle long enough: the full burst again, never more.
        let later = T0 + 10 * SEC;
        assert!(rl.check(ip, later).is_ok());
        assert!(rl.check(ip, later).is_ok());
        assert!(rl.check(ip, later).is_err());
    }

    #[test]
    fn sustained_rate_is_held() {
        let rl = RateLimiter::new(100.0, 10);
        let ip = v4(9);
        // 1000 requests/s offered for 10 s: the burst plus 100/s pass.
        let passed = (0..10_000)
            .filter(|i| rl.check(ip, T0 + i * 1_000_000).is_ok())
            .count();
        assert!(passed.abs_diff(10 + 1000) <= 1, "{passed}");
    }

    #[test]
    fn fractional_rate() {
        let rl = RateLimiter::new(0.5, 1);
        let ip = v4(3);
        assert!(rl.check(ip, T0).is_ok());
        assert_eq!(rl.check(ip, T0), Err(2));
        assert_eq!(rl.check(ip, T0 + SEC), Err(1));
        assert!(rl.check(ip, T0 + 2 * SEC - 1).is_err());
        assert!(rl.check(ip, T0 + 2 * SEC).is_ok());
    }

    #[test]
    fn retry_after_rounds_up_and_is_at_least_one() {
        let rl = RateLimiter::new(0.1, 1); // one per 10 s
        let ip = v4(4);
        assert!(rl.check(ip, T0).is_ok());
        assert_eq!(rl.check(ip, T0), Err(10));
        assert_eq!(rl.check(ip, T0 + 1), Err(10));
        assert_eq!(rl.check(ip, T0 + SEC), Err(9));
        assert_eq!(rl.check(ip, T0 + 9 * SEC + 1), Err(1));
        let fast = RateLimiter::new(1000.0, 1);
        assert!(fast.check(ip, T0).is_ok());
        assert_eq!(fast.check(ip, T0), Err(1));
    }

    #[test]
    fn ips_are_independent() {
        let rl = RateLimiter::new(1.0, 2);
        let a = v4(0x0a00_0001);
        let b = v4(0x0a00_0002);
        assert!(rl.check(a, T0).is_ok() && rl.check(a, T0).is_ok());
        assert!(rl.check(a, T0).is_err());
        assert!(rl.check(b, T0).is_ok() && rl.check(b, T0).is_ok());
        assert!(rl.check(b, T0).is_err());
    }

    #[test]
    fn ipv6_and_mapped_ipv4() {
        let rl = RateLimiter::new(1.0, 1);
        let a: IpAddr = "2001:db8::1".parse().unwrap();
        let b: IpAddr = "2001:db8::2".parse().unwrap();
        assert!(rl.check(a, T0).is_ok());
        assert!(rl.check(a, T0).is_err());
        assert!(rl.check(b, T0).is_ok());
        // The same client seen as v4 and as v4-mapped v6 has one bucket.
        let v4: IpAddr = "192.0.2.1".parse().unwrap();
        let mapped = IpAddr::V6(Ipv4Addr::new(192, 0, 2, 1).to_ipv6_mapped());
        assert!(rl.check(v4, T0).is_ok());
        assert!(rl.check(mapped, T0).is_err());
    }

    #[test]
    fn zero_or_bad_rate_means_burst_only() {
        for rps in [0.0, -1.0, f64::NAN] {
            let rl = RateLimiter::new(rps, 3);
            let ip = v4(5);
            for _ in 0..3 {
                assert!(rl.check(ip, T0).is_ok());
            }
            assert!(rl.check(ip, T0 + 3600 * SEC).is_err());
        }
        let rl = RateLimiter::new(1.0, 0);
        assert!(rl.check(v4(6), T0).is_ok());
        assert!(rl.check(v4(6), T0).is_err());
    }

    #[test]
    fn clock_starting_at_zero() {
        let rl = RateLimiter::new(1.0, 1);
        assert!(rl.check(v4(8), 0).is_ok());
        assert!(rl.check(v4(8), 0).is_err());
        assert!(rl.check(v4(8), SEC).is_ok());
    }

    #[test]
    fn many_ips_reuse_expired_slots() {
        // 100 ms per IP; a new IP every 100 us: ~1000 IPs limited at any time, 100k in all,
        // more than the table holds. Every first request passes, every immediate second is limited.
        let rl = RateLimiter::new(10.0, 1);
        for i in 0..100_000u64 {
            let now = T0 + i * 100_000;
            let ip = v4(0x0a00_0000 + i as u32);
            assert!(rl.check(ip, now).is_ok(), "first request of ip {i}");
            assert!(rl.check(ip, now).is_err(), "second request of ip {i}");
        }
        // Later on, every slot has expired: new IPs (as many as fit at once) take them over.
        let later = T0 + 100 * SEC;
        for i in 0..2000u32 {
            assert!(rl.check(v4(0xc000_0000 + i), later).is_ok(), "ip {i}");
        }
    }

    #[test]
    fn overfull_table_shares_buckets_without_panicking() {
        // 200k IPs all limited at once: more than 65536 slots, so some share; sharing only
        // ever limits more, and most IPs still get their own slot.
        let rl = RateLimiter::new(1.0, 1);
        let passed = (0..200_000u32)
            .filter(|&i| rl.check(v4(i), T0).is_ok())
            .count();
        assert!(passed > 60_000 && passed < 200_000, "{passed}");
        // Nothing passes twice.
        let again = (0..200_000u32)
            .filter(|&i| rl.check(v4(i), T0).is_ok())
            .count();
        assert_eq!(again, 0);
        let v6 = (0..1000u128)
            .filter(|&i| rl.check(IpAddr::V6(Ipv6Addr::from(i << 64)), T0).is_ok())
            .count();
        assert!(v6 < 1000);
    }

    #[test]
    fn threads_hammering_one_ip_get_exactly_the_burst() {
        for _ in 0..20 {
            let rl = RateLimiter::new(1.0, 100);
            let passed = AtomicUsize::new(0);
            std::thread::scope(|s| {
                for _ in 0..4 {
                    s.spawn(|| {
                        for _ in 0..1000 {
                            if rl.check(v4(42), T0).is_ok() {
                                passed.fetch_add(1, Relaxed);
                            }
                        }
                    });
                }
            });
            assert_eq!(passed.load(Relaxed), 100);
        }
    }

    #[test]
    fn threads_with_distinct_ips_claim_slots_safely() {
        // Each thread its own IPs, all limited at once: every IP passes exactly once (no two
        // IPs end in one slot while free slots remain, no IP in two slots).
        let rl = RateLimiter::new(1.0, 1);
        let passed = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for t in 0..4u32 {
                let (rl, passed) = (&rl, &passed);
                s.spawn(move || {
                    for i in 0..1000u32 {
                        let ip = v4(t << 24 | i);
                        for _ in 0..3 {
                            if rl.check(ip, T0).is_ok() {
                                passed.fetch_add(1, Relaxed);
                            }
                        }
                    }
                });
            }
        });
        assert_eq!(passed.load(Relaxed), 4000);
    }
}
