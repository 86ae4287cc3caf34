//! realtime-broadcaster: live job logs and status to browsers over
//! WebSocket (`/v1/ws`), history then live with no gap and no duplicate,
//! and the web dashboard (`/`).
//!
//! * [`protocol`]: the wire messages and close codes (`PROTOCOL.md`).
//! * [`hub`]: one Redis subscription and one feed per channel with local
//!   subscribers; gap repair from PostgreSQL.
//! * [`connection`]: a WebSocket connection and its subscriptions.
//! * [`dashboard`]: the embedded single-page dashboard.
//!
//! Replicas share nothing but PostgreSQL and Redis, so any number run
//! behind a plain load balancer without sticky sessions.
//!
//! A library with one entry point, [`run`], so tests start the real
//! service in-process; `main.rs` only reads the config and binds.

pub mod connection;
pub mod dashboard;
pub mod hub;
pub mod metrics;
pub mod protocol;

use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use actix_web::web;
use service_kit::config::{CommonConfig, ConfigError, Source, address, optional};
use service_kit::launch::{Foundation, ServiceConfig};
use tokio_util::sync::CancellationToken;

pub use connection::Settings;

pub const SERVICE: &str = "realtime-broadcaster";

/// Typed configuration; shared variables are documented in
/// [`service_kit::config`], the `AUTH_*` ones in [`auth::config`].
///
/// | variable | default | meaning |
/// |---|---|---|
/// | `BROADCASTER_ADDR` | `127.0.0.1:8090` | listen address (WebSocket `/v1/ws`, dashboard `/`) |
/// | `DASHBOARD_API_URL` | `http://127.0.0.1:8080` | job-api base URL the dashboard calls from the browser |
#[derive(Clone, Debug)]
pub struct Config {
    pub common: CommonConfig,
    /// `BROADCASTER_ADDR`: where the HTTP server listens.
    pub addr: SocketAddr,
    pub auth: auth::AuthConfig,
    /// `DASHBOARD_API_URL`.
    pub dashboard_api_url: String,
    /// Keepalive and queue limits (not read from the environment).
    pub settings: Settings,
    /// How often each job feed checks PostgreSQL for lines or a status it
    /// missed on Redis.
    pub check_interval: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            ping_interval: Duration::from_secs(25),
            send_queue_frames: 256,
            feed_queue_items: 1024,
            max_subscriptions: 256,
        }
    }
}

impl ServiceConfig for Config {
    fn from_source(source: &dyn Source) -> Result<Self, ConfigError> {
        Ok(Self {
            common: CommonConfig::from_source(SERVICE, source)?,
            addr: address(source, "BROADCASTER_ADDR", "127.0.0.1:8090")?,
            auth: auth::AuthConfig::from_source(source)?,
            dashboard_api_url: optional(source, "DASHBOARD_API_URL")
                .unwrap_or_else(|| "http://127.0.0.1:8080".to_owned()),
            settings: Settings::default(),
            check_interval: Duration::from_secs(1),
        })
    }

    fn common(&self) -> &CommonConfig {
        &self.common
    }
}

/// Serves until `shutdown` is cancelled, then closes every WebSocket with
/// 1001 (going away), drains and returns.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let foundation = Foundation::new(&config.common, env!("CARGO_PKG_VERSION"))?;
    let verifier = auth::Verifier::new(config.auth.clone())?;
    let hub_stop = CancellationToken::new();
    let metrics = metrics::Metrics::new(foundation.ops.registry());
    let hub = hub::Hub::start(
        foundation.db.clone(),
        foundation.bus.clone(),
        config.check_interval,
        metrics.clone(),
        hub_stop.clone(),
    )?;
    let state = std::sync::Arc::new(connection::AppState {
        hub,
        metrics,
        verifier,
        settings: config.settings,
        shutdown: shutdown.clone(),
        connections: tokio_util::task::TaskTracker::new(),
    });
    let dashboard = web::Data::new(dashboard::Dashboard::new(&config.dashboard_api_url));
    let upgrading = state.clone();
    let result = service_kit::http::serve_with_upgrades(
        listener,
        &config.common.http,
        foundation.ops.clone(),
        shutdown,
        move |cfg| {
            cfg.app_data(dashboard.clone())
                .route(
                    connection::PATH,
                    web::get().to(connection::upgrade_required),
                )
                .configure(dashboard::configure);
        },
        move |request, connection| connection::upgrade(upgrading.clone(), request, connection),
    )
    .await;
    // The connections saw the same shutdown: let them send their 1001.
    state.connections.close();
    let _ = tokio::time::timeout(
        config.common.http.shutdown_timeout,
        state.connections.wait(),
    )
    .await;
    hub_stop.cancel();
    result?;
    Ok(())
}
