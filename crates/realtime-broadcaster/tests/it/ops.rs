use std::time::Duration;

use test_support::{RedisServer, TestDb, TestRedis};

async fn start(db: &TestDb, redis_url: &str, prefix: &str) -> test_support::RunningService {
    crate::support::start(db, redis_url, prefix)
}

#[tokio::test(flavor = "multi_thread")]
async fn operational_endpoints_answer() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let service = start(&db, redis.url(), redis.prefix()).await;
    let client = reqwest::Client::new();

    let health = client
        .get(format!("{}/healthz", service.url()))
        .send()
        .await
        .expect("healthz");
    assert_eq!(health.status(), 200);

    let ready = client
        .get(format!("{}/readyz", service.url()))
        .send()
        .await
        .expect("readyz");
    assert_eq!(ready.status(), 200);
    let body: serde_json::Value = ready.json().await.expect("json");
    assert_eq!(body["checks"]["postgres"], "ok");
    assert_eq!(body["checks"]["redis"], "ok");

    let version: serde_json::Value = client
        .get(format!("{}/version", service.url()))
        .send()
        .await
        .expect("version")
        .json()
        .await
        .expect("json");
    assert_eq!(version["name"], realtime_broadcaster::SERVICE);
    assert_eq!(version["version"], env!("CARGO_PKG_VERSION"));

    let metrics = client
        .get(format!("{}/metrics", service.url()))
        .send()
        .await
        .expect("metrics");
    assert_eq!(metrics.status(), 200);
    let text = metrics.text().await.expect("text");
    assert!(text.contains("switchyard_http_requests_total"), "{text}");
    assert!(
        text.contains("route=\"/readyz\""),
        "request metrics carry the route: {text}"
    );
    assert!(text.contains("switchyard_db_pool_connections_max"));

    service.stop().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread")]
async fn readiness_follows_redis_down_and_back_without_restart() {
    let db = TestDb::new().await;
    let mut redis = RedisServer::start();
    let service = start(&db, &redis.url(), "sy:").await;
    let client = reqwest::Client::new();
    let readyz = format!("{}/readyz", service.url());
    assert_eq!(
        client.get(&readyz).send().await.expect("readyz").status(),
        200
    );

    redis.stop();
    let asked = std::time::Instant::now();
    let down = client.get(&readyz).send().await.expect("readyz");
    assert_eq!(down.status(), 503);
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "took {:?}",
        asked.elapsed()
    );
    let body: serde_json::Value = down.json().await.expect("json");
    assert_eq!(body["checks"]["postgres"], "ok");
    assert_ne!(body["checks"]["redis"], "ok");

    redis.restart();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let status = client.get(&readyz).send().await.expect("readyz").status();
        if status == 200 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still {status} after Redis came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    service.stop().await.expect("clean shutdown");
}
