//! The crate's unsafe maps (its one other `unsafe`, in `io.rs`, is a syscall without pointers):
//! read-only memory maps of segment and index files.
//!
//! # Contract
//! Every `// SAFETY:` comment in this file relies on these clauses:
//! 1. The process that maps a file holds the data directory's lock (`DIR/LOCK`): exclusive for
//!    the store that writes, shared for the offline tools that only read. So while a map lives, no
//!    other Ivy process writes to or truncates the file.
//! 2. A mapped file is never truncated or rewritten in place. Recovery and `verify --repair` cut
//!    torn tails *before* the file is mapped by the store (they drop their own scanning map first).
//!    The one exception is the rollback of a failed write (`rollback.rs`), which cuts a live
//!    segment back to its committed end: nothing below that end changes, and by clause 3 no
//!    slice reaches past it.
//!    Index files are replaced by rename, never rewritten, and a map outlives an unlink or rename.
//!    Retention (later) unlinks whole sealed segments, never truncates them.
//! 3. A slice is only formed over bytes that will not change again: all of a sealed segment, or
//!    `[0, committed_end)` of the active one, where `committed_end` is published by the writer
//!    only after those bytes were written (see `stream.rs`). A map may be longer than its file
//!    (the active segment is mapped once at its maximum size); bytes past the end of the file are
//!    never touched, since that would be SIGBUS, not an error.
//! 4. Mapped bytes are still untrusted input: they go through `record::decode` or the index
//!    decoder (bounds and CRC) and are never transmuted into structs.
//!
//! Someone outside Ivy truncating or rewriting the files while they are mapped breaks clause 1;
//! then a read may fault (SIGBUS). That risk is accepted, as ripgrep accepts it for its maps.
#![allow(unsafe_code)]

use memmap2::{Mmap, MmapOptions};
use std::fs::File;
use std::io;

/// A read-only map of `len` bytes of a file (possibly more than the file holds now).
pub struct Map {
    map: Option<Mmap>,
}

impl Map {
    /// Maps the whole file as it is now.
    pub fn whole(file: &File) -> io::Result<Map> {
        let len = file.metadata()?.len();
        let len = usize::try_from(len)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "file too large to map"))?;
        Map::with_len(file, len)
    }

    /// Maps `len` bytes from the start of the file; the file may be shorter and grow later.
    pub fn with_len(file: &File, len: usize) -> io::Result<Map> {
        if len == 0 {
            return Ok(Map { map: None });
        }
        // SAFETY: clauses 1 and 2: we hold the directory lock and the file is never truncated
        // while this map lives. Slices are only formed by `bytes` below, over `[0, end)` where
        // the caller guarantees `end` bytes are in the file and final (clause 3); the bytes are
        // decoded with bounds and CRC checks (clause 4).
        let map = unsafe { MmapOptions::new().len(len).map(file)? };
        Ok(Map { map: Some(map) })
    }

    /// The first `end` bytes. The caller promises they exist in the file and are final
    /// (contract clause 3); `end` past the mapping is clamped, never a fault.
    pub fn bytes(&self, end: usize) -> &[u8] {
        match &self.map {
            Some(m) => &m[..end.min(m.len())],
            None => &[],
        }
    }

    pub fn len(&self) -> usize {
        self.map.as_ref().map_or(0, |m| m.len())
    }
}
