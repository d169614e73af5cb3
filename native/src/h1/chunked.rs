//! Incremental scanner for `Transfer-Encoding: chunked` bodies (RFC 9112 7.1).
//!
//! The proxy forwards chunked bodies byte for byte; this only finds where the body ends, so no
//! byte of the next message on the connection is sent as part of this one. Chunk data is
//! skipped by count, never looked at, and the state is a few bytes so it survives any split of
//! the input.
//!
//! The framing around the data is held to the grammar, because a body the backend reads
//! differently from us is a way to smuggle requests:
//!
//! ```text
//! chunk          = chunk-size [ chunk-ext ] CRLF chunk-data CRLF
//! chunk-size     = 1*HEXDIG
//! chunk-ext      = *( BWS ";" BWS chunk-ext-name [ BWS "=" BWS chunk-ext-val ] )
//! chunk-ext-name = token
//! chunk-ext-val  = token / quoted-string
//! trailer-section = *( field-line CRLF )
//! field-line     = field-name ":" OWS field-value OWS
//! ```

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChunkError {
    /// No hex digits, or a byte after them that can start neither an extension nor a line end.
    BadSize,
    /// More than 16 hex digits.
    Overflow,
    /// Anything but CRLF where a line must end (a bare LF included).
    BadLineEnd,
    /// A chunk extension off the RFC 9112 7.1.1 grammar: ';' without a name, a byte that is
    /// neither a token character nor a delimiter the grammar allows there, '=' without a
    /// value, a quoted-string left open, whitespace not followed by ';' or '='.
    BadExtension,
    /// Chunk extensions (and whitespace before them) longer than `MAX_EXTENSION` bytes.
    ExtensionTooLong,
    /// A trailer line that is not a field line: no name, a name that is not a token, no
    /// colon, whitespace at the start of the line (obs-fold) or before the colon, a control
    /// byte other than HTAB in the value.
    BadTrailer,
    /// Trailer section longer than `MAX_TRAILERS` bytes.
    TrailersTooLarge,
}

/// Longest chunk extension accepted, counted over every byte between the size and the CR
/// (whitespace, ';' and '=' included): they are unused in practice, and a size line without
/// end would otherwise be read forever.
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
    /// BWS after the size or after an extension's value: only more BWS or ';' may follow.
    ExtWs,
    /// After ';': BWS, then the first byte of an extension name.
    ExtNameStart,
    /// Inside an extension name (a token).
    ExtName,
    /// BWS after a name: more BWS, '=' or ';'.
    ExtNameWs,
    /// After '=': BWS, then a token or a quoted-string.
    ExtValueStart,
    /// Inside a token value.
    ExtToken,
    /// Inside a quoted-string value.
    ExtQuoted,
    /// After a backslash in a quoted-string.
    ExtQuotedPair,
    /// Right after the closing quote: CR, ';' or BWS.
    ExtQuoteEnd,
    /// CR ending the size line seen.
    SizeLf,
    /// `remaining` bytes of chunk data to skip.
    Data,
    /// Chunk data done: CRLF must follow.
    DataCr,
    DataLf,
    /// At the start of a trailer line or of the final empty line.
    TrailerStart,
    /// Inside a trailer field name.
    TrailerName,
    /// After the colon of a trailer field line, up to CR.
    TrailerValue,
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

/// tchar (RFC 9110 5.6.2): the bytes of a token.
const TCHAR: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        t[b] = c.is_ascii_alphanumeric()
            || matches!(
                c,
                b'!' | b'#'
                    | b'$'
                    | b'%'
                    | b'&'
                    | b'\''
                    | b'*'
                    | b'+'
                    | b'-'
                    | b'.'
                    | b'^'
                    | b'_'
                    | b'`'
                    | b'|'
                    | b'~'
            );
        b += 1;
    }
    t
};

#[inline]
fn is_tchar(b: u8) -> bool {
    TCHAR[b as usize]
}

/// HTAB / SP / VCHAR / obs-text: what a field value, a quoted-string's qdtext (less '"' and
/// '\\', which callers match first) and a quoted-pair's second byte may hold. Everything but
/// the other control bytes and DEL.
#[inline]
fn is_text(b: u8) -> bool {
    b == b'\t' || (b >= b' ' && b != 0x7f)
}

#[inline]
fn is_ws(b: u8) -> bool {
    b == b' ' || b == b'\t'
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

    /// Like `feed`, but hands the chunk data (without the framing) to `data`: for a body that
    /// leaves HTTP/1 (toward an HTTP/2 peer, which frames it itself). Trailers are dropped.
    pub fn dechunk(
        &mut self,
        input: &[u8],
        mut data: impl FnMut(&[u8]),
    ) -> Result<(usize, bool), ChunkError> {
        let mut i = 0;
        while i < input.len() {
            if self.state == State::Data {
                let n = (self.remaining as usize).min(input.len() - i);
                data(&input[i..i + n]);
                self.feed(&input[i..i + n])?;
                i += n;
                continue;
            }
            // Framing bytes one at a time: a size line is a few bytes, and each stop leaves
            // the state at the data that follows.
            let (k, done) = self.feed(&input[i..i + 1])?;
            i += k;
            if done {
                return Ok((i, true));
            }
        }
        Ok((i, self.is_done()))
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
                // From here `count` counts extension bytes, this one included.
                self.count = 1;
                self.state = match b {
                    b'\r' => State::SizeLf,
                    b';' => State::ExtNameStart,
                    b' ' | b'\t' => State::ExtWs,
                    b'\n' => return Err(ChunkError::BadLineEnd),
                    _ => return Err(ChunkError::BadSize),
                };
            }
            State::ExtWs
            | State::ExtNameStart
            | State::ExtName
            | State::ExtNameWs
            | State::ExtValueStart
            | State::ExtToken
            | State::ExtQuoted
            | State::ExtQuotedPair
            | State::ExtQuoteEnd => self.state = self.ext(b)?,
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
            State::TrailerStart
            | State::TrailerName
            | State::TrailerValue
            | State::TrailerLf
            | State::FinalLf => {
                self.count += 1;
                if self.count > MAX_TRAILERS {
                    return Err(ChunkError::TrailersTooLarge);
                }
                self.state = match (self.state, b) {
                    (State::TrailerStart, b'\r') => State::FinalLf,
                    (State::FinalLf, b'\n') => State::Done,
                    // field-name = token; a line starting with SP/HTAB is obs-fold, and
                    // whitespace before the colon is refused as in a head (RFC 9112 5.1).
                    (State::TrailerStart | State::TrailerName, b) if is_tchar(b) => {
                        State::TrailerName
                    }
                    (State::TrailerName, b':') => State::TrailerValue,
                    (State::TrailerValue, b'\r') => State::TrailerLf,
                    // OWS field-value OWS: the whitespace is text too.
                    (State::TrailerValue, b) if is_text(b) => State::TrailerValue,
                    (State::TrailerLf, b'\n') => State::TrailerStart,
                    (_, b'\n') | (State::TrailerLf | State::FinalLf, _) => {
                        return Err(ChunkError::BadLineEnd)
                    }
                    _ => return Err(ChunkError::BadTrailer),
                };
            }
            State::Data | State::Done | State::Failed(_) => unreachable!("handled in scan"),
        }
        Ok(())
    }

    /// The state after byte `b` of a chunk extension (RFC 9112 7.1.1), counting it against
    /// `MAX_EXTENSION`. The line may only end after a name or a value.
    #[inline]
    fn ext(&mut self, b: u8) -> Result<State, ChunkError> {
        match b {
            b'\n' => return Err(ChunkError::BadLineEnd),
            b'\r' => {
                return match self.state {
                    State::ExtName | State::ExtToken | State::ExtQuoteEnd => Ok(State::SizeLf),
                    _ => Err(ChunkError::BadExtension),
                }
            }
            _ => {}
        }
        self.count += 1;
        if self.count > MAX_EXTENSION {
            return Err(ChunkError::ExtensionTooLong);
        }
        Ok(match (self.state, b) {
            (State::ExtWs | State::ExtNameStart | State::ExtNameWs | State::ExtValueStart, b)
                if is_ws(b) =>
            {
                self.state
            }
            (State::ExtWs | State::ExtName | State::ExtNameWs, b';') => State::ExtNameStart,
            (State::ExtToken | State::ExtQuoteEnd, b';') => State::ExtNameStart,
            (State::ExtNameStart | State::ExtName, b) if is_tchar(b) => State::ExtName,
            (State::ExtName, b) if is_ws(b) => State::ExtNameWs,
            (State::ExtName | State::ExtNameWs, b'=') => State::ExtValueStart,
            (State::ExtValueStart, b'"') => State::ExtQuoted,
            (State::ExtValueStart | State::ExtToken, b) if is_tchar(b) => State::ExtToken,
            (State::ExtToken | State::ExtQuoteEnd, b) if is_ws(b) => State::ExtWs,
            (State::ExtQuoted, b'"') => State::ExtQuoteEnd,
            (State::ExtQuoted, b'\\') => State::ExtQuotedPair,
            (State::ExtQuoted | State::ExtQuotedPair, b) if is_text(b) => State::ExtQuoted,
            _ => return Err(ChunkError::BadExtension),
        })
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
        // Extensions: BWS around ';' and '=', token and quoted values, quoted-pairs,
        // obs-text, every tchar.
        b"2;a=b;c=\"d e\"\r\nab\r\n0\r\n\r\n",
        b"2 \t; a = b ;c\t=\t\"\" ; d\r\nab\r\n0\r\n\r\n",
        b"2;q=\"a\\\"b\\\\c\\\td\\\xff\";r=\"\xe9\t!#[]~\"\r\nab\r\n0\r\n\r\n",
        b"2;!#$%&'*+-.^_`|~09AZaz=!#$%&'*+-.^_`|~09AZaz\r\nab\r\n0\r\n\r\n",
        b"2;a;b;c=d\r\nab\r\n0;last=\"x\"\r\n\r\n",
        // Trailers: empty value, OWS, obs-text, HTAB inside.
        b"0\r\nA:\r\nB:  \t\r\nC: x\ty \xe9 \r\n!#$%&'*+-.^_`|~:v\r\n\r\n",
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
            b"5,\r\nhello\r\n",
            b"5=a\r\nhello\r\n",
            b"5\"a\"\r\nhello\r\n",
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
    fn bad_extension() {
        for s in [
            // ';' without a name (the reported gap), also before another one or at the end.
            &b"2;\r\nab\r\n0\r\n\r\n"[..],
            b"2; \r\nab\r\n",
            b"2;;a\r\nab\r\n",
            b"2;a;\r\nab\r\n",
            b"2;=b\r\nab\r\n",
            // '=' without a value.
            b"2;a=\r\nab\r\n",
            b"2;a= \r\nab\r\n",
            b"2;a=;b\r\nab\r\n",
            // An unbalanced quoted-string (the other reported gap), an escape at the line end.
            b"2;a=\"b\r\nab\r\n0\r\n\r\n",
            b"2;a=\"b\\\"\r\nab\r\n",
            b"2;a=\"b\\\r\nab\r\n",
            b"2;a=\"\r\nab\r\n",
            // Quotes next to tokens, two values.
            b"2;a=b\"c\"\r\nab\r\n",
            b"2;a=\"b\"c\r\nab\r\n",
            b"2;a=\"b\"\"c\"\r\nab\r\n",
            b"2;a=b=c\r\nab\r\n",
            b"2;\"a\"=b\r\nab\r\n",
            // Bytes that are no tchar in a name or token value.
            b"2;a@b\r\nab\r\n",
            b"2;a=b@\r\nab\r\n",
            b"2;a/b\r\nab\r\n",
            b"2;a=(b)\r\nab\r\n",
            b"2;a\xe9\r\nab\r\n",
            b"2;a=\xe9\r\nab\r\n",
            // Control bytes, in names, values and quoted-strings (HTAB is BWS, not a name).
            b"2;a\0b\r\nab\r\n",
            b"2;a\x01\r\nab\r\n",
            b"2;a\x7f\r\nab\r\n",
            b"2;a=\"\x01\"\r\nab\r\n",
            b"2;a=\"\x7f\"\r\nab\r\n",
            b"2;a=\"\\\x00\"\r\nab\r\n",
            // BWS that leads to neither ';' nor '=' (trailing, or between two names).
            b"2 \r\nab\r\n",
            b"2\t\r\nab\r\n",
            b"2 5\r\nab\r\n",
            b"2 a\r\nab\r\n",
            b"2;a \r\nab\r\n",
            b"2;a b\r\nab\r\n",
            b"2;a=b \r\nab\r\n",
            b"2;a=b c\r\nab\r\n",
            b"2;a=\"b\" \r\nab\r\n",
            // On the last chunk too.
            b"2\r\nab\r\n0;\r\n\r\n",
        ] {
            assert_eq!(err(s), ChunkError::BadExtension, "{s:?}");
        }
        // A bare LF inside an extension is a line-end error wherever it comes.
        for s in [&b"2;a=\"b\nab"[..], b"2;\n", b"2;a=\n", b"2 \n"] {
            assert_eq!(err(s), ChunkError::BadLineEnd, "{s:?}");
        }
    }

    /// The state machine against the grammar written as a regular expression, over random
    /// size lines made of the bytes that matter; each is fed whole and byte by byte.
    #[test]
    fn extensions_match_the_grammar() {
        let tchar = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]";
        let grammar = format!(
            r#"(?s-u)\A[0-9a-fA-F]{{1,16}}(?:[ \t]*;[ \t]*{tchar}+(?:[ \t]*=[ \t]*(?:{tchar}+|"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*"))?)*\z"#
        );
        let re = regex::bytes::Regex::new(&grammar).unwrap();
        let alphabet = b"0;; \t==\"\"\\aa@\x01\x7f\x80\r";
        let mut rng = fastrand::Rng::with_seed(11);
        let mut valid = 0;
        for _ in 0..50_000 {
            let mut line = b"1".to_vec();
            for _ in 0..rng.usize(0..10) {
                line.push(alphabet[rng.usize(..alphabet.len())]);
            }
            // The size is never 0, so a good line leaves the decoder in the chunk's data.
            let mut body = line.clone();
            body.extend_from_slice(b"\r\n");
            if re.is_match(&line) {
                valid += 1;
                assert_eq!(whole(&body), Ok((body.len(), false)), "{line:?}");
                assert_eq!(pieces(&body, std::iter::repeat(1)), Ok((body.len(), false)));
            } else {
                err(&body);
            }
        }
        assert!(valid > 1000, "too few valid samples: {valid}");
    }

    #[test]
    fn extension_length() {
        // Every byte between the size and the CR counts, ';' included.
        let mut ok = b"5;".to_vec();
        ok.extend(std::iter::repeat_n(b'a', MAX_EXTENSION as usize - 1));
        ok.extend_from_slice(b"\r\nhello\r\n0\r\n\r\n");
        assert_eq!(whole(&ok), Ok((ok.len(), true)));

        let mut long = b"5;".to_vec();
        long.extend(std::iter::repeat_n(b'a', MAX_EXTENSION as usize));
        assert_eq!(err(&long), ChunkError::ExtensionTooLong);
        // Whitespace before ';' counts too, so it cannot run on forever.
        let mut ws = b"5".to_vec();
        ws.extend(std::iter::repeat_n(b' ', 5000));
        assert_eq!(err(&ws), ChunkError::ExtensionTooLong);
        // And so do BWS after ';' or '=' and a quoted-string that never closes.
        for start in [&b"5;"[..], b"5;a=", b"5;a=\"", b"5;a "] {
            let mut s = start.to_vec();
            let fill = if start.ends_with(b"\"") { b'q' } else { b' ' };
            s.extend(std::iter::repeat_n(fill, 5000));
            assert_eq!(err(&s), ChunkError::ExtensionTooLong, "{start:?}");
        }
        // The count starts over at each chunk.
        let mut two = ok[..ok.len() - 5].to_vec();
        two.extend_from_slice(&ok);
        assert_eq!(whole(&two), Ok((two.len(), true)));
    }

    #[test]
    fn bad_trailer() {
        for s in [
            // No colon.
            &b"0\r\nNoColon\r\n\r\n"[..],
            b"0\r\nX\r\n\r\n",
            // obs-fold: a line starting with SP or HTAB, first or after a field.
            b"0\r\n X: y\r\n\r\n",
            b"0\r\n\tX: y\r\n\r\n",
            b"0\r\nX: y\r\n z\r\n\r\n",
            b"0\r\nX: y\r\n\tz\r\n\r\n",
            // Empty name, whitespace before the colon, a name that is not a token.
            b"0\r\n: y\r\n\r\n",
            b"0\r\nX : y\r\n\r\n",
            b"0\r\nX\t: y\r\n\r\n",
            b"0\r\nX Y: z\r\n\r\n",
            b"0\r\nX@: y\r\n\r\n",
            b"0\r\nX\xe9: y\r\n\r\n",
            b"0\r\n\"X\": y\r\n\r\n",
            // Control bytes other than HTAB in a value.
            b"0\r\nX: a\0b\r\n\r\n",
            b"0\r\nX: a\x01\r\n\r\n",
            b"0\r\nX: a\x1f\r\n\r\n",
            b"0\r\nX: a\x7f\r\n\r\n",
            // After a good field.
            b"0\r\nA: b\r\nbad\r\n\r\n",
        ] {
            assert_eq!(err(s), ChunkError::BadTrailer, "{s:?}");
        }
    }

    /// Trailer lines against `field-name ":" OWS field-value OWS`, as for extensions.
    #[test]
    fn trailers_match_the_grammar() {
        let re = regex::bytes::Regex::new(
            r"(?s-u)\A[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[\t\x20-\x7e\x80-\xff]*\z",
        )
        .unwrap();
        let alphabet = b"aa::  \t@\x01\x7f\x80\"";
        let mut rng = fastrand::Rng::with_seed(13);
        let mut valid = 0;
        for _ in 0..50_000 {
            // Half of them start with a name, so that enough are valid.
            let mut line = if rng.bool() {
                b"a".to_vec()
            } else {
                Vec::new()
            };
            line.extend((0..rng.usize(1..8)).map(|_| alphabet[rng.usize(..alphabet.len())]));
            let mut body = b"0\r\nA: b\r\n".to_vec();
            body.extend_from_slice(&line);
            body.extend_from_slice(b"\r\n\r\n");
            if re.is_match(&line) {
                valid += 1;
                assert_eq!(whole(&body), Ok((body.len(), true)), "{line:?}");
                assert_eq!(pieces(&body, std::iter::repeat(1)), Ok((body.len(), true)));
            } else {
                assert_eq!(err(&body), ChunkError::BadTrailer, "{line:?}");
            }
        }
        assert!(valid > 1000, "too few valid samples: {valid}");
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

    #[test]
    fn dechunk_yields_the_data_without_framing_across_any_split() {
        let body = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nx-t: 1\r\n\r\nNEXT";
        for split in 1..body.len() {
            let mut d = ChunkedDecoder::new();
            let mut out = Vec::new();
            let (a, done_a) = d
                .dechunk(&body[..split], |b| out.extend_from_slice(b))
                .unwrap();
            assert_eq!(a, split.min(body.len() - 4));
            let (b, done) = if done_a {
                (0, true)
            } else {
                d.dechunk(&body[split..], |b| out.extend_from_slice(b))
                    .unwrap()
            };
            assert!(done);
            assert_eq!(a + b, body.len() - 4, "split at {split}");
            assert_eq!(out, b"hello world");
        }
    }
}
