//! The rest of an answer too large to build inline, read from the mapped segments a chunk at a
//! time (`LogBody`).

use super::read::Plan;
use super::Body;
use crate::channel::Selector;
use crate::server::budget::Budget;
use crate::server::fanout::Hub;
use crate::server::Shared;
use crate::storage::{Direction, Query};
use crate::wire::line;
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Frame;
use std::future::Future;
use std::ops::Bound;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

/// Chunk size of a streamed answer.
const CHUNK_BYTES: usize = 64 * 1024;
/// A chunk's buffer: the chunk, and the event that takes it past `CHUNK_BYTES` if it fits.
const CHUNK_CAPACITY: usize = CHUNK_BYTES + 4096;
/// A log line's bytes besides its path and data (unescaped): `@` and the id's 20 characters,
/// two colons, the line end.
const LINE_OVERHEAD_BYTES: usize = 24;

/// Streams the rest of a large answer, from `next`, after its inline part `first`.
pub(super) fn stream_rest(shared: &Shared, plan: &Plan, first: Bytes, next: Next) -> Body {
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
pub(super) enum Next {
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
    // The rest of the answer after the event `last`, `taken` events into this read.
    let rest_after = |last, taken: usize| {
        let limit = query.limit.map(|l| l.saturating_sub(taken));
        (limit != Some(0)).then_some(Next::Forward(Query {
            start: Bound::Excluded(last),
            limit,
            ..query
        }))
    };
    let mut chunk = Vec::with_capacity(CHUNK_CAPACITY);
    let mut last = None;
    for (count, e) in reader.events(&query).enumerate() {
        let e = e?;
        // An event that would not fit starts the next chunk: grown, the buffer doubles, and
        // every reader that stops reading holds two of it (with 60 KB events, 136 KiB each
        // instead of 68 KiB). Only an event larger than a chunk gets a buffer of its size.
        let line_bytes = e.path.len() + e.data.len() + LINE_OVERHEAD_BYTES;
        if let Some(last) = last.filter(|_| chunk.len() + line_bytes > CHUNK_CAPACITY) {
            return Ok((chunk, rest_after(last, count)));
        }
        line::format_event(&mut chunk, e.id, e.path, e.data);
        last = Some(e.id);
        if chunk.len() >= CHUNK_BYTES {
            return Ok((chunk, rest_after(e.id, count + 1)));
        }
    }
    Ok((chunk, None))
}
