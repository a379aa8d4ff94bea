//! Event lines: `@TS:/path:DATA` with DATA escaped, as WebSocket events, HTTP log lines and
//! `ivy dump` print them (protocol page, "Server to client").
//!
//! Escaping: `%` as `%25`, newline as `%0A`, carriage return as `%0D`, a `.` that is the last
//! byte of DATA as `%2E`, and every byte that is not part of valid UTF-8 as `%XX`. Everything
//! else is copied, so the escape is canonical and `decode_data(escape(x)) == x`.

use crate::event_id::{EventId, ParseIdError};

const HEX: &[u8; 16] = b"0123456789ABCDEF";

fn push_pct(out: &mut Vec<u8>, b: u8) {
    out.extend_from_slice(&[b'%', HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]);
}

/// Appends DATA escaped for a line.
pub fn escape_data(out: &mut Vec<u8>, data: &[u8]) {
    out.reserve(data.len());
    if is_plain(data) {
        // Most data is ASCII text with nothing to escape: one pass tells so.
        out.extend_from_slice(data);
    } else if std::str::from_utf8(data).is_ok() {
        // `from_utf8` checks UTF-8 several times faster than walking `utf8_chunks` (which was
        // 9% of a log read's CPU in `ivy-bench history`).
        escape_valid(out, data);
    } else {
        for chunk in data.utf8_chunks() {
            escape_valid(out, chunk.valid().as_bytes());
            for &b in chunk.invalid() {
                push_pct(out, b);
            }
        }
    }
    if data.last() == Some(&b'.') {
        // The plain '.' pushed last becomes %2E: old clients read a final '.' as a notice.
        out.pop();
        push_pct(out, b'.');
    }
}

/// Whether `data` is ASCII without `%`, newline or carriage return, so copied as it is (but for
/// a final `.`). Every byte is looked at, with no early exit: that loop compiles to straight-line
/// code of about two instructions a byte, fewer than a UTF-8 check and a `memchr3` search take
/// together (callgrind, `cargo bench --bench loops -- history`: 117,600 -> 103,300 instructions
/// per last-100 read).
fn is_plain(data: &[u8]) -> bool {
    !data.iter().fold(false, |odd, &b| {
        odd | (b >= 0x80) | (b == b'%') | (b == b'\n') | (b == b'\r')
    })
}

/// Escapes valid UTF-8: runs between the bytes that need escaping are copied whole.
fn escape_valid(out: &mut Vec<u8>, mut rest: &[u8]) {
    while let Some(i) = memchr::memchr3(b'%', b'\n', b'\r', rest) {
        out.extend_from_slice(&rest[..i]);
        push_pct(out, rest[i]);
        rest = &rest[i + 1..];
    }
    out.extend_from_slice(rest);
}

/// Appends `@TS:/path:DATA\n` (a log line, as HTTP and `ivy dump` print it).
pub fn format_event(out: &mut Vec<u8>, id: EventId, path: &str, data: &[u8]) {
    format_event_body(out, id, path, data);
    out.push(b'\n');
}

/// Appends `@TS:/path:DATA` without a line end (a WebSocket message).
pub fn format_event_body(out: &mut Vec<u8>, id: EventId, path: &str, data: &[u8]) {
    format_prefix(out, id, path);
    out.push(b':');
    escape_data(out, data);
}

/// Appends `@TS:/path.`: the announcement of an event too large to send inline.
pub fn format_large_notice(out: &mut Vec<u8>, id: EventId, path: &str) {
    format_prefix(out, id, path);
    out.push(b'.');
}

/// Appends `@TS` (`%010d.%09d`) without allocating.
///
/// Every event line of a log read, fan-out message and publish ack starts with one, so it is
/// printed as four fixed-width groups of at most five digits in 32-bit arithmetic: 119
/// instructions an id under callgrind, against 188 for two-digit steps over the 64-bit parts.
pub fn format_id(out: &mut Vec<u8>, id: EventId) {
    let secs = id.seconds();
    if secs >= 10_000_000_000 {
        // Ids past year 2286 have more than ten digits of seconds; print them whole.
        out.push(b'@');
        out.extend_from_slice(id.to_string().as_bytes());
        return;
    }
    let nanos = id.subsec_nanos();
    let mut text = *b"@0000000000.000000000";
    // Both casts are exact: secs < 10^10, so secs / 10^5 < 10^5.
    put_fixed(&mut text[1..6], (secs / 100_000) as u32);
    put_fixed(&mut text[6..11], (secs % 100_000) as u32);
    put_fixed(&mut text[12..16], nanos / 100_000);
    put_fixed(&mut text[16..21], nanos % 100_000);
    out.extend_from_slice(&text);
}

/// Writes the last `out.len()` decimal digits of `n` into `out`, zero-padded.
fn put_fixed(out: &mut [u8], mut n: u32) {
    const PAIRS: &[u8; 200] = b"0001020304050607080910111213141516171819\
        2021222324252627282930313233343536373839\
        4041424344454647484950515253545556575859\
        6061626364656667686970717273747576777879\
        8081828384858687888990919293949596979899";
    let mut end = out.len();
    while end >= 2 {
        let pair = (n % 100) as usize * 2;
        out[end - 2..end].copy_from_slice(&PAIRS[pair..pair + 2]);
        n /= 100;
        end -= 2;
    }
    if end == 1 {
        out[0] = b'0' + (n % 10) as u8;
    }
}

fn format_prefix(out: &mut Vec<u8>, id: EventId, path: &str) {
    format_id(out, id);
    out.push(b':');
    out.extend_from_slice(path.as_bytes());
}

/// Why a line did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    #[error("expected /path:DATA or @TS:/path:DATA")]
    Shape,
    #[error("bad timestamp: {0}")]
    Id(#[from] ParseIdError),
    #[error("bad %-escape at byte {0} of the data")]
    Escape(usize),
}

/// A parsed line: an optional id, the raw path text and the unescaped data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line<'a> {
    pub id: Option<EventId>,
    pub path: &'a str,
    pub data: Vec<u8>,
}

/// Parses `@TS:/path:DATA` or `/path:DATA` (without its line ending), decoding DATA.
pub fn parse_line(line: &str) -> Result<Line<'_>, LineError> {
    let (id, rest) = match line.strip_prefix('@') {
        Some(rest) => {
            let (ts, rest) = rest.split_once(':').ok_or(LineError::Shape)?;
            (Some(EventId::parse(ts)?), rest)
        }
        None => (None, line),
    };
    let (path, data) = rest.split_once(':').ok_or(LineError::Shape)?;
    Ok(Line {
        id,
        path,
        data: decode_data(data.as_bytes())?,
    })
}

/// Decodes every `%XX` of escaped data.
pub fn decode_data(text: &[u8]) -> Result<Vec<u8>, LineError> {
    let mut out = Vec::with_capacity(text.len());
    let mut i = 0;
    while let Some(&b) = text.get(i) {
        if b == b'%' {
            let hex = text.get(i + 1..i + 3).ok_or(LineError::Escape(i))?;
            let s = std::str::from_utf8(hex).map_err(|_| LineError::Escape(i))?;
            out.push(u8::from_str_radix(s, 16).map_err(|_| LineError::Escape(i))?);
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(data: &[u8], escaped: &str) {
        let mut out = Vec::new();
        escape_data(&mut out, data);
        assert_eq!(String::from_utf8(out).unwrap(), escaped);
        assert_eq!(decode_data(escaped.as_bytes()).unwrap(), data);
    }

    #[test]
    fn escape_table() {
        check(b"hello", "hello");
        check(b"a%b\nc\rd", "a%25b%0Ac%0Dd");
        check(b"end.", "end%2E");
        check(b".", "%2E");
        check(b"a.b", "a.b");
        check(b"\xff\xfeok", "%FF%FEok");
        check("é".as_bytes(), "é");
        check(b"", "");
    }

    #[test]
    fn ids_format_like_display() {
        for n in [
            0,
            1,
            1_795_563_809_018_347_337,
            9_999_999_999_999_999_999,
            u64::MAX,
        ]
        .into_iter()
        .chain((1..10_000u64).map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15)))
        .chain((0..20).map(|p| 10u64.pow(p)))
        {
            let mut out = Vec::new();
            format_id(&mut out, EventId(n));
            assert_eq!(String::from_utf8(out).unwrap(), format!("@{}", EventId(n)));
        }
        let mut out = Vec::new();
        format_large_notice(&mut out, EventId(1), "/a");
        assert_eq!(out, b"@0000000000.000000001:/a.");
    }

    #[test]
    fn lines() {
        let mut out = Vec::new();
        format_event(&mut out, EventId(1_000_000_001), "/a", b"x\ny");
        assert_eq!(out, b"@0000000001.000000001:/a:x%0Ay\n");
        let parsed = parse_line("@0000000001.000000001:/a:x%0Ay").unwrap();
        assert_eq!(
            parsed,
            Line {
                id: Some(EventId(1_000_000_001)),
                path: "/a",
                data: b"x\ny".to_vec()
            }
        );
        assert_eq!(parse_line("/a:b:c").unwrap().data, b"b:c");
        assert_eq!(parse_line("nocolon"), Err(LineError::Shape));
        assert_eq!(parse_line("/a:%4"), Err(LineError::Escape(0)));
        assert!(matches!(parse_line("@x:/a:b"), Err(LineError::Id(_))));
    }

    /// The module docs' definition, a byte (or an invalid UTF-8 run) at a time.
    fn escape_by_definition(data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for chunk in data.utf8_chunks() {
            for c in chunk.valid().chars() {
                match c {
                    '%' | '\n' | '\r' => push_pct(&mut out, c as u8),
                    c => out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
                }
            }
            for &b in chunk.invalid() {
                push_pct(&mut out, b);
            }
        }
        if out.last() == Some(&b'.') {
            out.pop();
            push_pct(&mut out, b'.');
        }
        out
    }

    proptest::proptest! {
        /// Plain data (copied whole) and the rest (searched and checked) escape alike.
        #[test]
        fn escaping_follows_its_definition(
            data in proptest::collection::vec(
                proptest::prop_oneof![
                    proptest::sample::select(b"ab.%\n\r:@".to_vec()),
                    proptest::num::u8::ANY,
                ],
                0..200,
            )
        ) {
            let mut out = Vec::new();
            escape_data(&mut out, &data);
            proptest::prop_assert_eq!(&out, &escape_by_definition(&data));
            proptest::prop_assert_eq!(decode_data(&out).ok(), Some(data));
        }
    }
}
