//! Keeps `storage-format.md` honest: its worked example is decoded by the engine's decoder, and
//! the fields the page names are checked against it.

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
