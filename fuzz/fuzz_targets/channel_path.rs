//! Channel paths and read selectors: never panic; a parsed path re-parses to itself, its stream
//! prefixes are its ancestors, and no accepted path can name a parent directory.
#![no_main]

use ivy::channel::{ChannelPath, Selector};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    if let Ok(path) = ChannelPath::parse(text) {
        assert_eq!(ChannelPath::parse_exact(path.as_str()).as_ref(), Ok(&path));
        assert!(path.segments().all(|s| s != "." && s != ".."));
        let ancestors: Vec<&str> = path.ancestors().collect();
        for depth in 0..=path.depth() {
            assert!(ancestors.contains(&path.prefix(depth)));
        }
    }
    if let Ok(selector) = Selector::parse(text) {
        let shown = selector.to_string();
        assert_eq!(Selector::parse(&shown).as_ref(), Ok(&selector));
    }
});
