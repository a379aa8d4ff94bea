//! How a server shares out the process's file descriptors. Each connection holds one, each
//! stream of the store holds one (its live segment), and the store opens more as segments roll.
//! When they run out, the write that needed a new file fails for every client in its round; so
//! connections and streams each get a bounded share, and the sockets in a lingering close
//! (`linger.rs`) a small one, and no client can take what the others need.
//!
//! `ivy serve` raises the soft limit to the hard one first (`raise_limit`) and applies these
//! shares to its flags' defaults.

/// Raises the soft limit on open descriptors to the hard limit, as servers do (Go's runtime does
/// it for every program): the usual soft default, 1024, is far below what a server with thousands
/// of connections and streams needs, and the hard limit is the administrator's real ceiling.
/// Returns the limit now in force.
pub fn raise_limit() -> std::io::Result<u64> {
    rlimit::increase_nofile_limit(u64::MAX)
}

/// The soft limit in force, if it can be read.
pub fn limit() -> Option<u64> {
    rlimit::getrlimit(rlimit::Resource::NOFILE)
        .ok()
        .map(|(soft, _)| soft)
}

/// The descriptors kept from connections for the store: an eighth of the limit, at least 32.
fn store_reserve(limit: u64) -> u64 {
    (limit / 8).max(32)
}

/// Descriptors of the reserve that streams may not take: the lock file, a spare, directories
/// and indexes being synced, sealed segments being opened, lingering sockets.
const STORE_HEADROOM: u64 = 16;

/// Streams at most, by default: 60,000, below Linux's default of 65,530 mappings per process
/// (`vm.max_map_count`): each stream's live segment is one, and sealed segments being read use
/// more.
const STREAMS_BY_MAPPINGS: u64 = 60_000;

/// The default stream limit under a descriptor limit: the store's reserve less its headroom.
pub fn streams_within(limit: Option<u64>) -> usize {
    let streams = limit.map_or(STREAMS_BY_MAPPINGS, |limit| {
        store_reserve(limit)
            .saturating_sub(STORE_HEADROOM)
            .min(STREAMS_BY_MAPPINGS)
    });
    usize::try_from(streams).unwrap_or(usize::MAX).max(1)
}

/// The connections allowed under a descriptor limit: what `asked` says, within what the
/// store's reserve leaves, and at least one.
pub fn connections_within(limit: Option<u64>, asked: usize) -> usize {
    let Some(limit) = limit else {
        return asked;
    };
    let allowed = usize::try_from(limit.saturating_sub(store_reserve(limit))).unwrap_or(usize::MAX);
    asked.min(allowed).max(1)
}

/// Sockets lingering at once, at most: a 32nd of the limit (a quarter of the store's reserve),
/// 1 to 4096.
pub fn lingering_within(limit: Option<u64>) -> usize {
    usize::try_from(limit.unwrap_or(1024) / 32)
        .unwrap_or(usize::MAX)
        .clamp(1, 4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_fit_in_the_store_reserve() {
        assert_eq!(streams_within(Some(64)), 16);
        assert_eq!(streams_within(Some(1024)), 112);
        assert_eq!(streams_within(Some(20_000)), 2_484);
        // Mappings, not descriptors, bound it on a generous limit.
        assert_eq!(streams_within(Some(1 << 20)), 60_000);
        assert_eq!(streams_within(Some(8)), 16);
        assert_eq!(streams_within(None), 60_000);
    }

    #[test]
    fn connections_leave_the_store_a_reserve() {
        // An eighth of the limit, at least 32, is never given to connections.
        assert_eq!(connections_within(Some(20_000), 100_000), 17_500);
        assert_eq!(connections_within(Some(1024), 100_000), 896);
        assert_eq!(connections_within(Some(64), 100_000), 32);
        // The flag still caps when the limit allows more.
        assert_eq!(connections_within(Some(1 << 20), 100_000), 100_000);
        assert_eq!(connections_within(Some(20_000), 50), 50);
        // A limit below the reserve still lets one connection in (the store will refuse what
        // it cannot open, with a reason), and an unknown limit changes nothing.
        assert_eq!(connections_within(Some(16), 100_000), 1);
        assert_eq!(connections_within(None, 7), 7);
    }

    #[test]
    fn lingering_takes_a_quarter_of_the_reserve() {
        assert_eq!(lingering_within(Some(64)), 2);
        assert_eq!(lingering_within(Some(20_000)), 625);
        assert_eq!(lingering_within(Some(1 << 20)), 4096);
        assert_eq!(lingering_within(Some(16)), 1);
        assert_eq!(lingering_within(None), 32);
    }
}
