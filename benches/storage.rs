//! Engine benchmarks (criterion). Sizes can be scaled by environment variables so that a quick
//! run and the goal-sized run use the same code:
//! - `IVY_BENCH_NEIGHBOURS` (default 10,000,000): events written to busy channels around the
//!   quiet one in `last_n_quiet_channel`.
//! - `IVY_BENCH_VERIFY_MB` (default 512): size of the store `verify` checks.
//!
//! Run: `cargo bench --bench storage` (or `-- append` for one group).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ivy::channel::{ChannelPath, Selector};
use ivy::event_id::EventId;
use ivy::storage::{verify, Durability, Query, Store, StoreOptions};
use std::collections::VecDeque;
use std::ops::Bound;
use std::time::{Duration, Instant};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn opts(durability: Durability) -> StoreOptions {
    StoreOptions {
        durability,
        ..StoreOptions::default()
    }
}

/// Appends: one writer with `never` (single calls and batches), and `always` with 1,000 appends
/// in flight from 4 threads (each keeps 250 unacknowledged, waiting on the oldest).
fn append(c: &mut Criterion) {
    let mut group = c.benchmark_group("append");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(8));
    for size in [100usize, 4096] {
        let data = vec![b'x'; size];
        let path = ChannelPath::parse("/bench/a").unwrap();
        let n = if size == 100 { 1_000_000u64 } else { 100_000 };
        group.throughput(Throughput::Elements(n));
        group.bench_function(BenchmarkId::new("never_single", size), |b| {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(dir.path(), opts(Durability::Never)).unwrap();
            b.iter(|| {
                for _ in 0..n {
                    store.append(&path, &data).unwrap();
                }
                store.flush().unwrap();
            });
        });
        group.bench_function(BenchmarkId::new("never_batch1000", size), |b| {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(dir.path(), opts(Durability::Never)).unwrap();
            let batch: Vec<(&ChannelPath, &[u8])> = (0..1000).map(|_| (&path, &data[..])).collect();
            b.iter(|| {
                for _ in 0..n / 1000 {
                    store.append_batch(&batch).unwrap();
                }
                store.flush().unwrap();
            });
        });
        group.bench_function(BenchmarkId::new("always_1000_in_flight", size), |b| {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(dir.path(), opts(Durability::Always)).unwrap();
            b.iter(|| {
                std::thread::scope(|s| {
                    for t in 0..4 {
                        let store = store.clone();
                        let data = &data;
                        s.spawn(move || {
                            let path = ChannelPath::parse(&format!("/bench/t{t}")).unwrap();
                            let mut window = VecDeque::with_capacity(250);
                            for _ in 0..n / 4 {
                                if window.len() == 250 {
                                    store.wait_committed(window.pop_front().unwrap()).unwrap();
                                }
                                window.push_back(store.append_nowait(&path, data).unwrap());
                            }
                            if let Some(last) = window.pop_back() {
                                store.wait_committed(last).unwrap();
                            }
                        });
                    }
                });
            });
        });
    }
    group.finish();
}

/// A store with `neighbours` events on 100 busy channels of stream `/busy` and 1 quiet channel
/// `/busy/quiet` written to every 100,000th event, so the quiet channel's events are spread over
/// the whole log.
fn busy_store(neighbours: u64) -> (tempfile::TempDir, Store, Vec<EventId>) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), opts(Durability::Never)).unwrap();
    let busy: Vec<ChannelPath> = (0..100)
        .map(|i| ChannelPath::parse(&format!("/busy/c{i}")).unwrap())
        .collect();
    let quiet = ChannelPath::parse("/busy/quiet").unwrap();
    let data = [b'b'; 100];
    let mut ids = Vec::new();
    let started = Instant::now();
    let mut written = 0u64;
    while written < neighbours {
        let batch: Vec<(&ChannelPath, &[u8])> = (0..10_000u64)
            .map(|i| (&busy[(i % 100) as usize], &data[..]))
            .collect();
        ids.push(store.append_batch(&batch).unwrap().unwrap());
        store.append(&quiet, b"quiet event").unwrap();
        written += 10_000;
    }
    store.flush().unwrap();
    eprintln!(
        "wrote {neighbours} neighbour events in {:.1?}",
        started.elapsed()
    );
    (dir, store, ids)
}

fn reads(c: &mut Criterion) {
    let neighbours = env_u64("IVY_BENCH_NEIGHBOURS", 10_000_000);
    let (_dir, store, ids) = busy_store(neighbours);
    let mut group = c.benchmark_group("read");
    let quiet = Selector::parse("/busy/quiet").unwrap();
    group.bench_function(BenchmarkId::new("last100_quiet_channel", neighbours), |b| {
        b.iter(|| {
            let reader = store.reader(&quiet);
            let bytes: usize = reader
                .events(&Query::last(100))
                .map(|e| e.unwrap().data.len())
                .sum();
            let n = bytes / b"quiet event".len();
            assert_eq!(n, 100.min((neighbours / 10_000) as usize));
        });
    });
    let busy = Selector::parse("/busy/c7").unwrap();
    group.bench_function(BenchmarkId::new("last100_busy_channel", neighbours), |b| {
        b.iter(|| {
            let reader = store.reader(&busy);
            assert_eq!(reader.events(&Query::last(100)).count(), 100);
        });
    });
    let all = Selector::parse("/busy/**").unwrap();
    let middle = ids[ids.len() / 2];
    group.bench_function(BenchmarkId::new("time_seek_first_10", neighbours), |b| {
        b.iter(|| {
            let reader = store.reader(&all);
            let q = Query {
                start: Bound::Included(middle),
                limit: Some(10),
                ..Query::all()
            };
            assert_eq!(reader.events(&q).count(), 10);
        });
    });
    group.finish();
}

fn verify_throughput(c: &mut Criterion) {
    let mb = env_u64("IVY_BENCH_VERIFY_MB", 512);
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(dir.path(), opts(Durability::Never)).unwrap();
        let paths: Vec<ChannelPath> = (0..1000)
            .map(|i| ChannelPath::parse(&format!("/v/c{i}")).unwrap())
            .collect();
        let data = [b'v'; 100];
        let events = mb * 1_000_000 / 140;
        for chunk in 0..events / 10_000 {
            let batch: Vec<(&ChannelPath, &[u8])> = (0..10_000u64)
                .map(|i| (&paths[((chunk * 10_000 + i) % 1000) as usize], &data[..]))
                .collect();
            store.append_batch(&batch).unwrap();
        }
        store.close().unwrap();
    }
    let bytes: u64 = walk(dir.path())
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    let mut group = c.benchmark_group("verify");
    group.sample_size(10).throughput(Throughput::Bytes(bytes));
    group.bench_function(BenchmarkId::new("warm", mb), |b| {
        b.iter(|| {
            let report = verify::verify(dir.path(), verify::Mode::Check, &|_| {}).unwrap();
            assert!(report.findings.is_empty());
        });
    });
    group.finish();
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let p = entry.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else if p.extension().is_some_and(|e| e == "seg") {
            out.push(p);
        }
    }
    out
}

criterion_group!(benches, append, reads, verify_throughput);
criterion_main!(benches);
