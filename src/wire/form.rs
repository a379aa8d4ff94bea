//! The body of `POST /events/PATH`: a urlencoded or multipart form with the fields `data` and
//! `sid` (what the original JavaScript client's `send` and `sendLarge` post), or any other
//! content type taken whole as the event's data.
//!
//! The whole body is in memory before it is parsed (it is bounded by the body limit), so the
//! multipart parser, which is written against a stream, never waits: it is polled to completion
//! here and this module stays synchronous and fuzzable.

use super::ParseError;
use bytes::Bytes;
use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

/// What a POST body carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostBody {
    pub data: Bytes,
    /// The publisher's session id, for sender exclusion.
    pub sid: Option<String>,
}

/// Parses a POST body by its `Content-Type`.
pub fn parse(content_type: &str, body: Bytes) -> Result<PostBody, ParseError> {
    let mime = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match mime.as_str() {
        "application/x-www-form-urlencoded" => urlencoded(&body),
        "multipart/form-data" => {
            let boundary = multer::parse_boundary(content_type)
                .map_err(|e| ParseError::Multipart(format!("bad boundary: {e}")))?;
            run_ready(multipart(boundary, body))
        }
        _ => Ok(PostBody {
            data: body,
            sid: None,
        }),
    }
}

/// The WHATWG urlencoded parser, except that values stay bytes: `form_urlencoded` decodes
/// them to text, replacing bytes that are not UTF-8, and event data must arrive as sent
/// (found by the `post_body` fuzz target).
fn urlencoded(body: &[u8]) -> Result<PostBody, ParseError> {
    let decode = |raw: &[u8]| -> Vec<u8> {
        let spaced: Vec<u8> = raw
            .iter()
            .map(|&b| if b == b'+' { b' ' } else { b })
            .collect();
        percent_encoding::percent_decode(&spaced).collect()
    };
    let mut data = None;
    let mut sid = None;
    for pair in body.split(|&b| b == b'&').filter(|p| !p.is_empty()) {
        let (name, value) = match pair.iter().position(|&b| b == b'=') {
            Some(eq) => (&pair[..eq], &pair[eq + 1..]),
            None => (pair, &[][..]),
        };
        match &decode(name)[..] {
            b"data" => set_once(&mut data, "data", Bytes::from(decode(value)))?,
            b"sid" => set_once(
                &mut sid,
                "sid",
                String::from_utf8_lossy(&decode(value)).into_owned(),
            )?,
            _ => {}
        }
    }
    Ok(PostBody {
        data: data.ok_or(ParseError::MissingField("data"))?,
        sid,
    })
}

async fn multipart(boundary: String, body: Bytes) -> Result<PostBody, ParseError> {
    let stream = futures_util::stream::once(async move { Ok::<Bytes, std::io::Error>(body) });
    let mut form = multer::Multipart::new(stream, boundary);
    let mut data = None;
    let mut sid = None;
    let bad = |e: multer::Error| ParseError::Multipart(e.to_string());
    while let Some(field) = form.next_field().await.map_err(bad)? {
        let name = field.name().unwrap_or("").to_owned();
        let bytes = field.bytes().await.map_err(bad)?;
        match name.as_str() {
            "data" => set_once(&mut data, "data", bytes)?,
            "sid" => set_once(
                &mut sid,
                "sid",
                String::from_utf8_lossy(&bytes).into_owned(),
            )?,
            _ => {}
        }
    }
    Ok(PostBody {
        data: data.ok_or(ParseError::MissingField("data"))?,
        sid,
    })
}

/// A field given twice is refused: which of the two is the event would be a guess (the
/// original server kept the first, many frameworks keep the last).
fn set_once<T>(slot: &mut Option<T>, name: &'static str, value: T) -> Result<(), ParseError> {
    if slot.is_some() {
        return Err(ParseError::DuplicateField(name));
    }
    *slot = Some(value);
    Ok(())
}

/// Polls a future whose input is all in memory. It cannot stay pending; if a parser change ever
/// made it, the body is refused rather than the thread spun.
fn run_ready<T>(fut: impl Future<Output = Result<T, ParseError>>) -> Result<T, ParseError> {
    let mut fut = pin!(fut);
    let mut cx = Context::from_waker(Waker::noop());
    for _ in 0..1024 {
        if let Poll::Ready(out) = fut.as_mut().poll(&mut cx) {
            return out;
        }
    }
    Err(ParseError::Multipart("parser did not finish".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urlencoded_fields() {
        let body = parse(
            "application/x-www-form-urlencoded; charset=UTF-8",
            Bytes::from_static(b"sid=s1&data=a%20b+c&x=1"),
        )
        .expect("valid form");
        assert_eq!(&body.data[..], b"a b c");
        assert_eq!(body.sid.as_deref(), Some("s1"));
        // An escaped name is the same field; empty pairs and names are skipped.
        let body = parse(
            "application/x-www-form-urlencoded",
            Bytes::from_static(b"d%61ta&&=&x=1"),
        )
        .expect("valid form");
        assert_eq!(&body.data[..], b"");
        for twice in [&b"data=a&d%61ta=b"[..], b"data=a&sid=1&sid=2", b"data&data"] {
            assert!(
                matches!(
                    parse("application/x-www-form-urlencoded", Bytes::from(twice)),
                    Err(ParseError::DuplicateField(_))
                ),
                "{twice:?}"
            );
        }
        // Bytes that are not UTF-8, raw or escaped, stay as they were sent.
        let body = parse(
            "application/x-www-form-urlencoded",
            Bytes::from_static(b"data=%FF\xfe%2x"),
        )
        .expect("valid form");
        assert_eq!(&body.data[..], b"\xff\xfe%2x");
        assert_eq!(
            parse(
                "application/x-www-form-urlencoded",
                Bytes::from_static(b"sid=1")
            ),
            Err(ParseError::MissingField("data"))
        );
    }

    #[test]
    fn multipart_with_crlf_lines() {
        let body = "--XyZ\r\nContent-Disposition: form-data; name=\"data\"\r\n\r\nline1\r\nline2\r\n--XyZ\r\nContent-Disposition: form-data; name=\"sid\"\r\n\r\nabc\r\n--XyZ--\r\n";
        let out = parse(
            "multipart/form-data; boundary=XyZ",
            Bytes::from(body.as_bytes().to_vec()),
        )
        .expect("valid multipart");
        assert_eq!(&out.data[..], b"line1\r\nline2");
        assert_eq!(out.sid.as_deref(), Some("abc"));
    }

    #[test]
    fn multipart_refusals() {
        assert!(matches!(
            parse("multipart/form-data", Bytes::from_static(b"x")),
            Err(ParseError::Multipart(_))
        ));
        assert!(matches!(
            parse(
                "multipart/form-data; boundary=b",
                Bytes::from_static(
                    b"--b\r\nContent-Disposition: form-data; name=\"data\"\r\n\r\nunterminated"
                )
            ),
            Err(ParseError::Multipart(_))
        ));
        assert_eq!(
            parse(
                "multipart/form-data; boundary=b",
                Bytes::from_static(b"--b--\r\n")
            ),
            Err(ParseError::MissingField("data"))
        );
        let field = "--b\r\nContent-Disposition: form-data; name=\"data\"\r\n\r\nx\r\n";
        assert_eq!(
            parse(
                "multipart/form-data; boundary=b",
                Bytes::from(format!("{field}{field}--b--\r\n"))
            ),
            Err(ParseError::DuplicateField("data"))
        );
    }

    #[test]
    fn other_types_are_raw() {
        let out = parse("text/plain", Bytes::from_static(b"raw\nbody")).expect("raw");
        assert_eq!(&out.data[..], b"raw\nbody");
        assert_eq!(out.sid, None);
    }
}
