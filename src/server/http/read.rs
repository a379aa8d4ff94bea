//! Log reads (`GET|HEAD /events/PATH`, `/log/PATH`): the query planned against the commit
//! watermark, the inline part of the answer built, then headed and sent.
//!
//! Small answers are built inline, on the async thread when they lie in live segments (written
//! lately, so in memory), else on a blocking thread, since a sealed segment's pages may have to
//! come from the disk and an async thread that waits for them holds up every connection it
//! serves. An answer past `INLINE_BYTES_MAX` continues in chunks (`streamed.rs`). Every byte built
//! is charged to the server's answer budget until hyper has written it (`budget.rs`): a read first
//! waits for its share, and is answered 503 if none comes within `answer_wait`.

use super::cache::{Answer, Valid};
use super::conditional::{
    cache_control, etag_for, if_range_holds, matches_any_tag, not_modified, ranged, LastModified,
};
use super::streamed::{stream_rest, Next};
use super::{busy, empty, full, header_str, text, Body, TEXT_PLAIN};
use crate::channel::Selector;
use crate::event_id::EventId;
use crate::server::fanout::Hub;
use crate::server::Shared;
use crate::storage::{Direction, Query};
use crate::wire::{line, query, ParseError};
use hyper::body::{Body as _, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use std::ops::Bound;
use std::sync::Arc;

/// Bytes of answer built inline before the rest is streamed from a blocking task.
const INLINE_BYTES_MAX: usize = 256 * 1024;
/// The share of `answer_bytes_total_max` a read takes before it builds its inline part: what
/// that part's buffer can grow to (it doubles as it grows, and stops once past
/// `INLINE_BYTES_MAX`). After the read it is cut to what was built.
const INLINE_SHARE: usize = 2 * INLINE_BYTES_MAX;
/// The 503's reason when a read's share of the answer budget does not come in time.
const ANSWERS_BUSY: &str = "too many answers waiting to be read; retry";

/// A read, planned: what to ask the store and how to present it.
#[derive(Clone)]
pub(super) struct Plan {
    pub selector: Selector,
    pub query: Query,
    /// Backward reads (`n`) are printed oldest first.
    is_reversed: bool,
    /// The answer can never change.
    pub is_immutable: bool,
    /// No end was asked for (`at`, `until`): the answer ends at the watermark.
    is_open: bool,
    /// The `limit` of a forward read, for the continuation link.
    limit: Option<u64>,
    until: Option<EventId>,
}

fn plan(rest: &str, query_text: &str, watermark: EventId) -> Result<Plan, ParseError> {
    let selector =
        Selector::parse(if rest.is_empty() { "/" } else { rest }).map_err(ParseError::Path)?;
    let req = query::parse(query_text)?;
    let start = match (req.since, req.after) {
        (Some(s), _) => Bound::Included(s),
        (_, Some(a)) => Bound::Excluded(a),
        _ => Bound::Unbounded,
    };
    let requested_end = req.at.or(req.until);
    // Never past the watermark: the answer holds only committed events, in id order.
    let end = Bound::Included(requested_end.map_or(watermark, |e| e.min(watermark)));
    let is_immutable = requested_end.is_some_and(|e| e <= watermark);
    let (query, is_reversed) = match (req.at, req.n) {
        (Some(at), None) => (
            Query {
                start: Bound::Included(at),
                end,
                direction: Direction::Forward,
                limit: Some(1),
            },
            false,
        ),
        (_, Some(n)) => (
            Query {
                start,
                end,
                direction: Direction::Backward,
                limit: usize::try_from(n).ok(),
            },
            true,
        ),
        (None, None) => (
            Query {
                start,
                end,
                direction: Direction::Forward,
                limit: req
                    .limit
                    .and_then(|l| usize::try_from(l).ok())
                    .map(|l| l + 1),
            },
            false,
        ),
    };
    Ok(Plan {
        selector,
        query,
        is_reversed,
        is_immutable,
        is_open: requested_end.is_none(),
        limit: req.limit,
        until: req.until,
    })
}

pub(super) async fn read(
    shared: &Arc<Shared>,
    req: &Request<Incoming>,
    rest: &str,
) -> Response<Body> {
    let hub = &shared.hub;
    let watermark = hub.store.committed();
    let request = req
        .uri()
        .path_and_query()
        .map_or(req.uri().path(), |pq| pq.as_str());
    if let Some(answer) = shared.answer_cache.get(request, &hub.store, watermark) {
        hub.metrics.answer_cache_hits.inc();
        return present(req, &answer, None);
    }
    let plan = match plan(rest, req.uri().query().unwrap_or(""), watermark) {
        Ok(p) => p,
        Err(e) => {
            let reason = match e {
                ParseError::Path(crate::channel::PathError::InvalidGlob) => {
                    "invalid glob path".to_string()
                }
                e => e.to_string(),
            };
            return text(StatusCode::BAD_REQUEST, reason);
        }
    };
    let valid = if plan.is_immutable {
        Valid::Forever
    } else {
        // Read after the watermark, as `Store::heads` asks.
        let heads = hub.store.heads(&plan.selector);
        if plan.is_open && heads.newest <= watermark {
            Valid::WhileHeads {
                selector: plan.selector.clone(),
                sum: heads.sum,
                read_at: watermark,
            }
        } else {
            Valid::AtWatermark(watermark)
        }
    };
    let etag = etag_for(req, &plan, &valid);
    if header_str(req.headers(), header::IF_NONE_MATCH).is_some_and(|v| matches_any_tag(v, &etag)) {
        return not_modified(&etag, plan.is_immutable);
    }
    // Its share of the answers not yet written, taken before anything is built, then cut to
    // (or topped up to) what was built; from then on the answer's bytes carry it.
    let deadline = tokio::time::Instant::now() + shared.opts.answer_wait;
    let answers = &shared.answers;
    let Ok(mut charge) = tokio::time::timeout_at(deadline, answers.take(INLINE_SHARE)).await else {
        return busy(ANSWERS_BUSY);
    };
    let inline = match read_answer(hub, &plan).await {
        Ok(inline) => inline,
        Err(e) => {
            tracing::error!(error = %e, "log read failed");
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("log read failed: {e}"),
            );
        }
    };
    // Only an event larger than the share builds more than it; what it built then waits for
    // the rest of its share.
    let built = inline.body.capacity();
    if tokio::time::timeout_at(deadline, charge.resize(built))
        .await
        .is_err()
    {
        return busy(ANSWERS_BUSY);
    }
    let link = match (inline.next_after, plan.limit) {
        (Some(next_after), Some(limit)) => {
            let mut link = format!("<{}?after={next_after}&limit={limit}", req.uri().path());
            if let Some(until) = plan.until {
                link.push_str(&format!("&until={until}"));
            }
            link.push_str(">; rel=\"next\"");
            HeaderValue::from_str(&link).ok()
        }
        _ => None,
    };
    let answer = Arc::new(Answer {
        body: charge.attach(inline.body),
        etag,
        last_modified: inline.last_id.map(LastModified::of),
        is_immutable: plan.is_immutable,
        link,
    });
    match inline.rest {
        None => {
            hub.metrics.answer_cache_misses.inc();
            shared.answer_cache.keep(request, valid, &answer);
            present(req, &answer, None)
        }
        Some(rest) => {
            let streamed = stream_rest(shared, &plan, answer.body.clone(), rest);
            present(req, &answer, Some(streamed))
        }
    }
}

/// The response to `req` from its answer: 304 when the client's copy is current, the part a
/// `Range` asks for (206), else the whole; the headers; no body for `HEAD`. `streamed` is the
/// body of an answer too large to build, which starts with `answer.body`; it has no known
/// length, so it is always sent whole.
fn present(req: &Request<Incoming>, answer: &Answer, streamed: Option<Body>) -> Response<Body> {
    let headers = req.headers();
    let if_none_match = header_str(headers, header::IF_NONE_MATCH);
    if if_none_match.is_some_and(|v| matches_any_tag(v, &answer.etag)) {
        return not_modified(&answer.etag, answer.is_immutable);
    }
    // RFC 9110 13.1.3: If-Modified-Since is ignored when If-None-Match is present or the date
    // does not parse; otherwise unchanged means the last event is not after it (to the second).
    if let (Some(lm), None, Some(ims)) = (
        &answer.last_modified,
        if_none_match,
        header_str(headers, header::IF_MODIFIED_SINCE)
            .and_then(|v| httpdate::parse_http_date(v).ok()),
    ) {
        if lm.at <= ims {
            return not_modified(&answer.etag, answer.is_immutable);
        }
    }
    let is_head = req.method() == Method::HEAD;
    let mut resp = match streamed {
        Some(_) if is_head => Response::new(empty()),
        Some(streamed) => Response::new(streamed),
        None => {
            let range = headers.get(header::RANGE).filter(|_| {
                if_range_holds(
                    headers,
                    &answer.etag,
                    answer.last_modified.as_ref(),
                    answer.is_immutable,
                )
            });
            let mut resp = match range {
                Some(range) => ranged(answer.body.clone(), range),
                None => Response::new(full(answer.body.clone())),
            };
            if is_head {
                let len = resp.body().size_hint().exact();
                *resp.body_mut() = empty();
                if let Some(len) = len {
                    resp.headers_mut()
                        .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
                }
            }
            resp
        }
    };
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, TEXT_PLAIN);
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::ETAG, answer.etag.clone());
    if let Some(lm) = &answer.last_modified {
        h.insert(header::LAST_MODIFIED, lm.header.clone());
    }
    h.insert(header::CACHE_CONTROL, cache_control(answer.is_immutable));
    if let Some(link) = &answer.link {
        h.insert(header::LINK, link.clone());
    }
    resp
}

struct Inline {
    body: Vec<u8>,
    last_id: Option<EventId>,
    /// Set when the answer continues past the inline part (`LogBody`): where its rest starts.
    rest: Option<Next>,
    /// Set when `limit` cut the answer: the continuation's `after`.
    next_after: Option<EventId>,
}

/// The inline part of an answer: on this thread while it lies in live segments, else on a
/// blocking thread, where waiting for the disk holds up no other connection.
async fn read_answer(hub: &Arc<Hub>, plan: &Plan) -> Result<Inline, String> {
    match read_inline(hub, plan, Reach::Live) {
        Ok(Some(inline)) => return Ok(inline),
        Ok(None) => {}
        Err(e) => return Err(e.to_string()),
    }
    hub.metrics.sealed_reads.inc();
    let (hub, plan) = (Arc::clone(hub), plan.clone());
    match tokio::task::spawn_blocking(move || read_inline(&hub, &plan, Reach::All)).await {
        Ok(Ok(Some(inline))) => Ok(inline),
        // Not to be: `Reach::All` opens sealed segments.
        Ok(Ok(None)) => Err("the read stopped at a sealed segment".to_string()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(e) => Err(e.to_string()),
    }
}

/// Which segments `read_inline` may read.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Reach {
    /// The live segments only (recently written, so in memory): safe on an async thread.
    Live,
    /// Any segment (a sealed one's pages may have to come from the disk): a blocking thread.
    All,
}

/// The inline part of an answer, or `None` when `Reach::Live` could not build it without a
/// sealed segment.
fn read_inline(hub: &Hub, plan: &Plan, reach: Reach) -> crate::storage::Result<Option<Inline>> {
    let reader = hub.store.reader(&plan.selector);
    let mut read = match reach {
        Reach::Live => reader.events_in_live_segments(&plan.query),
        Reach::All => reader.events(&plan.query),
    };
    let mut body = Vec::new();
    let mut last_id = None;
    if plan.is_reversed {
        // Last-N: gathered newest first as borrowed slices of the maps, then printed oldest
        // first into one buffer; past `INLINE_BYTES_MAX` the whole answer is streamed instead,
        // so that `n=1000000` of large events is never built in memory.
        // Room for the usual `n` at once, not grown by doubling event by event.
        let mut events = Vec::with_capacity(plan.query.limit.unwrap_or(0).min(256));
        let mut bytes = 0;
        for e in read.by_ref() {
            let e = e?;
            bytes += e.path.len() + e.data.len() + 32;
            events.push(e);
            if bytes > INLINE_BYTES_MAX {
                return Ok(Some(Inline {
                    body,
                    last_id: events.first().map(|e| e.id),
                    rest: Some(Next::LastN(plan.query.limit.unwrap_or(usize::MAX))),
                    next_after: None,
                }));
            }
        }
        if read.stopped_at_sealed() {
            return Ok(None);
        }
        last_id = events.first().map(|e| e.id);
        body.reserve(
            events
                .iter()
                .map(|e| e.path.len() + e.data.len() + 32)
                .sum(),
        );
        for e in events.iter().rev() {
            line::format_event(&mut body, e.id, e.path, e.data);
        }
        return Ok(Some(Inline {
            body,
            last_id,
            rest: None,
            next_after: None,
        }));
    }
    let limit = plan.limit.and_then(|l| usize::try_from(l).ok());
    let mut next_after = None;
    // Forwards, what follows an event of a live segment is in live segments too: only the
    // start can stop at a sealed one, so the continuation and the streamed rest need no check.
    for (count, e) in read.by_ref().enumerate() {
        let e = e?;
        if limit.is_some_and(|l| count == l) {
            next_after = last_id;
            break;
        }
        line::format_event(&mut body, e.id, e.path, e.data);
        last_id = Some(e.id);
        if body.len() >= INLINE_BYTES_MAX && limit.is_none_or(|l| count + 1 < l) {
            let remaining = limit.map(|l| l - count - 1);
            let next_after = match remaining {
                Some(r) => continuation_after(hub, plan, e.id, r)?,
                None => None,
            };
            return Ok(Some(Inline {
                body,
                last_id,
                rest: Some(Next::Forward(Query {
                    start: Bound::Excluded(e.id),
                    limit: remaining,
                    ..plan.query
                })),
                next_after,
            }));
        }
    }
    if read.stopped_at_sealed() {
        return Ok(None);
    }
    Ok(Some(Inline {
        body,
        last_id,
        rest: None,
        next_after,
    }))
}

/// For a limited answer too large to build inline: the id after which the next page starts
/// (the last event the answer will hold), if more events follow it. A counting pass over the
/// mapped log, without formatting.
fn continuation_after(
    hub: &Hub,
    plan: &Plan,
    after: EventId,
    remaining: usize,
) -> crate::storage::Result<Option<EventId>> {
    let reader = hub.store.reader(&plan.selector);
    let query = Query {
        start: Bound::Excluded(after),
        limit: Some(remaining + 1),
        ..plan.query
    };
    let mut last = after;
    for (i, e) in reader.events(&query).enumerate() {
        let e = e?;
        if i == remaining {
            return Ok(Some(last));
        }
        last = e.id;
    }
    Ok(None)
}
