//! Reads the server name (SNI) from the first bytes a TLS client sends, without decrypting and
//! without allocating: the L4 SNI-passthrough path peeks at the client's first bytes, picks a
//! pool by name, replays the bytes to the backend and splices.
//!
//! `peek_sni(buf, max_len)` is called with everything received so far, again with more each
//! time it answers `NeedMore`. It keeps no state between calls: each call walks the records from
//! the start, which costs O(len) and a ClientHello takes a few calls at most.
//!
//! Reassembly across records: the ClientHello handshake message can span several TLS records
//! (a post-quantum key share such as X25519MLKEM768 makes it 1.2–1.8 KB, and some clients cut
//! records small), and the records can arrive in several TCP segments. The parser reads the
//! handshake message through a cursor that walks the record headers in `buf` and steps from one
//! record's payload slice to the next, so nothing is copied and no scratch buffer of `max_len`
//! bytes is needed per connection (a caller-provided buffer would be one more per-connection
//! allocation or a large stack array, for the rare split hello). The only copy is the host name
//! itself, at most 253 bytes, into the returned `HostName`: a name may straddle two records, so
//! it cannot always be borrowed from `buf`, and an owned copy also leaves the caller free to
//! keep appending to its read buffer while it holds the answer.
//!
//! References: RFC 8446 §5.1 (records; handshake messages may be split across records, no
//! zero-length handshake fragments, no other record type in between), §4.1.2 (ClientHello),
//! RFC 6066 §3 (server_name).

use std::fmt;

/// The longest host name accepted: 253 characters, the DNS limit for a name in text form.
pub const MAX_HOST_NAME: usize = 253;

/// TLS plaintext records carry at most 2^14 bytes (RFC 8446 §5.1).
const MAX_RECORD_PAYLOAD: usize = 1 << 14;
const RECORD_HEADER: usize = 5;
const CONTENT_HANDSHAKE: u8 = 0x16;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const EXT_SERVER_NAME: u16 = 0;
const NAME_TYPE_HOST_NAME: u8 = 0;

/// What the first bytes of a connection say about its server name.
// `Sni` holds the name inline (254 bytes) so that nothing is allocated; a `Peek` is made a few
// times per connection, so its size costs nothing worth boxing for.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peek {
    /// Not enough bytes yet to decide: read more and call again with all of them.
    NeedMore,
    /// Not a TLS ClientHello (first byte not a handshake record, an implausible record version,
    /// or a handshake message other than ClientHello): route to the listener's default pool.
    NotTls,
    /// A complete, well-formed ClientHello with no server_name extension, or one with no
    /// host_name entry.
    NoSni,
    /// The host name, as the client sent it (not lower-cased: the caller does that).
    Sni(HostName),
    /// A complete, well-formed ClientHello whose host_name is not a plausible ASCII host name
    /// (empty label, a character outside letters, digits, `-` and `_`, over 253 bytes). It can
    /// match no route: the caller treats it as `NoSni` or refuses the connection.
    InvalidSni,
    /// `max_len` bytes, or the length the ClientHello declares, are more than the caller allows
    /// and the ClientHello is still incomplete.
    TooLarge,
    /// TLS, but lengths that do not add up: a bad record length, another record type in the
    /// middle of the ClientHello, an extension running past its block, and the like.
    Malformed,
}

/// A host name copied out of a ClientHello: ASCII, 1 to 253 bytes, checked by `from_ascii`.
#[derive(Clone, Copy)]
pub struct HostName {
    len: u8,
    bytes: [u8; MAX_HOST_NAME],
}

impl HostName {
    /// `name` if it is a plausible host name: dot-separated labels of 1 to 63 letters, digits,
    /// `-` or `_` (seen in the wild although DNS host names exclude it), 253 bytes at most, no
    /// trailing dot (RFC 6066 §3 sends names without one).
    pub fn from_ascii(name: &[u8]) -> Option<HostName> {
        if name.is_empty() || name.len() > MAX_HOST_NAME {
            return None;
        }
        let mut label = 0usize;
        for &b in name {
            if b == b'.' {
                if label == 0 {
                    return None;
                }
                label = 0;
            } else if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
                label += 1;
                if label > 63 {
                    return None;
                }
            } else {
                return None;
            }
        }
        if label == 0 {
            return None;
        }
        let mut h = HostName {
            len: name.len() as u8,
            bytes: [0; MAX_HOST_NAME],
        };
        h.bytes[..name.len()].copy_from_slice(name);
        Some(h)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII gets past `from_ascii`, so this never falls back.
        std::str::from_utf8(self.as_bytes()).unwrap_or_default()
    }
}

impl PartialEq for HostName {
    fn eq(&self, other: &HostName) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for HostName {}

impl fmt::Debug for HostName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

/// Why the record walk stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    /// The bytes so far end before the handshake bytes asked for.
    Incomplete,
    NotTls,
    Malformed,
}

/// Walks consecutive handshake records, yielding their payloads (the last one possibly cut
/// short by the end of the input).
struct Records<'a> {
    rest: &'a [u8],
    first: bool,
}

impl<'a> Records<'a> {
    fn next_payload(&mut self) -> Result<&'a [u8], Stop> {
        let r = self.rest;
        // The first record decides whether this is TLS at all; a later one that is wrong is a
        // TLS client misbehaving.
        let not_tls = if self.first {
            Stop::NotTls
        } else {
            Stop::Malformed
        };
        match r.first() {
            None => return Err(Stop::Incomplete),
            Some(&t) if t != CONTENT_HANDSHAKE => return Err(not_tls),
            _ => {}
        }
        // Record version: 3.0 (SSL 3.0 compatible hellos) to 3.4; 0x0301 and 0x0303 in practice.
        if r.len() >= 2 && r[1] != 3 {
            return Err(not_tls);
        }
        if r.len() >= 3 && r[2] > 4 {
            return Err(not_tls);
        }
        if r.len() < RECORD_HEADER {
            return Err(Stop::Incomplete);
        }
        let len = u16::from_be_bytes([r[3], r[4]]) as usize;
        if len == 0 || len > MAX_RECORD_PAYLOAD {
            return Err(Stop::Malformed);
        }
        self.first = false;
        let payload = &r[RECORD_HEADER..];
        if payload.len() >= len {
            self.rest = &payload[len..];
            Ok(&payload[..len])
        } else if payload.is_empty() {
            self.rest = &[];
            Err(Stop::Incomplete)
        } else {
            self.rest = &[];
            Ok(payload)
        }
    }
}

/// The handshake byte stream carried by the records: a cursor that steps from one record's
/// payload to the next. `pos` counts handshake bytes read.
struct Stream<'a> {
    records: Records<'a>,
    cur: &'a [u8],
    pos: usize,
}

impl<'a> Stream<'a> {
    fn new(input: &'a [u8]) -> Self {
        Stream {
            records: Records {
                rest: input,
                first: true,
            },
            cur: &[],
            pos: 0,
        }
    }

    fn fill(&mut self) -> Result<(), Stop> {
        while self.cur.is_empty() {
            self.cur = self.records.next_payload()?;
        }
        Ok(())
    }

    fn u8(&mut self) -> Result<u8, Stop> {
        self.fill()?;
        let b = self.cur[0];
        self.cur = &self.cur[1..];
        self.pos += 1;
        Ok(b)
    }

    fn u16(&mut self) -> Result<u16, Stop> {
        Ok((u16::from(self.u8()?) << 8) | u16::from(self.u8()?))
    }

    fn u24(&mut self) -> Result<usize, Stop> {
        Ok((usize::from(self.u8()?) << 16)
            | (usize::from(self.u8()?) << 8)
            | usize::from(self.u8()?))
    }

    /// Skips `n` bytes, or copies them into `out` (which is `n` long) when given.
    fn take(&mut self, mut n: usize, mut out: Option<&mut [u8]>) -> Result<(), Stop> {
        let mut at = 0;
        while n > 0 {
            self.fill()?;
            let k = n.min(self.cur.len());
            if let Some(o) = out.as_deref_mut() {
                o[at..at + k].copy_from_slice(&self.cur[..k]);
            }
            at += k;
            self.cur = &self.cur[k..];
            self.pos += k;
            n -= k;
        }
        Ok(())
    }
}

/// Lengths inside a complete ClientHello that do not add up: `Peek::Malformed`.
struct Bad;

/// Reads the ClientHello body once it is all there: every read is checked against `end`, the
/// end of the enclosing length-prefixed structure, so lengths that do not add up are `Bad`
/// (never a panic, never a read of the bytes after the message).
struct Body<'a> {
    s: Stream<'a>,
}

impl Body<'_> {
    fn need(&self, n: usize, end: usize) -> Result<(), Bad> {
        if self.s.pos + n > end {
            Err(Bad)
        } else {
            Ok(())
        }
    }
    fn u8(&mut self, end: usize) -> Result<u8, Bad> {
        self.need(1, end)?;
        self.s.u8().map_err(|_| Bad)
    }
    fn u16(&mut self, end: usize) -> Result<u16, Bad> {
        self.need(2, end)?;
        self.s.u16().map_err(|_| Bad)
    }
    fn skip(&mut self, n: usize, end: usize) -> Result<(), Bad> {
        self.need(n, end)?;
        self.s.take(n, None).map_err(|_| Bad)
    }
    fn copy(&mut self, out: &mut [u8], end: usize) -> Result<(), Bad> {
        self.need(out.len(), end)?;
        self.s.take(out.len(), Some(out)).map_err(|_| Bad)
    }
}

/// Looks for the SNI in `buf`, the bytes a client sent first; `max_len` caps how many the
/// caller will buffer. See `Peek` for the answers; only `NeedMore` asks to be called again.
pub fn peek_sni(buf: &[u8], max_len: usize) -> Peek {
    let input = &buf[..buf.len().min(max_len)];
    let incomplete = || {
        if buf.len() >= max_len {
            Peek::TooLarge
        } else {
            Peek::NeedMore
        }
    };
    let stop = |s: Stop| match s {
        Stop::Incomplete => incomplete(),
        Stop::NotTls => Peek::NotTls,
        Stop::Malformed => Peek::Malformed,
    };

    // The handshake header: type and length.
    let mut s = Stream::new(input);
    match s.u8() {
        Ok(HANDSHAKE_CLIENT_HELLO) => {}
        Ok(_) => return Peek::NotTls,
        Err(e) => return stop(e),
    }
    let len = match s.u24() {
        Ok(len) => len,
        Err(e) => return stop(e),
    };
    // The fewest input bytes that can carry the message: records of 2^14 bytes each.
    let message = 4 + len;
    let fewest = message + RECORD_HEADER * message.div_ceil(MAX_RECORD_PAYLOAD);
    if fewest > max_len {
        return Peek::TooLarge;
    }
    // All of it here? (This walks, and so checks, every record header it spans.)
    if let Err(e) = s.take(len, None) {
        return stop(e);
    }

    client_hello(Body {
        s: Stream::new(input),
    })
    .unwrap_or(Peek::Malformed)
}

/// Parses a complete ClientHello message (RFC 8446 §4.1.2, which also reads TLS 1.2's).
fn client_hello(mut b: Body<'_>) -> Result<Peek, Bad> {
    // Handshake header, already checked by the caller.
    b.skip(1, 1)?;
    let len = (usize::from(b.u8(4)?) << 16) | usize::from(b.u16(4)?);
    let end = 4 + len;

    let version = b.u16(end)?;
    if version >> 8 != 3 {
        return Err(Bad);
    }
    b.skip(32, end)?; // random
    let session_id = usize::from(b.u8(end)?);
    if session_id > 32 {
        return Err(Bad);
    }
    b.skip(session_id, end)?;
    let suites = usize::from(b.u16(end)?);
    if suites < 2 || suites % 2 != 0 {
        return Err(Bad);
    }
    b.skip(suites, end)?;
    let compression = usize::from(b.u8(end)?);
    if compression < 1 {
        return Err(Bad);
    }
    b.skip(compression, end)?;
    if b.s.pos == end {
        // TLS 1.2 and earlier may omit the extensions altogether.
        return Ok(Peek::NoSni);
    }
    let extensions = usize::from(b.u16(end)?);
    if b.s.pos + extensions != end {
        return Err(Bad);
    }

    let mut found = None;
    while b.s.pos < end {
        let typ = b.u16(end)?;
        let ext_len = usize::from(b.u16(end)?);
        b.need(ext_len, end)?;
        let ext_end = b.s.pos + ext_len;
        if typ != EXT_SERVER_NAME {
            b.skip(ext_len, end)?;
            continue;
        }
        if found.is_some() {
            // An extension type may appear once (RFC 8446 §4.2).
            return Err(Bad);
        }
        found = Some(server_name(&mut b, ext_end)?);
    }
    Ok(found.unwrap_or(Peek::NoSni))
}

/// Parses a server_name extension's body, which ends at `end`: a list of (name_type, name).
fn server_name(b: &mut Body<'_>, end: usize) -> Result<Peek, Bad> {
    let list = usize::from(b.u16(end)?);
    if list == 0 || b.s.pos + list != end {
        return Err(Bad);
    }
    let mut answer = Peek::NoSni;
    while b.s.pos < end {
        let name_type = b.u8(end)?;
        let len = usize::from(b.u16(end)?);
        if name_type != NAME_TYPE_HOST_NAME {
            // No other type is defined; like Go's crypto/tls, read it as opaque<0..2^16-1>.
            b.skip(len, end)?;
            continue;
        }
        if answer != Peek::NoSni || len == 0 {
            // One name per type (RFC 6066 §3), and HostName is opaque<1..2^16-1>.
            return Err(Bad);
        }
        if len > MAX_HOST_NAME {
            b.skip(len, end)?;
            answer = Peek::InvalidSni;
            continue;
        }
        let mut raw = [0u8; MAX_HOST_NAME];
        b.copy(&mut raw[..len], end)?;
        answer = match HostName::from_ascii(&raw[..len]) {
            Some(h) => Peek::Sni(h),
            None => Peek::InvalidSni,
        };
    }
    Ok(answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 16 * 1024;

    // ---- a small ClientHello builder ----

    fn u16be(v: usize) -> [u8; 2] {
        (v as u16).to_be_bytes()
    }

    fn ext(typ: u16, data: &[u8]) -> Vec<u8> {
        let mut e = typ.to_be_bytes().to_vec();
        e.extend_from_slice(&u16be(data.len()));
        e.extend_from_slice(data);
        e
    }

    /// server_name with one host_name entry.
    fn sni_ext(name: &[u8]) -> Vec<u8> {
        let mut list = vec![NAME_TYPE_HOST_NAME];
        list.extend_from_slice(&u16be(name.len()));
        list.extend_from_slice(name);
        let mut data = u16be(list.len()).to_vec();
        data.extend_from_slice(&list);
        ext(EXT_SERVER_NAME, &data)
    }

    /// key_share (51) with one entry of `key_len` bytes for `group`.
    fn key_share_ext(group: u16, key_len: usize) -> Vec<u8> {
        let mut entry = group.to_be_bytes().to_vec();
        entry.extend_from_slice(&u16be(key_len));
        entry.extend((0..key_len).map(|i| (i * 7) as u8));
        let mut data = u16be(entry.len()).to_vec();
        data.extend_from_slice(&entry);
        ext(51, &data)
    }

    /// supported_versions (43) offering TLS 1.3 and 1.2.
    fn versions_ext() -> Vec<u8> {
        ext(43, &[4, 3, 4, 3, 3])
    }

    /// A ClientHello handshake message (header included) with these extensions; `None` leaves
    /// the extensions block out altogether, as TLS 1.2 clients may.
    fn hello(exts: Option<&[Vec<u8>]>) -> Vec<u8> {
        let mut body = vec![3, 3];
        body.extend((0..32).map(|i| i as u8)); // random
        body.push(32);
        body.extend([0xab; 32]); // legacy session id
        body.extend_from_slice(&[0, 6, 0x13, 1, 0x13, 2, 0xc0, 0x2b]);
        body.extend_from_slice(&[1, 0]); // compression: null
        if let Some(exts) = exts {
            let all: Vec<u8> = exts.concat();
            body.extend_from_slice(&u16be(all.len()));
            body.extend_from_slice(&all);
        }
        let mut m = vec![HANDSHAKE_CLIENT_HELLO];
        m.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        m.extend_from_slice(&body);
        m
    }

    fn typical(name: &[u8]) -> Vec<u8> {
        hello(Some(&[
            sni_ext(name),
            versions_ext(),
            key_share_ext(0x001d, 32),
        ]))
    }

    /// Like Chrome's with X25519MLKEM768 (0x11ec, 1216-byte share) and X25519 key shares,
    /// GREASE and padding: about 1.8 KB.
    fn post_quantum(name: &[u8]) -> Vec<u8> {
        let mut ks = Vec::new();
        for (g, n) in [(0x0a0a_u16, 1), (0x11ec, 1216), (0x001d, 32)] {
            ks.extend_from_slice(&g.to_be_bytes());
            ks.extend_from_slice(&u16be(n));
            ks.extend((0..n).map(|i| i as u8));
        }
        let mut data = u16be(ks.len()).to_vec();
        data.extend_from_slice(&ks);
        hello(Some(&[
            ext(0x2a2a, &[]),
            ext(10, &[0, 6, 0x11, 0xec, 0, 0x1d, 0, 0x17]),
            sni_ext(name),
            ext(16, &[0, 3, 2, b'h', b'2']),
            versions_ext(),
            ext(51, &data),
            ext(21, &[0; 420]), // padding
        ]))
    }

    /// The message in records: `cuts` are the payload sizes of all records but the last.
    fn records(msg: &[u8], cuts: &[usize]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut rest = msg;
        for &n in cuts.iter().chain(std::iter::once(&usize::MAX)) {
            let n = n.min(rest.len());
            let version = if out.is_empty() { 1 } else { 3 };
            out.extend_from_slice(&[CONTENT_HANDSHAKE, 3, version]);
            out.extend_from_slice(&u16be(n));
            out.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
            if rest.is_empty() {
                break;
            }
        }
        out
    }

    fn one_record(msg: &[u8]) -> Vec<u8> {
        records(msg, &[])
    }

    fn sni(name: &str) -> Peek {
        Peek::Sni(HostName::from_ascii(name.as_bytes()).unwrap())
    }

    /// Every proper prefix needs more; the whole, and the whole with bytes after it, give `want`.
    fn check_prefixes(wire: &[u8], want: Peek) {
        for i in 0..wire.len() {
            assert_eq!(
                peek_sni(&wire[..i], MAX),
                Peek::NeedMore,
                "prefix of {i} bytes"
            );
        }
        assert_eq!(peek_sni(wire, MAX), want);
        let mut more = wire.to_vec();
        more.extend_from_slice(&[0x17, 3, 3, 0, 2, 9, 9]);
        assert_eq!(peek_sni(&more, MAX), want, "with bytes after the hello");
    }

    fn unhex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    // ---- real ClientHellos ----

    /// `openssl s_client -connect 127.0.0.1:PORT -servername Example.COM` (OpenSSL 3.0.19),
    /// captured from a listening socket: one record, TLS 1.3 with X25519 and more.
    const OPENSSL_SNI: &str = include_str!("testdata/openssl_sni.hex");
    /// The same with `-noservername`.
    const OPENSSL_NO_SNI: &str = include_str!("testdata/openssl_nosni.hex");
    /// `-tls1_2 -servername api.example.net`: a TLS 1.2 ClientHello.
    const OPENSSL_TLS12: &str = include_str!("testdata/openssl_tls12.hex");
    /// rustls 0.23.46 with aws-lc-rs' default provider (`bench/tls_provider dump-hello
    /// www.example.com`): X25519MLKEM768 key share first, 1.4 KB.
    const RUSTLS_PQ: &str = include_str!("testdata/rustls_pq.hex");

    #[test]
    fn openssl_hello_with_mixed_case_sni() {
        let wire = unhex(OPENSSL_SNI);
        check_prefixes(&wire, sni("Example.COM"));
        match peek_sni(&wire, MAX) {
            Peek::Sni(h) => assert_eq!(h.as_str(), "Example.COM", "case is the caller's"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn openssl_hello_without_sni() {
        check_prefixes(&unhex(OPENSSL_NO_SNI), Peek::NoSni);
    }

    #[test]
    fn openssl_tls12_hello() {
        check_prefixes(&unhex(OPENSSL_TLS12), sni("api.example.net"));
    }

    #[test]
    fn rustls_post_quantum_hello() {
        let wire = unhex(RUSTLS_PQ);
        assert!(wire.len() > 1200, "{}", wire.len());
        check_prefixes(&wire, sni("www.example.com"));
    }

    /// A real hello re-cut into records of every size from 1 byte up.
    #[test]
    fn real_hello_recut_into_records() {
        let wire = unhex(RUSTLS_PQ);
        let msg = &wire[RECORD_HEADER..];
        for size in (1..40).chain([100, 255, 256, 511, 1000, 1300]) {
            let cuts = vec![size; msg.len() / size + 1];
            let rewired = records(msg, &cuts);
            assert_eq!(
                peek_sni(&rewired, MAX),
                sni("www.example.com"),
                "records of {size}"
            );
        }
    }

    // ---- built ClientHellos ----

    #[test]
    fn typical_hello_every_prefix() {
        check_prefixes(&one_record(&typical(b"example.com")), sni("example.com"));
    }

    #[test]
    fn post_quantum_hello_is_about_1800_bytes_and_every_prefix() {
        let msg = post_quantum(b"pq.example.com");
        assert!((1700..2000).contains(&msg.len()), "{}", msg.len());
        check_prefixes(&one_record(&msg), sni("pq.example.com"));
    }

    #[test]
    fn two_and_three_records_at_every_cut() {
        let msg = post_quantum(b"split.example.com");
        let want = sni("split.example.com");
        // Two records: cut at every offset (inside the handshake header, the SNI, the key share).
        for a in 1..msg.len() {
            let wire = records(&msg, &[a]);
            assert_eq!(peek_sni(&wire, MAX), want, "cut at {a}");
        }
        // Three records: a spread of first cuts, every second cut.
        for a in (1..msg.len()).step_by(97).chain([1, 2, 3, 4, 5]) {
            for b in 1..msg.len() - a {
                let wire = records(&msg, &[a, b]);
                assert_eq!(peek_sni(&wire, MAX), want, "cuts at {a}, {b}");
            }
        }
    }

    #[test]
    fn three_records_every_prefix() {
        // The name straddles the first two records; the key share the last two.
        let msg = post_quantum(b"straddle.example.com");
        let at = msg.windows(8).position(|w| w == b"straddle").unwrap();
        check_prefixes(&records(&msg, &[at + 4, 900]), sni("straddle.example.com"));
    }

    #[test]
    fn segments_with_record_boundaries_inside() {
        // TCP segments of 1 to 3 bytes arriving over a hello split in records of 50.
        let wire = records(&typical(b"seg.example.com"), &[50; 8]);
        let mut got = 0;
        let mut seen = Vec::new();
        while got < wire.len() {
            got = (got + 1 + got % 3).min(wire.len());
            seen.push(peek_sni(&wire[..got], MAX));
        }
        let last = seen.pop().unwrap();
        assert!(seen.iter().all(|p| *p == Peek::NeedMore));
        assert_eq!(last, sni("seg.example.com"));
    }

    #[test]
    fn no_sni() {
        check_prefixes(
            &one_record(&hello(Some(&[versions_ext(), key_share_ext(0x1d, 32)]))),
            Peek::NoSni,
        );
        check_prefixes(&one_record(&hello(None)), Peek::NoSni);
        // server_name with only a non-host_name entry.
        let data = [0, 4, 7, 0, 1, b'x'];
        let m = hello(Some(&[ext(EXT_SERVER_NAME, &data)]));
        assert_eq!(peek_sni(&one_record(&m), MAX), Peek::NoSni);
        // An unknown name type before the host_name is skipped.
        let data = [0, 12, 7, 0, 1, b'x', 0, 0, 5, b'a', b'.', b'b', b'c', b'd'];
        let m = hello(Some(&[ext(EXT_SERVER_NAME, &data)]));
        assert_eq!(peek_sni(&one_record(&m), MAX), sni("a.bcd"));
    }

    #[test]
    fn not_tls() {
        for bytes in [
            &b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n"[..],
            b"G",
            b"SSH-2.0-OpenSSH_9.6\r\n",
            &[0x80, 0x2e, 0x01, 0x03, 0x01][..], // SSLv2-style hello
            &[0x16, 0x47][..],                   // 0x16 then not version 3.x
            &[0x16, 0x03, 0x07][..],             // version 3.7
            &[0x17, 0x03, 0x03, 0, 5][..],       // application data first
        ] {
            assert_eq!(peek_sni(bytes, MAX), Peek::NotTls, "{bytes:?}");
        }
        // A handshake record carrying a ServerHello (2), not a ClientHello.
        let mut m = typical(b"example.com");
        m[0] = 2;
        assert_eq!(peek_sni(&one_record(&m), MAX), Peek::NotTls);
        assert_eq!(peek_sni(&one_record(&m)[..6], MAX), Peek::NotTls);
        // Plausible-so-far prefixes need more.
        for bytes in [
            &[][..],
            &[0x16],
            &[0x16, 3],
            &[0x16, 3, 1],
            &[0x16, 3, 1, 0],
        ] {
            assert_eq!(peek_sni(bytes, MAX), Peek::NeedMore, "{bytes:?}");
        }
    }

    #[test]
    fn record_framing_errors() {
        let msg = typical(b"example.com");
        // A zero-length or over-2^14 record.
        assert_eq!(peek_sni(&[0x16, 3, 1, 0, 0, 1], MAX), Peek::Malformed);
        assert_eq!(peek_sni(&[0x16, 3, 1, 0x40, 1], MAX), Peek::Malformed);
        // An alert record between two parts of the hello.
        let mut wire = records(&msg, &[20]);
        wire[RECORD_HEADER + 20] = 0x15;
        assert_eq!(peek_sni(&wire, MAX), Peek::Malformed);
        // The second record's version implausible.
        let mut wire = records(&msg, &[20]);
        wire[RECORD_HEADER + 20 + 1] = 9;
        assert_eq!(peek_sni(&wire, MAX), Peek::Malformed);
        // A zero-length record in the middle.
        let mut wire = records(&msg, &[20]);
        let tail = wire.split_off(RECORD_HEADER + 20);
        wire.extend_from_slice(&[0x16, 3, 3, 0, 0]);
        wire.extend_from_slice(&tail);
        assert_eq!(peek_sni(&wire, MAX), Peek::Malformed);
    }

    /// Changes the u16 at `at` in a typical one-record hello and parses it.
    fn with_u16(at: usize, v: u16) -> Peek {
        let mut wire = one_record(&typical(b"example.com"));
        wire[at..at + 2].copy_from_slice(&v.to_be_bytes());
        peek_sni(&wire, MAX)
    }

    #[test]
    fn garbage_lengths() {
        let wire = one_record(&typical(b"example.com"));
        // Offsets in the built hello: record 5, handshake header 4, version 2, random 32,
        // session id 1+32, suites 2+6, compression 1+1, then the extensions' length.
        let hs = RECORD_HEADER;
        let suites = hs + 4 + 2 + 32 + 1 + 32;
        let exts = suites + 2 + 6 + 2;
        let sni_ext = exts + 2;
        assert_eq!(peek_sni(&wire, MAX), sni("example.com"));
        // Session id longer than 32.
        let mut w = wire.clone();
        w[hs + 4 + 2 + 32] = 33;
        assert_eq!(peek_sni(&w, MAX), Peek::Malformed);
        // Cipher suites: odd, zero, past the end.
        assert_eq!(with_u16(suites, 5), Peek::Malformed);
        assert_eq!(with_u16(suites, 0), Peek::Malformed);
        assert_eq!(with_u16(suites, 0xfffe), Peek::Malformed);
        // Extensions block shorter or longer than the rest of the message.
        let real = u16::from_be_bytes([wire[exts], wire[exts + 1]]);
        assert_eq!(with_u16(exts, real - 1), Peek::Malformed);
        assert_eq!(with_u16(exts, real + 1), Peek::Malformed);
        assert_eq!(with_u16(exts, 0), Peek::Malformed);
        // server_name's own length, its list length, the name's length.
        let ext_len = sni_ext + 2;
        let list_len = sni_ext + 4;
        let name_len = sni_ext + 7;
        assert_eq!(with_u16(ext_len, 0xffff), Peek::Malformed);
        assert_eq!(with_u16(ext_len, 3), Peek::Malformed);
        assert_eq!(with_u16(list_len, 0), Peek::Malformed);
        assert_eq!(with_u16(list_len, 100), Peek::Malformed);
        assert_eq!(with_u16(name_len, 0), Peek::Malformed);
        assert_eq!(with_u16(name_len, 12), Peek::Malformed);
        assert_eq!(with_u16(name_len, 10), Peek::Malformed);
        // The handshake length shorter than the body (the extensions then overrun it), or
        // longer (then more bytes are awaited).
        let mut w = wire.clone();
        w[hs + 3] -= 1;
        assert_eq!(peek_sni(&w, MAX), Peek::Malformed);
        let mut w = wire.clone();
        w[hs + 3] += 1;
        w[4] += 1; // the record too, so the record is not the short one
        assert_eq!(peek_sni(&w, MAX), Peek::NeedMore);
        // Handshake version not 3.x.
        let mut w = wire.clone();
        w[hs + 4] = 0x7f;
        assert_eq!(peek_sni(&w, MAX), Peek::Malformed);
        // No compression methods.
        let mut w = one_record(&hello(None));
        let last = w.len() - 2;
        w[last] = 0;
        assert_eq!(peek_sni(&w, MAX), Peek::Malformed);
    }

    #[test]
    fn truncated_extensions_in_a_complete_message() {
        // The message (and record) end in the middle of the key share extension.
        let full = typical(b"example.com");
        for cut in 1..40 {
            let mut m = full[..full.len() - cut].to_vec();
            let body = (m.len() - 4) as u32;
            m[1..4].copy_from_slice(&body.to_be_bytes()[1..]);
            assert_eq!(peek_sni(&one_record(&m), MAX), Peek::Malformed, "cut {cut}");
            // The extensions block's length fixed too: the last extension overruns it.
            let exts = 4 + 2 + 32 + 1 + 32 + 2 + 6 + 2;
            let block = (m.len() - exts - 2) as u16;
            m[exts..exts + 2].copy_from_slice(&block.to_be_bytes());
            assert_eq!(peek_sni(&one_record(&m), MAX), Peek::Malformed, "cut {cut}");
        }
    }

    #[test]
    fn duplicate_names_and_extensions() {
        let m = hello(Some(&[sni_ext(b"a.com"), sni_ext(b"b.com")]));
        assert_eq!(peek_sni(&one_record(&m), MAX), Peek::Malformed);
        let data = [0, 12, 0, 0, 3, b'a', b'.', b'b', 0, 0, 3, b'c', b'.', b'd'];
        let m = hello(Some(&[ext(EXT_SERVER_NAME, &data)]));
        assert_eq!(peek_sni(&one_record(&m), MAX), Peek::Malformed);
    }

    #[test]
    fn invalid_host_names() {
        let long = "a".repeat(64);
        let too_long = ["abcdefghi"; 26].join(".");
        assert!(too_long.len() > MAX_HOST_NAME);
        for name in [
            "exa mple.com",
            "example.com.",
            ".example.com",
            "a..b",
            "ex\u{e4}mple.com",
            "example.com:443",
            "a\0b",
            long.as_str(),
            too_long.as_str(),
        ] {
            let wire = one_record(&typical(name.as_bytes()));
            assert_eq!(peek_sni(&wire, MAX), Peek::InvalidSni, "{name:?}");
        }
        let longest = ["a".repeat(63).as_str(); 4].join(".")[..MAX_HOST_NAME].to_string();
        for name in [
            "EXAMPLE.com",
            "a",
            "_dmarc.x-y.example",
            "127.0.0.1",
            longest.as_str(),
        ] {
            let wire = one_record(&typical(name.as_bytes()));
            assert_eq!(peek_sni(&wire, MAX), sni(name), "{name:?}");
        }
    }

    #[test]
    fn too_large() {
        let wire = one_record(&post_quantum(b"big.example.com"));
        // The whole hello fits in exactly its own size.
        assert_eq!(peek_sni(&wire, wire.len()), sni("big.example.com"));
        // One byte less: known as soon as the handshake header is in.
        let cap = wire.len() - 1;
        for i in 0..9 {
            assert_eq!(peek_sni(&wire[..i], cap), Peek::NeedMore, "prefix {i}");
        }
        for i in 9..=wire.len() {
            assert_eq!(peek_sni(&wire[..i], cap), Peek::TooLarge, "prefix {i}");
        }
        // A declared length of 16 MB.
        assert_eq!(
            peek_sni(&[0x16, 3, 1, 0, 4, 1, 0xff, 0xff, 0xff], MAX),
            Peek::TooLarge
        );
        // Split into small records the message needs more headers: the cap counts them, and
        // is noticed once the input reaches it.
        let split = records(&post_quantum(b"big.example.com"), &[100; 30]);
        assert_eq!(peek_sni(&split, split.len()), sni("big.example.com"));
        let cap = split.len() - 1;
        assert_eq!(peek_sni(&split[..cap - 1], cap), Peek::NeedMore);
        assert_eq!(peek_sni(&split[..cap], cap), Peek::TooLarge);
        assert_eq!(peek_sni(&split, cap), Peek::TooLarge);
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = fastrand::Rng::with_seed(0x5eed);
        let mut buf = [0u8; 600];
        for round in 0..4000 {
            let n = rng.usize(..buf.len());
            rng.fill(&mut buf[..n]);
            if round % 2 == 0 && n >= 9 {
                // Mostly-plausible framing so the parse gets past the first checks.
                buf[..3].copy_from_slice(&[0x16, 3, 1]);
                buf[3..5].copy_from_slice(&u16be(rng.usize(..n)));
                buf[5] = 1;
            }
            let _ = peek_sni(&buf[..n], rng.usize(..700));
        }
        // Mutations of a real hello: flip a byte or two, parse every prefix.
        let wire = one_record(&typical(b"fuzz.example.com"));
        for _ in 0..3000 {
            let mut w = wire.clone();
            for _ in 0..rng.usize(1..3) {
                let i = rng.usize(..w.len());
                w[i] = rng.u8(..);
            }
            let cut = rng.usize(..=w.len());
            let _ = peek_sni(&w[..cut], MAX);
        }
    }

    /// Counts this thread's allocations, so a test can show that `peek_sni` makes none. It
    /// wraps the system allocator for the whole test binary; only the counter is new.
    struct Counting;
    thread_local! {
        static ALLOCS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }
    // SAFETY: forwards to the system allocator unchanged.
    unsafe impl std::alloc::GlobalAlloc for Counting {
        unsafe fn alloc(&self, l: std::alloc::Layout) -> *mut u8 {
            let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
            unsafe { std::alloc::System.alloc(l) }
        }
        unsafe fn dealloc(&self, p: *mut u8, l: std::alloc::Layout) {
            unsafe { std::alloc::System.dealloc(p, l) }
        }
    }
    #[global_allocator]
    static COUNTING: Counting = Counting;

    #[test]
    fn does_not_allocate() {
        let inputs = [
            records(&post_quantum(b"alloc.example.com"), &[37, 500]),
            one_record(&typical(b"a.b")),
            one_record(&hello(None)),
            b"GET / HTTP/1.1\r\n".to_vec(),
        ];
        let before = ALLOCS.with(|c| c.get());
        let mut seen = 0;
        for w in &inputs {
            for i in 0..=w.len() {
                if peek_sni(&w[..i], MAX) != Peek::NeedMore {
                    seen += 1;
                }
            }
        }
        assert_eq!(ALLOCS.with(|c| c.get()), before);
        assert!(seen > 0);
    }

    #[test]
    fn host_name_is_small_and_copy() {
        assert!(std::mem::size_of::<Peek>() <= 256);
        let h = HostName::from_ascii(b"Example.com").unwrap();
        let g = h;
        assert_eq!(format!("{g:?}"), "\"Example.com\"");
        assert_eq!(h, g);
    }
}
