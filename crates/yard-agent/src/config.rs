//! The agent's settings, from flags or the environment:
//!
//! | flag | variable | default |
//! |---|---|---|
//! | `--gateway-url` | `SWITCHYARD_GATEWAY_URL` | `http://127.0.0.1:50051` (comma-separated list: tried in turn on reconnect) |
//! | `--registration-token` | `SWITCHYARD_REGISTRATION_TOKEN` | none; needed only when there is no credential file yet |
//! | `--credential-file` | `SWITCHYARD_CREDENTIAL_FILE` | `$HOME/.config/switchyard/agent-credential.json` |
//! | `--name` | `SWITCHYARD_AGENT_NAME` | the host name |
//! | `--labels` | `SWITCHYARD_AGENT_LABELS` | none (comma-separated, e.g. `gpu,os=linux`) |
//! | `--capacity` | `SWITCHYARD_AGENT_CAPACITY` | `1` |
//! | `--work-dir` | `SWITCHYARD_WORK_DIR` | `./yard-work` (one directory per job inside) |
//! | `--executor` | `SWITCHYARD_EXECUTOR` | none; command template for prompts, e.g. `claude -p "$(cat {prompt_file})"` |
//! | `--shell` | `SWITCHYARD_SHELL` | `/bin/sh` |
//! | `--log-format` | `LOG_FORMAT` | `compact` (or `json`) |
//! | `--otlp-endpoint` | `OTEL_EXPORTER_OTLP_ENDPOINT` | none: spans are not exported |
//!
//! The executor template may use `{prompt_file}`, `{prompt}`, `{job_id}`
//! and `{work_dir}`; each is replaced by its shell-quoted value.

use std::path::PathBuf;

use clap::Parser;

#[derive(Parser, Clone, Debug)]
#[command(
    name = "yard-agent",
    version,
    about = "The reference Switchyard agent: runs jobs assigned by a Switchyard gateway."
)]
pub struct AgentConfig {
    /// gRPC URL(s) of the gateway; several (comma-separated) are tried in turn.
    #[arg(
        long,
        env = "SWITCHYARD_GATEWAY_URL",
        default_value = "http://127.0.0.1:50051",
        value_delimiter = ','
    )]
    pub gateway_url: Vec<String>,
    /// Registration token, exchanged once for the credential.
    #[arg(long, env = "SWITCHYARD_REGISTRATION_TOKEN", hide_env_values = true)]
    pub registration_token: Option<String>,
    /// Where the agent's credential is saved (mode 0600).
    #[arg(long, env = "SWITCHYARD_CREDENTIAL_FILE")]
    pub credential_file: Option<PathBuf>,
    /// The agent's name (defaults to the host name).
    #[arg(long, env = "SWITCHYARD_AGENT_NAME")]
    pub name: Option<String>,
    /// Labels the agent offers.
    #[arg(long, env = "SWITCHYARD_AGENT_LABELS", value_delimiter = ',')]
    pub labels: Vec<String>,
    /// How many jobs run at once.
    #[arg(long, env = "SWITCHYARD_AGENT_CAPACITY", default_value_t = 1)]
    pub capacity: u32,
    /// Jobs run in a directory of their own under this one.
    #[arg(long, env = "SWITCHYARD_WORK_DIR", default_value = "yard-work")]
    pub work_dir: PathBuf,
    /// Command template that runs a job's prompt.
    #[arg(long, env = "SWITCHYARD_EXECUTOR")]
    pub executor: Option<String>,
    /// Shell that runs commands (`<shell> -c <command>`).
    #[arg(long, env = "SWITCHYARD_SHELL", default_value = "/bin/sh")]
    pub shell: String,
    /// Log line format: `compact` or `json`.
    #[arg(long, env = "LOG_FORMAT", default_value = "compact")]
    pub log_format: String,
    /// OTLP/gRPC endpoint to export job spans to (each job's span joins the
    /// trace the gateway sent with its assignment).
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
}

impl AgentConfig {
    pub fn credential_path(&self) -> PathBuf {
        self.credential_file.clone().unwrap_or_else(|| {
            std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("."))
                .join(".config/switchyard/agent-credential.json")
        })
    }

    pub fn agent_name(&self) -> String {
        self.name
            .clone()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "yard-agent".to_owned())
    }

    pub fn labels(&self) -> Vec<String> {
        self.labels
            .iter()
            .map(|l| l.trim().to_owned())
            .filter(|l| !l.is_empty())
            .collect()
    }
}
