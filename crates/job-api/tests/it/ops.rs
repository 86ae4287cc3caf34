use test_support::ops_checks::{check_operational_endpoints, check_readiness_follows_redis};
use test_support::{RedisServer, RunningService, TestDb, TestRedis, common_config, spawn_service};

fn start(db: &TestDb, redis_url: &str, prefix: &str) -> RunningService {
    let config = job_api::Config {
        common: common_config(job_api::SERVICE, db, redis_url, prefix),
        addr: "127.0.0.1:0".parse().expect("addr"),
        auth: auth::AuthConfig {
            hs256_secret: Some("ops-test-secret".into()),
            ..auth::AuthConfig::default()
        },
        cancel_grace: std::time::Duration::from_secs(30),
        cors_origins: Vec::new(),
    };
    spawn_service(move |listener, shutdown| job_api::run(config, listener, shutdown))
}

#[tokio::test(flavor = "multi_thread")]
async fn operational_endpoints_answer() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let service = start(&db, redis.url(), redis.prefix());
    check_operational_endpoints(&service.url(), job_api::SERVICE, env!("CARGO_PKG_VERSION")).await;
    service.stop().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread")]
async fn readiness_follows_redis_down_and_back_without_restart() {
    let db = TestDb::new().await;
    let mut redis = RedisServer::start();
    let service = start(&db, &redis.url(), "sy:");
    check_readiness_follows_redis(&service.url(), &mut redis).await;
    service.stop().await.expect("clean shutdown");
}
