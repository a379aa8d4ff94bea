//! Arbitrary bytes as a segment, decoded in memory the way readers and recovery do: header,
//! records back to back, trailer, seal footer and its channel table, and the tail scan. Must never
//! panic or read out of bounds.
#![no_main]

use ivy::storage::codec;
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|bytes: &[u8]| {
    let _ = codec::decode_segment_header(bytes);
    let _ = codec::scan_tail(Path::new("fuzz.seg"), bytes, 0);
    let mut at = 32;
    while let Ok(rec) = codec::decode(bytes, at) {
        if rec.kind == codec::KIND_SEAL {
            if let Ok(footer) = codec::decode_footer(rec.data) {
                for i in 0..footer.channel_count().min(10_000) {
                    let _ = footer.entry(i);
                }
                let _ = footer.find("/a");
                let _ = footer.lower_bound("/");
            }
            break;
        }
        at += rec.len;
    }
    if let Some(seal) = codec::decode_trailer(bytes) {
        if let Ok(rec) = codec::decode(bytes, seal) {
            let _ = codec::decode_footer(rec.data);
        }
    }
});
