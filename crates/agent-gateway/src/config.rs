//! The gateway's configuration. Besides the variables every service reads
//! (see [`service_kit::config`]), it reads:
//!
//! | variable | default | meaning |
//! |---|---|---|
//! | `GATEWAY_GRPC_ADDR` | `127.0.0.1:50051` | gRPC listen address (agent sessions, registration, health, reflection) |
//! | `GATEWAY_HTTP_ADDR` | `127.0.0.1:8081` | HTTP listen address (HTTP pull API and `/healthz` `/readyz` `/version` `/metrics`) |
//! | `GATEWAY_ID` | hostname + random suffix | this replica's name, recorded on the sessions it holds |
//! | `GATEWAY_GRPC_MAX_MESSAGE_BYTES` | `4194304` | largest gRPC message accepted or sent |
//! | `GATEWAY_GRPC_KEEPALIVE_INTERVAL_MS` | `20000` | HTTP/2 keepalive ping interval |
//! | `GATEWAY_GRPC_KEEPALIVE_TIMEOUT_MS` | `10000` | a connection whose ping is unanswered this long is closed |
//! | `AGENT_HEARTBEAT_INTERVAL_MS` | `5000` | how often agents are told to heartbeat |
//! | `AGENT_LEASE_TTL_MS` | `30000` | lease length once running; each heartbeat or extend renews it |
//! | `AGENT_OFFLINE_GRACE_MS` | `10000` | a disconnected agent is marked offline after this, unless it is back |
//! | `AGENT_CANCEL_GRACE_MS` | `10000` | grace period an agent uses for a cancel learnt from a heartbeat reply |
//! | `AGENT_LOG_CHUNK_MAX_BYTES` | `1048576` | largest log chunk accepted (larger: `InvalidArgument` / 413) |
//! | `AGENT_HTTP_TOKEN_TTL_MS` | `900000` | idle lifetime of an HTTP session token (slides with use) |
//! | `AGENT_CLAIM_MAX_WAIT_MS` | `20000` | longest long-poll of an HTTP claim |
//! | `AGENT_CLAIM_MAX_JOBS` | `16` | most jobs one HTTP claim returns |

use std::net::SocketAddr;
use std::time::Duration;

use service_kit::config::{CommonConfig, ConfigError, Source, address, optional, parsed};
use service_kit::launch::ServiceConfig;

use crate::SERVICE;

/// Every variable this service reads beyond the common ones.
pub const VARIABLES: &[&str] = &[
    "GATEWAY_GRPC_ADDR",
    "GATEWAY_HTTP_ADDR",
    "GATEWAY_ID",
    "GATEWAY_GRPC_MAX_MESSAGE_BYTES",
    "GATEWAY_GRPC_KEEPALIVE_INTERVAL_MS",
    "GATEWAY_GRPC_KEEPALIVE_TIMEOUT_MS",
    "AGENT_HEARTBEAT_INTERVAL_MS",
    "AGENT_LEASE_TTL_MS",
    "AGENT_OFFLINE_GRACE_MS",
    "AGENT_CANCEL_GRACE_MS",
    "AGENT_LOG_CHUNK_MAX_BYTES",
    "AGENT_HTTP_TOKEN_TTL_MS",
    "AGENT_CLAIM_MAX_WAIT_MS",
    "AGENT_CLAIM_MAX_JOBS",
];

/// Typed configuration of the gateway.
#[derive(Clone, Debug)]
pub struct Config {
    pub common: CommonConfig,
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub gateway_id: String,
    pub agents: AgentSettings,
    pub grpc: GrpcSettings,
}

/// What agents are told and held to.
#[derive(Clone, Debug, PartialEq)]
pub struct AgentSettings {
    pub heartbeat_interval: Duration,
    pub lease_ttl: Duration,
    pub offline_grace: Duration,
    pub cancel_grace: Duration,
    pub log_chunk_max_bytes: usize,
    pub http_token_ttl: Duration,
    pub claim_max_wait: Duration,
    pub claim_max_jobs: u32,
}

impl Default for AgentSettings {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_secs(5),
            lease_ttl: Duration::from_secs(30),
            offline_grace: Duration::from_secs(10),
            cancel_grace: Duration::from_secs(10),
            log_chunk_max_bytes: 1024 * 1024,
            http_token_ttl: Duration::from_secs(15 * 60),
            claim_max_wait: Duration::from_secs(20),
            claim_max_jobs: 16,
        }
    }
}

/// gRPC transport settings.
#[derive(Clone, Debug, PartialEq)]
pub struct GrpcSettings {
    pub max_message_bytes: usize,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
}

impl Default for GrpcSettings {
    fn default() -> Self {
        Self {
            max_message_bytes: 4 * 1024 * 1024,
            keepalive_interval: Duration::from_secs(20),
            keepalive_timeout: Duration::from_secs(10),
        }
    }
}

fn millis(
    source: &dyn Source,
    name: &'static str,
    default: Duration,
) -> Result<Duration, ConfigError> {
    let ms = parsed(source, name, default.as_millis() as u64)?;
    if ms == 0 {
        return Err(ConfigError {
            variable: name,
            problem: "must be at least 1 ms".into(),
        });
    }
    Ok(Duration::from_millis(ms))
}

/// A name for this replica when `GATEWAY_ID` is unset: the host name plus
/// a random suffix, so two replicas on one host differ.
pub fn default_gateway_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "gateway".to_owned());
    format!("{host}-{:06x}", rand::random::<u32>() & 0xff_ffff)
}

impl Config {
    /// Reads the gateway's settings on top of `common`.
    pub fn from_parts(common: CommonConfig, source: &dyn Source) -> Result<Self, ConfigError> {
        let d = AgentSettings::default();
        let g = GrpcSettings::default();
        let agents = AgentSettings {
            heartbeat_interval: millis(
                source,
                "AGENT_HEARTBEAT_INTERVAL_MS",
                d.heartbeat_interval,
            )?,
            lease_ttl: millis(source, "AGENT_LEASE_TTL_MS", d.lease_ttl)?,
            offline_grace: millis(source, "AGENT_OFFLINE_GRACE_MS", d.offline_grace)?,
            cancel_grace: millis(source, "AGENT_CANCEL_GRACE_MS", d.cancel_grace)?,
            log_chunk_max_bytes: parsed(
                source,
                "AGENT_LOG_CHUNK_MAX_BYTES",
                d.log_chunk_max_bytes,
            )?,
            http_token_ttl: millis(source, "AGENT_HTTP_TOKEN_TTL_MS", d.http_token_ttl)?,
            claim_max_wait: millis(source, "AGENT_CLAIM_MAX_WAIT_MS", d.claim_max_wait)?,
            claim_max_jobs: parsed(source, "AGENT_CLAIM_MAX_JOBS", d.claim_max_jobs)?.max(1),
        };
        if agents.lease_ttl <= agents.heartbeat_interval {
            return Err(ConfigError {
                variable: "AGENT_LEASE_TTL_MS",
                problem: "must be longer than AGENT_HEARTBEAT_INTERVAL_MS".into(),
            });
        }
        let grpc = GrpcSettings {
            max_message_bytes: parsed(
                source,
                "GATEWAY_GRPC_MAX_MESSAGE_BYTES",
                g.max_message_bytes,
            )?,
            keepalive_interval: millis(
                source,
                "GATEWAY_GRPC_KEEPALIVE_INTERVAL_MS",
                g.keepalive_interval,
            )?,
            keepalive_timeout: millis(
                source,
                "GATEWAY_GRPC_KEEPALIVE_TIMEOUT_MS",
                g.keepalive_timeout,
            )?,
        };
        if agents.log_chunk_max_bytes + 4096 > grpc.max_message_bytes {
            return Err(ConfigError {
                variable: "AGENT_LOG_CHUNK_MAX_BYTES",
                problem: "must leave room (4 KiB) below GATEWAY_GRPC_MAX_MESSAGE_BYTES".into(),
            });
        }
        Ok(Self {
            common,
            grpc_addr: address(source, "GATEWAY_GRPC_ADDR", "127.0.0.1:50051")?,
            http_addr: address(source, "GATEWAY_HTTP_ADDR", "127.0.0.1:8081")?,
            gateway_id: optional(source, "GATEWAY_ID").unwrap_or_else(default_gateway_id),
            agents,
            grpc,
        })
    }
}

impl ServiceConfig for Config {
    fn from_source(source: &dyn Source) -> Result<Self, ConfigError> {
        Self::from_parts(CommonConfig::from_source(SERVICE, source)?, source)
    }

    fn common(&self) -> &CommonConfig {
        &self.common
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> service_kit::config::MapSource {
        service_kit::config::MapSource::new(pairs)
    }

    const MINIMAL: [(&str, &str); 2] = [
        ("DATABASE_URL", "postgres://u@localhost/db"),
        ("REDIS_URL", "redis://localhost"),
    ];

    #[test]
    fn defaults_are_documented_values() {
        let config = Config::from_source(&env(&MINIMAL)).expect("config");
        assert_eq!(config.grpc_addr.to_string(), "127.0.0.1:50051");
        assert_eq!(config.http_addr.to_string(), "127.0.0.1:8081");
        assert_eq!(config.agents, AgentSettings::default());
        assert!(!config.gateway_id.is_empty());
    }

    #[test]
    fn lease_ttl_must_exceed_heartbeat_interval() {
        let mut pairs = MINIMAL.to_vec();
        pairs.push(("AGENT_HEARTBEAT_INTERVAL_MS", "5000"));
        pairs.push(("AGENT_LEASE_TTL_MS", "4000"));
        let error = Config::from_source(&env(&pairs)).expect_err("fails");
        assert_eq!(error.variable, "AGENT_LEASE_TTL_MS");
    }
}
