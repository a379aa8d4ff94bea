//! `ivy-bench`: the load tool. It starts `ivy serve` as a child process on a temporary data
//! directory (or uses `--addr` of a running server) and measures, over loopback:
//! - `publish`: acknowledged publishes/s from C connections, each keeping a window of
//!   unacknowledged keyed publishes, and the ack latency percentiles;
//! - `fanout`: 1 publisher to S subscribers of one channel: deliveries/s, publish-to-delivery
//!   latency percentiles, and counts of lost, duplicated and reordered events (every event
//!   carries a sequence number); optionally paced and with a share of deliberately slow readers;
//! - `history`: last-N reads over keep-alive connections: requests/s and latency percentiles;
//! - `idle`: N idle WebSocket connections, and the server's resident memory with them open;
//! - `floor`: `fanout`'s subscribers against no server, for the machine's floor;
//! - `history-floor`: `history`'s readers against a server that gives one fixed answer, for the
//!   machine's floor under hyper;
//! - `publish-floor`: `publish`'s clients against a server that only group-commits their messages
//!   to one file and acknowledges them, for the machine's floor of a durable publish.
//!
//! Each mode has its file; `client.rs` is the WebSocket client they share, `receivers.rs` the
//! threads that read `fanout`'s and `floor`'s subscribers, and `cpu.rs` the CPU report every run
//! ends with. This file holds the command line, the spawned server and the report's common pieces.
//!
//! The clients run on one tokio runtime, except the fan-out subscribers, which a few plain
//! threads read with mio (`receivers.rs` says why). The tool does no per-message allocation
//! beyond what parsing needs, so that it is not the bottleneck: each run reports the CPU the
//! server and the tool used (`CpuMeter`). WebSocket clients write frames with fastwebsockets (or,
//! on the receiver threads, as `client_frame`) and parse what they read in place from large reads
//! (`FrameBuf`); history readers speak plain HTTP/1.1.

use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

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

mod client;
mod cpu;
mod fanout;
mod floor;
mod history;
mod history_floor;
mod idle;
mod publish;
mod publish_floor;
mod receivers;

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
    /// Acknowledged publishes/s from C connections, each keeping a window of unacknowledged ones
    Publish(publish::PublishArgs),
    /// 1 publisher to S subscribers of one channel: deliveries/s, latency, and lost, duplicated
    /// and reordered events
    Fanout(fanout::FanoutArgs),
    /// The machine's floor for `fanout` (no server; see `floor`).
    Floor {
        #[arg(long, default_value_t = 1000)]
        subscribers: usize,
        #[arg(long, default_value_t = 100)]
        size: usize,
        /// Events per second (the floor is for paced runs).
        #[arg(long, default_value_t = 400, value_parser = clap::value_parser!(u64).range(1..))]
        rate: u64,
        #[command(flatten)]
        receivers: fanout::ReceiverThreads,
    },
    /// Last-N reads over keep-alive HTTP connections: requests/s and latency
    History {
        #[arg(long, default_value_t = 32)]
        connections: usize,
        #[arg(long, default_value_t = 100)]
        n: usize,
        /// Events written to the channel first.
        #[arg(long, default_value_t = 100_000)]
        events: usize,
    },
    /// The machine's floor for `history` under hyper (a server with one fixed answer; see
    /// `history_floor.rs`).
    HistoryFloor {
        #[arg(long, default_value_t = 32)]
        connections: usize,
        #[arg(long, default_value_t = 100)]
        n: usize,
    },
    /// The machine's floor for `publish` (a server that only group-commits and acknowledges;
    /// see `publish_floor.rs`).
    PublishFloor {
        #[command(flatten)]
        args: publish::PublishArgs,
        /// Bytes of zeroes written to another file per byte of the log, as Ivy fills its spare
        /// segments (0: none).
        #[arg(long, default_value_t = 0)]
        zero_fill_pace: u64,
    },
    /// N idle WebSocket connections, and the server's resident memory with them open
    Idle {
        #[arg(long, default_value_t = 10_000)]
        connections: usize,
    },
    /// The server `history-floor` starts: prints its address, then answers every request with
    /// one fixed answer of `n` lines.
    #[command(hide = true)]
    FixedAnswerServer {
        #[arg(long)]
        n: usize,
    },
    /// The server `publish-floor` starts: prints its address, then group-commits and
    /// acknowledges every message until killed.
    #[command(hide = true)]
    CommitFloorServer {
        /// Where its files go (`publish-floor` removes them).
        #[arg(long)]
        dir: std::path::PathBuf,
        #[arg(long, default_value_t = 0)]
        zero_fill_pace: u64,
    },
}

/// A server the tool started, killed when dropped (also when a run fails or panics), with the
/// temporary data directory it was given, if any.
pub(crate) struct Spawned {
    pub(crate) child: Child,
    pub(crate) _dir: Option<tempfile::TempDir>,
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
    let child = Command::new(&exe)
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
    let mut spawned = Spawned {
        child,
        _dir: Some(dir),
    };
    let line = first_line(&mut spawned.child)?;
    let addr = ivy::server::listening_addr(&line)
        .ok_or_else(|| anyhow::anyhow!("unexpected first line: {line}"))?;
    Ok((addr, spawned))
}

/// Starts this binary again as a floor's own server (`args`: its hidden mode and flags), in its
/// own process so that its CPU is reported apart from the tool's; returns the address it prints
/// first. `dir`, if any, is removed once the server is stopped.
pub(crate) fn spawn_floor_server(
    args: &[&std::ffi::OsStr],
    dir: Option<tempfile::TempDir>,
) -> anyhow::Result<(SocketAddr, Spawned)> {
    let exe = std::env::current_exe()?;
    let child = Command::new(&exe)
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| anyhow::anyhow!("cannot start {}: {e}", exe.display()))?;
    let mut server = Spawned { child, _dir: dir };
    let line = first_line(&mut server.child)?;
    let addr = line
        .trim()
        .parse()
        .map_err(|e| anyhow::anyhow!("unexpected first line {line:?}: {e}"))?;
    let _ = cpu::SERVER_PID.set(server.child.id());
    Ok((addr, server))
}

/// The first line a spawned server prints (where it listens).
pub(crate) fn first_line(child: &mut Child) -> anyhow::Result<String> {
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)?;
    Ok(line)
}

pub(crate) fn server_rss_kib(pid: u32) -> Option<u64> {
    ivy::metrics::resident_bytes(pid).map(|b| b / 1024)
}

pub(crate) fn percentiles(label: &str, mut micros: Vec<u64>) {
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

pub(crate) fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // `fanout` and `floor` run one publisher and its acker on tokio (their subscribers have
    // threads of their own, `receivers.rs`): one runtime thread does, and a second worker only
    // adds wake-ups of a thread that preempts the server on a small machine. (Measured with
    // `fanout --rate 400`, 6 alternating pairs: p99 median 8.8 ms against 9.4 ms with a
    // multi-thread runtime, lower in 5; unpaced, 8.9-10.9 M deliveries/s against 7.0-9.9 M.)
    let runtime = match cli.mode {
        Mode::Fanout(_) | Mode::Floor { .. } => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    }
    .enable_all()
    .build()?;
    if let Mode::Floor {
        subscribers,
        size,
        rate,
        receivers,
    } = cli.mode
    {
        let threads = receivers.count();
        return runtime.block_on(floor::floor(cli.seconds, subscribers, size, rate, threads));
    }
    match cli.mode {
        Mode::HistoryFloor { connections, n } => {
            return runtime.block_on(history_floor::history_floor(cli.seconds, connections, n));
        }
        Mode::FixedAnswerServer { n } => {
            return runtime.block_on(history_floor::serve_fixed_answer(n));
        }
        Mode::PublishFloor {
            args,
            zero_fill_pace,
        } => {
            return runtime.block_on(publish_floor::publish_floor(
                cli.seconds,
                &args,
                zero_fill_pace,
            ));
        }
        Mode::CommitFloorServer {
            dir,
            zero_fill_pace,
        } => {
            return runtime.block_on(publish_floor::serve_commit_floor(&dir, zero_fill_pace));
        }
        _ => {}
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
        let _ = cpu::SERVER_PID.set(pid);
    }
    runtime.block_on(async move {
        match cli.mode {
            Mode::Publish(args) => publish::publish(addr, cli.seconds, "publish", &args).await,
            Mode::Fanout(args) => fanout::fanout(addr, cli.seconds, &args).await,
            Mode::Floor { .. }
            | Mode::HistoryFloor { .. }
            | Mode::FixedAnswerServer { .. }
            | Mode::PublishFloor { .. }
            | Mode::CommitFloorServer { .. } => {
                unreachable!("run above, without `ivy serve`")
            }
            Mode::History {
                connections,
                n,
                events,
            } => history::history(addr, cli.seconds, connections, n, events).await,
            Mode::Idle { connections } => idle::idle(addr, connections, pid).await,
        }
    })?;
    drop(spawned);
    Ok(())
}
