//! Redis metrics, process-wide (one bus per process in production; every
//! `Bus` handle shares them). Registered on a service's registry by
//! `service-kit`, which prefixes the names with `switchyard_`.

use std::pin::Pin;
use std::sync::LazyLock;
use std::task::{Context, Poll};
use std::time::Instant;

use futures_util::Stream;
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry};

use crate::Channel;

struct Metrics {
    published: IntCounterVec,
    failed: IntCounterVec,
    duration: HistogramVec,
    subscribed: IntGauge,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| Metrics {
    published: IntCounterVec::new(
        Opts::new("redis_publish_total", "Redis publishes by channel kind"),
        &["channel"],
    )
    .expect("metric"),
    failed: IntCounterVec::new(
        Opts::new(
            "redis_publish_errors_total",
            "Redis publishes that failed, by channel kind",
        ),
        &["channel"],
    )
    .expect("metric"),
    duration: HistogramVec::new(
        HistogramOpts::new(
            "redis_publish_duration_seconds",
            "Redis publish latency by channel kind",
        )
        .buckets(vec![
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
        ]),
        &["channel"],
    )
    .expect("metric"),
    subscribed: IntGauge::new(
        "redis_subscribed_channels",
        "Redis pub/sub channels this process is subscribed to",
    )
    .expect("metric"),
});

/// Adds the Redis metrics to `registry`.
pub fn register(registry: &Registry) {
    let metrics = &*METRICS;
    // Every channel kind is exported from the start (at zero), so rates
    // and dashboards see the series before the first publish.
    for kind in ["scheduler_wake", "job", "org", "agent"] {
        metrics.published.with_label_values(&[kind]);
        metrics.failed.with_label_values(&[kind]);
        metrics.duration.with_label_values(&[kind]);
    }
    let _ = registry.register(Box::new(metrics.published.clone()));
    let _ = registry.register(Box::new(metrics.failed.clone()));
    let _ = registry.register(Box::new(metrics.duration.clone()));
    let _ = registry.register(Box::new(metrics.subscribed.clone()));
}

/// The gauge of subscribed channels, for subscribers that manage their own
/// pub/sub connection (the broadcaster's hub).
pub fn subscribed_channels() -> IntGauge {
    METRICS.subscribed.clone()
}

fn kind(channel: &Channel) -> &'static str {
    match channel {
        Channel::SchedulerWake => "scheduler_wake",
        Channel::Job(_) => "job",
        Channel::Org(_) => "org",
        Channel::Agent(_) => "agent",
    }
}

/// Times one publish and counts it (and its failure).
pub(crate) async fn observe_publish<T, E>(
    channel: &Channel,
    publish: impl Future<Output = Result<T, E>>,
) -> Result<T, E> {
    let started = Instant::now();
    let result = publish.await;
    let label = [kind(channel)];
    METRICS.published.with_label_values(&label).inc();
    METRICS
        .duration
        .with_label_values(&label)
        .observe(started.elapsed().as_secs_f64());
    if result.is_err() {
        METRICS.failed.with_label_values(&label).inc();
    }
    result
}

/// [`observe_publish`] for a pipeline of publishes: each counts, each
/// takes the pipeline's time, and each fails if it failed.
pub(crate) async fn observe_publishes<'a, T, E>(
    channels: impl Iterator<Item = &'a Channel>,
    publish: impl Future<Output = Result<T, E>>,
) -> Result<T, E> {
    let started = Instant::now();
    let result = publish.await;
    let elapsed = started.elapsed().as_secs_f64();
    // Counted per kind first: a label lookup hashes, and a gateway
    // publishes thousands of status events a second in a few pipelines.
    let mut per_kind: Vec<(&'static str, u64)> = Vec::with_capacity(4);
    for channel in channels {
        let kind = kind(channel);
        match per_kind.iter_mut().find(|(k, _)| *k == kind) {
            Some((_, n)) => *n += 1,
            None => per_kind.push((kind, 1)),
        }
    }
    for (kind, n) in per_kind {
        let label = [kind];
        METRICS.published.with_label_values(&label).inc_by(n);
        let duration = METRICS.duration.with_label_values(&label);
        for _ in 0..n {
            duration.observe(elapsed);
        }
        if result.is_err() {
            METRICS.failed.with_label_values(&label).inc_by(n);
        }
    }
    result
}

/// A subscription stream that counts its channels while it lives.
pub(crate) struct Counted<S> {
    inner: Pin<Box<S>>,
    channels: i64,
}

impl<S> Counted<S> {
    pub(crate) fn new(inner: S, channels: usize) -> Self {
        let channels = channels as i64;
        METRICS.subscribed.add(channels);
        Self {
            inner: Box::pin(inner),
            channels,
        }
    }
}

impl<S> Drop for Counted<S> {
    fn drop(&mut self) {
        METRICS.subscribed.sub(self.channels);
    }
}

impl<S: Stream> Stream for Counted<S> {
    type Item = S::Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}
