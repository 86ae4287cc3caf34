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
        lease_on_create: Some(std::time::Duration::from_secs(10)),
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

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_requests_publishes_and_show_the_pool() {
    use service_kit::ops::{sample, sum};
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let service = start(&db, redis.url(), redis.prefix());
    let token = auth::dev::mint_hs256(
        "ops-test-secret",
        None,
        "user-1",
        &[(
            domain::OrgId::parse("acme").expect("org"),
            auth::Role::Member,
        )],
        std::time::Duration::from_secs(600),
    );
    let client = reqwest::Client::new();
    let created = client
        .post(format!("{}/v1/orgs/acme/jobs", service.url()))
        .bearer_auth(&token)
        .json(&serde_json::json!({"command": "echo hi"}))
        .send()
        .await
        .expect("create");
    assert_eq!(created.status(), 201);
    let refused = client
        .post(format!("{}/v1/orgs/acme/jobs", service.url()))
        .json(&serde_json::json!({"command": "echo hi"}))
        .send()
        .await
        .expect("create without a token");
    assert_eq!(refused.status(), 401);

    let text = client
        .get(format!("{}/metrics", service.url()))
        .send()
        .await
        .expect("scrape")
        .text()
        .await
        .expect("body");
    let created_series = text
        .lines()
        .find(|l| {
            l.starts_with("switchyard_http_requests_total{")
                && l.contains(r#"method="POST""#)
                && l.contains(r#"status="201""#)
                && l.contains("/jobs")
        })
        .unwrap_or_else(|| panic!("no 201 series in {text}"));
    assert!(created_series.ends_with(" 1"), "{created_series}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("switchyard_http_requests_total{")
                && l.contains(r#"status="401""#)),
        "errors are counted by status"
    );
    assert!(sum(&text, "switchyard_http_request_duration_seconds_count") >= 2.0);
    // The job's creation woke the scheduler and told org watchers.
    assert!(
        sample(
            &text,
            r#"switchyard_redis_publish_total{channel="scheduler_wake"}"#
        )
        .is_some_and(|n| n >= 1.0),
        "{text}"
    );
    assert!(
        sample(&text, r#"switchyard_redis_publish_total{channel="org"}"#).is_some_and(|n| n >= 1.0)
    );
    assert_eq!(
        sample(&text, "switchyard_db_pool_connections_max"),
        Some(8.0),
        "DATABASE_POOL_SIZE of the test config"
    );
    assert!(sample(&text, "switchyard_db_pool_connections_in_use").is_some());
    service.stop().await.expect("clean shutdown");
}
