//! Write faults in the engine: a full disk, a read-only directory, descriptors running out, an I/O
//! error. The store runs over a file layer that, once a fault is switched on, fails every write
//! operation with the chosen OS error until it is switched off again, as a full disk does.
//!
//! What must hold: an append whose write failed returns the failure (never Ok); every append that
//! returned Ok is stored exactly; an event whose append failed is not stored once the store has
//! rolled the failed write back; reads keep working during the fault; appends are taken again by
//! themselves after the fault is gone; `verify` is clean afterwards.
//!
//! `IVY_FAULT_CYCLES` sets the randomized test's cycles (default 60); `IVY_TEST_SEED` replays.
//! The black-box versions on a real full tmpfs and a read-only remount are in
//! `tests/server/faults.rs`.

mod common;

use ivy::channel::ChannelPath;
use ivy::event_id::EventId;
use ivy::storage::io::{FileIo, OsIo};
use ivy::storage::{verify, Durability, Error, Query, Store, StoreOptions};
use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicI32, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const ENOSPC: i32 = 28;
const EROFS: i32 = 30;
const EMFILE: i32 = 24;
const EIO: i32 = 5;
const EXDEV: i32 = 18;

/// Once `countdown` operations have passed, fails the operations that `errno` fails on a real
/// system, until cleared: a full disk fails allocations (creating, writing), running out of
/// descriptors fails whatever opens a file, a read-only filesystem or an I/O error fails all.
#[derive(Default)]
struct Faulty {
    errno: AtomicI32,
    /// Operations left before the fault starts; negative: no fault armed.
    countdown: AtomicI64,
    failed_ops: AtomicU64,
}

impl Faulty {
    fn new() -> Arc<Faulty> {
        let f = Faulty::default();
        f.countdown.store(-1, Ordering::SeqCst);
        Arc::new(f)
    }

    fn arm(&self, after_ops: i64, errno: i32) {
        self.errno.store(errno, Ordering::SeqCst);
        self.countdown.store(after_ops, Ordering::SeqCst);
    }

    fn clear(&self) {
        self.countdown.store(-1, Ordering::SeqCst);
    }

    /// Fails the armed operation. The spare filler's own work on `SPARE.tmp` never counts: it
    /// runs beside the writer, paced by it, so counting it would make the positions of a roll's
    /// operations depend on timing (spare faults have their own test, `SpareLayer`).
    fn check(&self, op: Op, path: &Path) -> io::Result<()> {
        if is_named(path, "SPARE.tmp") {
            return Ok(());
        }
        let errno = self.errno.load(Ordering::SeqCst);
        let affected = match errno {
            ENOSPC => matches!(op, Op::Create | Op::Write),
            EMFILE => matches!(op, Op::Create | Op::SyncDir),
            _ => true,
        };
        if !affected {
            return Ok(());
        }
        let left = self.countdown.load(Ordering::SeqCst);
        if left < 0 {
            return Ok(());
        }
        if left > 0 {
            self.countdown.fetch_sub(1, Ordering::SeqCst);
            return Ok(());
        }
        self.failed_ops.fetch_add(1, Ordering::SeqCst);
        Err(io::Error::from_raw_os_error(errno))
    }
}

#[derive(Clone, Copy)]
enum Op {
    Create,
    Write,
    Sync,
    SyncDir,
    Rename,
    Cut,
}

impl FileIo for Faulty {
    fn create(&self, path: &Path) -> io::Result<File> {
        self.check(Op::Create, path)?;
        OsIo.create(path)
    }
    fn write_at(&self, path: &Path, file: &File, offset: u64, bytes: &[u8]) -> io::Result<()> {
        self.check(Op::Write, path)?;
        OsIo.write_at(path, file, offset, bytes)
    }
    fn sync_data(&self, path: &Path, file: &File) -> io::Result<()> {
        self.check(Op::Sync, path)?;
        OsIo.sync_data(path, file)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        self.check(Op::SyncDir, dir)?;
        OsIo.sync_dir(dir)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.check(Op::Rename, from)?;
        OsIo.rename(from, to)
    }
    fn truncate(&self, path: &Path, file: &File, len: u64) -> io::Result<()> {
        self.check(Op::Cut, path)?;
        OsIo.truncate(path, file, len)
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        self.check(Op::Cut, path)?;
        OsIo.remove(path)
    }
}

fn options(io: Arc<dyn FileIo>) -> StoreOptions {
    StoreOptions {
        durability: Durability::Always,
        segment_bytes_max: 4096,
        index_interval_bytes: 256,
        write_retry: Duration::from_millis(20),
        io,
        ..StoreOptions::default()
    }
}

type Events = BTreeMap<EventId, (String, Vec<u8>)>;

fn stored(store: &Store) -> Events {
    store
        .reader(&common::sel("/**"))
        .events(&Query::all())
        .map(|e| {
            let e = e.expect("reads keep working");
            (e.id, (e.path.to_owned(), e.data.to_vec()))
        })
        .collect()
}

/// `Store::heads` is at least the newest event a reader gets, after failed rounds and their
/// rollbacks too: the HTTP answer cache keeps answers while the heads stand still.
fn assert_heads_cover_what_is_read(store: &Store, at: u64) {
    for selector in ["/**", "/p/a", "/p/*", "/q/**", "/"] {
        let newest_read = store
            .reader(&common::sel(selector))
            .events(&Query::all())
            .filter_map(|e| e.ok().map(|e| e.id))
            .max()
            .unwrap_or(EventId(0));
        let heads = store.heads(&common::sel(selector));
        assert!(
            newest_read <= heads.newest,
            "{at}: {selector} reads {newest_read} past its heads {heads:?}"
        );
    }
}

fn assert_verified(dir: &Path) {
    let report = verify::verify(dir, verify::Mode::Check, &|_| {}).expect("verify runs");
    assert!(report.findings.is_empty(), "{:#?}", report.findings);
}

/// Appends until one is taken again, returning its id and how long that took.
fn append_until_taken(store: &Store, path: &ChannelPath, data: &[u8]) -> (EventId, Duration) {
    let start = Instant::now();
    loop {
        match store.append(path, data) {
            Ok(id) => return (id, start.elapsed()),
            Err(Error::WriteFailed(_)) if start.elapsed() < Duration::from_secs(10) => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("appends did not resume: {e}"),
        }
    }
}

#[test]
fn disk_full_refuses_appends_then_resumes_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let layer = Faulty::new();
    let store = Store::open(dir.path(), options(layer.clone())).unwrap();
    let a = common::path("/rooms/a");
    let mut acked = Events::new();
    for n in 0..50 {
        let data = format!("before {n}").into_bytes();
        acked.insert(store.append(&a, &data).unwrap(), ("/rooms/a".into(), data));
    }

    layer.arm(0, ENOSPC);
    let refused = store.append(&a, b"while full").unwrap_err();
    match &refused {
        Error::WriteFailed(f) => {
            assert!(f.no_space, "{f:?}");
            assert!(!f.until_restart, "{f:?}");
            assert!(refused.to_string().contains("No space left"), "{refused}");
        }
        other => panic!("expected a write failure, got {other}"),
    }
    assert!(store.failure().is_some());
    // A second append in the retry pause is refused at once, with the same reason, and a new
    // channel's first event (a new stream and segment) fails as well.
    assert!(matches!(store.append(&a, b"again"), Err(Error::WriteFailed(f)) if f.no_space));
    std::thread::sleep(Duration::from_millis(30));
    assert!(matches!(
        store.append(&common::path("/new/x"), b"new stream"),
        Err(Error::WriteFailed(_))
    ));
    assert_eq!(stored(&store), acked, "reads during the fault");

    layer.clear();
    let (id, waited) = append_until_taken(&store, &a, b"after");
    assert!(waited < Duration::from_secs(2), "resumed after {waited:?}");
    acked.insert(id, ("/rooms/a".into(), b"after".to_vec()));
    let x = store
        .append(&common::path("/new/x"), b"new stream")
        .unwrap();
    acked.insert(x, ("/new/x".into(), b"new stream".to_vec()));
    assert_eq!(stored(&store), acked, "nothing failed is stored");
    assert!(store.totals().write_failures >= 2);
    store.close().unwrap();
    drop(store);

    assert_verified(dir.path());
    let store = Store::open(dir.path(), options(Arc::new(OsIo))).unwrap();
    assert_eq!(stored(&store), acked, "after reopening");
}

/// A fault in the middle of a roll: the seal of a full segment, its index file, or the creation
/// of the next segment fails. Each is rolled back (a seal that completed keeps its events, and
/// their appends return Ok) or, when the cut itself fails (an I/O error), the store waits for a
/// restart and recovery keeps every acknowledged event.
#[test]
fn faults_at_every_operation_of_a_roll() {
    // A full disk fails allocations only: the seal's sync and every cut still work, so every
    // position is undone in place (a seal that completed keeps its events).
    let restarts = roll_faults(ENOSPC, 8);
    assert_eq!(restarts, 0, "disk-full roll faults that needed a restart");
    // An I/O error fails the cut as well: once bytes of the failed round reached the file, the
    // store waits for a restart, and recovery decides from the disk.
    let restarts_eio = roll_faults(EIO, 12);
    eprintln!(
        "roll faults: disk full {restarts} of 8 needed a restart, I/O error {restarts_eio} of 12"
    );
}

/// Fails the `at_op`-th affected operation from the append that rolls a segment, for each
/// position below `positions`; returns how many positions left the store waiting for a restart.
fn roll_faults(errno: i32, positions: usize) -> usize {
    let dir = tempfile::tempdir().unwrap();
    let mut acked = Events::new();
    let a = common::path("/r/a");
    let mut restarts = 0;
    for at_op in 0..positions {
        let layer = Faulty::new();
        let store = Store::open(dir.path(), options(layer.clone())).unwrap();
        // Fill the active segment to just below a roll (four records of ~950 bytes fit in 4096;
        // a fifth rolls), then fail the `at_op`-th operation from the event that rolls it.
        let data = vec![b'x'; 900];
        let append = |acked: &mut Events| {
            let id = store.append(&a, &data).unwrap();
            acked.insert(id, ("/r/a".into(), data.clone()));
        };
        let before = common::segments(dir.path()).len();
        while common::segments(dir.path()).len() == before {
            append(&mut acked);
        }
        for _ in 0..3 {
            append(&mut acked);
        }
        layer.arm(at_op as i64, errno);
        let mut failed = Vec::new();
        for n in 0..8 {
            let d = format!("roll {at_op} {n}").into_bytes();
            match store.append(&a, &[&d[..], &data[..]].concat()) {
                Ok(id) => {
                    acked.insert(id, ("/r/a".into(), [&d[..], &data[..]].concat()));
                }
                Err(Error::WriteFailed(f)) => failed.push(f),
                Err(e) => panic!("{e}"),
            }
        }
        assert!(!failed.is_empty(), "op {at_op}: the fault was never hit");
        layer.clear();
        if store.failure().is_some_and(|f| f.until_restart) {
            assert!(
                failed.iter().any(|f| f.until_restart),
                "op {at_op}: {failed:?}"
            );
            restarts += 1;
            let _ = store.close();
        } else {
            // Before anything else is published: the kept events count in the heads.
            assert_heads_cover_what_is_read(&store, at_op as u64);
            let (id, _) = append_until_taken(&store, &a, b"resumed");
            acked.insert(id, ("/r/a".into(), b"resumed".to_vec()));
            assert_eq!(stored(&store), acked, "op {at_op}: live view");
            store.close().unwrap();
        }
        drop(store);
        let store = Store::open(dir.path(), options(Arc::new(OsIo))).unwrap();
        let now = stored(&store);
        for (id, e) in &acked {
            assert_eq!(now.get(id), Some(e), "op {at_op}: acknowledged {id} lost");
        }
        // After a restart, events whose write reached the disk before the failure may be kept:
        // their appends failed, so neither outcome broke a promise. Count them in.
        acked = now;
        store.close().unwrap();
        drop(store);
        assert_verified(dir.path());
    }
    restarts
}

#[test]
fn random_faults_lose_nothing_acknowledged_and_keep_nothing_failed() {
    let cycles = common::cycles("IVY_FAULT_CYCLES", 60);
    let mut rng = common::Rng(common::seed() | 1);
    let dir = tempfile::tempdir().unwrap();
    let paths = ["/p/a", "/p/b", "/q/c", "/"];
    let errnos = [ENOSPC, EROFS, EMFILE, EIO];
    let mut acked = Events::new();
    let (mut failures, mut restarts) = (0u64, 0u64);
    for cycle in 0..cycles {
        let layer = Faulty::new();
        let store = Store::open(dir.path(), options(layer.clone())).unwrap();
        layer.arm(
            rng.below(60) as i64,
            errnos[rng.below(errnos.len() as u64) as usize],
        );
        let fault_for = Duration::from_millis(rng.below(40));
        let results: Vec<(Events, Vec<Error>)> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..2u64)
                .map(|t| {
                    let store = store.clone();
                    let seed = rng.next();
                    s.spawn(move || {
                        let mut rng = common::Rng(seed | 1);
                        let (mut ok, mut failed) = (Events::new(), Vec::new());
                        for n in 0..150u64 {
                            let (p, data) = rng.event(&paths, &format!("c{cycle}t{t}n{n}"), 300);
                            match store.append(&common::path(p), &data) {
                                Ok(id) => {
                                    ok.insert(id, (p.to_owned(), data));
                                }
                                Err(e @ Error::WriteFailed(_)) => {
                                    failed.push(e);
                                    std::thread::sleep(Duration::from_millis(2));
                                }
                                Err(e) => panic!("cycle {cycle}: unexpected error {e}"),
                            }
                        }
                        (ok, failed)
                    })
                })
                .collect();
            std::thread::sleep(fault_for);
            layer.clear();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        layer.clear();
        let mut needs_restart = false;
        for (ok, failed) in results {
            acked.extend(ok);
            failures += failed.len() as u64;
            needs_restart |= failed
                .iter()
                .any(|e| matches!(e, Error::WriteFailed(f) if f.until_restart));
        }
        if needs_restart {
            restarts += 1;
            let _ = store.close();
        } else {
            assert_heads_cover_what_is_read(&store, cycle);
            let (id, _) = append_until_taken(&store, &common::path("/p/a"), b"probe");
            acked.insert(id, ("/p/a".into(), b"probe".to_vec()));
            assert_eq!(
                stored(&store),
                acked,
                "cycle {cycle}: the store holds exactly the acknowledged events"
            );
            store.close().unwrap();
        }
        drop(store);
        let store = Store::open(dir.path(), options(Arc::new(OsIo))).unwrap();
        let now = stored(&store);
        for (id, e) in &acked {
            assert_eq!(
                now.get(id),
                Some(e),
                "cycle {cycle}: acknowledged {id} lost"
            );
        }
        if !needs_restart {
            assert_eq!(
                now.len(),
                acked.len(),
                "cycle {cycle}: a failed event came back"
            );
        }
        acked = now;
        store.close().unwrap();
        drop(store);
        assert_verified(dir.path());
    }
    eprintln!(
        "{cycles} fault cycles: {} acknowledged, {failures} appends failed, {restarts} restarts needed, 0 lost",
        acked.len()
    );
}

/// What `SpareLayer` does to the making of spare segments; everything else works.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum SpareFault {
    /// Every write to `SPARE.tmp` fails, as on a full disk.
    Fill,
    /// Every rename of `SPARE` into a stream fails, as when the streams are on another filesystem.
    Rename,
    /// That rename takes 30 ms, so that a filler which did not wait for it would finish the next
    /// spare and rename it over `SPARE` first.
    SlowRename,
}

struct SpareLayer {
    fault: SpareFault,
    refused: AtomicU64,
}

impl SpareLayer {
    fn new(fault: SpareFault) -> Arc<SpareLayer> {
        Arc::new(SpareLayer {
            fault,
            refused: AtomicU64::new(0),
        })
    }

    fn refuse(&self, errno: i32) -> io::Result<()> {
        self.refused.fetch_add(1, Ordering::SeqCst);
        Err(io::Error::from_raw_os_error(errno))
    }
}

fn is_named(path: &Path, name: &str) -> bool {
    path.file_name().is_some_and(|n| n == name)
}

impl FileIo for SpareLayer {
    fn create(&self, path: &Path) -> io::Result<File> {
        OsIo.create(path)
    }
    fn write_at(&self, path: &Path, file: &File, offset: u64, bytes: &[u8]) -> io::Result<()> {
        if self.fault == SpareFault::Fill && is_named(path, "SPARE.tmp") {
            return self.refuse(ENOSPC);
        }
        OsIo.write_at(path, file, offset, bytes)
    }
    fn sync_data(&self, path: &Path, file: &File) -> io::Result<()> {
        OsIo.sync_data(path, file)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        OsIo.sync_dir(dir)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        match self.fault {
            SpareFault::Rename if is_named(from, "SPARE") => return self.refuse(EXDEV),
            SpareFault::SlowRename if is_named(from, "SPARE") => {
                std::thread::sleep(Duration::from_millis(30));
            }
            _ => {}
        }
        OsIo.rename(from, to)
    }
    fn truncate(&self, path: &Path, file: &File, len: u64) -> io::Result<()> {
        OsIo.truncate(path, file, len)
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        OsIo.remove(path)
    }
}

/// A spare is an optimisation: when it cannot be filled or renamed into place, segments are
/// created empty, no append fails, and spares stop after the first failure (a filler retrying on
/// a full disk would take the space the writer needs).
#[test]
fn a_spare_that_cannot_be_made_costs_no_append() {
    for fault in [SpareFault::Fill, SpareFault::Rename] {
        let dir = tempfile::tempdir().unwrap();
        let layer = SpareLayer::new(fault);
        let store = Store::open(dir.path(), options(layer.clone())).unwrap();
        let a = common::path("/s/a");
        let mut acked = Events::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while common::segments(dir.path()).len() < 8 || layer.refused.load(Ordering::SeqCst) == 0 {
            assert!(Instant::now() < deadline, "the spare was never tried");
            let data = format!("event {}", acked.len()).into_bytes();
            let id = store
                .append(&a, &data)
                .expect("no append fails for want of a spare");
            acked.insert(id, ("/s/a".into(), data));
            // Give the filler its chance between rolls.
            std::thread::sleep(Duration::from_millis(1));
        }
        let what = format!("{fault:?}");
        assert_eq!(
            layer.refused.load(Ordering::SeqCst),
            1,
            "{what}: tried once"
        );
        assert!(!dir.path().join("SPARE.tmp").exists(), "{what}");
        assert!(!dir.path().join("SPARE").exists(), "{what}");
        assert_eq!(stored(&store), acked, "{what}");
        store.close().unwrap();
        drop(store);
        assert_verified(dir.path());
    }
}

/// The segment the writer writes into is the file it renamed into place, however slow that
/// rename: every acknowledged event is found after a reopen.
#[test]
fn a_slow_spare_rename_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), options(SpareLayer::new(SpareFault::SlowRename))).unwrap();
    let a = common::path("/s/a");
    let mut acked = Events::new();
    while common::segments(dir.path()).len() < 12 {
        let data = format!("event {}", acked.len()).into_bytes();
        let id = store.append(&a, &data).unwrap();
        acked.insert(id, ("/s/a".into(), data));
        // Leave the filler time to have a spare ready at each roll.
        std::thread::sleep(Duration::from_millis(1));
    }
    store.close().unwrap();
    drop(store);
    assert_verified(dir.path());
    let store = Store::open(dir.path(), options(Arc::new(OsIo))).unwrap();
    assert_eq!(stored(&store), acked);
}

/// A write refused outright (a read-only filesystem) in a segment with zeroes written ahead of
/// its records leaves nothing but those zeroes after the committed end: free space, so the
/// rollback has nothing to cut, and appends resume by themselves instead of waiting for a
/// restart (a cut would fail too, on that filesystem).
#[test]
fn a_write_refused_over_zeroes_ahead_needs_no_undo() {
    let dir = tempfile::tempdir().unwrap();
    let layer = Faulty::new();
    let opts = StoreOptions {
        segment_bytes_max: 1 << 20,
        ..options(layer.clone())
    };
    let store = Store::open(dir.path(), opts.clone()).unwrap();
    let a = common::path("/rooms/a");
    let mut acked = Events::new();
    for n in 0..20 {
        let data = format!("before {n}").into_bytes();
        acked.insert(store.append(&a, &data).unwrap(), ("/rooms/a".into(), data));
    }
    let seg = common::segments(dir.path()).pop().unwrap();
    let (records_end, len) = common::records_end_and_len(&seg);
    assert!(len > records_end, "zeroes ahead of the records");

    layer.arm(0, EROFS);
    match store.append(&a, b"refused") {
        Err(Error::WriteFailed(f)) => assert!(!f.until_restart, "{f:?}"),
        other => panic!("expected a write failure, got {other:?}"),
    }
    layer.clear();
    let (id, _) = append_until_taken(&store, &a, b"after");
    acked.insert(id, ("/rooms/a".into(), b"after".to_vec()));
    assert_eq!(stored(&store), acked);
    store.close().unwrap();
    drop(store);
    assert_verified(dir.path());
}
