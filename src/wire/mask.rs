//! The mask bit of client WebSocket frames. RFC 6455 (5.1) says a server must close the
//! connection when a client sends an unmasked frame; fastwebsockets accepts one (and keeps the
//! mask private). So the bytes going to its parser pass through `MaskCheck` first, which follows
//! the frame headers (5.2) across any split of the stream into reads and keeps no buffer: only
//! where in the current frame it is.

/// Where the scan is in the current frame.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum State {
    /// The next byte is a frame's first: FIN, RSV and opcode.
    #[default]
    Start,
    /// The next byte holds the mask bit and the 7-bit length.
    Length,
    /// `left` bytes of the 16- or 64-bit length are still to come; `len` holds those read.
    Extended { left: u8, len: u64 },
    /// `left` bytes of the masking key are still to come, then `len` bytes of payload.
    Key { left: u8, len: u64 },
    /// `left` payload bytes are still to come.
    Payload { left: u64 },
    /// A frame was unmasked; nothing after it is scanned.
    Unmasked,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("unmasked client frame")]
pub struct Unmasked;

/// Scans the frame headers of one client's byte stream.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MaskCheck {
    state: State,
}

impl MaskCheck {
    /// Takes the next bytes of the stream. Once a frame without the mask bit is met, this and
    /// every later call fail.
    pub fn feed(&mut self, mut bytes: &[u8]) -> Result<(), Unmasked> {
        while let Some((&b, rest)) = bytes.split_first() {
            self.state = match self.state {
                State::Unmasked => break,
                State::Start => State::Length,
                State::Length if b & 0x80 == 0 => State::Unmasked,
                State::Length => match b & 0x7f {
                    126 => State::Extended { left: 2, len: 0 },
                    127 => State::Extended { left: 8, len: 0 },
                    len => State::Key {
                        left: 4,
                        len: u64::from(len),
                    },
                },
                State::Extended { left: 1, len } => State::Key {
                    left: 4,
                    len: len << 8 | u64::from(b),
                },
                State::Extended { left, len } => State::Extended {
                    left: left - 1,
                    len: len << 8 | u64::from(b),
                },
                State::Key { left: 1, len: 0 } => State::Start,
                State::Key { left: 1, len } => State::Payload { left: len },
                State::Key { left, len } => State::Key {
                    left: left - 1,
                    len,
                },
                State::Payload { left } => {
                    // Skip the payload in one step, not byte by byte.
                    let n = left.min(bytes.len() as u64);
                    bytes = &bytes[n as usize..];
                    self.state = match left - n {
                        0 => State::Start,
                        left => State::Payload { left },
                    };
                    continue;
                }
            };
            bytes = rest;
        }
        match self.state {
            State::Unmasked => Err(Unmasked),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(mask: bool, payload_len: usize) -> Vec<u8> {
        let mut out = vec![0x81];
        let bit = if mask { 0x80 } else { 0 };
        match payload_len {
            n if n < 126 => out.push(bit | n as u8),
            n if n < 65536 => {
                out.push(bit | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(bit | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        if mask {
            out.extend_from_slice(&[1, 2, 3, 4]);
        }
        // Payload bytes that would read as an unmasked header if the scan lost its place.
        out.extend(std::iter::repeat_n(0x01, payload_len));
        out
    }

    #[test]
    fn masked_frames_of_every_length_form_pass_in_any_split() {
        let stream: Vec<u8> = [0, 5, 125, 126, 300, 65535, 65536, 70_000]
            .iter()
            .flat_map(|&n| frame(true, n))
            .collect();
        for chunk in [1, 2, 3, 7, 4096, stream.len()] {
            let mut check = MaskCheck::default();
            for piece in stream.chunks(chunk) {
                assert_eq!(check.feed(piece), Ok(()), "chunks of {chunk}");
            }
            assert_eq!(check.state, State::Start, "chunks of {chunk}");
        }
    }

    #[test]
    fn an_unmasked_frame_after_masked_ones_is_found_and_stays_found() {
        let mut stream = frame(true, 200);
        stream.extend(frame(false, 3));
        for chunk in [1, 5, stream.len()] {
            let mut check = MaskCheck::default();
            let found = stream
                .chunks(chunk)
                .map(|p| check.feed(p))
                .any(|r| r.is_err());
            assert!(found, "chunks of {chunk}");
            assert_eq!(check.feed(&frame(true, 1)), Err(Unmasked));
        }
    }
}
