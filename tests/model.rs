//! Model test: random appends, reads, reopens and crash-truncations agree with a simple
//! in-memory model (`Vec` of events per stream).

mod common;

use common::{path, read, segments};
use ivy::event_id::EventId;
use ivy::storage::{Direction, Durability, Query, Store, StoreOptions};
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::ops::Bound;

const CHANNELS: [&str; 6] = ["/a", "/a/x", "/a/y/z", "/b", "/b/q", "/"];
const SELECTORS: [&str; 7] = ["/**", "/a/**", "/a/x", "/a/*", "/b", "/", "/*/q"];

#[derive(Debug, Clone)]
enum Op {
    Append {
        channel: usize,
        len: usize,
    },
    Read {
        selector: usize,
        since: u8,
        backward: bool,
        limit: Option<usize>,
    },
    Reopen,
    /// Cut the last segment of a stream at a fraction (per mille) of its length.
    Crash {
        stream: usize,
        keep_per_mille: u16,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0..CHANNELS.len(), 0..200usize).prop_map(|(channel, len)| Op::Append { channel, len }),
        3 => (0..SELECTORS.len(), any::<u8>(), any::<bool>(), proptest::option::of(1..20usize))
            .prop_map(|(selector, since, backward, limit)| Op::Read { selector, since, backward, limit }),
        1 => Just(Op::Reopen),
        1 => (0..3usize, 0..1000u16).prop_map(|(stream, keep_per_mille)| Op::Crash { stream, keep_per_mille }),
    ]
}

fn options() -> StoreOptions {
    StoreOptions {
        durability: Durability::Never,
        segment_bytes_max: 700,
        index_interval_bytes: 128,
        ..StoreOptions::default()
    }
}

/// The stream a channel belongs to at depth 1 (its directory name).
fn stream_of(channel: &str) -> String {
    ivy::channel::ChannelPath::parse(channel)
        .unwrap()
        .truncated(1)
        .as_str()
        .replace('/', "~")
}

type Model = Vec<(EventId, String, Vec<u8>)>;

fn check_read(
    store: &Store,
    model: &Model,
    selector: &str,
    since: u8,
    backward: bool,
    limit: Option<usize>,
) {
    let start = model
        .get(usize::from(since) % (model.len() + 1))
        .map_or(Bound::Unbounded, |e| Bound::Included(e.0));
    let direction = if backward {
        Direction::Backward
    } else {
        Direction::Forward
    };
    let query = Query {
        start,
        end: Bound::Unbounded,
        direction,
        limit,
    };
    let sel = common::sel(selector);
    let mut expect: Model = model
        .iter()
        .filter(|e| {
            sel.matches(&e.1)
                && match start {
                    Bound::Included(s) => e.0 >= s,
                    _ => true,
                }
        })
        .cloned()
        .collect();
    if backward {
        expect.reverse();
    }
    expect.truncate(limit.unwrap_or(usize::MAX));
    assert_eq!(
        read(store, selector, &query),
        expect,
        "selector {selector} {query:?}"
    );
}

fn run(ops: Vec<Op>) {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Some(Store::open(dir.path(), options()).unwrap());
    let mut model: Model = Vec::new();
    let mut n = 0u32;
    for op in ops {
        match op {
            Op::Append { channel, len } => {
                let s = store.as_ref().unwrap();
                n += 1;
                let data: Vec<u8> = (0..len).map(|i| (i as u32 ^ n) as u8).collect();
                let id = s.append(&path(CHANNELS[channel]), &data).unwrap();
                model.push((id, CHANNELS[channel].to_owned(), data));
            }
            Op::Read {
                selector,
                since,
                backward,
                limit,
            } => {
                let s = store.as_ref().unwrap();
                s.flush().unwrap();
                check_read(s, &model, SELECTORS[selector], since, backward, limit);
            }
            Op::Reopen => {
                store.take().unwrap().close().unwrap();
                store = Some(Store::open(dir.path(), options()).unwrap());
                check_read(store.as_ref().unwrap(), &model, "/**", 0, false, None);
            }
            Op::Crash {
                stream,
                keep_per_mille,
            } => {
                store.take().unwrap().close().unwrap();
                let names = ["~a", "~b", "~"];
                let stream_dir = dir.path().join("streams").join(names[stream]);
                if let Some(last) = stream_dir
                    .exists()
                    .then(|| segments(&stream_dir).pop())
                    .flatten()
                {
                    let len = std::fs::metadata(&last).unwrap().len();
                    let keep = len * u64::from(keep_per_mille) / 1000;
                    std::fs::OpenOptions::new()
                        .write(true)
                        .open(&last)
                        .unwrap()
                        .set_len(keep)
                        .unwrap();
                }
                let s = Store::open(dir.path(), options()).unwrap();
                // What survives of the cut stream is a prefix of what it held; the rest is intact.
                let survivors = read(&s, "/**", &Query::all());
                let mut by_stream: BTreeMap<String, Model> = BTreeMap::new();
                for e in &model {
                    by_stream
                        .entry(stream_of(&e.1))
                        .or_default()
                        .push(e.clone());
                }
                for (name, events) in &by_stream {
                    let got: Model = survivors
                        .iter()
                        .filter(|e| stream_of(&e.1) == *name)
                        .cloned()
                        .collect();
                    if name == names[stream] {
                        assert!(events.starts_with(&got), "stream {name}: not a prefix");
                    } else {
                        assert_eq!(&got, events, "stream {name} changed");
                    }
                }
                model = survivors;
                store = Some(s);
            }
        }
    }
    let s = store.take().unwrap();
    s.close().unwrap();
    drop(s);
    let report =
        ivy::storage::verify::verify(dir.path(), ivy::storage::verify::Mode::Check, &|_| {})
            .unwrap();
    assert!(report.findings.is_empty(), "{:#?}", report.findings);
}

proptest! {
    // 256 cases by default; PROPTEST_CASES=5000 for a long run.
    #[test]
    fn engine_agrees_with_model(ops in proptest::collection::vec(op(), 1..80)) {
        run(ops);
    }
}
