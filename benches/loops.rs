//! Plain loops for `perf record` (criterion's harness gets in the way of a profile):
//! `cargo bench --bench loops -- append` or `-- verify`. Prints throughput per run.

use ivy::channel::ChannelPath;
use ivy::storage::{verify, Durability, Store, StoreOptions};
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

fn main() {
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
}
