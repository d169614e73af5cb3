//! HTTP/2 requests and responses as fastlb routes and forwards them: the routing view of an h2
//! request, the fields fastlb adds for the backend (as `h1::rewrite` does for HTTP/1), and the
//! translation of heads between HTTP/2 and HTTP/1.1 in both directions.

use crate::h1::parse::{named_in_connection, HeaderKind, HeaderSpan, RequestHead, Version};
use crate::proxy::route::{find_cookie, RequestView};
use crate::proxy::HttpListener;
use crate::tls::SessionInfo;
use http::header::{self, HeaderName, HeaderValue};
use http::{request, response, HeaderMap, Method, Uri};
use std::io::Write;
use std::net::{IpAddr, SocketAddr};

/// An h2 request as routing sees it.
pub struct H2View<'a> {
    pub parts: &'a request::Parts,
    pub peer: SocketAddr,
}

impl RequestView for H2View<'_> {
    fn host(&self) -> Option<&[u8]> {
        match self.parts.uri.authority() {
            Some(a) => Some(a.as_str().as_bytes()),
            None => self
                .parts
                .headers
                .get(header::HOST)
                .map(HeaderValue::as_bytes),
        }
    }

    fn path(&self) -> &[u8] {
        self.parts.uri.path().as_bytes()
    }

    fn query(&self) -> Option<&[u8]> {
        self.parts.uri.query().map(str::as_bytes)
    }

    fn header(&self, lower_name: &[u8]) -> Option<&[u8]> {
        let name = std::str::from_utf8(lower_name).ok()?;
        self.parts.headers.get(name).map(HeaderValue::as_bytes)
    }

    fn cookie(&self, name: &[u8]) -> Option<&[u8]> {
        // HTTP/2 clients may split cookies over several fields (RFC 9113 8.2.3).
        self.parts
            .headers
            .get_all(header::COOKIE)
            .iter()
            .find_map(|v| find_cookie(v.as_bytes(), name))
    }

    fn source_ip(&self) -> IpAddr {
        self.peer.ip()
    }
}

/// The client an h2 request from `peer` names in its X-Forwarded-For fields
/// (`trusted_proxies`).
pub fn request_client(http: &HttpListener, peer: SocketAddr, headers: &HeaderMap) -> SocketAddr {
    let xff = headers
        .get_all("x-forwarded-for")
        .iter()
        .map(HeaderValue::as_bytes);
    http.client_addr(peer, xff)
}

/// Fields that belong to one connection (RFC 9110 7.6.1), never forwarded.
const HOP_BY_HOP: [HeaderName; 5] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes the hop-by-hop fields of a message passing through.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
}

/// Whether any Via field names this process: the request has looped.
pub fn has_looped(headers: &HeaderMap, via_token: &str) -> bool {
    headers.get_all(header::VIA).iter().any(|v| {
        v.as_bytes()
            .windows(via_token.len())
            .any(|w| w == via_token.as_bytes())
    })
}

fn value(bytes: Vec<u8>) -> Option<HeaderValue> {
    HeaderValue::from_maybe_shared(bytes::Bytes::from(bytes)).ok()
}

/// Rewrites a request's fields for the backend: hop-by-hop fields out, `te` kept only as
/// `trailers` (and only toward HTTP/2), and what fastlb adds to every request in.
pub fn forward_request(
    headers: &mut HeaderMap,
    peer: SocketAddr,
    tls: Option<&SessionInfo>,
    via_token: &str,
    to_h2: bool,
) {
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    let te_trailers = headers
        .get(header::TE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    headers.remove(header::TE);
    if te_trailers && to_h2 {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    headers.remove("x-forwarded-proto");
    headers.remove("x-client-cert-subject");
    headers.remove("x-client-cert-fingerprint");
    let ip = peer.ip();
    let mut xff = Vec::with_capacity(64);
    for v in headers.get_all("x-forwarded-for").iter() {
        if !v.is_empty() {
            xff.extend_from_slice(v.as_bytes());
            xff.extend_from_slice(b", ");
        }
    }
    let _ = write!(xff, "{ip}");
    if let Some(v) = value(xff) {
        headers.insert("x-forwarded-for", v);
    }
    let proto = if tls.is_some() { "https" } else { "http" };
    headers.insert("x-forwarded-proto", HeaderValue::from_static(proto));
    let forwarded = match ip {
        IpAddr::V4(_) => format!("for={ip};proto={proto}"),
        IpAddr::V6(_) => format!("for=\"[{ip}]\";proto={proto}"),
    };
    if let Ok(v) = HeaderValue::try_from(forwarded) {
        headers.insert(header::FORWARDED, v);
    }
    if let Some(s) = tls {
        if let (Some(subject), Some(fingerprint)) = (&s.client_subject, &s.client_fingerprint) {
            let printable = subject
                .bytes()
                .filter(|&b| b >= 0x20 && b != 0x7f)
                .collect();
            if let Some(v) = value(printable) {
                headers.insert("x-client-cert-subject", v);
            }
            if let Ok(v) = HeaderValue::try_from(fingerprint.as_str()) {
                headers.insert("x-client-cert-fingerprint", v);
            }
        }
    }
    if !headers.contains_key("x-request-id") {
        let id = format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
        if let Ok(v) = HeaderValue::try_from(id) {
            headers.insert("x-request-id", v);
        }
    }
    if let Ok(v) = HeaderValue::try_from(format!("2 {via_token}")) {
        headers.append(header::VIA, v);
    }
}

/// How an HTTP/1.1 message's body is delimited on the wire.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Framing {
    None,
    Length(u64),
    Chunked,
}

/// Writes the HTTP/1.1 head of an h2 request for an HTTP/1.1 backend.
pub fn h1_request_head(out: &mut Vec<u8>, parts: &request::Parts, framing: Framing) {
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    let target = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    out.extend_from_slice(if target.is_empty() { "/" } else { target }.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    if !parts.headers.contains_key(header::HOST) {
        if let Some(a) = parts.uri.authority() {
            out.extend_from_slice(b"host: ");
            out.extend_from_slice(a.as_str().as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }
    let mut cookies = 0;
    for (name, value) in &parts.headers {
        if name == header::COOKIE {
            cookies += 1;
            continue;
        }
        if name == header::CONTENT_LENGTH {
            continue;
        }
        push_field(out, name.as_str().as_bytes(), value.as_bytes());
    }
    if cookies > 0 {
        // One Cookie field on HTTP/1.1 (RFC 9113 8.2.3: joined with "; ").
        out.extend_from_slice(b"cookie: ");
        for (k, v) in parts.headers.get_all(header::COOKIE).iter().enumerate() {
            if k > 0 {
                out.extend_from_slice(b"; ");
            }
            out.extend_from_slice(v.as_bytes());
        }
        out.extend_from_slice(b"\r\n");
    }
    match framing {
        Framing::None => {}
        Framing::Length(n) => {
            let _ = write!(out, "content-length: {n}\r\n");
        }
        Framing::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    out.extend_from_slice(b"\r\n");
}

fn push_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// The fields of an HTTP/1 message (read from `buf`) as an h2 header map: hop-by-hop fields
/// and those its Connection field names are left out, and `Host` is returned apart (it
/// becomes `:authority`).
pub fn h1_fields(buf: &[u8], spans: &[HeaderSpan]) -> (HeaderMap, Option<Vec<u8>>) {
    let mut headers = HeaderMap::with_capacity(spans.len());
    let mut host = None;
    for h in spans {
        match h.kind {
            HeaderKind::Connection
            | HeaderKind::KeepAlive
            | HeaderKind::ProxyConnection
            | HeaderKind::TransferEncoding
            | HeaderKind::Upgrade
            | HeaderKind::Te
            | HeaderKind::Trailer
            | HeaderKind::Expect => continue,
            HeaderKind::Host => {
                host = Some(h.value.get(buf).to_vec());
                continue;
            }
            HeaderKind::Other if named_in_connection(h.name.get(buf), spans, buf) => continue,
            _ => {}
        }
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(h.name.get(buf)),
            HeaderValue::from_bytes(h.value.get(buf)),
        ) else {
            continue;
        };
        headers.append(name, value);
    }
    (headers, host)
}

/// An HTTP/1 request head as h2 request parts for an HTTP/2 backend.
pub fn h2_request_from_h1(
    buf: &[u8],
    head: &RequestHead,
    spans: &[HeaderSpan],
    scheme: &'static str,
) -> Option<request::Parts> {
    let (headers, host) = h1_fields(buf, spans);
    let method = Method::from_bytes(
        head.line()
            .get(buf)
            .split(|&b| b == b' ')
            .next()
            .unwrap_or_default(),
    )
    .ok()?;
    let mut path = head.path.get(buf).to_vec();
    if path.is_empty() {
        path.push(b'/');
    }
    if let Some(q) = head.query {
        path.push(b'?');
        path.extend_from_slice(q.get(buf));
    }
    let authority = host.unwrap_or_else(|| b"localhost".to_vec());
    let uri = Uri::builder()
        .scheme(scheme)
        .authority(authority)
        .path_and_query(path)
        .build()
        .ok()?;
    let mut req = request::Request::new(());
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.headers_mut() = headers;
    let (mut parts, ()) = req.into_parts();
    parts.version = http::Version::HTTP_2;
    Some(parts)
}

/// Writes the HTTP/1.1 head of an h2 response for an HTTP/1 client. A body without a length
/// goes chunked to an HTTP/1.1 client, and to an HTTP/1.0 one delimited by the close.
pub fn h1_response_head(
    out: &mut Vec<u8>,
    parts: &response::Parts,
    version: Version,
    close: bool,
    framing: Framing,
) {
    let status = parts.status;
    let _ = write!(
        out,
        "{} {} {}\r\n",
        if version == Version::Http10 {
            "HTTP/1.0"
        } else {
            "HTTP/1.1"
        },
        status.as_str(),
        status.canonical_reason().unwrap_or("")
    );
    for (name, value) in &parts.headers {
        if name == header::CONTENT_LENGTH && framing != Framing::None {
            continue;
        }
        push_field(out, name.as_str().as_bytes(), value.as_bytes());
    }
    match framing {
        Framing::None => {}
        Framing::Length(n) => {
            let _ = write!(out, "content-length: {n}\r\n");
        }
        Framing::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    } else if version == Version::Http10 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// The declared length of a message, if its fields carry one.
pub fn content_length(headers: &HeaderMap) -> Option<u64> {
    std::str::from_utf8(headers.get(header::CONTENT_LENGTH)?.as_bytes())
        .ok()?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(uri: &str, fields: &[(&str, &str)]) -> request::Parts {
        let mut b = request::Request::builder().method("POST").uri(uri);
        for (k, v) in fields {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn forwarded_fields_are_added_and_hop_by_hop_ones_removed() {
        let mut p = parts(
            "https://example.com/a?b=1",
            &[
                ("x-forwarded-for", "10.0.0.1"),
                ("x-forwarded-proto", "gopher"),
                ("te", "trailers"),
                ("x-client-cert-subject", "CN=forged"),
            ],
        );
        let peer: SocketAddr = "192.0.2.7:5000".parse().unwrap();
        forward_request(&mut p.headers, peer, None, "fastlb-0000abcd", true);
        assert_eq!(p.headers["x-forwarded-for"], "10.0.0.1, 192.0.2.7");
        assert_eq!(p.headers["x-forwarded-proto"], "http");
        assert_eq!(p.headers["forwarded"], "for=192.0.2.7;proto=http");
        assert_eq!(p.headers["te"], "trailers");
        assert!(!p.headers.contains_key("x-client-cert-subject"));
        assert!(p.headers.contains_key("x-request-id"));
        assert!(has_looped(&p.headers, "fastlb-0000abcd"));
        let mut q = parts("/", &[("te", "trailers")]);
        forward_request(&mut q.headers, peer, None, "fastlb-0000abcd", false);
        assert!(!q.headers.contains_key("te"));
    }

    #[test]
    fn an_h2_request_becomes_an_http11_head_with_one_cookie_field() {
        let p = parts(
            "https://example.com/a?b=1",
            &[("cookie", "a=1"), ("cookie", "b=2"), ("accept", "*/*")],
        );
        let mut out = Vec::new();
        h1_request_head(&mut out, &p, Framing::Chunked);
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("POST /a?b=1 HTTP/1.1\r\nhost: example.com\r\n"));
        assert!(text.contains("cookie: a=1; b=2\r\n"));
        assert!(text.contains("accept: */*\r\n"));
        assert!(text.ends_with("transfer-encoding: chunked\r\n\r\n"));
    }

    #[test]
    fn routing_sees_authority_path_query_and_split_cookies() {
        let p = parts(
            "https://api.example.com/v1/x?k=v",
            &[("cookie", "a=1"), ("cookie", "sid=42")],
        );
        let view = H2View {
            parts: &p,
            peer: "127.0.0.1:1".parse().unwrap(),
        };
        assert_eq!(view.host(), Some(&b"api.example.com"[..]));
        assert_eq!(view.path(), b"/v1/x");
        assert_eq!(view.query(), Some(&b"k=v"[..]));
        assert_eq!(view.cookie(b"sid"), Some(&b"42"[..]));
    }
}
