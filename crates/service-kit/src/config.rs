//! Configuration from the environment.
//!
//! Every variable any service reads is listed here, in [`VARIABLES`], in
//! `.env.example` and in the README; a test checks that the three agree.
//!
//! | variable | default | used by |
//! |---|---|---|
//! | `DATABASE_URL` | required | all |
//! | `DATABASE_POOL_SIZE` | `16` | all |
//! | `DATABASE_ACQUIRE_TIMEOUT_MS` | `5000` | all |
//! | `DATABASE_TRANSACTION_POOLING` | `false` | all |
//! | `DATABASE_MIGRATION_URL` | `DATABASE_URL` | all |
//! | `REDIS_URL` | required | all |
//! | `REDIS_KEY_PREFIX` | `sy:` | all |
//! | `REDIS_CLUSTER` | `false` | all |
//! | `REDIS_SENTINEL_MASTER` | unset | all |
//! | `REDIS_SENTINEL_PASSWORD` | unset | all |
//! | `MIGRATE_ON_START` | `false` | all |
//! | `RUST_LOG` | `info` | all |
//! | `LOG_FORMAT` | `json` (`compact` for people) | all |
//! | `OTEL_EXPORTER_OTLP_ENDPOINT` | unset: no export | all |
//! | `HTTP_KEEP_ALIVE_SECS` | `75` | all |
//! | `HTTP_CLIENT_REQUEST_TIMEOUT_MS` | `10000` | all |
//! | `HTTP_REQUEST_TIMEOUT_SECS` | `30` | all |
//! | `HTTP_SHUTDOWN_TIMEOUT_SECS` | `25` | all |
//! | `HTTP_WORKERS` | CPU count | all |
//! | `JOB_API_ADDR` | `127.0.0.1:8080` | job-api |
//! | `GATEWAY_GRPC_ADDR` | `127.0.0.1:50051` | agent-gateway |
//! | `GATEWAY_HTTP_ADDR` | `127.0.0.1:8081` | agent-gateway |
//! | `SCHEDULER_HTTP_ADDR` | `127.0.0.1:8082` | scheduler |
//! | `BROADCASTER_ADDR` | `127.0.0.1:8090` | realtime-broadcaster |
//!
//! Redis comes in three shapes. By default `REDIS_URL` is one Redis.
//! `REDIS_CLUSTER=true`: `REDIS_URL` lists seed nodes of a Redis Cluster,
//! comma-separated, and events use sharded pub/sub.
//! `REDIS_SENTINEL_MASTER=<name>`: `REDIS_URL` lists Sentinels,
//! comma-separated (`redis://s1:26379,redis://s2:26379`); every connection
//! asks them for the current primary of that master name, so services
//! follow a failover without restart. The URLs' password, user, database
//! and `rediss://` are used for the primary; the Sentinels get
//! `REDIS_SENTINEL_PASSWORD` when set, and no password otherwise. Cluster
//! and Sentinel exclude each other.
//!
//! Keep-alive defaults to 75 s, longer than the 60 s idle timeout of common
//! cloud load balancers, so the balancer (not us) closes idle connections
//! and never sends a request down a socket we are closing.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use telemetry::{LogFormat, TelemetryConfig};

/// Every variable any service reads, for the documentation check. Those
/// read by one service only are documented beside its config too.
pub const VARIABLES: &[&str] = &[
    "DATABASE_URL",
    "DATABASE_POOL_SIZE",
    "DATABASE_ACQUIRE_TIMEOUT_MS",
    "DATABASE_TRANSACTION_POOLING",
    "DATABASE_MIGRATION_URL",
    "REDIS_URL",
    "REDIS_KEY_PREFIX",
    "REDIS_CLUSTER",
    "REDIS_SENTINEL_MASTER",
    "REDIS_SENTINEL_PASSWORD",
    "MIGRATE_ON_START",
    "RUST_LOG",
    "LOG_FORMAT",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "HTTP_KEEP_ALIVE_SECS",
    "HTTP_CLIENT_REQUEST_TIMEOUT_MS",
    "HTTP_REQUEST_TIMEOUT_SECS",
    "HTTP_SHUTDOWN_TIMEOUT_SECS",
    "HTTP_WORKERS",
    "JOB_API_ADDR",
    "GATEWAY_GRPC_ADDR",
    "GATEWAY_HTTP_ADDR",
    "SCHEDULER_HTTP_ADDR",
    "BROADCASTER_ADDR",
    // Read by job-api and realtime-broadcaster (`auth::config`).
    "AUTH_RS256_PUBLIC_KEY",
    "AUTH_JWKS_URL",
    "AUTH_HS256_SECRET",
    "AUTH_ISSUER",
    "AUTH_AUDIENCE",
    // Read by job-api and the scheduler.
    "CANCEL_GRACE_MS",
    // Read by job-api: browser origins allowed (the dashboard's).
    "JOB_API_CORS_ORIGINS",
    // Read by job-api: lease an idle org's new job in its create.
    "JOB_API_LEASE_ON_CREATE",
    // Read by realtime-broadcaster: where the dashboard finds job-api.
    "DASHBOARD_API_URL",
    // Read by the scheduler (`scheduler::Settings`); the ack timeout by
    // job-api too (for the leases it grants on create).
    "SCHEDULER_SWEEP_INTERVAL_MS",
    "SCHEDULER_ACK_TIMEOUT_MS",
    "SCHEDULER_AGING_INTERVAL_SECS",
    "SCHEDULER_MAX_LEASES_PER_TICK",
    "SCHEDULER_QUEUE_DEPTH_INTERVAL_MS",
    // Read by agent-gateway (`agent_gateway::config`).
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

/// One variable's problem; printed as the single line start-up fails with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("configuration: {variable} {problem}")]
pub struct ConfigError {
    pub variable: &'static str,
    pub problem: String,
}

/// Where variables come from: the process environment, or a map in tests.
pub trait Source {
    fn get(&self, name: &str) -> Option<String>;
}

/// The real process environment.
pub struct ProcessEnv;

impl Source for ProcessEnv {
    fn get(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl<F: Fn(&str) -> Option<String>> Source for F {
    fn get(&self, name: &str) -> Option<String> {
        self(name)
    }
}

/// Variables from a fixed list: for tests, and for tools that build a
/// service's configuration without touching the process environment.
pub struct MapSource(std::collections::HashMap<String, String>);

impl MapSource {
    pub fn new(pairs: &[(&str, &str)]) -> Self {
        Self(
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        )
    }
}

impl Source for MapSource {
    fn get(&self, name: &str) -> Option<String> {
        self.0.get(name).cloned()
    }
}

fn present(source: &dyn Source, name: &str) -> Option<String> {
    source
        .get(name)
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

pub fn required(
    source: &dyn Source,
    name: &'static str,
    example: &str,
) -> Result<String, ConfigError> {
    present(source, name).ok_or_else(|| ConfigError {
        variable: name,
        problem: format!("is required (for example {example})"),
    })
}

pub fn optional(source: &dyn Source, name: &'static str) -> Option<String> {
    present(source, name)
}

/// Parses a variable, or returns `default` when it is unset.
pub fn parsed<T>(source: &dyn Source, name: &'static str, default: T) -> Result<T, ConfigError>
where
    T: FromStr,
    T::Err: fmt::Display,
{
    match present(source, name) {
        None => Ok(default),
        Some(raw) => raw.parse().map_err(|e: T::Err| ConfigError {
            variable: name,
            problem: format!("has an invalid value {raw:?}: {e}"),
        }),
    }
}

pub fn address(
    source: &dyn Source,
    name: &'static str,
    default: &str,
) -> Result<SocketAddr, ConfigError> {
    let raw = present(source, name).unwrap_or_else(|| default.to_owned());
    raw.parse().map_err(|_| ConfigError {
        variable: name,
        problem: format!("must be host:port with an IP address, got {raw:?}"),
    })
}

pub fn flag(source: &dyn Source, name: &'static str) -> Result<bool, ConfigError> {
    flag_or(source, name, false)
}

/// A true/false variable that is `default` when unset.
pub fn flag_or(
    source: &dyn Source,
    name: &'static str,
    default: bool,
) -> Result<bool, ConfigError> {
    match present(source, name)
        .as_deref()
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        None => Ok(default),
        Some("0" | "false" | "no" | "off") => Ok(false),
        Some("1" | "true" | "yes" | "on") => Ok(true),
        Some(other) => Err(ConfigError {
            variable: name,
            problem: format!("must be true or false, got {other:?}"),
        }),
    }
}

fn url_with_scheme(
    source: &dyn Source,
    name: &'static str,
    schemes: &[&str],
    example: &str,
) -> Result<String, ConfigError> {
    let url = required(source, name, example)?;
    if !schemes.iter().any(|s| url.starts_with(&format!("{s}://"))) {
        return Err(ConfigError {
            variable: name,
            problem: format!("must start with {}://", schemes.join(":// or ")),
        });
    }
    Ok(url)
}

/// HTTP server settings.
#[derive(Clone, Debug, PartialEq)]
pub struct HttpConfig {
    pub keep_alive: Duration,
    /// Time allowed to receive a request's head.
    pub client_request_timeout: Duration,
    /// Time allowed for a handler to answer.
    pub request_timeout: Duration,
    /// Time in-flight requests get to finish after a shutdown signal.
    pub shutdown_timeout: Duration,
    pub workers: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            keep_alive: Duration::from_secs(75),
            client_request_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            shutdown_timeout: Duration::from_secs(25),
            workers: std::thread::available_parallelism().map_or(2, |n| n.get()),
        }
    }
}

impl HttpConfig {
    pub fn from_source(source: &dyn Source) -> Result<Self, ConfigError> {
        let defaults = Self::default();
        let workers = parsed(source, "HTTP_WORKERS", defaults.workers)?;
        if workers == 0 {
            return Err(ConfigError {
                variable: "HTTP_WORKERS",
                problem: "must be at least 1".into(),
            });
        }
        Ok(Self {
            keep_alive: Duration::from_secs(parsed(source, "HTTP_KEEP_ALIVE_SECS", 75u64)?),
            client_request_timeout: Duration::from_millis(parsed(
                source,
                "HTTP_CLIENT_REQUEST_TIMEOUT_MS",
                10_000u64,
            )?),
            request_timeout: Duration::from_secs(parsed(
                source,
                "HTTP_REQUEST_TIMEOUT_SECS",
                30u64,
            )?),
            shutdown_timeout: Duration::from_secs(parsed(
                source,
                "HTTP_SHUTDOWN_TIMEOUT_SECS",
                25u64,
            )?),
            workers,
        })
    }
}

/// The bus settings: one Redis, a Cluster or Sentinels (see the module docs).
fn redis_config(
    source: &dyn Source,
    url: String,
    prefix: String,
) -> Result<bus::BusConfig, ConfigError> {
    let cluster = flag(source, "REDIS_CLUSTER")?;
    let sentinel_master = optional(source, "REDIS_SENTINEL_MASTER");
    let sentinel_password = optional(source, "REDIS_SENTINEL_PASSWORD");
    // Every comma-separated address must be a Redis URL, not only the first.
    if (cluster || sentinel_master.is_some())
        && let Some(bad) = url
            .split(',')
            .map(str::trim)
            .find(|u| !(u.starts_with("redis://") || u.starts_with("rediss://")))
    {
        return Err(ConfigError {
            variable: "REDIS_URL",
            problem: format!(
                "must list redis:// or rediss:// URLs, comma-separated; got an entry {:?}",
                bus::redact_urls(bad)
            ),
        });
    }
    match (cluster, sentinel_master) {
        (true, Some(_)) => Err(ConfigError {
            variable: "REDIS_SENTINEL_MASTER",
            problem: "cannot be set together with REDIS_CLUSTER=true: Redis Cluster and Sentinel \
                      are different deployments, choose one"
                .into(),
        }),
        (true, None) => {
            reject_sentinel_password(sentinel_password.as_deref())?;
            Ok(bus::BusConfig::cluster(url, prefix))
        }
        (false, Some(master)) => {
            Ok(bus::BusConfig::sentinel(url, master, prefix)
                .with_sentinel_password(sentinel_password))
        }
        (false, None) => {
            reject_sentinel_password(sentinel_password.as_deref())?;
            Ok(bus::BusConfig::new(url, prefix))
        }
    }
}

/// A Sentinel password without Sentinels is a mistake worth stopping for:
/// the operator believes Sentinel is in use.
fn reject_sentinel_password(password: Option<&str>) -> Result<(), ConfigError> {
    match password {
        Some(_) => Err(ConfigError {
            variable: "REDIS_SENTINEL_PASSWORD",
            problem:
                "is set but REDIS_SENTINEL_MASTER is not (set the master name to use Sentinel)"
                    .into(),
        }),
        None => Ok(()),
    }
}

/// Settings every service has.
#[derive(Clone, Debug)]
pub struct CommonConfig {
    pub database: db::PoolConfig,
    pub redis: bus::BusConfig,
    pub migrate_on_start: bool,
    pub http: HttpConfig,
    pub telemetry: TelemetryConfig,
}

impl CommonConfig {
    pub fn from_source(
        service_name: &'static str,
        source: &dyn Source,
    ) -> Result<Self, ConfigError> {
        let database_url = url_with_scheme(
            source,
            "DATABASE_URL",
            &["postgres", "postgresql"],
            "postgres://postgres:postgres@127.0.0.1:5432/switchyard",
        )?;
        let mut database = db::PoolConfig::new(database_url);
        database.max_size = parsed(source, "DATABASE_POOL_SIZE", 16usize)?;
        if database.max_size == 0 {
            return Err(ConfigError {
                variable: "DATABASE_POOL_SIZE",
                problem: "must be at least 1".into(),
            });
        }
        database.acquire_timeout =
            Duration::from_millis(parsed(source, "DATABASE_ACQUIRE_TIMEOUT_MS", 5_000u64)?);
        database.transaction_pooling = flag(source, "DATABASE_TRANSACTION_POOLING")?;
        if optional(source, "DATABASE_MIGRATION_URL").is_some() {
            database.migration_url = Some(url_with_scheme(
                source,
                "DATABASE_MIGRATION_URL",
                &["postgres", "postgresql"],
                "",
            )?);
        }
        let redis_url = url_with_scheme(
            source,
            "REDIS_URL",
            &["redis", "rediss"],
            "redis://127.0.0.1:6379",
        )?;
        let prefix = optional(source, "REDIS_KEY_PREFIX").unwrap_or_else(|| "sy:".to_owned());
        let redis = redis_config(source, redis_url, prefix)?;
        let log_format = match optional(source, "LOG_FORMAT") {
            None => LogFormat::Json,
            Some(raw) => LogFormat::parse(&raw).ok_or_else(|| ConfigError {
                variable: "LOG_FORMAT",
                problem: format!("must be json or compact, got {raw:?}"),
            })?,
        };
        Ok(Self {
            database,
            redis,
            migrate_on_start: flag(source, "MIGRATE_ON_START")?,
            http: HttpConfig::from_source(source)?,
            telemetry: TelemetryConfig {
                service_name,
                log_format,
                filter: optional(source, "RUST_LOG"),
                otlp_endpoint: optional(source, "OTEL_EXPORTER_OTLP_ENDPOINT"),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> MapSource {
        MapSource::new(pairs)
    }

    const MINIMAL: [(&str, &str); 2] = [
        ("DATABASE_URL", "postgres://u@localhost/db"),
        ("REDIS_URL", "redis://localhost"),
    ];

    #[test]
    fn minimal_environment_gives_safe_defaults() {
        let config = CommonConfig::from_source("t", &env(&MINIMAL)).expect("config");
        assert_eq!(config.http.keep_alive, Duration::from_secs(75));
        assert_eq!(config.redis.prefix, "sy:");
        assert!(!config.migrate_on_start);
        assert_eq!(config.telemetry.otlp_endpoint, None);
        assert_eq!(config.telemetry.log_format, LogFormat::Json);
    }

    #[test]
    fn a_missing_variable_is_named() {
        let error =
            CommonConfig::from_source("t", &env(&[("REDIS_URL", "redis://x")])).expect_err("fails");
        assert_eq!(error.variable, "DATABASE_URL");
        assert!(
            error
                .to_string()
                .starts_with("configuration: DATABASE_URL is required")
        );
    }

    #[test]
    fn bad_values_are_named_with_the_value() {
        let mut pairs = MINIMAL.to_vec();
        pairs.push(("HTTP_KEEP_ALIVE_SECS", "soon"));
        let error = CommonConfig::from_source("t", &env(&pairs)).expect_err("fails");
        assert_eq!(error.variable, "HTTP_KEEP_ALIVE_SECS");
        assert!(error.problem.contains("\"soon\""));

        let error = CommonConfig::from_source(
            "t",
            &env(&[("DATABASE_URL", "mysql://x"), ("REDIS_URL", "redis://x")]),
        )
        .expect_err("fails");
        assert_eq!(error.variable, "DATABASE_URL");

        let mut pairs = MINIMAL.to_vec();
        pairs.push(("MIGRATE_ON_START", "maybe"));
        assert_eq!(
            CommonConfig::from_source("t", &env(&pairs))
                .expect_err("fails")
                .variable,
            "MIGRATE_ON_START"
        );
    }

    fn with(extra: &[(&'static str, &'static str)]) -> MapSource {
        let mut pairs = MINIMAL.to_vec();
        pairs.extend_from_slice(extra);
        env(&pairs)
    }

    #[test]
    fn redis_is_a_single_node_by_default() {
        let config = CommonConfig::from_source("t", &env(&MINIMAL)).expect("config");
        assert_eq!(config.redis.topology, bus::Topology::Single);
        assert_eq!(config.redis.sentinel_password, None);
    }

    #[test]
    fn a_sentinel_master_name_makes_the_url_a_sentinel_list() {
        let config = CommonConfig::from_source(
            "t",
            &with(&[
                (
                    "REDIS_URL",
                    "redis://:data-secret@s1:26379, redis://s2:26379",
                ),
                ("REDIS_SENTINEL_MASTER", "mymaster"),
            ]),
        )
        .expect("config");
        assert_eq!(
            config.redis.topology,
            bus::Topology::Sentinel {
                master: "mymaster".into()
            }
        );
        assert_eq!(
            config.redis.url,
            "redis://:data-secret@s1:26379, redis://s2:26379"
        );
        assert_eq!(config.redis.sentinel_password, None);
    }

    #[test]
    fn the_sentinel_password_is_kept_and_never_shown() {
        let config = CommonConfig::from_source(
            "t",
            &with(&[
                ("REDIS_URL", "redis://:data-secret@s1:26379"),
                ("REDIS_SENTINEL_MASTER", "mymaster"),
                ("REDIS_SENTINEL_PASSWORD", "sentinel-secret"),
            ]),
        )
        .expect("config");
        assert_eq!(
            config.redis.sentinel_password.as_deref(),
            Some("sentinel-secret")
        );
        let shown = format!("{config:?}");
        assert!(!shown.contains("sentinel-secret"), "{shown}");
        assert!(!shown.contains("data-secret"), "{shown}");
    }

    #[test]
    fn cluster_and_sentinel_together_are_refused() {
        let error = CommonConfig::from_source(
            "t",
            &with(&[
                ("REDIS_CLUSTER", "true"),
                ("REDIS_SENTINEL_MASTER", "mymaster"),
            ]),
        )
        .expect_err("fails");
        assert_eq!(error.variable, "REDIS_SENTINEL_MASTER");
        assert!(error.problem.contains("REDIS_CLUSTER"), "{error}");
    }

    #[test]
    fn a_sentinel_password_without_a_master_name_is_refused() {
        for extra in [
            &[("REDIS_SENTINEL_PASSWORD", "pw")][..],
            &[("REDIS_SENTINEL_PASSWORD", "pw"), ("REDIS_CLUSTER", "true")][..],
        ] {
            let error = CommonConfig::from_source("t", &with(extra)).expect_err("fails");
            assert_eq!(error.variable, "REDIS_SENTINEL_PASSWORD");
        }
    }

    #[test]
    fn a_blank_master_name_means_no_sentinel() {
        let config = CommonConfig::from_source("t", &with(&[("REDIS_SENTINEL_MASTER", "  ")]))
            .expect("config");
        assert_eq!(config.redis.topology, bus::Topology::Single);
    }

    #[test]
    fn every_sentinel_address_must_be_a_redis_url() {
        let error = CommonConfig::from_source(
            "t",
            &with(&[
                ("REDIS_URL", "redis://s1:26379,s2:26379"),
                ("REDIS_SENTINEL_MASTER", "mymaster"),
            ]),
        )
        .expect_err("fails");
        assert_eq!(error.variable, "REDIS_URL");
        assert!(error.problem.contains("s2:26379"), "{error}");
    }

    #[test]
    fn a_transaction_pooler_takes_migrations_elsewhere() {
        let config = CommonConfig::from_source("t", &env(&MINIMAL)).expect("valid");
        assert!(!config.database.transaction_pooling);
        assert_eq!(config.database.migration_url(), config.database.url);

        let mut pairs = MINIMAL.to_vec();
        pairs.push(("DATABASE_TRANSACTION_POOLING", "true"));
        pairs.push(("DATABASE_MIGRATION_URL", "postgres://u@primary/db"));
        let config = CommonConfig::from_source("t", &env(&pairs)).expect("valid");
        assert!(config.database.transaction_pooling);
        assert_eq!(config.database.migration_url(), "postgres://u@primary/db");

        let mut pairs = MINIMAL.to_vec();
        pairs.push(("DATABASE_MIGRATION_URL", "primary:5432"));
        assert_eq!(
            CommonConfig::from_source("t", &env(&pairs))
                .expect_err("fails")
                .variable,
            "DATABASE_MIGRATION_URL"
        );
    }

    #[test]
    fn readme_and_env_example_document_every_variable() {
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
        for file in ["README.md", ".env.example"] {
            let text = std::fs::read_to_string(format!("{root}/{file}")).expect(file);
            for variable in VARIABLES {
                assert!(
                    text.contains(variable),
                    "{file} does not mention {variable}"
                );
            }
        }
    }

    #[test]
    fn addresses_must_be_socket_addresses() {
        let source = env(&[("JOB_API_ADDR", "localhost:80")]);
        assert_eq!(
            address(&source, "JOB_API_ADDR", "127.0.0.1:8080")
                .expect_err("fails")
                .variable,
            "JOB_API_ADDR"
        );
        let source = env(&[]);
        assert_eq!(
            address(&source, "JOB_API_ADDR", "127.0.0.1:8080").expect("default"),
            "127.0.0.1:8080".parse::<SocketAddr>().expect("addr")
        );
    }
}
