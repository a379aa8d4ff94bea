//! The one table that maps failures to HTTP statuses (the WebSocket close codes are chosen in
//! `ws.rs`, next to the frames they answer).

use crate::storage;
use hyper::StatusCode;

/// The status and one-line reason for a store failure on publish: a full disk is 507, any
/// other refusal to write 503; both say why.
pub fn store_failure(e: &storage::Error) -> (StatusCode, String) {
    let is_full = std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<std::io::Error>())
        .is_some_and(|io| io.raw_os_error() == Some(28));
    match e {
        storage::Error::TooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, e.to_string()),
        _ if is_full => (StatusCode::INSUFFICIENT_STORAGE, format!("not stored: {e}")),
        _ => (StatusCode::SERVICE_UNAVAILABLE, format!("not stored: {e}")),
    }
}
