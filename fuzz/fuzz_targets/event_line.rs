//! See `ivy::fuzzing::event_line`.
#![no_main]
libfuzzer_sys::fuzz_target!(|input: (u64, &[u8], &str)| ivy::fuzzing::event_line(input.0, input.1, input.2));
