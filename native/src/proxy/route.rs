//! Content routing of an http listener, compiled once per config.
//!
//! Routes are tried in order and the first whose conditions all hold wins; none matching
//! means the listener's default pool. Everything a request is compared with is prepared at
//! build time (host lower-cased, regexes compiled, networks parsed, split sequences laid out),
//! so `select` only compares bytes and never allocates.
//!
//! Paths, query strings and cookie values are compared raw, without percent-decoding: a
//! route says `/a%20b` to match a request for `/a%20b` (decoding would let `/%61dmin` and
//! `/admin` route alike only sometimes, depending on how the client encoded it).

use super::geo::{self, CountryCode, GeoDb};
use super::header_rules::RouteRewrite;
use super::split::{GroupCookie, Split};
use crate::balance::Pool;
use crate::config::{RedirectConfig, RouteConfig};
use crate::metrics::NO_ROUTE;
use regex::bytes::{Regex, RegexBuilder};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

/// What routing needs from a request; implemented by the HTTP connection code over its
/// parsed head.
pub trait RequestView {
    /// Host as sent, may include `:port`, any case.
    fn host(&self) -> Option<&[u8]>;
    /// The request path, without the query.
    fn path(&self) -> &[u8];
    /// The raw query string, without `?`.
    fn query(&self) -> Option<&[u8]>;
    /// The first header with that (lower-case) name.
    fn header(&self, lower_name: &[u8]) -> Option<&[u8]>;
    /// The value of cookie `name`, across all Cookie headers.
    fn cookie(&self, name: &[u8]) -> Option<&[u8]>;
    fn source_ip(&self) -> IpAddr;
}

/// Optional whitespace of RFC 9110 (space and horizontal tab).
#[inline]
fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// `name=value` pairs of one Cookie header value (`; ` separated, OWS trimmed); the value of
/// the first pair named `name`. A pair without `=` names nothing and is skipped.
pub fn find_cookie<'a>(cookie_header: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    cookie_header.split(|&b| b == b';').find_map(|pair| {
        let eq = pair.iter().position(|&b| b == b'=')?;
        (trim_ows(&pair[..eq]) == name).then(|| trim_ows(&pair[eq + 1..]))
    })
}

/// The value of the first `name=value` pair of a raw query string (`&` separated; `name`
/// alone -> `Some(b"")`). Raw bytes: no `+` or percent decoding.
pub fn find_query_param<'a>(query: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    query
        .split(|&b| b == b'&')
        .find_map(|pair| match pair.iter().position(|&b| b == b'=') {
            Some(eq) => (&pair[..eq] == name).then(|| &pair[eq + 1..]),
            None => (pair == name).then_some(&b""[..]),
        })
}

/// Host without port and trailing dot (for matching and for `hash_key`-free uses).
/// `[::1]:80` gives `[::1]`; an unbracketed IPv6 literal (several colons, not valid in a Host
/// header but seen) is kept whole rather than cut at its last group.
pub fn host_without_port(host: &[u8]) -> &[u8] {
    let host = trim_ows(host);
    let name = if host.first() == Some(&b'[') {
        match host.iter().position(|&b| b == b']') {
            Some(end) => &host[..=end],
            None => host,
        }
    } else {
        let mut colons = host.iter().enumerate().filter(|(_, &b)| b == b':');
        match (colons.next(), colons.next()) {
            (Some((i, _)), None) => &host[..i],
            _ => host,
        }
    };
    name.strip_suffix(b".").unwrap_or(name)
}

enum HostMatch {
    /// Lower-cased, no trailing dot.
    Exact(Box<[u8]>),
    /// `*.example.com` kept as `.example.com`, lower-cased.
    Suffix(Box<[u8]>),
}

impl HostMatch {
    fn parse(host: &str) -> Result<HostMatch, String> {
        let lower = host.trim().to_ascii_lowercase();
        let lower = lower.strip_suffix('.').unwrap_or(&lower);
        if let Some(suffix) = lower.strip_prefix('*') {
            if suffix.len() < 2 || !suffix.starts_with('.') || suffix.contains('*') {
                return Err(format!(
                    "host {host:?}: a wildcard is only `*.` before a name"
                ));
            }
            return Ok(HostMatch::Suffix(suffix.as_bytes().into()));
        }
        if lower.is_empty() || lower.contains('*') {
            return Err(format!(
                "host {host:?}: a wildcard is only `*.` before a name"
            ));
        }
        Ok(HostMatch::Exact(lower.as_bytes().into()))
    }

    #[inline]
    fn matches(&self, host: &[u8]) -> bool {
        let host = host_without_port(host);
        match self {
            HostMatch::Exact(want) => host.eq_ignore_ascii_case(want),
            // At least one byte before the suffix: `*.example.com` is not `example.com`
            // (nginx semantics).
            HostMatch::Suffix(suffix) => {
                host.len() > suffix.len()
                    && host[host.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
            }
        }
    }
}

/// One network of `source_cidr`; addresses are kept as IPv6 (IPv4 as `::ffff:a.b.c.d`) so
/// that a v4 network matches a v4 client and an IPv4-mapped v6 client alike.
/// A network (`addr/len`), IPv4 mapped into IPv6 so one comparison serves both.
pub struct Cidr {
    net: u128,
    mask: u128,
}

impl Cidr {
    pub fn parse(text: &str) -> Result<Cidr, String> {
        let (addr, len) = match text.trim().split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (text.trim(), None),
        };
        let addr: IpAddr = addr.parse().map_err(|e| format!("{text:?}: {e}"))?;
        let (bits, offset) = match addr {
            IpAddr::V4(_) => (32u32, 96u32),
            IpAddr::V6(_) => (128, 0),
        };
        let len = match len {
            Some(l) => l.parse::<u32>().ok().filter(|&l| l <= bits),
            None => Some(bits),
        }
        .ok_or_else(|| format!("{text:?}: prefix length is not 0..={bits}"))?;
        let mask = match len + offset {
            0 => 0,
            n => u128::MAX << (128 - n),
        };
        Ok(Cidr {
            // Host bits are cleared by the control plane; masking again costs nothing here.
            net: as_v6(addr) & mask,
            mask,
        })
    }
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        as_v6(ip) & self.mask == self.net
    }
}

/// The address as a u128, IPv4 mapped into `::ffff:0:0/96`.
#[inline]
fn as_v6(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(a.to_ipv6_mapped()),
        IpAddr::V6(a) => u128::from(a),
    }
}

type Pairs = Box<[(Box<[u8]>, Box<[u8]>)]>;

struct Route {
    /// What its requests are counted under per pool (crate::metrics::RouteCounts).
    id: u16,
    host: Option<HostMatch>,
    path_prefix: Option<Box<[u8]>>,
    path_exact: Option<Box<[u8]>>,
    cidrs: Box<[Cidr]>,
    /// `country`, with the database it is looked up in (set whenever `countries` is not empty).
    countries: Box<[CountryCode]>,
    geo: Option<Arc<GeoDb>>,
    headers: Pairs,
    cookies: Pairs,
    query: Pairs,
    path_regex: Option<Regex>,
    action: Action,
    rewrite: Option<Box<RouteRewrite>>,
}

/// What a matching route does.
enum Action {
    Split(Split),
    Redirect(RedirectConfig),
}

/// Where a request goes.
pub enum Target<'a> {
    /// The pool, and the group cookie to set when a `split_affinity` split placed the client.
    Pool(&'a Arc<Pool>, Option<GroupCookie>),
    /// fastlb answers with a redirect.
    Redirect(&'a RedirectConfig),
}

impl Target<'_> {
    pub fn pool(&self) -> Option<&Arc<Pool>> {
        match self {
            Target::Pool(p, _) => Some(p),
            Target::Redirect(_) => None,
        }
    }
}

impl Route {
    /// Cheapest conditions first, the regex last.
    fn matches(&self, req: &impl RequestView) -> bool {
        if let Some(h) = &self.host {
            if !req.host().is_some_and(|host| h.matches(host)) {
                return false;
            }
        }
        let path = req.path();
        if self
            .path_prefix
            .as_ref()
            .is_some_and(|p| !path.starts_with(p))
        {
            return false;
        }
        if self.path_exact.as_ref().is_some_and(|p| path != &p[..]) {
            return false;
        }
        if !self.cidrs.is_empty() {
            let ip = as_v6(req.source_ip());
            if !self.cidrs.iter().any(|c| ip & c.mask == c.net) {
                return false;
            }
        }
        if !self.countries.is_empty() {
            let country = self.geo.as_ref().and_then(|g| g.country(req.source_ip()));
            if !country.is_some_and(|c| self.countries.contains(&c)) {
                return false;
            }
        }
        let header_ok = |(name, value): &(Box<[u8]>, Box<[u8]>)| {
            req.header(name).is_some_and(|v| trim_ows(v) == &value[..])
        };
        if !self.headers.iter().all(header_ok) {
            return false;
        }
        if !self.cookies.iter().all(|(n, v)| req.cookie(n) == Some(v)) {
            return false;
        }
        if !self.query.is_empty() {
            let Some(query) = req.query() else {
                return false;
            };
            if !self
                .query
                .iter()
                .all(|(n, v)| find_query_param(query, n) == Some(v))
            {
                return false;
            }
        }
        self.path_regex.as_ref().is_none_or(|re| re.is_match(path))
    }
}

/// The compiled routes of one listener.
pub struct RouteTable {
    routes: Vec<Route>,
}

fn pairs<F: Fn(&str) -> Vec<u8>>(
    map: &std::collections::BTreeMap<String, String>,
    name: F,
    trim: bool,
) -> Pairs {
    map.iter()
        .map(|(n, v)| {
            let v = if trim {
                trim_ows(v.as_bytes())
            } else {
                v.as_bytes()
            };
            (name(n).into(), v.into())
        })
        .collect()
}

impl RouteTable {
    /// Compiles `routes`; every split pool must be in `pools` (else Err naming the route
    /// index and pool); a bad regex or CIDR is Err naming the route index and the field.
    pub fn build(
        routes: &[RouteConfig],
        pools: &HashMap<String, Arc<Pool>>,
    ) -> Result<RouteTable, String> {
        Self::build_with_ids(routes, pools, &[], None)
    }

    /// As `build`, each route counted under its id in `ids` (NO_ROUTE where none is given),
    /// `country` conditions looked up in `geo`.
    pub fn build_with_ids(
        routes: &[RouteConfig],
        pools: &HashMap<String, Arc<Pool>>,
        ids: &[u16],
        geo: Option<&Arc<GeoDb>>,
    ) -> Result<RouteTable, String> {
        let routes = routes
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let id = ids.get(i).copied().unwrap_or(NO_ROUTE);
                Self::build_route(r, pools, id, geo).map_err(|e| format!("route {i}: {e}"))
            })
            .collect::<Result<_, _>>()?;
        Ok(RouteTable { routes })
    }

    /// The id route `index` is counted under.
    pub fn id(&self, index: usize) -> u16 {
        self.routes.get(index).map_or(NO_ROUTE, |r| r.id)
    }

    fn build_route(
        r: &RouteConfig,
        pools: &HashMap<String, Arc<Pool>>,
        id: u16,
        geo: Option<&Arc<GeoDb>>,
    ) -> Result<Route, String> {
        let host = r.host.as_deref().map(HostMatch::parse).transpose()?;
        let path_regex = r
            .path_regex
            .as_deref()
            .map(|p| {
                // Unicode off: paths are raw bytes (possibly not UTF-8), `.` is any byte and
                // `(?i)` is ASCII case folding, as with nginx's PCRE in its default mode.
                RegexBuilder::new(p)
                    .unicode(false)
                    .build()
                    .map_err(|e| format!("path_regex {p:?}: {e}"))
            })
            .transpose()?;
        let cidrs = r
            .source_cidr
            .iter()
            .map(|c| Cidr::parse(c).map_err(|e| format!("source_cidr {e}")))
            .collect::<Result<_, _>>()?;
        let prefix = match (&r.rewrite_prefix, &r.path_prefix) {
            (Some(to), Some(from)) => Some((from.as_str(), to.as_str())),
            (Some(_), None) => return Err("rewrite_prefix: needs path_prefix".into()),
            (None, _) => None,
        };
        let rewrite = RouteRewrite::build(&r.request_headers, &r.response_headers, prefix)?;
        let action = match &r.redirect {
            Some(redirect) => Action::Redirect(redirect.clone()),
            None => Action::Split(Split::build(r, pools)?),
        };
        let countries: Box<[CountryCode]> = r
            .country
            .iter()
            .map(|c| geo::parse_code(c).ok_or_else(|| format!("country {c:?}: not an ISO code")))
            .collect::<Result<_, _>>()?;
        if !countries.is_empty() && geo.is_none() {
            return Err("country: needs [geoip].database".into());
        }
        Ok(Route {
            id,
            host,
            path_prefix: r.path_prefix.as_ref().map(|p| p.as_bytes().into()),
            path_exact: r.path_exact.as_ref().map(|p| p.as_bytes().into()),
            cidrs,
            geo: (!countries.is_empty()).then(|| geo.cloned()).flatten(),
            countries,
            // Names are lower-cased by the control plane; again here so a hand-written
            // config cannot silently never match.
            headers: pairs(&r.headers, |n| n.to_ascii_lowercase().into_bytes(), true),
            cookies: pairs(&r.cookies, |n| n.as_bytes().to_vec(), false),
            query: pairs(&r.query, |n| n.as_bytes().to_vec(), false),
            path_regex,
            action,
            rewrite,
        })
    }

    /// What route `index` rewrites, if anything.
    pub fn rewrite(&self, index: usize) -> Option<&RouteRewrite> {
        self.routes.get(index)?.rewrite.as_deref()
    }

    /// The first matching route's index and the pool it sends this request to; None when no
    /// route matches (the listener's default pool applies).
    pub fn select(&self, req: &impl RequestView) -> Option<(usize, Target<'_>)> {
        self.routes
            .iter()
            .enumerate()
            .find(|(_, r)| r.matches(req))
            .map(|(i, r)| match &r.action {
                Action::Split(split) => {
                    let (pool, group) = split.pick(req);
                    (i, Target::Pool(pool, group))
                }
                Action::Redirect(redirect) => (i, Target::Redirect(redirect)),
            })
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::tests_support::pool_config;
    use crate::config::{Algorithm, SplitConfig};
    use std::collections::BTreeMap;

    fn pool(name: &str) -> Arc<Pool> {
        Arc::new(Pool::with_fresh_states(&pool_config(
            name,
            Algorithm::RoundRobin,
            &[1],
        )))
    }

    fn pools() -> HashMap<String, Arc<Pool>> {
        ["a", "b", "c"]
            .iter()
            .map(|n| (n.to_string(), pool(n)))
            .collect()
    }

    fn to(pool: &str) -> Vec<SplitConfig> {
        vec![SplitConfig {
            pool: pool.into(),
            weight: 1,
        }]
    }

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[derive(Clone)]
    struct Req {
        host: Option<&'static str>,
        path: &'static str,
        query: Option<&'static str>,
        headers: Vec<(&'static str, &'static str)>,
        cookie: Option<&'static str>,
        ip: IpAddr,
    }

    impl Default for Req {
        fn default() -> Self {
            Req {
                host: Some("example.com"),
                path: "/",
                query: None,
                headers: vec![],
                cookie: None,
                ip: "192.0.2.1".parse().unwrap(),
            }
        }
    }

    impl RequestView for Req {
        fn host(&self) -> Option<&[u8]> {
            self.host.map(str::as_bytes)
        }
        fn path(&self) -> &[u8] {
            self.path.as_bytes()
        }
        fn query(&self) -> Option<&[u8]> {
            self.query.map(str::as_bytes)
        }
        fn header(&self, lower_name: &[u8]) -> Option<&[u8]> {
            self.headers
                .iter()
                .find(|(n, _)| n.as_bytes().eq_ignore_ascii_case(lower_name))
                .map(|(_, v)| v.as_bytes())
        }
        fn cookie(&self, name: &[u8]) -> Option<&[u8]> {
            find_cookie(self.cookie?.as_bytes(), name)
        }
        fn source_ip(&self) -> IpAddr {
            self.ip
        }
    }

    /// A table of the one route `r` (sending to pool "a").
    fn one(r: RouteConfig) -> RouteTable {
        RouteTable::build(
            &[RouteConfig {
                split: to("a"),
                ..r
            }],
            &pools(),
        )
        .unwrap()
    }

    fn hits(t: &RouteTable, req: &Req) -> bool {
        t.select(req).is_some()
    }

    #[test]
    fn route_table_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<RouteTable>();
    }

    #[test]
    fn exact_host_ignores_case_port_and_trailing_dot() {
        let t = one(RouteConfig {
            host: Some("Example.COM".into()),
            ..Default::default()
        });
        for host in [
            "example.com",
            "EXAMPLE.com:8080",
            "example.com.",
            "example.com.:80",
        ] {
            let req = Req {
                host: Some(host),
                ..Default::default()
            };
            assert!(hits(&t, &req), "{host}");
        }
        for host in [
            Some("a.example.com"),
            Some("example.co"),
            Some("xexample.com"),
            None,
        ] {
            let req = Req {
                host,
                ..Default::default()
            };
            assert!(!hits(&t, &req), "{host:?}");
        }
    }

    #[test]
    fn wildcard_host_needs_a_label_before_the_suffix() {
        let t = one(RouteConfig {
            host: Some("*.Example.com".into()),
            ..Default::default()
        });
        for host in [
            "a.example.com",
            "a.b.example.com",
            "A.EXAMPLE.COM:443",
            "a.example.com.",
        ] {
            let req = Req {
                host: Some(host),
                ..Default::default()
            };
            assert!(hits(&t, &req), "{host}");
        }
        for host in [
            "example.com",
            ".example.com",
            "aexample.com",
            "a.example.org",
            "a.example.com.x",
        ] {
            let req = Req {
                host: Some(host),
                ..Default::default()
            };
            assert!(!hits(&t, &req), "{host}");
        }
    }

    #[test]
    fn host_without_port_handles_ipv6_and_dots() {
        assert_eq!(host_without_port(b"[::1]:80"), b"[::1]");
        assert_eq!(host_without_port(b"[::1]"), b"[::1]");
        assert_eq!(host_without_port(b"[2001:db8::1]:8443"), b"[2001:db8::1]");
        assert_eq!(host_without_port(b"2001:db8::1"), b"2001:db8::1");
        assert_eq!(host_without_port(b"example.com:80"), b"example.com");
        assert_eq!(host_without_port(b"example.com."), b"example.com");
        assert_eq!(host_without_port(b"example.com.:80"), b"example.com");
        assert_eq!(host_without_port(b"10.0.0.1:80"), b"10.0.0.1");
        assert_eq!(host_without_port(b""), b"");

        let t = one(RouteConfig {
            host: Some("[::1]".into()),
            ..Default::default()
        });
        let req = Req {
            host: Some("[::1]:8080"),
            ..Default::default()
        };
        assert!(hits(&t, &req));
    }

    #[test]
    fn path_prefix_exact_and_regex() {
        let prefix = one(RouteConfig {
            path_prefix: Some("/api/".into()),
            ..Default::default()
        });
        let exact = one(RouteConfig {
            path_exact: Some("/health".into()),
            ..Default::default()
        });
        let regex = one(RouteConfig {
            path_regex: Some(r"(?i)\.(png|jpg)$".into()),
            ..Default::default()
        });
        let req = |path| Req {
            path,
            ..Default::default()
        };
        assert!(hits(&prefix, &req("/api/v1")));
        assert!(hits(&prefix, &req("/api/")));
        assert!(!hits(&prefix, &req("/api")));
        assert!(!hits(&prefix, &req("/API/v1")));
        assert!(hits(&exact, &req("/health")));
        assert!(!hits(&exact, &req("/health/")));
        assert!(!hits(&exact, &req("/healt")));
        // Unanchored search, like nginx `~`.
        assert!(hits(&regex, &req("/img/a.PNG")));
        assert!(hits(&regex, &req("/x/y.jpg")));
        assert!(!hits(&regex, &req("/x/y.jpg.html")));
        // Raw comparison: no percent-decoding.
        assert!(!hits(&exact, &req("/%68ealth")));
    }

    #[test]
    fn regex_matches_paths_that_are_not_utf8() {
        let t = one(RouteConfig {
            path_regex: Some("^/a.b$".into()),
            ..Default::default()
        });
        struct Raw;
        impl RequestView for Raw {
            fn host(&self) -> Option<&[u8]> {
                None
            }
            fn path(&self) -> &[u8] {
                b"/a\xffb"
            }
            fn query(&self) -> Option<&[u8]> {
                None
            }
            fn header(&self, _: &[u8]) -> Option<&[u8]> {
                None
            }
            fn cookie(&self, _: &[u8]) -> Option<&[u8]> {
                None
            }
            fn source_ip(&self) -> IpAddr {
                "127.0.0.1".parse().unwrap()
            }
        }
        assert!(t.select(&Raw).is_some());
    }

    #[test]
    fn headers_must_equal_after_trimming_ows() {
        let t = one(RouteConfig {
            headers: map(&[("x-canary", "yes")]),
            ..Default::default()
        });
        let req = |v| Req {
            headers: vec![("X-Canary", v)],
            ..Default::default()
        };
        assert!(hits(&t, &req("yes")));
        assert!(hits(&t, &req(" yes\t")));
        assert!(!hits(&t, &req("Yes")));
        assert!(!hits(&t, &req("yes please")));
        assert!(!hits(&t, &Req::default()));
        // The first header of that name decides.
        let two = Req {
            headers: vec![("x-canary", "no"), ("x-canary", "yes")],
            ..Default::default()
        };
        assert!(!hits(&t, &two));
    }

    #[test]
    fn cookies_must_equal() {
        let t = one(RouteConfig {
            cookies: map(&[("beta", "1")]),
            ..Default::default()
        });
        let req = |c| Req {
            cookie: Some(c),
            ..Default::default()
        };
        assert!(hits(&t, &req("a=2; beta=1")));
        assert!(!hits(&t, &req("beta=2")));
        assert!(!hits(&t, &req("Beta=1")));
        assert!(!hits(&t, &req("beta2=1")));
        assert!(!hits(&t, &Req::default()));
    }

    #[test]
    fn find_cookie_edge_cases() {
        assert_eq!(find_cookie(b"a=1; b=2", b"b"), Some(&b"2"[..]));
        assert_eq!(find_cookie(b"a=1;b=2", b"b"), Some(&b"2"[..]));
        assert_eq!(find_cookie(b"  a = 1 ;  b=2  ", b"a"), Some(&b"1"[..]));
        assert_eq!(find_cookie(b"a=1; b=2  ", b"b"), Some(&b"2"[..]));
        assert_eq!(find_cookie(b"a=1; a=2", b"a"), Some(&b"1"[..]));
        assert_eq!(find_cookie(b"a=; b=2", b"a"), Some(&b""[..]));
        assert_eq!(find_cookie(b"a=x=y", b"a"), Some(&b"x=y"[..]));
        assert_eq!(find_cookie(b"a=\"q\"", b"a"), Some(&b"\"q\""[..]));
        // A pair without '=' names nothing, and does not hide the pairs after it.
        assert_eq!(find_cookie(b"a; b=2", b"a"), None);
        assert_eq!(find_cookie(b"a; b=2", b"b"), Some(&b"2"[..]));
        assert_eq!(find_cookie(b"ab=1", b"a"), None);
        assert_eq!(find_cookie(b"A=1", b"a"), None);
        assert_eq!(find_cookie(b"", b"a"), None);
        assert_eq!(find_cookie(b";;", b"a"), None);
    }

    #[test]
    fn query_must_equal() {
        let t = one(RouteConfig {
            query: map(&[("beta", "1"), ("v", "")]),
            ..Default::default()
        });
        let req = |q| Req {
            query: Some(q),
            ..Default::default()
        };
        assert!(hits(&t, &req("beta=1&v")));
        assert!(hits(&t, &req("x=2&v=&beta=1")));
        assert!(!hits(&t, &req("beta=1")));
        assert!(!hits(&t, &req("beta2=1&v")));
        assert!(!hits(&t, &req("beta=1%20&v")));
        assert!(!hits(&t, &Req::default()));
    }

    #[test]
    fn find_query_param_edge_cases() {
        assert_eq!(find_query_param(b"a=1&b=2", b"b"), Some(&b"2"[..]));
        assert_eq!(find_query_param(b"a=1&a=2", b"a"), Some(&b"1"[..]));
        assert_eq!(
            find_query_param(b"beta2=1&beta=3", b"beta"),
            Some(&b"3"[..])
        );
        assert_eq!(find_query_param(b"beta2=1", b"beta"), None);
        assert_eq!(find_query_param(b"flag&x=1", b"flag"), Some(&b""[..]));
        assert_eq!(find_query_param(b"flag=&x=1", b"flag"), Some(&b""[..]));
        assert_eq!(find_query_param(b"a=b=c", b"a"), Some(&b"b=c"[..]));
        assert_eq!(find_query_param(b"&&a=1&", b"a"), Some(&b"1"[..]));
        assert_eq!(find_query_param(b"a%20b=1", b"a b"), None);
        assert_eq!(find_query_param(b"", b"a"), None);
        assert_eq!(find_query_param(b"", b""), Some(&b""[..]));
    }

    #[test]
    fn source_cidr_v4_v6_and_mapped() {
        let t = one(RouteConfig {
            source_cidr: vec!["10.0.0.0/8".into(), "2001:db8::/32".into()],
            ..Default::default()
        });
        let req = |ip: &str| Req {
            ip: ip.parse().unwrap(),
            ..Default::default()
        };
        assert!(hits(&t, &req("10.1.2.3")));
        assert!(hits(&t, &req("::ffff:10.1.2.3")));
        assert!(hits(&t, &req("2001:db8:1::5")));
        assert!(!hits(&t, &req("11.0.0.1")));
        assert!(!hits(&t, &req("::ffff:11.0.0.1")));
        assert!(!hits(&t, &req("2001:db9::1")));
        // The v4 bits of a plain v6 address are not an IPv4 address.
        assert!(!hits(&t, &req("::10.1.2.3")));

        let edges = one(RouteConfig {
            source_cidr: vec!["192.0.2.7/32".into(), "::1".into()],
            ..Default::default()
        });
        let req_e = |ip: &str| hits(&edges, &req(ip));
        assert!(req_e("192.0.2.7") && req_e("::1"));
        assert!(!req_e("192.0.2.8") && !req_e("::2"));

        let all_v4 = one(RouteConfig {
            source_cidr: vec!["0.0.0.0/0".into()],
            ..Default::default()
        });
        assert!(hits(&all_v4, &req("203.0.113.9")));
        assert!(!hits(&all_v4, &req("2001:db8::1")));
        let all = one(RouteConfig {
            source_cidr: vec!["::/0".into()],
            ..Default::default()
        });
        assert!(hits(&all, &req("2001:db8::1")) && hits(&all, &req("203.0.113.9")));
    }

    #[test]
    fn all_conditions_must_hold() {
        let t = one(RouteConfig {
            host: Some("example.com".into()),
            path_prefix: Some("/api".into()),
            path_exact: Some("/api/v1".into()),
            path_regex: Some("v[0-9]$".into()),
            headers: map(&[("x-a", "1")]),
            cookies: map(&[("c", "2")]),
            query: map(&[("q", "3")]),
            source_cidr: vec!["192.0.2.0/24".into()],
            ..Default::default()
        });
        let full = Req {
            host: Some("example.com"),
            path: "/api/v1",
            query: Some("q=3"),
            headers: vec![("x-a", "1")],
            cookie: Some("c=2"),
            ip: "192.0.2.1".parse().unwrap(),
        };
        assert!(hits(&t, &full));
        let misses = [
            Req {
                host: Some("other.com"),
                ..full.clone()
            },
            Req {
                path: "/api/v2",
                ..full.clone()
            },
            Req {
                query: Some("q=4"),
                ..full.clone()
            },
            Req {
                headers: vec![],
                ..full.clone()
            },
            Req {
                cookie: Some("c=1"),
                ..full.clone()
            },
            Req {
                ip: "198.51.100.1".parse().unwrap(),
                ..full.clone()
            },
        ];
        for (i, req) in misses.iter().enumerate() {
            assert!(!hits(&t, req), "miss {i}");
        }
    }

    #[test]
    fn first_match_wins_and_none_falls_through() {
        let routes = [
            RouteConfig {
                path_prefix: Some("/api/admin".into()),
                split: to("b"),
                ..Default::default()
            },
            RouteConfig {
                path_prefix: Some("/api".into()),
                split: to("a"),
                ..Default::default()
            },
            RouteConfig {
                path_prefix: Some("/api/other".into()),
                split: to("c"),
                ..Default::default()
            },
        ];
        let t = RouteTable::build(&routes, &pools()).unwrap();
        assert_eq!(t.len(), 3);
        assert!(!t.is_empty());
        let pick = |path| {
            let req = Req {
                path,
                ..Default::default()
            };
            t.select(&req)
                .map(|(i, p)| (i, p.pool().unwrap().name.clone()))
        };
        assert_eq!(pick("/api/admin/x"), Some((0, "b".into())));
        assert_eq!(pick("/api/other"), Some((1, "a".into())));
        assert_eq!(pick("/static"), None);

        let empty = RouteTable::build(&[], &pools()).unwrap();
        assert!(empty.is_empty());
        assert!(empty.select(&Req::default()).is_none());
    }

    fn split_counts(weights: &[(&str, u32)], n: usize) -> HashMap<String, usize> {
        let split = weights
            .iter()
            .map(|&(pool, weight)| SplitConfig {
                pool: pool.into(),
                weight,
            })
            .collect();
        let t = RouteTable::build(
            &[RouteConfig {
                split,
                ..Default::default()
            }],
            &pools(),
        )
        .unwrap();
        let mut counts = HashMap::new();
        let req = Req::default();
        for _ in 0..n {
            let (_, target) = t.select(&req).unwrap();
            let p = target.pool().unwrap();
            *counts.entry(p.name.clone()).or_insert(0) += 1;
        }
        counts
    }

    #[test]
    fn split_follows_weights_exactly() {
        let c = split_counts(&[("a", 95), ("b", 5)], 10_000);
        assert!(
            c["a"].abs_diff(9500) <= 1 && c["b"].abs_diff(500) <= 1,
            "{c:?}"
        );
        let c = split_counts(&[("a", 50), ("b", 50)], 10_000);
        assert!(
            c["a"].abs_diff(5000) <= 1 && c["b"].abs_diff(5000) <= 1,
            "{c:?}"
        );
        let c = split_counts(&[("a", 1), ("b", 2), ("c", 7)], 10_000);
        assert_eq!((c["a"], c["b"], c["c"]), (1000, 2000, 7000), "{c:?}");
    }

    #[test]
    fn split_is_smooth() {
        // 95/5 interleaves: never two "b" picks within 19 of each other.
        let split = vec![
            SplitConfig {
                pool: "a".into(),
                weight: 95,
            },
            SplitConfig {
                pool: "b".into(),
                weight: 5,
            },
        ];
        let t = RouteTable::build(
            &[RouteConfig {
                split,
                ..Default::default()
            }],
            &pools(),
        )
        .unwrap();
        let picks: Vec<bool> = (0..200)
            .map(|_| t.select(&Req::default()).unwrap().1.pool().unwrap().name == "b")
            .collect();
        let b_at: Vec<usize> = (0..picks.len()).filter(|&i| picks[i]).collect();
        assert_eq!(b_at.len(), 10);
        assert!(b_at.windows(2).all(|w| w[1] - w[0] == 20), "{b_at:?}");
    }

    #[test]
    fn zero_weight_is_never_picked() {
        let c = split_counts(&[("a", 0), ("b", 3), ("c", 0)], 1000);
        assert_eq!(c.get("a"), None);
        assert_eq!(c.get("c"), None);
        assert_eq!(c["b"], 1000);
    }

    #[test]
    fn split_is_shared_by_threads() {
        let split = vec![
            SplitConfig {
                pool: "a".into(),
                weight: 3,
            },
            SplitConfig {
                pool: "b".into(),
                weight: 1,
            },
        ];
        let t = RouteTable::build(
            &[RouteConfig {
                split,
                ..Default::default()
            }],
            &pools(),
        )
        .unwrap();
        let a_total: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    s.spawn(|| {
                        (0..1000)
                            .filter(|_| {
                                t.select(&Req::default()).unwrap().1.pool().unwrap().name == "a"
                            })
                            .count()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(a_total, 3000);
    }

    #[test]
    fn build_errors_name_the_route_and_field() {
        let p = pools();
        let err = |r: RouteConfig| {
            let ok = RouteConfig {
                split: to("a"),
                ..Default::default()
            };
            RouteTable::build(&[ok, r], &p).err().unwrap()
        };
        let e = err(RouteConfig {
            split: to("nope"),
            ..Default::default()
        });
        assert!(e.contains("route 1") && e.contains("nope"), "{e}");
        let e = err(RouteConfig {
            path_regex: Some("(".into()),
            split: to("a"),
            ..Default::default()
        });
        assert!(e.contains("route 1") && e.contains("path_regex"), "{e}");
        for bad in ["10.0.0.0/33", "::/129", "10.0.0/8", "x", "10.0.0.0/a"] {
            let e = err(RouteConfig {
                source_cidr: vec![bad.into()],
                split: to("a"),
                ..Default::default()
            });
            assert!(e.contains("route 1") && e.contains("source_cidr"), "{e}");
        }
        for bad in ["*", "*example.com", "a.*.com", "", "*."] {
            let e = err(RouteConfig {
                host: Some(bad.into()),
                split: to("a"),
                ..Default::default()
            });
            assert!(e.contains("route 1") && e.contains("host"), "{bad}: {e}");
        }
        let e = err(RouteConfig {
            split: vec![SplitConfig {
                pool: "a".into(),
                weight: 0,
            }],
            ..Default::default()
        });
        assert!(e.contains("route 1") && e.contains("split"), "{e}");
        let e = err(RouteConfig::default());
        assert!(e.contains("route 1") && e.contains("split"), "{e}");
    }

    fn ab_route(weights: &[(&str, u32)]) -> RouteTable {
        let split = weights
            .iter()
            .map(|&(pool, weight)| SplitConfig {
                pool: pool.into(),
                weight,
            })
            .collect();
        let route = RouteConfig {
            split,
            split_affinity: Some(crate::config::SplitAffinityConfig {
                cookie: "ab".into(),
                ttl_ms: 86_400_000,
            }),
            ..Default::default()
        };
        RouteTable::build(&[route], &pools()).unwrap()
    }

    fn placed(t: &RouteTable, cookie: Option<&'static str>) -> (String, Option<GroupCookie>) {
        let req = Req {
            cookie,
            ..Default::default()
        };
        match t.select(&req).unwrap().1 {
            Target::Pool(p, group) => (p.name.clone(), group),
            Target::Redirect(_) => panic!("a split route"),
        }
    }

    #[test]
    fn split_affinity_places_newcomers_by_weight_and_keeps_their_group() {
        let t = ab_route(&[("a", 1), ("b", 1)]);
        let mut given = HashMap::new();
        for _ in 0..100 {
            let (pool, group) = placed(&t, None);
            let group = group.expect("a newcomer gets its group's cookie");
            assert_eq!((&*group.name, group.ttl_ms), ("ab", 86_400_000));
            given.insert(pool, group.token);
        }
        assert_eq!(given.len(), 2);
        assert_ne!(given["a"], given["b"]);
        assert_eq!(given["a"], super::super::split::group_token("a"));
        // a returning client follows its cookie, whatever the sequence would say, and is not
        // given it again
        let a_cookie: &'static str =
            Box::leak(format!("x=1; ab={}", std::str::from_utf8(&given["a"]).unwrap()).into());
        for _ in 0..10 {
            assert_eq!(placed(&t, Some(a_cookie)), ("a".to_string(), None));
        }
        // an unknown value is a newcomer
        assert!(placed(&t, Some("ab=0123456789abcdef")).1.is_some());
    }

    #[test]
    fn split_affinity_replaces_a_group_whose_pool_left_the_split() {
        let t = ab_route(&[("a", 0), ("b", 1)]);
        let token = super::super::split::group_token("a");
        let cookie: &'static str =
            Box::leak(format!("ab={}", std::str::from_utf8(&token).unwrap()).into());
        let (pool, group) = placed(&t, Some(cookie));
        assert_eq!(pool, "b");
        assert_eq!(group.unwrap().token, super::super::split::group_token("b"));
    }

    #[test]
    fn routes_are_counted_under_their_ids() {
        let t = RouteTable::build_with_ids(
            &[RouteConfig {
                split: to("a"),
                ..Default::default()
            }],
            &pools(),
            &[7],
            None,
        )
        .unwrap();
        assert_eq!((t.id(0), t.id(1)), (7, NO_ROUTE));
        let plain = RouteTable::build(
            &[RouteConfig {
                split: to("a"),
                ..Default::default()
            }],
            &pools(),
        );
        assert_eq!(plain.unwrap().id(0), NO_ROUTE);
    }

    #[test]
    fn a_country_condition_needs_a_database_and_iso_codes() {
        let route = |country: &[&str]| RouteConfig {
            split: to("a"),
            country: country.iter().map(|c| c.to_string()).collect(),
            ..Default::default()
        };
        let err = RouteTable::build(&[route(&["DE"])], &pools())
            .err()
            .unwrap();
        assert_eq!(err, "route 0: country: needs [geoip].database");
        let err = RouteTable::build(&[route(&["Germany"])], &pools())
            .err()
            .unwrap();
        assert!(err.contains("not an ISO code"), "{err}");
    }
}
