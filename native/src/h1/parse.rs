//! Strict HTTP/1.x head parsing on top of `httparse`.
//!
//! A proxy that reads a message differently from the server behind it can be used to smuggle
//! requests, so anything ambiguous (duplicate or listed framing headers, bare LF line ends, odd
//! transfer codings) is an error here rather than something to guess about.
//!
//! Nothing here allocates in steady state: header positions go into a `Vec` the caller reuses,
//! and `httparse` gets a stack array.

use std::mem::MaybeUninit;

/// Byte range into the buffer a head was parsed from (u32: keeps per-request state small).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Span {
    pub start: u32,
    pub end: u32,
}

impl Span {
    #[inline]
    pub fn get<'a>(&self, buf: &'a [u8]) -> &'a [u8] {
        &buf[self.start as usize..self.end as usize]
    }

    #[inline]
    pub fn len(&self) -> usize {
        (self.end - self.start) as usize
    }

    #[inline]
    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderKind {
    Host,
    ContentLength,
    TransferEncoding,
    Connection,
    KeepAlive,
    ProxyConnection,
    Te,
    Trailer,
    Upgrade,
    Expect,
    XForwardedFor,
    XForwardedProto,
    Forwarded,
    XRequestId,
    Via,
    Cookie,
    SetCookie,
    /// `X-Client-Cert-Subject` / `-Fingerprint`: only fastlb may set them (from an https
    /// client's certificate), so a client's own copies are always removed.
    XClientCert,
    Other,
}

impl HeaderKind {
    /// Classifies a field name, case-insensitively. Matching on the length first means most
    /// names are settled by one comparison or none.
    pub fn of(name: &[u8]) -> HeaderKind {
        let is = |s: &[u8]| name.eq_ignore_ascii_case(s);
        match name.len() {
            2 if is(b"te") => HeaderKind::Te,
            3 if is(b"via") => HeaderKind::Via,
            4 if is(b"host") => HeaderKind::Host,
            6 if is(b"cookie") => HeaderKind::Cookie,
            6 if is(b"expect") => HeaderKind::Expect,
            7 if is(b"upgrade") => HeaderKind::Upgrade,
            7 if is(b"trailer") => HeaderKind::Trailer,
            9 if is(b"forwarded") => HeaderKind::Forwarded,
            10 if is(b"connection") => HeaderKind::Connection,
            10 if is(b"keep-alive") => HeaderKind::KeepAlive,
            10 if is(b"set-cookie") => HeaderKind::SetCookie,
            12 if is(b"x-request-id") => HeaderKind::XRequestId,
            14 if is(b"content-length") => HeaderKind::ContentLength,
            15 if is(b"x-forwarded-for") => HeaderKind::XForwardedFor,
            16 if is(b"proxy-connection") => HeaderKind::ProxyConnection,
            17 if is(b"transfer-encoding") => HeaderKind::TransferEncoding,
            17 if is(b"x-forwarded-proto") => HeaderKind::XForwardedProto,
            21 if is(b"x-client-cert-subject") => HeaderKind::XClientCert,
            25 if is(b"x-client-cert-fingerprint") => HeaderKind::XClientCert,
            _ => HeaderKind::Other,
        }
    }
}

/// One header field; `kind` is the classified name (case-insensitive), so callers never compare
/// names again.
#[derive(Clone, Copy, Debug)]
pub struct HeaderSpan {
    pub name: Span,
    pub value: Span,
    pub kind: HeaderKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    Post,
    Put,
    Delete,
    Options,
    Patch,
    Trace,
    Connect,
    Other,
}

impl Method {
    /// RFC 9110 idempotent: GET HEAD OPTIONS PUT DELETE TRACE
    pub fn is_idempotent(self) -> bool {
        matches!(
            self,
            Method::Get
                | Method::Head
                | Method::Options
                | Method::Put
                | Method::Delete
                | Method::Trace
        )
    }

    /// Methods are case-sensitive (RFC 9110 9.1), so "get" is `Other`.
    fn of(m: &[u8]) -> Method {
        match m {
            b"GET" => Method::Get,
            b"HEAD" => Method::Head,
            b"POST" => Method::Post,
            b"PUT" => Method::Put,
            b"DELETE" => Method::Delete,
            b"OPTIONS" => Method::Options,
            b"PATCH" => Method::Patch,
            b"TRACE" => Method::Trace,
            b"CONNECT" => Method::Connect,
            _ => Method::Other,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    Http10,
    Http11,
}

/// How a message body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyKind {
    None,
    Length(u64),
    Chunked,
    /// responses only
    UntilClose,
}

#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_header_bytes: usize,
    pub max_headers: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeadError {
    /// head larger than max_header_bytes or more than max_headers fields: 431
    TooLarge,
    /// an Expect other than 100-continue: 417
    Expectation,
    /// anything malformed or ambiguous: 400 (the reason is for logs/tests)
    Bad(&'static str),
}

impl HeadError {
    pub fn status(self) -> u16 {
        match self {
            HeadError::TooLarge => 431,
            HeadError::Expectation => 417,
            HeadError::Bad(_) => 400,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestHead {
    /// Bytes of the head including the blank line (and the empty line tolerated before the
    /// request line, if there was one).
    pub len: usize,
    /// Where the request line starts: 0, or 2 after the one empty line tolerated before it
    /// (RFC 9112 2.2). See `line()`; a u32 fits in the padding, a whole Span would not.
    pub line_start: u32,
    pub method: Method,
    /// Request-target as sent.
    pub target: Span,
    /// Origin-form: target up to '?'. Absolute-form: the "/p" part, empty when the URI has no
    /// path (callers treat it as "/"). Asterisk-form: "*".
    pub path: Span,
    /// Bytes after the first '?', if any.
    pub query: Option<Span>,
    pub version: Version,
    /// Absolute-form authority if the target is absolute-form, else the Host header value
    /// (port not stripped).
    pub host: Option<Span>,
    /// None, Length(n) (n may be 0) or Chunked; never UntilClose.
    pub body: BodyKind,
    /// "close" token in any Connection header.
    pub conn_close: bool,
    /// "keep-alive" token in any Connection header.
    pub conn_keep_alive: bool,
    /// "upgrade" token in any Connection header.
    pub conn_upgrade: bool,
    /// Upgrade header value.
    pub upgrade: Option<Span>,
    /// Expect: 100-continue on an HTTP/1.1 request (RFC 9110 10.1.1: ignored on 1.0).
    pub expect_continue: bool,
}

impl RequestHead {
    /// The request line through its CRLF. Whatever copies or reads the request line takes it
    /// from here, never from the start of the buffer. httparse takes exactly one SP between
    /// the parts, then "HTTP/1.x" and CRLF (a bare LF is refused), so the line ends 11 bytes
    /// after the target.
    #[inline]
    pub fn line(&self) -> Span {
        Span {
            start: self.line_start,
            end: self.target.end + 11,
        }
    }

    /// HTTP/1.1 unless "close"; HTTP/1.0 only with "keep-alive"
    pub fn keep_alive(&self) -> bool {
        match self.version {
            Version::Http11 => !self.conn_close,
            Version::Http10 => self.conn_keep_alive && !self.conn_close,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResponseHead {
    pub len: usize,
    pub version: Version,
    pub status: u16,
    /// RFC 9112 6.3: request HEAD, 1xx, 204, 304 -> None; Transfer-Encoding ending in chunked
    /// -> Chunked; other Transfer-Encoding -> UntilClose; Content-Length -> Length(n);
    /// otherwise UntilClose.
    pub body: BodyKind,
    pub conn_close: bool,
    pub conn_keep_alive: bool,
    pub conn_upgrade: bool,
    pub upgrade: Option<Span>,
}

/// Header slots kept on the stack, covering the usual limits (100 request fields by default,
/// 256 for backend responses): 8 KiB of stack, never initialised.
const SMALL_HEADERS: usize = 256;
/// Larger stack array for configs up to this many fields (32 KiB); beyond it the slots come
/// from the heap.
const LARGE_HEADERS: usize = 1024;

type RawHeader<'b> = MaybeUninit<httparse::Header<'b>>;

/// What httparse reported, before our own checks.
enum Raw<'b> {
    Partial,
    Request {
        len: usize,
        method: &'b str,
        target: &'b str,
        minor: u8,
    },
    Response {
        len: usize,
        minor: u8,
        code: u16,
    },
}

/// Runs `f` with `max_headers` uninitialised header slots, on the stack unless the limit is
/// unusually high.
#[inline(always)]
fn with_slots<'b, R>(max_headers: usize, f: impl FnOnce(&mut [RawHeader<'b>]) -> R) -> R {
    if max_headers <= SMALL_HEADERS {
        let mut slots = [const { MaybeUninit::uninit() }; SMALL_HEADERS];
        f(&mut slots[..max_headers])
    } else {
        with_many_slots(max_headers, f)
    }
}

/// Kept out of line so the big array does not enlarge (and stack-probe) the common frame.
#[inline(never)]
fn with_many_slots<'b, R>(max_headers: usize, f: impl FnOnce(&mut [RawHeader<'b>]) -> R) -> R {
    if max_headers <= LARGE_HEADERS {
        let mut slots = [const { MaybeUninit::uninit() }; LARGE_HEADERS];
        f(&mut slots[..max_headers])
    } else {
        let mut slots: Vec<httparse::Header<'b>> = Vec::with_capacity(max_headers);
        f(&mut slots.spare_capacity_mut()[..max_headers])
    }
}

/// Clips `buf` to the size limit (parsing further is wasted work) and rejects empty lines
/// before the start line: one CRLF is tolerated before a request (RFC 9112 2.2), none before a
/// response, and a bare LF never. Returns the view, whether it was clipped and where the start
/// line begins (0, or 2 after a tolerated CRLF).
fn prepare<'b>(
    buf: &'b [u8],
    limits: &Limits,
    allow_crlf: bool,
) -> Result<(&'b [u8], bool, usize), HeadError> {
    // Spans are u32, so never look past 4 GiB whatever the config says.
    let max = limits.max_header_bytes.min(u32::MAX as usize);
    let (view, clipped) = if buf.len() > max {
        (&buf[..max], true)
    } else {
        (buf, false)
    };
    match view {
        [b'\n', ..] => Err(HeadError::Bad("bare LF line end")),
        [b'\r', b'\n', rest @ ..] => {
            if !allow_crlf {
                Err(HeadError::Bad("empty line before status line"))
            } else if matches!(rest.first(), Some(b'\r' | b'\n')) {
                Err(HeadError::Bad(
                    "more than one empty line before request line",
                ))
            } else {
                Ok((view, clipped, 2))
            }
        }
        _ => Ok((view, clipped, 0)),
    }
}

fn httparse_reason(e: httparse::Error) -> HeadError {
    HeadError::Bad(match e {
        httparse::Error::TooManyHeaders => return HeadError::TooLarge,
        httparse::Error::HeaderName => "invalid header name",
        httparse::Error::HeaderValue => "invalid header value",
        httparse::Error::NewLine => "invalid line end",
        httparse::Error::Status => "invalid status line",
        httparse::Error::Token => "invalid request line",
        httparse::Error::Version => "invalid HTTP version",
    })
}

/// httparse takes a lone LF as a line end. A backend that does not would see different header
/// boundaries, so it is refused. Written as a branchless OR over (previous, current) byte pairs
/// so that it vectorises: a search or a per-line check costs more on a typical head.
fn check_line_ends(head: &[u8]) -> Result<(), HeadError> {
    let Some((&first, rest)) = head.split_first() else {
        return Ok(());
    };
    let mut bare = u8::from(first == b'\n');
    // Zipping two plain slices (not `skip`) is what lets LLVM vectorise this.
    for (&prev, &b) in head[..rest.len()].iter().zip(rest) {
        bare |= u8::from(b == b'\n') & u8::from(prev != b'\r');
    }
    if bare == 0 {
        Ok(())
    } else {
        Err(HeadError::Bad("bare LF line end"))
    }
}

#[inline]
fn span_of(buf: &[u8], part: &[u8]) -> Span {
    // httparse hands back subslices of `buf` (even empty values point into it).
    let start = part.as_ptr() as usize - buf.as_ptr() as usize;
    debug_assert!(start + part.len() <= buf.len());
    Span {
        start: start as u32,
        end: (start + part.len()) as u32,
    }
}

#[inline]
fn sub(s: Span, from: usize, to: usize) -> Span {
    Span {
        start: s.start + from as u32,
        end: s.start + to as u32,
    }
}

/// Calls `f` for each non-empty element of a comma-separated list, OWS trimmed.
#[inline]
fn for_each_token(value: &[u8], mut f: impl FnMut(&[u8])) {
    for t in value.split(|&b| b == b',') {
        let t = t.trim_ascii_start();
        let t = match t.iter().rposition(|&b| b != b' ' && b != b'\t') {
            Some(i) => &t[..=i],
            None => continue,
        };
        f(t)
    }
}

#[derive(Default)]
struct ConnFlags {
    close: bool,
    keep_alive: bool,
    upgrade: bool,
}

impl ConnFlags {
    fn add(&mut self, value: &[u8]) {
        for_each_token(value, |t| {
            if t.eq_ignore_ascii_case(b"close") {
                self.close = true;
            } else if t.eq_ignore_ascii_case(b"keep-alive") {
                self.keep_alive = true;
            } else if t.eq_ignore_ascii_case(b"upgrade") {
                self.upgrade = true;
            }
        });
    }
}

/// Content-Length = 1*DIGIT, nothing else: no sign, no list, no inner whitespace (httparse has
/// trimmed the outer OWS), no overflow.
fn content_length(v: &[u8]) -> Result<u64, HeadError> {
    if v.is_empty() {
        return Err(HeadError::Bad("empty Content-Length"));
    }
    let mut n: u64 = 0;
    for &b in v {
        if !b.is_ascii_digit() {
            return Err(HeadError::Bad("invalid Content-Length"));
        }
        n = n
            .checked_mul(10)
            .and_then(|n| n.checked_add(u64::from(b - b'0')))
            .ok_or(HeadError::Bad("Content-Length overflows"))?;
    }
    Ok(n)
}

/// Bytes of an authority, by class: 1 = reg-name (RFC 3986 3.2.2: unreserved / pct-encoded /
/// sub-delims) less ',', which looks like two merged Host fields; 2 = ':'; 0 = anything else.
/// Percent-encodings are not decoded or checked. A table: this runs on every request.
const AUTHORITY: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        if c.is_ascii_alphanumeric()
            || matches!(
                c,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'%'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b';'
                    | b'='
            )
        {
            t[b] = 1;
        }
        b += 1;
    }
    t[b':' as usize] = 2;
    t
};

/// An authority as RFC 3986 3.2 has it, less userinfo (RFC 9110 4.2.4: refused, as is '@'
/// anywhere): `host [ ":" port ]`, host an IP-literal in brackets or a non-empty reg-name
/// (RFC 9110 4.2.1: an http URI's host is never empty), port `*DIGIT`. An unbracketed IPv6
/// address (several colons: not valid in a Host header, but seen, and route matching keeps
/// it whole) is let through only if it parses as one. Anything else could be read
/// differently behind us: "a:b", "a[b]", "[::1]x".
fn valid_authority(a: &[u8]) -> bool {
    let digits = |p: &[u8]| p.iter().all(u8::is_ascii_digit);
    if let Some(rest) = a.strip_prefix(b"[") {
        let Some(end) = rest.iter().position(|&b| b == b']') else {
            return false;
        };
        let literal = &rest[..end];
        return !literal.is_empty()
            && literal.iter().all(|&b| AUTHORITY[b as usize] != 0)
            && match &rest[end + 1..] {
                [] => true,
                [b':', port @ ..] => digits(port),
                _ => false,
            };
    }
    let mut colons = 0usize;
    for &b in a {
        match AUTHORITY[b as usize] {
            0 => return false,
            c => colons += usize::from(c == 2),
        }
    }
    match colons {
        0 => !a.is_empty(),
        1 => match a.iter().position(|&b| b == b':') {
            Some(i) => i > 0 && digits(&a[i + 1..]),
            None => false,
        },
        _ => std::str::from_utf8(a).is_ok_and(|s| s.parse::<std::net::Ipv6Addr>().is_ok()),
    }
}

/// Splits path and query at the first '?'. A fragment or raw non-ASCII byte has no place in a
/// request-target (RFC 9112 3.2) and is refused rather than passed on for interpretation.
fn split_query(buf: &[u8], s: Span) -> Result<(Span, Option<Span>), HeadError> {
    let bytes = s.get(buf);
    let mut q = None;
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'#' || b >= 0x80 {
            return Err(HeadError::Bad("invalid byte in request-target"));
        }
        if b == b'?' && q.is_none() {
            q = Some(i);
        }
    }
    Ok(match q {
        Some(i) => (sub(s, 0, i), Some(sub(s, i + 1, bytes.len()))),
        None => (s, None),
    })
}

/// Request-target forms: returns (path, query, absolute-form authority).
fn parse_target(
    buf: &[u8],
    target: Span,
    method: Method,
) -> Result<(Span, Option<Span>, Option<Span>), HeadError> {
    let t = target.get(buf);
    match t.first() {
        Some(b'/') => {
            let (path, query) = split_query(buf, target)?;
            Ok((path, query, None))
        }
        Some(b'*') if t.len() == 1 => {
            if method != Method::Options {
                return Err(HeadError::Bad("asterisk-form is only for OPTIONS"));
            }
            Ok((target, None, None))
        }
        _ => {
            let scheme = if t.len() >= 7 && t[..7].eq_ignore_ascii_case(b"http://") {
                7
            } else if t.len() >= 8 && t[..8].eq_ignore_ascii_case(b"https://") {
                8
            } else {
                return Err(HeadError::Bad("invalid request-target"));
            };
            let auth_len = t[scheme..]
                .iter()
                .position(|&b| b == b'/' || b == b'?')
                .unwrap_or(t.len() - scheme);
            let authority = sub(target, scheme, scheme + auth_len);
            if !valid_authority(authority.get(buf)) {
                return Err(HeadError::Bad("invalid authority in request-target"));
            }
            let (path, query) = split_query(buf, sub(target, scheme + auth_len, t.len()))?;
            Ok((path, query, Some(authority)))
        }
    }
}

fn copy_headers<'b>(buf: &'b [u8], raw: &[httparse::Header<'b>], out: &mut Vec<HeaderSpan>) {
    // At most one allocation while a fresh Vec grows; none once the caller's Vec has warmed up.
    out.reserve(raw.len());
    for h in raw {
        let name = h.name.as_bytes();
        out.push(HeaderSpan {
            name: span_of(buf, name),
            value: span_of(buf, h.value),
            kind: HeaderKind::of(name),
        });
    }
}

/// Runs httparse over `view` and records the header positions, then applies the checks common
/// to requests and responses.
fn run_httparse<'b>(
    view: &'b [u8],
    clipped: bool,
    max_headers: usize,
    request: bool,
    out: &mut Vec<HeaderSpan>,
) -> Result<Raw<'b>, HeadError> {
    let config = httparse::ParserConfig::default();
    let raw = with_slots(max_headers, |slots| {
        if request {
            let mut req = httparse::Request::new(&mut []);
            match config.parse_request_with_uninit_headers(&mut req, view, slots) {
                Ok(httparse::Status::Complete(len)) => {
                    copy_headers(view, req.headers, out);
                    Ok(Raw::Request {
                        len,
                        // Complete implies all three were parsed.
                        method: req.method.unwrap_or_default(),
                        target: req.path.unwrap_or_default(),
                        minor: req.version.unwrap_or_default(),
                    })
                }
                Ok(httparse::Status::Partial) => Ok(Raw::Partial),
                Err(e) => Err(httparse_reason(e)),
            }
        } else {
            let mut resp = httparse::Response::new(&mut []);
            match config.parse_response_with_uninit_headers(&mut resp, view, slots) {
                Ok(httparse::Status::Complete(len)) => {
                    copy_headers(view, resp.headers, out);
                    Ok(Raw::Response {
                        len,
                        minor: resp.version.unwrap_or_default(),
                        code: resp.code.unwrap_or_default(),
                    })
                }
                Ok(httparse::Status::Partial) => Ok(Raw::Partial),
                Err(e) => Err(httparse_reason(e)),
            }
        }
    })?;
    match raw {
        Raw::Partial if clipped => Err(HeadError::TooLarge),
        Raw::Request { len, .. } | Raw::Response { len, .. } => {
            check_line_ends(&view[..len])?;
            Ok(raw)
        }
        Raw::Partial => Ok(raw),
    }
}

/// Parses a request head at the start of `buf`. Ok(None): incomplete, read more. `headers` is
/// cleared and refilled with every field in order (caller reuses the Vec; it must not
/// reallocate in steady state).
pub fn parse_request(
    buf: &[u8],
    limits: &Limits,
    headers: &mut Vec<HeaderSpan>,
) -> Result<Option<RequestHead>, HeadError> {
    headers.clear();
    let (view, clipped, line_start) = prepare(buf, limits, true)?;
    let (len, method, target, minor) =
        match run_httparse(view, clipped, limits.max_headers, true, headers)? {
            Raw::Request {
                len,
                method,
                target,
                minor,
            } => (len, method, target, minor),
            _ => return Ok(None),
        };
    let version = if minor == 1 {
        Version::Http11
    } else {
        Version::Http10
    };

    let method_bytes = method.as_bytes();
    let method = Method::of(method_bytes);
    if method == Method::Connect {
        return Err(HeadError::Bad("CONNECT not supported"));
    }
    let target = span_of(view, target.as_bytes());
    let (path, query, authority) = parse_target(view, target, method)?;

    let mut host_header: Option<Span> = None;
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut conn = ConnFlags::default();
    let mut upgrade = None;
    let mut expect_continue = false;
    let mut expect_other = false;
    for h in headers.iter() {
        let v = h.value.get(view);
        match h.kind {
            HeaderKind::Host => {
                if host_header.is_some() {
                    return Err(HeadError::Bad("more than one Host"));
                }
                if !valid_authority(v) {
                    return Err(HeadError::Bad("invalid Host"));
                }
                host_header = Some(h.value);
            }
            HeaderKind::ContentLength => {
                // Even an identical repeat is refused: it means something upstream merged or
                // duplicated fields, and not every server would read it the same way.
                if length.is_some() {
                    return Err(HeadError::Bad("more than one Content-Length"));
                }
                length = Some(content_length(v)?);
            }
            HeaderKind::TransferEncoding => {
                // Only a lone "chunked" is accepted: any other coding list is a classic
                // smuggling vector and no backend needs it from a client.
                if chunked {
                    return Err(HeadError::Bad("more than one Transfer-Encoding"));
                }
                if !v.eq_ignore_ascii_case(b"chunked") {
                    return Err(HeadError::Bad("unsupported Transfer-Encoding"));
                }
                chunked = true;
            }
            HeaderKind::Connection => conn.add(v),
            HeaderKind::Upgrade => {
                if upgrade.is_some() {
                    return Err(HeadError::Bad("more than one Upgrade"));
                }
                upgrade = Some(h.value);
            }
            HeaderKind::Expect => {
                if v.eq_ignore_ascii_case(b"100-continue") {
                    expect_continue = true;
                } else {
                    expect_other = true;
                }
            }
            _ => {}
        }
    }

    if chunked && length.is_some() {
        return Err(HeadError::Bad("both Content-Length and Transfer-Encoding"));
    }
    if chunked && version == Version::Http10 {
        // RFC 9112 6.1: framing of a 1.0 message with Transfer-Encoding is faulty.
        return Err(HeadError::Bad("Transfer-Encoding on HTTP/1.0"));
    }
    if version == Version::Http11 && host_header.is_none() {
        return Err(HeadError::Bad("missing Host"));
    }
    let host = match authority {
        Some(a) => {
            // RFC 9112 3.2.2 says to use the authority and ignore Host, but the backend may
            // route by Host: a disagreement is refused rather than resolved.
            if let Some(hh) = host_header {
                if !hh.get(view).eq_ignore_ascii_case(a.get(view)) {
                    return Err(HeadError::Bad("Host does not match request-target"));
                }
            }
            Some(a)
        }
        None => host_header,
    };
    // Malformed beats unmet expectation: 400 is the more useful answer.
    if expect_other {
        return Err(HeadError::Expectation);
    }

    let head = RequestHead {
        len,
        line_start: line_start as u32,
        method,
        target,
        path,
        query,
        version,
        host,
        body: if chunked {
            BodyKind::Chunked
        } else {
            match length {
                Some(n) => BodyKind::Length(n),
                None => BodyKind::None,
            }
        },
        conn_close: conn.close,
        conn_keep_alive: conn.keep_alive,
        conn_upgrade: conn.upgrade,
        upgrade,
        expect_continue: expect_continue && version == Version::Http11,
    };
    debug_assert!({
        let line = head.line().get(view);
        line.starts_with(method_bytes)
            && line.ends_with(b"\r\n")
            && line[line.len() - 11] == b' '
            && line[line.len() - 10..].starts_with(b"HTTP/1.")
    });
    Ok(Some(head))
}

/// Parses a response head (from a backend). `request_method` decides HEAD's no-body rule.
/// Errors (-> the proxy answers 502): both Content-Length and Transfer-Encoding,
/// bad/duplicate-different Content-Length, malformed status line, too large.
pub fn parse_response(
    buf: &[u8],
    request_method: Method,
    limits: &Limits,
    headers: &mut Vec<HeaderSpan>,
) -> Result<Option<ResponseHead>, HeadError> {
    headers.clear();
    let (view, clipped, _) = prepare(buf, limits, false)?;
    let (len, minor, status) =
        match run_httparse(view, clipped, limits.max_headers, false, headers)? {
            Raw::Response { len, minor, code } => (len, minor, code),
            _ => return Ok(None),
        };
    if status < 100 {
        return Err(HeadError::Bad("invalid status code"));
    }
    let version = if minor == 1 {
        Version::Http11
    } else {
        Version::Http10
    };

    let mut length: Option<u64> = None;
    let mut te_seen = false;
    // Whether the last transfer coding seen so far is chunked.
    let mut te_chunked = false;
    let mut te_error = None;
    let mut conn = ConnFlags::default();
    let mut upgrade = None;
    for h in headers.iter() {
        let v = h.value.get(view);
        match h.kind {
            HeaderKind::ContentLength => {
                let n = content_length(v)?;
                // Identical repeats are harmless here (RFC 9110 8.6 lets a recipient accept
                // them); differing ones leave the length undecidable.
                if length.is_some_and(|l| l != n) {
                    return Err(HeadError::Bad("conflicting Content-Length"));
                }
                length = Some(n);
            }
            HeaderKind::TransferEncoding => {
                te_seen = true;
                for_each_token(v, |t| {
                    // chunked is only valid once and last (RFC 9112 6.1).
                    if te_chunked {
                        te_error = Some("chunked is not the final transfer coding");
                    }
                    te_chunked = t.eq_ignore_ascii_case(b"chunked");
                });
                if let Some(e) = te_error {
                    return Err(HeadError::Bad(e));
                }
            }
            HeaderKind::Connection => conn.add(v),
            HeaderKind::Upgrade => {
                if upgrade.is_some() {
                    return Err(HeadError::Bad("more than one Upgrade"));
                }
                upgrade = Some(h.value);
            }
            _ => {}
        }
    }
    if te_seen && length.is_some() {
        return Err(HeadError::Bad("both Content-Length and Transfer-Encoding"));
    }
    if te_seen && version == Version::Http10 {
        return Err(HeadError::Bad("Transfer-Encoding on HTTP/1.0"));
    }

    let body = if request_method == Method::Head || status < 200 || status == 204 || status == 304 {
        BodyKind::None
    } else if te_seen {
        // A coding list without chunked at the end is delimited by close (RFC 9112 6.3).
        if te_chunked {
            BodyKind::Chunked
        } else {
            BodyKind::UntilClose
        }
    } else if let Some(n) = length {
        BodyKind::Length(n)
    } else {
        BodyKind::UntilClose
    };

    Ok(Some(ResponseHead {
        len,
        version,
        status,
        body,
        conn_close: conn.close,
        conn_keep_alive: conn.keep_alive,
        conn_upgrade: conn.upgrade,
        upgrade,
    }))
}

/// Whether header `name` is listed as a token in any Connection header (hop-by-hop by
/// declaration, RFC 9110 7.6.1), case-insensitive. Cheap when there is no Connection header.
pub fn named_in_connection(name: &[u8], headers: &[HeaderSpan], buf: &[u8]) -> bool {
    headers
        .iter()
        .filter(|h| h.kind == HeaderKind::Connection)
        .any(|h| {
            let mut found = false;
            for_each_token(h.value.get(buf), |t| found |= t.eq_ignore_ascii_case(name));
            found
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_header_bytes: 8192,
        max_headers: 64,
    };

    fn req(s: &str) -> Result<Option<RequestHead>, HeadError> {
        req_with(s, &LIMITS)
    }

    fn req_with(s: &str, limits: &Limits) -> Result<Option<RequestHead>, HeadError> {
        let mut hs = Vec::new();
        parse_request(s.as_bytes(), limits, &mut hs)
    }

    fn ok(s: &str) -> RequestHead {
        match req(s) {
            Ok(Some(h)) => h,
            other => panic!("{s:?}: {other:?}"),
        }
    }

    fn bad(s: &str) -> &'static str {
        match req(s) {
            Err(HeadError::Bad(r)) => r,
            other => panic!("{s:?}: expected Bad, got {other:?}"),
        }
    }

    fn resp(s: &str, m: Method) -> Result<Option<ResponseHead>, HeadError> {
        let mut hs = Vec::new();
        parse_response(s.as_bytes(), m, &LIMITS, &mut hs)
    }

    fn resp_ok(s: &str) -> ResponseHead {
        match resp(s, Method::Get) {
            Ok(Some(h)) => h,
            other => panic!("{s:?}: {other:?}"),
        }
    }

    fn resp_bad(s: &str) {
        match resp(s, Method::Get) {
            Err(HeadError::Bad(_)) => {}
            other => panic!("{s:?}: expected Bad, got {other:?}"),
        }
    }

    fn txt(s: &str, sp: Span) -> &str {
        std::str::from_utf8(sp.get(s.as_bytes())).unwrap()
    }

    // ---- basics ----

    #[test]
    fn simple_get() {
        let s = "GET /a/b?x=1&y=2 HTTP/1.1\r\nHost: example.com:8080\r\nUser-Agent: t\r\n\r\nBODY";
        let mut hs = Vec::new();
        let h = parse_request(s.as_bytes(), &LIMITS, &mut hs)
            .unwrap()
            .unwrap();
        assert_eq!(h.len, s.len() - 4);
        assert_eq!(h.method, Method::Get);
        assert_eq!(txt(s, h.target), "/a/b?x=1&y=2");
        assert_eq!(txt(s, h.path), "/a/b");
        assert_eq!(txt(s, h.query.unwrap()), "x=1&y=2");
        assert_eq!(h.version, Version::Http11);
        assert_eq!(txt(s, h.host.unwrap()), "example.com:8080");
        assert_eq!(h.body, BodyKind::None);
        assert!(h.keep_alive());
        assert!(!h.expect_continue);
        assert_eq!(hs.len(), 2);
        assert_eq!(hs[0].kind, HeaderKind::Host);
        assert_eq!(txt(s, hs[1].name), "User-Agent");
        assert_eq!(txt(s, hs[1].value), "t");
        assert_eq!(hs[1].kind, HeaderKind::Other);
    }

    #[test]
    fn incomplete_is_none() {
        assert_eq!(req(""), Ok(None));
        assert_eq!(req("GET / HTTP/1.1\r\nHost: a\r\n"), Ok(None));
        assert_eq!(req("GET / HTTP/1.1\r\nHost: a\r\n\r"), Ok(None));
        assert_eq!(req("\r\n"), Ok(None));
        assert_eq!(resp("HTTP/1.1 200 OK\r\n", Method::Get), Ok(None));
    }

    #[test]
    fn empty_query_and_empty_value() {
        let s = "GET /p? HTTP/1.1\r\nHost: a\r\nX-Empty:\r\nX-Sp:   \r\n\r\n";
        let mut hs = Vec::new();
        let h = parse_request(s.as_bytes(), &LIMITS, &mut hs)
            .unwrap()
            .unwrap();
        assert_eq!(txt(s, h.path), "/p");
        assert_eq!(h.query.unwrap().len(), 0);
        assert!(hs[1].value.is_empty());
        assert!(hs[2].value.is_empty());
    }

    #[test]
    fn first_question_mark_splits() {
        let s = "GET /p?a?b HTTP/1.1\r\nHost: a\r\n\r\n";
        let h = ok(s);
        assert_eq!(txt(s, h.path), "/p");
        assert_eq!(txt(s, h.query.unwrap()), "a?b");
    }

    #[test]
    fn methods_classified() {
        for (m, want) in [
            ("GET", Method::Get),
            ("HEAD", Method::Head),
            ("POST", Method::Post),
            ("PUT", Method::Put),
            ("DELETE", Method::Delete),
            ("OPTIONS", Method::Options),
            ("PATCH", Method::Patch),
            ("TRACE", Method::Trace),
            ("PROPFIND", Method::Other),
            ("get", Method::Other),
        ] {
            let s = format!("{m} / HTTP/1.1\r\nHost: a\r\n\r\n");
            assert_eq!(ok(&s).method, want, "{m}");
        }
        assert!(Method::Get.is_idempotent());
        assert!(Method::Put.is_idempotent());
        assert!(Method::Delete.is_idempotent());
        assert!(Method::Trace.is_idempotent());
        assert!(Method::Options.is_idempotent());
        assert!(Method::Head.is_idempotent());
        assert!(!Method::Post.is_idempotent());
        assert!(!Method::Patch.is_idempotent());
        assert!(!Method::Other.is_idempotent());
    }

    #[test]
    fn header_kinds_case_insensitive() {
        let cases = [
            ("host", HeaderKind::Host),
            ("Content-Length", HeaderKind::ContentLength),
            ("TRANSFER-ENCODING", HeaderKind::TransferEncoding),
            ("Connection", HeaderKind::Connection),
            ("Keep-Alive", HeaderKind::KeepAlive),
            ("Proxy-Connection", HeaderKind::ProxyConnection),
            ("TE", HeaderKind::Te),
            ("Trailer", HeaderKind::Trailer),
            ("upgrade", HeaderKind::Upgrade),
            ("Expect", HeaderKind::Expect),
            ("x-forwarded-for", HeaderKind::XForwardedFor),
            ("X-Forwarded-Proto", HeaderKind::XForwardedProto),
            ("Forwarded", HeaderKind::Forwarded),
            ("X-Request-ID", HeaderKind::XRequestId),
            ("via", HeaderKind::Via),
            ("Cookie", HeaderKind::Cookie),
            ("set-cookie", HeaderKind::SetCookie),
            ("X-Other", HeaderKind::Other),
            ("Hostx", HeaderKind::Other),
            ("T", HeaderKind::Other),
        ];
        for (name, kind) in cases {
            assert_eq!(HeaderKind::of(name.as_bytes()), kind, "{name}");
        }
        let s = "GET / HTTP/1.1\r\nhOsT: a\r\nx-forwarded-for: 1.2.3.4\r\nX-Request-ID: r\r\n\r\n";
        let mut hs = Vec::new();
        parse_request(s.as_bytes(), &LIMITS, &mut hs)
            .unwrap()
            .unwrap();
        let kinds: Vec<_> = hs.iter().map(|h| h.kind).collect();
        assert_eq!(
            kinds,
            [
                HeaderKind::Host,
                HeaderKind::XForwardedFor,
                HeaderKind::XRequestId
            ]
        );
    }

    #[test]
    fn headers_vec_reused_without_realloc() {
        let mut hs = Vec::with_capacity(LIMITS.max_headers);
        let cap = hs.capacity();
        let ptr = hs.as_ptr();
        for _ in 0..3 {
            let s = b"GET / HTTP/1.1\r\nHost: a\r\nA: 1\r\nB: 2\r\n\r\n";
            parse_request(s, &LIMITS, &mut hs).unwrap().unwrap();
            assert_eq!(hs.len(), 3);
        }
        assert_eq!((hs.capacity(), hs.as_ptr()), (cap, ptr));
        // Cleared even when the head is incomplete.
        parse_request(b"GET / HTTP/1.1\r\n", &LIMITS, &mut hs).unwrap();
        assert!(hs.is_empty());
    }

    #[test]
    fn error_statuses() {
        assert_eq!(HeadError::TooLarge.status(), 431);
        assert_eq!(HeadError::Expectation.status(), 417);
        assert_eq!(HeadError::Bad("x").status(), 400);
    }

    // ---- size limits ----

    #[test]
    fn incomplete_over_limit_is_too_large() {
        let limits = Limits {
            max_header_bytes: 32,
            max_headers: 64,
        };
        let s = format!("GET / HTTP/1.1\r\nHost: a\r\nX: {}", "a".repeat(40));
        assert_eq!(req_with(&s, &limits), Err(HeadError::TooLarge));
        // At the limit but incomplete: keep reading.
        assert_eq!(req_with(&s[..32], &limits), Ok(None));
    }

    #[test]
    fn complete_over_limit_is_too_large() {
        let s = "GET / HTTP/1.1\r\nHost: a\r\n\r\n"; // 27 bytes
        let exact = Limits {
            max_header_bytes: s.len(),
            max_headers: 64,
        };
        assert!(req_with(s, &exact).unwrap().is_some());
        let short = Limits {
            max_header_bytes: s.len() - 1,
            max_headers: 64,
        };
        assert_eq!(req_with(s, &short), Err(HeadError::TooLarge));
        // Body bytes after the head do not count.
        let with_body = format!("{s}{}", "x".repeat(100));
        assert!(req_with(&with_body, &exact).unwrap().is_some());
    }

    #[test]
    fn too_many_headers() {
        let limits = Limits {
            max_header_bytes: 8192,
            max_headers: 3,
        };
        let three = "GET / HTTP/1.1\r\nHost: a\r\nA: 1\r\nB: 2\r\n\r\n";
        assert!(req_with(three, &limits).unwrap().is_some());
        let four = "GET / HTTP/1.1\r\nHost: a\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n";
        assert_eq!(req_with(four, &limits), Err(HeadError::TooLarge));
    }

    #[test]
    fn large_header_limits_use_bigger_slots() {
        for max in [200usize, 300, 1000, 1500] {
            let limits = Limits {
                max_header_bytes: 1 << 20,
                max_headers: max,
            };
            let mut s = String::from("GET / HTTP/1.1\r\nHost: a\r\n");
            for i in 1..max {
                s.push_str(&format!("X-{i}: v\r\n"));
            }
            s.push_str("\r\n");
            let mut hs = Vec::new();
            let h = parse_request(s.as_bytes(), &limits, &mut hs);
            assert!(matches!(h, Ok(Some(_))), "{max}: {h:?}");
            assert_eq!(hs.len(), max);
            let over = s.replacen("\r\n\r\n", "\r\nX-last: v\r\n\r\n", 1);
            assert_eq!(
                parse_request(over.as_bytes(), &limits, &mut hs),
                Err(HeadError::TooLarge)
            );
        }
    }

    // ---- request line ----

    #[test]
    fn malformed_request_lines() {
        for s in [
            "G(T / HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET /\r\nHost: a\r\n\r\n",
            "GET / HTTP/2.0\r\nHost: a\r\n\r\n",
            "GET / HTTP/1.2\r\nHost: a\r\n\r\n",
            "GET / http/1.1\r\nHost: a\r\n\r\n",
            "\x16\x03\x01\x02\x00\x01\x00\x01\u{fc}\x03\x03\r\n\r\n",
            "GET /a b HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET  HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET  / HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET / HTTP/1.1 \r\nHost: a\r\n\r\n",
            " GET / HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET / HTTP/1.1\rHost: a\r\n\r\n",
        ] {
            bad(s);
        }
    }

    /// What httparse enforces for us, pinned so that an upgrade (or a config flag) that
    /// loosens it shows up here: method = token, exactly one SP between the parts, a target
    /// without whitespace or control bytes, "HTTP/1.0" or "HTTP/1.1" then CRLF; field names are
    /// tokens right before the colon, values hold no control byte but HTAB.
    #[test]
    fn grammar_enforced_by_httparse() {
        for s in [
            "GE\"T / HTTP/1.1\r\nHost: a\r\n\r\n",
            "GE:T / HTTP/1.1\r\nHost: a\r\n\r\n",
            "G\u{e9}T / HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET\t/ HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET /\tHTTP/1.1\r\nHost: a\r\n\r\n",
            "GET / \tHTTP/1.1\r\nHost: a\r\n\r\n",
            "GET /a\x7f HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET /a\x00 HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET /a\x0b HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET / HTTP/1.10\r\nHost: a\r\n\r\n",
            "GET / HTTP/01.1\r\nHost: a\r\n\r\n",
            "GET / HTTP/1.1\x00\r\nHost: a\r\n\r\n",
            "GET / HTTP/1.1\r\r\nHost: a\r\n\r\n",
            "GET / HTTP/1.\r\nHost: a\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nX\x00: y\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nX\x7f: y\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nX\u{e9}: y\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nX(: y\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nX/Y: y\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nX: a\x0bb\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nX: a\x1bb\r\n\r\n",
        ] {
            bad(s);
        }
        // OWS around a value is not part of it; HTAB and obs-text inside are.
        let s = "GET / HTTP/1.1\r\nHost: a\r\nX:\t a\tb\u{e9} \t\r\n!#$%&'*+-.^_`|~: v\r\n\r\n";
        let mut hs = Vec::new();
        parse_request(s.as_bytes(), &LIMITS, &mut hs)
            .unwrap()
            .unwrap();
        assert_eq!(txt(s, hs[1].value), "a\tb\u{e9}");
        assert_eq!(txt(s, hs[2].name), "!#$%&'*+-.^_`|~");
    }

    #[test]
    fn one_leading_empty_line_tolerated() {
        let s = "\r\nGET /x HTTP/1.1\r\nHost: a\r\n\r\n";
        let h = ok(s);
        assert_eq!(h.len, s.len());
        assert_eq!(txt(s, h.path), "/x");
        // The request line is where it is, not at the start of the buffer.
        assert_eq!(h.line(), Span { start: 2, end: 19 });
        assert_eq!(txt(s, h.line()), "GET /x HTTP/1.1\r\n");
        bad("\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n");
        bad("\nGET / HTTP/1.1\r\nHost: a\r\n\r\n");
        bad("\r\n\nGET / HTTP/1.1\r\nHost: a\r\n\r\n");
    }

    #[test]
    fn request_line_span() {
        for (s, line) in [
            ("GET / HTTP/1.1\r\nHost: a\r\n\r\n", "GET / HTTP/1.1\r\n"),
            ("GET / HTTP/1.0\r\n\r\nbody", "GET / HTTP/1.0\r\n"),
            (
                "\r\nPOST /a?b=c HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n",
                "POST /a?b=c HTTP/1.1\r\n",
            ),
            (
                "OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n",
                "OPTIONS * HTTP/1.1\r\n",
            ),
            (
                "\r\nGET http://a/p HTTP/1.1\r\nHost: a\r\n\r\n",
                "GET http://a/p HTTP/1.1\r\n",
            ),
            (
                "M-SEARCH! /x HTTP/1.1\r\nHost: a\r\n\r\n",
                "M-SEARCH! /x HTTP/1.1\r\n",
            ),
        ] {
            assert_eq!(txt(s, ok(s).line()), line, "{s:?}");
        }
        // `line_start` took padding: the head (held across awaits in the per-connection
        // future) did not grow.
        assert_eq!(std::mem::size_of::<RequestHead>(), 88);
    }

    #[test]
    fn target_forms() {
        let s = "GET http://Example.com:81/p/q?z HTTP/1.1\r\nHost: example.com:81\r\n\r\n";
        let h = ok(s);
        assert_eq!(txt(s, h.host.unwrap()), "Example.com:81");
        assert_eq!(txt(s, h.path), "/p/q");
        assert_eq!(txt(s, h.query.unwrap()), "z");

        let s = "GET https://a.b HTTP/1.1\r\nHost: a.b\r\n\r\n";
        let h = ok(s);
        assert_eq!(txt(s, h.host.unwrap()), "a.b");
        assert!(h.path.is_empty());
        assert_eq!(h.query, None);

        let s = "GET HTTP://a.b?q HTTP/1.1\r\nHost: a.b\r\n\r\n";
        let h = ok(s);
        assert!(h.path.is_empty());
        assert_eq!(txt(s, h.query.unwrap()), "q");

        // HTTP/1.0 may take the host from the target alone.
        let s = "GET http://a.b/ HTTP/1.0\r\n\r\n";
        assert_eq!(txt(s, ok(s).host.unwrap()), "a.b");

        let s = "OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n";
        let h = ok(s);
        assert_eq!(txt(s, h.path), "*");
        assert_eq!(h.method, Method::Options);
    }

    #[test]
    fn bad_targets() {
        bad("GET * HTTP/1.1\r\nHost: a\r\n\r\n");
        bad("GET *x HTTP/1.1\r\nHost: a\r\n\r\n");
        bad("GET a/b HTTP/1.1\r\nHost: a\r\n\r\n");
        bad("GET ftp://a/b HTTP/1.1\r\nHost: a\r\n\r\n");
        bad("GET http:///b HTTP/1.1\r\nHost: a\r\n\r\n");
        bad("GET http:// HTTP/1.1\r\nHost: a\r\n\r\n");
        bad("GET http://u@a/b HTTP/1.1\r\nHost: a\r\n\r\n");
        bad("GET http://a b/ HTTP/1.1\r\nHost: a\r\n\r\n");
        bad("GET http://a\"b/ HTTP/1.1\r\nHost: a\r\n\r\n");
        bad("GET /a#frag HTTP/1.1\r\nHost: a\r\n\r\n");
        bad("GET /caf\u{e9} HTTP/1.1\r\nHost: a\r\n\r\n");
        // Absolute-form and Host must agree.
        bad("GET http://a/ HTTP/1.1\r\nHost: b\r\n\r\n");
        assert_eq!(
            bad("CONNECT a.b:443 HTTP/1.1\r\nHost: a.b:443\r\n\r\n"),
            "CONNECT not supported"
        );
    }

    // ---- Host ----

    #[test]
    fn host_rules() {
        bad("GET / HTTP/1.1\r\n\r\n");
        bad("GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n");
        bad("GET / HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n");
        bad("GET / HTTP/1.1\r\nHost:\r\n\r\n");
        bad("GET / HTTP/1.1\r\nHost:   \r\n\r\n");
        bad("GET / HTTP/1.1\r\nHost: a b\r\n\r\n");
        bad("GET / HTTP/1.1\r\nHost: u@a\r\n\r\n");
        bad("GET / HTTP/1.1\r\nHost: a/b\r\n\r\n");
        bad("GET / HTTP/1.1\r\nHost: a,b\r\n\r\n");
        let h = ok("GET / HTTP/1.0\r\n\r\n");
        assert_eq!(h.host, None);
        assert_eq!(h.version, Version::Http10);
        let s = "GET / HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n";
        assert_eq!(txt(s, ok(s).host.unwrap()), "[::1]:8080");
    }

    #[test]
    fn host_grammar() {
        // host [ ":" port ], host = IP-literal / reg-name, port = *DIGIT.
        for v in [
            "a",
            "a:",
            "a:80",
            "A.example.COM.:8080",
            "xn--bcher-kva.example",
            "a-b_c~d%41!$&'()*+;=",
            "10.0.0.1:80",
            "[::1]",
            "[::1]:",
            "[2001:db8::1]:443",
            "[v1.x]",
            "[fe80::1%25eth0]:80",
            // Unbracketed IPv6: not valid, but seen; kept whole by route matching.
            "::1",
            "2001:db8::1",
        ] {
            let s = format!("GET / HTTP/1.1\r\nHost: {v}\r\n\r\n");
            assert_eq!(txt(&s, ok(&s).host.unwrap()), v, "{v:?}");
        }
        for v in [
            ":80",
            ":",
            "a:b",
            "a:80x",
            "a:-1",
            "a: 80",
            "a.com:80:x",
            "a:80:90",
            "[::1",
            "[]",
            "[]:80",
            "[::1]x",
            "[::1]:a",
            "[::1]:80:1",
            "[::1]]",
            "[[::1]]",
            "a]",
            "a[b]",
            "a]:80",
            "[a,b]",
            "[u@a]",
            "a\"b",
            "a<b",
            "a\\b",
            "a{b}",
            "a|b",
            "a^b",
            "a`b",
            "a#b",
            "a?b",
        ] {
            bad(&format!("GET / HTTP/1.1\r\nHost: {v}\r\n\r\n"));
        }
        // The same grammar for an absolute-form authority.
        let s = "GET http://[::1]:8080/p HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n";
        assert_eq!(txt(s, ok(s).host.unwrap()), "[::1]:8080");
        for t in [
            "http://a:b/",
            "http://:80/",
            "http://[::1/",
            "http://a[b]/",
            "http://a:80:90/",
        ] {
            bad(&format!("GET {t} HTTP/1.1\r\nHost: a\r\n\r\n"));
        }
    }

    // ---- framing ----

    #[test]
    fn content_length_ok() {
        let h = ok("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n");
        assert_eq!(h.body, BodyKind::Length(5));
        let h = ok("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(h.body, BodyKind::Length(0));
        let h = ok("POST / HTTP/1.1\r\nHost: a\r\nContent-Length:   005  \r\n\r\n");
        assert_eq!(h.body, BodyKind::Length(5));
        let h = ok("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 18446744073709551615\r\n\r\n");
        assert_eq!(h.body, BodyKind::Length(u64::MAX));
    }

    #[test]
    fn content_length_bad() {
        for v in [
            "5, 5",
            "5,5",
            "+5",
            "-5",
            "5a",
            "0x5",
            "",
            "5 5",
            "5\t5",
            "18446744073709551616",
            "123456789012345678901234567890",
        ] {
            bad(&format!(
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: {v}\r\n\r\n"
            ));
        }
        bad("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n");
        bad("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\ncontent-length: 6\r\n\r\n");
    }

    #[test]
    fn transfer_encoding_ok() {
        for v in ["chunked", "Chunked", "CHUNKED", "  chunked  "] {
            let h = ok(&format!(
                "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: {v}\r\n\r\n"
            ));
            assert_eq!(h.body, BodyKind::Chunked, "{v:?}");
        }
    }

    #[test]
    fn transfer_encoding_bad() {
        for v in [
            "gzip, chunked",
            "chunked, chunked",
            "chunked,",
            "identity",
            "xchunked",
            "chunkedx",
            "chunked;a=b",
            "",
        ] {
            bad(&format!(
                "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: {v}\r\n\r\n"
            ));
        }
        bad("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n");
        bad("POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n");
    }

    #[test]
    fn content_length_and_transfer_encoding() {
        bad(
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
        );
        bad(
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 0\r\n\r\n",
        );
    }

    // ---- field syntax (what httparse rejects, and what we add) ----

    #[test]
    fn obs_fold_rejected() {
        bad("GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n");
        bad("GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n\tb\r\n\r\n");
        // A fold as the first line would otherwise look like whitespace before a name.
        bad("GET / HTTP/1.1\r\n Host: a\r\n\r\n");
        bad("GET / HTTP/1.1\r\nContent-Length: 5\r\n 6\r\nHost: a\r\n\r\n");
    }

    #[test]
    fn whitespace_before_colon_rejected() {
        bad("GET / HTTP/1.1\r\nHost : a\r\n\r\n");
        bad("GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding\t: chunked\r\n\r\n");
        bad("GET / HTTP/1.1\r\nHost: a\r\nNoColon\r\n\r\n");
        bad("GET / HTTP/1.1\r\nHost: a\r\n: empty-name\r\n\r\n");
    }

    #[test]
    fn control_bytes_in_values_rejected() {
        bad("GET / HTTP/1.1\r\nHost: a\r\nX: a\0b\r\n\r\n");
        bad("GET / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n");
        bad("GET / HTTP/1.1\r\nHost: a\r\nX: a\x7fb\r\n\r\n");
        bad("GET / HTTP/1.1\r\nHost: a\r\nX: a\x01b\r\n\r\n");
        // Bare LF: httparse would end the line here; we refuse.
        assert_eq!(
            bad("GET / HTTP/1.1\r\nHost: a\r\nX: a\nTransfer-Encoding: chunked\r\n\r\n"),
            "bare LF line end"
        );
        bad("GET / HTTP/1.1\nHost: a\r\n\r\n");
        bad("GET / HTTP/1.1\r\nHost: a\r\n\n");
        bad("GET / HTTP/1.1\r\nHost: a\n\r\n");
        // obs-text is allowed in values.
        ok("GET / HTTP/1.1\r\nHost: a\r\nX: caf\u{e9}\r\n\r\n");
    }

    // ---- Connection / Upgrade / Expect ----

    #[test]
    fn connection_tokens() {
        let h = ok("GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
        assert!(h.conn_close && !h.keep_alive());
        let h = ok("GET / HTTP/1.1\r\nHost: a\r\nConnection: Keep-Alive ,\tUPGRADE\r\nconnection: foo, CLOSE\r\n\r\n");
        assert!(h.conn_close && h.conn_keep_alive && h.conn_upgrade);
        let h = ok("GET / HTTP/1.1\r\nHost: a\r\nConnection: closed, xclose\r\n\r\n");
        assert!(!h.conn_close && h.keep_alive());
        let h = ok("GET / HTTP/1.0\r\n\r\n");
        assert!(!h.keep_alive());
        let h = ok("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
        assert!(h.keep_alive());
        let h = ok("GET / HTTP/1.0\r\nConnection: keep-alive, close\r\n\r\n");
        assert!(!h.keep_alive());
    }

    #[test]
    fn upgrade_header() {
        let s = "GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n";
        let h = ok(s);
        assert!(h.conn_upgrade);
        assert_eq!(txt(s, h.upgrade.unwrap()), "websocket");
        bad("GET / HTTP/1.1\r\nHost: a\r\nUpgrade: a\r\nUpgrade: b\r\n\r\n");
    }

    #[test]
    fn expect() {
        let h =
            ok("POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-Continue\r\nContent-Length: 3\r\n\r\n");
        assert!(h.expect_continue);
        // RFC 9110 10.1.1: ignored on HTTP/1.0.
        let h = ok("POST / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n");
        assert!(!h.expect_continue);
        for v in ["100-continue-x", "200-ok", ""] {
            let s = format!("POST / HTTP/1.1\r\nHost: a\r\nExpect: {v}\r\n\r\n");
            assert_eq!(req(&s), Err(HeadError::Expectation), "{v:?}");
        }
        // A malformed head is a 400 even with a bad expectation.
        bad("POST / HTTP/1.1\r\nExpect: foo\r\n\r\n");
    }

    #[test]
    fn named_in_connection_lookup() {
        let s =
            "GET / HTTP/1.1\r\nHost: a\r\nConnection: close, X-Secret\r\nConnection: Foo\r\n\r\n";
        let mut hs = Vec::new();
        parse_request(s.as_bytes(), &LIMITS, &mut hs)
            .unwrap()
            .unwrap();
        let b = s.as_bytes();
        assert!(named_in_connection(b"x-secret", &hs, b));
        assert!(named_in_connection(b"foo", &hs, b));
        assert!(!named_in_connection(b"x-secre", &hs, b));
        assert!(!named_in_connection(b"host", &hs, b));
        assert!(!named_in_connection(b"x", &[], b));
    }

    // ---- responses ----

    #[test]
    fn response_basic() {
        let s = "HTTP/1.1 200 OK\r\nContent-Length: 12\r\nConnection: keep-alive\r\n\r\nhello";
        let mut hs = Vec::new();
        let h = parse_response(s.as_bytes(), Method::Get, &LIMITS, &mut hs)
            .unwrap()
            .unwrap();
        assert_eq!(h.len, s.len() - 5);
        assert_eq!(h.status, 200);
        assert_eq!(h.version, Version::Http11);
        assert_eq!(h.body, BodyKind::Length(12));
        assert!(h.conn_keep_alive && !h.conn_close);
        assert_eq!(hs.len(), 2);
        assert_eq!(hs[0].kind, HeaderKind::ContentLength);

        let h = resp_ok("HTTP/1.0 404\r\n\r\n");
        assert_eq!((h.status, h.version), (404, Version::Http10));
        assert_eq!(h.body, BodyKind::UntilClose);
        let h = resp_ok("HTTP/1.1 599 Weird \u{e9}\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(h.status, 599);
        assert_eq!(h.body, BodyKind::Length(0));
    }

    #[test]
    fn response_body_rules() {
        let cl = "Content-Length: 10\r\n";
        for (s, m, want) in [
            (
                format!("HTTP/1.1 200 OK\r\n{cl}\r\n"),
                Method::Head,
                BodyKind::None,
            ),
            (
                format!("HTTP/1.1 204 OK\r\n{cl}\r\n"),
                Method::Get,
                BodyKind::None,
            ),
            (
                format!("HTTP/1.1 304 OK\r\n{cl}\r\n"),
                Method::Get,
                BodyKind::None,
            ),
            (
                "HTTP/1.1 100 Continue\r\n\r\n".to_string(),
                Method::Post,
                BodyKind::None,
            ),
            (
                "HTTP/1.1 101 Switching\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n"
                    .to_string(),
                Method::Get,
                BodyKind::None,
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_string(),
                Method::Get,
                BodyKind::Chunked,
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, Chunked\r\n\r\n".to_string(),
                Method::Get,
                BodyKind::Chunked,
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n"
                    .to_string(),
                Method::Get,
                BodyKind::Chunked,
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n".to_string(),
                Method::Get,
                BodyKind::UntilClose,
            ),
            (
                "HTTP/1.1 200 OK\r\n\r\n".to_string(),
                Method::Get,
                BodyKind::UntilClose,
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 7\r\nContent-Length: 7\r\n\r\n".to_string(),
                Method::Get,
                BodyKind::Length(7),
            ),
        ] {
            let h = resp(&s, m).unwrap().unwrap();
            assert_eq!(h.body, want, "{s:?}");
        }
        let s = "HTTP/1.1 101 Switching\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n";
        let h = resp_ok(s);
        assert!(h.conn_upgrade);
        assert_eq!(txt(s, h.upgrade.unwrap()), "websocket");
    }

    #[test]
    fn response_errors() {
        resp_bad("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n");
        resp_bad("HTTP/1.1 204 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n");
        resp_bad("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n");
        for v in [
            "5, 5",
            "5,5",
            "+5",
            "-5",
            "",
            "5 5",
            "99999999999999999999999",
        ] {
            resp_bad(&format!("HTTP/1.1 200 OK\r\nContent-Length: {v}\r\n\r\n"));
        }
        resp_bad("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n");
        resp_bad(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
        );
        resp_bad("HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
        resp_bad("HTTP/1.1 200 OK\r\nUpgrade: a\r\nUpgrade: b\r\n\r\n");
        // Status line.
        for s in [
            "HTTP/1.1 099 Low\r\n\r\n",
            "HTTP/1.1 000\r\n\r\n",
            "HTTP/1.1 20 OK\r\n\r\n",
            "HTTP/1.1 2000 OK\r\n\r\n",
            "HTTP/2.0 200 OK\r\n\r\n",
            "HTTP/1.1  200 OK\r\n\r\n",
            "HTTP/1.1 200 O\0K\r\n\r\n",
            "HTTP/1.1 200 OK\n\r\n",
            "HTTP/1.1 200 OK\r\nX: a\nY: b\r\n\r\n",
            "\r\nHTTP/1.1 200 OK\r\n\r\n",
            "\nHTTP/1.1 200 OK\r\n\r\n",
            "garbage\r\n\r\n",
        ] {
            resp_bad(s);
        }
        // Folding and whitespace before the colon, which httparse can be told to allow for
        // responses but does not by default.
        resp_bad("HTTP/1.1 200 OK\r\nX: a\r\n b\r\n\r\n");
        resp_bad("HTTP/1.1 200 OK\r\nX : a\r\n\r\n");
        resp_bad("HTTP/1.1 200 OK\r\nX: a\0\r\n\r\n");
    }

    #[test]
    fn response_limits() {
        let limits = Limits {
            max_header_bytes: 20,
            max_headers: 1,
        };
        let mut hs = Vec::new();
        let big = b"HTTP/1.1 200 OK\r\nX: aaaaaaaaaa\r\n";
        assert_eq!(
            parse_response(big, Method::Get, &limits, &mut hs),
            Err(HeadError::TooLarge)
        );
        let limits = Limits {
            max_header_bytes: 8192,
            max_headers: 1,
        };
        let two = b"HTTP/1.1 200 OK\r\nA: 1\r\nB: 2\r\n\r\n";
        assert_eq!(
            parse_response(two, Method::Get, &limits, &mut hs),
            Err(HeadError::TooLarge)
        );
    }

    /// `cargo test --release --lib http::parse::tests::bench -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn bench() {
        let s = b"GET /api/v1/items?id=42&sort=asc HTTP/1.1\r\nHost: api.example.com\r\n\
User-Agent: Mozilla/5.0 (X11; Linux x86_64) bench/1.0\r\nAccept: */*\r\n\
Accept-Encoding: gzip, deflate, br\r\nConnection: keep-alive\r\n\
X-Request-ID: 0123456789abcdef\r\n\r\n";
        let limits = Limits {
            max_header_bytes: 64 * 1024,
            max_headers: 100,
        };
        let mut hs = Vec::with_capacity(100);
        let n = 2_000_000;
        let t = std::time::Instant::now();
        for _ in 0..n {
            let h = parse_request(std::hint::black_box(s), &limits, &mut hs);
            std::hint::black_box(h.unwrap());
        }
        let ns = t.elapsed().as_nanos() as f64 / n as f64;
        println!("parse_request, {} byte head: {ns:.1} ns", s.len());
        let t = std::time::Instant::now();
        for _ in 0..n {
            let mut raw = [httparse::EMPTY_HEADER; 100];
            let mut r = httparse::Request::new(&mut raw);
            std::hint::black_box(r.parse(std::hint::black_box(s)).unwrap());
        }
        let ns = t.elapsed().as_nanos() as f64 / n as f64;
        println!("bare httparse, same head: {ns:.1} ns");
    }
}
