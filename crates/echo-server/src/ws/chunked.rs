//! Decoding a chunked request body (RFC 9112 §7.1), bytes at a time.
//!
//! The body arrives in whatever pieces TCP delivers, so the decoder is a
//! state machine fed slices: it consumes what it can, appends chunk data to
//! the body, and says how much it consumed; the caller keeps the rest and
//! reads more. `httparse` parses the size lines (with their extensions,
//! which are ignored, as the RFC allows) and the trailer fields.
//!
//! Every limit is checked before the bytes are held: the declared size of a
//! chunk against what the body may still grow by, a size line and the
//! trailer section against their own caps. A client cannot make the
//! decoder hold more than those limits, whatever it sends.

/// A size line (hex digits and extensions) longer than this is refused:
/// extensions are ignored anyway, and a line that never ends must not grow.
pub(crate) const MAX_SIZE_LINE: usize = 4096;

/// Why a chunked body was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ChunkError {
    /// Not chunked encoding: HTTP 400.
    Malformed,
    /// The decoded body would exceed its limit: HTTP 413.
    BodyTooLarge,
    /// The trailer section exceeds the head limits: HTTP 431.
    TrailersTooLarge,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Expecting a chunk-size line.
    Size,
    /// This many bytes of chunk data still to come.
    Data(u64),
    /// Expecting the CRLF that ends a chunk's data.
    DataEnd,
    /// After the last chunk: trailer fields, then an empty line.
    Trailers,
    Done,
}

/// One header or trailer field as received: its name, and its value's bytes.
pub(crate) type Field = (String, Vec<u8>);

/// The state of one chunked body being decoded.
#[derive(Debug)]
pub(crate) struct ChunkedDecoder {
    state: State,
    /// Bytes of data decoded so far.
    decoded: u64,
    max_body: u64,
    max_trailer_bytes: usize,
    max_trailers: usize,
}

impl ChunkedDecoder {
    /// A decoder for a body of at most `max_body` bytes, with a trailer
    /// section of at most `max_trailer_bytes` bytes and `max_trailers` fields
    /// (the request head's limits).
    pub(crate) fn new(max_body: u64, max_trailer_bytes: usize, max_trailers: usize) -> ChunkedDecoder {
        ChunkedDecoder { state: State::Size, decoded: 0, max_body, max_trailer_bytes, max_trailers }
    }

    /// Whether the whole body, trailers included, has been decoded.
    pub(crate) fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Consumes what it can of `input`, appending chunk data to `body` and
    /// trailer fields to `trailers`; returns how many bytes it consumed.
    /// Fewer than `input.len()` means it needs more bytes (or is done: the
    /// rest belongs to the next request).
    pub(crate) fn decode(
        &mut self,
        input: &[u8],
        body: &mut Vec<u8>,
        trailers: &mut Vec<Field>,
    ) -> Result<usize, ChunkError> {
        let mut at = 0;
        loop {
            let rest = &input[at..];
            let used = match self.state {
                State::Done => return Ok(at),
                State::Size => self.size_line(rest)?,
                State::Data(left) => {
                    let n = left.min(rest.len() as u64) as usize;
                    body.extend_from_slice(&rest[..n]);
                    self.state = if n as u64 == left { State::DataEnd } else { State::Data(left - n as u64) };
                    Some(n)
                }
                State::DataEnd => match rest {
                    [b'\r', b'\n', ..] => {
                        self.state = State::Size;
                        Some(2)
                    }
                    [] | [b'\r'] => None,
                    _ => return Err(ChunkError::Malformed),
                },
                State::Trailers => self.trailer_section(rest, trailers)?,
            };
            match used {
                Some(n) if n > 0 => at += n,
                _ => return Ok(at),
            }
        }
    }

    /// A chunk-size line: `Some(len)` when complete, `None` for more bytes.
    fn size_line(&mut self, rest: &[u8]) -> Result<Option<usize>, ChunkError> {
        // httparse takes a line with no digits for size 0; the grammar does not.
        if rest.first().is_some_and(|b| !b.is_ascii_hexdigit()) {
            return Err(ChunkError::Malformed);
        }
        match httparse::parse_chunk_size(rest) {
            Ok(httparse::Status::Complete((len, size))) => {
                if size > self.max_body - self.decoded {
                    return Err(ChunkError::BodyTooLarge);
                }
                self.decoded += size;
                self.state = if size == 0 { State::Trailers } else { State::Data(size) };
                Ok(Some(len))
            }
            Ok(httparse::Status::Partial) if rest.len() > MAX_SIZE_LINE => Err(ChunkError::Malformed),
            Ok(httparse::Status::Partial) => Ok(None),
            Err(httparse::InvalidChunkSize) => Err(ChunkError::Malformed),
        }
    }

    /// The trailer section: fields, then an empty line.
    fn trailer_section(
        &mut self,
        rest: &[u8],
        trailers: &mut Vec<Field>,
    ) -> Result<Option<usize>, ChunkError> {
        let mut fields = vec![httparse::EMPTY_HEADER; self.max_trailers];
        match httparse::parse_headers(rest, &mut fields) {
            Ok(httparse::Status::Complete((len, parsed))) => {
                if len > self.max_trailer_bytes {
                    return Err(ChunkError::TrailersTooLarge);
                }
                trailers.extend(parsed.iter().map(|f| (f.name.to_owned(), f.value.to_vec())));
                self.state = State::Done;
                Ok(Some(len))
            }
            Ok(httparse::Status::Partial) if rest.len() > self.max_trailer_bytes => {
                Err(ChunkError::TrailersTooLarge)
            }
            Ok(httparse::Status::Partial) => Ok(None),
            Err(httparse::Error::TooManyHeaders) => Err(ChunkError::TrailersTooLarge),
            Err(_) => Err(ChunkError::Malformed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A decoded body, its trailers, and the bytes left over after it.
    type Decoded = (Vec<u8>, Vec<Field>, Vec<u8>);

    /// Decodes `input` fed in pieces of `step` bytes, as a socket might
    /// deliver it.
    fn decode_in_steps(input: &[u8], step: usize, max: u64) -> Result<Decoded, ChunkError> {
        let mut decoder = ChunkedDecoder::new(max, 1024, 8);
        let (mut body, mut trailers) = (Vec::new(), Vec::new());
        let mut pending = Vec::new();
        let mut fed = 0;
        while !decoder.is_done() {
            if fed == input.len() {
                panic!("ran out of input before the end of the body");
            }
            let end = (fed + step).min(input.len());
            pending.extend_from_slice(&input[fed..end]);
            fed = end;
            let used = decoder.decode(&pending, &mut body, &mut trailers)?;
            pending.drain(..used);
        }
        pending.extend_from_slice(&input[fed..]);
        Ok((body, trailers, pending))
    }

    #[test]
    fn decodes_chunks_whatever_the_pieces() {
        let input = b"4\r\nWiki\r\n5\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\n\r\nNEXT";
        for step in [1, 2, 3, 7, 64] {
            let (body, trailers, rest) = decode_in_steps(input, step, 1 << 20).unwrap();
            assert_eq!(body, b"Wikipedia in\r\n\r\nchunks.", "step {step}");
            assert!(trailers.is_empty());
            assert_eq!(rest, b"NEXT", "the next request's bytes are left alone");
        }
    }

    #[test]
    fn extensions_are_ignored_and_trailers_kept() {
        let input = b"3;name=value;other=\"q\"\r\nabc\r\n0;last\r\nX-Checksum: 1234\r\nX-Other: y\r\n\r\n";
        for step in [1, 5, 100] {
            let (body, trailers, rest) = decode_in_steps(input, step, 100).unwrap();
            assert_eq!(body, b"abc");
            assert_eq!(
                trailers,
                vec![("X-Checksum".to_owned(), b"1234".to_vec()), ("X-Other".to_owned(), b"y".to_vec())]
            );
            assert!(rest.is_empty());
        }
    }

    #[test]
    fn upper_and_lower_case_hex() {
        let (body, _, _) =
            decode_in_steps(b"A\r\n0123456789\r\na\r\n0123456789\r\n0\r\n\r\n", 4, 100).unwrap();
        assert_eq!(body.len(), 20);
    }

    #[test]
    fn malformed_input_is_refused() {
        for input in [
            &b"\r\n\r\n"[..],              // no size
            b"x\r\nabc\r\n0\r\n\r\n",      // not hex
            b"3\r\nabcd\r\n0\r\n\r\n",     // more data than declared
            b"3\nabc\r\n0\r\n\r\n",        // bare LF after the size
            b"3\r\nabc0\r\n\r\n",          // no CRLF after the data
            b"0\r\nno colon here\r\n\r\n", // a broken trailer
            b"fffffffffffffffff\r\n",      // 17 hex digits
        ] {
            assert_eq!(decode_in_steps(input, 1, u64::MAX).err(), Some(ChunkError::Malformed), "{input:?}");
        }
    }

    #[test]
    fn a_size_line_that_never_ends_is_refused() {
        let mut line = b"5;".to_vec();
        line.extend(std::iter::repeat_n(b'x', MAX_SIZE_LINE));
        let mut decoder = ChunkedDecoder::new(100, 1024, 8);
        assert_eq!(decoder.decode(&line, &mut Vec::new(), &mut Vec::new()), Err(ChunkError::Malformed));
    }

    #[test]
    fn the_body_limit_is_checked_on_the_declared_size() {
        // At the limit: fine.
        assert_eq!(decode_in_steps(b"5\r\nabcde\r\n0\r\n\r\n", 3, 5).unwrap().0, b"abcde");
        // One over: refused from the size line, before any data is held.
        let mut decoder = ChunkedDecoder::new(5, 1024, 8);
        let mut body = Vec::new();
        assert_eq!(decoder.decode(b"3\r\nabc\r\n", &mut body, &mut Vec::new()), Ok(8));
        assert_eq!(decoder.decode(b"3\r\n", &mut body, &mut Vec::new()), Err(ChunkError::BodyTooLarge));
        assert_eq!(body, b"abc");
        // A size near 2^64 does not overflow the running total.
        let mut decoder = ChunkedDecoder::new(10, 1024, 8);
        let huge = b"fffffffffffffff\r\n";
        assert_eq!(decoder.decode(huge, &mut Vec::new(), &mut Vec::new()), Err(ChunkError::BodyTooLarge));
    }

    #[test]
    fn trailers_are_limited_like_a_head() {
        let many: String = (0..9).map(|i| format!("T{i}: v\r\n")).collect();
        let input = format!("0\r\n{many}\r\n");
        assert_eq!(decode_in_steps(input.as_bytes(), 100, 10).err(), Some(ChunkError::TrailersTooLarge));
        let long = format!("0\r\nT: {}\r\n\r\n", "v".repeat(2000));
        assert_eq!(decode_in_steps(long.as_bytes(), 100, 10).err(), Some(ChunkError::TrailersTooLarge));
    }

    #[test]
    fn needs_more_bytes_without_consuming_a_partial_line() {
        let mut decoder = ChunkedDecoder::new(100, 1024, 8);
        let (mut body, mut trailers) = (Vec::new(), Vec::new());
        assert_eq!(decoder.decode(b"1", &mut body, &mut trailers), Ok(0));
        assert_eq!(decoder.decode(b"1\r", &mut body, &mut trailers), Ok(0));
        assert_eq!(decoder.decode(b"1\r\nz\r", &mut body, &mut trailers), Ok(4));
        assert_eq!(decoder.decode(b"\r\n0\r\n\r", &mut body, &mut trailers), Ok(5));
        assert!(!decoder.is_done());
        assert_eq!(decoder.decode(b"\r\n", &mut body, &mut trailers), Ok(2));
        assert!(decoder.is_done());
        assert_eq!(body, b"z");
    }
}
