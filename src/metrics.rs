//! The metric families, registered with `prometheus-client`, which also renders the text format.
//! Nothing here is hand-rendered.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use std::time::Duration;

/// Upper bounds of the commit and fsync latency buckets, in seconds: 50 us to about 3.3 s, each
/// twice the last (a healthy local disk syncs in tens of microseconds to a few milliseconds).
const SECONDS_BUCKETS: (f64, f64, u16) = (0.000_05, 2.0, 17);
/// Upper bounds of the events-per-round buckets: 1 to 65,536, each four times the last.
const EVENTS_BUCKETS: (f64, f64, u16) = (1.0, 4.0, 9);

fn histogram((start, factor, count): (f64, f64, u16)) -> Histogram {
    Histogram::new(exponential_buckets(start, factor, count))
}

/// What the writer reports as it works (`CommitObserver`).
pub struct CommitHistograms {
    /// Events per group-commit round (the batch that one write and one fsync serve).
    pub round_events: Histogram,
    /// A round's writes and (under `always`) syncs: what an ack waits for beyond its queueing.
    pub round_seconds: Histogram,
    pub fsync_seconds: Histogram,
}

impl Default for CommitHistograms {
    fn default() -> CommitHistograms {
        CommitHistograms {
            round_events: histogram(EVENTS_BUCKETS),
            round_seconds: histogram(SECONDS_BUCKETS),
            fsync_seconds: histogram(SECONDS_BUCKETS),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    pub status: u16,
}

#[derive(Default)]
pub struct Metrics {
    pub registry: Registry,
    pub events_appended: Counter,
    pub bytes_appended: Counter,
    pub fsyncs: Counter,
    pub commit_rounds: Counter,
    pub write_failures: Counter,
    pub commits: CommitHistograms,
    pub connections: Gauge,
    pub websockets: Gauge,
    pub subscriptions: Gauge,
    pub deliveries: Counter,
    pub direct_writes: Counter,
    pub lagging: Gauge,
    pub outbound_bytes: Gauge,
    pub answer_bytes: Gauge,
    pub lag_closes: Counter,
    pub write_timeouts: Counter,
    pub catchup_reads: Counter,
    pub given_back: Counter,
    pub sealed_reads: Counter,
    pub answer_cache_hits: Counter,
    pub answer_cache_misses: Counter,
    pub http_requests: Family<StatusLabel, Counter>,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut m = Metrics::default();
        let r = &mut m.registry;
        r.register(
            "ivy_events_appended",
            "Events appended to the log",
            m.events_appended.clone(),
        );
        r.register(
            "ivy_bytes_appended",
            "Record bytes appended to the log",
            m.bytes_appended.clone(),
        );
        r.register(
            "ivy_fsyncs",
            "fdatasync calls made by the writer",
            m.fsyncs.clone(),
        );
        r.register(
            "ivy_commit_rounds",
            "Group-commit rounds (events per round = appended / rounds)",
            m.commit_rounds.clone(),
        );
        r.register(
            "ivy_write_failures",
            "Commit rounds whose write failed (disk full, read-only, I/O error)",
            m.write_failures.clone(),
        );
        r.register(
            "ivy_commit_round_events",
            "Events per group-commit round",
            m.commits.round_events.clone(),
        );
        r.register_with_unit(
            "ivy_commit_round",
            "Time of a group-commit round: its writes, and under `always` its syncs",
            Unit::Seconds,
            m.commits.round_seconds.clone(),
        );
        r.register_with_unit(
            "ivy_fsync",
            "Time of one fdatasync of a segment file",
            Unit::Seconds,
            m.commits.fsync_seconds.clone(),
        );
        r.register(
            "ivy_connections",
            "Open TCP connections",
            m.connections.clone(),
        );
        r.register(
            "ivy_websockets",
            "Open WebSocket sessions",
            m.websockets.clone(),
        );
        r.register(
            "ivy_subscriptions",
            "Active subscriptions",
            m.subscriptions.clone(),
        );
        r.register(
            "ivy_deliveries",
            "Events queued to subscribers",
            m.deliveries.clone(),
        );
        r.register(
            "ivy_lagging_subscribers",
            "Sessions reading from the log to catch up",
            m.lagging.clone(),
        );
        r.register(
            "ivy_outbound_bytes",
            "Event bytes held for WebSocket subscribers (queued, being written, or read to catch up)",
            m.outbound_bytes.clone(),
        );
        r.register(
            "ivy_answer_bytes",
            "Bytes of HTTP answers built and not yet written",
            m.answer_bytes.clone(),
        );
        r.register(
            "ivy_sealed_reads",
            "HTTP reads that reached sealed segments, made on a blocking thread",
            m.sealed_reads.clone(),
        );
        r.register(
            "ivy_answer_cache_hits",
            "HTTP reads answered from the answer cache",
            m.answer_cache_hits.clone(),
        );
        r.register(
            "ivy_answer_cache_misses",
            "HTTP reads whose whole answer was built (and offered to the answer cache)",
            m.answer_cache_misses.clone(),
        );
        r.register(
            "ivy_catchup_reads",
            "Log reads by lagging or resuming sessions",
            m.catchup_reads.clone(),
        );
        r.register(
            "ivy_given_back_events",
            "Events a writer gave back to the log, to read again, because its peer took nothing for a second",
            m.given_back.clone(),
        );
        r.register(
            "ivy_direct_writes",
            "Writes of queued events that fan-out made itself, without waking the connection's writer",
            m.direct_writes.clone(),
        );
        r.register(
            "ivy_lag_closes",
            "Sessions closed with 1013 for lagging",
            m.lag_closes.clone(),
        );
        r.register(
            "ivy_write_timeouts",
            "Connections closed because the peer took no bytes within the write timeout",
            m.write_timeouts.clone(),
        );
        r.register(
            "ivy_http_requests",
            "HTTP requests by status",
            m.http_requests.clone(),
        );
        m
    }

    /// Brings the storage counters up to date (they live in the engine, which knows nothing of
    /// Prometheus).
    pub fn observe_store(&self, totals: &crate::storage::Totals) {
        for (counter, now) in [
            (&self.events_appended, totals.events_appended),
            (&self.bytes_appended, totals.bytes_appended),
            (&self.fsyncs, totals.fsyncs),
            (&self.commit_rounds, totals.commit_rounds),
            (&self.write_failures, totals.write_failures),
        ] {
            counter.inc_by(now.saturating_sub(counter.get()));
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _infallible = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl crate::storage::CommitObserver for Metrics {
    fn round(&self, events: usize, took: Duration) {
        self.commits.round_events.observe(events as f64);
        self.commits.round_seconds.observe(took.as_secs_f64());
    }

    fn fsync(&self, took: Duration) {
        self.commits.fsync_seconds.observe(took.as_secs_f64());
    }
}

/// The resident memory of process `pid` (`VmRSS` in `/proc/PID/status`), for the load tool and
/// the memory tests; `None` where there is no such file.
pub fn resident_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
}
