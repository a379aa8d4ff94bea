//! Reads: one channel, a glob or a subtree, over an id range, forwards or backwards, merged by
//! id across streams, with data borrowed from the segment maps (no copy).
//!
//! A `Reader` is a snapshot: the segment lists of the streams involved and, for each live
//! segment, how far it was committed when the snapshot was taken. Events committed later are
//! not seen; take a new reader for them (the tail loop of the server does exactly that).
//!
//! How each selector is served:
//! - one channel: its chain (see `stream.rs`): per segment a head lookup, then one decode per
//!   event returned. Forward reads collect the chain of one segment at a time, or scan the
//!   segment when that channel is a large share of it, whichever touches fewer bytes.
//! - glob and subtree: a scan of the streams that can hold matches, filtered by path, started at
//!   the index entry for the range's first id; backward scans go block by block (index entries
//!   are block starts).
//!
//! `Reader::events_in_live_segments` reads only as far as the live segments go, and says when it
//! stopped at a sealed one: for callers that must not wait for the disk.

use super::error::{Corruption, Error, Result};
use super::index;
use super::record::{self, Record, KIND_SEAL};
use super::segment::Segment;
use super::stream::{Stream, StreamSnapshot};
use crate::channel::Selector;
use crate::event_id::EventId;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::ops::Bound;
use std::sync::Arc;

/// Oldest first or newest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Forward,
    Backward,
}

/// Which events a read returns.
#[derive(Debug, Clone, Copy)]
pub struct Query {
    pub start: Bound<EventId>,
    pub end: Bound<EventId>,
    pub direction: Direction,
    pub limit: Option<usize>,
}

impl Query {
    pub fn all() -> Query {
        Query {
            start: Bound::Unbounded,
            end: Bound::Unbounded,
            direction: Direction::Forward,
            limit: None,
        }
    }

    /// The last `n` events (returned newest first).
    pub fn last(n: usize) -> Query {
        Query {
            direction: Direction::Backward,
            limit: Some(n),
            ..Query::all()
        }
    }

    /// The range as inclusive `[lo, hi]`, or `None` when empty.
    fn bounds(&self) -> Option<(u64, u64)> {
        let lo = match self.start {
            Bound::Unbounded => 0,
            Bound::Included(x) => x.0,
            Bound::Excluded(x) => x.0.checked_add(1)?,
        };
        let hi = match self.end {
            Bound::Unbounded => u64::MAX,
            Bound::Included(x) => x.0,
            Bound::Excluded(x) => x.0.checked_sub(1)?,
        };
        (lo <= hi).then_some((lo, hi))
    }
}

/// One event, borrowing from the reader's segment maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event<'r> {
    pub id: EventId,
    pub path: &'r str,
    pub data: &'r [u8],
}

/// A snapshot of the streams a selector touches.
pub struct Reader {
    selector: Selector,
    streams: Vec<(Arc<Stream>, StreamSnapshot)>,
}

impl Reader {
    pub(crate) fn new(selector: Selector, streams: Vec<Arc<Stream>>) -> Reader {
        let channel = match &selector {
            Selector::Channel(c) => Some(c.as_str()),
            _ => None,
        };
        let streams = streams
            .into_iter()
            .map(|s| {
                let snap = s.snapshot(channel);
                (s, snap)
            })
            .collect();
        Reader { selector, streams }
    }

    pub fn selector(&self) -> &Selector {
        &self.selector
    }

    /// `events`, but only as far as the live segments go: a read that would open a sealed
    /// segment (whose pages, and its index's, may have to come from the disk) ends there
    /// instead, and `Events::stopped_at_sealed` says so. The server builds small answers this
    /// way on its async threads, which must not wait for the disk, and reads again on a blocking
    /// thread when it stopped.
    pub fn events_in_live_segments(&self, query: &Query) -> Events<'_> {
        let mut events = self.events(query);
        for source in &mut events.sources {
            source.is_live_only = true;
        }
        events
    }

    /// The selected events of `query`, lazily, in id order of its direction.
    pub fn events(&self, query: &Query) -> Events<'_> {
        let mut sources = Vec::new();
        if let Some((lo, hi)) = query.bounds() {
            for (stream, snap) in &self.streams {
                sources.push(Source::new(
                    stream,
                    snap,
                    &self.selector,
                    query.direction,
                    lo,
                    hi,
                ));
            }
        }
        Events {
            heap: BinaryHeap::with_capacity(sources.len()),
            is_primed: false,
            sources,
            direction: query.direction,
            remaining: query.limit.unwrap_or(usize::MAX),
            is_failed: false,
        }
    }
}

/// Merges the sources of a reader by id.
pub struct Events<'r> {
    sources: Vec<Source<'r>>,
    /// (key, source) where key orders the next event of each source: id forwards, reversed
    /// backwards, so the heap's top is always the next event to return.
    heap: BinaryHeap<(Reverse<u64>, usize)>,
    is_primed: bool,
    direction: Direction,
    remaining: usize,
    is_failed: bool,
}

impl<'r> Events<'r> {
    /// Whether a read of `Reader::events_in_live_segments` ended at a sealed segment: what it
    /// returned may then lack events, and the read must be made with `Reader::events`.
    pub fn stopped_at_sealed(&self) -> bool {
        self.sources.iter().any(|s| s.stopped_at_sealed)
    }

    fn key(&self, id: EventId) -> Reverse<u64> {
        match self.direction {
            Direction::Forward => Reverse(id.0),
            Direction::Backward => Reverse(u64::MAX - id.0),
        }
    }

    /// Pulls source `i`'s next event into its slot and the heap.
    fn refill(&mut self, i: usize) -> Result<()> {
        match self.sources[i].next_event() {
            Some(Ok(ev)) => {
                let key = self.key(ev.id);
                self.sources[i].peeked = Some(ev);
                self.heap.push((key, i));
                Ok(())
            }
            Some(Err(e)) => Err(e),
            None => Ok(()),
        }
    }
}

impl<'r> Iterator for Events<'r> {
    type Item = Result<Event<'r>>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.remaining == 0 || self.is_failed {
            return None;
        }
        if let [only] = self.sources.as_mut_slice() {
            // One stream (one channel, or one subtree): already in order, nothing to merge. The
            // heap's push and pop per event were 3-4% of a last-N read's CPU.
            let item = only.next_event()?;
            match item {
                Ok(_) => self.remaining -= 1,
                Err(_) => self.is_failed = true,
            }
            return Some(item);
        }
        if !self.is_primed {
            self.is_primed = true;
            for i in 0..self.sources.len() {
                if let Err(e) = self.refill(i) {
                    self.is_failed = true;
                    return Some(Err(e));
                }
            }
        }
        let (_, i) = self.heap.pop()?;
        let ev = self.sources[i].peeked.take()?;
        if let Err(e) = self.refill(i) {
            self.is_failed = true;
            return Some(Err(e));
        }
        self.remaining -= 1;
        Some(Ok(ev))
    }
}

enum Cursor<'r> {
    /// Open the segment at `Source::pos`.
    Open,
    Scan {
        seg: &'r Segment,
        bytes: &'r [u8],
        at: u64,
    },
    /// Walk one channel's chain backwards from `next` (0 ends it: offset 0 is the header).
    Chain {
        seg: &'r Segment,
        bytes: &'r [u8],
        next: u64,
    },
    /// Offsets to pop, refilled block by block from `blocks` (backward scans).
    Stack {
        seg: &'r Segment,
        bytes: &'r [u8],
        offsets: Vec<u64>,
        blocks: Vec<u64>,
        block_end: u64,
    },
    Done,
}

struct Source<'r> {
    stream: &'r Stream,
    snap: &'r StreamSnapshot,
    selector: &'r Selector,
    /// Whether every event of the stream is selected (no path check needed).
    is_whole_stream: bool,
    direction: Direction,
    lo: u64,
    hi: u64,
    pos: usize,
    cursor: Cursor<'r>,
    peeked: Option<Event<'r>>,
    /// End at the first sealed segment instead of opening it (`events_in_live_segments`).
    is_live_only: bool,
    stopped_at_sealed: bool,
}

impl<'r> Source<'r> {
    fn new(
        stream: &'r Stream,
        snap: &'r StreamSnapshot,
        selector: &'r Selector,
        direction: Direction,
        lo: u64,
        hi: u64,
    ) -> Source<'r> {
        let is_whole_stream =
            matches!(selector, Selector::Subtree(root) if root.contains(stream.root().as_str()));
        let segs = &snap.segments;
        let anchor = match direction {
            Direction::Forward => lo,
            Direction::Backward => hi,
        };
        let after = segs.partition_point(|s| s.first_id().0 <= anchor);
        let (pos, cursor) = match (direction, after) {
            (_, _) if segs.is_empty() => (0, Cursor::Done),
            (Direction::Forward, 0) => (0, Cursor::Open),
            (Direction::Backward, 0) => (0, Cursor::Done),
            (_, n) => (n - 1, Cursor::Open),
        };
        Source {
            stream,
            snap,
            selector,
            is_whole_stream,
            direction,
            lo,
            hi,
            pos,
            cursor,
            peeked: None,
            is_live_only: false,
            stopped_at_sealed: false,
        }
    }

    fn channel(&self) -> Option<&'r str> {
        match self.selector {
            Selector::Channel(c) => Some(c.as_str()),
            _ => None,
        }
    }

    fn advance(&mut self) {
        self.cursor = match self.direction {
            Direction::Forward => {
                self.pos += 1;
                match self.snap.segments.get(self.pos) {
                    Some(s) if s.first_id().0 <= self.hi => Cursor::Open,
                    _ => Cursor::Done,
                }
            }
            Direction::Backward => match self.pos.checked_sub(1) {
                Some(p) => {
                    self.pos = p;
                    Cursor::Open
                }
                None => Cursor::Done,
            },
        };
    }

    /// Sets up the cursor for segment `pos`.
    fn open(&mut self) -> Result<()> {
        let Some(seg) = self.snap.segments.get(self.pos) else {
            self.cursor = Cursor::Done;
            return Ok(());
        };
        let seg: &'r Segment = seg;
        let live = self.snap.live_view(seg);
        if live.is_none() && self.is_live_only {
            self.stopped_at_sealed = true;
            self.cursor = Cursor::Done;
            return Ok(());
        }
        let bytes = seg.records(live.map(|l| l.committed_end))?;
        let end = bytes.len() as u64;
        if end <= record::SEGMENT_HEADER_LEN as u64 {
            self.advance();
            return Ok(());
        }
        if let Some(channel) = self.channel() {
            return self.open_chain(seg, bytes, channel);
        }
        self.cursor = match self.direction {
            Direction::Forward => Cursor::Scan {
                seg,
                bytes,
                at: self.seek(seg, self.lo, end)?,
            },
            Direction::Backward => {
                let mut blocks = self
                    .stream
                    .with_index(seg, live.is_some(), |ix| index::block_starts(ix, end))?;
                let last_block = self.seek(seg, self.hi, end)?;
                blocks.retain(|b| *b <= last_block);
                Cursor::Stack {
                    seg,
                    bytes,
                    offsets: Vec::new(),
                    blocks,
                    block_end: end,
                }
            }
        };
        Ok(())
    }

    /// Where to start scanning for the first event with id >= `id`.
    fn seek(&self, seg: &'r Segment, id: u64, end: u64) -> Result<u64> {
        let is_live = self.snap.live_view(seg).is_some();
        let found = self
            .stream
            .with_index(seg, is_live, |ix| index::seek(ix, id, end))?;
        Ok(found.unwrap_or(record::SEGMENT_HEADER_LEN as u64))
    }

    fn open_chain(&mut self, seg: &'r Segment, bytes: &'r [u8], channel: &str) -> Result<()> {
        let (head, count, seg_events) = match self.snap.live_view(seg) {
            Some(l) => match l.head {
                Some((last, count)) => (last, count, l.event_count),
                None => (0, 0, 0),
            },
            None => {
                let sealed = seg.sealed()?;
                let footer = sealed.footer();
                match footer
                    .find(channel)
                    .map_err(|k| Error::corrupt(seg.path(), 0, k))?
                {
                    Some(e) => (e.last_offset, e.count, sealed.summary.event_count),
                    None => (0, 0, 0),
                }
            }
        };
        if count == 0 {
            self.advance();
            return Ok(());
        }
        self.cursor = match self.direction {
            Direction::Backward => Cursor::Chain {
                seg,
                bytes,
                next: head,
            },
            // A channel that is a large share of the segment is cheaper to scan than to chase.
            Direction::Forward if count.saturating_mul(4) >= seg_events => Cursor::Scan {
                seg,
                bytes,
                at: self.seek(seg, self.lo, bytes.len() as u64)?,
            },
            Direction::Forward => {
                let mut offsets = Vec::new();
                let mut next = head;
                while next != 0 {
                    let rec = chain_step(seg, bytes, next, channel)?;
                    if rec.id < self.lo {
                        break;
                    }
                    offsets.push(next);
                    next = rec.prev;
                }
                Cursor::Stack {
                    seg,
                    bytes,
                    offsets,
                    blocks: Vec::new(),
                    block_end: 0,
                }
            }
        };
        Ok(())
    }

    fn next_event(&mut self) -> Option<Result<Event<'r>>> {
        loop {
            match self.step() {
                Ok(Step::Event(ev)) => return Some(Ok(ev)),
                Ok(Step::Again) => {}
                Ok(Step::End) => return None,
                Err(e) => {
                    self.cursor = Cursor::Done;
                    return Some(Err(e));
                }
            }
        }
    }

    /// One move of the cursor.
    fn step(&mut self) -> Result<Step<'r>> {
        let (lo, hi) = (self.lo, self.hi);
        let channel = self.channel().unwrap_or("/");
        match &mut self.cursor {
            Cursor::Done => Ok(Step::End),
            Cursor::Open => {
                self.open()?;
                Ok(Step::Again)
            }
            Cursor::Scan { seg, bytes, at } => {
                if *at >= bytes.len() as u64 {
                    self.advance();
                    return Ok(Step::Again);
                }
                let offset = *at;
                let rec = seg.decode(bytes, offset)?;
                if rec.kind == KIND_SEAL {
                    self.advance();
                    return Ok(Step::Again);
                }
                *at += rec.len as u64;
                if rec.id > hi {
                    self.cursor = Cursor::Done;
                    return Ok(Step::End);
                }
                Ok(self.select(rec, lo, hi))
            }
            Cursor::Chain { seg, bytes, next } => {
                if *next == 0 {
                    self.advance();
                    return Ok(Step::Again);
                }
                let rec = chain_step(seg, bytes, *next, channel)?;
                *next = rec.prev;
                if rec.id < lo {
                    self.cursor = Cursor::Done;
                    return Ok(Step::End);
                }
                Ok(self.select(rec, lo, hi))
            }
            Cursor::Stack {
                seg,
                bytes,
                offsets,
                blocks,
                block_end,
            } => {
                if let Some(offset) = offsets.pop() {
                    let rec = seg.decode(bytes, offset)?;
                    let past = match self.direction {
                        Direction::Forward => rec.id > hi,
                        Direction::Backward => rec.id < lo,
                    };
                    if past {
                        self.cursor = Cursor::Done;
                        return Ok(Step::End);
                    }
                    return Ok(self.select(rec, lo, hi));
                }
                let Some(start) = blocks.pop() else {
                    self.advance();
                    return Ok(Step::Again);
                };
                let (seg, bytes) = (*seg, *bytes);
                for item in super::segment::Records::new(seg, bytes, start, *block_end) {
                    let (offset, _) = item?;
                    offsets.push(offset);
                }
                *block_end = start;
                Ok(Step::Again)
            }
        }
    }

    fn select(&self, rec: Record<'r>, lo: u64, hi: u64) -> Step<'r> {
        let wanted = rec.id >= lo
            && rec.id <= hi
            && (self.is_whole_stream || self.selector.matches(rec.path));
        if wanted {
            Step::Event(Event {
                id: EventId(rec.id),
                path: rec.path,
                data: rec.data,
            })
        } else {
            Step::Again
        }
    }
}

enum Step<'r> {
    Event(Event<'r>),
    Again,
    End,
}

/// Decodes a chain link and checks it is a record of `channel` that points further back.
fn chain_step<'a>(
    seg: &Segment,
    bytes: &'a [u8],
    offset: u64,
    channel: &'a str,
) -> Result<Record<'a>> {
    let rec = seg.decode_event_of(bytes, offset, channel)?;
    if rec.prev >= offset {
        return Err(Error::corrupt(
            seg.path(),
            offset,
            Corruption::BadChainLink(offset),
        ));
    }
    Ok(rec)
}
