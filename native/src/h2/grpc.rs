//! gRPC over HTTP/2: what a proxy must know of it (PROTOCOL-HTTP2.md in grpc/grpc).
//!
//! A gRPC call is a POST whose `content-type` is `application/grpc[+proto|...]`; its status is
//! in the trailers (`grpc-status`, `grpc-message`), and a call that fails before any message is
//! answered "trailers-only": one HEADERS frame with the status and END_STREAM. fastlb's own
//! answers to gRPC calls take that form, because a gRPC client ignores the HTTP status.

use http::{HeaderMap, HeaderValue, Response, StatusCode};
use std::time::Duration;

/// Whether a request is a gRPC call.
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// `grpc-timeout`: at most 8 digits and a unit (H, M, S, m, u, n).
pub fn timeout(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get("grpc-timeout")?.as_bytes();
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b"H" => Duration::from_secs(n * 3600),
        b"M" => Duration::from_secs(n * 60),
        b"S" => Duration::from_secs(n),
        b"m" => Duration::from_millis(n),
        b"u" => Duration::from_micros(n),
        b"n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// A trailers-only answer: HTTP 200 with the gRPC status in its only HEADERS frame.
pub fn trailers_only(code: u8, message: &'static str) -> Response<()> {
    let mut r = Response::new(());
    *r.status_mut() = StatusCode::OK;
    let h = r.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert("grpc-status", HeaderValue::from(code as u32));
    h.insert("grpc-message", HeaderValue::from_static(message));
    r
}

/// The `grpc-status` a response head or its trailers carry.
pub fn status_of(headers: &HeaderMap) -> Option<u32> {
    std::str::from_utf8(headers.get("grpc-status")?.as_bytes())
        .ok()?
        .parse()
        .ok()
}

/// Trailers that end a call fastlb cut short after the backend's head went to the client.
pub fn status_trailers(code: u8, message: &'static str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("grpc-status", HeaderValue::from(code as u32));
    h.insert("grpc-message", HeaderValue::from_static(message));
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_timeout(v: &'static str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("grpc-timeout", HeaderValue::from_static(v));
        h
    }

    #[test]
    fn grpc_timeouts_parse_in_every_unit_and_garbage_is_ignored() {
        assert_eq!(
            timeout(&with_timeout("100m")),
            Some(Duration::from_millis(100))
        );
        assert_eq!(timeout(&with_timeout("2S")), Some(Duration::from_secs(2)));
        assert_eq!(
            timeout(&with_timeout("1H")),
            Some(Duration::from_secs(3600))
        );
        assert_eq!(
            timeout(&with_timeout("5000u")),
            Some(Duration::from_millis(5))
        );
        assert_eq!(timeout(&with_timeout("123456789S")), None);
        assert_eq!(timeout(&with_timeout("S")), None);
        assert_eq!(timeout(&with_timeout("10x")), None);
        assert_eq!(timeout(&with_timeout("-1S")), None);
        assert_eq!(timeout(&HeaderMap::new()), None);
    }

    #[test]
    fn grpc_content_types_are_recognised() {
        let mut h = HeaderMap::new();
        h.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc+proto"),
        );
        assert!(is_grpc(&h));
        h.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        assert!(!is_grpc(&h));
    }
}
