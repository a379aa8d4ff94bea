//! Limits under attack, counted (issue "Hostile input"): a child `ivy serve` is attacked from
//! many connections at once while a well-behaved client keeps using it. What must hold: the
//! attackers get their refusals (413, 1008 and `#KEY#!reason`, closed connections), never a 5xx;
//! the well-behaved client is served throughout; the server's memory stays bounded; nothing
//! stored is lost and `ivy verify` is clean afterwards.
//!
//! Also the issue "server" row: 10,000 WebSocket connections opened at once and left idle cost
//! under 100 MiB of server memory.

use super::harness::{self, TestServer};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const MIB: u64 = 1024 * 1024;

/// The campaigns run one at a time: each loads both cores, and together they would measure
/// each other (and push honest clients past the header timeout).
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// One campaign's child server on `data`, with `--log error` and `args`. It holds `HEAVY` for
/// the campaign (the guard, first), and it and the test process may open as many descriptors as
/// the hard limit allows: a connection takes one on each side.
async fn campaign_server(
    data: &std::path::Path,
    args: &[&str],
) -> (
    tokio::sync::MutexGuard<'static, ()>,
    harness::ChildServer,
    TestServer,
) {
    let heavy = HEAVY.lock().await;
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    // IVY_TEST_LOG=debug to see why the server closed a connection (printed if the test fails).
    let log = std::env::var("IVY_TEST_LOG").unwrap_or_else(|_| "error".to_string());
    let args: Vec<&str> = ["--log", &log]
        .into_iter()
        .chain(args.iter().copied())
        .collect();
    let (child, server) = harness::spawn_serve(data, &args, "ulimit -n $(ulimit -Hn)");
    (heavy, child, server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_websockets_at_once_stay_under_100_mib() {
    const N: usize = 10_000;
    let tmp = tempfile::tempdir().unwrap();
    let (_heavy, mut child, server) = campaign_server(&tmp.path().join("data"), &[]).await;
    let server = Arc::new(server);
    let rss_before = child.rss_bytes();
    let start = Instant::now();
    // All at once: the connects are not paced; the listener's backlog absorbs the burst.
    let tasks: Vec<_> = (0..N)
        .map(|_| {
            let server = Arc::clone(&server);
            tokio::spawn(async move {
                harness::ws_with(&server, &[("Sec-WebSocket-Protocol", "ivy1")]).await
            })
        })
        .collect();
    let mut open = Vec::with_capacity(N);
    let mut failed = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(ws) => open.push(ws),
            Err(_) => failed += 1,
        }
    }
    let opened_in = start.elapsed();
    assert_eq!(failed, 0, "{failed} of {N} upgrades failed");

    // Still serving: one of the ten thousand subscribes, a newcomer publishes, it arrives.
    let sub = &mut open[N / 2];
    assert!(sub.request("s", "+/idle/room").await.starts_with('@'));
    let mut publisher = harness::ws(&server).await;
    assert!(publisher
        .request("p", ":/idle/room:hello")
        .await
        .starts_with('@'));
    let line = open[N / 2].recv().await;
    assert!(line.ends_with(":/idle/room:hello"), "{line}");
    assert_eq!(harness::get(&server, "/healthz").await.status, 200);

    // Let the idle connections drop their per-connection buffers (released after 2 s idle).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss = child.rss_bytes();
    eprintln!(
        "{N} WebSockets opened at once in {:.1} s; server RSS {:.1} MiB ({:.1} MiB before, {:.0} bytes per connection)",
        opened_in.as_secs_f64(),
        rss as f64 / MIB as f64,
        rss_before as f64 / MIB as f64,
        (rss - rss_before.min(rss)) as f64 / N as f64
    );
    assert!(rss < 100 * MIB, "server RSS {} MiB", rss / MIB);
    drop(open);
    child.terminate();
}

/// Counts of what the attackers got.
#[derive(Default)]
struct Tally {
    server_errors: AtomicU64,
    refused_413: AtomicU64,
    slowloris_closed: AtomicU64,
    slowloris_max_ms: AtomicU64,
}

/// Sends a header that never ends, a line every 200 ms, until the server closes the
/// connection; returns how long that took. The timeout is on the whole header, so trickling
/// bytes must not keep it open.
async fn slowloris(server: &TestServer) -> Duration {
    let start = Instant::now();
    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    let _ = tcp
        .write_all(b"GET /events/h/a?n=1 HTTP/1.1\r\nHost: x\r\n")
        .await;
    let mut buf = [0u8; 512];
    for i in 0..100 {
        if tcp
            .write_all(format!("X-{i}: y\r\n").as_bytes())
            .await
            .is_err()
        {
            break;
        }
        match tokio::time::timeout(Duration::from_millis(200), tcp.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => {
                // A 408 may come before the close; never a 5xx.
                let head = String::from_utf8_lossy(&buf[..n]);
                assert!(!head.starts_with("HTTP/1.1 5"), "{head}");
            }
            Err(_) => {}
        }
    }
    start.elapsed()
}

/// A POST announcing a body far over the limit, then a chunked one that grows past it.
async fn oversized_posts(server: &TestServer, tally: &Tally) {
    for chunked in [false, true] {
        let mut tcp = TcpStream::connect(server.addr).await.unwrap();
        let head = if chunked {
            "POST /events/h/big HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_owned()
        } else {
            "POST /events/h/big HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nContent-Length: 1000000000\r\nConnection: close\r\n\r\n".to_owned()
        };
        let start = Instant::now();
        let mut wrote = tcp.write_all(head.as_bytes()).await;
        let chunk = vec![b'z'; 16 * 1024];
        for _ in 0..8 {
            let framed = if chunked {
                [format!("{:x}\r\n", chunk.len()).as_bytes(), &chunk, b"\r\n"].concat()
            } else {
                chunk.clone()
            };
            wrote = tcp.write_all(&framed).await;
            if wrote.is_err() {
                break;
            }
        }
        let mut raw = Vec::new();
        let read = tokio::time::timeout(harness::WAIT, tcp.read_to_end(&mut raw)).await;
        assert!(
            !raw.is_empty(),
            "no answer to an oversized POST (chunked: {chunked}) after {:?}: write {wrote:?}, read {read:?}",
            start.elapsed()
        );
        let status = harness::parse_response(&raw, false).status;
        if status >= 500 {
            tally.server_errors.fetch_add(1, Ordering::Relaxed);
        }
        assert_eq!(status, 413, "{}", String::from_utf8_lossy(&raw));
        tally.refused_413.fetch_add(1, Ordering::Relaxed);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attacks_leave_other_clients_served_memory_bounded_and_data_intact() {
    const SLOWLORIS: usize = 2_000;
    const BIG_POSTERS: usize = 100;
    const SUBSCRIBES: usize = 5_000;
    const SUBSCRIPTIONS_MAX: usize = 1_000;
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let (_heavy, mut child, server) = campaign_server(
        &data,
        &[
            "--header-timeout-secs",
            "2",
            "--subscriptions-max",
            &SUBSCRIPTIONS_MAX.to_string(),
            "--body-bytes-max",
            "65536",
        ],
    )
    .await;
    let server = Arc::new(server);
    let mut stored = Vec::new();
    for n in 0..100 {
        stored.push(harness::post(&server, "/h/a", format!("kept {n}").as_bytes()).await);
    }
    let rss_before = child.rss_bytes();
    let tally = Arc::new(Tally::default());

    // The attackers, all at once.
    let mut attacks = Vec::new();
    for _ in 0..SLOWLORIS {
        let (server, tally) = (Arc::clone(&server), Arc::clone(&tally));
        attacks.push(tokio::spawn(async move {
            let took = slowloris(&server).await;
            tally.slowloris_closed.fetch_add(1, Ordering::Relaxed);
            tally
                .slowloris_max_ms
                .fetch_max(took.as_millis() as u64, Ordering::Relaxed);
        }));
    }
    for _ in 0..BIG_POSTERS {
        let (server, tally) = (Arc::clone(&server), Arc::clone(&tally));
        attacks.push(tokio::spawn(async move {
            oversized_posts(&server, &tally).await
        }));
    }
    let flood = {
        let server = Arc::clone(&server);
        tokio::spawn(async move {
            let mut ws = harness::ws(&server).await;
            let mut commands = String::new();
            for i in 0..SUBSCRIBES {
                commands.push_str(&format!("#s{i}#+/flood/{i}\n"));
            }
            // One message per command, sent back to back without waiting for replies.
            for line in commands.lines() {
                ws.send(line).await;
            }
            let (mut acked, mut refused) = (0, 0);
            while acked + refused < SUBSCRIBES {
                let reply = ws.recv().await;
                match reply.strip_prefix("#s") {
                    Some(r) if r.contains("#!") => refused += 1,
                    Some(_) => acked += 1,
                    None => panic!("unexpected message {reply}"),
                }
            }
            (ws, acked, refused)
        })
    };

    // Meanwhile a well-behaved client reads and publishes, and must be served each time.
    let mut client = harness::ws(&server).await;
    let mut worst = Duration::ZERO;
    let mut rounds = 0;
    let attack_start = Instant::now();
    while attacks.iter().any(|a| !a.is_finished()) || !flood.is_finished() {
        let t = Instant::now();
        let r = harness::get(&server, "/events/h/a?n=10").await;
        assert_eq!(r.status, 200, "{}", r.text());
        let ack = client.request("c", &format!(":/h/a:during {rounds}")).await;
        assert!(ack.starts_with('@'), "{ack}");
        stored.push(ack);
        worst = worst.max(t.elapsed());
        rounds += 1;
        assert!(
            attack_start.elapsed() < Duration::from_secs(120),
            "attacks did not end"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rss_peak = child.rss_bytes();
    for a in attacks {
        a.await.unwrap();
    }
    let (mut flooder, acked, refused) = flood.await.unwrap();
    assert_eq!(
        (acked, refused),
        (SUBSCRIPTIONS_MAX, SUBSCRIBES - SUBSCRIPTIONS_MAX)
    );
    // The flooder keeps its connection and its first thousand subscriptions.
    assert!(client
        .request("f", ":/flood/7:still subscribed")
        .await
        .starts_with('@'));
    let delivered = flooder.recv().await;
    assert!(
        delivered.ends_with(":/flood/7:still subscribed"),
        "{delivered}"
    );

    let tally = &*tally;
    assert_eq!(tally.server_errors.load(Ordering::Relaxed), 0);
    assert_eq!(
        tally.refused_413.load(Ordering::Relaxed),
        2 * BIG_POSTERS as u64
    );
    assert_eq!(
        tally.slowloris_closed.load(Ordering::Relaxed),
        SLOWLORIS as u64
    );
    let slowest = tally.slowloris_max_ms.load(Ordering::Relaxed);
    assert!(
        slowest < 10_000,
        "a slowloris connection lived {slowest} ms"
    );
    let ids = harness::ids(&server, "/h/a").await;
    let want: Vec<String> = stored.iter().map(|s| harness::id_of(s)).collect();
    assert_eq!(ids, want, "stored events changed under attack");
    eprintln!(
        "hostile: {SLOWLORIS} slowloris (all closed, slowest {slowest} ms), {} oversized POSTs (all 413), \
         {SUBSCRIBES} subscribes on one connection ({acked} taken, {refused} refused), 0 5xx; \
         the other client was served {rounds} times, worst round trip {} ms; \
         server RSS {:.1} MiB before, {:.1} MiB during",
        2 * BIG_POSTERS,
        worst.as_millis(),
        rss_before as f64 / MIB as f64,
        rss_peak as f64 / MIB as f64,
    );
    assert!(rss_peak < 200 * MIB, "server RSS {} MiB", rss_peak / MIB);
    drop(flooder);
    drop(client);
    child.terminate();
    harness::verify_clean(&data);
}

/// Clients that stop reading (issue "server": memory bounded whatever the readers' speed): 300
/// WebSocket subscribers and 300 HTTP readers of a 6 MB answer, all with a 4 KiB receive window
/// and none reading, while a publisher sends 6 MB to the subscribers' channel. A well-behaved
/// subscriber gets every event in order, a well-behaved reader gets the large answer every time,
/// the server's memory stays bounded (the queues share `--queue-bytes-total-max`, answers are read
/// a chunk at a time), and every stalled connection is closed once its write has waited for
/// `--write-timeout-secs`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_that_stop_reading_cost_bounded_memory_and_are_cut_off() {
    const STALLED: usize = 300;
    const EVENTS: usize = 3_000;
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let (_heavy, mut child, server) = campaign_server(
        &data,
        &[
            "--write-timeout-secs",
            "3",
            "--queue-bytes-total-max",
            &(32 * MIB).to_string(),
            "--memory-trim-secs",
            "1",
        ],
    )
    .await;
    let big = vec![b'b'; 60_000];
    for _ in 0..100 {
        harness::post(&server, "/big", &big).await;
    }
    let mut good = harness::ws(&server).await;
    good.request("s", "+/stall").await;
    let rss_before = child.rss_bytes();
    let mut stalled_ws = Vec::new();
    for _ in 0..STALLED {
        let mut ws = harness::ws_with_receive_buffer(&server, 4096).await;
        ws.request("s", "+/stall").await;
        stalled_ws.push(ws);
    }
    let mut stalled_http = Vec::new();
    for _ in 0..STALLED {
        let mut tcp = harness::tcp_with_receive_buffer(server.addr, 4096).await;
        tcp.write_all(b"GET /events/big HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        stalled_http.push(tcp);
    }
    let publisher = {
        let server = server.addr;
        tokio::spawn(async move {
            let mut p = harness::ws_at(server).await;
            let pad = "p".repeat(2000);
            for i in 0..EVENTS {
                p.send(&format!("#{i}#:/stall:{i}:{pad}")).await;
            }
            for _ in 0..EVENTS {
                assert!(p.recv().await.contains("#@"));
            }
            p
        })
    };
    // The subscriber that reads, reading all along: every event, in order.
    let reader = tokio::spawn(async move {
        let mut last = String::new();
        for i in 0..EVENTS {
            let m = tokio::time::timeout(Duration::from_secs(60), good.recv())
                .await
                .unwrap_or_else(|_| panic!("event {i} within 60 s"));
            assert!(m.contains(&format!(":/stall:{i}:")), "event {i}: {m:.60}");
            assert!(harness::id_of(&m) > last);
            last = harness::id_of(&m);
        }
        good
    });
    // The reader that reads: the large answer, again and again until every stalled connection
    // is let go.
    let mut rss_peak = 0;
    let mut answers = 0;
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let answer = tokio::time::timeout(
            Duration::from_secs(10),
            harness::get(&server, "/events/big"),
        )
        .await
        .expect("the large answer in time");
        assert_eq!(answer.status, 200);
        assert_eq!(answer.body.len(), 100 * (big.len() + 28));
        answers += 1;
        rss_peak = rss_peak.max(child.rss_bytes());
        // Only the subscriber that reads and the publisher are left.
        let websockets = harness::metric(&server, "ivy_websockets").await;
        let connections = harness::metric(&server, "ivy_connections").await;
        if publisher.is_finished() && reader.is_finished() && websockets == 2 && connections == 1 {
            break;
        }
        assert!(
            Instant::now() < until,
            "after 60 s: {websockets} websockets, {connections} connections"
        );
    }
    let _good = reader.await.unwrap();
    let _publisher = publisher.await.unwrap();
    // With them gone, the memory they took goes back to the system (`--memory-trim-secs`: glibc
    // kept 75-111 MiB without it).
    let until = Instant::now() + Duration::from_secs(10);
    let mut rss_after = child.rss_bytes();
    while rss_after >= 64 * MIB && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(200)).await;
        rss_after = child.rss_bytes();
    }
    eprintln!(
        "stalled: {STALLED} subscribers and {STALLED} readers that read nothing, all cut off; \
         the large answer was served {answers} times; server RSS {:.1} MiB before, {:.1} MiB at \
         the peak, {:.1} MiB after",
        rss_before as f64 / MIB as f64,
        rss_peak as f64 / MIB as f64,
        rss_after as f64 / MIB as f64,
    );
    assert!(rss_peak < 200 * MIB, "server RSS {} MiB", rss_peak / MIB);
    assert!(
        rss_after < 64 * MIB,
        "server RSS {} MiB after",
        rss_after / MIB
    );
    drop((stalled_ws, stalled_http));
    child.terminate();
    harness::verify_clean(&data);
}

/// A peer that pipelines cheap commands (`@`, 10 bytes each with the frame) and reads none of the
/// replies: the server holds a bounded amount of replies and stops reading the peer's frames
/// meanwhile (before, it read them all and queued every reply: 6 M took it to 734 MB). Once the
/// peer reads, every command is answered, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_reads_no_replies_costs_bounded_memory_and_is_answered_later() {
    const COMMANDS: usize = 3_000_000;
    let tmp = tempfile::tempdir().unwrap();
    let (_heavy, mut child, server) = campaign_server(&tmp.path().join("data"), &[]).await;
    let rss_before = child.rss_bytes();
    let tcp = harness::tcp_with_receive_buffer(server.addr, 4096).await;
    let (mut read, mut write) = tcp.into_split();
    harness::send_upgrade(&mut write, server.addr).await;
    let one = harness::client_frame(true, 0x1, b"#k#@");
    let sender = tokio::spawn(async move {
        let batch = one.repeat(10_000);
        for _ in 0..COMMANDS / 10_000 {
            write.write_all(&batch).await.unwrap();
        }
        write
    });
    // Reading nothing for 3 s.
    let mut rss_peak = 0;
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        rss_peak = rss_peak.max(child.rss_bytes());
    }
    assert!(!sender.is_finished(), "the server read every command");
    let grew = rss_peak.saturating_sub(rss_before);
    assert!(grew < 32 * MIB, "the server grew by {} MiB", grew / MIB);
    // Now reading: every command is answered.
    let mut answered = 0;
    let mut tail = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    while answered < COMMANDS {
        let n = tokio::time::timeout(Duration::from_secs(10), read.read(&mut buf))
            .await
            .expect("replies keep coming")
            .unwrap();
        // The last bytes before the end hold the server's close frame, if it sent one.
        assert!(
            n > 0,
            "closed after {answered} replies, ending {:?}",
            String::from_utf8_lossy(&tail)
        );
        // Counted across reads: a reply may straddle two.
        let counted = tail.len().min(3);
        tail.extend_from_slice(&buf[..n]);
        answered += tail[tail.len() - n - counted..]
            .windows(4)
            .filter(|w| w == b"#k#@")
            .count();
        let keep = tail.len().min(64);
        tail.drain(..tail.len() - keep);
    }
    assert_eq!(answered, COMMANDS);
    sender.await.unwrap();
    child.terminate();
}
