//! The tables that turn failures into answers: HTTP statuses for store failures, WebSocket
//! close codes and reasons for frame errors and bad commands.

use crate::storage;
use hyper::StatusCode;

/// The status and one-line reason for a store failure on publish: a full disk is 507, any
/// other refusal to write 503; both say why.
pub fn store_failure(e: &storage::Error) -> (StatusCode, String) {
    match e {
        storage::Error::TooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, e.to_string()),
        storage::Error::WriteFailed(f) if f.no_space => {
            (StatusCode::INSUFFICIENT_STORAGE, store_failure_reason(e))
        }
        _ => (StatusCode::SERVICE_UNAVAILABLE, store_failure_reason(e)),
    }
}

/// The one-line reason for a refused publish, the same over HTTP and in `#KEY#!REASON`: a
/// write failure already reads "not written: ...", anything else gets "not stored: ".
pub fn store_failure_reason(e: &storage::Error) -> String {
    match e {
        storage::Error::WriteFailed(_) => e.to_string(),
        _ => format!("not stored: {e}"),
    }
}

/// The close code and reason for an unkeyed publish the store refused (no key to answer on):
/// 1013 "try again later" while the refusal is temporary, else 1011.
pub fn close_for_store_failure(e: &storage::Error) -> (u16, &'static str) {
    match e {
        storage::Error::WriteFailed(f) if !f.until_restart => (1013, "not stored; try again later"),
        _ => (1011, "the store refused the event"),
    }
}

/// The close code and reason for a frame the reader could not accept. A peer that went away
/// gets a plain 1000 (nobody reads it).
pub fn close_for_frame_error(e: &fastwebsockets::WebSocketError) -> (u16, &'static str) {
    use fastwebsockets::WebSocketError as E;
    match e {
        E::FrameTooLarge => (1009, "message too large"),
        E::InvalidUTF8 => (1007, "invalid UTF-8"),
        E::IoError(io)
            if io
                .get_ref()
                .is_some_and(|inner| inner.is::<crate::wire::mask::Unmasked>()) =>
        {
            (1002, "unmasked client frame")
        }
        E::UnexpectedEOF | E::IoError(_) | E::ConnectionClosed => (1000, ""),
        _ => (1002, "protocol error"),
    }
}

/// The reason of a 1008 close for an unkeyed bad command (a close reason is at most 123
/// bytes, so it is a fixed short text, not the full parse error).
pub fn close_reason(error: &crate::wire::ParseError) -> &'static str {
    use crate::wire::ParseError as P;
    match error {
        P::Empty => "empty command",
        P::UnknownCommand => "unknown command",
        P::UnterminatedKey => "unterminated #key#",
        P::MissingData => "publish needs :path:data",
        P::TrailingTime => "@ takes no argument",
        P::Path(_) => "invalid path",
        P::Timestamp(_) => "invalid timestamp",
        _ => "bad command",
    }
}
