//! The domain's one error type. Each transport maps it once (REST to
//! problem+json, gRPC to a `Status`, WebSocket to a close code).

use crate::job::JobStatus;
use crate::validation::FieldError;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DomainError {
    /// The job's current state does not allow the requested change.
    #[error("a job that is {from} cannot {action}")]
    InvalidTransition {
        from: JobStatus,
        action: &'static str,
    },

    /// A write carried a lease epoch that is no longer current. It changes
    /// nothing; the writer must stop working on the job.
    #[error("lease epoch {given} is stale; the job's current epoch is {current}")]
    StaleEpoch { given: u64, current: u64 },

    /// Input failed validation; every offending field is listed.
    #[error("invalid input: {}", summarize(.0))]
    Invalid(Vec<FieldError>),
}

impl DomainError {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid(vec![FieldError::new(field, message)])
    }
}

impl From<FieldError> for DomainError {
    fn from(error: FieldError) -> Self {
        Self::Invalid(vec![error])
    }
}

fn summarize(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(|e| format!("{}: {}", e.field, e.message))
        .collect::<Vec<_>>()
        .join("; ")
}
