//! See `ivy::fuzzing::channel_path`.
#![no_main]
libfuzzer_sys::fuzz_target!(|text: &str| ivy::fuzzing::channel_path(text));
