//! job-api integration tests: the real service in-process on port 0,
//! against real PostgreSQL and Redis.

mod api;
mod binary;
mod matrix;
mod ops;
