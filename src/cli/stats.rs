//! `ivy stats DIR [--json]`.

use anyhow::Context;
use ivy::storage::{Store, StoreOptions};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    dir: super::DirArg,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let store = Store::open_read_only(&args.dir.dir, StoreOptions::default())
        .with_context(|| format!("cannot read {}", args.dir.dir.display()))?;
    let stats = store.stats()?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&stats)?);
        return Ok(());
    }
    println!(
        "{:<24} {:>8} {:>10} {:>12} {:>14}  {:<20}  {:<20}",
        "stream", "segments", "channels", "events", "bytes", "first id", "last id"
    );
    let (mut segments, mut channels, mut events, mut bytes) = (0, 0, 0, 0);
    for s in &stats {
        println!(
            "{:<24} {:>8} {:>10} {:>12} {:>14}  {:<20}  {:<20}",
            s.root,
            s.segments,
            s.channels,
            s.events,
            s.bytes,
            s.first_id.as_deref().unwrap_or("-"),
            s.last_id.as_deref().unwrap_or("-")
        );
        segments += s.segments;
        channels += s.channels;
        events += s.events;
        bytes += s.bytes;
    }
    println!(
        "{:<24} {:>8} {:>10} {:>12} {:>14}",
        format!("total ({} streams)", stats.len()),
        segments,
        channels,
        events,
        bytes
    );
    Ok(())
}
