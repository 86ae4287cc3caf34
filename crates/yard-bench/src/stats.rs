//! Clock and percentiles. Every timestamp is Unix time in nanoseconds from
//! this one process, so a time embedded in a job's metadata or a log line
//! and the time it comes back can be subtracted directly.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// Unix time in nanoseconds.
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Latency summary in milliseconds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Latency {
    pub n: usize,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

impl Latency {
    /// Nearest-rank percentiles (the peer kit's definition) over nanosecond samples.
    pub fn from_ns(samples: &[u64]) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        let mut sorted = samples.to_vec();
        sorted.sort_unstable();
        let rank = |p: f64| {
            let i = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
            sorted[i] as f64 / 1e6
        };
        let mean = sorted.iter().map(|&v| v as f64).sum::<f64>() / sorted.len() as f64 / 1e6;
        Self {
            n: sorted.len(),
            p50_ms: rank(0.50),
            p90_ms: rank(0.90),
            p99_ms: rank(0.99),
            max_ms: rank(1.0),
            mean_ms: mean,
        }
    }

    pub fn short(&self) -> String {
        if self.n == 0 {
            return "no samples".into();
        }
        format!("p50 {:.1} ms, p99 {:.1} ms", self.p50_ms, self.p99_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let samples: Vec<u64> = (1..=100).map(|ms| ms * 1_000_000).collect();
        let l = Latency::from_ns(&samples);
        assert_eq!(l.n, 100);
        assert_eq!(l.p50_ms, 50.0);
        assert_eq!(l.p99_ms, 99.0);
        assert_eq!(l.max_ms, 100.0);
        assert!((l.mean_ms - 50.5).abs() < 1e-9);
        assert_eq!(Latency::from_ns(&[]).n, 0);
    }
}
