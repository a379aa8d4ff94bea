//! One segment file: its lifecycle (created live by the writer, or found sealed on disk), its
//! maps, and iteration over its records.
//!
//! A segment is append-only while live and immutable once sealed. Only the writer thread
//! writes to it (`pwrite` at explicit offsets, through `write_at`); everybody reads through the
//! map. Writing with `pwrite` instead of through the map keeps page faults and SIGBUS-prone
//! stores out of the write path, and lets one `write` carry a whole group-commit batch.

use super::error::{Corruption, Error, Result};
use super::index::{self, IndexEntry, SealedIndex};
use super::io::FileIo;
use super::layout;
use super::mmap::Map;
use super::record::{self, FooterSummary, Record, KIND_SEAL};
use crate::event_id::EventId;
use parking_lot::Mutex;
use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

pub struct Segment {
    path: PathBuf,
    first_id: EventId,
    /// The write handle, held only while live; taken by the writer thread alone.
    file: Mutex<Option<File>>,
    /// The map of a live segment, sized once at its maximum so it never needs remapping.
    live_map: OnceLock<Map>,
    sealed: OnceLock<Sealed>,
}

/// A sealed segment's checked structure.
pub struct Sealed {
    map: Map,
    /// Where the records end and the seal record begins.
    records_end: usize,
    footer_start: usize,
    footer_end: usize,
    pub summary: FooterSummary,
    index: OnceLock<SealedIndex>,
}

impl Segment {
    /// A segment that will be created by the writer when its first bytes are written.
    pub fn new_live(dir: &Path, first_id: EventId) -> Segment {
        Segment {
            path: dir.join(layout::segment_file_name(first_id)),
            first_id,
            file: Mutex::new(None),
            live_map: OnceLock::new(),
            sealed: OnceLock::new(),
        }
    }

    /// A segment found on disk, sealed (checked lazily, on first read).
    pub fn on_disk(path: PathBuf, first_id: EventId) -> Segment {
        Segment {
            path,
            first_id,
            file: Mutex::new(None),
            live_map: OnceLock::new(),
            sealed: OnceLock::new(),
        }
    }

    /// A live segment recovered at open: the file exists and has been cut to valid data.
    pub fn reopen_live(
        path: PathBuf,
        first_id: EventId,
        map_len: usize,
        writable: bool,
    ) -> Result<Segment> {
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(&path)
            .map_err(|e| Error::io(&path, "open", e))?;
        let map = Map::with_len(&file, map_len).map_err(|e| Error::io(&path, "mmap", e))?;
        let seg = Segment::on_disk(path, first_id);
        if writable {
            *seg.file.lock() = Some(file);
        }
        let _ = seg.live_map.set(map);
        Ok(seg)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn first_id(&self) -> EventId {
        self.first_id
    }

    /// Writer only: creates the file (it must not exist), or takes `spare`, a zero-filled file
    /// already renamed to this segment's name (`spare.rs`), and maps it at `map_len`. A spare is
    /// longer than what is written into it until the seal cuts it (`cut_after_seal`).
    pub fn create_file(&self, io: &dyn FileIo, map_len: usize, spare: Option<File>) -> Result<()> {
        let file = match spare {
            Some(file) => file,
            None => io
                .create(&self.path)
                .map_err(|e| Error::io(&self.path, "create", e))?,
        };
        let map = Map::with_len(&file, map_len).map_err(|e| Error::io(&self.path, "mmap", e))?;
        *self.file.lock() = Some(file);
        let _ = self.live_map.set(map);
        Ok(())
    }

    /// Writer only: writes `bytes` at `offset`.
    pub fn write_at(&self, io: &dyn FileIo, offset: u64, bytes: &[u8]) -> Result<()> {
        let guard = self.file.lock();
        let file = guard
            .as_ref()
            .ok_or_else(|| Error::NotWritable(self.path.clone()))?;
        io.write_at(&self.path, file, offset, bytes)
            .map_err(|e| Error::io(&self.path, "write", e))
    }

    /// Writer only: makes the written bytes durable (`fdatasync`).
    pub fn sync_data(&self, io: &dyn FileIo) -> Result<()> {
        let guard = self.file.lock();
        let file = guard
            .as_ref()
            .ok_or_else(|| Error::NotWritable(self.path.clone()))?;
        io.sync_data(&self.path, file)
            .map_err(|source| Error::SyncFailed {
                path: self.path.clone(),
                source,
            })
    }

    /// Writer only, rolling back a failed write: cuts the file to `len` and syncs the cut. A file
    /// no longer than `len` is left alone, so that a write refused outright (a read-only
    /// filesystem) needs no write to undo. The write handle is reopened if a failed seal had
    /// already closed it. Readers never look past the committed end, which `len` is, so no map
    /// access can fall beyond the new end of file.
    pub fn truncate(&self, io: &dyn FileIo, len: u64) -> Result<()> {
        let on_disk = fs::metadata(&self.path)
            .map_err(|e| Error::io(&self.path, "stat", e))?
            .len();
        if on_disk <= len {
            return Ok(());
        }
        let mut guard = self.file.lock();
        let file = match &mut *guard {
            Some(file) => file,
            closed => closed.insert(
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&self.path)
                    .map_err(|e| Error::io(&self.path, "open", e))?,
            ),
        };
        io.truncate(&self.path, file, len)
            .map_err(|e| Error::io(&self.path, "truncate", e))?;
        io.sync_data(&self.path, file)
            .map_err(|source| Error::SyncFailed {
                path: self.path.clone(),
                source,
            })
    }

    /// Writer only, after writing the seal record that ends at `end`: cuts the zeroes a spare
    /// left after it, so that the trailer is the file's last bytes. The seal's sync that follows
    /// makes the new length durable with the record.
    pub fn cut_after_seal(&self, io: &dyn FileIo, end: u64) -> Result<()> {
        let guard = self.file.lock();
        let file = guard
            .as_ref()
            .ok_or_else(|| Error::NotWritable(self.path.clone()))?;
        let len = file
            .metadata()
            .map_err(|e| Error::io(&self.path, "stat", e))?
            .len();
        if len > end {
            io.truncate(&self.path, file, end)
                .map_err(|e| Error::io(&self.path, "truncate", e))?;
        }
        Ok(())
    }

    /// Writer only, rolling back a failed write: removes the file and any index written for it.
    pub fn remove_files(&self, io: &dyn FileIo) -> Result<()> {
        self.file.lock().take();
        self.remove_index_files(io)?;
        remove_existing(io, &self.path)
    }

    /// Writer only, rolling back a seal that did not complete: removes its index files.
    pub fn remove_index_files(&self, io: &dyn FileIo) -> Result<()> {
        let index = layout::index_path_for(&self.path);
        remove_existing(io, &index.with_extension("idx.tmp"))?;
        remove_existing(io, &index)
    }

    /// Writer only, after the seal record is durable: writes the index file, switches readers to
    /// the sealed view and closes the write handle.
    pub fn finish_seal(
        &self,
        io: &dyn FileIo,
        interval_bytes: u32,
        entries: &[IndexEntry],
    ) -> Result<()> {
        write_index_file(io, &self.path, self.first_id.0, interval_bytes, entries)?;
        let file = self
            .file
            .lock()
            .take()
            .ok_or_else(|| Error::NotWritable(self.path.clone()))?;
        let sealed = Sealed::open(&self.path, &file, self.first_id)?;
        let _ = self.sealed.set(sealed);
        Ok(())
    }

    /// The sealed view, checking the file on first use.
    pub fn sealed(&self) -> Result<&Sealed> {
        if let Some(s) = self.sealed.get() {
            return Ok(s);
        }
        let file = File::open(&self.path).map_err(|e| Error::io(&self.path, "open", e))?;
        let sealed = Sealed::open(&self.path, &file, self.first_id)?;
        let _ = self.sealed.set(sealed);
        Ok(self.sealed.get().expect("set just above"))
    }

    pub fn is_sealed_loaded(&self) -> bool {
        self.sealed.get().is_some()
    }

    /// The records region: all of it when sealed, else `[0, end)` of the live map.
    pub fn records(&self, live_end: Option<u64>) -> Result<&[u8]> {
        match live_end {
            None => Ok(self.sealed()?.records()),
            Some(end) => {
                let end = usize::try_from(end).unwrap_or(usize::MAX);
                Ok(self.live_map.get().map_or(&[][..], |m| m.bytes(end)))
            }
        }
    }

    /// Decodes the record at `offset` of `bytes`, naming this file in the error.
    pub fn decode<'a>(&self, bytes: &'a [u8], offset: u64) -> Result<Record<'a>> {
        let at = usize::try_from(offset).unwrap_or(usize::MAX);
        record::decode(bytes, at).map_err(|k| Error::corrupt(&self.path, offset, k))
    }

    /// Decodes the event of `channel` at `offset` (`record::decode_event_of`).
    pub fn decode_event_of<'a>(
        &self,
        bytes: &'a [u8],
        offset: u64,
        channel: &'a str,
    ) -> Result<Record<'a>> {
        let at = usize::try_from(offset).unwrap_or(usize::MAX);
        record::decode_event_of(bytes, at, channel)
            .map_err(|k| Error::corrupt(&self.path, offset, k))
    }
}

/// Removes a file if it is there. Existence is checked first because `unlink` on a read-only
/// filesystem fails even for a name that does not exist.
pub(crate) fn remove_existing(io: &dyn FileIo, path: &Path) -> Result<()> {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        _ => io.remove(path).map_err(|e| Error::io(path, "remove", e)),
    }
}

/// Writes a segment's index: to `<id>.idx.tmp`, synced, then renamed, so that an index file is
/// either absent or whole once its directory is synced (the next segment's creation syncs it).
pub(crate) fn write_index_file(
    io: &dyn FileIo,
    seg_path: &Path,
    first_id: u64,
    interval: u32,
    entries: &[IndexEntry],
) -> Result<()> {
    let path = layout::index_path_for(seg_path);
    let tmp = path.with_extension("idx.tmp");
    let bytes = index::encode_file(first_id, interval, entries);
    let _ = fs::remove_file(&tmp);
    let file = io.create(&tmp).map_err(|e| Error::io(&tmp, "create", e))?;
    io.write_at(&tmp, &file, 0, &bytes)
        .map_err(|e| Error::io(&tmp, "write", e))?;
    io.sync_data(&tmp, &file)
        .map_err(|source| Error::SyncFailed {
            path: tmp.clone(),
            source,
        })?;
    drop(file);
    io.rename(&tmp, &path)
        .map_err(|e| Error::io(&path, "rename", e))
}

/// Rebuilds a sealed segment's index from its records and writes it (recovery and
/// `verify --repair`).
pub(crate) fn rebuild_index_file(
    io: &dyn FileIo,
    seg_path: &Path,
    first_id: EventId,
    sealed: &Sealed,
    interval: u32,
) -> Result<()> {
    let entries = index::rebuild(sealed.records(), interval)
        .map_err(|(o, k)| Error::corrupt(seg_path, o, k))?;
    write_index_file(io, seg_path, first_id.0, interval, &entries)
}

impl Sealed {
    /// Maps a sealed segment and checks its header, trailer and seal record (with its CRC).
    pub fn open(path: &Path, file: &File, first_id: EventId) -> Result<Sealed> {
        let map = Map::whole(file).map_err(|e| Error::io(path, "mmap", e))?;
        let bytes = map.bytes(map.len());
        let header_id =
            record::decode_segment_header(bytes).map_err(|(o, k)| Error::corrupt(path, o, k))?;
        if header_id != first_id.0 {
            return Err(Error::corrupt(path, 16, Corruption::NameMismatch));
        }
        let trailer_at = bytes.len().saturating_sub(record::TRAILER_LEN) as u64;
        let seal_at = record::decode_trailer(bytes)
            .ok_or_else(|| Error::corrupt(path, trailer_at, Corruption::NotSealed))?;
        if seal_at < record::SEGMENT_HEADER_LEN || seal_at as u64 >= trailer_at {
            return Err(Error::corrupt(
                path,
                trailer_at,
                Corruption::BadFooter("seal offset"),
            ));
        }
        let seal =
            record::decode(bytes, seal_at).map_err(|k| Error::corrupt(path, seal_at as u64, k))?;
        if !record::ends_at_trailer(&seal, seal_at, bytes.len()) {
            return Err(Error::corrupt(
                path,
                seal_at as u64,
                Corruption::BadFooter("seal record"),
            ));
        }
        let footer_start = seal_at + seal.len - seal.data.len();
        let footer = record::decode_footer(seal.data)
            .map_err(|k| Error::corrupt(path, footer_start as u64, k))?;
        Ok(Sealed {
            summary: footer.summary,
            records_end: seal_at,
            footer_start,
            footer_end: footer_start + seal.data.len(),
            map,
            index: OnceLock::new(),
        })
    }

    pub fn records(&self) -> &[u8] {
        self.map.bytes(self.records_end)
    }

    /// The whole file, trailer included.
    pub(crate) fn file_bytes(&self) -> &[u8] {
        self.map.bytes(self.map.len())
    }

    /// Where the seal record starts: the end of the event records.
    pub(crate) fn seal_offset(&self) -> usize {
        self.records_end
    }

    pub fn footer(&self) -> record::Footer<'_> {
        let body = &self.map.bytes(self.footer_end)[self.footer_start..];
        record::decode_footer(body).expect("checked when the segment was opened")
    }

    /// The index, from its file, or rebuilt from the records when the file is missing or bad.
    pub fn index(&self, seg_path: &Path, first_id: EventId) -> Result<&SealedIndex> {
        if let Some(ix) = self.index.get() {
            return Ok(ix);
        }
        let loaded = match load_index_file(seg_path, first_id) {
            Ok(ix) => ix,
            Err(reason) => {
                tracing::warn!(path = %seg_path.display(), %reason, "index file unusable; rebuilding from the segment");
                let entries =
                    index::rebuild(self.records(), crate::storage::DEFAULT_INDEX_INTERVAL)
                        .map_err(|(o, k)| Error::corrupt(seg_path, o, k))?;
                SealedIndex::Rebuilt(entries)
            }
        };
        let _ = self.index.set(loaded);
        Ok(self.index.get().expect("set just above"))
    }
}

pub(crate) fn load_index_file(
    seg_path: &Path,
    first_id: EventId,
) -> std::result::Result<SealedIndex, String> {
    let path = layout::index_path_for(seg_path);
    let file = File::open(&path).map_err(|e| e.to_string())?;
    let map = Map::whole(&file).map_err(|e| e.to_string())?;
    let count = {
        let parsed =
            index::decode_file(map.bytes(map.len())).map_err(|(o, k)| format!("byte {o}: {k}"))?;
        if parsed.segment_first_id != first_id.0 {
            return Err("index belongs to another segment".into());
        }
        parsed.entries().count()
    };
    Ok(SealedIndex::Mapped { map, count })
}

/// Iterates the records of `bytes` from `start`, stopping at `end` or at a seal record.
pub struct Records<'a> {
    seg: &'a Segment,
    bytes: &'a [u8],
    at: u64,
    end: u64,
}

impl<'a> Records<'a> {
    pub fn new(seg: &'a Segment, bytes: &'a [u8], start: u64, end: u64) -> Records<'a> {
        Records {
            seg,
            bytes,
            at: start,
            end: end.min(bytes.len() as u64),
        }
    }
}

impl<'a> Iterator for Records<'a> {
    type Item = Result<(u64, Record<'a>)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.at >= self.end {
            return None;
        }
        let offset = self.at;
        match self.seg.decode(self.bytes, offset) {
            Ok(rec) if rec.kind == KIND_SEAL => {
                self.at = self.end;
                None
            }
            Ok(rec) => {
                self.at += rec.len as u64;
                Some(Ok((offset, rec)))
            }
            Err(e) => {
                self.at = self.end;
                Some(Err(e))
            }
        }
    }
}
