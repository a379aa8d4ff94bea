//! The engine through its public API, on temporary directories.

mod common;

use common::{copy_dir, path, read, records_end_and_len, segments, sel, wait_for_spare};
use ivy::clock::ManualClock;
use ivy::event_id::EventId;
use ivy::storage::{verify, Direction, Durability, Error, Query, Store, StoreOptions};
use std::ops::Bound;
use std::sync::Arc;
use std::time::Duration;

fn small(durability: Durability) -> StoreOptions {
    StoreOptions {
        durability,
        segment_bytes_max: 2048,
        index_interval_bytes: 256,
        ..StoreOptions::default()
    }
}

/// Segments of 1 MiB: a test's appends stay in one.
fn mib_segments(durability: Durability) -> StoreOptions {
    StoreOptions {
        durability,
        segment_bytes_max: 1 << 20,
        ..StoreOptions::default()
    }
}

fn check_clean(dir: &std::path::Path) {
    let report = verify::verify(dir, verify::Mode::Check, &|_| {}).expect("verify runs");
    assert!(report.findings.is_empty(), "{:#?}", report.findings);
}

#[test]
fn round_trip_across_streams_globs_and_subtrees() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), small(Durability::Always)).unwrap();
    let paths = [
        "/rooms/a/chat",
        "/rooms/b/chat",
        "/rooms/a",
        "/logs/x",
        "/",
        "/rooms/b/other",
    ];
    let mut all = Vec::new();
    for i in 0..300 {
        let p = paths[i % paths.len()];
        let data = format!("{i}:{p}").into_bytes();
        let id = store.append(&path(p), &data).unwrap();
        all.push((id, p.to_owned(), data));
    }
    let everything = read(&store, "/**", &Query::all());
    assert_eq!(everything, all);
    let chats: Vec<_> = all
        .iter()
        .filter(|e| e.1.ends_with("/chat"))
        .cloned()
        .collect();
    assert_eq!(read(&store, "/rooms/*/chat", &Query::all()), chats);
    let rooms: Vec<_> = all
        .iter()
        .filter(|e| e.1.starts_with("/rooms"))
        .cloned()
        .collect();
    assert_eq!(read(&store, "/rooms/**", &Query::all()), rooms);
    let root: Vec<_> = all.iter().filter(|e| e.1 == "/").cloned().collect();
    assert_eq!(read(&store, "/", &Query::all()), root);
    let a: Vec<_> = all.iter().filter(|e| e.1 == "/rooms/a").cloned().collect();
    assert_eq!(read(&store, "/rooms/a", &Query::all()), a);

    // Ranges and directions on one channel and on a merge.
    let mid = all[150].0;
    let since: Vec<_> = a.iter().filter(|e| e.0 >= mid).cloned().collect();
    let q = Query {
        start: Bound::Included(mid),
        ..Query::all()
    };
    assert_eq!(read(&store, "/rooms/a", &q), since);
    let q = Query {
        start: Bound::Excluded(all[10].0),
        end: Bound::Included(all[20].0),
        ..Query::all()
    };
    assert_eq!(read(&store, "/**", &q), all[11..=20].to_vec());
    let q = Query {
        end: Bound::Included(all[200].0),
        direction: Direction::Backward,
        limit: Some(7),
        ..Query::all()
    };
    let mut expect: Vec<_> = all[..=200].iter().rev().take(7).cloned().collect();
    assert_eq!(read(&store, "/**", &q), expect);
    expect = a.iter().rev().take(3).cloned().collect();
    assert_eq!(read(&store, "/rooms/a", &Query::last(3)), expect);
    let q = Query {
        start: Bound::Included(EventId(5)),
        end: Bound::Included(EventId(4)),
        ..Query::all()
    };
    assert!(read(&store, "/**", &q).is_empty());
    assert!(
        segments(dir.path()).len() > 6,
        "small segments must have rolled"
    );

    assert_eq!(
        store.children(&path("/rooms")).unwrap(),
        ["/rooms/a", "/rooms/b"]
    );
    assert_eq!(
        store.matching_channels(&sel("/rooms/*/chat")).unwrap(),
        ["/rooms/a/chat", "/rooms/b/chat"]
    );

    store.close().unwrap();
    drop(store);
    check_clean(dir.path());
    let store = Store::open(dir.path(), small(Durability::Always)).unwrap();
    assert_eq!(read(&store, "/**", &Query::all()), all);
    assert_eq!(read(&store, "/rooms/a", &Query::last(3)).len(), 3);
    let next = store.append(&path("/rooms/a"), b"again").unwrap();
    assert!(next > all.last().unwrap().0);
}

#[test]
fn reopen_keeps_every_policy_after_close() {
    for durability in [
        Durability::Always,
        Durability::Never,
        Durability::Interval(Duration::from_millis(5)),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), small(durability)).unwrap();
        let mut ids = Vec::new();
        for i in 0..100u32 {
            ids.push(store.append(&path("/a/b"), &i.to_le_bytes()).unwrap());
        }
        store.close().unwrap();
        drop(store);
        let store = Store::open(dir.path(), small(durability)).unwrap();
        let got = ids_of(&store, "/a/b");
        assert_eq!(got, ids, "{durability:?}");
    }
}

#[test]
fn ids_increase_when_the_clock_stands_still_or_steps_back() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(EventId(1_000)));
    let opts = StoreOptions {
        clock: clock.clone(),
        durability: Durability::Never,
        ..StoreOptions::default()
    };
    let store = Store::open(dir.path(), opts.clone()).unwrap();
    let a = store.append(&path("/x"), b"1").unwrap();
    let b = store.append(&path("/y"), b"2").unwrap();
    clock.set(EventId(10));
    let c = store.append(&path("/x"), b"3").unwrap();
    clock.set(EventId(5_000));
    let d = store.append(&path("/z"), b"4").unwrap();
    assert_eq!(
        [a, b, c, d],
        [
            EventId(1_000),
            EventId(1_001),
            EventId(1_002),
            EventId(5_000)
        ]
    );
    store.close().unwrap();
    drop(store);
    // After a restart with the clock far behind, ids still continue above the stored ones.
    clock.set(EventId(1));
    let store = Store::open(dir.path(), opts).unwrap();
    assert_eq!(store.append(&path("/q"), b"5").unwrap(), EventId(5_001));
}

#[test]
fn a_second_writer_is_refused_and_readers_share() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    assert!(matches!(
        Store::open(dir.path(), StoreOptions::default()),
        Err(Error::Locked(_))
    ));
    assert!(matches!(
        Store::open_read_only(dir.path(), StoreOptions::default()),
        Err(Error::Locked(_))
    ));
    store.close().unwrap();
    drop(store);
    let r1 = Store::open_read_only(dir.path(), StoreOptions::default()).unwrap();
    let _r2 = Store::open_read_only(dir.path(), StoreOptions::default()).unwrap();
    assert!(matches!(
        Store::open(dir.path(), StoreOptions::default()),
        Err(Error::Locked(_))
    ));
    drop(r1);
}

/// Cuts the last record at every byte offset: reopening keeps every earlier event, drops the
/// torn one, logs the cut, and appends continue; verify is clean afterwards.
#[test]
fn torn_tail_at_every_byte_of_the_last_record() {
    let torn = TornTail::new();
    for cut in (torn.full - torn.last_len)..torn.full {
        let (dir, _) = torn.damaged_copy(cut, cut);
        torn.reopen_keeps(dir.path(), 19, &format!("cut at {cut}"));
    }
}

/// A store whose one live segment holds 20 events of `/t/c`, to damage copies of.
struct TornTail {
    base: tempfile::TempDir,
    ids: Vec<EventId>,
    /// Where the segment's records end, and the length of its last record.
    full: u64,
    last_len: u64,
}

impl TornTail {
    fn new() -> TornTail {
        let base = tempfile::tempdir().unwrap();
        let store = Store::open(base.path(), StoreOptions::default()).unwrap();
        let ids = (0..20u32)
            .map(|i| {
                let data = format!("event number {i}");
                store.append(&path("/t/c"), data.as_bytes()).unwrap()
            })
            .collect();
        store.close().unwrap();
        drop(store);
        // Where the records end, not the file: the writer keeps zeroes after them.
        let (full, _) = records_end_and_len(&segments(base.path()).pop().unwrap());
        TornTail {
            base,
            ids,
            full,
            last_len: (28 + "/t/c".len() + "event number 19".len()) as u64,
        }
    }

    /// A copy whose segment keeps its first `cut` bytes, then zeroes up to `len` bytes.
    fn damaged_copy(&self, cut: u64, len: u64) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        copy_dir(self.base.path(), dir.path());
        let seg = segments(dir.path()).pop().unwrap();
        let mut bytes = std::fs::read(&seg).unwrap();
        bytes.truncate(cut as usize);
        bytes.resize(len as usize, 0);
        std::fs::write(&seg, &bytes).unwrap();
        (dir, seg)
    }

    /// Recovery keeps exactly the first `keep` events, appends continue, verify is clean.
    fn reopen_keeps(&self, dir: &std::path::Path, keep: usize, case: &str) {
        let store = Store::open(dir, StoreOptions::default()).unwrap();
        let got = ids_of(&store, "/t/c");
        assert_eq!(got, self.ids[..keep], "{case}");
        let id = store.append(&path("/t/c"), b"after").unwrap();
        assert!(id > self.ids[keep - 1], "{case}");
        store.close().unwrap();
        drop(store);
        check_clean(dir);
    }
}

/// Every single bit flip in a sealed segment or its index is reported by verify.
#[test]
fn every_bit_flip_is_detected_by_verify() {
    let base = tempfile::tempdir().unwrap();
    let opts = StoreOptions {
        durability: Durability::Never,
        segment_bytes_max: 300,
        ..StoreOptions::default()
    };
    let store = Store::open(base.path(), opts).unwrap();
    for i in 0..12u32 {
        let p = if i % 2 == 0 { "/f/a" } else { "/f/b" };
        store
            .append(&path(p), format!("payload {i}").as_bytes())
            .unwrap();
    }
    store.close().unwrap();
    drop(store);
    check_clean(base.path());
    let first_seg = segments(base.path()).remove(0);
    let targets = [first_seg.clone(), first_seg.with_extension("idx")];
    let mut flips = 0;
    for target in &targets {
        let rel = target.strip_prefix(base.path()).unwrap().to_path_buf();
        let len = std::fs::metadata(target).unwrap().len() as usize;
        let dir = tempfile::tempdir().unwrap();
        copy_dir(base.path(), dir.path());
        let victim = dir.path().join(&rel);
        let original = std::fs::read(&victim).unwrap();
        for bit in 0..len * 8 {
            let mut bytes = original.clone();
            bytes[bit / 8] ^= 1 << (bit % 8);
            std::fs::write(&victim, &bytes).unwrap();
            let report = verify::verify(dir.path(), verify::Mode::Check, &|_| {}).unwrap();
            assert!(
                !report.findings.is_empty(),
                "flip of bit {bit} in {} went unnoticed",
                rel.display()
            );
            assert!(
                report.findings.iter().any(|f| f.file == victim),
                "finding names the file"
            );
            flips += 1;
        }
        std::fs::write(&victim, &original).unwrap();
    }
    assert!(flips > 1000);
}

/// Damage inside a sealed segment fails the reads of that range with file and offset; other
/// segments stay readable.
#[test]
fn corruption_in_a_sealed_segment_is_an_error_not_missing_data() {
    let dir = tempfile::tempdir().unwrap();
    let opts = StoreOptions {
        durability: Durability::Never,
        segment_bytes_max: 300,
        ..StoreOptions::default()
    };
    let store = Store::open(dir.path(), opts.clone()).unwrap();
    for i in 0..30u32 {
        store
            .append(&path("/c/x"), format!("payload {i}").as_bytes())
            .unwrap();
    }
    store.close().unwrap();
    drop(store);
    let segs = segments(dir.path());
    let mut bytes = std::fs::read(&segs[0]).unwrap();
    bytes[32 + 30] ^= 0xff; // inside the first record's data
    std::fs::write(&segs[0], &bytes).unwrap();
    let store = Store::open(dir.path(), opts).unwrap();
    let reader = store.reader(&sel("/c/**"));
    let err = reader
        .events(&Query::all())
        .find_map(|e| e.err())
        .expect("an error");
    let text = err.to_string();
    assert!(
        text.contains(&segs[0].file_name().unwrap().to_string_lossy().to_string())
            && text.contains("byte 32"),
        "{text}"
    );
    // The newest events, in later segments, still read.
    assert_eq!(read(&store, "/c/x", &Query::last(3)).len(), 3);
}

/// An event's data may end with anything, including a seal record with a valid CRC and a trailer
/// pointing at it, and in a segment not made from a spare it ends the file. Before, reopening took
/// such a segment for sealed: the store refused to open (the index it rebuilt ran into the
/// event), so one published event could keep a server from starting after a restart; a
/// read-only open failed its reads, and `verify` reported corruption. Data that merely ends in
/// the trailer's magic made `verify` report corruption too.
#[test]
fn an_event_whose_data_looks_like_a_seal_does_not_seal_its_segment() {
    use ivy::storage::codec;
    let opts = StoreOptions {
        durability: Durability::Never,
        preallocate: false,
        ..StoreOptions::default()
    };
    let (first, second) = ("/rooms/a", "/rooms/b");
    // The second record starts after the header and the first; its data after its own header and
    // path. A seal placed at the start of that data claims a last id near the end of time.
    let data_at = 32 + ivy::storage::encoded_len(first, b"real") as u64 + 28 + second.len() as u64;
    let forged_last_id = u64::MAX - 1;
    let mut forged_seal = Vec::new();
    let summary = codec::FooterSummary {
        event_count: 1,
        first_id: 1,
        last_id: forged_last_id,
        channel_count: 0,
    };
    codec::encode_seal(&mut forged_seal, data_at, summary, 32, &[]);
    let mut magic_only = b"ends like a trailer".to_vec();
    magic_only.extend_from_slice(&40u64.to_le_bytes());
    magic_only.extend_from_slice(b"IVYSEAL\n");
    for (what, data) in [
        ("a forged seal", forged_seal),
        ("the magic alone", magic_only),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), opts.clone()).unwrap();
        let a = store.append(&path(first), b"real").unwrap();
        let b = store.append(&path(second), &data).unwrap();
        store.close().unwrap();
        drop(store);
        let expected = vec![
            (a, first.to_string(), b"real".to_vec()),
            (b, second.to_string(), data.clone()),
        ];
        check_clean(dir.path());
        let reader = Store::open_read_only(dir.path(), opts.clone()).unwrap();
        assert_eq!(read(&reader, "/**", &Query::all()), expected, "{what}");
        drop(reader);

        let store = Store::open(dir.path(), opts.clone())
            .unwrap_or_else(|e| panic!("{what}: the store does not open: {e}"));
        assert_eq!(read(&store, "/**", &Query::all()), expected, "{what}");
        let c = store.append(&path(first), b"after").unwrap();
        assert!(b < c && c.0 < forged_last_id, "{what}: {c:?}");
        store.close().unwrap();
        drop(store);
        assert_eq!(
            segments(dir.path()).len(),
            1,
            "{what}: still one live segment"
        );
        check_clean(dir.path());
    }
}

#[test]
fn an_unknown_format_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), small(Durability::Never)).unwrap();
    for i in 0..500u32 {
        store.append(&path("/v"), &i.to_le_bytes()).unwrap();
    }
    store.close().unwrap();
    drop(store);
    let segs = segments(dir.path());
    assert!(segs.len() > 3);
    // The last segment is read at open: the open itself refuses.
    let last = segs.last().unwrap();
    let mut bytes = std::fs::read(last).unwrap();
    bytes[8] = 2;
    std::fs::write(last, &bytes).unwrap();
    let err = Store::open_read_only(dir.path(), small(Durability::Never))
        .err()
        .expect("refused");
    assert!(
        err.to_string().contains("unsupported format version 2"),
        "{err}"
    );
    bytes[8] = 1;
    std::fs::write(last, &bytes).unwrap();
    // An older one is read lazily: the read of its range refuses.
    let seg = segs[0].clone();
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes[8] = 2;
    std::fs::write(&seg, &bytes).unwrap();
    let store = Store::open_read_only(dir.path(), small(Durability::Never)).unwrap();
    let reader = store.reader(&sel("/v"));
    let err = reader
        .events(&Query::all())
        .find_map(|e| e.err())
        .expect("refused");
    assert!(
        err.to_string().contains("unsupported format version 2"),
        "{err}"
    );
}

/// Channels live inside their stream's files: 100,000 channels in one subtree add no files.
#[test]
fn many_channels_do_not_make_many_files() {
    let dir = tempfile::tempdir().unwrap();
    let opts = mib_segments(Durability::Never);
    let store = Store::open(dir.path(), opts.clone()).unwrap();
    let channels: Vec<_> = (0..100_000)
        .map(|i| path(&format!("/rooms/r{i}")))
        .collect();
    let batch: Vec<_> = channels.iter().map(|c| (c, &b"x"[..])).collect();
    store.append_batch(&batch).unwrap();
    store.close().unwrap();
    drop(store);
    let files = common::files(dir.path());
    let segs = segments(dir.path()).len();
    // IVY, LOCK, and per segment a .seg and (sealed) an .idx.
    assert!(files.len() <= 2 + 2 * segs, "{} files", files.len());
    assert!(segs < 10, "{segs} segments");
    let store = Store::open(dir.path(), opts).unwrap();
    assert_eq!(store.children(&path("/rooms")).unwrap().len(), 100_000);
    assert_eq!(read(&store, "/rooms/r99999", &Query::all()).len(), 1);
    assert_eq!(read(&store, "/rooms/r0", &Query::last(1)).len(), 1);
}

#[test]
fn waiting_for_the_tail() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(
        dir.path(),
        StoreOptions {
            durability: Durability::Always,
            ..StoreOptions::default()
        },
    )
    .unwrap();
    let start = store.committed();
    let writer = {
        let store = store.clone();
        std::thread::spawn(move || store.append(&path("/live/x"), b"hi").unwrap())
    };
    let mut seen = start;
    while seen == start {
        seen = store.wait_beyond(start, Duration::from_secs(30));
    }
    let id = writer.join().unwrap();
    assert!(seen >= id);
    let q = Query {
        start: Bound::Excluded(start),
        ..Query::all()
    };
    assert_eq!(read(&store, "/live/**", &q).len(), 1);
}

#[test]
fn stream_depth_two_and_its_persistence() {
    let dir = tempfile::tempdir().unwrap();
    let opts = StoreOptions {
        stream_depth: 2,
        durability: Durability::Never,
        ..StoreOptions::default()
    };
    let store = Store::open(dir.path(), opts).unwrap();
    for p in ["/rooms/a/chat", "/rooms/b/chat", "/rooms", "/"] {
        store.append(&path(p), p.as_bytes()).unwrap();
    }
    store.close().unwrap();
    drop(store);
    let names: Vec<_> = std::fs::read_dir(dir.path().join("streams"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    let mut names = names;
    names.sort();
    assert_eq!(names, ["~", "~rooms", "~rooms~a", "~rooms~b"]);
    // Reopened with the default depth, the stored depth wins.
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    assert_eq!(read(&store, "/rooms/**", &Query::all()).len(), 3);
    assert_eq!(read(&store, "/rooms", &Query::all()).len(), 1);
    store.append(&path("/rooms/a/x"), b"1").unwrap();
    assert_eq!(read(&store, "/rooms/a/**", &Query::all()).len(), 2);
}

#[test]
fn oversized_events_are_refused_before_taking_an_id() {
    let dir = tempfile::tempdir().unwrap();
    let opts = StoreOptions {
        event_bytes_max: 10,
        durability: Durability::Never,
        ..StoreOptions::default()
    };
    let store = Store::open(dir.path(), opts).unwrap();
    assert!(matches!(
        store.append(&path("/a"), &[0; 11]),
        Err(Error::TooLarge { .. })
    ));
    store.append(&path("/a"), &[0; 10]).unwrap();
}

#[test]
fn a_stream_past_the_limit_is_refused_and_the_others_write_on() {
    let dir = tempfile::tempdir().unwrap();
    let opts = StoreOptions {
        streams_max: 2,
        durability: Durability::Always,
        ..StoreOptions::default()
    };
    let store = Store::open(dir.path(), opts.clone()).unwrap();
    let a = store.append(&path("/a/x"), b"a").unwrap();
    let b = store.append(&path("/b"), b"b").unwrap();
    // A third stream is refused before it takes an id or a directory; a new channel inside an
    // existing stream is not a new stream.
    assert!(matches!(
        store.append(&path("/c/y"), b"c"),
        Err(Error::TooManyStreams { max: 2 })
    ));
    let a2 = store.append(&path("/a/new"), b"a2").unwrap();
    // In a batch, what comes before the refused stream is appended, nothing after it.
    let outcome = store.append_batch(&[(&path("/b"), b"b2"), (&path("/d"), b"d")]);
    assert!(
        matches!(outcome, Err(Error::TooManyStreams { .. })),
        "{outcome:?}"
    );
    assert!(!dir.path().join("streams/~c").exists());
    assert!(!dir.path().join("streams/~d").exists());
    // Committed once a later append is (the batch's error came before its wait).
    let b3 = store.append(&path("/b"), b"b3").unwrap();
    let events = read(&store, "/**", &Query::all());
    let data: Vec<_> = events.iter().map(|e| e.2.as_slice()).collect();
    assert_eq!(data, [&b"a"[..], b"b", b"a2", b"b2", b"b3"]);
    let ids: Vec<_> = events.iter().map(|e| e.0).collect();
    assert_eq!([ids[0], ids[1], ids[2], ids[4]], [a, b, a2, b3]);
    drop(store);
    // The limit is on starting streams: a store holding more than it opens, and refuses a new one.
    let store = Store::open(
        dir.path(),
        StoreOptions {
            streams_max: 1,
            ..opts
        },
    )
    .unwrap();
    store.append(&path("/b"), b"b4").unwrap();
    assert!(matches!(
        store.append(&path("/e"), b"e"),
        Err(Error::TooManyStreams { max: 1 })
    ));
    drop(store);
    check_clean(dir.path());
}

/// Many writers on different streams; a tail over all of them must see strictly increasing ids,
/// every event exactly once, whatever order the streams were written in.
/// `writers` threads, each appending `each` events to its path (`path_of(writer)`); each
/// returns the ids it got.
fn spawn_writers(
    store: &Store,
    writers: usize,
    each: usize,
    path_of: impl Fn(usize) -> String,
) -> Vec<std::thread::JoinHandle<Vec<EventId>>> {
    (0..writers)
        .map(|w| {
            let store = store.clone();
            let p = path(&path_of(w));
            std::thread::spawn(move || {
                (0..each)
                    .map(|i| store.append(&p, &i.to_le_bytes()).unwrap())
                    .collect()
            })
        })
        .collect()
}

#[test]
fn a_tail_across_streams_delivers_in_id_order_without_gaps() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(
        dir.path(),
        StoreOptions {
            durability: Durability::Never,
            ..StoreOptions::default()
        },
    )
    .unwrap();
    let mut tail = ivy::storage::Tail::new(store.clone(), sel("/**"), store.committed());
    const WRITERS: usize = 4;
    const EACH: usize = 5_000;
    let writers = spawn_writers(&store, WRITERS, EACH, |w| format!("/w{w}/x"));
    let mut seen: Vec<EventId> = Vec::new();
    while seen.len() < WRITERS * EACH {
        tail.wait(Duration::from_millis(50));
        tail.poll(1000, |e| {
            if let Some(last) = seen.last() {
                assert!(e.id > *last, "{} after {}", e.id, last);
            }
            seen.push(e.id);
        })
        .unwrap();
    }
    let mut written: Vec<EventId> = writers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    written.sort();
    assert_eq!(seen, written);
}

/// Records what the writer reports.
#[derive(Default)]
struct Recorder {
    rounds: parking_lot::Mutex<Vec<(usize, Duration)>>,
    fsyncs: parking_lot::Mutex<Vec<Duration>>,
}

impl ivy::storage::CommitObserver for Recorder {
    fn round(&self, events: usize, took: Duration) {
        self.rounds.lock().push((events, took));
    }
    fn fsync(&self, took: Duration) {
        self.fsyncs.lock().push(took);
    }
}

#[test]
fn the_observer_is_told_every_round_and_every_fsync() {
    let dir = tempfile::tempdir().unwrap();
    // Small segments, so seals (and their syncs) happen along the way.
    let store = Store::open(dir.path(), small(Durability::Always)).unwrap();
    let recorder = Arc::new(Recorder::default());
    assert!(store.observe_commits(Arc::clone(&recorder) as Arc<dyn ivy::storage::CommitObserver>));
    assert!(
        !store.observe_commits(Arc::new(Recorder::default())),
        "a second observer is refused"
    );
    let before = store.totals();
    const WRITERS: usize = 4;
    const EACH: usize = 200;
    for w in spawn_writers(&store, WRITERS, EACH, |w| format!("/w{}/x", w % 2)) {
        w.join().unwrap();
    }
    let after = store.totals();
    let rounds = recorder.rounds.lock().clone();
    assert_eq!(
        rounds.iter().map(|(events, _)| events).sum::<usize>(),
        WRITERS * EACH
    );
    assert_eq!(
        rounds.len() as u64,
        after.commit_rounds - before.commit_rounds
    );
    assert!(
        segments(dir.path()).len() > 2,
        "the test must roll segments"
    );
    assert_eq!(
        recorder.fsyncs.lock().len() as u64,
        after.fsyncs - before.fsyncs
    );
    assert!(rounds.len() as u64 <= after.fsyncs - before.fsyncs);
}

/// The ids stored under `selector`, oldest first.
fn ids_of(store: &Store, selector: &str) -> Vec<EventId> {
    read(store, selector, &Query::all())
        .into_iter()
        .map(|e| e.0)
        .collect()
}

/// Appends to `channel` until the store holds `count` segment files.
fn append_until_segments(store: &Store, channel: &str, count: usize) -> Vec<EventId> {
    let mut ids = Vec::new();
    while segments(store.dir()).len() < count {
        let data = format!("event {} of {channel}", ids.len());
        ids.push(store.append(&path(channel), data.as_bytes()).unwrap());
    }
    ids
}

#[test]
fn a_full_segment_rolls_into_a_zero_filled_spare() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), small(Durability::Always)).unwrap();
    let mut ids = append_until_segments(&store, "/s/a", 2);
    // That roll found no spare and asked for one; the next full roll takes it.
    wait_for_spare(dir.path(), 2048);
    ids.extend(append_until_segments(&store, "/s/a", 3));
    let live = segments(dir.path()).pop().unwrap();
    assert_eq!(
        std::fs::metadata(&live).unwrap().len(),
        2048,
        "the new segment is the spare, written over from its start"
    );
    // Seal the spare-made segment early, with an event too large for what is left of it: the
    // seal must cut the zeroes after its trailer.
    wait_for_spare(dir.path(), 2048);
    ids.push(store.append(&path("/s/a"), &[b'x'; 1990]).unwrap());
    let all = segments(dir.path());
    assert_eq!(all.len(), 4);
    let sealed_len = std::fs::metadata(&all[2]).unwrap().len();
    assert!(sealed_len < 1024, "the seal left {sealed_len} bytes");
    wait_for_spare(dir.path(), 2048);
    ids.extend(append_until_segments(&store, "/s/a", 5));
    let all = segments(dir.path());
    assert_eq!(std::fs::metadata(&all[4]).unwrap().len(), 2048);
    store.close().unwrap();
    drop(store);
    // Every sealed segment ends at its trailer (verify opens each as sealed); the live one's
    // zeroes are free space, neither a finding nor a torn tail.
    check_clean(dir.path());

    let store = Store::open(dir.path(), small(Durability::Always)).unwrap();
    assert_eq!(
        std::fs::metadata(&all[4]).unwrap().len(),
        2048,
        "recovery kept the free space instead of cutting it"
    );
    assert!(
        !dir.path().join("SPARE").exists(),
        "a left-over spare is removed at open"
    );
    // `ivy stats` counts the log, not the free space after it.
    let counted: u64 = store.stats().unwrap().iter().map(|s| s.bytes).sum();
    let on_disk: u64 = all
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    assert!(
        counted < on_disk && counted > on_disk - 2048,
        "{counted} of {on_disk}"
    );
    let got = ids_of(&store, "/s/a");
    assert_eq!(got, ids);
    // Appends go on over the zeroes, and are found after another reopen.
    let after = store.append(&path("/s/a"), b"after reopen").unwrap();
    store.close().unwrap();
    drop(store);
    let store = Store::open_read_only(dir.path(), small(Durability::Always)).unwrap();
    let last = read(&store, "/s/a", &Query::last(1));
    assert_eq!(last[0].0, after);
    assert_eq!(last[0].2, b"after reopen");
    drop(store);
    check_clean(dir.path());
}

/// A segment not made from a spare keeps zeroes a step ahead of its records, so that a commit
/// overwrites instead of extending the file: the file grows once per step, not per append. A
/// cold stream holds no more zeroes than two pages past its records; reopening keeps them as
/// free space and appends go on over them.
#[test]
fn a_live_segment_keeps_zeroes_ahead_of_its_records() {
    let dir = tempfile::tempdir().unwrap();
    let opts = mib_segments(Durability::Always);
    let store = Store::open(dir.path(), opts.clone()).unwrap();
    let mut ids = vec![store.append(&path("/z/a"), b"first").unwrap()];
    let seg = segments(dir.path()).pop().unwrap();
    let (end, len) = records_end_and_len(&seg);
    assert!(end < len && len <= 8192, "{end} bytes of records in {len}");

    let mut lengths = std::collections::BTreeSet::new();
    for i in 0..3000u32 {
        let data = format!("{i:0>96}");
        ids.push(store.append(&path("/z/a"), data.as_bytes()).unwrap());
        lengths.insert(std::fs::metadata(&seg).unwrap().len());
    }
    let (end, len) = records_end_and_len(&seg);
    assert!(end > 350_000, "{end}");
    assert!(
        lengths.len() < 20,
        "3000 appends changed the length {} times: {lengths:?}",
        lengths.len()
    );
    assert!(
        len > end && len - end <= 256 * 1024 + 4096,
        "{} bytes of zeroes after {end} of records",
        len - end
    );
    store.close().unwrap();
    drop(store);
    check_clean(dir.path());

    let store = Store::open(dir.path(), opts).unwrap();
    assert_eq!(
        std::fs::metadata(&seg).unwrap().len(),
        len,
        "recovery kept the zeroes as free space"
    );
    // `ivy stats` counts the records, not the zeroes.
    let counted: u64 = store.stats().unwrap().iter().map(|s| s.bytes).sum();
    assert_eq!(counted, end);
    ids.push(store.append(&path("/z/a"), b"after reopen").unwrap());
    assert_eq!(ids_of(&store, "/z/a"), ids);
    store.close().unwrap();
    drop(store);
    check_clean(dir.path());
}

#[test]
fn no_spare_when_preallocation_is_off() {
    let dir = tempfile::tempdir().unwrap();
    let opts = StoreOptions {
        preallocate: false,
        ..small(Durability::Always)
    };
    let store = Store::open(dir.path(), opts).unwrap();
    append_until_segments(&store, "/s/a", 4);
    assert!(!dir.path().join("SPARE").exists());
    for seg in segments(dir.path()) {
        let len = std::fs::metadata(&seg).unwrap().len();
        assert!(len < 2048 + 200, "{}: {len} bytes", seg.display());
    }
    store.close().unwrap();
}

/// A crash in a segment made from a spare leaves the torn record followed by zeroes up to the end
/// of the file. At every byte of the last record: the earlier events stay, the torn one goes.
#[test]
fn torn_tail_before_free_space_at_every_byte_of_the_last_record() {
    let torn = TornTail::new();
    let (full, last_len) = (torn.full, torn.last_len);
    let file_len = full + 4096;
    for cut in (full - last_len)..=full {
        let (dir, seg) = torn.damaged_copy(cut, file_len);
        let keep = if cut == full { 20 } else { 19 };
        let case = format!("cut at {cut}");
        let recovered_len = {
            let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
            drop(store);
            std::fs::metadata(&seg).unwrap().len()
        };
        let expected_len = match cut {
            // Whole records, then zeroes: free space, kept.
            c if c == full || c == full - last_len => file_len,
            // A part of a record: a torn tail, cut at the end of the last whole record.
            _ => full - last_len,
        };
        assert_eq!(recovered_len, expected_len, "{case}");
        torn.reopen_keeps(dir.path(), keep, &case);
    }
}

/// A spare renamed into place whose header never reached the disk holds nothing: verify reports
/// it as torn at creation, recovery removes it, and every earlier event stays.
#[test]
fn a_spare_whose_header_never_reached_the_disk_is_removed() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), small(Durability::Always)).unwrap();
    let mut ids = append_until_segments(&store, "/s/a", 2);
    store.close().unwrap();
    drop(store);
    let last = segments(dir.path()).pop().unwrap();
    // The last segment holds the roll's one event; as if the crash came before its header and
    // record were durable, it is a spare's zeroes, with a few header bytes at most.
    ids.pop();
    for header_prefix in [0usize, 7] {
        let mut bytes = std::fs::read(&last).unwrap();
        bytes.truncate(header_prefix);
        bytes.resize(2048, 0);
        let case = tempfile::tempdir().unwrap();
        copy_dir(dir.path(), case.path());
        let seg = case.path().join(last.strip_prefix(dir.path()).unwrap());
        std::fs::write(&seg, &bytes).unwrap();
        let report = verify::verify(case.path(), verify::Mode::Check, &|_| {}).unwrap();
        assert_eq!(report.findings.len(), 1, "{:#?}", report.findings);
        assert!(
            report.findings[0].problem.contains("torn at creation"),
            "{:#?}",
            report.findings
        );
        let store = Store::open(case.path(), small(Durability::Always)).unwrap();
        assert!(
            !seg.exists(),
            "prefix {header_prefix}: the empty segment is removed"
        );
        let got = ids_of(&store, "/s/a");
        assert_eq!(got, ids);
        store.append(&path("/s/a"), b"after").unwrap();
        store.close().unwrap();
        drop(store);
        check_clean(case.path());
    }
}

/// `events_in_live_segments` (what the server reads on its async threads) either gives exactly
/// what `events` gives, or ends at a sealed segment and says so; it never opens one.
#[test]
fn reads_of_live_segments_only_are_whole_or_say_they_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), small(Durability::Always)).unwrap();
    let paths = ["/a/x", "/a/y", "/b", "/a/x/deep"];
    let mut ids = Vec::new();
    for i in 0..400 {
        ids.push(
            store
                .append(&path(paths[i % paths.len()]), b"0123456789")
                .unwrap(),
        );
    }
    let last = *ids.last().unwrap();
    let after = |id: EventId| Query {
        start: Bound::Excluded(id),
        ..Query::all()
    };
    let (mut stopped, mut whole_reads) = (0, 0);
    for selector in ["/a/x", "/a/x/deep", "/a/**", "/*/x", "/b", "/**"] {
        for query in [
            Query::all(),
            Query::last(1),
            Query::last(3),
            Query::last(300),
            after(ids[10]),
            after(ids[395]),
            Query {
                direction: Direction::Backward,
                ..after(ids[200])
            },
        ] {
            let reader = store.reader(&sel(selector));
            let mut events = reader.events_in_live_segments(&query);
            let got: Vec<EventId> = events.by_ref().map(|e| e.unwrap().id).collect();
            if events.stopped_at_sealed() {
                stopped += 1;
                continue;
            }
            let whole: Vec<EventId> = read(&store, selector, &query)
                .into_iter()
                .map(|e| e.0)
                .collect();
            assert_eq!(got, whole, "{selector} {query:?}");
            whole_reads += 1;
        }
    }
    // The newest event is always in a live segment; the oldest never is.
    let reader = store.reader(&sel("/a/x/deep"));
    let mut newest = reader.events_in_live_segments(&Query::last(1));
    assert_eq!(newest.next().map(|e| e.unwrap().id), Some(last));
    assert!(!newest.stopped_at_sealed());
    let mut oldest = reader.events_in_live_segments(&Query::all());
    assert!(oldest.next().is_none() && oldest.stopped_at_sealed());
    assert!(
        stopped >= 6,
        "only {stopped} reads reached a sealed segment"
    );
    assert!(
        whole_reads >= 6,
        "only {whole_reads} reads stayed in live segments"
    );
}

/// A store is not created with a stream depth its `IVY` file could not be opened with again.
#[test]
fn a_new_store_refuses_a_stream_depth_outside_1_to_32() {
    for depth in [0, 33] {
        let dir = tempfile::tempdir().unwrap();
        let opts = StoreOptions {
            stream_depth: depth,
            ..StoreOptions::default()
        };
        assert!(
            matches!(Store::open(dir.path(), opts), Err(Error::BadStreamDepth(d)) if d == depth),
            "depth {depth}"
        );
        assert!(!dir.path().join("IVY").exists());
    }
}
