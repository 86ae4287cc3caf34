//! The scheduler's `/metrics` move with what it does: leases granted and
//! their dispatch latency, leases that expire, queue depth, Redis publishes.

use std::sync::Arc;

use std::time::Duration;
use tokio::sync::Mutex;

use service_kit::ops::{sample, sum};
use test_support::{TestDb, TestRedis, common_config, spawn_service};

use crate::harness::*;

#[tokio::test(flavor = "multi_thread")]
async fn leases_expiries_queue_depth_and_publishes_are_exported() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let bus = bus(&redis);
    let acme = org("acme");
    // One slot, held by an agent that goes silent: its lease expires.
    let _silent = spawn_agents(
        &db,
        &bus,
        &acme,
        1,
        1,
        &[],
        Duration::from_millis(300),
        Behaviour::GoSilent,
        Arc::new(Mutex::new(Journal::default())),
    )
    .await;
    let config = scheduler::Config {
        common: common_config(scheduler::SERVICE, &db, redis.url(), redis.prefix()),
        addr: "127.0.0.1:0".parse().expect("addr"),
        settings: fast_settings(),
    };
    let service =
        spawn_service(move |listener, shutdown| scheduler::run(config, listener, shutdown));
    create_jobs(&db, &acme, &[job("sleep 1"), job("sleep 1")]).await;
    wake(&bus, &acme).await;

    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let mut seen_depth = false;
    loop {
        let text = reqwest::get(format!("{}/metrics", service.url()))
            .await
            .expect("scrape")
            .text()
            .await
            .expect("body");
        // One job waits behind the held slot.
        seen_depth |= sample(
            &text,
            r#"switchyard_scheduler_queue_depth{org="acme",queue="backlog"}"#,
        ) == Some(1.0);
        let granted = sample(&text, "switchyard_scheduler_leases_granted_total").unwrap_or(0.0);
        let expired = sample(&text, "switchyard_scheduler_leases_expired_total").unwrap_or(0.0);
        let latencies =
            sample(&text, "switchyard_scheduler_dispatch_latency_seconds_count").unwrap_or(0.0);
        let offers =
            sample(&text, r#"switchyard_redis_publish_total{channel="agent"}"#).unwrap_or(0.0);
        if seen_depth && granted >= 2.0 && expired >= 1.0 && latencies >= 2.0 && offers >= 2.0 {
            assert!(sum(&text, "switchyard_db_pool_connections_max") > 0.0);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "granted {granted}, expired {expired}, latencies {latencies}, offers {offers}, depth seen {seen_depth}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    service.stop().await.expect("clean shutdown");
}
