//! The gateway's one error type, mapped once to a gRPC [`tonic::Status`]
//! and once to an HTTP problem document.

use actix_web::http::StatusCode;
use db::DbError;
use domain::job::JobStatus;
use domain::{DomainError, JobId};
use service_kit::problem::Problem;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("{0}")]
    Unauthenticated(&'static str),
    #[error("registration refused: the token is unknown, expired, revoked or used up")]
    RegistrationRefused,
    #[error("{0}")]
    InvalidArgument(String),
    #[error("unknown job {0}")]
    UnknownJob(JobId),
    #[error("job {0} is not leased to this agent")]
    NotYourJob(JobId),
    /// The write carried an epoch that is no longer current; nothing changed.
    #[error("job {job}: lease epoch {given} is stale; the current epoch is {current}")]
    Stale {
        job: JobId,
        given: u64,
        current: u64,
    },
    #[error("job {job} is {from} and cannot {action}")]
    Transition {
        job: JobId,
        from: JobStatus,
        action: &'static str,
    },
    #[error("log chunk of {size} bytes exceeds the limit of {limit} bytes")]
    ChunkTooLarge { size: usize, limit: usize },
    #[error("log chunk starts at byte {given} but {committed} bytes are committed")]
    OffsetGap { given: u64, committed: u64 },
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("temporarily unavailable: {0}")]
    Unavailable(String),
    #[error("internal error")]
    Internal(String),
}

pub type GatewayResult<T> = Result<T, GatewayError>;

impl GatewayError {
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::InvalidArgument(message.into())
    }

    /// Maps a data-layer error for an operation on `job`.
    pub fn from_db(job: Option<JobId>, error: DbError) -> Self {
        match error {
            DbError::NotFound => match job {
                Some(job) => Self::UnknownJob(job),
                None => Self::Unauthenticated("unknown or revoked agent"),
            },
            DbError::Domain(DomainError::StaleEpoch { given, current }) => Self::Stale {
                job: job.unwrap_or_default(),
                given,
                current,
            },
            DbError::Domain(DomainError::InvalidTransition { from, action }) => Self::Transition {
                job: job.unwrap_or_default(),
                from,
                action,
            },
            DbError::Domain(DomainError::Invalid(errors)) => {
                Self::InvalidArgument(DomainError::Invalid(errors).to_string())
            }
            DbError::Conflict(what) => Self::Conflict(what),
            DbError::Unavailable(why) => Self::Unavailable(why),
            stale @ DbError::StaleSettings => Self::Internal(stale.to_string()),
            DbError::Query(e) => Self::Internal(e.to_string()),
        }
    }

    /// The gRPC status code, also used in the session's `Error` message.
    pub fn code(&self) -> tonic::Code {
        match self {
            Self::Unauthenticated(_) => tonic::Code::Unauthenticated,
            Self::RegistrationRefused => tonic::Code::PermissionDenied,
            Self::InvalidArgument(_) | Self::UnknownJob(_) | Self::ChunkTooLarge { .. } => {
                tonic::Code::InvalidArgument
            }
            Self::NotYourJob(_)
            | Self::Stale { .. }
            | Self::Transition { .. }
            | Self::OffsetGap { .. }
            | Self::Conflict(_) => tonic::Code::FailedPrecondition,
            Self::Unavailable(_) => tonic::Code::Unavailable,
            Self::Internal(_) => tonic::Code::Internal,
        }
    }

    /// The HTTP status: 409 for a stale epoch, 410 for a job that was
    /// cancelled (or timed out), 416 for a log offset mismatch.
    pub fn http_status(&self) -> StatusCode {
        match self {
            Self::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            Self::RegistrationRefused => StatusCode::FORBIDDEN,
            Self::InvalidArgument(_) => StatusCode::BAD_REQUEST,
            Self::UnknownJob(_) => StatusCode::NOT_FOUND,
            Self::NotYourJob(_) => StatusCode::FORBIDDEN,
            Self::Stale { .. } | Self::Conflict(_) => StatusCode::CONFLICT,
            Self::Transition { from, .. } => match from {
                JobStatus::Cancelled | JobStatus::TimedOut => StatusCode::GONE,
                _ => StatusCode::CONFLICT,
            },
            Self::ChunkTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::OffsetGap { .. } => StatusCode::RANGE_NOT_SATISFIABLE,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn slug(&self) -> (&'static str, &'static str) {
        match self {
            Self::Unauthenticated(_) => ("unauthenticated", "Not authenticated"),
            Self::RegistrationRefused => ("registration-refused", "Registration refused"),
            Self::InvalidArgument(_) => ("invalid-request", "Invalid request"),
            Self::UnknownJob(_) => ("job-not-found", "Job not found"),
            Self::NotYourJob(_) => ("not-your-job", "Job not leased to this agent"),
            Self::Stale { .. } => ("stale-lease", "Stale lease epoch"),
            Self::Transition { from, .. } => match from {
                JobStatus::Cancelled | JobStatus::TimedOut => ("job-cancelled", "Job cancelled"),
                _ => ("invalid-transition", "Change not allowed in this state"),
            },
            Self::ChunkTooLarge { .. } => ("log-chunk-too-large", "Log chunk too large"),
            Self::OffsetGap { .. } => ("log-offset-mismatch", "Log offset mismatch"),
            Self::Conflict(_) => ("conflict", "Conflict"),
            Self::Unavailable(_) => ("unavailable", "Service unavailable"),
            Self::Internal(_) => ("internal", "Internal error"),
        }
    }

    pub fn problem(&self) -> Problem {
        let (slug, title) = self.slug();
        Problem::new(self.http_status(), slug, title).detail(self.to_string())
    }

    /// Logs server-side faults once, where they are turned into a reply.
    pub fn log(&self) {
        match self {
            Self::Internal(detail) => tracing::error!(error = %detail, "internal error"),
            Self::Unavailable(detail) => tracing::warn!(error = %detail, "dependency unavailable"),
            _ => tracing::debug!(error = %self, "request refused"),
        }
    }
}

impl From<GatewayError> for tonic::Status {
    fn from(error: GatewayError) -> Self {
        error.log();
        tonic::Status::new(error.code(), error.to_string())
    }
}

impl From<bus::BusError> for GatewayError {
    fn from(error: bus::BusError) -> Self {
        Self::Unavailable(error.to_string())
    }
}
