//! `ivy-bench`: the load tool. It starts `ivy serve` as a child process on a temporary data
//! directory (or uses `--addr` of a running server) and measures, over loopback:
//! - `publish`: acknowledged publishes/s from C connections, each keeping a window of
//!   unacknowledged keyed publishes, and the ack latency percentiles;
//! - `fanout`: 1 publisher to S subscribers of one channel: deliveries/s, publish-to-delivery
//!   latency percentiles, and counts of lost, duplicated and reordered events (every event
//!   carries a sequence number); optionally paced and with a share of deliberately slow readers;
//! - `history`: last-N reads over keep-alive connections: requests/s and latency percentiles;
//! - `idle`: N idle WebSocket connections, and the server's resident memory with them open.
//!
//! The client side uses one tokio runtime, and does no per-message allocation beyond what parsing
//! needs, so that it is not the bottleneck: each run reports the CPU the server and the tool
//! used (`CpuMeter`). WebSocket clients write frames with fastwebsockets and parse what they read
//! in place from large reads (`FrameReader`); history readers speak plain HTTP/1.1.

use clap::{Parser, Subcommand};
use fastwebsockets::{Frame, Payload, Role, WebSocketWrite};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

/// Prints a line of the report. When the reader of standard output has gone (`| head`), the
/// rest is dropped rather than panicking, so the run still ends normally and stops its server.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout().lock(), $($arg)*) {
            if e.kind() != std::io::ErrorKind::BrokenPipe {
                eprintln!("ivy-bench: cannot write the report: {e}");
            }
        }
    }};
}

#[derive(Parser)]
#[command(name = "ivy-bench", about = "Load tool for ivy serve")]
struct Cli {
    /// A running server; without it, `ivy serve` is started on a temporary directory.
    #[arg(long, global = true)]
    addr: Option<SocketAddr>,
    /// Durability of the spawned server.
    #[arg(long, global = true, default_value = "always")]
    durability: String,
    /// Seconds to measure.
    #[arg(long, global = true, default_value_t = 10)]
    seconds: u64,
    /// The process id of the `--addr` server, so that its CPU is reported beside the tool's
    /// (a spawned server's is known).
    #[arg(long, global = true)]
    server_pid: Option<u32>,
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    Publish {
        #[arg(long, default_value_t = 4)]
        connections: usize,
        #[arg(long, default_value_t = 256)]
        window: usize,
        #[arg(long, default_value_t = 100)]
        size: usize,
        /// Distinct channels, spread over the connections.
        #[arg(long, default_value_t = 4)]
        paths: usize,
    },
    Fanout {
        #[arg(long, default_value_t = 1000)]
        subscribers: usize,
        #[arg(long, default_value_t = 100)]
        size: usize,
        /// Events per second from the publisher; 0 publishes as fast as acks allow.
        #[arg(long, default_value_t = 0)]
        rate: u64,
        /// Unacknowledged publishes in flight when unpaced.
        #[arg(long, default_value_t = 256)]
        window: usize,
        /// Share of subscribers that read slowly (they must catch up from the log).
        #[arg(long, default_value_t = 0.0)]
        slow_fraction: f64,
    },
    /// The machine's floor for `fanout` (no server; see `floor`).
    Floor {
        #[arg(long, default_value_t = 1000)]
        subscribers: usize,
        #[arg(long, default_value_t = 100)]
        size: usize,
        /// Events per second (the floor is for paced runs).
        #[arg(long, default_value_t = 400, value_parser = clap::value_parser!(u64).range(1..))]
        rate: u64,
    },
    History {
        #[arg(long, default_value_t = 32)]
        connections: usize,
        #[arg(long, default_value_t = 100)]
        n: usize,
        /// Events written to the channel first.
        #[arg(long, default_value_t = 100_000)]
        events: usize,
    },
    Idle {
        #[arg(long, default_value_t = 10_000)]
        connections: usize,
    },
}

struct Spawned {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_server(durability: &str) -> anyhow::Result<(SocketAddr, Spawned)> {
    let exe = std::env::current_exe()?.with_file_name("ivy");
    let dir = tempfile::tempdir()?;
    let mut child = Command::new(&exe)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--durability",
            durability,
            "--log",
            "warn",
        ])
        .arg("--data")
        .arg(dir.path())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| anyhow::anyhow!("cannot start {}: {e}", exe.display()))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)?;
    let addr = ivy::server::listening_addr(&line)
        .ok_or_else(|| anyhow::anyhow!("unexpected first line: {line}"))?;
    Ok((addr, Spawned { child, _dir: dir }))
}

fn server_rss_kib(pid: u32) -> Option<u64> {
    ivy::metrics::resident_bytes(pid).map(|b| b / 1024)
}

type Writer = WebSocketWrite<tokio::io::BufWriter<OwnedWriteHalf>>;

/// Opens a WebSocket with subprotocol ivy1 and reads the intro.
async fn connect(addr: SocketAddr) -> anyhow::Result<(FrameReader, Writer)> {
    let (read, mut w) = upgrade(addr).await?;
    let mut frames = FrameReader::new(read);
    frames.next_text(&mut w).await?;
    Ok((frames, w))
}

/// Upgrades a new connection to a WebSocket with subprotocol ivy1; returns the socket's read
/// half, with no byte of the WebSocket consumed, and a frame writer on its write half.
async fn upgrade(addr: SocketAddr) -> anyhow::Result<(OwnedReadHalf, Writer)> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let (mut read, mut write) = tcp.into_split();
    write
        .write_all(
            format!(
                "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: ivy1\r\n\r\n"
            )
            .as_bytes(),
        )
        .await?;
    // Read the response head byte by byte, so no WebSocket byte is consumed with it.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let b = read.read_u8().await?;
        head.push(b);
        anyhow::ensure!(head.len() < 8192, "response head too long");
    }
    anyhow::ensure!(
        head.starts_with(b"HTTP/1.1 101"),
        "upgrade refused: {}",
        String::from_utf8_lossy(&head)
    );
    // Frames go through a buffer and are flushed when the sender has nothing more to send, so
    // the tool makes one write per batch, not per message, and is not the bottleneck. (The
    // writer is taken from a split over no reader: the read half is returned raw.)
    let write = tokio::io::BufWriter::with_capacity(64 * 1024, write);
    let (_, mut w) = fastwebsockets::after_handshake_split(tokio::io::empty(), write, Role::Client);
    w.set_auto_apply_mask(true);
    w.set_writev(false);
    Ok((read, w))
}

/// The sequence number and send time of a fan-out event, `@TS:/fan:SEQ:SENT_NANOS:padding`,
/// parsed in place; `None` for another message.
fn fanout_fields(payload: &[u8]) -> Option<(u64, u64)> {
    let mut fields = payload.split(|&b| b == b':').skip(2);
    let mut number = || fields.next().and_then(decimal);
    number().zip(number())
}

/// A field of ASCII digits as a number (parsed from the bytes: going through `str` was 7% of
/// the subscribers' CPU).
fn decimal(field: &[u8]) -> Option<u64> {
    if field.is_empty() {
        return None;
    }
    field.iter().try_fold(0u64, |n, &b| {
        let digit = b.checked_sub(b'0').filter(|d| *d < 10)?;
        n.checked_mul(10)?.checked_add(u64::from(digit))
    })
}

/// Answers a ping now.
async fn pong(w: &mut Writer, payload: &[u8]) -> anyhow::Result<()> {
    w.write_frame(Frame::pong(Payload::Owned(payload.to_vec())))
        .await?;
    w.flush().await?;
    Ok(())
}

/// Sends one message now.
async fn send(w: &mut Writer, text: &[u8]) -> anyhow::Result<()> {
    w.write_frame(Frame::text(Payload::Borrowed(text))).await?;
    w.flush().await?;
    Ok(())
}

/// Queues one message in the write buffer (flushed when full or by `flush`).
async fn send_buffered(w: &mut Writer, text: &[u8]) -> anyhow::Result<()> {
    w.write_frame(Frame::text(Payload::Borrowed(text))).await?;
    Ok(())
}

/// Waits for a window slot, flushing what is buffered first if none is free; true when it had
/// to wait.
async fn slot(permits: &tokio::sync::Semaphore, w: &mut Writer) -> anyhow::Result<bool> {
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

fn percentiles(label: &str, mut micros: Vec<u64>) {
    if micros.is_empty() {
        say!("{label}: no samples");
        return;
    }
    micros.sort_unstable();
    let at = |p: f64| micros[((micros.len() as f64 - 1.0) * p) as usize];
    say!(
        "{label}: p50 {:.3} ms, p90 {:.3} ms, p99 {:.3} ms, max {:.3} ms ({} samples)",
        at(0.50) as f64 / 1000.0,
        at(0.90) as f64 / 1000.0,
        at(0.99) as f64 / 1000.0,
        at(1.0) as f64 / 1000.0,
        micros.len()
    );
}

/// Lets the load run one second to warm up, then counts what `counter` gains over `seconds`;
/// returns (count, seconds measured, the CPU spent meanwhile).
async fn measure_window(counter: &AtomicU64, seconds: u64) -> (u64, f64, CpuUse) {
    tokio::time::sleep(Duration::from_secs(1)).await;
    let warm = counter.load(Ordering::Relaxed);
    let cpu = CpuMeter::start();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let cpu = cpu.stop();
    (counter.load(Ordering::Relaxed) - warm, cpu.secs, cpu)
}

/// The server's process id, when known (`main` sets it once).
static SERVER_PID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();

/// CPU time over a measured window: the server's, the tool's and the machine's idle share, read
/// from `/proc`. The tool shares the cores with the server, so every report says what each took:
/// a run in which the tool takes most of the CPU measures the tool, not the server.
struct CpuMeter {
    from: CpuSample,
    wall: Instant,
}

/// What `CpuMeter::stop` measured.
struct CpuUse {
    from: CpuSample,
    to: CpuSample,
    /// The window's length.
    secs: f64,
}

#[derive(Clone, Copy)]
struct CpuSample {
    /// (user, system) clock ticks of each process.
    server: Option<(u64, u64)>,
    tool: Option<(u64, u64)>,
    /// (idle, total) ticks of all cores.
    machine: Option<(u64, u64)>,
}

impl CpuSample {
    fn now() -> CpuSample {
        CpuSample {
            server: SERVER_PID
                .get()
                .and_then(|pid| process_ticks(&pid.to_string())),
            tool: process_ticks("self"),
            machine: machine_ticks(),
        }
    }
}

/// utime and stime of `/proc/PID/stat` (fields 14 and 15, counted after the parenthesised name,
/// which may hold spaces).
fn process_ticks(pid: &str) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace().skip(11);
    Some((fields.next()?.parse().ok()?, fields.next()?.parse().ok()?))
}

/// The idle (idle + iowait) and total ticks of the `cpu` line of `/proc/stat`.
fn machine_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let ticks: Vec<u64> = stat
        .lines()
        .next()?
        .strip_prefix("cpu ")?
        .split_whitespace()
        .filter_map(|t| t.parse().ok())
        .collect();
    let idle = ticks.get(3)? + ticks.get(4)?;
    // guest and guest_nice are already counted in user and nice.
    Some((idle, ticks.iter().take(8).sum()))
}

impl CpuMeter {
    fn start() -> CpuMeter {
        CpuMeter {
            from: CpuSample::now(),
            wall: Instant::now(),
        }
    }

    fn stop(self) -> CpuUse {
        CpuUse {
            from: self.from,
            to: CpuSample::now(),
            secs: self.wall.elapsed().as_secs_f64(),
        }
    }
}

impl CpuUse {
    /// `/proc` counts in USER_HZ ticks, 100 a second on Linux (10 ms: a window of seconds is
    /// needed for a useful figure).
    const TICKS_PER_SEC: f64 = 100.0;

    /// Prints the CPU each side took, in cores and per `unit` (`units` done in the window).
    fn report(&self, units: u64, unit: &str) {
        let to = self.to;
        let per = |ticks: u64| {
            let secs = ticks as f64 / Self::TICKS_PER_SEC;
            let per_unit = if units == 0 {
                0.0
            } else {
                secs * 1e6 / units as f64
            };
            (secs / self.secs, per_unit)
        };
        let mut parts = Vec::new();
        for (name, from, to) in [
            ("server", self.from.server, to.server),
            ("ivy-bench", self.from.tool, to.tool),
        ] {
            if let (Some((u0, s0)), Some((u1, s1))) = (from, to) {
                let (cores, us) = per((u1 + s1).saturating_sub(u0 + s0));
                let (user, _) = per(u1.saturating_sub(u0));
                parts.push(format!(
                    "{name} {cores:.2} cores ({user:.2} user), {us:.2} us/{unit}"
                ));
            }
        }
        if let (Some((i0, t0)), Some((i1, t1))) = (self.from.machine, to.machine) {
            let total = t1.saturating_sub(t0).max(1);
            parts.push(format!(
                "machine {:.0}% idle",
                100.0 * i1.saturating_sub(i0) as f64 / total as f64
            ));
        }
        say!("cpu: {}", parts.join("; "));
    }
}

fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

async fn publish(
    addr: SocketAddr,
    seconds: u64,
    connections: usize,
    window: usize,
    size: usize,
    paths: usize,
) -> anyhow::Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let refusals = Refusals::default();
    let mut tasks = Vec::new();
    for c in 0..connections {
        let (mut frames, mut w) = connect(addr).await?;
        let stop = Arc::clone(&stop);
        let acked = Arc::clone(&acked);
        let refusals = refusals.clone();
        let path = format!("/bench/p{}", c % paths.max(1));
        tasks.push(tokio::spawn(async move {
            let data = "x".repeat(size);
            let sent_at = Arc::new(parking_lot::Mutex::new(
                std::collections::VecDeque::<Instant>::new(),
            ));
            let permits = Arc::new(tokio::sync::Semaphore::new(window));
            let reader = {
                let sent_at = Arc::clone(&sent_at);
                let permits = Arc::clone(&permits);
                let acked = Arc::clone(&acked);
                // Acks are taken a read at a time: one clock read, one lock, one permit
                // release and one counter update per read, not per ack (per-ack costs were a
                // quarter of this tool's CPU).
                tokio::spawn(async move {
                    let mut lat = Vec::new();
                    let mut answers = 0usize;
                    let mut taken = 0u64;
                    loop {
                        let now = Instant::now();
                        {
                            // A block, not `drop`: the guard must not live across the `await`.
                            let mut sent_at = sent_at.lock();
                            loop {
                                let payload = match frames.next() {
                                    Ok(Some(ServerFrame::Text(payload))) => payload,
                                    Ok(Some(ServerFrame::Other | ServerFrame::Ping(_))) => continue,
                                    Ok(None) => break,
                                    Ok(Some(ServerFrame::Close(_))) | Err(_) => return lat,
                                };
                                if !payload.starts_with(b"#") {
                                    continue;
                                }
                                let sent = sent_at.pop_front();
                                answers += 1;
                                if refusals.note(payload) {
                                    continue;
                                }
                                if let Some(t) = sent {
                                    lat.push(now.saturating_duration_since(t).as_micros() as u64);
                                }
                                taken += 1;
                            }
                        }
                        permits.add_permits(std::mem::take(&mut answers));
                        acked.fetch_add(std::mem::take(&mut taken), Ordering::Relaxed);
                        if frames.fill().await.is_err() {
                            return lat;
                        }
                    }
                })
            };
            let mut i = 0u64;
            let mut line = Vec::with_capacity(size + 64);
            let mut digits = itoa::Buffer::new();
            let mut now = Instant::now();
            // A pipelining client: every message the window allows right now goes out in one
            // write; it waits (after flushing) only when the window is full. The send time is
            // read after each wait and every 32 messages, not per message (clock reads and a
            // `format!` per message were a third of this loop's CPU, which the server shares):
            // a message's latency may count up to 32 messages of buffering, never less than
            // its own.
            while !stop.load(Ordering::Relaxed) {
                match slot(&permits, &mut w).await {
                    Err(_) => break,
                    Ok(waited) => {
                        if waited || i.is_multiple_of(32) {
                            now = Instant::now();
                        }
                    }
                }
                line.clear();
                line.push(b'#');
                line.extend_from_slice(digits.format(i).as_bytes());
                line.extend_from_slice(b"#:");
                line.extend_from_slice(path.as_bytes());
                line.push(b':');
                line.extend_from_slice(data.as_bytes());
                sent_at.lock().push_back(now);
                if send_buffered(&mut w, &line).await.is_err() {
                    break;
                }
                i += 1;
            }
            let _ = w.flush().await;
            // Let the outstanding acks arrive, then close.
            tokio::time::sleep(Duration::from_millis(500)).await;
            let _ = w.write_frame(Frame::close(1000, b"")).await;
            let _ = w.flush().await;
            reader.await.unwrap_or_default()
        }));
    }
    let started = Instant::now();
    let (done, elapsed, cpu) = measure_window(&acked, seconds).await;
    stop.store(true, Ordering::Relaxed);
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await?);
    }
    say!(
        "publish: {connections} connections, window {window}, {size} B: {:.0} acknowledged events/s over {elapsed:.1} s ({} total in {:.1} s)",
        done as f64 / elapsed,
        lat.len(),
        started.elapsed().as_secs_f64()
    );
    percentiles("ack latency", lat);
    cpu.report(done, "event");
    refusals.check()
}

/// Answers `#KEY#!reason`: a refused publish is not an acknowledged one, and a run that had
/// any is reported as failed rather than measured.
#[derive(Clone, Default)]
struct Refusals(Arc<parking_lot::Mutex<(u64, Option<String>)>>);

impl Refusals {
    /// Whether `answer` (`#KEY#...`) is a refusal; counts it, keeping the first reason.
    fn note(&self, answer: &[u8]) -> bool {
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

    fn check(&self) -> anyhow::Result<()> {
        match &*self.0.lock() {
            (0, _) => Ok(()),
            (n, reason) => anyhow::bail!(
                "the server refused {n} publishes (first: {}); the figures above are not valid",
                reason.as_deref().unwrap_or("?")
            ),
        }
    }
}

#[derive(Default)]
struct SubStats {
    received: u64,
    unique: u64,
    duplicated: u64,
    reordered: u64,
    /// Times the server closed the connection as lagging (1013) and it resumed.
    resumed: u64,
    latencies: Vec<u64>,
}

/// The sequence numbers a subscriber has seen, one bit each (they are dense from 0).
#[derive(Default)]
struct SeqBits(Vec<u64>);

impl SeqBits {
    /// Whether `seq` is new.
    fn insert(&mut self, seq: u64) -> bool {
        let (word, bit) = ((seq / 64) as usize, seq % 64);
        if word >= self.0.len() {
            self.0.resize(word + 1, 0);
        }
        let was = self.0[word] & (1 << bit) != 0;
        self.0[word] |= 1 << bit;
        !was
    }
}

/// What the subscribers share with the publisher.
#[derive(Clone)]
struct FanoutCounters {
    published: Arc<AtomicU64>,
    delivered: Arc<AtomicU64>,
    done_publishing: Arc<AtomicBool>,
}

impl FanoutCounters {
    fn new() -> FanoutCounters {
        FanoutCounters {
            published: Arc::new(AtomicU64::new(0)),
            delivered: Arc::new(AtomicU64::new(0)),
            done_publishing: Arc::new(AtomicBool::new(false)),
        }
    }
}

/// Connects and subscribes `subscribers` clients to `/fan` (the first `slow_count` read slowly)
/// and starts their reading loops; each task ends with (is slow, stats).
async fn start_subscribers(
    addr: SocketAddr,
    subscribers: usize,
    slow_count: usize,
    c: &FanoutCounters,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<(bool, SubStats)>>> {
    let mut subs = Vec::new();
    for s in 0..subscribers {
        let (frames, w) = subscribe(addr, b"#s#+/fan").await?;
        let is_slow = s < slow_count;
        let c = c.clone();
        subs.push(tokio::spawn(async move {
            (is_slow, subscriber(addr, frames, w, is_slow, c).await)
        }));
    }
    Ok(subs)
}

/// Connects and sends `command`, a subscription keyed `s`; returns once it is acknowledged.
async fn subscribe(addr: SocketAddr, command: &[u8]) -> anyhow::Result<(FrameReader, Writer)> {
    let (mut frames, mut w) = connect(addr).await?;
    send(&mut w, command).await?;
    while !frames.next_text(&mut w).await?.starts_with(b"#s#") {}
    Ok((frames, w))
}

/// One subscriber's reading loop: until it has every published event, or 15 s of silence. Closed
/// as lagging (1013), it resumes from the last event it had, as the protocol page tells clients
/// to: slow subscribers fall that far behind whenever the publisher outruns them for long.
async fn subscriber(
    addr: SocketAddr,
    mut frames: FrameReader,
    mut w: Writer,
    is_slow: bool,
    c: FanoutCounters,
) -> SubStats {
    let mut seen = Seen::default();
    while !seen.has_all(&c) {
        // One silence timer per read from the socket, not one per message: racing a timer
        // against every message (and reading the clock to re-arm it) was a fifth of the
        // subscribers' CPU, and they share the server's cores.
        let batch = read_batch(&mut frames, &mut w, is_slow, &c, &mut seen);
        match tokio::time::timeout(Duration::from_secs(15), batch).await {
            Ok(Ok(Batch::Read)) => {}
            Ok(Ok(Batch::Lagging)) => {
                let mut command = b"#s#+/fan".to_vec();
                command.extend_from_slice(&seen.last_id);
                match subscribe(addr, &command).await {
                    Ok((f, writer)) => (frames, w) = (f, writer),
                    Err(_) => break,
                }
                seen.st.resumed += 1;
            }
            Ok(Err(_)) | Err(_) => break,
        }
    }
    c.delivered.fetch_add(seen.uncounted, Ordering::Relaxed);
    seen.st
}

/// What one subscriber has received so far.
#[derive(Default)]
struct Seen {
    st: SubStats,
    bits: SeqBits,
    /// One past the largest sequence number seen.
    next: u64,
    /// Deliveries not yet added to the shared counter.
    uncounted: u64,
    /// `@TS` of the last event received, to resume after.
    last_id: Vec<u8>,
}

impl Seen {
    fn has_all(&self, c: &FanoutCounters) -> bool {
        c.done_publishing.load(Ordering::Relaxed)
            && self.st.unique >= c.published.load(Ordering::Relaxed)
    }

    /// Counts event `seq`, sent at `sent` (ns since the epoch). No set, no clock read and no
    /// shared counter update per message (each showed in a profile of this loop): latency is
    /// sampled and deliveries are published every 16th message.
    fn note(&mut self, seq: u64, sent: u64, is_slow: bool, c: &FanoutCounters) {
        let st = &mut self.st;
        st.received += 1;
        self.uncounted += 1;
        if self.uncounted == 16 {
            c.delivered.fetch_add(self.uncounted, Ordering::Relaxed);
            self.uncounted = 0;
        }
        if !self.bits.insert(seq) {
            st.duplicated += 1;
        } else {
            st.unique += 1;
            if seq < self.next {
                st.reordered += 1;
            }
            self.next = self.next.max(seq + 1);
        }
        if !is_slow && st.received.is_multiple_of(16) {
            st.latencies.push(now_nanos().saturating_sub(sent) / 1000);
        }
    }
}

/// How `read_batch` ended.
enum Batch {
    /// It counted what was buffered and read more.
    Read,
    /// The server closed the connection as lagging (1013).
    Lagging,
}

/// Counts every fan-out event already buffered, then reads the socket once. Dropped mid-way
/// (by the silence timer), it loses nothing already counted.
async fn read_batch(
    frames: &mut FrameReader,
    w: &mut Writer,
    is_slow: bool,
    c: &FanoutCounters,
    seen: &mut Seen,
) -> anyhow::Result<Batch> {
    while let Some(frame) = frames.next()? {
        match frame {
            ServerFrame::Text(payload) => {
                if let Some((seq, sent)) = fanout_fields(payload) {
                    seen.note(seq, sent, is_slow, c);
                    let id = payload.split(|&b| b == b':').next().unwrap_or_default();
                    seen.last_id.clear();
                    seen.last_id.extend_from_slice(id);
                    if is_slow && seen.st.received.is_multiple_of(16) {
                        // At most 16 events per 2 ms, about 8,000/s: far below what the
                        // publisher sends, so a slow subscriber falls behind and reads from the
                        // log, yet a run's backlog drains in seconds, not minutes.
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                }
            }
            ServerFrame::Ping(payload) => pong(w, payload).await?,
            ServerFrame::Close(payload) if payload.starts_with(&1013u16.to_be_bytes()) => {
                return Ok(Batch::Lagging)
            }
            ServerFrame::Close(payload) => {
                anyhow::bail!("closed by the server: {:?}", payload.get(..2))
            }
            ServerFrame::Other => {}
        }
        if seen.has_all(c) {
            return Ok(Batch::Read);
        }
    }
    frames.fill().await?;
    Ok(Batch::Read)
}

/// A frame from the server, borrowed from the reader's buffer.
enum ServerFrame<'a> {
    Text(&'a [u8]),
    Ping(&'a [u8]),
    Close(&'a [u8]),
    Other,
}

/// The subscribers' reader: server-to-client frames (whole and unmasked, RFC 6455 section 5.2)
/// parsed in place from one buffer filled by large reads. fastwebsockets reads one frame per
/// call, with a future, a buffer reservation, a shared split and a UTF-8 check each; at 4 M
/// frames/s that was half of the subscribers' CPU, on the cores the server shares. The tool's
/// clients only need each frame's bounds, so they all read this way (the server uses
/// fastwebsockets).
struct FrameReader {
    tcp: OwnedReadHalf,
    buf: Vec<u8>,
    /// `buf[at..end]` is read and not yet parsed.
    at: usize,
    end: usize,
}

impl FrameReader {
    /// A frame larger than this is refused (the server's events here are about 100 B).
    const FRAME_MAX: usize = 16 << 20;

    fn new(tcp: OwnedReadHalf) -> FrameReader {
        FrameReader {
            tcp,
            buf: vec![0; 64 * 1024],
            at: 0,
            end: 0,
        }
    }

    /// The next frame if it is wholly buffered.
    fn next(&mut self) -> anyhow::Result<Option<ServerFrame<'_>>> {
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

    /// Reads once more from the socket, first moving a partial frame to the buffer's start.
    async fn fill(&mut self) -> anyhow::Result<()> {
        self.buf.copy_within(self.at..self.end, 0);
        self.end -= self.at;
        self.at = 0;
        if self.end == self.buf.len() {
            anyhow::ensure!(self.buf.len() < Self::FRAME_MAX, "frame too large");
            self.buf.resize(self.buf.len() * 2, 0);
        }
        let n = self.tcp.read(&mut self.buf[self.end..]).await?;
        anyhow::ensure!(n > 0, "the server closed the connection");
        self.end += n;
        Ok(())
    }

    /// The payload of the next text message; answers pings.
    async fn next_text(&mut self, w: &mut Writer) -> anyhow::Result<Vec<u8>> {
        loop {
            match self.next()? {
                Some(ServerFrame::Text(payload)) => return Ok(payload.to_vec()),
                Some(ServerFrame::Ping(payload)) => pong(w, payload).await?,
                Some(ServerFrame::Close(payload)) => {
                    anyhow::bail!("closed by the server: {:?}", payload.get(..2))
                }
                Some(ServerFrame::Other) => {}
                None => self.fill().await?,
            }
        }
    }
}

/// The opcode and the payload's range of the frame at the start of `bytes`, if it is whole.
fn parse_server_frame(bytes: &[u8]) -> anyhow::Result<Option<(u8, std::ops::Range<usize>)>> {
    let [first, second, ..] = *bytes else {
        return Ok(None);
    };
    anyhow::ensure!(first & 0x70 == 0, "reserved bits set");
    anyhow::ensure!(first & 0x80 != 0, "fragmented message");
    anyhow::ensure!(second & 0x80 == 0, "masked frame from the server");
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
    anyhow::ensure!(len <= FrameReader::FRAME_MAX, "frame too large");
    let end = head + len;
    Ok((bytes.len() >= end).then_some((first & 0x0f, head..end)))
}

/// Waits for the subscribers to finish and prints deliveries/s, losses and latencies.
async fn report_fanout(
    label: &str,
    subs: Vec<tokio::task::JoinHandle<(bool, SubStats)>>,
    slow_count: usize,
    c: &FanoutCounters,
    publish_secs: f64,
    cpu: CpuUse,
) -> anyhow::Result<()> {
    let seq = c.published.load(Ordering::Relaxed);
    let deliveries_during = c.delivered.load(Ordering::Relaxed);
    let subscribers = subs.len();
    let mut fast_lat = Vec::new();
    let (mut lost, mut dup, mut reorder, mut resumed) = (0u64, 0u64, 0u64, 0u64);
    let mut slow_done = 0;
    for t in subs {
        let (is_slow, st) = t.await?;
        lost += seq.saturating_sub(st.unique);
        dup += st.duplicated;
        reorder += st.reordered;
        resumed += st.resumed;
        if is_slow {
            slow_done += usize::from(st.unique == seq);
        } else {
            fast_lat.extend(st.latencies);
        }
    }
    say!(
        "{label}: {subscribers} subscribers ({slow_count} slow): {seq} events published in {publish_secs:.1} s, {:.0} deliveries/s while publishing",
        deliveries_during as f64 / publish_secs
    );
    say!("{label}: lost {lost}, duplicated {dup}, reordered {reorder}; slow subscribers complete: {slow_done}/{slow_count}; resumed after a lagging close: {resumed}");
    percentiles("publish-to-delivery (fast subscribers)", fast_lat);
    cpu.report(deliveries_during, "delivery");
    Ok(())
}

/// The time until the `seq`th event is due at `rate` per second, if it is not due yet.
fn pace(started: Instant, rate: u64, seq: u64) -> Option<Duration> {
    if rate == 0 {
        return None;
    }
    let due = started + Duration::from_secs_f64(seq as f64 / rate as f64);
    due.checked_duration_since(Instant::now())
}

async fn fanout(
    addr: SocketAddr,
    seconds: u64,
    subscribers: usize,
    size: usize,
    rate: u64,
    window: usize,
    slow_fraction: f64,
) -> anyhow::Result<()> {
    let slow_count = ((subscribers as f64) * slow_fraction).round() as usize;
    let c = FanoutCounters::new();
    let subs = start_subscribers(addr, subscribers, slow_count, &c).await?;
    let (mut pr, mut pw) = connect(addr).await?;
    let pad = "p".repeat(size.saturating_sub(40));
    let permits = Arc::new(tokio::sync::Semaphore::new(window));
    let refusals = Refusals::default();
    let acker = {
        let permits = Arc::clone(&permits);
        let refusals = refusals.clone();
        tokio::spawn(async move {
            loop {
                let is_buffered = match pr.next() {
                    Ok(Some(ServerFrame::Text(payload))) if payload.starts_with(b"#") => {
                        refusals.note(payload);
                        permits.add_permits(1);
                        true
                    }
                    Ok(Some(_)) => true,
                    Ok(None) => false,
                    Err(_) => break,
                };
                if !is_buffered && pr.fill().await.is_err() {
                    break;
                }
            }
        })
    };
    let started = Instant::now();
    let cpu = CpuMeter::start();
    let mut seq = 0u64;
    while started.elapsed() < Duration::from_secs(seconds) {
        if let Some(wait) = pace(started, rate, seq) {
            tokio::time::sleep(wait).await;
        }
        if rate > 0 {
            permits.acquire().await?.forget();
        } else {
            slot(&permits, &mut pw).await?;
        }
        // The data: sequence number, send time, padding to about `size` bytes.
        let line = format!("#{seq}#:/fan:{seq}:{}:{pad}", now_nanos());
        if rate > 0 {
            send(&mut pw, line.as_bytes()).await?;
        } else {
            send_buffered(&mut pw, line.as_bytes()).await?;
        }
        seq += 1;
        c.published.store(seq, Ordering::Relaxed);
    }
    pw.flush().await?;
    let publish_secs = started.elapsed().as_secs_f64();
    let cpu = cpu.stop();
    c.done_publishing.store(true, Ordering::Relaxed);
    let label = if rate > 0 {
        format!("fanout, {size} B, paced at {rate}/s")
    } else {
        format!("fanout, {size} B, unpaced, window {window}")
    };
    report_fanout(&label, subs, slow_count, &c, publish_secs, cpu).await?;
    acker.abort();
    refusals.check()
}

/// The machine's floor for `fanout`: the same subscribers, served not by `ivy serve` but by a
/// thread that only frames each event once and writes it to every socket in turn, as fan-out
/// does, with no log, no commit and no dispatcher. Its latency, measured side by side with
/// `fanout`, is what the kernel's loopback and the client cost on this machine; what `fanout`
/// adds to it is the server's. (Sockets are blocking: the floor has no slow subscribers.)
/// `rate` is at least 1 (the command line's range).
async fn floor(seconds: u64, subscribers: usize, size: usize, rate: u64) -> anyhow::Result<()> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let accepting = std::thread::spawn(move || -> anyhow::Result<Vec<std::net::TcpStream>> {
        (0..subscribers).map(|_| floor_accept(&listener)).collect()
    });
    let c = FanoutCounters::new();
    let subs = start_subscribers(addr, subscribers, 0, &c).await?;
    let mut sockets = accepting
        .join()
        .map_err(|_| anyhow::anyhow!("the floor's accept thread panicked"))??;
    let writer = {
        let c = c.clone();
        std::thread::spawn(move || -> anyhow::Result<f64> {
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
                    let line = format!("@0000000001.000000000:/fan:{s}:{sent}:{pad}");
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
            // The last events reach every socket.
            for (tcp, w) in sockets.iter_mut().zip(&written) {
                std::io::Write::write_all(tcp, &frames[ends[*w]..])?;
            }
            Ok(started.elapsed().as_secs_f64())
        })
    };
    let cpu = CpuMeter::start();
    let publish_secs = tokio::task::spawn_blocking(move || writer.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the floor's writer panicked"))??;
    let cpu = cpu.stop();
    c.done_publishing.store(true, Ordering::Relaxed);
    let label = format!("floor, {size} B, paced at {rate}/s");
    report_fanout(&label, subs, 0, &c, publish_secs, cpu).await
}

/// The floor's side of one subscriber's handshake: the upgrade, the intro, the ack of its `+`.
fn floor_accept(listener: &std::net::TcpListener) -> anyhow::Result<std::net::TcpStream> {
    use std::io::{Read, Write};
    let (mut tcp, _) = listener.accept()?;
    tcp.set_nodelay(true)?;
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
    // The subscribe command: one short masked text frame.
    let mut header = [0u8; 6];
    tcp.read_exact(&mut header)?;
    let len = usize::from(header[1] & 0x7f);
    anyhow::ensure!(len < 126, "unexpected subscribe frame");
    let mut payload = vec![0u8; len];
    tcp.read_exact(&mut payload)?;
    for (i, b) in payload.iter_mut().enumerate() {
        *b ^= header[2 + i % 4];
    }
    anyhow::ensure!(payload == b"#s#+/fan", "unexpected command");
    out.clear();
    server_text_frame(&mut out, b"#s#@0000000000.000000000");
    tcp.write_all(&out)?;
    Ok(tcp)
}

/// An unmasked (server to client) text frame, its head formatted by fastwebsockets as the
/// server's own frames are (`server/ws.rs`, `push_frame`).
fn server_text_frame(out: &mut Vec<u8>, payload: &[u8]) {
    let mut head = [0u8; 16];
    let n = Frame::text(Payload::Borrowed(payload)).fmt_head(&mut head);
    out.extend_from_slice(&head[..n]);
    out.extend_from_slice(payload);
}

async fn history(
    addr: SocketAddr,
    seconds: u64,
    connections: usize,
    n: usize,
    events: usize,
) -> anyhow::Result<()> {
    let (mut frames, mut w) = connect(addr).await?;
    let data = "h".repeat(100);
    for i in 0..events {
        let line = if i + 1 == events {
            format!("#last#:/hist/c:{data}")
        } else {
            format!(":/hist/c:{data}")
        };
        send(&mut w, line.as_bytes()).await?;
    }
    // The last one is keyed: once it is acknowledged, every one is stored. (With `--events 0`
    // the channel is read as it is, for runs against a server filled before.)
    while events > 0 && !frames.next_text(&mut w).await?.starts_with(b"#last#") {}
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let stop = Arc::clone(&stop);
        let count = Arc::clone(&count);
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let Ok(tcp) = TcpStream::connect(addr).await else {
                return lat;
            };
            let _ = tcp.set_nodelay(true);
            let (rd, mut wr) = tcp.into_split();
            let mut rd = BufReader::with_capacity(64 * 1024, rd);
            let req = format!("GET /events/hist/c?n={n} HTTP/1.1\r\nHost: {addr}\r\n\r\n");
            let mut body = Vec::new();
            let mut line = String::new();
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                if wr.write_all(req.as_bytes()).await.is_err() {
                    break;
                }
                let mut len = 0usize;
                loop {
                    line.clear();
                    if rd.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return lat;
                    }
                    if line == "\r\n" {
                        break;
                    }
                    if let Some((name, value)) = line.split_once(':') {
                        if name.eq_ignore_ascii_case("content-length") {
                            len = value.trim().parse().unwrap_or(0);
                        }
                    }
                }
                body.resize(len, 0);
                if rd.read_exact(&mut body).await.is_err() {
                    break;
                }
                lat.push(t.elapsed().as_micros() as u64);
                count.fetch_add(1, Ordering::Relaxed);
            }
            lat
        }));
    }
    let (done, elapsed, cpu) = measure_window(&count, seconds).await;
    stop.store(true, Ordering::Relaxed);
    let mut lat = Vec::new();
    for task in tasks {
        lat.extend(task.await?);
    }
    say!("history: last {n} of a channel of {events} events, {connections} keep-alive connections: {:.0} requests/s", done as f64 / elapsed);
    percentiles("request latency", lat);
    cpu.report(done, "request");
    Ok(())
}

async fn idle(addr: SocketAddr, connections: usize, pid: Option<u32>) -> anyhow::Result<()> {
    let before = pid.and_then(server_rss_kib);
    let mut held = Vec::with_capacity(connections);
    let started = Instant::now();
    for _ in 0..connections {
        held.push(connect(addr).await?);
    }
    say!(
        "idle: {connections} WebSocket connections open in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    match (pid, before, pid.and_then(server_rss_kib)) {
        (Some(_), Some(b), Some(a)) => say!(
            "idle: server resident memory {:.1} MiB with them open ({:.1} MiB before; {:.0} bytes per connection)",
            a as f64 / 1024.0,
            b as f64 / 1024.0,
            (a.saturating_sub(b) * 1024) as f64 / connections as f64
        ),
        _ => say!("idle: the server's memory is unknown: give --server-pid with --addr, or no --addr to let the tool start the server"),
    }
    drop(held);
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if let Mode::Floor {
        subscribers,
        size,
        rate,
    } = cli.mode
    {
        return runtime.block_on(floor(cli.seconds, subscribers, size, rate));
    }
    let spawned = match cli.addr {
        Some(_) => None,
        None => Some(spawn_server(&cli.durability)?),
    };
    let (addr, pid) = match (&spawned, cli.addr) {
        (Some((a, s)), _) => (*a, Some(s.child.id())),
        (None, Some(a)) => (a, None),
        (None, None) => anyhow::bail!("no server"),
    };
    let pid = pid.or(cli.server_pid);
    if let Some(pid) = pid {
        let _ = SERVER_PID.set(pid);
    }
    runtime.block_on(async move {
        match cli.mode {
            Mode::Publish {
                connections,
                window,
                size,
                paths,
            } => publish(addr, cli.seconds, connections, window, size, paths).await,
            Mode::Fanout {
                subscribers,
                size,
                rate,
                window,
                slow_fraction,
            } => {
                fanout(
                    addr,
                    cli.seconds,
                    subscribers,
                    size,
                    rate,
                    window,
                    slow_fraction,
                )
                .await
            }
            Mode::Floor { .. } => unreachable!("run above, without a server"),
            Mode::History {
                connections,
                n,
                events,
            } => history(addr, cli.seconds, connections, n, events).await,
            Mode::Idle { connections } => idle(addr, connections, pid).await,
        }
    })?;
    drop(spawned);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_are_read_from_proc() {
        let (user0, sys0) = process_ticks("self").expect("own /proc/self/stat");
        let (idle, total) = machine_ticks().expect("/proc/stat");
        assert!(idle <= total);
        // Half a second of spinning is about 50 ticks of user time.
        let until = Instant::now() + Duration::from_millis(500);
        let mut n = 0u64;
        while Instant::now() < until {
            n = std::hint::black_box(n.wrapping_add(1));
        }
        let (user1, sys1) = process_ticks("self").expect("own /proc/self/stat");
        assert!(
            user1 + sys1 > user0 + sys0,
            "{user0}+{sys0} -> {user1}+{sys1}"
        );
        assert_eq!(process_ticks("0"), None, "no such process");
    }

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
    fn fan_out_fields_parse_as_numbers_or_not_at_all() {
        assert_eq!(decimal(b"0"), Some(0));
        assert_eq!(
            decimal(b"1795982068662161665"),
            Some(1_795_982_068_662_161_665)
        );
        assert_eq!(decimal(b"18446744073709551615"), Some(u64::MAX));
        assert_eq!(decimal(b"18446744073709551616"), None, "overflow");
        assert_eq!(decimal(b""), None);
        assert_eq!(decimal(b"12a"), None);
        assert_eq!(decimal(b"-1"), None);
    }

    #[test]
    fn a_subscriber_counts_duplicates_and_reordering() {
        let c = FanoutCounters::new();
        let mut seen = Seen::default();
        for seq in [0, 1, 3, 2, 3] {
            seen.note(seq, 0, false, &c);
        }
        assert_eq!(seen.st.received, 5);
        assert_eq!(seen.st.unique, 4);
        assert_eq!(seen.st.duplicated, 1);
        assert_eq!(seen.st.reordered, 1);
        c.published.store(4, Ordering::Relaxed);
        assert!(!seen.has_all(&c), "not until the publisher is done");
        c.done_publishing.store(true, Ordering::Relaxed);
        assert!(seen.has_all(&c));
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

    #[test]
    fn fan_out_fields_come_from_the_third_and_fourth_fields() {
        assert_eq!(
            fanout_fields(b"@1795982068.662161665:/fan:42:1795982068662161665:ppp"),
            Some((42, 1_795_982_068_662_161_665))
        );
        assert_eq!(fanout_fields(b"#s#@1795982068.662161665"), None);
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
