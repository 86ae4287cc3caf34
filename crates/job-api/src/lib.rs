//! job-api: the REST door for clients (web, CLI, scripts): orgs, repositories, jobs, queues, agents, approvals, audit and stats.
//!
//! A library with one entry point, [`run`], so tests start the real
//! service in-process; `main.rs` only reads the config and binds.

use std::net::{SocketAddr, TcpListener};

use service_kit::config::{CommonConfig, ConfigError, Source, address};
use service_kit::launch::{Foundation, ServiceConfig};
use tokio_util::sync::CancellationToken;

pub const SERVICE: &str = "job-api";

/// Typed configuration; every variable is documented in
/// [`service_kit::config`].
#[derive(Clone, Debug)]
pub struct Config {
    pub common: CommonConfig,
    /// `JOB_API_ADDR`: where the HTTP server listens.
    pub addr: SocketAddr,
}

impl ServiceConfig for Config {
    fn from_source(source: &dyn Source) -> Result<Self, ConfigError> {
        Ok(Self {
            common: CommonConfig::from_source(SERVICE, source)?,
            addr: address(source, "JOB_API_ADDR", "127.0.0.1:8080")?,
        })
    }

    fn common(&self) -> &CommonConfig {
        &self.common
    }
}

/// Serves until `shutdown` is cancelled, then drains and returns.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let foundation = Foundation::new(&config.common, env!("CARGO_PKG_VERSION"))?;
    service_kit::http::serve(
        listener,
        &config.common.http,
        foundation.ops.clone(),
        shutdown,
        |_routes| {},
    )
    .await?;
    Ok(())
}
