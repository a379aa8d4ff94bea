//! The data directory: its lock, its metadata, the streams in it, routing of channels to
//! streams, appends and reads.

use super::commit::{self, Shared};
use super::error::{Error, Result, WriteFailure};
use super::layout;
use super::read::Reader;
use super::recovery::{self, Access};
use super::spare::{self, Spares};
use super::stream::{self, Stream, StreamState};
use super::{Durability, StoreOptions};
use crate::channel::{ChannelPath, Selector};
use crate::event_id::EventId;
use parking_lot::{Mutex, RwLock};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// The newest visible id of each stream a selector touches (`Store::heads`), summed, and the
/// largest of them.
///
/// Each stream's newest visible id only grows, and a new stream adds a term, so an unchanged
/// `sum` means that no event was published in those streams in between. When moreover `newest`
/// is at or below the commit watermark read just before, every event of those streams is at or
/// below it, so a read of the selector up to that watermark returned all of them, and a read up
/// to any later watermark with the same `sum` returns exactly the same events
/// (`server/http/cache.rs` keeps answers on that ground).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heads {
    pub sum: u128,
    pub newest: EventId,
}

/// An open data directory. Cheap to clone; every clone is the same store. Thread-safe.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    access: Access,
    stream_depth: usize,
    shared: Arc<Shared>,
    /// Keyed by stream root; a `BTreeMap` so a subtree's streams are one range.
    streams: RwLock<BTreeMap<ChannelPath, Arc<Stream>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    /// Held for the life of the store: the advisory lock of `DIR/LOCK`.
    _lock: File,
}

/// Per-stream figures for `ivy stats`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StreamStats {
    pub root: String,
    pub segments: usize,
    pub events: u64,
    /// Bytes of log: whole sealed files, and live segments up to their committed end.
    pub bytes: u64,
    pub channels: usize,
    pub first_id: Option<String>,
    pub last_id: Option<String>,
}

impl Store {
    /// A store in `dir` that never syncs, with default options otherwise: for the server's unit
    /// tests, which need a real log but not its durability.
    #[cfg(test)]
    pub(crate) fn unsynced(dir: &Path) -> Store {
        let opts = StoreOptions {
            durability: Durability::Never,
            ..StoreOptions::default()
        };
        Store::open(dir, opts).expect("a store in a fresh directory")
    }

    /// Opens (creating if needed) the data directory for writing. Recovers each stream's tail and
    /// starts the writer thread.
    ///
    /// # Errors
    /// `Locked` when another process holds the directory; `Corrupt` when a stream's tail holds
    /// damage that is not a torn write; I/O errors with the path that failed.
    pub fn open(dir: impl AsRef<Path>, opts: StoreOptions) -> Result<Store> {
        Store::open_with(dir.as_ref(), opts, Access::ReadWrite)
    }

    /// Opens an existing data directory for reading only (the offline tools): a shared lock, no
    /// writer, nothing on disk changed; a torn tail is left in place and not read.
    pub fn open_read_only(dir: impl AsRef<Path>, opts: StoreOptions) -> Result<Store> {
        Store::open_with(dir.as_ref(), opts, Access::ReadOnly)
    }

    fn open_with(dir: &Path, mut opts: StoreOptions, access: Access) -> Result<Store> {
        if access == Access::ReadWrite {
            fs::create_dir_all(layout::streams_dir(dir))
                .map_err(|e| Error::io(dir, "create directory", e))?;
        } else if !dir.join(layout::META_FILE).exists() {
            return Err(Error::NotAStore {
                path: dir.to_path_buf(),
                why: "no IVY metadata file".into(),
            });
        }
        let lock = take_lock(dir, access)?;
        opts.stream_depth = read_or_write_meta(dir, opts.stream_depth, access)?;
        let streams_dir = layout::streams_dir(dir);
        let mut streams = BTreeMap::new();
        let mut last_id = EventId(0);
        let entries =
            fs::read_dir(&streams_dir).map_err(|e| Error::io(&streams_dir, "read directory", e))?;
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(&streams_dir, "read directory", e))?;
            let name = entry.file_name();
            let Some(root) = name.to_str().and_then(layout::parse_stream_dir_name) else {
                tracing::warn!(name = ?name, "ignoring an entry that is not a stream directory");
                continue;
            };
            let state = recovery::open_stream(&entry.path(), &opts, access)?;
            last_id = last_id.max(state.last_id);
            streams.insert(
                root.clone(),
                Arc::new(Stream::new(root, entry.path(), state)),
            );
        }
        let stream_depth = opts.stream_depth;
        let shared = Arc::new(Shared::new(opts, last_id));
        let writer = if access == Access::ReadWrite {
            let for_thread = Arc::clone(&shared);
            spare::remove_left_over(dir)?;
            let spares = shared
                .opts
                .preallocate
                .then(|| Spares::new(dir, &shared.opts));
            let handle = std::thread::Builder::new()
                .name("ivy-writer".into())
                .spawn(move || commit::run_writer(for_thread, spares))
                .map_err(|e| Error::io(dir, "spawn writer thread", e))?;
            Some(handle)
        } else {
            None
        };
        tracing::info!(dir = %dir.display(), streams = streams.len(), last_id = %last_id, "store opened");
        Ok(Store {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                access,
                stream_depth,
                shared,
                streams: RwLock::new(streams),
                writer: Mutex::new(writer),
                _lock: lock,
            }),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    pub fn options(&self) -> &StoreOptions {
        &self.inner.shared.opts
    }

    /// Appends one event and returns its id once it is committed under the durability policy:
    /// durable under `always`; queued for the writer under `interval` and `never`.
    pub fn append(&self, path: &ChannelPath, data: &[u8]) -> Result<EventId> {
        let id = self.append_nowait(path, data)?;
        if self.inner.shared.opts.durability == Durability::Always {
            self.inner.shared.wait_committed(id)?;
        }
        Ok(id)
    }

    /// Appends one event without waiting for the writer; pair with `wait_committed`. Blocks
    /// while the writer is `pending_bytes_max` behind.
    pub fn append_nowait(&self, path: &ChannelPath, data: &[u8]) -> Result<EventId> {
        self.append_each(&[(path, data)], None, Budget::Wait, &mut |_| {})?
            .ok_or(Error::Closed)
    }

    /// For async callers of `append_batch_nowait_with`, which never blocks: resolves once
    /// `bytes` (`storage::encoded_len` of the events) fit in the writer's budget, or once the store
    /// refuses appends. Between this and the append, other callers may take the room too; the
    /// budget is then passed by what those callers append at once, which is bounded by the
    /// threads that append.
    pub async fn room(&self, bytes: u64) {
        self.inner.shared.room(bytes).await
    }

    /// Appends events in order, each with a fresh id, without waiting for the writer:
    /// consecutive events of one stream share one pass through the locks. `on_id` is called with
    /// each new id before the event can be committed (and so before any reader or watermark can
    /// show it); the server records a publisher there, so fan-out always knows whom not to send
    /// an event back to. It runs under the stream's lock: it must be short and must not append.
    /// On an error, exactly the events `on_id` was called for are appended (a stream's
    /// consecutive events are appended all or none); the rest are not.
    ///
    /// It never blocks: an async caller (the server) awaits `room` first, so that no runtime
    /// thread waits for the disk.
    pub fn append_batch_nowait_with(
        &self,
        events: &[(&ChannelPath, &[u8])],
        on_id: &mut dyn FnMut(EventId),
    ) -> Result<Option<EventId>> {
        self.append_each(events, None, Budget::Take, on_id)
    }

    /// Appends events in order, each with a fresh id; returns the last id once committed
    /// under the policy (as `append`). Consecutive events of one stream share one lock.
    pub fn append_batch(&self, events: &[(&ChannelPath, &[u8])]) -> Result<Option<EventId>> {
        let last = self.append_each(events, None, Budget::Wait, &mut |_| {})?;
        if let (Some(id), Durability::Always) = (last, self.inner.shared.opts.durability) {
            self.inner.shared.wait_committed(id)?;
        }
        Ok(last)
    }

    /// Appends events with ids chosen by the caller (import). Each id must be above every id in
    /// the store; the first that is not stops the batch with `IdNotAbove`, and nothing after it
    /// is appended.
    pub fn append_with_ids(
        &self,
        events: &[(EventId, &ChannelPath, &[u8])],
    ) -> Result<Option<EventId>> {
        let mut last = None;
        for (id, path, data) in events {
            last = self.append_each(&[(path, data)], Some(*id), Budget::Wait, &mut |_| {})?;
        }
        Ok(last)
    }

    fn append_each(
        &self,
        events: &[(&ChannelPath, &[u8])],
        fixed_id: Option<EventId>,
        budget: Budget,
        on_id: &mut dyn FnMut(EventId),
    ) -> Result<Option<EventId>> {
        if self.inner.access == Access::ReadOnly {
            return Err(Error::Closed);
        }
        let shared = &self.inner.shared;
        let opts = &shared.opts;
        let mut last = None;
        let mut i = 0;
        while i < events.len() {
            let stream = self.stream_for(events[i].0)?;
            let run = events[i..]
                .iter()
                .take_while(|(p, _)| p.prefix(self.inner.stream_depth) == stream.root().as_str())
                .count();
            let batch = &events[i..i + run];
            let bytes: u64 = batch
                .iter()
                .map(|(p, d)| super::record::event_len(p.as_str(), d) as u64)
                .sum();
            for (p, d) in batch {
                stream::check_event(opts, p.as_str(), d)?;
            }
            match budget {
                Budget::Wait => shared.reserve(bytes)?,
                Budget::Take => shared.take_budget(bytes)?,
            }
            let mut state = stream.state.lock();
            let first_id = {
                let mut seq = shared.seq.lock();
                seq.check_writable()?;
                let first = match fixed_id {
                    Some(id) => {
                        let last_id = seq.ids.last();
                        if !seq.ids.take(id) {
                            return Err(Error::IdNotAbove {
                                id: id.0,
                                last: last_id.0,
                            });
                        }
                        id
                    }
                    None => seq.ids.next(opts.clock.now()).ok_or(Error::IdsExhausted)?,
                };
                // The rest of the run gets the next ids: above `first`, and handed out under the
                // same lock, so nothing can come between them.
                for _ in 1..batch.len() {
                    let now = seq.ids.last();
                    seq.ids.next(now).ok_or(Error::IdsExhausted)?;
                }
                shared.mark_dirty(&mut seq, &stream);
                first
            };
            let mut id = first_id;
            for (p, d) in batch {
                state.append(stream.dir(), opts, id, p.as_str(), d);
                on_id(id);
                last = Some(id);
                id = id.next();
            }
            drop(state);
            shared
                .counters
                .events_appended
                .fetch_add(batch.len() as u64, std::sync::atomic::Ordering::Relaxed);
            shared
                .counters
                .bytes_appended
                .fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
            i += run;
        }
        Ok(last)
    }

    /// The stream that holds `path`, created (with its directory) on first use unless the store
    /// holds `streams_max` already.
    pub(super) fn stream_for(&self, path: &ChannelPath) -> Result<Arc<Stream>> {
        let root = path.prefix(self.inner.stream_depth);
        if let Some(s) = self.inner.streams.read().get(root) {
            return Ok(Arc::clone(s));
        }
        let mut streams = self.inner.streams.write();
        if let Some(s) = streams.get(root) {
            return Ok(Arc::clone(s));
        }
        let max = self.inner.shared.opts.streams_max;
        if streams.len() >= max {
            return Err(Error::TooManyStreams { max });
        }
        let root = path.truncated(self.inner.stream_depth);
        let parent = layout::streams_dir(&self.inner.dir);
        let dir = parent.join(layout::stream_dir_name(&root));
        fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, "create directory", e))?;
        self.inner.shared.seq.lock().dirs_to_sync.push(parent);
        let state = StreamState {
            segments: Arc::new(Vec::new()),
            live: VecDeque::new(),
            pending: Vec::new(),
            last_id: EventId(0),
        };
        let stream = Arc::new(Stream::new(root.clone(), dir, state));
        streams.insert(root, Arc::clone(&stream));
        Ok(stream)
    }

    /// Blocks until `id` is committed under the policy.
    pub fn wait_committed(&self, id: EventId) -> Result<()> {
        self.inner.shared.wait_committed(id)
    }

    /// Waits, without blocking a thread, until `id` is committed under the policy. Runtime
    /// agnostic: it awaits an `event-listener`.
    pub async fn committed_async(&self, id: EventId) -> Result<()> {
        let shared = &self.inner.shared;
        loop {
            if let Some(outcome) = shared.outcome(id) {
                return outcome;
            }
            let listener = self.listen_commits();
            if let Some(outcome) = shared.outcome(id) {
                return outcome;
            }
            listener.await;
        }
    }

    /// The commit watermark: every event with an id at or below it is committed, in every
    /// stream. Live readers that span streams read up to it and no further.
    pub fn committed(&self) -> EventId {
        self.inner.shared.committed()
    }

    /// Every event at or below this id is durable (fdatasync'd).
    pub fn durable(&self) -> EventId {
        self.inner.shared.durable()
    }

    /// Blocks until the watermark passes `after` (or `timeout`); returns the watermark. With a
    /// reader taken afterwards, this is the live tail for synchronous code.
    pub fn wait_beyond(&self, after: EventId, timeout: Duration) -> EventId {
        self.inner.shared.wait_beyond(after, timeout)
    }

    /// A listener that fires at the next commit; it is a `Future` for async code. Check
    /// `committed()` after creating it, then await it, so no commit is missed.
    pub fn listen_commits(&self) -> event_listener::EventListener {
        self.inner.shared.listen()
    }

    /// Running totals of the writer, for metrics.
    pub fn totals(&self) -> super::Totals {
        let c = &self.inner.shared.counters;
        let get = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        super::Totals {
            events_appended: get(&c.events_appended),
            bytes_appended: get(&c.bytes_appended),
            fsyncs: get(&c.fsyncs),
            commit_rounds: get(&c.commit_rounds),
            write_failures: get(&c.write_failures),
        }
    }

    /// Tells `observer` of every commit round and fsync from now on. One observer per store:
    /// returns false, changing nothing, when one is set already.
    pub fn observe_commits(&self, observer: Arc<dyn super::CommitObserver>) -> bool {
        self.inner.shared.observer.set(observer).is_ok()
    }

    /// The write failure for which the store refuses appends now, if any.
    pub fn failure(&self) -> Option<WriteFailure> {
        self.inner.shared.failure()
    }

    /// Whether the append that returned `id` has an outcome yet: `Some(Ok)` committed under
    /// the policy, `Some(Err)` failed (its write failed and was undone).
    pub fn outcome(&self, id: EventId) -> Option<Result<()>> {
        self.inner.shared.outcome(id)
    }

    /// A snapshot for reading the events `selector` names.
    pub fn reader(&self, selector: &Selector) -> Reader {
        Reader::new(selector.clone(), self.streams_of(selector))
    }

    /// What reads of `selector` can return, in two numbers (see `Heads`). Read the watermark
    /// first, then this. Cheap enough for every cached HTTP answer: no allocation, one read lock.
    pub fn heads(&self, selector: &Selector) -> Heads {
        let mut heads = Heads {
            sum: 0,
            newest: EventId(0),
        };
        self.each_stream_of(selector, |stream| {
            let last = stream.visible_last();
            heads.sum += u128::from(last.0);
            heads.newest = heads.newest.max(last);
        });
        heads
    }

    /// The streams that can hold events `selector` selects.
    fn streams_of(&self, selector: &Selector) -> Vec<Arc<Stream>> {
        let mut streams = Vec::new();
        self.each_stream_of(selector, |s| streams.push(Arc::clone(s)));
        streams
    }

    /// Calls `f` with each stream that can hold events `selector` selects, under the streams'
    /// read lock.
    fn each_stream_of(&self, selector: &Selector, f: impl FnMut(&Arc<Stream>)) {
        match selector {
            // One channel lives in exactly one stream, even when it is shallower than the depth.
            Selector::Channel(c) => {
                let streams = self.inner.streams.read();
                streams
                    .get(c.prefix(self.inner.stream_depth))
                    .into_iter()
                    .for_each(f);
            }
            _ => self.each_stream_in(&selector.scope(), f),
        }
    }

    /// The streams that can hold events of `scope`'s subtree.
    fn streams_for(&self, scope: &ChannelPath) -> Vec<Arc<Stream>> {
        let mut streams = Vec::new();
        self.each_stream_in(scope, |s| streams.push(Arc::clone(s)));
        streams
    }

    /// Calls `f` with each stream that can hold events of `scope`'s subtree, under the streams'
    /// read lock.
    fn each_stream_in(&self, scope: &ChannelPath, f: impl FnMut(&Arc<Stream>)) {
        let streams = self.inner.streams.read();
        let depth = self.inner.stream_depth;
        if scope.depth() >= depth {
            streams.get(scope.prefix(depth)).into_iter().for_each(f);
            return;
        }
        streams
            .range(scope.clone()..)
            .take_while(|(root, _)| scope.is_root() || root.as_str().starts_with(scope.as_str()))
            .filter(|(root, _)| scope.contains(root.as_str()))
            .map(|(_, s)| s)
            .for_each(f);
    }

    /// Every channel with at least one event in `scope`'s subtree, sorted.
    pub fn channels(&self, scope: &ChannelPath) -> Result<Vec<String>> {
        let mut found = BTreeSet::new();
        for stream in self.streams_for(scope) {
            stream_channels(&stream, scope, &mut found)?;
        }
        Ok(found.into_iter().collect())
    }

    /// The direct children of `path` that hold events at or below them, sorted.
    pub fn children(&self, path: &ChannelPath) -> Result<Vec<String>> {
        let prefix_len = if path.is_root() {
            1
        } else {
            path.as_str().len() + 1
        };
        let mut out = BTreeSet::new();
        for channel in self.channels(path)? {
            let Some(rest) = channel.get(prefix_len..) else {
                continue;
            };
            if rest.is_empty() {
                continue;
            }
            let child_len = prefix_len + rest.find('/').unwrap_or(rest.len());
            out.insert(channel[..child_len].to_owned());
        }
        Ok(out.into_iter().collect())
    }

    /// Channels matching a selector (a glob, subtree or one channel), sorted.
    pub fn matching_channels(&self, selector: &Selector) -> Result<Vec<String>> {
        Ok(self
            .channels(&selector.scope())?
            .into_iter()
            .filter(|c| selector.matches(c))
            .collect())
    }

    /// Figures per stream, sorted by stream root.
    pub fn stats(&self) -> Result<Vec<StreamStats>> {
        let streams: Vec<Arc<Stream>> = self.inner.streams.read().values().cloned().collect();
        let mut out = Vec::with_capacity(streams.len());
        for stream in streams {
            let snap = stream.snapshot(None);
            let mut stats = StreamStats {
                root: stream.root().to_string(),
                segments: snap.segments.len(),
                events: 0,
                bytes: 0,
                channels: {
                    let mut found = BTreeSet::new();
                    stream_channels(&stream, &ChannelPath::root(), &mut found)?;
                    found.len()
                },
                first_id: None,
                last_id: None,
            };
            let mut first = None;
            let mut last = None;
            for seg in snap.segments.iter() {
                let (events, lo, hi) = match snap.live_view(seg) {
                    Some(l) => {
                        // Not the file's length: a live segment made from a spare is longer.
                        stats.bytes += l.committed_end;
                        let reader_events = count_live(seg, l.committed_end)?;
                        (reader_events.0, reader_events.1, reader_events.2)
                    }
                    None => {
                        stats.bytes += fs::metadata(seg.path()).map(|m| m.len()).unwrap_or(0);
                        let s = seg.sealed()?.summary;
                        (s.event_count, Some(s.first_id), Some(s.last_id))
                    }
                };
                stats.events += events;
                first = first.or(lo);
                last = hi.or(last);
            }
            stats.first_id = first.map(|i| EventId(i).to_string());
            stats.last_id = last.map(|i| EventId(i).to_string());
            out.push(stats);
        }
        Ok(out)
    }

    /// Writes and syncs everything appended so far, whatever the policy.
    pub fn flush(&self) -> Result<()> {
        let last = self.inner.shared.seq.lock().ids.last();
        self.inner.shared.wait_committed(last)?;
        let streams: Vec<Arc<Stream>> = self.inner.streams.read().values().cloned().collect();
        for stream in streams {
            let state = stream.state.lock();
            for live in &state.live {
                if !live.seg.is_sealed_loaded()
                    && live.committed_end > super::record::SEGMENT_HEADER_LEN as u64
                {
                    live.seg.sync_data(&*self.inner.shared.opts.io)?;
                }
            }
        }
        Ok(())
    }

    /// Flushes, stops the writer thread and syncs. Appends after this fail with `Closed`.
    pub fn close(&self) -> Result<()> {
        let handle = self.inner.writer.lock().take();
        let Some(handle) = handle else { return Ok(()) };
        let flushed = self.flush();
        self.inner.shared.request_shutdown();
        if handle.join().is_err() {
            tracing::error!("the writer thread panicked");
        }
        flushed
    }
}

/// Adds the channels of one stream that lie in `scope`'s subtree: from each sealed segment's
/// channel table (a range of it: the table is sorted) and from the live segments' heads.
fn stream_channels(
    stream: &Stream,
    scope: &ChannelPath,
    found: &mut BTreeSet<String>,
) -> Result<()> {
    let snap = stream.snapshot(None);
    for seg in snap.segments.iter() {
        if snap.live_view(seg).is_some() {
            continue;
        }
        let footer = seg.sealed()?.footer();
        let corrupt = |k| Error::corrupt(seg.path(), 0, k);
        let mut i = footer.lower_bound(scope.as_str()).map_err(corrupt)?;
        while i < footer.channel_count() {
            let entry = footer.entry(i).map_err(corrupt)?;
            if !entry.path.starts_with(scope.as_str()) {
                break;
            }
            if scope.contains(entry.path) {
                found.insert(entry.path.to_owned());
            }
            i += 1;
        }
    }
    let mut live = Vec::new();
    stream.live_channels(scope, &mut live);
    found.extend(live);
    Ok(())
}

/// (events, first id, last id) of a live segment's committed records.
fn count_live(seg: &super::segment::Segment, end: u64) -> Result<(u64, Option<u64>, Option<u64>)> {
    let bytes = seg.records(Some(end))?;
    let mut n = 0;
    let (mut first, mut last) = (None, None);
    for item in
        super::segment::Records::new(seg, bytes, super::record::SEGMENT_HEADER_LEN as u64, end)
    {
        let (_, rec) = item?;
        n += 1;
        first = first.or(Some(rec.id));
        last = Some(rec.id);
    }
    Ok((n, first, last))
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(handle) = self.writer.lock().take() {
            self.shared.request_shutdown();
            let _joined = handle.join();
        }
    }
}

/// Holds a data directory's lock for as long as it lives.
pub struct DirLock {
    _file: File,
}

/// Takes the directory lock without opening a store: exclusive (a writer or `verify --repair`)
/// or shared (read-only tools). Fails with `Locked` when a conflicting holder exists, and with
/// `NotAStore` when `dir` is not a data directory.
pub fn lock_directory(dir: &Path, exclusive: bool) -> Result<DirLock> {
    if !dir.join(layout::META_FILE).exists() {
        return Err(Error::NotAStore {
            path: dir.to_path_buf(),
            why: "no IVY metadata file".into(),
        });
    }
    let access = if exclusive {
        Access::ReadWrite
    } else {
        Access::ReadOnly
    };
    Ok(DirLock {
        _file: take_lock(dir, access)?,
    })
}

fn take_lock(dir: &Path, access: Access) -> Result<File> {
    let path = dir.join(layout::LOCK_FILE);
    let file = match access {
        Access::ReadWrite => OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path),
        Access::ReadOnly => File::open(&path).or_else(|_| File::open(dir)),
    }
    .map_err(|e| Error::io(&path, "open lock file", e))?;
    let locked = match access {
        Access::ReadWrite => file.try_lock(),
        Access::ReadOnly => file.try_lock_shared(),
    };
    match locked {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(Error::Locked(dir.to_path_buf())),
        Err(std::fs::TryLockError::Error(e)) => Err(Error::io(&path, "lock", e)),
    }
}

/// The stream depth a data directory was created with (its `IVY` file), or `None` when `dir` holds
/// no `IVY` file yet. The depth is fixed at creation: a store opened with another keeps this one.
pub fn stored_stream_depth(dir: &Path) -> Result<Option<usize>> {
    let path = dir.join(layout::META_FILE);
    match fs::read_to_string(&path) {
        Ok(text) => parse_meta(&text)
            .map(Some)
            .map_err(|why| Error::NotAStore { path, why }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(&path, "read", e)),
    }
}

/// Reads `DIR/IVY`, or writes it for a new store. Returns the stream depth in force: the one the
/// directory was created with (a different one would route channels to other streams).
fn read_or_write_meta(dir: &Path, wanted_depth: usize, access: Access) -> Result<usize> {
    let path = dir.join(layout::META_FILE);
    match stored_stream_depth(dir)? {
        Some(depth) => Ok(depth),
        None if access == Access::ReadWrite => {
            if !is_valid_stream_depth(wanted_depth) {
                return Err(Error::BadStreamDepth(wanted_depth));
            }
            let text = format!("ivy data directory\nformat 1\nstream_depth {wanted_depth}\n");
            let tmp = dir.join("IVY.tmp");
            fs::write(&tmp, text).map_err(|e| Error::io(&tmp, "write", e))?;
            File::open(&tmp)
                .and_then(|f| f.sync_all())
                .map_err(|e| Error::io(&tmp, "sync", e))?;
            fs::rename(&tmp, &path).map_err(|e| Error::io(&path, "rename", e))?;
            File::open(dir)
                .and_then(|f| f.sync_all())
                .map_err(|e| Error::io(dir, "sync directory", e))?;
            Ok(wanted_depth)
        }
        None => Err(Error::io(
            &path,
            "read",
            std::io::ErrorKind::NotFound.into(),
        )),
    }
}

/// Whether a store may be created with this stream depth: 1 to `channel::DEPTH_MAX`, as paths
/// are deep. The same rule refuses an `IVY` file with another.
pub fn is_valid_stream_depth(depth: usize) -> bool {
    (1..=crate::channel::DEPTH_MAX).contains(&depth)
}

/// The stream depth of an `IVY` file's text. The page (`storage-format.md`) gives its three
/// lines; a missing or unknown `format`, or a depth outside 1..=32, is refused rather than guessed.
fn parse_meta(text: &str) -> std::result::Result<usize, String> {
    let mut lines = text.lines();
    if lines.next() != Some("ivy data directory") {
        return Err("first line is not 'ivy data directory'".into());
    }
    let (mut format, mut depth) = (None, None);
    for line in lines {
        match line.split_once(' ') {
            Some(("format", v)) => format = Some(v),
            Some(("stream_depth", v)) => depth = Some(v),
            _ => {}
        }
    }
    match format {
        Some("1") => {}
        Some(v) => return Err(format!("unsupported format {v} (this build reads 1)")),
        None => return Err("no format line".into()),
    }
    let depth = depth.ok_or("no stream_depth line")?;
    depth
        .parse()
        .ok()
        .filter(|d| is_valid_stream_depth(*d))
        .ok_or_else(|| {
            format!(
                "stream_depth {depth} is not 1..={}",
                crate::channel::DEPTH_MAX
            )
        })
}

/// How an append takes its bytes of the writer's budget (`StoreOptions::pending_bytes_max`).
#[derive(Clone, Copy)]
enum Budget {
    /// Block the thread until they fit.
    Wait,
    /// Take them now: the caller has awaited `Store::room`.
    Take,
}

#[cfg(test)]
mod tests {
    use super::parse_meta;

    #[test]
    fn meta_files_are_read_or_refused() {
        let ok = |text: &str, depth| assert_eq!(parse_meta(text), Ok(depth), "{text:?}");
        ok("ivy data directory\nformat 1\nstream_depth 1\n", 1);
        ok("ivy data directory\nformat 1\nstream_depth 32", 32);
        ok(
            "ivy data directory\nstream_depth 2\nformat 1\nlater addition x\n",
            2,
        );
        for bad in [
            "",
            "ivy data directory\nstream_depth 1\n",
            "ivy data directory\nformat 2\nstream_depth 1\n",
            "ivy data directory\nformat 1\n",
            "ivy data directory\nformat 1\nstream_depth 0\n",
            "ivy data directory\nformat 1\nstream_depth 33\n",
            "ivy data directory\nformat 1\nstream_depth -1\n",
            "something else\nformat 1\nstream_depth 1\n",
        ] {
            assert!(parse_meta(bad).is_err(), "{bad:?}");
        }
    }
}
