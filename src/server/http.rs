//! The hyper service: routes, log reads, HTTP publish, caching headers, CORS, `/metrics`.
//!
//! Routes: `GET|HEAD /events/PATH` and `/log/PATH` (reads), `POST /events/PATH` (publish),
//! `OPTIONS` (CORS preflight), `GET /ws` (WebSocket upgrade, `ws.rs`), `GET /healthz`,
//! `GET /metrics`. Every refusal is a 4xx with a one-line text reason.
//!
//! Reads: small answers are built inline, on the async thread when they lie in live segments
//! (written lately, so in memory), else on a blocking thread, since a sealed segment's pages may
//! have to come from the disk and an async thread that waits for them holds up every connection
//! it serves. An answer past `INLINE_BYTES_MAX` continues in chunks
//! read from the mapped segments by blocking tasks, each chunk when the one before is taken
//! (`LogBody`). Every byte built is charged to the server's answer budget until hyper has written
//! it (`budget.rs`): a read first waits for its share, and is answered 503 if none comes within
//! `answer_wait`. An answer that can never change
//! (its range ends at or before the commit watermark) is `Cache-Control: public, max-age=31536000,
//! immutable`; the open tail is `no-cache`. The `ETag` is a hash of the request and the end of the
//! range it was answered up to, so it changes exactly when the answer can.

use super::budget::Budget;
use super::fanout::Hub;
use super::Shared;
use crate::channel::{ChannelPath, Selector};
use crate::event_id::EventId;
use crate::storage::{Direction, Query};
use crate::wire::{line, query, ParseError};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body as _, Frame, Incoming};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::ops::Bound;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

/// Bytes of answer built inline before the rest is streamed from a blocking task.
const INLINE_BYTES_MAX: usize = 256 * 1024;
/// The share of `answer_bytes_total_max` a read takes before it builds its inline part: what
/// that part's buffer can grow to (it doubles as it grows, and stops once past
/// `INLINE_BYTES_MAX`). After the read it is cut to what was built.
const INLINE_SHARE: usize = 2 * INLINE_BYTES_MAX;
/// Chunk size of a streamed answer.
const CHUNK_BYTES: usize = 64 * 1024;
/// A chunk's buffer: the chunk, and the event that takes it past `CHUNK_BYTES`.
const CHUNK_CAPACITY: usize = CHUNK_BYTES + 4096;

pub type Body = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

fn empty() -> Body {
    full(Bytes::new())
}

const TEXT_PLAIN: HeaderValue = HeaderValue::from_static("text/plain; charset=utf-8");

pub(crate) fn text(status: StatusCode, reason: impl Into<String>) -> Response<Body> {
    let mut body = reason.into();
    body.push('\n');
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, TEXT_PLAIN);
    resp
}

/// 503 for a request that waited too long for a shared budget, with a reason.
fn busy(reason: &str) -> Response<Body> {
    let mut resp = text(StatusCode::SERVICE_UNAVAILABLE, reason);
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    resp
}

/// `/healthz`: 200 while the store takes appends, or refuses them only until its retry; 503 with
/// the reason once it takes no writes until restart, so that a supervisor restarts the process
/// (recovery at open then decides from the disk).
fn health(store: &crate::storage::Store) -> Response<Body> {
    match store.failure() {
        None => text(StatusCode::OK, "ok"),
        Some(f) if f.until_restart => text(StatusCode::SERVICE_UNAVAILABLE, f.to_string()),
        Some(f) => text(
            StatusCode::OK,
            format!("ok; appends are refused for now: {f}"),
        ),
    }
}

/// A 405 naming the methods the resource allows, as RFC 9110 requires of every 405.
pub(crate) fn method_not_allowed(allow: &'static str) -> Response<Body> {
    let mut resp = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
    resp.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    resp
}

/// Answers one request. Never panics on input; every refusal is a 4xx with a reason.
pub async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let mut resp = route(&shared, req).await;
    shared
        .hub
        .metrics
        .http_requests
        .get_or_create(&crate::metrics::StatusLabel {
            status: resp.status().as_u16(),
        })
        .inc();
    if resp.status().is_client_error() {
        resp.headers_mut()
            .entry(header::CONTENT_TYPE)
            .or_insert(TEXT_PLAIN);
    }
    resp
}

async fn route(shared: &Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    if path == "/ws" {
        return super::upgrade(shared, req);
    }
    if path == "/healthz" {
        return match *req.method() {
            Method::GET | Method::HEAD => health(&shared.hub.store),
            _ => method_not_allowed("GET, HEAD"),
        };
    }
    if path == "/metrics" {
        if !matches!(*req.method(), Method::GET | Method::HEAD) {
            return method_not_allowed("GET, HEAD");
        }
        shared.hub.metrics.observe_store(&shared.hub.store.totals());
        let outbound = i64::try_from(shared.hub.outbound.held()).unwrap_or(i64::MAX);
        shared.hub.metrics.outbound_bytes.set(outbound);
        let answers = i64::try_from(shared.answers.held()).unwrap_or(i64::MAX);
        shared.hub.metrics.answer_bytes.set(answers);
        let mut resp = Response::new(full(shared.hub.metrics.render()));
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
        );
        return resp;
    }
    let (is_events, rest) = if let Some(rest) = path.strip_prefix("/events") {
        (true, rest)
    } else if let Some(rest) = path.strip_prefix("/log") {
        (false, rest)
    } else {
        return text(StatusCode::NOT_FOUND, "not found");
    };
    if !rest.is_empty() && !rest.starts_with('/') {
        return text(StatusCode::NOT_FOUND, "not found");
    }
    if rest.contains('%') {
        return text(StatusCode::BAD_REQUEST, ParseError::EscapedPath.to_string());
    }
    let origin = header_str(req.headers(), header::ORIGIN).map(str::to_owned);
    let host = header_str(req.headers(), header::HOST).map(str::to_owned);
    let is_allowed = shared
        .opts
        .origins
        .allows(origin.as_deref(), host.as_deref());
    // `/log` is the read-only spelling: publishing is `POST /events`.
    let methods = if is_events {
        "GET, HEAD, POST, OPTIONS"
    } else {
        "GET, HEAD, OPTIONS"
    };
    let mut resp = match *req.method() {
        Method::GET | Method::HEAD => read(shared, &req, rest).await,
        Method::POST if is_events => {
            if !is_allowed {
                return text(StatusCode::FORBIDDEN, "origin not allowed");
            }
            publish(shared, req, rest).await
        }
        Method::OPTIONS => {
            if !is_allowed {
                return text(StatusCode::FORBIDDEN, "origin not allowed");
            }
            let mut resp = Response::new(empty());
            *resp.status_mut() = StatusCode::NO_CONTENT;
            let h = resp.headers_mut();
            h.insert(
                header::ACCESS_CONTROL_ALLOW_METHODS,
                HeaderValue::from_static(methods),
            );
            h.insert(
                header::ACCESS_CONTROL_ALLOW_HEADERS,
                HeaderValue::from_static("Content-Type, Range, If-None-Match, If-Modified-Since"),
            );
            h.insert(
                header::ACCESS_CONTROL_MAX_AGE,
                HeaderValue::from_static("86400"),
            );
            resp
        }
        _ => method_not_allowed(methods),
    };
    if let (Some(origin), true) = (origin, is_allowed) {
        if let Ok(v) = HeaderValue::from_str(&origin) {
            resp.headers_mut()
                .insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, v);
            resp.headers_mut().insert(
                header::ACCESS_CONTROL_EXPOSE_HEADERS,
                HeaderValue::from_static("Link, ETag, Last-Modified"),
            );
            resp.headers_mut()
                .append(header::VARY, HeaderValue::from_static("Origin"));
        }
    }
    resp
}

fn header_str(headers: &HeaderMap, name: header::HeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// A read, planned: what to ask the store and how to present it.
#[derive(Clone)]
struct Plan {
    selector: Selector,
    query: Query,
    /// Backward reads (`n`) are printed oldest first.
    is_reversed: bool,
    /// The answer can never change.
    is_immutable: bool,
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
        limit: req.limit,
        until: req.until,
    })
}

async fn read(shared: &Arc<Shared>, req: &Request<Incoming>, rest: &str) -> Response<Body> {
    let hub = &shared.hub;
    let watermark = hub.store.committed();
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
    let etag = etag_for(req, &plan);
    let if_none_match = header_str(req.headers(), header::IF_NONE_MATCH);
    if if_none_match.is_some_and(|v| matches_any_tag(v, &etag)) {
        return not_modified(&etag, &plan);
    }
    // Its share of the answers not yet written, taken before anything is built, then cut to
    // (or topped up to) what was built; from then on the answer's bytes carry it.
    let deadline = tokio::time::Instant::now() + shared.opts.answer_wait;
    let answers = &shared.answers;
    let Ok(mut charge) = tokio::time::timeout_at(deadline, answers.take(INLINE_SHARE)).await else {
        return busy("too many answers waiting to be read; retry");
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
        return busy("too many answers waiting to be read; retry");
    }
    let body = charge.attach(inline.body);
    let last_modified = inline.last_id.map(event_time);
    // RFC 9110 13.1.3: If-Modified-Since is ignored when If-None-Match is present or the date
    // does not parse; otherwise unchanged means the last event is not after it (to the second).
    if let (Some(lm), None, Some(ims)) = (
        last_modified,
        if_none_match,
        header_str(req.headers(), header::IF_MODIFIED_SINCE)
            .and_then(|v| httpdate::parse_http_date(v).ok()),
    ) {
        if lm <= ims {
            return not_modified(&etag, &plan);
        }
    }
    let range = req
        .headers()
        .get(header::RANGE)
        .filter(|_| if_range_holds(req.headers(), &etag, last_modified, plan.is_immutable));
    let mut resp = match (inline.rest, range) {
        (None, Some(range)) => ranged(body, range),
        (None, None) => Response::new(full(body)),
        (Some(rest), _) => {
            let body = if req.method() == Method::HEAD {
                empty()
            } else {
                stream_rest(shared, &plan, body, rest)
            };
            Response::new(body)
        }
    };
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, TEXT_PLAIN);
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, v);
    }
    if let Some(v) =
        last_modified.and_then(|lm| HeaderValue::from_str(&httpdate::fmt_http_date(lm)).ok())
    {
        h.insert(header::LAST_MODIFIED, v);
    }
    h.insert(header::CACHE_CONTROL, cache_control(&plan));
    if let (Some(next_after), Some(limit)) = (inline.next_after, plan.limit) {
        let mut link = format!("<{}?after={next_after}&limit={limit}", req.uri().path());
        if let Some(until) = plan.until {
            link.push_str(&format!("&until={until}"));
        }
        link.push_str(">; rel=\"next\"");
        if let Ok(v) = HeaderValue::from_str(&link) {
            h.insert(header::LINK, v);
        }
    }
    if req.method() == Method::HEAD {
        let len = resp.body().size_hint().exact();
        *resp.body_mut() = empty();
        if let Some(len) = len {
            resp.headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        }
    }
    resp
}

fn cache_control(plan: &Plan) -> HeaderValue {
    if plan.is_immutable {
        HeaderValue::from_static("public, max-age=31536000, immutable")
    } else {
        HeaderValue::from_static("no-cache")
    }
}

fn not_modified(etag: &str, plan: &Plan) -> Response<Body> {
    let mut resp = Response::new(empty());
    *resp.status_mut() = StatusCode::NOT_MODIFIED;
    if let Ok(v) = HeaderValue::from_str(etag) {
        resp.headers_mut().insert(header::ETAG, v);
    }
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, cache_control(plan));
    resp
}

/// A strong tag of the request and the range end it was answered up to.
fn etag_for(req: &Request<Incoming>, plan: &Plan) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    req.uri().path().hash(&mut h);
    req.uri().query().unwrap_or("").hash(&mut h);
    if let Bound::Included(end) = plan.query.end {
        end.0.hash(&mut h);
    }
    format!("\"{:016x}\"", h.finish())
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

/// Streams the rest of a large answer, from `next`, after its inline part `first`.
fn stream_rest(shared: &Shared, plan: &Plan, first: Bytes, next: Next) -> Body {
    LogBody {
        first: Some(first),
        hub: Arc::clone(&shared.hub),
        answers: Arc::clone(&shared.answers),
        selector: plan.selector.clone(),
        asked: plan.query,
        next: Some(next),
        reading: None,
        ready: None,
    }
    .boxed()
}

/// The rest of a large answer, read from the log a chunk at a time by a blocking task, one chunk
/// ahead of what hyper has taken. A client that reads slowly therefore holds no thread and at
/// most two chunks. (Before, a blocking task per answer waited for its client to take each
/// chunk: 600 readers that read nothing took all of tokio's blocking threads, and a normal
/// reader's answer, and every catch-up read, waited for them to be cut off by the write timeout,
/// 30 s in that run.) Each chunk first waits for its share of the answer budget, and carries it
/// until written.
struct LogBody {
    /// The inline part, sent first.
    first: Option<Bytes>,
    hub: Arc<Hub>,
    answers: Arc<Budget>,
    selector: Selector,
    /// The request's query; its end is the watermark the request was planned at, so no later
    /// event joins the answer however long it takes.
    asked: Query,
    /// What the next chunk reads; `None` once the answer is complete.
    next: Option<Next>,
    /// The next chunk: its share of the budget, then its read, under way.
    reading: Option<Pin<Box<ChunkRead>>>,
    /// The next chunk, when it was done at the first poll of its read.
    ready: Option<std::io::Result<(Bytes, Option<Next>)>>,
}

/// Gets the next chunk of a streamed answer (carrying its charge), and where the one after
/// starts (`None`: it was the last).
type ChunkRead = dyn Future<Output = std::io::Result<(Bytes, Option<Next>)>> + Send + Sync;

/// Where the next chunk of a streamed answer starts.
#[derive(Clone, Copy)]
enum Next {
    /// The events of this query, oldest first.
    Forward(Query),
    /// All of a last-N answer too large to build inline: the newest N of the asked query,
    /// oldest first, found by walking back first.
    LastN(usize),
}

impl LogBody {
    /// Starts the next chunk, if any and none is under way. Its read is polled once at once, so
    /// that (when its share is there) the blocking read starts now and runs while hyper writes
    /// the chunk before: waiting for hyper's next poll to start it made a 120 MB answer about
    /// 25% slower. That first poll is with a waker that wakes nothing: the chunk's completion
    /// must not wake the connection, or hyper takes one more chunk each time the kernel takes
    /// some bytes, and a reader that stalls holds a chunk more (300 of them held 116 MB of
    /// anonymous memory, against 90 MB). Hyper's next poll of the body waits for it properly.
    fn read_ahead(&mut self) {
        if self.reading.is_some() || self.ready.is_some() {
            return;
        }
        let Some(next) = self.next.take() else {
            return;
        };
        let hub = Arc::clone(&self.hub);
        let answers = Arc::clone(&self.answers);
        let selector = self.selector.clone();
        let asked = self.asked;
        let mut reading: Pin<Box<ChunkRead>> = Box::pin(async move {
            let mut charge = answers.take(CHUNK_CAPACITY).await;
            let (chunk, next) =
                tokio::task::spawn_blocking(move || read_chunk(&hub, &selector, &asked, next))
                    .await
                    .map_err(std::io::Error::other)?
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
            charge.resize(chunk.capacity()).await;
            Ok((charge.attach(chunk), next))
        });
        match reading
            .as_mut()
            .poll(&mut Context::from_waker(std::task::Waker::noop()))
        {
            Poll::Ready(read) => self.ready = Some(read),
            Poll::Pending => self.reading = Some(reading),
        }
    }
}

impl hyper::body::Body for LogBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = self.get_mut();
        this.read_ahead();
        if let Some(first) = this.first.take().filter(|f| !f.is_empty()) {
            return Poll::Ready(Some(Ok(Frame::data(first))));
        }
        loop {
            let read = match (this.ready.take(), this.reading.as_mut()) {
                (Some(read), _) => read,
                (None, Some(reading)) => std::task::ready!(reading.as_mut().poll(cx)),
                (None, None) => return Poll::Ready(None),
            };
            this.reading = None;
            let (chunk, next) = read.map_err(|e| {
                tracing::error!(error = %e, "log read failed mid-answer");
                e
            })?;
            this.next = next;
            this.read_ahead();
            if !chunk.is_empty() {
                return Poll::Ready(Some(Ok(Frame::data(chunk))));
            }
        }
    }
}

/// Reads one chunk of a streamed answer (about `CHUNK_BYTES`), and where the next one starts.
fn read_chunk(
    hub: &Hub,
    selector: &Selector,
    asked: &Query,
    next: Next,
) -> crate::storage::Result<(Vec<u8>, Option<Next>)> {
    let reader = hub.store.reader(selector);
    let query = match next {
        Next::Forward(query) => query,
        Next::LastN(n) => {
            // Walk back to the oldest of the newest `n`, counting, not formatting.
            let mut oldest = None;
            for e in reader.events(asked) {
                oldest = Some(e?.id);
            }
            let Some(oldest) = oldest else {
                return Ok((Vec::new(), None));
            };
            Query {
                start: Bound::Included(oldest),
                end: asked.end,
                direction: Direction::Forward,
                limit: Some(n),
            }
        }
    };
    let mut chunk = Vec::with_capacity(CHUNK_CAPACITY);
    for (count, e) in reader.events(&query).enumerate() {
        let e = e?;
        line::format_event(&mut chunk, e.id, e.path, e.data);
        if chunk.len() >= CHUNK_BYTES {
            let limit = query.limit.map(|l| l.saturating_sub(count + 1));
            let next = (limit != Some(0)).then_some(Next::Forward(Query {
                start: Bound::Excluded(e.id),
                limit,
                ..query
            }));
            return Ok((chunk, next));
        }
    }
    Ok((chunk, None))
}

/// Answers a `Range`: 206 with the part, 416 when the range lies past the end, and the whole
/// answer when the header asks for something this server does not offer (another unit, several
/// ranges) or does not parse, which RFC 9110 14.2 lets a server ignore.
fn ranged(body: Bytes, range: &HeaderValue) -> Response<Body> {
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
fn if_range_holds(
    headers: &HeaderMap,
    etag: &str,
    last_modified: Option<std::time::SystemTime>,
    is_immutable: bool,
) -> bool {
    let Some(value) = header_str(headers, header::IF_RANGE).map(str::trim) else {
        return headers.get(header::IF_RANGE).is_none();
    };
    if value.starts_with('"') || value.starts_with("W/") {
        return value == etag;
    }
    is_immutable
        && last_modified.is_some()
        && httpdate::parse_http_date(value).ok() == last_modified
}

/// An event id's time, to the second (the resolution of an HTTP date).
fn event_time(id: EventId) -> std::time::SystemTime {
    std::time::UNIX_EPOCH + std::time::Duration::from_secs(id.seconds())
}

/// Whether an `If-None-Match` list matches `etag`: `*`, or any tag by the weak comparison that
/// RFC 9110 13.1.2 prescribes for this header (a `W/` prefix is ignored on either side).
fn matches_any_tag(list: &str, etag: &str) -> bool {
    fn opaque(tag: &str) -> &str {
        let tag = tag.trim();
        tag.strip_prefix("W/").unwrap_or(tag)
    }
    list.split(',')
        .any(|t| t.trim() == "*" || opaque(t) == opaque(etag))
}

async fn publish(shared: &Arc<Shared>, req: Request<Incoming>, rest: &str) -> Response<Body> {
    let path = match ChannelPath::parse(if rest.is_empty() { "/" } else { rest }) {
        Ok(p) => p,
        Err(e) => return text(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let content_type = header_str(req.headers(), header::CONTENT_TYPE)
        .unwrap_or("")
        .to_owned();
    let query_sid = req.uri().query().and_then(|q| {
        form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "sid")
            .map(|(_, v)| v.into_owned())
    });
    if req.body().size_hint().lower() > shared.opts.body_bytes_max as u64 {
        return text(StatusCode::PAYLOAD_TOO_LARGE, "body too large");
    }
    // Its share of the bodies being received, held until the event is appended: its length, or
    // the most it may be when it comes chunked. Until then the body is not read, and waits in
    // the client's socket.
    let deadline = tokio::time::Instant::now() + shared.opts.body_timeout;
    let share = req
        .body()
        .size_hint()
        .exact()
        .and_then(|n| usize::try_from(n).ok())
        .unwrap_or(shared.opts.body_bytes_max);
    let _share = match tokio::time::timeout_at(deadline, shared.bodies.take(share)).await {
        Ok(charge) => charge,
        Err(_) => return busy("too many request bodies being received; retry"),
    };
    let collected = tokio::time::timeout_at(
        deadline,
        Limited::new(req.into_body(), shared.opts.body_bytes_max).collect(),
    )
    .await;
    let body = match collected {
        Err(_) => return text(StatusCode::REQUEST_TIMEOUT, "body not received in time"),
        Ok(Err(e))
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            return text(StatusCode::PAYLOAD_TOO_LARGE, "body too large");
        }
        Ok(Err(_)) => return text(StatusCode::BAD_REQUEST, "truncated or malformed body"),
        Ok(Ok(b)) => b.to_bytes(),
    };
    let (data, sid) = match crate::wire::form::parse(&content_type, body) {
        Ok(form) => (form.data, form.sid.or(query_sid)),
        Err(e) => return text(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let origin = sid.as_deref().and_then(|s| shared.hub.session_by_sid(s));
    // The append never blocks; when the writer is far behind, this task waits here instead.
    let bytes = crate::storage::encoded_len(path.as_str(), &data) as u64;
    shared.hub.store.room(bytes).await;
    let id = match shared.hub.publish(&path, &data, origin.as_ref()) {
        Ok(id) => id,
        Err(e) => {
            let (status, reason) = super::error::store_failure(&e);
            return text(status, reason);
        }
    };
    if let Err(e) = shared.hub.store.committed_async(id).await {
        let (status, reason) = super::error::store_failure(&e);
        return text(status, reason);
    }
    text(StatusCode::OK, format!("@{id}"))
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
        let tag = "\"0123\"";
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
