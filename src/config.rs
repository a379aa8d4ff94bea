//! Typed, checked server settings. The command line (`cli/serve.rs`) builds one of these once;
//! the server never sees a clap type. Every limit has its unit in its name and the default the
//! protocol page gives ("Limits and refusals").

use std::net::SocketAddr;
use std::time::Duration;

/// Which browser origins may open WebSockets, send CORS requests and POST events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OriginPolicy {
    /// Same origin as the request's `Host`, plus these (`scheme://host[:port]`, lower case).
    SameOriginAnd(Vec<String>),
    /// Any origin (`--allow-origin '*'`).
    Any,
}

#[derive(Debug, Clone)]
pub struct ServerOptions {
    pub listen: SocketAddr,
    /// Events with at least this much data are announced (`@TS:/path.`), not sent inline.
    pub large_event_bytes: usize,
    /// A WebSocket message, after reassembly.
    pub frame_bytes_max: usize,
    pub subscriptions_max: usize,
    /// Subscriptions of all connections together.
    pub subscriptions_total_max: usize,
    /// A subscriber this many events behind is closed with 1013.
    pub lag_events_max: u64,
    /// Outbound bytes queued for one connection before it reads from the log instead (frames,
    /// plus a queue entry's 40 bytes each).
    pub queue_bytes_max: usize,
    /// Event bytes held for all WebSocket subscribers together: queued, being written, or read
    /// from the log to catch up (`server/budget.rs`).
    pub queue_bytes_total_max: usize,
    /// The kernel's send buffer of an upgraded WebSocket connection (`SO_SNDBUF`; 0, the
    /// default, leaves it to the kernel's autotuning). A bound caps what a subscriber that stops
    /// reading holds in the kernel (left to autotuning, Linux lets one socket hold up to
    /// `tcp_wmem`'s 4 MiB), so its backlog goes to the queue and then to the log sooner. Not the
    /// default: the kernel's buffer also absorbs a fast subscriber's bursts, and with 256 KiB,
    /// `ivy-bench fanout`'s fast subscribers fell back to the log in 2 runs of 3 and delivered
    /// 3.2-4.3 M events/s instead of 9.6-10.6 M.
    pub ws_send_buffer_bytes: usize,
    pub header_bytes_max: usize,
    /// Time allowed for a request's headers; also how long a keep-alive connection may wait idle
    /// for its next request (hyper's header read timeout covers both).
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub body_bytes_max: usize,
    /// POST bodies being received, all together: past it a body waits (unread) for its share.
    pub body_bytes_in_flight_max: usize,
    /// HTTP answers built and not yet written, all together (`server/budget.rs`): past it a read
    /// waits for its share before it reads anything.
    pub answer_bytes_total_max: usize,
    /// How long a read waits for its share of `answer_bytes_total_max` before it is answered 503.
    pub answer_wait: Duration,
    /// Answers kept to be sent again while they hold (`server/http/cache.rs`), in bytes; 0
    /// keeps none. At most a quarter of
    /// `answer_bytes_total_max`, whose budget the kept answers stay charged to.
    pub answer_cache_bytes: usize,
    pub connections_max: usize,
    pub origins: OriginPolicy,
    pub ping_interval: Duration,
    /// A WebSocket peer that sends no frame for this long is dropped, unless it is reading a
    /// backlog (`ws.rs`, `Liveness`).
    pub idle_timeout: Duration,
    /// A write that the peer takes not one byte of, while it acknowledges nothing of what the
    /// socket holds, for this long ends the connection (`server/stall.rs`).
    pub write_timeout: Duration,
}

impl Default for ServerOptions {
    fn default() -> ServerOptions {
        ServerOptions {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            large_event_bytes: 64 * 1024,
            frame_bytes_max: 64 * 1024,
            subscriptions_max: 10_000,
            subscriptions_total_max: 1_000_000,
            lag_events_max: 100_000,
            queue_bytes_max: 1024 * 1024,
            queue_bytes_total_max: 256 * 1024 * 1024,
            ws_send_buffer_bytes: 0,
            header_bytes_max: 16 * 1024,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            body_bytes_max: 16 * 1024 * 1024,
            body_bytes_in_flight_max: 256 * 1024 * 1024,
            answer_bytes_total_max: 256 * 1024 * 1024,
            answer_wait: Duration::from_secs(10),
            answer_cache_bytes: 32 * 1024 * 1024,
            connections_max: 100_000,
            origins: OriginPolicy::SameOriginAnd(Vec::new()),
            ping_interval: Duration::from_secs(50),
            idle_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(60),
        }
    }
}

impl OriginPolicy {
    /// Builds the policy from `--allow-origin` values (`*` or origins).
    pub fn from_list(values: &[String]) -> OriginPolicy {
        if values.iter().any(|v| v.trim() == "*") {
            return OriginPolicy::Any;
        }
        OriginPolicy::SameOriginAnd(
            values
                .iter()
                .map(|v| v.trim().trim_end_matches('/').to_ascii_lowercase())
                .collect(),
        )
    }

    /// Whether a request with this `Origin` and `Host` is allowed. No `Origin` (not a browser)
    /// is always allowed; `Origin: null` never is, unless any origin is.
    pub fn allows(&self, origin: Option<&str>, host: Option<&str>) -> bool {
        let Some(origin) = origin else { return true };
        match self {
            OriginPolicy::Any => true,
            OriginPolicy::SameOriginAnd(list) => {
                let origin = origin.trim().to_ascii_lowercase();
                if origin == "null" {
                    return false;
                }
                let same = host
                    .is_some_and(|h| origin == format!("http://{}", h.trim().to_ascii_lowercase()));
                same || list.contains(&origin)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins() {
        let same = OriginPolicy::from_list(&[]);
        assert!(same.allows(None, Some("a:1")));
        assert!(same.allows(Some("http://a:1"), Some("a:1")));
        assert!(same.allows(Some("HTTP://A:1"), Some("a:1")));
        assert!(!same.allows(Some("http://evil:1"), Some("a:1")));
        assert!(!same.allows(Some("https://a:1"), Some("a:1")));
        assert!(!same.allows(Some("null"), Some("a:1")));
        assert!(!same.allows(Some("http://a:1"), None));
        let listed = OriginPolicy::from_list(&["http://app.example/".into()]);
        assert!(listed.allows(Some("http://app.example"), Some("a:1")));
        assert!(!listed.allows(Some("http://other.example"), Some("a:1")));
        let any = OriginPolicy::from_list(&["*".into()]);
        assert!(any.allows(Some("null"), None));
    }
}
