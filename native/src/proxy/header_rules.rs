//! Per-route rewrites (`request_headers`, `response_headers`, `rewrite_prefix`): fields set,
//! added and removed on the way to the backend and back, and the path prefix the route matched
//! replaced. Compiled once per config into both forms the sessions need: bytes for the
//! HTTP/1 head writers, `http` names and values for the HTTP/2 (and translated) paths.
//!
//! `set` replaces every field of that name, `add` appends one, `remove` drops every one. The
//! control plane refuses the names fastlb itself manages (framing, hop-by-hop, forwarding,
//! Via, X-Request-Id, Host), so a rule never fights the proxy's own fields.

use crate::config::HeaderRulesConfig;
use http::header::{HeaderName, HeaderValue};
use http::HeaderMap;

/// One direction's rules, or None when it has none.
pub struct HeaderRules {
    /// Lower-case names whose incoming fields are dropped: `remove` and `set`.
    drop: Box<[Box<[u8]>]>,
    /// Fields written after the kept ones: `set`, then `add`, each "Name: value\r\n".
    h1_append: Box<[u8]>,
    h2_drop: Box<[HeaderName]>,
    h2_append: Box<[(HeaderName, HeaderValue)]>,
}

impl HeaderRules {
    pub fn build(cfg: &HeaderRulesConfig) -> Result<Option<HeaderRules>, String> {
        if cfg.set.is_empty() && cfg.add.is_empty() && cfg.remove.is_empty() {
            return Ok(None);
        }
        let name = |n: &str| {
            HeaderName::from_bytes(n.as_bytes()).map_err(|_| format!("{n:?}: not a field name"))
        };
        let value =
            |v: &str| HeaderValue::from_str(v).map_err(|_| format!("{v:?}: not a field value"));
        let dropped: Vec<&String> = cfg
            .remove
            .iter()
            .chain(cfg.set.iter().map(|(n, _)| n))
            .collect();
        let mut h1_append = Vec::new();
        let mut h2_append = Vec::new();
        for (n, v) in cfg.set.iter().chain(&cfg.add) {
            h2_append.push((name(n)?, value(v)?));
            h1_append.extend_from_slice(format!("{n}: {v}\r\n").as_bytes());
        }
        Ok(Some(HeaderRules {
            drop: dropped
                .iter()
                .map(|n| n.to_ascii_lowercase().into_bytes().into())
                .collect(),
            h2_drop: dropped.iter().map(|n| name(n)).collect::<Result<_, _>>()?,
            h1_append: h1_append.into(),
            h2_append: h2_append.into(),
        }))
    }

    /// Whether an incoming field of this name is dropped.
    pub fn drops(&self, name: &[u8]) -> bool {
        self.drop.iter().any(|d| name.eq_ignore_ascii_case(d))
    }

    /// The fields the rules add, for an HTTP/1 head.
    pub fn write_h1(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.h1_append);
    }

    /// Applies the rules to an `http` field map (HTTP/2 and translated messages).
    pub fn apply(&self, headers: &mut HeaderMap) {
        for name in &self.h2_drop {
            headers.remove(name);
        }
        for (name, value) in &self.h2_append {
            headers.append(name.clone(), value.clone());
        }
    }
}

/// `rewrite_prefix`: the route's `path_prefix` replaced by this in the path sent on.
pub struct PrefixRewrite {
    from: Box<[u8]>,
    to: Box<[u8]>,
}

impl PrefixRewrite {
    pub fn new(from: &str, to: &str) -> PrefixRewrite {
        PrefixRewrite {
            from: from.as_bytes().into(),
            to: to.as_bytes().into(),
        }
    }

    /// `path` with the prefix replaced, appended to `out` (a path the route matched starts
    /// with the prefix; one that does not is written unchanged).
    pub fn write(&self, path: &[u8], out: &mut Vec<u8>) {
        match path.strip_prefix(&self.from[..]) {
            Some(rest) => {
                out.extend_from_slice(&self.to);
                // "/api/" -> "/" with "/api/x": "/x", not "//x"
                let rest = match (self.to.last(), rest.first()) {
                    (Some(b'/'), Some(b'/')) => &rest[1..],
                    _ => rest,
                };
                out.extend_from_slice(rest);
            }
            None => out.extend_from_slice(path),
        }
    }
}

/// What a route rewrites; None on a route that rewrites nothing.
pub struct RouteRewrite {
    pub request: Option<HeaderRules>,
    pub response: Option<HeaderRules>,
    pub prefix: Option<PrefixRewrite>,
}

impl RouteRewrite {
    pub fn build(
        request: &HeaderRulesConfig,
        response: &HeaderRulesConfig,
        prefix: Option<(&str, &str)>,
    ) -> Result<Option<Box<RouteRewrite>>, String> {
        let rewrite = RouteRewrite {
            request: HeaderRules::build(request).map_err(|e| format!("request_headers {e}"))?,
            response: HeaderRules::build(response).map_err(|e| format!("response_headers {e}"))?,
            prefix: prefix.map(|(from, to)| PrefixRewrite::new(from, to)),
        };
        let none =
            rewrite.request.is_none() && rewrite.response.is_none() && rewrite.prefix.is_none();
        Ok((!none).then(|| Box::new(rewrite)))
    }

    /// The request rewrites on a request given as `http` parts (HTTP/2, or HTTP/1 bound for
    /// an HTTP/2 pool): the fields, and the path prefix.
    pub fn apply_to_request(&self, parts: &mut http::request::Parts) {
        if let Some(rules) = &self.request {
            rules.apply(&mut parts.headers);
        }
        if let Some(pq) = self.path_and_query(parts.uri.path(), parts.uri.query()) {
            let mut uri = std::mem::take(&mut parts.uri).into_parts();
            uri.path_and_query = pq.parse().ok();
            parts.uri = http::Uri::from_parts(uri).unwrap_or_default();
        }
    }

    /// The path (and query) for an `http` URI: `path_and_query` with the prefix replaced.
    pub fn path_and_query(&self, path: &str, query: Option<&str>) -> Option<String> {
        let prefix = self.prefix.as_ref()?;
        let mut out = Vec::with_capacity(path.len() + 16);
        prefix.write(path.as_bytes(), &mut out);
        if let Some(q) = query {
            out.push(b'?');
            out.extend_from_slice(q.as_bytes());
        }
        String::from_utf8(out).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(set: &[(&str, &str)], add: &[(&str, &str)], remove: &[&str]) -> HeaderRules {
        let own = |v: &[(&str, &str)]| {
            v.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect()
        };
        HeaderRules::build(&HeaderRulesConfig {
            set: own(set),
            add: own(add),
            remove: remove.iter().map(|s| s.to_string()).collect(),
        })
        .unwrap()
        .unwrap()
    }

    #[test]
    fn set_replaces_add_appends_remove_drops() {
        let r = rules(&[("X-Env", "prod")], &[("X-Tag", "b")], &["X-Debug"]);
        assert!(r.drops(b"x-env") && r.drops(b"X-DEBUG") && !r.drops(b"x-tag"));
        let mut out = Vec::new();
        r.write_h1(&mut out);
        assert_eq!(out, b"X-Env: prod\r\nX-Tag: b\r\n");
        let mut map = HeaderMap::new();
        map.append("x-env", HeaderValue::from_static("dev"));
        map.append("x-env", HeaderValue::from_static("test"));
        map.append("x-tag", HeaderValue::from_static("a"));
        map.append("x-debug", HeaderValue::from_static("1"));
        r.apply(&mut map);
        let all = |n: &str| {
            map.get_all(n)
                .iter()
                .map(|v| v.to_str().unwrap().to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(all("x-env"), ["prod"]);
        assert_eq!(all("x-tag"), ["a", "b"]);
        assert!(all("x-debug").is_empty());
    }

    #[test]
    fn empty_rules_are_none_and_bad_ones_say_why() {
        assert!(HeaderRules::build(&HeaderRulesConfig::default())
            .unwrap()
            .is_none());
        let bad = HeaderRulesConfig {
            add: vec![("X".into(), "a\nb".into())],
            ..Default::default()
        };
        assert!(HeaderRules::build(&bad)
            .err()
            .unwrap()
            .contains("not a field value"));
    }

    #[test]
    fn prefix_rewrites() {
        let write = |from: &str, to: &str, path: &str| {
            let mut out = Vec::new();
            PrefixRewrite::new(from, to).write(path.as_bytes(), &mut out);
            String::from_utf8(out).unwrap()
        };
        assert_eq!(write("/api/", "/", "/api/users"), "/users");
        assert_eq!(write("/api/", "/v2/", "/api/users"), "/v2/users");
        assert_eq!(write("/api", "/", "/api/users"), "/users");
        assert_eq!(write("/api", "/v2", "/api/users"), "/v2/users");
        assert_eq!(write("/api/", "/", "/other"), "/other");
        let r = RouteRewrite::build(
            &Default::default(),
            &Default::default(),
            Some(("/a/", "/b/")),
        )
        .unwrap()
        .unwrap();
        assert_eq!(r.path_and_query("/a/x", Some("q=1")).unwrap(), "/b/x?q=1");
    }
}
