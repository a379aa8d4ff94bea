//! See `ivy::fuzzing::ws_mask`.
#![no_main]
libfuzzer_sys::fuzz_target!(|bytes: &[u8]| ivy::fuzzing::ws_mask(bytes));
