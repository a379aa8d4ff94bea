//! Fan-out: the subscription index and the dispatcher thread that delivers committed events.
//!
//! **Ordering across streams.** Streams are written in parallel, so event 6 of one stream can be
//! durable before event 5 of another. The dispatcher therefore never looks at a stream's own
//! progress: it follows the store's **commit watermark** (`Store::committed`, see
//! `storage/commit.rs`), under which every event is committed in every stream, and reads the
//! log in id order up to it. Every connection receives ids in strictly increasing order, and
//! only committed events (durable under `always`): no subscriber sees an event a crash takes back.
//!
//! **Once per connection.** For each run of consecutive events of one channel the dispatcher
//! walks the channel's ancestors up to `/`, looks each up in the index, and queues the events'
//! frames, each encoded once and shared by reference count, to each session once
//! (`Session::last_considered`), under one lock of the session per run, skipping its own.
//!
//! **Writing.** The dispatcher alternates between delivering what was committed into the
//! sessions' queues and flushing the sessions whose queue turned non-empty, oldest first, a
//! slice at a time (`Dirty`, `flush`). An event committed while it walks a thousand sockets
//! therefore reaches every socket not yet written in that walk, rather than waiting for the
//! walk to end. No session is given more than `DISPATCH_BATCH_EVENTS` between two flushes, so a
//! backlog still goes out in batches of that size, each to every session in turn. When the
//! connection's writer task is idle, `flush` writes the frames to the socket itself, without
//! blocking, and leaves only what the socket does not take to the writer. Waking a task per
//! connection for every write cost more than the write (measured under `ivy-bench fanout`:
//! 4.2-4.3 M deliveries/s with a wake per write, 5.1-5.3 M without).
//!
//! **Sender exclusion.** A publisher records each id in its own session (`SessionState::own`)
//! from inside the append, under the stream lock, before the event can be committed; so when the
//! dispatcher meets an event, its publisher has always recorded it, and is skipped.
//!
//! **Boundaries.** Subscribing, unsubscribing and rejoining live take the hub lock, which the
//! dispatcher holds while it delivers a batch, so `dispatched` is exact at that moment: events
//! above it are delivered under the new state, none at or below it are.

use super::budget::Budget;
use super::recent::RecentFrames;
use super::session::{Mode, Session, SessionId, SessionState};
use crate::channel::{ChannelPath, Selector};
use crate::event_id::EventId;
use crate::metrics::Metrics;
use crate::storage::{Query, Store};
use crate::wire::line;
use bytes::Bytes;
use event_listener::Listener;
use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::ops::Bound;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Events a session may be given between two flushes of it, which is also the most the
/// dispatcher delivers under one hold of the hub lock. (When the dispatcher falls behind, this
/// is how many events one write to a subscriber carries at most.)
const DISPATCH_BATCH_EVENTS: usize = 256;

/// Frame bytes kept for sessions that read the log back (`recent.rs`): about 50,000 frames of
/// 100-byte events, seconds of the busiest fan-out measured.
const RECENT_FRAMES_BYTES: usize = 8 << 20;

/// Sessions flushed between two looks at the commit watermark.
const FLUSH_SLICE_SESSIONS: usize = 32;

/// The sessions with queued events and no flush yet, oldest first, each with the dispatcher's
/// event count when it joined: a session joins when its queue turns non-empty, and new events
/// are delivered only while the oldest has been given fewer than `DISPATCH_BATCH_EVENTS` since.
/// A session is in it at most once (`Session::is_awaiting_flush`), so it never holds more
/// entries than there are sessions, even when writer tasks empty queues behind its back.
#[derive(Default)]
struct Dirty {
    queue: VecDeque<(Arc<Session>, u64)>,
    /// Events delivered so far.
    delivered: u64,
}

impl Dirty {
    /// How many events may be delivered now.
    fn budget(&self) -> usize {
        let given = self
            .queue
            .front()
            .map_or(0, |(_, joined)| self.delivered - joined);
        DISPATCH_BATCH_EVENTS.saturating_sub(usize::try_from(given).unwrap_or(usize::MAX))
    }

    /// Sessions whose queue turned non-empty during a delivery of `events` events.
    fn add(&mut self, touched: Vec<Arc<Session>>, events: usize) {
        let joined = self.delivered;
        for session in touched {
            // Only the dispatcher thread touches the flag: a load and a store do.
            if !session.is_awaiting_flush.load(Ordering::Relaxed) {
                session.is_awaiting_flush.store(true, Ordering::Relaxed);
                self.queue.push_back((session, joined));
            }
        }
        self.delivered += events as u64;
    }

    fn pop(&mut self) -> Option<Arc<Session>> {
        let (session, _) = self.queue.pop_front()?;
        session.is_awaiting_flush.store(false, Ordering::Relaxed);
        Some(session)
    }

    fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
}

pub struct Hub {
    pub store: Store,
    pub metrics: Arc<Metrics>,
    state: Mutex<HubState>,
    sessions_by_sid: Mutex<HashMap<Box<str>, Arc<Session>>>,
    large_event_bytes: usize,
    queue_bytes_max: usize,
    /// Event bytes held for all subscribers together (`budget.rs`).
    pub outbound: Arc<Budget>,
    /// The frames dispatched last, for sessions that read the log back (`recent.rs`).
    recent: RecentFrames,
    lag_events_max: u64,
    subscriptions_total_max: usize,
    is_stopping: AtomicBool,
    /// `HubState::dispatched`, stored once every event up to it has been pushed to its sessions
    /// (`Hub::dispatched`).
    dispatched_mirror: AtomicU64,
}

/// Why a `+` was refused: the reason for `#KEY#!`, and the close code for an unkeyed one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubscribeRefusal {
    pub reason: &'static str,
    pub close_code: u16,
}

impl SubscribeRefusal {
    /// The client asked for what it may not have (1008, policy).
    const fn policy(reason: &'static str) -> SubscribeRefusal {
        SubscribeRefusal {
            reason,
            close_code: 1008,
        }
    }
}

struct HubState {
    index: HashMap<ChannelPath, Vec<Arc<Session>>>,
    /// Subscriptions of all sessions (the index's entries).
    subscriptions: usize,
    /// Every event at or below this id has been dispatched.
    dispatched: EventId,
}

impl Hub {
    pub fn new(store: Store, metrics: Arc<Metrics>, opts: &crate::config::ServerOptions) -> Hub {
        let start = store.committed();
        Hub {
            store,
            metrics,
            state: Mutex::new(HubState {
                index: HashMap::new(),
                subscriptions: 0,
                dispatched: start,
            }),
            sessions_by_sid: Mutex::new(HashMap::new()),
            large_event_bytes: opts.large_event_bytes,
            queue_bytes_max: opts.queue_bytes_max,
            outbound: Arc::new(Budget::new(opts.queue_bytes_total_max)),
            recent: RecentFrames::new(RECENT_FRAMES_BYTES),
            lag_events_max: opts.lag_events_max,
            subscriptions_total_max: opts.subscriptions_total_max,
            is_stopping: AtomicBool::new(false),
            dispatched_mirror: AtomicU64::new(start.0),
        }
    }

    pub fn register(&self, session: &Arc<Session>) {
        self.sessions_by_sid
            .lock()
            .insert(session.sid.clone(), Arc::clone(session));
    }

    /// Removes a closed session from the index.
    pub fn unregister(&self, session: &Arc<Session>) {
        self.sessions_by_sid.lock().remove(&session.sid);
        let mut hub = self.state.lock();
        let paths: Vec<ChannelPath> = session.state.lock().subscriptions.keys().cloned().collect();
        for path in paths {
            remove_from_index(&mut hub.index, &path, session.id);
            hub.subscriptions -= 1;
            self.metrics.subscriptions.dec();
        }
    }

    pub fn session_by_sid(&self, sid: &str) -> Option<Arc<Session>> {
        self.sessions_by_sid.lock().get(sid).cloned()
    }

    /// Appends an event for `origin` (excluded from its delivery) without waiting for the
    /// commit; returns the id. Never blocks: await `Store::room` first.
    pub fn publish(
        &self,
        path: &ChannelPath,
        data: &[u8],
        origin: Option<&Arc<Session>>,
    ) -> crate::storage::Result<EventId> {
        match origin {
            Some(session) => self
                .publish_batch(&[(path, data)], session, &mut |_, _| {})?
                .ok_or(crate::storage::Error::Closed),
            None => self
                .store
                .append_batch_nowait_with(&[(path, data)], &mut |_| {})?
                .ok_or(crate::storage::Error::Closed),
        }
    }

    /// Appends a connection's pipelined publishes (`Store::append_batch_nowait_with`), each
    /// excluded from its delivery to `origin`: the id is recorded as the session's own from
    /// inside the append, before the event can be committed. `on_id` is told each new id with
    /// the session's state, under that same lock (one lock per event).
    pub fn publish_batch(
        &self,
        events: &[(&ChannelPath, &[u8])],
        origin: &Arc<Session>,
        on_id: &mut dyn FnMut(&mut SessionState, EventId),
    ) -> crate::storage::Result<Option<EventId>> {
        self.store.append_batch_nowait_with(events, &mut |id| {
            let passed = self.dispatched();
            let mut st = origin.state.lock();
            st.note_own(id, passed);
            on_id(&mut st, id);
        })
    }

    /// Subscribes; returns the boundary id. `resume_after` replays the log after it first. A
    /// session holds at most `max` subscriptions, and the server `subscriptions_total_max` (each
    /// costs a few hundred bytes: without a bound, many connections could take all memory).
    pub fn subscribe(
        &self,
        session: &Arc<Session>,
        path: ChannelPath,
        resume_after: Option<EventId>,
        max: usize,
    ) -> Result<EventId, SubscribeRefusal> {
        let mut hub = self.state.lock();
        let boundary = hub.dispatched;
        let mut st = session.state.lock();
        let is_new = !st.subscriptions.contains_key(&path);
        if is_new && st.subscriptions.len() >= max {
            return Err(SubscribeRefusal::policy("too many subscriptions"));
        }
        if is_new && hub.subscriptions >= self.subscriptions_total_max {
            // Not this client's doing: it may try again later (1013).
            return Err(SubscribeRefusal {
                reason: "too many subscriptions on this server",
                close_code: 1013,
            });
        }
        let since = match resume_after {
            Some(ts) => {
                if ts < st.last_taken {
                    return Err(SubscribeRefusal::policy(
                        "resume point is behind this connection; resume on a new connection",
                    ));
                }
                ts
            }
            None => boundary,
        };
        let entry = st.subscriptions.entry(path.clone()).or_insert(since);
        *entry = (*entry).min(since);
        if let Some(ts) = resume_after {
            if st.mode == Mode::Live {
                self.metrics.lagging.inc();
            }
            st.rewind_to(ts.min(boundary));
        }
        drop(st);
        if is_new {
            hub.index.entry(path).or_default().push(Arc::clone(session));
            hub.subscriptions += 1;
            self.metrics.subscriptions.inc();
        }
        drop(hub);
        if resume_after.is_some() {
            session.wake.notify_one();
        }
        Ok(boundary)
    }

    /// Unsubscribes; returns the boundary id.
    pub fn unsubscribe(&self, session: &Arc<Session>, path: &ChannelPath) -> EventId {
        let mut hub = self.state.lock();
        if session.state.lock().subscriptions.remove(path).is_some() {
            remove_from_index(&mut hub.index, path, session.id);
            hub.subscriptions -= 1;
            self.metrics.subscriptions.dec();
        }
        hub.dispatched
    }

    /// The dispatcher's position, once every event up to it has been pushed to its sessions
    /// (without the hub lock: the publish path and catch-up reads ask often).
    pub fn dispatched(&self) -> EventId {
        EventId(self.dispatched_mirror.load(Ordering::Acquire))
    }

    /// A lagging session that has read the log up to `cursor` rejoins live if the dispatcher is
    /// not past it. Returns whether it did.
    pub fn try_rejoin(&self, session: &Session, cursor: EventId) -> bool {
        let hub = self.state.lock();
        if cursor < hub.dispatched {
            return false;
        }
        let mut st = session.state.lock();
        st.mode = Mode::Live;
        st.last_queued = cursor;
        self.metrics.lagging.dec();
        true
    }

    /// An event's frame for a session reading the log back: the one fan-out encoded, if it is
    /// still kept, else encoded now. `hint` follows a run of increasing ids
    /// (`RecentFrames::get`).
    pub fn frame(&self, id: EventId, path: &str, data: &[u8], hint: &mut usize) -> Bytes {
        self.recent
            .get(id, hint)
            .unwrap_or_else(|| self.encode(id, path, data))
    }

    /// The frame of an event: its line, or the large-event notice.
    pub fn encode(&self, id: EventId, path: &str, data: &[u8]) -> Bytes {
        let mut out = Vec::with_capacity(32 + path.len() + data.len().min(self.large_event_bytes));
        if data.len() >= self.large_event_bytes {
            line::format_large_notice(&mut out, id, path);
        } else {
            line::format_event_body(&mut out, id, path, data);
        }
        Bytes::from(out)
    }

    pub fn stop(&self) {
        self.is_stopping.store(true, Ordering::Release);
    }

    /// The dispatcher thread's body: follows the watermark until `stop`.
    ///
    /// It alternates two steps: deliver what has been committed into the sessions' queues, and
    /// flush a slice of the sessions whose queue became non-empty, oldest first (`Dirty`). So an
    /// event committed while the dispatcher is writing to a thousand sockets joins that walk at
    /// once, for every session not yet written to, instead of waiting for the walk to end and
    /// then for its own place in the next one. (Measured side by side, `ivy-bench fanout` paced
    /// at 400 events/s to 1,000 subscribers: p50 23.6 -> 15.3 ms, p99 51.0 -> 38.7 ms, against
    /// 9.3 and 36.2 ms for `ivy-bench floor` on the same machine.)
    pub fn run_dispatcher(self: Arc<Hub>) {
        let everything = Selector::Subtree(ChannelPath::root());
        let mut dirty = Dirty::default();
        let mut out = Vec::new();
        while !self.is_stopping.load(Ordering::Acquire) {
            let mut has_failed = false;
            let watermark = self.store.committed();
            let budget = dirty.budget();
            if budget > 0 && watermark > self.dispatched() && !self.skip_if_unsubscribed(watermark)
            {
                if let Err(e) = self.dispatch_some(&everything, watermark, budget, &mut dirty) {
                    tracing::error!(error = %e, "fan-out cannot read the log; retrying");
                    has_failed = true;
                }
            }
            for _ in 0..FLUSH_SLICE_SESSIONS {
                let Some(session) = dirty.pop() else {
                    break;
                };
                self.flush(&session, &mut out);
            }
            if has_failed {
                std::thread::sleep(Duration::from_millis(100));
            } else if dirty.is_empty() {
                let listener = self.store.listen_commits();
                // Checked after listening, so a commit in between still wakes us.
                if self.store.committed() <= self.dispatched() {
                    listener.wait_timeout(Duration::from_millis(100));
                }
            }
        }
    }

    /// With no subscription at all, delivering up to `watermark` is moving `dispatched` there:
    /// the log is not read. Done under the hub lock, as a subscribe takes its boundary under it,
    /// so it is exactly the delivery of those events to nobody. (Measured: reading the log
    /// for nobody was about 6% of the machine's CPU under `ivy-bench publish`.)
    fn skip_if_unsubscribed(&self, watermark: EventId) -> bool {
        let mut hub = self.state.lock();
        if !hub.index.is_empty() {
            return false;
        }
        hub.dispatched = hub.dispatched.max(watermark);
        self.dispatched_mirror
            .store(hub.dispatched.0, Ordering::Release);
        true
    }

    /// Delivers up to `max` committed events after `dispatched`, up to `to`, under the hub lock;
    /// sessions whose queue was empty join `dirty`.
    fn dispatch_some(
        &self,
        everything: &Selector,
        to: EventId,
        max: usize,
        dirty: &mut Dirty,
    ) -> crate::storage::Result<()> {
        let reader = self.store.reader(everything);
        let mut hub = self.state.lock();
        let query = Query {
            start: Bound::Excluded(hub.dispatched),
            end: Bound::Included(to),
            ..Query::all()
        };
        let mut touched = Vec::new();
        let mut queued = 0;
        let mut n = 0;
        let mut read = Ok(());
        // Consecutive events of one channel go to the same sessions, so they are delivered as a
        // run: one lock of each session for the run, not one per event (under `ivy-bench
        // fanout`, most of the dispatcher's own time was the session lock's atomics stalling on
        // each push).
        let mut run: Vec<(EventId, Bytes)> = Vec::new();
        let mut run_path = String::new();
        let mut is_run_subscribed = false;
        for event in reader.events(&query).take(max) {
            let event = match event {
                Ok(event) => event,
                Err(e) => {
                    read = Err(e);
                    break;
                }
            };
            if event.path != run_path {
                queued += self.deliver_run(&hub, &run_path, &run, &mut touched);
                run.clear();
                run_path.clear();
                run_path.push_str(event.path);
                is_run_subscribed = is_subscribed(&hub, event.path);
            }
            if is_run_subscribed {
                run.push((event.id, self.encode(event.id, event.path, event.data)));
            }
            hub.dispatched = event.id;
            n += 1;
        }
        queued += self.deliver_run(&hub, &run_path, &run, &mut touched);
        if read.is_ok() && n < max {
            // Everything up to `to` was read, and `to` (the watermark) need not be an event's id:
            // the position moves to it.
            hub.dispatched = hub.dispatched.max(to);
        }
        // After every push of this batch (they are above, under this same lock).
        self.dispatched_mirror
            .store(hub.dispatched.0, Ordering::Release);
        drop(hub);
        // Counted once per step, not once per delivery: one atomic add instead of a thousand.
        self.metrics.deliveries.inc_by(queued);
        dirty.add(touched, n);
        read
    }

    /// Delivers a run of events of channel `path`, in id order, to every session subscribed to
    /// it or an ancestor, once each (a session reached through two ancestors is skipped the
    /// second time: `last_considered` is already the run's last id), and keeps its frames for
    /// sessions that read the log back (`recent.rs`).
    fn deliver_run(
        &self,
        hub: &HubState,
        path: &str,
        run: &[(EventId, Bytes)],
        touched: &mut Vec<Arc<Session>>,
    ) -> u64 {
        let (Some((first, _)), Some((last, _))) = (run.first(), run.last()) else {
            return 0;
        };
        self.recent.extend(run);
        let mut queued = 0;
        for ancestor in crate::channel::ancestors_of(path) {
            let Some(sessions) = hub.index.get(ancestor) else {
                continue;
            };
            for session in sessions {
                // Only this thread writes it, so a load and a store do (no locked exchange).
                // Ids only grow, so one at or past the run's first id was this run's.
                if session.last_considered.load(Ordering::Relaxed) >= first.0 {
                    continue;
                }
                session.last_considered.store(last.0, Ordering::Relaxed);
                let (pushed, was_empty) = self.push(session, run);
                queued += pushed;
                if was_empty && pushed > 0 {
                    touched.push(Arc::clone(session));
                }
            }
        }
        queued
    }

    /// Queues a run of events for a session under one lock; returns how many were queued and
    /// whether its queue was empty before, in which case the session must be flushed (`flush`).
    /// A session that lags only counts what it missed (it reads the log instead); one that lags
    /// too far is closed, and woken here to send the close.
    fn push(&self, session: &Session, run: &[(EventId, Bytes)]) -> (u64, bool) {
        let mut st = session.state.lock();
        let was_empty = st.queue.is_empty();
        let mut queued = 0;
        // Woken when it turns lagging (its writer starts reading the log) or must close.
        let mut must_wake = false;
        for (id, frame) in run {
            if st.close.is_some() {
                break;
            }
            if st.is_own(*id) {
                if st.mode == Mode::Live {
                    // Handled: a lag from here on reads the log after it, so the id need not
                    // be remembered once fan-out has passed it (`SessionState::note_own`).
                    st.last_queued = *id;
                }
                continue;
            }
            let mode = st.mode;
            match mode {
                // A non-empty queue is waiting for its flush or was handed to the writer
                // already, and both take the whole queue: one flush per write, not per event.
                Mode::Live if st.try_queue(*id, frame, self.queue_bytes_max) => {
                    st.last_queued = *id;
                    queued += 1;
                }
                // The queue, or the server's outbound budget, is full.
                Mode::Live => {
                    st.mode = Mode::Lagging {
                        cursor: st.last_queued,
                        missed: 1,
                    };
                    self.metrics.lagging.inc();
                    must_wake = true;
                }
                Mode::Lagging { cursor, missed } => {
                    st.mode = Mode::Lagging {
                        cursor,
                        missed: missed + 1,
                    };
                    if missed >= self.lag_events_max {
                        st.close = Some((1013, "lagging"));
                        self.metrics.lag_closes.inc();
                        must_wake = true;
                    }
                }
            }
        }
        drop(st);
        if must_wake {
            session.wake.notify_one();
        }
        (queued, was_empty)
    }

    /// Sends a live session's queued events, when its turn in the flush list comes. When its
    /// writer task is idle and nothing else waits to go out, fan-out writes the frames to the
    /// socket itself, with a non-blocking send; otherwise, or for what the socket does not take,
    /// it wakes the writer. (Measured: at 1,000 subscribers, waking a task to make each
    /// write cost more than the write.) The session lock is held across the write, and the
    /// writer sets `is_writing` under it, so the two never write at once.
    fn flush(&self, session: &Session, out: &mut Vec<u8>) {
        let mut st = session.state.lock();
        if st.queue.is_empty() {
            return;
        }
        let can_write_here = st.mode == Mode::Live
            && st.partial.is_none()
            && st.control.is_empty()
            && st.close.is_none()
            && !session.is_writing.load(Ordering::Acquire);
        if !can_write_here || st.direct.is_none() {
            drop(st);
            session.wake.notify_one();
            return;
        }
        out.clear();
        while let Some((id, frame)) = st.queue.pop_front() {
            super::writer::push_frame(out, fastwebsockets::OpCode::Text, &frame);
            st.last_taken = id;
        }
        let taken_upto = st.last_taken;
        st.prune_own(taken_upto);
        // A plain non-blocking send, not tokio's `try_write`: that one first reads the socket's
        // readiness, one more cache miss per write on a thread that walks a thousand sockets
        // (3% of its time in a profile), and nothing needs it. A send that finds the socket
        // full leaves tokio's readiness stale, which only costs the writer task one extra try.
        // (Measured with `ivy-bench fanout --rate 400`, 10 alternating pairs: p99 median 10.4
        // against 12.2 ms, lower in 7 pairs.)
        let sent = match st
            .direct
            .as_ref()
            .map(|tcp| socket2::SockRef::from(&**tcp).send(out))
        {
            Some(Ok(n)) => n,
            // Nothing went; on an error the writer meets it too and ends the connection.
            _ => 0,
        };
        // What is left to write stays charged (a frame's charge covers its head).
        st.keep_charge(out.len() - sent);
        if sent == out.len() {
            self.metrics.direct_writes.inc();
            return;
        }
        st.partial = Some(Bytes::copy_from_slice(&out[sent..]));
        drop(st);
        session.wake.notify_one();
    }
}

/// Whether any session is subscribed to `path` or an ancestor (else its events are not even
/// encoded).
fn is_subscribed(hub: &HubState, path: &str) -> bool {
    crate::channel::ancestors_of(path).any(|a| hub.index.contains_key(a))
}

fn remove_from_index(
    index: &mut HashMap<ChannelPath, Vec<Arc<Session>>>,
    path: &ChannelPath,
    id: SessionId,
) {
    if let Some(list) = index.get_mut(path) {
        list.retain(|s| s.id != id);
        if list.is_empty() {
            index.remove(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::session::OWN_PASSED_KEPT;

    fn sessions(ids: std::ops::Range<u64>) -> Vec<Arc<Session>> {
        let budget = Arc::new(super::super::budget::Budget::new(usize::MAX));
        ids.map(|id| {
            Arc::new(Session::new(
                id,
                format!("s{id}").into(),
                Arc::clone(&budget),
            ))
        })
        .collect()
    }

    #[test]
    fn dirty_sessions_go_oldest_first_and_none_is_given_more_than_a_batch_before_its_flush() {
        let mut dirty = Dirty::default();
        assert_eq!(dirty.budget(), DISPATCH_BATCH_EVENTS);
        dirty.add(sessions(0..3), 10);
        assert_eq!(dirty.budget(), DISPATCH_BATCH_EVENTS - 10);
        // Sessions flushed meanwhile rejoin behind the ones still waiting.
        assert_eq!(dirty.pop().map(|s| s.id), Some(0));
        dirty.add(sessions(0..1), 5);
        assert_eq!(dirty.budget(), DISPATCH_BATCH_EVENTS - 15);
        assert_eq!(dirty.pop().map(|s| s.id), Some(1));
        assert_eq!(dirty.pop().map(|s| s.id), Some(2));
        // The oldest waiting session now joined before the last 5 events only.
        assert_eq!(dirty.budget(), DISPATCH_BATCH_EVENTS - 5);
        dirty.add(Vec::new(), DISPATCH_BATCH_EVENTS);
        assert_eq!(dirty.budget(), 0);
        assert_eq!(dirty.pop().map(|s| s.id), Some(0));
        assert!(dirty.is_empty());
        assert_eq!(dirty.budget(), DISPATCH_BATCH_EVENTS);
    }

    /// A live session skips its own events as fan-out meets them, and forgets all but the newest
    /// few of their ids once fan-out has passed them. If it then lags, its catch-up starts after
    /// those events, so it never reads them back from the log.
    #[test]
    fn a_session_that_lags_right_after_its_own_events_does_not_read_them_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::unsynced(dir.path());
        // Room for one queued event of another's.
        let opts = crate::config::ServerOptions {
            queue_bytes_max: 250,
            ..crate::config::ServerOptions::default()
        };
        let hub = Hub::new(store, Arc::new(Metrics::new()), &opts);
        let everything = Selector::Subtree(ChannelPath::root());
        let dispatch = |hub: &Hub| {
            let to = hub.store.committed();
            while hub.dispatched() < to {
                let mut dirty = Dirty::default();
                hub.dispatch_some(&everything, to, DISPATCH_BATCH_EVENTS, &mut dirty)
                    .unwrap();
            }
        };
        let path = ChannelPath::parse("/mix").unwrap();
        let publish = |hub: &Hub, data: &[u8], origin: Option<&Arc<Session>>| {
            let id = hub.publish(&path, data, origin).unwrap();
            hub.store.wait_committed(id).unwrap();
            id
        };
        let a = Arc::new(Session::new(1, "a".into(), Arc::clone(&hub.outbound)));
        hub.subscribe(&a, path.clone(), None, 10).unwrap();
        // Another's event, queued for `a` (nobody flushes it): the queue is full.
        publish(&hub, &[b'o'; 100], None);
        dispatch(&hub);
        // Its own, with fan-out running in between, as it does.
        let own: Vec<EventId> = (0..3000)
            .map(|_| {
                let id = publish(&hub, b"mine", Some(&a));
                dispatch(&hub);
                id
            })
            .collect();
        assert_eq!(a.state.lock().own.len(), OWN_PASSED_KEPT);
        // The next of another's does not fit: `a` lags, with its cursor past its own events.
        publish(&hub, &[b'o'; 100], None);
        dispatch(&hub);
        let st = a.state.lock();
        let Mode::Lagging { cursor, .. } = st.mode else {
            panic!("not lagging");
        };
        let subscriptions = [(path.clone(), EventId(0))];
        let batch = super::super::catchup::read_after(
            &hub,
            &subscriptions,
            &st.own,
            cursor,
            hub.dispatched(),
            1024,
            1 << 20,
        )
        .unwrap();
        assert_eq!(batch.frames.len(), 1);
        assert!(batch.frames.iter().all(|(id, _)| !own.contains(id)));
    }

    /// A read of the log back takes the frames the dispatcher encoded, the same bytes (shared,
    /// not copied), and encodes what it no longer keeps or never dispatched, identically.
    #[test]
    fn a_catch_up_read_shares_the_dispatched_frames() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::unsynced(dir.path());
        let hub = Hub::new(
            store,
            Arc::new(Metrics::new()),
            &crate::config::ServerOptions::default(),
        );
        let path = ChannelPath::parse("/r").unwrap();
        let publish = |hub: &Hub, i: usize| {
            let data = format!("event {i}: \"quoted\"\nline");
            let id = hub.publish(&path, data.as_bytes(), None).unwrap();
            hub.store.wait_committed(id).unwrap();
            id
        };
        // Before anyone subscribes, events are not even encoded.
        let undispatched: Vec<EventId> = (0..3).map(|i| publish(&hub, i)).collect();
        let everything = Selector::Subtree(ChannelPath::root());
        let mut dirty = Dirty::default();
        hub.dispatch_some(&everything, hub.store.committed(), 256, &mut dirty)
            .unwrap();
        let a = Arc::new(Session::new(1, "a".into(), Arc::clone(&hub.outbound)));
        hub.subscribe(&a, path.clone(), None, 10).unwrap();
        let dispatched: Vec<EventId> = (3..10).map(|i| publish(&hub, i)).collect();
        hub.dispatch_some(&everything, hub.store.committed(), 256, &mut dirty)
            .unwrap();
        let queued: Vec<(EventId, Bytes)> = a.state.lock().queue.iter().cloned().collect();
        assert_eq!(
            queued.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
            dispatched
        );

        let subscriptions = [(path.clone(), EventId(0))];
        let batch = super::super::catchup::read_after(
            &hub,
            &subscriptions,
            &VecDeque::new(),
            EventId(0),
            hub.dispatched(),
            1024,
            1 << 20,
        )
        .unwrap();
        let ids: Vec<EventId> = batch.frames.iter().map(|(id, _)| *id).collect();
        assert_eq!(ids, [undispatched, dispatched].concat());
        let reader = hub.store.reader(&everything);
        for ((id, frame), event) in batch.frames.iter().zip(reader.events(&Query::all())) {
            let event = event.unwrap();
            assert_eq!(*frame, hub.encode(*id, event.path, event.data), "{id:?}");
        }
        for ((_, read), (_, sent)) in batch.frames[3..].iter().zip(&queued) {
            assert_eq!(
                read.as_ptr(),
                sent.as_ptr(),
                "the dispatcher's bytes, shared"
            );
        }
    }

    #[test]
    fn a_session_waits_for_its_flush_once() {
        let mut dirty = Dirty::default();
        let s = sessions(0..2);
        dirty.add(s.clone(), 1);
        // Its queue was emptied by its writer and refilled before its flush: no second entry.
        dirty.add(s[..1].to_vec(), 1);
        assert_eq!(dirty.pop().map(|s| s.id), Some(0));
        assert_eq!(dirty.pop().map(|s| s.id), Some(1));
        assert!(dirty.pop().is_none());
        // Flushed, it may join again.
        dirty.add(s[..1].to_vec(), 1);
        assert_eq!(dirty.pop().map(|s| s.id), Some(0));
    }
}
