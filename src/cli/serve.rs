//! `ivy serve`: flags (each with an `IVY_*` variable) into `StoreOptions` and `ServerOptions`,
//! then run until SIGINT or SIGTERM.

use anyhow::Context;
use ivy::config::{OriginPolicy, ServerOptions};
use ivy::server::{descriptors, Server};
use ivy::storage::{Durability, Store, StoreOptions};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Address to listen on; port 0 picks a free port (the chosen address is printed).
    #[arg(long, env = "IVY_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Data directory, created if missing.
    #[arg(long, env = "IVY_DATA", default_value = "./ivy-data")]
    data: PathBuf,
    /// When an event counts as stored: always (fsync before the ack), interval=MS, or never.
    #[arg(long, env = "IVY_DURABILITY", default_value = "always")]
    durability: Durability,
    /// Channel depth of a stream (1: each top-level channel's subtree has its own files). Fixed
    /// when the data directory is created [default: the directory's, or 1 for a new one]; a
    /// different depth for an existing directory is refused.
    #[arg(long, env = "IVY_STREAM_DEPTH")]
    stream_depth: Option<usize>,
    /// A segment is sealed and a new one started before it would pass this size (bytes).
    #[arg(long, env = "IVY_SEGMENT_BYTES_MAX", default_value_t = 64 * 1024 * 1024)]
    segment_bytes_max: u64,
    /// A segment is sealed before an event this much younger than its first (seconds; 0: never).
    #[arg(long, env = "IVY_SEGMENT_AGE_SECS", default_value_t = 0)]
    segment_age_secs: u64,
    /// Zero-fill the next segment of a stream that filled one, in the background, and keep
    /// zeroes a step ahead of the records in other segments, so that appends overwrite instead
    /// of extending the file (faster fsync on most filesystems).
    #[arg(long, env = "IVY_PREALLOCATE", default_value_t = true, action = clap::ArgAction::Set)]
    preallocate: bool,
    /// Events with at least this many bytes of data are announced, not sent inline (bytes).
    #[arg(long, env = "IVY_LARGE_EVENT_BYTES", default_value_t = 64 * 1024)]
    large_event_bytes: usize,
    /// Largest WebSocket message, after reassembly (bytes); larger closes with 1009.
    #[arg(long, env = "IVY_FRAME_BYTES_MAX", default_value_t = 64 * 1024)]
    frame_bytes_max: usize,
    /// Subscriptions per connection.
    #[arg(long, env = "IVY_SUBSCRIPTIONS_MAX", default_value_t = 10_000)]
    subscriptions_max: usize,
    /// Subscriptions of all connections together (each takes a few hundred bytes).
    #[arg(long, env = "IVY_SUBSCRIPTIONS_TOTAL_MAX", default_value_t = 1_000_000)]
    subscriptions_total_max: usize,
    /// Events a subscriber may fall behind before it is closed with 1013 (events).
    #[arg(long, env = "IVY_LAG_EVENTS_MAX", default_value_t = 100_000)]
    lag_events_max: u64,
    /// Outbound bytes queued per connection before it reads from the log instead (bytes: the
    /// frames, plus 40 per queued event for its queue entry).
    #[arg(long, env = "IVY_QUEUE_BYTES_MAX", default_value_t = 1024 * 1024)]
    queue_bytes_max: usize,
    /// Event bytes held for all WebSocket subscribers together (queued, being written, or read
    /// from the log to catch up): past it, subscribers read from the log in bounded batches.
    #[arg(long, env = "IVY_QUEUE_BYTES_TOTAL_MAX", default_value_t = 256 * 1024 * 1024)]
    queue_bytes_total_max: usize,
    /// The kernel's send buffer of each WebSocket connection (bytes; 0: the kernel's
    /// autotuning, which lets a subscriber that stops reading hold up to 4 MiB in the kernel
    /// before its backlog reaches the queue and the log, but absorbs fast subscribers' bursts).
    #[arg(long, env = "IVY_WS_SEND_BUFFER_BYTES", default_value_t = 0)]
    ws_send_buffer_bytes: usize,
    /// Largest HTTP request head (bytes).
    #[arg(long, env = "IVY_HEADER_BYTES_MAX", default_value_t = 16 * 1024)]
    header_bytes_max: usize,
    /// Time allowed for a request's headers (seconds); it also bounds how long a keep-alive
    /// connection may wait idle for its next request before it is closed.
    #[arg(long, env = "IVY_HEADER_TIMEOUT_SECS", default_value_t = 10)]
    header_timeout_secs: u64,
    /// Time allowed for a request's body after its headers (seconds).
    #[arg(long, env = "IVY_BODY_TIMEOUT_SECS", default_value_t = 30)]
    body_timeout_secs: u64,
    /// Largest POST body (bytes); larger is 413.
    #[arg(long, env = "IVY_BODY_BYTES_MAX", default_value_t = 16 * 1024 * 1024)]
    body_bytes_max: usize,
    /// POST bodies being received, all together (bytes): past it a body waits, unread, for its
    /// share, and gets 503 if the body timeout ends first.
    #[arg(long, env = "IVY_BODY_BYTES_IN_FLIGHT_MAX", default_value_t = 256 * 1024 * 1024)]
    body_bytes_in_flight_max: usize,
    /// HTTP answers built and not yet taken by their clients, all together (bytes): past it a
    /// read waits for its share before it reads anything.
    #[arg(long, env = "IVY_ANSWER_BYTES_TOTAL_MAX", default_value_t = 256 * 1024 * 1024)]
    answer_bytes_total_max: usize,
    /// Seconds a read waits for its share of --answer-bytes-total-max; then 503.
    #[arg(long, env = "IVY_ANSWER_WAIT_SECS", default_value_t = 10)]
    answer_wait_secs: u64,
    /// Bytes of answers kept to be sent again to the same request while the channels they read
    /// get no new event (at most a quarter of --answer-bytes-total-max); 0 keeps none.
    #[arg(long, env = "IVY_ANSWER_CACHE_BYTES", default_value_t = 32 * 1024 * 1024)]
    answer_cache_bytes: usize,
    /// Streams (top-level channels, at stream depth 1) the store may hold; publishing to a channel
    /// that would start another is refused with a reason. Each stream keeps a file open and
    /// mapped. Default: what the descriptor limit leaves (see the README).
    #[arg(long, env = "IVY_STREAMS_MAX")]
    streams_max: Option<usize>,
    /// Open connections; beyond, HTTP gets 503 and the socket is closed.
    #[arg(long, env = "IVY_CONNECTIONS_MAX", default_value_t = 100_000)]
    connections_max: usize,
    /// Other origins allowed for WebSocket upgrades, CORS and POST (repeat, or `*` for any).
    #[arg(long = "allow-origin", env = "IVY_ALLOW_ORIGIN", value_delimiter = ',')]
    allow_origin: Vec<String>,
    /// Seconds without any frame after which a WebSocket peer is dropped (unless it is reading a
    /// backlog the server is still sending it).
    #[arg(long, env = "IVY_IDLE_TIMEOUT_SECS", default_value_t = 60)]
    idle_timeout_secs: u64,
    /// Seconds between pings to each WebSocket peer.
    #[arg(long, env = "IVY_PING_INTERVAL_SECS", default_value_t = 50)]
    ping_interval_secs: u64,
    /// Seconds a write may wait with the peer taking not one byte and acknowledging nothing;
    /// then the connection is closed (a client that stopped reading must not hold its
    /// connection and buffers forever).
    #[arg(long, env = "IVY_WRITE_TIMEOUT_SECS", default_value_t = 60)]
    write_timeout_secs: u64,
    /// Seconds between returns of freed memory to the system (glibc's `malloc_trim`; 0: never):
    /// without them, the memory a burst of clients took stays with the process after they left.
    #[arg(long, env = "IVY_MEMORY_TRIM_SECS", default_value_t = 10)]
    memory_trim_secs: u64,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let stream_depth = stream_depth(&args)?;
    let fd_limit = match descriptors::raise_limit() {
        Ok(limit) => Some(limit),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read or raise the descriptor limit");
            None
        }
    };
    let store_opts = StoreOptions {
        durability: args.durability,
        stream_depth,
        event_bytes_max: args.body_bytes_max.max(args.frame_bytes_max),
        segment_bytes_max: args.segment_bytes_max.max(4096),
        segment_age_max: (args.segment_age_secs > 0)
            .then(|| Duration::from_secs(args.segment_age_secs)),
        preallocate: args.preallocate,
        streams_max: args
            .streams_max
            .unwrap_or_else(|| descriptors::streams_within(fd_limit))
            .max(1),
        ..StoreOptions::default()
    };
    let opts = ServerOptions {
        listen: args.listen,
        large_event_bytes: args.large_event_bytes,
        frame_bytes_max: args.frame_bytes_max,
        subscriptions_max: args.subscriptions_max,
        subscriptions_total_max: args.subscriptions_total_max,
        lag_events_max: args.lag_events_max,
        queue_bytes_max: args.queue_bytes_max,
        queue_bytes_total_max: args.queue_bytes_total_max,
        ws_send_buffer_bytes: args.ws_send_buffer_bytes,
        header_bytes_max: args.header_bytes_max,
        header_timeout: Duration::from_secs(args.header_timeout_secs),
        body_timeout: Duration::from_secs(args.body_timeout_secs),
        body_bytes_max: args.body_bytes_max,
        body_bytes_in_flight_max: args.body_bytes_in_flight_max,
        answer_bytes_total_max: args.answer_bytes_total_max,
        answer_wait: Duration::from_secs(args.answer_wait_secs),
        answer_cache_bytes: args.answer_cache_bytes,
        connections_max: descriptors::connections_within(fd_limit, args.connections_max.max(1)),
        origins: OriginPolicy::from_list(&args.allow_origin),
        ping_interval: Duration::from_secs(args.ping_interval_secs.max(1)),
        idle_timeout: Duration::from_secs(args.idle_timeout_secs.max(1)),
        write_timeout: Duration::from_secs(args.write_timeout_secs.max(1)),
    };
    let streams_max = store_opts.streams_max;
    let store = Store::open(&args.data, store_opts)
        .with_context(|| format!("cannot open data directory {}", args.data.display()))?;
    trim_memory_every(Duration::from_secs(args.memory_trim_secs));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    runtime.block_on(async move {
        let listener = ivy::server::listen(opts.listen)
            .with_context(|| format!("cannot listen on {}", opts.listen))?;
        let addr = listener.local_addr()?;
        let data = std::fs::canonicalize(&args.data).unwrap_or(args.data.clone());
        println!("{}", ivy::server::listening_line(addr, &data));
        tracing::info!(%addr, data = %data.display(), durability = ?args.durability, "listening");
        if let Some(limit) = fd_limit {
            tracing::info!(
                descriptors = limit,
                connections_max = opts.connections_max,
                streams_max,
                "descriptor limit; connections stay below it, the rest is kept for the log's files"
            );
        }
        if opts.connections_max < args.connections_max {
            tracing::warn!(
                asked = args.connections_max,
                allowed = opts.connections_max,
                "too few file descriptors for --connections-max; raise the limit (ulimit -n, \
                 systemd LimitNOFILE=) to allow more"
            );
        }
        let server = Server::new(store, opts)?;
        server.serve(listener, shutdown_signal()).await?;
        Ok(())
    })
}

/// Hands the memory that glibc's allocator keeps after it was freed back to the system, every
/// `period`, from a thread of its own. By itself glibc returns little: after a burst of 300
/// stalled subscribers and 300 stalled readers (`server/hostile.rs`) the server stayed at 75-133
/// MiB with nothing connected, against 33-36 MiB with a trim every second (and its peak fell
/// from 149-157 to 113-115 MiB). A trim locks one arena at a time: it took 0.2 ms under
/// `ivy-bench publish` and 0.5-12 ms under `fanout` at 10 M deliveries/s. With a trim every 10 s
/// against none, in alternating pairs, `publish` measured alike (3 pairs) and `fanout` was lower
/// in 6 of 11 (medians 9.9 and 10.9 M/s, within its noise). jemalloc, which purges by itself,
/// published 6% slower here. Only `ivy serve` trims: a program that embeds the server owns its
/// allocator.
fn trim_memory_every(period: Duration) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if !period.is_zero() {
        let trimmer = std::thread::Builder::new()
            .name("ivy-memory-trim".into())
            .spawn(move || loop {
                std::thread::sleep(period);
                // SAFETY: malloc_trim only gives free pages back; it takes the allocator's own
                // locks, so it may run beside any allocation.
                unsafe {
                    libc::malloc_trim(0);
                }
            });
        if let Err(e) = trimmer {
            tracing::warn!(error = %e, "cannot start the memory trim thread");
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = period;
}

/// The stream depth to open the data directory with: the one it was created with, which
/// `--stream-depth` may repeat but not change (the streams on disk are cut at that depth), or
/// the flag's for a new directory (default 1).
fn stream_depth(args: &Args) -> anyhow::Result<usize> {
    let stored = ivy::storage::stored_stream_depth(&args.data)
        .with_context(|| format!("cannot open data directory {}", args.data.display()))?;
    match (args.stream_depth, stored) {
        (Some(asked), _) if !ivy::storage::is_valid_stream_depth(asked) => {
            anyhow::bail!("--stream-depth must be 1..={}", ivy::channel::DEPTH_MAX)
        }
        (Some(asked), Some(stored)) if asked != stored => anyhow::bail!(
            "--stream-depth {asked}: {} was created with stream depth {stored}, which cannot \
             change; leave the flag out or give {stored}",
            args.data.display()
        ),
        (asked, stored) => Ok(stored.or(asked).unwrap_or(1)),
    }
}

/// Resolves at SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot watch SIGTERM");
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
