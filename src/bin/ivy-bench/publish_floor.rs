//! `publish-floor`: `publish`'s clients against a server that does only what a durable,
//! acknowledged publish cannot do without, for the machine's floor.
//!
//! That server is this binary again (`ivy-bench commit-floor-server`), in its own process so that
//! its CPU is reported apart from the tool's. It reads each connection's messages, and one writer
//! thread appends whatever all connections sent meanwhile to one file with one `pwrite` and one
//! `fdatasync` per round (group commit, as `ivy serve` under `always`), then acknowledges each
//! message. A record is the message with a 16-byte head (a counter, the length, a CRC), about as
//! many bytes as Ivy's log takes for `publish`'s events. There are no channels, no index, no
//! segments, no fan-out and no commit watermark, and its file is zero-filled before the run and
//! overwritten as a ring, so nothing is zero-filled while it is measured (Ivy zero-fills its next
//! segment as it goes, `storage/spare.rs`). So it overstates what a real log could reach; what
//! `publish` falls short of it is at most Ivy's cost. With `--zero-fill-pace P`, a second thread
//! writes P bytes of zeroes per byte the writer wrote into new files, as Ivy prepares the
//! segments a growing log will overwrite, for the share of that difference that zero-filling
//! costs the device (its files stay until the run ends: a 10 s run writes about 1 GB of them).
//!
//! Its file is in the system's temporary directory, as the data of the `ivy serve` that `publish`
//! starts: against a server on another disk (`--addr`), the two measure different devices.

use crate::client::{parse_frame, server_text_frame, FRAME_MAX};
use ivy::storage::io::FileIo;
use parking_lot::{Condvar, Mutex};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

/// The size of the floor's file, written round after round as a ring.
const RING_BYTES: u64 = 256 << 20;
/// The size of each file of zeroes (`--zero-fill-pace`): Ivy's default segment size.
const SPARE_BYTES: u64 = 64 << 20;

/// Starts the floor's server and runs `publish` against it.
pub(crate) async fn publish_floor(
    seconds: u64,
    run: &crate::publish::PublishArgs,
    zero_fill_pace: u64,
) -> anyhow::Result<()> {
    // The directory is this process's, so that it is removed when the server is stopped.
    let dir = tempfile::tempdir()?;
    let path = dir.path().to_owned();
    let pace = zero_fill_pace.to_string();
    let args = [
        "commit-floor-server".as_ref(),
        "--dir".as_ref(),
        path.as_os_str(),
        "--zero-fill-pace".as_ref(),
        pace.as_ref(),
    ];
    let (addr, _server) = crate::spawn_floor_server(&args, Some(dir))?;
    crate::publish::publish(addr, seconds, "publish-floor", run).await
}

/// What the connections have read since the writer last took it.
#[derive(Default)]
struct Group {
    records: Vec<u8>,
    /// Each connection's acknowledgement frames for its messages in `records`.
    acks: Vec<(Arc<Outbox>, Vec<u8>)>,
}

/// The acknowledgements a connection may send: released by the writer, sent by the connection's
/// sender task.
#[derive(Default)]
struct Outbox {
    frames: Mutex<Vec<u8>>,
    ready: tokio::sync::Notify,
}

/// The group being gathered, and the writer's wake-up when it is no longer empty; the bytes the
/// writer wrote, and the zero-filler's wake-up when they grow.
#[derive(Default)]
struct Log {
    group: Mutex<Group>,
    wake: Condvar,
    written: Mutex<u64>,
    more_written: Condvar,
}

/// The floor's server: zero-fills its file in `dir`, prints its address, then serves until
/// killed.
pub(crate) async fn serve_commit_floor(dir: &Path, zero_fill_pace: u64) -> anyhow::Result<()> {
    let file = zero_filled(&dir.join("floor.log"))?;
    let log = Arc::new(Log::default());
    {
        let log = Arc::clone(&log);
        std::thread::Builder::new()
            .name("floor-writer".into())
            .spawn(move || stop_on(write_rounds(&file, &log)))?;
    }
    if zero_fill_pace > 0 {
        let log = Arc::clone(&log);
        let dir = dir.to_owned();
        std::thread::Builder::new()
            .name("floor-zeroes".into())
            .spawn(move || stop_on(fill_zeroes(&dir, &log, zero_fill_pace)))?;
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    say!("{}", listener.local_addr()?);
    loop {
        let (tcp, _) = listener.accept().await?;
        let log = Arc::clone(&log);
        tokio::spawn(async move {
            if let Err(e) = connection(tcp, log).await {
                eprintln!("commit-floor-server: connection ended: {e}");
            }
        });
    }
}

/// Without its writer or its zero-filler the floor measures nothing: it stops, so the run fails.
fn stop_on(e: std::io::Error) {
    eprintln!("commit-floor-server: cannot write: {e}");
    std::process::exit(2);
}

fn zero_filled(path: &Path) -> anyhow::Result<File> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)?;
    let zeroes = vec![0u8; 1 << 20];
    for at in (0..RING_BYTES).step_by(zeroes.len()) {
        file.write_all_at(&zeroes, at)?;
    }
    file.sync_all()?;
    Ok(file)
}

/// The writer: one `pwrite` and one `fdatasync` for everything read since the last round, then
/// the round's acknowledgements. Returns only on a failed write.
fn write_rounds(file: &File, log: &Log) -> std::io::Error {
    let mut round = Group::default();
    let mut at = 0u64;
    loop {
        {
            let mut group = log.group.lock();
            while group.records.is_empty() {
                log.wake.wait(&mut group);
            }
            std::mem::swap(&mut *group, &mut round);
        }
        let len = round.records.len() as u64;
        if at + len > RING_BYTES {
            at = 0;
        }
        if let Err(e) = file
            .write_all_at(&round.records, at)
            .and_then(|()| file.sync_data())
        {
            return e;
        }
        at += len;
        *log.written.lock() += len;
        log.more_written.notify_one();
        round.records.clear();
        for (outbox, frames) in round.acks.drain(..) {
            outbox.frames.lock().extend_from_slice(&frames);
            outbox.ready.notify_one();
        }
    }
}

/// Writes `pace` bytes of zeroes per byte the writer wrote, as Ivy fills its spare segments
/// (`storage/spare.rs`): into a new file of `SPARE_BYTES` each time (`zeroes.0`, `zeroes.1`, ...,
/// kept, as Ivy keeps its spares as segments), in 128 KiB pieces, each one's writeback started
/// and the one before waited for, and each file synced once full. Returns only on a failed
/// write.
fn fill_zeroes(dir: &Path, log: &Log, pace: u64) -> std::io::Error {
    let io = ivy::storage::io::OsIo;
    let piece = vec![0u8; 128 << 10];
    let len = piece.len() as u64;
    let mut zeroed = 0u64;
    let mut file: Option<(std::path::PathBuf, File)> = None;
    loop {
        {
            let mut written = log.written.lock();
            while *written * pace < zeroed + len {
                log.more_written.wait(&mut written);
            }
        }
        let at = zeroed % SPARE_BYTES;
        let done = (|| {
            if at == 0 {
                if let Some((path, full)) = &file {
                    io.sync_data(path, full)?;
                }
                let path = dir.join(format!("zeroes.{}", zeroed / SPARE_BYTES));
                let created = io.create(&path)?;
                file = Some((path, created));
            }
            let Some((path, file)) = &file else {
                return Ok(());
            };
            io.write_at(path, file, at, &piece)?;
            io.write_back(path, file, at, len, false)?;
            match at.checked_sub(len) {
                Some(before) => io.write_back(path, file, before, len, true),
                None => Ok(()),
            }
        })();
        if let Err(e) = done {
            return e;
        }
        zeroed += len;
    }
}

/// One client: the upgrade, the intro, then every whole message read is a record of the next
/// group, and its acknowledgement waits in that group for the round that writes it.
async fn connection(tcp: TcpStream, log: Arc<Log>) -> anyhow::Result<()> {
    tcp.set_nodelay(true)?;
    let (mut rd, mut wr) = tcp.into_split();
    let mut buf = vec![0u8; 64 * 1024];
    let mut end = 0;
    let head_end = loop {
        if let Some(i) = buf[..end].windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        anyhow::ensure!(end < 8192, "request head too long");
        let n = rd.read(&mut buf[end..]).await?;
        anyhow::ensure!(n > 0, "closed during the upgrade");
        end += n;
    };
    // The tool's client checks only the status line.
    let mut out =
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
            .to_vec();
    server_text_frame(&mut out, b"@0000000000.000000000:~/sid:floor");
    wr.write_all(&out).await?;
    let outbox = Arc::new(Outbox::default());
    let sender = tokio::spawn(send_acks(wr, Arc::clone(&outbox)));
    buf.copy_within(head_end..end, 0);
    let result = read_messages(&mut rd, buf, end - head_end, &log, &outbox).await;
    sender.abort();
    result
}

/// Reads messages until the client closes; `buf[..end]` is already read.
async fn read_messages(
    rd: &mut OwnedReadHalf,
    mut buf: Vec<u8>,
    mut end: usize,
    log: &Log,
    outbox: &Arc<Outbox>,
) -> anyhow::Result<()> {
    let mut counter = 0u64;
    loop {
        let mut at = 0;
        let mut records = Vec::new();
        let mut acks = Vec::new();
        let mut closed = false;
        while let Some((opcode, payload)) = client_frame(&mut buf[at..end])? {
            let (start, stop) = (at + payload.start, at + payload.end);
            at = stop;
            match opcode {
                0x1 => {
                    let message = &buf[start..stop];
                    counter += 1;
                    records.extend_from_slice(&counter.to_le_bytes());
                    records.extend_from_slice(&(message.len() as u32).to_le_bytes());
                    records.extend_from_slice(&crc32fast::hash(message).to_le_bytes());
                    records.extend_from_slice(message);
                    acks.extend_from_slice(&ack_frame(message));
                }
                0x8 => closed = true,
                _ => {}
            }
        }
        if !records.is_empty() {
            let mut group = log.group.lock();
            group.records.extend_from_slice(&records);
            group.acks.push((Arc::clone(outbox), acks));
            drop(group);
            log.wake.notify_one();
        }
        if closed {
            return Ok(());
        }
        buf.copy_within(at..end, 0);
        end -= at;
        if end == buf.len() {
            anyhow::ensure!(buf.len() < 2 * FRAME_MAX, "message too large");
            buf.resize(buf.len() * 2, 0);
        }
        let n = rd.read(&mut buf[end..]).await?;
        if n == 0 {
            return Ok(());
        }
        end += n;
    }
}

/// `#KEY#@TS` for a message `#KEY#...`, as a frame; nothing for an unkeyed one.
fn ack_frame(message: &[u8]) -> Vec<u8> {
    let mut frame = Vec::new();
    let key_end = message
        .strip_prefix(b"#")
        .and_then(|rest| rest.iter().position(|&b| b == b'#'));
    if let Some(k) = key_end {
        let mut ack = message[..k + 2].to_vec();
        ack.extend_from_slice(b"@0000000001.000000000");
        server_text_frame(&mut frame, &ack);
    }
    frame
}

async fn send_acks(mut wr: OwnedWriteHalf, outbox: Arc<Outbox>) {
    let mut out = Vec::new();
    loop {
        outbox.ready.notified().await;
        std::mem::swap(&mut out, &mut *outbox.frames.lock());
        if wr.write_all(&out).await.is_err() {
            return;
        }
        out.clear();
    }
}

/// The opcode and the payload's range of the whole client frame at the start of `bytes`, its
/// payload unmasked in place; `None` until it is whole.
fn client_frame(bytes: &mut [u8]) -> anyhow::Result<Option<(u8, std::ops::Range<usize>)>> {
    let Some(frame) = parse_frame(bytes, true)? else {
        return Ok(None);
    };
    if let Some(mask) = frame.mask {
        fastwebsockets::unmask(&mut bytes[frame.payload.clone()], mask);
    }
    Ok(Some((frame.opcode, frame.payload)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use fastwebsockets::{Frame, OpCode};

    /// A client's frame, as fastwebsockets makes it.
    fn masked(opcode: OpCode, payload: &[u8]) -> Vec<u8> {
        let mut frame = Frame::new(true, opcode, Some([0x12, 0x34, 0x56, 0x78]), payload.into());
        frame.mask();
        let mut head = [0u8; 16];
        let n = frame.fmt_head(&mut head);
        [&head[..n], &frame.payload[..]].concat()
    }

    #[test]
    fn client_frames_unmask_whole_or_wait_for_more() {
        for len in [0, 1, 125, 126, 65_535, 65_536] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let mut bytes = masked(OpCode::Text, &payload);
            let total = bytes.len();
            for cut in [0, 1, total - len - 1, total - 1] {
                let mut short = bytes[..cut].to_vec();
                assert_eq!(
                    client_frame(&mut short).ok(),
                    Some(None),
                    "{len} cut at {cut}"
                );
            }
            let (opcode, range) = client_frame(&mut bytes).ok().flatten().expect("whole");
            assert_eq!(opcode, 0x1);
            assert_eq!(range.end, total);
            assert_eq!(&bytes[range], &payload[..], "length {len}");
        }
        let mut unmasked = [0x81, 0x01, b'x'];
        assert!(client_frame(&mut unmasked).is_err());
    }

    #[test]
    fn keyed_messages_are_acknowledged_and_unkeyed_ones_are_not() {
        let mut expected = Vec::new();
        server_text_frame(&mut expected, b"#17#@0000000001.000000000");
        assert_eq!(ack_frame(b"#17#:/bench/p0:xxx"), expected);
        assert!(ack_frame(b":/bench/p0:xxx").is_empty());
        assert!(ack_frame(b"#no end:/x:y").is_empty());
    }
}
