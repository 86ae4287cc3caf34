//! Jobs: what a client submits ([`NewJob`]), the status set, queues, labels,
//! concurrency keys and timeouts.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::ids::RepositoryId;
use crate::retry::RetryPolicy;
use crate::validation::{Errors, FieldError, check_token, limits};

/// Every state a job can be in. See [`crate::state`] for the transitions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    /// Waiting for a human to approve it; never leased in this state.
    PendingApproval,
    /// Eligible for assignment once its run-at time has come.
    Queued,
    /// Assigned to an agent that has not yet acknowledged it.
    Leased,
    /// Acknowledged and running on an agent.
    Running,
    /// Cancellation (by a user or a timeout) pushed to the agent, not yet confirmed.
    CancelRequested,
    Succeeded,
    /// Failed with a non-retryable error.
    Failed,
    Cancelled,
    TimedOut,
    /// Retry budget spent: parked in the dead-letter set until redriven.
    Dead,
}

impl JobStatus {
    pub const ALL: [JobStatus; 10] = [
        JobStatus::PendingApproval,
        JobStatus::Queued,
        JobStatus::Leased,
        JobStatus::Running,
        JobStatus::CancelRequested,
        JobStatus::Succeeded,
        JobStatus::Failed,
        JobStatus::Cancelled,
        JobStatus::TimedOut,
        JobStatus::Dead,
    ];

    /// States that hold a lease: an agent may be working on the job.
    pub const LEASED: [JobStatus; 3] = [
        JobStatus::Leased,
        JobStatus::Running,
        JobStatus::CancelRequested,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::PendingApproval => "pending_approval",
            JobStatus::Queued => "queued",
            JobStatus::Leased => "leased",
            JobStatus::Running => "running",
            JobStatus::CancelRequested => "cancel_requested",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
            JobStatus::TimedOut => "timed_out",
            JobStatus::Dead => "dead",
        }
    }

    /// A terminal job is finished: no agent, scheduler or timeout event
    /// changes it. Only an operator's explicit retry or redrive reopens it.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobStatus::Succeeded
                | JobStatus::Failed
                | JobStatus::Cancelled
                | JobStatus::TimedOut
                | JobStatus::Dead
        )
    }

    pub fn holds_lease(self) -> bool {
        Self::LEASED.contains(&self)
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobStatus {
    type Err = FieldError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobStatus::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| FieldError::new("status", format!("unknown job status '{s}'")))
    }
}

/// A queue within an organization. `rework` and `backlog` always exist;
/// others are created by use.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct QueueName(String);

impl QueueName {
    pub const REWORK: &'static str = "rework";
    pub const BACKLOG: &'static str = "backlog";

    pub fn parse(raw: impl Into<String>) -> Result<Self, FieldError> {
        let raw = raw.into();
        check_token("queue", &raw, limits::QUEUE_NAME_MAX_LEN)?;
        Ok(Self(raw))
    }

    pub fn backlog() -> Self {
        Self(Self::BACKLOG.to_owned())
    }

    pub fn rework() -> Self {
        Self(Self::REWORK.to_owned())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for QueueName {
    type Error = FieldError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(value)
    }
}

impl From<QueueName> for String {
    fn from(q: QueueName) -> Self {
        q.0
    }
}

impl fmt::Display for QueueName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A set of labels (`gpu`, `os=linux`). A job requires a set; an agent offers one.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Labels(pub BTreeSet<String>);

impl Labels {
    pub fn new<I, S>(labels: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self(labels.into_iter().map(Into::into).collect())
    }

    /// Every label required here is offered by `offered`.
    pub fn satisfied_by(&self, offered: &Labels) -> bool {
        self.0.is_subset(&offered.0)
    }

    pub fn validate(&self, field: &str, errors: &mut Errors) {
        if self.0.len() > limits::LABELS_MAX {
            errors.push(field, format!("at most {} labels", limits::LABELS_MAX));
        }
        for (i, label) in self.0.iter().enumerate() {
            errors.check(check_token(
                &format!("{field}[{i}]"),
                label,
                limits::LABEL_MAX_LEN,
            ));
        }
    }

    pub fn to_vec(&self) -> Vec<String> {
        self.0.iter().cloned().collect()
    }
}

/// Jobs sharing a key run at most `limit` at a time (1 = mutex). Slots are
/// held by leases, so an expired lease frees its slot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConcurrencyKey {
    pub key: String,
    #[serde(default = "one")]
    pub limit: u32,
}

fn one() -> u32 {
    1
}

/// Optional time limits, Temporal's trio.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Timeouts {
    /// Longest wait in the queue for one attempt; never retried.
    pub schedule_to_start_ms: Option<u64>,
    /// Longest run of one attempt: cancelled, then timed out.
    pub run_timeout_ms: Option<u64>,
    /// Overall budget from creation, across all attempts.
    pub deadline_ms: Option<u64>,
}

/// What the agent is asked to do: a shell command, a prompt for a
/// configurable executor (an AI coding agent), or both.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Payload {
    pub prompt: Option<String>,
    pub command: Option<String>,
}

/// A job as submitted, before it has an id or status.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NewJob {
    pub queue: QueueName,
    pub priority: i32,
    pub repository_id: Option<RepositoryId>,
    pub required_labels: Labels,
    pub concurrency: Option<ConcurrencyKey>,
    pub requires_approval: bool,
    pub retry_policy: RetryPolicy,
    pub timeouts: Timeouts,
    pub run_at: Option<DateTime<Utc>>,
    pub payload: Payload,
    pub metadata: serde_json::Value,
}

impl NewJob {
    /// Checks every field and reports all problems at once.
    pub fn validate(&self) -> Result<(), crate::DomainError> {
        let mut errors = Errors::default();
        if !(limits::PRIORITY_MIN..=limits::PRIORITY_MAX).contains(&self.priority) {
            errors.push(
                "priority",
                format!(
                    "must be between {} and {}",
                    limits::PRIORITY_MIN,
                    limits::PRIORITY_MAX
                ),
            );
        }
        self.required_labels.validate("labels", &mut errors);
        if let Some(concurrency) = &self.concurrency {
            errors.check(check_token(
                "concurrency.key",
                &concurrency.key,
                limits::CONCURRENCY_KEY_MAX_LEN,
            ));
            if concurrency.limit == 0 || concurrency.limit > limits::CONCURRENCY_LIMIT_MAX {
                errors.push(
                    "concurrency.limit",
                    format!("must be between 1 and {}", limits::CONCURRENCY_LIMIT_MAX),
                );
            }
        }
        if let Err(crate::DomainError::Invalid(list)) = self.retry_policy.validate("retry_policy") {
            for e in list {
                errors.push(e.field, e.message);
            }
        }
        for (field, value) in [
            (
                "timeouts.schedule_to_start_ms",
                self.timeouts.schedule_to_start_ms,
            ),
            ("timeouts.run_timeout_ms", self.timeouts.run_timeout_ms),
            ("timeouts.deadline_ms", self.timeouts.deadline_ms),
        ] {
            if let Some(ms) = value
                && (ms == 0 || ms > limits::DURATION_MAX_MS)
            {
                errors.push(field, "must be between 1 ms and 30 days");
            }
        }
        match (&self.payload.prompt, &self.payload.command) {
            (None, None) => errors.push("payload", "needs a prompt, a command, or both"),
            (prompt, command) => {
                if let Some(p) = prompt {
                    check_text(&mut errors, "payload.prompt", p, limits::PROMPT_MAX_BYTES);
                }
                if let Some(c) = command {
                    check_text(&mut errors, "payload.command", c, limits::COMMAND_MAX_BYTES);
                }
            }
        }
        if !self.metadata.is_object() {
            errors.push("metadata", "must be a JSON object");
        } else if self.metadata.to_string().len() > limits::METADATA_MAX_BYTES {
            errors.push(
                "metadata",
                format!("must be at most {} bytes", limits::METADATA_MAX_BYTES),
            );
        }
        errors.into_result()
    }

    /// The status a new job starts in.
    pub fn initial_status(&self) -> JobStatus {
        if self.requires_approval {
            JobStatus::PendingApproval
        } else {
            JobStatus::Queued
        }
    }

    /// Absolute overall deadline, counted from creation.
    pub fn deadline_at(&self, created_at: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.timeouts
            .deadline_ms
            .map(|ms| created_at + chrono::Duration::milliseconds(ms as i64))
    }
}

fn check_text(errors: &mut Errors, field: &str, value: &str, max: usize) {
    if value.trim().is_empty() {
        errors.push(field, "must not be blank");
    } else if value.contains('\0') {
        errors.push(field, "must not contain NUL characters");
    } else if value.len() > max {
        errors.push(field, format!("must be at most {max} bytes"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn command_job(cmd: &str) -> NewJob {
        NewJob {
            queue: QueueName::backlog(),
            priority: 0,
            repository_id: None,
            required_labels: Labels::default(),
            concurrency: None,
            requires_approval: false,
            retry_policy: RetryPolicy::default(),
            timeouts: Timeouts::default(),
            run_at: None,
            payload: Payload {
                prompt: None,
                command: Some(cmd.into()),
            },
            metadata: serde_json::json!({}),
        }
    }

    #[test]
    fn status_strings_round_trip() {
        for status in JobStatus::ALL {
            assert_eq!(status.as_str().parse::<JobStatus>(), Ok(status));
            let json = serde_json::to_string(&status).expect("serialize");
            assert_eq!(json, format!("\"{}\"", status.as_str()));
        }
        assert!("nope".parse::<JobStatus>().is_err());
    }

    #[test]
    fn exactly_five_statuses_are_terminal() {
        let terminal: Vec<_> = JobStatus::ALL
            .into_iter()
            .filter(|s| s.is_terminal())
            .collect();
        assert_eq!(terminal.len(), 5);
        assert!(terminal.iter().all(|s| !s.holds_lease()));
    }

    #[test]
    fn labels_match_as_subset() {
        let required = Labels::new(["gpu", "os=linux"]);
        assert!(required.satisfied_by(&Labels::new(["gpu", "os=linux", "big"])));
        assert!(!required.satisfied_by(&Labels::new(["gpu"])));
        assert!(Labels::default().satisfied_by(&Labels::default()));
    }

    #[test]
    fn a_valid_job_passes() {
        assert!(command_job("echo hi").validate().is_ok());
    }

    #[test]
    fn invalid_fields_are_all_reported() {
        let mut job = command_job("echo");
        job.priority = 5_000;
        job.payload = Payload::default();
        job.required_labels = Labels::new(["OK?"]);
        job.concurrency = Some(ConcurrencyKey {
            key: "deploy".into(),
            limit: 0,
        });
        job.metadata = serde_json::json!([1]);
        job.timeouts.run_timeout_ms = Some(0);
        let Err(crate::DomainError::Invalid(errors)) = job.validate() else {
            panic!("expected validation errors");
        };
        let fields: Vec<_> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "priority",
                "labels[0]",
                "concurrency.limit",
                "timeouts.run_timeout_ms",
                "payload",
                "metadata"
            ]
        );
    }

    #[test]
    fn oversized_prompt_is_rejected() {
        let mut job = command_job("x");
        job.payload.prompt = Some("p".repeat(limits::PROMPT_MAX_BYTES + 1));
        assert!(job.validate().is_err());
    }

    #[test]
    fn approval_decides_the_initial_status() {
        let mut job = command_job("x");
        assert_eq!(job.initial_status(), JobStatus::Queued);
        job.requires_approval = true;
        assert_eq!(job.initial_status(), JobStatus::PendingApproval);
    }

    #[test]
    fn queue_names_are_validated() {
        assert!(QueueName::parse("rework").is_ok());
        assert!(QueueName::parse("Nightly Builds").is_err());
    }
}
