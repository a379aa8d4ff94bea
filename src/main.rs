//! The `ivy` binary: parses the command line, starts logging, runs a subcommand and turns its
//! outcome into an exit code (0 success, 1 `verify` found problems, 2 could not run).

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = ivy_cli::Cli::parse();
    ivy_cli::init_tracing(&cli);
    match ivy_cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            if ivy_cli::is_broken_pipe(&e) {
                // `ivy dump | head` is not a failure.
                return ExitCode::SUCCESS;
            }
            eprintln!("ivy: {}", ivy_cli::error_line(&e));
            ExitCode::from(2)
        }
    }
}

#[path = "cli/mod.rs"]
mod ivy_cli;
