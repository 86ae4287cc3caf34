//! `yard`, the Switchyard operator and developer CLI.
//!
//! Each subcommand lives in `commands/<name>.rs` with its own `Args` and
//! `run`; this file only parses the command line and turns the outcome
//! into an exit code.

use std::process::ExitCode;

use clap::Parser;

mod commands;

#[derive(Parser)]
#[command(
    name = "yard",
    version,
    about = "Operate and develop against Switchyard"
)]
struct Cli {
    #[command(subcommand)]
    command: commands::Command,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match commands::run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("yard: {}", failure.message);
            ExitCode::from(failure.code)
        }
    }
}
