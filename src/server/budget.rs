//! Byte budgets shared by all connections: a semaphore whose permits are bytes (`Budget`), and
//! the bytes one holder has taken (`Charge`, given back when dropped). The server has three:
//! - POST bodies being received (`ServerOptions::body_bytes_in_flight_max`): a body waits, unread,
//!   for its share, in arrival order (`http/publish.rs`);
//! - HTTP answers built and not yet written (`ServerOptions::answer_bytes_total_max`): a read
//!   waits for its share before it builds anything, and each piece of its answer carries its
//!   charge (`Charge::attach`) until hyper has written it and drops it (`http/read.rs`, `http/streamed.rs`);
//! - event bytes held for WebSocket subscribers (`ServerOptions::queue_bytes_total_max`), below.
//!
//! **Subscribers.** Each connection's queue is bounded (`queue_bytes_max`), but that bounds one connection, not
//! the server: a thousand subscribers that read slowly hold a thousand full queues, plus what
//! each writer took and is still writing, plus each catch-up batch. (Measured before this bound,
//! `ivy-bench fanout --slow-fraction 1.0`, 1,000 subscribers of 100 B events: 653 MB of anonymous
//! memory at the peak.)
//!
//! So every such byte is charged to one budget, from the moment fan-out queues a frame until it
//! has been written to the socket:
//! - fan-out charges a frame when it queues it (`Budget::try_take`, never waiting); when the
//!   budget has no room, the session's queue counts as full, and the session lags and reads the
//!   log instead, as for its own queue's bound;
//! - the writer carries what it took from the queue (`Charge`) until its write is done;
//! - a catch-up read first waits for its batch's share (`Budget::take`), a quarter of the budget
//!   at most. Shares go to waiting readers before fan-out may queue again, so under pressure
//!   every subscriber degrades to reading the log in bounded batches, and none is starved for
//!   good;
//! - a writer whose peer takes nothing for a second keeps only the frame it is in the middle of and
//!   gives the rest back to the log, to be read again (`writer.rs`, `give_back`): subscribers that
//!   stopped reading do not sit on the budget that the reading ones need.
//!
//! A frame is charged its length plus `ENTRY_BYTES`, the queue entry that holds it: with small
//! events the entries weigh as much as the frames. Frames are shared between subscribers, so the
//! charge is an upper bound of what the frames themselves take.

use std::sync::Arc;
use tokio::sync::Semaphore;

/// What one queued frame costs besides its bytes: its entry in a session's queue.
pub const ENTRY_BYTES: usize = std::mem::size_of::<(crate::event_id::EventId, bytes::Bytes)>();

/// The budget: a semaphore whose permits are bytes.
pub struct Budget {
    bytes: Semaphore,
    max: usize,
}

impl Budget {
    pub fn new(max: usize) -> Budget {
        // Shares are taken as `u32`; one larger than that is clamped (no share is near it).
        let max = max.clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize));
        Budget {
            bytes: Semaphore::new(max),
            max,
        }
    }

    /// Takes `n` bytes if there is room now, never waiting.
    pub fn try_take(&self, n: usize) -> bool {
        let Ok(n) = u32::try_from(n) else {
            return false;
        };
        match self.bytes.try_acquire_many(n) {
            Ok(permit) => {
                permit.forget();
                true
            }
            Err(_) => false,
        }
    }

    /// Waits for `n` bytes (at most the whole budget: a share larger than it is cut to it), in
    /// arrival order among waiters, and returns them as a charge.
    pub async fn take(self: &Arc<Budget>, n: usize) -> Charge {
        let n = n.min(self.max);
        let share = u32::try_from(n).unwrap_or(u32::MAX);
        match self.bytes.acquire_many(share).await {
            Ok(permit) => permit.forget(),
            // The semaphore is never closed; were it, there would be nothing to give back.
            Err(_) => return Charge::new(self, 0),
        }
        Charge::new(self, share as usize)
    }

    pub fn give_back(&self, n: usize) {
        if n > 0 {
            self.bytes.add_permits(n);
        }
    }

    /// The whole budget.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Bytes charged now (for `/metrics`).
    pub fn held(&self) -> usize {
        self.max.saturating_sub(self.bytes.available_permits())
    }
}

/// Bytes taken from the budget, given back when dropped: a writer's taken frames until written,
/// a catch-up batch until sent (or the connection ends).
pub struct Charge {
    budget: Arc<Budget>,
    bytes: usize,
}

impl Charge {
    /// A charge of `bytes` already taken from `budget`.
    pub fn new(budget: &Arc<Budget>, bytes: usize) -> Charge {
        Charge {
            budget: Arc::clone(budget),
            bytes,
        }
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Makes this charge `n` bytes, or the whole budget if `n` is more: gives back what it holds
    /// beyond that at once, or waits (in arrival order) for the rest. For a buffer that was
    /// charged before it was built, once its size is known.
    pub async fn resize(&mut self, n: usize) {
        let n = n.min(self.budget.max);
        if n > self.bytes {
            let mut more = self.budget.take(n - self.bytes).await;
            self.bytes += std::mem::take(&mut more.bytes);
        } else {
            self.budget.give_back(self.bytes - n);
            self.bytes = n;
        }
    }

    /// `bytes` as a `Bytes` that carries this charge, given back when the last clone of it (or
    /// of a slice of it) is dropped: for an HTTP answer, once hyper has written it.
    pub fn attach(self, bytes: Vec<u8>) -> bytes::Bytes {
        bytes::Bytes::from_owner(Charged {
            bytes,
            _charge: self,
        })
    }
}

/// The owner behind `Charge::attach`.
struct Charged {
    bytes: Vec<u8>,
    _charge: Charge,
}

impl AsRef<[u8]> for Charged {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.budget.give_back(self.bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waiting_shares_go_before_fan_out_and_charges_come_back_when_dropped() {
        let budget = Arc::new(Budget::new(1000));
        assert!(budget.try_take(600));
        assert!(!budget.try_take(500), "past the budget");
        let queued = Charge::new(&budget, 600);
        // A catch-up read waits for 700 while only 400 are free.
        let waiting = tokio::spawn({
            let budget = Arc::clone(&budget);
            async move { budget.take(700).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        // The 400 free ones go to the waiter as they come back; fan-out gets none meanwhile.
        assert!(!budget.try_take(1));
        drop(queued);
        let share = waiting.await.unwrap();
        assert_eq!(budget.held(), 700);
        assert!(budget.try_take(300) && !budget.try_take(1));
        budget.give_back(300);
        drop(share);
        assert_eq!(budget.held(), 0);
        // A share larger than the whole budget is cut to it, so it can be had at all.
        let all = budget.take(5000).await;
        assert_eq!(budget.held(), 1000);
        drop(all);
        assert_eq!(budget.held(), 0);
    }

    #[tokio::test]
    async fn charges_resize_and_attached_bytes_hold_theirs_until_the_last_slice_is_dropped() {
        let budget = Arc::new(Budget::new(1000));
        let mut charge = budget.take(600).await;
        charge.resize(100).await;
        assert_eq!((charge.bytes(), budget.held()), (100, 100));
        charge.resize(150).await;
        assert_eq!((charge.bytes(), budget.held()), (150, 150));
        let bytes = charge.attach(b"hello world".to_vec());
        let part = bytes.slice(6..);
        drop(bytes);
        assert_eq!(budget.held(), 150, "a slice keeps the whole charge");
        assert_eq!(&part[..], b"world");
        drop(part);
        assert_eq!(budget.held(), 0);
    }
}
