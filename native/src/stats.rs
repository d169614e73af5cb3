//! `Engine.stats()`: the workers' metrics merged, joined with the shared backend state, as the
//! JSON the control plane reads (/api/status, /metrics, alerts, the dashboard).

use crate::balance::{AdminState, BackendState};
use crate::config::{EngineConfig, ListenerConfig, RouteConfig};
use crate::metrics::{
    cumulative_at, cumulative_buckets, route_buckets_us, Durations, Hist, WorkerMetrics, BUCKETS_US,
};
use crate::metrics::{
    H2Event, UdpCounts, H2_EVENTS, NO_BACKEND, NO_POOL, UDP_DIRECTIONS, UDP_DROPS,
};
use crate::tables::Tables;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

/// Names behind the ids the workers count by; an id is given once per name and kept.
#[derive(Default)]
pub struct Ids {
    listeners: HashMap<String, u16>,
    pools: HashMap<String, u16>,
    backends: HashMap<String, u32>,
    routes: HashMap<(String, String), u16>,
    listener_names: Vec<String>,
    pool_names: Vec<String>,
    /// Backend slot -> (pool, address).
    backend_names: Vec<(String, String)>,
}

impl Ids {
    pub fn listener(&mut self, name: &str) -> u16 {
        if let Some(&id) = self.listeners.get(name) {
            return id;
        }
        let id = self.listener_names.len() as u16;
        self.listeners.insert(name.to_string(), id);
        self.listener_names.push(name.to_string());
        id
    }

    pub fn pool(&mut self, name: &str) -> u16 {
        if let Some(&id) = self.pools.get(name) {
            return id;
        }
        let id = self.pool_names.len() as u16;
        self.pools.insert(name.to_string(), id);
        self.pool_names.push(name.to_string());
        id
    }

    /// A route's id, by its listener and its name.
    pub fn route(&mut self, listener: &str, route: &str) -> u16 {
        let next = self.routes.len() as u16;
        *self
            .routes
            .entry((listener.to_string(), route.to_string()))
            .or_insert(next)
    }

    fn route_id(&self, listener: &str, route: &str) -> Option<u16> {
        self.routes
            .get(&(listener.to_string(), route.to_string()))
            .copied()
    }

    fn pool_id(&self, pool: &str) -> Option<u16> {
        self.pools.get(pool).copied()
    }

    pub fn backend(&mut self, pool: &str, address: &str) -> u32 {
        let key = format!("{pool}/{address}");
        if let Some(&slot) = self.backends.get(&key) {
            return slot;
        }
        let slot = self.backend_names.len() as u32;
        self.backends.insert(key, slot);
        self.backend_names
            .push((pool.to_string(), address.to_string()));
        slot
    }
}

/// Per-backend durations as they were at some moment, so p50/p99 can cover a recent window
/// rather than the process's whole life.
#[derive(Default)]
pub struct LatencyWindow {
    marks: VecDeque<(Instant, HashMap<u32, Hist>)>,
}

/// p50/p99 cover the time since the newest mark at least this old (or the oldest mark).
const WINDOW_MIN: Duration = Duration::from_secs(10);
const MARK_EVERY: Duration = Duration::from_secs(5);
const MARKS_KEPT: Duration = Duration::from_secs(60);

impl LatencyWindow {
    /// Records `now`'s totals when a mark is due; returns the baseline to subtract.
    fn baseline<S>(
        &mut self,
        now: Instant,
        current: &HashMap<u32, Durations, S>,
    ) -> Option<&HashMap<u32, Hist>> {
        let due = self
            .marks
            .back()
            .is_none_or(|(at, _)| now.duration_since(*at) >= MARK_EVERY);
        if due {
            let totals = current.iter().map(|(k, d)| (*k, d.hist.clone())).collect();
            self.marks.push_back((now, totals));
        }
        while self.marks.len() > 2
            && self
                .marks
                .get(1)
                .is_some_and(|(at, _)| now.duration_since(*at) >= MARKS_KEPT)
        {
            self.marks.pop_front();
        }
        self.marks
            .iter()
            .rev()
            .find(|(at, _)| now.duration_since(*at) >= WINDOW_MIN)
            .or(self.marks.front())
            .map(|(_, h)| h)
    }
}

#[derive(Serialize)]
struct StatsJson<'a> {
    connections_active: usize,
    /// Upper bounds (seconds) of the duration buckets.
    buckets_s: Vec<f64>,
    /// Upper bounds (microseconds) of the routes' `latency_buckets`.
    route_latency_buckets_us: Vec<u64>,
    listeners: Vec<ListenerJson<'a>>,
    responses: Vec<ResponseJson<'a>>,
    pools: Vec<PoolJson<'a>>,
    log_dropped: u64,
}

#[derive(Serialize)]
struct ListenerJson<'a> {
    name: &'a str,
    protocol: &'a str,
    bind: String,
    pool: &'a str,
    connections_total: u64,
    connections_active: u64,
    dropped: Dropped,
    bytes_in: u64,
    bytes_out: u64,
    requests_total: u64,
    durations: Vec<DurationsJson<'a>>,
    /// https/tls listeners: non-zero handshake counts.
    tls_handshakes: Vec<HandshakesJson>,
    /// udp listeners: datagrams, sessions, drops; None for the others.
    udp: Option<UdpJson>,
    /// http/https listeners: HTTP/2 connections and streams; None for the others.
    http2: Option<H2Json>,
    /// http/https listeners: each route, its split and what it sent to each pool.
    routes: Option<Vec<RouteJson<'a>>>,
}

#[derive(Serialize)]
struct RouteJson<'a> {
    name: &'a str,
    index: usize,
    /// None for a redirect route.
    split: Option<SplitJson<'a>>,
    affinity_cookie: Option<&'a str>,
    /// Per pool of the split, since start: responses, 5xx among them, and cumulative latency
    /// counts at `route_latency_buckets_us`.
    pools: BTreeMap<&'a str, RoutePoolJson>,
}

#[derive(Serialize)]
struct SplitJson<'a> {
    live: BTreeMap<&'a str, u32>,
    configured: BTreeMap<&'a str, u32>,
}

#[derive(Serialize)]
struct RoutePoolJson {
    requests: u64,
    responses_5xx: u64,
    latency_buckets: Vec<u64>,
}

#[derive(Serialize)]
struct H2Json {
    connections_active: u64,
    connections_total: u64,
    streams_active: u64,
    streams_total: u64,
    /// By side (`client`, `backend`).
    resets: BTreeMap<&'static str, u64>,
    /// By reason (`graceful`, `flood`).
    goaways: BTreeMap<&'static str, u64>,
}

fn h2_json(c: &[u64; H2_EVENTS]) -> H2Json {
    let n = |e: H2Event| c[e as usize];
    H2Json {
        connections_active: n(H2Event::ConnectionOpened)
            .saturating_sub(n(H2Event::ConnectionClosed)),
        connections_total: n(H2Event::ConnectionOpened),
        streams_active: n(H2Event::StreamOpened).saturating_sub(n(H2Event::StreamClosed)),
        streams_total: n(H2Event::StreamOpened),
        resets: BTreeMap::from([
            ("client", n(H2Event::ClientReset)),
            ("backend", n(H2Event::BackendReset)),
        ]),
        goaways: BTreeMap::from([
            ("graceful", n(H2Event::GracefulGoaway)),
            ("flood", n(H2Event::FloodGoaway)),
        ]),
    }
}

#[derive(Serialize)]
struct UdpJson {
    /// By direction (`in`, `out`, `to_backend`, `from_backend`).
    datagrams: BTreeMap<&'static str, u64>,
    sessions_active: u64,
    sessions_total: u64,
    /// By reason (`max_sessions`, `no_backend`, `send_error`, `unreachable`).
    dropped: BTreeMap<&'static str, u64>,
}

fn udp_json(c: &UdpCounts) -> UdpJson {
    let named = |names: [&'static str; 4], counts: &[u64; 4]| {
        names.into_iter().zip(counts.iter().copied()).collect()
    };
    UdpJson {
        datagrams: named(UDP_DIRECTIONS, &c.datagrams),
        sessions_active: c.sessions_opened.saturating_sub(c.sessions_closed),
        sessions_total: c.sessions_opened,
        dropped: named(UDP_DROPS, &c.dropped),
    }
}

#[derive(Serialize)]
struct HandshakesJson {
    result: &'static str,
    version: &'static str,
    count: u64,
}

#[derive(Serialize)]
struct Dropped {
    max_connections: u64,
    no_backend: u64,
    rate_limited: u64,
    bad_request: u64,
    proxy_protocol: u64,
}

#[derive(Serialize)]
struct DurationsJson<'a> {
    pool: &'a str,
    count: u64,
    sum_s: f64,
    /// Cumulative counts at each of `buckets_s`.
    buckets: Vec<u64>,
}

#[derive(Serialize)]
struct ResponseJson<'a> {
    listener: &'a str,
    /// "" when fastlb answered before choosing a pool or a backend.
    pool: &'a str,
    backend: &'a str,
    code: u16,
    count: u64,
}

#[derive(Serialize)]
struct PoolJson<'a> {
    name: &'a str,
    backends: Vec<BackendJson<'a>>,
}

#[derive(Serialize)]
struct BackendJson<'a> {
    id: &'a str,
    address: &'a str,
    state: &'static str,
    /// Health alone (checks and passive detection), whatever the admin state.
    up: bool,
    backup: bool,
    weight: u32,
    /// `weight` as slow start scales it now, and that scale in per mille.
    effective_weight: u32,
    weight_scale: u32,
    active_connections: u32,
    connections_total: u64,
    requests_total: u64,
    /// http responses with a 5xx status that this backend sent.
    responses_5xx: u64,
    failures: Failures,
    ejections: u64,
    bytes_in: u64,
    bytes_out: u64,
    latency_ewma_ms: f64,
    /// Request durations over the last 10-60 s; null without requests in that window.
    latency_p50_ms: Option<f64>,
    latency_p99_ms: Option<f64>,
}

#[derive(Serialize)]
struct Failures {
    connect: u64,
    timeout: u64,
    reset: u64,
    #[serde(rename = "5xx")]
    status_5xx: u64,
}

fn state_name(b: &BackendState) -> &'static str {
    match (b.admin(), b.is_up()) {
        (AdminState::Disabled, _) => "disabled",
        (AdminState::Draining, _) if b.active() == 0 => "drained",
        (AdminState::Draining, _) => "draining",
        (AdminState::Enabled, false) => "down",
        (AdminState::Enabled, true) => "up",
    }
}

/// What `Engine::stats_json` needs besides the tables.
pub struct StatsInput<'a> {
    pub tables: &'a Tables,
    /// Listener and pool names in config order.
    pub listener_order: Vec<&'a str>,
    pub pool_order: Vec<&'a str>,
    pub ids: &'a Ids,
    pub merged: &'a WorkerMetrics,
    pub window: &'a mut LatencyWindow,
    pub connections_active: usize,
    pub log_dropped: u64,
    /// The file's config (the tables hold the live split weights).
    pub configured: &'a EngineConfig,
}

/// The routes of http listener `live` (as published) with the file's weights beside the live
/// ones and the per-pool figures.
fn routes_json<'a>(
    live: &'a ListenerConfig,
    configured: &'a EngineConfig,
    ids: &Ids,
    merged: &WorkerMetrics,
    bounds: &[u64],
) -> Vec<RouteJson<'a>> {
    let file = configured.listeners.iter().find(|l| l.name == live.name);
    live.routes
        .iter()
        .enumerate()
        .map(|(index, r)| {
            let file_route = file.and_then(|l| l.routes.iter().find(|x| x.name == r.name));
            let weights = |route: &'a RouteConfig| -> BTreeMap<&'a str, u32> {
                route
                    .split
                    .iter()
                    .map(|s| (s.pool.as_str(), s.weight))
                    .collect()
            };
            let split = r.redirect.is_none().then(|| SplitJson {
                live: weights(r),
                configured: file_route.map(weights).unwrap_or_default(),
            });
            let route_id = ids.route_id(&live.name, &r.name);
            let pools = r
                .split
                .iter()
                .map(|s| {
                    let counts = route_id
                        .zip(ids.pool_id(&s.pool))
                        .and_then(|key| merged.routes.get(&key));
                    let json = RoutePoolJson {
                        requests: counts.map_or(0, |c| c.requests),
                        responses_5xx: counts.map_or(0, |c| c.responses_5xx),
                        latency_buckets: counts.map_or_else(
                            || vec![0; bounds.len()],
                            |c| cumulative_at(&c.durations.hist, bounds),
                        ),
                    };
                    (s.pool.as_str(), json)
                })
                .collect();
            RouteJson {
                name: &r.name,
                index,
                split,
                affinity_cookie: r.split_affinity.as_ref().map(|a| a.cookie.as_str()),
                pools,
            }
        })
        .collect()
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

fn handshakes(counts: &[[u64; 3]; 6]) -> Vec<HandshakesJson> {
    let mut out = Vec::new();
    for (result, by_version) in crate::tls::HandshakeResult::ALL.iter().zip(counts) {
        for (version, &count) in crate::tls::VERSIONS.iter().zip(by_version) {
            if count > 0 {
                out.push(HandshakesJson {
                    result: result.name(),
                    version,
                    count,
                });
            }
        }
    }
    out
}

pub fn to_json(input: StatsInput<'_>) -> String {
    let StatsInput {
        tables,
        listener_order,
        pool_order,
        ids,
        merged,
        window,
        connections_active,
        log_dropped,
        configured,
    } = input;
    let route_bounds = route_buckets_us();
    let empty = Default::default();
    let listeners = listener_order
        .iter()
        .filter_map(|name| tables.listeners.get(*name))
        .map(|e| {
            let c = merged.listeners.get(e.id as usize).unwrap_or(&empty);
            let mut durations: Vec<DurationsJson> = merged
                .durations
                .iter()
                .filter(|((l, _), _)| *l == e.id)
                .map(|((_, p), d)| DurationsJson {
                    pool: &ids.pool_names[*p as usize],
                    count: d.hist.len(),
                    sum_s: d.sum_us as f64 / 1e6,
                    buckets: cumulative_buckets(&d.hist),
                })
                .collect();
            durations.sort_by(|a, b| a.pool.cmp(b.pool));
            ListenerJson {
                name: &e.cfg.name,
                protocol: e.cfg.protocol.name(),
                bind: e.cfg.bind.to_string(),
                pool: &e.cfg.pool,
                connections_total: c.connections,
                connections_active: c.connections.saturating_sub(c.closed),
                dropped: Dropped {
                    max_connections: c.dropped_max_connections,
                    no_backend: c.dropped_no_backend,
                    rate_limited: c.dropped_rate_limited,
                    proxy_protocol: c.dropped_proxy_protocol,
                    bad_request: c.bad_requests,
                },
                bytes_in: c.bytes_in,
                bytes_out: c.bytes_out,
                requests_total: c.requests,
                durations,
                tls_handshakes: handshakes(&c.tls_handshakes),
                udp: e.udp.as_ref().map(|_| udp_json(&c.udp)),
                http2: e.http.as_ref().map(|_| h2_json(&c.h2)),
                routes: e
                    .http
                    .as_ref()
                    .map(|_| routes_json(&e.cfg, configured, ids, merged, &route_bounds)),
            }
        })
        .collect();
    let mut responses: Vec<ResponseJson> = merged
        .responses
        .iter()
        .map(|(k, &count)| {
            let (pool, backend) = if k.backend == NO_BACKEND {
                let pool = if k.pool == NO_POOL {
                    ""
                } else {
                    ids.pool_names[k.pool as usize].as_str()
                };
                (pool, "")
            } else {
                let (pool, address) = &ids.backend_names[k.backend as usize];
                (pool.as_str(), address.as_str())
            };
            ResponseJson {
                listener: &ids.listener_names[k.listener as usize],
                pool,
                backend,
                code: k.code,
                count,
            }
        })
        .collect();
    responses.sort_by(|a, b| {
        (a.listener, a.pool, a.backend, a.code).cmp(&(b.listener, b.pool, b.backend, b.code))
    });
    let mut errors_by_backend: HashMap<u32, u64> = HashMap::new();
    for (k, n) in &merged.responses {
        if k.code >= 500 && k.backend != NO_BACKEND {
            *errors_by_backend.entry(k.backend).or_default() += n;
        }
    }
    let baseline = window.baseline(Instant::now(), &merged.backend_durations);
    let recent = |slot: u32| -> (Option<f64>, Option<f64>) {
        let Some(now) = merged.backend_durations.get(&slot) else {
            return (None, None);
        };
        let mut h = now.hist.clone();
        if let Some(base) = baseline.and_then(|b| b.get(&slot)) {
            let _ = h.subtract(base);
        }
        if h.is_empty() {
            return (None, None);
        }
        (
            Some(ms(h.value_at_quantile(0.5))),
            Some(ms(h.value_at_quantile(0.99))),
        )
    };
    let empty_backend = Default::default();
    let pools = pool_order
        .iter()
        .filter_map(|name| tables.pools.get(*name))
        .map(|p| PoolJson {
            name: &p.name,
            backends: p
                .backends
                .iter()
                .zip(&p.settings)
                .map(|(b, s)| {
                    let c = &b.counters;
                    let w = merged
                        .backends
                        .get(b.slot as usize)
                        .unwrap_or(&empty_backend);
                    let (p50, p99) = recent(b.slot);
                    BackendJson {
                        id: &b.id,
                        address: &b.address,
                        state: state_name(b),
                        up: b.is_up(),
                        backup: s.backup,
                        weight: b.weight(),
                        effective_weight: b.effective_weight(),
                        weight_scale: b.weight_scale(),
                        active_connections: b.active(),
                        connections_total: w.connections,
                        requests_total: w.requests,
                        responses_5xx: errors_by_backend.get(&b.slot).copied().unwrap_or(0),
                        failures: Failures {
                            connect: c.failures_connect.load(Relaxed),
                            timeout: c.failures_timeout.load(Relaxed),
                            reset: c.failures_reset.load(Relaxed),
                            status_5xx: c.failures_5xx.load(Relaxed),
                        },
                        ejections: c.ejections.load(Relaxed),
                        bytes_in: w.bytes_in,
                        bytes_out: w.bytes_out,
                        latency_ewma_ms: b.latency_ewma_ns() / 1e6,
                        latency_p50_ms: p50,
                        latency_p99_ms: p99,
                    }
                })
                .collect(),
        })
        .collect();
    serde_json::to_string(&StatsJson {
        connections_active,
        buckets_s: BUCKETS_US.iter().map(|&us| us as f64 / 1e6).collect(),
        route_latency_buckets_us: route_bounds.clone(),
        listeners,
        responses,
        pools,
        log_dropped,
    })
    .unwrap_or_else(|_| "{}".into())
}
