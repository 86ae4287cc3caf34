//! The data layer's integration tests, run against a real PostgreSQL.
//!
//! Every test gets a database of its own, cloned from a migrated template
//! ([`test_support::TestDb`]), so tests run in parallel without sharing
//! rows. Concurrency tests open extra pooled connections to the same
//! database and race real transactions against each other.

mod agents;
mod audit;
mod concurrency;
mod conn;
mod dispatch;
mod jobs;
mod lease_on_create;
mod leases;
mod logs;
mod migrations;
mod orgs;
mod pooler;
mod repositories;
mod support;
