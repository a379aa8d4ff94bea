//! `fanout`'s and `floor`'s subscribers: a few plain threads, each polling its share of the
//! sockets with mio, rather than a tokio task per subscriber. A slow subscriber is one that the
//! thread stops reading for a while after every few events, and, if asked, reads nothing at all
//! for a while first (`Slow::stall`).
//!
//! Why not tokio tasks: against the same paced writer, tokio subscribers measured the same CPU
//! per delivery as plain threads but a longer tail, which the tool then reported as the server's
//! (a tokio worker runs a batch of ready tasks before it polls the sockets again, and a preempted
//! worker holds its queue of tasks). Side by side, one writer thread to 1,000 sockets at 400
//! events/s, p99 12.5-14.5 ms for tokio subscribers against 7.9-10.7 ms for these; the medians
//! were within 1 ms.

use crate::client::{client_frame, closed_by_server, upgrade_blocking, FrameBuf, ServerFrame};
use crate::fanout::{FanoutCounters, Seen, SubStats};
use fastwebsockets::OpCode;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// A subscriber silent this long gives up.
const SILENCE: Duration = Duration::from_secs(15);

/// A slow subscriber stops reading for `SLOW_PAUSE` after every `SLOW_EVENTS` events: about
/// 8,000 events/s, far below what an unpaced publisher sends, so it falls behind and reads from
/// the log, yet a run's backlog drains in seconds, not minutes.
const SLOW_EVENTS: u64 = 16;
const SLOW_PAUSE: Duration = Duration::from_millis(2);

/// Which subscribers are slow, and how.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Slow {
    /// The first this many subscribers are slow.
    pub(crate) count: usize,
    /// How long each slow one reads nothing at all once subscribed. At a paced rate the pause
    /// after every `SLOW_EVENTS` alone keeps up, and a stall is what builds a backlog past the
    /// server's buffers, so that it reads from the log.
    pub(crate) stall: Duration,
}

/// The receive buffer of a slow subscriber that stalls (`Slow::stall`), in bytes.
const STALLED_RECEIVE_BUFFER: usize = 4096;

/// Each subscriber's (is slow, stats), as a receiver thread ends.
type Ended = anyhow::Result<Vec<(bool, SubStats)>>;

/// The running receiver threads.
pub(crate) struct Receivers {
    threads: Vec<std::thread::JoinHandle<Ended>>,
}

impl Receivers {
    /// Connects and subscribes `subscribers` clients to `/fan` on `threads` threads (each
    /// connects its own share, the first `slow.count` dealt out among them as slow ones), and
    /// returns once all are subscribed. (The slow ones on a thread of their own measured worse
    /// for the fast ones: `fanout --rate 400 --slow-fraction 0.1`, 5 alternating pairs, p99
    /// median 13.6 ms against 10.7 ms as now, one more thread waking on two cores.)
    pub(crate) async fn start(
        addr: SocketAddr,
        subscribers: usize,
        slow: Slow,
        threads: usize,
        c: &FanoutCounters,
    ) -> anyhow::Result<Receivers> {
        let threads = threads.clamp(1, subscribers.max(1));
        let (ready_tx, mut ready_rx) = tokio::sync::mpsc::unbounded_channel();
        let mut handles = Vec::new();
        for t in 0..threads {
            // Subscribers t, t + threads, t + 2 * threads, ...; the first `slow.count` are slow.
            let is_slow: Vec<bool> = (t..subscribers)
                .step_by(threads)
                .map(|s| s < slow.count)
                .collect();
            let (c, ready) = (c.clone(), ready_tx.clone());
            let handle = std::thread::Builder::new()
                .name(format!("receiver-{t}"))
                .spawn(move || -> Ended {
                    let mut r = match Receiver::connect(addr, &is_slow, slow.stall) {
                        Ok(r) => r,
                        Err(e) => {
                            let _ = ready.send(Err(format!("{e:#}")));
                            return Err(e);
                        }
                    };
                    let _ = ready.send(Ok(()));
                    r.run(addr, &c)?;
                    Ok(r.conns
                        .into_iter()
                        .map(|conn| (conn.seen.is_slow(), conn.seen.into_stats()))
                        .collect())
                })?;
            handles.push(handle);
        }
        drop(ready_tx);
        for _ in 0..handles.len() {
            match ready_rx.recv().await {
                Some(Ok(())) => {}
                Some(Err(e)) => anyhow::bail!("a receiver could not subscribe: {e}"),
                None => anyhow::bail!("a receiver thread ended before it subscribed"),
            }
        }
        Ok(Receivers { threads: handles })
    }

    /// Waits for every receiver and returns each subscriber's (is slow, stats).
    pub(crate) async fn join(self) -> anyhow::Result<Vec<(bool, SubStats)>> {
        tokio::task::spawn_blocking(move || self.join_blocking()).await?
    }

    fn join_blocking(self) -> anyhow::Result<Vec<(bool, SubStats)>> {
        let mut all = Vec::new();
        for t in self.threads {
            let stats = t
                .join()
                .map_err(|_| anyhow::anyhow!("a receiver thread panicked"))??;
            all.extend(stats);
        }
        Ok(all)
    }
}

/// One subscriber on a receiver thread.
struct Conn {
    tcp: TcpStream,
    frames: FrameBuf,
    seen: Seen,
    /// A slow subscriber's pause: when it reads again.
    paused_until: Option<Instant>,
    /// When its socket last had something to read.
    heard: Instant,
    /// Finished (`Seen::is_finished`), and its socket closed.
    closed: bool,
}

/// A receiver thread's state: its sockets, registered with its poller by index.
struct Receiver {
    poll: Poll,
    conns: Vec<Conn>,
}

/// How reading one socket ended.
enum Drained {
    /// It would block: wait for the poller.
    Empty,
    /// The server closed the connection as lagging (1013): resume after the last event.
    Lagging,
    /// A slow subscriber had its share for now (`SLOW_EVENTS`).
    Paused,
}

impl Receiver {
    /// Subscribes one client per entry of `is_slow`; slow ones start with a pause of `stall`.
    fn connect(addr: SocketAddr, is_slow: &[bool], stall: Duration) -> anyhow::Result<Receiver> {
        let poll = Poll::new()?;
        let mut conns = Vec::with_capacity(is_slow.len());
        for (i, &slow) in is_slow.iter().enumerate() {
            let (tcp, frames) = subscribe(addr, b"#s#+/fan")?;
            let stalls = slow && !stall.is_zero();
            if stalls {
                // A stalled client's backlog waits at the server, not in its own socket: without
                // this, its receive buffer (128 KiB to start with, on Linux) took more than two
                // seconds of a paced run's events.
                socket2::SockRef::from(&tcp).set_recv_buffer_size(STALLED_RECEIVE_BUFFER)?;
            }
            let mut tcp = TcpStream::from_std(tcp);
            poll.registry()
                .register(&mut tcp, Token(i), Interest::READABLE)?;
            conns.push(Conn {
                tcp,
                frames,
                seen: Seen::new(slow),
                paused_until: stalls.then(|| Instant::now() + stall),
                heard: Instant::now(),
                closed: false,
            });
        }
        Ok(Receiver { poll, conns })
    }

    /// Reads until every subscriber has every event or has given up.
    fn run(&mut self, addr: SocketAddr, c: &FanoutCounters) -> anyhow::Result<()> {
        let mut events = Events::with_capacity(1024);
        // Events may already be buffered with the subscription's ack.
        let mut ready: Vec<usize> = (0..self.conns.len()).collect();
        let mut left = self.conns.len();
        let mut last_sweep = Instant::now();
        // Slow subscribers in a pause (a stall, at first).
        let mut paused: Vec<usize> = (0..self.conns.len())
            .filter(|&i| self.conns[i].paused_until.is_some())
            .collect();
        while left > 0 {
            for &i in &ready {
                let conn = &self.conns[i];
                if conn.closed {
                    continue;
                }
                if !conn.seen.is_finished(c) && conn.paused_until.is_none() {
                    self.read(addr, i, c);
                    if self.conns[i].paused_until.is_some() {
                        paused.push(i);
                    }
                }
                left -= usize::from(self.close_if_finished(i, c));
            }
            ready.clear();
            let first_due = paused
                .iter()
                .filter_map(|&i| self.conns[i].paused_until)
                .min();
            let timeout = first_due.map_or(Duration::from_millis(100), |due| {
                due.saturating_duration_since(Instant::now())
            });
            self.poll
                .poll(&mut events, Some(timeout.min(Duration::from_millis(100))))?;
            let now = Instant::now();
            for event in &events {
                let i = event.token().0;
                self.conns[i].heard = now;
                ready.push(i);
            }
            // Paused ones whose pause is over read again, whether or not more arrived.
            paused.retain(|&i| {
                let conn = &mut self.conns[i];
                if conn.paused_until.is_some_and(|due| due > now) {
                    return true;
                }
                conn.paused_until = None;
                conn.heard = now;
                ready.push(i);
                false
            });
            // Once in a while, the subscribers with nothing to read: they may have had every
            // event before the publisher said it was done, or have been silent too long.
            if now.duration_since(last_sweep) >= Duration::from_millis(100) {
                last_sweep = now;
                for i in 0..self.conns.len() {
                    let conn = &mut self.conns[i];
                    if !conn.closed
                        && !conn.seen.has_all(c)
                        && now.duration_since(conn.heard) >= SILENCE
                    {
                        conn.seen.give_up("15 s without a message".to_string());
                    }
                    left -= usize::from(self.close_if_finished(i, c));
                }
            }
        }
        Ok(())
    }

    /// Closes subscriber `i` if it has just finished: the server need not write more to it.
    fn close_if_finished(&mut self, i: usize, c: &FanoutCounters) -> bool {
        let conn = &mut self.conns[i];
        if conn.closed || !conn.seen.is_finished(c) {
            return false;
        }
        let _ = self.poll.registry().deregister(&mut conn.tcp);
        let _ = conn.tcp.shutdown(std::net::Shutdown::Both);
        conn.seen.count_deliveries(c);
        conn.closed = true;
        true
    }

    /// Reads subscriber `i`'s socket until it would block, through any number of resumptions.
    fn read(&mut self, addr: SocketAddr, i: usize, c: &FanoutCounters) {
        loop {
            match self.conns[i].drain(c) {
                Ok(Drained::Empty) => return,
                Ok(Drained::Paused) => {
                    self.conns[i].paused_until = Some(Instant::now() + SLOW_PAUSE);
                    return;
                }
                // Read on at once: events may have come with the new subscription's ack.
                Ok(Drained::Lagging) => match self.resume(addr, i) {
                    Ok(()) => {}
                    Err(e) => return self.conns[i].seen.give_up(format!("resuming: {e:#}")),
                },
                Err(e) => return self.conns[i].seen.give_up(format!("{e:#}")),
            }
        }
    }

    /// Replaces subscriber `i`'s connection, closed as lagging, by one that resumes after the
    /// last event it had, as the protocol page tells clients to.
    fn resume(&mut self, addr: SocketAddr, i: usize) -> anyhow::Result<()> {
        let conn = &mut self.conns[i];
        self.poll.registry().deregister(&mut conn.tcp)?;
        let (tcp, frames) = subscribe(addr, &conn.seen.resume_command())?;
        conn.tcp = TcpStream::from_std(tcp);
        conn.frames = frames;
        conn.seen.note_resumed();
        self.poll
            .registry()
            .register(&mut conn.tcp, Token(i), Interest::READABLE)?;
        conn.heard = Instant::now();
        Ok(())
    }
}

impl Conn {
    /// Reads the socket until it would block, counting every event (a slow subscriber stops
    /// at its share).
    fn drain(&mut self, c: &FanoutCounters) -> anyhow::Result<Drained> {
        loop {
            if let Some(stop) = self.take_frames(c)? {
                return Ok(stop);
            }
            let space = self.frames.space()?;
            let room = space.len();
            match self.tcp.read(space) {
                Ok(n) => {
                    self.frames.filled(n)?;
                    // Linux acknowledges a small segment at once when a read empties the
                    // socket, unless the socket is in "ping-pong" mode, which this enters and
                    // which a delayed-ACK timeout leaves (hence after every read). Then a
                    // subscriber acknowledges every other segment: on loopback the ACKs are
                    // this thread's work. (Measured under `fanout --rate 400`, 6 alternating
                    // pairs: 128 K ACKs/s -> 69-76 K, the tool's CPU 0.88 -> 0.75 cores, p99
                    // median 12.4 -> 11.2 ms.)
                    #[cfg(any(target_os = "linux", target_os = "android"))]
                    let _ = socket2::SockRef::from(&self.tcp).set_tcp_quickack(false);
                    // A short read emptied the socket. What arrives later is a new readiness
                    // event (mio's are edge-triggered), so no second read needs to see it block.
                    if n < room {
                        return Ok(self.take_frames(c)?.unwrap_or(Drained::Empty));
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(Drained::Empty),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Handles every whole frame buffered; `Some` at a lagging close, or when a slow subscriber
    /// has had its share for now.
    fn take_frames(&mut self, c: &FanoutCounters) -> anyhow::Result<Option<Drained>> {
        while let Some(frame) = self.frames.next()? {
            match frame {
                ServerFrame::Text(payload) => {
                    let counted = self.seen.event(payload, c);
                    let is_slow = self.seen.is_slow();
                    if is_slow && counted && self.seen.received().is_multiple_of(SLOW_EVENTS) {
                        return Ok(Some(Drained::Paused));
                    }
                }
                ServerFrame::Ping(payload) => {
                    let pong = client_frame(OpCode::Pong, payload);
                    write_now(&mut self.tcp, &pong)?;
                }
                ServerFrame::Close(payload) if payload.starts_with(&1013u16.to_be_bytes()) => {
                    return Ok(Some(Drained::Lagging))
                }
                ServerFrame::Close(payload) => anyhow::bail!(closed_by_server(payload)),
                ServerFrame::Other => {}
            }
        }
        Ok(None)
    }
}

/// Writes a short control frame on a non-blocking socket whose send buffer is all but empty (a
/// subscriber sends nothing else); a socket that cannot take it now is an error, not a wait.
fn write_now(tcp: &mut TcpStream, bytes: &[u8]) -> anyhow::Result<()> {
    let n = tcp.write(bytes)?;
    anyhow::ensure!(
        n == bytes.len(),
        "a pong did not fit the socket's send buffer"
    );
    Ok(())
}

/// Opens a subscriber's connection and sends `command`, a subscription keyed `s`: blocking until
/// it is acknowledged, then non-blocking, with what was read after the ack still buffered.
fn subscribe(addr: SocketAddr, command: &[u8]) -> anyhow::Result<(std::net::TcpStream, FrameBuf)> {
    let mut tcp = upgrade_blocking(addr)?;
    tcp.write_all(&client_frame(OpCode::Text, command))?;
    let mut frames = FrameBuf::new();
    loop {
        match frames.next()? {
            Some(ServerFrame::Text(payload)) if payload.starts_with(b"#s#") => break,
            Some(ServerFrame::Ping(payload)) => {
                tcp.write_all(&client_frame(OpCode::Pong, payload))?;
            }
            Some(ServerFrame::Close(payload)) => anyhow::bail!(closed_by_server(payload)),
            // The intro, or anything else before the ack.
            Some(_) => {}
            None => {
                let n = tcp.read(frames.space()?)?;
                frames.filled(n)?;
            }
        }
    }
    tcp.set_nonblocking(true)?;
    Ok((tcp, frames))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::{read_client_frame, server_text_frame};
    use crate::floor::handshake_subscriber;
    use std::net::TcpListener;
    use std::sync::atomic::Ordering;

    /// The server side of one subscriber's connection, by hand (the floor's handshake): returns
    /// its subscribe command, acknowledged.
    fn accept_subscriber(listener: &TcpListener) -> anyhow::Result<(std::net::TcpStream, String)> {
        let (mut tcp, _) = listener.accept()?;
        // A receiver that never answers fails the test rather than hanging it.
        tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
        let command = handshake_subscriber(&mut tcp)?;
        Ok((tcp, command))
    }

    fn events(seqs: std::ops::Range<u64>) -> Vec<u8> {
        let mut out = Vec::new();
        for s in seqs {
            let line = format!(
                "@{:010}.000000000:/fan:{s}:{}:pad",
                s + 1,
                crate::now_nanos()
            );
            server_text_frame(&mut out, line.as_bytes());
        }
        out
    }

    #[tokio::test]
    async fn a_receiver_answers_pings_and_resumes_after_a_lagging_close() -> anyhow::Result<()> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let server = std::thread::spawn(move || -> anyhow::Result<String> {
            let (mut first, command) = accept_subscriber(&listener)?;
            anyhow::ensure!(command == "#s#+/fan", "first command {command}");
            first.write_all(&events(0..5))?;
            first.write_all(&[0x89, 0x02, b'h', b'i'])?;
            let pong = read_client_frame(&mut first)?;
            anyhow::ensure!(pong == (0xA, b"hi".to_vec()), "pong {pong:?}");
            first.write_all(&[0x88, 0x02, 0x03, 0xf5])?;
            let (mut second, resume) = accept_subscriber(&listener)?;
            second.write_all(&events(5..10))?;
            // Held open until the receiver has had everything and closes its side.
            let mut rest = Vec::new();
            second.read_to_end(&mut rest)?;
            Ok(resume)
        });
        let c = FanoutCounters::new();
        c.published.store(10, Ordering::Relaxed);
        c.done_publishing.store(true, Ordering::Relaxed);
        let stats = Receivers::start(addr, 1, Slow::default(), 1, &c)
            .await?
            .join()
            .await?;
        let resume = tokio::task::spawn_blocking(move || server.join())
            .await?
            .map_err(|_| anyhow::anyhow!("the server thread panicked"))??;
        assert_eq!(
            resume, "#s#+/fan@0000000005.000000000",
            "after the last event had"
        );
        assert_eq!(stats.len(), 1);
        let (slow, st) = &stats[0];
        assert!(!slow);
        assert_eq!(st.gave_up, None);
        assert_eq!((st.unique, st.duplicated, st.resumed), (10, 0, 1));
        assert_eq!(c.delivered.load(Ordering::Relaxed), 10);
        Ok(())
    }

    /// A stalled slow subscriber reads nothing until its stall ends, then reads everything.
    #[tokio::test]
    async fn a_stalled_subscriber_reads_only_after_its_stall() -> anyhow::Result<()> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let server = std::thread::spawn(move || -> anyhow::Result<()> {
            let (mut sub, _) = accept_subscriber(&listener)?;
            sub.write_all(&events(0..40))?;
            let mut rest = Vec::new();
            sub.read_to_end(&mut rest)?;
            Ok(())
        });
        let c = FanoutCounters::new();
        c.published.store(40, Ordering::Relaxed);
        c.done_publishing.store(true, Ordering::Relaxed);
        let stall = Duration::from_millis(300);
        let started = Instant::now();
        let slow = Slow { count: 1, stall };
        let stats = Receivers::start(addr, 1, slow, 1, &c).await?.join().await?;
        assert!(started.elapsed() >= stall, "{:?}", started.elapsed());
        tokio::task::spawn_blocking(move || server.join())
            .await?
            .map_err(|_| anyhow::anyhow!("the server thread panicked"))??;
        let (is_slow, st) = &stats[0];
        assert!(is_slow);
        assert_eq!(st.gave_up, None);
        assert_eq!((st.unique, st.duplicated), (40, 0));
        Ok(())
    }
}
