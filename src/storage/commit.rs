//! Group commit: the sequencer that hands out ids, and the writer thread that writes, syncs and
//! publishes.
//!
//! An append takes its stream's lock, then the sequencer's lock just long enough to get the next
//! id and put the stream on the dirty list, then encodes its record into the stream's pending
//! chunk. Taking the id under the stream lock makes log order equal id order within a stream.
//!
//! The writer thread loops: under the sequencer lock it takes the dirty list and reads the last
//! id handed out, `W`. Every id up to `W` was handed out under that lock, and its record was (or
//! is being) encoded under its stream's lock, which the writer takes next to collect the pending
//! chunks. So once those chunks are written (and, under `always`, synced), every event with an
//! id up to `W` is committed, in every stream: `W` is the store's **commit watermark**. Readers
//! that must not see a later event before an earlier one (the server's fan-out across streams)
//! read up to the watermark only.
//!
//! One `write` per chunk and one `fdatasync` per written file per round, however many appends
//! waited: appends that arrive while a round runs form the next round's batch. The writer is a
//! plain thread, so a tokio runtime is never blocked by fsync.
//!
//! **A failed round** (disk full, a read-only or vanished directory, out of descriptors, an I/O
//! error) publishes nothing. In `Writer::fail`:
//! 1. Under the sequencer lock the store starts refusing appends and reads the last id handed
//!    out; every id above the watermark up to it is now settled by what follows.
//! 2. Each stream involved is rolled back to its committed end (`rollback.rs`): files cut,
//!    segments that hold no committed event removed, the in-memory view rebuilt. A segment whose
//!    seal completed cannot be cut under its readers; its events are durable and whole, so they
//!    are kept. So are events above the watermark that an earlier round already wrote (a round
//!    takes whole pending lists, which may hold appends made after it read the watermark).
//! 3. The other ids are recorded as failed (their appends return the failure, now or whenever
//!    their callers wait), and the watermark passes them all: no stream holds a failed event.
//! 4. After `StoreOptions::write_retry` appends are taken again; the next round is the probe.
//!
//! When the rollback itself fails, or an interval-policy sync fails (those events were already
//! published), the store refuses appends until it is reopened, and recovery at open decides from
//! the disk.

use super::error::{Error, Result, WriteFailure};
use super::segment::Segment;
use super::spare::Spares;
use super::stream::{Chunk, Create, Stream};
use super::{CommitObserver, Durability, StoreOptions};
use crate::clock::IdClock;
use crate::event_id::EventId;
use event_listener::{Event, Listener};
use parking_lot::{Condvar, Mutex};
use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// See `Writer::linger`.
const LINGER: Duration = Duration::from_micros(200);
const LINGER_BELOW_BYTES: u64 = 256 * 1024;
/// Failed id ranges kept for waiters; a waiter's id fails within one round of its append, so
/// only the most recent failures can concern one.
const FAILED_RANGES_KEPT: usize = 64;

pub(crate) struct Shared {
    pub opts: StoreOptions,
    pub seq: Mutex<Sequencer>,
    wake: Condvar,
    /// Every id at or below is committed: written, and durable under `always`.
    committed: AtomicU64,
    /// Every id at or below is durable (fdatasync'd).
    durable: AtomicU64,
    commit_event: Event,
    /// Bytes encoded but not yet written; appenders wait above `pending_bytes_max`.
    pending_bytes: AtomicU64,
    space_event: Event,
    /// Appends are refused (`Sequencer::failure` says why).
    is_failed: AtomicBool,
    /// The highest id that ever failed (0: none): waiters with a higher id skip the
    /// `failed_ids` lock, so the publish path pays nothing for past failures.
    max_failed_id: AtomicU64,
    /// Ids handed out and then failed, most recent last.
    failed_ids: Mutex<VecDeque<FailedIds>>,
    pub counters: Counters,
    pub observer: OnceLock<Arc<dyn CommitObserver>>,
}

#[derive(Default)]
pub struct Counters {
    pub events_appended: AtomicU64,
    pub bytes_appended: AtomicU64,
    pub fsyncs: AtomicU64,
    pub commit_rounds: AtomicU64,
    pub write_failures: AtomicU64,
}

/// The ids of one failed round: `first..=last`, except `kept` (sorted), whose events stayed
/// stored (`rollback.rs`).
struct FailedIds {
    first: u64,
    last: u64,
    kept: Vec<u64>,
    why: WriteFailure,
}

impl FailedIds {
    fn contains(&self, id: u64) -> bool {
        (self.first..=self.last).contains(&id) && self.kept.binary_search(&id).is_err()
    }
}

pub(crate) struct Sequencer {
    pub ids: IdClock,
    pub dirty: Vec<Arc<Stream>>,
    /// Directories whose entries (new files or subdirectories) must be synced.
    pub dirs_to_sync: Vec<PathBuf>,
    /// While set, no id is handed out.
    failure: Option<WriteFailure>,
    /// When appends are taken again after a failure that was rolled back.
    resume_at: Option<Instant>,
    is_writer_idle: bool,
    is_shutdown: bool,
}

impl Sequencer {
    /// Refuses an append while a write failure stands.
    pub fn check_writable(&self) -> Result<()> {
        match &self.failure {
            Some(f) => Err(Error::WriteFailed(f.clone())),
            None => Ok(()),
        }
    }
}

impl Shared {
    pub fn new(opts: StoreOptions, last_id: EventId) -> Shared {
        Shared {
            opts,
            seq: Mutex::new(Sequencer {
                ids: IdClock::starting_after(last_id),
                dirty: Vec::new(),
                dirs_to_sync: Vec::new(),
                failure: None,
                resume_at: None,
                is_writer_idle: false,
                is_shutdown: false,
            }),
            wake: Condvar::new(),
            committed: AtomicU64::new(last_id.0),
            durable: AtomicU64::new(last_id.0),
            commit_event: Event::new(),
            pending_bytes: AtomicU64::new(0),
            space_event: Event::new(),
            is_failed: AtomicBool::new(false),
            max_failed_id: AtomicU64::new(0),
            failed_ids: Mutex::new(VecDeque::new()),
            counters: Counters::default(),
            observer: OnceLock::new(),
        }
    }

    pub fn committed(&self) -> EventId {
        EventId(self.committed.load(Ordering::Acquire))
    }

    pub fn durable(&self) -> EventId {
        EventId(self.durable.load(Ordering::Acquire))
    }

    /// Fast refusal outside the sequencer lock (the lock's check is the one that counts).
    pub fn check_healthy(&self) -> Result<()> {
        if self.is_failed.load(Ordering::Acquire) {
            self.seq.lock().check_writable()?;
        }
        Ok(())
    }

    /// The write failure that makes the store refuse appends now, if any.
    pub fn failure(&self) -> Option<WriteFailure> {
        self.seq.lock().failure.clone()
    }

    /// Sets or clears the standing failure; `is_failed` follows it, so that appends can check
    /// without the lock.
    fn set_failure(&self, seq: &mut Sequencer, failure: Option<WriteFailure>) {
        self.is_failed.store(failure.is_some(), Ordering::Release);
        seq.failure = failure;
    }

    /// Refuses appends until the store is reopened, and fails every id not committed yet.
    fn fail_until_restart(&self, mut why: WriteFailure) {
        why.until_restart = true;
        self.set_failure(&mut self.seq.lock(), Some(why.clone()));
        self.record_failed(self.committed().0 + 1, u64::MAX, Vec::new(), &why);
    }

    /// Why `id` failed, if it did.
    fn failed_for(&self, id: EventId) -> Option<WriteFailure> {
        if id.0 > self.max_failed_id.load(Ordering::Acquire) {
            return None;
        }
        let ranges = self.failed_ids.lock();
        ranges
            .iter()
            .rev()
            .find(|f| f.contains(id.0))
            .map(|f| f.why.clone())
    }

    fn record_failed(&self, first: u64, last: u64, kept: Vec<u64>, why: &WriteFailure) {
        let mut ranges = self.failed_ids.lock();
        if ranges.len() == FAILED_RANGES_KEPT {
            ranges.pop_front();
        }
        ranges.push_back(FailedIds {
            first,
            last,
            kept,
            why: why.clone(),
        });
        self.max_failed_id.fetch_max(last, Ordering::AcqRel);
    }

    /// Called with the sequencer lock held, after an append made `stream` dirty.
    pub fn mark_dirty(&self, seq: &mut Sequencer, stream: &Arc<Stream>) {
        if !stream.is_dirty.swap(true, Ordering::Relaxed) {
            seq.dirty.push(Arc::clone(stream));
        }
        if seq.is_writer_idle {
            seq.is_writer_idle = false;
            self.wake.notify_one();
        }
    }

    /// Blocks while too many bytes wait for the writer, so memory stays bounded when appenders
    /// outrun the disk; then takes `bytes` of the budget.
    pub fn reserve(&self, bytes: u64) -> Result<()> {
        loop {
            if self.has_room(bytes) {
                return self.take_budget(bytes);
            }
            self.check_healthy()?;
            let listener = self.space_event.listen();
            if self.has_room(bytes) {
                continue;
            }
            listener.wait_timeout(Duration::from_millis(100));
        }
    }

    /// Takes `bytes` of the budget without waiting (the caller awaited `room`, or saw room),
    /// unless the store refuses appends.
    pub fn take_budget(&self, bytes: u64) -> Result<()> {
        self.check_healthy()?;
        self.pending_bytes.fetch_add(bytes, Ordering::AcqRel);
        Ok(())
    }

    /// Whether `bytes` more may wait for the writer: they fit, or nothing waits (an event larger
    /// than the whole budget goes alone).
    fn has_room(&self, bytes: u64) -> bool {
        let now = self.pending_bytes.load(Ordering::Acquire);
        now == 0 || now + bytes <= self.opts.pending_bytes_max
    }

    /// `reserve`'s wait, without a thread: resolves once `bytes` fit, or the store refuses
    /// appends (the append then says why). Every round, written or failed, ends by releasing
    /// its bytes, which notifies `space_event`; so does the rollback of a failure.
    pub async fn room(&self, bytes: u64) {
        while self.check_healthy().is_ok() && !self.has_room(bytes) {
            let listener = self.space_event.listen();
            if self.check_healthy().is_err() || self.has_room(bytes) {
                return;
            }
            listener.await;
        }
    }

    /// Whether `id` has an outcome: `Some(Ok)` committed, `Some(Err)` failed.
    ///
    /// The watermark is read first: once it is at or past `id`, `id`'s failure (if any) was
    /// recorded before the watermark moved, so the failed-range check that follows sees it.
    pub fn outcome(&self, id: EventId) -> Option<Result<()>> {
        let committed = self.committed();
        if let Some(why) = self.failed_for(id) {
            return Some(Err(Error::WriteFailed(why)));
        }
        (committed >= id).then_some(Ok(()))
    }

    /// Blocks until `id` is committed (durable under `always`), or failed.
    pub fn wait_committed(&self, id: EventId) -> Result<()> {
        loop {
            if let Some(outcome) = self.outcome(id) {
                return outcome;
            }
            let listener = self.commit_event.listen();
            if let Some(outcome) = self.outcome(id) {
                return outcome;
            }
            listener.wait();
        }
    }

    /// Blocks until the watermark passes `after` or `timeout` ends; returns the watermark.
    pub fn wait_beyond(&self, after: EventId, timeout: Duration) -> EventId {
        let deadline = Instant::now() + timeout;
        loop {
            let now = self.committed();
            if now > after {
                return now;
            }
            let listener = self.commit_event.listen();
            if self.committed() > after {
                continue;
            }
            if listener.wait_deadline(deadline).is_none() {
                return self.committed();
            }
        }
    }

    /// Returns `bytes` to the append budget and wakes appenders waiting for it.
    fn release_pending(&self, bytes: u64) {
        let _ = self
            .pending_bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |now| {
                Some(now.saturating_sub(bytes))
            });
        self.space_event.notify(usize::MAX);
    }

    pub fn listen(&self) -> event_listener::EventListener {
        self.commit_event.listen()
    }

    /// One `fdatasync` of a segment, counted and timed (writer only).
    fn sync_segment(&self, seg: &Segment) -> Result<()> {
        let started = Instant::now();
        let synced = seg.sync_data(&*self.opts.io);
        self.counters.fsyncs.fetch_add(1, Ordering::Relaxed);
        if let Some(observer) = self.observer.get() {
            observer.fsync(started.elapsed());
        }
        synced
    }

    pub fn request_shutdown(&self) {
        let mut seq = self.seq.lock();
        seq.is_shutdown = true;
        self.wake.notify_one();
    }
}

/// The writer thread's body. `spares` (`None`: no preallocation) end with it.
pub(crate) fn run_writer(shared: Arc<Shared>, spares: Option<Spares>) {
    let mut writer = Writer {
        unsynced: Vec::new(),
        last_sync: Instant::now(),
        spares,
        shared,
    };
    loop {
        let Some(round) = writer.next_round() else {
            break;
        };
        let stop = round.is_shutdown;
        let bytes = writer.commit(round);
        if let Some(spares) = &writer.spares {
            spares.note_written(bytes);
        }
        if stop {
            break;
        }
        writer.linger(bytes);
    }
}

struct Round {
    streams: Vec<Arc<Stream>>,
    watermark: EventId,
    dirs: Vec<PathBuf>,
    is_shutdown: bool,
}

struct Writer {
    shared: Arc<Shared>,
    /// Segments written since the last sync (interval and never policies).
    unsynced: Vec<Arc<Segment>>,
    last_sync: Instant,
    spares: Option<Spares>,
}

impl Writer {
    fn next_round(&mut self) -> Option<Round> {
        let shared = Arc::clone(&self.shared);
        let mut seq = shared.seq.lock();
        while seq.dirty.is_empty() && !seq.is_shutdown {
            seq.is_writer_idle = true;
            if let Some(at) = seq.resume_at {
                if Instant::now() >= at {
                    seq.resume_at = None;
                    shared.set_failure(&mut seq, None);
                    tracing::info!("taking appends again after a write failure");
                    continue;
                }
                let wait = at - Instant::now();
                let wait = self.sync_due_in().map_or(wait, |s| s.min(wait));
                shared.wake.wait_for(&mut seq, wait);
                continue;
            }
            match self.sync_due_in() {
                Some(wait) if wait.is_zero() => {
                    seq.is_writer_idle = false;
                    drop(seq);
                    self.sync_unsynced();
                    seq = shared.seq.lock();
                }
                Some(wait) => {
                    shared.wake.wait_for(&mut seq, wait);
                }
                None => shared.wake.wait(&mut seq),
            }
        }
        seq.is_writer_idle = false;
        let streams = std::mem::take(&mut seq.dirty);
        for s in &streams {
            s.is_dirty.store(false, Ordering::Relaxed);
        }
        Some(Round {
            streams,
            watermark: seq.ids.last(),
            dirs: std::mem::take(&mut seq.dirs_to_sync),
            is_shutdown: seq.is_shutdown,
        })
    }

    /// Time until the interval policy wants a sync, when something is unsynced.
    fn sync_due_in(&self) -> Option<Duration> {
        match self.shared.opts.durability {
            Durability::Interval(every) if !self.unsynced.is_empty() => {
                Some(every.saturating_sub(self.last_sync.elapsed()))
            }
            _ => None,
        }
    }

    /// Under `never` and `interval`, after a small round, waits a moment so the next round
    /// carries a real batch: otherwise the writer and a fast appender take turns on the same
    /// locks for a few records each (measured: `examples/append_loop.rs`, single appends).
    /// Under `always` the fsync itself is the batching window.
    fn linger(&self, round_bytes: u64) {
        if self.shared.opts.durability != Durability::Always && round_bytes < LINGER_BELOW_BYTES {
            std::thread::sleep(LINGER);
        }
    }

    /// Writes, syncs and publishes one round; returns its bytes (written, or undone on failure).
    fn commit(&mut self, round: Round) -> u64 {
        let shared = Arc::clone(&self.shared);
        // With each stream's chunks, its last id: every append up to it is in them.
        let mut last_ids = Vec::with_capacity(round.streams.len());
        let batches: Vec<(Arc<Stream>, Vec<Chunk>)> = round
            .streams
            .into_iter()
            .map(|s| {
                let mut state = s.state.lock();
                last_ids.push(state.last_id);
                let chunks = std::mem::take(&mut state.pending);
                drop(state);
                (s, chunks)
            })
            .collect();
        let batch_bytes: u64 = batches
            .iter()
            .flat_map(|(_, chunks)| chunks.iter().map(|c| c.bytes.len() as u64))
            .sum();
        // While a failure stands nothing is written or published: a round with nothing to write
        // would otherwise move the watermark (the power-loss test found exactly this, when a
        // failure left the store poisoned; the failed ranges now also guard the waiters).
        let writable = shared.check_healthy();
        let started = Instant::now();
        let outcome = match writable {
            Err(e) => Err(e),
            Ok(()) => self.write_all(&batches, &round.dirs, round.is_shutdown),
        };
        match outcome {
            Ok(()) => {
                if let Some(observer) = shared.observer.get() {
                    let events: usize = batches
                        .iter()
                        .flat_map(|(_, chunks)| chunks.iter().map(|c| c.events.len()))
                        .sum();
                    observer.round(events, started.elapsed());
                }
                for ((s, chunks), last_id) in batches.iter().zip(last_ids) {
                    s.state.lock().mark_committed(chunks);
                    s.note_visible(last_id);
                }
                shared
                    .committed
                    .fetch_max(round.watermark.0, Ordering::AcqRel);
                if shared.opts.durability == Durability::Always || round.is_shutdown {
                    shared
                        .durable
                        .fetch_max(round.watermark.0, Ordering::AcqRel);
                }
            }
            Err(Error::WriteFailed(_)) if batches.is_empty() => {}
            Err(e) => self.fail(&e, batches.into_iter().map(|(s, _)| s).collect()),
        }
        shared
            .counters
            .commit_rounds
            .fetch_add(1, Ordering::Relaxed);
        // The round's bytes leave the budget whether written or undone.
        shared.release_pending(batch_bytes);
        shared.commit_event.notify(usize::MAX);
        batch_bytes
    }

    /// After a failed round: refuse appends, roll the streams back to their committed ends, fail
    /// every id handed out past the watermark, and schedule the resumption (see the module docs).
    /// Waiters learn of the failure after the rollback, so they are told whether writes resume.
    fn fail(&mut self, error: &Error, mut streams: Vec<Arc<Stream>>) {
        let shared = Arc::clone(&self.shared);
        shared
            .counters
            .write_failures
            .fetch_add(1, Ordering::Relaxed);
        let why = WriteFailure::from_error(error);
        let last_issued = {
            let mut seq = shared.seq.lock();
            shared.set_failure(&mut seq, Some(why.clone()));
            for s in seq.dirty.drain(..) {
                s.is_dirty.store(false, Ordering::Relaxed);
                streams.push(s);
            }
            seq.ids.last()
        };
        streams.sort_by_key(|s| Arc::as_ptr(s) as usize);
        streams.dedup_by(|a, b| Arc::ptr_eq(a, b));
        let mut undone = Ok(());
        let mut kept = Vec::new();
        let watermark = shared.committed().0;
        for s in &streams {
            match super::rollback::roll_back(s, &shared.opts, watermark) {
                Ok(rolled) => {
                    shared.release_pending(rolled.dropped_bytes);
                    kept.extend(rolled.kept);
                }
                Err(e) => undone = Err(e),
            }
        }
        kept.sort_unstable();
        let first_failed = watermark + 1;
        match undone {
            Ok(()) => {
                tracing::error!(error = %error, kept = kept.len(), retry_in = ?shared.opts.write_retry, "write failed; the round was undone and appends are refused until the retry");
                shared.record_failed(first_failed, last_issued.0, kept, &why);
                // Every id handed out is settled: failed and gone from every stream, or kept
                // (in a sealed segment, or written by an earlier round). So the watermark may
                // pass them all now, and the waiters of kept ids are answered without waiting
                // for another round.
                shared.committed.fetch_max(last_issued.0, Ordering::AcqRel);
                if shared.opts.durability == Durability::Always {
                    shared.durable.fetch_max(last_issued.0, Ordering::AcqRel);
                }
                shared.seq.lock().resume_at = Some(Instant::now() + shared.opts.write_retry);
            }
            Err(e) => {
                tracing::error!(error = %error, rollback_error = %e, "write failed and could not be undone; the store takes no writes until restart");
                // Nothing is known of the streams whose rollback failed: no id from here on
                // may be reported committed.
                shared.fail_until_restart(why);
            }
        }
        shared.commit_event.notify(usize::MAX);
    }

    fn write_all(
        &mut self,
        batches: &[(Arc<Stream>, Vec<Chunk>)],
        dirs: &[PathBuf],
        is_shutdown: bool,
    ) -> Result<()> {
        let shared = Arc::clone(&self.shared);
        let opts = &shared.opts;
        let map_len = live_map_len(opts);
        let mut written: Vec<Arc<Segment>> = Vec::new();
        let mut new_files: Vec<PathBuf> = Vec::new();
        for (stream, chunks) in batches.iter() {
            for chunk in chunks {
                if let Some(create) = chunk.create {
                    let spare = match (create, &mut self.spares) {
                        (Create::PreferSpare, Some(spares)) => spares.take_as(chunk.seg.path()),
                        _ => None,
                    };
                    chunk.seg.create_file(&*opts.io, map_len, spare)?;
                    new_files.push(stream.dir().to_path_buf());
                }
                chunk.seg.write_at(&*opts.io, chunk.offset, &chunk.bytes)?;
                if chunk.is_seal {
                    let end = chunk.offset + chunk.bytes.len() as u64;
                    self.seal(stream, &chunk.seg, end)?;
                } else if !written.iter().any(|s| Arc::ptr_eq(s, &chunk.seg)) {
                    written.push(Arc::clone(&chunk.seg));
                }
            }
        }
        if opts.preallocate {
            for seg in &written {
                // Zeroes ahead are an optimisation: a disk too full for them is not a reason to
                // refuse the records, which are written already.
                if let Err(e) = seg.zero_ahead(&*opts.io, opts.segment_bytes_max) {
                    tracing::debug!(error = %e, "cannot write zeroes ahead of a segment's records");
                }
            }
        }
        let sync_now = opts.durability == Durability::Always || is_shutdown;
        if sync_now {
            sync_dirs(&*opts.io, dirs.iter().chain(new_files.iter()))?;
            for seg in self.unsynced.drain(..).chain(written) {
                if !seg.is_sealed_loaded() {
                    shared.sync_segment(&seg)?;
                }
            }
            self.last_sync = Instant::now();
        } else {
            // Directory entries of new files are synced with the next interval sync, or never.
            for seg in written {
                if !self.unsynced.iter().any(|s| Arc::ptr_eq(s, &seg)) {
                    self.unsynced.push(seg);
                }
            }
            if let Durability::Interval(_) = opts.durability {
                let mut seq = self.shared.seq.lock();
                seq.dirs_to_sync.extend(new_files);
                seq.dirs_to_sync.extend(dirs.iter().cloned());
            }
        }
        Ok(())
    }

    /// A seal record ending at `end` was written: cut what a spare left after it, make it durable
    /// (under every policy, so that every segment but the last in a stream is sealed on disk),
    /// write the index, switch readers to the sealed view.
    fn seal(&mut self, stream: &Stream, seg: &Arc<Segment>, end: u64) -> Result<()> {
        seg.cut_after_seal(&*self.shared.opts.io, end)?;
        self.shared.sync_segment(seg)?;
        let entries = {
            let state = stream.state.lock();
            state
                .live
                .iter()
                .find(|l| Arc::ptr_eq(&l.seg, seg))
                .map(|l| l.index.clone())
                .unwrap_or_default()
        };
        seg.finish_seal(
            &*self.shared.opts.io,
            self.shared.opts.index_interval_bytes,
            &entries,
        )?;
        self.unsynced.retain(|s| !Arc::ptr_eq(s, seg));
        Ok(())
    }

    fn sync_unsynced(&mut self) {
        let dirs = std::mem::take(&mut self.shared.seq.lock().dirs_to_sync);
        let watermark = self.shared.committed();
        let mut outcome = sync_dirs(&*self.shared.opts.io, dirs.iter());
        for seg in self.unsynced.drain(..) {
            if outcome.is_ok() && !seg.is_sealed_loaded() {
                outcome = self.shared.sync_segment(&seg);
            }
        }
        self.last_sync = Instant::now();
        match outcome {
            Ok(()) => {
                self.shared.durable.fetch_max(watermark.0, Ordering::AcqRel);
            }
            Err(e) => {
                // Those events were published already and the kernel may have dropped the
                // pages it could not write: nothing can be undone, and nothing later may be
                // built on them. Recovery at the next open decides from the disk.
                tracing::error!(error = %e, "interval sync failed; the store takes no writes until restart");
                self.shared.fail_until_restart(WriteFailure::from_error(&e));
                self.shared.commit_event.notify(usize::MAX);
            }
        }
    }
}

/// The length at which a live segment is mapped: it never grows past the roll size plus one
/// record plus its seal footer (at most as large as the records it describes).
pub(crate) fn live_map_len(opts: &StoreOptions) -> usize {
    let record_max = opts.event_bytes_max as u64 + 4096;
    usize::try_from(opts.segment_bytes_max.saturating_add(record_max)).unwrap_or(usize::MAX)
}

fn sync_dirs<'a>(
    io: &dyn super::io::FileIo,
    dirs: impl Iterator<Item = &'a PathBuf>,
) -> Result<()> {
    let mut done: Vec<&PathBuf> = Vec::new();
    for dir in dirs {
        if done.contains(&dir) {
            continue;
        }
        io.sync_dir(dir).map_err(|source| Error::SyncFailed {
            path: dir.clone(),
            source,
        })?;
        done.push(dir);
    }
    Ok(())
}
