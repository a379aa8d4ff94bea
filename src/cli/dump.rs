//! `ivy dump DIR [SELECTOR] [--since TS] [--until TS]`.

use anyhow::Context;
use ivy::channel::Selector;
use ivy::event_id::EventId;
use ivy::storage::{Query, Store, StoreOptions};
use ivy::wire::line;
use std::io::Write;
use std::ops::Bound;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    dir: super::DirArg,
    /// A channel, a `*` glob (`/rooms/*/chat`) or a subtree (`/rooms/**`); default every event.
    #[arg(value_name = "SELECTOR", default_value = "/**")]
    selector: String,
    /// Only events with an id at or after this timestamp (`SECONDS.NANOS`, `@` optional).
    #[arg(long, value_parser = EventId::parse)]
    since: Option<EventId>,
    /// Only events with an id at or before this timestamp.
    #[arg(long, value_parser = EventId::parse)]
    until: Option<EventId>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let selector =
        Selector::parse(&args.selector).with_context(|| format!("selector {:?}", args.selector))?;
    let store = Store::open_read_only(&args.dir.dir, StoreOptions::default())
        .with_context(|| format!("cannot read {}", args.dir.dir.display()))?;
    let query = Query {
        start: args.since.map_or(Bound::Unbounded, Bound::Included),
        end: args.until.map_or(Bound::Unbounded, Bound::Included),
        ..Query::all()
    };
    let reader = store.reader(&selector);
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::with_capacity(1 << 16, stdout.lock());
    let mut buf = Vec::with_capacity(4096);
    for event in reader.events(&query) {
        let event = event?;
        buf.clear();
        line::format_event(&mut buf, event.id, event.path, event.data);
        out.write_all(&buf)?;
    }
    out.flush()?;
    Ok(())
}
