//! The gateway's Prometheus metrics (names get the registry's `switchyard_`
//! prefix). Each replica reports its own; sum over instances for totals.

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// The agent writes fenced by the lease epoch (`kind` label values).
pub const STALE_WRITE_KINDS: [&str; 6] =
    ["ack", "heartbeat", "log", "result", "cancel_ack", "release"];

#[derive(Clone)]
pub struct GatewayMetrics {
    /// Agents holding a gRPC session on this replica.
    pub connected_agents: IntGauge,
    /// Agent writes refused because their lease epoch is no longer current.
    pub stale_writes: IntCounterVec,
    /// Log lines received from agents (before de-duplication of resends).
    pub log_lines_received: IntCounter,
}

impl GatewayMetrics {
    /// The metrics, not yet registered (see [`GatewayMetrics::register`]).
    pub fn new() -> Self {
        Self {
            connected_agents: IntGauge::new(
                "gateway_connected_agents",
                "Agents with an open gRPC session on this gateway replica",
            )
            .expect("metric"),
            stale_writes: IntCounterVec::new(
                Opts::new(
                    "gateway_stale_writes_total",
                    "Agent writes rejected because their lease epoch is stale, by kind",
                ),
                &["kind"],
            )
            .expect("metric"),
            log_lines_received: IntCounter::new(
                "gateway_log_lines_received_total",
                "Log lines received from agents",
            )
            .expect("metric"),
        }
    }

    pub fn register(&self, registry: &Registry) {
        // Every kind is exported from the start (at zero).
        for kind in STALE_WRITE_KINDS {
            self.stale_writes.with_label_values(&[kind]);
        }
        let _ = registry.register(Box::new(self.connected_agents.clone()));
        let _ = registry.register(Box::new(self.stale_writes.clone()));
        let _ = registry.register(Box::new(self.log_lines_received.clone()));
    }
}

impl Default for GatewayMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Keeps the connected-agents gauge up while a session is open.
pub struct ConnectedAgent(IntGauge);

impl ConnectedAgent {
    pub fn new(gauge: &IntGauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for ConnectedAgent {
    fn drop(&mut self) {
        self.0.dec();
    }
}
