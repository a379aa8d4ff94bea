//! `publish`: C connections, each keeping a window of unacknowledged keyed publishes.

use crate::client::{connect, send_buffered, slot, Refusals, ServerFrame};
use crate::cpu::measure_window;
use crate::percentiles;
use fastwebsockets::Frame;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The shape of a publish run, for `publish` and `publish-floor` alike.
#[derive(clap::Args)]
pub(crate) struct PublishArgs {
    #[arg(long, default_value_t = 4)]
    connections: usize,
    #[arg(long, default_value_t = 256)]
    window: usize,
    #[arg(long, default_value_t = 100)]
    size: usize,
    /// Distinct channels, spread over the connections.
    #[arg(long, default_value_t = 4)]
    paths: usize,
}

/// Runs `args` against the server at `addr` for `seconds`; the report starts with `label`.
pub(crate) async fn publish(
    addr: SocketAddr,
    seconds: u64,
    label: &str,
    args: &PublishArgs,
) -> anyhow::Result<()> {
    let &PublishArgs {
        connections,
        window,
        size,
        paths,
    } = args;
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
    // A publisher waits for acks to send more, so a server that stopped acknowledging would hold
    // the run forever: it gets as long as a run's end takes, then the run fails.
    let ends = Instant::now() + Duration::from_secs(10);
    for t in tasks {
        match tokio::time::timeout_at(ends.into(), t).await {
            Ok(done) => lat.extend(done?),
            Err(_) => anyhow::bail!("the server stopped acknowledging publishes"),
        }
    }
    say!(
        "{label}: {connections} connections, window {window}, {size} B: {:.0} acknowledged events/s over {elapsed:.1} s ({} total in {:.1} s)",
        done as f64 / elapsed,
        lat.len(),
        started.elapsed().as_secs_f64()
    );
    percentiles("ack latency", lat);
    cpu.report(done, "event");
    refusals.check()
}
