//! The programs in the image, what each reads, and whether an environment
//! configures it: answered by the programs' own parsers.

use std::collections::BTreeSet;

use clap::CommandFactory;
use service_kit::config::{ConfigError, MapSource, VARIABLES};
use service_kit::launch::ServiceConfig;

use crate::Env;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Program {
    JobApi,
    Scheduler,
    AgentGateway,
    RealtimeBroadcaster,
    YardAgent,
    Yard,
}

impl Program {
    /// The long-running services, each with `/healthz` and `/readyz`.
    pub const SERVICES: [Program; 4] = [
        Program::JobApi,
        Program::Scheduler,
        Program::AgentGateway,
        Program::RealtimeBroadcaster,
    ];
    pub const ALL: [Program; 6] = [
        Program::JobApi,
        Program::Scheduler,
        Program::AgentGateway,
        Program::RealtimeBroadcaster,
        Program::YardAgent,
        Program::Yard,
    ];

    /// The binary's name, which is also its Cargo package's.
    pub fn binary(self) -> &'static str {
        match self {
            Program::JobApi => "job-api",
            Program::Scheduler => "scheduler",
            Program::AgentGateway => "agent-gateway",
            Program::RealtimeBroadcaster => "realtime-broadcaster",
            Program::YardAgent => "yard-agent",
            Program::Yard => "yard",
        }
    }

    pub fn is_service(self) -> bool {
        Self::SERVICES.contains(&self)
    }

    /// The program a container command runs: its first word, or for
    /// `sh -c <script>` the first program name in the script.
    pub fn from_command(command: &[String]) -> Option<Program> {
        let first = command.first()?;
        if let Some(program) = Self::ALL.into_iter().find(|p| p.binary() == first) {
            return Some(program);
        }
        if first == "sh" || first == "/bin/sh" {
            let script = command.last()?;
            return script
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
                .find_map(|word| Self::ALL.into_iter().find(|p| p.binary() == word));
        }
        None
    }

    /// The variable holding the address of `/healthz` and `/readyz`.
    pub fn ops_address_variable(self) -> Option<&'static str> {
        match self {
            Program::JobApi => Some("JOB_API_ADDR"),
            Program::Scheduler => Some("SCHEDULER_HTTP_ADDR"),
            Program::AgentGateway => Some("GATEWAY_HTTP_ADDR"),
            Program::RealtimeBroadcaster => Some("BROADCASTER_ADDR"),
            Program::YardAgent | Program::Yard => None,
        }
    }

    /// Every listen address the program binds.
    pub fn listen_variables(self) -> &'static [&'static str] {
        match self {
            Program::JobApi => &["JOB_API_ADDR"],
            Program::Scheduler => &["SCHEDULER_HTTP_ADDR"],
            Program::AgentGateway => &["GATEWAY_HTTP_ADDR", "GATEWAY_GRPC_ADDR"],
            Program::RealtimeBroadcaster => &["BROADCASTER_ADDR"],
            Program::YardAgent | Program::Yard => &[],
        }
    }

    /// The variables the program documents (and reads): service-kit's
    /// list for the services and the CLI, the agent's `--help` for it.
    pub fn documented_variables(self) -> BTreeSet<String> {
        match self {
            Program::YardAgent => yard_agent::AgentConfig::command()
                .get_arguments()
                .filter_map(|arg| arg.get_env())
                .map(|name| name.to_string_lossy().into_owned())
                .collect(),
            _ => VARIABLES.iter().map(|v| (*v).to_owned()).collect(),
        }
    }

    /// Whether `env` configures the program: for the services, their own
    /// configuration parser must accept it (what start-up does first).
    pub fn check_config(self, env: &Env) -> Result<(), String> {
        let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let source = MapSource::new(&pairs);
        let parsed: Result<(), ConfigError> = match self {
            Program::JobApi => job_api::Config::from_source(&source).map(drop),
            Program::Scheduler => scheduler::Config::from_source(&source).map(drop),
            Program::AgentGateway => agent_gateway::Config::from_source(&source).map(drop),
            Program::RealtimeBroadcaster => {
                realtime_broadcaster::Config::from_source(&source).map(drop)
            }
            // The agent's built-in gateway URL is loopback: wrong in any
            // container, so a deployment must say where the gateways are.
            Program::YardAgent => {
                return match env.get("SWITCHYARD_GATEWAY_URL") {
                    Some(url) if !url.trim().is_empty() => Ok(()),
                    _ => Err("SWITCHYARD_GATEWAY_URL is required in a container".into()),
                };
            }
            Program::Yard => Ok(()),
        };
        parsed.map_err(|e| e.to_string())
    }
}
