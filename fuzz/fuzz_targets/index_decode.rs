//! Arbitrary bytes as an index file: decoding must not panic, and a decoded file re-encodes to
//! the same bytes.
#![no_main]

use ivy::storage::codec;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    if let Ok(file) = codec::decode_index_file(bytes) {
        let entries: Vec<_> = file.entries().collect();
        let again = codec::encode_index_file(file.segment_first_id, file.interval_bytes, &entries);
        assert_eq!(again, bytes);
    }
});
