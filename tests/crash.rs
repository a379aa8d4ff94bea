//! Crash harness: a child `ivy serve` (durability `always`, small segments so that rolls and
//! seals happen) takes keyed publishes from several connections; the harness records every
//! acknowledged event and kills the child with SIGKILL at a random moment. After each kill it
//! restarts the server and checks: every acknowledged event is present with its exact data, no
//! id twice, ids strictly increasing, new publishes work; then it stops the server with SIGTERM
//! and `ivy verify` must be clean.
//!
//! `IVY_CRASH_CYCLES` sets the number of cycles (default 20, as CI runs it);
//! `IVY_TEST_SEED` replays a run. For a long run:
//! `IVY_CRASH_CYCLES=500 cargo test --release --test crash -- --nocapture`.

mod common;

use common::ChildServer;

use futures_util::{SinkExt, StreamExt};
use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const PUBLISHERS: usize = 4;
const WINDOW: usize = 32;

fn start(dir: &Path) -> (ChildServer, SocketAddr) {
    // Small segments, so that rolls and seals happen.
    let args = ["--durability", "always", "--segment-bytes-max", "8192"];
    common::serve_child(dir, &args)
}

fn terminate(mut server: ChildServer) {
    let child = &mut server.0;
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let exit = child.wait().expect("wait");
    assert!(exit.success(), "graceful shutdown exits 0, got {exit:?}");
}

type Acked = Arc<Mutex<BTreeMap<String, (String, String)>>>;

/// Publishes from one connection until the connection dies, recording acknowledged events as
/// id -> (path, data).
async fn publish(addr: SocketAddr, who: usize, cycle: usize, acked: Acked) {
    let mut req = format!("ws://{addr}/ws")
        .into_client_request()
        .expect("request");
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", "ivy1".parse().expect("header"));
    let Ok((ws, _)) = tokio_tungstenite::connect_async(req).await else {
        return;
    };
    let (mut tx, mut rx) = ws.split();
    let path = format!("/crash/p{who}");
    let mut sent: BTreeMap<u64, String> = BTreeMap::new();
    let mut n = 0u64;
    loop {
        while sent.len() < WINDOW {
            let data = format!("c{cycle}-w{who}-n{n}-{}", "x".repeat((n % 50) as usize));
            if tx
                .send(Message::text(format!("#{n}#:{path}:{data}")))
                .await
                .is_err()
            {
                return;
            }
            sent.insert(n, data);
            n += 1;
        }
        let Some(Ok(msg)) = rx.next().await else {
            return;
        };
        let Message::Text(text) = msg else { continue };
        let Some(rest) = text.strip_prefix('#') else {
            continue;
        };
        let Some((key, id)) = rest.split_once('#') else {
            continue;
        };
        let Ok(key) = key.parse::<u64>() else {
            continue;
        };
        if let (Some(data), Some(id)) = (sent.remove(&key), id.strip_prefix('@')) {
            acked
                .lock()
                .expect("lock")
                .insert(id.to_owned(), (path.clone(), data));
        }
    }
}

/// Reads the log over HTTP from `since` (all of it for `None`): id -> (path, data), checking
/// order and uniqueness.
async fn read_all(addr: SocketAddr, since: Option<&str>) -> BTreeMap<String, (String, String)> {
    let query = since.map(|s| format!("?since={s}")).unwrap_or_default();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    tcp.write_all(
        format!(
            "GET /events/crash/**{query} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .expect("request");
    let mut raw = Vec::new();
    tcp.read_to_end(&mut raw).await.expect("response");
    let text = String::from_utf8(raw).expect("utf-8");
    let (head, body) = text.split_once("\r\n\r\n").expect("head");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    let mut out = BTreeMap::new();
    let mut last = String::new();
    let mut seen = HashSet::new();
    for line in body.lines() {
        let line = line.strip_prefix('@').expect("event line");
        let (id, rest) = line.split_once(':').expect("id");
        let (path, data) = rest.split_once(':').expect("path");
        assert!(seen.insert(id.to_owned()), "id {id} twice");
        assert!(id > last.as_str(), "ids not increasing: {id} after {last}");
        last = id.to_owned();
        out.insert(id.to_owned(), (path.to_owned(), data.to_owned()));
    }
    out
}

fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n").expect("chunk size");
        let size = usize::from_str_radix(size.trim(), 16).expect("hex");
        if size == 0 {
            return out;
        }
        out.push_str(&after[..size]);
        rest = &after[size + 2..];
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_never_loses_an_acknowledged_event() {
    let cycles = common::cycles("IVY_CRASH_CYCLES", 20) as usize;
    let mut rng = common::Rng(common::seed() | 1);
    let dir = tempfile::tempdir().expect("temp dir");
    let acked: Acked = Arc::new(Mutex::new(BTreeMap::new()));
    // The first id acknowledged in the previous cycle: the next cycle's check starts there.
    let mut checked_from: Option<String> = None;
    let mut acked_before_cycle = 0usize;
    for cycle in 0..cycles {
        let (mut server, addr) = start(dir.path());
        let tasks: Vec<_> = (0..PUBLISHERS)
            .map(|w| tokio::spawn(publish(addr, w, cycle, Arc::clone(&acked))))
            .collect();
        tokio::time::sleep(Duration::from_millis(5 + rng.below(150))).await;
        server.0.kill().expect("SIGKILL");
        server.0.wait().expect("reap");
        for t in tasks {
            t.await.expect("publisher task");
        }
        // Recovery happens at open; then every acknowledged event must be there, exactly.
        let (server, addr) = start(dir.path());
        // Every cycle checks what was acknowledged since the previous check (earlier events were
        // checked then, and recovery only touches tails); the last cycle checks everything. This
        // keeps long runs linear.
        let is_last = cycle + 1 == cycles;
        let since = if is_last { None } else { checked_from.clone() };
        let stored = read_all(addr, since.as_deref()).await;
        let acked_now = acked.lock().expect("lock").clone();
        let from = since.unwrap_or_default();
        for (id, event) in acked_now.range(from..) {
            assert_eq!(
                stored.get(id),
                Some(event),
                "cycle {cycle}: acknowledged event {id} lost or changed"
            );
        }
        checked_from = acked_now
            .keys()
            .nth(acked_before_cycle)
            .cloned()
            .or(checked_from);
        acked_before_cycle = acked_now.len();
        // New publishes work.
        let fresh = Arc::new(Mutex::new(BTreeMap::new()));
        let probe = tokio::spawn(publish(addr, 99, cycle, Arc::clone(&fresh)));
        tokio::time::sleep(Duration::from_millis(30)).await;
        probe.abort();
        terminate(server);
        let verify = Command::new(env!("CARGO_BIN_EXE_ivy"))
            .arg("verify")
            .arg(dir.path())
            .output()
            .expect("verify");
        assert_eq!(
            verify.status.code(),
            Some(0),
            "cycle {cycle}: {}",
            String::from_utf8_lossy(&verify.stdout)
        );
        acked
            .lock()
            .expect("lock")
            .extend(fresh.lock().expect("lock").clone());
    }
    let total = acked.lock().expect("lock").len();
    eprintln!("{cycles} SIGKILL cycles, {total} acknowledged events, 0 lost");
    assert!(
        total > cycles,
        "the harness acknowledged too little to mean anything"
    );
}
