//! The ivy1 text forms, pure: no I/O, no storage, no clock.
pub mod line;
