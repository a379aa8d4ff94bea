//! Reading a session's events from the log: for `+/path@TS` replay and for subscribers that
//! fell behind the fan-out. The same reader as HTTP range reads (`storage::Reader`).
//!
//! One call reads at most `max` events, and about `bytes_max` bytes of frames (at least one;
//! each frame counted with its entry, `budget::ENTRY_BYTES`, as in a session's queue),
//! after `cursor` and up to `upto` (never past the fan-out's
//! position, which is at or below the commit watermark), for the union of the session's
//! subscriptions, each only after its own start, without the session's own publishes, merged by
//! id with duplicates (overlapping subtrees) removed.

use super::budget::ENTRY_BYTES;
use super::fanout::Hub;
use crate::channel::{ChannelPath, Selector};
use crate::event_id::EventId;
use crate::storage::{Query, Reader, Result};
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
    bytes_max: usize,
) -> Result<Batch> {
    if let [(path, since)] = subscriptions {
        return match subscription_read(hub, path, *since, cursor, upto, max) {
            Some(read) => read_in_order(hub, read, own, upto, max, bytes_max),
            None => Ok(Batch {
                frames: Vec::new(),
                cursor: upto,
            }),
        };
    }
    let mut found: BTreeMap<EventId, Bytes> = BTreeMap::new();
    let mut found_bytes = 0;
    // Everything up to `cut` has been seen by every subscription's read, and every event up to
    // it that was seen is in `found`.
    let mut cut = upto;
    for (path, since) in subscriptions {
        let Some((reader, query, start)) = subscription_read(hub, path, *since, cursor, upto, max)
        else {
            continue;
        };
        let mut n = 0;
        let mut last = start;
        let mut hint = 0;
        for event in reader.events(&query) {
            let event = event?;
            // A full batch takes nothing above its largest id: that can wait for the next one,
            // and this subscription has seen everything up to it.
            if let Some((&top, _)) = found.last_key_value() {
                if event.id > top && (found.len() >= max || found_bytes >= bytes_max) {
                    cut = cut.min(top);
                    break;
                }
            }
            n += 1;
            last = event.id;
            if own.binary_search(&event.id).is_err() && !found.contains_key(&event.id) {
                let frame = hub.frame(event.id, event.path, event.data, &mut hint);
                found_bytes += frame.len() + ENTRY_BYTES;
                found.insert(event.id, frame);
                // Over either bound, the largest ids go (never the last frame: a batch always
                // moves on), and the batch ends below them.
                while found.len() > 1 && (found.len() > max || found_bytes > bytes_max) {
                    if let Some((_, dropped)) = found.pop_last() {
                        found_bytes -= dropped.len() + ENTRY_BYTES;
                    }
                    if let Some((&top, _)) = found.last_key_value() {
                        cut = cut.min(top);
                    }
                }
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

/// One subscription's read: at most `max` events after `cursor` and after the subscription's
/// own start `since`, up to `upto`, with where it starts; `None` when that is nothing.
fn subscription_read(
    hub: &Hub,
    path: &ChannelPath,
    since: EventId,
    cursor: EventId,
    upto: EventId,
    max: usize,
) -> Option<(Reader, Query, EventId)> {
    let start = cursor.max(since);
    if start >= upto {
        return None;
    }
    let query = Query {
        start: Bound::Excluded(start),
        end: Bound::Included(upto),
        limit: Some(max),
        ..Query::all()
    };
    Some((
        hub.store.reader(&Selector::Subtree(path.clone())),
        query,
        start,
    ))
}

/// `read_after` for a session with one subscription, the usual case: one reader gives its
/// events in id order, once each, so they need no merging (the map's inserts and allocations
/// were a twentieth of a catching-up server's time), and the read stops at the first frame that
/// does not fit.
fn read_in_order(
    hub: &Hub,
    (reader, query, start): (Reader, Query, EventId),
    own: &VecDeque<EventId>,
    upto: EventId,
    max: usize,
    bytes_max: usize,
) -> Result<Batch> {
    let mut frames: Vec<(EventId, Bytes)> = Vec::new();
    let mut bytes = 0;
    let mut hint = 0;
    let (mut read, mut last_read) = (0, start);
    // The last frame taken, when the next did not fit.
    let mut stopped_at = None;
    for event in reader.events(&query) {
        let event = event?;
        if own.binary_search(&event.id).is_err() {
            let frame = hub.frame(event.id, event.path, event.data, &mut hint);
            let size = frame.len() + ENTRY_BYTES;
            // Never before the first frame: a batch always moves on.
            if let Some((last, _)) = frames.last() {
                if frames.len() >= max || bytes + size > bytes_max {
                    stopped_at = Some(*last);
                    break;
                }
            }
            bytes += size;
            frames.push((event.id, frame));
        }
        read += 1;
        last_read = event.id;
    }
    let cursor = match stopped_at {
        Some(at) => at,
        // The read's limit: everything up to its last event was seen.
        None if read == max => last_read,
        None => upto,
    };
    Ok(Batch { frames, cursor })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::Store;

    /// Batch after batch, a lagging session gets every event of its subscriptions exactly once,
    /// in id order, none of its own, and no batch holds more than its bounds.
    #[test]
    fn batches_are_bounded_and_cover_everything_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::unsynced(dir.path());
        let paths = ["/a/x", "/b", "/c/y/z", "/d"];
        let mut ids = Vec::new();
        for i in 0..400usize {
            let path = ChannelPath::parse(paths[i % paths.len()]).unwrap();
            // Mostly small events, some near the inline limit.
            let data = vec![b'e'; if i % 7 == 0 { 3000 } else { 40 + i % 50 }];
            ids.push((store.append(&path, &data).unwrap(), path));
        }
        let upto = ids.last().unwrap().0;
        store.wait_committed(upto).unwrap();
        let metrics = std::sync::Arc::new(crate::metrics::Metrics::new());
        let hub = Hub::new(store, metrics, &crate::config::ServerOptions::default());
        let sub = |p: &str, since: EventId| (ChannelPath::parse(p).unwrap(), since);
        // `/a` and `/a/x` overlap; `/c` starts late; `/d` is not subscribed.
        let late = ids[101].0;
        let subscriptions = [
            sub("/a", EventId(0)),
            sub("/a/x", EventId(0)),
            sub("/b", EventId(0)),
            sub("/c", late),
        ];
        let own: VecDeque<EventId> = ids.iter().step_by(5).map(|(id, _)| *id).collect();
        // All four at once (merged), and each alone (`read_in_order`).
        let mut sets = vec![&subscriptions[..]];
        sets.extend(subscriptions.chunks(1));
        for subscriptions in sets {
            let covers = |(path, since): &(ChannelPath, EventId),
                          (id, event_path): &(EventId, ChannelPath)| {
                id > since
                    && (event_path == path
                        || event_path
                            .as_str()
                            .starts_with(&format!("{}/", path.as_str())))
            };
            let expected: Vec<EventId> = ids
                .iter()
                .filter(|e| subscriptions.iter().any(|s| covers(s, e)) && !own.contains(&e.0))
                .map(|(id, _)| *id)
                .collect();
            assert!(expected.len() > 50, "{subscriptions:?}");
            for (max, bytes_max) in [(50, 4096), (1024, 1), (3, 1 << 20), (1024, 1 << 20)] {
                let case = format!("{subscriptions:?}, max {max}, bytes_max {bytes_max}");
                let got = read_in_batches(&hub, subscriptions, &own, upto, max, bytes_max);
                assert_eq!(got, expected, "{case}");
            }
        }
    }

    /// Reads from the start to `upto` a batch at a time, checking each batch's bounds; returns
    /// the ids read.
    fn read_in_batches(
        hub: &Hub,
        subscriptions: &[(ChannelPath, EventId)],
        own: &VecDeque<EventId>,
        upto: EventId,
        max: usize,
        bytes_max: usize,
    ) -> Vec<EventId> {
        let mut got = Vec::new();
        let mut cursor = EventId(0);
        let mut batches = 0;
        while cursor < upto {
            let batch = read_after(hub, subscriptions, own, cursor, upto, max, bytes_max).unwrap();
            assert!(batch.cursor > cursor, "no progress at {cursor:?}");
            assert!(batch.frames.len() <= max);
            let bytes: usize = batch
                .frames
                .iter()
                .map(|(_, f)| f.len() + ENTRY_BYTES)
                .sum();
            assert!(
                batch.frames.len() == 1 || bytes <= bytes_max,
                "{bytes} bytes"
            );
            assert!(batch
                .frames
                .iter()
                .all(|(id, _)| *id > cursor && *id <= batch.cursor));
            got.extend(batch.frames.iter().map(|(id, _)| *id));
            cursor = batch.cursor;
            batches += 1;
            assert!(batches < 10_000);
        }
        got
    }
}
