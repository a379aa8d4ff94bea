//! `EventId`: the server timestamp that names exactly one event.
//!
//! An id is a count of nanoseconds since the Unix epoch (UTC) held in a `u64`. Ids are strictly
//! increasing across a whole store (see `clock.rs`), so an id is also the cursor of every read.
//! Text form, as on the protocol page: `SECONDS.NANOS` formatted `%010d.%09d`, optionally with a
//! leading `@`; when parsing, fewer than 9 fraction digits are a decimal fraction (`.5` is
//! 500000000 ns).

use std::fmt;

const NANOS_PER_SEC: u64 = 1_000_000_000;

/// Nanoseconds since the Unix epoch; strictly increasing within a store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct EventId(pub u64);

/// Why a timestamp did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseIdError {
    #[error("empty timestamp")]
    Empty,
    #[error("timestamp must be SECONDS.NANOS with decimal digits")]
    Syntax,
    #[error("more than 9 fraction digits")]
    TooPrecise,
    #[error("timestamp out of range")]
    OutOfRange,
}

impl EventId {
    pub const MIN: EventId = EventId(0);
    pub const MAX: EventId = EventId(u64::MAX);

    pub fn as_nanos(self) -> u64 {
        self.0
    }

    pub fn seconds(self) -> u64 {
        self.0 / NANOS_PER_SEC
    }

    pub fn subsec_nanos(self) -> u32 {
        // The remainder is below 1e9, which fits in u32.
        (self.0 % NANOS_PER_SEC) as u32
    }

    /// The next id, saturating at `MAX`.
    pub fn next(self) -> EventId {
        EventId(self.0.saturating_add(1))
    }

    /// Parses `@S.N`, `S.N`, `S` or `S.fraction`. Seconds are at most 20 digits; the result must
    /// fit in `u64` nanoseconds.
    pub fn parse(text: &str) -> Result<EventId, ParseIdError> {
        let text = text.strip_prefix('@').unwrap_or(text);
        if text.is_empty() {
            return Err(ParseIdError::Empty);
        }
        let (secs, frac) = match text.split_once('.') {
            Some((s, f)) => (s, Some(f)),
            None => (text, None),
        };
        if secs.is_empty() || !secs.bytes().all(|b| b.is_ascii_digit()) {
            return Err(ParseIdError::Syntax);
        }
        let secs: u64 = secs.parse().map_err(|_| ParseIdError::OutOfRange)?;
        let nanos = match frac {
            None => 0,
            Some(f) => {
                if f.is_empty() || !f.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(ParseIdError::Syntax);
                }
                if f.len() > 9 {
                    return Err(ParseIdError::TooPrecise);
                }
                let value: u64 = f.parse().map_err(|_| ParseIdError::Syntax)?;
                // Pad to nine digits: ".5" is 500000000 ns.
                value * 10u64.pow(9 - f.len() as u32)
            }
        };
        secs.checked_mul(NANOS_PER_SEC)
            .and_then(|n| n.checked_add(nanos))
            .map(EventId)
            .ok_or(ParseIdError::OutOfRange)
    }
}

impl fmt::Display for EventId {
    /// `%010d.%09d`, without the `@`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:010}.{:09}", self.seconds(), self.subsec_nanos())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, expected: Result<u64, ParseIdError>) {
        assert_eq!(
            EventId::parse(input).map(|i| i.0),
            expected,
            "input {input:?}"
        );
    }

    #[test]
    fn parse_table() {
        check("1795563809.018347337", Ok(1_795_563_809_018_347_337));
        check("@1795563809.018347337", Ok(1_795_563_809_018_347_337));
        check("12.5", Ok(12_500_000_000));
        check("12", Ok(12_000_000_000));
        check("0000000001.000000001", Ok(1_000_000_001));
        check("", Err(ParseIdError::Empty));
        check("@", Err(ParseIdError::Empty));
        check("1.", Err(ParseIdError::Syntax));
        check(".5", Err(ParseIdError::Syntax));
        check("1.-5", Err(ParseIdError::Syntax));
        check("+1.5", Err(ParseIdError::Syntax));
        check("1.0000000001", Err(ParseIdError::TooPrecise));
        check("18446744074.000000000", Err(ParseIdError::OutOfRange));
        check("99999999999999999999999", Err(ParseIdError::OutOfRange));
    }

    #[test]
    fn format_round_trips() {
        for n in [0u64, 1, 999_999_999, 1_795_563_809_018_347_337, u64::MAX] {
            let text = EventId(n).to_string();
            assert_eq!(EventId::parse(&text), Ok(EventId(n)));
        }
        assert_eq!(EventId(1_000_000_001).to_string(), "0000000001.000000001");
    }
}
