//! Answers kept for as long as they stay true, so that a read asked again is a lookup.
//!
//! **When an answer still holds.** A log read is planned against the commit watermark and never
//! reads past it (`read.rs`). What it answers is therefore a function of the request (path and
//! query) and of the events at or below that watermark in the streams its selector touches, and
//! in a running server those only ever gain new events: the log is only appended to, and nothing
//! removes events. (Removing events, if the server ever does, must clear this cache.) So an
//! answer is sent again while one of these holds, as the read decided when it built it (`Valid`):
//! - `Forever`: its range ends at or before the watermark it was read at (`at`, `until`): no
//!   event can join it;
//! - `WhileHeads`: an open range (`n`, `since`, `after`, `limit`) that held every event its
//!   streams had (`Store::heads`: their newest visible id was at or below the watermark): it
//!   holds while those streams publish nothing, whatever other streams do;
//! - `AtWatermark`: any other read, while the watermark is the very one it was read at.
//!
//! Its headers hold with it: the `ETag` hashes the request and what the answer holds by (the
//! range's end, or the heads' sum), `Last-Modified` is its last event's second, and
//! `Cache-Control` is `immutable` exactly for `Forever`.
//!
//! **What it is for.** Many clients asking for the same recent events between writes: a page
//! that loads a room's last 100 lines, dashboards that poll. Each such read costs one hash lookup
//! instead of walking, checking and formatting the events again (`ivy-bench history` and
//! `--answer-cache-bytes 0` measure both). Writes to other streams leave a channel's answers in
//! place; a miss costs one insert.
//!
//! **What it holds.** Whole answers built inline, up to `ENTRY_BYTES_MAX` each; streamed ones
//! are never kept. An entry's body is the very `Bytes` the first answer sent, still charged to
//! the answer budget (`budget.rs`), so that budget keeps bounding every answer byte the server
//! holds, sent or kept. The cache's size is capped at a quarter of the budget, which leaves
//! reads room to build.

use super::conditional::LastModified;
use crate::channel::Selector;
use crate::event_id::EventId;
use crate::storage::Store;
use bytes::Bytes;
use hyper::header::HeaderValue;
use std::sync::Arc;

/// The largest answer kept: the inline part's size (`read.rs`), past which answers stream.
const ENTRY_BYTES_MAX: usize = 256 * 1024;
/// What an entry costs besides its body: its key, the `Answer`, the cache's own slot.
const ENTRY_OVERHEAD_BYTES: usize = 256;

/// A whole answer to a read, as sent: the body and what its headers are made of.
pub(super) struct Answer {
    pub body: Bytes,
    pub etag: HeaderValue,
    pub last_modified: Option<LastModified>,
    /// The answer can never change (`Cache-Control: immutable`).
    pub is_immutable: bool,
    /// The continuation (`Link: <...>; rel="next"`) of a read that `limit` cut.
    pub link: Option<HeaderValue>,
}

/// How long an answer holds (see the module docs).
#[derive(Clone)]
pub(super) enum Valid {
    Forever,
    /// While `Store::heads` of the selector still has this sum and the newest head is at or
    /// below the current watermark; or, without asking, while the watermark is `read_at`.
    WhileHeads {
        selector: Selector,
        sum: u128,
        read_at: EventId,
    },
    AtWatermark(EventId),
}

impl Valid {
    /// Whether an answer that held as `self` still holds at `watermark` (read before this).
    fn holds(&self, store: &Store, watermark: EventId) -> bool {
        match self {
            Valid::Forever => true,
            Valid::WhileHeads {
                selector,
                sum,
                read_at,
            } => {
                *read_at == watermark || {
                    let now = store.heads(selector);
                    now.sum == *sum && now.newest <= watermark
                }
            }
            Valid::AtWatermark(w) => *w == watermark,
        }
    }
}

#[derive(Clone)]
struct Entry {
    valid: Valid,
    answer: Arc<Answer>,
}

#[derive(Clone)]
struct Weight;

impl quick_cache::Weighter<String, Entry> for Weight {
    fn weight(&self, key: &String, entry: &Entry) -> u64 {
        (key.len() + entry.answer.body.len() + ENTRY_OVERHEAD_BYTES) as u64
    }
}

/// Answers by request (path and query), each valid at one watermark.
pub(in crate::server) struct AnswerCache {
    /// `None` when the cache is off (`--answer-cache-bytes 0`).
    entries: Option<quick_cache::sync::Cache<String, Entry, Weight>>,
}

impl AnswerCache {
    /// A cache of at most `bytes_max` bytes, or a quarter of `answer_budget_bytes` if that is
    /// less; none at all when that is 0.
    pub(in crate::server) fn new(bytes_max: usize, answer_budget_bytes: usize) -> AnswerCache {
        let bytes_max = bytes_max.min(answer_budget_bytes / 4);
        let entries = (bytes_max > 0).then(|| {
            // The item estimate only sizes the table up front; the weight is the bound.
            let estimated_items = (bytes_max / (16 * 1024)).clamp(16, 16_384);
            quick_cache::sync::Cache::with_weighter(estimated_items, bytes_max as u64, Weight)
        });
        AnswerCache { entries }
    }

    /// The answer to `request` if one is kept and still holds at `watermark`, which the caller
    /// read just before.
    pub(super) fn get(
        &self,
        request: &str,
        store: &Store,
        watermark: EventId,
    ) -> Option<Arc<Answer>> {
        let entry = self.entries.as_ref()?.get(request)?;
        entry.valid.holds(store, watermark).then_some(entry.answer)
    }

    /// Keeps `answer` for `request` while `valid` holds, unless it is too large to be worth it.
    pub(super) fn keep(&self, request: &str, valid: Valid, answer: &Arc<Answer>) {
        let Some(entries) = &self.entries else {
            return;
        };
        if answer.body.len() <= ENTRY_BYTES_MAX {
            let entry = Entry {
                valid,
                answer: Arc::clone(answer),
            };
            entries.insert(request.to_owned(), entry);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::ChannelPath;
    use crate::storage::StoreOptions;

    fn answer(body: &'static [u8]) -> Arc<Answer> {
        Arc::new(Answer {
            body: Bytes::from_static(body),
            etag: HeaderValue::from_static("\"0\""),
            last_modified: None,
            is_immutable: false,
            link: None,
        })
    }

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), StoreOptions::default()).expect("open");
        (dir, store)
    }

    fn append(store: &Store, path: &str) -> EventId {
        let path = ChannelPath::parse(path).expect("path");
        store.append(&path, b"x").expect("append")
    }

    #[test]
    fn an_entry_holds_at_its_watermark_only() {
        let (_dir, store) = store();
        let cache = AnswerCache::new(1 << 20, 1 << 30);
        let w = append(&store, "/a");
        cache.keep("/events/a?at=1", Valid::AtWatermark(w), &answer(b"1"));
        cache.keep("/events/a?until=1", Valid::Forever, &answer(b"2"));
        let body = |q, w| cache.get(q, &store, w).map(|a| a.body.clone());
        assert_eq!(body("/events/a?at=1", w), Some(Bytes::from_static(b"1")));
        assert_eq!(body("/events/a?at=2", w), None);
        let later = append(&store, "/b");
        assert_eq!(body("/events/a?at=1", later), None);
        assert_eq!(
            body("/events/a?until=1", later),
            Some(Bytes::from_static(b"2"))
        );
        // A newer read of the same request replaces the one that no longer holds.
        cache.keep("/events/a?at=1", Valid::AtWatermark(later), &answer(b"3"));
        assert_eq!(
            body("/events/a?at=1", later),
            Some(Bytes::from_static(b"3"))
        );
    }

    #[test]
    fn an_open_read_holds_while_its_streams_publish_nothing() {
        let (_dir, store) = store();
        let cache = AnswerCache::new(1 << 20, 1 << 30);
        append(&store, "/a/x");
        let w = append(&store, "/b");
        let keep = |q: &str, selector: &str| {
            let selector = Selector::parse(selector).expect("selector");
            let sum = store.heads(&selector).sum;
            // Read at no watermark that comes up below: the heads decide.
            let read_at = EventId(u64::MAX);
            let valid = Valid::WhileHeads {
                selector,
                sum,
                read_at,
            };
            cache.keep(q, valid, &answer(b"kept"));
        };
        keep("/events/a/x?n=1", "/a/x");
        keep("/events/a/*?n=1", "/a/*");
        keep("/events/c?n=1", "/c");
        let holds = |q, w| cache.get(q, &store, w).is_some();
        assert!(holds("/events/a/x?n=1", w) && holds("/events/a/*?n=1", w));
        // Another stream publishes: still the same events.
        let w = append(&store, "/b");
        assert!(holds("/events/a/x?n=1", w) && holds("/events/a/*?n=1", w));
        assert!(holds("/events/c?n=1", w));
        // The channel's own stream publishes, on another channel: read again.
        let w = append(&store, "/a/y");
        assert!(!holds("/events/a/x?n=1", w) && !holds("/events/a/*?n=1", w));
        // A stream that did not exist when the answer was read.
        let w = append(&store, "/c");
        assert!(!holds("/events/c?n=1", w));
        // Heads past the watermark read before them: an answer to that watermark lacked some.
        let w = append(&store, "/a/z");
        keep("/events/a/x?n=2", "/a/x");
        assert!(!holds("/events/a/x?n=2", EventId(w.0 - 1)));
        assert!(holds("/events/a/x?n=2", w));
    }

    #[test]
    fn off_keeps_nothing_and_large_answers_are_not_kept() {
        let (_dir, store) = store();
        for off in [AnswerCache::new(0, 1 << 30), AnswerCache::new(1 << 20, 3)] {
            off.keep("/events/a", Valid::Forever, &answer(b"x"));
            assert!(off.get("/events/a", &store, EventId(1)).is_none());
        }
        let cache = AnswerCache::new(4 << 20, 1 << 30);
        let large: &'static [u8] = Box::leak(vec![b'x'; ENTRY_BYTES_MAX + 1].into_boxed_slice());
        cache.keep("/events/a", Valid::Forever, &answer(large));
        assert!(cache.get("/events/a", &store, EventId(1)).is_none());
    }

    #[test]
    fn the_cache_stays_within_its_bytes() {
        let bytes_max = 64 * 1024;
        let cache = AnswerCache::new(bytes_max, 1 << 30);
        let body: &'static [u8] = Box::leak(vec![b'x'; 1000].into_boxed_slice());
        for i in 0..1000 {
            cache.keep(&format!("/events/a?n={i}"), Valid::Forever, &answer(body));
        }
        let entries = cache.entries.as_ref().map_or(0, |c| c.len());
        assert!(
            entries > 0 && entries * 1000 <= bytes_max,
            "{entries} entries"
        );
    }
}
