//! Decoding of the upstream's `Transfer-Encoding: chunked` bodies (RFC 9112 §7.1), in place on
//! the connection's read buffer: data comes out as zero-copy slices of it.
//!
//! Strict on purpose: sizes are hex digits (at most 15 of them), lines end in CRLF, a chunk's
//! data is followed by CRLF. Anything else ends the connection (it is never reused), so a
//! confused framing cannot spill one response into the next. Chunk extensions and trailers are
//! read and dropped.

use bytes::{Buf, Bytes, BytesMut};

/// Longest size or trailer line accepted.
const MAX_LINE: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Size,
    Data(u64),
    DataEnd,
    Trailers,
    Done,
}

/// One step of decoding.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    Data(Bytes),
    /// The buffer holds no complete next piece: read more.
    NeedMore,
    /// The terminating chunk and trailers were read; the connection is positioned after them.
    Done,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed chunked body: {0}")]
pub struct ChunkError(&'static str);

#[derive(Debug)]
pub struct Decoder {
    state: State,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder { state: State::Size }
    }
}

impl Decoder {
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Consumes what it can from `buf` and returns the next piece of data, or what it needs.
    pub fn step(&mut self, buf: &mut BytesMut) -> Result<Step, ChunkError> {
        loop {
            match self.state {
                State::Size => {
                    let Some(end) = line_end(buf)? else {
                        return Ok(Step::NeedMore);
                    };
                    let size = parse_size(&buf[..end])?;
                    buf.advance(end + 2);
                    self.state = if size == 0 {
                        State::Trailers
                    } else {
                        State::Data(size)
                    };
                }
                State::Data(left) => {
                    if buf.is_empty() {
                        return Ok(Step::NeedMore);
                    }
                    let n = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                    let data = buf.split_to(n).freeze();
                    let left = left - n as u64;
                    self.state = if left == 0 {
                        State::DataEnd
                    } else {
                        State::Data(left)
                    };
                    return Ok(Step::Data(data));
                }
                State::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(Step::NeedMore);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(ChunkError("no CRLF after chunk data"));
                    }
                    buf.advance(2);
                    self.state = State::Size;
                }
                State::Trailers => {
                    let Some(end) = line_end(buf)? else {
                        return Ok(Step::NeedMore);
                    };
                    buf.advance(end + 2);
                    if end == 0 {
                        self.state = State::Done;
                    }
                }
                State::Done => return Ok(Step::Done),
            }
        }
    }
}

/// The index of the CRLF ending the first line of `buf`, if it is complete.
fn line_end(buf: &[u8]) -> Result<Option<usize>, ChunkError> {
    match buf.iter().position(|&b| b == b'\n') {
        Some(i) if i > 0 && buf[i - 1] == b'\r' => Ok(Some(i - 1)),
        Some(_) => Err(ChunkError("line not ended by CRLF")),
        None if buf.len() > MAX_LINE => Err(ChunkError("line too long")),
        None => Ok(None),
    }
}

/// `1a3f` or `1a3f;ext=1` (optionally with whitespace before the `;`).
fn parse_size(line: &[u8]) -> Result<u64, ChunkError> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 {
        return Err(ChunkError("no chunk size"));
    }
    if digits > 15 {
        return Err(ChunkError("chunk size too large"));
    }
    match line[digits..].iter().find(|b| !matches!(b, b' ' | b'\t')) {
        None | Some(b';') => {}
        Some(_) => return Err(ChunkError("bad chunk size")),
    }
    let mut size = 0u64;
    for &b in &line[..digits] {
        let v = (b as char).to_digit(16).unwrap_or(0) as u64;
        size = size * 16 + v;
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `wire` in pieces of `step` bytes and collects the body.
    fn decode_in_pieces(wire: &[u8], step: usize) -> Result<(Vec<u8>, BytesMut), ChunkError> {
        let mut d = Decoder::default();
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut fed = 0;
        loop {
            match d.step(&mut buf)? {
                Step::Data(b) => out.extend_from_slice(&b),
                Step::Done => return Ok((out, buf)),
                Step::NeedMore => {
                    assert!(fed < wire.len(), "decoder wants more than the whole body");
                    let to = (fed + step).min(wire.len());
                    buf.extend_from_slice(&wire[fed..to]);
                    fed = to;
                }
            }
        }
    }

    #[test]
    fn decodes_whatever_the_read_boundaries() {
        let wire =
            b"5\r\nhello\r\n1;name=v\r\n \r\nA \r\n0123456789\r\n0\r\nx-trailer: 1\r\n\r\nNEXT";
        for step in 1..wire.len() {
            let (body, rest) = decode_in_pieces(wire, step).unwrap();
            assert_eq!(body, b"hello 0123456789", "pieces of {step}");
            // What follows the body (a next response) is left in the buffer, untouched.
            assert!(b"NEXT".starts_with(&rest), "pieces of {step}: {rest:?}");
        }
    }

    #[test]
    fn rejects_malformed_framing() {
        for (wire, why) in [
            (&b"zz\r\n"[..], "no chunk size"),
            (b"5x\r\nhello\r\n", "bad chunk size"),
            (b"5\nhello\r\n", "line not ended by CRLF"),
            (b"5\r\nhelloXX0\r\n\r\n", "no CRLF after chunk data"),
            (b"1000000000000000\r\n", "chunk size too large"),
        ] {
            let mut d = Decoder::default();
            let mut buf = BytesMut::from(wire);
            let r = loop {
                match d.step(&mut buf) {
                    Ok(Step::Data(_)) => continue,
                    other => break other,
                }
            };
            assert_eq!(
                r,
                Err(ChunkError(why)),
                "{:?}",
                String::from_utf8_lossy(wire)
            );
        }
        let mut d = Decoder::default();
        let mut buf = BytesMut::from(&[b'1'; MAX_LINE + 1][..]);
        assert_eq!(d.step(&mut buf), Err(ChunkError("line too long")));
    }
}
