//! The sparse timestamp index of a segment: one entry `(id, offset)` for the first event record
//! and then for the first record at or past every `interval_bytes` since the previous entry, so
//! the first event at or after an id is found by a binary search plus a scan of at most
//! `interval_bytes` (and one record).
//!
//! The index is derived data. The active segment keeps its entries in memory; sealing writes
//! them to `<id>.idx` (temporary file, then rename). A missing or damaged index file is never
//! trusted: the reader rebuilds the entries from the segment and says so in the log.

use super::error::Corruption;
use super::mmap::Map;
use super::record::{self, read_u32, read_u64, KIND_EVENT};

pub const INDEX_MAGIC: [u8; 8] = *b"\x89IVYIDX\n";
pub const INDEX_VERSION: u32 = 1;
pub const INDEX_HEADER_LEN: usize = 48;
pub const ENTRY_LEN: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexEntry {
    pub id: u64,
    pub offset: u64,
}

/// Decides which records get an entry; owned by whoever appends to a segment.
#[derive(Debug, Clone, Copy)]
pub struct IndexBuilder {
    interval_bytes: u64,
    last_offset: Option<u64>,
}

impl IndexBuilder {
    pub fn new(interval_bytes: u32) -> IndexBuilder {
        IndexBuilder {
            interval_bytes: u64::from(interval_bytes.max(1)),
            last_offset: None,
        }
    }

    /// Whether the event record at `offset` gets an entry (and records that it did).
    pub fn wants(&mut self, offset: u64) -> bool {
        let due = self
            .last_offset
            .is_none_or(|last| offset >= last + self.interval_bytes);
        if due {
            self.last_offset = Some(offset);
        }
        due
    }
}

/// Recomputes the entries of a segment's records region `[header, end)`.
pub fn rebuild(bytes: &[u8], interval_bytes: u32) -> Result<Vec<IndexEntry>, (u64, Corruption)> {
    let mut builder = IndexBuilder::new(interval_bytes);
    let mut entries = Vec::new();
    let mut at = record::SEGMENT_HEADER_LEN;
    while at < bytes.len() {
        let rec = record::decode(bytes, at).map_err(|k| (at as u64, k))?;
        if rec.kind != KIND_EVENT {
            break;
        }
        if builder.wants(at as u64) {
            entries.push(IndexEntry {
                id: rec.id,
                offset: at as u64,
            });
        }
        at += rec.len;
    }
    Ok(entries)
}

/// Encodes a whole index file.
pub fn encode_file(segment_first_id: u64, interval_bytes: u32, entries: &[IndexEntry]) -> Vec<u8> {
    let mut body = Vec::with_capacity(entries.len() * ENTRY_LEN);
    for e in entries {
        body.extend_from_slice(&e.id.to_le_bytes());
        body.extend_from_slice(&e.offset.to_le_bytes());
    }
    let mut out = Vec::with_capacity(INDEX_HEADER_LEN + body.len());
    out.extend_from_slice(&INDEX_MAGIC);
    out.extend_from_slice(&INDEX_VERSION.to_le_bytes());
    out.extend_from_slice(&(INDEX_HEADER_LEN as u32).to_le_bytes());
    out.extend_from_slice(&segment_first_id.to_le_bytes());
    out.extend_from_slice(&(entries.len() as u64).to_le_bytes());
    out.extend_from_slice(&interval_bytes.to_le_bytes());
    out.extend_from_slice(&record::crc(&body).to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    let sum = record::crc(&out);
    out.extend_from_slice(&sum.to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// A checked index file: header fields and the entries region.
#[derive(Debug, Clone, Copy)]
pub struct IndexFile<'a> {
    pub segment_first_id: u64,
    pub interval_bytes: u32,
    entries: &'a [u8],
}

/// Checks an index file (header, lengths, both checksums). Offsets in errors are file offsets.
pub fn decode_file(bytes: &[u8]) -> Result<IndexFile<'_>, (u64, Corruption)> {
    let head = bytes
        .get(..INDEX_HEADER_LEN)
        .ok_or((0, Corruption::Truncated))?;
    if head[..8] != INDEX_MAGIC {
        return Err((0, Corruption::BadMagic));
    }
    let version = read_u32(head, 8).unwrap_or_default();
    if version != INDEX_VERSION {
        return Err((8, Corruption::UnsupportedVersion(version)));
    }
    if read_u32(head, 44) != Some(record::crc(&head[..44])) {
        return Err((44, Corruption::HeaderCrc));
    }
    if read_u32(head, 12) != Some(INDEX_HEADER_LEN as u32) {
        return Err((12, Corruption::BadHeader("header_len")));
    }
    if read_u32(head, 40) != Some(0) {
        return Err((40, Corruption::BadHeader("reserved")));
    }
    let count = read_u64(head, 24).unwrap_or_default();
    let body = &bytes[INDEX_HEADER_LEN..];
    if Some(body.len())
        != usize::try_from(count)
            .ok()
            .and_then(|c| c.checked_mul(ENTRY_LEN))
    {
        return Err((24, Corruption::BadHeader("entry_count")));
    }
    if read_u32(head, 36) != Some(record::crc(body)) {
        return Err((
            INDEX_HEADER_LEN as u64,
            Corruption::Crc {
                stored: read_u32(head, 36).unwrap_or_default(),
                computed: record::crc(body),
            },
        ));
    }
    Ok(IndexFile {
        segment_first_id: read_u64(head, 16).unwrap_or_default(),
        interval_bytes: read_u32(head, 32).unwrap_or_default(),
        entries: body,
    })
}

impl IndexFile<'_> {
    pub fn entries(&self) -> impl Iterator<Item = IndexEntry> + '_ {
        self.entries.chunks_exact(ENTRY_LEN).map(|c| IndexEntry {
            id: read_u64(c, 0).unwrap_or_default(),
            offset: read_u64(c, 8).unwrap_or_default(),
        })
    }
}

/// The index of a sealed segment: a checked file map, or entries rebuilt in memory.
pub enum SealedIndex {
    Mapped { map: Map, count: usize },
    Rebuilt(Vec<IndexEntry>),
}

impl SealedIndex {
    pub fn len(&self) -> usize {
        match self {
            SealedIndex::Mapped { count, .. } => *count,
            SealedIndex::Rebuilt(v) => v.len(),
        }
    }

    pub fn get(&self, i: usize) -> Option<IndexEntry> {
        match self {
            SealedIndex::Mapped { map, count } => {
                if i >= *count {
                    return None;
                }
                let bytes = map.bytes(INDEX_HEADER_LEN + count * ENTRY_LEN);
                let at = INDEX_HEADER_LEN + i * ENTRY_LEN;
                Some(IndexEntry {
                    id: read_u64(bytes, at)?,
                    offset: read_u64(bytes, at + 8)?,
                })
            }
            SealedIndex::Rebuilt(v) => v.get(i).copied(),
        }
    }
}

/// Something indexable by position: the live entries of the active segment or a sealed index.
pub trait Entries {
    fn count(&self) -> usize;
    fn entry(&self, i: usize) -> Option<IndexEntry>;
}

impl Entries for [IndexEntry] {
    fn count(&self) -> usize {
        self.len()
    }
    fn entry(&self, i: usize) -> Option<IndexEntry> {
        self.get(i).copied()
    }
}

impl Entries for Vec<IndexEntry> {
    fn count(&self) -> usize {
        self.len()
    }
    fn entry(&self, i: usize) -> Option<IndexEntry> {
        self.get(i).copied()
    }
}

impl Entries for SealedIndex {
    fn count(&self) -> usize {
        self.len()
    }
    fn entry(&self, i: usize) -> Option<IndexEntry> {
        self.get(i)
    }
}

/// The offset to start scanning from to find the first event with id >= `id`: the last entry
/// whose id is <= `id`, or `None` when every entry is above it (start at the first record).
/// Only entries below `end` count, since the rest are not committed yet.
pub fn seek<E: Entries + ?Sized>(entries: &E, id: u64, end: u64) -> Option<u64> {
    let (mut lo, mut hi) = (0, entries.count());
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        match entries.entry(mid) {
            Some(e) if e.id <= id && e.offset < end => lo = mid + 1,
            _ => hi = mid,
        }
    }
    lo.checked_sub(1)
        .and_then(|i| entries.entry(i))
        .map(|e| e.offset)
}

/// Offsets of the entries below `end`, in order: block starts for reverse scans.
pub fn block_starts<E: Entries + ?Sized>(entries: &E, end: u64) -> Vec<u64> {
    (0..entries.count())
        .filter_map(|i| entries.entry(i))
        .map(|e| e.offset)
        .take_while(|o| *o < end)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_round_trip_and_damage() {
        let entries = [
            IndexEntry { id: 5, offset: 32 },
            IndexEntry {
                id: 9,
                offset: 4200,
            },
        ];
        let bytes = encode_file(5, 4096, &entries);
        let file = decode_file(&bytes).unwrap();
        assert_eq!(file.entries().collect::<Vec<_>>(), entries);
        assert_eq!(file.interval_bytes, 4096);
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x10;
            assert!(decode_file(&bad).is_err(), "byte {i}");
        }
    }

    #[test]
    fn seek_finds_block() {
        let entries = [
            IndexEntry { id: 10, offset: 32 },
            IndexEntry {
                id: 20,
                offset: 100,
            },
            IndexEntry {
                id: 30,
                offset: 200,
            },
        ];
        assert_eq!(seek(&entries[..], 5, 1000), None);
        assert_eq!(seek(&entries[..], 10, 1000), Some(32));
        assert_eq!(seek(&entries[..], 25, 1000), Some(100));
        assert_eq!(seek(&entries[..], 99, 1000), Some(200));
        assert_eq!(seek(&entries[..], 99, 200), Some(100));
        assert_eq!(block_starts(&entries[..], 150), vec![32, 100]);
    }
}
