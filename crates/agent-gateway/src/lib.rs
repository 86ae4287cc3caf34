//! agent-gateway: where agents connect. It serves the agent protocol
//! (`switchyard.agent.v1`) over gRPC — registration and the bidirectional
//! session — and the HTTP pull API for agents that cannot hold a stream,
//! both fenced by lease epochs.
//!
//! Many replicas may run. An assignment reaches whichever replica holds the
//! agent's session because each session listens on the agent's bus
//! channel; an agent may reconnect to any replica and resume its jobs
//! within the lease TTL, keeping the same epoch.
//!
//! * [`config`]: typed configuration and its variables.
//! * [`core`]: the operations, transport-neutral.
//! * [`grpc`]: the gRPC service, health and reflection.
//! * [`http`]: the HTTP pull API.
//! * [`tokens`]: HTTP session tokens in Redis.
//! * [`successes`]: successes of every session, recorded together.
//! * [`error`]: the one error type, mapped to gRPC and HTTP.
//!
//! A library with one entry point, [`run`], so tests start the real
//! service in-process; `main.rs` only reads the config and binds.

pub mod config;
pub mod core;
pub mod error;
pub mod grpc;
pub mod http;
pub mod metrics;
pub mod successes;
pub mod tokens;

use std::net::TcpListener;

use service_kit::launch::Foundation;
use tokio_util::sync::CancellationToken;

pub use config::Config;

pub const SERVICE: &str = "agent-gateway";

/// The two sockets the gateway serves.
pub struct Listeners {
    /// `GATEWAY_GRPC_ADDR`: agent sessions, registration, health, reflection.
    pub grpc: TcpListener,
    /// `GATEWAY_HTTP_ADDR`: the HTTP pull API and the operational endpoints.
    pub http: TcpListener,
}

/// Serves until `shutdown` is cancelled, then ends the agents' sessions
/// (they reconnect to another replica), drains HTTP and returns.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let foundation = Foundation::new(&config.common, env!("CARGO_PKG_VERSION"))?;
    let gateway = core::Gateway::new(
        foundation.db.clone(),
        foundation.bus.clone(),
        config.gateway_id.clone(),
        config.agents.clone(),
    );
    gateway.metrics.register(foundation.ops.registry());
    tracing::info!(gateway.id = %config.gateway_id, "gateway starting");
    // Either server failing stops the other.
    let stop = shutdown.child_token();
    let grpc = {
        let stop = stop.clone();
        let gateway = gateway.clone();
        let settings = config.grpc.clone();
        let drain = config.common.http.shutdown_timeout;
        async move {
            let result = grpc::serve(gateway, listeners.grpc, &settings, stop.clone(), drain).await;
            stop.cancel();
            result
        }
    };
    let http = {
        let stop = stop.clone();
        let common = config.common.clone();
        async move {
            let result = service_kit::http::serve(
                listeners.http,
                &common.http,
                foundation.ops.clone(),
                stop.clone(),
                move |routes| http::configure(routes, gateway.clone()),
            )
            .await;
            stop.cancel();
            result
        }
    };
    let (grpc, http) = tokio::join!(grpc, http);
    grpc?;
    http?;
    Ok(())
}
