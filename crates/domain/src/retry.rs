//! Retry policy, modelled on Temporal's `RetryPolicy` fields, with full
//! jitter and two separate budgets: application failures (the job ran and
//! failed, e.g. a non-zero exit) and infrastructure failures (a lost lease,
//! a vanished agent), because a flaky fleet must not burn a job's own budget.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::validation::{Errors, limits};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryPolicy {
    /// Delay ceiling before the first retry.
    pub initial_interval_ms: u64,
    /// Growth of the ceiling per further retry (>= 1).
    pub backoff_coefficient: f64,
    /// Cap on the ceiling; 0 means 100 × `initial_interval_ms` (Temporal's default).
    pub maximum_interval_ms: u64,
    /// Attempts allowed to fail for application reasons, counting the first
    /// run; 1 = no retries, 0 = unlimited (bounded by the job's deadline).
    pub maximum_attempts: u32,
    /// Attempts allowed to be lost to infrastructure (lease expired, agent
    /// vanished); 0 = unlimited.
    pub maximum_infrastructure_attempts: u32,
    /// Application error kinds that are never retried (exact match).
    pub non_retryable_error_kinds: Vec<String>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            initial_interval_ms: 1_000,
            backoff_coefficient: 2.0,
            maximum_interval_ms: 0,
            maximum_attempts: 3,
            maximum_infrastructure_attempts: 10,
            non_retryable_error_kinds: Vec::new(),
        }
    }
}

/// Why an attempt ended without success.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "class", rename_all = "snake_case")]
pub enum Failure {
    /// The job ran and failed: non-zero exit or an error the agent reported.
    Application { error_kind: Option<String> },
    /// The platform lost the attempt: lease expired, agent vanished,
    /// assignment never started. Not the job's fault.
    Infrastructure { reason: InfraReason },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InfraReason {
    LeaseExpired,
    AgentVanished,
    AgentRevoked,
}

impl InfraReason {
    pub fn as_str(self) -> &'static str {
        match self {
            InfraReason::LeaseExpired => "lease_expired",
            InfraReason::AgentVanished => "agent_vanished",
            InfraReason::AgentRevoked => "agent_revoked",
        }
    }
}

/// How many attempts of each class a job has used so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailureCounts {
    pub application: u32,
    pub infrastructure: u32,
}

impl FailureCounts {
    pub fn record(self, failure: &Failure) -> Self {
        match failure {
            Failure::Application { .. } => Self {
                application: self.application + 1,
                ..self
            },
            Failure::Infrastructure { .. } => Self {
                infrastructure: self.infrastructure + 1,
                ..self
            },
        }
    }
}

/// What happens after a failed attempt.
#[derive(Clone, Debug, PartialEq)]
pub enum RetryDecision {
    /// Queue again after `delay`.
    Retry { delay: Duration },
    /// The error kind is marked non-retryable: the job fails for good.
    NonRetryable,
    /// A budget is spent: the job goes to the dead-letter set.
    Exhausted,
}

impl RetryPolicy {
    /// Upper bound of the delay before retry number `retry` (1-based):
    /// `initial × coefficient^(retry-1)`, capped at the maximum interval.
    pub fn delay_ceiling(&self, retry: u32) -> Duration {
        let initial = self.initial_interval_ms as f64;
        let exponent = retry.saturating_sub(1).min(1_000) as i32;
        let raw = initial * self.backoff_coefficient.max(1.0).powi(exponent);
        let cap = self.effective_maximum_interval_ms() as f64;
        let ms = if raw.is_finite() { raw.min(cap) } else { cap };
        Duration::from_millis(ms.max(0.0) as u64)
    }

    /// Full jitter: uniformly anywhere in `[0, ceiling]`. `unit` is a random
    /// number in `[0, 1)` from the caller, which keeps this function pure.
    pub fn delay_with_full_jitter(&self, retry: u32, unit: f64) -> Duration {
        let ceiling = self.delay_ceiling(retry).as_millis() as f64;
        Duration::from_millis((ceiling * unit.clamp(0.0, 1.0)).round() as u64)
    }

    pub fn effective_maximum_interval_ms(&self) -> u64 {
        if self.maximum_interval_ms == 0 {
            self.initial_interval_ms.saturating_mul(100)
        } else {
            self.maximum_interval_ms
        }
    }

    /// Decide what follows a failure, given the counts *including* it.
    pub fn decide(&self, failure: &Failure, counts: FailureCounts, unit: f64) -> RetryDecision {
        let (used, budget) = match failure {
            Failure::Application { error_kind } => {
                if let Some(kind) = error_kind
                    && self.non_retryable_error_kinds.iter().any(|k| k == kind)
                {
                    return RetryDecision::NonRetryable;
                }
                (counts.application, self.maximum_attempts)
            }
            Failure::Infrastructure { .. } => {
                (counts.infrastructure, self.maximum_infrastructure_attempts)
            }
        };
        if budget != 0 && used >= budget {
            return RetryDecision::Exhausted;
        }
        let retry_number = counts.application + counts.infrastructure;
        RetryDecision::Retry {
            delay: self.delay_with_full_jitter(retry_number.max(1), unit),
        }
    }

    pub fn validate(&self, field: &str) -> Result<(), crate::DomainError> {
        let mut errors = Errors::default();
        if self.initial_interval_ms > limits::DURATION_MAX_MS {
            errors.push(
                format!("{field}.initial_interval_ms"),
                "must be at most 30 days",
            );
        }
        if !self.backoff_coefficient.is_finite()
            || self.backoff_coefficient < 1.0
            || self.backoff_coefficient > 100.0
        {
            errors.push(
                format!("{field}.backoff_coefficient"),
                "must be between 1 and 100",
            );
        }
        if self.maximum_interval_ms > limits::DURATION_MAX_MS {
            errors.push(
                format!("{field}.maximum_interval_ms"),
                "must be at most 30 days",
            );
        }
        if self.maximum_interval_ms != 0 && self.maximum_interval_ms < self.initial_interval_ms {
            errors.push(
                format!("{field}.maximum_interval_ms"),
                "must be 0 (default) or at least initial_interval_ms",
            );
        }
        if self.maximum_attempts > 1_000 {
            errors.push(format!("{field}.maximum_attempts"), "must be at most 1000");
        }
        if self.maximum_infrastructure_attempts > 1_000 {
            errors.push(
                format!("{field}.maximum_infrastructure_attempts"),
                "must be at most 1000",
            );
        }
        if self.non_retryable_error_kinds.len() > 64
            || self
                .non_retryable_error_kinds
                .iter()
                .any(|k| k.is_empty() || k.len() > 128)
        {
            errors.push(
                format!("{field}.non_retryable_error_kinds"),
                "at most 64 kinds, each 1 to 128 characters",
            );
        }
        errors.into_result()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn app(kind: Option<&str>) -> Failure {
        Failure::Application {
            error_kind: kind.map(str::to_owned),
        }
    }

    const LOST: Failure = Failure::Infrastructure {
        reason: InfraReason::LeaseExpired,
    };

    #[test]
    fn ceiling_grows_geometrically_then_caps() {
        let policy = RetryPolicy {
            initial_interval_ms: 100,
            backoff_coefficient: 2.0,
            maximum_interval_ms: 1_000,
            ..RetryPolicy::default()
        };
        let ceilings: Vec<u64> = (1..=6)
            .map(|n| policy.delay_ceiling(n).as_millis() as u64)
            .collect();
        assert_eq!(ceilings, [100, 200, 400, 800, 1_000, 1_000]);
    }

    #[test]
    fn zero_maximum_interval_means_hundred_times_initial() {
        let policy = RetryPolicy {
            initial_interval_ms: 10,
            maximum_interval_ms: 0,
            ..RetryPolicy::default()
        };
        assert_eq!(policy.delay_ceiling(50), Duration::from_millis(1_000));
    }

    #[test]
    fn full_jitter_spans_zero_to_ceiling() {
        let policy = RetryPolicy::default();
        assert_eq!(policy.delay_with_full_jitter(3, 0.0), Duration::ZERO);
        assert_eq!(
            policy.delay_with_full_jitter(3, 1.0),
            policy.delay_ceiling(3)
        );
        assert_eq!(
            policy.delay_with_full_jitter(3, 0.5),
            Duration::from_millis(2_000)
        );
    }

    #[test]
    fn application_budget_counts_the_first_run() {
        let policy = RetryPolicy {
            maximum_attempts: 2,
            ..RetryPolicy::default()
        };
        let after_first = FailureCounts::default().record(&app(None));
        assert!(matches!(
            policy.decide(&app(None), after_first, 0.5),
            RetryDecision::Retry { .. }
        ));
        let after_second = after_first.record(&app(None));
        assert_eq!(
            policy.decide(&app(None), after_second, 0.5),
            RetryDecision::Exhausted
        );
    }

    #[test]
    fn infrastructure_failures_do_not_spend_the_application_budget() {
        let policy = RetryPolicy {
            maximum_attempts: 1,
            maximum_infrastructure_attempts: 3,
            ..RetryPolicy::default()
        };
        let mut counts = FailureCounts::default();
        for _ in 0..2 {
            counts = counts.record(&LOST);
            assert!(matches!(
                policy.decide(&LOST, counts, 0.1),
                RetryDecision::Retry { .. }
            ));
        }
        assert_eq!(counts.application, 0);
        counts = counts.record(&LOST);
        assert_eq!(policy.decide(&LOST, counts, 0.1), RetryDecision::Exhausted);
    }

    #[test]
    fn non_retryable_kind_fails_at_once() {
        let policy = RetryPolicy {
            maximum_attempts: 0,
            non_retryable_error_kinds: vec!["bad_input".into()],
            ..RetryPolicy::default()
        };
        let counts = FailureCounts::default().record(&app(Some("bad_input")));
        assert_eq!(
            policy.decide(&app(Some("bad_input")), counts, 0.5),
            RetryDecision::NonRetryable
        );
        assert!(matches!(
            policy.decide(&app(Some("flaky")), counts, 0.5),
            RetryDecision::Retry { .. }
        ));
    }

    #[test]
    fn unlimited_budget_never_exhausts() {
        let policy = RetryPolicy {
            maximum_attempts: 0,
            ..RetryPolicy::default()
        };
        let counts = FailureCounts {
            application: 10_000,
            infrastructure: 0,
        };
        assert!(matches!(
            policy.decide(&app(None), counts, 0.5),
            RetryDecision::Retry { .. }
        ));
    }

    #[test]
    fn validation_rejects_nonsense() {
        let bad = RetryPolicy {
            backoff_coefficient: 0.5,
            maximum_interval_ms: 10,
            initial_interval_ms: 100,
            ..RetryPolicy::default()
        };
        match bad.validate("retry_policy") {
            Err(crate::DomainError::Invalid(errors)) => assert_eq!(errors.len(), 2),
            other => panic!("expected two errors, got {other:?}"),
        }
        assert!(RetryPolicy::default().validate("retry_policy").is_ok());
    }

    proptest! {
        #[test]
        fn jittered_delay_stays_within_policy_bounds(
            initial in 0u64..100_000,
            coefficient in 1.0f64..10.0,
            cap_factor in 1u64..200,
            retry in 1u32..200,
            unit in 0.0f64..1.0,
        ) {
            let policy = RetryPolicy {
                initial_interval_ms: initial,
                backoff_coefficient: coefficient,
                maximum_interval_ms: initial.saturating_mul(cap_factor),
                ..RetryPolicy::default()
            };
            let delay = policy.delay_with_full_jitter(retry, unit);
            prop_assert!(delay <= policy.delay_ceiling(retry));
            prop_assert!(delay.as_millis() as u64 <= policy.effective_maximum_interval_ms());
        }

        #[test]
        fn ceiling_never_decreases_with_more_retries(
            initial in 1u64..10_000,
            coefficient in 1.0f64..5.0,
            retry in 1u32..100,
        ) {
            let policy = RetryPolicy {
                initial_interval_ms: initial,
                backoff_coefficient: coefficient,
                ..RetryPolicy::default()
            };
            prop_assert!(policy.delay_ceiling(retry) <= policy.delay_ceiling(retry + 1));
        }
    }
}
