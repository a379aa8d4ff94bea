//! The tool's WebSocket client: the upgrade, frame writing (fastwebsockets), and server frames
//! parsed in place from large reads (`FrameReader`).

use fastwebsockets::{Frame, OpCode, Payload, Role, WebSocketWrite};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

pub(crate) type Writer = WebSocketWrite<tokio::io::BufWriter<OwnedWriteHalf>>;

/// Opens a WebSocket with subprotocol ivy1 and reads the intro.
pub(crate) async fn connect(addr: SocketAddr) -> anyhow::Result<(FrameReader, Writer)> {
    let (read, mut w) = upgrade(addr).await?;
    let mut frames = FrameReader::new(read);
    frames.next_text(&mut w).await?;
    Ok((frames, w))
}

/// Upgrades a new connection to a WebSocket with subprotocol ivy1; returns the socket's read
/// half, with no byte of the WebSocket consumed, and a frame writer on its write half.
pub(crate) async fn upgrade(addr: SocketAddr) -> anyhow::Result<(OwnedReadHalf, Writer)> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let (mut read, mut write) = tcp.into_split();
    write.write_all(upgrade_request(addr).as_bytes()).await?;
    let mut head = ResponseHead::default();
    while !head.push(read.read_u8().await?)? {}
    // Frames go through a buffer and are flushed when the sender has nothing more to send, so
    // the tool makes one write per batch, not per message, and is not the bottleneck. (The
    // writer is taken from a split over no reader: the read half is returned raw.)
    let write = tokio::io::BufWriter::with_capacity(64 * 1024, write);
    let (_, mut w) = fastwebsockets::after_handshake_split(tokio::io::empty(), write, Role::Client);
    w.set_auto_apply_mask(true);
    w.set_writev(false);
    Ok((read, w))
}

/// The upgrade request of the tool's clients (subprotocol ivy1).
fn upgrade_request(addr: SocketAddr) -> String {
    format!(
        "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: ivy1\r\n\r\n"
    )
}

/// The upgrade's response head, read byte by byte so that no WebSocket byte is consumed with it.
#[derive(Default)]
struct ResponseHead(Vec<u8>);

impl ResponseHead {
    /// Takes the next byte; true once the head is whole (and says 101).
    fn push(&mut self, b: u8) -> anyhow::Result<bool> {
        self.0.push(b);
        anyhow::ensure!(self.0.len() < 8192, "response head too long");
        if !self.0.ends_with(b"\r\n\r\n") {
            return Ok(false);
        }
        anyhow::ensure!(
            self.0.starts_with(b"HTTP/1.1 101"),
            "upgrade refused: {}",
            String::from_utf8_lossy(&self.0)
        );
        Ok(true)
    }
}

/// `upgrade` on a blocking std socket (`receivers.rs`): the socket, upgraded, with no byte of
/// the WebSocket consumed.
pub(crate) fn upgrade_blocking(addr: SocketAddr) -> anyhow::Result<std::net::TcpStream> {
    use std::io::{Read, Write};
    let mut tcp = std::net::TcpStream::connect(addr)?;
    tcp.set_nodelay(true)?;
    tcp.write_all(upgrade_request(addr).as_bytes())?;
    let mut head = ResponseHead::default();
    let mut byte = [0u8; 1];
    loop {
        tcp.read_exact(&mut byte)?;
        if head.push(byte[0])? {
            return Ok(tcp);
        }
    }
}

/// A client's (masked) frame, for the clients that write without fastwebsockets' writer.
pub(crate) fn client_frame(opcode: OpCode, payload: &[u8]) -> Vec<u8> {
    let mut frame = Frame::new(
        true,
        opcode,
        Some(rand_mask()),
        Payload::Owned(payload.to_vec()),
    );
    let mut head = [0u8; 16];
    let n = frame.fmt_head(&mut head);
    frame.mask();
    let mut out = head[..n].to_vec();
    out.extend_from_slice(&frame.payload);
    out
}

/// A mask key that differs between frames, as RFC 6455 asks of a client (the tool needs no
/// cryptographic quality: the peer is the server under test).
fn rand_mask() -> [u8; 4] {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0x9e37_79b9);
    NEXT.fetch_add(0x6d2b_79f5, Ordering::Relaxed).to_le_bytes()
}

/// Says what a close frame's payload says: its code and reason.
pub(crate) fn closed_by_server(payload: &[u8]) -> String {
    match payload {
        [hi, lo, reason @ ..] => format!(
            "closed by the server: {} {}",
            u16::from_be_bytes([*hi, *lo]),
            String::from_utf8_lossy(reason)
        ),
        _ => "closed by the server without a code".to_string(),
    }
}

/// Answers a ping now.
pub(crate) async fn pong(w: &mut Writer, payload: &[u8]) -> anyhow::Result<()> {
    w.write_frame(Frame::pong(Payload::Owned(payload.to_vec())))
        .await?;
    w.flush().await?;
    Ok(())
}

/// Sends one message now.
pub(crate) async fn send(w: &mut Writer, text: &[u8]) -> anyhow::Result<()> {
    w.write_frame(Frame::text(Payload::Borrowed(text))).await?;
    w.flush().await?;
    Ok(())
}

/// Queues one message in the write buffer (flushed when full or by `flush`).
pub(crate) async fn send_buffered(w: &mut Writer, text: &[u8]) -> anyhow::Result<()> {
    w.write_frame(Frame::text(Payload::Borrowed(text))).await?;
    Ok(())
}

/// Waits for a window slot, flushing what is buffered first if none is free; true when it had
/// to wait.
pub(crate) async fn slot(permits: &tokio::sync::Semaphore, w: &mut Writer) -> anyhow::Result<bool> {
    match permits.try_acquire() {
        Ok(p) => {
            p.forget();
            Ok(false)
        }
        Err(_) => {
            w.flush().await?;
            permits.acquire().await?.forget();
            Ok(true)
        }
    }
}

/// Answers `#KEY#!reason`: a refused publish is not an acknowledged one, and a run that had
/// any is reported as failed rather than measured.
#[derive(Clone, Default)]
pub(crate) struct Refusals(Arc<parking_lot::Mutex<(u64, Option<String>)>>);

impl Refusals {
    /// Whether `answer` (`#KEY#...`) is a refusal; counts it, keeping the first reason.
    pub(crate) fn note(&self, answer: &[u8]) -> bool {
        let rest = answer
            .get(1..)
            .and_then(|a| a.iter().position(|&b| b == b'#').map(|i| &a[i + 1..]));
        let Some(reason) = rest.and_then(|r| r.strip_prefix(b"!")) else {
            return false;
        };
        let mut r = self.0.lock();
        r.0 += 1;
        r.1.get_or_insert_with(|| String::from_utf8_lossy(reason).into_owned());
        true
    }

    pub(crate) fn check(&self) -> anyhow::Result<()> {
        match &*self.0.lock() {
            (0, _) => Ok(()),
            (n, reason) => anyhow::bail!(
                "the server refused {n} publishes (first: {}); the figures above are not valid",
                reason.as_deref().unwrap_or("?")
            ),
        }
    }
}

/// A frame from the server, borrowed from the reader's buffer.
pub(crate) enum ServerFrame<'a> {
    Text(&'a [u8]),
    Ping(&'a [u8]),
    Close(&'a [u8]),
    Other,
}

/// Server-to-client frames (whole and unmasked, RFC 6455 section 5.2) parsed in place from one
/// buffer filled by large reads. fastwebsockets reads one frame per call, with a future, a
/// buffer reservation, a shared split and a UTF-8 check each; at 4 M frames/s that was half of
/// the subscribers' CPU, on the cores the server shares. The tool's clients only need each
/// frame's bounds, so they all read this way (the server uses fastwebsockets). The socket is
/// the caller's: `FrameReader` reads into it with tokio, `receivers.rs` with mio.
pub(crate) struct FrameBuf {
    buf: Vec<u8>,
    /// `buf[at..end]` is read and not yet parsed.
    at: usize,
    end: usize,
}

/// A frame larger than this is refused (the tool's events are about 100 B).
pub(crate) const FRAME_MAX: usize = 16 << 20;

impl FrameBuf {
    pub(crate) fn new() -> FrameBuf {
        FrameBuf {
            buf: vec![0; 64 * 1024],
            at: 0,
            end: 0,
        }
    }

    /// The next frame if it is wholly buffered.
    pub(crate) fn next(&mut self) -> anyhow::Result<Option<ServerFrame<'_>>> {
        let Some((opcode, payload)) = parse_server_frame(&self.buf[self.at..self.end])? else {
            return Ok(None);
        };
        let start = self.at + payload.start;
        self.at += payload.end;
        let payload = &self.buf[start..self.at];
        Ok(Some(match opcode {
            0x1 => ServerFrame::Text(payload),
            0x8 => ServerFrame::Close(payload),
            0x9 => ServerFrame::Ping(payload),
            _ => ServerFrame::Other,
        }))
    }

    /// Room for the next read, after moving a partial frame to the buffer's start (and growing
    /// the buffer if that frame fills it).
    pub(crate) fn space(&mut self) -> anyhow::Result<&mut [u8]> {
        self.buf.copy_within(self.at..self.end, 0);
        self.end -= self.at;
        self.at = 0;
        if self.end == self.buf.len() {
            anyhow::ensure!(self.buf.len() < FRAME_MAX, "frame too large");
            self.buf.resize(self.buf.len() * 2, 0);
        }
        Ok(&mut self.buf[self.end..])
    }

    /// Takes in `n` bytes read into `space`; 0 is the server's end of the connection.
    pub(crate) fn filled(&mut self, n: usize) -> anyhow::Result<()> {
        anyhow::ensure!(n > 0, "the server closed the connection");
        self.end += n;
        Ok(())
    }
}

/// The tokio clients' reader: a `FrameBuf` over a socket's read half.
pub(crate) struct FrameReader {
    tcp: OwnedReadHalf,
    buf: FrameBuf,
}

impl FrameReader {
    fn new(tcp: OwnedReadHalf) -> FrameReader {
        FrameReader {
            tcp,
            buf: FrameBuf::new(),
        }
    }

    /// The next frame if it is wholly buffered.
    pub(crate) fn next(&mut self) -> anyhow::Result<Option<ServerFrame<'_>>> {
        self.buf.next()
    }

    /// Reads once more from the socket.
    pub(crate) async fn fill(&mut self) -> anyhow::Result<()> {
        let n = self.tcp.read(self.buf.space()?).await?;
        self.buf.filled(n)
    }

    /// The payload of the next text message; answers pings.
    pub(crate) async fn next_text(&mut self, w: &mut Writer) -> anyhow::Result<Vec<u8>> {
        loop {
            match self.next()? {
                Some(ServerFrame::Text(payload)) => return Ok(payload.to_vec()),
                Some(ServerFrame::Ping(payload)) => pong(w, payload).await?,
                Some(ServerFrame::Close(payload)) => anyhow::bail!(closed_by_server(payload)),
                Some(ServerFrame::Other) => {}
                None => self.fill().await?,
            }
        }
    }
}

/// The opcode and the payload's range of the frame at the start of `bytes`, if it is whole.
fn parse_server_frame(bytes: &[u8]) -> anyhow::Result<Option<(u8, std::ops::Range<usize>)>> {
    let frame = parse_frame(bytes, false)?;
    Ok(frame.map(|f| (f.opcode, f.payload)))
}

/// One whole client frame from a blocking socket, read byte by byte so that nothing after it is
/// consumed: its opcode and unmasked payload (the server side of the tool's hand-made peers).
pub(crate) fn read_client_frame(tcp: &mut std::net::TcpStream) -> anyhow::Result<(u8, Vec<u8>)> {
    use std::io::Read;
    let mut bytes = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        if let Some(f) = parse_frame(&bytes, true)? {
            let key = f.mask.unwrap_or_default();
            let payload = bytes[f.payload.clone()]
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ key[i % 4])
                .collect();
            return Ok((f.opcode, payload));
        }
        tcp.read_exact(&mut byte)?;
        bytes.push(byte[0]);
    }
}

/// Where a frame lies in a buffer (`parse_frame`).
pub(crate) struct FrameAt {
    pub(crate) opcode: u8,
    pub(crate) payload: std::ops::Range<usize>,
    /// A client's frame's mask key.
    pub(crate) mask: Option<[u8; 4]>,
}

/// The whole, unfragmented frame at the start of `bytes` (RFC 6455 section 5.2); `None` until it
/// is whole. A client's frames are
/// masked and a server's are not, so `from_client` says which a frame must be.
pub(crate) fn parse_frame(bytes: &[u8], from_client: bool) -> anyhow::Result<Option<FrameAt>> {
    let [first, second, ..] = *bytes else {
        return Ok(None);
    };
    anyhow::ensure!(first & 0x70 == 0, "reserved bits set");
    anyhow::ensure!(first & 0x80 != 0, "fragmented message");
    anyhow::ensure!(
        (second & 0x80 != 0) == from_client,
        "a client's frames are masked and a server's are not"
    );
    let (head, len) = match second & 0x7f {
        126 => match bytes.get(2..4) {
            Some(b) => (4, usize::from(u16::from_be_bytes([b[0], b[1]]))),
            None => return Ok(None),
        },
        127 => match bytes.get(2..10) {
            Some(b) => {
                let len = u64::from_be_bytes(b.try_into()?);
                (10, usize::try_from(len)?)
            }
            None => return Ok(None),
        },
        len => (2, usize::from(len)),
    };
    anyhow::ensure!(len <= FRAME_MAX, "frame too large");
    let (mask, start) = match (from_client, bytes.get(head..head + 4)) {
        (false, _) => (None, head),
        (true, Some(key)) => (Some(key.try_into()?), head + 4),
        (true, None) => return Ok(None),
    };
    let end = start + len;
    Ok((bytes.len() >= end).then_some(FrameAt {
        opcode: first & 0x0f,
        payload: start..end,
        mask,
    }))
}

/// An unmasked (server to client) text frame, its head formatted by fastwebsockets as the
/// server's own frames are (`server/writer.rs`, `push_frame`).
pub(crate) fn server_text_frame(out: &mut Vec<u8>, payload: &[u8]) {
    let mut head = [0u8; 16];
    let n = Frame::text(Payload::Borrowed(payload)).fmt_head(&mut head);
    out.extend_from_slice(&head[..n]);
    out.extend_from_slice(payload);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fanout::fanout_fields;

    #[test]
    fn refusals_are_told_from_acks() {
        let r = Refusals::default();
        assert!(!r.note(b"#7#@1795982068.662161665"));
        assert!(!r.note(b"#k!#@1"), "a ! inside the key is not a refusal");
        assert!(r.check().is_ok());
        assert!(r.note(b"#8#!not written: disk full"));
        assert!(r.note(b"#9#!other"));
        let e = r.check().expect_err("refusals fail the run").to_string();
        assert!(
            e.contains("refused 2 publishes (first: not written: disk full)"),
            "{e}"
        );
    }

    #[test]
    fn server_frames_parse_whole_or_wait_for_more() {
        // Payload lengths at each of the three length encodings' edges.
        for len in [0, 1, 125, 126, 65_535, 65_536, 200_000] {
            let payload = vec![b'x'; len];
            let mut bytes = Vec::new();
            server_text_frame(&mut bytes, &payload);
            let head = bytes.len() - len;
            let parsed = parse_server_frame(&bytes).expect("a valid frame");
            assert_eq!(parsed, Some((0x1, head..bytes.len())), "length {len}");
            for cut in [0, 1, head - 1, head, bytes.len() - 1] {
                if cut < bytes.len() {
                    let short = parse_server_frame(&bytes[..cut]).expect("a valid prefix");
                    assert_eq!(short, None, "length {len} cut at {cut}");
                }
            }
        }
        let masked = [0x81, 0x81, 1, 2, 3, 4, b'x'];
        assert!(parse_server_frame(&masked).is_err());
        let fragment = [0x01, 0x01, b'x'];
        assert!(parse_server_frame(&fragment).is_err());
        let ping = [0x89, 0x02, b'h', b'i'];
        assert_eq!(parse_server_frame(&ping).ok(), Some(Some((0x9, 2..4))));
    }

    #[tokio::test]
    async fn frames_split_across_reads_come_out_whole() -> anyhow::Result<()> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let server = tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await?;
            let mut bytes = Vec::new();
            // Up to 69 KB each: larger than the reader's first buffer, so it must grow.
            for i in 0..100 {
                let event = format!("@1.000000000:/fan:{i}:5:{}", "p".repeat(i * 700));
                server_text_frame(&mut bytes, event.as_bytes());
            }
            bytes.extend_from_slice(&[0x89, 0x01, b'p']);
            bytes.extend_from_slice(&[0x88, 0x02, 0x03, 0xf5]);
            // Pieces that are no multiple of anything, so heads and payloads straddle reads.
            for piece in bytes.chunks(997) {
                tcp.write_all(piece).await?;
                tokio::task::yield_now().await;
            }
            anyhow::Ok(())
        });
        let (read, _write) = TcpStream::connect(addr).await?.into_split();
        let mut frames = FrameReader::new(read);
        let (mut seqs, mut pings) = (Vec::new(), 0);
        loop {
            match frames.next()? {
                Some(ServerFrame::Text(payload)) => seqs.push(fanout_fields(payload).map(|f| f.0)),
                Some(ServerFrame::Ping(payload)) => {
                    assert_eq!(payload, b"p");
                    pings += 1;
                }
                Some(ServerFrame::Close(payload)) => {
                    assert_eq!(payload, 1013u16.to_be_bytes());
                    break;
                }
                Some(ServerFrame::Other) => anyhow::bail!("no other opcode was sent"),
                None => frames.fill().await?,
            }
        }
        server.await??;
        assert_eq!(seqs, (0..100).map(Some).collect::<Vec<_>>());
        assert_eq!(pings, 1);
        Ok(())
    }
}
