//! One WebSocket connection (`ivy1`): a reader task that parses commands, beside a writer task
//! (`writer.rs`) that sends what the session has ready.
//!
//! Frames are read with fastwebsockets (automatic pong and close are off, so this module sees
//! every frame and answers control frames through the writer); messages are reassembled here,
//! with the size limit applied to the whole message (fastwebsockets' own collector has none).
//! While the writer is idle, fan-out may write queued event frames to the socket itself
//! (`Hub::flush`); `Session::is_writing` keeps the two from writing at once. Under `ivy serve`
//! the reader, the writer and fan-out share the socket (`tcp.rs`); on a stream an embedding
//! program gave hyper, the two tasks split it and only the writer writes.

use super::fanout::Hub;
use super::linger::LingeringTcp;
use super::session::{Control, Mode, Session};
use super::stall::Acked;
use super::tcp::{self, SharedTcp};
use super::writer;
use crate::channel::ChannelPath;
use crate::clock::{Clock, SystemClock};
use crate::config::ServerOptions;
use crate::event_id::EventId;
use crate::wire::mask::{MaskCheck, Unmasked};
use crate::wire::{command, encode};
use bytes::Bytes;
use fastwebsockets::{Frame, OpCode, Role};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use std::future::Future;
use std::sync::Arc;
use std::task::Poll;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::sync::watch;

/// How long a connection with nothing to parse keeps its frame parser (and its buffer) before
/// releasing it (it is checked every this long, so between one and two of these): long enough
/// that a busy connection never pays for re-creating it.
const PARSER_RELEASE: std::time::Duration = std::time::Duration::from_secs(2);

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
            tcp::bound_send_buffer(&tcp, opts.ws_send_buffer_bytes);
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
    if let Err(e) = writer::write_loop(&hub, &opts, write, session, shutdown).await {
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
