//! The byte codec of segment files: segment header, record frame, seal footer and trailer.
//! No I/O here: encoders append to a `Vec<u8>`, decoders read a `&[u8]` with every bound and
//! checksum checked, because mapped file bytes are untrusted input (mmap contract, clause 4).
//! The layouts are specified in `storage-format.md`; all integers are little-endian.

use super::error::Corruption;

pub const SEGMENT_MAGIC: [u8; 8] = *b"\x89IVYSEG\n";
pub const SEAL_MAGIC: [u8; 8] = *b"IVYSEAL\n";
pub const FORMAT_VERSION: u32 = 1;
pub const FOOTER_VERSION: u32 = 1;

pub const SEGMENT_HEADER_LEN: usize = 32;
pub const RECORD_HEADER_LEN: usize = 28;
pub const TRAILER_LEN: usize = 16;
const FOOTER_FIXED_LEN: usize = 48;
/// One channel-table entry without its path: u16 path length, then three u64.
const TABLE_ENTRY_FIXED_LEN: usize = 2 + 24;

pub const KIND_EVENT: u8 = 1;
pub const KIND_SEAL: u8 = 2;

/// `N` bytes at `at`, or `None` past the end (including offsets so large they overflow, which
/// disk bytes can name: fuzzing found one).
fn read_array<const N: usize>(buf: &[u8], at: usize) -> Option<[u8; N]> {
    buf.get(at..at.checked_add(N)?)?.try_into().ok()
}

pub(crate) fn read_u16(buf: &[u8], at: usize) -> Option<u16> {
    read_array(buf, at).map(u16::from_le_bytes)
}

pub(crate) fn read_u32(buf: &[u8], at: usize) -> Option<u32> {
    read_array(buf, at).map(u32::from_le_bytes)
}

pub(crate) fn read_u64(buf: &[u8], at: usize) -> Option<u64> {
    read_array(buf, at).map(u64::from_le_bytes)
}

pub(crate) fn crc(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes)
}

/// Appends the 32-byte segment header.
pub fn encode_segment_header(out: &mut Vec<u8>, first_id: u64) {
    let start = out.len();
    out.extend_from_slice(&SEGMENT_MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(SEGMENT_HEADER_LEN as u32).to_le_bytes());
    out.extend_from_slice(&first_id.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    let sum = crc(&out[start..]);
    out.extend_from_slice(&sum.to_le_bytes());
}

/// Checks a segment header and returns its first id.
pub fn decode_segment_header(buf: &[u8]) -> Result<u64, (u64, Corruption)> {
    let head = buf
        .get(..SEGMENT_HEADER_LEN)
        .ok_or((0, Corruption::Truncated))?;
    if head[..8] != SEGMENT_MAGIC {
        return Err((0, Corruption::BadMagic));
    }
    let version = read_u32(head, 8).unwrap_or_default();
    if version != FORMAT_VERSION {
        return Err((8, Corruption::UnsupportedVersion(version)));
    }
    let stored = read_u32(head, 28).unwrap_or_default();
    if stored != crc(&head[..28]) {
        return Err((28, Corruption::HeaderCrc));
    }
    if read_u32(head, 12) != Some(SEGMENT_HEADER_LEN as u32) {
        return Err((12, Corruption::BadHeader("header_len")));
    }
    read_u64(head, 16).ok_or((16, Corruption::Truncated))
}

/// Appends one event record. `prev` is the offset of the previous record of the same channel in
/// this segment, or 0. The caller has checked that path and data fit the length field.
pub fn encode_event(out: &mut Vec<u8>, id: u64, prev: u64, path: &str, data: &[u8]) {
    encode_frame(out, KIND_EVENT, id, prev, path.as_bytes(), &[data]);
}

/// The length of the event record for this path and data.
pub fn event_len(path: &str, data: &[u8]) -> usize {
    RECORD_HEADER_LEN + path.len() + data.len()
}

fn encode_frame(out: &mut Vec<u8>, kind: u8, id: u64, prev: u64, path: &[u8], body: &[&[u8]]) {
    let start = out.len();
    let len = RECORD_HEADER_LEN + path.len() + body.iter().map(|b| b.len()).sum::<usize>();
    debug_assert!(u32::try_from(len).is_ok());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&(len as u32).to_le_bytes());
    out.push(kind);
    out.push(0);
    out.extend_from_slice(&(path.len() as u16).to_le_bytes());
    out.extend_from_slice(&id.to_le_bytes());
    out.extend_from_slice(&prev.to_le_bytes());
    out.extend_from_slice(path);
    for part in body {
        out.extend_from_slice(part);
    }
    let sum = crc(&out[start + 4..]);
    out[start..start + 4].copy_from_slice(&sum.to_le_bytes());
}

/// One decoded record, borrowing from the buffer it was decoded from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record<'a> {
    pub kind: u8,
    pub id: u64,
    pub prev: u64,
    /// Valid UTF-8 for events (checked); empty for a seal.
    pub path: &'a str,
    pub data: &'a [u8],
    /// Total bytes of the frame.
    pub len: usize,
}

/// Decodes the record at `offset`. Errors give the kind of damage; the caller adds the file.
pub fn decode(buf: &[u8], offset: usize) -> Result<Record<'_>, Corruption> {
    decode_checking(buf, offset, |kind, bytes| {
        let path = std::str::from_utf8(bytes).map_err(|_| Corruption::BadPath)?;
        if kind == KIND_EVENT && crate::channel::ChannelPath::check_exact(path).is_err() {
            return Err(Corruption::BadPath);
        }
        Ok(path)
    })
}

/// Decodes the record at `offset`, which must be an event of `channel` (a link of its chain):
/// its path is compared with `channel` instead of checked, since equal to a valid path is
/// valid (a log read's path checks were 5-7% of its CPU). Anything else is `BadChainLink`.
pub fn decode_event_of<'a>(
    buf: &'a [u8],
    offset: usize,
    channel: &'a str,
) -> Result<Record<'a>, Corruption> {
    decode_checking(buf, offset, |kind, bytes| match kind {
        KIND_EVENT if bytes == channel.as_bytes() => Ok(channel),
        _ => Err(Corruption::BadChainLink(offset as u64)),
    })
}

/// The frame checks of every decode; `path_of` turns the path bytes of a record of `kind`
/// into its path or refuses them.
fn decode_checking<'a>(
    buf: &'a [u8],
    offset: usize,
    path_of: impl FnOnce(u8, &'a [u8]) -> Result<&'a str, Corruption>,
) -> Result<Record<'a>, Corruption> {
    let rest = buf.get(offset..).ok_or(Corruption::Truncated)?;
    let head = rest.get(..RECORD_HEADER_LEN).ok_or(Corruption::Truncated)?;
    let stored = read_u32(head, 0).ok_or(Corruption::Truncated)?;
    let len32 = read_u32(head, 4).ok_or(Corruption::Truncated)?;
    if stored == 0 && len32 == 0 {
        return Err(Corruption::Zeroes);
    }
    let len = usize::try_from(len32).map_err(|_| Corruption::BadLength(len32))?;
    let path_len = usize::from(read_u16(head, 10).ok_or(Corruption::Truncated)?);
    if len < RECORD_HEADER_LEN + path_len {
        return Err(Corruption::BadLength(len32));
    }
    let frame = rest.get(..len).ok_or(Corruption::Truncated)?;
    let computed = crc(&frame[4..]);
    if computed != stored {
        return Err(Corruption::Crc { stored, computed });
    }
    let kind = head[8];
    if kind != KIND_EVENT && kind != KIND_SEAL {
        return Err(Corruption::UnknownKind(kind));
    }
    let path = path_of(
        kind,
        &frame[RECORD_HEADER_LEN..RECORD_HEADER_LEN + path_len],
    )?;
    Ok(Record {
        kind,
        id: read_u64(head, 12).ok_or(Corruption::Truncated)?,
        prev: read_u64(head, 20).ok_or(Corruption::Truncated)?,
        path,
        data: &frame[RECORD_HEADER_LEN + path_len..],
        len,
    })
}

/// A channel's entry in a seal footer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableEntry<'a> {
    pub path: &'a str,
    pub first_offset: u64,
    pub last_offset: u64,
    pub count: u64,
}

/// The fixed part of a seal footer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FooterSummary {
    pub event_count: u64,
    pub first_id: u64,
    pub last_id: u64,
    pub channel_count: u64,
}

/// Appends the seal record and the trailer. `entries` must be sorted by path bytes.
pub fn encode_seal(
    out: &mut Vec<u8>,
    seal_offset: u64,
    summary: FooterSummary,
    last_event_offset: u64,
    entries: &[TableEntry<'_>],
) {
    let mut body =
        Vec::with_capacity(FOOTER_FIXED_LEN + entries.len() * (TABLE_ENTRY_FIXED_LEN + 8 + 32));
    body.extend_from_slice(&FOOTER_VERSION.to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes());
    body.extend_from_slice(&summary.event_count.to_le_bytes());
    body.extend_from_slice(&summary.first_id.to_le_bytes());
    body.extend_from_slice(&summary.last_id.to_le_bytes());
    body.extend_from_slice(&summary.channel_count.to_le_bytes());
    let table_len_at = body.len();
    body.extend_from_slice(&0u64.to_le_bytes());
    let table_start = body.len();
    let mut positions = Vec::with_capacity(entries.len());
    for e in entries {
        positions.push((body.len() - table_start) as u64);
        body.extend_from_slice(&(e.path.len() as u16).to_le_bytes());
        body.extend_from_slice(e.path.as_bytes());
        body.extend_from_slice(&e.first_offset.to_le_bytes());
        body.extend_from_slice(&e.last_offset.to_le_bytes());
        body.extend_from_slice(&e.count.to_le_bytes());
    }
    let table_len = (body.len() - table_start) as u64;
    body[table_len_at..table_len_at + 8].copy_from_slice(&table_len.to_le_bytes());
    for p in positions {
        body.extend_from_slice(&p.to_le_bytes());
    }
    encode_frame(
        out,
        KIND_SEAL,
        summary.last_id,
        last_event_offset,
        &[],
        &[&body],
    );
    out.extend_from_slice(&seal_offset.to_le_bytes());
    out.extend_from_slice(&SEAL_MAGIC);
}

/// A decoded seal footer: the summary plus a channel table searchable in place.
#[derive(Debug, Clone, Copy)]
pub struct Footer<'a> {
    pub summary: FooterSummary,
    table: &'a [u8],
    positions: &'a [u8],
}

/// Whether `rec`, decoded at `seal_at` of a file of `file_len` bytes, is a seal record that ends
/// exactly where the trailer begins: with the trailer's magic, what makes the file sealed.
pub fn ends_at_trailer(rec: &Record<'_>, seal_at: usize, file_len: usize) -> bool {
    rec.kind == KIND_SEAL && seal_at + rec.len + TRAILER_LEN == file_len
}

/// Reads the trailer at the end of `file` and returns the seal record's offset, if the file
/// ends with one.
pub fn decode_trailer(file: &[u8]) -> Option<usize> {
    let at = file.len().checked_sub(TRAILER_LEN)?;
    if file[at + 8..] != SEAL_MAGIC {
        return None;
    }
    usize::try_from(read_u64(file, at)?).ok()
}

/// Decodes and checks a seal footer from the seal record's data.
pub fn decode_footer(body: &[u8]) -> Result<Footer<'_>, Corruption> {
    let fixed = body
        .get(..FOOTER_FIXED_LEN)
        .ok_or(Corruption::BadFooter("shorter than its fixed part"))?;
    let version = read_u32(fixed, 0).unwrap_or_default();
    if version != FOOTER_VERSION {
        return Err(Corruption::UnsupportedVersion(version));
    }
    let field = |at| read_u64(fixed, at).unwrap_or_default();
    let summary = FooterSummary {
        event_count: field(8),
        first_id: field(16),
        last_id: field(24),
        channel_count: field(32),
    };
    let table_len =
        usize::try_from(field(40)).map_err(|_| Corruption::BadFooter("table length"))?;
    let table = body
        .get(FOOTER_FIXED_LEN..)
        .and_then(|b| b.get(..table_len))
        .ok_or(Corruption::BadFooter("table length"))?;
    let positions = &body[FOOTER_FIXED_LEN + table_len..];
    let count = usize::try_from(summary.channel_count)
        .map_err(|_| Corruption::BadFooter("channel count"))?;
    if positions.len() != count.saturating_mul(8) || count > table.len() / TABLE_ENTRY_FIXED_LEN {
        return Err(Corruption::BadFooter("channel count"));
    }
    Ok(Footer {
        summary,
        table,
        positions,
    })
}

impl<'a> Footer<'a> {
    pub fn channel_count(&self) -> usize {
        self.positions.len() / 8
    }

    /// The i-th entry in path order.
    pub fn entry(&self, i: usize) -> Result<TableEntry<'a>, Corruption> {
        let bad = || Corruption::BadFooter("channel table entry");
        let pos = read_u64(self.positions, i.checked_mul(8).ok_or_else(bad)?).ok_or_else(bad)?;
        let at = usize::try_from(pos).map_err(|_| bad())?;
        let path_len = usize::from(read_u16(self.table, at).ok_or_else(bad)?);
        let path_start = at.checked_add(2).ok_or_else(bad)?;
        let nums = path_start.checked_add(path_len).ok_or_else(bad)?;
        let path_bytes = self.table.get(path_start..nums).ok_or_else(bad)?;
        let path = std::str::from_utf8(path_bytes).map_err(|_| bad())?;
        Ok(TableEntry {
            path,
            first_offset: read_u64(self.table, nums).ok_or_else(bad)?,
            last_offset: read_u64(self.table, nums.checked_add(8).ok_or_else(bad)?)
                .ok_or_else(bad)?,
            count: read_u64(self.table, nums.checked_add(16).ok_or_else(bad)?).ok_or_else(bad)?,
        })
    }

    /// Binary search for a channel's entry.
    pub fn find(&self, path: &str) -> Result<Option<TableEntry<'a>>, Corruption> {
        let (mut lo, mut hi) = (0, self.channel_count());
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let entry = self.entry(mid)?;
            match entry.path.as_bytes().cmp(path.as_bytes()) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => return Ok(Some(entry)),
            }
        }
        Ok(None)
    }

    /// The index of the first entry whose path is not below `path` in byte order.
    pub fn lower_bound(&self, path: &str) -> Result<usize, Corruption> {
        let (mut lo, mut hi) = (0, self.channel_count());
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if self.entry(mid)?.path.as_bytes() < path.as_bytes() {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        Ok(lo)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_is_ieee_unmasked() {
        assert_eq!(crc(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn event_round_trip_and_damage() {
        let mut buf = Vec::new();
        encode_event(&mut buf, 7, 0, "/a/b", b"hello");
        assert_eq!(buf.len(), event_len("/a/b", b"hello"));
        let rec = decode(&buf, 0).unwrap();
        assert_eq!(
            (rec.id, rec.path, rec.data, rec.len),
            (7, "/a/b", &b"hello"[..], buf.len())
        );
        for cut in 0..buf.len() {
            assert!(decode(&buf[..cut], 0).is_err(), "cut at {cut}");
        }
        for bit in 0..buf.len() * 8 {
            let mut bad = buf.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(decode(&bad, 0).is_err(), "bit {bit}");
        }
        assert_eq!(decode(&[0; 40], 0), Err(Corruption::Zeroes));
    }

    #[test]
    fn seal_round_trip() {
        let mut buf = vec![0; 100];
        let entries = [
            TableEntry {
                path: "/a",
                first_offset: 32,
                last_offset: 60,
                count: 2,
            },
            TableEntry {
                path: "/b",
                first_offset: 40,
                last_offset: 40,
                count: 1,
            },
        ];
        let summary = FooterSummary {
            event_count: 3,
            first_id: 1,
            last_id: 3,
            channel_count: 2,
        };
        encode_seal(&mut buf, 100, summary, 60, &entries);
        assert_eq!(decode_trailer(&buf), Some(100));
        let rec = decode(&buf, 100).unwrap();
        assert_eq!(rec.kind, KIND_SEAL);
        let footer = decode_footer(rec.data).unwrap();
        assert_eq!(footer.summary, summary);
        assert_eq!(footer.find("/b").unwrap(), Some(entries[1]));
        assert_eq!(footer.find("/c").unwrap(), None);
        assert_eq!(footer.lower_bound("/a/").unwrap(), 1);
    }

    #[test]
    fn header_round_trip() {
        let mut buf = Vec::new();
        encode_segment_header(&mut buf, 42);
        assert_eq!(decode_segment_header(&buf), Ok(42));
        buf[8] = 2;
        assert!(matches!(
            decode_segment_header(&buf),
            Err((8, Corruption::UnsupportedVersion(_)))
        ));
    }
}
