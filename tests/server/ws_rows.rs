//! The WebSocket rows of the protocol page.

use super::harness::*;
use ivy::config::ServerOptions;
use ivy::event_id::EventId;
use ivy::storage::StoreOptions;
use std::time::Duration;

fn id_of(line: &str) -> EventId {
    let ts = line.trim_start_matches('@').split(':').next().unwrap();
    EventId::parse(ts).unwrap()
}

/// Receives `n` events, each passed to `check` with its index, in strictly increasing id order,
/// and then nothing more for 300 ms.
async fn recv_in_id_order(ws: &mut Ws, n: usize, check: impl Fn(usize, &str)) {
    let mut last = EventId(0);
    for i in 0..n {
        let m = ws.recv().await;
        check(i, &m);
        assert!(id_of(&m) > last, "event {i} after {last:?}: {m:.60}");
        last = id_of(&m);
    }
    assert_eq!(ws.quiet_for(Duration::from_millis(300)).await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intro_subprotocol_and_time() {
    let server = start().await;
    let mut a = ws(&server).await;
    assert_eq!(a.protocol.as_deref(), Some("ivy1"));
    assert_eq!(a.sid.len(), 16);
    let t = a.request("1", "@").await;
    assert!(t.starts_with('@') && EventId::parse(&t).is_ok(), "{t}");
    a.send("@").await;
    let plain = a.recv().await;
    assert!(
        plain.starts_with('@') && !plain.starts_with("##"),
        "{plain}"
    );
    // A client that offers another subprotocol only is refused.
    assert!(ws_with(&server, &[("Sec-WebSocket-Protocol", "other")])
        .await
        .is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bubbling_once_per_connection_and_sender_exclusion() {
    let server = start().await;
    let mut sub = ws(&server).await;
    let mut publisher = ws(&server).await;
    for p in ["/", "/rooms", "/rooms/abc", "/rooms/abc/chat"] {
        assert!(sub.request("s", &format!("+{p}")).await.starts_with('@'));
    }
    publisher.request("p", "+/rooms").await;
    let ack = publisher.request("1", ":/rooms/abc/chat:hello").await;
    let got = sub.recv().await;
    assert_eq!(got, format!("{ack}:/rooms/abc/chat:hello"));
    // Once, not four times; and never back to the publisher.
    assert_eq!(sub.quiet_for(Duration::from_millis(300)).await, None);
    assert_eq!(publisher.quiet_for(Duration::from_millis(300)).await, None);
    // Unsubscribed channels stop; the root still bubbles.
    for p in ["/rooms", "/rooms/abc", "/rooms/abc/chat"] {
        sub.request("u", &format!("-{p}")).await;
    }
    publisher.request("2", ":/other:x").await;
    assert!(sub.recv().await.ends_with(":/other:x"));
    publisher.request("3", ":/:at root").await;
    assert!(sub.recv().await.ends_with(":/:at root"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_acks_are_durable_ids_and_escaping_on_the_wire() {
    let server = start().await;
    let mut sub = ws(&server).await;
    let mut p = ws(&server).await;
    sub.request("s", "+/e").await;
    let ack = p.request("k", ":/e:100% new\nline\r and a dot.").await;
    let id = EventId::parse(&ack).unwrap();
    // The ack came after the event was durable: it is readable over HTTP now.
    let r = get(&server, &format!("/events/e?at={id}")).await;
    assert_eq!(
        r.text(),
        format!("@{id}:/e:100%25 new%0Aline%0D and a dot%2E\n")
    );
    assert_eq!(
        sub.recv().await,
        format!("@{id}:/e:100%25 new%0Aline%0D and a dot%2E")
    );
    // Bytes outside UTF-8, possible through HTTP publish, are %XX on the wire.
    let id2 = post(&server, "/e", b"\xff\xfeok").await;
    assert_eq!(sub.recv().await, format!("{id2}:/e:%FF%FEok"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_commands_keyed_and_unkeyed() {
    let server = start().await;
    let mut a = ws(&server).await;
    assert!(a.request("k", "+/A").await.starts_with('!'));
    assert!(a.request("k2", ":/a/../b:x").await.starts_with('!'));
    assert!(a.request("k3", "?").await.starts_with('!'));
    // Still open after keyed refusals.
    assert!(a.request("k4", "@").await.starts_with('@'));
    a.send("+/has space").await;
    assert_eq!(a.closed().await, 1008);
    let mut b = ws(&server).await;
    b.send("nonsense").await;
    assert_eq!(b.closed().await, 1008);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frame_limits_and_types() {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let server = start().await;
    let mut a = ws(&server).await;
    a.send(&format!(":/big:{}", "x".repeat(70 * 1024))).await;
    assert_eq!(a.closed().await, 1009);
    let mut b = ws(&server).await;
    b.stream
        .send(Message::binary(vec![1u8, 2, 3]))
        .await
        .unwrap();
    assert_eq!(b.closed().await, 1003);
    // Exactly at the limit is fine.
    let mut c = ws(&server).await;
    let fill = 64 * 1024 - "#k#:/big:".len();
    assert!(c
        .request("k", &format!(":/big:{}", "y".repeat(fill)))
        .await
        .starts_with('@'));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_events_are_announced_and_fetched_by_id() {
    let opts = ServerOptions {
        large_event_bytes: 1000,
        ..ServerOptions::default()
    };
    let server = start_with(opts, StoreOptions::default()).await;
    let mut sub = ws(&server).await;
    sub.request("s", "+/big").await;
    let data = "z".repeat(5000);
    let id = post(&server, "/big", data.as_bytes()).await;
    let notice = sub.recv().await;
    assert_eq!(notice, format!("{id}:/big."));
    let ts = id.trim_start_matches('@');
    let r = get(&server, &format!("/events/big?at={ts}")).await;
    assert_eq!(r.text(), format!("{id}:/big:{data}\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_replays_then_continues_live_without_gap_or_duplicate() {
    let server = start().await;
    let mut p = ws(&server).await;
    let mut ids = Vec::new();
    for i in 0..50 {
        ids.push(p.request("k", &format!(":/r/x:{i}")).await);
    }
    let mut sub = ws(&server).await;
    let from = &ids[19];
    let boundary = sub
        .request("s", &format!("+/r@{}", from.trim_start_matches('@')))
        .await;
    assert!(boundary.starts_with('@'));
    for i in 50..60 {
        ids.push(p.request("k", &format!(":/r/x:{i}")).await);
    }
    let mut last = EventId(0);
    for (i, expected) in ids.iter().enumerate().skip(20) {
        let m = sub.recv().await;
        assert_eq!(m, format!("{expected}:/r/x:{i}"));
        assert!(id_of(&m) > last);
        last = id_of(&m);
    }
    assert_eq!(sub.quiet_for(Duration::from_millis(300)).await, None);
}

/// Subscribers that do not read share one server-wide budget of event bytes held for them
/// (queued, being written, or read from the log to catch up): past it they read from the log
/// instead, though each is far from its own queue's bound, and every one still gets every event
/// once, in order, when it reads again. They are read one after the other: the stalled ones must
/// not keep the budget from the one that reads (before, each held a catch-up batch it could not
/// write, and 8 of them starved the reader until the write timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_subscribers_share_a_server_wide_budget() {
    const TOTAL: u64 = 64 * 1024;
    let opts = ServerOptions {
        queue_bytes_total_max: TOTAL as usize,
        ..ServerOptions::default()
    };
    let server = start_with(opts, StoreOptions::default()).await;
    let mut subs = Vec::new();
    for _ in 0..8 {
        let mut sub = ws_with_receive_buffer(&server, 4096).await;
        sub.request("s", "+/budget").await;
        subs.push(sub);
    }
    // 800 KB for each: under its own queue's bound (1 MiB), far over the server's.
    let (events, data) = (400, "d".repeat(2000));
    let mut p = ws(&server).await;
    for i in 0..events {
        p.send(&format!("#{i}#:/budget:{i}:{data}")).await;
    }
    for _ in 0..events {
        assert!(p.recv().await.contains("#@"));
    }
    let mut has_lagged = false;
    for _ in 0..20 {
        let held = metric(&server, "ivy_outbound_bytes").await;
        assert!(held <= TOTAL, "{held} bytes held");
        has_lagged |= metric(&server, "ivy_lagging_subscribers").await > 0;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(has_lagged, "nobody fell back to the log");
    // None reads yet: their writers wait a second for room, then give their events back. (This
    // waited for the end before, and on a quiet machine all 8 were read within that second.)
    until_metric(
        &server,
        "ivy_given_back_events_total",
        |v| v > 0,
        "no stalled writer gave events back",
    )
    .await;
    for sub in &mut subs {
        recv_in_id_order(sub, events, |i, m| {
            assert!(m.ends_with(&format!(":/budget:{i}:{data}")), "event {i}");
        })
        .await;
    }
    // Everything written: nothing is held any more.
    until_metric(
        &server,
        "ivy_outbound_bytes",
        |v| v == 0,
        "bytes still held",
    )
    .await;
}

/// Two connections that subscribe to a channel and publish to it, without reading while they
/// publish, so that both lag and catch up from the log: each gets every event of the other once,
/// in order, and none of its own, while each publishes more than a live session keeps of its
/// own ids once fan-out has passed them. (The one interleaving where forgetting those ids could
/// matter, a lag right after a run of its own events, is pinned down in `fanout.rs`' tests.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishers_that_lag_never_get_their_own_events_back() {
    // A small queue: they lag at once and catch up from the log.
    let catchup_reads = publishers_that_lag(2048).await;
    assert!(catchup_reads > 0, "nobody lagged");
    // The default queue: a writer holds a large live write when its peer stops reading.
    publishers_that_lag(ServerOptions::default().queue_bytes_max).await;
}

/// Runs the exchange above; returns the server's catch-up reads.
async fn publishers_that_lag(queue_bytes_max: usize) -> u64 {
    let opts = ServerOptions {
        queue_bytes_max,
        ..ServerOptions::default()
    };
    let server = start_with(opts, StoreOptions::default()).await;
    // More than a session remembers of its own ids once fan-out is past them
    // (`OWN_PASSED_KEPT`): a writer must then keep what it holds rather than give it back to the
    // log, where reading it again would meet own events it no longer knows. (Giving back
    // regardless was caught here: "a got its own".)
    let each = 3000;
    let pad = "p".repeat(500);
    // Both subscribed before either publishes: each is owed every event of the other.
    let mut clients = Vec::new();
    for names in [("a", "b"), ("b", "a")] {
        let mut ws = ws_with_receive_buffer(&server, 4096).await;
        ws.request("s", "+/mix").await;
        clients.push((names, ws));
    }
    let mut tasks = Vec::new();
    for ((me, other), mut ws) in clients {
        let pad = pad.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..each {
                ws.send(&format!(":/mix:{me}{i}:{pad}")).await;
            }
            ws.send(&format!("#done#:/mix:{me}end")).await;
            // Not reading for longer than a write waits: the writer gives what it holds back
            // to the log, and reading it again must skip this connection's own events too.
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let (mut next, mut acked) = (0, false);
            let mut last = EventId(0);
            while !(acked && next == each + 1) {
                let m = ws.recv().await;
                if m.starts_with("#done#@") {
                    acked = true;
                    continue;
                }
                assert!(
                    !m.contains(&format!(":/mix:{me}")),
                    "{me} got its own {m:.40}"
                );
                let expected = if next == each {
                    format!(":/mix:{other}end")
                } else {
                    format!(":/mix:{other}{next}:")
                };
                assert!(
                    m.contains(&expected),
                    "{me} expected {expected}, got {m:.40}"
                );
                assert!(id_of(&m) > last);
                last = id_of(&m);
                next += 1;
            }
            assert_eq!(ws.quiet_for(Duration::from_millis(300)).await, None);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    metric(&server, "ivy_catchup_reads_total").await
}

/// A subscriber that also publishes and stops reading mid-stream: its writer gives the events
/// it could not write back to the log, and reading them again skips the subscriber's own events
/// among them (the writer forgets its own ids only up to what reached the socket).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_given_back_to_the_log_still_skip_the_senders_own() {
    // A queue that holds everything: the events wait in one live write, not in the log.
    let opts = ServerOptions {
        queue_bytes_max: 64 << 20,
        ..ServerOptions::default()
    };
    let server = start_with(opts, StoreOptions::default()).await;
    let mut a = ws_with_receive_buffer(&server, 4096).await;
    a.request("s", "+/give").await;
    let mut b = ws(&server).await;
    let pad = "p".repeat(2000);
    // 3,000 events of 2 KB from b, with one of a's own after every tenth: far more than the
    // kernel buffers hold for a, which reads nothing meanwhile.
    for i in 0..3000 {
        b.send(&format!(":/give:b{i}:{pad}")).await;
        if i % 10 == 0 {
            a.send(&format!(":/give:a{i}")).await;
        }
    }
    assert!(b.request("d", "@").await.starts_with('@'));
    // Longer than a write waits for room before it gives the rest back.
    until_metric(
        &server,
        "ivy_given_back_events_total",
        |v| v > 0,
        "the writer gave nothing back",
    )
    .await;
    recv_in_id_order(&mut a, 3000, |i, m| {
        assert!(!m.contains(":/give:a"), "a got its own {m:.40}");
        assert!(m.contains(&format!(":/give:b{i}:")), "event {i}: {m:.40}");
    })
    .await;
}

/// A subscriber far slower than the publisher: it falls back to the log and catches up with
/// nothing lost, nothing duplicated, ids increasing; the publisher is not slowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_subscriber_catches_up_from_the_log() {
    let opts = ServerOptions {
        queue_bytes_max: 2048,
        ..ServerOptions::default()
    };
    let server = start_with(opts, StoreOptions::default()).await;
    let mut sub = ws(&server).await;
    sub.request("s", "+/slow").await;
    let mut p = ws(&server).await;
    let total = 3000;
    for i in 0..total {
        p.send(&format!(":/slow/c:{i}")).await;
    }
    p.request("done", ":/slow/c:end").await;
    recv_in_id_order(&mut sub, total + 1, |i, m| {
        let expected = if i == total {
            "end".to_string()
        } else {
            i.to_string()
        };
        assert!(
            m.ends_with(&format!(":/slow/c:{expected}")),
            "event {i}: {m}"
        );
    })
    .await;
    assert!(
        metric(&server, "ivy_catchup_reads_total").await > 0,
        "the subscriber never fell back to the log"
    );
}

/// A subscriber that stops reading holds little in the kernel (`ws_send_buffer_bytes`), so a
/// backlog of 1 MiB, a quarter of what Linux's autotuning lets one loopback socket hold, still
/// passes its queue and falls back to the log; read later, it arrives whole, in order, once.
/// (With the bound off, the same run made no catch-up read: the kernel held it all.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_subscribers_backlog_goes_to_the_log_not_the_kernel() {
    let opts = ServerOptions {
        queue_bytes_max: 64 << 10,
        ws_send_buffer_bytes: 32 << 10,
        ..ServerOptions::default()
    };
    let server = start_with(opts, StoreOptions::default()).await;
    let mut sub = ws(&server).await;
    sub.request("s", "+/stall").await;
    let mut p = ws(&server).await;
    let total = 256;
    let pad = "s".repeat(4000);
    // One at a time, acknowledged: fan-out delivers each alone, so only the socket's refusal to
    // take more can fill the queue.
    for i in 0..total {
        p.request(&i.to_string(), &format!(":/stall:{i}:{pad}"))
            .await;
    }
    // Its writer reads the log only once the socket takes what it holds, after the reading
    // below; the queue turns lagging now.
    until_metric(
        &server,
        "ivy_lagging_subscribers",
        |v| v > 0,
        "the stalled subscriber's queue never gave way to the log",
    )
    .await;
    recv_in_id_order(&mut sub, total, |i, m| {
        assert!(m.contains(&format!(":/stall:{i}:")), "event {i}: {m:.40}");
    })
    .await;
    assert!(
        metric(&server, "ivy_catchup_reads_total").await > 0,
        "the stalled subscriber never read from the log"
    );
}

/// Fan-out writes to an idle connection's socket itself and leaves what the socket does not take
/// to the connection's writer. Big events against a subscriber that does not read fill the socket
/// mid-frame, while the subscriber's own keyed publishes give its writer acks to send; when it
/// reads, every event and every ack arrives whole, in order, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_events_to_a_stalled_subscriber_arrive_whole_after_partial_writes() {
    let server = start().await;
    let mut sub = ws(&server).await;
    sub.request("s", "+/big").await;
    let mut p = ws(&server).await;
    let total = 120;
    let body = |i: usize| {
        format!(
            "{i}:{}",
            char::from(b'a' + (i % 26) as u8)
                .to_string()
                .repeat(40_000 + i * 97)
        )
    };
    for i in 0..total {
        p.request(&i.to_string(), &format!(":/big:{}", body(i)))
            .await;
        sub.send(&format!("#own{i}#:/elsewhere:{i}")).await;
    }
    let mut last = EventId(0);
    let (mut events, mut acks) = (0, 0);
    while events < total || acks < total {
        let m = sub.recv().await;
        if let Some(rest) = m.strip_prefix(&format!("#own{acks}#")) {
            assert!(rest.starts_with('@'), "{rest}");
            acks += 1;
            continue;
        }
        assert!(
            m.ends_with(&format!(":/big:{}", body(events))),
            "event {events} arrived altered ({} bytes)",
            m.len()
        );
        assert!(id_of(&m) > last);
        last = id_of(&m);
        events += 1;
    }
    assert_eq!(sub.quiet_for(Duration::from_millis(300)).await, None);
    assert!(
        metric(&server, "ivy_direct_writes_total").await > 0,
        "fan-out never wrote directly"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_past_the_lag_limit_is_closed_with_1013() {
    let opts = ServerOptions {
        queue_bytes_max: 256,
        lag_events_max: 50,
        ..ServerOptions::default()
    };
    let server = start_with(opts, StoreOptions::default()).await;
    // A raw client that never reads: its queue fills, then it lags, then it is closed.
    let mut sub = ws(&server).await;
    sub.request("s", "+/lag").await;
    let mut p = ws(&server).await;
    for i in 0..2000 {
        p.send(&format!(":/lag:{i}")).await;
    }
    p.request("k", "@").await;
    assert_eq!(sub.closed().await, 1013);
}

/// Publishers on many streams at once; a subscriber of `/` sees every event once, in strictly
/// increasing id order, and a resume from the last id it saw misses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordering_across_streams_with_many_publishers() {
    let server = start().await;
    let mut sub = ws(&server).await;
    sub.request("s", "+/").await;
    let publishers = 6;
    let each = 150;
    let mut tasks = Vec::new();
    for w in 0..publishers {
        let addr = server.addr;
        let mut p = ws_at(addr).await;
        tasks.push(tokio::spawn(async move {
            for i in 0..each {
                p.send(&format!("#{i}#:/s{w}/x:{i}")).await;
            }
            for _ in 0..each {
                p.recv().await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut last = EventId(0);
    let mut seen = std::collections::HashSet::new();
    for _ in 0..publishers * each {
        let m = sub.recv().await;
        let id = id_of(&m);
        assert!(id > last, "{m} after {last}");
        last = id;
        assert!(seen.insert(m));
    }
    assert_eq!(sub.quiet_for(Duration::from_millis(300)).await, None);
}

/// Many subscribers at once, with overlapping subscriptions, while publishers on several
/// streams pipeline bursts: fan-out walks the subscribers' sockets while further events commit
/// and join the walk, and a backlog goes out in batches. Every subscriber still gets exactly
/// its events, once each, ids strictly increasing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_subscribers_each_get_their_events_once_in_order_during_bursts() {
    let server = start().await;
    let (publishers, each, subscribers) = (4, 400, 150);
    let mut readers = Vec::new();
    for k in 0..subscribers {
        let mut sub = ws(&server).await;
        // Three kinds: everything; one stream only; everything twice over (one copy each).
        let expected = match k % 3 {
            0 => {
                sub.request("s", "+/").await;
                publishers * each
            }
            1 => {
                sub.request("s", "+/s1").await;
                each
            }
            _ => {
                sub.request("s", "+/").await;
                sub.request("t", "+/s2/x").await;
                publishers * each
            }
        };
        readers.push(tokio::spawn(async move {
            let mut last = EventId(0);
            for n in 0..expected {
                let m = sub.recv().await;
                let id = id_of(&m);
                assert!(id > last, "subscriber {k}, event {n}: {m} after {last}");
                last = id;
                if k % 3 == 1 {
                    assert!(m.contains(":/s1/x:"), "{m}");
                }
            }
            assert_eq!(sub.quiet_for(Duration::from_millis(300)).await, None);
        }));
    }
    let mut tasks = Vec::new();
    for w in 0..publishers {
        let mut p = ws_at(server.addr).await;
        tasks.push(tokio::spawn(async move {
            for burst in 0..each / 100 {
                for i in 0..100 {
                    p.send(&format!("#{i}#:/s{w}/x:{burst}.{i}")).await;
                }
                for _ in 0..100 {
                    assert!(p.recv().await.starts_with('#'));
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    for r in readers {
        r.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_site_websocket_upgrades_are_refused() {
    let server = start().await;
    let host = format!("http://{}", server.addr);
    assert!(ws_with(&server, &[("Origin", "http://evil.example")])
        .await
        .is_err());
    assert!(ws_with(&server, &[("Origin", "null")]).await.is_err());
    assert!(ws_with(&server, &[("Origin", &host)]).await.is_ok());
    let opts = ServerOptions {
        origins: ivy::config::OriginPolicy::from_list(&["http://app.example".into()]),
        ..ServerOptions::default()
    };
    let listed = start_with(opts, StoreOptions::default()).await;
    assert!(ws_with(&listed, &[("Origin", "http://app.example")])
        .await
        .is_ok());
    assert!(ws_with(&listed, &[("Origin", "http://evil.example")])
        .await
        .is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_cap() {
    let opts = ServerOptions {
        subscriptions_max: 3,
        ..ServerOptions::default()
    };
    let server = start_with(opts, StoreOptions::default()).await;
    let mut a = ws(&server).await;
    for i in 0..3 {
        assert!(a.request("k", &format!("+/c{i}")).await.starts_with('@'));
    }
    assert_eq!(a.request("k", "+/c9").await, "!too many subscriptions");
    a.send("+/c10").await;
    assert_eq!(a.closed().await, 1008);
}

/// The server-wide cap counts every connection's subscriptions, frees them on `-` and on close,
/// and refuses past it with 1013 (try later), not 1008: the client broke no rule.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_cap_for_the_whole_server() {
    let opts = ServerOptions {
        subscriptions_total_max: 4,
        ..ServerOptions::default()
    };
    let server = start_with(opts, StoreOptions::default()).await;
    let mut a = ws(&server).await;
    let mut b = ws(&server).await;
    for i in 0..2 {
        assert!(a.request("k", &format!("+/a{i}")).await.starts_with('@'));
        assert!(b.request("k", &format!("+/b{i}")).await.starts_with('@'));
    }
    // Again the same channel is no new subscription.
    assert!(a.request("k", "+/a0").await.starts_with('@'));
    let full = "!too many subscriptions on this server";
    assert_eq!(a.request("k", "+/a2").await, full);
    assert_eq!(b.request("k", "+/b2").await, full);
    // An unsubscribe frees a place, and so does a closed connection.
    assert!(a.request("k", "-/a1").await.starts_with('@'));
    assert!(b.request("k", "+/b2").await.starts_with('@'));
    assert_eq!(a.request("k", "+/a1").await, full);
    drop(b);
    let mut c = ws(&server).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let reply = c.request("k", "+/c0").await;
        if reply.starts_with('@') {
            break;
        }
        assert_eq!(reply, full);
        assert!(
            std::time::Instant::now() < deadline,
            "b's subscriptions were not freed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Subscribed ones still get events; an unkeyed `+` past the cap closes with 1013.
    post(&server, "/a0", b"still delivered").await;
    assert!(a.recv().await.ends_with(":/a0:still delivered"));
    assert!(c.request("k", "+/c1").await.starts_with('@'));
    assert!(c.request("k", "+/c2").await.starts_with('@'));
    a.send("+/a9").await;
    assert_eq!(a.closed().await, 1013);
}

/// Shutdown closes WebSockets with 1001 and keeps every acknowledged event; a restart on the
/// same directory serves them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_and_restart_keep_acknowledged_events() {
    let tmp = tempfile::tempdir().unwrap();
    let mut server = start_in(
        tmp.path(),
        ServerOptions::default(),
        StoreOptions::default(),
    )
    .await;
    let mut p = ws(&server).await;
    let mut ids = Vec::new();
    for i in 0..100 {
        ids.push(p.request("k", &format!(":/keep:{i}")).await);
    }
    server.shutdown().await;
    assert_eq!(p.closed().await, 1001);
    let server = start_in(
        tmp.path(),
        ServerOptions::default(),
        StoreOptions::default(),
    )
    .await;
    let body = get(&server, "/events/keep").await.text();
    let got: Vec<&str> = body.lines().map(|l| l.split(':').next().unwrap()).collect();
    assert_eq!(got, ids.iter().map(String::as_str).collect::<Vec<_>>());
}

/// A program that embeds the server in its own hyper connections (`Server::handle` on a plain
/// `TcpStream`) gets WebSockets too: fan-out cannot write to that stream itself, so every frame
/// goes through the connection's writer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedding_hyper_program_serves_websockets_through_handle() {
    use hyper_util::rt::TokioIo;
    let tmp = tempfile::tempdir().unwrap();
    let store = ivy::storage::Store::open(tmp.path(), StoreOptions::default()).unwrap();
    let server =
        std::sync::Arc::new(ivy::server::Server::new(store, ServerOptions::default()).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let embedder = std::sync::Arc::clone(&server);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let server = std::sync::Arc::clone(&embedder);
            let service = hyper::service::service_fn(move |req| {
                let server = std::sync::Arc::clone(&server);
                async move { Ok::<_, std::convert::Infallible>(server.handle(req).await) }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .with_upgrades(),
            );
        }
    });
    let mut sub = ws_at(addr).await;
    sub.request("s", "+/embedded").await;
    let mut p = ws_at(addr).await;
    for i in 0..50 {
        assert!(p
            .request(&i.to_string(), &format!(":/embedded/x:{i}"))
            .await
            .starts_with('@'));
    }
    for i in 0..50 {
        assert!(sub.recv().await.ends_with(&format!(":/embedded/x:{i}")));
    }
    let embedded = TestServer::external(addr, tmp.path().to_path_buf());
    assert_eq!(metric(&embedded, "ivy_deliveries_total").await, 50);
    assert_eq!(metric(&embedded, "ivy_direct_writes_total").await, 0);
}

/// Two connections that both publish (keyed, so each gets acks from its writer task) and both
/// subscribe (so fan-out writes the other's events to their sockets): acks and events interleave
/// on one socket, every frame whole, the events in order and each ack once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_and_fanned_out_events_share_a_socket_intact() {
    let server = start().await;
    let each = 500;
    let mut conns = Vec::new();
    for _ in 0..2 {
        let mut c = ws(&server).await;
        c.request("s", "+/mix").await;
        conns.push(c);
    }
    let mut joins = Vec::new();
    for (me, mut c) in conns.into_iter().enumerate() {
        joins.push(tokio::spawn(async move {
            for i in 0..each {
                c.send(&format!("#{me}-{i}#:/mix/{me}:{i}")).await;
            }
            let other = 1 - me;
            let (mut acks, mut next_event) = (0, 0);
            let mut last = EventId(0);
            while acks < each || next_event < each {
                let m = c.recv().await;
                if let Some(rest) = m.strip_prefix(&format!("#{me}-{acks}#")) {
                    assert!(rest.starts_with('@'), "{m}");
                    acks += 1;
                } else {
                    assert!(
                        m.ends_with(&format!(":/mix/{other}:{next_event}")),
                        "{me} got {m}"
                    );
                    assert!(id_of(&m) > last);
                    last = id_of(&m);
                    next_event += 1;
                }
            }
            assert_eq!(c.quiet_for(Duration::from_millis(200)).await, None);
        }));
    }
    for j in joins {
        j.await.unwrap();
    }
}
