//! The one interface between a client session and an upstream of another protocol: the
//! request's head as `http` parts, its body as a `RequestBody`, and the response delivered to
//! a `ResponseSink`. An HTTP/2 session and the HTTP/1 session (for an HTTP/2 pool) implement
//! the two traits; the HTTP/1 upstream (`h1::translate`) and the HTTP/2 upstream
//! (`h2::client`) consume them. (HTTP/1 to an HTTP/1 pool keeps its byte-level path in `h1`,
//! with splice: nothing there needs translating.)

use crate::balance::Pool;
use crate::config::ProxyVersion;
use crate::proxy::header_rules::HeaderRules;
use crate::proxy::Attempt;
use crate::tls::SessionInfo;
use bytes::Bytes;
use h2::Reason;
use http::{request, response, HeaderMap};
use rustls::pki_types::ServerName;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{BorrowedFd, RawFd};
use std::time::Instant;

/// The request body as the client sends it.
pub(crate) trait RequestBody {
    /// The next piece; None once the body ended. Err: the client went away or reset.
    async fn data(&mut self) -> Result<Option<Bytes>, ()>;
    /// Trailers after the body, if the client sent any.
    async fn trailers(&mut self) -> Result<Option<HeaderMap>, ()>;
    /// Whether the request has no body at all.
    fn is_empty(&self) -> bool;
    /// The body's declared length, if known.
    fn length(&self) -> Option<u64>;
    /// The whole body is still at hand (read in full before the first try), so another
    /// backend can be sent it.
    fn replayable(&self) -> bool;
    /// The next `data` starts again from the first byte (only when `replayable`).
    fn rewind(&mut self);
}

/// Where the response goes: to the client, in its protocol.
pub(crate) trait ResponseSink {
    /// The response head; `end`: there is no body.
    async fn head(&mut self, head: response::Parts, end: bool) -> Result<(), ()>;
    async fn data(&mut self, data: Bytes, end: bool) -> Result<(), ()>;
    /// Ends the response with trailers.
    async fn trailers(&mut self, trailers: HeaderMap) -> Result<(), ()>;
    /// Resolves when the client cancelled the request (an h2 RST_STREAM); never resolves for
    /// a client that cannot cancel one request alone.
    async fn cancelled(&mut self);
    /// Cuts the response short (the backend reset its stream).
    fn reset(&mut self, reason: Reason);
    /// Whether a response head went out already.
    fn started(&self) -> bool;
}

/// One try's request as the upstream sees it.
pub(crate) struct UpstreamRequest<'a> {
    /// The listener the request came in on (its metrics).
    pub listener: u16,
    pub pool: &'a Pool,
    pub backend: usize,
    pub parts: &'a request::Parts,
    /// TLS pools: the name sent and verified, and the tag that keeps connections apart by it.
    pub sni: Option<&'a ServerName<'static>>,
    pub sni_tag: u64,
    /// A gRPC call's deadline (`grpc-timeout`), which caps the wait for the backend.
    pub deadline: Option<Instant>,
    /// The client's `timeouts.client_idle`: how long a client may leave a response unread.
    pub client_idle_ms: u64,
    /// Skip idle connections (one was found closed).
    pub fresh: bool,
    /// The cookies fastlb adds to the response.
    pub set_cookies: SetCookies<'a>,
    /// `send_proxy` pools: who the PROXY header on a new connection names.
    pub proxy: Option<ProxyFacts<'a>>,
    /// The matched route's `response_headers`.
    pub response_rules: Option<&'a HeaderRules>,
}

/// What a PROXY header to an http pool's backend says (`send_proxy`): the request's client,
/// the address it reached, the TLS session fastlb terminated. A keep-alive connection to the
/// backend began with one such header, so it is reused only for requests that would send the
/// same one (HAProxy marks such connections private for the same reason).
#[derive(Clone, Copy)]
pub struct ProxyFacts<'a> {
    pub client: SocketAddr,
    pub local: SocketAddr,
    pub tls: Option<&'a SessionInfo>,
}

impl<'a> ProxyFacts<'a> {
    /// For a request of client connection `fd`: its local address is read here (a
    /// getsockname per request, paid by send_proxy pools only).
    pub fn of(fd: RawFd, client: SocketAddr, tls: Option<&'a SessionInfo>) -> Self {
        // SAFETY: `fd` is the caller's open client socket, borrowed for this call only.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        let local = socket2::SockRef::from(&fd)
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket());
        ProxyFacts {
            client,
            local: local.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0))),
            tls,
        }
    }

    /// Folded into the idle-connection key: connections made for another header stay apart.
    pub fn tag(&self) -> u64 {
        let mut bytes = [0u8; 36];
        for (i, addr) in [self.client, self.local].into_iter().enumerate() {
            let ip = match addr.ip() {
                IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
                IpAddr::V6(a) => a.octets(),
            };
            bytes[i * 18..i * 18 + 16].copy_from_slice(&ip);
            bytes[i * 18 + 16..i * 18 + 18].copy_from_slice(&addr.port().to_be_bytes());
        }
        crate::balance::hash_key(&bytes) | 1
    }

    pub fn header(&self, version: ProxyVersion) -> Vec<u8> {
        let tlvs = self.tls.map(SessionInfo::proxy_tlvs);
        crate::net::proxy_header::encode(version, self.client, self.local, tlvs.as_ref())
    }
}

/// A cookie fastlb sets on a response: a backend affinity cookie, or a split's group cookie.
#[derive(Clone, Copy)]
pub struct SetCookie<'a> {
    pub name: &'a str,
    pub value: &'a [u8; 16],
    /// Max-Age, rounded up to whole seconds; 0: a session cookie.
    pub ttl_ms: u64,
}

/// What fastlb adds to a response: [the pool's affinity cookie, the split's group cookie].
pub type SetCookies<'a> = [Option<SetCookie<'a>>; 2];

impl SetCookie<'_> {
    /// The field value: `name=value; Path=/; HttpOnly[; Max-Age=N]`.
    pub fn write_value(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.name.as_bytes());
        out.push(b'=');
        out.extend_from_slice(self.value);
        out.extend_from_slice(b"; Path=/; HttpOnly");
        if self.ttl_ms > 0 {
            let _ = std::io::Write::write_fmt(
                out,
                format_args!("; Max-Age={}", self.ttl_ms.div_ceil(1000)),
            );
        }
    }

    pub fn header_value(&self) -> Option<http::HeaderValue> {
        let mut v = Vec::with_capacity(64);
        self.write_value(&mut v);
        http::HeaderValue::from_bytes(&v).ok()
    }
}

/// Adds `cookies` to a response's fields.
/// The fields fastlb changes on a backend's response head: the route's `response_headers`,
/// then its own cookies.
pub(crate) fn response_fields(headers: &mut http::HeaderMap, req: &UpstreamRequest<'_>) {
    if let Some(rules) = req.response_rules {
        rules.apply(headers);
    }
    add_set_cookies(headers, &req.set_cookies);
}

pub fn add_set_cookies(headers: &mut http::HeaderMap, cookies: &SetCookies<'_>) {
    for cookie in cookies.iter().flatten() {
        if let Some(v) = cookie.header_value() {
            headers.append(http::header::SET_COOKIE, v);
        }
    }
}

/// Connects to the request's backend within `timer`: TCP, then TLS when the pool has it (the
/// name: the request's `sni`, else the backend's host).
pub(crate) async fn connect_backend(
    req: &UpstreamRequest<'_>,
    mut timer: std::pin::Pin<&mut tokio::time::Sleep>,
) -> std::io::Result<crate::net::Conn> {
    let pool = req.pool;
    let tcp = crate::net::connect(pool.settings[req.backend].addr, timer.as_mut()).await;
    let tcp = match (tcp, pool.send_proxy.zip(req.proxy)) {
        // Boxed: only send_proxy pools pay for it.
        (Ok(tcp), Some((v, facts))) => {
            Box::pin(crate::net::write_first(tcp, &facts.header(v))).await
        }
        (tcp, _) => tcp,
    };
    match (tcp, &pool.tls) {
        (Ok(tcp), Some(tls)) => {
            let address = &pool.backends[req.backend].address;
            let name = req
                .sni
                .cloned()
                .or_else(|| crate::net::server_name(address));
            match name {
                // Boxed: only TLS pools pay for the handshake's future.
                Some(name) => Box::pin(crate::net::tls_handshake(tls, name, tcp, timer)).await,
                None => Err(std::io::ErrorKind::InvalidInput.into()),
            }
        }
        (tcp, _) => tcp.map(crate::net::Conn::Plain),
    }
}

/// Counts a failed connect against the backend: nothing was sent, so any request may go on to
/// the next backend.
pub(crate) fn connect_failed(
    backend: &crate::balance::BackendState,
    e: &std::io::Error,
) -> Attempt {
    if e.kind() == std::io::ErrorKind::TimedOut {
        backend.fail_timeout();
    } else {
        backend.fail_connect();
    }
    Attempt::Failed {
        status: 502,
        retryable: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_cookie_values() {
        let value = *b"0123456789abcdef";
        let mut out = Vec::new();
        let c = SetCookie {
            name: "ab",
            value: &value,
            ttl_ms: 1_500,
        };
        c.write_value(&mut out);
        assert_eq!(out, b"ab=0123456789abcdef; Path=/; HttpOnly; Max-Age=2");
        let session = SetCookie { ttl_ms: 0, ..c };
        assert_eq!(
            session.header_value().unwrap(),
            "ab=0123456789abcdef; Path=/; HttpOnly"
        );
        let mut headers = http::HeaderMap::new();
        add_set_cookies(&mut headers, &[Some(c), Some(session)]);
        assert_eq!(headers.get_all(http::header::SET_COOKIE).iter().count(), 2);
    }
}
