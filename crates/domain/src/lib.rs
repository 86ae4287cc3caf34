//! Switchyard's business rules, free of I/O and of any transport or storage
//! crate (CI checks that diesel, actix, tonic and redis never appear here).
//!
//! Everything a service decides about a job — whether a transition is
//! allowed, how long to back off, what counts against which retry budget,
//! whether input is acceptable — is a plain function in this crate, so it can
//! be unit-tested without a database and reused by every transport.

pub mod agent;
pub mod error;
pub mod events;
pub mod ids;
pub mod job;
pub mod org;
pub mod retry;
pub mod scheduling;
pub mod state;
pub mod validation;

pub use error::DomainError;
pub use ids::{AgentId, JobId, OrgId, RegistrationTokenId, RepositoryId};
