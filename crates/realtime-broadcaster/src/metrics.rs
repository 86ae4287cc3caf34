//! The broadcaster's Prometheus metrics (names get the registry's
//! `switchyard_` prefix).

use prometheus::{IntCounter, IntGauge, Registry};

#[derive(Clone)]
pub struct Metrics {
    /// Open WebSocket connections (authenticated) on this node.
    pub websocket_connections: IntGauge,
    /// Connections closed because they could not keep up (close code 4008).
    pub slow_consumer_closes: IntCounter,
    /// Log lines handed to subscribers (one per line per subscriber).
    pub log_lines_delivered: IntCounter,
    /// Channels this node is subscribed to on Redis.
    pub feeds: IntGauge,
}

impl Metrics {
    pub fn new(registry: &Registry) -> Self {
        let metrics = Self {
            websocket_connections: IntGauge::new(
                "broadcaster_websocket_connections",
                "Open WebSocket connections",
            )
            .expect("metric"),
            slow_consumer_closes: IntCounter::new(
                "broadcaster_slow_consumer_closes_total",
                "WebSocket connections closed for not keeping up",
            )
            .expect("metric"),
            log_lines_delivered: IntCounter::new(
                "broadcaster_log_lines_delivered_total",
                "Log lines delivered to subscribers (each line counted once per subscriber)",
            )
            .expect("metric"),
            feeds: IntGauge::new(
                "broadcaster_feeds",
                "Channels with local subscribers (one Redis subscription each)",
            )
            .expect("metric"),
        };
        for collector in [
            Box::new(metrics.websocket_connections.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(metrics.slow_consumer_closes.clone()),
            Box::new(metrics.log_lines_delivered.clone()),
            Box::new(metrics.feeds.clone()),
        ] {
            let _ = registry.register(collector);
        }
        metrics
    }
}

/// Keeps a gauge up while held.
pub struct Held(IntGauge);

impl Held {
    pub fn new(gauge: &IntGauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.0.dec();
    }
}
