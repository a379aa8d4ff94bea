//! The bodies of the fuzz targets in `fuzz/`, kept in the library so that
//! `tests/fuzz_regressions.rs` replays every input the fuzzers ever found through exactly the
//! same code. Each function must never panic on any input; the assertions inside are the
//! properties the targets check (round trips).

use crate::channel::{ChannelPath, Selector};
use crate::event_id::EventId;
use crate::storage::{codec, Direction, Query, Store, StoreOptions};
use crate::wire::line;
use std::path::Path;

/// Arbitrary bytes as one segment, decoded in memory as readers and recovery do.
pub fn segment_bytes(bytes: &[u8]) {
    let _ = codec::decode_segment_header(bytes);
    let _ = codec::scan_tail(Path::new("fuzz.seg"), bytes, 0);
    let mut at = 32;
    while let Ok(rec) = codec::decode(bytes, at) {
        if rec.kind == codec::KIND_SEAL {
            exercise_footer(rec.data);
            break;
        }
        // A chain link decodes to the same record when its channel is named, and is refused
        // under any other name.
        assert_eq!(codec::decode_event_of(bytes, at, rec.path), Ok(rec));
        let other = if rec.path == "/" { "/a" } else { "/" };
        assert!(codec::decode_event_of(bytes, at, other).is_err());
        at += rec.len;
    }
    // Whatever it is given, a chain decode never yields a record the full decode refuses.
    for at in [32, 60, 100] {
        if let Ok(rec) = codec::decode_event_of(bytes, at, "/a") {
            assert_eq!(codec::decode(bytes, at), Ok(rec));
        }
    }
    if let Some(seal) = codec::decode_trailer(bytes) {
        if let Ok(rec) = codec::decode(bytes, seal) {
            exercise_footer(rec.data);
        }
    }
}

fn exercise_footer(body: &[u8]) {
    if let Ok(footer) = codec::decode_footer(body) {
        for i in 0..footer.channel_count().min(10_000) {
            let _ = footer.entry(i);
        }
        let _ = footer.find("/a");
        let _ = footer.lower_bound("/");
    }
}

const MAGIC: &[u8] = b"\x89IVYSEG\n";

/// Arbitrary bytes as the segments of a stream (split at the second segment magic into an older
/// and a last segment), opened read-only and read through every read path, then verified, then
/// recovered by a writer.
pub fn segment_open(bytes: &[u8]) {
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
    let _ = std::fs::write(
        dir.path().join("IVY"),
        "ivy data directory\nformat 1\nstream_depth 1\n",
    );
    if !older.is_empty() {
        let _ = std::fs::write(stream.join("00000000000000000001.seg"), older);
    }
    let _ = std::fs::write(stream.join("00000000000000000002.seg"), newest);
    if let Ok(store) = Store::open_read_only(dir.path(), StoreOptions::default()) {
        for sel in ["/a", "/a/**", "/a/*"] {
            let Ok(selector) = Selector::parse(sel) else {
                continue;
            };
            let reader = store.reader(&selector);
            for direction in [Direction::Forward, Direction::Backward] {
                let query = Query {
                    direction,
                    limit: Some(1000),
                    ..Query::all()
                };
                for event in reader.events(&query) {
                    if event.is_err() {
                        break;
                    }
                }
            }
        }
        let _ = store.stats();
    }
    let _ =
        crate::storage::verify::verify(dir.path(), crate::storage::verify::Mode::Check, &|_| {});
    recover_and_reopen(dir.path());
}

/// Opens `dir` for writing (recovery may cut a torn tail or remove a segment torn at creation);
/// when that works and an append is taken, what the writer left must open again.
fn recover_and_reopen(dir: &std::path::Path) {
    let opts = || StoreOptions {
        durability: crate::storage::Durability::Never,
        ..StoreOptions::default()
    };
    let Ok(store) = Store::open(dir, opts()) else {
        return;
    };
    let Ok(channel) = crate::channel::ChannelPath::parse("/a/fuzz") else {
        return;
    };
    let appended = store.append(&channel, b"after recovery");
    let closed = store.close();
    drop(store);
    if appended.is_ok() && closed.is_ok() {
        if let Err(e) = Store::open(dir, opts()) {
            panic!("recovered and appended, then could not reopen: {e}");
        }
    }
}

/// Arbitrary bytes as an index file; a decoded file re-encodes to the same bytes.
pub fn index_decode(bytes: &[u8]) {
    if let Ok(file) = codec::decode_index_file(bytes) {
        let entries: Vec<_> = file.entries().collect();
        let again = codec::encode_index_file(file.segment_first_id, file.interval_bytes, &entries);
        assert_eq!(again, bytes);
    }
}

/// Channel paths and selectors: parsed values re-parse to themselves, never name `.`/`..`, and
/// their stream prefixes are their ancestors.
pub fn channel_path(text: &str) {
    assert_eq!(
        ChannelPath::check_exact(text),
        ChannelPath::parse_exact(text).map(|_| ())
    );
    if let Ok(path) = ChannelPath::parse(text) {
        assert_eq!(ChannelPath::parse_exact(path.as_str()).as_ref(), Ok(&path));
        assert!(path.segments().all(|s| s != "." && s != ".."));
        let ancestors: Vec<&str> = path.ancestors().collect();
        for depth in 0..=path.depth() {
            assert!(ancestors.contains(&path.prefix(depth)));
        }
    }
    if let Ok(selector) = Selector::parse(text) {
        assert_eq!(
            Selector::parse(&selector.to_string()).as_ref(),
            Ok(&selector)
        );
    }
}

/// Timestamps: a parsed id formats and parses back to itself.
pub fn event_id(text: &str) {
    if let Ok(id) = EventId::parse(text) {
        assert_eq!(EventId::parse(&id.to_string()), Ok(id));
    }
}

/// Event lines: any data escapes into one UTF-8 line that does not end in '.', and parses back.
pub fn event_line(id: u64, data: &[u8], text: &str) {
    let mut out = Vec::new();
    line::format_event(&mut out, EventId(id), "/a", data);
    let text_line = std::str::from_utf8(&out).expect("lines are UTF-8");
    let body = text_line.strip_suffix('\n').expect("ends in a newline");
    assert!(!body.contains('\n') && !body.contains('\r') && !body.ends_with('.'));
    let parsed = line::parse_line(body).expect("own lines parse");
    assert_eq!(parsed.data, data);
    assert_eq!(parsed.id, Some(EventId(id)));
    let _ = line::parse_line(text);
}

/// One client WebSocket message: never panics; an accepted publish keeps its data byte for byte
/// and its path is a valid channel.
pub fn wire_command(text: &str) {
    match crate::wire::command::parse(text) {
        Ok(message) => {
            if let crate::wire::command::Command::Publish { path, data } = message.command {
                assert!(ChannelPath::parse_exact(path.as_str()).is_ok());
                assert!(text.as_bytes().ends_with(data));
            }
        }
        Err(refused) => {
            let _ = refused.error.to_string();
        }
    }
}

/// HTTP log query strings: never panic; counts that parse are within 1..=1,000,000.
pub fn http_query(text: &str) {
    if let Ok(req) = crate::wire::query::parse(text) {
        for n in [req.n, req.limit].into_iter().flatten() {
            assert!((1..=crate::wire::query::COUNT_MAX).contains(&n));
        }
    }
}

/// A POST body: the first line of the input is the `Content-Type`, the rest the body. Whatever
/// parses must have come from the body (the data is never longer than it).
pub fn post_body(bytes: &[u8]) {
    let split = bytes
        .iter()
        .position(|&b| b == b'\n')
        .unwrap_or(bytes.len());
    let content_type = String::from_utf8_lossy(&bytes[..split]);
    let body = bytes::Bytes::copy_from_slice(bytes.get(split + 1..).unwrap_or(&[]));
    let len = body.len();
    if let Ok(form) = crate::wire::form::parse(&content_type, body) {
        assert!(form.data.len() <= len);
    }
}

/// Bytes as a client's WebSocket stream, through the mask check: the first byte sets a read
/// size, and feeding the rest in reads of that size must end exactly as feeding it whole (the
/// check must never lose its place in a frame at a read boundary).
pub fn ws_mask(bytes: &[u8]) {
    let Some((&size, stream)) = bytes.split_first() else {
        return;
    };
    let mut whole = crate::wire::mask::MaskCheck::default();
    let whole_result = whole.feed(stream);
    let mut split = crate::wire::mask::MaskCheck::default();
    let mut split_result = Ok(());
    for piece in stream.chunks(usize::from(size.max(1))) {
        split_result = split.feed(piece);
    }
    assert_eq!(whole_result, split_result);
    assert_eq!(whole, split);
}
