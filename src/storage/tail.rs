//! The live tail of a selector: the events after a cursor, as they are committed.
//!
//! A `Tail` reads everything committed after its cursor, up to the store's **commit watermark**
//! and no further (see `commit.rs`): a stream written in parallel may already hold a larger id
//! than the watermark while a smaller id of another stream is still being written, and a tail
//! that spans streams must never deliver the larger before the smaller. Reading only up to the
//! watermark makes the ids a tail delivers strictly increasing, with no gap: a consumer that
//! resumes from the last id it saw misses nothing.
//!
//! Waiting works for threads (`wait`) and async tasks (`listen`, a `Future`), so the engine
//! needs no runtime.

use super::read::{Event, Query};
use super::store::Store;
use super::Result;
use crate::channel::Selector;
use crate::event_id::EventId;
use std::ops::Bound;
use std::time::Duration;

pub struct Tail {
    store: Store,
    selector: Selector,
    cursor: EventId,
}

impl Tail {
    /// A tail of `selector` that starts after `after` (use `store.committed()` for "from now").
    pub fn new(store: Store, selector: Selector, after: EventId) -> Tail {
        Tail {
            store,
            selector,
            cursor: after,
        }
    }

    /// The id of the last event handed out (or the starting point).
    pub fn cursor(&self) -> EventId {
        self.cursor
    }

    /// Hands the committed events after the cursor, at most `max`, to `deliver` in id order, and
    /// moves the cursor past them. Returns how many were delivered. When nothing is selected the
    /// cursor still moves to the watermark, so the next call starts there.
    pub fn poll(&mut self, max: usize, mut deliver: impl FnMut(Event<'_>)) -> Result<usize> {
        let watermark = self.store.committed();
        if watermark <= self.cursor {
            return Ok(0);
        }
        let reader = self.store.reader(&self.selector);
        let query = Query {
            start: Bound::Excluded(self.cursor),
            end: Bound::Included(watermark),
            limit: Some(max),
            ..Query::all()
        };
        let mut delivered = 0;
        for event in reader.events(&query) {
            let event = event?;
            self.cursor = event.id;
            deliver(event);
            delivered += 1;
        }
        if delivered < max {
            self.cursor = watermark;
        }
        Ok(delivered)
    }

    /// Blocks until something is committed after the cursor, or `timeout`.
    pub fn wait(&self, timeout: Duration) {
        self.store.wait_beyond(self.cursor, timeout);
    }

    /// Whether events after the cursor may be ready (the watermark moved past it).
    pub fn is_ready(&self) -> bool {
        self.store.committed() > self.cursor
    }

    /// Fires at the next commit. Create it, check `is_ready`, then await it, so no commit is
    /// missed between the check and the wait.
    pub fn listen(&self) -> event_listener::EventListener {
        self.store.listen_commits()
    }
}
