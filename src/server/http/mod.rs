//! The hyper service: routes, `/healthz`, `/metrics`, CORS, and the plain answers every part
//! shares. Routes: `GET|HEAD /events/PATH` and `/log/PATH` (reads, `read.rs`), `POST /events/PATH`
//! (publish, `publish.rs`), `OPTIONS` (CORS preflight), `GET /ws` (WebSocket upgrade, `ws.rs`),
//! `GET /healthz`, `GET /metrics`. Every refusal is a 4xx with a one-line text reason.
//!
//! - `read.rs`: a read planned from its query, its inline part built (on the async thread while
//!   it lies in live segments, else on a blocking thread), and the answer's headers.
//! - `streamed.rs`: the rest of an answer too large to build inline, read a chunk at a time.
//! - `cache.rs`: whole answers kept, and sent again while they hold (their streams published
//!   nothing, or their range ended).
//! - `conditional.rs`: what makes answers cacheable: `ETag`, `Cache-Control`, 304s and `Range`.
//! - `publish.rs`: `POST /events/PATH`.

mod cache;
mod conditional;
mod publish;
mod read;
mod streamed;

use super::Shared;
use crate::wire::ParseError;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use std::sync::Arc;

pub(super) use cache::AnswerCache;

pub type Body = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

pub(super) fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

pub(super) fn empty() -> Body {
    full(Bytes::new())
}

pub(super) const TEXT_PLAIN: HeaderValue = HeaderValue::from_static("text/plain; charset=utf-8");

pub(crate) fn text(status: StatusCode, reason: impl Into<String>) -> Response<Body> {
    let mut body = reason.into();
    body.push('\n');
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, TEXT_PLAIN);
    resp
}

/// 503 for a request that waited too long for a shared budget, with a reason.
pub(super) fn busy(reason: &str) -> Response<Body> {
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
    let path = req.uri().path();
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
    let origin_text = header_str(req.headers(), header::ORIGIN);
    let is_allowed = shared
        .opts
        .origins
        .allows(origin_text, header_str(req.headers(), header::HOST));
    // The value itself, not its text: echoed in CORS answers without a copy.
    let origin = origin_text.and(req.headers().get(header::ORIGIN)).cloned();
    // `/log` is the read-only spelling: publishing is `POST /events`.
    let methods = if is_events {
        "GET, HEAD, POST, OPTIONS"
    } else {
        "GET, HEAD, OPTIONS"
    };
    let mut resp = match *req.method() {
        Method::GET | Method::HEAD => read::read(shared, &req, rest).await,
        Method::POST if is_events => {
            if !is_allowed {
                return text(StatusCode::FORBIDDEN, "origin not allowed");
            }
            // The path is the request's own text, and the request goes to the body reader.
            let rest = rest.to_owned();
            publish::publish(shared, req, &rest).await
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
        let h = resp.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        h.insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static("Link, ETag, Last-Modified"),
        );
        h.append(header::VARY, HeaderValue::from_static("Origin"));
    }
    resp
}

pub(super) fn header_str(headers: &HeaderMap, name: header::HeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}
