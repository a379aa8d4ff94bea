//! The only place that turns channels and ids into file-system names.
//!
//! ```text
//! DIR/LOCK                          advisory lock: exclusive for a writer, shared for readers
//! DIR/IVY                           store metadata (format, stream depth), text
//! DIR/streams/<stream>/             one directory per stream (channel subtree)
//! DIR/streams/<stream>/<id>.seg     a segment, named by its first id (20 digits, zero-padded)
//! DIR/streams/<stream>/<id>.idx     its sparse index, written when the segment is sealed
//! ```
//! A stream's directory name is its root path with every `/` replaced by `~` (`/` is `~`,
//! `/rooms/a` is `~rooms~a`). `~` is not in the channel alphabet, so the mapping is one to one,
//! and since `ChannelPath` refuses `.`, `..` and every byte outside `[0-9a-z._-]`, no name built
//! here can leave `DIR/streams`.

use crate::channel::ChannelPath;
use crate::event_id::EventId;
use std::path::{Path, PathBuf};

pub const LOCK_FILE: &str = "LOCK";
pub const META_FILE: &str = "IVY";
pub const STREAMS_DIR: &str = "streams";
pub const SEGMENT_EXT: &str = "seg";
pub const INDEX_EXT: &str = "idx";

pub fn streams_dir(root: &Path) -> PathBuf {
    root.join(STREAMS_DIR)
}

pub fn stream_dir_name(stream_root: &ChannelPath) -> String {
    stream_root.as_str().replace('/', "~")
}

/// The stream root named by a directory, or `None` for a name this layout never makes.
pub fn parse_stream_dir_name(name: &str) -> Option<ChannelPath> {
    if !name.starts_with('~') {
        return None;
    }
    let path = name.replace('~', "/");
    let path = if path.len() > 1 {
        path.trim_end_matches('/').to_owned()
    } else {
        path
    };
    let parsed = ChannelPath::parse_exact(&path).ok()?;
    (stream_dir_name(&parsed) == name).then_some(parsed)
}

pub fn segment_file_name(first_id: EventId) -> String {
    format!("{:020}.{SEGMENT_EXT}", first_id.0)
}

pub fn index_path_for(segment_path: &Path) -> PathBuf {
    segment_path.with_extension(INDEX_EXT)
}

/// The first id encoded in a segment file name, or `None` if the name is not one of ours.
pub fn parse_segment_file_name(name: &str) -> Option<EventId> {
    let stem = name.strip_suffix(".seg")?;
    if stem.len() != 20 || !stem.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    stem.parse().ok().map(EventId)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for p in ["/", "/rooms", "/rooms/a.b", "/x/.../y"] {
            let path = ChannelPath::parse(p).unwrap();
            let name = stream_dir_name(&path);
            assert_eq!(parse_stream_dir_name(&name), Some(path));
        }
        assert_eq!(parse_stream_dir_name("rooms"), None);
        assert_eq!(parse_stream_dir_name("~a~"), None);
        assert_eq!(parse_stream_dir_name("~a~~b"), None);
        assert_eq!(parse_stream_dir_name("~.."), None);
        let name = segment_file_name(EventId(42));
        assert_eq!(name, "00000000000000000042.seg");
        assert_eq!(parse_segment_file_name(&name), Some(EventId(42)));
        assert_eq!(parse_segment_file_name("42.seg"), None);
    }
}
