//! scheduler: durable orchestration over PostgreSQL. Leases with epochs,
//! expiry and requeue, retries with backoff, dead letters, fairness,
//! labels, capacity, concurrency keys, approvals and timeouts.
//!
//! All state is in PostgreSQL, so any number of replicas may run and any of
//! them may die at any moment: dispatch is serialized per org by an
//! advisory lock, every change is guarded by status and epoch, and a
//! restarted replica simply carries on from the rows.
//!
//! Wake-ups come from Redis (`scheduler:wake`: job created, agent
//! connected, capacity freed); a periodic sweep is the safety net, so a
//! lost message costs at most one sweep interval. Delayed jobs and backoffs
//! are waited for by sleeping until the earliest `run_at`, not by polling.

mod engine;
mod metrics;

use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use service_kit::config::{CommonConfig, ConfigError, Source, address, parsed};
use service_kit::launch::{Foundation, ServiceConfig};
use tokio_util::sync::CancellationToken;

pub use engine::Engine;

pub const SERVICE: &str = "scheduler";

/// Scheduling settings. Variables (all optional):
///
/// | variable | default | meaning |
/// |---|---|---|
/// | `SCHEDULER_SWEEP_INTERVAL_MS` | `1000` | safety-net sweep period: lease expiry, timeouts, lost wake-ups |
/// | `SCHEDULER_ACK_TIMEOUT_MS` | `10000` | time an agent has to acknowledge an assignment |
/// | `CANCEL_GRACE_MS` | `30000` | time a cancelled job has to stop before the cancel is forced |
/// | `SCHEDULER_AGING_INTERVAL_SECS` | `60` | one priority point per interval waited; 0 disables aging |
/// | `SCHEDULER_MAX_LEASES_PER_TICK` | `1000` | leases granted per org per tick |
/// | `SCHEDULER_QUEUE_DEPTH_INTERVAL_MS` | `15000` | how often a sweep recounts the queue-depth gauge |
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    pub sweep_interval: Duration,
    pub ack_timeout: Duration,
    pub cancel_grace: Duration,
    pub aging: Option<Duration>,
    pub max_leases_per_tick: usize,
    /// Counting every queued job costs 60 ms at a 100,000-job backlog: the
    /// gauge is refreshed on the first sweep after this much time, not on
    /// every sweep (a scrape interval is typically 15 s).
    pub queue_depth_interval: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            sweep_interval: Duration::from_millis(1_000),
            ack_timeout: Duration::from_millis(10_000),
            cancel_grace: Duration::from_millis(30_000),
            aging: Some(Duration::from_secs(60)),
            max_leases_per_tick: 1_000,
            queue_depth_interval: Duration::from_millis(15_000),
        }
    }
}

impl Settings {
    pub fn from_source(source: &dyn Source) -> Result<Self, ConfigError> {
        let positive = |name: &'static str, value: u64| {
            if value == 0 {
                Err(ConfigError {
                    variable: name,
                    problem: "must be greater than 0".into(),
                })
            } else {
                Ok(value)
            }
        };
        let aging = parsed(source, "SCHEDULER_AGING_INTERVAL_SECS", 60u64)?;
        Ok(Self {
            sweep_interval: Duration::from_millis(positive(
                "SCHEDULER_SWEEP_INTERVAL_MS",
                parsed(source, "SCHEDULER_SWEEP_INTERVAL_MS", 1_000u64)?,
            )?),
            ack_timeout: Duration::from_millis(positive(
                "SCHEDULER_ACK_TIMEOUT_MS",
                parsed(source, "SCHEDULER_ACK_TIMEOUT_MS", 10_000u64)?,
            )?),
            cancel_grace: Duration::from_millis(parsed(source, "CANCEL_GRACE_MS", 30_000u64)?),
            aging: (aging > 0).then(|| Duration::from_secs(aging)),
            max_leases_per_tick: positive(
                "SCHEDULER_MAX_LEASES_PER_TICK",
                parsed(source, "SCHEDULER_MAX_LEASES_PER_TICK", 1_000u64)?,
            )? as usize,
            queue_depth_interval: Duration::from_millis(parsed(
                source,
                "SCHEDULER_QUEUE_DEPTH_INTERVAL_MS",
                15_000u64,
            )?),
        })
    }
}

/// Typed configuration; shared variables are documented in
/// [`service_kit::config`], the scheduler's own on [`Settings`].
#[derive(Clone, Debug)]
pub struct Config {
    pub common: CommonConfig,
    /// `SCHEDULER_HTTP_ADDR`: where `/healthz`, `/readyz`, `/metrics` listen.
    pub addr: SocketAddr,
    pub settings: Settings,
}

impl ServiceConfig for Config {
    fn from_source(source: &dyn Source) -> Result<Self, ConfigError> {
        Ok(Self {
            common: CommonConfig::from_source(SERVICE, source)?,
            addr: address(source, "SCHEDULER_HTTP_ADDR", "127.0.0.1:8082")?,
            settings: Settings::from_source(source)?,
        })
    }

    fn common(&self) -> &CommonConfig {
        &self.common
    }
}

/// Schedules and serves the operational endpoints until `shutdown` is
/// cancelled; an in-progress tick finishes first.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let foundation = Foundation::new(&config.common, env!("CARGO_PKG_VERSION"))?;
    let engine = Engine::new(
        foundation.db.clone(),
        foundation.bus.clone(),
        config.settings.clone(),
        foundation.ops.registry(),
    );
    let engine_task = tokio::spawn(engine.run(shutdown.clone()));
    let served = service_kit::http::serve(
        listener,
        &config.common.http,
        foundation.ops.clone(),
        shutdown.clone(),
        |_| {},
    )
    .await;
    shutdown.cancel();
    engine_task.await?;
    served?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> service_kit::config::MapSource {
        service_kit::config::MapSource::new(pairs)
    }

    #[test]
    fn settings_default_and_parse() {
        assert_eq!(
            Settings::from_source(&env(&[])).expect("defaults"),
            Settings::default()
        );
        let custom = Settings::from_source(&env(&[
            ("SCHEDULER_SWEEP_INTERVAL_MS", "250"),
            ("SCHEDULER_AGING_INTERVAL_SECS", "0"),
            ("SCHEDULER_QUEUE_DEPTH_INTERVAL_MS", "0"),
        ]))
        .expect("custom");
        assert_eq!(custom.sweep_interval, Duration::from_millis(250));
        assert_eq!(custom.queue_depth_interval, Duration::ZERO);
        assert_eq!(custom.aging, None);
        let error =
            Settings::from_source(&env(&[("SCHEDULER_SWEEP_INTERVAL_MS", "0")])).expect_err("zero");
        assert_eq!(error.variable, "SCHEDULER_SWEEP_INTERVAL_MS");
    }
}
