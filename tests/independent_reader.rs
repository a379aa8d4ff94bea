//! `storage-format.md` promises that it is enough to write an independent reader of a data
//! directory. `independent_reader.py` is one: written from the page alone, in Python, with zlib's
//! CRC. These tests hold the page to that promise: what the reader reads must be what the engine
//! reads (every event, one channel through the seal footers and chains, a time range through the
//! indexes), and the damage it finds must be damage `verify` finds, at the same file and offset.
//! A change to the bytes on disk that the page does not describe fails here. The other way round,
//! what `independent_writer.py` writes from the page alone, the engine must read.
//!
//! CI machines have `python3`; without it these tests fail, saying so.

mod common;

use common::{
    copy_dir, independent_read, lines, path, read, records_end_and_len, segments, verify_findings,
    Rng,
};
use ivy::event_id::EventId;
use ivy::storage::{codec, Durability, Query, Store, StoreOptions};
use std::ops::Bound;
use std::path::{Path, PathBuf};

/// The engine (a read-only store over `dir`) and the independent reader read the same events:
/// every event, each channel in `channels`, and everything from each id in `starts` on; and the
/// reader finds nothing wrong.
fn check_same_reads(dir: &Path, channels: &[&str], starts: &[EventId]) {
    let store = Store::open_read_only(dir, StoreOptions::default()).unwrap();
    let mut cases: Vec<(Vec<String>, String, Query)> =
        vec![(Vec::new(), "/**".to_string(), Query::all())];
    for channel in channels {
        let args = vec!["--channel".to_string(), channel.to_string()];
        cases.push((args, channel.to_string(), Query::all()));
    }
    for start in starts {
        let query = Query {
            start: Bound::Included(*start),
            ..Query::all()
        };
        cases.push((
            vec!["--from".to_string(), start.to_string()],
            "/**".to_string(),
            query,
        ));
    }
    for (args, selector, query) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let expected = read(&store, &selector, &query);
        let got = independent_read(dir, &args);
        assert_eq!(
            (got.status, got.stderr.as_str()),
            (0, ""),
            "reader {args:?} on {}",
            dir.display()
        );
        assert!(
            got.events == lines(&expected),
            "reader {args:?} read otherwise"
        );
    }
}

#[test]
fn it_reads_the_format_1_archive_as_the_engine_does() {
    let copy = tempfile::tempdir().unwrap();
    copy_dir(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/format-1"),
        copy.path(),
    );
    let store = Store::open_read_only(copy.path(), StoreOptions::default()).unwrap();
    let all = read(&store, "/**", &Query::all());
    drop(store);
    let middle = all[80].0;
    check_same_reads(
        copy.path(),
        &[
            "/rooms/a/chat",
            "/sensors/t2",
            "/rooms",
            "/",
            "/nothing/here",
        ],
        &[
            middle,
            EventId(middle.0 + 1),
            all[0].0,
            EventId(all[all.len() - 1].0 .0 + 1),
        ],
    );
}

/// Options for a store with several streams of several segments each, some made from spares,
/// and indexes with several entries per segment.
fn written_options() -> StoreOptions {
    StoreOptions {
        durability: Durability::Never,
        stream_depth: 2,
        segment_bytes_max: 16 * 1024,
        ..StoreOptions::default()
    }
}

const WRITTEN_PATHS: &[&str] = &[
    "/",
    "/a",
    "/a/x",
    "/a/x/deep/er",
    "/b/q",
    "/b/q/r-1.v_2",
    "/c/0123456789012345678901234567890123456789012345678901234567890123",
];

/// Writes a store the way a server does: random channels and data (some of it ending in bytes
/// that look like a seal trailer), segments rolled into spares, a stream whose last event's data
/// is a whole forged seal, and a live segment that ends in free space.
fn write_store(dir: &Path, rng: &mut Rng) -> Vec<EventId> {
    let store = Store::open(dir, written_options()).unwrap();
    let mut ids = Vec::new();
    let mut append = |store: &Store, channel: &str, data: &[u8]| {
        ids.push(store.append(&path(channel), data).unwrap());
    };
    for i in 0..3_000u64 {
        let channel = WRITTEN_PATHS[rng.below(WRITTEN_PATHS.len() as u64) as usize];
        let mut data: Vec<u8> = (0..rng.below(400)).map(|_| rng.next() as u8).collect();
        if i % 97 == 0 {
            data.extend_from_slice(&(i * 13).to_le_bytes());
            data.extend_from_slice(b"IVYSEAL\n");
        }
        append(&store, channel, &data);
    }
    // A new stream, `/f/g`: its last event's data ends the file (once the zeroes after it are
    // cut, below). That data is a seal record with a valid CRC and a trailer pointing at it.
    let (first, second) = ("/f/g", "/f/g/h");
    append(&store, first, b"real");
    let data_at = 32 + ivy::storage::encoded_len(first, b"real") as u64 + 28 + second.len() as u64;
    let summary = codec::FooterSummary {
        event_count: 1,
        first_id: 1,
        last_id: u64::MAX - 1,
        channel_count: 0,
    };
    let mut forged = Vec::new();
    codec::encode_seal(&mut forged, data_at, summary, 32, &[]);
    append(&store, second, &forged);
    // A new stream, `/e/h`, with three events in its live segment.
    for data in [&b"one"[..], b"two", b"three"] {
        append(&store, "/e/h", data);
    }
    // Stream `/b/q` rolls until a roll takes a spare (the first full roll asks for one, ready
    // when the next segment is half full): its live segment then ends in free space.
    let is_spare_made = |dir: &Path| {
        let stream = dir.join("streams/~b~q");
        let last = stream.is_dir().then(|| segments(&stream).pop()).flatten();
        last.and_then(|p| std::fs::metadata(p).ok())
            .map(|m| m.len())
            == Some(16 * 1024)
    };
    for filling in 0.. {
        store.flush().unwrap(); // so that the files show every append made
        if is_spare_made(dir) {
            break;
        }
        assert!(filling < 10_000, "no segment of /b/q was made from a spare");
        append(&store, "/b/q", &[b'q'; 1000]);
    }
    store.close().unwrap();
    drop(store);
    // The writer keeps zeroes a step ahead of a live segment's records; cut them from `/f/g`
    // and `/e/h`, which then end with their last event's data, as a store written with
    // preallocation off (or by a writer that kept no zeroes ahead) leaves them. Neither event's
    // data ends in a zero byte.
    for stream in ["~f~g", "~e~h"] {
        let seg = last_segment(dir, stream);
        let (records_end, len) = records_end_and_len(&seg);
        assert!(records_end < len, "{stream}: zeroes after the records");
        let file = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
        file.set_len(records_end).unwrap();
    }
    ids
}

/// The last segment of stream directory `stream` under `dir`.
fn last_segment(dir: &Path, stream: &str) -> PathBuf {
    segments(&dir.join("streams").join(stream))
        .pop()
        .expect("the stream has segments")
}

#[test]
fn it_reads_what_the_engine_writes() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(common::seed());
    let ids = write_store(dir.path(), &mut rng);
    // What the page's rules must cover is really there.
    let live_bq = std::fs::read(last_segment(dir.path(), "~b~q")).unwrap();
    assert_eq!(live_bq.len(), 16 * 1024, "made from a spare");
    assert_eq!(live_bq.last(), Some(&0), "ends in free space");
    assert!(
        segments(&dir.path().join("streams/~a~x")).len() >= 3,
        "sealed segments with their indexes"
    );
    let mut channels = WRITTEN_PATHS.to_vec();
    channels.extend(["/f/g", "/f/g/h"]);
    let starts = [
        ids[0],
        ids[777],
        EventId(ids[2_222].0 + 1),
        ids[ids.len() - 1],
    ];
    check_same_reads(dir.path(), &channels, &starts);
    assert!(verify_findings(dir.path()).is_empty());
}

#[test]
fn it_finds_the_damage_verify_finds() {
    let written = tempfile::tempdir().unwrap();
    let mut rng = Rng(common::seed());
    write_store(written.path(), &mut rng);
    let relative = |p: PathBuf| p.strip_prefix(written.path()).unwrap().to_path_buf();
    let sealed_rel = relative(segments(&written.path().join("streams/~a~x"))[1].clone());
    // Streams `/e/h` and `/f/g`: one live segment each, ending with its records. The second
    // ends in event data that looks like a seal and a trailer.
    let live_rel = relative(last_segment(written.path(), "~e~h"));
    let forged_rel = relative(last_segment(written.path(), "~f~g"));

    type Damage = Box<dyn Fn(&mut Vec<u8>)>;
    let cut_inside_last_record = |bytes: &mut Vec<u8>| {
        let n = bytes.len();
        bytes.truncate(n - 3);
    };
    let cases: Vec<(&str, &Path, Damage)> = vec![
        (
            "a flipped byte in a sealed segment's first record",
            &sealed_rel,
            Box::new(|bytes: &mut Vec<u8>| bytes[32 + 30] ^= 0x40),
        ),
        (
            "a flipped byte in a sealed segment's seal footer",
            &sealed_rel,
            Box::new(|bytes: &mut Vec<u8>| {
                let n = bytes.len();
                bytes[n - 30] ^= 0x01;
            }),
        ),
        (
            "a flipped byte in a live segment's first record, with records after it",
            &live_rel,
            Box::new(|bytes: &mut Vec<u8>| bytes[32 + 12] ^= 0x01),
        ),
        (
            "a live segment cut inside its last record",
            &live_rel,
            Box::new(cut_inside_last_record),
        ),
        (
            "a live segment cut inside event data that ended like a seal",
            &forged_rel,
            Box::new(cut_inside_last_record),
        ),
        (
            "a flipped byte before event data that ends like a seal (taken as a damaged seal)",
            &forged_rel,
            Box::new(|bytes: &mut Vec<u8>| bytes[32 + 12] ^= 0x01),
        ),
    ];
    for (what, rel, damage) in cases {
        let copy = tempfile::tempdir().unwrap();
        copy_dir(written.path(), copy.path());
        let file = copy.path().join(rel);
        let mut bytes = std::fs::read(&file).unwrap();
        damage(&mut bytes);
        std::fs::write(&file, &bytes).unwrap();

        let got = independent_read(copy.path(), &[]);
        let found = verify_findings(copy.path());
        assert_eq!(got.status, 1, "{what}: {}", got.stderr);
        assert!(!got.problems.is_empty(), "{what}: {}", got.stderr);
        for problem in &got.problems {
            assert!(
                found.contains(problem),
                "{what}: the reader found {problem:?}, verify {found:?}"
            );
        }
        assert_eq!(
            got.problems[0].0,
            rel.to_string_lossy(),
            "{what}: {}",
            got.stderr
        );
        if what.contains("cut") {
            // A torn tail is not read, and everything before it is.
            let store = Store::open_read_only(copy.path(), StoreOptions::default()).unwrap();
            assert!(
                got.events == lines(&read(&store, "/**", &Query::all())),
                "{what}"
            );
        }
    }
}

/// What the page allows, the engine reads: a directory written by `independent_writer.py`, from
/// the page alone, with choices Ivy's own writer never makes (an index entry every 100 bytes,
/// segments cut elsewhere, sealed last segments) verifies clean, reads back exactly (every event,
/// each channel, a range, a channel's last three), reads the same through the independent
/// reader, and takes new appends after it.
#[test]
fn the_engine_reads_what_an_independent_writer_writes() {
    const WRITER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/independent_writer.py");
    let mut rng = Rng(common::seed());
    // Streams `/rooms` and `/sensors` (names ending in `s`) end sealed; `/`, `/a` and `/b` live.
    let paths = [
        "/",
        "/a",
        "/a/x",
        "/b",
        "/rooms/1",
        "/rooms/2/chat",
        "/sensors/t",
    ];
    let mut id = 1_800_000_000_000_000_000u64;
    let mut expected: Vec<(EventId, String, Vec<u8>)> = Vec::new();
    for _ in 0..600 {
        id += 1 + rng.below(3_000_000_000);
        let p = paths[rng.below(paths.len() as u64) as usize];
        let data: Vec<u8> = (0..rng.below(120)).map(|_| rng.next() as u8).collect();
        expected.push((EventId(id), p.to_string(), data));
    }
    let input: String = expected
        .iter()
        .map(|(id, p, data)| {
            let hex: String = data.iter().map(|b| format!("{b:02x}")).collect();
            format!("{} {p} {hex}\n", id.0)
        })
        .collect();
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("written");
    let mut writer = std::process::Command::new("python3")
        .arg(WRITER)
        .arg(&dir)
        .args(["1", "2000", "100"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("python3 is needed to run {WRITER}: {e}"));
    std::io::Write::write_all(&mut writer.stdin.take().unwrap(), input.as_bytes()).unwrap();
    assert!(writer.wait().unwrap().success());

    assert_eq!(verify_findings(&dir), Vec::new());
    let store = Store::open_read_only(&dir, StoreOptions::default()).unwrap();
    assert!(
        read(&store, "/**", &Query::all()) == expected,
        "every event"
    );
    for p in paths {
        let theirs: Vec<_> = expected.iter().filter(|e| e.1 == p).cloned().collect();
        assert!(read(&store, p, &Query::all()) == theirs, "{p}");
        let last: Vec<_> = theirs.iter().rev().take(3).cloned().collect();
        assert!(read(&store, p, &Query::last(3)) == last, "last 3 of {p}");
    }
    let range = Query {
        start: Bound::Included(expected[300].0),
        limit: Some(50),
        ..Query::all()
    };
    assert!(read(&store, "/**", &range) == expected[300..350], "a range");
    drop(store);
    check_same_reads(&dir, &paths, &[expected[300].0]);

    let store = Store::open(&dir, StoreOptions::default()).unwrap();
    for p in ["/rooms/1", "/a"] {
        let id = store.append(&path(p), b"after").unwrap();
        expected.push((id, p.to_string(), b"after".to_vec()));
    }
    store.close().unwrap();
    drop(store);
    assert_eq!(verify_findings(&dir), Vec::new());
    let store = Store::open_read_only(&dir, StoreOptions::default()).unwrap();
    assert!(
        read(&store, "/**", &Query::all()) == expected,
        "with the new events"
    );
}
