//! Counting in the data plane: each worker counts into its own `WorkerMetrics` (plain integers
//! and hdrhistograms behind a `RefCell`, never shared, so no atomic and no cache line bounced
//! between CPUs per request). The engine gathers copies through the workers' command channels
//! (`WorkerCmd::Snapshot`) and merges them; a worker is asked, never waited on: it answers
//! between two tasks.
//!
//! Ids instead of names keep the hot path to array indexing: listeners and pools get a `u16`,
//! backends a `u32` slot, assigned by the engine once per name and kept across reloads.
//!
//! Built with the `no-counting` feature every `record_*` is a no-op: that build exists only to
//! measure what counting costs (bench/README.md).

use hdrhistogram::Histogram;
use std::collections::HashMap;
use xxhash_rust::xxh3::Xxh3DefaultBuilder;

/// Latencies in microseconds, from 1 µs to 100 s at 2 significant digits (~10 KB per
/// histogram); longer values count as 100 s.
pub type Hist = Histogram<u32>;
const HIST_MAX_US: u64 = 100_000_000;

pub fn new_hist() -> Hist {
    Histogram::new_with_bounds(1, HIST_MAX_US, 2).expect("static histogram bounds")
}

/// "No pool" / "no backend" in a response key (fastlb answered before choosing one).
pub const NO_POOL: u16 = u16::MAX;
pub const NO_BACKEND: u32 = u32::MAX;

/// Counters of one listener on one worker.
#[derive(Debug, Clone, Default)]
pub struct ListenerCounts {
    pub connections: u64,
    /// Connections that ended: `connections - closed` are open.
    pub closed: u64,
    pub dropped_max_connections: u64,
    pub dropped_no_backend: u64,
    pub dropped_rate_limited: u64,
    /// A PROXY header missing, malformed, late or from a source not trusted to send one.
    pub dropped_proxy_protocol: u64,
    /// http: answered 400/408/431 for malformed input.
    pub bad_requests: u64,
    /// http: requests whose head was read.
    pub requests: u64,
    /// From clients, to clients.
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// https/tls: handshakes by result (crate::tls::HandshakeResult) and version
    /// (crate::tls::VERSIONS).
    pub tls_handshakes: [[u64; 3]; 6],
    /// udp listeners: datagrams, sessions and drops.
    pub udp: UdpCounts,
    /// http/https listeners: HTTP/2 connections, streams, resets and GOAWAYs, by `H2Event`.
    pub h2: [u64; H2_EVENTS],
}

/// What the HTTP/2 counters count; the active gauges are opened minus closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum H2Event {
    ConnectionOpened,
    ConnectionClosed,
    StreamOpened,
    StreamClosed,
    ClientReset,
    BackendReset,
    GracefulGoaway,
    FloodGoaway,
}

pub const H2_EVENTS: usize = 8;

/// Datagram directions, as `fastlb_udp_datagrams_total{direction}` names them.
pub const UDP_DIRECTIONS: [&str; 4] = ["in", "out", "to_backend", "from_backend"];
/// Why a datagram was dropped, as `fastlb_udp_dropped_total{reason}` names it.
pub const UDP_DROPS: [&str; 4] = ["max_sessions", "no_backend", "send_error", "unreachable"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    In,
    Out,
    ToBackend,
    FromBackend,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UdpDrop {
    MaxSessions,
    NoBackend,
    SendError,
    Unreachable,
}

/// Counters of one udp listener on one worker.
#[derive(Debug, Clone, Default)]
pub struct UdpCounts {
    /// By `Direction`.
    pub datagrams: [u64; 4],
    pub sessions_opened: u64,
    /// Sessions that ended: `opened - closed` are open.
    pub sessions_closed: u64,
    /// By `UdpDrop`.
    pub dropped: [u64; 4],
}

impl UdpCounts {
    fn merge(&mut self, other: &UdpCounts) {
        for (a, b) in self.datagrams.iter_mut().zip(&other.datagrams) {
            *a += b;
        }
        for (a, b) in self.dropped.iter_mut().zip(&other.dropped) {
            *a += b;
        }
        self.sessions_opened += other.sessions_opened;
        self.sessions_closed += other.sessions_closed;
    }
}

/// Counters of one backend on one worker.
#[derive(Debug, Clone, Default)]
pub struct BackendCounts {
    pub connections: u64,
    pub requests: u64,
    /// From the backend, to the backend.
    pub bytes_in: u64,
    pub bytes_out: u64,
}

/// One series of `fastlb_requests_total{listener,pool,backend,code}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ResponseKey {
    pub listener: u16,
    pub pool: u16,
    pub backend: u32,
    pub code: u16,
}

/// Request durations of one (listener, pool): the histogram and the exact sum.
#[derive(Debug, Clone)]
pub struct Durations {
    pub hist: Hist,
    pub sum_us: u64,
}

impl Default for Durations {
    fn default() -> Self {
        Durations {
            hist: new_hist(),
            sum_us: 0,
        }
    }
}

impl Durations {
    fn record(&mut self, us: u64) {
        self.hist.saturating_record(us.max(1));
        self.sum_us += us;
    }

    pub fn merge(&mut self, other: &Durations) {
        // Same bounds on both sides: add cannot fail.
        let _ = self.hist.add(&other.hist);
        self.sum_us += other.sum_us;
    }
}

/// "Not on a route a split chose the pool of" in an outcome.
pub const NO_ROUTE: u16 = u16::MAX;

/// What one split route sent to one of its pools: the figures a canary is judged by.
#[derive(Debug, Clone, Default)]
pub struct RouteCounts {
    pub requests: u64,
    pub responses_5xx: u64,
    pub durations: Durations,
}

/// Everything one worker counted since it started.
#[derive(Debug, Clone, Default)]
pub struct WorkerMetrics {
    pub listeners: Vec<ListenerCounts>,
    pub backends: Vec<BackendCounts>,
    pub responses: HashMap<ResponseKey, u64, Xxh3DefaultBuilder>,
    /// `fastlb_request_duration_seconds{listener,pool}`: http request to last response byte,
    /// tcp connection lifetime.
    pub durations: HashMap<(u16, u16), Durations, Xxh3DefaultBuilder>,
    /// Per backend: the same durations, for its p50/p99.
    pub backend_durations: HashMap<u32, Durations, Xxh3DefaultBuilder>,
    /// Per (route id, pool id) of split routes.
    pub routes: HashMap<(u16, u16), RouteCounts, Xxh3DefaultBuilder>,
}

const COUNTING: bool = !cfg!(feature = "no-counting");

impl WorkerMetrics {
    #[inline]
    pub fn listener(&mut self, id: u16) -> &mut ListenerCounts {
        let i = id as usize;
        if i >= self.listeners.len() {
            self.listeners.resize_with(i + 1, Default::default);
        }
        &mut self.listeners[i]
    }

    #[inline]
    pub fn backend(&mut self, slot: u32) -> &mut BackendCounts {
        let i = slot as usize;
        if i >= self.backends.len() {
            self.backends.resize_with(i + 1, Default::default);
        }
        &mut self.backends[i]
    }

    /// A new client connection accepted (or refused at `max_connections`).
    #[inline]
    pub fn record_accept(&mut self, listener: u16, refused: bool) {
        if COUNTING {
            let l = self.listener(listener);
            l.connections += 1;
            if refused {
                l.dropped_max_connections += 1;
                l.closed += 1;
            }
        }
    }

    #[inline]
    pub fn record_close(&mut self, listener: u16) {
        if COUNTING {
            self.listener(listener).closed += 1;
        }
    }

    /// A tcp connection that found no backend, an http request answered 503 for lack of one.
    #[inline]
    pub fn record_no_backend(&mut self, listener: u16) {
        if COUNTING {
            self.listener(listener).dropped_no_backend += 1;
        }
    }

    #[inline]
    pub fn record_rate_limited(&mut self, listener: u16) {
        if COUNTING {
            self.listener(listener).dropped_rate_limited += 1;
        }
    }

    #[inline]
    pub fn record_proxy_refused(&mut self, listener: u16) {
        if COUNTING {
            self.listener(listener).dropped_proxy_protocol += 1;
        }
    }

    #[inline]
    pub fn record_bad_request(&mut self, listener: u16) {
        if COUNTING {
            self.listener(listener).bad_requests += 1;
        }
    }

    #[inline]
    pub fn record_request(&mut self, listener: u16) {
        if COUNTING {
            self.listener(listener).requests += 1;
        }
    }

    /// A new connection to a backend.
    #[inline]
    pub fn record_backend_connect(&mut self, slot: u32) {
        if COUNTING {
            self.backend(slot).connections += 1;
        }
    }

    /// Bytes of one exchange (http) or connection (tcp): `from_client` went to `backend`,
    /// `to_client` came from it (or from fastlb itself when `backend` is NO_BACKEND).
    #[inline]
    pub fn record_bytes(&mut self, listener: u16, backend: u32, from_client: u64, to_client: u64) {
        if COUNTING {
            let l = self.listener(listener);
            l.bytes_in += from_client;
            l.bytes_out += to_client;
            if backend != NO_BACKEND {
                let b = self.backend(backend);
                b.bytes_out += from_client;
                b.bytes_in += to_client;
            }
        }
    }

    /// One http response (`code`) or one finished tcp connection (`code` 0: not counted as a
    /// response), and how long it took.
    #[inline]
    pub fn record_done(&mut self, key: ResponseKey, duration_us: u64) {
        if !COUNTING {
            return;
        }
        if key.code != 0 {
            *self.responses.entry(key).or_insert(0) += 1;
            if key.backend != NO_BACKEND {
                self.backend(key.backend).requests += 1;
            }
        }
        if key.pool != NO_POOL {
            self.durations
                .entry((key.listener, key.pool))
                .or_default()
                .record(duration_us);
        }
        if key.backend != NO_BACKEND {
            self.backend_durations
                .entry(key.backend)
                .or_default()
                .record(duration_us);
        }
    }

    /// A response to a request split route `route` sent to `pool`.
    #[inline]
    pub fn record_route(&mut self, route: u16, pool: u16, code: u16, duration_us: u64) {
        if !COUNTING || route == NO_ROUTE || pool == NO_POOL {
            return;
        }
        let c = self.routes.entry((route, pool)).or_default();
        c.requests += 1;
        c.responses_5xx += u64::from((500..600).contains(&code));
        c.durations.record(duration_us);
    }

    /// `n` datagrams of `bytes` in all went `direction` on udp listener `listener`; from and to
    /// clients they count as the listener's bytes too.
    #[inline]
    pub fn record_datagrams(&mut self, listener: u16, direction: Direction, n: u64, bytes: u64) {
        if COUNTING {
            let l = self.listener(listener);
            l.udp.datagrams[direction as usize] += n;
            match direction {
                Direction::In => l.bytes_in += bytes,
                Direction::Out => l.bytes_out += bytes,
                _ => {}
            }
        }
    }

    #[inline]
    pub fn record_udp_drop(&mut self, listener: u16, reason: UdpDrop) {
        if COUNTING {
            self.listener(listener).udp.dropped[reason as usize] += 1;
        }
    }

    /// `n` HTTP/2 events on http listener `listener`.
    pub fn record_h2(&mut self, listener: u16, event: H2Event, n: u64) {
        if COUNTING {
            self.listener(listener).h2[event as usize] += n;
        }
    }

    /// A udp session began (`opened`) or ended.
    #[inline]
    pub fn record_session(&mut self, listener: u16, opened: bool) {
        if COUNTING {
            let u = &mut self.listener(listener).udp;
            match opened {
                true => u.sessions_opened += 1,
                false => u.sessions_closed += 1,
            }
        }
    }

    /// Bytes a udp session moved to and from `backend` (the listener's side is counted per
    /// batch by `record_datagrams`).
    #[inline]
    pub fn record_backend_bytes(&mut self, backend: u32, to_backend: u64, from_backend: u64) {
        if COUNTING {
            let b = self.backend(backend);
            b.bytes_out += to_backend;
            b.bytes_in += from_backend;
        }
    }

    /// A TLS handshake on an https or tls listener ended.
    pub fn record_tls_handshake(&mut self, listener: u16, result: usize, version: usize) {
        if COUNTING {
            self.listener(listener).tls_handshakes[result][version] += 1;
        }
    }

    /// Adds `other` into `self`.
    pub fn merge(&mut self, other: &WorkerMetrics) {
        for (i, l) in other.listeners.iter().enumerate() {
            let m = self.listener(i as u16);
            m.connections += l.connections;
            m.closed += l.closed;
            m.dropped_max_connections += l.dropped_max_connections;
            m.dropped_no_backend += l.dropped_no_backend;
            m.dropped_rate_limited += l.dropped_rate_limited;
            m.dropped_proxy_protocol += l.dropped_proxy_protocol;
            m.bad_requests += l.bad_requests;
            m.requests += l.requests;
            m.bytes_in += l.bytes_in;
            m.bytes_out += l.bytes_out;
            for (mine, theirs) in m.tls_handshakes.iter_mut().zip(&l.tls_handshakes) {
                for (a, b) in mine.iter_mut().zip(theirs) {
                    *a += b;
                }
            }
            m.udp.merge(&l.udp);
            for (a, b) in m.h2.iter_mut().zip(&l.h2) {
                *a += b;
            }
        }
        for (i, b) in other.backends.iter().enumerate() {
            let m = self.backend(i as u32);
            m.connections += b.connections;
            m.requests += b.requests;
            m.bytes_in += b.bytes_in;
            m.bytes_out += b.bytes_out;
        }
        for (k, n) in &other.responses {
            *self.responses.entry(*k).or_insert(0) += n;
        }
        for (k, d) in &other.durations {
            self.durations.entry(*k).or_default().merge(d);
        }
        for (k, d) in &other.backend_durations {
            self.backend_durations.entry(*k).or_default().merge(d);
        }
        for (k, r) in &other.routes {
            let m = self.routes.entry(*k).or_default();
            m.requests += r.requests;
            m.responses_5xx += r.responses_5xx;
            m.durations.merge(&r.durations);
        }
    }
}

/// Prometheus bucket bounds of `fastlb_request_duration_seconds`, in microseconds: 50 µs to
/// 10 s.
pub const BUCKETS_US: [u64; 17] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000,
];

/// Cumulative counts at each of `BUCKETS_US` (Prometheus `le` semantics, at the histogram's
/// 1% resolution).
pub fn cumulative_buckets(h: &Hist) -> Vec<u64> {
    cumulative_at(h, &BUCKETS_US)
}

pub fn cumulative_at(h: &Hist, bounds: &[u64]) -> Vec<u64> {
    bounds.iter().map(|&le| h.count_between(0, le)).collect()
}

/// Bounds of the split routes' latency buckets, in microseconds: 100 µs to 100 s in steps of
/// ~15%, fine enough that a canary's p99 taken from the buckets of one interval is within a
/// step of the exact one (the Prometheus buckets above are 2-2.5x apart).
pub fn route_buckets_us() -> Vec<u64> {
    let mut bounds = vec![100u64];
    while *bounds.last().expect("not empty") < HIST_MAX_US {
        let next = (*bounds.last().expect("not empty") as f64 * 1.15).ceil() as u64;
        bounds.push(next.min(HIST_MAX_US));
    }
    bounds
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(backend: u32, code: u16) -> ResponseKey {
        ResponseKey {
            listener: 0,
            pool: 1,
            backend,
            code,
        }
    }

    #[test]
    fn workers_merge_into_the_sum() {
        let mut a = WorkerMetrics::default();
        let mut b = WorkerMetrics::default();
        a.record_accept(0, false);
        a.record_accept(2, true);
        b.record_accept(0, false);
        a.record_done(key(3, 200), 80);
        b.record_done(key(3, 200), 3_000);
        b.record_done(key(3, 503), 20);
        b.record_done(key(NO_BACKEND, 429), 5);
        a.record_bytes(0, 3, 10, 100);
        let mut total = WorkerMetrics::default();
        total.merge(&a);
        total.merge(&b);
        assert_eq!(total.listeners[0].connections, 2);
        assert_eq!(total.listeners[2].dropped_max_connections, 1);
        assert_eq!(total.listeners[2].closed, 1);
        assert_eq!(total.responses[&key(3, 200)], 2);
        assert_eq!(total.responses[&key(3, 503)], 1);
        assert_eq!(total.responses[&key(NO_BACKEND, 429)], 1);
        assert_eq!(total.backends[3].requests, 3);
        assert_eq!(
            (total.backends[3].bytes_out, total.backends[3].bytes_in),
            (10, 100)
        );
        let d = &total.durations[&(0, 1)];
        assert_eq!((d.hist.len(), d.sum_us), (4, 3_105));
        // 80 µs, 20 µs, 5 µs under 100 µs; 3 ms under 5 ms
        let buckets = cumulative_buckets(&d.hist);
        assert_eq!(buckets[0], 2, "50 µs: the 20 and the 5");
        assert_eq!(buckets[1], 3);
        assert_eq!(buckets[5], 3, "2.5 ms");
        assert_eq!(buckets[6], 4, "5 ms");
        assert_eq!(*buckets.last().unwrap(), 4);
    }

    #[test]
    fn tcp_connections_count_duration_but_no_response() {
        let mut m = WorkerMetrics::default();
        m.record_done(key(0, 0), 1_000);
        assert!(m.responses.is_empty());
        assert_eq!(m.durations[&(0, 1)].hist.len(), 1);
    }
}
