//! Event lines: escaping any data and parsing the line back gives the same data, the line is
//! one line of UTF-8 that does not end in '.', and parsing arbitrary text never panics.
#![no_main]

use ivy::event_id::EventId;
use ivy::wire::line;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (u64, &[u8], &str)| {
    let (id, data, text) = input;
    let mut out = Vec::new();
    line::format_event(&mut out, EventId(id), "/a", data);
    let text_line = std::str::from_utf8(&out).expect("lines are UTF-8");
    let body = text_line.strip_suffix('\n').expect("ends in a newline");
    assert!(!body.contains('\n') && !body.contains('\r') && !body.ends_with('.'));
    let parsed = line::parse_line(body).expect("own lines parse");
    assert_eq!(parsed.data, data);
    assert_eq!(parsed.id, Some(EventId(id)));
    let _ = line::parse_line(text);
});
