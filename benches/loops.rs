//! Plain loops for `perf record` and for whole-process measurements that criterion cannot make
//! (criterion's harness gets in the way of a profile, and of a clean resident-memory reading):
//! - `cargo bench --bench loops -- append`: single appends, events/s;
//! - `-- verify`: verify throughput on a warm ~400 MB store;
//! - `-- reopen`: builds stores of `IVY_REOPEN_GB` (default `1,8`) GB, then opens each in a fresh
//!   child process and reports open time and resident memory;
//! - `-- channels`: resident memory per channel of a live segment (1,000,000 channels).
//! - `-- history`: the storage and wire work of one `ivy-bench history` request (the last 100 of
//!   a channel of 100,000 100-byte events, read and printed as log lines), reads/s.

use ivy::channel::{ChannelPath, Selector};
use ivy::storage::{verify, Durability, Query, Store, StoreOptions};
use ivy::wire::line;
use std::time::Instant;

fn never() -> StoreOptions {
    StoreOptions {
        durability: Durability::Never,
        ..StoreOptions::default()
    }
}

/// 3,000,000 single 100-byte appends from one thread, durability `never`.
fn append_loop() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(dir.path(), never()).expect("open");
    let path = ChannelPath::parse("/bench/a").expect("path");
    let data = [b'x'; 100];
    let started = Instant::now();
    for _ in 0..3_000_000 {
        store.append(&path, &data).expect("append");
    }
    store.flush().expect("flush");
    println!(
        "append: {:.2} M events/s",
        3.0 / started.elapsed().as_secs_f64()
    );
}

/// `verify` five times over a ~400 MB store of 1,000 channels.
fn verify_loop() {
    let dir = tempfile::tempdir().expect("temp dir");
    {
        let store = Store::open(dir.path(), never()).expect("open");
        let paths: Vec<ChannelPath> = (0..1000)
            .map(|i| ChannelPath::parse(&format!("/v/c{i}")).expect("path"))
            .collect();
        let data = [b'v'; 100];
        for chunk in 0..300usize {
            let batch: Vec<(&ChannelPath, &[u8])> = (0..10_000)
                .map(|i| (&paths[(chunk * 10_000 + i) % 1000], &data[..]))
                .collect();
            store.append_batch(&batch).expect("append");
        }
        store.close().expect("close");
    }
    for _ in 0..5 {
        let started = Instant::now();
        let report = verify::verify(dir.path(), verify::Mode::Check, &|_| {}).expect("verify");
        assert!(report.findings.is_empty());
        println!(
            "verify: {:.0} MB/s",
            report.bytes as f64 / started.elapsed().as_secs_f64() / 1e6
        );
    }
}

/// (resident, anonymous resident) memory in KiB: mapped file pages are resident but are the
/// page cache, not memory the process allocated, so the second figure is the one that must not
/// grow with the data held.
fn rss_kib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("RssAnon:"))
}

/// Builds stores of the requested sizes and opens each three times in a child process.
fn reopen_loop() {
    let sizes = std::env::var("IVY_REOPEN_GB").unwrap_or_else(|_| "1,8".into());
    for gb in sizes
        .split(',')
        .filter_map(|s| s.trim().parse::<u64>().ok())
    {
        let dir = tempfile::tempdir().expect("temp dir");
        {
            let store = Store::open(dir.path(), never()).expect("open");
            let paths: Vec<ChannelPath> = (0..1000)
                .map(|i| ChannelPath::parse(&format!("/r/c{i}")).expect("path"))
                .collect();
            let data = [b'r'; 100];
            // Records are 140 bytes on disk; a 64 MiB segment holds 479,348 of them. Every store
            // gets the same 100,000-record live tail, so stores differ only in sealed segments.
            let per_segment = (64 * 1024 * 1024 - 32) / 140;
            let full_segments = gb * 1_000_000_000 / (64 * 1024 * 1024);
            let total = full_segments * per_segment + 100_000;
            let mut written = 0u64;
            while written < total {
                let n = (total - written).min(10_000) as usize;
                let batch: Vec<(&ChannelPath, &[u8])> = (0..n)
                    .map(|i| (&paths[(written as usize + i) % 1000], &data[..]))
                    .collect();
                store.append_batch(&batch).expect("append");
                written += n as u64;
            }
            store.close().expect("close");
        }
        let exe = std::env::current_exe().expect("own path");
        for _ in 0..3 {
            let out = std::process::Command::new(&exe)
                .arg("reopen-child")
                .arg(dir.path())
                .output()
                .expect("child");
            print!("reopen {gb} GB: {}", String::from_utf8_lossy(&out.stdout));
        }
    }
}

fn reopen_child(dir: &str) {
    let started = Instant::now();
    let store = Store::open(dir, never()).expect("open");
    let opened = started.elapsed();
    let after_open = rss_kib();
    let stats = store.stats().expect("stats");
    let segments: usize = stats.iter().map(|s| s.segments).sum();
    let reader = store.reader(&ivy::channel::Selector::parse("/r/c7").expect("selector"));
    let n = reader.events(&ivy::storage::Query::last(100)).count();
    let after_reads = rss_kib();
    println!(
        "open {opened:.2?}, {segments} segments, last-100 read {n}; RSS/anon KiB after open {}/{}, after stats and read {}/{}",
        after_open.0, after_open.1, after_reads.0, after_reads.1
    );
}

/// Resident memory of 1,000,000 channels in one live segment.
fn channels_loop() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(dir.path(), never()).expect("open");
    let paths: Vec<ChannelPath> = (0..1_000_000)
        .map(|i| ChannelPath::parse(&format!("/rooms/r{i:07}")).expect("path"))
        .collect();
    let warm = [(&paths[0], &b"x"[..])];
    store.append_batch(&warm).expect("append");
    store.flush().expect("flush");
    let before = rss_kib().1;
    for chunk in paths.chunks(10_000) {
        let batch: Vec<(&ChannelPath, &[u8])> = chunk.iter().map(|p| (p, &b"x"[..])).collect();
        store.append_batch(&batch).expect("append");
    }
    store.flush().expect("flush");
    let after = rss_kib().1;
    println!(
        "channels: 1,000,000 channels in a live segment: anonymous RSS +{} KiB, {} bytes per channel",
        after - before,
        (after - before) * 1024 / 1_000_000
    );
}

/// Last-100 reads of a channel of 100,000 events, each printed into one answer buffer as the
/// server's HTTP read does (`server/http/read.rs`, `read_inline`).
fn history_loop() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(dir.path(), never()).expect("open");
    let path = ChannelPath::parse("/hist/c").expect("path");
    let data = [b'h'; 100];
    for _ in 0..100 {
        let batch: Vec<(&ChannelPath, &[u8])> = (0..1_000).map(|_| (&path, &data[..])).collect();
        store.append_batch(&batch).expect("append");
    }
    store.flush().expect("flush");
    let selector = Selector::parse("/hist/c").expect("selector");
    // Fewer under callgrind: `IVY_HISTORY_READS=2000 valgrind --tool=callgrind ...`.
    let reads: u32 = std::env::var("IVY_HISTORY_READS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let mut body = Vec::new();
    let started = Instant::now();
    for _ in 0..reads {
        let reader = store.reader(&selector);
        let events: Vec<_> = reader
            .events(&Query::last(100))
            .collect::<Result<_, _>>()
            .expect("read");
        body.clear();
        for e in events.iter().rev() {
            line::format_event(&mut body, e.id, e.path, e.data);
        }
        assert_eq!(events.len(), 100);
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "history: {:.0} last-100 reads/s, {:.2} us each ({} B answers)",
        f64::from(reads) / secs,
        secs * 1e6 / f64::from(reads),
        body.len()
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("reopen-child") {
        reopen_child(args.get(2).map_or(".", String::as_str));
        return;
    }

    let which: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let wants = |name: &str| which.is_empty() || which.iter().any(|w| w == name);
    if wants("append") {
        append_loop();
    }
    if wants("verify") {
        verify_loop();
    }
    if which.iter().any(|w| w == "reopen") {
        reopen_loop();
    }
    if which.iter().any(|w| w == "channels") {
        channels_loop();
    }
    if which.iter().any(|w| w == "history") {
        history_loop();
    }
}
