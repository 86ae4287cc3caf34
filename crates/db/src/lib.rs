//! The PostgreSQL data layer: the schema, embedded migrations, a pooled
//! async connection, and every statement the services run.
//!
//! State changes are single statements guarded by the job's status (taken
//! from [`domain::state::Action::sources`]) and, for agent writes, by the
//! lease epoch, so correctness never depends on which process wins a race.

pub mod agents;
pub mod audit;
mod cached;
mod conn;
pub mod dispatch;
mod error;
pub mod jobs;
pub mod leases;
pub mod logs;
mod migrations;
pub mod orgs;
mod pool;
pub mod queues;
pub mod repositories;
pub mod schema;
pub mod secrets;
pub mod sessions;
pub mod sweeps;

pub use conn::PgConn;
pub use error::DbError;
pub use migrations::{MIGRATIONS, migrations_fingerprint, run_migrations};
pub use pool::{Db, PoolConfig, PooledConn};

pub type DbResult<T> = Result<T, DbError>;
