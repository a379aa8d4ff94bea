//! `fanout`: one publisher to S subscribers of one channel, every event numbered, so that each
//! subscriber counts what it lost, saw twice or saw out of order.

use crate::client::{
    closed_by_server, connect, pong, send, send_buffered, slot, FrameReader, Refusals, ServerFrame,
    Writer,
};
use crate::cpu::{CpuMeter, CpuUse};
use crate::{now_nanos, percentiles};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The sequence number and send time of a fan-out event, `@TS:/fan:SEQ:SENT_NANOS:padding`,
/// parsed in place; `None` for another message.
pub(crate) fn fanout_fields(payload: &[u8]) -> Option<(u64, u64)> {
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

#[derive(Default)]
pub(crate) struct SubStats {
    received: u64,
    unique: u64,
    duplicated: u64,
    reordered: u64,
    /// Times the server closed the connection as lagging (1013) and it resumed.
    resumed: u64,
    /// Why it stopped before it had every event, if it did.
    gave_up: Option<String>,
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
pub(crate) struct FanoutCounters {
    pub(crate) published: Arc<AtomicU64>,
    pub(crate) delivered: Arc<AtomicU64>,
    pub(crate) done_publishing: Arc<AtomicBool>,
}

impl FanoutCounters {
    pub(crate) fn new() -> FanoutCounters {
        FanoutCounters {
            published: Arc::new(AtomicU64::new(0)),
            delivered: Arc::new(AtomicU64::new(0)),
            done_publishing: Arc::new(AtomicBool::new(false)),
        }
    }
}

/// Connects and subscribes `subscribers` clients to `/fan` (the first `slow_count` read slowly)
/// and starts their reading loops; each task ends with (is slow, stats).
pub(crate) async fn start_subscribers(
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
                    Err(e) => {
                        seen.st.gave_up = Some(format!("resuming: {e:#}"));
                        break;
                    }
                }
                seen.st.resumed += 1;
            }
            Ok(Err(e)) => {
                seen.st.gave_up = Some(format!("{e:#}"));
                break;
            }
            Err(_) => {
                seen.st.gave_up = Some("15 s without a message".to_string());
                break;
            }
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
            ServerFrame::Close(payload) => anyhow::bail!(closed_by_server(payload)),
            ServerFrame::Other => {}
        }
        if seen.has_all(c) {
            return Ok(Batch::Read);
        }
    }
    frames.fill().await?;
    Ok(Batch::Read)
}

/// Waits for the subscribers to finish and prints deliveries/s, losses and latencies.
pub(crate) async fn report_fanout(
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
    let (mut gave_up, mut first_reason) = (0, None);
    for t in subs {
        let (is_slow, st) = t.await?;
        if let Some(reason) = st.gave_up {
            gave_up += 1;
            first_reason.get_or_insert(reason);
        }
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
    if let Some(reason) = first_reason {
        say!("{label}: {gave_up} subscribers stopped before they had every event; the first because: {reason}");
    }
    percentiles("publish-to-delivery (fast subscribers)", fast_lat);
    cpu.report(deliveries_during, "delivery");
    // After the report, so that it is printed whole: a run that lost, repeated or reordered
    // an event fails, whether the server or a subscriber that gave up is to blame.
    anyhow::ensure!(
        lost == 0 && dup == 0 && reorder == 0,
        "the subscribers lost {lost}, saw twice {dup} and out of order {reorder} events"
    );
    Ok(())
}

/// The time until the `seq`th event is due at `rate` per second, if it is not due yet.
pub(crate) fn pace(started: Instant, rate: u64, seq: u64) -> Option<Duration> {
    if rate == 0 {
        return None;
    }
    let due = started + Duration::from_secs_f64(seq as f64 / rate as f64);
    due.checked_duration_since(Instant::now())
}

pub(crate) async fn fanout(
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

#[cfg(test)]
mod tests {
    use super::*;

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
    fn fan_out_fields_come_from_the_third_and_fourth_fields() {
        assert_eq!(
            fanout_fields(b"@1795982068.662161665:/fan:42:1795982068662161665:ppp"),
            Some((42, 1_795_982_068_662_161_665))
        );
        assert_eq!(fanout_fields(b"#s#@1795982068.662161665"), None);
    }
}
