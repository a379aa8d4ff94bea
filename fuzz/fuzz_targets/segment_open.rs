//! Arbitrary bytes as the files of a data directory, opened by the store and read through every
//! read path. The input is split at the second segment magic into an older (sealed) segment and
//! the stream's last one, so real segment pairs make good seeds. Errors are fine; a panic, a hang
//! or an out-of-bounds read is not.
#![no_main]

use ivy::channel::Selector;
use ivy::storage::{Direction, Query, Store, StoreOptions};
use libfuzzer_sys::fuzz_target;

const MAGIC: &[u8] = b"\x89IVYSEG\n";

fuzz_target!(|bytes: &[u8]| {
    let split = bytes
        .windows(MAGIC.len())
        .skip(1)
        .position(|w| w == MAGIC)
        .map_or(0, |p| p + 1);
    let (older, newest) = bytes.split_at(split);
    let Ok(dir) = tempfile::tempdir() else { return };
    let stream = dir.path().join("streams").join("~a");
    if std::fs::create_dir_all(&stream).is_err() {
        return;
    }
    let _ = std::fs::write(dir.path().join("IVY"), "ivy data directory\nformat 1\nstream_depth 1\n");
    if !older.is_empty() {
        let _ = std::fs::write(stream.join("00000000000000000001.seg"), older);
    }
    let _ = std::fs::write(stream.join("00000000000000000002.seg"), newest);
    let Ok(store) = Store::open_read_only(dir.path(), StoreOptions::default()) else { return };
    for sel in ["/a", "/a/**", "/a/*"] {
        let Ok(selector) = Selector::parse(sel) else { continue };
        let reader = store.reader(&selector);
        for direction in [Direction::Forward, Direction::Backward] {
            let query = Query { direction, limit: Some(1000), ..Query::all() };
            for event in reader.events(&query) {
                if event.is_err() {
                    break;
                }
            }
        }
    }
    let _ = store.stats();
    let _ = ivy::storage::verify::verify(dir.path(), ivy::storage::verify::Mode::Check, &|_| {});
});
