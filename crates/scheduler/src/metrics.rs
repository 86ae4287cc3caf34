//! The scheduler's Prometheus metrics.

use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
};

#[derive(Clone)]
pub(crate) struct Metrics {
    pub leases_granted: IntCounter,
    pub leases_expired: IntCounter,
    pub timeouts: IntCounterVec,
    pub dispatch_latency: Histogram,
    pub sweep_duration: Histogram,
    pub queue_depth: IntGaugeVec,
}

impl Metrics {
    pub fn new(registry: &Registry) -> Self {
        let metrics = Self {
            leases_granted: IntCounter::new("scheduler_leases_granted_total", "Leases granted")
                .expect("metric"),
            leases_expired: IntCounter::new(
                "scheduler_leases_expired_total",
                "Leases that ran out",
            )
            .expect("metric"),
            timeouts: IntCounterVec::new(
                Opts::new(
                    "scheduler_timeouts_total",
                    "Timeouts and forced cancels by kind",
                ),
                &["kind"],
            )
            .expect("metric"),
            dispatch_latency: Histogram::with_opts(
                HistogramOpts::new(
                    "scheduler_dispatch_latency_seconds",
                    "Time from a job entering the queue to its lease being granted",
                )
                .buckets(vec![
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0, 300.0,
                ]),
            )
            .expect("metric"),
            sweep_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "scheduler_sweep_duration_seconds",
                    "Duration of a safety-net sweep",
                )
                .buckets(vec![0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0]),
            )
            .expect("metric"),
            queue_depth: IntGaugeVec::new(
                Opts::new("scheduler_queue_depth", "Queued jobs per org and queue"),
                &["org", "queue"],
            )
            .expect("metric"),
        };
        for collector in [
            Box::new(metrics.leases_granted.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(metrics.leases_expired.clone()),
            Box::new(metrics.timeouts.clone()),
            Box::new(metrics.dispatch_latency.clone()),
            Box::new(metrics.sweep_duration.clone()),
            Box::new(metrics.queue_depth.clone()),
        ] {
            let _ = registry.register(collector);
        }
        // Every kind is exported from the start (at zero).
        for kind in [
            "run_timeout",
            "deadline",
            "schedule_to_start",
            "cancel_forced",
        ] {
            metrics.timeouts.with_label_values(&[kind]);
        }
        metrics
    }
}
