//! One WebSocket connection (`ivy1`): a reader task that parses commands and a writer task that
//! drains the session's queue, sends acks once their events are committed, pings, catches up
//! from the log when the session lags, and closes with the right code.
//!
//! Frames are read with fastwebsockets (automatic pong and close are off, so this module sees
//! every frame and answers control frames through the writer); messages are reassembled here,
//! with the size limit applied to the whole message (fastwebsockets' own collector has none).
//! The writer formats every frame that is ready into one buffer and writes it with one call.
//! While the writer is idle, fan-out may write queued event frames to the socket itself
//! (`Hub::flush`); `Session::is_writing` keeps the two from writing at once. Under `ivy serve`
//! the reader, the writer and fan-out share the socket (`tcp.rs`); on a stream an embedding
//! program gave hyper, the two tasks split it and only the writer writes.

use super::budget::Charge;
use super::catchup;
use super::fanout::Hub;
use super::linger::LingeringTcp;
use super::session::{Control, Mode, Session};
use super::stall::{Acked, WriteStall};
use super::tcp::{self, SharedTcp};
use crate::channel::ChannelPath;
use crate::clock::{Clock, SystemClock};
use crate::config::ServerOptions;
use crate::event_id::EventId;
use crate::wire::mask::{MaskCheck, Unmasked};
use crate::wire::{command, encode};
use bytes::Bytes;
use fastwebsockets::{Frame, OpCode, Payload, Role};
use futures_util::FutureExt;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

/// How long a connection with nothing to parse keeps its frame parser (and its buffer) before
/// releasing it (it is checked every this long, so between one and two of these): long enough
/// that a busy connection never pays for re-creating it.
const PARSER_RELEASE: std::time::Duration = std::time::Duration::from_secs(2);

/// How long a closing connection waits for the outcomes of its pending acks (a commit takes
/// milliseconds; this bounds a close while the disk hangs).
const ACKS_BEFORE_CLOSE: std::time::Duration = std::time::Duration::from_secs(2);

/// Events per catch-up read, at most.
const CATCHUP_BATCH_EVENTS: usize = 1024;
/// Frame bytes per catch-up read, about (one frame more at most), counting each frame's entry
/// (`budget::ENTRY_BYTES`): a lagging session holds no more than this of the log in memory
/// (and its copy in the write buffer), however large its events or many its subscriptions.
const CATCHUP_BATCH_BYTES: usize = 256 * 1024;

/// Runs a connection until it closes. `io` is the upgraded stream.
pub async fn run(
    hub: Arc<Hub>,
    opts: Arc<ServerOptions>,
    io: TokioIo<Upgraded>,
    session: Arc<Session>,
    shutdown: watch::Receiver<bool>,
) {
    match tcp::recover(io) {
        tcp::Upgraded::Tcp { tcp, read_ahead } => {
            let tcp = Arc::new(tcp);
            session.state.lock().direct = Some(Arc::clone(&tcp));
            let read = std::io::Cursor::new(read_ahead).chain(SharedTcp(Arc::clone(&tcp)));
            let write = SharedTcp(Arc::clone(&tcp));
            run_halves(hub, opts, read, write, &session, shutdown).await;
            session.state.lock().direct = None;
            // Both tasks are done with it: close as every connection does, lingering.
            if let Ok(tcp) = Arc::try_unwrap(tcp) {
                drop(LingeringTcp::new(tcp));
            }
        }
        tcp::Upgraded::Other(io) => {
            let (read, write) = tokio::io::split(io);
            run_halves(hub, opts, read, write, &session, shutdown).await;
        }
        tcp::Upgraded::Closed => {}
    }
}

/// An embedding program's stream tells nothing of what its peer acknowledged.
impl Acked for tokio::io::WriteHalf<TokioIo<Upgraded>> {
    fn acked(&self) -> Option<u64> {
        None
    }
}

async fn run_halves<R, W>(
    hub: Arc<Hub>,
    opts: Arc<ServerOptions>,
    read: R,
    write: W,
    session: &Arc<Session>,
    shutdown: watch::Receiver<bool>,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Acked + Unpin,
{
    hub.metrics.websockets.inc();
    hub.register(session);
    let mut intro = Vec::new();
    encode::intro(&mut intro, SystemClock.now(), &session.sid);
    session.send_control(Control::Text(Bytes::from(intro)));
    let reader = tokio::spawn(read_loop(
        Arc::clone(&hub),
        Arc::clone(&opts),
        read,
        Arc::clone(session),
    ));
    if let Err(e) = write_loop(&hub, &opts, write, session, shutdown).await {
        tracing::debug!(sid = %session.sid, error = %e, "connection ended");
    }
    reader.abort();
    // Wait for the abort, so that the reader's handle on the socket is gone.
    let _ = reader.await;
    hub.unregister(session);
    if matches!(session.state.lock().mode, Mode::Lagging { .. }) {
        hub.metrics.lagging.dec();
    }
    hub.metrics.websockets.dec();
}

/// When a peer last showed it is alive. A peer is silent when, for `idle_timeout`, no frame
/// arrives from it, unless it is reading a backlog: bytes wait to be sent to it, and it has
/// acknowledged more since the last look. A subscriber that reads a long backlog slowly sends
/// nothing, and a ping reaches it late: it waits behind the backlog in the socket buffers.
/// (Before this, such subscribers were dropped with 1001 mid-way, under `ivy-bench fanout
/// --slow-fraction 0.1` on a fast machine; no ping at all went out while a writer caught up.)
///
/// Why both: with bytes waiting, the peer's window is what holds them back, and it opens only
/// as the peer's program reads; one that stopped reading, or vanished, acknowledges nothing new.
/// Acknowledgements alone prove nothing: a peer's kernel acknowledges pings into its receive
/// buffer whether or not its program ever reads them.
struct Liveness {
    session: Arc<Session>,
    idle_timeout: std::time::Duration,
    last_sign: tokio::time::Instant,
    /// Bytes the peer had acknowledged at the last look (`tcp::sending`).
    acked: Option<u64>,
}

impl Liveness {
    fn new(session: &Arc<Session>, idle_timeout: std::time::Duration) -> Liveness {
        let mut liveness = Liveness {
            session: Arc::clone(session),
            idle_timeout,
            last_sign: tokio::time::Instant::now(),
            acked: None,
        };
        liveness.acked = liveness.sending().map(|s| s.acked);
        liveness
    }

    /// Under `ivy serve`, where the socket is at hand (`tcp.rs`); not on an embedding
    /// program's stream, where only frames count.
    fn sending(&self) -> Option<tcp::Sending> {
        // Not under the session lock: fan-out takes it for every delivery.
        let direct = self.session.state.lock().direct.clone();
        direct.as_deref().and_then(tcp::sending)
    }

    fn frame(&mut self, now: tokio::time::Instant) {
        self.last_sign = now;
    }

    /// Time left before the peer would be silent, if no frame comes.
    fn left(&self) -> std::time::Duration {
        self.idle_timeout.saturating_sub(self.last_sign.elapsed())
    }

    /// Whether the peer is silent now. The socket is looked at only once the time is up (one
    /// system call per idle period), and progress since the last look counts as a sign of life
    /// now, so a silent peer is dropped after one to two `idle_timeout`s.
    fn is_silent(&mut self, now: tokio::time::Instant) -> bool {
        if now < self.last_sign + self.idle_timeout {
            return false;
        }
        let sending = self.sending();
        let is_reading_backlog = match (sending, self.acked) {
            (Some(s), Some(acked)) => s.unsent > 0 && s.acked > acked,
            _ => false,
        };
        self.acked = sending.map(|s| s.acked);
        if !is_reading_backlog {
            return true;
        }
        self.last_sign = now;
        false
    }
}

/// The read side of a connection, counting the bytes handed to the frame parser and able to
/// put one byte back. fastwebsockets keeps an 8 KiB buffer per reader; by comparing the bytes it
/// was given with the bytes of the frames it returned, this module knows when that buffer is
/// empty, drops the reader, and waits for the next byte with no buffer at all: an idle
/// connection holds none (measured: `ivy-bench idle`).
struct Counted<R> {
    inner: R,
    /// Shared with the read loop, which cannot look inside while the parser borrows this.
    given: Arc<std::sync::atomic::AtomicU64>,
    put_back: Option<u8>,
    /// Every byte handed to the parser passes this first: fastwebsockets takes unmasked frames.
    mask: MaskCheck,
}

/// The read error that stands for an unmasked client frame (see `error::close_for_frame_error`).
fn unmasked() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, Unmasked)
}

impl<R: AsyncRead + Unpin> AsyncRead for Counted<R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if let Some(b) = self.put_back.take() {
            if buf.remaining() > 0 {
                if self.mask.feed(&[b]).is_err() {
                    return std::task::Poll::Ready(Err(unmasked()));
                }
                buf.put_slice(&[b]);
                self.given
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return std::task::Poll::Ready(Ok(()));
            }
            self.put_back = Some(b);
        }
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if let std::task::Poll::Ready(Ok(())) = polled {
            if self.mask.feed(&buf.filled()[before..]).is_err() {
                return std::task::Poll::Ready(Err(unmasked()));
            }
            let n = (buf.filled().len() - before) as u64;
            self.given
                .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        }
        polled
    }
}

/// Bytes a client frame of this payload length takes on the wire (clients mask every frame).
fn wire_len(payload_len: usize) -> u64 {
    let ext = match payload_len {
        0..=125 => 0,
        126..=65535 => 2,
        _ => 8,
    };
    (2 + ext + 4 + payload_len) as u64
}

async fn read_loop<R: AsyncRead + Unpin>(
    hub: Arc<Hub>,
    opts: Arc<ServerOptions>,
    read: R,
    session: Arc<Session>,
) {
    let given = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut raw = Counted {
        inner: read,
        given: Arc::clone(&given),
        put_back: None,
        mask: MaskCheck::default(),
    };
    let mut parsed = 0u64;
    let mut publishes = Publishes::default();
    let mut message: Vec<u8> = Vec::new();
    let mut is_fragmented = false;
    let mut no_send = |_: Frame<'_>| async { Ok::<(), std::convert::Infallible>(()) };
    let mut liveness = Liveness::new(&session, opts.idle_timeout);
    loop {
        // Idle: wait for the next byte without any buffer.
        match tokio::time::timeout(liveness.left(), raw.inner.read_u8()).await {
            Err(_) if liveness.is_silent(tokio::time::Instant::now()) => {
                return session.close(1001, "idle timeout")
            }
            Err(_) => continue,
            Ok(Err(_)) => return session.close(1000, ""),
            Ok(Ok(b)) => raw.put_back = Some(b),
        }
        let (mut ws, _) =
            fastwebsockets::after_handshake_split(&mut raw, tokio::io::sink(), Role::Server);
        ws.set_auto_close(false);
        ws.set_auto_pong(false);
        ws.set_auto_apply_mask(true);
        // fastwebsockets refuses a frame whose length is >= this; a whole message is checked below.
        ws.set_max_message_size(opts.frame_bytes_max + 1);
        // Read frames; once the parser holds no byte and no frame arrives for a whole check
        // period, drop it and go back to the idle wait. Cancelling `read_frame` is safe only then:
        // with an empty buffer it is awaiting the socket for a frame's first bytes and holds no
        // state. Mid-frame it has consumed the header it parsed, so a check that finds the parser
        // holding bytes keeps the same `read_frame` going (cancelling it there desynchronised the
        // stream: 1002 for any frame that took longer than a period to arrive). The clock is read
        // only when the check timer fires, not per frame (a clock read and a timer move per frame
        // were a measurable part of a publish): a check compares the bytes given to the parser
        // and parsed with the last check's, so the last sign of life may be noted late by up to
        // one period. Bytes of an unfinished frame count as one.
        let period = PARSER_RELEASE.min(opts.idle_timeout / 4);
        let mut at_check = (given.load(std::sync::atomic::Ordering::Relaxed), parsed);
        let timer = tokio::time::sleep(period);
        tokio::pin!(timer);
        loop {
            let read = {
                let mut next = std::pin::pin!(ws.read_frame(&mut no_send));
                // A frame already buffered joins the batch; before waiting for the socket, the
                // batch is appended.
                let ready = if publishes.is_empty() {
                    None
                } else {
                    let polled =
                        std::future::poll_fn(|cx| Poll::Ready(next.as_mut().poll(cx))).await;
                    match polled {
                        Poll::Ready(read) => Some(read),
                        Poll::Pending => {
                            publishes.append_when_room(&hub, &session).await;
                            None
                        }
                    }
                };
                match ready {
                    Some(read) => Some(read),
                    None => loop {
                        tokio::select! {
                            biased;
                            read = &mut next => break Some(read),
                            () = &mut timer => {}
                        }
                        let now = tokio::time::Instant::now();
                        let given_now = given.load(std::sync::atomic::Ordering::Relaxed);
                        if (given_now, parsed) != at_check {
                            liveness.frame(now);
                            at_check = (given_now, parsed);
                        } else if parsed == given_now {
                            // Drained: `next` holds nothing and may be dropped.
                            break None;
                        } else if liveness.is_silent(now) {
                            return session.close(1001, "idle timeout");
                        }
                        timer.as_mut().reset(now + period);
                    },
                }
            };
            if !matches!(&read, Some(Ok(f)) if f.opcode == OpCode::Text && f.fin) {
                // Whatever else came is handled after the publishes read before it.
                publishes.append_when_room(&hub, &session).await;
            }
            let frame = match read {
                None => break,
                Some(Err(e)) => {
                    let (code, reason) = super::error::close_for_frame_error(&e);
                    return session.close(code, reason);
                }
                Some(Ok(frame)) => frame,
            };
            parsed += wire_len(frame.payload.len());
            match frame.opcode {
                OpCode::Ping => {
                    session.send_control(Control::Pong(Bytes::copy_from_slice(&frame.payload)))
                }
                OpCode::Pong => {}
                OpCode::Close => return session.close(1000, ""),
                OpCode::Binary => return session.close(1003, "binary messages are not accepted"),
                OpCode::Text if is_fragmented => {
                    return session.close(1002, "new message inside a fragmented one")
                }
                OpCode::Text if frame.fin => {
                    handle(&hub, &opts, &session, &frame.payload, &mut publishes).await
                }
                OpCode::Text | OpCode::Continuation => {
                    if frame.opcode == OpCode::Continuation && !is_fragmented {
                        return session.close(1002, "continuation without a message");
                    }
                    is_fragmented = true;
                    if message.len() + frame.payload.len() > opts.frame_bytes_max {
                        return session.close(1009, "message too large");
                    }
                    message.extend_from_slice(&frame.payload);
                    if frame.fin {
                        is_fragmented = false;
                        handle(&hub, &opts, &session, &message, &mut publishes).await;
                        message = Vec::new();
                    }
                }
            }
            let (is_closed, has_too_many_replies) = {
                let st = session.state.lock();
                (st.close.is_some(), st.has_too_many_replies())
            };
            if is_closed {
                // Closed from elsewhere (lagging, shutdown): what was read is still published,
                // as it would have been had it not waited in the batch.
                publishes.append_when_room(&hub, &session).await;
                return;
            }
            if has_too_many_replies {
                // The peer sends commands faster than it reads the replies: its next frames wait
                // in the socket. Its publishes read so far go first, so that their acks can come.
                publishes.append_when_room(&hub, &session).await;
                session.room_for_replies().await;
            }
        }
    }
}

/// Handles one whole text message. A publish joins `publishes`; any other command is handled
/// after the publishes before it are appended.
async fn handle(
    hub: &Hub,
    opts: &ServerOptions,
    session: &Arc<Session>,
    payload: &[u8],
    publishes: &mut Publishes,
) {
    let Ok(text) = std::str::from_utf8(payload) else {
        return session.close(1007, "invalid UTF-8");
    };
    let message = match command::parse(text) {
        Ok(m) => m,
        Err(command::Refused {
            key: Some(key),
            error,
        }) => return refuse(session, key, &error.to_string()),
        Err(command::Refused { key: None, error }) => {
            return session.close(1008, super::error::close_reason(&error))
        }
    };
    let key = message.key;
    if let command::Command::Publish { path, data } = message.command {
        publishes.push_when_room(hub, key, path, data).await;
        if publishes.is_full() {
            publishes.append(hub, session);
        }
        return;
    }
    publishes.append_when_room(hub, session).await;
    match message.command {
        command::Command::Time => ack(session, key, SystemClock.now()),
        command::Command::Subscribe { path, resume_after } => {
            match hub.subscribe(session, path, resume_after, opts.subscriptions_max) {
                Ok(boundary) => {
                    if key.is_some() {
                        ack(session, key, boundary);
                    }
                }
                Err(refusal) => match key {
                    Some(key) => refuse(session, key, refusal.reason),
                    None => session.close(refusal.close_code, refusal.reason),
                },
            }
        }
        command::Command::Unsubscribe { path } => {
            let boundary = hub.unsubscribe(session, &path);
            if key.is_some() {
                ack(session, key, boundary);
            }
        }
        command::Command::Publish { .. } => unreachable!("batched above"),
    }
}

/// Publishes in a batch at most (a pipelining client's window is typically a few hundred).
const PUBLISH_BATCH_EVENTS: usize = 256;
/// Data bytes in a batch at most, so a batch never holds much more than one large message.
const PUBLISH_BATCH_BYTES: usize = 256 * 1024;

/// A connection's pipelined publishes, appended together. The messages that are already read
/// are parsed one by one, and their publishes wait here until the next read would wait for the
/// socket, another command comes, or the batch is full; then they go to the store in one call,
/// one pass through the store's and the stream's locks instead of one per event (those locks
/// were most of `Store::append_each`'s time in a profile of `ivy-bench publish`). Order is
/// kept: every other frame is handled after the publishes read before it.
#[derive(Default)]
struct Publishes {
    items: Vec<PublishItem>,
    data: Vec<u8>,
    /// The bytes the batch will take in the log (`storage::encoded_len`).
    encoded: u64,
}

/// One batched publish: its key, its channel, and where its data lies in the batch's bytes.
type PublishItem = (
    Option<compact_str::CompactString>,
    ChannelPath,
    std::ops::Range<usize>,
);

impl Publishes {
    fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    fn is_full(&self) -> bool {
        self.items.len() >= PUBLISH_BATCH_EVENTS || self.data.len() >= PUBLISH_BATCH_BYTES
    }

    /// Adds a publish to the batch once the writer's budget has room for the batch with it
    /// (which may then be full and appended). Appends never block, so that a disk far behind
    /// holds up this connection's reads, not a runtime thread: the peer then meets TCP
    /// backpressure, and other connections are served meanwhile.
    async fn push_when_room(
        &mut self,
        hub: &Hub,
        key: Option<&str>,
        path: ChannelPath,
        data: &[u8],
    ) {
        let encoded = crate::storage::encoded_len(path.as_str(), data) as u64;
        hub.store.room(self.encoded + encoded).await;
        self.encoded += encoded;
        let start = self.data.len();
        self.data.extend_from_slice(data);
        let key = key.map(compact_str::CompactString::new);
        self.items.push((key, path, start..self.data.len()));
    }

    /// Appends the batch once the writer has room for it.
    async fn append_when_room(&mut self, hub: &Hub, session: &Arc<Session>) {
        if !self.is_empty() {
            hub.store.room(self.encoded).await;
            self.append(hub, session);
        }
    }

    /// Appends the batch and queues the acks of keyed publishes for the writer, which sends
    /// each once its event is committed. When the store refuses, the publishes not appended
    /// are tried one at a time, so each gets its own answer: `#KEY#!reason` when keyed; an
    /// unkeyed one closes the connection, and nothing after it is published.
    fn append(&mut self, hub: &Hub, session: &Arc<Session>) {
        if self.items.is_empty() {
            return;
        }
        let (appended, outcome) = append_acked(hub, session, &self.items, &self.data);
        if outcome.is_err() {
            for item in &self.items[appended..] {
                let (_, outcome) =
                    append_acked(hub, session, std::slice::from_ref(item), &self.data);
                if let Err(e) = outcome {
                    if !answer_refusal(session, item.0.as_deref(), &e) {
                        break;
                    }
                }
            }
        }
        self.items.clear();
        self.data.clear();
        self.encoded = 0;
    }
}

/// Appends `items` (data in `data`) and queues the ack of each keyed one that was appended;
/// returns how many were appended, in order, and the store's outcome.
fn append_acked(
    hub: &Hub,
    session: &Arc<Session>,
    items: &[PublishItem],
    data: &[u8],
) -> (usize, crate::storage::Result<Option<EventId>>) {
    let events: Vec<(&ChannelPath, &[u8])> = items
        .iter()
        .map(|(_, path, range)| (path, &data[range.clone()]))
        .collect();
    let mut appended = 0;
    let mut wake_writer = false;
    let outcome = hub.publish_batch(&events, session, &mut |st, id| {
        if let Some(key) = &items[appended].0 {
            // A writer with acks pending already waits for the next commit; only the first
            // pending ack needs to wake it (one wake-up per publish was measurable).
            wake_writer |= st.pending_acks.is_empty();
            st.push_ack(id, key.clone());
        }
        appended += 1;
    });
    if wake_writer {
        session.wake.notify_one();
    }
    (appended, outcome)
}

/// Answers a publish the store refused; false when the connection is to close.
fn answer_refusal(session: &Session, key: Option<&str>, e: &crate::storage::Error) -> bool {
    // Per event, so debug: the writer logs the failure itself once, at error (a failed store
    // under a pipelining publisher wrote over a million warnings in seconds).
    tracing::debug!(error = %e, "publish refused by the store");
    match key {
        Some(key) => {
            refuse(session, key, &super::error::store_failure_reason(e));
            true
        }
        None => {
            let (code, reason) = super::error::close_for_store_failure(e);
            session.close(code, reason);
            false
        }
    }
}

fn ack(session: &Session, key: Option<&str>, id: EventId) {
    let mut line = Vec::with_capacity(32);
    encode::ack(&mut line, key, id);
    session.send_control(Control::Text(Bytes::from(line)));
}

fn refuse(session: &Session, key: &str, reason: &str) {
    let mut line = Vec::with_capacity(key.len() + reason.len() + 3);
    encode::refusal(&mut line, key, reason);
    session.send_control(Control::Text(Bytes::from(line)));
}

/// What the writer took from the session in one go, besides the frames it formatted.
struct Taken {
    /// What the taken frames are charged to the server's outbound budget, until written.
    charge: Charge,
    close: Option<(u16, &'static str)>,
    needs_catchup: bool,
    has_pending_acks: bool,
}

/// The writer's buffers, kept across rounds so that a busy connection allocates nothing per
/// message: `out` the bytes for the next write, `line` scratch for one ack, `events` the queue
/// taken from the session (swapped out whole, so the session lock is not held while the frames
/// are copied).
#[derive(Default)]
struct WriteBuffers {
    out: Vec<u8>,
    line: Vec<u8>,
    events: VecDeque<(EventId, Bytes)>,
    /// Where each event frame ends in `out`, and its id (`unsent_after`).
    ends: Vec<(usize, EventId)>,
}

impl WriteBuffers {
    /// An idle connection keeps no large buffer.
    fn release_if_large(&mut self) {
        if self.out.capacity() > 64 * 1024 {
            self.out = Vec::new();
        }
        if self.events.capacity() > 1024 {
            self.events = VecDeque::new();
        }
        if self.ends.capacity() > 1024 {
            self.ends = Vec::new();
        }
    }
}

/// A write the peer stopped taking at byte `written` of a buffer whose event frames end at
/// `ends`: the frame to finish (the one the write stopped in, or the next one if it stopped
/// between two or before the first), as (where it ends, its id), and how many frames after it
/// are given back to the log. `None` when no event frame is left to finish.
fn unsent_after(ends: &[(usize, EventId)], written: usize) -> Option<(usize, EventId, usize)> {
    let i = ends.iter().position(|(end, _)| *end > written)?;
    Some((ends[i].0, ends[i].1, ends.len() - i - 1))
}

/// Formats the session's control messages and ready acks into `bufs.out` and takes its queued
/// event frames into `bufs.events`.
fn take(hub: &Hub, session: &Session, bufs: &mut WriteBuffers) -> Taken {
    let mut st = session.state.lock();
    // The rest of a direct write goes first: it may end mid-frame.
    if let Some(rest) = st.partial.take() {
        bufs.out.extend_from_slice(&rest);
    }
    for c in st.take_control() {
        match c {
            Control::Text(line) => push_frame(&mut bufs.out, OpCode::Text, &line),
            Control::Pong(payload) => push_frame(&mut bufs.out, OpCode::Pong, &payload),
            Control::Ping => push_frame(&mut bufs.out, OpCode::Ping, b""),
        }
    }
    // Acks leave in id order, each once its event has an outcome: the id once committed, the
    // write failure's reason when it failed.
    while let Some(outcome) = st
        .pending_acks
        .front()
        .and_then(|(id, _)| hub.store.outcome(*id))
    {
        let Some((id, key)) = st.take_ack() else {
            break;
        };
        bufs.line.clear();
        match outcome {
            Ok(()) => encode::ack(&mut bufs.line, Some(&key), id),
            Err(e) => encode::refusal(
                &mut bufs.line,
                &key,
                &super::error::store_failure_reason(&e),
            ),
        }
        push_frame(&mut bufs.out, OpCode::Text, &bufs.line);
    }
    debug_assert!(bufs.events.is_empty());
    // Own ids up to what earlier writes sent are needed no more. Not those up to what is taken
    // now: if the peer stops taking it, the rest goes back to the log (`give_back`), and reading
    // it again must still skip this session's own events.
    let sent_upto = st.last_taken;
    std::mem::swap(&mut st.queue, &mut bufs.events);
    if let Some((id, _)) = bufs.events.back() {
        st.last_taken = *id;
    }
    st.prune_own(sent_upto);
    st.note_replies_taken(&session.replies_taken);
    let charge = st.take_charge();
    if !bufs.out.is_empty() || !bufs.events.is_empty() || st.close.is_some() {
        // Under the lock, so fan-out sees it before it could write here itself.
        session.is_writing.store(true, Ordering::Release);
    }
    Taken {
        charge,
        close: st.close,
        needs_catchup: matches!(st.mode, Mode::Lagging { .. }),
        has_pending_acks: !st.pending_acks.is_empty(),
    }
}

/// Whether the oldest pending ack's event has an outcome already.
fn acks_ready(hub: &Hub, session: &Session) -> bool {
    session
        .state
        .lock()
        .pending_acks
        .front()
        .is_some_and(|(id, _)| hub.store.outcome(*id).is_some())
}

pub(crate) fn push_frame(out: &mut Vec<u8>, opcode: OpCode, payload: &[u8]) {
    let mut frame = Frame::new(true, opcode, None, Payload::Borrowed(payload));
    let mut head = [0u8; 16];
    let n = frame.fmt_head(&mut head);
    out.extend_from_slice(&head[..n]);
    out.extend_from_slice(payload);
}

async fn write_loop<W: AsyncWrite + Acked + Unpin>(
    hub: &Arc<Hub>,
    opts: &ServerOptions,
    write: W,
    session: &Arc<Session>,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    // A subscriber that stops reading is let go, not written to forever.
    let mut write = WriteStall::new(
        write,
        opts.write_timeout,
        hub.metrics.write_timeouts.clone(),
    );
    let mut bufs = WriteBuffers::default();
    let mut acks_deadline = None;
    let mut ping = tokio::time::interval_at(
        tokio::time::Instant::now() + opts.ping_interval,
        opts.ping_interval,
    );
    loop {
        let mut taken = take(hub, session, &mut bufs);
        bufs.ends.clear();
        for (id, frame) in bufs.events.drain(..) {
            push_frame(&mut bufs.out, OpCode::Text, &frame);
            bufs.ends.push((bufs.out.len(), id));
        }
        if let Some((code, reason)) = taken.close {
            // The acks of publishes read before the close still go out first: those events are
            // being committed, and a client that never hears of them would send them again.
            if taken.has_pending_acks {
                let deadline = *acks_deadline
                    .get_or_insert_with(|| tokio::time::Instant::now() + ACKS_BEFORE_CLOSE);
                if tokio::time::Instant::now() < deadline {
                    write.write_all(&bufs.out).await?;
                    bufs.out.clear();
                    let commit = hub.store.listen_commits();
                    if !acks_ready(hub, session) {
                        let _ = tokio::time::timeout_at(deadline, commit).await;
                    }
                    continue;
                }
            }
            let mut payload = code.to_be_bytes().to_vec();
            payload.extend_from_slice(reason.as_bytes());
            push_frame(&mut bufs.out, OpCode::Close, &payload);
            write.write_all(&bufs.out).await?;
            return write.shutdown().await;
        }
        if !bufs.out.is_empty() {
            let written = write_while_taken(&mut write, &bufs.out).await?;
            if written < bufs.out.len() {
                let keep_to = give_back(hub, session, &bufs.ends, written, bufs.out.len());
                // Down to what is left, never up (acks and control bytes are not charged):
                // growing would wait for budget before the write.
                let left = (keep_to - written).min(taken.charge.bytes());
                taken.charge.resize(left).await;
                keep_only(&mut bufs.out, written, keep_to);
                write.write_all(&bufs.out).await?;
            }
            bufs.out.clear();
            bufs.release_if_large();
        }
        drop(taken.charge);
        session.is_writing.store(false, Ordering::Release);
        if taken.needs_catchup {
            // The `select!` below is not reached while catching up: a ping that is due goes out
            // before the next batch (before, none went out until the catch-up ended).
            if ping.tick().now_or_never().is_some() {
                session.state.lock().push_control(Control::Ping);
            }
            // Boxed: its state (a budget wait, a blocking read) would otherwise be part of
            // every connection's writer task, idle or not (measured: 250 bytes per idle
            // connection under `ivy-bench idle`).
            Box::pin(catch_up(hub, session, &mut write, &mut bufs.out)).await?;
            // A session that waits for its next batch's share holds no batch's buffer.
            bufs.release_if_large();
            continue;
        }
        // Listen for commits only while an ack waits: every registered listener is visited by
        // every commit, and idle connections must cost the writer thread nothing.
        let commit = taken.has_pending_acks.then(|| hub.store.listen_commits());
        if commit.is_some() && acks_ready(hub, session) {
            continue;
        }
        tokio::select! {
            _ = session.wake.notified() => {}
            Some(()) = async { match commit { Some(l) => { l.await; Some(()) } None => None } } => {}
            _ = ping.tick() => session.state.lock().push_control(Control::Ping),
            _ = shutdown.changed() => session.close(1001, "server shutting down"),
        }
    }
}

/// A write of events (live, or a catch-up batch) that the peer stopped taking at byte `written`
/// of `out_len`: the events after the one to finish, and any queued meanwhile, go back to the
/// log, and the session reads them from there once its peer reads again, as a lagging one does. A peer that stopped
/// reading so holds one frame of the outbound budget, not all it was given (8 such subscribers
/// held a 64 KiB budget and starved the one that read). Control messages and acks come before
/// the events in the buffer, so they are always kept. A session that has forgotten some of its
/// own ids above the frame to finish keeps all (`SessionState::may_read_again_after`). Returns
/// where the bytes to finish end.
fn give_back(
    hub: &Hub,
    session: &Session,
    ends: &[(usize, EventId)],
    written: usize,
    out_len: usize,
) -> usize {
    let mut st = session.state.lock();
    // With no event frame left to finish, every taken event is written: the session stands
    // after the last one.
    let (keep_to, sent, dropped) =
        unsent_after(ends, written).unwrap_or((out_len, st.last_taken, 0));
    if !st.may_read_again_after(sent) {
        return out_len;
    }
    if st.mode == Mode::Live {
        hub.metrics.lagging.inc();
    }
    let dropped = dropped + st.rewind_to(sent);
    if let Mode::Lagging { missed, .. } = &mut st.mode {
        *missed += dropped as u64;
    }
    hub.metrics.given_back.inc_by(dropped as u64);
    // Nothing above it reached the connection: a resume may start there.
    st.last_taken = sent;
    keep_to
}

/// Cuts `buf` down to its bytes `from..to`, in an allocation of their size: what a write that
/// gave the rest back still has to send. The charge is cut to those bytes, and so must the
/// memory be: the write may wait for the write timeout, and a buffer kept whole meanwhile is the
/// taken queue or batch all the same (300 stalled subscribers held 70 MB that no budget
/// counted).
fn keep_only(buf: &mut Vec<u8>, from: usize, to: usize) {
    buf.truncate(to);
    buf.drain(..from);
    buf.shrink_to_fit();
}

/// One catch-up step: reads a batch from the log after the session's cursor and sends it, or
/// rejoins live when the fan-out is not ahead.
async fn catch_up<W: AsyncWrite + Unpin>(
    hub: &Arc<Hub>,
    session: &Arc<Session>,
    write: &mut W,
    buf: &mut Vec<u8>,
) -> std::io::Result<()> {
    let (cursor, subscriptions, own) = {
        let st = session.state.lock();
        let Mode::Lagging { cursor, .. } = st.mode else {
            return Ok(());
        };
        let subs: Vec<_> = st
            .subscriptions
            .iter()
            .map(|(p, s)| (p.clone(), *s))
            .collect();
        (cursor, subs, st.own.clone())
    };
    let upto = hub.dispatched();
    if cursor >= upto {
        hub.try_rejoin(session, cursor);
        return Ok(());
    }
    // The batch's share of the server's outbound budget, held until it is written: twice its
    // bytes, for its frames as read and for their copy in `buf`. At most a quarter of the budget:
    // a share of all of it would wait until no other subscriber held a byte.
    let share_bytes = (2 * CATCHUP_BATCH_BYTES).min(hub.outbound.max() / 4);
    let mut share = tokio::select! {
        share = hub.outbound.take(share_bytes) => share,
        // Something else to send (a close, an ack): the writer sends it and comes back.
        () = session.wake.notified() => return Ok(()),
    };
    let bytes_max = share.bytes() / 2;
    hub.metrics.catchup_reads.inc();
    let reader_hub = Arc::clone(hub);
    let read = tokio::task::spawn_blocking(move || {
        catchup::read_after(
            &reader_hub,
            &subscriptions,
            &own,
            cursor,
            upto,
            CATCHUP_BATCH_EVENTS,
            bytes_max,
        )
    })
    .await;
    let batch = match read {
        Ok(Ok(batch)) => batch,
        Ok(Err(e)) => {
            tracing::error!(error = %e, "catch-up read failed");
            session.close(1011, "log read failed");
            return Ok(());
        }
        Err(_) => {
            session.close(1011, "log read failed");
            return Ok(());
        }
    };
    {
        let mut st = session.state.lock();
        match &mut st.mode {
            // Rewound by a resume meanwhile: this batch is stale.
            Mode::Lagging { cursor: c, .. } if *c != cursor => return Ok(()),
            Mode::Lagging { cursor: c, missed } => {
                *c = batch.cursor;
                *missed = missed.saturating_sub(batch.frames.len() as u64);
            }
            Mode::Live => return Ok(()),
        }
        // Before the write: a resume on this connection must not go back behind what it may
        // already have received. (Own ids are pruned up to it by the writer's next `take`.)
        st.last_taken = st.last_taken.max(batch.cursor);
    }
    // Where each frame ends in `buf`, and its id.
    let mut ends = Vec::with_capacity(batch.frames.len());
    for (id, frame) in &batch.frames {
        push_frame(buf, OpCode::Text, frame);
        ends.push((buf.len(), *id));
    }
    drop(batch);
    let written = write_while_taken(write, buf).await?;
    // A peer that stopped taking bytes does not hold the batch either (`give_back`).
    let keep_to = if written < buf.len() {
        give_back(hub, session, &ends, written, buf.len())
    } else {
        buf.len()
    };
    if keep_to > written {
        // Down to what is left, never up: growing would wait for budget before the write.
        share.resize((keep_to - written).min(share.bytes())).await;
        keep_only(buf, written, keep_to);
        write.write_all(buf).await?;
    }
    buf.clear();
    drop(share);
    Ok(())
}

/// How long one write of events waits for the peer to take bytes before the events not yet
/// begun are given back to the log (`catch_up`, `give_back`): a stalled peer holds its batch of
/// the budget this long at most. Short enough that the reading subscribers do not notice; long
/// enough that a reading one on a busy machine seldom has its events read twice (under
/// `ivy-bench fanout`, 100 ms and 1 s measured alike, within the noise).
const WRITE_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Writes `buf` while the peer takes it: returns how much went, once all of it has or one write
/// has waited `WRITE_WAIT` for room. (A write that is cut short wrote nothing.) A write that goes
/// through at once costs no timer and no clock read: this is every ack's and event's way out.
async fn write_while_taken<W: AsyncWrite + Unpin>(
    write: &mut W,
    buf: &[u8],
) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        let n = match write.write(&buf[done..]).now_or_never() {
            Some(n) => n?,
            None => match tokio::time::timeout(WRITE_WAIT, write.write(&buf[done..])).await {
                Ok(n) => n?,
                Err(_) => break,
            },
        };
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        done += n;
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Frames end at 10, 25 and 40: a write that stopped inside one finishes it, one that stopped
    /// between two finishes the next, and the frames after go back.
    #[test]
    fn a_cut_write_finishes_the_frame_it_is_in_and_gives_back_the_rest() {
        let ends = [(10, EventId(1)), (25, EventId(2)), (40, EventId(3))];
        assert_eq!(unsent_after(&ends, 0), Some((10, EventId(1), 2)));
        assert_eq!(unsent_after(&ends, 12), Some((25, EventId(2), 1)));
        assert_eq!(unsent_after(&ends, 25), Some((40, EventId(3), 0)));
        assert_eq!(unsent_after(&ends, 40), None);
    }

    /// A session's own publishes that lie among events it took but gave back stay known: the
    /// log is read again after the frame it finished, and must skip them there too. (`take`
    /// once forgot own ids up to what it took, not up to what earlier writes had sent.)
    #[test]
    fn own_ids_among_events_given_back_are_still_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::storage::Store::unsynced(dir.path());
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let hub = Hub::new(store, metrics, &ServerOptions::default());
        let session = Session::new(1, "s".into(), Arc::clone(&hub.outbound));
        {
            let mut st = session.state.lock();
            // Published 12 and 14 itself; 11, 13 and 15 came from others and wait in its queue.
            st.note_own(EventId(12), EventId(0));
            st.note_own(EventId(14), EventId(0));
            for id in [11, 13, 15] {
                assert!(st.try_queue(EventId(id), &Bytes::from(format!("@{id}")), usize::MAX));
            }
        }
        let mut bufs = WriteBuffers::default();
        let _taken = take(&hub, &session, &mut bufs);
        for (id, frame) in bufs.events.drain(..) {
            push_frame(&mut bufs.out, OpCode::Text, &frame);
            bufs.ends.push((bufs.out.len(), id));
        }
        // The peer took one byte: 11 is finished, 13 and 15 go back to the log.
        let keep_to = give_back(&hub, &session, &bufs.ends, 1, bufs.out.len());
        assert_eq!(keep_to, bufs.ends[0].0);
        let st = session.state.lock();
        assert_eq!(st.last_taken, EventId(11));
        assert!(matches!(st.mode, Mode::Lagging { cursor, .. } if cursor == EventId(11)));
        assert!(st.is_own(EventId(12)) && st.is_own(EventId(14)));
    }

    /// What is left to write keeps its bytes, in an allocation of their size, not the batch's.
    #[test]
    fn what_is_left_to_write_is_held_alone() {
        let mut buf: Vec<u8> = (0..=255).cycle().take(256 * 1024).collect();
        let expected = buf[70_000..70_500].to_vec();
        keep_only(&mut buf, 70_000, 70_500);
        assert_eq!(buf, expected);
        assert!(buf.capacity() < 4096, "capacity {}", buf.capacity());
    }
}
