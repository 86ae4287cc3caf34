//! Organizations (tenants) and their settings, and repositories.

use serde::{Deserialize, Serialize};

use crate::job::QueueName;
use crate::retry::RetryPolicy;
use crate::validation::{Errors, check_name, limits};

/// When jobs need a human's approval before they may run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApprovalPolicy {
    /// Only jobs that ask for it.
    #[default]
    PerJob,
    /// Every job in the org.
    Always,
}

impl ApprovalPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            ApprovalPolicy::PerJob => "per_job",
            ApprovalPolicy::Always => "always",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        match raw {
            "per_job" => Some(ApprovalPolicy::PerJob),
            "always" => Some(ApprovalPolicy::Always),
            _ => None,
        }
    }

    pub fn requires_approval(self, job_asks: bool) -> bool {
        job_asks || self == ApprovalPolicy::Always
    }
}

/// Per-organization settings. Organizations themselves come from the
/// identity provider's token; this row is created on first use.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OrgSettings {
    /// Most jobs of the org leased at once; `None` = unlimited.
    pub max_concurrent_jobs: Option<u32>,
    pub default_retry_policy: RetryPolicy,
    pub default_queue: QueueName,
    pub approval_policy: ApprovalPolicy,
    /// Queues in the order they are served; queues not listed come after,
    /// by name.
    pub queue_precedence: Vec<QueueName>,
}

impl Default for OrgSettings {
    fn default() -> Self {
        Self {
            max_concurrent_jobs: None,
            default_retry_policy: RetryPolicy::default(),
            default_queue: QueueName::backlog(),
            approval_policy: ApprovalPolicy::PerJob,
            queue_precedence: vec![QueueName::rework(), QueueName::backlog()],
        }
    }
}

impl OrgSettings {
    pub fn validate(&self) -> Result<(), crate::DomainError> {
        let mut errors = Errors::default();
        if self
            .max_concurrent_jobs
            .is_some_and(|n| n == 0 || n > limits::ORG_CONCURRENCY_MAX)
        {
            errors.push(
                "max_concurrent_jobs",
                format!(
                    "must be between 1 and {}, or null for unlimited",
                    limits::ORG_CONCURRENCY_MAX
                ),
            );
        }
        if let Err(crate::DomainError::Invalid(list)) =
            self.default_retry_policy.validate("default_retry_policy")
        {
            for e in list {
                errors.push(e.field, e.message);
            }
        }
        if self.queue_precedence.len() > 32 {
            errors.push("queue_precedence", "at most 32 queues");
        }
        errors.into_result()
    }

    /// Rank of a queue in service order (lower is served first).
    pub fn queue_rank(&self, queue: &QueueName) -> i16 {
        self.queue_precedence
            .iter()
            .position(|q| q == queue)
            .map_or(self.queue_precedence.len() as i16, |i| i as i16)
    }
}

/// A repository jobs can belong to, with its own concurrency limit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepositorySpec {
    pub name: String,
    pub url: Option<String>,
    /// Most jobs of this repository leased at once; `None` = unlimited.
    pub max_concurrent_jobs: Option<u32>,
}

impl RepositorySpec {
    pub fn validate(&self) -> Result<(), crate::DomainError> {
        let mut errors = Errors::default();
        errors.check(check_name("name", &self.name));
        if let Some(url) = &self.url
            && (url.is_empty() || url.len() > 2_048 || url.chars().any(char::is_whitespace))
        {
            errors.push("url", "must be 1 to 2048 characters without whitespace");
        }
        if self.max_concurrent_jobs == Some(0)
            || self
                .max_concurrent_jobs
                .is_some_and(|n| n > limits::CONCURRENCY_LIMIT_MAX)
        {
            errors.push(
                "max_concurrent_jobs",
                format!(
                    "must be between 1 and {}, or null for unlimited",
                    limits::CONCURRENCY_LIMIT_MAX
                ),
            );
        }
        errors.into_result()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rework_is_served_before_backlog_by_default() {
        let settings = OrgSettings::default();
        assert!(
            settings.queue_rank(&QueueName::rework()) < settings.queue_rank(&QueueName::backlog())
        );
        let other = QueueName::parse("nightly").expect("valid");
        assert_eq!(settings.queue_rank(&other), 2);
    }

    #[test]
    fn always_policy_requires_approval() {
        assert!(ApprovalPolicy::Always.requires_approval(false));
        assert!(!ApprovalPolicy::PerJob.requires_approval(false));
        assert!(ApprovalPolicy::PerJob.requires_approval(true));
    }

    #[test]
    fn settings_and_repositories_are_validated() {
        let mut settings = OrgSettings::default();
        assert!(settings.validate().is_ok());
        settings.max_concurrent_jobs = Some(0);
        assert!(settings.validate().is_err());
        settings.max_concurrent_jobs = Some(limits::ORG_CONCURRENCY_MAX + 1);
        assert!(
            settings.validate().is_err(),
            "beyond the limit (would overflow the column)"
        );
        let repo = RepositorySpec {
            name: "api".into(),
            url: Some("https://git.example.com/api.git".into()),
            max_concurrent_jobs: Some(0),
        };
        assert!(repo.validate().is_err());
    }
}
