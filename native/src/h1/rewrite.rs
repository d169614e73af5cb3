//! What fastlb changes in a message head on its way through, and the answers it writes itself.
//!
//! Requests: hop-by-hop fields go (RFC 9110 7.6.1: Connection and the fields it names,
//! Keep-Alive, Proxy-Connection, TE, Trailer, Upgrade unless tunnelling); X-Forwarded-For is
//! appended to (one field), X-Forwarded-Proto is set, Forwarded and Via get our element,
//! X-Request-Id is kept or generated. Everything else is copied byte for byte.

use super::parse::{named_in_connection, HeaderKind, HeaderSpan, RequestHead, Span, Version};
use crate::config::RedirectConfig;
use crate::proxy::exchange::SetCookies;
use crate::proxy::header_rules::{HeaderRules, RouteRewrite};
use crate::proxy::route::{find_cookie, RequestView};
use crate::tls::SessionInfo;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};

/// A parsed request as routing and hashing see it.
pub struct View<'a> {
    pub buf: &'a [u8],
    pub head: &'a RequestHead,
    pub headers: &'a [HeaderSpan],
    pub peer: SocketAddr,
}

impl RequestView for View<'_> {
    fn host(&self) -> Option<&[u8]> {
        self.head.host.map(|s| s.get(self.buf))
    }
    fn path(&self) -> &[u8] {
        let p = self.head.path.get(self.buf);
        if p.is_empty() {
            b"/"
        } else {
            p
        }
    }
    fn query(&self) -> Option<&[u8]> {
        self.head.query.map(|s| s.get(self.buf))
    }
    fn header(&self, lower_name: &[u8]) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|h| h.name.get(self.buf).eq_ignore_ascii_case(lower_name))
            .map(|h| h.value.get(self.buf))
    }
    fn cookie(&self, name: &[u8]) -> Option<&[u8]> {
        self.headers
            .iter()
            .filter(|h| h.kind == HeaderKind::Cookie)
            .find_map(|h| find_cookie(h.value.get(self.buf), name))
    }
    fn source_ip(&self) -> IpAddr {
        self.peer.ip()
    }
}

/// The status line of a response through the end of its CRLF. Only for responses, which
/// `parse_response` refuses when an empty line comes first; a request's line may start after
/// one (RFC 9112 2.2), so requests use `RequestHead::line()`.
fn status_line(buf: &[u8]) -> &[u8] {
    let end = buf
        .iter()
        .position(|&b| b == b'\n')
        .map_or(buf.len(), |i| i + 1);
    &buf[..end]
}

fn push_header(out: &mut Vec<u8>, buf: &[u8], h: &HeaderSpan) {
    out.extend_from_slice(h.name.get(buf));
    out.extend_from_slice(b": ");
    out.extend_from_slice(h.value.get(buf));
    out.extend_from_slice(b"\r\n");
}

/// Where a request came from, as the backend is told.
#[derive(Clone, Copy)]
pub struct Origin<'a> {
    pub peer: SocketAddr,
    /// This process's `Via` pseudonym.
    pub via_token: &'a str,
    /// The client's TLS session (https listeners).
    pub tls: Option<&'a SessionInfo>,
}

/// Writes the head fastlb sends the backend for `head` (read from `buf`) into `out`.
/// `rewrite`: the matched route's rules (path prefix, fields).
pub fn request_head(
    out: &mut Vec<u8>,
    buf: &[u8],
    head: &RequestHead,
    headers: &[HeaderSpan],
    origin: Origin<'_>,
    upgrade: bool,
    rewrite: Option<&RouteRewrite>,
) {
    let Origin {
        peer,
        via_token,
        tls,
    } = origin;
    match rewrite.and_then(|r| r.prefix.as_ref()) {
        None => out.extend_from_slice(head.line().get(buf)),
        Some(prefix) => {
            // The line with the path replaced; whatever surrounds the path (an absolute-form
            // scheme and authority, the query, the version) as sent.
            let line = head.line();
            out.extend_from_slice(&buf[line.start as usize..head.path.start as usize]);
            prefix.write(head.path.get(buf), out);
            out.extend_from_slice(&buf[head.path.end as usize..line.end as usize]);
        }
    }
    let rules = rewrite.and_then(|r| r.request.as_ref());
    let has_connection = connection_lists_fields(buf, headers);
    let mut forwarded_for: Option<Span> = None;
    let mut several_xff = false;
    let mut has_request_id = false;
    for h in headers {
        match h.kind {
            HeaderKind::Connection
            | HeaderKind::KeepAlive
            | HeaderKind::ProxyConnection
            | HeaderKind::Te
            | HeaderKind::Trailer
            | HeaderKind::Upgrade
            | HeaderKind::Expect
            | HeaderKind::XForwardedProto
            | HeaderKind::XClientCert => continue,
            HeaderKind::XForwardedFor => {
                several_xff |= forwarded_for.is_some();
                forwarded_for = Some(h.value);
                continue;
            }
            HeaderKind::XRequestId => has_request_id = true,
            HeaderKind::Other
                if has_connection && named_in_connection(h.name.get(buf), headers, buf) =>
            {
                continue
            }
            HeaderKind::Other if rules.is_some_and(|r| r.drops(h.name.get(buf))) => continue,
            _ => {}
        }
        push_header(out, buf, h);
    }
    if let Some(r) = rules {
        r.write_h1(out);
    }
    let ip = peer.ip();
    out.extend_from_slice(b"X-Forwarded-For: ");
    if several_xff {
        for h in headers
            .iter()
            .filter(|h| h.kind == HeaderKind::XForwardedFor)
        {
            out.extend_from_slice(h.value.get(buf));
            out.extend_from_slice(b", ");
        }
    } else if let Some(v) = forwarded_for.filter(|v| !v.is_empty()) {
        out.extend_from_slice(v.get(buf));
        out.extend_from_slice(b", ");
    }
    push_ip(out, ip);
    let proto: &[u8] = if tls.is_some() { b"https" } else { b"http" };
    out.extend_from_slice(b"\r\nX-Forwarded-Proto: ");
    out.extend_from_slice(proto);
    out.extend_from_slice(b"\r\nForwarded: for=");
    match ip {
        IpAddr::V4(_) => push_ip(out, ip),
        IpAddr::V6(_) => {
            out.extend_from_slice(b"\"[");
            push_ip(out, ip);
            out.extend_from_slice(b"]\"");
        }
    }
    out.extend_from_slice(b";proto=");
    out.extend_from_slice(proto);
    out.extend_from_slice(b"\r\n");
    if let Some(s) = tls {
        if let (Some(subject), Some(fingerprint)) = (&s.client_subject, &s.client_fingerprint) {
            // A subject is printable text (RFC 4514); anything that could end the field is
            // left out rather than forwarded.
            out.extend_from_slice(b"X-Client-Cert-Subject: ");
            out.extend(subject.bytes().filter(|&b| b >= 0x20 && b != 0x7f));
            out.extend_from_slice(b"\r\nX-Client-Cert-Fingerprint: ");
            out.extend_from_slice(fingerprint.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }
    if !has_request_id {
        out.extend_from_slice(b"X-Request-Id: ");
        push_hex(out, fastrand::u64(..));
        push_hex(out, fastrand::u64(..));
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"Via: 1.1 ");
    out.extend_from_slice(via_token.as_bytes());
    out.extend_from_slice(b"\r\n");
    if upgrade {
        if let Some(u) = head.upgrade {
            out.extend_from_slice(b"Connection: upgrade\r\nUpgrade: ");
            out.extend_from_slice(u.get(buf));
            out.extend_from_slice(b"\r\n");
        }
    } else if head.version == Version::Http10 {
        // HTTP/1.0 to the backend too (so it never answers chunked), but kept alive.
        out.extend_from_slice(b"Connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Whether a Connection field names other fields (anything but close, keep-alive, upgrade),
/// which then are hop-by-hop too. Most messages have none, or just `keep-alive`: this spares
/// them a per-field lookup.
fn connection_lists_fields(buf: &[u8], headers: &[HeaderSpan]) -> bool {
    headers
        .iter()
        .filter(|h| h.kind == HeaderKind::Connection)
        .any(|h| {
            h.value.get(buf).split(|&b| b == b',').any(|t| {
                let t = t.trim_ascii();
                !t.is_empty()
                    && !t.eq_ignore_ascii_case(b"close")
                    && !t.eq_ignore_ascii_case(b"keep-alive")
                    && !t.eq_ignore_ascii_case(b"upgrade")
            })
        })
}

/// An IP address in its usual text form; IPv4 by hand, as `fmt` costs more than the rest of
/// the head rewrite (perf: 1.3% of a keep-alive request).
fn push_ip(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                if octet >= 100 {
                    out.push(b'0' + octet / 100);
                }
                if octet >= 10 {
                    out.push(b'0' + octet / 10 % 10);
                }
                out.push(b'0' + octet % 10);
            }
        }
        IpAddr::V6(v6) => {
            let _ = write!(out, "{v6}");
        }
    }
}

/// 16 lower-case hex digits.
fn push_hex(out: &mut Vec<u8>, v: u64) {
    for i in (0..16).rev() {
        out.push(b"0123456789abcdef"[((v >> (i * 4)) & 0xf) as usize]);
    }
}

/// Whether any Via field of the request names this process: the request has looped.
pub fn has_looped(buf: &[u8], headers: &[HeaderSpan], via_token: &str) -> bool {
    let token = via_token.as_bytes();
    headers
        .iter()
        .filter(|h| h.kind == HeaderKind::Via)
        .any(|h| h.value.get(buf).windows(token.len()).any(|w| w == token))
}

/// How the response head to the client ends its connection handling.
pub struct ClientConnection {
    pub close: bool,
    /// An HTTP/1.0 client that asked for keep-alive must be told it got it.
    pub http10_keep_alive: bool,
}

/// Writes the response head for the client: the backend's status line and fields, less the
/// hop-by-hop ones, plus our Connection field and the affinity cookie if one is due.
pub fn response_head(
    out: &mut Vec<u8>,
    buf: &[u8],
    headers: &[HeaderSpan],
    conn: ClientConnection,
    set_cookies: &SetCookies<'_>,
    rules: Option<&HeaderRules>,
) {
    out.extend_from_slice(status_line(buf));
    let has_connection = connection_lists_fields(buf, headers);
    for h in headers {
        match h.kind {
            HeaderKind::Connection | HeaderKind::KeepAlive | HeaderKind::ProxyConnection => {
                continue
            }
            HeaderKind::Other | HeaderKind::Trailer
                if has_connection && named_in_connection(h.name.get(buf), headers, buf) =>
            {
                continue
            }
            HeaderKind::Other if rules.is_some_and(|r| r.drops(h.name.get(buf))) => continue,
            _ => {}
        }
        push_header(out, buf, h);
    }
    if let Some(r) = rules {
        r.write_h1(out);
    }
    for cookie in set_cookies.iter().flatten() {
        out.extend_from_slice(b"Set-Cookie: ");
        cookie.write_value(out);
        out.extend_from_slice(b"\r\n");
    }
    if conn.close {
        out.extend_from_slice(b"Connection: close\r\n");
    } else if conn.http10_keep_alive {
        out.extend_from_slice(b"Connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

pub fn reason(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        408 => "Request Timeout",
        417 => "Expectation Failed",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        508 => "Loop Detected",
        301 => "Moved Permanently",
        302 => "Found",
        303 => "See Other",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        _ => "Error",
    }
}

pub fn explanation(status: u16) -> &'static str {
    match status {
        400 => "malformed or ambiguous request",
        408 => "request head not received in time",
        417 => "only Expect: 100-continue is supported",
        429 => "rate limit exceeded",
        431 => "request head too large",
        502 => "no backend could answer",
        503 => "no backend available",
        504 => "backend did not answer in time",
        508 => "request loop detected",
        300..=399 => "redirected",
        _ => "error",
    }
}

/// A redirect route's `Location`: the configured scheme, host and path, the request's for
/// what is not configured (its query too, when the path is the request's). A changed scheme or
/// host drops the request's port, as nginx's `$host` does.
pub fn redirect_location(
    out: &mut Vec<u8>,
    r: &RedirectConfig,
    view: &impl RequestView,
    https: bool,
) {
    let scheme = r
        .scheme
        .as_deref()
        .unwrap_or(if https { "https" } else { "http" });
    out.extend_from_slice(scheme.as_bytes());
    out.extend_from_slice(b"://");
    match &r.host {
        Some(host) => out.extend_from_slice(host.as_bytes()),
        None => {
            let host = view.host().unwrap_or_default();
            let keep_port = r.scheme.is_none();
            let host = match host.iter().rposition(|&b| b == b':') {
                // `[v6]` ends with `]`: only a colon after the last `]` starts a port.
                Some(i) if !keep_port && !host[i..].contains(&b']') => &host[..i],
                _ => host,
            };
            out.extend_from_slice(host);
        }
    }
    match &r.path {
        Some(path) => out.extend_from_slice(path.as_bytes()),
        None => {
            out.extend_from_slice(view.path());
            if let Some(q) = view.query() {
                out.push(b'?');
                out.extend_from_slice(q);
            }
        }
    }
}

/// The optional fields of an answer fastlb gives itself.
#[derive(Default, Clone, Copy)]
pub struct AnswerFields<'a> {
    /// Seconds; 0: none.
    pub retry_after: u64,
    /// A redirect's target; empty: none.
    pub location: &'a [u8],
}

/// An answer fastlb gives itself (never a backend's).
pub fn error_response(
    out: &mut Vec<u8>,
    status: u16,
    conn: ClientConnection,
    fields: AnswerFields<'_>,
) {
    let retry_after = fields.retry_after;
    let text = explanation(status);
    let _ = write!(
        out,
        "HTTP/1.1 {status} {}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nCache-Control: no-store\r\n",
        reason(status),
        text.len() + 1
    );
    if retry_after > 0 {
        let _ = write!(out, "Retry-After: {retry_after}\r\n");
    }
    if !fields.location.is_empty() {
        out.extend_from_slice(b"Location: ");
        out.extend_from_slice(fields.location);
        out.extend_from_slice(b"\r\n");
    }
    if conn.close {
        out.extend_from_slice(b"Connection: close\r\n");
    } else if conn.http10_keep_alive {
        out.extend_from_slice(b"Connection: keep-alive\r\n");
    }
    let _ = write!(out, "\r\n{text}\n");
}

#[cfg(test)]
mod tests {
    use super::super::parse::{parse_request, Limits};
    use super::*;

    fn rewritten(req: &[u8]) -> Vec<u8> {
        let limits = Limits {
            max_header_bytes: 8192,
            max_headers: 64,
        };
        let mut hs = Vec::new();
        let head = parse_request(req, &limits, &mut hs).unwrap().unwrap();
        let mut out = Vec::new();
        let peer: SocketAddr = "192.0.2.1:5000".parse().unwrap();
        let origin = Origin {
            peer,
            via_token: "fastlb-t",
            tls: None,
        };
        request_head(&mut out, req, &head, &hs, origin, false, None);
        out
    }

    #[test]
    fn request_line_after_a_leading_empty_line() {
        // The empty line tolerated before a request (RFC 9112 2.2) is not forwarded: the
        // backend gets the request line first, exactly as without it.
        let plain = b"GET /x?y HTTP/1.1\r\nHost: a\r\nX-Request-Id: r1\r\n\r\n";
        let mut leading = b"\r\n".to_vec();
        leading.extend_from_slice(plain);
        let out = rewritten(&leading);
        assert!(
            out.starts_with(b"GET /x?y HTTP/1.1\r\nHost: a\r\n"),
            "{out:?}"
        );
        assert_eq!(out, rewritten(plain));
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET /x?y HTTP/1.1\r\nHost: a\r\nX-Request-Id: r1\r\nX-Forwarded-For: 192.0.2.1\r\n\
             X-Forwarded-Proto: http\r\nForwarded: for=192.0.2.1;proto=http\r\n\
             Via: 1.1 fastlb-t\r\n\r\n"
        );
    }

    #[test]
    fn ips_and_hex_are_written_like_fmt() {
        for ip in [
            "0.0.0.0",
            "1.2.3.4",
            "10.100.255.9",
            "255.255.255.255",
            "::1",
            "fe80::1:2",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            let mut out = Vec::new();
            push_ip(&mut out, ip);
            assert_eq!(out, ip.to_string().as_bytes());
        }
        let mut out = Vec::new();
        push_hex(&mut out, 0x0123_4567_89ab_cdef);
        assert_eq!(out, b"0123456789abcdef");
    }
}
