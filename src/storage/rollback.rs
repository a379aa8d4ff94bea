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
//! removed with any index file; the one left is cut back to its committed end (truncate, then
//! fdatasync, so a power loss cannot bring the failed bytes back) and its in-memory view is
//! rebuilt from the records that remain, which is what recovery does at open. A segment whose
//! seal completed (its sealed view is in use) cannot be cut under its readers: the rollback
//! reports it and the store waits for a restart.

use super::error::{Error, Result};
use super::record::SEGMENT_HEADER_LEN;
use super::stream::{LiveSegment, Stream};
use super::StoreOptions;
use std::sync::Arc;

/// Rolls `stream` back to its committed end; returns the bytes of pending chunks dropped.
pub(crate) fn roll_back(stream: &Stream, opts: &StoreOptions) -> Result<u64> {
    let io = &*opts.io;
    let mut state = stream.state.lock();
    let dropped = state.pending.drain(..).map(|c| c.bytes.len() as u64).sum();
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
    for live in state.live.iter_mut() {
        if live.pending_end == live.committed_end && !live.is_sealing {
            continue;
        }
        let seg = Arc::clone(&live.seg);
        if seg.is_sealed_loaded() {
            return Err(Error::NotWritable(seg.path().to_path_buf()));
        }
        if live.is_sealing {
            seg.remove_index_files(io)?;
        }
        seg.truncate(io, live.committed_end)?;
        *live = LiveSegment::recover(seg, live.committed_end, opts.index_interval_bytes)?;
    }
    Ok(dropped)
}
