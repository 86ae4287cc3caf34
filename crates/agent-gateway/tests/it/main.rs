//! agent-gateway integration tests: the real service in-process on port 0,
//! against real PostgreSQL and Redis.

mod http_pull;
mod metrics;
mod ops;
mod session;
mod support;
mod trace_context;
