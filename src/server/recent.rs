//! The frames fan-out encoded last, kept so that sessions reading the log back (`catchup.rs`)
//! take them instead of encoding each event again.
//!
//! Why: when many subscribers fall behind at once (a burst, or send buffers bounded with
//! `--ws-send-buffer-bytes`), each reads the same recent stretch of the log on its own, and
//! encoding every event for every one of them was most of the server's work: under unpaced
//! `ivy-bench fanout` with 256 KiB send buffers, 82% of the server's CPU was user space, about a
//! third of it in the allocator, with copying, dropping and escaping the frames after it.
//! Events that fell behind are almost always recent ones, which the dispatcher has just encoded
//! (it encodes every event some session is subscribed to, once). An event's frame depends on its
//! id, path and data alone, so the cached bytes are exactly what encoding would give.
//!
//! The frames are kept in id order, the dispatcher's, up to `bytes_max` bytes (each counted with
//! its entry, as in a session's queue); the oldest go first. A frame not found is encoded as
//! before.

use super::budget::ENTRY_BYTES;
use crate::event_id::EventId;
use bytes::Bytes;
use parking_lot::Mutex;
use std::collections::VecDeque;

pub struct RecentFrames {
    bytes_max: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Strictly increasing ids.
    frames: VecDeque<(EventId, Bytes)>,
    bytes: usize,
}

impl RecentFrames {
    pub fn new(bytes_max: usize) -> RecentFrames {
        RecentFrames {
            bytes_max,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// Keeps `frames`, given in id order; any at or below an id already kept is skipped (the
    /// order is what lookups rely on). The oldest go past the bound.
    pub fn extend<'a>(&self, frames: impl IntoIterator<Item = &'a (EventId, Bytes)>) {
        if self.bytes_max == 0 {
            return;
        }
        let mut inner = self.inner.lock();
        for (id, frame) in frames {
            if inner.frames.back().is_some_and(|(last, _)| last >= id) {
                continue;
            }
            inner.bytes += frame.len() + ENTRY_BYTES;
            inner.frames.push_back((*id, frame.clone()));
        }
        while inner.bytes > self.bytes_max {
            let Some((_, dropped)) = inner.frames.pop_front() else {
                break;
            };
            inner.bytes -= dropped.len() + ENTRY_BYTES;
        }
    }

    /// The frame of event `id`, if it is kept. `hint` is where to look first, and is left
    /// where the next of a run of increasing ids most likely is: a reader's ids follow one
    /// another here, and a binary search over tens of thousands of entries, a cache miss at
    /// each step, was a tenth of a catching-up server's time.
    pub fn get(&self, id: EventId, hint: &mut usize) -> Option<Bytes> {
        let inner = self.inner.lock();
        let frames = &inner.frames;
        // A few entries from the hint (the reader's subtree may skip some), else a search.
        let near = (*hint..frames.len().min(hint.saturating_add(4)))
            .find(|&i| frames.get(i).is_some_and(|(kept, _)| *kept >= id))
            .filter(|&i| frames.get(i).is_some_and(|(kept, _)| *kept == id));
        let at = match near {
            Some(at) => at,
            None => frames.binary_search_by_key(&id, |(kept, _)| *kept).ok()?,
        };
        *hint = at + 1;
        frames.get(at).map(|(_, frame)| frame.clone())
    }

    /// Bytes kept, entries counted.
    #[cfg(test)]
    fn bytes(&self) -> usize {
        self.inner.lock().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(id: u64, len: usize) -> (EventId, Bytes) {
        (EventId(id), Bytes::from(vec![b'f'; len]))
    }

    #[test]
    fn frames_are_found_by_id_until_the_bound_drops_the_oldest() {
        let per = 100 + ENTRY_BYTES;
        let recent = RecentFrames::new(3 * per);
        let get = |id| recent.get(EventId(id), &mut 0);
        recent.extend(&[frame(10, 100), frame(20, 100)]);
        assert_eq!(get(10), Some(frame(10, 100).1));
        assert_eq!(get(15), None, "not an event that was kept");
        recent.extend(&[frame(30, 100), frame(40, 100)]);
        assert_eq!(get(10), None, "the oldest went first");
        for id in [20, 30, 40] {
            assert!(get(id).is_some(), "{id}");
        }
        assert_eq!(recent.bytes(), 3 * per);
    }

    #[test]
    fn frames_out_of_order_are_skipped() {
        let recent = RecentFrames::new(1 << 20);
        recent.extend(&[frame(10, 1), frame(30, 1)]);
        recent.extend(&[frame(20, 2), frame(30, 3), frame(40, 4)]);
        let get = |id| recent.get(EventId(id), &mut 0).map(|f| f.len());
        assert_eq!(get(20), None);
        assert_eq!(get(30), Some(1));
        assert_eq!(get(40), Some(4));
    }

    /// Whatever the hint, the right frame or none: near it, far from it, past the end.
    #[test]
    fn a_hint_only_decides_where_to_look_first() {
        let recent = RecentFrames::new(1 << 20);
        let kept: Vec<_> = (1..=100).map(|i| frame(i * 10, i as usize)).collect();
        recent.extend(&kept);
        for hint_at in [0, 1, 5, 50, 99, 100, 1000] {
            for id in (0..=1010).step_by(5) {
                let mut hint = hint_at;
                let got = recent.get(EventId(id), &mut hint).map(|f| f.len());
                let want =
                    (id % 10 == 0 && (10..=1000).contains(&id)).then_some((id / 10) as usize);
                assert_eq!(got, want, "id {id}, hint {hint_at}");
                if want.is_some() {
                    assert_eq!(hint, (id / 10) as usize, "left after the frame found");
                }
            }
        }
        // A run of increasing ids, one hint.
        let mut hint = 0;
        for id in (10..=1000).step_by(10) {
            assert!(recent.get(EventId(id), &mut hint).is_some());
        }
    }

    #[test]
    fn a_bound_of_zero_keeps_nothing() {
        let recent = RecentFrames::new(0);
        recent.extend(&[frame(10, 1)]);
        assert_eq!(recent.get(EventId(10), &mut 0), None);
        assert_eq!(recent.bytes(), 0);
    }
}
