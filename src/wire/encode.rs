//! The server's lines other than events: acknowledgements, errors, time and the session intro.

use super::line::format_id;
use crate::event_id::EventId;

/// `#KEY#@TS`, or `@TS` without a key.
pub fn ack(out: &mut Vec<u8>, key: Option<&str>, id: EventId) {
    push_key(out, key);
    format_id(out, id);
}

/// `#KEY#!REASON`.
pub fn refusal(out: &mut Vec<u8>, key: &str, reason: &str) {
    push_key(out, Some(key));
    out.push(b'!');
    // A reason is one line; a newline in it would read as two messages to old clients.
    out.extend(
        reason
            .bytes()
            .map(|b| if b == b'\n' || b == b'\r' { b' ' } else { b }),
    );
}

/// `@TS:~/sid:SESSIONID`, the first message of every connection.
pub fn intro(out: &mut Vec<u8>, now: EventId, sid: &str) {
    format_id(out, now);
    out.extend_from_slice(b":~/sid:");
    out.extend_from_slice(sid.as_bytes());
}

fn push_key(out: &mut Vec<u8>, key: Option<&str>) {
    if let Some(key) = key {
        out.push(b'#');
        out.extend_from_slice(key.as_bytes());
        out.push(b'#');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines() {
        let mut out = Vec::new();
        ack(&mut out, Some("7"), EventId(1_000_000_001));
        assert_eq!(out, b"#7#@0000000001.000000001");
        out.clear();
        ack(&mut out, None, EventId(1));
        assert_eq!(out, b"@0000000000.000000001");
        out.clear();
        refusal(&mut out, "k", "bad\npath");
        assert_eq!(out, b"#k#!bad path");
        out.clear();
        intro(&mut out, EventId(2_000_000_000), "abc");
        assert_eq!(out, b"@0000000002.000000000:~/sid:abc");
    }
}
