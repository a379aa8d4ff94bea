//! One stream: the log of one channel subtree, as an ordered list of segments.
//!
//! Appenders encode records into the stream's pending chunks under `state`'s lock; the writer
//! thread (`commit.rs`) takes the chunks, writes them, makes them durable under the policy and
//! only then advances each live segment's `committed_end` and committed channel heads. Readers
//! see nothing past `committed_end`, so a reader can never observe an event that a crash could
//! take back (under `always`), and never forms a slice over bytes not yet written (mmap contract,
//! clause 3).
//!
//! Channel chains: every event record carries the offset of the previous record of the same
//! channel in the same segment. A live segment keeps each channel's last offset in memory; a
//! sealed one has them in its footer's channel table. So the last N events of one channel cost a
//! lookup per segment plus N record decodes, whatever the neighbours wrote.

use super::error::{Error, Result};
use super::index::{self, IndexBuilder, IndexEntry};
use super::record::{self, FooterSummary, TableEntry};
use super::segment::Segment;
use super::StoreOptions;
use crate::channel::ChannelPath;
use crate::event_id::EventId;
use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

pub struct Stream {
    root: ChannelPath,
    dir: PathBuf,
    pub(crate) state: Mutex<StreamState>,
    /// Set while the stream is on the writer's dirty list; guarded by the sequencer's lock.
    pub(crate) is_dirty: AtomicBool,
    /// The newest id readers can be shown in this stream (`Store::heads`): raised by the writer
    /// once a round is published to readers (`mark_committed`) or a rollback keeps events, before
    /// the commit watermark moves. Only ever grows.
    visible_last: AtomicU64,
}

pub(crate) struct StreamState {
    /// All segments, oldest first. Replaced (copy on write) when a segment is added, so a reader's
    /// snapshot is one `Arc` clone.
    pub segments: Arc<Vec<Arc<Segment>>>,
    /// Segments not yet sealed on disk, oldest first: the active one, and during a roll the one
    /// whose seal is still pending.
    pub live: VecDeque<LiveSegment>,
    pub pending: Vec<Chunk>,
    /// The last id appended (pending or not), or the last id on disk.
    pub last_id: EventId,
}

/// Per-channel state of a live segment.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ChannelHeads {
    pub first: u64,
    pub last: u64,
    pub count: u64,
    pub committed_last: u64,
    pub committed_count: u64,
}

pub(crate) struct LiveSegment {
    pub seg: Arc<Segment>,
    /// Channel path -> its slot in `heads`. Slots let the writer publish commits without
    /// hashing or decoding anything under the stream lock.
    ///
    /// Every append looks its channel up here. `foldhash` (seeded per process, so clients
    /// cannot aim collisions at it) hashes a short path in a fraction of std's SipHash, which
    /// was 190 instructions an append under callgrind (6% of a publish's server CPU).
    pub slots: HashMap<Box<str>, u32, foldhash::fast::RandomState>,
    pub heads: Vec<ChannelHeads>,
    pub index: Vec<IndexEntry>,
    pub builder: IndexBuilder,
    pub pending_end: u64,
    pub committed_end: u64,
    pub event_count: u64,
    pub first_event_id: Option<EventId>,
    pub last_id: EventId,
    pub last_event_offset: u64,
    pub is_sealing: bool,
}

/// Bytes for the writer: contiguous, at `offset` of `seg`.
pub(crate) struct Chunk {
    pub seg: Arc<Segment>,
    pub offset: u64,
    pub bytes: Vec<u8>,
    /// Where the event records of this chunk end (before a seal record, if any).
    pub records_end: u64,
    /// (channel slot, offset) of each event record in the chunk, in order.
    pub events: Vec<(u32, u64)>,
    /// Set on the chunk that starts its segment: the writer makes the file first.
    pub create: Option<Create>,
    pub is_seal: bool,
}

/// How the writer makes a new segment's file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Create {
    /// An empty file that grows with each write.
    Empty,
    /// The zero-filled spare if one is ready (`spare.rs`), else an empty file. Asked for when the
    /// segment before was full, so a cold stream never costs a whole segment of disk.
    PreferSpare,
}

impl LiveSegment {
    pub fn new(seg: Arc<Segment>, interval_bytes: u32) -> LiveSegment {
        LiveSegment {
            seg,
            slots: HashMap::default(),
            heads: Vec::new(),
            index: Vec::new(),
            builder: IndexBuilder::new(interval_bytes),
            pending_end: record::SEGMENT_HEADER_LEN as u64,
            committed_end: record::SEGMENT_HEADER_LEN as u64,
            event_count: 0,
            first_event_id: None,
            last_id: EventId(0),
            last_event_offset: 0,
            is_sealing: false,
        }
    }

    /// The view of a live segment whose records end at `end`, rebuilt from the records on disk
    /// (recovery at open, and the rollback of a failed write).
    pub fn recover(seg: Arc<Segment>, end: u64, interval_bytes: u32) -> Result<LiveSegment> {
        let mut live = LiveSegment::new(Arc::clone(&seg), interval_bytes);
        let bytes = seg.records(Some(end))?;
        for item in
            super::segment::Records::new(&seg, bytes, record::SEGMENT_HEADER_LEN as u64, end)
        {
            let (offset, rec) = item?;
            live.note_recovered(offset, rec.id, rec.path, rec.len as u64);
        }
        Ok(live)
    }

    /// Registers an event record at `offset` as written and committed (recovery).
    pub fn note_recovered(&mut self, offset: u64, id: u64, path: &str, len: u64) {
        let (slot, _) = self.note_pending(offset, id, path);
        let heads = &mut self.heads[slot as usize];
        heads.committed_last = offset;
        heads.committed_count = heads.count;
        self.pending_end = offset + len;
        self.committed_end = self.pending_end;
    }

    /// Updates the appender's view for an event record at `offset`; returns the channel's slot
    /// and the record's chain link.
    fn note_pending(&mut self, offset: u64, id: u64, path: &str) -> (u32, u64) {
        let (slot, prev) = match self.slots.get(path) {
            Some(&slot) => {
                let h = &mut self.heads[slot as usize];
                let prev = h.last;
                h.last = offset;
                h.count += 1;
                (slot, prev)
            }
            None => {
                // Slots are bounded by the records of one segment, far below u32::MAX.
                let slot = self.heads.len() as u32;
                self.slots.insert(path.into(), slot);
                self.heads.push(ChannelHeads {
                    first: offset,
                    last: offset,
                    count: 1,
                    ..ChannelHeads::default()
                });
                (slot, 0)
            }
        };
        if self.builder.wants(offset) {
            self.index.push(IndexEntry { id, offset });
        }
        self.event_count += 1;
        self.first_event_id.get_or_insert(EventId(id));
        self.last_id = EventId(id);
        self.last_event_offset = offset;
        (slot, prev)
    }

    fn head(&self, path: &str) -> Option<&ChannelHeads> {
        self.slots.get(path).map(|&slot| &self.heads[slot as usize])
    }

    fn footer_entries(&self) -> Vec<TableEntry<'_>> {
        let mut entries: Vec<TableEntry<'_>> = self
            .slots
            .iter()
            .map(|(path, &slot)| {
                let h = &self.heads[slot as usize];
                TableEntry {
                    path,
                    first_offset: h.first,
                    last_offset: h.last,
                    count: h.count,
                }
            })
            .collect();
        entries.sort_unstable_by(|a, b| a.path.as_bytes().cmp(b.path.as_bytes()));
        entries
    }
}

impl Stream {
    pub fn new(root: ChannelPath, dir: PathBuf, state: StreamState) -> Stream {
        Stream {
            root,
            dir,
            // What recovery found on disk is all visible.
            visible_last: AtomicU64::new(state.last_id.0),
            state: Mutex::new(state),
            is_dirty: AtomicBool::new(false),
        }
    }

    /// The newest id readers can be shown in this stream (0 while it has none).
    pub fn visible_last(&self) -> EventId {
        EventId(self.visible_last.load(Ordering::Acquire))
    }

    /// Writer: events up to `id` are published to readers.
    pub(crate) fn note_visible(&self, id: EventId) {
        self.visible_last.fetch_max(id.0, Ordering::AcqRel);
    }

    /// For tests of the writer's failure paths, which must raise it themselves: sets it back to
    /// `id`, as it stood before events past `id` were published.
    #[cfg(test)]
    pub(crate) fn set_visible_last(&self, id: EventId) {
        self.visible_last.store(id.0, Ordering::Release);
    }

    pub fn root(&self) -> &ChannelPath {
        &self.root
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Snapshot for a reader: the segment list, and for each live segment how far it is
    /// committed and, when `channel` is given, that channel's committed head there.
    pub fn snapshot(&self, channel: Option<&str>) -> StreamSnapshot {
        let state = self.state.lock();
        let live = state
            .live
            .iter()
            .map(|l| LiveView {
                seg: Arc::clone(&l.seg),
                committed_end: l.committed_end,
                head: channel.and_then(|c| l.head(c)).and_then(|h| {
                    (h.committed_count > 0).then_some((h.committed_last, h.committed_count))
                }),
                event_count: l.event_count,
            })
            .collect();
        StreamSnapshot {
            segments: Arc::clone(&state.segments),
            live,
        }
    }

    /// Runs `f` over a segment's index: the in-memory entries while the segment is live (looked
    /// up only when `is_live`, under the stream lock), else its sealed index file. A segment
    /// sealed since the reader's snapshot is found through the second path.
    pub fn with_index<R>(
        &self,
        seg: &Segment,
        is_live: bool,
        f: impl FnOnce(&dyn index::Entries) -> R,
    ) -> Result<R> {
        if is_live {
            let state = self.state.lock();
            if let Some(l) = state.live.iter().find(|l| std::ptr::eq(&*l.seg, seg)) {
                return Ok(f(&l.index));
            }
        }
        let sealed = seg.sealed()?;
        Ok(f(sealed.index(seg.path(), seg.first_id())?))
    }

    /// Channel paths in live segments that lie in `scope`'s subtree.
    pub fn live_channels(&self, scope: &ChannelPath, out: &mut Vec<String>) {
        let state = self.state.lock();
        for l in &state.live {
            for (path, &slot) in &l.slots {
                let h = &l.heads[slot as usize];
                if h.committed_count > 0 && scope.contains(path) {
                    out.push(path.to_string());
                }
            }
        }
    }
}

impl StreamState {
    /// Appends one event (id already assigned, above `last_id`) into the pending chunks, rolling
    /// to a new segment first when the active one is full or too old.
    pub fn append(
        &mut self,
        dir: &Path,
        opts: &StoreOptions,
        id: EventId,
        path: &str,
        data: &[u8],
    ) {
        debug_assert!(id > self.last_id);
        let rec_len = record::event_len(path, data) as u64;
        if let Some(create) = self.needs_roll(opts, id, rec_len) {
            self.seal_active();
            self.start_segment(dir, opts, id, create);
        }
        let live = self.live.back_mut().expect("start_segment made one");
        let offset = live.pending_end;
        let (slot, prev) = live.note_pending(offset, id.0, path);
        live.pending_end += rec_len;
        let seg = Arc::clone(&live.seg);
        let chunk = self.chunk_for(&seg, offset);
        record::encode_event(&mut chunk.bytes, id.0, prev, path, data);
        chunk.records_end = offset + rec_len;
        chunk.events.push((slot, offset));
        self.last_id = id;
    }

    /// Whether this record needs a new segment, and how to make its file.
    fn needs_roll(&self, opts: &StoreOptions, id: EventId, rec_len: u64) -> Option<Create> {
        let Some(live) = self.live.back() else {
            return Some(Create::Empty);
        };
        if live.is_sealing {
            return Some(Create::Empty);
        }
        if live.event_count == 0 {
            return None;
        }
        let full = live.pending_end + rec_len > opts.segment_bytes_max;
        let old = match (opts.segment_age_max, live.first_event_id) {
            (Some(age), Some(first)) => {
                let age_ns = u64::try_from(age.as_nanos()).unwrap_or(u64::MAX);
                id.0.saturating_sub(first.0) > age_ns
            }
            _ => false,
        };
        match (full, old) {
            (true, _) if opts.preallocate => Some(Create::PreferSpare),
            (false, false) => None,
            _ => Some(Create::Empty),
        }
    }

    /// The pending chunk that continues at `offset` of `seg`, or a new one.
    fn chunk_for(&mut self, seg: &Arc<Segment>, offset: u64) -> &mut Chunk {
        let continues = self.pending.last().is_some_and(|c| {
            Arc::ptr_eq(&c.seg, seg) && !c.is_seal && c.offset + c.bytes.len() as u64 == offset
        });
        if !continues {
            self.pending.push(Chunk {
                seg: Arc::clone(seg),
                offset,
                bytes: Vec::with_capacity(64 * 1024),
                records_end: offset,
                events: Vec::new(),
                create: None,
                is_seal: false,
            });
        }
        self.pending.last_mut().expect("pushed above")
    }

    /// Encodes the seal of the active segment, if it has events.
    pub fn seal_active(&mut self) {
        let Some(live) = self.live.back_mut() else {
            return;
        };
        if live.is_sealing || live.event_count == 0 {
            return;
        }
        live.is_sealing = true;
        let seal_offset = live.pending_end;
        let entries = live.footer_entries();
        let summary = FooterSummary {
            event_count: live.event_count,
            first_id: live.first_event_id.map_or(0, |i| i.0),
            last_id: live.last_id.0,
            channel_count: entries.len() as u64,
        };
        let mut bytes = Vec::new();
        record::encode_seal(
            &mut bytes,
            seal_offset,
            summary,
            live.last_event_offset,
            &entries,
        );
        live.pending_end += bytes.len() as u64;
        let seg = Arc::clone(&live.seg);
        let chunk = self.chunk_for(&seg, seal_offset);
        chunk.bytes.extend_from_slice(&bytes);
        chunk.is_seal = true;
    }

    fn start_segment(
        &mut self,
        dir: &Path,
        opts: &StoreOptions,
        first_id: EventId,
        create: Create,
    ) {
        let seg = Arc::new(Segment::new_live(dir, first_id));
        let mut segments = Vec::with_capacity(self.segments.len() + 1);
        segments.extend(self.segments.iter().cloned());
        segments.push(Arc::clone(&seg));
        self.segments = Arc::new(segments);
        self.live.push_back(LiveSegment::new(
            Arc::clone(&seg),
            opts.index_interval_bytes,
        ));
        let mut bytes = Vec::with_capacity(64 * 1024);
        record::encode_segment_header(&mut bytes, first_id.0);
        self.pending.push(Chunk {
            seg,
            offset: 0,
            records_end: bytes.len() as u64,
            events: Vec::new(),
            bytes,
            create: Some(create),
            is_seal: false,
        });
    }

    /// Writer, after `chunks` are written (and durable under the policy): publishes them to
    /// readers. A sealed segment leaves the live list here, after its sealed view was set.
    pub fn mark_committed(&mut self, chunks: &[Chunk]) {
        for chunk in chunks {
            let Some(pos) = self
                .live
                .iter()
                .position(|l| Arc::ptr_eq(&l.seg, &chunk.seg))
            else {
                continue;
            };
            let live = &mut self.live[pos];
            for &(slot, offset) in &chunk.events {
                let h = &mut live.heads[slot as usize];
                h.committed_last = offset;
                h.committed_count += 1;
            }
            live.committed_end = live.committed_end.max(chunk.records_end);
            if chunk.is_seal && chunk.seg.is_sealed_loaded() {
                self.live.remove(pos);
            }
        }
    }
}

/// What a reader sees of one stream.
pub struct StreamSnapshot {
    pub segments: Arc<Vec<Arc<Segment>>>,
    pub live: Vec<LiveView>,
}

pub struct LiveView {
    pub seg: Arc<Segment>,
    pub committed_end: u64,
    /// (last offset, count) of the selected channel, committed.
    pub head: Option<(u64, u64)>,
    pub event_count: u64,
}

impl StreamSnapshot {
    pub fn live_view(&self, seg: &Segment) -> Option<&LiveView> {
        self.live.iter().find(|l| std::ptr::eq(&*l.seg, seg))
    }
}

/// Checks a record against the append limits before an id is spent on it.
pub fn check_event(opts: &StoreOptions, path: &str, data: &[u8]) -> Result<()> {
    if data.len() > opts.event_bytes_max {
        return Err(Error::TooLarge {
            len: data.len(),
            max: opts.event_bytes_max,
        });
    }
    debug_assert!(path.len() <= crate::channel::PATH_BYTES_MAX);
    Ok(())
}
