//! Timestamps: never panic, and formatting a parsed id parses back to it.
#![no_main]

use ivy::event_id::EventId;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    if let Ok(id) = EventId::parse(text) {
        assert_eq!(EventId::parse(&id.to_string()), Ok(id));
    }
});
