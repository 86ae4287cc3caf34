use test_support::ops_checks::{check_operational_endpoints, check_readiness_follows_redis};
use test_support::{RedisServer, TestDb, TestRedis};

use crate::support::start;

#[tokio::test(flavor = "multi_thread")]
async fn operational_endpoints_answer() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let gateway = start(&db, redis.url(), redis.prefix());
    check_operational_endpoints(
        &gateway.http_url(),
        agent_gateway::SERVICE,
        env!("CARGO_PKG_VERSION"),
    )
    .await;
    gateway.stop().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread")]
async fn readiness_follows_redis_down_and_back_without_restart() {
    let db = TestDb::new().await;
    let mut redis = RedisServer::start();
    let gateway = start(&db, &redis.url(), "sy:");
    check_readiness_follows_redis(&gateway.http_url(), &mut redis).await;
    gateway.stop().await.expect("clean shutdown");
}
