//! See `ivy::fuzzing::wire_command`.
#![no_main]
libfuzzer_sys::fuzz_target!(|text: &str| ivy::fuzzing::wire_command(text));
