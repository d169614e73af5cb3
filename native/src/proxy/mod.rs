//! The protocol-neutral request core: what every HTTP request goes through, whichever protocol
//! the client speaks (HTTP/1 in `h1`, HTTP/2 in `h2`) and whichever the pool speaks.
//!
//! A session parses a request, routes it (`route`, against its `RequestView`), limits it
//! (`ratelimit`) and hands its tries to `tries::run`: backend selection, affinity, the queue,
//! retries and what each try's outcome means. `Outcome` carries what the metrics and the access
//! log need, and `finish` records them, once per request, the same for every protocol.

pub mod client_addr;
pub mod compress;
pub mod exchange;
pub mod geo;
pub mod header_rules;
pub mod outcome;
pub mod ratelimit;
pub mod route;
pub mod split;
pub mod tries;

use crate::balance::{hash_key, Pool};
use crate::config::{HashKey, ListenerConfig};
use crate::h1::parse::Limits;
use client_addr::TrustedProxies;
use exchange::{SetCookie, SetCookies};
use geo::GeoDb;
use ratelimit::RateLimiter;
use route::{find_query_param, RequestView, RouteTable};
use split::GroupCookie;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

pub use outcome::{finish, record_refused, Outcome, RequestLog};
pub use tries::{Attempt, Ended, Next};

/// An http listener's compiled settings.
pub struct HttpListener {
    pub routes: RouteTable,
    pub rate_limit: Option<RateLimiter>,
    pub limits: Limits,
    /// `trusted_proxies`; None: X-Forwarded-For is never read.
    pub trusted: Option<TrustedProxies>,
    /// `compression`; None: off.
    pub compression: Option<compress::Compression>,
}

impl HttpListener {
    /// `route_ids`: what each route's requests are counted under (crate::metrics::RouteCounts).
    /// `geo`: the `[geoip]` database, for `country` conditions.
    pub fn build(
        cfg: &ListenerConfig,
        pools: &HashMap<String, Arc<Pool>>,
        route_ids: &[u16],
        geo: Option<&Arc<GeoDb>>,
    ) -> Result<Self, String> {
        let named = |e| format!("listener {}: {e}", cfg.name);
        let routes =
            RouteTable::build_with_ids(&cfg.routes, pools, route_ids, geo).map_err(named)?;
        Ok(HttpListener {
            trusted: TrustedProxies::build(&cfg.trusted_proxies).map_err(named)?,
            compression: cfg
                .compression
                .as_ref()
                .map(compress::Compression::build)
                .transpose()
                .map_err(named)?,
            routes,
            rate_limit: cfg
                .rate_limit
                .map(|r| RateLimiter::new(r.requests_per_second, r.burst)),
            limits: Limits {
                max_header_bytes: cfg.max_header_bytes,
                max_headers: cfg.max_headers,
            },
        })
    }

    /// Who the client of a request from `peer` is (`trusted_proxies`): the peer, or the hop
    /// its X-Forwarded-For fields name (with port 0: the field carries none to trust).
    pub fn client_addr<'a>(
        &self,
        peer: SocketAddr,
        xff: impl DoubleEndedIterator<Item = &'a [u8]>,
    ) -> SocketAddr {
        match self.trusted.as_ref().map(|t| t.client(peer.ip(), xff)) {
            Some(ip) if ip != peer.ip() => SocketAddr::new(ip, 0),
            _ => peer,
        }
    }
}

/// The hash a hashing algorithm uses for this request; a request without the configured
/// header, cookie or parameter falls back to its source IP.
pub fn request_key(hash: &HashKey, view: &impl RequestView) -> u64 {
    let value = match hash {
        HashKey::SourceIp => None,
        HashKey::Header(name) => view.header(name.as_bytes()),
        HashKey::Cookie(name) => view.cookie(name.as_bytes()),
        HashKey::Path => Some(view.path()),
        HashKey::Query(name) => view
            .query()
            .and_then(|q| find_query_param(q, name.as_bytes())),
    };
    match (value, view.source_ip()) {
        (Some(v), _) => hash_key(v),
        (None, IpAddr::V4(ip)) => hash_key(&ip.octets()),
        (None, IpAddr::V6(ip)) => hash_key(&ip.octets()),
    }
}

/// The backend an affinity cookie names, if the pool has affinity and the backend is known.
pub fn pinned_backend(pool: &Pool, view: &impl RequestView) -> Option<usize> {
    let a = pool.affinity.as_ref()?;
    view.cookie(a.cookie.as_bytes())
        .and_then(|token| pool.pinned(token))
}

/// The cookies to set on a response from backend `backend` of `pool`: the affinity cookie
/// unless the request already named that backend, and the split's group cookie when the split
/// placed the client just now.
pub fn set_cookies<'a>(
    pool: &'a Pool,
    backend: usize,
    pinned: Option<usize>,
    group: Option<&'a GroupCookie>,
) -> SetCookies<'a> {
    let affinity = pool
        .affinity
        .as_ref()
        .filter(|_| pinned != Some(backend))
        .map(|a| SetCookie {
            name: &a.cookie,
            value: &pool.affinity_tokens[backend],
            ttl_ms: a.ttl_ms,
        });
    let group = group.map(|g| SetCookie {
        name: &g.name,
        value: &g.token,
        ttl_ms: g.ttl_ms,
    });
    [affinity, group]
}

/// The status of an answer fastlb makes itself, as a gRPC status code (for a gRPC client,
/// which reads `grpc-status`, not the HTTP status).
pub fn grpc_status_of(http_status: u16) -> u8 {
    match http_status {
        502 | 503 => 14, // UNAVAILABLE
        504 | 408 => 4,  // DEADLINE_EXCEEDED
        429 => 8,        // RESOURCE_EXHAUSTED
        404 => 12,       // UNIMPLEMENTED
        403 => 7,        // PERMISSION_DENIED
        401 => 16,       // UNAUTHENTICATED
        _ => 13,         // INTERNAL
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_answers_map_to_the_contracts_grpc_codes() {
        assert_eq!(grpc_status_of(503), 14);
        assert_eq!(grpc_status_of(502), 14);
        assert_eq!(grpc_status_of(504), 4);
        assert_eq!(grpc_status_of(429), 8);
        assert_eq!(grpc_status_of(400), 13);
    }
}
