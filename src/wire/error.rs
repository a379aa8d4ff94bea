//! `wire::ParseError`: why client input was refused. The text is the short reason a client
//! sees (`#KEY#!REASON`, the close frame's reason, or the body of a 400).

use crate::channel::PathError;
use crate::event_id::ParseIdError;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("empty command")]
    Empty,
    #[error("unknown command")]
    UnknownCommand,
    #[error("unterminated #key#")]
    UnterminatedKey,
    #[error("publish needs :path:data")]
    MissingData,
    #[error("@ takes no argument")]
    TrailingTime,
    #[error("{0}")]
    Path(PathError),
    #[error("invalid timestamp: {0}")]
    Timestamp(ParseIdError),
    #[error("invalid line count")]
    LineCount,
    #[error("invalid limit")]
    Limit,
    #[error("{0}")]
    Conflict(&'static str),
    #[error("duplicate parameter {0}")]
    Duplicate(&'static str),
    #[error("%-escapes are not allowed in a channel path")]
    EscapedPath,
    #[error("missing form field {0}")]
    MissingField(&'static str),
    #[error("duplicate form field {0}")]
    DuplicateField(&'static str),
    #[error("bad multipart body: {0}")]
    Multipart(String),
}
