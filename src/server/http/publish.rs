//! `POST /events/PATH`: a form or raw body, appended once its share of the body budget is there,
//! answered with the new id once committed.

use super::{busy, header_str, text, Body};
use crate::channel::ChannelPath;
use crate::server::Shared;
use http_body_util::{BodyExt, Limited};
use hyper::body::{Body as _, Incoming};
use hyper::header;
use hyper::{Request, Response, StatusCode};
use std::sync::Arc;

pub(super) async fn publish(
    shared: &Arc<Shared>,
    req: Request<Incoming>,
    rest: &str,
) -> Response<Body> {
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
            let (status, reason) = crate::server::error::store_failure(&e);
            return text(status, reason);
        }
    };
    if let Err(e) = shared.hub.store.committed_async(id).await {
        let (status, reason) = crate::server::error::store_failure(&e);
        return text(status, reason);
    }
    text(StatusCode::OK, format!("@{id}"))
}
