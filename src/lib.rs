//! Ivy: a hierarchical pub/sub server whose every event is kept in a persistent log.
#![deny(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod channel;
pub mod clock;
pub mod event_id;
pub mod storage;
pub mod wire;
