//! What every Switchyard service shares: typed configuration from the
//! environment ([`config`]), the operational endpoints `/healthz`,
//! `/readyz`, `/version` and `/metrics` ([`ops`]), the HTTP server with
//! safe keep-alive and timeouts ([`http`]), RFC 9457 problem responses
//! ([`problem`]), and signal-driven graceful shutdown ([`shutdown`]).

pub mod config;
pub mod http;
pub mod launch;
pub mod ops;
pub mod problem;
pub mod shutdown;

/// The commit this binary was built from.
pub const GIT_COMMIT: &str = env!("SWITCHYARD_GIT_COMMIT");
