//! The WebSocket frame codec: frame *headers* parsed as bytes stream past (never payloads),
//! to count data messages, enforce the message size limit and know frame boundaries.

/// Incremental WebSocket frame-header parser: sees every byte once, copies only headers.
#[derive(Default, Debug)]
pub(super) struct FrameParser {
    hdr: [u8; 14],
    have: u8,
    /// Payload bytes left in the current frame.
    remaining: u64,
    /// Size of the data message being received (sum of its fragments).
    msg_len: u64,
    pub(super) saw_close: bool,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Fed {
    /// Complete data messages seen in this chunk.
    pub(super) messages: u32,
    /// Offset in the chunk where a frame that breaks the size limit starts.
    pub(super) violation: Option<usize>,
    /// The violating frame's header began in this chunk (so a close can be injected before it).
    pub(super) clean: bool,
}

impl FrameParser {
    pub(super) fn at_boundary(&self) -> bool {
        self.have == 0 && self.remaining == 0
    }

    pub(super) fn feed(&mut self, data: &[u8], max_message: u64) -> Fed {
        let mut out = Fed::default();
        let mut i = 0;
        while i < data.len() {
            if self.remaining > 0 {
                let take = (self.remaining.min((data.len() - i) as u64)) as usize;
                self.remaining -= take as u64;
                i += take;
                continue;
            }
            // Header bytes.
            let frame_start = i.checked_sub(self.have as usize);
            self.hdr[self.have as usize] = data[i];
            self.have += 1;
            i += 1;
            let need = header_len(&self.hdr[..self.have as usize]);
            if let Some(need) = need {
                if self.have as usize == need {
                    let (fin, opcode, len) = parse_header(&self.hdr[..need]);
                    self.have = 0;
                    self.remaining = len;
                    match opcode {
                        0x1 | 0x2 => self.msg_len = len,
                        0x0 => self.msg_len = self.msg_len.saturating_add(len),
                        0x8 => self.saw_close = true,
                        _ => {}
                    }
                    if matches!(opcode, 0x0..=0x2) {
                        if self.msg_len > max_message {
                            out.violation = Some(frame_start.unwrap_or(0));
                            out.clean = frame_start.is_some();
                            return out;
                        }
                        if fin {
                            out.messages += 1;
                            self.msg_len = 0;
                        }
                    }
                }
            }
        }
        out
    }
}

/// Total header length once enough bytes are known.
fn header_len(h: &[u8]) -> Option<usize> {
    if h.len() < 2 {
        return None;
    }
    let masked = h[1] & 0x80 != 0;
    let ext = match h[1] & 0x7f {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    Some(2 + ext + if masked { 4 } else { 0 })
}

fn parse_header(h: &[u8]) -> (bool, u8, u64) {
    let fin = h[0] & 0x80 != 0;
    let opcode = h[0] & 0x0f;
    let len = match h[1] & 0x7f {
        126 => u16::from_be_bytes([h[2], h[3]]) as u64,
        127 => u64::from_be_bytes([h[2], h[3], h[4], h[5], h[6], h[7], h[8], h[9]]),
        n => n as u64,
    };
    (fin, opcode, len)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(fin: bool, opcode: u8, len: usize, masked: bool) -> Vec<u8> {
        let mut v = vec![(if fin { 0x80 } else { 0 }) | opcode];
        let m = if masked { 0x80 } else { 0 };
        if len < 126 {
            v.push(m | len as u8);
        } else if len < 65536 {
            v.push(m | 126);
            v.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            v.push(m | 127);
            v.extend_from_slice(&(len as u64).to_be_bytes());
        }
        if masked {
            v.extend_from_slice(&[1, 2, 3, 4]);
        }
        v.extend(std::iter::repeat_n(b'x', len));
        v
    }

    #[test]
    fn counts_data_messages_not_control_frames() {
        let mut data = frame(true, 1, 5, true);
        data.extend(frame(true, 9, 0, true)); // ping
        data.extend(frame(false, 2, 200, true));
        data.extend(frame(true, 0, 70_000, true));
        data.extend(frame(true, 10, 3, true)); // pong
        let mut p = FrameParser::default();
        // Feed in awkward chunk sizes so headers split across chunks.
        let mut total = 0;
        for chunk in data.chunks(3) {
            total += p.feed(chunk, 1 << 20).messages;
        }
        assert_eq!(total, 2);
        assert!(p.at_boundary());
    }

    #[test]
    fn finds_the_frame_breaking_the_limit() {
        let mut data = frame(true, 1, 10, false);
        let at = data.len();
        data.extend(frame(false, 1, 600, false));
        data.extend(frame(true, 0, 600, false));
        let mut p = FrameParser::default();
        let fed = p.feed(&data, 1000);
        assert_eq!(fed.messages, 1);
        // The first fragment fits; the continuation makes the message too big.
        assert_eq!(fed.violation, Some(at + 2 + 2 + 600));
        assert!(fed.clean);
    }
}
