//! The ivy1 text forms, pure: no I/O, no storage, no clock. Bytes go in, values or bytes come
//! out, so every function here can be fuzzed.
//!
//! - `command.rs`: a client's WebSocket message into a `Message`.
//! - `line.rs`: event lines `@TS:/path:DATA` with the protocol's escaping, and their parser.
//! - `encode.rs`: the server's other lines: acks, errors, the session intro.
//! - `form.rs`: a POST body (urlencoded or multipart form, or raw) into data and sid.
//! - `query.rs`: HTTP log query parameters into a `ReadRequest`.
//! - `mask.rs`: the mask bit of a client's WebSocket frames, checked as the bytes arrive.
//! - `error.rs`: `ParseError`, whose texts are the reasons clients see.
pub mod command;
pub mod encode;
pub mod error;
pub mod form;
pub mod line;
pub mod mask;
pub mod query;

pub use error::ParseError;
