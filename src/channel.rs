//! Channel paths, globs and read selectors.
//!
//! A `ChannelPath` is `/` or `/seg/seg/...` where a segment is 1..=64 bytes of `[0-9a-z._-]`,
//! other than `.` and `..`; the whole path is at most 255 bytes and 32 segments deep (protocol
//! page, "Channels"). A value of this type has passed those checks, so code below it (the
//! storage layout in particular) may rely on them: no path built from a channel can escape the
//! data directory.
//!
//! A `Selector` is what a read asks for: one channel, a `*` glob (`/rooms/*/chat`) or a subtree
//! (`/rooms/**`: the channel and everything below it).

use compact_str::CompactString;
use std::fmt;

pub const PATH_BYTES_MAX: usize = 255;
pub const SEGMENT_BYTES_MAX: usize = 64;
pub const DEPTH_MAX: usize = 32;

/// A checked channel path, normalised (leading `/`, no trailing `/` except the root). Held
/// inline up to 24 bytes, as most paths are: every publish parses one, and the allocation and
/// free of a boxed copy were 5% of the server's CPU under `ivy-bench publish`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ChannelPath(CompactString);

/// Why a path, glob or selector was refused; the text is the one-line reason a client sees.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("invalid path: longer than 255 bytes")]
    TooLong,
    #[error("invalid path: deeper than 32 segments")]
    TooDeep,
    #[error("invalid path: empty segment")]
    EmptySegment,
    #[error("invalid path: segment longer than 64 bytes")]
    SegmentTooLong,
    #[error("invalid path: '.' and '..' are not channel names")]
    DotSegment,
    #[error("invalid path: byte {0:#04x} is not one of [0-9a-z._-/]")]
    BadByte(u8),
    #[error("invalid glob path")]
    InvalidGlob,
}

const fn is_segment_byte(b: u8) -> bool {
    b.is_ascii_digit() || b.is_ascii_lowercase() || matches!(b, b'.' | b'_' | b'-')
}

/// Trims white space, adds a missing leading `/`, removes one trailing `/` (protocol page,
/// "Normalisation"). Returns the normalised text, which may still be invalid.
fn normalise(text: &str) -> String {
    let trimmed = text.trim();
    let mut out = String::with_capacity(trimmed.len() + 1);
    if !trimmed.starts_with('/') {
        out.push('/');
    }
    out.push_str(trimmed);
    if out.len() > 1 && out.ends_with('/') {
        out.pop();
    }
    out
}

/// Checks one segment; `*` is allowed only when `allow_star` and only as the whole segment.
fn check_segment(seg: &str, allow_star: bool) -> Result<(), PathError> {
    if seg.is_empty() {
        return Err(PathError::EmptySegment);
    }
    if seg == "*" && allow_star {
        return Ok(());
    }
    if seg.contains('*') {
        return Err(if allow_star {
            PathError::InvalidGlob
        } else {
            PathError::BadByte(b'*')
        });
    }
    if seg.len() > SEGMENT_BYTES_MAX {
        return Err(PathError::SegmentTooLong);
    }
    if seg == "." || seg == ".." {
        return Err(PathError::DotSegment);
    }
    match seg.bytes().find(|b| !is_segment_byte(*b)) {
        Some(b) => Err(PathError::BadByte(b)),
        None => Ok(()),
    }
}

/// One pass over a path without `*`: true exactly when the slow check below accepts it. Every
/// stored record's path is checked when it is decoded, so this is on the read path.
fn is_valid_plain(path: &[u8]) -> bool {
    let Some((&b'/', rest)) = path.split_first() else {
        return false;
    };
    if rest.is_empty() {
        return true;
    }
    if path.len() > PATH_BYTES_MAX {
        return false;
    }
    // A segment is fine when it is 1..=64 bytes and not `.` or `..` (all dots, at most two).
    let is_good_segment = |seg_len: usize, dots: usize| {
        seg_len > 0 && seg_len <= SEGMENT_BYTES_MAX && (seg_len != dots || dots > 2)
    };
    let (mut depth, mut seg_len, mut dots) = (0usize, 0usize, 0usize);
    // A plain loop and a table, not an iterator chain: this runs on every record a log read
    // decodes, and callgrind counted about 320 instructions per 14-byte path for the chained
    // form, about 180 for this one.
    for &b in rest {
        if b == b'/' {
            if !is_good_segment(seg_len, dots) {
                return false;
            }
            depth += 1;
            (seg_len, dots) = (0, 0);
        } else if SEGMENT_BYTES[usize::from(b)] {
            seg_len += 1;
            dots += usize::from(b == b'.');
        } else {
            return false;
        }
    }
    is_good_segment(seg_len, dots) && depth < DEPTH_MAX
}

/// `is_segment_byte` for every byte value.
const SEGMENT_BYTES: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        table[b] = is_segment_byte(b as u8);
        b += 1;
    }
    table
};

/// Checks an already normalised path; `allow_star` admits whole-segment `*`.
fn check_normalised(path: &str, allow_star: bool) -> Result<(), PathError> {
    if !allow_star && is_valid_plain(path.as_bytes()) {
        return Ok(());
    }
    if path.len() > PATH_BYTES_MAX {
        return Err(PathError::TooLong);
    }
    if path == "/" {
        return Ok(());
    }
    let rest = path.strip_prefix('/').ok_or(PathError::EmptySegment)?;
    let mut depth = 0;
    for seg in rest.split('/') {
        depth += 1;
        if depth > DEPTH_MAX {
            return Err(PathError::TooDeep);
        }
        check_segment(seg, allow_star)?;
    }
    Ok(())
}

impl ChannelPath {
    /// The root channel `/`.
    pub fn root() -> ChannelPath {
        ChannelPath("/".into())
    }

    /// Normalises and checks a path that is written to (or read as one channel).
    pub fn parse(text: &str) -> Result<ChannelPath, PathError> {
        // Most paths arrive already normal (every publish names one): check and copy once.
        if is_valid_plain(text.as_bytes()) && (text == "/" || !text.ends_with('/')) {
            return Ok(ChannelPath(text.into()));
        }
        let path = normalise(text);
        check_normalised(&path, false)?;
        Ok(ChannelPath(path.into()))
    }

    /// Checks a path that must already be in normal form, byte for byte (as stored on disk).
    pub fn parse_exact(text: &str) -> Result<ChannelPath, PathError> {
        ChannelPath::check_exact(text)?;
        Ok(ChannelPath(text.into()))
    }

    /// `parse_exact` without the copy: for checking every record a log read decodes.
    pub fn check_exact(text: &str) -> Result<(), PathError> {
        if text.len() > 1 && text.ends_with('/') {
            return Err(PathError::EmptySegment);
        }
        check_normalised(text, false)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_root(&self) -> bool {
        &*self.0 == "/"
    }

    /// The segments, outermost first; empty for the root.
    pub fn segments(&self) -> impl Iterator<Item = &str> {
        self.0.split('/').filter(|s| !s.is_empty())
    }

    pub fn depth(&self) -> usize {
        self.segments().count()
    }

    /// The ancestor at `depth` segments (itself when it is not deeper).
    pub fn truncated(&self, depth: usize) -> ChannelPath {
        ChannelPath(self.prefix(depth).into())
    }

    /// The text of the ancestor at `depth` segments, without allocating.
    pub fn prefix(&self, depth: usize) -> &str {
        // The (depth+1)-th '/' ends the first `depth` segments. (memchr: `match_indices` with a
        // char pattern compared each hit with memcmp, a visible cost at two calls per publish.)
        match memchr::memchr_iter(b'/', self.0.as_bytes()).nth(depth) {
            Some(0) => "/",
            Some(cut) => &self.0[..cut],
            None => &self.0,
        }
    }

    /// This path, then each ancestor up to and including `/`.
    pub fn ancestors(&self) -> impl Iterator<Item = &str> {
        ancestors_of(&self.0)
    }

    /// Whether `other` is this channel or below it.
    pub fn contains(&self, other: &str) -> bool {
        is_in_subtree(&self.0, other)
    }
}

/// `path` (a normalised channel path), then each ancestor up to and including `/`, without
/// allocating: the walk fan-out does for every event.
pub fn ancestors_of(path: &str) -> impl Iterator<Item = &str> {
    let mut next = Some(path);
    std::iter::from_fn(move || {
        let current = next?;
        next = match memchr::memrchr(b'/', current.as_bytes()) {
            _ if current == "/" => None,
            Some(0) => Some("/"),
            Some(i) => Some(&current[..i]),
            None => None,
        };
        Some(current)
    })
}

/// Whether `path` equals `root` or lies below it.
pub fn is_in_subtree(root: &str, path: &str) -> bool {
    if root == "/" {
        return true;
    }
    match path.strip_prefix(root) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

impl fmt::Display for ChannelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ChannelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChannelPath({})", &self.0)
    }
}

impl std::borrow::Borrow<str> for ChannelPath {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for ChannelPath {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// A path whose segments may be `*` (exactly one segment each).
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct ChannelGlob {
    text: Box<str>,
    /// `None` stands for `*`.
    segments: Vec<Option<Box<str>>>,
}

impl ChannelGlob {
    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn matches(&self, path: &str) -> bool {
        let mut given = path.split('/').filter(|s| !s.is_empty());
        for want in &self.segments {
            match (want, given.next()) {
                (_, None) => return false,
                (None, Some(_)) => {}
                (Some(w), Some(g)) if **w == *g => {}
                _ => return false,
            }
        }
        given.next().is_none()
    }

    /// The longest prefix without a `*`: every match lies in this subtree.
    pub fn literal_prefix(&self) -> ChannelPath {
        let mut out = String::new();
        for seg in &self.segments {
            match seg {
                Some(s) => {
                    out.push('/');
                    out.push_str(s);
                }
                None => break,
            }
        }
        if out.is_empty() {
            ChannelPath::root()
        } else {
            ChannelPath(out.into())
        }
    }

    pub fn depth(&self) -> usize {
        self.segments.len()
    }
}

/// What a read asks for.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Selector {
    /// Exactly one channel's own events.
    Channel(ChannelPath),
    /// Every channel matching a `*` glob, merged by id.
    Glob(ChannelGlob),
    /// The channel and its whole subtree, merged by id.
    Subtree(ChannelPath),
}

impl Selector {
    /// Parses a read path: a channel, a path with whole `*` segments, or one ending in `/**`.
    /// `**` elsewhere, `x*` and a trailing `/` on a glob are `invalid glob path`.
    pub fn parse(text: &str) -> Result<Selector, PathError> {
        let trimmed = text.trim();
        if let Some(prefix) = trimmed.strip_suffix("/**") {
            if prefix.contains('*') {
                return Err(PathError::InvalidGlob);
            }
            let root = if prefix.is_empty() {
                ChannelPath::root()
            } else {
                ChannelPath::parse_exact(&normalise(prefix))?
            };
            return Ok(Selector::Subtree(root));
        }
        if trimmed == "**" {
            return Ok(Selector::Subtree(ChannelPath::root()));
        }
        if !trimmed.contains('*') {
            return ChannelPath::parse(trimmed).map(Selector::Channel);
        }
        if trimmed.ends_with('/') {
            return Err(PathError::InvalidGlob);
        }
        let path = normalise(trimmed);
        check_normalised(&path, true)?;
        let segments = path
            .split('/')
            .filter(|s| !s.is_empty())
            .map(|s| if s == "*" { None } else { Some(s.into()) })
            .collect();
        Ok(Selector::Glob(ChannelGlob {
            text: path.into_boxed_str(),
            segments,
        }))
    }

    /// Whether an event of channel `path` is selected.
    pub fn matches(&self, path: &str) -> bool {
        match self {
            Selector::Channel(c) => c.as_str() == path,
            Selector::Glob(g) => g.matches(path),
            Selector::Subtree(root) => root.contains(path),
        }
    }

    /// A subtree that holds every selected channel.
    pub fn scope(&self) -> ChannelPath {
        match self {
            Selector::Channel(c) | Selector::Subtree(c) => c.clone(),
            Selector::Glob(g) => g.literal_prefix(),
        }
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Selector::Channel(c) => write!(f, "{c}"),
            Selector::Glob(g) => f.write_str(g.as_str()),
            Selector::Subtree(c) if c.is_root() => f.write_str("/**"),
            Selector::Subtree(c) => write!(f, "{c}/**"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, expected: Result<&str, PathError>) {
        let got = ChannelPath::parse(input);
        assert_eq!(
            got.as_ref().map(|p| p.as_str()),
            expected.as_ref().map(|s| *s),
            "input {input:?}"
        );
    }

    #[test]
    fn parse_table() {
        check("/rooms/abc/chat", Ok("/rooms/abc/chat"));
        check("  rooms/abc/ ", Ok("/rooms/abc"));
        check("/", Ok("/"));
        check("", Ok("/"));
        check("/...", Ok("/..."));
        check("/.x", Ok("/.x"));
        check("/a//b", Err(PathError::EmptySegment));
        check("/a//", Err(PathError::EmptySegment));
        check("/a/../b", Err(PathError::DotSegment));
        check("/.", Err(PathError::DotSegment));
        check("/A", Err(PathError::BadByte(b'A')));
        check("/a b", Err(PathError::BadByte(b' ')));
        check("/a%2e", Err(PathError::BadByte(b'%')));
        check("/a@1", Err(PathError::BadByte(b'@')));
        check("/a\0", Err(PathError::BadByte(0)));
        check("/é", Err(PathError::BadByte(0xc3)));
        check("/a*", Err(PathError::BadByte(b'*')));
        check(
            &format!("/{}", "a".repeat(65)),
            Err(PathError::SegmentTooLong),
        );
        check(&"/a".repeat(33), Err(PathError::TooDeep));
        check(&"/abcdefgh".repeat(32), Err(PathError::TooLong));
    }

    #[test]
    fn the_fast_check_agrees_with_the_slow_one() {
        let samples = [
            "/", "/a", "/a/b", "/a//b", "/a/", "/.", "/..", "/...", "/.a", "/a.", "/A", "/a*", "",
            "a", "/a b", "/-_.", "/./a", "/a/..",
        ];
        let long = [
            format!("/{}", "a".repeat(64)),
            format!("/{}", "a".repeat(65)),
            "/a".repeat(32),
            "/a".repeat(33),
        ];
        for p in samples.iter().map(|s| s.to_string()).chain(long) {
            assert_eq!(is_valid_plain(p.as_bytes()), slow_check(&p), "{p:?}");
        }
    }

    fn slow_check(p: &str) -> bool {
        p.starts_with('/') && {
            let rest = &p[1..];
            p == "/"
                || (p.len() <= PATH_BYTES_MAX
                    && rest.split('/').count() <= DEPTH_MAX
                    && rest.split('/').all(|seg| check_segment(seg, false).is_ok()))
        }
    }

    proptest::proptest! {
        #[test]
        fn the_fast_check_agrees_with_the_slow_one_on_random_paths(
            p in "(/|/[a.]{1,3}|/a{60,66}|[A* ]){0,40}"
        ) {
            proptest::prop_assert_eq!(is_valid_plain(p.as_bytes()), slow_check(&p));
        }
    }

    #[test]
    fn ancestors_walk_to_root() {
        let p = ChannelPath::parse("/a/b/c").unwrap();
        assert_eq!(
            p.ancestors().collect::<Vec<_>>(),
            ["/a/b/c", "/a/b", "/a", "/"]
        );
        assert_eq!(ChannelPath::root().ancestors().collect::<Vec<_>>(), ["/"]);
    }

    #[test]
    fn truncated_gives_stream_prefix() {
        let p = ChannelPath::parse("/a/b/c").unwrap();
        assert_eq!(p.truncated(0).as_str(), "/");
        assert_eq!(p.truncated(1).as_str(), "/a");
        assert_eq!(p.truncated(2).as_str(), "/a/b");
        assert_eq!(p.truncated(5).as_str(), "/a/b/c");
    }

    #[test]
    fn selectors() {
        let s = Selector::parse("/rooms/*/chat").unwrap();
        assert!(s.matches("/rooms/a/chat"));
        assert!(!s.matches("/rooms/a/chat/x"));
        assert!(!s.matches("/rooms/chat"));
        assert_eq!(s.scope().as_str(), "/rooms");
        let t = Selector::parse("/rooms/**").unwrap();
        assert!(t.matches("/rooms") && t.matches("/rooms/a/b") && !t.matches("/roomsx"));
        assert_eq!(
            Selector::parse("/**").unwrap(),
            Selector::Subtree(ChannelPath::root())
        );
        assert_eq!(Selector::parse("/a/**/b"), Err(PathError::InvalidGlob));
        assert_eq!(Selector::parse("/a/x*"), Err(PathError::InvalidGlob));
        assert_eq!(Selector::parse("/a/*/"), Err(PathError::InvalidGlob));
        assert_eq!(Selector::parse("/*/**"), Err(PathError::InvalidGlob));
        assert!(matches!(Selector::parse("/a/"), Ok(Selector::Channel(_))));
    }
}
