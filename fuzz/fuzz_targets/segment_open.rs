//! See `ivy::fuzzing::segment_open`.
#![no_main]
libfuzzer_sys::fuzz_target!(|bytes: &[u8]| ivy::fuzzing::segment_open(bytes));
