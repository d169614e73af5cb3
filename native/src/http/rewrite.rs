//! What fastlb changes in a message head on its way through, and the answers it writes itself.
//!
//! Requests: hop-by-hop fields go (RFC 9110 7.6.1: Connection and the fields it names,
//! Keep-Alive, Proxy-Connection, TE, Trailer, Upgrade unless tunnelling); X-Forwarded-For is
//! appended to (one field), X-Forwarded-Proto is set, Forwarded and Via get our element,
//! X-Request-Id is kept or generated. Everything else is copied byte for byte.

use super::parse::{named_in_connection, HeaderKind, HeaderSpan, RequestHead, Span, Version};
use super::route::{find_cookie, RequestView};
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

/// The request line through the end of its CRLF.
fn first_line(buf: &[u8]) -> &[u8] {
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

/// Writes the head fastlb sends the backend for `head` (read from `buf`) into `out`.
pub fn request_head(
    out: &mut Vec<u8>,
    buf: &[u8],
    head: &RequestHead,
    headers: &[HeaderSpan],
    peer: SocketAddr,
    via_token: &str,
    upgrade: bool,
) {
    out.extend_from_slice(first_line(buf));
    let has_connection = headers.iter().any(|h| h.kind == HeaderKind::Connection);
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
            | HeaderKind::XForwardedProto => continue,
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
            _ => {}
        }
        push_header(out, buf, h);
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
    let _ = write!(out, "{ip}\r\nX-Forwarded-Proto: http\r\n");
    match ip {
        IpAddr::V4(_) => {
            let _ = write!(out, "Forwarded: for={ip};proto=http\r\n");
        }
        IpAddr::V6(_) => {
            let _ = write!(out, "Forwarded: for=\"[{ip}]\";proto=http\r\n");
        }
    }
    if !has_request_id {
        let _ = write!(
            out,
            "X-Request-Id: {:016x}{:016x}\r\n",
            fastrand::u64(..),
            fastrand::u64(..)
        );
    }
    let _ = write!(out, "Via: 1.1 {via_token}\r\n");
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
    set_cookie: Option<(&str, &[u8; 16], u64)>,
) {
    out.extend_from_slice(first_line(buf));
    let has_connection = headers.iter().any(|h| h.kind == HeaderKind::Connection);
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
            _ => {}
        }
        push_header(out, buf, h);
    }
    if let Some((name, token, ttl_ms)) = set_cookie {
        out.extend_from_slice(b"Set-Cookie: ");
        out.extend_from_slice(name.as_bytes());
        out.push(b'=');
        out.extend_from_slice(token);
        out.extend_from_slice(b"; Path=/; HttpOnly");
        if ttl_ms > 0 {
            let _ = write!(out, "; Max-Age={}", ttl_ms.div_ceil(1000));
        }
        out.extend_from_slice(b"\r\n");
    }
    if conn.close {
        out.extend_from_slice(b"Connection: close\r\n");
    } else if conn.http10_keep_alive {
        out.extend_from_slice(b"Connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

fn reason(status: u16) -> &'static str {
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
        _ => "Error",
    }
}

fn explanation(status: u16) -> &'static str {
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
        _ => "error",
    }
}

/// An answer fastlb gives itself (never a backend's).
pub fn error_response(out: &mut Vec<u8>, status: u16, conn: ClientConnection, retry_after: u64) {
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
    if conn.close {
        out.extend_from_slice(b"Connection: close\r\n");
    } else if conn.http10_keep_alive {
        out.extend_from_slice(b"Connection: keep-alive\r\n");
    }
    let _ = write!(out, "\r\n{text}\n");
}
