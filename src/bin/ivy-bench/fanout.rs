//! `fanout`: one publisher to S subscribers of one channel, every event numbered, so that each
//! subscriber counts what it lost, saw twice or saw out of order.

use crate::client::{connect, send, send_buffered, slot, Refusals, ServerFrame};
use crate::cpu::{CpuMeter, CpuUse};
use crate::receivers::{Receivers, Slow};
use crate::{now_nanos, percentiles};
use ivy::event_id::EventId;
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

/// An event's id, `@SECONDS.NANOS` at the start of its line as the server writes it, in ns since
/// the epoch (only for the sampled events: `Seen::note`).
pub(crate) fn event_id_nanos(payload: &[u8]) -> Option<u64> {
    let field = payload.split(|&b| b == b':').next()?;
    let id = std::str::from_utf8(field).ok()?.strip_prefix('@')?;
    // `EventId::parse` also takes the shorter forms a client may send; a line has the dot.
    if !id.contains('.') {
        return None;
    }
    EventId::parse(id).ok().map(EventId::as_nanos)
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
    pub(crate) received: u64,
    pub(crate) unique: u64,
    pub(crate) duplicated: u64,
    pub(crate) reordered: u64,
    /// Times the server closed the connection as lagging (1013) and it resumed.
    pub(crate) resumed: u64,
    /// Why it stopped before it had every event, if it did.
    pub(crate) gave_up: Option<String>,
    pub(crate) latencies: Vec<Latency>,
}

/// One sampled event's way from the publisher to a subscriber.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Latency {
    /// When it was sent, ns since the epoch.
    pub(crate) sent: u64,
    /// From sending to delivery, us.
    pub(crate) total: u64,
    /// From sending to its append, us: its id is the server's clock at the append (the same
    /// clock as the tool's, on one machine). The rest of `total` is the commit, the fan-out and
    /// the subscriber's reading.
    pub(crate) to_append: u64,
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
    /// Of those, the deliveries to subscribers that are not slow.
    pub(crate) fast_delivered: Arc<AtomicU64>,
    pub(crate) done_publishing: Arc<AtomicBool>,
}

impl FanoutCounters {
    pub(crate) fn new() -> FanoutCounters {
        FanoutCounters {
            published: Arc::new(AtomicU64::new(0)),
            delivered: Arc::new(AtomicU64::new(0)),
            fast_delivered: Arc::new(AtomicU64::new(0)),
            done_publishing: Arc::new(AtomicBool::new(false)),
        }
    }
}

/// What one subscriber has received so far.
pub(crate) struct Seen {
    /// A slow subscriber's latency is not sampled, and its deliveries do not hold the unpaced
    /// publisher back (`ahead_of_fast_subscribers`).
    is_slow: bool,
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
    pub(crate) fn new(is_slow: bool) -> Seen {
        Seen {
            is_slow,
            st: SubStats::default(),
            bits: SeqBits::default(),
            next: 0,
            uncounted: 0,
            last_id: Vec::new(),
        }
    }

    pub(crate) fn is_slow(&self) -> bool {
        self.is_slow
    }

    pub(crate) fn has_all(&self, c: &FanoutCounters) -> bool {
        c.done_publishing.load(Ordering::Relaxed)
            && self.st.unique >= c.published.load(Ordering::Relaxed)
    }

    /// Counts a text message if it is a fan-out event (true), remembering its id to resume
    /// after.
    pub(crate) fn event(&mut self, payload: &[u8], c: &FanoutCounters) -> bool {
        let Some((seq, sent)) = fanout_fields(payload) else {
            return false;
        };
        self.note(seq, sent, payload, c);
        let id = payload.split(|&b| b == b':').next().unwrap_or_default();
        self.last_id.clear();
        self.last_id.extend_from_slice(id);
        true
    }

    /// Fan-out events received, repeats included.
    pub(crate) fn received(&self) -> u64 {
        self.st.received
    }

    /// The subscription that resumes after the last event received.
    pub(crate) fn resume_command(&self) -> Vec<u8> {
        let mut command = b"#s#+/fan".to_vec();
        command.extend_from_slice(&self.last_id);
        command
    }

    pub(crate) fn note_resumed(&mut self) {
        self.st.resumed += 1;
    }

    /// Records why it stopped (the first reason, if it is given more than one).
    pub(crate) fn give_up(&mut self, reason: String) {
        self.st.gave_up.get_or_insert(reason);
    }

    /// It has every event, or has given up.
    pub(crate) fn is_finished(&self, c: &FanoutCounters) -> bool {
        self.st.gave_up.is_some() || self.has_all(c)
    }

    /// Adds the deliveries not yet counted to the shared counters.
    pub(crate) fn count_deliveries(&mut self, c: &FanoutCounters) {
        let n = std::mem::take(&mut self.uncounted);
        c.delivered.fetch_add(n, Ordering::Relaxed);
        if !self.is_slow {
            c.fast_delivered.fetch_add(n, Ordering::Relaxed);
        }
    }

    pub(crate) fn into_stats(self) -> SubStats {
        self.st
    }

    /// Counts event `seq`, sent at `sent` (ns since the epoch), whose line is `payload`. No set,
    /// no clock read, no parse of the id and no shared counter update per message (each showed
    /// in a profile of this loop, or cost deliveries/s): latency is sampled and deliveries are
    /// published every 16th message.
    fn note(&mut self, seq: u64, sent: u64, payload: &[u8], c: &FanoutCounters) {
        self.uncounted += 1;
        if self.uncounted == 16 {
            self.count_deliveries(c);
        }
        let st = &mut self.st;
        st.received += 1;
        if !self.bits.insert(seq) {
            st.duplicated += 1;
        } else {
            st.unique += 1;
            if seq < self.next {
                st.reordered += 1;
            }
            self.next = self.next.max(seq + 1);
        }
        if !self.is_slow && st.received.is_multiple_of(16) {
            let appended = event_id_nanos(payload).unwrap_or(0);
            st.latencies.push(Latency {
                sent,
                total: now_nanos().saturating_sub(sent) / 1000,
                to_append: appended.saturating_sub(sent) / 1000,
            });
        }
    }
}

/// Waits for the subscribers to finish and prints deliveries/s, losses and latencies.
pub(crate) async fn report_fanout(
    label: &str,
    subs: Receivers,
    slow_count: usize,
    c: &FanoutCounters,
    publish_secs: f64,
    cpu: CpuUse,
) -> anyhow::Result<()> {
    let seq = c.published.load(Ordering::Relaxed);
    let deliveries_during = c.delivered.load(Ordering::Relaxed);
    let subs = subs.join().await?;
    let subscribers = subs.len();
    let mut fast_lat = Vec::new();
    let (mut lost, mut dup, mut reorder, mut resumed) = (0u64, 0u64, 0u64, 0u64);
    let mut slow_done = 0;
    let (mut gave_up, mut first_reason) = (0, None);
    for (is_slow, st) in subs {
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
    let by_second = p99_by_second(&fast_lat);
    percentiles(
        "publish-to-delivery (fast subscribers)",
        fast_lat.iter().map(|l| l.total).collect(),
    );
    percentiles(
        "  of which publish-to-append (the event's id)",
        fast_lat.iter().map(|l| l.to_append).collect(),
    );
    percentiles(
        "  and append-to-delivery (commit, fan-out, reading)",
        fast_lat
            .iter()
            .map(|l| l.total.saturating_sub(l.to_append))
            .collect(),
    );
    if by_second.len() > 1 {
        let ms: Vec<String> = by_second
            .iter()
            .map(|us| us.map_or("-".to_string(), |us| format!("{:.1}", us as f64 / 1000.0)))
            .collect();
        say!("p99 by second of publishing (ms): {}", ms.join(" "));
    }
    cpu.report(deliveries_during, "delivery");
    // After the report, so that it is printed whole: a run that lost, repeated or reordered
    // an event fails, whether the server or a subscriber that gave up is to blame.
    anyhow::ensure!(
        lost == 0 && dup == 0 && reorder == 0,
        "the subscribers lost {lost}, saw twice {dup} and out of order {reorder} events"
    );
    Ok(())
}

/// The p99 latency (us) of the events sent in each whole second since the first was sent, so a
/// reader can tell a tail spread over the run from one made in a bad second or two (on the
/// 2-core VM this was measured on, one paced run's seconds ranged from 6 to 15 ms). `None` for
/// a second without samples.
fn p99_by_second(samples: &[Latency]) -> Vec<Option<u64>> {
    let Some(first) = samples.iter().map(|l| l.sent).min() else {
        return Vec::new();
    };
    let mut seconds: Vec<Vec<u64>> = Vec::new();
    for &Latency { sent, total, .. } in samples {
        let second = ((sent - first) / 1_000_000_000) as usize;
        if seconds.len() <= second {
            seconds.resize_with(second + 1, Vec::new);
        }
        seconds[second].push(total);
    }
    seconds
        .into_iter()
        .map(|mut s| {
            s.sort_unstable();
            s.get(s.len().saturating_sub(1) * 99 / 100).copied()
        })
        .collect()
}

/// How far an unpaced publisher may run ahead of the average fast subscriber, in events. The
/// server never slows a publisher for its subscribers, so without this bound a publisher that
/// outruns them builds a backlog that takes minutes to drain (measured: 747,000 events published
/// in 10 s, delivered over 70 s), and the run measures the catching up, not the fan-out. 10,000
/// events is about a second of what 1,000 subscribers take, far more than keeps the server busy,
/// and a tenth of the server's default lag limit.
const AHEAD_MAX: u64 = 10_000;

/// Events published that the average fast subscriber has not counted yet (0 without any).
fn ahead_of_fast_subscribers(c: &FanoutCounters, published: u64, fast: usize) -> u64 {
    if fast == 0 {
        return 0;
    }
    published.saturating_sub(c.fast_delivered.load(Ordering::Relaxed) / fast as u64)
}

/// A counter or gauge from the server's `GET /metrics`, if it has one by that name.
async fn server_metric(addr: SocketAddr, name: &str) -> anyhow::Result<Option<u64>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await?;
    let request = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    tcp.write_all(request.as_bytes()).await?;
    let mut answer = String::new();
    tcp.read_to_string(&mut answer).await?;
    Ok(metric_value(&answer, name))
}

/// `name`'s value in a Prometheus text answer (an integer, as counters and gauges here are).
fn metric_value(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let value = line.strip_prefix(name)?.strip_prefix(' ')?;
        value.trim().parse::<f64>().ok().map(|v| v as u64)
    })
}

/// The time until the `seq`th event is due at `rate` per second, if it is not due yet.
pub(crate) fn pace(started: Instant, rate: u64, seq: u64) -> Option<Duration> {
    if rate == 0 {
        return None;
    }
    let due = started + Duration::from_secs_f64(seq as f64 / rate as f64);
    due.checked_duration_since(Instant::now())
}

#[derive(clap::Args)]
pub(crate) struct FanoutArgs {
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
    /// Milliseconds that each slow subscriber reads nothing at all once subscribed. Paced, a
    /// slow subscriber keeps up otherwise; a stall longer than the server's buffers take (its
    /// queue, and the kernel's send buffer: see `ivy serve --ws-send-buffer-bytes`) makes it read
    /// from the log.
    #[arg(long, default_value_t = 0)]
    slow_stall_ms: u64,
    #[command(flatten)]
    receivers: ReceiverThreads,
}

/// How many threads read the fast subscribers' sockets (`receivers.rs`).
#[derive(clap::Args)]
pub(crate) struct ReceiverThreads {
    /// Threads that read the subscribers' sockets; by default one per core but one, and at
    /// least one: the tool shares the machine with the server, and a receiver on every core
    /// preempts the server's fan-out thread, which the tool would then report as the server's
    /// latency.
    #[arg(long)]
    receiver_threads: Option<usize>,
}

impl ReceiverThreads {
    pub(crate) fn count(&self) -> usize {
        self.receiver_threads.unwrap_or_else(|| {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            cores.saturating_sub(1).max(1)
        })
    }
}

pub(crate) async fn fanout(
    addr: SocketAddr,
    seconds: u64,
    args: &FanoutArgs,
) -> anyhow::Result<()> {
    let FanoutArgs {
        subscribers,
        size,
        rate,
        window,
        slow_fraction,
        slow_stall_ms,
        ref receivers,
    } = *args;
    let slow_count = ((subscribers as f64) * slow_fraction).round() as usize;
    let c = FanoutCounters::new();
    let threads = receivers.count();
    let slow = Slow {
        count: slow_count,
        stall: Duration::from_millis(slow_stall_ms),
    };
    let subs = Receivers::start(addr, subscribers, slow, threads, &c).await?;
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
            while ahead_of_fast_subscribers(&c, seq, subscribers - slow_count) > AHEAD_MAX {
                pw.flush().await?;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
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
    if slow_count > 0 {
        // Whether the slow ones did read from the log: the server's count says.
        match server_metric(addr, "ivy_catchup_reads_total").await {
            Ok(Some(reads)) => say!("{label}: the server's catch-up reads from the log: {reads}"),
            Ok(None) => say!("{label}: the server has no ivy_catchup_reads_total metric"),
            Err(e) => say!("{label}: cannot read the server's metrics: {e:#}"),
        }
    }
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
    fn p99_is_taken_per_second_of_sending() {
        let second = 1_000_000_000;
        let at = |sent, total| Latency {
            sent,
            total,
            to_append: 0,
        };
        let mut samples: Vec<Latency> = (0..100).map(|i| at(5 * second + i, i)).collect();
        samples.extend((0..100).map(|i| at(6 * second + 7, 1000 + i)));
        samples.push(at(8 * second, 42));
        assert_eq!(
            p99_by_second(&samples),
            vec![Some(98), Some(1098), None, Some(42)]
        );
        assert_eq!(p99_by_second(&[]), Vec::<Option<u64>>::new());
    }

    #[test]
    fn a_metric_is_found_by_its_whole_name() {
        let text = "# HELP ivy_catchup_reads Log reads\n\
                    ivy_catchup_reads_total_x 9\n\
                    ivy_catchup_reads_total 42\n";
        assert_eq!(metric_value(text, "ivy_catchup_reads_total"), Some(42));
        assert_eq!(metric_value(text, "ivy_catchup_reads"), None);
        assert_eq!(metric_value("ivy_x 1.5e3\n", "ivy_x"), Some(1500));
    }

    #[test]
    fn a_subscriber_counts_duplicates_and_reordering() {
        let c = FanoutCounters::new();
        let mut seen = Seen::new(false);
        for seq in [0, 1, 3, 2, 3] {
            seen.note(seq, 0, b"", &c);
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

    #[test]
    fn an_event_id_is_read_as_nanoseconds() {
        let line = b"@1795982068.062161665:/fan:42:1795982068000000000:ppp";
        assert_eq!(event_id_nanos(line), Some(1_795_982_068_062_161_665));
        assert_eq!(event_id_nanos(b"1795982068.062161665:/fan"), None, "no @");
        assert_eq!(event_id_nanos(b"@1795982068:/fan"), None, "no dot");
        assert_eq!(
            event_id_nanos(b"@1.1000000000:/fan"),
            None,
            "nanos past a second"
        );
    }

    #[test]
    fn a_sample_splits_at_the_append() {
        let c = FanoutCounters::new();
        let mut seen = Seen::new(false);
        let sent = now_nanos() - 5_000_000;
        let appended = sent + 2_000_000;
        let line = format!("@{}:/fan:0:{sent}:p", EventId(appended));
        for seq in 0..16 {
            seen.note(seq, sent, line.as_bytes(), &c);
        }
        let [sample] = seen.st.latencies[..] else {
            panic!("one sample per 16 events: {:?}", seen.st.latencies);
        };
        assert_eq!(sample.sent, sent);
        assert_eq!(sample.to_append, 2_000);
        assert!(
            sample.total >= 5_000,
            "received at least 5 ms after sending"
        );
    }
}
