//! Undoing a failed write: one stream, back to exactly what is committed.
//!
//! After a failed round (`commit.rs`) a stream may hold, past its committed end: pending chunks
//! never written, records written in part or in full, a seal record and perhaps its index file, a
//! new segment file with a header and some records. None of it was published (readers stop at
//! the committed end) and every id in it has been failed, so it must go, on disk and in memory,
//! before the stream takes appends again. Otherwise the next append would be written after
//! bytes that recovery would later read as the stream's records.
//!
//! Newest first: a live segment with no committed event (created for the failed events) is
//! removed with any index file. Each other one touched by the failure is cut back to its
//! committed end (truncate, then fdatasync, so a power loss cannot bring the failed bytes back)
//! and its in-memory view is rebuilt from the records that remain, which is what recovery does at
//! open. One exception: a segment whose seal completed (synced, indexed, its sealed view in use)
//! cannot be cut under its readers. Its events are durable and whole, so they are **kept**: the
//! rollback reports their ids, which then count as committed rather than failed.

use super::error::Result;
use super::record::SEGMENT_HEADER_LEN;
use super::segment::Records;
use super::stream::{LiveSegment, Stream};
use super::StoreOptions;
use std::sync::Arc;

/// What a rollback left.
#[derive(Debug, Default)]
pub(crate) struct RolledBack {
    /// Bytes of pending chunks dropped (returned to the append budget).
    pub dropped_bytes: u64,
    /// Ids past the committed end that stay stored (in a segment whose seal completed).
    pub kept: Vec<u64>,
}

/// Rolls `stream` back to its committed end (see the module docs).
pub(crate) fn roll_back(stream: &Stream, opts: &StoreOptions) -> Result<RolledBack> {
    let io = &*opts.io;
    let mut state = stream.state.lock();
    let mut out = RolledBack {
        dropped_bytes: state.pending.drain(..).map(|c| c.bytes.len() as u64).sum(),
        kept: Vec::new(),
    };
    while let Some(live) = state.live.back() {
        if live.committed_end > SEGMENT_HEADER_LEN as u64 {
            break;
        }
        let seg = Arc::clone(&live.seg);
        seg.remove_files(io)?;
        state.live.pop_back();
        let kept: Vec<_> = state
            .segments
            .iter()
            .filter(|s| !Arc::ptr_eq(s, &seg))
            .cloned()
            .collect();
        state.segments = Arc::new(kept);
    }
    let mut i = 0;
    while i < state.live.len() {
        let live = &mut state.live[i];
        if live.pending_end == live.committed_end && !live.is_sealing {
            i += 1;
            continue;
        }
        let seg = Arc::clone(&live.seg);
        if seg.is_sealed_loaded() {
            let records = seg.records(None)?;
            for item in Records::new(&seg, records, live.committed_end, records.len() as u64) {
                out.kept.push(item?.1.id);
            }
            // Sealed: readers find it through its sealed view from now on, as after a commit.
            state.live.remove(i);
            continue;
        }
        if live.is_sealing {
            seg.remove_index_files(io)?;
        }
        seg.truncate(io, live.committed_end)?;
        *live = LiveSegment::recover(seg, live.committed_end, opts.index_interval_bytes)?;
        i += 1;
    }
    Ok(out)
}
