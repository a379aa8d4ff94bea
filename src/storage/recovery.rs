//! Opening a stream: list its segments and recover its tail.
//!
//! Only the last segment of a stream is read at open; the others are sealed, immutable, and
//! checked lazily when first read. The last one is either sealed (the process stopped right
//! after a roll) or live. A live tail is scanned record by record; the first record that does not
//! decode ends the valid data. What follows is classified:
//! - a **torn tail** (a partial record, zeroes, or garbage with no valid record after it): cut
//!   off, and the cut is logged with file, offset and byte count;
//! - **corruption in the middle** (a damaged record followed by a valid one, or ids that do not
//!   increase): refused with an error naming file and offset. Nothing is cut;
//! - **free space**: zeroes from there to the end of the file: the rest of a segment made from a
//!   zero-filled spare (`spare.rs`), or the zeroes the writer keeps ahead of any other live
//!   segment's records (`Segment::zero_ahead`). Kept: the writer goes on writing over it.
//!
//! A last segment that ends in a valid trailer is sealed only if that trailer's seal record
//! decodes and ends at the trailer, and its records, walked from the header, lead to that seal
//! record (`is_written_seal`): an event's data may end with
//! bytes that look like a seal and a trailer, and in a segment with no zeroes after its records
//! the last event's data is the end of the file.
//!
//! A last segment whose header does not decode is **torn at creation** when nothing but zeroes
//! follows the header's place (a file shorter than a header, or a spare renamed into place whose
//! header never reached the disk): it holds no event and is removed.
//!
//! The scan reads the segment once, through the map the store keeps, and registers each valid
//! record as it goes. When a torn tail must be cut, that map (and everything holding it) is
//! dropped first, the file is truncated, and the segment is mapped and registered again (mmap
//! contract, clause 2); that second pass happens only after a crash.

use super::error::{Corruption, Error, Result};
use super::layout;
use super::record::{self, KIND_SEAL};
use super::segment::Segment;
use super::stream::{LiveSegment, StreamState};
use super::StoreOptions;
use crate::event_id::EventId;
use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// The store that writes: torn tails are cut.
    ReadWrite,
    /// Offline readers: nothing is changed; a torn tail is left alone and not read.
    ReadOnly,
}

/// What scanning a live tail found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TailScan {
    /// End of the valid records.
    pub valid_end: u64,
    pub file_len: u64,
    pub events: u64,
    pub last_id: Option<u64>,
    /// Everything from `valid_end` to the end of the file is zero: free space, not a torn tail.
    pub is_free_after: bool,
}

impl TailScan {
    /// Whether bytes after the valid records must be cut (a torn tail).
    pub fn is_torn(&self) -> bool {
        self.valid_end < self.file_len && !self.is_free_after
    }
}

/// Whether `bytes` are all zero: the free space of a segment made from a spare. Folded a page
/// at a time so that the compiler vectorises it: a spare is a whole segment long.
pub(crate) fn is_zeroes(bytes: &[u8]) -> bool {
    bytes
        .chunks(4096)
        .all(|page| page.iter().fold(0u8, |acc, b| acc | b) == 0)
}

/// Whether a segment whose header does not decode is torn at creation (it holds no event): no
/// more than a header's length, or nothing but zeroes after it (a spare renamed into place whose
/// header never reached the disk). Recovery and verify share this rule.
pub(crate) fn is_torn_at_creation(bytes: &[u8]) -> bool {
    bytes
        .get(record::SEGMENT_HEADER_LEN..)
        .is_none_or(is_zeroes)
}

/// Whether the trailer at the end of a stream's last segment is the writer's, not the end of an
/// event's data or of a copy torn while the segment sealed. The seal record at `seal_at` must
/// decode and end where the trailer begins: a copy taken while the segment filled and sealed
/// can hold the trailer but not all of the seal record, and is then a live segment with a torn
/// tail. An event's bytes may end with anything, including a seal record with a valid CRC and a
/// trailer pointing at it, and when no zeroes follow the records they end the file.
/// The writer's seal record starts where the records, walked from the header, end; an event's
/// data lies inside its record, and the walk steps over it. A record before `seal_at` that does
/// not decode is damage, not this rule's to judge: the segment is taken as sealed, and the
/// checks of sealed segments report it (a live segment's scan could take it for a torn tail and
/// cut sealed events). Recovery and verify share this rule.
pub(crate) fn is_written_seal(bytes: &[u8], seal_at: usize) -> bool {
    let is_whole = record::decode(bytes, seal_at)
        .is_ok_and(|rec| record::ends_at_trailer(&rec, seal_at, bytes.len()));
    if !is_whole {
        return false;
    }
    let mut at = record::SEGMENT_HEADER_LEN;
    while at < seal_at {
        match record::decode(bytes, at) {
            Ok(rec) => at += rec.len,
            Err(_) => return true,
        }
    }
    at == seal_at
}

/// The segment files of a stream directory, oldest first.
pub fn list_segments(dir: &Path) -> Result<Vec<(EventId, PathBuf)>> {
    let mut found = Vec::new();
    let entries = fs::read_dir(dir).map_err(|e| Error::io(dir, "read directory", e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, "read directory", e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(id) = layout::parse_segment_file_name(name) {
            found.push((id, entry.path()));
        }
    }
    found.sort();
    Ok(found)
}

/// Scans a live segment's records and classifies the first failure (see the module docs).
pub fn scan_tail(path: &Path, bytes: &[u8], after_id: u64) -> Result<TailScan> {
    scan_tail_with(path, bytes, after_id, |_, _| {})
}

/// `scan_tail`, calling `on_record(offset, record)` for every valid event record.
fn scan_tail_with(
    path: &Path,
    bytes: &[u8],
    after_id: u64,
    mut on_record: impl FnMut(u64, &record::Record<'_>),
) -> Result<TailScan> {
    let file_len = bytes.len() as u64;
    let mut scan = TailScan {
        valid_end: record::SEGMENT_HEADER_LEN as u64,
        file_len,
        events: 0,
        last_id: None,
        is_free_after: false,
    };
    let mut previous = after_id;
    let mut at = record::SEGMENT_HEADER_LEN;
    while at < bytes.len() {
        match record::decode(bytes, at) {
            Ok(rec) if rec.kind == KIND_SEAL => break, // a seal whose trailer is torn
            Ok(rec) => {
                if rec.id <= previous && (scan.events > 0 || after_id > 0) {
                    return Err(Error::corrupt(
                        path,
                        at as u64,
                        Corruption::IdNotIncreasing {
                            id: rec.id,
                            previous,
                        },
                    ));
                }
                on_record(at as u64, &rec);
                previous = rec.id;
                scan.last_id = Some(rec.id);
                scan.events += 1;
                at += rec.len;
                scan.valid_end = at as u64;
            }
            Err(kind) => {
                if next_valid_record(bytes, at).is_some() {
                    return Err(Error::corrupt(path, at as u64, kind));
                }
                break;
            }
        }
    }
    scan.is_free_after = is_zeroes(&bytes[at.min(bytes.len())..]);
    Ok(scan)
}

/// Where a valid record starts right after the bad record at `at`, going by the length the bad
/// record declares. When there is one, the damage is inside the data, not a torn tail (recovery
/// refuses it; verify reports it and goes on from there).
pub(crate) fn next_valid_record(bytes: &[u8], at: usize) -> Option<usize> {
    let len = record::read_u32(bytes, at.checked_add(4)?).and_then(|l| usize::try_from(l).ok())?;
    if len < record::RECORD_HEADER_LEN {
        return None;
    }
    at.checked_add(len)
        .filter(|next| *next < bytes.len() && record::decode(bytes, *next).is_ok())
}

/// Opens a stream directory: every segment, with the last one recovered.
pub fn open_stream(dir: &Path, opts: &StoreOptions, access: Access) -> Result<StreamState> {
    if access == Access::ReadWrite {
        remove_temporaries(dir)?;
    }
    let mut files = list_segments(dir)?;
    let mut state = StreamState {
        segments: Arc::new(Vec::new()),
        live: VecDeque::new(),
        pending: Vec::new(),
        last_id: EventId(0),
    };
    let Some((last_first_id, last_path)) = files.pop() else {
        return Ok(state);
    };
    let mut segments: Vec<Arc<Segment>> = files
        .into_iter()
        .map(|(id, path)| Arc::new(Segment::on_disk(path, id)))
        .collect();
    let previous_last_id = match segments.last() {
        Some(seg) => seg.sealed()?.summary.last_id,
        None => 0,
    };
    state.last_id = EventId(previous_last_id);

    let file = File::open(&last_path).map_err(|e| Error::io(&last_path, "open", e))?;
    let file_len = file
        .metadata()
        .map_err(|e| Error::io(&last_path, "stat", e))?
        .len();
    if file_len < record::SEGMENT_HEADER_LEN as u64 {
        // Created but its header never fully reached the disk: holds nothing.
        if access == Access::ReadWrite {
            tracing::warn!(path = %last_path.display(), file_len, "removing a segment torn at creation");
            drop(file);
            fs::remove_file(&last_path).map_err(|e| Error::io(&last_path, "remove", e))?;
            sync_dir(dir)?;
        }
        state.segments = Arc::new(segments);
        return Ok(state);
    }
    let sealed = super::segment::Sealed::open(&last_path, &file, last_first_id)
        .ok()
        .filter(|sealed| is_written_seal(sealed.file_bytes(), sealed.seal_offset()));
    if let Some(sealed) = sealed {
        state.last_id = EventId(sealed.summary.last_id);
        if access == Access::ReadWrite {
            // A crash between the seal's fsync and the index's rename leaves this segment, the
            // stream's last, without its index: write it now (it is derived from the records).
            if let Err(reason) = super::segment::load_index_file(&last_path, last_first_id) {
                tracing::warn!(path = %last_path.display(), %reason, "rebuilding the index of the last sealed segment");
                super::segment::rebuild_index_file(
                    &*opts.io,
                    &last_path,
                    last_first_id,
                    &sealed,
                    opts.index_interval_bytes,
                )?;
            }
        }
        segments.push(Arc::new(Segment::on_disk(last_path, last_first_id)));
        state.segments = Arc::new(segments);
        return Ok(state);
    }
    drop(file);
    let writable = access == Access::ReadWrite;
    let seg = Arc::new(Segment::reopen_live(
        last_path.clone(),
        last_first_id,
        live_map_len(opts, access, file_len),
        writable,
    )?);
    let mut live = LiveSegment::new(Arc::clone(&seg), opts.index_interval_bytes);
    let scan = {
        let bytes = seg.records(Some(file_len))?;
        match record::decode_segment_header(bytes) {
            Ok(id) if id == last_first_id.0 => {
                scan_tail_with(&last_path, bytes, previous_last_id, |offset, rec| {
                    live.note_recovered(offset, rec.id, rec.path, rec.len as u64);
                })?
            }
            Ok(_) => return Err(Error::corrupt(&last_path, 16, Corruption::NameMismatch)),
            Err(_) if is_torn_at_creation(bytes) => TailScan {
                valid_end: 0,
                file_len,
                events: 0,
                last_id: None,
                is_free_after: false,
            },
            Err((o, k)) => return Err(Error::corrupt(&last_path, o, k)),
        }
    };
    if scan.events == 0 || (scan.is_torn() && writable) {
        // The file is about to be removed or cut: no map of it may live (contract, clause 2).
        drop(live);
        drop(seg);
    } else {
        return Ok(with_live(state, segments, seg, live, scan.last_id));
    }
    if scan.events == 0 {
        // No complete record survived: the segment would be named after an id it does not
        // hold. Remove it; the next append starts a segment named after its own id.
        if writable {
            tracing::warn!(path = %last_path.display(), cut_bytes = scan.file_len, "removing a segment with no complete record");
            fs::remove_file(&last_path).map_err(|e| Error::io(&last_path, "remove", e))?;
            sync_dir(dir)?;
        }
        state.segments = Arc::new(segments);
        return Ok(state);
    }
    cut_tail(&last_path, scan.valid_end, scan.file_len)?;
    let seg = Arc::new(Segment::reopen_live(
        last_path,
        last_first_id,
        live_map_len(opts, access, scan.valid_end),
        writable,
    )?);
    let live = LiveSegment::recover(Arc::clone(&seg), scan.valid_end, opts.index_interval_bytes)?;
    Ok(with_live(state, segments, seg, live, scan.last_id))
}

/// The length to map a recovered live segment at: room to grow for the writer, the file as it is
/// for a reader.
fn live_map_len(opts: &StoreOptions, access: Access, file_len: u64) -> usize {
    let file_len = usize::try_from(file_len).unwrap_or(usize::MAX);
    match access {
        Access::ReadWrite => super::commit::live_map_len(opts).max(file_len),
        Access::ReadOnly => file_len,
    }
}

fn with_live(
    mut state: StreamState,
    mut segments: Vec<Arc<Segment>>,
    seg: Arc<Segment>,
    live: LiveSegment,
    last_id: Option<u64>,
) -> StreamState {
    if let Some(last) = last_id {
        state.last_id = EventId(last);
    }
    segments.push(seg);
    state.segments = Arc::new(segments);
    state.live.push_back(live);
    state
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| Error::SyncFailed {
            path: dir.to_path_buf(),
            source,
        })
}

pub(crate) fn cut_tail(path: &Path, valid_end: u64, file_len: u64) -> Result<()> {
    tracing::warn!(path = %path.display(), offset = valid_end, cut_bytes = file_len - valid_end, "torn tail cut");
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| Error::io(path, "open", e))?;
    file.set_len(valid_end)
        .map_err(|e| Error::io(path, "truncate", e))?;
    file.sync_all().map_err(|source| Error::SyncFailed {
        path: path.to_path_buf(),
        source,
    })
}

/// Removes index files left half-written by a crash (`*.idx.tmp`); they are derived data.
fn remove_temporaries(dir: &Path) -> Result<()> {
    let entries = fs::read_dir(dir).map_err(|e| Error::io(dir, "read directory", e))?;
    for entry in entries.flatten() {
        if entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.ends_with(".idx.tmp"))
        {
            let path = entry.path();
            fs::remove_file(&path).map_err(|e| Error::io(&path, "remove", e))?;
        }
    }
    Ok(())
}
