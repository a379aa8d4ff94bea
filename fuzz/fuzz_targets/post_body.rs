//! See `ivy::fuzzing::post_body`.
#![no_main]
libfuzzer_sys::fuzz_target!(|bytes: &[u8]| ivy::fuzzing::post_body(bytes));
