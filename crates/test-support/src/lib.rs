//! Test helpers. Every test gets real PostgreSQL and Redis, isolated:
//!
//! * [`TestDb`]: its own database, cloned from a template that is migrated
//!   once per schema version (cloning takes milliseconds; migrating every
//!   test would not), dropped when the test ends.
//! * [`TestRedis`]: the shared Redis with a unique key and channel prefix,
//!   whose keys are deleted when the test ends.
//! * [`RedisServer`]: a private `redis-server` on its own port, for tests
//!   that must stop and restart Redis without disturbing other tests.
//! * [`SentinelSetup`]: a private primary, replica and three Sentinels, for
//!   tests that force a failover.
//! * [`spawn_service`]: runs a service's `run(config, listener, shutdown)`
//!   in-process on port 0.
//!
//! `TEST_DATABASE_URL` (default `postgres://postgres:postgres@127.0.0.1:5432/postgres`)
//! names a maintenance database on a server where the user may create
//! databases; `TEST_REDIS_URL` (default `redis://127.0.0.1:6379`) the Redis.
//! With `TEST_REDIS_CLUSTER=true`, `TEST_REDIS_URL` lists the seed nodes of
//! a Redis Cluster (comma-separated) and the shared Redis is used as one.
//! With `TEST_REDIS_SENTINEL_MASTER=<name>`, `TEST_REDIS_URL` lists
//! Sentinels (comma-separated) and the shared Redis is the primary they
//! name. A [`RedisServer`] is always a single Redis.
//! With `TEST_PGBOUNCER_URL` (a PgBouncer in transaction pooling mode in
//! front of that server, `scripts/pgbouncer.sh`), every test database is
//! reached through the pooler.

mod database;
pub mod ops_checks;
mod redis_server;
mod service;

pub use database::{EmptyDb, TestDb};
pub use redis_server::{RedisServer, SentinelSetup, TestRedis, bus_config, shared_sentinel_master};
pub use service::{RunningService, spawn_service};

/// Installs a test log subscriber once (honours `RUST_LOG`; quiet otherwise).
pub fn init_tracing() {
    use std::sync::Once;
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    });
}

/// Service settings pointing at this test's database and Redis prefix, with
/// one HTTP worker and short timeouts.
pub fn common_config(
    service: &'static str,
    db: &TestDb,
    redis_url: &str,
    redis_prefix: &str,
) -> service_kit::config::CommonConfig {
    let [url, pooling, migration_url] = db.env_vars();
    let vars = [
        url,
        pooling,
        migration_url,
        ("DATABASE_POOL_SIZE", "8".to_owned()),
        ("REDIS_URL", redis_url.to_owned()),
        ("REDIS_KEY_PREFIX", redis_prefix.to_owned()),
        (
            "REDIS_CLUSTER",
            redis_server::is_shared_cluster(redis_url).to_string(),
        ),
        (
            "REDIS_SENTINEL_MASTER",
            redis_server::shared_sentinel_master_for(redis_url).unwrap_or_default(),
        ),
        ("HTTP_WORKERS", "1".to_owned()),
        ("HTTP_SHUTDOWN_TIMEOUT_SECS", "2".to_owned()),
    ];
    let lookup = move |name: &str| {
        vars.iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.clone())
    };
    service_kit::config::CommonConfig::from_source(service, &lookup).expect("test config")
}
