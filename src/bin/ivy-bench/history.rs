//! `history`: last-N reads over keep-alive HTTP/1.1 connections.

use crate::client::{connect, send};
use crate::cpu::measure_window;
use crate::percentiles;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

pub(crate) async fn history(
    addr: SocketAddr,
    seconds: u64,
    connections: usize,
    n: usize,
    events: usize,
) -> anyhow::Result<()> {
    fill(addr, events).await?;
    let label = format!(
        "history: last {n} of a channel of {events} events, {connections} keep-alive connections"
    );
    measure(addr, seconds, connections, n, &label).await
}

/// Publishes `events` events of 100 bytes to `/hist/c` and waits until all are stored.
async fn fill(addr: SocketAddr, events: usize) -> anyhow::Result<()> {
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
    Ok(())
}

/// `connections` keep-alive readers of `GET /events/hist/c?n=N`, each sending its next request
/// once it has read the answer to the last, for `seconds`; then the report, under `label`.
pub(crate) async fn measure(
    addr: SocketAddr,
    seconds: u64,
    connections: usize,
    n: usize,
    label: &str,
) -> anyhow::Result<()> {
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
    say!("{label}: {:.0} requests/s", done as f64 / elapsed);
    percentiles("request latency", lat);
    cpu.report(done, "request");
    Ok(())
}
