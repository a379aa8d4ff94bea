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

/// Zeroes written ahead of a live segment's records (`Segment::zero_ahead`), at most: the step
/// is the size of the records written so far, between these bounds, so a cold stream's segment
/// holds no more zeroes than records (past the first page) and a busy one extends its file once
/// per 128-256 KiB of appends instead of at every commit.
const ZEROES_AHEAD_MAX: u64 = 256 * 1024;
const ZEROES_AHEAD_MIN: u64 = 4096;

pub struct Segment {
    path: PathBuf,
    first_id: EventId,
    /// The write handle, held only while live; taken by the writer thread alone.
    file: Mutex<Option<Writable>>,
    /// The map of a live segment, sized once at its maximum so it never needs remapping.
    live_map: OnceLock<Map>,
    sealed: OnceLock<Sealed>,
}

/// A live segment's write handle, and what the writer knows of the file.
struct Writable {
    file: File,
    /// Where the records written through this handle end (0 until the first write), counting
    /// a write that failed: no byte past it was ever written but zeroes.
    records_end: u64,
    /// The file's length as the writer made it: past `records_end` when zeroes follow the
    /// records (a spare's, or `zero_ahead`'s).
    len: u64,
}

impl Writable {
    fn new(file: File, path: &Path) -> Result<Writable> {
        let len = file
            .metadata()
            .map_err(|e| Error::io(path, "stat", e))?
            .len();
        Ok(Writable {
            file,
            records_end: 0,
            len,
        })
    }
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
            *seg.file.lock() = Some(Writable::new(file, &seg.path)?);
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
        *self.file.lock() = Some(Writable::new(file, &self.path)?);
        let _ = self.live_map.set(map);
        Ok(())
    }

    /// Writer only: writes `bytes` at `offset`.
    pub fn write_at(&self, io: &dyn FileIo, offset: u64, bytes: &[u8]) -> Result<()> {
        let mut guard = self.file.lock();
        let w = guard
            .as_mut()
            .ok_or_else(|| Error::NotWritable(self.path.clone()))?;
        let end = offset + bytes.len() as u64;
        // Before the write: a rollback must look at whatever a failed one may have left.
        w.records_end = w.records_end.max(end);
        io.write_at(&self.path, &w.file, offset, bytes)
            .map_err(|e| Error::io(&self.path, "write", e))?;
        w.len = w.len.max(end);
        Ok(())
    }

    /// Writer only, after a round's writes and before their sync: keeps zeroes written ahead
    /// of the records, so that the next appends overwrite blocks instead of extending the file
    /// (an overwrite's `fdatasync` commits no new size or block map: `spare.rs`). Under
    /// `always` a commit of an extending write costs more and varies more; with zeroes ahead,
    /// the file grows once per step. Each step, the size of the records so far (between
    /// `ZEROES_AHEAD_MIN` and `ZEROES_AHEAD_MAX`, never past `cap`), is written when less than
    /// half a step is left. The zeroes are free space in the format's terms; sealing cuts them.
    /// Returns the bytes written; on an error the file holds some of them at most, which is
    /// free space as well.
    pub fn zero_ahead(&self, io: &dyn FileIo, cap: u64) -> Result<u64> {
        let mut guard = self.file.lock();
        let w = guard
            .as_mut()
            .ok_or_else(|| Error::NotWritable(self.path.clone()))?;
        let step = w.records_end.clamp(ZEROES_AHEAD_MIN, ZEROES_AHEAD_MAX);
        if w.len >= cap || w.len.saturating_sub(w.records_end) >= step / 2 {
            return Ok(0);
        }
        // Whole pages: the last one is not left half written.
        let target = (w.records_end + step)
            .next_multiple_of(ZEROES_AHEAD_MIN)
            .min(cap);
        if target <= w.len {
            return Ok(0);
        }
        static ZEROES: [u8; 64 * 1024] = [0; 64 * 1024];
        let from = w.len;
        while w.len < target {
            let n = (target - w.len).min(ZEROES.len() as u64);
            io.write_at(&self.path, &w.file, w.len, &ZEROES[..n as usize])
                .map_err(|e| Error::io(&self.path, "write", e))?;
            w.len += n;
        }
        Ok(target - from)
    }

    /// Writer only: makes the written bytes durable (`fdatasync`).
    pub fn sync_data(&self, io: &dyn FileIo) -> Result<()> {
        let guard = self.file.lock();
        let w = guard
            .as_ref()
            .ok_or_else(|| Error::NotWritable(self.path.clone()))?;
        io.sync_data(&self.path, &w.file)
            .map_err(|source| Error::SyncFailed {
                path: self.path.clone(),
                source,
            })
    }

    /// Writer only, rolling back a failed write: cuts the file to `len` and syncs the cut. A file
    /// that holds nothing but zeroes after `len` (none at all, or the zeroes of a spare or of
    /// `zero_ahead` that the failed write did not reach) is left alone: those are free space,
    /// and a write refused outright (a read-only filesystem) then needs no write to undo. The
    /// write handle is reopened if a failed seal had already closed it. Readers never look past
    /// the committed end, which `len` is, so no map access can fall beyond the new end of file.
    pub fn truncate(&self, io: &dyn FileIo, len: u64) -> Result<()> {
        let on_disk = fs::metadata(&self.path)
            .map_err(|e| Error::io(&self.path, "stat", e))?
            .len();
        let mut guard = self.file.lock();
        // Past the records written through the handle there are only zeroes (a spare's, or
        // `zero_ahead`'s, or those recovery kept), so only up to there need be read: a spare's
        // 64 MiB are not read again at every failed retry on a full disk.
        let is_free = match guard.as_ref() {
            _ if on_disk <= len => true,
            Some(w) => is_zeroes_from(&self.path, &w.file, len, w.records_end.clamp(len, on_disk))?,
            None => {
                let file = File::open(&self.path).map_err(|e| Error::io(&self.path, "open", e))?;
                is_zeroes_from(&self.path, &file, len, on_disk)?
            }
        };
        if is_free {
            if let Some(w) = guard.as_mut() {
                w.records_end = w.records_end.min(len);
                w.len = on_disk;
            }
            return Ok(());
        }
        let w = match &mut *guard {
            Some(w) => w,
            closed => {
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&self.path)
                    .map_err(|e| Error::io(&self.path, "open", e))?;
                closed.insert(Writable::new(file, &self.path)?)
            }
        };
        io.truncate(&self.path, &w.file, len)
            .map_err(|e| Error::io(&self.path, "truncate", e))?;
        w.records_end = w.records_end.min(len);
        w.len = len;
        io.sync_data(&self.path, &w.file)
            .map_err(|source| Error::SyncFailed {
                path: self.path.clone(),
                source,
            })
    }

    /// Writer only, after writing the seal record that ends at `end`: cuts the zeroes a spare or
    /// `zero_ahead` left after it, so that the trailer is the file's last bytes. The seal's sync
    /// that follows makes the new length durable with the record.
    pub fn cut_after_seal(&self, io: &dyn FileIo, end: u64) -> Result<()> {
        let mut guard = self.file.lock();
        let w = guard
            .as_mut()
            .ok_or_else(|| Error::NotWritable(self.path.clone()))?;
        let len = w
            .file
            .metadata()
            .map_err(|e| Error::io(&self.path, "stat", e))?
            .len();
        if len > end {
            io.truncate(&self.path, &w.file, end)
                .map_err(|e| Error::io(&self.path, "truncate", e))?;
        }
        w.len = end;
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
            .ok_or_else(|| Error::NotWritable(self.path.clone()))?
            .file;
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

/// Whether `file`'s bytes in `[from, to)` are all zero (read from the file: only rolling back a
/// failed write asks, which is rare).
fn is_zeroes_from(path: &Path, file: &File, from: u64, to: u64) -> Result<bool> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; 64 * 1024];
    let mut at = from;
    while at < to {
        let n = usize::try_from(to - at).map_or(buf.len(), |left| left.min(buf.len()));
        file.read_exact_at(&mut buf[..n], at)
            .map_err(|e| Error::io(path, "read", e))?;
        if !super::recovery::is_zeroes(&buf[..n]) {
            return Ok(false);
        }
        at += n as u64;
    }
    Ok(true)
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
