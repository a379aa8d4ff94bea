//! Answers kept for as long as they stay true, so that a read asked again is a lookup.
//!
//! **Why an answer can be kept.** A log read is planned against the commit watermark and never
//! reads past it (`read.rs`). What it answers is therefore a function of the request (path and
//! query) and of the events at or below that watermark, and those never change in a running
//! server: the log is only appended to, new events get larger ids than any committed one, and
//! nothing removes events. Its headers follow too: the `ETag` hashes the request and the
//! watermark, `Last-Modified` is the last event's second, `Cache-Control` compares the range's
//! end with the watermark. So an answer read at watermark W, asked for again while the watermark
//! is still W, is byte for byte what a new read would build. An entry is used only then; once any
//! commit moves the watermark, every entry is stale, and the next read of its request replaces
//! it. (Removing events, if the server ever does, must clear the cache.)
//!
//! **What it is for.** Many clients asking for the same recent events between writes: a page
//! that loads a room's last 100 lines, dashboards that poll. Each such read costs one hash lookup
//! instead of walking, checking and formatting the events again (`ivy-bench history` and
//! `--answer-cache-bytes 0` measure both). Under steady writes it rarely hits, and a miss costs
//! one insert.
//!
//! **What it holds.** Whole answers built inline, up to `ENTRY_BYTES_MAX` each; streamed ones
//! are never kept. An entry's body is the very `Bytes` the first answer sent, still charged to
//! the answer budget (`budget.rs`), so that budget keeps bounding every answer byte the server
//! holds, sent or kept. The cache's size is capped at a quarter of the budget, which leaves
//! reads room to build.

use crate::event_id::EventId;
use bytes::Bytes;
use hyper::header::HeaderValue;
use std::sync::Arc;
use std::time::SystemTime;

/// The largest answer kept: the inline part's size (`read.rs`), past which answers stream.
const ENTRY_BYTES_MAX: usize = 256 * 1024;
/// What an entry costs besides its body: its key, the `Answer`, the cache's own slot.
const ENTRY_OVERHEAD_BYTES: usize = 256;

/// A whole answer to a read, as sent: the body and what its headers are made of.
pub(super) struct Answer {
    pub body: Bytes,
    pub etag: String,
    /// `etag` as a header, made once for every time the answer is sent.
    pub etag_header: Option<HeaderValue>,
    pub last_modified: Option<SystemTime>,
    /// `last_modified` as an HTTP date header, likewise.
    pub last_modified_header: Option<HeaderValue>,
    /// The answer can never change (`Cache-Control: immutable`).
    pub is_immutable: bool,
    /// The continuation (`Link: <...>; rel="next"`) of a read that `limit` cut.
    pub link: Option<HeaderValue>,
}

#[derive(Clone)]
struct Entry {
    watermark: EventId,
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

    /// The answer to `request` if one was kept at this very watermark.
    pub(super) fn get(&self, request: &str, watermark: EventId) -> Option<Arc<Answer>> {
        let entry = self.entries.as_ref()?.get(request)?;
        (entry.watermark == watermark).then_some(entry.answer)
    }

    /// Keeps `answer`, read at `watermark`, for `request`, unless it is too large to be worth it.
    pub(super) fn keep(&self, request: &str, watermark: EventId, answer: &Arc<Answer>) {
        let Some(entries) = &self.entries else {
            return;
        };
        if answer.body.len() <= ENTRY_BYTES_MAX {
            let entry = Entry {
                watermark,
                answer: Arc::clone(answer),
            };
            entries.insert(request.to_owned(), entry);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(body: &'static [u8]) -> Arc<Answer> {
        Arc::new(Answer {
            body: Bytes::from_static(body),
            etag: "\"0\"".into(),
            etag_header: None,
            last_modified: None,
            last_modified_header: None,
            is_immutable: false,
            link: None,
        })
    }

    #[test]
    fn an_entry_answers_only_at_the_watermark_it_was_read_at() {
        let cache = AnswerCache::new(1 << 20, 1 << 30);
        cache.keep("/events/a?n=1", EventId(5), &answer(b"@5:/a x\n"));
        let hit = cache.get("/events/a?n=1", EventId(5));
        assert_eq!(
            hit.map(|a| a.body.clone()),
            Some(Bytes::from_static(b"@5:/a x\n"))
        );
        assert!(cache.get("/events/a?n=1", EventId(6)).is_none());
        assert!(cache.get("/events/a?n=2", EventId(5)).is_none());
        // A newer read of the same request replaces the stale one.
        cache.keep("/events/a?n=1", EventId(6), &answer(b"@6:/a y\n"));
        assert!(cache.get("/events/a?n=1", EventId(5)).is_none());
        assert!(cache.get("/events/a?n=1", EventId(6)).is_some());
    }

    #[test]
    fn off_keeps_nothing_and_large_answers_are_not_kept() {
        for off in [AnswerCache::new(0, 1 << 30), AnswerCache::new(1 << 20, 3)] {
            off.keep("/events/a", EventId(1), &answer(b"x"));
            assert!(off.get("/events/a", EventId(1)).is_none());
        }
        let cache = AnswerCache::new(4 << 20, 1 << 30);
        let large: &'static [u8] = Box::leak(vec![b'x'; ENTRY_BYTES_MAX + 1].into_boxed_slice());
        cache.keep("/events/a", EventId(1), &answer(large));
        assert!(cache.get("/events/a", EventId(1)).is_none());
    }

    #[test]
    fn the_cache_stays_within_its_bytes() {
        let bytes_max = 64 * 1024;
        let cache = AnswerCache::new(bytes_max, 1 << 30);
        let body: &'static [u8] = Box::leak(vec![b'x'; 1000].into_boxed_slice());
        for i in 0..1000 {
            cache.keep(&format!("/events/a?n={i}"), EventId(1), &answer(body));
        }
        let entries = cache.entries.as_ref().map_or(0, |c| c.len());
        assert!(
            entries > 0 && entries * 1000 <= bytes_max,
            "{entries} entries"
        );
    }
}
