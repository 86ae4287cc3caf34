//! job-api's one error type, mapped once to RFC 9457 problem+json.

use actix_web::http::StatusCode;
use actix_web::http::header::{HeaderValue, WWW_AUTHENTICATE};
use actix_web::{HttpResponse, ResponseError};
use db::DbError;
use domain::DomainError;
use domain::validation::FieldError;
use service_kit::problem::Problem;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No or bad credentials: 401 with `WWW-Authenticate`.
    #[error("{0}")]
    Unauthenticated(String),
    /// A member without the role or permission the action needs.
    #[error("{0}")]
    Forbidden(String),
    /// Absent, or belongs to an org the caller cannot see (no existence leak).
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("invalid request")]
    Invalid(Vec<FieldError>),
    /// The job's state does not allow the action.
    #[error("{0}")]
    Conflict(String),
    /// Same idempotency key, different body.
    #[error("the Idempotency-Key was already used with a different request body")]
    IdempotencyKeyReused,
    /// Our dependencies are down.
    #[error("{0}")]
    Unavailable(String),
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    pub fn invalid(field: &str, message: impl Into<String>) -> Self {
        Self::Invalid(vec![FieldError::new(field, message)])
    }

    fn parts(&self) -> (StatusCode, &'static str, &'static str) {
        match self {
            ApiError::Unauthenticated(_) => (
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "Authentication required",
            ),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden", "Not allowed"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not-found", "Not found"),
            ApiError::Invalid(_) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "validation",
                "Invalid request",
            ),
            ApiError::Conflict(_) => (
                StatusCode::CONFLICT,
                "conflict",
                "Conflict with the current state",
            ),
            ApiError::IdempotencyKeyReused => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency-key-reused",
                "Idempotency key reused",
            ),
            ApiError::Unavailable(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "Service unavailable",
            ),
            ApiError::Internal(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "Internal error",
            ),
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.parts().0
    }

    fn error_response(&self) -> HttpResponse {
        let (status, slug, title) = self.parts();
        let mut problem = Problem::new(status, slug, title);
        problem = match self {
            ApiError::Invalid(errors) => problem
                .detail("one or more fields are invalid")
                .errors(errors.clone()),
            // Internal details go to the log, never to the client.
            ApiError::Internal(detail) => {
                tracing::error!(error = %detail, "internal error");
                problem.detail("the server failed; the request id identifies it in the logs")
            }
            other => problem.detail(other.to_string()),
        };
        let mut response = problem.response();
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"switchyard\""),
            );
        }
        response
    }
}

impl From<DomainError> for ApiError {
    fn from(error: DomainError) -> Self {
        match error {
            DomainError::Invalid(errors) => ApiError::Invalid(errors),
            DomainError::InvalidTransition { .. } | DomainError::StaleEpoch { .. } => {
                ApiError::Conflict(error.to_string())
            }
        }
    }
}

impl From<DbError> for ApiError {
    fn from(error: DbError) -> Self {
        match error {
            DbError::NotFound => ApiError::NotFound("resource"),
            DbError::Domain(domain) => domain.into(),
            DbError::Conflict(what) if what == "idempotency_key_reused" => {
                ApiError::IdempotencyKeyReused
            }
            DbError::Conflict(what) => {
                ApiError::Conflict(format!("conflicts with an existing resource ({what})"))
            }
            DbError::Unavailable(detail) => {
                ApiError::Unavailable(format!("database unavailable: {detail}"))
            }
            // Retried with fresh settings before it could get here.
            stale @ DbError::StaleSettings => ApiError::Internal(stale.to_string()),
            DbError::Query(detail) => ApiError::Internal(detail.to_string()),
        }
    }
}

impl From<auth::AuthError> for ApiError {
    fn from(error: auth::AuthError) -> Self {
        if error.is_server_side() {
            ApiError::Unavailable(error.to_string())
        } else {
            ApiError::Unauthenticated(error.to_string())
        }
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
