//! `storage::Error`: every failure of the engine, with the file and byte offset wherever a file
//! is involved, so that an operator (or `ivy verify`) can point at the exact bytes.

use std::io;
use std::path::PathBuf;

/// What is wrong with bytes read from disk.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Corruption {
    #[error("bad magic number")]
    BadMagic,
    #[error("unsupported format version {0} (this build reads version 1)")]
    UnsupportedVersion(u32),
    #[error("header checksum mismatch")]
    HeaderCrc,
    #[error("header field {0} is invalid")]
    BadHeader(&'static str),
    #[error("record runs past the end of the file")]
    Truncated,
    #[error("record length {0} is invalid")]
    BadLength(u32),
    #[error("record checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Crc { stored: u32, computed: u32 },
    #[error("unknown record kind {0}")]
    UnknownKind(u8),
    #[error("record holds an invalid channel path")]
    BadPath,
    #[error("id {id} is not above the previous id {previous}")]
    IdNotIncreasing { id: u64, previous: u64 },
    #[error("channel chain link {0} does not point at an earlier record of the same channel")]
    BadChainLink(u64),
    #[error("seal footer is invalid: {0}")]
    BadFooter(&'static str),
    #[error("segment is not sealed but a later segment exists")]
    NotSealed,
    #[error("index entry {entry} is wrong: {what}")]
    BadIndexEntry { entry: u64, what: &'static str },
    #[error("file name does not match its first id")]
    NameMismatch,
    #[error("zero bytes where a record was expected")]
    Zeroes,
    #[error("bytes after the last valid record ({0} bytes)")]
    TrailingBytes(u64),
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {op}: {source}", .path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{}, byte {offset}: {kind}", .path.display())]
    Corrupt {
        path: PathBuf,
        offset: u64,
        kind: Corruption,
    },
    #[error("{}: fsync failed: {source}", .path.display())]
    SyncFailed {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The append was refused or undone because a write failed (see `commit.rs`).
    #[error("{0}")]
    WriteFailed(WriteFailure),
    #[error("{}: segment is not open for writing", .0.display())]
    NotWritable(PathBuf),
    #[error("{}: the data directory is in use by another process (lock held)", .0.display())]
    Locked(PathBuf),
    #[error("{}: not an ivy data directory: {why}", .path.display())]
    NotAStore { path: PathBuf, why: String },
    #[error("the store is closed")]
    Closed,
    #[error("event data is {len} bytes, over the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("id {id} is not above the store's last id {last}")]
    IdNotAbove { id: u64, last: u64 },
    #[error("event ids are exhausted")]
    IdsExhausted,
    /// A new store was asked for a stream depth outside 1..=32; nothing was created.
    #[error("stream depth {0} is not 1..=32")]
    BadStreamDepth(usize),
    /// The append would start a stream past `StoreOptions::streams_max`; nothing was stored.
    #[error("the store holds {max} streams, its limit, and this channel would start another")]
    TooManyStreams { max: usize },
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, op: &'static str, source: io::Error) -> Error {
        Error::Io {
            path: path.into(),
            op,
            source,
        }
    }

    pub(crate) fn corrupt(path: impl Into<PathBuf>, offset: u64, kind: Corruption) -> Error {
        Error::Corrupt {
            path: path.into(),
            offset,
            kind,
        }
    }
}

/// Why appends fail after a write failed. Every append the failure refused or undid gets a copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteFailure {
    /// The failed operation, with its file and the operating system's reason.
    pub reason: String,
    /// The disk (or quota) is full: HTTP answers 507 rather than 503.
    pub no_space: bool,
    /// The store could not undo the failed write; it takes appends again only after a restart.
    pub until_restart: bool,
}

impl WriteFailure {
    pub(crate) fn from_error(e: &Error) -> WriteFailure {
        if let Error::WriteFailed(f) = e {
            return f.clone();
        }
        let no_space = std::error::Error::source(e)
            .and_then(|s| s.downcast_ref::<io::Error>())
            .is_some_and(|io| {
                matches!(
                    io.kind(),
                    io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
                )
            });
        WriteFailure {
            reason: e.to_string(),
            no_space,
            until_restart: false,
        }
    }
}

impl std::fmt::Display for WriteFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "not written: {}", self.reason)?;
        if self.until_restart {
            f.write_str("; the store takes no writes until restart")
        } else {
            f.write_str("; writes resume by themselves once the cause is gone")
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
