//! Time sources. The only module that reads the system clock.
//!
//! Storage takes an `Arc<dyn Clock>` so that tests can make time stand still or step back and
//! check the "+1 ns" rule for ids (protocol page, "Timestamps are event ids"). Turning readings
//! into strictly increasing ids is `IdClock`'s job.

use crate::event_id::EventId;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// A source of wall-clock readings in nanoseconds since the Unix epoch.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> EventId;
}

/// The operating system's real-time clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> EventId {
        // A clock before 1970 or past 2554 reads as the nearest end; ids stay increasing anyway.
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        EventId(nanos)
    }
}

/// A clock that reads whatever a test sets.
#[derive(Debug, Default)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    pub fn new(start: EventId) -> ManualClock {
        ManualClock(AtomicU64::new(start.0))
    }

    pub fn set(&self, to: EventId) {
        self.0.store(to.0, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> EventId {
        EventId(self.0.load(Ordering::SeqCst))
    }
}

/// Hands out strictly increasing ids: the clock's reading, or the last id plus 1 ns when the
/// clock stands still or has stepped back. Not synchronised: its owner serialises calls.
#[derive(Debug, Clone, Copy, Default)]
pub struct IdClock {
    last: EventId,
}

impl IdClock {
    pub fn starting_after(last: EventId) -> IdClock {
        IdClock { last }
    }

    pub fn last(&self) -> EventId {
        self.last
    }

    /// The next id given a clock reading. Returns `None` only when `u64` ids are exhausted.
    pub fn next(&mut self, now: EventId) -> Option<EventId> {
        let id = if now > self.last {
            now
        } else {
            EventId(self.last.0.checked_add(1)?)
        };
        self.last = id;
        Some(id)
    }

    /// Accepts an id chosen by the caller (import); it must be above every id handed out.
    pub fn take(&mut self, id: EventId) -> bool {
        if id > self.last {
            self.last = id;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_increase_when_clock_stalls_or_steps_back() {
        let mut ids = IdClock::starting_after(EventId(100));
        assert_eq!(ids.next(EventId(50)), Some(EventId(101)));
        assert_eq!(ids.next(EventId(101)), Some(EventId(102)));
        assert_eq!(ids.next(EventId(500)), Some(EventId(500)));
        assert_eq!(ids.next(EventId(400)), Some(EventId(501)));
        assert!(!ids.take(EventId(501)));
        assert!(ids.take(EventId(502)));
        let mut full = IdClock::starting_after(EventId::MAX);
        assert_eq!(full.next(EventId(1)), None);
    }
}
