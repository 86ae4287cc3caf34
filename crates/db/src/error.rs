use diesel::result::{DatabaseErrorKind, Error as DieselError};
use domain::DomainError;

/// The data layer's one error type.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("not found")]
    NotFound,
    /// A domain rule refused the change (stale epoch, invalid transition,
    /// invalid input). Nothing was written.
    #[error(transparent)]
    Domain(#[from] DomainError),
    /// A uniqueness or other constraint conflict (e.g. a duplicate name).
    #[error("conflict: {0}")]
    Conflict(String),
    /// No connection could be had in time: PostgreSQL is down or overloaded.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// Settings taken from a cache changed meanwhile; nothing was written.
    /// Read them again and retry.
    #[error("the organization's settings changed")]
    StaleSettings,
    #[error("database error: {0}")]
    Query(DieselError),
}

impl From<DieselError> for DbError {
    fn from(error: DieselError) -> Self {
        match error {
            DieselError::NotFound => DbError::NotFound,
            DieselError::DatabaseError(DatabaseErrorKind::UniqueViolation, info) => {
                DbError::Conflict(info.constraint_name().unwrap_or("unique").to_owned())
            }
            // A repository deleted between a create's ownership check and
            // its insert: the same answer the check gives.
            DieselError::DatabaseError(DatabaseErrorKind::ForeignKeyViolation, info)
                if info.constraint_name() == Some("jobs_repository_id_fkey") =>
            {
                DbError::Domain(crate::jobs::unknown_repository())
            }
            DieselError::DatabaseError(DatabaseErrorKind::ClosedConnection, info) => {
                DbError::Unavailable(info.message().to_owned())
            }
            other => DbError::Query(other),
        }
    }
}

impl DbError {
    /// Whether the operation may succeed if simply retried later.
    pub fn is_transient(&self) -> bool {
        matches!(self, DbError::Unavailable(_))
            || matches!(
                self,
                DbError::Query(DieselError::DatabaseError(
                    DatabaseErrorKind::SerializationFailure,
                    _
                ))
            )
    }
}
