//! scheduler integration tests against real PostgreSQL and Redis, with
//! simulated agents playing the gateway's part through the same db calls.

mod crash;
mod harness;
mod metrics;
mod ops;
mod scheduling;
