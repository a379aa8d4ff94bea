//! HTTP log queries: `n`, `at`, `since`, `until`, `after`, `limit` (protocol page, "HTTP") into a
//! `ReadRequest`. Unknown parameters are ignored (browsers and caches add their own).

use super::error::ParseError;
use crate::event_id::EventId;

pub const COUNT_MAX: u64 = 1_000_000;

/// What a log read asks for, checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReadRequest {
    /// The last N (of the range, or up to `at`).
    pub n: Option<u64>,
    pub at: Option<EventId>,
    pub since: Option<EventId>,
    pub after: Option<EventId>,
    pub until: Option<EventId>,
    /// At most this many, oldest first; a cut answer says where to continue.
    pub limit: Option<u64>,
}

/// Parses a query string (without the `?`).
pub fn parse(query: &str) -> Result<ReadRequest, ParseError> {
    let mut req = ReadRequest::default();
    for (name, value) in form_urlencoded::parse(query.as_bytes()) {
        match &*name {
            "n" => set(&mut req.n, "n", parse_count(&value, ParseError::LineCount)?)?,
            "limit" => set(
                &mut req.limit,
                "limit",
                parse_count(&value, ParseError::Limit)?,
            )?,
            "at" => set(&mut req.at, "at", parse_id(&value)?)?,
            "since" => set(&mut req.since, "since", parse_id(&value)?)?,
            "after" => set(&mut req.after, "after", parse_id(&value)?)?,
            "until" => set(&mut req.until, "until", parse_id(&value)?)?,
            _ => {}
        }
    }
    if req.at.is_some()
        && (req.since.is_some()
            || req.after.is_some()
            || req.until.is_some()
            || req.limit.is_some())
    {
        return Err(ParseError::Conflict("at combines only with n"));
    }
    if req.since.is_some() && req.after.is_some() {
        return Err(ParseError::Conflict("since and after cannot be combined"));
    }
    if req.n.is_some() && req.limit.is_some() {
        return Err(ParseError::Conflict("n and limit cannot be combined"));
    }
    Ok(req)
}

fn set<T>(slot: &mut Option<T>, name: &'static str, value: T) -> Result<(), ParseError> {
    if slot.is_some() {
        return Err(ParseError::Duplicate(name));
    }
    *slot = Some(value);
    Ok(())
}

fn parse_count(value: &str, error: ParseError) -> Result<u64, ParseError> {
    match value.parse::<u64>() {
        Ok(n) if (1..=COUNT_MAX).contains(&n) && value.bytes().all(|b| b.is_ascii_digit()) => Ok(n),
        _ => Err(error),
    }
}

fn parse_id(value: &str) -> Result<EventId, ParseError> {
    EventId::parse(value.trim()).map_err(ParseError::Timestamp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_table() {
        assert_eq!(parse("n=5").unwrap().n, Some(5));
        assert_eq!(parse("n=0"), Err(ParseError::LineCount));
        assert_eq!(parse("n=-1"), Err(ParseError::LineCount));
        assert_eq!(parse("n=1000001"), Err(ParseError::LineCount));
        assert_eq!(parse("n=+5"), Err(ParseError::LineCount));
        assert_eq!(parse("limit=x"), Err(ParseError::Limit));
        assert_eq!(parse("at=1.5").unwrap().at, Some(EventId(1_500_000_000)));
        assert_eq!(parse("at=%401.5").unwrap().at, Some(EventId(1_500_000_000)));
        assert_eq!(parse("at=1.5&n=3").unwrap().n, Some(3));
        assert!(matches!(parse("at=nope"), Err(ParseError::Timestamp(_))));
        assert!(matches!(
            parse("at=1&since=1"),
            Err(ParseError::Conflict(_))
        ));
        assert!(matches!(
            parse("since=1&after=1"),
            Err(ParseError::Conflict(_))
        ));
        assert!(matches!(parse("n=1&limit=1"), Err(ParseError::Conflict(_))));
        assert_eq!(parse("n=1&n=2"), Err(ParseError::Duplicate("n")));
        assert_eq!(
            parse("since=2&until=1").unwrap().until,
            Some(EventId(1_000_000_000))
        );
        assert_eq!(parse("_=123&n=2").unwrap().n, Some(2));
        assert_eq!(parse("").unwrap(), ReadRequest::default());
    }
}
