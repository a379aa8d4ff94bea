//! Command-line types (clap derive) and dispatch. Every flag has an `IVY_*` environment variable.
//! Only this layer and `main.rs` use `anyhow`.

mod dump;
mod import;
mod serve;
mod stats;
mod verify;

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(
    name = "ivy",
    version,
    about = "Hierarchical pub/sub with a persistent, CRC-checked event log"
)]
pub struct Cli {
    /// Log filter (tracing-subscriber syntax), e.g. `info` or `ivy=debug`.
    #[arg(long, global = true, env = "IVY_LOG")]
    pub log: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the server (WebSocket `/ws`, HTTP `/events/PATH`) on a data directory.
    Serve(Box<serve::Args>),
    /// Check every segment and index of a data directory; exit 0 clean, 1 problems, 2 could not run.
    Verify(verify::Args),
    /// Print events as ivy lines (`@TS:/path:DATA`), in id order.
    Dump(dump::Args),
    /// Append ivy lines read from standard input.
    Import(import::Args),
    /// Streams, segments, channels, events, bytes, first and last id per stream.
    Stats(stats::Args),
}

pub fn init_tracing(cli: &Cli) {
    let default = if matches!(cli.command, Command::Serve(_)) {
        "info"
    } else {
        "warn"
    };
    let filter = cli.log.clone().unwrap_or_else(|| default.into());
    let filter = tracing_subscriber::EnvFilter::try_new(&filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve(args) => serve::run(*args).map(|()| ExitCode::SUCCESS),
        Command::Verify(args) => verify::run(args),
        Command::Dump(args) => dump::run(args).map(|()| ExitCode::SUCCESS),
        Command::Import(args) => import::run(args).map(|()| ExitCode::SUCCESS),
        Command::Stats(args) => stats::run(args).map(|()| ExitCode::SUCCESS),
    }
}

/// The error and its causes as one line, `a: b: c`, each cause once. Storage errors show their
/// I/O cause in their own text (so that logs and HTTP answers carry it) and also return it as
/// their `source`; a cause that the text before it already ends with is left out.
pub fn error_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.ends_with(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

/// Whether the error is a write to a closed pipe (the reader went away).
pub fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// The data directory argument shared by the offline tools.
#[derive(clap::Args, Debug)]
pub struct DirArg {
    /// The data directory.
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
}
