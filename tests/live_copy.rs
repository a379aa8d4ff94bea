//! A copy of a data directory taken while the store writes it, file by file as `cp -r` does,
//! is readable offline: sealed segments never change, and a new segment appears only after the
//! one before it was sealed and synced, so at worst the copy's live segments end torn. `ivy
//! verify` may report those torn tails and missing indexes, nothing else; `verify --repair` cuts
//! and rebuilds them; and every event acknowledged before the copy began is in the copy, whole.
//!
//! `IVY_LIVE_COPY_CYCLES` sets the number of copies (default 6); `IVY_TEST_SEED` replays a run.

mod common;

use common::{files, path, read, Rng};
use ivy::storage::{verify, Durability, Query, Store, StoreOptions};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

type Acked = Arc<Mutex<BTreeMap<u64, (String, Vec<u8>)>>>;

/// Copies every file under `from` to `to`, each read in 4 KiB pieces while the store goes on
/// writing, with a pause now and then so that appends, rolls and seals fall inside a file's copy.
fn copy_while_written(from: &Path, to: &Path, rng: &mut Rng) {
    for file in files(from) {
        let Ok(mut source) = std::fs::File::open(&file) else {
            continue; // a spare renamed or an index renamed since the listing
        };
        let dest = to.join(file.strip_prefix(from).unwrap());
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        let mut out = std::fs::File::create(&dest).unwrap();
        let mut piece = [0u8; 4096];
        loop {
            let n = source.read(&mut piece).unwrap();
            if n == 0 {
                break;
            }
            out.write_all(&piece[..n]).unwrap();
            if rng.below(8) == 0 {
                std::thread::sleep(std::time::Duration::from_micros(rng.below(300)));
            }
        }
    }
}

#[test]
fn a_copy_taken_while_the_store_writes_reads_back_after_repair() {
    let cycles = common::cycles("IVY_LIVE_COPY_CYCLES", 6);
    let mut rng = Rng(common::seed());
    let opts = StoreOptions {
        durability: Durability::Always,
        segment_bytes_max: 16 * 1024,
        index_interval_bytes: 512,
        ..StoreOptions::default()
    };
    for cycle in 0..cycles {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path(), opts.clone()).unwrap());
        let acked: Acked = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let writers: Vec<_> = (0..3u64)
            .map(|w| {
                let (store, acked, stop) = (store.clone(), acked.clone(), stop.clone());
                let mut rng = Rng(rng.next() | 1);
                std::thread::spawn(move || {
                    let paths = ["/rooms/a", "/rooms/b", "/sensors/t", "/"];
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let (p, data) = rng.event(&paths, &format!("c{cycle}-w{w}-n{n}"), 300);
                        let id = store.append(&path(p), &data).unwrap();
                        acked.lock().unwrap().insert(id.0, (p.to_string(), data));
                        n += 1;
                    }
                })
            })
            .collect();
        // Let segments roll and a spare be made before the copy begins.
        while acked.lock().unwrap().len() < 600 {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        let before_copy = acked.lock().unwrap().clone();
        let copy = tempfile::tempdir().unwrap();
        copy_while_written(dir.path(), copy.path(), &mut rng);
        stop.store(true, Ordering::Relaxed);
        for w in writers {
            w.join().unwrap();
        }
        store.close().unwrap();

        common::independent_read_agrees(copy.path(), &format!("cycle {cycle}"));
        let report = verify::verify(copy.path(), verify::Mode::Check, &|_| {}).unwrap();
        for f in &report.findings {
            assert!(
                f.problem.contains("torn") || f.problem.contains("index"),
                "cycle {cycle}: a copy may end torn and lack indexes, nothing else: {f:?}"
            );
        }
        let problems: Vec<_> = report.findings.iter().map(|f| &f.problem).collect();
        eprintln!(
            "cycle {cycle}: {} events copied; {problems:?}",
            report.events
        );
        let _lock = ivy::storage::lock_directory(copy.path(), true).unwrap();
        verify::verify(copy.path(), verify::Mode::Repair, &|_| {}).unwrap();
        drop(_lock);
        let left = common::verify_findings(copy.path());
        assert!(left.is_empty(), "cycle {cycle}: {left:?}");

        let copied = Store::open_read_only(copy.path(), opts.clone()).unwrap();
        let events: BTreeMap<u64, (String, Vec<u8>)> = read(&copied, "/**", &Query::all())
            .into_iter()
            .map(|(id, p, data)| (id.0, (p, data)))
            .collect();
        let all = acked.lock().unwrap();
        for (id, event) in &events {
            assert_eq!(
                all.get(id),
                Some(event),
                "cycle {cycle}: id {id} as appended"
            );
        }
        for (id, event) in &before_copy {
            assert_eq!(
                events.get(id),
                Some(event),
                "cycle {cycle}: id {id} acknowledged before the copy"
            );
        }
    }
}

/// The race the loop above meets about once in 300 copies, made on purpose: the copy read the
/// middle of the last segment before the writer got there (zeroes, from a record's start to the
/// end of a 4 KiB piece) and its end after the segment had filled and sealed, so it holds the
/// trailer but not the whole seal record. That segment is live, with a torn tail where the zeroes
/// begin (the format page; recovery reads it so); verify once took it for a damaged sealed
/// segment, which is not torn and which repair leaves alone.
#[test]
fn a_copy_that_caught_the_last_segment_sealing_is_torn_not_corrupt() {
    use ivy::storage::codec;
    let opts = StoreOptions {
        durability: Durability::Never,
        segment_bytes_max: 16 * 1024,
        ..StoreOptions::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), opts.clone()).unwrap();
    let mut n = 0u32;
    let segments = |dir: &Path| -> Vec<std::path::PathBuf> {
        let mut segs: Vec<_> = files(dir)
            .into_iter()
            .filter(|f| f.extension().is_some_and(|e| e == "seg"))
            .collect();
        segs.sort();
        segs
    };
    while segments(dir.path()).len() < 2 {
        store
            .append(
                &path("/rooms/a"),
                format!("event {n} {}", "x".repeat(200)).as_bytes(),
            )
            .unwrap();
        n += 1;
    }
    store.close().unwrap();
    // The copy: the first (sealed) segment is the stream's last, as if the copy was listed
    // before the next one was made (appends are queued, so there may be several by now).
    let copy = tempfile::tempdir().unwrap();
    common::copy_dir(dir.path(), copy.path());
    let segs = segments(copy.path());
    for later in &segs[1..] {
        std::fs::remove_file(later).unwrap();
        let _ = std::fs::remove_file(later.with_extension("idx"));
    }
    let mut bytes = std::fs::read(&segs[0]).unwrap();
    let seal_at = codec::decode_trailer(&bytes).expect("the first segment is sealed");
    // The first record that starts in the third 4 KiB piece (after the 32-byte segment header),
    // and the events before it, which the copy keeps.
    let (mut at, mut kept_events) = (32, 0);
    while at < 8192 {
        at += codec::decode(&bytes, at).unwrap().len;
        kept_events += 1;
    }
    bytes[at..12288].fill(0);
    bytes[seal_at..seal_at + 8].fill(0);
    std::fs::write(&segs[0], &bytes).unwrap();

    let rel = segs[0]
        .strip_prefix(copy.path())
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let found = common::verify_findings(copy.path());
    assert!(
        found.contains(&(rel.clone(), at as u64, true)),
        "a torn tail at {at}: {found:?}"
    );
    assert!(found.iter().all(|(_, _, torn)| *torn), "{found:?}");
    common::independent_read_agrees(copy.path(), "sealing copy");
    let lock = ivy::storage::lock_directory(copy.path(), true).unwrap();
    verify::verify(copy.path(), verify::Mode::Repair, &|_| {}).unwrap();
    drop(lock);
    let left = common::verify_findings(copy.path());
    assert!(left.is_empty(), "{left:?}");
    let copied = Store::open_read_only(copy.path(), opts).unwrap();
    assert_eq!(read(&copied, "/**", &Query::all()).len(), kept_events);
}
