//! `compression = { algorithms, min_size, types }` on http/https listeners: responses encoded
//! with zstd, br or gzip, the one the client's Accept-Encoding ranks highest (q-values; the
//! config's order breaks ties).
//!
//! A `CompressingSink` wraps the session's response sink: it decides at the response head
//! (never an encoded body, a 206 or Content-Range, 204/304, `Cache-Control: no-transform`, a
//! HEAD, a type not in `types`, a known length under `min_size`), rewrites the head
//! (Content-Encoding set, Content-Length dropped, `Vary: Accept-Encoding`, ETag weakened), and
//! encodes each piece of the body as it passes, flushed, so a stream (text/event-stream) goes
//! out event by event and nothing is buffered whole.

use super::exchange::ResponseSink;
use crate::config::CompressionConfig;
use bytes::Bytes;
use h2::Reason;
use http::header::{self, HeaderMap, HeaderValue};
use http::{response, Method, StatusCode};
use std::cell::RefCell;
use std::io::{self, Write};
use std::rc::Rc;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    Zstd,
    Br,
    Gzip,
}

impl Encoding {
    pub fn parse(name: &str) -> Option<Encoding> {
        match name {
            "zstd" => Some(Encoding::Zstd),
            "br" => Some(Encoding::Br),
            "gzip" => Some(Encoding::Gzip),
            _ => None,
        }
    }

    pub fn token(self) -> &'static str {
        match self {
            Encoding::Zstd => "zstd",
            Encoding::Br => "br",
            Encoding::Gzip => "gzip",
        }
    }
}

/// A listener's compiled `compression`.
pub struct Compression {
    algorithms: Vec<Encoding>,
    min_size: u64,
    /// `text/*` as ("text/", prefix), `application/json` as exact.
    types: Vec<(Box<str>, bool)>,
    levels: Levels,
}

#[derive(Clone, Copy)]
struct Levels {
    gzip: u32,
    br: u32,
    zstd: i32,
}

impl Compression {
    pub fn build(cfg: &CompressionConfig) -> Result<Compression, String> {
        let algorithms = cfg
            .algorithms
            .iter()
            .map(|a| Encoding::parse(a).ok_or_else(|| format!("compression.algorithms: {a:?}")))
            .collect::<Result<_, _>>()?;
        let types = cfg
            .types
            .iter()
            .map(|t| match t.strip_suffix('*') {
                Some(prefix) => (prefix.to_ascii_lowercase().into(), true),
                None => (t.to_ascii_lowercase().into(), false),
            })
            .collect();
        Ok(Compression {
            algorithms,
            min_size: cfg.min_size,
            types,
            levels: Levels {
                gzip: cfg.gzip_level,
                br: cfg.br_level,
                zstd: cfg.zstd_level,
            },
        })
    }

    /// The encoding for a request that sent this Accept-Encoding; None: identity.
    pub fn negotiate(&self, accept: Option<&[u8]>) -> Option<Encoding> {
        let accept = accept?;
        let mut best: Option<(u32, usize, Encoding)> = None;
        for (rank, &encoding) in self.algorithms.iter().enumerate() {
            let q = quality(accept, encoding.token());
            if q > 0 && best.is_none_or(|(bq, brank, _)| q > bq || (q == bq && rank < brank)) {
                best = Some((q, rank, encoding));
            }
        }
        best.map(|(_, _, e)| e)
    }

    /// Whether a response with this head is encoded (see the module doc).
    fn applies(&self, method: &Method, head: &response::Parts) -> bool {
        let status = head.status;
        if method == Method::HEAD
            || !status.is_success()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::PARTIAL_CONTENT
        {
            return false;
        }
        let h = &head.headers;
        if h.contains_key(header::CONTENT_ENCODING) || h.contains_key(header::CONTENT_RANGE) {
            return false;
        }
        let no_transform = h.get_all(header::CACHE_CONTROL).iter().any(|v| {
            v.as_bytes()
                .split(|&b| b == b',')
                .any(|d| d.trim_ascii().eq_ignore_ascii_case(b"no-transform"))
        });
        if no_transform {
            return false;
        }
        let length = h
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if length.is_some_and(|n| n < self.min_size) {
            return false;
        }
        let Some(kind) = h.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) else {
            return false;
        };
        let kind = kind
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        self.types.iter().any(|(t, prefix)| match prefix {
            true => kind.starts_with(&**t),
            false => kind == **t,
        })
    }

    fn encoder(&self, encoding: Encoding) -> io::Result<Encoder> {
        let out = Out::default();
        Ok(match encoding {
            Encoding::Gzip => Encoder::Gzip(
                flate2::write::GzEncoder::new(
                    out.clone(),
                    flate2::Compression::new(self.levels.gzip),
                ),
                out,
            ),
            Encoding::Br => Encoder::Br(
                Box::new(brotli::CompressorWriter::new(
                    out.clone(),
                    16 * 1024,
                    self.levels.br,
                    22,
                )),
                out,
            ),
            Encoding::Zstd => Encoder::Zstd(
                zstd::stream::write::Encoder::new(out.clone(), self.levels.zstd)?,
                out,
            ),
        })
    }
}

/// The q-value (in thousandths) `accept` gives `token`: its own entry, else `*`'s, else 0.
fn quality(accept: &[u8], token: &str) -> u32 {
    let mut star = 0;
    for item in accept.split(|&b| b == b',') {
        let mut parts = item.split(|&b| b == b';');
        let name = parts.next().unwrap_or_default().trim_ascii();
        let mut q = 1000;
        for param in parts {
            let param = param.trim_ascii();
            if let Some(v) = param
                .strip_prefix(b"q=")
                .or_else(|| param.strip_prefix(b"Q="))
            {
                q = parse_q(v);
            }
        }
        if name.eq_ignore_ascii_case(token.as_bytes()) {
            return q;
        }
        if name == b"*" {
            star = q;
        }
    }
    star
}

/// "0.8" -> 800; anything malformed -> 0 (not acceptable).
fn parse_q(v: &[u8]) -> u32 {
    let text = std::str::from_utf8(v).unwrap_or("");
    match text.parse::<f32>() {
        Ok(q) if (0.0..=1.0).contains(&q) => (q * 1000.0).round() as u32,
        _ => 0,
    }
}

/// The encoders' output, taken after each write.
#[derive(Clone, Default)]
struct Out(Rc<RefCell<Vec<u8>>>);

impl Write for Out {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.borrow_mut().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Out {
    fn take(&self) -> Bytes {
        Bytes::from(std::mem::take(&mut *self.0.borrow_mut()))
    }
}

enum Encoder {
    Gzip(flate2::write::GzEncoder<Out>, Out),
    Br(Box<brotli::CompressorWriter<Out>>, Out),
    Zstd(zstd::stream::write::Encoder<'static, Out>, Out),
}

impl Encoder {
    /// Encodes `data` and flushes, so what was given so far can be decoded on arrival.
    fn push(&mut self, data: &[u8]) -> io::Result<Bytes> {
        match self {
            Encoder::Gzip(e, out) => {
                e.write_all(data)?;
                e.flush()?;
                Ok(out.take())
            }
            Encoder::Br(e, out) => {
                e.write_all(data)?;
                e.flush()?;
                Ok(out.take())
            }
            Encoder::Zstd(e, out) => {
                e.write_all(data)?;
                e.flush()?;
                Ok(out.take())
            }
        }
    }

    fn finish(self) -> io::Result<Bytes> {
        match self {
            Encoder::Gzip(e, out) => {
                e.finish()?;
                Ok(out.take())
            }
            Encoder::Br(e, out) => {
                drop(e.into_inner());
                Ok(out.take())
            }
            Encoder::Zstd(e, out) => {
                e.finish()?;
                Ok(out.take())
            }
        }
    }
}

/// A response sink that encodes what passes when the request and the response allow it.
pub(crate) struct CompressingSink<'a, S: ResponseSink> {
    inner: &'a mut S,
    /// Set until the head: the config and the negotiated encoding.
    offer: Option<(&'a Compression, Encoding, Method)>,
    encoder: Option<Encoder>,
}

impl<'a, S: ResponseSink> CompressingSink<'a, S> {
    /// `offer`: the listener's compression and what the request accepts (None: passes all).
    pub fn new(inner: &'a mut S, offer: Option<(&'a Compression, Encoding, Method)>) -> Self {
        CompressingSink {
            inner,
            offer,
            encoder: None,
        }
    }
}

/// The head of an encoded response: the encoding said, the length dropped (it changes), caches
/// told the answer varies with Accept-Encoding, and a strong ETag made weak (the bytes differ).
fn encoded_head(head: &mut response::Parts, encoding: Encoding) {
    let h = &mut head.headers;
    h.remove(header::CONTENT_LENGTH);
    h.insert(
        header::CONTENT_ENCODING,
        HeaderValue::from_static(encoding.token()),
    );
    add_vary(h);
    if let Some(etag) = h.get(header::ETAG) {
        if !etag.as_bytes().starts_with(b"W/") {
            let mut weak = b"W/".to_vec();
            weak.extend_from_slice(etag.as_bytes());
            if let Ok(v) = HeaderValue::from_bytes(&weak) {
                h.insert(header::ETAG, v);
            }
        }
    }
}

/// `Vary: Accept-Encoding`, unless the response already varies by it (or by everything).
fn add_vary(h: &mut HeaderMap) {
    let varies = h.get_all(header::VARY).iter().any(|v| {
        v.as_bytes().split(|&b| b == b',').any(|t| {
            let t = t.trim_ascii();
            t.eq_ignore_ascii_case(b"accept-encoding") || t == b"*"
        })
    });
    if !varies {
        h.append(header::VARY, HeaderValue::from_static("Accept-Encoding"));
    }
}

impl<S: ResponseSink> ResponseSink for CompressingSink<'_, S> {
    async fn head(&mut self, mut head: response::Parts, end: bool) -> Result<(), ()> {
        if let Some((cfg, encoding, method)) = self.offer.take() {
            if !end && cfg.applies(&method, &head) {
                self.encoder = Some(cfg.encoder(encoding).map_err(|_| ())?);
                encoded_head(&mut head, encoding);
            } else if head.status.is_success()
                && method != Method::HEAD
                && !head.headers.contains_key(header::CONTENT_ENCODING)
            {
                // Not encoded this time, but it could have been: caches must know.
                add_vary(&mut head.headers);
            }
        }
        self.inner.head(head, end).await
    }

    async fn data(&mut self, data: Bytes, end: bool) -> Result<(), ()> {
        let Some(encoder) = self.encoder.as_mut() else {
            return self.inner.data(data, end).await;
        };
        let mut out = encoder.push(&data).map_err(|_| ())?;
        if end {
            let last = self.encoder.take().ok_or(())?.finish().map_err(|_| ())?;
            let mut whole = Vec::with_capacity(out.len() + last.len());
            whole.extend_from_slice(&out);
            whole.extend_from_slice(&last);
            out = Bytes::from(whole);
        } else if out.is_empty() {
            return Ok(());
        }
        self.inner.data(out, end).await
    }

    async fn trailers(&mut self, trailers: HeaderMap) -> Result<(), ()> {
        if let Some(encoder) = self.encoder.take() {
            let last = encoder.finish().map_err(|_| ())?;
            if !last.is_empty() {
                self.inner.data(last, false).await?;
            }
        }
        self.inner.trailers(trailers).await
    }

    async fn cancelled(&mut self) {
        self.inner.cancelled().await
    }

    fn reset(&mut self, reason: Reason) {
        self.inner.reset(reason)
    }

    fn started(&self) -> bool {
        self.inner.started()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(algorithms: &[&str]) -> Compression {
        Compression::build(&CompressionConfig {
            algorithms: algorithms.iter().map(|s| s.to_string()).collect(),
            min_size: 1024,
            types: vec!["text/*".into(), "application/json".into()],
            gzip_level: 6,
            br_level: 5,
            zstd_level: 3,
        })
        .unwrap()
    }

    #[test]
    fn q_values_choose_and_the_config_breaks_ties() {
        let c = config(&["zstd", "br", "gzip"]);
        let pick = |a: &str| c.negotiate(Some(a.as_bytes())).map(Encoding::token);
        assert_eq!(pick("gzip, deflate, br, zstd"), Some("zstd"));
        assert_eq!(pick("gzip, deflate, br"), Some("br"));
        assert_eq!(pick("gzip;q=1.0, br;q=0.5"), Some("gzip"));
        assert_eq!(pick("br;q=0, gzip;q=0.1"), Some("gzip"));
        assert_eq!(pick("*"), Some("zstd"));
        assert_eq!(pick("*;q=0.5, zstd;q=0"), Some("br"));
        assert_eq!(pick("identity"), None);
        assert_eq!(pick("gzip;q=nonsense"), None);
        assert_eq!(c.negotiate(None), None);
        assert_eq!(config(&["gzip"]).negotiate(Some(b"br")), None);
    }

    fn head(status: u16, fields: &[(&str, &str)]) -> response::Parts {
        let mut b = http::Response::builder().status(status);
        for (n, v) in fields {
            b = b.header(*n, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn what_is_never_encoded() {
        let c = config(&["gzip"]);
        let get = Method::GET;
        let text = ("content-type", "text/html; charset=utf-8");
        assert!(c.applies(&get, &head(200, &[text])));
        assert!(c.applies(&get, &head(200, &[text, ("content-length", "4096")])));
        assert!(!c.applies(&get, &head(200, &[text, ("content-length", "100")])));
        assert!(!c.applies(&Method::HEAD, &head(200, &[text])));
        assert!(!c.applies(&get, &head(206, &[text])));
        assert!(!c.applies(&get, &head(204, &[text])));
        assert!(!c.applies(&get, &head(304, &[text])));
        assert!(!c.applies(&get, &head(200, &[text, ("content-encoding", "gzip")])));
        assert!(!c.applies(
            &get,
            &head(200, &[text, ("content-range", "bytes 0-9/100")])
        ));
        assert!(!c.applies(
            &get,
            &head(200, &[text, ("cache-control", "public, no-transform")])
        ));
        assert!(!c.applies(&get, &head(200, &[("content-type", "image/png")])));
        assert!(c.applies(&get, &head(200, &[("content-type", "application/json")])));
        assert!(!c.applies(&get, &head(200, &[])));
    }

    #[test]
    fn the_head_of_an_encoded_response() {
        let mut h = head(
            200,
            &[
                ("content-length", "5000"),
                ("etag", "\"abc\""),
                ("vary", "Cookie"),
            ],
        );
        encoded_head(&mut h, Encoding::Br);
        assert!(h.headers.get("content-length").is_none());
        assert_eq!(h.headers["content-encoding"], "br");
        assert_eq!(h.headers["etag"], "W/\"abc\"");
        let vary: Vec<_> = h.headers.get_all("vary").iter().collect();
        assert_eq!(vary, ["Cookie", "Accept-Encoding"]);
    }

    #[test]
    fn each_encoder_round_trips_piece_by_piece() {
        let c = config(&["zstd", "br", "gzip"]);
        let text: Vec<u8> = (0..20_000).map(|i| b"fastlb compresses "[i % 18]).collect();
        for encoding in [Encoding::Gzip, Encoding::Br, Encoding::Zstd] {
            let mut e = c.encoder(encoding).unwrap();
            let mut wire = Vec::new();
            for piece in text.chunks(3000) {
                let out = e.push(piece).unwrap();
                assert!(
                    !out.is_empty(),
                    "{encoding:?}: a flushed piece is on the wire at once"
                );
                wire.extend_from_slice(&out);
            }
            wire.extend_from_slice(&e.finish().unwrap());
            let mut back = Vec::new();
            match encoding {
                Encoding::Gzip => {
                    io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&wire[..]), &mut back)
                        .unwrap();
                }
                Encoding::Br => {
                    io::Read::read_to_end(
                        &mut brotli::Decompressor::new(&wire[..], 4096),
                        &mut back,
                    )
                    .unwrap();
                }
                Encoding::Zstd => back = zstd::stream::decode_all(&wire[..]).unwrap(),
            }
            assert_eq!(back, text, "{encoding:?}");
            assert!(
                wire.len() < text.len() / 10,
                "{encoding:?}: {} bytes",
                wire.len()
            );
        }
    }
}
