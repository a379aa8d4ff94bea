//! `ivy import DIR`: appends ivy lines from standard input. `@TS:/path:DATA` keeps its id (which
//! must be above every id stored); `/path:DATA` gets a fresh one. The first bad line stops the
//! import with its line number; the lines before it are kept, nothing after it is written.

use anyhow::{bail, Context};
use ivy::channel::ChannelPath;
use ivy::storage::{Durability, Store, StoreOptions};
use ivy::wire::line;
use std::io::BufRead;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    dir: super::DirArg,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    // Durability is settled once at the end (close syncs everything), which is what an import
    // of a whole file wants: one sync, not one per line.
    let opts = StoreOptions {
        durability: Durability::Never,
        ..StoreOptions::default()
    };
    let store = Store::open(&args.dir.dir, opts)
        .with_context(|| format!("cannot open {}", args.dir.dir.display()))?;
    let outcome = import(&store);
    let closed = store.close().context("cannot sync the imported events");
    outcome.and(closed)
}

fn import(store: &Store) -> anyhow::Result<()> {
    let stdin = std::io::stdin();
    let mut input = stdin.lock();
    let mut raw = Vec::new();
    let mut number = 0u64;
    let mut count = 0u64;
    loop {
        raw.clear();
        if input
            .read_until(b'\n', &mut raw)
            .context("cannot read standard input")?
            == 0
        {
            break;
        }
        number += 1;
        let mut text = raw.as_slice();
        text = text.strip_suffix(b"\n").unwrap_or(text);
        text = text.strip_suffix(b"\r").unwrap_or(text);
        if text.is_empty() {
            continue;
        }
        let Ok(text) = std::str::from_utf8(text) else {
            bail!("line {number}: not UTF-8 (data bytes outside UTF-8 are written %XX)");
        };
        let parsed = line::parse_line(text).with_context(|| format!("line {number}"))?;
        let path = ChannelPath::parse(parsed.path).with_context(|| format!("line {number}"))?;
        match parsed.id {
            Some(id) => store.append_with_ids(&[(id, &path, &parsed.data)]),
            None => store.append_nowait(&path, &parsed.data).map(Some),
        }
        .with_context(|| format!("line {number}"))?;
        count += 1;
    }
    tracing::info!(events = count, "import done");
    Ok(())
}
