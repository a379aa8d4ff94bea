//! Per-connection state shared by the connection's tasks and the fan-out: the subscriptions, the
//! bounded queue of event frames, the control lines (acks, replies) and the delivery mode.
//!
//! **Modes.** `Live`: fan-out pushes each event's shared frame into `queue`. When the queue
//! would pass `queue_bytes_max`, or the server's budget for all queues (`budget.rs`) has no
//! room for the frame, the session turns `Lagging` with `cursor` = the last event fan-out
//! handled for it (queued, or skipped as its own): fan-out stops queueing for it (it only counts `missed`), and the connection's writer,
//! once the queue is drained, reads the log after `cursor` itself (`catchup.rs`) and rejoins live
//! when it has caught up with the fan-out. The log is the buffer, so memory stays bounded
//! whatever the subscriber's speed; past `lag_events_max` missed events it is closed with 1013.
//!
//! **One writer at a time.** Two parties write to a connection's socket: its writer task, and
//! fan-out's direct write of queued events (`Hub::flush`). Fan-out writes only under the state
//! lock, when `is_writing` is clear and no control message or `partial` rest waits; the writer
//! sets `is_writing` under the same lock when it takes anything, and clears it once written.
//!
//! **Lock order:** the hub's state (`fanout.rs`), then a session's state. Nothing awaits while
//! holding either; fan-out's direct write under a session's lock is a non-blocking send.

use super::budget::{self, Budget, Charge};
use crate::channel::ChannelPath;
use crate::event_id::EventId;
use bytes::Bytes;
use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;

pub type SessionId = u64;

/// Own publishes remembered for sender exclusion in log reads; the oldest are forgotten past
/// this, so a resume from far back may return a session's own events from long ago.
const OWN_IDS_MAX: usize = 16_384;

/// Own publishes that fan-out has passed, kept by a live session: only a resume (`+/path@TS`)
/// on this connection can still meet them. Without this bound a connection that publishes and
/// never receives kept `OWN_IDS_MAX` ids, 128-256 KiB (measured under `ivy-bench publish
/// --connections 1000 --window 16`: 169 MB of anonymous memory, most of it these ids).
pub(crate) const OWN_PASSED_KEPT: usize = 1024;

/// Reply bytes (control messages and acks not yet written, each counted with
/// `REPLY_ENTRY_BYTES` more) a session may hold before its reader stops reading the peer's
/// frames, until the writer has written them down to half of this (`Session::room_for_replies`).
/// A peer that pipelines commands and does not read the replies must not make the server hold
/// them all: 6 M pipelined `@` left unread took the server to 734 MB before this bound. Past it,
/// the peer meets TCP backpressure, as a publisher does when the disk is behind.
pub const REPLY_BYTES_MAX: usize = 1 << 20;
/// What a reply costs besides its bytes (its queue entry, its frame head).
const REPLY_ENTRY_BYTES: usize = 32;

pub struct Session {
    pub id: SessionId,
    /// The text session id of the intro line (`~/sid`), used by HTTP publish's `sid`.
    pub sid: Box<str>,
    pub state: Mutex<SessionState>,
    /// Wakes the connection's writer.
    pub wake: tokio::sync::Notify,
    /// Wakes the reader waiting for room for replies (`room_for_replies`).
    pub replies_taken: tokio::sync::Notify,
    /// The last event id fan-out considered for this session (the last of the run of one
    /// channel's events it delivered), so that overlapping subscriptions (`/a` and `/a/b`)
    /// yield one copy. Only the dispatcher thread touches it.
    pub last_considered: AtomicU64,
    /// The session is in the dispatcher's list of sessions to flush (`fanout.rs`, `Dirty`).
    /// Only the dispatcher thread touches it.
    pub is_awaiting_flush: AtomicBool,
    /// The writer task is writing what it took: nobody else may write to the socket. Set under
    /// the state lock (in `take`), cleared by the writer when its write is complete.
    pub is_writing: AtomicBool,
}

/// A message that is not an event.
#[derive(Debug, Clone)]
pub enum Control {
    Text(Bytes),
    Pong(Bytes),
    Ping,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Live,
    Lagging { cursor: EventId, missed: u64 },
}

pub struct SessionState {
    /// Event frames, in id order.
    pub queue: VecDeque<(EventId, Bytes)>,
    /// What `queue` and `partial` are charged to the server's outbound budget (`budget.rs`):
    /// their bytes, plus `budget::ENTRY_BYTES` per queued frame. Bounded by `queue_bytes_max`;
    /// given back as they are written or dropped, and when the session ends.
    pub queued_bytes: usize,
    /// Non-event messages (acks, time, refusals, pongs), in the order they were made.
    pub control: VecDeque<Control>,
    /// Publish acks waiting for their event to be committed, in id order, with their keys (kept
    /// inline up to 24 bytes: an allocation per publish was measurable).
    pub pending_acks: VecDeque<(EventId, compact_str::CompactString)>,
    /// What `control` and `pending_acks` hold, counted as `REPLY_BYTES_MAX` says.
    pub reply_bytes: usize,
    /// The reader waits for the writer to take replies (`Session::room_for_replies`).
    pub is_reader_waiting: bool,
    pub mode: Mode,
    /// The last event id fan-out handled for this session while live: queued, or skipped as its
    /// own. A session that turns lagging reads the log after it.
    pub last_queued: EventId,
    /// The last event id the writer took for sending: ids on the connection stay above it.
    pub last_taken: EventId,
    /// Channel -> the id after which its events are delivered.
    pub subscriptions: HashMap<ChannelPath, EventId>,
    /// Ids this session published that fan-out or a log read may still meet (sender
    /// exclusion), in increasing order.
    pub own: VecDeque<EventId>,
    /// The largest own id that `note_own` forgot before fan-out or a write was past it.
    pub own_forgotten: EventId,
    /// A close the writer must send: (code, reason).
    pub close: Option<(u16, &'static str)>,
    /// The socket, when fan-out may write to it directly (`fanout.rs`, `tcp.rs`).
    pub direct: Option<Arc<tokio::net::TcpStream>>,
    /// The unsent end of a direct write that the socket did not take whole: already framed,
    /// the writer sends it before anything else.
    pub partial: Option<Bytes>,
    /// The server's outbound budget, which `queued_bytes` is charged to.
    budget: Arc<Budget>,
}

impl Session {
    pub fn new(id: SessionId, sid: Box<str>, budget: Arc<Budget>) -> Session {
        Session {
            id,
            sid,
            state: Mutex::new(SessionState {
                queue: VecDeque::new(),
                queued_bytes: 0,
                control: VecDeque::new(),
                pending_acks: VecDeque::new(),
                reply_bytes: 0,
                is_reader_waiting: false,
                mode: Mode::Live,
                last_queued: EventId(0),
                last_taken: EventId(0),
                subscriptions: HashMap::new(),
                own: VecDeque::new(),
                own_forgotten: EventId(0),
                close: None,
                direct: None,
                partial: None,
                budget,
            }),
            wake: tokio::sync::Notify::new(),
            replies_taken: tokio::sync::Notify::new(),
            last_considered: AtomicU64::new(0),
            is_awaiting_flush: AtomicBool::new(false),
            is_writing: AtomicBool::new(false),
        }
    }

    /// Queues a control message and wakes the writer.
    pub fn send_control(&self, message: Control) {
        self.state.lock().push_control(message);
        self.wake.notify_one();
    }

    /// Asks the writer to close the connection with `code`.
    pub fn close(&self, code: u16, reason: &'static str) {
        let mut state = self.state.lock();
        if state.close.is_none() {
            tracing::debug!(sid = %self.sid, code, reason, "closing");
            state.close = Some((code, reason));
        }
        drop(state);
        self.wake.notify_one();
    }
}

impl Control {
    fn reply_bytes(&self) -> usize {
        REPLY_ENTRY_BYTES
            + match self {
                Control::Text(b) | Control::Pong(b) => b.len(),
                Control::Ping => 0,
            }
    }
}

impl Session {
    /// Waits while the session holds `REPLY_BYTES_MAX` of replies or more, until the writer has
    /// taken them down to half (or the session closes). Only the reader calls it.
    pub async fn room_for_replies(&self) {
        loop {
            {
                let mut st = self.state.lock();
                if st.reply_bytes < REPLY_BYTES_MAX / 2 || st.close.is_some() {
                    st.is_reader_waiting = false;
                    return;
                }
                st.is_reader_waiting = true;
            }
            // A notification sent since the lock was released is kept for this wait.
            self.replies_taken.notified().await;
        }
    }
}

impl SessionState {
    pub fn push_control(&mut self, message: Control) {
        self.reply_bytes += message.reply_bytes();
        self.control.push_back(message);
    }

    pub fn push_ack(&mut self, id: EventId, key: compact_str::CompactString) {
        self.reply_bytes += REPLY_ENTRY_BYTES + key.len();
        self.pending_acks.push_back((id, key));
    }

    /// Takes the control messages, in order, for the writer.
    pub fn take_control(&mut self) -> std::collections::vec_deque::Drain<'_, Control> {
        for message in &self.control {
            self.reply_bytes -= message.reply_bytes();
        }
        self.control.drain(..)
    }

    /// Takes the oldest pending ack for the writer.
    pub fn take_ack(&mut self) -> Option<(EventId, compact_str::CompactString)> {
        let (id, key) = self.pending_acks.pop_front()?;
        self.reply_bytes -= REPLY_ENTRY_BYTES + key.len();
        Some((id, key))
    }

    pub fn has_too_many_replies(&self) -> bool {
        self.reply_bytes >= REPLY_BYTES_MAX
    }

    /// After the writer took replies: wakes the reader if it waits and there is room now.
    pub fn note_replies_taken(&mut self, replies_taken: &tokio::sync::Notify) {
        if self.is_reader_waiting && self.reply_bytes < REPLY_BYTES_MAX / 2 {
            self.is_reader_waiting = false;
            replies_taken.notify_one();
        }
    }

    /// Drops queued events above `cursor` (they will be read from the log again) and returns
    /// to reading from the log after `cursor`, or after the current lagging cursor if that is
    /// earlier (moving it forward would skip events of the other subscriptions). The lag count
    /// (`missed`) is kept, not raised by the backlog: a resume from far back asked for that
    /// backlog, and is closed as lagging only if it then keeps falling further behind.
    /// Returns how many queued events it dropped.
    pub fn rewind_to(&mut self, cursor: EventId) -> usize {
        let cursor = match self.mode {
            Mode::Lagging {
                cursor: current, ..
            } => current.min(cursor),
            Mode::Live => cursor,
        };
        let mut dropped = 0;
        while self.queue.back().is_some_and(|(id, _)| *id > cursor) {
            if let Some((_, frame)) = self.queue.pop_back() {
                let cost = frame.len() + budget::ENTRY_BYTES;
                self.queued_bytes -= cost;
                self.budget.give_back(cost);
                dropped += 1;
            }
        }
        let missed = match self.mode {
            Mode::Lagging { missed, .. } => missed,
            Mode::Live => 0,
        };
        self.mode = Mode::Lagging { cursor, missed };
        dropped
    }

    /// Charges a frame to the queue's bound and the server's budget, and queues it; or, when
    /// either has no room, leaves everything as it was and returns `false`.
    pub fn try_queue(&mut self, id: EventId, frame: &Bytes, queue_bytes_max: usize) -> bool {
        let cost = frame.len() + budget::ENTRY_BYTES;
        if self.queued_bytes + cost > queue_bytes_max || !self.budget.try_take(cost) {
            return false;
        }
        self.queued_bytes += cost;
        self.queue.push_back((id, frame.clone()));
        true
    }

    /// Hands what the queue and `partial` are charged to whoever took them for writing; it is
    /// given back when that charge is dropped, after the write.
    pub fn take_charge(&mut self) -> Charge {
        Charge::new(&self.budget, std::mem::take(&mut self.queued_bytes))
    }

    /// Keeps `bytes` of the charge (for what is left to write in `partial`) and gives the rest
    /// back.
    pub fn keep_charge(&mut self, bytes: usize) {
        let kept = bytes.min(self.queued_bytes);
        self.budget.give_back(self.queued_bytes - kept);
        self.queued_bytes = kept;
    }

    /// Remembers an id this session published. Usually the largest so far, so it goes at the
    /// back without a search (a publisher that subscribes to nothing keeps `OWN_IDS_MAX` ids,
    /// and searching them was 5% of the server's CPU under `ivy-bench publish`). An HTTP
    /// publish with this session's `sid` on another stream can interleave; that one is placed.
    ///
    /// `passed` is how far fan-out has dispatched. While the session is live, own ids at or
    /// below it are needed only by a resume on this connection, so only the newest
    /// `OWN_PASSED_KEPT` of them are kept: fan-out has handled them, and a session that turns
    /// lagging reads the log after `last_queued`, which own events it skipped have moved past.
    /// (A lagging session's catch-up still needs those above its cursor: it keeps them.)
    pub fn note_own(&mut self, id: EventId, passed: EventId) {
        if self.own.len() >= OWN_IDS_MAX {
            self.forget_oldest_own();
        }
        if self.mode == Mode::Live {
            while self.own.len() >= OWN_PASSED_KEPT
                && self.own.front().is_some_and(|o| *o <= passed)
            {
                self.forget_oldest_own();
            }
        }
        if self.own.back().is_none_or(|last| *last < id) {
            self.own.push_back(id);
        } else {
            let at = self.own.partition_point(|x| *x < id);
            self.own.insert(at, id);
        }
    }

    fn forget_oldest_own(&mut self) {
        if let Some(id) = self.own.pop_front() {
            self.own_forgotten = self.own_forgotten.max(id);
        }
    }

    /// Whether the log may be read again after `id` for this session: a writer gives events back
    /// to the log only then (`writer.rs`, `give_back`). Not when an own id above `id` was forgotten
    /// (`note_own` keeps a bounded number): reading again would deliver that event to its sender.
    pub fn may_read_again_after(&self, id: EventId) -> bool {
        self.own_forgotten <= id
    }

    pub fn is_own(&self, id: EventId) -> bool {
        self.own.binary_search(&id).is_ok()
    }

    /// Forgets own ids at or below `upto`: nothing delivers them again (fan-out is past them, and
    /// log reads start above `last_taken`).
    pub fn prune_own(&mut self, upto: EventId) {
        while self.own.front().is_some_and(|id| *id <= upto) {
            self.own.pop_front();
        }
    }
}

impl Drop for SessionState {
    fn drop(&mut self) {
        self.budget.give_back(self.queued_bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unbounded() -> Arc<Budget> {
        Arc::new(Budget::new(usize::MAX))
    }

    /// Replies are counted as they are queued and as the writer takes them, and the reader
    /// waiting for room is woken only once they are down to half the bound.
    #[test]
    fn replies_are_counted_in_and_out_and_the_reader_is_woken_at_half() {
        let session = Session::new(1, "s".into(), unbounded());
        let mut st = session.state.lock();
        let line = Bytes::from(vec![b'x'; 1000]);
        while !st.has_too_many_replies() {
            st.push_control(Control::Text(line.clone()));
            st.push_ack(EventId(1), compact_str::CompactString::new("key"));
        }
        assert_eq!(
            st.reply_bytes,
            st.control.len() * (REPLY_ENTRY_BYTES + 1000)
                + st.pending_acks.len() * (REPLY_ENTRY_BYTES + 3)
        );
        st.is_reader_waiting = true;
        // Acks taken alone leave it above half: no wake-up.
        while st.take_ack().is_some() {}
        st.note_replies_taken(&session.replies_taken);
        assert!(st.is_reader_waiting);
        let controls = st.control.len();
        assert_eq!(st.reply_bytes, controls * (REPLY_ENTRY_BYTES + 1000));
        assert_eq!(st.take_control().count(), controls);
        assert_eq!(st.reply_bytes, 0);
        st.note_replies_taken(&session.replies_taken);
        assert!(!st.is_reader_waiting);
    }

    /// Frames `@ID` (3 bytes for two-digit ids).
    fn queued(st: &mut SessionState, ids: &[u64]) {
        for id in ids {
            assert!(st.try_queue(EventId(*id), &Bytes::from(format!("@{id}")), usize::MAX));
        }
    }

    const FRAME: usize = 3 + budget::ENTRY_BYTES;

    #[test]
    fn queued_frames_are_charged_to_the_queue_and_the_server_and_given_back() {
        let budget = Arc::new(Budget::new(3 * FRAME));
        let a = Session::new(1, "a".into(), Arc::clone(&budget));
        let b = Session::new(2, "b".into(), Arc::clone(&budget));
        let frame = Bytes::from_static(b"@10");
        let mut st = a.state.lock();
        // The session's own bound.
        assert!(st.try_queue(EventId(10), &frame, 2 * FRAME));
        assert!(st.try_queue(EventId(11), &frame, 2 * FRAME));
        assert!(!st.try_queue(EventId(12), &frame, 2 * FRAME));
        assert_eq!((st.queue.len(), st.queued_bytes), (2, 2 * FRAME));
        drop(st);
        // The server's: one frame's room is left, whatever b's own bound.
        let mut other = b.state.lock();
        assert!(other.try_queue(EventId(10), &frame, usize::MAX));
        assert!(!other.try_queue(EventId(11), &frame, usize::MAX));
        assert_eq!(budget.held(), 3 * FRAME);
        // A writer takes a's queue: charged until its charge is dropped.
        let charge = a.state.lock().take_charge();
        assert_eq!(budget.held(), 3 * FRAME);
        drop(charge);
        assert_eq!(budget.held(), FRAME);
        // A direct write that left 2 bytes unsent keeps 2 bytes of the charge.
        other.keep_charge(2);
        assert_eq!((other.queued_bytes, budget.held()), (2, 2));
        drop(other);
        // A session that ends gives back what it still holds.
        drop(b);
        assert_eq!(budget.held(), 0);
    }

    #[test]
    fn rewind_drops_queued_events_above_the_cursor_and_never_moves_a_lagging_cursor_forward() {
        let budget = unbounded();
        let session = Session::new(1, "s".into(), Arc::clone(&budget));
        let mut st = session.state.lock();
        queued(&mut st, &[10, 20, 30]);
        st.rewind_to(EventId(20));
        assert_eq!(
            st.queue.iter().map(|(id, _)| id.0).collect::<Vec<_>>(),
            [10, 20]
        );
        assert_eq!(st.queued_bytes, 2 * FRAME);
        assert_eq!(budget.held(), 2 * FRAME);
        assert_eq!(
            st.mode,
            Mode::Lagging {
                cursor: EventId(20),
                missed: 0
            }
        );
        st.mode = Mode::Lagging {
            cursor: EventId(15),
            missed: 7,
        };
        st.rewind_to(EventId(25));
        assert_eq!(
            st.mode,
            Mode::Lagging {
                cursor: EventId(15),
                missed: 7
            }
        );
        assert_eq!(
            st.queue.iter().map(|(id, _)| id.0).collect::<Vec<_>>(),
            [10]
        );
    }

    #[test]
    fn own_ids_stay_sorted_and_are_pruned() {
        let mut st = Session::new(1, "s".into(), unbounded()).state.into_inner();
        for id in [5, 9, 7, 11, 3, 12] {
            st.note_own(EventId(id), EventId(0));
        }
        assert!(st.is_own(EventId(7)) && !st.is_own(EventId(8)));
        st.prune_own(EventId(7));
        assert_eq!(
            st.own.iter().map(|id| id.0).collect::<Vec<_>>(),
            [9, 11, 12]
        );
    }

    #[test]
    fn the_log_is_read_again_only_above_the_own_ids_it_forgot() {
        let mut st = Session::new(1, "s".into(), unbounded()).state.into_inner();
        let n = 2 * OWN_PASSED_KEPT as u64;
        for id in 1..=n {
            st.note_own(EventId(id), EventId(id));
        }
        let forgotten = n - OWN_PASSED_KEPT as u64;
        assert!(!st.is_own(EventId(forgotten)) && st.is_own(EventId(forgotten + 1)));
        assert!(!st.may_read_again_after(EventId(forgotten - 1)));
        assert!(st.may_read_again_after(EventId(forgotten)));
        // Pruning what was sent is no forgetting: reads start above it.
        st.prune_own(EventId(n));
        assert!(st.may_read_again_after(EventId(forgotten)));
    }

    #[test]
    fn a_live_session_keeps_few_own_ids_that_fan_out_passed_and_a_lagging_one_keeps_them_all() {
        let mut st = Session::new(1, "s".into(), unbounded()).state.into_inner();
        let n = 3 * OWN_PASSED_KEPT as u64;
        // Fan-out is always 100 behind: those 100 are in flight and all kept.
        for id in 1..=n {
            st.note_own(EventId(id), EventId(id.saturating_sub(100)));
        }
        assert_eq!(st.own.len(), OWN_PASSED_KEPT);
        assert!(st.is_own(EventId(n - 100 + 1)) && st.is_own(EventId(n)));
        // Lagging after `n`: every own id above the cursor may be met by the catch-up.
        st.mode = Mode::Lagging {
            cursor: EventId(n),
            missed: 0,
        };
        for id in n + 1..=2 * n {
            st.note_own(EventId(id), EventId(id - 1));
        }
        assert!((n + 1..=2 * n).all(|id| st.is_own(EventId(id))));
    }

    #[test]
    fn own_ids_keep_the_newest_when_full() {
        let mut st = Session::new(1, "s".into(), unbounded()).state.into_inner();
        let n = OWN_IDS_MAX as u64 + 10;
        for id in 1..=n {
            st.note_own(EventId(id), EventId(0));
        }
        assert_eq!(st.own.len(), OWN_IDS_MAX);
        assert!(!st.is_own(EventId(10)) && st.is_own(EventId(11)) && st.is_own(EventId(n)));
        // One out of order, after the oldest was forgotten, still lands in its place.
        st.note_own(EventId(n - 1), EventId(0));
        st.note_own(EventId(n + 5), EventId(0));
        st.note_own(EventId(n + 2), EventId(0));
        let tail: Vec<u64> = st.own.iter().rev().take(3).map(|id| id.0).collect();
        assert_eq!(tail, [n + 5, n + 2, n]);
    }
}
