//! The API's request and response bodies (documented in `/openapi.json`).

use chrono::{DateTime, Utc};
use db::jobs::Job;
use domain::job::{ConcurrencyKey, JobStatus, Labels, NewJob, Payload, QueueName, Timeouts};
use domain::org::OrgSettings;
use domain::retry::RetryPolicy;
use domain::validation::Errors;
use domain::{DomainError, RepositoryId};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

/// A job to create. Unset fields take the org's defaults.
#[derive(Clone, Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateJob {
    /// Shell command for the agent to run.
    pub command: Option<String>,
    /// Prompt for the agent's executor (e.g. an AI coding agent).
    pub prompt: Option<String>,
    /// Queue name; `rework` and `backlog` always exist. Default: the org's default queue.
    pub queue: Option<String>,
    /// -1000..=1000, higher runs sooner within a queue. Default 0.
    pub priority: Option<i32>,
    pub repository_id: Option<Uuid>,
    /// Labels an agent must have, e.g. `gpu`, `os=linux`.
    #[serde(default)]
    pub labels: Vec<String>,
    #[schema(value_type = Option<Object>)]
    pub concurrency: Option<ConcurrencyKey>,
    #[serde(default)]
    pub requires_approval: bool,
    /// Temporal-style retry policy; default: the org's.
    #[schema(value_type = Option<Object>)]
    pub retry_policy: Option<RetryPolicy>,
    #[schema(value_type = Option<Object>)]
    pub timeouts: Option<Timeouts>,
    /// Do not start before this time.
    pub run_at: Option<DateTime<Utc>>,
    /// Free-form JSON object kept with the job.
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<serde_json::Value>,
}

impl CreateJob {
    /// Validates and fills defaults from the org's settings.
    pub fn into_new_job(
        self,
        settings: &OrgSettings,
        field_prefix: &str,
    ) -> Result<NewJob, DomainError> {
        let mut errors = Errors::default();
        let queue = match self.queue {
            None => settings.default_queue.clone(),
            Some(raw) => match QueueName::parse(raw) {
                Ok(q) => q,
                Err(e) => {
                    errors.push(format!("{field_prefix}queue"), e.message);
                    QueueName::backlog()
                }
            },
        };
        errors.into_result()?;
        let job = NewJob {
            queue,
            priority: self.priority.unwrap_or(0),
            repository_id: self.repository_id.map(RepositoryId),
            required_labels: Labels::new(self.labels),
            concurrency: self.concurrency,
            requires_approval: self.requires_approval,
            retry_policy: self
                .retry_policy
                .unwrap_or_else(|| settings.default_retry_policy.clone()),
            timeouts: self.timeouts.unwrap_or_default(),
            run_at: self.run_at,
            payload: Payload {
                prompt: self.prompt,
                command: self.command,
            },
            metadata: self.metadata.unwrap_or_else(|| serde_json::json!({})),
        };
        job.validate().map_err(|e| match e {
            DomainError::Invalid(list) if !field_prefix.is_empty() => DomainError::Invalid(
                list.into_iter()
                    .map(|f| {
                        domain::validation::FieldError::new(
                            format!("{field_prefix}{}", f.field),
                            f.message,
                        )
                    })
                    .collect(),
            ),
            other => other,
        })?;
        Ok(job)
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateJobs {
    /// 1 to 1,000 jobs, created together or not at all.
    pub jobs: Vec<CreateJob>,
}

/// The lease an agent holds on a job.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct LeaseView {
    pub agent_id: Uuid,
    pub epoch: i64,
    pub leased_at: Option<DateTime<Utc>>,
    pub expires_at: Option<DateTime<Utc>>,
}

#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct JobView {
    pub id: Uuid,
    pub org_id: String,
    pub repository_id: Option<Uuid>,
    pub queue: String,
    pub priority: i32,
    #[schema(value_type = String)]
    pub status: JobStatus,
    pub labels: Vec<String>,
    pub concurrency_key: Option<String>,
    pub concurrency_limit: Option<i32>,
    pub requires_approval: bool,
    pub command: Option<String>,
    pub prompt: Option<String>,
    #[schema(value_type = Object)]
    pub metadata: serde_json::Value,
    #[schema(value_type = Object)]
    pub retry_policy: RetryPolicy,
    pub run_at: DateTime<Utc>,
    pub deadline_at: Option<DateTime<Utc>>,
    /// Number of the current (or last) attempt.
    pub attempt: u32,
    /// Current lease epoch (0 = never leased).
    pub epoch: i64,
    pub application_failures: i32,
    pub infrastructure_failures: i32,
    pub cancel_reason: Option<String>,
    pub lease: Option<LeaseView>,
    pub exit_code: Option<i32>,
    pub error_kind: Option<String>,
    pub error_message: Option<String>,
    pub created_by: Option<String>,
    pub created_at: DateTime<Utc>,
    pub queued_at: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
}

impl From<&Job> for JobView {
    fn from(job: &Job) -> Self {
        let lifecycle = job.lifecycle();
        let payload: Payload = serde_json::from_value(job.payload.clone()).unwrap_or_default();
        let lease = lifecycle.status.holds_lease().then(|| LeaseView {
            agent_id: job.agent_id.unwrap_or_default(),
            epoch: job.lease_epoch,
            leased_at: job.leased_at,
            expires_at: job.lease_expires_at,
        });
        let attempt = if lifecycle.status.holds_lease() || lifecycle.epoch == 0 {
            lifecycle.attempt()
        } else {
            lifecycle.attempt().saturating_sub(1).max(1)
        };
        Self {
            id: job.id,
            org_id: job.org_id.clone(),
            repository_id: job.repository_id,
            queue: job.queue.clone(),
            priority: job.priority,
            status: lifecycle.status,
            labels: job.required_labels.clone(),
            concurrency_key: job.concurrency_key.clone(),
            concurrency_limit: job.concurrency_limit,
            requires_approval: job.requires_approval,
            command: payload.command,
            prompt: payload.prompt,
            metadata: job.metadata.clone(),
            retry_policy: job.retry_policy(),
            run_at: job.run_at,
            deadline_at: job.deadline_at,
            attempt,
            epoch: job.lease_epoch,
            application_failures: job.app_failures,
            infrastructure_failures: job.infra_failures,
            cancel_reason: job.cancel_reason.clone(),
            lease,
            exit_code: job.exit_code,
            error_kind: job.error_kind.clone(),
            error_message: job.error_message.clone(),
            created_by: job.created_by.clone(),
            created_at: job.created_at,
            queued_at: job.queued_at,
            started_at: job.started_at,
            finished_at: job.finished_at,
            updated_at: job.updated_at,
        }
    }
}

#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct AttemptView {
    pub epoch: i64,
    pub attempt: i32,
    pub agent_id: Uuid,
    pub leased_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub ended_at: DateTime<Utc>,
    /// succeeded, failed, lost, released, cancelled or timed_out.
    pub outcome: String,
    pub exit_code: Option<i32>,
    pub error_kind: Option<String>,
    pub error_message: Option<String>,
}

#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct LogLineView {
    pub seq: i64,
    pub stream: String,
    pub at: DateTime<Utc>,
    pub line: String,
}

impl From<domain::events::LogLine> for LogLineView {
    fn from(line: domain::events::LogLine) -> Self {
        Self {
            seq: line.seq,
            stream: line.stream.as_str().to_owned(),
            at: line.at,
            line: line.line,
        }
    }
}

/// A job with its history, its place in the queue and its last log lines.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct JobDetail {
    #[serde(flatten)]
    pub job: JobView,
    pub attempts: Vec<AttemptView>,
    /// 1-based place in the org's dispatch order, while queued and due.
    pub queue_position: Option<u64>,
    /// Why a queued job is not running yet.
    #[schema(value_type = Option<Object>)]
    pub blocked_reason: Option<domain::scheduling::BlockReason>,
    pub log_tail: Vec<LogLineView>,
}

#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct JobPage {
    pub items: Vec<JobView>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<Uuid>,
}

#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct LogPage {
    pub lines: Vec<LogLineView>,
    /// Pass as `after_seq` for the next page.
    pub next_after_seq: i64,
}

#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct JobList {
    pub jobs: Vec<JobView>,
}

/// An RFC 9457 problem document, the body of every error response.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct ProblemDoc {
    /// Stable identifier of the kind of problem (a URI).
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub detail: Option<String>,
    /// Per-field validation errors.
    pub errors: Option<Vec<FieldErrorDoc>>,
}

#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct FieldErrorDoc {
    pub field: String,
    pub message: String,
}
