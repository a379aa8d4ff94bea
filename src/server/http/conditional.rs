//! What makes answers cacheable. An answer that can never change (its range ends at or before
//! the commit watermark) is `Cache-Control: public, max-age=31536000, immutable`; the open tail
//! is `no-cache`. The `ETag` is a hash of the request and of what the answer holds by
//! (`cache::Valid`: the heads of its streams, or the end of its range), so it changes when the
//! answer can. `If-None-Match`, `If-Modified-Since` (304),
//! `Range` (206, 416) and `If-Range` follow RFC 9110.

use super::cache::Valid;
use super::read::Plan;
use super::{empty, full, header_str, text, Body};
use crate::event_id::EventId;
use bytes::Bytes;
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Request, Response, StatusCode};
use std::hash::{Hash, Hasher};
use std::ops::Bound;

pub(super) fn cache_control(is_immutable: bool) -> HeaderValue {
    if is_immutable {
        HeaderValue::from_static("public, max-age=31536000, immutable")
    } else {
        HeaderValue::from_static("no-cache")
    }
}

pub(super) fn not_modified(etag: &HeaderValue, is_immutable: bool) -> Response<Body> {
    let mut resp = Response::new(empty());
    *resp.status_mut() = StatusCode::NOT_MODIFIED;
    resp.headers_mut().insert(header::ETAG, etag.clone());
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, cache_control(is_immutable));
    resp
}

/// A strong tag of the request and of what its answer holds by (`cache::Valid`): the heads of
/// its streams for an open range that held all their events, so that writes elsewhere leave the
/// tag alone; else the end of the range it was answered up to.
pub(super) fn etag_for(req: &Request<Incoming>, plan: &Plan, valid: &Valid) -> HeaderValue {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    req.uri().path().hash(&mut h);
    req.uri().query().unwrap_or("").hash(&mut h);
    match valid {
        Valid::WhileHeads { sum, .. } => ("heads", sum).hash(&mut h),
        Valid::Forever | Valid::AtWatermark(_) => {
            if let Bound::Included(end) = plan.query.end {
                ("end", end.0).hash(&mut h);
            }
        }
    }
    HeaderValue::try_from(format!("\"{:016x}\"", h.finish()))
        .expect("hex digits in quotes are a header value")
}

/// An answer's `Last-Modified`: its last event's second, and that as the header.
pub(super) struct LastModified {
    pub at: std::time::SystemTime,
    pub header: HeaderValue,
}

impl LastModified {
    pub fn of(id: EventId) -> LastModified {
        let at = event_time(id);
        let header = HeaderValue::try_from(httpdate::fmt_http_date(at))
            .expect("an HTTP date is a header value");
        LastModified { at, header }
    }
}

/// Answers a `Range`: 206 with the part, 416 when the range lies past the end, and the whole
/// answer when the header asks for something this server does not offer (another unit, several
/// ranges) or does not parse, which RFC 9110 14.2 lets a server ignore.
pub(super) fn ranged(body: Bytes, range: &HeaderValue) -> Response<Body> {
    let len = body.len();
    let asked = range
        .to_str()
        .map_or(RangeAsk::Whole, |r| parse_range(r, len));
    match asked {
        RangeAsk::Whole => Response::new(full(body)),
        RangeAsk::Unsatisfiable => {
            let mut resp = text(StatusCode::RANGE_NOT_SATISFIABLE, "range not satisfiable");
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
                resp.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            resp
        }
        RangeAsk::Part(start, end) => {
            let part = body.slice(start..=end);
            let mut resp = Response::new(full(part));
            *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
            if let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{end}/{len}")) {
                resp.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            resp
        }
    }
}

/// What a `Range` header asks of an answer of a given length.
#[derive(Debug, PartialEq, Eq)]
enum RangeAsk {
    /// Ignore the header: send everything.
    Whole,
    /// Inclusive byte offsets.
    Part(usize, usize),
    Unsatisfiable,
}

/// One range, `bytes=A-B`, `bytes=A-` or `bytes=-N`, within `len` bytes.
fn parse_range(value: &str, len: usize) -> RangeAsk {
    let Some(spec) = value.trim().strip_prefix("bytes=") else {
        return RangeAsk::Whole;
    };
    let Some((a, b)) = spec.split_once('-') else {
        return RangeAsk::Whole;
    };
    let number = |t: &str| t.trim().parse::<usize>().ok();
    match (a.trim(), b.trim()) {
        ("", _) => match number(b) {
            Some(0) => RangeAsk::Unsatisfiable,
            Some(_) if len == 0 => RangeAsk::Unsatisfiable,
            Some(n) => RangeAsk::Part(len - n.min(len), len - 1),
            None => RangeAsk::Whole,
        },
        (_, "") => match number(a) {
            Some(start) if start < len => RangeAsk::Part(start, len - 1),
            Some(_) => RangeAsk::Unsatisfiable,
            None => RangeAsk::Whole,
        },
        _ => match (number(a), number(b)) {
            (Some(start), Some(end)) if start <= end => {
                if start < len {
                    RangeAsk::Part(start, end.min(len - 1))
                } else {
                    RangeAsk::Unsatisfiable
                }
            }
            _ => RangeAsk::Whole,
        },
    }
}

/// Whether a `Range` may be served: without `If-Range`, yes; with it, only if the answer is
/// still what the client holds a part of (RFC 9110 13.1.5): its strong tag, or its
/// `Last-Modified` date when the answer can never change (a date is a strong validator only
/// then, as the open tail can change twice within its second).
pub(super) fn if_range_holds(
    headers: &HeaderMap,
    etag: &HeaderValue,
    last_modified: Option<&LastModified>,
    is_immutable: bool,
) -> bool {
    let Some(value) = header_str(headers, header::IF_RANGE).map(str::trim) else {
        return headers.get(header::IF_RANGE).is_none();
    };
    if value.starts_with('"') || value.starts_with("W/") {
        return value.as_bytes() == etag.as_bytes();
    }
    is_immutable
        && last_modified.is_some_and(|lm| httpdate::parse_http_date(value).ok() == Some(lm.at))
}

/// An event id's time, to the second (the resolution of an HTTP date).
pub(super) fn event_time(id: EventId) -> std::time::SystemTime {
    std::time::UNIX_EPOCH + std::time::Duration::from_secs(id.seconds())
}

/// Whether an `If-None-Match` list matches `etag`: `*`, or any tag by the weak comparison that
/// RFC 9110 13.1.2 prescribes for this header (a `W/` prefix is ignored on either side).
pub(super) fn matches_any_tag(list: &str, etag: &HeaderValue) -> bool {
    fn opaque(tag: &str) -> &str {
        let tag = tag.trim();
        tag.strip_prefix("W/").unwrap_or(tag)
    }
    let etag = opaque(etag.to_str().unwrap_or_default());
    list.split(',')
        .any(|t| t.trim() == "*" || opaque(t) == etag)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        let fmt = |id| httpdate::fmt_http_date(event_time(EventId(id)));
        assert_eq!(fmt(0), "Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(
            fmt(1_700_000_000_999_999_999),
            "Tue, 14 Nov 2023 22:13:20 GMT"
        );
    }

    #[test]
    fn if_none_match_compares_weakly() {
        let tag = &HeaderValue::from_static("\"0123\"");
        for list in [
            "\"0123\"",
            "W/\"0123\"",
            "\"x\", \"0123\"",
            " * ",
            "\"a\",W/\"0123\"",
        ] {
            assert!(matches_any_tag(list, tag), "{list}");
        }
        for list in ["\"0124\"", "0123", "\"01234\"", ""] {
            assert!(!matches_any_tag(list, tag), "{list}");
        }
    }

    #[test]
    fn ranges() {
        use RangeAsk::*;
        for (value, len, asked) in [
            ("bytes=0-4", 10, Part(0, 4)),
            ("bytes=5-", 10, Part(5, 9)),
            ("bytes=-3", 10, Part(7, 9)),
            ("bytes=-30", 10, Part(0, 9)),
            ("bytes=8-100", 10, Part(8, 9)),
            ("bytes=10-", 10, Unsatisfiable),
            ("bytes=10-12", 10, Unsatisfiable),
            ("bytes=-0", 10, Unsatisfiable),
            ("bytes=0-0", 0, Unsatisfiable),
            ("bytes=-3", 0, Unsatisfiable),
            // Not offered or not parsed: the whole answer.
            ("bytes=0-1,3-4", 10, Whole),
            ("items=0-1", 10, Whole),
            ("bytes=abc", 10, Whole),
            ("bytes=5-3", 10, Whole),
            ("bytes=-", 10, Whole),
            ("bytes=1", 10, Whole),
            ("bytes=99999999999999999999999-", 10, Whole),
        ] {
            assert_eq!(parse_range(value, len), asked, "{value} of {len}");
        }
    }

    proptest::proptest! {
        #[test]
        fn a_part_always_lies_within_the_answer(value in "(bytes=)?[-0-9, ]{0,12}", len in 0usize..64) {
            if let RangeAsk::Part(start, end) = parse_range(&value, len) {
                proptest::prop_assert!(start <= end && end < len, "{value} of {len}");
            }
        }
    }
}
