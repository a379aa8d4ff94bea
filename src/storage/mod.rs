//! The storage engine: channel-subtree segment logs.
//!
//! A `Store` is one data directory. Every channel belongs to one **stream** (by default each
//! top-level channel's subtree, plus one for `/` itself; `stream_depth` makes deeper subtrees
//! streams). A stream is an ordered list of **segments**, append-only files of CRC-framed
//! records, rolled at a size or an age and sealed with a footer that lists each channel's last
//! record. Each segment has a sparse **index** from id to offset. `storage-format.md` specifies
//! the bytes.
//!
//! Invariants this module keeps:
//! - Ids are strictly increasing across the store, and log order is id order in every stream.
//! - A reader never sees an event before it is committed (written; and synced under `always`).
//! - Every segment but the last of a stream is sealed on disk (seals are synced under every
//!   policy before the next segment is created).
//! - Bytes are checked (length, CRC, path) every time they are decoded; damage is an error with
//!   file and offset, never "no data". Only recovery cuts a torn tail, and it logs the cut.
//! - A mapped file is never truncated or rewritten below what readers may see (`mmap.rs` states
//!   the contract).
//!
//! **Architecture invariant:** nothing here knows HTTP, WebSocket, the ivy1 text protocol or
//! tokio. Waiting is done with `event-listener`, which serves threads and async tasks alike.

mod commit;
mod error;
mod index;
pub mod io;
mod layout;
mod mmap;
mod read;
mod record;
mod recovery;
mod rollback;
mod segment;
mod spare;
mod store;
mod stream;
mod tail;
pub mod verify;

pub use error::{Corruption, Error, Result, WriteFailure};
pub use read::{Direction, Event, Events, Query, Reader};
/// The bytes an event takes in the log, as `Store::room` counts them.
pub use record::event_len as encoded_len;
pub use store::{
    is_valid_stream_depth, lock_directory, stored_stream_depth, DirLock, Heads, Store, StreamStats,
};
pub use tail::Tail;

use crate::clock::{Clock, SystemClock};
use std::sync::Arc;
use std::time::Duration;

/// Running totals of the writer (for metrics).
#[derive(Debug, Clone, Copy, Default)]
pub struct Totals {
    pub events_appended: u64,
    pub bytes_appended: u64,
    pub fsyncs: u64,
    pub commit_rounds: u64,
    /// Rounds whose write failed (and was rolled back, or stopped the store).
    pub write_failures: u64,
}

/// Told of the writer's work as it happens, for latency and batch-size metrics that running
/// totals cannot give (`Store::observe_commits`). Called on the writer thread, so it must be
/// quick and must not block: every ack of the next round waits for it.
pub trait CommitObserver: Send + Sync {
    /// A round committed `events` events (written, and synced under `always`) in `took`.
    fn round(&self, events: usize, took: Duration);
    /// One `fdatasync` of a segment file took `took`.
    fn fsync(&self, took: Duration);
}

/// The sparsity of the index: one entry per this many bytes of records (a scan of at most this
/// much finds any id). 4 KiB is one page; see `benches/storage.rs` (time seek).
pub const DEFAULT_INDEX_INTERVAL: u32 = 4096;

/// When an append counts as committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Group commit: an append returns once its batch is written and fdatasync'd.
    Always,
    /// Appends return once queued; the writer writes at once and syncs every interval.
    Interval(Duration),
    /// Appends return once queued; the writer writes at once and the OS decides when to flush.
    Never,
}

impl std::str::FromStr for Durability {
    type Err = String;

    /// `always`, `never` or `interval=MS`.
    fn from_str(s: &str) -> Result<Durability, String> {
        match s {
            "always" => Ok(Durability::Always),
            "never" => Ok(Durability::Never),
            _ => {
                let ms = s
                    .strip_prefix("interval=")
                    .and_then(|v| v.parse::<u64>().ok())
                    .filter(|ms| *ms > 0)
                    .ok_or_else(|| {
                        format!(
                            "durability must be always, never or interval=MS (MS > 0), not {s:?}"
                        )
                    })?;
                Ok(Durability::Interval(Duration::from_millis(ms)))
            }
        }
    }
}

/// Settings of a store; every limit has its unit in its name.
#[derive(Clone)]
pub struct StoreOptions {
    pub durability: Durability,
    /// Subtrees at this depth are streams (1: `/rooms`, 2: `/rooms/a`). Fixed when the
    /// directory is created; a store reopened with another value keeps the stored one.
    pub stream_depth: usize,
    /// A segment is sealed before a record would take it past this size.
    pub segment_bytes_max: u64,
    /// A segment is sealed before an event more than this much younger than its first.
    pub segment_age_max: Option<Duration>,
    /// Appends overwrite zeroes instead of extending the file (faster `fdatasync`): segments
    /// after a full one start as zero-filled files made in the background (`spare.rs`), and
    /// other live segments keep zeroes written a step ahead of their records
    /// (`Segment::zero_ahead`).
    pub preallocate: bool,
    pub index_interval_bytes: u32,
    /// The largest event data accepted.
    pub event_bytes_max: usize,
    /// Encoded bytes waiting for the writer before appends block.
    pub pending_bytes_max: u64,
    /// Streams the store may hold; an append that would start another is refused
    /// (`Error::TooManyStreams`). Each stream keeps its live segment's file open and mapped, so
    /// this is how a server keeps clients that invent top-level channels from taking every
    /// descriptor (which would fail every write, not just theirs).
    pub streams_max: usize,
    /// After a failed write is rolled back, appends are refused for this long; then the next
    /// round tries the disk again (see `commit.rs`).
    pub write_retry: Duration,
    pub clock: Arc<dyn Clock>,
    /// The writer's file operations (tests substitute a recording layer).
    pub io: Arc<dyn io::FileIo>,
}

impl Default for StoreOptions {
    fn default() -> StoreOptions {
        StoreOptions {
            durability: Durability::Always,
            stream_depth: 1,
            segment_bytes_max: 64 << 20,
            segment_age_max: None,
            preallocate: true,
            index_interval_bytes: DEFAULT_INDEX_INTERVAL,
            event_bytes_max: 16 << 20,
            pending_bytes_max: 64 << 20,
            streams_max: usize::MAX,
            write_retry: Duration::from_secs(1),
            clock: Arc::new(SystemClock),
            io: Arc::new(io::OsIo),
        }
    }
}

impl std::fmt::Debug for StoreOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreOptions")
            .field("durability", &self.durability)
            .field("stream_depth", &self.stream_depth)
            .field("segment_bytes_max", &self.segment_bytes_max)
            .field("segment_age_max", &self.segment_age_max)
            .field("preallocate", &self.preallocate)
            .field("index_interval_bytes", &self.index_interval_bytes)
            .field("event_bytes_max", &self.event_bytes_max)
            .field("pending_bytes_max", &self.pending_bytes_max)
            .field("write_retry", &self.write_retry)
            .finish_non_exhaustive()
    }
}

/// Codec entry points for fuzzing and the format test: no I/O.
pub mod codec {
    pub use super::index::{
        decode_file as decode_index_file, encode_file as encode_index_file, IndexEntry,
    };
    pub use super::record::{
        decode, decode_event_of, decode_footer, decode_segment_header, decode_trailer,
        encode_event, encode_seal, encode_segment_header, FooterSummary, Record, TableEntry,
        KIND_EVENT, KIND_SEAL,
    };
    pub use super::recovery::scan_tail;
}
