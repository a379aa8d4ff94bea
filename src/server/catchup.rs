//! Reading a session's events from the log: for `+/path@TS` replay and for subscribers that
//! fell behind the fan-out. The same reader as HTTP range reads (`storage::Reader`).
//!
//! One call reads at most `max` events after `cursor` and up to `upto` (never past the fan-out's
//! position, which is at or below the commit watermark), for the union of the session's
//! subscriptions, each only after its own start, without the session's own publishes, merged by
//! id with duplicates (overlapping subtrees) removed.

use super::fanout::Hub;
use crate::channel::{ChannelPath, Selector};
use crate::event_id::EventId;
use crate::storage::{Query, Result};
use bytes::Bytes;
use std::collections::{BTreeMap, VecDeque};
use std::ops::Bound;

/// What one read found: frames in id order, and the cursor after them.
pub struct Batch {
    pub frames: Vec<(EventId, Bytes)>,
    pub cursor: EventId,
}

pub fn read_after(
    hub: &Hub,
    subscriptions: &[(ChannelPath, EventId)],
    own: &VecDeque<EventId>,
    cursor: EventId,
    upto: EventId,
    max: usize,
) -> Result<Batch> {
    let mut found: BTreeMap<EventId, Bytes> = BTreeMap::new();
    // Everything up to `cut` has been seen by every subscription's read.
    let mut cut = upto;
    for (path, since) in subscriptions {
        let start = cursor.max(*since);
        if start >= upto {
            continue;
        }
        let reader = hub.store.reader(&Selector::Subtree(path.clone()));
        let query = Query {
            start: Bound::Excluded(start),
            end: Bound::Included(upto),
            limit: Some(max),
            ..Query::all()
        };
        let mut n = 0;
        let mut last = start;
        for event in reader.events(&query) {
            let event = event?;
            n += 1;
            last = event.id;
            if own.binary_search(&event.id).is_err() && !found.contains_key(&event.id) {
                found.insert(event.id, hub.encode(event.id, event.path, event.data));
            }
        }
        if n == max {
            cut = cut.min(last);
        }
    }
    let frames: Vec<(EventId, Bytes)> = found
        .into_iter()
        .take_while(|(id, _)| *id <= cut)
        .take(max)
        .collect();
    let cursor = match frames.len() {
        n if n == max => frames.last().map_or(cut, |(id, _)| *id),
        _ => cut,
    };
    Ok(Batch { frames, cursor })
}
