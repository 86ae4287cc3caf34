//! realtime-broadcaster integration tests: the real service in-process on port 0,
//! against real PostgreSQL and Redis.

mod auth;
#[cfg(feature = "browser-test")]
mod browser;
mod fanout;
mod handshake;
mod keepalive;
mod metrics;
mod ops;
mod slow;
mod streaming;
mod support;
