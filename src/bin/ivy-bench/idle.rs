//! `idle`: N idle WebSocket connections, and the server's resident memory with them open.

use crate::client::connect;
use crate::server_rss_kib;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

pub(crate) async fn idle(
    addr: SocketAddr,
    connections: usize,
    pid: Option<u32>,
) -> anyhow::Result<()> {
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
