//! yard-agent: the reference Switchyard agent, a binary a team runs on its
//! machines. It registers once with a registration token (saving its
//! credential with mode 0600), then holds a session with a gateway and runs
//! what it is assigned: a job's `command` through the shell, or its `prompt`
//! through a configurable executor command (for example an AI coding agent
//! CLI), each in a working directory of its own. It streams stdout/stderr
//! as logs, heartbeats, obeys cancels (SIGTERM, then SIGKILL after the grace
//! period), reports exit codes, respects its capacity, reconnects with
//! jittered backoff and resumes its jobs, and drains on SIGTERM.
//!
//! * [`config`]: flags and environment.
//! * [`credential`]: the saved credential.
//! * [`agent`]: sessions, resume, logs and results.
//! * [`runner`]: the job processes.

pub mod agent;
pub mod config;
pub mod credential;
pub mod runner;

use tokio_util::sync::CancellationToken;

pub use config::AgentConfig;

/// Registers if needed, then runs until drained (after `drain` is
/// cancelled) or refused.
pub async fn run(config: AgentConfig, drain: CancellationToken) -> anyhow::Result<()> {
    let credential = agent::credential(&config).await?;
    tracing::info!(agent.id = %credential.agent_id, org.id = %credential.org_id, "starting");
    let (agent, events) = agent::Agent::new(config, credential);
    agent.run(events, drain).await
}
