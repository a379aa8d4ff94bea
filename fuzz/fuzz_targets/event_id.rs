//! See `ivy::fuzzing::event_id`.
#![no_main]
libfuzzer_sys::fuzz_target!(|text: &str| ivy::fuzzing::event_id(text));
