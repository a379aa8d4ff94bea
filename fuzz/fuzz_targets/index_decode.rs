//! See `ivy::fuzzing::index_decode`.
#![no_main]
libfuzzer_sys::fuzz_target!(|bytes: &[u8]| ivy::fuzzing::index_decode(bytes));
