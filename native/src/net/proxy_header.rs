//! The PROXY protocol (HAProxy's spec, v1 text and v2 binary) on accepted connections: the
//! header a load balancer in front (a cloud NLB, HAProxy, nginx) puts before the client's bytes,
//! naming the client. Only sources in the listener's `from` may send one; it is read before
//! anything else (before TLS), so the address it carries is the client everywhere after.
//!
//! The header is peeked, then consumed exactly (never a byte of the client's own data), so the
//! protocol code gets the socket as if the header had not been there. A header split across
//! segments is waited for, re-peeking every millisecond (splits are rare: a sender writes the
//! header in one go), within the listener's `header_read` limit.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
const V1_PREFIX: &[u8; 6] = b"PROXY ";
/// v1: "PROXY TCP6 " + two addresses + two ports + CRLF is at most 107 bytes (the spec).
const V1_MAX: usize = 107;
/// v2: 16 bytes of head, then addresses and TLVs; more than this is refused as a flood.
pub const V2_MAX: usize = 16 + 2048;

/// What v2 TLVs say of a TLS session fastlb terminated (HAProxy's spec, section 2.2).
#[derive(Debug, Default, Clone, Copy)]
pub struct TlsTlvs<'a> {
    pub alpn: Option<&'a [u8]>,
    /// The SNI the client sent (PP2_TYPE_AUTHORITY).
    pub authority: Option<&'a str>,
    /// "TLSv1.3", "TLSv1.2" (as OpenSSL's SSL_get_version spells them).
    pub version: &'a str,
    pub cipher: &'a str,
    /// Whether the client presented a certificate (fastlb verified it, or refused the client).
    pub client_cert: bool,
    /// The common name of the client certificate's subject.
    pub client_cn: Option<&'a str>,
}

const PP2_TYPE_ALPN: u8 = 0x01;
const PP2_TYPE_AUTHORITY: u8 = 0x02;
const PP2_TYPE_SSL: u8 = 0x20;
const PP2_SUBTYPE_SSL_VERSION: u8 = 0x21;
const PP2_SUBTYPE_SSL_CN: u8 = 0x22;
const PP2_SUBTYPE_SSL_CIPHER: u8 = 0x23;
const PP2_CLIENT_SSL: u8 = 0x01;
const PP2_CLIENT_CERT_CONN: u8 = 0x02;
const PP2_CLIENT_CERT_SESS: u8 = 0x04;

/// The header fastlb sends to a backend (`send_proxy`): `client` connected to `local`. v2
/// carries the facts of a TLS session fastlb terminated as TLVs: ALPN, the SNI as authority,
/// and SSL (version, cipher, whether a client certificate was presented, and its CN).
pub fn encode(
    version: crate::config::ProxyVersion,
    client: SocketAddr,
    local: SocketAddr,
    tls: Option<&TlsTlvs<'_>>,
) -> Vec<u8> {
    // An IPv4 client on a dual-stack socket shows as ::ffff:a.b.c.d: send it as IPv4.
    let (client, local) = (unmapped(client), unmapped(local));
    let same_family = client.is_ipv4() == local.is_ipv4();
    match version {
        crate::config::ProxyVersion::V1 if !same_family => b"PROXY UNKNOWN\r\n".to_vec(),
        crate::config::ProxyVersion::V1 => {
            let family = if client.is_ipv4() { "TCP4" } else { "TCP6" };
            format!(
                "PROXY {family} {} {} {} {}\r\n",
                client.ip(),
                local.ip(),
                client.port(),
                local.port()
            )
            .into_bytes()
        }
        crate::config::ProxyVersion::V2 => {
            let mut body = Vec::with_capacity(128);
            let family = match (client, local) {
                (SocketAddr::V4(c), SocketAddr::V4(l)) => {
                    body.extend_from_slice(&c.ip().octets());
                    body.extend_from_slice(&l.ip().octets());
                    0x11
                }
                (SocketAddr::V6(c), SocketAddr::V6(l)) => {
                    body.extend_from_slice(&c.ip().octets());
                    body.extend_from_slice(&l.ip().octets());
                    0x21
                }
                _ => 0x00,
            };
            if family != 0 {
                body.extend_from_slice(&client.port().to_be_bytes());
                body.extend_from_slice(&local.port().to_be_bytes());
            }
            if let Some(tls) = tls {
                push_tlvs(&mut body, tls);
            }
            let mut out = V2_SIGNATURE.to_vec();
            out.extend_from_slice(&[0x21, family]);
            out.extend_from_slice(&(body.len() as u16).to_be_bytes());
            out.extend_from_slice(&body);
            out
        }
    }
}

fn push_tlvs(body: &mut Vec<u8>, tls: &TlsTlvs<'_>) {
    push_tlv(body, PP2_TYPE_ALPN, tls.alpn.unwrap_or_default());
    push_tlv(
        body,
        PP2_TYPE_AUTHORITY,
        tls.authority.unwrap_or_default().as_bytes(),
    );
    let mut ssl = Vec::with_capacity(64);
    ssl.push(match tls.client_cert {
        true => PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS,
        false => PP2_CLIENT_SSL,
    });
    ssl.extend_from_slice(&0u32.to_be_bytes()); // verify: 0, the certificate (if any) passed
    push_tlv(&mut ssl, PP2_SUBTYPE_SSL_VERSION, tls.version.as_bytes());
    push_tlv(
        &mut ssl,
        PP2_SUBTYPE_SSL_CN,
        tls.client_cn.unwrap_or_default().as_bytes(),
    );
    push_tlv(&mut ssl, PP2_SUBTYPE_SSL_CIPHER, tls.cipher.as_bytes());
    push_tlv(body, PP2_TYPE_SSL, &ssl);
}

/// A TLV, unless its value is empty or too long for a sane header (which stays under V2_MAX).
fn push_tlv(out: &mut Vec<u8>, kind: u8, value: &[u8]) {
    if value.is_empty() || (value.len() > 255 && kind != PP2_TYPE_SSL) {
        return;
    }
    out.push(kind);
    out.extend_from_slice(&(value.len() as u16).to_be_bytes());
    out.extend_from_slice(value);
}

fn unmapped(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => a,
        },
        v4 => v4,
    }
}

/// What a complete header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// The client, as the sender saw it.
    Proxied(SocketAddr),
    /// v2 LOCAL or v1 UNKNOWN: the sender's own connection (a health check): keep the peer.
    Local,
}

/// What the bytes seen so far are.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A whole header of `len` bytes.
    Complete(Header, usize),
    /// A header's start: more bytes are needed.
    Incomplete,
    /// Not a PROXY header at all.
    Absent,
    /// A PROXY header that is malformed.
    Invalid(&'static str),
}

/// Parses the start of a connection's bytes.
pub fn parse(buf: &[u8]) -> Parsed {
    if buf.is_empty() {
        return Parsed::Incomplete;
    }
    let n = buf.len().min(12);
    if buf[..n] == V2_SIGNATURE[..n] {
        return if buf.len() < 16 {
            Parsed::Incomplete
        } else {
            parse_v2(buf)
        };
    }
    let n = buf.len().min(6);
    if buf[..n] == V1_PREFIX[..n] {
        return if buf.len() < 6 {
            Parsed::Incomplete
        } else {
            parse_v1(buf)
        };
    }
    Parsed::Absent
}

fn parse_v1(buf: &[u8]) -> Parsed {
    let window = &buf[..buf.len().min(V1_MAX)];
    let Some(end) = window.windows(2).position(|w| w == b"\r\n") else {
        return if buf.len() >= V1_MAX {
            Parsed::Invalid("v1 header without CRLF in 107 bytes")
        } else {
            Parsed::Incomplete
        };
    };
    let Ok(line) = std::str::from_utf8(&buf[6..end]) else {
        return Parsed::Invalid("v1 header is not text");
    };
    let fields: Vec<&str> = line.split(' ').collect();
    let header = match fields.as_slice() {
        ["UNKNOWN", ..] => Header::Local,
        [family @ ("TCP4" | "TCP6"), src, _dst, sport, _dport] => {
            let Ok(ip) = src.parse::<IpAddr>() else {
                return Parsed::Invalid("v1 source address");
            };
            if (*family == "TCP4") != ip.is_ipv4() {
                return Parsed::Invalid("v1 address family");
            }
            match port(sport) {
                Some(p) => Header::Proxied(SocketAddr::new(ip, p)),
                None => return Parsed::Invalid("v1 source port"),
            }
        }
        _ => return Parsed::Invalid("v1 header fields"),
    };
    Parsed::Complete(header, end + 2)
}

/// A decimal port without sign or leading zeros (the spec's form).
fn port(text: &str) -> Option<u16> {
    if text.is_empty() || (text.len() > 1 && text.starts_with('0')) {
        return None;
    }
    text.bytes()
        .all(|b| b.is_ascii_digit())
        .then(|| text.parse().ok())?
}

fn parse_v2(buf: &[u8]) -> Parsed {
    let (version, command) = (buf[12] >> 4, buf[12] & 0x0f);
    if version != 2 || command > 1 {
        return Parsed::Invalid("v2 version or command");
    }
    let len = 16 + u16::from_be_bytes([buf[14], buf[15]]) as usize;
    if len > V2_MAX {
        return Parsed::Invalid("v2 header longer than 2 KiB");
    }
    if buf.len() < len {
        return Parsed::Incomplete;
    }
    if command == 0 {
        return Parsed::Complete(Header::Local, len);
    }
    let body = &buf[16..len];
    let client = match buf[13] {
        // TCP or UDP over IPv4: src(4) dst(4) sport(2) dport(2)
        0x11 | 0x12 if body.len() >= 12 => {
            let ip = Ipv4Addr::new(body[0], body[1], body[2], body[3]);
            SocketAddr::new(ip.into(), u16::from_be_bytes([body[8], body[9]]))
        }
        // over IPv6: src(16) dst(16) sport(2) dport(2)
        0x21 | 0x22 if body.len() >= 36 => {
            let octets: [u8; 16] = body[..16].try_into().expect("16 bytes");
            SocketAddr::new(
                Ipv6Addr::from(octets).into(),
                u16::from_be_bytes([body[32], body[33]]),
            )
        }
        // UNSPEC (or unix sockets): no address to take; the sender's connection stands
        0x00 | 0x31 | 0x32 => return Parsed::Complete(Header::Local, len),
        _ => return Parsed::Invalid("v2 address family or length"),
    };
    Parsed::Complete(Header::Proxied(client), len)
}

/// Why a connection that should have carried a header is closed.
#[derive(Debug)]
pub enum Refused {
    Io(io::Error),
    Timeout,
    /// Malformed, or absent where `required`.
    Bad(&'static str),
}

/// Reads the PROXY header at the start of `stream`, if any, consuming exactly its bytes.
/// `required`: a connection without one is refused. Ok(None): no header (optional).
pub async fn read(
    stream: &mut TcpStream,
    required: bool,
    limit: Duration,
) -> Result<Option<Header>, Refused> {
    let work = async {
        let mut buf = vec![0u8; V2_MAX];
        let mut seen = 0;
        loop {
            let n = stream.peek(&mut buf).await.map_err(Refused::Io)?;
            if n == 0 {
                return Err(Refused::Bad("closed before a PROXY header"));
            }
            match parse(&buf[..n]) {
                Parsed::Complete(header, len) => {
                    stream
                        .read_exact(&mut buf[..len])
                        .await
                        .map_err(Refused::Io)?;
                    return Ok(Some(header));
                }
                Parsed::Absent if required => return Err(Refused::Bad("no PROXY header")),
                Parsed::Absent => return Ok(None),
                Parsed::Invalid(why) => return Err(Refused::Bad(why)),
                Parsed::Incomplete => {
                    // peek returns what is queued at once: wait for more before looking again
                    if n == seen {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    seen = n;
                }
            }
        }
    };
    tokio::time::timeout(limit, work)
        .await
        .unwrap_or(Err(Refused::Timeout))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(command: u8, family: u8, body: &[u8]) -> Vec<u8> {
        let mut out = V2_SIGNATURE.to_vec();
        out.extend_from_slice(&[0x20 | command, family]);
        out.extend_from_slice(&(body.len() as u16).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    #[test]
    fn v1_headers() {
        let h = b"PROXY TCP4 192.0.2.7 10.0.0.1 51000 443\r\nGET / HTTP/1.1\r\n";
        assert_eq!(
            parse(h),
            Parsed::Complete(Header::Proxied("192.0.2.7:51000".parse().unwrap()), 41)
        );
        let h6 = b"PROXY TCP6 2001:db8::7 2001:db8::1 51000 443\r\n";
        assert!(matches!(parse(h6), Parsed::Complete(Header::Proxied(a), 46) if a.port() == 51000));
        assert_eq!(
            parse(b"PROXY UNKNOWN\r\n"),
            Parsed::Complete(Header::Local, 15)
        );
        assert_eq!(
            parse(b"PROXY TCP4 192.0.2.7 10.0.0.1 51"),
            Parsed::Incomplete
        );
        assert_eq!(parse(b"PRO"), Parsed::Incomplete);
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Parsed::Absent);
        assert_eq!(parse(b"\x16\x03\x01"), Parsed::Absent); // a TLS ClientHello
    }

    #[test]
    fn v1_malformed() {
        for bad in [
            &b"PROXY TCP4 192.0.2.7 10.0.0.1 51000\r\n"[..],
            b"PROXY TCP4 2001:db8::7 10.0.0.1 1 2\r\n",
            b"PROXY TCP4 192.0.2.777 10.0.0.1 1 2\r\n",
            b"PROXY TCP4 192.0.2.7 10.0.0.1 65536 2\r\n",
            b"PROXY TCP4 192.0.2.7 10.0.0.1 0080 2\r\n",
            b"PROXY UDP4 192.0.2.7 10.0.0.1 1 2\r\n",
        ] {
            assert!(matches!(parse(bad), Parsed::Invalid(_)), "{bad:?}");
        }
        assert!(matches!(
            parse(&[b'P', b'R', b'O', b'X', b'Y', b' ', b'A'].repeat(20)),
            Parsed::Invalid(_)
        ));
    }

    #[test]
    fn v2_headers() {
        let mut body = vec![192, 0, 2, 7, 10, 0, 0, 1];
        body.extend_from_slice(&51000u16.to_be_bytes());
        body.extend_from_slice(&443u16.to_be_bytes());
        body.extend_from_slice(&[0x01, 0, 2, b'h', b'2']); // a TLV (ALPN): skipped
        let h = v2(1, 0x11, &body);
        assert_eq!(
            parse(&h),
            Parsed::Complete(Header::Proxied("192.0.2.7:51000".parse().unwrap()), h.len())
        );
        assert_eq!(parse(&h[..20]), Parsed::Incomplete);
        assert_eq!(parse(&h[..5]), Parsed::Incomplete);
        let local = v2(0, 0x00, &[]);
        assert_eq!(parse(&local), Parsed::Complete(Header::Local, 16));
        let mut six = vec![0x20, 0x01, 0x0d, 0xb8];
        six.resize(32, 0);
        six.extend_from_slice(&[0xc3, 0x50, 0x01, 0xbb]);
        assert!(
            matches!(parse(&v2(1, 0x21, &six)), Parsed::Complete(Header::Proxied(a), _) if a.port() == 50000)
        );
    }

    #[test]
    fn what_is_sent_parses_back() {
        use crate::config::ProxyVersion::{V1, V2};
        let client: SocketAddr = "192.0.2.7:51000".parse().unwrap();
        let local: SocketAddr = "10.0.0.1:443".parse().unwrap();
        let one = encode(V1, client, local, None);
        assert_eq!(one, b"PROXY TCP4 192.0.2.7 10.0.0.1 51000 443\r\n");
        let tls = TlsTlvs {
            alpn: Some(b"h2"),
            authority: Some("app.test"),
            version: "TLSv1.3",
            cipher: "TLS13_AES_128_GCM_SHA256",
            client_cert: true,
            client_cn: Some("alice"),
        };
        let two = encode(V2, client, local, Some(&tls));
        assert_eq!(
            parse(&two),
            Parsed::Complete(Header::Proxied(client), two.len())
        );
        let tlvs = &two[16 + 12..];
        let ssl_len = 1 + 4 + (3 + 7) + (3 + 5) + (3 + 24);
        let mut want = vec![0x01, 0, 2];
        want.extend_from_slice(b"h2");
        want.extend_from_slice(&[0x02, 0, 8]);
        want.extend_from_slice(b"app.test");
        want.extend_from_slice(&[0x20, 0, ssl_len as u8, 0x07, 0, 0, 0, 0, 0x21, 0, 7]);
        want.extend_from_slice(b"TLSv1.3");
        want.extend_from_slice(&[0x22, 0, 5]);
        want.extend_from_slice(b"alice");
        want.extend_from_slice(&[0x23, 0, 24]);
        want.extend_from_slice(b"TLS13_AES_128_GCM_SHA256");
        assert_eq!(tlvs, &want[..]);
        // no client certificate: just the SSL flag, and no CN
        let anonymous = TlsTlvs {
            client_cert: false,
            client_cn: None,
            ..tls
        };
        let three = encode(V2, client, local, Some(&anonymous));
        let ssl = three
            .windows(5)
            .position(|w| w[0] == 0x20 && w[3] == 0x01)
            .unwrap();
        assert!(!three[ssl..].windows(3).any(|w| w == [0x22, 0, 5]));
        let mapped: SocketAddr = "[::ffff:192.0.2.7]:51000".parse().unwrap();
        assert_eq!(encode(V1, mapped, local, None), one);
        let six: SocketAddr = "[2001:db8::1]:443".parse().unwrap();
        assert_eq!(encode(V1, client, six, None), b"PROXY UNKNOWN\r\n");
        assert_eq!(parse(&encode(V2, client, six, None)).len_or_zero(), 16);
    }

    impl Parsed {
        fn len_or_zero(&self) -> usize {
            match self {
                Parsed::Complete(_, n) => *n,
                _ => 0,
            }
        }
    }

    #[test]
    fn v2_malformed() {
        let mut bad_version = v2(1, 0x11, &[0; 12]);
        bad_version[12] = 0x11;
        assert!(matches!(parse(&bad_version), Parsed::Invalid(_)));
        assert!(matches!(parse(&v2(1, 0x11, &[0; 4])), Parsed::Invalid(_))); // too short
        assert!(matches!(parse(&v2(1, 0x99, &[0; 12])), Parsed::Invalid(_)));
        let mut huge = v2(1, 0x11, &[]);
        huge[14..16].copy_from_slice(&60_000u16.to_be_bytes());
        assert!(matches!(parse(&huge), Parsed::Invalid(_)));
    }
}
