//! job-api, the scheduler and the broadcaster in-process, on one test's
//! database and Redis prefix, accepting HS256 tokens signed with `secret`.
//! Shared by the `trace` and `dashboard` tests.

use std::time::Duration;

use test_support::{RunningService, TestDb, TestRedis, common_config, spawn_service};

pub fn hs256(secret: &str) -> auth::AuthConfig {
    auth::AuthConfig {
        hs256_secret: Some(secret.into()),
        ..auth::AuthConfig::default()
    }
}

pub fn job_api(db: &TestDb, redis: &TestRedis, auth: auth::AuthConfig) -> RunningService {
    let config = job_api::Config {
        common: common_config(job_api::SERVICE, db, redis.url(), redis.prefix()),
        addr: "127.0.0.1:0".parse().expect("addr"),
        auth,
        cancel_grace: Duration::from_secs(30),
        cors_origins: Vec::new(),
        lease_on_create: Some(Duration::from_secs(10)),
    };
    spawn_service(move |listener, shutdown| job_api::run(config, listener, shutdown))
}

pub fn scheduler(db: &TestDb, redis: &TestRedis, settings: scheduler::Settings) -> RunningService {
    let config = scheduler::Config {
        common: common_config(scheduler::SERVICE, db, redis.url(), redis.prefix()),
        addr: "127.0.0.1:0".parse().expect("addr"),
        settings,
    };
    spawn_service(move |listener, shutdown| scheduler::run(config, listener, shutdown))
}

pub fn broadcaster(db: &TestDb, redis: &TestRedis, auth: auth::AuthConfig) -> RunningService {
    let config = realtime_broadcaster::Config {
        common: common_config(
            realtime_broadcaster::SERVICE,
            db,
            redis.url(),
            redis.prefix(),
        ),
        addr: "127.0.0.1:0".parse().expect("addr"),
        auth,
        dashboard_api_url: "http://127.0.0.1:8080".into(),
        settings: realtime_broadcaster::Settings::default(),
        check_interval: Duration::from_millis(500),
    };
    spawn_service(move |listener, shutdown| realtime_broadcaster::run(config, listener, shutdown))
}
