//! Keeps `storage-format.md` honest: its worked example is decoded by the engine's decoder, and
//! the fields the page names are checked against it. Keeps format-1 archives readable: a data
//! directory written once and committed (`tests/data/format-1/`) must verify clean and read back
//! exactly, and today's writer must still write it byte for byte.

mod common;

use common::{copy_dir, files, path, read};
use ivy::storage::codec;

/// The hex blocks of the page's "Worked example", in order.
fn example_blocks() -> Vec<Vec<u8>> {
    let page =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/storage-format.md")).unwrap();
    let example = page
        .split("## Worked example")
        .nth(1)
        .expect("section exists");
    let mut blocks = Vec::new();
    for block in example.split("```text").skip(1) {
        let body = block.split("```").next().unwrap();
        let mut bytes = Vec::new();
        for line in body.lines().filter(|l| !l.trim().is_empty()) {
            for hex in line.split_whitespace().skip(1) {
                bytes.push(u8::from_str_radix(hex, 16).unwrap());
            }
        }
        blocks.push(bytes);
    }
    blocks
}

#[test]
fn the_worked_example_decodes() {
    let blocks = example_blocks();
    assert_eq!(blocks.len(), 2);
    let seg = &blocks[0];
    assert_eq!(
        codec::decode_segment_header(seg),
        Ok(1_700_000_000_000_000_001)
    );
    let rec = codec::decode(seg, 32).unwrap();
    assert_eq!(rec.kind, codec::KIND_EVENT);
    assert_eq!(rec.id, 0x1797_9CFE_362A_0001);
    assert_eq!(
        (rec.prev, rec.path, rec.data, rec.len),
        (0, "/a", &b"hi"[..], 32)
    );
    assert_eq!(
        u32::from_le_bytes(seg[28..32].try_into().unwrap()),
        0x6EBB_EE91
    );
    assert_eq!(
        u32::from_le_bytes(seg[32..36].try_into().unwrap()),
        0x20A7_B32E
    );
    assert_eq!(crc32fast::hash(&seg[36..64]), 0x20A7_B32E);
    assert_eq!(codec::decode_trailer(seg), None, "the example is live");

    let idx = codec::decode_index_file(&blocks[1]).unwrap();
    assert_eq!(idx.segment_first_id, 1_700_000_000_000_000_001);
    assert_eq!(idx.interval_bytes, 4096);
    let entries: Vec<_> = idx.entries().collect();
    assert_eq!(
        entries,
        [codec::IndexEntry {
            id: 1_700_000_000_000_000_001,
            offset: 32
        }]
    );
}

#[test]
fn the_checksum_is_the_one_named() {
    assert_eq!(crc32fast::hash(b"123456789"), 0xCBF4_3926);
}

/// A sealed segment as the page describes it: trailer, seal record, footer and channel table.
#[test]
fn a_sealed_segment_matches_the_page() {
    let mut seg = Vec::new();
    codec::encode_segment_header(&mut seg, 10);
    codec::encode_event(&mut seg, 10, 0, "/b", b"one");
    let second = seg.len() as u64;
    codec::encode_event(&mut seg, 11, 0, "/a", b"two");
    let third = seg.len() as u64;
    codec::encode_event(&mut seg, 12, 32, "/b", b"three");
    let seal_at = seg.len() as u64;
    let entries = [
        codec::TableEntry {
            path: "/a",
            first_offset: second,
            last_offset: second,
            count: 1,
        },
        codec::TableEntry {
            path: "/b",
            first_offset: 32,
            last_offset: third,
            count: 2,
        },
    ];
    let summary = codec::FooterSummary {
        event_count: 3,
        first_id: 10,
        last_id: 12,
        channel_count: 2,
    };
    codec::encode_seal(&mut seg, seal_at, summary, third, &entries);
    let n = seg.len();
    assert_eq!(&seg[n - 8..], b"IVYSEAL\n");
    assert_eq!(
        u64::from_le_bytes(seg[n - 16..n - 8].try_into().unwrap()),
        seal_at
    );
    let seal = codec::decode(&seg, seal_at as usize).unwrap();
    assert_eq!(
        (seal.kind, seal.id, seal.prev, seal.path),
        (codec::KIND_SEAL, 12, third, "")
    );
    assert_eq!(seal_at as usize + seal.len + 16, n);
    let footer = codec::decode_footer(seal.data).unwrap();
    assert_eq!(footer.summary, summary);
    // Fixed part: version 1, flags 0, then the table length at byte 40.
    assert_eq!(&seal.data[..8], &[1, 0, 0, 0, 0, 0, 0, 0]);
    let table_len = u64::from_le_bytes(seal.data[40..48].try_into().unwrap()) as usize;
    assert_eq!(seal.data.len(), 48 + table_len + 8 * 2);
    assert_eq!(footer.find("/b").unwrap(), Some(entries[1]));
    // The chain of /b: from its last record back to its first.
    let last = codec::decode(&seg, third as usize).unwrap();
    assert_eq!((last.path, last.prev), ("/b", 32));
}

/// "Finding the end of valid data": the example segment followed by zeroes to the end of the file
/// ends in free space (kept), and the same zeroes with one nonzero byte after them are a torn tail.
#[test]
fn zeroes_to_the_end_are_free_space_and_anything_after_them_is_torn() {
    let example = &example_blocks()[0];
    let path = std::path::Path::new("example.seg");
    let mut spare_made = example.clone();
    spare_made.resize(4096, 0);
    let scan = codec::scan_tail(path, &spare_made, 0).unwrap();
    assert_eq!((scan.valid_end, scan.events), (64, 1));
    assert!(scan.is_free_after && !scan.is_torn());

    let mut torn = spare_made.clone();
    torn[4000] = 1;
    let scan = codec::scan_tail(path, &torn, 0).unwrap();
    assert_eq!((scan.valid_end, scan.events), (64, 1));
    assert!(scan.is_torn());

    let scan = codec::scan_tail(path, example, 0).unwrap();
    assert_eq!(scan.valid_end, scan.file_len, "ends at the end of the file");
    assert!(!scan.is_torn());
}

// A format-1 archive, kept in `tests/data/format-1/`: a data directory written once and committed,
// so that a change which would leave yesterday's archives unreadable, or misread, fails here,
// whatever the page and the code say by then.

/// Where the committed archive lives.
fn archive_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/format-1")
}

/// The archive's options: small segments and a dense index, so that it holds sealed segments,
/// index files with several entries and a live segment in each stream, in a few kilobytes.
fn archive_options() -> ivy::storage::StoreOptions {
    ivy::storage::StoreOptions {
        durability: ivy::storage::Durability::Never,
        stream_depth: 1,
        segment_bytes_max: 1024,
        index_interval_bytes: 128,
        preallocate: false,
        ..ivy::storage::StoreOptions::default()
    }
}

/// The archive's events, with fixed ids so that its files are the same on every run: data that
/// every escape and decode path must carry whole, then readings that fill several segments of
/// three streams (`/rooms`, `/sensors`, `/`), interleaved, at uneven gaps.
fn archive_events() -> Vec<(ivy::event_id::EventId, String, Vec<u8>)> {
    let mut events = Vec::new();
    let mut id = 1_800_000_000_000_000_000u64;
    let mut push = |path: &str, data: Vec<u8>, gap: u64| {
        id += gap;
        events.push((ivy::event_id::EventId(id), path.to_string(), data));
    };
    for data in [
        b"hello".to_vec(),
        b"50% done\r\nnext line".to_vec(),
        b"ends in a dot.".to_vec(),
        vec![0xff, 0xfe, b'o', b'k'],
        Vec::new(),
        "\u{e9} \u{2713}".as_bytes().to_vec(),
        vec![b'L'; 600],
    ] {
        push("/rooms/a/chat", data, 1_000);
    }
    for i in 0..150u64 {
        let path = ["/sensors/t1", "/sensors/t2", "/rooms/b", "/", "/rooms"][(i % 5) as usize];
        push(
            path,
            format!("reading {i}").into_bytes(),
            1 + i * 7_919_000_003 % 1_000_000_000,
        );
    }
    events
}

/// Writes the archive's events into a new store at `dir`.
fn write_archive(dir: &std::path::Path) {
    let store = ivy::storage::Store::open(dir, archive_options()).unwrap();
    for (id, p, data) in archive_events() {
        store.append_with_ids(&[(id, &path(&p), &data)]).unwrap();
    }
    store.close().unwrap();
}

/// Every file under `dir` but the lock, by relative path, with its bytes.
fn files_of(dir: &std::path::Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    files(dir)
        .into_iter()
        .filter(|p| p.file_name().is_some_and(|n| n != "LOCK"))
        .map(|p| {
            let name = p.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).unwrap())
        })
        .collect()
}

/// A copy of the committed archive in a new temporary directory (opening it takes its lock).
fn archive_copy() -> tempfile::TempDir {
    let copy = tempfile::tempdir().unwrap();
    copy_dir(&archive_dir(), copy.path());
    copy
}

/// The committed archive verifies clean and reads back exactly as written: every event in id
/// order, one channel's last few through its chain, a subtree, and a time range found through
/// the sealed segments' indexes. This test is never to be "regenerated": a failure means that a
/// change broke format-1 archives.
#[test]
fn a_format_1_archive_reads_back_as_written() {
    use ivy::storage::{verify, Query, Store};
    use std::ops::Bound;
    let copy = archive_copy();
    {
        let _lock = ivy::storage::lock_directory(copy.path(), false).unwrap();
        let report = verify::verify(copy.path(), verify::Mode::Check, &|_| {}).unwrap();
        assert!(report.is_clean(), "{:?}", report.findings);
        assert_eq!(report.events, archive_events().len() as u64);
        // Sealed segments, with their indexes, and a live one in each of the three streams.
        assert!(report.segments >= 9, "{} segments", report.segments);
    }
    let expected = archive_events();
    let store = Store::open_read_only(copy.path(), archive_options()).unwrap();
    assert_eq!(read(&store, "/**", &Query::all()), expected);
    let matching = |keep: &dyn Fn(&str) -> bool| -> Vec<_> {
        expected.iter().filter(|e| keep(&e.1)).cloned().collect()
    };
    let chat = matching(&|p| p == "/rooms/a/chat");
    assert_eq!(read(&store, "/rooms/a/chat", &Query::all()), chat);
    let last_three: Vec<_> = matching(&|p| p == "/sensors/t2")
        .into_iter()
        .rev()
        .take(3)
        .collect();
    assert_eq!(read(&store, "/sensors/t2", &Query::last(3)), last_three);
    let subtree = matching(&|p| p.starts_with("/rooms"));
    assert_eq!(read(&store, "/rooms/**", &Query::all()), subtree);
    let sensors = matching(&|p| p.starts_with("/sensors/"));
    assert_eq!(read(&store, "/sensors/*", &Query::all()), sensors);
    let middle = expected[80].0;
    let range = Query {
        start: Bound::Included(middle),
        limit: Some(10),
        ..Query::all()
    };
    assert_eq!(read(&store, "/**", &range), expected[80..90].to_vec());
    drop(store);
    // Opened for writing, it keeps every event and takes new ones after them.
    let store = Store::open(copy.path(), archive_options()).unwrap();
    let after = ivy::event_id::EventId(expected.last().unwrap().0 .0 + 1);
    store
        .append_with_ids(&[(after, &path("/rooms/a/chat"), b"later")])
        .unwrap();
    store.close().unwrap();
    drop(store);
    let store = Store::open_read_only(copy.path(), archive_options()).unwrap();
    let mut more = expected.clone();
    more.push((after, "/rooms/a/chat".into(), b"later".to_vec()));
    assert_eq!(read(&store, "/**", &Query::all()), more);
}

/// Today's writer, given the archive's events, writes the archive's bytes. When it does not, the
/// on-disk format changed: if a format-1 reader could misread the new bytes, bump the version
/// (`storage-format.md`, "Versioning") and keep reading version 1 (the test above must still
/// pass). Then, and only then, rewrite the archive with
/// `IVY_WRITE_FORMAT_1_ARCHIVE=1 cargo test --test storage_format` and commit it.
#[test]
fn the_writer_still_writes_the_format_1_archive_byte_for_byte() {
    let fresh = tempfile::tempdir().unwrap();
    write_archive(fresh.path());
    let written = files_of(fresh.path());
    if std::env::var_os("IVY_WRITE_FORMAT_1_ARCHIVE").is_some() {
        let _ = std::fs::remove_dir_all(archive_dir());
        for (name, bytes) in &written {
            let to = archive_dir().join(name);
            std::fs::create_dir_all(to.parent().unwrap()).unwrap();
            std::fs::write(to, bytes).unwrap();
        }
    }
    let committed = files_of(&archive_dir());
    assert_eq!(
        written.keys().collect::<Vec<_>>(),
        committed.keys().collect::<Vec<_>>(),
        "the archive's files"
    );
    for (name, bytes) in &written {
        let at = bytes
            .iter()
            .zip(&committed[name])
            .position(|(a, b)| a != b)
            .or((bytes.len() != committed[name].len())
                .then_some(bytes.len().min(committed[name].len())));
        assert_eq!(
            at, None,
            "{name} differs from the committed archive at byte {at:?}"
        );
    }
}
