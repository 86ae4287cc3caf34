//! The subcommands. Add one by writing `commands/<name>.rs` with `Args`
//! and `run`, and listing it in [`Command`] and [`run`].

use std::io::Write;

pub mod client;
pub mod dev_token;
pub mod jobs;

#[derive(clap::Subcommand)]
pub enum Command {
    /// Print a development access token (HS256, signed with AUTH_HS256_SECRET).
    DevToken(dev_token::Args),
    /// Submit, list, show, cancel, retry, approve and reject jobs.
    Jobs {
        #[command(flatten)]
        api: client::ApiOptions,
        #[command(subcommand)]
        command: jobs::JobsCommand,
    },
    /// Print a job's log; -f follows it until the job finishes.
    Logs {
        #[command(flatten)]
        api: client::ApiOptions,
        #[command(flatten)]
        args: jobs::LogsArgs,
    },
    /// Queues: depth, order, ETA.
    Queues {
        #[command(flatten)]
        api: client::ApiOptions,
        #[command(subcommand)]
        command: jobs::QueuesCommand,
    },
    /// Agents.
    Agents {
        #[command(flatten)]
        api: client::ApiOptions,
        #[command(subcommand)]
        command: jobs::AgentsCommand,
    },
    /// Registration tokens for agents.
    Tokens {
        #[command(flatten)]
        api: client::ApiOptions,
        #[command(subcommand)]
        command: jobs::TokensCommand,
    },
}

pub fn run(command: Command) -> Result<(), Failure> {
    let env = |name: &str| std::env::var(name).ok();
    let mut stdout = std::io::stdout().lock();
    match command {
        Command::DevToken(args) => dev_token::run(&args, &env, &mut stdout),
        Command::Jobs { api, command } => jobs::run_jobs(command, &api, &mut stdout),
        Command::Logs { api, args } => jobs::run_logs(args, &api, &mut stdout),
        Command::Queues { api, command } => jobs::run_queues(command, &api, &mut stdout),
        Command::Agents { api, command } => jobs::run_agents(command, &api, &mut stdout),
        Command::Tokens { api, command } => jobs::run_tokens(command, &api, &mut stdout),
    }
}

/// Why a command failed, and the exit code that says so.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub message: String,
}

impl Failure {
    /// Exit code 2: the command was used wrongly (missing configuration,
    /// bad arguments), as clap does for usage errors.
    pub fn usage(message: impl Into<String>) -> Self {
        Self {
            code: 2,
            message: message.into(),
        }
    }

    /// Exit code 1: the command was right but could not be carried out.
    pub fn runtime(message: impl Into<String>) -> Self {
        Self {
            code: 1,
            message: message.into(),
        }
    }
}

/// Writes one line of output, failing cleanly (e.g. on a closed pipe).
pub fn print_line(out: &mut dyn Write, line: &str) -> Result<(), Failure> {
    writeln!(out, "{line}")
        .and_then(|()| out.flush())
        .map_err(|e| Failure::runtime(format!("writing output: {e}")))
}
