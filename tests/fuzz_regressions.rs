//! Every input a fuzzer found a crash with, replayed through the same code as its target
//! (`ivy::fuzzing`). Files live in `tests/data/fuzz/<target>/`, named as cargo-fuzz wrote them.

fn inputs(target: &str) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/fuzz")
        .join(target);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut out: Vec<_> = entries
        .flatten()
        .map(|e| (e.path(), std::fs::read(e.path()).unwrap()))
        .collect();
    out.sort();
    out
}

/// `record.rs` added offsets from a channel table without overflow checks; an entry position
/// near `u64::MAX` panicked in debug builds (found by `segment_bytes` in its first run).
#[test]
fn segment_bytes_regressions() {
    let found = inputs("segment_bytes");
    assert!(!found.is_empty());
    for (path, bytes) in found {
        eprintln!("{}", path.display());
        ivy::fuzzing::segment_bytes(&bytes);
        ivy::fuzzing::segment_open(&bytes);
    }
}

/// `index::decode_file` did not check `header_len`, so a file with another value (and a header
/// CRC that matched it) decoded but did not re-encode to itself (found by `index_decode`). Later
/// the same for the reserved header field (the two `crash-1ba0…` and `crash-223f…` inputs).
#[test]
fn index_decode_regressions() {
    let found = inputs("index_decode");
    assert!(!found.is_empty());
    for (_, bytes) in found {
        ivy::fuzzing::index_decode(&bytes);
    }
}

#[test]
fn other_targets_regressions() {
    for (_, bytes) in inputs("segment_open") {
        ivy::fuzzing::segment_open(&bytes);
    }
    for (_, bytes) in inputs("channel_path") {
        ivy::fuzzing::channel_path(&String::from_utf8_lossy(&bytes));
    }
    for (_, bytes) in inputs("wire_command") {
        ivy::fuzzing::wire_command(&String::from_utf8_lossy(&bytes));
    }
    for (_, bytes) in inputs("http_query") {
        ivy::fuzzing::http_query(&String::from_utf8_lossy(&bytes));
    }
    for (_, bytes) in inputs("ws_mask") {
        ivy::fuzzing::ws_mask(&bytes);
    }
}

/// A urlencoded `data` value holding bytes that are not UTF-8 came back longer than it was
/// sent: `form_urlencoded` replaces such bytes with U+FFFD (found by `post_body` in its first
/// minute). Values are now percent-decoded to bytes.
#[test]
fn post_body_regressions() {
    let found = inputs("post_body");
    assert!(!found.is_empty());
    for (_, bytes) in found {
        ivy::fuzzing::post_body(&bytes);
    }
}
