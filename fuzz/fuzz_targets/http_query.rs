//! See `ivy::fuzzing::http_query`.
#![no_main]
libfuzzer_sys::fuzz_target!(|text: &str| ivy::fuzzing::http_query(text));
