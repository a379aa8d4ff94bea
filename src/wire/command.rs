//! One client WebSocket message (`ivy1`) parsed into a `Frame` that borrows from it.
//!
//! ```text
//! message = [ "#" KEY "#" ] command
//! command = "+" PATH [ "@" TS ]   subscribe (and replay the log after TS)
//!         | "-" PATH              unsubscribe
//!         | ":" PATH ":" DATA     publish DATA (raw, to the end of the message)
//!         | "@"                   server time
//! ```
//! KEY is any bytes but `#`. Paths are normalised and checked here (`ChannelPath`), so later
//! layers only see valid channels.

use super::error::ParseError;
use crate::channel::ChannelPath;
use crate::event_id::EventId;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command<'a> {
    Subscribe {
        path: ChannelPath,
        resume_after: Option<EventId>,
    },
    Unsubscribe {
        path: ChannelPath,
    },
    Publish {
        path: ChannelPath,
        data: &'a [u8],
    },
    Time,
}

/// A parsed message: its acknowledgement key, if any, and its command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message<'a> {
    pub key: Option<&'a str>,
    pub command: Command<'a>,
}

/// A message that did not parse, with the key it carried (so the answer can be `#KEY#!REASON`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused<'a> {
    pub key: Option<&'a str>,
    pub error: ParseError,
}

/// Parses one text message.
pub fn parse(message: &str) -> Result<Message<'_>, Refused<'_>> {
    let (key, rest) = split_key(message).map_err(|error| Refused { key: None, error })?;
    let refuse = |error| Refused { key, error };
    let mut chars = rest.chars();
    let command = match chars.next() {
        Some('+') => {
            let body = chars.as_str();
            let (path, resume_after) = match body.split_once('@') {
                Some((path, ts)) => (
                    path,
                    Some(EventId::parse(ts).map_err(|e| refuse(ParseError::Timestamp(e)))?),
                ),
                None => (body, None),
            };
            Command::Subscribe {
                path: parse_path(path).map_err(refuse)?,
                resume_after,
            }
        }
        Some('-') => Command::Unsubscribe {
            path: parse_path(chars.as_str()).map_err(refuse)?,
        },
        Some(':') => {
            let body = chars.as_str();
            let (path, data) =
                split_once_ascii(body, b':').ok_or(refuse(ParseError::MissingData))?;
            Command::Publish {
                path: parse_path(path).map_err(refuse)?,
                data: data.as_bytes(),
            }
        }
        Some('@') if chars.as_str().is_empty() => Command::Time,
        Some('@') => return Err(refuse(ParseError::TrailingTime)),
        Some(_) => return Err(refuse(ParseError::UnknownCommand)),
        None => return Err(refuse(ParseError::Empty)),
    };
    Ok(Message { key, command })
}

fn split_key(message: &str) -> Result<(Option<&str>, &str), ParseError> {
    match message.strip_prefix('#') {
        Some(rest) => {
            let (key, rest) = split_once_ascii(rest, b'#').ok_or(ParseError::UnterminatedKey)?;
            Ok((Some(key), rest))
        }
        None => Ok((None, message)),
    }
}

/// `str::split_once` for an ASCII byte, by memchr: the char-pattern search compares every hit
/// with memcmp, and this runs on every publish.
fn split_once_ascii(text: &str, byte: u8) -> Option<(&str, &str)> {
    debug_assert!(byte.is_ascii());
    let at = memchr::memchr(byte, text.as_bytes())?;
    // Both sides of an ASCII byte are char boundaries.
    Some((&text[..at], &text[at + 1..]))
}

fn parse_path(text: &str) -> Result<ChannelPath, ParseError> {
    ChannelPath::parse(text).map_err(ParseError::Path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, expected: Result<(Option<&str>, Command<'_>), ParseError>) {
        let got = parse(input)
            .map(|m| (m.key, m.command))
            .map_err(|r| r.error);
        assert_eq!(got, expected, "input {input:?}");
    }

    fn path(p: &str) -> ChannelPath {
        ChannelPath::parse(p).unwrap()
    }

    fn subscribe(p: &str, resume_after: Option<EventId>) -> Command<'static> {
        Command::Subscribe {
            path: path(p),
            resume_after,
        }
    }

    #[test]
    fn parse_table() {
        check("+/a/b", Ok((None, subscribe("/a/b", None))));
        check("+/", Ok((None, subscribe("/", None))));
        check("+a/b/ ", Ok((None, subscribe("/a/b", None))));
        check(
            "+/a@1700000000.5",
            Ok((
                None,
                subscribe("/a", Some(EventId(1_700_000_000_500_000_000))),
            )),
        );
        check("-/a", Ok((None, Command::Unsubscribe { path: path("/a") })));
        check(
            "#k1#:/a:x:y\nz",
            Ok((
                Some("k1"),
                Command::Publish {
                    path: path("/a"),
                    data: b"x:y\nz",
                },
            )),
        );
        check(
            ":/a:",
            Ok((
                None,
                Command::Publish {
                    path: path("/a"),
                    data: b"",
                },
            )),
        );
        check("#7#@", Ok((Some("7"), Command::Time)));
        check("@", Ok((None, Command::Time)));
        check("##@", Ok((Some(""), Command::Time)));
        check("", Err(ParseError::Empty));
        check("x", Err(ParseError::UnknownCommand));
        check("#k", Err(ParseError::UnterminatedKey));
        check(":/a", Err(ParseError::MissingData));
        check("@now", Err(ParseError::TrailingTime));
        assert!(matches!(
            parse("#k#+/A").unwrap_err(),
            Refused {
                key: Some("k"),
                error: ParseError::Path(_)
            }
        ));
        assert!(matches!(
            parse("+/a@x").unwrap_err().error,
            ParseError::Timestamp(_)
        ));
        assert!(matches!(
            parse(":/a/../b:x").unwrap_err().error,
            ParseError::Path(_)
        ));
    }
}
