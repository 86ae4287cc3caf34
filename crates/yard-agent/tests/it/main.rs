//! yard-agent end to end: the real `yard-agent` binary as a child process,
//! against gateways running in-process on real PostgreSQL and Redis. The
//! tests play the scheduler's part by hand (lease, then offer on the bus).

mod agent;
mod support;
