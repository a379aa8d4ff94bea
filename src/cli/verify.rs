//! `ivy verify DIR [--repair] [--json]`.

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use ivy::storage::{self, verify};
use std::io::IsTerminal;
use std::process::ExitCode;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    dir: super::DirArg,
    /// Cut torn tails and rebuild damaged or missing index files (never drops data of a sealed segment).
    #[arg(long, env = "IVY_REPAIR")]
    repair: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let dir = &args.dir.dir;
    let _lock = storage::lock_directory(dir, args.repair).with_context(|| {
        format!(
            "cannot {} {}",
            if args.repair { "repair" } else { "verify" },
            dir.display()
        )
    })?;
    let total: u64 = segment_bytes(dir);
    let bar = if std::io::stderr().is_terminal() && !args.json {
        let bar = ProgressBar::new(total);
        if let Ok(style) =
            ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {bytes_per_sec}")
        {
            bar.set_style(style);
        }
        bar
    } else {
        ProgressBar::hidden()
    };
    let mode = if args.repair {
        verify::Mode::Repair
    } else {
        verify::Mode::Check
    };
    let started = std::time::Instant::now();
    let report = verify::verify(dir, mode, &|done| bar.set_position(done))?;
    bar.finish_and_clear();
    let elapsed = started.elapsed();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for f in &report.findings {
            match &f.repaired {
                Some(note) => println!(
                    "{}: byte {}: {} (repaired: {note})",
                    f.file.display(),
                    f.offset,
                    f.problem
                ),
                None => println!("{}: byte {}: {}", f.file.display(), f.offset, f.problem),
            }
        }
        let open = report
            .findings
            .iter()
            .filter(|f| f.repaired.is_none())
            .count();
        println!(
            "{} streams, {} segments, {} events, {} bytes checked in {:.2?} ({:.0} MB/s): {}",
            report.streams,
            report.segments,
            report.events,
            report.bytes,
            elapsed,
            report.bytes as f64 / elapsed.as_secs_f64().max(1e-9) / 1e6,
            if open == 0 {
                "clean".to_string()
            } else {
                format!("{open} problem(s)")
            }
        );
    }
    Ok(if report.is_clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn segment_bytes(dir: &std::path::Path) -> u64 {
    let Ok(streams) = std::fs::read_dir(dir.join("streams")) else {
        return 0;
    };
    streams
        .flatten()
        .filter_map(|s| std::fs::read_dir(s.path()).ok())
        .flat_map(|files| files.flatten())
        .filter(|f| f.path().extension().is_some_and(|e| e == "seg"))
        .filter_map(|f| f.metadata().ok())
        .map(|m| m.len())
        .sum()
}
