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
//!
//! The same report covers ids above the watermark within the committed end. A round takes
//! each stream's whole pending list, after it read the watermark, so it can write an append
//! that took its id in between: that event is committed in its stream (durable under `always`)
//! but waits for the next round to pass the watermark. If that round fails, the event is not
//! cut, and readers will see it once the watermark passes the failed ids, so it counts as
//! committed too. (`tests/faults.rs`' random faults found it reported failed but stored.)

use super::error::Result;
use super::record::SEGMENT_HEADER_LEN;
use super::segment::Records;
use super::stream::{LiveSegment, Stream, StreamState};
use super::StoreOptions;
use std::sync::Arc;

/// What a rollback left.
#[derive(Debug, Default)]
pub(crate) struct RolledBack {
    /// Bytes of pending chunks dropped (returned to the append budget).
    pub dropped_bytes: u64,
    /// Ids above the watermark that stay stored: past the committed end in a segment whose seal
    /// completed, or within the committed end (see the module docs), newest first.
    pub kept: Vec<u64>,
}

/// Rolls `stream` back to its committed end (see the module docs); `watermark` is the store's
/// commit watermark, which the failed round did not move.
pub(crate) fn roll_back(
    stream: &Stream,
    opts: &StoreOptions,
    watermark: u64,
) -> Result<RolledBack> {
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
            // Sealed: readers find it through its sealed view from now on, as after a commit.
            // Its events past the committed end stay, and `stored_above` reports them.
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
    out.kept = stored_above(&state, watermark)?;
    if let Some(&newest) = out.kept.iter().max() {
        stream.note_visible(crate::event_id::EventId(newest));
    }
    Ok(out)
}

/// The ids above `watermark` that the stream still holds once cut back, newest segment first
/// until one holds an id at or below it: those of a segment whose seal completed, and those an
/// earlier round wrote (see the module docs). Usually none: the newest live segment's last id
/// says so without a scan.
fn stored_above(state: &StreamState, watermark: u64) -> Result<Vec<u64>> {
    let mut ids = Vec::new();
    if state.live.back().is_some_and(|l| l.last_id.0 <= watermark) {
        return Ok(ids);
    }
    for seg in state.segments.iter().rev() {
        let live_end = state
            .live
            .iter()
            .find(|l| Arc::ptr_eq(&l.seg, seg))
            .map(|l| l.committed_end);
        let bytes = seg.records(live_end)?;
        let mut reached = false;
        for item in Records::new(seg, bytes, SEGMENT_HEADER_LEN as u64, bytes.len() as u64) {
            let id = item?.1.id;
            if id > watermark {
                ids.push(id);
            } else {
                reached = true;
            }
        }
        if reached || seg.first_id().0 <= watermark {
            break;
        }
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::ChannelPath;
    use crate::event_id::EventId;
    use crate::storage::Store;

    /// The state a race leaves: a round wrote events whose ids are above the watermark it read
    /// (they took their ids after it did), and the next round failed. Here the watermark is
    /// simply passed lower than what the stream committed.
    #[test]
    fn events_written_above_the_watermark_are_reported_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Small segments, so that the events span sealed segments and the live one.
        let opts = StoreOptions {
            segment_bytes_max: 4096,
            ..StoreOptions::default()
        };
        let store = Store::open(dir.path(), opts.clone()).expect("open");
        let path = ChannelPath::parse("/r/a").expect("path");
        let ids: Vec<u64> = (0..30)
            .map(|_| store.append(&path, &[b'x'; 300]).expect("append").0)
            .collect();
        let stream = store.stream_for(&path).expect("stream");
        assert!(stream.state.lock().segments.len() >= 3, "several segments");
        let kept = |watermark: u64| {
            // As if the events past the watermark had not been published by a round: the ones
            // kept are published by the rollback, for `Store::heads`.
            stream.set_visible_last(EventId(watermark));
            let mut kept = roll_back(&stream, &opts, watermark).expect("rollback").kept;
            kept.sort_unstable();
            let newest = kept.last().copied().unwrap_or(watermark);
            assert_eq!(stream.visible_last(), EventId(newest), "above {watermark}");
            kept
        };
        assert_eq!(kept(ids[17]), ids[18..], "the newest 12, across a seal");
        assert_eq!(kept(ids[29]), Vec::<u64>::new(), "none above the last");
        assert_eq!(kept(0), ids, "all, back to the first segment");
        // Nothing was cut: every event is still there.
        let all = store.reader(&crate::channel::Selector::Channel(path.clone()));
        let read = all.events(&crate::storage::Query::all()).count();
        assert_eq!(read, 30);
    }
}
