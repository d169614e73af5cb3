//! Incremental scanner for `Transfer-Encoding: chunked` bodies (RFC 9112 7.1).
//!
//! The proxy forwards chunked bodies byte for byte; this only finds where the body ends, so no
//! byte of the next message on the connection is sent as part of this one. Chunk data is
//! skipped by count, never looked at, and the state is a few bytes so it survives any split of
//! the input.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChunkError {
    /// No hex digits, a non-hex byte, or a control byte in an extension.
    BadSize,
    /// More than 16 hex digits.
    Overflow,
    /// Anything but CRLF where a line must end (a bare LF included).
    BadLineEnd,
    /// Chunk extensions (and whitespace before them) longer than `MAX_EXTENSION` bytes.
    ExtensionTooLong,
    /// Trailer section longer than `MAX_TRAILERS` bytes.
    TrailersTooLarge,
}

/// Longest chunk extension accepted: they are unused in practice, and a size line without end
/// would otherwise be read forever.
const MAX_EXTENSION: u32 = 4096;
/// Largest trailer section accepted, counted from the first byte after the last chunk's size
/// line to the final LF.
const MAX_TRAILERS: u32 = 16 * 1024;
/// 16 hex digits always fit in a u64, so counting digits is the whole overflow check.
const MAX_SIZE_DIGITS: u32 = 16;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum State {
    /// Hex digits of a chunk size; `count` digits so far, value in `remaining`.
    #[default]
    Size,
    /// SP/HTAB after the digits: only more whitespace or ';' may follow.
    SizeWs,
    /// Chunk extension after ';', up to CR.
    Ext,
    /// CR ending the size line seen.
    SizeLf,
    /// `remaining` bytes of chunk data to skip.
    Data,
    /// Chunk data done: CRLF must follow.
    DataCr,
    DataLf,
    /// At the start of a trailer line or of the final empty line.
    TrailerStart,
    /// Inside a trailer field line.
    Trailer,
    /// CR ending a trailer line seen.
    TrailerLf,
    /// CR of the final empty line seen.
    FinalLf,
    Done,
    /// Errors are sticky: the stream is no longer framed.
    Failed(ChunkError),
}

/// Follows a chunked body as it streams through, without copying it: tells the proxy where the
/// body ends so that no byte of the next message is forwarded as part of this one.
#[derive(Clone, Debug, Default)]
pub struct ChunkedDecoder {
    state: State,
    /// Chunk size being read, then data bytes still to skip.
    remaining: u64,
    /// Size digits, extension bytes or trailer bytes, depending on `state`.
    count: u32,
}

#[inline]
fn hex(b: u8) -> Option<u64> {
    match b {
        b'0'..=b'9' => Some(u64::from(b - b'0')),
        b'a'..=b'f' => Some(u64::from(b - b'a' + 10)),
        b'A'..=b'F' => Some(u64::from(b - b'A' + 10)),
        _ => None,
    }
}

impl ChunkedDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Scans `data`, the next bytes of the body. Returns (n, done): the first n bytes of `data`
    /// belong to the body (n == data.len() unless the body ends inside `data`); done = the last
    /// chunk and the trailer section have been seen. After an error every call returns it
    /// again.
    pub fn feed(&mut self, data: &[u8]) -> Result<(usize, bool), ChunkError> {
        if let State::Failed(e) = self.state {
            return Err(e);
        }
        self.scan(data)
            .inspect_err(|&e| self.state = State::Failed(e))
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    fn scan(&mut self, data: &[u8]) -> Result<(usize, bool), ChunkError> {
        let mut i = 0;
        while i < data.len() {
            match self.state {
                State::Done => break,
                State::Data => {
                    // Data is skipped by count; the cast is safe as take <= data.len().
                    let take = self.remaining.min((data.len() - i) as u64);
                    i += take as usize;
                    self.remaining -= take;
                    if self.remaining == 0 {
                        self.state = State::DataCr;
                    }
                    continue;
                }
                _ => {}
            }
            let b = data[i];
            i += 1;
            self.step(b)?;
        }
        Ok((i, self.state == State::Done))
    }

    /// Advances over one byte of framing (everything but chunk data).
    #[inline]
    fn step(&mut self, b: u8) -> Result<(), ChunkError> {
        match self.state {
            State::Size => {
                if let Some(d) = hex(b) {
                    if self.count == MAX_SIZE_DIGITS {
                        return Err(ChunkError::Overflow);
                    }
                    self.remaining = (self.remaining << 4) | d;
                    self.count += 1;
                    return Ok(());
                }
                if self.count == 0 {
                    return Err(ChunkError::BadSize);
                }
                self.count = 0;
                self.state = match b {
                    b'\r' => State::SizeLf,
                    b';' => State::Ext,
                    b' ' | b'\t' => {
                        self.count = 1;
                        State::SizeWs
                    }
                    b'\n' => return Err(ChunkError::BadLineEnd),
                    _ => return Err(ChunkError::BadSize),
                };
            }
            State::SizeWs => match b {
                b' ' | b'\t' => self.ext_byte()?,
                b';' => self.state = State::Ext,
                // BWS is only allowed before ';' (RFC 9112 7.1.1); "5 \r\n" is refused rather
                // than guessed at.
                _ => return Err(ChunkError::BadSize),
            },
            State::Ext => match b {
                b'\r' => self.state = State::SizeLf,
                b'\n' => return Err(ChunkError::BadLineEnd),
                b'\t' => self.ext_byte()?,
                0..=0x1f | 0x7f => return Err(ChunkError::BadSize),
                _ => self.ext_byte()?,
            },
            State::SizeLf => {
                if b != b'\n' {
                    return Err(ChunkError::BadLineEnd);
                }
                self.count = 0;
                self.state = if self.remaining == 0 {
                    State::TrailerStart
                } else {
                    State::Data
                };
            }
            State::DataCr => {
                if b != b'\r' {
                    return Err(ChunkError::BadLineEnd);
                }
                self.state = State::DataLf;
            }
            State::DataLf => {
                if b != b'\n' {
                    return Err(ChunkError::BadLineEnd);
                }
                self.count = 0;
                self.state = State::Size;
            }
            State::TrailerStart | State::Trailer | State::TrailerLf | State::FinalLf => {
                self.count += 1;
                if self.count > MAX_TRAILERS {
                    return Err(ChunkError::TrailersTooLarge);
                }
                self.state = match (self.state, b) {
                    (State::TrailerStart, b'\r') => State::FinalLf,
                    (State::FinalLf, b'\n') => State::Done,
                    (State::Trailer, b'\r') => State::TrailerLf,
                    (State::TrailerLf, b'\n') => State::TrailerStart,
                    (State::TrailerStart | State::Trailer, b) if b != b'\n' => State::Trailer,
                    _ => return Err(ChunkError::BadLineEnd),
                };
            }
            State::Data | State::Done | State::Failed(_) => unreachable!("handled in scan"),
        }
        Ok(())
    }

    #[inline]
    fn ext_byte(&mut self) -> Result<(), ChunkError> {
        self.count += 1;
        if self.count > MAX_EXTENSION {
            return Err(ChunkError::ExtensionTooLong);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn whole(body: &[u8]) -> Result<(usize, bool), ChunkError> {
        ChunkedDecoder::new().feed(body)
    }

    /// Feeds `data` in the given piece sizes; returns bytes taken in total and done, or the
    /// first error.
    fn pieces(
        data: &[u8],
        sizes: impl IntoIterator<Item = usize>,
    ) -> Result<(usize, bool), ChunkError> {
        let mut d = ChunkedDecoder::new();
        let mut off = 0;
        let mut sizes = sizes.into_iter();
        while off < data.len() {
            let n = sizes
                .next()
                .unwrap_or(data.len())
                .clamp(1, data.len() - off);
            let (used, done) = d.feed(&data[off..off + n])?;
            assert!(used <= n);
            off += used;
            assert_eq!(done, d.is_done());
            if done {
                assert_eq!(d.feed(&data[off..]), Ok((0, true)));
                return Ok((off, true));
            }
            assert_eq!(used, n, "took less than offered without finishing");
        }
        Ok((off, d.is_done()))
    }

    fn err(data: &[u8]) -> ChunkError {
        let e = whole(data).expect_err("expected an error");
        // The same error whichever way the bytes arrive.
        assert_eq!(pieces(data, std::iter::repeat(1)), Err(e));
        e
    }

    const BODIES: &[&[u8]] = &[
        b"0\r\n\r\n",
        b"5\r\nhello\r\n0\r\n\r\n",
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        b"A\r\n0123456789\r\na\r\n0123456789\r\n0\r\n\r\n",
        b"005\r\nhello\r\n000\r\n\r\n",
        b"5;name=value\r\nhello\r\n0;x\r\n\r\n",
        b"5 ;a=\"q\"\r\nhello\r\n0\t; b\r\n\r\n",
        b"5\r\nhello\r\n0\r\nX-Trailer: a\r\nY: b\r\n\r\n",
        b"3\r\n\r\n\r\r\n0\r\n\r\n",
    ];

    #[test]
    fn whole_bodies() {
        for body in BODIES {
            assert_eq!(whole(body), Ok((body.len(), true)), "{body:?}");
        }
    }

    #[test]
    fn stops_at_body_end() {
        for body in BODIES {
            let mut data = body.to_vec();
            data.extend_from_slice(b"GET /next HTTP/1.1\r\n\r\n");
            let mut d = ChunkedDecoder::new();
            assert_eq!(d.feed(&data), Ok((body.len(), true)));
            assert!(d.is_done());
            // Nothing more is taken once done.
            assert_eq!(d.feed(b"more"), Ok((0, true)));
            assert_eq!(pieces(&data, std::iter::repeat(1)), Ok((body.len(), true)));
        }
    }

    #[test]
    fn byte_by_byte_and_random_splits() {
        let mut rng = fastrand::Rng::with_seed(7);
        for body in BODIES {
            let mut data = body.to_vec();
            data.extend_from_slice(b"0\r\n\r\nnext");
            let want = Ok((body.len(), true));
            assert_eq!(whole(&data), want);
            assert_eq!(pieces(&data, std::iter::repeat(1)), want);
            for _ in 0..200 {
                let sizes: Vec<usize> = (0..data.len()).map(|_| rng.usize(1..8)).collect();
                assert_eq!(pieces(&data, sizes), want, "{body:?}");
            }
        }
    }

    #[test]
    fn incomplete_is_not_done() {
        let body = b"5\r\nhello\r\n0\r\n\r\n";
        for cut in 0..body.len() {
            let mut d = ChunkedDecoder::new();
            assert_eq!(d.feed(&body[..cut]), Ok((cut, false)), "cut at {cut}");
            assert!(!d.is_done());
            assert_eq!(d.feed(&body[cut..]), Ok((body.len() - cut, true)));
        }
        assert_eq!(ChunkedDecoder::new().feed(b""), Ok((0, false)));
    }

    #[test]
    fn large_chunk_skipped_by_count() {
        let mut d = ChunkedDecoder::new();
        assert_eq!(d.feed(b"10000\r\n"), Ok((7, false)));
        // Chunk data is not inspected: framing-looking bytes inside it are just data.
        let data = vec![b'\n'; 0x10000];
        for part in data.chunks(1000) {
            assert_eq!(d.feed(part), Ok((part.len(), false)));
        }
        assert_eq!(d.feed(b"\r\n0\r\n\r\nX"), Ok((7, true)));
        // The largest size that fits is accepted.
        let mut d = ChunkedDecoder::new();
        assert_eq!(d.feed(b"ffffffffffffffff\r\nab"), Ok((20, false)));
        assert_eq!(d.remaining, u64::MAX - 2);
    }

    #[test]
    fn bad_size() {
        for s in [
            &b"\r\n"[..],
            b";ext\r\n",
            b"g\r\n",
            b"+5\r\nhello\r\n",
            b"-5\r\nhello\r\n",
            b"0x5\r\nhello\r\n",
            b" 5\r\nhello\r\n",
            b"5 \r\nhello\r\n",
            b"5 5\r\nhello\r\n",
            b"5,\r\nhello\r\n",
            b"5;a\0b\r\nhello\r\n",
            b"5;a\x01\r\nhello\r\n",
            b"5;a\x7f\r\nhello\r\n",
            b"5\r\nhello\r\nz\r\n",
        ] {
            assert_eq!(err(s), ChunkError::BadSize, "{s:?}");
        }
    }

    #[test]
    fn overflow() {
        assert_eq!(err(b"10000000000000000\r\n"), ChunkError::Overflow);
        assert_eq!(err(b"00000000000000005\r\n"), ChunkError::Overflow);
        assert_eq!(
            err(b"123456789012345678901234567890\r\n"),
            ChunkError::Overflow
        );
    }

    #[test]
    fn bad_line_end() {
        for s in [
            &b"5\nhello\r\n0\r\n\r\n"[..],
            b"5\rhello\r\n",
            b"5;ext\nhello\r\n",
            b"5;a\rb\r\nhello\r\n",
            b"5\r\nhelloX\r\n",
            b"5\r\nhello\n0\r\n\r\n",
            b"5\r\nhello\rX",
            b"0\r\n\n",
            b"0\r\n\rX",
            b"0\r\nX: y\n\r\n",
            b"0\r\nX: y\rz\r\n\r\n",
            b"0\r\nX: y\r\n\n",
        ] {
            assert_eq!(err(s), ChunkError::BadLineEnd, "{s:?}");
        }
    }

    #[test]
    fn extension_length() {
        let mut ok = b"5;".to_vec();
        ok.extend(std::iter::repeat_n(b'a', 4096));
        ok.extend_from_slice(b"\r\nhello\r\n0\r\n\r\n");
        assert_eq!(whole(&ok), Ok((ok.len(), true)));

        let mut long = b"5;".to_vec();
        long.extend(std::iter::repeat_n(b'a', 4097));
        assert_eq!(err(&long), ChunkError::ExtensionTooLong);
        // Whitespace before ';' counts too, so it cannot run on forever.
        let mut ws = b"5".to_vec();
        ws.extend(std::iter::repeat_n(b' ', 5000));
        assert_eq!(err(&ws), ChunkError::ExtensionTooLong);
    }

    #[test]
    fn trailer_size() {
        // 255 lines of 64 bytes, one of `last` bytes, and the final CRLF.
        let trailers = |last: usize| {
            let mut t = b"0\r\n".to_vec();
            let line = |n: usize| format!("X-Pad: {}\r\n", "a".repeat(n - 9)).into_bytes();
            for _ in 0..255 {
                t.extend(line(64));
            }
            t.extend(line(last));
            t.extend_from_slice(b"\r\n");
            t
        };
        // Exactly MAX_TRAILERS bytes after the last size line.
        let ok = trailers(62);
        assert_eq!(ok.len() - 3, MAX_TRAILERS as usize);
        assert_eq!(whole(&ok), Ok((ok.len(), true)));
        assert_eq!(err(&trailers(63)), ChunkError::TrailersTooLarge);
    }

    #[test]
    fn errors_are_sticky() {
        let mut d = ChunkedDecoder::new();
        assert_eq!(d.feed(b"x"), Err(ChunkError::BadSize));
        assert_eq!(d.feed(b"0\r\n\r\n"), Err(ChunkError::BadSize));
        assert!(!d.is_done());
    }
}
