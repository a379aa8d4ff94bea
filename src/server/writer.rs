//! The writer task of one WebSocket connection (`ws.rs` runs it beside the reader). Each round
//! it takes what the session has ready (control messages, acks whose events have an outcome,
//! queued event frames), formats all of it into one buffer and writes it with one call. It pings,
//! catches up from the log while the session lags, and closes with the right code, the pending
//! acks first.
//!
//! A write of events that the peer does not take for `WRITE_WAIT` finishes the frame it is in,
//! and the events after it go back to the log (`give_back`), together with whatever fan-out
//! queued meanwhile. The session then reads them again from the log, as a lagging one does, once
//! its peer reads. A peer that stopped reading so holds one frame of the outbound budget and of
//! memory, not its queue or a catch-up batch.

use super::budget::Charge;
use super::catchup;
use super::fanout::Hub;
use super::session::{Control, Mode, Session};
use super::stall::{Acked, WriteStall};
use crate::config::ServerOptions;
use crate::event_id::EventId;
use crate::wire::encode;
use bytes::Bytes;
use fastwebsockets::{Frame, OpCode, Payload};
use futures_util::FutureExt;
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

/// How long a closing connection waits for the outcomes of its pending acks (a commit takes
/// milliseconds; this bounds a close while the disk hangs).
const ACKS_BEFORE_CLOSE: std::time::Duration = std::time::Duration::from_secs(2);

/// Events per catch-up read, at most.
const CATCHUP_BATCH_EVENTS: usize = 1024;
/// Frame bytes per catch-up read, about (one frame more at most), counting each frame's entry
/// (`budget::ENTRY_BYTES`): a lagging session holds no more than this of the log in memory
/// (and its copy in the write buffer), however large its events or many its subscriptions.
const CATCHUP_BATCH_BYTES: usize = 256 * 1024;

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

pub(super) async fn write_loop<W: AsyncWrite + Acked + Unpin>(
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
            write_or_give_back(
                hub,
                session,
                &mut write,
                &mut bufs.out,
                &bufs.ends,
                &mut taken.charge,
            )
            .await?;
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

/// Writes `buf`, whose event frames end at `ends`, while the peer takes it. A write the peer
/// stops taking for `WRITE_WAIT` finishes the frame it stopped in and gives the rest back to the
/// log (`give_back`); `charge` and `buf` are cut down to what is left before that is written.
/// Live writes and catch-up batches alike.
async fn write_or_give_back<W: AsyncWrite + Unpin>(
    hub: &Hub,
    session: &Session,
    write: &mut W,
    buf: &mut Vec<u8>,
    ends: &[(usize, EventId)],
    charge: &mut Charge,
) -> std::io::Result<()> {
    let written = write_while_taken(write, buf).await?;
    if written < buf.len() {
        let keep_to = give_back(hub, session, ends, written, buf.len());
        // Down to what is left, never up (acks and control bytes are not charged): growing
        // would wait for budget before the write.
        charge.resize((keep_to - written).min(charge.bytes())).await;
        keep_only(buf, written, keep_to);
        write.write_all(buf).await?;
    }
    Ok(())
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
    // A peer that stopped taking bytes does not hold the batch either.
    write_or_give_back(hub, session, write, buf, &ends, &mut share).await?;
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
