//! `floor`: `fanout`'s subscribers served by no server at all, for the machine's floor.

use crate::client::{read_client_frame, server_text_frame};
use crate::cpu::CpuMeter;
use crate::fanout::{pace, report_fanout, FanoutCounters};
use crate::now_nanos;
use crate::receivers::{Receivers, Slow};
use ivy::event_id::EventId;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// The machine's floor for `fanout`: the same subscribers, served not by `ivy serve` but by a
/// thread that only frames each event once and writes it to every socket in turn, as fan-out
/// does, with no log, no commit and no dispatcher. Its latency, measured side by side with
/// `fanout`, is what the kernel's loopback and the client cost on this machine; what `fanout`
/// adds to it is the server's. (Sockets are blocking: the floor has no slow subscribers.)
/// `rate` is at least 1 (the command line's range); `threads` read the subscribers' sockets.
pub(crate) async fn floor(
    seconds: u64,
    subscribers: usize,
    size: usize,
    rate: u64,
    threads: usize,
) -> anyhow::Result<()> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let accepting = std::thread::spawn(move || -> anyhow::Result<Vec<std::net::TcpStream>> {
        (0..subscribers).map(|_| floor_accept(&listener)).collect()
    });
    let c = FanoutCounters::new();
    let subs = Receivers::start(addr, subscribers, Slow::default(), threads, &c).await?;
    let mut sockets = accepting
        .join()
        .map_err(|_| anyhow::anyhow!("the floor's accept thread panicked"))??;
    let writer = {
        let c = c.clone();
        std::thread::spawn(move || -> anyhow::Result<(f64, Vec<std::net::TcpStream>)> {
            let pad = "p".repeat(size.saturating_sub(40));
            let started = Instant::now();
            let started_nanos = now_nanos();
            // Every event framed once, back to back; `ends[k]` is where event k's frame ends.
            let mut frames = Vec::new();
            let mut ends: Vec<usize> = vec![0];
            // Per socket, the events written so far.
            let mut written = vec![0usize; sockets.len()];
            // Sockets that have not had every framed event.
            let mut behind = 0;
            let mut next = 0;
            while started.elapsed() < Duration::from_secs(seconds) {
                // Frame what is due by now. Each carries the moment it was due, so time spent
                // behind schedule counts as latency, as with a publisher.
                let due = (started.elapsed().as_secs_f64() * rate as f64) as usize + 1;
                if due > ends.len() - 1 {
                    behind = sockets.len();
                }
                for s in ends.len() - 1..due {
                    let sent = started_nanos + s as u64 * 1_000_000_000 / rate;
                    // Its id is when it is framed, as a server's is when it is appended.
                    let id = EventId(now_nanos());
                    let line = format!("@{id}:/fan:{s}:{sent}:{pad}");
                    server_text_frame(&mut frames, line.as_bytes());
                    ends.push(frames.len());
                }
                c.published.store(ends.len() as u64 - 1, Ordering::Relaxed);
                let framed = ends.len() - 1;
                if behind == 0 {
                    if let Some(wait) = pace(started, rate, framed as u64) {
                        std::thread::sleep(wait);
                    }
                } else if written[next] < framed {
                    // One write per socket of all it has not had, walking the sockets in turn:
                    // an event framed during a walk reaches the rest of that walk, as fan-out's.
                    let from = ends[written[next]];
                    std::io::Write::write_all(&mut sockets[next], &frames[from..])?;
                    written[next] = framed;
                    behind -= 1;
                }
                next = (next + 1) % sockets.len();
            }
            c.done_publishing.store(true, Ordering::Relaxed);
            // The last events reach every socket.
            for (tcp, w) in sockets.iter_mut().zip(&written) {
                std::io::Write::write_all(tcp, &frames[ends[*w]..])?;
            }
            Ok((started.elapsed().as_secs_f64(), sockets))
        })
    };
    let cpu = CpuMeter::start();
    let (publish_secs, sockets) = tokio::task::spawn_blocking(move || writer.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the floor's writer panicked"))??;
    let cpu = cpu.stop();
    let label = format!("floor, {size} B, paced at {rate}/s");
    // Open until every subscriber is done, as a server's connections stay: a subscriber that
    // meets the end of its connection before its last event has stopped short.
    let report = report_fanout(&label, subs, 0, &c, publish_secs, cpu).await;
    drop(sockets);
    report
}

/// The floor's side of one subscriber's handshake.
fn floor_accept(listener: &std::net::TcpListener) -> anyhow::Result<std::net::TcpStream> {
    let (mut tcp, _) = listener.accept()?;
    tcp.set_nodelay(true)?;
    let command = handshake_subscriber(&mut tcp)?;
    anyhow::ensure!(command == "#s#+/fan", "unexpected command {command}");
    Ok(tcp)
}

/// A server's side of a subscriber's handshake, as the floor plays it: reads the upgrade
/// request, answers 101 and the intro, reads one client frame (the subscribe command) and
/// acknowledges it as key `s`. Returns the command, unmasked.
pub(crate) fn handshake_subscriber(tcp: &mut std::net::TcpStream) -> anyhow::Result<String> {
    use std::io::{Read, Write};
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        tcp.read_exact(&mut byte)?;
        head.push(byte[0]);
        anyhow::ensure!(head.len() < 8192, "request head too long");
    }
    // The tool's client checks only the status line.
    tcp.write_all(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    )?;
    let mut out = Vec::new();
    server_text_frame(&mut out, b"@0000000000.000000000:~/sid:floor");
    tcp.write_all(&out)?;
    let command = read_client_frame(tcp)?.1;
    out.clear();
    server_text_frame(&mut out, b"#s#@0000000000.000000000");
    tcp.write_all(&out)?;
    Ok(String::from_utf8(command)?)
}
